"""Plans and subscriptions as durable records: a plan's terms, and each subscription's
period, state and history, moved only by conditional updates (a renewal is taken by the one
worker whose update finds the subscription as it read it)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

PERIODS = ("daily", "weekly", "monthly", "yearly")
# A subscription's status:
#   pending_payment  a paid plan's first period waits for its payment
#   trialing         the trial period (its credit granted free)
#   active           the current period is granted
#   past_due         a paid renewal's payment is open; the period's credit waits for it
#   ended            over (end_reason: canceled, payment_failed, plan_ended)
LIVE_STATUSES = ("pending_payment", "trialing", "active", "past_due")
STATUSES = (*LIVE_STATUSES, "ended")
TRIAL = -1  # the period index of a trial; paid periods count from 0


@dataclass(slots=True)
class PlanRecord:
    plan_id: str
    name: str
    credits: int  # micro-credits per period
    period: str  # daily | weekly | monthly | yearly
    price_minor: int  # 0: free
    currency: str  # "" for a free plan
    created_ms: int
    updated_ms: int
    description: str | None = None
    rollover: bool = False
    rollover_cap: int | None = None  # micro-credits carried at most (None: all)
    trial_days: int = 0
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    allowed_models: list[str] | None = None  # None: every model
    active: bool = True


@dataclass(slots=True)
class SubscriptionRecord:
    sub_id: str
    user: str
    plan_id: str
    paid: bool  # renewals go through payments (False: granted directly)
    status: str
    created_ms: int
    updated_ms: int
    provider: str | None = None  # a paid subscription's payment provider
    anchor_ms: int | None = None  # period k starts at anchor + k periods (calendar, UTC)
    period: int = TRIAL  # the current period's index
    period_start_ms: int | None = None
    period_end_ms: int | None = None
    granted_period: int | None = None  # the newest period whose credit is granted
    grant: dict[str, Any] | None = None  # the current period's grant, fixed before it is made
    payment_id: str | None = None  # the open payment for the current period
    cancel_at_period_end: bool = False
    next_action_ms: int | None = None  # when the scheduler looks at it next (None: ended)
    ended_ms: int | None = None
    end_reason: str | None = None
    skipped_periods: int = 0  # periods that passed while no worker ran (not granted)
    history: list[dict[str, Any]] = field(default_factory=list)  # the newest 50 changes
    rev: int = 0  # every update adds one: what a conditional update compares

    @property
    def live(self) -> bool:
        return self.status in LIVE_STATUSES


PLAN_FIELDS = tuple(PlanRecord.__dataclass_fields__)
SUB_FIELDS = tuple(SubscriptionRecord.__dataclass_fields__)


def plan_doc(p: PlanRecord) -> dict[str, Any]:
    return asdict(p)


def plan_of(doc: dict[str, Any]) -> PlanRecord:
    return PlanRecord(**{k: doc[k] for k in PLAN_FIELDS if k in doc})


def sub_doc(s: SubscriptionRecord) -> dict[str, Any]:
    return asdict(s)


def sub_of(doc: dict[str, Any]) -> SubscriptionRecord:
    return SubscriptionRecord(**{k: doc[k] for k in SUB_FIELDS if k in doc})


def subscription_change(
    changes: dict[str, Any], expect: dict[str, Any] | None
) -> Callable[[dict[str, Any]], SubscriptionRecord | None]:
    """What update_subscription makes of a stored record: the changed one (its rev one
    more), or None when a field differs from `expect`."""

    def apply(d: dict[str, Any]) -> SubscriptionRecord | None:
        if any(d.get(k) != v for k, v in (expect or {}).items()):
            return None
        return sub_of({**d, **changes, "rev": d.get("rev", 0) + 1})

    return apply


class PlanStore(ABC):
    """The plans half of a store's contract."""

    @abstractmethod
    async def create_plan(self, p: PlanRecord) -> None: ...

    @abstractmethod
    async def plan(self, plan_id: str) -> PlanRecord | None: ...

    @abstractmethod
    async def list_plans(self, *, active_only: bool = False) -> list[PlanRecord]: ...

    @abstractmethod
    async def update_plan(self, plan_id: str, changes: dict[str, Any]) -> PlanRecord | None:
        """Sets `changes`; the record after, or None if there is no such plan."""

    @abstractmethod
    async def create_subscription(self, s: SubscriptionRecord) -> None:
        """Inserts a live subscription; raises KeyError when the user already has one."""

    @abstractmethod
    async def subscription(self, sub_id: str) -> SubscriptionRecord | None: ...

    @abstractmethod
    async def subscriptions_of(self, user: str) -> list[SubscriptionRecord]:
        """The user's subscriptions, newest first (the live one, if any, among them)."""

    @abstractmethod
    async def update_subscription(
        self, sub_id: str, changes: dict[str, Any], *, expect: dict[str, Any] | None = None
    ) -> SubscriptionRecord | None:
        """Sets `changes` if every field in `expect` still has that value (one conditional
        update); the record after, or None when it did not match (or does not exist)."""

    @abstractmethod
    async def due_subscriptions(self, now_ms: int, limit: int = 200) -> list[SubscriptionRecord]:
        """Live subscriptions whose next_action_ms has come, oldest first."""

    @abstractmethod
    async def live_subscriptions(self) -> list[SubscriptionRecord]: ...
