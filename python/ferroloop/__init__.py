"""ferroloop: an asyncio event loop for CPython with its core in Rust.

Use it like uvloop::

    import ferroloop
    ferroloop.run(main())                      # like asyncio.run, on a ferroloop loop
    ferroloop.install()                        # make asyncio create ferroloop loops
    asyncio.Runner(loop_factory=ferroloop.new_event_loop)
    ferroloop.allow_nested(loop)               # allow nested run_until_complete on it

Importing ferroloop changes nothing in asyncio until you ask.
"""

import asyncio as __asyncio

from ._ferroloop import Handle, Task, TimerHandle, __version__, task_factory
from .loop import Loop
from .nested import allow_nested
from .tasks import __all__ as _tasks_all
from .tasks import as_completed, gather, shield, wait, wait_for

if "eager_task_factory" in _tasks_all:
    from .tasks import eager_task_factory  # noqa: F401 (3.12+)

__all__ = (
    "EventLoopPolicy",
    "Handle",
    "Loop",
    "Task",
    "TimerHandle",
    "__version__",
    "allow_nested",
    "as_completed",
    "gather",
    "install",
    "new_event_loop",
    "run",
    "shield",
    "task_factory",
    "wait",
    "wait_for",
)


def new_event_loop() -> Loop:
    """Return a new ferroloop event loop."""
    return Loop()


class EventLoopPolicy(__asyncio.DefaultEventLoopPolicy):
    """An asyncio event loop policy whose loops are ferroloop loops.

    Built on asyncio's default policy for this platform, so ``get_event_loop``,
    ``set_event_loop`` (and, where the Python has them, the child-watcher methods) behave
    exactly as with asyncio.
    """

    def _loop_factory(self) -> Loop:
        return new_event_loop()

    def __repr__(self):
        return f"<{type(self).__name__}>"


def install() -> None:
    """Make asyncio use ferroloop loops (sets the global event loop policy)."""
    __asyncio.set_event_loop_policy(EventLoopPolicy())


def run(main, *, debug=None):
    """Run a coroutine on a new ferroloop loop, with ``asyncio.run``'s semantics.

    Cancels the tasks left over, shuts down async generators and the default
    executor, then closes the loop.
    """
    from ._runner import run as _run

    return _run(main, debug=debug)
