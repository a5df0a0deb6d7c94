"""Side-by-side benchmarks: asyncio's stock loop, uvloop, rloop and ferroloop in one run.

Every point (row x loop x repetition) runs in a fresh process (``workloads.py ROW LOOP N``);
the table shows the median of the repetitions and ratios against asyncio and against the
fastest of uvloop and rloop. ``make bench`` runs this; see benchmarks/README.md.

    python benchmarks/run.py                      # every row, every loop, 3 repetitions
    python benchmarks/run.py --quick              # small N: a smoke run
    python benchmarks/run.py --rows call_soon,memory --loops asyncio,ferroloop
    python benchmarks/run.py --rows tasks --quick   # only the task rows (issue 6), small N
    python benchmarks/run.py --write --json out.json

The task rows (``--rows tasks``: tasks_wait, gather, first_completed, task_chain) also run
``ferroloop+task``: ferroloop's loop with ferroloop's native Task as task factory and
``ferroloop.wait``/``ferroloop.gather``; they get a table of their own (ratios vs uvloop,
target: ferroloop+task at least 2x uvloop), written between the ``tasks`` markers of the README.
"""

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workloads import LOOPS, MISSING, ROWS, TASK_ONLY_LOOPS, TASK_ROWS

WORKLOADS = HERE / "workloads.py"
README = HERE / "README.md"
CHART = HERE / "results.png"
START, END = "<!-- results:start -->", "<!-- results:end -->"
TASKS_START, TASKS_END = "<!-- tasks:start -->", "<!-- tasks:end -->"
TASK_CANDIDATE = "ferroloop+task"  # issue 6's target: at least TASK_TARGET x uvloop's speed
TASK_BASELINE = "uvloop"
TASK_TARGET = 2.0
RIVALS = ("uvloop", "rloop")  # the target: ferroloop at least as fast as the best of these
CANDIDATE = "ferroloop"

DESCRIPTIONS = {
    "call_soon": "chain of call_soon callbacks, each scheduling the next",
    "call_later": "call_later timers, seeded random delays up to 50 ms, all fire",
    "threadsafe": "call_soon_threadsafe from a worker thread, counted by the loop",
    "tasks_wait": "tasks that await asyncio.sleep(0), then asyncio.wait on all",
    "gather": "asyncio.gather of coroutines that await asyncio.sleep(0)",
    "first_completed": "rounds of wait(FIRST_COMPLETED) over 20 tasks, cancel + await 19",
    "task_chain": "chain of create_task + await, each awaited before the next is created",
    "memory": "cancelled one-hour call_later timers holding 1 KiB each: RSS still in use",
}


# --- running points ------------------------------------------------------------------------


def run_child(args, timeout):
    """Run workloads.py with ``args``; return (result dict or None, error string or None)."""
    cmd = [sys.executable, str(WORKLOADS), *map(str, args)]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timeout: no result after {timeout:g} s (killed)"
    lines = proc.stdout.strip().splitlines()
    result = None
    if lines:
        try:
            result = json.loads(lines[-1])
        except ValueError:
            pass
    if proc.returncode == MISSING and result and "missing" in result:
        return result, None
    if proc.returncode != 0 or result is None:
        if proc.returncode < 0:
            what = f"crashed: killed by {signal.Signals(-proc.returncode).name}"
        else:
            what = f"failed: exit status {proc.returncode}"
        # the last lines of stderr: the exception or panic message (minus caret markers)
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip().strip("^~")][-3:]
        return None, what + ("; " + " | ".join(s.strip() for s in tail) if tail else "")
    return result, None


def probe_loops(names, timeout):
    """Which loops import and make a loop? Return ({name: version}, {name: why not},
    {name: which Task its tasks are})."""
    versions, unavailable, task_impl = {}, {}, {}
    for name in names:
        result, error = run_child(["probe", name], timeout)
        if error:
            unavailable[name] = error
        elif "missing" in result:
            unavailable[name] = "missing (" + result["missing"] + ")"
        else:
            versions[name] = result["version"]
            task_impl[name] = result.get("task")
    return versions, unavailable, task_impl


def measure_row(row, n, loops, repeat, timeout):
    """Run one row: ``repeat`` rounds, each loop once per round (interleaved, so drift in the
    machine's load spreads over every loop). A loop that fails is not run again on this row."""
    samples = {name: [] for name in loops}
    peaks = {name: [] for name in loops}
    cpu = {name: [] for name in loops}
    errors = {}
    for rep in range(repeat):
        for name in loops:
            if name in errors or not runs_on(row, name):
                continue
            t0 = time.monotonic()
            result, error = run_child([row, name, n], timeout)
            if error:
                errors[name] = error
                progress(f"  {row:<16} {name:<14} #{rep + 1}: {error}")
                continue
            samples[name].append(result["value"])
            peaks[name].append(result["peak_rss_mib"])
            cpu[name].append(result["cpu_seconds"])
            progress(
                f"  {row:<16} {name:<14} #{rep + 1}: {fmt(row, result['value'])}"
                f"  (point took {time.monotonic() - t0:.1f} s)"
            )
    return samples, peaks, cpu, errors


def runs_on(row, name):
    """ferroloop+task is ferroloop's loop with another Task: only the task rows measure it."""
    return name not in TASK_ONLY_LOOPS or row in TASK_ROWS


def summarise(row, n, samples, peaks, cpu, errors):
    """Medians and ratios for one row. Every ratio is 'higher is better': baseline / value."""
    medians = {
        name: statistics.median(v) for name, v in samples.items() if v and name not in errors
    }
    base = medians.get("asyncio")
    speedup = {name: ratio(base, v) for name, v in medians.items()} if base is not None else {}
    rivals = {name: medians[name] for name in RIVALS if name in medians}
    best_rival = min(rivals, key=rivals.get) if rivals else None
    vs_best, met = None, None
    if best_rival and CANDIDATE in medians:
        vs_best = ratio(rivals[best_rival], medians[CANDIDATE])
        met = medians[CANDIDATE] <= rivals[best_rival]
    elif best_rival and CANDIDATE in errors:
        met = False
    # Task rows (issue 6): every loop against uvloop; ferroloop+task must be >= 2x uvloop.
    task_base = medians.get(TASK_BASELINE)
    vs_task_base = {name: ratio(task_base, v) for name, v in medians.items()} if task_base else {}
    task_met = None
    if row in TASK_ROWS and task_base is not None:
        if TASK_CANDIDATE in medians:
            task_met = vs_task_base[TASK_CANDIDATE] >= TASK_TARGET
        elif TASK_CANDIDATE in errors:
            task_met = False
    return {
        "n": n,
        "unit": unit(row),
        "samples": samples,
        "cpu_seconds": cpu,  # for reading a noisy run: wall time much above CPU time = waiting
        "peak_rss_mib": {name: max(v) for name, v in peaks.items() if v},
        "median": medians,
        "errors": errors,
        "speedup_vs_asyncio": speedup,
        "best_rival": best_rival,
        "ferroloop_vs_best_rival": vs_best,
        "target_met": met,
        "vs_uvloop": vs_task_base,
        "task_target_met": task_met,
    }


def ratio(numerator, denominator):
    if numerator is None or denominator is None or denominator <= 0 or numerator <= 0:
        return None  # e.g. a memory row where a loop gave everything back: no meaningful ratio
    return numerator / denominator


# --- formatting ----------------------------------------------------------------------------


def unit(row):
    return "MiB" if ROWS[row][3] == "rss_in_use_mib" else "s"


def fmt(row, value):
    if value is None:
        return "-"
    if unit(row) == "MiB":
        return f"{value:.1f} MiB"
    return f"{value * 1000:.1f} ms"


def fmt_ratio(value):
    return "n/a" if value is None else f"{value:.2f}x"


def fmt_met(met):
    return {True: "met", False: "**not met**", None: "n/a"}[met]


def loop_cell(row, summary, name, unavailable):
    if not runs_on(row, name):
        return "n/a"
    if name in unavailable:
        return "missing" if unavailable[name].startswith("missing") else "error"
    if name in summary["errors"]:
        return "timeout" if summary["errors"][name].startswith("timeout") else "error"
    return fmt(row, summary["median"].get(name))


def row_table(row, summary, loops, unavailable):
    """The per-row table printed as each row finishes: one line per loop."""
    lines = [
        f"{row} (N={summary['n']:,}): {DESCRIPTIONS[row]}",
        "| loop | median | min | max | peak RSS | vs asyncio |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in loops:
        values = summary["samples"].get(name) or []
        peak = summary["peak_rss_mib"].get(name)
        lines.append(
            f"| {name} | {loop_cell(row, summary, name, unavailable)} "
            f"| {fmt(row, min(values)) if values else '-'} "
            f"| {fmt(row, max(values)) if values else '-'} "
            f"| {f'{peak:.0f} MiB' if peak else '-'} "
            f"| {fmt_ratio(summary['speedup_vs_asyncio'].get(name))} |"
        )
    vs = summary["ferroloop_vs_best_rival"]
    if summary["best_rival"]:
        lines.append(
            f"ferroloop vs fastest rival ({summary['best_rival']}): {fmt_ratio(vs)}"
            f" -> target {fmt_met(summary['target_met'])}"
        )
    if row in TASK_ROWS and TASK_CANDIDATE in loops:
        lines.append(
            f"{TASK_CANDIDATE} vs {TASK_BASELINE}: "
            f"{fmt_ratio(summary['vs_uvloop'].get(TASK_CANDIDATE))}"
            f" -> target (>= {TASK_TARGET:g}x) {fmt_met(summary['task_target_met'])}"
        )
    return "\n".join(lines)


def summary_table(results, loops, unavailable):
    """One line per row: medians, ratios vs asyncio, ferroloop vs the best rival, target.

    The main table: asyncio's Task on every loop (ferroloop+task is in task_table)."""
    loops = [name for name in loops if name not in TASK_ONLY_LOOPS]
    others = [name for name in loops if name != "asyncio"]
    head = ["row", "N", *loops, *(f"{name} vs asyncio" for name in others)]
    if CANDIDATE in loops and any(r in loops for r in RIVALS):
        head += ["ferroloop vs best rival", "target"]
    lines = [
        "| " + " | ".join(head) + " |",
        "| --- | " + " | ".join("---:" for _ in head[1:]) + " |",
    ]
    for row, summary in results.items():
        cells = [row, f"{summary['n']:,}"]
        cells += [loop_cell(row, summary, name, unavailable) for name in loops]
        cells += [fmt_ratio(summary["speedup_vs_asyncio"].get(name)) for name in others]
        if len(head) > len(cells):
            best = summary["best_rival"]
            vs = fmt_ratio(summary["ferroloop_vs_best_rival"])
            cells += [f"{vs} ({best})" if best else "n/a", fmt_met(summary["target_met"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def task_table(results, loops, unavailable):
    """The task rows: medians of every loop (ferroloop+task too), ratios vs uvloop, target."""
    rows = {row: s for row, s in results.items() if row in TASK_ROWS}
    ratio_cols = [name for name in loops if name != TASK_BASELINE]
    head = ["row", "N", *loops, *(f"{name} vs {TASK_BASELINE}" for name in ratio_cols)]
    both = TASK_CANDIDATE in loops and CANDIDATE in loops
    if both:
        head.append(f"{TASK_CANDIDATE} vs {CANDIDATE}")
    head.append(f"target ({TASK_CANDIDATE} >= {TASK_TARGET:g}x {TASK_BASELINE})")
    lines = [
        "| " + " | ".join(head) + " |",
        "| --- | " + " | ".join("---:" for _ in head[1:]) + " |",
    ]
    for row, summary in rows.items():
        cells = [row, f"{summary['n']:,}"]
        cells += [loop_cell(row, summary, name, unavailable) for name in loops]
        cells += [fmt_ratio(summary["vs_uvloop"].get(name)) for name in ratio_cols]
        if both:
            med = summary["median"]
            cells.append(fmt_ratio(ratio(med.get(CANDIDATE), med.get(TASK_CANDIDATE))))
        cells.append(fmt_met(summary["task_target_met"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def progress(message):
    print(message, file=sys.stderr, flush=True)


# --- machine, README, chart ----------------------------------------------------------------


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info():
    cpu = "unknown"
    mem_gib = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(ln.split()[1]) for ln in f if ln.startswith("MemTotal:"))
        mem_gib = round(kib / 1024 / 1024, 1)
    except (OSError, StopIteration):
        pass
    try:
        date = subprocess.run(["date", "-u"], check=False, capture_output=True, text=True)
        date = date.stdout.strip()
    except OSError:
        date = time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime())
    versions = {}
    for dist in ("uvloop", "rloop", "ferroloop"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    try:  # which ferroloop source was measured (the tree may hold uncommitted work)
        commit = subprocess.run(
            ["git", "-C", str(HERE), "describe", "--always", "--dirty", "--exclude", "*"],
            check=False,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": date,
        "ferroloop_commit": commit or "unknown",
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu,
        "memory_gib": mem_gib,
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": versions,
        "load_average": load_average(),
    }


def results_markdown(report, loops, unavailable):
    m = report["machine"]
    pkgs = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    quick = " (`--quick`: small N, a smoke run, not a measurement)" if report["quick"] else ""
    out = [
        f"Run: {m['date']}{quick}",
        "",
        f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB memory, {m['os']}",
        f"- Python: {m['python']}",
        f"- Packages: {pkgs}",
        (
            f"- Load average (1, 5, 15 min) at start {m['load_average']}, "
            f"at end {report['load_average']['end']} (other work shares this machine)"
        ),
        (
            f"- Method: median of {report['repeat']} runs, each in a fresh process; "
            "times in ms, memory in MiB (lower is better); ratios are baseline / loop "
            "(higher is better)"
        ),
        "",
        summary_table(report["rows"], loops, unavailable),
        "",
    ]
    problems = [
        f"- {name}: {why}" for name, why in unavailable.items() if name not in TASK_ONLY_LOOPS
    ]
    for row, summary in report["rows"].items():
        problems += [
            f"- {name} on `{row}`: {why}"
            for name, why in summary["errors"].items()
            if name not in TASK_ONLY_LOOPS
        ]
    if problems:
        out += ["Not measured:", "", *problems, ""]
    met = [s["target_met"] for s in report["rows"].values() if s["target_met"] is not None]
    if met:
        out.append(
            f"Target (ferroloop at least as fast as the fastest of uvloop and rloop, and no more "
            f"memory): met on {sum(met)} of {len(met)} rows."
        )
        out.append("")
    if report.get("chart"):
        out += [f"![speed-up vs asyncio]({Path(report['chart']).name})", ""]
    return "\n".join(out)


def task_markdown(report, loops, unavailable):
    """The README's task-rows section: its own run line, the task table, what was missing."""
    m = report["machine"]
    pkgs = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    quick = " (`--quick`: small N, a smoke run, not a measurement)" if report["quick"] else ""
    task_impl = report.get("task_impl", {}).get(TASK_CANDIDATE)
    out = [
        f"Run: {m['date']}{quick}",
        "",
        f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB memory, {m['os']}",
        f"- Python: {m['python']}",
        f"- Packages: {pkgs}; ferroloop source at `{m.get('ferroloop_commit', 'unknown')}`",
        (
            f"- Load average (1, 5, 15 min) at start {m['load_average']}, "
            f"at end {report['load_average']['end']} (other work shares this machine)"
        ),
        (
            f"- Method: median of {report['repeat']} runs, each in a fresh process; times in ms "
            f"(lower is better); ratios are {TASK_BASELINE} / loop (higher is better)"
        ),
        (
            f"- `{CANDIDATE}`: asyncio's C Task on ferroloop's loop; `{TASK_CANDIDATE}`: "
            f"ferroloop's loop with `loop.set_task_factory(ferroloop.task_factory)` and "
            f"`ferroloop.wait`/`ferroloop.gather` ({task_impl or 'not available'})"
        ),
        "",
        task_table(report["rows"], loops, unavailable),
        "",
    ]
    problems = [f"- {name}: {why}" for name, why in unavailable.items()]
    for row, summary in report["rows"].items():
        if row in TASK_ROWS:
            problems += [f"- {name} on `{row}`: {why}" for name, why in summary["errors"].items()]
    if problems:
        out += ["Not measured:", "", *problems, ""]
    met = [
        s["task_target_met"]
        for row, s in report["rows"].items()
        if row in TASK_ROWS and s["task_target_met"] is not None
    ]
    if met:
        out.append(
            f"Target (issue 6: {TASK_CANDIDATE} at least {TASK_TARGET:g}x as fast as "
            f"{TASK_BASELINE}): met on {sum(met)} of {len(met)} task rows."
        )
        out.append("")
    return "\n".join(out)


def write_readme(section, start=START, end=END, heading="## Results"):
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    block = f"{start}\n{section}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n" + block + "\n"
    README.write_text(text)


def draw_chart(report, loops, path):
    """A grouped bar chart of the ratio vs asyncio, per row and loop. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("note: matplotlib is not installed; no chart (pip install matplotlib)")
        return None
    rows = list(report["rows"])
    shown = [name for name in loops if name != "asyncio" and name not in TASK_ONLY_LOOPS]
    if not rows or not shown:
        return None
    width = 0.8 / len(shown)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4.5))
    for i, name in enumerate(shown):
        xs = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(rows))]
        ys = [report["rows"][row]["speedup_vs_asyncio"].get(name) for row in rows]
        bars = ax.bar(xs, [y or float("nan") for y in ys], width, label=name)
        labels = [f"{y:.2g}" if y else "" for y in ys]
        ax.bar_label(bars, labels=labels, fontsize=7, padding=1)
    ax.set_yscale("log")  # ratios span 0.01x (memory) to 20x and more
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(rows, rotation=15)
    ax.set_ylabel("asyncio / loop (higher is better)")
    quick = ", --quick" if report["quick"] else ""
    ax.set_title(f"Speed-up vs asyncio (memory row: RSS ratio){quick}\n{report['machine']['date']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


# --- main ----------------------------------------------------------------------------------


def pick(value, choices, what):
    names = [s.strip() for s in value.split(",") if s.strip()]
    bad = [s for s in names if s not in choices]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(choices)})")
    return names


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loops", default=",".join(LOOPS), help="comma-separated subset")
    parser.add_argument(
        "--rows", default=",".join(ROWS), help="comma-separated subset; `tasks`: the task rows"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per point (>= 3; median)")
    parser.add_argument("--quick", action="store_true", help="N/10: a smoke run")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per point")
    parser.add_argument("--write", action="store_true", help="update README.md and the chart")
    parser.add_argument("--chart", type=Path, help=f"write the chart here (--write: {CHART})")
    parser.add_argument("--json", type=Path, help="write every sample and ratio to this file")
    args = parser.parse_args()
    if args.repeat < 3:
        parser.error("--repeat must be at least 3 (the table shows medians)")
    loops = pick(args.loops, LOOPS, "loops")
    wanted = [",".join(TASK_ROWS) if s.strip() == "tasks" else s for s in args.rows.split(",")]
    rows = pick(",".join(wanted), ROWS, "rows")
    rows = list(dict.fromkeys(rows))  # `tasks,task_chain`: once each

    machine = machine_info()
    progress(f"{machine['date']}: {machine['python']}, {machine['nproc']} CPUs ({machine['cpu']})")
    versions, unavailable, task_impl = probe_loops(loops, args.timeout)
    for name, why in unavailable.items():
        progress(f"{name}: not run: {why}")
    runnable = [name for name in loops if name in versions]

    report = {"machine": machine, "quick": args.quick, "repeat": args.repeat, "rows": {}}
    report["loops"] = {name: versions.get(name) for name in loops}
    report["unavailable"] = unavailable
    report["task_impl"] = task_impl
    for row in rows:
        n = ROWS[row][2] if args.quick else ROWS[row][1]
        samples, peaks, cpu, errors = measure_row(row, n, runnable, args.repeat, args.timeout)
        summary = summarise(row, n, samples, peaks, cpu, errors)
        report["rows"][row] = summary
        print(row_table(row, summary, loops, unavailable) + "\n", flush=True)

    report["load_average"] = {"start": machine["load_average"], "end": load_average()}
    main_rows = [row for row in report["rows"] if row not in TASK_ROWS]
    task_rows = [row for row in report["rows"] if row in TASK_ROWS]
    print(summary_table(report["rows"], loops, unavailable))
    if task_rows:
        print(f"\nTask rows (ratios vs {TASK_BASELINE}):")
        print(task_table(report["rows"], loops, unavailable))
    for row, summary in report["rows"].items():
        for name, why in summary["errors"].items():
            print(f"PROBLEM: {name} on {row}: {why}")

    # --write rewrites the main section (and chart) only if the run measured a non-task row,
    # so `--rows tasks --write` updates the task section alone.
    chart = args.chart or (CHART if args.write and main_rows else None)
    if chart:
        report["chart"] = draw_chart(report, loops, chart)
        if report["chart"]:
            progress(f"chart: {report['chart']}")
    if args.write:
        if main_rows:
            write_readme(results_markdown(report, loops, unavailable))
        if task_rows:
            write_readme(
                task_markdown(report, loops, unavailable),
                TASKS_START,
                TASKS_END,
                "## Task rows (issue 6)",
            )
        progress(f"results written to {README}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        progress(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
