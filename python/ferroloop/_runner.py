"""ferroloop.run: asyncio.run's semantics on a ferroloop loop."""

import asyncio
from asyncio import events

from . import _compat
from . import loop as _loop

if _compat.HAS_RUNNER:

    def run(main, *, debug=None):
        # asyncio.run's own check, made before any loop exists.
        if events._get_running_loop() is not None:
            raise RuntimeError("asyncio.run() cannot be called from a running event loop")
        # asyncio.Runner owns the rest of the contract: leftover tasks cancelled, async
        # generators and the default executor shut down, SIGINT turned into cancellation.
        with asyncio.Runner(debug=debug, loop_factory=_loop.Loop) as runner:
            # asyncio.run (no loop_factory) makes its loop the current one for the run and
            # unsets it on close; a Runner given a factory does neither, so do as it does.
            events.set_event_loop(runner.get_loop())
            runner._set_event_loop = True
            return runner.run(main)

else:  # 3.9 and 3.10 have no Runner: the same steps as their asyncio.run.
    from asyncio import coroutines
    from asyncio.runners import _cancel_all_tasks

    def run(main, *, debug=None):
        if events._get_running_loop() is not None:
            raise RuntimeError("asyncio.run() cannot be called from a running event loop")
        if not coroutines.iscoroutine(main):
            raise ValueError(f"a coroutine was expected, got {main!r}")
        loop = _loop.Loop()
        try:
            events.set_event_loop(loop)
            if debug is not None:
                loop.set_debug(debug)
            return loop.run_until_complete(main)
        finally:
            try:
                _cancel_all_tasks(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
                if hasattr(loop, "shutdown_default_executor"):
                    loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                events.set_event_loop(None)
                loop.close()
