"""Comparing Redis with the store (reconcile): every account's state, and its ledger replayed.

Run it after the worker has drained: it reports each difference as a Drift (the CLI's
`reconcile` command exits non-zero when there is any) and changes nothing.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from .engine import CreditEngine
from .events import DEBIT, GRANT, GRANT_EXPIRED, HOLD_EXPIRED, HOLD_OPEN, HOLD_RELEASED, HOLD_SETTLED
from .keys import InvalidId
from .money import to_units
from .store.base import AccountSnapshot, LedgerEntry, Store


@dataclass(frozen=True)
class Drift:
    user: str
    what: str
    redis: Any
    store: Any

    def __str__(self) -> str:
        return f"{self.user}: {self.what}: redis={self.redis} store={self.store}"


def _event_int(event: dict[str, Any], key: str) -> int:
    """An integer field of a ledger event; absent or empty reads as 0."""
    return int(event.get(key) or 0)


def replay_ledger(entries: list[LedgerEntry]) -> dict[str, int]:
    """Totals recomputed from the ledger's amounts alone (not from the carried states)."""
    t = dict.fromkeys(("granted", "spent", "expired", "held", "debt"), 0)
    for e in entries:
        n = functools.partial(_event_int, e.event)
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
    async for stored in store.snapshots():
        snaps[stored.user] = stored
        users.add(stored.user)
    for pk in engine.keys.all_partitions():
        users.update(m.decode() if isinstance(m, bytes) else m for m in await engine.redis.smembers(pk.users))
    for user in sorted(users):
        try:
            view = await engine.account(user)
        except InvalidId:  # an account made under an older, looser id rule ('/' was allowed)
            drift.append(Drift(user, "user id", "not a valid id under the current rule", "kept as is"))
            continue
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
        rg = {
            g.seq: (to_units(g.free, allow_zero=True), to_units(g.earmarked, allow_zero=True))
            for g in view.grants
        }
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
