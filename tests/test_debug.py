"""Debug mode: get/set_debug, slow callbacks, thread checks, source tracebacks."""

import asyncio
import logging
import sys
import time

import pytest
from parity_helpers import new_loop, run_briefly


def slow_callback():
    time.sleep(0.02)


def plain_callback():
    pass


def test_debug_default_matches_asyncio(loop):
    stock = new_loop("asyncio")
    try:
        assert loop.get_debug() == stock.get_debug()
    finally:
        stock.close()


def test_set_debug_round_trip(loop):
    loop.set_debug(True)
    assert loop.get_debug() is True
    loop.set_debug(False)
    assert loop.get_debug() is False


def test_slow_callback_duration_default(loop):
    assert loop.slow_callback_duration == 0.1


def test_slow_callback_is_logged_in_debug_mode(loop, caplog):
    # Asserts the warning, not a timing: the callback sleeps far beyond the threshold.
    caplog.set_level(logging.WARNING, logger="asyncio")
    loop.set_debug(True)
    loop.slow_callback_duration = 0.001
    loop.call_soon(slow_callback)
    run_briefly(loop)
    messages = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    slow = [m for m in messages if m.startswith("Executing ") and " took " in m]
    assert len(slow) == 1, messages
    assert "slow_callback" in slow[0]
    assert slow[0].endswith(" seconds")


def test_slow_task_step_is_logged_in_debug_mode(loop, caplog):
    caplog.set_level(logging.WARNING, logger="asyncio")
    loop.set_debug(True)
    loop.slow_callback_duration = 0.001

    async def slow_coroutine():
        time.sleep(0.02)  # noqa: ASYNC251 -- blocking on purpose: this step must be slow

    loop.run_until_complete(slow_coroutine())
    messages = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert any(
        m.startswith("Executing <Task") and "slow_coroutine" in m and " took " in m
        for m in messages
    ), messages


def test_slow_callback_is_not_logged_without_debug(loop, caplog):
    caplog.set_level(logging.WARNING, logger="asyncio")
    loop.set_debug(False)
    loop.slow_callback_duration = 0.001
    loop.call_soon(slow_callback)
    run_briefly(loop)
    messages = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert not any(m.startswith("Executing ") for m in messages)


@pytest.mark.parametrize("method", ["call_soon", "call_later", "call_at"])
def test_non_threadsafe_call_from_another_thread_raises_in_debug_mode(loop, method):
    loop.set_debug(True)

    def from_worker_thread():
        try:
            if method == "call_soon":
                loop.call_soon(plain_callback)
            elif method == "call_later":
                loop.call_later(0, plain_callback)
            else:
                loop.call_at(loop.time(), plain_callback)
        except RuntimeError as exc:
            return str(exc)
        return "no error"

    async def main():
        return await loop.run_in_executor(None, from_worker_thread)

    message = loop.run_until_complete(main())
    assert message == (
        "Non-thread-safe operation invoked on an event loop other than the current one"
    )


def test_call_soon_threadsafe_from_another_thread_is_fine_in_debug_mode(loop):
    loop.set_debug(True)
    out = []

    def from_worker_thread():
        loop.call_soon_threadsafe(out.append, "ok")

    async def main():
        await loop.run_in_executor(None, from_worker_thread)
        await asyncio.sleep(0)

    loop.run_until_complete(main())
    assert out == ["ok"]


def test_handle_repr_names_its_origin_in_debug_mode(loop):
    loop.set_debug(True)
    handle = loop.call_soon(plain_callback)
    timer = loop.call_later(10, plain_callback)
    assert "created at" in repr(handle)
    assert __file__ in repr(handle) or "test_debug.py" in repr(handle)
    assert "created at" in repr(timer)
    handle.cancel()
    timer.cancel()


def test_cancelled_handle_keeps_its_repr_in_debug_mode(loop):
    loop.set_debug(True)
    handle = loop.call_soon(plain_callback)
    handle.cancel()
    text = repr(handle)
    assert "cancelled" in text
    assert "plain_callback" in text


def test_exception_context_has_source_traceback_in_debug_mode(loop):
    loop.set_debug(True)
    contexts = []
    loop.set_exception_handler(lambda lp, context: contexts.append(context))

    def fail():
        raise ValueError("debug")

    loop.call_soon(fail)
    run_briefly(loop)
    assert len(contexts) == 1
    assert "source_traceback" in contexts[0]
    frames = contexts[0]["source_traceback"]
    assert any(
        frame.name == "test_exception_context_has_source_traceback_in_debug_mode"
        for frame in frames
    )


def test_no_source_traceback_without_debug(loop):
    loop.set_debug(False)
    contexts = []
    loop.set_exception_handler(lambda lp, context: contexts.append(context))

    def fail():
        raise ValueError("no debug")

    loop.call_soon(fail)
    run_briefly(loop)
    assert len(contexts) == 1
    assert "source_traceback" not in contexts[0]


def test_coroutine_origin_tracking_follows_debug_mode(loop):
    depths = []
    loop.set_debug(True)
    loop.call_soon(lambda: depths.append(sys.get_coroutine_origin_tracking_depth()))
    run_briefly(loop)
    loop.set_debug(False)
    loop.call_soon(lambda: depths.append(sys.get_coroutine_origin_tracking_depth()))
    run_briefly(loop)
    assert depths == [asyncio.constants.DEBUG_STACK_DEPTH, 0]
    assert sys.get_coroutine_origin_tracking_depth() == 0


def test_set_debug_while_running_enables_origin_tracking(loop):
    depths = []

    def enable():
        loop.set_debug(True)
        # asyncio applies the change from a callback scheduled threadsafe: look next turn.
        loop.call_soon(lambda: depths.append(sys.get_coroutine_origin_tracking_depth()))

    loop.call_soon(enable)
    run_briefly(loop, turns=3)
    assert depths == [asyncio.constants.DEBUG_STACK_DEPTH]
    assert sys.get_coroutine_origin_tracking_depth() == 0
