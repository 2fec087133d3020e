"""The payment service as the settings describe it: each provider whose keys are set, the
catalog from the config file's [payments] section and CREDIT_PAYMENT_RATES."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

from gateway.core.engine import CreditEngine
from gateway.core.settings import Settings
from gateway.core.store.base import Store
from gateway.notifications import Notifier

from .catalog import build_catalog
from .providers import Provider
from .service import Payments


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


async def build_payments(
    stack: AsyncExitStack,
    settings: Settings,
    section: dict[str, Any] | None,
    store: Store,
    engine: CreditEngine,
    notifier: Notifier | None = None,
) -> Payments:
    """Payments for a running app or worker; provider clients are closed with `stack`."""
    providers: dict[str, Provider] = {}
    base = (settings.app_base_url or "").rstrip("/") or None
    timeout = settings.payment_provider_timeout_seconds
    if settings.razorpay_key_id and settings.razorpay_key_secret:
        from .razorpay import RazorpayProvider

        providers["razorpay"] = RazorpayProvider(
            settings.razorpay_key_id,
            _secret(settings.razorpay_key_secret) or "",
            _secret(settings.razorpay_webhook_secret),
            base_url=settings.razorpay_base_url,
            timeout=timeout,
            callback_url=f"{base}/credits/payments/return" if base else None,
        )
    if settings.stripe_api_key:
        from .stripe import StripeProvider

        stripe_provider = StripeProvider(
            _secret(settings.stripe_api_key) or "",
            _secret(settings.stripe_webhook_secret),
            api_base=settings.stripe_api_base,
            timeout=timeout,
            tolerance=settings.stripe_webhook_tolerance_seconds,
            success_url=f"{base}/credits/payments/return?status=paid" if base else None,
            cancel_url=f"{base}/credits/payments/return?status=cancelled" if base else None,
        )
        stack.push_async_callback(stripe_provider.close)
        providers["stripe"] = stripe_provider
    catalog = build_catalog(section, settings.payment_rates)
    return Payments(store, engine, catalog, providers, notifier=notifier)
