//! Socket reads for the transports (asyncio's `sock.recv(max_size)` in
//! `selector_events`), through one reusable buffer per thread.
//!
//! asyncio asks `recv` for up to 256 KiB, so CPython allocates a 256 KiB bytes object for
//! every read (above glibc's mmap threshold: an mmap, page faults, and a munmap when it is
//! shrunk to the received size). Reading into a buffer that lives as long as the thread
//! and copying out only what arrived keeps the same result for a fraction of the work.

use std::cell::RefCell;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::os_error;

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// `recv(fd, max_size)` on a non-blocking socket: the bytes received (empty at EOF), or
/// the OSError `socket.recv` raises (BlockingIOError when nothing is there).
#[pyfunction]
pub fn recv<'py>(py: Python<'py>, fd: i32, max_size: usize) -> PyResult<Bound<'py, PyBytes>> {
    recv_bytes(py, fd, max_size).map_err(os_error)
}

/// The read behind `recv` and the native stream transport: up to `max_size` bytes through
/// the thread's reusable buffer, copied into a `bytes` of exactly the size received.
pub fn recv_bytes<'py>(
    py: Python<'py>,
    fd: i32,
    max_size: usize,
) -> std::io::Result<Bound<'py, PyBytes>> {
    BUFFER.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < max_size {
            buf.resize(max_size, 0);
        }
        let n = loop {
            // SAFETY: the buffer is valid for max_size bytes; recv writes at most that many.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), max_size, 0) };
            if n >= 0 {
                break n as usize;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        };
        Ok(PyBytes::new(py, &buf[..n]))
    })
}
