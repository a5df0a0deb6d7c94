"""ferroloop.run: asyncio.run's semantics on a ferroloop loop."""

import asyncio
from asyncio import events

from . import loop as _loop


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
