"""Bad arguments raise the same exception types as asyncio.

asyncio validates callbacks (coroutines, non-callables) only in debug mode, so those tests
turn debug mode on for both loops.
"""

import asyncio
import sys

import pytest


async def a_coroutine_function():
    pass


def noop(*args):
    pass


def schedule(loop, method, callback):
    if method == "call_soon":
        return loop.call_soon(callback)
    if method == "call_later":
        return loop.call_later(0, callback)
    if method == "call_at":
        return loop.call_at(loop.time(), callback)
    if method == "call_soon_threadsafe":
        return loop.call_soon_threadsafe(callback)
    raise ValueError(method)


METHODS = ["call_soon", "call_later", "call_at", "call_soon_threadsafe"]

# The method named in asyncio's message (call_later delegates to call_at).
NAMED = {"call_soon": "call_soon", "call_later": "call_at", "call_at": "call_at"}
NAMED["call_soon_threadsafe"] = "call_soon_threadsafe"


@pytest.mark.parametrize("method", METHODS)
def test_coroutine_object_is_rejected_in_debug_mode(loop, method):
    loop.set_debug(True)
    coro = a_coroutine_function()
    try:
        with pytest.raises(
            TypeError, match=f"coroutines cannot be used with {NAMED[method]}\\(\\)"
        ):
            schedule(loop, method, coro)
    finally:
        coro.close()


@pytest.mark.parametrize("method", METHODS)
def test_coroutine_function_is_rejected_in_debug_mode(loop, method):
    loop.set_debug(True)
    with pytest.raises(TypeError, match=f"coroutines cannot be used with {NAMED[method]}\\(\\)"):
        schedule(loop, method, a_coroutine_function)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [1, "string", None])
def test_non_callable_is_rejected_in_debug_mode(loop, method, bad):
    loop.set_debug(True)
    with pytest.raises(TypeError, match=f"a callable object was expected by {NAMED[method]}\\(\\)"):
        schedule(loop, method, bad)


@pytest.mark.parametrize("method", ["call_soon", "call_later", "call_at"])
def test_unknown_keyword_argument_is_a_type_error(loop, method):
    with pytest.raises(TypeError):
        if method == "call_soon":
            loop.call_soon(noop, bogus=1)
        elif method == "call_later":
            loop.call_later(0, noop, bogus=1)
        else:
            loop.call_at(loop.time(), noop, bogus=1)


@pytest.mark.parametrize("delay", [None, "1", object()])
def test_call_later_with_a_bad_delay_is_a_type_error(loop, delay):
    with pytest.raises(TypeError):
        loop.call_later(delay, noop)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="an AssertionError before 3.11")
def test_call_at_with_none_is_a_type_error(loop):
    with pytest.raises(TypeError, match="when cannot be None"):
        loop.call_at(None, noop)


def test_call_later_with_a_float_subclass_and_int_works(loop):
    class MyFloat(float):
        pass

    h1 = loop.call_later(MyFloat(0.5), noop)
    h2 = loop.call_later(1, noop)
    h3 = loop.call_at(int(loop.time()) + 100, noop)
    assert h1.when() > 0 and h2.when() > 0 and h3.when() > 0
    for h in (h1, h2, h3):
        h.cancel()


def test_set_task_factory_rejects_non_callables(loop):
    with pytest.raises(TypeError, match="task factory must be a callable or None"):
        loop.set_task_factory(1)
    assert loop.get_task_factory() is None


def test_set_exception_handler_rejects_non_callables(loop):
    with pytest.raises(TypeError, match="A callable object or None is expected"):
        loop.set_exception_handler(42)


def test_run_until_complete_rejects_non_awaitables(loop):
    with pytest.raises(TypeError):
        loop.run_until_complete(42)
    assert not loop.is_running()


def test_create_task_rejects_non_coroutines(loop):
    with pytest.raises(TypeError):
        loop.create_task(42)


def test_create_task_rejects_a_plain_future(loop):
    fut = loop.create_future()
    with pytest.raises(TypeError):
        loop.create_task(fut)


def test_run_in_executor_rejects_non_callables_in_debug_mode(loop):
    loop.set_debug(True)
    with pytest.raises(TypeError, match="a callable object was expected by run_in_executor"):
        loop.run_in_executor(None, 42)


def test_bad_input_does_not_break_the_loop(loop):
    loop.set_debug(True)
    with pytest.raises(TypeError):
        loop.call_soon(42)
    with pytest.raises(TypeError):
        loop.call_later(None, noop)
    out = []
    loop.call_soon(out.append, "still works")
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert out == ["still works"]
    assert asyncio._get_running_loop() is None
