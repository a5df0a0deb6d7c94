"""One benchmark point: run one workload on one event loop, print one JSON line.

Usage::

    python benchmarks/workloads.py ROW LOOP N     # measure ROW with N operations on LOOP
    python benchmarks/workloads.py probe LOOP     # can LOOP be imported? which version?

``benchmarks/run.py`` runs this in a fresh process for every point. The time reported is
``time.perf_counter()`` around the workload only (not interpreter start-up, imports or loop
creation). Exit status 2 with ``{"missing": ...}`` means the loop's package is not installed.
"""

import asyncio
import json
import random
import resource
import sys
import threading
import time

MISSING = 2

LOOPS = {
    # name: (module to import, attribute that makes a new loop; None = asyncio's own)
    "asyncio": ("asyncio", None),
    "uvloop": ("uvloop", "new_event_loop"),
    "rloop": ("rloop", "new_event_loop"),
    "ferroloop": ("ferroloop", "new_event_loop"),
}

# The native module must import too: a bare python/ferroloop source tree is not a loop.
NATIVE = {"ferroloop": "ferroloop._ferroloop"}


def load_factory(name):
    """Return a zero-argument function that makes a new loop of kind ``name``."""
    import importlib

    module_name, attr = LOOPS[name]
    module = importlib.import_module(module_name)
    if name in NATIVE:
        importlib.import_module(NATIVE[name])
    if attr is None:
        return asyncio.new_event_loop
    return getattr(module, attr)


def rss_mib():
    """Current resident set size (VmRSS) in MiB."""
    return _status_kib("VmRSS") / 1024


def peak_rss_mib():
    """Peak resident set size in MiB (VmHWM; getrusage's ru_maxrss as a fallback)."""
    try:
        return _status_kib("VmHWM") / 1024
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class Stopwatch:
    """Wall time (``perf_counter``, what the tables compare) and this process's CPU time
    (``process_time``, every thread: a hint at how much of the wall time was spent waiting
    for a CPU on a busy machine)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self):
        return {
            "seconds": time.perf_counter() - self.wall,
            "cpu_seconds": time.process_time() - self.cpu,
        }


# --- the workloads: each takes (loop, n) and returns {"seconds": ..., other fields} ---------


def call_soon_chain(loop, n):
    """A chain of n call_soon callbacks, each scheduling the next; the last stops the loop."""
    left = n

    def step():
        nonlocal left
        left -= 1
        if left:
            loop.call_soon(step)
        else:
            loop.stop()

    loop.call_soon(step)
    clock = Stopwatch()
    loop.run_forever()
    timing = clock.read()
    assert left == 0, left
    return timing


def call_later_timers(loop, n):
    """n call_later timers with seeded random delays up to 50 ms; the last one to fire stops."""
    rng = random.Random(1234)
    delays = [rng.uniform(0.0, 0.050) for _ in range(n)]
    fired = 0

    def on_timer():
        nonlocal fired
        fired += 1
        if fired == n:
            loop.stop()

    def schedule_all():
        for delay in delays:
            loop.call_later(delay, on_timer)

    loop.call_soon(schedule_all)
    clock = Stopwatch()
    loop.run_forever()
    timing = clock.read()
    assert fired == n, fired
    return timing


def call_soon_threadsafe(loop, n):
    """A worker thread posts n call_soon_threadsafe callbacks; the loop counts them, then stops."""
    received = 0

    def on_call():
        nonlocal received
        received += 1
        if received == n:
            loop.stop()

    def worker():
        post = loop.call_soon_threadsafe
        for _ in range(n):
            post(on_call)

    thread = threading.Thread(target=worker)
    loop.call_soon(thread.start)  # start once the loop runs, so no post lands before
    clock = Stopwatch()
    loop.run_forever()
    timing = clock.read()
    thread.join()
    assert received == n, received
    return timing


async def _sleep0():
    await asyncio.sleep(0)


def tasks_wait(loop, n):
    """n tasks that each await asyncio.sleep(0), then asyncio.wait on all of them."""

    async def main():
        clock = Stopwatch()
        tasks = [asyncio.ensure_future(_sleep0()) for _ in range(n)]
        done, pending = await asyncio.wait(tasks)
        timing = clock.read()
        assert len(done) == n and not pending
        return timing

    return loop.run_until_complete(main())


def tasks_gather(loop, n):
    """asyncio.gather of n coroutines that each await asyncio.sleep(0)."""

    async def main():
        clock = Stopwatch()
        results = await asyncio.gather(*[_sleep0() for _ in range(n)])
        timing = clock.read()
        assert len(results) == n
        return timing

    return loop.run_until_complete(main())


async def _sleep_long():
    await asyncio.sleep(3600)


def wait_first_completed(loop, n, width=20):
    """n rounds: asyncio.wait(FIRST_COMPLETED) over `width` tasks (one finishes at once, the
    others sleep for an hour), then cancel the others and wait for them."""

    async def main():
        clock = Stopwatch()
        for _ in range(n):
            tasks = [asyncio.ensure_future(_sleep0())]
            tasks += [asyncio.ensure_future(_sleep_long()) for _ in range(width - 1)]
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            assert len(done) == 1 and len(pending) == width - 1
            for task in pending:
                task.cancel()
            await asyncio.wait(pending)
            assert all(task.cancelled() for task in pending)
        return clock.read()

    return loop.run_until_complete(main())


def cancelled_timers_memory(loop, n):
    """n one-hour call_later timers, each holding a distinct 1 KiB bytes argument, cancelled at
    once; after a couple of loop turns, how much memory do they still hold?"""

    async def main():
        before = rss_mib()
        clock = Stopwatch()
        call_later = loop.call_later
        for i in range(n):
            # i.to_bytes(...) * 128: 1 KiB, a distinct object per timer (no constant folding)
            call_later(3600, len, i.to_bytes(8, "little") * 128).cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        timing = clock.read()
        return {**timing, "rss_in_use_mib": rss_mib() - before}

    return loop.run_until_complete(main())


# row name -> (workload, default N, quick N, what the runner compares)
ROWS = {
    "call_soon": (call_soon_chain, 300_000, 30_000, "seconds"),
    "call_later": (call_later_timers, 100_000, 10_000, "seconds"),
    "threadsafe": (call_soon_threadsafe, 100_000, 10_000, "seconds"),
    "tasks_wait": (tasks_wait, 50_000, 5_000, "seconds"),
    "gather": (tasks_gather, 50_000, 5_000, "seconds"),
    "first_completed": (wait_first_completed, 2_000, 200, "seconds"),
    "memory": (cancelled_timers_memory, 200_000, 20_000, "rss_in_use_mib"),
}


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def probe(name):
    try:
        load_factory(name)
    except ImportError as exc:
        emit({"loop": name, "missing": f"{type(exc).__name__}: {exc}"})
        return MISSING
    from importlib import metadata

    dist = "CPython" if name == "asyncio" else name
    try:
        version = metadata.version(dist) if name != "asyncio" else sys.version.split()[0]
    except metadata.PackageNotFoundError:
        version = "unknown"
    loop = load_factory(name)()
    loop.close()
    emit({"loop": name, "version": version})
    return 0


def main(argv):
    if len(argv) == 2 and argv[0] == "probe":
        return probe(argv[1])
    if len(argv) != 3 or argv[0] not in ROWS or argv[1] not in LOOPS:
        sys.stderr.write(f"usage: workloads.py {{{','.join(ROWS)}}} {{{','.join(LOOPS)}}} N\n")
        sys.stderr.write("       workloads.py probe LOOP\n")
        return 64
    row, name, n = argv[0], argv[1], int(argv[2])
    try:
        factory = load_factory(name)
    except ImportError as exc:
        emit({"loop": name, "missing": f"{type(exc).__name__}: {exc}"})
        return MISSING
    workload, _, _, metric = ROWS[row]
    loop = factory()
    asyncio.set_event_loop(loop)
    try:
        fields = workload(loop, n)
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    result = {"row": row, "loop": name, "n": n, **fields, "peak_rss_mib": peak_rss_mib()}
    result["value"] = result[metric]
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
