//! The native core of the event loop (asyncio's `base_events.BaseEventLoop` hot paths):
//! ready queue, timers, one loop turn, run/stop/close, call_soon/later/at, readers/writers.

use std::collections::VecDeque;

use pyo3::exceptions::PyTypeError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyFloat, PyInt, PyTuple, PyWeakrefReference};
use pyo3::{ffi, PyTraverseError, PyVisit};

use crate::errors::{loop_closed, os_error};
use crate::handles::{run_handle, Handle, RunOutcome};
use crate::py;
use crate::reactor::{EventBuf, Reactor, Ready};
use crate::sockets::SockReady;
use crate::task::{self, Task};
use crate::timers::{monotonic, monotonic_resolution, TimerHeap};

/// asyncio's MAXIMUM_SELECT_TIMEOUT: never sleep longer than a day in one poll.
const MAXIMUM_SELECT_TIMEOUT: f64 = 24.0 * 3600.0;
/// asyncio purges cancelled timers when there are more than this many scheduled...
const MIN_SCHEDULED_TIMER_HANDLES: usize = 100;
/// ...and more than this fraction of them is cancelled.
const MIN_CANCELLED_TIMER_HANDLES_FRACTION: f64 = 0.5;

/// One entry of the ready queue: a handle, or a ferroloop task's step or wake-up (queued
/// without a Handle; see `task.rs`).
pub enum Job {
    Handle(Py<Handle>),
    Step(Py<Task>),
    /// Wake the task: the future it awaited is done.
    Wakeup(Py<Task>, Py<PyAny>),
}

/// The native base of `ferroloop.Loop`.
///
/// Borrow discipline: a `borrow_mut` of the loop is never held across anything that can
/// run Python code (a call, an allocation that may trigger GC, a decref that may run a
/// finalizer), because that code may re-enter the loop (`call_soon` from `__del__`, or
/// `call_soon_threadsafe` from another thread that took the GIL).
#[pyclass(subclass, module = "ferroloop._ferroloop")]
pub struct EventLoop {
    ready: VecDeque<Job>,
    timers: TimerHeap<Py<Handle>>,
    timer_cancelled_count: usize,
    stopping: bool,
    closed: bool,
    thread_id: Option<Py<PyAny>>,
    debug: bool,
    /// `loop.create_task` without a task factory makes ferroloop Tasks (else asyncio's).
    native_tasks: bool,
    slow_callback_duration: f64,
    clock_resolution: f64,
    /// `loop.time` assigned on the instance (a patched clock), or None.
    time_override: Option<Py<PyAny>>,
    /// A Python subclass defines its own `time()` (set by `Loop.__init__`).
    class_clock: bool,
    reactor: Reactor<Py<Handle>>,
    /// True while the loop thread waits in epoll without the GIL: wake it on a threadsafe call.
    sleeping: bool,
    events: Vec<Ready>,
    buf: Option<EventBuf>,
    /// A weak reference to this loop, shared by every handle (handles hold no strong one).
    weak_self: Option<Py<PyWeakrefReference>>,
}

impl EventLoop {
    /// Queue a job for the next turn (ferroloop tasks schedule their steps here).
    pub fn push_job(&mut self, job: Job) {
        self.ready.push_back(job);
    }

    pub fn is_debug(&self) -> bool {
        self.debug
    }

    /// The program replaced `loop.time` (on the instance, or in a subclass).
    fn python_clock(&self) -> bool {
        self.class_clock || self.time_override.is_some()
    }

    pub fn check_open(&self) -> PyResult<()> {
        self.check_closed()
    }

    pub fn timer_handle_cancelled(&mut self) {
        self.timer_cancelled_count += 1;
    }

    /// asyncio's purge: rebuild the heap when most timers are cancelled, otherwise pop the
    /// cancelled ones at its head. Returns the removed handles, to be dropped unborrowed.
    fn purge_cancelled_timers(&mut self, py: Python<'_>) -> Vec<Py<Handle>> {
        let mut removed = Vec::new();
        let n = self.timers.len();
        if n > MIN_SCHEDULED_TIMER_HANDLES
            && self.timer_cancelled_count as f64 / n as f64 > MIN_CANCELLED_TIMER_HANDLES_FRACTION
        {
            // BinaryHeap::retain keeps each entry's (when, seq), so tie order survives.
            self.timers.retain(|h| {
                if h.borrow(py).cancelled {
                    removed.push(h.clone_ref(py));
                    false
                } else {
                    true
                }
            });
            for h in &removed {
                h.borrow_mut(py).scheduled = false;
            }
            self.timer_cancelled_count = 0;
        } else {
            while let Some((_, h)) = self.timers.peek() {
                if !h.borrow(py).cancelled {
                    break;
                }
                if let Some((_, h)) = self.timers.pop() {
                    self.timer_cancelled_count = self.timer_cancelled_count.saturating_sub(1);
                    h.borrow_mut(py).scheduled = false;
                    removed.push(h);
                }
            }
        }
        removed
    }

    fn check_closed(&self) -> PyResult<()> {
        if self.closed {
            Err(loop_closed())
        } else {
            Ok(())
        }
    }
}

/// asyncio's C Future type (`_asyncio.Future`), when the accelerator is there, and the
/// keyword dict `create_future` reuses for it.
static C_FUTURE: PyOnceLock<Option<(Py<PyAny>, Py<PyDict>)>> = PyOnceLock::new();

/// The reusable `{"loop": ...}` dict when `cls` is asyncio's C Future. Only that class gets
/// it: a class written in Python or another extension might keep the dict it is given.
fn c_future_kwargs<'py>(
    py: Python<'py>,
    cls: &Bound<'py, PyAny>,
) -> PyResult<Option<&'py Bound<'py, PyDict>>> {
    let cached = C_FUTURE.get_or_try_init(py, || {
        Ok::<_, PyErr>(match py.import("_asyncio") {
            Ok(m) => Some((m.getattr("Future")?.unbind(), PyDict::new(py).unbind())),
            Err(_) => None,
        })
    })?;
    Ok(match cached {
        Some((c, kwargs)) if cls.is(c) => Some(kwargs.bind(py)),
        _ => None,
    })
}

/// `_io_key`'s answer: (selectors event mask, reader, writer).
type IoKey = (u8, Option<Py<Handle>>, Option<Py<Handle>>);

fn accept_empty(value: &Bound<'_, PyAny>, name: &str) -> PyResult<()> {
    if value.len()? == 0 {
        Ok(())
    } else {
        Err(PyTypeError::new_err(format!(
            "{name} is the native loop's own queue and cannot be replaced"
        )))
    }
}

/// Checks asyncio makes on every callback it is handed (debug mode adds more, in Python).
fn check_callable(
    slf: &Bound<'_, EventLoop>,
    callback: &Bound<'_, PyAny>,
    method: &str,
) -> PyResult<()> {
    if !callback.is_callable() {
        // asyncio's own check gives the exact message (coroutine or non-callable).
        slf.call_method1(intern!(slf.py(), "_check_callback"), (callback, method))?;
        return Err(PyTypeError::new_err(format!(
            "a callable object was expected by {method}(), got {}",
            callback.repr()?
        )));
    }
    Ok(())
}

fn new_handle<'py>(
    slf: &Bound<'py, EventLoop>,
    callback: Bound<'py, PyAny>,
    args: Bound<'py, PyTuple>,
    context: Option<Bound<'py, PyAny>>,
    when: Option<f64>,
    pre: Prechecked,
) -> PyResult<Bound<'py, Handle>> {
    let py = slf.py();
    let h = Handle::new(
        py,
        callback.unbind(),
        args.unbind(),
        Some(pre.weak),
        context.map(Bound::unbind),
        pre.debug,
    )?;
    Handle::create(py, h, when)
}

/// The loop's weak reference, made once and shared by its handles.
fn weak_self(slf: &Bound<'_, EventLoop>) -> PyResult<Py<PyWeakrefReference>> {
    let py = slf.py();
    if let Some(w) = &slf.borrow().weak_self {
        return Ok(w.clone_ref(py));
    }
    let w = PyWeakrefReference::new(slf.as_any())?.unbind();
    slf.borrow_mut().weak_self = Some(w.clone_ref(py));
    Ok(w)
}

/// Validate and prepare a scheduling call: closed check, then asyncio's debug-mode checks.
fn precheck(
    slf: &Bound<'_, EventLoop>,
    callback: &Bound<'_, PyAny>,
    method: &str,
    check_thread: bool,
) -> PyResult<Prechecked> {
    let (debug, weak) = {
        let s = slf.borrow();
        s.check_closed()?;
        (s.debug, s.weak_self.as_ref().map(|w| w.clone_ref(slf.py())))
    };
    let weak = match weak {
        Some(w) => w,
        None => weak_self(slf)?,
    };
    if debug {
        if check_thread {
            slf.call_method0(intern!(slf.py(), "_check_thread"))?;
        }
        slf.call_method1(intern!(slf.py(), "_check_callback"), (callback, method))?;
    } else {
        check_callable(slf, callback, method)?;
    }
    Ok(Prechecked { debug, weak })
}

/// What a scheduling call learnt from the loop in its one borrow.
struct Prechecked {
    debug: bool,
    weak: Py<PyWeakrefReference>,
}

fn schedule_at<'py>(
    slf: &Bound<'py, EventLoop>,
    when: f64,
    callback: Bound<'py, PyAny>,
    args: Bound<'py, PyTuple>,
    context: Option<Bound<'py, PyAny>>,
    method: &str,
) -> PyResult<Bound<'py, Handle>> {
    let pre = precheck(slf, &callback, method, true)?;
    let h = new_handle(slf, callback, args, context, Some(when), pre)?;
    h.borrow_mut().scheduled = true;
    slf.borrow_mut().timers.push(when, h.clone().unbind());
    Ok(h)
}

fn set_io<'py>(
    slf: &Bound<'py, EventLoop>,
    fd: &Bound<'py, PyAny>,
    callback: Bound<'py, PyAny>,
    args: Bound<'py, PyTuple>,
    write: bool,
) -> PyResult<Bound<'py, Handle>> {
    let debug = {
        let s = slf.borrow();
        s.check_closed()?;
        s.debug
    };
    let fd = py::fileobj_to_fd(fd)?;
    // A `sock_*` wait's reader (writer) wants one event, then is removed: registered
    // one-shot, so that its removal needs no epoll_ctl (see `reactor::Registration`).
    let oneshot = callback.is_exact_instance_of::<SockReady>();
    // asyncio's _add_reader checks nothing about the callback.
    let pre = Prechecked {
        debug,
        weak: weak_self(slf)?,
    };
    let h = new_handle(slf, callback, args, None, None, pre)?;
    h.borrow_mut().repeat = true;
    let old = slf
        .borrow_mut()
        .reactor
        .set(fd, write, h.clone().unbind(), oneshot)
        .map_err(os_error)?;
    if let Some(old) = old {
        old.bind(slf.py())
            .call_method0(intern!(slf.py(), "cancel"))?;
    }
    Ok(h)
}

fn unset_io(slf: &Bound<'_, EventLoop>, fd: &Bound<'_, PyAny>, write: bool) -> PyResult<bool> {
    if slf.borrow().closed {
        return Ok(false);
    }
    // An fd too large for a C int is not registered: False, as asyncio answers.
    let Some(fd) = py::fileobj_to_fd_lookup(fd)? else {
        return Ok(false);
    };
    let old = slf.borrow_mut().reactor.unset(fd, write);
    match old {
        Some(h) => {
            h.bind(slf.py()).call_method0(intern!(slf.py(), "cancel"))?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// A `sock_*` wait's one-shot reader (writer) that was called but must wait for another
/// event (see `set_io`).
pub(crate) fn rearm_waiter(slf: &Bound<'_, EventLoop>, fd: i32, write: bool) {
    slf.borrow_mut().reactor.rearm(fd, write);
}

/// `loop.call_soon(callback, *args, context=None)`: run `callback(*args)` in the next turn
/// (FIFO). Exposed through a hand-written fast-call entry point (`fastcall.rs`).
pub fn call_soon<'py>(
    slf: &Bound<'py, EventLoop>,
    callback: Bound<'py, PyAny>,
    args: Bound<'py, PyTuple>,
    context: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, Handle>> {
    let pre = precheck(slf, &callback, "call_soon", true)?;
    let h = new_handle(slf, callback, args, context, None, pre)?;
    slf.borrow_mut()
        .ready
        .push_back(Job::Handle(h.clone().unbind()));
    Ok(h)
}

/// `loop.call_soon_threadsafe(...)`: `call_soon` from any thread; wakes a sleeping loop.
pub fn call_soon_threadsafe<'py>(
    slf: &Bound<'py, EventLoop>,
    callback: Bound<'py, PyAny>,
    args: Bound<'py, PyTuple>,
    context: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, Handle>> {
    let pre = precheck(slf, &callback, "call_soon_threadsafe", false)?;
    let h = new_handle(slf, callback, args, context, None, pre)?;
    let mut s = slf.borrow_mut();
    s.ready.push_back(Job::Handle(h.clone().unbind()));
    if s.sleeping {
        // One write is enough: the eventfd stays readable until the loop drains it.
        s.sleeping = false;
        Reactor::<Py<Handle>>::wake(s.reactor.waker_fd());
    }
    Ok(h)
}

/// `loop.call_later(delay, callback, *args, context=None)`: run `callback(*args)` after
/// `delay` seconds. Exposed through `fastcall.rs`.
pub fn call_later<'py>(
    slf: &Bound<'py, EventLoop>,
    delay: Bound<'py, PyAny>,
    callback: Bound<'py, PyAny>,
    args: Bound<'py, PyTuple>,
    context: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, Handle>> {
    if delay.is_none() {
        return Err(PyTypeError::new_err("delay must not be None"));
    }
    // asyncio's `self.time() + delay`: anything but a float or an int through Python's `+`
    // (a Fraction works, a Decimal or an object with only __float__ is a TypeError there).
    let now = clock(slf)?;
    let when = if delay.is_exact_instance_of::<PyFloat>() || delay.is_exact_instance_of::<PyInt>() {
        now + delay.extract::<f64>()?
    } else {
        PyFloat::new(slf.py(), now).add(&delay)?.extract::<f64>()?
    };
    // asyncio's call_later goes through call_at: its errors name call_at.
    schedule_at(slf, when, callback, args, context, "call_at")
}

/// `loop.time()` as a built-in method (METH_NOARGS): what `LoopTime` binds to a loop.
unsafe extern "C" fn native_time(
    _slf: *mut ffi::PyObject,
    _noargs: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: PyFloat_FromDouble returns a new reference or NULL with an error set.
    unsafe { ffi::PyFloat_FromDouble(monotonic()) }
}

/// The definition behind every bound `loop.time` (`PyCFunction_NewEx` keeps a pointer).
struct MethodDef(ffi::PyMethodDef);
// SAFETY: the definition is immutable and its pointers are to static data.
unsafe impl Sync for MethodDef {}

static NATIVE_TIME_DEF: MethodDef = MethodDef(ffi::PyMethodDef {
    ml_name: c"time".as_ptr(),
    ml_meth: ffi::PyMethodDefPointer {
        PyCFunction: native_time,
    },
    ml_flags: ffi::METH_NOARGS,
    ml_doc: c"The loop's clock: time.monotonic(), unless loop.time was replaced.".as_ptr(),
});

/// `Loop.time`, the loop's clock: called, `time.monotonic()`. A data descriptor rather than
/// a method so that `loop.time = clock` (a virtual clock, `mock.patch.object(loop, "time")`)
/// reaches the native core, which then schedules and runs timers by `self.time()` as
/// asyncio does (see `clock`); `del loop.time` restores the native clock. On the class it
/// is itself (callable as `Loop.time(loop)`); on a loop, a bound method of it, or the
/// clock assigned.
#[pyclass(frozen, module = "ferroloop._ferroloop")]
pub struct LoopTime;

#[pymethods]
impl LoopTime {
    #[pyo3(signature = (_loop, /))]
    fn __call__(&self, _loop: &Bound<'_, PyAny>) -> f64 {
        monotonic()
    }

    fn __get__(
        slf: &Bound<'_, Self>,
        obj: Option<&Bound<'_, PyAny>>,
        _owner: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let Some(obj) = obj.filter(|o| !o.is_none()) else {
            return Ok(slf.clone().into_any().unbind());
        };
        if let Ok(lp) = obj.cast::<EventLoop>() {
            if let Some(f) = &lp.borrow().time_override {
                return Ok(f.clone_ref(py));
            }
        }
        // A built-in method bound to the loop, as a native method's would be. SAFETY: the
        // definition is static and `obj` live; a new reference or NULL with an error set.
        let def = &NATIVE_TIME_DEF.0 as *const ffi::PyMethodDef as *mut ffi::PyMethodDef;
        unsafe {
            Bound::from_owned_ptr_or_err(
                py,
                ffi::PyCFunction_NewEx(def, obj.as_ptr(), std::ptr::null_mut()),
            )
            .map(Bound::unbind)
        }
    }

    fn __set__(&self, obj: &Bound<'_, EventLoop>, value: Py<PyAny>) {
        let old = obj.borrow_mut().time_override.replace(value);
        drop(old); // after the borrow: its last reference may run Python code
    }

    fn __delete__(&self, obj: &Bound<'_, EventLoop>) -> PyResult<()> {
        let old = obj.borrow_mut().time_override.take();
        if old.is_none() {
            let name = obj.get_type().name()?;
            return Err(pyo3::exceptions::PyAttributeError::new_err(format!(
                "'{name}' object has no attribute 'time'"
            )));
        }
        drop(old);
        Ok(())
    }
}

/// `loop.call_at(when, callback, *args, context=None)`: run `callback(*args)` at `when` on
/// `loop.time()`'s clock. Exposed through `fastcall.rs`.
pub fn call_at<'py>(
    slf: &Bound<'py, EventLoop>,
    when: Bound<'py, PyAny>,
    callback: Bound<'py, PyAny>,
    args: Bound<'py, PyTuple>,
    context: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, Handle>> {
    if when.is_none() {
        return Err(PyTypeError::new_err("when cannot be None"));
    }
    let when: f64 = when.extract()?;
    schedule_at(slf, when, callback, args, context, "call_at")
}

/// `self.time()`, the replaced clock.
fn call_time(slf: &Bound<'_, EventLoop>) -> PyResult<f64> {
    slf.call_method0(intern!(slf.py(), "time"))?.extract()
}

/// The loop's clock: `time.monotonic()`, unless the program replaced `loop.time`; then
/// `self.time()`, as asyncio reads it everywhere.
pub fn clock(slf: &Bound<'_, EventLoop>) -> PyResult<f64> {
    if slf.borrow().python_clock() {
        call_time(slf)
    } else {
        Ok(monotonic())
    }
}

/// `self.time()` when the program replaced the clock and timers are scheduled (the turn
/// reads the clock only then); None means: read `time.monotonic()` inline.
fn python_clock_now(slf: &Bound<'_, EventLoop>) -> PyResult<Option<f64>> {
    let wanted = {
        let s = slf.borrow();
        s.python_clock() && !s.timers.is_empty()
    };
    wanted.then(|| call_time(slf)).transpose()
}

/// One loop turn (asyncio's `_run_once`): poll, collect ready I/O and due timers, then run
/// exactly the handles that were ready at that point.
fn run_once(slf: &Bound<'_, EventLoop>) -> PyResult<()> {
    let py = slf.py();
    let now = python_clock_now(slf)?;
    let (timeout_ms, removed) = {
        let mut s = slf.borrow_mut();
        let removed = (!s.timers.is_empty()).then(|| s.purge_cancelled_timers(py));
        let timeout_ms: i32 = if !s.ready.is_empty() || s.stopping {
            0
        } else if let Some((when, _)) = s.timers.peek() {
            let t = (when - now.unwrap_or_else(monotonic)).clamp(0.0, MAXIMUM_SELECT_TIMEOUT);
            // selectors round up to the millisecond, so timers never fire early.
            (t * 1e3).ceil() as i32
        } else {
            -1
        };
        (timeout_ms, removed)
    };
    drop(removed);
    // Nothing to poll for when no fd is watched and we would not sleep: threadsafe
    // callbacks land in the ready queue directly, and the waker only matters to a sleeping
    // poll. Skipping the syscall keeps busy turns cheap.
    if timeout_ms != 0 || slf.borrow().reactor.has_registrations() {
        poll(slf, timeout_ms)?;
    }
    let now = python_clock_now(slf)?;
    let (ntodo, debug) = {
        let mut s = slf.borrow_mut();
        let s = &mut *s;
        if !s.timers.is_empty() {
            let end_time = now.unwrap_or_else(monotonic) + s.clock_resolution;
            while let Some((when, _)) = s.timers.peek() {
                if when >= end_time {
                    break;
                }
                if let Some((_, h)) = s.timers.pop() {
                    h.borrow_mut(py).scheduled = false;
                    s.ready.push_back(Job::Handle(h));
                }
            }
        }
        (s.ready.len(), s.debug)
    };
    for _ in 0..ntodo {
        let next = slf.borrow_mut().ready.pop_front();
        let Some(job) = next else { break };
        let outcome = match job {
            Job::Handle(h) => {
                let h = h.into_bound(py);
                if debug {
                    run_debug(slf, &h)?
                } else {
                    run_handle(py, &h, Some(slf.as_any()), false)?
                }
            }
            Job::Step(t) => task::run_job(py, slf, t, None)?,
            Job::Wakeup(t, fut) => task::run_job(py, slf, t, Some(fut))?,
        };
        if let RunOutcome::Fatal(e) = outcome {
            return Err(e);
        }
    }
    Ok(())
}

/// Wait for I/O (without the GIL unless the timeout is 0) and queue the ready readers and
/// writers (asyncio's `_process_events`).
fn poll(slf: &Bound<'_, EventLoop>, timeout_ms: i32) -> PyResult<()> {
    let py = slf.py();
    let peek;
    let (epfd, waker, mut buf, mut events) = {
        let mut s = slf.borrow_mut();
        if s.reactor.is_closed() {
            return Err(loop_closed());
        }
        s.reactor.rearm_fired();
        peek = timeout_ms == 0 || s.reactor.peek_first();
        s.sleeping = timeout_ms != 0;
        let buf = s.buf.take().unwrap_or_default();
        let events = std::mem::take(&mut s.events);
        (s.reactor.epfd(), s.reactor.waker_fd(), buf, events)
    };
    events.clear();
    // A loop about to sleep often finds events ready at once (a busy loop): looking with
    // the GIL held first (`peek`) saves releasing and retaking it. The reactor stops
    // peeking for a while when a peek finds nothing (an idle loop would pay a syscall).
    let mut polled = if peek {
        Reactor::<Py<Handle>>::poll(epfd, waker, &mut buf, 0, &mut events)
    } else {
        Ok(0)
    };
    let peeked = timeout_ms != 0 && peek;
    let peek_found = !matches!(polled, Ok(0));
    if timeout_ms != 0 && !peek_found {
        // Sleep without the GIL so other threads run (and may wake us).
        polled = py
            .detach(|| Reactor::<Py<Handle>>::poll(epfd, waker, &mut buf, timeout_ms, &mut events));
    }
    let stale = {
        let mut s = slf.borrow_mut();
        let s = &mut *s;
        s.sleeping = false;
        if peeked {
            s.reactor.peeked(peek_found);
        }
        s.buf = Some(buf);
        let mut stale = Vec::new();
        for ev in events.drain(..) {
            let mut cancelled_reader = false;
            let mut cancelled_writer = false;
            let (reader, writer) = s.reactor.fire(ev);
            if let Some(r) = reader {
                if r.borrow(py).cancelled {
                    cancelled_reader = true;
                } else {
                    s.ready.push_back(Job::Handle(r.clone_ref(py)));
                }
            }
            if let Some(w) = writer {
                if w.borrow(py).cancelled {
                    cancelled_writer = true;
                } else {
                    s.ready.push_back(Job::Handle(w.clone_ref(py)));
                }
            }
            if cancelled_reader {
                stale.extend(s.reactor.unset(ev.fd, false));
            }
            if cancelled_writer {
                stale.extend(s.reactor.unset(ev.fd, true));
            }
        }
        s.events = events;
        stale
    };
    drop(stale);
    match polled {
        Ok(_) => Ok(()),
        // A signal arrived: run Python's handlers (KeyboardInterrupt surfaces here).
        Err(e) if e.raw_os_error() == Some(libc::EINTR) => py.check_signals(),
        Err(e) => Err(os_error(e)),
    }
}

/// Run a handle in debug mode: track `_current_handle` and warn about slow callbacks.
fn run_debug(slf: &Bound<'_, EventLoop>, h: &Bound<'_, Handle>) -> PyResult<RunOutcome> {
    let py = slf.py();
    slf.setattr(intern!(py, "_current_handle"), h)?;
    let t0 = clock(slf)?;
    let outcome = run_handle(py, h, Some(slf.as_any()), true);
    let dt = clock(slf)? - t0;
    slf.setattr(intern!(py, "_current_handle"), py.None())?;
    let outcome = outcome?;
    if matches!(outcome, RunOutcome::Done) && dt >= slf.borrow().slow_callback_duration {
        slf.call_method1(intern!(py, "_log_slow_callback"), (h, dt))?;
    }
    let released = h.borrow_mut().release();
    drop(released);
    Ok(outcome)
}

/// Report, for the cycle collector, what a queued handle refers to, as if the loop held it
/// directly: handles are not tracked by the collector (see handles.rs), so without this a
/// loop dropped unclosed with callbacks queued (a pending task's wake-up, a transport's
/// reader) would be kept alive by a cycle through them forever. Only a handle the loop
/// holds the sole reference to is walked: one also held elsewhere (a `TimerHandle` the
/// program kept, a reader handle queued as well as registered) stays reachable from there,
/// and counting its references as the loop's would let the collector free live objects.
fn traverse_handle(
    py: Python<'_>,
    handle: &Py<Handle>,
    visit: &PyVisit<'_>,
) -> Result<(), PyTraverseError> {
    // SAFETY: a plain read of the reference count of a live object.
    if unsafe { ffi::Py_REFCNT(handle.as_ptr()) } != 1 {
        return Ok(());
    }
    // A handle borrowed mutably right now (the collector ran inside a handle method) is
    // skipped: reporting fewer references only keeps objects alive.
    let Ok(h) = handle.bind(py).try_borrow() else {
        return Ok(());
    };
    if let Some(c) = &h.callback {
        visit.call(c)?;
    }
    if let Some(a) = &h.args {
        visit.call(a)?;
    }
    if let Some(c) = &h.context {
        crate::handles::traverse_context(py, c, visit)?;
    }
    Ok(())
}

#[pymethods]
impl EventLoop {
    /// What the native queues hold, for the cycle collector (see `traverse_handle`).
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        // A running loop is referenced from the frame that runs it, so it is in no garbage
        // cycle: reporting nothing (which only keeps objects alive) spares every young
        // collection during a busy run a walk of all pending handles.
        if self.thread_id.is_some() {
            return Ok(());
        }
        // SAFETY: the collector calls tp_traverse with the GIL held; nothing here calls
        // into Python (borrow flags and reference counts are plain reads).
        let py = unsafe { Python::assume_attached() };
        for job in &self.ready {
            match job {
                Job::Handle(h) => traverse_handle(py, h, &visit)?,
                Job::Step(t) => visit.call(t)?,
                Job::Wakeup(t, f) => {
                    visit.call(t)?;
                    visit.call(f)?;
                }
            }
        }
        for h in self.timers.iter() {
            traverse_handle(py, h, &visit)?;
        }
        for reg in self.reactor.registrations() {
            for h in reg.reader.iter().chain(reg.writer.iter()) {
                traverse_handle(py, h, &visit)?;
            }
        }
        if let Some(f) = &self.time_override {
            visit.call(f)?;
        }
        Ok(())
    }

    /// Break the cycles `__traverse__` reported: drop the queued jobs, the timers and the
    /// registrations (the collector frees an unreachable loop; its fds close on drop).
    fn __clear__(&mut self) {
        self.time_override = None;
        self.ready.clear();
        self.timers.drain().for_each(drop);
        self.timer_cancelled_count = 0;
        self.reactor.forget();
    }

    #[new]
    #[pyo3(signature = (*_args, **_kwargs))]
    fn new(_args: &Bound<'_, PyTuple>, _kwargs: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        Ok(EventLoop {
            ready: VecDeque::new(),
            timers: TimerHeap::new(),
            timer_cancelled_count: 0,
            stopping: false,
            closed: false,
            thread_id: None,
            debug: false,
            native_tasks: false,
            slow_callback_duration: 0.1,
            clock_resolution: monotonic_resolution(),
            time_override: None,
            class_clock: false,
            reactor: Reactor::new().map_err(os_error)?,
            sleeping: false,
            events: Vec::new(),
            buf: None,
            weak_self: None,
        })
    }

    /// `loop.time`: see `LoopTime`.
    #[classattr]
    fn time() -> LoopTime {
        LoopTime
    }

    /// A Python subclass with its own `time()`: the loop schedules by it (`Loop.__init__`).
    fn _use_class_clock(&mut self) {
        self.class_clock = true;
    }

    /// `loop.create_future()`: asyncio's own Future, bound to this loop (asyncio's method,
    /// without its Python frame).
    fn create_future<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let cls = py::future_class(py)?;
        if let Some(kwargs) = c_future_kwargs(py, &cls)? {
            // asyncio's C Future (not a patched class): called with a reused keyword dict
            // rather than one built per call. Its __init__ only parses the dict, and takes
            // its own reference to the loop before it can run any Python code, so a nested
            // create_future (from a get_debug override) may reuse the dict meanwhile.
            let key = intern!(py, "loop");
            kwargs.set_item(key, slf)?;
            let fut = cls.call((), Some(kwargs));
            // The dict must not keep the loop alive.
            kwargs.set_item(key, py.None())?;
            return fut;
        }
        py::call_kw(&cls, &[], py::kw_loop(py)?, slf.as_any())
    }

    /// `loop.create_task(coro, *, name=None, context=None)`: asyncio's own Task. The plain
    /// case (no task factory, no debug mode) is made here, saving a Python frame per task;
    /// everything else is asyncio's `BaseEventLoop.create_task`.
    #[pyo3(signature = (coro, *, name=None, context=None))]
    fn create_task<'py>(
        slf: &Bound<'py, Self>,
        coro: Bound<'py, PyAny>,
        name: Option<Bound<'py, PyAny>>,
        context: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let (debug, native_tasks) = {
            let s = slf.borrow();
            s.check_closed()?;
            (s.debug, s.native_tasks)
        };
        let factory = slf.getattr(intern!(py, "_task_factory"))?;
        if (native_tasks && factory.is_none()) || (!debug && task::is_native_factory(&factory)) {
            // ferroloop's Task, made here without calling out.
            return Ok(task::new_task(py, coro, slf.clone().into_any(), name, context)?.into_any());
        }
        let kwargs = pyo3::types::PyDict::new(py);
        kwargs.set_item(intern!(py, "name"), &name)?;
        // Only when given: Python 3.10's Task and create_task have no `context`.
        if let Some(context) = &context {
            kwargs.set_item(intern!(py, "context"), context)?;
        }
        if debug || !factory.is_none() {
            return py::base_create_task(py)?.call((slf, coro), Some(&kwargs));
        }
        kwargs.set_item(intern!(py, "loop"), slf)?;
        py::task_class(py)?.call((coro,), Some(&kwargs))
    }

    fn _timer_handle_cancelled(&mut self, handle: &Bound<'_, Handle>) {
        if handle.borrow().scheduled {
            self.timer_cancelled_count += 1;
        }
    }

    /// Append an existing handle to the ready queue (asyncio's `_add_callback`).
    fn _add_callback(&mut self, handle: Bound<'_, Handle>) {
        if !handle.borrow().cancelled {
            self.ready.push_back(Job::Handle(handle.unbind()));
        }
    }

    /// Wake the loop from any thread (asyncio's `_write_to_self`).
    fn _write_to_self(&self) {
        if !self.reactor.is_closed() {
            Reactor::<Py<Handle>>::wake(self.reactor.waker_fd());
        }
    }

    /// One loop turn.
    fn _run_once(slf: &Bound<'_, Self>) -> PyResult<()> {
        run_once(slf)
    }

    /// Run turns until `stop()` is called (the body of `run_forever`).
    fn _run_forever_native(slf: &Bound<'_, Self>) -> PyResult<()> {
        loop {
            run_once(slf)?;
            if slf.borrow().stopping {
                return Ok(());
            }
        }
    }

    /// Stop after the current turn.
    fn stop(&mut self) {
        self.stopping = true;
    }

    fn is_running(&self) -> bool {
        self.thread_id.is_some()
    }

    fn is_closed(&self) -> bool {
        self.closed
    }

    fn get_debug(&self) -> bool {
        self.debug
    }

    /// Drop pending callbacks, timers and I/O registrations; close the poller.
    fn _close_native(slf: &Bound<'_, Self>) {
        let dropped = {
            let mut s = slf.borrow_mut();
            s.closed = true;
            s.timer_cancelled_count = 0;
            let ready: Vec<_> = s.ready.drain(..).collect();
            let timers: Vec<_> = s.timers.drain().collect();
            let regs = s.reactor.close();
            (ready, timers, regs)
        };
        drop(dropped);
    }

    /// Call `callback(*args)` whenever `fd` is readable (level-triggered); returns the
    /// handle. asyncio's public `add_reader` (with its transport check) calls this.
    #[pyo3(signature = (fd, callback, *args))]
    fn _add_reader<'py>(
        slf: &Bound<'py, Self>,
        fd: &Bound<'py, PyAny>,
        callback: Bound<'py, PyAny>,
        args: Bound<'py, PyTuple>,
    ) -> PyResult<Bound<'py, Handle>> {
        set_io(slf, fd, callback, args, false)
    }

    /// Stop watching `fd` for reading; True if a reader was registered.
    fn _remove_reader(slf: &Bound<'_, Self>, fd: &Bound<'_, PyAny>) -> PyResult<bool> {
        unset_io(slf, fd, false)
    }

    /// Call `callback(*args)` whenever `fd` is writable (level-triggered).
    #[pyo3(signature = (fd, callback, *args))]
    fn _add_writer<'py>(
        slf: &Bound<'py, Self>,
        fd: &Bound<'py, PyAny>,
        callback: Bound<'py, PyAny>,
        args: Bound<'py, PyTuple>,
    ) -> PyResult<Bound<'py, Handle>> {
        set_io(slf, fd, callback, args, true)
    }

    /// Stop watching `fd` for writing; True if a writer was registered.
    fn _remove_writer(slf: &Bound<'_, Self>, fd: &Bound<'_, PyAny>) -> PyResult<bool> {
        unset_io(slf, fd, true)
    }

    #[getter]
    fn _stopping(&self) -> bool {
        self.stopping
    }

    #[setter(_stopping)]
    fn set_stopping(&mut self, value: bool) {
        self.stopping = value;
    }

    #[getter]
    fn _closed(&self) -> bool {
        self.closed
    }

    #[setter(_closed)]
    fn set_closed(&mut self, value: bool) {
        self.closed = value;
    }

    #[getter]
    fn _thread_id(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.thread_id.as_ref().map(|t| t.clone_ref(py))
    }

    #[setter(_thread_id)]
    fn set_thread_id(&mut self, value: Option<Py<PyAny>>) {
        self.thread_id = value;
    }

    #[getter]
    fn _debug(&self) -> bool {
        self.debug
    }

    #[setter(_debug)]
    fn set_debug(&mut self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.debug = value.is_truthy()?;
        Ok(())
    }

    /// Whether `create_task` without a task factory makes ferroloop Tasks (True) or
    /// asyncio's (False). A task factory set with `set_task_factory` always wins.
    #[getter]
    fn native_tasks(&self) -> bool {
        self.native_tasks
    }

    #[setter]
    fn set_native_tasks(&mut self, value: bool) {
        self.native_tasks = value;
    }

    #[getter]
    fn slow_callback_duration(&self) -> f64 {
        self.slow_callback_duration
    }

    #[setter]
    fn set_slow_callback_duration(&mut self, value: f64) {
        self.slow_callback_duration = value;
    }

    #[getter]
    fn _clock_resolution(&self) -> f64 {
        self.clock_resolution
    }

    #[setter(_clock_resolution)]
    fn set_clock_resolution(&mut self, value: f64) {
        self.clock_resolution = value;
    }

    #[getter]
    fn _timer_cancelled_count(&self) -> usize {
        self.timer_cancelled_count
    }

    #[setter(_timer_cancelled_count)]
    fn set_timer_cancelled_count(&mut self, value: usize) {
        self.timer_cancelled_count = value;
    }

    /// The scheduled timers, earliest first (asyncio exposes its heap as `_scheduled`).
    #[getter]
    fn _scheduled(&self, py: Python<'_>) -> Vec<Py<Handle>> {
        self.timers.iter().map(|h| h.clone_ref(py)).collect()
    }

    /// The handles ready to run in the next turn (asyncio's `_ready` deque, as a copy; a
    /// queued task step or wake-up shows as its task).
    #[getter]
    fn _ready(&self, py: Python<'_>) -> Vec<Py<PyAny>> {
        self.ready
            .iter()
            .map(|j| match j {
                Job::Handle(h) => h.clone_ref(py).into_any(),
                Job::Step(t) | Job::Wakeup(t, _) => t.clone_ref(py).into_any(),
            })
            .collect()
    }

    /// `BaseEventLoop.__init__` assigns empty `_ready`/`_scheduled` containers: the native
    /// queues are the real ones, so only an empty value is accepted (and ignored).
    #[setter(_ready)]
    fn set_ready(&mut self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        accept_empty(value, "_ready")
    }

    #[setter(_scheduled)]
    fn set_scheduled(&mut self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        accept_empty(value, "_scheduled")
    }

    /// What is registered for `fd`: (selectors event mask, reader, writer); KeyError if
    /// nothing is (asyncio's `selector.get_key`, for transport reprs).
    fn _io_key(&self, py: Python<'_>, fd: i32) -> PyResult<IoKey> {
        let Some(reg) = self.reactor.get(fd) else {
            return Err(pyo3::exceptions::PyKeyError::new_err(fd));
        };
        let mask = u8::from(reg.reader.is_some()) | (u8::from(reg.writer.is_some()) << 1);
        Ok((
            mask,
            reg.reader.as_ref().map(|h| h.clone_ref(py)),
            reg.writer.as_ref().map(|h| h.clone_ref(py)),
        ))
    }
}
