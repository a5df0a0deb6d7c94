"""TLS: ssl= on connections and servers, start_tls, streams over TLS, on asyncio and ferroloop.

Every certificate is made at test time (trustme: a throwaway CA, a server certificate for
"localhost" and 127.0.0.1, a client certificate). Loopback only; nothing is timed: the
handshake and shutdown timeouts are short only so that the tests are fast.
"""

import asyncio
import gc
import os
import socket
import ssl
import tempfile

import pytest
from parity_helpers import run

trustme = pytest.importorskip("trustme")

from cryptography.hazmat.primitives import serialization  # trustme depends on cryptography

HOST = "127.0.0.1"
PASSWORD = b"s3cret"

# ---------------------------------------------------------------------------------------------
# helpers


pytestmark = pytest.mark.usefixtures("no_unexpected_loop_errors")


class Certs:
    """A CA, a server certificate and a client certificate, made once per module."""

    def __init__(self):
        self.ca = trustme.CA()
        self.server = self.ca.issue_cert("localhost", "127.0.0.1")
        self.client = self.ca.issue_cert("client.example.org")
        self.other_ca = trustme.CA()  # trusts nothing above

    def server_ctx(self, *, require_client_cert=False):
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server.configure_cert(ctx)
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            self.ca.configure_trust(ctx)
        return ctx

    def client_ctx(self, *, with_cert=False, ca=None):
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        (ca or self.ca).configure_trust(ctx)
        if with_cert:
            self.client.configure_cert(ctx)
        return ctx


@pytest.fixture(scope="module")
def certs():
    return Certs()


class Echo(asyncio.Protocol):
    """Server side: echoes what it gets; records the transport and how it ended."""

    def __init__(self, loop, log=None):
        self.loop = loop
        self.log = log
        self.transport = None
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport
        if self.log is not None:
            self.log.append(self)

    def data_received(self, data):
        self.transport.write(data)

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)


class Client(asyncio.Protocol):
    """Client side: collects data; futures for the interesting moments."""

    def __init__(self, loop):
        self.loop = loop
        self.transport = None
        self.data = bytearray()
        self.want = None
        self.waiter = None
        self.eof = loop.create_future()
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.data += data
        if self.waiter is not None and len(self.data) >= self.want and not self.waiter.done():
            self.waiter.set_result(bytes(self.data))

    def eof_received(self):
        if not self.eof.done():
            self.eof.set_result(None)

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)

    async def read(self, n):
        if len(self.data) >= n:
            return bytes(self.data)
        self.want = n
        self.waiter = self.loop.create_future()
        return await self.waiter


async def echo_server(loop, ctx, log=None, **kw):
    return await loop.create_server(lambda: Echo(loop, log), HOST, 0, ssl=ctx, **kw)


def port_of(server):
    return server.sockets[0].getsockname()[1]


async def close_server(server):
    server.close()
    await server.wait_closed()


async def close_client(client):
    client.transport.close()
    await client.lost


# ---------------------------------------------------------------------------------------------
# create_connection / create_server


def test_tcp_echo_and_extra_info(loop, certs):
    async def main():
        servers = []
        server = await echo_server(loop, certs.server_ctx(), servers)
        cctx = certs.client_ctx()
        tr, client = await loop.create_connection(
            lambda: Client(loop), HOST, port_of(server), ssl=cctx, server_hostname="localhost"
        )
        assert isinstance(tr, asyncio.Transport)
        tr.write(b"hello tls")
        assert await client.read(9) == b"hello tls"

        sslobj = tr.get_extra_info("ssl_object")
        assert isinstance(sslobj, ssl.SSLObject)
        assert sslobj.server_hostname == "localhost"
        assert tr.get_extra_info("sslcontext") is cctx
        peercert = tr.get_extra_info("peercert")
        assert peercert == sslobj.getpeercert()
        assert ("DNS", "localhost") in peercert["subjectAltName"]
        cipher = tr.get_extra_info("cipher")
        assert cipher == sslobj.cipher() and isinstance(cipher, tuple) and len(cipher) == 3
        assert tr.get_extra_info("compression") == sslobj.compression()
        assert tr.get_extra_info("peername") == (HOST, port_of(server))
        assert isinstance(
            tr.get_extra_info("socket"), (socket.socket, asyncio.trsock.TransportSocket)
        )
        assert tr.get_extra_info("nonexistent", "dflt") == "dflt"

        # The server side sees the same connection from the other end.
        (srv,) = servers
        assert srv.transport.get_extra_info("peercert") is None  # no client certificate
        assert isinstance(srv.transport.get_extra_info("ssl_object"), ssl.SSLObject)
        assert srv.transport.get_extra_info("ssl_object").server_side
        assert srv.transport.get_extra_info("cipher") == cipher

        await close_client(client)
        assert await srv.lost is None
        await close_server(server)
        return client.lost.result()

    assert run(loop, main()) is None


def test_large_payload_both_ways(loop, certs):
    payload = os.urandom(512 * 1024)

    async def main():
        server = await echo_server(loop, certs.server_ctx())
        tr, client = await loop.create_connection(
            lambda: Client(loop),
            HOST,
            port_of(server),
            ssl=certs.client_ctx(),
            server_hostname="localhost",
        )
        tr.write(payload)
        got = await client.read(len(payload))
        await close_client(client)
        await close_server(server)
        return got

    assert run(loop, main()) == payload


def test_unix_connection_and_server(loop, certs):
    async def main():
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "tls.sock")
            servers = []
            server = await loop.create_unix_server(
                lambda: Echo(loop, servers), path, ssl=certs.server_ctx()
            )
            tr, client = await loop.create_unix_connection(
                lambda: Client(loop), path, ssl=certs.client_ctx(), server_hostname="localhost"
            )
            tr.write(b"over a unix socket")
            got = await client.read(18)
            assert isinstance(tr.get_extra_info("ssl_object"), ssl.SSLObject)
            assert tr.get_extra_info("peername") == path
            await close_client(client)
            assert await servers[0].lost is None
            await close_server(server)
            return got

    assert run(loop, main()) == b"over a unix socket"


def test_unix_connection_ssl_requires_server_hostname(loop, certs):
    async def main():
        with pytest.raises(ValueError, match="server_hostname"):
            await loop.create_unix_connection(
                asyncio.Protocol, "/nonexistent.sock", ssl=certs.client_ctx()
            )

    run(loop, main())


def test_ssl_true_uses_default_context_and_fails_verification(loop, certs):
    # ssl=True: asyncio makes a default context (system trust store), which does not trust
    # the throwaway CA.
    async def main():
        server = await echo_server(loop, certs.server_ctx())
        try:
            with pytest.raises(ssl.SSLCertVerificationError):
                await loop.create_connection(
                    asyncio.Protocol, HOST, port_of(server), ssl=True, server_hostname="localhost"
                )
        finally:
            await close_server(server)

    run(loop, main())


def test_argument_errors_without_ssl(loop):
    async def main():
        errors = []
        for kw in (
            {"server_hostname": "localhost"},
            {"ssl_handshake_timeout": 1.0},
            {"ssl_shutdown_timeout": 1.0},
        ):
            with pytest.raises(ValueError) as info:
                await loop.create_connection(asyncio.Protocol, HOST, 1, **kw)
            errors.append(str(info.value))
        for kw in ({"ssl_handshake_timeout": 1.0}, {"ssl_shutdown_timeout": 1.0}):
            with pytest.raises(ValueError) as info:
                await loop.create_server(asyncio.Protocol, HOST, 0, **kw)
            errors.append(str(info.value))
        return errors

    assert run(loop, main()) == [
        "server_hostname is only meaningful with ssl",
        "ssl_handshake_timeout is only meaningful with ssl",
        "ssl_shutdown_timeout is only meaningful with ssl",
        "ssl_handshake_timeout is only meaningful with ssl",
        "ssl_shutdown_timeout is only meaningful with ssl",
    ]


@pytest.mark.parametrize("kw", ["ssl_handshake_timeout", "ssl_shutdown_timeout"])
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_timeouts_refused(loop, certs, kw, value):
    async def main():
        server = await echo_server(loop, certs.server_ctx())
        try:
            with pytest.raises(ValueError) as info:
                await loop.create_connection(
                    asyncio.Protocol,
                    HOST,
                    port_of(server),
                    ssl=certs.client_ctx(),
                    server_hostname="localhost",
                    **{kw: value},
                )
            return str(info.value)
        finally:
            # The refused connection's socket is only referenced from the ValueError's
            # traceback (asyncio's create_connection does not close it): collect it, so the
            # server's connection ends and wait_closed (3.12+: waits for connections) returns.
            info = None
            gc.collect()
            await close_server(server)

    assert run(loop, main()) == f"{kw} should be a positive number, got {value}"


# ---------------------------------------------------------------------------------------------
# SNI, ALPN, client certificates, encrypted keys


def test_sni_callback_sees_server_hostname(loop, certs):
    seen = []

    def sni(sslobj, name, ctx):
        seen.append((type(sslobj).__name__, name))

    async def main():
        sctx = certs.server_ctx()
        sctx.sni_callback = sni
        server = await echo_server(loop, sctx)
        tr, client = await loop.create_connection(
            lambda: Client(loop),
            HOST,
            port_of(server),
            ssl=certs.client_ctx(),
            server_hostname="localhost",
        )
        tr.write(b"x")
        await client.read(1)
        await close_client(client)
        await close_server(server)

    run(loop, main())
    assert seen == [("SSLObject", "localhost")]


def test_sni_callback_switches_context(loop, certs):
    # The callback may hand the connection another context (here: one whose certificate
    # names "other.example"), as a virtual-hosting server does.
    other_cert = certs.ca.issue_cert("other.example")
    other_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    other_cert.configure_cert(other_ctx)

    def sni(sslobj, name, ctx):
        if name == "other.example":
            sslobj.context = other_ctx

    async def main():
        sctx = certs.server_ctx()
        sctx.sni_callback = sni
        server = await echo_server(loop, sctx)
        result = []
        for name in ("localhost", "other.example"):
            tr, client = await loop.create_connection(
                lambda: Client(loop),
                HOST,
                port_of(server),
                ssl=certs.client_ctx(),
                server_hostname=name,
            )
            san = tr.get_extra_info("peercert")["subjectAltName"]
            result.append((name, san[0]))
            await close_client(client)
        await close_server(server)
        return result

    assert run(loop, main()) == [
        ("localhost", ("DNS", "localhost")),
        ("other.example", ("DNS", "other.example")),
    ]


@pytest.mark.skipif(not ssl.HAS_ALPN, reason="no ALPN in this OpenSSL")
def test_alpn(loop, certs):
    async def main():
        servers = []
        sctx = certs.server_ctx()
        sctx.set_alpn_protocols(["h2", "http/1.1"])
        server = await echo_server(loop, sctx, servers)
        result = []
        for offer in (["http/1.1"], ["h2", "http/1.1"], None):
            cctx = certs.client_ctx()
            if offer is not None:
                cctx.set_alpn_protocols(offer)
            tr, client = await loop.create_connection(
                lambda: Client(loop),
                HOST,
                port_of(server),
                ssl=cctx,
                server_hostname="localhost",
            )
            tr.write(b"x")
            await client.read(1)
            client_side = tr.get_extra_info("ssl_object").selected_alpn_protocol()
            server_side = servers[-1].transport.get_extra_info("ssl_object")
            result.append((client_side, server_side.selected_alpn_protocol()))
            await close_client(client)
        await close_server(server)
        return result

    assert run(loop, main()) == [("http/1.1", "http/1.1"), ("h2", "h2"), (None, None)]


def test_client_certificate_required_and_given(loop, certs):
    async def main():
        servers = []
        server = await echo_server(loop, certs.server_ctx(require_client_cert=True), servers)
        tr, client = await loop.create_connection(
            lambda: Client(loop),
            HOST,
            port_of(server),
            ssl=certs.client_ctx(with_cert=True),
            server_hostname="localhost",
        )
        tr.write(b"hi")
        await client.read(2)
        peer = servers[0].transport.get_extra_info("peercert")
        await close_client(client)
        await close_server(server)
        return peer["subjectAltName"]

    assert run(loop, main()) == (("DNS", "client.example.org"),)


def test_client_certificate_required_and_missing(loop, certs):
    # TLS 1.2, so that the client learns of the refusal during its handshake.
    async def main():
        server = await echo_server(loop, certs.server_ctx(require_client_cert=True))
        cctx = certs.client_ctx()
        cctx.maximum_version = ssl.TLSVersion.TLSv1_2
        try:
            with pytest.raises(OSError) as info:
                await loop.create_connection(
                    asyncio.Protocol,
                    HOST,
                    port_of(server),
                    ssl=cctx,
                    server_hostname="localhost",
                )
            return type(info.value)
        finally:
            await close_server(server)

    # asyncio's server aborts (without flushing its alert), so the client sees the
    # connection go away.
    assert run(loop, main()) is ConnectionResetError


def test_client_certificate_required_and_missing_tls13(loop, certs):
    # TLS 1.3: the client's handshake completes; the server's refusal arrives afterwards,
    # and the client's connection is lost with the server's alert.
    async def main():
        server = await echo_server(loop, certs.server_ctx(require_client_cert=True))
        cctx = certs.client_ctx()
        cctx.minimum_version = ssl.TLSVersion.TLSv1_3
        _, client = await loop.create_connection(
            lambda: Client(loop), HOST, port_of(server), ssl=cctx, server_hostname="localhost"
        )
        exc = await client.lost
        await close_server(server)
        return exc

    # asyncio's server aborts without flushing its alert: the client sees EOF (or a reset).
    exc = run(loop, main())
    assert exc is None or isinstance(exc, (ssl.SSLError, ConnectionResetError)), exc


def test_encrypted_private_key(loop, certs, tmp_path):
    key = serialization.load_pem_private_key(certs.server.private_key_pem.bytes(), None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(PASSWORD),
    )
    keyfile = tmp_path / "key.pem"
    keyfile.write_bytes(encrypted)
    certfile = tmp_path / "chain.pem"
    certfile.write_bytes(b"".join(blob.bytes() for blob in certs.server.cert_chain_pems))

    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with pytest.raises(ssl.SSLError):
        sctx.load_cert_chain(str(certfile), str(keyfile), password=b"wrong")
    sctx.load_cert_chain(str(certfile), str(keyfile), password=lambda: PASSWORD)

    async def main():
        server = await echo_server(loop, sctx)
        tr, client = await loop.create_connection(
            lambda: Client(loop),
            HOST,
            port_of(server),
            ssl=certs.client_ctx(),
            server_hostname="localhost",
        )
        tr.write(b"locked")
        got = await client.read(6)
        await close_client(client)
        await close_server(server)
        return got

    assert run(loop, main()) == b"locked"


# ---------------------------------------------------------------------------------------------
# failures: bad certificates, timeouts, a peer that goes away


@pytest.mark.parametrize("case", ["untrusted_ca", "wrong_hostname"])
def test_bad_certificate(loop, certs, case):
    async def main():
        servers = []
        server = await echo_server(loop, certs.server_ctx(), servers)
        if case == "untrusted_ca":
            cctx, name = certs.client_ctx(ca=certs.other_ca), "localhost"
        else:
            cctx, name = certs.client_ctx(), "wrong.example"
        try:
            with pytest.raises(ssl.SSLCertVerificationError) as info:
                await loop.create_connection(
                    asyncio.Protocol, HOST, port_of(server), ssl=cctx, server_hostname=name
                )
            exc = info.value
            # The server's side of the failed handshake ends without an app connection.
            await asyncio.sleep(0)
            return type(exc), exc.verify_code, servers
        finally:
            await close_server(server)

    exc_type, code, servers = run(loop, main())
    assert exc_type is ssl.SSLCertVerificationError
    expected = {"untrusted_ca": 20, "wrong_hostname": 62}[case]  # X509_V_ERR_*
    assert code == expected
    assert servers == []


def test_bad_certificate_streams(loop, certs):
    async def main():
        server = await asyncio.start_server(lambda r, w: w.close(), HOST, 0, ssl=certs.server_ctx())
        try:
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.open_connection(
                    HOST,
                    port_of(server),
                    ssl=certs.client_ctx(ca=certs.other_ca),
                    server_hostname="localhost",
                )
        finally:
            await close_server(server)

    run(loop, main())


def _silent_listener():
    """A plain TCP listener whose accepted peers never speak (nor close)."""
    lsock = socket.socket()
    lsock.bind((HOST, 0))
    lsock.listen(8)
    lsock.setblocking(False)
    return lsock


def test_client_handshake_timeout(loop, certs):
    async def main():
        lsock = _silent_listener()
        accepted = []
        try:
            loop.add_reader(lsock.fileno(), lambda: accepted.append(lsock.accept()[0]))
            with pytest.raises(ConnectionAbortedError) as info:
                await loop.create_connection(
                    asyncio.Protocol,
                    *lsock.getsockname(),
                    ssl=certs.client_ctx(),
                    server_hostname="localhost",
                    ssl_handshake_timeout=0.1,
                )
            return str(info.value)
        finally:
            loop.remove_reader(lsock.fileno())
            lsock.close()
            for s in accepted:
                s.close()

    assert run(loop, main()) == (
        "SSL handshake is taking longer than 0.1 seconds: aborting the connection"
    )


def test_server_handshake_timeout(loop, certs):
    # A plain client that connects to a TLS server and never speaks: the server aborts it.
    async def main():
        servers = []
        server = await echo_server(loop, certs.server_ctx(), servers, ssl_handshake_timeout=0.1)
        try:
            reader, writer = await asyncio.open_connection(HOST, port_of(server))
            data = await reader.read()  # EOF (or reset) once the server gives up
            writer.close()
            return data, servers
        except ConnectionResetError:
            return b"reset", servers
        finally:
            await close_server(server)

    data, servers = run(loop, main())
    assert data in (b"", b"reset")
    assert servers == []


def test_streams_handshake_timeout(loop, certs):
    async def main():
        lsock = _silent_listener()
        accepted = []
        try:
            loop.add_reader(lsock.fileno(), lambda: accepted.append(lsock.accept()[0]))
            with pytest.raises(ConnectionAbortedError):
                await asyncio.open_connection(
                    *lsock.getsockname(),
                    ssl=certs.client_ctx(),
                    server_hostname="localhost",
                    ssl_handshake_timeout=0.1,
                )
        finally:
            loop.remove_reader(lsock.fileno())
            lsock.close()
            for s in accepted:
                s.close()

    run(loop, main())


@pytest.mark.parametrize("how", ["close", "reset", "garbage"])
def test_peer_closes_mid_handshake(loop, certs, how):
    # The server accepts, reads the ClientHello, then goes away (or answers nonsense).
    async def main():
        lsock = _silent_listener()

        def on_accept():
            conn, _ = lsock.accept()
            conn.setblocking(False)

            def on_hello():
                loop.remove_reader(conn.fileno())
                try:
                    conn.recv(65536)
                except BlockingIOError:
                    pass
                if how == "reset":
                    conn.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
                elif how == "garbage":
                    conn.send(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                conn.close()

            loop.add_reader(conn.fileno(), on_hello)

        loop.add_reader(lsock.fileno(), on_accept)
        try:
            with pytest.raises(Exception) as info:
                await loop.create_connection(
                    asyncio.Protocol,
                    *lsock.getsockname(),
                    ssl=certs.client_ctx(),
                    server_hostname="localhost",
                )
            return info.type
        finally:
            loop.remove_reader(lsock.fileno())
            lsock.close()

    got = run(loop, main())
    expected = {
        "close": ConnectionResetError,
        "reset": ConnectionResetError,
        "garbage": ssl.SSLError,
    }[how]
    assert got is expected


def test_peer_closes_mid_handshake_server_side(loop, certs):
    # A client sends half a ClientHello's worth of bytes and closes: the TLS server drops it
    # without an app-level connection and without reporting an error.
    async def main():
        servers = []
        server = await echo_server(loop, certs.server_ctx(), servers)
        try:
            for payload in (b"", b"\x16\x03\x01\x02\x00\x01"):
                _, writer = await asyncio.open_connection(HOST, port_of(server))
                if payload:
                    writer.write(payload)
                writer.close()
                await writer.wait_closed()
            # A full, working connection afterwards: the server is unharmed.
            tr, client = await loop.create_connection(
                lambda: Client(loop),
                HOST,
                port_of(server),
                ssl=certs.client_ctx(),
                server_hostname="localhost",
            )
            tr.write(b"ok")
            got = await client.read(2)
            await close_client(client)
            return got, len(servers)
        finally:
            await close_server(server)

    assert run(loop, main()) == (b"ok", 1)


def test_shutdown_timeout(loop, certs):
    # The server stops reading, so it never answers the client's close_notify: after
    # ssl_shutdown_timeout the client's connection is dropped with TimeoutError.
    async def main():
        servers = []
        server = await echo_server(loop, certs.server_ctx(), servers)
        tr, client = await loop.create_connection(
            lambda: Client(loop),
            HOST,
            port_of(server),
            ssl=certs.client_ctx(),
            server_hostname="localhost",
            ssl_shutdown_timeout=0.1,
        )
        tr.write(b"x")
        await client.read(1)
        servers[0].transport.pause_reading()
        tr.close()
        assert tr.is_closing()
        exc = await client.lost
        servers[0].transport.abort()
        await close_server(server)
        return exc

    exc = run(loop, main())
    assert isinstance(exc, TimeoutError)
    assert str(exc) == "SSL shutdown timed out"


def test_shutdown_is_clean_both_ways(loop, certs):
    # A normal close: the server sees eof, then connection_lost(None) on both ends.
    async def main():
        servers = []
        server = await echo_server(loop, certs.server_ctx(), servers)
        tr, client = await loop.create_connection(
            lambda: Client(loop),
            HOST,
            port_of(server),
            ssl=certs.client_ctx(),
            server_hostname="localhost",
            ssl_shutdown_timeout=5.0,
        )
        tr.write(b"x")
        await client.read(1)
        servers[0].transport.close()  # the server closes first this time
        await client.eof
        lost = await client.lost
        srv_lost = await servers[0].lost
        await close_server(server)
        return lost, srv_lost, tr.is_closing()

    assert run(loop, main()) == (None, None, True)


# ---------------------------------------------------------------------------------------------
# start_tls and streams


class StartTlsServer(asyncio.Protocol):
    """A plain server that upgrades to TLS when the client says STARTTLS."""

    def __init__(self, loop, ctx, done):
        self.loop = loop
        self.ctx = ctx
        self.done = done
        self.transport = None
        self.buf = bytearray()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        if self.buf == b"STARTTLS\n":
            self.buf.clear()
            self.transport.write(b"GO\n")
            self.loop.create_task(self.upgrade())

    async def upgrade(self):
        try:
            new = await self.loop.start_tls(self.transport, self, self.ctx, server_side=True)
        except Exception as exc:  # noqa: BLE001 (reported through the future)
            self.done.set_exception(exc)
            return
        self.transport = new
        self.done.set_result(new)


def test_start_tls_upgrade(loop, certs):
    async def main():
        done = loop.create_future()
        server = await loop.create_server(
            lambda: StartTlsServer(loop, certs.server_ctx(), done), HOST, 0
        )
        client = Client(loop)
        tr, _ = await loop.create_connection(lambda: client, HOST, port_of(server))
        assert tr.get_extra_info("ssl_object") is None
        tr.write(b"STARTTLS\n")
        assert await client.read(3) == b"GO\n"
        client.data.clear()
        tls_tr = await loop.start_tls(tr, client, certs.client_ctx(), server_hostname="localhost")
        srv_tr = await done
        assert isinstance(tls_tr.get_extra_info("ssl_object"), ssl.SSLObject)
        assert isinstance(srv_tr.get_extra_info("ssl_object"), ssl.SSLObject)
        assert tls_tr.get_protocol() is client
        # The old plain transport now belongs to the TLS layer.
        assert tr.get_protocol() is not client

        # Echo over the upgraded connection (the server protocol echoes post-upgrade).
        class EchoAfter(Echo):
            pass

        srv_proto = EchoAfter(loop)
        srv_proto.transport = srv_tr
        srv_tr.set_protocol(srv_proto)
        tls_tr.write(b"secret")
        got = await client.read(6)
        tls_tr.close()
        await client.lost
        await srv_proto.lost
        await close_server(server)
        return got

    assert run(loop, main()) == b"secret"


def test_start_tls_argument_errors(loop, certs):
    async def main():
        server = await loop.create_server(asyncio.Protocol, HOST, 0)
        tr, proto = await loop.create_connection(asyncio.Protocol, HOST, port_of(server))
        try:
            with pytest.raises(TypeError, match="sslcontext is expected to be an instance"):
                await loop.start_tls(tr, proto, None)
            with pytest.raises(TypeError, match="is not supported by start_tls"):
                await loop.start_tls(object(), proto, certs.client_ctx())
        finally:
            tr.close()
            await close_server(server)

    run(loop, main())


def test_start_tls_handshake_fails(loop, certs):
    async def main():
        done = loop.create_future()
        server = await loop.create_server(
            lambda: StartTlsServer(loop, certs.server_ctx(), done), HOST, 0
        )
        client = Client(loop)
        tr, _ = await loop.create_connection(lambda: client, HOST, port_of(server))
        tr.write(b"STARTTLS\n")
        await client.read(3)
        try:
            with pytest.raises(ssl.SSLCertVerificationError):
                await loop.start_tls(
                    tr, client, certs.client_ctx(ca=certs.other_ca), server_hostname="localhost"
                )
            # The client aborts after its failed verification: the server sees EOF.
            with pytest.raises(ConnectionResetError):
                await done
        finally:
            await close_server(server)
        return tr.is_closing()

    assert run(loop, main()) is True


def test_streams_over_tls(loop, certs):
    async def handle(reader, writer):
        line = await reader.readline()
        info = writer.get_extra_info("ssl_object")
        writer.write(line.upper() + info.version().encode() + b"\n")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def main():
        server = await asyncio.start_server(handle, HOST, 0, ssl=certs.server_ctx())
        reader, writer = await asyncio.open_connection(
            HOST, port_of(server), ssl=certs.client_ctx(), server_hostname="localhost"
        )
        writer.write(b"hello streams\n")
        await writer.drain()
        first = await reader.readline()
        second = await reader.readline()
        rest = await reader.read()
        assert isinstance(writer.get_extra_info("ssl_object"), ssl.SSLObject)
        assert writer.get_extra_info("peercert")["subjectAltName"][0] == ("DNS", "localhost")
        writer.close()
        await writer.wait_closed()
        await close_server(server)
        return first, second.startswith(b"TLSv1."), rest

    assert run(loop, main()) == (b"HELLO STREAMS\n", True, b"")


def test_unix_streams_over_tls(loop, certs):
    async def handle(reader, writer):
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()

    async def main():
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "s")
            server = await asyncio.start_unix_server(handle, path, ssl=certs.server_ctx())
            reader, writer = await asyncio.open_unix_connection(
                path, ssl=certs.client_ctx(), server_hostname="localhost"
            )
            writer.write(b"ping")
            got = await reader.read()
            writer.close()
            await writer.wait_closed()
            await close_server(server)
            return got

    assert run(loop, main()) == b"ping"


@pytest.mark.skipif(
    not hasattr(asyncio.StreamWriter, "start_tls"), reason="StreamWriter.start_tls is 3.11+"
)
def test_stream_writer_start_tls(loop, certs):
    sctx = certs.server_ctx()

    async def handle(reader, writer):
        assert await reader.readline() == b"STARTTLS\n"
        writer.write(b"GO\n")
        await writer.drain()
        await writer.start_tls(sctx)
        writer.write(b"tls:" + await reader.readline())
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(handle, HOST, 0)
        reader, writer = await asyncio.open_connection(HOST, port_of(server))
        writer.write(b"STARTTLS\n")
        assert await reader.readline() == b"GO\n"
        await writer.start_tls(certs.client_ctx(), server_hostname="localhost")
        assert isinstance(writer.get_extra_info("ssl_object"), ssl.SSLObject)
        writer.write(b"hi\n")
        got = await reader.read()
        writer.close()
        await writer.wait_closed()
        await close_server(server)
        return got

    assert run(loop, main()) == b"tls:hi\n"


def test_connect_accepted_socket_ssl(loop, certs):
    async def main():
        lsock = socket.socket()
        lsock.bind((HOST, 0))
        lsock.listen(1)
        lsock.setblocking(False)
        connect = loop.create_task(
            loop.create_connection(
                lambda: Client(loop),
                *lsock.getsockname(),
                ssl=certs.client_ctx(),
                server_hostname="localhost",
            )
        )
        conn, _ = await loop.sock_accept(lsock)
        lsock.close()
        srv_tr, srv = await loop.connect_accepted_socket(
            lambda: Echo(loop), conn, ssl=certs.server_ctx()
        )
        tr, client = await connect
        tr.write(b"accepted")
        got = await client.read(8)
        assert isinstance(srv_tr.get_extra_info("ssl_object"), ssl.SSLObject)
        await close_client(client)
        await srv.lost
        return got

    assert run(loop, main()) == b"accepted"


class FlowClient(Client):
    def __init__(self, loop):
        super().__init__(loop)
        self.events = []
        self.paused = loop.create_future()
        self.resumed = loop.create_future()

    def pause_writing(self):
        self.events.append("pause")
        if not self.paused.done():
            self.paused.set_result(None)

    def resume_writing(self):
        self.events.append("resume")
        if not self.resumed.done():
            self.resumed.set_result(None)


def test_flow_control_over_tls(loop, certs):
    # The server stops reading: the client's TLS transport buffers, then pauses its
    # protocol; once the server reads again everything arrives and the client resumes.
    async def main():
        servers = []
        received = bytearray()

        class Sink(Echo):
            def data_received(self, data):
                received.extend(data)

        server = await loop.create_server(
            lambda: Sink(loop, servers), HOST, 0, ssl=certs.server_ctx()
        )
        tr, client = await loop.create_connection(
            lambda: FlowClient(loop),
            HOST,
            port_of(server),
            ssl=certs.client_ctx(),
            server_hostname="localhost",
        )
        assert tr.can_write_eof() is False
        tr.set_write_buffer_limits(high=64 * 1024, low=16 * 1024)
        assert tr.get_write_buffer_limits() == (16 * 1024, 64 * 1024)
        while not servers:
            await asyncio.sleep(0)
        servers[0].transport.pause_reading()
        assert not servers[0].transport.is_reading()
        sent = 0
        chunk = b"z" * 65536
        while not client.paused.done():
            tr.write(chunk)
            sent += len(chunk)
            await asyncio.sleep(0)
        assert tr.get_write_buffer_size() > 0
        servers[0].transport.resume_reading()
        await client.resumed
        while len(received) < sent:
            await asyncio.sleep(0.001)
        await close_client(client)
        await close_server(server)
        return len(received) == sent, client.events

    assert run(loop, main()) == (True, ["pause", "resume"])


def test_abort_tls_transport(loop, certs):
    async def main():
        servers = []
        server = await echo_server(loop, certs.server_ctx(), servers)
        tr, client = await loop.create_connection(
            lambda: Client(loop),
            HOST,
            port_of(server),
            ssl=certs.client_ctx(),
            server_hostname="localhost",
        )
        tr.write(b"x")
        await client.read(1)
        tr.abort()
        assert tr.is_closing()
        lost = await client.lost
        srv_lost = await servers[0].lost
        await close_server(server)
        return lost, srv_lost

    lost, srv_lost = run(loop, main())
    assert lost is None
    assert srv_lost is None or isinstance(srv_lost, (ConnectionResetError, ssl.SSLError))


def test_buffered_protocol_over_tls(loop, certs):
    class Buffered(asyncio.BufferedProtocol):
        def __init__(self):
            self.buf = bytearray(7)  # a small buffer: many get_buffer calls
            self.data = bytearray()
            self.done = loop.create_future()

        def connection_made(self, transport):
            self.transport = transport

        def get_buffer(self, sizehint):
            return self.buf

        def buffer_updated(self, nbytes):
            self.data += self.buf[:nbytes]
            if len(self.data) >= 1000 and not self.done.done():
                self.done.set_result(bytes(self.data))

        def connection_lost(self, exc):
            pass

    async def main():
        server = await echo_server(loop, certs.server_ctx())
        tr, proto = await loop.create_connection(
            Buffered, HOST, port_of(server), ssl=certs.client_ctx(), server_hostname="localhost"
        )
        payload = bytes(range(250)) * 4
        tr.write(payload)
        got = await proto.done
        tr.close()
        await close_server(server)
        return got == payload

    assert run(loop, main()) is True
