"""The datagram transport with its native read and sendto, against asyncio's.

Flow control with a peer that does not read (AF_UNIX datagrams block when the peer's queue
is full), error_received and raising protocol callbacks, several senders (addresses are
reused per sender), AF_UNIX/abstract/IPv6 addresses, close/abort with connection_lost once,
reprs, isinstance, no fd leaks. Every scenario that asyncio decides runs on a stock asyncio
loop too and must give the same result. Nothing is timed.
"""

import asyncio
import os
import socket
import tempfile
from asyncio import selector_events

import pytest
from parity_helpers import WATCHDOG, DatagramRecorder, run, turns

HOST = "127.0.0.1"

pytestmark = pytest.mark.usefixtures("no_unexpected_loop_errors")


def reference(scenario):
    """``scenario(loop)`` on a stock asyncio loop of this Python: what the loop under test
    must give too."""
    ref = asyncio.DefaultEventLoopPolicy().new_event_loop()
    try:
        return ref.run_until_complete(asyncio.wait_for(scenario(ref), WATCHDOG))
    finally:
        ref.close()


def open_fds():
    return set(os.listdir("/proc/self/fd"))


class FlowRecorder(DatagramRecorder):
    def __init__(self, loop):
        super().__init__(loop)
        self.flow = []
        self.resumed = loop.create_future()

    def pause_writing(self):
        self.flow.append("pause")

    def resume_writing(self):
        self.flow.append("resume")
        if not self.resumed.done():
            self.resumed.set_result(None)


def unix_pair(tmp, connect=True):
    """Two bound AF_UNIX datagram sockets; ``a`` connected to ``b`` if asked."""
    a = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.bind(os.path.join(tmp, "a"))
    b.bind(os.path.join(tmp, "b"))
    if connect:
        a.connect(os.path.join(tmp, "b"))
    return a, b


async def _flow_control(loop, connect):
    with tempfile.TemporaryDirectory() as tmp:
        a, b = unix_pair(tmp, connect)
        tr, proto = await loop.create_datagram_endpoint(lambda: FlowRecorder(loop), sock=a)
        await turns(1)
        tr.set_write_buffer_limits(high=300, low=100)
        addr = None if connect else os.path.join(tmp, "b")
        sent = 0
        while tr.get_write_buffer_size() == 0 and sent < 100_000:
            tr.sendto(b"x" * 100, addr)  # the peer does not read: its queue fills up
            sent += 1
        queued = [tr.get_write_buffer_size()]
        for _ in range(5):
            tr.sendto(b"y" * 100, addr)
        queued.append(tr.get_write_buffer_size())
        flow_when_full = list(proto.flow)
        rep = repr(tr)
        b.setblocking(False)
        got = []
        while not proto.resumed.done():  # read until the transport flushed its queue
            try:
                got.append(b.recv(1000))
            except BlockingIOError:
                await asyncio.sleep(0)
        await turns()
        while True:
            try:
                got.append(b.recv(1000))
            except BlockingIOError:
                break
        size_after = tr.get_write_buffer_size()
        tr.close()
        await proto.lost
        b.close()
        return {
            "queued": queued,
            "flow_when_full": flow_when_full,
            "flow": proto.flow,
            "size_after": size_after,
            "total": len(got),
            "sent": sent + 5,
            "tail": got[-5:],
            "repr_tail": rep.split("write=")[1],
            "errors": proto.errors,
        }


@pytest.mark.parametrize("connect", [True, False], ids=["connected", "sendto"])
def test_sendto_queues_when_the_peer_is_full_and_flow_control(loop, connect):
    out = run(loop, _flow_control(loop, connect))
    first = out["queued"][0]
    # asyncio's accounting for this Python: data length (+ 8 "header" bytes from 3.13).
    assert first in (100, 108)
    assert out["queued"][1] == 6 * first
    assert out["flow_when_full"] == ["pause"]
    assert out["flow"] == ["pause", "resume"]
    # 3.13 adds the 8 bytes per queued datagram but takes back only the data's length.
    assert out["size_after"] == 6 * (first - 100)
    assert out["total"] == out["sent"]  # nothing lost, nothing duplicated
    assert out["tail"] == [b"y" * 100] * 5
    assert out["repr_tail"] == f"<polling, bufsize={6 * first}>>"
    assert out["errors"] == []
    ref = reference(lambda lp: _flow_control(lp, connect))
    assert (out["queued"], out["size_after"]) == (ref["queued"], ref["size_after"])


async def _many_senders(loop):
    tr, proto = await loop.create_datagram_endpoint(
        lambda: DatagramRecorder(loop), local_addr=(HOST, 0)
    )
    addr = tr.get_extra_info("sockname")
    senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    for s in senders:
        s.bind((HOST, 0))
    names = [s.getsockname() for s in senders]
    order = [0, 0, 1, 2, 1, 0, 2, 2]
    for i, k in enumerate(order):
        senders[k].sendto(b"%d" % i, addr)
        data, peer = await proto.got.get()
        tr.sendto(data + b"!", peer)  # a reply to the address object the transport gave
        assert senders[k].recvfrom(100) == (data + b"!", addr)
    for s in senders:
        s.close()
    tr.close()
    await proto.lost
    return [(d, names.index(a)) for d, a in proto.received], [type(a) for _, a in proto.received]


def test_several_senders_get_their_own_address(loop):
    got, types = run(loop, _many_senders(loop))
    assert got == [(b"%d" % i, k) for i, k in enumerate([0, 0, 1, 2, 1, 0, 2, 2])]
    assert set(types) == {tuple}


async def _unix_addresses(loop):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "server")
        tr, proto = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(loop), local_addr=path, family=socket.AF_UNIX
        )
        named = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        named.bind(os.path.join(tmp, "named"))
        unnamed = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        abstract.bind(b"\0ferroloop-test-%d" % os.getpid())
        out = []
        for s in (named, unnamed, abstract):
            s.sendto(b"hi", path)
            _data, peer = await proto.got.get()
            out.append(peer.replace(tmp, "TMP") if isinstance(peer, str) else peer)
            if peer:
                tr.sendto(b"back", peer)
                out.append(s.recv(10))
            s.close()
        tr.close()
        await proto.lost
        return out


def test_unix_datagram_peer_addresses(loop):
    out = run(loop, _unix_addresses(loop))
    assert out[0:2] == ["TMP/named", b"back"]
    assert out == reference(_unix_addresses)


def has_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_reply_to_the_4_tuple(loop):
    async def main():
        tr, proto = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(loop, echo=True), local_addr=("::1", 0)
        )
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as c:
            c.bind(("::1", 0))
            c.sendto(b"six", tr.get_extra_info("sockname"))
            _, peer = await proto.got.get()
            echoed = c.recvfrom(100)
            mine = c.getsockname()
        tr.close()
        await proto.lost
        return peer, mine, echoed[0]

    peer, mine, echoed = run(loop, main())
    assert peer == mine and len(peer) == 4
    assert echoed == b"SIX"


class Raising(DatagramRecorder):
    def datagram_received(self, data, addr):
        super().datagram_received(data, addr)
        raise ZeroDivisionError("datagram_received")

    def error_received(self, exc):
        super().error_received(exc)
        raise LookupError("error_received")


async def _raising_callbacks(loop):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))
    tr, proto = await loop.create_datagram_endpoint(lambda: Raising(loop), local_addr=(HOST, 0))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.sendto(b"boom", tr.get_extra_info("sockname"))
        await proto.got.get()
        await turns()
    still_open = not tr.is_closing()
    # error_received raising inside sendto (a datagram too large): the caller gets it.
    try:
        tr.sendto(b"x" * 70000, ("127.0.0.1", 9))
        raised = None
    except LookupError as exc:
        raised = str(exc)
    # error_received raising in the read path: ECONNREFUSED on a connected endpoint.
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind((HOST, 0))
    closed = probe.getsockname()
    probe.close()
    tr2, proto2 = await loop.create_datagram_endpoint(lambda: Raising(loop), remote_addr=closed)
    tr2.sendto(b"anyone?")
    await proto2.error
    await turns()
    out = {
        "messages": [c["message"] for c in contexts],
        "exceptions": [type(c.get("exception")).__name__ for c in contexts],
        "still_open": still_open,
        "raised": raised,
        "errors": [type(e).__name__ for e in proto.errors + proto2.errors],
        "closing": (tr.is_closing(), tr2.is_closing()),
    }
    tr.close()
    tr2.close()
    await proto.lost
    await proto2.lost
    return out


def test_raising_protocol_callbacks(loop):
    out = run(loop, _raising_callbacks(loop))
    assert out["still_open"]
    assert out["raised"] == "error_received"
    assert out["exceptions"] == ["ZeroDivisionError", "LookupError"]
    assert out["messages"][0].startswith("Exception in callback _SelectorDatagramTransport.")
    assert out == reference(_raising_callbacks)


async def _close_abort(loop):
    events = []

    class P(DatagramRecorder):
        def connection_lost(self, exc):
            events.append(("lost", exc))
            super().connection_lost(exc)

    tr, proto = await loop.create_datagram_endpoint(lambda: P(loop), local_addr=(HOST, 0))
    tr.close()
    tr.close()
    tr.abort()
    await proto.lost
    await turns()
    tr2, proto2 = await loop.create_datagram_endpoint(
        lambda: P(loop), remote_addr=tr.get_extra_info("sockname")
    )
    tr2.abort()
    tr2.abort()
    tr2.close()
    await proto2.lost
    await turns()
    # Writes on a lost connected endpoint are counted (asyncio warns after a few).
    for _ in range(3):
        tr2.sendto(b"late")
    return events, tr2._conn_lost, repr(tr).split(" ")[1], tr.get_extra_info("socket")


def test_close_and_abort_call_connection_lost_once(loop):
    events, conn_lost, state, sock = run(loop, _close_abort(loop))
    assert events == [("lost", None), ("lost", None)]
    assert conn_lost == 4
    assert state == "closed"
    assert sock is not None
    assert (events, conn_lost, state) == reference(_close_abort)[:3]


def test_isinstance_and_repr_are_asyncios(loop):
    async def main():
        tr, proto = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(loop), local_addr=(HOST, 0)
        )
        await turns(1)
        out = (
            isinstance(tr, asyncio.DatagramTransport),
            isinstance(tr, asyncio.BaseTransport),
            type(tr).__name__,
            repr(tr).replace(str(tr.get_extra_info("socket").fileno()), "N"),
        )
        tr.close()
        await proto.lost
        return out

    dgram, base, name, rep = run(loop, main())
    assert dgram == issubclass(
        selector_events._SelectorDatagramTransport, asyncio.DatagramTransport
    )
    assert base
    assert name == "_SelectorDatagramTransport"
    assert rep == "<_SelectorDatagramTransport fd=N read=polling write=<idle, bufsize=0>>"


def test_pause_and_resume_reading(loop):
    async def main():
        tr, proto = await loop.create_datagram_endpoint(
            lambda: DatagramRecorder(loop), local_addr=(HOST, 0)
        )
        addr = tr.get_extra_info("sockname")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            tr.pause_reading()
            c.sendto(b"1", addr)
            c.sendto(b"2", addr)
            await turns()
            held = len(proto.received)
            tr.resume_reading()
            await proto.got.get()
            await proto.got.get()
        tr.close()
        await proto.lost
        return held, [d for d, _ in proto.received]

    assert run(loop, main()) == (0, [b"1", b"2"])


def test_no_fd_leaks(loop):
    async def main():
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(5):
                tr, proto = await loop.create_datagram_endpoint(
                    lambda: DatagramRecorder(loop), local_addr=(HOST, 0)
                )
                tr.sendto(b"x", tr.get_extra_info("sockname"))
                await proto.got.get()
                tr.close()
                await proto.lost
                tr, proto = await loop.create_datagram_endpoint(
                    lambda: DatagramRecorder(loop),
                    local_addr=os.path.join(tmp, f"s{i}"),
                    family=socket.AF_UNIX,
                )
                tr.abort()
                await proto.lost

    run(loop, main())  # warm up (lazily created fds: executor, self-pipe)
    before = open_fds()
    run(loop, main())
    assert open_fds() - before == set()


def test_keyboard_interrupt_in_datagram_received_propagates(loop):
    class Interrupting(DatagramRecorder):
        def datagram_received(self, data, addr):
            super().datagram_received(data, addr)
            if data == b"stop":
                raise KeyboardInterrupt

    async def start():
        return await loop.create_datagram_endpoint(lambda: Interrupting(loop), local_addr=(HOST, 0))

    tr, proto = run(loop, start())
    addr = tr.get_extra_info("sockname")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.sendto(b"stop", addr)
        with pytest.raises(KeyboardInterrupt):
            loop.run_forever()
        c.sendto(b"after", addr)  # the endpoint still works

        async def rest():
            await proto.got.get()
            return await proto.got.get()

        assert run(loop, rest())[0] == b"after"
    tr.close()
    run(loop, proto.lost)
