"""The delivery loop: claims due notifications from the outbox under a lease, hands each to
the sink, and records the outcome: delivered, or tried again later (exponential backoff with
jitter) until the retry time after its creation has passed, then failed.

Several workers may run the loop on one store: a claim is a conditional update (see
store/notifications.py), so no two deliver one notification at the same moment. A worker
killed mid-delivery leaves the claim's lease to run out; the notification is then claimed
and delivered again. Delivery is therefore at least once: receivers deduplicate on the id.

The sink is the webhook (webhook.py) when CREDIT_NOTIFY_URL is set, or the one that
CREDIT_NOTIFY_SINK names (`module:attr`, a factory taking the settings); with neither, no
loop runs and notifications stay pending in the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import random
import time
import uuid
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from gateway.core.settings import Settings
from gateway.core.store.base import Store
from gateway.core.store.notifications import NotificationRecord

log = logging.getLogger("credit.notifications")


class DeliveryError(Exception):
    """The sink could not deliver (the receiver refused, timed out or is unreachable)."""


@runtime_checkable
class Sink(Protocol):
    """Where notifications go. `deliver` returns once the receiver has taken it, and raises
    (DeliveryError, or anything) otherwise: the notification is tried again later."""

    async def deliver(self, notification: NotificationRecord) -> None: ...

    async def close(self) -> None: ...


def build_sink(settings: Settings) -> Sink | None:
    """The sink the settings name, or None (nothing is delivered)."""
    if settings.notify_sink:
        module, _, attr = settings.notify_sink.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise SystemExit(f"CREDIT_NOTIFY_SINK={settings.notify_sink}: cannot load it ({exc})") from None
        sink = factory(settings)
        if not isinstance(sink, Sink):
            raise SystemExit(
                f"CREDIT_NOTIFY_SINK={settings.notify_sink}: the factory returned no sink "
                "(an object with async deliver(notification) and close())"
            )
        return sink
    if settings.notify_url:
        from .webhook import WebhookSink

        secret = settings.notify_secret.get_secret_value() if settings.notify_secret else ""
        return WebhookSink(settings.notify_url, secret, timeout=settings.notify_timeout_seconds)
    return None


def backoff_ms(attempts: int, base_ms: int, cap_ms: int, rand: Callable[[], float] = random.random) -> int:
    """The wait after the `attempts`-th failure: base x 2^(attempts-1), at most cap, drawn
    between half of it and all of it (jitter: receivers coming back are not hit by every
    retry at once)."""
    ceiling = min(cap_ms, base_ms * 2 ** min(max(attempts - 1, 0), 40))
    return int(ceiling / 2 + rand() * ceiling / 2)


class Deliverer:
    def __init__(
        self,
        store: Store,
        sink: Sink,
        *,
        now_ms: Callable[[], int] | None = None,
        lease_ms: int = 60_000,
        retry_ms: int = 86_400_000,
        base_ms: int = 10_000,
        cap_ms: int = 3_600_000,
        batch: int = 50,
        rand: Callable[[], float] = random.random,
        observe: Callable[[str, str], None] | None = None,
    ) -> None:
        self.store, self.sink = store, sink
        # Told (kind, result) of each attempt, for the metrics: delivered, retry or failed.
        self.observe = observe or (lambda kind, result: None)
        self.now_ms = now_ms or (lambda: int(time.time() * 1000))
        self.lease_ms, self.retry_ms = lease_ms, retry_ms
        self.base_ms, self.cap_ms = base_ms, cap_ms
        self.batch = batch
        self.rand = rand

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        store: Store,
        sink: Sink,
        now_ms: Callable[[], int] | None = None,
        observe: Callable[[str, str], None] | None = None,
    ) -> Deliverer:
        return cls(
            store,
            sink,
            now_ms=now_ms,
            observe=observe,
            lease_ms=int(settings.notify_lease_seconds * 1000),
            retry_ms=int(settings.notify_retry_seconds * 1000),
            base_ms=int(settings.notify_retry_base_seconds * 1000),
            cap_ms=int(settings.notify_retry_cap_seconds * 1000),
            batch=settings.notify_batch,
        )

    async def run_once(self) -> int:
        """Claims what is due and delivers it (concurrently); how many were claimed."""
        token = uuid.uuid4().hex
        claimed = await self.store.claim_notifications(self.now_ms(), self.lease_ms, token, self.batch)
        if claimed:
            await asyncio.gather(*(self._deliver(n, token) for n in claimed))
        return len(claimed)

    async def _deliver(self, n: NotificationRecord, token: str) -> None:
        attempts = n.attempts + 1
        try:
            # A sink that hangs must not outlive the lease (another worker would deliver it too).
            await asyncio.wait_for(self.sink.deliver(n), self.lease_ms * 0.9 / 1000)
        except Exception as exc:
            now = self.now_ms()
            error = f"{type(exc).__name__}: {exc}"[:500]
            if now >= n.pending_since_ms + self.retry_ms:
                self.observe(n.kind, "failed")
                changes: dict[str, object] = {"status": "failed", "attempts": attempts, "last_error": error}
                log.warning(
                    "notification %s (%s) failed for good after %d attempts: %s",
                    n.id,
                    n.kind,
                    attempts,
                    error,
                )
            else:
                self.observe(n.kind, "retry")
                wait = backoff_ms(attempts, self.base_ms, self.cap_ms, self.rand)
                changes = {"attempts": attempts, "last_error": error, "next_attempt_ms": now + wait}
                log.info(
                    "notification %s (%s) not delivered (%s); again in %.0f s",
                    n.id,
                    n.kind,
                    error,
                    wait / 1000,
                )
            await self.store.finish_notification(n.id, token, changes)
            return
        self.observe(n.kind, "delivered")
        # Written only while the lease is ours; if it ran out and another worker took the
        # notification over, that one's outcome stands (the receiver dedups on the id).
        await self.store.finish_notification(
            n.id,
            token,
            {"status": "delivered", "attempts": attempts, "delivered_ms": self.now_ms(), "last_error": None},
        )

    async def run(self, stop: asyncio.Event, poll_seconds: float = 1.0) -> None:
        """Delivers until `stop`: at once again while there was a full batch, else after
        `poll_seconds`. A failing store is logged and tried again at the next poll."""
        while not stop.is_set():
            try:
                n = await self.run_once()
            except Exception:
                log.exception("notification delivery failed; trying again in %.1f s", poll_seconds)
                n = 0
            if n >= self.batch:
                await asyncio.sleep(0)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_seconds)
