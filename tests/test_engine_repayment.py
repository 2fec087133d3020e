"""Debt is repaid by credit that returns to the grants, inside the script that returns it:
a release, a settle below its hold, the sweeper's expiry of a hold and a late settle that
expires it. The account can reserve again at once; its events carry `debt_repaid`, so the
ledger still replays to the balances (reconcile finds no drift).
All against the real Lua on a real redis-server.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from gateway.core import errors
from gateway.core.engine import CreditEngine
from gateway.core.events import decode
from gateway.core.reconcile import reconcile
from tests.support.engine_helpers import assert_conserved, at, events_of

D = Decimal


async def in_debt_with_open_hold(engine: CreditEngine, user: str, ttl: float = 60) -> None:
    """10 granted; a hold of 4 stays open; a settle of 9 against a hold of 6 leaves 3 of debt."""
    await engine.grant(user, "10", op_id="g1")
    await engine.reserve(user, "4", hold_id="open", ttl_seconds=ttl)
    await engine.reserve(user, "6", hold_id="big", ttl_seconds=60)
    s = await engine.settle(user, "big", "9")
    assert s.debt_added == D(3)
    bal = await engine.balance(user)
    assert (bal.debt, bal.available, bal.held) == (D(3), D(0), D(4))
    with pytest.raises(errors.AccountInDebt):
        await engine.reserve(user, "0.1", hold_id="refused", ttl_seconds=60)


async def test_release_repays_debt_and_the_account_can_reserve_again(engine):
    await in_debt_with_open_hold(engine, "alice")
    r = await engine.release("alice", "open")
    assert (r.returned, r.debt_repaid, r.debt_added) == (D(4), D(3), D(0))
    assert (r.state.debt, r.state.available, r.state.spent, r.state.held) == (D(0), D(1), D(9), D(0))
    h = await engine.reserve("alice", "1", hold_id="again", ttl_seconds=60)
    assert h.state.available == D(0)
    # the replay answers the same, repayment included, and changes nothing
    again = await engine.release("alice", "open")
    assert again.replayed and again.debt_repaid == D(3) and again.state == r.state
    ev = (await events_of(engine, "alice"))[-2]
    assert ev.type == "hold_released" and ev.raw["debt_repaid"] == "3000000"
    await assert_conserved(engine, "alice", D(9))


async def test_settle_below_the_hold_repays_debt_up_to_what_returns(engine):
    await in_debt_with_open_hold(engine, "bob")
    s = await engine.settle("bob", "open", "2")  # 2 return: they repay 2 of the 3 owed
    assert (s.charged, s.returned, s.debt_repaid) == (D(2), D(2), D(2))
    assert (s.state.debt, s.state.available, s.state.spent) == (D(1), D(0), D(10))
    with pytest.raises(errors.AccountInDebt):
        await engine.reserve("bob", "0.1", hold_id="still", ttl_seconds=60)
    g = await engine.grant("bob", "5", op_id="g2")
    assert (g.debt_repaid, g.state.available) == (D(1), D(4))
    await assert_conserved(engine, "bob", D(9) + D(2))


async def test_expiry_by_the_sweeper_and_by_a_late_settle_repays_debt(engine, clock):
    await in_debt_with_open_hold(engine, "carol", ttl=5)
    await in_debt_with_open_hold(engine, "dave", ttl=5)
    clock.advance(5)
    assert (await engine.sweep()).holds == 2
    with pytest.raises(errors.HoldExpired):  # dave's was expired by the sweep already
        await engine.settle("dave", "open", "1")
    for u in ("carol", "dave"):
        bal = await engine.balance(u)
        assert (bal.debt, bal.available, bal.held, bal.spent) == (D(0), D(1), D(0), D(9)), u
        ev = (await events_of(engine, u))[-1]
        assert ev.type == "hold_expired" and ev.raw["debt_repaid"] == "3000000"
        await engine.reserve(u, "1", hold_id="again", ttl_seconds=60)
    # a settle that arrives after the deadline, before any sweep, expires the hold: same rule
    await in_debt_with_open_hold(engine, "erin", ttl=5)
    clock.advance(5)
    with pytest.raises(errors.HoldExpired):
        await engine.settle("erin", "open", "1")
    bal = await engine.balance("erin")
    assert (bal.debt, bal.available) == (D(0), D(1))
    await assert_conserved(engine, "erin", D(9))


async def test_credit_returning_to_an_expired_grant_repays_nothing(engine, clock):
    await engine.grant("fay", "4", op_id="soon", expires_at=at(clock, 20), priority=0)
    await engine.reserve("fay", "4", hold_id="open", ttl_seconds=60)  # all of "soon"
    await engine.grant("fay", "1", op_id="g2")
    await engine.reserve("fay", "1", hold_id="big", ttl_seconds=60)
    await engine.settle("fay", "big", "3")  # 2 of debt
    clock.advance(25)  # "soon" expired while the hold was open: its earmark lapses
    r = await engine.release("fay", "open")
    assert (r.returned, r.lapsed, r.debt_repaid, r.state.debt) == (D(0), D(4), D(0), D(2))
    await assert_conserved(engine, "fay", D(3))


async def test_the_ledger_of_repayments_replays_to_the_balances(engine, clock, store):
    await test_release_repays_debt_and_the_account_can_reserve_again(engine)
    await test_settle_below_the_hold_repays_debt_up_to_what_returns(engine)
    await test_expiry_by_the_sweeper_and_by_a_late_settle_repays_debt(engine, clock)
    events = []
    for p in range(engine.keys.partitions):
        for sid, fields in await engine.redis.xrange(engine.keys.partition(p).events):
            events.append(decode(sid, fields, p))
    await store.write_events(events)
    assert await reconcile(engine, store) == []
