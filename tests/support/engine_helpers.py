"""Helpers shared by the engine tests: an account's events, the conservation check, and
dates relative to the test clock."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from gateway.core.engine import CreditEngine
from gateway.core.events import decode

D = Decimal


async def events_of(engine: CreditEngine, user: str) -> list:
    p = engine.keys.partition_of(user)
    entries = await engine.redis.xrange(engine.keys.partition(p).events)
    evs = [decode(sid, fields, p) for sid, fields in entries]
    return [e for e in evs if e.user == user]


async def assert_conserved(engine: CreditEngine, user: str, charges: Decimal | None = None) -> None:
    """granted == free remainders (expired-not-swept too) + earmarked + spent + expired;
    held == earmarked == open holds; and, when known, charges == spent + debt."""
    v = await engine.account(user)
    s = v.state
    free = sum((g.free for g in v.grants), D(0))
    ear = sum((g.earmarked for g in v.grants), D(0))
    assert s.granted == free + ear + s.spent + s.expired, v
    assert s.held == ear == sum((h.amount for h in v.holds), D(0)), v
    assert s.available == sum((g.free for g in v.grants if not g.expired), D(0)), v
    assert s.available >= 0 and s.debt >= 0
    if charges is not None:
        assert s.spent + s.debt == charges, v


async def all_events(engine: CreditEngine) -> list:
    out = []
    for p in range(engine.keys.partitions):
        for sid, fields in await engine.redis.xrange(engine.keys.partition(p).events):
            out.append(decode(sid, fields, p))
    return out


def at(clock, seconds: float) -> datetime:
    """An aware datetime `seconds` after the clock's now."""
    return datetime.fromtimestamp(clock() + seconds, tz=UTC)


async def dies_here(*args: object, **kwargs: object) -> None:
    """Stands in for an engine call when the process dies at that point (monkeypatched)."""
    raise ConnectionError("the process died here")


def all_but(user: str, real):
    """The engine call `real` for every user but `user`, for whom it fails (one stuck claim
    or payment among others)."""

    async def call(who, *args, **kwargs):
        if who == user:
            raise RuntimeError("cannot be granted now")
        return await real(who, *args, **kwargs)

    return call
