"""Readiness registrations around ``sock_*`` waits, on asyncio and on ferroloop.

ferroloop registers the reader (writer) of a blocked ``sock_*`` call as a one-shot epoll
waiter and leaves the fd's epoll entry in place, disarmed, after the wait ends
(src/reactor.rs). These tests pin the hazards of that: the socket closed while a dup of it
lives, its fd number reused, the fd registered again (by ``add_reader``, a transport or
another wait), readers and writers sharing an fd, a waiter woken for nothing, the
``_selector.get_key`` view and ``remove_reader``'s answer. Each behaves as on asyncio.
"""

import asyncio
import errno
import os
import selectors
import socket

import pytest
from parity_helpers import run, turns


def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def recv_blocked(loop, sock, peer, data=b"x"):
    """A sock_recv that waits (the reader is registered), then gets ``data``."""
    task = asyncio.ensure_future(loop.sock_recv(sock, 100))
    await turns(2)
    assert not task.done()
    peer.send(data)
    return await task


def reuse_number(fd):
    """A new socketpair whose first socket has the (free) fd number ``fd``."""
    c, d = pair()
    if c.fileno() != fd:
        os.dup2(c.fileno(), fd)
        c.close()
        c = socket.socket(fileno=fd)
        c.setblocking(False)
    return c, d


def open_fds():
    return set(os.listdir("/proc/self/fd"))


def test_reader_after_a_finished_wait_is_level_triggered(loop):
    async def main():
        a, b = pair()
        assert await recv_blocked(loop, a, b) == b"x"
        await turns()
        calls = []
        loop.add_reader(a.fileno(), calls.append, 1)
        b.send(b"yy")
        await turns(4)
        # Not drained: called on every turn, as a level-triggered reader is.
        assert len(calls) >= 3
        assert loop.remove_reader(a.fileno())
        assert a.recv(100) == b"yy"
        a.close()
        b.close()

    run(loop, main())


def test_wait_again_after_a_finished_wait(loop):
    async def main():
        a, b = pair()
        for i in range(5):
            assert await recv_blocked(loop, a, b, b"%d" % i) == b"%d" % i
        a.close()
        b.close()

    run(loop, main())


def test_add_reader_after_cancelled_wait(loop):
    async def main():
        a, b = pair()
        task = asyncio.ensure_future(loop.sock_recv(a, 100))
        await turns()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        got = loop.create_future()
        loop.add_reader(a.fileno(), lambda: got.done() or got.set_result(a.recv(100)))
        b.send(b"after")
        assert await got == b"after"
        assert loop.remove_reader(a.fileno())
        a.close()
        b.close()

    run(loop, main())


def test_remove_reader_and_get_key_around_a_wait(loop):
    async def main():
        a, b = pair()
        fd = a.fileno()
        with pytest.raises(KeyError):
            loop._selector.get_key(fd)
        task = asyncio.ensure_future(loop.sock_recv(a, 100))
        await turns()
        key = loop._selector.get_key(fd)
        assert key.events == selectors.EVENT_READ
        b.send(b"x")
        assert await task == b"x"
        await turns()
        with pytest.raises(KeyError):
            loop._selector.get_key(fd)
        assert not loop.remove_reader(fd)
        assert not loop.remove_writer(fd)
        a.close()
        b.close()

    run(loop, main())


def test_remove_reader_right_after_the_event(loop):
    # Between the reader's call and the future's done callback the reader is still there.
    async def main():
        a, b = pair()
        task = asyncio.ensure_future(loop.sock_recv(a, 100))
        await turns()
        answers = []
        b.send(b"x")

        def probe():
            if task.done() or answers:
                return
            answers.append(("key", loop._selector.get_key(a.fileno()).events))
            loop.call_soon(probe)

        loop.call_soon(probe)
        assert await task == b"x"
        await turns()
        assert answers and answers[0] == ("key", selectors.EVENT_READ)
        a.close()
        b.close()

    run(loop, main())


def test_closed_with_a_live_dup_then_fd_number_reused(loop):
    async def main():
        a, b = pair()
        fd = a.fileno()
        assert await recv_blocked(loop, a, b) == b"x"
        await turns()
        dup = a.dup()  # keeps the old socket open after `a` is closed
        a.close()
        # A new socket under the old number.
        c, d = reuse_number(fd)
        # The old socket becomes readable: nothing registered for the new one may fire.
        b.send(b"old")
        calls = []
        loop.add_reader(fd, calls.append, 1)
        await turns(4)
        assert calls == []
        d.send(b"new")
        await turns(2)
        assert calls
        assert loop.remove_reader(fd)
        assert c.recv(100) == b"new"
        # A wait on the new socket gets the new socket's data.
        assert await recv_blocked(loop, c, d, b"again") == b"again"
        assert dup.recv(100) == b"old"
        for s in (b, c, d, dup):
            s.close()

    run(loop, main())


def test_closed_with_a_live_dup_then_wait_on_reused_number(loop):
    async def main():
        a, b = pair()
        fd = a.fileno()
        assert await recv_blocked(loop, a, b) == b"x"
        dup = a.dup()
        a.close()
        c, d = reuse_number(fd)
        task = asyncio.ensure_future(loop.sock_recv(c, 100))
        await turns()
        b.send(b"old")
        await turns(3)
        assert not task.done()
        d.send(b"new")
        assert await task == b"new"
        assert dup.recv(100) == b"old"
        for s in (b, c, d, dup):
            s.close()

    run(loop, main())


def test_closed_then_add_reader_on_the_dead_fd_number(loop):
    async def main():
        a, b = pair()
        assert await recv_blocked(loop, a, b) == b"x"
        await turns()
        fd = a.fileno()
        a.close()
        with pytest.raises(OSError) as info:
            loop.add_reader(fd, lambda: None)
        assert info.value.errno == errno.EBADF
        assert not loop.remove_reader(fd)
        with pytest.raises(KeyError):
            loop._selector.get_key(fd)
        b.close()

    run(loop, main())


def test_bad_fd_errors(loop):
    with pytest.raises(OSError) as info:
        loop.add_reader(987654, lambda: None)
    assert info.value.errno == errno.EBADF
    assert not loop.remove_reader(987654)


def test_closing_a_socket_after_a_wait_closes_it(loop):
    async def main():
        before = open_fds()
        for _ in range(20):
            a, b = pair()
            assert await recv_blocked(loop, a, b) == b"x"
            a.close()
            # The peer sees the close: the socket is really gone.
            b.setblocking(True)
            assert b.recv(10) == b""
            b.close()
        await turns()
        assert open_fds() <= before

    run(loop, main())


def test_reader_and_writer_waits_on_one_socket(loop):
    async def main():
        a, b = pair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = b"z" * (1 << 20)
        recv_task = asyncio.ensure_future(loop.sock_recv(a, 100))
        send_task = asyncio.ensure_future(loop.sock_sendall(a, big))
        await turns()
        assert not recv_task.done() and not send_task.done()
        assert loop._selector.get_key(a.fileno()).events == (
            selectors.EVENT_READ | selectors.EVENT_WRITE
        )
        b.send(b"ping")
        assert await recv_task == b"ping"
        assert not send_task.done()
        got = bytearray()
        while len(got) < len(big):
            got += await loop.sock_recv(b, 1 << 16)
        await send_task
        assert got == big
        await turns()
        with pytest.raises(KeyError):
            loop._selector.get_key(a.fileno())
        a.close()
        b.close()

    run(loop, main())


def test_user_writer_and_recv_wait_on_one_socket(loop):
    async def main():
        a, b = pair()
        calls = []
        loop.add_writer(a.fileno(), calls.append, 1)
        task = asyncio.ensure_future(loop.sock_recv(a, 100))
        await turns(3)
        assert len(calls) >= 2  # level-triggered, never disarmed by the wait
        b.send(b"x")
        assert await task == b"x"
        n = len(calls)
        await turns(3)
        assert len(calls) > n
        assert loop.remove_writer(a.fileno())
        assert not loop.remove_reader(a.fileno())
        a.close()
        b.close()

    run(loop, main())


def test_user_reader_replaces_a_waiting_recv(loop):
    async def main():
        a, b = pair()
        task = asyncio.ensure_future(loop.sock_recv(a, 100))
        await turns()
        calls = []
        loop.add_reader(a.fileno(), calls.append, 1)
        b.send(b"x")
        await turns(3)
        assert len(calls) >= 2
        assert not task.done()
        assert loop.remove_reader(a.fileno())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert a.recv(100) == b"x"
        a.close()
        b.close()

    run(loop, main())


def test_recv_woken_for_nothing_waits_again(loop):
    # Another reader drains the socket (through a dup) in the turn the wait is woken.
    async def main():
        a, b = pair()
        dup = a.dup()
        dup.setblocking(False)
        c, d = pair()
        drained = []

        def drain():
            loop.remove_reader(c.fileno())
            c.recv(100)
            try:
                drained.append(dup.recv(100))
            except BlockingIOError:
                pass

        task = asyncio.ensure_future(loop.sock_recv(a, 100))
        await turns()
        loop.add_reader(c.fileno(), drain)
        d.send(b"go")
        b.send(b"first")
        await turns(3)
        if drained:
            assert not task.done()
        b.send(b"second")
        data = await task
        assert drained + [data] in ([b"first", b"second"], [b"first"])
        for s in (a, b, c, d, dup):
            s.close()

    run(loop, main())


def test_transport_on_a_socket_after_waits(loop):
    async def main():
        a, b = pair()
        assert await recv_blocked(loop, a, b) == b"x"
        got = loop.create_future()

        class P(asyncio.Protocol):
            def data_received(self, data):
                if not got.done():
                    got.set_result(data)

        tr, _ = await loop.connect_accepted_socket(P, a)
        b.send(b"to transport")
        assert await got == b"to transport"
        tr.close()
        await turns()
        b.close()

    run(loop, main())


def test_many_sockets_waiting_and_closing(loop):
    async def main():
        before = open_fds()
        pairs = [pair() for _ in range(30)]
        for _ in range(3):
            tasks = [asyncio.ensure_future(loop.sock_recv(a, 100)) for a, b in pairs]
            await turns()
            for a, b in pairs[::2]:
                b.send(b"y")
            for t in tasks[1::2]:
                t.cancel()
            res = await asyncio.gather(*tasks, return_exceptions=True)
            assert res[::2] == [b"y"] * 15
            assert all(isinstance(r, asyncio.CancelledError) for r in res[1::2])
            # Close half of them with a dup alive, then reuse the numbers.
            dups = [a.dup() for a, b in pairs[:10]]
            for a, b in pairs[:10]:
                a.close()
                b.close()
            pairs[:10] = [pair() for _ in range(10)]
            for s in dups:
                s.close()
        for a, b in pairs:
            a.close()
            b.close()
        await turns()
        assert open_fds() <= before

    run(loop, main())
