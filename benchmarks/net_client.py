"""The one network benchmark client, the same for every loop's server: plain non-blocking
sockets on a single ``select.epoll`` (no event loop at all), so that the client costs as little
CPU per request as Python allows and is the same program whatever loop the server runs.

Usage::

    python benchmarks/net_client.py echo --port P --size BYTES --conns C --duration S
        [--warmup S] [--server-pid PID]
    python benchmarks/net_client.py idle --port P --count N [--timeout S]

``echo``: C connections, each a closed loop: send one message of BYTES bytes, wait until all
BYTES have come back (a request), record the latency, send the next. Requests completed during
the ``--duration`` window after ``--warmup`` count. The first reply on every connection is
checked byte for byte. Prints one JSON line: requests/s, latency percentiles, and the CPU share
of this client and (``--server-pid``) of the server over the window, so a run where the client,
not the server, was the bottleneck can be seen.

``idle``: open N connections, send nothing, print ``{"connected": N}``, and hold them until
stdin reaches end of file or ``--timeout`` passes.
"""

import argparse
import errno
import json
import os
import resource
import select
import socket
import sys
import time

HOST = "127.0.0.1"
READ_SIZE = 256 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def pin(cpu):
    """Run on one CPU (the runner puts client and server on different ones)."""
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def raise_nofile_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def own_cpu():
    t = os.times()
    return t.user + t.system


def process_cpu(pid):
    """CPU seconds (user + system) of another process, from /proc/PID/stat; None if gone."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def machine_busy():
    """CPU seconds all CPUs spent busy so far (/proc/stat: everything but idle and iowait)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / CLK_TCK  # up to steal; guest is in user


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


class Failure(Exception):
    pass


def echo(port, size, conns, duration, warmup, server_pid):
    message = (bytes(range(256)) * (size // 256 + 1))[:size]
    payload = memoryview(message)
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    socks = []
    for _ in range(conns):
        s = socket.create_connection((HOST, port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        socks.append(s)
    top = max(s.fileno() for s in socks) + 1
    sock_of = [None] * top
    sent = [0] * top  # bytes of the current request sent
    got = [0] * top  # bytes of the current reply received
    began = [0.0] * top  # when the current request was sent
    checking = [False] * top  # the first reply on each connection is compared byte for byte
    ep = select.epoll()
    IN, OUT = select.EPOLLIN, select.EPOLLOUT
    perf = time.perf_counter
    latencies = []
    record = latencies.append
    issuing = True
    in_flight = 0
    measuring = False

    def send(fd, s):
        """Send what is left of the current request; True if it is all sent."""
        try:
            n = s.send(payload[sent[fd] :])
        except BlockingIOError:
            n = 0
        sent[fd] += n
        return sent[fd] == size

    now = perf()
    window_start = now + warmup
    window_end = window_start + duration
    for s in socks:
        fd = s.fileno()
        sock_of[fd] = s
        checking[fd] = True
        began[fd] = perf()
        in_flight += 1
        ep.register(fd, IN if send(fd, s) else IN | OUT)

    cpu0 = scpu0 = None
    idle_since = perf()
    while in_flight:
        events = ep.poll(0.5)
        now = perf()
        if not measuring and now >= window_start:
            measuring = True
            count_from = len(latencies)
            cpu0, scpu0, busy0, t0 = own_cpu(), process_cpu(server_pid), machine_busy(), now
        if issuing and now >= window_end:
            issuing = False
            cpu1, scpu1, busy1, t1 = own_cpu(), process_cpu(server_pid), machine_busy(), now
            count_to = len(latencies)
        if not events:
            if now - idle_since > 10:
                raise Failure(f"no progress for 10 s with {in_flight} requests in flight")
            continue
        idle_since = now
        for fd, ev in events:
            s = sock_of[fd]
            if ev & OUT and sent[fd] < size and send(fd, s):
                ep.modify(fd, IN)
            if not ev & (IN | select.EPOLLHUP | select.EPOLLERR):
                continue
            try:
                n = s.recv_into(view, size - got[fd])
            except BlockingIOError:
                continue
            if n == 0:
                raise Failure("the server closed a connection")
            if checking[fd] and buf[:n] != message[got[fd] : got[fd] + n]:
                raise Failure(f"wrong bytes echoed at offset {got[fd]}")
            got[fd] += n
            if got[fd] < size:
                continue
            done = perf()
            record(done - began[fd])
            checking[fd] = False
            if sent[fd] < size:
                raise Failure("the whole reply arrived before the whole request was sent")
            if issuing:
                got[fd] = sent[fd] = 0
                began[fd] = done
                if not send(fd, s):
                    ep.modify(fd, IN | OUT)
            else:
                in_flight -= 1
    if cpu0 is None or issuing:
        raise Failure("the measurement window never started or never ended")
    for s in socks:
        s.close()
    ep.close()
    window = t1 - t0
    sample = sorted(latencies[count_from:count_to])
    requests = len(sample)
    ms = 1000.0
    server_cpu = None if scpu0 is None or scpu1 is None else (scpu1 - scpu0) / window
    other_cpu = None
    if busy0 is not None and busy1 is not None and server_cpu is not None:
        # every other process on the machine (other users' work): how noisy was this window?
        other_cpu = max(0.0, (busy1 - busy0) / window - (cpu1 - cpu0) / window - server_cpu)
    return {
        "requests": requests,
        "seconds": window,
        "rps": requests / window,
        "p50_ms": percentile(sample, 0.50) * ms if sample else None,
        "p99_ms": percentile(sample, 0.99) * ms if sample else None,
        "max_ms": sample[-1] * ms if sample else None,
        "client_cpu": (cpu1 - cpu0) / window,
        "server_cpu": server_cpu,
        "other_cpu": other_cpu,
    }


def idle(port, count, timeout):
    limit = raise_nofile_limit()
    socks = []
    error = None
    started = time.monotonic()
    for i in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect((HOST, port))
        except OSError as exc:
            s.close()
            error = f"connection {i + 1}: {type(exc).__name__}: {exc}"
            break
        socks.append(s)
        if i % 200 == 199:
            time.sleep(0.005)  # let the server's accept loop keep its backlog from overflowing
    emit(
        {
            "connected": len(socks),
            "seconds": time.monotonic() - started,
            "nofile": limit,
            "error": error,
        }
    )
    select.select([sys.stdin], [], [], timeout)  # hold until stdin EOF
    for s in socks:
        s.close()
    return 0 if error is None else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("echo")
    e.add_argument("--port", type=int, required=True)
    e.add_argument("--size", type=int, required=True)
    e.add_argument("--conns", type=int, required=True)
    e.add_argument("--duration", type=float, default=1.0)
    e.add_argument("--warmup", type=float, default=0.25)
    e.add_argument("--server-pid", type=int, default=0)
    i = sub.add_parser("idle")
    i.add_argument("--port", type=int, required=True)
    i.add_argument("--count", type=int, required=True)
    i.add_argument("--timeout", type=float, default=60.0)
    for p in (e, i):
        p.add_argument("--cpu", type=int, help="pin the process to this CPU")
    args = parser.parse_args()
    pin(args.cpu)
    if args.command == "idle":
        return idle(args.port, args.count, args.timeout)
    raise_nofile_limit()
    try:
        result = echo(args.port, args.size, args.conns, args.duration, args.warmup, args.server_pid)
    except (Failure, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            what = f"{type(exc).__name__}: [{errno.errorcode.get(exc.errno, exc.errno)}] {exc}"
        else:
            what = f"{type(exc).__name__}: {exc}"
        emit({"error": what})
        return 1
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
