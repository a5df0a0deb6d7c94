"""loop.getaddrinfo: the same answers and errors as asyncio, numeric hosts without a thread."""

import asyncio
import socket

import pytest
from parity_helpers import import_ferroloop

CASES = [
    ("127.0.0.1", 80),
    ("::1", "443"),
    (None, 0),
    ("0.0.0.0", None),
    ("localhost", 8080),  # a name: resolved in the default executor on both loops
]


@pytest.mark.parametrize(("host", "port"), CASES)
def test_same_answers_as_asyncio(loop, host, port):
    async def lookup(lp):
        return await lp.getaddrinfo(host, port, type=socket.SOCK_STREAM)

    expected = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    assert loop.run_until_complete(lookup(loop)) == expected


def test_flags_and_family_are_passed_on(loop):
    async def lookup():
        return await loop.getaddrinfo(
            "127.0.0.1", 0, family=socket.AF_INET, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
        )

    result = loop.run_until_complete(lookup())
    assert result == socket.getaddrinfo(
        "127.0.0.1", 0, socket.AF_INET, socket.SOCK_DGRAM, 0, socket.AI_PASSIVE
    )


@pytest.mark.parametrize("host", ["999.1.1.1", "::1", "127.0.0.1"])
def test_errors_are_gaierror(loop, host):
    async def lookup():
        # A family that does not match the numeric host (or no such host at all).
        family = socket.AF_INET6 if ":" not in host else socket.AF_INET
        return await loop.getaddrinfo(host, 80, family=family, flags=socket.AI_NUMERICHOST)

    with pytest.raises(socket.gaierror):
        loop.run_until_complete(lookup())


def test_closed_loop_refuses(loop):
    coro = loop.getaddrinfo("127.0.0.1", 80)
    loop.close()
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        coro.send(None)
    coro.close()


def test_after_executor_shutdown_refuses_like_asyncio(loop):
    async def main():
        await loop.shutdown_default_executor()
        return await loop.getaddrinfo("127.0.0.1", 80)

    with pytest.raises(RuntimeError, match="Executor shutdown has been called"):
        loop.run_until_complete(main())


def test_numeric_hosts_need_no_executor_thread():
    # ferroloop only (README, "Differences from asyncio"): no name service, no thread.
    ferroloop = import_ferroloop()
    loop = ferroloop.new_event_loop()
    try:
        loop.run_until_complete(loop.getaddrinfo("127.0.0.1", 80))
        assert loop._default_executor is None
        loop.set_debug(True)  # debug mode keeps asyncio's timed lookup in the executor
        loop.run_until_complete(loop.getaddrinfo("127.0.0.1", 80))
        assert loop._default_executor is not None
    finally:
        loop.close()


def test_cancelled_before_it_runs(loop):
    async def main():
        task = asyncio.ensure_future(loop.getaddrinfo("127.0.0.1", 80))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    loop.run_until_complete(main())
