"""The Python side of ferroloop's event loop: asyncio's long tail over the native core.

The hot paths (ready queue, timers, one loop turn, readiness polling) live in
``_ferroloop.EventLoop``. The cold paths (argument handling, exception handler,
executors, async generators) are asyncio's own ``BaseEventLoop`` functions, borrowed by
reference so that every Python version gets exactly its own asyncio semantics.
"""

import asyncio
import sys
import threading
import time
import weakref
from asyncio import base_events, coroutines, events, format_helpers

from . import _compat
from ._ferroloop import EventLoop as _NativeLoop

_Base = base_events.BaseEventLoop

# Names borrowed unchanged from BaseEventLoop: they touch only attributes and methods
# that Loop provides (natively or below), never BaseEventLoop's own _ready/_scheduled.
_BORROWED = (
    "__repr__",
    "__del__",
    "create_future",
    "create_task",
    "set_task_factory",
    "get_task_factory",
    "_check_closed",
    "_check_default_executor",
    "_check_running",
    "_check_callback",
    "_check_thread",
    "_asyncgen_finalizer_hook",
    "_asyncgen_firstiter_hook",
    "shutdown_asyncgens",
    "shutdown_default_executor",
    "_do_shutdown",
    "run_until_complete",
    "run_in_executor",
    "set_default_executor",
    "_getaddrinfo_debug",
    "getaddrinfo",
    "getnameinfo",
    "get_exception_handler",
    "set_exception_handler",
    "default_exception_handler",
    "call_exception_handler",
    "_set_coroutine_origin_tracking",
    "set_debug",
    "_run_forever_setup",  # 3.13+
    "_run_forever_cleanup",  # 3.13+
)


class Loop(_NativeLoop, asyncio.AbstractEventLoop):
    """An asyncio event loop whose core is native (Rust)."""

    def __init__(self):
        # The attributes asyncio's borrowed methods (and CPython's tests) read.
        self._default_executor = None
        self._internal_fds = 0
        self._exception_handler = None
        self._current_handle = None
        self._task_factory = None
        self._coroutine_origin_tracking_enabled = False
        self._coroutine_origin_tracking_saved_depth = None
        self._asyncgens = weakref.WeakSet()
        self._asyncgens_shutdown_called = False
        self._executor_shutdown_called = False
        self._old_agen_hooks = None
        self.set_debug(coroutines._is_debug_mode())

    if _compat.HAS_RUN_FOREVER_SETUP:

        def run_forever(self):
            """Run until stop() is called."""
            try:
                self._run_forever_setup()
                self._run_turns()
            finally:
                self._run_forever_cleanup()

    else:
        # Before 3.13 the checks run outside the try: a loop that refuses to run
        # leaves the running loop (another one) registered.
        def run_forever(self):
            """Run until stop() is called."""
            self._check_closed()
            self._check_running()
            self._set_coroutine_origin_tracking(self._debug)
            old_agen_hooks = sys.get_asyncgen_hooks()
            try:
                self._thread_id = threading.get_ident()
                sys.set_asyncgen_hooks(
                    firstiter=self._asyncgen_firstiter_hook,
                    finalizer=self._asyncgen_finalizer_hook,
                )
                events._set_running_loop(self)
                self._run_turns()
            finally:
                self._stopping = False
                self._thread_id = None
                events._set_running_loop(None)
                self._set_coroutine_origin_tracking(False)
                sys.set_asyncgen_hooks(*old_agen_hooks)

    def _run_turns(self):
        # A subclass or a test may replace _run_once (asyncio calls it once per turn): honour
        # that, else let the native core run the turns without a Python call per turn.
        if "_run_once" in self.__dict__ or type(self)._run_once is not _NativeLoop._run_once:
            while True:
                self._run_once()
                if self._stopping:
                    break
        else:
            self._run_forever_native()

    def close(self):
        """Close the loop: drop pending callbacks, shut the default executor down.

        The loop must not be running. Pending callbacks are lost. Idempotent.
        """
        if self.is_running():
            raise RuntimeError("Cannot close a running event loop")
        if self.is_closed():
            return
        if self._debug:
            base_events.logger.debug("Close %r", self)
        self._close_native()
        self._executor_shutdown_called = True
        executor = self._default_executor
        if executor is not None:
            self._default_executor = None
            executor.shutdown(wait=False)

    def _report_callback_error(self, handle, exc):
        # Called by the native core when a callback raises (asyncio's Handle._run).
        cb = _compat.format_callback_source(handle._callback, handle._args, self)
        context = {
            "message": f"Exception in callback {cb}",
            "exception": exc,
            "handle": handle,
        }
        if handle._source_traceback:
            context["source_traceback"] = handle._source_traceback
        self.call_exception_handler(context)

    def _log_slow_callback(self, handle, dt):
        base_events.logger.warning(
            "Executing %s took %.3f seconds", base_events._format_handle(handle), dt
        )


for _name in _BORROWED:
    if _name in Loop.__dict__:
        continue
    if hasattr(_Base, _name):
        setattr(Loop, _name, getattr(_Base, _name))
del _name

# Used by the native core in debug mode to capture where a handle was created.
_extract_stack = format_helpers.extract_stack
_monotonic = time.monotonic
