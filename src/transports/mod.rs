//! Write buffer, flow-control constants and byte views shared by the transports
//! (asyncio's `transports._FlowControlMixin` and `selector_events._SelectorTransport._buffer`).

mod method;
pub mod pipe;
pub mod stream;
pub mod tls;
pub mod udp;

use std::io;
use std::os::unix::io::RawFd;

use pyo3::exceptions::{PyKeyboardInterrupt, PySystemExit};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

/// asyncio's default high-water mark (`_FlowControlMixin._set_write_buffer_limits`).
pub const DEFAULT_HIGH_WATER: usize = 64 * 1024;
/// asyncio's `constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES`.
pub const LOG_THRESHOLD_FOR_CONNLOST_WRITES: usize = 5;
/// Linux's IOV_MAX (asyncio's `SC_IOV_MAX`): the most buffers one `sendmsg` takes.
pub const IOV_MAX: usize = 1024;
/// A write buffer keeps at most this much capacity once it is empty (idle connections stay small).
const KEEP_CAPACITY: usize = 64 * 1024;

/// Bytes waiting to be sent: one contiguous vector consumed from the front (asyncio 3.11's
/// `bytearray`; one `send` flushes it, so no iovec list is needed).
#[derive(Default)]
pub struct WriteBuffer {
    data: Vec<u8>,
    head: usize,
}

impl WriteBuffer {
    pub fn len(&self) -> usize {
        self.data.len() - self.head
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn pending(&self) -> &[u8] {
        &self.data[self.head..]
    }

    pub fn extend(&mut self, bytes: &[u8]) {
        self.data.extend_from_slice(bytes);
    }

    /// Drop the first `n` bytes (sent).
    pub fn consume(&mut self, n: usize) {
        self.head += n;
        if self.head >= self.data.len() {
            self.clear();
        } else if self.head >= KEEP_CAPACITY && self.head * 2 >= self.data.len() {
            // Move the tail to the front once most of the vector is dead space.
            self.data.drain(..self.head);
            self.head = 0;
        }
    }

    pub fn clear(&mut self) {
        if self.data.capacity() > KEEP_CAPACITY {
            self.data = Vec::new();
        } else {
            self.data.clear();
        }
        self.head = 0;
    }
}

/// A contiguous view of a bytes-like object (the buffer protocol, as `socket.send` and
/// `socket.recv_into` take them), released on drop. Only built and dropped with the GIL held.
pub struct ByteView(Box<ffi::Py_buffer>);

impl ByteView {
    pub fn get(obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<Self> {
        let mut view = Box::new(ffi::Py_buffer::new());
        let flags = if writable {
            ffi::PyBUF_WRITABLE
        } else {
            ffi::PyBUF_SIMPLE
        };
        // SAFETY: `obj` is a live object (we hold the GIL); `view` is a valid, boxed Py_buffer
        // that stays at one address until it is released in Drop.
        if unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), &mut *view, flags) } != 0 {
            return Err(PyErr::fetch(obj.py()));
        }
        Ok(ByteView(view))
    }

    pub fn len(&self) -> usize {
        self.0.len as usize
    }

    pub fn as_slice(&self) -> &[u8] {
        if self.0.len == 0 || self.0.buf.is_null() {
            return &[];
        }
        // SAFETY: a PyBUF_SIMPLE/PyBUF_WRITABLE view is contiguous, `len` bytes from `buf`,
        // valid (and its exporter pinned) until PyBuffer_Release.
        unsafe { std::slice::from_raw_parts(self.0.buf as *const u8, self.0.len as usize) }
    }

    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.0.buf as *mut u8
    }
}

impl Drop for ByteView {
    fn drop(&mut self) {
        // SAFETY: the view was filled by a successful PyObject_GetBuffer and is released
        // once; ByteView is !Send and only lives inside GIL-holding code.
        unsafe { ffi::PyBuffer_Release(&mut *self.0) };
    }
}

/// `send(fd, bytes)` on a non-blocking socket (retrying EINTR, as Python's `sock.send`).
/// MSG_NOSIGNAL: a closed peer is an EPIPE error, never a SIGPIPE.
pub fn send(fd: RawFd, bytes: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `bytes` is valid for its length; send only reads it.
        let n = unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// `sendmsg(fd, buffers)` (asyncio 3.12's `_write_sendmsg`): one syscall for many buffers.
pub fn sendmsg(fd: RawFd, bufs: &[&[u8]]) -> io::Result<usize> {
    let iov: Vec<libc::iovec> = bufs
        .iter()
        .take(IOV_MAX)
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    loop {
        // SAFETY: a zeroed msghdr is valid; iov points at `iov.len()` live iovecs whose
        // buffers outlive the call.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = iov.len() as _;
            libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL)
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// `recv_into` of a non-blocking socket, straight into `ptr[..len]`.
pub fn recv_into(fd: RawFd, ptr: *mut u8, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: the caller passes a writable buffer of `len` bytes that outlives the call.
        let n = unsafe { libc::recv(fd, ptr.cast(), len, 0) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// asyncio catches `(BlockingIOError, InterruptedError)` around every socket call: try later.
/// What asyncio's transports accept as data: bytes, bytearray or memoryview (exact or
/// subclass).
pub fn is_bytes_like(obj: &Bound<'_, PyAny>) -> bool {
    let p = obj.as_ptr();
    // SAFETY: type checks on a live object.
    unsafe {
        ffi::PyBytes_Check(p) != 0
            || ffi::PyByteArray_Check(p) != 0
            || ffi::PyMemoryView_Check(p) != 0
    }
}

pub fn would_block(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EAGAIN) | Some(libc::EINTR) | Some(libc::EINPROGRESS)
    )
}

/// `shutdown(fd, SHUT_WR)` (asyncio's `sock.shutdown(socket.SHUT_WR)`).
pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: a plain syscall; a bad fd is reported as an error.
    if unsafe { libc::shutdown(fd, libc::SHUT_WR) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `field = value` on a native core, the old value dropped once the core is no longer
/// borrowed: dropping the last reference to a protocol (or a buffer, a waiter) runs its
/// `__del__` or weakref callbacks, which may call the transport, as they can on asyncio's
/// plain Python transports.
pub fn replace_field<C, T>(
    slf: &Bound<'_, C>,
    field: impl for<'a> FnOnce(&'a mut C) -> &'a mut T,
    value: T,
) where
    C: pyo3::PyClass<Frozen = pyo3::pyclass::boolean_struct::False>,
{
    let old = std::mem::replace(field(&mut slf.borrow_mut()), value);
    drop(old);
}

/// asyncio lets KeyboardInterrupt and SystemExit through every transport `except` clause.
pub fn is_exit(py: Python<'_>, err: &PyErr) -> bool {
    err.is_instance_of::<PyKeyboardInterrupt>(py) || err.is_instance_of::<PySystemExit>(py)
}

/// asyncio's `transport._fatal_error(exc, message)` (which logs or calls the exception
/// handler, then force-closes), called while `exc` is the exception being handled, as
/// asyncio calls it from its `except` block.
pub fn call_fatal_error(
    transport: &Bound<'_, PyAny>,
    exc: &Bound<'_, PyAny>,
    message: &str,
) -> PyResult<()> {
    let py = transport.py();
    crate::py::while_handling(exc, || {
        transport.call_method1(pyo3::intern!(py, "_fatal_error"), (exc, message))
    })?;
    Ok(())
}

/// The same for an error caught in Rust; KeyboardInterrupt/SystemExit propagate instead.
pub fn fatal_error(transport: &Bound<'_, PyAny>, err: PyErr, message: &str) -> PyResult<()> {
    let py = transport.py();
    if is_exit(py, &err) {
        return Err(err);
    }
    let exc = err.into_value(py).into_bound(py).into_any();
    call_fatal_error(transport, &exc, message)
}

static LOGGER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static BUFFERED_PROTOCOL: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// `asyncio.log.logger`, the logger asyncio's transports write to.
pub fn logger(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    LOGGER.import(py, "asyncio.log", "logger")
}

/// `asyncio.protocols.BufferedProtocol`.
pub fn buffered_protocol(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    BUFFERED_PROTOCOL.import(py, "asyncio.protocols", "BufferedProtocol")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_buffer_consumes_from_the_front() {
        let mut b = WriteBuffer::default();
        assert!(b.is_empty());
        b.extend(b"hello");
        b.extend(b" world");
        assert_eq!(b.len(), 11);
        b.consume(6);
        assert_eq!(b.pending(), b"world");
        b.consume(5);
        assert!(b.is_empty());
        assert_eq!(b.pending(), b"");
    }

    #[test]
    fn write_buffer_compacts_and_releases_large_capacity() {
        let mut b = WriteBuffer::default();
        b.extend(&vec![1u8; 200 * 1024]);
        b.consume(150 * 1024);
        assert_eq!(b.len(), 50 * 1024);
        assert_eq!(b.head, 0);
        b.clear();
        assert_eq!(b.data.capacity(), 0);
    }
}
