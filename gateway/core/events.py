"""The events the Lua scripts append to the partition streams, decoded for the worker.

One stream entry = one field `e` holding a JSON object written by lua/includes/lib.lua
`emit`: {id, t, u, v, ts, amt, a: state after, g: touched grants, gm: new grant metadata,
h: hold after, hold, fp, res, x: caller metadata, ...}. A hold's resolution also carries
held_amt, returned, lapsed, debt_added, and debt_repaid when the credit that returned paid
back debt (absent = 0). Amounts are decimal strings of micro-credits; here they become ints.
"""

from __future__ import annotations

from typing import Any

import orjson

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


class Event:
    """One decoded stream entry. The scalar fields are read at decode time; the nested ones
    (`state`, `grants`, `grant_meta`, `hold`, `extra`) are read from `raw` when asked for,
    since the worker needs them only for the newest event of each account.
    `grants[seq]` is {"r", "e"} ints, or None when the grant is gone."""

    __slots__ = (
        "amount",
        "fingerprint",
        "hold_id",
        "op_id",
        "partition",
        "raw",
        "raw_json",
        "stream_id",
        "ts_ms",
        "type",
        "user",
        "version",
    )

    def __init__(self, stream_id: str, partition: int, raw: dict[str, Any], raw_json: str = "") -> None:
        t = raw["t"]
        if t not in TYPES:
            raise BadEvent(f"unknown event type {t!r}")
        if not isinstance(raw["a"], dict):
            raise BadEvent("event without an account state")
        self.stream_id = stream_id
        self.partition = partition
        self.user: str = raw["u"]
        self.op_id: str = raw["id"]
        self.type: str = t
        self.version = int(raw["v"])
        self.ts_ms = int(raw["ts"])
        self.amount = int(raw.get("amt") or 0)
        self.hold_id: str | None = raw.get("hold")
        self.fingerprint: str | None = raw.get("fp")
        self.raw = raw
        self.raw_json = raw_json

    @property
    def state(self) -> dict[str, int]:
        a = self.raw["a"]
        return {k: int(a.get(k) or 0) for k in STATE_FIELDS}

    @property
    def grants(self) -> dict[str, dict[str, int] | None]:
        return {
            seq: None if g == "gone" else {"r": int(g["r"]), "e": int(g["e"])}
            for seq, g in _map(self.raw.get("g")).items()
        }

    @property
    def grant_meta(self) -> dict[str, dict[str, Any]]:
        return _map(self.raw.get("gm"))

    @property
    def hold(self) -> dict[str, Any] | None:
        h = self.raw.get("h")
        return h if isinstance(h, dict) else None

    @property
    def extra(self) -> dict[str, Any]:
        return _map(self.raw.get("x"))

    @property
    def result(self) -> str | None:
        """The operation's answer as the script gave it (JSON), for replays after a rebuild."""
        return answer_of(self.raw)

    def __repr__(self) -> str:
        return f"Event({self.type} {self.user}/{self.op_id} v{self.version} @{self.stream_id})"


def answer_of(raw: dict[str, Any]) -> str | None:
    """The answer a caller operation got: the event's `res` plus the state after it."""
    res = raw.get("res")
    if not isinstance(res, dict) or not raw.get("fp"):
        return None
    # orjson: the rebuild computes this for every operation id of the retention window.
    return orjson.dumps({**res, "state": raw.get("a") or {}}).decode()


class BadEvent(ValueError):
    """A stream entry that cannot be decoded: it goes to the dead-letter stream."""


def decode(stream_id: str | bytes, fields: dict, partition: int) -> Event:
    if isinstance(stream_id, bytes):
        stream_id = stream_id.decode()
    try:
        body = fields.get(b"e") if b"e" in fields else fields.get("e")
        if isinstance(body, bytes):
            body = body.decode()
        if not isinstance(body, str):
            raise BadEvent(f"undecodable event {stream_id}: no field e")
        raw = orjson.loads(body)  # the worker's hot spot: several times json.loads' speed
        if not isinstance(raw, dict):
            raise BadEvent("an event must be a JSON object")
        return Event(stream_id, partition, raw, body)
    except BadEvent:
        raise
    except (KeyError, TypeError, ValueError, orjson.JSONDecodeError) as exc:
        raise BadEvent(f"undecodable event {stream_id}: {exc}") from exc
