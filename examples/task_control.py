"""Task control on ferroloop: a local JSON API, httpx, asyncio.wait, cancellation, timing.

Run with `make demo` (or `python examples/task_control.py`). No internet needed: the
program starts its own small JSON API on 127.0.0.1 (asyncio streams, on the same loop),
in the spirit of a public test API:

    GET /posts/{id}   ->  {"id": ..., "title": ..., "body": ...}  after a per-post delay
    GET /posts/13     ->  500, on purpose

then fetches posts concurrently with httpx.AsyncClient and walks through asyncio's task
control: asyncio.wait with ALL_COMPLETED, FIRST_COMPLETED and FIRST_EXCEPTION, and a task
that catches CancelledError, cleans up and re-raises. Last, it runs one workload on
asyncio's loop and on ferroloop's and prints the times measured in this run.
"""

import asyncio
import json
import platform
import random
import time
from urllib.parse import parse_qs, urlsplit

import ferroloop
import httpx

# -- the local JSON API ---------------------------------------------------------------

WORDS = [
    "sunt", "aut", "facere", "repellat", "provident", "occaecati", "excepturi", "optio",
    "reprehenderit", "qui", "est", "esse", "eum", "magnam", "dolorem", "ea", "molestias",
    "quasi", "nesciunt", "voluptatem", "rerum", "ullam",
]  # fmt: skip


def _text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


POSTS = {i: {"id": i, "title": _text(i, 4), "body": _text(100 + i, 12)} for i in range(1, 11)}
FAILING_POST = 13  # answers 500 Internal Server Error, on purpose
DELAYS = {i: 0.010 * ((i * 7) % 10 + 1) for i in POSTS}  # 10 ms .. 100 ms, all different
DELAYS[FAILING_POST] = 0.035


def route(target: str):
    """(status, JSON body, delay in seconds) for a request target."""
    url = urlsplit(target)
    parts = url.path.strip("/").split("/")
    if len(parts) != 2 or parts[0] != "posts" or not parts[1].isdigit():
        return 404, {"error": "not found"}, 0.0
    post_id = int(parts[1])
    delay = DELAYS.get(post_id, 0.0)
    if "delay" in (query := parse_qs(url.query)):
        delay = float(query["delay"][0])
    if post_id == FAILING_POST:
        return 500, {"error": f"post {post_id} is broken on purpose"}, delay
    if post_id not in POSTS:
        return 404, {"error": f"no post {post_id}"}, delay
    return 200, POSTS[post_id], delay


REASONS = {200: "OK", 404: "Not Found", 500: "Internal Server Error"}


async def serve_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    """A minimal HTTP/1.1 server: GET only, keep-alive, JSON bodies."""
    try:
        while True:
            request_line = await reader.readline()
            if not request_line:
                break
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # headers: nothing to read in them for GET
            _method, target, _version = request_line.decode("latin-1").split()
            status, payload, delay = route(target)
            if delay:
                await asyncio.sleep(delay)
            body = json.dumps(payload).encode()
            writer.write(
                f"HTTP/1.1 {status} {REASONS[status]}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"\r\n".encode("latin-1")
                + body
            )
            await writer.drain()
    except (ConnectionError, ValueError):
        pass  # a client that went away (cancelled requests do) or a malformed request
    finally:
        writer.close()


class LocalAPI:
    """The JSON API on 127.0.0.1 (port chosen by the OS), on the running loop."""

    async def __aenter__(self):
        self.handlers = set()

        def on_connect(reader, writer):
            task = asyncio.create_task(serve_http(reader, writer))
            self.handlers.add(task)
            task.add_done_callback(self.handlers.discard)

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        for task in self.handlers:  # connections of requests cancelled mid-flight
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()


def client(api: LocalAPI) -> httpx.AsyncClient:
    # trust_env=False: loopback must not go through a proxy from the environment.
    return httpx.AsyncClient(
        base_url=api.url,
        trust_env=False,
        timeout=10,
        limits=httpx.Limits(max_connections=50, max_keepalive_connections=50),
    )


async def fetch(http: httpx.AsyncClient, post_id: int) -> dict:
    response = await http.get(f"/posts/{post_id}")
    response.raise_for_status()
    return response.json()


# -- the walkthrough --------------------------------------------------------------------


def ms_since(t0: float) -> str:
    return f"{(time.perf_counter() - t0) * 1e3:4.0f} ms"


async def all_completed(http):
    print("1. asyncio.wait(ALL_COMPLETED): eight posts at once, titles in completion order")
    t0 = time.perf_counter()
    finished = []
    tasks = set()
    for i in range(1, 9):
        task = asyncio.create_task(fetch(http, i), name=f"post {i}")
        task.add_done_callback(lambda t: finished.append((t, ms_since(t0))))
        tasks.add(task)
    done, pending = await asyncio.wait(tasks, return_when=asyncio.ALL_COMPLETED)
    for task, at in finished:
        print(f"   {at}  {task.get_name():8} {task.result()['title']}")
    print(f"   done={len(done)} pending={len(pending)}, all in {ms_since(t0)}")


async def first_completed(http):
    print("2. asyncio.wait(FIRST_COMPLETED): take the first answer, cancel the rest")
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(fetch(http, i), name=f"post {i}") for i in (2, 4, 6)]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    (first,) = done
    print(f"   {ms_since(t0)}  first: {first.get_name()}: {first.result()['title']}")
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    names = ", ".join(sorted(t.get_name() for t in pending if t.cancelled()))
    print(f"   cancelled the other {len(pending)}: {names}")


async def first_exception(http):
    print(f"3. asyncio.wait(FIRST_EXCEPTION): stop at the first failure (post {FAILING_POST})")
    t0 = time.perf_counter()
    ids = [*range(1, 9), FAILING_POST]
    tasks = [asyncio.create_task(fetch(http, i), name=f"post {i}") for i in ids]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    (failed,) = [t for t in done if t.exception() is not None]
    exc = failed.exception()
    status = exc.response.status_code
    print(f"   {ms_since(t0)}  {failed.get_name()} failed: {type(exc).__name__} ({status})")
    print(f"   finished before it: {len(done) - 1}, still running: {len(pending)} (cancelled)")
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def cancel_with_cleanup(http):
    print("4. a task that catches CancelledError, cleans up, and re-raises")
    log = []

    async def download(post_id):
        started = time.perf_counter()
        try:
            return await fetch(http, post_id)
        except asyncio.CancelledError as exc:
            reason = exc.args[0] if exc.args else None
            log.append(
                f"download cancelled after {ms_since(started).strip()} ({reason!r}): "
                "cleanup ran, re-raising"
            )
            raise

    slowest = max(POSTS, key=DELAYS.get)
    task = asyncio.create_task(download(slowest))
    await asyncio.sleep(0.02)  # the request is in flight now
    task.cancel("user pressed stop")
    try:
        await task
    except asyncio.CancelledError:
        log.append("the awaiting code got CancelledError too")
    for line in log:
        print(f"   {line}")
    print(f"   task.cancelled() = {task.cancelled()}")


async def walkthrough():
    async with LocalAPI() as api, client(api) as http:
        # The first request pays httpx's one-time setup; keep it out of the timings below.
        await fetch(http, 1)
        print(f"local JSON API on {api.url} (one loop: server and httpx client)\n")
        await all_completed(http)
        await first_completed(http)
        await first_exception(http)
        await cancel_with_cleanup(http)


# -- the same workload on both loops ----------------------------------------------------


async def http_workload(rounds: int = 20, width: int = 8):
    """Rounds of concurrent requests (no server delay) waited on with each return
    condition; the server and the httpx client run on the loop under test."""
    async with LocalAPI() as api, client(api) as http:
        for r in range(rounds):
            tasks = [
                asyncio.create_task(http.get(f"/posts/{i % 10 + 1}?delay=0")) for i in range(width)
            ]
            mode = (asyncio.ALL_COMPLETED, asyncio.FIRST_EXCEPTION)[r % 2]
            done, _pending = await asyncio.wait(tasks, return_when=mode)
            if any(t.result().status_code != 200 for t in done):
                raise RuntimeError("the local API failed a request")


async def task_workload(rounds: int = 300, width: int = 50):
    """Pure task control, no I/O: waits with each return condition, and cancellations."""

    async def job(i):
        for _ in range(i % 3):
            await asyncio.sleep(0)
        return i

    for r in range(rounds):
        tasks = [asyncio.create_task(job(i)) for i in range(width)]
        mode = (asyncio.ALL_COMPLETED, asyncio.FIRST_COMPLETED, asyncio.FIRST_EXCEPTION)[r % 3]
        _done, pending = await asyncio.wait(tasks, return_when=mode)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def best_time(workload, loop_factory, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            t0 = time.perf_counter()
            runner.run(workload())
            best = min(best, time.perf_counter() - t0)
    return best


def compare():
    print("\n5. the same workload on asyncio's loop and on ferroloop (best of 3, this run)")
    for label, workload in (
        ("httpx + local API, 160 requests", http_workload),
        ("task control, no I/O", task_workload),
    ):
        t_asyncio = best_time(workload, asyncio.new_event_loop)
        t_ferro = best_time(workload, ferroloop.new_event_loop)
        print(f"   {label}:")
        print(f"      asyncio   {t_asyncio * 1e3:7.1f} ms")
        print(f"      ferroloop {t_ferro * 1e3:7.1f} ms   ({t_asyncio / t_ferro:.2f}x asyncio)")


def main():
    print(
        f"ferroloop {ferroloop.__version__}: task-control walkthrough "
        f"(Python {platform.python_version()}, httpx {httpx.__version__})"
    )
    ferroloop.run(walkthrough())
    compare()


if __name__ == "__main__":
    main()
