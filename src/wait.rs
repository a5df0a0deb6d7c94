//! The per-future half of `asyncio.wait` (asyncio's `tasks._wait` and its `_on_completion`
//! closure), native: one callback object for all the futures, no Python frame per future.
//!
//! `ferroloop.wait` (python/ferroloop/tasks.py) checks the arguments and awaits the waiter;
//! this counts completions, releases the waiter, and sorts the futures into done/pending.

use pyo3::exceptions::PyValueError;
use pyo3::gc::PyVisit;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PySet;
use pyo3::PyTraverseError;

use crate::task::{
    any_add_done_callback, any_cancelled, any_done, any_exception, any_remove_done_callback,
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum ReturnWhen {
    AllCompleted,
    FirstCompleted,
    FirstException,
}

/// The done callback `wait` gives every future: counts completions and releases the
/// waiter when `return_when` is satisfied.
#[pyclass(module = "ferroloop._ferroloop")]
pub struct WaitCounter {
    waiter: Option<Py<PyAny>>,
    counter: usize,
    return_when: ReturnWhen,
    #[pyo3(get, set)]
    timeout_handle: Option<Py<PyAny>>,
}

impl WaitCounter {
    fn cancel_timeout(&self, py: Python<'_>) -> PyResult<()> {
        if let Some(h) = &self.timeout_handle {
            h.bind(py).call_method0(intern!(py, "cancel"))?;
        }
        Ok(())
    }
}

#[pymethods]
impl WaitCounter {
    /// As asyncio's closure: future reprs show `cb=[_wait.<locals>._on_completion()]`.
    #[getter]
    fn __qualname__(&self) -> &'static str {
        "_wait.<locals>._on_completion"
    }

    /// `WaitCounter(waiter, count, return_when)`; `return_when` is one of asyncio's
    /// constants ("ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION").
    #[new]
    fn new(waiter: Py<PyAny>, count: usize, return_when: &str) -> PyResult<Self> {
        let return_when = match return_when {
            "ALL_COMPLETED" => ReturnWhen::AllCompleted,
            "FIRST_COMPLETED" => ReturnWhen::FirstCompleted,
            "FIRST_EXCEPTION" => ReturnWhen::FirstException,
            other => {
                return Err(PyValueError::new_err(format!(
                    "Invalid return_when value: {other}"
                )))
            }
        };
        Ok(WaitCounter {
            waiter: Some(waiter),
            counter: count,
            return_when,
            timeout_handle: None,
        })
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.waiter)?;
        visit.call(&self.timeout_handle)?;
        Ok(())
    }

    fn __clear__(&mut self) {
        self.waiter = None;
        self.timeout_handle = None;
    }

    /// Add this counter as a done callback of every future in `fs`.
    fn watch(slf: &Bound<'_, Self>, fs: &Bound<'_, PySet>) -> PyResult<()> {
        for f in fs.iter() {
            any_add_done_callback(&f, slf.as_any())?;
        }
        Ok(())
    }

    /// asyncio's `_on_completion(f)`.
    fn __call__(slf: &Bound<'_, Self>, f: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = slf.py();
        let (release, return_when, waiter) = {
            let mut c = slf.borrow_mut();
            c.counter = c.counter.saturating_sub(1);
            let release = c.counter == 0 || c.return_when == ReturnWhen::FirstCompleted;
            (
                release,
                c.return_when,
                c.waiter.as_ref().map(|w| w.clone_ref(py)),
            )
        };
        let release = release
            || (return_when == ReturnWhen::FirstException
                && !any_cancelled(f)?
                && any_exception(f)?.is_some());
        if !release {
            return Ok(());
        }
        let handle = slf
            .borrow()
            .timeout_handle
            .as_ref()
            .map(|h| h.clone_ref(py));
        if let Some(h) = handle {
            h.bind(py).call_method0(intern!(py, "cancel"))?;
        }
        if let Some(w) = waiter {
            let w = w.bind(py);
            if !any_done(w)? {
                w.call_method1(intern!(py, "set_result"), (py.None(),))?;
            }
        }
        Ok(())
    }

    /// After the wait: cancel the timeout and take the callback off every future.
    fn unwatch(slf: &Bound<'_, Self>, fs: &Bound<'_, PySet>) -> PyResult<()> {
        slf.borrow().cancel_timeout(slf.py())?;
        for f in fs.iter() {
            any_remove_done_callback(&f, slf.as_any())?;
        }
        Ok(())
    }

    /// `(done, pending)`: the futures of `fs` sorted by `done()`.
    #[staticmethod]
    fn partition<'py>(fs: &Bound<'py, PySet>) -> PyResult<(Bound<'py, PySet>, Bound<'py, PySet>)> {
        let py = fs.py();
        let done = PySet::empty(py)?;
        let pending = PySet::empty(py)?;
        for f in fs.iter() {
            if any_done(&f)? {
                done.add(f)?;
            } else {
                pending.add(f)?;
            }
        }
        Ok((done, pending))
    }
}

/// Whether any of `fs` is a coroutine (`wait` refuses them): asyncio's `iscoroutine`,
/// without a call for futures and tasks.
#[pyfunction]
pub fn any_coroutine(fs: &Bound<'_, PySet>) -> PyResult<bool> {
    let py = fs.py();
    let iscoroutine = ISCOROUTINE.import(py, "asyncio.coroutines", "iscoroutine")?;
    for f in fs.iter() {
        if f.cast::<crate::task::Task>().is_ok() {
            continue;
        }
        // SAFETY: a type check on a live object.
        if unsafe { pyo3::ffi::PyCoro_CheckExact(f.as_ptr()) } != 0
            || iscoroutine.call1((&f,))?.is_truthy()?
        {
            return Ok(true);
        }
    }
    Ok(false)
}

static ISCOROUTINE: pyo3::sync::PyOnceLock<Py<PyAny>> = pyo3::sync::PyOnceLock::new();
