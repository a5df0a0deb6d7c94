//! The data path of `loop.sock_sendfile` (asyncio's `_sock_sendfile_native_impl` in
//! `unix_events`): sendfile(2) called from Rust, driven by a writer that stays registered
//! until the transfer ends.
//!
//! asyncio's `sock_sendfile`, `_check_sendfile_params`, `_sock_sendfile_native` (the
//! "not a regular file" checks) and `_sock_sendfile_fallback` stay asyncio's: they run
//! once per call. What runs once per chunk is this function: asyncio calls `os.sendfile`
//! once per writable event, removing its writer before and adding a new one after each
//! chunk (two `epoll_ctl` and two Python-level calls per chunk). Here the writer is added
//! once and removed when the transfer ends, and a chunk that went out is followed by
//! another attempt at once (a few per event), so a file that fits the socket buffer is
//! sent, EOF included, before the first wait. The results, errors, file position and
//! cancellation are asyncio's (`errno` kept, ENOTCONN after the first call normalised to
//! ConnectionError, an error before any byte went out turned into SendfileNotAvailableError
//! so `sock_sendfile` falls back, a cancelled transfer removing its writer).
//!
//! A call this path cannot reproduce exactly (a patched `os.sendfile`, as CPython's tests
//! do, or a number that is not a machine integer) runs asyncio's own method.

use std::io;

use pyo3::exceptions::PyConnectionError;
use pyo3::gc::PyVisit;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyTuple;
use pyo3::PyTraverseError;

use super::{add_method, ensure_fd_no_transport};
use crate::errors::os_error;
use crate::transports::is_exit;

/// sendfile(2) calls per writable event when each one sends something: enough to reach EOF
/// (a call returning 0) without another wait, few enough that a peer reading as fast as
/// the loop writes does not keep the loop in one callback.
const CALLS_PER_EVENT: usize = 4;

static OS_SENDFILE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static UNIX_EVENTS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static PY_IMPL: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static NOT_AVAILABLE: PyOnceLock<Py<pyo3::types::PyType>> = PyOnceLock::new();

fn unix_events(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    UNIX_EVENTS
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(py.import("asyncio.unix_events")?.into_any().unbind())
        })
        .map(|m| m.bind(py))
}

/// Whether `os.sendfile`, as `unix_events` reads it at call time, is still the function
/// this module saw at import (CPython's tests patch it to inject errors).
fn sendfile_unpatched(py: Python<'_>) -> PyResult<bool> {
    let Some(original) = OS_SENDFILE.get(py) else {
        return Ok(false);
    };
    let os = unix_events(py)?.getattr(intern!(py, "os"))?;
    Ok(match os.getattr(intern!(py, "sendfile")) {
        Ok(f) => f.is(original),
        Err(_) => false,
    })
}

/// `sendfile(out_fd, in_fd, &offset, count)`, as `os.sendfile` makes it: the GIL released,
/// EINTR retried after running signal handlers (whose exception ends the call).
fn sendfile(py: Python<'_>, out_fd: i32, in_fd: i32, offset: i64, count: usize) -> Sent {
    loop {
        let r = py.detach(|| {
            let mut off: libc::off_t = offset;
            // SAFETY: plain syscall on integers; `off` is a valid local.
            let n = unsafe { libc::sendfile(out_fd, in_fd, &mut off, count) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as i64)
            }
        });
        match r {
            Ok(n) => return Sent::Bytes(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                if let Err(e) = py.check_signals() {
                    return Sent::Raised(e);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Sent::NotReady,
            Err(e) => return Sent::Failed(e),
        }
    }
}

enum Sent {
    Bytes(i64),
    /// EAGAIN: wait for the socket to be writable.
    NotReady,
    /// The OSError `os.sendfile` raises.
    Failed(io::Error),
    /// A signal handler's exception.
    Raised(PyErr),
}

/// One `sock_sendfile` transfer in progress: the arguments of asyncio's
/// `_sock_sendfile_native_impl`, as they stand after the chunks sent so far. It is the
/// writer callback while the transfer waits for the socket.
#[pyclass(module = "ferroloop._ferroloop")]
pub struct SendfileWriter {
    loop_: Option<Py<PyAny>>,
    fut: Option<Py<PyAny>>,
    sock: Option<Py<PyAny>>,
    fileno: i32,
    offset: i64,
    /// None when asyncio's `count` is falsy (send to EOF).
    count: Option<i64>,
    blocksize: i64,
    total_sent: i64,
    /// The fd this object is registered on as the loop's writer.
    registered: Option<i32>,
    /// asyncio adds its cancellation callback when a call made with `registered_fd=None`
    /// first adds a writer.
    add_cancel_callback: bool,
}

#[pymethods]
impl SendfileWriter {
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        for o in [&self.loop_, &self.fut, &self.sock].into_iter().flatten() {
            visit.call(o)?;
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        self.loop_ = None;
        self.fut = None;
        self.sock = None;
    }

    /// The socket is writable: asyncio's `_sock_sendfile_native_impl` called by its writer.
    fn __call__(slf: &Bound<'_, Self>) -> PyResult<()> {
        Self::run(slf, true)
    }
}

impl SendfileWriter {
    /// One invocation of asyncio's `_sock_sendfile_native_impl`, from the check for a
    /// cancelled future on (the caller removed a previous writer). `called_again`: asyncio
    /// would make this call with a `registered_fd` (which changes how ENOTCONN is reported).
    fn run(slf: &Bound<'_, Self>, mut called_again: bool) -> PyResult<()> {
        let py = slf.py();
        let mut this = slf.borrow_mut();
        let (Some(loop_), Some(fut), Some(sock)) = (
            this.loop_.as_ref().map(|o| o.bind(py).clone()),
            this.fut.as_ref().map(|o| o.bind(py).clone()),
            this.sock.as_ref().map(|o| o.bind(py).clone()),
        ) else {
            return Ok(());
        };
        let fd: i32 = sock.call_method0(intern!(py, "fileno"))?.extract()?;
        if fut.call_method0(intern!(py, "cancelled"))?.is_truthy()? {
            this.unregister(&loop_)?;
            return this.update_filepos();
        }
        for _ in 0..CALLS_PER_EVENT {
            if let Some(count) = this.count {
                this.blocksize = count.saturating_sub(this.total_sent);
                if this.blocksize <= 0 {
                    this.unregister(&loop_)?;
                    this.update_filepos()?;
                    fut.call_method1(intern!(py, "set_result"), (this.total_sent,))?;
                    return Ok(());
                }
            }
            match sendfile(py, fd, this.fileno, this.offset, this.blocksize as usize) {
                Sent::Bytes(0) => {
                    // EOF
                    this.unregister(&loop_)?;
                    this.update_filepos()?;
                    fut.call_method1(intern!(py, "set_result"), (this.total_sent,))?;
                    return Ok(());
                }
                Sent::Bytes(n) => {
                    this.offset += n;
                    this.total_sent += n;
                    called_again = true;
                }
                Sent::NotReady => break,
                Sent::Failed(e) => {
                    let enotconn = e.raw_os_error() == Some(libc::ENOTCONN);
                    let mut exc = os_error(e);
                    if called_again && enotconn {
                        // asyncio: "the connection was closed in the middle of the
                        // operation": the same error on every POSIX system.
                        let new_exc =
                            PyConnectionError::new_err(("socket is not connected", libc::ENOTCONN));
                        new_exc.set_cause(py, Some(exc));
                        exc = new_exc;
                    }
                    this.unregister(&loop_)?;
                    if this.total_sent == 0 {
                        // Most likely not a file sendfile(2) can read: asyncio then
                        // falls back to plain sends (when allowed).
                        let cls = NOT_AVAILABLE.import(
                            py,
                            "asyncio.exceptions",
                            "SendfileNotAvailableError",
                        )?;
                        exc = PyErr::from_value(cls.call1(("os.sendfile call failed",))?);
                    }
                    this.update_filepos()?;
                    fut.call_method1(intern!(py, "set_exception"), (exc.into_value(py),))?;
                    return Ok(());
                }
                Sent::Raised(e) if is_exit(py, &e) => return Err(e),
                Sent::Raised(e) => {
                    this.unregister(&loop_)?;
                    this.update_filepos()?;
                    fut.call_method1(intern!(py, "set_exception"), (e.into_value(py),))?;
                    return Ok(());
                }
            }
        }
        // Not finished: wait until the socket is writable (asyncio's add_writer).
        if this.registered == Some(fd) {
            return Ok(());
        }
        this.unregister(&loop_)?;
        if std::mem::take(&mut this.add_cancel_callback) {
            let cb = SendfileCancelled {
                loop_: Some(loop_.clone().unbind()),
                sock: Some(sock.clone().unbind()),
            };
            fut.call_method1(intern!(py, "add_done_callback"), (cb,))?;
        }
        ensure_fd_no_transport(&loop_, fd)?;
        this.registered = Some(fd);
        drop(this);
        loop_.call_method1(intern!(py, "_add_writer"), (fd, slf.clone()))?;
        Ok(())
    }

    /// asyncio's `remove_writer(registered_fd)`, when this object is the writer.
    fn unregister(&mut self, loop_: &Bound<'_, PyAny>) -> PyResult<()> {
        if let Some(fd) = self.registered.take() {
            loop_.call_method1(intern!(loop_.py(), "remove_writer"), (fd,))?;
        }
        Ok(())
    }

    /// asyncio's `_sock_sendfile_update_filepos`: the file position after the bytes sent.
    fn update_filepos(&self) -> PyResult<()> {
        if self.total_sent > 0 {
            // SAFETY: plain syscall on integers.
            if unsafe { libc::lseek(self.fileno, self.offset, libc::SEEK_SET) } < 0 {
                return Err(os_error(io::Error::last_os_error()));
            }
        }
        Ok(())
    }
}

/// asyncio's `_sock_add_cancellation_callback`: a cancelled transfer's writer is removed.
#[pyclass(module = "ferroloop._ferroloop")]
pub struct SendfileCancelled {
    loop_: Option<Py<PyAny>>,
    sock: Option<Py<PyAny>>,
}

#[pymethods]
impl SendfileCancelled {
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        for o in [&self.loop_, &self.sock].into_iter().flatten() {
            visit.call(o)?;
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        self.loop_ = None;
        self.sock = None;
    }

    fn __call__(&mut self, fut: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = fut.py();
        let (Some(loop_), Some(sock)) = (self.loop_.take(), self.sock.take()) else {
            return Ok(());
        };
        if fut.call_method0(intern!(py, "cancelled"))?.is_truthy()? {
            let fd: i32 = sock
                .bind(py)
                .call_method0(intern!(py, "fileno"))?
                .extract()?;
            if fd != -1 {
                loop_
                    .bind(py)
                    .call_method1(intern!(py, "remove_writer"), (fd,))?;
            }
        }
        Ok(())
    }
}

/// The numbers of a call, when they are machine integers this path can use as asyncio's
/// `os.sendfile` would (anything else, e.g. a count beyond `sys.maxsize`, takes asyncio's
/// method and its errors).
struct Numbers {
    registered_fd: Option<i32>,
    fileno: i32,
    offset: i64,
    count: Option<i64>,
    blocksize: i64,
    total_sent: i64,
}

fn numbers(
    registered_fd: &Bound<'_, PyAny>,
    fileno: &Bound<'_, PyAny>,
    offset: &Bound<'_, PyAny>,
    count: &Bound<'_, PyAny>,
    blocksize: &Bound<'_, PyAny>,
    total_sent: &Bound<'_, PyAny>,
) -> Option<Numbers> {
    fn int(o: &Bound<'_, PyAny>) -> Option<i64> {
        o.cast::<pyo3::types::PyInt>().ok()?.extract().ok()
    }
    let registered_fd = if registered_fd.is_none() {
        None
    } else {
        Some(i32::try_from(int(registered_fd)?).ok()?)
    };
    let count = if count.is_none() {
        None
    } else {
        // asyncio tests `if count:`.
        Some(int(count)?).filter(|c| *c != 0)
    };
    let n = Numbers {
        registered_fd,
        fileno: i32::try_from(int(fileno)?).ok()?,
        offset: int(offset)?,
        count,
        blocksize: int(blocksize)?,
        total_sent: int(total_sent)?,
    };
    (n.offset >= 0 && n.blocksize >= 0 && n.total_sent >= 0).then_some(n)
}

/// `loop._sock_sendfile_native_impl(fut, registered_fd, sock, fileno, offset, count,
/// blocksize, total_sent)`: asyncio's signature and effects (it is called by asyncio's
/// `_sock_sendfile_native`, and directly by CPython's tests).
#[pyfunction]
#[pyo3(
    name = "_sock_sendfile_native_impl",
    signature = (loop_, fut, registered_fd, sock, fileno, offset, count, blocksize, total_sent)
)]
#[allow(clippy::too_many_arguments)]
fn sock_sendfile_native_impl<'py>(
    loop_: Bound<'py, PyAny>,
    fut: Bound<'py, PyAny>,
    registered_fd: Bound<'py, PyAny>,
    sock: Bound<'py, PyAny>,
    fileno: Bound<'py, PyAny>,
    offset: Bound<'py, PyAny>,
    count: Bound<'py, PyAny>,
    blocksize: Bound<'py, PyAny>,
    total_sent: Bound<'py, PyAny>,
) -> PyResult<()> {
    let py = loop_.py();
    let nums = numbers(
        &registered_fd,
        &fileno,
        &offset,
        &count,
        &blocksize,
        &total_sent,
    );
    let Some(n) = nums.filter(|_| sendfile_unpatched(py).unwrap_or(false)) else {
        let f = PY_IMPL.get_or_try_init(py, || {
            Ok::<_, PyErr>(
                unix_events(py)?
                    .getattr("_UnixSelectorEventLoop")?
                    .getattr("_sock_sendfile_native_impl")?
                    .unbind(),
            )
        })?;
        let args = [
            loop_,
            fut,
            registered_fd,
            sock,
            fileno,
            offset,
            count,
            blocksize,
            total_sent,
        ];
        f.bind(py).call1(PyTuple::new(py, args)?)?;
        return Ok(());
    };
    if let Some(fd) = n.registered_fd {
        loop_.call_method1(intern!(py, "remove_writer"), (fd,))?;
    }
    let writer = Bound::new(
        py,
        SendfileWriter {
            loop_: Some(loop_.unbind()),
            fut: Some(fut.unbind()),
            sock: Some(sock.unbind()),
            fileno: n.fileno,
            offset: n.offset,
            count: n.count,
            blocksize: n.blocksize,
            total_sent: n.total_sent,
            registered: None,
            add_cancel_callback: n.registered_fd.is_none(),
        },
    )?;
    SendfileWriter::run(&writer, n.registered_fd.is_some())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    OS_SENDFILE.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import("os")?.getattr("sendfile")?.unbind())
    })?;
    m.add_class::<SendfileWriter>()?;
    m.add_class::<SendfileCancelled>()?;
    add_method(m, wrap_pyfunction!(sock_sendfile_native_impl, m)?.as_any())
}
