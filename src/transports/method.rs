//! Native `write` methods of ferroloop's Python transport classes
//! (`transports._SelectorSocketTransport.write` and `sslproto._SSLProtocolTransport.write`,
//! asyncio's `WriteTransport.write`).
//!
//! Each is a method descriptor made for the Python class itself (`PyDescr_NewMethod`), so
//! `transport.write(data)` is a vectorcall straight into Rust: no Python frame forwarding
//! to the native core, and no bound method stored per connection (idle memory). The
//! descriptor fetches the native core from the instance (`_core`, `_ssl_protocol`) on each
//! call, as the Python method did. Any other call shape (keywords, a wrong argument count,
//! a core that is not ferroloop's) goes to the Python definition it replaces, which raises
//! what asyncio's method raises.

use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::ffi;
use pyo3::intern;
use pyo3::panic::PanicException;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

use super::stream::{self, StreamCore};
use super::tls::{self, TlsProtocolCore};

/// The Python definitions the descriptors replace (asyncio's signature and errors).
static STREAM_FALLBACK: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static TLS_FALLBACK: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

#[derive(Clone, Copy)]
enum Kind {
    Stream,
    Tls,
}

/// `transport.write(data)` on the native core; `Ok(false)` when the instance has none.
fn write_native(kind: Kind, slf: &Bound<'_, PyAny>, data: &Bound<'_, PyAny>) -> PyResult<bool> {
    let py = slf.py();
    match kind {
        Kind::Stream => {
            let core = slf.getattr(intern!(py, "_core"))?;
            match core.cast::<StreamCore>() {
                Ok(core) => stream::write(core, data).map(|()| true),
                Err(_) => Ok(false),
            }
        }
        Kind::Tls => {
            let protocol = slf.getattr(intern!(py, "_ssl_protocol"))?;
            match protocol.cast::<TlsProtocolCore>() {
                Ok(p) => tls::app_write(p, data).map(|()| true),
                Err(_) => Ok(false),
            }
        }
    }
}

/// # Safety
/// Called by CPython's method descriptor with the GIL held, `slf` an instance of the class
/// (the descriptor checks it), `args[..nargs + len(kwnames)]` valid.
unsafe fn dispatch(
    kind: Kind,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    let py = Python::assume_attached();
    let result = catch_unwind(AssertUnwindSafe(|| -> PyResult<*mut ffi::PyObject> {
        let slf = Bound::from_borrowed_ptr(py, slf);
        let nargs = ffi::PyVectorcall_NARGS(nargsf as usize) as usize;
        if nargs == 1 && kwnames.is_null() {
            let data = Bound::from_borrowed_ptr(py, *args);
            if write_native(kind, &slf, &data)? {
                return Ok(py.None().into_ptr());
            }
        }
        // The Python definition, called as this call was (self first).
        let fallback = match kind {
            Kind::Stream => STREAM_FALLBACK.get(py),
            Kind::Tls => TLS_FALLBACK.get(py),
        }
        .ok_or_else(|| PanicException::new_err("transport write: no fallback"))?;
        let nkw = if kwnames.is_null() {
            0
        } else {
            ffi::PyTuple_GET_SIZE(kwnames) as usize
        };
        let mut argv = Vec::with_capacity(1 + nargs + nkw);
        argv.push(slf.as_ptr());
        argv.extend_from_slice(std::slice::from_raw_parts(args, nargs + nkw));
        Bound::from_owned_ptr_or_err(
            py,
            ffi::PyObject_Vectorcall(
                fallback.as_ptr(),
                argv.as_ptr(),
                (nargs + 1) as usize,
                kwnames,
            ),
        )
        .map(Bound::into_ptr)
    }));
    match result {
        Ok(Ok(ptr)) => ptr,
        Ok(Err(err)) => {
            err.restore(py);
            std::ptr::null_mut()
        }
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic in ferroloop".to_string());
            PanicException::new_err(msg).restore(py);
            std::ptr::null_mut()
        }
    }
}

unsafe extern "C" fn stream_write(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    dispatch(Kind::Stream, slf, args, nargsf, kwnames)
}

unsafe extern "C" fn tls_write(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    dispatch(Kind::Tls, slf, args, nargsf, kwnames)
}

const DOC: &CStr = c"write($self, data)\n--\n\nWrite some data bytes to the transport.";

/// A `write` method descriptor for `cls`; `fallback` is the Python definition it replaces.
fn descriptor<'py>(
    cls: &Bound<'py, PyType>,
    fallback: Bound<'py, PyAny>,
    kind: Kind,
) -> PyResult<Bound<'py, PyAny>> {
    let py = cls.py();
    let (lock, f): (_, ffi::PyCFunctionFastWithKeywords) = match kind {
        Kind::Stream => (&STREAM_FALLBACK, stream_write),
        Kind::Tls => (&TLS_FALLBACK, tls_write),
    };
    // (Set once: every class this is made for forwards to an equivalent definition.)
    let _ = lock.set(py, fallback.unbind());
    // The definition must outlive the class: leak it (a small struct, once per class).
    let def = Box::leak(Box::new(ffi::PyMethodDef {
        ml_name: c"write".as_ptr() as *const c_char,
        ml_meth: ffi::PyMethodDefPointer {
            PyCFunctionFastWithKeywords: f,
        },
        ml_flags: ffi::METH_FASTCALL | ffi::METH_KEYWORDS,
        ml_doc: DOC.as_ptr() as *const c_char,
    }));
    // SAFETY: `cls` is a live type object and `def` is 'static.
    unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyDescr_NewMethod(cls.as_ptr().cast(), def)) }
}

/// `_SelectorSocketTransport.write` (see the module comment).
pub fn stream_write_descriptor<'py>(
    cls: &Bound<'py, PyType>,
    fallback: Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    descriptor(cls, fallback, Kind::Stream)
}

/// `_SSLProtocolTransport.write` (see the module comment).
pub fn tls_write_descriptor<'py>(
    cls: &Bound<'py, PyType>,
    fallback: Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    descriptor(cls, fallback, Kind::Tls)
}
