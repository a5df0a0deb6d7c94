"""Real libraries end to end on loopback, each test on asyncio's loop and on ferroloop.

httpx, aiohttp (client, web server, WebSocket), uvicorn (HTTP, WebSocket via websockets,
its ``loop`` option, graceful shutdown) and anyio on the asyncio backend. Every test runs the
same program on both loops (the ``loop`` fixture), so one that passes on "asyncio" and fails
on "ferroloop" is a ferroloop bug. Servers listen on 127.0.0.1, port 0. Nothing is timed.

The libraries come from tests/requirements-libraries.txt. A missing one fails this module
(it is never skipped): CI installs them.
"""

import asyncio
import hashlib
import json
import os
import random
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from parity_helpers import import_ferroloop

_REQUIREMENTS = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "requirements-libraries.txt"
)
try:
    import aiohttp
    import anyio
    import anyio.abc
    import anyio.from_thread
    import anyio.lowlevel
    import anyio.streams.buffered
    import anyio.to_thread
    import httpx
    import uvicorn
    import websockets
    import websockets.asyncio.client
    import websockets.asyncio.server
    from aiohttp import web
except ImportError as exc:  # pragma: no cover - only when the test dependencies are missing
    raise ImportError(
        f"tests/test_libraries.py needs the libraries in {_REQUIREMENTS}: {exc}. "
        f"Install them with: python -m pip install -r {_REQUIREMENTS}"
    ) from exc

HOST = "127.0.0.1"
# Only ever reached when a test fails: a hung library program becomes a TimeoutError.
WATCHDOG = 20.0
BIG_SIZE = 20 * 1024 * 1024
_big_body = None


def big_body():
    """20 MiB of reproducible pseudo-random bytes (made once per session)."""
    global _big_body
    if _big_body is None:
        _big_body = random.Random(20240601).randbytes(BIG_SIZE)
    return _big_body


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def run(loop, main):
    """Run ``main`` on ``loop`` as asyncio.run would, bounded by WATCHDOG.

    asyncio.Runner also cancels leftover tasks and shuts down async generators and the
    default executor, then closes the loop.
    """

    async def guarded():
        async with asyncio.timeout(WATCHDOG):
            return await main

    with asyncio.Runner(loop_factory=lambda: loop) as runner:
        return runner.run(guarded())


async def wait_until(predicate, what):
    """Poll ``predicate`` every few milliseconds (the caller's run is bounded by WATCHDOG)."""
    while not predicate():
        await asyncio.sleep(0.005)


# ---------------------------------------------------------------------------------------
# A minimal HTTP/1.1 server on asyncio streams (keep-alive), for the httpx tests: the server
# side stays small so that these tests are about httpx's client.


class StreamsHttpServer:
    """GET /item/N -> {"n": N}; GET /big -> the 20 MiB body; POST /digest -> sha256."""

    def __init__(self):
        self.server = None
        self.connections = 0

    async def start(self):
        self.server = await asyncio.start_server(self._serve, HOST, 0)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self):
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader, writer):
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                await self._respond(writer, method, target, body)
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionResetError):
            pass
        finally:
            writer.close()

    async def _respond(self, writer, method, target, body):
        if method == "GET" and target.startswith("/item/"):
            payload = json.dumps({"n": int(target[len("/item/") :])}).encode()
            chunks = [payload]
            ctype = "application/json"
        elif method == "GET" and target == "/big":
            data = big_body()
            step = 256 * 1024
            chunks = [data[i : i + step] for i in range(0, len(data), step)]
            ctype = "application/octet-stream"
        elif method == "POST" and target == "/digest":
            chunks = [json.dumps({"size": len(body), "sha256": sha256(body)}).encode()]
            ctype = "application/json"
        else:
            chunks = [b"not found"]
            ctype = "text/plain"
        length = sum(len(c) for c in chunks)
        status = "404 Not Found" if ctype == "text/plain" else "200 OK"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {length}\r\n\r\n".encode("latin-1")
        )
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()


# ---------------------------------------------------------------------------------------
# httpx


def test_httpx_many_concurrent_requests(loop):
    async def main():
        server = StreamsHttpServer()
        port = await server.start()
        limit = asyncio.Semaphore(20)
        limits = httpx.Limits(max_connections=20, max_keepalive_connections=20)

        async def fetch(client, n):
            async with limit:
                response = await client.get(f"/item/{n}")
            response.raise_for_status()
            return response.json()["n"]

        async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", limits=limits) as client:
            results = await asyncio.gather(*(fetch(client, n) for n in range(200)))
            missing = await client.get("/nowhere")
        await server.stop()
        return results, missing.status_code, server.connections

    results, missing_status, connections = run(loop, main())
    assert results == list(range(200))
    assert missing_status == 404
    # keep-alive: the pool reused its connections instead of opening one per request
    assert 1 <= connections <= 20


def test_httpx_streams_a_large_response_body(loop):
    async def main():
        server = StreamsHttpServer()
        port = await server.start()
        digest = hashlib.sha256()
        size = 0
        chunks = 0
        async with (
            httpx.AsyncClient() as client,
            client.stream("GET", f"http://{HOST}:{port}/big") as response,
        ):
            status = response.status_code
            length = int(response.headers["content-length"])
            async for chunk in response.aiter_bytes():
                digest.update(chunk)
                size += len(chunk)
                chunks += 1
        await server.stop()
        return status, length, size, chunks, digest.hexdigest()

    status, length, size, chunks, digest = run(loop, main())
    assert status == 200
    assert length == size == BIG_SIZE
    assert chunks > 1  # it was streamed, not read in one piece
    assert digest == sha256(big_body())


def test_httpx_uploads_a_large_request_body(loop):
    async def main():
        server = StreamsHttpServer()
        port = await server.start()
        data = big_body()

        async def body():
            step = 1024 * 1024
            for i in range(0, len(data), step):
                yield data[i : i + step]

        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"http://{HOST}:{port}/digest",
                content=body(),
                headers={"Content-Length": str(len(data))},
            )
        await server.stop()
        return response.status_code, response.json()

    status, result = run(loop, main())
    assert status == 200
    assert result == {"size": BIG_SIZE, "sha256": sha256(big_body())}


def test_httpx_read_timeout_on_a_silent_server(loop):
    async def main():
        accepted = asyncio.Event()
        writers = []

        async def silent(reader, writer):
            writers.append(writer)  # read the request, never answer
            accepted.set()
            await reader.read(1)

        server = await asyncio.start_server(silent, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        timeout = httpx.Timeout(5.0, read=0.05)
        async with httpx.AsyncClient(timeout=timeout) as client:
            try:
                await client.get(f"http://{HOST}:{port}/")
                error = None
            except httpx.ReadTimeout as exc:
                error = exc
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()
        return accepted.is_set(), error

    accepted, error = run(loop, main())
    assert accepted
    assert isinstance(error, httpx.ReadTimeout)


# ---------------------------------------------------------------------------------------
# aiohttp: client and web server


async def start_aiohttp(app):
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    return runner, runner.addresses[0][1]


def test_aiohttp_client_and_server_handle_concurrent_requests(loop):
    async def item(request):
        return web.json_response({"n": int(request.match_info["n"])})

    async def echo(request):
        payload = await request.json()
        return web.json_response({"reversed": payload["text"][::-1]})

    async def main():
        app = web.Application()
        app.router.add_get("/item/{n}", item)
        app.router.add_post("/echo", echo)
        runner, port = await start_aiohttp(app)
        base = f"http://{HOST}:{port}"
        try:
            connector = aiohttp.TCPConnector(limit=10)
            async with aiohttp.ClientSession(base, connector=connector) as session:

                async def fetch(n):
                    async with session.get(f"/item/{n}") as response:
                        response.raise_for_status()
                        return (await response.json())["n"]

                results = await asyncio.gather(*(fetch(n) for n in range(200)))
                async with session.post("/echo", json={"text": "ferroloop"}) as response:
                    echoed = await response.json()
                async with session.get("/nowhere") as response:
                    missing = response.status
        finally:
            await runner.cleanup()
        return results, echoed, missing

    results, echoed, missing = run(loop, main())
    assert results == list(range(200))
    assert echoed == {"reversed": "poolorref"}
    assert missing == 404


def test_aiohttp_streams_a_large_response_body(loop):
    async def big(request):
        data = big_body()
        response = web.StreamResponse()
        response.content_length = len(data)
        await response.prepare(request)
        step = 256 * 1024
        for i in range(0, len(data), step):
            await response.write(data[i : i + step])
        await response.write_eof()
        return response

    async def main():
        app = web.Application()
        app.router.add_get("/big", big)
        runner, port = await start_aiohttp(app)
        digest = hashlib.sha256()
        size = 0
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://{HOST}:{port}/big") as response,
            ):
                status = response.status
                async for chunk in response.content.iter_chunked(64 * 1024):
                    digest.update(chunk)
                    size += len(chunk)
        finally:
            await runner.cleanup()
        return status, size, digest.hexdigest()

    status, size, digest = run(loop, main())
    assert status == 200
    assert size == BIG_SIZE
    assert digest == sha256(big_body())


def test_aiohttp_websocket_echo(loop):
    async def ws_echo(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo: " + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    async def main():
        app = web.Application()
        app.router.add_get("/ws", ws_echo)
        runner, port = await start_aiohttp(app)
        large = big_body()[: 2 * 1024 * 1024]
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(f"http://{HOST}:{port}/ws") as ws,
            ):
                texts = []
                for word in ("one", "two", "three"):
                    await ws.send_str(word)
                    texts.append(await ws.receive_str())
                await ws.send_bytes(b"\x00\x01\x02")
                small = await ws.receive_bytes()
                await ws.send_bytes(large)
                big_back = await ws.receive_bytes()
                await ws.close()
                close_code = ws.close_code
        finally:
            await runner.cleanup()
        return texts, small, big_back == large[::-1], close_code

    texts, small, big_ok, close_code = run(loop, main())
    assert texts == ["echo: one", "echo: two", "echo: three"]
    assert small == b"\x02\x01\x00"
    assert big_ok
    assert close_code == aiohttp.WSCloseCode.OK


OPEN_SOCKETS = web.AppKey("open_sockets", set)
RELEASE = web.AppKey("release", asyncio.Event)


def test_aiohttp_graceful_shutdown_closes_an_open_websocket(loop):
    # aiohttp's documented pattern: an on_shutdown hook closes the WebSockets still open.
    async def ws_hold(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        request.app[OPEN_SOCKETS].add(ws)
        try:
            async for _ in ws:
                pass
        finally:
            request.app[OPEN_SOCKETS].discard(ws)
        return ws

    async def close_websockets(app):
        for ws in set(app[OPEN_SOCKETS]):
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"server shutdown")

    async def main():
        app = web.Application()
        app[OPEN_SOCKETS] = set()
        app.router.add_get("/ws", ws_hold)
        app.on_shutdown.append(close_websockets)
        runner, port = await start_aiohttp(app)
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"http://{HOST}:{port}/ws") as ws,
        ):
            await wait_until(lambda: app[OPEN_SOCKETS], "websocket open on the server")
            cleanup = asyncio.create_task(runner.cleanup())
            message = await ws.receive()  # the server's close frame
            await cleanup
            return message.type, message.data, app[OPEN_SOCKETS]

    msg_type, close_code, still_open = run(loop, main())
    assert msg_type == aiohttp.WSMsgType.CLOSE
    assert close_code == aiohttp.WSCloseCode.GOING_AWAY
    assert still_open == set()


def test_aiohttp_client_timeout(loop):
    async def slow(request):
        await request.app[RELEASE].wait()
        return web.Response(text="late")

    async def main():
        app = web.Application()
        app[RELEASE] = asyncio.Event()
        app.router.add_get("/slow", slow)
        runner, port = await start_aiohttp(app)
        try:
            timeout = aiohttp.ClientTimeout(total=0.05)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                try:
                    await session.get(f"http://{HOST}:{port}/slow")
                    error = None
                except TimeoutError as exc:
                    error = exc
        finally:
            app[RELEASE].set()
            await runner.cleanup()
        return error

    assert isinstance(run(loop, main()), asyncio.TimeoutError)


# ---------------------------------------------------------------------------------------
# uvicorn (+ websockets)


class AsgiApp:
    """A small ASGI app: /hello, /slow (waits for ``release``), a WebSocket echo at /ws."""

    def __init__(self):
        self.lifespan = []
        self.loops = []
        self.slow_entered = None
        self.release = None

    async def __call__(self, scope, receive, send):
        self.loops.append(asyncio.get_running_loop())
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.slow_entered = asyncio.Event()
                    self.release = asyncio.Event()
                    self.lifespan.append("startup")
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    self.lifespan.append("shutdown")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif scope["type"] == "http":
            if scope["path"] == "/slow":
                self.slow_entered.set()
                await self.release.wait()
                body = b"slow done"
            else:
                body = f"hello {scope['path']}".encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/plain"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
        elif scope["type"] == "websocket":
            message = await receive()
            assert message["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("text") is not None:
                    await send({"type": "websocket.send", "text": "echo: " + message["text"]})
                else:
                    await send({"type": "websocket.send", "bytes": message["bytes"][::-1]})


def uvicorn_config(app, **options):
    # log_config=None: leave the process's logging configuration alone.
    options.setdefault("lifespan", "on")
    return uvicorn.Config(
        app, host=HOST, port=0, log_config=None, log_level="warning", access_log=False, **options
    )


async def start_uvicorn(config):
    """Start uvicorn.Server.serve() as a task on the running loop; return (server, task, port)."""
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started or task.done(), "uvicorn started")
    if task.done():
        task.result()  # startup failed: raise its error
    return server, task, server.servers[0].sockets[0].getsockname()[1]


async def stop_uvicorn(server, task):
    server.should_exit = True
    await task


def test_uvicorn_serves_http(loop):
    async def main():
        app = AsgiApp()
        server, task, port = await start_uvicorn(uvicorn_config(app, http="h11"))
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}") as client:
            responses = await asyncio.gather(*(client.get(f"/hello/{n}") for n in range(50)))
        await stop_uvicorn(server, task)
        return app, [(r.status_code, r.text) for r in responses]

    app, responses = run(loop, main())
    assert responses == [(200, f"hello /hello/{n}") for n in range(50)]
    assert app.lifespan == ["startup", "shutdown"]
    assert all(lp is loop for lp in app.loops)


# uvicorn's "websockets" implementation (built on websockets.legacy) is deprecated.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The `websockets` implementation is deprecated")
@pytest.mark.parametrize("ws_impl", ["websockets-sansio", "websockets"])
def test_uvicorn_websocket_echo_with_websockets(loop, ws_impl):
    async def main():
        app = AsgiApp()
        server, task, port = await start_uvicorn(uvicorn_config(app, ws=ws_impl))
        large = big_body()[: 1024 * 1024]
        uri = f"ws://{HOST}:{port}/ws"
        async with websockets.asyncio.client.connect(uri, max_size=None) as ws:
            texts = []
            for word in ("one", "two", "three"):
                await ws.send(word)
                texts.append(await ws.recv())
            await ws.send(large)
            big_back = await ws.recv()
        close_code = ws.close_code
        await stop_uvicorn(server, task)
        return texts, big_back == large[::-1], close_code

    texts, big_ok, close_code = run(loop, main())
    assert texts == ["echo: one", "echo: two", "echo: three"]
    assert big_ok
    assert close_code == 1000


async def http_get_raw(port, path):
    """Open a connection, send one keep-alive GET; return (reader, writer, response head+body)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


def test_uvicorn_graceful_shutdown_with_open_connections(loop):
    async def main():
        app = AsgiApp()
        server, task, port = await start_uvicorn(uvicorn_config(app, http="h11"))
        listener = server.servers[0]
        # an idle keep-alive connection (one response read, connection left open) ...
        idle_reader, idle_writer = await http_get_raw(port, "/hello")
        idle_head = await idle_reader.readuntil(b"\r\n\r\n")
        idle_body = await idle_reader.readexactly(len(b"hello /hello"))
        # ... and a request in flight on another connection
        busy_reader, busy_writer = await http_get_raw(port, "/slow")
        await app.slow_entered.wait()

        server.should_exit = True
        # uvicorn stops listening and closes the idle connection (EOF), then waits for the
        # request in flight to finish before serve() returns
        idle_rest = await idle_reader.read()
        await wait_until(lambda: not listener.is_serving(), "listener closed")
        serve_done_early = task.done()
        app.release.set()
        busy_response = await busy_reader.read()  # the response, then EOF
        await task
        idle_writer.close()
        busy_writer.close()

        refused = None
        try:
            _, writer = await asyncio.open_connection(HOST, port)
            writer.close()
        except OSError as exc:
            refused = exc
        return app, idle_head, idle_body, idle_rest, serve_done_early, busy_response, task, refused

    app, idle_head, idle_body, idle_rest, done_early, busy, task, refused = run(loop, main())
    assert idle_head.startswith(b"HTTP/1.1 200 ")
    assert idle_body == b"hello /hello"
    assert idle_rest == b""  # closed by the server at shutdown
    assert not done_early  # serve() waited for the request in flight
    assert busy.startswith(b"HTTP/1.1 200 ")
    assert b"slow done" in busy
    assert task.result() is None
    assert app.lifespan == ["startup", "shutdown"]
    assert isinstance(refused, ConnectionRefusedError)


def test_uvicorn_loop_option_runs_the_server_on_that_loop(loop, loop_kind):
    # uvicorn >= 0.36: Config(loop=...) takes a setup name or "module:factory" path.
    loop_option = {"asyncio": "asyncio", "ferroloop": "ferroloop:new_event_loop"}[loop_kind]
    app = AsgiApp()
    config = uvicorn_config(app, loop=loop_option, http="h11")
    server = uvicorn.Server(config)
    errors = []

    def serve_in_thread():
        try:
            server.run()  # asyncio.run(server.serve(), loop_factory=config.get_loop_factory())
        except BaseException as exc:  # noqa: BLE001 -- handed to the test thread below
            errors.append(exc)

    thread = threading.Thread(target=serve_in_thread, name="uvicorn-server")
    thread.start()
    try:

        async def main():
            await wait_until(lambda: server.started or not thread.is_alive(), "uvicorn started")
            assert server.started, errors
            port = server.servers[0].sockets[0].getsockname()[1]
            async with httpx.AsyncClient() as client:
                response = await client.get(f"http://{HOST}:{port}/hello")
            server.should_exit = True
            await wait_until(lambda: not thread.is_alive(), "uvicorn thread finished")
            return response

        response = run(loop, main())
    finally:
        server.should_exit = True
        thread.join(WATCHDOG)
    assert not thread.is_alive()
    assert errors == []
    assert (response.status_code, response.text) == (200, "hello /hello")
    assert app.lifespan == ["startup", "shutdown"]
    server_loops = {id(lp): lp for lp in app.loops}
    assert len(server_loops) == 1
    (server_loop,) = server_loops.values()
    assert server_loop is not loop
    if loop_kind == "ferroloop":
        assert isinstance(server_loop, import_ferroloop().Loop)
    else:
        assert type(server_loop) is asyncio.SelectorEventLoop
    assert server_loop.is_closed()


def test_websockets_server_and_client(loop):
    async def echo(connection):
        async for message in connection:
            await connection.send(message)

    async def main():
        async with websockets.asyncio.server.serve(echo, HOST, 0, max_size=None) as server:
            port = server.sockets[0].getsockname()[1]
            large = big_body()[: 1024 * 1024]
            async with websockets.asyncio.client.connect(
                f"ws://{HOST}:{port}", max_size=None
            ) as ws:
                pong = await ws.ping(b"hi")
                latency = await pong
                await ws.send("text")
                text = await ws.recv()
                await ws.send(large)
                back = await ws.recv()
            return latency >= 0, text, back == large, ws.close_code

    pong_ok, text, big_ok, close_code = run(loop, main())
    assert pong_ok
    assert text == "text"
    assert big_ok
    assert close_code == 1000


# ---------------------------------------------------------------------------------------
# anyio on the asyncio backend


def test_anyio_task_group(loop):
    async def main():
        done = []

        async def child(n):
            await anyio.lowlevel.checkpoint()
            done.append(n)

        async def starter(*, task_status=anyio.TASK_STATUS_IGNORED):
            task_status.started("ready")
            await anyio.lowlevel.checkpoint()
            done.append("started")

        async with anyio.create_task_group() as tg:
            for n in range(10):
                tg.start_soon(child, n)
            value = await tg.start(starter)

        cancelled = []

        async def sleeper():
            try:
                await anyio.sleep(3600)
            except anyio.get_cancelled_exc_class():
                cancelled.append(True)
                raise

        async def failer():
            await anyio.lowlevel.checkpoint()
            raise ValueError("boom")

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(sleeper)
                tg.start_soon(failer)
        except BaseExceptionGroup as group:
            errors = [type(e) for e in group.exceptions]
        return value, sorted(done, key=str), cancelled, errors, anyio.get_current_task().name

    value, done, cancelled, errors, _ = run(loop, main())
    assert value == "ready"
    assert done == sorted([*range(10), "started"], key=str)
    assert cancelled == [True]  # the failing child cancelled its sibling
    assert errors == [ValueError]


def test_anyio_cancel_scopes_and_timeouts(loop):
    async def main():
        with anyio.move_on_after(0.05) as scope:
            await anyio.sleep(3600)
        moved_on = scope.cancelled_caught

        timed_out = False
        try:
            with anyio.fail_after(0.05):
                await anyio.sleep(3600)
        except TimeoutError:
            timed_out = True

        shielded_finished = False
        with anyio.CancelScope() as outer:
            outer.cancel()
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.01)
                shielded_finished = True
            await anyio.sleep(3600)  # cancelled here, once outside the shield

        async def waiter(scope_box, event):
            with anyio.CancelScope() as inner:
                scope_box.append(inner)
                event.set()
                await anyio.sleep(3600)

        box = []
        event = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter, box, event)
            await event.wait()
            box[0].cancel()  # cancel another task's scope from here

        return moved_on, timed_out, shielded_finished, outer.cancelled_caught, box[0]

    moved_on, timed_out, shielded_finished, outer_caught, inner = run(loop, main())
    assert moved_on
    assert timed_out
    assert shielded_finished
    assert outer_caught
    assert inner.cancel_called and inner.cancelled_caught


def test_anyio_memory_object_streams(loop):
    async def main():
        send, receive = anyio.create_memory_object_stream(0)  # unbuffered: backpressure
        received = []

        async def producer(stream, start):
            async with stream:
                for n in range(start, start + 500):
                    await stream.send(n)

        async def consumer(stream):
            async with stream:
                async for item in stream:
                    received.append(item)

        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer, receive)
            tg.start_soon(producer, send.clone(), 0)
            tg.start_soon(producer, send, 500)  # the stream ends when both senders close

        buffered_send, buffered_receive = anyio.create_memory_object_stream(4)
        for n in range(4):
            buffered_send.send_nowait(n)
        try:
            buffered_send.send_nowait(4)
            full = False
        except anyio.WouldBlock:
            full = True
        buffered_send.close()
        drained = [item async for item in buffered_receive]
        buffered_receive.close()
        return received, full, drained

    received, full, drained = run(loop, main())
    assert sorted(received) == list(range(1000))
    assert [n for n in received if n < 500] == list(range(500))  # order kept per sender
    assert full
    assert drained == [0, 1, 2, 3]


def test_anyio_tcp_streams_connect_and_listener(loop):
    payload = big_body()[: 4 * 1024 * 1024]

    async def handle(stream):
        async with stream:
            buffered = anyio.streams.buffered.BufferedByteReceiveStream(stream)
            greeting = await buffered.receive_until(b"\n", 100)
            await stream.send(b"hello " + greeting + b"\n")
            data = await buffered.receive_exactly(len(payload))
            await stream.send(sha256(data).encode())
            await stream.send_eof()

    async def main():
        listener = await anyio.create_tcp_listener(local_host=HOST, local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handle)
            results = []
            for _ in range(3):
                async with await anyio.connect_tcp(HOST, port) as client:
                    await client.send(b"ferroloop\n")
                    buffered = anyio.streams.buffered.BufferedByteReceiveStream(client)
                    reply = await buffered.receive_until(b"\n", 100)
                    await client.send(payload)
                    digest = b""
                    try:
                        while True:
                            digest += await buffered.receive()
                    except anyio.EndOfStream:
                        pass
                    results.append((reply, digest.decode()))
            tg.cancel_scope.cancel()
        await listener.aclose()
        return results

    results = run(loop, main())
    assert results == [(b"hello ferroloop", sha256(payload))] * 3


def test_anyio_threads_call_back_into_the_loop(loop):
    async def main():
        def in_worker(n):
            # a worker thread calls back into the event loop and waits for the answer
            back = anyio.from_thread.run_sync(lambda: threading.current_thread().name)
            return n * 2, back, threading.current_thread().name

        async def async_in_loop(n):
            await anyio.lowlevel.checkpoint()
            return n + 1

        results = []
        async with anyio.create_task_group() as tg:

            async def one(n):
                results.append(await anyio.to_thread.run_sync(in_worker, n))

            for n in range(5):
                tg.start_soon(one, n)
        plus = await anyio.to_thread.run_sync(lambda: anyio.from_thread.run(async_in_loop, 41))
        return sorted(results), plus, threading.current_thread().name

    results, plus, loop_thread = run(loop, main())
    assert [(doubled, back) for doubled, back, _ in results] == [
        (n * 2, loop_thread) for n in range(5)
    ]
    assert all(worker != loop_thread for _, _, worker in results)
    assert plus == 42


def test_anyio_run_with_a_loop_factory(loop):
    async def main():
        await anyio.lowlevel.checkpoint()
        return asyncio.get_running_loop(), anyio.get_current_task().name

    running, _ = anyio.run(main, backend="asyncio", backend_options={"loop_factory": lambda: loop})
    assert running is loop
    assert loop.is_closed()
