"""Signals: add_signal_handler/remove_signal_handler, and Ctrl-C under the runners.

asyncio's rules and errors on both loops: main thread only, invalid and uncatchable signals,
coroutines refused, handler arguments, remove's True/False, handlers dropped by close().
Ctrl-C: a child program runs under asyncio.run or ferroloop.run and sends itself SIGINT;
what it prints and how it exits must be the same. Signal dispositions and the wakeup fd
are restored after every test.
"""

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
from parity_helpers import WATCHDOG, run

SAVED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP, signal.SIGALRM)

# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True)
def restore_signal_state():
    """Put back every disposition a test may change, and the wakeup fd."""
    saved = {sig: signal.getsignal(sig) for sig in SAVED_SIGNALS}
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    yield
    for sig, handler in saved.items():
        if handler is not None:
            signal.signal(sig, handler)
    signal.set_wakeup_fd(wakeup)


pytestmark = pytest.mark.usefixtures("no_unexpected_loop_errors")


def in_thread(fn):
    """Call ``fn`` in another thread; return ("ok", result) or (exception type, message)."""
    out = []

    def target():
        try:
            out.append(("ok", fn()))
        except BaseException as exc:  # noqa: BLE001 (we report whatever it raised)
            out.append((type(exc), str(exc)))

    t = threading.Thread(target=target)
    t.start()
    t.join()
    return out[0]


# ---------------------------------------------------------------------------------------------
# add / remove


def test_handler_runs_with_args_on_the_loop(loop):
    calls = []

    async def main():
        done = loop.create_future()

        def handler(*args):
            calls.append((args, asyncio.get_running_loop() is loop))
            if len(calls) == 2:
                done.set_result(None)

        loop.add_signal_handler(signal.SIGUSR1, handler, "a", 1)
        assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN)
        os.kill(os.getpid(), signal.SIGUSR1)
        await asyncio.sleep(0)
        os.kill(os.getpid(), signal.SIGUSR1)
        await done
        return loop.remove_signal_handler(signal.SIGUSR1), loop.remove_signal_handler(
            signal.SIGUSR1
        )

    assert run(loop, main()) == (True, False)
    assert calls == [(("a", 1), True), (("a", 1), True)]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_signal_wakes_an_idle_loop(loop):
    # The loop sleeps in its poller with nothing else to do; a signal sent from another
    # thread must wake it.
    async def main():
        got = loop.create_future()
        loop.add_signal_handler(signal.SIGUSR2, got.set_result, "woken")
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR2))
        timer.start()
        try:
            return await got
        finally:
            timer.join()
            loop.remove_signal_handler(signal.SIGUSR2)

    assert run(loop, main()) == "woken"


def test_handler_replaced(loop):
    calls = []

    async def main():
        done = loop.create_future()
        loop.add_signal_handler(signal.SIGUSR1, calls.append, "first")
        loop.add_signal_handler(
            signal.SIGUSR1, lambda: (calls.append("second"), done.set_result(1))
        )
        os.kill(os.getpid(), signal.SIGUSR1)
        await done
        assert loop.remove_signal_handler(signal.SIGUSR1) is True

    run(loop, main())
    assert calls == ["second"]


def test_handler_exception_goes_to_exception_handler(loop):
    seen = []

    async def main():
        done = loop.create_future()

        def handler(lp, context):
            seen.append((lp is loop, type(context.get("exception")), context["message"]))
            done.set_result(None)

        def boom():
            raise ZeroDivisionError("in a signal handler")

        loop.set_exception_handler(handler)
        loop.add_signal_handler(signal.SIGUSR1, boom)
        os.kill(os.getpid(), signal.SIGUSR1)
        await done
        loop.remove_signal_handler(signal.SIGUSR1)

    run(loop, main())
    assert len(seen) == 1
    same_loop, exc_type, message = seen[0]
    assert same_loop and exc_type is ZeroDivisionError
    assert message.startswith("Exception in callback")


def test_handler_runs_in_context_of_add(loop):
    import contextvars

    var = contextvars.ContextVar("var", default="unset")

    async def main():
        done = loop.create_future()
        var.set("at add time")
        loop.add_signal_handler(signal.SIGUSR1, lambda: done.set_result(var.get()))
        var.set("later")
        os.kill(os.getpid(), signal.SIGUSR1)
        try:
            return await done
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)

    # asyncio's signal Handle is made with context=None: it runs in a copy of the context
    # current when the handler was added.
    assert run(loop, main()) == "at add time"


def test_signal_while_loop_stopped_is_handled_on_next_run(loop):
    calls = []
    loop.add_signal_handler(signal.SIGUSR1, calls.append, "late")
    os.kill(os.getpid(), signal.SIGUSR1)  # the loop is not running
    assert calls == []

    async def main():
        while not calls:
            await asyncio.sleep(0)

    run(loop, main())
    assert calls == ["late"]
    assert loop.remove_signal_handler(signal.SIGUSR1)


def test_debug_slow_callback_names_the_signal_handler(loop, caplog):
    # Debug mode reports every callback slower than slow_callback_duration (0: all of them)
    # by its handle's repr: for a signal it is the user's callback, as in asyncio.
    def named_handler(arg):
        done.set_result(arg)

    async def main():
        loop.add_signal_handler(signal.SIGUSR1, named_handler, 1)
        os.kill(os.getpid(), signal.SIGUSR1)
        try:
            return await done
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)

    loop.set_debug(True)
    loop.slow_callback_duration = 0
    done = loop.create_future()
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        assert loop.run_until_complete(main()) == 1
    executing = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("Executing <Handle")
    ]
    assert any("named_handler(1)" in m for m in executing), executing
    assert not any("Handle._run()" in m for m in executing), executing


def test_sigint_removal_restores_default_int_handler(loop):
    async def main():
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        return loop.remove_signal_handler(signal.SIGINT)

    assert run(loop, main()) is True
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_close_removes_handlers(loop):
    loop.add_signal_handler(signal.SIGUSR1, lambda: None)
    loop.add_signal_handler(signal.SIGUSR2, lambda: None)
    fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(fd)
    assert fd != -1
    loop.close()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
    assert signal.set_wakeup_fd(-1) == -1  # the loop's wakeup fd was unset


def test_remove_last_handler_unsets_wakeup_fd(loop):
    loop.add_signal_handler(signal.SIGUSR1, lambda: None)
    loop.add_signal_handler(signal.SIGUSR2, lambda: None)
    assert loop.remove_signal_handler(signal.SIGUSR1)
    fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(fd)
    assert fd != -1
    assert loop.remove_signal_handler(signal.SIGUSR2)
    assert signal.set_wakeup_fd(-1) == -1


# ---------------------------------------------------------------------------------------------
# errors


def test_coroutines_refused(loop):
    async def coro_fn():
        pass

    coro = coro_fn()
    try:
        for cb in (coro_fn, coro):
            with pytest.raises(TypeError) as info:
                loop.add_signal_handler(signal.SIGUSR1, cb)
            assert str(info.value) == "coroutines cannot be used with add_signal_handler()"
    finally:
        coro.close()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    assert loop.remove_signal_handler(signal.SIGUSR1) is False


@pytest.mark.parametrize("method", ["add_signal_handler", "remove_signal_handler"])
@pytest.mark.parametrize(
    "sig, exc_type, message",
    [
        ("SIGUSR1", TypeError, "sig must be an int, not 'SIGUSR1'"),
        (1.5, TypeError, "sig must be an int, not 1.5"),
        (0, ValueError, "invalid signal number 0"),
        (-1, ValueError, "invalid signal number -1"),
        (signal.NSIG + 1, ValueError, f"invalid signal number {signal.NSIG + 1}"),
    ],
)
def test_invalid_signal_numbers(loop, method, sig, exc_type, message):
    args = (sig, lambda: None) if method == "add_signal_handler" else (sig,)
    with pytest.raises(exc_type) as info:
        getattr(loop, method)(*args)
    assert str(info.value) == message


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_uncatchable_signals(loop, sig):
    with pytest.raises(RuntimeError) as info:
        loop.add_signal_handler(sig, lambda: None)
    assert str(info.value) == f"sig {sig} cannot be caught"
    # Refused cleanly: nothing registered, wakeup fd unset again.
    assert loop.remove_signal_handler(sig) is False
    assert signal.set_wakeup_fd(-1) == -1


def test_closed_loop_refuses(loop):
    loop.close()
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        loop.add_signal_handler(signal.SIGUSR1, lambda: None)
    assert loop.remove_signal_handler(signal.SIGUSR1) is False


def test_add_from_another_thread(loop):
    result = in_thread(lambda: loop.add_signal_handler(signal.SIGUSR1, lambda: None))
    assert result[0] is RuntimeError
    assert "main thread" in result[1]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    assert loop.remove_signal_handler(signal.SIGUSR1) is False


def test_add_from_a_loop_running_in_another_thread(loop):
    # The loop runs in another thread and tries to add a handler: asyncio refuses it there.
    def target():
        async def main():
            try:
                loop.add_signal_handler(signal.SIGUSR1, lambda: None)
            except RuntimeError as exc:
                return "RuntimeError", "main thread" in str(exc)
            return "added", None

        return loop.run_until_complete(main())

    assert in_thread(target) == ("ok", ("RuntimeError", True))
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_remove_from_another_thread(loop):
    loop.add_signal_handler(signal.SIGUSR1, lambda: None)
    missing = in_thread(lambda: loop.remove_signal_handler(signal.SIGUSR2))
    present = in_thread(lambda: loop.remove_signal_handler(signal.SIGUSR1))
    # Not registered: False from any thread. Registered: signal.signal() refuses to run in
    # another thread (asyncio lets that ValueError through).
    assert missing == ("ok", False)
    assert present[0] is ValueError
    assert "main thread" in present[1]


# ---------------------------------------------------------------------------------------------
# Ctrl-C under the runners


PROGRAM = textwrap.dedent(
    """
    import asyncio, os, signal, sys, threading

    kind, scenario = sys.argv[1], sys.argv[2]
    if kind == "ferroloop":
        import ferroloop
        runner = ferroloop.run
    else:
        runner = asyncio.run

    async def child():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            print("child cancelled", flush=True)
            raise

    async def main():
        loop = asyncio.get_running_loop()
        print("loop", type(loop).__module__.split(".")[0], flush=True)
        task = asyncio.create_task(child())
        await asyncio.sleep(0)
        try:
            if scenario == "blocked":
                # From another thread, once the loop sleeps in its poller.
                threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
            else:
                os.kill(os.getpid(), signal.SIGINT)
            if scenario == "busy":
                for _ in range(3):
                    await asyncio.sleep(0)
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            print("main cancelled", flush=True)
            if scenario == "swallow":
                return "swallowed"
            raise
        finally:
            print("main finally", flush=True)
        return "not interrupted"

    if scenario == "uncaught":
        runner(main())
    else:
        try:
            print("result", runner(main()), flush=True)
        except KeyboardInterrupt:
            print("KeyboardInterrupt", flush=True)
            sys.exit(7)
        finally:
            print("sigint handler restored",
                  signal.getsignal(signal.SIGINT) is signal.default_int_handler, flush=True)
    """
)


def _run_program(kind, scenario):
    proc = subprocess.run(
        [sys.executable, "-c", PROGRAM, kind, scenario],
        capture_output=True,
        check=False,
        timeout=WATCHDOG * 2,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


INTERRUPTED = (
    "main cancelled\nmain finally\nchild cancelled\nKeyboardInterrupt\n"
    "sigint handler restored True\n"
)
EXPECTED_OUT = {
    "await": (
        INTERRUPTED,
        7,
    ),
    "blocked": (
        INTERRUPTED,
        7,
    ),
    "busy": (
        INTERRUPTED,
        7,
    ),
    # main() swallows the cancellation and returns: asyncio.run returns its result.
    "swallow": (
        (
            "main cancelled\nmain finally\nchild cancelled\nresult swallowed\n"
            "sigint handler restored True\n"
        ),
        0,
    ),
    # Nobody catches KeyboardInterrupt: the interpreter dies of SIGINT.
    "uncaught": ("main cancelled\nmain finally\nchild cancelled\n", -signal.SIGINT),
}


@pytest.mark.parametrize("scenario", sorted(EXPECTED_OUT))
def test_ctrl_c_under_run(loop_kind, scenario):
    rc, out, err = _run_program(loop_kind, scenario)
    first, _, rest = out.partition("\n")
    assert first == f"loop {'ferroloop' if loop_kind == 'ferroloop' else 'asyncio'}", (out, err)
    expected_out, expected_rc = EXPECTED_OUT[scenario]
    assert (rest, rc) == (expected_out, expected_rc), err
    if scenario == "uncaught":
        assert err.rstrip().endswith("KeyboardInterrupt"), err
    else:
        assert err == ""


PLAIN_PROGRAM = textwrap.dedent(
    """
    import asyncio, os, signal, sys, threading

    if sys.argv[1] == "ferroloop":
        import ferroloop
        loop = ferroloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()

    async def main():
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
        await asyncio.sleep(30)

    try:
        loop.run_until_complete(main())
    except KeyboardInterrupt:
        print("KeyboardInterrupt", loop.is_running(), flush=True)
    loop.run_until_complete(asyncio.sleep(0))  # the loop still works afterwards
    print("still usable", flush=True)
    loop.close()
    """
)


def test_ctrl_c_without_a_runner(loop_kind):
    # No runner: the default SIGINT handler raises KeyboardInterrupt out of the poll, and
    # run_until_complete lets it through (the loop sleeping in its poller when it arrives).
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_PROGRAM, loop_kind],
        capture_output=True,
        check=False,
        timeout=WATCHDOG * 2,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert (proc.stdout.decode(), proc.returncode) == (
        "KeyboardInterrupt False\nstill usable\n",
        0,
    ), proc.stderr.decode()
