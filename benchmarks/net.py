"""Network benchmarks side by side: asyncio's stock loop, uvloop, rloop and ferroloop.

- echo: a server under test in its own process (``net_server.py``, one per loop) driven by one
  client program in another process (``echo_client.c``, compiled at run time, the same for every
  loop; ``net_client.py`` if it cannot be built), in three server modes (raw ``sock_*``, asyncio
  streams, ``asyncio.Protocol``), three message sizes and three concurrencies; requests/s and
  p99 latency per point; ``c-epoll`` (``echo_server.c``, a plain C epoll echo server) runs
  alongside the loops as the machine's ceiling for each echo and tls row;
- http: a minimal HTTP/1.1 keep-alive server on ``asyncio.Protocol`` loaded with ``wrk``;
- memory: the server's peak RSS holding 10,000 idle connections, in KiB per connection;
- tls: the ``protocol`` echo server over TLS (``ssl=`` with a certificate made at run time),
  driven by the same client speaking TLS (OpenSSL);
- https: the HTTP server over TLS, loaded with ``wrk``;
- udp: an echo server on ``loop.create_datagram_endpoint``, one datagram in flight per client
  socket.

    python benchmarks/net.py                      # the whole matrix (about 16 minutes)
    python benchmarks/net.py --quick              # a smoke run of a few points
    python benchmarks/net.py --modes protocol --sizes 1k --concurrency 10,100 \
        --loops uvloop,ferroloop
    python benchmarks/net.py --write --json out.json
    python benchmarks/net.py --parts tls,https,udp --write   # only these sub-sections change

See benchmarks/README.md ("Network") for the method.
"""

import argparse
import hashlib
import json
import os
import re
import select
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import fmt_ratio, load_average, machine_info, pick, probe_loops, progress
from workloads import LOOPS

SERVER = HERE / "net_server.py"
CLIENT = HERE / "net_client.py"
C_CLIENT_SOURCE = HERE / "echo_client.c"
C_SERVER_SOURCE = HERE / "echo_server.c"
C_SERVER = "c-epoll"  # the ceiling reference: a plain C epoll echo server, not a Python loop
ALL_LOOPS = [*LOOPS, C_SERVER]
README = HERE / "README.md"
START, END = "<!-- net:start -->", "<!-- net:end -->"
CANDIDATE, RIVAL = "ferroloop", "uvloop"

MODES = {
    "sock": "raw `sock_*`: `loop.sock_accept`, `loop.sock_recv`, `loop.sock_sendall`",
    "streams": "asyncio streams: `asyncio.start_server`, `reader.read`, `writer.write` + `drain`",
    "protocol": "`loop.create_server` with an `asyncio.Protocol` (`transport.write` in "
    "`data_received`)",
}
SIZES = {"1k": 1024, "10k": 10 * 1024, "100k": 100 * 1024}
CONCURRENCY = (1, 10, 100)
HTTP_CONNS = (1, 64, 256)
PARTS = ("echo", "http", "memory", "tls", "https", "udp")
TCP_PARTS = ("echo", "http", "memory")  # the section's main block (one header, one target line)
SUB_PARTS = ("tls", "https", "udp")  # each its own sub-block, written (and kept) on its own
TLS_SIZES = ("1k", "10k")
TLS_CONCURRENCY = (1, 10, 100)
UDP_SIZES = ("1k", "10k")
UDP_CONCURRENCY = (1, 10)
TLS_TARGET = 1.0  # issue 4: ferroloop at least as fast as uvloop on every TLS row
CLIENT_BOUND = 0.9  # a client CPU share above this: the client may have been the bottleneck


def python_only(loops):
    """The loops without the C ceiling server (it serves the echo and tls parts only)."""
    return [name for name in loops if name != C_SERVER]


def target_ratio(size):
    """The project's target for ferroloop / uvloop requests/s at this message size."""
    return 1.2 if size <= 10 * 1024 else 1.0


# --- processes -----------------------------------------------------------------------------


class Server:
    """One net_server.py process. It prints JSON lines on stdout; it stops when its stdin is
    closed, and by itself after ``lifetime`` seconds."""

    def __init__(self, loop, kind, lifetime, expect=0, extra=()):
        self.loop, self.kind = loop, kind
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        if loop == C_SERVER:
            cmd = [NATIVE["server"], kind, "--lifetime", str(int(lifetime))]
        else:
            cmd = [sys.executable, str(SERVER), loop, kind, "--lifetime", str(int(lifetime))]
        cmd += [str(x) for x in extra]
        cmd += pin_args(SERVER_CPU)
        if expect:
            cmd += ["--expect", str(expect)]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
        )
        self.buffer = b""
        self.info = None
        self.error = None

    def read_json(self, timeout):
        """The next JSON line from the server, or None (self.error says why)."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                self.error = f"timeout: no answer from the server after {timeout:g} s"
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    code = self.proc.wait()
                    self.error = f"the server exited (status {code}); {self.stderr_tail()}"
                    return None
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            self.error = f"unexpected output from the server: {line[:200]!r}"
            return None

    def wait_ready(self, timeout=30):
        self.info = self.read_json(timeout)
        if self.info is not None and "missing" in self.info:
            self.error = "missing (" + self.info["missing"] + ")"
            self.info = None
        elif self.info is not None and "unsupported" in self.info:
            self.error = "unsupported (" + self.info["unsupported"] + ")"
            self.info = None
        return self.info

    @property
    def port(self):
        return self.info["port"]

    def stop(self, timeout=10):
        """Close stdin (the server stops), wait, kill if it does not; return its problems."""
        problems = []
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
            problems.append(f"did not stop within {timeout} s of stdin EOF (killed)")
        if code not in (0, None) and not (code in (2, 3) and self.error):
            problems.append(f"exit status {code}")
        tail = self.stderr_tail(lines=6)
        if tail:
            problems.append("stderr: " + tail)
        self.stderr.close()
        return problems

    def stderr_tail(self, lines=3):
        self.stderr.seek(0)
        text = self.stderr.read().decode(errors="replace")
        kept = [ln.strip() for ln in text.splitlines() if ln.strip().strip("^~")]
        return " | ".join(kept[-lines:])


# Client and server on different CPUs. Left to itself, the scheduler often wakes the server on
# the client's CPU (and back): ping-pong over loopback then runs on one CPU at half speed while
# the other idles, and a run's result depends on where each process happened to land.
# But on a machine shared with other busy processes a pinned process cannot move away from
# them, so pinning is an option (--pin), not the default.
CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
CLIENT_CPU = SERVER_CPU = None


def use_pinning():
    global CLIENT_CPU, SERVER_CPU
    if len(CPUS) >= 2:
        CLIENT_CPU, SERVER_CPU = CPUS[0], CPUS[-1]


def pin_args(cpu):
    """net_server.py / net_client.py pin themselves with --cpu."""
    return [] if cpu is None else ["--cpu", str(cpu)]


def taskset(cpu):
    """A command prefix that runs a program (wrk) on one CPU, if taskset is there."""
    return [] if cpu is None or not shutil.which("taskset") else ["taskset", "-c", str(cpu)]


# The compiled C programs (paths), filled in by main(): "client" (echo_client.c) if the echo
# rows use it, "server" (echo_server.c) if the c-epoll column runs.
NATIVE = {}


def build_native(source):
    """Compile a benchmark C program (``cc -O2``, linked with OpenSSL) into a per-user cache
    directory, keyed by a hash of the source and the compiler's version; return (path, None)
    or (None, why not)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None, "no C compiler (cc)"
    try:
        version = subprocess.run(
            [cc, "--version"], check=False, capture_output=True, text=True, timeout=30
        ).stdout.split("\n")[0]
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{cc} --version failed: {exc}"
    key = hashlib.sha256(source.read_bytes() + version.encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"ferroloop-bench-{os.getuid()}"
    binary = cache / f"{source.stem}-{key}"
    if binary.exists():
        return str(binary), None
    cache.mkdir(mode=0o700, exist_ok=True)
    partial = cache / f"{binary.name}.{os.getpid()}.tmp"
    cmd = [
        cc,
        "-O2",
        "-Wall",
        "-Wextra",
        "-o",
        str(partial),
        str(source),
        "-lssl",
        "-lcrypto",
        "-lm",
    ]
    try:
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"compiling {source.name} failed: {exc}"
    if out.returncode != 0:
        first = (out.stderr.strip().splitlines() or [f"{cc}: exit status {out.returncode}"])[0]
        return None, f"compiling {source.name} failed ({first})"
    partial.replace(binary)  # atomic: a concurrent run sees the whole binary or none
    return str(binary), None


def cc_version():
    cc = os.environ.get("CC") or shutil.which("cc") or "cc"
    try:
        out = subprocess.run([cc, "--version"], check=False, capture_output=True, text=True)
    except OSError:
        return "cc"
    return out.stdout.split("\n")[0].strip() or "cc"


def setup_native(choice, loops, versions, unavailable):
    """Build the C echo client (``choice``: auto, c or python) and, if ``loops`` names it, the
    C ceiling server (added to ``versions``, or to ``unavailable`` with the reason); return
    the echo client's description for the tables' method text."""
    if C_SERVER in loops:
        path, why = build_native(C_SERVER_SOURCE)
        if path:
            NATIVE["server"] = path
            versions[C_SERVER] = cc_version()
        else:
            unavailable[C_SERVER] = f"missing ({why})"
    if choice == "python":
        return "net_client.py (Python, one select.epoll; chosen with --client python)"
    path, why = build_native(C_CLIENT_SOURCE)
    if path:
        NATIVE["client"] = path
        return f"echo_client.c (C, one epoll; {cc_version()}, -O2)"
    if choice == "c":
        raise SystemExit(f"--client c: {why}")
    return f"net_client.py (Python, one select.epoll): the C client could not be built: {why}"


def run_client(args, timeout):
    """Run the client (the C echo client for ``echo`` if it was built, else net_client.py);
    return (result dict, None) or (None, error)."""
    if args[0] == "echo" and NATIVE.get("client"):
        cmd = [NATIVE["client"], *map(str, args), *pin_args(CLIENT_CPU)]
    else:
        cmd = [sys.executable, str(CLIENT), *map(str, args), *pin_args(CLIENT_CPU)]
    try:
        proc = subprocess.run(
            cmd,
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None, f"timeout: the client got no result within {timeout:g} s"
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except ValueError:
        result = None
    if result is None:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return None, f"client failed (status {proc.returncode}): {tail}"
    if result.get("error"):
        return None, "client: " + result["error"]
    return result, None


def rotated(names, k):
    """The loops in a different order every round, so no loop always runs first or last."""
    k %= max(1, len(names))
    return names[k:] + names[:k]


def stop_all(servers, point, problems):
    for name, server in servers.items():
        for problem in server.stop():
            problems.append(f"{name} server, {point}: {problem}")


# --- echo ----------------------------------------------------------------------------------


def measure_echo(
    mode,
    size,
    conns,
    loops,
    args,
    problems,
    command="echo",
    client_extra=(),
    server_extra=(),
    target="tcp",
):
    """One point: a fresh server per loop (all started at once, idle until driven), then
    ``repeat`` rounds, each loop once per round. ``mode``: the server's kind; ``command``: the
    client's (``echo`` or ``udp``); ``target``: ferroloop / uvloop requests/s to meet, None for
    none ("tcp": the TCP echo target for this size)."""
    per_run = args.warmup + args.duration + 3
    lifetime = 30 + args.repeat * len(loops) * (per_run + 5)
    point = f"{command} {mode}" if command != mode else mode
    point = f"{point} {size_label(size)} x{conns}"
    servers = {name: Server(name, mode, lifetime, extra=server_extra) for name in loops}
    samples = {name: [] for name in loops}
    errors = {}
    for name, server in servers.items():
        if server.wait_ready() is None:
            errors[name] = server.error
            progress(f"  {point:<26} {name:<10} server: {server.error}")
    for rep in range(args.repeat):
        for name in rotated(loops, rep):
            if name in errors:
                continue
            server = servers[name]
            result, error = run_client(
                [
                    command,
                    "--port",
                    server.port,
                    "--size",
                    size,
                    "--conns",
                    conns,
                    "--duration",
                    args.duration,
                    "--warmup",
                    args.warmup,
                    "--server-pid",
                    server.info["pid"],
                    *client_extra,
                ],
                timeout=per_run + 30,
            )
            if error:
                errors[name] = error
                progress(f"  {point:<26} {name:<10} #{rep + 1}: {error}")
                continue
            samples[name].append(result)
            lost = f"  lost {result['lost']}" if result.get("lost") else ""
            progress(
                f"  {point:<26} {name:<10} #{rep + 1}: {result['rps']:>9,.0f} req/s"
                f"  p99 {result['p99_ms']:7.3f} ms  cpu client {result['client_cpu']:.0%}"
                f" server {fmt_share(result['server_cpu'])} others {fmt_share(result['other_cpu'])}"
                + lost
            )
    stop_all(servers, point, problems)
    return summarise(samples, errors, target_ratio(size) if target == "tcp" else target)


def summarise(samples, errors, target):
    med = {}
    for name, runs in samples.items():
        if runs and name not in errors:
            med[name] = {
                "rps": statistics.median(r["rps"] for r in runs),
                "p99_ms": statistics.median(r["p99_ms"] for r in runs),
                "client_cpu": max(r["client_cpu"] for r in runs),
                "server_cpu": median_or_none([r["server_cpu"] for r in runs]),
                "other_cpu": median_or_none([r.get("other_cpu") for r in runs]),
                "lost": sum(r.get("lost") or 0 for r in runs),  # udp: datagrams sent again
                # server CPU time per request: the server's efficiency, even where the two
                # processes together saturate the machine and requests/s stop telling loops apart
                "server_us_per_request": median_or_none(
                    [
                        r["server_cpu"] / r["rps"] * 1e6
                        if r.get("server_cpu") and r["rps"]
                        else None
                        for r in runs
                    ]
                ),
            }
    base = med.get("asyncio", {}).get("rps")
    vs_asyncio = {name: m["rps"] / base for name, m in med.items()} if base else {}
    vs_rival, met = None, None
    if CANDIDATE in med and RIVAL in med:
        vs_rival = med[CANDIDATE]["rps"] / med[RIVAL]["rps"]
        met = vs_rival >= target if target else None
    elif CANDIDATE in errors and RIVAL in med:
        met = False if target else None
    ceiling = None  # the C server's requests/s / uvloop's: the most any server reached here
    if C_SERVER in med and RIVAL in med:
        ceiling = med[C_SERVER]["rps"] / med[RIVAL]["rps"]
    return {
        "samples": samples,
        "errors": errors,
        "median": med,
        "vs_asyncio": vs_asyncio,
        "vs_uvloop": vs_rival,
        "ceiling_vs_uvloop": ceiling,
        "target": target,
        "met": met,
    }


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# --- http (wrk) ----------------------------------------------------------------------------


def wrk_version():
    try:
        out = subprocess.run(["wrk", "-v"], check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"wrk\s+(\S+)", out.stdout + out.stderr)
    return match.group(1) if match else "unknown"


def parse_wrk(text):
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    p99 = re.search(r"^\s*99(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\b", text, re.MULTILINE)
    if not rps:
        return None
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}
    result = {"rps": float(rps.group(1))}
    result["p99_ms"] = float(p99.group(1)) * scale[p99.group(2)] if p99 else None
    errors = re.search(r"Socket errors: (.*)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    result["socket_errors"] = errors.group(1).strip() if errors else None
    result["non_2xx"] = int(non2xx.group(1)) if non2xx else 0
    return result


def process_cpu(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(port, conns, args, pid, scheme="http", duration=None):
    duration = args.http_duration if duration is None else duration
    threads = max(1, min(args.wrk_threads, conns))
    cmd = [
        *taskset(CLIENT_CPU),
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(conns),
        "-d",
        f"{duration:g}s",
    ]
    cmd += ["--latency", f"{scheme}://127.0.0.1:{port}/"]
    cpu0, t0 = process_cpu(pid), time.monotonic()
    try:
        out = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=duration + 30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, "timeout: wrk did not finish"
    cpu1, t1 = process_cpu(pid), time.monotonic()
    result = parse_wrk(out.stdout)
    if result is None:
        return None, f"wrk failed (status {out.returncode}): {(out.stdout + out.stderr)[-300:]}"
    if cpu0 is not None and cpu1 is not None:
        result["server_cpu"] = (cpu1 - cpu0) / (t1 - t0)  # includes wrk's start-up: a floor
    if result["non_2xx"] or (result["socket_errors"] and not all_zero(result["socket_errors"])):
        return result, f"wrk: socket errors {result['socket_errors']}, non-2xx {result['non_2xx']}"
    return result, None


def all_zero(socket_errors):
    return all(int(n) == 0 for n in re.findall(r"\d+", socket_errors))


def measure_http(conns, loops, args, problems, kind="http", server_extra=()):
    """``kind``: ``http``, or ``https`` (the same server over TLS, ``wrk https://...``)."""
    duration = args.https_duration if kind == "https" else args.http_duration
    lifetime = 30 + args.http_repeat * len(loops) * (duration + 10)
    point = f"{kind} x{conns}"
    servers = {name: Server(name, kind, lifetime, extra=server_extra) for name in loops}
    samples = {name: [] for name in loops}
    errors = {}
    for name, server in servers.items():
        if server.wait_ready() is None:
            errors[name] = server.error
    for rep in range(args.http_repeat):
        for name in rotated(loops, rep):
            if name in errors:
                continue
            result, error = run_wrk(
                servers[name].port,
                conns,
                args,
                servers[name].info["pid"],
                scheme="https" if kind == "https" else "http",
                duration=duration,
            )
            if error:
                errors[name] = error
                progress(f"  {point:<26} {name:<10} #{rep + 1}: {error}")
                continue
            samples[name].append(result)
            p99 = f"{result['p99_ms']:7.3f} ms" if result["p99_ms"] is not None else "-"
            progress(
                f"  {point:<26} {name:<10} #{rep + 1}: {result['rps']:>9,.0f} req/s  p99 {p99}"
                f"  cpu server {fmt_share(result.get('server_cpu'))}"
            )
    stop_all(servers, point, problems)
    for runs in samples.values():
        for r in runs:
            r.setdefault("client_cpu", None)
    summary = summarise_http(samples, errors)
    return summary


def summarise_http(samples, errors):
    med = {}
    for name, runs in samples.items():
        if runs and name not in errors:
            med[name] = {
                "rps": statistics.median(r["rps"] for r in runs),
                "p99_ms": median_or_none([r["p99_ms"] for r in runs]),
                "client_cpu": None,
                "server_cpu": median_or_none([r.get("server_cpu") for r in runs]),
            }
    base = med.get("asyncio", {}).get("rps")
    vs_asyncio = {name: m["rps"] / base for name, m in med.items()} if base else {}
    vs = med[CANDIDATE]["rps"] / med[RIVAL]["rps"] if CANDIDATE in med and RIVAL in med else None
    return {
        "samples": samples,
        "errors": errors,
        "median": med,
        "vs_asyncio": vs_asyncio,
        "vs_uvloop": vs,
        "target": None,
        "met": None,
    }


# --- memory --------------------------------------------------------------------------------


def idle_connection_count(wanted):
    """As many idle connections as both processes' RLIMIT_NOFILE allow (after raising the soft
    limit to the hard one), up to ``wanted``; the reason when it is fewer."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard = hard if hard != resource.RLIM_INFINITY else 1 << 20
    usable = hard - 64  # the interpreter, the loop's own fds, the listening socket, pipes
    if usable >= wanted:
        return wanted, None
    return usable, f"RLIMIT_NOFILE hard limit is {hard}: {usable} connections, not {wanted}"


def measure_memory(mode, count, loops, args, problems):
    samples = {name: [] for name in loops}
    errors = {}
    point = f"memory {mode} {count:,} idle"
    for rep in range(memory_repeat(args)):
        for name in rotated(loops, rep):
            if name in errors:
                continue
            result, error = memory_run(name, mode, count, problems, point)
            if error:
                errors[name] = error
                progress(f"  {point:<26} {name:<10} #{rep + 1}: {error}")
                continue
            samples[name].append(result)
            progress(
                f"  {point:<26} {name:<10} #{rep + 1}: {result['kib_per_conn']:.2f} KiB/conn"
                f"  (baseline {result['baseline_rss_kib'] / 1024:.1f} MiB,"
                f" peak {result['peak_rss_kib'] / 1024:.1f} MiB, client connected in"
                f" {result['connect_seconds']:.1f} s)"
            )
    med = {
        name: statistics.median(r["kib_per_conn"] for r in runs)
        for name, runs in samples.items()
        if runs and name not in errors
    }
    met = None
    if CANDIDATE in med and RIVAL in med:
        met = med[CANDIDATE] <= med[RIVAL]
    elif CANDIDATE in errors and RIVAL in med:
        met = False
    return {"count": count, "samples": samples, "errors": errors, "median": med, "met": met}


def memory_repeat(args):
    """Memory barely varies between runs: at most 3 of them."""
    return min(args.repeat, 3)


def memory_run(name, mode, count, problems, point):
    server = Server(name, mode, lifetime=120, expect=count)
    client = None
    try:
        if server.wait_ready() is None:
            return None, server.error
        client = subprocess.Popen(
            [sys.executable, str(CLIENT), "idle", "--port", str(server.port)]
            + ["--count", str(count), "--timeout", "90", *pin_args(CLIENT_CPU)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        connected = json.loads(client.stdout.readline() or "null")
        if connected is None:
            return None, "the idle client failed: " + client.stderr.read()[-300:]
        if connected.get("error"):
            return None, f"client connected {connected['connected']}: {connected['error']}"
        report = server.read_json(timeout=70)
        if report is None:
            return None, server.error
        if report["connections"] < count:
            return None, f"the server saw {report['connections']} of {count} connections"
        peak = report["peak_rss_kib"] if report["peak_reset"] else report["rss_kib"]
        report["kib_per_conn"] = (peak - report["baseline_rss_kib"]) / count
        report["connect_seconds"] = connected["seconds"]
        return report, None
    finally:
        if client is not None:
            client.stdin.close()
            try:
                client.wait(15)
            except subprocess.TimeoutExpired:
                client.kill()
                client.wait()
            client.stdout.close()
            client.stderr.close()
        for problem in server.stop():
            problems.append(f"{name} server, {point}: {problem}")


# --- formatting ----------------------------------------------------------------------------


def size_label(size):
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"


def fmt_share(value):
    return "-" if value is None else f"{value:.0%}"


def fmt_rps(value):
    if value >= 10_000:
        return f"{value / 1000:.1f}k"
    return f"{value:,.0f}"


def fmt_met(met):
    return {True: "met", False: "**not met**", None: "n/a"}[met]


def fmt_ceiling(value, target):
    """The C server's ratio to uvloop; flagged where even it is below the row's target."""
    if value is None:
        return "n/a"
    below = target is not None and value < target
    return fmt_ratio(value) + (" (below target)" if below else "")


def cell(summary, name, unavailable):
    if name in unavailable:
        return "missing" if unavailable[name].startswith("missing") else "error"
    if name in summary["errors"]:
        error = summary["errors"][name]
        if error.startswith("unsupported"):
            return "unsupported"
        return "timeout" if "timeout" in error else "error"
    m = summary["median"].get(name)
    if m is None:
        return "-"
    p99 = "-" if m["p99_ms"] is None else f"{m['p99_ms']:.2f}"
    return f"{fmt_rps(m['rps'])} / {p99}"


def table(rows, loops, unavailable, first_cols, with_target=True, target_column=True, lost=False):
    """rows: [(first column cells, summary)]. Cells: 'req/s / p99 ms'. ``with_target``: the
    closed-loop client's columns (target, server CPU per request, client and others' CPU);
    ``target_column=False`` leaves the target out; ``lost``: a column of datagrams lost (udp)."""
    others = [n for n in loops if n not in ("asyncio", C_SERVER)]
    head = [*first_cols, *loops, *(f"{n} vs asyncio" for n in others)]
    compare = CANDIDATE in loops and RIVAL in loops
    ceiling = C_SERVER in loops and RIVAL in loops
    if compare:
        head.append("ferroloop vs uvloop")
    if ceiling:
        head.append("ceiling vs uvloop")
    if compare and with_target and target_column:
        head.append("target")
    per_request = [RIVAL, CANDIDATE, *([C_SERVER] if ceiling else [])]
    if with_target and compare:
        head.append("server CPU µs/req: " + " / ".join(per_request))
    head.append("client CPU / others" if with_target else "server CPU (ferroloop)")
    if lost:
        head.append("lost: " + " / ".join(loops))
    lines = ["| " + " | ".join(head) + " |"]
    lines.append(
        "| "
        + " | ".join(["---"] * len(first_cols) + ["---:"] * (len(head) - len(first_cols)))
        + " |"
    )
    for cols, s in rows:
        cells = [*cols, *(cell(s, n, unavailable) for n in loops)]
        cells += [fmt_ratio(s["vs_asyncio"].get(n)) for n in others]
        if compare:
            cells.append(fmt_ratio(s["vs_uvloop"]))
        if ceiling:
            cells.append(fmt_ceiling(s.get("ceiling_vs_uvloop"), s.get("target")))
        if compare and with_target and target_column:
            goal = f"≥ {s['target']:.1f}x" if s["target"] else ""
            cells.append(f"{fmt_met(s['met'])} ({goal})" if s["target"] else "n/a")
        if with_target and compare:
            per = [s["median"].get(n, {}).get("server_us_per_request") for n in per_request]
            cells.append(" / ".join("-" if v is None else f"{v:.1f}" for v in per))
        if with_target:
            # the client-bound flag and "others" come from the Python loops' runs: the C server
            # is the ceiling reference, its own row may well be client-bound
            loop_runs = {n: m for n, m in s["median"].items() if n != C_SERVER}
            shares = [m["client_cpu"] for m in loop_runs.values() if m["client_cpu"]]
            top = max(shares) if shares else None
            flag = " (client-bound?)" if top is not None and top > CLIENT_BOUND else ""
            others_cpu = median_or_none([m.get("other_cpu") for m in loop_runs.values()])
            cells.append(f"{fmt_share(top)}{flag} / {fmt_share(others_cpu)}")
        else:
            cells.append(fmt_share(s["median"].get(CANDIDATE, {}).get("server_cpu")))
        if lost:
            counts = [s["median"].get(n, {}).get("lost") for n in loops]
            cells.append(" / ".join("-" if c is None else str(c) for c in counts))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_table(summaries, loops, unavailable):
    head = ["server", "connections", *(f"{n} (KiB/conn)" for n in loops)]
    compare = CANDIDATE in loops and RIVAL in loops
    if compare:
        head += ["ferroloop vs uvloop", "target"]
    lines = [
        "| " + " | ".join(head) + " |",
        "| --- | " + " | ".join(["---:"] * (len(head) - 1)) + " |",
    ]
    for mode, s in summaries.items():
        cells = [mode, f"{s['count']:,}"]
        for n in loops:
            if n in unavailable:
                cells.append("missing")
            elif n in s["errors"]:
                cells.append("error")
            elif n in s["median"]:
                cells.append(f"{s['median'][n]:.2f}")
            else:
                cells.append("-")
        if compare:
            f, u = s["median"].get(CANDIDATE), s["median"].get(RIVAL)
            cells.append(f"{f / u:.2f}x the memory" if f is not None and u else "n/a")
            cells.append(fmt_met(s["met"]) + " (≤ uvloop)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(report, loops, unavailable):
    m = report["machine"]
    pkgs = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    if report.get("wrk"):
        pkgs += f", wrk {report['wrk']}"
    quick = (
        " (`--quick`: a smoke run of a few points, not a measurement)" if report["quick"] else ""
    )
    a = report["args"]
    out = [
        f"Run: {m['date']}{quick}",
        "",
        f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB memory, {m['os']}",
        f"- Python: {m['python']}",
        f"- Packages: {pkgs}",
        (
            f"- Load average (1, 5, 15 min) at start {m['load_average']}, at end "
            f"{report['load_average_end']}. **The machine is shared and noisy**: other work "
            "(test suites) ran at the same time on its 2 CPUs, and client and server share them "
            "too; read the ratios, not the absolute numbers, and expect 10-20 % jitter."
        ),
        (
            f"- Echo: median of {a['repeat']} runs per point, loops interleaved; each run "
            f"{a['warmup']:g} s warm-up + {a['duration']:g} s measured; a fresh server process "
            "per loop and point. Cells: requests/s / p99 latency in ms. Ratios: requests/s of "
            "the loop / requests/s of the baseline (higher is better). `client CPU`: the "
            "client's highest CPU share over the measured windows of the row (near 100 %: the "
            "client may have limited the row); `others`: the median CPU used by every other "
            "process on the machine during the windows (of 200 % for 2 CPUs): the noise. "
            "`server CPU µs/req`: the server process's CPU time (user + system) per request, "
            "median of the runs (lower is better): where client and server together keep both "
            "CPUs busy (client CPU near 100 %), requests/s are the machine's limit and this "
            "column is the one that still compares the loops; most of it is the kernel's "
            "loopback TCP work, the same for every loop. "
            + ("Client and server pinned to different CPUs." if a["pin"] else "Not pinned.")
        ),
        f"- Echo client: {client_text(report)}.",
        *([f"- {ceiling_text(report)}"] if C_SERVER in loops else []),
        "",
    ]
    for mode, rows in report["echo"].items():
        out += [f"#### Echo, {MODES[mode]}", ""]
        items = [((size_label(s["size"]), str(s["conns"])), s) for s in rows]
        out += [table(items, loops, unavailable, ["size", "conns"]), ""]
    echo_met = [s["met"] for rows in report["echo"].values() for s in rows if s["met"] is not None]
    if report["http"]:
        out += [
            "#### HTTP/1.1 keep-alive on `asyncio.Protocol`, loaded with wrk",
            "",
            (
                f"`wrk -t {a['wrk_threads']} -c N -d {a['http_duration']:g}s --latency` "
                "(threads: at most N), a fixed 13-byte response; median of "
                f"{a.get('http_repeat', a['repeat'])} runs. Cells: requests/s / p99 latency in ms. "
                "No target is set for this row; `server CPU`: ferroloop's server's CPU share "
                "during the wrk run."
            ),
            "",
        ]
        items = [((str(s["conns"]),), s) for s in report["http"]]
        out += [table(items, python_only(loops), unavailable, ["conns"], with_target=False), ""]
    elif report.get("http_skipped"):
        out += ["#### HTTP/1.1 keep-alive", "", f"Not run: {report['http_skipped']}", ""]
    if report["memory"]:
        first = next(iter(report["memory"].values()))
        out += [
            f"#### Memory: {first['count']:,} idle connections",
            "",
            (
                "The server's peak RSS (VmHWM, reset to the current RSS just before the client "
                "connects) minus its RSS when listening with no connection, divided by the "
                f"number of connections (median of {min(a['repeat'], 3)} runs; lower is "
                "better). The client opens the connections and sends nothing."
            ),
            "",
            memory_table(report["memory"], python_only(loops), unavailable),
            "",
        ]
        if report.get("memory_note"):
            out += [f"Note: {report['memory_note']}", ""]
    mem_met = [s["met"] for s in report["memory"].values() if s["met"] is not None]
    if echo_met or mem_met:
        out.append(
            f"Target (ferroloop ≥ 1.2x uvloop's requests/s at 1 and 10 KiB, ≥ 1.0x at 100 KiB, "
            f"no more memory per idle connection): echo met on {sum(echo_met)} of "
            f"{len(echo_met)} rows; memory met on {sum(mem_met)} of {len(mem_met)}."
            + ceiling_count([s for rows in report["echo"].values() for s in rows], loops)
        )
        out.append("")
    problems = [f"- {name}: {why}" for name, why in unavailable.items()]
    problems += [f"- {p}" for p in report["problems"]]
    if problems:
        out += ["Problems seen during the run:", "", *problems, ""]
    return "\n".join(out)


def client_text(report):
    """Which echo client made the rows (runs before the C client have no "client" key)."""
    return report.get("client") or "net_client.py (Python, one select.epoll)"


def ceiling_text(report):
    versions = report.get("loops") or {}
    built = f", built with {versions[C_SERVER]} -O2" if C_SERVER in versions else ""
    return (
        f"`{C_SERVER}`: the ceiling reference, a plain C epoll echo server "
        f"([echo_server.c](echo_server.c){built}: no Python, the same echo behaviour as the "
        "`protocol` server, over OpenSSL in the TLS rows), run like the loops; `ceiling vs "
        "uvloop`: its requests/s / uvloop's, the most any server reached on this machine for "
        "the row: where it is below the row's target (flagged), no Python event loop can meet "
        "the target here."
    )


def ceiling_count(rows, loops):
    """The target line's note on the C ceiling: on how many rows even it was below target."""
    if C_SERVER not in loops:
        return ""
    known = [s for s in rows if s.get("ceiling_vs_uvloop") is not None and s.get("target")]
    if not known:
        return ""
    below = sum(s["ceiling_vs_uvloop"] < s["target"] for s in known)
    return (
        f" The C ceiling (`{C_SERVER}`) was below the target on {below} of {len(known)} rows: "
        "no Python loop can be expected to meet the target there on this machine."
    )


def sub_run_line(report, part):
    """The first lines of a sub-block: when and how its part ran (sub-blocks are written, and
    kept, on their own, so each says which run it comes from)."""
    m, a = report["machine"], report["args"]
    quick = (
        " (`--quick`: a smoke run of a few points, not a measurement)" if report["quick"] else ""
    )
    pkgs = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    if part == "https" and report.get("wrk"):
        pkgs += f", wrk {report['wrk']}"
    if part in ("tls", "https"):
        pkgs += f"; {report.get('openssl', ssl.OPENSSL_VERSION)}"
    pin = "client and server pinned to different CPUs" if a["pin"] else "not pinned"
    return [
        (
            f"Run: {m['date']}{quick}. {m['nproc']} CPUs ({m['cpu']}), {m['os']}; "
            f"{m['python']}; {pkgs}. Load average (1, 5, 15 min) at start "
            f"{m['load_average']}, at end {report.get('load_average_end') or load_average()}; {pin}."
        ),
    ]


def closed_loop_method(report, runs_what):
    a = report["args"]
    return (
        f"Median of {a['repeat']} runs per point, loops interleaved (rotated order each round); "
        f"each run {a['warmup']:g} s warm-up + {a['duration']:g} s measured; a fresh server "
        f"process per loop and point; {runs_what}. Cells: requests/s / p99 latency in ms; "
        "ratios: requests/s of the loop / of the baseline (higher is better); `server CPU "
        "µs/req`, `client CPU` (highest of the row) and `others` (median CPU of every other "
        "process, of 200 %) as in the echo tables above."
    )


def tls_block(report, loops, unavailable):
    rows = report.get("tls") or []
    out = [
        "#### TLS echo: the `protocol` echo server with `loop.create_server(..., ssl=context)`",
        "",
        *sub_run_line(report, "tls"),
        "",
        closed_loop_method(
            report,
            "server context `ssl.create_default_context(Purpose.CLIENT_AUTH)` with a "
            "certificate for localhost/127.0.0.1 from a CA made at run time (trustme); client: "
            + (
                "the C echo client over OpenSSL (non-blocking connections trusting that CA, "
                "host name verified, handshakes done before the clock starts)"
                if report.get("client_native")
                else "the Python epoll echo client over the stdlib `ssl` module (non-blocking "
                "`SSLSocket`s trusting that CA, handshakes done before the clock starts)"
            )
            + f", {client_text(report)}"
            + (f"; negotiated: {report['tls_negotiated']}" if report.get("tls_negotiated") else ""),
        ),
        "",
        *([ceiling_text(report), ""] if C_SERVER in loops else []),
    ]
    items = [((size_label(s["size"]), str(s["conns"])), s) for s in rows]
    out += [table(items, loops, unavailable, ["size", "conns"]), ""]
    met = [s["met"] for s in rows if s["met"] is not None]
    if met:
        out += [
            (
                "Target (issue 4: ferroloop at least as fast as uvloop on every TLS row): met on "
                f"{sum(met)} of {len(met)} rows." + ceiling_count(rows, loops)
            ),
            "",
        ]
    return out + problems_lines(report, "tls", loops, unavailable)


def https_block(report, loops, unavailable):
    a = report["args"]
    out = [
        "#### HTTPS keep-alive: the HTTP server with `ssl=`, loaded with wrk",
        "",
        *sub_run_line(report, "https"),
        "",
    ]
    if report.get("https_skipped"):
        return out + [f"Not run: {report['https_skipped']}", ""]
    out += [
        (
            f"`wrk -t {a['wrk_threads']} -c N -d {a['https_duration']:g}s --latency "
            "https://127.0.0.1:PORT/` (threads: at most N; wrk's handshakes are inside its "
            f"timed run), the same server and certificate as the TLS echo rows; median of "
            f"{a['http_repeat']} runs, loops interleaved. Cells: requests/s / p99 latency in "
            "ms. No target is set for this row; `server CPU`: ferroloop's server's CPU share "
            "during the wrk run."
        ),
        "",
    ]
    items = [((str(s["conns"]),), s) for s in report.get("https") or []]
    out += [table(items, python_only(loops), unavailable, ["conns"], with_target=False), ""]
    return out + problems_lines(report, "https", loops, unavailable)


def udp_block(report, loops, unavailable):
    rows = report.get("udp") or []
    out = [
        (
            "#### UDP echo: `loop.create_datagram_endpoint` with an `asyncio.DatagramProtocol` "
            "(`transport.sendto` in `datagram_received`)"
        ),
        "",
        *sub_run_line(report, "udp"),
        "",
        closed_loop_method(
            report,
            "client: `net_client.py udp` (Python), `conns` connected UDP sockets on one epoll, "
            "one datagram in flight per socket, an echo that does not come back within 0.2 s is "
            "counted lost "
            "and the datagram sent again; the server's `SO_RCVBUF` is 1 MiB for every loop (the "
            "208 KiB default drops datagrams at 10 KiB x 10 whatever the loop)",
        ),
        "",
    ]
    items = [((size_label(s["size"]), str(s["conns"])), s) for s in rows]
    out += [
        table(
            items,
            python_only(loops),
            unavailable,
            ["size", "conns"],
            target_column=False,
            lost=True,
        )
    ]
    out += [
        "",
        "`lost`: datagrams counted lost over all the runs of the row, per loop. No target: UDP.",
        "",
    ]
    return out + problems_lines(report, "udp", loops, unavailable)


def problems_lines(report, part, loops, unavailable):
    notes = [
        f"- {name}: not supported: starting the server raised {why.rstrip(': ')}."
        for name, why in report.get("unsupported", {}).get(part, {}).items()
    ]
    notes = ["Notes:", "", *notes, ""] if notes else []
    problems = [f"- {name}: {why}" for name, why in unavailable.items() if name in loops]
    problems += [f"- {p}" for p in report.get("part_problems", {}).get(part, [])]
    return notes + (["Problems seen during the run:", "", *problems, ""] if problems else [])


def note_errors(report, part, what, summary):
    """A loop that cannot start this server is a note of the part (once); anything else is a
    problem of the run."""
    for name, error in summary["errors"].items():
        if error.startswith("unsupported"):
            why = error[len("unsupported") :].strip(" ()") or "unsupported"
            report.setdefault("unsupported", {}).setdefault(part, {}).setdefault(name, why)
        else:
            report["part_problems"][part].append(f"{name} on {what}: {error}")


SUB_BLOCKS = {"tls": tls_block, "https": https_block, "udp": udp_block}


def sub_markers(part):
    return f"<!-- net:{part}:start -->", f"<!-- net:{part}:end -->"


def split_section(section):
    """An existing net section: (its main block, {part: sub-block})."""
    blocks = {}
    for part in SUB_PARTS:
        start, end = sub_markers(part)
        if start in section and end in section:
            head, rest = section.split(start, 1)
            body, tail = rest.split(end, 1)
            blocks[part] = body.strip("\n")
            section = head.rstrip("\n") + "\n\n" + tail.lstrip("\n")
    return section.strip("\n"), blocks


def write_readme(main_block, sub_blocks):
    """Rewrite the net section: ``main_block`` (the echo/HTTP/memory tables) replaces the one
    there, or None keeps it; ``sub_blocks`` ({part: text}) replace those parts' sub-blocks and
    every other sub-block already there is kept."""
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    old_main, old_subs = "", {}
    if START in text and END in text:
        head, rest = text.split(START, 1)
        old_main, old_subs = split_section(rest.split(END, 1)[0])
    main_block = old_main if main_block is None else main_block.strip("\n")
    subs = {**old_subs, **{p: b.strip("\n") for p, b in sub_blocks.items()}}
    pieces = [main_block] if main_block else []
    for part in SUB_PARTS:
        if part in subs:
            start, end = sub_markers(part)
            pieces.append(f"{start}\n{subs[part]}\n\n{end}")
    block = f"{START}\n" + "\n\n".join(pieces) + f"\n\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Network results\n\n" + block + "\n"
    README.write_text(text)


def write_report(report, loops, unavailable, parts):
    main_block = markdown(report, loops, unavailable) if set(parts) & set(TCP_PARTS) else None
    subs = {
        p: "\n".join(SUB_BLOCKS[p](report, loops, unavailable)) for p in SUB_PARTS if p in parts
    }
    write_readme(main_block, subs)


def make_certificates(directory):
    """A throw-away CA and a certificate for localhost / 127.0.0.1 (trustme, or None if it is
    not installed): (certfile, keyfile, cafile)."""
    try:
        import trustme
    except ImportError:
        return None
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    d = Path(directory)
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    for i, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(d / "cert.pem"), append=i > 0)
    return str(d / "cert.pem"), str(d / "key.pem"), str(d / "ca.pem")


# --- main ----------------------------------------------------------------------------------


def run_sub_parts(report, parts, runnable, args, certs, tls_points, udp_points, loops, unavailable):
    """The tls, https and udp parts (each adds to report[part] and report["part_problems"])."""
    tls_sizes, tls_concs, https_conns = tls_points
    server_tls = ["--certfile", certs[0], "--keyfile", certs[1]] if certs else []
    if "tls" in parts and certs:
        problems = report["part_problems"]["tls"]
        for size in tls_sizes:
            for conns in tls_concs:
                s = measure_echo(
                    "tls",
                    size,
                    conns,
                    runnable,
                    args,
                    problems,
                    client_extra=["--tls", certs[2]],
                    server_extra=server_tls,
                    target=TLS_TARGET,
                )
                s.update(size=size, conns=conns)
                report["tls"].append(s)
                note_errors(report, "tls", f"tls {size_label(size)} x{conns}", s)
                for runs in s["samples"].values():
                    if runs and runs[0].get("tls"):
                        report["tls_negotiated"] = runs[0]["tls"]
        print("\n" + "\n".join(tls_block(report, loops, unavailable)), flush=True)
    if "https" in parts and certs:
        version = wrk_version() if shutil.which("wrk") else None
        if version is None:
            report["https_skipped"] = "wrk is not installed (apt-get install -y wrk)"
        else:
            report["wrk"] = version
            problems = report["part_problems"]["https"]
            for conns in https_conns:
                s = measure_http(conns, python_only(runnable), args, problems, "https", server_tls)
                s["conns"] = conns
                report["https"].append(s)
                note_errors(report, "https", f"https x{conns}", s)
        print("\n" + "\n".join(https_block(report, loops, unavailable)), flush=True)
    if "udp" in parts:
        udp_sizes, udp_concs = udp_points
        problems = report["part_problems"]["udp"]
        for size in udp_sizes:
            for conns in udp_concs:
                s = measure_echo(
                    "udp",
                    size,
                    conns,
                    python_only(runnable),
                    args,
                    problems,
                    command="udp",
                    target=None,
                )
                s.update(size=size, conns=conns)
                report["udp"].append(s)
                note_errors(report, "udp", f"udp {size_label(size)} x{conns}", s)
        print("\n" + "\n".join(udp_block(report, loops, unavailable)), flush=True)


def parse_sizes(value):
    sizes = []
    for item in value.split(","):
        item = item.strip().lower()
        if not item:
            continue
        if item in SIZES:
            sizes.append(SIZES[item])
        elif item.isdigit():
            sizes.append(int(item))
        else:
            raise SystemExit(f"unknown size {item!r} (1k, 10k, 100k or a number of bytes)")
    return sizes


def parse_ints(value):
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"not a list of integers: {value!r}") from None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--loops",
        default=",".join(ALL_LOOPS),
        help=f"comma-separated subset ({C_SERVER}: the C ceiling server, echo and tls parts)",
    )
    parser.add_argument(
        "--client",
        choices=("auto", "c", "python"),
        default="auto",
        help="echo client: the C one (echo_client.c, compiled at run time), net_client.py, "
        "or auto: C if it compiles",
    )
    parser.add_argument("--parts", default=",".join(PARTS), help="echo,http,memory,tls,https,udp")
    parser.add_argument("--modes", default=",".join(MODES), help="echo modes: sock,streams,...")
    parser.add_argument("--sizes", default=",".join(SIZES), help="1k,10k,100k or bytes")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    parser.add_argument("--http-conns", default=",".join(map(str, HTTP_CONNS)))
    parser.add_argument("--memory-modes", default="protocol", help="server kinds for memory")
    parser.add_argument("--idle", type=int, default=10_000, help="idle connections (memory)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per point (median)")
    parser.add_argument("--duration", type=float, default=0.6, help="echo: measured seconds")
    parser.add_argument("--warmup", type=float, default=0.2, help="echo: warm-up seconds")
    parser.add_argument("--http-duration", type=float, default=3.0, help="wrk -d (seconds)")
    parser.add_argument("--http-repeat", type=int, default=3, help="wrk runs per point")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk -t (at most -c)")
    parser.add_argument("--tls-sizes", default=",".join(TLS_SIZES), help="tls: 1k,10k")
    parser.add_argument("--tls-concurrency", default=",".join(map(str, TLS_CONCURRENCY)))
    parser.add_argument("--https-conns", default=",".join(map(str, HTTP_CONNS)))
    parser.add_argument("--https-duration", type=float, default=2.0, help="wrk -d for https")
    parser.add_argument("--udp-sizes", default=",".join(UDP_SIZES), help="udp: 1k,10k")
    parser.add_argument("--udp-concurrency", default=",".join(map(str, UDP_CONCURRENCY)))
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few points")
    parser.add_argument("--pin", action="store_true", help="client and server on different CPUs")
    parser.add_argument("--write", action="store_true", help="update README.md's net section")
    parser.add_argument("--json", type=Path, help="write every sample to this file")
    parser.add_argument("--from-json", type=Path, help="no run: rebuild the tables from --json")
    args = parser.parse_args()
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        report.setdefault("echo", {})
        for rows in report["echo"].values():  # recompute: the summary may have grown columns
            for row in rows:
                row.update(summarise(row["samples"], row["errors"], target_ratio(row["size"])))
        for row in report.get("tls") or []:
            row.update(summarise(row["samples"], row["errors"], TLS_TARGET))
        for row in report.get("udp") or []:
            row.update(summarise(row["samples"], row["errors"], None))
        loops = pick(report["args"]["loops"], ALL_LOOPS, "loops")
        parts = pick(report["args"]["parts"], PARTS, "parts")
        if set(parts) & set(TCP_PARTS):
            print(markdown(report, loops, report["unavailable"]))
        for part in SUB_PARTS:
            if part in parts:
                print("\n".join(SUB_BLOCKS[part](report, loops, report["unavailable"])))
        if args.write:
            write_report(report, loops, report["unavailable"], parts)
            progress(f"results written to {README}")
        return 0
    loops = pick(args.loops, ALL_LOOPS, "loops")
    parts = pick(args.parts, PARTS, "parts")
    modes = pick(args.modes, MODES, "modes")
    memory_modes = pick(args.memory_modes, MODES, "memory modes")
    sizes, concs = parse_sizes(args.sizes), parse_ints(args.concurrency)
    http_conns = parse_ints(args.http_conns)
    tls_sizes, tls_concs = parse_sizes(args.tls_sizes), parse_ints(args.tls_concurrency)
    https_conns = parse_ints(args.https_conns)
    udp_sizes, udp_concs = parse_sizes(args.udp_sizes), parse_ints(args.udp_concurrency)
    if args.quick:
        given = set(re.findall(r"--([\w-]+)", " ".join(sys.argv[1:])))
        tls_sizes = tls_sizes if "tls-sizes" in given else [SIZES["1k"], SIZES["10k"]]
        tls_concs = tls_concs if "tls-concurrency" in given else [10]
        https_conns = https_conns if "https-conns" in given else [64]
        args.https_duration = args.https_duration if "https-duration" in given else 1.0
        udp_sizes = udp_sizes if "udp-sizes" in given else [SIZES["1k"], SIZES["10k"]]
        udp_concs = udp_concs if "udp-concurrency" in given else [10]
        sizes = sizes if "sizes" in given else [SIZES["1k"], SIZES["100k"]]
        concs = concs if "concurrency" in given else [10]
        http_conns = http_conns if "http-conns" in given else [64]
        args.idle = args.idle if "idle" in given else 1000
        args.repeat = args.repeat if "repeat" in given else 1
        args.http_repeat = args.http_repeat if "http-repeat" in given else 1
        args.duration = args.duration if "duration" in given else 0.5
        args.http_duration = args.http_duration if "http-duration" in given else 1.0
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.pin:
        use_pinning()

    machine = machine_info()
    progress(f"{machine['date']}: {machine['python']}, {machine['nproc']} CPUs ({machine['cpu']})")
    versions, unavailable, _ = probe_loops(python_only(loops), 60)
    client_note = setup_native(args.client, loops, versions, unavailable)
    progress(f"echo client: {client_note}")
    for name, why in unavailable.items():
        progress(f"{name}: not run: {why}")
    runnable = [name for name in loops if name in versions]
    report = {
        "machine": machine,
        "quick": args.quick,
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "loops": versions,
        "unavailable": unavailable,
        "echo": {},
        "http": [],
        "memory": {},
        "problems": [],
        "tls": [],
        "https": [],
        "udp": [],
        "part_problems": {part: [] for part in SUB_PARTS},
        "openssl": ssl.OPENSSL_VERSION,
        "client": client_note,
        "client_native": bool(NATIVE.get("client")),
    }
    started = time.monotonic()
    certs_dir = tempfile.TemporaryDirectory(prefix="ferroloop-net-")
    certs = None
    if {"tls", "https"} & set(parts):
        certs = make_certificates(certs_dir.name)
        if certs is None:
            progress("trustme is not installed: the tls and https parts are skipped")

    if "echo" in parts:
        for mode in modes:
            rows = report["echo"].setdefault(mode, [])
            for size in sizes:
                for conns in concs:
                    s = measure_echo(mode, size, conns, runnable, args, report["problems"])
                    s.update(size=size, conns=conns)
                    rows.append(s)
                    report["problems"] += [
                        f"{n} on echo {mode} {size_label(size)} x{conns}: {e}"
                        for n, e in s["errors"].items()
                    ]
            items = [((size_label(s["size"]), str(s["conns"])), s) for s in rows]
            print(f"\necho, {MODES[mode]}")
            print(table(items, loops, unavailable, ["size", "conns"]) + "\n", flush=True)

    if "http" in parts:
        version = wrk_version() if shutil.which("wrk") else None
        if version is None:
            report["http_skipped"] = (
                "wrk is not installed (apt-get install -y wrk); the HTTP rows were skipped"
            )
            progress(report["http_skipped"])
        else:
            report["wrk"] = version
            for conns in http_conns:
                s = measure_http(conns, python_only(runnable), args, report["problems"])
                s["conns"] = conns
                report["http"].append(s)
                report["problems"] += [f"{n} on http x{conns}: {e}" for n, e in s["errors"].items()]
            items = [((str(s["conns"]),), s) for s in report["http"]]
            print("\nhttp (wrk)")
            print(
                table(items, python_only(loops), unavailable, ["conns"], with_target=False) + "\n"
            )

    if "memory" in parts:
        count, note = idle_connection_count(args.idle)
        report["memory_note"] = note
        if note:
            progress(note)
        for mode in memory_modes:
            s = measure_memory(mode, count, python_only(runnable), args, report["problems"])
            report["memory"][mode] = s
            report["problems"] += [f"{n} on memory ({mode}): {e}" for n, e in s["errors"].items()]
        print("\nmemory")
        print(memory_table(report["memory"], python_only(loops), unavailable) + "\n")

    run_sub_parts(
        report,
        parts,
        runnable,
        args,
        certs,
        (tls_sizes, tls_concs, https_conns),
        (udp_sizes, udp_concs),
        loops,
        unavailable,
    )
    certs_dir.cleanup()

    report["load_average_end"] = load_average()
    report["seconds"] = time.monotonic() - started
    progress(f"took {report['seconds']:.0f} s")
    part_problems = [p for part in SUB_PARTS for p in report["part_problems"][part]]
    for problem in report["problems"] + part_problems:
        print(f"PROBLEM: {problem}")
    if args.write:
        write_report(report, loops, unavailable, parts)
        progress(f"results written to {README}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        progress(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
