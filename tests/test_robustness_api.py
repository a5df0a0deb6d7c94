"""The scheduling and task API called the ways Python allows: keywords, odd numbers."""

import asyncio
import decimal
import fractions
import types

import pytest
from parity_helpers import new_loop, run_briefly


def noop(*args):
    pass


# call_soon / call_later / call_at bind their named parameters as Python functions do.


def test_call_soon_takes_callback_by_keyword(loop):
    ran = []
    handle = loop.call_soon(callback=lambda: ran.append("soon"), context=None)
    assert not handle.cancelled()
    loop.call_soon_threadsafe(callback=lambda: ran.append("threadsafe"))
    run_briefly(loop)
    assert ran == ["soon", "threadsafe"]


def test_call_later_and_call_at_take_every_named_parameter_by_keyword(loop):
    ran = []
    loop.call_later(delay=0, callback=ran.append)  # append() with no argument: reported
    loop.call_later(0, callback=lambda: ran.append("later"))
    loop.call_at(when=loop.time(), callback=lambda: ran.append("at"))
    loop.call_at(loop.time(), callback=lambda: ran.append("at2"))
    errors = []
    loop.set_exception_handler(lambda lp, context: errors.append(type(context["exception"])))
    loop.call_later(0.01, loop.stop)
    loop.run_forever()
    assert sorted(ran) == ["at", "at2", "later"]
    assert errors == [TypeError]


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda lp: lp.call_soon(noop, callback=noop), "multiple values for argument 'callback'"),
        (lambda lp: lp.call_later(0, delay=0, callback=noop), "multiple values for argument"),
        (lambda lp: lp.call_at(0, noop, when=0), "multiple values for argument 'when'"),
        (
            lambda lp: lp.call_later(callback=noop),
            "missing 1 required positional argument: 'delay'",
        ),
        (lambda lp: lp.call_at(callback=noop), "missing 1 required positional argument: 'when'"),
        (lambda lp: lp.call_later(delay=1), "missing 1 required positional argument: 'callback'"),
        (
            lambda lp: lp.call_at(),
            "missing 2 required positional arguments: 'when' and 'callback'",
        ),
        (lambda lp: lp.call_soon(), "missing 1 required positional argument: 'callback'"),
        (lambda lp: lp.call_soon(noop, bogus=1), "unexpected keyword argument 'bogus'"),
        (lambda lp: lp.call_later(0, noop, when=1), "unexpected keyword argument 'when'"),
        (lambda lp: lp.call_at(0, noop, delay=1), "unexpected keyword argument 'delay'"),
    ],
)
def test_bad_bindings_are_pythons_type_errors(loop, call, message):
    with pytest.raises(TypeError, match=message):
        call(loop)
    run_briefly(loop)


# call_later computes asyncio's `self.time() + delay`.


class IntWithBadFloat(int):
    def __float__(self):
        raise ValueError("__float__ is not used for an int")


class OnlyFloat:
    def __float__(self):
        return 0.0


@pytest.mark.parametrize("delay", [fractions.Fraction(1, 100), IntWithBadFloat(0), False, 0.0, 0])
def test_call_later_adds_any_number_python_adds_to_a_float(loop, delay):
    ran = []
    handle = loop.call_later(delay, ran.append, "ran")
    assert isinstance(handle.when(), float)
    loop.call_later(0.05, loop.stop)
    loop.run_forever()
    assert ran == ["ran"]


@pytest.mark.parametrize("delay", [decimal.Decimal("0.01"), OnlyFloat(), "1"])
def test_call_later_refuses_what_python_cannot_add_to_a_float(loop, delay):
    with pytest.raises(TypeError):
        loop.call_later(delay, noop)
    run_briefly(loop)


def test_call_later_with_an_int_too_large_for_a_float_is_an_overflow_error(loop):
    with pytest.raises(OverflowError):
        loop.call_later(10**400, noop)


# Task results, as asyncio's C Task reports them.


def test_result_of_a_pending_task_is_the_c_tasks_error(loop):
    async def wait():
        await asyncio.sleep(0)

    task = loop.create_task(wait())
    with pytest.raises(asyncio.InvalidStateError, match=r"^Result is not set\.$"):
        task.result()
    with pytest.raises(asyncio.InvalidStateError, match=r"^Exception is not set\.$"):
        task.exception()
    loop.run_until_complete(task)


def test_a_bare_yield_of_the_task_itself_is_cannot_await_on_itself(loop):
    @types.coroutine
    def bare_yield(value):
        return (yield value)

    async def yields_itself():
        return await bare_yield(asyncio.current_task())

    task = loop.create_task(yields_itself())
    with pytest.raises(RuntimeError, match="^Task cannot await on itself: "):
        loop.run_until_complete(task)


def test_a_bare_yield_of_another_future_is_yield_instead_of_yield_from(loop):
    @types.coroutine
    def bare_yield(value):
        return (yield value)

    async def yields_a_future():
        return await bare_yield(loop.create_future())

    with pytest.raises(RuntimeError, match="^yield was used instead of yield from in task "):
        loop.run_until_complete(yields_a_future())


# A replaced loop.time() (virtual clocks in test tools patch it, mock.patch.object(loop,
# "time") in test suites): asyncio schedules every timer by self.time(), and so does
# ferroloop's native core once the clock is replaced (src/event_loop.rs, `clock`).


def test_timers_follow_a_patched_loop_time(loop):
    ran = []
    real_time = loop.time
    offset = [0.0]
    loop.time = lambda: real_time() + offset[0]
    loop.call_later(100, ran.append, "due on the patched clock")
    offset[0] = 1000.0
    loop.call_later(0.05, loop.stop)
    loop.run_forever()
    assert ran == ["due on the patched clock"]


def test_call_later_counts_from_a_patched_loop_time(loop):
    real_time = loop.time
    loop.time = lambda: real_time() + 500.0
    handle = loop.call_later(1, noop)
    assert round(handle.when() - real_time()) == 501
    handle.cancel()


def test_call_later_goes_through_a_subclass_call_at(loop):
    """asyncio's call_later calls self.call_at: a subclass's override sees its timers."""
    scheduled = []

    class Recording(type(loop)):
        def call_at(self, when, callback, *args, context=None):
            scheduled.append(callback)
            return super().call_at(when, callback, *args, context=context)

    sub = Recording()
    try:
        ran = []
        handle = sub.call_later(0, ran.append, "ran")
        assert scheduled == [ran.append]
        assert handle.when() <= sub.time()
        sub.call_later(0.01, sub.stop)
        sub.run_forever()
        assert ran == ["ran"]
        with pytest.raises(TypeError, match="delay must not be None"):
            sub.call_later(None, noop)
    finally:
        sub.close()


def test_a_subclass_clock_drives_the_timers(loop_kind):
    probe = new_loop(loop_kind)
    base = type(probe)
    probe.close()
    offset = [0.0]

    class ShiftedClock(base):
        def time(self):
            return super().time() + offset[0]

    lp = ShiftedClock()
    try:
        ran = []
        handle = lp.call_later(100, ran.append, "due on the subclass clock")
        assert round(handle.when() - base.time(lp)) == 100
        offset[0] = 1000.0
        lp.call_later(0.05, lp.stop)
        lp.run_forever()
        assert ran == ["due on the subclass clock"]
    finally:
        lp.close()


def test_patching_loop_time_with_mock_and_restoring_it(loop):
    from unittest import mock

    real = loop.time()
    with mock.patch.object(loop, "time", return_value=real + 3600.0):
        assert loop.time() == real + 3600.0
        handle = loop.call_later(1, noop)
        assert handle.when() == real + 3601.0
        handle.cancel()
    # mock.patch.object deletes what it set: the loop's own clock is back.
    assert abs(loop.time() - real) < 60
    assert abs(loop.call_later(1, noop).when() - (loop.time() + 1)) < 60


def test_deleting_a_patched_time_restores_the_clock(loop):
    loop.time = lambda: 5.0
    assert loop.call_later(1, noop).when() == 6.0
    del loop.time
    assert loop.time() > 0 and loop.time() != 5.0
    assert loop.time.__self__ is loop


def test_asyncio_timeout_reads_the_patched_clock(loop):
    # asyncio.wait_for / timeout compute deadlines with loop.time(): with the clock jumped
    # forward, a long timeout expires at the next turn on both loops.
    real_time = loop.time
    offset = [0.0]
    loop.time = lambda: real_time() + offset[0]

    async def main():
        async def jump():
            await asyncio.sleep(0)
            offset[0] = 10_000.0

        loop.create_task(jump())
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.sleep(5000), 3000)

    loop.run_until_complete(main())


def test_a_clock_that_raises_reaches_the_caller(loop):
    def broken():
        raise ZeroDivisionError("clock")

    loop.time = broken
    with pytest.raises(ZeroDivisionError):
        loop.call_later(1, noop)
    del loop.time
