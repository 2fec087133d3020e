"""The durable stores: the record Redis can be rebuilt from (see base.Store)."""

from .base import AccountSnapshot, LedgerEntry, OperationRecord, Store
from .mongo import MongoStore
from .sqlite import SQLiteStore

__all__ = ["AccountSnapshot", "LedgerEntry", "MongoStore", "OperationRecord", "SQLiteStore", "Store"]
