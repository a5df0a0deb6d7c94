"""ferroloop's pipe transports (``connect_read_pipe``/``connect_write_pipe``, subprocess pipes).

The classes are asyncio's own ``unix_events._UnixReadPipeTransport`` and
``_UnixWritePipeTransport`` (so the fd-kind checks, close, abort, write_eof, reprs, the
flush on writability and EOF/broken-pipe handling are asyncio's for the running Python) with
their hot paths on native cores: the read pipe's read (one ``read`` into a reused buffer,
one ``bytes`` per read) and the write pipe's ``write`` when nothing is queued. The state
those paths read lives in the cores.
"""

import errno
from asyncio import unix_events
from asyncio.log import logger

from ._ferroloop import ReadPipeCore, WritePipeCore
from .transports import _core_attribute

_asyncio_write = unix_events._UnixWritePipeTransport.write


class _UnixReadPipeTransport(unix_events._UnixReadPipeTransport):
    """asyncio's read pipe transport with a native read. Named as asyncio's class so that
    its repr is asyncio's."""

    _core = None
    _pipe = None  # Read by __del__ when the constructor raised early.

    _protocol = _core_attribute("_protocol")

    def __init__(self, loop, pipe, protocol, waiter=None, extra=None):
        self._core = ReadPipeCore(self, pipe.fileno(), self.max_size)
        super().__init__(loop, pipe, protocol, waiter, extra)

    @property
    def _read_ready(self):
        # The core is the reader callback itself (asyncio registers self._read_ready).
        return self._core

    def _read_eof(self):
        # asyncio's _read_ready once os.read() returned b"".
        if self._loop.get_debug():
            logger.info("%r was closed by peer", self)
        self._closing = True
        self._loop._remove_reader(self._fileno)
        self._loop.call_soon(self._protocol.eof_received)
        self._loop.call_soon(self._call_connection_lost, None)

    def _fatal_error(self, exc, message="Fatal error on pipe transport"):
        # asyncio's, but the native read calls it outside an except clause: name exc itself.
        if isinstance(exc, OSError) and exc.errno == errno.EIO:
            if self._loop.get_debug():
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
        self._close(exc)

    def _call_connection_lost(self, exc):
        try:
            super()._call_connection_lost(exc)
        finally:
            self._core._detach()


class _UnixWritePipeTransport(unix_events._UnixWritePipeTransport):
    """asyncio's write pipe transport with a native write. Named as asyncio's class so that
    its repr is asyncio's."""

    _core = None
    _pipe = None  # Read by __del__ when the constructor raised early.

    _buffer = _core_attribute("_buffer")
    _conn_lost = _core_attribute("_conn_lost")
    _closing = _core_attribute("_closing")

    def __init__(self, loop, pipe, protocol, waiter=None, extra=None):
        self._core = WritePipeCore(loop, self, pipe.fileno(), _asyncio_write)
        super().__init__(loop, pipe, protocol, waiter, extra)
        # transport.write(...) calls the core directly: no Python frame per write.
        self.write = self._core.write

    def write(self, data):
        # Bound to the core's write on each instance; kept for callers that go through the
        # class (and for help()).
        self._core.write(data)

    def _fatal_error(self, exc, message="Fatal error on pipe transport"):
        # asyncio's, but the native write calls it outside an except clause: name exc itself.
        if isinstance(exc, OSError):
            if self._loop.get_debug():
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
        self._close(exc)

    def _call_connection_lost(self, exc):
        try:
            super()._call_connection_lost(exc)
        finally:
            self._core._detach()
