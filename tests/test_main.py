"""`python -m ferroloop`: an unmodified program runs as Python runs it, on ferroloop loops.

Each test writes a small program to tmp_path and runs it in a subprocess, often twice: as
`python prog.py` and as `python -m ferroloop prog.py`; what the program sees (argv, path,
__name__, exit status, traceback) must be the same, except the loop class.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from parity_helpers import SKIP_NATIVE

pytestmark = pytest.mark.skipif(SKIP_NATIVE, reason="FERROLOOP_SKIP_NATIVE=1")

TIMEOUT = 60


def run(args, cwd, input=None):
    env = dict(os.environ)
    env.pop("PYTHONSAFEPATH", None)
    return subprocess.run(
        [sys.executable, *args],
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        input=input,
    )


def ferro(args, cwd):
    return run(["-m", "ferroloop", *args], cwd)


def write(path, source):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


LOOP_TYPES = """
import asyncio, json, sys

async def running_loop_type():
    return type(asyncio.get_running_loop())

def name(t):
    return f"{t.__module__}.{t.__qualname__}"

out = {}
out["asyncio.run"] = name(asyncio.run(running_loop_type()))
loop = asyncio.new_event_loop()
out["new_event_loop"] = name(type(loop))
out["new_event_loop running"] = name(loop.run_until_complete(running_loop_type()))
loop.close()
with asyncio.Runner() as runner:
    out["Runner"] = name(runner.run(running_loop_type()))
asyncio.set_event_loop(None)
print(json.dumps(out))
"""

GET_EVENT_LOOP = """
import asyncio, json, warnings
warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: no current loop

async def running_loop_type():
    return type(asyncio.get_running_loop())

loop = asyncio.get_event_loop()
t = loop.run_until_complete(running_loop_type())
print(json.dumps([f"{type(loop).__module__}.{type(loop).__qualname__}", t is type(loop)]))
loop.close()
"""


def test_asyncio_makes_ferroloop_loops(tmp_path):
    prog = write(tmp_path / "prog.py", LOOP_TYPES)
    stock = run([str(prog)], tmp_path)
    assert stock.returncode == 0, stock.stderr
    assert "ferroloop" not in stock.stdout
    p = ferro([str(prog)], tmp_path)
    assert p.returncode == 0, p.stderr
    types = json.loads(p.stdout)
    assert set(types.values()) == {"ferroloop.loop.Loop"}, types


def test_get_event_loop_run_until_complete(tmp_path):
    prog = write(tmp_path / "prog.py", GET_EVENT_LOOP)
    p = ferro([str(prog)], tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == ["ferroloop.loop.Loop", True]


def test_loop_is_a_ferroloop_loop_instance(tmp_path):
    prog = write(
        tmp_path / "prog.py",
        """
        import asyncio, ferroloop

        async def main():
            return isinstance(asyncio.get_running_loop(), ferroloop.Loop)

        print(asyncio.run(main()))
        """,
    )
    p = ferro([str(prog)], tmp_path)
    assert (p.returncode, p.stdout, p.stderr) == (0, "True\n", "")


SEES = """
import json, sys
print(json.dumps({
    "argv": sys.argv, "path0": sys.path[0], "name": __name__, "file": __file__,
    "main_is_me": sys.modules["__main__"].__dict__ is globals(),
}))
"""


@pytest.mark.parametrize("script", ["prog.py", "sub/prog.py"])
def test_script_sees_what_python_gives_it(tmp_path, script):
    write(tmp_path / script, SEES)
    args = [script, "a b", "--help", "-m", "x"]
    stock = run(args, tmp_path)
    p = ferro(args, tmp_path)
    assert stock.returncode == 0 and p.returncode == 0, (stock.stderr, p.stderr)
    assert json.loads(p.stdout) == json.loads(stock.stdout)
    assert json.loads(p.stdout)["argv"] == args


def test_main_block_runs_and_pickle_finds_main_classes(tmp_path):
    prog = write(
        tmp_path / "prog.py",
        """
        import asyncio, pickle

        class Point:
            def __init__(self, x):
                self.x = x

        async def main():
            return pickle.loads(pickle.dumps(Point(3))).x

        if __name__ == "__main__":
            print("main block", asyncio.run(main()))
        """,
    )
    p = ferro([str(prog)], tmp_path)
    assert (p.returncode, p.stdout, p.stderr) == (0, "main block 3\n", "")


@pytest.mark.parametrize(
    "body, code",
    [
        ("pass", 0),
        ("import sys; sys.exit(3)", 3),
        ("raise SystemExit(0)", 0),
        ("raise SystemExit('fatal: bad input')", 1),
        ("import asyncio\nasync def main():\n    raise SystemExit(4)\nasyncio.run(main())", 4),
    ],
)
def test_exit_status_passed_through(tmp_path, body, code):
    prog = write(tmp_path / "prog.py", body + "\n")
    stock = run([str(prog)], tmp_path)
    p = ferro([str(prog)], tmp_path)
    assert stock.returncode == code
    assert (p.returncode, p.stdout, p.stderr) == (code, stock.stdout, stock.stderr)


def test_uncaught_exception_traceback_like_python(tmp_path):
    prog = write(
        tmp_path / "prog.py",
        """
        def inner():
            raise ValueError("boom")

        def outer():
            try:
                inner()
            except ValueError as exc:
                raise KeyError("while handling") from exc

        outer()
        """,
    )
    stock = run([str(prog)], tmp_path)
    p = ferro([str(prog)], tmp_path)
    assert stock.returncode == 1
    assert (p.returncode, p.stdout, p.stderr) == (1, "", stock.stderr)


def test_uncaught_exception_from_a_coroutine(tmp_path):
    prog = write(
        tmp_path / "prog.py",
        """
        import asyncio

        async def fails():
            await asyncio.sleep(0)
            raise ValueError("boom from a task")

        async def main():
            await asyncio.gather(fails())

        asyncio.run(main())
        """,
    )
    p = ferro([str(prog)], tmp_path)
    assert p.returncode == 1
    lines = p.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert f'File "{prog}", line 11, in <module>' in lines[1]
    assert lines[-1] == "ValueError: boom from a task"
    assert "ferroloop/__main__.py" not in p.stderr and "runpy" not in p.stderr


def test_excepthook_of_the_program_is_used(tmp_path):
    prog = write(
        tmp_path / "prog.py",
        """
        import sys
        sys.excepthook = lambda t, v, tb: print("hook:", t.__name__, v, file=sys.stderr)
        raise RuntimeError("x")
        """,
    )
    p = ferro([str(prog)], tmp_path)
    assert (p.returncode, p.stderr) == (1, "hook: RuntimeError x\n")


def test_missing_script_is_pythons_error(tmp_path):
    stock = run(["missing.py"], tmp_path)
    p = ferro(["missing.py", "arg"], tmp_path)
    assert stock.returncode == 2
    assert (p.returncode, p.stdout, p.stderr) == (2, "", stock.stderr)
    assert "can't open file" in p.stderr


@pytest.mark.parametrize("name", ["no_such_module_xyz", "json.no_such_submodule"])
def test_missing_module_is_pythons_error(tmp_path, name):
    stock = run(["-m", name], tmp_path)
    p = ferro(["-m", name], tmp_path)
    assert stock.returncode == 1
    assert (p.returncode, p.stdout, p.stderr) == (1, "", stock.stderr)
    assert "No module named" in p.stderr


def make_package(tmp_path):
    write(tmp_path / "pkg" / "__init__.py", "")
    source = LOOP_TYPES.replace("print(json.dumps(out))", "") + textwrap.dedent(
        """
        if __name__ == "__main__":
            print(json.dumps({"argv": sys.argv, "path0": sys.path[0],
                              "types": sorted(set(out.values()))}))
        """
    )
    for target in ("mod.py", "__main__.py"):
        (tmp_path / "pkg" / target).write_text(source)


@pytest.mark.parametrize("module", ["pkg.mod", "pkg"])
def test_module_mode(tmp_path, module):
    make_package(tmp_path)
    stock = run(["-m", module, "x", "-v"], tmp_path)
    p = ferro(["-m", module, "x", "-v"], tmp_path)
    assert stock.returncode == 0 and p.returncode == 0, (stock.stderr, p.stderr)
    seen, expected = json.loads(p.stdout), json.loads(stock.stdout)
    assert seen["argv"] == expected["argv"]
    assert seen["argv"][1:] == ["x", "-v"]
    assert seen["argv"][0] == str(
        tmp_path / "pkg" / ("mod.py" if module == "pkg.mod" else "__main__.py")
    )
    assert seen["path0"] == expected["path0"]
    assert seen["types"] == ["ferroloop.loop.Loop"]
    assert "ferroloop" not in " ".join(expected["types"])


def test_module_mode_joined_form(tmp_path):
    make_package(tmp_path)
    p = ferro(["-mpkg.mod"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["types"] == ["ferroloop.loop.Loop"]


def test_module_mode_exception_exit_status(tmp_path):
    write(tmp_path / "boom.py", "raise LookupError('from a module')\n")
    p = ferro(["-m", "boom"], tmp_path)
    assert p.returncode == 1
    assert p.stderr.splitlines()[-1] == "LookupError: from a module"
    assert "ferroloop/__main__.py" not in p.stderr


def test_help(tmp_path):
    p = ferro(["--help"], tmp_path)
    assert p.returncode == 0 and p.stderr == ""
    assert "python -m ferroloop script.py [args...]" in p.stdout
    assert "python -m ferroloop -m module [args...]" in p.stdout
    assert "ferroloop" in p.stdout and "event loop" in p.stdout
    assert ferro(["-h"], tmp_path).stdout == p.stdout


def test_no_arguments_is_a_usage_error(tmp_path):
    p = ferro([], tmp_path)
    assert p.returncode == 2 and p.stdout == ""
    assert "usage: python -m ferroloop" in p.stderr


def test_unknown_option_is_a_usage_error(tmp_path):
    p = ferro(["--frobnicate", "prog.py"], tmp_path)
    assert p.returncode == 2
    assert "unknown option '--frobnicate'" in p.stderr


def test_module_mode_without_name(tmp_path):
    p = ferro(["-m"], tmp_path)
    assert p.returncode == 2
    assert "-m" in p.stderr


def test_version(tmp_path):
    import ferroloop

    p = ferro(["--version"], tmp_path)
    assert (p.returncode, p.stdout) == (0, f"ferroloop {ferroloop.__version__}\n")


def test_network_program_runs_unchanged(tmp_path):
    prog = write(
        tmp_path / "echo.py",
        """
        import asyncio, sys

        async def handle(reader, writer):
            writer.write((await reader.readline()).upper())
            await writer.drain()
            writer.close()

        async def main():
            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello\\n")
            line = await reader.readline()
            writer.close()
            server.close()
            await server.wait_closed()
            print(type(asyncio.get_running_loop()).__module__, line.decode().strip())

        asyncio.run(main())
        """,
    )
    p = ferro([str(prog)], tmp_path)
    assert (p.returncode, p.stdout, p.stderr) == (0, "ferroloop.loop HELLO\n", "")
