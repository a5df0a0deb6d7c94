"""Nested runs: running a ferroloop loop again from inside a callback it is running.

asyncio refuses this (``RuntimeError: This event loop is already running``) and so does
ferroloop by default. Notebook users turn it on in two ways, and both work on ferroloop:

**nest_asyncio.** ``nest_asyncio.apply()`` replaces ``run_forever``, ``run_until_complete``,
``_run_once`` and ``_check_running`` on the loop's class with re-entrant Python versions.
Its ``run_forever``/``run_until_complete`` only need the loop's public and asyncio-private
state, which a ferroloop loop has. Its ``_run_once`` cannot work here: it pops
``loop._ready`` (a deque in asyncio; the native queue's read-only snapshot here), pops the
``loop._scheduled`` heap and calls ``loop._selector.select()``, and the native core owns
all three. So ``Loop``'s metaclass (:class:`LoopType`) notices when nest_asyncio installs
its ``_run_once`` on a ferroloop loop class and installs :func:`nest_asyncio_run_once`
instead: the native turn, plus the one thing nest_asyncio's version adds, setting the
current task aside while the turn runs (a task that starts a nested run is still "being
executed", and asyncio allows one current task per loop). Everything else of
nest_asyncio's stays as it is, so a program gets the same results as with nest_asyncio on
the stock loop. Nothing happens unless nest_asyncio is used; its patch is recognised by the
function's module and name, and nothing is looked up per call.

**allow_nested(loop).** The explicit way, without patching anything:
``ferroloop.allow_nested(loop)`` makes ``loop.run_until_complete(...)`` and
``loop.run_forever()`` re-entrant on that loop (and only on that loop, and only from the
loop's own thread: another thread still gets asyncio's RuntimeError). A nested
``run_until_complete(f)`` runs turns until ``f`` is done; a nested ``run_forever()`` runs
until ``stop()`` is called. ``asyncio.run()`` keeps refusing to run inside a running loop (it
always makes a new loop); call ``loop.run_until_complete(coro)`` instead.

Why a nested run is safe on the native core: one turn runs *at most* the number of
callbacks that were ready when it started, taking each from the front of the shared ready
queue just before running it. When a callback runs a nested loop, the nested turns take
callbacks from the same queue, in the same first-in-first-out order; when it returns, the
outer turn carries on from the front of the queue and stops at its count (or when the queue
is empty). So every callback runs once, none is lost, and the order in which callbacks run
is their scheduling order, exactly as nest_asyncio's own ``_run_once`` does on the stock
loop. Stops: a nested ``run_forever`` ends on its own ``stop()``; a ``stop()`` requested
before it started is kept for the enclosing run. A ``stop()`` during a nested
``run_until_complete`` (for example asyncio's own, when the outer ``run_until_complete``'s
future completes meanwhile) is held and handed back to the enclosing run when the nested
run returns, so the inner run is not cut short and the outer run still stops.
"""

from asyncio import events, futures, tasks

from . import _compat
from ._ferroloop import EventLoop as _NativeLoop

__all__ = ("allow_nested",)


def allow_nested(loop):
    """Allow nested runs on a ferroloop loop, without nest_asyncio; returns the loop.

    After it, ``loop.run_until_complete(...)`` (and ``loop.run_forever()``) may be called
    from a coroutine or callback that the loop is running: the nested call runs the loop
    until its future is done (``run_forever``: until ``stop()``), then returns to the
    caller, and the outer run carries on. Without it, asyncio's ``RuntimeError: This event
    loop is already running`` is kept.
    """
    if not isinstance(loop, _NativeLoop):
        raise TypeError(f"allow_nested() needs a ferroloop loop, got {loop!r}")
    loop._nested_runs = True
    return loop


def reentrant(loop):
    """True when ``loop`` is running and this call comes from inside that run."""
    return loop._thread_id is not None and events._get_running_loop() is loop


def run_until_complete(loop, future):
    """A nested ``run_until_complete`` (allow_nested): turns until ``future`` is done."""
    loop._check_closed()
    new_task = not futures.isfuture(future)
    future = tasks.ensure_future(future, loop=loop)
    if new_task:
        # An error in it is raised here; asyncio's run_until_complete does the same.
        future._log_destroy_pending = False
    outer_stop = False
    task = _compat.swap_current_task(loop, None)
    try:
        while not future.done():
            loop._run_once()
            if loop._stopping:
                # Not ours (a nested run_until_complete stops when its future is done):
                # keep it for the enclosing run, and do not spin on it meanwhile.
                outer_stop = True
                loop._stopping = False
    finally:
        _compat.swap_current_task(loop, task)
        if outer_stop:
            loop._stopping = True
    return future.result()


def run_forever(loop):
    """A nested ``run_forever`` (allow_nested): turns until ``stop()``."""
    loop._check_closed()
    outer_stop = loop._stopping
    loop._stopping = False
    task = _compat.swap_current_task(loop, None)
    try:
        loop._run_turns()
    finally:
        _compat.swap_current_task(loop, task)
        loop._stopping = outer_stop


def nest_asyncio_run_once(self):
    """nest_asyncio's ``_run_once``, on the native core (see the module docstring)."""
    task = _compat.swap_current_task(self, None)
    try:
        _NativeLoop._run_once(self)
    finally:
        if task is not None:
            _compat.swap_current_task(self, task)


def _is_nest_asyncio_run_once(value):
    # nest_asyncio, or a fork of it under a derived module name.
    return str(getattr(value, "__module__", "")).startswith("nest_asyncio") and (
        getattr(value, "__name__", None) == "_run_once"
    )


class LoopType(type):
    """The metaclass of ``ferroloop.Loop``: swaps nest_asyncio's ``_run_once`` for
    :func:`nest_asyncio_run_once` when nest_asyncio patches the class."""

    def __setattr__(cls, name, value):
        if name == "_run_once" and _is_nest_asyncio_run_once(value):
            value = nest_asyncio_run_once
        super().__setattr__(name, value)
