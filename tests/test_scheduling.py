"""call_soon / call_later / call_at / call_soon_threadsafe: order, turns and the clock."""

import asyncio
import threading
import time

from parity_helpers import WATCHDOG, run_briefly


def test_call_soon_runs_in_fifo_order(loop):
    out = []
    for i in range(20):
        loop.call_soon(out.append, i)
    run_briefly(loop)
    assert out == list(range(20))


def test_call_soon_passes_positional_args(loop):
    out = []
    loop.call_soon(lambda *a: out.append(a), 1, "two", None)
    run_briefly(loop)
    assert out == [(1, "two", None)]


def test_callbacks_scheduled_during_a_turn_run_in_the_next_turn(loop):
    out = []

    def first():
        out.append("first")
        loop.call_soon(out.append, "scheduled-by-first")

    loop.call_soon(first)
    loop.call_soon(out.append, "second")
    loop.call_soon(loop.stop)  # stop after this turn: the new callback must not run yet
    loop.run_forever()
    assert out == ["first", "second"]
    run_briefly(loop)
    assert out == ["first", "second", "scheduled-by-first"]


def test_self_rescheduling_callback_does_not_starve_others(loop):
    count = 0

    def spin():
        nonlocal count
        count += 1
        loop.call_soon(spin)

    loop.call_soon(spin)
    loop.call_later(0.01, loop.stop)
    loop.call_later(WATCHDOG, loop.stop)
    loop.run_forever()
    assert count > 1


def test_call_later_fires_in_deadline_order(loop):
    out = []
    loop.call_later(0.03, out.append, "c")
    loop.call_later(0.01, out.append, "a")
    loop.call_later(0.02, out.append, "b")
    loop.call_later(0, out.append, "zero")
    loop.call_later(0.04, loop.stop)
    loop.run_forever()
    assert out == ["zero", "a", "b", "c"]


def test_call_at_fires_in_deadline_order(loop):
    out = []
    now = loop.time()
    for delay in (0.02, 0.0, 0.01, 0.03):
        loop.call_at(now + delay, out.append, delay)
    loop.call_at(now + 0.04, loop.stop)
    loop.run_forever()
    assert out == [0.0, 0.01, 0.02, 0.03]


def test_call_later_same_delay_fires_in_scheduling_order(loop):
    # Each call_later reads the clock, so successive calls get increasing deadlines.
    out = []
    for i in range(20):
        loop.call_later(0.005, out.append, i)
    loop.call_later(0.02, loop.stop)
    loop.run_forever()
    assert out == list(range(20))


def test_timers_with_the_same_deadline_all_fire_in_one_turn(loop):
    # asyncio documents the order of timers with exactly the same deadline as undefined,
    # so only the set is compared; they all fire before a later timer.
    out = []
    when = loop.time() + 0.01
    for i in range(20):
        loop.call_at(when, out.append, i)
    loop.call_at(when + 0.005, out.append, "later")
    loop.call_at(when + 0.01, loop.stop)
    loop.run_forever()
    assert sorted(out[:-1]) == list(range(20))
    assert out[-1] == "later"


def test_timer_due_now_runs_after_ready_callbacks(loop):
    out = []
    loop.call_later(0, out.append, "timer")
    loop.call_soon(out.append, "soon")
    loop.call_later(0.01, loop.stop)
    loop.run_forever()
    assert out == ["soon", "timer"]


def test_negative_delay_and_past_deadline_fire(loop):
    out = []
    loop.call_later(-1, out.append, "negative")
    loop.call_at(loop.time() - 10, out.append, "past")
    loop.call_later(0.01, loop.stop)
    loop.run_forever()
    assert sorted(out) == ["negative", "past"]


def test_call_later_zero_returns_a_timer_handle_with_when(loop):
    before = loop.time()
    handle = loop.call_later(0, lambda: None)
    after = loop.time()
    assert callable(handle.when)
    assert before <= handle.when() <= after
    assert hasattr(handle, "cancel") and hasattr(handle, "cancelled")
    handle.cancel()


def test_handles_are_instances_of_the_loops_handle_classes(loop, loop_kind):
    # Documented difference (README, "Differences from asyncio"): ferroloop's handles are
    # native classes, so they are ferroloop.Handle/TimerHandle, not asyncio's Python ones.
    # What code relies on, the public API, is the same on both.
    timer = loop.call_later(0, lambda: None)
    handle = loop.call_soon(lambda: None)
    if loop_kind == "asyncio":
        handle_cls, timer_cls = asyncio.Handle, asyncio.TimerHandle
    else:
        import ferroloop

        handle_cls, timer_cls = ferroloop.Handle, ferroloop.TimerHandle
    assert isinstance(timer, timer_cls)
    assert isinstance(timer, handle_cls)
    assert isinstance(handle, handle_cls)
    assert not isinstance(handle, timer_cls)
    for name in ("cancel", "cancelled", "when"):
        assert callable(getattr(timer, name))
    for name in ("cancel", "cancelled"):
        assert callable(getattr(handle, name))
    timer.cancel()
    handle.cancel()


def test_timers_never_fire_early(loop):
    late = []

    def check(handle_box):
        handle = handle_box[0]
        late.append(loop.time() - handle.when())

    for delay in (0, 0.0005, 0.001, 0.002, 0.005, 0.01):
        box = []
        box.append(loop.call_later(delay, check, box))
    loop.call_later(0.03, loop.stop)
    loop.run_forever()
    assert len(late) == 6
    assert all(d >= 0 for d in late), late


def test_loop_time_uses_the_monotonic_clock_base(loop):
    # A clock-base check, not a timing assertion: loop.time() is time.monotonic().
    assert abs(loop.time() - time.monotonic()) < 1.0


def test_loop_time_does_not_go_backwards(loop):
    samples = [loop.time() for _ in range(1000)]
    assert samples == sorted(samples)


def test_call_soon_threadsafe_wakes_a_sleeping_loop(loop):
    running = threading.Event()
    fut = loop.create_future()

    def worker():
        running.wait(WATCHDOG)
        time.sleep(0.02)  # let the loop go to sleep in its poller (nothing else is due)
        loop.call_soon_threadsafe(fut.set_result, "woken")

    loop.call_soon(running.set)
    watchdog = loop.call_later(WATCHDOG, loop.stop)
    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert loop.run_until_complete(fut) == "woken"
    finally:
        thread.join()
        watchdog.cancel()


def test_call_soon_threadsafe_from_many_threads(loop):
    n_threads, per_thread = 4, 50
    got = []
    done = loop.create_future()

    def record(i):
        got.append(i)
        if len(got) == n_threads * per_thread and not done.done():
            done.set_result(None)

    def worker(base):
        for i in range(per_thread):
            loop.call_soon_threadsafe(record, base + i)

    watchdog = loop.call_later(WATCHDOG, loop.stop)
    threads = [threading.Thread(target=worker, args=(t * 1000,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    try:
        loop.run_until_complete(done)
    finally:
        for t in threads:
            t.join()
        watchdog.cancel()
    assert sorted(got) == sorted(t * 1000 + i for t in range(n_threads) for i in range(per_thread))
    # Per-thread order is preserved (each thread appends under the loop's lock in order).
    for t in range(n_threads):
        mine = [x for x in got if t * 1000 <= x < t * 1000 + per_thread]
        assert mine == sorted(mine)


def test_call_soon_threadsafe_returns_a_handle(loop):
    handle = loop.call_soon_threadsafe(lambda: None)
    assert hasattr(handle, "cancel")
    handle.cancel()
    assert handle.cancelled()


def test_loop_time_has_sub_millisecond_resolution(loop):
    # A resolution check, not a timing one: successive readings differ by less than 1 ms.
    smallest = None
    previous = loop.time()
    for _ in range(200_000):
        now = loop.time()
        if now != previous:
            step = now - previous
            smallest = step if smallest is None else min(smallest, step)
            if smallest < 0.001:
                break
        previous = now
    assert smallest is not None and smallest < 0.001
