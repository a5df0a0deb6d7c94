"""call_soon_threadsafe from worker threads, and the context a scheduled callback gets:
the snapshot of the caller's contextvars, its own copy per callback, turns, stop and close."""

import asyncio
import contextvars
import gc
import threading
import weakref

from parity_helpers import WATCHDOG, run_briefly

var = contextvars.ContextVar("threadsafe_var", default="default")


def _run_until(loop, event_or_fut):
    watchdog = loop.call_later(WATCHDOG, loop.stop)
    try:
        return loop.run_until_complete(event_or_fut)
    finally:
        watchdog.cancel()


def test_callback_sees_the_posting_threads_context_at_post_time(loop):
    seen = []
    done = loop.create_future()

    def worker():
        var.set("before-post")
        loop.call_soon_threadsafe(lambda: seen.append(var.get()))
        var.set("after-post")  # the callback keeps the snapshot taken when it was posted
        loop.call_soon_threadsafe(lambda: seen.append(var.get()))
        loop.call_soon_threadsafe(done.set_result, None)

    thread = threading.Thread(target=worker)
    loop.call_soon(thread.start)
    try:
        _run_until(loop, done)
    finally:
        thread.join()
    assert seen == ["before-post", "after-post"]
    assert var.get() == "default"  # the loop thread's own context is untouched


def test_each_callback_runs_in_its_own_copy_of_the_context(loop):
    seen = []

    def setter(tag):
        seen.append((tag, var.get()))
        var.set(tag)  # changes this callback's copy only

    var.set("caller")
    try:
        loop.call_soon(setter, "soon-1")
        loop.call_soon(setter, "soon-2")
        loop.call_soon_threadsafe(setter, "threadsafe")
        loop.call_later(0, setter, "later")
        run_briefly(loop)
        run_briefly(loop)
    finally:
        var.set("default")
    assert sorted(seen) == [
        ("later", "caller"),
        ("soon-1", "caller"),
        ("soon-2", "caller"),
        ("threadsafe", "caller"),
    ]


def test_a_pending_handles_context_is_a_snapshot_visible_to_the_collector(loop):
    var.set("snapshot")
    try:
        handles = [
            loop.call_soon(lambda: None),
            loop.call_soon_threadsafe(lambda: None),
            loop.call_later(3600, lambda: None),
        ]
    finally:
        var.set("default")
    for handle in handles:
        ctx = handle._context
        assert isinstance(ctx, contextvars.Context)
        assert ctx[var] == "snapshot"
        assert gc.is_tracked(ctx)
        handle.cancel()


def test_a_cycle_through_a_handed_out_context_is_collected(loop):
    class Holder:
        pass

    handle = loop.call_soon(lambda: None)
    ctx = handle._context
    holder = Holder()
    holder.ctx = ctx
    ctx.run(var.set, holder)  # ctx -> holder -> ctx
    ref = weakref.ref(ctx)
    handle.cancel()
    run_briefly(loop)
    del ctx, holder, handle
    gc.collect()
    assert ref() is None


def test_posts_from_a_thread_during_a_turn_run_in_the_next_turn(loop):
    out = []

    def first():
        out.append("first")
        loop.call_soon(out.append, "soon-from-first")
        poster = threading.Thread(target=loop.call_soon_threadsafe, args=(out.append, "posted"))
        poster.start()
        poster.join()

    loop.call_soon(first)
    loop.call_soon(out.append, "second")
    loop.call_soon(loop.stop)  # stop after this turn: what first queued must not run yet
    loop.run_forever()
    assert out == ["first", "second"]
    run_briefly(loop)
    assert out == ["first", "second", "soon-from-first", "posted"]


def test_many_threads_posting_while_the_loop_stops_and_closes(loop):
    n_threads = 4
    ran = [0]
    refused = []
    started = threading.Barrier(n_threads + 1)
    stop_posting = threading.Event()

    def tick():
        ran[0] += 1

    def worker():
        started.wait(WATCHDOG)
        try:
            while not stop_posting.is_set():
                loop.call_soon_threadsafe(tick)
        except RuntimeError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=worker) for _ in range(n_threads)]
    for t in threads:
        t.start()

    async def main():
        started.wait(WATCHDOG)
        while ran[0] < 1000:
            await asyncio.sleep(0)

    try:
        _run_until(loop, main())
        loop.close()  # the workers are still posting: they must be refused, not crash
        for t in threads:
            t.join(WATCHDOG)
        assert not any(t.is_alive() for t in threads)
        assert len(refused) == n_threads
        assert all("closed" in msg for msg in refused)
    finally:
        stop_posting.set()
        for t in threads:
            t.join(WATCHDOG)


def test_a_post_to_a_stopped_loop_runs_on_the_next_run(loop):
    got = []
    thread = threading.Thread(target=loop.call_soon_threadsafe, args=(got.append, "posted"))
    thread.start()
    thread.join()
    assert got == []
    run_briefly(loop)
    assert got == ["posted"]


def test_context_keyword_as_a_runtime_built_string(loop):
    # The keyword's name need not be the interned "context" object.
    ctx = contextvars.copy_context()
    ctx.run(var.set, "explicit")
    name = "con" + str(len("text")).replace("4", "text")  # built at run time: not interned
    assert name == "context"
    seen = []
    loop.call_soon(lambda: seen.append(("soon", var.get())), **{name: ctx})
    loop.call_soon_threadsafe(lambda: seen.append(("threadsafe", var.get())), **{name: ctx})
    loop.call_later(0, lambda: seen.append(("later", var.get())), **{name: ctx})
    run_briefly(loop)
    run_briefly(loop)
    assert sorted(seen) == [("later", "explicit"), ("soon", "explicit"), ("threadsafe", "explicit")]


def test_callback_arguments_are_passed_through(loop):
    got = []
    loop.call_soon(lambda: got.append(()))
    loop.call_soon(lambda *a: got.append(a), 1)
    loop.call_soon_threadsafe(lambda *a: got.append(a), 1, "two", None)
    loop.call_later(0, lambda *a: got.append(a), "t")
    run_briefly(loop)
    run_briefly(loop)
    assert sorted(got, key=repr) == sorted([(), (1,), (1, "two", None), ("t",)], key=repr)
