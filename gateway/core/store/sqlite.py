"""The embedded store: one SQLite file (WAL), every call on one dedicated thread.

The tables and their migrations are in sqlite_schema.py. A batch (collapsed by the shared
write path, Store.write_events, on the store's thread) is written in one transaction with
one `executemany` per table (the statements are store/sql.py's, shared with PostgreSQL).
Snapshot rows are upserts guarded by the version, so batches may repeat and arrive in any
order.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import orjson

from ..events import Event, answer_of
from . import sql
from .base import (
    TOTAL_FIELDS,
    AccountSnapshot,
    ApiKeyRecord,
    LedgerEntry,
    OperationRecord,
    RateLimitOverride,
    ResolvedHold,
    Store,
    restore_grant,
    restore_hold,
)
from .batch import AccountRow, GrantRow, HoldRow, LedgerRow
from .sqlite_notifications import SQLiteNotifications
from .sqlite_payments import SQLitePayments
from .sqlite_plans import SQLitePlans
from .sqlite_promos import SQLitePromos
from .sqlite_schema import migrate

T = TypeVar("T")

PAGE = 500
OPS_PAGE = 5000  # operations_since: the rebuild reads every op id of the retention window

# The batch statements: store/sql.py's (shared with PostgreSQL), one row per binding.
INSERT_LEDGER = f"{sql.LEDGER_INSERT} VALUES ({sql.marks(9)}) ON CONFLICT DO NOTHING"
UPSERT_ACCOUNT = f"{sql.ACCOUNT_INSERT} VALUES ({sql.marks(11)}) {sql.ACCOUNT_CONFLICT}"
UPSERT_GRANT = f"{sql.GRANT_INSERT} VALUES ({sql.marks(9)}) {sql.GRANT_CONFLICT}"
UPSERT_HOLD = f"{sql.HOLD_INSERT} VALUES ({sql.marks(12)}) {sql.HOLD_CONFLICT}"

# The stored versions of a batch's (user, op id) keys in one statement: the keys go in as one
# JSON array of pairs, each looked up on the ledger's unique index (CROSS JOIN keeps the
# array as the outer loop).
LEDGER_VERSIONS = """
SELECT l.user, l.op_id, l.version
FROM json_each(?) AS k CROSS JOIN ledger AS l
WHERE l.user = json_extract(k.value, '$[0]') AND l.op_id = json_extract(k.value, '$[1]')
"""


def _run_to_end(fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
    """Runs the coroutine `fn(*args)` to its end in one step, on the calling thread.

    For the shared write path over this store's hooks, which call SQLite directly and never
    await anything that suspends: the coroutine finishes at its first `send`. One that
    suspended would be a bug in a hook, reported rather than left half-run.
    """
    coro = fn(*args)
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError(f"{fn.__qualname__} suspended on the store's thread")


def _ledger_entry(row: tuple) -> LedgerEntry:
    user, op_id, type_, version, ts_ms, amount, hold_id, event = row
    return LedgerEntry(user, op_id, type_, version, ts_ms, amount, hold_id, json.loads(event))


WAL_SWITCH_SECONDS = 30.0


def _wal(conn: sqlite3.Connection) -> None:
    """Switches a file to WAL. Two processes opening a new file at once (serve --workers N)
    can each hold the lock the other needs; SQLite then answers one "database is locked" at
    once, without its busy wait, so that one lets go and tries again."""
    deadline = time.monotonic() + WAL_SWITCH_SECONDS
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05 + random.random() * 0.1)


class SQLiteStore(SQLitePayments, SQLitePromos, SQLitePlans, SQLiteNotifications, Store):
    """The durable store in one SQLite file (or ":memory:")."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._ex: ThreadPoolExecutor | None = None

    @classmethod
    def from_url(cls, url: str, *, database: str = "") -> SQLiteStore:
        """`sqlite:///relative/path`, `sqlite:////absolute/path`, `sqlite:///:memory:` (as
        SQLAlchemy spells them), or a plain path."""
        scheme, sep, rest = url.partition("://")
        if not sep:
            return cls(url)
        if scheme.lower() != "sqlite":
            raise ValueError(f"not a SQLite URL: {scheme}://")
        path = rest[1:] if rest.startswith("/") else rest
        return cls(path or ":memory:")

    # -- plumbing ---------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn` on the store's thread: calls run there one at a time, in order."""
        if self._ex is None:
            raise RuntimeError("SQLiteStore is not open")
        return await asyncio.get_running_loop().run_in_executor(self._ex, fn, *args)

    @property
    def db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("SQLiteStore is not open")
        return self._conn

    def _open(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("PRAGMA page_size=8192")  # only takes effect on a new database
        _wal(conn)
        conn.execute("PRAGMA synchronous=NORMAL")
        # A checkpoint (the only step that fsyncs) every ~80 MB of WAL rather than every 8 MB:
        # a batch of 1,000 events dirties a few MB of pages, many of them the same from one
        # batch to the next (accounts, grants, index pages), which a checkpoint writes once.
        conn.execute("PRAGMA wal_autocheckpoint=10000")
        conn.execute("PRAGMA journal_size_limit=134217728")
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.execute("PRAGMA cache_size=-65536")
        migrate(conn)
        self._conn = conn

    async def open(self) -> None:
        if self._ex is not None:
            return
        self._ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        try:
            await self._call(self._open)
        except BaseException:
            self._ex.shutdown(wait=False)
            self._ex = None
            raise

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def close(self) -> None:
        if self._ex is None:
            return
        try:
            await self._call(self._close)
        finally:
            self._ex.shutdown(wait=True)
            self._ex = None

    async def ping(self) -> bool:
        try:
            return await self._call(lambda: self.db.execute("SELECT 1").fetchone() == (1,))
        except Exception:
            return False

    # -- writes: the shared write path, run on the store's thread ------------------------------

    async def write_events(self, events: list[Event]) -> int:
        # One job on the store's thread per batch: the collapse included (the event loop only
        # waits), and no other call between the statements of its transaction.
        if not events:
            return 0
        return await self._call(_run_to_end, super().write_events, events)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # The hooks call SQLite directly and never suspend (see _run_to_end).

    def _changes(self, sql: str, rows: list[Any]) -> int:
        db = self.db
        before = db.total_changes
        db.executemany(sql, rows)
        return db.total_changes - before

    async def _insert_ledger(self, rows: list[LedgerRow]) -> int:
        return self._changes(INSERT_LEDGER, rows)

    async def _ledger_versions(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
        rows = self.db.execute(LEDGER_VERSIONS, (orjson.dumps(list(keys)).decode(),))
        return {(user, op_id): version for user, op_id, version in rows}

    async def _write_accounts(self, rows: list[AccountRow]) -> None:
        self._changes(UPSERT_ACCOUNT, rows)

    async def _write_grants(self, rows: list[GrantRow]) -> None:
        self._changes(UPSERT_GRANT, sql.grant_rows(rows))

    async def _write_holds(self, rows: list[HoldRow]) -> None:
        self._changes(UPSERT_HOLD, sql.hold_rows(rows))

    # -- reads ------------------------------------------------------------------------------

    def _ledger(self, user: str, before_version: int | None, limit: int) -> list[LedgerEntry]:
        if before_version is None:
            rows = self.db.execute(sql.LEDGER_NEWEST, (user, limit)).fetchall()
        else:
            rows = self.db.execute(sql.LEDGER_BEFORE, (user, before_version, limit)).fetchall()
        return [_ledger_entry(r) for r in rows]

    async def ledger(
        self, user: str, *, before_version: int | None = None, limit: int = 50
    ) -> list[LedgerEntry]:
        return await self._call(self._ledger, user, before_version, limit)

    def _ledger_page(self, user: str, after: int) -> list[LedgerEntry]:
        rows = self.db.execute(sql.LEDGER_AFTER, (user, after, PAGE)).fetchall()
        return [_ledger_entry(r) for r in rows]

    async def ledger_all(self, user: str) -> AsyncIterator[LedgerEntry]:
        after = -1
        while True:
            page = await self._call(self._ledger_page, user, after)
            for e in page:
                yield e
            if len(page) < PAGE:
                return
            after = page[-1].version

    def _snapshot_of(self, row: tuple) -> AccountSnapshot:
        db = self.db
        user, version, _partition, *vals, debt_total = row
        totals = dict(zip(TOTAL_FIELDS, vals, strict=False))
        totals["debt_total"] = debt_total
        grants = [
            restore_grant(*r)
            for r in db.execute(
                "SELECT seq, free, earmarked, expires_ms, priority, metadata FROM grants "
                "INDEXED BY grants_live WHERE user = ? AND gone = 0 AND free IS NOT NULL ORDER BY seq",
                (user,),
            )
        ]
        holds = [
            restore_hold(*r)
            for r in db.execute(
                "SELECT hold_id, amount, expires_ms, earmarks, opened_ms, op_id, metadata FROM holds "
                "INDEXED BY holds_open WHERE user = ? AND status = 'open' ORDER BY hold_id",
                (user,),
            )
        ]
        return AccountSnapshot(user, version, totals, grants, holds)

    def _snapshot(self, user: str) -> AccountSnapshot | None:
        row = self.db.execute(sql.ACCOUNT_OF, (user,)).fetchone()
        return None if row is None else self._snapshot_of(row)

    async def snapshot(self, user: str) -> AccountSnapshot | None:
        return await self._call(self._snapshot, user)

    def _snapshot_page(self, partition: int | None, after: str) -> list[AccountSnapshot]:
        if partition is None:
            rows = self.db.execute(sql.ACCOUNTS_AFTER, (after, PAGE)).fetchall()
        else:
            rows = self.db.execute(sql.PARTITION_AFTER, (partition, after, PAGE)).fetchall()
        return [self._snapshot_of(r) for r in rows]

    async def snapshots(self, partition: int | None = None) -> AsyncIterator[AccountSnapshot]:
        after = ""
        while True:
            page = await self._call(self._snapshot_page, partition, after)
            for s in page:
                yield s
            if len(page) < PAGE:
                return
            after = page[-1].user

    def _ops_page(self, ts_ms: int, after_id: int) -> tuple[list[OperationRecord], int, bool]:
        rows = self.db.execute(sql.OPERATIONS_AFTER, (after_id, ts_ms, OPS_PAGE)).fetchall()
        out = []
        for _id, user, op_id, fp, event, t in rows:
            answer = answer_of(orjson.loads(event))
            if answer is not None:
                out.append(OperationRecord(user, op_id, fp, answer, t))
        return out, (rows[-1][0] if rows else after_id), len(rows) == OPS_PAGE

    async def operations_since(self, ts_ms: int) -> AsyncIterator[OperationRecord]:
        # The next page is read on the store's thread while the caller handles this one.
        ahead = asyncio.ensure_future(self._call(self._ops_page, ts_ms, 0))
        try:
            while True:
                page, after, more = await ahead
                if more:
                    ahead = asyncio.ensure_future(self._call(self._ops_page, ts_ms, after))
                for op in page:
                    yield op
                if not more:
                    return
        finally:
            ahead.cancel()

    def _resolved_page(self, expires_ms: int, after: tuple[str, str]) -> list[ResolvedHold]:
        # Rebuild only: a scan of the holds (no index to keep up on every write).
        rows = self.db.execute(sql.RESOLVED_AFTER, (*after, expires_ms, PAGE)).fetchall()
        return [ResolvedHold(*r) for r in rows]

    async def resolved_holds_since(self, expires_ms: int) -> AsyncIterator[ResolvedHold]:
        after = ("", "")
        while True:
            page = await self._call(self._resolved_page, expires_ms, after)
            for h in page:
                yield h
            if len(page) < PAGE:
                return
            after = (page[-1].user, page[-1].hold_id)

    # -- API keys and rate-limit overrides -------------------------------------------------

    async def add_api_key(self, key: ApiKeyRecord) -> None:
        row = (key.key_id, key.user, key.digest, key.prefix, key.name, key.created_ms, key.revoked_ms)
        await self._call(lambda: self.db.execute(sql.KEY_INSERT, row))

    def _revoke(self, user: str, key_id: str, at_ms: int) -> ApiKeyRecord | None:
        self.db.execute(sql.KEY_REVOKE, (at_ms, user, key_id))
        row = self.db.execute(sql.KEY_OF, (user, key_id)).fetchone()
        return ApiKeyRecord(*row) if row else None

    async def revoke_api_key(self, user: str, key_id: str, at_ms: int) -> ApiKeyRecord | None:
        return await self._call(self._revoke, user, key_id, at_ms)

    async def api_keys(self, user: str) -> list[ApiKeyRecord]:
        rows = await self._call(lambda: self.db.execute(sql.KEYS_OF, (user,)).fetchall())
        return [ApiKeyRecord(*r) for r in rows]

    async def active_api_keys(self) -> AsyncIterator[ApiKeyRecord]:
        rows = await self._call(lambda: self.db.execute(sql.KEYS_ACTIVE).fetchall())
        for r in rows:
            yield ApiKeyRecord(*r)

    def _models_value(self, models: list[str] | None) -> str | None:
        return sql.models_json(models)

    async def _set_limits(self, user: str, values: dict[str, Any]) -> RateLimitOverride | None:
        return await self._call(self._set_limits_now, user, values)

    def _set_limits_now(self, user: str, values: dict[str, Any]) -> RateLimitOverride | None:
        """Sets some of the account's limit columns in one transaction; a row left with
        nothing set is removed."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(sql.limits_upsert(values), (user, *values.values()))
            o = sql.limits_of(db.execute(sql.LIMITS_OF, (user,)).fetchone())
            if o.empty:
                db.execute(sql.LIMITS_DELETE, (user,))
            db.execute("COMMIT")
            return None if o.empty else o
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def rate_limits(self, user: str) -> RateLimitOverride | None:
        row = await self._call(lambda: self.db.execute(sql.LIMITS_OF, (user,)).fetchone())
        return sql.limits_of(row) if row else None

    async def all_rate_limits(self) -> AsyncIterator[RateLimitOverride]:
        rows = await self._call(lambda: self.db.execute(sql.LIMITS_ALL).fetchall())
        for r in rows:
            yield sql.limits_of(r)
