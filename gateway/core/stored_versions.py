"""Answering only what is stored: writers wait until the worker has stored their account's version.

Embedded mode keeps Redis inside the process, with nothing on disk: a crash loses whatever
the worker had not yet written to the store. So there, a write that changed an account
(a grant, a debit, a reserve, a settle, a release) is answered only once the in-process
worker has stored the account at that version or a newer one. With a real Redis server,
its AOF is what keeps an answered write, and nothing waits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from .events import Event

log = logging.getLogger("credit.durable")

WAIT_S = 10.0  # then answered anyway, and logged: a store that stays down must not hang every call


class StoredVersions:
    """Per user, the newest account version the worker has stored; writers wait on it."""

    def __init__(self, wait_s: float = WAIT_S) -> None:
        self.wait_s = wait_s
        self._stored: dict[str, int] = {}
        self._waiting: dict[str, list[tuple[int, asyncio.Future[None]]]] = {}

    def stored(self, events: Iterable[Event]) -> None:
        """The worker has stored these events (called after the store's commit)."""
        for e in events:
            if e.version > self._stored.get(e.user, 0):
                self._stored[e.user] = e.version
        for user in {e.user for e in events} & self._waiting.keys():
            have = self._stored[user]
            for version, fut in self._waiting[user]:
                if version <= have and not fut.done():
                    fut.set_result(None)

    async def wait(self, user: str, version: int) -> None:
        """Returns once `user`'s account is stored at `version` or newer (or after wait_s)."""
        if self._stored.get(user, 0) >= version:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting = self._waiting.setdefault(user, [])
        waiting.append((version, fut))
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.wait_s)
        except TimeoutError:
            log.error(
                "answered before it was stored: %s at version %d (the worker has not stored it in %.0f s)",
                user,
                version,
                self.wait_s,
            )
        finally:
            waiting.remove((version, fut))
            if not waiting:
                del self._waiting[user]
