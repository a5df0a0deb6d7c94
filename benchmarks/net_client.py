"""The Python network benchmark client, the same for every loop's server: plain non-blocking
sockets on a single ``select.epoll`` (no event loop at all), so that the client costs as little
CPU per request as Python allows and is the same program whatever loop the server runs.

``net.py`` drives the echo and TLS rows with ``echo_client.c`` (the same ``echo`` protocol and
output, in C) when it compiles, and falls back to ``echo`` here when it does not; ``udp`` and
``idle`` always run here.

Usage::

    python benchmarks/net_client.py echo --port P --size BYTES --conns C --duration S
        [--warmup S] [--server-pid PID] [--tls CAFILE]
    python benchmarks/net_client.py udp --port P --size BYTES --conns C --duration S
        [--warmup S] [--server-pid PID]
    python benchmarks/net_client.py idle --port P --count N [--timeout S]

``echo``: C connections, each a closed loop: send one message of BYTES bytes, wait until all
BYTES have come back (a request), record the latency, send the next. Requests completed during
the ``--duration`` window after ``--warmup`` count. The first reply on every connection is
checked byte for byte. Prints one JSON line: requests/s, latency percentiles, and the CPU share
of this client and (``--server-pid``) of the server over the window, so a run where the client,
not the server, was the bottleneck can be seen.

``echo --tls CAFILE``: the same over TLS, with the stdlib ``ssl`` module: every connection is
wrapped in an ``SSLSocket`` (a default client context trusting CAFILE, ``server_hostname``
``localhost``), its handshake done blocking before the clock starts, then driven non-blocking on
the same epoll (``SSLWantReadError``/``SSLWantWriteError`` are the would-block cases; a read
drains what the TLS layer already holds, which epoll cannot see). Encryption runs in OpenSSL's
C code, so the client's Python cost per request is about what it is without TLS.

``udp``: C connected UDP sockets, each a closed loop: send one datagram of BYTES bytes (an 8-byte
sequence number, then a fixed pattern), wait for it to come back, send the next. The first reply
on every socket is checked byte for byte, every reply's length and sequence number. A datagram
not answered within 0.2 s counts as lost and is sent again with a new sequence number (a late
echo of the old one is then ignored); the result reports how many were lost.

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
import ssl
import struct
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


def client_context(cafile):
    """A TLS client context that trusts only the runner's throw-away CA."""
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)


def echo(port, size, conns, duration, warmup, server_pid, cafile=None):
    message = (bytes(range(256)) * (size // 256 + 1))[:size]
    payload = memoryview(message)
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    context = client_context(cafile) if cafile else None
    # what "would block" looks like on a plain socket, and on an SSLSocket
    would_block = (BlockingIOError,)
    if context is not None:
        would_block = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
    socks = []
    for _ in range(conns):
        s = socket.create_connection((HOST, port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            s = context.wrap_socket(s, server_hostname="localhost")  # handshake, blocking
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
        except would_block:
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
            while True:
                try:
                    n = s.recv_into(view, size - got[fd])
                except would_block:
                    break
                if n == 0:
                    raise Failure("the server closed a connection")
                if checking[fd] and buf[:n] != message[got[fd] : got[fd] + n]:
                    raise Failure(f"wrong bytes echoed at offset {got[fd]}")
                got[fd] += n
                # TLS: bytes already decrypted inside the SSL object do not wake epoll up
                if got[fd] == size or context is None or not s.pending():
                    break
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
    negotiated = f"{socks[0].version()} {socks[0].cipher()[0]}" if context is not None else None
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
        **({"tls": negotiated} if negotiated else {}),
    }


def udp(port, size, conns, duration, warmup, server_pid):
    if size < 8:
        raise Failure("udp: a datagram carries an 8-byte sequence number: --size at least 8")
    body = (bytes(range(256)) * (size // 256 + 1))[: size - 8]
    pack_seq, unpack_seq = struct.Struct("<Q").pack_into, struct.Struct("<Q").unpack_from
    buf = bytearray(max(READ_SIZE, size + 1))
    view = memoryview(buf)
    socks = []
    for _ in range(conns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((HOST, port))
        s.setblocking(False)
        socks.append(s)
    top = max(s.fileno() for s in socks) + 1
    sock_of = [None] * top
    datagram = [None] * top  # each socket's datagram: its sequence number is rewritten in place
    seq = [0] * top  # sequence number of the datagram in flight
    began = [0.0] * top
    checking = [False] * top
    next_seq = 0
    lost = 0
    ep = select.epoll()
    IN = select.EPOLLIN
    perf = time.perf_counter
    latencies = []
    record = latencies.append
    issuing = True
    in_flight = 0
    measuring = False
    resend_after = 0.2

    def send(fd, s):
        nonlocal next_seq
        next_seq += 1
        seq[fd] = next_seq
        pack_seq(datagram[fd], 0, next_seq)
        try:
            s.send(datagram[fd])
        except BlockingIOError:
            pass  # the socket's send buffer is full: counted as lost by the resend timer
        began[fd] = perf()

    now = perf()
    window_start = now + warmup
    window_end = window_start + duration
    for s in socks:
        fd = s.fileno()
        sock_of[fd] = s
        datagram[fd] = bytearray(8) + body
        checking[fd] = True
        in_flight += 1
        ep.register(fd, IN)
        send(fd, s)

    cpu0 = None
    idle_since = perf()
    last_sweep = perf()
    while in_flight:
        events = ep.poll(0.1)
        now = perf()
        if not measuring and now >= window_start:
            measuring = True
            count_from = len(latencies)
            cpu0, scpu0, busy0, t0 = own_cpu(), process_cpu(server_pid), machine_busy(), now
        if issuing and now >= window_end:
            issuing = False
            cpu1, scpu1, busy1, t1 = own_cpu(), process_cpu(server_pid), machine_busy(), now
            count_to = len(latencies)
        if now - last_sweep > resend_after / 4:
            last_sweep = now
            for s in socks:
                fd = s.fileno()
                if seq[fd] and now - began[fd] > resend_after:
                    lost += 1
                    if issuing:
                        send(fd, s)
                    else:
                        seq[fd] = 0
                        in_flight -= 1
        if not events:
            if now - idle_since > 10:
                raise Failure(f"no echo for 10 s with {in_flight} datagrams in flight")
            continue
        idle_since = now
        for fd, _ in events:
            s = sock_of[fd]
            while True:
                try:
                    n = s.recv_into(view)
                except BlockingIOError:
                    break
                except ConnectionRefusedError:
                    raise Failure("ICMP port unreachable: the server is not listening") from None
                if unpack_seq(buf)[0] != seq[fd] or not seq[fd]:
                    continue  # the late echo of a datagram already counted as lost
                if n != size:
                    raise Failure(f"an echo of {n} bytes for a datagram of {size}")
                if checking[fd] and buf[8:n] != body:
                    raise Failure("wrong bytes echoed")
                done = perf()
                record(done - began[fd])
                checking[fd] = False
                if issuing:
                    send(fd, s)
                else:
                    seq[fd] = 0
                    in_flight -= 1
    if cpu0 is None or issuing:
        raise Failure("the measurement window never started or never ended")
    for s in socks:
        s.close()
    ep.close()
    result = window_result(latencies[count_from:count_to], t1 - t0, cpu1 - cpu0, scpu0, scpu1)
    result["other_cpu"] = other_share(busy0, busy1, t1 - t0, cpu1 - cpu0, result["server_cpu"])
    result["lost"] = lost
    return result


def window_result(latencies, window, client_cpu, scpu0, scpu1):
    sample = sorted(latencies)
    ms = 1000.0
    return {
        "requests": len(sample),
        "seconds": window,
        "rps": len(sample) / window,
        "p50_ms": percentile(sample, 0.50) * ms if sample else None,
        "p99_ms": percentile(sample, 0.99) * ms if sample else None,
        "max_ms": sample[-1] * ms if sample else None,
        "client_cpu": client_cpu / window,
        "server_cpu": None if scpu0 is None or scpu1 is None else (scpu1 - scpu0) / window,
    }


def other_share(busy0, busy1, window, client_cpu, server_cpu):
    """The CPU share of every other process on the machine over the window."""
    if busy0 is None or busy1 is None or server_cpu is None:
        return None
    return max(0.0, (busy1 - busy0) / window - client_cpu / window - server_cpu)


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
    e.add_argument("--tls", metavar="CAFILE", help="speak TLS, trusting this CA (PEM)")
    u = sub.add_parser("udp")
    u.add_argument("--port", type=int, required=True)
    u.add_argument("--size", type=int, required=True)
    u.add_argument("--conns", type=int, required=True)
    u.add_argument("--duration", type=float, default=1.0)
    u.add_argument("--warmup", type=float, default=0.25)
    u.add_argument("--server-pid", type=int, default=0)
    i = sub.add_parser("idle")
    i.add_argument("--port", type=int, required=True)
    i.add_argument("--count", type=int, required=True)
    i.add_argument("--timeout", type=float, default=60.0)
    for p in (e, u, i):
        p.add_argument("--cpu", type=int, help="pin the process to this CPU")
    args = parser.parse_args()
    pin(args.cpu)
    if args.command == "idle":
        return idle(args.port, args.count, args.timeout)
    raise_nofile_limit()
    try:
        if args.command == "udp":
            result = udp(
                args.port, args.size, args.conns, args.duration, args.warmup, args.server_pid
            )
        else:
            result = echo(
                args.port,
                args.size,
                args.conns,
                args.duration,
                args.warmup,
                args.server_pid,
                args.tls,
            )
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
