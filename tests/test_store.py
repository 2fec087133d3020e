"""The durable stores (SQLite and MongoDB) against real events from the engine on real Redis.

Each test runs the engine through grants, holds (settled, released, expired, left open),
debits, debt and grant expiry, reads the events back from the partition streams, writes
them to a store (in order, repeated, reversed, shuffled, in batches) and compares what the
store holds with what Redis holds; the last test rebuilds Redis from the store.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_asyncio

from gateway.core.engine import CreditEngine
from gateway.core.events import Event, decode
from gateway.core.store import MongoStore, SQLiteStore, Store

USERS = ("alice", "bob", "carol", "dave")


# -- stores ----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "mongo"])
def store_kind(request) -> tuple[str, str]:
    if request.param == "mongo":
        return ("mongo", request.getfixturevalue("mongo_uri"))
    return ("sqlite", str(request.getfixturevalue("tmp_path")))


@pytest_asyncio.fixture
async def new_store(store_kind):
    """A factory of fresh, open stores of the parametrized kind (closed / dropped after)."""
    kind, where = store_kind
    made: list[Store] = []

    async def make() -> Store:
        if kind == "mongo":
            s: Store = MongoStore(where, db=f"t_{uuid.uuid4().hex[:16]}")
        else:
            s = SQLiteStore(f"{where}/store-{len(made)}.db")
        await s.open()
        made.append(s)
        return s

    yield make
    for s in made:
        if isinstance(s, MongoStore):
            await s._client.drop_database(s.db_name)
        await s.close()


@pytest_asyncio.fixture
async def store(new_store):
    return await new_store()


# -- a history on the real engine -------------------------------------------------------------


def at(clock, seconds: float) -> datetime:
    return datetime.fromtimestamp(clock() + seconds, tz=UTC)


async def run_history(engine: CreditEngine, clock) -> None:
    # alice: two grants (one expiring, with priority), settle under the hold, release, a debit,
    # and an open hold left at the end.
    await engine.grant("alice", "10", op_id="a-g1", source="payment", metadata={"order": "o-1", "n": 3})
    await engine.grant("alice", "5", op_id="a-g2", source="promo", priority=5, expires_at=at(clock, 3600))
    await engine.reserve(
        "alice", "3.5", hold_id="a-h1", ttl_seconds=60, metadata={"model": "gpt", "req": "r1"}
    )
    clock.advance(1)
    await engine.settle("alice", "a-h1", "2", op_id="a-s1", metadata={"usage": 123})
    await engine.reserve("alice", "2", hold_id="a-h2", ttl_seconds=30)
    await engine.release("alice", "a-h2")  # op id !release:a-h2
    await engine.debit("alice", "1.25", op_id="a-d1", metadata={"why": "manual"})
    await engine.reserve("alice", "4", hold_id="a-h3", ttl_seconds=600, metadata={"req": "open"})
    # bob: overage beyond every grant becomes debt; a later grant repays part of it.
    await engine.grant("bob", "2", op_id="b-g1")
    await engine.reserve("bob", "2", hold_id="b-h1", ttl_seconds=60)
    await engine.settle("bob", "b-h1", "5")  # op id !settle:b-h1; 3 credits of debt
    await engine.grant("bob", "1", op_id="b-g2")  # repays 1: the grant is gone at once
    await engine.grant("bob", "4", op_id="b-g3")  # repays 2, 2 left
    # carol: a hold expires while its grant expires too; then a fresh grant and an open hold.
    await engine.grant("carol", "3", op_id="c-g1", expires_at=at(clock, 10), metadata={"k": [1, 2]})
    await engine.reserve("carol", "1", hold_id="c-h1", ttl_seconds=5)
    clock.advance(20)
    swept = await engine.sweep()
    assert swept.holds == 1 and swept.grants == 1
    await engine.grant("carol", "4", op_id="c-g2", source="refund", priority=1000)
    await engine.reserve("carol", "1.5", hold_id="c-h2", ttl_seconds=3600)
    # dave: a debit draws the expiring grant to zero (gone) and part of the other one.
    await engine.grant("dave", "1", op_id="d-g1")
    await engine.grant("dave", "7.000001", op_id="d-g2", expires_at=at(clock, 86400))
    await engine.debit("dave", "7.5", op_id="d-d1")
    await engine.reserve("dave", "0.000001", hold_id="d-h1", ttl_seconds=10)
    await engine.settle("dave", "d-h1", "0")


async def stream_events(engine: CreditEngine) -> list[Event]:
    """Every event of every partition stream, in stream order per partition."""
    out: list[Event] = []
    for p in range(engine.keys.partitions):
        for sid, fields in await engine.redis.xrange(engine.keys.partition(p).events):
            out.append(decode(sid, fields, p))
    return out


@pytest_asyncio.fixture
async def events(engine, clock) -> list[Event]:
    await run_history(engine, clock)
    evs = await stream_events(engine)
    assert {e.user for e in evs} == set(USERS)
    return evs


# -- comparing the store with Redis ------------------------------------------------------------


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else x


async def redis_view(engine: CreditEngine, user: str) -> dict[str, Any]:
    """What Redis holds for the account, in the normalized shape of `store_view`."""
    keys = engine.keys.account_keys(user)
    _, r = await engine.scripts.call_json(
        engine.redis, "account", [keys[0], keys[1], keys[3]], [engine.now_ms(), "1"]
    )
    acct = {_s(k): _s(v) for k, v in (await engine.redis.hgetall(engine.keys.account_keys(user)[0])).items()}
    totals = {
        k: int(r.get(k) or 0)
        for k in ("available", "held", "debt", "granted", "spent", "expired", "seq", "debt_total")
    }
    grants = {}
    for g in r.get("grants") or []:
        meta = json.loads(g["meta"])
        grants[g["seq"]] = {
            "r": int(g["free"]),
            "e": int(g["earmarked"]),
            "x": int(g["expires_at"]),
            "pri": int(meta["pri"]),
            "m": meta,
        }
    holds = {}
    for h in r.get("holds") or []:
        hh = {
            _s(k): _s(v)
            for k, v in (await engine.redis.hgetall(engine.keys.hold_key(user, h["hold_id"]))).items()
        }
        assert hh["st"] == "open"
        holds[h["hold_id"]] = {
            "amt": int(h["amount"]),
            "exp": int(h["expires_at"]),
            "ear": hh["ear"],
            "at": int(hh["at"]),
            "op": hh["op"],
            "x": json.loads(hh["x"]),
        }
    return {"version": int(acct["v"]), "totals": totals, "grants": grants, "holds": holds}


def store_view(snap) -> dict[str, Any]:
    assert set(snap.totals) == {
        "available",
        "held",
        "debt",
        "debt_total",
        "granted",
        "spent",
        "expired",
        "seq",
    }
    for g in snap.grants:
        assert set(g) == {"seq", "r", "e", "x", "pri", "m"}
        assert isinstance(g["m"], str) and all(isinstance(g[k], int) for k in ("r", "e", "x", "pri"))
    for h in snap.holds:
        assert set(h) == {"id", "amt", "exp", "ear", "at", "op", "x"}
        assert isinstance(h["x"], str) and all(isinstance(h[k], int) for k in ("amt", "exp", "at"))
    return {
        "version": snap.version,
        "totals": dict(snap.totals),
        "grants": {
            g["seq"]: {"r": g["r"], "e": g["e"], "x": g["x"], "pri": g["pri"], "m": json.loads(g["m"])}
            for g in snap.grants
        },
        "holds": {
            h["id"]: {
                "amt": h["amt"],
                "exp": h["exp"],
                "ear": h["ear"],
                "at": h["at"],
                "op": h["op"],
                "x": json.loads(h["x"]),
            }
            for h in snap.holds
        },
    }


async def all_views(store: Store) -> dict[str, dict]:
    return {s.user: store_view(s) async for s in store.snapshots()}


async def ledger_keys(store: Store) -> set[tuple[str, str, int]]:
    out = set()
    for u in USERS:
        out |= {(e.user, e.op_id, e.version) async for e in store.ledger_all(u)}
    return out


# -- tests -----------------------------------------------------------------------------------


async def test_open_ping_close(new_store):
    s = await new_store()
    await s.open()  # idempotent
    assert await s.ping()
    assert await s.snapshot("nobody") is None
    assert await s.ledger("nobody") == []
    assert await s.write_events([]) == 0


async def test_sqlite_in_memory(events):
    s = SQLiteStore(":memory:")
    await s.open()
    try:
        assert await s.write_events(events) == len(events)
        assert await s.write_events(events) == 0
        assert (await s.snapshot("alice")).version == max(e.version for e in events if e.user == "alice")
    finally:
        await s.close()


async def test_snapshots_match_redis(engine, events, store):
    assert await store.write_events(events) == len(events)
    views = await all_views(store)
    assert set(views) == set(USERS)
    for u in USERS:
        assert views[u] == await redis_view(engine, u), u
    # the facts the history was built to produce
    assert views["bob"]["totals"]["debt"] == 0 and views["bob"]["totals"]["debt_total"] == 3_000_000
    assert set(views["alice"]["holds"]) == {"a-h3"}
    assert views["alice"]["holds"]["a-h3"]["x"] == {"req": "open"}
    assert set(views["carol"]["holds"]) == {"c-h2"} and len(views["carol"]["grants"]) == 1
    assert list(views["dave"]["grants"]) == ["000000000001"]  # d-g2 is gone
    assert views["alice"]["grants"]["000000000001"]["m"]["x"] == {"order": "o-1", "n": 3}


async def test_rewrites_change_nothing(engine, events, store):
    assert await store.write_events(events) == len(events)
    first = await all_views(store)
    assert await store.write_events(events) == 0
    assert await store.write_events(events[::-1]) == 0
    assert await store.write_events(events + events) == 0
    assert await all_views(store) == first
    assert len(await ledger_keys(store)) == len(events)


async def test_duplicates_inside_one_batch(events, store):
    assert await store.write_events(events + events[:5]) == len(events)
    assert len(await ledger_keys(store)) == len(events)


def orderings(events: list[Event]) -> dict[str, list[list[Event]]]:
    rnd = random.Random(7)
    shuffled = events[:]
    rnd.shuffle(shuffled)
    shuffled2 = events[:]
    random.Random(11).shuffle(shuffled2)
    chunks = [events[i : i + 3] for i in range(0, len(events), 3)]
    return {
        "reversed": [events[::-1]],
        "shuffled": [shuffled],
        "batches of 3, reversed": chunks[::-1],
        "batches of 4, shuffled": [shuffled2[i : i + 4] for i in range(0, len(shuffled2), 4)],
        "one by one, shuffled": [[e] for e in shuffled2],
        "newest last alone": [events[:-1], events[-1:]],
    }


async def test_any_order_and_batching_gives_the_same_store(engine, events, new_store):
    reference = await new_store()
    await reference.write_events(events)
    want = await all_views(reference)
    want_ledger = await ledger_keys(reference)
    for name, batches in orderings(events).items():
        s = await new_store()
        new = 0
        for b in batches:
            new += await s.write_events(b)
        assert new == len(events), name
        assert await all_views(s) == want, name
        assert await ledger_keys(s) == want_ledger, name
    for u in USERS:
        assert want[u] == await redis_view(engine, u)


async def test_older_versions_never_overwrite_newer(events, store):
    await store.write_events(events)
    want = await all_views(store)
    for u in USERS:
        mine = sorted((e for e in events if e.user == u), key=lambda e: e.version)
        # every older prefix again, newest of the prefix last
        for k in range(1, len(mine)):
            await store.write_events(mine[:k])
    assert await all_views(store) == want


async def test_late_creation_event_fills_metadata(events, store):
    alice = sorted((e for e in events if e.user == "alice"), key=lambda e: e.version)
    creations = [e for e in alice if e.grant_meta]
    rest = [e for e in alice if not e.grant_meta]
    await store.write_events(rest)
    snap = await store.snapshot("alice")
    assert snap.version == alice[-1].version
    await store.write_events(creations)
    snap = await store.snapshot("alice")
    assert snap.version == alice[-1].version
    metas = {g["seq"]: json.loads(g["m"]) for g in snap.grants}
    assert metas["000000000001"]["id"] == "a-g1" and metas["000000000001"]["src"] == "payment"
    assert metas["000000000002"]["pri"] == "5"
    assert {g["seq"]: g["pri"] for g in snap.grants} == {"000000000001": 100, "000000000002": 5}
    # the hold's opening fields arrive with its creation event, whatever came before
    opening = next(e for e in alice if e.type == "hold_open" and e.hold_id == "a-h3")
    assert snap.holds == [
        {
            "id": "a-h3",
            "amt": 4_000_000,
            "exp": int(opening.hold["exp"]),
            "ear": opening.hold["ear"],
            "at": opening.ts_ms,
            "op": "a-h3",
            "x": json.dumps({"req": "open"}, separators=(",", ":")),
        }
    ]


async def test_hold_caller_metadata_survives_later_events(events, store):
    # the settle event carries the settle's metadata in `x`: it must not replace the hold's
    alice = [e for e in events if e.user == "alice"]
    settle = next(e for e in alice if e.op_id == "a-s1")
    assert settle.extra == {"usage": 123}
    await store.write_events([settle])
    await store.write_events(alice)
    await store.write_events([settle])
    snap = await store.snapshot("alice")
    assert [h["id"] for h in snap.holds] == ["a-h3"]


async def test_ledger_pages_newest_first(engine, clock, events, store):
    for i in range(23):
        await engine.grant("erin", "1", op_id=f"e-g{i}")
        await engine.debit("erin", "0.5", op_id=f"e-d{i}")
    more = [e for e in await stream_events(engine) if e.user == "erin"]
    assert len(more) == 46
    await store.write_events(events + more)
    seen: list[int] = []
    cursor = None
    while True:
        page = await store.ledger("erin", before_version=cursor, limit=10)
        if not page:
            break
        assert len(page) <= 10
        versions = [e.version for e in page]
        assert versions == sorted(versions, reverse=True)
        seen += versions
        cursor = versions[-1]
    assert seen == list(range(46, 0, -1))
    assert [e.version for e in await store.ledger("erin", limit=3)] == [46, 45, 44]
    assert [e.version for e in await store.ledger("erin", before_version=2)] == [1]
    everything = [e async for e in store.ledger_all("erin")]
    assert [e.version for e in everything] == list(range(1, 47))
    by_key = {(e.user, e.op_id): e for e in more}
    for entry in everything:
        ev = by_key[(entry.user, entry.op_id)]
        assert (entry.type, entry.version, entry.ts_ms, entry.amount, entry.hold_id) == (
            ev.type,
            ev.version,
            ev.ts_ms,
            ev.amount,
            ev.hold_id,
        )
        assert entry.event == ev.raw
    # a hold's entries carry its id
    bob = [e async for e in store.ledger_all("bob")]
    assert [e.type for e in bob] == ["grant", "hold_open", "hold_settled", "grant", "grant"]
    assert [e.hold_id for e in bob] == [None, "b-h1", "b-h1", None, None]
    assert bob[2].op_id == "!settle:b-h1" and bob[2].event["debt_added"] == "3000000"


async def test_operations_since(engine, events, store):
    await store.write_events(events)
    ops = [o async for o in store.operations_since(0)]
    ids = {(o.user, o.op_id) for o in ops}
    caller = {(e.user, e.op_id) for e in events if e.fingerprint and e.result}
    assert ids == caller
    assert ("bob", "!settle:b-h1") in ids and ("alice", "!release:a-h2") in ids
    assert not any(o.op_id.startswith(("!expire:", "!gexpire:")) for o in ops)
    assert {e.op_id for e in events if e.user == "carol"} >= {"!expire:c-h1", "!gexpire:000000000001"}
    # what a rebuilt Redis restores is what Redis remembers now
    for o in ops:
        fp, answer = await engine.remembered(o.user, o.op_id)
        assert fp == o.fingerprint and json.loads(answer) == json.loads(o.result), o
    ts = [o.ts_ms for o in ops]
    cut = sorted(set(ts))[len(set(ts)) // 2]
    later = [o async for o in store.operations_since(cut)]
    assert later and {(o.user, o.op_id) for o in later} == {(o.user, o.op_id) for o in ops if o.ts_ms >= cut}
    assert [o async for o in store.operations_since(max(ts) + 1)] == []


async def test_snapshots_by_partition(engine, events, store):
    await store.write_events(events)
    for p in range(engine.keys.partitions):
        got = {s.user async for s in store.snapshots(p)}
        assert got == {u for u in USERS if engine.keys.partition_of(u) == p}


async def test_restore_rebuilds_redis(engine, redis, clock, events, store):
    await store.write_events(events[::-1])
    before = {u: await engine.account(u) for u in USERS}
    raw_before = {u: await redis_view(engine, u) for u in USERS}
    await redis.flushall()
    for p in range(engine.keys.partitions):
        await engine.mark_ready(p)
    for u in USERS:
        snap = await store.snapshot(u)
        state = {**snap.totals, "grants": snap.grants, "holds": snap.holds}
        assert await engine.restore_account(u, snap.version, state, [])
        assert not await engine.restore_account(u, snap.version, state, [])  # already there
    for u in USERS:
        assert await engine.account(u) == before[u], u
        assert await redis_view(engine, u) == raw_before[u], u
    # the rebuilt accounts keep working, and their new events fit after the stored ones
    done = await engine.settle("alice", "a-h3", "1", op_id="a-s3")
    assert done.returned == 3
    g = await engine.grant("bob", "1", op_id="b-g4")
    assert g.grant_seq == "000000000004" and g.state.version == raw_before["bob"]["version"] + 1
    clock.advance(3600)
    swept = await engine.sweep()
    assert swept.holds == 1  # carol's c-h2
    await store.write_events(await stream_events(engine))
    for u in USERS:
        assert store_view(await store.snapshot(u)) == await redis_view(engine, u), u


# -- admin-plane records: API keys and rate-limit overrides ---------------------------------


async def test_api_keys_are_kept_hashed_revocable_and_listed(store):
    from gateway.core.store.base import ApiKeyRecord

    a = ApiKeyRecord("key_0000000000000001", "alice", "d1" * 32, "cgk_abcdef", "app", 1000)
    b = ApiKeyRecord("key_0000000000000002", "alice", "d2" * 32, "cgk_ghijkl", "", 2000)
    c = ApiKeyRecord("key_0000000000000003", "bob", "d3" * 32, "cgk_mnopqr", "", 1500)
    for k in (a, b, c):
        await store.add_api_key(k)
    assert [k.key_id for k in await store.api_keys("alice")] == [a.key_id, b.key_id]
    first = await store.revoke_api_key("alice", a.key_id, 5000)
    assert first.revoked_ms == 5000
    again = await store.revoke_api_key("alice", a.key_id, 9000)
    assert again.revoked_ms == 5000  # the first revocation time stays
    assert await store.revoke_api_key("bob", a.key_id, 9000) is None  # not bob's key
    assert await store.revoke_api_key("alice", "key_ffffffffffffffff", 9000) is None
    active = [k.key_id async for k in store.active_api_keys()]
    assert sorted(active) == [b.key_id, c.key_id]
    listed = await store.api_keys("alice")
    assert listed[0].revoked_ms == 5000 and listed[1].revoked_ms is None and listed[0].name == "app"
    with pytest.raises(Exception):  # the digest is unique
        await store.add_api_key(ApiKeyRecord("key_0000000000000009", "carol", "d1" * 32, "x", "", 1))


async def test_rate_limit_overrides_are_replaced_and_removed(store):
    from gateway.core.store.base import RateLimitOverride

    await store.set_rate_limits(RateLimitOverride("alice", 10, None))
    await store.set_rate_limits(RateLimitOverride("bob", None, 500))
    await store.set_rate_limits(RateLimitOverride("alice", 20, 0))
    assert await store.rate_limits("alice") == RateLimitOverride("alice", 20, 0)
    assert await store.rate_limits("carol") is None
    await store.set_rate_limits(RateLimitOverride("bob", None, None))
    assert await store.rate_limits("bob") is None
    assert [o async for o in store.all_rate_limits()] == [RateLimitOverride("alice", 20, 0)]


async def test_an_op_id_reused_after_redis_forgot_it_keeps_the_ledger_complete(redis, store, clock):
    from gateway.core.recovery import reconcile
    from gateway.worker.runner import Worker
    from tests.conftest import ready_engine

    engine = await ready_engine(redis, clock)
    engine.retention_s = 1  # Redis forgets operation ids after 1 s
    await engine.grant("reuse", "10", op_id="webhook-1")
    await engine.debit("reuse", "1", op_id="d-1")
    await asyncio.sleep(1.2)
    again = await engine.grant("reuse", "10", op_id="webhook-1")  # applied again: a new grant
    assert not again.replayed and again.state.granted == 20
    worker = Worker(engine, store)
    await worker.run(burst=True)
    rows = [(e.op_id, e.version) for e in await store.ledger("reuse", limit=10)]
    assert sorted(rows) == [("d-1", 2), ("webhook-1", 1), ("webhook-1#v3", 3)]
    assert await reconcile(engine, store) == []  # the ledger still replays to the balances
    # A redelivery of the same events adds nothing.
    assert await store.write_events(await stream_events(engine)) == 0


async def test_resolved_holds_since(engine, events, store, clock):
    await store.write_events(events)
    got = {(h.user, h.hold_id): h.status async for h in store.resolved_holds_since(0)}
    assert got == {
        ("alice", "a-h1"): "settled",
        ("alice", "a-h2"): "released",
        ("bob", "b-h1"): "settled",
        ("carol", "c-h1"): "expired",
        ("dave", "d-h1"): "settled",
    }
    # by deadline: carol's hold (5 s, placed 20 s ago) is the only one past it 10 s ago
    late = [h async for h in store.resolved_holds_since(int(clock() * 1000) - 10_000)]
    assert {h.hold_id for h in late} == {"a-h1", "a-h2", "b-h1", "d-h1"}
