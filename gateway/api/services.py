"""What a running app holds: built by create_app's lifespan, reached through deps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..core.apikeys import ApiKeys
from ..core.engine import CreditEngine
from ..core.keyring import KeyRing
from ..core.redis_client import RedisClient
from ..core.settings import Settings
from ..core.store.base import Store
from ..metrics import Metrics

if TYPE_CHECKING:
    from ..notifications import Notifier
    from ..payments.service import Payments
    from ..plans.subscriptions import Subscriptions
    from ..promos import Promos
    from ..proxy.forward import MeteringProxy
    from ..proxy.pricing_cache import PricingCache


class InProcessWorker(Protocol):
    """The worker as the app runs it in embedded mode (gateway.worker.runner.Worker)."""

    async def run(self, *, burst: bool = False) -> object: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class Services:
    settings: Settings
    redis: RedisClient
    store: Store
    engine: CreditEngine
    admin_keys: KeyRing
    client_keys: KeyRing
    metrics_keys: KeyRing
    metrics: Metrics
    api_keys: ApiKeys
    worker: InProcessWorker | None = None  # embedded mode (or run_worker=True)
    proxy: MeteringProxy | None = None  # when upstreams are configured
    pricing: PricingCache | None = None  # idem
    payments: Payments | None = None  # selling credits (built with every app)
    promos: Promos | None = None  # promo codes (built with every app)
    subscriptions: Subscriptions | None = None  # plans and subscriptions (built with every app)
    notifications: Notifier | None = None  # the outbox's admin side (built with every app)
    ready: bool = False  # Redis rebuilt from the store where it had lost its state
