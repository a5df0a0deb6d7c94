//! The native hot paths of the pipe transports (asyncio's `unix_events._UnixReadPipeTransport`
//! and `_UnixWritePipeTransport`): the read (one `read` into a reused buffer, one `bytes` per
//! read) and `write` when nothing is queued. `ferroloop.pipes` subclasses asyncio's own
//! classes (close, abort, write_eof, repr, the flush on writability and `_fatal_error` stay
//! asyncio's for the running Python) and keeps their hot state here.
//!
//! File descriptors: the pipe is owned by the pipe object the Python transport holds (closed
//! by asyncio's `_call_connection_lost`); the cores borrow the fd number and make no syscall
//! on it once the transport is closing (write) or the reader is removed (read).
//!
//! Borrows of a core are never held across a call into Python.

use std::io;
use std::os::unix::io::RawFd;

use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use pyo3::{PyTraverseError, PyVisit};

use super::{replace_field, would_block, ByteView};
use crate::errors::os_error;

/// `os.read(fd, max_size)` through the thread's reusable buffer (EINTR retried, as `os.read`).
fn read_bytes(py: Python<'_>, fd: RawFd, max_size: usize) -> io::Result<Bound<'_, PyBytes>> {
    // SAFETY: read writes at most `len` bytes at `ptr`.
    crate::sockets::read_through_buffer(py, max_size, |ptr, len| unsafe {
        libc::read(fd, ptr.cast(), len)
    })
}

/// `os.write(fd, bytes)` (retrying EINTR, as `os.write`).
fn write_fd(fd: RawFd, bytes: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `bytes` is valid for its length; write only reads it.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// `transport._fatal_error(exc, message)`; KeyboardInterrupt/SystemExit propagate.
fn fatal_error(py: Python<'_>, transport: &Py<PyAny>, err: PyErr, message: &str) -> PyResult<()> {
    super::fatal_error(transport.bind(py), err, message)
}

#[pyclass(module = "ferroloop._ferroloop")]
pub struct ReadPipeCore {
    fd: RawFd,
    transport: Py<PyAny>,
    protocol: Py<PyAny>,
    max_size: usize,
}

fn read_ready(slf: &Bound<'_, ReadPipeCore>) -> PyResult<()> {
    let py = slf.py();
    let (fd, max_size, transport, protocol) = {
        let s = slf.borrow();
        (
            s.fd,
            s.max_size,
            s.transport.clone_ref(py),
            s.protocol.clone_ref(py),
        )
    };
    match read_bytes(py, fd, max_size) {
        Err(e) if would_block(&e) => Ok(()),
        Err(e) => fatal_error(
            py,
            &transport,
            os_error(e),
            "Fatal read error on pipe transport",
        ),
        Ok(data) if data.as_bytes().is_empty() => {
            transport.bind(py).call_method0(intern!(py, "_read_eof"))?;
            Ok(())
        }
        Ok(data) => {
            // asyncio lets an exception from data_received reach the loop's handler.
            protocol
                .bind(py)
                .call_method1(intern!(py, "data_received"), (data,))?;
            Ok(())
        }
    }
}

#[pymethods]
impl ReadPipeCore {
    #[new]
    fn new(transport: Bound<'_, PyAny>, fd: RawFd, max_size: usize) -> Self {
        let py = transport.py();
        ReadPipeCore {
            fd,
            transport: transport.unbind(),
            protocol: py.None(),
            max_size,
        }
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.transport)?;
        visit.call(&self.protocol)?;
        Ok(())
    }

    fn __clear__(&mut self, py: Python<'_>) {
        self.protocol = py.None();
        self.transport = py.None();
    }

    /// The loop's reader handle calls the core itself: asyncio's `_read_ready`.
    fn __call__(slf: &Bound<'_, Self>) -> PyResult<()> {
        read_ready(slf)
    }

    #[getter]
    fn __qualname__(&self) -> &'static str {
        "_UnixReadPipeTransport._read_ready"
    }

    /// After `connection_lost`: forget the protocol (asyncio sets it to None).
    fn _detach(slf: &Bound<'_, Self>) {
        // With the core free: the protocol's __del__ may call the transport.
        replace_field(slf, |s| &mut s.protocol, slf.py().None());
    }

    #[getter(_protocol)]
    fn get_protocol(&self, py: Python<'_>) -> Py<PyAny> {
        self.protocol.clone_ref(py)
    }

    #[setter(_protocol)]
    fn set_protocol(slf: &Bound<'_, Self>, value: Py<PyAny>) {
        replace_field(slf, |s| &mut s.protocol, value);
    }
}

#[pyclass(module = "ferroloop._ferroloop")]
pub struct WritePipeCore {
    fd: RawFd,
    loop_: Py<PyAny>,
    transport: Py<PyAny>,
    /// asyncio's `_buffer` (a bytearray); appended to and tested for emptiness here.
    buffer: Py<PyAny>,
    conn_lost: usize,
    closing: bool,
    /// asyncio's own `_UnixWritePipeTransport.write`, for every case but the hot one.
    py_write: Py<PyAny>,
}

/// A bytes-like object `write` handles itself: bytes, bytearray, or a C-contiguous
/// one-byte-per-item memoryview (asyncio compares `len(data)` with bytes written).
fn simple_bytes_like(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    let p = obj.as_ptr();
    // SAFETY: type checks on a live object.
    let (plain, memview) = unsafe {
        (
            ffi::PyBytes_Check(p) != 0 || ffi::PyByteArray_Check(p) != 0,
            ffi::PyMemoryView_Check(p) != 0,
        )
    };
    if plain {
        return Ok(true);
    }
    if !memview {
        return Ok(false);
    }
    let py = obj.py();
    Ok(
        obj.getattr(intern!(py, "itemsize"))?.extract::<usize>()? == 1
            && obj.getattr(intern!(py, "c_contiguous"))?.is_truthy()?,
    )
}

fn write(slf: &Bound<'_, WritePipeCore>, data: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = slf.py();
    let (fd, lp, transport, buffer, py_write, busy) = {
        let s = slf.borrow();
        (
            s.fd,
            s.loop_.clone_ref(py),
            s.transport.clone_ref(py),
            s.buffer.clone_ref(py).into_bound(py),
            s.py_write.clone_ref(py),
            s.conn_lost > 0 || s.closing,
        )
    };
    // Everything but "plain bytes, nothing queued, pipe open" is asyncio's own code.
    if !simple_bytes_like(data)? || busy || buffer.len()? != 0 {
        py_write.bind(py).call1((transport, data))?;
        return Ok(());
    }
    let view = ByteView::get(data, false)?;
    let bytes = view.as_slice();
    if bytes.is_empty() {
        return Ok(());
    }
    let n = match write_fd(fd, bytes) {
        Ok(n) if n == bytes.len() => return Ok(()),
        Ok(n) => n,
        Err(e) if would_block(&e) => 0,
        Err(e) => {
            drop(view);
            slf.borrow_mut().conn_lost += 1;
            return fatal_error(
                py,
                &transport,
                os_error(e),
                "Fatal write error on pipe transport",
            );
        }
    };
    let cb = transport.bind(py).getattr(intern!(py, "_write_ready"))?;
    lp.bind(py)
        .call_method1(intern!(py, "_add_writer"), (fd, cb))?;
    let rest = PyBytes::new(py, &bytes[n..]);
    drop(view);
    buffer.call_method1(intern!(py, "extend"), (rest,))?;
    transport
        .bind(py)
        .call_method0(intern!(py, "_maybe_pause_protocol"))?;
    Ok(())
}

#[pymethods]
impl WritePipeCore {
    #[new]
    fn new(
        loop_: Bound<'_, PyAny>,
        transport: Bound<'_, PyAny>,
        fd: RawFd,
        py_write: Bound<'_, PyAny>,
    ) -> Self {
        let py = loop_.py();
        WritePipeCore {
            fd,
            loop_: loop_.unbind(),
            transport: transport.unbind(),
            buffer: py.None(),
            conn_lost: 0,
            closing: false,
            py_write: py_write.unbind(),
        }
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.loop_)?;
        visit.call(&self.transport)?;
        visit.call(&self.buffer)?;
        visit.call(&self.py_write)?;
        Ok(())
    }

    fn __clear__(&mut self, py: Python<'_>) {
        self._detach(py);
        self.transport = py.None();
        self.buffer = py.None();
        self.py_write = py.None();
    }

    /// `transport.write(data)`: written at once when nothing is queued, else queued.
    fn write(slf: &Bound<'_, Self>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        write(slf, data)
    }

    /// After `connection_lost`: forget the loop (the transport stays, for asyncio's write on
    /// a closed transport).
    fn _detach(&mut self, py: Python<'_>) {
        self.loop_ = py.None();
    }

    #[getter(_buffer)]
    fn get_buffer(&self, py: Python<'_>) -> Py<PyAny> {
        self.buffer.clone_ref(py)
    }

    #[setter(_buffer)]
    fn set_buffer(slf: &Bound<'_, Self>, value: Py<PyAny>) {
        replace_field(slf, |s| &mut s.buffer, value);
    }

    #[getter(_conn_lost)]
    fn get_conn_lost(&self) -> usize {
        self.conn_lost
    }

    #[setter(_conn_lost)]
    fn set_conn_lost(&mut self, value: usize) {
        self.conn_lost = value;
    }

    #[getter(_closing)]
    fn get_closing(&self) -> bool {
        self.closing
    }

    #[setter(_closing)]
    fn set_closing(&mut self, value: bool) {
        self.closing = value;
    }
}
