"""The real engine (Lua on a real redis-server) against the pure-Python model (tests/model.py).

A hypothesis state machine runs random sequences of grant (with or without expiry, any
priority) / reserve / settle (below, at, above the hold) / release / debit / clock advance /
sweep / replay of an earlier operation / reuse of an operation id with other fields, on
2-3 users, and after EVERY step checks that the engine's answers, totals, grants (free and
earmarked per grant), open holds and event count equal the model's, and that both conserve
credit. The engine is async: the machine drives it on its own event loop.

Grant expiries fall on whole seconds here so that grants often expire at the same moment
and the spend order's ties (priority, then age) are exercised; the engine orders expiries
to the millisecond (test_spend_order_expiring_first_at_millisecond_precision in
test_engine_guarantees.py). Hold timeouts are the milliseconds up to two minutes that a
float `ttl_seconds` carries exactly; the engine rounds the others to the millisecond
(test_hold_lasts_exactly_its_timeout).
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import redis.asyncio as aioredis
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from gateway.core import errors
from gateway.core.engine import CreditEngine
from gateway.core.keys import KeySpace
from gateway.core.money import from_units
from gateway.core.results import AccountState, DebitResult, GrantResult, Hold, HoldResolution
from tests.conftest import ManualClock
from tests.model import Model, Ok, Refused

PARTITIONS = 16
# What the runs reached (answer codes and interesting outcomes): checked at the end, so a
# change of strategies that stops exercising a path fails loudly instead of passing idly.
COVERAGE: collections.Counter = collections.Counter()
USERS = ["alice", "bob", "carol"]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SOURCES = ["payment", "plan", "promo", "admin", "refund"]


def units(d: Decimal) -> int:
    n = d * 1_000_000
    assert n == n.to_integral_value(), d
    return int(n)


def dt_ms(dt: datetime | None) -> int:
    return 0 if dt is None else (dt - EPOCH) // timedelta(milliseconds=1)


def state_dict(s: AccountState) -> dict[str, int]:
    return {
        "version": s.version,
        "available": units(s.available),
        "held": units(s.held),
        "debt": units(s.debt),
        "granted": units(s.granted),
        "spent": units(s.spent),
        "expired": units(s.expired),
    }


def as_answer(r) -> Ok:
    """An engine result in the model's shape (integers of micro-credits, ms times)."""
    if isinstance(r, GrantResult):
        d = {
            "grant_seq": r.grant_seq,
            "amount": units(r.amount),
            "debt_repaid": units(r.debt_repaid),
            "expires_at": dt_ms(r.expires_at),
        }
    elif isinstance(r, Hold):
        assert r.amount_units == units(r.amount)
        d = {"hold_id": r.hold_id, "amount": units(r.amount), "expires_at": dt_ms(r.expires_at)}
    elif isinstance(r, HoldResolution):
        assert r.charged_units == units(r.charged)
        d = {
            "hold_id": r.hold_id,
            "status": r.status,
            "charged": units(r.charged),
            "held_amount": units(r.held_amount),
            "returned": units(r.returned),
            "lapsed": units(r.lapsed),
            "debt_added": units(r.debt_added),
            "debt_repaid": units(r.debt_repaid),
        }
    elif isinstance(r, DebitResult):
        d = {"amount": units(r.amount), "debt_added": units(r.debt_added)}
    else:  # pragma: no cover
        raise TypeError(r)
    d["state"] = state_dict(r.state)
    return Ok(d, r.replayed)


def as_refusal(e: errors.CreditError) -> Refused:
    details = {k: (units(v) if k in ("available", "debt") else v) for k, v in e.details.items()}
    return Refused(e.code, details)


class EngineVsModel(RuleBasedStateMachine):
    redis_url: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = ManualClock()
        self.client = aioredis.Redis.from_url(self.redis_url)
        self.engine = CreditEngine(self.client, keys=KeySpace(partitions=PARTITIONS), clock=self.clock)
        self.model = Model()
        self.n = 0
        self.calls: list[tuple[str, dict]] = []  # every call made, for replays
        self.users = USERS

        async def start():
            await self.client.flushall()
            for p in range(PARTITIONS):
                await self.engine.mark_ready(p)

        self.run(start())

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.client.aclose())
        self.loop.close()

    def now(self) -> int:
        return self.engine.now_ms()

    def fresh(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    @initialize(
        n_users=st.integers(2, 3),
        amounts=st.lists(st.integers(1, 40).map(lambda c: c * 500_000), min_size=3, max_size=3),
        expiries=st.lists(st.one_of(st.none(), st.integers(1, 60)), min_size=3, max_size=3),
    )
    def open_accounts(self, n_users, amounts, expiries):
        """2-3 users, each with a first grant (so the first steps have credit to hold)."""
        self.users = USERS[:n_users]
        for user, amount, expiry in zip(self.users, amounts, expiries, strict=False):
            self.grant_to(user, amount, expiry, 100, "payment")

    # -- one call, on both sides -------------------------------------------------------

    def call(self, kind: str, args: dict, record: bool = True):
        """Runs one operation on the engine and the model; their answers must be equal."""
        if record:
            self.calls.append((kind, dict(args)))
        e = self.engine
        now = self.now()
        a = dict(args)
        if kind == "grant":
            exp_s = a.pop("exp_s")
            exp = datetime.fromtimestamp(exp_s, tz=UTC) if exp_s else None
            coro = e.grant(
                a["user"],
                from_units(a["amount"]),
                op_id=a["op_id"],
                source=a["source"],
                expires_at=exp,
                priority=a["priority"],
            )
            want = self.model.grant(now, exp_ms=exp_s * 1000, **a)
        elif kind == "reserve":
            coro = e.reserve(
                a["user"],
                from_units(a["amount"]),
                hold_id=a["hold_id"],
                ttl_seconds=a["ttl_ms"] / 1000,
                op_id=a["op_id"],
            )
            want = self.model.reserve(now, **a)
        elif kind == "settle":
            coro = e.settle(
                a["user"], a["hold_id"], from_units(a["charge"]), op_id=self.engine_op(a["op_id"])
            )
            want = self.model.settle(now, **a)
        elif kind == "release":
            coro = e.release(a["user"], a["hold_id"], op_id=self.engine_op(a["op_id"]))
            want = self.model.release(now, **a)
        elif kind == "debit":
            coro = e.debit(
                a["user"], from_units(a["amount"]), op_id=a["op_id"], allow_debt=a.get("allow_debt", False)
            )
            want = self.model.debit(now, **a)
        else:  # pragma: no cover
            raise ValueError(kind)
        try:
            got = as_answer(self.run(coro))
        except errors.CreditError as exc:
            got = as_refusal(exc)
        assert got == want, f"{kind} {args}\n engine: {got}\n model:  {want}"
        self.note_coverage(kind, got)
        return got

    @staticmethod
    def note_coverage(kind: str, got: Ok | Refused) -> None:
        if isinstance(got, Refused):
            COVERAGE[f"{kind}:{got.code}"] += 1
            return
        r = got.result
        COVERAGE[f"{kind}:{'replayed' if got.replayed else 'ok'}"] += 1
        if got.replayed:
            return
        for name in ("debt_repaid", "debt_added", "lapsed"):
            if r.get(name):
                COVERAGE[f"{kind}:{name}"] += 1
        if kind == "settle":
            c, h = r["charged"], r["held_amount"]
            COVERAGE["settle:" + ("below" if c < h else "equal" if c == h else "above")] += 1

    @staticmethod
    def engine_op(op_id: str) -> str | None:
        # "!settle:<hold>" / "!release:<hold>" are the engine's default ids: pass none
        return None if op_id.startswith("!") else op_id

    # -- rules -------------------------------------------------------------------------

    @rule(
        u=st.integers(0, 2),
        amount=st.one_of(st.integers(1, 10).map(lambda c: c * 1_000_000), st.integers(1, 20_000_000)),
        expiry=st.one_of(st.none(), st.integers(1, 20)),
        priority=st.sampled_from([0, 10, 100, 500, 1000]),
        source=st.sampled_from(SOURCES),
    )
    def grant(self, u, amount, expiry, priority, source):
        self.grant_to(self.users[u % len(self.users)], amount, expiry, priority, source)

    def grant_to(self, user, amount, expiry, priority, source):
        # whole-second expiries, so that some coincide (see the module docstring): `expiry`
        # seconds after the next whole second
        exp_s = 0 if expiry is None else math.ceil(self.clock()) + expiry
        self.call(
            "grant",
            {
                "user": user,
                "op_id": self.fresh("g"),
                "amount": amount,
                "exp_s": exp_s,
                "priority": priority,
                "source": source,
            },
        )

    @rule(
        u=st.integers(0, 2),
        amount=st.one_of(st.integers(1, 3).map(lambda c: c * 1_000_000), st.integers(1, 6_000_000)),
        # ttl_seconds is ms / 1000, a float: the milliseconds it does not carry exactly (1001 ms
        # reads 1.0009999...) are left to test_hold_lasts_exactly_its_timeout
        ttl_ms=st.one_of(
            st.sampled_from([1000, 5000, 30_000, 60_000, 120_000]),
            st.integers(1, 120_000).filter(lambda ms: int(ms / 1000 * 1000) == ms),
        ),
        reuse=st.integers(0, 29),
        own_op=st.booleans(),
    )
    def reserve(self, u, amount, ttl_ms, reuse, own_op):
        user = self.users[u % len(self.users)]
        held = sorted(self.model.acct(user).holds)
        # now and then a hold id that is taken already (hold_exists, or a conflict on its op id)
        hold_id = held[reuse % len(held)] if held and reuse < 3 else self.fresh("h")
        op_id = self.fresh("r") if own_op else hold_id
        self.call(
            "reserve", {"user": user, "op_id": op_id, "hold_id": hold_id, "amount": amount, "ttl_ms": ttl_ms}
        )

    def _pick_hold(self, u: int, pick: int) -> tuple[str, str, int]:
        """Mostly an open hold of any user; else a resolved one, or one that does not exist."""
        open_, other = [], []
        for user in self.users:
            for hid, h in sorted(self.model.acct(user).holds.items()):
                (open_ if h.status == "open" else other).append((user, hid, h.amount))
        choices = open_ * 4 + other + [(self.users[u % len(self.users)], "no-such-hold", 1_000_000)]
        return choices[pick % len(choices)]

    def any_open_hold(self) -> bool:
        return any(h.status == "open" for u in self.users for h in self.model.acct(u).holds.values())

    @precondition(any_open_hold)
    @rule(
        u=st.integers(0, 2),
        pick=st.integers(0, 1000),
        how=st.sampled_from(["zero", "below", "equal", "above", "far_above"]),
        frac=st.integers(1, 99),
        own_op=st.booleans(),
    )
    def settle(self, u, pick, how, frac, own_op):
        user, hid, amt = self._pick_hold(u, pick)
        charge = {
            "zero": 0,
            "below": amt * frac // 100,
            "equal": amt,
            "above": amt + amt * frac // 100 + 1,
            "far_above": amt + frac * 1_000_000,
        }[how]
        op_id = self.fresh("s") if own_op else f"!settle:{hid}"
        self.call("settle", {"user": user, "op_id": op_id, "hold_id": hid, "charge": charge})

    @precondition(any_open_hold)
    @rule(u=st.integers(0, 2), pick=st.integers(0, 1000), own_op=st.booleans())
    def release(self, u, pick, own_op):
        user, hid, _ = self._pick_hold(u, pick)
        op_id = self.fresh("l") if own_op else f"!release:{hid}"
        self.call("release", {"user": user, "op_id": op_id, "hold_id": hid})

    def any_resolved_hold(self) -> bool:
        return any(h.status != "open" for u in self.users for h in self.model.acct(u).holds.values())

    @precondition(any_resolved_hold)
    @rule(pick=st.integers(0, 1000), settle=st.booleans(), charge=st.integers(0, 2_000_000))
    def resolve_again(self, pick, settle, charge):
        # A hold resolved before, settled or released again under an id of its own:
        # already_settled / already_released / hold_expired (rare in the rules above, which
        # mostly pick open holds, so asked for directly).
        resolved = [
            (u, hid)
            for u in self.users
            for hid, h in sorted(self.model.acct(u).holds.items())
            if h.status != "open"
        ]
        user, hid = resolved[pick % len(resolved)]
        if settle:
            self.call("settle", {"user": user, "op_id": self.fresh("s"), "hold_id": hid, "charge": charge})
        else:
            self.call("release", {"user": user, "op_id": self.fresh("l"), "hold_id": hid})

    @rule(
        u=st.integers(0, 2),
        amount=st.one_of(st.integers(1, 3).map(lambda c: c * 1_000_000), st.integers(1, 8_000_000)),
    )
    def debit(self, u, amount):
        user = self.users[u % len(self.users)]
        self.call("debit", {"user": user, "op_id": self.fresh("d"), "amount": amount})

    @rule(u=st.integers(0, 2), amount=st.integers(1, 8_000_000))
    def late_usage_debit(self, u, amount):
        # library mode's late usage: never refused for want of credit, the rest is debt
        user = self.users[u % len(self.users)]
        self.call("debit", {"user": user, "op_id": self.fresh("ld"), "amount": amount, "allow_debt": True})

    @rule(seconds=st.sampled_from([0.25, 0.5, 1, 1.75, 3, 5, 10, 31]))
    def advance(self, seconds):
        self.clock.advance(seconds)

    @rule(ms=st.integers(1, 2000))
    def advance_ms(self, ms):
        # lands on odd milliseconds (and exactly on deadlines, now and then)
        self.clock.t = (self.now() + ms) / 1000

    @rule()
    def sweep(self):
        want = self.model.sweep(self.now())
        got = self.run(self.engine.sweep())
        assert (got.holds, got.grants, units(got.credits)) == (want["holds"], want["grants"], want["credits"])
        COVERAGE["sweep:holds"] += got.holds
        COVERAGE["sweep:grants"] += got.grants

    @precondition(lambda self: self.calls)
    @rule(pick=st.integers(0, 10_000))
    def replay(self, pick):
        kind, args = self.calls[pick % len(self.calls)]
        self.call(kind, args, record=False)

    @precondition(lambda self: self.calls)
    @rule(pick=st.integers(0, 10_000), bump=st.integers(1, 1_000_000))
    def reuse_op_id_with_other_fields(self, pick, bump):
        # a release under its default id ("!release:<hold>") has no other field to change
        calls = [c for c in self.calls if not (c[0] == "release" and c[1]["op_id"].startswith("!"))]
        if not calls:
            return
        kind, args = calls[pick % len(calls)]
        a = dict(args)
        if kind in ("grant", "reserve", "debit"):
            a["amount"] += bump
        elif kind == "settle":
            a["charge"] += bump
        else:
            a["hold_id"] = self.fresh("h")
        self.call(kind, a, record=False)

    # -- checks after every step -------------------------------------------------------

    @invariant()
    def engine_matches_model(self):
        now = self.now()
        for user in USERS:
            view = self.run(self.engine.account(user))
            m = self.model.acct(user)
            assert state_dict(view.state) == m.state(now), user
            assert units(view.debt_total) == m.debt_total, user
            rows = {
                int(g.seq): (units(g.free), units(g.earmarked), dt_ms(g.expires_at), g.priority)
                for g in view.grants
            }
            assert rows == m.grant_rows(), user
            assert [int(g.seq) for g in view.grants] == m.spend_order(), user
            assert all(g.expired == m.grants[int(g.seq)].expired(now) for g in view.grants)
            holds = {h.hold_id: (units(h.amount), dt_ms(h.expires_at)) for h in view.holds}
            assert holds == m.open_holds(), user
            # conservation, on the engine's own numbers
            s = view.state
            assert units(s.granted) == (
                sum(rows[k][0] + rows[k][1] for k in rows) + units(s.spent) + units(s.expired)
            ), user
            assert units(s.held) == sum(r[1] for r in rows.values()) == sum(a for a, _ in holds.values())
            assert units(s.spent) + units(s.debt) == m.charges, user
            assert s.available >= 0 and s.debt >= 0
        self.model.check_conservation(now)
        events = self.run(self._stream_length())
        assert events == self.model.events

    async def _stream_length(self) -> int:
        pipe = self.client.pipeline(transaction=False)
        for pk in self.engine.keys.all_partitions():
            pipe.xlen(pk.events)
        return sum(await pipe.execute())


# A fixed seed: the run is the same on every machine (CI-stable), and the one below reaches
# every path in MUST_REACH (checked). CREDIT_MODEL_SEED=<n> explores another seed,
# CREDIT_MODEL_SEED=random a fresh one each run; CREDIT_MODEL_EXAMPLES=<n> runs longer.
SEED = os.environ.get("CREDIT_MODEL_SEED", "4")
# Paths the seeded runs must reach. (The seeded sequence shifts with the process's history:
# hypothesis also draws the constants it finds in every local module loaded so far, so
# other tests, any change of the code, or another hypothesis release move it. It has missed
# settle:lapsed, release:lapsed, settle:already_released and release:op_conflict, which
# tests/test_engine_guarantees.py checks directly, and release:debt_repaid and
# settle:debt_repaid, which tests/test_engine_repayment.py checks directly.)
MUST_REACH = [
    "grant:ok",
    "grant:replayed",
    "grant:op_conflict",
    "grant:debt_repaid",
    "reserve:ok",
    "reserve:replayed",
    "reserve:op_conflict",
    "reserve:hold_exists",
    "reserve:insufficient_credits",
    "reserve:in_debt",
    "settle:below",
    "settle:equal",
    "settle:above",
    "settle:debt_added",
    "settle:replayed",
    "settle:op_conflict",
    "settle:hold_not_found",
    "settle:hold_expired",
    "settle:already_settled",
    "release:ok",
    "release:replayed",
    "release:already_released",
    "release:hold_expired",
    "release:already_settled",
    "debit:ok",
    "debit:replayed",
    "debit:op_conflict",
    "debit:insufficient_credits",
    "debit:debt_added",
    "sweep:holds",
    "sweep:grants",
]


def test_engine_matches_the_model_after_every_step(redis_url):
    COVERAGE.clear()

    def run(seed_value: int | None) -> None:
        machine_class = type("Machine", (EngineVsModel,), {"redis_url": redis_url})

        # A factory function, not the class: hypothesis digests the factory's source, and
        # for a class CPython 3.11.7's inspect parses the whole module with ast, which can
        # fail ("AST constructor recursion depth mismatch") late in a long test session.
        def machine():
            return machine_class()

        if seed_value is not None:
            machine = seed(seed_value)(machine)
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=int(os.environ.get("CREDIT_MODEL_EXAMPLES", "100")),
                stateful_step_count=40,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            ),
        )

    if SEED == "random" or "CREDIT_MODEL_EXAMPLES" in os.environ:
        run(None if SEED == "random" else int(SEED))
        return
    # The guard against a vacuous run: every path in MUST_REACH is checked at least once.
    # The seeded sequence shifts with what ran before in the process, so a run that misses
    # a rare path goes on with the next seeds (at most 3 more) before the guard fails.
    for extra in range(4):
        run(int(SEED) + extra)
        missing = [k for k in MUST_REACH if not COVERAGE[k]]
        if not missing:
            break
    assert not missing, f"the run no longer reaches {missing}: {sorted(COVERAGE.items())}"
