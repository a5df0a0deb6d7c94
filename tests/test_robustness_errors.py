"""Errors out of user code at every callback site, reported as asyncio reports them.

asyncio calls its error reporting (the exception handler, ``_fatal_error``,
``error_received``) from inside the ``except`` block that caught the error, so the handler
sees it as the exception being handled: ``sys.exc_info()``, ``logging.exception()`` and
``traceback.print_exc()`` name it, and an error the handler raises is chained to it.
"""

import asyncio
import io
import logging
import os
import socket
import sys

import pytest
from parity_helpers import StreamRecorder, connect_pair, run, run_briefly, spin

Recorder = StreamRecorder


def connect(loop, protocol_factory):
    return connect_pair(loop, protocol_factory)


def handled_exception_recorder(loop):
    """An exception handler recording (message start, the exception being handled)."""
    seen = []

    def handler(lp, context):
        seen.append((context["message"], context.get("exception"), sys.exc_info()[1]))

    loop.set_exception_handler(handler)
    return seen


def assert_reported_while_handled(seen, message_start, exc_type):
    assert len(seen) == 1, seen
    message, exception, handled = seen[0]
    assert message.startswith(message_start), message
    assert isinstance(exception, exc_type)
    assert handled is exception


def test_callback_error_is_the_handled_exception_in_the_handler(loop):
    seen = handled_exception_recorder(loop)
    loop.call_soon(lambda: 1 / 0)
    run_briefly(loop)
    assert_reported_while_handled(seen, "Exception in callback", ZeroDivisionError)


def test_timer_callback_error_is_the_handled_exception(loop):
    seen = handled_exception_recorder(loop)
    loop.call_later(0, lambda: 1 / 0)
    spin(loop, 0.01)
    assert_reported_while_handled(seen, "Exception in callback", ZeroDivisionError)


def test_reader_callback_error_is_the_handled_exception(loop):
    seen = handled_exception_recorder(loop)
    r, w = os.pipe()
    try:

        def on_readable():
            os.read(r, 1)
            raise ValueError("reader")

        loop.add_reader(r, on_readable)
        os.write(w, b"x")
        spin(loop)
        loop.remove_reader(r)
    finally:
        os.close(r)
        os.close(w)
    assert_reported_while_handled(seen, "Exception in callback", ValueError)


class RaisingIn(Recorder):
    def __init__(self, where):
        super().__init__()
        self.where = where

    def data_received(self, data):
        if self.where == "data_received":
            raise ValueError(self.where)

    def eof_received(self):
        if self.where == "eof_received":
            raise ValueError(self.where)

    def connection_lost(self, exc):
        if self.where == "connection_lost":
            raise ValueError(self.where)


@pytest.mark.parametrize(
    "where,message",
    [
        ("data_received", "Fatal error: protocol.data_received() call failed."),
        ("eof_received", "Fatal error: protocol.eof_received() call failed."),
        ("connection_lost", "Exception in callback"),
    ],
)
def test_protocol_error_is_the_handled_exception(loop, where, message):
    seen = handled_exception_recorder(loop)
    transport, _protocol, peer = connect(loop, lambda: RaisingIn(where))
    try:
        if where == "data_received":
            peer.send(b"x")
        elif where == "eof_received":
            peer.shutdown(socket.SHUT_WR)
        else:
            transport.close()
        spin(loop)
    finally:
        peer.close()
    assert_reported_while_handled(seen, message, ValueError)
    assert transport.is_closing()


class BufferedRaising(asyncio.BufferedProtocol):
    def __init__(self, where):
        self.where = where

    def get_buffer(self, sizehint):
        if self.where == "get_buffer":
            raise ValueError(self.where)
        return bytearray(16)

    def buffer_updated(self, nbytes):
        raise ValueError(self.where)


@pytest.mark.parametrize("where", ["get_buffer", "buffer_updated"])
def test_buffered_protocol_error_is_the_handled_exception(loop, where):
    seen = handled_exception_recorder(loop)
    _transport, _protocol, peer = connect(loop, lambda: BufferedRaising(where))
    try:
        peer.send(b"x")
        spin(loop)
    finally:
        peer.close()
    assert_reported_while_handled(seen, f"Fatal error: protocol.{where}() call failed.", ValueError)


def test_datagram_protocol_error_is_the_handled_exception(loop):
    seen = handled_exception_recorder(loop)

    class Raising(asyncio.DatagramProtocol):
        def datagram_received(self, data, addr):
            raise ValueError("datagram")

    async def main():
        transport, _ = await loop.create_datagram_endpoint(Raising, local_addr=("127.0.0.1", 0))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"x", transport.get_extra_info("sockname"))
            await asyncio.sleep(0.05)
        transport.close()
        await asyncio.sleep(0)

    run(loop, main())
    assert_reported_while_handled(seen, "Exception in callback", ValueError)


def test_error_received_sees_the_handled_oserror(loop):
    seen = []

    class Recording(asyncio.DatagramProtocol):
        def error_received(self, exc):
            seen.append((exc, sys.exc_info()[1]))

    async def main():
        # A connected UDP socket to a closed port: the ICMP error comes back as
        # ConnectionRefusedError on the next read.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            closed = probe.getsockname()
        transport, _ = await loop.create_datagram_endpoint(Recording, remote_addr=closed)
        for _ in range(20):
            transport.sendto(b"x")
            await asyncio.sleep(0.01)
            if seen:
                break
        transport.close()
        await asyncio.sleep(0)

    run(loop, main())
    assert seen
    for exc, handled in seen:
        assert isinstance(exc, OSError)
        assert handled is exc


def test_read_pipe_protocol_error_is_the_handled_exception(loop):
    seen = handled_exception_recorder(loop)

    class Raising(asyncio.Protocol):
        def data_received(self, data):
            raise ValueError("pipe")

    r, w = os.pipe()

    async def main():
        transport, _ = await loop.connect_read_pipe(Raising, os.fdopen(r, "rb"))
        os.write(w, b"x")
        await asyncio.sleep(0.05)
        transport.close()
        await asyncio.sleep(0)

    try:
        run(loop, main())
    finally:
        os.close(w)
    assert_reported_while_handled(seen, "Exception in callback", ValueError)


def test_logging_exception_in_a_handler_logs_the_traceback(loop):
    """The everyday form of the rule: ``logger.exception()`` in a custom handler."""
    stream = io.StringIO()
    logger = logging.getLogger("test_robustness_errors")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        loop.set_exception_handler(lambda lp, context: logger.exception(context["message"]))
        _transport, _protocol, peer = connect(loop, lambda: RaisingIn("data_received"))
        peer.send(b"x")
        spin(loop)
        peer.close()
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    text = stream.getvalue()
    assert "Traceback (most recent call last)" in text
    assert "ValueError: data_received" in text
    assert "NoneType: None" not in text


def test_an_error_raised_by_the_handler_is_chained_to_the_reported_one(loop, caplog):
    def handler(lp, context):
        raise KeyError("handler")

    loop.set_exception_handler(handler)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        _transport, _protocol, peer = connect(loop, lambda: RaisingIn("data_received"))
        peer.send(b"x")
        spin(loop)
        peer.close()
    records = [r for r in caplog.records if "Unhandled error in exception handler" in r.message]
    assert len(records) == 1
    exc = records[0].exc_info[1]
    assert isinstance(exc, KeyError)
    assert isinstance(exc.__context__, ValueError)
    assert str(exc.__context__) == "data_received"


def test_the_handled_exception_is_restored_after_the_report(loop):
    """Reporting inside an ``except`` block leaves that block's exception in place."""
    seen = handled_exception_recorder(loop)
    loop.call_soon(lambda: 1 / 0)
    try:
        raise LookupError("outer")
    except LookupError as outer:
        run_briefly(loop)
        assert sys.exc_info()[1] is outer
    assert sys.exc_info()[1] is None
    assert_reported_while_handled(seen, "Exception in callback", ZeroDivisionError)
