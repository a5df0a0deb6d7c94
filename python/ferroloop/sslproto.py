"""ferroloop's TLS protocol: asyncio's ``sslproto.SSLProtocol`` with a native data path.

asyncio's TLS layer (the same in 3.11-3.13) moves every record through a chain of small
methods (``buffer_updated`` -> ``_do_read`` -> ``_do_read__copied`` -> ``_process_outgoing``
-> ``_control_app_writing`` -> ``_get_write_buffer_size`` ...), and reads the ``SSLObject``
until it raises ``SSLWantReadError``: an exception per received record. This subclass keeps
every state, rule and error path of asyncio's class and moves only the data path of the
WRAPPED state into native code (``src/transports/tls.rs``):

- on ferroloop's socket transport, a readable socket is read into the protocol's buffer,
  fed to the incoming BIO, decrypted and handed to ``data_received`` without a Python frame
  of ferroloop's; what the application writes is encrypted and sent the same way;
- the steps are asyncio's (same order, same checks, same state in the same attributes);
- it stops reading when the incoming buffer and the ``SSLObject`` have nothing left, instead of
  reading once more to get ``SSLWantReadError`` (a read then could only raise it);
- it calls the ``SSLObject``'s C object directly (``ssl.SSLObject`` only forwards to it).

Everything else (handshake, shutdown, flow control rules, timeouts, BufferedProtocol
applications, other transports' reads) is asyncio's own class for the running Python.
"""

from asyncio import sslproto

from ._ferroloop import (
    TlsProtocolCore,
    tls_app_write,
    tls_do_read,
    tls_do_write,
    tls_process_outgoing,
)

_WRAPPED = sslproto.SSLProtocolState.WRAPPED
_FLUSHING = sslproto.SSLProtocolState.FLUSHING
_SHUTDOWN = sslproto.SSLProtocolState.SHUTDOWN
_DO_HANDSHAKE = sslproto.SSLProtocolState.DO_HANDSHAKE


class _SSLProtocolTransport(sslproto._SSLProtocolTransport):
    """asyncio's transport of the application side (same name: code and tests read it),
    writing natively."""

    def write(self, data):
        """Write some data bytes to the transport (asyncio's checks and semantics)."""
        # Replaced below by a native method descriptor (no frame per write); it calls this
        # definition for any other call shape, and once the connection is lost (no
        # protocol): asyncio's method then raises what it raises there.
        ssl_protocol = self._ssl_protocol
        if ssl_protocol is None:
            return sslproto._SSLProtocolTransport.write(self, data)
        tls_app_write(ssl_protocol, data)


_SSLProtocolTransport.write = TlsProtocolCore._app_write_descriptor(
    _SSLProtocolTransport, _SSLProtocolTransport.write
)


class SSLProtocol(sslproto.SSLProtocol, TlsProtocolCore):
    """asyncio's SSLProtocol with the WRAPPED-state data path in native code.

    ``TlsProtocolCore`` holds the attributes that path reads (``_state``, the BIOs, the
    pause flags, the water marks...) as native fields; asyncio's methods use them as
    ever (they are data descriptors of the same names).
    """

    def _get_app_transport(self):
        if self._app_transport is None:
            if self._app_transport_created:
                raise RuntimeError("Creating _SSLProtocolTransport twice")
            self._app_transport = _SSLProtocolTransport(self._loop, self)
            self._app_transport_created = True
        return self._app_transport

    def buffer_updated(self, nbytes):
        # Reads of other transports, and of ferroloop's outside the WRAPPED state.
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
        tls_do_read(self)

    def _do_write(self):
        tls_do_write(self)

    def _process_outgoing(self):
        tls_process_outgoing(self)

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
