"""Rate limits folded into the reserve script (GCRA over one minute), on a real redis-server
with a manual clock: requests and tokens per minute, defaults and per-account overrides,
Retry-After, and the token count corrected at settle and given back at release."""

from __future__ import annotations

import pytest

from gateway.core.engine import RateCharge
from gateway.core.errors import InsufficientCredits, RateLimited, StateLost
from gateway.core.ratelimits import restore_rate_limits, set_rate_limits
from gateway.core.store.base import RateLimitOverride

pytestmark = pytest.mark.redis


async def reserve(engine, hid, tokens=0, rpm=0, tpm=0, amount="1", user="alice"):
    return await engine.reserve(user, amount, hold_id=hid, ttl_seconds=60, rate=RateCharge(tokens, rpm, tpm))


async def test_requests_per_minute_refuses_with_retry_after_and_refills(engine, clock):
    await engine.grant("alice", "100", op_id="g1")
    for i in range(3):
        await reserve(engine, f"h{i}", rpm=3)
    with pytest.raises(RateLimited) as e:
        await reserve(engine, "h3", rpm=3)
    assert e.value.details["limit"] == "requests_per_minute"
    assert 0 < e.value.retry_after_ms <= 20_000  # one request's worth of a 3/min limit
    state = await engine.balance("alice")
    assert state.held == 3  # the refused call placed no hold
    clock.advance(e.value.retry_after_ms / 1000)
    await reserve(engine, "h3", rpm=3)
    with pytest.raises(RateLimited):
        await reserve(engine, "h4", rpm=3)
    # Limits are per account.
    await engine.grant("bob", "5", op_id="g2")
    await reserve(engine, "b1", rpm=3, user="bob")


async def test_a_refused_replay_and_an_unlimited_reserve_count_nothing(engine, clock):
    await engine.grant("alice", "100", op_id="g1")
    await reserve(engine, "h0", rpm=1)
    again = await reserve(engine, "h0", rpm=1)  # the same operation replayed: its first answer
    assert again.replayed
    await engine.reserve("alice", "1", hold_id="free", ttl_seconds=60)  # no rate: never limited
    with pytest.raises(RateLimited):
        await reserve(engine, "h1", rpm=1)


async def test_insufficient_credit_does_not_use_up_the_rate(engine):
    await engine.grant("alice", "1", op_id="g1")
    with pytest.raises(InsufficientCredits):
        await reserve(engine, "big", rpm=1, amount="5")
    await reserve(engine, "small", rpm=1, amount="1")


async def test_tokens_per_minute_counts_the_worst_case_then_the_real_use(engine, clock):
    await engine.grant("alice", "100", op_id="g1")
    with pytest.raises(RateLimited) as e:
        await reserve(engine, "huge", tokens=1001, tpm=1000)
    assert e.value.retry_after_ms == -1  # alone over the limit: can never pass
    await reserve(engine, "a", tokens=600, tpm=1000)
    with pytest.raises(RateLimited) as e:
        await reserve(engine, "b", tokens=600, tpm=1000)
    assert e.value.details["limit"] == "tokens_per_minute"
    # The call really used 100 tokens: settle gives 500 back, and 600 more fit again.
    await engine.settle("alice", "a", "0.1", tokens=100)
    await reserve(engine, "b", tokens=600, tpm=1000)
    # A release gives every reserved token back (nothing was produced).
    with pytest.raises(RateLimited):
        await reserve(engine, "c", tokens=600, tpm=1000)
    await engine.release("alice", "b")
    await reserve(engine, "c", tokens=600, tpm=1000)


async def test_account_overrides_win_over_the_defaults_and_survive_redis_loss(engine, store, clock):
    await engine.grant("alice", "100", op_id="g1")
    await set_rate_limits(engine.redis, engine.keys, store, RateLimitOverride("alice", 0, None))  # 0: none
    for i in range(5):
        await reserve(engine, f"h{i}", rpm=1)  # the default of 1/min does not apply to alice
    await set_rate_limits(engine.redis, engine.keys, store, RateLimitOverride("alice", 2, None))
    await reserve(engine, "h5", rpm=100)
    await reserve(engine, "h6", rpm=100)
    with pytest.raises(RateLimited) as e:
        await reserve(engine, "h7", rpm=100)
    assert e.value.details["value"] == "2"
    # Redis loses everything; the store gives the override back with the partition.
    await engine.redis.flushall()
    part = engine.keys.partition_of("alice")
    assert await restore_rate_limits(engine.redis, engine.keys, store, {part}) == 1
    assert await engine.redis.hget(engine.keys.rate_keys("alice")[0], "rpm") == b"2"
    with pytest.raises(StateLost):  # no changes while the partition is not rebuilt yet
        await set_rate_limits(engine.redis, engine.keys, store, RateLimitOverride("alice", 5, None))
    await engine.mark_ready(part)
    # Back to the defaults.
    await set_rate_limits(engine.redis, engine.keys, store, RateLimitOverride("alice", None, None))
    assert await engine.redis.exists(engine.keys.rate_keys("alice")[0]) == 0
    with pytest.raises(ValueError, match="must be a whole number from 0"):
        await set_rate_limits(engine.redis, engine.keys, store, RateLimitOverride("alice", -1, None))


async def test_rate_state_expires_once_refilled(engine, clock):
    await engine.grant("alice", "100", op_id="g1")
    await reserve(engine, "h0", tokens=100, rpm=60, tpm=6000)
    ttl = await engine.redis.pttl(engine.keys.rate_keys("alice")[1])
    assert 0 < ttl <= 2_000  # 1 s of request time + 1 s of tokens time + the 1 s margin at most
