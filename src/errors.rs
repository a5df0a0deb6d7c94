//! Every Rust -> Python error conversion (asyncio raises OSError with errno set).

use pyo3::exceptions::{PyOSError, PyRuntimeError};
use pyo3::PyErr;
use std::io;

/// An `OSError(errno, strerror)`: Python picks the subclass (ConnectionResetError, ...).
pub fn os_error(err: io::Error) -> PyErr {
    match err.raw_os_error() {
        Some(code) => {
            let msg = io::Error::from_raw_os_error(code).to_string();
            // Rust appends " (os error N)"; Python's strerror has no such suffix.
            let msg = match msg.rfind(" (os error") {
                Some(i) => msg[..i].to_string(),
                None => msg,
            };
            PyOSError::new_err((code, msg))
        }
        None => PyOSError::new_err(err.to_string()),
    }
}

/// asyncio's message for any operation on a closed loop.
pub fn loop_closed() -> PyErr {
    PyRuntimeError::new_err("Event loop is closed")
}
