"""Reading credit-management's MongoDB database, and its values in the gateway's terms.

The old package keeps one collection per model. Its money is float credits (payment
amounts: float minor units), its times naive UTC datetimes, its ids strings (uuid4 hex)
in `_id`. A value is converted exactly or reported, never guessed: a float goes through
its shortest repr (0.1 + 0.2 is 0.30000000000000004) into a Decimal, then micro-credits.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

from gateway.core.keys import ID_PATTERN
from gateway.core.money import UNITS_PER_CREDIT

COLLECTIONS = (
    "credit_transactions",
    "credit_expiry_records",
    "credit_reserved",
    "payment_records",
    "credit_subscription_plans",
    "credit_user_subscriptions",
    "promos",
    "user_promo_claims",
)

# The fields each collection's model has; anything else in a document is kept as extra.
KNOWN: dict[str, frozenset[str]] = {
    "credit_transactions": frozenset(
        [
            "user_id",
            "credits_added",
            "credits_deducted",
            "current_credits",
            "transaction_type",
            "timestamp",
            "description",
            "metadata",
        ]
    ),
    "credit_expiry_records": frozenset(
        [
            "user_id",
            "subscription_plan_id",
            "credits",
            "remaining_credits",
            "expires_at",
            "created_at",
            "expired",
        ]
    ),
    "credit_reserved": frozenset(
        [
            "user_id",
            "subscription_plan_id",
            "credits",
            "reason",
            "created_at",
            "expires_at",
            "committed",
            "released",
        ]
    ),
    "payment_records": frozenset(
        [
            "user_id",
            "provider",
            "provider_payment_id",
            "provider_payment_link_id",
            "provider_order_id",
            "amount",
            "currency",
            "amount_inr",
            "credits_to_add",
            "credits_added",
            "status",
            "payment_method",
            "description",
            "customer_email",
            "customer_phone",
            "created_at",
            "completed_at",
            "failed_at",
            "metadata",
            "error_message",
        ]
    ),
    "credit_subscription_plans": frozenset(
        [
            "name",
            "description",
            "credit_limit",
            "price",
            "billing_period",
            "validity_days",
            "is_active",
            "created_at",
            "updated_at",
        ]
    ),
    "credit_user_subscriptions": frozenset(
        [
            "user_id",
            "subscription_plan_id",
            "started_at",
            "valid_until",
            "auto_renew",
            "is_active",
        ]
    ),
    "promos": frozenset(
        [
            "code",
            "credits",
            "description",
            "target_type",
            "target_user_ids",
            "max_uses",
            "max_uses_per_user",
            "valid_from",
            "valid_until",
            "is_active",
            "metadata",
            "created_at",
            "updated_at",
        ]
    ),
    "user_promo_claims": frozenset(
        [
            "user_id",
            "promo_id",
            "promo_code",
            "credits_awarded",
            "claimed_at",
            "metadata",
        ]
    ),
}

_MICRO = Decimal(1) / UNITS_PER_CREDIT


class SourceError(Exception):
    """The source database cannot be read (connection, or not credit-management's)."""


class BadValue(ValueError):
    """A field whose value cannot be read as what it should be."""


@dataclass(frozen=True, slots=True)
class Doc:
    """One source document: its collection, its id (as text) and its fields."""

    collection: str
    id: str
    fields: dict[str, Any]

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)

    def extra(self) -> dict[str, Any]:
        """The fields the old model does not name, JSON-ready."""
        known = KNOWN.get(self.collection, frozenset())
        return {k: jsonable(v) for k, v in self.fields.items() if k not in known and k not in ("_id", "id")}


def jsonable(v: Any) -> Any:
    """A BSON value as JSON can carry it (times as ISO 8601 UTC, numbers kept exact)."""
    if isinstance(v, datetime):
        return (v if v.tzinfo else v.replace(tzinfo=UTC)).isoformat()
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    return str(v)  # ObjectId, Decimal128, bytes...


def decimal_of(value: Any) -> Decimal:
    """A number of the old data as an exact Decimal: a float by its shortest repr."""
    if isinstance(value, bool) or value is None:
        raise BadValue(f"not a number: {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BadValue(f"not a finite number: {value!r}")
        return Decimal(repr(value))
    if isinstance(value, int):
        return Decimal(value)
    to_decimal = getattr(value, "to_decimal", None)  # bson's Decimal128
    d: Decimal | None = None
    try:
        if callable(to_decimal):
            d = to_decimal()
        elif isinstance(value, str):
            d = Decimal(value.strip())
    except (InvalidOperation, ValueError):
        d = None
    if d is None or not d.is_finite():
        raise BadValue(f"not a number: {str(value)[:40]!r}")
    return d


def units_of(value: Any) -> tuple[int, bool]:
    """Credits -> (micro-credits, exact). Not exact: it had more than 6 decimals and was
    rounded to the nearest micro-credit (half to even)."""
    d = decimal_of(value)
    if d.adjusted() > 15:
        raise BadValue(f"out of range: {value!r}")
    q = d.quantize(_MICRO, rounding=ROUND_HALF_EVEN)
    return int(q.scaleb(6)), q == d


def minor_of(value: Any) -> tuple[int, bool]:
    """An amount in minor units -> (integer, exact); not exact: it had a fraction, rounded."""
    d = decimal_of(value)
    if d.adjusted() > 15:
        raise BadValue(f"out of range: {value!r}")
    q = d.to_integral_value(rounding=ROUND_HALF_EVEN)
    return int(q), q == d


def ms_of(value: Any) -> int:
    """A time of the old data (a naive datetime is UTC) in ms since the epoch."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise BadValue(f"not a time: {value[:40]!r}") from None
    if not isinstance(value, datetime):
        raise BadValue(f"not a time: {str(value)[:40]!r}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)


def flag(value: Any) -> bool:
    """A boolean field as the old code read it (truthy)."""
    return bool(value)


def safe_id(raw: str) -> str:
    """An id of the old data usable inside the gateway's ids (op ids, plan and subscription
    ids): itself when it is plain, else a digest of it (the same every run)."""
    if len(raw) <= 64 and raw and all(c.isascii() and (c.isalnum() or c in "_-") for c in raw):
        return raw
    return "h" + hashlib.sha256(raw.encode()).hexdigest()[:40]


def user_of(doc: Doc) -> str:
    user = doc.get("user_id")
    if not isinstance(user, str) or not ID_PATTERN.fullmatch(user):
        raise BadValue(f"user_id {str(user)[:60]!r} is not a valid user id here")
    return user


async def read(uri: str, database: str, *, timeout_ms: int = 5000) -> dict[str, list[Doc]]:
    """Every document of the old package's collections, in the database's natural order."""
    from pymongo import AsyncMongoClient
    from pymongo.errors import PyMongoError

    try:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            uri, serverSelectionTimeoutMS=timeout_ms, tz_aware=False
        )
    except PyMongoError as exc:  # a URI pymongo cannot take (InvalidURI, ConfigurationError)
        raise SourceError(f"not a MongoDB URI: {exc}") from None
    try:
        try:
            await client.admin.command("ping")
            db = client[database]
            present = set(await db.list_collection_names())
        except PyMongoError as exc:
            raise SourceError(f"cannot read MongoDB at the given URI: {exc}") from None
        if not present & set(COLLECTIONS):
            raise SourceError(
                f"database {database!r} holds none of credit-management's collections "
                f"({', '.join(COLLECTIONS)}); check --db"
            )
        out: dict[str, list[Doc]] = {}
        for name in COLLECTIONS:
            docs: list[Doc] = []
            if name in present:
                try:
                    async for d in db[name].find({}):
                        raw = d.get("_id", d.get("id"))
                        docs.append(Doc(name, str(raw), d))
                except PyMongoError as exc:
                    raise SourceError(f"reading {name}: {exc}") from None
            out[name] = docs
        return out
    finally:
        await client.close()
