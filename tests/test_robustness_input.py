"""Odd input at the native entry points: asyncio's answer, type and message."""

import asyncio
import fractions
import os
import sys

import pytest
from parity_helpers import StreamRecorder, connect_pair, run, spin

Recorder = StreamRecorder


def connect(loop, protocol_factory=Recorder):
    return connect_pair(loop, protocol_factory)


def record_errors(loop):
    errors = []
    loop.set_exception_handler(
        lambda lp, context: errors.append((context["message"], context.get("exception")))
    )
    return errors


def drain(sock):
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


# File descriptors too large for a C int.


@pytest.mark.parametrize("fd", [2**31, 2**40, 2**70])
@pytest.mark.parametrize("method", ["remove_reader", "remove_writer"])
def test_removing_an_fd_too_large_for_a_c_int_answers_false(loop, fd, method):
    assert getattr(loop, method)(fd) is False


@pytest.mark.parametrize("fd", [2**31, 2**40, 2**70])
@pytest.mark.parametrize("method", ["add_reader", "add_writer"])
def test_adding_an_fd_too_large_for_a_c_int_is_epolls_overflow_error(loop, fd, method):
    with pytest.raises(OverflowError, match="Python int too large to convert to C int"):
        getattr(loop, method)(fd, lambda: None)
    # Nothing was registered: the loop still runs and the fd is unknown.
    assert getattr(loop, method.replace("add", "remove"))(fd) is False
    run(loop, asyncio.sleep(0))


def test_selector_get_key_of_an_fd_too_large_is_a_key_error(loop):
    with pytest.raises(KeyError):
        loop._selector.get_key(2**40)


# Water marks: asyncio keeps whatever number it is given.


@pytest.mark.parametrize("high", [1e6, 2**70, 65536.5, fractions.Fraction(7, 2)])
def test_write_buffer_limits_accept_any_real_number(loop, high):
    transport, _protocol, peer = connect(loop)
    try:
        transport.set_write_buffer_limits(high=high)
        low, got_high = transport.get_write_buffer_limits()
        assert got_high == high and type(got_high) is type(high)
        assert low == high // 4 and type(low) is type(high // 4)
        # An int larger than any buffer never pauses the protocol.
        transport.write(b"x" * 1000)
        assert not transport._protocol_paused
    finally:
        transport.close()
        peer.close()
        spin(loop, 0.01)


def test_float_water_marks_pause_and_resume_as_asyncio(loop):
    events = []

    class Flow(Recorder):
        def pause_writing(self):
            events.append(("pause", self.transport.get_write_buffer_size()))

        def resume_writing(self):
            events.append(("resume", self.transport.get_write_buffer_size()))

    transport, _protocol, peer = connect(loop, Flow)
    try:
        transport.pause_reading()
        # Fill the socket so that what follows is queued.
        chunk = b"x" * 65536
        while transport.get_write_buffer_size() == 0:
            transport.write(chunk)
        queued = transport.get_write_buffer_size()
        transport.set_write_buffer_limits(high=queued + 0.5, low=queued - 0.5)
        assert events == []
        transport.write(b"y")  # queued + 1 > queued + 0.5
        assert events == [("pause", queued + 1)]
        total = len(drain(peer))
        for _ in range(100):
            if len(events) > 1:
                break
            spin(loop, 0.01)
            total += len(drain(peer))
        assert events[1][0] == "resume"
        assert events[1][1] <= queued - 0.5
    finally:
        transport.abort()
        peer.close()
        spin(loop, 0.01)


# write() of a memoryview without a contiguous buffer (a strided slice).


def test_write_of_a_strided_memoryview_is_a_fatal_write_error(loop):
    errors = record_errors(loop)
    transport, protocol, peer = connect(loop)
    try:
        transport.write(b"ab")
        transport.write(memoryview(b"0123456789")[::3])  # sock.send raises BufferError
        transport.write(b"cd")  # the connection is lost: dropped
        spin(loop)
        assert drain(peer) == b"ab"
        assert len(errors) == 1
        message, exc = errors[0]
        assert message == "Fatal write error on socket transport"
        assert isinstance(exc, BufferError)
        assert transport.is_closing()
        assert protocol.events == [("lost", "BufferError")]
    finally:
        peer.close()


@pytest.mark.skipif(
    sys.version_info >= (3, 12),
    reason="asyncio 3.12+ queues the view and fails at the next send; ferroloop's write copies "
    "as 3.11's does (README, Differences from asyncio)",
)
def test_write_of_a_strided_memoryview_behind_queued_data_is_311s_type_error(loop):
    errors = record_errors(loop)
    transport, _protocol, peer = connect(loop)
    try:
        transport.pause_reading()
        chunk = b"x" * 65536
        sent = b""
        while transport.get_write_buffer_size() == 0:
            transport.write(chunk)
            sent += chunk
        queued = transport.get_write_buffer_size()
        with pytest.raises(TypeError, match="can't set bytearray slice from memoryview"):
            transport.write(memoryview(b"0123456789")[::3])
        assert transport.get_write_buffer_size() == queued
        transport.write(b"end")
        received = b""
        for _ in range(200):
            received += drain(peer)
            if len(received) >= len(sent) + 3:
                break
            spin(loop, 0.01)
        assert received == sent + b"end"
        assert errors == []
        assert not transport.is_closing()
    finally:
        transport.close()
        peer.close()
        spin(loop, 0.01)


def test_write_of_an_empty_strided_memoryview_is_a_no_op(loop):
    errors = record_errors(loop)
    transport, _protocol, peer = connect(loop)
    try:
        transport.write(memoryview(b"0123456789")[5:5:2])
        transport.write(b"ok")
        spin(loop)
        assert drain(peer) == b"ok"
        assert errors == []
    finally:
        transport.close()
        peer.close()
        spin(loop, 0.01)


# get_buffer() returning a buffer recv_into refuses.


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: b"read-only", "bytes"),
        (lambda: memoryview(bytearray(10))[::2], "memoryview"),
        (lambda: memoryview(b"read-only"), "memoryview"),
        (lambda: [1, 2, 3], "list"),
    ],
)
def test_get_buffer_returning_an_unwritable_buffer_is_recv_intos_type_error(loop, make, name):
    errors = record_errors(loop)
    lost = []

    class Buffered(asyncio.BufferedProtocol):
        def get_buffer(self, sizehint):
            return make()

        def buffer_updated(self, nbytes):
            raise AssertionError("no data can be read into it")

        def connection_lost(self, exc):
            lost.append(exc)

    _transport, _protocol, peer = connect(loop, Buffered)
    try:
        peer.send(b"hello")
        spin(loop)
    finally:
        peer.close()
    assert len(errors) == 1
    message, exc = errors[0]
    assert message == "Fatal read error on socket transport"
    assert type(exc) is TypeError
    assert str(exc) == f"recv_into() argument 1 must be read-write bytes-like object, not {name}"
    assert lost == [exc]


def test_regular_file_and_closed_fd_readers_raise_asyncios_errors(loop, tmp_path):
    path = tmp_path / "regular"
    path.write_bytes(b"")
    with open(path, "rb") as f:
        with pytest.raises(PermissionError):
            loop.add_reader(f, lambda: None)
        assert loop.remove_reader(f) is False
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as info:
        loop.add_reader(r, lambda: None)
    assert info.value.errno is not None
    assert loop.remove_reader(r) is False
    run(loop, asyncio.sleep(0))


def _cpython_test_cert():
    import test

    path = os.path.join(os.path.dirname(test.__file__), "certdata", "keycert.pem")
    if not os.path.exists(path):
        pytest.skip("CPython's test certificates are not installed")
    return path


def test_tls_write_after_close_raises_asyncios_errors(loop):
    import ssl

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(_cpython_test_cert())
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE

    async def main():
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        protocol = Recorder()
        transport, _ = await loop.create_connection(
            lambda: protocol, "127.0.0.1", port, ssl=client_ctx
        )
        transport.close()
        for _ in range(100):
            if protocol.events:
                break
            await asyncio.sleep(0.01)
        server.close()
        await server.wait_closed()
        return transport, protocol

    transport, protocol = run(loop, main())
    assert protocol.events and protocol.events[-1][0] == "lost"
    transport.close()  # a second close() drops the transport's SSL protocol (asyncio's)
    with pytest.raises(TypeError, match="^data: expecting a bytes-like instance, got str$"):
        transport.write("str")
    with pytest.raises(AttributeError, match="_write_appdata"):
        transport.write(b"data")
    transport.write(b"")  # nothing to write: no error, as asyncio
