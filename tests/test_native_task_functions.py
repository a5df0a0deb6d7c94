"""ferroloop's task functions (``wait``, ``gather``, ``shield``, ``as_completed``,
``wait_for``) against the running Python's asyncio functions.

Every test runs on both loops (``loop``) x both task kinds (``task_kind``: the loop's
default asyncio.Task or ``ferroloop.task_factory``) x both function sets (``fn_kind``:
"asyncio", the oracle, or "ferroloop"). The expected values hold on asyncio; where they
differ between Python versions, the test runs the same scenario with asyncio's functions on
the same loop and compares.
"""

import asyncio
import os
import sys
import types

import pytest
from parity_helpers import SKIP_NATIVE, import_ferroloop, new_loop, run, run_briefly, turns

# An error the loop logs through its default handler fails the test (conftest).
pytestmark = pytest.mark.usefixtures("no_unexpected_loop_errors")

KINDS = ["asyncio"] if SKIP_NATIVE else ["asyncio", "ferroloop"]


@pytest.fixture(params=KINDS)
def task_kind(request):
    """Which Task the loop's create_task makes: "asyncio" or "ferroloop"."""
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


@pytest.fixture(params=KINDS)
def fn_kind(request):
    return request.param


def functions(kind):
    """A namespace with wait, gather, shield, as_completed and wait_for of one kind."""
    mod = asyncio if kind == "asyncio" else import_ferroloop()
    return types.SimpleNamespace(
        wait=mod.wait,
        gather=mod.gather,
        shield=mod.shield,
        as_completed=mod.as_completed,
        wait_for=mod.wait_for,
    )


@pytest.fixture
def F(fn_kind):
    """The task functions under test."""
    return functions(fn_kind)


ORACLE = functions("asyncio")


async def value(v, n=1):
    """Return ``v`` after ``n`` loop turns."""
    await turns(n)
    return v


async def fail(exc, n=1):
    await turns(n)
    raise exc


async def wait_on(fut):
    return await fut


async def cancel_and_wait(*futs):
    for f in futs:
        f.cancel()
    await asyncio.gather(*futs, return_exceptions=True)


def every_kind_of_future(lp, coro_fn):
    """An asyncio Future, an asyncio.Task, a ferroloop.Task and a loop.create_task() task,
    each completing with ``coro_fn(i)``'s outcome (the Future through a call_soon)."""
    fut = lp.create_future()

    async def set_later():
        try:
            fut.set_result(await coro_fn(0))
        except Exception as e:  # noqa: BLE001 - handed to the future
            fut.set_exception(e)

    helper = asyncio.Task(set_later(), loop=lp)
    futs = [fut, asyncio.Task(coro_fn(1), loop=lp), lp.create_task(coro_fn(2))]
    if not SKIP_NATIVE:
        futs.append(import_ferroloop().Task(coro_fn(3), loop=lp))
    return futs, helper


def error_of(fn):
    """(type, message) of what ``fn()`` raises, or None."""
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - we compare whatever it is
        return type(e), str(e)
    return None


async def aerror_of(awaitable):
    try:
        await awaitable
    except BaseException as e:  # noqa: BLE001
        return type(e), str(e)
    return None


# -- wait -----------------------------------------------------------------------------------


def test_wait_all_completed_with_every_kind_of_future(tloop, F):
    async def main():
        futs, helper = every_kind_of_future(tloop, lambda i: value(i, i))
        done, pending = await F.wait(futs)
        await helper
        return done == set(futs), pending, sorted(f.result() for f in done)

    assert run(tloop, main()) == (True, set(), list(range(4 if not SKIP_NATIVE else 3)))


def test_wait_first_completed(tloop, F):
    async def main():
        f1, f2, f3 = (tloop.create_future() for _ in range(3))
        t = tloop.create_task(wait_on(f3))
        tloop.call_soon(f2.set_result, "two")
        done, pending = await F.wait([f1, f2, t], return_when=asyncio.FIRST_COMPLETED)
        result = done == {f2}, pending == {f1, t}, f1.cancelled(), t.cancelled()
        await cancel_and_wait(t, f1)
        return result

    assert run(tloop, main()) == (True, True, False, False)


def test_wait_first_exception(tloop, F):
    async def main():
        ok = tloop.create_task(value("ok", 1))
        bad = tloop.create_task(fail(ValueError("bad"), 3))
        forever = tloop.create_task(wait_on(tloop.create_future()))
        done, pending = await F.wait({ok, bad, forever}, return_when=asyncio.FIRST_EXCEPTION)
        result = done == {ok, bad}, pending == {forever}, type(bad.exception())
        await cancel_and_wait(forever)
        return result

    assert run(tloop, main()) == (True, True, ValueError)


def test_wait_first_exception_without_exception_waits_for_all(tloop, F):
    async def main():
        tasks = [tloop.create_task(value(i, i)) for i in range(3)]
        done, pending = await F.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        return done == set(tasks), pending

    assert run(tloop, main()) == (True, set())


def test_wait_first_exception_does_not_count_a_cancelled_future(tloop, F):
    async def main():
        victim = tloop.create_task(wait_on(tloop.create_future()))
        last = tloop.create_future()

        async def finish_later():
            await turns(5)
            last.set_result("last")

        helper = tloop.create_task(finish_later())
        tloop.call_soon(victim.cancel)
        done, pending = await F.wait([victim, last], return_when=asyncio.FIRST_EXCEPTION)
        await helper
        return done == {victim, last}, pending

    assert run(tloop, main()) == (True, set())


def test_wait_timeout_cancels_nothing(tloop, F):
    async def main():
        gate = tloop.create_future()
        quick = tloop.create_task(value("quick", 1))
        slow = tloop.create_task(wait_on(gate))
        done, pending = await F.wait([quick, slow], timeout=0.01)
        result = done == {quick}, pending == {slow}, slow.cancelled(), slow.done()
        gate.set_result("late")
        return result, await slow

    assert run(tloop, main()) == ((True, True, False, False), "late")


def test_wait_timeout_nothing_done(tloop, F):
    async def main():
        fut = tloop.create_future()
        done, pending = await F.wait({fut}, timeout=0)
        result = done, pending == {fut}, fut.cancelled()
        fut.cancel()
        return result

    assert run(tloop, main()) == (set(), True, False)


def test_wait_on_already_done_futures(tloop, F):
    async def main():
        a = tloop.create_future()
        a.set_result(1)
        t = tloop.create_task(value(2, 0))
        await t
        done, pending = await F.wait([a, t, a], return_when=asyncio.FIRST_COMPLETED)
        return done == {a, t}, pending

    assert run(tloop, main()) == (True, set())


def test_wait_removes_its_callbacks(tloop, F):
    async def main():
        pending_fut = tloop.create_future()
        pending_task = tloop.create_task(wait_on(tloop.create_future()))
        await asyncio.sleep(0)
        before = len(pending_task._callbacks or ())
        quick = tloop.create_task(value(1))
        await F.wait([pending_fut, pending_task, quick], return_when=asyncio.FIRST_COMPLETED)
        result = len(pending_fut._callbacks or ()), len(pending_task._callbacks or ()) - before
        pending_fut.cancel()
        await cancel_and_wait(pending_task)
        return result

    assert run(tloop, main()) == (0, 0)


def test_cancelling_wait_does_not_cancel_the_futures(tloop, F):
    async def main():
        fut = tloop.create_future()
        t = tloop.create_task(wait_on(tloop.create_future()))
        waiter = tloop.create_task(F.wait([fut, t]))
        await turns(2)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        result = waiter.cancelled(), fut.cancelled(), t.cancelled(), len(fut._callbacks or ())
        fut.cancel()
        await cancel_and_wait(t)
        return result

    assert run(tloop, main()) == (True, False, False, 0)


def _wait_error_cases(lp):
    fut = lp.create_future()
    return {
        "bare coroutine": lambda: value(1),
        "list of coroutines": lambda: [value(1)],
        "empty": lambda: set(),
        "a future as fs": lambda: fut,
        "bad return_when": lambda: ("bogus", [fut]),
        "bad return_when on empty": lambda: ("bogus", []),
    }


@pytest.mark.parametrize(
    "case",
    [
        "bare coroutine",
        "list of coroutines",
        "empty",
        "a future as fs",
        "bad return_when",
        "bad return_when on empty",
    ],
)
def test_wait_errors_match_asyncio(tloop, F, case):
    async def attempt(fns):
        arg = _wait_error_cases(tloop)[case]()
        kwargs = {}
        if isinstance(arg, tuple):
            kwargs["return_when"], arg = arg
        try:
            return await aerror_of(fns.wait(arg, **kwargs))
        finally:
            for c in arg if isinstance(arg, list) else [arg]:
                if asyncio.iscoroutine(c):
                    c.close()

    got = run(tloop, attempt(F))
    assert got is not None and got[0] in (TypeError, ValueError), got
    assert got == run(tloop, attempt(ORACLE))


def test_wait_callback_order_matches_asyncio(tloop, F):
    async def scenario(fns):
        events = []
        a, b = tloop.create_future(), tloop.create_future()
        a.add_done_callback(lambda _: events.append("a cb before"))
        w = tloop.create_task(fns.wait([a, b], return_when=asyncio.FIRST_COMPLETED))
        await asyncio.sleep(0)
        a.add_done_callback(lambda _: events.append("a cb after"))
        w.add_done_callback(lambda _: events.append("wait done"))
        tloop.call_soon(events.append, "queued")
        a.set_result(1)
        tloop.call_soon(events.append, "queued after")
        await w
        events.append("awaited")
        b.cancel()
        return events

    assert run(tloop, scenario(F)) == run(tloop, scenario(ORACLE))


# -- gather ---------------------------------------------------------------------------------


def test_gather_keeps_argument_order(tloop, F):
    finished = []

    async def v(x, n):
        await turns(n)
        finished.append(x)
        return x

    async def main():
        return await F.gather(v("a", 3), v("b", 0), v("c", 1))

    assert run(tloop, main()) == ["a", "b", "c"]
    assert finished == ["b", "c", "a"]


def test_gather_of_the_same_coroutine_twice(tloop, F):
    starts = []

    async def once():
        starts.append(1)
        await asyncio.sleep(0)
        return "x"

    async def main():
        c = once()
        return await F.gather(c, c, value("y"), c)

    assert run(tloop, main()) == ["x", "x", "y", "x"]
    assert starts == [1]


def test_gather_of_the_same_future_and_task_twice(tloop, F):
    async def main():
        fut = tloop.create_future()
        t = tloop.create_task(value("t"))
        tloop.call_soon(fut.set_result, "f")
        return await F.gather(fut, t, fut, t)

    assert run(tloop, main()) == ["f", "t", "f", "t"]


def test_gather_of_every_kind_of_future_and_a_coroutine(tloop, F):
    async def main():
        futs, helper = every_kind_of_future(tloop, lambda i: value(i, i))
        results = await F.gather(*futs, value("coro", 2))
        await helper
        return results

    expected = list(range(4 if not SKIP_NATIVE else 3)) + ["coro"]
    assert run(tloop, main()) == expected


def test_gather_returns_a_future(tloop, F):
    async def main():
        g = F.gather(value(1), value(2))
        return asyncio.isfuture(g), g.get_loop() is tloop, g.done(), await g

    assert run(tloop, main()) == (True, True, False, [1, 2])


def test_gather_with_no_arguments(tloop, F):
    async def main():
        g = F.gather()
        return asyncio.isfuture(g), g.get_loop() is tloop, g.done(), await g

    assert run(tloop, main()) == (True, True, True, [])


def test_gather_return_exceptions(tloop, F):
    async def main():
        exc = KeyError("k")
        results = await F.gather(value(1), fail(exc), value(3, 3), return_exceptions=True)
        return results[0], results[1] is exc, results[2]

    assert run(tloop, main()) == (1, True, 3)


def test_gather_child_raising_cancels_nothing_else(tloop, F):
    async def main():
        slow = tloop.create_task(value("slow", 5))
        gate = tloop.create_future()
        waiting = tloop.create_task(wait_on(gate))
        g = F.gather(slow, fail(ValueError("first"), 1), waiting, fail(KeyError("second"), 2))
        err = await aerror_of(g)
        state = slow.done(), waiting.cancelled(), g.done(), g.cancelled()
        assert g.cancel() is False  # done already: cancels nothing
        gate.set_result("w")
        return err, state, await slow, await waiting

    assert run(tloop, main()) == (
        (ValueError, "first"),
        (False, False, True, False),
        "slow",
        "w",
    )


def test_cancelling_the_gather_cancels_the_children(tloop, F):
    async def scenario(fns):
        seen = []

        async def child(i):
            try:
                await tloop.create_future()
            except asyncio.CancelledError as e:
                seen.append((i, e.args))
                raise

        gate = tloop.create_future()
        children = [tloop.create_task(child(0)), child(1), gate]
        g = fns.gather(*children)
        await turns(2)
        cancelled = g.cancel("stop it")
        err = await aerror_of(g)
        await turns(2)
        return cancelled, err, g.cancelled(), gate.cancelled(), children[0].cancelled(), seen

    got = run(tloop, scenario(F))
    assert got[0] is True
    assert got[1][0] is asyncio.CancelledError
    assert got[3:5] == (True, True)  # got[2], the outer's cancelled(): False on 3.11-3.13
    assert sorted(i for i, _ in got[5]) == [0, 1]
    assert got == run(tloop, scenario(ORACLE))


@pytest.mark.parametrize("return_exceptions", [False, True])
def test_cancelling_the_gather_wins_over_return_exceptions(tloop, F, return_exceptions):
    async def scenario(fns):
        t = tloop.create_task(wait_on(tloop.create_future()))
        g = fns.gather(t, value(1), return_exceptions=return_exceptions)
        await asyncio.sleep(0)
        g.cancel()
        err = await aerror_of(g)
        return err[0], g.cancelled(), t.cancelled()

    got = run(tloop, scenario(F))
    assert (got[0], got[2]) == (asyncio.CancelledError, True)
    assert got == run(tloop, scenario(ORACLE))


def test_gather_child_cancelled(tloop, F):
    async def scenario(fns):
        victim = tloop.create_task(wait_on(tloop.create_future()))
        other = tloop.create_task(value("other", 3))
        g = fns.gather(victim, other)
        await asyncio.sleep(0)
        victim.cancel("victim msg")
        err = await aerror_of(g)
        return err, g.cancelled(), other.cancelled(), await other

    got = run(tloop, scenario(F))
    assert got[0][0] is asyncio.CancelledError
    assert got[1:] == (False, False, "other")  # the outer is not cancelled, just failed
    assert got == run(tloop, scenario(ORACLE))


def test_gather_child_cancelled_with_return_exceptions(tloop, F):
    async def scenario(fns):
        victim = tloop.create_task(wait_on(tloop.create_future()))
        gate = tloop.create_future()
        g = fns.gather(victim, value("v"), gate, return_exceptions=True)
        await asyncio.sleep(0)
        victim.cancel("victim msg")
        gate.cancel()
        results = await g
        return [(type(r).__name__, r.args) if isinstance(r, BaseException) else r for r in results]

    got = run(tloop, scenario(F))
    assert [r[0] if isinstance(r, tuple) else r for r in got] == [
        "CancelledError",
        "v",
        "CancelledError",
    ]
    assert got == run(tloop, scenario(ORACLE))


def test_gather_of_done_futures(tloop, F):
    async def main():
        a, b = tloop.create_future(), tloop.create_future()
        a.set_result(1)
        b.set_exception(ValueError("b"))
        return await F.gather(a, b, return_exceptions=True)

    results = run(tloop, main())
    assert results[0] == 1 and isinstance(results[1], ValueError)


def test_gather_errors_match_asyncio(tloop, loop_kind, F):
    other = new_loop(loop_kind)
    try:

        async def attempt(fns):
            foreign = other.create_future()
            mine = tloop.create_future()
            return [
                error_of(lambda: fns.gather(1)),
                error_of(lambda: fns.gather(mine, foreign)),
                error_of(lambda: fns.gather(mine, "not awaitable")),
            ]

        got = run(tloop, attempt(F))
        assert [g and g[0] for g in got] == [TypeError, ValueError, TypeError]
        assert got == run(tloop, attempt(ORACLE))
    finally:
        other.close()


def test_gather_callback_order_matches_asyncio(tloop, F):
    async def scenario(fns):
        events = []
        a, b = tloop.create_future(), tloop.create_future()
        a.add_done_callback(lambda _: events.append("a cb before"))
        g = fns.gather(a, b)
        a.add_done_callback(lambda _: events.append("a cb after"))
        g.add_done_callback(lambda _: events.append("gather cb"))
        b.add_done_callback(lambda _: events.append("b cb after"))
        tloop.call_soon(events.append, "queued")
        a.set_result(1)
        b.set_result(2)
        tloop.call_soon(events.append, "queued after")
        events.append(("result", await g))
        return events

    got = run(tloop, scenario(F))
    assert got == run(tloop, scenario(ORACLE))


def test_gather_outer_is_freed_after_use(tloop, F):
    import gc
    import weakref

    async def main():
        g = F.gather(value(1), tloop.create_task(value(2)))
        ref = weakref.ref(g)
        result = await g
        del g
        return result, ref

    gc.collect()
    gc.disable()
    try:
        result, ref = run(tloop, main())
        assert result == [1, 2]
        assert ref() is None
    finally:
        gc.enable()


# -- shield ---------------------------------------------------------------------------------


def test_shield_outer_cancel_leaves_the_inner_running(tloop, F):
    async def main():
        gate = tloop.create_future()
        inner = tloop.create_task(wait_on(gate))
        outer = F.shield(inner)
        assert outer is not inner
        await asyncio.sleep(0)
        assert outer.cancel() is True
        err = await aerror_of(outer)
        state = outer.cancelled(), inner.cancelled(), inner.done()
        gate.set_result("inner result")
        return err[0], state, await inner

    assert run(tloop, main()) == (
        asyncio.CancelledError,
        (True, False, False),
        "inner result",
    )


def test_shield_protects_a_task_being_cancelled(tloop, F):
    async def main():
        gate = tloop.create_future()
        inner = tloop.create_task(wait_on(gate))

        async def guarded():
            return await F.shield(inner)

        g = tloop.create_task(guarded())
        await turns(2)
        g.cancel()
        err = await aerror_of(g)
        gate.set_result(5)
        return err[0], g.cancelled(), await inner

    assert run(tloop, main()) == (asyncio.CancelledError, True, 5)


def test_shield_propagates_result_and_exception(tloop, F):
    async def main():
        r = await F.shield(value("r", 2))
        e = await aerror_of(F.shield(fail(KeyError("k"), 2)))
        t = tloop.create_task(value("t"))
        return r, e, await F.shield(t)

    assert run(tloop, main()) == ("r", (KeyError, "'k'"), "t")


def test_shield_of_a_cancelled_inner_is_cancelled(tloop, F):
    async def main():
        inner = tloop.create_task(wait_on(tloop.create_future()))
        outer = F.shield(inner)
        await asyncio.sleep(0)
        inner.cancel()
        err = await aerror_of(outer)
        return err[0], outer.cancelled(), inner.cancelled()

    assert run(tloop, main()) == (asyncio.CancelledError, True, True)


def test_shield_of_a_done_future_is_the_future(tloop, F):
    async def main():
        fut = tloop.create_future()
        fut.set_result(1)
        t = tloop.create_task(value(2))
        await t
        return F.shield(fut) is fut, F.shield(t) is t

    assert run(tloop, main()) == (True, True)


def test_shield_of_a_pending_future_outside_the_loop(tloop, F):
    fut = tloop.create_future()
    outer = F.shield(fut)
    assert outer is not fut
    assert asyncio.isfuture(outer) and outer.get_loop() is tloop
    fut.set_result("x")
    run_briefly(tloop, 2)
    assert outer.result() == "x"


def test_shield_errors_match_asyncio(tloop, F):
    async def attempt(fns):
        return error_of(lambda: fns.shield(42))

    got = run(tloop, attempt(F))
    assert got is not None and got[0] is TypeError
    assert got == run(tloop, attempt(ORACLE))


# -- as_completed, wait_for ------------------------------------------------------------------


def test_as_completed_in_completion_order(tloop, F):
    async def main():
        order = []
        aws = [tloop.create_task(value("slow", 4)), value("fast", 0), value("mid", 2)]
        for nxt in F.as_completed(aws):
            order.append(await nxt)
        return order

    assert run(tloop, main()) == ["fast", "mid", "slow"]


def test_as_completed_timeout(tloop, F):
    async def main():
        gate = tloop.create_future()
        it = F.as_completed([gate], timeout=0.001)
        err = await aerror_of(next(iter(it)))
        result = err[0], gate.cancelled()
        gate.cancel()
        return result

    assert run(tloop, main()) == (asyncio.TimeoutError, False)


def test_wait_for_result_and_timeout(tloop, F):
    async def main():
        r = await F.wait_for(value("r"), 5)
        inner = tloop.create_task(wait_on(tloop.create_future()))
        err = await aerror_of(F.wait_for(inner, 0.001))
        n = await F.wait_for(value("n"), None)
        return r, err[0], inner.cancelled(), n

    assert run(tloop, main()) == ("r", asyncio.TimeoutError, True, "n")


# -- any loop, any runner -------------------------------------------------------------------


def test_functions_under_asyncio_run(asyncio_state, task_kind, F):
    """asyncio.run's own loop (asyncio's), ferroloop's functions and tasks."""

    async def main():
        if task_kind == "ferroloop":
            asyncio.get_running_loop().set_task_factory(import_ferroloop().task_factory)
        else:
            _lp = asyncio.get_running_loop()
            if hasattr(_lp, "native_tasks"):
                _lp.native_tasks = False
        a = asyncio.create_task(value("a"))
        done, _ = await F.wait([a])
        g = await F.gather(a, value("b"))
        s = await F.shield(value("c"))
        return [t.result() for t in done], g, s

    assert asyncio.run(main()) == (["a"], ["a", "b"], "c")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="TaskGroup is 3.11+")
def test_functions_inside_a_task_group(tloop, F):
    async def main():
        async with asyncio.TaskGroup() as tg:
            a = tg.create_task(value(1))
            b = tg.create_task(value(2, 2))
            g = tg.create_task(wait_on(F.gather(a, b)))
        return g.result()

    assert run(tloop, main()) == [1, 2]


# -- retrieval, logging, callbacks left behind ----------------------------------------------


def _record_loop_errors(lp):
    contexts = []
    lp.set_exception_handler(lambda _loop, ctx: contexts.append(ctx))
    return contexts


def test_gather_marks_later_exceptions_retrieved(tloop, F):
    import gc

    contexts = _record_loop_errors(tloop)

    async def main():
        g = F.gather(fail(ValueError("first"), 1), fail(KeyError("second"), 3))
        err = await aerror_of(g)
        await turns(5)  # the second child fails after the outer is done
        return err

    assert run(tloop, main()) == (ValueError, "first")
    gc.collect()
    assert [c["message"] for c in contexts] == []


def test_gather_cancelled_outer_marks_exceptions_retrieved(tloop, F):
    import gc

    contexts = _record_loop_errors(tloop)

    async def stubborn():
        try:
            await tloop.create_future()
        except asyncio.CancelledError:
            raise ValueError("raised instead of being cancelled") from None

    async def main():
        g = F.gather(stubborn(), value(1, 5))
        await asyncio.sleep(0)
        g.cancel()
        err = await aerror_of(g)
        await turns(5)
        return err[0]

    got = run(tloop, main())
    gc.collect()
    assert [c["message"] for c in contexts] == []
    assert got in (ValueError, asyncio.CancelledError)


def test_gather_children_it_creates_do_not_log_destroy_pending(tloop, F):
    import gc

    contexts = _record_loop_errors(tloop)

    async def main():
        g = F.gather(wait_on(tloop.create_future()), wait_on(tloop.create_future()))
        await turns(2)
        return g

    g = run(tloop, main())
    assert not g.done()
    del g
    gc.collect()
    assert [c["message"] for c in contexts] == []


@pytest.mark.parametrize("inner_done_first", [False, True])
def test_shield_cancelled_outer_and_inner_exception_logging(tloop, F, inner_done_first):
    """Whether a failed inner's exception counts as retrieved, as with asyncio.shield."""
    import gc

    def scenario(fns):
        contexts = _record_loop_errors(tloop)

        async def main():
            inner = tloop.create_task(fail(ValueError("inner"), 1))
            outer = fns.shield(inner)
            if inner_done_first:
                await turns(2)  # inner fails; outer's callback is queued, not run
                assert inner.done() and not outer.done()
            outer.cancel()
            err = await aerror_of(outer)
            await turns(4)
            return err[0]

        got = run(tloop, main())
        gc.collect()
        return got, [c["message"] for c in contexts]

    got = scenario(F)
    assert got == scenario(ORACLE)


def test_shield_removes_its_callback_when_the_outer_is_cancelled(tloop, F):
    async def scenario(fns):
        inner = tloop.create_future()
        before = len(inner._callbacks or ())
        outer = fns.shield(inner)
        during = len(inner._callbacks or ())
        outer.cancel()
        await turns(2)
        after = len(inner._callbacks or ())
        inner.set_result(None)
        return during - before, after - before

    got = run(tloop, scenario(F))
    assert got == (1, 0)
    assert got == run(tloop, scenario(ORACLE))


def test_shield_inner_task_callbacks(tloop, F):
    async def scenario(fns):
        inner = tloop.create_task(wait_on(tloop.create_future()))
        await asyncio.sleep(0)
        before = len(inner._callbacks or ())
        outer = fns.shield(inner)
        during = len(inner._callbacks or ())
        outer.cancel()
        await turns(2)
        after = len(inner._callbacks or ())
        await cancel_and_wait(inner)
        return during - before, after - before, inner.cancelled()

    got = run(tloop, scenario(F))
    assert got == (1, 0, True)
    assert got == run(tloop, scenario(ORACLE))


# -- unusual arguments ----------------------------------------------------------------------


class Awaitable:
    """An awaitable that is neither a coroutine nor a future."""

    def __init__(self, v):
        self.v = v

    def __await__(self):
        yield from asyncio.sleep(0).__await__()
        return self.v


def test_gather_of_plain_awaitables(tloop, F):
    async def main():
        return await F.gather(Awaitable("x"), value("y"), Awaitable("z"))

    assert run(tloop, main()) == ["x", "y", "z"]


def test_shield_of_a_plain_awaitable(tloop, F):
    async def main():
        return await F.shield(Awaitable("s"))

    assert run(tloop, main()) == "s"


@pytest.mark.parametrize("what", ["int", "plain awaitable", "none"])
def test_wait_on_non_futures_fails_as_asyncio(tloop, F, what):
    async def attempt(fns):
        fut = tloop.create_future()
        odd = {"int": 1, "plain awaitable": Awaitable(1), "none": None}[what]
        try:
            return await aerror_of(fns.wait([fut, odd]))
        finally:
            fut.cancel()

    got = run(tloop, attempt(F))
    assert got is not None
    assert got == run(tloop, attempt(ORACLE))


def test_wait_accepts_any_iterable(tloop, F):
    async def scenario(fns):
        tasks = [tloop.create_task(value(i, i)) for i in range(3)]
        await asyncio.gather(*tasks)
        outcomes = []
        for fs in (
            {t: None for t in tasks},
            tuple(tasks) + tuple(tasks),
            frozenset(tasks),
            (t for t in tasks),  # a generator: a coroutine for 3.11's asyncio.wait
        ):
            try:
                done, pending = await fns.wait(fs)
                outcomes.append((done == set(tasks), pending))
            except TypeError as e:
                outcomes.append(str(e))
        return outcomes

    got = run(tloop, scenario(F))
    assert got[:3] == [(True, set())] * 3
    assert got == run(tloop, scenario(ORACLE))


def test_wait_negative_timeout(tloop, F):
    async def main():
        fut = tloop.create_future()
        done, pending = await F.wait([fut], timeout=-1)
        fut.cancel()
        return done, len(pending)

    assert run(tloop, main()) == (set(), 1)


def test_gather_custom_base_exception(tloop, F):
    class Custom(BaseException):
        pass

    async def main(return_exceptions):
        g = F.gather(fail(Custom("c")), value(1), return_exceptions=return_exceptions)
        if return_exceptions:
            return [type(r) for r in await g]
        return await aerror_of(g)

    assert run(tloop, main(False)) == (Custom, "c")
    assert run(tloop, main(True)) == [Custom, int]


def test_gather_cancel_after_children_are_done(tloop, F):
    """The children are done but their callbacks have not run: cancel() returns False."""

    async def scenario(fns):
        a, b = tloop.create_future(), tloop.create_future()
        g = fns.gather(a, b)
        a.set_result(1)
        b.set_result(2)
        cancelled = g.cancel()
        res = await aerror_of(g)
        return cancelled, res, g.cancelled(), None if g.cancelled() else g.exception()

    got = run(tloop, scenario(F))
    assert got == (False, None, False, None)
    assert got == run(tloop, scenario(ORACLE))


def test_gather_result_type_and_repr(tloop, F):
    async def scenario(fns):
        g = fns.gather(value(1))
        r1 = repr(g)
        await g
        return type(g).__name__, r1, repr(g)

    got = run(tloop, scenario(F))
    assert got == run(tloop, scenario(ORACLE))


# -- subclasses of the task classes ----------------------------------------------------------

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


def _functions_subclass_calls(lp, base, fns):
    calls = []
    sub = recording_subclass(base, calls)
    out = {}

    async def main():
        for name, use in (
            ("gather", lambda s: fns.gather(s)),
            ("wait", lambda s: fns.wait([s])),
            ("shield", lambda s: fns.shield(s)),
        ):
            s = sub(value(1), loop=lp)
            calls.clear()
            await use(s)
            out[name] = list(calls)
        s = sub(wait_on(lp.create_future()), loop=lp)
        g = fns.gather(s)
        await asyncio.sleep(0)
        calls.clear()
        g.cancel()
        await asyncio.gather(g, return_exceptions=True)
        out["gather cancelled"] = list(calls)

    lp.run_until_complete(asyncio.Task(main(), loop=lp))
    return out


def test_functions_call_the_methods_of_task_subclasses(tloop, task_kind, F):
    """asyncio's wait/gather/shield call a child's methods, so a subclass's overrides run."""
    cls = asyncio.Task if task_kind == "asyncio" else import_ferroloop().Task
    got = _functions_subclass_calls(tloop, cls, F)
    assert got == _functions_subclass_calls(tloop, asyncio.Task, ORACLE)


def _future_subclass_calls(lp, make_task, fns):
    """Which methods of an asyncio.Future subclass tasks and the functions call."""
    calls = []
    sub = recording_subclass(asyncio.Future, calls)
    out = {}

    async def main():
        f = sub(loop=lp)
        lp.call_soon(f.set_result, 1)
        calls.clear()
        await f
        out["awaited"] = list(calls)
        f = sub(loop=lp)
        t = make_task(wait_on(f))
        await asyncio.sleep(0)
        calls.clear()
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)
        out["cancelled through its awaiter"] = list(calls)
        for name, use in (
            ("gather", lambda s: fns.gather(s)),
            ("wait", lambda s: fns.wait([s])),
            ("shield", lambda s: fns.shield(s)),
        ):
            f = sub(loop=lp)
            lp.call_soon(f.set_result, 1)
            calls.clear()
            await use(f)
            out[name] = list(calls)

    lp.run_until_complete(make_task(main()))
    return out


def test_future_subclass_methods_are_called(tloop, F):
    got = _future_subclass_calls(tloop, tloop.create_task, F)
    oracle = _future_subclass_calls(tloop, lambda c: asyncio.Task(c, loop=tloop), ORACLE)
    assert got == oracle
    assert got["cancelled through its awaiter"][0] == "cancel"


# -- eager tasks (3.12+) --------------------------------------------------------------------


def _eager_factory(task_kind):
    if task_kind == "asyncio":
        return asyncio.eager_task_factory
    return asyncio.create_eager_task_factory(import_ferroloop().Task)


def _eager_functions_trace(lp, factory, fns):
    trace = []
    lp.set_task_factory(factory)

    async def quick(x):
        trace.append(("quick", x))
        return x

    async def slow(x):
        trace.append(("slow start", x))
        await asyncio.sleep(0)
        trace.append(("slow end", x))
        return x

    async def bad():
        trace.append("bad")
        raise KeyError("bad")

    async def main():
        g = fns.gather(quick(1), slow(2), quick(3))
        trace.append(("gather made", g.done()))
        trace.append(("gather", await g))
        all_quick = fns.gather(quick(4), quick(5))
        trace.append(("all quick made", all_quick.done()))
        trace.append(("all quick", await all_quick))
        trace.append(("errors", await aerror_of(fns.gather(quick(6), bad(), slow(7)))))
        t = asyncio.create_task(quick(8))
        done, pending = await fns.wait([t, asyncio.create_task(slow(9))])
        trace.append(("wait", sorted(x.result() for x in done), pending))
        trace.append(("shield", await fns.shield(quick(10)), await fns.shield(slow(11))))
        await turns(3)

    lp.run_until_complete(main())
    lp.set_task_factory(None)
    return trace


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are 3.12+")
def test_eager_tasks_with_the_functions(loop, task_kind, F):
    got = _eager_functions_trace(loop, _eager_factory(task_kind), F)
    assert got == _eager_functions_trace(loop, asyncio.eager_task_factory, ORACLE)


# -- reprs ----------------------------------------------------------------------------------


def _normalized(text):
    import re

    return re.sub(r" at 0x[0-9a-f]+| at /\S+:\d+", "", text)


def _callback_reprs(lp, fns):
    async def main():
        out = {}
        f = lp.create_future()
        w = lp.create_task(fns.wait([f], timeout=3600))
        await asyncio.sleep(0)
        out["wait"] = _normalized(repr(f))
        f.set_result(1)
        await w
        f = lp.create_future()
        g = fns.gather(f)
        out["gather"] = (_normalized(repr(f)), _normalized(repr(g)))
        f.set_result(1)
        await g
        f = lp.create_future()
        s = fns.shield(f)
        out["shield"] = (_normalized(repr(f)), _normalized(repr(s)))
        f.set_result(1)
        await s
        return out

    return run(lp, main())


def test_reprs_of_the_futures_involved(request, tloop, fn_kind, F):
    """A future's repr lists its callbacks: wait/gather/shield's show as asyncio's do
    (``cb=[_wait.<locals>._on_completion()]``...), which is what a stuck program's
    task reprs (``wait_for=<Future pending cb=[...]>``) show."""
    assert _callback_reprs(tloop, F) == _callback_reprs(tloop, ORACLE)


# -- random scenarios: ferroloop's Task and functions against asyncio's, trace for trace ----


def _random_scenario(seed):
    """A random program for a few tasks (awaiting futures, each other, gather, wait, shield;
    raising, catching cancellation) and a random driver (settling futures, cancelling
    tasks between loop iterations). Pure data, so both runs interpret the same thing."""
    import random

    rnd = random.Random(seed)
    n_tasks = rnd.randint(2, 6)
    n_futs = rnd.randint(1, 4)
    programs = []
    for i in range(n_tasks):
        ops = []
        for _ in range(rnd.randint(1, 4)):
            refs = [("fut", k) for k in range(n_futs)] + [("task", j) for j in range(i)]
            kind = rnd.choice(["sleep", "await", "await", "gather", "wait", "shield", "coro"])
            if kind == "sleep":
                ops.append(("sleep", rnd.randint(0, 2)))
            elif kind == "await":
                ops.append(("await", rnd.choice(refs)))
            elif kind == "gather":
                picked = [rnd.choice(refs + [("coro", rnd.randint(0, 2))]) for _ in range(3)]
                ops.append(("gather", picked[: rnd.randint(1, 3)], rnd.random() < 0.5))
            elif kind == "wait":
                picked = [rnd.choice(refs) for _ in range(rnd.randint(1, 3))]
                when = rnd.choice(["FIRST_COMPLETED", "FIRST_EXCEPTION", "ALL_COMPLETED"])
                ops.append(("wait", picked, when))
            elif kind == "shield":
                ops.append(("shield", rnd.choice(refs + [("coro", 1)])))
            else:
                ops.append(("coro", rnd.randint(0, 3)))
        ending = rnd.choice(["return", "return", "raise"])
        catch = rnd.choice([None, None, "swallow", "uncancel"])
        programs.append((ops, ending, catch))
    driver = []
    for _turn in range(12):
        actions = []
        for _ in range(rnd.randint(0, 2)):
            what = rnd.choice(["result", "exception", "cancel_fut", "cancel_task", "nothing"])
            if what in ("result", "exception", "cancel_fut"):
                actions.append((what, rnd.randrange(n_futs)))
            elif what == "cancel_task":
                actions.append((what, rnd.randrange(n_tasks), rnd.choice([None, "msg"])))
        driver.append(actions)
    return n_futs, programs, driver


def _describe(x):
    if isinstance(x, BaseException):
        return (type(x).__name__, x.args)
    if isinstance(x, list):
        return [_describe(v) for v in x]
    return x


def _interpret(lp, scenario, make_task, fns):
    n_futs, programs, driver = scenario
    trace = []
    # Futures failed and never retrieved get logged when freed, at times that depend on
    # set iteration order (wait's) and on the cycle collector: not part of the comparison.
    lp.set_exception_handler(lambda _lp, _ctx: None)
    futs = [lp.create_future() for _ in range(n_futs)]
    tasks = []
    labels = {}
    for k, f in enumerate(futs):
        labels[id(f)] = f"fut{k}"

    async def small(n):
        await turns(n)
        return f"coro{n}"

    def resolve(ref):
        kind, k = ref
        if kind == "fut":
            return futs[k]
        if kind == "task":
            return tasks[k]
        return small(k)

    async def run_op(i, op):
        name = op[0]
        if name == "sleep":
            await turns(op[1])
            return "slept"
        if name == "await":
            return await resolve(op[1])
        if name == "coro":
            return await small(op[1])
        if name == "gather":
            return await fns.gather(*[resolve(r) for r in op[1]], return_exceptions=op[2])
        if name == "wait":
            fs = [resolve(r) for r in op[1]]
            done, pending = await fns.wait(fs, return_when=op[2])
            return sorted(labels[id(f)] for f in done), sorted(labels[id(f)] for f in pending)
        if name == "shield":
            return await fns.shield(resolve(op[1]))
        raise AssertionError(op)

    async def program(i):
        ops, ending, catch = programs[i]
        for step, op in enumerate(ops):
            try:
                r = await run_op(i, op)
                trace.append((i, step, "ok", _describe(r)))
            except asyncio.CancelledError as e:
                trace.append((i, step, "cancelled", e.args))
                if catch is None:
                    raise
                if catch == "uncancel":
                    trace.append((i, step, "uncancel", asyncio.current_task().uncancel()))
            except Exception as e:  # noqa: BLE001 - recorded, compared
                trace.append((i, step, "error", _describe(e)))
        if ending == "raise":
            raise ValueError(f"task{i}")
        return f"task{i}"

    for i in range(len(programs)):
        t = make_task(program(i))
        labels[id(t)] = f"task{i}"
        tasks.append(t)
    for turn, actions in enumerate(driver):
        for action in actions:
            what = action[0]
            if what == "cancel_task":
                t = tasks[action[1]]
                trace.append(("driver", turn, "cancel task", action[1], t.cancel(action[2])))
                continue
            f = futs[action[1]]
            if f.done():
                continue
            if what == "result":
                f.set_result(f"fut{action[1]}")
            elif what == "exception":
                f.set_exception(KeyError(f"fut{action[1]}"))
            else:
                f.cancel()
            trace.append(("driver", turn, what, action[1]))
        run_briefly(lp)
    for f in futs:  # settle what is left, then let everything finish
        if not f.done():
            f.set_result("late")
    for _ in range(30):
        run_briefly(lp)
        if all(t.done() for t in tasks):
            break
    for i, t in enumerate(tasks):
        if not t.done():
            trace.append(("stuck", i))
            t.cancel()
            run_briefly(lp, 5)
        if t.cancelled():
            trace.append(("end", i, "cancelled", t.cancelling()))
        elif t.exception() is not None:
            trace.append(("end", i, "error", _describe(t.exception()), t.cancelling()))
        else:
            trace.append(("end", i, "result", t.result(), t.cancelling()))
    return trace


@pytest.mark.parametrize("seeds", [range(40), range(40, 80)], ids=["seeds0-39", "seeds40-79"])
def test_random_scenarios_match_asyncio(tloop, F, seeds):
    for seed in seeds:
        scenario = _random_scenario(seed)
        got = _interpret(tloop, scenario, tloop.create_task, F)
        oracle = _interpret(tloop, scenario, lambda c: asyncio.Task(c, loop=tloop), ORACLE)
        assert got == oracle, f"seed {seed}: {scenario}"


def test_random_scenarios_with_both_kinds_of_task_mixed(loop, F):
    import itertools

    if SKIP_NATIVE:
        pytest.skip("FERROLOOP_SKIP_NATIVE=1")
    ferroloop_task = import_ferroloop().Task
    for seed in range(80, 110):
        scenario = _random_scenario(seed)
        count = itertools.count()

        def mixed(coro, count=count):
            return (ferroloop_task if next(count) % 2 else asyncio.Task)(coro, loop=loop)

        got = _interpret(loop, scenario, mixed, F)
        oracle = _interpret(loop, scenario, lambda c: asyncio.Task(c, loop=loop), ORACLE)
        assert got == oracle, f"seed {seed}: {scenario}"


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are 3.12+")
def test_random_scenarios_with_eager_tasks(loop, task_kind, F):
    for seed in range(110, 140):
        scenario = _random_scenario(seed)
        loop.set_task_factory(_eager_factory(task_kind))
        got = _interpret(loop, scenario, loop.create_task, F)
        loop.set_task_factory(asyncio.eager_task_factory)
        oracle = _interpret(loop, scenario, loop.create_task, ORACLE)
        loop.set_task_factory(None)
        assert got == oracle, f"seed {seed}: {scenario}"


def test_everything_is_freed_by_refcount(tloop, F):
    """Tasks that awaited futures/tasks, were cancelled or failed, and the futures of
    gather/wait/shield: all freed without the cycle collector (no reference cycles)."""
    import gc
    import weakref

    refs = {}

    async def failing():
        await asyncio.sleep(0)
        raise ValueError("x")

    async def main():
        f = tloop.create_future()
        t = tloop.create_task(wait_on(f))
        refs["awaited a future"] = weakref.ref(t)
        await asyncio.sleep(0)
        f.set_result(1)
        await t
        f = tloop.create_future()
        t = tloop.create_task(wait_on(f))
        refs["cancelled while awaiting"] = weakref.ref(t)
        await asyncio.sleep(0)
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)
        inner = tloop.create_task(value(1))
        t = tloop.create_task(wait_on(inner))
        refs["awaited"], refs["awaiting a task"] = weakref.ref(inner), weakref.ref(t)
        await t
        t = tloop.create_task(failing())
        refs["failed"] = weakref.ref(t)
        await asyncio.gather(t, return_exceptions=True)
        g = F.gather(value(1), failing(), return_exceptions=True)
        refs["gather outer"] = weakref.ref(g)
        await g
        a = tloop.create_task(value(2))
        refs["waited on"] = weakref.ref(a)
        await F.wait([a])
        s = F.shield(value(3))
        refs["shield outer"] = weakref.ref(s)
        await s
        x = tloop.create_task(value(4))
        s2 = F.shield(x)
        refs["shielded"], refs["cancelled shield"] = weakref.ref(x), weakref.ref(s2)
        s2.cancel()
        await asyncio.gather(s2, return_exceptions=True)
        await x
        del f, t, inner, g, a, s, x, s2

    gc.collect()
    gc.disable()
    try:
        m = tloop.create_task(main())
        tloop.run_until_complete(m)
        refs["main"] = weakref.ref(m)
        del m
        run_briefly(tloop, 3)
        assert sorted(k for k, r in refs.items() if r() is not None) == []
    finally:
        gc.enable()


# -- outside a running loop -----------------------------------------------------------------


def _outside_a_loop(fns, which):
    """Call gather/shield with no running loop and no current loop: (result type,
    warnings as (category, message, file name)) -- the file is where the warning points."""
    import warnings

    asyncio.set_event_loop_policy(None)
    coro = value(1)
    calls = {
        "gather(coro)": lambda: fns.gather(coro),
        "gather()": lambda: fns.gather(),
        "shield(coro)": lambda: fns.shield(coro),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = calls[which]()
    lp = result.get_loop()
    try:
        leftovers = asyncio.all_tasks(lp)
        for t in leftovers:
            t.cancel()
        if leftovers:
            lp.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
        if not result.done():
            result.cancel()
    finally:
        coro.close()
        lp.close()
        asyncio.set_event_loop(None)
    return type(result).__name__, [
        (w.category.__name__, str(w.message), os.path.basename(w.filename)) for w in caught
    ]


@pytest.mark.parametrize("which", ["gather(coro)", "gather()", "shield(coro)"])
def test_no_current_loop_warnings_point_at_the_caller(request, asyncio_state, fn_kind, F, which):
    got = _outside_a_loop(F, which)
    assert got == _outside_a_loop(ORACLE, which)
    assert all(w[2] == os.path.basename(__file__) for w in got[1]), got


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exception_in_a_gathered_child(tloop, F, exc_type):
    def scenario(fns):
        events = []

        async def child():
            await asyncio.sleep(0)
            raise exc_type("child")

        async def main():
            g = fns.gather(child(), value("other", 3), return_exceptions=True)
            try:
                events.append(("gathered", [type(r).__name__ for r in await g]))
            except BaseException as e:
                events.append(("gather raised", type(e).__name__))
                raise
            return g

        m = tloop.create_task(main())
        try:
            tloop.run_until_complete(m)
        except exc_type:
            events.append("propagated out of run_until_complete")
        run_briefly(tloop, 6)
        events.append(("main", m.done(), m.cancelled()))
        if not m.done():
            m.cancel()
            run_briefly(tloop, 3)
        return events

    got = scenario(F)
    assert "propagated out of run_until_complete" in got
    assert got == scenario(ORACLE)


# -- a third-party loop ---------------------------------------------------------------------


@pytest.mark.parametrize("task_kind_", KINDS)
def test_random_scenarios_on_uvloop(task_kind_, F):
    """Any loop: uvloop's (a loop ferroloop knows nothing about), where installed."""
    uvloop = pytest.importorskip("uvloop")
    lp = uvloop.new_event_loop()
    try:
        if task_kind_ == "ferroloop":
            lp.set_task_factory(import_ferroloop().task_factory)
        elif hasattr(lp, "native_tasks"):
            lp.native_tasks = False
        for seed in range(140, 170):
            scenario = _random_scenario(seed)
            got = _interpret(lp, scenario, lp.create_task, F)
            oracle = _interpret(lp, scenario, lambda c: asyncio.Task(c, loop=lp), ORACLE)
            assert got == oracle, f"seed {seed}: {scenario}"
    finally:
        lp.close()


def test_functions_with_duck_typed_futures(tloop, F):
    from test_native_task import DuckFuture

    def scenario(fns):
        async def main():
            a, b = DuckFuture(tloop), DuckFuture(tloop)
            tloop.call_soon(a.set_result, "a")
            done, pending = await fns.wait([a, b], return_when=asyncio.FIRST_COMPLETED)
            tloop.call_soon(b.set_result, "b")
            g = await fns.gather(a, b)
            c = DuckFuture(tloop)
            s = fns.shield(c)
            s.cancel()
            err = await aerror_of(s)
            c.set_result("c")
            return (done == {a}, pending == {b}, g, err[0], c.cancel_calls, b.cancel_calls)

        return run(tloop, main())

    got = scenario(F)
    assert got == scenario(ORACLE)
    assert got[:3] == (True, True, ["a", "b"])
