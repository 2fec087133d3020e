"""The durable stores: the record Redis can be rebuilt from (see base.Store), one backend
per module, chosen by URL (registry.store_from_url)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import AccountSnapshot, LedgerEntry, OperationRecord, Store
from .registry import store_from_url
from .sqlite import SQLiteStore

if TYPE_CHECKING:
    from .mongo import MongoStore
    from .postgres import PostgresStore

__all__ = [
    "AccountSnapshot",
    "LedgerEntry",
    "MongoStore",
    "OperationRecord",
    "PostgresStore",
    "SQLiteStore",
    "Store",
    "store_from_url",
]


def __getattr__(name: str) -> Any:
    # pymongo and asyncpg are loaded only by a deployment (or a test) that uses their store.
    if name == "MongoStore":
        from .mongo import MongoStore

        return MongoStore
    if name == "PostgresStore":
        from .postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
