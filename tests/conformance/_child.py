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
"""

import argparse
import asyncio
import faulthandler
import functools
import importlib
import json
import os
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
            else:
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

    def __init__(self, out, tracker):
        super().__init__()
        self.out = out
        self.tracker = tracker
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
            "id": test.id(),
            "outcome": "pass",
            "kind": "success",
            "on_loop": False,
            "details": [],
            "created0": self.tracker.created,
            "ran0": self.tracker.ran,
            "t0": time.monotonic(),
        }
        self.emit(ev="start", id=test.id())

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
        self.emit(ev="fixture", id=test.id(), outcome=outcome, detail=detail)

    def addSuccess(self, test):
        self._record("pass", "success")

    def addError(self, test, err):
        if self.current is None or test.id() != self.current["id"]:
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
        if self.current is None or test.id() != self.current["id"]:
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

    modname = args.module if "." in args.module else f"test.test_asyncio.{args.module}"
    module = importlib.import_module(modname)
    adapter = ADAPTERS.get(args.module)
    if adapter is not None:
        adapter(module, new_loop)

    loaded = unittest.defaultTestLoader.loadTestsFromModule(module)
    tests = [t for t in iter_tests(loaded) if t.id() not in skip]
    if args.match:
        tests = [t for t in tests if any(m in t.id() for m in args.match)]
    suite = unittest.TestSuite(tests)

    result = EventResult(out, tracker)
    print(f"conformance child: {modname} on {desc}, {len(tests)} tests", file=sys.stderr)
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
