"""A network benchmark server: one process serves one kind of server on one event loop.

Usage::

    python benchmarks/net_server.py LOOP KIND [--lifetime S] [--expect N]
        [--certfile PEM --keyfile PEM]

KIND is one of

- ``sock``: an echo server on ``loop.sock_accept`` / ``loop.sock_recv`` / ``loop.sock_sendall``;
- ``streams``: an echo server on ``asyncio.start_server`` (``reader.read``, ``writer.write``,
  ``await writer.drain()``);
- ``protocol``: an echo server on ``loop.create_server`` with an ``asyncio.Protocol``;
- ``http``: a minimal HTTP/1.1 keep-alive server on ``asyncio.Protocol`` (a fixed response);
- ``tls``: the ``protocol`` echo server over TLS (``loop.create_server(..., ssl=context)``);
- ``https``: the ``http`` server over TLS;
- ``udp``: an echo server on ``loop.create_datagram_endpoint`` (``transport.sendto`` of every
  datagram back to its sender).

``tls`` and ``https`` need ``--certfile`` and ``--keyfile`` (PEM; the runner makes a throw-away
CA and a certificate for 127.0.0.1 at run time): the server's context is
``ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)`` with that chain.

The echo servers echo whatever arrives, in the chunks it arrives in (reads of up to 256 KiB);
the client decides what a request is. The server listens on 127.0.0.1 (a free port) and prints
one JSON line once it listens: ``{"port": ..., "pid": ..., "rss_kib": ...}``. With
``--expect N`` (the memory benchmark) it prints a second line once N connections are open and
the process has settled: the RSS before the connections, and the RSS and peak RSS after.

The server stops when its stdin reaches end of file (the runner closes it, or the runner died),
and ends by itself after ``--lifetime`` seconds in any case (``SIGALRM``, whose default action
ends the process even if the loop hangs). Exit status 2 with ``{"missing": ...}``: the loop's
package is not installed; exit status 3 with ``{"unsupported": ...}``: the loop raised when asked
to start this kind of server (rloop and ``ssl=``, for instance).
"""

import argparse
import asyncio
import gc
import json
import os
import resource
import signal
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import LOOPS, MISSING, load_factory

HOST = "127.0.0.1"
READ_SIZE = 256 * 1024  # what asyncio's transports read at once (selector_events max_size)
BACKLOG = 4096
KINDS = ("sock", "streams", "protocol", "http", "tls", "https", "udp")
UNSUPPORTED = 3
# The kernel's default UDP receive buffer (net.core.rmem_default, 208 KiB here) holds only about
# ten 10 KiB datagrams (each costs its buffer's true size, not its length): ten clients in step
# then overflow it now and then and the datagram is dropped whatever the loop. 1 MiB (at most
# net.core.rmem_max) takes that artefact away, the same for every loop.
UDP_RCVBUF = 1 << 20
HTTP_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 13\r\n"
    b"Connection: keep-alive\r\n"
    b"\r\n"
    b"Hello, world!"
)

open_connections = 0  # connections currently open (the memory benchmark waits for N)
connection_errors = 0  # ConnectionError seen by the sock/streams handlers (peer went away)


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def pin(cpu):
    """Run on one CPU (the runner puts client and server on different ones)."""
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def raise_nofile_limit():
    """Soft RLIMIT_NOFILE up to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux 4.0+: write 5 to clear_refs); True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --- the servers ---------------------------------------------------------------------------


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        global open_connections
        open_connections += 1
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def connection_lost(self, exc):
        global open_connections
        open_connections -= 1


class HttpProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive, GET without a body: one fixed response per request head."""

    def connection_made(self, transport):
        global open_connections
        open_connections += 1
        self.transport = transport
        self.pending = b""

    def data_received(self, data):
        buf = self.pending + data if self.pending else data
        count = buf.count(b"\r\n\r\n")
        if count:
            self.transport.write(HTTP_RESPONSE * count)
            buf = buf[buf.rindex(b"\r\n\r\n") + 4 :]
        self.pending = buf

    def connection_lost(self, exc):
        global open_connections
        open_connections -= 1


class UdpEchoProtocol(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)

    def error_received(self, exc):
        global connection_errors
        connection_errors += 1


async def stream_echo(reader, writer):
    global open_connections, connection_errors
    open_connections += 1
    try:
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        connection_errors += 1
    finally:
        open_connections -= 1
        writer.close()


async def sock_echo(loop, conn):
    global open_connections, connection_errors
    open_connections += 1
    recv, sendall = loop.sock_recv, loop.sock_sendall
    try:
        while True:
            data = await recv(conn, READ_SIZE)
            if not data:
                break
            await sendall(conn, data)
    except ConnectionError:
        connection_errors += 1
    finally:
        open_connections -= 1
        conn.close()


async def sock_server(loop, lsock):
    tasks = set()  # strong references: a task only weakly referenced by the loop can vanish
    while True:
        conn, _ = await loop.sock_accept(lsock)
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio's transports
        task = loop.create_task(sock_echo(loop, conn))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def server_context(certfile, keyfile):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    return context


async def start(loop, kind, context=None):
    """Start serving; return (port, closer)."""
    if kind == "sock":
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((HOST, 0))
        lsock.listen(BACKLOG)
        lsock.setblocking(False)
        acceptor = loop.create_task(sock_server(loop, lsock))

        def close():
            acceptor.cancel()
            lsock.close()

        return lsock.getsockname()[1], close
    if kind == "udp":
        transport, _ = await loop.create_datagram_endpoint(UdpEchoProtocol, local_addr=(HOST, 0))
        sock = transport.get_extra_info("socket")
        if sock is not None:  # room for every client's datagram in flight (see UDP_RCVBUF)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
        return transport.get_extra_info("sockname")[1], transport.close
    if kind == "streams":
        server = await asyncio.start_server(stream_echo, HOST, 0, backlog=BACKLOG)
    else:
        factory = HttpProtocol if kind in ("http", "https") else EchoProtocol
        ssl_arg = context if kind in ("tls", "https") else None
        server = await loop.create_server(factory, HOST, 0, backlog=BACKLOG, ssl=ssl_arg)
    return server.sockets[0].getsockname()[1], server.close


async def serve(kind, expect, expect_timeout, settle, context=None):
    loop = asyncio.get_running_loop()
    stopped = loop.create_future()

    def stop():
        if not stopped.done():
            stopped.set_result(None)

    def watch_stdin():
        """Stop on stdin EOF; if the loop does not stop within 5 s, exit hard (and say so)."""
        try:
            while sys.stdin.buffer.read(1 << 16):
                pass
        except (OSError, ValueError):
            pass
        try:
            loop.call_soon_threadsafe(stop)
        except RuntimeError:  # the loop is already closed
            return
        time.sleep(5)
        sys.stderr.write("net_server: the loop did not stop within 5 s of stdin EOF\n")
        sys.stderr.flush()
        os._exit(4)

    try:
        port, close = await start(loop, kind, context)
    except Exception as exc:  # noqa: BLE001 (any failure: this loop cannot serve this kind)
        emit({"loop": type(loop).__module__, "unsupported": f"{type(exc).__name__}: {exc}"})
        return UNSUPPORTED
    gc.collect()
    peak_reset = reset_peak_rss() if expect else False
    baseline = status_kib("VmRSS")
    emit({"port": port, "pid": os.getpid(), "rss_kib": baseline, "peak_reset": peak_reset})
    threading.Thread(target=watch_stdin, daemon=True).start()

    if expect:
        deadline = loop.time() + expect_timeout
        while open_connections < expect and loop.time() < deadline and not stopped.done():
            await asyncio.sleep(0.02)
        await asyncio.sleep(settle)  # idle: let the loop finish any accept batch in flight
        emit(
            {
                "connections": open_connections,
                "baseline_rss_kib": baseline,
                "rss_kib": status_kib("VmRSS"),
                "peak_rss_kib": status_kib("VmHWM"),
                "peak_reset": peak_reset,
            }
        )
    await stopped
    close()
    if connection_errors:
        sys.stderr.write(f"net_server: {connection_errors} connection errors (peer reset)\n")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("loop", choices=list(LOOPS))
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--lifetime", type=int, default=120, help="exit after S seconds")
    parser.add_argument("--expect", type=int, default=0, help="report RSS at N connections")
    parser.add_argument("--expect-timeout", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=0.5)
    parser.add_argument("--cpu", type=int, help="pin the process to this CPU")
    parser.add_argument("--certfile", help="tls, https: the server's certificate chain (PEM)")
    parser.add_argument("--keyfile", help="tls, https: the server's private key (PEM)")
    args = parser.parse_args()
    context = None
    if args.kind in ("tls", "https"):
        if not (args.certfile and args.keyfile):
            parser.error(f"{args.kind} needs --certfile and --keyfile")
        context = server_context(args.certfile, args.keyfile)
    pin(args.cpu)
    signal.alarm(max(1, args.lifetime))  # the hard self-timeout: SIGALRM ends the process
    raise_nofile_limit()
    try:
        factory = load_factory(args.loop)
    except ImportError as exc:
        emit({"loop": args.loop, "missing": f"{type(exc).__name__}: {exc}"})
        return MISSING
    loop = factory()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(
            serve(args.kind, args.expect, args.expect_timeout, args.settle, context)
        )
    finally:
        asyncio.set_event_loop(None)
        loop.close()


if __name__ == "__main__":
    sys.exit(main())
