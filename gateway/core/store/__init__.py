"""The durable stores: the record Redis can be rebuilt from (see base.Store), one backend
per module, chosen by URL (registry.store_from_url)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import AccountSnapshot, LedgerEntry, OperationRecord, Store
from .registry import store_from_url
from .sqlite import SQLiteStore

if TYPE_CHECKING:
    from .mongo import MongoStore

__all__ = [
    "AccountSnapshot",
    "LedgerEntry",
    "MongoStore",
    "OperationRecord",
    "SQLiteStore",
    "Store",
    "store_from_url",
]


def __getattr__(name: str) -> Any:
    # pymongo is loaded only by a deployment (or a test) that uses MongoDB.
    if name == "MongoStore":
        from .mongo import MongoStore

        return MongoStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
