"""Handles' memory: many pending handles, weak references, reuse of freed handles, and (on
ferroloop) handles that do not drive the cycle collector."""

import contextvars
import gc
import weakref

import pytest
from parity_helpers import SKIP_NATIVE, import_ferroloop, run_briefly


def test_many_pending_handles_run_and_are_freed(loop):
    ran = []
    handles = [loop.call_soon(ran.append, i) for i in range(5000)]
    timers = [loop.call_later(3600, ran.append, -i) for i in range(5000)]
    refs = [weakref.ref(h) for h in handles[::97] + timers[::97]]
    for t in timers[::2]:
        t.cancel()
    del handles
    run_briefly(loop)
    assert ran == list(range(5000))
    for t in timers:
        t.cancel()
    del timers
    run_briefly(loop)
    gc.collect()
    assert all(r() is None for r in refs)


def test_freed_handles_are_reused_without_leaking_state(loop):
    ctx = contextvars.copy_context()
    for round_ in range(3):
        got = []
        handles = [loop.call_soon(got.append, (round_, i)) for i in range(3000)]
        timers = [loop.call_later(0, got.append, ("t", round_, i), context=ctx) for i in range(50)]
        handles[7].cancel()
        del handles
        run_briefly(loop)
        run_briefly(loop)
        assert len(got) == 2999 + 50
        assert (round_, 7) not in got
        for t in timers:
            assert not t.cancelled()
            assert t.when() > 0


@pytest.mark.skipif(SKIP_NATIVE, reason="ferroloop only")
def test_pending_handles_trigger_no_young_collection():
    # Handles are never tracked by the cycle collector (README, "Differences"), and they do
    # not count towards its allocation threshold either: scheduling many callbacks with an
    # explicit context (no context copy) allocates nothing the collector counts.
    loop = import_ferroloop().new_event_loop()
    ctx = contextvars.copy_context()
    collections = []

    def on_gc(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    def noop():
        pass

    try:
        gc.collect()
        gc.callbacks.append(on_gc)
        try:
            handles = [loop.call_soon(noop, context=ctx) for _ in range(20_000)]
            timers = [loop.call_later(3600, noop, context=ctx) for _ in range(20_000)]
        finally:
            gc.callbacks.remove(on_gc)
        # The list objects themselves are not GC-counted per element; 40,000 handles with
        # CPython's default accounting would have started dozens of collections.
        assert len(collections) <= 1, collections
        assert not gc.is_tracked(handles[0]) and not gc.is_tracked(timers[0])
        for t in timers:
            t.cancel()
        run_briefly(loop)
    finally:
        loop.close()


owner_var = contextvars.ContextVar("owner_var")


@pytest.mark.parametrize("method", ["call_soon", "call_soon_threadsafe", "call_later"])
def test_unclosed_loop_held_through_a_callbacks_context_is_collected(loop_kind, method):
    # owner -> loop -> queued handle -> its copy of the context -> owner_var -> owner: the
    # cycle goes through the context a handle copied, not through its callback. asyncio's
    # loop is freed by the collector (with its "unclosed event loop" warning); so is
    # ferroloop's, though the copy is kept off the collector's lists while queued.
    import warnings

    from parity_helpers import new_loop

    class Owner:
        pass

    def noop():
        pass

    gc.collect()
    lp = new_loop(loop_kind)
    owner = Owner()
    owner.loop = lp
    token = owner_var.set(owner)
    try:
        if method == "call_later":
            lp.call_later(3600, noop)
        else:
            getattr(lp, method)(noop)
    finally:
        owner_var.reset(token)
    ref = weakref.ref(lp)
    del lp, owner
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        gc.collect()
    unclosed = [w for w in seen if "unclosed event loop" in str(w.message)]
    assert ref() is None
    assert len(unclosed) == 1
