"""Plan definitions: validated, stored, changed and deactivated by admins.

A plan's price is Decimal at the edge and an integer of the currency's minor unit inside
(0: free); its credits per period are micro-credits. Changes apply from each subscriber's
next renewal; the period cannot change (the subscribers' calendars hang on it). A
deactivated plan takes no new subscribers; its subscribers keep renewing until they cancel.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from gateway.core.money import MAX_UNITS, AmountError, credits_text, parse_amount, to_units
from gateway.core.ratelimits import MAX_LIMIT
from gateway.core.store.base import Store
from gateway.core.store.plans import PERIODS, PlanRecord
from gateway.payments.catalog import CatalogError, currency_code, from_minor, to_minor

FIELDS = {
    "name", "description", "price", "currency", "credits", "period", "rollover", "rollover_cap",
    "trial_days", "requests_per_minute", "tokens_per_minute", "allowed_models", "active",
}  # fmt: skip
FIXED = {"period"}
MAX_MODELS = 200


class PlanError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _bad(message: str) -> PlanError:
    return PlanError(400, "invalid_request", message)


def _credits(value: Any, name: str, *, zero: bool = False) -> int:
    try:
        units = to_units(value, allow_zero=zero)
    except (AmountError, ValueError) as exc:
        raise PlanError(422, "invalid_amount", f"{name}: {exc}") from None
    if units > MAX_UNITS:
        raise PlanError(422, "invalid_amount", f"{name}: at most 1,000,000,000")
    return units


def _text(value: Any, name: str, most: int) -> str:
    """A name or description: text without control characters (newlines and tabs aside)."""
    if (
        not isinstance(value, str)
        or not 0 < len(value.strip()) <= most
        or any((ord(c) < 32 and c not in "\n\t") or ord(c) == 127 for c in value)
    ):
        raise _bad(f"{name} is text of 1-{most} characters, without control characters")
    return value.strip()


def _limit(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LIMIT:
        raise _bad(f"{name} is a whole number from 0 (no limit) to {MAX_LIMIT}, or null")
    return value


def _models(value: Any) -> list[str] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not 0 < len(value) <= MAX_MODELS
        or not all(isinstance(m, str) and 0 < len(m) <= 200 and "|" not in m for m in value)
    ):
        raise _bad(f"allowed_models is null (every model) or a list of 1-{MAX_MODELS} model names")
    return sorted(set(value))


def _price(value: Any, currency: str) -> int:
    try:
        if parse_amount(value) == 0:
            return 0
        return to_minor(value, currency)
    except (AmountError, CatalogError, ValueError) as exc:
        raise PlanError(422, "invalid_amount", f"price: {exc}") from None


class Plans:
    def __init__(self, store: Store, *, now_ms: Callable[[], int]) -> None:
        self.store, self.now_ms = store, now_ms

    def _fields(self, body: dict[str, Any], base: PlanRecord | None) -> dict[str, Any]:
        unknown = set(body) - FIELDS
        if unknown:
            raise _bad(f"unknown fields: {sorted(unknown)}")
        out: dict[str, Any] = {}
        if "name" in body:
            out["name"] = _text(body["name"], "name", 100)
        if "description" in body:
            d = body["description"]
            out["description"] = None if d is None or d == "" else _text(d, "description", 500)
        if "period" in body:
            period = body["period"].strip().lower() if isinstance(body["period"], str) else None
            if period not in PERIODS:
                raise _bad(f"period is one of {', '.join(PERIODS)}")
            out["period"] = period
        if "credits" in body:
            out["credits"] = _credits(body["credits"], "credits")
        if "currency" in body or "price" in body:
            # A free plan has no currency; a price needs one (there is no default).
            cur = base.currency if base is not None else ""
            if body.get("currency") is not None:
                try:
                    cur = currency_code(body["currency"])
                except CatalogError as exc:
                    raise _bad(f"currency: {exc}") from None
            if "price" in body:
                price = body["price"]
            elif base is not None and base.price_minor:
                price = from_minor(base.price_minor, base.currency)
            else:
                price = 0
            try:
                free = parse_amount(price) == 0
            except (AmountError, ValueError) as exc:
                raise PlanError(422, "invalid_amount", f"price: {exc}") from None
            if not free and not cur:
                raise _bad('currency is required with a price (e.g. "USD")')
            out["price_minor"] = 0 if free else _price(price, cur)
            out["currency"] = cur
        for flag in ("rollover", "active"):
            if flag in body:
                if not isinstance(body[flag], bool):
                    raise _bad(f"{flag} is true or false")
                out[flag] = body[flag]
        if "rollover_cap" in body:
            cap = body["rollover_cap"]
            out["rollover_cap"] = None if cap is None else _credits(cap, "rollover_cap", zero=True)
        if "trial_days" in body:
            t = body["trial_days"]
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= 365:
                raise _bad("trial_days is a whole number from 0 to 365")
            out["trial_days"] = t
        for name in ("requests_per_minute", "tokens_per_minute"):
            if name in body:
                out[name] = _limit(body[name], name)
        if "allowed_models" in body:
            out["allowed_models"] = _models(body["allowed_models"])
        after = {**({} if base is None else _asdict(base)), **out}
        if after.get("rollover_cap") is not None and not after.get("rollover"):
            raise _bad("rollover_cap applies only with rollover: true")
        return out

    def build(self, plan_id: str, body: dict[str, Any], created_ms: int | None = None) -> PlanRecord:
        """A validated plan record, not stored yet."""
        missing = [f for f in ("name", "credits", "period") if f not in body]
        if missing:
            raise _bad(f"required: {', '.join(missing)}")
        fields = self._fields({"price": "0", **body}, None)
        now = self.now_ms()
        return PlanRecord(plan_id=plan_id, created_ms=created_ms or now, updated_ms=now, **fields)

    async def create(self, body: dict[str, Any]) -> PlanRecord:
        p = self.build("plan_" + uuid.uuid4().hex[:16], body)
        await self.store.create_plan(p)
        return p

    async def adopt(self, plan_id: str, body: dict[str, Any], *, created_ms: int) -> PlanRecord | None:
        """A plan carried over from another system under an id derived from its own (so a
        second import finds it), validated as `create` does; None when the id exists."""
        p = self.build(plan_id, body, created_ms)
        try:
            await self.store.create_plan(p)
        except KeyError:
            return None
        return p

    async def get(self, plan_id: Any) -> PlanRecord:
        p = await self.store.plan(plan_id) if isinstance(plan_id, str) else None
        if p is None:
            raise PlanError(404, "unknown_plan", "no such plan")
        return p

    async def update(self, plan_id: Any, body: dict[str, Any]) -> PlanRecord:
        p = await self.get(plan_id)
        fixed = {f for f in FIXED & set(body) if body[f] != getattr(p, f)}
        if fixed:
            raise _bad(
                "a plan's period cannot change (its subscribers' calendars hang on it); create a new plan"
            )
        changes = self._fields(body, p)
        changes["updated_ms"] = self.now_ms()
        updated = await self.store.update_plan(p.plan_id, changes)
        if updated is None:  # pragma: no cover - plans are never deleted
            raise PlanError(404, "unknown_plan", "no such plan")
        return updated

    @staticmethod
    def view(p: PlanRecord) -> dict[str, Any]:
        return {
            "id": p.plan_id,
            "name": p.name,
            "description": p.description,
            "price": str(from_minor(p.price_minor, p.currency)) if p.price_minor else "0",
            "currency": p.currency or None,
            "credits": credits_text(p.credits),
            "period": p.period,
            "rollover": p.rollover,
            "rollover_cap": None if p.rollover_cap is None else credits_text(p.rollover_cap),
            "trial_days": p.trial_days,
            "requests_per_minute": p.requests_per_minute,
            "tokens_per_minute": p.tokens_per_minute,
            "allowed_models": p.allowed_models,
            "active": p.active,
            "free": p.price_minor == 0,
        }


def _asdict(p: PlanRecord) -> dict[str, Any]:
    return {f: getattr(p, f) for f in PlanRecord.__dataclass_fields__}
