"""`make demo`: examples/task_control.py runs to the end and says what it should.

The demo runs as a subprocess (it starts its own local HTTP server and needs httpx); its
key lines are checked, never its timings.
"""

import os
import re
import subprocess
import sys

import pytest
from parity_helpers import SKIP_NATIVE

pytestmark = pytest.mark.skipif(SKIP_NATIVE, reason="FERROLOOP_SKIP_NATIVE=1")

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.fixture(scope="module")
def demo_output():
    try:
        import httpx  # noqa: F401  (the demo's client)
    except ImportError:
        pytest.fail("httpx is needed by the demo: pip install httpx", pytrace=False)
    p = subprocess.run(
        [sys.executable, os.path.join(DEMO, "task_control.py")],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    return p.stdout


def test_header_and_server(demo_output):
    import ferroloop

    first = demo_output.splitlines()[0]
    assert first.startswith(f"ferroloop {ferroloop.__version__}: task-control walkthrough")
    assert re.search(r"local JSON API on http://127\.0\.0\.1:\d+", demo_output)


def test_all_completed_prints_every_title(demo_output):
    assert "1. asyncio.wait(ALL_COMPLETED)" in demo_output
    posts = re.findall(r"^\s+\d+ ms  post (\d+) ", demo_output, re.MULTILINE)
    assert sorted(posts[:8], key=int) == [str(i) for i in range(1, 9)]
    assert "done=8 pending=0" in demo_output


def test_first_completed_cancels_the_rest(demo_output):
    assert "2. asyncio.wait(FIRST_COMPLETED)" in demo_output
    assert re.search(r"first: post \d+: \w+", demo_output)
    assert re.search(r"cancelled the other 2: post \d+, post \d+", demo_output)


def test_first_exception_stops_at_the_failure(demo_output):
    assert "3. asyncio.wait(FIRST_EXCEPTION)" in demo_output
    assert "post 13 failed: HTTPStatusError (500)" in demo_output
    assert re.search(r"finished before it: \d+, still running: \d+ \(cancelled\)", demo_output)


def test_cancellation_with_cleanup(demo_output):
    assert "4. a task that catches CancelledError" in demo_output
    assert re.search(
        r"download cancelled after \d+ ms \('user pressed stop'\): cleanup ran, re-raising",
        demo_output,
    )
    assert "the awaiting code got CancelledError too" in demo_output
    assert "task.cancelled() = True" in demo_output


def test_both_loops_timed(demo_output):
    assert "5. the same workload on asyncio's loop and on ferroloop" in demo_output
    section = demo_output.split("5. ", 1)[1]
    assert len(re.findall(r"asyncio\s+\d+\.\d ms", section)) == 2
    assert len(re.findall(r"ferroloop\s+\d+\.\d ms\s+\(\d+\.\d\dx asyncio\)", section)) == 2
