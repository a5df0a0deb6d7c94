"""ferroloop's transports.

The TCP/Unix stream transport is native: ``_SelectorSocketTransport`` below is an
``asyncio.Transport`` subclass (a native class cannot inherit from asyncio's transport
classes) that owns a ``_ferroloop.StreamCore``, which does the reads, the writes, the write
buffer, flow control, close and abort. The Python class keeps what runs once per connection
or only on errors, written as asyncio's ``selector_events._SelectorSocketTransport`` writes
it: the constructor, ``repr``, ``__del__``, ``_fatal_error``, ``_call_connection_lost``.

The datagram and pipe transports are in ``datagram.py`` and ``pipes.py``.
"""

import selectors
import warnings
from asyncio import base_events, constants, futures, selector_events, transports, trsock
from asyncio.log import logger

from . import _compat
from ._ferroloop import StreamCore

# Addresses are shared between transports (an idle connection's memory is mostly its
# objects): every connection a server accepts has the same sockname, and peers share hosts.
# Tuples and strings are immutable, so sharing equal ones changes nothing but memory.
_shared_addresses = {}
_shared_hosts = {}
_SHARED_MAX = 1024


def _shared_address(addr):
    if type(addr) is not tuple or not addr or type(addr[0]) is not str:
        return addr
    shared = _shared_addresses.get(addr)
    if shared is not None:
        return shared
    if len(_shared_addresses) >= _SHARED_MAX:
        _shared_addresses.clear()
    _shared_addresses[addr] = addr
    return addr


def _shared_host(addr):
    if type(addr) is not tuple or not addr or type(addr[0]) is not str:
        return addr
    host = _shared_hosts.get(addr[0])
    if host is None:
        if len(_shared_hosts) >= _SHARED_MAX:
            _shared_hosts.clear()
        host = _shared_hosts[addr[0]] = addr[0]
        return addr
    return (host, *addr[1:])


def _core_attribute(name):
    """asyncio's private transport attribute ``name``, kept in the native core (the stream,
    datagram and pipe transports use it)."""

    def get(self):
        return getattr(self._core, name)

    def set(self, value):
        setattr(self._core, name, value)

    return property(get, set, doc=f"asyncio's ``{name}`` (native)")


class _SelectorSocketTransport(transports._FlowControlMixin, transports.Transport):
    """A TCP/Unix stream transport with asyncio's semantics and a native core.

    Named as asyncio's class so that its repr is asyncio's. A ``_FlowControlMixin`` as
    asyncio's (``loop.sendfile``'s fallback checks it); its flow-control state lives in the
    core, behind the properties below, which shadow the mixin's slots.
    """

    max_size = 256 * 1024  # Buffer size passed to recv().
    _start_tls_compatible = True
    _sendfile_compatible = constants._SendfileMode.TRY_NATIVE

    # Read by __del__ and __repr__ even when the constructor did not finish.
    _sock = None
    _core = None
    _server = None

    _protocol = _core_attribute("_protocol")
    _protocol_connected = _core_attribute("_protocol_connected")
    _closing = _core_attribute("_closing")
    _conn_lost = _core_attribute("_conn_lost")
    _paused = _core_attribute("_paused")
    _eof = _core_attribute("_eof")
    _empty_waiter = _core_attribute("_empty_waiter")
    _protocol_paused = _core_attribute("_protocol_paused")
    _high_water = _core_attribute("_high_water")
    _low_water = _core_attribute("_low_water")

    def __init__(self, loop, sock, protocol, waiter=None, extra=None, server=None):
        # The mixin's __init__ would set the flow-control state before the core exists.
        transports.BaseTransport.__init__(self, extra)
        self._loop = loop
        self._extra["socket"] = trsock.TransportSocket(sock)
        try:
            self._extra["sockname"] = _shared_address(sock.getsockname())
        except OSError:
            self._extra["sockname"] = None
        if "peername" not in self._extra:
            try:
                self._extra["peername"] = _shared_host(sock.getpeername())
            except OSError:
                self._extra["peername"] = None
        else:
            self._extra["peername"] = _shared_host(self._extra["peername"])
        self._sock_fd = sock.fileno()
        self._core = core = StreamCore(
            loop, self, self._sock_fd, protocol, self.max_size, _compat.WRITELINES_SENDMSG
        )
        # Set once the core exists: __del__ and __repr__ read the core when _sock is set.
        self._sock = sock
        self._server = server
        if server is not None:
            _compat.server_attach(server, self)
        loop._transports[self._sock_fd] = self

        # Disable the Nagle algorithm (asyncio does): small writes go out at once.
        base_events._set_nodelay(sock)

        loop.call_soon(protocol.connection_made, self)
        # Only start reading when connection_made() has been called. The core is its own
        # read callback (a call into Rust, and no bound-method object per connection).
        loop.call_soon(self._add_reader, self._sock_fd, core)
        if waiter is not None:
            # Only wake up the waiter when connection_made() has been called.
            loop.call_soon(futures._set_result_unless_cancelled, waiter, None)

    def __repr__(self):
        info = [self.__class__.__name__]
        if self._sock is None:
            info.append("closed")
        elif self._closing:
            info.append("closing")
        info.append(f"fd={self._sock_fd}")
        # test if the transport was closed
        if self._loop is not None and not self._loop.is_closed():
            polling = selector_events._test_selector_event(
                self._loop._selector, self._sock_fd, selectors.EVENT_READ
            )
            info.append("read=polling" if polling else "read=idle")
            polling = selector_events._test_selector_event(
                self._loop._selector, self._sock_fd, selectors.EVENT_WRITE
            )
            state = "polling" if polling else "idle"
            bufsize = self.get_write_buffer_size()
            info.append(f"write=<{state}, bufsize={bufsize}>")
        return "<{}>".format(" ".join(info))

    def __del__(self, _warn=warnings.warn):
        if self._sock is not None:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self._sock.close()
            if _compat.SERVER_TRACKS_TRANSPORTS and self._server is not None:
                self._server._detach(self)

    # asyncio.WriteTransport / ReadTransport API, on the core.

    def write(self, data):
        # Replaced below by a native method descriptor that does this without a frame;
        # it calls this definition for any other call shape (asyncio's signature, errors).
        self._core.write(data)

    if _compat.WRITELINES_SENDMSG:
        # 3.12+: asyncio's own writelines (one sendmsg). 3.11 inherits WriteTransport's,
        # which joins and calls self.write (a subclass's write override included).

        def writelines(self, list_of_data):
            self._core.writelines(list_of_data)

    def write_eof(self):
        self._core.write_eof()

    def can_write_eof(self):
        return True

    def abort(self):
        self._force_close(None)

    def close(self):
        self._core.close()

    def is_closing(self):
        return self._core.is_closing()

    def set_protocol(self, protocol):
        self._core.set_protocol(protocol)

    def get_protocol(self):
        return self._core.get_protocol()

    def is_reading(self):
        return self._core.is_reading()

    def pause_reading(self):
        self._core.pause_reading()

    def resume_reading(self):
        self._core.resume_reading()

    def get_write_buffer_size(self):
        return self._core.get_write_buffer_size()

    # asyncio's _FlowControlMixin.

    def get_write_buffer_limits(self):
        return (self._low_water, self._high_water)

    def _set_write_buffer_limits(self, high=None, low=None):
        if high is None:
            if low is None:
                high = 64 * 1024
            else:
                high = 4 * low
        if low is None:
            low = high // 4

        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")

        self._high_water = high
        self._low_water = low

    def set_write_buffer_limits(self, high=None, low=None):
        self._set_write_buffer_limits(high=high, low=low)
        self._maybe_pause_protocol()

    def _maybe_pause_protocol(self):
        self._core._maybe_pause_protocol()

    def _maybe_resume_protocol(self):
        self._core._maybe_resume_protocol()

    # asyncio's private methods (sendfile, start_tls and CPython's tests use them).

    def _read_ready(self):
        self._core._read_ready()

    def _write_ready(self):
        self._core._write_ready()

    def _add_reader(self, fd, callback, *args):
        if not self.is_reading():
            return
        self._loop._add_reader(fd, callback, *args)

    def _make_empty_waiter(self):
        return self._core._make_empty_waiter()

    def _reset_empty_waiter(self):
        self._core._reset_empty_waiter()

    def _fatal_error(self, exc, message="Fatal error on transport"):
        # Should be called from exception handler only.
        if isinstance(exc, OSError):
            if self._loop.get_debug():
                # asyncio passes exc_info=True from inside its except clause; the native
                # core calls this outside one, so name the exception itself.
                logger.debug("%r: %s", self, message, exc_info=exc)
        else:
            self._loop.call_exception_handler(
                {
                    "message": message,
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )
        self._force_close(exc)

    def _force_close(self, exc):
        self._core._force_close(exc)

    def _call_connection_lost(self, exc):
        core = self._core
        try:
            if core._protocol_connected:
                core._protocol.connection_lost(exc)
        finally:
            self._sock.close()
            self._sock = None
            core._detach()
            self._loop = None
            server = self._server
            if server is not None:
                _compat.server_detach(server, self)
                self._server = None
        if core._empty_waiter is not None:
            core._empty_waiter.set_exception(ConnectionError("Connection is closed by peer"))


# `transport.write(data)` is a vectorcall into the core: a method descriptor of the class
# (no Python frame per write, and nothing stored per connection). src/transports/method.rs.
_SelectorSocketTransport.write = StreamCore._write_descriptor(
    _SelectorSocketTransport, _SelectorSocketTransport.write
)

SocketTransport = _SelectorSocketTransport
