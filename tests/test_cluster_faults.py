"""A primary of a 3-node Redis Cluster dies, hangs, or stops serving a slot, under load,
with the client the gateway builds (make_redis in cluster mode).

These tests run their own cluster on free ports (tests/support/redis-cluster.sh), so
killing a node here never touches the cluster of tests/test_cluster.py. Nodes run with
cluster-require-full-coverage no and no replicas: a dead primary takes down its own slots
only. What must hold: calls on the lost slots fail with a redis ConnectionError /
TimeoutError (the API's 503 credit_store_unavailable), promptly; the other nodes' calls
keep succeeding meanwhile; and once the node is back and its partitions are rebuilt,
every call on every slot succeeds again, with no other kind of error on the way.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from dataclasses import dataclass, field

import pytest
import pytest_asyncio
from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.core.cluster import ClusterUnavailable, GatewayRedisCluster, NodeDown
from gateway.core.connections import make_keys, make_redis
from gateway.core.engine import CreditEngine
from gateway.core.errors import StateLost
from gateway.core.recovery import ensure_ready, partition_status, rehydrate
from gateway.core.settings import Settings
from gateway.worker.runner import Worker
from tests.conftest import SUPPORT, free_port_run, unavailable

pytestmark = [pytest.mark.cluster, pytest.mark.faults]

TIMEOUT = 1.0  # CREDIT_REDIS_TIMEOUT_SECONDS of these tests
SCRIPT = SUPPORT / "redis-cluster.sh"
UNAVAILABLE = (RedisConnectionError, RedisTimeoutError)  # what the API answers 503 for


class FaultCluster:
    def __init__(self, base, first_port: int) -> None:
        self.base = base
        self.ports = [first_port + i for i in range(3)]
        self.url = f"redis://127.0.0.1:{first_port}/0"

    async def run(self, cmd: str, port: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            "bash",
            str(SCRIPT),
            cmd,
            str(self.base),
            str(port),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _, err = await proc.communicate()
        assert proc.returncode == 0, f"redis-cluster.sh {cmd} {port}: {err.decode()}"

    async def node(self, port: int) -> Redis:
        return Redis(host="127.0.0.1", port=port, socket_timeout=2)

    async def restore(self) -> None:
        """Every node up, answering, in a cluster that says ok, and empty."""
        for port in self.ports:
            if (self.base / str(port) / "redis.pid").exists():
                await self.run("resume", port)  # harmless on a running node
            else:  # killed
                await self.run("start", port)
        deadline = time.monotonic() + 30
        for port in self.ports:
            r = await self.node(port)
            try:
                while True:
                    with contextlib.suppress(UNAVAILABLE):  # the node is still starting
                        if (await r.cluster("info"))["cluster_state"] == "ok":
                            break
                    assert time.monotonic() < deadline, f"node {port} did not rejoin the cluster"
                    await asyncio.sleep(0.1)
                await r.flushall()
            finally:
                await r.aclose()


@pytest.fixture(scope="module")
def fault_cluster(tmp_path_factory):
    if not shutil.which("redis-server") or not shutil.which("redis-cli"):
        unavailable("redis-server / redis-cli are not installed")
    base = tmp_path_factory.mktemp("fault-cluster")
    p0 = free_port_run(3)
    up = subprocess.run(
        ["bash", str(SCRIPT), "up", str(base), str(p0), "3"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if up.returncode != 0:
        subprocess.run(
            ["bash", str(SCRIPT), "down", str(base), str(p0), "3"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        unavailable(f"redis cluster did not start: {up.stderr[-500:]}")
    yield FaultCluster(base, p0)
    for port in range(p0, p0 + 3):  # a node left paused would never shut down
        subprocess.run(
            ["bash", str(SCRIPT), "resume", str(base), str(port)],
            capture_output=True,
            timeout=10,
            check=False,
        )
    subprocess.run(
        ["bash", str(SCRIPT), "down", str(base), str(p0), "3"], capture_output=True, timeout=60, check=False
    )


@dataclass
class Gateway:
    """An engine on the cluster client exactly as the gateway builds it, and which node
    serves each test user."""

    engine: CreditEngine
    users: list[str]
    node_of: dict[str, int]
    partition_node: dict[int, int]

    def on(self, port: int) -> list[str]:
        return [u for u in self.users if self.node_of[u] == port]

    def off(self, port: int) -> list[str]:
        return [u for u in self.users if self.node_of[u] != port]


@pytest_asyncio.fixture
async def gw(fault_cluster):
    await fault_cluster.restore()
    settings = Settings(
        redis_url=fault_cluster.url, redis_cluster=True, redis_timeout_seconds=TIMEOUT, partitions=16
    )
    client = make_redis(settings)
    await client.initialize()
    engine = CreditEngine(client, keys=make_keys(settings))
    users = [f"fu{i}" for i in range(48)]
    node_of = {u: int(client.get_node_from_key(engine.keys.account_keys(u)[0]).port) for u in users}
    assert set(node_of.values()) == set(fault_cluster.ports)  # users on every node
    partition_node = {
        p: int(client.get_node_from_key(engine.keys.partition(p).events).port)
        for p in range(engine.keys.partitions)
    }
    yield Gateway(engine, users, node_of, partition_node)
    await client.aclose()


@dataclass
class Outcome:
    ok: int = 0
    failures: list[tuple[BaseException, float]] = field(default_factory=list)

    @property
    def slowest_failure(self) -> float:
        return max((took for _, took in self.failures), default=0.0)

    def kinds(self) -> set[type]:
        return {type(e) for e, _ in self.failures}


class Load:
    """Tasks running reserve + release cycles round-robin over users, each call's outcome
    recorded on the side of its user (the victim node's, or another's)."""

    def __init__(self, engine: CreditEngine, users: list[str], lost: set[str], tasks: int = 12) -> None:
        self.engine, self.users, self.lost, self.tasks = engine, users, lost, tasks
        self.lost_side, self.healthy_side = Outcome(), Outcome()
        self._seq = 0

    async def _call(self, user: str, coro) -> bool:
        side = self.lost_side if user in self.lost else self.healthy_side
        t = time.monotonic()
        try:
            await coro
        except Exception as exc:
            side.failures.append((exc, time.monotonic() - t))
            return False
        side.ok += 1
        return True

    async def _worker(self, n: int, stop: asyncio.Event) -> None:
        i = n
        while not stop.is_set():
            user = self.users[i % len(self.users)]
            i += self.tasks
            self._seq += 1
            hid = f"load-{self._seq}"
            if await self._call(user, self.engine.reserve(user, "0.01", hold_id=hid, ttl_seconds=60)):
                await self._call(user, self.engine.release(user, hid))
            await asyncio.sleep(0)

    async def run_for(self, seconds: float) -> Load:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(self._worker(n, stop)) for n in range(self.tasks)]
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks)
        return self

    def start(self) -> asyncio.Event:
        stop = asyncio.Event()
        self._running = [asyncio.create_task(self._worker(n, stop)) for n in range(self.tasks)]
        return stop

    async def stop(self, stop: asyncio.Event) -> Load:
        stop.set()
        await asyncio.gather(*self._running)
        return self


async def _wait_for(check, what: str, deadline_s: float = 30.0):
    """Polls `check` (None = not yet) until it answers; a liveness bound, not a timing claim."""
    deadline = time.monotonic() + deadline_s
    while True:
        r = await check()
        if r is not None:
            return r
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.1)


async def test_a_dead_primary_fails_its_slots_fast_the_rest_carries_on_and_all_heal_after_the_rebuild(
    gw, fault_cluster, tmp_path
):
    from gateway.core.store.sqlite import SQLiteStore

    engine = gw.engine
    store = SQLiteStore(str(tmp_path / "store.db"))
    await store.open()
    try:
        await ensure_ready(engine, store)
        for u in gw.users:
            await engine.grant(u, "100", op_id="fund")
        await Worker(engine, store).run(burst=True)  # the store holds every account

        victim = fault_cluster.ports[1]
        lost = set(gw.on(victim))
        lost_parts = {p for p, port in gw.partition_node.items() if port == victim}
        warm = await Load(engine, gw.users, lost).run_for(0.5)
        assert warm.lost_side.failures == warm.healthy_side.failures == []

        # Down: the lost slots fail, as connection errors, each well within the timeout
        # bound; every call on the other nodes succeeds meanwhile.
        await fault_cluster.run("kill", victim)
        down = await Load(engine, gw.users, lost).run_for(2.0)
        assert down.healthy_side.failures == []
        assert down.healthy_side.ok > 0
        assert down.lost_side.ok == 0 and down.lost_side.failures
        assert all(isinstance(e, UNAVAILABLE) for e, _ in down.lost_side.failures), down.lost_side.kinds()
        assert down.lost_side.slowest_failure <= 3 * TIMEOUT
        assert NodeDown in down.lost_side.kinds()  # after the first failures, at once
        with pytest.raises(UNAVAILABLE):
            await engine.missing_partitions()  # EXISTS goes through a cluster pipeline
        # What /readyz reads: the dead node's partitions out of reach, the others ready (a
        # gateway that serves two thirds of its accounts stays in its balancer).
        status = await partition_status(engine.redis, engine.keys)
        assert status.unreachable == sorted(lost_parts) and status.not_ready == []

        # Back, empty: while it rejoins, calls on its slots keep failing as connection
        # errors, then answer state_lost (ready markers gone) until the rebuild.
        load = Load(engine, gw.users, lost)
        running = load.start()
        await fault_cluster.run("start", victim)
        probe_user = min(lost)

        async def lost_answers_state_lost():
            try:
                await engine.reserve(
                    probe_user, "0.01", hold_id=f"probe-{time.monotonic_ns()}", ttl_seconds=60
                )
            except StateLost:
                return True
            except UNAVAILABLE:
                return None
            raise AssertionError("a call on a rebuilt-less partition succeeded")

        await _wait_for(lost_answers_state_lost, "the restarted node answers its slots")
        await load.stop(running)
        assert load.healthy_side.failures == []
        assert all(isinstance(e, (*UNAVAILABLE, StateLost)) for e, _ in load.lost_side.failures), (
            load.lost_side.kinds()
        )
        assert load.lost_side.slowest_failure <= 3 * TIMEOUT

        missing = await engine.missing_partitions()
        assert set(missing) == lost_parts
        await rehydrate(engine, store, missing)

        # Whole again: every call on every slot succeeds, and every account holds what it
        # held before the fault.
        after = await Load(engine, gw.users, lost).run_for(1.0)
        assert after.lost_side.failures == [] and after.healthy_side.failures == []
        assert after.lost_side.ok > 0 and after.healthy_side.ok > 0
        for u in gw.users:
            view = await engine.account(u)
            assert (view.state.available, view.state.held) == (100, 0), u
    finally:
        await store.close()


async def test_a_hung_primary_times_out_then_fails_at_once_and_answers_again_when_it_resumes(
    gw, fault_cluster
):
    engine = gw.engine
    for p in range(engine.keys.partitions):
        await engine.mark_ready(p)
    for u in gw.users:
        await engine.grant(u, "100", op_id="fund")
    victim = fault_cluster.ports[2]
    lost = set(gw.on(victim))

    lost_ready = engine.keys.partition(
        next(p for p, port in gw.partition_node.items() if port == victim)
    ).ready

    await fault_cluster.run("pause", victim)  # connections stay open; nothing answers
    try:
        hung = await Load(engine, gw.users, lost).run_for(3 * TIMEOUT)
        # A single-key EXISTS (a one-node pipeline in redis-py) is refused at once too; at
        # most one of two is the probe that waits.
        exists = []
        for _ in range(2):
            try:
                await engine.redis.exists(lost_ready)
            except UNAVAILABLE as exc:
                exists.append(type(exc))
    finally:
        await fault_cluster.run("resume", victim)
    assert NodeDown in exists, exists
    assert hung.healthy_side.failures == [] and hung.healthy_side.ok > 0
    assert hung.lost_side.ok == 0
    kinds = hung.lost_side.kinds()
    assert all(isinstance(e, UNAVAILABLE) for e, _ in hung.lost_side.failures), kinds
    assert RedisTimeoutError in kinds  # the first calls waited for the timeout...
    assert NodeDown in kinds  # ...the next ones did not
    assert hung.lost_side.slowest_failure <= 3 * TIMEOUT

    user = min(lost)

    async def answers():
        try:
            return await engine.account(user)
        except UNAVAILABLE:
            return None

    view = await _wait_for(answers, "the resumed node answers")
    # It kept its data. (A reserve that timed out may still have run once the node
    # resumed: its hold stays until released or expired, as with any unconfirmed reserve.)
    assert view.state.granted == 100 and view.state.available + view.state.held == 100
    after = await Load(engine, gw.users, lost).run_for(0.5)
    assert after.lost_side.failures == [] and after.healthy_side.failures == []


async def test_a_slot_the_node_does_not_serve_is_a_connection_error_and_leaves_the_node_up(gw, fault_cluster):
    engine = gw.engine
    for p in range(engine.keys.partitions):
        await engine.mark_ready(p)
    port = fault_cluster.ports[0]
    users = gw.on(port)
    parts = {engine.keys.partition_of(u) for u in users}
    assert len(parts) >= 2, "needs two partitions on the node"
    gone, kept = sorted(parts)[:2]
    gone_user = next(u for u in users if engine.keys.partition_of(u) == gone)
    kept_user = next(u for u in users if engine.keys.partition_of(u) == kept)
    slot = key_slot(engine.keys.partition(gone).events.encode())
    for u in (gone_user, kept_user):
        await engine.grant(u, "5", op_id="fund")

    node = await fault_cluster.node(port)
    await node.execute_command("CLUSTER", "DELSLOTS", slot)  # it now answers CLUSTERDOWN there
    try:
        for _ in range(3):  # the node is not taken out for it
            with pytest.raises(ClusterUnavailable):
                await engine.reserve(gone_user, "1", hold_id=f"g{_}", ttl_seconds=60)
            await engine.reserve(kept_user, "1", hold_id=f"k{_}", ttl_seconds=60)
        with pytest.raises(ClusterUnavailable):
            await engine.redis.exists(engine.keys.partition(gone).ready)  # the pipeline path
    finally:
        await node.execute_command("CLUSTER", "ADDSLOTS", slot)
        await node.aclose()
    await engine.reserve(gone_user, "1", hold_id="g-after", ttl_seconds=60)


async def test_connections_closed_by_the_server_cost_no_call(gw, fault_cluster):
    """A node that closes its idle clients (or a proxy that does) is not a dead node."""
    engine = gw.engine
    for p in range(engine.keys.partitions):
        await engine.mark_ready(p)
    port = fault_cluster.ports[0]
    users = gw.on(port)
    for u in users:
        await engine.grant(u, "5", op_id="fund")
    await asyncio.gather(*(engine.account(u) for u in users * 4))  # several pooled connections
    node = await fault_cluster.node(port)
    try:
        killed = await node.client_kill_filter(_type="normal", skipme=True)
    finally:
        await node.aclose()
    assert killed >= 2
    views = await asyncio.gather(*(engine.account(u) for u in users * 4))
    assert all(v.state.available == 5 for v in views)


async def test_make_redis_applies_the_timeout_in_cluster_mode(fault_cluster):
    client = make_redis(Settings(redis_url=fault_cluster.url, redis_cluster=True, redis_timeout_seconds=0.75))
    try:
        assert isinstance(client, GatewayRedisCluster)
        assert client.connection_kwargs["socket_timeout"] == 0.75
        assert client.connection_kwargs["socket_connect_timeout"] == 0.75
        assert client.retry.get_retries() == 0
    finally:
        await client.aclose()


async def test_the_background_refresh_rebuilds_a_stale_slot_map_and_leaves_a_current_one(gw):
    client = gw.engine.redis
    nodes = client.nodes_manager
    assert not await client._topology_changed()
    conns = [c for n in nodes.nodes_cache.values() for c in n._connections]
    await client._refresh(0)
    assert not any(c.should_reconnect() for c in conns)  # unchanged: nothing reconnects

    slot = 1234
    right = nodes.slots_cache[slot][0]
    wrong = next(n for n in nodes.nodes_cache.values() if n.name != right.name)
    nodes.slots_cache[slot] = [wrong]  # as after a failover the client has not seen yet
    assert await client._topology_changed()
    await client._refresh(0)
    assert client.nodes_manager.slots_cache[slot][0].name == right.name


async def test_keyless_commands_leave_a_dead_default_node(gw, fault_cluster):
    """PING (the readiness check) goes to the client's default node: when that one dies,
    it moves to a live primary instead of failing while the other nodes serve."""
    client = gw.engine.redis
    victim = int(client.get_default_node().port)
    await fault_cluster.run("kill", victim)
    answers = []
    for _ in range(4):
        try:
            answers.append(await client.ping())
        except UNAVAILABLE as exc:
            answers.append(type(exc))
    assert answers[-1] is True and answers[-2] is True, answers
    assert int(client.get_default_node().port) != victim


async def test_connections_closed_under_calls_fail_as_connection_errors_and_heal(gw, fault_cluster):
    """What redis-py itself does on CLUSTERDOWN (close every connection, in use or not):
    the calls it breaks fail as connection errors, never AttributeError, and the next
    calls succeed."""
    engine = gw.engine
    for p in range(engine.keys.partitions):
        await engine.mark_ready(p)
    port = fault_cluster.ports[0]
    users = gw.on(port)
    for u in users:
        await engine.grant(u, "5", op_id="fund")
    node = engine.redis.get_node(host="127.0.0.1", port=port)
    load = Load(engine, users, lost=set(users), tasks=16)
    running = load.start()
    for _ in range(30):
        await node.disconnect()
        await asyncio.sleep(0.005)
    await load.stop(running)
    assert load.lost_side.failures  # the closing did break calls
    assert all(isinstance(e, UNAVAILABLE) for e, _ in load.lost_side.failures), load.lost_side.kinds()

    async def answers():  # the node may have been taken out for a moment: it is probed back
        try:
            return await engine.account(users[0])
        except UNAVAILABLE:
            return None

    await _wait_for(answers, "the node answers again")
    after = await Load(engine, users, lost=set(users)).run_for(0.3)
    assert after.lost_side.failures == [] and after.lost_side.ok > 0
