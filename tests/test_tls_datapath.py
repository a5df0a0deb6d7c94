"""TLS data path edge cases (ferroloop's sslproto.py shortens asyncio's): several records per
socket read, a record split across reads, reading paused and resumed, close_notify. Each test
runs on asyncio's loop and on ferroloop's."""

import asyncio
import socket
import ssl

import pytest
from parity_helpers import run

trustme = pytest.importorskip("trustme")

pytestmark = pytest.mark.usefixtures("no_unexpected_loop_errors")


@pytest.fixture(scope="module")
def contexts():
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(client)
    return server, client


class Recorder(asyncio.Protocol):
    """Records every data_received chunk and the end of the connection."""

    def __init__(self, loop):
        self.chunks = []
        self.events = []
        self.transport = None
        self.lost = loop.create_future()
        self.waiters = []

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.chunks.append(bytes(data))
        for want, fut in list(self.waiters):
            if len(self.data) >= want and not fut.done():
                fut.set_result(None)

    @property
    def data(self):
        return b"".join(self.chunks)

    async def until(self, n):
        if len(self.data) < n:
            fut = asyncio.get_running_loop().create_future()
            self.waiters.append((n, fut))
            await fut

    def eof_received(self):
        self.events.append("eof")

    def connection_lost(self, exc):
        self.events.append(("lost", exc))
        if not self.lost.done():
            self.lost.set_result(exc)


async def pair(loop, contexts):
    """A TLS connection over a socket pair: (client transport, client, server transport,
    server)."""
    server_ctx, client_ctx = contexts
    a, b = socket.socketpair()
    server = Recorder(loop)
    client = Recorder(loop)
    (st, _), (ct, _) = await asyncio.gather(
        loop.connect_accepted_socket(lambda: server, b, ssl=server_ctx),
        loop.create_connection(lambda: client, sock=a, ssl=client_ctx, server_hostname="localhost"),
    )
    return ct, client, st, server


def test_many_records_arrive_in_order(loop, contexts):
    # 300 writes without yielding: several TLS records reach the server per socket read.
    async def main():
        ct, _client, _st, server = await pair(loop, contexts)
        expected = b"".join(b"%05d;" % i for i in range(300))
        for i in range(300):
            ct.write(b"%05d;" % i)
        await server.until(len(expected))
        got = server.data
        ct.close()
        await server.lost
        return got == expected, server.events

    ok, events = run(loop, main())
    assert ok
    assert events == ["eof", ("lost", None)]


def test_record_split_across_reads(loop, contexts):
    # A 64 KiB write is 4+ records; the server's reads see partial records.
    async def main():
        ct, client, st, server = await pair(loop, contexts)
        payload = bytes(range(256)) * 256
        ct.write(payload)
        await server.until(len(payload))
        st.write(server.data[::-1])
        await client.until(len(payload))
        ct.close()
        await server.lost
        return server.data == payload and client.data == payload[::-1]

    assert run(loop, main())


def test_small_max_size_leaves_plaintext_in_the_sslobject(loop, contexts):
    # Reads of max_size bytes leave the rest of each record's plaintext inside the
    # SSLObject: all of it still arrives, in order, with no more bytes from the socket.
    async def main():
        ct, _client, st, server = await pair(loop, contexts)
        st._ssl_protocol.max_size = 100
        payload = bytes(range(256)) * 200
        ct.write(payload)
        await server.until(len(payload))
        sizes = {len(c) for c in server.chunks}
        ct.write(b"end")
        await server.until(len(payload) + 3)
        ct.close()
        await server.lost
        return server.data == payload + b"end", max(sizes)

    same, biggest = run(loop, main())
    assert same
    assert biggest >= 100


def test_pause_and_resume_reading(loop, contexts):
    async def main():
        ct, _client, st, server = await pair(loop, contexts)
        st.pause_reading()
        assert not st.is_reading()
        ct.write(b"while paused")
        for _ in range(20):
            await asyncio.sleep(0)
        before = server.data
        st.resume_reading()
        await server.until(len(b"while paused"))
        ct.close()
        await server.lost
        return before, server.data

    before, after = run(loop, main())
    assert before == b""
    assert after == b"while paused"


def test_server_close_sends_close_notify(loop, contexts):
    async def main():
        _ct, client, st, _server = await pair(loop, contexts)
        st.write(b"bye")
        st.close()
        await client.lost
        return client.data, client.events

    data, events = run(loop, main())
    assert data == b"bye"
    assert events == ["eof", ("lost", None)]


def test_large_message_many_records_both_ways(loop, contexts):
    # 1 MiB each way: about 64 records per direction, reads see partial records, and the
    # writer's transport buffers (flow control of the TCP transport under the TLS layer).
    async def main():
        ct, client, st, server = await pair(loop, contexts)
        payload = bytes(range(251)) * (1024 * 1024 // 251)
        ct.write(payload)
        st.write(payload[::-1])
        await server.until(len(payload))
        await client.until(len(payload))
        ct.close()
        await server.lost
        return server.data == payload, client.data == payload[::-1]

    assert run(loop, main()) == (True, True)


class PausingReader(Recorder):
    """Pauses its transport's reading from inside data_received, after the first chunk."""

    def data_received(self, data):
        super().data_received(data)
        if len(self.chunks) == 1:
            self.transport.pause_reading()


def test_app_pauses_reading_inside_data_received(loop, contexts):
    async def main():
        server_ctx, client_ctx = contexts
        a, b = socket.socketpair()
        server = PausingReader(loop)
        client = Recorder(loop)
        (st, _), (ct, _) = await asyncio.gather(
            loop.connect_accepted_socket(lambda: server, b, ssl=server_ctx),
            loop.create_connection(
                lambda: client, sock=a, ssl=client_ctx, server_hostname="localhost"
            ),
        )
        ct.write(b"first")
        await server.until(5)
        ct.write(b"second")
        ct.write(b"third")
        for _ in range(20):
            await asyncio.sleep(0)
        during = (server.data, st.is_reading())
        st.resume_reading()
        await server.until(len(b"firstsecondthird"))
        ct.close()
        await server.lost
        return during, server.data, server.events

    during, data, events = run(loop, main())
    assert during == (b"first", False)
    assert data == b"firstsecondthird"
    assert events == ["eof", ("lost", None)]


class Raising(Recorder):
    def data_received(self, data):
        super().data_received(data)
        raise ZeroDivisionError("boom")


def test_data_received_raising_is_fatal(loop, contexts):
    async def main():
        server_ctx, client_ctx = contexts
        contexts_seen = []
        loop.set_exception_handler(lambda _loop, ctx: contexts_seen.append(ctx))
        a, b = socket.socketpair()
        server = Raising(loop)
        client = Recorder(loop)
        await asyncio.gather(
            loop.connect_accepted_socket(lambda: server, b, ssl=server_ctx),
            loop.create_connection(
                lambda: client, sock=a, ssl=client_ctx, server_hostname="localhost"
            ),
        )
        client.transport.write(b"hello")
        exc = await server.lost
        await client.lost
        loop.set_exception_handler(None)
        return server.data, exc, [(c["message"], type(c.get("exception"))) for c in contexts_seen]

    data, exc, seen = run(loop, main())
    assert data == b"hello"
    assert isinstance(exc, ZeroDivisionError)
    assert seen == [("Fatal error on SSL protocol", ZeroDivisionError)]


def test_client_close_notify_then_eof(loop, contexts):
    # The client's close() sends close_notify: the server sees eof_received, then its
    # transport closes; writes after that are dropped (asyncio counts them).
    async def main():
        ct, client, st, server = await pair(loop, contexts)
        ct.write(b"last words")
        ct.close()
        await server.lost
        st.write(b"too late")
        await client.lost
        return server.data, server.events, client.data, st.is_closing()

    data, events, client_data, closing = run(loop, main())
    assert data == b"last words"
    assert events == ["eof", ("lost", None)]
    assert client_data == b""
    assert closing


class FlowRecorder(Recorder):
    def __init__(self, loop):
        super().__init__(loop)
        self.flow = []

    def pause_writing(self):
        self.flow.append("pause")

    def resume_writing(self):
        self.flow.append("resume")


def test_writes_while_peer_is_slow(loop, contexts):
    # The server stops reading; the client writes until the TLS layer pauses it, then the
    # server resumes and everything arrives in order, and the client is resumed.
    async def main():
        server_ctx, client_ctx = contexts
        a, b = socket.socketpair()
        server = Recorder(loop)
        client = FlowRecorder(loop)
        (st, _), (ct, _) = await asyncio.gather(
            loop.connect_accepted_socket(lambda: server, b, ssl=server_ctx),
            loop.create_connection(
                lambda: client, sock=a, ssl=client_ctx, server_hostname="localhost"
            ),
        )
        ct.set_write_buffer_limits(high=4096, low=1024)
        st.pause_reading()
        block = b"0123456789abcdef" * 1024
        sent = bytearray()
        for _ in range(400):
            if client.flow and client.flow[-1] == "pause":
                break
            ct.write(block)
            sent += block
            await asyncio.sleep(0)
        paused = list(client.flow)
        size_while_paused = ct.get_write_buffer_size()
        st.resume_reading()
        await server.until(len(sent))
        for _ in range(20):
            await asyncio.sleep(0)
        ct.close()
        await server.lost
        return paused, size_while_paused > 0, server.data == bytes(sent), client.flow

    paused, buffered, same, flow = run(loop, main())
    assert paused == ["pause"]
    assert buffered
    assert same
    assert flow == ["pause", "resume"]


def test_writelines_and_bytes_likes(loop, contexts):
    async def main():
        ct, _client, _st, server = await pair(loop, contexts)
        ct.writelines([b"ab", bytearray(b"cd"), memoryview(b"ef"), b""])
        ct.write(memoryview(b"gh"))
        ct.write(bytearray(b"ij"))
        ct.write(b"")
        await server.until(10)
        ct.close()
        await server.lost
        return server.data

    assert run(loop, main()) == b"abcdefghij"


def test_write_type_errors(loop, contexts):
    async def main():
        ct, _client, _st, server = await pair(loop, contexts)
        errors = []
        for bad in ("text", 42, None, [b"a"]):
            try:
                ct.write(bad)
            except TypeError as exc:
                errors.append(str(exc))
        ct.close()
        await server.lost
        return errors

    assert run(loop, main()) == [
        "data: expecting a bytes-like instance, got str",
        "data: expecting a bytes-like instance, got int",
        "data: expecting a bytes-like instance, got NoneType",
        "data: expecting a bytes-like instance, got list",
    ]


def test_write_call_shapes(loop, contexts):
    # The application transport's write (a native method on ferroloop): bound, unbound, by
    # keyword, through super() from a subclass, and wrongly, as asyncio's.
    async def main():
        ct, _client, _st, server = await pair(loop, contexts)
        cls = type(ct)
        ct.write(b"a")
        cls.write(ct, b"b")
        ct.write(data=b"c")
        cls.write(ct, data=bytearray(b"d"))
        errors = []
        for call in (
            lambda: ct.write(),
            lambda: ct.write(b"a", b"b"),
            lambda: ct.write(other=b"a"),
            lambda: cls.write(ct, 1),
        ):
            try:
                call()
            except TypeError as exc:
                errors.append(str(exc))

        class Sub(cls):
            def write(self, data):
                super().write(data.upper())

        ct.__class__ = Sub
        ct.write(b"e")
        ct.__class__ = cls
        await server.until(5)
        ct.close()
        await server.lost
        return server.data, errors

    data, errors = run(loop, main())
    assert data == b"abcdE"
    assert errors == [
        "_SSLProtocolTransport.write() missing 1 required positional argument: 'data'",
        "_SSLProtocolTransport.write() takes 2 positional arguments but 3 were given",
        "_SSLProtocolTransport.write() got an unexpected keyword argument 'other'",
        "data: expecting a bytes-like instance, got int",
    ]


class Upgrader(asyncio.Protocol):
    """Plain until it reads STARTTLS, then upgrades and echoes what it reads over TLS."""

    def __init__(self, loop, ctx):
        self.loop = loop
        self.ctx = ctx
        self.echoed = loop.create_future()
        self.got = bytearray()
        self.upgrading = False
        self.tls = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if not self.upgrading:
            assert data == b"STARTTLS"
            self.upgrading = True
            self.transport.write(b"GO")
            self.loop.create_task(self.upgrade())
            return
        # TLS data can arrive before start_tls() returns the new transport.
        self.got += data
        if self.tls is not None:
            self.tls.write(data)

    async def upgrade(self):
        self.tls = await self.loop.start_tls(self.transport, self, self.ctx, server_side=True)
        if self.got:
            self.tls.write(bytes(self.got))

    def connection_lost(self, exc):
        if not self.echoed.done():
            self.echoed.set_result(bytes(self.got))


def test_start_tls_then_large_traffic(loop, contexts):
    async def main():
        server_ctx, client_ctx = contexts
        a, b = socket.socketpair()
        server = Upgrader(loop, server_ctx)
        client = Recorder(loop)
        (_st, _), (ct, _) = await asyncio.gather(
            loop.connect_accepted_socket(lambda: server, b),
            loop.create_connection(lambda: client, sock=a),
        )
        ct.write(b"STARTTLS")
        await client.until(2)
        client.chunks.clear()
        tls = await loop.start_tls(ct, client, client_ctx, server_hostname="localhost")
        payload = bytes(range(256)) * 1024
        tls.write(payload)
        await client.until(len(payload))
        tls.close()
        await client.lost
        got = await server.echoed
        return client.data == payload, got == payload

    assert run(loop, main()) == (True, True)


class BufferedApp(asyncio.BufferedProtocol):
    def __init__(self, loop):
        self.buf = bytearray(100)
        self.data = bytearray()
        self.lost = loop.create_future()
        self.complete = loop.create_future()
        self.want = 0
        self.eof = False

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        # (a memoryview: asyncio fills the rest of a buffer through a slice of it)
        return memoryview(self.buf)

    def buffer_updated(self, nbytes):
        self.data += self.buf[:nbytes]
        if len(self.data) >= self.want and not self.complete.done():
            self.complete.set_result(None)

    def eof_received(self):
        self.eof = True

    def connection_lost(self, exc):
        self.lost.set_result(exc)


def test_buffered_protocol_app_large_message(loop, contexts):
    # A BufferedProtocol application (asyncio's path) with a buffer smaller than a record.
    async def main():
        server_ctx, client_ctx = contexts
        a, b = socket.socketpair()
        server = BufferedApp(loop)
        client = Recorder(loop)
        await asyncio.gather(
            loop.connect_accepted_socket(lambda: server, b, ssl=server_ctx),
            loop.create_connection(
                lambda: client, sock=a, ssl=client_ctx, server_hostname="localhost"
            ),
        )
        payload = bytes(range(256)) * 300
        server.want = len(payload)
        client.transport.write(payload)
        await server.complete
        client.transport.close()
        exc = await server.lost
        return bytes(server.data) == payload, server.eof, exc

    assert run(loop, main()) == (True, True, None)


def test_start_tls_inside_tls(loop, contexts):
    # start_tls() over a TLS transport (asyncio's _SSLProtocolTransport is start_tls
    # compatible): the inner TLS layer runs over a transport that is not a socket's.
    async def main():
        server_ctx, client_ctx = contexts
        ct, _client, st, _server = await pair(loop, contexts)
        inner_client = Recorder(loop)
        inner_server = Recorder(loop)
        ic, isv = await asyncio.gather(
            loop.start_tls(ct, inner_client, client_ctx, server_hostname="localhost"),
            loop.start_tls(st, inner_server, server_ctx, server_side=True),
        )
        inner_client.transport = ic
        inner_server.transport = isv
        payload = bytes(range(256)) * 200
        ic.write(payload)
        await inner_server.until(len(payload))
        isv.write(b"pong")
        await inner_client.until(4)
        ic.close()
        await inner_server.lost
        await inner_client.lost
        return inner_server.data == payload, inner_client.data, inner_server.events

    assert run(loop, main()) == (True, b"pong", ["eof", ("lost", None)])
