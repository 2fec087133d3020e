"""The events the Lua scripts append to the partition streams, decoded for the worker.

One stream entry = one field `e` holding a JSON object written by lua/includes/lib.lua
`emit`: {id, t, u, v, ts, amt, a: state after, g: touched grants, gm: new grant metadata,
h: hold after, hold, fp, res, x: caller metadata, ...}. Amounts are decimal strings of
micro-credits; here they become ints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# Event types (`t`).
GRANT = "grant"
DEBIT = "debit"
HOLD_OPEN = "hold_open"
HOLD_SETTLED = "hold_settled"
HOLD_RELEASED = "hold_released"
HOLD_EXPIRED = "hold_expired"
GRANT_EXPIRED = "grant_expired"
TYPES = frozenset({GRANT, DEBIT, HOLD_OPEN, HOLD_SETTLED, HOLD_RELEASED, HOLD_EXPIRED, GRANT_EXPIRED})

STATE_FIELDS = ("available", "held", "debt", "granted", "spent", "expired", "seq", "debt_total")


def _map(x: Any) -> dict:
    # cjson writes an empty table as [] under fakeredis.
    return x if isinstance(x, dict) else {}


@dataclass(slots=True)
class Event:
    """One decoded stream entry. `grants[seq]` is {"r", "e"} ints, or None when the grant is gone."""

    stream_id: str
    partition: int
    user: str
    op_id: str
    type: str
    version: int
    ts_ms: int
    amount: int
    state: dict[str, int]
    grants: dict[str, dict[str, int] | None] = field(default_factory=dict)
    grant_meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    hold: dict[str, Any] | None = None
    hold_id: str | None = None
    fingerprint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    raw_json: str = ""  # the entry's JSON as written by Lua (stored as is: no re-encoding)

    @property
    def result(self) -> str | None:
        """The operation's answer as the script gave it (JSON), for replays after a rebuild."""
        return answer_of(self.raw)

    @property
    def key(self) -> tuple[str, str]:
        """The event's identity in the store: (user, operation id)."""
        return (self.user, self.op_id)

    def num(self, name: str) -> int:
        """An amount field of the raw event (returned, lapsed, debt_added, ...), 0 if absent."""
        return int(self.raw.get(name) or 0)


def answer_of(raw: dict[str, Any]) -> str | None:
    """The answer a caller operation got: the event's `res` plus the state after it."""
    res = raw.get("res")
    if not isinstance(res, dict) or not raw.get("fp"):
        return None
    return json.dumps({**res, "state": raw.get("a") or {}}, separators=(",", ":"))


class BadEvent(ValueError):
    """A stream entry that cannot be decoded: it goes to the dead-letter stream."""


def decode(stream_id: str | bytes, fields: dict, partition: int) -> Event:
    if isinstance(stream_id, bytes):
        stream_id = stream_id.decode()
    try:
        body = fields.get(b"e") if b"e" in fields else fields.get("e")
        if isinstance(body, bytes):
            body = body.decode()
        raw = json.loads(body)
        t = raw["t"]
        if t not in TYPES:
            raise BadEvent(f"unknown event type {t!r}")
        grants: dict[str, dict[str, int] | None] = {}
        for seq, g in _map(raw.get("g")).items():
            grants[seq] = None if g == "gone" else {"r": int(g["r"]), "e": int(g["e"])}
        a = raw["a"]
        return Event(
            stream_id=stream_id,
            partition=partition,
            user=raw["u"],
            op_id=raw["id"],
            type=t,
            version=int(raw["v"]),
            ts_ms=int(raw["ts"]),
            amount=int(raw.get("amt") or 0),
            state={k: int(a.get(k) or 0) for k in STATE_FIELDS},
            grants=grants,
            grant_meta=_map(raw.get("gm")),
            hold=raw.get("h") if isinstance(raw.get("h"), dict) else None,
            hold_id=raw.get("hold"),
            fingerprint=raw.get("fp"),
            extra=_map(raw.get("x")),
            raw=raw,
            raw_json=body,
        )
    except BadEvent:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise BadEvent(f"undecodable event {stream_id}: {exc}") from exc
