"""The credit_expiring scan: grants with free credit expiring within N days get one
notification each (dedup key `credit_expiring:<user>:<grant seq>`), however often the scan
runs. Run by the worker every CREDIT_NOTIFY_EXPIRING_INTERVAL_SECONDS, a page at a time."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime

from gateway.core.money import credits_text
from gateway.core.store.base import Store
from gateway.core.store.notifications import ExpiringGrant

from .notifier import make_note

PAGE = 2000


def _data(g: ExpiringGrant) -> dict[str, object]:
    try:
        meta = json.loads(g.metadata) if g.metadata else {}
    except ValueError:
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    return {
        "grant_seq": g.seq,
        "credits": credits_text(g.free),
        "expires_at": datetime.fromtimestamp(g.expires_ms / 1000, UTC).isoformat().replace("+00:00", "Z"),
        "source": meta.get("src"),
        "op_id": meta.get("id"),
    }


class ExpiringScan:
    def __init__(
        self, store: Store, *, days: int, now_ms: Callable[[], int] | None = None, page: int = PAGE
    ) -> None:
        self.store, self.days, self.page = store, days, page
        self.now_ms = now_ms or (lambda: int(time.time() * 1000))

    async def run(self) -> list[str]:
        """One scan of every grant; a line when it recorded anything (for the job's log)."""
        now = self.now_ms()
        until = now + self.days * 86_400_000
        after = None
        new = 0
        while True:
            found, after = await self.store.expiring_grants(now, until, after, self.page)
            notes = [
                make_note(
                    g.user,
                    "credit_expiring",
                    f"credit_expiring:{g.user}:{g.seq}",
                    _data(g),
                    now,
                    checked=True,
                )
                for g in found
            ]
            if notes:
                new += await self.store.add_notifications(notes)
            if after is None:
                break
        return [f"{new} grants expiring within {self.days} days notified"] if new else []
