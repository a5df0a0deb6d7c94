"""``python -m ferroloop``: run an unmodified asyncio program on ferroloop.

    python -m ferroloop script.py [args...]
    python -m ferroloop -m package.module [args...]

The program runs as Python itself would run it (``runpy``, with ``__name__ == "__main__"``,
``sys.argv`` and ``sys.path[0]`` set the same way), after ferroloop's event loop policy is
installed: ``asyncio.run``, ``asyncio.get_event_loop`` and ``asyncio.new_event_loop`` then
all make ferroloop loops. Nothing else in asyncio is changed. The program's exit status,
``SystemExit`` codes and uncaught exceptions (a traceback of the program's own frames, exit
status 1) are passed through.
"""

import io
import os
import runpy
import sys
from typing import NoReturn

import ferroloop

from . import _compat

USAGE = """\
usage: python -m ferroloop script.py [args...]
       python -m ferroloop -m module [args...]

Run an asyncio program, unmodified, with ferroloop as its event loop.

ferroloop's event loop policy is installed first, so asyncio.run(),
asyncio.get_event_loop() and asyncio.new_event_loop() make ferroloop loops;
nothing else in asyncio is changed. The program sees sys.argv, sys.path and
__name__ == "__main__" exactly as under `python script.py` / `python -m module`,
and its exit status and uncaught exceptions are passed through.

options:
  -m module      run a library module as a script (like `python -m module`)
  -h, --help     show this help message and exit
  --version      show ferroloop's version and exit
"""


def _interpreter() -> str:
    # The interpreter as it was invoked, as Python names itself in its own errors.
    orig = getattr(sys, "orig_argv", None)
    return orig[0] if orig else sys.executable


def _usage_error(message: str) -> NoReturn:
    sys.stderr.write(USAGE.split("\n\n", 1)[0] + "\n")
    sys.stderr.write(f"python -m ferroloop: error: {message}\n")
    sys.exit(2)


def _run_script(path: str, args: list) -> None:
    # `python missing.py` says this and exits with status 2.
    if not os.path.exists(path):
        sys.stderr.write(
            f"{_interpreter()}: can't open file {os.path.abspath(path)!r}: "
            "[Errno 2] No such file or directory\n"
        )
        sys.exit(2)
    sys.argv[:] = [path, *args]
    source_file = os.path.isfile(path) and not path.endswith(".pyc") and not _is_zip(path)
    if not _compat.SAFE_PATH:
        # `python script.py` puts the script's directory first on sys.path, where
        # `python -m ferroloop` put the current directory. (run_path puts a directory or a
        # zip file there itself.)
        if source_file:
            sys.path[0] = os.path.dirname(os.path.realpath(path))
        else:
            del sys.path[0]
    if source_file:
        _run_user_code(_exec_as_main, path)
    else:
        _run_user_code(runpy.run_path, path, run_name="__main__")


def _is_zip(path: str) -> bool:
    import zipfile

    return zipfile.is_zipfile(path)


def _exec_as_main(path: str) -> None:
    """Run a source file as `python path` does: a fresh ``__main__`` module whose
    ``__file__`` is the absolute path, with ``sys.argv[0]`` left as given (runpy.run_path
    would make both the path as given)."""
    import builtins
    import types
    from importlib.machinery import SourceFileLoader

    filename = os.path.abspath(path)
    with io.open_code(filename) as f:
        source = f.read()
    code = compile(source, filename, "exec", dont_inherit=True)
    module = types.ModuleType("__main__")
    module.__dict__.update(
        __file__=filename,
        __cached__=None,
        __loader__=SourceFileLoader("__main__", filename),
        __spec__=None,
        __package__=None,
        __builtins__=builtins,
    )
    # The program's module stays __main__ to the end (atexit handlers, threads, pickle).
    sys.modules["__main__"] = module
    exec(code, module.__dict__)  # noqa: S102 -- running the program is the point


def _run_module(name: str, args: list) -> None:
    # `python -m missing` says "<python>: No module named missing" and exits with status 1;
    # runpy's own lookup gives exactly Python's messages for every such case.
    get_details = getattr(runpy, "_get_module_details", None)
    error = getattr(runpy, "_Error", None)
    if get_details is not None and error is not None:
        try:
            get_details(name, error)
        except error as exc:
            sys.exit(f"{sys.executable}: {exc}")
    sys.argv[:] = [name, *args]  # run_module sets argv[0] to the module's file
    _run_user_code(runpy.run_module, name, run_name="__main__", alter_sys=True)


def _run_user_code(runner, *args, **kwargs) -> None:
    try:
        runner(*args, **kwargs)
    except SystemExit:
        raise  # exit codes and messages, as Python handles them
    except KeyboardInterrupt:
        raise  # Python's own exit (by SIGINT) for an uncaught Ctrl-C
    except BaseException as exc:  # noqa: BLE001 -- any uncaught exception, as Python
        # An uncaught exception: print it as Python would (through sys.excepthook, so a
        # program's own hook is honoured), without ferroloop's and runpy's frames.
        tb = exc.__traceback__
        while tb is not None and _is_runner_frame(tb.tb_frame):
            tb = tb.tb_next
        # (The default hook prints exc.__traceback__, so trim that too.)
        sys.excepthook(type(exc), exc.with_traceback(tb), tb)
        sys.exit(1)


def _is_runner_frame(frame) -> bool:
    filename = frame.f_code.co_filename
    return filename == __file__ or filename in (runpy.__file__, "<frozen runpy>")


def main(argv: list) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        (sys.stdout if argv else sys.stderr).write(USAGE)
        sys.exit(0 if argv else 2)
    first = argv[0]
    if first == "--version":
        print(f"ferroloop {ferroloop.__version__}")
        return
    if first.startswith("-m"):
        name = first[2:] or (argv[1] if len(argv) > 1 else None)
        if not name:
            _usage_error("argument -m: expected a module name")
        rest = argv[1:] if first[2:] else argv[2:]
        ferroloop.install()
        _run_module(name, rest)
        return
    if first.startswith("-"):
        # Interpreter options (-X, -W, -u, ...) go before `-m ferroloop`; the program's own
        # options after its name.
        _usage_error(f"unknown option {first!r}")
    ferroloop.install()
    _run_script(first, argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
