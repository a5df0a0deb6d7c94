"""asyncpg and redis-py (redis.asyncio) end to end against real servers, on both loops.

Each test runs the same program on asyncio's loop and on ferroloop (the ``loop`` fixture), so
one that passes on "asyncio" and fails on "ferroloop" is a ferroloop bug. The servers, a
PostgreSQL cluster and a Redis server, are started once per test session in a temporary
directory (TCP on 127.0.0.1, TLS with a throwaway CA's certificate, and a Unix socket each)
and stopped at the end; two tests restart them. Every test also checks that its program
shut down cleanly: no ResourceWarning or other warning, no error logged by asyncio ("Task
was destroyed but it is pending!", unclosed transports, exceptions nobody retrieved) and no
file descriptor left open. Nothing is timed.

The libraries come from tests/requirements-libraries.txt; a missing one fails this module.
A missing server binary skips the tests that need it, with the reason, except under CI
(``CI`` set), where it fails them: `make test-servers` (run by .ci/run) installs the servers.
"""

import asyncio
import datetime
import decimal
import errno
import gc
import glob
import hashlib
import io
import logging
import os
import pwd
import random
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import typing
import uuid
import warnings

import pytest

_REQUIREMENTS = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "requirements-libraries.txt"
)
try:
    import asyncpg
    import redis._parsers
    import redis.asyncio
    import redis.asyncio.connection
    import redis.asyncio.retry
    import redis.backoff
    import redis.exceptions
    import redis.utils
    import trustme
except ImportError as exc:  # pragma: no cover - only when the test dependencies are missing
    raise ImportError(
        f"tests/test_libraries_db.py needs the libraries in {_REQUIREMENTS}: {exc}. "
        f"Install them with: python -m pip install -r {_REQUIREMENTS}"
    ) from exc

HOST = "127.0.0.1"
# Only ever reached when a test fails: a hung library program becomes a TimeoutError.
WATCHDOG = 30.0
# Server start and stop, done from the test thread (not the loop): generous bounds.
SERVER_TIMEOUT = 60.0
IN_CI = bool(os.environ.get("CI"))


def run(loop, main):
    """Run ``main`` on ``loop`` as asyncio.run would, bounded by WATCHDOG."""

    async def guarded():
        async with asyncio.timeout(WATCHDOG):
            return await main

    with asyncio.Runner(loop_factory=lambda: loop) as runner:
        return runner.run(guarded())


async def wait_until(predicate):
    """Poll ``predicate`` (a function or a coroutine function) until it is true.

    The caller's run is bounded by WATCHDOG, so a condition that never comes fails the test.
    """
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.005)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def unique(prefix):
    """A fresh name, so the asyncio and ferroloop runs of a test never share server state."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def free_port():
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def log_tail(path):
    """The end of a server's log file ("" when it wrote none), for a start-up failure."""
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.read()[-2000:]


def unavailable(reason):
    """A server cannot run here: skip, but fail under CI, which must run these tests."""
    if IN_CI:
        pytest.fail(f"{reason} (CI must run the database tests: see `make test-servers`)")
    pytest.skip(reason)


# ---------------------------------------------------------------------------------------
# Clean shutdown: warnings, asyncio's error log and file descriptors, around every test.


def open_fds():
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return fds


@pytest.fixture(autouse=True)
def clean_shutdown(caplog):
    """Fail a test whose program left a warning, an asyncio error log or an open fd behind.

    Autouse, so it is set up before the ``loop`` fixture and torn down after it: the loop is
    closed by then and the garbage collector has run, so a leaked transport or task shows.
    """
    gc.collect()
    before = open_fds()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
        gc.collect()
    leaked = {fd: target for fd, target in open_fds().items() if fd not in before}
    logged = [
        record.getMessage()
        for record in caplog.get_records("call") + caplog.get_records("teardown")
        if record.name == "asyncio" and record.levelno >= logging.ERROR
    ]
    problems = [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))
    ]
    assert not problems, problems
    assert not logged, logged
    assert not leaked, f"file descriptors left open: {leaked}"


# ---------------------------------------------------------------------------------------
# The servers


class Certificates:
    """A throwaway CA and a server certificate for 127.0.0.1, made once per session."""

    def __init__(self):
        self.ca = trustme.CA()
        self.server = self.ca.issue_cert(HOST, "localhost")

    def write(self, directory, owner=None):
        """Write ca.pem, server.pem (the chain) and server.key (mode 0600) into directory."""
        paths = {}
        for name, blob in (
            ("ca.pem", self.ca.cert_pem),
            ("server.pem", None),
            ("server.key", self.server.private_key_pem),
        ):
            path = os.path.join(directory, name)
            if blob is None:
                with open(path, "wb") as f:
                    f.writelines(pem.bytes() for pem in self.server.cert_chain_pems)
            else:
                blob.write_to_path(path)
            os.chmod(path, 0o600)
            if owner is not None:
                os.chown(path, *owner)
            paths[name] = path
        return paths

    def client_context(self):
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


@pytest.fixture(scope="session")
def certificates():
    return Certificates()


def _run_checked(cmd, what, **kwargs):
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=SERVER_TIMEOUT, check=False, **kwargs
    )
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}): {result.stdout}{result.stderr}")
    return result


class PostgresServer:
    """A throwaway PostgreSQL cluster: TCP on 127.0.0.1 and a Unix socket in its directory.

    PostgreSQL refuses to run as root: as root, every server command runs as the ``postgres``
    user (runuser), and the directory belongs to that user.
    """

    def __init__(self, bindir, root, tls_files):
        self.bindir = bindir
        self.root = root
        self.tls_files = tls_files
        self.data = os.path.join(root, "data")
        self.log = os.path.join(root, "postgres.log")
        self.socket_dir = root
        self.port = free_port()
        self.user = "postgres"
        self.as_root = os.geteuid() == 0

    def _cmd(self, program, *args):
        cmd = [os.path.join(self.bindir, program), *args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return cmd

    def init(self):
        _run_checked(
            self._cmd(
                "initdb", "-D", self.data, "-U", self.user, "-A", "trust", "-E", "UTF8",
                "--no-sync", "--no-instructions",
            ),
            "initdb",
            cwd=self.root,
        )  # fmt: skip

    def start(self):
        options = " ".join(
            [
                f"-p {self.port}",
                f"-k {self.socket_dir}",
                f"-c listen_addresses={HOST}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
                # a backend notices its client went away even mid-query (pg_sleep)
                "-c client_connection_check_interval=100",
                "-c ssl=on",
                f"-c ssl_cert_file={self.tls_files['server.pem']}",
                f"-c ssl_key_file={self.tls_files['server.key']}",
            ]
        )
        _run_checked(
            self._cmd("pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "start"),
            "pg_ctl start",
            cwd=self.root,
        )

    def stop(self):
        _run_checked(
            self._cmd("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop"),
            "pg_ctl stop",
            cwd=self.root,
        )

    def connect_args(self, unix=False, ssl=False):
        """asyncpg.connect / create_pool keywords (a host starting with "/" is a socket dir).

        TCP connections are plain unless ``ssl`` is given (asyncpg's default, "prefer",
        would negotiate TLS with this server): the TLS tests ask for it.
        """
        host = self.socket_dir if unix else HOST
        args = {"host": host, "port": self.port, "user": self.user, "database": "postgres"}
        if not unix:
            args["ssl"] = ssl
        return args


def _find_postgres():
    initdb = shutil.which("initdb")
    if initdb is None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key)
        initdb = found[-1] if found else None
    if initdb is None:
        unavailable("PostgreSQL (initdb) is not installed: `make test-servers` installs it")
    bindir = os.path.dirname(os.path.realpath(initdb))
    if not os.path.exists(os.path.join(bindir, "pg_ctl")):
        unavailable(f"PostgreSQL's pg_ctl is not next to {initdb}")
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            unavailable("running as root, and there is no runuser to start PostgreSQL with")
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root, and there is no postgres user to run PostgreSQL as")
    return bindir


def _version_key(path):
    parts = path.split("/")
    return [int(p) if p.isdigit() else 0 for p in parts]


@pytest.fixture(scope="session")
def postgres(certificates):
    bindir = _find_postgres()
    root = tempfile.mkdtemp(prefix="ferroloop-pg-")
    owner = None
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        owner = (entry.pw_uid, entry.pw_gid)
        os.chown(root, *owner)
    server = PostgresServer(bindir, root, certificates.write(root, owner))
    try:
        try:
            server.init()
            server.start()
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            unavailable(f"PostgreSQL did not start: {exc}\n{log_tail(server.log)}")
        yield server
    finally:
        try:
            server.stop()
        except (OSError, RuntimeError, subprocess.SubprocessError):
            pass
        shutil.rmtree(root, ignore_errors=True)


class RedisServer:
    """A throwaway Redis server: TCP on 127.0.0.1 and a Unix socket, nothing persisted."""

    def __init__(self, binary, root, tls_files):
        self.binary = binary
        self.root = root
        self.tls_files = tls_files
        self.port = free_port()
        self.tls_port = free_port()
        self.unix_socket = os.path.join(root, "redis.sock")
        self.log = os.path.join(root, "redis.log")
        self.process = None

    def start(self):
        cmd = [
            self.binary,
            "--port", str(self.port),
            "--bind", HOST,
            "--unixsocket", self.unix_socket,
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.root,
            "--logfile", self.log,
            "--daemonize", "no",
            "--tls-port", str(self.tls_port),
            "--tls-cert-file", self.tls_files["server.pem"],
            "--tls-key-file", self.tls_files["server.key"],
            "--tls-ca-cert-file", self.tls_files["ca.pem"],
            "--tls-auth-clients", "no",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + SERVER_TIMEOUT
        while not self._answers_ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def _answers_ping(self):
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(self.unix_socket)
                sock.sendall(b"PING\r\n")
                return sock.recv(16) == b"+PONG\r\n"
        except OSError:
            return False

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(SERVER_TIMEOUT)
        self.process = None


@pytest.fixture(scope="session")
def redis_server(certificates):
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("redis-server is not installed: `make test-servers` installs it")
    root = tempfile.mkdtemp(prefix="ferroloop-redis-")
    server = RedisServer(binary, root, certificates.write(root))
    try:
        try:
            server.start()
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            unavailable(f"Redis did not start: {exc}\n{log_tail(server.log)}")
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# asyncpg


class TrackedConnection(asyncpg.Connection):
    """An asyncpg connection class that remembers its instances (for pools: which to watch)."""

    instances: typing.ClassVar[list] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        TrackedConnection.instances.append(self)


async def backend_running(conn, pid, query_like):
    """True once backend ``pid`` is running a query that contains ``query_like``."""
    return await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE pid = $1 AND state = 'active' AND query LIKE '%' || $2 || '%'",
        pid,
        query_like,
    )


async def no_backend_running(conn, query_like):
    """True once no other backend runs a query that contains ``query_like``."""
    count = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE pid <> pg_backend_pid() AND state = 'active' AND query LIKE '%' || $1 || '%'",
        query_like,
    )
    return count == 0


def test_asyncpg_pool_runs_concurrent_queries(loop, postgres):
    async def main():
        table = unique("pool")
        async with asyncpg.create_pool(**postgres.connect_args(), min_size=2, max_size=10) as pool:
            await pool.execute(f"CREATE TABLE {table} (n int PRIMARY KEY, pid int)")

            async def query(n):
                row = await pool.fetchrow("SELECT $1::int * 2 AS n, pg_backend_pid() AS pid", n)
                return row["n"], row["pid"]

            rows = await asyncio.gather(*(query(n) for n in range(200)))

            busy = 0
            most = 0

            async def insert(n):
                nonlocal busy, most
                async with pool.acquire() as conn:
                    busy += 1
                    most = max(most, busy)
                    async with conn.transaction():
                        await conn.execute(f"INSERT INTO {table} VALUES ($1, pg_backend_pid())", n)
                        await conn.execute("SELECT pg_sleep(0.001)")
                    busy -= 1

            await asyncio.gather(*(insert(n) for n in range(100)))
            stored = await pool.fetch(f"SELECT n, pid FROM {table} ORDER BY n")
            await pool.execute(f"DROP TABLE {table}")
            size = pool.get_size()
        return rows, most, [r["n"] for r in stored], {r["pid"] for r in stored}, size

    rows, most, stored, writers, size = run(loop, main())
    assert [n for n, _ in rows] == [n * 2 for n in range(200)]
    assert 1 <= len({pid for _, pid in rows}) <= 10  # the pool's connections, reused
    assert 1 <= most <= 10  # never more connections out than max_size
    assert stored == list(range(100))
    assert 1 <= len(writers) <= 10
    assert size <= 10


def test_asyncpg_prepared_statements_types_and_executemany(loop, postgres):
    async def main():
        table = unique("prep")
        conn = await asyncpg.connect(**postgres.connect_args())
        try:
            await conn.execute(
                f"CREATE TABLE {table} (id int PRIMARY KEY, name text, data bytea, price numeric)"
            )
            rows = [
                (i, f"name-{i}", bytes([i % 256]) * (i % 50), decimal.Decimal(i) / 100)
                for i in range(5000)
            ]
            await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2, $3, $4)", rows)

            stmt = await conn.prepare(f"SELECT name, data, price FROM {table} WHERE id = $1")
            params = [t.name for t in stmt.get_parameters()]
            columns = [a.name for a in stmt.get_attributes()]
            fetched = [tuple(await stmt.fetchrow(i)) for i in (0, 7, 4999)]
            missing = await stmt.fetchrow(5000)
            many = [await stmt.fetchval(i) for i in range(0, 5000, 50)]
            # one connection runs one operation at a time: tasks started together (in order)
            # find it busy, all but the first
            busy = await asyncio.gather(
                *(stmt.fetchval(i) for i in range(10)), return_exceptions=True
            )
            busy = [r if isinstance(r, str) else type(r).__name__ for r in busy]
            ranged = await conn.prepare(
                f"SELECT count(*), sum(id) FROM {table} WHERE id BETWEEN $1 AND $2"
            )
            window = tuple(await ranged.fetchrow(100, 199))
            values = await conn.fetchrow(
                "SELECT $1::int[] AS arr, $2::uuid AS u, $3::timestamptz AS ts,"
                " $4::jsonb AS j, $5::interval AS iv, ROW(1, 'x') AS rec",
                [1, 2, None, 4],
                uuid.UUID(int=42),
                datetime.datetime(2024, 2, 29, 12, 30, tzinfo=datetime.UTC),
                '{"a": [1, 2]}',
                datetime.timedelta(days=1, seconds=5),
            )
            try:
                await conn.fetchval(f"SELECT no_such_column FROM {table}")
                error = None
            except asyncpg.PostgresError as exc:
                error = (type(exc).__name__, exc.sqlstate)
            after_error = await stmt.fetchval(1)
            await conn.execute(f"DROP TABLE {table}")
        finally:
            await conn.close()
        return (
            params,
            columns,
            fetched,
            missing,
            many,
            busy,
            window,
            dict(values),
            error,
            after_error,
        )

    result = run(loop, main())
    params, columns, fetched, missing, many, busy, window, values, error, after_error = result
    assert params == ["int4"]
    assert columns == ["name", "data", "price"]
    assert fetched == [
        ("name-0", b"", decimal.Decimal("0.00")),
        ("name-7", b"\x07" * 7, decimal.Decimal("0.07")),
        ("name-4999", bytes([4999 % 256]) * (4999 % 50), decimal.Decimal("49.99")),
    ]
    assert missing is None
    assert many == [f"name-{i}" for i in range(0, 5000, 50)]
    assert busy == ["name-0"] + ["InterfaceError"] * 9
    assert window == (100, sum(range(100, 200)))
    assert values["arr"] == [1, 2, None, 4]
    assert values["u"] == uuid.UUID(int=42)
    assert values["ts"] == datetime.datetime(2024, 2, 29, 12, 30, tzinfo=datetime.UTC)
    assert values["j"] == '{"a": [1, 2]}'
    assert values["iv"] == datetime.timedelta(days=1, seconds=5)
    assert tuple(values["rec"]) == (1, "x")
    assert error == ("UndefinedColumnError", "42703")
    assert after_error == "name-1"


def test_asyncpg_cursors_and_many_rows(loop, postgres):
    rows_wanted = 200_000

    async def main():
        conn = await asyncpg.connect(**postgres.connect_args())
        try:
            query = "SELECT g, md5(g::text) AS h FROM generate_series(1, $1) AS g"
            # all rows at once (about 10 MiB of protocol data)
            everything = await conn.fetch(query, rows_wanted)
            fetched = hashlib.sha256()
            for record in everything:
                fetched.update(f"{record['g']}:{record['h']}\n".encode())
            # the same rows through a server-side cursor, 1000 at a time
            iterated = hashlib.sha256()
            count = 0
            async with conn.transaction():
                async for record in conn.cursor(query, rows_wanted, prefetch=1000):
                    iterated.update(f"{record['g']}:{record['h']}\n".encode())
                    count += 1
                cursor = await conn.cursor("SELECT g FROM generate_series(1, 100) AS g")
                first = [r["g"] for r in await cursor.fetch(5)]
                skipped = await cursor.forward(10)
                one = (await cursor.fetchrow())["g"]
                rest = [r["g"] for r in await cursor.fetch(1000)]
                past_end = await cursor.fetchrow()
            expected = hashlib.sha256()
            for g in range(1, rows_wanted + 1):
                expected.update(f"{g}:{hashlib.md5(str(g).encode()).hexdigest()}\n".encode())
        finally:
            await conn.close()
        return (
            len(everything),
            fetched.hexdigest(),
            count,
            iterated.hexdigest(),
            expected.hexdigest(),
            (first, skipped, one, rest, past_end),
        )

    total, fetched, count, iterated, expected, cursor = run(loop, main())
    assert total == count == rows_wanted
    assert fetched == iterated == expected
    first, skipped, one, rest, past_end = cursor
    assert first == [1, 2, 3, 4, 5]
    assert skipped == 10
    assert one == 16
    assert rest == list(range(17, 101))
    assert past_end is None


def test_asyncpg_large_values(loop, postgres):
    blob = random.Random(5).randbytes(8 * 1024 * 1024)
    text = "ferroloop \u00e9\u6f22 " * (4 * 1024 * 1024 // 16)

    async def main():
        conn = await asyncpg.connect(**postgres.connect_args())
        try:
            back = await conn.fetchval("SELECT $1::bytea", blob)
            digest = await conn.fetchval("SELECT encode(sha256($1::bytea), 'hex')", blob)
            text_back = await conn.fetchval("SELECT $1::text", text)
            length = await conn.fetchval("SELECT length($1::text)", text)
            made = await conn.fetchval("SELECT repeat('x', 16 * 1024 * 1024)")
        finally:
            await conn.close()
        async with asyncpg.create_pool(**postgres.connect_args(), min_size=1, max_size=5) as pool:
            many = await asyncio.gather(
                *(pool.fetchval("SELECT length($1::bytea)", blob[: n * 200_000]) for n in range(20))
            )
        return back == blob, digest, text_back == text, length, len(made), many

    same, digest, text_same, length, made, many = run(loop, main())
    assert same
    assert digest == sha256(blob)
    assert text_same
    assert length == len(text)
    assert made == 16 * 1024 * 1024
    assert many == [n * 200_000 for n in range(20)]


def test_asyncpg_copy_in_and_out(loop, postgres):
    records = [(i, f"row {i}", i * 0.5) for i in range(100_000)]
    csv_lines = [f"{i},csv {i},{i / 4}\n" for i in range(100_000, 150_000)]

    async def csv_source():
        chunk = []
        for line in csv_lines:
            chunk.append(line)
            if len(chunk) == 5000:
                yield "".join(chunk).encode()
                chunk = []
                await asyncio.sleep(0)
        if chunk:
            yield "".join(chunk).encode()

    async def main():
        table = unique("copy")
        conn = await asyncpg.connect(**postgres.connect_args())
        try:
            await conn.execute(f"CREATE TABLE {table} (id int, label text, value float8)")
            binary = await conn.copy_records_to_table(table, records=records)
            text = await conn.copy_to_table(table, source=csv_source(), format="csv")
            count = await conn.fetchval(f"SELECT count(*) FROM {table}")

            to_file = io.BytesIO()
            out_status = await conn.copy_from_table(table, output=to_file, format="csv")

            received = []

            async def sink(data):
                received.append(bytes(data))

            query_status = await conn.copy_from_query(
                f"SELECT id, label FROM {table} WHERE id % $1 = 0 ORDER BY id",
                1000,
                output=sink,
                format="text",
            )
            await conn.execute(f"DROP TABLE {table}")
        finally:
            await conn.close()
        return binary, text, count, out_status, to_file.getvalue(), query_status, received

    binary, text, count, out_status, dumped, query_status, received = run(loop, main())
    assert binary == "COPY 100000"
    assert text == "COPY 50000"
    assert count == 150_000
    assert out_status == "COPY 150000"
    lines = dumped.decode().splitlines()
    assert len(lines) == 150_000
    expected = {f"{i},row {i},{i * 0.5:g}" for i, _, _ in records[:3]}
    assert expected <= set(lines)
    assert "149999,csv 149999,37499.75" in lines
    assert query_status == "COPY 150"
    assert b"".join(received).decode().splitlines() == [
        f"{i}\t{'row' if i < 100_000 else 'csv'} {i}" for i in range(0, 150_000, 1000)
    ]


def test_asyncpg_listen_notify_and_notices(loop, postgres):
    async def main():
        channel = unique("chan")
        listener = await asyncpg.connect(**postgres.connect_args())
        notifier = await asyncpg.connect(**postgres.connect_args(unix=True))
        received = []
        notices = []
        try:

            def on_notify(conn, pid, chan, payload):
                received.append((pid, chan, payload))

            await listener.add_listener(channel, on_notify)
            listener.add_log_listener(lambda conn, message: notices.append(message.message))
            for n in range(100):
                await notifier.execute("SELECT pg_notify($1, $2)", channel, f"single {n}")
            async with notifier.transaction():  # delivered together, at commit
                for n in range(100):
                    await notifier.execute("SELECT pg_notify($1, $2)", channel, f"tx {n}")
                before_commit = len(received)
            await notifier.execute("SELECT pg_notify($1, $2)", channel, "x" * 7000)
            await wait_until(lambda: len(received) == 201)
            # a notification to itself, and notices raised by the server while it runs a query
            await listener.execute(f"NOTIFY {channel}, 'self'")
            await listener.execute(
                "DO $$ BEGIN RAISE NOTICE 'first'; RAISE WARNING 'second'; END $$"
            )
            await wait_until(lambda: len(received) == 202 and len(notices) == 2)
            # an async listener runs as a task; a removed listener hears nothing more
            other = channel + "_other"
            later = []

            async def on_other(conn, pid, chan, payload):
                await asyncio.sleep(0)
                later.append(payload)

            await listener.add_listener(other, on_other)
            await listener.remove_listener(channel, on_notify)
            await notifier.execute("SELECT pg_notify($1, 'unheard')", channel)
            await notifier.execute("SELECT pg_notify($1, 'heard')", other)
            await wait_until(lambda: later)
            notifier_pid = notifier.get_server_pid()
            listener_pid = listener.get_server_pid()
        finally:
            await listener.close()
            await notifier.close()
        return received, notices, before_commit, notifier_pid, listener_pid, channel, later

    result = run(loop, main())
    received, notices, before_commit, notifier_pid, listener_pid, channel, later = result
    payloads = [payload for _, _, payload in received]
    assert payloads[:100] == [f"single {n}" for n in range(100)]
    assert before_commit <= 100  # nothing from the transaction before it committed
    assert payloads[100:200] == [f"tx {n}" for n in range(100)]
    assert payloads[200] == "x" * 7000
    assert payloads[201] == "self"
    assert {pid for pid, _, _ in received[:201]} == {notifier_pid}
    assert received[201][0] == listener_pid
    assert {chan for _, chan, _ in received} == {channel}
    assert notices == ["first", "second"]
    assert len(received) == 202  # not "unheard"
    assert later == ["heard"]


def test_asyncpg_timeouts_and_cancellation_mid_query(loop, postgres):
    sleep_query = "SELECT pg_sleep(30) -- "  # each query below gets its own tag after this

    async def main():
        results = {}
        conn = await asyncpg.connect(**postgres.connect_args())
        watcher = await asyncpg.connect(**postgres.connect_args())
        pid = conn.get_server_pid()
        try:
            # asyncpg's own timeout: it sends a cancel request, the connection stays usable
            try:
                await conn.fetchval(sleep_query + "timeout", timeout=0.1)
            except TimeoutError as exc:
                results["timeout"] = type(exc).__name__
            results["after timeout"] = await conn.fetchval("SELECT 1")

            # asyncio.wait_for cancels the query task
            try:
                await asyncio.wait_for(conn.fetchval(sleep_query + "wait_for"), 0.1)
            except TimeoutError as exc:
                results["wait_for"] = type(exc).__name__
            results["after wait_for"] = await conn.fetchval("SELECT 2")

            # task.cancel() once the server is known to be running the query
            task = asyncio.create_task(conn.fetchval(sleep_query + "cancel"))
            await wait_until(lambda: backend_running(watcher, pid, "cancel"))
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                results["cancel"] = "CancelledError"
            results["after cancel"] = await conn.fetchval("SELECT 3")

            # cancelled inside a transaction: the transaction rolls back, the connection lives
            table = unique("cancel_tx")
            await conn.execute(f"CREATE TABLE {table} (n int)")

            async def in_transaction():
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES (1)")
                    await conn.execute(sleep_query + "in transaction")

            task = asyncio.create_task(in_transaction())
            await wait_until(lambda: backend_running(watcher, pid, "in transaction"))
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                results["cancel in transaction"] = "CancelledError"
            results["in transaction after"] = conn.is_in_transaction()
            results["rows after"] = await conn.fetchval(f"SELECT count(*) FROM {table}")
            await conn.execute(f"DROP TABLE {table}")

            # the server's statement_timeout: a PostgreSQL error, the connection stays usable
            await conn.execute("SET statement_timeout = 50")
            try:
                await conn.execute(sleep_query + "statement_timeout")
            except asyncpg.PostgresError as exc:
                results["statement_timeout"] = (type(exc).__name__, exc.sqlstate)
            await conn.execute("RESET statement_timeout")

            # no query left running on the server after all that
            await wait_until(lambda: no_backend_running(watcher, "pg_sleep(30)"))
            results["server pid unchanged"] = conn.get_server_pid() == pid
        finally:
            await conn.close()

        # command_timeout: the default timeout of every query on the connection
        conn = await asyncpg.connect(**postgres.connect_args(), command_timeout=0.1)
        try:
            try:
                await conn.fetchval(sleep_query + "command_timeout")
            except TimeoutError as exc:
                results["command_timeout"] = type(exc).__name__
            results["after command_timeout"] = await conn.fetchval("SELECT 4")
        finally:
            await conn.close()

        # a pool: tasks cancelled while holding connections mid-query; the pool recovers
        async with asyncpg.create_pool(**postgres.connect_args(), min_size=1, max_size=4) as pool:
            tasks = [
                asyncio.create_task(pool.fetchval(sleep_query + f"pool {n}")) for n in range(8)
            ]
            await wait_until(
                lambda: watcher.fetchval(
                    "SELECT count(*) = 4 FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
                    " AND state = 'active' AND query LIKE '%-- pool %'"
                )
            )
            for task in tasks:
                task.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            results["pool cancelled"] = [type(o).__name__ for o in outcomes]
            answers = await asyncio.gather(*(pool.fetchval("SELECT $1::int", n) for n in range(50)))
            results["pool after"] = answers == list(range(50))
            await wait_until(lambda: no_backend_running(watcher, "pg_sleep(30)"))
        await watcher.close()
        return results

    results = run(loop, main())
    assert results == {
        "timeout": "TimeoutError",
        "after timeout": 1,
        "wait_for": "TimeoutError",
        "after wait_for": 2,
        "cancel": "CancelledError",
        "after cancel": 3,
        "cancel in transaction": "CancelledError",
        "in transaction after": False,
        "rows after": 0,
        "statement_timeout": ("QueryCanceledError", "57014"),
        "server pid unchanged": True,
        "command_timeout": "TimeoutError",
        "after command_timeout": 4,
        "pool cancelled": ["CancelledError"] * 8,
        "pool after": True,
    }


def test_asyncpg_connection_killed_by_pg_terminate_backend(loop, postgres):
    async def main():
        results = {}
        killer = await asyncpg.connect(**postgres.connect_args())

        # killed while idle: asyncpg notices the connection closing and calls its listeners
        idle = await asyncpg.connect(**postgres.connect_args())
        terminated = []
        idle.add_termination_listener(lambda conn: terminated.append(conn is idle))
        results["terminate idle"] = await killer.fetchval(
            "SELECT pg_terminate_backend($1)", idle.get_server_pid()
        )
        await wait_until(idle.is_closed)
        await wait_until(lambda: terminated)
        try:
            await idle.fetchval("SELECT 1")
        except asyncpg.InterfaceError as exc:
            results["query on killed"] = (type(exc).__name__, str(exc))
        await idle.close()  # closing a dead connection is fine

        # killed mid-query: the running query gets the server's error
        busy = await asyncpg.connect(**postgres.connect_args(unix=True))
        pid = busy.get_server_pid()
        task = asyncio.create_task(busy.fetchval("SELECT pg_sleep(30) -- terminated"))
        await wait_until(lambda: backend_running(killer, pid, "terminated"))
        await killer.fetchval("SELECT pg_terminate_backend($1)", pid)
        try:
            await task
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            results["mid-query"] = (type(exc).__name__, getattr(exc, "sqlstate", None))
        await wait_until(busy.is_closed)
        await busy.close()

        # a pool whose idle connections are killed hands out new ones
        TrackedConnection.instances.clear()
        async with asyncpg.create_pool(
            **postgres.connect_args(), min_size=3, max_size=3, connection_class=TrackedConnection
        ) as pool:

            async def pids():  # 10 queries at once: on a fresh pool, all three connections
                query = "SELECT pg_backend_pid() FROM pg_sleep(0.01)"
                return set(await asyncio.gather(*(pool.fetchval(query) for _ in range(10))))

            old = await pids()
            victims = list(TrackedConnection.instances)
            await killer.fetch("SELECT pg_terminate_backend(p) FROM unnest($1::int[]) p", old)
            await wait_until(lambda: all(conn.is_closed() for conn in victims))
            new = await pids()
            # asyncpg (0.32+) also reconnects closed holders in the background to keep
            # min_size, so how many of the three the next queries use depends on timing
            results["pool"] = (len(old), 1 <= len(new) <= 3, bool(old & new))
        TrackedConnection.instances.clear()
        await killer.close()
        results["terminated listener"] = terminated
        return results

    results = run(loop, main())
    assert results == {
        "terminate idle": True,
        "query on killed": ("InterfaceError", "connection is closed"),
        "mid-query": ("ConnectionDoesNotExistError", "08003"),
        "pool": (3, True, False),
        "terminated listener": [True],
    }


def test_asyncpg_transactions_and_errors(loop, postgres):
    async def main():
        table = unique("tx")
        results = {}
        async with asyncpg.create_pool(**postgres.connect_args(), min_size=3, max_size=3) as pool:
            await pool.execute(f"CREATE TABLE {table} (n int PRIMARY KEY, v int)")
            async with pool.acquire() as a, pool.acquire() as b:
                async with a.transaction():
                    await a.execute(f"INSERT INTO {table} VALUES (1, 10)")
                    # not visible to the other connection before the commit
                    results["uncommitted"] = await b.fetchval(f"SELECT count(*) FROM {table}")
                results["committed"] = await b.fetchval(f"SELECT count(*) FROM {table}")

                try:
                    async with a.transaction():
                        await a.execute(f"INSERT INTO {table} VALUES (2, 20)")
                        raise LookupError("roll back")
                except LookupError:
                    pass
                results["rolled back"] = await a.fetchval(f"SELECT count(*) FROM {table}")

                async with a.transaction():  # savepoints
                    await a.execute(f"INSERT INTO {table} VALUES (3, 30)")
                    try:
                        async with a.transaction():
                            await a.execute(f"INSERT INTO {table} VALUES (4, 40)")
                            await a.execute(f"INSERT INTO {table} VALUES (1, 0)")  # duplicate
                    except asyncpg.UniqueViolationError as exc:
                        results["duplicate"] = (
                            exc.sqlstate,
                            exc.constraint_name == f"{table}_pkey",
                        )
                    await a.execute(f"INSERT INTO {table} VALUES (5, 50)")
                results["after savepoint"] = [
                    r["n"] for r in await a.fetch(f"SELECT n FROM {table} ORDER BY n")
                ]

                # a row lock: b waits for a's transaction, then sees its update
                tx = a.transaction()
                await tx.start()
                await a.execute(f"UPDATE {table} SET v = v + 1 WHERE n = 1")
                b_task = asyncio.create_task(
                    b.fetchval(f"UPDATE {table} SET v = v * 2 WHERE n = 1 RETURNING v")
                )
                await wait_until(
                    lambda: pool.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = $1"
                        " AND wait_event_type = 'Lock'",
                        b.get_server_pid(),
                    )
                )
                await tx.commit()
                results["locked update"] = await b_task

                # serializable write skew: the second commit fails
                ta = a.transaction(isolation="serializable")
                tb = b.transaction(isolation="serializable")
                await ta.start()
                await tb.start()
                sum_a = await a.fetchval(f"SELECT sum(v) FROM {table}")
                sum_b = await b.fetchval(f"SELECT sum(v) FROM {table}")
                await a.execute(f"INSERT INTO {table} VALUES (100, $1)", sum_a)
                await b.execute(f"INSERT INTO {table} VALUES (200, $1)", sum_b)
                await ta.commit()
                try:
                    await tb.commit()
                except asyncpg.SerializationError as exc:
                    results["serialization"] = exc.sqlstate
                results["b in transaction"] = b.is_in_transaction()

                # an error inside a transaction aborts it until the rollback
                try:
                    async with b.transaction():
                        try:
                            await b.execute("SELECT 1 / 0")
                        except asyncpg.DivisionByZeroError:
                            pass
                        await b.execute("SELECT 1")
                except asyncpg.InFailedSQLTransactionError as exc:
                    results["aborted"] = exc.sqlstate
                results["usable"] = await b.fetchval("SELECT 42")
            await pool.execute(f"DROP TABLE {table}")
        return results

    assert run(loop, main()) == {
        "uncommitted": 0,
        "committed": 1,
        "rolled back": 1,
        "duplicate": ("23505", True),
        "after savepoint": [1, 3, 5],
        "locked update": 22,
        "serialization": "40001",
        "b in transaction": False,
        "aborted": "25P02",
        "usable": 42,
    }


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_asyncpg_tcp_and_unix_socket_connections(loop, postgres, transport):
    unix = transport == "unix"

    async def main():
        conn = await asyncpg.connect(**postgres.connect_args(unix=unix))
        try:
            client_addr = await conn.fetchval("SELECT host(inet_client_addr())")
            family = conn._transport.get_extra_info("socket").family
            peer = conn._transport.get_extra_info("peername")
            settings = conn.get_settings().server_encoding
        finally:
            await conn.close()
        async with asyncpg.create_pool(
            **postgres.connect_args(unix=unix), min_size=5, max_size=5
        ) as pool:
            values = await asyncio.gather(
                *(
                    pool.fetchval("SELECT $1::text || pg_backend_pid()::text", f"{n}:")
                    for n in range(150)
                )
            )
        return client_addr, family, peer, settings, values

    client_addr, family, peer, encoding, values = run(loop, main())
    if unix:
        assert client_addr is None
        assert family == socket.AF_UNIX
        assert peer == os.path.join(postgres.socket_dir, f".s.PGSQL.{postgres.port}")
    else:
        assert client_addr == HOST
        assert family == socket.AF_INET
        assert peer == (HOST, postgres.port)
    assert encoding == "UTF8"
    assert [v.split(":")[0] for v in values] == [str(n) for n in range(150)]
    assert len({v.split(":")[1] for v in values}) <= 5


def test_asyncpg_server_restart(loop, postgres):
    async def main():
        results = {}
        TrackedConnection.instances.clear()
        conn = await asyncpg.connect(**postgres.connect_args(unix=True))
        lost = []
        conn.add_termination_listener(lambda c: lost.append(True))
        async with asyncpg.create_pool(
            **postgres.connect_args(), min_size=2, max_size=2, connection_class=TrackedConnection
        ) as pool:
            results["before"] = await asyncio.gather(*(pool.fetchval("SELECT 1") for _ in range(4)))
            # the server stops (fast shutdown) while the loop runs: every connection is lost
            await asyncio.get_running_loop().run_in_executor(None, postgres.stop)
            await wait_until(conn.is_closed)
            await wait_until(lambda: all(c.is_closed() for c in TrackedConnection.instances))
            for name, unix in (("refused tcp", False), ("refused unix", True)):
                try:
                    await asyncpg.connect(**postgres.connect_args(unix=unix))
                except OSError as exc:
                    results[name] = (type(exc).__name__, exc.errno)
            try:
                await pool.fetchval("SELECT 1")
            except OSError as exc:
                results["pool while down"] = (type(exc).__name__, exc.errno)
            await asyncio.get_running_loop().run_in_executor(None, postgres.start)
            results["after"] = await asyncio.gather(*(pool.fetchval("SELECT 2") for _ in range(4)))
        TrackedConnection.instances.clear()
        results["listener"] = lost
        await conn.close()
        return results

    try:
        results = run(loop, main())
    finally:
        if not postgres_is_up(postgres):
            postgres.start()
    assert results == {
        "before": [1] * 4,
        "refused tcp": ("ConnectionRefusedError", errno.ECONNREFUSED),
        "refused unix": ("FileNotFoundError", errno.ENOENT),
        "pool while down": ("ConnectionRefusedError", errno.ECONNREFUSED),
        "after": [2] * 4,
        "listener": [True],
    }


def postgres_is_up(server):
    try:
        with socket.create_connection((HOST, server.port), timeout=5):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------
# redis-py's asyncio client (redis.asyncio), with its pure-Python and its hiredis parser


def redis_parser(name):
    if name == "hiredis":
        if not redis.utils.HIREDIS_AVAILABLE:
            pytest.fail(f"hiredis is not installed: it is in {_REQUIREMENTS}")
        return redis._parsers._AsyncHiredisParser
    return redis._parsers._AsyncRESP3Parser  # redis-py's default protocol is RESP3


# redis-py's connections retry nothing unless told; the tests say which they want.
# For the clients whose commands a short asyncio.wait_for cancels. With a socket timeout,
# redis-py sends each command inside its own asyncio.wait_for; on Python 3.11 a wait_for
# whose inner call has just finished drops a cancellation that arrives then (fixed in 3.12),
# so the outer timeout can be lost and the command goes on to the socket timeout (seen on
# asyncio's loop in debug mode). Without a socket timeout redis-py sends directly.
NO_SOCKET_TIMEOUT = {"socket_timeout": None}
NO_RETRY = {"retry": redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0)}
RETRY = {"retry": redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 3)}


def redis_client(server, parser="python", *, unix=False, tls=None, max_connections=20, **kwargs):
    """A client on its own blocking pool (callers queue when all connections are out).

    ``tls``: a CA certificate (PEM) to trust, for a TLS connection to the server's TLS port.
    """
    if tls is not None:
        kwargs.update(connection_class=redis.asyncio.SSLConnection, ssl_ca_data=tls)
        kwargs.update(host=HOST, port=server.tls_port)
    elif unix:
        kwargs.update(connection_class=redis.asyncio.UnixDomainSocketConnection)
        kwargs.update(path=server.unix_socket)
    else:
        kwargs.update(host=HOST, port=server.port)
    pool = redis.asyncio.BlockingConnectionPool(
        max_connections=max_connections,
        timeout=WATCHDOG,
        parser_class=redis_parser(parser),
        **kwargs,
    )
    return redis.asyncio.Redis.from_pool(pool)


async def redis_clients_named(client, name):
    return [c for c in await client.client_list() if c["name"] == name]


@pytest.fixture(params=["python", "hiredis"])
def parser(request):
    return request.param


def test_redis_pool_runs_concurrent_commands(loop, redis_server, parser):
    async def main():
        prefix = unique("pool")
        async with redis_client(
            redis_server, parser, max_connections=20, client_name=prefix
        ) as client:

            async def set_get(n):
                await client.set(f"{prefix}:{n}", n)
                return int(await client.get(f"{prefix}:{n}"))

            values = await asyncio.gather(*(set_get(n) for n in range(200)))
            counts = await asyncio.gather(*(client.incr(f"{prefix}:counter") for _ in range(200)))
            connections = len(await redis_clients_named(client, prefix))

            await client.hset(f"{prefix}:hash", mapping={f"f{n}": n for n in range(1000)})
            fields = await client.hgetall(f"{prefix}:hash")

            script = client.register_script(
                "return redis.call('INCRBY', KEYS[1], ARGV[1]) + 0 * #ARGV"
            )
            scripted = await asyncio.gather(
                *(script(keys=[f"{prefix}:script"], args=[n]) for n in range(1, 51))
            )

            async def read_stream():
                seen = []
                last = "0"
                while len(seen) < 100:
                    reply = await client.xread({f"{prefix}:stream": last}, block=0)
                    for _stream, entries in reply:
                        for entry_id, data in entries:
                            seen.append(int(data[b"n"]))
                            last = entry_id
                return seen

            reader = asyncio.create_task(read_stream())
            for n in range(100):
                await client.xadd(f"{prefix}:stream", {"n": n})
            streamed = await reader

            keys = sorted([key async for key in client.scan_iter(match=f"{prefix}:*", count=50)])
            deleted = await client.delete(*keys)
        return values, sorted(counts), connections, fields, scripted, streamed, len(keys), deleted

    values, counts, connections, fields, scripted, streamed, keys, deleted = run(loop, main())
    assert values == list(range(200))
    assert counts == list(range(1, 201))
    assert 1 <= connections <= 20
    assert fields == {f"f{n}".encode(): str(n).encode() for n in range(1000)}
    assert max(scripted) == sum(range(1, 51)) and len(set(scripted)) == 50
    assert streamed == list(range(100))
    assert keys == deleted == 200 + 4  # the 200 keys, counter, hash, script, stream


def test_redis_pipelines(loop, redis_server, parser):
    async def main():
        prefix = unique("pipe")
        async with redis_client(redis_server, parser) as client:
            async with client.pipeline(transaction=True) as pipe:
                for n in range(1000):
                    pipe.set(f"{prefix}:{n}", n)
                for n in range(1000):
                    pipe.get(f"{prefix}:{n}")
                transactional = await pipe.execute()

            async with client.pipeline(transaction=False) as pipe:
                pipe.set(f"{prefix}:str", "text").incr(f"{prefix}:n").lpush(f"{prefix}:str", 1)
                pipe.incr(f"{prefix}:n")
                mixed = await pipe.execute(raise_on_error=False)
            mixed = [type(r).__name__ if isinstance(r, Exception) else r for r in mixed]

            try:
                async with client.pipeline(transaction=True) as pipe:
                    pipe.incr(f"{prefix}:n").lpush(f"{prefix}:str", 1).incr(f"{prefix}:n")
                    await pipe.execute()
                raised = None
            except redis.exceptions.ResponseError as exc:
                raised = str(exc).replace(prefix, "<prefix>")
            after_failed = int(await client.get(f"{prefix}:n"))  # MULTI ran the rest anyway

            async def batch(k):
                async with client.pipeline(transaction=k % 2 == 0) as pipe:
                    for _ in range(100):
                        pipe.incr(f"{prefix}:shared")
                    return (await pipe.execute())[-1]

            batches = await asyncio.gather(*(batch(k) for k in range(20)))
            shared = int(await client.get(f"{prefix}:shared"))
            await client.delete(*[key async for key in client.scan_iter(match=f"{prefix}:*")])
        return transactional, mixed, raised, after_failed, batches, shared

    transactional, mixed, raised, after_failed, batches, shared = run(loop, main())
    assert transactional == [True] * 1000 + [str(n).encode() for n in range(1000)]
    assert mixed == [True, 1, "ResponseError", 2]
    assert raised.startswith("Command # 2 (LPUSH <prefix>:str 1) of pipeline caused error")
    assert "WRONGTYPE" in raised
    assert after_failed == 4
    assert len(batches) == 20 and max(batches) == 2000
    assert shared == 2000


def test_redis_large_values(loop, redis_server, parser):
    data = random.Random(7).randbytes(8 * 1024 * 1024)

    async def main():
        prefix = unique("big")
        async with redis_client(redis_server, parser) as client:
            await client.set(f"{prefix}:4", data[: 4 * 1024 * 1024])
            four = await client.get(f"{prefix}:4")
            sizes = [2, 3, 5]

            async def roundtrip(mib):
                await client.set(f"{prefix}:{mib}", data[: mib * 1024 * 1024])
                return sha256(await client.get(f"{prefix}:{mib}"))

            concurrent = await asyncio.gather(*(roundtrip(mib) for mib in sizes))
            async with client.pipeline(transaction=False) as pipe:
                pipe.set(f"{prefix}:8", data).get(f"{prefix}:8").strlen(f"{prefix}:8")
                pipe.getrange(f"{prefix}:8", 1024 * 1024, 2 * 1024 * 1024 - 1)
                _, eight, length, middle = await pipe.execute()
            several = await client.mget([f"{prefix}:{mib}" for mib in (2, 3, 4, 5, 8)])
            await client.rpush(
                f"{prefix}:list", *[data[i : i + 65536] for i in range(0, 4 << 20, 65536)]
            )
            items = await client.lrange(f"{prefix}:list", 0, -1)
            await client.delete(*[key async for key in client.scan_iter(match=f"{prefix}:*")])
        return (
            sha256(four),
            concurrent,
            sha256(eight),
            length,
            sha256(middle),
            [len(v) for v in several],
            sha256(b"".join(items)),
        )

    four, concurrent, eight, length, middle, several, items = run(loop, main())
    mib = 1024 * 1024
    assert four == sha256(data[: 4 * mib])
    assert concurrent == [sha256(data[: n * mib]) for n in (2, 3, 5)]
    assert eight == sha256(data)
    assert length == len(data)
    assert middle == sha256(data[mib : 2 * mib])
    assert several == [2 * mib, 3 * mib, 4 * mib, 5 * mib, 8 * mib]
    assert items == sha256(data[: 4 * mib])


def test_redis_pubsub(loop, redis_server, parser):
    async def main():
        prefix = unique("pubsub")
        channel = f"{prefix}:chan"
        async with redis_client(redis_server, parser) as client:
            sub = client.pubsub()
            await sub.subscribe(channel)
            await sub.psubscribe(f"{prefix}:p:*")
            confirmations = [(await sub.get_message(timeout=WATCHDOG))["type"] for _ in range(2)]
            got = []

            async def listen():
                async for message in sub.listen():
                    if message["type"] in ("message", "pmessage"):
                        got.append((message["type"], message["channel"], message["data"]))
                        if len(got) == 301:
                            return

            reader = asyncio.create_task(listen())
            receivers = []
            for n in range(200):
                receivers.append(await client.publish(channel, f"m{n}"))
            for n in range(100):
                receivers.append(await client.publish(f"{prefix}:p:{n % 3}", f"p{n}"))
            big = random.Random(3).randbytes(1024 * 1024)
            receivers.append(await client.publish(channel, big))
            await reader

            await sub.unsubscribe(channel)
            await sub.punsubscribe()
            unsubscribed = [(await sub.get_message(timeout=WATCHDOG))["type"] for _ in range(2)]
            nobody = await client.publish(channel, "unheard")
            await sub.aclose()

            # a handler-driven reader (PubSub.run) in a task, cancelled at the end
            handled = []
            sub = client.pubsub()
            await sub.subscribe(**{channel: lambda message: handled.append(message["data"])})
            worker = asyncio.create_task(sub.run(poll_timeout=0.01))
            await wait_until(lambda: sub.subscribed)
            for n in range(50):
                await client.publish(channel, f"h{n}")
            await wait_until(lambda: len(handled) == 50)
            worker.cancel()
            try:
                await worker
            except asyncio.CancelledError:
                pass
            await sub.aclose()
        return confirmations, got, receivers, unsubscribed, nobody, handled, big, channel

    confirmations, got, receivers, unsubscribed, nobody, handled, big, channel = run(loop, main())
    assert sorted(confirmations) == ["psubscribe", "subscribe"]
    assert got[:200] == [("message", channel.encode(), f"m{n}".encode()) for n in range(200)]
    assert [(kind, data) for kind, _, data in got[200:300]] == [
        ("pmessage", f"p{n}".encode()) for n in range(100)
    ]
    assert got[300] == ("message", channel.encode(), big)
    assert receivers == [1] * 301
    assert sorted(unsubscribed) == ["punsubscribe", "unsubscribe"]
    assert nobody == 0
    assert handled == [f"h{n}".encode() for n in range(50)]


def test_redis_transactions_with_watch(loop, redis_server, parser):
    async def main():
        prefix = unique("watch")
        key = f"{prefix}:counter"
        async with redis_client(redis_server, parser, max_connections=10) as client:

            async def increment(pipe):
                current = int(await pipe.get(key) or 0)
                pipe.multi()
                pipe.set(key, current + 1)

            # optimistic locking: concurrent read-modify-write, each retried on WatchError
            await asyncio.gather(*(client.transaction(increment, key) for _ in range(50)))
            final = int(await client.get(key))

            async with client.pipeline(transaction=True) as pipe:
                await pipe.watch(key)
                await client.set(key, "changed")  # by someone else, after the WATCH
                pipe.multi()
                pipe.set(key, "mine")
                try:
                    await pipe.execute()
                    conflict = None
                except redis.exceptions.WatchError as exc:
                    conflict = type(exc).__name__
            value = await client.get(key)

            async with client.pipeline(transaction=True) as pipe:
                pipe.set(key, "discarded")
                await pipe.reset()  # nothing sent
            still = await client.get(key)
            await client.delete(key)
        return final, conflict, value, still

    assert run(loop, main()) == (50, "WatchError", b"changed", b"changed")


def test_redis_timeouts_and_cancellation_mid_command(loop, redis_server, parser):
    async def main():
        prefix = unique("timeouts")
        results = {}
        async with (
            redis_client(
                redis_server, parser, max_connections=3, client_name=prefix, **NO_SOCKET_TIMEOUT
            ) as client,
            redis_client(redis_server, parser) as admin,
        ):

            async def blocked(count):
                clients = await redis_clients_named(admin, prefix)
                return sum(c["cmd"] == "blpop" and "b" in c["flags"] for c in clients) == count

            try:
                await asyncio.wait_for(client.blpop([f"{prefix}:empty"], 0), 0.05)
            except TimeoutError as exc:
                results["wait_for"] = type(exc).__name__
            results["after wait_for"] = await client.ping()

            tasks = [asyncio.create_task(client.blpop([f"{prefix}:never{n}"], 0)) for n in range(3)]
            await wait_until(lambda: blocked(3))
            waiting = asyncio.create_task(client.ping())  # queued for a free connection
            for task in tasks:
                task.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            results["cancelled"] = [type(o).__name__ for o in outcomes]
            results["queued"] = await waiting
            # redis-py drops a connection whose command was cancelled: the server sees it close
            await wait_until(lambda: blocked(0))

            # the server's own timeout: BLPOP returns nil
            results["server timeout"] = await client.blpop([f"{prefix}:empty"], 0.05)

            # the client's socket timeout (no retries): redis-py's TimeoutError
            async with redis_client(
                redis_server, parser, socket_timeout=0.05, **NO_RETRY
            ) as impatient:
                try:
                    await impatient.blpop([f"{prefix}:empty"], 0)
                except redis.exceptions.TimeoutError as exc:
                    results["socket timeout"] = str(exc)
                results["after socket timeout"] = await impatient.ping()

            # everything still works: a blocked pop woken by a push from elsewhere
            popper = asyncio.create_task(client.blpop([f"{prefix}:list"], 0))
            await wait_until(lambda: blocked(1))
            await admin.lpush(f"{prefix}:list", "woken")
            results["woken"] = await popper
            results["batch"] = await asyncio.gather(*(client.echo(str(n)) for n in range(100)))
        results["prefix"] = prefix
        return results

    results = run(loop, main())
    assert results.pop("batch") == [str(n).encode() for n in range(100)]
    prefix = results.pop("prefix")
    assert results == {
        "wait_for": "TimeoutError",
        "after wait_for": True,
        "cancelled": ["CancelledError"] * 3,
        "queued": True,
        "server timeout": None,
        "socket timeout": f"Timeout reading from {HOST}:{redis_server.port}",
        "after socket timeout": True,
        "woken": (f"{prefix}:list".encode(), b"woken"),
    }


def test_redis_connection_killed_with_client_kill(loop, redis_server, parser):
    async def main():
        prefix = unique("kill")
        results = {}
        async with (
            redis_client(redis_server, parser, client_name=prefix, **NO_RETRY) as client,
            redis_client(redis_server, parser, client_name=prefix + "_retry", **RETRY) as retrying,
            redis_client(redis_server, parser) as admin,
        ):
            # killed mid-command: the command fails with redis-py's ConnectionError
            task = asyncio.create_task(client.blpop([f"{prefix}:never"], 0))

            async def blocked_id():
                for c in await redis_clients_named(admin, prefix):
                    if c["cmd"] == "blpop":
                        return c["id"]
                return None

            victim = await wait_until(blocked_id)
            results["killed"] = await admin.client_kill_filter(_id=victim)
            try:
                await task
            except redis.exceptions.ConnectionError as exc:
                results["mid-command"] = (type(exc).__name__, str(exc))
            results["after"] = await client.ping()  # a new connection

            # killed while idle in the pool: the next command goes through (a new connection,
            # found dead when taken from the pool or retried by the default retry policy)
            old_id = await retrying.client_id()
            await admin.client_kill_filter(_id=old_id)
            results["idle killed"] = await retrying.ping()
            results["new connection"] = await retrying.client_id() != old_id
        return results

    assert run(loop, main()) == {
        "killed": 1,
        "mid-command": ("ConnectionError", "Connection closed by server."),
        "after": True,
        "idle killed": True,
        "new connection": True,
    }


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_redis_tcp_and_unix_socket_connections(loop, redis_server, transport):
    unix = transport == "unix"
    data = random.Random(11).randbytes(3 * 1024 * 1024)

    async def main():
        prefix = unique(transport)
        async with redis_client(redis_server, unix=unix, client_name=prefix) as client:
            info = await client.client_info()
            values = await asyncio.gather(*(client.echo(f"{n}") for n in range(150)))
            await client.set(prefix, data)
            back = await client.get(prefix)
            await client.delete(prefix)
        return info["addr"], values, back == data

    addr, values, same = run(loop, main())
    if unix:
        assert addr == f"{redis_server.unix_socket}:0"
    else:
        assert addr.startswith(f"{HOST}:")
    assert values == [str(n).encode() for n in range(150)]
    assert same


def test_redis_server_restart(loop, redis_server):
    async def main():
        results = {}
        async with (
            redis_client(redis_server, **NO_RETRY) as tcp,
            redis_client(redis_server, unix=True, **NO_RETRY) as unix,
            redis_client(redis_server, **RETRY) as retrying,
        ):
            results["before"] = [await tcp.ping(), await unix.ping(), await retrying.ping()]
            await asyncio.get_running_loop().run_in_executor(None, redis_server.stop)
            # Without retries the first command fails either on the pooled connection the
            # server closed ("Connection closed by server.") or, if redis-py found it closed
            # first, on connecting: which one depends on when the close was read, so only the
            # second command's error (connecting) is compared.
            for name, client in (("tcp", tcp), ("unix", unix)):
                for attempt in (1, 2):
                    try:
                        await client.ping()
                    except redis.exceptions.ConnectionError as exc:
                        results[f"{name} {attempt}"] = str(exc) if attempt == 2 else "failed"
            try:
                await retrying.ping()  # retried until out of retries: the last error counts
            except redis.exceptions.ConnectionError as exc:
                results["retrying"] = str(exc)
            await asyncio.get_running_loop().run_in_executor(None, redis_server.start)
            results["after"] = [await tcp.ping(), await unix.ping(), await retrying.ping()]
        return results

    try:
        results = run(loop, main())
    finally:
        if redis_server.process is None:
            redis_server.start()
    # asyncio's create_connection error text, inside redis-py's
    address = (HOST, redis_server.port)
    refused = f"Error 111 connecting to {HOST}:{redis_server.port}. Connect call failed {address}."
    assert results == {
        "before": [True] * 3,
        "tcp 1": "failed",
        "tcp 2": refused,
        "unix 1": "failed",
        "unix 2": f"Error 2 connecting to {redis_server.unix_socket}. No such file or directory.",
        "retrying": refused,
        "after": [True] * 3,
    }


# ---------------------------------------------------------------------------------------
# TLS: asyncpg's STARTTLS-like upgrade (loop.start_tls) and redis-py's TLS connections


def test_asyncpg_over_tls(loop, postgres, certificates):
    blob = random.Random(13).randbytes(6 * 1024 * 1024)
    records = [(i, f"tls {i}") for i in range(20_000)]

    async def main():
        results = {}
        context = certificates.client_context()
        conn = await asyncpg.connect(**postgres.connect_args(ssl=context))
        try:
            ssl_object = conn._transport.get_extra_info("ssl_object")
            results["tls"] = (ssl_object is not None, ssl_object.server_hostname)
            results["server sees tls"] = await conn.fetchval(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            )
            results["blob"] = sha256(await conn.fetchval("SELECT $1::bytea", blob))
            rows = await conn.fetch("SELECT g, md5(g::text) FROM generate_series(1, 50000) g")
            results["rows"] = (len(rows), rows[-1][0])
            table = unique("tls")
            await conn.execute(f"CREATE TABLE {table} (id int, label text)")
            results["copy in"] = await conn.copy_records_to_table(table, records=records)
            out = io.BytesIO()
            await conn.copy_from_table(table, output=out, format="csv")
            results["copy out"] = len(out.getvalue().splitlines())
            await conn.execute(f"DROP TABLE {table}")
            # asyncpg's timeout sends its cancel request on a new TLS connection
            try:
                await conn.fetchval("SELECT pg_sleep(30) -- tls", timeout=0.1)
            except TimeoutError as exc:
                results["timeout"] = type(exc).__name__
            results["after timeout"] = await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

        async with asyncpg.create_pool(
            **postgres.connect_args(ssl=context), min_size=4, max_size=4
        ) as pool:
            values = await asyncio.gather(*(pool.fetchval("SELECT $1::int", n) for n in range(100)))
            results["pool"] = values == list(range(100))

        # "require": TLS without verification; a default context does not trust our CA
        conn = await asyncpg.connect(**postgres.connect_args(ssl="require"))
        results["require"] = conn._transport.get_extra_info("ssl_object") is not None
        await conn.close()
        try:
            await asyncpg.connect(**postgres.connect_args(ssl=ssl.create_default_context()))
        except ssl.SSLCertVerificationError as exc:
            results["untrusted"] = (type(exc).__name__, exc.verify_code)
        return results

    assert run(loop, main()) == {
        "tls": (True, HOST),
        "server sees tls": True,
        "blob": sha256(blob),
        "rows": (50_000, 50_000),
        "copy in": "COPY 20000",
        "copy out": 20_000,
        "timeout": "TimeoutError",
        "after timeout": 1,
        "pool": True,
        "require": True,
        "untrusted": ("SSLCertVerificationError", 20),  # unable to get local issuer
    }


def test_redis_over_tls(loop, redis_server, certificates, parser):
    ca = certificates.ca.cert_pem.bytes().decode()
    data = random.Random(17).randbytes(4 * 1024 * 1024)

    async def main():
        prefix = unique("tls")
        results = {}
        async with redis_client(
            redis_server, parser, tls=ca, max_connections=10, **NO_SOCKET_TIMEOUT
        ) as client:
            results["echo"] = await asyncio.gather(*(client.echo(str(n)) for n in range(100)))
            await client.set(prefix, data)
            results["big"] = sha256(await client.get(prefix))
            async with client.pipeline(transaction=True) as pipe:
                for n in range(500):
                    pipe.incr(f"{prefix}:n")
                results["pipeline"] = (await pipe.execute())[-1]
            sub = client.pubsub()
            await sub.subscribe(f"{prefix}:chan")
            await sub.get_message(timeout=WATCHDOG)  # the subscribe confirmation
            for n in range(20):
                await client.publish(f"{prefix}:chan", f"m{n}")
            got = []
            while len(got) < 20:
                message = await sub.get_message(ignore_subscribe_messages=True, timeout=WATCHDOG)
                if message is not None:
                    got.append(message["data"])
            results["pubsub"] = got
            await sub.aclose()
            try:
                await asyncio.wait_for(client.blpop([f"{prefix}:empty"], 0), 0.05)
            except TimeoutError:
                results["cancelled"] = True
            results["after"] = await client.ping()
            await client.delete(prefix, f"{prefix}:n")
        other_ca = trustme.CA().cert_pem.bytes().decode()
        async with redis_client(redis_server, parser, tls=other_ca, **NO_RETRY) as untrusted:
            try:
                await untrusted.ping()
            except redis.exceptions.ConnectionError as exc:
                results["untrusted"] = "certificate verify failed" in str(exc)
        return results

    assert run(loop, main()) == {
        "echo": [str(n).encode() for n in range(100)],
        "big": sha256(data),
        "pipeline": 500,
        "pubsub": [f"m{n}".encode() for n in range(20)],
        "cancelled": True,
        "after": True,
        "untrusted": True,
    }


# ---------------------------------------------------------------------------------------
# Back-pressure and shutdown paths


def test_asyncpg_copy_with_backpressure(loop, postgres):
    # 32 MiB each way: COPY IN fills the transport's write buffer (asyncpg waits for
    # resume_writing), COPY OUT into a slow consumer makes asyncpg pause reading.
    line = "x" * 1000
    lines_per_chunk = 1024
    chunks = 32

    def chunk(k):
        first = k * lines_per_chunk
        return "".join(f"{n},{line}\n" for n in range(first, first + lines_per_chunk)).encode()

    expected = hashlib.sha256()
    for k in range(chunks):
        expected.update(chunk(k))

    async def main():
        table = unique("backpressure")
        conn = await asyncpg.connect(**postgres.connect_args())
        try:
            await conn.execute(f"CREATE TABLE {table} (id int, line text)")

            async def source():
                for k in range(chunks):
                    yield chunk(k)

            copied_in = await conn.copy_to_table(table, source=source(), format="csv")
            received = hashlib.sha256()
            pieces = 0

            async def slow_sink(data):
                nonlocal pieces
                received.update(data)
                pieces += 1
                for _ in range(5):
                    await asyncio.sleep(0)

            copied_out = await conn.copy_from_query(
                f"SELECT id, line FROM {table} ORDER BY id", output=slow_sink, format="csv"
            )
            # a cursor read slowly, with another query on another connection in between
            other = await asyncpg.connect(**postgres.connect_args(unix=True))
            total = 0
            async with conn.transaction():
                async for record in conn.cursor(f"SELECT id FROM {table}", prefetch=2000):
                    total += record["id"]
                    if record["id"] % 4096 == 0:
                        total -= await other.fetchval("SELECT $1::int", record["id"])
            await other.close()
            await conn.execute(f"DROP TABLE {table}")
        finally:
            await conn.close()
        return copied_in, copied_out, received.hexdigest(), pieces, total

    copied_in, copied_out, received, pieces, total = run(loop, main())
    rows = chunks * lines_per_chunk
    assert copied_in == copied_out == f"COPY {rows}"
    assert received == expected.hexdigest()
    assert pieces > 1
    assert total == sum(range(rows)) - sum(range(0, rows, 4096))


def test_asyncpg_pool_close_terminate_and_connection_terminate(loop, postgres):
    async def main():
        results = {}
        watcher = await asyncpg.connect(**postgres.connect_args())

        # Pool.close() waits for the connections out to come back
        pool = await asyncpg.create_pool(**postgres.connect_args(), min_size=2, max_size=2)
        finished = []

        async def slow(n):
            async with pool.acquire() as conn:
                await conn.execute(f"SELECT pg_sleep(0.05) -- close {n}")
                finished.append(n)

        tasks = [asyncio.create_task(slow(n)) for n in range(2)]
        await wait_until(
            lambda: watcher.fetchval(
                "SELECT count(*) = 2 FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
                " AND query LIKE '%-- close %'"
            )
        )
        await pool.close()
        await asyncio.gather(*tasks)
        results["close waited"] = sorted(finished)
        try:
            await pool.fetchval("SELECT 1")
        except asyncpg.InterfaceError as exc:
            results["closed pool"] = str(exc)

        # Pool.terminate() drops the connections at once: the queries fail
        pool = await asyncpg.create_pool(**postgres.connect_args(), min_size=2, max_size=2)
        tasks = [
            asyncio.create_task(pool.fetchval(f"SELECT pg_sleep(30) -- terminate {n}"))
            for n in range(2)
        ]
        await wait_until(
            lambda: watcher.fetchval(
                "SELECT count(*) = 2 FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
                " AND state = 'active' AND query LIKE '%-- terminate %'"
            )
        )
        pool.terminate()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        results["terminated pool"] = sorted(type(o).__name__ for o in outcomes)

        # Connection.terminate() mid-query, on a single connection
        conn = await asyncpg.connect(**postgres.connect_args(unix=True))
        task = asyncio.create_task(conn.fetchval("SELECT pg_sleep(30) -- conn terminate"))
        await wait_until(lambda: backend_running(watcher, conn.get_server_pid(), "conn term"))
        conn.terminate()
        try:
            await task
        except asyncpg.ConnectionDoesNotExistError as exc:
            results["terminated connection"] = type(exc).__name__
        results["is closed"] = conn.is_closed()

        # the server ends those backends once it notices: nothing left running
        await wait_until(lambda: no_backend_running(watcher, "pg_sleep(30)"))
        await watcher.close()
        return results

    assert run(loop, main()) == {
        "close waited": [0, 1],
        "closed pool": "pool is closed",
        "terminated pool": ["ConnectionDoesNotExistError"] * 2,
        "terminated connection": "ConnectionDoesNotExistError",
        "is closed": True,
    }


def test_redis_big_pipeline_and_many_clients(loop, redis_server, parser):
    async def main():
        prefix = unique("bigpipe")
        async with redis_client(redis_server, parser) as client:
            async with client.pipeline(transaction=False) as pipe:
                for n in range(20_000):
                    pipe.set(f"{prefix}:{n}", n)
                sets = await pipe.execute()
            async with client.pipeline(transaction=False) as pipe:
                for n in range(20_000):
                    pipe.get(f"{prefix}:{n}")
                gets = await pipe.execute()

            # 50 separate clients (each its own pool and connection) at once
            async def one(n):
                async with redis_client(redis_server, parser, max_connections=1) as own:
                    return await own.incr(f"{prefix}:clients")

            counts = await asyncio.gather(*(one(n) for n in range(50)))
            deleted = 0
            keys = []
            async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                keys.append(key)
                if len(keys) == 5000:
                    deleted += await client.unlink(*keys)
                    keys = []
            if keys:
                deleted += await client.unlink(*keys)
        return sets.count(True), gets == [str(n).encode() for n in range(20_000)], counts, deleted

    sets, gets_ok, counts, deleted = run(loop, main())
    assert sets == 20_000
    assert gets_ok
    assert sorted(counts) == list(range(1, 51))
    assert deleted == 20_001


# ---------------------------------------------------------------------------------------
# A server that accepts connections (the kernel's backlog) and never answers


@pytest.fixture
def silent_port():
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(16)
        yield listener.getsockname()[1]


def test_asyncpg_connect_timeout_on_a_silent_server(loop, silent_port):
    async def main():
        outcomes = []
        for _ in range(3):
            try:
                await asyncpg.connect(
                    host=HOST, port=silent_port, user="postgres", ssl=False, timeout=0.1
                )
            except TimeoutError as exc:
                outcomes.append(type(exc).__name__)
        return outcomes

    assert run(loop, main()) == ["TimeoutError"] * 3


def test_redis_connect_on_a_silent_server(loop, silent_port, parser):
    async def main():
        outcomes = []
        client = redis.asyncio.Redis.from_pool(
            redis.asyncio.ConnectionPool(
                host=HOST,
                port=silent_port,
                socket_timeout=0.1,
                parser_class=redis_parser(parser),
                **NO_RETRY,
            )
        )
        async with client:
            for _ in range(3):
                try:
                    await client.ping()
                except redis.exceptions.TimeoutError as exc:
                    outcomes.append(str(exc))
        return outcomes

    # redis-py connects, then times out reading the answer to its HELLO
    assert run(loop, main()) == [f"Timeout reading from {HOST}:{silent_port}"] * 3
