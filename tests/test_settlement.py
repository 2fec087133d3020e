"""gateway/core/settlement.py against a Redis that drops connections (a TCP proxy in front
of the real redis-server that the test cuts, or that loses the reply to a settle Redis
applied): every charge lands exactly once, or is logged as lost with its amount.

Each test runs with three script clients: redis-py with its default pool (and its own
retry policy), redis-py with no retries of its own, and the multiplexed client.
"""

from __future__ import annotations

import asyncio
import json
import logging
from urllib.parse import urlsplit

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.core.engine import CreditEngine
from gateway.core.errors import HoldAlreadySettled
from gateway.core.keys import KeySpace
from gateway.core.multiplex import MultiplexedRedis
from gateway.core.settlement import Settler
from tests.support.flaky_redis import FlakyRedisProxy

PARTITIONS = 16


@pytest_asyncio.fixture
async def flaky(redis_url):
    u = urlsplit(redis_url)
    proxy = await FlakyRedisProxy(u.hostname, u.port).start()
    yield proxy
    await proxy.close()


@pytest_asyncio.fixture
async def direct(redis):
    """An engine straight on redis-server (real clock): sets up accounts, reads them back."""
    engine = CreditEngine(redis, keys=KeySpace(partitions=PARTITIONS))
    for p in range(PARTITIONS):
        await engine.mark_ready(p)
    return engine


@pytest_asyncio.fixture(params=["redis-py-default", "redis-py-no-retry", "multiplexed"])
async def engine_via(request, flaky, direct):
    """An engine whose script calls go through the flaky proxy."""
    if request.param == "multiplexed":
        client = MultiplexedRedis(flaky.url, connections=1, timeout=2)
    elif request.param == "redis-py-no-retry":
        client = aioredis.Redis.from_url(flaky.url, retry=Retry(NoBackoff(), 0), socket_timeout=2)
    else:
        client = aioredis.Redis.from_url(flaky.url)
    yield CreditEngine(direct.redis, keys=direct.keys, script_redis=client)
    await client.aclose()


async def hold_events(engine: CreditEngine, user: str) -> list[str]:
    pk = engine.keys.partition(engine.keys.partition_of(user))
    out = []
    for _, fields in await engine.redis.xrange(pk.events):
        ev = json.loads(fields[b"e"])
        if ev["u"] == user:
            out.append(ev["t"])
    return out


async def open_hold(direct: CreditEngine, user: str, ttl: float = 30):
    await direct.grant(user, "1", op_id=f"g-{user}")
    return await direct.reserve(user, "0.5", hold_id=f"h-{user}", ttl_seconds=ttl)


async def assert_charged_once(direct: CreditEngine, user: str, units: int) -> None:
    b = await direct.balance(user)
    assert (b.spent_units, b.held_units, b.available_units) == (units, 0, 1_000_000 - units)
    assert (await hold_events(direct, user)).count("hold_settled") == 1


async def test_a_settle_whose_reply_was_lost_is_retried_and_applies_once(engine_via, direct, flaky):
    hold = await open_hold(direct, "lost")
    flaky.lose_reply_to(engine_via.scripts["settle"].sha.encode())
    r = await Settler(engine_via).settle("lost", hold.hold_id, 10_000, expires_at_ms=hold.expires_at_ms)
    assert flaky.lost_replies == 1
    assert r is not None and r.charged_units == 10_000 and r.status == "settled"
    await assert_charged_once(direct, "lost", 10_000)


async def test_a_settle_redis_does_not_confirm_lands_from_the_background_once(engine_via, direct, flaky):
    hold = await open_hold(direct, "down")
    seen: list[str] = []  # what the metrics are told
    settler = Settler(engine_via, retry_interval_seconds=0.1, observe=seen.append)
    flaky.down()
    r = await settler.settle(
        "down", hold.hold_id, 20_000, expires_at_ms=hold.expires_at_ms, metadata={"request_id": "r1"}
    )
    assert r is None and settler.pending == 1  # unconfirmed: the caller shows no figure
    # Redis comes back, but the first background try's answer is lost again.
    flaky.lose_reply_to(engine_via.scripts["settle"].sha.encode())
    flaky.up()
    assert await settler.drain(timeout=30) == 0
    assert flaky.lost_replies == 1
    await assert_charged_once(direct, "down", 20_000)
    assert [w for w in seen if w != "retry"] == ["unconfirmed", "confirmed_later"]
    with pytest.raises(HoldAlreadySettled):  # the hold is settled at 20_000, not open
        await direct.settle("down", hold.hold_id, "0.03", op_id="another")


async def test_a_settle_on_a_partition_being_rebuilt_lands_once_it_is_ready(engine_via, direct):
    hold = await open_hold(direct, "rebuilt")
    ready = direct.keys.partition(direct.keys.partition_of("rebuilt")).ready
    await direct.redis.delete(ready)
    settler = Settler(engine_via, retry_interval_seconds=0.1)
    assert await settler.settle("rebuilt", hold.hold_id, 5_000, expires_at_ms=hold.expires_at_ms) is None
    await direct.redis.set(ready, "1")
    assert await settler.drain(timeout=30) == 0
    await assert_charged_once(direct, "rebuilt", 5_000)


async def test_a_settle_that_lands_only_after_its_hold_expired_is_charged_as_a_debit(
    engine_via, direct, flaky
):
    hold = await open_hold(direct, "gone", ttl=1.0)
    seen: list[str] = []
    settler = Settler(engine_via, retry_interval_seconds=0.1, observe=seen.append)
    flaky.down()
    assert await settler.settle("gone", hold.hold_id, 7_000, expires_at_ms=hold.expires_at_ms) is None
    await asyncio.sleep(1.5)  # Redis is back only after the hold's deadline: it expires uncharged
    flaky.up()
    assert await settler.drain(timeout=30) == 0
    b = await direct.balance("gone")
    assert (b.spent_units, b.held_units, b.available_units, b.debt_units) == (7_000, 0, 1_000_000 - 7_000, 0)
    events = await hold_events(direct, "gone")
    assert events.count("hold_expired") == 1 and events.count("debit") == 1
    assert "late_debit" in seen and "given_up" not in seen


async def test_a_settle_never_confirmed_is_given_up_in_the_end_and_says_so(engine_via, direct, flaky, caplog):
    hold = await open_hold(direct, "given-up", ttl=0.5)
    seen: list[str] = []
    settler = Settler(engine_via, retry_interval_seconds=0.1, debit_retry_seconds=0.5, observe=seen.append)
    flaky.down()
    with caplog.at_level(logging.WARNING, logger="credit.settlement"):
        assert await settler.settle("given-up", hold.hold_id, 7_000, expires_at_ms=hold.expires_at_ms) is None
        assert await settler.drain(timeout=30) == 0  # ended by itself
    lost = [r for r in caplog.records if "never confirmed" in r.getMessage()]
    assert (
        len(lost) == 1
        and "7000 micro-credits" in lost[0].getMessage()
        and "h-given-up" in lost[0].getMessage()
    )
    assert seen.count("unconfirmed") == 1 and seen.count("given_up") == 1


async def test_drain_cancels_what_is_left_after_its_timeout_and_logs_the_amount(
    engine_via, direct, flaky, caplog
):
    hold = await open_hold(direct, "shut")
    settler = Settler(engine_via, retry_interval_seconds=0.1)
    flaky.down()
    assert await settler.settle("shut", hold.hold_id, 3_000, expires_at_ms=hold.expires_at_ms) is None
    with caplog.at_level(logging.ERROR, logger="credit.settlement"):
        assert await settler.drain(timeout=0.3) == 1
    assert settler.pending == 0
    assert any(
        "before shutdown" in r.getMessage() and "3000 micro-credits" in r.getMessage() for r in caplog.records
    )


async def test_a_late_usage_debit_redis_does_not_confirm_lands_once_with_its_debt(engine_via, direct, flaky):
    await direct.grant("late", "0.001", op_id="g")
    settler = Settler(engine_via, retry_interval_seconds=0.1)
    flaky.down()
    assert await settler.debit("late", 3_000, op_id="lib-1-late-1") is None
    flaky.lose_reply_to(engine_via.scripts["debit"].sha.encode())
    flaky.up()
    assert await settler.drain(timeout=30) == 0
    b = await direct.balance("late")
    assert (b.spent_units, b.debt_units, b.available_units) == (1_000, 2_000, 0)
    assert (await hold_events(direct, "late")).count("debit") == 1


async def test_release_retries_and_answers_none_when_redis_stays_away(engine_via, direct, flaky):
    hold = await open_hold(direct, "rel")
    flaky.lose_reply_to(engine_via.scripts["release"].sha.encode())
    r = await Settler(engine_via).release("rel", hold.hold_id)
    assert r is not None and r.status == "released"
    hold2 = await direct.reserve("rel", "0.5", hold_id="h-rel-2", ttl_seconds=30)
    flaky.down()
    assert await Settler(engine_via).release("rel", hold2.hold_id) is None


async def test_a_release_redis_does_not_confirm_is_tried_again_until_the_hold_would_expire(
    engine_via, direct, flaky
):
    hold = await open_hold(direct, "giveback")
    settler = Settler(engine_via, retry_interval_seconds=0.1)
    flaky.down()
    assert await settler.release("giveback", hold.hold_id, until_ms=hold.expires_at_ms) is None
    await asyncio.sleep(0.3)
    flaky.up()
    assert await settler.drain(timeout=30) == 0
    b = await direct.balance("giveback")
    assert (b.held_units, b.available_units) == (0, 1_000_000)  # given back long before the hold's end


async def test_a_settle_whose_hold_redis_lost_is_charged_as_a_debit(engine_via, direct):
    hold = await open_hold(direct, "lost-hold")
    await direct.redis.delete(direct.keys.hold_key("lost-hold", hold.hold_id))  # as after a loss
    r = await Settler(engine_via).settle("lost-hold", hold.hold_id, 4_000, expires_at_ms=hold.expires_at_ms)
    assert r is not None and r.charged_units == 4_000
    assert (await hold_events(direct, "lost-hold")).count("debit") == 1
