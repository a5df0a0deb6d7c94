"""Re-entrancy: user code that runs while the loop or a transport is mid-operation.

A protocol (or a buffer, a waiter) whose last reference a transport drops runs its
``__del__`` (and weakref callbacks) right there; on asyncio's plain Python transports that
code may call the transport freely, so it must work on the native cores too.
"""

import asyncio
import gc
import os

import pytest
from parity_helpers import StreamRecorder, connect_pair, run, run_briefly, spin

Recorder = StreamRecorder


def connect(loop, protocol_factory=Recorder):
    return connect_pair(loop, protocol_factory)


def calls_on_del(results, action, base=asyncio.Protocol):
    """A protocol whose __del__ runs ``action()`` and records its outcome."""

    class OnDel(base):
        def __del__(self):
            try:
                action()
                results.append("ok")
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
                results.append(f"{type(exc).__name__}: {exc}")

    return OnDel()


STREAM_ACTIONS = {
    "get_write_buffer_size": lambda tr, other: tr.get_write_buffer_size(),
    "write": lambda tr, other: tr.write(b"x"),
    "is_closing": lambda tr, other: tr.is_closing(),
    "get_protocol": lambda tr, other: tr.get_protocol(),
    "set_protocol": lambda tr, other: tr.set_protocol(other),
    "pause_reading": lambda tr, other: (tr.pause_reading(), tr.resume_reading()),
    "repr": lambda tr, other: repr(tr),
}


@pytest.mark.parametrize("name", list(STREAM_ACTIONS))
def test_old_protocol_dropped_by_set_protocol_may_call_the_transport(loop, name):
    results = []
    transport, protocol, peer = connect(loop)
    try:
        action = STREAM_ACTIONS[name]
        transport.set_protocol(calls_on_del(results, lambda: action(transport, protocol)))
        transport.set_protocol(protocol)  # drops the last reference to the first one
        gc.collect()
        assert results == ["ok"]
        assert transport.get_protocol() is protocol
    finally:
        transport.close()
        peer.close()
        spin(loop, 0.01)


@pytest.mark.parametrize("how", ["close", "abort"])
def test_protocol_dropped_after_connection_lost_may_call_the_transport(loop, how):
    results = []
    transport, _protocol, peer = connect(loop)
    try:

        def action():
            assert transport.is_closing()
            assert transport.get_write_buffer_size() == 0
            transport.write(b"after")  # counted and dropped, as after any loss
            transport.close()
            transport.abort()

        transport.set_protocol(calls_on_del(results, action))
        getattr(transport, how)()
        spin(loop)
        gc.collect()
        assert results == ["ok"]
    finally:
        peer.close()


def test_datagram_protocol_dropped_after_close_may_call_the_transport(loop):
    results = []
    holder = {}

    def action():
        transport = holder["transport"]
        assert transport.is_closing()
        assert transport.get_write_buffer_size() == 0
        transport.abort()

    async def main():
        # Only the transport holds the protocol: it goes when the transport drops it.
        transport = (
            await loop.create_datagram_endpoint(
                lambda: calls_on_del(results, action, asyncio.DatagramProtocol),
                local_addr=("127.0.0.1", 0),
            )
        )[0]
        holder["transport"] = transport
        transport.close()
        await asyncio.sleep(0.02)

    run(loop, main())
    gc.collect()
    assert results == ["ok"]


def test_read_pipe_protocol_dropped_after_close_may_call_the_transport(loop):
    results = []
    holder = {}
    r, w = os.pipe()

    def action():
        transport = holder["transport"]
        assert transport.is_closing()
        transport.pause_reading()
        transport.resume_reading()

    async def main():
        transport = (
            await loop.connect_read_pipe(lambda: calls_on_del(results, action), os.fdopen(r, "rb"))
        )[0]
        holder["transport"] = transport
        transport.close()
        await asyncio.sleep(0.02)

    try:
        run(loop, main())
    finally:
        os.close(w)
    gc.collect()
    assert results == ["ok"]


def test_buffer_from_get_buffer_lives_until_buffer_updated_returns(loop):
    events = []

    class Buffer(bytearray):
        def __del__(self):
            events.append("buffer freed")

    class Buffered(asyncio.BufferedProtocol):
        def get_buffer(self, sizehint):
            return Buffer(16)

        def buffer_updated(self, nbytes):
            events.append(("buffer_updated", nbytes))

    transport, _protocol, peer = connect(loop, Buffered)
    try:
        peer.send(b"abc")
        spin(loop, 0.02)
    finally:
        transport.close()
        peer.close()
        spin(loop, 0.01)
    assert events[:2] == [("buffer_updated", 3), "buffer freed"]


# The loop's own re-entrancy: what a callback does to the loop and to other callbacks.


def test_a_reader_removing_another_ready_reader_stops_its_callback(loop):
    calls = []
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:

        def first():
            calls.append("first")
            os.read(r1, 10)
            loop.remove_reader(r2)
            loop.remove_reader(r1)

        def second():
            calls.append("second")
            os.read(r2, 10)
            loop.remove_reader(r1)
            loop.remove_reader(r2)

        loop.add_reader(r1, first)
        loop.add_reader(r2, second)
        os.write(w1, b"x")
        os.write(w2, b"y")
        spin(loop)
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)
    # Both were ready in the same turn: whichever ran first cancelled the other.
    assert len(calls) == 1


def test_a_reader_replacing_itself_from_its_callback(loop):
    calls = []
    r, w = os.pipe()
    try:

        def first():
            calls.append(("first", os.read(r, 1)))
            loop.remove_reader(r)
            loop.add_reader(r, second)

        def second():
            calls.append(("second", os.read(r, 1)))
            if len(calls) == 3:
                loop.remove_reader(r)

        loop.add_reader(r, first)
        os.write(w, b"abcd")
        spin(loop)
        assert loop.remove_reader(r) is False
    finally:
        os.close(r)
        os.close(w)
    assert calls == [("first", b"a"), ("second", b"b"), ("second", b"c")]


def test_closing_an_fd_from_its_own_reader_callback(loop):
    calls = []
    r, w = os.pipe()

    def on_readable():
        calls.append("readable")
        os.close(r)

    loop.add_reader(r, on_readable)
    os.write(w, b"x")
    spin(loop)
    os.close(w)
    assert calls == ["readable"]
    assert loop.remove_reader(r) is True  # still registered, as asyncio's selector says


@pytest.mark.parametrize("attempt", ["close", "run_forever", "run_until_complete"])
def test_close_and_run_from_a_callback_are_refused(loop, attempt):
    # One attempt per run: from 3.13 a refused run_forever() resets the running loop in
    # its cleanup (asyncio's own behaviour, which ferroloop follows).
    errors = []

    async def nothing():
        pass

    def callback():
        coro = nothing()
        try:
            if attempt == "run_until_complete":
                loop.run_until_complete(coro)
            else:
                getattr(loop, attempt)()
        except RuntimeError as exc:
            errors.append(str(exc))
        finally:
            coro.close()

    loop.call_soon(callback)
    run_briefly(loop)
    expected = {
        "close": "Cannot close a running event loop",
        "run_forever": "This event loop is already running",
        "run_until_complete": "This event loop is already running",
    }
    assert errors == [expected[attempt]]
    assert not loop.is_closed()
