"""The embedded store: one SQLite file (WAL), every call on one dedicated thread.

Tables: `ledger` (one row per event, unique on (user, op_id); a rowid table so the large
rows are appended in order and only the small indexes take random inserts), `accounts` (one
row per user), `grants` (one row per (user, seq); a gone grant stays as a tombstone so that a late,
older event cannot bring it back), `holds` (one row per (user, hold_id)).

A batch is first collapsed in Python (`collapse`, shared with the MongoDB store) to the
newest version of each account / grant / hold, then written in one transaction with one
`executemany` per table, on the store's thread. Snapshot rows are upserts guarded by the version, so batches may
repeat and arrive in any order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from ..events import Event, answer_of
from .base import (
    AccountSnapshot,
    ApiKeyRecord,
    LedgerEntry,
    OperationRecord,
    RateLimitOverride,
    ResolvedHold,
    Store,
)

T = TypeVar("T")
log = logging.getLogger("credit.store")

TOTAL_FIELDS = ("available", "held", "debt", "granted", "spent", "expired", "seq")
PAGE = 500
OPS_PAGE = 5000  # operations_since: the rebuild reads every op id of the retention window


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()  # compact; several times faster than json


def _int(x: Any) -> int:
    return int(x or 0)


# -- batch collapse (shared by both stores) ----------------------------------------------


@dataclass(slots=True)
class GrantRow:
    user: str
    seq: str
    version: int = 0  # of the newest event that carried the grant's state (0: none yet)
    r: int | None = None
    e: int | None = None
    gone: bool = False
    meta: str | None = None  # the grant metadata as a JSON string (Lua's m:<seq>)
    x: int | None = None  # expiry (ms, 0 = never)
    pri: int | None = None


@dataclass(slots=True)
class HoldRow:
    user: str
    hold_id: str
    version: int = 0  # of the newest event that carried the hold's state
    st: str | None = None
    amt: int | None = None
    exp: int | None = None
    fin: int | None = None
    open_version: int = 0  # of the newest opening event (ear / at / op / x)
    ear: str | None = None
    at: int | None = None
    op: str | None = None
    x: str | None = None  # the hold's caller metadata as a JSON string


@dataclass(slots=True)
class Batch:
    """A batch reduced to one row per ledger entry and per snapshot row."""

    ledger: list[tuple] = field(default_factory=list)
    accounts: dict[str, Event] = field(default_factory=dict)
    grants: dict[tuple[str, str], GrantRow] = field(default_factory=dict)
    holds: dict[tuple[str, str], HoldRow] = field(default_factory=dict)


def collapse(events: list[Event]) -> Batch:
    """Ledger rows for every event; the newest state of each account, grant and hold.

    Ledger row: (user, op_id, type, version, ts_ms, amount, hold_id, fingerprint, event JSON);
    everything else an event says stays in its JSON.
    """
    b = Batch()
    ledger, accounts, grants, holds = b.ledger, b.accounts, b.grants, b.holds
    for ev in events:
        user, v, raw = ev.user, ev.version, ev.raw
        ledger.append(
            (
                user,
                ev.op_id,
                ev.type,
                v,
                ev.ts_ms,
                ev.amount,
                ev.hold_id,
                ev.fingerprint,
                ev.raw_json or _dumps(raw),
            )
        )
        cur = accounts.get(user)
        if cur is None or v > cur.version:
            accounts[user] = ev
        for seq, g in ev.grants.items():
            row = grants.get((user, seq))
            if row is None:
                row = grants[(user, seq)] = GrantRow(user, seq)
            if v > row.version:
                row.version = v
                if g is None:
                    row.gone, row.r, row.e = True, 0, 0
                else:
                    row.gone, row.r, row.e = False, g["r"], g["e"]
        for seq, meta in ev.grant_meta.items():
            row = grants.get((user, seq))
            if row is None:
                row = grants[(user, seq)] = GrantRow(user, seq)
            if row.meta is None and isinstance(meta, dict):
                row.meta = _dumps(meta)
                row.x = _int(meta.get("exp"))
                row.pri = _int(meta.get("pri"))
        h = ev.hold
        if h is not None:
            hid = h.get("id") or ev.hold_id
            if not hid:
                continue
            row = holds.get((user, hid))
            if row is None:
                row = holds[(user, hid)] = HoldRow(user, hid)
            if v > row.version:
                row.version = v
                row.st = h.get("st")
                row.amt = _int(h.get("amt"))
                row.exp = _int(h.get("exp"))
                row.fin = _int(h["fin"]) if h.get("fin") is not None else None
            if "ear" in h and v > row.open_version:
                row.open_version = v
                row.ear = h.get("ear") or ""
                row.at = _int(h.get("at"))
                row.op = h.get("op") or ev.op_id
                row.x = _dumps(ev.extra)
    return b


def reissued(rows: list[tuple], stored: dict[tuple[str, str], int]) -> list[tuple]:
    """Ledger rows whose (user, op id) the ledger already holds at another version.

    That happens when a caller reuses an operation id after Redis forgot it (past the
    retention): Redis applied the operation again, and its event is a real change that the
    ledger must keep, or the ledger would no longer replay to the balances. Such a row is
    kept under `<op id>#v<version>` ('#' never occurs in an id the engine accepts) and
    logged. A redelivered event has the stored version and is not one of these.
    """
    out = []
    for row in rows:
        v = stored.get((row[0], row[1]))
        if v is not None and v != row[3]:
            log.warning(
                "operation id %s of %s was applied again after Redis forgot it (retention); "
                "its event (version %d) is kept as %s#v%d",
                row[1],
                row[0],
                row[3],
                row[1],
                row[3],
            )
            out.append((row[0], f"{row[1]}#v{row[3]}", *row[2:]))
    return out


def grant_out(seq: str, r: int, e: int, x: int | None, pri: int | None, meta: str | None) -> dict[str, Any]:
    return {"seq": seq, "r": int(r), "e": int(e), "x": int(x or 0), "pri": int(pri or 0), "m": meta or "{}"}


def hold_out(
    hid: str, amt: int, exp: int, ear: str | None, at: int | None, op: str | None, x: str | None
) -> dict:
    return {
        "id": hid,
        "amt": int(amt),
        "exp": int(exp),
        "ear": ear or "",
        "at": int(at or 0),
        "op": op or hid,
        "x": x or "{}",
    }


# -- SQLite --------------------------------------------------------------------------------

SCHEMA = """
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

INSERT_LEDGER = """
INSERT OR IGNORE INTO ledger (user, op_id, type, version, ts_ms, amount, hold_id, fingerprint, event)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

UPSERT_ACCOUNT = """
INSERT INTO accounts (user, version, partition, available, held, debt, granted, spent, expired,
    seq, debt_total)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (user) DO UPDATE SET
    version = excluded.version, partition = excluded.partition, available = excluded.available,
    held = excluded.held, debt = excluded.debt, granted = excluded.granted,
    spent = excluded.spent, expired = excluded.expired, seq = excluded.seq,
    debt_total = max(accounts.debt_total, excluded.debt_total)
WHERE excluded.version > accounts.version
"""

# Every SET expression reads the row as it was before the update.
UPSERT_GRANT = """
INSERT INTO grants (user, seq, version, r, e, gone, meta, x, pri)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (user, seq) DO UPDATE SET
    r = CASE WHEN excluded.version > grants.version THEN excluded.r ELSE grants.r END,
    e = CASE WHEN excluded.version > grants.version THEN excluded.e ELSE grants.e END,
    gone = CASE WHEN excluded.version > grants.version THEN excluded.gone ELSE grants.gone END,
    version = max(grants.version, excluded.version),
    meta = coalesce(grants.meta, excluded.meta),
    x = coalesce(grants.x, excluded.x),
    pri = coalesce(grants.pri, excluded.pri)
"""

UPSERT_HOLD = """
INSERT INTO holds (user, hold_id, version, st, amt, exp, fin, open_version, ear, at, op, x)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (user, hold_id) DO UPDATE SET
    st = CASE WHEN excluded.version > holds.version THEN excluded.st ELSE holds.st END,
    amt = CASE WHEN excluded.version > holds.version THEN excluded.amt ELSE holds.amt END,
    exp = CASE WHEN excluded.version > holds.version THEN excluded.exp ELSE holds.exp END,
    fin = CASE WHEN excluded.version > holds.version THEN excluded.fin ELSE holds.fin END,
    version = max(holds.version, excluded.version),
    ear = CASE WHEN excluded.open_version > holds.open_version THEN excluded.ear ELSE holds.ear END,
    at = CASE WHEN excluded.open_version > holds.open_version THEN excluded.at ELSE holds.at END,
    op = CASE WHEN excluded.open_version > holds.open_version THEN excluded.op ELSE holds.op END,
    x = CASE WHEN excluded.open_version > holds.open_version THEN excluded.x ELSE holds.x END,
    open_version = max(holds.open_version, excluded.open_version)
"""

ACCOUNT_COLS = "user, version, partition, available, held, debt, granted, spent, expired, seq, debt_total"
LEDGER_COLS = "user, op_id, type, version, ts_ms, amount, hold_id, event"


def _ledger_entry(row: tuple) -> LedgerEntry:
    user, op_id, type_, version, ts_ms, amount, hold_id, event = row
    return LedgerEntry(user, op_id, type_, version, ts_ms, amount, hold_id, json.loads(event))


class SQLiteStore(Store):
    """The durable store in one SQLite file (or ":memory:")."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._ex: ThreadPoolExecutor | None = None

    # -- plumbing ---------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
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
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        # A checkpoint (the only step that fsyncs) every ~80 MB of WAL rather than every 8 MB:
        # a batch of 1,000 events dirties a few MB of pages, many of them the same from one
        # batch to the next (accounts, grants, index pages), which a checkpoint writes once.
        conn.execute("PRAGMA wal_autocheckpoint=10000")
        conn.execute("PRAGMA journal_size_limit=134217728")
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.execute("PRAGMA cache_size=-65536")
        conn.executescript(SCHEMA)
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

    # -- writes -----------------------------------------------------------------------------

    def _write(self, b: Batch) -> int:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            before = db.total_changes
            db.executemany(INSERT_LEDGER, b.ledger)
            new = db.total_changes - before
            if new < len(b.ledger):  # some rows were there already: redeliveries, or reused op ids
                stored = {}
                for user, op_id, *_ in b.ledger:
                    row = db.execute(
                        "SELECT version FROM ledger WHERE user = ? AND op_id = ?", (user, op_id)
                    ).fetchone()
                    stored[(user, op_id)] = row[0]
                again = reissued(b.ledger, stored)
                if again:
                    before = db.total_changes
                    db.executemany(INSERT_LEDGER, again)
                    new += db.total_changes - before
            db.executemany(
                UPSERT_ACCOUNT,
                [
                    (u, ev.version, ev.partition, *(t[k] for k in TOTAL_FIELDS), t["debt_total"])
                    for u, ev in b.accounts.items()
                    for t in (ev.state,)
                ],
            )
            db.executemany(
                UPSERT_GRANT,
                [
                    (g.user, g.seq, g.version, g.r, g.e, int(g.gone), g.meta, g.x, g.pri)
                    for g in b.grants.values()
                ],
            )
            if b.holds:
                db.executemany(
                    UPSERT_HOLD,
                    [
                        (
                            h.user,
                            h.hold_id,
                            h.version,
                            h.st,
                            h.amt,
                            h.exp,
                            h.fin,
                            h.open_version,
                            h.ear,
                            h.at,
                            h.op,
                            h.x,
                        )
                        for h in b.holds.values()
                    ],
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return new

    def _write_events(self, events: list[Event]) -> int:
        return self._write(collapse(events))

    async def write_events(self, events: list[Event]) -> int:
        if not events:
            return 0
        # The collapse (JSON encoding included) runs on the store's thread too: the event
        # loop only waits.
        return await self._call(self._write_events, events)

    # -- reads ------------------------------------------------------------------------------

    def _ledger(self, user: str, before_version: int | None, limit: int) -> list[LedgerEntry]:
        if before_version is None:
            rows = self.db.execute(
                f"SELECT {LEDGER_COLS} FROM ledger WHERE user = ? ORDER BY version DESC LIMIT ?",
                (user, limit),
            ).fetchall()
        else:
            rows = self.db.execute(
                f"SELECT {LEDGER_COLS} FROM ledger WHERE user = ? AND version < ? ORDER BY version DESC LIMIT ?",
                (user, before_version, limit),
            ).fetchall()
        return [_ledger_entry(r) for r in rows]

    async def ledger(
        self, user: str, *, before_version: int | None = None, limit: int = 50
    ) -> list[LedgerEntry]:
        return await self._call(self._ledger, user, before_version, limit)

    def _ledger_page(self, user: str, after: int) -> list[LedgerEntry]:
        rows = self.db.execute(
            f"SELECT {LEDGER_COLS} FROM ledger WHERE user = ? AND version > ? ORDER BY version LIMIT ?",
            (user, after, PAGE),
        ).fetchall()
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
            grant_out(*r)
            for r in db.execute(
                "SELECT seq, r, e, x, pri, meta FROM grants INDEXED BY grants_live WHERE user = ? AND gone = 0 AND r IS NOT NULL "
                "ORDER BY seq",
                (user,),
            )
        ]
        holds = [
            hold_out(*r)
            for r in db.execute(
                "SELECT hold_id, amt, exp, ear, at, op, x FROM holds INDEXED BY holds_open WHERE user = ? AND st = 'open' "
                "ORDER BY hold_id",
                (user,),
            )
        ]
        return AccountSnapshot(user, version, totals, grants, holds)

    def _snapshot(self, user: str) -> AccountSnapshot | None:
        row = self.db.execute(f"SELECT {ACCOUNT_COLS} FROM accounts WHERE user = ?", (user,)).fetchone()
        return None if row is None else self._snapshot_of(row)

    async def snapshot(self, user: str) -> AccountSnapshot | None:
        return await self._call(self._snapshot, user)

    def _snapshot_page(self, partition: int | None, after: str) -> list[AccountSnapshot]:
        if partition is None:
            rows = self.db.execute(
                f"SELECT {ACCOUNT_COLS} FROM accounts WHERE user > ? ORDER BY user LIMIT ?", (after, PAGE)
            ).fetchall()
        else:
            rows = self.db.execute(
                f"SELECT {ACCOUNT_COLS} FROM accounts WHERE partition = ? AND user > ? ORDER BY user LIMIT ?",
                (partition, after, PAGE),
            ).fetchall()
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
        # A scan in insertion order (rehydrate only): no index to keep up on every write. The
        # filter runs inside SQLite; only caller operations of the window come back.
        rows = self.db.execute(
            "SELECT id, user, op_id, fingerprint, event, ts_ms FROM ledger "
            "WHERE id > ? AND ts_ms >= ? AND fingerprint IS NOT NULL ORDER BY id LIMIT ?",
            (after_id, ts_ms, OPS_PAGE),
        ).fetchall()
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
        rows = self.db.execute(
            "SELECT user, hold_id, st, exp FROM holds WHERE (user, hold_id) > (?, ?) "
            "AND st IN ('settled', 'released', 'expired') AND exp >= ? ORDER BY user, hold_id LIMIT ?",
            (*after, expires_ms, PAGE),
        ).fetchall()
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

    _KEY_COLS = "key_id, user, digest, prefix, name, created_ms, revoked_ms"

    async def add_api_key(self, key: ApiKeyRecord) -> None:
        await self._call(
            lambda: self.db.execute(
                f"INSERT INTO api_keys ({self._KEY_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key.key_id, key.user, key.digest, key.prefix, key.name, key.created_ms, key.revoked_ms),
            )
        )

    def _revoke(self, user: str, key_id: str, at_ms: int) -> ApiKeyRecord | None:
        self.db.execute(
            "UPDATE api_keys SET revoked_ms = coalesce(revoked_ms, ?) WHERE user = ? AND key_id = ?",
            (at_ms, user, key_id),
        )
        row = self.db.execute(
            f"SELECT {self._KEY_COLS} FROM api_keys WHERE user = ? AND key_id = ?", (user, key_id)
        ).fetchone()
        return ApiKeyRecord(*row) if row else None

    async def revoke_api_key(self, user: str, key_id: str, at_ms: int) -> ApiKeyRecord | None:
        return await self._call(self._revoke, user, key_id, at_ms)

    async def api_keys(self, user: str) -> list[ApiKeyRecord]:
        rows = await self._call(
            lambda: self.db.execute(
                f"SELECT {self._KEY_COLS} FROM api_keys WHERE user = ? ORDER BY created_ms, key_id", (user,)
            ).fetchall()
        )
        return [ApiKeyRecord(*r) for r in rows]

    async def active_api_keys(self) -> AsyncIterator[ApiKeyRecord]:
        rows = await self._call(
            lambda: self.db.execute(
                f"SELECT {self._KEY_COLS} FROM api_keys WHERE revoked_ms IS NULL ORDER BY key_id"
            ).fetchall()
        )
        for r in rows:
            yield ApiKeyRecord(*r)

    async def set_rate_limits(self, override: RateLimitOverride) -> None:
        o = override
        if o.requests_per_minute is None and o.tokens_per_minute is None:
            await self._call(lambda: self.db.execute("DELETE FROM rate_limits WHERE user = ?", (o.user,)))
            return
        await self._call(
            lambda: self.db.execute(
                "INSERT INTO rate_limits (user, rpm, tpm) VALUES (?, ?, ?) "
                "ON CONFLICT (user) DO UPDATE SET rpm = excluded.rpm, tpm = excluded.tpm",
                (o.user, o.requests_per_minute, o.tokens_per_minute),
            )
        )

    async def rate_limits(self, user: str) -> RateLimitOverride | None:
        row = await self._call(
            lambda: self.db.execute(
                "SELECT user, rpm, tpm FROM rate_limits WHERE user = ?", (user,)
            ).fetchone()
        )
        return RateLimitOverride(*row) if row else None

    async def all_rate_limits(self) -> AsyncIterator[RateLimitOverride]:
        rows = await self._call(
            lambda: self.db.execute("SELECT user, rpm, tpm FROM rate_limits ORDER BY user").fetchall()
        )
        for r in rows:
            yield RateLimitOverride(*r)
