"""The SQLite store's schema and its migrations, applied in one transaction on open.

The schema version is kept in `PRAGMA user_version`:
  0  a new, empty file (or one made before the version was kept: see `_found_version`)
  1  the first schema, whose grant and hold columns had the Lua hash fields' short names
     (r, e, x, pri, meta; st, amt, exp, fin, ear, at, op, x) and rate_limits' rpm / tpm
  2  the same tables with readable column names
  3  the payment tables added (store/sqlite_payments.py); nothing else changes
  4  the promo codes' tables added (store/sqlite_promos.py: promos, promo_claims)
  5  plans and subscriptions (store/sqlite_plans.py); payments.purpose (what a payment is
     for: a subscription's period); rate_limits' plan columns (a subscriber's plan limits)
     and the notification tables (store/sqlite_notifications.py: notifications,
     notify_accounts)
The tables themselves are defined in store/schema.py, with the other backends'. A file of a
newer version than this code knows is refused rather than misread.
"""

from __future__ import annotations

import sqlite3

from .base import GRANT_RENAMES_1_TO_2, HOLD_RENAMES_1_TO_2, RATE_LIMIT_RENAMES_1_TO_2
from .schema import TABLE, column_sql, ddl

SCHEMA_VERSION = 5

# Version 1 -> 2: the short column names, by table. RENAME COLUMN rewrites the indexes that
# name a column (holds_open's `st = 'open'`) and touches no row, so it takes the same time
# on a file of any size.
RENAMES_1_TO_2 = {
    "grants": {**GRANT_RENAMES_1_TO_2, "meta": "metadata"},
    "holds": HOLD_RENAMES_1_TO_2,
    "rate_limits": RATE_LIMIT_RENAMES_1_TO_2,
}


class SchemaTooNew(RuntimeError):
    """The file was written by a newer version of the gateway."""


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _found_version(db: sqlite3.Connection) -> int:
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version == 0 and "r" in _columns(db, "grants"):
        return 1  # made before the version was kept
    return version


def _rename_1_to_2(db: sqlite3.Connection) -> None:
    for table, renames in RENAMES_1_TO_2.items():
        have = _columns(db, table)  # empty when the file predates the table
        for old, new in renames.items():
            if old in have:
                db.execute(f'ALTER TABLE {table} RENAME COLUMN "{old}" TO "{new}"')


def _nothing_to_change(db: sqlite3.Connection) -> None:
    """2 -> 3 and 3 -> 4 only add tables, which TABLES creates."""


# Version 4 -> 5: the columns added to existing tables (new tables come from the schema).
COLUMNS_4_TO_5 = {
    "payments": ("purpose",),
    "rate_limits": ("plan_requests_per_minute", "plan_tokens_per_minute", "allowed_models"),
}


def _columns_4_to_5(db: sqlite3.Connection) -> None:
    for name, columns in COLUMNS_4_TO_5.items():
        have = _columns(db, name)
        if not have:
            continue  # the file predates the table: the schema's DDL creates it whole
        table = TABLE[name]
        for column in columns:
            if column not in have:
                db.execute(
                    f"ALTER TABLE {name} ADD COLUMN {column_sql(table, table.column(column), 'sqlite')}"
                )


MIGRATIONS = {
    1: _rename_1_to_2,
    2: _nothing_to_change,
    3: _nothing_to_change,
    4: _columns_4_to_5,
}  # from version k to k + 1


def migrate(db: sqlite3.Connection) -> int:
    """Brings the file to SCHEMA_VERSION (creating what is missing) in one transaction;
    returns the version it found. Concurrent openers (gateway and worker) take turns on the
    write lock, and the second finds the work done."""
    db.execute("BEGIN IMMEDIATE")
    try:
        found = _found_version(db)
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the store file has schema version {found}; this gateway knows up to {SCHEMA_VERSION}"
            )
        if found:  # a new file gets the tables below as they are
            for version in range(found, SCHEMA_VERSION):
                MIGRATIONS[version](db)
        for statement in ddl("sqlite"):
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return found
