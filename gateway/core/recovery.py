"""Rebuilding Redis from the store (rehydrate) and comparing the two (reconcile)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from .apikeys import restore_api_keys
from .engine import CreditEngine
from .ratelimits import restore_rate_limits
from .money import to_units
from .events import (
    DEBIT, GRANT, GRANT_EXPIRED, HOLD_EXPIRED, HOLD_OPEN, HOLD_RELEASED, HOLD_SETTLED,
)
from .store.base import AccountSnapshot, LedgerEntry, Store

log = logging.getLogger("credit.recovery")


@dataclass
class RehydrateReport:
    accounts: int = 0
    skipped: int = 0
    operations: int = 0
    partitions: int = 0
    api_keys: int = 0
    rate_limits: int = 0


def _restore_state(snap: AccountSnapshot) -> dict[str, Any]:
    t = snap.totals
    return {
        **{k: str(int(t.get(k, 0))) for k in ("seq", "held", "debt", "debt_total", "granted", "spent", "expired")},
        "grants": [
            {"seq": g["seq"], "r": str(g["r"]), "e": str(g["e"]), "x": str(g["x"]), "pri": int(g["pri"]), "m": g["m"]}
            for g in snap.grants
        ],
        "holds": [
            {"id": h["id"], "amt": str(h["amt"]), "exp": str(h["exp"]), "ear": h.get("ear") or "",
             "at": str(h.get("at") or 0), "op": h.get("op") or h["id"], "x": h.get("x") or "{}"}
            for h in snap.holds
        ],
    }


async def rehydrate(engine: CreditEngine, store: Store, partitions: list[int] | None = None) -> RehydrateReport:
    """Rebuilds accounts, grants, open holds, recent operation ids, API keys and rate-limit
    overrides from the store.

    Only accounts Redis does not already hold at the same or a newer version are written;
    the partitions' ready markers are set at the end, which re-opens them to writes.
    """
    report = RehydrateReport()
    wanted = set(range(engine.keys.partitions) if partitions is None else partitions)
    async for snap in store.snapshots():
        if engine.keys.partition_of(snap.user) not in wanted:
            continue
        current = await engine.account(snap.user, rebuilding=True)
        stale = [h.hold_id for h in current.holds]
        if await engine.restore_account(snap.user, snap.version, _restore_state(snap), stale):
            report.accounts += 1
        else:
            report.skipped += 1
    # Operation ids answered within the retention window answer the same after the rebuild.
    now_ms = engine.now_ms()
    since = now_ms - engine.retention_s * 1000
    async for op in store.operations_since(since):
        if engine.keys.partition_of(op.user) not in wanted:
            continue
        ttl = engine.retention_s - (now_ms - op.ts_ms) // 1000
        if ttl > 0:
            await engine.redis.set(
                engine.keys.op_key(op.user, op.op_id), f"{op.fingerprint}\n{op.result}", ex=ttl, nx=True
            )
            report.operations += 1
    # The admin records that live on these partitions: API keys and rate-limit overrides.
    report.api_keys = await restore_api_keys(engine.redis, engine.keys, store, wanted)
    report.rate_limits = await restore_rate_limits(engine.redis, engine.keys, store, wanted)
    for p in sorted(wanted):
        await engine.mark_ready(p)
    report.partitions = len(wanted)
    log.info("rehydrated %s", report)
    return report


async def ensure_ready(engine: CreditEngine, store: Store) -> RehydrateReport | None:
    """Rebuilds the partitions whose ready marker is missing (Redis lost them, or first start)."""
    missing = await engine.missing_partitions()
    if not missing:
        return None
    return await rehydrate(engine, store, missing)


@dataclass(frozen=True)
class Drift:
    user: str
    what: str
    redis: Any
    store: Any

    def __str__(self) -> str:
        return f"{self.user}: {self.what}: redis={self.redis} store={self.store}"


def replay_ledger(entries: list[LedgerEntry]) -> dict[str, int]:
    """Totals recomputed from the ledger's amounts alone (not from the carried states)."""
    t = dict.fromkeys(("granted", "spent", "expired", "held", "debt"), 0)
    for e in entries:
        ev = e.event
        n = lambda k: int(ev.get(k) or 0)  # noqa: E731
        if e.type == GRANT:
            t["granted"] += e.amount
            t["debt"] -= n("debt_repaid")
            t["spent"] += n("debt_repaid")
        elif e.type == DEBIT:
            t["spent"] += e.amount - n("debt_added")
            t["debt"] += n("debt_added")
        elif e.type == HOLD_OPEN:
            t["held"] += e.amount
        elif e.type in (HOLD_SETTLED, HOLD_RELEASED, HOLD_EXPIRED):
            t["held"] -= n("held_amt")
            t["spent"] += e.amount - n("debt_added") + n("debt_repaid")
            t["debt"] += n("debt_added") - n("debt_repaid")
            t["expired"] += n("lapsed")
        elif e.type == GRANT_EXPIRED:
            t["expired"] += e.amount
    return t


async def reconcile(engine: CreditEngine, store: Store) -> list[Drift]:
    """Compares every account in Redis with the store (run it after the worker drained).

    Checks, per account: version, totals, each grant's free and earmarked amounts, the open
    holds; and that the store's ledger is complete (versions 1..v) and replays to its totals.
    """
    drift: list[Drift] = []
    users: set[str] = set()
    snaps: dict[str, AccountSnapshot] = {}
    async for snap in store.snapshots():
        snaps[snap.user] = snap
        users.add(snap.user)
    for pk in engine.keys.all_partitions():
        users.update(m.decode() if isinstance(m, bytes) else m for m in await engine.redis.smembers(pk.users))
    for user in sorted(users):
        view = await engine.account(user)
        snap = snaps.get(user)
        if snap is None:
            drift.append(Drift(user, "account", f"v{view.state.version}", "missing"))
            continue
        if view.state.version != snap.version:
            drift.append(Drift(user, "version", view.state.version, snap.version))
        # `available` depends on the clock (unswept expiries); the grants are compared below.
        for k in ("held", "debt", "granted", "spent", "expired"):
            have, want = getattr(view.state, f"{k}_units"), int(snap.totals.get(k, 0))
            if have != want:
                drift.append(Drift(user, k, have, want))
        rg = {g.seq: (to_units(g.free, allow_zero=True), to_units(g.earmarked, allow_zero=True)) for g in view.grants}
        sg = {g["seq"]: (int(g["r"]), int(g["e"])) for g in snap.grants}
        if rg != sg:
            drift.append(Drift(user, "grants", rg, sg))
        rh = {h.hold_id: to_units(h.amount) for h in view.holds}
        sh = {h["id"]: int(h["amt"]) for h in snap.holds}
        if rh != sh:
            drift.append(Drift(user, "open holds", rh, sh))
        entries = [e async for e in store.ledger_all(user)]
        versions = [e.version for e in entries]
        if versions != list(range(1, snap.version + 1)):
            drift.append(Drift(user, "ledger versions", f"1..{snap.version}", _ranges(versions)))
        replayed = replay_ledger(entries)
        for k, v in replayed.items():
            if v != int(snap.totals.get(k, 0)):
                drift.append(Drift(user, f"ledger replay {k}", v, int(snap.totals.get(k, 0))))
    return drift


def _ranges(vs: list[int]) -> str:
    if not vs:
        return "none"
    return json.dumps(vs[:10]) + ("..." if len(vs) > 10 else "")
