"""The durable schema is defined once (gateway/core/store/schema.py): what `credit-gateway
schema` prints is what the stores create, on a new database and after every migration."""

from __future__ import annotations

import json
import re
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.core.store import MongoStore, SQLiteStore
from gateway.core.store.schema import MONGO_COLLECTIONS, TABLES
from tests.test_store import SQLITE_SCHEMA_1


def schema_output(capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(["schema", *args]) == 0
    return capsys.readouterr().out


# -- SQLite ------------------------------------------------------------------------------------


def _predicate(sql: str | None) -> str | None:
    """A partial index's WHERE clause, as SQLite keeps it (quotes and spacing aside)."""
    if not sql or " WHERE " not in sql.upper():
        return None
    where = re.split(r"\bWHERE\b", sql, maxsplit=1, flags=re.IGNORECASE)[1]
    return " ".join(where.replace('"', "").split())


def sqlite_catalog(path: Path) -> dict[str, Any]:
    """Every table's columns (name, type, not null, default, key position), whether it is a
    rowid table, and its indexes (columns, unique, origin, predicate)."""
    db = sqlite3.connect(path)
    try:
        out: dict[str, Any] = {}
        kinds = {r[1]: r[4] for r in db.execute("PRAGMA table_list") if r[0] == "main"}
        for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
        ):
            columns = []
            for _, col, type_, notnull, default, pk in db.execute(f"PRAGMA table_info({name})"):
                # a key column of a WITHOUT ROWID table is NOT NULL whether or not it says so
                columns.append((col, type_, bool(notnull) or (pk > 0 and kinds[name] == 1), default, pk))
            indexes = {}
            for _, index, unique, origin, partial in db.execute(f"PRAGMA index_list({name})"):
                cols = [r[2] for r in db.execute(f"PRAGMA index_info({index})")]
                sql = db.execute("SELECT sql FROM sqlite_master WHERE name = ?", (index,)).fetchone()
                label = index if origin == "c" else f"{origin}:{','.join(cols)}"  # auto-named
                indexes[label] = (
                    cols,
                    bool(unique),
                    _predicate(sql[0] if sql else None) if partial else None,
                )
            out[name] = {"columns": columns, "without_rowid": bool(kinds[name]), "indexes": indexes}
        return out
    finally:
        db.close()


async def test_the_printed_sqlite_ddl_is_what_the_store_creates(capsys, tmp_path):
    printed = tmp_path / "printed.db"
    with sqlite3.connect(printed) as db:
        db.executescript(schema_output(capsys, "--backend", "sql", "--dialect", "sqlite"))
    made = tmp_path / "store.db"
    s = SQLiteStore(str(made))
    await s.open()
    await s.close()

    want = sqlite_catalog(printed)
    assert sorted(want) == sorted(t.name for t in TABLES)
    assert sqlite_catalog(made) == want
    # and the definition's details reached the catalog
    assert want["ledger"]["without_rowid"] is False and want["grants"]["without_rowid"] is True
    assert want["holds"]["indexes"]["holds_open"] == (["user", "hold_id"], False, "status = 'open'")
    assert want["ledger"]["indexes"]["ledger_key"] == (["user", "op_id"], True, None)
    assert ("debt_total", "INTEGER", True, "0", 0) in want["accounts"]["columns"]


async def test_a_sqlite_file_of_the_first_schema_migrates_to_the_printed_schema(capsys, tmp_path):
    printed = tmp_path / "printed.db"
    with sqlite3.connect(printed) as db:
        db.executescript(schema_output(capsys, "--backend", "sql", "--dialect", "sqlite"))
    old = tmp_path / "v1.db"
    with sqlite3.connect(old) as db:
        db.executescript(SQLITE_SCHEMA_1)
    s = SQLiteStore(str(old))
    await s.open()
    await s.close()

    migrated, want = sqlite_catalog(old), sqlite_catalog(printed)
    # api_keys of the first schema said `key_id TEXT PRIMARY KEY` (a rowid table, where
    # SQLite does not enforce NOT NULL on a text key; every key the gateway writes has one)
    key_id = next(c for c in migrated["api_keys"]["columns"] if c[0] == "key_id")
    assert key_id == ("key_id", "TEXT", False, None, 1)
    migrated["api_keys"]["columns"] = [
        ("key_id", "TEXT", True, None, 1) if c[0] == "key_id" else c for c in migrated["api_keys"]["columns"]
    ]
    assert migrated == want


def test_the_sql_ddl_differs_by_dialect_only_where_it_must(capsys):
    sqlite = schema_output(capsys, "--backend", "sql", "--dialect", "sqlite")
    postgres = schema_output(capsys, "--backend", "sql", "--dialect", "postgres")
    assert "WITHOUT ROWID" in sqlite and "WITHOUT ROWID" not in postgres
    assert '"user" TEXT COLLATE "C" NOT NULL' in postgres
    assert "BIGINT" in postgres and "INTEGER" not in postgres
    # the same tables and indexes, in the same order
    names = re.compile(r"CREATE (?:UNIQUE )?(?:TABLE|INDEX) IF NOT EXISTS (\w+)")
    assert names.findall(sqlite) == names.findall(postgres)
    assert len(names.findall(sqlite)) == len(TABLES) + sum(len(t.indexes) for t in TABLES)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "sql"], "needs --dialect"),
        (["--backend", "mongo", "--dialect", "sqlite"], "--dialect is for --backend sql"),
    ],
)
def test_schema_command_refuses_what_it_cannot_print(capsys, args, message):
    assert main(["schema", *args]) == 2
    assert message in capsys.readouterr().err


def test_schema_command_refuses_an_unknown_dialect(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["schema", "--backend", "sql", "--dialect", "mysql"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# -- MongoDB ----------------------------------------------------------------------------------


async def _mongo_catalog(uri: str, db_name: str) -> dict[str, Any]:
    from pymongo import AsyncMongoClient

    client: AsyncMongoClient = AsyncMongoClient(uri)
    try:
        db = client[db_name]
        out: dict[str, Any] = {}
        async for c in await db.list_collections():
            options = c.get("options", {})
            indexes = {}
            async for i in await db[c["name"]].list_indexes():
                if i["name"] != "_id_":
                    indexes[i["name"]] = (dict(i["key"]), bool(i.get("unique", False)))
            out[c["name"]] = {
                "options": {k: options.get(k) for k in ("validator", "validationLevel")},
                "indexes": indexes,
            }
        return out
    finally:
        await client.close()


async def test_the_printed_mongo_schema_is_what_the_store_applies(capsys, mongo_uri):
    printed = json.loads(schema_output(capsys, "--backend", "mongo"))
    want = {
        c["name"]: {
            "options": {k: c["options"][k] for k in ("validator", "validationLevel")},
            "indexes": {i["name"]: (i["key"], bool(i.get("unique", False))) for i in c["indexes"]},
        }
        for c in printed
    }
    assert sorted(want) == sorted(c.name for c in MONGO_COLLECTIONS)
    db_name = f"t_schema_{uuid.uuid4().hex[:10]}"
    s = MongoStore(mongo_uri, db_name)
    await s.open()
    try:
        assert await _mongo_catalog(mongo_uri, db_name) == want
        # opened again (the worker after the gateway): nothing changes, nothing fails
        await s.close()
        await s.open()
        assert await _mongo_catalog(mongo_uri, db_name) == want
    finally:
        await s.db.client.drop_database(db_name)
        await s.close()


@pytest.mark.parametrize(
    ("collection", "doc", "field"),
    [
        (
            "ledger",
            {"user_id": "u", "op_id": "o", "type": "grant", "version": 1, "ts_ms": 1, "event": "{}"},
            "amount",
        ),
        (
            "ledger",
            {
                "user_id": "u",
                "op_id": "o",
                "type": "grant",
                "version": 1,
                "ts_ms": 1,
                "amount": 1.5,
                "event": "{}",
            },
            "amount",
        ),
        (
            "payments",
            {
                "_id": "p",
                "user_id": "u",
                "provider": "stripe",
                "amount_minor": 100,
                "currency": "usd",
                "credits": 1,
                "status": 7,
                "created_ms": 1,
            },
            "status",
        ),
        ("promo_claims", {"code": "X", "user_id": "u", "n": "1", "at_ms": 1}, "n"),
    ],
)
async def test_mongo_refuses_documents_the_schema_does_not_allow(mongo_uri, collection, doc, field):
    """Money as a float, a missing amount, a wrong type: refused by the server itself, so a
    script writing to the store by hand cannot leave a record the gateway would misread."""
    from pymongo.errors import WriteError

    db_name = f"t_schema_{uuid.uuid4().hex[:10]}"
    s = MongoStore(mongo_uri, db_name)
    await s.open()
    try:
        with pytest.raises(WriteError) as exc:
            await s.db[collection].insert_one(doc)
        assert exc.value.code == 121  # DocumentValidationFailure
        assert field in json.dumps(exc.value.details, default=str)
    finally:
        await s.db.client.drop_database(db_name)
        await s.close()


# -- PostgreSQL ------------------------------------------------------------------------------


async def _pg_catalog(conn, schema: str) -> dict[str, Any]:
    """Columns (type, collation, null, default), indexes (their definition) and constraints
    (keys, uniques, checks) of every table in `schema`, the store's own version table aside."""
    out: dict[str, Any] = {}
    for r in await conn.fetch(
        "SELECT table_name, column_name, data_type, collation_name, is_nullable, column_default, "
        "is_identity FROM information_schema.columns WHERE table_schema = $1 "
        "ORDER BY table_name, ordinal_position",
        schema,
    ):
        t = out.setdefault(r["table_name"], {"columns": [], "indexes": set(), "constraints": set()})
        t["columns"].append(tuple(r[k] for k in ("column_name", "data_type", "collation_name", "is_nullable",
                                                 "column_default", "is_identity")))  # fmt: skip
    for r in await conn.fetch("SELECT tablename, indexdef FROM pg_indexes WHERE schemaname = $1", schema):
        out[r["tablename"]]["indexes"].add(r["indexdef"].replace(f"{schema}.", ""))
    for r in await conn.fetch(
        "SELECT t.relname AS tab, c.contype, pg_get_constraintdef(c.oid) AS def FROM pg_constraint c "
        "JOIN pg_class t ON t.oid = c.conrelid WHERE t.relnamespace = $1::regnamespace",
        schema,
    ):
        out[r["tab"]]["constraints"].add((r["contype"], r["def"]))
    out.pop("schema_meta", None)
    return out


async def test_the_printed_postgres_ddl_is_what_the_store_creates(capsys, postgres_url):
    import asyncpg

    from gateway.core.store.postgres import PostgresStore

    ddl = schema_output(capsys, "--backend", "sql", "--dialect", "postgres")
    tag = uuid.uuid4().hex[:10]
    printed, made = f"printed_{tag}", f"made_{tag}"
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(f"CREATE SCHEMA {printed}; CREATE SCHEMA {made}")
        await conn.execute(f"SET search_path TO {printed}")
        await conn.execute(ddl)
        store = PostgresStore(f"{postgres_url}?search_path={made}")
        await store.open()
        await store.close()
        want, got = await _pg_catalog(conn, printed), await _pg_catalog(conn, made)
        assert sorted(want) == sorted(t.name for t in TABLES)
        assert got == want
        # the definition's details reached the catalog
        assert ("user", "text", "C", "NO", None, "NO") in want["accounts"]["columns"]
        assert any("WHERE (status = 'open'::text)" in i for i in want["holds"]["indexes"])
        assert (b"u", "UNIQUE (live_user)") in want["subscriptions"][
            "constraints"
        ]  # asyncpg: "char" as bytes
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {printed} CASCADE; DROP SCHEMA IF EXISTS {made} CASCADE")
        await conn.close()
