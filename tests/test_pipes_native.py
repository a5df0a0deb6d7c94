"""The pipe transports with their native read and write, against asyncio's.

Raising protocol callbacks, EOF and EIO (a pty whose other side closed), broken pipes found by
the immediate write, writes of every bytes-like kind, flow control callbacks that raise,
character devices, writes after close, subprocess pipes, no fd leaks. Scenarios that asyncio
decides run on a stock asyncio loop too and must give the same result. Nothing is timed.
"""

import asyncio
import logging
import os
import subprocess
import sys

import pytest
from parity_helpers import WATCHDOG, run, turns

pytestmark = pytest.mark.usefixtures("no_unexpected_loop_errors")


def reference(scenario):
    """``scenario(loop)`` on a stock asyncio loop of this Python."""
    ref = asyncio.DefaultEventLoopPolicy().new_event_loop()
    try:
        return ref.run_until_complete(asyncio.wait_for(scenario(ref), WATCHDOG))
    finally:
        ref.close()


def open_fds():
    return set(os.listdir("/proc/self/fd"))


class Recorder(asyncio.Protocol):
    def __init__(self, loop, raise_in=()):
        self.events = []
        self.raise_in = raise_in
        self.got = asyncio.Queue()
        self.lost = loop.create_future()

    def _maybe_raise(self, name):
        if name in self.raise_in:
            raise ZeroDivisionError(name)

    def connection_made(self, transport):
        self.events.append("made")

    def data_received(self, data):
        self.events.append(("data", bytes(data)))
        self.got.put_nowait(data)
        self._maybe_raise("data_received")

    def eof_received(self):
        self.events.append("eof")
        self._maybe_raise("eof_received")

    def pause_writing(self):
        self.events.append("pause")
        self._maybe_raise("pause_writing")

    def resume_writing(self):
        self.events.append("resume")
        self._maybe_raise("resume_writing")

    def connection_lost(self, exc):
        self.events.append(("lost", type(exc).__name__ if exc else None))
        self.lost.set_result(exc)


def handler_log(loop):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))
    return contexts


def summary(contexts):
    return [(c["message"], type(c.get("exception")).__name__) for c in contexts]


async def _read_raising(loop):
    contexts = handler_log(loop)
    r, w = os.pipe()
    tr, proto = await loop.connect_read_pipe(
        lambda: Recorder(loop, ("data_received", "eof_received")), os.fdopen(r, "rb", 0)
    )
    os.write(w, b"one")
    await proto.got.get()
    await turns()
    open_after_raise = not tr.is_closing()
    os.write(w, b"two")
    await proto.got.get()
    os.close(w)
    await proto.lost
    return proto.events, summary(contexts), open_after_raise


def test_read_pipe_raising_callbacks_go_to_the_handler(loop):
    events, contexts, open_after_raise = run(loop, _read_raising(loop))
    assert events == [
        "made",
        ("data", b"one"),
        ("data", b"two"),
        "eof",
        ("lost", None),
    ]
    assert open_after_raise
    assert contexts[0] == (
        "Exception in callback _UnixReadPipeTransport._read_ready()",
        "ZeroDivisionError",
    )
    assert (events, contexts, open_after_raise) == reference(_read_raising)


async def _pty_eio(loop):
    contexts = handler_log(loop)
    master, slave = os.openpty()
    _tr, proto = await loop.connect_read_pipe(lambda: Recorder(loop), os.fdopen(master, "rb", 0))
    os.write(slave, b"tty\n")
    data = await proto.got.get()
    os.close(slave)  # the master's read now fails with EIO
    exc = await proto.lost
    return data, type(exc).__name__, getattr(exc, "errno", None), summary(contexts)


def test_read_pipe_pty_eio_closes_quietly(loop):
    data, exc, err, contexts = run(loop, _pty_eio(loop))
    assert data.startswith(b"tty")
    assert (exc, err, contexts) == ("OSError", 5, [])
    assert (exc, err, contexts) == reference(_pty_eio)[1:]


async def _write_kinds(loop):
    r, w = os.pipe()
    tr, proto = await loop.connect_write_pipe(lambda: Recorder(loop), os.fdopen(w, "wb", 0))
    buf = bytearray(b"ba")
    for data in (
        b"by",
        buf,
        memoryview(b"XmvX")[1:3],
        b"",
        bytearray(),
    ):
        tr.write(data)
    buf[:] = b"zz"  # already written: changing it changes nothing
    contexts = handler_log(loop)
    tr.write(memoryview(b"abcdef")[::2])  # not contiguous: os.write fails, a fatal error
    try:
        tr.write("text")
        err = None
    except AssertionError:
        err = "AssertionError"
    size = tr.get_write_buffer_size()
    tr.close()
    await proto.lost
    with os.fdopen(r, "rb") as f:
        got = f.read()
    return got, err, size, proto.events, summary(contexts)


def test_write_pipe_bytes_like_kinds(loop):
    out = run(loop, _write_kinds(loop))
    assert out[0] == b"bybamv"
    assert out[1:] == (
        "AssertionError" if sys.flags.optimize == 0 else None,
        0,
        ["made", ("lost", "BufferError")],
        [("Fatal write error on pipe transport", "BufferError")],
    )
    assert out == reference(_write_kinds)


async def _immediate_epipe(loop):
    r, w = os.pipe()
    tr, proto = await loop.connect_write_pipe(lambda: Recorder(loop), os.fdopen(w, "wb", 0))
    os.close(r)
    tr.write(b"nobody reads")  # EPIPE from the write itself
    closing = tr.is_closing()
    conn_lost = tr._conn_lost
    exc = await proto.lost
    for _ in range(6):
        tr.write(b"late")  # counted, then warned about
    return type(exc).__name__, closing, conn_lost, tr._conn_lost, proto.events


def test_write_pipe_broken_by_the_first_write(loop, caplog):
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        out = run(loop, _immediate_epipe(loop))
    assert out == ("BrokenPipeError", True, 1, 7, ["made", ("lost", "BrokenPipeError")])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["pipe closed by peer or os.write(pipe, data) raised exception."] * 2


async def _flow_raising(loop):
    contexts = handler_log(loop)
    r, w = os.pipe()
    tr, proto = await loop.connect_write_pipe(
        lambda: Recorder(loop, ("pause_writing", "resume_writing")), os.fdopen(w, "wb", 0)
    )
    tr.set_write_buffer_limits(high=1000)
    chunk = b"x" * 4096
    writes = 0
    while tr.get_write_buffer_size() == 0:
        tr.write(chunk)
        writes += 1
    tr.write(chunk)
    paused = list(proto.events)
    total = writes * len(chunk) + len(chunk)
    got = 0
    while got < total:
        try:
            got += len(os.read(r, 65536))
        except BlockingIOError:
            await asyncio.sleep(0)
        if got < total:
            os.set_blocking(r, False)
            await asyncio.sleep(0)
    await turns()
    tr.close()
    await proto.lost
    os.close(r)
    return paused[-1], proto.events[-2:], got, summary(contexts)


def test_write_pipe_raising_flow_control_callbacks(loop):
    out = run(loop, _flow_raising(loop))
    assert out[0] == "pause"
    assert out[1] == ["resume", ("lost", None)]
    assert out[3] == [
        ("protocol.pause_writing() failed", "ZeroDivisionError"),
        ("protocol.resume_writing() failed", "ZeroDivisionError"),
    ]
    ref = reference(_flow_raising)
    assert (out[0], out[1], out[3]) == (ref[0], ref[1], ref[3])


def test_write_pipe_to_a_character_device(loop):
    async def main(f):
        tr, proto = await loop.connect_write_pipe(lambda: Recorder(loop), f)
        for _ in range(100):
            tr.write(b"x" * 10000)
        size = tr.get_write_buffer_size()
        rep = repr(tr).split(" ", 2)[2]
        tr.close()
        await proto.lost
        return size, rep, proto.events, f.closed

    with open(os.devnull, "wb", 0) as f:
        out = run(loop, main(f))
    assert out == (0, "idle bufsize=0>", ["made", ("lost", None)], True)


def test_read_pipe_repr_and_isinstance(loop):
    async def main():
        r, w = os.pipe()
        tr, proto = await loop.connect_read_pipe(lambda: Recorder(loop), os.fdopen(r, "rb", 0))
        wtr, wproto = await loop.connect_write_pipe(lambda: Recorder(loop), os.fdopen(w, "wb", 0))
        out = (
            repr(tr).replace(f"fd={r}", "fd=R"),
            repr(wtr).replace(f"fd={w}", "fd=W"),
            isinstance(tr, asyncio.ReadTransport),
            isinstance(wtr, asyncio.WriteTransport),
            type(tr).__name__,
            type(wtr).__name__,
        )
        wtr.close()
        await proto.lost
        await wproto.lost
        return out + (repr(tr).replace(f"fd={r}", "fd=R"),)

    assert run(loop, main()) == (
        "<_UnixReadPipeTransport fd=R polling>",
        "<_UnixWritePipeTransport fd=W idle bufsize=0>",
        True,
        True,
        "_UnixReadPipeTransport",
        "_UnixWritePipeTransport",
        "<_UnixReadPipeTransport closed fd=R closed>",
    )


def test_subprocess_pipes(loop):
    async def main():
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import sys; sys.stdout.write(sys.stdin.read().upper())",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        out, _ = await proc.communicate(b"through the pipes " * 10000)
        return out, await proc.wait()

    out, code = run(loop, main())
    assert (len(out), out[:18], code) == (180000, b"THROUGH THE PIPES ", 0)


def test_no_fd_leaks(loop):
    async def main():
        for _ in range(5):
            r, w = os.pipe()
            rt, rp = await loop.connect_read_pipe(lambda: Recorder(loop), os.fdopen(r, "rb", 0))
            wt, wp = await loop.connect_write_pipe(lambda: Recorder(loop), os.fdopen(w, "wb", 0))
            wt.write(b"x")
            await rp.got.get()
            wt.close()
            await rp.lost
            await wp.lost
            r, w = os.pipe()
            rt, rp = await loop.connect_read_pipe(lambda: Recorder(loop), os.fdopen(r, "rb", 0))
            rt.abort() if hasattr(rt, "abort") else rt.close()
            await rp.lost
            os.close(w)

    run(loop, main())  # warm up
    before = open_fds()
    run(loop, main())
    assert open_fds() - before == set()


def test_read_pipe_eio_in_debug_mode_logs_the_exception(loop, caplog):
    async def main():
        master, slave = os.openpty()
        _tr, proto = await loop.connect_read_pipe(
            lambda: Recorder(loop), os.fdopen(master, "rb", 0)
        )
        os.write(slave, b"x\n")
        await proto.got.get()
        os.close(slave)
        return await proto.lost

    loop.set_debug(True)
    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        exc = run(loop, main())
    records = [r for r in caplog.records if "Fatal read error on pipe transport" in r.getMessage()]
    assert len(records) == 1
    assert records[0].levelno == logging.DEBUG
    assert records[0].exc_info[1] is exc
    assert records[0].getMessage().startswith("<_UnixReadPipeTransport ")
