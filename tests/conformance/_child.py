"""One conformance child: run one CPython test.test_asyncio module on one loop.

Started by run.py, one process per module (restarted without the tests already done if a
test hangs or the process dies). Results go, one JSON object per line, to ``--events``;
the tests' own output goes to stdout/stderr (run.py sends them to a log file).

Events::

    {"ev": "start", "id": ...}
    {"ev": "loop", "id": ...}       a target loop was created or run during this test
    {"ev": "stop", "id": ..., "outcome": "pass|fail|skip", "kind": ..., "on_loop": ...,
     "created": n, "ran": n, "detail": "...", "duration": s}
    {"ev": "fixture", "id": ..., "outcome": "fail|skip", "detail": "..."}   setUpClass & co.
    {"ev": "done", "count": n}

``--loop ferroloop`` (the default) makes asyncio's policy produce ferroloop loops; ``--loop
asyncio`` keeps asyncio's own loop, to check the harness itself. Either way a test counts
("on_loop") only if a loop of the target kind was created or run while it ran: CPython's
tests often use their own ``test_utils.TestLoop`` or mocks, which say nothing about the loop.

A module name ``test_x[tag]`` runs CPython's ``test_x`` as variant ``tag`` (VARIANTS below),
its test ids renamed ``test.test_asyncio.test_x[tag].Class.test`` so that they never mix with
the plain module's. ``[ferrotask]``: ferroloop's native task machinery (ferroloop.Task as every
target loop's task factory, ferroloop's wait/gather/as_completed/wait_for/shield in place of
asyncio's, and test_tasks' / test_eager_task_factory's Task classes built on ferroloop.Task).
In a variant a test also counts if it called one of the replaced functions or belongs to a
class built for the variant. ``CONFORMANCE_TASK_STANDIN=c|py`` puts asyncio's own
``_CTask``/``_PyTask`` and functions in ferroloop's place (checking the wiring; the default with
``--loop asyncio``).
"""

import argparse
import asyncio
import faulthandler
import functools
import importlib
import json
import os
import re
import signal
import sys
import threading
import time
import traceback
import unittest


class Tracker:
    """Counts target-loop creations and runs, and tells the result when a test uses one."""

    def __init__(self):
        self.created = 0
        self.ran = 0
        self.on_loop_hook = None
        self._lock = threading.Lock()

    def hit(self, what):
        with self._lock:
            if what == "created":
                self.created += 1
            else:  # "ran", or "api": a variant's replaced task function was called
                self.ran += 1
        hook = self.on_loop_hook
        if hook is not None:
            hook()

    def wrap(self, cls, name, what, predicate=None):
        orig = getattr(cls, name)

        @functools.wraps(orig)
        def wrapper(self_, *args, **kwargs):
            if predicate is None or predicate(self_):
                self.hit(what)
            return orig(self_, *args, **kwargs)

        setattr(cls, name, wrapper)


def install_ferroloop(tracker):
    """Make asyncio's default policy (also after set_event_loop_policy(None)) ferroloop's."""
    import ferroloop

    # asyncio.events._init_event_loop_policy() does `from . import DefaultEventLoopPolicy`,
    # so after a test's set_event_loop_policy(None) the next policy is ferroloop's again.
    asyncio.DefaultEventLoopPolicy = ferroloop.EventLoopPolicy
    if hasattr(asyncio, "unix_events"):
        asyncio.unix_events.DefaultEventLoopPolicy = ferroloop.EventLoopPolicy
    asyncio.set_event_loop_policy(ferroloop.EventLoopPolicy())

    loop_cls = ferroloop.Loop
    tracker.wrap(loop_cls, "__init__", "created")
    tracker.wrap(loop_cls, "run_forever", "ran")
    tracker.wrap(loop_cls, "run_until_complete", "ran")
    return ferroloop.new_event_loop, f"ferroloop {getattr(ferroloop, '__version__', '?')}"


def install_asyncio(tracker):
    """Keep asyncio's own loop; count tests that ran on a real SelectorEventLoop."""
    target = asyncio.SelectorEventLoop
    base = asyncio.BaseEventLoop

    def is_target(loop):
        return isinstance(loop, target)

    tracker.wrap(base, "__init__", "created", is_target)
    tracker.wrap(base, "run_forever", "ran", is_target)
    tracker.wrap(base, "run_until_complete", "ran", is_target)
    # Not asyncio.new_event_loop: that asks the current policy, which a test may have
    # replaced by one whose factory is ours (test_runners' TestPolicy).
    return target, f"asyncio {target.__name__}"


# --- per-module adaptations -------------------------------------------------------------


# test_events, test_sock_lowlevel and test_sendfile define one copy of their tests per
# selector (and the Proactor on Windows), each with a create_event_loop() returning
# asyncio.SelectorEventLoop(<that selector>). ferroloop has one reactor, so the copies are
# replaced by one class, FerroloopEventLoopTests (so named with --loop asyncio too, to keep
# test ids stable), whose create_event_loop() returns a target loop.
_PER_SELECTOR_CLASSES = (
    "KqueueEventLoopTests",
    "EPollEventLoopTests",
    "PollEventLoopTests",
    "SelectEventLoopTests",
    "ProactorEventLoopTests",
)


def _one_class_on_loop(module, new_loop, mixins):
    """Replace the module's per-selector test classes by FerroloopEventLoopTests."""
    for name in _PER_SELECTOR_CLASSES:
        if hasattr(module, name):
            delattr(module, name)

    def create_event_loop(self):
        return new_loop()

    bases = (*mixins, module.test_utils.TestCase)
    cls = type("FerroloopEventLoopTests", bases, {"create_event_loop": create_event_loop})
    cls.__module__ = module.__name__
    cls.__qualname__ = cls.__name__
    setattr(module, cls.__name__, cls)


def _selector_loop_is_target(module, new_loop, *where):
    """While each ``Class.method`` in `where` runs, asyncio.SelectorEventLoop() is new_loop().

    For test classes whose setUp()/new_loop() build ``asyncio.SelectorEventLoop()`` (no
    selector argument) and do nothing else loop-specific: CPython's own method still runs,
    only the loop it builds changes. A class missing in this Python version is skipped; a
    method that is not the class's own (CPython changed the test) fails loudly.
    """

    def factory(selector=None):
        if selector is not None:
            raise TypeError("conformance adapter: SelectorEventLoop(selector) not expected here")
        return new_loop()

    for spec in where:
        cls_name, method = spec.split(".")
        cls = getattr(module, cls_name, None)
        if cls is None:
            continue
        if method not in cls.__dict__:
            raise RuntimeError(f"conformance adapter: {module.__name__}.{spec} not found")
        orig = cls.__dict__[method]

        def wrapper(self, *args, _orig=orig, **kwargs):
            saved = asyncio.SelectorEventLoop
            asyncio.SelectorEventLoop = factory
            try:
                return _orig(self, *args, **kwargs)
            finally:
                asyncio.SelectorEventLoop = saved

        functools.update_wrapper(wrapper, orig)
        setattr(cls, method, wrapper)


def adapt_test_events(module, new_loop):
    """The per-selector EventLoopTestsMixin classes -> FerroloopEventLoopTests.

    CPython's are ``(UnixEventLoopTestsMixin, SubprocessTestsMixin, test_utils.TestCase)``
    (UnixEventLoopTestsMixin attaches a SafeChildWatcher to the loop); ours has the same
    bases.
    """
    mixins = [getattr(module, "UnixEventLoopTestsMixin", module.EventLoopTestsMixin)]
    if hasattr(module, "SubprocessTestsMixin"):
        mixins.append(module.SubprocessTestsMixin)
    _one_class_on_loop(module, new_loop, mixins)


def adapt_test_sock_lowlevel(module, new_loop):
    _one_class_on_loop(module, new_loop, [module.BaseSockTestsMixin])


def adapt_test_sendfile(module, new_loop):
    _one_class_on_loop(module, new_loop, [module.SendfileTestsBase])


def adapt_test_base_events(module, new_loop):
    # BaseLoopSockSendfileTests builds a bare BaseSelectorEventLoop() on purpose (it tests
    # BaseEventLoop's sendfile fallback): left alone.
    _selector_loop_is_target(module, new_loop, "BaseEventLoopWithSelectorTests.setUp")


def adapt_test_server(module, new_loop):
    _selector_loop_is_target(module, new_loop, "SelectorStartServerTests.new_loop")


def adapt_test_buffered_proto(module, new_loop):
    _selector_loop_is_target(module, new_loop, "BufferedProtocolSelectorTests.new_loop")


def adapt_test_sslproto(module, new_loop):
    _selector_loop_is_target(module, new_loop, "SelectorStartTLSTests.new_loop")


def adapt_test_unix_events(module, new_loop):
    _selector_loop_is_target(
        module,
        new_loop,
        "SelectorEventLoopSignalTests.setUp",
        "SelectorEventLoopUnixSocketTests.setUp",
    )


def adapt_test_runners(module, new_loop):
    """Run test_runners on real target loops instead of a mocked BaseEventLoop.

    Its BaseTest.new_loop() builds ``asyncio.BaseEventLoop()`` with a mocked selector and
    records that ``shutdown_asyncgens`` ran (checked in tearDown); the runner contract is
    what a loop must honour, so we keep the check and use a target loop.
    """

    def new_runner_loop(self):
        loop = new_loop()
        loop.shutdown_ag_run = False
        shutdown_asyncgens = loop.shutdown_asyncgens

        async def recording_shutdown_asyncgens():
            loop.shutdown_ag_run = True
            await shutdown_asyncgens()

        loop.shutdown_asyncgens = recording_shutdown_asyncgens
        return loop

    module.BaseTest.new_loop = new_runner_loop


def adapt_test_pep492(module, new_loop):
    """Run test_pep492 on a target loop instead of a mocked ``asyncio.BaseEventLoop()``."""

    def setUp(self):
        module.test_utils.TestCase.setUp(self)
        self.loop = new_loop()
        self.set_event_loop(self.loop)

    module.BaseTest.setUp = setUp


# --- variants: the same CPython module run on other task machinery ------------------------

# asyncio's task functions that a [ferrotask] variant replaces by ferroloop's.
TASK_FUNCTIONS = ("wait", "gather", "as_completed", "wait_for", "shield")

# What a variant needs from ferroloop; run.py skips the variant (not run, not failed) without.
VARIANT_NEEDS = {"ferrotask": ("Task", "task_factory")}


def split_module(name):
    """``test_tasks[ferrotask]`` -> (``test_tasks``, ``ferrotask``); no tag -> (name, None)."""
    if name.endswith("]") and "[" in name:
        base, tag = name[:-1].split("[", 1)
        return base, tag
    return name, None


class TaskImpl:
    """The task machinery a [ferrotask] variant installs: ferroloop's, or a stand-in."""

    def __init__(self, loop_kind):
        standin = os.environ.get("CONFORMANCE_TASK_STANDIN", "")
        if not standin and loop_kind == "asyncio":
            standin = "c"  # checking the harness: asyncio's own C Task must pass everything
        if standin:
            task = {"c": asyncio.tasks._CTask, "py": asyncio.tasks._PyTask}[standin]

            def task_factory(loop, coro, **kwargs):
                return task(coro, loop=loop, **kwargs)

            self.Task = task
            self.task_factory = task_factory
            self.functions = {name: getattr(asyncio.tasks, name) for name in TASK_FUNCTIONS}
            self.desc = f"stand-in asyncio.tasks.{task.__name__} (CONFORMANCE_TASK_STANDIN)"
        else:
            import ferroloop

            missing = [a for a in VARIANT_NEEDS["ferrotask"] if not hasattr(ferroloop, a)]
            if missing:
                raise SystemExit(f"conformance child: ferroloop has no {', '.join(missing)}")
            self.Task = ferroloop.Task
            self.task_factory = ferroloop.task_factory
            self.functions = {
                name: getattr(ferroloop, name)
                for name in TASK_FUNCTIONS
                if getattr(ferroloop, name, None) is not None
            }
            self.desc = "ferroloop.Task"
        self.missing = [name for name in TASK_FUNCTIONS if name not in self.functions]

    def check(self, new_loop):
        """A variant that silently ran on another Task would pass for nothing: make sure a
        target loop's create_task gives this Task."""
        loop = new_loop()
        try:

            async def nothing():
                pass

            task = loop.create_task(nothing())
            loop.run_until_complete(task)
        finally:
            loop.close()
        if type(task) is not self.Task:
            raise SystemExit(
                f"conformance child: a target loop's create_task made {type(task).__qualname__},"
                f" not {self.Task.__qualname__}: the variant would test the wrong Task"
            )


def install_ferrotask(loop_kind, tracker):
    """Every target loop gets the variant's task factory; asyncio's task functions (in
    ``asyncio`` and ``asyncio.tasks``, where CPython's tests and asyncio itself look them up)
    become ferroloop's, each counted as a use of the target."""
    impl = TaskImpl(loop_kind)
    factory = impl.task_factory
    if loop_kind == "ferroloop":
        import ferroloop

        cls, is_target = ferroloop.Loop, None
    else:
        cls = asyncio.BaseEventLoop
        target = asyncio.SelectorEventLoop

        def is_target(loop):
            return isinstance(loop, target)

    orig_init = cls.__init__

    @functools.wraps(orig_init)
    def __init__(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        if is_target is None or is_target(self):
            # Explicitly, not a default ferroloop may have: this variant tests this factory.
            self.set_task_factory(factory)

    cls.__init__ = __init__

    for name, fn in impl.functions.items():

        def counted(*args, _fn=fn, **kwargs):
            tracker.hit("api")
            return _fn(*args, **kwargs)

        functools.update_wrapper(counted, fn)
        setattr(asyncio, name, counted)
        setattr(asyncio.tasks, name, counted)
    return impl


def _on_target(module, name, bases, attrs):
    """A test class built for a variant: every test in it exercises the variant's Task."""
    cls = type(name, bases, {**attrs, "_conformance_on_target": True})
    cls.__module__ = module.__name__
    cls.__qualname__ = name
    setattr(module, name, cls)
    return cls


def _drop_classes(module, base_names=(), names=()):
    """Remove the module's test classes named in `names` or built on a class in `base_names`
    (the per-implementation copies that a variant replaces by its own)."""
    bases = tuple(getattr(module, b) for b in base_names if hasattr(module, b))
    for attr, obj in list(vars(module).items()):
        if not (isinstance(obj, type) and issubclass(obj, unittest.TestCase)):
            continue
        if attr in names or (bases and issubclass(obj, bases)):
            delattr(module, attr)


def _own_tests(cls):
    return {k: v for k, v in vars(cls).items() if k.startswith("test_")} if cls else {}


def ferrotask_test_tasks(module, impl):
    """test_tasks on the variant's Task: one class as CPython's CTask_CFuture_Tests (same
    bases, same own tests) with ``Task = impl.Task`` and ``Future = asyncio's C Future``, its
    subclass twin (add_subclass_tests), and the current-task tests; the Py/C copies
    (``*Task_*Future*``, introspection of asyncio's own registry functions, current-loop tests
    per implementation, GenericTaskTests on asyncio's module) are dropped: the plain
    test_tasks runs them. The other classes (gather, sleep, run_coroutine_threadsafe, ...)
    stay, on the replaced functions and the loops' task factory."""
    tc = module.test_utils.TestCase
    task, future = impl.Task, asyncio.futures._CFuture
    extra = _own_tests(getattr(module, "CTask_CFuture_Tests", None))
    _drop_classes(
        module,
        base_names=("BaseTaskTests", "BaseTaskIntrospectionTests", "BaseCurrentLoopTests"),
        names=("GenericTaskTests",),
    )
    _on_target(
        module,
        "FerroTask_CFuture_Tests",
        (module.BaseTaskTests, module.SetMethodsTest, tc),
        {"Task": task, "Future": future, **extra},
    )
    try:
        sub = type(
            "FerroTask_CFuture_SubclassTests",
            (module.BaseTaskTests, tc),
            {"Task": task, "Future": future},
        )
        sub = module.add_subclass_tests(sub)
        _on_target(module, sub.__name__, (sub,), {})
    except TypeError as exc:  # the Task cannot be subclassed: one failing test says so
        why = f"{type(exc).__name__}: {exc}"

        def test_subclass_tests(self, _why=why):
            self.fail(f"add_subclass_tests could not subclass the Task: {_why}")

        _on_target(
            module, "FerroTask_CFuture_SubclassTests", (tc,), {"test_subclass": test_subclass_tests}
        )

    def new_task(self, coro):
        return task(coro, loop=self.loop)

    attrs = {"new_task": new_task}
    if "current_task" in vars(module.BaseCurrentLoopTests):
        # 3.12+: the Py/C classes pass their own current_task; the Task registers with
        # asyncio's registry, so the one users call, asyncio.current_task, must see it.
        attrs["current_task"] = staticmethod(asyncio.current_task)
    _on_target(module, "FerroCurrentLoopTests", (module.BaseCurrentLoopTests, tc), attrs)


def ferrotask_test_eager_task_factory(module, impl):
    """test_eager_task_factory (3.12+) on the variant's Task: the eager-factory loop tests (with
    CEagerTaskFactoryLoopTests' own tests) and the eager / non-eager task-counting tests; the
    Py/C/asyncio.Task copies are dropped (the plain module runs them)."""
    tc = module.test_utils.TestCase
    extra = _own_tests(getattr(module, "CEagerTaskFactoryLoopTests", None))
    _drop_classes(module, base_names=("EagerTaskFactoryLoopTests", "BaseTaskCountingTests"))
    _on_target(
        module,
        "FerroEagerTaskFactoryLoopTests",
        (module.EagerTaskFactoryLoopTests, tc),
        {"Task": impl.Task, **extra},
    )
    _on_target(
        module,
        "NonEagerFerroTaskTests",
        (module.BaseNonEagerTaskFactoryTests, tc),
        {"Task": impl.Task},
    )
    _on_target(
        module, "EagerFerroTaskTests", (module.BaseEagerTaskFactoryTests, tc), {"Task": impl.Task}
    )


# Variant tag -> (install(loop_kind, tracker) -> impl, {module: function(module, impl)}).
# Modules without a function (test_taskgroups, test_timeouts, test_waitfor) run as they are,
# on loops whose task factory and asyncio's functions the install step replaced.
VARIANTS = {
    "ferrotask": (
        install_ferrotask,
        {
            "test_tasks": ferrotask_test_tasks,
            "test_eager_task_factory": ferrotask_test_eager_task_factory,
        },
    ),
}


# Module name -> function(module, new_loop) run after import, before loading its tests.
# Keep each one small and explain it: it changes what CPython's test runs on, never what
# it checks.
ADAPTERS = {
    "test_events": adapt_test_events,
    "test_base_events": adapt_test_base_events,
    "test_sock_lowlevel": adapt_test_sock_lowlevel,
    "test_sendfile": adapt_test_sendfile,
    "test_server": adapt_test_server,
    "test_buffered_proto": adapt_test_buffered_proto,
    "test_sslproto": adapt_test_sslproto,
    "test_unix_events": adapt_test_unix_events,
    "test_runners": adapt_test_runners,
    "test_pep492": adapt_test_pep492,
}


# --- results --------------------------------------------------------------------------

_RANK = {"pass": 0, "skip": 1, "fail": 2}


class EventResult(unittest.TestResult):
    """A TestResult that writes one JSON line per test, and knows which tests used the loop."""

    def __init__(self, out, tracker, test_id=None):
        super().__init__()
        self.out = out
        self.tracker = tracker
        self.test_id = test_id or (lambda test: test.id())
        self.current = None
        self.count = 0
        tracker.on_loop_hook = self._on_loop

    def emit(self, **event):
        self.out.write(json.dumps(event) + "\n")
        self.out.flush()

    def _on_loop(self):
        cur = self.current
        if cur is not None and not cur["on_loop"]:
            cur["on_loop"] = True
            self.emit(ev="loop", id=cur["id"])

    def startTest(self, test):
        super().startTest(test)
        self.current = {
            "id": self.test_id(test),
            "outcome": "pass",
            "kind": "success",
            "on_loop": False,
            "details": [],
            "created0": self.tracker.created,
            "ran0": self.tracker.ran,
            "t0": time.monotonic(),
        }
        self.emit(ev="start", id=self.current["id"])
        if getattr(type(test), "_conformance_on_target", False):
            self._on_loop()  # a class built for a variant: it tests the variant's Task

    def _record(self, outcome, kind, detail=None):
        cur = self.current
        if cur is None:
            return
        # The worst outcome wins (a subtest failure, then an error in tearDown, ...).
        if cur["kind"] == "success" or _RANK[outcome] > _RANK[cur["outcome"]]:
            cur["outcome"] = outcome
            cur["kind"] = kind
        if detail:
            cur["details"].append(detail)

    def _fmt(self, test, err):
        try:
            return self._exc_info_to_string(err, test)
        except Exception:  # noqa: BLE001 - formatting must never lose a result
            return "".join(traceback.format_exception(*err))

    def _fixture(self, test, outcome, detail):
        # setUpModule/setUpClass/tearDown* errors arrive with an _ErrorHolder "test".
        self.emit(ev="fixture", id=self.test_id(test), outcome=outcome, detail=detail)

    def addSuccess(self, test):
        self._record("pass", "success")

    def addError(self, test, err):
        if self.current is None or self.test_id(test) != self.current["id"]:
            self._fixture(test, "fail", self._fmt(test, err))
            return
        self._record("fail", "error", self._fmt(test, err))

    def addFailure(self, test, err):
        self._record("fail", "failure", self._fmt(test, err))

    def addSubTest(self, test, subtest, err):
        if err is not None:
            self._record(
                "fail", "subtest", f"[{subtest._subDescription()}]\n" + self._fmt(test, err)
            )

    def addSkip(self, test, reason):
        if self.current is None or self.test_id(test) != self.current["id"]:
            self._fixture(test, "skip", reason)
            return
        self._record("skip", "skip", reason)

    def addExpectedFailure(self, test, err):
        # CPython expects this test to fail, and it does: same as on asyncio's loop.
        self._record("pass", "expected_failure", self._fmt(test, err))

    def addUnexpectedSuccess(self, test):
        self._record("fail", "unexpected_success", "unexpected success (marked expectedFailure)")

    def stopTest(self, test):
        super().stopTest(test)
        cur = self.current
        self.current = None
        if cur is None:
            return
        self.count += 1
        created = self.tracker.created - cur["created0"]
        ran = self.tracker.ran - cur["ran0"]
        self.emit(
            ev="stop",
            id=cur["id"],
            outcome=cur["outcome"],
            kind=cur["kind"],
            on_loop=bool(created or ran or cur["on_loop"]),
            created=created,
            ran=ran,
            detail="\n".join(cur["details"]),
            duration=round(time.monotonic() - cur["t0"], 3),
        )


def iter_tests(suite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from iter_tests(item)
        else:
            yield item


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--module", required=True)
    ap.add_argument("--loop", choices=("ferroloop", "asyncio"), default="ferroloop")
    ap.add_argument("--events", required=True)
    ap.add_argument("--skip-file")
    ap.add_argument("--match", action="append", default=[], help="only test ids containing this")
    args = ap.parse_args()

    # A child of a background job inherits SIGINT ignored; Python then installs no
    # KeyboardInterrupt handler and asyncio.Runner none of its own (test_runners hangs).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    faulthandler.enable()
    # run.py sends SIGUSR1 to a hung child before killing it: the tracebacks go to stderr.
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    out = open(args.events, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
    tracker = Tracker()
    if args.loop == "ferroloop":
        new_loop, desc = install_ferroloop(tracker)
    else:
        new_loop, desc = install_asyncio(tracker)

    skip = set()
    if args.skip_file and os.path.exists(args.skip_file):
        with open(args.skip_file, encoding="utf-8") as f:
            skip = {line.strip() for line in f if line.strip()}

    base, tag = split_module(args.module)
    impl = None
    if tag is not None:
        if tag not in VARIANTS:
            raise SystemExit(f"conformance child: unknown variant [{tag}]")
        install, _ = VARIANTS[tag]
        impl = install(args.loop, tracker)
        impl.check(new_loop)
        desc += f", [{tag}]: {impl.desc}"
        if impl.missing:
            desc += f" (asyncio's own {', '.join(impl.missing)}: not in ferroloop)"

    modname = base if "." in base else f"test.test_asyncio.{base}"
    module = importlib.import_module(modname)
    adapter = ADAPTERS.get(base)
    if adapter is not None:
        adapter(module, new_loop)
    if tag is not None:
        variant_adapter = VARIANTS[tag][1].get(base)
        if variant_adapter is not None:
            variant_adapter(module, impl)

    # A variant's ids: test.test_asyncio.test_x[tag].Class.test (fixtures' ids alike).
    if tag is None:
        test_id = None
    else:
        own = re.compile(re.escape(modname) + r"(?=[.)]|$)")

        def test_id(test, _own=own, _new=f"{modname}[{tag}]"):
            return _own.sub(_new, test.id(), count=1)

    ident = test_id or (lambda t: t.id())
    loaded = unittest.defaultTestLoader.loadTestsFromModule(module)
    tests = [t for t in iter_tests(loaded) if ident(t) not in skip]
    if args.match:
        tests = [t for t in tests if any(m in ident(t) for m in args.match)]
    suite = unittest.TestSuite(tests)

    result = EventResult(out, tracker, test_id)
    print(f"conformance child: {args.module} on {desc}, {len(tests)} tests", file=sys.stderr)
    sys.stderr.flush()
    suite.run(result)
    result.emit(ev="done", count=result.count)
    out.close()
    sys.stdout.flush()
    sys.stderr.flush()
    # Leftover non-daemon threads must not keep the child alive.
    os._exit(0)


if __name__ == "__main__":
    main()
