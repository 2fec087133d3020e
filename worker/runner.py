"""The worker: moves events from the partition streams into the durable store.

One consumer group over every partition stream. Each round reads a batch from every
partition (pipelined), writes the audit lines, writes the batch to the store
(idempotently), then XACKs. Entries left pending by a dead consumer (or by a failed write)
are taken over with XAUTOCLAIM once idle; an entry delivered more than `max_deliveries`
times, or one that cannot be decoded, goes to the partition's dead-letter stream. On a
timer: the hold/grant expiry sweep, the rebuild of partitions Redis lost, and trimming of
acknowledged entries (never below the oldest pending or undelivered one).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from gateway.core.engine import CreditEngine
from gateway.core.events import BadEvent, Event, decode
from gateway.core.store.base import Store

from .audit import AuditLog

log = logging.getLogger("credit.worker")

GROUP = "cg-worker"


@dataclass
class WorkerStats:
    events: int = 0
    new_ledger_rows: int = 0
    batches: int = 0
    claimed: int = 0
    dead_lettered: int = 0
    swept_holds: int = 0
    swept_grants: int = 0
    trimmed: int = 0


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class Worker:
    def __init__(
        self,
        engine: CreditEngine,
        store: Store,
        *,
        audit: AuditLog | None = None,
        consumer: str | None = None,
        batch: int = 1000,
        idle_seconds: float = 0.05,
        claim_idle_ms: int = 30_000,
        max_deliveries: int = 5,
        sweep_interval: float = 1.0,
        rehydrate: Any = None,
    ) -> None:
        self.engine = engine
        self.redis = engine.redis
        self.keys = engine.keys
        self.store = store
        self.audit = audit
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.batch = batch
        self.idle_seconds = idle_seconds
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.sweep_interval = sweep_interval
        self.rehydrate = rehydrate  # async callable(partitions) for partitions Redis lost
        self.stats = WorkerStats()
        self.stop_event = asyncio.Event()
        self._streams = [pk.events for pk in self.keys.all_partitions()]
        self._min_count = max(1, batch // len(self._streams))
        self._counts = [self._min_count] * len(self._streams)

    # -- setup -------------------------------------------------------------------------

    async def ensure_groups(self) -> None:
        """Creates the group on every partition stream, from the stream's start (id 0)."""
        for s in self._streams:
            try:
                await self.redis.xgroup_create(s, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    # -- one round ---------------------------------------------------------------------

    async def _read(self, start: str) -> list[tuple[int, str, dict]]:
        """One pipelined read of every partition. A partition that filled its count gets
        twice the count next round, one that did not gets half: busy partitions drain
        fast while a round stays near `batch` entries in all (bounded memory)."""
        pipe = self.redis.pipeline(transaction=False)
        counts = self._counts
        for s, c in zip(self._streams, counts):
            pipe.xreadgroup(GROUP, self.consumer, {s: start}, count=c)
        replies = await pipe.execute()
        out = []
        for p, reply in enumerate(replies):
            got = 0
            for _stream, entries in reply or []:
                got += len(entries)
                for sid, fields in entries:
                    # fields None: deleted while pending; nothing to store, only to ack.
                    out.append((p, _s(sid), fields or {}))
            counts[p] = min(self.batch, counts[p] * 2) if got >= counts[p] else max(self._min_count, counts[p] // 2)
        total = sum(counts)
        if total > 2 * self.batch:  # many busy partitions: share the round between them
            for p, c in enumerate(counts):
                counts[p] = max(self._min_count, c * 2 * self.batch // total)
        return out

    def _prepare(self, entries: list[tuple[int, str, dict]]) -> tuple[list[Event], list, dict[int, list[str]]]:
        """Decodes a read: the events, the undecodable entries, and every id to acknowledge."""
        good: list[Event] = []
        dead: list[tuple[int, str, dict, str]] = []
        ack: dict[int, list[str]] = {}
        for p, sid, fields in entries:
            ack.setdefault(p, []).append(sid)
            if not fields:
                continue
            try:
                good.append(decode(sid, fields, p))
            except BadEvent as exc:
                dead.append((p, sid, fields, str(exc)))
        return good, dead, ack

    async def _commit(self, good: list[Event], dead: list, ack: dict[int, list[str]]) -> None:
        """Audit lines, then the store, then XACK: an entry is acknowledged only once stored."""
        if self.audit is not None:
            self.audit.write(good)
        new = await self.store.write_events(good)
        if dead:
            await self._dead_letter(dead)
        pipe = self.redis.pipeline(transaction=False)
        for p, ids in ack.items():
            pipe.xack(self._streams[p], GROUP, *ids)
        await pipe.execute()
        self.stats.events += len(good)
        self.stats.new_ledger_rows += new
        self.stats.batches += 1

    async def _process(self, entries: list[tuple[int, str, dict]]) -> int:
        if entries:
            await self._commit(*self._prepare(entries))
        return len(entries)

    async def _dead_letter(self, dead: list[tuple[int, str, dict, str]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for p, sid, fields, reason in dead:
            body = {**{_s(k): v for k, v in fields.items()}, "source_id": sid, "reason": reason}
            pipe.xadd(self.keys.partition(p).dead, body)
        await pipe.execute()
        self.stats.dead_lettered += len(dead)
        for p, sid, _, reason in dead:
            log.error("dead-lettered event %s of partition %d: %s", sid, p, reason)

    async def claim_stale(self) -> int:
        """Takes over entries idle longer than claim_idle_ms (a dead consumer's, or a failed write's)."""
        claimed: list[tuple[int, str, dict]] = []
        too_many: list[tuple[int, str, dict, str]] = []
        for p, s in enumerate(self._streams):
            cursor = "0-0"
            while True:
                reply = await self.redis.xautoclaim(
                    s, GROUP, self.consumer, self.claim_idle_ms, start_id=cursor, count=self.batch
                )
                cursor, entries = _s(reply[0]), reply[1]
                if entries:
                    counts = await self._delivery_counts(s, entries)
                    for sid, fields in entries:
                        sid = _s(sid)
                        if counts.get(sid, 0) > self.max_deliveries and fields:
                            too_many.append((p, sid, fields, f"delivered {counts[sid]} times"))
                        else:
                            claimed.append((p, sid, fields or {}))
                if cursor == "0-0" or not entries:
                    break
        if too_many:
            await self._dead_letter(too_many)
            pipe = self.redis.pipeline(transaction=False)
            for p, sid, _, _ in too_many:
                pipe.xack(self._streams[p], GROUP, sid)
            await pipe.execute()
        self.stats.claimed += len(claimed)
        for i in range(0, len(claimed), self.batch):
            await self._process(claimed[i : i + self.batch])
        return len(claimed)

    async def _delivery_counts(self, stream: str, entries: list) -> dict[str, int]:
        ids = [_s(sid) for sid, _ in entries]
        rows = await self.redis.xpending_range(
            stream, GROUP, min=ids[0], max=ids[-1], count=len(ids) + 10, consumername=self.consumer
        )
        return {_s(r["message_id"]): int(r["times_delivered"]) for r in rows}

    async def trim(self) -> int:
        """Drops acknowledged entries; never one that is pending or not yet delivered."""
        removed = 0
        for s in self._streams:
            groups = await self.redis.xinfo_groups(s)
            if not groups:
                continue
            floor = None
            for g in groups:
                cand = _s(g["last-delivered-id"])
                if int(g.get("pending", 0)):
                    summary = await self.redis.xpending(s, _s(g["name"]))
                    if summary.get("min") is None:  # acked meanwhile: trim next time
                        floor = "0-0"
                        break
                    cand = _s(summary["min"])
                if floor is None or _id_lt(cand, floor):
                    floor = cand
            if floor and floor != "0-0":
                removed += await self.redis.xtrim(s, minid=floor, approximate=False)
        self.stats.trimmed += removed
        return removed

    async def upkeep(self) -> None:
        """The timed jobs: rebuild lost partitions, sweep expiries, take over stale entries, trim."""
        if self.rehydrate is not None:
            missing = await self.engine.missing_partitions()
            if missing:
                log.warning("redis lost %d partitions: rebuilding them from the store", len(missing))
                await self.rehydrate(missing)
        swept = await self.engine.sweep()
        self.stats.swept_holds += swept.holds
        self.stats.swept_grants += swept.grants
        await self.claim_stale()
        await self.trim()

    # -- loop --------------------------------------------------------------------------

    async def run(self, *, burst: bool = False) -> WorkerStats:
        """Runs until stop() (or, with burst, until every stream is drained)."""
        await self.ensure_groups()
        # Our own pending entries first (a restart under the same consumer name).
        while await self._process(await self._read("0")):
            pass
        last_upkeep = 0.0
        # The store write of one batch runs while the next batch is read and decoded.
        writing: asyncio.Task | None = None
        try:
            while not self.stop_event.is_set():
                now = time.monotonic()
                if now - last_upkeep >= self.sweep_interval:
                    last_upkeep = now
                    writing = await _finish(writing)
                    try:
                        await self.upkeep()
                    except Exception:  # upkeep failing must not stop the draining
                        log.exception("worker upkeep failed; carrying on")
                try:
                    entries = await self._read(">")
                    prepared = self._prepare(entries)
                    writing = await _finish(writing)
                    if entries:
                        writing = asyncio.create_task(self._commit(*prepared))
                except Exception:
                    # Not acknowledged: the entries stay pending and are claimed again once idle.
                    log.exception("batch failed; its entries stay pending")
                    writing = None
                    entries = []
                    await asyncio.sleep(self.idle_seconds)
                if not entries:
                    writing = await _finish(writing)
                    if burst:
                        if await self._drained():
                            break
                        # Entries pending on another (dead) consumer: take them once idle enough.
                        if not await self.claim_stale():
                            await asyncio.sleep(self.idle_seconds)
                        continue
                    try:
                        await asyncio.wait_for(self.stop_event.wait(), self.idle_seconds)
                    except asyncio.TimeoutError:
                        pass
        finally:
            await _finish(writing)
        return self.stats

    async def _drained(self) -> bool:
        """True when no entry is pending (called right after a read of new entries found none)."""
        for s in self._streams:
            for g in await self.redis.xinfo_groups(s):
                if _s(g["name"]) == GROUP and int(g.get("pending", 0)):
                    return False
        return True

    def stop(self) -> None:
        self.stop_event.set()


async def _finish(task: asyncio.Task | None) -> None:
    """Waits for a batch's write. A failure is logged: its entries stay pending and are
    claimed again once idle (and dead-lettered after too many deliveries)."""
    if task is not None:
        try:
            await task
        except Exception:
            log.exception("batch failed; its entries stay pending")
    return None


def _id_lt(a: str, b: str) -> bool:
    am, _, asq = a.partition("-")
    bm, _, bsq = b.partition("-")
    return (int(am), int(asq or 0)) < (int(bm), int(bsq or 0))
