//! asyncio's `tasks.gather` and `tasks.shield`, native: the children are wrapped and
//! watched without a Python frame per child, and their done callbacks are native objects
//! (asyncio's `_done_callback`, `_inner_done_callback` and `_outer_done_callback` closures).
//!
//! The outer future of `gather` is asyncio's own `_GatheringFuture` (its `cancel()` is what
//! users and asyncio's tests rely on); what differs between Python versions comes from
//! `ferroloop._compat.TASK_COMPAT`.

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::ffi;
use pyo3::gc::PyVisit;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyList, PyTuple};
use pyo3::PyTraverseError;

use crate::task::{
    any_add_done_callback, any_cancel_message, any_cancelled, any_done, any_exception,
    any_get_loop, any_make_cancelled_error, any_quiet_destroy, any_remove_done_callback,
    any_result, Task,
};

static COMPAT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static CANCELLED_ERROR: PyOnceLock<Py<pyo3::types::PyType>> = PyOnceLock::new();

fn compat(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    COMPAT.import(py, "ferroloop._compat", "TASK_COMPAT")
}

/// asyncio's `ensure_future(arg, loop=loop)` for the running Python, with the common cases
/// (a ferroloop task; a coroutine once the loop is known) done here.
fn ensure_future<'py>(
    arg: &Bound<'py, PyAny>,
    loop_: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = arg.py();
    if arg.cast_exact::<Task>().is_ok() {
        if let Some(l) = loop_ {
            if !any_get_loop(arg)?.is(l) {
                return Err(PyValueError::new_err(
                    "The future belongs to a different loop than the one specified as the loop argument",
                ));
            }
        }
        return Ok(arg.clone());
    }
    if let Some(l) = loop_ {
        // SAFETY: a type check on a live object.
        if unsafe { ffi::PyCoro_CheckExact(arg.as_ptr()) } != 0 {
            return match l.call_method1(intern!(py, "create_task"), (arg,)) {
                Ok(t) => Ok(t),
                Err(e) => {
                    // As asyncio: a coroutine that could not be wrapped is closed.
                    if e.is_instance_of::<PyRuntimeError>(py) {
                        arg.call_method0(intern!(py, "close"))?;
                    }
                    Err(e)
                }
            };
        }
    }
    let kwargs = PyDict::new(py);
    kwargs.set_item(intern!(py, "loop"), loop_)?;
    compat(py)?
        .getattr(intern!(py, "ensure_future"))?
        .call((arg,), Some(&kwargs))
}

/// The done callback of every gathered child (asyncio's `_done_callback`).
#[pyclass(module = "ferroloop._ferroloop")]
pub struct GatherState {
    outer: Option<Py<PyAny>>,
    children: Vec<Py<PyAny>>,
    nfuts: usize,
    nfinished: usize,
    return_exceptions: bool,
}

#[pymethods]
impl GatherState {
    /// As asyncio's closure: future reprs show `cb=[gather.<locals>._done_callback()]`.
    #[getter]
    fn __qualname__(&self) -> &'static str {
        "gather.<locals>._done_callback"
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.outer)?;
        for c in &self.children {
            visit.call(c)?;
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        self.outer = None;
        self.children.clear();
    }

    fn __call__(slf: &Bound<'_, Self>, fut: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = slf.py();
        let (outer, finished, return_exceptions) = {
            let mut s = slf.borrow_mut();
            s.nfinished += 1;
            (
                s.outer.as_ref().map(|o| o.clone_ref(py)),
                s.nfinished == s.nfuts,
                s.return_exceptions,
            )
        };
        let outer = match outer {
            Some(o) if !any_done(o.bind(py))? => o.into_bound(py),
            _ => {
                if !any_cancelled(fut)? {
                    // Mark the exception retrieved.
                    any_exception(fut)?;
                }
                return Ok(());
            }
        };
        if !return_exceptions {
            if any_cancelled(fut)? {
                let exc = any_make_cancelled_error(fut)?;
                outer.call_method1(intern!(py, "set_exception"), (exc,))?;
                return Ok(());
            }
            if let Some(exc) = any_exception(fut)? {
                outer.call_method1(intern!(py, "set_exception"), (exc,))?;
                return Ok(());
            }
        }
        if !finished {
            return Ok(());
        }
        let children: Vec<Py<PyAny>> = slf
            .borrow()
            .children
            .iter()
            .map(|c| c.clone_ref(py))
            .collect();
        let results = PyList::empty(py);
        let cancelled_error = CANCELLED_ERROR.import(py, "asyncio.exceptions", "CancelledError")?;
        for child in &children {
            let child = child.bind(py);
            let res = if any_cancelled(child)? {
                let msg = any_cancel_message(child)?;
                if msg.is_none() {
                    cancelled_error.call1(("",))?
                } else {
                    cancelled_error.call1((msg,))?
                }
            } else {
                match any_exception(child)? {
                    Some(e) => e,
                    None => any_result(child)?,
                }
            };
            results.append(res)?;
        }
        if outer
            .getattr(intern!(py, "_cancel_requested"))?
            .is_truthy()?
        {
            // asyncio asks the last child (its loop variable) for the error.
            if let Some(last) = children.last() {
                let exc = any_make_cancelled_error(last.bind(py))?;
                outer.call_method1(intern!(py, "set_exception"), (exc,))?;
            }
        } else {
            outer.call_method1(intern!(py, "set_result"), (results,))?;
        }
        Ok(())
    }
}

/// `gather(*coros_or_futures, return_exceptions=False)`: asyncio's `gather`. Run the
/// awaitables concurrently; a future for the list of their results, in order.
///
/// Called without a Python frame of ferroloop's, so asyncio's "no current event loop"
/// warnings name the caller's line as with asyncio's own `gather`.
#[pyfunction]
#[pyo3(signature = (*coros_or_futures, return_exceptions=None))]
pub fn gather<'py>(
    py: Python<'py>,
    coros_or_futures: &Bound<'py, PyTuple>,
    return_exceptions: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let return_exceptions = match return_exceptions {
        Some(v) => v.is_truthy()?,
        None => false,
    };
    if coros_or_futures.is_empty() {
        let loop_ = compat(py)?
            .getattr(intern!(py, "gather_empty_loop"))?
            .call0()?;
        let outer = loop_.call_method0(intern!(py, "create_future"))?;
        outer.call_method1(intern!(py, "set_result"), (PyList::empty(py),))?;
        return Ok(outer);
    }
    gather_children(py, coros_or_futures, return_exceptions)
}

/// `gather` for a non-empty argument tuple.
fn gather_children<'py>(
    py: Python<'py>,
    args: &Bound<'py, PyTuple>,
    return_exceptions: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let compat = compat(py)?;
    let done_at_once = compat
        .getattr(intern!(py, "GATHER_DONE_AT_ONCE"))?
        .is_truthy()?;
    let state = Bound::new(
        py,
        GatherState {
            outer: None,
            children: Vec::with_capacity(args.len()),
            nfuts: 0,
            nfinished: 0,
            return_exceptions,
        },
    )?;
    let arg_to_fut = PyDict::new(py);
    let mut loop_: Option<Bound<'py, PyAny>> = None;
    let mut done_futs = Vec::new();
    let mut children = Vec::with_capacity(args.len());
    for arg in args.iter() {
        let fut = match arg_to_fut.get_item(&arg)? {
            Some(f) => f,
            None => {
                let fut = ensure_future(&arg, loop_.as_ref())?;
                if loop_.is_none() {
                    loop_ = Some(any_get_loop(&fut)?);
                }
                if !fut.is(&arg) {
                    any_quiet_destroy(&fut)?;
                }
                state.borrow_mut().nfuts += 1;
                arg_to_fut.set_item(&arg, &fut)?;
                if done_at_once && any_done(&fut)? {
                    done_futs.push(fut.clone());
                } else {
                    any_add_done_callback(&fut, state.as_any())?;
                }
                fut
            }
        };
        children.push(fut);
    }
    state.borrow_mut().children = children.iter().map(|c| c.clone().unbind()).collect();
    let kwargs = PyDict::new(py);
    kwargs.set_item(intern!(py, "loop"), loop_)?;
    let outer = compat
        .getattr(intern!(py, "GatheringFuture"))?
        .call((PyList::new(py, &children)?,), Some(&kwargs))?;
    state.borrow_mut().outer = Some(outer.clone().unbind());
    for fut in done_futs {
        GatherState::__call__(&state, &fut)?;
    }
    Ok(outer)
}

/// `shield`'s callback on the inner future (asyncio's `_inner_done_callback`).
#[pyclass(module = "ferroloop._ferroloop")]
pub struct ShieldInner {
    outer: Option<Py<PyAny>>,
}

#[pymethods]
impl ShieldInner {
    /// As asyncio's closure: future reprs show `cb=[shield.<locals>._inner_done_callback()]`.
    #[getter]
    fn __qualname__(&self) -> &'static str {
        "shield.<locals>._inner_done_callback"
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.outer)
    }

    fn __clear__(&mut self) {
        self.outer = None;
    }

    fn __call__(&self, py: Python<'_>, inner: &Bound<'_, PyAny>) -> PyResult<()> {
        let Some(outer) = &self.outer else {
            return Ok(());
        };
        let outer = outer.bind(py);
        if any_cancelled(outer)? {
            if !any_cancelled(inner)? {
                // Mark inner's result as retrieved.
                any_exception(inner)?;
            }
            return Ok(());
        }
        if any_cancelled(inner)? {
            outer.call_method0(intern!(py, "cancel"))?;
        } else if let Some(exc) = any_exception(inner)? {
            outer.call_method1(intern!(py, "set_exception"), (exc,))?;
        } else {
            outer.call_method1(intern!(py, "set_result"), (any_result(inner)?,))?;
        }
        Ok(())
    }
}

/// `shield`'s callback on the outer future (asyncio's `_outer_done_callback`).
#[pyclass(module = "ferroloop._ferroloop")]
pub struct ShieldOuter {
    inner: Option<Py<PyAny>>,
    inner_callback: Option<Py<ShieldInner>>,
}

#[pymethods]
impl ShieldOuter {
    /// As asyncio's closure: future reprs show `cb=[shield.<locals>._outer_done_callback()]`.
    #[getter]
    fn __qualname__(&self) -> &'static str {
        "shield.<locals>._outer_done_callback"
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.inner)?;
        if let Some(cb) = &self.inner_callback {
            visit.call(cb)?;
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        self.inner = None;
        self.inner_callback = None;
    }

    fn __call__(&self, py: Python<'_>, _outer: &Bound<'_, PyAny>) -> PyResult<()> {
        if let (Some(inner), Some(cb)) = (&self.inner, &self.inner_callback) {
            let inner = inner.bind(py);
            if !any_done(inner)? {
                any_remove_done_callback(inner, cb.bind(py).as_any())?;
            }
        }
        Ok(())
    }
}

/// `shield(arg)`: asyncio's `shield`. Protect an awaitable from being cancelled: the result
/// is a future that follows `arg`, whose cancellation does not reach `arg`.
#[pyfunction]
pub fn shield<'py>(arg: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let py = arg.py();
    let inner = if arg.cast_exact::<Task>().is_ok() {
        arg.clone()
    } else {
        compat(py)?
            .getattr(intern!(py, "ensure_future"))?
            .call1((arg,))?
    };
    if any_done(&inner)? {
        return Ok(inner);
    }
    let loop_ = any_get_loop(&inner)?;
    let outer = loop_.call_method0(intern!(py, "create_future"))?;
    let inner_cb = Bound::new(
        py,
        ShieldInner {
            outer: Some(outer.clone().unbind()),
        },
    )?;
    let outer_cb = Bound::new(
        py,
        ShieldOuter {
            inner: Some(inner.clone().unbind()),
            inner_callback: Some(inner_cb.clone().unbind()),
        },
    )?;
    any_add_done_callback(&inner, inner_cb.as_any())?;
    any_add_done_callback(&outer, outer_cb.as_any())?;
    Ok(outer)
}
