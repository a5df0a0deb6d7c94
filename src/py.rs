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
