"""The PostgreSQL store (asyncpg): a connection pool, the tables of postgres_schema.py.

A batch (collapsed by the shared write path, Store.write_events) is written as two
transactions at once, each on a pooled connection of its own: the ledger by COPY (an
INSERT that skips stored rows when the batch holds one), and the accounts, grants and
holds, each table's rows as one array per column out of `unnest`; the second commits only
after the first (see _write_batch). A batch of 1,000 events is a handful of round trips
whatever its size. The statements are SQLite's (store/sql.py): the ledger keeps one row per
(user, op id), and the snapshot upserts are guarded by the version, so batches may repeat
and arrive in any order.

asyncpg is imported only when a postgresql:// URL is asked for (store/registry.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

from ..events import answer_of
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
from .batch import AccountRow, Batch, GrantRow, HoldRow, LedgerRow
from .postgres_notifications import PostgresNotifications
from .postgres_payments import PostgresPayments
from .postgres_plans import PostgresPlans
from .postgres_pool import Pool
from .postgres_promos import PostgresPromos
from .postgres_schema import migrate
from .sql import affected, columns, numbered, unnest

PAGE = 500
OPS_PAGE = 5000  # operations_since: the rebuild reads every op id of the retention window
POOL_SIZE = 10

# The batch statements: each column one array parameter, the rows out of unnest.
LEDGER_TYPES = ("text", "text", "text", "bigint", "bigint", "bigint", "text", "text", "text")
ACCOUNT_TYPES = ("text", *("bigint",) * 10)
GRANT_TYPES = ("text", "text", "bigint", "bigint", "bigint", "bigint", "text", "bigint", "bigint")
HOLD_TYPES: tuple[str, ...] = ("text", "text", "bigint", "text", "bigint", "bigint", "bigint", "bigint")
HOLD_TYPES += ("text", "bigint", "text", "text")


INSERT_LEDGER = f"{sql.LEDGER_INSERT} {unnest(LEDGER_TYPES)} ON CONFLICT DO NOTHING"
UPSERT_ACCOUNT = f"{sql.ACCOUNT_INSERT} {unnest(ACCOUNT_TYPES)} {sql.ACCOUNT_CONFLICT}"
UPSERT_GRANT = f"{sql.GRANT_INSERT} {unnest(GRANT_TYPES)} {sql.GRANT_CONFLICT}"
UPSERT_HOLD = f"{sql.HOLD_INSERT} {unnest(HOLD_TYPES)} {sql.HOLD_CONFLICT}"

LEDGER_VERSIONS = """
SELECT l."user", l.op_id, l.version
FROM unnest($1::text[], $2::text[]) AS k(u, o) JOIN ledger AS l ON l."user" = k.u AND l.op_id = k.o
"""


def _ledger_entry(r: Any) -> LedgerEntry:
    user, op_id, type_, version, ts_ms, amount, hold_id, event = r
    return LedgerEntry(user, op_id, type_, version, ts_ms, amount, hold_id, orjson.loads(event))


class PostgresStore(PostgresPayments, PostgresPromos, PostgresPlans, PostgresNotifications, Store):
    """The durable store in a PostgreSQL database."""

    def __init__(self, dsn: str, *, pool_size: int = POOL_SIZE) -> None:
        if pool_size < 2:
            raise ValueError("a PostgresStore needs a pool of 2 connections at least (a batch takes 2)")
        self.dsn = dsn
        self.pool_size = pool_size
        self._pool: Pool | None = None
        # The connection of the batch under way in this task (see _transaction).
        self._tx: ContextVar[asyncpg.Connection | None] = ContextVar(f"pg-batch-{id(self)}", default=None)
        # A batch holds two connections: batches under way at once each get both, or a pool
        # taken by first halves would leave every batch waiting for its second.
        self._batches = asyncio.Semaphore(pool_size // 2)

    @classmethod
    def from_url(cls, url: str, *, database: str = "") -> PostgresStore:
        """`postgresql://` or `postgres://` as libpq spells them; a URL that names no
        database gets `database`."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("postgresql", "postgres"):
            raise ValueError(f"not a PostgreSQL URL: {parts.scheme}://")
        if parts.path.strip("/") or not database:
            return cls(url)
        return cls(urlunsplit(parts._replace(path=f"/{database}")))

    @property
    def pool(self) -> Pool:
        if self._pool is None:
            raise RuntimeError("PostgresStore is not open")
        return self._pool

    async def open(self) -> None:
        if self._pool is not None:
            return
        pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self.pool_size)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
        except BaseException:
            await pool.close()
            raise
        self._pool = Pool(pool)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def ping(self) -> bool:
        try:
            return await self.pool.fetchval("SELECT 1") == 1
        except Exception:
            return False

    # -- writes: the shared write path, the ledger and the snapshot rows side by side ----------

    async def _write_batch(self, b: Batch) -> int:
        """The ledger rows and the snapshot rows written at once, each part in a transaction
        on a connection of its own (the server works on both while the worker decodes the
        next batch), the snapshot rows committed only after the ledger: no snapshot row is
        ever ahead of the ledger. A part that fails leaves the other uncommitted or, the
        ledger committed, is written again with the batch's redelivery."""
        async with self._batches, self._transaction():  # the snapshot rows' connection
            snapshots = asyncio.ensure_future(self._write_snapshots(b))  # it keeps this context
            try:
                async with self._transaction():  # the ledger's, in this task only
                    new = await self._write_ledger(b)
            except BaseException:
                await asyncio.wait([snapshots])  # its connection idle before the rollback
                raise
            await snapshots
        return new

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        async with self.pool.acquire() as conn, conn.transaction():
            token = self._tx.set(conn)
            try:
                yield
            finally:
                self._tx.reset(token)

    @property
    def _batch(self) -> asyncpg.Connection:
        conn = self._tx.get()
        if conn is None:
            raise RuntimeError("a write hook ran outside its batch's transaction")
        return conn

    async def _insert_ledger(self, rows: list[LedgerRow]) -> int:
        # New rows (the drain's steady state) go in by COPY, PostgreSQL's bulk path: about half
        # the cost of an INSERT of the same rows. A batch holding a row the ledger has (a
        # redelivery) fails the COPY whole: back to the savepoint before it, and the INSERT
        # that skips stored rows.
        conn = self._batch
        try:
            async with conn.transaction():
                await conn.copy_records_to_table("ledger", records=rows, columns=sql.LEDGER_COLS_IN)
            return len(rows)
        except asyncpg.UniqueViolationError:
            return affected(await conn.execute(INSERT_LEDGER, *columns(rows, len(LEDGER_TYPES))))

    async def _ledger_versions(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
        rows = await self._batch.fetch(LEDGER_VERSIONS, *columns(list(keys), 2))
        return {(r[0], r[1]): r[2] for r in rows}

    async def _write_accounts(self, rows: list[AccountRow]) -> None:
        await self._batch.execute(UPSERT_ACCOUNT, *columns(rows, len(ACCOUNT_TYPES)))

    async def _write_grants(self, rows: list[GrantRow]) -> None:
        await self._batch.execute(UPSERT_GRANT, *columns(sql.grant_rows(rows), len(GRANT_TYPES)))

    async def _write_holds(self, rows: list[HoldRow]) -> None:
        await self._batch.execute(UPSERT_HOLD, *columns(sql.hold_rows(rows), len(HOLD_TYPES)))

    # -- reads ------------------------------------------------------------------------------

    async def ledger(
        self, user: str, *, before_version: int | None = None, limit: int = 50
    ) -> list[LedgerEntry]:
        if before_version is None:
            rows = await self.pool.fetch(numbered(sql.LEDGER_NEWEST), user, limit)
        else:
            rows = await self.pool.fetch(numbered(sql.LEDGER_BEFORE), user, before_version, limit)
        return [_ledger_entry(r) for r in rows]

    async def ledger_all(self, user: str) -> AsyncIterator[LedgerEntry]:
        after = -1
        while True:
            rows = await self.pool.fetch(numbered(sql.LEDGER_AFTER), user, after, PAGE)
            for r in rows:
                yield _ledger_entry(r)
            if len(rows) < PAGE:
                return
            after = rows[-1]["version"]

    async def _snapshots_of(self, accounts: list[Any]) -> list[AccountSnapshot]:
        """The snapshots of a page of account rows: their grants and holds in one query each."""
        if not accounts:
            return []
        users = [a[0] for a in accounts]
        grants: dict[str, list[dict[str, Any]]] = {u: [] for u in users}
        holds: dict[str, list[dict[str, Any]]] = {u: [] for u in users}
        async with self.pool.acquire() as conn:
            for r in await conn.fetch(
                'SELECT "user", seq, free, earmarked, expires_ms, priority, metadata FROM grants '
                'WHERE "user" = ANY($1::text[]) AND gone = 0 AND free IS NOT NULL ORDER BY "user", seq',
                users,
            ):
                grants[r[0]].append(restore_grant(*r[1:]))
            for r in await conn.fetch(
                'SELECT "user", hold_id, amount, expires_ms, earmarks, opened_ms, op_id, metadata '
                'FROM holds WHERE "user" = ANY($1::text[]) AND status = \'open\' ORDER BY "user", hold_id',
                users,
            ):
                holds[r[0]].append(restore_hold(*r[1:]))
        out = []
        for a in accounts:
            user, version, _partition, *vals, debt_total = a
            totals = dict(zip(TOTAL_FIELDS, vals, strict=False))
            totals["debt_total"] = debt_total
            out.append(AccountSnapshot(user, version, totals, grants[user], holds[user]))
        return out

    async def snapshot(self, user: str) -> AccountSnapshot | None:
        row = await self.pool.fetchrow(numbered(sql.ACCOUNT_OF), user)
        return None if row is None else (await self._snapshots_of([row]))[0]

    async def snapshots(self, partition: int | None = None) -> AsyncIterator[AccountSnapshot]:
        after = ""
        while True:
            if partition is None:
                rows = await self.pool.fetch(numbered(sql.ACCOUNTS_AFTER), after, PAGE)
            else:
                rows = await self.pool.fetch(numbered(sql.PARTITION_AFTER), partition, after, PAGE)
            for s in await self._snapshots_of(rows):
                yield s
            if len(rows) < PAGE:
                return
            after = rows[-1][0]

    async def operations_since(self, ts_ms: int) -> AsyncIterator[OperationRecord]:
        after = 0
        while True:
            rows = await self.pool.fetch(numbered(sql.OPERATIONS_AFTER), after, ts_ms, OPS_PAGE)
            for _id, user, op_id, fp, event, t in rows:
                answer = answer_of(orjson.loads(event))
                if answer is not None:
                    yield OperationRecord(user, op_id, fp, answer, t)
            if len(rows) < OPS_PAGE:
                return
            after = rows[-1][0]

    async def resolved_holds_since(self, expires_ms: int) -> AsyncIterator[ResolvedHold]:
        after = ("", "")
        while True:
            rows = await self.pool.fetch(numbered(sql.RESOLVED_AFTER), *after, expires_ms, PAGE)
            for r in rows:
                yield ResolvedHold(*r)
            if len(rows) < PAGE:
                return
            after = (rows[-1][0], rows[-1][1])

    # -- API keys and rate-limit overrides -------------------------------------------------

    async def add_api_key(self, key: ApiKeyRecord) -> None:
        await self.pool.execute(
            numbered(sql.KEY_INSERT),
            key.key_id,
            key.user,
            key.digest,
            key.prefix,
            key.name,
            key.created_ms,
            key.revoked_ms,
        )

    async def revoke_api_key(self, user: str, key_id: str, at_ms: int) -> ApiKeyRecord | None:
        async with self.pool.acquire() as conn:
            await conn.execute(numbered(sql.KEY_REVOKE), at_ms, user, key_id)
            row = await conn.fetchrow(numbered(sql.KEY_OF), user, key_id)
        return ApiKeyRecord(*row) if row else None

    async def api_keys(self, user: str) -> list[ApiKeyRecord]:
        return [ApiKeyRecord(*r) for r in await self.pool.fetch(numbered(sql.KEYS_OF), user)]

    async def active_api_keys(self) -> AsyncIterator[ApiKeyRecord]:
        for r in await self.pool.fetch(sql.KEYS_ACTIVE):
            yield ApiKeyRecord(*r)

    def _models_value(self, models: list[str] | None) -> str | None:
        return sql.models_json(models)

    async def _set_limits(self, user: str, values: dict[str, Any]) -> RateLimitOverride | None:
        """Sets some of the account's limit columns in one transaction; a row left with
        nothing set is removed."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(numbered(sql.limits_upsert(values)), user, *values.values())
            o = sql.limits_of(await conn.fetchrow(numbered(sql.LIMITS_OF), user))
            if o.empty:
                await conn.execute(numbered(sql.LIMITS_DELETE), user)
        return None if o.empty else o

    async def rate_limits(self, user: str) -> RateLimitOverride | None:
        row = await self.pool.fetchrow(numbered(sql.LIMITS_OF), user)
        return sql.limits_of(row) if row else None

    async def all_rate_limits(self) -> AsyncIterator[RateLimitOverride]:
        for r in await self.pool.fetch(sql.LIMITS_ALL):
            yield sql.limits_of(r)
