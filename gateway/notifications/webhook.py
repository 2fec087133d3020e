"""The default sink: a signed webhook POSTed to CREDIT_NOTIFY_URL, and the receiver's check.

Body: JSON `{"id", "type", "created", "user", "data"}` (see notifier.payload). Headers:
`X-Credit-Event-Id: <id>` and `X-Credit-Signature: t=<unix seconds>,v1=<hex>`, where the hex
is HMAC-SHA256 of `<t>.<raw body>` with CREDIT_NOTIFY_SECRET (as Stripe signs its webhooks).
A 2xx answer is a delivery; anything else, a timeout or no connection is tried again.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable

import aiohttp
import orjson

from gateway.core.store.notifications import NotificationRecord

from .delivery import DeliveryError
from .notifier import payload

SIGNATURE_HEADER = "X-Credit-Signature"
EVENT_ID_HEADER = "X-Credit-Event-Id"


def sign(secret: str, t: int, body: bytes) -> str:
    """The X-Credit-Signature header's value for `body` sent at `t` (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(
    secret: str, body: bytes, header: str, *, tolerance_s: int = 300, now: float | None = None
) -> bool:
    """The receiver's check (docs/notifications.md shows it in five lines): the signature
    matches the raw body and was made within `tolerance_s` of now (a replayed old request
    is refused)."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        t = int(parts["t"])
    except (ValueError, KeyError):
        return False
    expected = sign(secret, t, body).partition(",v1=")[2]
    fresh = abs((time.time() if now is None else now) - t) <= tolerance_s
    return fresh and hmac.compare_digest(expected, parts.get("v1", ""))


class WebhookSink:
    def __init__(
        self, url: str, secret: str, *, timeout: float = 10.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.url, self.secret, self.clock = url, secret, clock
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use, inside the running loop (aiohttp binds a session to its loop).
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    async def deliver(self, notification: NotificationRecord) -> None:
        body = orjson.dumps(payload(notification))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "credit-gateway-notifications",
            EVENT_ID_HEADER: notification.id,
            SIGNATURE_HEADER: sign(self.secret, int(self.clock()), body),
        }
        try:
            async with self._client().post(self.url, data=body, headers=headers, allow_redirects=False) as r:
                if not 200 <= r.status < 300:
                    text = (await r.text(errors="replace"))[:200]
                    raise DeliveryError(f"the receiver answered {r.status}: {text}")
        except aiohttp.ClientError as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from None
        except TimeoutError:
            raise DeliveryError(f"no answer within {self.timeout.total} s") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
