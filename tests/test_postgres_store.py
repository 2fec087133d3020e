"""What is PostgreSQL's own in the PostgreSQL store: its schema is SQLite's, name for name;
concurrent openers migrate once; a newer schema is refused. (The store contract itself runs
on it in tests/test_store.py and tests/test_payment_store.py.)"""

from __future__ import annotations

import asyncio
import sqlite3

import asyncpg
import pytest

from gateway.core.store import PostgresStore, SQLiteStore
from gateway.core.store.postgres_schema import SCHEMA_VERSION, SchemaTooNew
from tests.support.store_fixtures import dispose, open_store, postgres_backend


@pytest.fixture
def pg_backend(request):
    return postgres_backend(request)


def sqlite_schema(path: str) -> dict[str, dict]:
    """Per table: its columns (name, integer?, not null), and its named indexes (columns,
    unique, partial) as SQLite has them."""
    db = sqlite3.connect(path)
    try:
        out: dict[str, dict] = {}
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for t in tables:
            cols = [
                (name, decl.upper() == "INTEGER", bool(notnull or pk))
                for _cid, name, decl, notnull, _default, pk in db.execute(f"PRAGMA table_info({t})")
            ]
            indexes = {}
            for _seq, name, unique, origin, partial in db.execute(f"PRAGMA index_list({t})"):
                if origin == "c":  # made by CREATE INDEX (not a key's own)
                    on = [r[2] for r in db.execute(f"PRAGMA index_info({name})")]
                    indexes[name] = (on, bool(unique), bool(partial))
            out[t] = {"columns": cols, "indexes": indexes}
        return out
    finally:
        db.close()


async def postgres_schema(conn: asyncpg.Connection) -> dict[str, dict]:
    out: dict[str, dict] = {}
    rows = await conn.fetch(
        "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns "
        "WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"
    )
    for r in rows:
        t = out.setdefault(r["table_name"], {"columns": [], "indexes": {}})
        t["columns"].append((r["column_name"], r["data_type"] == "bigint", r["is_nullable"] == "NO"))
        assert r["data_type"] in ("bigint", "text", "boolean"), r  # no other types
    for r in await conn.fetch(
        "SELECT t.relname AS tab, i.relname AS name, x.indisunique AS uniq, "
        "x.indpred IS NOT NULL AS partial, "
        "array(SELECT a.attname FROM unnest(x.indkey) WITH ORDINALITY k(n, o) "
        "JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.n ORDER BY k.o) AS cols "
        "FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid "
        "WHERE t.relnamespace = current_schema()::regnamespace AND NOT x.indisprimary "
        "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)"
    ):
        out[r["tab"]]["indexes"][r["name"]] = (list(r["cols"]), r["uniq"], r["partial"])
    return out


async def test_the_schema_is_sqlite_s_name_for_name_with_bigint_integers(pg_backend, tmp_path):
    lite = SQLiteStore(str(tmp_path / "s.db"))
    await lite.open()
    await lite.close()
    expected = sqlite_schema(str(tmp_path / "s.db"))
    pg = await open_store(pg_backend, 0)
    try:
        assert isinstance(pg, PostgresStore)
        async with pg.pool.acquire() as conn:
            found = await postgres_schema(conn)
    finally:
        await dispose(pg_backend, [pg])
    assert found.pop("schema_meta")["columns"] == [("one", False, True), ("version", True, True)]
    assert sorted(found) == sorted(expected)
    for table, want in expected.items():
        assert found[table]["columns"] == want["columns"], table
        assert found[table]["indexes"] == want["indexes"], table


async def test_concurrent_openers_migrate_once_and_a_newer_schema_is_refused(pg_backend):
    await pg_backend.prepare(0)
    url = pg_backend.url(0)
    stores = [PostgresStore(url) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))  # a gateway and workers starting together
    try:
        assert await stores[0].pool.fetch("SELECT version FROM schema_meta") == [(SCHEMA_VERSION,)]
        await stores[0].pool.execute("UPDATE schema_meta SET version = $1", SCHEMA_VERSION + 1)
        with pytest.raises(SchemaTooNew):
            await PostgresStore(url).open()
    finally:
        for s in stores[1:]:
            await s.close()
        await dispose(pg_backend, stores[:1])


async def _traffic(engine) -> list:
    from tests.support.engine_helpers import all_events

    await engine.grant("pat", "10", op_id="g1")
    await engine.reserve("pat", "2", hold_id="h1", ttl_seconds=60)
    await engine.settle("pat", "h1", "1.5")
    return await all_events(engine)


async def test_no_snapshot_row_is_committed_without_its_ledger(engine, pg_backend, monkeypatch):
    """A batch's two parts run at once on two connections; the snapshot rows commit only
    after the ledger: a failed ledger part leaves no snapshot row behind."""
    events = await _traffic(engine)
    store = await open_store(pg_backend, 0)
    try:

        async def broken(rows):
            await asyncio.sleep(0.2)  # the snapshot statement is done by now, not committed
            raise ConnectionResetError("the ledger's connection dropped")

        monkeypatch.setattr(store, "_insert_ledger", broken)
        with pytest.raises(ConnectionResetError):
            await store.write_events(events)
        assert await store.snapshot("pat") is None and await store.ledger("pat") == []
        monkeypatch.undo()
        assert await store.write_events(events) == len(events)
        assert (await store.snapshot("pat")).totals["available"] == 8_500_000
    finally:
        await dispose(pg_backend, [store])


async def test_a_failed_snapshot_part_is_written_by_the_redelivery(engine, pg_backend, monkeypatch):
    events = await _traffic(engine)
    store = await open_store(pg_backend, 0)
    try:

        async def broken(rows):
            raise ConnectionResetError("the snapshot connection dropped")

        monkeypatch.setattr(store, "_write_holds", broken)
        with pytest.raises(ConnectionResetError):
            await store.write_events(events)
        # The ledger committed; the accounts and grants of the failed part did not.
        assert len(await store.ledger("pat")) == len(events) and await store.snapshot("pat") is None
        monkeypatch.undo()
        assert await store.write_events(events) == 0  # the redelivery: nothing new in the ledger
        snap = await store.snapshot("pat")
        assert snap.totals["available"] == 8_500_000 and snap.holds == []
    finally:
        await dispose(pg_backend, [store])


async def test_more_batches_at_once_than_the_pool_has_connections_all_complete(engine, pg_backend):
    """Each batch takes two connections; a pool of 4 with 12 batches under way at once must
    not end with every batch holding one and waiting for another."""
    from tests.support.engine_helpers import all_events

    for i in range(12):
        await engine.grant(f"b{i}", "5", op_id=f"g{i}")
    events = await all_events(engine)
    await pg_backend.prepare(0)
    store = PostgresStore(pg_backend.url(0), pool_size=4)
    await store.open()
    try:
        news = await asyncio.wait_for(asyncio.gather(*(store.write_events([e]) for e in events)), 30)
        assert sum(news) == len(events) == 12
    finally:
        await dispose(pg_backend, [store])


async def test_a_server_out_of_reach_is_503_store_unavailable_then_served_again(pg_backend, redis, redis_url):
    """PostgreSQL behind a TCP proxy the test cuts: the open connections are reset and new
    ones refused; an admin read answers 503 store_unavailable (not 500), and once the
    server is back the same read is served."""
    import re

    from tests.support.api_fixtures import H_ADMIN, app_client, settings_for
    from tests.support.flaky_redis import FlakyRedisProxy

    await pg_backend.prepare(0)
    url = pg_backend.url(0)
    host, port = re.search(r"@([^:/]+):(\d+)/", url).groups()
    cut = await FlakyRedisProxy(host, int(port)).start()
    store = PostgresStore(url.replace(f"@{host}:{port}/", f"@127.0.0.1:{cut.port}/"))
    try:
        async with app_client(settings_for(redis_url), redis, store) as api:
            assert (await api.get("/admin/accounts/pg/ledger", headers=H_ADMIN)).status_code == 200
            cut.down()
            for _ in range(2):  # a pooled connection reset, then a new one refused
                r = await api.get("/admin/accounts/pg/ledger", headers=H_ADMIN)
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "store_unavailable" and r.headers["Retry-After"] == "1"
            cut.up()
            assert (await api.get("/admin/accounts/pg/ledger", headers=H_ADMIN)).status_code == 200
    finally:
        await cut.close()
        await dispose(pg_backend, [store])
