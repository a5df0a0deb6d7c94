"""ferroloop's public API: run (asyncio.run semantics), install, EventLoopPolicy, types.

Where ferroloop's function has an asyncio counterpart (ferroloop.run / asyncio.run), the test
runs on both and compares.
"""

import asyncio
import concurrent.futures
import subprocess
import sys

import pytest
from parity_helpers import LOOP_KINDS, import_ferroloop

needs_311 = pytest.mark.skipif(sys.version_info < (3, 11), reason="3.11+ API")


@pytest.fixture(params=LOOP_KINDS)
def run(request, asyncio_state):
    """asyncio.run, or ferroloop.run: the same contract."""
    if request.param == "asyncio":
        return asyncio.run
    return import_ferroloop().run


# -- run ----------------------------------------------------------------------------------


def test_run_returns_the_result(run):
    async def main():
        await asyncio.sleep(0)
        return "result"

    assert run(main()) == "result"


def test_run_propagates_the_exception(run):
    async def main():
        await asyncio.sleep(0)
        raise KeyError("from main")

    with pytest.raises(KeyError, match="from main"):
        run(main())


def test_run_cancels_leftover_tasks(run):
    seen = []

    async def leftover():
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def main():
        asyncio.ensure_future(leftover())
        await asyncio.sleep(0)
        return "main done"

    assert run(main()) == "main done"
    assert seen == ["cancelled"]


def test_run_shuts_down_async_generators(run):
    log = []
    keep = []

    async def agen():
        try:
            yield 1
            yield 2
        finally:
            log.append("finalised")

    async def main():
        gen = agen()
        keep.append(gen)  # keep it alive so only shutdown_asyncgens can finalise it
        await gen.__anext__()

    run(main())
    assert log == ["finalised"]


def test_run_shuts_down_the_default_executor_and_closes_the_loop(run):
    captured = {}

    async def main():
        lp = asyncio.get_running_loop()
        await lp.run_in_executor(None, lambda: None)
        captured["loop"] = lp
        captured["executor"] = lp._default_executor

    run(main())
    assert captured["loop"].is_closed()
    assert isinstance(captured["executor"], concurrent.futures.ThreadPoolExecutor)
    with pytest.raises(RuntimeError):
        captured["executor"].submit(lambda: None)


def test_run_debug_flag(run):
    async def debug_flag():
        return asyncio.get_running_loop().get_debug()

    assert run(debug_flag(), debug=True) is True
    assert run(debug_flag(), debug=False) is False


def test_run_rejects_a_non_coroutine_like_asyncio_run(run):
    def not_a_coroutine():
        return 1

    with pytest.raises(Exception) as expected:
        asyncio.run(not_a_coroutine())
    with pytest.raises(type(expected.value)):
        run(not_a_coroutine())


def test_run_from_a_running_loop_raises(run):
    async def inner():
        return 1

    async def main():
        coro = inner()
        try:
            run(coro)
        except RuntimeError as exc:
            return str(exc)
        finally:
            coro.close()

    message = asyncio.run(main())
    assert "cannot be called from a running event loop" in message


def test_run_sets_the_current_event_loop_while_running(run):
    async def main():
        current = asyncio.get_event_loop_policy().get_event_loop()
        if current is asyncio.get_running_loop():
            return True
        current.close()  # the policy made a new loop: run() did not set the current loop
        return False

    assert run(main()) is True


def test_run_unsets_the_current_event_loop_afterwards(run):
    async def main():
        return asyncio.get_running_loop()

    run(main())
    try:
        leaked = asyncio.get_event_loop_policy().get_event_loop()
    except RuntimeError:
        leaked = None
    else:
        leaked.close()  # the policy made a new loop: run() never set/unset the current loop
    assert leaked is None, "policy.get_event_loop() after run() should raise RuntimeError"


def test_run_leaves_no_running_loop_behind(run):
    async def main():
        return asyncio.get_running_loop()

    lp = run(main())
    assert lp.is_closed()
    assert asyncio._get_running_loop() is None


def test_ferroloop_run_uses_a_ferroloop_loop(ferroloop_module, asyncio_state):
    async def main():
        return type(asyncio.get_running_loop())

    assert ferroloop_module.run(main()) is ferroloop_module.Loop


@needs_311
def test_asyncio_runner_with_ferroloop_loop_factory(ferroloop_module, asyncio_state):
    async def main():
        return type(asyncio.get_running_loop())

    with asyncio.Runner(loop_factory=ferroloop_module.new_event_loop) as runner:
        assert runner.run(main()) is ferroloop_module.Loop
        assert isinstance(runner.get_loop(), ferroloop_module.Loop)


# -- install / EventLoopPolicy -------------------------------------------------------------


def test_install_makes_asyncio_create_ferroloop_loops(ferroloop_module, asyncio_state):
    ferroloop_module.install()
    policy = asyncio.get_event_loop_policy()
    assert isinstance(policy, ferroloop_module.EventLoopPolicy)
    lp = asyncio.new_event_loop()
    try:
        assert isinstance(lp, ferroloop_module.Loop)
    finally:
        lp.close()


def test_asyncio_run_after_install_runs_on_ferroloop(ferroloop_module, asyncio_state):
    ferroloop_module.install()

    async def main():
        return type(asyncio.get_running_loop())

    assert asyncio.run(main()) is ferroloop_module.Loop


def test_importing_ferroloop_changes_nothing_in_asyncio():
    # In a fresh interpreter: the default policy and loop type stay asyncio's own.
    code = (
        "import asyncio, ferroloop\n"
        "lp = asyncio.new_event_loop()\n"
        "print(type(asyncio.get_event_loop_policy()).__module__, type(lp).__module__)\n"
        "lp.close()\n"
    )
    stock = subprocess.run(
        [sys.executable, "-c", code.replace(", ferroloop", "")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert stock.returncode == 0, stock.stderr
    if "ferroloop" not in LOOP_KINDS:
        pytest.skip("FERROLOOP_SKIP_NATIVE=1")
    with_ferroloop = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
    )
    assert with_ferroloop.returncode == 0, with_ferroloop.stderr
    assert with_ferroloop.stdout == stock.stdout


@pytest.fixture(params=LOOP_KINDS)
def policy(request, asyncio_state):
    """A fresh policy of each kind: asyncio's default one, or ferroloop's."""
    if request.param == "asyncio":
        return asyncio.DefaultEventLoopPolicy()
    return import_ferroloop().EventLoopPolicy()


def test_policy_is_an_abstract_event_loop_policy(policy):
    assert isinstance(policy, asyncio.AbstractEventLoopPolicy)


def test_policy_new_event_loop(policy):
    lp = policy.new_event_loop()
    try:
        assert isinstance(lp, asyncio.AbstractEventLoop)
        assert not lp.is_running() and not lp.is_closed()
    finally:
        lp.close()


def test_policy_set_and_get_event_loop(policy):
    lp = policy.new_event_loop()
    try:
        policy.set_event_loop(lp)
        assert policy.get_event_loop() is lp
        policy.set_event_loop(None)
        with pytest.raises(RuntimeError):
            policy.get_event_loop()
    finally:
        lp.close()


def test_policy_installed_globally_get_event_loop(policy):
    asyncio.set_event_loop_policy(policy)
    lp = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(lp)
        assert asyncio.get_event_loop() is lp
        assert asyncio.get_event_loop_policy() is policy
    finally:
        asyncio.set_event_loop(None)
        lp.close()


def test_ferroloop_policy_makes_ferroloop_loops(ferroloop_module):
    lp = ferroloop_module.EventLoopPolicy().new_event_loop()
    try:
        assert isinstance(lp, ferroloop_module.Loop)
    finally:
        lp.close()


# -- types and module attributes ------------------------------------------------------------


def test_loops_are_abstract_event_loops(loop):
    assert isinstance(loop, asyncio.AbstractEventLoop)


def test_new_event_loop_returns_a_loop(ferroloop_module):
    lp = ferroloop_module.new_event_loop()
    try:
        assert isinstance(lp, ferroloop_module.Loop)
        assert isinstance(lp, asyncio.AbstractEventLoop)
        assert not lp.is_running() and not lp.is_closed()
    finally:
        lp.close()


def test_each_new_event_loop_is_distinct(ferroloop_module):
    a = ferroloop_module.new_event_loop()
    b = ferroloop_module.new_event_loop()
    try:
        assert a is not b
    finally:
        a.close()
        b.close()


def test_version_is_a_string(ferroloop_module):
    assert isinstance(ferroloop_module.__version__, str)
    assert ferroloop_module.__version__


def test_version_matches_the_installed_metadata(ferroloop_module):
    from importlib import metadata

    try:
        installed = metadata.version("ferroloop")
    except metadata.PackageNotFoundError:
        pytest.skip("ferroloop is not installed as a distribution")
    assert ferroloop_module.__version__ == installed


def test_handle_types_are_exported(ferroloop_module):
    lp = ferroloop_module.new_event_loop()
    try:
        handle = lp.call_soon(lambda: None)
        timer = lp.call_later(10, lambda: None)
        assert isinstance(handle, ferroloop_module.Handle)
        assert isinstance(timer, ferroloop_module.TimerHandle)
        # As in asyncio, a TimerHandle is a Handle.
        assert issubclass(ferroloop_module.TimerHandle, ferroloop_module.Handle)
        handle.cancel()
        timer.cancel()
    finally:
        lp.close()


def test_all_names_exist(ferroloop_module):
    expected = {
        "Loop",
        "Handle",
        "TimerHandle",
        "EventLoopPolicy",
        "new_event_loop",
        "install",
        "run",
        "__version__",
    }
    assert expected <= set(ferroloop_module.__all__)
    for name in ferroloop_module.__all__:
        assert hasattr(ferroloop_module, name), name
