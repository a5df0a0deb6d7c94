//! The address `sock_connect` connects to: asyncio's `_ensure_resolved` when it needs no
//! getaddrinfo (`base_events._ipaddr_info`: a numeric host and port are the address).
//!
//! asyncio resolves the address of every AF_INET/AF_INET6 socket through a coroutine and
//! `_ipaddr_info`, which reads the socket's `family`, `type` and `proto` properties (each
//! an enum conversion in Python): about 5 µs per connect before the connect itself. Here
//! the socket's own fields are read and the usual shapes (a `str` host and an `int` port)
//! are answered by `inet_pton(3)`, the function Python's `socket.inet_pton` calls; any
//! other shape calls asyncio's `_ipaddr_info` itself.

use std::ffi::CString;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyInt, PyString, PyTuple};

// The C library's (not in the libc crate): what Python's `socket.inet_pton` calls.
extern "C" {
    fn inet_pton(af: libc::c_int, src: *const libc::c_char, dst: *mut libc::c_void) -> libc::c_int;
}

static BASE_EVENTS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
/// `base_events._ipaddr_info` as it was when this module was loaded (a patched one is
/// called instead of the native answer).
static IPADDR_INFO: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static ENSURE_RESOLVED: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
/// The `family`, `type` and `proto` fields of `_socket.socket` (member descriptors: the
/// values `socket.socket`'s properties turn into enums).
static FIELDS: PyOnceLock<[Py<PyAny>; 3]> = PyOnceLock::new();

fn base_events(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    BASE_EVENTS
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(py.import("asyncio.base_events")?.into_any().unbind())
        })
        .map(|m| m.bind(py))
}

/// Called when the module is loaded: remember asyncio's `_ipaddr_info`.
pub(super) fn init(py: Python<'_>) -> PyResult<()> {
    let f = base_events(py)?.getattr("_ipaddr_info")?.unbind();
    let _ = IPADDR_INFO.set(py, f);
    Ok(())
}

/// `(sock.family, sock.type, sock.proto)` as ints, for a plain `socket.socket`.
fn socket_kind(sock: &Bound<'_, PyAny>) -> PyResult<(i32, i32, i32)> {
    let py = sock.py();
    let fields = FIELDS.get_or_try_init(py, || {
        let cls = py.import("_socket")?.getattr("socket")?;
        let dict = cls.getattr("__dict__")?;
        Ok::<_, PyErr>([
            dict.get_item("family")?.unbind(),
            dict.get_item("type")?.unbind(),
            dict.get_item("proto")?.unbind(),
        ])
    })?;
    let get = |i: usize| -> PyResult<i32> {
        fields[i]
            .bind(py)
            .call_method1(intern!(py, "__get__"), (sock,))?
            .extract()
    };
    Ok((get(0)?, get(1)?, get(2)?))
}

/// Whether the loop's `_ensure_resolved` is asyncio's (an override must be called).
fn ensure_resolved_is_asyncios(loop_: &Bound<'_, PyAny>) -> PyResult<bool> {
    let py = loop_.py();
    let base = ENSURE_RESOLVED.get_or_try_init(py, || {
        Ok::<_, PyErr>(
            base_events(py)?
                .getattr("BaseEventLoop")?
                .getattr("_ensure_resolved")?
                .unbind(),
        )
    })?;
    Ok(
        match loop_
            .getattr(intern!(py, "_ensure_resolved"))
            .and_then(|m| m.getattr(intern!(py, "__func__")))
        {
            Ok(f) => f.is(base),
            Err(_) => false,
        },
    )
}

/// The address `sock_connect` connects to when asyncio would get it without a thread: an
/// AF_INET/AF_INET6 socket's address as `_ensure_resolved` returns it when `_ipaddr_info`
/// answers, any other family's as given. None when asyncio's coroutine must run (a name
/// to resolve, an address asyncio rejects, an overridden `_ensure_resolved`): it then
/// does everything itself (`_ipaddr_info` is pure, so calling it here changed nothing).
pub(super) fn connect_address<'py>(
    loop_: &Bound<'py, PyAny>,
    sock: &Bound<'py, PyAny>,
    address: &Bound<'py, PyAny>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    let py = loop_.py();
    let (family, type_, proto) = socket_kind(sock)?;
    if family != libc::AF_INET && family != libc::AF_INET6 {
        return Ok(Some(address.clone()));
    }
    if !ensure_resolved_is_asyncios(loop_)? {
        return Ok(None);
    }
    // _ensure_resolved: host, port = address[:2]
    let Ok(address) = address.cast_exact::<PyTuple>() else {
        return Ok(None);
    };
    if address.len() < 2 {
        return Ok(None);
    }
    let host = address.get_item(0)?;
    let port = address.get_item(1)?;
    let rest: Vec<_> = address.iter().skip(2).collect();
    let current = base_events(py)?.getattr(intern!(py, "_ipaddr_info"))?;
    if IPADDR_INFO.get(py).is_some_and(|f| current.is(f)) {
        if let Some(answer) = ipaddr_info(&host, &port, family, type_, proto, &rest)? {
            return Ok(answer);
        }
    }
    // _ipaddr_info(host, port, family, type, proto, *address[2:]), as asyncio calls it.
    let mut args = vec![
        host,
        port,
        sock.getattr(intern!(py, "family"))?,
        sock.getattr(intern!(py, "type"))?,
        sock.getattr(intern!(py, "proto"))?,
    ];
    args.extend(rest);
    match current.call1(PyTuple::new(py, args)?) {
        Ok(info) if !info.is_none() => Ok(Some(info.get_item(4)?)),
        _ => Ok(None),
    }
}

/// asyncio's `_ipaddr_info(...)[4]` (Some(None): not an IP address), for the shapes it is
/// sure of; None when `_ipaddr_info` itself must answer (its `int(port)`, `bytes` hosts,
/// errors).
#[allow(clippy::type_complexity)]
fn ipaddr_info<'py>(
    host: &Bound<'py, PyAny>,
    port: &Bound<'py, PyAny>,
    family: i32,
    type_: i32,
    proto: i32,
    rest: &[Bound<'py, PyAny>],
) -> PyResult<Option<Option<Bound<'py, PyAny>>>> {
    let py = host.py();
    if ![0, libc::IPPROTO_TCP, libc::IPPROTO_UDP].contains(&proto) || host.is_none() {
        return Ok(Some(None));
    }
    if type_ != libc::SOCK_STREAM && type_ != libc::SOCK_DGRAM {
        return Ok(Some(None));
    }
    // int(port) is the port itself only for an exact int.
    if !port.is_exact_instance_of::<PyInt>() || rest.len() > 2 {
        return Ok(None);
    }
    let Ok(host_str) = host.cast_exact::<PyString>() else {
        return Ok(None);
    };
    // socket.inet_pton passes the UTF-8 text on (and rejects NUL): plain ASCII only.
    let Ok(text) = host_str.to_str() else {
        return Ok(None);
    };
    if !text.is_ascii() || text.contains('\0') {
        return Ok(None);
    }
    if text.contains('%') {
        // Linux's inet_pton does not take a zone index: asyncio resolves it.
        return Ok(Some(None));
    }
    let Ok(c) = CString::new(text) else {
        return Ok(None);
    };
    let mut packed = [0u8; 16];
    // SAFETY: `c` is NUL-terminated; `packed` holds an in6_addr (or an in_addr).
    if unsafe { inet_pton(family, c.as_ptr(), packed.as_mut_ptr().cast()) } != 1 {
        return Ok(Some(None));
    }
    let address = if family == libc::AF_INET6 {
        let zero = 0i32.into_pyobject(py)?.into_any();
        let flowinfo = rest.first().cloned().unwrap_or_else(|| zero.clone());
        let scopeid = rest.get(1).cloned().unwrap_or(zero);
        PyTuple::new(py, [host.clone(), port.clone(), flowinfo, scopeid])?
    } else {
        PyTuple::new(py, [host.clone(), port.clone()])?
    };
    Ok(Some(Some(address.into_any())))
}
