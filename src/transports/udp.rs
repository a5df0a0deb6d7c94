//! The native hot paths of the datagram transport (asyncio's
//! `selector_events._SelectorDatagramTransport`): `_read_ready` (one `recvfrom` into a reused
//! buffer, one `bytes` per datagram) and `sendto` when nothing is queued.
//! `ferroloop.datagram._SelectorDatagramTransport` (a subclass of asyncio's own class, so
//! close/abort/repr/`_sendto_ready`/`_fatal_error` are asyncio's for the running Python) owns
//! one and keeps its `_protocol`, `_conn_lost`, `_buffer` and `_address` here.
//!
//! File descriptors: the socket is owned by the `socket.socket` the Python transport holds
//! (closed by asyncio's `_call_connection_lost`); the core borrows the fd number and makes
//! no syscall on it once `conn_lost` is set.
//!
//! Borrows of the core are never held across a call into Python.

use std::io;
use std::os::unix::io::RawFd;

use pyo3::exceptions::{PyBlockingIOError, PyInterruptedError, PyOSError};
use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};
use pyo3::{PyTraverseError, PyVisit};

use super::{replace_field, send, would_block, ByteView};
use crate::errors::os_error;

/// A raw socket address as `recvfrom` filled it in.
#[derive(Clone, Copy)]
struct RawAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl RawAddr {
    fn zeroed() -> Self {
        RawAddr {
            // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value (CPython
            // zeroes its address buffer before recvfrom too, which AF_UNIX decoding relies on).
            storage: unsafe { std::mem::zeroed() },
            len: std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t,
        }
    }

    fn bytes(&self) -> &[u8] {
        let len = (self.len as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
        // SAFETY: `storage` is `size_of::<sockaddr_storage>()` initialised bytes; len is clamped.
        unsafe {
            std::slice::from_raw_parts((&self.storage as *const libc::sockaddr_storage).cast(), len)
        }
    }
}

/// `recvfrom(fd, max_size)` through the thread's reusable buffer: the datagram as `bytes`
/// and its raw sender address.
fn recvfrom(
    py: Python<'_>,
    fd: RawFd,
    max_size: usize,
) -> io::Result<(Bound<'_, PyBytes>, RawAddr)> {
    let mut addr = RawAddr::zeroed();
    let data = crate::sockets::read_through_buffer(py, max_size, |ptr, len| {
        // SAFETY: recvfrom writes at most `len` bytes at `ptr` and at most addr.len bytes
        // into the address storage.
        unsafe {
            libc::recvfrom(
                fd,
                ptr.cast(),
                len,
                0,
                (&mut addr.storage as *mut libc::sockaddr_storage).cast(),
                &mut addr.len,
            )
        }
    })?;
    Ok((data, addr))
}

extern "C" {
    /// POSIX `inet_ntop` (not bound by the libc crate).
    fn inet_ntop(
        af: libc::c_int,
        src: *const libc::c_void,
        dst: *mut libc::c_char,
        size: libc::socklen_t,
    ) -> *const libc::c_char;
}

/// `inet_ntop` (CPython's own formatting of IPv4/IPv6 hosts).
fn ntop(family: libc::c_int, src: *const libc::c_void) -> PyResult<String> {
    let mut out = [0 as libc::c_char; 64];
    // SAFETY: `src` points at an in_addr/in6_addr inside a live sockaddr; `out` is large
    // enough for INET6_ADDRSTRLEN (46) and inet_ntop NUL-terminates it.
    let p = unsafe { inet_ntop(family, src, out.as_mut_ptr(), out.len() as libc::socklen_t) };
    if p.is_null() {
        return Err(os_error(io::Error::last_os_error()));
    }
    // SAFETY: inet_ntop succeeded, so `out` holds a NUL-terminated ASCII string.
    let s = unsafe { std::ffi::CStr::from_ptr(out.as_ptr()) };
    Ok(s.to_string_lossy().into_owned())
}

/// The address object `socket.recvfrom` returns for `addr` (CPython's `makesockaddr`):
/// (host, port) for AF_INET, (host, port, flowinfo, scope_id) for AF_INET6, str (bytes for
/// Linux's abstract namespace) for AF_UNIX, None for an empty address.
fn address_object<'py>(py: Python<'py>, addr: &RawAddr) -> PyResult<Bound<'py, PyAny>> {
    if addr.len == 0 {
        return Ok(py.None().into_bound(py));
    }
    let sa = &addr.storage as *const libc::sockaddr_storage;
    match addr.storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in (family AF_INET) into the storage.
            let sin = unsafe { &*(sa as *const libc::sockaddr_in) };
            let host = ntop(
                libc::AF_INET,
                (&sin.sin_addr as *const libc::in_addr).cast(),
            )?;
            Ok((host, u16::from_be(sin.sin_port))
                .into_pyobject(py)?
                .into_any())
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 (family AF_INET6) into the storage.
            let sin6 = unsafe { &*(sa as *const libc::sockaddr_in6) };
            let host = ntop(
                libc::AF_INET6,
                (&sin6.sin6_addr as *const libc::in6_addr).cast(),
            )?;
            Ok((
                host,
                u16::from_be(sin6.sin6_port),
                u32::from_be(sin6.sin6_flowinfo),
                sin6.sin6_scope_id,
            )
                .into_pyobject(py)?
                .into_any())
        }
        libc::AF_UNIX => {
            // SAFETY: the kernel wrote a sockaddr_un (family AF_UNIX) into the storage.
            let sun = unsafe { &*(sa as *const libc::sockaddr_un) };
            let offset = std::mem::size_of::<libc::sa_family_t>();
            let path_len = (addr.len as usize)
                .saturating_sub(offset)
                .min(sun.sun_path.len());
            // SAFETY: sun_path is an array of c_char, the same layout as u8.
            let path: &[u8] = unsafe {
                std::slice::from_raw_parts(sun.sun_path.as_ptr().cast(), sun.sun_path.len())
            };
            if path_len > 0 && path[0] == 0 {
                return Ok(PyBytes::new(py, &path[..path_len]).into_any());
            }
            let end = path.iter().position(|&b| b == 0).unwrap_or(path.len());
            // SAFETY: a valid pointer and length; DecodeFSDefaultAndSize returns a new
            // reference or NULL with an exception set.
            unsafe {
                let obj = ffi::PyUnicode_DecodeFSDefaultAndSize(
                    path.as_ptr().cast(),
                    end as ffi::Py_ssize_t,
                );
                Bound::from_owned_ptr_or_err(py, obj)
            }
        }
        _ => Err(os_error(io::Error::from_raw_os_error(libc::EAFNOSUPPORT))),
    }
}

#[pyclass(module = "ferroloop._ferroloop")]
pub struct DatagramCore {
    fd: RawFd,
    loop_: Py<PyAny>,
    transport: Py<PyAny>,
    /// The `socket.socket` (sends to addresses this core did not produce go through it).
    sock: Py<PyAny>,
    protocol: Py<PyAny>,
    /// asyncio's `_buffer` (a deque of (bytes, addr)); only its emptiness is read here.
    buffer: Py<PyAny>,
    /// asyncio's `_address` (the remote address of a connected endpoint, else None).
    address: Py<PyAny>,
    /// asyncio's `_extra['peername']` is set: `send` instead of `sendto`.
    connected: bool,
    conn_lost: usize,
    max_size: usize,
    /// AF_INET, AF_INET6 or AF_UNIX: addresses are decoded here; other families read
    /// through `sock.recvfrom`.
    native_family: bool,
    /// The address object of the last datagram and its raw form: the same sender gets the
    /// same object, and `sendto(data, that_object)` needs no address parsing.
    last_addr: Option<(Py<PyAny>, RawAddr)>,
    /// asyncio's own `_SelectorDatagramTransport.sendto`, for every case but the hot one.
    py_sendto: Py<PyAny>,
}

/// The address object for `raw`, reusing the last one when the sender is the same.
fn cached_address<'py>(
    slf: &Bound<'py, DatagramCore>,
    raw: &RawAddr,
) -> PyResult<Bound<'py, PyAny>> {
    let py = slf.py();
    if let Some((obj, last)) = &slf.borrow().last_addr {
        if last.bytes() == raw.bytes() {
            return Ok(obj.bind(py).clone());
        }
    }
    let obj = address_object(py, raw)?;
    let family = raw.storage.ss_family as libc::c_int;
    if family == libc::AF_INET || family == libc::AF_INET6 {
        slf.borrow_mut().last_addr = Some((obj.clone().unbind(), *raw));
    }
    Ok(obj)
}

/// `protocol.error_received(exc)`, called as asyncio calls it: inside its `except OSError`.
fn error_received(protocol: &Bound<'_, PyAny>, err: PyErr) -> PyResult<()> {
    let py = protocol.py();
    let exc = err.into_value(py).into_bound(py).into_any();
    crate::py::while_handling(&exc, || {
        protocol.call_method1(intern!(py, "error_received"), (&exc,))
    })?;
    Ok(())
}

fn fatal_error(slf: &Bound<'_, DatagramCore>, err: PyErr, message: &str) -> PyResult<()> {
    let transport = slf.borrow().transport.clone_ref(slf.py());
    super::fatal_error(transport.bind(slf.py()), err, message)
}

fn read_ready(slf: &Bound<'_, DatagramCore>) -> PyResult<()> {
    let py = slf.py();
    let (fd, max_size, native, protocol) = {
        let s = slf.borrow();
        if s.conn_lost > 0 {
            return Ok(());
        }
        (s.fd, s.max_size, s.native_family, s.protocol.clone_ref(py))
    };
    let protocol = protocol.into_bound(py);
    let (data, addr) = if native {
        match recvfrom(py, fd, max_size) {
            Ok((data, raw)) => match cached_address(slf, &raw) {
                Ok(addr) => (data.into_any(), addr),
                Err(e) => return fatal_error(slf, e, "Fatal read error on datagram transport"),
            },
            Err(e) if would_block(&e) => return Ok(()),
            Err(e) => {
                error_received(&protocol, os_error(e))?;
                return Ok(());
            }
        }
    } else {
        let sock = slf.borrow().sock.clone_ref(py);
        match sock
            .bind(py)
            .call_method1(intern!(py, "recvfrom"), (max_size,))
        {
            Ok(pair) => {
                let (d, a): (Bound<'_, PyAny>, Bound<'_, PyAny>) = pair.extract()?;
                (d, a)
            }
            Err(e)
                if e.value(py).is_instance_of::<PyBlockingIOError>()
                    || e.value(py).is_instance_of::<PyInterruptedError>() =>
            {
                return Ok(())
            }
            Err(e) if e.value(py).is_instance_of::<PyOSError>() => {
                error_received(&protocol, e)?;
                return Ok(());
            }
            Err(e) => return fatal_error(slf, e, "Fatal read error on datagram transport"),
        }
    };
    // asyncio lets an exception from datagram_received reach the loop's handler.
    protocol.call_method1(intern!(py, "datagram_received"), (data, addr))?;
    Ok(())
}

/// `sendto(fd, bytes, raw)`, retrying EINTR as Python's `sock.sendto`.
fn sendto_raw(fd: RawFd, bytes: &[u8], addr: &RawAddr) -> io::Result<usize> {
    loop {
        // SAFETY: `bytes` is valid for its length and `addr` for `addr.len` bytes.
        let n = unsafe {
            libc::sendto(
                fd,
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&addr.storage as *const libc::sockaddr_storage).cast(),
                addr.len,
            )
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

fn sendto(
    slf: &Bound<'_, DatagramCore>,
    data: &Bound<'_, PyAny>,
    addr: Bound<'_, PyAny>,
) -> PyResult<()> {
    let py = slf.py();
    let (fd, connected, address, buffer, py_sendto, transport, gone) = {
        let s = slf.borrow();
        (
            s.fd,
            s.connected,
            s.address.clone_ref(py).into_bound(py),
            s.buffer.clone_ref(py).into_bound(py),
            s.py_sendto.clone_ref(py).into_bound(py),
            s.transport.clone_ref(py).into_bound(py),
            // After connection_lost the fd number may belong to someone else: no syscall.
            s.conn_lost > 0 || s.sock.is_none(py),
        )
    };
    let delegate = |addr: Bound<'_, PyAny>| -> PyResult<()> {
        py_sendto.call1((transport.clone(), data, addr))?;
        Ok(())
    };
    // Everything but "bytes-like, nothing queued, connection up" is asyncio's own code.
    if !super::is_bytes_like(data) || gone || buffer.len()? != 0 || data.len()? == 0 {
        return delegate(addr);
    }
    let mut addr = addr;
    if address.is_truthy()? {
        let allowed = PyTuple::new(py, [py.None().into_bound(py), address.clone()])?;
        if !allowed.contains(&addr)? {
            return delegate(addr);
        }
        addr = address;
    }
    let view = match ByteView::get(data, false) {
        Ok(v) => v,
        Err(e) => return fatal_error(slf, e, "Fatal write error on datagram transport"),
    };
    let raw = {
        let s = slf.borrow();
        match &s.last_addr {
            Some((obj, raw)) if !connected && obj.bind(py).is(&addr) => Some(*raw),
            _ => None,
        }
    };
    // Normalised errors (a lazily built OSError does not know its subclass yet).
    let res: PyResult<()> = if connected {
        send(fd, view.as_slice())
            .map(|_| ())
            .map_err(|e| PyErr::from_value(os_error(e).into_value(py).into_bound(py).into_any()))
    } else if let Some(raw) = raw {
        sendto_raw(fd, view.as_slice(), &raw)
            .map(|_| ())
            .map_err(|e| PyErr::from_value(os_error(e).into_value(py).into_bound(py).into_any()))
    } else {
        let sock = slf.borrow().sock.clone_ref(py);
        sock.bind(py)
            .call_method1(intern!(py, "sendto"), (data, &addr))
            .map(|_| ())
    };
    drop(view);
    match res {
        Ok(()) => Ok(()),
        Err(e)
            if e.value(py).is_instance_of::<PyBlockingIOError>()
                || e.value(py).is_instance_of::<PyInterruptedError>() =>
        {
            let (lp, cb) = (
                slf.borrow().loop_.clone_ref(py),
                transport.getattr(intern!(py, "_sendto_ready"))?,
            );
            lp.bind(py)
                .call_method1(intern!(py, "_add_writer"), (fd, cb))?;
            transport.call_method1(intern!(py, "_queue_datagram"), (data, addr))?;
            Ok(())
        }
        Err(e) if e.value(py).is_instance_of::<PyOSError>() => {
            let protocol = slf.borrow().protocol.clone_ref(py);
            error_received(protocol.bind(py), e)
        }
        Err(e) => fatal_error(slf, e, "Fatal write error on datagram transport"),
    }
}

#[pymethods]
impl DatagramCore {
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        loop_: Bound<'_, PyAny>,
        transport: Bound<'_, PyAny>,
        sock: Bound<'_, PyAny>,
        fd: RawFd,
        max_size: usize,
        native_family: bool,
        py_sendto: Bound<'_, PyAny>,
    ) -> Self {
        let py = loop_.py();
        DatagramCore {
            fd,
            loop_: loop_.unbind(),
            transport: transport.unbind(),
            sock: sock.unbind(),
            protocol: py.None(),
            buffer: PyTuple::empty(py).into_any().unbind(),
            address: py.None(),
            connected: false,
            conn_lost: 0,
            max_size,
            native_family,
            last_addr: None,
            py_sendto: py_sendto.unbind(),
        }
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.loop_)?;
        visit.call(&self.transport)?;
        visit.call(&self.sock)?;
        visit.call(&self.protocol)?;
        visit.call(&self.buffer)?;
        visit.call(&self.address)?;
        visit.call(&self.py_sendto)?;
        if let Some((obj, _)) = &self.last_addr {
            visit.call(obj)?;
        }
        Ok(())
    }

    fn __clear__(&mut self, py: Python<'_>) {
        self.loop_ = py.None();
        self.sock = py.None();
        self.protocol = py.None();
        self.last_addr = None;
        self.transport = py.None();
        self.buffer = py.None();
        self.address = py.None();
        self.py_sendto = py.None();
    }

    /// `transport.sendto(data, addr)`: sent at once when nothing is queued.
    #[pyo3(signature = (data, addr=None))]
    fn sendto(
        slf: &Bound<'_, Self>,
        data: &Bound<'_, PyAny>,
        addr: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let addr = addr.unwrap_or_else(|| slf.py().None().into_bound(slf.py()));
        sendto(slf, data, addr)
    }

    /// The loop's reader handle calls the core itself: asyncio's `_read_ready`.
    fn __call__(slf: &Bound<'_, Self>) -> PyResult<()> {
        read_ready(slf)
    }

    /// What asyncio's handle reprs show for the reader callback: asyncio's method name.
    #[getter]
    fn __qualname__(&self) -> &'static str {
        "_SelectorDatagramTransport._read_ready"
    }

    /// After `connection_lost`: forget the loop, socket and protocol (asyncio sets them to
    /// None); the transport stays, for asyncio's sendto on a closed transport.
    /// After `connection_lost`: the protocol goes first, with the core free (replace_field).
    fn _detach(slf: &Bound<'_, Self>) {
        let py = slf.py();
        replace_field(slf, |s| &mut s.protocol, py.None());
        replace_field(slf, |s| &mut s.sock, py.None());
        replace_field(slf, |s| &mut s.loop_, py.None());
        replace_field(slf, |s| &mut s.last_addr, None);
    }

    #[getter(_protocol)]
    fn get_protocol(&self, py: Python<'_>) -> Py<PyAny> {
        self.protocol.clone_ref(py)
    }

    #[setter(_protocol)]
    fn set_protocol(slf: &Bound<'_, Self>, value: Py<PyAny>) {
        replace_field(slf, |s| &mut s.protocol, value);
    }

    #[getter(_conn_lost)]
    fn get_conn_lost(&self) -> usize {
        self.conn_lost
    }

    #[setter(_conn_lost)]
    fn set_conn_lost(&mut self, value: usize) {
        self.conn_lost = value;
    }

    #[getter(_buffer)]
    fn get_buffer(&self, py: Python<'_>) -> Py<PyAny> {
        self.buffer.clone_ref(py)
    }

    #[setter(_buffer)]
    fn set_buffer(slf: &Bound<'_, Self>, value: Py<PyAny>) {
        replace_field(slf, |s| &mut s.buffer, value);
    }

    #[getter(_address)]
    fn get_address(&self, py: Python<'_>) -> Py<PyAny> {
        self.address.clone_ref(py)
    }

    #[setter(_address)]
    fn set_address(&mut self, value: Py<PyAny>) {
        self.address = value;
    }

    #[getter(connected)]
    fn get_connected(&self) -> bool {
        self.connected
    }

    #[setter(connected)]
    fn set_connected(&mut self, value: bool) {
        self.connected = value;
    }
}
