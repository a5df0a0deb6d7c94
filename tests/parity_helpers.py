"""Helpers shared by the parity tests (imported by conftest.py and the test modules)."""

import asyncio
import os
import socket

import pytest

SKIP_NATIVE = os.environ.get("FERROLOOP_SKIP_NATIVE") == "1"
LOOP_KINDS = ["asyncio"] if SKIP_NATIVE else ["asyncio", "ferroloop"]

# A generous bound for "the loop must not hang": only ever reached when a test fails.
WATCHDOG = 5.0


def import_ferroloop():
    """Import ferroloop, turning an import failure into a loud test failure."""
    try:
        import ferroloop
    except ImportError as exc:
        pytest.fail(f"import ferroloop failed: {exc!r}", pytrace=False)
    return ferroloop


def new_loop(kind):
    """A new, not-running, not-current loop of the given kind."""
    if kind == "asyncio":
        # The stock loop: asyncio's default policy, whatever policy is installed now.
        return asyncio.DefaultEventLoopPolicy().new_event_loop()
    if kind == "ferroloop":
        return import_ferroloop().new_event_loop()
    raise ValueError(kind)


def run_briefly(loop, turns=1):
    """Run the loop for a few turns (like asyncio's test_utils.run_briefly)."""
    for _ in range(turns):
        loop.call_soon(loop.stop)
        loop.run_forever()


def run_for(loop, seconds):
    """Run the loop until a timer fires after ``seconds``."""
    loop.call_later(seconds, loop.stop)
    loop.run_forever()


class DatagramRecorder(asyncio.DatagramProtocol):
    """A datagram protocol that records what it gets (and echoes it upper-cased if asked)."""

    def __init__(self, loop, echo=False):
        self.loop = loop
        self.echo = echo
        self.transport = None
        self.received = []
        self.errors = []
        self.got = asyncio.Queue()
        self.error = loop.create_future()
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.received.append((data, addr))
        self.got.put_nowait((data, addr))
        if self.echo:
            self.transport.sendto(data.upper(), addr)

    def error_received(self, exc):
        self.errors.append(exc)
        if not self.error.done():
            self.error.set_result(exc)

    def connection_lost(self, exc):
        self.lost.set_result(exc)


def run(loop, coro, timeout=WATCHDOG):
    """Run ``coro`` on ``loop``, failing (not hanging) if it takes longer than ``timeout``."""
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


async def turns(n=5):
    """Let the loop run a few turns."""
    for _ in range(n):
        await asyncio.sleep(0)


class StreamRecorder(asyncio.Protocol):
    """A stream protocol recording what it receives and how the connection ended."""

    def __init__(self):
        self.transport = None
        self.events = []

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.events.append(("data", data))

    def connection_lost(self, exc):
        self.events.append(("lost", type(exc).__name__))


def connect_pair(loop, protocol_factory=StreamRecorder):
    """A stream transport over one end of a socketpair: (transport, protocol, other end)."""
    a, b = socket.socketpair()
    b.setblocking(False)

    async def make():
        return await loop.create_connection(protocol_factory, sock=a)

    transport, protocol = run(loop, make())
    return transport, protocol, b


def spin(loop, seconds=0.05):
    """Let the loop run for a while (I/O and callbacks settle)."""
    run(loop, asyncio.sleep(seconds))
