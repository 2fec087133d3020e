"""Carrying out an import plan through the gateway's services, each write once.

Whether a write was made is asked first, of the durable record where the gateway keeps
one (the ledger, which outlives Redis's memory of operation ids; the payment, plan,
subscription and promo records) and of Redis for a grant it remembers but the worker has
not stored yet; then the write itself is idempotent (the same op id is a replay, the same
record id is refused), so a run stopped anywhere and run again completes each write once.
A dry run asks the same questions and writes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from gateway.core.engine import CreditEngine
from gateway.core.errors import InvalidExpiry
from gateway.core.store.base import Store
from gateway.core.store.payments import WebhookEvent
from gateway.payments.service import Payments
from gateway.plans.catalog import PlanError
from gateway.plans.subscriptions import Subscriptions
from gateway.promos import PromoError, Promos

from .plan import ORIGIN, Account, ImportPlan, PaymentStep, PlanStep, PromoStep, SubscriptionStep
from .report import Report

log = logging.getLogger("credit.migrate")


@dataclass
class Target:
    """The gateway as configured: its engine, store and selling services."""

    engine: CreditEngine
    store: Store
    payments: Payments
    promos: Promos
    subscriptions: Subscriptions


class Writer:
    def __init__(
        self,
        target: Target,
        report: Report,
        *,
        dry_run: bool,
        credit_uncredited: bool,
        subscription_provider: str | None,
    ) -> None:
        self.t, self.report = target, report
        self.dry_run, self.credit_uncredited = dry_run, credit_uncredited
        self.provider = subscription_provider  # priced plans' renewals are paid through it

    async def write(self, plan: ImportPlan) -> None:
        # Plans before the subscriptions on them; balances before payments, so that a
        # payment credited now does not make its account look carried over already.
        for p in plan.plans:
            await self.plan(p)
        for s in plan.subscriptions:
            await self.subscription(s)
        for a in plan.accounts:
            await self.account(a)
        for pay in plan.payments:
            await self.payment(pay)
        for promo in plan.promos:
            await self.promo(promo)

    async def _done(self, user: str, op_id: str) -> bool:
        return await self.t.engine.remembered(user, op_id) is not None or await self.t.store.ledger_has(
            user, op_id
        )

    # -- plans and subscriptions ----------------------------------------------------------

    async def plan(self, step: PlanStep) -> None:
        plans = self.t.subscriptions.plans
        try:
            plans.build(step.plan_id, step.body, step.created_ms)  # refused here as it would be there
        except PlanError as exc:
            self.report.defect(
                "malformed", exc.message, collection="credit_subscription_plans", doc_id=step.source_id
            )
            return
        if await self.t.store.plan(step.plan_id) is not None:
            self.report.count("plans", "already imported")
        elif self.dry_run or await plans.adopt(step.plan_id, step.body, created_ms=step.created_ms):
            self.report.count("plans", "imported")
        else:
            self.report.count("plans", "already imported")

    async def subscription(self, step: SubscriptionStep) -> None:
        if await self.t.store.subscription(step.sub_id) is not None:
            self.report.count("subscriptions", "already imported")
            return
        plan = await self.t.store.plan(step.plan_id)
        if plan is None and not self.dry_run:
            self._sub_defect(step, "plan_not_imported", f"plan {step.source_plan!r}")
            return
        live = [s for s in await self.t.store.subscriptions_of(step.user) if s.live]
        made = None
        if not live and not self.dry_run and plan is not None:
            made = await self.t.subscriptions.adopt(
                step.sub_id,
                step.user,
                plan,
                period_start_ms=step.period_start_ms,
                valid_until_ms=step.valid_until_ms,
                provider=self.provider,
                renews=step.renews,
                note=step.note,
            )
        if made is not None or (self.dry_run and not live):
            self.report.count("subscriptions", "imported")
            return
        other = live[0].sub_id if live else "made meanwhile"
        self._sub_defect(step, "subscription_conflict", f"live subscription {other} in the gateway")
        self.report.count("subscriptions", "skipped")

    def _sub_defect(self, step: SubscriptionStep, kind: str, message: str) -> None:
        self.report.defect(
            kind, message, collection="credit_user_subscriptions", doc_id=step.source_id, user=step.user
        )

    # -- accounts ---------------------------------------------------------------------------

    async def account(self, a: Account) -> None:
        done = [await self._done(a.user, g.op_id) for g in a.grants]
        if a.grants and not any(done):
            state = await self.t.engine.balance(a.user)
            if state.granted_units or state.held_units or state.debt_units:
                self.report.defect(
                    "account_exists",
                    f"available {state.available}, granted {state.granted} before this import",
                    user=a.user,
                )
                self.report.count("balances", "skipped")
                return
        wrote = False
        for g, was in zip(a.grants, done, strict=True):
            section = "grants with expiry" if g.expires_ms else "grants without expiry"
            if was:
                self.report.count(section, "already imported")
                continue
            expires = datetime.fromtimestamp(g.expires_ms / 1000, UTC) if g.expires_ms else None
            if self.dry_run:
                self.report.count(section, "imported", units=g.units)
                wrote = True
                continue
            try:
                r = await self.t.engine.grant_units(
                    a.user,
                    g.units,
                    op_id=g.op_id,
                    source=g.source,
                    expires_at=expires,
                    priority=g.priority,
                    metadata=g.metadata,
                )
            except InvalidExpiry:
                self.report.defect("expiry_passed", f"{g.op_id} expired at {expires}", user=a.user)
                self.report.count(section, "skipped")
                continue
            self.report.count(section, "already imported" if r.replayed else "imported", units=g.units)
            wrote = wrote or not r.replayed
        if not a.grants:
            self.report.count("zero balances (nothing to write)", "skipped")
        else:
            self.report.count("balances", "imported" if wrote else "already imported")

    # -- payments ---------------------------------------------------------------------------

    async def payment(self, step: PaymentStep) -> None:
        p = step.record
        stored = await self.t.store.payment(p.payment_id)
        if stored is None and not self.dry_run:
            try:
                await self.t.store.create_payment(p)
            except KeyError:
                stored = await self.t.store.payment(p.payment_id)
            else:
                self.report.count("payments", "imported")
        elif stored is None:
            self.report.count("payments", "imported")
        if stored is not None:
            self.report.count("payments", "already imported")
        if not self.dry_run:
            await self._keep_document(step)
        if not step.uncredited:
            return
        current = stored or p
        if not self.credit_uncredited:
            if current.credited_ms is None:
                self.report.count("uncredited payments held", "already imported" if stored else "imported")
        elif current.credits <= 0:
            self.report.count("uncredited payments credited", "skipped")
        elif current.credited_ms is None and (self.dry_run or await self.t.payments.release(current)):
            self.report.count("uncredited payments credited", "imported", units=current.credits)
        else:
            self.report.count("uncredited payments credited", "already imported")

    async def _keep_document(self, step: PaymentStep) -> None:
        """The source document, unknown fields and all, as the payment's first event."""
        p = step.record
        await self.t.store.record_webhook_event(
            WebhookEvent(
                provider=p.provider,
                event_id=f"import:{ORIGIN}:{p.payment_id}",
                type=f"{ORIGIN}.import",
                received_ms=self.t.engine.now_ms(),
                body=step.document,
                payment_id=p.payment_id,
                outcome="imported",
            )
        )

    # -- promo codes ------------------------------------------------------------------------

    async def promo(self, step: PromoStep) -> None:
        promos = self.t.promos
        try:
            promos.build(step.body, created_ms=step.created_ms)
        except PromoError as exc:
            self.report.defect("malformed", f"code {step.code}: {exc.message}", collection="promos")
            return
        p = await self.t.store.promo(step.code)
        if p is None and self.dry_run:
            self.report.count("promo codes", "imported")
            self.report.count("promo claims", "imported", len(step.claims))
            return
        if p is None:
            p = await promos.import_code(step.body, created_ms=step.created_ms)
            if p is not None:
                self.report.count("promo codes", "imported")
            else:
                p = await self.t.store.promo(step.code)
        else:
            self.report.count("promo codes", "already imported")
        if p is None or p.imported_ms is None:
            self.report.defect(
                "code_exists", f"{step.code}: {len(step.claims)} claims not counted", collection="promos"
            )
            self.report.count("promo claims", "skipped", len(step.claims))
            return
        if self.dry_run:
            known = {(u, n) for u, n, _ in await self.t.store.promo_claims(p.code)}
            new = len([c for c in step.claims if c not in known])
        else:
            new = await promos.import_claims(p, step.claims)
        self.report.count("promo claims", "imported", new)
        self.report.count("promo claims", "already imported", len(step.claims) - new)
