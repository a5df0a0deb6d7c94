//! `Task` (asyncio's `tasks.Task` with its `futures.Future` base): a coroutine driven by the
//! event loop, with the whole asyncio Task API, written natively.
//!
//! On a ferroloop loop (outside debug mode) a task's steps and wake-ups go straight into the
//! loop's ready queue (`Job::Step`/`Job::Wakeup`): no Handle and no bound method per step. On
//! any other loop, and in debug mode, they are scheduled with `loop.call_soon` as asyncio's
//! Task does, so slow-step reports and patched loops behave as there.
//!
//! Borrow discipline (as in `event_loop.rs`): a borrow of a task is never held across
//! anything that can run Python code, because that code may use the same task.

use std::sync::atomic::{AtomicU64, Ordering};

use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError, PySystemExit, PyTypeError};
use pyo3::ffi;
use pyo3::gc::PyVisit;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};
use pyo3::PyTraverseError;

use crate::event_loop::{self, EventLoop, Job};
use crate::handles::RunOutcome;
use crate::py;

/// asyncio's task names: "Task-<n>", one counter for every ferroloop task.
static TASK_COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Cancelled,
    Finished,
}

/// A done callback: any callable, or "wake this ferroloop task" (no callable object needed).
enum DoneCallback {
    Call(Py<PyAny>),
    Wakeup(Py<Task>),
}

/// One `_callbacks` entry as asyncio shows it: (callback, context).
type CallbackEntry = (Py<PyAny>, Option<Py<PyAny>>);

/// A coroutine wrapped in a future (asyncio's `Task`).
#[pyclass(weakref, dict, subclass, module = "ferroloop._ferroloop")]
pub struct Task {
    loop_: Option<Py<PyAny>>,
    /// The same loop when it is a ferroloop loop whose `call_soon` is the native one...
    native: Option<Py<EventLoop>>,
    /// ...and that loop's instance dict: a `call_soon` set there later is honoured.
    loop_dict: Option<Py<PyDict>>,
    state: State,
    result: Option<Py<PyAny>>,
    exception: Option<Py<PyAny>>,
    exception_tb: Option<Py<PyAny>>,
    callbacks: Vec<(DoneCallback, Option<Py<PyAny>>)>,
    log_traceback: bool,
    blocking: bool,
    source_traceback: Option<Py<PyAny>>,
    cancel_message: Option<Py<PyAny>>,
    cancelled_exc: Option<Py<PyAny>>,
    coro: Option<Py<PyAny>>,
    context: Option<Py<PyAny>>,
    /// The name given, else "Task-<number>" made when first asked for.
    name: Option<Py<PyAny>>,
    number: u64,
    must_cancel: bool,
    num_cancels_requested: i64,
    fut_waiter: Option<Py<PyAny>>,
    log_destroy_pending: bool,
    /// The callable handed to foreign futures as their done callback (made once).
    wakeup: Option<Py<TaskWakeup>>,
    /// The exception the next queued step throws into the coroutine.
    step_exc: Option<Py<PyAny>>,
}

impl Task {
    fn empty() -> Task {
        Task {
            loop_: None,
            native: None,
            loop_dict: None,
            state: State::Pending,
            result: None,
            exception: None,
            exception_tb: None,
            callbacks: Vec::new(),
            log_traceback: false,
            blocking: false,
            source_traceback: None,
            cancel_message: None,
            cancelled_exc: None,
            coro: None,
            context: None,
            name: None,
            number: 0,
            must_cancel: false,
            num_cancels_requested: 0,
            fut_waiter: None,
            // False until __init__ succeeds: a half-made task is never reported.
            log_destroy_pending: false,
            wakeup: None,
            step_exc: None,
        }
    }

    /// The native loop, unless `call_soon` was since set on the loop instance (a test's
    /// patch, say): then everything goes through the loop's `call_soon`, as asyncio's does.
    fn native_ref<'py>(&self, py: Python<'py>) -> Option<Bound<'py, EventLoop>> {
        let native = self.native.as_ref()?.bind(py);
        if let Some(d) = &self.loop_dict {
            if d.bind(py)
                .contains(intern!(py, "call_soon"))
                .unwrap_or(true)
            {
                return None;
            }
        }
        Some(native.clone())
    }

    fn loop_obj<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match &self.loop_ {
            Some(l) => Ok(l.bind(py).clone()),
            None => Err(PyRuntimeError::new_err("Future object is not initialized.")),
        }
    }
}

// --- cached Python objects ------------------------------------------------------------

static CURRENT_TASKS: PyOnceLock<Py<PyDict>> = PyOnceLock::new();
static CANCELLED_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static INVALID_STATE_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static ISCOROUTINE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static COMPAT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static NATIVE_CALL_SOON: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn current_tasks(py: Python<'_>) -> PyResult<&Bound<'_, PyDict>> {
    CURRENT_TASKS.import(py, "asyncio.tasks", "_current_tasks")
}

fn cancelled_error(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    CANCELLED_ERROR.import(py, "asyncio.exceptions", "CancelledError")
}

fn invalid_state(py: Python<'_>, msg: String) -> PyErr {
    match INVALID_STATE_ERROR.import(py, "asyncio.exceptions", "InvalidStateError") {
        Ok(t) => PyErr::from_type(t.clone(), msg),
        Err(e) => e,
    }
}

/// `ferroloop._compat`: the one place that knows what the running Python's asyncio does.
fn compat(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    COMPAT.import(py, "ferroloop._compat", "TASK_COMPAT")
}

/// `TASK_COMPAT.UNCANCEL_RESETS_MUST_CANCEL`, read once (uncancel() is on TaskGroup's and
/// timeout()'s every exit).
static UNCANCEL_RESETS: PyOnceLock<bool> = PyOnceLock::new();

fn compat_flag(py: Python<'_>, name: &str) -> PyResult<bool> {
    compat(py)?.getattr(name)?.is_truthy()
}

fn repr_of(obj: &Bound<'_, PyAny>) -> String {
    obj.repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "<?>".to_string())
}

fn is_fatal(py: Python<'_>, e: &PyErr) -> bool {
    e.is_instance_of::<PyKeyboardInterrupt>(py) || e.is_instance_of::<PySystemExit>(py)
}

fn copy_context(py: Python<'_>) -> PyResult<Py<PyAny>> {
    // SAFETY: PyContext_CopyCurrent returns a new reference or NULL with an error set.
    Ok(unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyContext_CopyCurrent())? }.unbind())
}

/// The loop as a ferroloop loop whose `call_soon` nobody replaced (on the instance or in a
/// subclass): only then may task steps bypass `call_soon`.
fn native_loop(loop_: &Bound<'_, PyAny>) -> PyResult<NativeLoop> {
    let py = loop_.py();
    let Ok(native) = loop_.cast::<EventLoop>() else {
        return Ok(None);
    };
    let ours = NATIVE_CALL_SOON.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.get_type::<EventLoop>().getattr("call_soon")?.unbind())
    })?;
    let name = intern!(py, "call_soon");
    if !loop_.get_type().getattr(name)?.is(ours) {
        return Ok(None);
    }
    let dict = match loop_.getattr(intern!(py, "__dict__")) {
        Ok(d) => Some(d.cast_into::<PyDict>()?),
        Err(_) => None,
    };
    if let Some(d) = &dict {
        if d.contains(name)? {
            return Ok(None);
        }
    }
    Ok(Some((native.clone().unbind(), dict.map(|d| d.unbind()))))
}

/// A ferroloop loop and its instance dict (see `native_loop`).
type NativeLoop = Option<(Py<EventLoop>, Option<Py<PyDict>>)>;

/// The native loop to queue jobs on directly: set, and not in debug mode.
fn direct_loop<'py>(py: Python<'py>, t: &Task) -> Option<Bound<'py, EventLoop>> {
    let native = t.native_ref(py)?;
    if native.borrow().is_debug() {
        None
    } else {
        Some(native)
    }
}

// --- the Future part ------------------------------------------------------------------

/// Schedule the done callbacks (asyncio's `Future.__schedule_callbacks`).
fn schedule_callbacks(slf: &Bound<'_, Task>) -> PyResult<()> {
    let py = slf.py();
    let (callbacks, loop_, direct, native, wakeup) = {
        let mut t = slf.borrow_mut();
        // Done: the wake-up callable (which refers back to the task) is no longer needed;
        // dropping it lets the task be freed without the cycle collector.
        let wakeup = t.wakeup.take();
        if t.callbacks.is_empty() {
            drop(t);
            drop(wakeup);
            return Ok(());
        }
        (
            std::mem::take(&mut t.callbacks),
            t.loop_obj(py)?,
            direct_loop(py, &t),
            t.native_ref(py).map(|n| n.unbind()),
            wakeup,
        )
    };
    drop(wakeup);
    let native = native.as_ref().map(|n| n.bind(py));
    for (cb, ctx) in callbacks {
        match (cb, &direct) {
            (DoneCallback::Wakeup(waiter), Some(l)) => {
                l.borrow_mut()
                    .push_job(Job::Wakeup(waiter, slf.clone().into_any().unbind()));
            }
            (DoneCallback::Wakeup(waiter), None) => {
                let w = wakeup_callable(waiter.bind(py))?;
                call_soon(&loop_, native, w.as_any(), slf.as_any(), ctx)?;
            }
            (DoneCallback::Call(f), _) => {
                call_soon(&loop_, native, f.bind(py), slf.as_any(), ctx)?;
            }
        }
    }
    Ok(())
}

/// `loop.call_soon(callback, arg, context=ctx)`, natively when the loop is ours (`native`:
/// the task's loop, when its `call_soon` is the native one).
fn call_soon(
    loop_: &Bound<'_, PyAny>,
    native: Option<&Bound<'_, EventLoop>>,
    callback: &Bound<'_, PyAny>,
    arg: &Bound<'_, PyAny>,
    ctx: Option<Py<PyAny>>,
) -> PyResult<()> {
    let py = loop_.py();
    if let Some(native) = native {
        let args = PyTuple::new(py, [arg])?;
        event_loop::call_soon(
            native,
            callback.clone(),
            args,
            ctx.map(|c| c.into_bound(py)),
        )?;
        return Ok(());
    }
    let kwargs = PyDict::new(py);
    kwargs.set_item(intern!(py, "context"), ctx)?;
    loop_.call_method(intern!(py, "call_soon"), (callback, arg), Some(&kwargs))?;
    Ok(())
}

/// Finish with a result (asyncio's `Future.set_result`, which a Task only calls itself).
fn future_set_result(slf: &Bound<'_, Task>, value: Py<PyAny>) -> PyResult<()> {
    {
        let mut t = slf.borrow_mut();
        if t.state != State::Pending {
            drop(t);
            return Err(invalid_state(
                slf.py(),
                format!("invalid state: {}", repr_of(slf)),
            ));
        }
        t.result = Some(value);
        t.state = State::Finished;
    }
    schedule_callbacks(slf)
}

/// Finish with an exception (asyncio's `Future.set_exception`).
fn future_set_exception(slf: &Bound<'_, Task>, exc: Bound<'_, PyAny>) -> PyResult<()> {
    let py = slf.py();
    let tb = exc.getattr(intern!(py, "__traceback__"))?;
    {
        let mut t = slf.borrow_mut();
        if t.state != State::Pending {
            drop(t);
            return Err(invalid_state(
                py,
                format!("invalid state: {}", repr_of(slf)),
            ));
        }
        t.exception = Some(exc.unbind());
        t.exception_tb = (!tb.is_none()).then(|| tb.unbind());
        t.state = State::Finished;
        t.log_traceback = true;
    }
    schedule_callbacks(slf)
}

/// Mark cancelled (asyncio's `Future.cancel`, which `Task.cancel` does not reach).
fn future_cancel(slf: &Bound<'_, Task>, msg: Option<Py<PyAny>>) -> PyResult<bool> {
    {
        let mut t = slf.borrow_mut();
        t.log_traceback = false;
        if t.state != State::Pending {
            return Ok(false);
        }
        t.state = State::Cancelled;
        t.cancel_message = msg;
    }
    schedule_callbacks(slf)?;
    Ok(true)
}

/// asyncio's `Future._make_cancelled_error`: the saved CancelledError, or a new one.
fn make_cancelled_error<'py>(slf: &Bound<'py, Task>) -> PyResult<Bound<'py, PyAny>> {
    let py = slf.py();
    let (saved, msg) = {
        let mut t = slf.borrow_mut();
        (
            t.cancelled_exc.take(),
            t.cancel_message.as_ref().map(|m| m.clone_ref(py)),
        )
    };
    if let Some(exc) = saved {
        return Ok(exc.into_bound(py));
    }
    let cls = cancelled_error(py)?;
    match msg {
        Some(m) if !m.is_none(py) => cls.call1((m,)),
        _ => cls.call0(),
    }
}

/// `result()`: the value, or the exception raised with its original traceback.
fn task_result<'py>(slf: &Bound<'py, Task>) -> PyResult<Bound<'py, PyAny>> {
    let py = slf.py();
    let state = slf.borrow().state;
    match state {
        State::Cancelled => Err(PyErr::from_value(make_cancelled_error(slf)?)),
        State::Pending => Err(invalid_state(py, "Result is not set.".to_string())),
        State::Finished => {
            let (exc, tb, result) = {
                let mut t = slf.borrow_mut();
                t.log_traceback = false;
                (
                    t.exception.as_ref().map(|e| e.clone_ref(py)),
                    t.exception_tb.as_ref().map(|e| e.clone_ref(py)),
                    t.result.as_ref().map(|e| e.clone_ref(py)),
                )
            };
            if let Some(exc) = exc {
                let exc = exc.into_bound(py);
                let exc = exc.call_method1(intern!(py, "with_traceback"), (tb,))?;
                return Err(PyErr::from_value(exc));
            }
            Ok(result.map_or_else(|| py.None().into_bound(py), |r| r.into_bound(py)))
        }
    }
}

// --- stepping -------------------------------------------------------------------------

/// What one `send`/`throw` into the coroutine gave.
enum Sent<'py> {
    Yielded(Bound<'py, PyAny>),
    Returned(Bound<'py, PyAny>),
    Raised(PyErr),
}

fn send<'py>(coro: &Bound<'py, PyAny>, exc: Option<Bound<'py, PyAny>>) -> Sent<'py> {
    let py = coro.py();
    match exc {
        None => {
            let mut out: *mut ffi::PyObject = std::ptr::null_mut();
            // SAFETY: coro and None are live objects; PyIter_Send stores a new reference
            // in `out` for PYGEN_RETURN/PYGEN_NEXT and sets an error for PYGEN_ERROR.
            let r = unsafe { ffi::PyIter_Send(coro.as_ptr(), ffi::Py_None(), &mut out) };
            match r {
                // SAFETY: `out` holds a new reference (see above).
                ffi::PySendResult::PYGEN_RETURN => {
                    Sent::Returned(unsafe { Bound::from_owned_ptr(py, out) })
                }
                // SAFETY: as above.
                ffi::PySendResult::PYGEN_NEXT => {
                    Sent::Yielded(unsafe { Bound::from_owned_ptr(py, out) })
                }
                _ => Sent::Raised(PyErr::fetch(py)),
            }
        }
        Some(exc) => match coro.call_method1(intern!(py, "throw"), (exc,)) {
            Ok(v) => Sent::Yielded(v),
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyStopIteration>(py) => {
                match e.value(py).getattr(intern!(py, "value")) {
                    Ok(v) => Sent::Returned(v),
                    Err(e) => Sent::Raised(e),
                }
            }
            Err(e) => Sent::Raised(e),
        },
    }
}

/// asyncio's `Task.__step`: checks, enter the task, run, leave.
fn step(slf: &Bound<'_, Task>, exc: Option<Bound<'_, PyAny>>) -> PyResult<()> {
    let py = slf.py();
    let (state, must_cancel) = {
        let t = slf.borrow();
        (t.state, t.must_cancel)
    };
    if state != State::Pending {
        let exc_repr = exc.as_ref().map_or("None".to_string(), repr_of);
        return Err(invalid_state(
            py,
            format!("_step(): already done: {}, {}", repr_of(slf), exc_repr),
        ));
    }
    let mut exc = exc;
    if must_cancel {
        let is_cancel = match &exc {
            Some(e) => e.is_instance(cancelled_error(py)?)?,
            None => false,
        };
        if !is_cancel {
            exc = Some(make_cancelled_error(slf)?);
        }
        slf.borrow_mut().must_cancel = false;
    }
    let (old_waiter, loop_) = {
        let mut t = slf.borrow_mut();
        (t.fut_waiter.take(), t.loop_obj(py)?)
    };
    drop(old_waiter);
    enter_task(&loop_, slf.as_any())?;
    let r = step_run_and_handle_result(slf, exc);
    let left = leave_task(&loop_, slf.as_any());
    r.and(left)
}

fn enter_task(loop_: &Bound<'_, PyAny>, task: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = loop_.py();
    let d = current_tasks(py)?;
    let before = d.len();
    // One lookup for asyncio's `if loop in _current_tasks: raise ...` and the insertion:
    // setdefault leaves the dict as it was when another task is there.
    // SAFETY: live objects; PyDict_SetDefault returns a borrowed reference or NULL.
    let cur = unsafe {
        Bound::from_borrowed_ptr_or_err(
            py,
            ffi::PyDict_SetDefault(d.as_ptr(), loop_.as_ptr(), task.as_ptr()),
        )?
    };
    if d.len() == before {
        return Err(PyRuntimeError::new_err(format!(
            "Cannot enter into task {} while another task {} is being executed.",
            repr_of(task),
            repr_of(&cur)
        )));
    }
    Ok(())
}

fn leave_task(loop_: &Bound<'_, PyAny>, task: &Bound<'_, PyAny>) -> PyResult<()> {
    let d = current_tasks(loop_.py())?;
    match d.get_item(loop_)? {
        Some(cur) if cur.is(task) => d.del_item(loop_),
        other => Err(PyRuntimeError::new_err(format!(
            "Leaving task {} does not match the current task {}.",
            repr_of(task),
            other.map_or("None".to_string(), |o| repr_of(&o))
        ))),
    }
}

/// asyncio's `Task.__step_run_and_handle_result`.
fn step_run_and_handle_result(
    slf: &Bound<'_, Task>,
    exc: Option<Bound<'_, PyAny>>,
) -> PyResult<()> {
    let py = slf.py();
    let Some(coro) = slf.borrow().coro.as_ref().map(|c| c.clone_ref(py)) else {
        return Err(PyRuntimeError::new_err("Task has no coroutine"));
    };
    match send(coro.bind(py), exc) {
        Sent::Returned(value) => {
            let must_cancel = slf.borrow().must_cancel;
            if must_cancel {
                // Cancelled right before the coroutine returned.
                let msg = {
                    let mut t = slf.borrow_mut();
                    t.must_cancel = false;
                    t.cancel_message.as_ref().map(|m| m.clone_ref(py))
                };
                future_cancel(slf, msg)?;
            } else {
                future_set_result(slf, value.unbind())?;
            }
            Ok(())
        }
        Sent::Raised(e) => {
            if e.is_instance(py, cancelled_error(py)?.as_any()) {
                slf.borrow_mut().cancelled_exc = Some(e.into_value(py).into_any());
                future_cancel(slf, None)?;
                Ok(())
            } else if is_fatal(py, &e) {
                future_set_exception(slf, e.value(py).clone().into_any())?;
                Err(e)
            } else {
                future_set_exception(slf, e.into_value(py).into_bound(py).into_any())
            }
        }
        Sent::Yielded(result) => handle_yield(slf, result),
    }
}

/// What the coroutine yielded: a future to wait for, None (one turn), or a mistake.
fn handle_yield(slf: &Bound<'_, Task>, result: Bound<'_, PyAny>) -> PyResult<()> {
    let py = slf.py();
    if result.is_none() {
        // A bare yield: give up one loop turn.
        return schedule_step(slf, None);
    }
    let loop_ = slf.borrow().loop_obj(py)?;
    if let Ok(fut) = result.cast_exact::<Task>() {
        // One of ours: everything natively.
        let (same_loop, blocking) = {
            let f = fut.borrow();
            (
                f.loop_.as_ref().is_some_and(|l| l.bind(py).is(&loop_)),
                f.blocking,
            )
        };
        if !check_awaited(slf, &result, same_loop, blocking)? {
            return Ok(());
        }
        fut.borrow_mut().blocking = false;
        add_wakeup(fut, slf)?;
        return set_waiter(slf, result);
    }
    if is_c_future(py, &result)? {
        // asyncio's own (C) Future, not a subclass: its attributes are its type's, so read
        // them directly (asyncio's C Task reads the struct fields).
        let name = intern!(py, "_asyncio_future_blocking");
        let blocking = result.getattr(name)?.is_truthy()?;
        let same_loop = result.getattr(intern!(py, "_loop"))?.is(&loop_);
        if !check_awaited(slf, &result, same_loop, blocking)? {
            return Ok(());
        }
        result.setattr(name, false)?;
        let wakeup = wakeup_callable(slf)?;
        add_done_callback(&result, wakeup.as_any(), slf.borrow().context.as_ref())?;
        return set_waiter(slf, result);
    }
    let blocking = match result.getattr_opt(intern!(py, "_asyncio_future_blocking"))? {
        Some(b) if !b.is_none() => Some(b.is_truthy()?),
        _ => None,
    };
    match blocking {
        Some(blocking) => {
            let same_loop = future_get_loop(&result)?.is(&loop_);
            if !check_awaited(slf, &result, same_loop, blocking)? {
                return Ok(());
            }
            result.setattr(intern!(py, "_asyncio_future_blocking"), false)?;
            let wakeup = wakeup_callable(slf)?;
            add_done_callback(&result, wakeup.as_any(), slf.borrow().context.as_ref())?;
            set_waiter(slf, result)
        }
        None if result.is_none() => schedule_step(slf, None),
        None => {
            // SAFETY: a type check on a live object.
            let is_gen = unsafe { ffi::PyGen_Check(result.as_ptr()) } != 0;
            let msg = if is_gen {
                format!(
                    "yield was used instead of yield from for generator in task {} with {}",
                    repr_of(slf),
                    repr_of(&result)
                )
            } else {
                format!("Task got bad yield: {}", repr_of(&result))
            };
            schedule_step(
                slf,
                Some(PyRuntimeError::new_err(msg).into_value(py).into_any()),
            )
        }
    }
}

/// asyncio's C Future type (`_asyncio.Future`), if the accelerator module is there.
static C_FUTURE_TYPE: PyOnceLock<Option<Py<PyType>>> = PyOnceLock::new();

/// Whether `obj` is exactly asyncio's C Future (no subclass: a subclass may override).
fn is_c_future(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    let ty = C_FUTURE_TYPE.get_or_try_init(py, || {
        Ok::<_, PyErr>(match py.import("_asyncio") {
            Ok(m) => Some(m.getattr("Future")?.cast_into::<PyType>()?.unbind()),
            Err(_) => None,
        })
    })?;
    Ok(ty.as_ref().is_some_and(|t| obj.get_type().is(t.bind(py))))
}

/// `fut.add_done_callback(callback, context=ctx)` as one vectorcall (asyncio's C method
/// takes the keyword as part of the vector: no dict is built).
fn add_done_callback(
    fut: &Bound<'_, PyAny>,
    callback: &Bound<'_, PyAny>,
    ctx: Option<&Py<PyAny>>,
) -> PyResult<()> {
    let py = fut.py();
    let ctx = ctx.map_or_else(|| py.None().into_bound(py), |c| c.bind(py).clone());
    py::call_method_kw(
        fut,
        intern!(py, "add_done_callback"),
        &[callback],
        py::kw_context(py)?,
        &ctx,
    )
    .map(drop)
}

/// asyncio's checks on a yielded future: of this loop, not the task itself, yielded by
/// `await` (blocking). When one fails, the next step throws the RuntimeError into the coroutine
/// and this returns false.
fn check_awaited(
    slf: &Bound<'_, Task>,
    result: &Bound<'_, PyAny>,
    same_loop: bool,
    blocking: bool,
) -> PyResult<bool> {
    let py = slf.py();
    let msg = if !same_loop {
        format!(
            "Task {} got Future {} attached to a different loop",
            repr_of(slf),
            repr_of(result)
        )
    } else if result.is(slf) {
        // Before the blocking check, as asyncio's C Task: a bare `yield` of the task itself
        // is "cannot await on itself" there too.
        format!("Task cannot await on itself: {}", repr_of(slf))
    } else if !blocking {
        bad_yield(slf, result)?;
        return Ok(false);
    } else {
        return Ok(true);
    };
    schedule_step(
        slf,
        Some(PyRuntimeError::new_err(msg).into_value(py).into_any()),
    )?;
    Ok(false)
}

fn bad_yield(slf: &Bound<'_, Task>, result: &Bound<'_, PyAny>) -> PyResult<()> {
    let msg = format!(
        "yield was used instead of yield from in task {} with {}",
        repr_of(slf),
        repr_of(result)
    );
    schedule_step(
        slf,
        Some(PyRuntimeError::new_err(msg).into_value(slf.py()).into_any()),
    )
}

/// Now waiting for `fut`; a cancel that came meanwhile goes to it.
fn set_waiter(slf: &Bound<'_, Task>, fut: Bound<'_, PyAny>) -> PyResult<()> {
    let py = slf.py();
    let (must_cancel, msg) = {
        let mut t = slf.borrow_mut();
        t.fut_waiter = Some(fut.clone().unbind());
        (
            t.must_cancel,
            t.cancel_message.as_ref().map(|m| m.clone_ref(py)),
        )
    };
    if must_cancel && cancel_future(&fut, msg)? {
        slf.borrow_mut().must_cancel = false;
    }
    Ok(())
}

/// `fut.cancel(msg=msg)`, natively for our tasks.
fn cancel_future(fut: &Bound<'_, PyAny>, msg: Option<Py<PyAny>>) -> PyResult<bool> {
    let py = fut.py();
    if let Ok(t) = fut.cast_exact::<Task>() {
        return task_cancel(t, msg);
    }
    // Positionally, as asyncio's C Task calls it (a subclass may name it differently).
    fut.call_method1(intern!(py, "cancel"), (msg,))?.is_truthy()
}

/// asyncio's `futures._get_loop`.
fn future_get_loop<'py>(fut: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let py = fut.py();
    // A method call without a bound-method object; `_loop` for futures without get_loop.
    match fut.call_method0(intern!(py, "get_loop")) {
        Ok(l) => Ok(l),
        Err(e) if e.is_instance_of::<pyo3::exceptions::PyAttributeError>(py) => {
            match fut.getattr_opt(intern!(py, "get_loop"))? {
                Some(_) => Err(e), // get_loop itself raised AttributeError
                None => fut.getattr(intern!(py, "_loop")),
            }
        }
        Err(e) => Err(e),
    }
}

/// Register "wake `waiter`" as a done callback of our task `fut` (no callable needed).
fn add_wakeup(fut: &Bound<'_, Task>, waiter: &Bound<'_, Task>) -> PyResult<()> {
    let py = fut.py();
    let ctx = waiter.borrow().context.as_ref().map(|c| c.clone_ref(py));
    let done = fut.borrow().state != State::Pending;
    if done {
        let w = wakeup_callable(waiter)?;
        let (loop_, native) = {
            let f = fut.borrow();
            (f.loop_obj(py)?, f.native_ref(py).map(|n| n.unbind()))
        };
        return call_soon(
            &loop_,
            native.as_ref().map(|n| n.bind(py)),
            w.as_any(),
            fut.as_any(),
            ctx,
        );
    }
    fut.borrow_mut()
        .callbacks
        .push((DoneCallback::Wakeup(waiter.clone().unbind()), ctx));
    Ok(())
}

fn wakeup_callable<'py>(slf: &Bound<'py, Task>) -> PyResult<Bound<'py, TaskWakeup>> {
    let py = slf.py();
    if let Some(w) = &slf.borrow().wakeup {
        return Ok(w.bind(py).clone());
    }
    let w = Bound::new(
        py,
        TaskWakeup {
            task: Some(slf.clone().unbind()),
        },
    )?;
    slf.borrow_mut().wakeup = Some(w.clone().unbind());
    Ok(w)
}

/// Run the next step soon (asyncio's `loop.call_soon(self.__step, exc, context=...)`).
fn schedule_step(slf: &Bound<'_, Task>, exc: Option<Py<PyAny>>) -> PyResult<()> {
    let py = slf.py();
    let (direct, loop_, ctx) = {
        let t = slf.borrow();
        (
            direct_loop(py, &t),
            t.loop_obj(py)?,
            t.context.as_ref().map(|c| c.clone_ref(py)),
        )
    };
    if let Some(l) = direct {
        l.borrow().check_open()?;
        slf.borrow_mut().step_exc = exc;
        l.borrow_mut().push_job(Job::Step(slf.clone().unbind()));
        return Ok(());
    }
    let callable = Bound::new(
        py,
        TaskStep {
            task: Some(slf.clone().unbind()),
            exc,
        },
    )?;
    let kwargs = PyDict::new(py);
    kwargs.set_item(intern!(py, "context"), ctx)?;
    loop_.call_method(intern!(py, "call_soon"), (callable,), Some(&kwargs))?;
    Ok(())
}

/// asyncio's `Task.__wakeup`: the awaited future is done; step with its exception, if any.
fn wakeup(slf: &Bound<'_, Task>, fut: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = slf.py();
    if let Ok(f) = fut.cast_exact::<Task>() {
        let ok = {
            let b = f.borrow();
            b.state == State::Finished && b.exception.is_none()
        };
        if ok {
            return step(slf, None);
        }
        return match task_result(f) {
            Ok(_) => step(slf, None),
            Err(e) => step(slf, Some(e.into_value(py).into_bound(py).into_any())),
        };
    }
    match fut.call_method0(intern!(py, "result")) {
        Ok(_) => step(slf, None),
        Err(e) => step(slf, Some(e.into_value(py).into_bound(py).into_any())),
    }
}

/// Run a queued job of the ferroloop loop inside the task's context; errors other than
/// KeyboardInterrupt/SystemExit go to the loop's exception handler.
pub fn run_job(
    py: Python<'_>,
    loop_: &Bound<'_, EventLoop>,
    task: Py<Task>,
    fut: Option<Py<PyAny>>,
) -> PyResult<RunOutcome> {
    let task = task.into_bound(py);
    let (ctx, exc) = {
        let mut t = task.borrow_mut();
        let exc = if fut.is_none() {
            t.step_exc.take()
        } else {
            None
        };
        (t.context.as_ref().map(|c| c.clone_ref(py)), exc)
    };
    let Some(ctx) = ctx else {
        return Ok(RunOutcome::Done);
    };
    // SAFETY: `ctx` is a live contextvars.Context kept alive by our reference.
    let r = if unsafe { ffi::PyContext_Enter(ctx.as_ptr()) } < 0 {
        Err(PyErr::fetch(py))
    } else {
        let r = match &fut {
            None => step(&task, exc.map(|e| e.into_bound(py))),
            Some(f) => wakeup(&task, f.bind(py)),
        };
        // SAFETY: entered just above on this thread.
        if unsafe { ffi::PyContext_Exit(ctx.as_ptr()) } < 0 {
            r.and(Err(PyErr::fetch(py)))
        } else {
            r
        }
    };
    match r {
        Ok(()) => Ok(RunOutcome::Done),
        Err(e) if is_fatal(py, &e) => Ok(RunOutcome::Fatal(e)),
        Err(e) => {
            let what = if fut.is_none() { "__step" } else { "__wakeup" };
            let context = PyDict::new(py);
            context.set_item(
                "message",
                format!("Exception in callback {}.{}()", repr_of(&task), what),
            )?;
            context.set_item("exception", e.into_value(py))?;
            context.set_item("task", &task)?;
            loop_.call_method1(intern!(py, "call_exception_handler"), (context,))?;
            Ok(RunOutcome::Done)
        }
    }
}

/// `task.cancel(msg=None)` (asyncio's `Task.cancel`).
fn task_cancel(slf: &Bound<'_, Task>, msg: Option<Py<PyAny>>) -> PyResult<bool> {
    let py = slf.py();
    let waiter = {
        let mut t = slf.borrow_mut();
        t.log_traceback = false;
        if t.state != State::Pending {
            return Ok(false);
        }
        t.num_cancels_requested += 1;
        t.fut_waiter.as_ref().map(|w| w.clone_ref(py))
    };
    if let Some(w) = waiter {
        let m = msg.as_ref().map(|m| m.clone_ref(py));
        if py::recursion_guarded(py, c" while cancelling a task", || {
            cancel_future(w.bind(py), m)
        })? {
            // Keep the waiter: it may be a task that ignores the cancellation.
            return Ok(true);
        }
    }
    let mut t = slf.borrow_mut();
    t.must_cancel = true;
    let old = std::mem::replace(&mut t.cancel_message, msg);
    drop(t);
    drop(old);
    Ok(true)
}

/// Schedule the first step, or run it now (eager start); register the task.
fn start(slf: &Bound<'_, Task>, eager_start: bool) -> PyResult<()> {
    let py = slf.py();
    let loop_ = slf.borrow().loop_obj(py)?;
    if eager_start && loop_.call_method0(intern!(py, "is_running"))?.is_truthy()? {
        return compat(py)?
            .getattr(intern!(py, "eager_start"))?
            .call1((slf,))
            .map(|_| ());
    }
    schedule_step(slf, None)?;
    register_task(slf)
}

/// asyncio's `_register_task`: add the task to the weak set `all_tasks()` reads. Done here
/// (a weak reference in the set's data) unless the set is being iterated.
fn register_task(slf: &Bound<'_, Task>) -> PyResult<()> {
    let py = slf.py();
    let reg = registry(py)?;
    if reg.pending.bind(py).len() > 0 {
        // The set has removals to commit: its own add() does that first.
        reg.set.bind(py).call_method1(intern!(py, "add"), (slf,))?;
        return Ok(());
    }
    // SAFETY: both objects are alive; PyWeakref_NewRef returns a new reference or NULL.
    let r = unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            ffi::PyWeakref_NewRef(slf.as_ptr(), reg.remove.bind(py).as_ptr()),
        )?
    };
    reg.data.bind(py).add(r)
}

/// asyncio's task registry: the WeakSet `all_tasks()` reads, its parts (fixed objects for
/// the set's lifetime), and a native replacement for its `_remove` weakref callback.
struct Registry {
    set: Py<PyAny>,
    data: Py<pyo3::types::PySet>,
    iterating: Py<pyo3::types::PySet>,
    pending: Py<pyo3::types::PyList>,
    remove: Py<WeakSetRemove>,
}

static REGISTRY: PyOnceLock<Registry> = PyOnceLock::new();

fn registry(py: Python<'_>) -> PyResult<&Registry> {
    REGISTRY.get_or_try_init(py, || {
        let set = compat(py)?.getattr("all_tasks_set")?;
        let data = set
            .getattr("data")?
            .cast_into::<pyo3::types::PySet>()?
            .unbind();
        let iterating = set
            .getattr("_iterating")?
            .cast_into::<pyo3::types::PySet>()?
            .unbind();
        let pending = set
            .getattr("_pending_removals")?
            .cast_into::<pyo3::types::PyList>()?
            .unbind();
        let remove = Py::new(py, WeakSetRemove {})?;
        Ok::<_, PyErr>(Registry {
            set: set.unbind(),
            data,
            iterating,
            pending,
            remove,
        })
    })
}

/// The weak-reference callback of a registered task (the WeakSet's `_remove`, natively):
/// drop the dead reference from the set, or queue it while the set is being iterated.
#[pyclass(module = "ferroloop._ferroloop")]
pub struct WeakSetRemove {}

#[pymethods]
impl WeakSetRemove {
    fn __call__(&self, py: Python<'_>, wr: Bound<'_, PyAny>) -> PyResult<()> {
        let reg = registry(py)?;
        if reg.iterating.bind(py).len() > 0 {
            reg.pending.bind(py).append(wr)
        } else {
            reg.data.bind(py).discard(wr).map(|_| ())
        }
    }
}

static GET_RUNNING_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static GET_EVENT_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// The loop of a task made without `loop=`: the running loop, else asyncio's
/// `get_event_loop()` (C functions: no Python frame of ferroloop's between the caller and
/// asyncio's "no current event loop" warning, which names the first frame outside asyncio).
pub fn default_loop(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    let running = GET_RUNNING_LOOP
        .import(py, "asyncio.events", "_get_running_loop")?
        .call0()?;
    if !running.is_none() {
        return Ok(running);
    }
    GET_EVENT_LOOP
        .import(py, "asyncio.events", "get_event_loop")?
        .call0()
}

/// Fill in a new task (asyncio's `Task.__init__`).
#[allow(clippy::too_many_arguments)]
fn init(
    slf: &Bound<'_, Task>,
    coro: Bound<'_, PyAny>,
    loop_: Option<Bound<'_, PyAny>>,
    name: Option<Bound<'_, PyAny>>,
    context: Option<Bound<'_, PyAny>>,
    eager_start: bool,
) -> PyResult<()> {
    let py = slf.py();
    let loop_ = match loop_ {
        Some(l) if !l.is_none() => l,
        _ => default_loop(py)?,
    };
    let native = native_loop(&loop_)?;
    let debug = match &native {
        Some((n, _)) => n.bind(py).borrow().is_debug(),
        None => loop_.call_method0(intern!(py, "get_debug"))?.is_truthy()?,
    };
    let source_traceback = if debug {
        Some(py::extract_stack(py)?)
    } else {
        None
    };
    {
        let mut t = slf.borrow_mut();
        t.loop_ = Some(loop_.unbind());
        if let Some((n, d)) = native {
            t.native = Some(n);
            t.loop_dict = d;
        }
        t.source_traceback = source_traceback;
    }
    // SAFETY: a type check on a live object.
    let is_coro = unsafe { ffi::PyCoro_CheckExact(coro.as_ptr()) } != 0
        || ISCOROUTINE
            .import(py, "asyncio.coroutines", "iscoroutine")?
            .call1((&coro,))?
            .is_truthy()?;
    if !is_coro {
        return Err(PyTypeError::new_err(format!(
            "a coroutine was expected, got {}",
            repr_of(&coro)
        )));
    }
    let name = match name {
        Some(n) if !n.is_none() => Some(n.str()?.into_any().unbind()),
        _ => None,
    };
    let context = match context {
        Some(c) if !c.is_none() => c.unbind(),
        _ => copy_context(py)?,
    };
    {
        let mut t = slf.borrow_mut();
        if name.is_none() {
            t.number = TASK_COUNTER.fetch_add(1, Ordering::Relaxed) + 1;
        }
        t.name = name;
        t.coro = Some(coro.unbind());
        t.context = Some(context);
        t.log_destroy_pending = true;
    }
    start(slf, eager_start)
}

/// Make a task natively (the task factory and `loop.create_task` use this).
pub fn new_task<'py>(
    py: Python<'py>,
    coro: Bound<'py, PyAny>,
    loop_: Bound<'py, PyAny>,
    name: Option<Bound<'py, PyAny>>,
    context: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, Task>> {
    let t = Bound::new(py, Task::empty())?;
    init(&t, coro, Some(loop_), name, context, false)?;
    Ok(t)
}

/// The task's finalizer (asyncio's `Task.__del__` and `Future.__del__`): report a task
/// destroyed while pending, and an exception nobody retrieved.
fn finalize(slf: &Bound<'_, Task>) -> PyResult<()> {
    let py = slf.py();
    let (pending, log_tb, loop_, exc, tb) = {
        let Ok(t) = slf.try_borrow() else {
            return Ok(());
        };
        (
            t.state == State::Pending && t.log_destroy_pending,
            t.log_traceback,
            t.loop_.as_ref().map(|l| l.clone_ref(py)),
            t.exception.as_ref().map(|e| e.clone_ref(py)),
            t.source_traceback.as_ref().map(|s| s.clone_ref(py)),
        )
    };
    let Some(loop_) = loop_ else { return Ok(()) };
    let loop_ = loop_.bind(py);
    if pending {
        let context = PyDict::new(py);
        context.set_item("task", slf)?;
        context.set_item("message", "Task was destroyed but it is pending!")?;
        if let Some(tb) = &tb {
            if tb.bind(py).is_truthy()? {
                context.set_item("source_traceback", tb)?;
            }
        }
        loop_.call_method1(intern!(py, "call_exception_handler"), (context,))?;
    }
    if log_tb {
        let context = PyDict::new(py);
        let cls = slf.get_type().name()?;
        context.set_item("message", format!("{cls} exception was never retrieved"))?;
        context.set_item("exception", exc)?;
        context.set_item("future", slf)?;
        if let Some(tb) = &tb {
            if tb.bind(py).is_truthy()? {
                context.set_item("source_traceback", tb)?;
            }
        }
        loop_.call_method1(intern!(py, "call_exception_handler"), (context,))?;
    }
    Ok(())
}

static BASE_DEALLOC: std::sync::OnceLock<ffi::destructor> = std::sync::OnceLock::new();

impl crate::py::Finalized for Task {
    fn base_dealloc() -> &'static std::sync::OnceLock<ffi::destructor> {
        &BASE_DEALLOC
    }
}

/// `tp_finalize`: asyncio's `__del__`, with the current exception saved and restored.
unsafe extern "C" fn task_tp_finalize(obj: *mut ffi::PyObject) {
    // SAFETY: CPython calls tp_finalize with the GIL held and `obj` alive.
    let py = unsafe { Python::assume_attached() };
    // SAFETY: `obj` is a live object of (a subclass of) Task, borrowed for this call.
    let any = unsafe { Bound::from_borrowed_ptr(py, obj) };
    let Ok(task) = any.cast::<Task>() else {
        return;
    };
    if !has_report(task) {
        return; // the common case: nothing to log, so no error state to save
    }
    let saved = PyErr::take(py);
    if let Err(e) = finalize(task) {
        e.write_unraisable(py, Some(&any));
    }
    if let Some(e) = saved {
        e.restore(py);
    }
}

/// Will the finalizer log anything (a pending task, or an exception never retrieved)?
fn has_report(task: &Bound<'_, Task>) -> bool {
    task.try_borrow()
        .is_ok_and(|t| (t.state == State::Pending && t.log_destroy_pending) || t.log_traceback)
}

/// Give the Task type a finalizer (PyO3 has no `__del__`).
pub fn install(py: Python<'_>) {
    crate::py::install_finalizer::<Task>(py, task_tp_finalize);
    // TaskIter's am_send (see task_iter_am_send). 3.10's PyIter_Send would also need a type
    // flag, and ignores the slot without it.
    let it = py.get_type::<TaskIter>();
    let raw = it.as_type_ptr();
    // SAFETY: the type object is ours and set before any iterator exists; a heap type's
    // tp_as_async points into the type object itself.
    unsafe {
        let am = (*raw).tp_as_async;
        if !am.is_null() && (*am).am_send.is_none() {
            (*am).am_send = Some(task_iter_am_send);
            ffi::PyType_Modified(raw);
        }
    }
}

// --- Python API -----------------------------------------------------------------------

fn state_name(py: Python<'_>, state: State) -> &Bound<'_, pyo3::types::PyString> {
    match state {
        State::Pending => intern!(py, "PENDING"),
        State::Cancelled => intern!(py, "CANCELLED"),
        State::Finished => intern!(py, "FINISHED"),
    }
}

fn clone_opt(py: Python<'_>, o: &Option<Py<PyAny>>) -> Option<Py<PyAny>> {
    o.as_ref().map(|v| v.clone_ref(py))
}

#[pymethods]
impl Task {
    #[new]
    #[pyo3(signature = (*_args, **_kwargs))]
    fn new(_args: &Bound<'_, PyTuple>, _kwargs: Option<&Bound<'_, PyDict>>) -> Self {
        Task::empty()
    }

    #[pyo3(signature = (coro, *, r#loop=None, name=None, context=None, eager_start=None))]
    fn __init__(
        slf: &Bound<'_, Self>,
        coro: Bound<'_, PyAny>,
        r#loop: Option<Bound<'_, PyAny>>,
        name: Option<Bound<'_, PyAny>>,
        context: Option<Bound<'_, PyAny>>,
        eager_start: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        // Any object, by its truth (asyncio's `if eager_start and ...`).
        let eager_start = match eager_start {
            Some(e) => e.is_truthy()?,
            None => false,
        };
        if eager_start && !compat_flag(slf.py(), "HAS_EAGER_START")? {
            return Err(PyTypeError::new_err(
                "Task() got an unexpected keyword argument 'eager_start'",
            ));
        }
        init(slf, coro, r#loop, name, context, eager_start)
    }

    /// The finalizer as a method: a Python subclass's `tp_finalize` calls `__del__`, which
    /// its class statement finds here (the base type's own slot is set in `install`).
    #[pyo3(name = "__del__")]
    fn py_del(slf: &Bound<'_, Self>) -> PyResult<()> {
        finalize(slf)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.loop_)?;
        if let Some(n) = &self.native {
            visit.call(n)?;
        }
        if let Some(d) = &self.loop_dict {
            visit.call(d)?;
        }
        visit.call(&self.result)?;
        visit.call(&self.exception)?;
        visit.call(&self.exception_tb)?;
        for (cb, ctx) in &self.callbacks {
            match cb {
                DoneCallback::Call(f) => visit.call(f)?,
                DoneCallback::Wakeup(t) => visit.call(t)?,
            }
            visit.call(ctx)?;
        }
        visit.call(&self.source_traceback)?;
        visit.call(&self.cancel_message)?;
        visit.call(&self.cancelled_exc)?;
        visit.call(&self.coro)?;
        visit.call(&self.context)?;
        visit.call(&self.name)?;
        visit.call(&self.fut_waiter)?;
        if let Some(w) = &self.wakeup {
            visit.call(w)?;
        }
        visit.call(&self.step_exc)?;
        Ok(())
    }

    fn __clear__(&mut self) {
        self.result = None;
        self.exception = None;
        self.exception_tb = None;
        self.callbacks.clear();
        self.source_traceback = None;
        self.cancel_message = None;
        self.cancelled_exc = None;
        self.coro = None;
        self.context = None;
        self.fut_waiter = None;
        self.wakeup = None;
        self.step_exc = None;
    }

    #[classmethod]
    fn __class_getitem__<'py>(
        cls: &Bound<'py, PyType>,
        item: Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = cls.py();
        py.import("types")?
            .getattr("GenericAlias")?
            .call1((cls, item))
    }

    fn __repr__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        py.import("asyncio.base_tasks")?
            .getattr("_task_repr")?
            .call1((slf,))
    }

    fn __await__(slf: &Bound<'_, Self>) -> TaskIter {
        TaskIter {
            task: Some(slf.clone().unbind()),
            yielded: false,
        }
    }

    fn __iter__(slf: &Bound<'_, Self>) -> TaskIter {
        Self::__await__(slf)
    }

    // Future API

    fn done(&self) -> bool {
        self.state != State::Pending
    }

    fn cancelled(&self) -> bool {
        self.state == State::Cancelled
    }

    fn result<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        task_result(slf)
    }

    fn exception<'py>(slf: &Bound<'py, Self>) -> PyResult<Option<Py<PyAny>>> {
        let py = slf.py();
        let state = slf.borrow().state;
        match state {
            State::Cancelled => Err(PyErr::from_value(make_cancelled_error(slf)?)),
            State::Pending => Err(invalid_state(py, "Exception is not set.".to_string())),
            State::Finished => {
                let mut t = slf.borrow_mut();
                t.log_traceback = false;
                Ok(clone_opt(py, &t.exception))
            }
        }
    }

    #[pyo3(signature = (r#fn, *, context=None))]
    fn add_done_callback(
        slf: &Bound<'_, Self>,
        r#fn: Bound<'_, PyAny>,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let py = slf.py();
        let done = slf.borrow().state != State::Pending;
        let context = context.filter(|c| !c.is_none()).map(|c| c.unbind());
        if done {
            let (loop_, native) = {
                let t = slf.borrow();
                (t.loop_obj(py)?, t.native_ref(py).map(|n| n.unbind()))
            };
            let native = native.as_ref().map(|n| n.bind(py));
            return call_soon(&loop_, native, &r#fn, slf.as_any(), context);
        }
        let context = match context {
            Some(c) => c,
            None => copy_context(py)?,
        };
        slf.borrow_mut()
            .callbacks
            .push((DoneCallback::Call(r#fn.unbind()), Some(context)));
        Ok(())
    }

    fn remove_done_callback(slf: &Bound<'_, Self>, r#fn: Bound<'_, PyAny>) -> PyResult<usize> {
        let py = slf.py();
        // Which entries match `fn`: identity (as C's PyObject_RichCompareBool), and for
        // anything but plain functions `==`, compared outside the borrow (it may run Python).
        // SAFETY: a type check on a live object.
        let plain = |o: &Bound<'_, PyAny>| unsafe { ffi::PyFunction_Check(o.as_ptr()) } != 0;
        let fn_plain = plain(&r#fn);
        let mut to_compare: Vec<(usize, Py<PyAny>)> = Vec::new();
        let mut remove = Vec::new();
        for (i, (cb, _)) in slf.borrow().callbacks.iter().enumerate() {
            if let DoneCallback::Call(f) = cb {
                let f = f.bind(py);
                if f.is(&r#fn) {
                    remove.push(i);
                } else if !(fn_plain && plain(f)) {
                    to_compare.push((i, f.clone().unbind()));
                }
            }
        }
        for (i, f) in to_compare {
            if f.bind(py).eq(&r#fn)? {
                remove.push(i);
            }
        }
        if remove.is_empty() {
            return Ok(0);
        }
        remove.sort_unstable();
        let mut t = slf.borrow_mut();
        let old = std::mem::take(&mut t.callbacks);
        let mut gone = Vec::with_capacity(remove.len());
        let mut next = remove.iter().peekable();
        for (i, entry) in old.into_iter().enumerate() {
            if next.peek() == Some(&&i) {
                next.next();
                gone.push(entry);
            } else {
                t.callbacks.push(entry);
            }
        }
        drop(t);
        let n = gone.len();
        drop(gone);
        Ok(n)
    }

    #[pyo3(signature = (msg=None))]
    fn cancel(slf: &Bound<'_, Self>, msg: Option<Py<PyAny>>) -> PyResult<bool> {
        task_cancel(slf, msg)
    }

    fn cancelling(&self) -> i64 {
        self.num_cancels_requested
    }

    fn uncancel(slf: &Bound<'_, Self>) -> PyResult<i64> {
        let py = slf.py();
        let resets = *UNCANCEL_RESETS
            .get_or_try_init(py, || compat_flag(py, "UNCANCEL_RESETS_MUST_CANCEL"))?;
        let mut t = slf.borrow_mut();
        if t.num_cancels_requested > 0 {
            t.num_cancels_requested -= 1;
            if resets && t.num_cancels_requested == 0 {
                t.must_cancel = false;
            }
        }
        Ok(t.num_cancels_requested)
    }

    fn get_loop(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(self.loop_obj(py)?.unbind())
    }

    fn set_result(&self, _result: Bound<'_, PyAny>) -> PyResult<()> {
        Err(PyRuntimeError::new_err(
            "Task does not support set_result operation",
        ))
    }

    fn set_exception(&self, _exception: Bound<'_, PyAny>) -> PyResult<()> {
        Err(PyRuntimeError::new_err(
            "Task does not support set_exception operation",
        ))
    }

    fn _make_cancelled_error<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        make_cancelled_error(slf)
    }

    // Task API

    fn get_coro(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        clone_opt(py, &self.coro)
    }

    fn get_context(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        clone_opt(py, &self.context)
    }

    fn get_name(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        if let Some(n) = &slf.borrow().name {
            return Ok(n.clone_ref(py));
        }
        let number = slf.borrow().number;
        let name = pyo3::types::PyString::new(py, &format!("Task-{number}"))
            .into_any()
            .unbind();
        slf.borrow_mut().name = Some(name.clone_ref(py));
        Ok(name)
    }

    fn set_name(&mut self, value: Bound<'_, PyAny>) -> PyResult<()> {
        self.name = Some(value.str()?.into_any().unbind());
        Ok(())
    }

    #[pyo3(signature = (*, limit=None))]
    fn get_stack<'py>(
        slf: &Bound<'py, Self>,
        limit: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        py.import("asyncio.base_tasks")?
            .getattr("_task_get_stack")?
            .call1((slf, limit))
    }

    #[pyo3(signature = (*, limit=None, file=None))]
    fn print_stack<'py>(
        slf: &Bound<'py, Self>,
        limit: Option<Bound<'py, PyAny>>,
        file: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        py.import("asyncio.base_tasks")?
            .getattr("_task_print_stack")?
            .call1((slf, limit, file))
    }

    /// Run the first step now, inside the task's context (the eager start of 3.12+; the
    /// bookkeeping around it is asyncio's, in `_compat.eager_start`).
    fn _eager_step(slf: &Bound<'_, Self>) -> PyResult<()> {
        let r = step_run_and_handle_result(slf, None);
        let done_coro = {
            let mut t = slf.borrow_mut();
            if t.state != State::Pending {
                t.coro.take()
            } else {
                None
            }
        };
        drop(done_coro);
        r
    }

    // The private attributes asyncio's functions and CPython's tests read.

    #[getter]
    fn _state<'py>(&self, py: Python<'py>) -> &Bound<'py, pyo3::types::PyString> {
        state_name(py, self.state)
    }

    #[getter]
    fn _result(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        clone_opt(py, &self.result)
    }

    #[getter]
    fn _exception(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        clone_opt(py, &self.exception)
    }

    #[getter]
    fn _loop(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        clone_opt(py, &self.loop_)
    }

    #[getter]
    fn _callbacks(&self, py: Python<'_>) -> PyResult<Option<Vec<CallbackEntry>>> {
        if self.callbacks.is_empty() {
            return Ok(None);
        }
        let mut out = Vec::new();
        for (cb, ctx) in &self.callbacks {
            let f = match cb {
                DoneCallback::Call(f) => f.clone_ref(py),
                DoneCallback::Wakeup(t) => wakeup_callable(t.bind(py))?.into_any().unbind(),
            };
            out.push((f, clone_opt(py, ctx)));
        }
        Ok(Some(out))
    }

    #[getter]
    fn _source_traceback(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        clone_opt(py, &self.source_traceback)
    }

    #[getter]
    fn _log_traceback(&self) -> bool {
        self.log_traceback
    }

    #[setter(_log_traceback)]
    fn set_log_traceback(&mut self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        if value.is_truthy()? {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "_log_traceback can only be set to False",
            ));
        }
        self.log_traceback = false;
        Ok(())
    }

    #[getter]
    fn _asyncio_future_blocking(&self) -> bool {
        self.blocking
    }

    #[setter(_asyncio_future_blocking)]
    fn set_asyncio_future_blocking(&mut self, value: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        match value {
            Some(v) => {
                self.blocking = v.is_truthy()?;
                Ok(())
            }
            None => Err(pyo3::exceptions::PyAttributeError::new_err(
                "cannot delete attribute",
            )),
        }
    }

    #[getter]
    fn _cancel_message(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        clone_opt(py, &self.cancel_message)
    }

    #[setter(_cancel_message)]
    fn set_cancel_message(&mut self, value: Option<Py<PyAny>>) {
        self.cancel_message = value;
    }

    #[getter]
    fn _cancelled_exc(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        clone_opt(py, &self.cancelled_exc)
    }

    #[getter]
    fn _coro(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        clone_opt(py, &self.coro)
    }

    #[getter]
    fn _context(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        clone_opt(py, &self.context)
    }

    #[getter]
    fn _fut_waiter(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        clone_opt(py, &self.fut_waiter)
    }

    #[getter]
    fn _must_cancel(&self) -> bool {
        self.must_cancel
    }

    #[getter]
    fn _num_cancels_requested(&self) -> i64 {
        self.num_cancels_requested
    }

    #[getter]
    fn _log_destroy_pending(&self) -> bool {
        self.log_destroy_pending
    }

    #[setter(_log_destroy_pending)]
    fn set_log_destroy_pending(&mut self, value: bool) {
        self.log_destroy_pending = value;
    }
}

/// `await task`: yields the task once while it is pending, then returns its result
/// (asyncio's `Future.__await__` generator, as C's FutureIter).
#[pyclass(freelist = 1024, module = "ferroloop._ferroloop")]
pub struct TaskIter {
    task: Option<Py<Task>>,
    yielded: bool,
}

/// One step of `await task`: the task to yield, or the await's value (None: the iterator
/// was already exhausted, a bare StopIteration).
enum IterStep<'py> {
    Yield(Bound<'py, Task>),
    Return(Option<Bound<'py, PyAny>>),
}

impl TaskIter {
    fn advance<'py>(&mut self, py: Python<'py>) -> PyResult<IterStep<'py>> {
        let Some(task) = self.task.as_ref().map(|t| t.bind(py).clone()) else {
            return Ok(IterStep::Return(None));
        };
        if task.borrow().state == State::Pending {
            if !self.yielded {
                self.yielded = true;
                task.borrow_mut().blocking = true;
                return Ok(IterStep::Yield(task));
            }
            self.task = None;
            return Err(PyRuntimeError::new_err("await wasn't used with future"));
        }
        self.task = None;
        Ok(IterStep::Return(Some(task_result(&task)?)))
    }

    fn next<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, Task>>> {
        match self.advance(py)? {
            IterStep::Yield(t) => Ok(Some(t)),
            IterStep::Return(None) => Ok(None),
            IterStep::Return(Some(value)) => Err(pyo3::exceptions::PyStopIteration::new_err((
                value.unbind(),
            ))),
        }
    }
}

/// `am_send` of `TaskIter` (as asyncio's C FutureIter has): `await task` on Python 3.11
/// (whose SEND opcode calls it) gets the task's result back without a StopIteration
/// exception being made and caught. PyO3 has no such slot; `install` sets it.
///
/// The value sent is ignored (see `send`).
///
/// # Safety
/// Called by CPython with the GIL held, `iter` a TaskIter and `result` a valid out-pointer.
unsafe extern "C" fn task_iter_am_send(
    iter: *mut ffi::PyObject,
    _arg: *mut ffi::PyObject,
    result: *mut *mut ffi::PyObject,
) -> ffi::PySendResult {
    let py = Python::assume_attached();
    *result = std::ptr::null_mut();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let it = Bound::from_borrowed_ptr(py, iter).cast_into::<TaskIter>()?;
        let mut it = it.try_borrow_mut()?;
        it.advance(py)
    }));
    match outcome {
        Ok(Ok(IterStep::Yield(task))) => {
            *result = task.into_ptr();
            ffi::PySendResult::PYGEN_NEXT
        }
        Ok(Ok(IterStep::Return(value))) => {
            *result = value.map_or_else(|| ffi::Py_NewRef(ffi::Py_None()), Bound::into_ptr);
            ffi::PySendResult::PYGEN_RETURN
        }
        Ok(Err(e)) => {
            e.restore(py);
            ffi::PySendResult::PYGEN_ERROR
        }
        Err(_) => {
            pyo3::panic::PanicException::new_err("panic in TaskIter.send").restore(py);
            ffi::PySendResult::PYGEN_ERROR
        }
    }
}

#[pymethods]
impl TaskIter {
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(t) = &self.task {
            visit.call(t)?;
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        self.task = None;
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, Task>>> {
        self.next(py)
    }

    /// The value sent is ignored, as asyncio's FutureIter (C) and `Future.__await__` do.
    fn send<'py>(
        &mut self,
        py: Python<'py>,
        _value: Bound<'py, PyAny>,
    ) -> PyResult<Option<Bound<'py, Task>>> {
        match self.next(py)? {
            Some(t) => Ok(Some(t)),
            None => Err(pyo3::exceptions::PyStopIteration::new_err(())),
        }
    }

    #[pyo3(signature = (typ, val=None, tb=None))]
    fn throw(
        &mut self,
        typ: Bound<'_, PyAny>,
        val: Option<Bound<'_, PyAny>>,
        tb: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.task = None;
        Err(crate::py::thrown_exception(typ, val, tb)?)
    }

    fn close(&mut self) {
        self.task = None;
    }
}

/// The done callback a ferroloop task gives to futures that are not ferroloop tasks
/// (asyncio's bound `Task.__wakeup`).
#[pyclass(module = "ferroloop._ferroloop")]
pub struct TaskWakeup {
    task: Option<Py<Task>>,
}

#[pymethods]
impl TaskWakeup {
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(t) = &self.task {
            visit.call(t)?;
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        self.task = None;
    }

    fn __call__(&self, py: Python<'_>, fut: Bound<'_, PyAny>) -> PyResult<()> {
        match &self.task {
            Some(t) => wakeup(t.bind(py), &fut),
            None => Ok(()),
        }
    }

    /// As asyncio's bound `task_wakeup` method, whose repr names no task repr (a task's
    /// repr shows its waiter's callbacks, so naming the task here would recurse).
    fn __repr__(slf: &Bound<'_, Self>) -> String {
        format!(
            "<built-in method task_wakeup of Task object at {:#x}>",
            slf.borrow()
                .task
                .as_ref()
                .map_or(0, |t| t.as_ptr() as usize)
        )
    }

    /// As asyncio's bound `task_wakeup` method: future reprs show `cb=[Task.task_wakeup()]`.
    #[getter]
    fn __qualname__(&self) -> &'static str {
        "Task.task_wakeup"
    }

    #[getter]
    fn __self__(&self, py: Python<'_>) -> Option<Py<Task>> {
        self.task.as_ref().map(|t| t.clone_ref(py))
    }
}

/// A task step scheduled through `loop.call_soon` (other loops, debug mode).
#[pyclass(module = "ferroloop._ferroloop")]
pub struct TaskStep {
    task: Option<Py<Task>>,
    exc: Option<Py<PyAny>>,
}

#[pymethods]
impl TaskStep {
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(t) = &self.task {
            visit.call(t)?;
        }
        visit.call(&self.exc)?;
        Ok(())
    }

    fn __clear__(&mut self) {
        self.task = None;
        self.exc = None;
    }

    fn __call__(&self, py: Python<'_>) -> PyResult<()> {
        match &self.task {
            Some(t) => step(t.bind(py), self.exc.as_ref().map(|e| e.bind(py).clone())),
            None => Ok(()),
        }
    }

    fn __repr__(slf: &Bound<'_, Self>) -> String {
        format!(
            "<TaskStepMethWrapper object at {:#x}>",
            slf.as_ptr() as usize
        )
    }

    /// The task, as a bound method's `__self__` (debug reports name the task by it).
    #[getter]
    fn __self__(&self, py: Python<'_>) -> Option<Py<Task>> {
        self.task.as_ref().map(|t| t.clone_ref(py))
    }
}

static TASK_FACTORY_FN: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Remember the module's `task_factory` function, so `loop.create_task` can recognise it.
pub fn remember_factory(py: Python<'_>, f: Bound<'_, PyAny>) {
    let _ = TASK_FACTORY_FN.set(py, f.unbind());
}

/// Is `factory` ferroloop's own `task_factory`?
pub fn is_native_factory(factory: &Bound<'_, PyAny>) -> bool {
    TASK_FACTORY_FN
        .get(factory.py())
        .is_some_and(|f| f.bind(factory.py()).is(factory))
}

/// `ferroloop.task_factory(loop, coro, *, name=None, context=None)`: a task factory for
/// `loop.set_task_factory` that makes ferroloop Tasks.
#[pyfunction]
#[pyo3(signature = (r#loop, coro, *, name=None, context=None, eager_start=None))]
pub fn task_factory<'py>(
    py: Python<'py>,
    r#loop: Bound<'py, PyAny>,
    coro: Bound<'py, PyAny>,
    name: Option<Bound<'py, PyAny>>,
    context: Option<Bound<'py, PyAny>>,
    eager_start: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, Task>> {
    let eager_start = match eager_start {
        Some(e) => e.is_truthy()?,
        None => false,
    };
    if eager_start && !compat_flag(py, "HAS_EAGER_START")? {
        return Err(PyTypeError::new_err(
            "task_factory() got an unexpected keyword argument 'eager_start'",
        ));
    }
    let t = Bound::new(py, Task::empty())?;
    init(&t, coro, Some(r#loop), name, context, eager_start)?;
    Ok(t)
}

// --- operations on any future (native for ferroloop tasks) ------------------------------
//
// The task functions (`wait.rs`, `gather.rs`) accept asyncio Futures, asyncio Tasks,
// ferroloop Tasks and other future-likes; these do what asyncio's functions do through
// method calls, without a call for ferroloop tasks. As asyncio's C code, the shortcut is
// for the exact type only: a subclass's overridden methods are called.

/// `fut.done()`.
pub fn any_done(fut: &Bound<'_, PyAny>) -> PyResult<bool> {
    if let Ok(t) = fut.cast_exact::<Task>() {
        return Ok(t.borrow().state != State::Pending);
    }
    fut.call_method0(intern!(fut.py(), "done"))?.is_truthy()
}

/// `fut.cancelled()`.
pub fn any_cancelled(fut: &Bound<'_, PyAny>) -> PyResult<bool> {
    if let Ok(t) = fut.cast_exact::<Task>() {
        return Ok(t.borrow().state == State::Cancelled);
    }
    fut.call_method0(intern!(fut.py(), "cancelled"))?
        .is_truthy()
}

/// `fut.exception()` (marks the exception retrieved; raises if cancelled or pending).
pub fn any_exception<'py>(fut: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
    let py = fut.py();
    if let Ok(t) = fut.cast_exact::<Task>() {
        return Ok(Task::exception(t)?.map(|e| e.into_bound(py)));
    }
    let e = fut.call_method0(intern!(py, "exception"))?;
    Ok((!e.is_none()).then_some(e))
}

/// `fut.result()`.
pub fn any_result<'py>(fut: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    if let Ok(t) = fut.cast_exact::<Task>() {
        return task_result(t);
    }
    fut.call_method0(intern!(fut.py(), "result"))
}

/// `fut._make_cancelled_error()`.
pub fn any_make_cancelled_error<'py>(fut: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    if let Ok(t) = fut.cast_exact::<Task>() {
        return make_cancelled_error(t);
    }
    fut.call_method0(intern!(fut.py(), "_make_cancelled_error"))
}

/// `fut._cancel_message`.
pub fn any_cancel_message<'py>(fut: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let py = fut.py();
    if let Ok(t) = fut.cast_exact::<Task>() {
        return Ok(t
            .borrow()
            .cancel_message
            .as_ref()
            .map_or_else(|| py.None().into_bound(py), |m| m.bind(py).clone()));
    }
    fut.getattr(intern!(py, "_cancel_message"))
}

/// `fut.add_done_callback(cb)`.
pub fn any_add_done_callback(fut: &Bound<'_, PyAny>, cb: &Bound<'_, PyAny>) -> PyResult<()> {
    if let Ok(t) = fut.cast_exact::<Task>() {
        return Task::add_done_callback(t, cb.clone(), None);
    }
    fut.call_method1(intern!(fut.py(), "add_done_callback"), (cb,))?;
    Ok(())
}

/// `fut.remove_done_callback(cb)`; for ferroloop tasks `cb` is matched by identity only
/// (the callers pass their own native callbacks).
pub fn any_remove_done_callback(fut: &Bound<'_, PyAny>, cb: &Bound<'_, PyAny>) -> PyResult<()> {
    if let Ok(t) = fut.cast_exact::<Task>() {
        let gone: Vec<_> = {
            let mut b = t.borrow_mut();
            let old = std::mem::take(&mut b.callbacks);
            let (gone, kept): (Vec<_>, Vec<_>) = old
                .into_iter()
                .partition(|(c, _)| matches!(c, DoneCallback::Call(f) if f.bind(fut.py()).is(cb)));
            b.callbacks = kept;
            gone
        };
        drop(gone);
        return Ok(());
    }
    fut.call_method1(intern!(fut.py(), "remove_done_callback"), (cb,))?;
    Ok(())
}

/// `futures._get_loop(fut)`.
pub fn any_get_loop<'py>(fut: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    if let Ok(t) = fut.cast_exact::<Task>() {
        return t.borrow().loop_obj(fut.py());
    }
    future_get_loop(fut)
}

/// `fut._log_destroy_pending = False` (a task made for the caller need not be awaited).
pub fn any_quiet_destroy(fut: &Bound<'_, PyAny>) -> PyResult<()> {
    if let Ok(t) = fut.cast_exact::<Task>() {
        t.borrow_mut().log_destroy_pending = false;
        return Ok(());
    }
    fut.setattr(intern!(fut.py(), "_log_destroy_pending"), false)
}
