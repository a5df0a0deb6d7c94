"""Handle / TimerHandle: cancel, when, repr, contexts."""

import contextvars
import gc
import sys
import weakref

import pytest
from parity_helpers import run_briefly, run_for

var = contextvars.ContextVar("var", default="default")


def named_callback(*args):
    pass


class Payload:
    pass


def test_cancelled_handle_does_not_run(loop):
    out = []
    handle = loop.call_soon(out.append, 1)
    assert not handle.cancelled()
    handle.cancel()
    assert handle.cancelled()
    run_briefly(loop)
    assert out == []


def test_cancel_is_idempotent(loop):
    handle = loop.call_soon(named_callback)
    handle.cancel()
    handle.cancel()
    assert handle.cancelled()
    timer = loop.call_later(10, named_callback)
    timer.cancel()
    timer.cancel()
    assert timer.cancelled()


def test_cancelled_timer_does_not_fire(loop):
    out = []
    timer = loop.call_later(0.005, out.append, "cancelled")
    loop.call_later(0.005, out.append, "kept")
    timer.cancel()
    assert timer.cancelled()
    run_for(loop, 0.02)
    assert out == ["kept"]


def test_cancel_from_an_earlier_callback_in_the_same_turn(loop):
    out = []
    later = []
    loop.call_soon(lambda: later[0].cancel())
    later.append(loop.call_soon(out.append, "should not run"))
    run_briefly(loop)
    assert out == []
    assert later[0].cancelled()


def test_cancel_after_run_is_harmless(loop):
    out = []
    handle = loop.call_soon(out.append, 1)
    run_briefly(loop)
    handle.cancel()
    assert out == [1]
    assert handle.cancelled()


def test_timer_when_is_the_deadline(loop):
    deadline = loop.time() + 100
    timer = loop.call_at(deadline, named_callback)
    assert timer.when() == deadline
    before = loop.time()
    timer2 = loop.call_later(50, named_callback)
    after = loop.time()
    assert before + 50 <= timer2.when() <= after + 50
    timer.cancel()
    timer2.cancel()


def test_repr_names_the_callback(loop):
    handle = loop.call_soon(named_callback)
    timer = loop.call_later(10, named_callback)
    assert "named_callback" in repr(handle)
    assert "named_callback" in repr(timer)
    assert "when=" in repr(timer)
    handle.cancel()
    timer.cancel()


def test_repr_says_cancelled_after_cancel(loop):
    handle = loop.call_soon(named_callback)
    timer = loop.call_later(10, named_callback)
    handle.cancel()
    timer.cancel()
    assert "cancelled" in repr(handle)
    assert "cancelled" in repr(timer)


def test_repr_class_names_match_asyncio(loop):
    handle = loop.call_soon(named_callback)
    timer = loop.call_later(10, named_callback)
    assert repr(handle).startswith("<Handle")
    assert repr(timer).startswith("<TimerHandle")
    handle.cancel()
    timer.cancel()


@pytest.mark.parametrize("kind", ["soon", "later"])
def test_cancel_releases_callback_and_args(loop, kind):
    # asyncio drops the callback and args on cancel, so cancelled timers hold no memory.
    payload = Payload()
    ref = weakref.ref(payload)
    if kind == "soon":
        handle = loop.call_soon(named_callback, payload)
    else:
        handle = loop.call_later(3600, named_callback, payload)
    del payload
    handle.cancel()
    gc.collect()
    assert ref() is None


def test_handle_releases_args_after_running(loop):
    payload = Payload()
    ref = weakref.ref(payload)
    loop.call_soon(named_callback, payload)
    del payload
    run_briefly(loop)
    gc.collect()
    assert ref() is None


@pytest.mark.skipif(sys.version_info < (3, 12), reason="Handle.get_context is 3.12+")
def test_get_context_returns_the_explicit_context(loop):
    ctx = contextvars.copy_context()
    handle = loop.call_soon(named_callback, context=ctx)
    timer = loop.call_later(10, named_callback, context=ctx)
    assert handle.get_context() is ctx
    assert timer.get_context() is ctx
    handle.cancel()
    timer.cancel()


@pytest.mark.skipif(sys.version_info < (3, 12), reason="Handle.get_context is 3.12+")
def test_get_context_defaults_to_a_copy_of_the_current_context(loop):
    token = var.set("at-schedule")
    try:
        handle = loop.call_soon(named_callback)
    finally:
        var.reset(token)
    ctx = handle.get_context()
    assert isinstance(ctx, contextvars.Context)
    assert ctx[var] == "at-schedule"
    handle.cancel()


def test_explicit_context_is_honoured(loop):
    ctx = contextvars.copy_context()
    ctx.run(var.set, "explicit")
    seen = []
    loop.call_soon(lambda: seen.append(("soon", var.get())), context=ctx)
    loop.call_later(0, lambda: seen.append(("later", var.get())), context=ctx)
    loop.call_at(loop.time(), lambda: seen.append(("at", var.get())), context=ctx)
    loop.call_soon_threadsafe(lambda: seen.append(("threadsafe", var.get())), context=ctx)
    run_for(loop, 0.01)
    assert sorted(seen) == [
        ("at", "explicit"),
        ("later", "explicit"),
        ("soon", "explicit"),
        ("threadsafe", "explicit"),
    ]


def test_context_is_captured_when_scheduling(loop):
    seen = []
    token = var.set("when-scheduled")
    try:
        loop.call_soon(lambda: seen.append(var.get()))
        loop.call_later(0, lambda: seen.append(var.get()))
    finally:
        var.reset(token)
    token = var.set("changed-after")
    try:
        run_for(loop, 0.01)
    finally:
        var.reset(token)
    assert seen == ["when-scheduled", "when-scheduled"]


def test_context_changes_in_a_callback_do_not_leak(loop):
    seen = []

    def setter():
        var.set("set-in-callback")
        seen.append(("setter", var.get()))

    def reader():
        seen.append(("reader", var.get()))

    loop.call_soon(setter)
    loop.call_soon(reader)
    run_briefly(loop)
    assert seen == [("setter", "set-in-callback"), ("reader", "default")]
    assert var.get() == "default"


def test_callbacks_sharing_an_explicit_context_see_each_others_changes(loop):
    ctx = contextvars.copy_context()
    seen = []

    def setter():
        var.set("shared")

    loop.call_soon(setter, context=ctx)
    loop.call_soon(lambda: seen.append(var.get()), context=ctx)
    run_briefly(loop)
    assert seen == ["shared"]
    assert ctx[var] == "shared"
    assert var.get() == "default"


def test_context_is_exited_after_a_raising_callback(loop):
    seen = []
    loop.set_exception_handler(lambda lp, c: None)

    def boom():
        var.set("leaked?")
        raise ValueError("boom")

    loop.call_soon(boom)
    loop.call_soon(lambda: seen.append(var.get()))
    run_briefly(loop)
    assert seen == ["default"]
    assert var.get() == "default"
