//! `Handle` and `TimerHandle` (asyncio's `events.Handle`/`events.TimerHandle`).

use pyo3::exceptions::PyKeyboardInterrupt;
use pyo3::exceptions::PySystemExit;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::pyclass::CompareOp;
use pyo3::types::{PyTuple, PyWeakrefReference};
use pyo3::{PyTraverseError, PyVisit};

use crate::event_loop::EventLoop;
use crate::py;

/// A callback scheduled on the loop. The timer flag (`scheduled`) lives here too, so the
/// loop can keep one queue type; `TimerHandle` adds the deadline and the timer methods.
/// Debug-mode fields sit behind one pointer: a handle is 96 bytes with its GC header
/// (was 112), which a thread posting 100,000 callbacks touches fresh memory for.
///
/// Handles are not tracked by Python's cycle collector: every `call_soon` allocates one,
/// and tracking them made the collector a third of a busy loop's time. They can take part
/// in no cycle: the loop is held through a weak reference, and the callback, arguments and
/// context are dropped once a one-shot handle has run or is cancelled (until then the
/// loop holds the handle, so it is alive anyway). A free list recycles handle objects:
/// allocation was the next largest cost of a busy loop (see `alloc`, which also keeps
/// handles out of the collector's allocation count).
#[pyclass(subclass, weakref, module = "ferroloop._ferroloop")]
pub struct Handle {
    pub callback: Option<Py<PyAny>>,
    pub args: Option<Py<PyTuple>>,
    pub context: Option<Py<PyAny>>,
    pub loop_: Option<Py<PyWeakrefReference>>,
    /// Reader/writer handles run again and again; every other handle runs once.
    pub repeat: bool,
    pub cancelled: bool,
    pub is_timer: bool,
    pub scheduled: bool,
    /// Debug mode's creation traceback and a cancelled handle's kept repr (None until set).
    debug: Option<Box<DebugInfo>>,
}

#[derive(Default)]
struct DebugInfo {
    source_traceback: Option<Py<PyAny>>,
    repr: Option<Py<PyAny>>,
}

/// A handle that runs at a deadline (`loop.call_at`/`call_later`).
#[pyclass(extends = Handle, frozen, module = "ferroloop._ferroloop")]
pub struct TimerHandle {
    when: f64,
}

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
        let debug = if debug {
            Some(Box::new(DebugInfo {
                source_traceback: Some(py::extract_stack(py)?),
                repr: None,
            }))
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
            is_timer: false,
            scheduled: false,
            debug,
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
                let init = PyClassInitializer::from(h).add_subclass(TimerHandle { when: w });
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

/// Report a handle's context to the cycle collector (for the loop's `__traverse__`): the
/// context itself, or, for a copy kept off the collector's lists that the handle alone
/// holds, what the context refers to, as the handle's own references (the collector
/// cannot see past an untracked object, and a context variable may lead back to the
/// loop). Reads the fields of CPython's `PyContext` (`ctx_prev`, `ctx_vars`: the two
/// object pointers after the object header, the same in every CPython since 3.7), as its
/// own `tp_traverse` does; no public API gives them without calling Python code.
pub fn traverse_context(
    py: Python<'_>,
    context: &Py<PyAny>,
    visit: &PyVisit<'_>,
) -> Result<(), PyTraverseError> {
    let p = context.as_ptr();
    // SAFETY: called from tp_traverse with the GIL held; `p` is a live object; only an
    // exact Context is read as one, and the borrowed pointers are never released.
    unsafe {
        if ffi::PyContext_CheckExact(p) == 0 || ffi::PyObject_GC_IsTracked(p) != 0 {
            return visit.call(context);
        }
        if ffi::Py_REFCNT(p) != 1 {
            // Held elsewhere too (entered on a thread right now): that holder keeps it.
            return Ok(());
        }
        let fields = p
            .cast::<u8>()
            .add(std::mem::size_of::<ffi::PyObject>())
            .cast::<*mut ffi::PyObject>();
        for i in 0..2 {
            let field = *fields.add(i);
            if !field.is_null() {
                let borrowed =
                    std::mem::ManuallyDrop::new(Bound::from_owned_ptr(py, field).unbind());
                visit.call(&*borrowed)?;
            }
        }
    }
    Ok(())
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Some(c) = &self.context {
            track_context(c);
        }
    }
}

/// Handle objects' memory: CPython's allocation without the collector's bookkeeping.
///
/// PyO3 makes every class a GC type, and CPython counts each GC object it allocates
/// towards the next young collection (the count drops again when the object is freed).
/// Handles are never tracked (see `Handle`), yet a program with many callbacks pending
/// (a gather of 50,000 tasks queues 50,000 steps at once; 100,000 timers) paid one young
/// collection per 700 of them, and the older collections those promote: a gather of
/// 50,000 tasks ran 5 full collections where the same program with asyncio's handles not
/// counted runs 4. So `Handle` and `TimerHandle` get their own `tp_alloc`/`tp_free`: the
/// same memory layout as `PyType_GenericAlloc` (a zeroed, untracked GC header before the
/// object), without the count; and a free list of blocks, as PyO3's `freelist` gave
/// them, without its lock (these run with the GIL held). Python subclasses of `Handle`
/// get CPython's own allocator as usual (a type made by `class` sets its own slots).
/// Only where that layout is known: GIL builds of CPython up to 3.13 (`install` checks).
mod alloc {
    use std::cell::UnsafeCell;
    use std::ffi::c_void;

    use pyo3::ffi;
    use pyo3::prelude::*;
    use pyo3::PyTypeInfo;

    /// The GC header CPython puts before a GC object: two words.
    const GC_HEADER: usize = 2 * std::mem::size_of::<usize>();
    /// Free blocks kept per class (what PyO3's `freelist = 4096` kept).
    const FREE_LIST_CAPACITY: usize = 4096;

    struct FreeList(UnsafeCell<Vec<*mut c_void>>);
    // SAFETY: only touched by tp_alloc/tp_free, which CPython calls with the GIL held (on
    // the GIL builds this module is compiled for), so never from two threads at once.
    unsafe impl Sync for FreeList {}

    static HANDLE_BLOCKS: FreeList = FreeList(UnsafeCell::new(Vec::new()));
    static TIMER_BLOCKS: FreeList = FreeList(UnsafeCell::new(Vec::new()));

    /// The free list of `ty` (one of the two installed types), or None for another type.
    unsafe fn blocks(ty: *mut ffi::PyTypeObject) -> Option<&'static FreeList> {
        let py = Python::assume_attached();
        if std::ptr::eq(ty, super::Handle::type_object_raw(py)) {
            Some(&HANDLE_BLOCKS)
        } else if std::ptr::eq(ty, super::TimerHandle::type_object_raw(py)) {
            Some(&TIMER_BLOCKS)
        } else {
            None
        }
    }

    unsafe extern "C" fn tp_alloc(
        ty: *mut ffi::PyTypeObject,
        nitems: ffi::Py_ssize_t,
    ) -> *mut ffi::PyObject {
        let Some(list) = blocks(ty).filter(|_| nitems == 0) else {
            // A Python subclass that inherited this slot: CPython's allocator.
            return ffi::PyType_GenericAlloc(ty, nitems);
        };
        let size = GC_HEADER + (*ty).tp_basicsize as usize;
        let mem = match (*list.0.get()).pop() {
            Some(block) => block,
            None => {
                let block = ffi::PyObject_Malloc(size);
                if block.is_null() {
                    return ffi::PyErr_NoMemory();
                }
                block
            }
        };
        // Zeroed as PyType_GenericAlloc leaves it: an untracked GC header, null fields.
        std::ptr::write_bytes(mem.cast::<u8>(), 0, size);
        let obj = mem.cast::<u8>().add(GC_HEADER).cast::<ffi::PyObject>();
        // Sets the type (and takes a reference to it) and the reference count.
        ffi::PyObject_Init(obj, ty)
    }

    unsafe extern "C" fn tp_free(obj: *mut c_void) {
        let Some(list) = blocks(ffi::Py_TYPE(obj.cast())) else {
            // A Python subclass that inherited this slot: its objects came from CPython's
            // allocator (which knows their pre-header).
            ffi::PyObject_GC_Del(obj);
            return;
        };
        let mem = obj.cast::<u8>().sub(GC_HEADER).cast::<c_void>();
        let list = &mut *list.0.get();
        if list.len() < FREE_LIST_CAPACITY {
            if list.capacity() == 0 {
                list.reserve_exact(FREE_LIST_CAPACITY);
            }
            list.push(mem);
        } else {
            ffi::PyObject_Free(mem);
        }
    }

    /// Put the allocator on `T`'s type object, before any instance exists.
    fn install_on<T: PyTypeInfo>(py: Python<'_>) {
        let ty = T::type_object_raw(py);
        // SAFETY: a live heap type we made, with the GIL held; no instance exists yet, so
        // every instance is allocated and freed by the same pair.
        unsafe {
            let flags = (*ty).tp_flags;
            // Py_TPFLAGS_MANAGED_DICT (3.11+) and Py_TPFLAGS_MANAGED_WEAKREF (3.12+, 1 << 3)
            // add words before the GC header.
            let preheader = ffi::Py_TPFLAGS_MANAGED_DICT | (1 << 3);
            // Only the layout computed above: a GC type, fixed size, no managed pre-header.
            if flags & ffi::Py_TPFLAGS_HAVE_GC == 0 || flags & preheader != 0 {
                return;
            }
            if (*ty).tp_itemsize != 0 {
                return;
            }
            (*ty).tp_alloc = Some(tp_alloc);
            (*ty).tp_free = Some(tp_free);
        }
    }

    pub fn install(py: Python<'_>) {
        install_on::<super::Handle>(py);
        install_on::<super::TimerHandle>(py);
    }
}

/// Install the handles' allocator (see `alloc`) where CPython's layout is the one it
/// writes: a GIL build of CPython before 3.14 (elsewhere PyO3's default allocation stays).
pub fn install(py: Python<'_>) -> PyResult<()> {
    let sys = py.import("sys")?;
    let cpython = sys
        .getattr("implementation")?
        .getattr("name")?
        .extract::<String>()?
        == "cpython";
    let free_threaded = sys
        .getattr("abiflags")
        .map(|f| f.to_string().contains('t'))
        .unwrap_or(false);
    if cpython && !free_threaded && py.version_info() < (3, 14) {
        alloc::install(py);
    }
    Ok(())
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
    // into_value attaches the traceback to the exception object. Reported while it is the
    // exception being handled, as asyncio's Handle._run reports from its `except` block.
    let exc = e.into_value(py).into_bound(py).into_any();
    crate::py::while_handling(&exc, || {
        l.call_method1(pyo3::intern!(py, "_report_callback_error"), (h, &exc))
    })?;
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
            slf.borrow_mut()
                .debug
                .get_or_insert_with(Default::default)
                .repr = Some(repr);
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
        let d = self.debug.as_ref()?;
        d.source_traceback.as_ref().map(|c| c.clone_ref(py))
    }

    #[setter(_source_traceback)]
    fn set_source_traceback(&mut self, value: Option<Py<PyAny>>) {
        if value.is_none() && self.debug.is_none() {
            return;
        }
        self.debug
            .get_or_insert_with(Default::default)
            .source_traceback = value;
    }

    #[getter]
    fn _repr(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        let d = self.debug.as_ref()?;
        d.repr.as_ref().map(|c| c.clone_ref(py))
    }

    #[getter]
    fn _is_timer(&self) -> bool {
        self.is_timer
    }
}

#[pymethods]
impl TimerHandle {
    /// The absolute time (on `loop.time()`'s clock) the callback is scheduled for.
    fn when(&self) -> f64 {
        self.when
    }

    #[getter]
    fn _when(&self) -> f64 {
        self.when
    }

    #[getter]
    fn _scheduled(slf: PyRef<'_, Self>) -> bool {
        slf.as_super().scheduled
    }

    fn __hash__(&self) -> u64 {
        self.when.to_bits()
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
        let (aw, bw) = (slf.get().when, other.get().when);
        let a = slf.as_super().borrow();
        let b = other.as_super().borrow();
        let result = match op {
            CompareOp::Lt => aw < bw,
            CompareOp::Le => aw < bw || aw == bw && equal(py, &a, &b)?,
            CompareOp::Gt => aw > bw,
            CompareOp::Ge => aw > bw || aw == bw && equal(py, &a, &b)?,
            CompareOp::Eq => aw == bw && equal(py, &a, &b)?,
            CompareOp::Ne => !(aw == bw && equal(py, &a, &b)?),
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
