"""What the engine keeps in Redis, and for how long, against the real Lua on a real
redis-server:

- reads of a lost partition answer state_lost, not zeros;
- a resolved hold keeps only its status and the records of its operations (one small key,
  no operation-id keys of its own), and every replay still answers the first answer, also
  after a rebuild from the store and from an operation-id key a rebuild wrote;
- operation ids stay one namespace per account: an id that names a hold whose reserve kept
  its record in the hold conflicts, whatever operation reuses it;
- the partition stream's backlog is bounded: past CREDIT_MAX_BACKLOG entries reserve is
  refused (backlog_full, 503), while settle, release, expiry, grants and debits go on.
"""

from __future__ import annotations

import json
from dataclasses import replace
from decimal import Decimal

import pytest

from gateway.core import errors
from gateway.core.engine import CreditEngine
from gateway.core.recovery import rehydrate
from gateway.http_errors import status_of
from tests.conftest import ready_engine
from tests.support.engine_helpers import all_events


@pytest.fixture
def store(durable_store):
    """The rebuilds here from SQLite and from PostgreSQL (tests/support/store_fixtures.py)."""
    return durable_store


D = Decimal
META = {
    "request_id": "req_" + "0" * 32,
    "model": "gpt-4o-mini",
    "path": "/v1/chat/completions",
    "upstream": "openai",
    "usage": {"input": 812, "output": 164},
}  # above 64 bytes as JSON


def _s(x):
    return x.decode() if isinstance(x, bytes) else x


async def hold_hash(engine: CreditEngine, user: str, hold_id: str) -> dict[str, str]:
    raw = await engine.redis.hgetall(engine.keys.hold_key(user, hold_id))
    return {_s(k): _s(v) for k, v in raw.items()}


async def op_keys(engine: CreditEngine) -> list[str]:
    return sorted(_s(k) for k in await engine.redis.keys("*:op:*"))


# -- reads of a lost partition -----------------------------------------------------------------


async def test_reads_answer_state_lost_while_the_partition_is_lost(engine, redis):
    await engine.grant("alice", "10", op_id="g1")
    await engine.reserve("alice", "4", hold_id="h1", ttl_seconds=60)
    await redis.flushall()  # Redis lost everything, the ready markers too
    with pytest.raises(errors.StateLost) as exc:
        await engine.balance("alice")
    assert status_of(exc.value) == 503
    with pytest.raises(errors.StateLost):
        await engine.account("alice")
    with pytest.raises(errors.StateLost):  # an account never seen: no zeros either
        await engine.balance("nobody")
    # the rebuild reads what Redis still has
    assert (await engine.account("alice", rebuilding=True)).state.version == 0
    # one partition lost: only its accounts are refused
    for p in range(engine.keys.partitions):
        await engine.mark_ready(p)
    lost = engine.keys.partition_of("alice")
    other = next(u for u in (f"u{i}" for i in range(100)) if engine.keys.partition_of(u) != lost)
    await redis.delete(engine.keys.partition(lost).ready)
    with pytest.raises(errors.StateLost):
        await engine.balance("alice")
    assert (await engine.balance(other)).version == 0
    await engine.mark_ready(lost)
    assert (await engine.balance("alice")).version == 0


async def test_reads_come_back_after_the_rebuild(engine, redis, store):
    await engine.grant("bob", "10", op_id="g1")
    await engine.reserve("bob", "4", hold_id="h1", ttl_seconds=60)
    before = await engine.account("bob")
    await store.write_events(await all_events(engine))
    await redis.flushall()
    with pytest.raises(errors.StateLost):
        await engine.balance("bob")
    await rehydrate(engine, store)
    assert await engine.account("bob") == before


# -- what a hold keeps -------------------------------------------------------------------------


async def test_a_resolved_hold_keeps_one_small_key_and_answers_every_replay(engine, redis, clock):
    u = "carol"
    await engine.grant(u, "100", op_id="g1")
    n_op_keys = len(await op_keys(engine))  # the grant's
    first = {}
    for hid in ("hs", "hr", "hx"):
        first[hid, "reserve"] = await engine.reserve(
            u, "5", hold_id=hid, ttl_seconds=5 if hid == "hx" else 60, metadata=META
        )
    first["hs", "settle"] = await engine.settle(u, "hs", "2", metadata=META)
    first["hr", "release"] = await engine.release(u, "hr", metadata=META)
    clock.advance(5)
    assert (await engine.sweep()).holds == 1  # hx

    # no operation-id key for operations under their default ids
    assert len(await op_keys(engine)) == n_op_keys
    for hid, kept in (
        ("hs", {"st", "rf", "ra", "rs", "qf", "qa", "qs"}),
        ("hr", {"st", "rf", "ra", "rs", "qf", "qa", "qs"}),
        ("hx", {"st", "rf", "ra", "rs"}),
    ):
        h = await hold_hash(engine, u, hid)
        assert set(h) == kept, (hid, h)
        # small values only: Redis keeps the hash in its compact encoding
        assert _s(await redis.object("encoding", engine.keys.hold_key(u, hid))) == "listpack", h
        assert 0 < await redis.ttl(engine.keys.hold_key(u, hid)) <= engine.retention_s
    assert (await hold_hash(engine, u, "hs"))["st"] == "settled"

    # the account moves on; every replay answers the first answer and changes nothing
    await engine.debit(u, "1", op_id="d1")
    n = await redis.xlen(engine.keys.partition(engine.keys.partition_of(u)).events)
    for hid in ("hs", "hr", "hx"):
        again = await engine.reserve(u, "5", hold_id=hid, ttl_seconds=5 if hid == "hx" else 60, metadata=META)
        assert again.replayed and replace(again, replayed=False) == first[hid, "reserve"]
    again = await engine.settle(u, "hs", "2", metadata=META)
    assert again.replayed and replace(again, replayed=False) == first["hs", "settle"]
    again = await engine.release(u, "hr")
    assert again.replayed and replace(again, replayed=False) == first["hr", "release"]
    # the same ids with other fields conflict; another operation on a resolved hold answers
    # with the hold's status (already settled / released / expired), and nothing is appended
    with pytest.raises(errors.OperationConflict):
        await engine.reserve(u, "6", hold_id="hs", ttl_seconds=60)
    with pytest.raises(errors.OperationConflict):
        await engine.settle(u, "hs", "3")
    with pytest.raises(errors.HoldAlreadySettled):
        await engine.release(u, "hs")
    with pytest.raises(errors.HoldAlreadyReleased):
        await engine.settle(u, "hr", "1")
    with pytest.raises(errors.HoldExpired):
        await engine.settle(u, "hx", "1")
    with pytest.raises(errors.HoldExpired):
        await engine.release(u, "hx")
    assert await redis.xlen(engine.keys.partition(engine.keys.partition_of(u)).events) == n


async def test_op_ids_stay_one_namespace_with_records_kept_in_holds(engine):
    u = "dave"
    await engine.grant(u, "100", op_id="g1")
    await engine.reserve(u, "5", hold_id="h1", ttl_seconds=60)  # its record is in hold h1
    before = await engine.account(u)
    for call in (
        lambda: engine.grant(u, "1", op_id="h1"),
        lambda: engine.debit(u, "1", op_id="h1"),
        lambda: engine.reserve(u, "1", hold_id="h2", ttl_seconds=60, op_id="h1"),
        lambda: engine.settle(u, "h1", "1", op_id="h1"),
        lambda: engine.release(u, "h1", op_id="h1"),
    ):
        with pytest.raises(errors.OperationConflict):
            await call()
    assert await engine.account(u) == before
    # and the other way round: an id used by a debit cannot become a hold's default id
    await engine.debit(u, "1", op_id="h3")
    with pytest.raises(errors.OperationConflict):
        await engine.reserve(u, "1", hold_id="h3", ttl_seconds=60)
    # ids of the caller's on hold operations keep their own keys, replayed with their first answer
    await engine.settle(u, "h1", "2", op_id="s-1")
    assert (await engine.settle(u, "h1", "2", op_id="s-1")).replayed
    assert (await engine.remembered(u, "s-1"))[0] == "settle|h1|2000000"
    fp, answer = await engine.remembered(u, "h1")
    assert fp == "reserve|h1|5000000|60000" and json.loads(answer)["hold_id"] == "h1"
    assert await engine.remembered(u, "!settle:h1") is None  # settled under s-1
    assert await engine.remembered(u, "never") is None


async def test_replays_answer_the_same_after_a_rebuild_and_from_a_rebuilt_key(engine, redis, store, clock):
    u = "erin"
    await engine.grant(u, "10", op_id="g1")
    h = await engine.reserve(u, "3", hold_id="h1", ttl_seconds=600)
    s = await engine.settle(u, "h1", "1")
    o = await engine.reserve(u, "2", hold_id="h2", ttl_seconds=600)  # stays open
    r = await engine.release(u, "h2", op_id="rel-2")
    await store.write_events(await all_events(engine))
    await redis.flushall()
    await rehydrate(engine, store)
    clock.advance(60)
    for again, first in (
        (await engine.reserve(u, "3", hold_id="h1", ttl_seconds=600), h),
        (await engine.settle(u, "h1", "1"), s),
        (await engine.reserve(u, "2", hold_id="h2", ttl_seconds=600), o),
        (await engine.release(u, "h2", op_id="rel-2"), r),
    ):
        assert again.replayed and replace(again, replayed=False) == first
    with pytest.raises(errors.OperationConflict):
        await engine.settle(u, "h1", "2")
    # the rebuild wrote the records where the scripts keep them: a hold's in its hash
    assert await redis.exists(engine.keys.op_key(u, "!settle:h1")) == 0
    assert (await engine.remembered(u, "!settle:h1"))[0] == "settle|h1|1000000"


async def test_restore_operation_writes_the_compact_records_where_the_scripts_keep_them(
    engine, redis, store, clock
):
    u = "gus"
    await engine.grant(u, "10", op_id="g1")
    first = [
        await engine.reserve(u, "3", hold_id="h1", ttl_seconds=600),
        await engine.settle(u, "h1", "1"),
        await engine.reserve(u, "2", hold_id="h2", ttl_seconds=600),  # stays open
        await engine.reserve(u, "2", hold_id="h3", ttl_seconds=600, op_id="r-3"),
        await engine.release(u, "h3", op_id="rel-3"),
    ]
    await store.write_events(await all_events(engine))
    await redis.flushall()
    for p in range(engine.keys.partitions):
        await engine.mark_ready(p)
    snap = await store.snapshot(u)
    assert await engine.restore_account(
        u, snap.version, {**snap.totals, "grants": snap.grants, "holds": snap.holds}, []
    )
    ops = [o async for o in store.operations_since(0)]
    for o in ops:
        assert await engine.restore_operation(o.user, o.op_id, o.fingerprint, o.result, 3600)
        assert not await engine.restore_operation(o.user, o.op_id, o.fingerprint, o.result, 3600)
    for o in ops:
        fp, answer = await engine.remembered(o.user, o.op_id)
        assert fp == o.fingerprint and json.loads(answer) == json.loads(o.result), o
    # only the ids of the caller's have keys of their own
    assert [k.rsplit("|", 1)[1] for k in await op_keys(engine)] == ["g1", "r-3", "rel-3"]
    h1 = await hold_hash(engine, u, "h1")
    assert h1["st"] == "settled" and 0 < await redis.ttl(engine.keys.hold_key(u, "h1")) <= 3600
    assert (await hold_hash(engine, u, "h2"))["st"] == "open" and await redis.ttl(
        engine.keys.hold_key(u, "h2")
    ) == -1
    clock.advance(60)
    again = [
        await engine.reserve(u, "3", hold_id="h1", ttl_seconds=600),
        await engine.settle(u, "h1", "1"),
        await engine.reserve(u, "2", hold_id="h2", ttl_seconds=600),
        await engine.reserve(u, "2", hold_id="h3", ttl_seconds=600, op_id="r-3"),
        await engine.release(u, "h3", op_id="rel-3"),
    ]
    assert all(a.replayed for a in again) and [replace(a, replayed=False) for a in again] == first
    with pytest.raises(errors.HoldAlreadySettled):  # the hold's status came back with its record
        await engine.release(u, "h1")
    # the open hold still resolves, and its reserve record stays with it
    await engine.settle(u, "h2", "2")
    assert (await engine.reserve(u, "2", hold_id="h2", ttl_seconds=600)).replayed


# -- the backlog bound ---------------------------------------------------------------------------


async def test_reserve_is_refused_past_the_backlog_limit_and_nothing_else_is(redis, clock):
    engine = await ready_engine(redis, clock)
    engine.max_backlog = 6
    u = "fay"
    stream = engine.keys.partition(engine.keys.partition_of(u)).events
    await engine.grant(u, "100", op_id="g1")
    for i in range(5):
        await engine.reserve(u, "1", hold_id=f"h{i}", ttl_seconds=5 if i == 4 else 60)
    assert await redis.xlen(stream) == 6
    before = await engine.account(u)
    with pytest.raises(errors.BacklogFull) as exc:
        await engine.reserve(u, "1", hold_id="h9", ttl_seconds=60)
    assert status_of(exc.value) == 503 and exc.value.details == {"backlog": 6, "limit": 6}
    assert await engine.account(u) == before and await redis.xlen(stream) == 6
    # a replay adds nothing to the stream: it still answers
    assert (await engine.reserve(u, "1", hold_id="h0", ttl_seconds=60)).replayed
    # everything that resolves holds or moves credit goes on
    await engine.settle(u, "h0", "1")
    await engine.release(u, "h1")
    await engine.settle(u, "h2", "1", op_id="s-2")
    await engine.grant(u, "1", op_id="g2")
    await engine.debit(u, "1", op_id="d1")
    clock.advance(5)
    assert (await engine.sweep()).holds == 1
    assert await redis.xlen(stream) == 12
    with pytest.raises(errors.BacklogFull):
        await engine.reserve(u, "1", hold_id="h9", ttl_seconds=60)
    # once the worker has persisted and trimmed the stream, holds are taken again
    await redis.xtrim(stream, maxlen=0)
    await engine.reserve(u, "1", hold_id="h9", ttl_seconds=60)
    # no limit: 0
    engine.max_backlog = 0
    for i in range(10):
        await engine.reserve(u, "1", hold_id=f"n{i}", ttl_seconds=60)


def test_the_backlog_limit_is_a_constructor_argument_and_a_setting(monkeypatch):
    from gateway.core.settings import Settings

    assert CreditEngine(None, max_backlog=123).max_backlog == 123
    assert CreditEngine(None).max_backlog > 0  # bounded unless told otherwise
    with pytest.raises(ValueError, match=r"max_backlog must be >= 0"):
        CreditEngine(None, max_backlog=-1)
    assert Settings().max_backlog == CreditEngine(None).max_backlog
    monkeypatch.setenv("CREDIT_MAX_BACKLOG", "0")
    assert Settings().max_backlog == 0
    # operation ids are remembered for a day by default (docs/sizing.md)
    assert Settings().retention_seconds == CreditEngine(None).retention_s == 86400
