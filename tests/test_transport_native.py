"""The stream transport (native on ferroloop) against asyncio's, edge by edge.

Write buffering and flow control, BufferedProtocol, set_protocol mid-stream, protocol
callbacks that raise, writes after close, half-open connections, repr, ResourceWarning, file
descriptor leaks. Each test runs on asyncio's loop and on ferroloop; nothing is timed.
"""

import asyncio
import gc
import logging
import os
import re
import socket
import sys
import warnings
from asyncio import trsock

import pytest
from parity_helpers import run, run_briefly, turns

pytestmark = pytest.mark.usefixtures("no_unexpected_loop_errors")


class Rec(asyncio.Protocol):
    """Records what happens to it; flow-control and eof answers are configurable."""

    def __init__(self, loop, eof_result=None):
        self.loop = loop
        self.transport = None
        self.events = []
        self.data = bytearray()
        self.eof_result = eof_result
        self.got_data = asyncio.Event()
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport
        self.events.append("made")

    def data_received(self, data):
        assert type(data) is bytes
        self.data += data
        self.got_data.set()

    def eof_received(self):
        self.events.append("eof")
        return self.eof_result

    def pause_writing(self):
        self.events.append("pause")

    def resume_writing(self):
        self.events.append("resume")

    def connection_lost(self, exc):
        self.events.append(("lost", type(exc).__name__ if exc else None))
        if not self.lost.done():
            self.lost.set_result(exc)


class BufRec(asyncio.BufferedProtocol):
    def __init__(self, loop, size=7):
        self.buf = bytearray(size)
        self.data = bytearray()
        self.sizes = []
        self.got_data = asyncio.Event()
        self.lost = loop.create_future()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        assert sizehint == -1
        return self.buf

    def buffer_updated(self, nbytes):
        self.sizes.append(nbytes)
        self.data += self.buf[:nbytes]
        self.got_data.set()

    def eof_received(self):
        return None

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)


class Handler:
    def __init__(self):
        self.contexts = []

    def __call__(self, loop, context):
        self.contexts.append(context)


async def connect(loop, proto):
    """A transport over one end of a socketpair; the other end (non-blocking) for the test."""
    a, b = socket.socketpair()
    b.setblocking(False)
    tr, _ = await loop.create_connection(lambda: proto, sock=a)
    return tr, b


async def read_exactly(loop, sock, n):
    out = bytearray()
    while len(out) < n:
        chunk = await loop.sock_recv(sock, n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def fill_sndbuf(sock):
    """Shrink the kernel send buffer so a few hundred KiB stay queued in the transport."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


# ---------------------------------------------------------------------------------------------
# the class and its extra info


def test_transport_class_and_extra_info(loop):
    async def main():
        proto = Rec(loop)
        tr, peer = await connect(loop, proto)
        assert isinstance(tr, asyncio.Transport)
        assert isinstance(tr, asyncio.transports._FlowControlMixin)
        sock = tr.get_extra_info("socket")
        assert isinstance(sock, trsock.TransportSocket)
        assert tr.get_extra_info("sockname") == sock.getsockname()
        assert tr.get_extra_info("peername") == sock.getpeername()
        assert tr.get_extra_info("nothing", 42) == 42
        assert tr.get_protocol() is proto
        assert tr.can_write_eof() is True
        assert tr.is_reading() and not tr.is_closing()
        assert loop._transports[sock.fileno()] is tr
        assert re.fullmatch(
            r"<_SelectorSocketTransport fd=\d+ read=polling write=<idle, bufsize=0>>", repr(tr)
        )
        tr.close()
        assert re.fullmatch(
            r"<_SelectorSocketTransport closing fd=\d+ read=idle write=<idle, bufsize=0>>",
            repr(tr),
        )
        await proto.lost
        assert re.fullmatch(r"<_SelectorSocketTransport closed fd=\d+>", repr(tr))
        assert tr.get_protocol() is None
        peer.close()

    run(loop, main())


def test_write_type_errors(loop):
    async def main():
        proto = Rec(loop)
        tr, peer = await connect(loop, proto)
        with pytest.raises(TypeError, match="data argument must be a bytes-like object, not 'str'"):
            tr.write("text")
        tr.write(b"")  # nothing, no error
        tr.write(bytearray(b"ab"))
        tr.write(memoryview(b"cd"))
        assert await read_exactly(loop, peer, 4) == b"abcd"
        tr.close()
        await proto.lost
        peer.close()

    run(loop, main())


def write_call_errors(tr):
    """The errors of write() called in ways it does not take (asyncio's messages)."""
    name = f"{type(tr).__name__}.write()"
    errors = []
    for call in (
        lambda: tr.write(),
        lambda: tr.write(b"a", b"b"),
        lambda: tr.write(b"a", data=b"b"),
        lambda: tr.write(other=b"a"),
        lambda: type(tr).write(tr),
    ):
        with pytest.raises(TypeError) as info:
            call()
        errors.append(str(info.value).replace(name, "write()"))
    return errors


WRITE_CALL_ERRORS = [
    "write() missing 1 required positional argument: 'data'",
    "write() takes 2 positional arguments but 3 were given",
    "write() got multiple values for argument 'data'",
    "write() got an unexpected keyword argument 'other'",
    "write() missing 1 required positional argument: 'data'",
]


def test_write_call_shapes(loop):
    # ferroloop's write is a native method of the class: called bound, unbound, by keyword,
    # through super() from a subclass, and wrongly, it does what asyncio's does.
    async def main():
        proto = Rec(loop)
        tr, peer = await connect(loop, proto)
        cls = type(tr)
        tr.write(b"a")
        cls.write(tr, b"b")
        tr.write(data=b"c")
        cls.write(tr, data=memoryview(b"d"))
        with pytest.raises(TypeError, match="data argument must be a bytes-like object, not 'int'"):
            cls.write(tr, 1)
        errors = write_call_errors(tr)
        assert await read_exactly(loop, peer, 4) == b"abcd"

        written = []

        class Sub(cls):
            def write(self, data):
                written.append(bytes(data))
                super().write(data.upper())

        tr.__class__ = Sub
        tr.write(b"e")
        # 3.11: WriteTransport.writelines joins and calls self.write; 3.12+ sends itself.
        tr.writelines([b"f", b"g"])
        expected = b"Efg" if sys.version_info >= (3, 12) else b"EFG"
        assert await read_exactly(loop, peer, 3) == expected
        assert written[0] == b"e"
        tr.__class__ = cls
        tr.close()
        cls.write(tr, b"late")  # queued nothing: closing with an empty buffer
        await proto.lost
        cls.write(tr, b"later")  # counted as a write after the connection is lost
        with pytest.raises(TypeError, match="not 'str'"):
            tr.write("text")
        peer.close()
        return errors

    assert run(loop, main()) == WRITE_CALL_ERRORS


def test_is_closing_call_shapes(loop):
    # is_closing is a native method of ferroloop's class (StreamWriter.drain asks it per call).
    async def main():
        proto = Rec(loop)
        tr, peer = await connect(loop, proto)
        cls = type(tr)
        states = [tr.is_closing(), cls.is_closing(tr)]
        errors = []
        for call in (lambda: tr.is_closing(1), lambda: tr.is_closing(x=1)):
            with pytest.raises(TypeError) as info:
                call()
            # (asyncio defines it on _SelectorTransport, ferroloop on its own class)
            errors.append(str(info.value).split(".", 1)[1])

        class Sub(cls):
            def is_closing(self):
                return ["sub", super().is_closing()]

        tr.__class__ = Sub
        states.append(tr.is_closing())
        tr.__class__ = cls
        tr.close()
        states.append(tr.is_closing())
        await proto.lost
        states.append(tr.is_closing())
        peer.close()
        return states, errors

    states, errors = run(loop, main())
    assert states == [False, False, ["sub", False], True, True]
    assert errors == [
        "is_closing() takes 1 positional argument but 2 were given",
        "is_closing() got an unexpected keyword argument 'x'",
    ]


# ---------------------------------------------------------------------------------------------
# write buffering and flow control


def test_write_buffer_flow_control_sequence(loop):
    """pause_writing once above the high-water mark, resume_writing once at or below low."""

    async def main():
        proto = Rec(loop)
        tr, peer = await connect(loop, proto)
        fill_sndbuf(tr.get_extra_info("socket"))
        assert tr.get_write_buffer_limits() == (16 * 1024, 64 * 1024)
        total = 0
        while tr.get_write_buffer_size() <= 64 * 1024:
            tr.write(b"x" * 8192)
            total += 8192
        assert proto.events == ["made", "pause"]
        assert tr.get_write_buffer_size() > 64 * 1024
        got = await read_exactly(loop, peer, total)
        assert len(got) == total
        assert proto.events == ["made", "pause", "resume"]
        assert tr.get_write_buffer_size() == 0
        tr.close()
        await proto.lost
        peer.close()

    run(loop, main())


def test_set_write_buffer_limits(loop):
    async def main():
        proto = Rec(loop)
        tr, peer = await connect(loop, proto)
        tr.set_write_buffer_limits(high=100)
        assert tr.get_write_buffer_limits() == (25, 100)
        tr.set_write_buffer_limits(low=10)
        assert tr.get_write_buffer_limits() == (10, 40)
        with pytest.raises(ValueError, match=r"high \(1\) must be >= low \(2\) must be >= 0"):
            tr.set_write_buffer_limits(high=1, low=2)
        assert tr.get_write_buffer_limits() == (10, 40)
        fill_sndbuf(tr.get_extra_info("socket"))
        tr.write(b"y" * 1024 * 1024)
        assert tr.get_write_buffer_size() > 0
        assert proto.events == ["made", "pause"]
        # Raising the limits above what is queued does not resume (only a flush does).
        tr.set_write_buffer_limits(high=4 * 1024 * 1024)
        assert proto.events == ["made", "pause"]
        await read_exactly(loop, peer, 1024 * 1024)
        assert proto.events == ["made", "pause", "resume"]
        tr.set_write_buffer_limits(high=0)  # empty buffer: nothing to pause
        assert proto.events == ["made", "pause", "resume"]
        tr.close()
        await proto.lost
        peer.close()

    run(loop, main())


def test_pause_writing_raising_goes_to_the_handler(loop):
    class Bad(Rec):
        def pause_writing(self):
            raise ZeroDivisionError("pause")

        def resume_writing(self):
            raise KeyError("resume")

    async def main():
        handler = Handler()
        loop.set_exception_handler(handler)
        proto = Bad(loop)
        tr, peer = await connect(loop, proto)
        fill_sndbuf(tr.get_extra_info("socket"))
        tr.write(b"z" * 512 * 1024)
        assert [c["message"] for c in handler.contexts] == ["protocol.pause_writing() failed"]
        ctx = handler.contexts[0]
        assert isinstance(ctx["exception"], ZeroDivisionError)
        assert ctx["transport"] is tr and ctx["protocol"] is proto
        assert not tr.is_closing()
        await read_exactly(loop, peer, 512 * 1024)
        assert [c["message"] for c in handler.contexts] == [
            "protocol.pause_writing() failed",
            "protocol.resume_writing() failed",
        ]
        assert not tr.is_closing()
        tr.close()
        await proto.lost
        peer.close()

    run(loop, main())


def test_close_flushes_then_connection_lost_once(loop):
    async def main():
        proto = Rec(loop)
        tr, peer = await connect(loop, proto)
        fill_sndbuf(tr.get_extra_info("socket"))
        payload = os.urandom(300 * 1024)
        tr.write(payload)
        assert tr.get_write_buffer_size() > 0
        tr.close()
        tr.close()
        assert tr.is_closing() and not tr.is_reading()
        assert await read_exactly(loop, peer, len(payload) + 1) == payload  # then EOF
        await proto.lost
        await turns()
        assert proto.events.count(("lost", None)) == 1
        peer.close()

    run(loop, main())


def test_connection_lost_is_scheduled_not_called(loop):
    async def main():
        proto = Rec(loop)
        tr, peer = await connect(loop, proto)
        tr.close()
        assert proto.events == ["made"]  # connection_lost runs in a later callback
        await asyncio.sleep(0)
        assert proto.events == ["made", ("lost", None)]
        assert await loop.sock_recv(peer, 10) == b""
        peer.close()

    run(loop, main())


def test_abort_drops_the_buffer(loop):
    async def main():
        proto = Rec(loop)
        tr, peer = await connect(loop, proto)
        fill_sndbuf(tr.get_extra_info("socket"))
        tr.write(b"a" * 512 * 1024)
        assert tr.get_write_buffer_size() > 0
        tr.abort()
        assert tr.get_write_buffer_size() == 0
        assert tr.is_closing()
        assert await proto.lost is None
        assert proto.events.count(("lost", None)) == 1
        peer.close()

    run(loop, main())


def test_writelines(loop):
    async def main():
        proto = Rec(loop)
        tr, peer = await connect(loop, proto)
        tr.writelines([b"one ", bytearray(b"two "), memoryview(b"three")])
        tr.writelines([])
        assert await read_exactly(loop, peer, 13) == b"one two three"
        fill_sndbuf(tr.get_extra_info("socket"))
        parts = [os.urandom(64 * 1024) for _ in range(8)]
        tr.writelines(parts)
        assert await read_exactly(loop, peer, 8 * 64 * 1024) == b"".join(parts)
        tr.close()
        await proto.lost
        peer.close()

    run(loop, main())


def test_write_eof_then_write_raises(loop):
    async def main():
        proto = Rec(loop)
        tr, peer = await connect(loop, proto)
        tr.write(b"last")
        tr.write_eof()
        tr.write_eof()
        with pytest.raises(RuntimeError, match=r"Cannot call write\(\) after write_eof\(\)"):
            tr.write(b"more")
        with pytest.raises(RuntimeError, match=r"after write_eof\(\)"):
            tr.writelines([b"more"])
        assert await read_exactly(loop, peer, 5) == b"last"  # then EOF
        peer.sendall(b"still reading")
        await proto.got_data.wait()
        assert bytes(proto.data) == b"still reading"
        tr.close()
        await proto.lost
        peer.close()

    run(loop, main())


def test_writes_after_close_warn_after_the_threshold(loop, caplog):
    async def main():
        proto = Rec(loop)
        tr, peer = await connect(loop, proto)
        tr.close()
        await proto.lost
        with caplog.at_level(logging.WARNING, logger="asyncio"):
            for _ in range(6):
                tr.write(b"late")
        warned = [r for r in caplog.records if r.getMessage() == "socket.send() raised exception."]
        # _conn_lost is 1 after close and grows by one per write; asyncio warns from 5 on.
        assert len(warned) == 2
        peer.close()

    run(loop, main())


# ---------------------------------------------------------------------------------------------
# reading


def test_eof_received_true_keeps_half_open(loop):
    async def main():
        proto = Rec(loop, eof_result=True)
        tr, peer = await connect(loop, proto)
        peer.shutdown(socket.SHUT_WR)
        while "eof" not in proto.events:
            await asyncio.sleep(0)
        await turns()
        assert not tr.is_closing()
        tr.write(b"reply after eof")
        assert await read_exactly(loop, peer, 15) == b"reply after eof"
        tr.close()
        await proto.lost
        assert proto.events == ["made", "eof", ("lost", None)]
        peer.close()

    run(loop, main())


def test_eof_received_false_closes(loop):
    async def main():
        proto = Rec(loop, eof_result=False)
        tr, peer = await connect(loop, proto)
        peer.shutdown(socket.SHUT_WR)
        await proto.lost
        assert proto.events == ["made", "eof", ("lost", None)]
        assert tr.is_closing()
        peer.close()

    run(loop, main())


def test_pause_and_resume_reading(loop):
    async def main():
        proto = Rec(loop)
        tr, peer = await connect(loop, proto)
        tr.pause_reading()
        tr.pause_reading()
        assert not tr.is_reading()
        assert "read=idle" in repr(tr)
        peer.sendall(b"while paused")
        await turns()
        assert proto.data == b""
        tr.resume_reading()
        tr.resume_reading()
        assert tr.is_reading()
        await proto.got_data.wait()
        assert bytes(proto.data) == b"while paused"
        tr.close()
        tr.resume_reading()  # closing: nothing
        assert not tr.is_reading()
        await proto.lost
        peer.close()

    run(loop, main())


def test_buffered_protocol_reads_into_its_buffer(loop):
    async def main():
        proto = BufRec(loop, size=7)
        tr, peer = await connect(loop, proto)
        payload = b"0123456789abcdefghij"
        peer.sendall(payload)
        while len(proto.data) < len(payload):
            proto.got_data.clear()
            await proto.got_data.wait()
        assert bytes(proto.data) == payload
        assert max(proto.sizes) <= 7
        tr.close()
        await proto.lost
        peer.close()

    run(loop, main())


def test_buffered_protocol_empty_buffer_is_fatal(loop):
    class Empty(BufRec):
        def get_buffer(self, sizehint):
            return bytearray()

    async def main():
        handler = Handler()
        loop.set_exception_handler(handler)
        proto = Empty(loop)
        tr, peer = await connect(loop, proto)
        peer.sendall(b"data")
        exc = await proto.lost
        assert isinstance(exc, RuntimeError)
        assert str(exc) == "get_buffer() returned an empty buffer"
        assert [c["message"] for c in handler.contexts] == [
            "Fatal error: protocol.get_buffer() call failed."
        ]
        assert handler.contexts[0]["exception"] is exc
        assert handler.contexts[0]["transport"] is tr
        peer.close()

    run(loop, main())


def test_set_protocol_mid_stream(loop):
    async def main():
        first = Rec(loop)
        tr, peer = await connect(loop, first)
        peer.sendall(b"first")
        await first.got_data.wait()
        second = BufRec(loop, size=64)
        tr.set_protocol(second)
        assert tr.get_protocol() is second
        peer.sendall(b"second")
        await second.got_data.wait()
        assert bytes(first.data) == b"first"
        assert bytes(second.data) == b"second"
        third = Rec(loop)
        tr.set_protocol(third)
        peer.sendall(b"third")
        await third.got_data.wait()
        assert bytes(third.data) == b"third"
        tr.close()
        assert await third.lost is None
        assert not first.lost.done() and not second.lost.done()
        peer.close()

    run(loop, main())


@pytest.mark.parametrize(
    "callback,message",
    [
        ("data_received", "Fatal error: protocol.data_received() call failed."),
        ("eof_received", "Fatal error: protocol.eof_received() call failed."),
        ("buffer_updated", "Fatal error: protocol.buffer_updated() call failed."),
        ("get_buffer", "Fatal error: protocol.get_buffer() call failed."),
    ],
)
def test_raising_protocol_callback_closes_via_fatal_error(loop, callback, message):
    base = BufRec if callback in ("buffer_updated", "get_buffer") else Rec

    class Raising(base):
        pass

    def boom(self, *args):
        raise ValueError(callback)

    setattr(Raising, callback, boom)

    async def main():
        handler = Handler()
        loop.set_exception_handler(handler)
        proto = Raising(loop)
        tr, peer = await connect(loop, proto)
        if callback == "eof_received":
            peer.shutdown(socket.SHUT_WR)
        else:
            peer.sendall(b"payload")
        exc = await proto.lost
        assert isinstance(exc, ValueError) and str(exc) == callback
        assert [c["message"] for c in handler.contexts] == [message]
        ctx = handler.contexts[0]
        assert ctx["exception"] is exc
        assert ctx["transport"] is tr
        assert ctx["protocol"] is proto
        assert tr.is_closing()
        try:  # the peer sees the close (a reset when unread data was dropped)
            assert await loop.sock_recv(peer, 10) == b""
        except ConnectionResetError:
            pass
        peer.close()

    run(loop, main())


def test_connection_reset_is_not_reported(loop):
    """An OSError on read closes the transport; the exception handler is not called."""

    async def main():
        handler = Handler()
        loop.set_exception_handler(handler)
        proto = Rec(loop)
        tr, peer = await connect(loop, proto)
        fill_sndbuf(tr.get_extra_info("socket"))
        tr.write(b"q" * 256 * 1024)
        peer.close()
        exc = await proto.lost
        assert isinstance(exc, OSError)
        assert handler.contexts == []
        assert tr.is_closing()

    run(loop, main())


# ---------------------------------------------------------------------------------------------
# resources


def test_unclosed_transport_resource_warning(loop):
    async def make():
        proto = Rec(loop)
        tr, peer = await connect(loop, proto)
        await turns()
        return tr, peer

    tr, peer = run(loop, make())
    tr.pause_reading()  # drop the loop's reference (its reader handle)
    fd = tr.get_extra_info("socket").fileno()
    gc.collect()  # earlier tests' garbage (their own unclosed transports) goes first
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del loop._transports[fd]
        tr = None
        for _ in range(3):
            gc.collect()
    unclosed = [
        w
        for w in caught
        if issubclass(w.category, ResourceWarning)
        and "unclosed transport" in str(w.message)
        and f"fd={fd}" in str(w.message)
    ]
    assert len(unclosed) == 1
    assert "_SelectorSocketTransport" in str(unclosed[0].message)
    peer.close()


def fd_count():
    return len(os.listdir("/proc/self/fd"))


def test_no_fd_leak(loop):
    async def main():
        for i in range(30):
            proto = Rec(loop)
            tr, peer = await connect(loop, proto)
            tr.write(b"x" * 100)
            await read_exactly(loop, peer, 100)
            if i % 3 == 0:
                tr.close()
            elif i % 3 == 1:
                tr.abort()
            else:
                peer.close()
            await proto.lost
            peer.close()

    run(loop, main())  # warm-up: lazily created fds (self-pipe, executor) exist now
    gc.collect()
    before = fd_count()
    run(loop, main())
    gc.collect()
    run_briefly(loop, 2)
    assert fd_count() == before


# ---------------------------------------------------------------------------------------------
# loop.sock_recv (native read on ferroloop)


def test_sock_recv_sizes_eof_and_errors(loop):
    async def main():
        a, b = socket.socketpair()
        a.setblocking(False)
        b.sendall(b"0123456789")
        assert await loop.sock_recv(a, 4) == b"0123"
        assert await loop.sock_recv(a, 0) == b""
        assert await loop.sock_recv(a, 2 * 1024 * 1024) == b"456789"  # above the native cap
        with pytest.raises(ValueError):
            await loop.sock_recv(a, -1)
        with pytest.raises(TypeError):
            await loop.sock_recv(a, 1.5)
        b.close()
        assert await loop.sock_recv(a, 100) == b""
        a.close()
        with pytest.raises(OSError):
            await loop.sock_recv(a, 100)

    run(loop, main())


def test_sock_recv_waits_then_gets_data(loop):
    async def main():
        a, b = socket.socketpair()
        a.setblocking(False)
        task = asyncio.ensure_future(loop.sock_recv(a, 256 * 1024))
        await turns()
        assert not task.done()
        b.sendall(b"late")
        assert await task == b"late"
        a.close()
        b.close()

    run(loop, main())


def test_sock_recv_cancelled_leaves_data_for_the_next_read(loop):
    async def main():
        a, b = socket.socketpair()
        a.setblocking(False)
        task = asyncio.ensure_future(loop.sock_recv(a, 1024))
        await turns()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await turns()
        assert not loop.remove_reader(a.fileno())  # the cancelled read unregistered itself
        b.sendall(b"kept")
        await turns()
        assert await loop.sock_recv(a, 1024) == b"kept"
        a.close()
        b.close()

    run(loop, main())


def test_sock_recv_blocking_socket_in_debug_mode(loop):
    async def main():
        a, b = socket.socketpair()
        loop.set_debug(True)
        try:
            with pytest.raises(ValueError, match="the socket must be non-blocking"):
                await loop.sock_recv(a, 10)
        finally:
            loop.set_debug(False)
            a.close()
            b.close()

    run(loop, main())


# ---------------------------------------------------------------------------------------------
# documented differences (README, "Differences from asyncio"): asyncio 3.11 behaves as
# ferroloop does on every version; asyncio 3.12+ differs, so it is skipped there


def skip_asyncio_312(loop_kind):
    if loop_kind == "asyncio" and sys.version_info >= (3, 12):
        pytest.skip("asyncio 3.12+ differs here (README, Differences from asyncio)")


def test_write_copies_what_it_queues(loop, loop_kind):
    skip_asyncio_312(loop_kind)

    async def main():
        proto = Rec(loop)
        tr, peer = await connect(loop, proto)
        fill_sndbuf(tr.get_extra_info("socket"))
        data = bytearray(b"a" * (512 * 1024))
        tr.write(data)
        assert tr.get_write_buffer_size() > 0
        data[:] = b"b" * len(data)  # changing it afterwards changes nothing that is sent
        got = await read_exactly(loop, peer, len(data))
        assert got == b"a" * len(data)
        tr.close()
        await proto.lost
        peer.close()

    run(loop, main())


def test_writelines_after_close_is_counted_like_write(loop, loop_kind, caplog):
    skip_asyncio_312(loop_kind)

    async def main():
        proto = Rec(loop)
        tr, peer = await connect(loop, proto)
        tr.close()
        await proto.lost
        with caplog.at_level(logging.WARNING, logger="asyncio"):
            for _ in range(6):
                tr.writelines([b"late", b"r"])
        warned = [r for r in caplog.records if r.getMessage() == "socket.send() raised exception."]
        assert len(warned) == 2
        peer.close()

    run(loop, main())
