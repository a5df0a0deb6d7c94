//! The TLS record data path: ferroloop's `sslproto.SSLProtocol` in asyncio's WRAPPED state
//! (decrypt what the socket received and hand it to the application; encrypt what the
//! application writes and send it), without a Python frame in between.
//!
//! `TlsProtocolCore` is a native base of ferroloop's SSLProtocol (next to asyncio's class):
//! it stores the attributes this path reads (`_state`, `_incoming`, `_sslobj`, the pause
//! flags, the water marks...) as fields behind data descriptors, so asyncio's own methods
//! (handshake, shutdown, flow control, timeouts) and this path read and write the same
//! state, and this path reads it without attribute lookups. Every step here is a line of
//! asyncio's `_do_read`, `_do_write` and `_process_outgoing`, in the same order, with the
//! same checks and error routing. The SSLObject's C object, the MemoryBIOs and the
//! application protocol are called through their methods (vectorcall, interned names):
//! OpenSSL stays behind Python's `_ssl` module.

use pyo3::exceptions::{PyException, PyTypeError};
use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PySlice, PyTuple, PyType};
use pyo3::{PyTraverseError, PyVisit};

use super::stream::{self, StreamCore};
use super::{recv_into, would_block, ByteView};
use crate::errors::os_error;

static WRAPPED: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static AGAIN: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static TLS_PROTOCOL: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static SOCKET_TRANSPORT: PyOnceLock<Py<PyType>> = PyOnceLock::new();

const FATAL: &str = "Fatal error on SSL protocol";

/// `asyncio.sslproto.SSLProtocolState.WRAPPED`.
fn wrapped_state(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    WRAPPED
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(
                py.import("asyncio.sslproto")?
                    .getattr("SSLProtocolState")?
                    .getattr("WRAPPED")?
                    .unbind(),
            )
        })
        .map(|s| s.bind(py))
}

/// `err` is one of asyncio's `sslproto.SSLAgainErrors` (SSLWantReadError/SSLWantWriteError).
fn is_again(py: Python<'_>, err: &PyErr) -> PyResult<bool> {
    let again = AGAIN.import(py, "asyncio.sslproto", "SSLAgainErrors")?;
    Ok(err.matches(py, again)?)
}

/// The protocol is exactly ferroloop's SSLProtocol (a subclass may override the data path).
/// loop.py imports `ferroloop.sslproto`, so this never imports anything new.
pub fn is_tls_protocol(protocol: &Bound<'_, PyAny>) -> bool {
    let py = protocol.py();
    match TLS_PROTOCOL.import(py, "ferroloop.sslproto", "SSLProtocol") {
        Ok(t) => protocol.get_type().is(t) && protocol.cast::<TlsProtocolCore>().is_ok(),
        Err(_) => false,
    }
}

/// The attributes of asyncio's `SSLProtocol` that the data path reads, as native fields.
/// Each is a data descriptor of the same name: asyncio's `self._state = ...` lands here.
/// All start as None (asyncio's `__init__` sets every one of them).
#[pyclass(subclass, module = "ferroloop._ferroloop")]
pub struct TlsProtocolCore {
    state: Py<PyAny>,
    /// `_state is WRAPPED`, kept by the `_state` setter.
    wrapped: bool,
    sslobj: Py<PyAny>,
    /// The C object behind `_sslobj` (ssl.SSLObject's read/write/pending only forward to
    /// it, in 3.11-3.13), kept by the `_sslobj` setter.
    sslobj_c: Py<PyAny>,
    /// `read`, `write` and `pending` of `sslobj_c`, bound once (a C object's methods
    /// cannot be replaced): calls without a method lookup.
    sslobj_read: Option<Py<PyAny>>,
    sslobj_write: Option<Py<PyAny>>,
    sslobj_pending: Option<Py<PyAny>>,
    transport: Py<PyAny>,
    /// The native core of `_transport` when it is ferroloop's socket transport.
    core: Option<Py<StreamCore>>,
    incoming: Py<PyAny>,
    /// `_incoming.write` and `_outgoing.read`, bound once.
    incoming_write: Option<Py<PyAny>>,
    outgoing: Py<PyAny>,
    outgoing_read: Option<Py<PyAny>>,
    /// Read and set through methods below: the old protocol goes with the core free.
    _app_protocol: Py<PyAny>,
    #[pyo3(get, set)]
    _app_protocol_is_buffer: Py<PyAny>,
    #[pyo3(get, set)]
    _app_reading_paused: Py<PyAny>,
    #[pyo3(get, set)]
    _ssl_reading_paused: Py<PyAny>,
    #[pyo3(get, set)]
    _ssl_writing_paused: Py<PyAny>,
    #[pyo3(get, set)]
    _app_writing_paused: Py<PyAny>,
    #[pyo3(get, set)]
    _write_backlog: Py<PyAny>,
    #[pyo3(get, set)]
    _write_buffer_size: Py<PyAny>,
    #[pyo3(get, set)]
    _incoming_high_water: Py<PyAny>,
    #[pyo3(get, set)]
    _incoming_low_water: Py<PyAny>,
    #[pyo3(get, set)]
    _outgoing_high_water: Py<PyAny>,
    #[pyo3(get, set)]
    _outgoing_low_water: Py<PyAny>,
    #[pyo3(get, set)]
    _ssl_buffer_view: Py<PyAny>,
}

#[pymethods]
impl TlsProtocolCore {
    /// Arguments are asyncio's `SSLProtocol.__init__`'s, which sets the fields.
    #[new]
    #[pyo3(signature = (*_args, **_kwargs))]
    fn new(
        py: Python<'_>,
        _args: &Bound<'_, PyTuple>,
        _kwargs: Option<&Bound<'_, PyDict>>,
    ) -> Self {
        let none = || py.None();
        TlsProtocolCore {
            state: none(),
            wrapped: false,
            sslobj: none(),
            sslobj_c: none(),
            sslobj_read: None,
            sslobj_write: None,
            sslobj_pending: None,
            transport: none(),
            core: None,
            incoming: none(),
            incoming_write: None,
            outgoing: none(),
            outgoing_read: None,
            _app_protocol: none(),
            _app_protocol_is_buffer: none(),
            _app_reading_paused: none(),
            _ssl_reading_paused: none(),
            _ssl_writing_paused: none(),
            _app_writing_paused: none(),
            _write_backlog: none(),
            _write_buffer_size: none(),
            _incoming_high_water: none(),
            _incoming_low_water: none(),
            _outgoing_high_water: none(),
            _outgoing_low_water: none(),
            _ssl_buffer_view: none(),
        }
    }

    /// A `write` method descriptor for the application transport class `cls`
    /// (`method.rs`), replacing `fallback`, its Python definition.
    #[staticmethod]
    fn _app_write_descriptor<'py>(
        cls: &Bound<'py, PyType>,
        fallback: Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        super::method::tls_write_descriptor(cls, fallback)
    }

    #[getter(_state)]
    fn get_state(&self, py: Python<'_>) -> Py<PyAny> {
        self.state.clone_ref(py)
    }

    #[setter(_state)]
    fn set_state(&mut self, value: Bound<'_, PyAny>) -> PyResult<()> {
        self.wrapped = value.is(wrapped_state(value.py())?);
        self.state = value.unbind();
        Ok(())
    }

    #[getter(_sslobj)]
    fn get_sslobj(&self, py: Python<'_>) -> Py<PyAny> {
        self.sslobj.clone_ref(py)
    }

    #[setter(_sslobj)]
    fn set_sslobj(&mut self, value: Bound<'_, PyAny>) {
        let py = value.py();
        let c = value
            .getattr(intern!(py, "_sslobj"))
            .unwrap_or_else(|_| value.clone());
        // (None before the handshake starts, and after connection_lost in some versions)
        self.sslobj_read = bound_method(&c, intern!(py, "read"));
        self.sslobj_write = bound_method(&c, intern!(py, "write"));
        self.sslobj_pending = bound_method(&c, intern!(py, "pending"));
        self.sslobj_c = c.unbind();
        self.sslobj = value.unbind();
    }

    #[getter(_incoming)]
    fn get_incoming(&self, py: Python<'_>) -> Py<PyAny> {
        self.incoming.clone_ref(py)
    }

    #[setter(_incoming)]
    fn set_incoming(&mut self, value: Bound<'_, PyAny>) {
        let py = value.py();
        self.incoming_write = bound_method(&value, intern!(py, "write"));
        self.incoming = value.unbind();
    }

    #[getter(_outgoing)]
    fn get_outgoing(&self, py: Python<'_>) -> Py<PyAny> {
        self.outgoing.clone_ref(py)
    }

    #[setter(_outgoing)]
    fn set_outgoing(&mut self, value: Bound<'_, PyAny>) {
        let py = value.py();
        self.outgoing_read = bound_method(&value, intern!(py, "read"));
        self.outgoing = value.unbind();
    }

    #[getter(_app_protocol)]
    fn get_app_protocol(&self, py: Python<'_>) -> Py<PyAny> {
        self._app_protocol.clone_ref(py)
    }

    #[setter(_app_protocol)]
    fn set_app_protocol(slf: &Bound<'_, Self>, value: Py<PyAny>) {
        super::replace_field(slf, |s| &mut s._app_protocol, value);
    }

    #[getter(_transport)]
    fn get_transport(&self, py: Python<'_>) -> Py<PyAny> {
        self.transport.clone_ref(py)
    }

    #[setter(_transport)]
    fn set_transport(&mut self, value: Bound<'_, PyAny>) -> PyResult<()> {
        let py = value.py();
        let native = SOCKET_TRANSPORT.import(py, "ferroloop.transports", "SocketTransport")?;
        self.core = None;
        if value.get_type().is(native) {
            if let Ok(core) = value.getattr(intern!(py, "_core")) {
                if let Ok(core) = core.cast_into::<StreamCore>() {
                    self.core = Some(core.unbind());
                }
            }
        }
        self.transport = value.unbind();
        Ok(())
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        for f in [
            &self.state,
            &self.sslobj,
            &self.sslobj_c,
            &self.transport,
            &self.incoming,
            &self.outgoing,
            &self._app_protocol,
            &self._app_protocol_is_buffer,
            &self._app_reading_paused,
            &self._ssl_reading_paused,
            &self._ssl_writing_paused,
            &self._app_writing_paused,
            &self._write_backlog,
            &self._write_buffer_size,
            &self._incoming_high_water,
            &self._incoming_low_water,
            &self._outgoing_high_water,
            &self._outgoing_low_water,
            &self._ssl_buffer_view,
        ] {
            visit.call(f)?;
        }
        for f in [
            &self.sslobj_read,
            &self.sslobj_write,
            &self.sslobj_pending,
            &self.incoming_write,
            &self.outgoing_read,
        ] {
            visit.call(f)?;
        }
        visit.call(&self.core)?;
        Ok(())
    }

    fn __clear__(&mut self, py: Python<'_>) {
        *self = TlsProtocolCore {
            state: py.None(),
            wrapped: false,
            sslobj: py.None(),
            sslobj_c: py.None(),
            sslobj_read: None,
            sslobj_write: None,
            sslobj_pending: None,
            transport: py.None(),
            core: None,
            incoming: py.None(),
            incoming_write: None,
            outgoing: py.None(),
            outgoing_read: None,
            _app_protocol: py.None(),
            _app_protocol_is_buffer: py.None(),
            _app_reading_paused: py.None(),
            _ssl_reading_paused: py.None(),
            _ssl_writing_paused: py.None(),
            _app_writing_paused: py.None(),
            _write_backlog: py.None(),
            _write_buffer_size: py.None(),
            _incoming_high_water: py.None(),
            _incoming_low_water: py.None(),
            _outgoing_high_water: py.None(),
            _outgoing_low_water: py.None(),
            _ssl_buffer_view: py.None(),
        };
    }
}

/// `obj.name`, bound once when the attribute holding `obj` is set; None when the lookup
/// fails (a call then looks it up again and raises what asyncio's call would).
fn bound_method(
    obj: &Bound<'_, PyAny>,
    name: &Bound<'_, pyo3::types::PyString>,
) -> Option<Py<PyAny>> {
    if obj.is_none() {
        return None;
    }
    obj.getattr(name).ok().map(Bound::unbind)
}

type Proto<'a, 'py> = &'a Bound<'py, TlsProtocolCore>;

/// A method bound by `bound_method`, or `obj.name` looked up now.
fn method<'py>(
    p: Proto<'_, 'py>,
    cached: impl FnOnce(&TlsProtocolCore) -> &Option<Py<PyAny>>,
    obj: impl FnOnce(&TlsProtocolCore) -> &Py<PyAny>,
    name: &Bound<'py, pyo3::types::PyString>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = p.py();
    let (m, o) = {
        let s = p.borrow();
        let m = cached(&s).as_ref().map(|m| m.bind(py).clone());
        (m, obj(&s).bind(py).clone())
    };
    match m {
        Some(m) => Ok(m),
        None => o.getattr(name),
    }
}

/// A field, cloned out of a short borrow (no borrow is held across a call into Python:
/// callbacks set these attributes).
fn field<'py>(
    p: Proto<'_, 'py>,
    f: impl FnOnce(&TlsProtocolCore) -> &Py<PyAny>,
) -> Bound<'py, PyAny> {
    f(&p.borrow()).bind(p.py()).clone()
}

fn flag(p: Proto<'_, '_>, f: impl FnOnce(&TlsProtocolCore) -> &Py<PyAny>) -> PyResult<bool> {
    field(p, f).is_truthy()
}

fn int(p: Proto<'_, '_>, f: impl FnOnce(&TlsProtocolCore) -> &Py<PyAny>) -> PyResult<i64> {
    field(p, f).extract()
}

fn set_flag(p: Proto<'_, '_>, value: bool, f: impl FnOnce(&mut TlsProtocolCore) -> &mut Py<PyAny>) {
    let v = pyo3::types::PyBool::new(p.py(), value)
        .to_owned()
        .into_any()
        .unbind();
    *f(&mut p.borrow_mut()) = v;
}

/// `bio.pending` (a MemoryBIO).
fn pending(bio: &Bound<'_, PyAny>) -> PyResult<i64> {
    bio.getattr(intern!(bio.py(), "pending"))?.extract()
}

/// An `Exception` goes to `protocol._fatal_error(exc, message)` (asyncio's
/// `except Exception`); anything else (KeyboardInterrupt, CancelledError...) propagates.
fn fatal_on_exception(p: Proto<'_, '_>, r: PyResult<()>) -> PyResult<()> {
    let py = p.py();
    match r {
        Err(e) if e.is_instance_of::<PyException>(py) => {
            let exc = e.into_value(py).into_bound(py).into_any();
            crate::py::while_handling(&exc, || {
                p.call_method1(intern!(py, "_fatal_error"), (&exc, FATAL))
            })?;
            Ok(())
        }
        r => r,
    }
}

/// What the stream transport does after a read of a TLS protocol (see `read_ready`).
pub enum Read {
    /// Not the WRAPPED data path: read through `get_buffer()`/`buffer_updated()`.
    Fallback,
    WouldBlock,
    Eof,
    Done,
    Failed(PyErr, &'static str),
}

/// The socket is readable and the stream's protocol is ferroloop's SSLProtocol in the
/// WRAPPED state with a `Protocol` application (asyncio's path serves BufferedProtocols):
/// asyncio's `get_buffer(-1)`, `recv_into`, `buffer_updated(n)` in one step, into the
/// protocol's own buffer (`_ssl_buffer_view`, as `get_buffer` returns it).
pub fn read_ready(protocol: &Bound<'_, PyAny>, fd: i32) -> Read {
    let py = protocol.py();
    let Ok(p) = protocol.cast::<TlsProtocolCore>() else {
        return Read::Fallback;
    };
    let view = match (|| {
        let (buffer_view, app_is_buffer) = {
            let s = p.borrow();
            if !s.wrapped {
                return Ok(None);
            }
            (
                s._ssl_buffer_view.bind(py).clone(),
                s._app_protocol_is_buffer.bind(py).clone(),
            )
        };
        if app_is_buffer.is_truthy()? {
            return Ok(None);
        }
        let max_size: usize = p.getattr(intern!(py, "max_size"))?.extract()?;
        let view = ByteView::get(&buffer_view, true)?;
        // get_buffer(-1) would grow the buffer to max_size first: leave that to it.
        Ok::<_, PyErr>((view.len() >= max_size && max_size > 0).then_some(view))
    })() {
        Ok(Some(v)) => v,
        Ok(None) | Err(_) => return Read::Fallback,
    };
    let nbytes = match recv_into(fd, view.as_mut_ptr(), view.len()) {
        Ok(0) => return Read::Eof,
        Ok(n) => n,
        Err(e) if would_block(&e) => return Read::WouldBlock,
        Err(e) => return Read::Failed(os_error(e), "Fatal read error on socket transport"),
    };
    // buffer_updated(nbytes): self._incoming.write(self._ssl_buffer_view[:nbytes]).
    let fed = (|| {
        // SAFETY: the first `nbytes` of the exported buffer were just written by recv; the
        // read-only memoryview is only read by MemoryBIO.write, while `view` pins the buffer.
        let mv = unsafe {
            Bound::from_owned_ptr_or_err(
                py,
                ffi::PyMemoryView_FromMemory(
                    view.as_mut_ptr().cast(),
                    nbytes as ffi::Py_ssize_t,
                    ffi::PyBUF_READ,
                ),
            )?
        };
        method(
            p,
            |s| &s.incoming_write,
            |s| &s.incoming,
            intern!(py, "write"),
        )?
        .call1((&mv,))?;
        Ok::<_, PyErr>(())
    })();
    drop(view);
    match fed.and_then(|()| do_read(p)) {
        Ok(()) => Read::Done,
        Err(e) => Read::Failed(e, "Fatal error: protocol.buffer_updated() call failed."),
    }
}

/// asyncio's `_do_read` in the WRAPPED state for a `Protocol` application (ferroloop's
/// version: stops reading once the BIO and the SSLObject hold nothing more).
fn do_read(p: Proto<'_, '_>) -> PyResult<()> {
    fatal_on_exception(p, do_read_steps(p))
}

fn do_read_steps(p: Proto<'_, '_>) -> PyResult<()> {
    let py = p.py();
    let incoming = field(p, |s| &s.incoming);
    if !flag(p, |s| &s._app_reading_paused)? {
        let read = method(p, |s| &s.sslobj_read, |s| &s.sslobj_c, intern!(py, "read"))?;
        let ssl_pending = method(
            p,
            |s| &s.sslobj_pending,
            |s| &s.sslobj_c,
            intern!(py, "pending"),
        )?;
        let max_size: i64 = p.getattr(intern!(py, "max_size"))?.extract()?;
        let mut eof = false;
        // The first chunk, and the rest when a read returns more than one (rare): no
        // allocation for the usual one.
        let mut first: Option<Bound<'_, PyAny>> = None;
        let mut more: Vec<Bound<'_, PyAny>> = Vec::new();
        // What the BIO and the SSLObject hold bounds what a read can return (a record's
        // plaintext is never longer than its ciphertext): asking for that much instead of
        // max_size returns the same bytes without allocating (and shrinking) a max_size
        // object per read. At least 1: read(0) would return b"" (taken for close_notify).
        //
        // `SSLObject.pending()` releases and retakes the GIL (`_ssl` wraps SSL_pending in
        // Py_BEGIN_ALLOW_THREADS): it is asked only when its answer can be non-zero. A read
        // returns plaintext of the records OpenSSL has processed (one at a time: CPython
        // never sets read_ahead) until the request is filled; a read that returns less than
        // asked for has emptied them, so SSL_pending is then 0. Before the first read, what
        // the SSLObject holds is only needed when the BIO is empty (with ciphertext in the
        // BIO a read happens anyway, and a read that fills the request asks again).
        let ssl_pending = || -> PyResult<i64> { ssl_pending.call0()?.extract() };
        let mut available = pending(&incoming)?;
        if available == 0 {
            available = ssl_pending()?;
        }
        loop {
            let size = if max_size < 1 {
                max_size
            } else {
                available.clamp(1, max_size)
            };
            match read.call1((size,)) {
                Ok(chunk) => {
                    let got = chunk.len()? as i64;
                    if got == 0 {
                        eof = true;
                        break;
                    }
                    if first.is_none() {
                        first = Some(chunk);
                    } else {
                        more.push(chunk);
                    }
                    available = pending(&incoming)?;
                    if got >= size {
                        available += ssl_pending()?;
                    }
                    if available == 0 {
                        break;
                    }
                }
                Err(e) if is_again(py, &e)? => break,
                Err(e) => return Err(e),
            }
        }
        if let Some(first) = first {
            let data = if more.is_empty() {
                first
            } else {
                more.insert(0, first);
                pyo3::types::PyBytes::new(py, b"")
                    .call_method1(intern!(py, "join"), (PyTuple::new(py, &more)?,))?
            };
            drop(more);
            field(p, |s| &s._app_protocol).call_method1(intern!(py, "data_received"), (data,))?;
        }
        if eof {
            // close_notify
            p.call_method0(intern!(py, "_call_eof_received"))?;
            p.call_method0(intern!(py, "_start_shutdown"))?;
        }
        if flag(p, |s| &s._write_backlog)? {
            do_write_steps(p)?;
        } else if pending(&field(p, |s| &s.outgoing))? > 0 || flag(p, |s| &s._app_writing_paused)? {
            // (else nothing is to be sent, and with no backlog the write buffer is empty:
            // no flow-control change either)
            process_outgoing_steps(p)?;
        }
    }
    // asyncio's _control_ssl_reading
    let size = pending(&incoming)?;
    let paused = flag(p, |s| &s._ssl_reading_paused)?;
    if size >= int(p, |s| &s._incoming_high_water)? && !paused {
        set_flag(p, true, |s| &mut s._ssl_reading_paused);
        field(p, |s| &s.transport).call_method0(intern!(py, "pause_reading"))?;
    } else if size <= int(p, |s| &s._incoming_low_water)? && paused {
        set_flag(p, false, |s| &mut s._ssl_reading_paused);
        field(p, |s| &s.transport).call_method0(intern!(py, "resume_reading"))?;
    }
    Ok(())
}

/// `protocol._write_buffer_size += delta`.
fn add_write_buffer_size(p: Proto<'_, '_>, delta: i64) -> PyResult<()> {
    let size = int(p, |s| &s._write_buffer_size)?;
    let v = (size + delta).into_pyobject(p.py())?.into_any().unbind();
    p.borrow_mut()._write_buffer_size = v;
    Ok(())
}

/// asyncio's `_do_write`: encrypt the backlog, then `_process_outgoing`.
fn do_write_steps(p: Proto<'_, '_>) -> PyResult<()> {
    let py = p.py();
    let backlog = field(p, |s| &s._write_backlog);
    let encrypted = (|| {
        while backlog.is_truthy()? {
            let data = backlog.get_item(0)?;
            let write = method(
                p,
                |s| &s.sslobj_write,
                |s| &s.sslobj_c,
                intern!(py, "write"),
            )?;
            let count: usize = write.call1((&data,))?.extract()?;
            let data_len = data.len()?;
            if count < data_len {
                backlog.set_item(
                    0,
                    data.get_item(PySlice::new(py, count as isize, isize::MAX, 1))?,
                )?;
                add_write_buffer_size(p, -(count as i64))?;
            } else {
                backlog.call_method0(intern!(py, "popleft"))?;
                add_write_buffer_size(p, -(data_len as i64))?;
            }
        }
        Ok::<_, PyErr>(())
    })();
    if let Err(e) = encrypted {
        if !is_again(py, &e)? {
            return Err(e);
        }
    }
    process_outgoing_steps(p)
}

/// asyncio's `_process_outgoing` with `_control_app_writing` in line. Ferroloop's own
/// socket transport is written to natively (its `write` is its core's).
fn process_outgoing_steps(p: Proto<'_, '_>) -> PyResult<()> {
    let py = p.py();
    let outgoing = field(p, |s| &s.outgoing);
    if !flag(p, |s| &s._ssl_writing_paused)? {
        let data = method(
            p,
            |s| &s.outgoing_read,
            |s| &s.outgoing,
            intern!(py, "read"),
        )?
        .call0()?;
        if data.is_truthy()? {
            let core = p.borrow().core.as_ref().map(|c| c.clone_ref(py));
            match core {
                Some(core) => stream::write(core.bind(py), &data)?,
                None => {
                    field(p, |s| &s.transport).call_method1(intern!(py, "write"), (data,))?;
                }
            }
        }
    }
    let size = pending(&outgoing)? + int(p, |s| &s._write_buffer_size)?;
    let paused = flag(p, |s| &s._app_writing_paused)?;
    if size >= int(p, |s| &s._outgoing_high_water)? && !paused {
        set_flag(p, true, |s| &mut s._app_writing_paused);
        p.call_method1(intern!(py, "_tell_app_protocol"), ("pause_writing",))?;
    } else if size <= int(p, |s| &s._outgoing_low_water)? && paused {
        set_flag(p, false, |s| &mut s._app_writing_paused);
        p.call_method1(intern!(py, "_tell_app_protocol"), ("resume_writing",))?;
    }
    Ok(())
}

/// `_SSLProtocolTransport.write(data)` (asyncio's checks and messages); in the WRAPPED state
/// the data is encrypted and sent at once.
#[pyfunction]
pub fn tls_app_write(p: &Bound<'_, TlsProtocolCore>, data: &Bound<'_, PyAny>) -> PyResult<()> {
    app_write(p, data)
}

/// `_SSLProtocolTransport.write(data)` on the protocol `p` (see `tls_app_write`).
pub fn app_write(p: &Bound<'_, TlsProtocolCore>, data: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = p.py();
    if !super::is_bytes_like(data) {
        return Err(PyTypeError::new_err(format!(
            "data: expecting a bytes-like instance, got {}",
            data.get_type().name()?
        )));
    }
    if !data.is_truthy()? {
        return Ok(());
    }
    if !p.borrow().wrapped {
        p.call_method1(intern!(py, "_write_appdata"), ((data,),))?;
        return Ok(());
    }
    let backlog = field(p, |s| &s._write_backlog);
    let steps = if backlog.is_truthy()? {
        // asyncio: append to the backlog, then encrypt it in order.
        backlog
            .call_method1(intern!(py, "append"), (data,))
            .and_then(|_| add_write_buffer_size(p, data.len()? as i64))
            .and_then(|()| do_write_steps(p))
    } else {
        // Nothing queued: encrypt `data` directly. The backlog and the write buffer size end
        // as asyncio's append-then-encrypt leaves them (what was not encrypted is queued).
        write_directly(p, &backlog, data)
    };
    fatal_on_exception(p, steps)
}

fn write_directly(
    p: Proto<'_, '_>,
    backlog: &Bound<'_, PyAny>,
    data: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let py = p.py();
    let data_len = data.len()?;
    let queue = |rest: Bound<'_, PyAny>, n: usize| {
        backlog.call_method1(intern!(py, "append"), (rest,))?;
        add_write_buffer_size(p, n as i64)
    };
    let written = method(
        p,
        |s| &s.sslobj_write,
        |s| &s.sslobj_c,
        intern!(py, "write"),
    )
    .and_then(|w| w.call1((data,)));
    match written {
        Ok(count) => {
            let count: usize = count.extract()?;
            if count < data_len {
                queue(
                    data.get_item(PySlice::new(py, count as isize, isize::MAX, 1))?,
                    data_len - count,
                )?;
            }
        }
        Err(e) => {
            queue(data.clone(), data_len)?;
            if !is_again(py, &e)? {
                return Err(e);
            }
        }
    }
    process_outgoing_steps(p)
}

/// `SSLProtocol._do_read` in the WRAPPED state for a `Protocol` application.
#[pyfunction]
pub fn tls_do_read(p: &Bound<'_, TlsProtocolCore>) -> PyResult<()> {
    do_read(p)
}

/// `SSLProtocol._do_write`.
#[pyfunction]
pub fn tls_do_write(p: &Bound<'_, TlsProtocolCore>) -> PyResult<()> {
    do_write_steps(p)
}

/// `SSLProtocol._process_outgoing`.
#[pyfunction]
pub fn tls_process_outgoing(p: &Bound<'_, TlsProtocolCore>) -> PyResult<()> {
    process_outgoing_steps(p)
}
