"""The selling services as an app, the worker or a command builds them: payments, promo
codes and subscriptions, wired together (a subscription's payment is credited by the
subscriptions, whichever process receives it)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from gateway.core.engine import CreditEngine
from gateway.core.settings import Settings
from gateway.core.store.base import Store
from gateway.notifications import Notifier
from gateway.payments.service import Payments
from gateway.payments.setup import build_payments
from gateway.plans.subscriptions import Subscriptions
from gateway.promos import Promos


@dataclass
class Selling:
    payments: Payments
    promos: Promos
    subscriptions: Subscriptions
    notifier: Notifier  # records notifications (the outbox); the worker detects and delivers


async def build_selling(
    stack: AsyncExitStack,
    settings: Settings,
    payments_section: dict[str, Any] | None,
    store: Store,
    engine: CreditEngine,
) -> Selling:
    notifier = Notifier(
        store, default_threshold_units=settings.low_balance_threshold_units, now_ms=engine.now_ms
    )
    payments = await build_payments(stack, settings, payments_section, store, engine, notifier)
    subscriptions = Subscriptions(store, engine, payments, notify=notifier.record)
    return Selling(payments, Promos(store, engine), subscriptions, notifier)
