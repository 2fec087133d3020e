"""Billing periods on the calendar, in UTC: period k of a subscription starts k periods after
its anchor. Months and years are counted from the anchor, not from the previous period, so a
subscription anchored on Jan 31 renews on Feb 28 (29 in a leap year), then Mar 31."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta

DAY_MS = 86_400_000


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def _add_months(anchor: datetime, months: int) -> datetime:
    index = anchor.month - 1 + months
    year, month = anchor.year + index // 12, index % 12 + 1
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def start_of(anchor_ms: int, period: str, k: int) -> int:
    """When period k (0, 1, ...) starts, for a subscription anchored at `anchor_ms`."""
    anchor = _dt(anchor_ms)
    if period == "daily":
        return _ms(anchor + timedelta(days=k))
    if period == "weekly":
        return _ms(anchor + timedelta(weeks=k))
    if period == "monthly":
        return _ms(_add_months(anchor, k))
    if period == "yearly":
        return _ms(_add_months(anchor, 12 * k))
    raise ValueError(f"unknown period {period!r}")


def bounds(anchor_ms: int, period: str, k: int) -> tuple[int, int]:
    """Period k's [start, end) in ms."""
    return start_of(anchor_ms, period, k), start_of(anchor_ms, period, k + 1)


def period_at(anchor_ms: int, period: str, now_ms: int) -> int:
    """The index of the period `now_ms` falls in (0 before the anchor)."""
    if now_ms < anchor_ms:
        return 0
    days = (now_ms - anchor_ms) // DAY_MS
    guess = {"daily": days, "weekly": days // 7, "monthly": days // 31, "yearly": days // 366}[period]
    k = max(int(guess), 0)
    while start_of(anchor_ms, period, k + 1) <= now_ms:
        k += 1
    return k
