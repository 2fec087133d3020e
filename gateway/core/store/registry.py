"""Picks the store backend a URL names: the one place where a backend is chosen.

    sqlite:///relative/path, sqlite:////absolute/path, or a plain path  -> SQLiteStore
    mongodb://..., mongodb+srv://...                                    -> MongoStore
    postgresql://..., postgres://...                                    -> PostgresStore

A backend module is imported only when its scheme is asked for (pymongo and asyncpg stay
unloaded in a SQLite deployment). A new backend is one module with a Store subclass and one line here.
"""

from __future__ import annotations

from importlib import import_module

from .base import Store

# scheme -> (module under gateway.core.store, class)
BACKENDS: dict[str, tuple[str, str]] = {
    "sqlite": ("sqlite", "SQLiteStore"),
    "mongodb": ("mongo", "MongoStore"),
    "mongodb+srv": ("mongo", "MongoStore"),
    "postgresql": ("postgres", "PostgresStore"),
    "postgres": ("postgres", "PostgresStore"),
}
DEFAULT_DATABASE = "credit_management"


def store_from_url(url: str, *, database: str = DEFAULT_DATABASE) -> Store:
    """The (unopened) store `url` names; `database` names the database on a server that
    hosts several (MongoDB; PostgreSQL when the URL names none), file backends ignore it."""
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower() if sep else "sqlite"
    try:
        module, name = BACKENDS[scheme]
    except KeyError:
        known = ", ".join(f"{s}://" for s in BACKENDS)
        raise ValueError(f"no store backend for {scheme}:// URLs (known: {known}, or a file path)") from None
    cls: type[Store] = getattr(import_module(f"{__package__}.{module}"), name)
    return cls.from_url(url, database=database)
