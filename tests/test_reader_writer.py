"""add_reader / add_writer / remove_reader / remove_writer on socketpairs and pipes."""

import errno
import os
import socket
import tempfile

import pytest
from parity_helpers import WATCHDOG, new_loop, run_briefly


@pytest.fixture
def sockpair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def pipe():
    r, w = os.pipe()
    os.set_blocking(r, False)
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def run_until(loop, predicate):
    """Run turns until predicate() is true (bounded by WATCHDOG)."""
    deadline = loop.time() + WATCHDOG
    while not predicate():
        assert loop.time() < deadline, "loop made no progress"
        loop.call_later(0.001, loop.stop)
        loop.run_forever()


def test_reader_called_when_data_arrives_on_a_socket(loop, sockpair):
    a, b = sockpair
    got = []

    def on_readable():
        got.append(a.recv(100))
        loop.remove_reader(a.fileno())

    loop.add_reader(a.fileno(), on_readable)
    b.send(b"hello")
    run_until(loop, lambda: got)
    assert got == [b"hello"]


def test_reader_called_when_data_arrives_on_a_pipe(loop, pipe):
    r, w = pipe
    got = []

    def on_readable():
        got.append(os.read(r, 100))
        loop.remove_reader(r)

    loop.add_reader(r, on_readable)
    os.write(w, b"pipe data")
    run_until(loop, lambda: got)
    assert got == [b"pipe data"]


def test_reader_receives_positional_args(loop, sockpair):
    a, b = sockpair
    got = []

    def on_readable(sock, tag, *rest):
        got.append((sock.recv(100), tag, rest))
        loop.remove_reader(sock.fileno())

    loop.add_reader(a.fileno(), on_readable, a, "tag", 1, 2)
    b.send(b"x")
    run_until(loop, lambda: got)
    assert got == [(b"x", "tag", (1, 2))]


def test_reader_is_level_triggered(loop, sockpair):
    # Reading one byte per call: the reader is called again on later turns while data remains.
    a, b = sockpair
    got = []

    def on_readable():
        got.append(a.recv(1))
        if len(got) == 5:
            loop.remove_reader(a.fileno())

    b.send(b"abcde")
    loop.add_reader(a.fileno(), on_readable)
    run_until(loop, lambda: len(got) == 5)
    assert b"".join(got) == b"abcde"


def test_reader_called_once_per_turn(loop, sockpair):
    a, b = sockpair
    calls = []
    b.send(b"abc")
    loop.add_reader(a.fileno(), lambda: calls.append("read"))
    run_briefly(loop, turns=3)
    loop.remove_reader(a.fileno())
    # Unread data keeps the fd readable: one call per turn, no more.
    assert 1 <= len(calls) <= 3


def test_reader_not_called_without_data(loop, sockpair):
    a, _ = sockpair
    calls = []
    loop.add_reader(a.fileno(), lambda: calls.append("read"))
    run_briefly(loop, turns=3)
    assert loop.remove_reader(a.fileno()) is True
    assert calls == []


def test_reader_sees_eof(loop, sockpair):
    a, b = sockpair
    got = []

    def on_readable():
        got.append(a.recv(100))
        loop.remove_reader(a.fileno())

    loop.add_reader(a.fileno(), on_readable)
    b.shutdown(socket.SHUT_WR)
    run_until(loop, lambda: got)
    assert got == [b""]


def test_add_reader_accepts_a_file_object(loop, sockpair):
    a, b = sockpair
    got = []

    def on_readable():
        got.append(a.recv(100))

    loop.add_reader(a, on_readable)
    b.send(b"via object")
    run_until(loop, lambda: got)
    assert loop.remove_reader(a) is True
    assert got == [b"via object"]


def test_add_reader_replaces_the_previous_callback(loop, sockpair):
    a, b = sockpair
    calls = []

    def old():
        calls.append("old")

    def new():
        calls.append(("new", a.recv(100)))
        loop.remove_reader(a.fileno())

    loop.add_reader(a.fileno(), old)
    loop.add_reader(a.fileno(), new)
    b.send(b"data")
    run_until(loop, lambda: calls)
    assert calls == [("new", b"data")]


def test_writer_called_when_writable(loop, sockpair):
    a, _ = sockpair
    calls = []

    def on_writable(tag):
        calls.append(tag)
        loop.remove_writer(a.fileno())

    loop.add_writer(a.fileno(), on_writable, "writable")
    run_until(loop, lambda: calls)
    assert calls == ["writable"]


def test_writer_on_a_pipe(loop, pipe):
    r, w = pipe
    calls = []

    def on_writable():
        calls.append(os.write(w, b"abc"))
        loop.remove_writer(w)

    loop.add_writer(w, on_writable)
    run_until(loop, lambda: calls)
    assert calls == [3]
    assert os.read(r, 10) == b"abc"


def test_writer_not_called_when_the_buffer_is_full(loop, sockpair):
    a, b = sockpair
    try:
        while True:
            a.send(b"x" * 65536)
    except BlockingIOError:
        pass
    calls = []
    loop.add_writer(a.fileno(), lambda: calls.append("w"))
    run_briefly(loop, turns=2)
    assert calls == []
    # Draining the peer makes it writable again.
    try:
        while b.recv(1 << 20):
            pass
    except BlockingIOError:
        pass
    run_until(loop, lambda: calls)
    assert loop.remove_writer(a.fileno()) is True


def test_reader_and_writer_on_the_same_fd(loop, sockpair):
    a, b = sockpair
    events = []

    def on_readable():
        events.append(("r", a.recv(100)))
        loop.remove_reader(a.fileno())

    def on_writable():
        events.append("w")
        loop.remove_writer(a.fileno())

    loop.add_reader(a.fileno(), on_readable)
    loop.add_writer(a.fileno(), on_writable)
    b.send(b"both")
    run_until(loop, lambda: len(events) == 2)
    assert sorted(events, key=repr) == sorted([("r", b"both"), "w"], key=repr)


def test_removing_the_writer_keeps_the_reader(loop, sockpair):
    a, b = sockpair
    got = []
    loop.add_reader(a.fileno(), lambda: got.append(a.recv(100)))
    loop.add_writer(a.fileno(), lambda: None)
    assert loop.remove_writer(a.fileno()) is True
    b.send(b"still reading")
    run_until(loop, lambda: got)
    assert got == [b"still reading"]
    assert loop.remove_reader(a.fileno()) is True


def test_remove_returns_true_then_false(loop, sockpair):
    a, _ = sockpair
    fd = a.fileno()
    assert loop.remove_reader(fd) is False
    assert loop.remove_writer(fd) is False
    loop.add_reader(fd, lambda: None)
    loop.add_writer(fd, lambda: None)
    assert loop.remove_reader(fd) is True
    assert loop.remove_reader(fd) is False
    assert loop.remove_writer(fd) is True
    assert loop.remove_writer(fd) is False


def test_remove_reader_for_a_writer_only_fd_returns_false(loop, sockpair):
    a, _ = sockpair
    loop.add_writer(a.fileno(), lambda: None)
    assert loop.remove_reader(a.fileno()) is False
    assert loop.remove_writer(a.fileno()) is True


def test_reader_removed_inside_its_callback_is_not_called_again(loop, sockpair):
    a, b = sockpair
    calls = []

    def on_readable():
        calls.append("r")
        loop.remove_reader(a.fileno())

    b.send(b"unread data stays")
    loop.add_reader(a.fileno(), on_readable)
    run_briefly(loop, turns=4)
    assert calls == ["r"]


def test_raising_reader_goes_to_the_exception_handler_and_stays_registered(loop, sockpair):
    a, b = sockpair
    contexts = []
    got = []
    loop.set_exception_handler(lambda lp, context: contexts.append(context))

    def on_readable():
        if not contexts:
            raise ValueError("reader failed")
        got.append(a.recv(100))
        loop.remove_reader(a.fileno())

    loop.add_reader(a.fileno(), on_readable)
    b.send(b"retry")
    run_until(loop, lambda: got)
    assert got == [b"retry"]
    assert len(contexts) == 1
    assert isinstance(contexts[0]["exception"], ValueError)
    assert "handle" in contexts[0]


def test_add_reader_on_a_closed_loop_raises(loop, sockpair):
    a, _ = sockpair
    loop.close()
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        loop.add_reader(a.fileno(), lambda: None)
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        loop.add_writer(a.fileno(), lambda: None)


def test_remove_reader_on_a_closed_loop_returns_false(loop, sockpair):
    a, _ = sockpair
    loop.add_reader(a.fileno(), lambda: None)
    loop.close()
    assert loop.remove_reader(a.fileno()) is False
    assert loop.remove_writer(a.fileno()) is False


def expected_error(call):
    """Run ``call`` against a fresh stock asyncio loop and return the exception it raises."""
    stock = new_loop("asyncio")
    try:
        with pytest.raises(Exception) as info:
            call(stock)
        return info.value
    finally:
        stock.close()


@pytest.mark.parametrize("bad", [-1, "not a fd", None, 1.5])
@pytest.mark.parametrize("method", ["add_reader", "add_writer"])
def test_bad_fd_raises_the_same_exception_as_asyncio(loop, bad, method):
    expected = expected_error(lambda lp: getattr(lp, method)(bad, lambda: None))
    with pytest.raises(type(expected)) as info:
        getattr(loop, method)(bad, lambda: None)
    assert type(info.value) is type(expected)


@pytest.mark.parametrize("bad", [-1, "not a fd"])
@pytest.mark.parametrize("method", ["remove_reader", "remove_writer"])
def test_remove_with_a_bad_fd_raises_the_same_exception_as_asyncio(loop, bad, method):
    expected = expected_error(lambda lp: getattr(lp, method)(bad))
    with pytest.raises(type(expected)) as info:
        getattr(loop, method)(bad)
    assert type(info.value) is type(expected)


def unused_fd():
    """A descriptor number that is not open (and, being high, will not be reused soon)."""
    for fd in range(1000, 2000):
        try:
            os.fstat(fd)
        except OSError:
            return fd
    pytest.fail("no unused fd found")


def test_closed_fd_raises_the_same_exception_as_asyncio(loop):
    # A recently closed low fd would be reused by the loop's own epoll/self-pipe.
    r = unused_fd()
    expected = expected_error(lambda lp: lp.add_reader(r, lambda: None))
    assert isinstance(expected, OSError) and expected.errno == errno.EBADF
    with pytest.raises(OSError) as info:
        loop.add_reader(r, lambda: None)
    assert info.value.errno == errno.EBADF
    assert type(info.value) is type(expected)
    # The failed registration leaves nothing behind.
    assert loop.remove_reader(r) is False


def test_regular_file_raises_the_same_exception_as_asyncio(loop):
    with tempfile.TemporaryFile() as f:
        fd = f.fileno()
        expected = expected_error(lambda lp: lp.add_reader(fd, lambda: None))
        with pytest.raises(OSError) as info:
            loop.add_reader(fd, lambda: None)
        assert type(info.value) is type(expected)
        assert info.value.errno == expected.errno
        assert loop.remove_reader(fd) is False
