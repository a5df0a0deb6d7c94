//! `Handle` and `TimerHandle` (asyncio's `events.Handle`/`events.TimerHandle`).

use pyo3::exceptions::PyKeyboardInterrupt;
use pyo3::exceptions::PySystemExit;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::pyclass::CompareOp;
use pyo3::types::{PyTuple, PyWeakrefReference};

use crate::event_loop::EventLoop;
use crate::py;

/// A callback scheduled on the loop. Timer fields (`when`, `scheduled`) live here too, so
/// the loop can keep one queue type; `TimerHandle` only adds the timer methods.
///
/// Handles are not tracked by Python's cycle collector: every `call_soon` allocates one,
/// and tracking them made the collector a third of a busy loop's time. They can take part
/// in no cycle: the loop is held through a weak reference, and the callback, arguments and
/// context are dropped once a one-shot handle has run or is cancelled (until then the
/// loop holds the handle, so it is alive anyway). A free list recycles handle objects:
/// allocation was the next largest cost of a busy loop.
#[pyclass(subclass, weakref, freelist = 4096, module = "ferroloop._ferroloop")]
pub struct Handle {
    pub callback: Option<Py<PyAny>>,
    pub args: Option<Py<PyTuple>>,
    pub context: Option<Py<PyAny>>,
    pub loop_: Option<Py<PyWeakrefReference>>,
    /// Reader/writer handles run again and again; every other handle runs once.
    pub repeat: bool,
    pub cancelled: bool,
    pub source_traceback: Option<Py<PyAny>>,
    pub repr: Option<Py<PyAny>>,
    pub is_timer: bool,
    pub when: f64,
    pub scheduled: bool,
}

/// A handle that runs at a deadline (`loop.call_at`/`call_later`).
#[pyclass(extends = Handle, freelist = 4096, module = "ferroloop._ferroloop")]
pub struct TimerHandle;

impl Handle {
    pub fn new(
        py: Python<'_>,
        callback: Py<PyAny>,
        args: Py<PyTuple>,
        loop_: Option<Py<PyWeakrefReference>>,
        context: Option<Py<PyAny>>,
        debug: bool,
    ) -> PyResult<Handle> {
        let context = match context {
            Some(c) => c,
            // SAFETY: PyContext_CopyCurrent returns a new reference or NULL with an error set;
            // the copy is a new, tracked Context that only this handle refers to.
            None => unsafe {
                let copy = Bound::from_owned_ptr_or_err(py, ffi::PyContext_CopyCurrent())?;
                ffi::PyObject_GC_UnTrack(copy.as_ptr().cast());
                copy.unbind()
            },
        };
        let source_traceback = if debug {
            Some(py::extract_stack(py)?)
        } else {
            None
        };
        Ok(Handle {
            callback: Some(callback),
            args: Some(args),
            context: Some(context),
            loop_,
            repeat: false,
            cancelled: false,
            source_traceback,
            repr: None,
            is_timer: false,
            when: 0.0,
            scheduled: false,
        })
    }

    /// Build a Python `Handle`, or a `TimerHandle` when `when` is given.
    /// The loop, if it is still alive.
    pub fn loop_ref<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        self.loop_.as_ref().and_then(|w| w.bind(py).upgrade())
    }

    /// After a one-shot handle ran: drop its callback and arguments (the caller drops the
    /// returned values once the borrow has ended, as their destructors may run Python code).
    pub fn release(&mut self) -> Option<Released> {
        if self.repeat {
            return None;
        }
        Some(self.take_all())
    }

    fn take_all(&mut self) -> Released {
        let context = self.context.take();
        if let Some(c) = &context {
            track_context(c);
        }
        (self.callback.take(), self.args.take(), context)
    }

    /// The context, for code outside the handle (which may keep it: it goes back on the
    /// collector's lists).
    fn shared_context(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        let c = self.context.as_ref()?;
        track_context(c);
        Some(c.clone_ref(py))
    }

    pub fn create(py: Python<'_>, mut h: Handle, when: Option<f64>) -> PyResult<Bound<'_, Handle>> {
        let obj = match when {
            None => Bound::new(py, h)?,
            Some(w) => {
                h.is_timer = true;
                h.when = w;
                let init = PyClassInitializer::from(h).add_subclass(TimerHandle);
                Bound::new(py, init)?.into_super()
            }
        };
        // PyO3 makes every class a GC type; handles can be in no cycle (see above), so
        // take them off the collector's lists.
        // SAFETY: `obj` is a live GC object we just created; untracking is always allowed.
        unsafe { ffi::PyObject_GC_UnTrack(obj.as_ptr().cast()) };
        Ok(obj)
    }
}

/// The contextvars context a handle copies for itself (`PyContext_CopyCurrent`, once per
/// `call_soon`) is kept off the cycle collector's lists while only the handle holds it: a
/// thread posting callbacks faster than the loop ran them left thousands of fresh contexts
/// for every young collection to walk (a fifth of `call_soon_threadsafe`'s time). Such a
/// copy can be in no cycle: it is new, nothing but the handle refers to it, and its
/// variables were set before it existed, so none of them leads back to it. It goes back on
/// the lists (`track_context`) as soon as it leaves the handle: when it is handed out
/// (`get_context`), when the handle runs or is cancelled, and when the handle is freed,
/// since a context's deallocator expects a tracked object on some Python versions.
fn track_context(context: &Py<PyAny>) {
    let p = context.as_ptr();
    // SAFETY: the caller holds the GIL (handles live and die under it); `p` is a live
    // object; only an untracked Context (one this module untracked) is tracked again, and
    // tracking an already tracked object is never attempted (CPython aborts on that).
    unsafe {
        if ffi::PyContext_CheckExact(p) != 0 && ffi::PyObject_GC_IsTracked(p) == 0 {
            ffi::PyObject_GC_Track(p.cast());
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Some(c) = &self.context {
            track_context(c);
        }
    }
}

/// A handle's callback, arguments and context, taken out to be dropped outside any borrow.
pub type Released = (Option<Py<PyAny>>, Option<Py<PyTuple>>, Option<Py<PyAny>>);

/// What running a handle produced, as asyncio's `Handle._run` sees it.
pub enum RunOutcome {
    Done,
    /// KeyboardInterrupt/SystemExit: propagates out of run_forever.
    Fatal(PyErr),
}

/// Run `h` inside its context. Exceptions other than KeyboardInterrupt/SystemExit go to
/// the loop's exception handler (asyncio's `Handle._run`).
///
/// A one-shot handle gives up its callback and arguments as it runs, unless `keep` (debug
/// mode, which still formats the handle afterwards, and `Handle._run()`); they are put
/// back if the callback raises, so the error report can show them.
pub fn run_handle(
    py: Python<'_>,
    h: &Bound<'_, Handle>,
    loop_: Option<&Bound<'_, PyAny>>,
    keep: bool,
) -> PyResult<RunOutcome> {
    let (callback, args, context, taken) = {
        let mut b = h.borrow_mut();
        if b.cancelled {
            return Ok(RunOutcome::Done);
        }
        let taken = !keep && !b.repeat;
        let parts = if taken {
            b.take_all()
        } else {
            (
                b.callback.as_ref().map(|c| c.clone_ref(py)),
                b.args.as_ref().map(|a| a.clone_ref(py)),
                b.context.as_ref().map(|c| c.clone_ref(py)),
            )
        };
        match parts {
            (Some(c), Some(a), Some(x)) => (c, a, x, taken),
            _ => return Ok(RunOutcome::Done),
        }
    };
    // Enter the context natively (asyncio's Context.run without the bound-method call).
    // SAFETY: `context` is a live contextvars.Context kept alive by our reference.
    let result = if unsafe { ffi::PyContext_Enter(context.as_ptr()) } < 0 {
        Err(PyErr::fetch(py))
    } else {
        let r = callback.bind(py).call1(args.bind(py));
        // SAFETY: we entered this context just above, on this thread.
        if unsafe { ffi::PyContext_Exit(context.as_ptr()) } < 0 {
            Err(PyErr::fetch(py))
        } else {
            r.map(|_| ())
        }
    };
    let Err(e) = result else {
        // callback and args are dropped here, outside any borrow.
        return Ok(RunOutcome::Done);
    };
    if taken {
        let mut b = h.borrow_mut();
        b.callback = Some(callback);
        b.args = Some(args);
        b.context = Some(context);
    }
    if e.is_instance_of::<PyKeyboardInterrupt>(py) || e.is_instance_of::<PySystemExit>(py) {
        return Ok(RunOutcome::Fatal(e));
    }
    let loop_ = match loop_ {
        Some(l) => Some(l.clone()),
        None => h.borrow().loop_ref(py),
    };
    let Some(l) = loop_ else {
        // The loop is gone: nobody to report to, so the caller gets the error.
        return Err(e);
    };
    // into_value attaches the traceback to the exception object.
    l.call_method1(
        pyo3::intern!(py, "_report_callback_error"),
        (h, e.into_value(py)),
    )?;
    if taken {
        let released = h.borrow_mut().release();
        drop(released);
    }
    Ok(RunOutcome::Done)
}

fn cancel_handle(slf: &Bound<'_, Handle>) -> PyResult<()> {
    let py = slf.py();
    let (loop_, notify) = {
        let h = slf.borrow();
        if h.cancelled {
            return Ok(());
        }
        (h.loop_ref(py), h.is_timer && h.scheduled)
    };
    if let (Some(l), true) = (&loop_, notify) {
        if let Ok(native) = l.cast::<EventLoop>() {
            native.borrow_mut().timer_handle_cancelled();
        } else {
            l.call_method1(pyo3::intern!(py, "_timer_handle_cancelled"), (slf,))?;
        }
    }
    slf.borrow_mut().cancelled = true;
    // In debug mode keep a repr (which now says "cancelled") so the callback and
    // arguments still show once they are dropped, as asyncio does.
    if let Some(l) = &loop_ {
        if l.call_method0(pyo3::intern!(py, "get_debug"))?
            .is_truthy()?
        {
            let repr = py::handle_repr(slf.as_any())?;
            slf.borrow_mut().repr = Some(repr);
        }
    }
    // Dropped after the borrow ends: their destructors may run Python code.
    let released = slf.borrow_mut().take_all();
    drop(released);
    Ok(())
}

#[pymethods]
impl Handle {
    /// Cancel the callback; a cancelled handle never runs. Idempotent.
    fn cancel(slf: &Bound<'_, Self>) -> PyResult<()> {
        cancel_handle(slf)
    }

    fn cancelled(&self) -> bool {
        self.cancelled
    }

    fn get_context(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.shared_context(py)
    }

    /// Run the callback now (asyncio's private `Handle._run`).
    fn _run(slf: &Bound<'_, Self>) -> PyResult<()> {
        match run_handle(slf.py(), slf, None, true)? {
            RunOutcome::Done => Ok(()),
            RunOutcome::Fatal(e) => Err(e),
        }
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        py::handle_repr(slf.as_any())
    }

    #[getter]
    fn _callback(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.callback.as_ref().map(|c| c.clone_ref(py))
    }

    #[getter]
    fn _args(&self, py: Python<'_>) -> Option<Py<PyTuple>> {
        self.args.as_ref().map(|c| c.clone_ref(py))
    }

    #[getter]
    fn _cancelled(&self) -> bool {
        self.cancelled
    }

    #[getter]
    fn _context(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.get_context(py)
    }

    #[getter]
    fn _loop<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        self.loop_ref(py)
    }

    #[getter]
    fn _source_traceback(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.source_traceback.as_ref().map(|c| c.clone_ref(py))
    }

    #[setter(_source_traceback)]
    fn set_source_traceback(&mut self, value: Option<Py<PyAny>>) {
        self.source_traceback = value;
    }

    #[getter]
    fn _repr(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.repr.as_ref().map(|c| c.clone_ref(py))
    }

    #[getter]
    fn _is_timer(&self) -> bool {
        self.is_timer
    }
}

#[pymethods]
impl TimerHandle {
    /// The absolute time (on `loop.time()`'s clock) the callback is scheduled for.
    fn when(slf: PyRef<'_, Self>) -> f64 {
        slf.as_super().when
    }

    #[getter]
    fn _when(slf: PyRef<'_, Self>) -> f64 {
        slf.as_super().when
    }

    #[getter]
    fn _scheduled(slf: PyRef<'_, Self>) -> bool {
        slf.as_super().scheduled
    }

    fn __hash__(slf: PyRef<'_, Self>) -> u64 {
        slf.as_super().when.to_bits()
    }

    fn __richcmp__(
        slf: &Bound<'_, Self>,
        other: &Bound<'_, PyAny>,
        op: CompareOp,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let Ok(other) = other.cast::<TimerHandle>() else {
            return Ok(py.NotImplemented());
        };
        let a = slf.as_super().borrow();
        let b = other.as_super().borrow();
        let result = match op {
            CompareOp::Lt => a.when < b.when,
            CompareOp::Le => a.when < b.when || a.when == b.when && equal(py, &a, &b)?,
            CompareOp::Gt => a.when > b.when,
            CompareOp::Ge => a.when > b.when || a.when == b.when && equal(py, &a, &b)?,
            CompareOp::Eq => a.when == b.when && equal(py, &a, &b)?,
            CompareOp::Ne => !(a.when == b.when && equal(py, &a, &b)?),
        };
        Ok(result.into_pyobject(py)?.to_owned().into_any().unbind())
    }
}

/// asyncio's TimerHandle equality: same callback, args and cancelled state.
fn equal(py: Python<'_>, a: &Handle, b: &Handle) -> PyResult<bool> {
    let eq = |x: Option<&Py<PyAny>>, y: Option<&Py<PyAny>>| -> PyResult<bool> {
        match (x, y) {
            (Some(x), Some(y)) => x.bind(py).eq(y.bind(py)),
            (None, None) => Ok(true),
            _ => Ok(false),
        }
    };
    let args_a = a.args.as_ref().map(|t| t.clone_ref(py).into_any());
    let args_b = b.args.as_ref().map(|t| t.clone_ref(py).into_any());
    Ok(eq(a.callback.as_ref(), b.callback.as_ref())?
        && eq(args_a.as_ref(), args_b.as_ref())?
        && a.cancelled == b.cancelled)
}
