"""Stream and datagram transports and servers: the basics, on asyncio and ferroloop.

TCP and Unix stream echo with Protocol and BufferedProtocol, get_extra_info,
pause_reading/resume_reading, write_eof, set_protocol, close/abort, flow control,
half-open connections, UDP, and the Server object. Loopback only; nothing is timed.
"""

import asyncio
import os
import shutil
import socket
import tempfile
from asyncio import base_events, trsock

import pytest
from parity_helpers import DatagramRecorder, run, turns

# ---------------------------------------------------------------------------------------------
# helpers


pytestmark = pytest.mark.usefixtures("no_unexpected_loop_errors")


class Recorder(asyncio.Protocol):
    """Records every callback; futures to await the interesting moments."""

    def __init__(self, loop, eof_result=None):
        self.loop = loop
        self.transport = None
        self.events = []
        self.data = bytearray()
        self.eof_result = eof_result
        self.made = loop.create_future()
        self.eof = loop.create_future()
        self.lost = loop.create_future()
        self.lost_exc = []
        self._want = []  # (nbytes, future)

    def connection_made(self, transport):
        self.events.append("made")
        self.transport = transport
        self.made.set_result(transport)

    def data_received(self, data):
        assert isinstance(data, bytes)
        self.events.append("data")
        self.data += data
        self._wake()

    def eof_received(self):
        self.events.append("eof")
        self.eof.set_result(None)
        return self.eof_result

    def connection_lost(self, exc):
        self.events.append("lost")
        self.lost_exc.append(exc)
        if not self.lost.done():
            self.lost.set_result(exc)

    def _wake(self):
        for n, fut in list(self._want):
            if len(self.data) >= n and not fut.done():
                fut.set_result(None)
                self._want.remove((n, fut))

    async def received(self, nbytes):
        """Wait until ``nbytes`` bytes in total have arrived."""
        if len(self.data) < nbytes:
            fut = self.loop.create_future()
            self._want.append((nbytes, fut))
            await fut
        return bytes(self.data)


class Echo(asyncio.Protocol):
    """Server side: echoes everything, records its transports and callbacks."""

    def __init__(self, loop, sink):
        self.recorder = Recorder(loop)
        sink.append(self)

    def connection_made(self, transport):
        self.transport = transport
        self.recorder.connection_made(transport)

    def data_received(self, data):
        self.recorder.data_received(data)
        self.transport.write(data)

    def eof_received(self):
        return self.recorder.eof_received()

    def connection_lost(self, exc):
        self.recorder.connection_lost(exc)


class BufferedEcho(asyncio.BufferedProtocol):
    """Server side, BufferedProtocol: a small buffer so one message takes several reads."""

    def __init__(self, loop, sink):
        self.recorder = Recorder(loop)
        self.buf = bytearray(1000)
        self.sizehints = []
        sink.append(self)

    def connection_made(self, transport):
        self.transport = transport
        self.recorder.connection_made(transport)

    def get_buffer(self, sizehint):
        self.sizehints.append(sizehint)
        return self.buf

    def buffer_updated(self, nbytes):
        assert 0 < nbytes <= len(self.buf)
        data = bytes(self.buf[:nbytes])
        self.recorder.data_received(data)
        self.transport.write(data)

    def eof_received(self):
        return self.recorder.eof_received()

    def connection_lost(self, exc):
        self.recorder.connection_lost(exc)


class BufferedRecorder(asyncio.BufferedProtocol):
    """Client side, BufferedProtocol: writes into a memoryview of a preallocated buffer."""

    def __init__(self, loop):
        self.recorder = Recorder(loop)
        self.buf = bytearray(777)

    def connection_made(self, transport):
        self.transport = transport
        self.recorder.connection_made(transport)

    def get_buffer(self, sizehint):
        return memoryview(self.buf)[:500]

    def buffer_updated(self, nbytes):
        assert 0 < nbytes <= 500
        self.recorder.data_received(bytes(self.buf[:nbytes]))

    def eof_received(self):
        return self.recorder.eof_received()

    def connection_lost(self, exc):
        self.recorder.connection_lost(exc)


@pytest.fixture
def short_tmpdir():
    # Unix socket paths are limited to ~107 bytes: keep them short.
    path = tempfile.mkdtemp(prefix="fl-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["tcp", "unix"])
def kind(request):
    return request.param


class Endpoints:
    """Start servers and connect clients of one kind (TCP on 127.0.0.1, or Unix)."""

    def __init__(self, loop, kind, tmpdir):
        self.loop = loop
        self.kind = kind
        self.tmpdir = tmpdir
        self.count = 0

    async def server(self, factory, **kwargs):
        if self.kind == "tcp":
            return await self.loop.create_server(factory, "127.0.0.1", 0, **kwargs)
        self.count += 1
        path = os.path.join(self.tmpdir, f"s{self.count}")
        return await self.loop.create_unix_server(factory, path, **kwargs)

    async def connect(self, factory, server):
        addr = server.sockets[0].getsockname()
        if self.kind == "tcp":
            return await self.loop.create_connection(factory, *addr)
        return await self.loop.create_unix_connection(factory, addr)


@pytest.fixture
def ends(loop, kind, short_tmpdir):
    return Endpoints(loop, kind, short_tmpdir)


def recorder_of(proto):
    return proto if isinstance(proto, Recorder) else proto.recorder


async def echo_pair(loop, ends, server_factory=Echo, client_factory=None):
    """A server, one connected client, and the server-side protocol."""
    accepted = []
    server = await ends.server(lambda: server_factory(loop, accepted))
    tr, client = await ends.connect(client_factory or (lambda: Recorder(loop)), server)
    await turns()
    while not accepted:
        await asyncio.sleep(0.001)
    await accepted[0].recorder.made
    return server, tr, client, accepted[0]


# ---------------------------------------------------------------------------------------------
# echo


@pytest.mark.parametrize("server_factory", [Echo, BufferedEcho], ids=["Protocol", "Buffered"])
@pytest.mark.parametrize("client_kind", ["Protocol", "Buffered"])
def test_stream_echo(loop, ends, server_factory, client_kind):
    payload = bytes(range(256)) * 40  # 10 KiB: several reads on the buffered side

    def client_factory():
        return Recorder(loop) if client_kind == "Protocol" else BufferedRecorder(loop)

    async def main():
        server, tr, client, srv = await echo_pair(loop, ends, server_factory, client_factory)
        rec = recorder_of(client)
        assert isinstance(tr, asyncio.Transport)
        assert rec.transport is tr
        tr.write(payload[:100])
        tr.writelines(
            [payload[100:5000], bytearray(payload[5000:9000]), memoryview(payload)[9000:]]
        )
        assert await rec.received(len(payload)) == payload
        tr.close()
        assert await rec.lost is None
        assert await srv.recorder.lost is None
        assert rec.lost_exc == [None]
        assert srv.recorder.lost_exc == [None]
        assert srv.recorder.events[0] == "made"
        assert srv.recorder.events[-2:] == ["eof", "lost"]
        assert bytes(srv.recorder.data) == payload
        if server_factory is BufferedEcho:
            assert srv.sizehints and all(isinstance(h, int) for h in srv.sizehints)
        server.close()
        await server.wait_closed()

    run(loop, main())


def test_write_rejects_non_bytes(loop, ends):
    async def main():
        server, tr, client, _srv = await echo_pair(loop, ends)
        with pytest.raises(TypeError):
            tr.write("text")
        with pytest.raises(TypeError):
            tr.writelines(["text"])
        tr.write(b"")  # nothing, no error
        tr.close()
        await client.lost
        server.close()
        await server.wait_closed()

    run(loop, main())


# ---------------------------------------------------------------------------------------------
# get_extra_info


def test_get_extra_info_tcp(loop):
    async def main():
        accepted = []
        server = await loop.create_server(lambda: Echo(loop, accepted), "127.0.0.1", 0)
        host, port = server.sockets[0].getsockname()
        tr, client = await loop.create_connection(lambda: Recorder(loop), host, port)
        while not accepted:
            await asyncio.sleep(0.001)
        srv_tr = await accepted[0].recorder.made
        for t in (tr, srv_tr):
            sock = t.get_extra_info("socket")
            assert isinstance(sock, trsock.TransportSocket)
            assert sock.family == socket.AF_INET
            assert sock.type == socket.SOCK_STREAM
            assert t.get_extra_info("sockname") == sock.getsockname()
            assert t.get_extra_info("peername") == sock.getpeername()
            assert t.get_extra_info("no such key") is None
            assert t.get_extra_info("no such key", "dflt") == "dflt"
        assert srv_tr.get_extra_info("sockname") == (host, port)
        assert tr.get_extra_info("peername") == (host, port)
        assert srv_tr.get_extra_info("peername") == tr.get_extra_info("sockname")
        tr.close()
        await client.lost
        await accepted[0].recorder.lost
        server.close()
        await server.wait_closed()

    run(loop, main())


def test_get_extra_info_unix(loop, short_tmpdir):
    path = os.path.join(short_tmpdir, "x.sock")

    async def main():
        accepted = []
        server = await loop.create_unix_server(lambda: Echo(loop, accepted), path)
        assert server.sockets[0].getsockname() == path
        tr, client = await loop.create_unix_connection(lambda: Recorder(loop), path)
        while not accepted:
            await asyncio.sleep(0.001)
        srv_tr = await accepted[0].recorder.made
        for t in (tr, srv_tr):
            sock = t.get_extra_info("socket")
            assert isinstance(sock, trsock.TransportSocket)
            assert sock.family == socket.AF_UNIX
            assert t.get_extra_info("sockname") == sock.getsockname()
        assert srv_tr.get_extra_info("sockname") == path
        assert tr.get_extra_info("peername") == path
        tr.close()
        await client.lost
        server.close()
        await server.wait_closed()

    run(loop, main())


# ---------------------------------------------------------------------------------------------
# reading: pause/resume, write_eof, half-open, set_protocol


def test_pause_and_resume_reading(loop, ends):
    async def main():
        server, tr, client, srv = await echo_pair(loop, ends)
        srv_tr = srv.transport
        assert srv_tr.is_reading()
        srv_tr.pause_reading()
        srv_tr.pause_reading()  # idempotent
        assert not srv_tr.is_reading()
        tr.write(b"while paused")
        await asyncio.sleep(0.05)
        await turns(10)
        assert srv.recorder.data == b""
        srv_tr.resume_reading()
        srv_tr.resume_reading()  # idempotent
        assert srv_tr.is_reading()
        assert await client.received(12) == b"while paused"
        tr.close()
        await srv.recorder.lost
        assert not srv_tr.is_reading()  # closed
        server.close()
        await server.wait_closed()

    run(loop, main())


def test_write_eof(loop, ends):
    async def main():
        server, tr, client, srv = await echo_pair(loop, ends)
        assert tr.can_write_eof()
        assert srv.transport.can_write_eof()
        tr.write(b"last words")
        tr.write_eof()
        tr.write_eof()  # idempotent
        with pytest.raises(RuntimeError):
            tr.write(b"more")
        await srv.recorder.eof
        assert bytes(srv.recorder.data) == b"last words"
        # The server's eof_received returned None: asyncio closes its transport, after
        # flushing the echo.
        assert await client.received(10) == b"last words"
        await client.eof
        assert await client.lost is None
        assert await srv.recorder.lost is None
        assert client.events == ["made", "data", "eof", "lost"]
        server.close()
        await server.wait_closed()

    run(loop, main())


def test_eof_received_true_keeps_the_connection_half_open(loop, ends):
    class HalfOpen(Echo):
        def data_received(self, data):
            self.recorder.data_received(data)  # no echo

        def eof_received(self):
            self.recorder.eof_received()
            return True

    async def main():
        server, tr, client, srv = await echo_pair(loop, ends, server_factory=HalfOpen)
        tr.write(b"question")
        tr.write_eof()
        await srv.recorder.eof
        await turns(10)
        assert not srv.transport.is_closing()
        assert not srv.recorder.lost.done()
        assert not client.lost.done()
        srv.transport.write(b"answer after eof")
        srv.transport.close()
        assert await client.received(16) == b"answer after eof"
        await client.eof
        assert await client.lost is None
        assert await srv.recorder.lost is None
        assert bytes(srv.recorder.data) == b"question"
        assert srv.recorder.lost_exc == [None]
        server.close()
        await server.wait_closed()

    run(loop, main())


def test_set_protocol_and_get_protocol(loop, ends):
    async def main():
        server, tr, client, srv = await echo_pair(loop, ends)
        assert tr.get_protocol() is client
        assert srv.transport.get_protocol() is srv
        tr.write(b"one")
        await client.received(3)
        newer = Recorder(loop)
        srv.transport.set_protocol(newer)
        assert srv.transport.get_protocol() is newer
        tr.write(b"two")
        await newer.received(3)
        assert bytes(newer.data) == b"two"
        assert bytes(srv.recorder.data) == b"one"
        tr.close()
        assert await newer.lost is None
        assert newer.events == ["data", "eof", "lost"]
        assert not srv.recorder.lost.done()
        server.close()
        await server.wait_closed()

    run(loop, main())


# ---------------------------------------------------------------------------------------------
# close and abort


def test_close_calls_connection_lost_once_and_flushes(loop, ends):
    payload = os.urandom(1 << 20)  # more than the socket buffers: close must flush

    class Sink(Echo):
        def data_received(self, data):
            self.recorder.data_received(data)

    async def main():
        server, tr, client, srv = await echo_pair(loop, ends, server_factory=Sink)
        tr.write(payload)
        assert not tr.is_closing()
        tr.close()
        assert tr.is_closing()
        tr.close()  # idempotent
        await srv.recorder.received(len(payload))
        assert await srv.recorder.lost is None
        assert await client.lost is None
        await turns(10)
        assert bytes(srv.recorder.data) == payload
        assert client.lost_exc == [None]
        assert client.events.count("lost") == 1
        assert srv.recorder.events.count("lost") == 1
        tr.close()  # after connection_lost: still nothing
        await turns(5)
        assert client.lost_exc == [None]
        server.close()
        await server.wait_closed()

    run(loop, main())


def test_abort_drops_the_buffer(loop, ends):
    async def main():
        server, tr, client, srv = await echo_pair(loop, ends)
        srv.transport.pause_reading()
        tr.set_write_buffer_limits(high=1 << 30)
        while tr.get_write_buffer_size() == 0:
            tr.write(b"x" * 65536)
        tr.abort()
        assert tr.is_closing()
        assert tr.get_write_buffer_size() == 0
        tr.abort()
        tr.close()
        assert await client.lost is None
        await turns(5)
        assert client.lost_exc == [None]
        srv.transport.resume_reading()
        await srv.recorder.lost
        assert srv.recorder.events.count("lost") == 1
        server.close()
        await server.wait_closed()

    run(loop, main())


def test_peer_close_gives_eof_then_connection_lost(loop, ends):
    async def main():
        server, _tr, client, srv = await echo_pair(loop, ends)
        srv.transport.close()
        await client.eof
        assert await client.lost is None
        assert client.events == ["made", "eof", "lost"]
        server.close()
        await server.wait_closed()

    run(loop, main())


# ---------------------------------------------------------------------------------------------
# flow control


class FlowRecorder(Recorder):
    def __init__(self, loop):
        super().__init__(loop)
        self.flow = []
        self.paused = loop.create_future()
        self.resumed = loop.create_future()

    def pause_writing(self):
        self.flow.append(("pause", self.transport.get_write_buffer_size()))
        self.paused.set_result(None)

    def resume_writing(self):
        self.flow.append(("resume", self.transport.get_write_buffer_size()))
        self.resumed.set_result(None)


def test_write_buffer_limits(loop, ends):
    async def main():
        server, tr, client, _srv = await echo_pair(loop, ends)
        assert tr.get_write_buffer_limits() == (16384, 65536)  # asyncio's defaults
        tr.set_write_buffer_limits(high=1000)
        assert tr.get_write_buffer_limits() == (250, 1000)
        tr.set_write_buffer_limits(low=10)
        assert tr.get_write_buffer_limits() == (10, 40)
        tr.set_write_buffer_limits(high=300, low=20)
        assert tr.get_write_buffer_limits() == (20, 300)
        with pytest.raises(ValueError):
            tr.set_write_buffer_limits(high=10, low=20)
        with pytest.raises(ValueError):
            tr.set_write_buffer_limits(high=-1)
        tr.close()
        await client.lost
        server.close()
        await server.wait_closed()

    run(loop, main())


def test_pause_and_resume_writing(loop, ends):
    chunk = b"y" * 65536

    async def main():
        server, tr, client, srv = await echo_pair(
            loop, ends, client_factory=lambda: FlowRecorder(loop)
        )
        srv.transport.pause_reading()
        tr.set_write_buffer_limits(high=32768, low=8192)
        written = 0
        while not client.paused.done():
            assert tr.get_write_buffer_size() <= 32768
            tr.write(chunk)
            written += len(chunk)
            assert written < 256 << 20, "pause_writing never came"
        assert client.flow[0][0] == "pause"
        assert client.flow[0][1] > 32768
        assert tr.get_write_buffer_size() > 32768
        srv.transport.resume_reading()
        await client.resumed
        assert client.flow[1][0] == "resume"
        assert client.flow[1][1] <= 8192
        await client.received(written)
        assert tr.get_write_buffer_size() == 0
        assert [f[0] for f in client.flow] == ["pause", "resume"]
        tr.close()
        await client.lost
        server.close()
        await server.wait_closed()

    run(loop, main())


# ---------------------------------------------------------------------------------------------
# UDP


def test_udp_sendto_and_datagram_received(loop):
    async def main():
        s_tr, s_proto = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(loop, echo=True), local_addr=("127.0.0.1", 0)
        )
        assert isinstance(s_tr, asyncio.BaseTransport)
        addr = s_tr.get_extra_info("sockname")
        assert isinstance(s_tr.get_extra_info("socket"), trsock.TransportSocket)
        c_tr, c_proto = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(loop), remote_addr=addr
        )
        assert c_tr.get_extra_info("peername") == addr
        c_tr.sendto(b"hello")
        data, src = await c_proto.got.get()
        assert (data, src) == (b"HELLO", addr)
        assert s_proto.received == [(b"hello", c_tr.get_extra_info("sockname"))]
        # An unconnected endpoint sends to any address.
        u_tr, u_proto = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(loop), local_addr=("127.0.0.1", 0)
        )
        big = bytes(range(256)) * 200  # 51200 bytes, one datagram
        u_tr.sendto(big, addr)
        data, src = await u_proto.got.get()
        assert data == big.upper() and src == addr
        assert u_tr.get_write_buffer_size() == 0
        for t in (u_tr, c_tr, s_tr):
            t.close()
        for p in (u_proto, c_proto, s_proto):
            assert await p.lost is None
            assert p.errors == []

    run(loop, main())


def test_udp_error_received_on_refused_port(loop):
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    closed_addr = probe.getsockname()
    probe.close()

    async def main():
        tr, proto = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(loop), remote_addr=closed_addr
        )
        tr.sendto(b"anyone?")
        exc = await proto.error
        assert isinstance(exc, ConnectionRefusedError)
        assert not tr.is_closing()
        tr.close()
        assert await proto.lost is None

    run(loop, main())


def test_udp_sendto_after_close_is_ignored(loop):
    async def main():
        tr, proto = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(loop), local_addr=("127.0.0.1", 0)
        )
        addr = tr.get_extra_info("sockname")
        tr.close()
        tr.sendto(b"dropped", addr)
        assert await proto.lost is None
        with pytest.raises(TypeError):
            tr.sendto("text", addr)

    run(loop, main())


# ---------------------------------------------------------------------------------------------
# Server


def test_server_start_serving_and_close(loop, ends):
    async def main():
        accepted = []
        server = await ends.server(lambda: Echo(loop, accepted), start_serving=False)
        assert isinstance(server, asyncio.AbstractServer)
        assert server.get_loop() is loop
        assert not server.is_serving()
        assert len(server.sockets) == 1
        assert isinstance(server.sockets[0], trsock.TransportSocket)
        await server.start_serving()
        assert server.is_serving()
        await server.start_serving()  # again: nothing
        tr, client = await ends.connect(lambda: Recorder(loop), server)
        tr.write(b"ping")
        assert await client.received(4) == b"ping"
        server.close()
        assert not server.is_serving()
        assert len(server.sockets) == 0
        # close() leaves accepted connections alone.
        tr.write(b"still")
        assert await client.received(9) == b"pingstill"
        assert not accepted[0].recorder.lost.done()
        tr.close()
        await accepted[0].recorder.lost
        await server.wait_closed()
        server.close()  # idempotent
        await server.wait_closed()

    run(loop, main())


def test_server_refuses_new_connections_after_close(loop):
    async def main():
        server = await loop.create_server(lambda: Echo(loop, []), "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()
        server.close()
        await server.wait_closed()
        with pytest.raises(ConnectionRefusedError):
            await loop.create_connection(lambda: Recorder(loop), *addr)

    run(loop, main())


def test_server_serve_forever(loop, ends):
    async def main():
        accepted = []
        server = await ends.server(lambda: Echo(loop, accepted), start_serving=False)
        task = loop.create_task(server.serve_forever())
        await turns()
        assert server.is_serving()
        tr, client = await ends.connect(lambda: Recorder(loop), server)
        tr.write(b"x")
        await client.received(1)
        with pytest.raises(RuntimeError):
            await server.serve_forever()  # already being awaited
        task.cancel()
        await turns()
        assert not server.is_serving()
        # Python 3.12+ makes serve_forever wait for the connections to close.
        tr.close()
        await accepted[0].recorder.lost
        await asyncio.wait([task])
        assert task.cancelled()
        await server.wait_closed()

    run(loop, main())


def test_server_async_with(loop, ends):
    async def main():
        server = await ends.server(lambda: Echo(loop, []))
        async with server as entered:
            assert entered is server
            assert server.is_serving()
        assert not server.is_serving()
        assert len(server.sockets) == 0

    run(loop, main())


def test_server_several_connections(loop, ends):
    async def main():
        accepted = []
        server = await ends.server(lambda: Echo(loop, accepted))
        pairs = [await ends.connect(lambda: Recorder(loop), server) for _ in range(20)]
        for i, (tr, _) in enumerate(pairs):
            tr.write(b"%d" % i)
        for i, (_, proto) in enumerate(pairs):
            assert await proto.received(len(b"%d" % i)) == b"%d" % i
        for tr, _ in pairs:
            tr.close()
        for _, proto in pairs:
            assert await proto.lost is None
        for srv in accepted:
            assert await srv.recorder.lost is None
        assert len(accepted) == 20
        server.close()
        await server.wait_closed()

    run(loop, main())


@pytest.mark.skipif(
    not hasattr(base_events.Server, "close_clients"), reason="Server.close_clients is Python 3.13+"
)
def test_server_close_clients(loop, ends):
    async def main():
        accepted = []
        server = await ends.server(lambda: Echo(loop, accepted))
        pairs = [await ends.connect(lambda: Recorder(loop), server) for _ in range(3)]
        while len(accepted) < 3:
            await asyncio.sleep(0.001)
        server.close()
        server.close_clients()
        for _, proto in pairs:
            await proto.eof
            assert await proto.lost is None
        for srv in accepted:
            assert await srv.recorder.lost is None
        await server.wait_closed()

    run(loop, main())


@pytest.mark.skipif(
    not hasattr(base_events.Server, "abort_clients"), reason="Server.abort_clients is Python 3.13+"
)
def test_server_abort_clients(loop, ends):
    async def main():
        accepted = []
        server = await ends.server(lambda: Echo(loop, accepted))
        pairs = [await ends.connect(lambda: Recorder(loop), server) for _ in range(3)]
        while len(accepted) < 3:
            await asyncio.sleep(0.001)
        server.close()
        server.abort_clients()
        for _, proto in pairs:
            await proto.lost
        for srv in accepted:
            assert await srv.recorder.lost is None
        await server.wait_closed()

    run(loop, main())
