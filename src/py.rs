//! Cached imports of the Python helpers the native core calls on its cold paths.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

static EXTRACT_STACK: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static FILEOBJ_TO_FD: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static HANDLE_REPR: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// `asyncio.format_helpers.extract_stack()`: the creation stack of a handle in debug mode.
pub fn extract_stack(py: Python<'_>) -> PyResult<Py<PyAny>> {
    let f = EXTRACT_STACK.import(py, "asyncio.format_helpers", "extract_stack")?;
    Ok(f.call0()?.unbind())
}

/// `selectors._fileobj_to_fd`: an int fd from an int or an object with `fileno()`, with
/// selectors' ValueErrors for anything else.
/// An fd too large for a C int raises epoll's OverflowError (asyncio's add_reader).
pub fn fileobj_to_fd(obj: &Bound<'_, PyAny>) -> PyResult<i32> {
    fileobj_to_fd_lookup(obj)?.ok_or_else(|| {
        pyo3::exceptions::PyOverflowError::new_err("Python int too large to convert to C int")
    })
}

/// `selectors._fileobj_to_fd` for a lookup: None for an fd too large for a C int, which
/// no registration can have (asyncio's remove_reader answers False for it).
pub fn fileobj_to_fd_lookup(obj: &Bound<'_, PyAny>) -> PyResult<Option<i32>> {
    if let Ok(fd) = obj.extract::<i32>() {
        if fd >= 0 {
            return Ok(Some(fd));
        }
    }
    let f = FILEOBJ_TO_FD.import(obj.py(), "selectors", "_fileobj_to_fd")?;
    // A non-negative int (an int subclass's value), as selectors checked it.
    let fd = f.call1((obj,))?;
    Ok(fd.extract::<i32>().ok())
}

/// `ferroloop._handles.handle_repr`: asyncio's Handle/TimerHandle repr.
pub fn handle_repr(h: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
    let f = HANDLE_REPR.import(h.py(), "ferroloop._handles", "handle_repr")?;
    Ok(f.call1((h,))?.unbind())
}

static TASKS_MODULE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static FUTURES_MODULE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static BASE_CREATE_TASK_FN: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// `module.name`, looked up at each call (the module itself is cached): asyncio's own
/// methods read `tasks.Task` and `futures.Future` at call time, so a patched one is honoured.
fn live_attr<'py>(
    cell: &PyOnceLock<Py<PyAny>>,
    py: Python<'py>,
    module: &str,
    name: &Bound<'py, pyo3::types::PyString>,
) -> PyResult<Bound<'py, PyAny>> {
    let m = cell.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import(module)?.into_any().unbind())
    })?;
    m.bind(py).getattr(name)
}

/// `asyncio.tasks.Task`, as asyncio's `create_task` reads it.
pub fn task_class(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    live_attr(
        &TASKS_MODULE,
        py,
        "asyncio.tasks",
        pyo3::intern!(py, "Task"),
    )
}

/// `asyncio.base_events.BaseEventLoop.create_task`: asyncio's own method, for the cases the
/// native fast path leaves to it.
pub fn base_create_task(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    BASE_CREATE_TASK_FN
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(
                py.import("asyncio.base_events")?
                    .getattr("BaseEventLoop")?
                    .getattr("create_task")?
                    .unbind(),
            )
        })
        .map(|f| f.bind(py))
}

/// `asyncio.futures.Future`, as asyncio's `create_future` reads it.
pub fn future_class(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    live_attr(
        &FUTURES_MODULE,
        py,
        "asyncio.futures",
        pyo3::intern!(py, "Future"),
    )
}

/// `obj.name(*args, **{kwname: kwvalue})` through vectorcall: no keyword dict is built
/// (asyncio's C methods take keywords as a vector, so a dict would be unpacked again).
pub fn call_method_kw<'py>(
    obj: &Bound<'py, PyAny>,
    name: &Bound<'py, pyo3::types::PyString>,
    args: &[&Bound<'py, PyAny>],
    kwname: &Bound<'py, pyo3::types::PyTuple>,
    kwvalue: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = obj.py();
    // On the stack for the usual one or two arguments (these calls are per task step).
    let mut small = [std::ptr::null_mut(); 4];
    let mut large = Vec::new();
    let stack: &mut [*mut pyo3::ffi::PyObject] = if args.len() + 2 <= small.len() {
        &mut small[..args.len() + 2]
    } else {
        large.resize(args.len() + 2, std::ptr::null_mut());
        &mut large
    };
    stack[0] = obj.as_ptr();
    for (slot, a) in stack[1..].iter_mut().zip(args) {
        *slot = a.as_ptr();
    }
    stack[args.len() + 1] = kwvalue.as_ptr();
    // SAFETY: every pointer in `stack` is a live object borrowed for the call; `kwname` is
    // a tuple of one str naming the last element; the result is a new reference or NULL.
    unsafe {
        let r = pyo3::ffi::PyObject_VectorcallMethod(
            name.as_ptr(),
            stack.as_ptr(),
            args.len() + 1,
            kwname.as_ptr(),
        );
        Bound::from_owned_ptr_or_err(py, r)
    }
}

/// `callable(*args, **{kwname: kwvalue})` through vectorcall (see `call_method_kw`).
pub fn call_kw<'py>(
    callable: &Bound<'py, PyAny>,
    args: &[&Bound<'py, PyAny>],
    kwname: &Bound<'py, pyo3::types::PyTuple>,
    kwvalue: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = callable.py();
    let mut stack: Vec<*mut pyo3::ffi::PyObject> = Vec::with_capacity(args.len() + 1);
    stack.extend(args.iter().map(|a| a.as_ptr()));
    stack.push(kwvalue.as_ptr());
    // SAFETY: as in call_method_kw.
    unsafe {
        let r = pyo3::ffi::PyObject_Vectorcall(
            callable.as_ptr(),
            stack.as_ptr(),
            args.len(),
            kwname.as_ptr(),
        );
        Bound::from_owned_ptr_or_err(py, r)
    }
}

static KW_CONTEXT: PyOnceLock<Py<pyo3::types::PyTuple>> = PyOnceLock::new();
static KW_LOOP: PyOnceLock<Py<pyo3::types::PyTuple>> = PyOnceLock::new();

/// The keyword-name tuple `("context",)`.
pub fn kw_context(py: Python<'_>) -> PyResult<&Bound<'_, pyo3::types::PyTuple>> {
    KW_CONTEXT
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(pyo3::types::PyTuple::new(py, ["context"])?.unbind())
        })
        .map(|t| t.bind(py))
}

/// The keyword-name tuple `("loop",)`.
pub fn kw_loop(py: Python<'_>) -> PyResult<&Bound<'_, pyo3::types::PyTuple>> {
    KW_LOOP
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(pyo3::types::PyTuple::new(py, ["loop"])?.unbind())
        })
        .map(|t| t.bind(py))
}

/// Run `f` as one level of recursion in CPython's accounting: a RecursionError (as asyncio's
/// Python code would raise) instead of overflowing the C stack when native code recurses
/// through user-built structures (a chain of tasks awaiting each other, for instance).
pub fn recursion_guarded<T>(
    py: Python<'_>,
    place: &std::ffi::CStr,
    f: impl FnOnce() -> PyResult<T>,
) -> PyResult<T> {
    // SAFETY: `place` is a NUL-terminated string; every successful Enter is paired with
    // the Leave below.
    if unsafe { pyo3::ffi::Py_EnterRecursiveCall(place.as_ptr()) } != 0 {
        return Err(PyErr::fetch(py));
    }
    let r = f();
    // SAFETY: paired with the successful Py_EnterRecursiveCall above.
    unsafe { pyo3::ffi::Py_LeaveRecursiveCall() };
    r
}

/// The exception a generator-like `throw(typ, val, tb)` raises (generators' rules): an
/// instance of `typ` (or `typ` itself), with `tb` as its traceback when given.
pub fn thrown_exception<'py>(
    typ: Bound<'py, PyAny>,
    val: Option<Bound<'py, PyAny>>,
    tb: Option<Bound<'py, PyAny>>,
) -> PyResult<PyErr> {
    let py = typ.py();
    let exc = if typ.is_instance_of::<pyo3::types::PyType>() {
        match val {
            Some(v) if v.is_instance(&typ)? => v,
            Some(v) if !v.is_none() => typ.call1((v,))?,
            _ => typ.call0()?,
        }
    } else {
        typ
    };
    let exc = match tb {
        Some(tb) if !tb.is_none() => {
            exc.call_method1(pyo3::intern!(py, "with_traceback"), (tb,))?
        }
        _ => exc,
    };
    Ok(PyErr::from_value(exc))
}

/// The C return value of a native entry point called straight from CPython (a hand-made
/// slot or vectorcall): the object, or NULL with the Python error set; a Rust panic becomes
/// PyO3's `PanicException`, as PyO3's own trampolines do.
pub fn restore_outcome(
    py: Python<'_>,
    outcome: std::thread::Result<PyResult<*mut pyo3::ffi::PyObject>>,
) -> *mut pyo3::ffi::PyObject {
    match outcome {
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
            pyo3::panic::PanicException::new_err(msg).restore(py);
            std::ptr::null_mut()
        }
    }
}

/// A native class whose `tp_finalize` is set at import (PyO3 has no `__del__`): the cell
/// keeps PyO3's own `tp_dealloc`, which the replacement calls after the finalizer. Such a
/// class must have no PyO3 `freelist`: an object reused from it keeps the collector's
/// "already finalized" mark, so its finalizer would not run again.
pub trait Finalized: pyo3::PyTypeInfo {
    fn base_dealloc() -> &'static std::sync::OnceLock<pyo3::ffi::destructor>;
}

/// `tp_dealloc` of a `Finalized` class: run the finalizer first (PyO3's own dealloc does
/// not), as C types do, then PyO3's dealloc.
unsafe extern "C" fn dealloc_finalizing<T: Finalized>(obj: *mut pyo3::ffi::PyObject) {
    // SAFETY: called by CPython with refcount 0; a finalizer may resurrect the object, in
    // which case it must not be freed.
    if unsafe { pyo3::ffi::PyObject_CallFinalizerFromDealloc(obj) } < 0 {
        return;
    }
    if let Some(base) = T::base_dealloc().get() {
        // SAFETY: the original PyO3 dealloc of this type.
        unsafe { base(obj) };
    }
}

/// Give `T` the finalizer `finalize` (called when an instance is freed or collected; Python
/// subclasses inherit it). Call once at import, before any instance exists.
pub fn install_finalizer<T: Finalized>(
    py: Python<'_>,
    finalize: unsafe extern "C" fn(*mut pyo3::ffi::PyObject),
) {
    let raw = T::type_object(py).as_type_ptr();
    // SAFETY: the type object is ours and no instance exists yet; a heap type's slots may
    // be changed before instances are made, then PyType_Modified drops cached lookups.
    unsafe {
        let Some(base) = (*raw).tp_dealloc else {
            return;
        };
        if T::base_dealloc().set(base).is_err() {
            return; // installed already (module imported twice in one process)
        }
        (*raw).tp_dealloc = Some(dealloc_finalizing::<T>);
        (*raw).tp_finalize = Some(finalize);
        // Python subclasses inherit tp_finalize only from a base that has this flag.
        (*raw).tp_flags |= pyo3::ffi::Py_TPFLAGS_HAVE_FINALIZE;
        pyo3::ffi::PyType_Modified(raw);
    }
}

/// Run `f` with `exc` as the exception being handled (`sys.exc_info()`), as asyncio calls its
/// error reporting (`call_exception_handler`, `_fatal_error`, `error_received`) from inside an
/// `except` block: a handler's `logging.exception()` sees the error, and an error the handler
/// raises chains to it ("During handling of the above exception...").
pub fn while_handling<T>(exc: &Bound<'_, PyAny>, f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    use pyo3::ffi::{PyErr_GetHandledException, PyErr_SetHandledException, Py_XDECREF};
    // Get answers the innermost non-empty frame of the exception stack, Set writes the
    // innermost one: clearing it and asking again tells whether the innermost frame held
    // the handled exception itself (restore it) or showed an outer one (restore nothing).
    // SAFETY: the GIL is held (`exc` is bound). Get returns a new reference or NULL; Set
    // does not steal its argument; each reference taken here is released below.
    let own = unsafe {
        let visible = PyErr_GetHandledException();
        PyErr_SetHandledException(std::ptr::null_mut());
        let outer = PyErr_GetHandledException();
        Py_XDECREF(outer);
        if !visible.is_null() && visible == outer {
            Py_XDECREF(visible);
            std::ptr::null_mut()
        } else {
            visible
        }
    };
    // SAFETY: as above.
    unsafe { PyErr_SetHandledException(exc.as_ptr()) };
    let r = f();
    // SAFETY: as above; `own` (a new reference or NULL) is put back and released.
    unsafe {
        PyErr_SetHandledException(own);
        Py_XDECREF(own);
    }
    r
}
