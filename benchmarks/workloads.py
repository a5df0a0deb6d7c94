"""One benchmark point: run one workload on one event loop, print one JSON line.

Usage::

    python benchmarks/workloads.py ROW LOOP N     # measure ROW with N operations on LOOP
    python benchmarks/workloads.py probe LOOP     # can LOOP be imported? which version?

``ferroloop+task`` is the ferroloop loop with ``loop.set_task_factory(ferroloop.task_factory)``
(ferroloop's native Task) and the task rows calling ``ferroloop.wait``/``ferroloop.gather``
instead of asyncio's; it runs only the task rows (``TASK_ROWS``). It is "missing" until
ferroloop has ``Task`` and ``task_factory`` (without ``ferroloop.wait``/``gather`` it uses
asyncio's, and its ``task`` label says so). For checking the wiring only,
``BENCH_TASK_STANDIN=1`` makes it asyncio's pure-Python ``_PyTask`` with asyncio's functions
(never for published numbers).

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
    # ferroloop's loop with ferroloop's native Task (task factory) and wait/gather: task rows only
    "ferroloop+task": ("ferroloop", "new_event_loop"),
}

# Loops that run only the task rows (the same loop as another column, a different Task).
TASK_ONLY_LOOPS = ("ferroloop+task",)

# What ferroloop+task needs from ferroloop (its native task machinery, issue 6); wait/gather
# fall back to asyncio's while ferroloop has none, and the column's label says so.
FERRO_TASK_API = ("Task", "task_factory")
FERRO_TASK_FUNCTIONS = ("wait", "gather")

# The native module must import too: a bare python/ferroloop source tree is not a loop.
NATIVE = {"ferroloop": "ferroloop._ferroloop", "ferroloop+task": "ferroloop._ferroloop"}


class TaskAPI:
    """The task functions a workload calls: asyncio's, or ferroloop's native ones.

    ``task_factory`` is set on the loop before the workload runs (None: the loop's default)."""

    def __init__(self, wait=None, gather=None, task_factory=None, task_class=None, label=None):
        self.wait = wait or asyncio.wait
        self.gather = gather or asyncio.gather
        self.task_factory = task_factory
        self.task_class = task_class or asyncio.Task  # checked after the workload
        self.label = label or "asyncio.Task"


def load_task_api(name):
    """The TaskAPI for loop ``name``; ImportError if ferroloop's native task API is missing."""
    import importlib
    import os

    if name != "ferroloop+task":
        return TaskAPI()
    if os.environ.get("BENCH_TASK_STANDIN"):
        # Wiring check only: asyncio's pure-Python Task stands in for ferroloop's.
        py_task = asyncio.tasks._PyTask

        def standin_factory(loop, coro, **kwargs):
            return py_task(coro, loop=loop, **kwargs)

        return TaskAPI(
            task_factory=standin_factory,
            task_class=py_task,
            label="stand-in: asyncio.tasks._PyTask",
        )
    ferroloop = importlib.import_module("ferroloop")
    missing = [attr for attr in FERRO_TASK_API if getattr(ferroloop, attr, None) is None]
    if missing:
        raise ImportError("ferroloop has no " + ", ".join(missing) + " (native Task not built)")
    fns = {name: getattr(ferroloop, name, None) for name in FERRO_TASK_FUNCTIONS}
    label = "ferroloop.Task"
    if None in fns.values():
        absent = [name for name, fn in fns.items() if fn is None]
        label += f" with asyncio's {'/'.join(absent)} (ferroloop has none yet)"
    return TaskAPI(fns["wait"], fns["gather"], ferroloop.task_factory, ferroloop.Task, label)


def load_factory(name):
    """Return a zero-argument function that makes a new loop of kind ``name``."""
    import importlib

    module_name, attr = LOOPS[name]
    module = importlib.import_module(module_name)
    if name in NATIVE:
        importlib.import_module(NATIVE[name])
    load_task_api(name)  # ImportError if a loop's task API is missing
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
# The task rows also read API (asyncio's wait/gather, or ferroloop's for ferroloop+task); the
# tasks themselves come from the loop's task factory (ensure_future/create_task ask the loop).

API = TaskAPI()


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
        done, pending = await API.wait(tasks)
        timing = clock.read()
        assert len(done) == n and not pending
        return timing

    return loop.run_until_complete(main())


def tasks_gather(loop, n):
    """asyncio.gather of n coroutines that each await asyncio.sleep(0) (gather makes each a
    task through the loop's task factory)."""

    async def main():
        clock = Stopwatch()
        results = await API.gather(*[_sleep0() for _ in range(n)])
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
            done, pending = await API.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            assert len(done) == 1 and len(pending) == width - 1
            for task in pending:
                task.cancel()
            await API.wait(pending)
            assert all(task.cancelled() for task in pending)
        return clock.read()

    return loop.run_until_complete(main())


async def _return(value):
    return value


def task_chain(loop, n):
    """A chain of n tasks: create_task, then await it before creating the next."""

    async def main():
        clock = Stopwatch()
        create_task = loop.create_task
        total = 0
        for i in range(n):
            total += await create_task(_return(i))
        timing = clock.read()
        assert total == n * (n - 1) // 2, total
        return timing

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
    "task_chain": (task_chain, 100_000, 10_000, "seconds"),
    "memory": (cancelled_timers_memory, 200_000, 20_000, "rss_in_use_mib"),
}

# The rows that measure tasks (issue 6): the ones ferroloop+task runs; `run.py --rows tasks`.
TASK_ROWS = ("tasks_wait", "gather", "first_completed", "task_chain")


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

    dist = "CPython" if name == "asyncio" else name.split("+")[0]
    try:
        version = metadata.version(dist) if name != "asyncio" else sys.version.split()[0]
    except metadata.PackageNotFoundError:
        version = "unknown"
    loop = load_factory(name)()
    loop.close()
    emit({"loop": name, "version": version, "task": load_task_api(name).label})
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
    if name in TASK_ONLY_LOOPS and row not in TASK_ROWS:
        sys.stderr.write(f"{name} runs only the task rows: {', '.join(TASK_ROWS)}\n")
        return 64
    global API
    API = load_task_api(name)
    workload, _, _, metric = ROWS[row]
    loop = factory()
    # Explicitly, also None: the "ferroloop" column is asyncio's Task on ferroloop's loop
    # whatever ferroloop's default (Loop.native_tasks, FERROLOOP_TASKS) is.
    if API.task_factory is None and hasattr(loop, "native_tasks"):
        loop.native_tasks = False
    loop.set_task_factory(API.task_factory)
    asyncio.set_event_loop(loop)
    try:
        fields = workload(loop, n)
        # Outside the timed part: did the workload's tasks have the Task class the column says?
        probe_task = loop.create_task(_return(None))
        loop.run_until_complete(probe_task)
        if type(probe_task) is not API.task_class:
            raise RuntimeError(
                f"{name}: tasks are {type(probe_task).__module__}.{type(probe_task).__qualname__},"
                f" expected {API.label}"
            )
        fields["task"] = API.label
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    result = {"row": row, "loop": name, "n": n, **fields, "peak_rss_mib": peak_rss_mib()}
    result["value"] = result[metric]
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
