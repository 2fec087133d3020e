"""A pure-Python reference model of the credit engine (micro-credit integers, ms times).

It states the money rules of docs/invariants.md with no Redis and no Lua, so the
state-machine test can compare every answer of the real engine with it:

- grants carry an expiry (ms, 0 = never) and a priority (0..1000); spending draws from the
  grant that expires first, then the lower priority number, then the oldest (millisecond
  precision); a grant at exactly its expiry time is expired;
- reserve earmarks grant amounts (refused when the account owes debt, or when the free
  unexpired credit is short); settle spends the earmarks in order up to the charge and
  returns the rest to the same grants (or counts it expired if the grant expired
  meanwhile); above the hold the overage comes from free credit and what is still missing
  becomes debt; release returns everything; a hold at or past its deadline is expired (by
  the sweep, or by a settle/release that arrives late and then answers hold_expired);
- debt is repaid first by a new grant, and by credit that returns to the grants (a
  release, a settle below its hold, an expiry): the repayment is drawn from free credit
  in spend order (in debt there is no free credit but what just returned), so an account
  is never refused `in_debt` with free credit in hand; admin debit draws at once and is
  refused when short; a debit with allow_debt (late usage) draws what free credit covers
  and the rest becomes debt, as a settle's overage does;
- every operation is idempotent by (user, op id): same fields -> the stored answer, other
  fields -> op_conflict; refusals are not stored;
- every state change bumps the account version and appends one event.

Answers are plain tuples/dicts so the test can build the same shape from the engine:
`Ok(result, replayed)` or `Refused(code, details)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NEVER = float("inf")


@dataclass(frozen=True)
class Ok:
    result: dict[str, Any]
    replayed: bool = False


@dataclass(frozen=True)
class Refused:
    code: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class MGrant:
    seq: int
    amount: int
    free: int
    exp_ms: int  # 0 = never
    priority: int
    earmarked: int = 0

    def expired(self, now: int) -> bool:
        return self.exp_ms > 0 and now >= self.exp_ms

    def order(self) -> tuple:
        return (self.exp_ms or NEVER, self.priority, self.seq)


@dataclass
class MHold:
    hold_id: str
    amount: int
    exp_ms: int
    ear: list[tuple[int, int]]  # (grant seq, amount) in spend order
    status: str = "open"


@dataclass
class MAccount:
    version: int = 0
    seq: int = 0
    granted: int = 0
    spent: int = 0
    expired: int = 0
    debt: int = 0
    debt_total: int = 0
    charges: int = 0  # every settle charge and debit: must equal spent + debt
    grants: dict[int, MGrant] = field(default_factory=dict)
    holds: dict[str, MHold] = field(default_factory=dict)
    ops: dict[str, tuple[tuple, dict]] = field(default_factory=dict)

    # -- reads -------------------------------------------------------------------------

    def live(self, now: int) -> list[MGrant]:
        """Unexpired grants with free credit, in spend order."""
        gs = [g for g in self.grants.values() if g.free > 0 and not g.expired(now)]
        return sorted(gs, key=MGrant.order)

    def available(self, now: int) -> int:
        return sum(g.free for g in self.live(now))

    @property
    def held(self) -> int:
        return sum(h.amount for h in self.holds.values() if h.status == "open")

    def state(self, now: int) -> dict[str, int]:
        return {
            "version": self.version,
            "available": self.available(now),
            "held": self.held,
            "debt": self.debt,
            "granted": self.granted,
            "spent": self.spent,
            "expired": self.expired,
        }

    def open_holds(self) -> dict[str, tuple[int, int]]:
        return {h.hold_id: (h.amount, h.exp_ms) for h in self.holds.values() if h.status == "open"}

    def grant_rows(self) -> dict[int, tuple[int, int, int, int]]:
        """seq -> (free, earmarked, exp_ms, priority) for every grant Redis still keeps."""
        return {g.seq: (g.free, g.earmarked, g.exp_ms, g.priority) for g in self.grants.values()}

    def spend_order(self) -> list[int]:
        return [g.seq for g in sorted(self.grants.values(), key=MGrant.order)]


class Model:
    """Every account of one deployment. `now` (ms) is passed to each operation."""

    def __init__(self) -> None:
        self.accounts: dict[str, MAccount] = {}
        self.events = 0

    def acct(self, user: str) -> MAccount:
        return self.accounts.setdefault(user, MAccount())

    # -- shared steps ------------------------------------------------------------------

    def _emit(self, a: MAccount) -> None:
        a.version += 1
        self.events += 1

    @staticmethod
    def _gc(a: MAccount) -> None:
        # A grant with nothing free and nothing earmarked is gone from Redis.
        for seq in [s for s, g in a.grants.items() if g.free <= 0 and g.earmarked <= 0]:
            del a.grants[seq]

    @staticmethod
    def _replay(a: MAccount, op_id: str, fp: tuple) -> Ok | Refused | None:
        prev = a.ops.get(op_id)
        if prev is None:
            return None
        if prev[0] == fp:
            return Ok(prev[1], replayed=True)
        return Refused("op_conflict", {"reason": "operation id already used with other fields"})

    @staticmethod
    def _draw(a: MAccount, now: int, amount: int, earmark: bool) -> tuple[int, list[tuple[int, int]]]:
        """Draws from live grants in spend order; returns (uncovered, [(seq, taken)])."""
        left, parts = amount, []
        for g in a.live(now):
            if left <= 0:
                break
            take = min(g.free, left)
            g.free -= take
            if earmark:
                g.earmarked += take
            parts.append((g.seq, take))
            left -= take
        return left, parts

    def _resolve(self, a: MAccount, now: int, h: MHold, charge: int, status: str) -> dict:
        spent_e = back = lapsed = 0
        for seq, amt in h.ear:
            use = min(amt, charge - spent_e)
            rest = amt - use
            spent_e += use
            g = a.grants[seq]
            g.earmarked -= amt
            if rest > 0:
                if g.expired(now):
                    lapsed += rest
                else:
                    g.free += rest
                    back += rest
        debt_added = repaid = 0
        if charge > spent_e:
            debt_added, _ = self._draw(a, now, charge - spent_e, earmark=False)
            a.debt += debt_added
            a.debt_total += debt_added
        elif back and a.debt:
            repaid = min(a.debt, back)
            left, _ = self._draw(a, now, repaid, earmark=False)
            assert left == 0
            a.debt -= repaid
        a.spent += charge - debt_added + repaid
        a.expired += lapsed
        a.charges += charge
        h.status = status
        self._gc(a)
        self._emit(a)
        return {
            "hold_id": h.hold_id,
            "status": status,
            "charged": charge,
            "held_amount": h.amount,
            "returned": back,
            "lapsed": lapsed,
            "debt_added": debt_added,
            "debt_repaid": repaid,
            "state": a.state(now),
        }

    def _not_open(self, a: MAccount, now: int, hold_id: str) -> Refused:
        h = a.holds.get(hold_id)
        if h is None:
            return Refused("hold_not_found")
        if h.status == "open":  # past its deadline, not swept yet: it expires now
            self._resolve(a, now, h, 0, "expired")
            return Refused("hold_expired")
        names = {"settled": "already_settled", "released": "already_released", "expired": "hold_expired"}
        return Refused(names[h.status], {"status": h.status})

    # -- operations --------------------------------------------------------------------

    def grant(
        self,
        now: int,
        user: str,
        op_id: str,
        amount: int,
        exp_ms: int = 0,
        priority: int = 100,
        source: str = "admin",
    ) -> Ok | Refused:
        a = self.acct(user)
        fp = ("grant", amount, exp_ms, priority, source)
        seen = self._replay(a, op_id, fp)
        if seen:
            return seen
        if exp_ms and exp_ms <= now:
            return Refused("invalid_expiry")
        a.seq += 1
        a.granted += amount
        repaid = min(a.debt, amount)
        a.debt -= repaid
        a.spent += repaid
        if amount - repaid > 0:
            a.grants[a.seq] = MGrant(a.seq, amount, amount - repaid, exp_ms, priority)
        self._emit(a)
        res = {
            "grant_seq": f"{a.seq:012d}",
            "amount": amount,
            "debt_repaid": repaid,
            "expires_at": exp_ms,
            "state": a.state(now),
        }
        a.ops[op_id] = (fp, res)
        return Ok(res)

    def reserve(
        self, now: int, user: str, op_id: str, hold_id: str, amount: int, ttl_ms: int
    ) -> Ok | Refused:
        a = self.acct(user)
        fp = ("reserve", hold_id, amount, ttl_ms)
        seen = self._replay(a, op_id, fp)
        if seen:
            return seen
        if hold_id in a.holds:
            return Refused("hold_exists")
        if a.debt > 0:
            return Refused("in_debt", {"debt": a.debt})
        avail = a.available(now)
        if avail < amount:
            return Refused("insufficient_credits", {"available": avail})
        _, parts = self._draw(a, now, amount, earmark=True)
        a.holds[hold_id] = MHold(hold_id, amount, now + ttl_ms, parts)
        self._gc(a)
        self._emit(a)
        res = {"hold_id": hold_id, "amount": amount, "expires_at": now + ttl_ms, "state": a.state(now)}
        a.ops[op_id] = (fp, res)
        return Ok(res)

    def settle(self, now: int, user: str, op_id: str, hold_id: str, charge: int) -> Ok | Refused:
        a = self.acct(user)
        fp = ("settle", hold_id, charge)
        seen = self._replay(a, op_id, fp)
        if seen:
            return seen
        h = a.holds.get(hold_id)
        if h is None or h.status != "open" or now >= h.exp_ms:
            return self._not_open(a, now, hold_id)
        res = self._resolve(a, now, h, charge, "settled")
        a.ops[op_id] = (fp, res)
        return Ok(res)

    def release(self, now: int, user: str, op_id: str, hold_id: str) -> Ok | Refused:
        a = self.acct(user)
        fp = ("release", hold_id)
        seen = self._replay(a, op_id, fp)
        if seen:
            return seen
        h = a.holds.get(hold_id)
        if h is None or h.status != "open" or now >= h.exp_ms:
            return self._not_open(a, now, hold_id)
        res = self._resolve(a, now, h, 0, "released")
        a.ops[op_id] = (fp, res)
        return Ok(res)

    def debit(self, now: int, user: str, op_id: str, amount: int, allow_debt: bool = False) -> Ok | Refused:
        a = self.acct(user)
        fp = ("debit", amount, allow_debt)
        seen = self._replay(a, op_id, fp)
        if seen:
            return seen
        avail = a.available(now)
        if avail < amount and not allow_debt:
            return Refused("insufficient_credits", {"available": avail})
        debt_added, _ = self._draw(a, now, amount, earmark=False)
        a.debt += debt_added
        a.debt_total += debt_added
        a.spent += amount - debt_added
        a.charges += amount
        self._gc(a)
        self._emit(a)
        res = {"amount": amount, "debt_added": debt_added, "state": a.state(now)}
        a.ops[op_id] = (fp, res)
        return Ok(res)

    def sweep(self, now: int) -> dict[str, int]:
        """Expires every hold at/past its deadline and every grant at/past its expiry."""
        holds = grants = credits = 0
        for a in self.accounts.values():
            for h in sorted(a.holds.values(), key=lambda h: (h.exp_ms, h.hold_id)):
                if h.status == "open" and now >= h.exp_ms:
                    self._resolve(a, now, h, 0, "expired")
                    holds += 1
            for g in sorted(a.grants.values(), key=lambda g: g.seq):
                if g.expired(now) and g.free > 0:
                    a.expired += g.free
                    credits += g.free
                    g.free = 0
                    grants += 1
                    self._gc(a)
                    self._emit(a)
        return {"holds": holds, "grants": grants, "credits": credits}

    # -- invariants ----------------------------------------------------------------------

    def check_conservation(self, now: int) -> None:
        for user, a in self.accounts.items():
            free = sum(g.free for g in a.grants.values())
            ear = sum(g.earmarked for g in a.grants.values())
            assert ear == a.held, (user, ear, a.held)
            assert a.granted == free + ear + a.spent + a.expired, user
            assert a.charges == a.spent + a.debt, user
            assert a.debt >= 0 and all(g.free >= 0 and g.earmarked >= 0 for g in a.grants.values())
            # debt is repaid before any credit is free again
            assert not a.debt or not a.live(now), user
