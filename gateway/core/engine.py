"""The credit engine: the only code that changes accounts in Redis.

Every method is one Lua script call (one round trip), idempotent by an operation id, and
appends exactly one event per state change to the account's partition stream. Amounts
enter and leave as Decimal credits; the `*_units` variants take micro-credits for callers
that already hold integers (the metering proxy).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Callable

import orjson

from .errors import raise_for
from .keys import KeySpace, check_id
from .money import MAX_UNITS, AmountError, from_units, to_units
from .results import (
    AccountState,
    AccountView,
    DebitResult,
    GrantResult,
    GrantView,
    Hold,
    HoldResolution,
    HoldView,
    SweepResult,
    ms_to_dt,
)
from .scripts import ScriptRegistry

DEFAULT_RETENTION_S = 7 * 86400
SOURCES = frozenset({"payment", "plan", "promo", "admin", "refund"})
MAX_TTL_S = 7 * 86400


# Lua scores grant expiry in ms below 2^43 (year 2248); later dates are refused.
MAX_EXPIRY_MS = 2**43 - 2


@dataclass(frozen=True, slots=True)
class RateCharge:
    """What a reserve counts against the account's per-minute limits: one request and
    `tokens` (the call's worst case; settle corrects it to the real count). The limits are
    defaults (0 = none); an account's overrides (`set_rate_limits`) win."""

    tokens: int = 0
    requests_per_minute: int = 0
    tokens_per_minute: int = 0


def _units_arg(units: int, *, allow_zero: bool = False) -> int:
    """Checks a micro-credits argument before it reaches Redis."""
    if isinstance(units, bool) or not isinstance(units, int):
        raise AmountError(f"micro-credits must be an int, not {type(units).__name__}")
    if units < 0 or (units == 0 and not allow_zero) or units > MAX_UNITS:
        raise AmountError(f"micro-credits out of range: {units}")
    return units


_META_OPTS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def _meta(metadata: dict[str, Any] | None) -> str | bytes:
    if not metadata:
        return "{}"
    try:
        # Two per proxied request: orjson is several times faster than json.dumps here.
        # Datetimes and dataclasses still go through str(), as with json.dumps; non-ASCII goes
        # out as UTF-8 rather than \u escapes (the same JSON to a reader).
        return orjson.dumps(metadata, default=str, option=_META_OPTS)
    except TypeError:  # what orjson refuses (non-str keys, ints above 64 bits): as before
        return json.dumps(metadata, separators=(",", ":"), default=str)


def _resolution(r: dict, replayed: bool) -> HoldResolution:
    return HoldResolution(
        r["hold_id"], r["status"], int(r["charged"]), int(r["held_amount"]), int(r["returned"]),
        int(r["lapsed"]), int(r.get("debt_added") or 0), AccountState.from_wire(r["state"]), replayed,
    )


class CreditEngine:
    """Async API over the Lua scripts. `clock` returns seconds (injectable for tests)."""

    def __init__(
        self,
        redis: Any,
        *,
        keys: KeySpace | None = None,
        scripts: ScriptRegistry | None = None,
        clock: Callable[[], float] = time.time,
        retention_s: int = DEFAULT_RETENTION_S,
        script_redis: Any = None,
    ) -> None:
        self.redis = redis
        # Script calls may go over another client with the same evalsha/eval methods (the
        # multiplexed one, gateway/core/multiplex.py); everything else uses `redis`.
        self.script_redis = script_redis if script_redis is not None else redis
        self.keys = keys or KeySpace()
        self.scripts = scripts or ScriptRegistry()
        self.clock = clock
        self.retention_s = retention_s

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def _run(self, name: str, keys: list[str], args: list[Any]) -> tuple[dict, bool]:
        code, payload = await self.scripts.call_json(self.script_redis, name, keys, args)
        if code == "ok":
            return payload, False
        if code == "exists":
            return payload, True
        raise_for(code, payload)
        raise AssertionError("unreachable")

    def _base(self, user: str, op_id: str) -> list[Any]:
        return [self.now_ms(), self.retention_s, user, op_id]

    # -- grants and admin debits -------------------------------------------------------

    async def grant(
        self,
        user: str,
        amount: Decimal | str | int,
        *,
        op_id: str,
        source: str = "admin",
        expires_at: datetime | None = None,
        priority: int = 100,
        metadata: dict[str, Any] | None = None,
    ) -> GrantResult:
        """Adds `amount` credits to `user` as a grant (repaying debt first)."""
        return await self.grant_units(
            user, to_units(amount), op_id=op_id, source=source, expires_at=expires_at,
            priority=priority, metadata=metadata,
        )

    async def grant_units(
        self,
        user: str,
        units: int,
        *,
        op_id: str,
        source: str = "admin",
        expires_at: datetime | None = None,
        priority: int = 100,
        metadata: dict[str, Any] | None = None,
    ) -> GrantResult:
        check_id("user_id", user)
        check_id("op_id", op_id)
        if source not in SOURCES:
            raise ValueError(f"source must be one of {sorted(SOURCES)}")
        if not 0 <= priority <= 1000:
            raise ValueError("priority must be between 0 and 1000")
        if expires_at is not None and expires_at.tzinfo is None:
            raise ValueError("expires_at must carry a timezone")
        exp_ms = round(expires_at.timestamp() * 1000) if expires_at else 0
        if exp_ms > MAX_EXPIRY_MS:
            raise ValueError("expires_at is too far in the future (after 2248)")
        _units_arg(units)
        r, replayed = await self._run(
            "grant",
            self.keys.account_keys(user, op_id),
            [*self._base(user, op_id), units, exp_ms, priority, source, _meta(metadata)],
        )
        return GrantResult(
            r["grant_seq"], int(r["amount"]), int(r["debt_repaid"]), int(r["expires_at"]),
            AccountState.from_wire(r["state"]), replayed,
        )

    async def debit(
        self, user: str, amount: Decimal | str | int, *, op_id: str, metadata: dict[str, Any] | None = None
    ) -> DebitResult:
        """Charges `amount` at once (admin); refuses when the free credit is short."""
        check_id("user_id", user)
        check_id("op_id", op_id)
        units = to_units(amount)
        r, replayed = await self._run(
            "debit", self.keys.account_keys(user, op_id), [*self._base(user, op_id), units, _meta(metadata)]
        )
        return DebitResult(int(r["amount"]), AccountState.from_wire(r["state"]), replayed)

    # -- holds -------------------------------------------------------------------------

    async def reserve(
        self,
        user: str,
        amount: Decimal | str | int,
        *,
        hold_id: str,
        ttl_seconds: float,
        op_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        rate: RateCharge | None = None,
    ) -> Hold:
        """Holds `amount` credits for at most `ttl_seconds`. The op id defaults to the hold id.
        With `rate`, the call also counts against the per-minute limits (RateLimited)."""
        return await self.reserve_units(
            user, to_units(amount), hold_id=hold_id, ttl_seconds=ttl_seconds, op_id=op_id, metadata=metadata,
            rate=rate,
        )

    async def reserve_units(
        self,
        user: str,
        units: int,
        *,
        hold_id: str,
        ttl_seconds: float,
        op_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        rate: RateCharge | None = None,
    ) -> Hold:
        check_id("user_id", user)
        check_id("hold_id", hold_id)
        op_id = check_id("op_id", op_id) if op_id else hold_id
        ttl_ms = round(ttl_seconds * 1000)
        if not 0 < ttl_ms <= MAX_TTL_S * 1000:
            raise ValueError(f"ttl_seconds must be in (0, {MAX_TTL_S}]")
        _units_arg(units)
        if rate is not None and not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0
            for n in (rate.tokens, rate.requests_per_minute, rate.tokens_per_minute)
        ):
            raise ValueError("rate limits and tokens must be non-negative ints")
        limits = (rate.requests_per_minute, rate.tokens_per_minute, rate.tokens) if rate else (0, 0, "")
        r, replayed = await self._run(
            "reserve",
            self.keys.hold_keys(user, op_id, hold_id),
            [*self._base(user, op_id), hold_id, units, ttl_ms, _meta(metadata), *limits],
        )
        return Hold(r["hold_id"], int(r["amount"]), int(r["expires_at"]), AccountState.from_wire(r["state"]), replayed)

    async def settle(
        self,
        user: str,
        hold_id: str,
        amount: Decimal | str | int,
        *,
        op_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        tokens: int | None = None,
    ) -> HoldResolution:
        """Posts the hold at `amount` (may exceed the hold: see the overage policy).
        `tokens`: what the call really used, replacing the reserve's worst case in the
        tokens-per-minute count."""
        return await self.settle_units(
            user, hold_id, to_units(amount, allow_zero=True), op_id=op_id, metadata=metadata, tokens=tokens
        )

    async def settle_units(
        self,
        user: str,
        hold_id: str,
        units: int,
        *,
        op_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        tokens: int | None = None,
    ) -> HoldResolution:
        check_id("user_id", user)
        check_id("hold_id", hold_id)
        op_id = check_id("op_id", op_id) if op_id else f"!settle:{hold_id}"
        _units_arg(units, allow_zero=True)
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0):
            raise ValueError("tokens must be a non-negative int")
        r, replayed = await self._run(
            "settle",
            self.keys.hold_keys(user, op_id, hold_id),
            [*self._base(user, op_id), hold_id, units, _meta(metadata), "" if tokens is None else tokens],
        )
        return _resolution(r, replayed)

    async def release(
        self, user: str, hold_id: str, *, op_id: str | None = None, metadata: dict[str, Any] | None = None,
        void_if_unknown: bool = False,
    ) -> HoldResolution:
        """Voids the hold: every earmarked credit returns. `void_if_unknown`: for giving back
        a reserve whose answer was lost; if the hold does not exist (yet), that reserve is
        made to do nothing should it still arrive (HoldNotFound is raised either way)."""
        check_id("user_id", user)
        check_id("hold_id", hold_id)
        op_id = check_id("op_id", op_id) if op_id else f"!release:{hold_id}"
        r, replayed = await self._run(
            "release",
            self.keys.hold_keys(user, op_id, hold_id),
            [*self._base(user, op_id), hold_id, _meta(metadata), "1" if void_if_unknown else ""],
        )
        return _resolution(r, replayed)

    # -- reads -------------------------------------------------------------------------

    async def _read(self, user: str, detail: bool) -> dict:
        check_id("user_id", user)
        keys = self.keys.account_keys(user)[:2]
        _, r = await self.scripts.call_json(self.script_redis, "account", keys, [self.now_ms(), "1" if detail else "0"])
        return r

    async def balance(self, user: str) -> AccountState:
        """The account's totals (an unknown account reads as zeros)."""
        return AccountState.from_wire(await self._read(user, False))

    async def account(self, user: str) -> AccountView:
        """Totals, grants in spend order, and open holds."""
        r = await self._read(user, True)
        grants = []
        for g in r.get("grants") or []:
            meta = json.loads(g["meta"]) if g.get("meta") else {}
            x = meta.get("x")
            grants.append(
                GrantView(
                    seq=g["seq"],
                    grant_id=meta.get("id", ""),
                    source=meta.get("src", ""),
                    amount=from_units(meta.get("amt", 0)),
                    free=from_units(g.get("free") or 0),
                    earmarked=from_units(g.get("earmarked") or 0),
                    priority=int(meta.get("pri", 0)),
                    expires_at=ms_to_dt(g.get("expires_at")),
                    expired=bool(g.get("expired")),
                    granted_at=ms_to_dt(meta.get("at")),
                    metadata=x if isinstance(x, dict) else {},
                )
            )
        holds = [
            HoldView(h["hold_id"], from_units(h["amount"]), ms_to_dt(h["expires_at"]))
            for h in r.get("holds") or []
        ]
        holds.sort(key=lambda h: (h.expires_at, h.hold_id))
        return AccountView(user, AccountState.from_wire(r), from_units(r.get("debt_total", 0)), grants, holds)

    # -- sweeping and recovery ---------------------------------------------------------

    async def sweep_partition(self, partition: int, *, limit: int = 500) -> SweepResult:
        """Expires the holds and grants of one partition that are due (at most `limit` each)."""
        pk = self.keys.partition(partition)
        now = self.now_ms()
        holds = await self.redis.zrangebyscore(pk.hold_expiry, "-inf", now, start=0, num=limit)
        grants = await self.redis.zrangebyscore(pk.grant_expiry, "-inf", now, start=0, num=limit)
        due: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
        for member, slot in [(m, 0) for m in holds] + [(m, 1) for m in grants]:
            user, _, ident = (member.decode() if isinstance(member, bytes) else member).rpartition("|")
            due[user][slot].append(ident)
        total = SweepResult(due_left=len(holds) == limit or len(grants) == limit)
        for user, (hids, seqs) in due.items():
            keys = self.keys.account_keys(user) + [self.keys.hold_key(user, h) for h in hids]
            args = [now, self.retention_s, user, len(hids), *hids, *seqs]
            code, r = await self.scripts.call_json(self.script_redis, "expire", keys, args)
            if code != "ok":
                raise_for(code, r)
            total = SweepResult(
                total.holds + r["holds"], total.grants + r["grants"], total.credits + from_units(r["credits"]),
                total.due_left,
            )
        return total

    async def sweep(self, *, limit: int = 500) -> SweepResult:
        """One sweep over every partition, in batches of `limit`, until nothing due is left."""
        total = SweepResult()
        for p in range(self.keys.partitions):
            while True:
                r = await self.sweep_partition(p, limit=limit)
                total = SweepResult(total.holds + r.holds, total.grants + r.grants, total.credits + r.credits)
                if not r.due_left:
                    break
        return total

    async def missing_partitions(self) -> list[int]:
        """Partitions whose ready marker is gone: Redis lost them and they need rebuilding."""
        parts = self.keys.all_partitions()
        flags = [await self.redis.exists(pk.ready) for pk in parts]
        return [p for p, ok in enumerate(flags) if not ok]

    async def mark_ready(self, partition: int) -> None:
        await self.redis.set(self.keys.partition(partition).ready, "1")

    async def restore_account(
        self, user: str, version: int, state: dict[str, Any], stale_hold_ids: list[str]
    ) -> bool:
        """Writes an account rebuilt from the store; False when Redis already had it."""
        keys, args = self.restore_call(user, version, state, stale_hold_ids)
        code, _ = await self.scripts.call_json(self.script_redis, "restore", keys, args)
        return code == "ok"

    def restore_call(
        self, user: str, version: int, state: dict[str, Any], stale_hold_ids: list[str]
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of lua/restore.lua (the rebuild pipelines many of them at once)."""
        hold_ids = [h["id"] for h in state["holds"]]
        keys = self.keys.account_keys(user) + [
            self.keys.hold_key(user, h) for h in hold_ids + [h for h in stale_hold_ids if h not in hold_ids]
        ]
        return keys, [self.now_ms(), self.retention_s, user, version, len(hold_ids), json.dumps(state)]
