"""Subscriptions: a user on a plan, granted each period's credit exactly once.

Each period's credit is one grant with the op id `plan:<subscription>:<period>` (the trial is
period -1), priority 50 (spent before purchased credit, at 100), expiring at the period's
end unless the plan rolls over; rolled-over credit is trimmed to the plan's cap at each
renewal and expires whole when the subscription ends (lua/plan_trim.lua).

Exactly once, whatever runs it and however often:
1. A renewal is taken by a conditional update of the subscription record (`expect` the
   period it read): with several workers, one moves the subscription to the new period and
   the others find it moved.
2. The grant's terms are written into the record with the move (`grant`), before the grant
   is made, and the record stays due until the grant is marked done. A worker that dies in
   between leaves it due: the next pass makes the same grant (the same op id and terms, so
   Redis answers a replay) and marks it. Whether it happened is asked of the durable ledger
   first, which outlives Redis's memory of op ids.
3. After downtime the subscription moves straight to the period it is in now: periods that
   passed while no worker ran are not granted (their credit would already have expired) and
   are counted in `skipped_periods`. A paid plan's period is granted when its payment is paid
   (`on_paid`, called by the payment service); an unpaid period ends the subscription at the
   period's end.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from gateway.core.engine import CreditEngine
from gateway.core.money import credits_text
from gateway.core.ratelimits import set_plan_limits
from gateway.core.store.base import Store
from gateway.core.store.payments import PaymentRecord
from gateway.core.store.plans import TRIAL, PlanRecord, SubscriptionRecord
from gateway.payments.service import PaymentError, Payments

from .catalog import PlanError, Plans
from .periods import DAY_MS, bounds, period_at

log = logging.getLogger("credit.plans")

PLAN_PRIORITY = 50  # below a purchase's 100: plan credit is spent first
FIRST_PAYMENT_WINDOW_MS = DAY_MS  # a paid plan's first payment, or the subscription ends
RETRY_MS = 5 * 60_000  # a step that failed (a provider down) is tried again after this
# A period's credit (no rollover) lasts this long past the period's end, so a renewal a few
# seconds late leaves no gap; it expires before the next period's, so it is spent first.
GRACE_MS = 60_000
HISTORY = 50


class Notify(Protocol):
    def __call__(self, *, user: str, kind: str, dedup_key: str, data: dict[str, Any]) -> Awaitable[Any]: ...


def grant_op(sub_id: str, period: int) -> str:
    return f"plan:{sub_id}:{period}"


def _iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


class Subscriptions:
    def __init__(
        self,
        store: Store,
        engine: CreditEngine,
        payments: Payments | None,
        *,
        now_ms: Callable[[], int] | None = None,
        notify: Notify | None = None,
    ) -> None:
        self.store, self.engine, self.payments = store, engine, payments
        self.now_ms = now_ms or engine.now_ms
        self.plans = Plans(store, now_ms=self.now_ms)
        self.notify = notify
        if payments is not None:
            payments.on_paid = self.on_paid

    # -- starting and stopping ---------------------------------------------------------

    async def subscribe(self, user: str, body: dict[str, Any]) -> SubscriptionRecord:
        unknown = set(body) - {"plan_id", "paid", "provider"}
        if unknown:
            raise PlanError(400, "invalid_request", f"unknown fields: {sorted(unknown)}")
        paid = body.get("paid")
        if paid is not None and not isinstance(paid, bool):
            raise PlanError(400, "invalid_request", "paid is true or false")
        plan = await self.plans.get(body.get("plan_id"))
        if not plan.active:
            raise PlanError(409, "plan_inactive", "the plan takes no new subscribers")
        if plan.price_minor and paid is None:
            # Never guessed: a priced plan given away by mistake is credit nobody paid for.
            raise PlanError(
                400,
                "invalid_request",
                "paid is required for a priced plan: true (the user pays each period) "
                "or false (granted without payment)",
            )
        provider = body.get("provider")
        paid = bool(paid) and plan.price_minor > 0  # a free plan is never paid for
        if paid:
            provider = self._provider(provider)
        elif provider is not None:
            why = "the plan is free" if plan.price_minor == 0 else "the subscription is not paid"
            raise PlanError(400, "invalid_request", f"provider applies only to a paid subscription ({why})")
        now = self.now_ms()
        s = SubscriptionRecord(
            sub_id="sub_" + uuid.uuid4().hex[:20],
            user=user,
            plan_id=plan.plan_id,
            paid=paid,
            status="active",
            created_ms=now,
            updated_ms=now,
            provider=provider,
            next_action_ms=now,
        )
        if paid and plan.trial_days:
            # The trial is period -1 and granted free; the paid periods start at its end.
            s.status, s.anchor_ms = "trialing", now + plan.trial_days * DAY_MS
            s.period_start_ms, s.period_end_ms = now, s.anchor_ms
            s.grant = self._terms(plan, TRIAL, s.anchor_ms)
        elif paid:
            # The first period starts when it is paid (on_paid sets the anchor).
            s.status, s.period = "pending_payment", 0
            s.next_action_ms = now + FIRST_PAYMENT_WINDOW_MS
        else:
            s.anchor_ms, s.period = now, 0
            s.period_start_ms, s.period_end_ms = bounds(now, plan.period, 0)
            s.grant = self._terms(plan, 0, s.period_end_ms)
        s.history = [{"at": now, "event": "subscribed", "plan_id": plan.plan_id, "paid": paid}]
        try:
            await self.store.create_subscription(s)
        except KeyError:
            raise PlanError(
                409, "already_subscribed", "the user has a live subscription; cancel it first"
            ) from None
        if s.status == "pending_payment":
            return await self._open_payment(s, plan)
        return await self._grant(s, plan)

    async def adopt(
        self,
        sub_id: str,
        user: str,
        plan: PlanRecord,
        *,
        period_start_ms: int,
        valid_until_ms: int,
        provider: str | None,
        renews: bool,
        note: dict[str, Any],
    ) -> SubscriptionRecord | None:
        """A subscription carried over from another system in the middle of a period that
        system granted already (its credit comes over as a grant of its own). That period is
        -1 here, as a trial is, and the gateway's periods are anchored at its end, so the
        first renewal comes at `valid_until_ms` and grants period 0, once. Paid for through
        `provider` when the plan has a price and a provider is given; `renews` False: it ends
        at `valid_until_ms`. None when the user has a live subscription already (this one,
        imported before, or another)."""
        now = self.now_ms()
        paid = plan.price_minor > 0 and provider is not None
        s = SubscriptionRecord(
            sub_id=sub_id,
            user=user,
            plan_id=plan.plan_id,
            paid=paid,
            status="active",
            created_ms=period_start_ms,
            updated_ms=now,
            provider=provider if paid else None,
            anchor_ms=valid_until_ms,
            period=TRIAL,
            period_start_ms=period_start_ms,
            period_end_ms=valid_until_ms,
            granted_period=TRIAL,
            cancel_at_period_end=not renews,
            next_action_ms=valid_until_ms,
            history=[{"at": now, "event": "imported", "plan_id": plan.plan_id, "paid": paid, **note}],
        )
        try:
            await self.store.create_subscription(s)
        except KeyError:
            return None
        return s

    def _provider(self, name: Any) -> str:
        """The provider a paid subscription pays through, refused as /credits/payments does."""
        providers = self.payments.providers if self.payments is not None else {}
        if name is None and len(providers) == 1:
            return next(iter(providers))
        if name is None and providers:
            raise PlanError(
                400, "invalid_request", "provider is required (razorpay or stripe) when several are set up"
            )
        if name is None or self.payments is None:
            raise PlanError(
                400, "provider_not_configured", "a paid subscription needs a payment provider; none is set up"
            )
        try:
            return self.payments.provider(name).name
        except PaymentError as exc:
            raise PlanError(exc.status, exc.code, exc.message) from None

    async def cancel(self, user: str, *, at_period_end: bool) -> SubscriptionRecord:
        """At the period's end (a paid period keeps what was paid for), or now: ended, its
        plan credit expired. Another change in between (a renewal, a payment): read again."""
        for _ in range(5):
            s = await self.live(user)
            if s is None:
                raise PlanError(404, "no_subscription", "the user has no live subscription")
            if at_period_end and s.status in ("active", "trialing"):
                if s.cancel_at_period_end:
                    return s
                changed = await self._update(
                    s, {"cancel_at_period_end": True}, "cancel_requested", expect={"status": s.status}
                )
            elif s.grant is not None:
                # A grant fixed but not made yet (a subscribe or a renewal in flight) is made
                # first: ended after it, the end takes its credit back; never the reverse.
                await self._grant(s, await self.plans.get(s.plan_id))
                continue
            else:
                changed = await self._end(s, "canceled")
            if changed is not None:
                return changed
        raise PlanError(409, "busy", "the subscription kept changing; try again")

    async def update_plan(self, plan_id: Any, body: dict[str, Any]) -> PlanRecord:
        """A plan changed (plans/catalog.py); its limits and models apply to its live
        subscribers at once, the rest from their next renewal."""
        plan = await self.plans.update(plan_id, body)
        if {"requests_per_minute", "tokens_per_minute", "allowed_models"} & set(body):
            for s in await self.store.live_subscriptions():
                if s.plan_id == plan.plan_id:
                    await self._apply_limits(s.user, plan)
        return plan

    async def live(self, user: str) -> SubscriptionRecord | None:
        return next((s for s in await self.store.subscriptions_of(user) if s.live), None)

    # -- the scheduler (the worker) ----------------------------------------------------

    async def run_due(self) -> list[str]:
        """Every subscription whose time has come: renewed, granted, or ended. Safe to run
        in several workers at once. Returns a line per change."""
        lines = []
        for s in await self.store.due_subscriptions(self.now_ms()):
            try:
                line = await self.advance(s)
            except Exception as exc:
                log.exception("subscription %s of %s: not advanced; tried again later", s.sub_id, s.user)
                lines.append(f"FAILED {s.sub_id} of {s.user}: {type(exc).__name__}: {exc}")
                await self._update(s, {"next_action_ms": self.now_ms() + RETRY_MS}, None, expect={})
                continue
            if line:
                lines.append(line)
        return lines

    async def advance(self, s: SubscriptionRecord) -> str | None:
        """One step of a due subscription, from what its record says."""
        now = self.now_ms()
        if s.status == "ended":  # its plan credit and limits still to take back
            await self._wind_up(s)
            return f"{s.sub_id} of {s.user}: ended ({s.end_reason})"
        plan = await self.store.plan(s.plan_id)
        if plan is None:  # pragma: no cover - plans are never deleted
            return None
        if s.grant is not None:  # a grant fixed but not known to be made (a crash)
            await self._grant(s, plan)
            return f"{s.sub_id} of {s.user}: period {s.grant['period']} granted"
        if s.status == "pending_payment":
            if now >= s.created_ms + FIRST_PAYMENT_WINDOW_MS:
                await self._end(s, "payment_failed")
                return f"{s.sub_id} of {s.user}: first payment not made; ended"
            if not s.payment_id:
                await self._open_payment(s, plan)
            return None
        if s.period_end_ms is None or now < s.period_end_ms:
            if s.status == "past_due" and not s.payment_id:
                await self._open_payment(s, plan)  # the provider was down when it was due
            return None
        # The period is over.
        if s.cancel_at_period_end:
            await self._end(s, "canceled")
            return f"{s.sub_id} of {s.user}: canceled at the period's end"
        if s.status == "past_due":
            await self._end(s, "payment_failed")
            return f"{s.sub_id} of {s.user}: renewal not paid; ended"
        return await self._renew(s, plan, now)

    async def _renew(self, s: SubscriptionRecord, plan: PlanRecord, now: int) -> str | None:
        assert s.anchor_ms is not None
        k = max(period_at(s.anchor_ms, plan.period, now), s.period + 1)
        start, end = bounds(s.anchor_ms, plan.period, k)
        skipped = k - s.period - 1 if s.period >= 0 else k
        changes: dict[str, Any] = {
            "period": k,
            "period_start_ms": start,
            "period_end_ms": end,
            "skipped_periods": s.skipped_periods + skipped,
            "payment_id": None,
        }
        if s.paid:
            changes |= {"status": "past_due", "next_action_ms": end}
        else:
            changes |= {"status": "active", "grant": self._terms(plan, k, end), "next_action_ms": now}
        moved = await self._update(
            s, changes, "renewing", expect={"period": s.period, "status": s.status}, period=k, skipped=skipped
        )
        if moved is None:
            return None  # another worker took this renewal
        if s.paid:
            await self._open_payment(moved, plan)
            return f"{s.sub_id} of {s.user}: period {k} awaits its payment"
        await self._grant(moved, plan)
        return f"{s.sub_id} of {s.user}: period {k} granted" + (f" ({skipped} skipped)" if skipped else "")

    # -- the steps ---------------------------------------------------------------------

    def _terms(self, plan: PlanRecord, period: int, end_ms: int) -> dict[str, Any]:
        """A period's grant, fixed before it is made so a retry makes the same one."""
        return {
            "period": period,
            "credits": plan.credits,
            "expires_ms": 0 if plan.rollover else end_ms + GRACE_MS,
            "cap": plan.rollover_cap if plan.rollover else None,
        }

    async def _grant(self, s: SubscriptionRecord, plan: PlanRecord) -> SubscriptionRecord:
        g = s.grant
        if g is None:
            return s
        k = int(g["period"])
        op = grant_op(s.sub_id, k)
        await self._apply_limits(s.user, plan)  # the plan's limits as they are now
        if not await self.store.ledger_has(s.user, op):
            if g["cap"] is not None and k > TRIAL:
                await self.engine.trim_plan_credit(
                    s.user,
                    op_id=f"{op}:trim",
                    subscription=s.sub_id,
                    before_period=k,
                    cap_units=int(g["cap"]),
                )
            expires = int(g["expires_ms"])
            await self.engine.grant_units(
                s.user,
                int(g["credits"]),
                op_id=op,
                source="plan",
                expires_at=datetime.fromtimestamp(expires / 1000, UTC) if expires else None,
                priority=PLAN_PRIORITY,
                metadata={"subscription": s.sub_id, "period": k, "plan": s.plan_id},
            )
        status = "trialing" if k == TRIAL else "active"
        done = await self._update(
            s,
            {"grant": None, "granted_period": k, "status": status, "next_action_ms": s.period_end_ms},
            "granted",
            expect={"period": s.period, "grant": g},
            period=k,
            credits=credits_text(int(g["credits"])),
        )
        return done or (await self.store.subscription(s.sub_id)) or s

    async def _open_payment(self, s: SubscriptionRecord, plan: PlanRecord) -> SubscriptionRecord:
        """The payment for the subscription's current period (a provider that fails now is
        asked again by the scheduler)."""
        if self.payments is None or s.provider is None:
            await self._end(s, "payment_failed")
            return (await self.store.subscription(s.sub_id)) or s
        purpose = f"subscription:{s.sub_id}:{s.period}"
        try:
            p = await self.payments.create_for(
                s.user,
                s.provider,
                plan.price_minor,
                plan.currency,
                plan.credits,
                f"{plan.name} ({plan.period})",
                purpose,
            )
        except PaymentError as exc:
            log.warning("subscription %s: its payment could not be opened: %s", s.sub_id, exc.message)
            retry = self.now_ms() + RETRY_MS
            out = await self._update(s, {"next_action_ms": retry}, None, expect={"period": s.period})
            return out or s
        # Looked at again when the payment is due: unpaid by then, the subscription ends.
        due = s.created_ms + FIRST_PAYMENT_WINDOW_MS if s.status == "pending_payment" else s.period_end_ms
        out = await self._update(
            s,
            {"payment_id": p.payment_id, "next_action_ms": due},
            "payment_opened",
            expect={"period": s.period},
            payment_id=p.payment_id,
        )
        return out or s

    async def on_paid(self, p: PaymentRecord) -> bool:
        """A paid payment with a subscription purpose: its period granted as plan credit.
        False when the payment pays for nothing the subscription still waits for (a second
        payment, or one paid after the subscription ended): it is credited as a top-up."""
        kind, _, rest = (p.purpose or "").partition(":")
        sub_id, _, period = rest.rpartition(":")
        if kind != "subscription" or not sub_id:
            return False
        k = int(period)
        if await self.store.ledger_has(p.user, grant_op(sub_id, k)):
            return True  # credited as plan credit before
        for _ in range(3):
            s = await self.store.subscription(sub_id)
            if s is None or s.user != p.user or s.period != k or s.granted_period == k:
                return False
            if s.grant is not None:
                await self._grant(s, await self.plans.get(s.plan_id))
                return True
            if s.status not in ("pending_payment", "past_due"):
                return False
            plan = await self.plans.get(s.plan_id)
            now = self.now_ms()
            changes: dict[str, Any] = {"status": "active", "payment_id": p.payment_id, "next_action_ms": now}
            if s.status == "pending_payment":
                changes |= {"anchor_ms": now, "period_start_ms": now}
                changes["period_end_ms"] = bounds(now, plan.period, 0)[1]
            end = changes.get("period_end_ms", s.period_end_ms)
            assert end is not None  # a paid period always has its bounds
            changes["grant"] = self._terms(plan, k, end)
            moved = await self._update(
                s, changes, "paid", expect={"period": k, "status": s.status}, payment_id=p.payment_id
            )
            if moved is not None:
                await self._grant(moved, plan)
                return True
        return False

    async def _end(self, s: SubscriptionRecord, reason: str) -> SubscriptionRecord | None:
        now = self.now_ms()
        changes = {
            "status": "ended",
            "ended_ms": now,
            "end_reason": reason,
            "next_action_ms": now,
        }
        # Only with no grant pending: one made after the end would escape its wind-up.
        ended = await self._update(
            s, changes, "ended", expect={"status": s.status, "grant": None}, reason=reason
        )
        if ended is None:
            return None
        return await self._wind_up(ended)

    async def _wind_up(self, s: SubscriptionRecord) -> SubscriptionRecord:
        """An ended subscription's plan credit expired, its plan limits removed, and its
        notifications recorded; the record stays due until all is done (each step may run
        again: the trim's op id, the notifications' dedup keys)."""
        await self.engine.trim_plan_credit(
            s.user,
            op_id=f"plan:{s.sub_id}:end",
            subscription=s.sub_id,
            before_period=max(s.period, TRIAL) + 1,
            cap_units=0,
        )
        await set_plan_limits(self.engine.redis, self.engine.keys, self.store, s.user, None, None, None)
        if self.notify is not None:
            data = {"subscription": s.sub_id, "plan_id": s.plan_id, "reason": s.end_reason}
            kinds = ["subscription_renewal_failed"] if s.end_reason == "payment_failed" else []
            for kind in [*kinds, "subscription_ended"]:
                await self.notify(user=s.user, kind=kind, dedup_key=f"{kind}:{s.user}:{s.sub_id}", data=data)
        done = await self._update(s, {"next_action_ms": None}, None, expect={"status": "ended"})
        return done or s

    async def _apply_limits(self, user: str, plan: PlanRecord) -> None:
        await set_plan_limits(
            self.engine.redis,
            self.engine.keys,
            self.store,
            user,
            plan.requests_per_minute,
            plan.tokens_per_minute,
            plan.allowed_models,
        )

    async def _update(
        self,
        s: SubscriptionRecord,
        changes: dict[str, Any],
        event: str | None,
        *,
        expect: dict[str, Any],
        **detail: Any,
    ) -> SubscriptionRecord | None:
        now = self.now_ms()
        changes = {**changes, "updated_ms": now}
        if event is not None:
            changes["history"] = [*s.history, {"at": now, "event": event, **detail}][-HISTORY:]
        return await self.store.update_subscription(s.sub_id, changes, expect={"rev": s.rev, **expect})

    # -- views -------------------------------------------------------------------------

    async def view(self, s: SubscriptionRecord) -> dict[str, Any]:
        plan = await self.store.plan(s.plan_id)
        payment = await self.store.payment(s.payment_id) if s.payment_id else None
        waiting = s.status in ("pending_payment", "past_due") and payment is not None
        return {
            "id": s.sub_id,
            "user_id": s.user,
            "plan": None if plan is None else Plans.view(plan),
            "status": s.status,
            "paid": s.paid,
            "provider": s.provider,
            "period": s.period,
            "current_period_start": _iso(s.period_start_ms),
            "current_period_end": _iso(s.period_end_ms),
            "cancel_at_period_end": s.cancel_at_period_end,
            "payment": None
            if payment is None
            else {
                "id": payment.payment_id,
                "status": payment.status,
                "url": payment.url if waiting else None,
            },
            "skipped_periods": s.skipped_periods,
            "created_at": _iso(s.created_ms),
            "ended_at": _iso(s.ended_ms),
            "end_reason": s.end_reason,
            "history": [{**h, "at": _iso(h["at"])} for h in s.history],
        }
