"""ferroloop's socket and datagram transports: asyncio's own, reading through a buffer
that is reused.

asyncio's transports read with ``sock.recv(max_size)`` / ``sock.recvfrom(max_size)``: a
256 KiB bytes object per read, mapped and unmapped by the allocator each time (that was most
of a small-message round trip). These read into a buffer that lives as long as the thread
and copy out exactly the bytes received, with the same results and errors; everything else is
asyncio's transport for the running Python.
"""

import threading
from asyncio import selector_events

from ._ferroloop import recv as _recv

_local = threading.local()


def _datagram_buffer(size):
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < size:
        buf = _local.buf = memoryview(bytearray(size))
    return buf


class SocketTransport(selector_events._SelectorSocketTransport):
    def _read_ready__data_received(self):
        # asyncio's method (identical in 3.9-3.13) with the native read.
        if self._conn_lost:
            return
        try:
            data = _recv(self._sock_fd, self.max_size)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 (asyncio reports every error)
            self._fatal_error(exc, "Fatal read error on socket transport")
            return

        if not data:
            self._read_ready__on_eof()
            return

        try:
            self._protocol.data_received(data)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 (asyncio reports every error)
            self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")


class DatagramTransport(selector_events._SelectorDatagramTransport):
    def _read_ready(self):
        # asyncio's method (identical in 3.11-3.13) with a reused receive buffer.
        if self._conn_lost:
            return
        try:
            buf = _datagram_buffer(self.max_size)
            nbytes, addr = self._sock.recvfrom_into(buf, self.max_size)
            data = bytes(buf[:nbytes])
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._protocol.error_received(exc)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 (asyncio reports every error)
            self._fatal_error(exc, "Fatal read error on datagram transport")
        else:
            self._protocol.datagram_received(data, addr)
