//! The loop's low-level socket operations (asyncio's `loop.sock_recv`, `sock_recv_into`,
//! `sock_sendall`, `sock_recvfrom(_into)`, `sock_sendto`, `sock_accept` and `sock_connect`
//! in `selector_events`) as native coroutine objects, and the socket read the transports
//! share (through one reusable buffer per thread). `sock_connect`'s address is
//! `ipaddr.rs`'s; `sock_sendfile`'s data path is `sendfile.rs`.
//!
//! asyncio's methods are `async def`: `loop.sock_recv(sock, n)` returns a coroutine that
//! does nothing until it is first resumed, then tries the operation at once and, only when
//! the socket is not ready, waits on a future with a reader (or writer) that completes it.
//! `SockCoro` is that coroutine without a Python frame: the first `send` does the syscall,
//! and when it succeeds the coroutine returns with no future, reader or frame made. The
//! slow path is asyncio's: a loop future, `_add_reader`/`_add_writer` with a native
//! callback (`SockReady`), and a done callback (`SockDone`) that removes it, so a cancelled
//! wait leaves no reader or writer behind and the socket usable.
//!
//! Anything the native path does not cover exactly (a socket subclass or SSLSocket, a
//! socket with a timeout, a size that is not a plain int, a buffer whose `len()` is not its
//! byte count) runs asyncio's own coroutine for the call, started on the first `send`, so
//! its checks and errors are asyncio's.
//!
//! asyncio asks `recv` for up to 256 KiB, so CPython allocates a 256 KiB bytes object for
//! every read (above glibc's mmap threshold: an mmap, page faults, and a munmap when it is
//! shrunk to the received size). Reading into a buffer that lives as long as the thread
//! and copying out only what arrived keeps the same result for a fraction of the work.

use std::cell::RefCell;
use std::io;

use pyo3::exceptions::{PyRuntimeError, PyStopIteration, PyTypeError};
use pyo3::ffi;
use pyo3::gc::PyVisit;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyString, PyTuple, PyType};
use pyo3::PyTraverseError;

use crate::errors::os_error;
use crate::event_loop::{self, EventLoop};
use crate::transports::{self, is_exit, ByteView};

mod ipaddr;
mod sendfile;

use ipaddr::connect_address;

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// `sock_recv` reads sizes up to this through the reusable buffer (a larger buffer would
/// stay allocated for the thread's lifetime); larger reads keep asyncio's `sock.recv`.
const NATIVE_RECV_MAX: usize = 1024 * 1024;

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
) -> io::Result<Bound<'py, PyBytes>> {
    // SAFETY: recv writes at most `len` bytes at `ptr`.
    read_through_buffer(py, max_size, |ptr, len| unsafe {
        libc::recv(fd, ptr.cast(), len, 0)
    })
}

/// One read syscall into the thread's reusable buffer (grown to `max_size` when needed),
/// retrying EINTR as Python does; what arrived is copied into a `bytes` of exactly its size.
/// The socket, datagram and pipe reads all use it, so a thread keeps one buffer, not one
/// per kind. `read(ptr, len)` must write at most `len` bytes at `ptr` and return the
/// syscall's result.
pub fn read_through_buffer<'py>(
    py: Python<'py>,
    max_size: usize,
    mut read: impl FnMut(*mut u8, usize) -> isize,
) -> io::Result<Bound<'py, PyBytes>> {
    BUFFER.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < max_size {
            buf.resize(max_size, 0);
        }
        let n = loop {
            let n = read(buf.as_mut_ptr(), max_size);
            if n >= 0 {
                break n as usize;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        };
        if n >= LARGE_MESSAGE {
            raise_malloc_thresholds();
        }
        Ok(PyBytes::new(py, &buf[..n]))
    })
}

/// A read that returns this much or more means large messages: see
/// `raise_malloc_thresholds`.
const LARGE_MESSAGE: usize = 64 * 1024;

thread_local! {
    static THRESHOLDS_RAISED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Large messages (a ~100 KiB `bytes` made and freed per read) at glibc's default malloc
/// thresholds make malloc give the heap's top back to the kernel (brk) and take it again,
/// page faults included, over and over: 17 page faults per round trip in a 100 KiB echo over
/// 10 connections. Freeing one mmapped block raises glibc's dynamic thresholds (the mmap
/// threshold to the block's size, the trim threshold to twice that), the mechanism glibc
/// has for programs that handle large blocks; done once per thread that reads large
/// messages, and it touches no page. (Nothing changes for a program whose reads stay small.)
fn raise_malloc_thresholds() {
    if THRESHOLDS_RAISED.with(|r| r.replace(true)) {
        return;
    }
    let block: Vec<u8> = Vec::with_capacity(RAISED_MMAP_THRESHOLD);
    drop(std::hint::black_box(block));
}

/// The mmap threshold `raise_malloc_thresholds` leaves (the trim threshold twice this).
const RAISED_MMAP_THRESHOLD: usize = 1024 * 1024;

/// `recv_into(fd, view)`: the byte count written (EINTR retried, as Python's socket does).
fn recv_into(fd: i32, view: &ByteView) -> io::Result<usize> {
    loop {
        // SAFETY: a writable view is valid for `len` bytes until released.
        let n = unsafe { libc::recv(fd, view.as_mut_ptr().cast(), view.len(), 0) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// A buffer view held across loop turns by a waiting `sock_sendall` (asyncio holds a
/// memoryview). Only touched with the GIL held: every access goes through a pyclass.
struct HeldView(ByteView);

// SAFETY: the Py_buffer is only read, written and released while the GIL is held (the
// pyclasses holding it are only reachable from Python).
unsafe impl Send for HeldView {}
unsafe impl Sync for HeldView {}

static SOCKET_TYPE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static BASE_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// `socket.socket`: only this exact type takes the native path (a subclass may override
/// `recv`/`send`; `ssl.SSLSocket` must get asyncio's TypeError).
fn socket_type(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    SOCKET_TYPE.import(py, "socket", "socket")
}

/// asyncio's coroutine for this call (`selector_events.BaseSelectorEventLoop.<name>`).
fn asyncio_coroutine<'py>(
    loop_: &Bound<'py, PyAny>,
    name: &Bound<'py, PyString>,
    sock: &Bound<'py, PyAny>,
    args: &Bound<'py, PyTuple>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = loop_.py();
    let cls = BASE_LOOP.import(py, "asyncio.selector_events", "BaseSelectorEventLoop")?;
    let mut all = vec![loop_.clone(), sock.clone()];
    all.extend(args.iter());
    cls.getattr(name)?.call1(PyTuple::new(py, all)?)
}

static WEAK_VALUE_DICT: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// asyncio's `_ensure_fd_no_transport(fd)` (RuntimeError if a transport that is not
/// closing owns the fd). The usual answer, "no transport has this fd", is read from the
/// `WeakValueDictionary`'s own dict without a Python frame; any entry for the fd goes
/// through asyncio's method, which knows dead entries and `is_closing()`.
pub(crate) fn ensure_fd_no_transport(loop_: &Bound<'_, PyAny>, fd: i32) -> PyResult<()> {
    let py = loop_.py();
    let transports = loop_.getattr(intern!(py, "_transports"))?;
    if transports
        .get_type()
        .is(WEAK_VALUE_DICT.import(py, "weakref", "WeakValueDictionary")?)
    {
        let data = transports.getattr(intern!(py, "data"))?;
        if let Ok(data) = data.cast_exact::<pyo3::types::PyDict>() {
            if !data.contains(fd)? {
                return Ok(());
            }
        }
    }
    loop_.call_method1(intern!(py, "_ensure_fd_no_transport"), (fd,))?;
    Ok(())
}

/// A plain non-blocking `socket.socket`: its fd, else None (asyncio's path applies).
fn plain_socket_fd(sock: &Bound<'_, PyAny>) -> PyResult<Option<i32>> {
    let py = sock.py();
    if !sock.get_type().is(socket_type(py)?) {
        return Ok(None);
    }
    let timeout = sock.call_method0(intern!(py, "gettimeout"))?;
    if timeout.is_none() || timeout.extract::<f64>()? != 0.0 {
        return Ok(None);
    }
    Ok(Some(sock.call_method0(intern!(py, "fileno"))?.extract()?))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Recv,
    RecvInto,
    SendAll,
    RecvFrom,
    RecvFromInto,
    SendTo,
    Accept,
    Connect,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Recv => "sock_recv",
            Kind::RecvInto => "sock_recv_into",
            Kind::SendAll => "sock_sendall",
            Kind::RecvFrom => "sock_recvfrom",
            Kind::RecvFromInto => "sock_recvfrom_into",
            Kind::SendTo => "sock_sendto",
            Kind::Accept => "sock_accept",
            Kind::Connect => "sock_connect",
        }
    }
}

enum State {
    /// Created, not resumed yet.
    Start,
    /// Waiting on the future (through its `__await__` iterator).
    Waiting {
        iter: Py<PyAny>,
        fut: Py<PyAny>,
    },
    /// Running asyncio's coroutine for this call.
    Delegate(Py<PyAny>),
    Done,
}

/// The coroutine `loop.sock_recv` and the other native `sock_*` methods return
/// (registered as a `collections.abc.Coroutine`).
#[pyclass(module = "ferroloop._ferroloop", name = "SockCoroutine")]
pub struct SockCoro {
    kind: Kind,
    loop_: Py<PyAny>,
    sock: Py<PyAny>,
    /// The arguments after `sock`, as the method was called.
    args: Py<PyTuple>,
    state: State,
    /// `cr_origin`: where it was made, when origin tracking was on (a debug-mode loop).
    origin: Option<Py<PyAny>>,
}

/// What one resumption gave: a value to yield, or the coroutine's return value.
enum Step {
    Yield(Py<PyAny>),
    Return(Py<PyAny>),
}

fn stop_iteration(py: Python<'_>, value: Py<PyAny>) -> PyErr {
    if value.is_none(py) {
        PyStopIteration::new_err(())
    } else {
        PyStopIteration::new_err((value,))
    }
}

/// `PyIter_Send(iter, value)`.
fn iter_send(iter: &Bound<'_, PyAny>, value: &Bound<'_, PyAny>) -> PyResult<Step> {
    let py = iter.py();
    let mut out: *mut ffi::PyObject = std::ptr::null_mut();
    // SAFETY: both objects are live; PyIter_Send stores a new reference in `out` for
    // PYGEN_RETURN/PYGEN_NEXT and sets an error for PYGEN_ERROR.
    let r = unsafe { ffi::PyIter_Send(iter.as_ptr(), value.as_ptr(), &mut out) };
    match r {
        // SAFETY: `out` holds a new reference (see above).
        ffi::PySendResult::PYGEN_RETURN => Ok(Step::Return(unsafe {
            Bound::from_owned_ptr(py, out).unbind()
        })),
        // SAFETY: as above.
        ffi::PySendResult::PYGEN_NEXT => Ok(Step::Yield(unsafe {
            Bound::from_owned_ptr(py, out).unbind()
        })),
        _ => Err(PyErr::fetch(py)),
    }
}

impl SockCoro {
    /// The first resumption: the native attempt, else asyncio's coroutine.
    fn start(&mut self, py: Python<'_>) -> PyResult<Step> {
        let loop_ = self.loop_.bind(py).clone();
        let sock = self.sock.bind(py).clone();
        let args = self.args.bind(py).clone();
        match self.try_native(&loop_, &sock, &args)? {
            Some(step) => Ok(step),
            None => {
                let name = PyString::intern(py, self.kind.name());
                let coro = asyncio_coroutine(&loop_, &name, &sock, &args)?;
                self.state = State::Delegate(coro.clone().unbind());
                iter_send(&coro, &py.None().into_bound(py))
            }
        }
    }

    /// The native operation; None when asyncio's coroutine must run instead.
    fn try_native(
        &mut self,
        loop_: &Bound<'_, PyAny>,
        sock: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
    ) -> PyResult<Option<Step>> {
        let py = loop_.py();
        let arg = args.get_item(0).ok();
        let arg = arg.as_ref().unwrap_or(sock);
        let op = match self.kind {
            Kind::Recv => {
                let n = match arg.cast_exact::<pyo3::types::PyInt>() {
                    Ok(n) => match n.extract::<usize>() {
                        Ok(n) if n <= NATIVE_RECV_MAX => n,
                        _ => return Ok(None),
                    },
                    Err(_) => return Ok(None),
                };
                let Some(fd) = plain_socket_fd(sock)? else {
                    return Ok(None);
                };
                match recv_bytes(py, fd, n) {
                    Ok(data) => return Ok(Some(Step::Return(data.into_any().unbind()))),
                    Err(e) if would_block(&e) => {}
                    Err(e) => return Err(os_error(e)),
                }
                (fd, Pending::Recv(n))
            }
            Kind::RecvInto => {
                let Some(fd) = plain_socket_fd(sock)? else {
                    return Ok(None);
                };
                // socket.recv_into(buf) takes any writable contiguous buffer (`w*`); for
                // anything else asyncio's path gives the socket's own TypeError.
                let Ok(view) = ByteView::get(arg, true) else {
                    return Ok(None);
                };
                match recv_into(fd, &view) {
                    Ok(n) => {
                        return Ok(Some(Step::Return(n.into_pyobject(py)?.into_any().unbind())))
                    }
                    Err(e) if would_block(&e) => {}
                    Err(e) => return Err(os_error(e)),
                }
                (fd, Pending::RecvInto(arg.clone().unbind()))
            }
            Kind::SendAll => {
                let Some(fd) = plain_socket_fd(sock)? else {
                    return Ok(None);
                };
                let Ok(view) = ByteView::get(arg, false) else {
                    return Ok(None);
                };
                // asyncio compares the count sent with len(data) and slices a memoryview by
                // items: the same as bytes only when len() is the byte count.
                if arg.len()? != view.len() {
                    return Ok(None);
                }
                let n = match transports::send(fd, view.as_slice()) {
                    Ok(n) => n,
                    Err(e) if would_block(&e) => 0,
                    Err(e) => return Err(os_error(e)),
                };
                if n == view.len() {
                    return Ok(Some(Step::Return(py.None())));
                }
                (
                    fd,
                    Pending::SendAll {
                        view: HeldView(view),
                        pos: n,
                    },
                )
            }
            Kind::Connect => {
                let Some(fd) = plain_socket_fd(sock)? else {
                    return Ok(None);
                };
                let Some(address) = connect_address(loop_, sock, arg)? else {
                    return Ok(None);
                };
                // asyncio's `_sock_connect`: the socket's own connect; not finished yet
                // (BlockingIOError: EINPROGRESS, or InterruptedError) waits for writability.
                let call_args = PyTuple::new(py, [&address])?;
                match call_socket(sock, intern!(py, "connect"), &call_args, false)? {
                    Some(_) => return Ok(Some(Step::Return(py.None()))),
                    None => (fd, Pending::Connect(address.unbind())),
                }
            }
            Kind::RecvFrom | Kind::RecvFromInto | Kind::SendTo | Kind::Accept => {
                let Some(fd) = plain_socket_fd(sock)? else {
                    return Ok(None);
                };
                // These return addresses: the socket's own (C) method makes them, called
                // from here instead of from a coroutine frame.
                let (name, call_args) = match self.kind {
                    Kind::RecvFrom => (intern!(py, "recvfrom"), args.clone()),
                    Kind::RecvFromInto => {
                        let buf = args.get_item(0)?;
                        let nbytes = args.get_item(1)?;
                        let nbytes = if nbytes.is_truthy()? {
                            nbytes
                        } else {
                            buf.len()?.into_pyobject(py)?.into_any()
                        };
                        (
                            intern!(py, "recvfrom_into"),
                            PyTuple::new(py, [buf, nbytes])?,
                        )
                    }
                    Kind::SendTo => (intern!(py, "sendto"), args.clone()),
                    _ => (intern!(py, "accept"), PyTuple::empty(py)),
                };
                let accept = self.kind == Kind::Accept;
                match call_socket(sock, name, &call_args, accept)? {
                    Some(v) => return Ok(Some(Step::Return(v))),
                    None => (
                        fd,
                        Pending::Call {
                            name: name.clone().unbind(),
                            args: call_args.unbind(),
                            accept,
                        },
                    ),
                }
            }
        };
        self.wait(loop_, sock, op).map(Some)
    }

    /// asyncio's slow path: a future completed by a reader (writer) callback, which a done
    /// callback removes however the future ends (result, error or cancellation).
    fn wait(
        &mut self,
        loop_: &Bound<'_, PyAny>,
        sock: &Bound<'_, PyAny>,
        op: (i32, Pending),
    ) -> PyResult<Step> {
        let py = loop_.py();
        let (fd, pending) = op;
        let write = matches!(self.kind, Kind::SendAll | Kind::SendTo | Kind::Connect);
        let fut = loop_.call_method0(intern!(py, "create_future"))?;
        ensure_fd_no_transport(loop_, fd)?;
        // The native loop registers a SockReady as a one-shot waiter (see
        // `reactor::Registration`): its event disarms it, so no epoll_ctl removes it.
        let waiter = loop_
            .cast::<EventLoop>()
            .ok()
            .map(|l| (l.clone().unbind(), fd, write));
        let ready = SockReady {
            fut: Some(fut.clone().unbind()),
            sock: Some(sock.clone().unbind()),
            pending,
            waiter,
        };
        let handle = if write {
            loop_.call_method1(intern!(py, "_add_writer"), (fd, ready))?
        } else {
            loop_.call_method1(intern!(py, "_add_reader"), (fd, ready))?
        };
        let done = SockDone {
            loop_: Some(loop_.clone().unbind()),
            fd,
            write,
            handle: Some(handle.unbind()),
        };
        fut.call_method1(intern!(py, "add_done_callback"), (done,))?;
        let iter = fut.call_method0(intern!(py, "__await__"))?;
        self.state = State::Waiting {
            iter: iter.clone().unbind(),
            fut: fut.unbind(),
        };
        iter_send(&iter, &py.None().into_bound(py))
    }

    /// One resumption with `value` (None for `__next__`).
    fn resume(&mut self, py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<Step> {
        let r = match &self.state {
            State::Start => {
                if !value.is_none() {
                    return Err(PyTypeError::new_err(
                        "can't send non-None value to a just-started coroutine",
                    ));
                }
                // Mark it started first: an error below ends the coroutine.
                self.state = State::Done;
                self.start(py)
            }
            State::Waiting { iter, .. } | State::Delegate(iter) => {
                let iter = iter.bind(py).clone();
                iter_send(&iter, value)
            }
            State::Done => {
                return Err(PyRuntimeError::new_err(
                    "cannot reuse already awaited coroutine",
                ))
            }
        };
        if !matches!(r, Ok(Step::Yield(_))) {
            self.state = State::Done;
        }
        r
    }

    fn finish(py: Python<'_>, r: PyResult<Step>) -> PyResult<Py<PyAny>> {
        match r? {
            Step::Yield(v) => Ok(v),
            Step::Return(v) => Err(stop_iteration(py, v)),
        }
    }

    /// Cancel the pending future (its done callback removes the reader/writer).
    fn cancel_wait(py: Python<'_>, fut: &Py<PyAny>) -> PyResult<()> {
        fut.bind(py).call_method0(intern!(py, "cancel"))?;
        Ok(())
    }
}

#[pymethods]
impl SockCoro {
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.loop_)?;
        visit.call(&self.sock)?;
        visit.call(&self.args)?;
        match &self.state {
            State::Waiting { iter, fut } => {
                visit.call(iter)?;
                visit.call(fut)?;
            }
            State::Delegate(c) => visit.call(c)?,
            _ => {}
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        self.state = State::Done;
    }

    fn __await__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        // Returning None ends the iteration without a StopIteration object to make.
        match self.resume(py, &py.None().into_bound(py))? {
            Step::Yield(v) => Ok(Some(v)),
            Step::Return(v) if v.is_none(py) => Ok(None),
            Step::Return(v) => Err(stop_iteration(py, v)),
        }
    }

    fn send(&mut self, py: Python<'_>, value: Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let r = self.resume(py, &value);
        Self::finish(py, r)
    }

    #[pyo3(signature = (typ, val=None, tb=None))]
    fn throw(
        &mut self,
        py: Python<'_>,
        typ: Bound<'_, PyAny>,
        val: Option<Bound<'_, PyAny>>,
        tb: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Delegate(coro) => {
                let coro = coro.bind(py);
                let mut args = vec![typ];
                args.extend(val);
                args.extend(tb);
                let args = pyo3::types::PyTuple::new(py, args)?;
                match coro.call_method1(intern!(py, "throw"), args) {
                    Ok(v) => {
                        // Still running: it caught the exception and awaits again.
                        self.state = State::Delegate(coro.clone().unbind());
                        Ok(v.unbind())
                    }
                    Err(e) => Err(e),
                }
            }
            State::Waiting { fut, .. } => {
                // asyncio's coroutine would leave its reader registered until the future
                // is collected: cancel it so the done callback removes the reader now.
                let exc = crate::py::thrown_exception(typ, val, tb)?;
                Self::cancel_wait(py, &fut)?;
                Err(exc)
            }
            State::Start | State::Done => Err(crate::py::thrown_exception(typ, val, tb)?),
        }
    }

    fn close(&mut self, py: Python<'_>) -> PyResult<()> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Delegate(coro) => {
                coro.bind(py).call_method0(intern!(py, "close"))?;
            }
            State::Waiting { fut, .. } => Self::cancel_wait(py, &fut)?,
            State::Start | State::Done => {}
        }
        Ok(())
    }

    #[getter]
    fn __name__(&self) -> &'static str {
        self.kind.name()
    }

    /// asyncio's name for the method (they are all `BaseSelectorEventLoop`'s), as its
    /// coroutine's `__qualname__`: task reprs and the "never awaited" warning show it.
    #[getter]
    fn __qualname__(&self) -> String {
        format!("BaseSelectorEventLoop.{}", self.kind.name())
    }

    /// Where the coroutine was made, as a coroutine's `cr_origin` (see `coro_origin`).
    #[getter]
    fn cr_origin(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.origin.as_ref().map(|o| o.clone_ref(py))
    }

    /// The future awaited, as a coroutine's `cr_await` (None when not waiting natively).
    #[getter]
    fn cr_await(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        match &self.state {
            State::Waiting { fut, .. } => Some(fut.clone_ref(py)),
            State::Delegate(c) => Some(c.clone_ref(py)),
            _ => None,
        }
    }
}

/// What a waiting operation does when the socket is ready.
enum Pending {
    Recv(usize),
    RecvInto(Py<PyAny>),
    SendAll {
        view: HeldView,
        pos: usize,
    },
    /// `sock.<name>(*args)` (recvfrom, recvfrom_into, sendto, accept).
    Call {
        name: Py<PyString>,
        args: Py<PyTuple>,
        accept: bool,
    },
    /// A connect in progress to this (resolved) address.
    Connect(Py<PyAny>),
}

/// `sock.<name>(*args)`: its result, or None when the socket is not ready (asyncio's
/// BlockingIOError/InterruptedError). `accept` makes the new connection non-blocking.
fn call_socket(
    sock: &Bound<'_, PyAny>,
    name: &Bound<'_, PyString>,
    args: &Bound<'_, PyTuple>,
    accept: bool,
) -> PyResult<Option<Py<PyAny>>> {
    let py = sock.py();
    match sock.call_method1(name, args) {
        Ok(v) => {
            if accept {
                v.get_item(0)?
                    .call_method1(intern!(py, "setblocking"), (false,))?;
            }
            Ok(Some(v.unbind()))
        }
        Err(e)
            if e.is_instance_of::<pyo3::exceptions::PyBlockingIOError>(py)
                || e.is_instance_of::<pyo3::exceptions::PyInterruptedError>(py) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The reader (writer) of a waiting operation: asyncio's `_sock_recv`, `_sock_recv_into`
/// and `_sock_sendall` callbacks.
#[pyclass(module = "ferroloop._ferroloop")]
pub struct SockReady {
    fut: Option<Py<PyAny>>,
    sock: Option<Py<PyAny>>,
    pending: Pending,
    /// The native loop's registration (loop, fd, write): a one-shot waiter, re-armed when
    /// called too early.
    waiter: Option<(Py<EventLoop>, i32, bool)>,
}

impl SockReady {
    /// Not done after this event (the socket was not ready after all, or a send was
    /// partial): a one-shot waiter asks for another event, as a level-triggered one gets.
    fn wait_more(&self, py: Python<'_>) {
        if let Some((l, fd, write)) = &self.waiter {
            event_loop::rearm_waiter(l.bind(py), *fd, *write);
        }
    }
}

#[pymethods]
impl SockReady {
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(f) = &self.fut {
            visit.call(f)?;
        }
        if let Some(s) = &self.sock {
            visit.call(s)?;
        }
        if let Some((l, _, _)) = &self.waiter {
            visit.call(l)?;
        }
        match &self.pending {
            Pending::RecvInto(b) => visit.call(b)?,
            Pending::Call { args, .. } => visit.call(args)?,
            Pending::Connect(address) => visit.call(address)?,
            _ => {}
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        self.fut = None;
        self.sock = None;
        self.waiter = None;
    }

    fn __call__(&mut self, py: Python<'_>) -> PyResult<()> {
        let (Some(fut), Some(sock)) = (&self.fut, &self.sock) else {
            return Ok(());
        };
        let fut = fut.bind(py).clone();
        if fut.call_method0(intern!(py, "done"))?.is_truthy()? {
            return Ok(());
        }
        if let Pending::Call { name, args, accept } = &self.pending {
            let sock = sock.bind(py).clone();
            match call_socket(&sock, name.bind(py), args.bind(py), *accept) {
                Ok(Some(v)) => {
                    fut.call_method1(intern!(py, "set_result"), (v,))?;
                }
                Ok(None) => self.wait_more(py),
                Err(e) if is_exit(py, &e) => return Err(e),
                Err(e) => {
                    fut.call_method1(intern!(py, "set_exception"), (e.into_value(py),))?;
                }
            }
            return Ok(());
        }
        if let Pending::Connect(address) = &self.pending {
            match connect_result(sock.bind(py), address.bind(py)) {
                Ok(()) => {
                    fut.call_method1(intern!(py, "set_result"), (py.None(),))?;
                }
                Err(e)
                    if e.is_instance_of::<pyo3::exceptions::PyBlockingIOError>(py)
                        || e.is_instance_of::<pyo3::exceptions::PyInterruptedError>(py) =>
                {
                    self.wait_more(py)
                }
                Err(e) if is_exit(py, &e) => return Err(e),
                Err(e) => {
                    fut.call_method1(intern!(py, "set_exception"), (e.into_value(py),))?;
                }
            }
            return Ok(());
        }
        // The socket's current fd, as asyncio's `sock.recv` uses: -1 once it is closed, so
        // a closed socket gives EBADF rather than reading whatever reused the number.
        let fd: i32 = sock
            .bind(py)
            .call_method0(intern!(py, "fileno"))?
            .extract()?;
        // Ok(None): not ready yet (or not all sent), try again on the next event.
        let result: PyResult<Option<Py<PyAny>>> = match &mut self.pending {
            Pending::Recv(n) => match recv_bytes(py, fd, *n) {
                Ok(b) => Ok(Some(b.into_any().unbind())),
                Err(e) => io_outcome(e),
            },
            Pending::RecvInto(buf) => match ByteView::get(buf.bind(py), true) {
                Ok(view) => match recv_into(fd, &view) {
                    Ok(n) => Ok(Some(n.into_pyobject(py)?.into_any().unbind())),
                    Err(e) => io_outcome(e),
                },
                Err(e) => Err(e),
            },
            Pending::Call { .. } | Pending::Connect(_) => Ok(None),
            Pending::SendAll { view, pos } => {
                match transports::send(fd, &view.0.as_slice()[*pos..]) {
                    Ok(n) => {
                        *pos += n;
                        Ok((*pos == view.0.len()).then(|| py.None()))
                    }
                    Err(e) => io_outcome(e),
                }
            }
        };
        match result {
            Ok(Some(v)) => {
                fut.call_method1(intern!(py, "set_result"), (v,))?;
            }
            Ok(None) => self.wait_more(py),
            Err(e) if is_exit(py, &e) => return Err(e),
            // asyncio hands every other error to the future.
            Err(e) => {
                fut.call_method1(intern!(py, "set_exception"), (e.into_value(py),))?;
            }
        }
        Ok(())
    }
}

/// asyncio's `_sock_connect_cb` check once the socket is writable: the socket's
/// `SO_ERROR`, nonzero raised as `OSError(err, f'Connect call failed {address}')` (a
/// BlockingIOError or InterruptedError means "not yet", as there).
fn connect_result(sock: &Bound<'_, PyAny>, address: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = sock.py();
    let err: i32 = sock
        .call_method1(
            intern!(py, "getsockopt"),
            (libc::SOL_SOCKET, libc::SO_ERROR),
        )?
        .extract()?;
    if err == 0 {
        return Ok(());
    }
    // f'Connect call failed {address}': str.format formats the same way (format(address, '')).
    let msg = PyString::new(py, "Connect call failed {}")
        .call_method1(intern!(py, "format"), (address,))?;
    // OSError(errno, msg) picks the subclass (ConnectionRefusedError, ...) as asyncio's does.
    let exc =
        <pyo3::exceptions::PyOSError as pyo3::PyTypeInfo>::type_object(py).call1((err, msg))?;
    Err(PyErr::from_value(exc))
}

/// A failed syscall in a reader/writer: not ready (try again later) or the OSError.
fn io_outcome(e: io::Error) -> PyResult<Option<Py<PyAny>>> {
    if would_block(&e) || e.kind() == io::ErrorKind::Interrupted {
        Ok(None)
    } else {
        Err(os_error(e))
    }
}

/// The done callback of a waiting operation's future: asyncio's `_sock_read_done` /
/// `_sock_write_done` (remove the reader/writer unless it was already replaced).
#[pyclass(module = "ferroloop._ferroloop")]
pub struct SockDone {
    loop_: Option<Py<PyAny>>,
    fd: i32,
    write: bool,
    handle: Option<Py<PyAny>>,
}

#[pymethods]
impl SockDone {
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(l) = &self.loop_ {
            visit.call(l)?;
        }
        if let Some(h) = &self.handle {
            visit.call(h)?;
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        self.loop_ = None;
        self.handle = None;
    }

    fn __call__(&mut self, py: Python<'_>, _fut: Bound<'_, PyAny>) -> PyResult<()> {
        let (Some(loop_), Some(handle)) = (self.loop_.take(), self.handle.take()) else {
            return Ok(());
        };
        if handle
            .bind(py)
            .call_method0(intern!(py, "cancelled"))?
            .is_truthy()?
        {
            return Ok(());
        }
        // asyncio's public remove_reader/remove_writer: the transport check, then removal.
        let loop_ = loop_.bind(py);
        ensure_fd_no_transport(loop_, self.fd)?;
        let name = if self.write {
            intern!(py, "_remove_writer")
        } else {
            intern!(py, "_remove_reader")
        };
        loop_.call_method1(name, (self.fd,))?;
        Ok(())
    }
}

fn new_coro<'py, const N: usize>(
    kind: Kind,
    loop_: Bound<'py, PyAny>,
    sock: Bound<'py, PyAny>,
    args: [Bound<'py, PyAny>; N],
) -> PyResult<SockCoro> {
    let py = loop_.py();
    let debug = loop_
        .cast::<EventLoop>()
        .is_ok_and(|l| l.try_borrow().is_ok_and(|l| l.is_debug()));
    Ok(SockCoro {
        kind,
        origin: if debug { coro_origin(py)? } else { None },
        loop_: loop_.unbind(),
        sock: sock.unbind(),
        args: PyTuple::new(py, args)?.unbind(),
        state: State::Start,
    })
}

/// `cr_origin` as CPython computes it for a new coroutine: (filename, line, function) of
/// the innermost frames, as many as `sys.set_coroutine_origin_tracking_depth()` asked for
/// (asyncio's debug mode sets it while the loop runs); None when tracking is off. Only a
/// debug-mode loop's coroutines ask, so the fast path makes no call.
fn coro_origin(py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
    let sys = py.import(intern!(py, "sys"))?;
    let depth: usize = sys
        .call_method0(intern!(py, "get_coroutine_origin_tracking_depth"))?
        .extract()?;
    if depth == 0 {
        return Ok(None);
    }
    let mut frames = Vec::with_capacity(depth);
    let mut frame = sys.call_method1(intern!(py, "_getframe"), (0,))?;
    while !frame.is_none() && frames.len() < depth {
        let code = frame.getattr(intern!(py, "f_code"))?;
        frames.push(PyTuple::new(
            py,
            [
                code.getattr(intern!(py, "co_filename"))?,
                frame.getattr(intern!(py, "f_lineno"))?,
                code.getattr(intern!(py, "co_name"))?,
            ],
        )?);
        frame = frame.getattr(intern!(py, "f_back"))?;
    }
    Ok(Some(PyTuple::new(py, frames)?.into_any().unbind()))
}

/// `loop.sock_recv(sock, n)`: receive up to n bytes from the socket.
#[pyfunction]
#[pyo3(name = "sock_recv", signature = (loop_, sock, n))]
fn sock_recv(
    loop_: Bound<'_, PyAny>,
    sock: Bound<'_, PyAny>,
    n: Bound<'_, PyAny>,
) -> PyResult<SockCoro> {
    new_coro(Kind::Recv, loop_, sock, [n])
}

/// `loop.sock_recv_into(sock, buf)`: receive into a writable buffer; the byte count.
#[pyfunction]
#[pyo3(name = "sock_recv_into", signature = (loop_, sock, buf))]
fn sock_recv_into(
    loop_: Bound<'_, PyAny>,
    sock: Bound<'_, PyAny>,
    buf: Bound<'_, PyAny>,
) -> PyResult<SockCoro> {
    new_coro(Kind::RecvInto, loop_, sock, [buf])
}

/// `loop.sock_sendall(sock, data)`: send all of data to the connected socket.
#[pyfunction]
#[pyo3(name = "sock_sendall", signature = (loop_, sock, data))]
fn sock_sendall(
    loop_: Bound<'_, PyAny>,
    sock: Bound<'_, PyAny>,
    data: Bound<'_, PyAny>,
) -> PyResult<SockCoro> {
    new_coro(Kind::SendAll, loop_, sock, [data])
}

// CPython's `instancemethod` constructor (not in pyo3-ffi): a descriptor that binds any
// callable like a function.
extern "C" {
    fn PyInstanceMethod_New(func: *mut ffi::PyObject) -> *mut ffi::PyObject;
}

/// `loop.sock_recvfrom(sock, bufsize)`: receive a datagram; (bytes, address).
#[pyfunction]
#[pyo3(name = "sock_recvfrom", signature = (loop_, sock, bufsize))]
fn sock_recvfrom(
    loop_: Bound<'_, PyAny>,
    sock: Bound<'_, PyAny>,
    bufsize: Bound<'_, PyAny>,
) -> PyResult<SockCoro> {
    new_coro(Kind::RecvFrom, loop_, sock, [bufsize])
}

/// `loop.sock_recvfrom_into(sock, buf, nbytes=0)`: (byte count, address).
#[pyfunction]
#[pyo3(name = "sock_recvfrom_into", signature = (loop_, sock, buf, nbytes=None))]
fn sock_recvfrom_into<'py>(
    loop_: Bound<'py, PyAny>,
    sock: Bound<'py, PyAny>,
    buf: Bound<'py, PyAny>,
    nbytes: Option<Bound<'py, PyAny>>,
) -> PyResult<SockCoro> {
    let py = loop_.py();
    let nbytes = nbytes.unwrap_or_else(|| 0i32.into_pyobject(py).unwrap().into_any());
    new_coro(Kind::RecvFromInto, loop_, sock, [buf, nbytes])
}

/// `loop.sock_sendto(sock, data, address)`: send a datagram; the byte count.
#[pyfunction]
#[pyo3(name = "sock_sendto", signature = (loop_, sock, data, address))]
fn sock_sendto<'py>(
    loop_: Bound<'py, PyAny>,
    sock: Bound<'py, PyAny>,
    data: Bound<'py, PyAny>,
    address: Bound<'py, PyAny>,
) -> PyResult<SockCoro> {
    new_coro(Kind::SendTo, loop_, sock, [data, address])
}

/// `loop.sock_connect(sock, address)`: connect to the address (resolved as asyncio does).
#[pyfunction]
#[pyo3(name = "sock_connect", signature = (loop_, sock, address))]
fn sock_connect<'py>(
    loop_: Bound<'py, PyAny>,
    sock: Bound<'py, PyAny>,
    address: Bound<'py, PyAny>,
) -> PyResult<SockCoro> {
    new_coro(Kind::Connect, loop_, sock, [address])
}

/// `loop.sock_accept(sock)`: (conn, address), conn non-blocking.
#[pyfunction]
#[pyo3(name = "sock_accept", signature = (loop_, sock))]
fn sock_accept(loop_: Bound<'_, PyAny>, sock: Bound<'_, PyAny>) -> PyResult<SockCoro> {
    new_coro::<0>(Kind::Accept, loop_, sock, [])
}

/// `am_send` of `SockCoro`: the slot `PyIter_Send` uses (3.11's `await` and ferroloop's Task
/// step), so a returned value needs no StopIteration object. PyO3 has no way to declare it.
///
/// # Safety
/// Called by CPython with the GIL held, `slf` a live `SockCoro`, `arg` a live object.
unsafe extern "C" fn sock_coro_am_send(
    slf: *mut ffi::PyObject,
    arg: *mut ffi::PyObject,
    result: *mut *mut ffi::PyObject,
) -> ffi::PySendResult {
    // SAFETY: CPython calls slots with the GIL held.
    let py = unsafe { Python::assume_attached() };
    // SAFETY: both pointers are live borrowed references for the duration of the call.
    let (obj, arg) = unsafe {
        (
            Bound::from_borrowed_ptr(py, slf),
            Bound::from_borrowed_ptr(py, arg),
        )
    };
    // A panic must not unwind into CPython (it would abort the process): it becomes
    // PyO3's PanicException, as in TaskIter's slot.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let coro = obj.cast::<SockCoro>()?;
        let mut c = coro.try_borrow_mut()?;
        c.resume(py, &arg)
    }));
    let r = outcome.unwrap_or_else(|_| {
        Err(pyo3::panic::PanicException::new_err(
            "panic in a sock_* coroutine",
        ))
    });
    match r {
        Ok(Step::Yield(v)) => {
            // SAFETY: `result` is a valid out pointer; CPython takes the new reference.
            unsafe { *result = v.into_ptr() };
            ffi::PySendResult::PYGEN_NEXT
        }
        Ok(Step::Return(v)) => {
            // SAFETY: as above.
            unsafe { *result = v.into_ptr() };
            ffi::PySendResult::PYGEN_RETURN
        }
        Err(e) => {
            e.restore(py);
            // SAFETY: as above.
            unsafe { *result = std::ptr::null_mut() };
            ffi::PySendResult::PYGEN_ERROR
        }
    }
}

static BASE_DEALLOC: std::sync::OnceLock<ffi::destructor> = std::sync::OnceLock::new();

impl crate::py::Finalized for SockCoro {
    fn base_dealloc() -> &'static std::sync::OnceLock<ffi::destructor> {
        &BASE_DEALLOC
    }
}

/// `tp_finalize`: a coroutine freed before it was ever started warns as CPython's do
/// (`warnings._warn_unawaited_coroutine`: "coroutine '...' was never awaited", with
/// `cr_origin` when tracked). A closed one (`close()` marks it done) does not.
unsafe extern "C" fn sock_coro_finalize(obj: *mut ffi::PyObject) {
    // SAFETY: CPython calls tp_finalize with the GIL held and `obj` alive.
    let py = unsafe { Python::assume_attached() };
    // SAFETY: `obj` is a live SockCoro, borrowed for this call.
    let any = unsafe { Bound::from_borrowed_ptr(py, obj) };
    let unstarted = any.cast::<SockCoro>().is_ok_and(|c| {
        c.try_borrow()
            .is_ok_and(|c| matches!(c.state, State::Start))
    });
    if !unstarted {
        return;
    }
    let saved = PyErr::take(py);
    let warned = py
        .import(intern!(py, "warnings"))
        .and_then(|w| w.call_method1(intern!(py, "_warn_unawaited_coroutine"), (&any,)));
    if let Err(e) = warned {
        e.write_unraisable(py, Some(&any));
    }
    if let Some(e) = saved {
        e.restore(py);
    }
}

/// `Py_TPFLAGS_HAVE_AM_SEND` (3.10+; not in pyo3-ffi).
const TPFLAGS_HAVE_AM_SEND: std::os::raw::c_ulong = 1 << 21;

fn install_am_send(py: Python<'_>) {
    let tp = <SockCoro as pyo3::PyTypeInfo>::type_object(py).as_type_ptr();
    // SAFETY: the type object is live; its `tp_as_async` (PyO3 fills it for `__await__`)
    // points into the heap type itself. Set once, before any instance exists.
    unsafe {
        let am = (*tp).tp_as_async;
        if !am.is_null() {
            (*am).am_send = Some(sock_coro_am_send);
            (*tp).tp_flags |= TPFLAGS_HAVE_AM_SEND;
        }
    }
}

/// Add the operations to the module as methods: each is wrapped in an `instancemethod`, so
/// a class attribute binds to the loop like a Python function (no Python frame per call).
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    ipaddr::init(py)?;
    m.add_function(wrap_pyfunction!(recv, m)?)?;
    m.add_class::<SockCoro>()?;
    install_am_send(py);
    crate::py::install_finalizer::<SockCoro>(py, sock_coro_finalize);
    for f in [
        wrap_pyfunction!(sock_recv, m)?,
        wrap_pyfunction!(sock_recv_into, m)?,
        wrap_pyfunction!(sock_sendall, m)?,
        wrap_pyfunction!(sock_recvfrom, m)?,
        wrap_pyfunction!(sock_recvfrom_into, m)?,
        wrap_pyfunction!(sock_sendto, m)?,
        wrap_pyfunction!(sock_accept, m)?,
        wrap_pyfunction!(sock_connect, m)?,
    ] {
        add_method(m, f.as_any())?;
    }
    sendfile::register(m)
}

/// Add `f` to the module under its `__name__`, wrapped in an `instancemethod` so that a
/// class attribute binds to the loop like a Python function.
pub(crate) fn add_method(m: &Bound<'_, PyModule>, f: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = m.py();
    let name = f.getattr(intern!(py, "__name__"))?;
    // SAFETY: `f` is a live callable; PyInstanceMethod_New returns a new reference or
    // NULL with an error set.
    let method = unsafe { Bound::from_owned_ptr_or_err(py, PyInstanceMethod_New(f.as_ptr()))? };
    m.add(name.cast_into::<pyo3::types::PyString>()?, method)
}
