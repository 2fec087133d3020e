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
from gateway.payments.service import Payments
from gateway.payments.setup import build_payments
from gateway.plans.subscriptions import Notify, Subscriptions
from gateway.promos import Promos


@dataclass
class Selling:
    payments: Payments
    promos: Promos
    subscriptions: Subscriptions


async def build_selling(
    stack: AsyncExitStack,
    settings: Settings,
    payments_section: dict[str, Any] | None,
    store: Store,
    engine: CreditEngine,
    *,
    notify: Notify | None = None,
) -> Selling:
    payments = await build_payments(stack, settings, payments_section, store, engine)
    subscriptions = Subscriptions(store, engine, payments, notify=notify)
    return Selling(payments, Promos(store, engine), subscriptions)
