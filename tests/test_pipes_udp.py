"""Pipes and UDP: connect_read_pipe/connect_write_pipe and create_datagram_endpoint.

Read pipes (data, pause/resume, EOF), write pipes (flow control against a full pipe, a
reader that goes away), UDP over IPv4/IPv6/AF_UNIX with asyncio's peer addresses, its
argument rules, and error_received for an ICMP port unreachable. Loopback only; nothing is
timed.
"""

import asyncio
import errno
import os
import socket
import tempfile
from asyncio import selector_events

import pytest
from parity_helpers import WATCHDOG, DatagramRecorder, run, turns

HOST = "127.0.0.1"

# ---------------------------------------------------------------------------------------------
# helpers


pytestmark = pytest.mark.usefixtures("no_unexpected_loop_errors")


def has_ipv6_loopback():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


class ReadRecorder(asyncio.Protocol):
    def __init__(self, loop):
        self.loop = loop
        self.events = []
        self.data = bytearray()
        self.transport = None
        self.waiter = None
        self.want = 0
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport
        self.events.append("made")

    def data_received(self, data):
        assert isinstance(data, bytes)
        if not self.events or self.events[-1] != "data":
            self.events.append("data")
        self.data += data
        if self.waiter is not None and len(self.data) >= self.want and not self.waiter.done():
            self.waiter.set_result(None)

    def eof_received(self):
        self.events.append("eof")

    def connection_lost(self, exc):
        self.events.append(("lost", exc))
        self.lost.set_result(exc)

    async def read(self, n):
        if len(self.data) < n:
            self.want = n
            self.waiter = self.loop.create_future()
            await self.waiter
        return bytes(self.data)


class WriteRecorder(asyncio.Protocol):
    def __init__(self, loop):
        self.loop = loop
        self.events = []
        self.transport = None
        self.paused = loop.create_future()
        self.resumed = loop.create_future()
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport
        self.events.append("made")

    def pause_writing(self):
        self.events.append("pause")
        if not self.paused.done():
            self.paused.set_result(None)

    def resume_writing(self):
        self.events.append("resume")
        if not self.resumed.done():
            self.resumed.set_result(None)

    def connection_lost(self, exc):
        self.events.append(("lost", type(exc) if exc else None))
        self.lost.set_result(exc)


# ---------------------------------------------------------------------------------------------
# read pipes


def test_read_pipe_data_and_eof(loop):
    async def main():
        r, w = os.pipe()
        rfile = os.fdopen(r, "rb", 0)
        tr, proto = await loop.connect_read_pipe(lambda: ReadRecorder(loop), rfile)
        assert isinstance(tr, asyncio.ReadTransport)
        assert tr.get_extra_info("pipe") is rfile
        assert tr.is_reading()
        os.write(w, b"one ")
        await proto.read(4)
        os.write(w, b"two")
        await proto.read(7)
        os.close(w)
        exc = await proto.lost
        assert rfile.closed  # the transport owns (and closed) the pipe
        assert tr.is_closing()
        return bytes(proto.data), proto.events, exc

    assert run(loop, main()) == (b"one two", ["made", "data", "eof", ("lost", None)], None)


def test_read_pipe_pause_resume(loop):
    async def main():
        r, w = os.pipe()
        tr, proto = await loop.connect_read_pipe(lambda: ReadRecorder(loop), os.fdopen(r, "rb", 0))
        tr.pause_reading()
        assert not tr.is_reading()
        tr.pause_reading()  # idempotent
        os.write(w, b"held back")
        await turns()
        held = bytes(proto.data)
        tr.resume_reading()
        assert tr.is_reading()
        tr.resume_reading()  # idempotent
        await proto.read(9)
        os.close(w)
        await proto.lost
        return held, bytes(proto.data)

    assert run(loop, main()) == (b"", b"held back")


def test_read_pipe_close_and_abort(loop):
    async def main():
        result = []
        for how in ("close", "close again"):
            r, w = os.pipe()
            rfile = os.fdopen(r, "rb", 0)
            tr, proto = await loop.connect_read_pipe(lambda: ReadRecorder(loop), rfile)
            tr.close()
            if how == "close again":
                tr.close()  # idempotent
            assert tr.is_closing()
            exc = await proto.lost
            result.append((how, exc, rfile.closed, proto.events))
            os.close(w)
        return result

    assert run(loop, main()) == [
        ("close", None, True, ["made", ("lost", None)]),
        ("close again", None, True, ["made", ("lost", None)]),
    ]


def test_read_pipe_refuses_a_regular_file(loop, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x")

    async def main(f):
        with pytest.raises(ValueError) as info:
            await loop.connect_read_pipe(asyncio.Protocol, f)
        return str(info.value)

    with open(path, "rb") as f:
        assert run(loop, main(f)) == "Pipe transport is for pipes/sockets only."


def test_read_pipe_with_a_socket(loop):
    async def main():
        a, b = socket.socketpair()
        with b:
            _, proto = await loop.connect_read_pipe(lambda: ReadRecorder(loop), a)
            b.sendall(b"sock")
            await proto.read(4)
            b.shutdown(socket.SHUT_WR)
            await proto.lost
            return bytes(proto.data), proto.events

    assert run(loop, main()) == (b"sock", ["made", "data", "eof", ("lost", None)])


# ---------------------------------------------------------------------------------------------
# write pipes


def test_write_pipe_basics(loop):
    async def main():
        r, w = os.pipe()
        wfile = os.fdopen(w, "wb", 0)
        tr, proto = await loop.connect_write_pipe(lambda: WriteRecorder(loop), wfile)
        assert isinstance(tr, asyncio.WriteTransport)
        assert tr.get_extra_info("pipe") is wfile
        assert tr.can_write_eof()
        tr.write(b"abc")
        tr.writelines([b"d", bytearray(b"e"), memoryview(b"f")])
        assert tr.get_write_buffer_size() == 0  # a pipe with room: written at once
        await asyncio.sleep(0)
        got = os.read(r, 100)
        tr.write_eof()
        assert tr.is_closing()
        exc = await proto.lost
        eof = os.read(r, 100)
        os.close(r)
        return got, eof, exc, wfile.closed, proto.events

    assert run(loop, main()) == (b"abcdef", b"", None, True, ["made", ("lost", None)])


def test_write_pipe_write_type_error(loop):
    async def main():
        r, w = os.pipe()
        tr, proto = await loop.connect_write_pipe(
            lambda: WriteRecorder(loop), os.fdopen(w, "wb", 0)
        )
        try:
            # asyncio checks the type with an assert (so: AssertionError, unless -O).
            with pytest.raises((TypeError, AssertionError)):
                tr.write("text")
        finally:
            tr.close()
            await proto.lost
            os.close(r)

    run(loop, main())


def test_write_pipe_flow_control_with_full_pipe(loop):
    async def main():
        r, w = os.pipe()
        os.set_blocking(r, False)
        tr, proto = await loop.connect_write_pipe(
            lambda: WriteRecorder(loop), os.fdopen(w, "wb", 0)
        )
        tr.set_write_buffer_limits(high=64 * 1024, low=16 * 1024)
        assert tr.get_write_buffer_limits() == (16 * 1024, 64 * 1024)
        chunk = b"x" * 65536
        sent = 0
        while not proto.paused.done():
            tr.write(chunk)
            sent += len(chunk)
            await asyncio.sleep(0)
        assert tr.get_write_buffer_size() > 64 * 1024
        assert not proto.resumed.done()
        # Drain the pipe from our side until everything arrived.
        received = 0
        while received < sent:
            try:
                received += len(os.read(r, 1 << 20))
            except BlockingIOError:
                await asyncio.sleep(0)
        await proto.resumed
        size = tr.get_write_buffer_size()
        tr.close()
        await proto.lost
        os.close(r)
        return received == sent, size, proto.events

    ok, size, events = run(loop, main())
    assert ok and size == 0
    assert events == ["made", "pause", "resume", ("lost", None)]


def test_write_pipe_reader_goes_away_while_idle(loop):
    # Nothing buffered: the reader closing its end is noticed and the transport closes
    # quietly (asyncio: connection_lost(None)); later writes are dropped (and counted).
    async def main():
        r, w = os.pipe()
        tr, proto = await loop.connect_write_pipe(
            lambda: WriteRecorder(loop), os.fdopen(w, "wb", 0)
        )
        os.close(r)
        exc = await proto.lost
        tr.write(b"into the void")
        return exc, tr.is_closing(), proto.events

    assert run(loop, main()) == (None, True, ["made", ("lost", None)])


def test_write_pipe_broken_pipe_with_buffered_data(loop):
    # The pipe is full and data is queued: the reader going away is a BrokenPipeError.
    async def main():
        r, w = os.pipe()
        tr, proto = await loop.connect_write_pipe(
            lambda: WriteRecorder(loop), os.fdopen(w, "wb", 0)
        )
        while tr.get_write_buffer_size() == 0:
            tr.write(b"y" * 65536)
        os.close(r)
        exc = await proto.lost
        return type(exc), tr.get_write_buffer_size(), proto.events

    exc_type, size, events = run(loop, main())
    assert exc_type is BrokenPipeError
    assert size == 0
    assert events[0] == "made" and events[-1] == ("lost", BrokenPipeError)


def test_write_pipe_write_after_close_of_reader_in_write_call(loop):
    # The reader is gone before the first write: write() itself hits EPIPE.
    async def main():
        r, w = os.pipe()
        # Close the read end and write in the same turn, before the loop polls again.
        tr, proto = await loop.connect_write_pipe(
            lambda: WriteRecorder(loop), os.fdopen(w, "wb", 0)
        )
        os.close(r)
        tr.write(b"z")
        exc = await proto.lost
        return type(exc) if exc else None, proto.events

    exc_type, events = run(loop, main())
    assert exc_type is BrokenPipeError
    assert events == ["made", ("lost", BrokenPipeError)]


def test_write_pipe_abort_drops_buffer(loop):
    async def main():
        r, w = os.pipe()
        tr, proto = await loop.connect_write_pipe(
            lambda: WriteRecorder(loop), os.fdopen(w, "wb", 0)
        )
        while tr.get_write_buffer_size() == 0:
            tr.write(b"q" * 65536)
        tr.abort()
        exc = await proto.lost
        size = tr.get_write_buffer_size()
        os.close(r)
        return exc, size

    assert run(loop, main()) == (None, 0)


def test_write_pipe_close_flushes(loop):
    async def main():
        r, w = os.pipe()
        os.set_blocking(r, False)
        tr, proto = await loop.connect_write_pipe(
            lambda: WriteRecorder(loop), os.fdopen(w, "wb", 0)
        )
        payload = os.urandom(300 * 1024)  # more than a pipe holds
        tr.write(payload)
        tr.close()
        assert tr.is_closing()
        got = bytearray()
        while True:
            try:
                chunk = os.read(r, 1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0)
                continue
            if not chunk:
                break
            got += chunk
        exc = await proto.lost
        os.close(r)
        return bytes(got) == payload, exc

    assert run(loop, main()) == (True, None)


def test_pipe_pair_between_transports(loop):
    async def main():
        r, w = os.pipe()
        _, rproto = await loop.connect_read_pipe(lambda: ReadRecorder(loop), os.fdopen(r, "rb", 0))
        wtr, wproto = await loop.connect_write_pipe(
            lambda: WriteRecorder(loop), os.fdopen(w, "wb", 0)
        )
        payload = os.urandom(1 << 20)
        wtr.write(payload)
        wtr.write_eof()
        await rproto.lost
        await wproto.lost
        return bytes(rproto.data) == payload, rproto.events[-2:]

    assert run(loop, main()) == (True, ["eof", ("lost", None)])


# ---------------------------------------------------------------------------------------------
# UDP


def test_udp_echo_ipv4(loop):
    async def main():
        str_, server = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(loop, echo=True), local_addr=(HOST, 0)
        )
        server_addr = str_.get_extra_info("sockname")
        ctr, client = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(loop), remote_addr=server_addr
        )
        # asyncio's own datagram transport is a DatagramTransport only from 3.12 on.
        expected = issubclass(selector_events._SelectorDatagramTransport, asyncio.DatagramTransport)
        assert isinstance(ctr, asyncio.DatagramTransport) is expected
        assert isinstance(ctr, asyncio.BaseTransport)
        client_addr = ctr.get_extra_info("sockname")
        assert ctr.get_extra_info("peername") == server_addr
        assert str_.get_extra_info("peername") is None
        ctr.sendto(b"ping")
        reply = await client.got.get()
        ctr.sendto(b"again", server_addr)  # the connected address may be given
        reply2 = await client.got.get()
        assert server.received[0] == (b"ping", client_addr)
        assert ctr.get_write_buffer_size() == 0
        ctr.close()
        str_.close()
        return reply, reply2, await client.lost, await server.lost, server_addr

    reply, reply2, lost_c, lost_s, server_addr = run(loop, main())
    assert reply == (b"PING", server_addr)
    assert reply2 == (b"AGAIN", server_addr)
    assert (lost_c, lost_s) == (None, None)
    assert isinstance(server_addr, tuple) and len(server_addr) == 2


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
def test_udp_ipv6_addresses_are_4_tuples(loop):
    async def main():
        str_, server = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(loop, echo=True), local_addr=("::1", 0)
        )
        server_addr = str_.get_extra_info("sockname")
        ctr, client = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(loop), family=socket.AF_INET6, local_addr=("::1", 0)
        )
        ctr.sendto(b"v6", server_addr[:2])
        reply = await client.got.get()
        client_addr = ctr.get_extra_info("sockname")
        received = server.received[0]
        ctr.close()
        str_.close()
        await client.lost
        await server.lost
        return server_addr, client_addr, reply, received

    server_addr, client_addr, reply, received = run(loop, main())
    assert server_addr == ("::1", server_addr[1], 0, 0)
    assert reply == (b"V6", server_addr)
    assert received == (b"v6", client_addr)
    assert len(client_addr) == 4


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
def test_udp_ipv6_connected(loop):
    async def main():
        str_, server = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(loop, echo=True), local_addr=("::1", 0)
        )
        port = str_.get_extra_info("sockname")[1]
        ctr, client = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(loop), remote_addr=("::1", port)
        )
        peer = ctr.get_extra_info("peername")
        ctr.sendto(b"x")
        reply = await client.got.get()
        ctr.close()
        str_.close()
        await client.lost
        await server.lost
        return peer, reply

    peer, reply = run(loop, main())
    assert peer[:2] == ("::1", peer[1]) and len(peer) == 4
    assert reply == (b"X", peer)


def test_udp_family_and_argument_errors(loop):
    async def main():
        errors = []
        # No address and no family.
        with pytest.raises(ValueError) as info:
            await loop.create_datagram_endpoint(asyncio.DatagramProtocol)
        errors.append(("no addr", str(info.value)))
        # A socket together with addresses.
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            with pytest.raises(ValueError) as info:
                await loop.create_datagram_endpoint(
                    asyncio.DatagramProtocol, sock=sock, local_addr=(HOST, 0)
                )
            errors.append(("sock+addr", str(info.value)))
        finally:
            sock.close()
        # A stream socket.
        sock = socket.socket()
        try:
            with pytest.raises(ValueError) as info:
                await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=sock)
            errors.append(("stream sock", str(info.value).split(" ")[0]))
        finally:
            sock.close()
        # reuse_address=True is refused since 3.8.1 (ValueError; 3.11 dropped the keyword).
        with pytest.raises((TypeError, ValueError)) as info:
            await loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, local_addr=(HOST, 0), reuse_address=True
            )
        errors.append(("reuse_address", "reuse_address" in str(info.value)))
        # Family only: an unbound, unconnected endpoint.
        tr, proto = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(loop), family=socket.AF_INET
        )
        errors.append(("family only", tr.get_extra_info("sockname")[0]))
        tr.close()
        await proto.lost
        return errors

    assert run(loop, main()) == [
        ("no addr", "unexpected address family"),
        (
            "sock+addr",
            (
                "socket modifier keyword arguments can not be used when sock is specified. "
                "(local_addr=('127.0.0.1', 0))"
            ),
        ),
        ("stream sock", "A"),
        ("reuse_address", True),
        ("family only", "0.0.0.0"),
    ]


async def _sendto_rules(lp):
    srv, server = await lp.create_datagram_endpoint(
        lambda: DatagramRecorder(lp), local_addr=(HOST, 0)
    )
    addr = srv.get_extra_info("sockname")
    ctr, client = await lp.create_datagram_endpoint(lambda: DatagramRecorder(lp), remote_addr=addr)
    out = []
    with pytest.raises(ValueError) as info:
        ctr.sendto(b"x", (HOST, addr[1] + 1 if addr[1] < 65535 else 1))
    out.append(str(info.value).replace(str(addr), "ADDR"))
    with pytest.raises(TypeError) as info:
        ctr.sendto("text")
    out.append(type(info.value))
    # An empty datagram: dropped by some Python versions' asyncio, sent by others.
    ctr.sendto(b"")
    ctr.sendto(bytearray(b"ba"))
    ctr.sendto(memoryview(b"mv"))
    got = []
    while not got or got[-1] != b"mv":
        got.append((await server.got.get())[0])
    ctr.close()
    ctr.sendto(b"after close")  # dropped silently (and counted)
    srv.close()
    await client.lost
    await server.lost
    return out, got


def test_udp_sendto_rules(loop):
    # The reference: the same steps on a stock asyncio loop of this Python.
    ref = asyncio.DefaultEventLoopPolicy().new_event_loop()
    try:
        expected = ref.run_until_complete(asyncio.wait_for(_sendto_rules(ref), WATCHDOG))
    finally:
        ref.close()
    out, got = run(loop, _sendto_rules(loop))
    assert out[0] == "Invalid address: must be None or ADDR"
    assert out[1] is TypeError
    assert got[-2:] == [b"ba", b"mv"]
    assert (out, got) == expected


def test_udp_error_received_port_unreachable(loop):
    # A connected UDP socket gets ECONNREFUSED for the ICMP port unreachable that answers
    # a datagram to a closed port; asyncio hands it to error_received.
    async def main():
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind((HOST, 0))
        closed_addr = probe.getsockname()
        probe.close()
        tr, proto = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(loop), remote_addr=closed_addr
        )
        tr.sendto(b"anyone there?")
        exc = await proto.error
        assert not tr.is_closing()  # an error_received does not close the endpoint
        tr.close()
        await proto.lost
        return exc

    exc = run(loop, main())
    assert isinstance(exc, ConnectionRefusedError)
    assert exc.errno == errno.ECONNREFUSED


def test_udp_reuse_port(loop):
    if not hasattr(socket, "SO_REUSEPORT"):
        pytest.skip("no SO_REUSEPORT")

    async def main():
        tr1, p1 = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(loop), local_addr=(HOST, 0), reuse_port=True
        )
        addr = tr1.get_extra_info("sockname")
        tr2, p2 = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(loop), local_addr=addr, reuse_port=True
        )
        opts = [
            t.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) != 0
            for t in (tr1, tr2)
        ]
        same = tr2.get_extra_info("sockname") == addr
        # Without reuse_port the port is busy.
        with pytest.raises(OSError) as info:
            await loop.create_datagram_endpoint(lambda: DatagramRecorder(loop), local_addr=addr)
        busy = info.value.errno
        for t, p in ((tr1, p1), (tr2, p2)):
            t.close()
            await p.lost
        return opts, same, busy

    assert run(loop, main()) == ([True, True], True, errno.EADDRINUSE)


def test_udp_allow_broadcast(loop):
    async def main():
        result = []
        for allow in (False, True):
            tr, p = await loop.create_datagram_endpoint(
                lambda: DatagramRecorder(loop), local_addr=(HOST, 0), allow_broadcast=allow
            )
            sock = tr.get_extra_info("socket")
            result.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST) != 0)
            tr.close()
            await p.lost
        return result

    assert run(loop, main()) == [False, True]


def test_udp_existing_socket(loop):
    async def main():
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((HOST, 0))
        addr = sock.getsockname()
        tr, proto = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(loop, echo=True), sock=sock
        )
        assert not sock.getblocking()  # asyncio made it non-blocking
        assert tr.get_extra_info("sockname") == addr
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.bind((HOST, 0))
            peer.setblocking(False)
            peer.sendto(b"via sock=", addr)
            got = await proto.got.get()
            reply = await loop.sock_recv(peer, 100)
            peer_addr = peer.getsockname()
        tr.close()
        await proto.lost
        return got, peer_addr, reply, sock.fileno()

    got, peer_addr, reply, fileno = run(loop, main())
    assert got == (b"via sock=", peer_addr)
    assert reply == b"VIA SOCK="
    assert fileno == -1  # the transport closed the socket it was given


def test_udp_unix_datagram(loop):
    async def main():
        with tempfile.TemporaryDirectory() as d:
            spath = os.path.join(d, "server.sock")
            cpath = os.path.join(d, "client.sock")
            str_, server = await loop.create_datagram_endpoint(
                lambda: DatagramRecorder(loop, echo=True), local_addr=spath, family=socket.AF_UNIX
            )
            ctr, client = await loop.create_datagram_endpoint(
                lambda: DatagramRecorder(loop),
                local_addr=cpath,
                remote_addr=spath,
                family=socket.AF_UNIX,
            )
            ctr.sendto(b"unix dgram")
            reply = await client.got.get()
            received = server.received[0]
            info = (
                str_.get_extra_info("sockname"),
                ctr.get_extra_info("sockname"),
                ctr.get_extra_info("peername"),
            )
            # An unbound sender: the server sees its (empty) address as asyncio gives it.
            utr, unbound = await loop.create_datagram_endpoint(
                lambda: DatagramRecorder(loop), remote_addr=spath, family=socket.AF_UNIX
            )
            utr.sendto(b"anon")
            while len(server.received) < 2:
                await asyncio.sleep(0)
            anon = server.received[1]
            for t, p in ((ctr, client), (utr, unbound), (str_, server)):
                t.close()
                await p.lost
            return spath, cpath, reply, received, info, anon

    spath, cpath, reply, received, info, anon = run(loop, main())
    assert reply == (b"UNIX DGRAM", spath)
    assert received == (b"unix dgram", cpath)
    assert info == (spath, cpath, spath)
    assert anon[0] == b"anon"
    assert anon[1] in (None, "", b"")


def test_udp_unix_datagram_existing_path(loop):
    # asyncio removes a stale socket file at local_addr before binding.
    async def main():
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "stale.sock")
            stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            stale.bind(path)
            stale.close()
            try:
                tr, p = await loop.create_datagram_endpoint(
                    lambda: DatagramRecorder(loop), local_addr=path, family=socket.AF_UNIX
                )
            except OSError as exc:
                return "refused", exc.errno
            tr.close()
            await p.lost
            return "bound", None

    assert run(loop, main()) == ("bound", None)


def test_udp_pause_protocol_flow_control_api(loop):
    async def main():
        tr, p = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(loop), local_addr=(HOST, 0)
        )
        limits = tr.get_write_buffer_limits() if hasattr(tr, "get_write_buffer_limits") else None
        tr.set_write_buffer_limits(high=1024, low=128)
        new_limits = tr.get_write_buffer_limits()
        tr.abort()
        exc = await p.lost
        return limits, new_limits, exc, tr.is_closing()

    limits, new_limits, exc, closing = run(loop, main())
    assert limits == (16 * 1024, 64 * 1024)
    assert new_limits == (128, 1024)
    assert (exc, closing) == (None, True)


def test_read_pipe_eof_while_paused(loop):
    # The writer goes away while reading is paused: nothing happens until resume_reading,
    # then the data and the EOF arrive in order.
    async def main():
        r, w = os.pipe()
        tr, proto = await loop.connect_read_pipe(lambda: ReadRecorder(loop), os.fdopen(r, "rb", 0))
        tr.pause_reading()
        os.write(w, b"last words")
        os.close(w)
        await turns()
        before = list(proto.events)
        tr.resume_reading()
        await proto.lost
        return before, proto.events, bytes(proto.data)

    assert run(loop, main()) == (
        ["made"],
        ["made", "data", "eof", ("lost", None)],
        b"last words",
    )


def test_write_pipe_reader_goes_away_while_paused(loop):
    # The transport is paused (its buffer over the high-water mark) when the reader closes.
    async def main():
        r, w = os.pipe()
        tr, proto = await loop.connect_write_pipe(
            lambda: WriteRecorder(loop), os.fdopen(w, "wb", 0)
        )
        tr.set_write_buffer_limits(high=1024)
        while not proto.paused.done():
            tr.write(b"p" * 65536)
            await asyncio.sleep(0)
        os.close(r)
        exc = await proto.lost
        return type(exc), proto.events

    exc_type, events = run(loop, main())
    assert exc_type is BrokenPipeError
    assert events == ["made", "pause", ("lost", BrokenPipeError)]


def test_udp_many_datagrams_in_order_with_sizes(loop):
    # Datagram boundaries and contents survive (one bytes per datagram, reused buffers
    # must never alias between deliveries).
    sizes = [0, 1, 7, 1400, 9000, 65507, 3]

    async def main():
        srv, server = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(loop), local_addr=(HOST, 0)
        )
        addr = srv.get_extra_info("sockname")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            peer.bind((HOST, 0))
            for i, n in enumerate(sizes):
                peer.sendto(bytes([i]) * n, addr)
            got = [await server.got.get() for _ in sizes]
            peer_addr = peer.getsockname()
        srv.close()
        await server.lost
        return got, peer_addr

    got, peer_addr = run(loop, main())
    assert [d for d, _ in got] == [bytes([i]) * n for i, n in enumerate(sizes)]
    assert all(a == peer_addr for _, a in got)
    assert all(type(d) is bytes for d, _ in got)
