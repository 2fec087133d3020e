"""The SQL both relational stores run (SQLite and PostgreSQL), written once.

Statements are in SQLite's spelling with `?` placeholders; `numbered` turns them into
PostgreSQL's `$1, $2...`. They keep to what both dialects read the same way: `"user"` is
quoted (a reserved word in PostgreSQL, an identifier to SQLite), a larger of two values is
a CASE (SQLite's max(a, b) is GREATEST in PostgreSQL), flags stored as integers are
compared with 0. Where the two differ (a batch's rows: SQLite binds each row, PostgreSQL
unnests one array per column; locking and index hints), each store adds its own part.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import orjson

from .base import RateLimitOverride
from .batch import GrantRow, HoldRow
from .notifications import NOTIFICATION_FIELDS, ExpiringGrant, NotificationRecord, NotifyFlags
from .payments import PAYMENT_FIELDS
from .plans import SubscriptionRecord, sub_doc
from .schema import TABLE


def quoted(cols: tuple[str, ...] | list[str]) -> str:
    """A column list, `user` quoted."""
    return ", ".join('"user"' if c == "user" else c for c in cols)


@lru_cache(maxsize=512)
def numbered(statement: str) -> str:
    """The statement with PostgreSQL's placeholders: the n-th `?` becomes `$n` (no
    statement here has a `?` inside a string literal)."""
    parts = statement.split("?")
    out = [parts[0]]
    for i, part in enumerate(parts[1:], 1):
        out.append(f"${i}{part}")
    return "".join(out)


def marks(n: int) -> str:
    return ", ".join("?" * n)


# -- the write path: each store supplies the rows (VALUES or unnest) ------------------------

LEDGER_COLS_IN = ("user", "op_id", "type", "version", "ts_ms", "amount", "hold_id", "fingerprint", "event")
LEDGER_INSERT = f"INSERT INTO ledger ({quoted(LEDGER_COLS_IN)})"

ACCOUNT_FIELDS = tuple(c.name for c in TABLE["accounts"].columns)
ACCOUNT_COLS = quoted(ACCOUNT_FIELDS)
ACCOUNT_INSERT = f"INSERT INTO accounts ({ACCOUNT_COLS})"
ACCOUNT_CONFLICT = """
ON CONFLICT ("user") DO UPDATE SET
    version = excluded.version, partition = excluded.partition, available = excluded.available,
    held = excluded.held, debt = excluded.debt, granted = excluded.granted,
    spent = excluded.spent, expired = excluded.expired, seq = excluded.seq,
    debt_total = CASE WHEN excluded.debt_total > accounts.debt_total
        THEN excluded.debt_total ELSE accounts.debt_total END
WHERE excluded.version > accounts.version
"""

GRANT_INSERT = (
    'INSERT INTO grants ("user", seq, version, free, earmarked, gone, metadata, expires_ms, priority)'
)
# Every SET expression reads the row as it was before the update.
GRANT_CONFLICT = """
ON CONFLICT ("user", seq) DO UPDATE SET
    free = CASE WHEN excluded.version > grants.version THEN excluded.free ELSE grants.free END,
    earmarked = CASE WHEN excluded.version > grants.version
        THEN excluded.earmarked ELSE grants.earmarked END,
    gone = CASE WHEN excluded.version > grants.version THEN excluded.gone ELSE grants.gone END,
    version = CASE WHEN excluded.version > grants.version THEN excluded.version ELSE grants.version END,
    metadata = coalesce(grants.metadata, excluded.metadata),
    expires_ms = coalesce(grants.expires_ms, excluded.expires_ms),
    priority = coalesce(grants.priority, excluded.priority)
"""

HOLD_INSERT = """INSERT INTO holds ("user", hold_id, version, status, amount, expires_ms, charged,
    open_version, earmarks, opened_ms, op_id, metadata)"""
HOLD_CONFLICT = """
ON CONFLICT ("user", hold_id) DO UPDATE SET
    status = CASE WHEN excluded.version > holds.version THEN excluded.status ELSE holds.status END,
    amount = CASE WHEN excluded.version > holds.version THEN excluded.amount ELSE holds.amount END,
    expires_ms = CASE WHEN excluded.version > holds.version
        THEN excluded.expires_ms ELSE holds.expires_ms END,
    charged = CASE WHEN excluded.version > holds.version THEN excluded.charged ELSE holds.charged END,
    version = CASE WHEN excluded.version > holds.version THEN excluded.version ELSE holds.version END,
    earmarks = CASE WHEN excluded.open_version > holds.open_version
        THEN excluded.earmarks ELSE holds.earmarks END,
    opened_ms = CASE WHEN excluded.open_version > holds.open_version
        THEN excluded.opened_ms ELSE holds.opened_ms END,
    op_id = CASE WHEN excluded.open_version > holds.open_version THEN excluded.op_id ELSE holds.op_id END,
    metadata = CASE WHEN excluded.open_version > holds.open_version
        THEN excluded.metadata ELSE holds.metadata END,
    open_version = CASE WHEN excluded.open_version > holds.open_version
        THEN excluded.open_version ELSE holds.open_version END
"""


def grant_rows(rows: list[GrantRow]) -> list[tuple[Any, ...]]:
    """GrantRows in GRANT_INSERT's column order."""
    return [
        (g.user, g.seq, g.version, g.free, g.earmarked, int(g.gone), g.metadata, g.expires_ms, g.priority)
        for g in rows
    ]


def hold_rows(rows: list[HoldRow]) -> list[tuple[Any, ...]]:
    """HoldRows in HOLD_INSERT's column order."""
    return [
        (
            h.user,
            h.hold_id,
            h.version,
            h.status,
            h.amount,
            h.expires_ms,
            h.charged,
            h.open_version,
            h.earmarks,
            h.opened_ms,
            h.op_id,
            h.metadata,
        )
        for h in rows
    ]


# -- reads ------------------------------------------------------------------------------------

LEDGER_COLS = '"user", op_id, type, version, ts_ms, amount, hold_id, event'
LEDGER_NEWEST = f'SELECT {LEDGER_COLS} FROM ledger WHERE "user" = ? ORDER BY version DESC LIMIT ?'
LEDGER_BEFORE = (
    f'SELECT {LEDGER_COLS} FROM ledger WHERE "user" = ? AND version < ? ORDER BY version DESC LIMIT ?'
)
LEDGER_AFTER = f'SELECT {LEDGER_COLS} FROM ledger WHERE "user" = ? AND version > ? ORDER BY version LIMIT ?'
ACCOUNT_OF = f'SELECT {ACCOUNT_COLS} FROM accounts WHERE "user" = ?'
ACCOUNTS_AFTER = f'SELECT {ACCOUNT_COLS} FROM accounts WHERE "user" > ? ORDER BY "user" LIMIT ?'
PARTITION_AFTER = (
    f'SELECT {ACCOUNT_COLS} FROM accounts WHERE partition = ? AND "user" > ? ORDER BY "user" LIMIT ?'
)
# Rebuild only: scans in insertion order (no index to keep up on every write); the filter
# runs in the database, only caller operations of the window come back.
OPERATIONS_AFTER = (
    'SELECT id, "user", op_id, fingerprint, event, ts_ms FROM ledger '
    "WHERE id > ? AND ts_ms >= ? AND fingerprint IS NOT NULL ORDER BY id LIMIT ?"
)
RESOLVED_AFTER = (
    'SELECT "user", hold_id, status, expires_ms FROM holds WHERE ("user", hold_id) > (?, ?) '
    "AND status IN ('settled', 'released', 'expired') AND expires_ms >= ? "
    'ORDER BY "user", hold_id LIMIT ?'
)
LEDGER_HAS = 'SELECT 1 FROM ledger WHERE "user" = ? AND op_id = ?'
FIRST_SEEN = 'SELECT min(ts_ms) FROM ledger WHERE "user" = ?'

# -- API keys and rate-limit overrides ------------------------------------------------------

KEY_COLS = 'key_id, "user", digest, prefix, name, created_ms, revoked_ms'
KEY_INSERT = f"INSERT INTO api_keys ({KEY_COLS}) VALUES ({marks(7)})"
KEY_REVOKE = 'UPDATE api_keys SET revoked_ms = coalesce(revoked_ms, ?) WHERE "user" = ? AND key_id = ?'
KEY_OF = f'SELECT {KEY_COLS} FROM api_keys WHERE "user" = ? AND key_id = ?'
KEYS_OF = f'SELECT {KEY_COLS} FROM api_keys WHERE "user" = ? ORDER BY created_ms, key_id'
KEYS_ACTIVE = f"SELECT {KEY_COLS} FROM api_keys WHERE revoked_ms IS NULL ORDER BY key_id"

LIMIT_COLS = (
    '"user", requests_per_minute, tokens_per_minute, plan_requests_per_minute, plan_tokens_per_minute, '
    "allowed_models"
)
LIMITS_OF = f'SELECT {LIMIT_COLS} FROM rate_limits WHERE "user" = ?'
LIMITS_ALL = f'SELECT {LIMIT_COLS} FROM rate_limits ORDER BY "user"'
LIMITS_DELETE = 'DELETE FROM rate_limits WHERE "user" = ?'


def limits_upsert(values: dict[str, Any]) -> str:
    """Sets these limit columns of a user's row (the user first, then the values)."""
    cols = ", ".join(values)
    sets = ", ".join(f"{c} = excluded.{c}" for c in values)
    return (
        f'INSERT INTO rate_limits ("user", {cols}) VALUES ({marks(len(values) + 1)}) '
        f'ON CONFLICT ("user") DO UPDATE SET {sets}'
    )


def models_json(models: list[str] | None) -> str | None:
    """The allowed models as the relational stores keep them: JSON text."""
    return None if models is None else json.dumps(models)


def limits_of(row: Any) -> RateLimitOverride:
    models = json.loads(row[5]) if row[5] is not None else None
    user, rpm, tpm, plan_rpm, plan_tpm = row[:5]
    return RateLimitOverride(user, rpm, tpm, plan_rpm, plan_tpm, models)


# -- payments (store/payments.py) ------------------------------------------------------------

PAYMENT_COLS = quoted(PAYMENT_FIELDS)
PAYMENT_INSERT = f"INSERT INTO payments ({PAYMENT_COLS}) VALUES ({marks(len(PAYMENT_FIELDS))})"
PAYMENT_OF = f"SELECT {PAYMENT_COLS} FROM payments WHERE payment_id = ?"
PAYMENT_BY_PROVIDER_ID = (
    f"SELECT {PAYMENT_COLS} FROM payments WHERE provider = ? AND provider_payment_id = ? "
    "ORDER BY created_ms LIMIT 1"
)
PAYMENTS_TO_RECONCILE = (
    f"SELECT {PAYMENT_COLS} FROM payments WHERE created_ms < ? AND (status IN ('created', 'failed') "
    "OR (status IN ('paid', 'partially_refunded', 'refunded') AND credited_ms IS NULL)) "
    "ORDER BY created_ms LIMIT ?"
)
EVENT_COLS = "provider, event_id, type, received_ms, body, payment_id, outcome, status_code"
EVENT_INSERT = (
    f"INSERT INTO payment_events ({EVENT_COLS}) VALUES ({marks(8)}) "
    "ON CONFLICT (provider, event_id) DO NOTHING"
)
EVENT_OF = f"SELECT {EVENT_COLS} FROM payment_events WHERE provider = ? AND event_id = ?"
EVENT_FINISH = (
    "UPDATE payment_events SET outcome = ?, status_code = ?, "
    "payment_id = coalesce(?, payment_id) WHERE provider = ? AND event_id = ?"
)
EVENTS_OF = f"SELECT {EVENT_COLS} FROM payment_events WHERE payment_id = ? ORDER BY received_ms, event_id"
REFUND_COLS = "provider, refund_id, payment_id, amount_minor, credits, at_ms, debited_ms"
REFUND_INSERT = (
    f"INSERT INTO payment_refunds ({REFUND_COLS}) VALUES ({marks(7)}) "
    "ON CONFLICT (provider, refund_id) DO NOTHING"
)
REFUND_OF = f"SELECT {REFUND_COLS} FROM payment_refunds WHERE provider = ? AND refund_id = ?"
REFUND_DEBITED = (
    "UPDATE payment_refunds SET debited_ms = ? WHERE provider = ? AND refund_id = ? AND debited_ms IS NULL"
)
REFUNDS_OF = f"SELECT {REFUND_COLS} FROM payment_refunds WHERE payment_id = ? ORDER BY at_ms, refund_id"
REFUNDS_TO_RECONCILE = (
    f"SELECT {REFUND_COLS} FROM payment_refunds WHERE debited_ms IS NULL AND at_ms < ? ORDER BY at_ms"
)
ANOMALY_COLS = "payment_id, provider, event_id, kind, detail, at_ms"
ANOMALY_INSERT = f"INSERT INTO payment_anomalies ({ANOMALY_COLS}) VALUES ({marks(6)})"
ANOMALIES_OF = f"SELECT {ANOMALY_COLS} FROM payment_anomalies WHERE payment_id = ? ORDER BY at_ms, id"
ANOMALIES_RECENT = f"SELECT {ANOMALY_COLS} FROM payment_anomalies ORDER BY at_ms DESC, id DESC LIMIT ?"


def listing(
    select: str, equal: dict[str, Any], page: tuple[str, list[Any]] | None, order: str, limit: int
) -> tuple[str, list[Any]]:
    """`select` filtered by the columns of `equal` that are not None and by the page's
    condition, in `order`, at most `limit` rows: the statement and its arguments."""
    where = [f"{quoted([col])} = ?" for col, value in equal.items() if value is not None]
    args = [value for value in equal.values() if value is not None]
    if page is not None:
        where.append(page[0])
        args += page[1]
    statement = select + (" WHERE " + " AND ".join(where) if where else "") + f" ORDER BY {order} LIMIT ?"
    return statement, [*args, limit]


def list_payments(
    user: str | None, status: str | None, provider: str | None, limit: int, before: tuple[int, str] | None
) -> tuple[str, list[Any]]:
    """The statement and arguments of PaymentStore.list_payments."""
    page = None
    if before is not None:
        page = ("(created_ms < ? OR (created_ms = ? AND payment_id < ?))", [before[0], before[0], before[1]])
    equal = {"user": user, "status": status, "provider": provider}
    select = f"SELECT {PAYMENT_COLS} FROM payments"
    return listing(select, equal, page, "created_ms DESC, payment_id DESC", limit)


def update_payment(
    payment_id: str, changes: dict[str, Any], from_status: list[str] | None, unset: str | None
) -> tuple[str, list[Any]]:
    """The conditional update of PaymentStore.update_payment; refuses unknown fields."""
    bad = set(changes) - set(PAYMENT_FIELDS) - {"payment_id"}
    if bad or "payment_id" in changes or (unset is not None and unset not in PAYMENT_FIELDS):
        raise ValueError(f"not payment fields: {sorted(bad) or unset}")
    sets = ", ".join(f"{quoted([k])} = ?" for k in changes)
    statement = f"UPDATE payments SET {sets} WHERE payment_id = ?"
    args: list[Any] = [*changes.values(), payment_id]
    if from_status is not None:
        statement += f" AND status IN ({marks(len(from_status))})"
        args += from_status
    if unset is not None:
        statement += f" AND {quoted([unset])} IS NULL"
    return statement, args


# -- promo codes and plans (store/promos.py, store/plans.py): a record as JSON in `doc` -------

PROMO_INSERT = f"INSERT INTO promos VALUES ({marks(4)})"
PROMO_OF = "SELECT doc FROM promos WHERE code = ?"
PROMO_SET = "UPDATE promos SET active = ?, doc = ? WHERE code = ?"
PROMO_CLAIM = f"INSERT INTO promo_claims VALUES ({marks(4)}) ON CONFLICT DO NOTHING"
PROMO_CLAIMS = 'SELECT "user", n, at_ms FROM promo_claims WHERE code = ? ORDER BY "user", n'


def promos_listed(active_only: bool) -> str:
    return (
        "SELECT doc FROM promos" + (" WHERE active = 1" if active_only else "") + " ORDER BY created_ms, code"
    )


PLAN_INSERT = f"INSERT INTO plans VALUES ({marks(4)})"
PLAN_OF = "SELECT doc FROM plans WHERE plan_id = ?"
PLAN_SET = "UPDATE plans SET active = ?, doc = ? WHERE plan_id = ?"
SUB_INSERT = f"INSERT INTO subscriptions VALUES ({marks(6)})"
SUB_OF = "SELECT doc FROM subscriptions WHERE sub_id = ?"
SUB_SET = "UPDATE subscriptions SET live_user = ?, next_action_ms = ?, doc = ? WHERE sub_id = ?"
SUBS_OF = 'SELECT doc FROM subscriptions WHERE "user" = ? ORDER BY created_ms DESC, sub_id DESC'
SUBS_DUE = (
    "SELECT doc FROM subscriptions WHERE next_action_ms IS NOT NULL AND next_action_ms <= ? "
    "ORDER BY next_action_ms LIMIT ?"
)
SUBS_LIVE = 'SELECT doc FROM subscriptions WHERE live_user = "user" ORDER BY "user"'


def live_user(s: SubscriptionRecord) -> str:
    """`live_user`: the user while the subscription is live and `ended:<its id>` after, so
    a unique index allows one live subscription per user."""
    return s.user if s.live else f"ended:{s.sub_id}"


def subscription_row(s: SubscriptionRecord) -> tuple[Any, ...]:
    """A subscription in SUB_INSERT's column order."""
    return (s.sub_id, s.user, live_user(s), s.next_action_ms, s.created_ms, json.dumps(sub_doc(s)))


def plans_listed(active_only: bool) -> str:
    where = " WHERE active = 1" if active_only else ""
    return f"SELECT doc FROM plans{where} ORDER BY created_ms, plan_id"


# -- notifications (store/notifications.py) --------------------------------------------------

NOTE_COLS = quoted(NOTIFICATION_FIELDS)
NOTE_INSERT = f"INSERT INTO notifications ({NOTE_COLS})"
NOTE_OF = f"SELECT {NOTE_COLS} FROM notifications WHERE id = ?"
FLAG_COLS = '"user", version, low_armed, low_epoch, debt_armed, debt_epoch, low_balance_threshold'
FLAG_INSERT = f"INSERT INTO notify_accounts ({FLAG_COLS})"
# The detector's flags: only over a row evaluated at an older version; never the threshold.
FLAG_CONFLICT = """
ON CONFLICT ("user") DO UPDATE SET
    version = excluded.version, low_armed = excluded.low_armed, low_epoch = excluded.low_epoch,
    debt_armed = excluded.debt_armed, debt_epoch = excluded.debt_epoch
WHERE excluded.version > notify_accounts.version
"""
# An admin's threshold: set, and the low-balance flag re-armed (a new epoch if it was not).
SET_THRESHOLD = f"""
{FLAG_INSERT} VALUES (?, 0, 1, 0, 1, 0, ?)
ON CONFLICT ("user") DO UPDATE SET
    low_balance_threshold = excluded.low_balance_threshold,
    low_epoch = CASE WHEN notify_accounts.low_armed <> 0 THEN notify_accounts.low_epoch
        ELSE notify_accounts.low_epoch + 1 END,
    low_armed = 1
"""
FLAGS_OF = f'SELECT {FLAG_COLS} FROM notify_accounts WHERE "user" = ?'
THRESHOLDS = (
    'SELECT "user", low_balance_threshold FROM notify_accounts WHERE low_balance_threshold IS NOT NULL'
)
# The claim's outer conditions, repeated from its inner select: a row another claim moved
# meanwhile no longer matches.
CLAIM_SET = "UPDATE notifications SET next_attempt_ms = ?, lease = ?"
CLAIM_DUE = "status = 'pending' AND next_attempt_ms <= ?"
RESEND = (
    "UPDATE notifications SET status = 'pending', attempts = 0, next_attempt_ms = ?, "
    "pending_since_ms = ?, last_error = NULL, delivered_ms = NULL, lease = NULL "
    "WHERE id = ? AND (lease IS NULL OR next_attempt_ms <= ?)"
)
PRUNE = "DELETE FROM notifications WHERE id < ? AND status IN ('delivered', 'failed')"
# A page of the primary key first (bounded work), then the store filters it.
GRANTS_PAGE = (
    'SELECT "user", seq, free, expires_ms, metadata, gone FROM grants '
    'WHERE ("user", seq) > (?, ?) ORDER BY "user", seq LIMIT ?'
)


def note_row(n: NotificationRecord) -> tuple[Any, ...]:
    """A notification in NOTE_INSERT's column order."""
    return tuple(orjson.dumps(n.data).decode() if f == "data" else getattr(n, f) for f in NOTIFICATION_FIELDS)


def note_of(row: Any) -> NotificationRecord:
    d = dict(zip(NOTIFICATION_FIELDS, row, strict=True))
    d["data"] = json.loads(d["data"])
    return NotificationRecord(**d)


def flags_row(f: NotifyFlags) -> tuple[Any, ...]:
    """The detector's part of an account's flags, in FLAG_INSERT's order (no threshold)."""
    return (f.user, f.version, int(f.low_armed), f.low_epoch, int(f.debt_armed), f.debt_epoch)


def flags_of(row: Any) -> NotifyFlags:
    user, version, low_armed, low_epoch, debt_armed, debt_epoch, threshold = row
    return NotifyFlags(user, version, bool(low_armed), low_epoch, bool(debt_armed), debt_epoch, threshold)


def list_notifications(
    user: str | None, kind: str | None, status: str | None, before: str | None, limit: int
) -> tuple[str, list[Any]]:
    """The statement and arguments of NotificationStore.list_notifications."""
    page = None if before is None else ("id < ?", [before])
    equal = {"user": user, "kind": kind, "status": status}
    return listing(f"SELECT {NOTE_COLS} FROM notifications", equal, page, "id DESC", limit)


def finish_notification(notification_id: str, token: str, changes: dict[str, Any]) -> tuple[str, list[Any]]:
    """The lease holder's update of NotificationStore.finish_notification."""
    cols = [c for c in changes if c in NOTIFICATION_FIELDS and c not in ("id", "lease")]
    sets = ", ".join(f"{quoted([c])} = ?" for c in cols)
    statement = f"UPDATE notifications SET {sets}, lease = NULL WHERE id = ? AND lease = ?"
    return statement, [*(changes[c] for c in cols), notification_id, token]


# -- PostgreSQL's side: a batch as arrays, command statuses ---------------------------------


def unnest(types: tuple[str, ...], first: int = 1) -> str:
    """`SELECT * FROM unnest($1::t1[], ...)`: rows from one array parameter per column (the
    parameters numbered from `first`)."""
    return "SELECT * FROM unnest(" + ", ".join(f"${i}::{t}[]" for i, t in enumerate(types, first)) + ")"


def columns(rows: list[Any], width: int) -> list[Any]:
    """The rows as one list per column (the arguments of an unnest statement)."""
    return [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


def affected(status: str) -> int:
    """The row count of a command status ("INSERT 0 12", "UPDATE 3", "DELETE 0")."""
    return int(status.rsplit(" ", 1)[-1])


def expiring(
    rows: list[Any], from_ms: int, until_ms: int, limit: int
) -> tuple[list[ExpiringGrant], tuple[str, str] | None]:
    """A page of GRANTS_PAGE filtered to the live grants with free credit expiring in
    (from_ms, until_ms], and where the next page starts."""
    found = [
        ExpiringGrant(u, s, int(free), int(exp), meta)
        for u, s, free, exp, meta, gone in rows
        if not gone and free and exp and from_ms < exp <= until_ms
    ]
    nxt = (rows[-1][0], rows[-1][1]) if len(rows) == limit else None
    return found, nxt
