"""ferroloop's native Task (``ferroloop.Task``, ``ferroloop.task_factory``) against asyncio.Task.

Every test runs on both loops (the ``loop`` fixture: asyncio's and ferroloop's) x both task
kinds (the ``task_kind`` fixture): "asyncio" (the loop's default factory, so asyncio.Task:
the oracle) and "ferroloop" (``loop.set_task_factory(ferroloop.task_factory)``). The
expected values are asyncio's, so the "asyncio" task kind checks the test itself and a test
failing only for the "ferroloop" kind is a parity bug in ferroloop.Task.
"""

import asyncio
import collections.abc
import contextvars
import gc
import io
import re
import sys
import threading
import traceback
import types
import weakref

import pytest
from parity_helpers import SKIP_NATIVE, import_ferroloop, new_loop, run, run_briefly, turns

PY311 = sys.version_info >= (3, 11)
PY312 = sys.version_info >= (3, 12)
needs_311 = pytest.mark.skipif(not PY311, reason="3.11+ API")
needs_312 = pytest.mark.skipif(not PY312, reason="eager tasks are 3.12+")

# An error the loop logs through its default handler fails the test (conftest).
pytestmark = pytest.mark.usefixtures("no_unexpected_loop_errors")

TASK_KINDS = ["asyncio"] if SKIP_NATIVE else ["asyncio", "ferroloop"]

var = contextvars.ContextVar("native_task_var", default="default")


@pytest.fixture(params=TASK_KINDS)
def task_kind(request):
    """Which Task the loop's create_task makes: "asyncio" (oracle) or "ferroloop"."""
    return request.param


@pytest.fixture
def tloop(loop, task_kind):
    """The ``loop`` fixture, its task factory set to ferroloop's for the "ferroloop" kind,
    and making asyncio's Task for the "asyncio" kind (a ferroloop loop's default is
    ferroloop.Task: README "Differences from asyncio")."""
    if task_kind == "ferroloop":
        loop.set_task_factory(import_ferroloop().task_factory)
    elif hasattr(loop, "native_tasks"):
        loop.native_tasks = False
    return loop


def task_class(task_kind):
    return asyncio.Task if task_kind == "asyncio" else import_ferroloop().Task


def xfail_for_ferroloop(request, task_kind, reason):
    """Mark the ferroloop-kind instances of a test as a strict expected failure."""
    if task_kind == "ferroloop":
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


def context_of(task):
    """Task.get_context() (3.12+; the _context attribute before)."""
    if hasattr(task, "get_context"):
        return task.get_context()
    return getattr(task, "_context", None)  # not exposed by 3.11's C Task


async def value(v):
    await asyncio.sleep(0)
    return v


async def fail(exc):
    await asyncio.sleep(0)
    raise exc


async def wait_on(fut):
    return await fut


async def cancel_and_wait(*tasks):
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- the kind of task -----------------------------------------------------------------------


def test_create_task_makes_the_kind_under_test(tloop, task_kind):
    cls = task_class(task_kind)

    async def main():
        inner = asyncio.create_task(value(1))
        return type(inner), type(asyncio.current_task()), await inner

    outer = tloop.create_task(main())
    assert type(outer) is cls
    assert tloop.run_until_complete(outer) == (cls, cls, 1)
    assert asyncio.isfuture(outer)
    assert outer.get_loop() is tloop


def test_task_class_api_shape(task_kind):
    cls = task_class(task_kind)
    alias = cls[int]
    assert isinstance(alias, types.GenericAlias)
    assert alias.__origin__ is cls
    assert alias.__args__ == (int,)
    if task_kind == "ferroloop":
        # A Rust type cannot subclass asyncio's C Future/Task; duck-typed instead.
        assert not issubclass(cls, asyncio.Future)


def test_direct_construction(tloop, task_kind):
    cls = task_class(task_kind)
    ctx = contextvars.copy_context()
    coro = value(7)
    t = cls(coro, loop=tloop, name="direct", context=ctx)
    assert t.get_loop() is tloop
    assert t.get_name() == "direct"
    assert context_of(t) in (ctx, None)
    assert t.get_coro() is coro
    assert not t.done()
    assert t._asyncio_future_blocking is False
    assert tloop.run_until_complete(t) == 7


def test_non_coroutine_is_rejected(tloop, task_kind):
    with pytest.raises(TypeError) as oracle:
        asyncio.Task(42, loop=tloop)
    with pytest.raises(TypeError) as err:
        task_class(task_kind)(42, loop=tloop)
    assert str(err.value) == str(oracle.value)


def test_set_result_and_set_exception_are_refused(tloop):
    fut = tloop.create_future()
    t = tloop.create_task(wait_on(fut))
    with pytest.raises(RuntimeError, match="^Task does not support set_result operation$"):
        t.set_result(1)
    with pytest.raises(RuntimeError, match="^Task does not support set_exception operation$"):
        t.set_exception(ValueError())
    fut.set_result(3)
    assert tloop.run_until_complete(t) == 3


# -- result, exception, cancellation --------------------------------------------------------


def test_result(tloop):
    t = tloop.create_task(value("v"))
    with pytest.raises(asyncio.InvalidStateError):
        t.result()
    with pytest.raises(asyncio.InvalidStateError):
        t.exception()
    assert tloop.run_until_complete(t) == "v"
    assert (t.done(), t.cancelled(), t.result(), t.exception()) == (True, False, "v", None)


def test_exception(tloop):
    exc = ValueError("boom")
    t = tloop.create_task(fail(exc))
    with pytest.raises(ValueError) as info:
        tloop.run_until_complete(t)
    assert info.value is exc
    assert t.done() and not t.cancelled()
    assert t.exception() is exc
    with pytest.raises(ValueError) as info:
        t.result()
    assert info.value is exc


def _cancel_with_message(lp, make_task):
    """Cancel a task awaiting a future, with a message; what everyone sees, in order."""
    events = []

    async def body(fut):
        try:
            await fut
        except asyncio.CancelledError as e:
            events.append(("inside", e.args))
            raise

    fut = lp.create_future()
    t = make_task(body(fut))
    run_briefly(lp)
    events.append(("cancel", t.cancel("the message"), t.cancelling(), fut.cancelled()))
    try:
        lp.run_until_complete(t)
    except asyncio.CancelledError as e:
        events.append(("run_until_complete", e.args))
    events.append(("state", t.cancelled(), t.done(), t.cancelling()))
    for method in (t.result, t.exception, t.result):
        try:
            method()
        except asyncio.CancelledError as e:
            events.append((method.__name__, e.args))
    events.append(("cancel again", t.cancel()))
    return events


def test_cancel_with_message_while_awaiting_a_future(tloop):
    events = _cancel_with_message(tloop, tloop.create_task)
    assert events[:4] == [
        ("cancel", True, 1, True),
        ("inside", ("the message",)),
        ("run_until_complete", ("the message",)),
        ("state", True, True, 1),
    ]
    # What result()/exception() raise later differs between Python versions: the oracle.
    assert events == _cancel_with_message(tloop, lambda c: asyncio.Task(c, loop=tloop))


def test_cancel_while_awaiting_another_task(tloop):
    async def main():
        inner = asyncio.create_task(wait_on(tloop.create_future()))
        outer = asyncio.create_task(wait_on(inner))
        await turns(2)
        outer.cancel("stop")
        await asyncio.gather(outer, inner, return_exceptions=True)
        return outer.cancelled(), inner.cancelled(), inner.cancelling(), outer.cancelling()

    assert run(tloop, main()) == (True, True, 1, 1)


def test_cancel_while_sleeping(tloop):
    events = []

    async def sleeper():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError as e:
            events.append(e.args)
            raise

    async def main():
        t = asyncio.create_task(sleeper())
        await turns(2)
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)
        return t.cancelled()

    assert run(tloop, main()) is True
    assert events == [()]


def test_cancel_before_the_first_step(tloop):
    events = []

    async def body():
        events.append("ran")

    t = tloop.create_task(body())
    assert t.cancel("early") is True
    assert t.cancelling() == 1
    assert repr(t).startswith("<Task cancelling ")
    with pytest.raises(asyncio.CancelledError) as info:
        tloop.run_until_complete(t)
    assert info.value.args == ("early",)
    assert events == []
    assert t.cancelled()
    assert t.get_coro().cr_frame is None  # closed without running


def test_cancel_twice_then_uncancel_inside(tloop):
    events = []
    fut = tloop.create_future()

    async def body():
        try:
            await fut
        except asyncio.CancelledError:
            t = asyncio.current_task()
            events.append(("caught", t.cancelling()))
            events.append(("uncancel", t.uncancel()))
        return "survived"

    t = tloop.create_task(body())
    run_briefly(tloop)
    assert t.cancel() is True
    assert t.cancel() is True
    assert t.cancelling() == 2
    assert tloop.run_until_complete(t) == "survived"
    assert events == [("caught", 2), ("uncancel", 1)]
    assert t.cancelling() == 1
    assert not t.cancelled()


def test_uncancel_counts(tloop):
    fut = tloop.create_future()
    t = tloop.create_task(wait_on(fut))
    assert t.cancelling() == 0
    assert t.uncancel() == 0  # never below zero
    t.cancel()
    t.cancel()
    t.cancel()
    assert t.cancelling() == 3
    assert t.uncancel() == 2
    assert t.uncancel() == 1
    assert t.cancelling() == 1
    with pytest.raises(asyncio.CancelledError):
        tloop.run_until_complete(t)
    assert t.cancelled()


def test_swallowed_cancel_lets_the_task_finish(tloop):
    async def body():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass
        await asyncio.sleep(0)
        return "after"

    t = tloop.create_task(body())
    run_briefly(tloop)
    t.cancel()
    assert tloop.run_until_complete(t) == "after"
    assert not t.cancelled()
    assert t.cancelling() == 1


def test_cancel_a_done_task(tloop):
    t = tloop.create_task(value(1))
    tloop.run_until_complete(t)
    assert t.cancel() is False
    assert t.cancelling() == 0
    assert not t.cancelled()


def test_cancelled_error_raised_by_the_coroutine(tloop):
    async def body():
        await asyncio.sleep(0)
        raise asyncio.CancelledError("own")

    t = tloop.create_task(body())
    with pytest.raises(asyncio.CancelledError):
        tloop.run_until_complete(t)
    assert t.cancelled()
    assert t.cancelling() == 0


# -- what a task may yield --------------------------------------------------------------------


class Yield:
    """An awaitable that yields ``v`` to the task as is (bypassing ``yield from``)."""

    def __init__(self, v):
        self.v = v

    def __await__(self):
        return (yield self.v)


def test_task_awaiting_itself(tloop):
    async def selfish():
        await asyncio.current_task()

    t = tloop.create_task(selfish())
    with pytest.raises(RuntimeError) as info:
        tloop.run_until_complete(t)
    assert str(info.value).startswith(
        f"Task cannot await on itself: <Task pending name='{t.get_name()}' coro=<"
    ), str(info.value)


def test_bad_yield(tloop):
    async def body():
        await Yield(42)

    t = tloop.create_task(body())
    with pytest.raises(RuntimeError, match=r"^Task got bad yield: 42$"):
        tloop.run_until_complete(t)


def test_yield_of_a_bare_generator(tloop):
    def gen():
        yield

    async def body():
        await Yield(gen())

    t = tloop.create_task(body())
    with pytest.raises(RuntimeError) as info:
        tloop.run_until_complete(t)
    msg = str(info.value)
    assert msg.startswith("yield was used instead of yield from for generator in task <Task ")
    assert re.search(r" with <generator object .*gen at 0x[0-9a-f]+>$", msg), msg


def test_yield_of_a_future_without_yield_from(tloop):
    fut = tloop.create_future()

    async def body():
        await Yield(fut)

    t = tloop.create_task(body())
    with pytest.raises(RuntimeError) as info:
        tloop.run_until_complete(t)
    msg = str(info.value)
    assert msg.startswith("yield was used instead of yield from in task <Task ")
    assert msg.endswith(" with <Future pending>"), msg


def test_bare_yield_relinquishes_one_iteration(tloop):
    events = []

    async def yielder():
        events.append("y1")
        await Yield(None)
        events.append("y2")
        return "done"

    async def other():
        events.append("o1")
        await asyncio.sleep(0)
        events.append("o2")
        await asyncio.sleep(0)
        events.append("o3")

    async def main():
        a = asyncio.create_task(yielder())
        b = asyncio.create_task(other())
        return await asyncio.gather(a, b)

    assert run(tloop, main()) == ["done", None]
    assert events == ["y1", "o1", "y2", "o2", "o3"]


def test_future_from_another_loop(tloop, loop_kind):
    other = new_loop(loop_kind)
    try:
        foreign = asyncio.Future(loop=other)

        async def body():
            await foreign

        t = tloop.create_task(body())
        with pytest.raises(RuntimeError) as info:
            tloop.run_until_complete(t)
        msg = str(info.value)
        assert msg.startswith("Task <Task pending name=")
        assert msg.endswith(" got Future <Future pending> attached to a different loop"), msg
    finally:
        other.close()


# -- the registry: current_task, all_tasks ---------------------------------------------------


def test_current_task(tloop):
    seen = []

    async def body():
        seen.append(asyncio.current_task())
        seen.append(asyncio.current_task(tloop))
        await asyncio.sleep(0)
        seen.append(asyncio.current_task())

    assert asyncio.current_task(tloop) is None
    t = tloop.create_task(body())
    t.add_done_callback(lambda _: seen.append(asyncio.current_task(tloop)))
    tloop.run_until_complete(t)
    assert seen == [t, t, t, None]
    assert asyncio.current_task(tloop) is None


def test_all_tasks(tloop):
    async def main():
        pending = asyncio.create_task(wait_on(tloop.create_future()))
        finished = asyncio.create_task(value(1))
        await finished
        await asyncio.sleep(0)
        tasks = asyncio.all_tasks()
        result = (pending in tasks, finished in tasks, asyncio.current_task() in tasks)
        await cancel_and_wait(pending)
        return result, pending in asyncio.all_tasks()

    assert run(tloop, main()) == ((True, False, True), False)


def test_all_tasks_outside_the_loop(tloop):
    t = tloop.create_task(wait_on(tloop.create_future()))
    assert asyncio.all_tasks(tloop) == {t}
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        tloop.run_until_complete(t)
    assert asyncio.all_tasks(tloop) == set()


# -- contextvars ----------------------------------------------------------------------------


def test_each_task_runs_in_its_own_context_copy(tloop):
    async def child(v):
        seen = var.get()
        var.set(v)
        await asyncio.sleep(0)
        return seen, var.get()

    async def main():
        var.set("main")
        t1 = asyncio.create_task(child("a"))
        t2 = asyncio.create_task(child("b"))
        var.set("main-after")
        results = await asyncio.gather(t1, t2)
        contexts = [c[var] for c in (context_of(t1), context_of(t2)) if c is not None]
        return results, var.get(), contexts

    results, after, contexts = run(tloop, main())
    assert (results, after) == ([("main", "a"), ("main", "b")], "main-after")
    assert contexts in ([], ["a", "b"])
    assert var.get() == "default"


def test_context_argument_is_honoured(tloop):
    ctx = contextvars.copy_context()
    ctx.run(var.set, "given")

    async def body():
        seen = var.get()
        var.set("changed")
        await asyncio.sleep(0)
        return seen

    t = tloop.create_task(body(), context=ctx)
    assert context_of(t) in (ctx, None)
    assert tloop.run_until_complete(t) == "given"
    assert ctx[var] == "changed"
    assert var.get() == "default"


# -- done callbacks -------------------------------------------------------------------------


def test_done_callbacks_run_in_order_via_call_soon(tloop):
    events = []

    async def main():
        t = asyncio.create_task(value(1))
        t.add_done_callback(lambda f: events.append(("cb1", f is t)))
        t.add_done_callback(lambda f: events.append(("cb2", f is t)))
        await t
        events.append("awaited")
        t.add_done_callback(lambda f: events.append(("late", f is t)))
        events.append("added late")
        await asyncio.sleep(0)
        events.append("after a turn")

    run(tloop, main())
    assert events == [
        ("cb1", True),
        ("cb2", True),
        "awaited",
        "added late",
        ("late", True),
        "after a turn",
    ]


def test_done_callback_from_the_task_own_step_is_not_synchronous(tloop):
    events = []

    async def body():
        asyncio.current_task().add_done_callback(lambda f: events.append("cb"))
        events.append("returning")
        return 1

    t = tloop.create_task(body())
    t.add_done_callback(lambda f: events.append("first"))
    tloop.call_soon(events.append, "queued before")
    tloop.run_until_complete(t)
    # run_until_complete's own callback stops the loop; run one more turn for ours.
    run_briefly(tloop)
    assert events == ["returning", "queued before", "first", "cb"]


def test_done_callback_context(tloop):
    seen = []
    ctx = contextvars.copy_context()
    ctx.run(var.set, "callback ctx")

    async def body():
        var.set("task ctx")
        await asyncio.sleep(0)

    t = tloop.create_task(body())
    t.add_done_callback(lambda f: seen.append(("explicit", var.get())), context=ctx)
    t.add_done_callback(lambda f: seen.append(("implicit", var.get())))
    tloop.run_until_complete(t)
    run_briefly(tloop)
    assert seen == [("explicit", "callback ctx"), ("implicit", "default")]


def test_remove_done_callback(tloop):
    called = []

    def f(_):
        called.append("f")

    def g(_):
        called.append("g")

    t = tloop.create_task(value(1))
    t.add_done_callback(f)
    t.add_done_callback(g)
    t.add_done_callback(f)
    assert t.remove_done_callback(f) == 2
    assert t.remove_done_callback(f) == 0
    t.add_done_callback(f)
    tloop.run_until_complete(t)
    run_briefly(tloop)
    assert called == ["g", "f"]
    assert t.remove_done_callback(g) == 0


def test_callback_added_and_removed_before_done(tloop):
    called = []
    t = tloop.create_task(value(1))
    t.add_done_callback(called.append)
    assert t.remove_done_callback(called.append) == 1
    tloop.run_until_complete(t)
    run_briefly(tloop)
    assert called == []


# -- names, repr, stack ---------------------------------------------------------------------


def _asyncio_task_via_factory_name(loop_kind):
    """The default name loop.create_task gives an asyncio.Task made by a task factory.

    CPython 3.13.0's BaseEventLoop.create_task calls ``task.set_name(None)`` after any task
    factory, so such tasks are named 'None' there (fixed in 3.13.1): the oracle.
    """
    lp = new_loop(loop_kind)
    try:
        lp.set_task_factory(lambda lp_, coro, **kw: asyncio.Task(coro, loop=lp_, **kw))
        t = lp.create_task(value(0))
        lp.run_until_complete(t)
        return t.get_name()
    finally:
        lp.close()


def test_default_names(tloop, loop_kind, task_kind):
    t1 = tloop.create_task(value(1))
    t2 = tloop.create_task(value(2))
    tloop.run_until_complete(asyncio.gather(t1, t2))
    # 3.13.0 only: the oracle is 'None'. ferroloop's loop makes native-factory tasks
    # without calling set_name(None), so they keep their Task-N name there: accepted too.
    if (
        task_kind == "ferroloop"
        and (t1.get_name(), t2.get_name()) == ("None", "None")
        and _asyncio_task_via_factory_name(loop_kind) == "None"
    ):
        return
    m1 = re.fullmatch(r"Task-(\d+)", t1.get_name())
    m2 = re.fullmatch(r"Task-(\d+)", t2.get_name())
    assert m1 and m2, (t1.get_name(), t2.get_name())
    assert int(m2.group(1)) > int(m1.group(1))


def test_default_names_of_direct_tasks(tloop, task_kind):
    cls = task_class(task_kind)
    t1 = cls(value(1), loop=tloop)
    t2 = cls(value(2), loop=tloop)
    tloop.run_until_complete(asyncio.gather(t1, t2))
    m1 = re.fullmatch(r"Task-(\d+)", t1.get_name())
    m2 = re.fullmatch(r"Task-(\d+)", t2.get_name())
    assert m1 and m2, (t1.get_name(), t2.get_name())
    assert int(m2.group(1)) > int(m1.group(1))


def test_names_given_and_set(tloop, task_kind):
    t = tloop.create_task(value(1), name="given")
    assert t.get_name() == "given"
    t.set_name(("a", 1))
    assert t.get_name() == "('a', 1)"
    t.set_name(123)
    assert t.get_name() == "123"
    assert "name='123'" in repr(t)
    direct = task_class(task_kind)(value(2), loop=tloop, name=456)
    assert direct.get_name() == "456"
    tloop.run_until_complete(asyncio.gather(t, direct))


def _norm(text):
    return re.sub(r"0x[0-9a-f]+", "0x?", text)


def test_repr_shapes(tloop):
    fut = tloop.create_future()

    async def waiter():
        return await fut

    async def boom():
        raise ValueError("x")

    here = __file__
    t = tloop.create_task(waiter(), name="w")
    assert re.fullmatch(
        rf"<Task pending name='w' coro=<test_repr_shapes\.<locals>\.waiter\(\) "
        rf"running at {re.escape(here)}:\d+>>",
        repr(t),
    ), repr(t)
    run_briefly(tloop)
    assert re.fullmatch(
        r"<Task pending name='w' coro=<.*waiter\(\) running at .*:\d+> "
        r"wait_for=<Future pending cb=\[.*\]>>",
        repr(t),
    ), repr(t)
    fut.set_result(5)
    tloop.run_until_complete(t)
    assert re.fullmatch(
        r"<Task finished name='w' coro=<.*waiter\(\) done, defined at .*:\d+> result=5>",
        repr(t),
    ), repr(t)

    b = tloop.create_task(boom(), name="b")
    with pytest.raises(ValueError):
        tloop.run_until_complete(b)
    assert re.fullmatch(
        r"<Task finished name='b' coro=<.*boom\(\) done, defined at .*:\d+> "
        r"exception=ValueError\('x'\)>",
        repr(b),
    ), repr(b)

    c = tloop.create_task(boom(), name="c")
    c.cancel()
    assert re.fullmatch(r"<Task cancelling name='c' coro=<.*boom\(\) running at .*>>", repr(c))
    with pytest.raises(asyncio.CancelledError):
        tloop.run_until_complete(c)
    assert re.fullmatch(
        r"<Task cancelled name='c' coro=<.*boom\(\) done, defined at .*:\d+>>", repr(c)
    ), repr(c)


def test_repr_wait_for_is_asyncio_s(tloop):
    """The wait_for= part names the awaited future exactly as for an asyncio.Task."""
    fut = tloop.create_future()
    fut2 = tloop.create_future()
    oracle = asyncio.Task(wait_on(fut2), loop=tloop, name="same")
    t = tloop.create_task(wait_on(fut), name="same")
    run_briefly(tloop)
    assert _norm(repr(t)) == _norm(repr(oracle))
    fut.set_result(None)
    fut2.set_result(None)
    tloop.run_until_complete(asyncio.gather(t, oracle))


def test_get_stack_and_print_stack(tloop):
    fut = tloop.create_future()

    async def deep_waiter():
        return await fut

    t = tloop.create_task(deep_waiter(), name="stacked")
    run_briefly(tloop)
    stack = t.get_stack()
    assert [f.f_code.co_name for f in stack] == ["deep_waiter"]
    assert t.get_stack(limit=1)[0] is stack[0]
    out = io.StringIO()
    assert t.print_stack(file=out) is None
    text = out.getvalue()
    assert text.startswith("Stack for <Task pending name='stacked'")
    assert "(most recent call last):" in text
    assert "in deep_waiter" in text
    fut.set_result(1)
    tloop.run_until_complete(t)
    assert t.get_stack() == []


def test_get_stack_of_a_failed_task(tloop):
    async def failing():
        raise KeyError("k")

    t = tloop.create_task(failing())
    run_briefly(tloop)
    assert isinstance(t.exception(), KeyError)
    assert [f.f_code.co_name for f in t.get_stack()] == ["failing"]
    out = io.StringIO()
    t.print_stack(file=out)
    text = out.getvalue()
    assert text.startswith("Traceback for <Task finished"), text
    assert "KeyError: 'k'" in text


# -- logging of lost tasks, freeing ---------------------------------------------------------


def _record_loop_errors(lp):
    contexts = []
    lp.set_exception_handler(lambda _loop, ctx: contexts.append(ctx))
    return contexts


def test_destroyed_pending_task_is_reported(tloop, task_kind):
    contexts = _record_loop_errors(tloop)
    t = tloop.create_task(wait_on(tloop.create_future()), name="lost")
    assert t._log_destroy_pending is True
    run_briefly(tloop)
    del t
    gc.collect()
    assert [c["message"] for c in contexts] == ["Task was destroyed but it is pending!"]
    task = contexts[0]["task"]
    assert type(task) is task_class(task_kind)
    assert task.get_name() == "lost"
    assert not task.done()
    contexts.clear()
    del task


def test_destroyed_pending_not_reported_with_log_destroy_pending_false(tloop):
    contexts = _record_loop_errors(tloop)
    t = tloop.create_task(wait_on(tloop.create_future()))
    t._log_destroy_pending = False
    assert t._log_destroy_pending is False
    run_briefly(tloop)
    del t
    gc.collect()
    assert contexts == []


def test_exception_never_retrieved_is_reported(tloop, task_kind):
    contexts = _record_loop_errors(tloop)
    exc = ValueError("lost")

    async def body():
        raise exc

    t = tloop.create_task(body())
    run_briefly(tloop, 2)
    assert t.done()
    del t
    gc.collect()
    assert [c["message"] for c in contexts] == ["Task exception was never retrieved"]
    assert contexts[0]["exception"] is exc
    assert type(contexts[0]["future"]) is task_class(task_kind)
    contexts.clear()


def test_retrieved_exception_is_not_reported(tloop):
    contexts = _record_loop_errors(tloop)

    async def body():
        raise ValueError("seen")

    t1 = tloop.create_task(body())
    t2 = tloop.create_task(body())
    t3 = tloop.create_task(body())
    run_briefly(tloop, 2)
    assert isinstance(t1.exception(), ValueError)
    with pytest.raises(ValueError):
        t2.result()
    t3._log_traceback = False
    del t1, t2, t3
    gc.collect()
    assert contexts == []


def test_cancelled_task_is_not_reported(tloop):
    contexts = _record_loop_errors(tloop)
    t = tloop.create_task(wait_on(tloop.create_future()))
    run_briefly(tloop)
    t.cancel()
    run_briefly(tloop, 2)
    assert t.cancelled()
    del t
    gc.collect()
    assert contexts == []


@pytest.mark.parametrize("outcome", ["result", "exception", "cancelled"])
def test_finished_task_is_freed_by_refcount(tloop, outcome):
    async def body():
        await asyncio.sleep(0)
        if outcome == "exception":
            raise ValueError("x")
        return object()

    gc.collect()
    gc.disable()
    try:
        t = tloop.create_task(body())
        if outcome == "cancelled":
            t.cancel()
        run_briefly(tloop, 3)
        assert t.done()
        if outcome == "exception":
            t.exception()
        ref = weakref.ref(t)
        del t
        assert ref() is None, "the finished task is kept alive (a reference cycle?)"
    finally:
        gc.enable()


def test_awaited_task_is_freed_by_refcount(tloop):
    refs = []

    async def main():
        t = asyncio.create_task(value(1))
        refs.append(weakref.ref(t))
        return await t

    gc.collect()
    gc.disable()
    try:
        m = tloop.create_task(main())
        assert tloop.run_until_complete(m) == 1
        refs.append(weakref.ref(m))
        del m
        assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()


# -- BaseExceptions -------------------------------------------------------------------------


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exception_propagates_out_of_run_until_complete(tloop, exc_type):
    async def body():
        await asyncio.sleep(0)
        raise exc_type()

    t = tloop.create_task(body())
    with pytest.raises(exc_type):
        tloop.run_until_complete(t)
    assert t.done()
    assert isinstance(t.exception(), exc_type)


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exception_in_a_background_task(tloop, exc_type):
    async def body():
        await asyncio.sleep(0)
        raise exc_type()

    fut = tloop.create_future()
    bg = tloop.create_task(body())
    main = tloop.create_task(wait_on(fut))
    with pytest.raises(exc_type):
        tloop.run_until_complete(main)
    assert bg.done() and isinstance(bg.exception(), exc_type)
    assert not main.done()
    main.cancel()
    with pytest.raises(asyncio.CancelledError):
        tloop.run_until_complete(main)


# -- asyncio's structured helpers with ferroloop tasks ---------------------------------------


@needs_311
def test_task_group(tloop, task_kind):
    cls = task_class(task_kind)

    async def main():
        async with asyncio.TaskGroup() as tg:
            a = tg.create_task(value(1))
            b = tg.create_task(value(2), name="b")
        return type(a) is cls, a.result(), b.result(), b.get_name()

    assert run(tloop, main()) == (True, 1, 2, "b")


@needs_311
def test_task_group_error_cancels_siblings(tloop):
    async def main():
        sibling = None
        try:
            async with asyncio.TaskGroup() as tg:
                sibling = tg.create_task(wait_on(tloop.create_future()))
                tg.create_task(fail(ValueError("bad")))
        except ExceptionGroup as eg:
            return [type(e) for e in eg.exceptions], sibling.cancelled()

    assert run(tloop, main()) == ([ValueError], True)


@needs_311
def test_timeout_context_manager(tloop):
    async def main():
        task = asyncio.current_task()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.001):
                await tloop.create_future()
        return task.cancelling()

    t = tloop.create_task(main())
    assert tloop.run_until_complete(t) == 0
    assert not t.cancelled()


def test_wait_for_times_out_and_cancels_the_task(tloop, task_kind):
    async def main():
        inner = asyncio.create_task(wait_on(tloop.create_future()))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(inner, 0.001)
        return type(inner) is task_class(task_kind), inner.cancelled()

    assert run(tloop, main()) == (True, True)


def test_wait_for_result(tloop):
    async def main():
        return await asyncio.wait_for(value("r"), 5)

    assert run(tloop, main()) == "r"


def test_ensure_future_keeps_the_task(tloop, task_kind):
    async def main():
        t = asyncio.create_task(value(1))
        return asyncio.ensure_future(t) is t, await t

    assert run(tloop, main()) == (True, 1)


# -- eager tasks (3.12+) --------------------------------------------------------------------


def _eager_factory(task_kind):
    if task_kind == "asyncio":
        return asyncio.eager_task_factory
    return asyncio.create_eager_task_factory(import_ferroloop().Task)


@needs_312
def test_eager_task_factory(loop, task_kind):
    loop.set_task_factory(_eager_factory(task_kind))
    events = []

    async def immediate():
        events.append("immediate ran")
        return "i"

    async def suspends():
        events.append("suspends ran")
        await asyncio.sleep(0)
        events.append("suspends resumed")
        return "s"

    async def main():
        a = asyncio.create_task(immediate())
        events.append(("a created", a.done()))
        b = asyncio.create_task(suspends())
        events.append(("b created", b.done(), b in asyncio.all_tasks()))
        return type(a) is task_class(task_kind), a.result(), await b

    assert loop.run_until_complete(main()) == (True, "i", "s")
    assert events == [
        "immediate ran",
        ("a created", True),
        "suspends ran",
        ("b created", False, True),
        "suspends resumed",
    ]


@needs_312
def test_eager_start_argument(loop, task_kind):
    cls = task_class(task_kind)
    events = []

    async def body():
        events.append(("ran", asyncio.current_task() is not None))
        return 5

    async def main():
        t = cls(body(), loop=loop, eager_start=True)
        events.append(("created", t.done()))
        lazy = cls(body(), loop=loop, eager_start=False)
        events.append(("lazy created", lazy.done()))
        return await t + await lazy

    assert loop.run_until_complete(main()) == 10
    assert events == [
        ("ran", True),
        ("created", True),
        ("lazy created", False),
        ("ran", True),
    ]


@needs_312
def test_eager_start_outside_a_running_loop_is_lazy(loop, task_kind):
    events = []

    async def body():
        events.append("ran")
        return 1

    t = task_class(task_kind)(body(), loop=loop, eager_start=True)
    assert events == []
    assert loop.run_until_complete(t) == 1
    assert events == ["ran"]


@needs_312
def test_ferroloop_eager_task_factory(loop):
    """ferroloop.eager_task_factory (3.12+) is asyncio.eager_task_factory for ferroloop.Task."""
    if SKIP_NATIVE:
        pytest.skip("FERROLOOP_SKIP_NATIVE=1")
    ferroloop = import_ferroloop()
    loop.set_task_factory(ferroloop.eager_task_factory)
    events = []

    async def body():
        events.append("ran")
        return 1

    async def main():
        t = asyncio.create_task(body(), name="eager")
        events.append(("created", t.done(), type(t) is ferroloop.Task, t.get_name()))
        return await t

    assert loop.run_until_complete(main()) == 1
    assert events == ["ran", ("created", True, True, "eager")]


# -- interplay between the two kinds of task and other futures --------------------------------


def test_tasks_of_both_kinds_await_each_other(tloop, task_kind):
    other_cls = asyncio.Task if task_kind == "ferroloop" else task_class("ferroloop")

    async def leaf(x):
        await asyncio.sleep(0)
        if x == "bad":
            raise KeyError(x)
        return x

    async def main():
        a = other_cls(leaf("a"), loop=tloop)
        b = asyncio.create_task(wait_on(a))  # the kind under test awaits the other kind
        c = other_cls(wait_on(b), loop=tloop)  # and the other kind awaits it
        bad = asyncio.create_task(leaf("bad"))
        err = await asyncio.gather(other_cls(wait_on(bad), loop=tloop), return_exceptions=True)
        gate = tloop.create_future()
        victim = asyncio.create_task(wait_on(gate))
        watcher = other_cls(wait_on(victim), loop=tloop)
        await asyncio.sleep(0)
        watcher.cancel("from outside")
        w = await asyncio.gather(watcher, return_exceptions=True)
        return await c, type(err[0]), type(w[0]), victim.cancelled(), gate.cancelled()

    assert run(tloop, main()) == ("a", KeyError, asyncio.CancelledError, True, True)


def test_awaiting_pure_python_futures_and_tasks(tloop):
    """asyncio's pure-Python Future and Task (asyncio.futures._PyFuture, tasks._PyTask)."""
    py_future = asyncio.futures._PyFuture
    py_task = asyncio.tasks._PyTask

    async def main():
        f1 = py_future(loop=tloop)
        f2 = py_future(loop=tloop)
        f3 = py_future(loop=tloop)
        tloop.call_soon(f1.set_result, "f1")
        tloop.call_soon(f2.set_exception, ValueError("f2"))
        r1 = await f1
        e2 = type((await asyncio.gather(f2, return_exceptions=True))[0])
        t = asyncio.create_task(wait_on(f3))
        await asyncio.sleep(0)
        t.cancel()
        c3 = f3.cancelled()
        await asyncio.gather(t, return_exceptions=True)
        mine = asyncio.create_task(value("mine"))
        r4 = await py_task(wait_on(mine), loop=tloop)  # a pure-Python task awaits ours
        return r1, e2, c3, t.cancelled(), r4

    assert run(tloop, main()) == ("f1", ValueError, True, True, "mine")


class CoroutineObject:
    """A collections.abc.Coroutine that is not a native coroutine: returns after 2 sends."""

    def __init__(self):
        self.sends = 0

    def send(self, value):
        self.sends += 1
        if self.sends > 2:
            raise StopIteration("from send")

    def throw(self, typ, val=None, tb=None):
        raise typ if val is None else val

    def close(self):
        pass

    def __await__(self):
        return self

    def __iter__(self):
        return self

    def __next__(self):
        return self.send(None)


collections.abc.Coroutine.register(CoroutineObject)


def test_non_native_coroutines(tloop):
    import types as _types

    @_types.coroutine
    def generator_based():
        yield
        return "gen"

    c = CoroutineObject()
    t = tloop.create_task(c)
    assert tloop.run_until_complete(t) == "from send"
    assert c.sends == 3
    assert "<CoroutineObject without __name__>()" in repr(t) or "CoroutineObject" in repr(t)
    # A @types.coroutine generator: a coroutine for 3.11's asyncio, not for 3.12's.
    try:
        oracle = asyncio.Task(generator_based(), loop=tloop)
    except TypeError as e:
        with pytest.raises(TypeError) as info:
            tloop.create_task(generator_based())
        assert str(info.value).split(" at 0x")[0] == str(e).split(" at 0x")[0]
    else:
        g = tloop.create_task(generator_based())
        assert tloop.run_until_complete(g) == tloop.run_until_complete(oracle) == "gen"


def test_await_iterator_protocol(tloop):
    fut = tloop.create_future()
    t = tloop.create_task(wait_on(fut))
    it = t.__await__()
    assert next(it) is t  # a pending task yields itself to the awaiting task
    assert t._asyncio_future_blocking is True
    t._asyncio_future_blocking = False
    fut.set_result("r")
    tloop.run_until_complete(t)
    with pytest.raises(StopIteration) as info:
        it.send(None)
    assert info.value.value == "r"
    # A done task's iterator returns at once.
    with pytest.raises(StopIteration) as info:
        next(t.__await__())
    assert info.value.value == "r"


def test_await_a_task_of_another_loop(tloop, loop_kind, task_kind):
    other = new_loop(loop_kind)
    try:
        if task_kind == "ferroloop":
            other.set_task_factory(import_ferroloop().task_factory)
        elif hasattr(other, "native_tasks"):
            other.native_tasks = False
        foreign = other.create_task(value(1))

        async def body():
            return await foreign

        t = tloop.create_task(body())
        with pytest.raises(RuntimeError, match=r"attached to a different loop$"):
            tloop.run_until_complete(t)
        assert other.run_until_complete(foreign) == 1
    finally:
        other.close()


# -- cancellation corner cases (compared with asyncio.Task on the same loop) -----------------


def _oracle(lp, scenario):
    """Run ``scenario(make_task)`` with asyncio.Task: asyncio's answer on this Python."""
    return scenario(lambda coro, **kw: asyncio.Task(coro, loop=lp, **kw))


def test_cancel_self_then_return(tloop):
    def scenario(make_task):
        async def body():
            asyncio.current_task().cancel("self")
            return "returned"

        t = make_task(body())
        try:
            tloop.run_until_complete(t)
        except asyncio.CancelledError as e:
            return "cancelled", e.args, t.cancelled(), t.cancelling()
        return "result", t.result(), t.cancelling()

    got = scenario(tloop.create_task)
    assert got[0] == "cancelled" and got[2] is True
    assert got == _oracle(tloop, scenario)


def test_cancel_self_then_raise(tloop):
    def scenario(make_task):
        async def body():
            asyncio.current_task().cancel()
            raise ValueError("raised anyway")

        t = make_task(body())
        run_briefly(tloop, 2)
        return t.cancelled(), type(t.exception()) if not t.cancelled() else None

    assert scenario(tloop.create_task) == _oracle(tloop, scenario) == (False, ValueError)


def test_cancel_self_then_await(tloop):
    def scenario(make_task):
        events = []

        async def body():
            asyncio.current_task().cancel("me")
            events.append("still running")
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError as e:
                events.append(("cancelled at the await", e.args))
                raise

        t = make_task(body())
        run_briefly(tloop, 3)
        return events, t.cancelled()

    assert scenario(tloop.create_task) == _oracle(tloop, scenario)
    assert scenario(tloop.create_task) == (
        ["still running", ("cancelled at the await", ("me",))],
        True,
    )


def test_uncancel_before_the_first_step(tloop):
    """3.13: uncancel() to zero withdraws the pending cancel request; 3.11/3.12: it does not."""

    def scenario(make_task):
        async def body():
            await asyncio.sleep(0)
            return "ran"

        t = make_task(body())
        t.cancel()
        n = t.uncancel()
        run_briefly(tloop, 3)
        return n, t.cancelled(), None if t.cancelled() else t.result()

    got = scenario(tloop.create_task)
    assert got[0] == 0
    assert got == _oracle(tloop, scenario)


def test_cancel_when_the_awaited_future_refuses(tloop):
    """The awaited future's cancel() returns False: the task is cancelled at its next step."""

    class Stubborn(asyncio.futures._PyFuture):
        def cancel(self, msg=None):
            return False

    def scenario(make_task):
        events = []
        fut = Stubborn(loop=tloop)

        async def body():
            try:
                await fut
            except asyncio.CancelledError as e:
                events.append(("cancelled", e.args))
                raise
            return "not cancelled"

        t = make_task(body())
        run_briefly(tloop)
        events.append(("cancel", t.cancel("stubborn")))
        run_briefly(tloop)
        events.append(("after a turn", t.done()))
        fut.set_result("value")
        run_briefly(tloop, 2)
        events.append(("end", t.cancelled()))
        return events

    got = scenario(tloop.create_task)
    assert got == [
        ("cancel", True),
        ("after a turn", False),
        ("cancelled", ("stubborn",)),
        ("end", True),
    ]
    assert got == _oracle(tloop, scenario)


def test_cancelled_error_context_and_cause(tloop):
    """What the CancelledError raised by awaiting a cancelled task carries."""

    def scenario(make_task):
        async def inner():
            await tloop.create_future()

        async def outer(t):
            try:
                await t
            except asyncio.CancelledError as e:
                return e.args, type(e.__context__).__name__, e.__cause__

        t = make_task(inner())
        o = make_task(outer(t))
        run_briefly(tloop)
        t.cancel("inner msg")
        return tloop.run_until_complete(o)

    got = scenario(tloop.create_task)
    assert got == _oracle(tloop, scenario)


def test_cancel_message_of_non_str(tloop):
    marker = ("a", 1)

    async def body():
        await tloop.create_future()

    t = tloop.create_task(body())
    run_briefly(tloop)
    t.cancel(marker)
    with pytest.raises(asyncio.CancelledError) as info:
        tloop.run_until_complete(t)
    assert info.value.args == (marker,)


def test_done_callback_added_inside_a_task_gets_the_task_context(tloop):
    seen = []

    async def body(other):
        var.set("inside the task")
        other.add_done_callback(lambda _: seen.append(var.get()))
        await other

    async def main():
        other = asyncio.create_task(value(1))
        await asyncio.create_task(body(other))
        await asyncio.sleep(0)

    run(tloop, main())
    assert seen == ["inside the task"]


def test_exception_in_a_done_callback_goes_to_the_handler(tloop):
    contexts = _record_loop_errors(tloop)

    def bad_callback(_):
        raise ZeroDivisionError("in callback")

    t = tloop.create_task(value(1))
    t.add_done_callback(bad_callback)
    t.add_done_callback(lambda _: contexts.append("next callback still runs"))
    tloop.run_until_complete(t)
    run_briefly(tloop)
    assert len(contexts) == 2
    assert contexts[0]["message"].startswith("Exception in callback ")
    assert isinstance(contexts[0]["exception"], ZeroDivisionError)
    assert contexts[1] == "next callback still runs"


def test_debug_source_traceback(tloop):
    tloop.set_debug(True)
    t = tloop.create_task(value(1))
    assert t._source_traceback, "debug mode records where the task was created"
    assert " created at " in repr(t)
    tloop.run_until_complete(t)
    tloop.set_debug(False)
    t2 = tloop.create_task(value(1))
    assert not t2._source_traceback
    tloop.run_until_complete(t2)


def test_pending_tasks_cancelled_by_asyncio_run(asyncio_state, task_kind):
    events = []

    async def background():
        try:
            await asyncio.sleep(3600)
        finally:
            events.append("background finally")

    async def main():
        if task_kind == "ferroloop":
            asyncio.get_running_loop().set_task_factory(import_ferroloop().task_factory)
        else:
            _lp = asyncio.get_running_loop()
            if hasattr(_lp, "native_tasks"):
                _lp.native_tasks = False
        t = asyncio.create_task(background())
        await asyncio.sleep(0)
        events.append(type(t) is task_class(task_kind))
        return "main"

    assert asyncio.run(main()) == "main"
    assert events == [True, "background finally"]


@needs_311
def test_nested_timeouts(tloop):
    def scenario(make_task):
        async def body():
            events = []
            try:
                async with asyncio.timeout(0.001):
                    try:
                        async with asyncio.timeout(3600):
                            await tloop.create_future()
                    except TimeoutError:
                        events.append("inner timeout (wrong)")
                    except asyncio.CancelledError:
                        events.append("inner saw cancel")
                        raise
            except TimeoutError:
                events.append("outer timeout")
            events.append(("cancelling", asyncio.current_task().cancelling()))
            return events

        return tloop.run_until_complete(make_task(body()))

    got = scenario(tloop.create_task)
    assert got == ["inner saw cancel", "outer timeout", ("cancelling", 0)]
    assert got == _oracle(tloop, scenario)


@needs_311
def test_task_group_parent_cancelled_from_outside(tloop):
    def scenario(make_task):
        events = []

        async def child():
            try:
                await tloop.create_future()
            except asyncio.CancelledError:
                events.append("child cancelled")
                raise

        async def parent():
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(child())
                    await tloop.create_future()
            except asyncio.CancelledError:
                events.append(("parent cancelled", asyncio.current_task().cancelling()))
                raise

        p = make_task(parent())
        run_briefly(tloop, 2)
        p.cancel()
        try:
            tloop.run_until_complete(p)
        except asyncio.CancelledError:
            events.append("run_until_complete: cancelled")
        return events

    got = scenario(tloop.create_task)
    assert got == _oracle(tloop, scenario)
    assert got[-1] == "run_until_complete: cancelled"


def test_run_coroutine_threadsafe(tloop, task_kind):
    import threading

    results = []

    async def in_loop():
        await asyncio.sleep(0)
        return type(asyncio.current_task()) is task_class(task_kind)

    def worker():
        fut = asyncio.run_coroutine_threadsafe(in_loop(), tloop)
        results.append(fut.result(timeout=5))
        tloop.call_soon_threadsafe(tloop.stop)

    thread = threading.Thread(target=worker)
    thread.start()
    tloop.run_forever()
    thread.join()
    assert results == [True]


# -- scheduling order: the same trace as asyncio.Task on the same loop -----------------------


def _interleaving(lp, make_task):
    """Tasks, call_soon callbacks, futures, done callbacks and cancellations interleaved;
    the trace of what ran, in order, turn by turn (run_briefly: one loop iteration each)."""
    trace = []
    fut = lp.create_future()

    async def worker(name, n):
        for i in range(n):
            trace.append(f"{name} step {i}")
            await asyncio.sleep(0)
        return name

    async def waiter():
        trace.append("waiter start")
        try:
            r = await fut
            trace.append(f"waiter got {r}")
        except asyncio.CancelledError:
            trace.append("waiter cancelled")
            raise

    async def chain(t):
        trace.append("chain start")
        r = await t
        trace.append(f"chain got {r}")
        return r

    lp.call_soon(trace.append, "soon 1")
    a = make_task(worker("a", 3))
    lp.call_soon(trace.append, "soon 2")
    w = make_task(waiter())
    c = make_task(chain(a))
    a.add_done_callback(lambda _: trace.append("a done cb"))
    for turn in range(8):
        trace.append(f"-- turn {turn}")
        if turn == 1:
            lp.call_soon(trace.append, "soon in turn 1")
            fut.set_result("F")
            trace.append("fut set")
        if turn == 2:
            b = make_task(worker("b", 2))
            b.cancel("b msg")
            trace.append("b created and cancelled")
        run_briefly(lp)
    trace.append(("states", a.result(), w.done(), c.result(), b.cancelled()))
    return trace


def test_interleaving_matches_asyncio_task(tloop):
    got = _interleaving(tloop, tloop.create_task)
    assert got == _oracle(tloop, lambda make: _interleaving(tloop, make))


def _wakeup_turns(lp, make_task):
    """How many loop iterations a task needs to see a future set from a callback."""
    trace = []
    fut = lp.create_future()

    async def body():
        trace.append("start")
        await fut
        trace.append("woken")
        await asyncio.sleep(0)
        trace.append("after sleep")

    t = make_task(body())
    for turn in range(5):
        trace.append(turn)
        if turn == 1:
            lp.call_soon(fut.set_result, None)
        run_briefly(lp)
    return trace, t.done()


def test_wakeup_takes_the_same_number_of_turns(tloop):
    assert _wakeup_turns(tloop, tloop.create_task) == _oracle(
        tloop, lambda make: _wakeup_turns(tloop, make)
    )


def test_stop_inside_a_task_step(tloop):
    def scenario(make_task):
        trace = []

        async def body():
            trace.append("step 1")
            tloop.stop()
            await asyncio.sleep(0)
            trace.append("step 2")

        t = make_task(body())
        tloop.call_soon(trace.append, "soon")
        tloop.run_forever()
        trace.append("stopped")
        tloop.run_until_complete(t)
        return trace

    assert scenario(tloop.create_task) == _oracle(tloop, scenario)


# -- subclasses -----------------------------------------------------------------------------

SUBCLASS_HOOKS = (
    "cancel",
    "add_done_callback",
    "remove_done_callback",
    "result",
    "exception",
    "get_loop",
    "cancelled",
    "done",
)


def recording_subclass(base, calls):
    """A subclass of ``base`` whose future methods record their calls, then defer to base."""

    def hook(name):
        orig = getattr(base, name)

        def method(self, *args, **kwargs):
            calls.append(name)
            return orig(self, *args, **kwargs)

        method.__name__ = name
        return method

    return type("Recording" + base.__name__, (base,), {n: hook(n) for n in SUBCLASS_HOOKS})


def test_subclass(tloop, task_kind):
    class MyTask(task_class(task_kind)):
        def __init__(self, coro, *, loop=None, **kwargs):
            self.extra = "extra"
            super().__init__(coro, loop=loop, **kwargs)

    tloop.set_task_factory(lambda lp, coro, **kw: MyTask(coro, loop=lp, **kw))

    async def main():
        t = asyncio.create_task(value(1), name="sub")
        return type(t) is MyTask, t.extra, await t, asyncio.isfuture(t), t.get_name()

    assert run(tloop, main()) == (True, "extra", 1, True, "sub")
    t = MyTask(value(2), loop=tloop)
    assert repr(t).startswith("<MyTask pending name=")
    assert tloop.run_until_complete(t) == 2


def _subclass_calls(lp, base):
    """Which methods of a subclass instance the tasks awaiting/cancelling it call."""
    calls = []
    sub = recording_subclass(base, calls)
    out = {}

    async def leaf():
        await asyncio.sleep(0)
        return 1

    async def main():
        s = sub(leaf(), loop=lp)
        calls.clear()
        await s
        out["awaited"] = list(calls)
        s = sub(wait_on(lp.create_future()), loop=lp)
        t = base(wait_on(s), loop=lp)
        await turns(2)
        calls.clear()
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)
        out["cancelled through its awaiter"] = list(calls)

    lp.run_until_complete(base(main(), loop=lp))
    return out


def test_subclass_methods_are_called_by_awaiting_tasks(tloop, task_kind):
    """asyncio's Task takes its fast paths for exact Futures/Tasks only; for a subclass it
    calls the (possibly overridden) methods: get_loop, add_done_callback, result, cancel."""
    got = _subclass_calls(tloop, task_class(task_kind))
    assert got == _subclass_calls(tloop, asyncio.Task)
    assert "cancel" in got["cancelled through its awaiter"]


def test_subclass_cancel_override_is_called_through_the_awaiter(tloop, task_kind):
    overridden = []

    class Guarded(task_class(task_kind)):
        def cancel(self, msg=None):
            overridden.append(msg)
            return super().cancel(msg)

    async def main():
        inner = Guarded(wait_on(tloop.create_future()), loop=tloop)
        outer = asyncio.create_task(wait_on(inner))
        await turns(2)
        outer.cancel("why")
        await asyncio.gather(outer, return_exceptions=True)
        return inner.cancelled()

    assert run(tloop, main()) is True
    assert overridden == ["why"]


def _eager_trace(lp, factory, gather):
    """Eager tasks: what ran when, with results, errors, cancellation, context, gather."""
    trace = []
    lp.set_task_factory(factory)

    async def immediate(x):
        trace.append(("immediate", x, var.get(), asyncio.current_task() is not None))
        return x

    async def immediate_fail():
        trace.append("immediate_fail")
        raise ValueError("eager failure")

    async def suspends(x):
        trace.append(("suspends start", x))
        await asyncio.sleep(0)
        trace.append(("suspends end", x))
        return x

    async def main():
        var.set("main")
        a = asyncio.create_task(immediate("a"))
        trace.append(("a", a.done(), a.result(), a in asyncio.all_tasks()))
        f = asyncio.create_task(immediate_fail())
        trace.append(("f", f.done(), type(f.exception()).__name__))
        s = asyncio.create_task(suspends("s"))
        trace.append(("s", s.done(), s in asyncio.all_tasks()))
        c = asyncio.create_task(suspends("c"))
        c.cancel("early")
        g = await gather(immediate("g1"), suspends("g2"), a, s, c, f, return_exceptions=True)
        trace.append(("gather", [r if isinstance(r, str) else type(r).__name__ for r in g]))
        trace.append(("current", asyncio.current_task() is not None))
        return "main"

    trace.append(lp.run_until_complete(main()))
    lp.set_task_factory(None)
    return trace


@needs_312
def test_eager_trace_matches_asyncio(loop, task_kind):
    got = _eager_trace(loop, _eager_factory(task_kind), asyncio.gather)
    assert got == _eager_trace(loop, asyncio.eager_task_factory, asyncio.gather)
    assert got[0] == ("immediate", "a", "main", True)


# -- deep chains ----------------------------------------------------------------------------

_DEEP_CANCEL_SCRIPT = r"""
import asyncio, os, sys
sys.path[:0] = {path!r}
from parity_helpers import new_loop
loop = new_loop({loop_kind!r})
if {task_kind!r} == "ferroloop":
    import ferroloop
    loop.set_task_factory(ferroloop.task_factory)

async def wait_on(f):
    return await f

async def main():
    chain = [loop.create_future()]
    for _ in range({depth}):
        chain.append(loop.create_task(wait_on(chain[-1])))
    await asyncio.sleep(0)
    try:
        chain[-1].cancel()
        return "cancelled"
    except RecursionError:
        return "RecursionError"

print(loop.run_until_complete(main()), flush=True)
os._exit(0)  # no teardown of the chain: only the cancel() is under test
"""


def test_cancelling_a_very_deep_chain_of_tasks_does_not_crash(loop_kind, task_kind):
    """Task N awaits task N-1 ... awaits a future; cancel task N. asyncio's Task cancels
    the awaited task through a method call and stops with RecursionError; the process must
    never crash (run in a child process, since a crash would take pytest down)."""
    import os
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    paths = [here, *(p for p in sys.path if p)]
    script = _DEEP_CANCEL_SCRIPT.format(
        path=paths, loop_kind=loop_kind, task_kind=task_kind, depth=100_000
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.strip() in ("cancelled", "RecursionError")


# -- argument errors ------------------------------------------------------------------------


def test_bad_arguments_raise_what_asyncio_raises(tloop, task_kind):
    """The exception types match asyncio.Task's (the messages are worded by the binding)."""
    cls = task_class(task_kind)

    def outcomes(cls):
        made = []

        def coro():
            c = value(1)
            made.append(c)
            return c

        def task():
            t = cls(coro(), loop=tloop)
            made.append(t)
            return t

        cases = [
            lambda: cls(),
            lambda: cls(coro(), tloop),
            lambda: cls(coro(), loop=tloop, bogus=1),
            lambda: cls(42, loop=tloop),
            lambda: task().cancel("a", "b"),
            lambda: task().set_name(),
            lambda: task().get_stack(limit="x"),
            lambda: task().remove_done_callback(),
        ]
        result = []
        for case in cases:
            try:
                case()
                result.append(None)
            except Exception as e:  # noqa: BLE001 - compared with asyncio's
                result.append(type(e))
        for m in made:
            if asyncio.isfuture(m):
                m.cancel()
            else:
                m.close()
        run_briefly(tloop, 2)
        return result

    assert outcomes(cls) == outcomes(asyncio.Task)


@needs_312
def test_eager_start_accepts_any_truth_value(request, loop, task_kind):
    events = []

    async def body(tag):
        events.append(tag)

    async def main():
        cls = task_class(task_kind)
        coro = body("truthy ran")
        try:
            a = cls(coro, loop=loop, eager_start="yes")
        except TypeError:
            coro.close()
            raise
        events.append("after truthy")
        b = cls(body("falsy ran"), loop=loop, eager_start=0)
        events.append("after falsy")
        await asyncio.gather(a, b)

    loop.run_until_complete(main())
    assert events == ["truthy ran", "after truthy", "after falsy", "falsy ran"]


@needs_311
def test_runner_turns_sigint_into_keyboard_interrupt(loop_kind, task_kind):
    """asyncio.Runner cancels the main task on SIGINT, then uncancel()s it and raises
    KeyboardInterrupt: with the main task a ferroloop Task too."""
    import os
    import signal

    events = []

    def loop_factory():
        lp = new_loop(loop_kind)
        if task_kind == "ferroloop":
            lp.set_task_factory(import_ferroloop().task_factory)
        elif hasattr(lp, "native_tasks"):
            lp.native_tasks = False
        return lp

    async def main():
        events.append(type(asyncio.current_task()) is task_class(task_kind))
        os.kill(os.getpid(), signal.SIGINT)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            events.append(("cancelled", asyncio.current_task().cancelling()))
            raise

    with asyncio.Runner(loop_factory=loop_factory) as runner, pytest.raises(KeyboardInterrupt):
        runner.run(main())
    assert events == [True, ("cancelled", 1)]


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_loop_usable_after_a_base_exception(tloop, exc_type):
    async def body():
        await asyncio.sleep(0)
        raise exc_type()

    with pytest.raises(exc_type):
        tloop.run_until_complete(tloop.create_task(body()))
    assert asyncio.current_task(tloop) is None
    assert tloop.run_until_complete(tloop.create_task(value("again"))) == "again"


@pytest.mark.parametrize("debug", [False, True])
def test_lost_task_report_contexts_match_asyncio(tloop, debug):
    """The exception-handler contexts of the two lost-task reports: same keys, same shape."""

    def scenario(make_task):
        contexts = _record_loop_errors(tloop)
        tloop.set_debug(debug)

        async def boom():
            raise ValueError("lost")

        pending = make_task(wait_on(tloop.create_future()))
        failed = make_task(boom())
        run_briefly(tloop, 2)
        del pending, failed
        gc.collect()
        tloop.set_debug(False)
        tloop.set_exception_handler(None)
        shapes = sorted(
            (
                c["message"],
                sorted(c),
                type(c.get("exception")).__name__,
                bool(c.get("source_traceback")),
            )
            for c in contexts
        )
        contexts.clear()
        return shapes

    got = scenario(tloop.create_task)
    assert [s[0] for s in got] == [
        "Task exception was never retrieved",
        "Task was destroyed but it is pending!",
    ]
    assert got == _oracle(tloop, scenario)


def test_nested_run_until_complete_with_allow_nested(loop_kind, task_kind):
    """ferroloop.allow_nested: a task runs the loop again; current_task is right on both
    levels (ferroloop loops only)."""
    if loop_kind != "ferroloop":
        pytest.skip("allow_nested is for ferroloop loops")
    ferroloop = import_ferroloop()

    def scenario(factory):
        lp = ferroloop.allow_nested(new_loop("ferroloop"))
        lp.set_task_factory(factory)
        trace = []

        async def inner():
            me = asyncio.current_task()
            await asyncio.sleep(0)
            trace.append(("inner", asyncio.current_task() is me, me.get_name()))
            return "inner result"

        async def outer():
            me = asyncio.current_task()
            r = lp.run_until_complete(lp.create_task(inner(), name="inner"))
            trace.append(("outer", r, asyncio.current_task() is me))
            await asyncio.sleep(0)
            trace.append(("outer after", asyncio.current_task() is me))
            return type(me).__name__

        try:
            trace.append(lp.run_until_complete(lp.create_task(outer(), name="outer")))
            trace.append(asyncio.current_task(lp))
        finally:
            lp.close()
        return trace

    factory = ferroloop.task_factory if task_kind == "ferroloop" else None
    got = scenario(factory)
    assert got == [
        ("inner", True, "inner"),
        ("outer", "inner result", True),
        ("outer after", True),
        "Task",
        None,
    ]
    assert type(got) is list and got == scenario(None)


def _loop_class(loop_kind):
    lp = new_loop(loop_kind)
    lp.close()
    return type(lp)


def test_steps_go_through_an_overridden_call_soon(loop_kind, task_kind):
    """asyncio.Task schedules its steps with loop.call_soon: a loop subclass (or instance)
    overriding call_soon sees every step, whatever the Task class."""

    def scenario(make_task_cls, where):
        seen = []
        base = _loop_class(loop_kind)

        class Recording(base):
            pass

        def call_soon(self, callback, *args, context=None):
            seen.append("call_soon")
            return base.call_soon(self, callback, *args, context=context)

        if where == "class":
            Recording.call_soon = call_soon
            lp = Recording()
        else:
            lp = base()
            lp.call_soon = call_soon.__get__(lp)
        try:

            async def body():
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                return 1

            t = make_task_cls()(body(), loop=lp)
            seen.append("created")
            lp.run_until_complete(t)
        finally:
            lp.close()
        return seen

    for where in ("class", "instance"):
        got = scenario(lambda: task_class(task_kind), where)
        assert got == scenario(lambda: asyncio.Task, where), where
        assert got.count("call_soon") >= 3, got


def test_call_soon_patched_after_the_task_was_created(request, loop_kind, task_kind):

    def scenario(cls):
        lp = new_loop(loop_kind)
        seen = []
        try:

            async def body():
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                return 1

            t = cls(body(), loop=lp)
            original = lp.call_soon

            def call_soon(callback, *args, context=None):
                seen.append("call_soon")
                return original(callback, *args, context=context)

            lp.call_soon = call_soon
            lp.run_until_complete(t)
        finally:
            lp.close()
        return seen

    got = scenario(task_class(task_kind))
    assert got == scenario(asyncio.Task)
    assert len(got) >= 2


def test_reference_cycles_through_a_task_are_collected(tloop):
    """A task reachable from its own result, exception, done callback, cancel message or
    context is collected by the cycle collector (every field is traversed)."""
    _record_loop_errors(tloop)
    alive = {}

    async def return_self():
        await asyncio.sleep(0)
        return asyncio.current_task()

    async def raise_self():
        await asyncio.sleep(0)
        raise ValueError(asyncio.current_task())

    async def pend():
        await tloop.create_future()

    async def context_self():
        var.set(asyncio.current_task())
        await asyncio.sleep(0)

    def make(name, coro, setup=None):
        t = tloop.create_task(coro)
        if setup is not None:
            setup(t)
        run_briefly(tloop, 3)
        alive[name] = weakref.ref(t)

    make("result", return_self())
    make("exception", raise_self())
    make("done callback", pend(), lambda t: t.add_done_callback(lambda _f, t=t: t))
    make("cancel message", pend(), lambda t: t.cancel(t))
    make("context", context_self())
    gc.collect()
    assert sorted(k for k, r in alive.items() if r() is not None) == []


def test_sync_primitives_trace_matches_asyncio_task(tloop):
    """Lock, Event, Semaphore, Condition and Queue (all built on futures) with cancellation,
    in the same order as with asyncio.Task."""

    def scenario(make_task):
        trace = []

        async def main():
            lock = asyncio.Lock()
            event = asyncio.Event()
            sem = asyncio.Semaphore(1)
            cond = asyncio.Condition()
            queue = asyncio.Queue(maxsize=1)

            async def locker(i):
                async with lock:
                    trace.append(("lock", i))
                    await asyncio.sleep(0)

            async def sem_user(i):
                try:
                    async with sem:
                        trace.append(("sem", i))
                        await event.wait()
                        trace.append(("sem event", i))
                except asyncio.CancelledError:
                    trace.append(("sem cancelled", i))
                    raise

            async def cond_waiter(i):
                async with cond:
                    await cond.wait()
                    trace.append(("cond", i))

            async def producer():
                for i in range(4):
                    await queue.put(i)
                    trace.append(("put", i))

            async def consumer():
                while True:
                    item = await queue.get()
                    trace.append(("got", item))
                    queue.task_done()

            tasks = [make_task(locker(i)) for i in range(3)]
            tasks += [make_task(sem_user(i)) for i in range(3)]
            tasks += [make_task(cond_waiter(i)) for i in range(2)]
            prod, cons = make_task(producer()), make_task(consumer())
            await turns(3)
            tasks[4].cancel()  # a semaphore waiter
            await turns(1)
            event.set()
            async with cond:
                cond.notify(1)
            await turns(3)
            async with cond:
                cond.notify_all()
            await prod
            await queue.join()
            cons.cancel()
            results = await asyncio.gather(*tasks, cons, return_exceptions=True)
            trace.append([type(r).__name__ for r in results])

        tloop.run_until_complete(make_task(main()))
        return trace

    got = scenario(tloop.create_task)
    assert got == _oracle(tloop, scenario)
    assert ("sem cancelled", 1) in got or ("sem cancelled", 2) in got, got


def test_awaiting_executor_futures(tloop):
    import threading

    release = threading.Event()

    def blocking(x):
        release.wait(5)
        return x * 2

    async def main():
        r = await tloop.run_in_executor(None, lambda: 21 * 2)
        fut = tloop.run_in_executor(None, blocking, 5)
        t = asyncio.create_task(wait_on(fut))
        await asyncio.sleep(0)
        t.cancel()
        results = await asyncio.gather(t, return_exceptions=True)
        release.set()
        return r, type(results[0]).__name__, fut.cancelled()

    assert run(tloop, main()) == (42, "CancelledError", True)
    tloop.run_until_complete(tloop.shutdown_default_executor())


def _task_without_a_loop(cls):
    """cls(coro) with no running loop and no current loop: (type, warnings as
    (category, message, file name)) -- the file is where the warning points."""
    import os
    import warnings

    asyncio.set_event_loop_policy(None)
    coro = value(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = cls(coro)
    lp = t.get_loop()
    try:
        t.cancel()
        lp.run_until_complete(asyncio.gather(t, return_exceptions=True))
    finally:
        lp.close()
        asyncio.set_event_loop(None)
    return type(t).__name__, [
        (w.category.__name__, str(w.message), os.path.basename(w.filename)) for w in caught
    ]


def test_task_without_a_loop_warns_at_the_caller(request, asyncio_state, task_kind):
    import os

    got = _task_without_a_loop(task_class(task_kind))
    assert got == _task_without_a_loop(asyncio.Task)
    assert all(w[2] == os.path.basename(__file__) for w in got[1]), got


def test_loops_in_two_threads(loop_kind, task_kind):
    """Each thread's loop has its own current task and task set, while both run."""
    import threading

    errors = []
    barrier = threading.Barrier(2, timeout=5)

    def worker(tag):
        lp = new_loop(loop_kind)
        if task_kind == "ferroloop":
            lp.set_task_factory(import_ferroloop().task_factory)
        elif hasattr(lp, "native_tasks"):
            lp.native_tasks = False

        async def body(i):
            me = asyncio.current_task()
            for _ in range(200):
                await asyncio.sleep(0)
                if asyncio.current_task() is not me or me.get_loop() is not lp:
                    errors.append((tag, i, "wrong current task"))
                    return
            return i

        async def main():
            tasks = [asyncio.create_task(body(i), name=f"{tag}-{i}") for i in range(5)]
            await asyncio.to_thread(barrier.wait)
            names = {t.get_name() for t in asyncio.all_tasks()}
            # ("None": 3.13.0 names factory-made tasks so, see test_default_names)
            if not all(n.startswith((tag, "Task-", "None")) for n in names):
                errors.append((tag, "foreign tasks", names))
            return await asyncio.gather(*tasks)

        try:
            if lp.run_until_complete(main()) != list(range(5)):
                errors.append((tag, "results"))
            lp.run_until_complete(lp.shutdown_default_executor())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((tag, repr(e)))
        finally:
            lp.close()

    threads = [threading.Thread(target=worker, args=(tag,)) for tag in ("A", "B")]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert errors == []


@pytest.mark.parametrize("cancels, uncancels", [(1, 1), (2, 1), (2, 2), (3, 3), (1, 2)])
def test_cancel_uncancel_sequences_while_awaiting(tloop, cancels, uncancels):
    def scenario(make_task):
        events = []
        fut = tloop.create_future()

        async def body():
            try:
                await fut
            except asyncio.CancelledError as e:
                events.append(("caught", e.args, asyncio.current_task().cancelling()))
                await asyncio.sleep(0)
                events.append("slept after catching")
                raise
            return "finished"

        t = make_task(body())
        run_briefly(tloop)
        events.append([t.cancel(f"c{i}") for i in range(cancels)])
        events.append([t.uncancel() for _ in range(uncancels)])
        events.append(("fut cancelled", fut.cancelled()))
        run_briefly(tloop, 4)
        events.append(("end", t.done(), t.cancelled(), t.cancelling()))
        if not t.done():
            t.cancel()
            run_briefly(tloop, 3)
        return events

    assert scenario(tloop.create_task) == _oracle(tloop, scenario)


def test_task_factory_called_directly(loop):
    if SKIP_NATIVE:
        pytest.skip("FERROLOOP_SKIP_NATIVE=1")
    ferroloop = import_ferroloop()
    ctx = contextvars.copy_context()
    ctx.run(var.set, "factory ctx")

    async def body():
        return var.get()

    t = ferroloop.task_factory(loop, body(), name="made", context=ctx)
    assert type(t) is ferroloop.Task
    assert (t.get_loop(), t.get_name(), t.get_context()) == (loop, "made", ctx)
    assert loop.run_until_complete(t) == "factory ctx"
    plain = ferroloop.task_factory(loop, value(3))
    assert re.fullmatch(r"Task-\d+", plain.get_name())
    assert loop.run_until_complete(plain) == 3


def test_debug_slow_step_reports_name_the_task(request, caplog, loop_kind, task_kind):
    """In debug mode a slow callback is logged as 'Executing <what> took N seconds'; for a
    task's step asyncio names the task (``Executing <Task pending name=...>``)."""
    import logging

    if loop_kind == "asyncio":
        xfail_for_ferroloop(
            request,
            task_kind,
            "on asyncio's loop a slow ferroloop.Task step is logged as 'Executing <Handle "
            "<TaskStepMethWrapper object at 0x...>() created at ...>' (and the wakeup as "
            "'<Handle Task.task_wakeup(...)>'): asyncio's _format_handle only names the "
            "task when the callback's __self__ is an asyncio.Task",
        )

    def scenario(cls):
        lp = new_loop(loop_kind)
        caplog.clear()
        try:
            lp.set_debug(True)
            lp.slow_callback_duration = 0  # every callback counts as slow: no timing
            fut = lp.create_future()
            t = cls(wait_on(fut), loop=lp, name="slowpoke")
            lp.call_soon(fut.set_result, None)
            with caplog.at_level(logging.WARNING, logger="asyncio"):
                lp.run_until_complete(t)
        finally:
            lp.close()
        return [
            r.getMessage() for r in caplog.records if r.getMessage().startswith("Executing <Task")
        ]

    got = scenario(task_class(task_kind))
    assert len(got) == 2 and all("name='slowpoke'" in m for m in got), got


def test_arbitrary_attributes_can_be_set(request, tloop, task_kind):
    """asyncio's Task has a __dict__: libraries attach their own attributes to tasks."""
    t = tloop.create_task(value(1))
    try:
        t.my_attr = "tag"
        assert t.my_attr == "tag"
    finally:
        tloop.run_until_complete(t)


def test_object_protocols(tloop):
    t = tloop.create_task(value(1))
    other = tloop.create_task(value(2))
    same = t
    assert hash(t) == hash(same) and t == same and t != other
    assert len({t, other, t}) == 2
    assert weakref.ref(t)() is t
    with pytest.raises(TypeError):
        t < other  # noqa: B015 - no ordering
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(t)
    tloop.run_until_complete(asyncio.gather(t, other))


def test_awaited_future_cancelled_with_a_message(tloop):
    def scenario(make_task):
        fut = tloop.create_future()
        seen = []

        async def body():
            try:
                await fut
            except asyncio.CancelledError as e:
                seen.append(e.args)
                raise

        t = make_task(body())
        run_briefly(tloop)
        fut.cancel("future msg")
        run_briefly(tloop, 3)
        try:
            t.result()
        except asyncio.CancelledError as e:
            seen.append(("result", e.args))
        return seen, t.cancelled(), t.cancelling()

    got = scenario(tloop.create_task)
    assert got[0][0] == ("future msg",)
    assert got == _oracle(tloop, scenario)


def test_ensure_future_and_wrap_future(tloop, loop_kind):
    t = tloop.create_task(value(1))
    assert asyncio.ensure_future(t) is t
    assert asyncio.ensure_future(t, loop=tloop) is t
    assert asyncio.wrap_future(t) is t
    other = new_loop(loop_kind)
    try:
        with pytest.raises(ValueError):
            asyncio.ensure_future(t, loop=other)
    finally:
        other.close()
    assert tloop.run_until_complete(t) == 1


@needs_312
def test_eager_task_introspection(loop, task_kind):
    """get_coro/get_context/get_name/repr of an eager task finished in its first step."""

    def scenario(factory):
        loop.set_task_factory(factory)
        out = []

        async def quick():
            return "q"

        async def main():
            t = asyncio.create_task(quick(), name="eager-q")
            if type(t) is not asyncio.Task:
                # (not asked of asyncio.Task: get_coro() here crashes CPython 3.12.1)
                coro = t.get_coro()
                assert coro is None or asyncio.iscoroutine(coro)
            out.append(
                (
                    t.done(),
                    isinstance(t.get_context(), contextvars.Context),
                    t.get_name(),
                    _norm(repr(t)).split(" coro=")[0],
                    t.get_stack(),
                    t.cancel(),
                )
            )

        loop.run_until_complete(main())
        loop.set_task_factory(None)
        return out

    assert scenario(_eager_factory(task_kind)) == scenario(asyncio.eager_task_factory)


_UNINITIALIZED_SCRIPT = r"""
import asyncio, gc, sys
sys.path[:0] = {path!r}
import ferroloop

t = ferroloop.Task.__new__(ferroloop.Task)
calls = [
    repr, lambda t: t.done(), lambda t: t.cancelled(), lambda t: t.cancel("m"),
    lambda t: t.result(), lambda t: t.exception(), lambda t: t.get_loop(),
    lambda t: t.get_name(), lambda t: t.set_name("n"), lambda t: t.get_coro(),
    lambda t: t.get_context(), lambda t: t.add_done_callback(print),
    lambda t: t.remove_done_callback(print), lambda t: t.get_stack(),
    lambda t: t.print_stack(file=sys.stderr), lambda t: t.cancelling(),
    lambda t: t.uncancel(), lambda t: next(t.__await__()), lambda t: t._state,
    lambda t: t._asyncio_future_blocking, lambda t: asyncio.isfuture(t),
]
for call in calls:
    try:
        call(t)
    except Exception:
        pass
del t
gc.collect()
print("survived", flush=True)
"""


def test_uninitialized_task_does_not_crash():
    """Task.__new__ without __init__, then every method: errors are fine, crashes are not
    (a child process; asyncio's own C Task does crash here, so there is no oracle)."""
    import os
    import subprocess

    if SKIP_NATIVE:
        pytest.skip("FERROLOOP_SKIP_NATIVE=1")
    paths = [os.path.dirname(os.path.abspath(__file__)), *(p for p in sys.path if p)]
    proc = subprocess.run(
        [sys.executable, "-c", _UNINITIALIZED_SCRIPT.format(path=paths)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.strip() == "survived"


class DuckFuture:
    """A future-like object that is not an asyncio.Future (and has no get_loop: asyncio
    falls back to its ``_loop``), as some third-party libraries make."""

    _asyncio_future_blocking = False

    def __init__(self, loop):
        self._loop = loop
        self._callbacks = []
        self._state = "PENDING"
        self._result = None
        self.cancel_calls = []

    def done(self):
        return self._state != "PENDING"

    def cancelled(self):
        return self._state == "CANCELLED"

    def add_done_callback(self, fn, *, context=None):
        if self.done():
            self._loop.call_soon(fn, self, context=context)
        else:
            self._callbacks.append((fn, context))

    def remove_done_callback(self, fn):
        before = len(self._callbacks)
        self._callbacks = [(f, c) for f, c in self._callbacks if f != fn]
        return before - len(self._callbacks)

    def _finish(self, state):
        self._state = state
        for fn, ctx in self._callbacks:
            self._loop.call_soon(fn, self, context=ctx)
        self._callbacks = []

    def set_result(self, value):
        self._result = value
        self._finish("FINISHED")

    def cancel(self, msg=None):
        self.cancel_calls.append(msg)
        if self.done():
            return False
        self._finish("CANCELLED")
        return True

    def result(self):
        if self._state == "CANCELLED":
            raise asyncio.CancelledError()
        return self._result

    def exception(self):
        return None

    def __await__(self):
        if not self.done():
            self._asyncio_future_blocking = True
            yield self
        return self.result()

    __iter__ = __await__


def test_duck_typed_futures(tloop):
    def scenario(make_task):
        out = []
        duck = DuckFuture(tloop)
        t = make_task(wait_on(duck))
        run_briefly(tloop)
        tloop.call_soon(duck.set_result, "quack")
        out.append(tloop.run_until_complete(t))
        duck2 = DuckFuture(tloop)
        t2 = make_task(wait_on(duck2))
        run_briefly(tloop)
        out.append(t2.cancel("stop"))
        run_briefly(tloop, 3)
        out.append((t2.cancelled(), duck2.cancel_calls, duck2.cancelled()))
        return out

    got = scenario(tloop.create_task)
    assert got == _oracle(tloop, scenario)
    assert got[0] == "quack"


# --- a task awaiting asyncio's own (C) Future: the exact type is read without method calls


async def _await_and_report(fut):
    try:
        return "result", await fut
    except asyncio.CancelledError as e:
        return "cancelled", e.args
    except ValueError as e:
        frames = [f.name for f in traceback.extract_tb(e.__traceback__)]
        return "raised", repr(e), "_thrower" in frames


def _thrower():
    raise ValueError("boom")


@pytest.mark.parametrize("outcome", ["result", "exception", "cancel", "cancel_msg", "thread"])
def test_awaiting_an_asyncio_future(tloop, outcome):
    def scenario(make_task):
        fut = tloop.create_future()
        assert type(fut) is asyncio.Future
        t = make_task(_await_and_report(fut))
        run_briefly(tloop)
        # While waiting: asyncio's bookkeeping on the future and the task.
        waiting = (
            fut._asyncio_future_blocking,
            len(fut._callbacks),
            t.done(),
        )
        if outcome == "result":
            fut.set_result(42)
        elif outcome == "exception":
            try:
                _thrower()
            except ValueError as e:
                fut.set_exception(e)
        elif outcome == "cancel":
            fut.cancel()
        elif outcome == "cancel_msg":
            fut.cancel("why")
        else:
            th = threading.Thread(target=tloop.call_soon_threadsafe, args=(fut.set_result, "t"))
            th.start()
            th.join()
        return waiting, tloop.run_until_complete(t), t.cancelled()

    got = scenario(tloop.create_task)
    assert got == _oracle(tloop, scenario)
    assert got[0][:2] == (False, 1)
    if outcome == "exception":
        # The traceback reaches the frame that raised.
        assert got[1] == ("raised", "ValueError('boom')", True)


def test_awaiting_an_asyncio_future_of_another_loop(tloop, loop_kind):
    other = new_loop(loop_kind)
    try:

        def scenario(make_task):
            fut = other.create_future()

            async def body():
                try:
                    await fut
                except RuntimeError as e:
                    return str(e).replace(repr(fut), "FUT").split(" got ")[1]

            return tloop.run_until_complete(make_task(body()))

        got = scenario(tloop.create_task)
        assert got == "Future FUT attached to a different loop"
        assert got == _oracle(tloop, scenario)
    finally:
        other.close()


def test_asyncio_future_yielded_without_await(tloop):
    def scenario(make_task):
        fut = tloop.create_future()

        @types.coroutine
        def bad():
            yield fut  # _asyncio_future_blocking is False: not from `await`

        async def body():
            try:
                await bad()
            except RuntimeError as e:
                return str(e).split(" in task ")[0]

        return tloop.run_until_complete(make_task(body())), fut.done()

    got = scenario(tloop.create_task)
    assert got == ("yield was used instead of yield from", False)
    assert got == _oracle(tloop, scenario)


class _CountingFuture(asyncio.Future):
    """A Future subclass whose methods a waiting task must call (not read past)."""

    def __init__(self, *, loop):
        super().__init__(loop=loop)
        self.calls = []

    def get_loop(self):
        self.calls.append("get_loop")
        return super().get_loop()

    def add_done_callback(self, fn, *, context=None):
        self.calls.append("add_done_callback")
        return super().add_done_callback(fn, context=context)

    def result(self):
        self.calls.append("result")
        return super().result()


def test_awaiting_a_future_subclass_calls_its_methods(tloop):
    def scenario(make_task):
        fut = _CountingFuture(loop=tloop)
        t = make_task(_await_and_report(fut))
        run_briefly(tloop)
        tloop.call_soon(fut.set_result, "sub")
        return tloop.run_until_complete(t), fut.calls

    got = scenario(tloop.create_task)
    assert got[0] == ("result", "sub")
    assert got == _oracle(tloop, scenario)


def test_awaiting_an_asyncio_future_in_debug_mode(tloop):
    tloop.set_debug(True)

    def scenario(make_task):
        fut = tloop.create_future()
        t = make_task(_await_and_report(fut))
        run_briefly(tloop)
        fut.set_result("dbg")
        return tloop.run_until_complete(t)

    assert scenario(tloop.create_task) == ("result", "dbg")
    assert scenario(tloop.create_task) == _oracle(tloop, scenario)


def test_asyncio_future_wakeup_goes_through_a_patched_call_soon(tloop):
    def scenario(make_task):
        fut = tloop.create_future()
        t = make_task(_await_and_report(fut))
        run_briefly(tloop)
        seen = []
        original = tloop.call_soon

        def call_soon(callback, *args, context=None):
            seen.append(getattr(callback, "__qualname__", None))
            return original(callback, *args, context=context)

        tloop.call_soon = call_soon
        try:
            fut.set_result("patched")
            return tloop.run_until_complete(t), seen[:1]
        finally:
            del tloop.call_soon

    got = scenario(tloop.create_task)
    assert got[0] == ("result", "patched") and len(got[1]) == 1
    assert got == _oracle(tloop, scenario)


# --- `await task`: the awaiting coroutine gets the task's outcome (on 3.11 through the
# iterator's am_send slot, without a StopIteration)


@pytest.mark.parametrize("when", ["done", "pending"])
@pytest.mark.parametrize("outcome", ["value", "none", "error", "cancel"])
def test_awaiting_a_task_outcomes(tloop, when, outcome):
    def scenario(make_task):
        gate = tloop.create_future()

        async def inner():
            if when == "pending":
                await gate
            if outcome == "error":
                _thrower()
            if outcome == "cancel":
                raise asyncio.CancelledError("stop")
            return None if outcome == "none" else ("v", 1)

        async def outer(t):
            try:
                return "ok", await t
            except ValueError as e:
                frames = [f.name for f in traceback.extract_tb(e.__traceback__)]
                return "raised", repr(e), "_thrower" in frames, "inner" in frames
            except asyncio.CancelledError as e:
                return "cancelled", e.args

        t = make_task(inner())
        run_briefly(tloop)
        o = make_task(outer(t))
        run_briefly(tloop)
        gate.set_result(None)
        return tloop.run_until_complete(o), t.done()

    got = scenario(tloop.create_task)
    assert got == _oracle(tloop, scenario)
    assert got[1] is True


def test_awaiting_a_task_through_yield_from_and_send(tloop):
    def scenario(make_task):
        gate = tloop.create_future()

        async def inner():
            await gate
            return "inner"

        @types.coroutine
        def via_yield_from(t):
            return (yield from t)

        async def outer(t):
            return await via_yield_from(t)

        t = make_task(inner())
        out = [tloop.run_until_complete(make_task(outer(make_task(value(3)))))]
        # A value sent into a coroutine waiting on a task is ignored, as asyncio does.
        c = outer(t)
        out.append(c.send(None) is t)
        gate.set_result(None)
        tloop.run_until_complete(t)
        try:
            c.send("ignored")
        except StopIteration as e:
            out.append(e.args)
        # The iterator itself: next/send after the end.
        it = t.__await__()
        try:
            next(it)
        except StopIteration as e:
            out.append(("stop", e.args))
        try:
            next(it)
        except StopIteration as e:
            out.append(("again", e.args))
        return out

    got = scenario(tloop.create_task)
    assert got[:3] == [3, True, ("inner",)]
    assert got == _oracle(tloop, scenario)
