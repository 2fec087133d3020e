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
import sqlite3
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_asyncio

from gateway.core.engine import CreditEngine
from gateway.core.events import Event, decode
from gateway.core.store import MongoStore, PostgresStore, SQLiteStore, Store, store_from_url

USERS = ("alice", "bob", "carol", "dave")


# -- stores: every backend runs every contract test (fixtures: tests/support/store_fixtures.py)


@pytest_asyncio.fixture
async def store(new_store):
    """A fresh, open store of each backend (see tests/support/store_fixtures.py)."""
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
    from asyncpg import UniqueViolationError
    from pymongo.errors import DuplicateKeyError

    with pytest.raises(
        (sqlite3.IntegrityError, DuplicateKeyError, UniqueViolationError)
    ):  # the digest is unique
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
    from gateway.core.reconcile import reconcile
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


# -- the write path: one lookup of stored versions per batch ----------------------------------


async def test_a_redelivered_batch_reads_the_stored_versions_in_one_lookup(events, store, monkeypatch):
    await store.write_events(events)
    calls: list[tuple[set, dict]] = []
    lookup = store._ledger_versions

    async def spy(keys):
        got = await lookup(keys)
        calls.append((keys, got))
        return got

    monkeypatch.setattr(store, "_ledger_versions", spy)
    assert await store.write_events(events) == 0
    assert len(calls) == 1
    keys, got = calls[0]
    assert keys == {(e.user, e.op_id) for e in events}
    assert got == {(e.user, e.op_id): e.version for e in events}
    calls.clear()
    assert await store.write_events(events[:1]) == 0  # a batch of one: still one lookup
    assert len(calls) == 1


async def test_sqlite_looks_up_a_batch_s_versions_in_one_statement(events, tmp_path):
    s = SQLiteStore(str(tmp_path / "trace.db"))
    await s.open()
    try:
        await s.write_events(events)
        statements: list[str] = []
        await s._call(s.db.set_trace_callback, statements.append)
        assert await s.write_events(events) == 0
        await s._call(s.db.set_trace_callback, None)
        reads = [x for x in statements if x.lstrip().upper().startswith("SELECT")]
        assert len(reads) == 1 and "json_each" in reads[0]
    finally:
        await s.close()


# -- choosing a backend by URL ------------------------------------------------------------------


def test_store_from_url_picks_the_backend_by_scheme(tmp_path):
    from gateway.core.connections import make_store
    from gateway.core.settings import Settings

    for url, path in [
        ("credit.sqlite3", "credit.sqlite3"),
        (str(tmp_path / "a.db"), str(tmp_path / "a.db")),
        ("sqlite:///data/credit.db", "data/credit.db"),
        (f"sqlite:///{tmp_path}/b.db", f"{tmp_path}/b.db"),
        ("sqlite:///:memory:", ":memory:"),
        ("SQLite:///x.db", "x.db"),
    ]:
        s = store_from_url(url)
        assert isinstance(s, SQLiteStore) and s.path == path, url
    for url in ("mongodb://u:p@h1,h2/?replicaSet=rs", "mongodb+srv://cluster.example.net/"):
        m = store_from_url(url, database="credits")
        assert isinstance(m, MongoStore) and (m.uri, m.db_name) == (url, "credits")
    for url, dsn in [
        ("postgresql://u@h:5433/billing", "postgresql://u@h:5433/billing"),
        ("postgres://h/billing?sslmode=require", "postgres://h/billing?sslmode=require"),
        ("postgresql://u@h", "postgresql://u@h/credits"),  # no database named: `database`
    ]:
        pg = store_from_url(url, database="credits")
        assert isinstance(pg, PostgresStore) and pg.dsn == dsn, url
    with pytest.raises(ValueError, match="postgresql://"):
        store_from_url("mysql://h/db")
    # the settings keep their names: PostgreSQL when a database URL is set, else MongoDB when
    # a URI is set, else the SQLite path
    pd = make_store(Settings(database_url="postgresql://h/x", mongo_uri="mongodb://h:27017/"))
    assert isinstance(pd, PostgresStore) and pd.dsn == "postgresql://h/x"
    sq = make_store(Settings(sqlite_path=str(tmp_path / "c.db"), mongo_uri=None))
    assert isinstance(sq, SQLiteStore) and sq.path == str(tmp_path / "c.db")
    mg = make_store(Settings(mongo_uri="mongodb://h:27017/", mongo_db="billing"))
    assert isinstance(mg, MongoStore) and (mg.uri, mg.db_name) == ("mongodb://h:27017/", "billing")


# -- migrations: a store written by the first schema opens and keeps every row ------------------

# The first schema (user_version 0), as the gateway created it before the columns had names.
SQLITE_SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS ledger (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL, op_id TEXT NOT NULL, type TEXT NOT NULL, version INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL, amount INTEGER NOT NULL, hold_id TEXT, fingerprint TEXT,
    event TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS ledger_key ON ledger(user, op_id);
CREATE INDEX IF NOT EXISTS ledger_user_version ON ledger(user, version);
CREATE TABLE IF NOT EXISTS accounts (
    user TEXT PRIMARY KEY, version INTEGER NOT NULL, partition INTEGER NOT NULL,
    available INTEGER NOT NULL, held INTEGER NOT NULL, debt INTEGER NOT NULL,
    granted INTEGER NOT NULL, spent INTEGER NOT NULL, expired INTEGER NOT NULL,
    seq INTEGER NOT NULL, debt_total INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS accounts_partition ON accounts(partition, user);
CREATE TABLE IF NOT EXISTS grants (
    user TEXT NOT NULL, seq TEXT NOT NULL, version INTEGER NOT NULL,
    r INTEGER, e INTEGER, gone INTEGER NOT NULL DEFAULT 0,
    meta TEXT, x INTEGER, pri INTEGER,
    PRIMARY KEY (user, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS grants_live ON grants(user, seq) WHERE gone = 0;
CREATE TABLE IF NOT EXISTS holds (
    user TEXT NOT NULL, hold_id TEXT NOT NULL, version INTEGER NOT NULL,
    st TEXT, amt INTEGER, exp INTEGER, fin INTEGER,
    open_version INTEGER NOT NULL DEFAULT 0, ear TEXT, at INTEGER, op TEXT, x TEXT,
    PRIMARY KEY (user, hold_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS holds_open ON holds(user, hold_id) WHERE st = 'open';
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY, user TEXT NOT NULL, digest TEXT NOT NULL UNIQUE, prefix TEXT NOT NULL,
    name TEXT NOT NULL, created_ms INTEGER NOT NULL, revoked_ms INTEGER
);
CREATE INDEX IF NOT EXISTS api_keys_user ON api_keys(user, created_ms);
CREATE TABLE IF NOT EXISTS rate_limits (
    user TEXT PRIMARY KEY, rpm INTEGER, tpm INTEGER
) WITHOUT ROWID;
"""

# One account of the first schema: a live grant, a gone one, one whose balance never came
# (metadata only), an open hold, a settled one, its ledger, an API key, a rate-limit override.
ZED_STATE = {"v": "3", "available": "4000000", "held": "1000000", "seq": "3"}
ZED_GRANT = json.dumps({"id": "z-g1", "src": "payment", "exp": "0", "pri": "100"})
ZED_LEDGER = [
    (
        "zed",
        "z-g1",
        "grant",
        1,
        1_000,
        5_000_000,
        None,
        "grant|5000000",
        json.dumps(
            {
                "id": "z-g1",
                "t": "grant",
                "u": "zed",
                "v": "1",
                "ts": "1000",
                "amt": "5000000",
                "a": ZED_STATE,
                "fp": "grant|5000000",
                "res": {"grant_seq": "000000000001"},
            }
        ),
    ),
    (
        "zed",
        "z-h1",
        "hold_open",
        2,
        2_000,
        1_000_000,
        "z-h1",
        None,
        json.dumps({"id": "z-h1", "t": "hold_open", "u": "zed", "v": "2", "ts": "2000", "a": ZED_STATE}),
    ),
]
ZED_ACCOUNT = ("zed", 3, 7, 4_000_000, 1_000_000, 0, 9_000_000, 3_000_000, 1_000_000, 3, 250)
ZED_GRANTS = [
    ("zed", "000000000001", 3, 4_000_000, 1_000_000, 0, ZED_GRANT, 0, 100),
    ("zed", "000000000002", 2, 0, 0, 1, '{"id":"z-g2"}', 1_500, 5),
    ("zed", "000000000003", 0, None, None, 0, '{"id":"z-g3"}', 0, 7),
]
ZED_HOLDS = [
    (
        "zed",
        "z-h1",
        2,
        "open",
        1_000_000,
        9_000,
        None,
        2,
        "000000000001=1000000",
        2_000,
        "z-h1",
        '{"req":"r1"}',
    ),
    ("zed", "z-h0", 3, "settled", 500_000, 8_000, 300_000, 1, "000000000002=500000", 1_500, "op-0", "{}"),
]
ZED_KEY = ("key_00000000000000z1", "zed", "ab" * 32, "cgk_zzzzzz", "ci", 1_234, None)
ZED_LIMITS = ("zed", 60, 0)


async def assert_zed_reads_back(s: Store) -> None:
    """What the first schema's rows above must read as, whatever the backend."""
    from gateway.core.store.base import ApiKeyRecord, RateLimitOverride

    snap = await s.snapshot("zed")
    assert snap is not None and snap.version == 3
    assert snap.totals == {
        "available": 4_000_000,
        "held": 1_000_000,
        "debt": 0,
        "granted": 9_000_000,
        "spent": 3_000_000,
        "expired": 1_000_000,
        "seq": 3,
        "debt_total": 250,
    }
    assert snap.grants == [
        {"seq": "000000000001", "r": 4_000_000, "e": 1_000_000, "x": 0, "pri": 100, "m": ZED_GRANT}
    ]
    assert snap.holds == [
        {
            "id": "z-h1",
            "amt": 1_000_000,
            "exp": 9_000,
            "ear": "000000000001=1000000",
            "at": 2_000,
            "op": "z-h1",
            "x": '{"req":"r1"}',
        }
    ]
    assert "zed" in {p.user async for p in s.snapshots(7)}
    ledger = [e async for e in s.ledger_all("zed")]
    assert [(e.op_id, e.type, e.version, e.ts_ms, e.amount, e.hold_id) for e in ledger] == [
        (r[1], r[2], r[3], r[4], r[5], r[6]) for r in ZED_LEDGER
    ]
    assert [e.event for e in ledger] == [json.loads(r[8]) for r in ZED_LEDGER]
    ops = [o async for o in s.operations_since(0) if o.user == "zed"]
    assert [(o.user, o.op_id, o.fingerprint, o.ts_ms) for o in ops] == [
        ("zed", "z-g1", "grant|5000000", 1_000)
    ]
    assert json.loads(ops[0].result) == {"grant_seq": "000000000001", "state": ZED_STATE}
    resolved = [h async for h in s.resolved_holds_since(0) if h.user == "zed"]
    assert [(h.user, h.hold_id, h.status, h.expires_ms) for h in resolved] == [
        ("zed", "z-h0", "settled", 8_000)
    ]
    assert await s.api_keys("zed") == [ApiKeyRecord(*ZED_KEY)]
    assert await s.rate_limits("zed") == RateLimitOverride(*ZED_LIMITS)


def _rows(path, table: str) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()


async def test_sqlite_file_of_the_first_schema_is_migrated_and_keeps_every_row(engine, events, tmp_path):
    from gateway.core.store.sqlite_schema import SCHEMA_VERSION

    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as db:
        db.executescript(SQLITE_SCHEMA_1)
        db.executemany(
            "INSERT INTO ledger (user, op_id, type, version, ts_ms, amount, hold_id, fingerprint, "
            "event) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ZED_LEDGER,
        )
        db.execute("INSERT INTO accounts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", ZED_ACCOUNT)
        db.executemany("INSERT INTO grants VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", ZED_GRANTS)
        db.executemany("INSERT INTO holds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", ZED_HOLDS)
        db.execute("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, ?)", ZED_KEY)
        db.execute("INSERT INTO rate_limits VALUES (?, ?, ?)", ZED_LIMITS)
    tables = ("ledger", "accounts", "grants", "holds", "api_keys", "rate_limits")
    before = {t: _rows(path, t) for t in tables}

    s = SQLiteStore(str(path))
    await s.open()
    try:
        await assert_zed_reads_back(s)
    finally:
        await s.close()
    # every row, every value, in the renamed columns (rate_limits gained the plan's, empty)
    after = {t: _rows(path, t) for t in tables}
    assert [r[3:] for r in after["rate_limits"]] == [(None, None, None)] * len(before["rate_limits"])
    after["rate_limits"] = [r[:3] for r in after["rate_limits"]]
    assert after == before
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        cols = {
            t: [r[1] for r in db.execute(f"PRAGMA table_info({t})")]
            for t in ("grants", "holds", "rate_limits")
        }
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert cols == {
        "grants": [
            "user",
            "seq",
            "version",
            "free",
            "earmarked",
            "gone",
            "metadata",
            "expires_ms",
            "priority",
        ],
        "holds": [
            "user",
            "hold_id",
            "version",
            "status",
            "amount",
            "expires_ms",
            "charged",
            "open_version",
            "earmarks",
            "opened_ms",
            "op_id",
            "metadata",
        ],
        "rate_limits": [
            "user",
            "requests_per_minute",
            "tokens_per_minute",
            "plan_requests_per_minute",
            "plan_tokens_per_minute",
            "allowed_models",
        ],
    }
    # opened again: nothing to migrate; and the file takes the engine's events like a new one
    s = SQLiteStore(str(path))
    await s.open()
    try:
        await assert_zed_reads_back(s)
        assert await s.write_events(events) == len(events)
        for u in USERS:
            assert store_view(await s.snapshot(u)) == await redis_view(engine, u), u
        await assert_zed_reads_back(s)
    finally:
        await s.close()


async def test_sqlite_file_of_a_newer_schema_is_refused(tmp_path):
    from gateway.core.store.sqlite_schema import SchemaTooNew

    path = tmp_path / "future.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    s = SQLiteStore(str(path))
    with pytest.raises(SchemaTooNew, match="99"):
        await s.open()
    await s.close()


async def test_mongo_documents_of_the_first_schema_are_migrated(mongo_uri, engine, events):
    from pymongo import ASCENDING, AsyncMongoClient

    name = f"t_v1_{uuid.uuid4().hex[:12]}"
    client: AsyncMongoClient = AsyncMongoClient(mongo_uri)
    db = client[name]
    try:
        await db.ledger.insert_many(
            [
                {
                    "user_id": u,
                    "op_id": o,
                    "type": t,
                    "version": v,
                    "ts_ms": ts,
                    "amount": a,
                    "hold_id": h,
                    "fp": fp,
                    "event": e,
                }
                for u, o, t, v, ts, a, h, fp, e in ZED_LEDGER
            ]
        )
        u, v, p, *totals, debt_total = ZED_ACCOUNT
        fields = ("available", "held", "debt", "granted", "spent", "expired", "seq")
        await db.accounts.insert_one(
            {
                "_id": u,
                "version": v,
                "partition": p,
                **dict(zip(fields, totals, strict=True)),
                "state_debt_total": debt_total,
            }
        )
        for u, seq, v, r, e, gone, m, x, pri in ZED_GRANTS:
            doc = {
                "_id": f"{u}|{seq}",
                "user_id": u,
                "seq": seq,
                "version": v,
                "gone": bool(gone),
                "m": m,
                "x": x,
                "pri": pri,
            }
            if r is not None:
                doc |= {"r": r, "e": e}
            await db.grants.insert_one(doc)
        for u, hid, v, st, amt, exp, fin, ov, ear, at, op, x in ZED_HOLDS:
            await db.holds.insert_one(
                {
                    "_id": f"{u}|{hid}",
                    "user_id": u,
                    "hold_id": hid,
                    "version": v,
                    "st": st,
                    "amt": amt,
                    "exp": exp,
                    "fin": fin,
                    "open_version": ov,
                    "ear": ear,
                    "at": at,
                    "op": op,
                    "x": x,
                }
            )
        await db.holds.create_index([("user_id", ASCENDING), ("st", ASCENDING)])
        k = ZED_KEY
        await db.api_keys.insert_one(
            {
                "_id": k[0],
                "user_id": k[1],
                "digest": k[2],
                "prefix": k[3],
                "name": k[4],
                "created_ms": k[5],
                "revoked_ms": k[6],
            }
        )
        await db.rate_limits.insert_one({"_id": ZED_LIMITS[0], "rpm": ZED_LIMITS[1], "tpm": ZED_LIMITS[2]})

        for _ in range(2):  # the second open finds the work done
            s = MongoStore(mongo_uri, db=name)
            await s.open()
            try:
                await assert_zed_reads_back(s)
            finally:
                await s.close()
        assert (await db.meta.find_one({"_id": "schema"}))["version"] == 2
        old = (
            "fp",
            "state_debt_total",
            "r",
            "e",
            "m",
            "x",
            "pri",
            "st",
            "amt",
            "exp",
            "fin",
            "ear",
            "at",
            "op",
            "rpm",
            "tpm",
        )
        for coll in ("ledger", "accounts", "grants", "holds", "rate_limits"):
            async for d in db[coll].find({}):
                assert not set(d) & set(old), (coll, d)
        assert "user_id_1_st_1" not in await db.holds.index_information()
        s = MongoStore(mongo_uri, db=name)
        await s.open()
        try:
            assert await s.write_events(events) == len(events)
            for u in USERS:
                assert store_view(await s.snapshot(u)) == await redis_view(engine, u), u
        finally:
            await s.close()
    finally:
        await client.drop_database(name)
        await client.close()
