"""A debit that may go into debt (`allow_debt`): what late usage in library mode uses.

Free credit covers what it can; the rest becomes debt exactly as a settle's overage does
(debt and debt_total grow, spent only by the covered part), the account cannot reserve
until a grant repays it, and the event carries `debt_added` so the ledger replays to the
balances. The admin debit (no allow_debt) keeps refusing a short account.
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from gateway.core.errors import AccountInDebt, InsufficientCredits, OperationConflict
from gateway.core.reconcile import reconcile, replay_ledger


async def last_event(engine, user: str) -> dict:
    ((_, fields),) = await engine.redis.xrevrange(
        engine.keys.partition(engine.keys.partition_of(user)).events, count=1
    )
    return json.loads(fields[b"e"])


async def test_debit_with_allow_debt_draws_free_credit_and_records_the_rest_as_debt(engine):
    await engine.grant("late", "0.3", op_id="g1")
    r = await engine.debit("late", "0.5", op_id="late-1", allow_debt=True, metadata={"request_id": "lib-x"})
    assert (r.amount, r.debt_added) == (Decimal("0.5"), Decimal("0.2"))
    s = r.state
    assert (s.available, s.debt, s.spent, s.granted) == (0, Decimal("0.2"), Decimal("0.3"), Decimal("0.3"))
    assert (await engine.account("late")).debt_total == Decimal("0.2")
    ev = await last_event(engine, "late")
    assert ev["t"] == "debit" and ev["debt_added"] == "200000" and ev["amt"] == "500000"
    assert ev["x"] == {"request_id": "lib-x"}
    # In debt: no reserve until a grant repays it (grants repay debt first).
    with pytest.raises(AccountInDebt):
        await engine.reserve("late", "0.01", hold_id="h1", ttl_seconds=30)
    g = await engine.grant("late", "1", op_id="g2")
    assert g.debt_repaid == Decimal("0.2") and g.state.debt == 0 and g.state.available == Decimal("0.8")


async def test_debit_with_allow_debt_on_an_account_already_in_debt_adds_to_it(engine):
    await engine.grant("deep", "0.1", op_id="g1")
    await engine.debit("deep", "0.3", op_id="d1", allow_debt=True)
    r = await engine.debit("deep", "0.4", op_id="d2", allow_debt=True)
    assert (
        r.debt_added == Decimal("0.4") and r.state.debt == Decimal("0.6") and r.state.spent == Decimal("0.1")
    )


async def test_debit_with_allow_debt_is_idempotent_and_distinct_from_a_refusing_debit(engine):
    await engine.grant("idem", "0.1", op_id="g1")
    first = await engine.debit("idem", "0.25", op_id="late-1", allow_debt=True)
    again = await engine.debit("idem", "0.25", op_id="late-1", allow_debt=True)
    assert again.replayed and again.debt_added == first.debt_added == Decimal("0.15")
    assert again.state.version == first.state.version
    with pytest.raises(OperationConflict):
        await engine.debit("idem", "0.25", op_id="late-1")  # same id, without allow_debt


async def test_debit_without_allow_debt_still_refuses_a_short_account(engine):
    await engine.grant("admin", "0.1", op_id="g1")
    with pytest.raises(InsufficientCredits):
        await engine.debit("admin", "0.25", op_id="d1")
    r = await engine.debit("admin", "0.1", op_id="d2")
    assert r.debt_added == 0 and r.state.debt == 0 and r.state.spent == Decimal("0.1")


async def test_ledger_with_debt_from_debits_replays_to_the_balances(engine, store):
    from gateway.worker.runner import Worker

    await engine.grant("led", "0.3", op_id="g1")
    await engine.debit("led", "0.5", op_id="d1", allow_debt=True)
    await engine.grant("led", "1", op_id="g2")  # repays 0.2
    await engine.debit("led", "2", op_id="d2", allow_debt=True)  # 0.8 covered, 1.2 debt
    await Worker(engine, store).run(burst=True)
    entries = [e async for e in store.ledger_all("led")]
    assert replay_ledger(entries) == {
        "granted": 1_300_000,
        "spent": 1_300_000,
        "expired": 0,
        "held": 0,
        "debt": 1_200_000,
    }
    assert await reconcile(engine, store) == []
