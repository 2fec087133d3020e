"""Redis losing partitions under running processes: /readyz tells, the gateway rebuilds what
nobody else does, concurrent rebuilds stay correct, and on a Cluster a node restarted empty
stalls only its own partitions. Real redis-server (and a 3-node cluster)."""

from __future__ import annotations

import asyncio
from functools import partial

import httpx
import pytest

from gateway.api.app import create_app
from gateway.core import recovery
from gateway.core.recovery import rehydrate
from gateway.core.settings import Settings
from gateway.worker.runner import Worker
from tests.conftest import ready_engine
from tests.support.worker_helpers import equals, ledger_count, until, users_on_distinct_partitions

ADMIN = "admin-" + "a" * 40


@pytest.fixture
def store(durable_store):
    """Every test here on SQLite and on PostgreSQL (tests/support/store_fixtures.py)."""
    return durable_store


async def test_readyz_names_lost_partitions_and_the_gateway_rebuilds_them(
    redis, redis_url, store, tmp_path, monkeypatch
):
    settings = Settings(
        redis_url=redis_url,
        admin_keys=ADMIN,
        partitions=16,
        sqlite_path=str(tmp_path / "s.db"),
        audit_path=None,
        sweep_interval_seconds=0.05,
    )
    app = create_app(settings, redis=redis, store=store, run_worker=False)  # no worker anywhere
    monkeypatch.setattr(recovery, "GATEWAY_REBUILD_GRACE_S", 3600, raising=False)  # hold the gateway back
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as api,
    ):
        engine = app.state.services.engine
        await engine.grant("alice", "5", op_id="g1")
        await Worker(engine, store).run(burst=True)
        assert (await api.get("/readyz")).status_code == 200

        await redis.flushall()
        r = await api.get("/readyz")
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert r.json()["partitions"] == {
            "total": 16,
            "not_ready": 16,
            "lost": list(range(16)),
            "rebuilding": [],
            "unreachable": [],
        }
        held = [0, 1, 2]  # another process is rebuilding these (it holds their lease)
        for p in held:
            await redis.set(engine.keys.partition(p).rebuild, "someone-else", px=60_000)
        r = await api.get("/readyz")
        assert r.status_code == 503 and r.headers["Retry-After"]
        body = r.json()
        assert body["checks"] == {"redis": True, "store": True, "state": False}
        assert body["partitions"] == {
            "total": 16,
            "not_ready": 16,
            "lost": list(range(3, 16)),
            "rebuilding": held,
            "unreachable": [],
        }
        assert body["error"]["code"] == "state_lost" and body["error"]["partitions"] == list(range(16))

        # Nobody rebuilds the lost ones: the gateway does, and leaves the others' to them.
        monkeypatch.setattr(recovery, "GATEWAY_REBUILD_GRACE_S", 0.1)
        # (While it rebuilds, its own leases list those partitions as rebuilding, not lost.)
        await until(lambda: _readyz_rebuilding(api, held), "the gateway rebuilt the lost partitions")
        r = await api.get("/readyz")
        assert r.json()["partitions"]["lost"] == []
        # It serves every other account meanwhile: ready, degraded (a balancer keeps it).
        assert r.status_code == 200 and r.json()["status"] == "degraded"
        assert r.json()["partitions"]["rebuilding"] == held
        # The other process dies: its leases lapse, and the gateway takes over.
        for p in held:
            await redis.delete(engine.keys.partition(p).rebuild)
        await until(lambda: _readyz_status(api, 200), "the gateway rebuilt the rest")
        assert (await engine.balance("alice")).available == 5
    await store.close()


async def _readyz_rebuilding(api, rebuilding) -> bool:
    partitions = (await api.get("/readyz")).json()["partitions"]
    return partitions["lost"] == [] and partitions["rebuilding"] == rebuilding


async def _readyz_status(api, status) -> bool:
    return (await api.get("/readyz")).status_code == status


async def test_concurrent_rebuilds_rebuild_each_partition_once_and_completely(engine, store):
    users = users_on_distinct_partitions(engine, engine.keys.partitions, "cc")
    for u in users:
        await engine.grant(u, "10", op_id=f"g-{u}")
        await engine.reserve(u, "1", hold_id=f"h-{u}", ttl_seconds=60)
    await Worker(engine, store).run(burst=True)
    before = {u: await engine.account(u) for u in users}
    await engine.redis.flushall()
    reports = await asyncio.gather(*(rehydrate(engine, store, only_missing=True) for _ in range(4)))
    # Each partition was rebuilt by exactly one of them; the others left it alone.
    assert sum(r.partitions for r in reports) == engine.keys.partitions
    assert sum(r.accounts for r in reports) == len(users)
    assert await engine.missing_partitions() == []
    assert {u: await engine.account(u) for u in users} == before


async def test_a_rebuild_that_loses_its_partition_midway_leaves_it_not_ready(engine, store, monkeypatch):
    await engine.grant("m1", "10", op_id="g-m1")
    await Worker(engine, store).run(burst=True)
    await engine.redis.flushall()
    real = store.operations_since

    async def flushed_midway(ts_ms):
        await engine.redis.flushall()  # Redis loses everything again while the rebuild runs
        async for op in real(ts_ms):
            yield op

    monkeypatch.setattr(store, "operations_since", flushed_midway)
    report = await rehydrate(engine, store)
    # Its accounts were written before the second loss: marking the partitions ready now
    # would open them empty. They stay lost, and the next pass rebuilds them.
    assert report.partitions == 0 and report.unfinished == list(range(engine.keys.partitions))
    assert len(await engine.missing_partitions()) == engine.keys.partitions
    monkeypatch.setattr(store, "operations_since", real)
    assert (await rehydrate(engine, store, only_missing=True)).partitions == engine.keys.partitions
    assert (await engine.balance("m1")).available == 10


@pytest.mark.cluster
async def test_a_cluster_node_restarted_empty_stalls_only_its_own_partitions(cluster, store, clock):
    engine = await ready_engine(cluster, clock)
    users = users_on_distinct_partitions(engine, engine.keys.partitions, "node")
    for u in users:
        await engine.grant(u, "10", op_id=f"g1-{u}")
    w = Worker(
        engine,
        store,
        sweep_interval=0.05,
        idle_seconds=0.01,
        rehydrate=partial(rehydrate, engine, store, only_missing=True),
    )
    task = asyncio.create_task(w.run())
    try:
        await until(lambda: equals(ledger_count(store, users), len(users)), "the first grants stored")
        node = cluster.get_primaries()[0]
        on_node = [
            u
            for u in users
            if cluster.get_node_from_key(engine.keys.partition(engine.keys.partition_of(u)).events) == node
        ]
        elsewhere = [u for u in users if u not in on_node]
        assert on_node and elsewhere
        # The node comes back without its data; someone else holds the rebuild of its partitions
        # for now (so they stay lost while the rest goes on).
        await cluster.flushall(target_nodes=node)
        for u in on_node:
            await cluster.set(engine.keys.partition(engine.keys.partition_of(u)).rebuild, "other", px=60_000)
        for u in elsewhere:
            await engine.grant(u, "1", op_id=f"g2-{u}")
        await until(
            lambda: equals(ledger_count(store, elsewhere), 2 * len(elsewhere)), "the other nodes drained"
        )
        # The other rebuilder goes away: this worker rebuilds the node's partitions and
        # persists their new events, without a restart.
        for u in on_node:
            await cluster.delete(engine.keys.partition(engine.keys.partition_of(u)).rebuild)
        await until(lambda: equals(engine.missing_partitions(), []), "the node's partitions rebuilt")
        for u in on_node:
            await engine.grant(u, "1", op_id=f"g2-{u}")
        await until(
            lambda: equals(ledger_count(store, on_node), 2 * len(on_node)), "the node's partitions drained"
        )
    finally:
        w.stop()
        await task
    for u in users:
        assert [e.version async for e in store.ledger_all(u)] == [1, 2]
