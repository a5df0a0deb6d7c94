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
