"""Applies the MongoDB half of the durable schema (store/schema.py: collections, their
`$jsonSchema` validators and indexes) to a database, as the MongoDB store opens."""

from __future__ import annotations

import logging
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import CollectionInvalid, OperationFailure

from .schema import MONGO_COLLECTIONS, MongoCollection

log = logging.getLogger(__name__)

NAMESPACE_EXISTS = 48


def collection_options(c: MongoCollection) -> dict[str, Any]:
    # moderate: a document written before its collection had this validator is not checked
    # again until it is valid, so an upgrade never blocks updates of older documents.
    return {"validator": c.validator(), "validationLevel": "moderate", "validationAction": "error"}


async def apply_mongo_schema(db: AsyncDatabase[Any]) -> None:
    """Creates what is missing and brings validators up to date; safe to run concurrently
    (the gateway and the worker open together) and again on every open."""
    have = {c["name"]: c.get("options", {}) async for c in await db.list_collections()}
    for c in MONGO_COLLECTIONS:
        options = collection_options(c)
        if c.name not in have:
            try:
                await db.create_collection(c.name, **options)
            except CollectionInvalid:
                pass  # created meanwhile by another process: it applies the same options
            except OperationFailure as exc:
                if exc.code != NAMESPACE_EXISTS:
                    raise
        elif {k: have[c.name].get(k) for k in options} != options:
            try:
                await db.command("collMod", c.name, **options)
            except OperationFailure as exc:
                # The documents stay as they are; only the server-side check is missing.
                log.warning("the validator of collection %s could not be set: %s", c.name, exc)
        for index in c.indexes:
            await db[c.name].create_index(list(index.keys), unique=index.unique, name=index.name)
