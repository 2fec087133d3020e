"""Standalone smoke check of the mongoeco wire server against pymongo's async client.

Run under the main venv:  .venv/bin/python tests/support/check_mongo_wire.py
Builds/locates the mongoeco venv (mongo_venv.sh), starts mongo_wire_server.py on
a free port, exercises the operations the gateway relies on and prints one
PASS/FAIL line per check. Exit code 0 iff every check passed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import pymongo
from pymongo import AsyncMongoClient, UpdateOne
from pymongo.errors import BulkWriteError

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS: list[tuple[str, bool, str]] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""), flush=True)


async def check(name, coro_fn) -> None:
    try:
        detail = await coro_fn()
        record(name, True, detail or "")
    except AssertionError as e:
        record(name, False, f"assertion: {e}")
    except Exception as e:
        record(name, False, f"{type(e).__name__}: {e}")


async def run_checks(uri: str) -> None:
    client = AsyncMongoClient(uri, serverSelectionTimeoutMS=5000)
    db = client["credit_check"]
    ops = db["ops"]
    bal = db["balances"]
    await client.drop_database("credit_check")

    async def ping():
        r = await client.admin.command("ping")
        assert r.get("ok") == 1, r
        return repr(r)

    async def unique_index():
        name = await ops.create_index([("user_id", 1), ("op_id", 1)], unique=True)
        info = await ops.index_information()
        assert info[name].get("unique") is True, info
        return f"{name} -> {info[name]}"

    async def insert_many_dupes():
        await ops.insert_one({"user_id": "u1", "op_id": "a", "n": 0})
        docs = [
            {"user_id": "u1", "op_id": "a", "n": 1},  # dup of existing
            {"user_id": "u1", "op_id": "b", "n": 2},
            {"user_id": "u1", "op_id": "b", "n": 3},  # dup within batch
            {"user_id": "u2", "op_id": "a", "n": 4},
        ]
        try:
            await ops.insert_many(docs, ordered=False)
        except BulkWriteError as e:
            details = e.details
        else:
            raise AssertionError("no BulkWriteError raised")
        errs = details.get("writeErrors", [])
        codes = [w.get("code") for w in errs]
        assert codes and all(c == 11000 for c in codes), details
        assert sorted(w["index"] for w in errs) == [0, 2], errs
        assert details.get("nInserted") == 2, details
        n = await ops.count_documents({})
        assert n == 3, n
        return f"codes={codes} nInserted=2 total={n}"

    async def versioned_upsert():
        await bal.insert_many(
            [
                {"_id": "k1", "version": 5, "amount": 500},
                {"_id": "k2", "version": 5, "amount": 500},
            ]
        )
        reqs = [
            UpdateOne(
                {"_id": "k1", "version": {"$lt": 3}}, {"$set": {"version": 3, "amount": 300}}, upsert=True
            ),  # older
            UpdateOne(
                {"_id": "k2", "version": {"$lt": 7}}, {"$set": {"version": 7, "amount": 700}}, upsert=True
            ),  # newer
            UpdateOne(
                {"_id": "k3", "version": {"$lt": 1}}, {"$set": {"version": 1, "amount": 100}}, upsert=True
            ),  # new doc
        ]
        # Either outcome is acceptable; a BulkWriteError must name only the older document.
        d = None
        try:
            r = await bal.bulk_write(reqs, ordered=False)
            detail = (
                f"no error: matched={r.matched_count} modified={r.modified_count} upserted={r.upserted_count}"
            )
        except BulkWriteError as e:
            d = e.details
        if d is not None:
            errs = d.get("writeErrors", [])
            assert [w.get("code") for w in errs] == [11000], d
            assert [w["index"] for w in errs] == [0], errs
            detail = (
                f"BulkWriteError idx0 code 11000; nMatched={d.get('nMatched')} "
                f"nModified={d.get('nModified')} nUpserted={d.get('nUpserted')}"
            )
        docs = {d["_id"]: d async for d in bal.find({}, sort=[("_id", 1)])}
        assert docs["k1"]["version"] == 5 and docs["k1"]["amount"] == 500, docs["k1"]
        assert docs["k2"]["version"] == 7 and docs["k2"]["amount"] == 700, docs["k2"]
        assert docs["k3"]["version"] == 1, docs.get("k3")
        return detail

    async def find_sort_limit_range():
        await db.ev.insert_many([{"_id": i, "ts": i * 10, "user": "u" + str(i % 2)} for i in range(20)])
        cur = db.ev.find({"ts": {"$gt": 30, "$lt": 150}, "user": "u1"}).sort("ts", -1).limit(3)
        got = [d["ts"] async for d in cur]
        assert got == [130, 110, 90], got
        cur = db.ev.find({"ts": {"$lt": 100}}, {"_id": 0, "ts": 1}).sort([("ts", 1)]).skip(2).limit(2)
        got2 = [d async for d in cur]
        assert got2 == [{"ts": 20}, {"ts": 30}], got2
        return f"desc+limit={got} proj+skip={got2}"

    async def count_documents():
        n1 = await db.ev.count_documents({"ts": {"$gte": 100}})
        n2 = await db.ev.count_documents({})
        n3 = await db.ev.estimated_document_count()
        assert (n1, n2, n3) == (10, 20, 20), (n1, n2, n3)
        return f"{n1}/{n2}/est={n3}"

    async def inc_upsert():
        c = db.counters
        for _ in range(3):
            await c.update_one({"_id": "u1"}, {"$inc": {"balance": 5, "ops": 1}}, upsert=True)
        await c.update_one({"_id": "u1"}, {"$inc": {"balance": -2}}, upsert=True)
        doc = await c.find_one({"_id": "u1"})
        assert doc == {"_id": "u1", "balance": 13, "ops": 3}, doc
        r = await c.find_one_and_update(
            {"_id": "u2"},
            {"$inc": {"balance": 7}},
            upsert=True,
            return_document=pymongo.ReturnDocument.AFTER,
        )
        assert r == {"_id": "u2", "balance": 7}, r
        return f"{doc}; find_one_and_update(upsert, AFTER)={r}"

    async def delete_many():
        r = await db.ev.delete_many({"ts": {"$lt": 50}})
        assert r.deleted_count == 5, r.deleted_count
        n = await db.ev.count_documents({})
        assert n == 15, n
        return f"deleted={r.deleted_count} remaining={n}"

    async def distinct():
        vals = sorted(await db.ev.distinct("user"))
        assert vals == ["u0", "u1"], vals
        vals2 = sorted(await db.ev.distinct("user", {"ts": {"$gt": 180}}))
        assert vals2 == ["u1"], vals2
        return f"{vals} filtered={vals2}"

    async def aggregate_sum():
        rows = [
            d
            async for d in await db.ev.aggregate(
                [
                    {"$match": {"ts": {"$gte": 50}}},
                    {"$group": {"_id": "$user", "total": {"$sum": "$ts"}, "n": {"$sum": 1}}},
                    {"$sort": {"_id": 1}},
                ]
            )
        ]
        assert rows == [{"_id": "u0", "total": 840, "n": 7}, {"_id": "u1", "total": 960, "n": 8}], rows
        return repr(rows)

    for name, fn in [
        ("ping", ping),
        ("create_index unique compound", unique_index),
        ("insert_many ordered=False duplicates", insert_many_dupes),
        ("bulk_write versioned upserts", versioned_upsert),
        ("find filter($gt/$lt)+sort+limit", find_sort_limit_range),
        ("count_documents", count_documents),
        ("$inc upserts", inc_upsert),
        ("delete_many", delete_many),
        ("distinct", distinct),
        ("aggregate $group (extra)", aggregate_sum),
    ]:
        await check(name, fn)
    await client.drop_database("credit_check")
    await client.close()


def main() -> int:
    print(f"pymongo {pymongo.version}, python {sys.version.split()[0]}", flush=True)
    t0 = time.monotonic()
    out = (
        subprocess.run(
            ["bash", os.path.join(HERE, "mongo_venv.sh")],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        .stdout.strip()
        .splitlines()
    )
    py = out[-1]
    print(f"mongo venv python: {py} ({time.monotonic() - t0:.1f}s)", flush=True)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mongo-wire-") as data:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [py, os.path.join(HERE, "mongo_wire_server.py"), "--port", str(port), "--dir", data],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            line = proc.stdout.readline().strip()
            if line != f"READY {port}":
                print(f"FAIL server start: got {line!r}, rc={proc.poll()}")
                return 1
            print(f"server ready on {port} in {time.monotonic() - t0:.2f}s", flush=True)
            asyncio.run(run_checks(f"mongodb://127.0.0.1:{port}/?directConnection=true"))
        except Exception:
            traceback.print_exc()
            record("harness", False, "exception")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = "killed"
            print(f"server exit on SIGTERM: {rc}")
    passed = sum(ok for _, ok, _ in RESULTS)
    failed = len(RESULTS) - passed
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
