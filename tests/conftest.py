"""Shared fixtures: every behaviour test runs on asyncio's stock loop and on ferroloop.

The ``loop`` fixture is parametrised over ``["asyncio", "ferroloop"]``. A test that passes
on "asyncio" and fails on "ferroloop" is a parity bug report in itself.

If ``import ferroloop`` fails, the "ferroloop" params fail loudly (they are never skipped).
For iterating on the tests without the native module, ``FERROLOOP_SKIP_NATIVE=1`` drops the
"ferroloop" params (and skips the ferroloop-only API tests).
"""

import asyncio
import logging
import os
import signal
import sys

import pytest

# parity_helpers sits next to this file; make it importable under any --import-mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from parity_helpers import LOOP_KINDS, SKIP_NATIVE, import_ferroloop, new_loop

# A test run started as a background job of a non-interactive shell inherits SIGINT ignored
# (POSIX); Python then installs no KeyboardInterrupt handler, asyncio.Runner none of its own,
# and the Ctrl-C tests (here and in the children they start) would wait forever. The
# conformance children do the same (conformance/_child.py).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _get_policy_slot():
    # The policy object as stored (None until someone asks), so we restore exactly.
    return asyncio.events._event_loop_policy


def _set_policy_slot(policy):
    asyncio.events._event_loop_policy = policy


class _AsyncioState:
    """Save and restore the global state a test (or a loop) may touch."""

    def __init__(self):
        self.policy = _get_policy_slot()
        self.asyncgen_hooks = sys.get_asyncgen_hooks()

    def restore(self):
        leaked_running = asyncio.events._get_running_loop()
        if leaked_running is not None:
            asyncio.events._set_running_loop(None)
        policy = _get_policy_slot()
        if policy is not None:
            policy.set_event_loop(None)
        _set_policy_slot(self.policy)
        leaked_hooks = sys.get_asyncgen_hooks() != self.asyncgen_hooks
        sys.set_asyncgen_hooks(*self.asyncgen_hooks)
        return leaked_running, leaked_hooks


@pytest.fixture(params=LOOP_KINDS)
def loop_kind(request):
    """The name of the loop implementation under test: "asyncio" or "ferroloop"."""
    return request.param


@pytest.fixture
def loop(loop_kind):
    """A fresh event loop of each kind; closed afterwards, global asyncio state restored.

    The loop is deliberately *not* set as the current event loop: a loop must never need
    ``asyncio.get_event_loop()`` to work.
    """
    state = _AsyncioState()
    lp = new_loop(loop_kind)
    try:
        yield lp
    finally:
        try:
            if not lp.is_running() and not lp.is_closed():
                lp.close()
        finally:
            leaked_running, leaked_hooks = state.restore()
    assert leaked_running is None, f"{loop_kind}: the running loop was left set after the test"
    assert not leaked_hooks, f"{loop_kind}: asyncgen hooks were left installed after the test"


@pytest.fixture
def asyncio_state():
    """A fresh default policy for the test; the previous policy / current loop restored after."""
    state = _AsyncioState()
    _set_policy_slot(None)
    try:
        yield
    finally:
        state.restore()


@pytest.fixture
def ferroloop_module():
    """The ferroloop package, for API tests that are not per-loop parity tests.

    Fails loudly if it cannot be imported; skipped only with FERROLOOP_SKIP_NATIVE=1.
    """
    if SKIP_NATIVE:
        pytest.skip("FERROLOOP_SKIP_NATIVE=1")
    return import_ferroloop()


@pytest.fixture
def no_unexpected_loop_errors(caplog):
    """Fail a test if the loop's default exception handler logged an error during it.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("no_unexpected_loop_errors")``.
    """
    yield
    errors = [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
