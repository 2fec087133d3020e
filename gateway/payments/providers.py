"""What the payment service needs of a provider, and what a provider's webhook event means
once read: one shape for Razorpay's and Stripe's events."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from gateway.core.store.payments import PaymentRecord

Kind = Literal["paid", "failed", "expired", "cancelled", "refund", "ignored"]


class WebhookRefused(Exception):
    """A delivery that is not believed: no secret configured, no or a wrong signature, a
    stale timestamp. Nothing is recorded or changed for it."""


class ProviderError(Exception):
    """The provider's API refused a call (`refused`) or did not answer in time."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


@dataclass(frozen=True)
class Refund:
    refund_id: str
    amount_minor: int


@dataclass
class ProviderEvent:
    """A verified webhook event, read. Ids the event does not carry are None."""

    event_id: str
    type: str  # the provider's own name for it
    kind: Kind
    payment_ref: str | None = None  # this gateway's payment id, as the event carries it
    provider_payment_id: str | None = None
    link_id: str | None = None
    session_id: str | None = None
    order_id: str | None = None
    amount_minor: int | None = None
    currency: str | None = None
    user: str | None = None
    refunds: list[Refund] = field(default_factory=list)
    # Set when the event gives only the total refunded so far (Stripe's charge.refunded
    # without its list): `refunds` then holds one refund keyed by that total, amount 0.
    refunded_total_minor: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class Checkout:
    """Where the buyer pays, and the provider's ids for it."""

    url: str
    link_id: str | None = None
    session_id: str | None = None
    order_id: str | None = None


class Provider(Protocol):
    name: str

    async def create(self, p: PaymentRecord) -> Checkout:
        """A payment link (Razorpay) or Checkout session (Stripe) for `p`; asking again for
        the same payment gives the same one."""

    def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        """Raises WebhookRefused unless the provider signed exactly these bytes."""

    def parse(self, body: bytes, headers: Mapping[str, str]) -> ProviderEvent:
        """The verified body, read; ValueError if it is not an event."""

    async def refund(self, p: PaymentRecord, amount_minor: int, key: str) -> str:
        """Asks for a refund of `amount_minor` of the captured payment; the refund id.
        `key` makes a retried request the same refund."""

    async def lookup(self, p: PaymentRecord) -> ProviderEvent | None:
        """What the provider says of `p` now, as an event (reconciliation), or None."""
