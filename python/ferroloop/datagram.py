"""ferroloop's datagram (UDP and AF_UNIX datagram) transport.

``_SelectorDatagramTransport`` is asyncio's own class for the running Python (so close,
abort, ``_sendto_ready``, ``_fatal_error``, reprs, ``get_extra_info`` and the base classes are
asyncio's), with its two hot paths on a native ``_ferroloop.DatagramCore``: the read (one
``recvfrom`` into a reused buffer, one ``bytes`` per datagram, the sender's address object
reused while the sender stays the same) and ``sendto`` when nothing is queued. The state
those paths read (``_protocol``, ``_conn_lost``, ``_buffer``, ``_address``) lives in the core.
"""

import socket
from asyncio import selector_events

from . import _compat
from ._ferroloop import DatagramCore
from .transports import _core_attribute

_NATIVE_FAMILIES = frozenset({socket.AF_INET, socket.AF_INET6, socket.AF_UNIX})
_asyncio_sendto = selector_events._SelectorDatagramTransport.sendto


class _SelectorDatagramTransport(selector_events._SelectorDatagramTransport):
    """asyncio's datagram transport with a native read and send. Named as asyncio's class so
    that its repr is asyncio's."""

    _core = None

    _protocol = _core_attribute("_protocol")
    _conn_lost = _core_attribute("_conn_lost")
    _buffer = _core_attribute("_buffer")
    _address = _core_attribute("_address")

    def __init__(self, loop, sock, protocol, address=None, waiter=None, extra=None):
        # The core exists before asyncio's constructor, which sets the attributes above.
        self._core = DatagramCore(
            loop,
            self,
            sock,
            sock.fileno(),
            self.max_size,
            sock.family in _NATIVE_FAMILIES,
            _asyncio_sendto,
        )
        super().__init__(loop, sock, protocol, address, waiter, extra)
        self._core.connected = bool(self._extra["peername"])
        # transport.sendto(...) calls the core directly: no Python frame per datagram.
        self.sendto = self._core.sendto

    @property
    def _read_ready(self):
        # The core is the reader callback itself (asyncio registers self._read_ready).
        return self._core

    def sendto(self, data, addr=None):
        # Bound to the core's sendto on each instance; kept for callers that go through the
        # class (and for help()).
        self._core.sendto(data, addr)

    def _queue_datagram(self, data, addr):
        # asyncio's sendto after a send that would block (the writer is registered).
        self._buffer.append((bytes(data), addr))
        self._buffer_size += len(data) + _compat.DATAGRAM_HEADER_SIZE
        self._maybe_pause_protocol()

    def _call_connection_lost(self, exc):
        try:
            super()._call_connection_lost(exc)
        finally:
            self._core._detach()
