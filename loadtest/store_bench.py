"""Write speed of the durable stores: N batches of real events through `Store.write_events`,
and the worker's drain rate into each (Redis streams -> Worker -> store).

    .venv/bin/python loadtest/store_bench.py [--events 50000] [--batch 1000]
        [--backends sqlite,mongo,pg-asyncpg,pg-psycopg] [--parts writes,drain]
        [--drain-events 100000] [--rounds 5] [--postgres postgresql://postgres@127.0.0.1:5432/postgres]

A measuring script, not a test: nothing here asserts on timings. The engine runs a few
users' lives (a grant, then reserve + settle cycles with metadata) on a private
redis-server; their events are copied under distinct users (each user's events in order)
and written to a fresh store of each backend in batches, three ways:

    new          every event new to the store (the worker's steady state)
    redelivered  the same batches again (a worker restart: every ledger row is there already,
                 so each batch also looks up the stored versions for the reissue check)
    reversed     a fresh store, the batches in reverse order (older versions arrive last)

MongoDB runs on the tests' wire server (mongoeco, tests/support/mongo_venv.sh): its
figures compare one version of the code with another, not with a real MongoDB.

PostgreSQL: a database made for the run (cg_bench_<hex>) on the --postgres server, dropped
after; each store in a schema of its own. Two drivers, the same statements (each table's
rows as one array per column, out of unnest):
    pg-asyncpg   the gateway's PostgresStore
    pg-psycopg   the same store with its write path on psycopg 3 (PsycopgWrites below;
                 `pip install 'psycopg[binary]'`); reads and the schema stay on asyncpg

The drain part (--parts drain) is the worker's: streams pre-filled with --drain-events
events (copies of the engine's events, under distinct users; loadtest/engine_bench.py's),
then `Worker(engine, store, batch=1000).run(burst=True)` timed, audit off. The backends
run in turn within each round, in a rotated order, for --rounds rounds (the machine is
shared and noisy: compare the medians, and the ratios within a round).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis_server import RedisServer  # beside this script

from gateway.core.engine import CreditEngine
from gateway.core.events import Event, decode
from gateway.core.keys import KeySpace
from gateway.core.store import MongoStore, PostgresStore, SQLiteStore, Store
from gateway.core.store.batch import AccountRow, GrantRow, HoldRow, LedgerRow
from gateway.core.store.postgres import (
    ACCOUNT_TYPES,
    GRANT_TYPES,
    HOLD_TYPES,
    INSERT_LEDGER,
    LEDGER_TYPES,
    LEDGER_VERSIONS,
    UPSERT_ACCOUNT,
    UPSERT_GRANT,
    UPSERT_HOLD,
)
from gateway.core.store.sql import LEDGER_COLS_IN, columns, grant_rows, hold_rows, quoted

PARTITIONS = 16
REPO = Path(__file__).resolve().parent.parent


async def sample_lives(url: str, users: int, cycles: int) -> list[list[dict[str, Any]]]:
    """Each sample user's events (decoded JSON objects), in version order."""
    r = aioredis.Redis.from_url(url)
    try:
        await r.flushall()
        engine = CreditEngine(r, keys=KeySpace(partitions=PARTITIONS))
        for p in range(PARTITIONS):
            await engine.mark_ready(p)

        async def life(i: int, u: str) -> None:
            await engine.grant(
                u, Decimal("250.5"), op_id=f"pay-{i:06d}", source="payment", metadata={"plan": "pro"}
            )
            for k in range(cycles):
                hid = f"req_{i:04d}_{k:04d}"
                await engine.reserve(
                    u, Decimal("0.125"), hold_id=hid, ttl_seconds=120, metadata={"model": "gpt-4o-mini"}
                )
                await engine.settle(u, hid, Decimal("0.083417"), metadata={"usage": 1234})

        names = [f"sample-{i:03d}" for i in range(users)]
        await asyncio.gather(*(life(i, u) for i, u in enumerate(names)))
        per_user: dict[str, list[dict[str, Any]]] = {u: [] for u in names}
        for pk in engine.keys.all_partitions():
            for _sid, fields in await r.xrange(pk.events):
                raw = orjson.loads(fields[b"e"])
                per_user[raw["u"]].append(raw)
        return [sorted(evs, key=lambda e: int(e["v"])) for evs in per_user.values()]
    finally:
        await r.aclose()


def make_events(lives: list[list[dict[str, Any]]], n: int) -> list[Event]:
    """n events: copies of the sample lives under distinct users, each life in order."""
    keys = KeySpace(partitions=PARTITIONS)
    out: list[Event] = []
    copy = 0
    while len(out) < n:
        for life in lives:
            user = f"u{copy:07d}"
            for raw in life:
                body = orjson.dumps({**raw, "u": user}).decode()
                out.append(decode(f"{len(out)}-0", {"e": body}, keys.partition_of(user)))
            copy += 1
    return out[:n]


def start_mongo(workdir: str) -> tuple[subprocess.Popen, str]:
    venv = subprocess.run(
        ["bash", str(REPO / "tests/support/mongo_venv.sh")], capture_output=True, text=True, check=True
    )
    python = venv.stdout.strip().splitlines()[-1]
    proc = subprocess.Popen(
        [python, str(REPO / "tests/support/mongo_wire_server.py"), "--port", "0", "--dir", workdir],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("READY "):
        proc.kill()
        raise SystemExit(f"the MongoDB wire server did not start: {line!r}")
    return proc, f"mongodb://127.0.0.1:{line.split()[1]}/?directConnection=true"


def psycopg_style(statement: str) -> str:
    """asyncpg's `$n` placeholders as psycopg's `%s` (each statement uses each once, in order)."""
    import re

    return re.sub(r"\$\d+", "%s", statement)


class PsycopgWrites(PostgresStore):
    """PostgresStore with its write path on psycopg 3: the same steps through the other
    driver (the ledger by binary COPY, an INSERT that skips stored rows when the COPY meets
    one; the snapshot rows at the same time on a second connection, committed after)."""

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self._idle: asyncio.Queue[Any] = asyncio.Queue()
        self._conns: list[Any] = []

    async def open(self) -> None:
        import psycopg

        await super().open()  # the schema, and the reads
        dsn = self.dsn.replace("?search_path=", "?options=-csearch_path%3D")
        for _ in range(2):  # a batch's two parts
            conn = await psycopg.AsyncConnection.connect(dsn)
            self._conns.append(conn)
            self._idle.put_nowait(conn)

    async def close(self) -> None:
        for conn in self._conns:
            await conn.close()
        self._conns = []
        await super().close()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        conn = await self._idle.get()
        try:
            async with conn.transaction():
                token = self._tx.set(conn)
                try:
                    yield
                finally:
                    self._tx.reset(token)
        finally:
            self._idle.put_nowait(conn)

    async def _insert_ledger(self, rows: list[LedgerRow]) -> int:
        import psycopg

        conn = self._batch
        copy_sql = f"COPY ledger ({quoted(LEDGER_COLS_IN)}) FROM STDIN (FORMAT BINARY)"
        try:
            async with conn.transaction(), conn.cursor() as cur, cur.copy(copy_sql) as copy:
                copy.set_types(["text", "text", "text", "int8", "int8", "int8", "text", "text", "text"])
                for row in rows:
                    await copy.write_row(row)
            return len(rows)
        except psycopg.errors.UniqueViolation:
            cur = await conn.execute(
                psycopg_style(INSERT_LEDGER), columns(rows, len(LEDGER_TYPES)), prepare=True
            )
            return int(cur.rowcount)

    async def _ledger_versions(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
        cur = await self._batch.execute(psycopg_style(LEDGER_VERSIONS), columns(list(keys), 2), prepare=True)
        return {(u, o): v for u, o, v in await cur.fetchall()}

    async def _write_accounts(self, rows: list[AccountRow]) -> None:
        await self._batch.execute(
            psycopg_style(UPSERT_ACCOUNT), columns(rows, len(ACCOUNT_TYPES)), prepare=True
        )

    async def _write_grants(self, rows: list[GrantRow]) -> None:
        args = columns(grant_rows(rows), len(GRANT_TYPES))
        await self._batch.execute(psycopg_style(UPSERT_GRANT), args, prepare=True)

    async def _write_holds(self, rows: list[HoldRow]) -> None:
        args = columns(hold_rows(rows), len(HOLD_TYPES))
        await self._batch.execute(psycopg_style(UPSERT_HOLD), args, prepare=True)


class PostgresBench:
    """A database made for the run on the server at `server`, dropped at the end; a fresh
    schema in it for each store."""

    def __init__(self, server: str) -> None:
        from urllib.parse import urlsplit, urlunsplit

        self.server = server
        self.name = f"cg_bench_{uuid.uuid4().hex[:12]}"
        self.url = urlunsplit(urlsplit(server)._replace(path=f"/{self.name}"))
        self.n = 0

    async def _admin(self, url: str, statement: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    async def __aenter__(self) -> PostgresBench:
        await self._admin(self.server, f"CREATE DATABASE {self.name}")
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._admin(self.server, f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")

    async def schema_url(self) -> str:
        self.n += 1
        await self._admin(self.url, f"CREATE SCHEMA s{self.n}")
        return f"{self.url}?search_path=s{self.n}"


async def timed(store: Store, batches: list[list[Event]]) -> tuple[float, int]:
    t0 = time.perf_counter()
    new = 0
    for b in batches:
        new += await store.write_events(b)
    return time.perf_counter() - t0, new


async def bench(kind: str, make: Any, batches: list[list[Event]], n: int) -> dict[str, float]:
    """`make`: an async factory of fresh, unopened stores."""
    out: dict[str, float] = {}
    s: Store = await make()
    await s.open()
    try:
        el, new = await timed(s, batches)
        assert new == n, (kind, new, n)
        out["new"] = n / el
        el, new = await timed(s, batches)
        assert new == 0, (kind, new)
        out["redelivered"] = n / el
    finally:
        await s.close()
    s = await make()
    await s.open()
    try:
        el, new = await timed(s, batches[::-1])
        assert new == n, (kind, new, n)
        out["reversed"] = n / el
    finally:
        await s.close()
    for k, v in out.items():
        print(f"  {kind:<10} {k:<12} {v:>10,.0f} events/s", flush=True)
    return out


async def drain_once(url: str, templates: list[list[str]], n: int, store: Store, tag: str) -> float:
    """Fills the streams with n events, drains them into `store` with a Worker; events/s."""
    from engine_bench import PARTITIONS as DRAIN_PARTITIONS  # beside this script
    from engine_bench import fill_streams

    from gateway.worker.runner import Worker

    r = aioredis.Redis.from_url(url)
    try:
        await r.flushall()
        filled = await fill_streams(url, templates, n, tag)
        await store.open()
        engine = CreditEngine(r, keys=KeySpace(partitions=DRAIN_PARTITIONS))
        t0 = time.perf_counter()
        stats = await Worker(engine, store, batch=1000).run(burst=True)
        el = time.perf_counter() - t0
        assert stats.events == filled and stats.new_ledger_rows == filled and not stats.dead_lettered, stats
        return filled / el
    finally:
        await store.close()
        await r.aclose()


async def drain_rounds(cfg: argparse.Namespace, workdir: str, makers: dict[str, Any]) -> None:
    """The worker's drain into each backend, in turn within each round (rotated order)."""
    import engine_bench  # beside this script

    server = RedisServer(workdir)
    server.start()
    try:
        templates = await engine_bench.make_templates(
            server.url, argparse.Namespace(sample_users=16, sample_cycles=4)
        )
        kinds = list(makers)
        rates: dict[str, list[float]] = {k: [] for k in kinds}
        for rnd in range(cfg.rounds):
            order = kinds[rnd % len(kinds) :] + kinds[: rnd % len(kinds)]
            line = []
            for kind in order:
                rate = await drain_once(
                    server.url, templates, cfg.drain_events, await makers[kind](), f"r{rnd}{kind}"
                )
                rates[kind].append(rate)
                line.append(f"{kind} {rate:,.0f}")
            ratios = ", ".join(
                f"{k}/sqlite {rates[k][-1] / rates['sqlite'][-1]:.2f}"
                for k in kinds
                if k != "sqlite" and "sqlite" in rates
            )
            print(
                f"  drain round {rnd + 1}: " + ", ".join(line) + (f" ({ratios})" if ratios else ""),
                flush=True,
            )
        print(f"drain, {cfg.drain_events:,} events, median of {cfg.rounds} rounds (events/s):", flush=True)
        for kind in kinds:
            med = statistics.median(rates[kind])
            rel = ""
            if "sqlite" in rates and kind != "sqlite":
                ratio = statistics.median(a / b for a, b in zip(rates[kind], rates["sqlite"], strict=True))
                rel = f"  (median ratio to sqlite in the same round: {ratio:.2f})"
            print(f"  {kind:<10} {med:>10,.0f}{rel}", flush=True)
    finally:
        server.stop()


async def main_async(cfg: argparse.Namespace, workdir: str) -> None:
    pg = PostgresBench(cfg.postgres) if any(b.startswith("pg-") for b in cfg.backends) else None
    if pg is not None:
        await pg.__aenter__()
    try:
        await run_parts(cfg, workdir, pg)
    finally:
        if pg is not None:
            await pg.__aexit__(None, None, None)


async def run_parts(cfg: argparse.Namespace, workdir: str, pg: PostgresBench | None) -> None:
    paths = iter(range(1_000_000))

    async def sqlite() -> Store:
        return SQLiteStore(os.path.join(workdir, f"bench-{next(paths)}.sqlite3"))

    async def pg_asyncpg() -> Store:
        assert pg is not None
        return PostgresStore(await pg.schema_url())

    async def pg_psycopg() -> Store:
        assert pg is not None
        return PsycopgWrites(await pg.schema_url())

    makers = {"sqlite": sqlite, "pg-asyncpg": pg_asyncpg, "pg-psycopg": pg_psycopg}
    chosen = {k: v for k, v in makers.items() if k in cfg.backends}
    if "writes" in cfg.parts:
        server = RedisServer(workdir)
        server.start()
        try:
            lives = await sample_lives(server.url, 16, 4)
        finally:
            server.stop()
        events = make_events(lives, cfg.events)
        batches = [events[i : i + cfg.batch] for i in range(0, len(events), cfg.batch)]
        print(f"{len(events):,} events in {len(batches)} batches of {cfg.batch}", flush=True)
        for kind, make in chosen.items():
            await bench(kind, make, batches, len(events))
        if "mongo" in cfg.backends:
            proc, uri = start_mongo(os.path.join(workdir, "mongo"))
            try:
                mongo_n = min(len(events), cfg.mongo_events)
                mb = [events[i : min(i + cfg.batch, mongo_n)] for i in range(0, mongo_n, cfg.batch)]
                print(f"mongo: the first {mongo_n:,} events", flush=True)

                async def mongo() -> Store:
                    return MongoStore(uri, db=f"b_{uuid.uuid4().hex[:12]}")

                await bench("mongo", mongo, mb, mongo_n)
            finally:
                proc.terminate()
                proc.wait(10)
    if "drain" in cfg.parts and chosen:
        await drain_rounds(cfg, workdir, chosen)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--mongo-events", type=int, default=10_000, help="the wire server is slow")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument(
        "--backends", default="sqlite,mongo", help="comma list of sqlite,mongo,pg-asyncpg,pg-psycopg"
    )
    ap.add_argument("--parts", default="writes", help="comma list of writes,drain")
    ap.add_argument("--drain-events", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5, help="drain rounds (each backend once per round)")
    ap.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    cfg = ap.parse_args()
    cfg.backends = set(cfg.backends.split(","))
    cfg.parts = set(cfg.parts.split(","))
    with tempfile.TemporaryDirectory(prefix="store-bench-") as workdir:
        asyncio.run(main_async(cfg, workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
