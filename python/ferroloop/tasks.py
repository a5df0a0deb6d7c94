"""ferroloop's task functions: asyncio's ``wait``, ``gather`` and ``shield`` with their
per-future work native (``src/wait.rs``, ``src/gather.rs``), for any loop and any mix of
asyncio Futures, asyncio Tasks and ferroloop Tasks.

Arguments are checked here exactly as the running Python's asyncio checks them; the
loops over the futures, their done callbacks and the results are native. ``as_completed``
and ``wait_for`` are asyncio's own functions (they work with ferroloop Tasks; their cost is
in the coroutines they create, not in per-future bookkeeping).
"""

from asyncio import as_completed, coroutines, events, futures, tasks, wait_for
from asyncio.tasks import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION

from . import _ferroloop
from ._compat import TASK_COMPAT

__all__ = ("as_completed", "gather", "shield", "wait", "wait_for")

if TASK_COMPAT.HAS_EAGER_START:
    # 3.12+: asyncio.eager_task_factory with ferroloop's Task (a coroutine's first step runs
    # at once, in create_task).
    eager_task_factory = tasks.create_eager_task_factory(_ferroloop.Task)
    __all__ += ("eager_task_factory",)


async def wait(fs, *, timeout=None, return_when=ALL_COMPLETED):
    """Wait for the Futures or Tasks in ``fs`` to complete; return ``(done, pending)``.

    As ``asyncio.wait``: ``timeout`` (seconds) limits the wait without cancelling
    anything; ``return_when`` is FIRST_COMPLETED, FIRST_EXCEPTION or ALL_COMPLETED.
    """
    if futures.isfuture(fs) or coroutines.iscoroutine(fs):
        raise TypeError(f"expect a list of futures, not {type(fs).__name__}")
    if not fs:
        raise ValueError("Set of Tasks/Futures is empty.")
    if return_when not in (FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED):
        raise ValueError(f"Invalid return_when value: {return_when}")

    fs = set(fs)

    if _ferroloop.any_coroutine(fs):
        raise TypeError("Passing coroutines is forbidden, use tasks explicitly.")

    loop = events.get_running_loop()
    waiter = loop.create_future()
    counter = _ferroloop.WaitCounter(waiter, len(fs), return_when)
    if timeout is not None:
        counter.timeout_handle = loop.call_later(timeout, tasks._release_waiter, waiter)
    counter.watch(fs)
    try:
        await waiter
    finally:
        counter.unwatch(fs)
    return counter.partition(fs)


# Native entry points, called without a Python frame of ferroloop's (asyncio's warnings
# about a missing event loop then name the caller, as with asyncio's functions).
gather = _ferroloop.gather
shield = _ferroloop.shield
