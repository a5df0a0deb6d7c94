"""The loop's low-level socket operations (``loop.sock_*``), on asyncio and on ferroloop.

On ferroloop ``sock_recv``, ``sock_recv_into``, ``sock_sendall``, ``sock_recvfrom``,
``sock_recvfrom_into``, ``sock_sendto`` and ``sock_accept`` are native coroutines
(src/sockets.rs): each test checks that they behave as asyncio's ``async def`` methods, on
the fast path (the socket is ready), the slow path (they wait on a reader or writer), and
through cancellation and errors.
"""

import asyncio
import collections.abc
import gc
import os
import socket
import ssl
import sys
import tempfile
import threading
import warnings

import pytest
from parity_helpers import run, turns


def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    return a, b


def tcp_pair():
    lsock = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(lsock.getsockname())
    s, _ = lsock.accept()
    lsock.close()
    s.setblocking(False)
    return s, c


def udp_pair(family=socket.AF_INET, host="127.0.0.1"):
    a = socket.socket(family, socket.SOCK_DGRAM)
    b = socket.socket(family, socket.SOCK_DGRAM)
    a.bind((host, 0))
    b.bind((host, 0))
    a.setblocking(False)
    return a, b


def has_reader(loop, fd):
    # Public behaviour: remove_reader says whether a reader was registered (and removes it).
    return loop.remove_reader(fd)


def has_writer(loop, fd):
    return loop.remove_writer(fd)


# --- coroutine protocol ------------------------------------------------------------------


def test_methods_return_coroutines(loop):
    a, b = pair()
    try:
        coros = [
            loop.sock_recv(a, 10),
            loop.sock_recv_into(a, bytearray(10)),
            loop.sock_sendall(a, b"x"),
            loop.sock_accept(a),
            loop.sock_recvfrom(a, 10),
            loop.sock_recvfrom_into(a, bytearray(10)),
            loop.sock_sendto(a, b"x", None),
        ]
        for c in coros:
            assert asyncio.iscoroutine(c)
            assert isinstance(c, collections.abc.Coroutine)
            with warnings.catch_warnings():
                # asyncio's coroutines warn "never awaited" when collected unstarted.
                warnings.simplefilter("ignore", RuntimeWarning)
                c.close()
        # Nothing was done: the data written is still there for a plain recv.
        b.sendall(b"hello")
        assert a.recv(10) == b"hello"
    finally:
        a.close()
        b.close()


def unawaited_warnings(loop, make, *, debug=False, close_first=False):
    """The "never awaited" warnings seen when the coroutine ``make()`` returns is dropped."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        depth = sys.get_coroutine_origin_tracking_depth()
        if debug:
            sys.set_coroutine_origin_tracking_depth(2)
        try:
            coro = make()
        finally:
            sys.set_coroutine_origin_tracking_depth(depth)
        name = coro.__qualname__
        if close_first:
            coro.close()
        del coro
        gc.collect()
    messages = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
    return name, messages


@pytest.mark.parametrize("debug", [False, True])
def test_never_awaited_warns_as_asyncio(loop, debug):
    # asyncio's coroutines warn when freed unstarted, naming the method as
    # BaseSelectorEventLoop.<name>, with where it was made when origin tracking is on
    # (asyncio's debug mode turns it on while the loop runs).
    loop.set_debug(debug)
    a, b = pair()
    try:
        makers = {
            "sock_recv": lambda: loop.sock_recv(a, 10),
            "sock_recv_into": lambda: loop.sock_recv_into(a, bytearray(10)),
            "sock_sendall": lambda: loop.sock_sendall(a, b"x"),
            "sock_accept": lambda: loop.sock_accept(a),
            "sock_recvfrom": lambda: loop.sock_recvfrom(a, 10),
            "sock_recvfrom_into": lambda: loop.sock_recvfrom_into(a, bytearray(10)),
            "sock_sendto": lambda: loop.sock_sendto(a, b"x", None),
            "sock_connect": lambda: loop.sock_connect(a, "nowhere"),
        }
        for method, make in makers.items():
            name, messages = unawaited_warnings(loop, make, debug=debug)
            assert name == f"BaseSelectorEventLoop.{method}"
            assert len(messages) == 1, messages
            first, *origin = messages[0].splitlines()
            assert first == f"coroutine '{name}' was never awaited"
            if debug:
                assert origin[0] == "Coroutine created at (most recent call last)"
                # Two frames, most recent last: the helper's call, then the lambda's.
                assert origin[1].endswith("in unawaited_warnings")
                assert "coro = make()" in origin[2]
                assert origin[3].endswith("in <lambda>")
                assert f"loop.{method}(" in origin[4]
            else:
                assert origin == []
            # Closed (or thrown into) before it ran: no warning, as for any coroutine.
            assert unawaited_warnings(loop, make, close_first=True)[1] == []
        # The data written is still there: a dropped coroutine did nothing.
        b.sendall(b"hello")
        assert a.recv(10) == b"hello"
    finally:
        loop.set_debug(False)
        a.close()
        b.close()


def test_create_task_and_ensure_future_accept_them(loop):
    async def main():
        a, b = pair()
        t1 = loop.create_task(loop.sock_recv(a, 10))
        await turns()
        assert not t1.done()
        b.sendall(b"one")
        assert await t1 == b"one"
        b.sendall(b"two")
        assert await asyncio.ensure_future(loop.sock_recv(a, 10)) == b"two"
        assert await asyncio.wait_for(loop.sock_sendall(a, b"3"), 1) is None
        assert b.recv(10) == b"3"
        a.close()
        b.close()

    run(loop, main())


def test_coroutine_cannot_be_awaited_twice(loop):
    async def main():
        a, b = pair()
        b.sendall(b"x")
        c = loop.sock_recv(a, 10)
        assert await c == b"x"
        with pytest.raises(RuntimeError, match="cannot reuse already awaited coroutine"):
            await c
        a.close()
        b.close()

    run(loop, main())


def test_send_non_none_to_unstarted_coroutine(loop):
    a, b = pair()
    c = loop.sock_recv(a, 10)
    with pytest.raises(TypeError, match="can't send non-None value to a just-started"):
        c.send(1)
    c.close()
    a.close()
    b.close()


def test_throw_into_unstarted_coroutine_raises_it(loop):
    a, b = pair()
    c = loop.sock_recv(a, 10)
    with pytest.raises(ZeroDivisionError):
        c.throw(ZeroDivisionError)
    with pytest.raises(RuntimeError, match="cannot reuse"):
        c.send(None)
    a.close()
    b.close()


# --- sock_recv / sock_recv_into ----------------------------------------------------------


def test_recv_fast_slow_eof(loop):
    async def main():
        a, b = pair()
        b.sendall(b"ready")
        assert await loop.sock_recv(a, 100) == b"ready"
        task = asyncio.ensure_future(loop.sock_recv(a, 100))
        await turns()
        assert not task.done()
        b.sendall(b"later")
        assert await task == b"later"
        assert not has_reader(loop, a.fileno())
        b.close()
        assert await loop.sock_recv(a, 100) == b""
        a.close()

    run(loop, main())


def test_recv_into_bytearray_memoryview(loop):
    async def main():
        a, b = pair()
        buf = bytearray(10)
        b.sendall(b"abc")
        assert await loop.sock_recv_into(a, buf) == 3
        assert buf[:3] == b"abc"
        view = memoryview(buf)[4:]
        task = asyncio.ensure_future(loop.sock_recv_into(a, view))
        await turns()
        assert not task.done()
        b.sendall(b"0123456789")
        assert await task == 6
        assert buf == b"abc\x00012345"
        with pytest.raises(TypeError):
            await loop.sock_recv_into(a, b"read-only")
        a.close()
        b.close()

    run(loop, main())


def test_recv_sizes_and_bad_sizes(loop):
    async def main():
        a, b = pair()
        b.sendall(b"0123456789")
        assert await loop.sock_recv(a, 4) == b"0123"
        assert await loop.sock_recv(a, 0) == b""
        assert await loop.sock_recv(a, 2 * 1024 * 1024) == b"456789"
        for bad, exc in [(-1, ValueError), (1.5, TypeError), ("1", TypeError)]:
            b.sendall(b"z")
            with pytest.raises(exc):
                await loop.sock_recv(a, bad)
            assert a.recv(1) == b"z"
        a.close()
        b.close()

    run(loop, main())


def test_recv_peer_reset_is_connection_reset_error(loop):
    async def main():
        s, c = tcp_pair()
        task = asyncio.ensure_future(loop.sock_recv(s, 100))
        await turns()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        c.close()
        with pytest.raises(ConnectionResetError) as info:
            await task
        assert info.value.errno == 104
        assert not has_reader(loop, s.fileno())
        s.close()

    run(loop, main())


def test_recv_on_closed_socket_is_os_error(loop):
    async def main():
        a, b = pair()
        a.close()
        with pytest.raises(OSError) as info:
            await loop.sock_recv(a, 10)
        assert info.value.errno == 9
        b.close()

    run(loop, main())


@pytest.mark.parametrize("op", ["recv", "recv_into", "recvfrom", "recvfrom_into", "accept"])
def test_cancel_mid_wait_leaves_socket_usable(loop, op):
    async def main():
        if op == "accept":
            a = socket.create_server(("127.0.0.1", 0))
            a.setblocking(False)
            b = None
            coro = loop.sock_accept(a)
        elif op.startswith("recvfrom"):
            a, b = udp_pair()
            coro = (
                loop.sock_recvfrom(a, 100)
                if op == "recvfrom"
                else loop.sock_recvfrom_into(a, bytearray(100))
            )
        else:
            a, b = pair()
            coro = (
                loop.sock_recv(a, 100) if op == "recv" else loop.sock_recv_into(a, bytearray(100))
            )
        task = asyncio.ensure_future(coro)
        await turns()
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await turns()
        assert not has_reader(loop, a.fileno())
        # Still usable: the next operation gets what arrives.
        if op == "accept":
            c = socket.create_connection(a.getsockname())
            conn, _ = await loop.sock_accept(a)
            assert conn.gettimeout() == 0
            conn.close()
            c.close()
        elif op.startswith("recvfrom"):
            b.sendto(b"after", a.getsockname())
            data, addr = await loop.sock_recvfrom(a, 100)
            assert (data, addr) == (b"after", b.getsockname())
            b.close()
        else:
            b.sendall(b"after")
            assert await loop.sock_recv(a, 100) == b"after"
            b.close()
        a.close()

    run(loop, main())


def test_cancel_before_first_step(loop):
    async def main():
        a, b = pair()
        b.sendall(b"data")
        task = asyncio.ensure_future(loop.sock_recv(a, 100))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The coroutine never ran: the data is still there.
        assert await loop.sock_recv(a, 100) == b"data"
        a.close()
        b.close()

    run(loop, main())


def test_wait_for_timeout_removes_reader(loop):
    async def main():
        a, b = pair()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(loop.sock_recv(a, 100), 0.01)
        assert not has_reader(loop, a.fileno())
        b.sendall(b"x")
        assert await loop.sock_recv(a, 100) == b"x"
        a.close()
        b.close()

    run(loop, main())


# --- checks asyncio makes ----------------------------------------------------------------


def _all_ops(loop, sock):
    return [
        lambda: loop.sock_recv(sock, 10),
        lambda: loop.sock_recv_into(sock, bytearray(10)),
        lambda: loop.sock_sendall(sock, b"x"),
        lambda: loop.sock_recvfrom(sock, 10),
        lambda: loop.sock_recvfrom_into(sock, bytearray(10)),
        lambda: loop.sock_sendto(sock, b"x", ("127.0.0.1", 9)),
        lambda: loop.sock_accept(sock),
        lambda: loop.sock_connect(sock, ("127.0.0.1", 9)),
    ]


def test_blocking_socket_refused_in_debug_mode(loop):
    async def main():
        loop.set_debug(True)
        a, b = socket.socketpair()
        for op in _all_ops(loop, a):
            with pytest.raises(ValueError, match="the socket must be non-blocking"):
                await op()
        a.close()
        b.close()

    run(loop, main())


def test_ssl_socket_refused(loop):
    async def main():
        ctx = ssl.create_default_context()
        raw = socket.socket()
        s = ctx.wrap_socket(raw, server_hostname="x", do_handshake_on_connect=False)
        s.setblocking(False)
        for op in _all_ops(loop, s):
            with pytest.raises(TypeError, match="Socket cannot be of type SSLSocket"):
                await op()
        s.close()

    run(loop, main())


def test_fd_used_by_transport(loop):
    async def main():
        a, b = pair()
        tr, _ = await loop.create_connection(asyncio.Protocol, sock=a)
        with pytest.raises(RuntimeError, match="is used by transport"):
            await loop.sock_recv(a, 10)
        with pytest.raises(RuntimeError, match="is used by transport"):
            await loop.sock_recv_into(a, bytearray(10))
        tr.close()
        await turns()
        b.close()

    run(loop, main())


# --- sock_sendall ------------------------------------------------------------------------


def test_sendall_fast_and_empty(loop):
    async def main():
        a, b = pair()
        assert await loop.sock_sendall(a, b"hello") is None
        assert await loop.sock_sendall(a, b"") is None
        assert await loop.sock_sendall(a, bytearray(b" world")) is None
        assert await loop.sock_sendall(a, memoryview(b"!?")[:1]) is None
        assert b.recv(100) == b"hello world!"
        with pytest.raises(TypeError):
            await loop.sock_sendall(a, "text")
        a.close()
        b.close()

    run(loop, main())


def test_sendall_large_to_slow_reader(loop):
    data = os.urandom(4 * 1024 * 1024)
    got = bytearray()

    def reader(sock):
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got.extend(chunk)

    async def main():
        a, b = pair()
        th = threading.Thread(target=reader, args=(b,))
        th.start()
        await loop.sock_sendall(a, data)
        assert not has_writer(loop, a.fileno())
        a.shutdown(socket.SHUT_WR)
        await loop.run_in_executor(None, th.join)
        a.close()
        b.close()

    run(loop, main(), timeout=30)
    assert bytes(got) == data


def test_sendall_cancelled_mid_wait(loop):
    async def main():
        a, b = pair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        task = asyncio.ensure_future(loop.sock_sendall(a, b"x" * (8 * 1024 * 1024)))
        await turns()
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await turns()
        assert not has_writer(loop, a.fileno())
        a.close()
        b.close()

    run(loop, main())


def test_sendall_peer_closed(loop):
    async def main():
        a, b = pair()
        b.close()
        with pytest.raises(BrokenPipeError) as info:
            await loop.sock_sendall(a, b"x")
        assert info.value.errno == 32
        a.close()

    run(loop, main())


# --- datagrams ---------------------------------------------------------------------------


def test_recvfrom_sendto(loop):
    async def main():
        a, b = udp_pair()
        b.sendto(b"ping", a.getsockname())
        await asyncio.sleep(0.01)
        assert await loop.sock_recvfrom(a, 100) == (b"ping", b.getsockname())
        task = asyncio.ensure_future(loop.sock_recvfrom(a, 100))
        await turns()
        assert not task.done()
        b.sendto(b"pong", a.getsockname())
        assert await task == (b"pong", b.getsockname())
        assert await loop.sock_sendto(a, b"back", b.getsockname()) == 4
        assert b.recvfrom(100) == (b"back", a.getsockname())
        buf = bytearray(10)
        b.sendto(b"0123456789", a.getsockname())
        await asyncio.sleep(0.01)
        assert await loop.sock_recvfrom_into(a, buf, 4) == (4, b.getsockname())
        assert buf[:4] == b"0123"
        b.sendto(b"abc", a.getsockname())
        await asyncio.sleep(0.01)
        assert await loop.sock_recvfrom_into(a, buf) == (3, b.getsockname())
        with pytest.raises(ValueError):
            await loop.sock_recvfrom_into(a, buf, 100)
        with pytest.raises(TypeError):
            await loop.sock_sendto(a, b"x", "not an address")
        a.close()
        b.close()

    run(loop, main())


# --- sock_accept / sock_connect ----------------------------------------------------------


def test_accept_and_connect_tcp(loop):
    async def main():
        lsock = socket.create_server(("127.0.0.1", 0))
        lsock.setblocking(False)
        accept = asyncio.ensure_future(loop.sock_accept(lsock))
        await turns()
        assert not accept.done()
        c = socket.socket()
        c.setblocking(False)
        await loop.sock_connect(c, ("localhost", lsock.getsockname()[1]))
        conn, addr = await accept
        assert addr == c.getsockname()
        assert conn.gettimeout() == 0
        await loop.sock_sendall(c, b"hi")
        assert await loop.sock_recv(conn, 10) == b"hi"
        assert not has_reader(loop, lsock.fileno())
        conn.close()
        c.close()
        lsock.close()

    run(loop, main())


def test_connect_refused(loop):
    async def main():
        lsock = socket.create_server(("127.0.0.1", 0))
        port = lsock.getsockname()[1]
        lsock.close()
        c = socket.socket()
        c.setblocking(False)
        with pytest.raises(ConnectionRefusedError) as info:
            await loop.sock_connect(c, ("127.0.0.1", port))
        assert info.value.errno == 111
        assert not has_writer(loop, c.fileno())
        c.close()

    run(loop, main())


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_ipv6_loopback(loop):
    try:
        lsock = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no ::1")

    async def main():
        lsock.setblocking(False)
        c = socket.socket(socket.AF_INET6)
        c.setblocking(False)
        accept = asyncio.ensure_future(loop.sock_accept(lsock))
        await loop.sock_connect(c, ("::1", lsock.getsockname()[1]))
        conn, addr = await accept
        assert addr[:2] == c.getsockname()[:2]
        await loop.sock_sendall(conn, b"six")
        assert await loop.sock_recv(c, 10) == b"six"
        conn.close()
        c.close()
        lsock.close()

    run(loop, main())


def test_unix_sockets(loop):
    async def main():
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "s")
            lsock = socket.socket(socket.AF_UNIX)
            lsock.bind(path)
            lsock.listen()
            lsock.setblocking(False)
            c = socket.socket(socket.AF_UNIX)
            c.setblocking(False)
            accept = asyncio.ensure_future(loop.sock_accept(lsock))
            await loop.sock_connect(c, path)
            conn, addr = await accept
            assert addr == ""
            await loop.sock_sendall(c, b"unix")
            assert await loop.sock_recv(conn, 10) == b"unix"
            conn.close()
            c.close()
            lsock.close()

    run(loop, main())


def test_many_concurrent_echoes(loop):
    async def echo(sock):
        while True:
            data = await loop.sock_recv(sock, 65536)
            if not data:
                break
            await loop.sock_sendall(sock, data)
        sock.close()

    async def client(sock, i):
        for j in range(20):
            msg = f"{i}:{j}".encode() * 100
            await loop.sock_sendall(sock, msg)
            got = b""
            while len(got) < len(msg):
                got += await loop.sock_recv(sock, 65536)
            assert got == msg
        sock.close()

    async def main():
        jobs = []
        for i in range(10):
            a, b = pair()
            b.setblocking(False)
            jobs += [echo(a), client(b, i)]
        await asyncio.gather(*jobs)

    run(loop, main())
    gc.collect()


def test_task_repr_while_waiting(loop):
    async def main():
        a, b = pair()
        task = asyncio.ensure_future(loop.sock_recv(a, 100))
        await turns()
        assert "sock_recv" in repr(task)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        a.close()
        b.close()

    run(loop, main())


def test_driven_by_hand_send_returns_through_stop_iteration(loop):
    a, b = pair()
    b.sendall(b"ready")
    c = loop.sock_recv(a, 100)
    with pytest.raises(StopIteration) as info:
        c.send(None)
    assert info.value.value == b"ready"
    c = loop.sock_sendall(a, b"x")
    with pytest.raises(StopIteration) as info:
        c.send(None)
    assert info.value.value is None
    assert b.recv(10) == b"x"
    a.close()
    b.close()


def test_awaited_under_a_trace_function(loop):
    # With a trace function CPython resumes awaited objects through send(), not the slot.
    import sys

    async def main():
        a, b = pair()
        b.sendall(b"traced")
        sys.settrace(lambda *args: None)
        try:
            data = await loop.sock_recv(a, 100)
        finally:
            sys.settrace(None)
        assert data == b"traced"
        a.close()
        b.close()

    run(loop, main())
