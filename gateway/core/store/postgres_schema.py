"""The PostgreSQL store's schema, applied in one transaction on open.

The tables, columns and indexes are store/schema.py's definition rendered for PostgreSQL
(`ddl("postgres")`), the same definition SQLite's are rendered from: every integer is
BIGINT (micro-credits and millisecond times pass 2**31), JSON stays TEXT, `"user"` is
quoted (a reserved word here), and text compares in byte order (COLLATE "C") as SQLite's
does, so pages and listings come out in the same order on both whatever collation the
database was made with.

The schema version is kept in the one-row table `schema_meta`, numbered as SQLite's
(PostgreSQL starts at 5, that version's tables). A database of a newer version than this
code knows is refused rather than misread.
"""

from __future__ import annotations

from typing import Any

from .schema import ddl

SCHEMA_VERSION = 5

# Any constant: the key of the transaction-level advisory lock that makes concurrent
# openers (a gateway and a worker starting together) take turns; the second finds the work
# done. CREATE TABLE IF NOT EXISTS alone is not safe against a concurrent creation.
MIGRATION_LOCK = 0x63675F736368656D  # "cg_schem"

META = """CREATE TABLE IF NOT EXISTS schema_meta (
    one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one), version BIGINT NOT NULL
)"""


class SchemaTooNew(RuntimeError):
    """The database was written by a newer version of the gateway."""


async def migrate(conn: Any) -> int:
    """Brings the database to SCHEMA_VERSION (creating what is missing) in one transaction
    on `conn` (an asyncpg connection); returns the version it found (0: a new database)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(META)
        found = int(await conn.fetchval("SELECT version FROM schema_meta") or 0)
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the store database has schema version {found}; this gateway knows up to {SCHEMA_VERSION}"
            )
        for statement in ddl("postgres"):
            await conn.execute(statement)
        await conn.execute(
            "INSERT INTO schema_meta (one, version) VALUES (TRUE, $1) "
            "ON CONFLICT (one) DO UPDATE SET version = excluded.version",
            SCHEMA_VERSION,
        )
    return found
