"""The Python side of ferroloop's event loop: asyncio's long tail over the native core.

``Loop`` puts the native core (``_ferroloop.EventLoop``: ready queue, timers, one loop
turn, readiness polling, handles) in front of asyncio's own Unix selector loop in the
method resolution order. Everything the core does not define (argument handling, the
exception handler, executors, async generators, sockets, transports, servers, TLS, pipes,
subprocesses, signals) is asyncio's own code for the running Python version, running on the
native reactor; the TCP/Unix stream (``transports.py``), datagram (``datagram.py``) and pipe
(``pipes.py``) transports have native cores, TLS is ``sslproto.py``'s, ``sock_recv``,
``sock_sendall``, ``sock_connect`` and the other ``sock_*`` methods are native coroutines
(``src/sockets.rs``; ``sock_sendfile``'s data path is ``src/sockets/sendfile.rs``), nested
runs are ``nested.py``'s.
"""

import collections.abc
import inspect
import ipaddress
import os
import selectors
import socket
import sys
import threading
import weakref
from asyncio import base_events, constants, events, tasks, unix_events

from . import _compat, _ferroloop, child_watcher, datagram, pipes, sslproto, transports
from . import nested as _nested
from ._ferroloop import EventLoop as _NativeLoop
from ._ferroloop import Handle as _NativeHandle
from ._ferroloop import Task as _NativeTask

# asyncio.iscoroutine() and create_task() accept the native sock_* coroutines.
collections.abc.Coroutine.register(_ferroloop.SockCoroutine)


def _is_numeric_host(host):
    if host is None:
        return True
    if not isinstance(host, str):
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_numeric_port(port):
    return port is None or type(port) is int or (isinstance(port, str) and port.isdigit())


# What create_task makes on a ferroloop loop without a task factory: ferroloop's native
# Task, or asyncio's (FERROLOOP_TASKS=asyncio, or Loop(native_tasks=False)).
NATIVE_TASKS_DEFAULT = True


def default_native_tasks():
    """The ``native_tasks`` a new loop gets: ``FERROLOOP_TASKS`` ("native" or "asyncio")
    if set, else ``NATIVE_TASKS_DEFAULT``."""
    choice = os.environ.get("FERROLOOP_TASKS", "").strip().lower()
    if choice == "native":
        return True
    if choice == "asyncio":
        return False
    return NATIVE_TASKS_DEFAULT


def _format_handle(handle):
    # asyncio's base_events._format_handle, knowing ferroloop's Task too: a task step is
    # reported as its task.
    task = getattr(handle._callback, "__self__", None)
    if isinstance(task, (tasks.Task, _NativeTask)):
        return repr(task)
    return str(handle)


class EpollReactor:
    """What asyncio's code reads of ``loop._selector``: ``get_key`` (for transport reprs).

    ferroloop polls natively (level-triggered epoll, as asyncio's selectors); this view
    answers from the native registrations and cannot be used to select.
    """

    def __init__(self, loop):
        self._loop = weakref.ref(loop)

    def get_key(self, fileobj):
        fd = selectors._fileobj_to_fd(fileobj)
        loop = self._loop()
        if loop is None or loop.is_closed() or fd > 0x7FFFFFFF:
            raise KeyError(f"{fileobj!r} is not registered")
        mask, reader, writer = loop._io_key(fd)
        return selectors.SelectorKey(fileobj, fd, mask, (reader, writer))

    def select(self, timeout=None):
        raise RuntimeError("ferroloop's reactor is native: it cannot be selected from Python")

    def close(self):
        pass


class Loop(_NativeLoop, unix_events.SelectorEventLoop, metaclass=_nested.LoopType):
    """An asyncio event loop whose core is native (Rust)."""

    # Nested runs (nested.py): ferroloop.allow_nested(loop) sets this on a loop; the
    # metaclass makes nest_asyncio's patch of the class work on the native core.
    _nested_runs = False
    # A subclass defines its own time() (see __init_subclass__).
    _class_clock = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # asyncio's call_later schedules through self.call_at: a subclass that replaces
        # call_at (to record or shift timers, as CPython's TestLoop does) gets asyncio's own
        # call_later, so that its timers go through it too. Loop itself keeps the native one.
        if cls.call_at is not _NativeLoop.call_at and cls.call_later is _NativeLoop.call_later:
            cls.call_later = base_events.BaseEventLoop.call_later
        # asyncio reads its clock through self.time(): a subclass with its own time() (a
        # virtual clock) has the native core schedule and run timers by it too.
        cls._class_clock = inspect.getattr_static(cls, "time") is not _NativeLoop.__dict__["time"]

    def __init__(self, *, native_tasks=None):
        # asyncio's own constructor chain sets every attribute its methods (and CPython's
        # tests) read, for this Python version; the native core owns the queues.
        if self._class_clock:
            self._use_class_clock()
        super().__init__(selector=EpollReactor(self))
        self.native_tasks = default_native_tasks() if native_tasks is None else native_tasks

    def _make_self_pipe(self):
        # asyncio's self-pipe carries signal numbers (signal.set_wakeup_fd); thread wake-ups
        # use the native eventfd. It is watched once a signal handler exists, so that busy
        # turns without I/O need no poll.
        self._ssock, self._csock = socket.socketpair()
        self._ssock.setblocking(False)
        self._csock.setblocking(False)
        self._internal_fds += 1
        self._self_pipe_watched = False

    def add_signal_handler(self, sig, callback, *args):
        if self._ssock is not None and not self._self_pipe_watched:
            self._add_reader(self._ssock.fileno(), self._read_from_self)
            self._self_pipe_watched = True
        return super().add_signal_handler(sig, callback, *args)

    def _make_socket_transport(self, sock, protocol, waiter=None, *, extra=None, server=None):
        if _compat.MAKE_TRANSPORT_CHECKS_FD:
            self._ensure_fd_no_transport(sock)
        return transports.SocketTransport(self, sock, protocol, waiter, extra, server)

    def _make_ssl_transport(
        self,
        rawsock,
        protocol,
        sslcontext,
        waiter=None,
        *,
        server_side=False,
        server_hostname=None,
        extra=None,
        server=None,
        ssl_handshake_timeout=constants.SSL_HANDSHAKE_TIMEOUT,
        ssl_shutdown_timeout=constants.SSL_SHUTDOWN_TIMEOUT,
    ):
        # asyncio's method (same in 3.11-3.13 but for the fd check) builds asyncio's own
        # SSLProtocol and transport class directly: here they are ferroloop's (sslproto.py,
        # and the native stream transport).
        if _compat.MAKE_TRANSPORT_CHECKS_FD:
            self._ensure_fd_no_transport(rawsock)
        ssl_protocol = sslproto.SSLProtocol(
            self,
            protocol,
            sslcontext,
            waiter,
            server_side,
            server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
        )
        transports.SocketTransport(self, rawsock, ssl_protocol, extra=extra, server=server)
        return ssl_protocol._app_transport

    async def start_tls(
        self,
        transport,
        protocol,
        sslcontext,
        *,
        server_side=False,
        server_hostname=None,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=None,
    ):
        """Upgrade transport to TLS.

        Return a new transport that *protocol* should start using
        immediately.
        """
        # asyncio's method (the same in 3.11-3.13, its checks and errors), building
        # ferroloop's SSLProtocol so that upgraded connections get the native data path.
        ssl = base_events.ssl
        if ssl is None:
            raise RuntimeError("Python ssl module is not available")
        if not isinstance(sslcontext, ssl.SSLContext):
            raise TypeError(
                f"sslcontext is expected to be an instance of ssl.SSLContext, got {sslcontext!r}"
            )
        if not getattr(transport, "_start_tls_compatible", False):
            raise TypeError(f"transport {transport!r} is not supported by start_tls()")

        waiter = self.create_future()
        ssl_protocol = sslproto.SSLProtocol(
            self,
            protocol,
            sslcontext,
            waiter,
            server_side,
            server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
            call_connection_made=False,
        )
        # Pause early so that the SSL protocol's reads don't start before its
        # connection_made().
        transport.pause_reading()
        transport.set_protocol(ssl_protocol)
        conmade_cb = self.call_soon(ssl_protocol.connection_made, transport)
        resume_cb = self.call_soon(transport.resume_reading)
        try:
            await waiter
        except BaseException:
            transport.close()
            conmade_cb.cancel()
            resume_cb.cancel()
            raise
        return ssl_protocol._app_transport

    def _make_datagram_transport(self, sock, protocol, address=None, waiter=None, extra=None):
        if _compat.MAKE_TRANSPORT_CHECKS_FD:
            self._ensure_fd_no_transport(sock)
        return datagram._SelectorDatagramTransport(self, sock, protocol, address, waiter, extra)

    # Pipe transports with native hot paths (pipes.py).
    def _make_read_pipe_transport(self, pipe, protocol, waiter=None, extra=None):
        return pipes._UnixReadPipeTransport(self, pipe, protocol, waiter, extra)

    def _make_write_pipe_transport(self, pipe, protocol, waiter=None, extra=None):
        return pipes._UnixWritePipeTransport(self, pipe, protocol, waiter, extra)

    # 3.11: children watched with pidfds, as 3.12+ asyncio does (child_watcher.py).
    _pidfd_watcher = None

    if _compat.OWN_PIDFD_WATCHER:

        async def _make_subprocess_transport(
            self, protocol, args, shell, stdin, stdout, stderr, bufsize, extra=None, **kwargs
        ):
            if not child_watcher.policy_default_watcher_unset():
                return await super()._make_subprocess_transport(
                    protocol, args, shell, stdin, stdout, stderr, bufsize, extra, **kwargs
                )
            return await child_watcher.make_subprocess_transport(
                self, protocol, args, shell, stdin, stdout, stderr, bufsize, extra, **kwargs
            )

    # Native coroutines (src/sockets.rs): the syscall is made on the first send, with no
    # future, reader or Python frame when the socket is ready; asyncio's slow path otherwise.
    sock_recv = _ferroloop.sock_recv
    sock_recv_into = _ferroloop.sock_recv_into
    sock_sendall = _ferroloop.sock_sendall
    sock_recvfrom = _ferroloop.sock_recvfrom
    sock_recvfrom_into = _ferroloop.sock_recvfrom_into
    sock_sendto = _ferroloop.sock_sendto
    sock_accept = _ferroloop.sock_accept
    sock_connect = _ferroloop.sock_connect
    # sock_sendfile is asyncio's; its data path (one call per chunk) is native.
    _sock_sendfile_native_impl = _ferroloop._sock_sendfile_native_impl

    async def getaddrinfo(self, host, port, *, family=0, type=0, proto=0, flags=0):
        # A numeric host and port need no name service: answer on the loop thread instead
        # of a round trip through the default executor (asyncio's create_connection takes
        # the same shortcut itself). Debug mode keeps asyncio's timed lookup.
        if (
            not self._debug
            and not self._executor_shutdown_called
            and _is_numeric_host(host)
            and _is_numeric_port(port)
        ):
            self._check_closed()
            return socket.getaddrinfo(host, port, family, type, proto, flags)
        return await super().getaddrinfo(
            host, port, family=family, type=type, proto=proto, flags=flags
        )

    def _add_callback(self, handle):
        if isinstance(handle, _NativeHandle):
            _NativeLoop._add_callback(self, handle)
        elif not handle._cancelled:
            # An asyncio Handle (signal handlers): queue its callback in its context, with its
            # creation traceback, so errors and debug reports name the user's callback.
            native = self.call_soon(handle._callback, *handle._args, context=handle._context)
            native._source_traceback = handle._source_traceback

    def run_until_complete(self, future):
        """Run until the future (or coroutine) is done; return its result."""
        if self._nested_runs and _nested.reentrant(self):  # allow_nested: a nested run
            return _nested.run_until_complete(self, future)
        return super().run_until_complete(future)

    if _compat.HAS_RUN_FOREVER_SETUP:

        def run_forever(self):
            """Run until stop() is called."""
            if self._nested_runs and _nested.reentrant(self):  # allow_nested: a nested run
                return _nested.run_forever(self)
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
            if self._nested_runs and _nested.reentrant(self):  # allow_nested: a nested run
                return _nested.run_forever(self)
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
        """Close the loop: asyncio's close (self-pipe, executor, signal handlers), then
        drop the native queues and close the poller. Idempotent."""
        super().close()
        if self._pidfd_watcher is not None:
            self._pidfd_watcher.close()
        self._close_native()

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
        base_events.logger.warning("Executing %s took %.3f seconds", _format_handle(handle), dt)
