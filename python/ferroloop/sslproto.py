"""ferroloop's TLS protocol: asyncio's ``sslproto.SSLProtocol`` with a shorter data path.

asyncio's TLS layer (the same in 3.11-3.13) moves every record through a chain of small
methods (``buffer_updated`` -> ``_do_read`` -> ``_do_read__copied`` -> ``_process_outgoing``
-> ``_control_app_writing`` -> ``_get_write_buffer_size`` ...), and reads the ``SSLObject``
until it raises ``SSLWantReadError``: an exception per received record. This subclass keeps
every state, rule and error path of asyncio's class and overrides only the data path of the
WRAPPED state:

- the steps are done in one method each for reading and writing (same order, same checks);
- it stops reading when the incoming buffer and the ``SSLObject`` have nothing left, instead of
  reading once more to get ``SSLWantReadError`` (a read then could only raise it);
- it calls the ``SSLObject``'s C object directly (``ssl.SSLObject`` only forwards to it).

Everything else (handshake, shutdown, flow control rules, timeouts, the application transport)
is asyncio's own class for the running Python.
"""

from asyncio import constants, sslproto
from asyncio.log import logger

_WRAPPED = sslproto.SSLProtocolState.WRAPPED
_FLUSHING = sslproto.SSLProtocolState.FLUSHING
_SHUTDOWN = sslproto.SSLProtocolState.SHUTDOWN
_UNWRAPPED = sslproto.SSLProtocolState.UNWRAPPED
_DO_HANDSHAKE = sslproto.SSLProtocolState.DO_HANDSHAKE
_CLOSED_STATES = (_FLUSHING, _SHUTDOWN, _UNWRAPPED)
_AGAIN = sslproto.SSLAgainErrors


def _native(sslobj):
    # ssl.SSLObject's read/write/pending are Python methods that call the same methods of
    # its C object (ssl.py, 3.11-3.13): call those directly.
    try:
        return sslobj._sslobj
    except AttributeError:
        return sslobj


class _SSLProtocolTransport(sslproto._SSLProtocolTransport):
    """asyncio's transport of the application side (same name: code and tests read it),
    writing without an extra step."""

    def write(self, data):
        """Write some data bytes to the transport (asyncio's checks and semantics)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data: expecting a bytes-like instance, got {type(data).__name__}")
        if not data:
            return
        proto = self._ssl_protocol
        if proto._state is _WRAPPED:
            proto._write_backlog.append(data)
            proto._write_buffer_size += len(data)
            try:
                proto._do_write()
            except Exception as ex:  # noqa: BLE001 (asyncio: any error is fatal here)
                proto._fatal_error(ex, "Fatal error on SSL protocol")
        else:
            proto._write_appdata((data,))


class SSLProtocol(sslproto.SSLProtocol):
    """asyncio's SSLProtocol with the WRAPPED-state data path in fewer steps."""

    def _get_app_transport(self):
        if self._app_transport is None:
            if self._app_transport_created:
                raise RuntimeError("Creating _SSLProtocolTransport twice")
            self._app_transport = _SSLProtocolTransport(self._loop, self)
            self._app_transport_created = True
        return self._app_transport

    def buffer_updated(self, nbytes):
        self._incoming.write(self._ssl_buffer_view[:nbytes])
        state = self._state
        if state is _WRAPPED:
            self._do_read()
        elif state is _DO_HANDSHAKE:
            self._do_handshake()
        elif state is _FLUSHING:
            self._do_flush()
        elif state is _SHUTDOWN:
            self._do_shutdown()

    def _do_read(self):
        if self._state is not _WRAPPED or self._app_protocol_is_buffer:
            # FLUSHING and buffered application protocols: asyncio's path.
            return super()._do_read()
        incoming = self._incoming
        try:
            if not self._app_reading_paused:
                # asyncio's _do_read__copied, stopping once nothing is left to decrypt.
                sslobj = _native(self._sslobj)
                max_size = self.max_size
                chunk = b"1"
                data = None
                try:
                    while True:
                        chunk = sslobj.read(max_size)
                        if not chunk:
                            break
                        if data is None:
                            data = chunk
                        elif type(data) is list:
                            data.append(chunk)
                        else:
                            data = [data, chunk]
                        if not incoming.pending and not sslobj.pending():
                            break
                except _AGAIN:
                    pass
                if data is not None:
                    self._app_protocol.data_received(
                        data if type(data) is not list else b"".join(data)
                    )
                if not chunk:
                    # close_notify
                    self._call_eof_received()
                    self._start_shutdown()
                if self._write_backlog:
                    self._do_write()
                elif self._outgoing.pending or self._app_writing_paused:
                    # (else there is nothing to send, and with no backlog the write
                    # buffer is empty: no flow-control change either)
                    self._process_outgoing()
            # asyncio's _control_ssl_reading
            size = incoming.pending
            if size >= self._incoming_high_water and not self._ssl_reading_paused:
                self._ssl_reading_paused = True
                self._transport.pause_reading()
            elif size <= self._incoming_low_water and self._ssl_reading_paused:
                self._ssl_reading_paused = False
                self._transport.resume_reading()
        except Exception as ex:  # noqa: BLE001 (asyncio: any error is fatal here)
            self._fatal_error(ex, "Fatal error on SSL protocol")

    def _write_appdata(self, list_of_data):
        if self._state in _CLOSED_STATES:
            if self._conn_lost >= constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                logger.warning("SSL connection is closed")
            self._conn_lost += 1
            return

        for data in list_of_data:
            self._write_backlog.append(data)
            self._write_buffer_size += len(data)

        try:
            if self._state is _WRAPPED:
                self._do_write()
        except Exception as ex:  # noqa: BLE001 (asyncio: any error is fatal here)
            self._fatal_error(ex, "Fatal error on SSL protocol")

    def _do_write(self):
        backlog = self._write_backlog
        sslobj = _native(self._sslobj)
        try:
            while backlog:
                data = backlog[0]
                count = sslobj.write(data)
                data_len = len(data)
                if count < data_len:
                    backlog[0] = data[count:]
                    self._write_buffer_size -= count
                else:
                    del backlog[0]
                    self._write_buffer_size -= data_len
        except _AGAIN:
            pass
        self._process_outgoing()

    def _process_outgoing(self):
        # asyncio's, with _control_app_writing in line.
        if not self._ssl_writing_paused:
            data = self._outgoing.read()
            if data:
                self._transport.write(data)
        size = self._outgoing.pending + self._write_buffer_size
        if size >= self._outgoing_high_water and not self._app_writing_paused:
            self._app_writing_paused = True
            self._tell_app_protocol("pause_writing")
        elif size <= self._outgoing_low_water and self._app_writing_paused:
            self._app_writing_paused = False
            self._tell_app_protocol("resume_writing")

    def _tell_app_protocol(self, method):
        # asyncio's calls of pause_writing()/resume_writing(): errors go to the handler.
        try:
            getattr(self._app_protocol, method)()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 (asyncio reports every error)
            self._loop.call_exception_handler(
                {
                    "message": f"protocol.{method}() failed",
                    "exception": exc,
                    "transport": self._app_transport,
                    "protocol": self,
                }
            )
