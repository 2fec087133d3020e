"""Reduces a batch of events to the rows a store writes: one ledger row per event, the newest
state of each account, grant and hold, and the ledger rows of reissued operation ids.

Backend-neutral: every store writes what `collapse` returns (see Store.write_events).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..events import Event

log = logging.getLogger("credit.store")


def dumps(obj: Any) -> str:
    """Compact JSON text (orjson: the drain encodes metadata of every batch)."""
    return orjson.dumps(obj).decode()


def _int(x: Any) -> int:
    return int(x or 0)


# Ledger and account rows are plain tuples, in the column order the stores write them: a
# batch makes one per event, and a tuple is the cheapest to build and to bind to SQL.

# One event as the ledger keeps it; everything else it says stays in `event` (its JSON):
# (user, op_id, type, version, ts_ms, amount, hold_id, fingerprint, event)
LedgerRow = tuple[str, str, str, int, int, int, str | None, str | None, str]

# An account's totals after the newest event of the batch:
# (user, version, partition, available, held, debt, granted, spent, expired, seq, debt_total)
AccountRow = tuple[str, int, int, int, int, int, int, int, int, int, int]


@dataclass(slots=True)
class GrantRow:
    """A grant's newest balance (`version` > 0) and/or its metadata (from its creation event).

    A row may carry only one of the two: a batch can hold the creation event without the
    newest balance, or the reverse; the store fills each part from the event that has it.
    """

    user: str
    seq: str
    version: int = 0  # of the newest event that carried the grant's balance (0: none yet)
    free: int | None = None  # what is left to spend (Lua's r:<seq>)
    earmarked: int | None = None  # held by open holds (Lua's e:<seq>)
    gone: bool = False  # nothing free nor earmarked: Redis dropped it, the store keeps it
    metadata: str | None = None  # the grant metadata as a JSON string (Lua's m:<seq>)
    expires_ms: int | None = None  # 0 = never (Lua's x:<seq>)
    priority: int | None = None  # spend order among grants of the same expiry, lower first


@dataclass(slots=True)
class HoldRow:
    """A hold's newest state (`version` > 0) and/or its opening fields (`open_version` > 0)."""

    user: str
    hold_id: str
    version: int = 0  # of the newest event that carried the hold's state
    status: str | None = None  # open | settled | released | expired
    amount: int | None = None  # the amount held
    expires_ms: int | None = None  # its deadline
    charged: int | None = None  # what its resolution charged (None while open)
    open_version: int = 0  # of the newest opening event (the fields below)
    earmarks: str | None = None  # "seq=amount,..." drawn from each grant, in spend order
    opened_ms: int | None = None
    op_id: str | None = None  # the operation that opened it
    metadata: str | None = None  # the caller's metadata as a JSON string


@dataclass(slots=True)
class Batch:
    """A batch reduced to one row per ledger entry and per snapshot row."""

    ledger: list[LedgerRow] = field(default_factory=list)
    accounts: list[AccountRow] = field(default_factory=list)
    grants: list[GrantRow] = field(default_factory=list)
    holds: list[HoldRow] = field(default_factory=list)


def collapse(events: list[Event]) -> Batch:
    """Ledger rows for every event; the newest state of each account, grant and hold."""
    ledger: list[LedgerRow] = []
    newest: dict[str, Event] = {}
    grants: dict[tuple[str, str], GrantRow] = {}
    holds: dict[tuple[str, str], HoldRow] = {}
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
                ev.raw_json or dumps(raw),
            )
        )
        cur = newest.get(user)
        if cur is None or v > cur.version:
            newest[user] = ev
        for seq, g in ev.grants.items():
            grow = grants.get((user, seq))
            if grow is None:
                grow = grants[(user, seq)] = GrantRow(user, seq)
            if v > grow.version:
                grow.version = v
                if g is None:
                    grow.gone, grow.free, grow.earmarked = True, 0, 0
                else:
                    grow.gone, grow.free, grow.earmarked = False, g["r"], g["e"]
        for seq, meta in ev.grant_meta.items():
            grow = grants.get((user, seq))
            if grow is None:
                grow = grants[(user, seq)] = GrantRow(user, seq)
            if grow.metadata is None and isinstance(meta, dict):
                grow.metadata = dumps(meta)
                grow.expires_ms = _int(meta.get("exp"))
                grow.priority = _int(meta.get("pri"))
        h = ev.hold
        if h is not None:
            hid = h.get("id") or ev.hold_id
            if not hid:
                continue
            hrow = holds.get((user, hid))
            if hrow is None:
                hrow = holds[(user, hid)] = HoldRow(user, hid)
            if v > hrow.version:
                hrow.version = v
                hrow.status = h.get("st")
                hrow.amount = _int(h.get("amt"))
                hrow.expires_ms = _int(h.get("exp"))
                hrow.charged = _int(h["fin"]) if h.get("fin") is not None else None
            if "ear" in h and v > hrow.open_version:
                hrow.open_version = v
                hrow.earmarks = h.get("ear") or ""
                hrow.opened_ms = _int(h.get("at"))
                hrow.op_id = h.get("op") or ev.op_id
                hrow.metadata = dumps(ev.extra)
    accounts = []
    for user, ev in newest.items():
        t = ev.state
        accounts.append(
            (
                user,
                ev.version,
                ev.partition,
                t["available"],
                t["held"],
                t["debt"],
                t["granted"],
                t["spent"],
                t["expired"],
                t["seq"],
                t["debt_total"],
            )
        )
    return Batch(ledger, accounts, list(grants.values()), list(holds.values()))


def reissued(rows: list[LedgerRow], stored: dict[tuple[str, str], int]) -> list[LedgerRow]:
    """Ledger rows whose (user, op id) the ledger already holds at another version.

    That happens when a caller reuses an operation id after Redis forgot it (past the
    retention): Redis applied the operation again, and its event is a real change that the
    ledger must keep, or the ledger would no longer replay to the balances. Such a row is
    kept under `<op id>#v<version>` ('#' never occurs in an id the engine accepts) and
    logged. A redelivered event has the stored version and is not one of these.
    """
    out: list[LedgerRow] = []
    for user, op_id, type_, version, ts_ms, amount, hold_id, fingerprint, event in rows:
        v = stored.get((user, op_id))
        if v is not None and v != version:
            again = f"{op_id}#v{version}"
            log.warning(
                "operation id %s of %s was applied again after Redis forgot it (retention); "
                "its event (version %d) is kept as %s",
                op_id,
                user,
                version,
                again,
            )
            out.append((user, again, type_, version, ts_ms, amount, hold_id, fingerprint, event))
    return out
