"""Subprocesses: create_subprocess_exec/_shell and loop.subprocess_*, on asyncio and ferroloop.

communicate/wait/send_signal/terminate/kill/returncode; stdin/stdout/stderr as PIPE, DEVNULL,
STDOUT or a file descriptor; the Popen keywords (cwd, env, pass_fds, start_new_session,
preexec_fn); asyncio's argument errors; and no zombie and no file descriptor left behind.
Children are short Python programs (sys.executable); nothing is timed.
"""

import asyncio
import os
import signal
import subprocess
import sys

import pytest
from parity_helpers import WATCHDOG, run

PY = sys.executable

# ---------------------------------------------------------------------------------------------
# helpers


pytestmark = pytest.mark.usefixtures("no_unexpected_loop_errors")


def open_fds():
    return set(os.listdir("/proc/self/fd"))


def assert_reaped(pid):
    """The child is gone: no zombie (waitpid has nothing left to reap)."""
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


async def settle(n=10):
    """Let the loop run a few turns (connection_lost callbacks, pipe closes)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def exec_py(code, *args, **kw):
    return await asyncio.create_subprocess_exec(PY, "-c", code, *args, **kw)


ECHO = "import sys; data = sys.stdin.buffer.read(); sys.stdout.buffer.write(data.upper())"
BOTH = (
    "import sys; sys.stdout.write('out\\n'); sys.stdout.flush(); "
    "sys.stderr.write('err\\n'); sys.stderr.flush()"
)
# Tells the parent it is running, then waits to be signalled.
WAIT_FOR_SIGNAL = (
    "import sys, time; sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(30)"
)


# ---------------------------------------------------------------------------------------------
# exec / shell with pipes


def test_exec_communicate_pipes(loop):
    async def main():
        proc = await exec_py(
            ECHO + "; sys.stderr.write('E'); sys.exit(3)",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.returncode is None
        assert isinstance(proc.pid, int)
        out, err = await proc.communicate(b"hello")
        return out, err, proc.returncode, await proc.wait(), proc.pid

    out, err, rc, rc2, pid = run(loop, main())
    assert (out, err, rc, rc2) == (b"HELLO", b"E", 3, 3)
    assert_reaped(pid)


def test_exec_large_communicate(loop):
    payload = os.urandom(1 << 20)

    async def main():
        proc = await exec_py(
            "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        out, err = await proc.communicate(payload)
        return out, err, proc.returncode

    assert run(loop, main()) == (payload, None, 0)


def test_shell_communicate_and_exit_code(loop):
    async def main():
        proc = await asyncio.create_subprocess_shell(
            "echo shell-out; echo shell-err >&2; exit 5",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await proc.communicate()
        return out, err, proc.returncode

    assert run(loop, main()) == (b"shell-out\n", b"shell-err\n", 5)


def test_stream_reading_line_by_line(loop):
    async def main():
        proc = await exec_py(
            "import sys\nfor i in range(3): print(i, flush=True)\nprint(sys.stdin.readline())",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        lines = [await proc.stdout.readline() for _ in range(3)]
        proc.stdin.write(b"back\n")
        await proc.stdin.drain()
        proc.stdin.close()
        lines.append(await proc.stdout.read())
        return lines, await proc.wait()

    assert run(loop, main()) == ([b"0\n", b"1\n", b"2\n", b"back\n\n"], 0)


def test_wait_without_pipes(loop):
    async def main():
        proc = await exec_py("import sys; sys.exit(7)")
        assert (proc.stdin, proc.stdout, proc.stderr) == (None, None, None)
        rc = await proc.wait()
        return rc, proc.returncode, await proc.wait(), proc.pid

    rc, rc2, rc3, pid = run(loop, main())
    assert (rc, rc2, rc3) == (7, 7, 7)
    assert_reaped(pid)


def test_stdin_broken_pipe_is_ignored_by_communicate(loop):
    # The child exits without reading: communicate() ignores the broken pipe, as asyncio does.
    async def main():
        proc = await exec_py("import os; os.close(0)", stdin=subprocess.PIPE)
        _, _ = await proc.communicate(b"x" * (1 << 20))
        return proc.returncode

    assert run(loop, main()) == 0


# ---------------------------------------------------------------------------------------------
# signals


@pytest.mark.parametrize(
    "how, expected",
    [
        ("send_signal", -signal.SIGUSR1),
        ("terminate", -signal.SIGTERM),
        ("kill", -signal.SIGKILL),
    ],
)
def test_signal_the_child(loop, how, expected):
    async def main():
        proc = await exec_py(WAIT_FOR_SIGNAL, stdout=subprocess.PIPE)
        assert await proc.stdout.readline() == b"ready\n"
        if how == "send_signal":
            proc.send_signal(signal.SIGUSR1)
        else:
            getattr(proc, how)()
        rc = await proc.wait()
        return rc, proc.returncode, proc.pid

    rc, rc2, pid = run(loop, main())
    assert rc == rc2 == expected
    assert_reaped(pid)


def test_signal_after_exit(loop):
    # Once the child has been reaped and its transport closed, signalling it raises
    # ProcessLookupError (asyncio's transport drops the Popen object) -- or is a no-op.
    async def main():
        proc = await exec_py("pass", stdout=subprocess.PIPE)
        await proc.communicate()
        await settle()
        outcomes = []
        for how in ("send_signal", "terminate", "kill"):
            try:
                if how == "send_signal":
                    proc.send_signal(signal.SIGTERM)
                else:
                    getattr(proc, how)()
            except ProcessLookupError:
                outcomes.append("ProcessLookupError")
            else:
                outcomes.append("ok")
        return outcomes, proc.returncode

    assert run(loop, main()) == (["ProcessLookupError"] * 3, 0)


def test_cancelled_wait_does_not_kill(loop):
    async def main():
        proc = await exec_py(WAIT_FOR_SIGNAL, stdout=subprocess.PIPE)
        await proc.stdout.readline()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(proc.wait(), 0.05)
        assert proc.returncode is None
        proc.kill()
        return await proc.wait()

    assert run(loop, main()) == -signal.SIGKILL


# ---------------------------------------------------------------------------------------------
# stdin/stdout/stderr choices


def test_devnull(loop):
    async def main():
        proc = await exec_py(
            "import sys; d = sys.stdin.read(); print('x'); print(repr(d), file=sys.stderr)",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert proc.stdin is None and proc.stdout is None
        out, err = await proc.communicate()
        return out, err, proc.returncode

    assert run(loop, main()) == (None, b"''\n", 0)


def test_stderr_to_stdout(loop):
    async def main():
        proc = await exec_py(BOTH, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stderr is None
        out, err = await proc.communicate()
        return out, err

    assert run(loop, main()) == (b"out\nerr\n", None)


def test_file_descriptors_as_stdio(loop, tmp_path):
    src = tmp_path / "in.txt"
    src.write_bytes(b"from a file\n")
    dst = tmp_path / "out.txt"

    async def main(fin, fout):
        proc = await exec_py(
            ECHO + "; sys.stderr.write('e')",
            stdin=fin.fileno(),
            stdout=fout.fileno(),
            stderr=fout,  # a file object works too
        )
        assert (proc.stdin, proc.stdout, proc.stderr) == (None, None, None)
        return await proc.wait()

    with open(src, "rb") as fin, open(dst, "wb") as fout:
        assert run(loop, main(fin, fout)) == 0
    assert dst.read_bytes() == b"FROM A FILE\ne"


def test_os_pipe_as_stdout(loop):
    async def main():
        r, w = os.pipe()
        try:
            proc = await exec_py("print('via os.pipe')", stdout=w)
            os.close(w)
            w = None
            rc = await proc.wait()
            return rc, os.read(r, 100)
        finally:
            os.close(r)
            if w is not None:
                os.close(w)

    assert run(loop, main()) == (0, b"via os.pipe\n")


# ---------------------------------------------------------------------------------------------
# Popen keywords


def test_cwd_and_env(loop, tmp_path):
    async def main():
        proc = await exec_py(
            "import os; print(os.getcwd()); print(os.environ.get('FERRO_TEST'))",
            stdout=subprocess.PIPE,
            cwd=str(tmp_path),
            env={"FERRO_TEST": "value", "PATH": os.environ.get("PATH", "")},
        )
        out, _ = await proc.communicate()
        return out.decode().splitlines()

    cwd, value = run(loop, main())
    assert os.path.realpath(cwd) == os.path.realpath(tmp_path)
    assert value == "value"


def test_shell_cwd_env(loop, tmp_path):
    async def main():
        proc = await asyncio.create_subprocess_shell(
            'pwd; echo "$FERRO_TEST"',
            stdout=subprocess.PIPE,
            cwd=str(tmp_path),
            env={"FERRO_TEST": "shell-value", "PATH": os.environ.get("PATH", "")},
        )
        out, _ = await proc.communicate()
        return out.decode().splitlines()

    cwd, value = run(loop, main())
    assert os.path.realpath(cwd) == os.path.realpath(tmp_path)
    assert value == "shell-value"


def test_pass_fds(loop):
    async def main():
        r, w = os.pipe()
        try:
            code = "import os, sys; os.write(int(sys.argv[1]), b'through pass_fds')"
            proc = await exec_py(code, str(w), pass_fds=(w,))
            rc = await proc.wait()
            os.close(w)
            w = None
            return rc, os.read(r, 100)
        finally:
            os.close(r)
            if w is not None:
                os.close(w)

    assert run(loop, main()) == (0, b"through pass_fds")


def test_fds_not_passed_by_default(loop):
    async def main():
        r, w = os.pipe()
        try:
            code = (
                "import os, sys\n"
                "try:\n    os.fstat(int(sys.argv[1]))\nexcept OSError:\n    print('closed')\n"
                "else:\n    print('open')"
            )
            proc = await exec_py(code, str(w), stdout=subprocess.PIPE)
            out, _ = await proc.communicate()
            return out
        finally:
            os.close(r)
            os.close(w)

    assert run(loop, main()) == b"closed\n"


def test_start_new_session(loop):
    async def main():
        code = "import os; print(os.getsid(0) == os.getpid())"
        result = []
        for new in (False, True):
            proc = await exec_py(code, stdout=subprocess.PIPE, start_new_session=new)
            out, _ = await proc.communicate()
            result.append(out)
        return result

    assert run(loop, main()) == [b"False\n", b"True\n"]


def test_preexec_fn(loop):
    async def main():
        code = "import os; print(os.getpgid(0) == os.getpid())"
        proc = await exec_py(code, stdout=subprocess.PIPE, preexec_fn=lambda: os.setpgid(0, 0))
        out, _ = await proc.communicate()
        return out

    assert run(loop, main()) == b"True\n"


def test_preexec_fn_failure(loop):
    def boom():
        raise ValueError("boom in child")

    async def main():
        with pytest.raises(subprocess.SubprocessError, match="preexec_fn"):
            await exec_py("pass", preexec_fn=boom)

    before = open_fds()
    run(loop, main())
    assert open_fds() == before


def test_missing_executable(loop):
    async def main():
        with pytest.raises(FileNotFoundError):
            await asyncio.create_subprocess_exec("/nonexistent/ferroloop-no-such-program")

    before = open_fds()
    run(loop, main())
    assert open_fds() == before


# ---------------------------------------------------------------------------------------------
# argument errors (asyncio's messages)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"universal_newlines": True}, "universal_newlines must be False"),
        ({"bufsize": 1}, "bufsize must be 0"),
        ({"bufsize": -1}, "bufsize must be 0"),
        ({"text": True}, "text must be False"),
        ({"encoding": "utf-8"}, "encoding must be None"),
        ({"errors": "strict"}, "errors must be None"),
    ],
)
def test_shell_and_exec_argument_errors(loop, kw, message):
    async def main():
        with pytest.raises(ValueError) as shell_info:
            await asyncio.create_subprocess_shell("exit 0", **kw)
        with pytest.raises(ValueError) as exec_info:
            await asyncio.create_subprocess_exec(PY, "-c", "pass", **kw)
        return str(shell_info.value), str(exec_info.value)

    assert run(loop, main()) == (message, message)


def test_loop_subprocess_shell_argument_errors(loop):
    async def main():
        errors = []
        for cmd, kw in (
            (["echo", "hi"], {}),
            ("echo", {"shell": False}),
            ("echo", {"universal_newlines": True}),
            ("echo", {"bufsize": 4096}),
        ):
            with pytest.raises(ValueError) as info:
                await loop.subprocess_shell(asyncio.SubprocessProtocol, cmd, **kw)
            errors.append(str(info.value))
        with pytest.raises(ValueError) as info:
            await loop.subprocess_exec(asyncio.SubprocessProtocol, PY, "-c", "pass", shell=True)
        errors.append(str(info.value))
        return errors

    assert run(loop, main()) == [
        "cmd must be a string",
        "shell must be True",
        "universal_newlines must be False",
        "bufsize must be 0",
        "shell must be False",
    ]


# ---------------------------------------------------------------------------------------------
# the low-level protocol API


class Recorder(asyncio.SubprocessProtocol):
    def __init__(self, loop):
        self.events = []
        self.data = {1: bytearray(), 2: bytearray()}
        self.exited = loop.create_future()
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.events.append("made")

    def pipe_data_received(self, fd, data):
        self.data[fd] += data

    def pipe_connection_lost(self, fd, exc):
        self.events.append(("pipe_lost", fd, exc))

    def process_exited(self):
        self.events.append("exited")
        self.exited.set_result(None)

    def connection_lost(self, exc):
        self.events.append(("lost", exc))
        self.lost.set_result(exc)


def test_subprocess_exec_protocol(loop):
    async def main():
        tr, proto = await loop.subprocess_exec(
            lambda: Recorder(loop),
            PY,
            "-c",
            BOTH,
            stdin=None,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert isinstance(tr, asyncio.SubprocessTransport)
        assert tr.get_pipe_transport(0) is None
        assert isinstance(tr.get_pipe_transport(1), asyncio.ReadTransport)
        assert isinstance(tr.get_pipe_transport(2), asyncio.ReadTransport)
        pid = tr.get_pid()
        assert tr.get_returncode() is None or tr.get_returncode() == 0
        await proto.exited
        await proto.lost
        rc = tr.get_returncode()
        events = proto.events
        assert events[0] == "made" and events[-1] == ("lost", None)
        assert sorted(e for e in events if isinstance(e, tuple) and e[0] == "pipe_lost") == [
            ("pipe_lost", 1, None),
            ("pipe_lost", 2, None),
        ]
        assert "exited" in events
        assert tr.is_closing() is False or tr.is_closing() is True
        tr.close()
        assert tr.is_closing()
        return rc, bytes(proto.data[1]), bytes(proto.data[2]), pid

    rc, out, err, pid = run(loop, main())
    assert (rc, out, err) == (0, b"out\n", b"err\n")
    assert_reaped(pid)


def test_transport_close_kills_running_child(loop):
    async def main():
        tr, proto = await loop.subprocess_exec(
            lambda: Recorder(loop), PY, "-c", WAIT_FOR_SIGNAL, stdout=subprocess.PIPE
        )
        while b"ready" not in proto.data[1]:
            await asyncio.sleep(0.01)
        tr.close()
        await proto.lost
        return tr.get_returncode(), tr.get_pid()

    rc, pid = run(loop, main())
    assert rc == -signal.SIGKILL
    assert_reaped(pid)


# ---------------------------------------------------------------------------------------------
# no zombies, no fd leaks


def test_no_zombie_and_no_fd_leak(loop):
    async def one_of_each():
        pids = []
        proc = await exec_py(
            ECHO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        await proc.communicate(b"x")
        pids.append(proc.pid)
        proc = await asyncio.create_subprocess_shell("exit 0")
        await proc.wait()
        pids.append(proc.pid)
        proc = await exec_py(WAIT_FOR_SIGNAL, stdout=subprocess.PIPE)
        await proc.stdout.readline()
        proc.kill()
        await proc.wait()
        pids.append(proc.pid)
        proc = await exec_py(BOTH, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        await proc.stdout.read()
        await proc.wait()
        pids.append(proc.pid)
        await settle()
        return pids

    async def main():
        # A first round warms up whatever the loop keeps for good (child watcher, pidfd
        # machinery); the second must leave the fd table exactly as it found it.
        await one_of_each()
        before = open_fds()
        pids = await one_of_each()
        after = open_fds()
        return pids, before, after

    pids, before, after = run(loop, main())
    assert after == before, sorted(after ^ before)
    for pid in pids:
        assert_reaped(pid)
        assert not os.path.exists(f"/proc/{pid}") or _not_our_child(pid)


def _not_our_child(pid):
    # The pid may already have been reused by an unrelated process: only a zombie child of
    # ours would be a leak.
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return True
    state, ppid = fields[0], int(fields[1])
    return not (ppid == os.getpid() and state == "Z")


def test_many_concurrent_children(loop):
    async def child(i):
        proc = await exec_py(f"print({i})", stdout=subprocess.PIPE)
        out, _ = await proc.communicate()
        return int(out), proc.returncode, proc.pid

    async def main():
        before = open_fds()
        results = await asyncio.gather(*(child(i) for i in range(20)))
        await settle()
        return results, before, open_fds()

    results, before, after = run(loop, main(), timeout=WATCHDOG * 2)
    assert [(n, rc) for n, rc, _ in results] == [(i, 0) for i in range(20)]
    for _, _, pid in results:
        assert_reaped(pid)
    assert after - before == set()


def test_subprocess_from_a_loop_in_another_thread(loop):
    import threading

    out = []

    async def main():
        proc = await exec_py("print('from a thread')", stdout=subprocess.PIPE)
        stdout, _ = await proc.communicate()
        return stdout, proc.returncode, proc.pid

    def target():
        try:
            out.append(run(loop, main()))
        except BaseException as exc:  # noqa: BLE001 (reported below)
            out.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    (result,) = out
    assert not isinstance(result, BaseException), result
    stdout, rc, pid = result
    assert (stdout, rc) == (b"from a thread\n", 0)
    assert_reaped(pid)


# ---------------------------------------------------------------------------------------------
# how child exits are watched: pidfds where the kernel has them (asyncio 3.12+'s default);
# on 3.11 asyncio's default watcher is a thread per child, ferroloop uses pidfds (README
# "Differences"); a watcher the user set is used as asyncio uses it.


def _pidfd_usable():
    try:
        os.close(os.pidfd_open(os.getpid(), 0))
    except (AttributeError, OSError):
        return False
    return True


@pytest.mark.usefixtures("asyncio_state")
def test_default_child_watching_thread_or_pidfd(loop, loop_kind):
    import threading

    async def main():
        before = set(threading.enumerate())
        proc = await exec_py(WAIT_FOR_SIGNAL, stdout=subprocess.PIPE)
        assert await proc.stdout.readline() == b"ready\n"
        # ThreadedChildWatcher names its threads (asyncio-)waitpid-N
        new = [t for t in set(threading.enumerate()) - before if "waitpid" in t.name]
        proc.kill()
        rc = await proc.wait()
        return len(new), rc, proc.pid

    extra_threads, rc, pid = run(loop, main())
    assert rc == -signal.SIGKILL
    assert_reaped(pid)
    pidfd = _pidfd_usable() and (loop_kind != "asyncio" or sys.version_info >= (3, 12))
    assert extra_threads == (0 if pidfd else 1)


@pytest.mark.usefixtures("asyncio_state")
@pytest.mark.skipif(
    not hasattr(asyncio, "set_child_watcher"), reason="no child watchers on this Python"
)
def test_child_watcher_set_by_the_user_is_used(loop):
    import warnings

    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: watchers are deprecated

        class Recording(asyncio.ThreadedChildWatcher):
            def add_child_handler(self, pid, callback, *args):
                seen.append(pid)
                super().add_child_handler(pid, callback, *args)

        watcher = Recording()
        asyncio.set_child_watcher(watcher)

    async def main():
        proc = await exec_py("raise SystemExit(7)")
        return await proc.wait(), proc.pid

    try:
        rc, pid = run(loop, main())
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            asyncio.set_child_watcher(None)
        watcher.close()
    assert rc == 7
    assert seen == [pid]
    assert_reaped(pid)


@pytest.mark.usefixtures("asyncio_state")
def test_loop_closed_while_a_child_runs_leaves_no_fd(loop):
    import warnings

    async def main():
        return await exec_py(WAIT_FOR_SIGNAL, stdout=subprocess.DEVNULL)

    before = open_fds()
    proc = run(loop, main())
    pid = proc.pid
    proc.kill()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # the transport is left unclosed
        loop.close()
        del proc
    try:  # reap it here if the loop's watcher did not
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    assert open_fds() - before == set()
