"""A Redis pub/sub subscription run as a background task, for process-local caches that
must hear about changes made by other processes (pricing, API key revocations).

Messages can be lost (a dropped connection), so every (re)subscription calls
`on_subscribe` (reload or clear), and `on_idle` runs whenever `idle_seconds` pass without
a message (a periodic re-read). A client without pub/sub only gets the periodic calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

from .redis_client import RedisClient

log = logging.getLogger("credit.channel")

CLOSE_TIMEOUT_S = 2.0


async def _call(fn: Callable | None, *args: Any) -> None:
    if fn is None:
        return
    r = fn(*args)
    if inspect.isawaitable(r):
        await r


class Subscription:
    def __init__(
        self,
        redis: RedisClient,
        channel: str,
        *,
        on_message: Callable[[Any], Any],
        on_subscribe: Callable[[], Any] | None = None,
        on_idle: Callable[[], Any] | None = None,
        idle_seconds: float = 10.0,
    ) -> None:
        self.redis = redis
        self.channel = channel
        self.on_message = on_message
        self.on_subscribe = on_subscribe
        self.on_idle = on_idle
        self.idle_seconds = idle_seconds
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"sub:{self.channel}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _run(self) -> None:
        if not hasattr(self.redis, "pubsub"):
            while True:
                await asyncio.sleep(self.idle_seconds)
                try:
                    await _call(self.on_idle)
                except Exception:
                    log.exception("%s: periodic refresh failed; retrying", self.channel)
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                await _call(self.on_subscribe)  # whatever changed before the subscription took
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self.idle_seconds)
                    if msg is None:
                        await _call(self.on_idle)
                    elif msg.get("type") == "message":
                        await _call(self.on_message, msg.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: subscription failed; resubscribing", self.channel)
                await asyncio.sleep(1.0)
            finally:
                # Bounded: closing a connection cut mid-read (a cancel at shutdown) can
                # wait on a lock the cancelled read held, and stop() would wait with it.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), CLOSE_TIMEOUT_S)
