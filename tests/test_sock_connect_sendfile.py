"""``loop.sock_connect`` and ``loop.sock_sendfile``, on asyncio and on ferroloop.

On ferroloop ``sock_connect`` is a native coroutine (src/sockets.rs) for an address that
needs no resolution, and ``sock_sendfile``'s data path is native sendfile(2)
(src/sendfile.rs). Each test checks asyncio's behaviour: results, errors (type, errno,
message), the file position, and cancellation leaving no writer behind.
"""

import asyncio
import errno
import io
import os
import socket
import ssl
import tempfile

import pytest
from parity_helpers import new_loop, run, turns


def has_writer(loop, fd):
    # Public behaviour: remove_writer says whether a writer was registered (and removes it).
    return loop.remove_writer(fd)


def nonblocking(family=socket.AF_INET, type=socket.SOCK_STREAM):
    s = socket.socket(family, type)
    s.setblocking(False)
    return s


def free_port(host="127.0.0.1", family=socket.AF_INET):
    s = socket.socket(family)
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def has_ipv6_loopback():
    if not socket.has_ipv6:
        return False
    try:
        s = socket.socket(socket.AF_INET6)
        s.bind(("::1", 0))
        s.close()
    except OSError:
        return False
    return True


def outcome_on_asyncio(make_coro):
    """What asyncio's own loop gives for ``make_coro(loop)``: ("ok", value) or the error's
    (type, errno, str)."""
    lp = new_loop("asyncio")
    try:
        return outcome(lp, make_coro)
    finally:
        lp.close()


def outcome(loop, make_coro):
    async def main():
        try:
            return ("ok", await make_coro(loop))
        except Exception as e:  # noqa: BLE001 - the outcome compared is any error
            return (type(e), getattr(e, "errno", None), str(e))

    return run(loop, main())


# --- sock_connect --------------------------------------------------------------------------


def test_connect_returns_coroutine(loop):
    s = nonblocking()
    coro = loop.sock_connect(s, ("127.0.0.1", 9))
    assert asyncio.iscoroutine(coro)
    coro.close()
    s.close()


@pytest.mark.parametrize("family", ["ipv4", "ipv6", "unix", "unix-bytes"])
def test_connect_to_listening_socket(loop, family):
    if family == "ipv6" and not has_ipv6_loopback():
        pytest.skip("no ::1")

    async def main():
        tmp = None
        if family == "ipv4":
            srv = socket.create_server(("127.0.0.1", 0))
            addr = srv.getsockname()
            c = nonblocking()
        elif family == "ipv6":
            srv = socket.create_server(("::1", 0), family=socket.AF_INET6)
            addr = srv.getsockname()[:2]
            c = nonblocking(socket.AF_INET6)
        else:
            tmp = tempfile.mkdtemp(prefix="sock2-")
            path = os.path.join(tmp, "s")
            srv = socket.socket(socket.AF_UNIX)
            srv.bind(path)
            srv.listen()
            addr = path.encode() if family == "unix-bytes" else path
            c = nonblocking(socket.AF_UNIX)
        srv.setblocking(False)
        assert await loop.sock_connect(c, addr) is None
        conn, _ = await loop.sock_accept(srv)
        assert not has_writer(loop, c.fileno())
        await loop.sock_sendall(c, b"ping")
        assert await loop.sock_recv(conn, 10) == b"ping"
        if family == "ipv4":
            assert c.getpeername() == addr
        for s in (c, conn, srv):
            s.close()
        if tmp:
            os.unlink(path)
            os.rmdir(tmp)

    run(loop, main())


def test_unix_connect_completes_on_first_step(loop):
    # A connect that succeeds at once never suspends (asyncio's future is already done).
    tmp = tempfile.mkdtemp(prefix="sock2-")
    path = os.path.join(tmp, "s")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen()
    c = nonblocking(socket.AF_UNIX)
    coro = loop.sock_connect(c, path)
    with pytest.raises(StopIteration) as info:
        coro.send(None)
    assert info.value.value is None
    assert not has_writer(loop, c.fileno())
    conn, _ = srv.accept()
    for s in (c, conn, srv):
        s.close()
    os.unlink(path)
    os.rmdir(tmp)


def test_connect_needing_resolution(loop):
    async def main():
        srv = socket.create_server(("127.0.0.1", 0))
        srv.setblocking(False)
        c = nonblocking()
        await loop.sock_connect(c, ("localhost", srv.getsockname()[1]))
        conn, _ = await loop.sock_accept(srv)
        assert c.getpeername() == srv.getsockname()
        assert not has_writer(loop, c.fileno())
        for s in (c, conn, srv):
            s.close()

    run(loop, main())


def test_connect_refused(loop):
    async def main():
        port = free_port()
        c = nonblocking()
        with pytest.raises(ConnectionRefusedError) as info:
            await loop.sock_connect(c, ("127.0.0.1", port))
        e = info.value
        assert e.errno == errno.ECONNREFUSED
        assert e.args == (errno.ECONNREFUSED, f"Connect call failed ('127.0.0.1', {port})")
        assert str(e) == f"[Errno 111] Connect call failed ('127.0.0.1', {port})"
        assert not has_writer(loop, c.fileno())
        c.close()

    run(loop, main())


def test_connect_refused_message_uses_resolved_address(loop):
    # A string port and an IPv6 address: the message shows the address asyncio resolved.
    async def main():
        port = free_port()
        c = nonblocking()
        with pytest.raises(ConnectionRefusedError, match=rf"\('127.0.0.1', {port}\)$"):
            await loop.sock_connect(c, ("127.0.0.1", str(port)))
        c.close()
        if has_ipv6_loopback():
            port6 = free_port("::1", socket.AF_INET6)
            c = nonblocking(socket.AF_INET6)
            with pytest.raises(ConnectionRefusedError) as info:
                await loop.sock_connect(c, ("::1", port6))
            assert info.value.args[1] == f"Connect call failed ('::1', {port6}, 0, 0)"
            c.close()

    run(loop, main())


def test_connect_unix_missing_path(loop):
    async def main():
        c = nonblocking(socket.AF_UNIX)
        with pytest.raises(FileNotFoundError) as info:
            await loop.sock_connect(c, "/nonexistent/sock2/socket")
        assert info.value.errno == errno.ENOENT
        assert str(info.value) == "[Errno 2] No such file or directory"
        c.close()

    run(loop, main())


def _connect_cases():
    port = free_port()
    return {
        "short-tuple": ("127.0.0.1",),
        "string": "127.0.0.1",
        "none": None,
        "bad-port": ("127.0.0.1", -1),
        "big-port": ("127.0.0.1", 70000),
        "float-port": ("127.0.0.1", 1.5),
        "bool-port": ("127.0.0.1", False),
        "str-port": ("127.0.0.1", str(port)),
        "str-port-padded": ("127.0.0.1", f" {port} "),
        "bytes-port": ("127.0.0.1", str(port).encode()),
        "empty-port": ("127.0.0.1", ""),
        "none-port": ("127.0.0.1", None),
        "service-port": ("127.0.0.1", "no-such-service"),
        "ipv6-on-ipv4": ("::1", port),
        "short-form": ("127.1", port),
        "leading-zeros": ("127.000.000.001", port),
        "space": (" 127.0.0.1", port),
        "nul": ("127.0.0.1\0", port),
        "non-ascii": ("127.0.0.\u0661", port),
        "list": ["127.0.0.1", port],
        "bytes-host": (b"127.0.0.1", port),
        "none-host": (None, port),
        "int-host": (2130706433, port),
        "zone": ("127.0.0.1%lo", port),
        "extra-fields": ("127.0.0.1", port, 0, 0),
        "too-long": ("127.0.0.1", port, 0, 0, 0),
    }


def _connect6_cases():
    port = free_port("::1", socket.AF_INET6) if has_ipv6_loopback() else 1
    return {
        "v6": ("::1", port),
        "v6-flowinfo": ("::1", port, 0),
        "v6-scope": ("::1", port, 0, 1),
        "v6-bad-flowinfo": ("::1", port, "x", 0),
        "v6-big-flowinfo": ("::1", port, 2**40, 0),
        "v6-mapped": ("::ffff:127.0.0.1", port),
        "v6-zone": ("::1%lo", port),
        "v6-expanded": ("0:0:0:0:0:0:0:1", port),
        "v4-on-v6": ("127.0.0.1", port),
        "v6-too-long": ("::1", port, 0, 0, 0),
    }


@pytest.mark.parametrize("case", sorted(_connect_cases()) + sorted(_connect6_cases()))
def test_connect_odd_addresses_as_asyncio(loop, case):
    if case.startswith("v") and not has_ipv6_loopback():
        pytest.skip("no ::1")
    cases = {**_connect_cases(), **_connect6_cases()}
    address = cases[case]
    family = socket.AF_INET6 if case in _connect6_cases() else socket.AF_INET

    def make(lp):
        async def go():
            c = nonblocking(family)
            try:
                return await lp.sock_connect(c, address)
            finally:
                c.close()

        return go()

    assert outcome(loop, make) == outcome_on_asyncio(make)


def test_connect_closed_socket(loop):
    def make(lp):
        async def go():
            c = nonblocking()
            c.close()
            return await lp.sock_connect(c, ("127.0.0.1", 9))

        return go()

    assert outcome(loop, make) == outcome_on_asyncio(make)


def _full_backlog_server():
    # listen(0) accepts one connection into the queue; the kernel drops the SYN of any
    # further one while the queue is full, so that connect stays in progress.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    fill = []
    for _ in range(2):
        f = nonblocking()
        f.connect_ex(srv.getsockname())
        fill.append(f)
    return srv, fill


def test_cancel_pending_connect_removes_writer(loop):
    async def main():
        srv, fill = _full_backlog_server()
        c = nonblocking()
        task = asyncio.ensure_future(loop.sock_connect(c, srv.getsockname()))
        await turns()
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await turns()
        assert not has_writer(loop, c.fileno())
        # The socket is still open and still a socket.
        assert c.fileno() >= 0
        assert c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        for s in (c, srv, *fill):
            s.close()

    run(loop, main())


def test_wait_for_timeout_on_connect(loop):
    async def main():
        srv, fill = _full_backlog_server()
        c = nonblocking()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(loop.sock_connect(c, srv.getsockname()), 0.01)
        assert not has_writer(loop, c.fileno())
        for s in (c, srv, *fill):
            s.close()

    run(loop, main())


def test_connect_blocking_socket_in_debug_mode(loop):
    async def main():
        loop.set_debug(True)
        s = socket.socket()
        with pytest.raises(ValueError, match="the socket must be non-blocking"):
            await loop.sock_connect(s, ("127.0.0.1", 9))
        s.close()

    run(loop, main())


def test_connect_blocking_socket_without_debug(loop):
    # asyncio connects it (blocking) when not in debug mode.
    async def main():
        srv = socket.create_server(("127.0.0.1", 0))
        s = socket.socket()
        await loop.sock_connect(s, srv.getsockname())
        assert s.getpeername() == srv.getsockname()
        s.close()
        srv.close()

    run(loop, main())


def test_connect_ssl_socket_refused(loop):
    async def main():
        ctx = ssl.create_default_context()
        s = ctx.wrap_socket(socket.socket(), server_hostname="x", do_handshake_on_connect=False)
        s.setblocking(False)
        with pytest.raises(TypeError, match="Socket cannot be of type SSLSocket"):
            await loop.sock_connect(s, ("127.0.0.1", 9))
        s.close()

    run(loop, main())


def test_connect_socket_subclass(loop):
    calls = []

    class MySocket(socket.socket):
        def connect(self, address):
            calls.append(address)
            return super().connect(address)

    async def main():
        srv = socket.create_server(("127.0.0.1", 0))
        s = MySocket()
        s.setblocking(False)
        await loop.sock_connect(s, srv.getsockname())
        assert calls == [srv.getsockname()]
        s.close()
        srv.close()

    run(loop, main())


# --- sock_sendfile -------------------------------------------------------------------------


@pytest.fixture
def datafile():
    data = os.urandom(3 * 1024 * 1024 + 17)
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        f.seek(0)
        yield f, data


def connected_pair():
    srv = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(srv.getsockname())
    s, _ = srv.accept()
    srv.close()
    c.setblocking(False)
    s.setblocking(False)
    return c, s


async def read_all(loop, sock, n, slow=False):
    buf = bytearray()
    while len(buf) < n:
        if slow:
            await asyncio.sleep(0.001)
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def test_sendfile_larger_than_socket_buffer_to_slow_reader(loop, datafile):
    f, data = datafile

    async def main():
        c, s = connected_pair()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        reader = asyncio.ensure_future(read_all(loop, s, len(data), slow=True))
        sent = await loop.sock_sendfile(c, f)
        assert sent == len(data)
        assert await reader == data
        assert f.tell() == len(data)
        assert not has_writer(loop, c.fileno())
        # The socket goes on working.
        await loop.sock_sendall(c, b"after")
        assert await loop.sock_recv(s, 10) == b"after"
        c.close()
        s.close()

    run(loop, main(), timeout=30)


@pytest.mark.parametrize(
    "offset,count",
    [(0, None), (10, None), (0, 100), (1000, 5000), (3 * 1024 * 1024, 10**6), (10**9, None)],
)
def test_sendfile_offset_and_count(loop, datafile, offset, count):
    f, data = datafile

    async def main():
        c, s = connected_pair()
        expected = data[offset : None if count is None else offset + count]
        reader = asyncio.ensure_future(read_all(loop, s, len(expected)))
        sent = await loop.sock_sendfile(c, f, offset, count)
        assert sent == len(expected)
        assert await reader == expected
        # asyncio moves the file position past what was sent (only if anything was).
        assert f.tell() == (offset + sent if sent else 0)
        c.close()
        s.close()

    run(loop, main(), timeout=30)


def test_sendfile_empty_file(loop):
    async def main():
        c, s = connected_pair()
        with tempfile.TemporaryFile() as f:
            assert await loop.sock_sendfile(c, f) == 0
            assert await loop.sock_sendfile(c, f, fallback=False) == 0
            assert f.tell() == 0
        assert not has_writer(loop, c.fileno())
        c.close()
        s.close()

    run(loop, main())


def test_sendfile_mixed_with_sendall(loop, datafile):
    f, data = datafile

    async def main():
        c, s = connected_pair()
        reader = asyncio.ensure_future(read_all(loop, s, 2 * 1000 + 6))
        await loop.sock_sendall(c, b"abc")
        await loop.sock_sendfile(c, f, 0, 1000)
        await loop.sock_sendall(c, b"def")
        await loop.sock_sendfile(c, f, 5000, 1000)
        got = await reader
        assert got == b"abc" + data[:1000] + b"def" + data[5000:6000]
        assert f.tell() == 6000
        c.close()
        s.close()

    run(loop, main())


def test_sendfile_not_a_regular_file(loop):
    async def main():
        c, s = connected_pair()
        buf = io.BytesIO(b"x" * 1000)
        with pytest.raises(asyncio.SendfileNotAvailableError, match="not a regular file"):
            await loop.sock_sendfile(c, buf, fallback=False)
        # With the fallback, asyncio reads and sends it.
        assert await loop.sock_sendfile(c, buf) == 1000
        assert await read_all(loop, s, 1000) == b"x" * 1000
        assert buf.tell() == 1000
        c.close()
        s.close()

    run(loop, main())


def test_sendfile_from_pipe(loop):
    # A pipe has a fileno and fstat() works: asyncio sends nothing without a count (its
    # size is 0); with a count, sendfile(2) fails before any byte went out and asyncio
    # falls back to reads (or raises SendfileNotAvailableError with fallback=False).
    def make(fallback, count):
        async def go(lp):
            c, s = connected_pair()
            r, w = os.pipe()
            os.write(w, b"y" * 100)
            os.close(w)
            try:
                with io.FileIO(r, "rb") as f:
                    n = await lp.sock_sendfile(c, f, 0, count, fallback=fallback)
                    got = await read_all(lp, s, n) if n else b""
                    return n, got
            finally:
                c.close()
                s.close()

        return go

    for fallback, count in [(True, None), (False, None), (True, 100), (False, 100)]:
        go = make(fallback, count)
        assert outcome(loop, go) == outcome_on_asyncio(go)


def test_sendfile_argument_errors_as_asyncio(loop, datafile):
    f, _ = datafile
    cases = [
        {"offset": -1},
        {"offset": 1.0},
        {"count": 0},
        {"count": -5},
        {"count": "1"},
    ]
    for kwargs in cases:

        def make(lp, kwargs=kwargs):
            async def go():
                c, s = connected_pair()
                try:
                    return await lp.sock_sendfile(c, f, **kwargs)
                finally:
                    c.close()
                    s.close()

            return go()

        assert outcome(loop, make) == outcome_on_asyncio(make)

    def text_mode(lp):
        async def go():
            c, s = connected_pair()
            try:
                with tempfile.TemporaryFile("w+") as t:
                    return await lp.sock_sendfile(c, t)
            finally:
                c.close()
                s.close()

        return go()

    assert outcome(loop, text_mode) == outcome_on_asyncio(text_mode)

    def datagram(lp):
        async def go():
            d = nonblocking(type=socket.SOCK_DGRAM)
            try:
                return await lp.sock_sendfile(d, f)
            finally:
                d.close()

        return go()

    assert outcome(loop, datagram) == outcome_on_asyncio(datagram)


def test_sendfile_unconnected_socket(loop, datafile):
    # sendfile(2) fails on the first call: SendfileNotAvailableError without the fallback,
    # the fallback's own send error with it.
    f, _ = datafile
    for fallback in (False, True):

        def make(lp, fallback=fallback):
            async def go():
                c = nonblocking()
                try:
                    return await lp.sock_sendfile(c, f, 0, 10, fallback=fallback)
                finally:
                    c.close()

            return go()

        assert outcome(loop, make) == outcome_on_asyncio(make)


def test_sendfile_peer_closes_mid_transfer(loop, datafile):
    f, data = datafile

    async def main():
        c, s = connected_pair()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        task = asyncio.ensure_future(loop.sock_sendfile(c, f))
        await loop.sock_recv(s, 1000)
        s.close()
        with pytest.raises(OSError) as info:
            await task
        assert info.value.errno in (errno.EPIPE, errno.ECONNRESET)
        assert not isinstance(info.value, asyncio.SendfileNotAvailableError)
        # The position is past what went out before the error.
        assert 0 < f.tell() < len(data)
        assert not has_writer(loop, c.fileno())
        c.close()

    run(loop, main())


def test_cancel_mid_sendfile(loop, datafile):
    f, data = datafile

    async def main():
        c, s = connected_pair()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        task = asyncio.ensure_future(loop.sock_sendfile(c, f))
        first = await loop.sock_recv(s, 1000)
        await turns()
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await turns()
        assert not has_writer(loop, c.fileno())
        # The transfer stopped where it was: the socket still works for what follows.
        received = bytearray(first)
        await loop.sock_sendall(c, b"END")
        while not received.endswith(b"END"):
            received += await loop.sock_recv(s, 65536)
        body = bytes(received[:-3])
        assert 0 < len(body) < len(data)
        assert body == data[: len(body)]
        c.close()
        s.close()
        return f.tell()

    # asyncio's cancellation callback removes the writer before it runs again, so the
    # file position is not updated.
    assert run(loop, main()) == 0


def test_sendfile_blocking_socket_in_debug_mode(loop, datafile):
    f, _ = datafile

    async def main():
        loop.set_debug(True)
        a, b = socket.socketpair()
        with pytest.raises(ValueError, match="the socket must be non-blocking"):
            await loop.sock_sendfile(a, f)
        a.close()
        b.close()

    run(loop, main())


def test_sendfile_ssl_socket_refused(loop, datafile):
    f, _ = datafile

    async def main():
        ctx = ssl.create_default_context()
        s = ctx.wrap_socket(socket.socket(), server_hostname="x", do_handshake_on_connect=False)
        s.setblocking(False)
        with pytest.raises(TypeError, match="Socket cannot be of type SSLSocket"):
            await loop.sock_sendfile(s, f)
        s.close()

    run(loop, main())
