"""Payments as durable records: what every store keeps of a payment, its webhook events,
its refunds and its anomalies, and the one way a payment's status may move.

A payment's status only moves forward, and each move is one conditional update in the
store (the row changes only if its status is still one the move starts from), never a
read followed by a write:

    created -> paid -> partially_refunded -> refunded
    created -> failed | expired | cancelled
    failed  -> paid | expired | cancelled      (a failed attempt is not final: the same
                                                link or session can still be paid)
    expired | cancelled -> paid                (money captured in a race is still credited)

Whether the credits were granted is a mark of its own (`credited_ms`), set once the grant
is known to have happened, so a payment can be paid and not yet credited (a crash in
between) and reconciliation finds it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

STATUSES = ("created", "paid", "failed", "expired", "cancelled", "partially_refunded", "refunded")
NEXT: dict[str, frozenset[str]] = {
    "created": frozenset({"paid", "failed", "expired", "cancelled"}),
    "failed": frozenset({"paid", "expired", "cancelled"}),
    "paid": frozenset({"partially_refunded", "refunded"}),
    "partially_refunded": frozenset({"partially_refunded", "refunded"}),
    # Money captured after the link or session expired or was cancelled (a race at the
    # provider) was taken all the same: it is credited.
    "expired": frozenset({"paid"}),
    "cancelled": frozenset({"paid"}),
    "refunded": frozenset(),
}
PAID_STATES = frozenset({"paid", "partially_refunded", "refunded"})


def sources_of(target: str) -> frozenset[str]:
    """The statuses a payment may move to `target` from."""
    return frozenset(s for s, nxt in NEXT.items() if target in nxt)


@dataclass(slots=True)
class PaymentRecord:
    payment_id: str
    user: str
    provider: str  # razorpay | stripe
    amount_minor: int  # in the currency's minor unit (paise, cents)
    currency: str
    credits: int  # micro-credits the payment buys
    status: str
    created_ms: int
    updated_ms: int
    pack: str | None = None
    description: str | None = None
    url: str | None = None
    link_id: str | None = None  # Razorpay payment link
    provider_payment_id: str | None = None  # Razorpay pay_..., Stripe payment intent pi_...
    session_id: str | None = None  # Stripe Checkout session
    order_id: str | None = None  # Razorpay order
    paid_ms: int | None = None
    credited_ms: int | None = None
    refunded_minor: int = 0
    refunded_credits: int = 0
    error: str | None = None
    purpose: str | None = None  # `subscription:<id>:<period>`: credited as that period's plan credit


PAYMENT_FIELDS = tuple(PaymentRecord.__dataclass_fields__)


@dataclass(slots=True)
class WebhookEvent:
    """A provider's event as received (deduplicated by (provider, event_id))."""

    provider: str
    event_id: str
    type: str
    received_ms: int
    body: str  # the raw body as received (verified), for the record
    payment_id: str | None = None
    outcome: str = "received"  # received (being applied) | applied | duplicate | ignored | anomaly
    status_code: int = 200  # what the first delivery was answered


@dataclass(slots=True)
class RefundRecord:
    provider: str
    refund_id: str
    payment_id: str
    amount_minor: int
    credits: int  # micro-credits taken back for it
    at_ms: int
    debited_ms: int | None = None  # set once the debit is known to have happened


@dataclass(slots=True)
class PaymentAnomaly:
    payment_id: str | None
    provider: str
    event_id: str | None
    kind: str  # amount_mismatch | currency_mismatch | user_mismatch | unknown_payment | ...
    detail: dict[str, Any] = field(default_factory=dict)
    at_ms: int = 0


class PaymentStore(ABC):
    """The payment half of a store's contract."""

    @abstractmethod
    async def create_payment(self, p: PaymentRecord) -> None:
        """Inserts a new payment; raises KeyError if its id exists."""

    @abstractmethod
    async def payment(self, payment_id: str) -> PaymentRecord | None: ...

    @abstractmethod
    async def payment_by_provider_id(
        self, provider: str, provider_payment_id: str
    ) -> PaymentRecord | None: ...

    @abstractmethod
    async def list_payments(
        self,
        *,
        user: str | None = None,
        status: str | None = None,
        provider: str | None = None,
        limit: int = 50,
        before: tuple[int, str] | None = None,
    ) -> list[PaymentRecord]:
        """Newest first; `before` is the (created_ms, payment_id) of the last row of the
        previous page."""

    @abstractmethod
    async def update_payment(
        self,
        payment_id: str,
        changes: dict[str, Any],
        *,
        from_status: Iterable[str] | None = None,
        unset: str | None = None,
    ) -> bool:
        """Sets `changes` in one conditional update: only if the status is one of
        `from_status` (any, when None) and the field `unset` (if named) is still null.
        True when the row changed."""

    @abstractmethod
    async def payments_to_reconcile(self, older_than_ms: int, limit: int = 500) -> list[PaymentRecord]:
        """Payments created before `older_than_ms` still created or failed, and paid ones
        not yet credited."""

    @abstractmethod
    async def record_webhook_event(self, ev: WebhookEvent) -> WebhookEvent | None:
        """Inserts the event unless (provider, event_id) is known; returns the stored one
        when it is (None when this call inserted it)."""

    @abstractmethod
    async def finish_webhook_event(
        self, provider: str, event_id: str, outcome: str, status_code: int, payment_id: str | None
    ) -> None: ...

    @abstractmethod
    async def webhook_events(self, payment_id: str) -> list[WebhookEvent]: ...

    @abstractmethod
    async def add_refund(self, r: RefundRecord) -> RefundRecord | None:
        """Inserts the refund unless (provider, refund_id) is known; returns the stored one
        when it is."""

    @abstractmethod
    async def mark_refund_debited(self, provider: str, refund_id: str, at_ms: int) -> bool: ...

    @abstractmethod
    async def refunds(self, payment_id: str) -> list[RefundRecord]: ...

    @abstractmethod
    async def refunds_to_reconcile(self, older_than_ms: int) -> list[RefundRecord]:
        """Refunds recorded before `older_than_ms` whose debit is not known to have happened."""

    @abstractmethod
    async def add_anomaly(self, a: PaymentAnomaly) -> None: ...

    @abstractmethod
    async def anomalies(self, payment_id: str) -> list[PaymentAnomaly]: ...

    @abstractmethod
    async def recent_anomalies(self, limit: int = 100) -> list[PaymentAnomaly]:
        """The newest anomalies of every payment, those of no known payment included."""

    @abstractmethod
    async def ledger_has(self, user: str, op_id: str) -> bool:
        """Whether the ledger holds the operation (the durable answer to "did it happen",
        long after Redis has forgotten the operation id)."""
