"""Every switch on the running Python's version lives here, and only here.

ferroloop borrows asyncio's own cold-path methods from ``BaseEventLoop`` so that each
Python version gets exactly its own asyncio semantics; what differs between versions is
decided below.
"""

import inspect
import sys
from asyncio import base_events, events, format_helpers, selector_events, tasks

# 3.13 split run_forever into _run_forever_setup/_run_forever_cleanup (and
# BaseEventLoop.__init__ gained _old_agen_hooks); older versions inline them.
HAS_RUN_FOREVER_SETUP = hasattr(base_events.BaseEventLoop, "_run_forever_setup")

# 3.13 gave format_helpers._format_callback_source a ``debug`` keyword (and Handle passes
# the loop's debug flag); a feature test, since patch releases differ.
FORMAT_CALLBACK_TAKES_DEBUG = (
    "debug" in inspect.signature(format_helpers._format_callback_source).parameters
)

# `python -P` / PYTHONSAFEPATH (3.11+): the interpreter puts no script directory on sys.path,
# so `python -m ferroloop` must not either.
SAFE_PATH = bool(getattr(sys.flags, "safe_path", False))


def format_callback_source(callback, args, loop):
    """format_helpers._format_callback_source as the running Python calls it."""
    if FORMAT_CALLBACK_TAKES_DEBUG:
        return format_helpers._format_callback_source(
            callback, args, debug=loop is not None and loop.get_debug()
        )
    return format_helpers._format_callback_source(callback, args)


# asyncio.tasks._swap_current_task (3.12+) sets a loop's current task and returns the
# previous one; 3.11 keeps the current tasks in a dict (the C module's own).
if hasattr(tasks, "_swap_current_task"):

    def swap_current_task(loop, task):
        """Make ``task`` (or no task) ``loop``'s current task; return the previous one."""
        if task is None and tasks.current_task(loop) is None:
            return None  # 3.12's C version raises KeyError when there is nothing to unset
        return tasks._swap_current_task(loop, task)

else:

    def swap_current_task(loop, task):
        """Make ``task`` (or no task) ``loop``'s current task; return the previous one."""
        if task is None:
            return tasks._current_tasks.pop(loop, None)
        previous = tasks._current_tasks.get(loop)
        tasks._current_tasks[loop] = task
        return previous


# 3.12 made _make_socket_transport/_make_datagram_transport refuse an fd that another
# transport still uses (_ensure_fd_no_transport).
MAKE_TRANSPORT_CHECKS_FD = sys.version_info >= (3, 12)


class TASK_COMPAT:  # read by the native Task (src/task.rs)
    """What ferroloop's native Task needs to know about the running Python's asyncio."""

    # 3.12 added Task(eager_start=...) and eager task factories.
    HAS_EAGER_START = hasattr(tasks, "_register_eager_task")

    # 3.12 gather() runs the callbacks of children already done (eager tasks) once its
    # outer future exists, instead of adding callbacks to them.
    GATHER_DONE_AT_ONCE = sys.version_info >= (3, 12)

    # The weak set asyncio.all_tasks() reads for tasks that are not asyncio's C tasks
    # (3.12 renamed it from _all_tasks to _scheduled_tasks).
    all_tasks_set = (
        tasks._scheduled_tasks if hasattr(tasks, "_scheduled_tasks") else tasks._all_tasks
    )

    # asyncio's own pieces the native task functions use.
    GatheringFuture = tasks._GatheringFuture
    # 3.11's gather/shield call _ensure_future (its deprecation warnings point at the
    # caller); 3.12 folded it into ensure_future.
    ensure_future = staticmethod(getattr(tasks, "_ensure_future", tasks.ensure_future))

    # 3.13: uncancel() bringing the count to zero also withdraws a pending cancel request.
    UNCANCEL_RESETS_MUST_CANCEL = sys.version_info >= (3, 13)

    # The loop gather() with no arguments uses (3.12 made _get_event_loop public).
    gather_empty_loop = staticmethod(
        events.get_event_loop if sys.version_info >= (3, 12) else events._get_event_loop
    )

    @staticmethod
    def eager_start(task):
        """asyncio's ``Task.__eager_start`` (3.12+): run the first step now, as the loop's
        current task; register the task unless it finished in that step."""
        loop = task.get_loop()
        prev_task = tasks._swap_current_task(loop, task)
        try:
            tasks._register_eager_task(task)
            try:
                task.get_context().run(task._eager_step)
            finally:
                tasks._unregister_eager_task(task)
        finally:
            try:
                curtask = tasks._swap_current_task(loop, prev_task)
                assert curtask is task
            finally:
                if not task.done():
                    tasks._register_task(task)


# 3.13's Server tracks its transports: _attach(transport)/_detach(transport), and a transport's
# __del__ detaches itself (3.11/3.12: _attach()/_detach() count them).
SERVER_TRACKS_TRANSPORTS = len(inspect.signature(base_events.Server._attach).parameters) > 1


def server_attach(server, transport):
    """Server._attach as the running Python calls it."""
    if SERVER_TRACKS_TRANSPORTS:
        server._attach(transport)
    else:
        server._attach()


def server_detach(server, transport):
    """Server._detach as the running Python calls it."""
    if SERVER_TRACKS_TRANSPORTS:
        server._detach(transport)
    else:
        server._detach()


# 3.12 gave the socket transport its own writelines (one sendmsg, its own messages);
# 3.11 inherits WriteTransport.writelines (join, then write).
WRITELINES_SENDMSG = "writelines" in selector_events._SelectorSocketTransport.__dict__


def _datagram_header_size():
    # What asyncio's sendto adds to _buffer_size per queued datagram besides its length
    # (8 from 3.13, and in later 3.12 patch releases): asked of asyncio's own sendto, with a
    # non-empty buffer so that it only queues.
    import collections

    probe = object.__new__(selector_events._SelectorDatagramTransport)
    probe.__dict__.update(
        _address=None,
        _conn_lost=0,
        _buffer=collections.deque([(b"", None)]),
        _buffer_size=0,
        _maybe_pause_protocol=lambda: None,
    )
    selector_events._SelectorDatagramTransport.sendto(probe, b"x", ("127.0.0.1", 9))
    return probe._buffer_size - 1


DATAGRAM_HEADER_SIZE = _datagram_header_size()

# 3.12 made asyncio's default policy watch children with pidfds where the kernel has them;
# 3.11's default is a thread per child. On 3.11 a ferroloop loop uses pidfds itself in the
# case where asyncio would have made its default watcher (child_watcher.py).
OWN_PIDFD_WATCHER = sys.version_info < (3, 12)
