"""Async generator hooks / shutdown_asyncgens, and the default executor."""

import asyncio
import concurrent.futures
import gc
import sys
import threading

import pytest
from parity_helpers import run_briefly


def make_agen(log):
    async def agen():
        try:
            yield 1
            yield 2
        finally:
            log.append("finalised")

    return agen()


def test_shutdown_asyncgens_finalises_a_suspended_generator(loop):
    log = []
    gen = make_agen(log)

    async def start():
        assert await gen.__anext__() == 1

    loop.run_until_complete(start())
    assert log == []
    loop.run_until_complete(loop.shutdown_asyncgens())
    assert log == ["finalised"]


def test_shutdown_asyncgens_reports_errors_to_the_exception_handler(loop):
    contexts = []
    loop.set_exception_handler(lambda lp, context: contexts.append(context))

    async def bad_agen():
        try:
            yield 1
        finally:
            raise ValueError("in aclose")

    gen = bad_agen()

    async def start():
        await gen.__anext__()

    loop.run_until_complete(start())
    loop.run_until_complete(loop.shutdown_asyncgens())
    assert len(contexts) == 1
    assert isinstance(contexts[0]["exception"], ValueError)
    assert "asynchronous generator" in contexts[0]["message"]


def test_garbage_collected_generator_is_finalised_by_the_loop(loop):
    log = []

    async def main():
        gen = make_agen(log)
        await gen.__anext__()
        del gen
        gc.collect()
        # The finalizer hook schedules aclose() as a task; let it run.
        for _ in range(5):
            await asyncio.sleep(0)

    loop.run_until_complete(main())
    assert log == ["finalised"]


def test_asyncgen_hooks_are_installed_only_while_running(loop):
    seen = []

    def hooks_inside():
        seen.append(sys.get_asyncgen_hooks())

    before = sys.get_asyncgen_hooks()
    loop.call_soon(hooks_inside)
    run_briefly(loop)
    assert seen[0].firstiter is not None
    assert seen[0].finalizer is not None
    assert seen[0] != before
    assert sys.get_asyncgen_hooks() == before


def test_new_generator_after_shutdown_asyncgens_warns(loop):
    loop.run_until_complete(loop.shutdown_asyncgens())
    log = []
    gen = make_agen(log)

    async def start():
        await gen.__anext__()

    with pytest.warns(ResourceWarning, match="shutdown_asyncgens"):
        loop.run_until_complete(start())
    loop.run_until_complete(gen.aclose())
    assert log == ["finalised"]


def test_default_executor_is_none_until_used(loop):
    # CPython's test utilities read this attribute when closing a loop.
    assert loop._default_executor is None


def test_run_in_executor_runs_in_another_thread(loop):
    main_thread = threading.get_ident()

    async def main():
        return await loop.run_in_executor(None, lambda a, b: (threading.get_ident(), a + b), 2, 3)

    ident, total = loop.run_until_complete(main())
    assert total == 5
    assert ident != main_thread


def test_run_in_executor_returns_an_asyncio_future(loop):
    async def main():
        fut = loop.run_in_executor(None, int, "7")
        assert isinstance(fut, asyncio.Future)
        return await fut

    assert loop.run_until_complete(main()) == 7


def test_run_in_executor_propagates_exceptions(loop):
    def fail():
        raise KeyError("in thread")

    async def main():
        await loop.run_in_executor(None, fail)

    with pytest.raises(KeyError, match="in thread"):
        loop.run_until_complete(main())


def test_run_in_executor_rejects_coroutine_functions_in_debug_mode(loop):
    # asyncio checks the callable only in debug mode.
    loop.set_debug(True)

    async def coro_fn():
        pass

    with pytest.raises(TypeError):
        loop.run_in_executor(None, coro_fn)


def test_run_in_executor_with_an_explicit_executor(loop):
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="explicit-pool") as pool:

        async def main():
            return await loop.run_in_executor(pool, lambda: threading.current_thread().name)

        name = loop.run_until_complete(main())
    assert name.startswith("explicit-pool")
    assert loop._default_executor is None


def test_set_default_executor(loop):
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="default-pool")
    try:
        loop.set_default_executor(pool)

        async def main():
            return await loop.run_in_executor(None, lambda: threading.current_thread().name)

        assert loop.run_until_complete(main()).startswith("default-pool")
    finally:
        pool.shutdown(wait=True)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="TypeError (not a warning) since 3.11")
def test_set_default_executor_requires_a_thread_pool(loop):
    with pytest.raises(TypeError):
        loop.set_default_executor(object())


def test_shutdown_default_executor(loop):
    async def main():
        await loop.run_in_executor(None, lambda: None)
        executor = loop._default_executor
        await loop.shutdown_default_executor()
        return executor

    executor = loop.run_until_complete(main())
    assert executor is not None
    with pytest.raises(RuntimeError):
        executor.submit(lambda: None)
    with pytest.raises(RuntimeError, match="Executor shutdown has been called"):
        loop.run_in_executor(None, lambda: None)


def test_shutdown_default_executor_without_an_executor(loop):
    loop.run_until_complete(loop.shutdown_default_executor())
    assert loop._default_executor is None


def test_close_shuts_down_the_default_executor(loop):
    pool = concurrent.futures.ThreadPoolExecutor(1)
    loop.set_default_executor(pool)

    async def main():
        return await loop.run_in_executor(None, lambda: "ran")

    assert loop.run_until_complete(main()) == "ran"
    loop.close()
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)
    pool.shutdown(wait=True)


def test_run_in_executor_on_a_closed_loop_raises(loop):
    loop.close()
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        loop.run_in_executor(None, lambda: None)
