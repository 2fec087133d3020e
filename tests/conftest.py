"""Real servers for the tests: a redis-server on a free port, a 3-node Redis Cluster, the
MongoDB wire server (mongoeco in its own Python 3.13 venv), and a database of its own on
the PostgreSQL server at 127.0.0.1:5432 (CREDIT_TEST_POSTGRES_URL names another server).

A missing server skips its suite, except with CREDIT_TEST_STRICT=1 (CI), where it fails.
CREDIT_REDIS_URL points the Redis suite at an existing server instead of starting one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

# Imported now, while the interpreter is fresh: hypothesis' pytest plugin imports this at
# the end of the session otherwise, and pytest's assertion rewriting then runs ast.parse,
# which CPython 3.11.7 can fail with "AST constructor recursion depth mismatch" late in a
# long async session.
import hypothesis.internal.observability  # noqa: F401
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from gateway.core.engine import CreditEngine
from gateway.core.keys import KeySpace

# The fixtures shared across test modules (`api`, `gw`), and their helpers.
pytest_plugins = [
    "tests.support.api_fixtures",
    "tests.support.proxy_fixtures",
    "tests.support.store_fixtures",
]

SUPPORT = Path(__file__).parent / "support"
STRICT = os.environ.get("CREDIT_TEST_STRICT") == "1"


def unavailable(why: str):
    if STRICT:
        pytest.fail(f"CREDIT_TEST_STRICT=1 and {why}", pytrace=False)
    pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_run(n: int) -> int:
    """A first port P such that P..P+n-1 (and their cluster bus ports +10000) look free."""
    for _ in range(200):
        p = free_port()
        if p + n + 10000 > 65535:
            continue
        ok = True
        for q in list(range(p, p + n)) + list(range(p + 10000, p + 10000 + n)):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", q))
                except OSError:
                    ok = False
                    break
        if ok:
            return p
    raise RuntimeError("no run of free ports")


class ManualClock:
    """An injectable clock (seconds) that only moves when told."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    if os.environ.get("CREDIT_REDIS_URL"):
        yield os.environ["CREDIT_REDIS_URL"]
        return
    exe = shutil.which("redis-server")
    if not exe:
        unavailable("redis-server is not installed")
    port = free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(d),
            "--logfile",
            str(d / "redis.log"),
        ],
    )
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        unavailable("redis-server did not start")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def cluster_nodes(tmp_path_factory):
    """A 3-primary Redis Cluster on 127.0.0.1; yields (host, first_port)."""
    if not shutil.which("redis-server") or not shutil.which("redis-cli"):
        unavailable("redis-server / redis-cli are not installed")
    base = tmp_path_factory.mktemp("cluster")
    p0 = free_port_run(3)
    script = SUPPORT / "redis-cluster.sh"
    up = subprocess.run(
        ["bash", str(script), "up", str(base), str(p0), "3"], capture_output=True, text=True, timeout=60
    )
    if up.returncode != 0:
        subprocess.run(["bash", str(script), "down", str(base), str(p0), "3"], capture_output=True)
        unavailable(f"redis cluster did not start: {up.stderr[-500:]}")
    yield ("127.0.0.1", p0)
    subprocess.run(["bash", str(script), "down", str(base), str(p0), "3"], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory):
    if os.environ.get("CREDIT_TEST_MONGO_URI"):
        yield os.environ["CREDIT_TEST_MONGO_URI"]
        return
    venv = subprocess.run(
        ["bash", str(SUPPORT / "mongo_venv.sh")], capture_output=True, text=True, timeout=600
    )
    if venv.returncode != 0:
        unavailable(f"the MongoDB wire server could not be installed: {venv.stderr[-500:]}")
    python = venv.stdout.strip().splitlines()[-1]
    d = tmp_path_factory.mktemp("mongo")
    proc = subprocess.Popen(
        [python, str(SUPPORT / "mongo_wire_server.py"), "--port", "0", "--dir", str(d)],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().strip()
    if not line.startswith("READY "):
        proc.kill()
        unavailable(f"the MongoDB wire server did not start: {line!r}")
    yield f"mongodb://127.0.0.1:{line.split()[1]}/?directConnection=true"
    proc.terminate()
    proc.wait(10)


@pytest_asyncio.fixture(scope="session")
async def postgres_url():
    """A database made for this test run (cg_test_<hex>) on the PostgreSQL server, dropped at
    the end; its URL. The stores of the tests each take a schema of their own in it."""
    import asyncpg

    server = os.environ.get("CREDIT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"cg_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = await asyncpg.connect(server, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        unavailable(f"PostgreSQL is not reachable at {server}: {exc!r}")
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    yield urlunsplit(urlsplit(server)._replace(path=f"/{name}"))
    admin = await asyncpg.connect(server, timeout=10)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest_asyncio.fixture
async def redis(redis_url):
    """A client on the test server, emptied before each test."""
    pool = aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=256, timeout=10)
    client = aioredis.Redis(connection_pool=pool)
    await client.flushall()
    yield client
    await client.aclose()


@pytest_asyncio.fixture
async def cluster(cluster_nodes):
    host, port = cluster_nodes
    client = RedisCluster(host=host, port=port)
    await client.initialize()
    await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    yield client
    await client.aclose()


@pytest_asyncio.fixture
async def store(tmp_path):
    """A SQLite store in the test's temp dir, opened."""
    from gateway.core.store.sqlite import SQLiteStore

    s = SQLiteStore(str(tmp_path / "store.db"))
    await s.open()
    yield s
    await s.close()


@pytest.fixture
def clock():
    return ManualClock()


async def ready_engine(client, clock, partitions: int = 16) -> CreditEngine:
    engine = CreditEngine(client, keys=KeySpace(partitions=partitions), clock=clock)
    for p in range(partitions):
        await engine.mark_ready(p)
    return engine


@pytest_asyncio.fixture
async def engine(redis, clock):
    """An engine on a real redis-server, every partition marked ready, on a manual clock."""
    return await ready_engine(redis, clock)
