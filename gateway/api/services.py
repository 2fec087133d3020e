"""What a running app holds: built by create_app's lifespan, reached through deps."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from ..core.engine import CreditEngine
from ..core.keyring import KeyRing
from ..core.settings import Settings
from ..core.store.base import Store


@dataclass
class Services:
    settings: Settings
    redis: Any
    store: Store
    engine: CreditEngine
    admin_keys: KeyRing
    client_keys: KeyRing
    api_keys: Any = None  # gateway.core.apikeys.ApiKeys
    worker: Any = None
    proxy: Any = None  # gateway.proxy.forward.MeteringProxy when upstreams are configured
    pricing: Any = None  # gateway.proxy.pricing_cache.PricingCache
    background: list[asyncio.Task] = field(default_factory=list)
    ready: bool = False
