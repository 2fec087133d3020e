"""Notifications: recorded in the store's outbox, detected by the worker, delivered to a sink.

- notifier.py   record a notification (other services call `Notifier.record`), the views
- detect.py     what a batch of engine events notifies (the worker, before it acknowledges)
- expiring.py   the periodic scan for free credit about to expire
- delivery.py   the delivery loop: claim under a lease, a sink, retries with backoff
- webhook.py    the default sink: a signed webhook (and the receiver's signature check)
See docs/notifications.md.
"""

from __future__ import annotations

from .notifier import KINDS, STATUSES, Notifier, NotifyError

__all__ = ["KINDS", "STATUSES", "Notifier", "NotifyError"]
