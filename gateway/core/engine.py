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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from .errors import InvalidExpiry, raise_for
from .keys import KeySpace, check_id
from .money import MAX_UNITS, AmountError, from_units, to_units
from .redis_client import RedisClient
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
from .scripts import ScriptClient, ScriptRegistry
from .stored_versions import StoredVersions

DEFAULT_RETENTION_S = 86400
# Entries a partition stream may hold before reserve answers backlog_full (docs/sizing.md).
DEFAULT_MAX_BACKLOG = 10_000
SOURCES = frozenset({"payment", "plan", "promo", "admin", "refund"})
MAX_TTL_S = 7 * 86400


# Lua scores grant expiry in ms below 2^43 (year 2248); later dates are refused.
MAX_EXPIRY_MS = 2**43 - 2
LATEST_EXPIRY = datetime.fromtimestamp(MAX_EXPIRY_MS / 1000, tz=UTC).isoformat(timespec="milliseconds")


def grant_expiry_ms(expires_at: datetime | None) -> int:
    """A grant's expiry as the scripts take it (ms; 0 = never). A date at or before the
    epoch would read as 0, never: it is refused as past (whether a later date is past is
    the script's check, after its replay check, so a retried grant still replays)."""
    if expires_at is None:
        return 0
    if expires_at.tzinfo is None:
        raise ValueError("expires_at must carry a timezone")
    try:
        exp_ms = round(expires_at.timestamp() * 1000)
    except (OverflowError, ValueError):
        exp_ms = MAX_EXPIRY_MS + 1 if expires_at.year > 1970 else 0
    if exp_ms <= 0:
        raise InvalidExpiry(f"expires_at {expires_at.isoformat()} is in the past")
    if exp_ms > MAX_EXPIRY_MS:
        raise ValueError(f"expires_at is too far in the future: the latest allowed is {LATEST_EXPIRY}")
    return exp_ms


@dataclass(frozen=True, slots=True)
class RateCharge:
    """What a reserve counts against the account's per-minute limits: one request and
    `tokens` (the call's worst case; settle corrects it to the real count). The limits are
    defaults (0 = none); an account's overrides (`set_rate_limits`) win. `model`, when
    given, is refused (ModelNotAllowed) unless the account's plan allows it."""

    tokens: int = 0
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    model: str = ""


def _units_arg(units: int, *, allow_zero: bool = False) -> int:
    """Checks a micro-credits argument before it reaches Redis."""
    if isinstance(units, bool) or not isinstance(units, int):
        raise AmountError(f"micro-credits must be an int, not {type(units).__name__}")
    if units < 0 or (units == 0 and not allow_zero) or units > MAX_UNITS:
        raise AmountError(f"micro-credits out of range: {units}")
    return units


_META_OPTS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def _meta(metadata: dict[str, Any] | None) -> str | bytes:
    """Caller metadata as the compact JSON the scripts keep and emit."""
    if not metadata:
        return "{}"
    try:
        # orjson: this runs twice per proxied request, on the hot path. Datetimes and
        # dataclasses go through str() (passthrough + default=str); non-ASCII goes out as
        # UTF-8 rather than \u escapes (the same JSON to a reader).
        return orjson.dumps(metadata, default=str, option=_META_OPTS)
    except TypeError:  # non-str keys, ints above 64 bits: json.dumps takes what orjson refuses
        return json.dumps(metadata, separators=(",", ":"), default=str)


def _resolution(r: dict, replayed: bool) -> HoldResolution:
    return HoldResolution(
        r["hold_id"],
        r["status"],
        int(r["charged"]),
        int(r["held_amount"]),
        int(r["returned"]),
        int(r["lapsed"]),
        int(r.get("debt_added") or 0),
        AccountState.from_wire(r["state"]),
        replayed,
        int(r.get("debt_repaid") or 0),
    )


class CreditEngine:
    """Async API over the Lua scripts. `clock` returns seconds (injectable for tests).
    `max_backlog`: entries a partition stream may hold (persisted or not by the worker)
    before reserve refuses new holds with BacklogFull; 0 = no limit."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        keys: KeySpace | None = None,
        scripts: ScriptRegistry | None = None,
        clock: Callable[[], float] = time.time,
        retention_s: int = DEFAULT_RETENTION_S,
        script_redis: ScriptClient | None = None,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
    ) -> None:
        self.redis = redis
        # Script calls may go over another client with the same evalsha/eval methods (the
        # multiplexed one, gateway/core/multiplex.py); everything else uses `redis`.
        self.script_redis: ScriptClient = script_redis if script_redis is not None else redis
        self.keys = keys or KeySpace()
        self.scripts = scripts or ScriptRegistry()
        self.clock = clock
        self.retention_s = retention_s
        if max_backlog < 0:
            raise ValueError("max_backlog must be >= 0 (0 = no limit)")
        self.max_backlog = max_backlog
        # Set where Redis keeps nothing on disk (embedded mode): a write is answered once the
        # worker has stored it (a replay's first answer was, or was waited for, already).
        self.stored_versions: StoredVersions | None = None

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def _run(self, name: str, user: str, keys: list[str], args: list[Any]) -> tuple[dict, bool]:
        code, payload = await self.scripts.call_json(self.script_redis, name, keys, args)
        if code == "ok":
            if self.stored_versions is not None and payload.get("state"):
                await self.stored_versions.wait(user, int(payload["state"]["v"]))
            return payload, False
        if code == "exists":
            return payload, True
        raise_for(code, payload)
        raise AssertionError("unreachable")

    def _base(self, user: str, op_id: str) -> list[Any]:
        return [self.now_ms(), self.retention_s, user, op_id]

    def _hold_keys(self, user: str, op_id: str, hold_id: str, default_op: str) -> list[str]:
        # An op id of the caller's may be another hold's id, whose reserve keeps its record
        # in that hold's hash (lib.lua, "Operation records"): KEYS[12], so that it conflicts.
        keys = self.keys.hold_keys(user, op_id, hold_id)
        if op_id != default_op:
            keys.append(self.keys.hold_key(user, op_id))
        return keys

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
            user,
            to_units(amount),
            op_id=op_id,
            source=source,
            expires_at=expires_at,
            priority=priority,
            metadata=metadata,
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
        exp_ms = grant_expiry_ms(expires_at)
        _units_arg(units)
        r, replayed = await self._run(
            "grant",
            user,
            self.keys.account_keys(user, op_id, op_id),
            [*self._base(user, op_id), units, exp_ms, priority, source, _meta(metadata)],
        )
        return GrantResult(
            r["grant_seq"],
            int(r["amount"]),
            int(r["debt_repaid"]),
            int(r["expires_at"]),
            AccountState.from_wire(r["state"]),
            replayed,
        )

    async def trim_plan_credit(
        self, user: str, *, op_id: str, subscription: str, before_period: int, cap_units: int
    ) -> tuple[int, int]:
        """Expires the subscription's plan credit from periods before `before_period` down to
        `cap_units` (0: all of it), oldest grant first (lua/plan_trim.lua). Returns how many
        grants were trimmed and by how many micro-credits."""
        check_id("user_id", user)
        check_id("op_id", op_id)
        _units_arg(cap_units, allow_zero=True)
        r, _ = await self._run(
            "plan_trim",
            user,
            self.keys.account_keys(user, op_id, op_id),
            [*self._base(user, op_id), subscription, before_period, cap_units],
        )
        return int(r["grants"]), int(r["credits"])

    async def debit(
        self,
        user: str,
        amount: Decimal | str | int,
        *,
        op_id: str,
        metadata: dict[str, Any] | None = None,
        allow_debt: bool = False,
    ) -> DebitResult:
        """Charges `amount` at once. Without `allow_debt` (admin) it is refused when the free
        credit is short; with it, what free credit cannot cover becomes debt (the overage
        policy of a settle: for usage reported after its request settled)."""
        return await self.debit_units(
            user, to_units(amount), op_id=op_id, metadata=metadata, allow_debt=allow_debt
        )

    async def debit_units(
        self,
        user: str,
        units: int,
        *,
        op_id: str,
        metadata: dict[str, Any] | None = None,
        allow_debt: bool = False,
    ) -> DebitResult:
        check_id("user_id", user)
        check_id("op_id", op_id)
        _units_arg(units)
        r, replayed = await self._run(
            "debit",
            user,
            self.keys.account_keys(user, op_id, op_id),
            [*self._base(user, op_id), units, _meta(metadata), "1" if allow_debt else ""],
        )
        return DebitResult(
            int(r["amount"]), AccountState.from_wire(r["state"]), replayed, int(r.get("debt_added") or 0)
        )

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
            user,
            to_units(amount),
            hold_id=hold_id,
            ttl_seconds=ttl_seconds,
            op_id=op_id,
            metadata=metadata,
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
        # A name with the list's separator in it matches no list (reserve.lua looks up |name|).
        model = "" if rate is None else ("|" if "|" in rate.model else rate.model)
        r, replayed = await self._run(
            "reserve",
            user,
            self._hold_keys(user, op_id, hold_id, hold_id),
            [
                *self._base(user, op_id),
                hold_id,
                units,
                ttl_ms,
                _meta(metadata),
                *limits,
                self.max_backlog,
                model,
            ],
        )
        return Hold(
            r["hold_id"], int(r["amount"]), int(r["expires_at"]), AccountState.from_wire(r["state"]), replayed
        )

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
            user,
            self._hold_keys(user, op_id, hold_id, f"!settle:{hold_id}"),
            [*self._base(user, op_id), hold_id, units, _meta(metadata), "" if tokens is None else tokens],
        )
        return _resolution(r, replayed)

    async def release(
        self,
        user: str,
        hold_id: str,
        *,
        op_id: str | None = None,
        metadata: dict[str, Any] | None = None,
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
            user,
            self._hold_keys(user, op_id, hold_id, f"!release:{hold_id}"),
            [*self._base(user, op_id), hold_id, _meta(metadata), "1" if void_if_unknown else ""],
        )
        return _resolution(r, replayed)

    # -- reads -------------------------------------------------------------------------

    async def _read(self, user: str, detail: bool, rebuilding: bool = False) -> dict:
        check_id("user_id", user)
        keys = self.keys.account_keys(user)
        code, r = await self.scripts.call_json(
            self.script_redis,
            "account",
            [keys[0], keys[1], keys[3]],
            [self.now_ms(), "1" if detail else "0", "1" if rebuilding else "0"],
        )
        if code != "ok":
            raise_for(code, r)
        return r

    async def balance(self, user: str) -> AccountState:
        """The account's totals (an unknown account reads as zeros). StateLost while the
        account's partition is lost (Redis lost its data and it is not rebuilt yet)."""
        return AccountState.from_wire(await self._read(user, False))

    async def account(self, user: str, *, rebuilding: bool = False) -> AccountView:
        """Totals, grants in spend order, and open holds. StateLost while the partition is
        lost, unless `rebuilding` (the rebuild itself reads what Redis still has)."""
        r = await self._read(user, True, rebuilding)
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

    async def remembered(self, user: str, op_id: str) -> tuple[str, str] | None:
        """What Redis keeps of an operation id to answer its replays: (fingerprint, answer
        JSON), or None once forgotten (past the retention). Wherever it is kept: the
        operation-id key, or the hold hash for a hold operation under its default id."""
        check_id("user_id", user)
        keys, hold_id, kind = self._record_keys(user, op_id)
        code, r = await self.scripts.call_json(self.script_redis, "remembered", keys, [hold_id, kind])
        return (r["fp"], r["answer"]) if code == "ok" else None

    def _record_keys(self, user: str, op_id: str) -> tuple[list[str], str, str]:
        # The op key, and the hold hash that keeps the record of a hold operation under its
        # default id: "!settle:<hold>" / "!release:<hold>", else the hold named by the id.
        kind, _, hold_id = (
            op_id.partition(":") if op_id.startswith(("!settle:", "!release:")) else ("", "", op_id)
        )
        keys = [self.keys.op_key(user, op_id), self.keys.hold_key(user, hold_id)]
        return keys, hold_id, kind[1:] or "reserve"

    # -- sweeping and recovery ---------------------------------------------------------

    async def sweep_partition(self, partition: int, *, limit: int = 500) -> SweepResult:
        """Expires the holds and grants of one partition that are due (at most `limit` each)."""
        pk = self.keys.partition(partition)
        now = self.now_ms()
        holds = await self.redis.zrangebyscore(pk.hold_expiry, "-inf", now, start=0, num=limit)
        grants = await self.redis.zrangebyscore(pk.grant_expiry, "-inf", now, start=0, num=limit)
        due: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
        for member, slot in [(m, 0) for m in holds] + [(m, 1) for m in grants]:
            user, _, ident = (member.decode() if isinstance(member, bytes) else str(member)).rpartition("|")
            due[user][slot].append(ident)
        total = SweepResult(due_left=len(holds) == limit or len(grants) == limit)
        for user, (hids, seqs) in due.items():
            keys = self.keys.account_keys(user) + [self.keys.hold_key(user, h) for h in hids]
            args = [now, self.retention_s, user, len(hids), *hids, *seqs]
            code, r = await self.scripts.call_json(self.script_redis, "expire", keys, args)
            if code != "ok":
                raise_for(code, r)
            total = SweepResult(
                total.holds + r["holds"],
                total.grants + r["grants"],
                total.credits + from_units(r["credits"]),
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
        pipe = self.redis.pipeline(transaction=False)  # on a Cluster, split by node
        for pk in self.keys.all_partitions():
            pipe.exists(pk.ready)
        return [p for p, ok in enumerate(await pipe.execute()) if not ok]

    async def mark_ready(self, partition: int) -> None:
        await self.redis.set(self.keys.partition(partition).ready, "1")

    async def restore_operation(
        self, user: str, op_id: str, fingerprint: str, answer: str, ttl_s: int
    ) -> bool:
        """Makes Redis remember an operation again after it lost its data (the store's
        OperationRecord: fingerprint and answer JSON), in the compact form and place the
        scripts keep it, for `ttl_s` seconds. False when Redis remembers it already."""
        keys, args = self.restore_ops_call([(user, op_id, fingerprint, answer, ttl_s)])
        return await self.scripts.call(self.script_redis, "restore_ops", keys, args) == 1

    def restore_ops_call(self, ops: list[tuple[str, str, str, str, int]]) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of lua/restore_ops.lua for operations (user, op id, fingerprint,
        answer JSON, ttl s), all of one partition (the rebuild batches them)."""
        keys: list[str] = []
        for user, op_id, *_ in ops:
            keys += self._record_keys(user, op_id)[0]
        return keys, [orjson.dumps([o[1:] for o in ops])]

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
