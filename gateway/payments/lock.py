"""A short lease on one payment, in Redis, for the steps that read the payment's refunds and
write new totals (two refund deliveries applied at the same moment would each compute from
the same sums). The store's conditional updates still guard every status move; the lease
only makes concurrent deliveries of refunds take turns. A holder that dies lets it lapse."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

from gateway.core.engine import CreditEngine


class Busy(Exception):
    """The payment stayed leased by another delivery for the whole wait."""


@contextlib.asynccontextmanager
async def payment_lease(
    engine: CreditEngine, payment_id: str, *, ttl_ms: int = 30_000, wait_s: float = 5.0
) -> AsyncIterator[None]:
    redis = engine.redis
    key = f"{engine.keys.prefix}:paylease:{payment_id}"
    token = os.urandom(12).hex()
    deadline = asyncio.get_running_loop().time() + wait_s
    while not await redis.set(key, token, nx=True, px=ttl_ms):
        if asyncio.get_running_loop().time() > deadline:
            raise Busy(payment_id)
        await asyncio.sleep(0.01)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # a lease not released lapses by itself
            await engine.scripts.call(redis, "lease_drop", [key], [token])
