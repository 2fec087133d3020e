"""What a rebuild brings back of holds that resolved within the retention window."""

from __future__ import annotations

import pytest

from gateway.core import errors
from gateway.core.recovery import rehydrate
from tests.support.engine_helpers import all_events


@pytest.fixture
def store(durable_store):
    """On SQLite and on PostgreSQL (tests/support/store_fixtures.py)."""
    return durable_store


async def test_a_rebuild_keeps_the_status_of_resolved_holds_and_their_ids_taken(engine, redis, store, clock):
    u = "rita"
    await engine.grant(u, "10", op_id="g1")
    await engine.reserve(u, "1", hold_id="a", ttl_seconds=600)
    await engine.settle(u, "a", "1", op_id="s-a")  # settled under an id of the caller's
    await engine.reserve(u, "1", hold_id="b", ttl_seconds=5)
    clock.advance(10)
    await engine.sweep()  # b expired by the sweeper
    await engine.reserve(u, "1", hold_id="c", ttl_seconds=600, op_id="r-c")
    await engine.release(u, "c", op_id="l-c")

    async def answers() -> dict[str, str]:
        out = {}
        for hid in ("a", "b", "c"):
            with pytest.raises(errors.CreditError) as e:
                await engine.release(u, hid)
            out[hid] = e.value.code
        return out

    before = await answers()
    assert before == {"a": "already_settled", "b": "hold_expired", "c": "already_released"}
    await store.write_events(await all_events(engine))
    await redis.flushall()
    report = await rehydrate(engine, store)
    assert report.resolved_holds == 3
    assert await answers() == before
    with pytest.raises(errors.HoldExists):  # the id stays taken
        await engine.reserve(u, "1", hold_id="c", ttl_seconds=600, op_id="r-c2")
