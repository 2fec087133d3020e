from decimal import Decimal

import pytest

from gateway.core import errors


async def test_grant_reserve_settle_round_trip(engine):
    await engine.grant("alice", "10", op_id="g1")
    hold = await engine.reserve("alice", "3.5", hold_id="h1", ttl_seconds=60)
    assert hold.state.available == Decimal("6.5")
    done = await engine.settle("alice", "h1", "2")
    assert done.charged == Decimal("2") and done.returned == Decimal("1.5")
    assert (await engine.balance("alice")).available == Decimal("8")
    with pytest.raises(errors.OperationConflict):
        await engine.settle("alice", "h1", "3")


async def test_cluster_runs_the_same_scripts(cluster, clock):
    from tests.conftest import ready_engine

    engine = await ready_engine(cluster, clock)
    await engine.grant("bob", "5", op_id="g1")
    await engine.reserve("bob", "1", hold_id="h1", ttl_seconds=5)
    clock.advance(10)
    swept = await engine.sweep()
    assert swept.holds == 1
    assert (await engine.balance("bob")).available == Decimal("5")


def test_hold_keys_are_account_keys_then_rate_keys():
    from gateway.core.keys import KeySpace

    ks = KeySpace(partitions=64)
    for user in ("a", "user-17", "z@example.com"):
        assert ks.hold_keys(user, "op", "h") == ks.account_keys(user, "op", "h") + ks.rate_keys(user)
