//! The native core of the TCP/Unix stream transport (asyncio's
//! `selector_events._SelectorSocketTransport`): reads, writes, the write buffer, flow
//! control, close/abort. `ferroloop.transports._SelectorSocketTransport` (an
//! `asyncio.Transport` subclass) owns one and keeps the cold paths (repr, `__del__`,
//! `_fatal_error`, `_call_connection_lost`, extra info) in Python.
//!
//! File descriptors: the socket is owned by the `socket.socket` the Python transport holds
//! (closed in its `_call_connection_lost`); the core only borrows the fd number and makes no
//! syscall on it once `conn_lost` is set or the transport is closing with an empty buffer.
//!
//! Borrows of the core are never held across a call into Python: protocol callbacks
//! re-enter the transport (`data_received` calls `write`).

use std::os::unix::io::RawFd;

use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyType};
use pyo3::{PyTraverseError, PyVisit};

use super::tls::{is_tls_protocol, Read as TlsRead};
use super::{
    buffered_protocol, is_exit, logger, recv_into, replace_field, send, sendmsg, shutdown_write,
    would_block, ByteView, WriteBuffer, DEFAULT_HIGH_WATER, IOV_MAX,
    LOG_THRESHOLD_FOR_CONNLOST_WRITES,
};
use crate::errors::os_error;
use crate::sockets::recv_bytes;

#[pyclass(module = "ferroloop._ferroloop")]
pub struct StreamCore {
    fd: RawFd,
    /// The loop, the Python transport and the protocol; None once the connection is lost
    /// (asyncio sets `_loop` and `_protocol` to None there).
    loop_: Py<PyAny>,
    transport: Py<PyAny>,
    protocol: Py<PyAny>,
    /// The protocol is a BufferedProtocol: read into its `get_buffer()`.
    buffered: bool,
    /// The protocol is ferroloop's SSLProtocol: its WRAPPED state reads natively (tls.rs).
    tls: bool,
    protocol_connected: bool,
    buffer: WriteBuffer,
    /// The water marks as the buffer size is compared with them, and as they were given:
    /// asyncio keeps any number (a float, an int larger than memory), so the core does too.
    high_water: WaterMark,
    low_water: WaterMark,
    protocol_paused: bool,
    /// asyncio's `_conn_lost`: set when `connection_lost` is scheduled, then counts writes.
    conn_lost: usize,
    closing: bool,
    paused: bool,
    eof: bool,
    empty_waiter: Option<Py<PyAny>>,
    max_size: usize,
    /// asyncio 3.12+'s `writelines` (its own checks and messages; one `sendmsg`); 3.11 joins.
    writelines_sendmsg: bool,
}

/// A write-buffer water mark: the number it was given (read back as is) and that number as
/// the buffer size is compared with it.
struct WaterMark {
    /// None: the default, `limit` as an int (no object per connection until one is set).
    value: Option<Py<PyAny>>,
    limit: f64,
}

impl WaterMark {
    fn new(n: usize) -> Self {
        WaterMark {
            value: None,
            limit: n as f64,
        }
    }

    fn get(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match &self.value {
            Some(v) => Ok(v.clone_ref(py)),
            None => Ok((self.limit as u64).into_pyobject(py)?.into_any().unbind()),
        }
    }

    /// Any real number; an int too large for a float is beyond any buffer size (or below).
    fn from_value(value: &Bound<'_, PyAny>) -> PyResult<Self> {
        let py = value.py();
        let limit = match value.extract::<f64>() {
            Ok(v) => v,
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyOverflowError>(py) => {
                if value.gt(0)? {
                    f64::INFINITY
                } else {
                    f64::NEG_INFINITY
                }
            }
            Err(e) => return Err(e),
        };
        Ok(WaterMark {
            value: Some(value.clone().unbind()),
            limit,
        })
    }
}

fn loop_of<'py>(slf: &Bound<'py, StreamCore>) -> (Bound<'py, PyAny>, RawFd) {
    let s = slf.borrow();
    (s.loop_.bind(slf.py()).clone(), s.fd)
}

fn remove_reader(slf: &Bound<'_, StreamCore>) -> PyResult<()> {
    let (lp, fd) = loop_of(slf);
    lp.call_method1(intern!(slf.py(), "_remove_reader"), (fd,))?;
    Ok(())
}

fn remove_writer(slf: &Bound<'_, StreamCore>) -> PyResult<()> {
    let (lp, fd) = loop_of(slf);
    lp.call_method1(intern!(slf.py(), "_remove_writer"), (fd,))?;
    Ok(())
}

fn add_writer(slf: &Bound<'_, StreamCore>) -> PyResult<()> {
    let py = slf.py();
    let (lp, fd) = loop_of(slf);
    let cb = slf.getattr(intern!(py, "_write_ready"))?;
    lp.call_method1(intern!(py, "_add_writer"), (fd, cb))?;
    Ok(())
}

/// The core is its own read callback (`__call__`): no bound-method object per connection.
fn add_reader(slf: &Bound<'_, StreamCore>) -> PyResult<()> {
    let py = slf.py();
    let (lp, fd) = loop_of(slf);
    lp.call_method1(intern!(py, "_add_reader"), (fd, slf))?;
    Ok(())
}

/// `logger.debug(fmt, transport)` when the loop is in debug mode.
fn debug_log(slf: &Bound<'_, StreamCore>, fmt: &str) -> PyResult<()> {
    let py = slf.py();
    let (lp, transport) = {
        let s = slf.borrow();
        (s.loop_.clone_ref(py), s.transport.clone_ref(py))
    };
    let lp = lp.into_bound(py);
    if lp.is_none() || !lp.call_method0(intern!(py, "get_debug"))?.is_truthy()? {
        return Ok(());
    }
    logger(py)?.call_method1(intern!(py, "debug"), (fmt, transport))?;
    Ok(())
}

/// asyncio's `self._fatal_error(exc, message)`, through the Python transport (which logs or
/// calls the exception handler, then force-closes). KeyboardInterrupt/SystemExit propagate.
fn fatal_error(slf: &Bound<'_, StreamCore>, err: PyErr, message: &str) -> PyResult<()> {
    let transport = slf.borrow().transport.clone_ref(slf.py());
    super::fatal_error(transport.bind(slf.py()), err, message)
}

fn fatal_error_value(
    slf: &Bound<'_, StreamCore>,
    exc: Bound<'_, PyAny>,
    message: &str,
) -> PyResult<()> {
    let transport = slf.borrow().transport.clone_ref(slf.py());
    super::call_fatal_error(transport.bind(slf.py()), &exc, message)
}

/// `loop.call_exception_handler({...})` for a failing pause_writing/resume_writing.
fn report_flow_error(slf: &Bound<'_, StreamCore>, err: PyErr, message: &str) -> PyResult<()> {
    let py = slf.py();
    if is_exit(py, &err) {
        return Err(err);
    }
    let (lp, transport, protocol) = {
        let s = slf.borrow();
        (
            s.loop_.clone_ref(py),
            s.transport.clone_ref(py),
            s.protocol.clone_ref(py),
        )
    };
    let ctx = PyDict::new(py);
    ctx.set_item("message", message)?;
    let exc = err.into_value(py).into_bound(py).into_any();
    ctx.set_item("exception", &exc)?;
    ctx.set_item("transport", transport)?;
    ctx.set_item("protocol", protocol)?;
    crate::py::while_handling(&exc, || {
        lp.bind(py)
            .call_method1(intern!(py, "call_exception_handler"), (ctx,))
    })?;
    Ok(())
}

fn maybe_pause_protocol(slf: &Bound<'_, StreamCore>) -> PyResult<()> {
    let py = slf.py();
    let protocol = {
        let mut s = slf.borrow_mut();
        if s.buffer.len() as f64 <= s.high_water.limit || s.protocol_paused {
            return Ok(());
        }
        s.protocol_paused = true;
        s.protocol.clone_ref(py)
    };
    if let Err(e) = protocol.bind(py).call_method0(intern!(py, "pause_writing")) {
        report_flow_error(slf, e, "protocol.pause_writing() failed")?;
    }
    Ok(())
}

fn maybe_resume_protocol(slf: &Bound<'_, StreamCore>) -> PyResult<()> {
    let py = slf.py();
    let protocol = {
        let mut s = slf.borrow_mut();
        if !(s.protocol_paused && s.buffer.len() as f64 <= s.low_water.limit) {
            return Ok(());
        }
        s.protocol_paused = false;
        s.protocol.clone_ref(py)
    };
    if let Err(e) = protocol
        .bind(py)
        .call_method0(intern!(py, "resume_writing"))
    {
        report_flow_error(slf, e, "protocol.resume_writing() failed")?;
    }
    Ok(())
}

/// A write on a transport whose connection is lost: counted, and asyncio's warning once
/// there have been a few. Returns true when the connection is lost.
fn lost_write(slf: &Bound<'_, StreamCore>) -> PyResult<bool> {
    let n = slf.borrow().conn_lost;
    if n == 0 {
        return Ok(false);
    }
    if n >= LOG_THRESHOLD_FOR_CONNLOST_WRITES {
        let py = slf.py();
        logger(py)?.call_method1(intern!(py, "warning"), ("socket.send() raised exception.",))?;
    }
    slf.borrow_mut().conn_lost += 1;
    Ok(true)
}

pub(super) fn write(slf: &Bound<'_, StreamCore>, data: &Bound<'_, PyAny>) -> PyResult<()> {
    if !super::is_bytes_like(data) {
        return Err(PyTypeError::new_err(format!(
            "data argument must be a bytes-like object, not '{}'",
            data.get_type().name()?
        )));
    }
    // One borrow for the state the checks and the send read (nothing below runs Python
    // code before the send: a buffer export of a bytearray or memoryview is C).
    let (fd, empty, lost) = {
        let s = slf.borrow();
        if s.eof {
            return Err(PyRuntimeError::new_err(
                "Cannot call write() after write_eof()",
            ));
        }
        if s.empty_waiter.is_some() {
            return Err(PyRuntimeError::new_err(
                "unable to write; sendfile is in progress",
            ));
        }
        (s.fd, s.buffer.is_empty(), s.conn_lost > 0)
    };
    // bytes (what TLS records and most writes are) are read in place: no buffer export.
    // (Exactly bytes: a 3.12+ subclass may define its own __buffer__.)
    let exact = data.cast_exact::<PyBytes>().ok();
    let view = match exact {
        Some(_) => None,
        None => match ByteView::get(data, false) {
            Ok(v) => Some(v),
            Err(e) => return write_strided(slf, data, e, empty, lost),
        },
    };
    let bytes = match (&exact, &view) {
        (Some(b), _) => b.as_bytes(),
        (None, Some(v)) => v.as_slice(),
        (None, None) => &[],
    };
    if bytes.is_empty() || (lost && lost_write(slf)?) {
        return Ok(());
    }
    if !empty {
        slf.borrow_mut().buffer.extend(bytes);
        drop(view);
        return maybe_pause_protocol(slf);
    }
    // Nothing queued: try to send now.
    let sent = match send(fd, bytes) {
        Ok(n) if n == bytes.len() => return Ok(()),
        Ok(n) => n,
        Err(e) if would_block(&e) => 0,
        Err(e) => {
            drop(view);
            return fatal_error(slf, os_error(e), "Fatal write error on socket transport");
        }
    };
    // Not all was written: register the writer, then queue the rest.
    add_writer(slf)?;
    slf.borrow_mut().buffer.extend(&bytes[sent..]);
    drop(view);
    maybe_pause_protocol(slf)
}

/// `write()` of a memoryview with no contiguous buffer (a strided slice), as asyncio: it is
/// handed to `sock.send`, whose BufferError is a fatal write error, or, with data already
/// queued, refused by the copy into the buffer (3.11's `bytearray.extend`; ferroloop's write
/// copies as 3.11's on every version).
fn write_strided(
    slf: &Bound<'_, StreamCore>,
    data: &Bound<'_, PyAny>,
    err: PyErr,
    empty: bool,
    lost: bool,
) -> PyResult<()> {
    // asyncio's `if not data: return` (a released memoryview raises there).
    if data.len()? == 0 || (lost && lost_write(slf)?) {
        return Ok(());
    }
    if empty {
        return fatal_error(slf, err, "Fatal write error on socket transport");
    }
    Err(PyTypeError::new_err(
        "can't set bytearray slice from memoryview",
    ))
}

/// asyncio 3.12+'s `writelines`: the buffers go out in one `sendmsg` when nothing is queued.
fn writelines_sendmsg(slf: &Bound<'_, StreamCore>, list: &Bound<'_, PyAny>) -> PyResult<()> {
    {
        let s = slf.borrow();
        if s.eof {
            return Err(PyRuntimeError::new_err(
                "Cannot call writelines() after write_eof()",
            ));
        }
        if s.empty_waiter.is_some() {
            return Err(PyRuntimeError::new_err(
                "unable to writelines; sendfile is in progress",
            ));
        }
    }
    if !list.is_truthy()? {
        return Ok(());
    }
    let mut views = Vec::new();
    for item in list.try_iter()? {
        views.push(ByteView::get(&item?, false)?);
    }
    if lost_write(slf)? {
        return Ok(());
    }
    let (fd, empty) = {
        let s = slf.borrow();
        (s.fd, s.buffer.is_empty())
    };
    if !empty {
        {
            let mut s = slf.borrow_mut();
            for v in &views {
                s.buffer.extend(v.as_slice());
            }
        }
        drop(views);
        write_ready(slf)?;
        if !slf.borrow().buffer.is_empty() {
            add_writer(slf)?;
        }
        return Ok(());
    }
    let slices: Vec<&[u8]> = views
        .iter()
        .map(|v| v.as_slice())
        .filter(|b| !b.is_empty())
        .collect();
    let total: usize = slices.iter().map(|b| b.len()).sum();
    if total == 0 {
        return Ok(());
    }
    let mut sent = match sendmsg(fd, &slices[..slices.len().min(IOV_MAX)]) {
        Ok(n) => n,
        Err(e) if would_block(&e) => 0,
        Err(e) => {
            drop(slices);
            drop(views);
            // asyncio's _write_sendmsg error path (nothing was queued, so no waiter either).
            remove_writer(slf)?;
            return fatal_error(slf, os_error(e), "Fatal write error on socket transport");
        }
    };
    if sent == total {
        return Ok(());
    }
    {
        let mut s = slf.borrow_mut();
        for b in &slices {
            if sent >= b.len() {
                sent -= b.len();
            } else {
                s.buffer.extend(&b[sent..]);
                sent = 0;
            }
        }
    }
    drop(slices);
    drop(views);
    add_writer(slf)
}

fn write_ready(slf: &Bound<'_, StreamCore>) -> PyResult<()> {
    let py = slf.py();
    let res = {
        let s = slf.borrow();
        if s.conn_lost > 0 {
            return Ok(());
        }
        send(s.fd, s.buffer.pending())
    };
    match res {
        Err(e) if would_block(&e) => Ok(()),
        Err(e) => {
            remove_writer(slf)?;
            let dropped = std::mem::take(&mut slf.borrow_mut().buffer);
            drop(dropped);
            let exc = os_error(e).into_value(py).into_bound(py).into_any();
            fatal_error_value(slf, exc.clone(), "Fatal write error on socket transport")?;
            let waiter = slf.borrow().empty_waiter.as_ref().map(|w| w.clone_ref(py));
            if let Some(w) = waiter {
                w.bind(py)
                    .call_method1(intern!(py, "set_exception"), (exc,))?;
            }
            Ok(())
        }
        Ok(n) => {
            slf.borrow_mut().buffer.consume(n);
            maybe_resume_protocol(slf)?; // May append to the buffer.
            if !slf.borrow().buffer.is_empty() {
                return Ok(());
            }
            remove_writer(slf)?;
            let waiter = slf.borrow().empty_waiter.as_ref().map(|w| w.clone_ref(py));
            if let Some(w) = waiter {
                w.bind(py)
                    .call_method1(intern!(py, "set_result"), (py.None(),))?;
            }
            let (closing, eof, fd, transport) = {
                let s = slf.borrow();
                (s.closing, s.eof, s.fd, s.transport.clone_ref(py))
            };
            if closing {
                transport
                    .bind(py)
                    .call_method1(intern!(py, "_call_connection_lost"), (py.None(),))?;
            } else if eof {
                shutdown_write(fd).map_err(os_error)?;
            }
            Ok(())
        }
    }
}

pub(super) fn read_ready(slf: &Bound<'_, StreamCore>) -> PyResult<()> {
    let py = slf.py();
    let (fd, buffered, tls, max_size, protocol) = {
        let s = slf.borrow();
        if s.conn_lost > 0 {
            return Ok(());
        }
        (
            s.fd,
            s.buffered,
            s.tls,
            s.max_size,
            s.protocol.clone_ref(py),
        )
    };
    let protocol = protocol.into_bound(py);
    if tls {
        match super::tls::read_ready(&protocol, fd) {
            TlsRead::Fallback => {} // the protocol's own get_buffer()/buffer_updated()
            TlsRead::WouldBlock | TlsRead::Done => return Ok(()),
            TlsRead::Eof => return on_eof(slf, &protocol),
            TlsRead::Failed(e, message) => return fatal_error(slf, e, message),
        }
    }
    if buffered {
        return read_into_buffer(slf, fd, &protocol);
    }
    let data = match recv_bytes(py, fd, max_size) {
        Ok(d) => d,
        Err(e) if would_block(&e) => return Ok(()),
        Err(e) => return fatal_error(slf, os_error(e), "Fatal read error on socket transport"),
    };
    if data.as_bytes().is_empty() {
        return on_eof(slf, &protocol);
    }
    if let Err(e) = protocol.call_method1(intern!(py, "data_received"), (data,)) {
        return fatal_error(slf, e, "Fatal error: protocol.data_received() call failed.");
    }
    Ok(())
}

fn read_into_buffer(
    slf: &Bound<'_, StreamCore>,
    fd: RawFd,
    protocol: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let py = slf.py();
    let buf = protocol
        .call_method1(intern!(py, "get_buffer"), (-1,))
        .and_then(|b| {
            if b.len()? == 0 {
                Err(PyRuntimeError::new_err(
                    "get_buffer() returned an empty buffer",
                ))
            } else {
                Ok(b)
            }
        });
    let buf = match buf {
        Ok(b) => b,
        Err(e) => return fatal_error(slf, e, "Fatal error: protocol.get_buffer() call failed."),
    };
    // sock.recv_into's argument check: any buffer failure is its TypeError.
    let res = ByteView::get(&buf, true)
        .map_err(|_| {
            let name = buf
                .get_type()
                .name()
                .map_or_else(|_| "object".to_string(), |n| n.to_string());
            PyTypeError::new_err(format!(
                "recv_into() argument 1 must be read-write bytes-like object, not {name}"
            ))
        })
        .map(|view| recv_into(fd, view.as_mut_ptr(), view.len()));
    let nbytes = match res {
        Ok(Ok(n)) => n,
        Ok(Err(e)) if would_block(&e) => return Ok(()),
        Ok(Err(e)) => return fatal_error(slf, os_error(e), "Fatal read error on socket transport"),
        Err(e) => return fatal_error(slf, e, "Fatal read error on socket transport"),
    };
    if nbytes == 0 {
        return on_eof(slf, protocol);
    }
    if let Err(e) = protocol.call_method1(intern!(py, "buffer_updated"), (nbytes,)) {
        return fatal_error(
            slf,
            e,
            "Fatal error: protocol.buffer_updated() call failed.",
        );
    }
    // The buffer lives until buffer_updated() has run, as asyncio's local `buf`.
    drop(buf);
    Ok(())
}

fn on_eof(slf: &Bound<'_, StreamCore>, protocol: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = slf.py();
    debug_log(slf, "%r received EOF")?;
    let keep_open = match protocol.call_method0(intern!(py, "eof_received")) {
        Ok(v) => v,
        Err(e) => return fatal_error(slf, e, "Fatal error: protocol.eof_received() call failed."),
    };
    if keep_open.is_truthy()? {
        // Keep the connection open so the protocol can write more; nothing more to read.
        remove_reader(slf)
    } else {
        close(slf)
    }
}

fn close(slf: &Bound<'_, StreamCore>) -> PyResult<()> {
    let py = slf.py();
    {
        let mut s = slf.borrow_mut();
        if s.closing {
            return Ok(());
        }
        s.closing = true;
    }
    remove_reader(slf)?;
    if !slf.borrow().buffer.is_empty() {
        return Ok(()); // _write_ready calls connection_lost once the buffer is flushed.
    }
    slf.borrow_mut().conn_lost += 1;
    remove_writer(slf)?;
    schedule_connection_lost(slf, py.None().into_bound(py))
}

fn schedule_connection_lost(slf: &Bound<'_, StreamCore>, exc: Bound<'_, PyAny>) -> PyResult<()> {
    let py = slf.py();
    let (lp, transport) = {
        let s = slf.borrow();
        (s.loop_.clone_ref(py), s.transport.clone_ref(py))
    };
    let cb = transport
        .bind(py)
        .getattr(intern!(py, "_call_connection_lost"))?;
    lp.bind(py)
        .call_method1(intern!(py, "call_soon"), (cb, exc))?;
    Ok(())
}

fn force_close(slf: &Bound<'_, StreamCore>, exc: Bound<'_, PyAny>) -> PyResult<()> {
    let (lost, has_buffer, closing) = {
        let s = slf.borrow();
        (s.conn_lost > 0, !s.buffer.is_empty(), s.closing)
    };
    if lost {
        return Ok(());
    }
    if has_buffer {
        let dropped = std::mem::take(&mut slf.borrow_mut().buffer);
        drop(dropped);
        remove_writer(slf)?;
    }
    if !closing {
        slf.borrow_mut().closing = true;
        remove_reader(slf)?;
    }
    slf.borrow_mut().conn_lost += 1;
    schedule_connection_lost(slf, exc)
}

fn set_protocol(slf: &Bound<'_, StreamCore>, protocol: Bound<'_, PyAny>) -> PyResult<()> {
    let buffered = protocol.is_instance(buffered_protocol(slf.py())?)?;
    let tls = is_tls_protocol(&protocol);
    let old = {
        let mut s = slf.borrow_mut();
        s.buffered = buffered;
        s.tls = tls;
        s.protocol_connected = true;
        std::mem::replace(&mut s.protocol, protocol.unbind())
    };
    // The old protocol may go now: its __del__ runs with the core free (replace_field).
    drop(old);
    Ok(())
}

#[pymethods]
impl StreamCore {
    #[new]
    fn new(
        loop_: Bound<'_, PyAny>,
        transport: Bound<'_, PyAny>,
        fd: RawFd,
        protocol: Bound<'_, PyAny>,
        max_size: usize,
        writelines_sendmsg: bool,
    ) -> PyResult<Self> {
        let py = loop_.py();
        // The call slot the reader handle uses (method.rs), set before the first call.
        static CALL_SLOT: std::sync::Once = std::sync::Once::new();
        CALL_SLOT.call_once(|| super::method::install_stream_call(py));
        let buffered = protocol.is_instance(buffered_protocol(py)?)?;
        let tls = is_tls_protocol(&protocol);
        Ok(StreamCore {
            fd,
            loop_: loop_.unbind(),
            transport: transport.unbind(),
            protocol: protocol.unbind(),
            buffered,
            tls,
            protocol_connected: true,
            buffer: WriteBuffer::default(),
            high_water: WaterMark::new(DEFAULT_HIGH_WATER),
            low_water: WaterMark::new(DEFAULT_HIGH_WATER / 4),
            protocol_paused: false,
            conn_lost: 0,
            closing: false,
            paused: false,
            eof: false,
            empty_waiter: None,
            max_size,
            writelines_sendmsg,
        })
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.loop_)?;
        visit.call(&self.transport)?;
        visit.call(&self.protocol)?;
        visit.call(&self.empty_waiter)?;
        visit.call(&self.high_water.value)?;
        visit.call(&self.low_water.value)?;
        Ok(())
    }

    fn __clear__(&mut self, py: Python<'_>) {
        self.loop_ = py.None();
        self.transport = py.None();
        self.protocol = py.None();
        self.empty_waiter = None;
    }

    /// A `write` method descriptor for the Python transport class `cls` (`method.rs`),
    /// replacing `fallback`, its Python definition.
    #[staticmethod]
    fn _write_descriptor<'py>(
        cls: &Bound<'py, PyType>,
        fallback: Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        super::method::stream_write_descriptor(cls, fallback)
    }

    /// `transport.write(data)`: send at once when nothing is queued, else queue.
    fn write(slf: &Bound<'_, Self>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        write(slf, data)
    }

    /// `transport.writelines(list_of_data)`, as the running Python's asyncio does it.
    fn writelines(slf: &Bound<'_, Self>, list_of_data: &Bound<'_, PyAny>) -> PyResult<()> {
        if slf.borrow().writelines_sendmsg {
            return writelines_sendmsg(slf, list_of_data);
        }
        // asyncio 3.11: WriteTransport.writelines joins, then writes.
        let py = slf.py();
        let joined = PyBytes::new(py, b"").call_method1(intern!(py, "join"), (list_of_data,))?;
        write(slf, &joined)
    }

    fn _read_ready(slf: &Bound<'_, Self>) -> PyResult<()> {
        read_ready(slf)
    }

    /// The loop's reader handle calls the core itself (see `add_reader`; the call slot
    /// goes to `read_ready` directly when there are no arguments: method.rs).
    fn __call__(slf: &Bound<'_, Self>) -> PyResult<()> {
        read_ready(slf)
    }

    /// What asyncio's handle reprs show for the reader callback: asyncio's method name.
    #[getter]
    fn __qualname__(&self) -> &'static str {
        "_SelectorSocketTransport._read_ready"
    }

    fn _write_ready(slf: &Bound<'_, Self>) -> PyResult<()> {
        write_ready(slf)
    }

    fn write_eof(slf: &Bound<'_, Self>) -> PyResult<()> {
        let fd = {
            let mut s = slf.borrow_mut();
            if s.closing || s.eof {
                return Ok(());
            }
            s.eof = true;
            if !s.buffer.is_empty() {
                return Ok(());
            }
            s.fd
        };
        shutdown_write(fd).map_err(os_error)
    }

    fn close(slf: &Bound<'_, Self>) -> PyResult<()> {
        close(slf)
    }

    fn _force_close(slf: &Bound<'_, Self>, exc: Bound<'_, PyAny>) -> PyResult<()> {
        force_close(slf, exc)
    }

    fn set_protocol(slf: &Bound<'_, Self>, protocol: Bound<'_, PyAny>) -> PyResult<()> {
        set_protocol(slf, protocol)
    }

    fn get_protocol(&self, py: Python<'_>) -> Py<PyAny> {
        self.protocol.clone_ref(py)
    }

    fn is_closing(&self) -> bool {
        self.closing
    }

    fn is_reading(&self) -> bool {
        !self.closing && !self.paused
    }

    fn pause_reading(slf: &Bound<'_, Self>) -> PyResult<()> {
        {
            let mut s = slf.borrow_mut();
            if s.closing || s.paused {
                return Ok(());
            }
            s.paused = true;
        }
        remove_reader(slf)?;
        debug_log(slf, "%r pauses reading")
    }

    fn resume_reading(slf: &Bound<'_, Self>) -> PyResult<()> {
        {
            let mut s = slf.borrow_mut();
            if s.closing || !s.paused {
                return Ok(());
            }
            s.paused = false;
        }
        add_reader(slf)?;
        debug_log(slf, "%r resumes reading")
    }

    fn get_write_buffer_size(&self) -> usize {
        self.buffer.len()
    }

    fn _maybe_pause_protocol(slf: &Bound<'_, Self>) -> PyResult<()> {
        maybe_pause_protocol(slf)
    }

    fn _maybe_resume_protocol(slf: &Bound<'_, Self>) -> PyResult<()> {
        maybe_resume_protocol(slf)
    }

    fn _make_empty_waiter(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let (lp, empty) = {
            let s = slf.borrow();
            if s.empty_waiter.is_some() {
                return Err(PyRuntimeError::new_err("Empty waiter is already set"));
            }
            (s.loop_.clone_ref(py), s.buffer.is_empty())
        };
        let waiter = lp.bind(py).call_method0(intern!(py, "create_future"))?;
        slf.borrow_mut().empty_waiter = Some(waiter.clone().unbind());
        if empty {
            waiter.call_method1(intern!(py, "set_result"), (py.None(),))?;
        }
        Ok(waiter.unbind())
    }

    fn _reset_empty_waiter(slf: &Bound<'_, Self>) {
        replace_field(slf, |s| &mut s.empty_waiter, None);
    }

    /// After `connection_lost`: forget the loop, transport and protocol (asyncio sets
    /// `_loop`/`_protocol` to None), which also breaks the transport <-> core cycle. The
    /// protocol goes first, with the core free (replace_field), as asyncio drops it first.
    fn _detach(slf: &Bound<'_, Self>) {
        let py = slf.py();
        replace_field(slf, |s| &mut s.protocol, py.None());
        replace_field(slf, |s| &mut s.transport, py.None());
        replace_field(slf, |s| &mut s.loop_, py.None());
    }

    #[getter(_protocol)]
    fn get_protocol_attr(&self, py: Python<'_>) -> Py<PyAny> {
        self.protocol.clone_ref(py)
    }

    #[setter(_protocol)]
    fn set_protocol_attr(slf: &Bound<'_, Self>, value: Py<PyAny>) {
        replace_field(slf, |s| &mut s.protocol, value);
    }

    #[getter(_protocol_connected)]
    fn get_protocol_connected(&self) -> bool {
        self.protocol_connected
    }

    #[setter(_protocol_connected)]
    fn set_protocol_connected(&mut self, value: bool) {
        self.protocol_connected = value;
    }

    #[getter(_closing)]
    fn get_closing(&self) -> bool {
        self.closing
    }

    #[setter(_closing)]
    fn set_closing(&mut self, value: bool) {
        self.closing = value;
    }

    #[getter(_conn_lost)]
    fn get_conn_lost(&self) -> usize {
        self.conn_lost
    }

    #[setter(_conn_lost)]
    fn set_conn_lost(&mut self, value: usize) {
        self.conn_lost = value;
    }

    #[getter(_paused)]
    fn get_paused(&self) -> bool {
        self.paused
    }

    #[setter(_paused)]
    fn set_paused(&mut self, value: bool) {
        self.paused = value;
    }

    #[getter(_eof)]
    fn get_eof(&self) -> bool {
        self.eof
    }

    #[setter(_eof)]
    fn set_eof(&mut self, value: bool) {
        self.eof = value;
    }

    #[getter(_empty_waiter)]
    fn get_empty_waiter(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.empty_waiter.as_ref().map(|w| w.clone_ref(py))
    }

    #[setter(_empty_waiter)]
    fn set_empty_waiter(slf: &Bound<'_, Self>, value: Option<Py<PyAny>>) {
        replace_field(slf, |s| &mut s.empty_waiter, value);
    }

    #[getter(_protocol_paused)]
    fn get_protocol_paused(&self) -> bool {
        self.protocol_paused
    }

    #[setter(_protocol_paused)]
    fn set_protocol_paused(&mut self, value: bool) {
        self.protocol_paused = value;
    }

    #[getter(_high_water)]
    fn get_high_water(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.high_water.get(py)
    }

    #[setter(_high_water)]
    fn set_high_water(&mut self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.high_water = WaterMark::from_value(value)?;
        Ok(())
    }

    #[getter(_low_water)]
    fn get_low_water(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.low_water.get(py)
    }

    #[setter(_low_water)]
    fn set_low_water(&mut self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.low_water = WaterMark::from_value(value)?;
        Ok(())
    }

    #[getter(max_size)]
    fn get_max_size(&self) -> usize {
        self.max_size
    }

    #[setter(max_size)]
    fn set_max_size(&mut self, value: usize) {
        self.max_size = value;
    }
}
