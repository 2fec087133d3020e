"""The integration path on a 3-node Redis Cluster, on the client make_redis builds: scripts,
worker, sweep, rebuild, reconcile."""

from __future__ import annotations

import pytest
import pytest_asyncio

from gateway.core.connections import make_redis
from gateway.core.reconcile import reconcile
from gateway.core.recovery import rehydrate
from gateway.core.settings import Settings
from gateway.worker.runner import Worker
from tests.conftest import ready_engine
from tests.support.worker_helpers import ledger_count, make_traffic

pytestmark = pytest.mark.cluster


@pytest_asyncio.fixture
async def cluster(cluster_nodes):
    """The cluster client as the gateway and the worker build it (make_redis), on an
    emptied cluster."""
    host, port = cluster_nodes
    client = make_redis(Settings(redis_url=f"redis://{host}:{port}/0", redis_cluster=True))
    await client.initialize()
    await client.flushall(target_nodes=client.PRIMARIES)
    yield client
    await client.aclose()


@pytest.fixture
async def cengine(cluster, clock):
    return await ready_engine(cluster, clock)


async def test_accounts_spread_over_every_node(cengine, cluster):
    users = [f"cl{i}" for i in range(30)]
    await make_traffic(cengine, users=users, rounds=2)
    nodes_with_events = 0
    for node in cluster.get_primaries():
        n = 0
        for pk in cengine.keys.all_partitions():
            if cluster.get_node_from_key(pk.events) == node:
                n += await cluster.xlen(pk.events)
        nodes_with_events += n > 0
    assert nodes_with_events == 3


async def test_worker_drains_the_cluster_and_reconciles(cengine, store):
    users = [f"cw{i}" for i in range(20)]
    n = await make_traffic(cengine, users=users, rounds=4)
    stats = await Worker(cengine, store, batch=4).run(burst=True)
    assert stats.events == n
    assert await ledger_count(store, users) == n
    assert await reconcile(cengine, store) == []
    w = Worker(cengine, store)
    await w.ensure_groups()
    await w.trim()  # trimming works per node
    assert await reconcile(cengine, store) == []


async def test_cluster_sweep_and_rebuild_after_flush(cengine, cluster, store, clock):
    users = [f"cr{i}" for i in range(10)]
    await make_traffic(cengine, users=users, rounds=3)
    await Worker(cengine, store).run(burst=True)
    before = {u: await cengine.account(u) for u in users}
    await cluster.flushall(target_nodes=cluster.PRIMARIES)
    await rehydrate(cengine, store)
    assert {u: await cengine.account(u) for u in users} == before
    clock.advance(120)
    swept = await cengine.sweep()
    assert swept.holds == sum(len(v.holds) for v in before.values()) > 0
    await Worker(cengine, store).run(burst=True)
    assert await reconcile(cengine, store) == []


async def test_api_keys_and_rate_limits_on_the_cluster(cengine, cluster, store, clock):
    from gateway.core.apikeys import ApiKeys
    from gateway.core.engine import RateCharge
    from gateway.core.errors import RateLimited
    from gateway.core.ratelimits import set_rate_limits
    from gateway.core.store.base import RateLimitOverride

    keys = ApiKeys(cluster, cengine.keys, store)
    issued = [await keys.issue(f"ck{i}") for i in range(12)]  # spread over the nodes' slots
    for k in issued:
        assert (await keys.owner(k.token)).user == k.record.user
    await keys.revoke("ck0", issued[0].record.key_id)
    assert await keys.owner(issued[0].token) is None
    await cengine.grant("ck1", "10", op_id="g")
    await set_rate_limits(cluster, cengine.keys, store, RateLimitOverride("ck1", 1, None))
    await cengine.reserve("ck1", "1", hold_id="h1", ttl_seconds=60, rate=RateCharge(10, 100, 1000))
    with pytest.raises(RateLimited):
        await cengine.reserve("ck1", "1", hold_id="h2", ttl_seconds=60, rate=RateCharge(10, 100, 1000))
    await cengine.settle("ck1", "h1", "0.5", tokens=3)


async def test_promo_claims_hold_their_limits_across_slots_on_the_cluster(cengine, store):
    """A code's counters and its claimants' accounts live on different slots (nodes): the
    claim's two steps each stay within one slot, and the limits hold."""
    import asyncio

    from gateway.core.store.promos import PromoRecord
    from gateway.promos import PromoError, Promos

    promos = Promos(store, cengine)
    await store.create_promo(
        PromoRecord(code="CL10", credits=1_000_000, created_ms=0, updated_ms=0, max_uses=10)
    )

    async def one(user: str) -> bool:
        try:
            await promos.claim(user, "cl10")
            return True
        except PromoError:
            return False

    got = await asyncio.gather(*(one(f"pc{i}") for i in range(40)), *(one("pc0") for _ in range(5)))
    assert sum(got) >= 10
    balances = [(await cengine.balance(f"pc{i}")).available for i in range(40)]
    assert sum(balances) == 10 and max(balances) == 1


async def test_plan_periods_limits_and_the_end_s_trim_run_on_the_cluster(cengine, store):
    """A subscription's grant, its plan limits and models, and the trim at its end each stay
    on the account's own slot."""
    from gateway.core.engine import RateCharge
    from gateway.core.errors import ModelNotAllowed
    from gateway.plans.subscriptions import Subscriptions

    subs = Subscriptions(store, cengine, None)
    plan = await subs.plans.create(
        {"name": "C", "credits": "7", "period": "daily", "rollover": True, "allowed_models": ["m"]}
    )
    for user in ("cp1", "cp2", "cp3"):
        await subs.subscribe(user, {"plan_id": plan.plan_id})
        assert (await cengine.balance(user)).available == 7
        with pytest.raises(ModelNotAllowed):
            await cengine.reserve(user, "1", hold_id=f"{user}-h", ttl_seconds=60, rate=RateCharge(model="x"))
        await subs.cancel(user, at_period_end=False)
        assert (await cengine.balance(user)).available == 0
