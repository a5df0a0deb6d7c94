//! Hand-written `METH_FASTCALL` entry points for the hottest loop methods (`call_soon` and
//! `call_soon_threadsafe`, called once per task step; `call_later`, `call_at`): PyO3's
//! generic argument handling cost more than the scheduling itself (measured with callgrind:
//! ~200 instructions a call).

use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple};

use crate::event_loop::{self, EventLoop};
use crate::handles::Handle;

type Body = for<'py> fn(
    &Bound<'py, EventLoop>,
    Bound<'py, PyAny>,
    Bound<'py, PyTuple>,
    Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, Handle>>;

/// `call_later`/`call_at`: a time (delay or deadline) before the callback.
type TimedBody = for<'py> fn(
    &Bound<'py, EventLoop>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyTuple>,
    Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, Handle>>;

/// The native function behind a fast-call method.
#[derive(Clone, Copy)]
enum Target {
    Soon(Body),
    Timed(TimedBody, &'static str),
}

/// Parse `([time,] callback, *args, context=None)` from a vectorcall and run the target.
///
/// # Safety
/// Called by CPython's method descriptor with the GIL held, `slf` an instance of
/// `EventLoop` (the descriptor checks it), `args[..nargs + len(kwnames)]` valid.
unsafe fn dispatch(
    name: &str,
    target: Target,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    let py = Python::assume_attached();
    let result = catch_unwind(AssertUnwindSafe(|| -> PyResult<*mut ffi::PyObject> {
        let slf = Bound::from_borrowed_ptr(py, slf);
        // The method descriptor has checked that `self` is an EventLoop (instance of a
        // subclass: `ferroloop.Loop`) before calling: no second type check here.
        let slf = slf.cast_unchecked::<EventLoop>();
        let nargs = ffi::PyVectorcall_NARGS(nargsf as usize) as usize;
        let (lead, first) = match target {
            Target::Soon(_) => (0, ""),
            Target::Timed(_, first) => (1, first),
        };
        let argv = std::slice::from_raw_parts(args, nargs);
        // The named parameters ([time,] callback): positionally or by keyword, as Python
        // binds `def call_later(self, delay, callback, *args, context=None)`.
        let mut named: [Option<Bound<'_, PyAny>>; 2] = [None, None];
        for (slot, p) in named.iter_mut().zip(argv.iter().take(lead + 1)) {
            *slot = Some(Bound::from_borrowed_ptr(py, *p));
        }
        let rest = if nargs <= lead + 1 {
            // No arguments for the callback (the common case): the shared empty tuple.
            PyTuple::empty(py)
        } else {
            PyTuple::new(
                py,
                argv[lead + 1..]
                    .iter()
                    .map(|p| Bound::from_borrowed_ptr(py, *p)),
            )?
        };
        let mut context = None;
        if !kwnames.is_null() {
            let names = Bound::from_borrowed_ptr(py, kwnames);
            let names = names.cast::<PyTuple>()?;
            let values = std::slice::from_raw_parts(args.add(nargs), names.len());
            for (key, value) in names.iter().zip(values) {
                let key = key.cast_into::<PyString>()?;
                let value = Bound::from_borrowed_ptr(py, *value);
                // Callers pass the interned name (asyncio's C Task and Future do): compare
                // the object first, the text only for another string object.
                let is_context = key.is(pyo3::intern!(py, "context"));
                let k = if is_context { "context" } else { key.to_str()? };
                let slot = if k == "context" {
                    context = (!value.is_none()).then_some(value);
                    continue;
                } else if k == "callback" {
                    lead
                } else if lead == 1 && k == first {
                    0
                } else {
                    return Err(PyTypeError::new_err(format!(
                        "{name}() got an unexpected keyword argument '{key}'"
                    )));
                };
                if named[slot].is_some() {
                    return Err(PyTypeError::new_err(format!(
                        "{name}() got multiple values for argument '{key}'"
                    )));
                }
                named[slot] = Some(value);
            }
        }
        let [a, b] = named;
        let handle = match (target, a, b) {
            (Target::Soon(body), Some(callback), _) => body(slf, callback, rest, context)?,
            (Target::Timed(body, _), Some(time), Some(callback)) => {
                body(slf, time, callback, rest, context)?
            }
            (_, a, b) => {
                // Python's message for the parameters not given.
                let given = [a.is_some(), b.is_some()];
                let params = [first, "callback"];
                let missing: Vec<String> = (0..=lead)
                    .filter(|&i| !given[i])
                    .map(|i| format!("'{}'", params[i + 1 - lead]))
                    .collect();
                let plural = if missing.len() == 1 { "" } else { "s" };
                return Err(PyTypeError::new_err(format!(
                    "{name}() missing {} required positional argument{plural}: {}",
                    missing.len(),
                    missing.join(" and ")
                )));
            }
        };
        Ok(handle.into_ptr())
    }));
    crate::py::restore_outcome(py, result)
}

unsafe extern "C" fn call_soon(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    let target = Target::Soon(event_loop::call_soon);
    dispatch("call_soon", target, slf, args, nargsf, kwnames)
}

unsafe extern "C" fn call_soon_threadsafe(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    let target = Target::Soon(event_loop::call_soon_threadsafe);
    dispatch("call_soon_threadsafe", target, slf, args, nargsf, kwnames)
}

unsafe extern "C" fn call_later(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    let target = Target::Timed(event_loop::call_later, "delay");
    dispatch("call_later", target, slf, args, nargsf, kwnames)
}

unsafe extern "C" fn call_at(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    let target = Target::Timed(event_loop::call_at, "when");
    dispatch("call_at", target, slf, args, nargsf, kwnames)
}

fn method(
    ty: &Bound<'_, pyo3::types::PyType>,
    name: &'static CStr,
    doc: &'static CStr,
    f: ffi::PyCFunctionFastWithKeywords,
) -> PyResult<()> {
    // The definition must outlive the type: leak it (two small structs, once per process).
    let def = Box::leak(Box::new(ffi::PyMethodDef {
        ml_name: name.as_ptr() as *const c_char,
        ml_meth: ffi::PyMethodDefPointer {
            PyCFunctionFastWithKeywords: f,
        },
        ml_flags: ffi::METH_FASTCALL | ffi::METH_KEYWORDS,
        ml_doc: doc.as_ptr() as *const c_char,
    }));
    // SAFETY: `ty` is a live type object and `def` is 'static.
    let descr = unsafe {
        Bound::from_owned_ptr_or_err(ty.py(), ffi::PyDescr_NewMethod(ty.as_ptr().cast(), def))?
    };
    let name = name.to_string_lossy();
    ty.setattr(name.as_ref(), descr)
}

/// Add the fast-call methods to `EventLoop`.
pub fn install(py: Python<'_>) -> PyResult<()> {
    let ty = py.get_type::<EventLoop>();
    method(
        &ty,
        c"call_soon",
        c"call_soon($self, callback, /, *args, context=None)\n--\n\n\
          Arrange for callback(*args) to be called in the next loop turn (FIFO).",
        call_soon,
    )?;
    method(
        &ty,
        c"call_soon_threadsafe",
        c"call_soon_threadsafe($self, callback, /, *args, context=None)\n--\n\n\
          Like call_soon(), but safe from any thread: wakes the loop if it sleeps.",
        call_soon_threadsafe,
    )?;
    method(
        &ty,
        c"call_later",
        c"call_later($self, delay, callback, /, *args, context=None)\n--\n\n\
          Arrange for callback(*args) to be called after delay seconds (a TimerHandle).",
        call_later,
    )?;
    method(
        &ty,
        c"call_at",
        c"call_at($self, when, callback, /, *args, context=None)\n--\n\n\
          Arrange for callback(*args) to be called at loop.time() == when (a TimerHandle).",
        call_at,
    )
}
