"""asyncio's task-level API (wait, gather, as_completed, wait_for, shield, timeout,
TaskGroup, cancellation, task factories) running on each loop."""

import asyncio
import contextvars
import gc
import sys
import weakref

import ferroloop
import pytest
from parity_helpers import new_loop

PY311 = sys.version_info >= (3, 11)
needs_311 = pytest.mark.skipif(not PY311, reason="3.11+ API")

var = contextvars.ContextVar("task_var", default="default")


async def value_after(value, delay=0.0):
    await asyncio.sleep(delay)
    return value


async def fail_after(exc, delay=0.0):
    await asyncio.sleep(delay)
    raise exc


async def forever():
    await asyncio.get_running_loop().create_future()


async def cancel_and_wait(task):
    """Cancel a task and let it finish, so no pending task outlives the test."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# -- asyncio.wait -------------------------------------------------------------------------


def test_wait_all_completed(loop):
    async def main():
        tasks = [asyncio.ensure_future(value_after(i, 0.001 * i)) for i in range(3)]
        done, pending = await asyncio.wait(tasks)
        return sorted(t.result() for t in done), pending

    results, pending = loop.run_until_complete(main())
    assert results == [0, 1, 2]
    assert pending == set()


def test_wait_first_completed(loop):
    async def main():
        fast = asyncio.ensure_future(value_after("fast", 0))
        slow = asyncio.ensure_future(forever())
        done, pending = await asyncio.wait({fast, slow}, return_when=asyncio.FIRST_COMPLETED)
        await cancel_and_wait(slow)
        return done == {fast}, pending == {slow}

    assert loop.run_until_complete(main()) == (True, True)


def test_wait_first_exception(loop):
    async def main():
        ok = asyncio.ensure_future(value_after("ok", 0))
        bad = asyncio.ensure_future(fail_after(ValueError("bad"), 0.005))
        slow = asyncio.ensure_future(forever())
        done, pending = await asyncio.wait({ok, bad, slow}, return_when=asyncio.FIRST_EXCEPTION)
        await cancel_and_wait(slow)
        return done == {ok, bad}, pending == {slow}, type(bad.exception())

    assert loop.run_until_complete(main()) == (True, True, ValueError)


def test_wait_timeout(loop):
    async def main():
        slow = asyncio.ensure_future(forever())
        done, pending = await asyncio.wait({slow}, timeout=0.01)
        await cancel_and_wait(slow)
        return done, pending == {slow}

    done, pending_ok = loop.run_until_complete(main())
    assert done == set()
    assert pending_ok


def test_wait_rejects_an_empty_set(loop):
    async def main():
        await asyncio.wait(set())

    with pytest.raises(ValueError):
        loop.run_until_complete(main())


# -- gather -------------------------------------------------------------------------------


def test_gather_keeps_argument_order(loop):
    async def main():
        return await asyncio.gather(value_after("a", 0.01), value_after("b", 0), value_after("c"))

    assert loop.run_until_complete(main()) == ["a", "b", "c"]


def test_gather_propagates_the_first_exception(loop):
    async def main():
        return await asyncio.gather(value_after(1), fail_after(KeyError("k")))

    with pytest.raises(KeyError):
        loop.run_until_complete(main())


def test_gather_return_exceptions(loop):
    async def main():
        return await asyncio.gather(
            value_after(1), fail_after(KeyError("k")), return_exceptions=True
        )

    result = loop.run_until_complete(main())
    assert result[0] == 1
    assert isinstance(result[1], KeyError)


def test_gather_with_no_awaitables(loop):
    async def main():
        return await asyncio.gather()

    assert loop.run_until_complete(main()) == []


def test_cancelling_the_gather_cancels_the_children(loop):
    async def main():
        children = [asyncio.ensure_future(forever()) for _ in range(3)]
        outer = asyncio.gather(*children)
        await asyncio.sleep(0)
        outer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outer
        return [c.cancelled() for c in children]

    assert loop.run_until_complete(main()) == [True, True, True]


def test_cancelling_a_child_of_gather(loop):
    async def main():
        child = asyncio.ensure_future(forever())
        other = asyncio.ensure_future(value_after("other", 0.005))
        outer = asyncio.gather(child, other)
        await asyncio.sleep(0)
        child.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outer
        return other.cancelled(), await other

    # The sibling is not cancelled when a child is, and still completes.
    assert loop.run_until_complete(main()) == (False, "other")


def test_cancelled_child_with_return_exceptions(loop):
    async def main():
        child = asyncio.ensure_future(forever())
        outer = asyncio.gather(child, value_after(2), return_exceptions=True)
        await asyncio.sleep(0)
        child.cancel()
        return await outer

    result = loop.run_until_complete(main())
    assert isinstance(result[0], asyncio.CancelledError)
    assert result[1] == 2


# -- as_completed / wait_for / shield --------------------------------------------------


def test_as_completed_yields_in_completion_order(loop):
    async def main():
        out = []
        aws = [value_after("slow", 0.02), value_after("fast", 0), value_after("mid", 0.01)]
        for next_done in asyncio.as_completed(aws):
            out.append(await next_done)
        return out

    assert loop.run_until_complete(main()) == ["fast", "mid", "slow"]


def test_as_completed_timeout(loop):
    async def main():
        never = asyncio.ensure_future(forever())
        with pytest.raises(asyncio.TimeoutError):
            for next_done in asyncio.as_completed([never], timeout=0.01):
                await next_done
        await cancel_and_wait(never)  # as_completed leaves it running
        return "timed out"

    assert loop.run_until_complete(main()) == "timed out"


def test_wait_for_returns_the_result(loop):
    async def main():
        return await asyncio.wait_for(value_after("in time"), timeout=1)

    assert loop.run_until_complete(main()) == "in time"


def test_wait_for_times_out_and_cancels_the_inner_task(loop):
    async def main():
        inner = asyncio.ensure_future(forever())
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(inner, timeout=0.01)
        return inner.cancelled()

    assert loop.run_until_complete(main()) is True


def test_wait_for_with_no_timeout(loop):
    async def main():
        return await asyncio.wait_for(value_after(5, 0.001), timeout=None)

    assert loop.run_until_complete(main()) == 5


def test_shield_protects_the_inner_task(loop):
    async def main():
        inner = asyncio.ensure_future(value_after("survived", 0.01))
        outer = asyncio.ensure_future(asyncio.shield(inner))
        await asyncio.sleep(0)
        outer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outer
        return await inner

    assert loop.run_until_complete(main()) == "survived"


# -- asyncio.timeout / TaskGroup (3.11+) -------------------------------------------------


@needs_311
def test_timeout_context_manager(loop):
    async def main():
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01) as cm:
                await forever()
        return cm.expired()

    assert loop.run_until_complete(main()) is True


@needs_311
def test_timeout_not_reached(loop):
    async def main():
        async with asyncio.timeout(1) as cm:
            await asyncio.sleep(0)
        return cm.expired()

    assert loop.run_until_complete(main()) is False


@needs_311
def test_timeout_at_and_reschedule(loop):
    async def main():
        running = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout_at(running.time() + 10) as cm:
                cm.reschedule(running.time() + 0.005)
                await forever()
        return cm.when() is not None

    assert loop.run_until_complete(main()) is True


@needs_311
def test_task_group_collects_results(loop):
    async def main():
        async with asyncio.TaskGroup() as tg:
            t1 = tg.create_task(value_after(1))
            t2 = tg.create_task(value_after(2, 0.001))
        return t1.result() + t2.result()

    assert loop.run_until_complete(main()) == 3


@needs_311
def test_task_group_cancels_siblings_on_error(loop):
    async def main():
        with pytest.raises(ExceptionGroup) as info:
            async with asyncio.TaskGroup() as tg:
                sibling = tg.create_task(forever())
                tg.create_task(fail_after(ValueError("boom")))
        return [type(e) for e in info.value.exceptions], sibling.cancelled()

    assert loop.run_until_complete(main()) == ([ValueError], True)


# -- cancellation -------------------------------------------------------------------------


def test_cancel_raises_at_the_next_await(loop):
    steps = []

    async def worker():
        steps.append("started")
        try:
            await forever()
        except asyncio.CancelledError:
            steps.append("cancelled")
            raise

    async def main():
        task = asyncio.ensure_future(worker())
        await asyncio.sleep(0)
        assert task.cancel() is True
        assert not task.done()  # cancellation is delivered at the task's next step
        with pytest.raises(asyncio.CancelledError):
            await task
        return task.cancelled()

    assert loop.run_until_complete(main()) is True
    assert steps == ["started", "cancelled"]


def test_cancel_before_the_task_starts(loop):
    steps = []

    async def worker():
        steps.append("ran")

    async def main():
        task = asyncio.ensure_future(worker())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return task.cancelled()

    assert loop.run_until_complete(main()) is True
    assert steps == []


def test_cancel_message_reaches_the_cancelled_coroutine(loop):
    seen = []

    async def worker():
        try:
            await forever()
        except asyncio.CancelledError as exc:
            seen.append(exc.args)
            raise

    async def main():
        task = asyncio.ensure_future(worker())
        await asyncio.sleep(0)
        task.cancel("the reason")
        with pytest.raises(asyncio.CancelledError):
            await task

    loop.run_until_complete(main())
    assert seen == [("the reason",)]


@needs_311
def test_cancel_message_reaches_the_awaiter(loop):
    async def main():
        task = asyncio.ensure_future(forever())
        await asyncio.sleep(0)
        task.cancel("the reason")
        try:
            await task
        except asyncio.CancelledError as exc:
            return exc.args

    assert loop.run_until_complete(main()) == ("the reason",)


def test_swallowed_cancellation(loop):
    async def worker():
        try:
            await forever()
        except asyncio.CancelledError:
            return "swallowed"

    async def main():
        task = asyncio.ensure_future(worker())
        await asyncio.sleep(0)
        task.cancel()
        return await task, task.cancelled()

    assert loop.run_until_complete(main()) == ("swallowed", False)


def test_cancel_a_done_task_returns_false(loop):
    async def main():
        task = asyncio.ensure_future(value_after(1))
        await task
        return task.cancel()

    assert loop.run_until_complete(main()) is False


@needs_311
def test_cancelling_and_uncancel(loop):
    async def main():
        task = asyncio.ensure_future(forever())
        await asyncio.sleep(0)
        assert task.cancelling() == 0
        task.cancel()
        task.cancel()
        counts = [task.cancelling()]
        counts.append(task.uncancel())
        counts.append(task.cancelling())
        with pytest.raises(asyncio.CancelledError):
            await task
        return counts

    assert loop.run_until_complete(main()) == [2, 1, 1]


def test_sleep_zero_yields_to_other_tasks(loop):
    order = []

    async def worker(name):
        for i in range(3):
            order.append((name, i))
            await asyncio.sleep(0)

    async def main():
        await asyncio.gather(worker("a"), worker("b"))

    loop.run_until_complete(main())
    assert order == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]


def test_sleep_returns_the_result(loop):
    async def main():
        return await asyncio.sleep(0, result="r0"), await asyncio.sleep(0.001, result="r1")

    assert loop.run_until_complete(main()) == ("r0", "r1")


# -- create_task: names, contexts, factories -------------------------------------------


def test_create_task_returns_the_loop_s_task(loop):
    # ferroloop loops make ferroloop.Task by default (README "Differences from asyncio").
    expected = ferroloop.Task if isinstance(loop, ferroloop.Loop) else asyncio.Task

    async def main():
        task = loop.create_task(value_after(1))
        return type(task), asyncio.isfuture(task), task.get_loop() is loop, await task

    assert loop.run_until_complete(main()) == (expected, True, True, 1)


@pytest.mark.parametrize("how", ["constructor", "attribute", "environment"])
def test_native_tasks_off_gives_asyncio_tasks(how, monkeypatch):
    if how == "environment":
        monkeypatch.setenv("FERROLOOP_TASKS", "asyncio")
        loop = ferroloop.new_event_loop()
    elif how == "constructor":
        loop = ferroloop.Loop(native_tasks=False)
    else:
        loop = ferroloop.new_event_loop()
        loop.native_tasks = False
    try:
        assert loop.native_tasks is False

        async def main():
            return type(asyncio.current_task()), type(loop.create_task(value_after(1)))

        assert loop.run_until_complete(main()) == (asyncio.Task, asyncio.Task)
    finally:
        loop.close()


def test_task_factory_wins_over_native_tasks():
    loop = ferroloop.new_event_loop()
    try:
        assert loop.native_tasks is True

        def factory(loop, coro, **kwargs):
            return asyncio.Task(coro, loop=loop, **kwargs)

        loop.set_task_factory(factory)

        async def main():
            return type(loop.create_task(value_after(1)))

        assert loop.run_until_complete(main()) is asyncio.Task
    finally:
        loop.close()


def test_create_task_name(loop):
    async def main():
        task = loop.create_task(value_after(1), name="my-task")
        name = task.get_name()
        await task
        unnamed = loop.create_task(value_after(2))
        await unnamed
        return name, unnamed.get_name(), repr(task)

    name, default_name, text = loop.run_until_complete(main())
    assert name == "my-task"
    assert default_name.startswith("Task-")
    assert "my-task" in text


@needs_311
def test_create_task_context(loop):
    ctx = contextvars.copy_context()
    ctx.run(var.set, "from-context")

    async def read():
        return var.get()

    async def main():
        return await loop.create_task(read(), context=ctx)

    assert loop.run_until_complete(main()) == "from-context"


def test_each_task_has_its_own_context(loop):
    async def setter(value):
        var.set(value)
        await asyncio.sleep(0)
        return var.get()

    async def main():
        var.set("main")
        results = await asyncio.gather(setter("one"), setter("two"))
        return results, var.get()

    assert loop.run_until_complete(main()) == (["one", "two"], "main")
    assert var.get() == "default"


def test_task_inherits_the_context_at_creation(loop):
    async def read():
        return var.get()

    async def main():
        var.set("parent")
        task = asyncio.ensure_future(read())
        var.set("changed after")
        return await task

    assert loop.run_until_complete(main()) == "parent"


def test_task_factory_called_as_factory_loop_coro(loop):
    calls = []

    def factory(lp, coro, **kwargs):
        calls.append((lp, kwargs))
        return asyncio.Task(coro, loop=lp)

    loop.set_task_factory(factory)
    assert loop.get_task_factory() is factory

    async def main():
        return await loop.create_task(value_after("made"))

    assert loop.run_until_complete(main()) == "made"
    # run_until_complete's own task and create_task's, both without a context
    assert calls and all(lp is loop and "context" not in kw for lp, kw in calls)
    loop.set_task_factory(None)
    assert loop.get_task_factory() is None


@needs_311
def test_task_factory_receives_the_context_keyword(loop):
    calls = []

    def factory(lp, coro, **kwargs):
        calls.append(kwargs)
        return asyncio.Task(coro, loop=lp, **kwargs)

    loop.set_task_factory(factory)
    ctx = contextvars.copy_context()
    ctx.run(var.set, "ctx")

    async def read():
        return var.get()

    async def main():
        return await loop.create_task(read(), context=ctx)

    assert loop.run_until_complete(main()) == "ctx"
    assert {"context": ctx} in calls


def test_task_factory_result_is_used(loop):
    class MyTask(asyncio.Task):
        pass

    loop.set_task_factory(lambda lp, coro, **kw: MyTask(coro, loop=lp, **kw))

    async def main():
        return type(asyncio.current_task()).__name__

    assert loop.run_until_complete(main()) == "MyTask"


def test_current_task_and_all_tasks(loop):
    async def main():
        me = asyncio.current_task()
        other = asyncio.ensure_future(forever())
        await asyncio.sleep(0)
        tasks = asyncio.all_tasks()
        await cancel_and_wait(other)
        return me is not None and me in tasks and other in tasks

    assert loop.run_until_complete(main()) is True
    assert asyncio.all_tasks(loop) == set()


def test_run_coroutine_threadsafe(loop):
    import threading

    results = []

    def worker():
        fut = asyncio.run_coroutine_threadsafe(value_after("threadsafe", 0.001), loop)
        results.append(fut.result(timeout=5))

    async def main():
        thread = threading.Thread(target=worker)
        thread.start()
        while not results:
            await asyncio.sleep(0.001)
        thread.join()
        return results[0]

    assert loop.run_until_complete(main()) == "threadsafe"


def test_create_future_returns_an_asyncio_future(loop):
    fut = loop.create_future()
    assert isinstance(fut, asyncio.Future)
    assert fut.get_loop() is loop
    fut.cancel()


def test_create_future_nested_in_get_debug(loop_kind):
    # Future.__init__ calls loop.get_debug(): a create_future made there gets its own loop.
    inner = new_loop(loop_kind)
    made = []

    class Loop(type(inner)):
        def get_debug(self):
            if not made:
                made.append(inner.create_future())
            return super().get_debug()

    outer = Loop()
    try:
        fut = outer.create_future()
        assert fut.get_loop() is outer
        assert made[0].get_loop() is inner
        assert outer.create_future().get_loop() is outer
        assert inner.create_future().get_loop() is inner
    finally:
        outer.close()
        inner.close()


def test_create_future_keeps_no_reference_to_the_loop(loop_kind):
    lp = new_loop(loop_kind)
    fut = lp.create_future()
    fut.cancel()
    lp.close()
    ref = weakref.ref(lp)
    del lp, fut
    gc.collect()
    assert ref() is None


def test_create_future_uses_a_patched_future_class(loop, monkeypatch):
    made = []

    class Future(asyncio.Future):
        def __init__(self, *, loop=None):
            made.append(loop)
            super().__init__(loop=loop)

    monkeypatch.setattr(asyncio.futures, "Future", Future)
    fut = loop.create_future()
    assert type(fut) is Future and made == [loop]
    monkeypatch.undo()
    assert type(loop.create_future()) is asyncio.Future
