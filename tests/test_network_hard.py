"""The hard network cases (issue 3 section 5), each on asyncio and ferroloop.

A peer that resets mid-write; writing after the connection is lost; a large transfer through a
slow reader with flow control; thousands of concurrent connections; EMFILE on accept; a
raising protocol factory; protocol callbacks that raise; file descriptor leaks; IPv6 on ::1.

Loopback only. Nothing is timed: a watchdog only turns a hang into a failure. Every test
restores what it changes (rlimits, asyncio constants, the loop's debug flag dies with the loop).
"""

import asyncio
import errno
import gc
import hashlib
import logging
import os
import resource
import socket
import struct
from asyncio import constants

import pytest
from parity_helpers import run, run_briefly, turns
from test_network_basic import BufferedRecorder, Echo, Recorder

# ---------------------------------------------------------------------------------------------
# helpers


pytestmark = pytest.mark.usefixtures("no_unexpected_loop_errors")


def fd_count():
    """Open file descriptors of this process (the listing's own fd counts in every call)."""
    return len(os.listdir("/proc/self/fd"))


def settle(loop):
    """Collect garbage and let the loop run the callbacks that close things."""
    for _ in range(3):
        gc.collect()
        run_briefly(loop, 2)
    gc.collect()


@pytest.fixture
def nofile():
    """RLIMIT_NOFILE as it was; restored after the test whatever the test did to it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield soft, hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(params=[False, True], ids=["nodebug", "debug"])
def debug(request):
    return request.param


class Handler:
    """An exception handler that records (message, exception type, exception) per call."""

    def __init__(self, keep_exceptions=True):
        self.calls = []
        self.keep = keep_exceptions

    def __call__(self, loop, context):
        exc = context.get("exception")
        self.calls.append(
            {
                "message": context.get("message"),
                "type": type(exc) if exc is not None else None,
                "exception": exc if self.keep else repr(exc),
                "keys": set(context),
                "transport": context.get("transport") if self.keep else None,
            }
        )


async def accepted_one(accepted, n=1):
    while len(accepted) < n:
        await asyncio.sleep(0.001)
    for proto in accepted[:n]:
        await proto.recorder.made
    return accepted[n - 1]


def fill_write_buffer(transport):
    """Write until the transport queues data (the peer's and our socket buffers are full)."""
    transport.set_write_buffer_limits(high=1 << 30)
    written = 0
    while transport.get_write_buffer_size() == 0:
        transport.write(b"z" * 65536)
        written += 65536
        assert written < 1 << 30
    return written


# ---------------------------------------------------------------------------------------------
# a peer that resets mid-write


def test_peer_reset_mid_write(loop, debug, caplog):
    """The peer closes with SO_LINGER 0 (a RST) while our write buffer is full.

    asyncio: connection_lost(ConnectionResetError or BrokenPipeError), exactly once; an
    OSError is not passed to the exception handler, it is logged at DEBUG in debug mode only.
    """
    loop.set_debug(debug)
    handler = Handler()
    loop.set_exception_handler(handler)
    caplog.set_level(logging.DEBUG, logger="asyncio")

    async def main():
        accepted = []
        server = await loop.create_server(lambda: Echo(loop, accepted), "127.0.0.1", 0)
        raw = socket.create_connection(server.sockets[0].getsockname())
        raw.setblocking(False)
        srv = await accepted_one(accepted)
        fill_write_buffer(srv.transport)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()
        exc = await srv.recorder.lost
        assert isinstance(exc, (ConnectionResetError, BrokenPipeError)), exc
        assert exc.errno in (errno.ECONNRESET, errno.EPIPE)
        await turns(10)
        assert srv.recorder.lost_exc == [exc]
        assert srv.transport.is_closing()
        assert srv.transport.get_write_buffer_size() == 0
        server.close()
        await server.wait_closed()
        return exc

    exc = run(loop, main())
    assert handler.calls == []
    fatal = [
        r
        for r in caplog.records
        if r.name == "asyncio" and "Fatal" in r.getMessage() and r.exc_info
    ]
    if debug:
        assert len(fatal) == 1
        assert fatal[0].levelno == logging.DEBUG
        assert fatal[0].exc_info[1] is exc
        assert "error on socket transport" in fatal[0].getMessage()
    else:
        assert fatal == []


def test_connection_reset_while_reading(loop, debug, caplog):
    """A RST with nothing queued: the read side sees it; same rules as above."""
    loop.set_debug(debug)
    handler = Handler()
    loop.set_exception_handler(handler)
    caplog.set_level(logging.DEBUG, logger="asyncio")

    async def main():
        accepted = []
        server = await loop.create_server(lambda: Echo(loop, accepted), "127.0.0.1", 0)
        raw = socket.create_connection(server.sockets[0].getsockname())
        srv = await accepted_one(accepted)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()
        exc = await srv.recorder.lost
        assert isinstance(exc, ConnectionResetError), exc
        await turns(5)
        assert srv.recorder.lost_exc == [exc]
        assert "eof" not in srv.recorder.events
        server.close()
        await server.wait_closed()

    run(loop, main())
    assert handler.calls == []
    fatal = [r for r in caplog.records if r.name == "asyncio" and "Fatal read error" in r.message]
    assert len(fatal) == (1 if debug else 0)


# ---------------------------------------------------------------------------------------------
# writing after the connection is lost


@pytest.mark.parametrize("how", ["close", "abort", "reset"])
def test_write_after_connection_lost_warns_after_threshold(loop, how, caplog):
    """asyncio ignores writes once the connection is lost, and logs the warning
    "socket.send() raised exception." for each write from the LOG_THRESHOLD_FOR_CONNLOST_WRITES-th
    on (counting the loss itself as the first)."""
    caplog.set_level(logging.WARNING, logger="asyncio")
    threshold = constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES
    writes = threshold + 5

    async def main():
        accepted = []
        server = await loop.create_server(lambda: Echo(loop, accepted), "127.0.0.1", 0)
        raw = socket.create_connection(server.sockets[0].getsockname())
        raw.setblocking(False)
        srv = await accepted_one(accepted)
        tr = srv.transport
        if how == "close":
            tr.close()
        elif how == "abort":
            tr.abort()
        else:
            fill_write_buffer(tr)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()
        await srv.recorder.lost
        caplog.clear()
        counts = []
        for _ in range(writes):
            tr.write(b"into the void")
            counts.append(
                sum(r.getMessage() == "socket.send() raised exception." for r in caplog.records)
            )
        await turns(5)
        assert srv.recorder.lost_exc[1:] == []
        raw.close()
        server.close()
        await server.wait_closed()
        return counts

    counts = run(loop, main())
    expected = [max(0, i + 2 - threshold) for i in range(writes)]
    assert counts == expected
    records = [r for r in caplog.records if r.getMessage() == "socket.send() raised exception."]
    assert all(r.levelno == logging.WARNING and r.name == "asyncio" for r in records)
    assert len(records) == expected[-1]


# ---------------------------------------------------------------------------------------------
# a large transfer through a slow reader


BIG = os.environ.get("FERROLOOP_BIG") == "1"
TRANSFER = (1 << 30) if BIG else (256 << 20)
CHUNK = 64 << 10
HIGH = 256 << 10
PATTERN = os.urandom(1 << 20)


def chunk_at(index):
    """Chunk ``index`` of the stream: a slice of the pattern that moves with the index, so
    lost, duplicated or reordered chunks change the hash."""
    start = (index * 7919) % (len(PATTERN) - CHUNK)
    return PATTERN[start : start + CHUNK]


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class BulkSender(asyncio.Protocol):
    def __init__(self, loop, total, sink):
        self.loop = loop
        self.total = total
        self.sent = 0
        self.index = 0
        self.hash = hashlib.sha1()
        self.paused = False
        self.pauses = 0
        self.resumes = 0
        self.max_buffer = 0
        self.max_rss = 0
        self.closing = False
        self.lost = loop.create_future()
        sink.append(self)

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH)
        self.pump()

    def pause_writing(self):
        assert not self.paused
        self.paused = True
        self.pauses += 1
        self.max_rss = max(self.max_rss, rss_bytes())

    def resume_writing(self):
        assert self.paused
        self.paused = False
        self.resumes += 1
        assert self.transport.get_write_buffer_size() <= HIGH // 4
        self.pump()

    def pump(self):
        while not self.paused and self.sent < self.total:
            chunk = chunk_at(self.index)
            self.index += 1
            self.hash.update(chunk)
            self.transport.write(chunk)
            self.sent += len(chunk)
            self.max_buffer = max(self.max_buffer, self.transport.get_write_buffer_size())
        if self.sent >= self.total and not self.closing:
            # close() flushes what is queued, then sends a FIN. Not from inside
            # resume_writing: asyncio's _write_ready would then call connection_lost twice
            # (it calls it itself once the buffer is empty, and close() scheduled it too).
            self.closing = True
            self.loop.call_soon(self.transport.close)

    def connection_lost(self, exc):
        self.lost.set_result(exc)


class SlowReader(asyncio.Protocol):
    """Reads everything, but stops reading for a moment after every few MiB."""

    STRIDE = 8 << 20

    def __init__(self, loop):
        self.loop = loop
        self.received = 0
        self.hash = hashlib.sha1()
        self.next_pause = self.STRIDE
        self.read_pauses = 0
        self.eof = False
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.hash.update(data)
        self.received += len(data)
        if self.received >= self.next_pause:
            self.next_pause += self.STRIDE
            self.read_pauses += 1
            self.transport.pause_reading()
            self.loop.call_later(0.001, self.transport.resume_reading)

    def eof_received(self):
        self.eof = True

    def connection_lost(self, exc):
        self.lost.set_result(exc)


def test_large_transfer_through_a_slow_reader(loop):
    """256 MiB (1 GiB with FERROLOOP_BIG=1) from a sender that honours pause_writing to a
    reader that keeps pausing: every byte intact (SHA-1 on both sides), pause_writing seen,
    the write buffer never above the high-water mark plus one chunk, and the process's
    resident memory bounded well below the transfer size."""
    handler = Handler()
    loop.set_exception_handler(handler)
    gc.collect()
    rss_before = rss_bytes()

    async def main():
        senders = []
        server = await loop.create_server(
            lambda: BulkSender(loop, TRANSFER, senders), "127.0.0.1", 0
        )
        _tr, reader = await loop.create_connection(
            lambda: SlowReader(loop), *server.sockets[0].getsockname()
        )
        assert await reader.lost is None
        sender = senders[0]
        assert await sender.lost is None
        server.close()
        await server.wait_closed()
        return sender, reader

    sender, reader = run(loop, main(), timeout=120 if BIG else 30)
    assert handler.calls == []
    assert sender.sent == TRANSFER
    assert reader.received == TRANSFER
    assert reader.eof
    assert reader.hash.hexdigest() == sender.hash.hexdigest()
    assert sender.pauses >= 1
    assert sender.resumes == sender.pauses
    assert reader.read_pauses >= TRANSFER // SlowReader.STRIDE - 1
    assert 0 < sender.max_buffer <= HIGH + CHUNK
    assert sender.max_rss - rss_before < 96 << 20, (sender.max_rss - rss_before) >> 20


# ---------------------------------------------------------------------------------------------
# many concurrent connections


MAX_CONNECTIONS = 10_000


def test_many_concurrent_connections(loop, nofile):
    """Up to 10,000 connections open at once to one server, each echoing a message.

    Both ends of every connection live in this process (2 fds per connection), so the test
    raises the soft RLIMIT_NOFILE to the hard limit (restored afterwards) and opens as many
    connections as that allows, at most 10,000: with a hard limit of 20,000 (this machine)
    that is a little under 10,000. The count used is in the assertion messages.
    """
    soft, hard = nofile
    target = hard if hard != resource.RLIM_INFINITY else 4 * MAX_CONNECTIONS
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    limit = max(soft, target)
    gc.collect()
    n = min(MAX_CONNECTIONS, (limit - fd_count() - 256) // 2)
    if n < 100:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} leaves room for only {n} connections")
    fds_before = fd_count()
    batch = 500

    async def main():
        accepted = []
        server = await loop.create_server(
            lambda: Echo(loop, accepted), "127.0.0.1", 0, backlog=batch * 2
        )
        addr = server.sockets[0].getsockname()
        clients = []
        while len(clients) < n:
            k = min(batch, n - len(clients))
            clients += await asyncio.gather(
                *[loop.create_connection(lambda: Recorder(loop), *addr) for _ in range(k)]
            )
        while len(accepted) < n:
            await asyncio.sleep(0.01)
        assert fd_count() >= fds_before + 2 * n
        for i, (tr, _) in enumerate(clients):
            tr.write(b"%d;" % i)
        for i, (_, proto) in enumerate(clients):
            assert await proto.received(len(b"%d;" % i)) == b"%d;" % i, i
        assert not any(p.recorder.lost.done() for p in accepted), f"n={n}"
        assert len(accepted) == n
        for tr, _ in clients:
            tr.close()
        for _, proto in clients:
            assert await proto.lost is None
        for p in accepted:
            assert await p.recorder.lost is None
        server.close()
        await server.wait_closed()
        return len(accepted)

    assert run(loop, main(), timeout=60) == n, f"n={n}"
    settle(loop)
    assert fd_count() == fds_before, f"n={n}"


# ---------------------------------------------------------------------------------------------
# EMFILE on accept


def test_emfile_on_accept_keeps_the_server_alive(loop, nofile, monkeypatch):
    """With no fd left, accept() fails with EMFILE: asyncio calls the exception handler
    ("socket.accept() out of system resource"), stops watching the listening socket, retries
    after ACCEPT_RETRY_DELAY (shortened here; asyncio's constant, restored after) and then
    serves the waiting connection and new ones."""
    soft, hard = nofile
    monkeypatch.setattr(constants, "ACCEPT_RETRY_DELAY", 0.05)
    handler = Handler()
    loop.set_exception_handler(handler)

    async def main():
        accepted = []
        server = await loop.create_server(lambda: Echo(loop, accepted), "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()
        gc.collect()
        # Connected by the kernel; the server has not accepted it yet.
        raw = socket.create_connection(addr)
        raw.setblocking(False)
        lowest_free = os.dup(raw.fileno())
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            while not handler.calls:
                await asyncio.sleep(0)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert accepted == []
        assert server.is_serving()
        for call in handler.calls:
            assert call["message"] == "socket.accept() out of system resource"
            assert isinstance(call["exception"], OSError)
            assert call["exception"].errno == errno.EMFILE
            assert "socket" in call["keys"]
        # The retry serves the connection that waited.
        srv = await accepted_one(accepted)
        await loop.sock_sendall(raw, b"after emfile")
        got = b""
        while len(got) < 12:
            got += await loop.sock_recv(raw, 100)
        assert got == b"after emfile"
        raw.close()
        await srv.recorder.lost
        # And new connections.
        tr, client = await loop.create_connection(lambda: Recorder(loop), *addr)
        tr.write(b"next")
        assert await client.received(4) == b"next"
        tr.close()
        await client.lost
        server.close()
        await server.wait_closed()
        return len(accepted)

    assert run(loop, main()) == 2
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)


# ---------------------------------------------------------------------------------------------
# a protocol factory that raises


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_protocol_factory_raising_keeps_the_server_up(loop, debug):
    """asyncio reports a raising protocol factory to the exception handler in debug mode
    only ("Error on transport creation for incoming connection"); the accepted socket is
    dropped (the client sees EOF) and the server serves the next connection."""
    loop.set_debug(debug)
    handler = Handler(keep_exceptions=False)  # keep no traceback alive: the socket must go
    loop.set_exception_handler(handler)
    accepted = []
    made = [0]

    def factory():
        made[0] += 1
        if made[0] == 1:
            raise ValueError("factory failed")
        return Echo(loop, accepted)

    async def main():
        server = await loop.create_server(factory, "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()
        _tr1, c1 = await loop.create_connection(lambda: Recorder(loop), *addr)
        # In debug mode asyncio's context dict keeps the failed accept's frame (and its
        # socket) in a reference cycle: the client sees EOF once the cycle is collected.
        while not c1.eof.done():
            gc.collect()
            await asyncio.sleep(0.001)
        assert await c1.lost is None
        assert c1.data == b""
        assert server.is_serving()
        tr2, c2 = await loop.create_connection(lambda: Recorder(loop), *addr)
        tr2.write(b"second")
        assert await c2.received(6) == b"second"
        tr2.close()
        await c2.lost
        server.close()
        await server.wait_closed()

    run(loop, main())
    assert made[0] == 2
    if debug:
        assert len(handler.calls) == 1
        call = handler.calls[0]
        assert call["message"] == "Error on transport creation for incoming connection"
        assert call["type"] is ValueError
        assert "factory failed" in call["exception"]
    else:
        assert handler.calls == []


# ---------------------------------------------------------------------------------------------
# protocol callbacks that raise


class Boom(Exception):
    pass


class Raising(asyncio.BufferedProtocol):
    """Server side: raises in the named callback, records the rest."""

    def __init__(self, loop, where, sink, buffered):
        self.where = where
        self.buffered = buffered
        self.recorder = Recorder(loop)
        self.buf = bytearray(4096)
        sink.append(self)

    def connection_made(self, transport):
        self.transport = transport
        self.recorder.connection_made(transport)
        if self.where == "connection_made":
            raise Boom("connection_made")

    def data_received(self, data):
        self.recorder.data_received(data)
        if self.where == "data_received":
            raise Boom("data_received")
        self.transport.write(data)

    def get_buffer(self, sizehint):
        if self.where == "get_buffer":
            raise Boom("get_buffer")
        if self.where == "get_buffer_empty":
            return bytearray()
        return self.buf

    def buffer_updated(self, nbytes):
        if self.where == "buffer_updated":
            raise Boom("buffer_updated")
        self.data_received(bytes(self.buf[:nbytes]))

    def eof_received(self):
        self.recorder.eof_received()
        if self.where == "eof_received":
            raise Boom("eof_received")

    def connection_lost(self, exc):
        self.recorder.connection_lost(exc)
        if self.where == "connection_lost":
            raise Boom("connection_lost")


# (callback, buffered, asyncio's message)
FATAL = [
    ("data_received", False, "Fatal error: protocol.data_received() call failed."),
    ("get_buffer", True, "Fatal error: protocol.get_buffer() call failed."),
    ("get_buffer_empty", True, "Fatal error: protocol.get_buffer() call failed."),
    ("buffer_updated", True, "Fatal error: protocol.buffer_updated() call failed."),
    ("eof_received", False, "Fatal error: protocol.eof_received() call failed."),
    ("eof_received", True, "Fatal error: protocol.eof_received() call failed."),
]


def make_raising(loop, where, sink, buffered):
    proto = Raising(loop, where, sink, buffered)
    if buffered:
        return proto

    # asyncio chooses the read path with isinstance(protocol, BufferedProtocol).
    class Plain(asyncio.Protocol):
        def connection_made(self, transport):
            proto.connection_made(transport)

        def data_received(self, data):
            proto.data_received(data)

        def eof_received(self):
            return proto.eof_received()

        def connection_lost(self, exc):
            proto.connection_lost(exc)

    return Plain()


@pytest.mark.parametrize(
    "where,buffered,message", FATAL, ids=[f"{w}-{'buf' if b else 'plain'}" for w, b, _ in FATAL]
)
def test_raising_protocol_callback_is_fatal(loop, where, buffered, message):
    """asyncio's _fatal_error: the exception handler gets message, exception, transport and
    protocol; the transport closes; connection_lost gets the exception; the peer sees EOF
    (or a reset, when the failing side closes with data unread)."""
    handler = Handler()
    loop.set_exception_handler(handler)

    async def main():
        accepted = []
        server = await loop.create_server(
            lambda: make_raising(loop, where, accepted, buffered), "127.0.0.1", 0
        )
        tr, client = await loop.create_connection(
            lambda: Recorder(loop), *server.sockets[0].getsockname()
        )
        srv = await accepted_one(accepted)
        tr.write(b"trigger")
        if where == "eof_received":
            assert await client.received(7) == b"trigger"
            tr.write_eof()
        exc = await srv.recorder.lost
        assert srv.transport.is_closing()
        client_exc = await client.lost
        if where.startswith("get_buffer"):
            # The server closed with "trigger" unread: the kernel sends a RST, not a FIN.
            assert isinstance(client_exc, ConnectionResetError), client_exc
        else:
            assert client.eof.done()
            assert client_exc is None
        await turns(5)
        assert srv.recorder.lost_exc == [exc]
        server.close()
        await server.wait_closed()
        return exc, srv

    exc, srv = run(loop, main())
    assert len(handler.calls) == 1, handler.calls
    call = handler.calls[0]
    assert call["message"] == message
    assert call["exception"] is exc
    if where == "get_buffer_empty":
        assert isinstance(exc, RuntimeError)
    else:
        assert isinstance(exc, Boom) and str(exc) == where
    assert {"message", "exception", "transport", "protocol"} <= call["keys"]
    assert call["transport"] is srv.transport


def test_raising_connection_made_goes_to_the_handler(loop):
    """connection_made runs as a plain callback in asyncio: the exception handler gets
    "Exception in callback ..." and the transport is *not* closed (it keeps serving)."""
    handler = Handler()
    loop.set_exception_handler(handler)

    async def main():
        accepted = []
        server = await loop.create_server(
            lambda: make_raising(loop, "connection_made", accepted, False), "127.0.0.1", 0
        )
        tr, client = await loop.create_connection(
            lambda: Recorder(loop), *server.sockets[0].getsockname()
        )
        srv = await accepted_one(accepted)
        await turns(5)
        tr.write(b"still here")
        assert await client.received(10) == b"still here"
        assert not srv.transport.is_closing()
        tr.close()
        assert await srv.recorder.lost is None
        server.close()
        await server.wait_closed()

    run(loop, main())
    assert len(handler.calls) == 1, handler.calls
    call = handler.calls[0]
    assert call["message"].startswith("Exception in callback ")
    assert isinstance(call["exception"], Boom)


def test_raising_connection_lost_goes_to_the_handler(loop):
    handler = Handler()
    loop.set_exception_handler(handler)

    async def main():
        accepted = []
        server = await loop.create_server(
            lambda: make_raising(loop, "connection_lost", accepted, False), "127.0.0.1", 0
        )
        tr, client = await loop.create_connection(
            lambda: Recorder(loop), *server.sockets[0].getsockname()
        )
        srv = await accepted_one(accepted)
        tr.close()
        assert await srv.recorder.lost is None
        await client.lost
        await turns(5)
        server.close()
        await server.wait_closed()

    run(loop, main())
    assert len(handler.calls) == 1, handler.calls
    assert handler.calls[0]["message"].startswith("Exception in callback ")
    assert isinstance(handler.calls[0]["exception"], Boom)


def test_raising_client_data_received(loop):
    """The same rules on the client side of create_connection."""
    handler = Handler()
    loop.set_exception_handler(handler)

    class ClientBoom(Recorder):
        def data_received(self, data):
            super().data_received(data)
            raise Boom("client")

    async def main():
        accepted = []
        server = await loop.create_server(lambda: Echo(loop, accepted), "127.0.0.1", 0)
        tr, client = await loop.create_connection(
            lambda: ClientBoom(loop), *server.sockets[0].getsockname()
        )
        tr.write(b"echo me")
        exc = await client.lost
        assert isinstance(exc, Boom)
        assert tr.is_closing()
        srv = await accepted_one(accepted)
        assert await srv.recorder.lost is None
        server.close()
        await server.wait_closed()
        return tr

    tr = run(loop, main())
    assert [c["message"] for c in handler.calls] == [
        "Fatal error: protocol.data_received() call failed."
    ]
    assert handler.calls[0]["transport"] is tr


# ---------------------------------------------------------------------------------------------
# file descriptor leaks


async def _scenario_echo(loop, tmpdir):
    accepted = []
    tcp = await loop.create_server(lambda: Echo(loop, accepted), "127.0.0.1", 0)
    path = os.path.join(tmpdir, "leak.sock")
    unix = await loop.create_unix_server(lambda: Echo(loop, accepted), path)
    pairs = []
    for _ in range(20):
        pairs.append(
            await loop.create_connection(lambda: Recorder(loop), *tcp.sockets[0].getsockname())
        )
        pairs.append(await loop.create_unix_connection(lambda: BufferedRecorder(loop), path))
    for tr, _ in pairs:
        tr.write(b"abc")
    for _, proto in pairs:
        rec = proto if isinstance(proto, Recorder) else proto.recorder
        await rec.received(3)
    for i, (tr, _) in enumerate(pairs):
        tr.abort() if i % 3 == 0 else tr.close()
    for _, proto in pairs:
        rec = proto if isinstance(proto, Recorder) else proto.recorder
        await rec.lost
    for p in accepted:
        await p.recorder.lost
    for server in (tcp, unix):
        server.close()
        await server.wait_closed()


async def _scenario_streams(loop, tmpdir):
    async def handle(reader, writer):
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    for _ in range(10):
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
        writer.write(b"line\n")
        assert await reader.readline() == b"line\n"
        assert await reader.read() == b""
        writer.close()
        await writer.wait_closed()
    server.close()
    await server.wait_closed()


async def _scenario_udp(loop, tmpdir):
    s_tr, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
    )
    for _ in range(10):
        c_tr, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=s_tr.get_extra_info("sockname")
        )
        c_tr.sendto(b"x")
        c_tr.close()
    s_tr.close()
    await turns(5)


async def _scenario_errors(loop, tmpdir):
    # refused connects, resets, a raising factory, a raising data_received
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed_addr = probe.getsockname()
    probe.close()
    for _ in range(5):
        with pytest.raises(ConnectionRefusedError):
            await loop.create_connection(asyncio.Protocol, *closed_addr)
    accepted = []
    made = [0]

    def factory():
        made[0] += 1
        if made[0] % 2:
            raise ValueError("factory failed")
        return make_raising(loop, "data_received", accepted, False)

    server = await loop.create_server(factory, "127.0.0.1", 0)
    addr = server.sockets[0].getsockname()
    for _ in range(6):
        tr, client = await loop.create_connection(lambda: Recorder(loop), *addr)
        tr.write(b"x")
        await client.lost
    for _ in range(3):
        raw = socket.create_connection(addr)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await asyncio.sleep(0.01)
        raw.close()
    while made[0] < 9:
        await asyncio.sleep(0.001)
    for p in accepted:
        await p.recorder.lost
    server.close()
    await server.wait_closed()


SCENARIOS = {
    "echo": _scenario_echo,
    "streams": _scenario_streams,
    "udp": _scenario_udp,
    "errors": _scenario_errors,
}


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_no_fd_leaks(loop, scenario, tmp_path_factory):
    tmpdir = tmp_path_factory.mktemp("fd", numbered=True)
    if len(str(tmpdir)) > 80:
        tmpdir = "/tmp"
    loop.set_exception_handler(lambda lp, ctx: None)
    # The loop's own fds exist already; warm up the lazily created ones (executor not used).
    settle(loop)
    before = fd_count()
    run(loop, SCENARIOS[scenario](loop, str(tmpdir)))
    settle(loop)
    after = fd_count()
    assert after == before, sorted(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------------------------------------
# IPv6


def _ipv6_loopback_reason():
    if not socket.has_ipv6:
        return "socket.has_ipv6 is false"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        return f"cannot bind ::1: {exc}"
    return None


ipv6 = pytest.mark.skipif(_ipv6_loopback_reason() is not None, reason=str(_ipv6_loopback_reason()))


@ipv6
def test_ipv6_tcp_echo(loop):
    async def main():
        accepted = []
        server = await loop.create_server(lambda: Echo(loop, accepted), "::1", 0)
        sock = server.sockets[0]
        assert sock.family == socket.AF_INET6
        host, port = sock.getsockname()[:2]
        assert host == "::1"
        tr, client = await loop.create_connection(lambda: Recorder(loop), "::1", port)
        assert tr.get_extra_info("socket").family == socket.AF_INET6
        peer = tr.get_extra_info("peername")
        assert len(peer) == 4 and peer[:2] == ("::1", port)
        tr.write(b"over six")
        assert await client.received(8) == b"over six"
        srv = await accepted_one(accepted)
        assert srv.transport.get_extra_info("peername") == tr.get_extra_info("sockname")
        tr.close()
        assert await client.lost is None
        assert await srv.recorder.lost is None
        server.close()
        await server.wait_closed()

    run(loop, main())


@ipv6
def test_ipv6_streams_and_udp(loop):
    async def handle(reader, writer):
        writer.write((await reader.readline()).upper())
        writer.close()

    class Udp(asyncio.DatagramProtocol):
        def __init__(self):
            self.got = loop.create_future()

        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            if not self.got.done():
                self.got.set_result((data, addr))

    async def main():
        server = await asyncio.start_server(handle, "::1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("::1", port)
        writer.write(b"six\n")
        assert await reader.read() == b"SIX\n"
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

        s_tr, s_proto = await loop.create_datagram_endpoint(Udp, local_addr=("::1", 0))
        addr = s_tr.get_extra_info("sockname")
        c_tr, c_proto = await loop.create_datagram_endpoint(Udp, remote_addr=addr[:2])
        c_tr.sendto(b"dgram6")
        data, src = await s_proto.got
        assert data == b"dgram6"
        assert src[:2] == c_tr.get_extra_info("sockname")[:2]
        s_tr.sendto(b"back", src)
        data, src = await c_proto.got
        assert data == b"back" and src[:2] == addr[:2]
        c_tr.close()
        s_tr.close()

    run(loop, main())
