"""Selling credits: payments created through a provider, credited from verified webhooks,
refunded, and reconciled.

Credited exactly once, for the life of the deployment:
1. The durable payment record decides, not Redis: a payment is credited only by moving it
   to paid (a conditional update only one delivery wins) and then granting with the op id
   `payment:<payment id>`, and marking `credited_ms` once the grant is known to exist.
2. A delivery (any event id, any process) that finds the payment paid but not credited
   completes the crediting; one that finds it credited changes nothing, however long after.
3. "Is the grant there?" is asked of the durable ledger first (it outlives Redis's memory
   of op ids), then by granting with the same op id (Redis answers a replay while it
   remembers), so a crash between the paid mark and the grant is finished once.
Refunds follow the same pattern: recorded once per provider refund id, then a debit with
the op id `refund:<provider>:<refund id>` that may leave the account in debt.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.core.engine import CreditEngine
from gateway.core.money import MAX_UNITS, credits_text
from gateway.core.store.base import Store
from gateway.core.store.payments import (
    PAID_STATES,
    PaymentAnomaly,
    PaymentRecord,
    RefundRecord,
    WebhookEvent,
    sources_of,
)
from gateway.notifications import Notifier

from .catalog import Catalog, CatalogError, from_minor, to_minor
from .lock import Busy, payment_lease
from .providers import Provider, ProviderError, ProviderEvent, WebhookRefused

log = logging.getLogger("credit.payments")

MAX_WEBHOOK_BODY = 256 * 1024
# The purpose of a paid payment that is credited only when an admin says so: one carried
# over from another system that took the money and never credited it (gateway/migrate).
# Reconciliation and webhooks leave it as it is.
HELD = "held"


@dataclass
class WebhookAnswer:
    status: int
    body: dict[str, Any]


class PaymentError(Exception):
    """A request the payment service refuses: `code` and HTTP `status` for the API."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        # invalid_amount is 422 across the API; other refusals of a request are 400.
        self.code, self.message = code, message
        self.status = status if status is not None else (422 if code == "invalid_amount" else 400)


def new_payment_id() -> str:
    return "cgpay_" + uuid.uuid4().hex  # 38 characters: within Razorpay's 40 for reference_id


class Payments:
    def __init__(
        self,
        store: Store,
        engine: CreditEngine,
        catalog: Catalog,
        providers: Mapping[str, Provider],
        *,
        now_ms: Callable[[], int] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.store, self.engine, self.catalog = store, engine, catalog
        self.providers = dict(providers)
        self.now_ms = now_ms or (lambda: int(time.time() * 1000))
        # Who credits a paid payment that has a purpose (the subscriptions): True when it
        # did; False leaves the payment to be credited as a top-up (nothing paid is lost).
        self.on_paid: Callable[[PaymentRecord], Awaitable[bool]] | None = None
        self.notifier = notifier or Notifier(store, now_ms=self.now_ms)

    def provider(self, name: Any) -> Provider:
        if name not in ("razorpay", "stripe"):
            raise PaymentError("unknown_provider", "provider must be razorpay or stripe")
        prov = self.providers.get(name)
        if prov is None:
            raise PaymentError("provider_not_configured", f"payments through {name} are not configured")
        return prov

    # -- creating ------------------------------------------------------------------------

    async def create(
        self,
        user: str,
        *,
        provider: Any,
        amount: Any = None,
        currency: Any = None,
        pack: Any = None,
        description: Any = None,
    ) -> PaymentRecord:
        prov = self.provider(provider)
        if (pack is None) == (amount is None):
            raise PaymentError("invalid_request", "give either amount (with currency) or pack")
        if pack is None and currency is None:
            raise PaymentError("invalid_request", 'currency is required with amount (e.g. "INR")')
        try:
            if pack is not None:
                pk = self.catalog.pack(pack)
                minor, cur, credits, pack_name = pk.amount_minor, pk.currency, pk.credits, pk.name
            else:
                minor, cur, credits = self.catalog.price(amount, currency)
                pack_name = None
        except CatalogError as exc:
            raise PaymentError("invalid_amount", str(exc)) from None
        if credits <= 0:
            raise PaymentError("invalid_amount", "the amount buys less than one micro-credit")
        if credits > MAX_UNITS:
            raise PaymentError("invalid_amount", "one payment buys at most 1,000,000,000 credits")
        if description is not None and not isinstance(description, str):
            raise PaymentError("invalid_request", "description must be a string")
        return await self._open(prov, user, minor, cur, credits, pack_name, description or "Credit top-up")

    async def create_for(
        self,
        user: str,
        provider: Any,
        amount_minor: int,
        currency: str,
        credits: int,
        description: str,
        purpose: str,
    ) -> PaymentRecord:
        """A payment at a set price for something other than a top-up (`purpose`, e.g. a
        subscription's period: see `on_paid`), through `provider`."""
        return await self._open(
            self.provider(provider), user, amount_minor, currency, credits, None, description, purpose
        )

    async def _open(
        self,
        prov: Provider,
        user: str,
        minor: int,
        cur: str,
        credits: int,
        pack_name: str | None,
        description: str,
        purpose: str | None = None,
    ) -> PaymentRecord:
        now = self.now_ms()
        p = PaymentRecord(
            payment_id=new_payment_id(),
            user=user,
            provider=prov.name,
            amount_minor=minor,
            currency=cur,
            credits=credits,
            status="created",
            created_ms=now,
            updated_ms=now,
            pack=pack_name,
            description=description[:200],
            purpose=purpose,
        )
        await self.store.create_payment(p)
        try:
            checkout = await prov.create(p)
        except ProviderError as exc:
            failed: dict[str, Any] = {"error": str(exc)[:500], "updated_ms": self.now_ms()}
            if exc.refused:  # no link or session exists: nothing can pay this attempt
                failed["status"] = "failed"
            moved = await self.store.update_payment(p.payment_id, failed, from_status=("created",))
            if moved and exc.refused:
                p.error = failed["error"]
                await self._failed(p)
            log.warning("payment %s: %s", p.payment_id, exc)
            if exc.refused:  # the request as made is wrong for the provider (its minimum...)
                raise PaymentError("provider_refused", str(exc)[:300], 422) from None
            raise PaymentError(
                "provider_unavailable", f"{prov.name} did not create the payment", 502
            ) from None
        changes = {
            "url": checkout.url,
            "link_id": checkout.link_id,
            "session_id": checkout.session_id,
            "order_id": checkout.order_id,
            "updated_ms": self.now_ms(),
        }
        await self.store.update_payment(p.payment_id, changes)
        for k, v in changes.items():
            setattr(p, k, v)
        return p

    # -- webhooks --------------------------------------------------------------------------

    async def webhook(self, provider: str, body: bytes, headers: Mapping[str, str]) -> WebhookAnswer:
        """One delivery: verified over the raw bytes, deduplicated by the provider's event
        id, applied by the payment's own state. Fast: store and Redis calls only."""
        prov = self.providers.get(provider)
        if prov is None:
            return WebhookAnswer(401, {"error": "provider_not_configured"})
        try:
            prov.verify(body, headers)
        except WebhookRefused as exc:
            log.warning("%s webhook refused: %s", provider, exc)
            return WebhookAnswer(401, {"error": "signature_refused"})
        try:
            ev = prov.parse(body, headers)
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("%s webhook: a signed body that is not an event (%s)", provider, exc)
            return WebhookAnswer(400, {"error": "malformed_event"})
        record = WebhookEvent(
            provider=provider,
            event_id=ev.event_id,
            type=ev.type,
            received_ms=self.now_ms(),
            body=body.decode("utf-8", "replace"),
            payment_id=ev.payment_ref,
        )
        seen = await self.store.record_webhook_event(record)
        if seen is not None and seen.body != record.body:
            # Event ids are the provider's and unique: the same id with another body is not
            # a redelivery. Nothing is applied; it is recorded.
            await self._anomaly(prov, ev, None, "event_id_reused", first_type=seen.type)
            return WebhookAnswer(200, {"status": "anomaly"})
        if seen is not None and seen.outcome != "received" and seen.status_code < 500:
            # Delivered before and finished: the first answer again, nothing applied twice.
            # (One answered 5xx asked the provider to come back: it is applied now.)
            return WebhookAnswer(seen.status_code, {"status": "duplicate", "outcome": seen.outcome})
        # New, or a delivery that never finished (a crash): applying it again is safe.
        outcome, status, pid = await self._apply(prov, ev)
        await self.store.finish_webhook_event(provider, ev.event_id, outcome, status, pid)
        return WebhookAnswer(status, {"status": outcome})

    async def _find(self, prov: Provider, ev: ProviderEvent) -> PaymentRecord | None:
        if ev.payment_ref:  # the event names its payment: that one, or none
            p = await self.store.payment(ev.payment_ref)
            return p if p is not None and p.provider == prov.name else None
        if ev.provider_payment_id:
            return await self.store.payment_by_provider_id(prov.name, ev.provider_payment_id)
        return None

    async def _anomaly(
        self, prov: Provider, ev: ProviderEvent, p: PaymentRecord | None, kind: str, **detail: Any
    ) -> None:
        await self.store.add_anomaly(
            PaymentAnomaly(
                payment_id=p.payment_id if p else ev.payment_ref,
                provider=prov.name,
                event_id=ev.event_id,
                kind=kind,
                detail={"event_type": ev.type, **detail},
                at_ms=self.now_ms(),
            )
        )
        log.warning("payment %s: %s %s (%s)", p.payment_id if p else ev.payment_ref, kind, detail, ev.type)

    async def _apply(self, prov: Provider, ev: ProviderEvent) -> tuple[str, int, str | None]:
        if ev.kind == "ignored":
            return "ignored", 200, ev.payment_ref
        p = await self._find(prov, ev)
        if p is None:
            if not ev.payment_ref and ev.kind in ("paid", "failed"):
                # A payment event that names no payment of ours (Razorpay's payment.* events
                # for a link carry the link's ids only on its own events): the link's event
                # decides; a failure changes no money.
                return "ignored", 200, None
            await self._anomaly(prov, ev, None, "unknown_payment", provider_payment_id=ev.provider_payment_id)
            return "anomaly", 200, ev.payment_ref
        mismatch = self._mismatch(p, ev)
        if mismatch is not None:
            # Refused and recorded; answered 2xx all the same: a redelivery would not match
            # either, and a provider that keeps seeing errors disables the webhook.
            await self._anomaly(prov, ev, p, mismatch[0], **mismatch[1])
            return "anomaly", 200, p.payment_id
        if ev.kind == "paid":
            if ev.provider_payment_id and not p.provider_payment_id:
                holder = await self.store.payment_by_provider_id(prov.name, ev.provider_payment_id)
                if holder is not None and holder.payment_id != p.payment_id:
                    detail = {"provider_payment_id": ev.provider_payment_id, "held_by": holder.payment_id}
                    await self._anomaly(prov, ev, p, "provider_payment_id_reused", **detail)
                    return "anomaly", 200, p.payment_id
            await self._paid(p, ev)
        elif ev.kind == "refund":
            outcome, status = await self._refunded(prov, p, ev)
            return outcome, status, p.payment_id
        else:
            changes: dict[str, Any] = {"status": ev.kind, "updated_ms": self.now_ms()}
            if ev.error:
                changes["error"] = ev.error
            moved = await self.store.update_payment(p.payment_id, changes, from_status=sources_of(ev.kind))
            # Recorded when this delivery moved it, and again (the dedup key keeps one) when
            # it was failed already: a delivery cut between the move and the record.
            if ev.kind == "failed" and (moved or p.status == "failed"):
                p.error = ev.error or p.error
                await self._failed(p)
        return "applied", 200, p.payment_id

    async def _failed(self, p: PaymentRecord) -> None:
        """The payment_failed notification (once per payment: a failed payment moves on only
        to paid, expired or cancelled)."""
        await self.notifier.record(
            user=p.user,
            kind="payment_failed",
            dedup_key=f"payment_failed:{p.payment_id}",
            data={
                "payment_id": p.payment_id,
                "provider": p.provider,
                "amount": str(from_minor(p.amount_minor, p.currency)),
                "currency": p.currency,
                "credits": credits_text(p.credits),
                "error": p.error,
            },
        )

    @staticmethod
    def _mismatch(p: PaymentRecord, ev: ProviderEvent) -> tuple[str, dict[str, Any]] | None:
        if ev.user is not None and ev.user != p.user:
            return "user_mismatch", {"expected": p.user, "got": ev.user}
        for field in ("link_id", "session_id", "provider_payment_id"):
            ours, theirs = getattr(p, field), getattr(ev, field)
            if ours and theirs and ours != theirs:
                return f"{field}_mismatch", {"expected": ours, "got": theirs}
        if ev.currency is not None and ev.currency.upper() != p.currency:
            return "currency_mismatch", {"expected": p.currency, "got": ev.currency}
        if ev.kind == "paid" and ev.amount_minor is not None and ev.amount_minor != p.amount_minor:
            return "amount_mismatch", {"expected": p.amount_minor, "got": ev.amount_minor}
        if ev.kind == "paid" and ev.amount_minor is None:
            return "amount_missing", {"expected": p.amount_minor}
        return None

    async def _paid(self, p: PaymentRecord, ev: ProviderEvent) -> None:
        now = self.now_ms()
        changes: dict[str, Any] = {"status": "paid", "paid_ms": now, "updated_ms": now, "error": None}
        for k in ("provider_payment_id", "order_id", "link_id", "session_id"):
            v = getattr(ev, k)
            if v and not getattr(p, k):
                changes[k] = v
        if await self.store.update_payment(p.payment_id, changes, from_status=sources_of("paid")):
            for k, v in changes.items():
                setattr(p, k, v)
        else:
            fresh = await self.store.payment(p.payment_id)
            if fresh is None or fresh.status not in PAID_STATES:
                return  # no status refuses "paid" today; kept should one ever do
            p = fresh  # paid by another delivery: credit it if that one has not yet
        await self.credit(p)

    async def credit(self, p: PaymentRecord) -> bool:
        """Grants a paid payment's credits unless it is known to be credited; marks it.
        True when this call marked it."""
        if p.credited_ms is not None or p.status not in PAID_STATES or p.purpose == HELD:
            return False
        op = f"payment:{p.payment_id}"
        if p.purpose and self.on_paid is not None and await self.on_paid(p):
            pass  # credited as what it paid for
        elif not await self.store.ledger_has(p.user, op):
            await self.engine.grant_units(
                p.user,
                p.credits,
                op_id=op,
                source="payment",
                metadata={"payment_id": p.payment_id, "provider": p.provider},
            )
        return await self.store.update_payment(
            p.payment_id, {"credited_ms": self.now_ms()}, unset="credited_ms"
        )

    async def release(self, p: PaymentRecord) -> bool:
        """Credits a payment held for an admin (HELD) as any paid payment; True when this
        call marked it credited."""
        if p.purpose == HELD:
            await self.store.update_payment(p.payment_id, {"purpose": None, "updated_ms": self.now_ms()})
            p.purpose = None
        return await self.credit(p)

    # -- refunds ---------------------------------------------------------------------------

    async def _refunded(self, prov: Provider, p: PaymentRecord, ev: ProviderEvent) -> tuple[str, int]:
        """Applies the event's refunds, taking turns with other deliveries for the same
        payment (each reads the refunds so far and writes new totals)."""
        if p.status not in PAID_STATES:
            # Delivered before the payment's own paid event (any order is possible): answered
            # 503 so the provider delivers it again, by when the payment is paid.
            return "not_yet_paid", 503
        try:
            async with payment_lease(self.engine, p.payment_id):
                outcome = "applied"
                for r in ev.refunds:
                    total = ev.refunded_total_minor
                    fits = await self.apply_refund(
                        prov.name, p.payment_id, r.refund_id, r.amount_minor, total
                    )
                    if not fits:
                        detail = {"refund_id": r.refund_id, "amount": r.amount_minor, "cumulative": total}
                        await self._anomaly(prov, ev, p, "refund_exceeds_payment", **detail)
                        outcome = "anomaly"
                return outcome, 200
        except Busy:
            return "busy", 503  # the provider delivers it again

    async def apply_refund(
        self, provider: str, payment_id: str, refund_id: str, amount_minor: int, cumulative: int | None = None
    ) -> bool:
        """Records one refund (once per provider refund id), debits its share of the credits
        and writes the payment's totals. `cumulative`: the event gives only the total
        refunded so far, and the refund is what it adds. False when the refund does not fit
        the payment (nothing is taken); the caller holds the payment's lease."""
        p = await self.store.payment(payment_id)
        if p is None:
            return False
        earlier = await self.store.refunds(payment_id)
        rec = next((x for x in earlier if x.refund_id == refund_id), None)
        if rec is None:
            before = sum(x.amount_minor for x in earlier)
            amount = cumulative - before if cumulative is not None else amount_minor
            if cumulative is not None and cumulative >= 0 and amount <= 0:
                return True  # already taken back by earlier events
            if amount <= 0 or before + amount > p.amount_minor:
                return False
            after, taken = before + amount, sum(x.credits for x in earlier)
            # Credits in proportion to the amount refunded so far, rounded down; the refund
            # that completes the payment takes what rounding left.
            credits = (p.credits if after == p.amount_minor else p.credits * after // p.amount_minor) - taken
            rec = RefundRecord(provider, refund_id, payment_id, amount, credits, self.now_ms())
            rec = await self.store.add_refund(rec) or rec
        await self._debit_refund(p, rec)
        # Under the lease no other refund of this payment was added meanwhile.
        refunds = [*earlier, rec] if all(x.refund_id != rec.refund_id for x in earlier) else earlier
        total = sum(x.amount_minor for x in refunds)
        status = "refunded" if total >= p.amount_minor else "partially_refunded"
        await self.store.update_payment(
            payment_id,
            {
                "status": status,
                "refunded_minor": total,
                "refunded_credits": sum(x.credits for x in refunds),
                "updated_ms": self.now_ms(),
            },
            from_status=sources_of(status),
        )
        return True

    async def _debit_refund(self, p: PaymentRecord, r: RefundRecord) -> None:
        if r.debited_ms is not None or r.credits <= 0:
            if r.debited_ms is None:
                await self.store.mark_refund_debited(r.provider, r.refund_id, self.now_ms())
            return
        op = f"refund:{r.provider}:{r.refund_id}"
        if not await self.store.ledger_has(p.user, op):
            await self.engine.debit_units(
                p.user,
                r.credits,
                op_id=op,
                metadata={"payment_id": p.payment_id, "refund_id": r.refund_id},
                allow_debt=True,  # what was already spent becomes debt
            )
        await self.store.mark_refund_debited(r.provider, r.refund_id, self.now_ms())

    async def request_refund(self, payment_id: str, amount: Any = None) -> dict[str, Any]:
        """Asks the provider for a refund; the credits come back out when its webhook arrives."""
        p = await self.store.payment(payment_id)
        if p is None:
            raise PaymentError("not_found", "no such payment", 404)
        if p.status not in ("paid", "partially_refunded"):
            raise PaymentError("not_refundable", f"a {p.status} payment cannot be refunded", 409)
        left = p.amount_minor - p.refunded_minor
        if amount is None:
            minor = left
        else:
            try:
                minor = to_minor(amount, p.currency)
            except CatalogError as exc:
                raise PaymentError("invalid_amount", str(exc)) from None
        if not 0 < minor <= left:
            raise PaymentError(
                "invalid_amount", f"at most {from_minor(left, p.currency)} {p.currency} is left to refund"
            )
        prov = self.provider(p.provider)
        key = f"refund-{p.payment_id}-{p.refunded_minor}-{minor}"
        try:
            refund_id = await prov.refund(p, minor, key)
        except ProviderError as exc:
            raise PaymentError("provider_error", str(exc)[:300], 502) from None
        return {
            "payment_id": p.payment_id,
            "refund_id": refund_id,
            "amount": str(from_minor(minor, p.currency)),
            "currency": p.currency,
            "status": "requested",
        }

    # -- reconciliation --------------------------------------------------------------------

    async def _reconcile_one(self, p: PaymentRecord) -> str | None:
        if p.status in PAID_STATES:
            if await self.credit(p):
                return f"{p.payment_id}: credited {credits_text(p.credits)} credits to {p.user}"
            return None
        prov = self.providers.get(p.provider)
        if prov is None:
            return None
        try:
            ev = await prov.lookup(p)
        except ProviderError as exc:
            log.warning("reconcile %s: %s", p.payment_id, exc)
            return None
        if ev is None:
            return None
        outcome, _, _ = await self._apply(prov, ev)
        fresh = await self.store.payment(p.payment_id)
        if fresh is not None and fresh.status != p.status:
            return f"{p.payment_id}: {p.status} -> {fresh.status} ({outcome})"
        return None

    async def reconcile(self, older_than_ms: int) -> list[str]:
        """Completes what a crash or a lost webhook left half done: paid payments not
        credited, recorded refunds not debited, and payments still open that the provider
        says are paid, expired or cancelled. Returns a line per change, and a line starting
        with "FAILED" per payment or refund it could not settle (kept as the payment's error)."""
        changed: list[str] = []
        cutoff = self.now_ms() - older_than_ms
        for p in await self.store.payments_to_reconcile(cutoff):
            try:
                line = await self._reconcile_one(p)
            except Exception as exc:
                # One payment that cannot be settled holds up no other; its error is kept.
                log.exception("reconcile: payment %s failed; left for the next run", p.payment_id)
                error = f"reconcile: {type(exc).__name__}: {exc}"[:500]
                await self.store.update_payment(p.payment_id, {"error": error})
                changed.append(f"FAILED {p.payment_id}: {error}")
                continue
            if line:
                changed.append(line)

        for r in await self.store.refunds_to_reconcile(cutoff):
            try:
                async with payment_lease(self.engine, r.payment_id):
                    await self.apply_refund(r.provider, r.payment_id, r.refund_id, r.amount_minor)
            except Exception as exc:
                log.exception("reconcile: refund %s of %s failed; left for later", r.refund_id, r.payment_id)
                changed.append(f"FAILED {r.payment_id}: refund {r.refund_id}: {type(exc).__name__}: {exc}")
                continue
            took = credits_text(r.credits)
            changed.append(f"{r.payment_id}: refund {r.refund_id} took back {took} credits")
        return changed
