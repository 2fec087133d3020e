"""The durable schema, defined once: what every store creates and `credit-gateway schema` prints.

The SQL tables are rendered as SQLite's or PostgreSQL's DDL (`ddl(dialect)`); the SQL stores
run exactly these statements when they open, so the printed DDL and a store's catalog cannot
drift apart (tests/test_schema.py applies the printed DDL to an empty database and compares
the catalogs). MongoDB keeps the same records as documents, laid out its own way (an `_id`
instead of a composite key, a plan or promo as its fields rather than a JSON column): its
collections, indexes and `$jsonSchema` validators are in MONGO_COLLECTIONS, which the MongoDB
store applies when it opens.

Column types are logical: `int` (a 64-bit integer: micro-credits, epoch milliseconds,
counters; 0/1 for flags), `text` (JSON documents are text too) and `serial` (an
insertion-ordered integer key).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

Dialect = Literal["sqlite", "postgres"]
DIALECTS: tuple[Dialect, ...] = ("sqlite", "postgres")

INT, TEXT, SERIAL = "int", "text", "serial"


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str
    null: bool = True
    default: int | None = None
    unique: bool = False


@dataclass(frozen=True, slots=True)
class Index:
    name: str
    columns: tuple[str, ...]
    unique: bool = False
    where: str | None = None  # a partial index's predicate, in SQL both dialects read alike


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    indexes: tuple[Index, ...] = ()
    # SQLite: a rowid table appends its rows in order (the ledger's large rows); the others
    # are clustered on their key (WITHOUT ROWID).
    rowid: bool = False

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"{self.name}.{name}")


def _int(name: str, *, null: bool = False, default: int | None = None) -> Column:
    return Column(name, INT, null=null, default=default)


def _text(name: str, *, null: bool = False, unique: bool = False) -> Column:
    return Column(name, TEXT, null=null, unique=unique)


TABLES: tuple[Table, ...] = (
    # One row per event, unique on (user, op_id): the record Redis is rebuilt from.
    Table(
        "ledger",
        (
            Column("id", SERIAL),
            _text("user"),
            _text("op_id"),
            _text("type"),
            _int("version"),
            _int("ts_ms"),
            _int("amount"),
            _text("hold_id", null=True),
            _text("fingerprint", null=True),
            _text("event"),
        ),
        key=("id",),
        indexes=(
            Index("ledger_key", ("user", "op_id"), unique=True),
            Index("ledger_user_version", ("user", "version")),
        ),
        rowid=True,
    ),
    Table(
        "accounts",
        (
            _text("user"),
            _int("version"),
            _int("partition"),
            _int("available"),
            _int("held"),
            _int("debt"),
            _int("granted"),
            _int("spent"),
            _int("expired"),
            _int("seq"),
            _int("debt_total", default=0),
        ),
        key=("user",),
        indexes=(Index("accounts_partition", ("partition", "user")),),
    ),
    # A gone grant stays as a tombstone so that a late, older event cannot bring it back.
    Table(
        "grants",
        (
            _text("user"),
            _text("seq"),
            _int("version"),
            _int("free", null=True),
            _int("earmarked", null=True),
            _int("gone", default=0),
            _text("metadata", null=True),
            _int("expires_ms", null=True),
            _int("priority", null=True),
        ),
        key=("user", "seq"),
        indexes=(Index("grants_live", ("user", "seq"), where="gone = 0"),),
    ),
    Table(
        "holds",
        (
            _text("user"),
            _text("hold_id"),
            _int("version"),
            _text("status", null=True),
            _int("amount", null=True),
            _int("expires_ms", null=True),
            _int("charged", null=True),
            _int("open_version", default=0),
            _text("earmarks", null=True),
            _int("opened_ms", null=True),
            _text("op_id", null=True),
            _text("metadata", null=True),
        ),
        key=("user", "hold_id"),
        indexes=(Index("holds_open", ("user", "hold_id"), where="status = 'open'"),),
    ),
    Table(
        "api_keys",
        (
            _text("key_id"),
            _text("user"),
            _text("digest", unique=True),
            _text("prefix"),
            _text("name"),
            _int("created_ms"),
            _int("revoked_ms", null=True),
        ),
        key=("key_id",),
        indexes=(Index("api_keys_user", ("user", "created_ms")),),
        rowid=True,
    ),
    # The admin's overrides and, beside them, a subscriber's plan limits and models.
    Table(
        "rate_limits",
        (
            _text("user"),
            _int("requests_per_minute", null=True),
            _int("tokens_per_minute", null=True),
            _int("plan_requests_per_minute", null=True),
            _int("plan_tokens_per_minute", null=True),
            _text("allowed_models", null=True),
        ),
        key=("user",),
    ),
    Table(
        "payments",
        (
            _text("payment_id"),
            _text("user"),
            _text("provider"),
            _int("amount_minor"),
            _text("currency"),
            _int("credits"),
            _text("status"),
            _int("created_ms"),
            _int("updated_ms"),
            _text("pack", null=True),
            _text("description", null=True),
            _text("url", null=True),
            _text("link_id", null=True),
            _text("provider_payment_id", null=True),
            _text("session_id", null=True),
            _text("order_id", null=True),
            _int("paid_ms", null=True),
            _int("credited_ms", null=True),
            _int("refunded_minor", default=0),
            _int("refunded_credits", default=0),
            _text("error", null=True),
            _text("purpose", null=True),  # what the payment is for: a subscription's period
        ),
        key=("payment_id",),
        indexes=(
            Index("payments_user", ("user", "created_ms", "payment_id")),
            Index("payments_created", ("created_ms", "payment_id")),
            # reconcile's scan: only payments still to settle are in it
            Index(
                "payments_open",
                ("status", "created_ms"),
                where="status IN ('created', 'failed') OR credited_ms IS NULL",
            ),
            Index("payments_provider_id", ("provider", "provider_payment_id")),
        ),
    ),
    Table(
        "payment_events",
        (
            _text("provider"),
            _text("event_id"),
            _text("type"),
            _int("received_ms"),
            _text("body"),
            _text("payment_id", null=True),
            _text("outcome"),
            _int("status_code"),
        ),
        key=("provider", "event_id"),
        indexes=(Index("payment_events_payment", ("payment_id", "received_ms")),),
    ),
    Table(
        "payment_refunds",
        (
            _text("provider"),
            _text("refund_id"),
            _text("payment_id"),
            _int("amount_minor"),
            _int("credits"),
            _int("at_ms"),
            _int("debited_ms", null=True),
        ),
        key=("provider", "refund_id"),
        indexes=(Index("payment_refunds_payment", ("payment_id", "at_ms")),),
    ),
    Table(
        "payment_anomalies",
        (
            Column("id", SERIAL),
            _text("payment_id", null=True),
            _text("provider"),
            _text("event_id", null=True),
            _text("kind"),
            _text("detail"),
            _int("at_ms"),
        ),
        key=("id",),
        indexes=(Index("payment_anomalies_payment", ("payment_id", "at_ms")),),
        rowid=True,
    ),
    # One row per claim: the n-th claim of a code by a user.
    Table(
        "promo_claims",
        (_text("code"), _text("user"), _int("n"), _int("at_ms")),
        key=("code", "user", "n"),
    ),
    # A code's definition as JSON (store/promos.py) beside the columns the queries use.
    Table(
        "promos",
        (_text("code"), _int("active"), _int("created_ms"), _text("doc")),
        key=("code",),
    ),
    Table(
        "plans",
        (_text("plan_id"), _int("active"), _int("created_ms"), _text("doc")),
        key=("plan_id",),
    ),
    # `live_user` is the user while the subscription is live and `ended:<its id>` after, so
    # its unique constraint allows one live subscription per user.
    Table(
        "subscriptions",
        (
            _text("sub_id"),
            _text("user"),
            _text("live_user", unique=True),
            _int("next_action_ms", null=True),
            _int("created_ms"),
            _text("doc"),
        ),
        key=("sub_id",),
        indexes=(
            Index("subscriptions_user", ("user", "created_ms")),
            Index("subscriptions_due", ("next_action_ms",), where="next_action_ms IS NOT NULL"),
        ),
    ),
    # The notification outbox.
    Table(
        "notifications",
        (
            _text("id"),
            _text("dedup_key", unique=True),
            _text("user"),
            _text("kind"),
            _text("data"),
            _int("created_ms"),
            _text("status"),
            _int("attempts"),
            _int("next_attempt_ms"),
            _text("last_error", null=True),
            _int("delivered_ms", null=True),
            _int("pending_since_ms"),
            _text("lease", null=True),
        ),
        key=("id",),
        indexes=(
            # the delivery loop's claim: only pending rows are in it
            Index("notifications_due", ("next_attempt_ms",), where="status = 'pending'"),
            Index("notifications_user", ("user", "id")),
        ),
    ),
    # One row per account with a threshold set or a notification flag changed.
    Table(
        "notify_accounts",
        (
            _text("user"),
            _int("version"),
            _int("low_armed"),
            _int("low_epoch"),
            _int("debt_armed"),
            _int("debt_epoch"),
            _int("low_balance_threshold", null=True),
        ),
        key=("user",),
    ),
)

TABLE = {t.name: t for t in TABLES}

# Names PostgreSQL reserves (SQLite takes them as they are).
_RESERVED = {"user"}

_TYPES: dict[Dialect, dict[str, str]] = {
    "sqlite": {INT: "INTEGER", TEXT: "TEXT", SERIAL: "INTEGER"},
    # Text compares in byte order (COLLATE "C"), as SQLite's does: pages and listings come out
    # in the same order on both, whatever collation the database was made with.
    "postgres": {INT: "BIGINT", TEXT: 'TEXT COLLATE "C"', SERIAL: "BIGINT GENERATED BY DEFAULT AS IDENTITY"},
}


def ident(name: str, dialect: Dialect) -> str:
    return f'"{name}"' if dialect == "postgres" and name in _RESERVED else name


def column_sql(table: Table, column: Column, dialect: Dialect) -> str:
    """One column's definition, as CREATE TABLE and ALTER TABLE ... ADD COLUMN take it."""
    parts = [ident(column.name, dialect), _TYPES[dialect][column.type]]
    if not column.null:
        parts.append("NOT NULL")
    if table.key == (column.name,):
        parts.append("PRIMARY KEY")  # SQLite: an INTEGER key inline is the rowid itself
    if column.default is not None:
        parts.append(f"DEFAULT {column.default}")
    if column.unique:
        parts.append("UNIQUE")
    return " ".join(parts)


def create_table(table: Table, dialect: Dialect) -> str:
    lines = [column_sql(table, c, dialect) for c in table.columns]
    if len(table.key) > 1:
        lines.append(f"PRIMARY KEY ({', '.join(ident(k, dialect) for k in table.key)})")
    body = ",\n    ".join(lines)
    tail = " WITHOUT ROWID" if dialect == "sqlite" and not table.rowid else ""
    return f"CREATE TABLE IF NOT EXISTS {table.name} (\n    {body}\n){tail}"


def create_index(table: Table, index: Index, dialect: Dialect) -> str:
    unique = "UNIQUE " if index.unique else ""
    cols = ", ".join(ident(c, dialect) for c in index.columns)
    where = f" WHERE {index.where}" if index.where else ""
    return f"CREATE {unique}INDEX IF NOT EXISTS {index.name} ON {table.name}({cols}){where}"


def ddl(dialect: Dialect, tables: tuple[Table, ...] = TABLES) -> list[str]:
    """Every statement that creates the schema (each idempotent), tables before their indexes."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown SQL dialect {dialect!r} (known: {', '.join(DIALECTS)})")
    out: list[str] = []
    for table in tables:
        out.append(create_table(table, dialect))
        out.extend(create_index(table, index, dialect) for index in table.indexes)
    return out


def ddl_script(dialect: Dialect) -> str:
    return "".join(f"{statement};\n\n" for statement in ddl(dialect))


# -- MongoDB ---------------------------------------------------------------------------------

LONG = ["int", "long"]  # the stores write Int64; a hand-made document may hold an int32


@dataclass(frozen=True, slots=True)
class MongoIndex:
    keys: tuple[tuple[str, int], ...]  # (field, 1 | -1)
    unique: bool = False

    @property
    def name(self) -> str:  # MongoDB's own default name, so an existing index is found again
        return "_".join(f"{f}_{d}" for f, d in self.keys)


@dataclass(frozen=True, slots=True)
class MongoCollection:
    name: str
    # field -> accepted BSON types; `required` are in every document the store writes (each
    # write path, upserts included), the others are checked when present.
    fields: dict[str, list[str]]
    required: tuple[str, ...] = ()
    indexes: tuple[MongoIndex, ...] = ()

    def validator(self) -> dict[str, Any]:
        schema: dict[str, Any] = {
            "bsonType": "object",
            "properties": {f: {"bsonType": t} for f, t in self.fields.items()},
        }
        if self.required:
            schema["required"] = list(self.required)
        return {"$jsonSchema": schema}


def _nullable(*types: str) -> list[str]:
    return [*types, "null"]


def _asc(*fields: str) -> tuple[tuple[str, int], ...]:
    return tuple((f, 1) for f in fields)


MONGO_COLLECTIONS: tuple[MongoCollection, ...] = (
    MongoCollection(
        "ledger",
        {
            "user_id": ["string"],
            "op_id": ["string"],
            "type": ["string"],
            "version": LONG,
            "ts_ms": LONG,
            "amount": LONG,
            "hold_id": _nullable("string"),
            "fingerprint": _nullable("string"),
            "event": ["string"],
        },
        required=("user_id", "op_id", "type", "version", "ts_ms", "amount", "event"),
        indexes=(
            MongoIndex(_asc("user_id", "op_id"), unique=True),
            MongoIndex(_asc("user_id", "version")),
            MongoIndex(_asc("ts_ms")),
        ),
    ),
    MongoCollection(
        "accounts",  # _id = user; the SQL table's integer columns
        {c.name: LONG for c in TABLE["accounts"].columns if c.type == INT},
        required=("version",),
        indexes=(MongoIndex(_asc("partition")),),
    ),
    MongoCollection(
        "grants",  # _id = "user|seq"
        {
            "user_id": ["string"],
            "seq": ["string"],
            "version": LONG,
            "free": LONG,
            "earmarked": LONG,
            "gone": ["bool"],
            "metadata": _nullable("string"),
            "expires_ms": LONG,
            "priority": _nullable(*LONG),
        },
        required=("user_id", "seq", "version", "gone"),
        indexes=(
            MongoIndex(_asc("user_id", "seq")),
            MongoIndex(_asc("expires_ms")),  # the expiring-credit scan
        ),
    ),
    MongoCollection(
        "holds",  # _id = "user|hold_id"
        {
            "user_id": ["string"],
            "hold_id": ["string"],
            "version": LONG,
            "status": _nullable("string"),
            "amount": LONG,
            "expires_ms": LONG,
            "charged": _nullable(*LONG),
            "open_version": LONG,
            "earmarks": _nullable("string"),
            "opened_ms": LONG,
            "op_id": _nullable("string"),
            "metadata": _nullable("string"),
        },
        required=("user_id", "hold_id", "version"),
        indexes=(MongoIndex(_asc("user_id", "status")),),
    ),
    MongoCollection(
        "api_keys",  # _id = key id
        {
            "user_id": ["string"],
            "digest": ["string"],
            "prefix": ["string"],
            "name": ["string"],
            "created_ms": LONG,
            "revoked_ms": _nullable(*LONG),
        },
        required=("user_id", "digest", "created_ms"),
        indexes=(MongoIndex(_asc("digest"), unique=True), MongoIndex(_asc("user_id", "created_ms"))),
    ),
    MongoCollection(
        "rate_limits",  # _id = user
        {
            "requests_per_minute": _nullable(*LONG),
            "tokens_per_minute": _nullable(*LONG),
            "plan_requests_per_minute": _nullable(*LONG),
            "plan_tokens_per_minute": _nullable(*LONG),
            "allowed_models": _nullable("array"),
        },
    ),
    MongoCollection(
        "payments",  # _id = payment id
        {
            "user_id": ["string"],
            "provider": ["string"],
            "amount_minor": LONG,
            "currency": ["string"],
            "credits": LONG,
            "status": ["string"],
            "created_ms": LONG,
            "updated_ms": LONG,
            "paid_ms": _nullable(*LONG),
            "credited_ms": _nullable(*LONG),
            "refunded_minor": _nullable(*LONG),
            "refunded_credits": _nullable(*LONG),
        },
        required=("user_id", "provider", "amount_minor", "currency", "credits", "status", "created_ms"),
        indexes=(
            MongoIndex((("user_id", 1), ("created_ms", -1), ("_id", -1))),
            MongoIndex((("created_ms", -1), ("_id", -1))),
            MongoIndex(_asc("status", "created_ms")),
            MongoIndex(_asc("provider", "provider_payment_id")),
        ),
    ),
    MongoCollection(
        "payment_events",  # _id = "provider|event id"
        {
            "provider": ["string"],
            "event_id": ["string"],
            "type": ["string"],
            "received_ms": LONG,
            "body": ["string"],
            "payment_id": _nullable("string"),
            "outcome": ["string"],
            "status_code": LONG,
        },
        required=("provider", "event_id", "type", "received_ms", "body", "outcome", "status_code"),
        indexes=(MongoIndex(_asc("payment_id", "received_ms")),),
    ),
    MongoCollection(
        "payment_refunds",  # _id = "provider|refund id"
        {
            "provider": ["string"],
            "refund_id": ["string"],
            "payment_id": ["string"],
            "amount_minor": LONG,
            "credits": LONG,
            "at_ms": LONG,
            "debited_ms": _nullable(*LONG),
        },
        required=("provider", "refund_id", "payment_id", "amount_minor", "credits", "at_ms"),
        indexes=(MongoIndex(_asc("payment_id", "at_ms")),),
    ),
    MongoCollection(
        "payment_anomalies",
        {
            "payment_id": _nullable("string"),
            "provider": ["string"],
            "event_id": _nullable("string"),
            "kind": ["string"],
            "detail": ["object"],
            "at_ms": LONG,
        },
        required=("provider", "kind", "detail", "at_ms"),
        indexes=(MongoIndex(_asc("payment_id", "at_ms")),),
    ),
    MongoCollection(
        "promo_claims",  # _id = "code|user|n"
        {"code": ["string"], "user_id": ["string"], "n": LONG, "at_ms": LONG},
        required=("code", "user_id", "n", "at_ms"),
        indexes=(MongoIndex(_asc("code", "user_id")),),
    ),
    MongoCollection(
        "promos",  # _id = code; the code's fields (store/promos.py)
        {
            "code": ["string"],
            "credits": LONG,
            "max_uses_per_user": LONG,
            "active": ["bool"],
            "created_ms": LONG,
            "updated_ms": LONG,
        },
        required=("code", "credits", "active", "created_ms"),
    ),
    MongoCollection(
        "plans",  # _id = plan id; the plan's fields (store/plans.py)
        {
            "plan_id": ["string"],
            "name": ["string"],
            "credits": LONG,
            "period": ["string"],
            "price_minor": LONG,
            "currency": ["string"],
            "rollover": ["bool"],
            "active": ["bool"],
            "created_ms": LONG,
            "updated_ms": LONG,
        },
        required=("plan_id", "name", "credits", "period", "price_minor", "currency", "active", "created_ms"),
    ),
    MongoCollection(
        "subscriptions",  # _id = subscription id; the subscription's fields (store/plans.py)
        {
            "sub_id": ["string"],
            "user": ["string"],
            "plan_id": ["string"],
            "paid": ["bool"],
            "status": ["string"],
            "live_user": ["string"],
            "due_ms": LONG,
            "created_ms": LONG,
            "rev": LONG,
        },
        required=("sub_id", "user", "plan_id", "status", "live_user", "due_ms", "created_ms", "rev"),
        indexes=(
            MongoIndex(_asc("live_user"), unique=True),
            MongoIndex(_asc("user", "created_ms")),
            MongoIndex(_asc("due_ms")),
        ),
    ),
    MongoCollection(
        "notifications",
        {
            "id": ["string"],
            "dedup_key": ["string"],
            "user_id": ["string"],
            "kind": ["string"],
            "created_ms": LONG,
            "status": ["string"],
            "attempts": LONG,
            "next_attempt_ms": LONG,
            "delivered_ms": _nullable(*LONG),
        },
        required=(
            "id",
            "dedup_key",
            "user_id",
            "kind",
            "created_ms",
            "status",
            "attempts",
            "next_attempt_ms",
        ),
        indexes=(
            MongoIndex(_asc("id"), unique=True),
            MongoIndex(_asc("status", "next_attempt_ms")),
            MongoIndex((("user_id", 1), ("id", -1))),
        ),
    ),
    MongoCollection(
        "notify_accounts",  # _id = user
        {
            "version": LONG,
            "low_armed": ["bool"],
            "low_epoch": LONG,
            "debt_armed": ["bool"],
            "debt_epoch": LONG,
            "low_balance_threshold": _nullable(*LONG),
        },
    ),
    MongoCollection("meta", {"version": LONG}),  # _id = "schema": the schema version
)

MONGO_COLLECTION = {c.name: c for c in MONGO_COLLECTIONS}


def mongo_spec() -> list[dict[str, Any]]:
    """The collections as `credit-gateway schema --backend mongo` prints them: each with the
    options of its createCollection and the indexes of its createIndexes."""
    return [
        {
            "name": c.name,
            "options": {"validator": c.validator(), "validationLevel": "moderate"},
            "indexes": [
                {"name": i.name, "key": dict(i.keys), **({"unique": True} if i.unique else {})}
                for i in c.indexes
            ],
        }
        for c in MONGO_COLLECTIONS
    ]


def mongo_script() -> str:
    return json.dumps(mongo_spec(), indent=2) + "\n"
