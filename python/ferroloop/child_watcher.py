"""Child processes watched with pidfds on 3.11, as asyncio 3.12+ watches them by default.

asyncio 3.11's default child watcher is ``ThreadedChildWatcher``: a thread per child, blocked
in ``waitpid``. From 3.12 on, asyncio's default policy picks ``PidfdChildWatcher`` wherever the
kernel has pidfds (Linux 5.3+): the child's exit makes a pidfd readable, and the loop's reactor
sees it with no thread. On 3.11 a ferroloop loop does the same, but only where asyncio would
otherwise make its default watcher: when the policy is asyncio's default one (or a subclass
that keeps its ``get_child_watcher``) and no watcher was set or created. A watcher the user
set (``asyncio.set_child_watcher``) is always asyncio's path, with asyncio's code.

On 3.12+ nothing here is used: asyncio's own policy already chooses pidfds.
"""

import os
from asyncio import events, unix_events
from asyncio.log import logger

_pidfd_usable = None


def can_use_pidfd():
    """asyncio 3.12's ``can_use_pidfd``: pidfd_open exists and is not blocked (seccomp)."""
    global _pidfd_usable
    if _pidfd_usable is None:
        try:
            os.close(os.pidfd_open(os.getpid(), 0))
        except (AttributeError, OSError):
            _pidfd_usable = False
        else:
            _pidfd_usable = True
    return _pidfd_usable


def policy_default_watcher_unset():
    """True when asyncio 3.11 would create its default (threaded) watcher for this child."""
    policy = events.get_event_loop_policy()
    default = unix_events._UnixDefaultEventLoopPolicy
    return (
        isinstance(policy, default)
        and type(policy).get_child_watcher is default.get_child_watcher
        and getattr(policy, "_watcher", True) is None
        and can_use_pidfd()
    )


class LoopPidfdWatcher:
    """Watches one loop's children through pidfds on its reactor (asyncio 3.12's
    ``PidfdChildWatcher`` rules: reap with ``waitpid``; an already reaped child reports
    returncode 255 with asyncio's warning). The pidfds still open when the loop closes
    are closed with it."""

    def __init__(self, loop):
        self._loop = loop
        self._pidfds = {}  # pid -> pidfd

    def add_child_handler(self, pid, callback, *args):
        pidfd = os.pidfd_open(pid)
        self._pidfds[pid] = pidfd
        self._loop._add_reader(pidfd, self._do_wait, pid, pidfd, callback, args)

    def _do_wait(self, pid, pidfd, callback, args):
        self._loop._remove_reader(pidfd)
        self._pidfds.pop(pid, None)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            # Reaped elsewhere (a waitpid of the program's own): asyncio's answer.
            returncode = 255
            logger.warning(
                "child process pid %d exit status already read:  will report returncode 255",
                pid,
            )
        else:
            returncode = os.waitstatus_to_exitcode(status)
        os.close(pidfd)
        callback(pid, returncode, *args)

    def close(self):
        for pidfd in self._pidfds.values():
            self._loop._remove_reader(pidfd)
            os.close(pidfd)
        self._pidfds.clear()


async def make_subprocess_transport(
    loop, protocol, args, shell, stdin, stdout, stderr, bufsize, extra=None, **kwargs
):
    """asyncio 3.11's ``_make_subprocess_transport`` with the loop's pidfd watcher."""
    watcher = loop._pidfd_watcher
    if watcher is None:
        watcher = loop._pidfd_watcher = LoopPidfdWatcher(loop)
    waiter = loop.create_future()
    transp = unix_events._UnixSubprocessTransport(
        loop,
        protocol,
        args,
        shell,
        stdin,
        stdout,
        stderr,
        bufsize,
        waiter=waiter,
        extra=extra,
        **kwargs,
    )
    watcher.add_child_handler(transp.get_pid(), loop._child_watcher_callback, transp)
    try:
        await waiter
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException:
        transp.close()
        await transp._wait()
        raise
    return transp
