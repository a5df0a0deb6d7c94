"""Nested runs: nest_asyncio on ferroloop, ferroloop.allow_nested, and asyncio's refusal.

nest_asyncio patches asyncio and the loop class for the rest of the process, so its tests
run programs in subprocesses: `python prog.py nest` (the stock loop with nest_asyncio) and
`python -m ferroloop prog.py nest` (ferroloop with nest_asyncio) must print the same
thing, and so must `python -m ferroloop prog.py allow` (ferroloop.allow_nested, no
nest_asyncio) where the program does the same nested runs.
"""

import asyncio
import subprocess
import sys
import textwrap
import threading

import pytest
from parity_helpers import SKIP_NATIVE, WATCHDOG

TIMEOUT = 60

needs_native = pytest.mark.skipif(SKIP_NATIVE, reason="FERROLOOP_SKIP_NATIVE=1")


@pytest.fixture(scope="module")
def nest_asyncio_installed():
    try:
        import nest_asyncio  # noqa: F401  (imported only to check; patching is per process)
    except ImportError:
        pytest.fail("nest_asyncio is a test dependency: pip install nest_asyncio", pytrace=False)


def run_program(tmp_path, source, *args, ferroloop):
    prog = tmp_path / "prog.py"
    prog.write_text(textwrap.dedent(source))
    cmd = [sys.executable, *(["-m", "ferroloop"] if ferroloop else []), str(prog), *args]
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, f"{cmd} failed:\n{p.stderr}"
    out = p.stdout.splitlines()
    # The first line names the loop class; the rest is the program's result.
    return out[0], out[1:]


# The seed-style notebook program: nest_asyncio.apply(), then asyncio.run(main()), with
# nested asyncio.run / run_until_complete from inside running coroutines and callbacks.
NOTEBOOK = """
import asyncio, sys
mode = sys.argv[1]
if mode == "nest":
    import nest_asyncio
    nest_asyncio.apply()

log = []

async def inner(n, delay=0.0):
    await asyncio.sleep(0)
    if delay:
        await asyncio.sleep(delay)
    log.append(f"inner {n}")
    return n * 10

def nested_run(coro):
    # What library code in a notebook does: run a coroutine to completion, synchronously.
    if mode == "nest":
        return asyncio.run(coro)
    return asyncio.get_event_loop().run_until_complete(coro)

def sync_api(n):
    return asyncio.get_event_loop().run_until_complete(inner(n))

async def ticker(name, n):
    for i in range(n):
        log.append(f"{name} {i}")
        await asyncio.sleep(0)

async def failing():
    await asyncio.sleep(0)
    raise ValueError("raised in a nested run")

async def deep(level):
    if level == 0:
        return "bottom"
    log.append(f"deep {level}")
    return f"{level}/" + nested_run(deep(level - 1))

async def echo_once():
    async def handle(reader, writer):
        writer.write((await reader.readline()).upper())
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"nested i/o\\n")
    line = await reader.readline()
    writer.close()
    server.close()
    await server.wait_closed()
    return line.decode().strip()

async def main():
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    t = asyncio.ensure_future(ticker("tick", 6))
    results = {}
    results["nested run"] = nested_run(inner(1))
    results["sync api"] = sync_api(2)
    results["current task after"] = asyncio.current_task() is me
    results["gather + thread"] = await asyncio.gather(inner(3), asyncio.to_thread(sum, [1, 2]))
    try:
        nested_run(failing())
    except ValueError as exc:
        results["error"] = str(exc)
    results["deep"] = nested_run(deep(3))
    results["timer"] = nested_run(inner(4, delay=0.01))
    results["executor"] = nested_run(loop.run_in_executor(None, pow, 2, 10))
    results["io"] = nested_run(echo_once())

    def in_callback():
        log.append("callback start")
        results["from a callback"] = loop.run_until_complete(inner(5))
        log.append("callback end")

    loop.call_soon(in_callback)
    await asyncio.sleep(0.02)
    await t
    results["running loop kept"] = asyncio.get_running_loop() is loop
    return results

if mode == "allow":
    import ferroloop
    loop = asyncio.new_event_loop()
    ferroloop.allow_nested(loop)
    asyncio.set_event_loop(loop)
    print(type(loop).__module__)
    result = loop.run_until_complete(main())
else:
    print(type(asyncio.get_event_loop()).__module__)
    result = asyncio.run(main())
for key, value in result.items():
    print(f"{key}: {value!r}")
print(*log, sep="\\n")
"""


# Callback order across a nested run started inside a callback: every callback runs once,
# in scheduling order, whether it was queued before, during or after the nested run.
ORDER = """
import asyncio, sys
mode = sys.argv[1]
if mode == "nest":
    import nest_asyncio
    nest_asyncio.apply()

log = []

def cb(name):
    log.append(name)

async def inner():
    loop = asyncio.get_running_loop()
    for i in range(3):
        loop.call_soon(cb, f"inner-cb {i}")
        log.append(f"inner step {i}")
        await asyncio.sleep(0)
    return "inner done"

def nest_here(tag):
    loop = asyncio.get_running_loop()
    log.append(f"{tag} start")
    loop.call_soon(cb, f"{tag} queued before")
    log.append(loop.run_until_complete(inner()))
    loop.call_soon(cb, f"{tag} queued after")
    log.append(f"{tag} end")

async def stepper(name, n):
    for i in range(n):
        log.append(f"{name} {i}")
        await asyncio.sleep(0)

async def main():
    loop = asyncio.get_running_loop()
    steps = asyncio.ensure_future(stepper("task", 8))
    for i in range(3):
        loop.call_soon(cb, f"a {i}")
    loop.call_soon(nest_here, "nest1")
    for i in range(3):
        loop.call_soon(cb, f"b {i}")
    loop.call_soon(nest_here, "nest2")
    loop.call_soon(cb, "c")
    await steps
    await asyncio.sleep(0)

    def nested_forever():
        log.append("forever start")
        loop.call_soon(cb, "in forever")
        loop.call_soon(loop.stop)
        loop.call_soon(cb, "after stop, same turn")
        loop.run_forever()
        log.append("forever end: outer still running = %s" % loop.is_running())

    loop.call_soon(nested_forever)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    log.append("main end")

if mode == "allow":
    import ferroloop
    loop = ferroloop.allow_nested(asyncio.new_event_loop())
    print(type(loop).__module__)
    loop.run_until_complete(main())
else:
    print(type(asyncio.get_event_loop()).__module__)
    asyncio.run(main())
print(*log, sep="\\n")
"""


@needs_native
@pytest.mark.usefixtures("nest_asyncio_installed")
@pytest.mark.parametrize("program", [NOTEBOOK, ORDER], ids=["notebook", "callback-order"])
def test_nest_asyncio_same_results_on_both_loops(tmp_path, program):
    stock_loop, stock = run_program(tmp_path, program, "nest", ferroloop=False)
    ferro_loop, ferro = run_program(tmp_path, program, "nest", ferroloop=True)
    assert (stock_loop, ferro_loop) == ("asyncio.unix_events", "ferroloop.loop")
    assert ferro == stock
    assert len(stock) > 10


@needs_native
@pytest.mark.usefixtures("nest_asyncio_installed")
@pytest.mark.parametrize("program", [NOTEBOOK, ORDER], ids=["notebook", "callback-order"])
def test_allow_nested_same_results_as_nest_asyncio(tmp_path, program):
    _, stock = run_program(tmp_path, program, "nest", ferroloop=False)
    ferro_loop, allowed = run_program(tmp_path, program, "allow", ferroloop=True)
    assert ferro_loop == "ferroloop.loop"
    assert allowed == stock


@needs_native
@pytest.mark.usefixtures("nest_asyncio_installed")
def test_nest_asyncio_on_a_ferroloop_runner(tmp_path):
    # nest_asyncio applied to a loop made by ferroloop.run's Runner, not the policy.
    _, out = run_program(
        tmp_path,
        """
        import asyncio, nest_asyncio, ferroloop

        async def inner():
            await asyncio.sleep(0)
            return "inner"

        async def main():
            nest_asyncio.apply(asyncio.get_running_loop())
            return asyncio.get_running_loop().run_until_complete(inner())

        print(type(asyncio.new_event_loop()).__module__)
        print(ferroloop.run(main()))
        """,
        ferroloop=False,
    )
    assert out == ["inner"]


# -- asyncio's refusal, kept by default (parity) ------------------------------------------


async def _noop():
    pass


def test_default_nested_run_until_complete_raises(loop):
    async def main():
        coro = _noop()
        try:
            with pytest.raises(RuntimeError, match="This event loop is already running"):
                loop.run_until_complete(coro)
        finally:
            coro.close()
        return "refused"

    assert loop.run_until_complete(main()) == "refused"


def test_default_nested_run_forever_raises(loop):
    async def main():
        with pytest.raises(RuntimeError, match="This event loop is already running"):
            loop.run_forever()
        # (3.13's refused run_forever unsets the running loop: asyncio does, so ferroloop.)
        return "refused"

    assert loop.run_until_complete(main()) == "refused"


def test_default_nested_asyncio_run_raises(loop):
    async def main():
        coro = _noop()
        try:
            with pytest.raises(RuntimeError, match="cannot be called from a running event loop"):
                asyncio.run(coro)
        finally:
            coro.close()

    loop.run_until_complete(main())


# -- ferroloop.allow_nested ---------------------------------------------------------------


@pytest.fixture
def nested_loop(ferroloop_module):
    lp = ferroloop_module.new_event_loop()
    assert ferroloop_module.allow_nested(lp) is lp
    try:
        yield lp
    finally:
        lp.close()
        asyncio.events._set_running_loop(None)


async def _value(v, sleeps=1):
    for _ in range(sleeps):
        await asyncio.sleep(0)
    return v


def test_allow_nested_run_until_complete(nested_loop):
    loop = nested_loop

    async def main():
        me = asyncio.current_task()
        a = loop.run_until_complete(_value("a", 3))
        b = loop.run_until_complete(loop.create_task(_value("b")))
        assert asyncio.current_task() is me
        assert asyncio.get_running_loop() is loop and loop.is_running()
        return a + b

    assert loop.run_until_complete(main()) == "ab"
    assert not loop.is_running()


def test_allow_nested_exception_propagates(nested_loop):
    loop = nested_loop

    async def fails():
        await asyncio.sleep(0)
        raise KeyError("inner")

    async def main():
        with pytest.raises(KeyError, match="inner"):
            loop.run_until_complete(fails())
        return "outer fine"

    assert loop.run_until_complete(main()) == "outer fine"


def test_allow_nested_cancelled_inner(nested_loop):
    loop = nested_loop

    async def main():
        inner = loop.create_task(asyncio.sleep(3600))
        loop.call_later(0.01, inner.cancel)
        with pytest.raises(asyncio.CancelledError):
            loop.run_until_complete(inner)
        return inner.cancelled()

    assert loop.run_until_complete(main()) is True


def test_allow_nested_deep(nested_loop):
    loop = nested_loop

    async def deep(n):
        if n == 0:
            return 0
        return 1 + loop.run_until_complete(deep(n - 1))

    assert loop.run_until_complete(deep(20)) == 20


def test_allow_nested_other_tasks_progress(nested_loop):
    loop = nested_loop
    log = []

    async def ticker():
        for i in range(4):
            log.append(i)
            await asyncio.sleep(0)

    async def main():
        t = loop.create_task(ticker())
        loop.run_until_complete(_value(None, 10))
        assert t.done()
        return log

    assert loop.run_until_complete(main()) == [0, 1, 2, 3]


def test_allow_nested_run_forever_inner_stop_does_not_stop_outer(nested_loop):
    loop = nested_loop
    log = []

    def nested():
        loop.call_soon(log.append, "inner")
        loop.call_soon(loop.stop)
        loop.run_forever()
        log.append("inner run returned")
        loop.call_soon(log.append, "outer goes on")

    async def main():
        loop.call_soon(nested)
        for _ in range(5):
            await asyncio.sleep(0)
        return log

    assert loop.run_until_complete(main()) == ["inner", "inner run returned", "outer goes on"]


def test_allow_nested_outer_stop_waits_for_inner_run(nested_loop):
    # The outer run_until_complete's future completes while a nested run is still going:
    # asyncio's stop() for the outer run must neither cut the inner run short nor be lost.
    loop = nested_loop
    log = []

    async def quick():
        await asyncio.sleep(0)
        return "outer result"

    async def nests():
        log.append(loop.run_until_complete(asyncio.sleep(0.02, "inner result")))

    t = loop.create_task(nests())
    assert loop.run_until_complete(quick()) == "outer result"
    assert log == ["inner result"] and t.done()
    assert not loop.is_running() and not loop._stopping


def test_allow_nested_stop_requested_before_nested_run_is_kept(nested_loop):
    loop = nested_loop
    log = []

    def cb():
        loop.stop()  # meant for the outer run_forever
        log.append(loop.run_until_complete(_value("nested", 3)))

    loop.call_soon(cb)
    loop.call_later(WATCHDOG, loop.stop)
    loop.run_forever()  # returns after cb's turn, not at the watchdog
    assert log == ["nested"]


def test_allow_nested_callbacks_once_and_in_order(nested_loop):
    loop = nested_loop
    ran = []
    queued = []

    def cb(i):
        ran.append(i)

    def schedule(i):
        queued.append(i)
        loop.call_soon(cb, i)

    def nest(depth):
        for i in range(3):
            schedule(f"{depth}.{i}")
        if depth < 3:
            loop.call_soon(nest, depth + 1)
            loop.run_until_complete(_value(None, 4))
        for i in range(3, 5):
            schedule(f"{depth}.{i}")

    for i in range(3):
        schedule(f"top.{i}")
    loop.call_soon(nest, 0)
    for i in range(3, 6):
        schedule(f"top.{i}")
    loop.run_until_complete(_value(None, 20))
    assert ran == queued  # each once, in scheduling order


def test_allow_nested_other_thread_still_refused(nested_loop):
    loop = nested_loop
    errors = []

    def other_thread():
        coro = _noop()
        try:
            loop.run_until_complete(coro)
        except RuntimeError as exc:
            errors.append(str(exc))
        finally:
            coro.close()

    async def main():
        th = threading.Thread(target=other_thread)
        th.start()
        await loop.run_in_executor(None, th.join)

    loop.run_until_complete(main())
    assert errors == ["This event loop is already running"]


def test_allow_nested_debug_mode(nested_loop):
    loop = nested_loop
    loop.set_debug(True)

    async def main():
        return loop.run_until_complete(_value(7))

    assert loop.run_until_complete(main()) == 7


def test_allow_nested_needs_a_ferroloop_loop(ferroloop_module):
    stock = asyncio.DefaultEventLoopPolicy().new_event_loop()
    try:
        with pytest.raises(TypeError, match="ferroloop loop"):
            ferroloop_module.allow_nested(stock)
    finally:
        stock.close()


def test_allow_nested_is_per_loop(ferroloop_module, nested_loop):
    other = ferroloop_module.new_event_loop()
    try:

        async def main():
            coro = _noop()
            try:
                with pytest.raises(RuntimeError, match="already running"):
                    other.run_until_complete(coro)
            finally:
                coro.close()

        other.run_until_complete(main())
    finally:
        other.close()
