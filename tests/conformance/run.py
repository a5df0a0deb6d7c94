"""Run CPython's own test.test_asyncio modules against ferroloop.

    python tests/conformance/run.py                 # every module in MODULES, on ferroloop
    python tests/conformance/run.py -k test_tasks   # a subset (-k again for more)
    python tests/conformance/run.py -k ferrotask    # the [ferrotask] variants (native Task)
    python tests/conformance/run.py -v              # tracebacks of every failure
    python tests/conformance/run.py --update        # rewrite expected_failures.txt
    python tests/conformance/run.py --markdown      # per-module table for the README
    python tests/conformance/run.py --readme        # README's table from every version's results
    CONFORMANCE_LOOP=asyncio python tests/conformance/run.py   # asyncio's own loop

Each module runs in its own child process (_child.py) with asyncio's policy producing
ferroloop loops. Only tests during which a ferroloop loop was created or run are counted;
the others (CPython's test_utils.TestLoop, mocks, no loop at all) are reported as "not on
loop" and never fail the run. A test that hangs for --test-timeout seconds is reported as
failed (with the child's tracebacks in the log) and the module goes on without it; a module
gets --timeout seconds in all.

expected_failures.txt names each known failure with its reason; an entry may be limited to
some Python versions. The exit code is 1 on any failure not listed there, and on any listed
test that did not fail (the file must stay true); 2 if the harness itself could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The test.test_asyncio modules to run, in order. Add a name here to run one more.
MODULES = [
    "test_tasks",
    "test_futures",
    "test_futures2",
    "test_locks",
    "test_queues",
    "test_taskgroups",
    "test_timeouts",
    "test_waitfor",
    "test_pep492",
    "test_context",
    "test_runners",
    "test_events",
    "test_base_events",
    "test_threads",
    "test_sock_lowlevel",
    "test_server",
    "test_streams",
    "test_buffered_proto",
    "test_protocols",
    "test_sendfile",
    "test_ssl",
    "test_sslproto",
    "test_subprocess",
    "test_unix_events",
    "test_transports",
]

# Modules that exist only from some CPython version on: (name, (major, minor)).
MODULES_SINCE = [
    ("test_eager_task_factory", (3, 12)),
    ("test_staggered", (3, 13)),
]
MODULES += [name for name, since in MODULES_SINCE if sys.version_info[:2] >= since]

# Variants `module[tag]`: the same CPython module run again with an adaptation (VARIANTS in
# _child.py); their test ids are `test.test_asyncio.module[tag].Class.test`. [ferrotask]:
# ferroloop's native Task as the task factory of every ferroloop loop, and ferroloop's
# wait/gather/as_completed/wait_for/shield in place of asyncio's (test_tasks and
# test_eager_task_factory: their Task test classes built on ferroloop.Task). A variant whose
# needs ferroloop does not have yet (VARIANT_NEEDS) is skipped: not run, not failed.
VARIANTS = [
    ("test_tasks[ferrotask]", (3, 11)),
    ("test_taskgroups[ferrotask]", (3, 11)),
    ("test_timeouts[ferrotask]", (3, 11)),
    ("test_waitfor[ferrotask]", (3, 11)),
    ("test_eager_task_factory[ferrotask]", (3, 12)),
]
VARIANT_NEEDS = {"ferrotask": ("Task", "task_factory")}  # attributes of the ferroloop module
MODULES += [name for name, since in VARIANTS if sys.version_info[:2] >= since]

HERE = Path(__file__).resolve().parent
CHILD = HERE / "_child.py"
EXPECTED = HERE / "expected_failures.txt"
RESULTS = HERE / "results"
PYVER = f"{sys.version_info[0]}.{sys.version_info[1]}"
MIN_MINOR = 11  # the oldest CPython (3.x) the conformance suite runs on
MAX_RESTARTS = 25  # per module: hung or crashed tests, each skipped on the next start


# --- expectations file ----------------------------------------------------------------

# A line: `[3.12+] test.test_asyncio.test_x.Class.test_y  # reason`. The optional version
# spec is a comma-separated list of `3.11`, `3.12+` (and later), `-3.12` (and earlier) and
# `3.11-3.12`; without one the entry holds on every Python.
_LINE = re.compile(r"^(?:\[(?P<spec>[^\]]*)\]\s*)?(?P<id>\S+)(?:\s+#\s?(?P<reason>.*))?$")


def _minor(text: str) -> int:
    major, minor = text.strip().split(".")
    if major != "3":
        raise ValueError(f"bad Python version {text!r}")
    return int(minor)


def parse_spec(spec: str | None) -> list[tuple[int | None, int | None]]:
    """`3.11,3.13+` -> [(11, 11), (13, None)]; None/'' -> every version."""
    if not spec or not spec.strip():
        return [(None, None)]
    ranges = []
    for part in spec.split(","):
        part = part.strip()
        if part.endswith("+"):
            ranges.append((_minor(part[:-1]), None))
        elif part.startswith("-"):
            ranges.append((None, _minor(part[1:])))
        elif "-" in part:
            lo, hi = part.split("-")
            ranges.append((_minor(lo), _minor(hi)))
        else:
            ranges.append((_minor(part), _minor(part)))
    return ranges


def spec_has(ranges, minor: int) -> bool:
    return any((lo is None or lo <= minor) and (hi is None or minor <= hi) for lo, hi in ranges)


def _normalize(ranges):
    inf = 10**6
    items = sorted(((-inf if lo is None else lo), (inf if hi is None else hi)) for lo, hi in ranges)
    merged: list[list[int]] = []
    for lo, hi in items:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(None if lo == -inf else lo, None if hi == inf else hi) for lo, hi in merged]


def spec_add(ranges, minor):
    return _normalize([*ranges, (minor, minor)])


def spec_remove(ranges, minor):
    out = []
    for lo, hi in ranges:
        if not ((lo is None or lo <= minor) and (hi is None or minor <= hi)):
            out.append((lo, hi))
            continue
        # Below the oldest Python the harness supports, nothing is left to describe.
        if (lo is None and minor - 1 >= MIN_MINOR) or (lo is not None and lo <= minor - 1):
            out.append((lo, minor - 1))
        if hi is None or minor + 1 <= hi:
            out.append((minor + 1, hi))
    return _normalize(out)


def format_spec(ranges) -> str:
    if ranges == [(None, None)]:
        return ""
    parts = []
    for lo, hi in ranges:
        if lo is None:
            parts.append(f"-3.{hi}")
        elif hi is None:
            parts.append(f"3.{lo}+")
        elif lo == hi:
            parts.append(f"3.{lo}")
        else:
            parts.append(f"3.{lo}-3.{hi}")
    return "[" + ",".join(parts) + "] "


class Expectations:
    """expected_failures.txt: comment/blank lines kept as they are, entries parsed."""

    def __init__(self, path: Path):
        self.path = path
        self.lines: list = []  # str (kept verbatim) or dict entry
        if not path.exists():
            self.lines = [
                "# Known conformance failures: `[versions] full.unittest.id  # reason`.",
                "# See run.py for the version syntax; `run.py --update` keeps this file true.",
                "",
            ]
        else:
            for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                text = raw.strip()
                if not text or text.startswith("#"):
                    self.lines.append(raw)
                    continue
                m = _LINE.match(text)
                if not m:
                    raise SystemExit(f"{path}:{n}: cannot parse: {raw!r}")
                try:
                    ranges = parse_spec(m["spec"])
                except ValueError as exc:
                    raise SystemExit(f"{path}:{n}: {exc}") from None
                self.lines.append(
                    {"id": m["id"], "ranges": ranges, "reason": (m["reason"] or "").strip()}
                )

    def entries(self):
        return [e for e in self.lines if isinstance(e, dict)]

    def for_version(self, minor: int) -> dict[str, str]:
        return {e["id"]: e["reason"] for e in self.entries() if spec_has(e["ranges"], minor)}

    def update(self, minor: int, failing: set[str], judged: set[str]) -> tuple[int, int]:
        """Make the file true for this version on the tests in `judged` (the ones run)."""
        added = removed = 0
        known = set()
        for e in self.entries():
            if e["id"] not in judged:
                continue
            known.add(e["id"])
            has = spec_has(e["ranges"], minor)
            if e["id"] in failing and not has:
                e["ranges"] = spec_add(e["ranges"], minor)
                added += 1
            elif e["id"] not in failing and has:
                e["ranges"] = spec_remove(e["ranges"], minor)
                removed += 1
        self.lines = [e for e in self.lines if not (isinstance(e, dict) and not e["ranges"])]
        for test_id in sorted(failing - known):
            self.lines.append({"id": test_id, "ranges": [(minor, minor)], "reason": "UNTRIAGED"})
            added += 1
        return added, removed

    def write(self):
        out = []
        for e in self.lines:
            if isinstance(e, str):
                out.append(e)
            else:
                out.append(f"{format_spec(e['ranges'])}{e['id']}  # {e['reason']}")
        self.path.write_text("\n".join(out) + "\n", encoding="utf-8")


# --- running one module ------------------------------------------------------------------


def split_module(name: str) -> tuple[str, str | None]:
    """`test_tasks[ferrotask]` -> (`test_tasks`, `ferrotask`); a plain name -> (name, None)."""
    if name.endswith("]") and "[" in name:
        base, tag = name[:-1].split("[", 1)
        return base, tag
    return name, None


def file_stem(module: str) -> str:
    """`test_tasks[ferrotask]` -> `test_tasks.ferrotask` (log and temp-dir names)."""
    base, tag = split_module(module)
    return base if tag is None else f"{base}.{tag}"


def _read_events(path: Path, pos: int):
    """New complete JSON lines of the events file from byte offset `pos`."""
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            data = f.read()
    except FileNotFoundError:
        return [], pos
    end = data.rfind(b"\n") + 1
    events = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return events, pos + end


def _kill(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _tail(path: Path, start: int, limit: int = 6000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    return text[-limit:]


def run_module(module: str, args, log_path: Path) -> dict:
    """Run one module in child processes; return its per-test results and notes."""
    tmp = Path(tempfile.mkdtemp(prefix=f"conformance-{file_stem(module)}-"))
    events_path = tmp / "events.jsonl"
    skip_path = tmp / "skip.txt"
    tests: dict[str, dict] = {}
    fixtures: list[dict] = []
    notes: list[str] = []
    skip: set[str] = set()
    t0 = time.monotonic()
    deadline = t0 + args.timeout
    timed_out = completed = False
    log_path.write_bytes(b"")

    env = dict(os.environ)
    env.pop("PYTHONASYNCIODEBUG", None)
    env["PYTHONUNBUFFERED"] = "1"

    for _attempt in range(MAX_RESTARTS + 1):
        skip_path.write_text("\n".join(sorted(skip)) + "\n", encoding="utf-8")
        cmd = [
            sys.executable,
            str(CHILD),
            "--module",
            module,
            "--loop",
            args.loop,
            "--events",
            str(events_path),
            "--skip-file",
            str(skip_path),
        ]
        for m in args.match:
            cmd += ["--match", m]
        if events_path.exists():
            events_path.unlink()  # before the child opens it (it appends)
        attempt_start = log_path.stat().st_size
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp,
                env=env,
                start_new_session=True,  # tests start subprocesses: kill the whole group
            )
        pos = 0
        current = None  # {"id", "on_loop"} of the test running now
        last_progress = time.monotonic()
        done = False
        hung = None
        try:
            while True:
                rc = proc.poll()
                events, pos = _read_events(events_path, pos)
                for ev in events:
                    last_progress = time.monotonic()
                    kind = ev["ev"]
                    if kind == "start":
                        current = {"id": ev["id"], "on_loop": False}
                    elif kind == "loop" and current is not None:
                        current["on_loop"] = True
                    elif kind == "stop":
                        tests[ev["id"]] = ev
                        skip.add(ev["id"])
                        current = None
                    elif kind == "fixture":
                        fixtures.append(ev)
                    elif kind == "done":
                        done = True
                if done:
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        notes.append("child did not exit after its last test: killed")
                    _kill(proc)
                    break
                if rc is not None:
                    break
                now = time.monotonic()
                if now > deadline:
                    hung, timed_out = "module", True
                elif now - last_progress > args.test_timeout:
                    hung = "test"
                if hung:
                    # Ask faulthandler for every thread's traceback, then kill the group.
                    start = log_path.stat().st_size
                    try:
                        os.kill(proc.pid, signal.SIGUSR1)
                        time.sleep(1.0)
                    except ProcessLookupError:
                        pass
                    _kill(proc)
                    stacks = _tail(log_path, start)
                    break
                time.sleep(0.05)
        except BaseException:
            _kill(proc)  # Ctrl-C or SIGTERM of run.py: leave no child behind
            raise

        if done:
            completed = True
            break
        # The child hung or died. Blame the test that was running, skip it, go on.
        if hung:
            why = (
                f"hung: no result after {args.test_timeout:g}s"
                if hung == "test"
                else f"module timeout ({args.timeout:g}s) reached during this test"
            )
            detail = f"{why}\n--- tracebacks of the child's threads ---\n{stacks}"
        else:
            why = f"child process died (exit code {proc.returncode})"
            detail = (
                f"{why}\n--- end of the child's output ---\n{_tail(log_path, attempt_start, 4000)}"
            )
        if current is None:
            notes.append(f"{why} outside any test")
            fixtures.append(
                {"id": f"{module} (outside any test)", "outcome": "fail", "detail": detail}
            )
            break
        tests[current["id"]] = {
            "id": current["id"],
            "outcome": "fail",
            "kind": "hang" if hung else "crash",
            # A hang or crash counts even if no loop was seen: it must never go unnoticed.
            "on_loop": True,
            "detail": detail,
            "duration": None,
        }
        skip.add(current["id"])
        notes.append(f"{current['id']}: {why}")
        if timed_out:
            break
    else:
        notes.append(f"gave up after {MAX_RESTARTS} restarts")

    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "tests": tests,
        "fixtures": fixtures,
        "notes": notes,
        "completed": completed,
        "timed_out": timed_out,
        "duration": round(time.monotonic() - t0, 1),
    }


# --- judging and reporting ---------------------------------------------------------------


def judge(module: str, res: dict, expected: dict[str, str], whole: bool = True) -> dict:
    """Sort a module's results into the counted categories, against the expectations."""
    prefix = (module if "." in module else f"test.test_asyncio.{module}") + "."
    c = {
        "passed": 0,
        "failed": 0,
        "skipped": 0,
        "expected_failures": 0,
        "unexpected_passes": 0,
        "not_on_loop": 0,
        "not_on_loop_failed": 0,
    }
    unexpected, unexpected_pass, xfail, failing = [], [], [], set()
    for tid, t in res["tests"].items():
        if not t["on_loop"]:
            c["not_on_loop"] += 1
            if t["outcome"] == "fail":
                c["not_on_loop_failed"] += 1
            continue
        if t["outcome"] == "fail":
            failing.add(tid)
            if tid in expected:
                c["expected_failures"] += 1
                xfail.append(tid)
            else:
                c["failed"] += 1
                unexpected.append(tid)
        elif tid in expected:
            c["unexpected_passes"] += 1
            unexpected_pass.append(tid)
        elif t["outcome"] == "skip":
            c["skipped"] += 1
        else:
            c["passed"] += 1
    for fx in res["fixtures"]:
        if fx["outcome"] == "fail":
            fid = fx["id"]
            failing.add(fid)
            if fid in expected:
                c["expected_failures"] += 1
                xfail.append(fid)
            else:
                c["failed"] += 1
                unexpected.append(fid)
    # Listed tests of this module that did not run on the loop at all: stale entries.
    stale = []
    if res["completed"] and whole:
        for tid in expected:
            seen = tid in res["tests"] and res["tests"][tid]["on_loop"]
            if tid.startswith(prefix) and not seen and tid not in failing:
                stale.append(tid)
                c["unexpected_passes"] += 1
    return {
        "counts": c,
        "unexpected": unexpected,
        "unexpected_passes": unexpected_pass + stale,
        "stale": stale,
        "expected": xfail,
        "failing": failing,
        # The ids --update may judge: everything seen, plus listed ids that never showed up.
        "judged": set(res["tests"]) | {fx["id"] for fx in res["fixtures"]} | set(stale),
    }


def _table(rows, totals, markdown: bool) -> str:
    head = ["module", "passed", "failed", "expected fail", "skipped", "not on loop", "time"]
    body = []
    for module, j, res in rows:
        c = j["counts"]
        if res.get("unavailable"):
            state = f" (skipped: {res['unavailable']})"
        else:
            state = "" if res["completed"] else " (incomplete)"
        body.append(
            [
                module + state,
                c["passed"],
                c["failed"] + c["unexpected_passes"],
                c["expected_failures"],
                c["skipped"],
                c["not_on_loop"],
                f"{res['duration']:.1f}s",
            ]
        )
    body.append(
        [
            "total",
            totals["passed"],
            totals["failed"],
            totals["expected_failures"],
            totals["skipped"],
            totals["not_on_loop"],
            f"{totals['duration']:.1f}s",
        ]
    )
    if markdown:
        head = head[:-1]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] + [" ---: "] * 5) + "|"]
        for r in body:
            mod, _, state = r[0].partition(" (")  # `test_x[tag]` (skipped: ...)
            name = "**total**" if r[0] == "total" else f"`{mod}`" + (f" ({state}" if state else "")
            cells = [name] + [str(x) for x in r[1:-1]]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = "  ".join([f"{{:<{widths[0]}}}"] + [f"{{:>{w}}}" for w in widths[1:]])
    out = [fmt.format(*head), fmt.format(*["-" * w for w in widths])]
    out += [fmt.format(*[str(x) for x in r]) for r in body[:-1]]
    out += [fmt.format(*["-" * w for w in widths]), fmt.format(*[str(x) for x in body[-1]])]
    return "\n".join(out)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())


README = HERE.parent.parent / "README.md"
README_START, README_END = "<!-- conformance:start -->", "<!-- conformance:end -->"


def readme_table() -> str:
    """The README's table: one column per Python version with a ferroloop results file."""
    paths = [p for p in RESULTS.glob("results-3.*.json") if not p.stem.endswith("-asyncio")]
    paths.sort(key=lambda p: _minor(p.stem.removeprefix("results-")))
    runs = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    if not runs:
        raise SystemExit(f"--readme: no results-3.*.json in {RESULTS}: run the suite first")
    partial = [run["python_minor"] for run in runs if not run.get("whole_run")]
    if partial:
        raise SystemExit(
            f"--readme: the last run on {', '.join(partial)} was not the whole suite"
            " (-k/-t, or an older run.py): run `make test-conformance test-conformance-extra`"
        )
    # Module order: those every version runs first (alphabetical), then the rest by first
    # version; variants after the plain modules.
    order: dict[str, tuple] = {}
    for i, run in enumerate(runs):
        for name in run["modules"]:
            everywhere = all(name in r["modules"] for r in runs)
            key = (split_module(name)[1] is not None, not everywhere, i, name)
            order[name] = min(order.get(name, key), key)
    versions = [run["python"] for run in runs]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on CPython "
        + (", ".join(versions[:-1]) + " and " if len(versions) > 1 else "")
        + versions[-1]
        + " (passed / ran on ferroloop; a ferroloop loop's",
        "tasks are `ferroloop.Task`s). The `[ferrotask]` rows run CPython's task tests with",
        "`Task = ferroloop.Task` (`test_tasks`' `BaseTaskTests` family) and ferroloop's"
        + " `wait`/`gather`/",
        "`shield`/`as_completed`/`wait_for` in place of asyncio's:",
        "",
        "| module | " + " | ".join(run["python_minor"] for run in runs) + " |",
        "| --- |" + " ---: |" * len(runs),
    ]
    for name in sorted(order, key=order.get):
        cells = []
        for run in runs:
            m = run["modules"].get(name)
            if m is None:
                cells.append("—")
            else:
                ran = m["passed"] + m["failed"] + m["expected_failures"]
                cells.append(f"{m['passed']}/{ran}")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    for label, key, bold in (
        ("total passed", "passed", True),
        ("known failures (expectations file)", "expected_failures", False),
        ("not counted: never ran on a ferroloop loop", "not_on_loop", False),
    ):
        vals = [str(run["totals"][key]) for run in runs]
        if bold:
            label, vals = f"**{label}**", [f"**{v}**" for v in vals]
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def write_readme() -> int:
    text = README.read_text(encoding="utf-8")
    head, sep, rest = text.partition(README_START)
    _, sep2, tail = rest.partition(README_END)
    if not sep or not sep2:
        raise SystemExit(f"--readme: {README} has no {README_START} ... {README_END} block")
    README.write_text(
        head + README_START + "\n" + readme_table() + "\n" + README_END + tail, encoding="utf-8"
    )
    print(f"conformance: wrote the table into {README}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "-k",
        "--module",
        action="append",
        default=[],
        help="run only this module (test_tasks or tasks); repeat for more",
    )
    ap.add_argument(
        "-t",
        "--match",
        action="append",
        default=[],
        help="only tests whose id contains this (repeatable); for debugging, no --update",
    )
    ap.add_argument("--timeout", type=float, default=600, help="seconds per module (default 600)")
    ap.add_argument(
        "--test-timeout",
        type=float,
        default=60,
        help="seconds without a result before a test counts as hung (default 60)",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="tracebacks of every failure")
    ap.add_argument("--update", action="store_true", help="rewrite expected_failures.txt")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    ap.add_argument(
        "--readme",
        action="store_true",
        help="run nothing: rewrite README.md's table from every version's results file",
    )
    ap.add_argument(
        "--loop",
        choices=("ferroloop", "asyncio"),
        default=os.environ.get("CONFORMANCE_LOOP", "ferroloop"),
        help="target loop (default: $CONFORMANCE_LOOP or ferroloop)",
    )
    ap.add_argument("--expected", type=Path, default=EXPECTED, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.readme:
        return write_readme()
    # SIGTERM (a CI timeout) unwinds like Ctrl-C, so the running child is killed too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.update and args.match:
        ap.error("--update needs whole modules: drop -t/--match")
    if args.update and os.environ.get("CONFORMANCE_TASK_STANDIN"):
        ap.error("--update describes ferroloop: unset CONFORMANCE_TASK_STANDIN")

    modules = MODULES
    if args.module:
        # `tasks` or `test_tasks`; `tasks[ferrotask]`; `ferrotask` or `[ferrotask]`: every
        # module of that variant; a dotted name is imported as is (any unittest module).
        tags = {split_module(m)[1] for m in MODULES} - {None}
        want = []
        for m in args.module:
            if m.strip("[]") in tags:
                want += [x for x in MODULES if split_module(x)[1] == m.strip("[]")]
            else:
                want.append(m if m.startswith("test_") or "." in m else f"test_{m}")
        modules = list(dict.fromkeys(want))
        unknown = [m for m in modules if m not in MODULES]
        if unknown:
            print(f"note: not in MODULES (run anyway): {', '.join(unknown)}")

    has: dict[str, bool] = {}  # ferroloop attributes the variants need: present?
    if args.loop == "ferroloop":
        needs = sorted({a for attrs in VARIANT_NEEDS.values() for a in attrs})
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                (
                    "import json, ferroloop, ferroloop._ferroloop; "
                    "print(ferroloop.__version__); "
                    f"print(json.dumps({{a: hasattr(ferroloop, a) for a in {needs!r}}}))"
                ),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode != 0:
            print(f"conformance: cannot import ferroloop with {sys.executable}:")
            print(_indent(probe.stderr))
            return 2
        version, has_json = probe.stdout.strip().splitlines()[-2:]
        has = json.loads(has_json)
        loop_desc = f"ferroloop {version}"
    else:
        loop_desc = "asyncio (stock SelectorEventLoop: checking the harness)"
    standin = os.environ.get("CONFORMANCE_TASK_STANDIN") or args.loop == "asyncio"

    def unavailable(module: str) -> str | None:
        """Why a variant cannot run (ferroloop lacks what it needs), or None."""
        tag = split_module(module)[1]
        if tag is None or standin:
            return None
        missing = [a for a in VARIANT_NEEDS.get(tag, ()) if not has.get(a)]
        return f"ferroloop.{', ferroloop.'.join(missing)} missing" if missing else None

    expectations = Expectations(args.expected)
    minor = sys.version_info[1]
    # The expectations file describes ferroloop; against asyncio's loop, expect nothing.
    expected = expectations.for_version(minor) if args.loop == "ferroloop" else {}

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ".gitignore").write_text("*\n", encoding="utf-8")
    tag = PYVER if args.loop == "ferroloop" else f"{PYVER}-asyncio"

    print(f"conformance: Python {sys.version.split()[0]} ({sys.executable}), loop: {loop_desc}")
    rows = []
    for module in modules:
        log_path = RESULTS / f"{file_stem(module)}-{tag}.log"
        print(f"  {module} ...", end="", flush=True)
        why_not = unavailable(module)
        if why_not:
            res = {
                "tests": {},
                "fixtures": [],
                "notes": [f"not run: {why_not} (the variant runs once ferroloop has it)"],
                "completed": True,
                "timed_out": False,
                "duration": 0.0,
                "unavailable": why_not,
            }
        else:
            res = run_module(module, args, log_path)
        # A skipped variant judges nothing: its listed failures are not stale.
        j = judge(module, res, expected, whole=not args.match and not why_not)
        rows.append((module, j, res))
        c = j["counts"]
        print(
            f" {c['passed']} passed, {c['failed'] + c['unexpected_passes']} failed,"
            f" {c['expected_failures']} expected failures, {c['skipped']} skipped,"
            f" {c['not_on_loop']} not on loop ({res['duration']:.1f}s)",
            flush=True,
        )
        for note in res["notes"]:
            print(f"    note: {note}")
        if c["not_on_loop_failed"]:
            print(
                f"    warning: {c['not_on_loop_failed']} failed without using the loop"
                " (not counted; tracebacks below)"
            )

    totals = {k: 0 for k in ("passed", "failed", "skipped", "expected_failures", "not_on_loop")}
    totals["duration"] = 0.0
    for _, j, res in rows:
        c = j["counts"]
        totals["passed"] += c["passed"]
        totals["failed"] += c["failed"] + c["unexpected_passes"]
        totals["skipped"] += c["skipped"]
        totals["expected_failures"] += c["expected_failures"]
        totals["not_on_loop"] += c["not_on_loop"]
        totals["duration"] += res["duration"]

    # Details: unexpected failures always; expected ones with -v.
    for module, j, res in rows:
        tests = res["tests"]
        fx = {f["id"]: f for f in res["fixtures"]}
        for tid in j["unexpected"]:
            t = tests.get(tid) or fx[tid]
            print(f"\nFAIL (not in expected_failures.txt): {tid}")
            print(_indent(t.get("detail") or "(no detail)"))
        for tid in j["unexpected_passes"]:
            if tid in j["stale"]:
                print(f"\nSTALE expected failure (did not run on the loop): {tid}")
            else:
                print(f"\nUNEXPECTED PASS (listed in expected_failures.txt): {tid}")
                print(f"    reason given: {expected.get(tid)}")
        if args.verbose:
            for tid in j["expected"]:
                t = tests.get(tid) or fx[tid]
                print(f"\nexpected failure: {tid}  # {expected.get(tid)}")
                print(_indent(t.get("detail") or "(no detail)"))
        # Not counted, but shown: they may be harness bugs, or ferroloop's policy differing.
        for tid, t in tests.items():
            if not t["on_loop"] and t["outcome"] == "fail":
                print(f"\nfailed without using the loop (not counted): {tid}")
                print(_indent(t.get("detail") or ""))

    print()
    print(_table(rows, totals, markdown=False))
    if args.markdown:
        print()
        print(
            f"Python {PYVER}, {loop_desc}: tests of CPython's test.test_asyncio that ran on "
            "the loop (tests that use no loop or their own test loop are not counted)."
        )
        print()
        print(_table(rows, totals, markdown=True))

    if args.update:
        if args.loop != "ferroloop":
            print("\n--update only with the ferroloop loop; the file was not changed")
        else:
            failing, judged = set(), set()
            for _, j, _res in rows:
                failing |= j["failing"]
                judged |= j["judged"]
            added, removed = expectations.update(minor, failing, judged)
            expectations.write()
            print(
                f"\n{args.expected.name} updated for Python {PYVER}: "
                f"{added} added (reason UNTRIAGED if new), {removed} removed"
            )

    summary = {
        "python": sys.version.split()[0],
        "python_minor": PYVER,
        "executable": sys.executable,
        "loop": loop_desc,
        # --readme takes only whole runs: every module of MODULES, whole.
        "whole_run": modules == MODULES and not args.match,
        "totals": totals,
        "modules": {
            module: {
                **j["counts"],
                "completed": res["completed"],
                "timed_out": res["timed_out"],
                "duration": res["duration"],
                "notes": res["notes"],
                "unexpected_failures": j["unexpected"],
                "unexpected_passes": j["unexpected_passes"],
                "expected_failures_seen": j["expected"],
            }
            for module, j, res in rows
        },
        "tests": {
            tid: {k: t.get(k) for k in ("outcome", "kind", "on_loop", "duration")}
            for _, _, res in rows
            for tid, t in res["tests"].items()
        },
    }
    out = RESULTS / f"results-{tag}.json"
    out.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n", encoding="utf-8")

    incomplete = [m for m, _, res in rows if not res["completed"]]
    print(
        f"\nresults: {out.relative_to(HERE.parent.parent)}; child logs: {RESULTS.name}/*-{tag}.log"
    )
    if incomplete:
        print(f"incomplete modules (hang/crash/timeout, see notes): {', '.join(incomplete)}")
    print(f"expected failures: {totals['expected_failures']}")
    print(
        f"conformance: {totals['passed']} passed, {totals['failed']} failed, "
        f"{totals['skipped']} skipped"
    )
    return 1 if totals["failed"] or incomplete else 0


if __name__ == "__main__":
    sys.exit(main())
