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
pub fn fileobj_to_fd(obj: &Bound<'_, PyAny>) -> PyResult<i32> {
    if let Ok(fd) = obj.extract::<i32>() {
        if fd >= 0 {
            return Ok(fd);
        }
    }
    let f = FILEOBJ_TO_FD.import(obj.py(), "selectors", "_fileobj_to_fd")?;
    f.call1((obj,))?.extract()
}

/// `ferroloop._handles.handle_repr`: asyncio's Handle/TimerHandle repr.
pub fn handle_repr(h: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
    let f = HANDLE_REPR.import(h.py(), "ferroloop._handles", "handle_repr")?;
    Ok(f.call1((h,))?.unbind())
}

static TASKS_MODULE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static FUTURES_MODULE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static BASE_CREATE_TASK_FN: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// `asyncio.tasks.Task`, read at each call as asyncio's `create_task` does (so a patched
/// `tasks.Task` is honoured).
pub fn task_class(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    let m = TASKS_MODULE.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import("asyncio.tasks")?.into_any().unbind())
    })?;
    m.bind(py).getattr(pyo3::intern!(py, "Task"))
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

/// `asyncio.futures.Future`, read at each call as asyncio's `create_future` does.
pub fn future_class(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    let m = FUTURES_MODULE.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import("asyncio.futures")?.into_any().unbind())
    })?;
    m.bind(py).getattr(pyo3::intern!(py, "Future"))
}
