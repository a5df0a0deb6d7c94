//! Native entry points of ferroloop's transport classes, without PyO3's generic argument
//! handling on the per-message paths:
//!
//! - `write` of the Python transport classes (`transports._SelectorSocketTransport.write`
//!   and `sslproto._SSLProtocolTransport.write`, asyncio's `WriteTransport.write`). Each is a
//!   method descriptor made for the Python class itself (`PyDescr_NewMethod`), so
//!   `transport.write(data)` is a vectorcall straight into Rust: no Python frame forwarding
//!   to the native core, and no bound method stored per connection (idle memory). The
//!   descriptor fetches the native core from the instance (`_core`, `_ssl_protocol`) on each
//!   call, as the Python method did. Any other call shape (keywords, a wrong argument count,
//!   a core that is not ferroloop's) goes to the Python definition it replaces, which raises
//!   what asyncio's method raises.
//! - `StreamCore.__call__` (the reader callback the loop calls per readable event): its call
//!   slot runs `read_ready` directly when called with no arguments (PyO3's slot parses an
//!   argument tuple first); any other call goes to PyO3's slot.
//!
//! Measured with callgrind on a 1 KiB echo: about 250 (write) and 80 (read) instructions a
//! message.

use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

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

/// Run `f` as PyO3's trampolines do: attached (PyO3's count of it raised, so references
/// dropped inside are released at once), panics turned into `PanicException`, errors set.
fn guarded(f: impl FnOnce(Python<'_>) -> PyResult<*mut ffi::PyObject>) -> *mut ffi::PyObject {
    Python::attach(|py| {
        let outcome = catch_unwind(AssertUnwindSafe(|| f(py)));
        crate::py::restore_outcome(py, outcome)
    })
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
    guarded(|py| {
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
    })
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

/// PyO3's call slot of `StreamCore` (argument parsing, then `__call__`).
static PYO3_CALL: OnceLock<ffi::ternaryfunc> = OnceLock::new();

/// `StreamCore`'s call slot: `read_ready` when called with no arguments (the reader handle
/// calls it with an empty tuple), else PyO3's slot (its errors for unexpected arguments).
unsafe extern "C" fn stream_core_call(
    slf: *mut ffi::PyObject,
    args: *mut ffi::PyObject,
    kwargs: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: CPython passes a tuple (possibly empty) and a dict or NULL.
    let plain = unsafe {
        (args.is_null() || ffi::PyTuple_GET_SIZE(args) == 0)
            && (kwargs.is_null() || ffi::PyDict_Size(kwargs) == 0)
    };
    match PYO3_CALL.get() {
        Some(pyo3_call) if !plain => unsafe { pyo3_call(slf, args, kwargs) },
        _ => guarded(|py| {
            // SAFETY: the slot of StreamCore's type: `slf` is a live StreamCore.
            let slf = unsafe { Bound::from_borrowed_ptr(py, slf) };
            stream::read_ready(slf.cast::<StreamCore>()?)?;
            Ok(py.None().into_ptr())
        }),
    }
}

/// Put `stream_core_call` in `StreamCore`'s call slot (once, before the first core exists).
pub fn install_stream_call(py: Python<'_>) {
    let ty = py.get_type::<StreamCore>();
    let tp = ty.as_type_ptr();
    // SAFETY: `tp` is StreamCore's live type object; its call slot is a plain function pointer
    // read on each call (no cache to invalidate), replaced under the GIL before any instance
    // is called. The type has no vectorcall, so every call goes through the slot.
    unsafe {
        if let Some(pyo3_call) = (*tp).tp_call {
            let _ = PYO3_CALL.set(pyo3_call);
            (*tp).tp_call = Some(stream_core_call);
        }
    }
}
