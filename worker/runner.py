"""The worker: moves events from the partition streams into the durable store.

One consumer group over every partition stream. Each round reads a batch from every
partition (pipelined), writes the audit lines, writes the batch to the store
(idempotently), then XACKs. Entries left pending by a dead consumer (or by a failed write)
are taken over with XAUTOCLAIM once idle; an entry delivered more than `max_deliveries`
times, or one that cannot be decoded, goes to the partition's dead-letter stream. On a
timer, in a task of its own beside the drain (so a long pass never stalls it): the rebuild
of partitions Redis lost, the hold/grant expiry sweep, the take-over of stale entries, and
trimming of acknowledged entries (never below the oldest pending or undelivered one).

A fault in one partition is that partition's alone: a read, claim, sweep or trim that fails
there is logged (once, until it heals) and the other partitions go on. A partition whose
consumer group is gone (Redis lost its data, a Cluster node restarted empty, or someone
destroyed it) gets it back at once, from the start of the stream (see ensure_groups).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT, KeyT, StreamIdT, XReadGroupResponse

from gateway.core.engine import CreditEngine
from gateway.core.errors import StateLost
from gateway.core.events import BadEvent, Event, decode
from gateway.core.recovery import partition_status
from gateway.core.store.base import Store

from .audit import AuditLog
from .metrics import WorkerMetrics
from .stream_read import AllStreamsRead

log = logging.getLogger("credit.worker")

GROUP = "cg-worker"
CLAIM_SCAN_EVERY = 30
# The metrics' look at every partition (four commands each): every few seconds is as fresh as
# a scrape needs, and an idle worker stays near silent towards Redis.
OBSERVE_EVERY_SECONDS = 5.0

# The upkeep's look at every partition in one call (single server only). "quiet": per
# stream 0 when there is nothing to trim or claim (empty, or only the newest entry, delivered
# and acknowledged, which trimming keeps as the floor), else its length. "due": 1 where an
# expiry set has something due. "trim": trims each stream below the oldest entry pending or
# not yet delivered to a group (what trim() does per partition on a Cluster): per stream
# two numbers, the entries removed and its length after. A key that answers an error gives -1.
_LOOK = """
local function quiet(key, group)
  local len = redis.call('XLEN', key)
  if len ~= 1 then return len end
  local groups = redis.call('XINFO', 'GROUPS', key)
  if #groups ~= 1 then return len end
  local info = {}
  for j = 1, #groups[1], 2 do info[groups[1][j]] = groups[1][j + 1] end
  if info['name'] ~= group or info['pending'] ~= 0 then return len end
  local first = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)[1]
  if first and first[1] == info['last-delivered-id'] then return 0 end
  return len
end
local function due(key, now)
  return #redis.call('ZRANGEBYSCORE', key, '-inf', now, 'LIMIT', 0, 1)
end
local function id_lt(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local function trim(key)
  if redis.call('EXISTS', key) == 0 then return {0, 0} end
  local floor
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
    local info = {}
    for j = 1, #g, 2 do info[g[j]] = g[j + 1] end
    local cand = info['last-delivered-id']
    if info['pending'] ~= 0 then
      cand = redis.call('XPENDING', key, info['name'])[2]
      if not cand then return {0, redis.call('XLEN', key)} end
    end
    if floor == nil or id_lt(cand, floor) then floor = cand end
  end
  local removed = 0
  if floor and floor ~= '0-0' then removed = redis.call('XTRIM', key, 'MINID', floor) end
  return {removed, redis.call('XLEN', key)}
end
local out = {}
for i, key in ipairs(KEYS) do
  local ok, r
  if ARGV[1] == 'trim' then
    ok, r = pcall(trim, key)
    if ok then out[2 * i - 1], out[2 * i] = r[1], r[2] else out[2 * i - 1], out[2 * i] = -1, -1 end
  else
    if ARGV[1] == 'quiet' then ok, r = pcall(quiet, key, ARGV[3]) else ok, r = pcall(due, key, ARGV[2]) end
    if ok and type(r) == 'number' then out[i] = r else out[i] = -1 end
  end
end
return out
"""


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


def _no_group(exc: BaseException) -> bool:
    """NOGROUP: the stream or its consumer group does not exist (any more)."""
    return isinstance(exc, ResponseError) and "NOGROUP" in str(exc)


def _no_key(exc: BaseException) -> bool:
    return isinstance(exc, ResponseError) and "no such key" in str(exc).lower()


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
        block_ms: int = 1000,
        linger_seconds: float = 0.005,
        on_stored: Callable[[list[Event]], Awaitable[object]] | None = None,
        side_jobs: Iterable[Callable[[asyncio.Event], Awaitable[None]]] = (),
        metrics: WorkerMetrics | None = None,
        forget_consumers_after_ms: int = 3_600_000,
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
        # What a stored batch notifies (gateway/notifications/detect.py): run before the
        # batch is acknowledged, so a batch whose step failed or was cut is delivered again.
        self.on_stored = on_stored
        # Loops beside the drain (notification delivery, scans) until the worker stops;
        # not in a burst.
        self.side_jobs = list(side_jobs)
        self.metrics = metrics
        # Consumers idle this long with nothing pending are removed from the group: each worker
        # restart under a default (pid-based) name leaves one behind.
        self.forget_consumers_after_ms = forget_consumers_after_ms
        self._observed_at = -OBSERVE_EVERY_SECONDS  # the first upkeep looks
        self.stats = WorkerStats()
        self.stop_event = asyncio.Event()
        self._pkeys = self.keys.all_partitions()
        self._streams = [pk.events for pk in self._pkeys]
        self._partition_of: dict[str | bytes, int] = {}
        for p, stream in enumerate(self._streams):
            self._partition_of[stream] = self._partition_of[stream.encode()] = p
        # On Redis Cluster a command's keys must share one slot, and each partition is a slot
        # of its own: there is no blocking read over every stream (one per partition would
        # hold 64 connections), and no one-command look at every partition. There the idle
        # worker polls, less often the longer it idles, and the upkeep asks by pipeline.
        self._single = not isinstance(self.redis, RedisCluster)
        self._look = self.redis.register_script(_LOOK) if self._single else None
        self._passes = 0  # upkeep passes: every CLAIM_SCAN_EVERY-th claims on every partition
        self.block_ms = _bounded_block_ms(self.redis, block_ms)
        # After a wake-up by a few entries, this long to let more arrive before the batch is
        # written: at a light, steady rate every entry would otherwise cost a transaction.
        self.linger_seconds = linger_seconds
        self._all_streams = (
            AllStreamsRead(self.redis, GROUP, self.consumer, self._streams, batch, self.block_ms)
            if isinstance(self.redis, Redis)
            else None
        )
        self._idle_wait = idle_seconds
        self._min_count = max(1, batch // len(self._streams))
        self._counts = [self._min_count] * len(self._streams)
        self._faults: dict[tuple[int, str], str] = {}  # (partition, job) -> the error logged
        self._backlog_alerts: dict[int, int] = {}  # partition -> 1 (past half the limit), 2 (at it)
        self._rebuilding: asyncio.Task | None = None
        self._claiming = asyncio.Lock()

    # -- faults of one partition -------------------------------------------------------

    def _fault(self, p: int, job: str, exc: BaseException) -> None:
        """Logs a partition's failure once (until it heals or changes); the others go on."""
        msg = f"{type(exc).__name__}: {exc}"
        if self._faults.get((p, job)) != msg:
            self._faults[(p, job)] = msg
            log.error("partition %d: %s failed (%s); the other partitions go on", p, job, msg)

    def _healed(self, p: int, job: str) -> None:
        if self._faults.pop((p, job), None) is not None:
            log.info("partition %d: %s works again", p, job)

    def _watch_backlog(self, p: int, entries: int) -> None:
        """The alert on a partition's backlog (what is left in its stream after trimming: not
        yet stored): a warning past half the engine's limit, an error at the limit (new holds
        on the partition are refused then), once each until it is back below a quarter."""
        limit = self.engine.max_backlog
        if not limit:
            return
        level = 2 if entries >= limit else 1 if entries * 2 >= limit else 0
        was = self._backlog_alerts.get(p, 0)
        if level > was:
            self._backlog_alerts[p] = level
            if level == 2:
                log.error(
                    "partition %d: backlog of %d events reached CREDIT_MAX_BACKLOG (%d): new holds are "
                    "refused (503 backlog_full) until the store catches up",
                    p,
                    entries,
                    limit,
                )
            else:
                log.warning(
                    "partition %d: backlog of %d events is past half of CREDIT_MAX_BACKLOG (%d): is the "
                    "store slow or down?",
                    p,
                    entries,
                    limit,
                )
        elif was and entries * 4 < limit:
            del self._backlog_alerts[p]
            log.info("partition %d: backlog down to %d events", p, entries)

    # -- setup -------------------------------------------------------------------------

    async def ensure_groups(self, partitions: Iterable[int] | None = None) -> list[int]:
        """Creates the consumer group on the partition streams (all by default) where it is
        missing; returns the partitions that have it now (a failure is logged).

        Always from the stream's start (id 0), never from its end ($): on a stream Redis
        lost, everything in it was written since (the scripts' XADD recreates the stream
        after the rebuild) and none of it is stored yet; on a stream that survived without
        its group, what it still holds is either stored already (stored again: the store is
        idempotent; the audit file may repeat a line) or not yet stored. "$" would skip the
        latter for good.
        """
        parts = list(range(len(self._streams)) if partitions is None else partitions)
        if not parts:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for p in parts:
            pipe.xgroup_create(self._streams[p], GROUP, id="0", mkstream=True)
        replies = await pipe.execute(raise_on_error=False)
        have = []
        for p, reply in zip(parts, replies, strict=False):
            if not isinstance(reply, Exception) or "BUSYGROUP" in str(reply):
                have.append(p)
                self._healed(p, "creating its consumer group")
            else:
                self._fault(p, "creating its consumer group", reply)
        return have

    async def _regroup(self, parts: list[int]) -> list[int]:
        log.warning(
            "partitions %s had no consumer group (Redis lost it?): creating it again from "
            "the start of their streams",
            parts,
        )
        return await self.ensure_groups(parts)

    # -- one round ---------------------------------------------------------------------

    async def _read_partitions(self, start: str, parts: list[int]) -> list[Any]:
        """One XREADGROUP per partition in one pipeline; each answer or its own error.

        Should the pipeline fail as a whole (a Cluster node down fails every command sent to
        it), the partitions are read one by one, so those elsewhere still drain."""
        counts = self._counts
        pipe = self.redis.pipeline(transaction=False)
        for p in parts:
            pipe.xreadgroup(GROUP, self.consumer, {self._streams[p]: start}, count=counts[p])
        try:
            return await pipe.execute(raise_on_error=False)
        except Exception:
            if len(parts) == 1:
                raise
        replies = await asyncio.gather(
            *(
                self.redis.xreadgroup(GROUP, self.consumer, {self._streams[p]: start}, count=counts[p])
                for p in parts
            ),
            return_exceptions=True,
        )
        errors = [r for r in replies if isinstance(r, Exception)]
        if len(errors) == len(replies):
            raise errors[0]  # Redis itself is down: the round fails as a whole
        return replies

    async def _read(self, start: str) -> list[tuple[int, str, dict]]:
        """One pipelined read of every partition. A partition that filled its count gets
        twice the count next round, one that did not gets half: busy partitions drain
        fast while a round stays near `batch` entries in all (bounded memory). A partition
        found without its consumer group gets it back and is read again at once."""
        parts = list(range(len(self._streams)))
        replies = await self._read_partitions(start, parts)
        regroup = [
            p for p, r in zip(parts, replies, strict=False) if isinstance(r, Exception) and _no_group(r)
        ]
        if regroup:
            again = await self._regroup(regroup)
            if again:
                for p, r in zip(again, await self._read_partitions(start, again), strict=False):
                    replies[p] = r
        counts = self._counts
        out = []
        for p, reply in enumerate(replies):
            if isinstance(reply, Exception):
                self._fault(p, "reading its stream", reply)
                continue
            self._healed(p, "reading its stream")
            got = 0
            for _stream, entries in reply or []:
                got += len(entries)
                for sid, fields in entries:
                    # fields None: deleted while pending; nothing to store, only to ack.
                    out.append((p, _s(sid), fields or {}))
            counts[p] = (
                min(self.batch, counts[p] * 2) if got >= counts[p] else max(self._min_count, counts[p] // 2)
            )
        total = sum(counts)
        if total > 2 * self.batch:  # many busy partitions: share the round between them
            for p, c in enumerate(counts):
                counts[p] = max(self._min_count, c * 2 * self.batch // total)
        return out

    def _prepare(
        self, entries: list[tuple[int, str, dict]]
    ) -> tuple[list[Event], list, dict[int, list[str]]]:
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
        stored = good
        started = time.perf_counter()
        try:
            new = await self.store.write_events(good)
        except Exception:
            if self.metrics is not None:
                self.metrics.write_failures.inc()
            # The store down: nothing is acknowledged, everything stays pending. The store
            # up: some event fails on its own (a poison event); write them one by one, so
            # that one goes to the dead letters and not its whole batch.
            if len(good) < 2 or not await self._store_answers():
                raise
            new, poison = await self._one_by_one(good)
            dead = dead + poison
            poisoned = {sid for _, sid, _, _ in poison}
            stored = [e for e in good if e.stream_id not in poisoned]
        await self._stored(stored, time.perf_counter() - started)
        if dead:
            await self._dead_letter(dead)
        pipe = self.redis.pipeline(transaction=False)
        parts = list(ack)
        for p in parts:
            pipe.xack(self._streams[p], GROUP, *ack[p])
        # An XACK that fails leaves its entries pending: claimed and stored again (idempotent).
        for p, reply in zip(parts, await pipe.execute(raise_on_error=False), strict=False):
            if isinstance(reply, Exception):
                self._fault(p, "acknowledging", reply)
            else:
                self._healed(p, "acknowledging")
        self.stats.events += len(good)
        self.stats.new_ledger_rows += new
        self.stats.batches += 1

    async def _stored(self, events: list[Event], seconds: float) -> None:
        """What follows every write of events to the store, before they are acknowledged:
        the metrics, the writes waiting on these versions, the notifications."""
        if self.metrics is not None:
            self.metrics.stored(events, seconds)
        if self.engine.stored_versions is not None:
            self.engine.stored_versions.stored(events)  # the writes waiting on these are answered
        if self.on_stored is not None and events:
            await self.on_stored(events)

    async def _store_answers(self) -> bool:
        try:
            return bool(await self.store.ping())
        except Exception:
            return False

    async def _one_by_one(self, events: list[Event]) -> tuple[int, list[tuple[int, str, dict, str]]]:
        """Writes events one at a time; those that fail while the store answers are poison
        (returned for the dead letters). Raises if the store stops answering meanwhile."""
        new = 0
        poison = []
        for ev in events:
            try:
                new += await self.store.write_events([ev])
            except Exception as exc:
                if not await self._store_answers():
                    raise
                poison.append(
                    (
                        ev.partition,
                        ev.stream_id,
                        {"e": ev.raw_json or orjson.dumps(ev.raw).decode()},
                        f"the store refuses it: {type(exc).__name__}: {exc}",
                    )
                )
        return new, poison

    async def _process(self, entries: list[tuple[int, str, dict]]) -> int:
        if entries:
            await self._commit(*self._prepare(entries))
        return len(entries)

    async def _dead_letter(self, dead: list[tuple[int, str, dict, str]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for p, sid, fields, reason in dead:
            body: dict[FieldT, EncodableT] = {
                **{_s(k): v for k, v in fields.items()},
                "source_id": sid,
                "reason": reason,
            }
            pipe.xadd(self.keys.partition(p).dead, body)
        await pipe.execute()
        self.stats.dead_lettered += len(dead)
        if self.metrics is not None:
            self.metrics.dead_lettered.inc(len(dead))
        for p, sid, _, reason in dead:
            log.error("dead-lettered event %s of partition %d: %s", sid, p, reason)

    async def claim_stale(self) -> int:
        """Takes over entries idle longer than claim_idle_ms (a dead consumer's, or a failed write's)."""
        async with self._claiming:  # the upkeep and a burst's drain both claim: never at once
            return await self._claim_stale()

    async def _claim_stale(self) -> int:
        claimed: list[tuple[int, str, dict]] = []
        too_many: list[tuple[int, str, dict, str]] = []
        regroup = []
        # Only where the group has entries pending (asked in one pipeline): an idle worker
        # sends one command per partition, not an XAUTOCLAIM scan. A partition whose answer
        # is an error or shows no group is claimed from as ever (NOGROUP recreates the group).
        # On a single server, a first look (one command) leaves out the quiet streams: what
        # is pending is in the stream (trimming keeps it), unless someone deleted it by hand,
        # which the full pass every CLAIM_SCAN_EVERY-th upkeep takes care of.
        self._passes += 1
        scan_all = self._passes % CLAIM_SCAN_EVERY == 0
        lengths = None if scan_all else await self._look_at("quiet", self._streams)
        parts = [p for p in range(len(self._streams)) if lengths is None or lengths[p] != 0]
        infos = await self._per_partition(lambda pipe, p: pipe.xinfo_groups(self._streams[p]), 1, parts)
        for p, info in zip(parts, infos, strict=True):
            s = self._streams[p]
            if not isinstance(info, BaseException) and _pending_of(info[0]) == 0:
                continue
            cursor = "0-0"
            try:
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
                self._healed(p, "claiming stale entries")
            except Exception as exc:
                if _no_group(exc):
                    regroup.append(p)
                else:
                    self._fault(p, "claiming stale entries", exc)
        if regroup:
            await self._regroup(regroup)
        if too_many:
            await self._too_many_deliveries(too_many)
        self.stats.claimed += len(claimed)
        for i in range(0, len(claimed), self.batch):
            await self._process(claimed[i : i + self.batch])
        return len(claimed)

    async def _too_many_deliveries(self, entries: list[tuple[int, str, dict, str]]) -> None:
        """Entries delivered more than max_deliveries times. While the store does not answer
        they stay pending, however often delivered: an outage must not move charges out of
        the ledger. Otherwise each is written alone; one that still fails is dead-lettered."""
        if not await self._store_answers():
            return
        good, dead, ack = self._prepare([(p, sid, fields) for p, sid, fields, _ in entries])
        if dead:  # undecodable
            await self._dead_letter(dead)
        if self.audit is not None:
            self.audit.write(good)
        try:
            started = time.perf_counter()
            new, poison = await self._one_by_one(good)
            poisoned = {sid for _, sid, _, _ in poison}
            stored = [e for e in good if e.stream_id not in poisoned]
            await self._stored(stored, time.perf_counter() - started)
        except Exception:
            log.exception(
                "writing entries delivered more than %d times failed; they stay pending", self.max_deliveries
            )
            return
        if poison:
            await self._dead_letter(
                [
                    (p, sid, fields, f"delivered more than {self.max_deliveries} times; {why}")
                    for p, sid, fields, why in poison
                ]
            )
        pipe = self.redis.pipeline(transaction=False)
        for p, ids in ack.items():
            pipe.xack(self._streams[p], GROUP, *ids)
        await pipe.execute()
        self.stats.new_ledger_rows += new

    async def _delivery_counts(self, stream: str, entries: list) -> dict[str, int]:
        ids = [_s(sid) for sid, _ in entries]
        rows = await self.redis.xpending_range(
            stream, GROUP, min=ids[0], max=ids[-1], count=len(ids) + 10, consumername=self.consumer
        )
        return {_s(r["message_id"]): int(r["times_delivered"]) for r in rows}

    async def trim(self) -> int:
        """Drops acknowledged entries; never one that is pending or not yet delivered."""
        removed = 0

        def ask(pipe: Any, p: int) -> None:
            pipe.xinfo_groups(self._streams[p])
            pipe.xlen(self._streams[p])

        # On a single server one command trims every stream. What it could not trim (an
        # error, logged below with its cause) and everything on a Cluster is trimmed
        # partition by partition.
        trimmed = await self._look_at("trim", self._streams)
        parts = [p for p in range(len(self._streams)) if trimmed is None or trimmed[2 * p] < 0]
        for p in range(len(self._streams)):
            if trimmed is not None and trimmed[2 * p] >= 0:
                removed += trimmed[2 * p]
                self._healed(p, "trimming")
                self._watch_backlog(p, trimmed[2 * p + 1])
        infos = await self._per_partition(ask, 2, parts)
        for p, info in zip(parts, infos, strict=True):
            s = self._streams[p]
            try:
                if isinstance(info, BaseException):
                    raise info
                groups, length = info
                if length:
                    cut = await self._trim_one(s, groups)
                    if cut:
                        removed += cut
                        length = await self.redis.xlen(s)
                self._healed(p, "trimming")
                self._watch_backlog(p, length)
            except Exception as exc:
                if not _no_key(exc):  # no stream: nothing to trim
                    self._fault(p, "trimming", exc)
        self.stats.trimmed += removed
        return removed

    async def _trim_one(self, s: str, groups: list[dict]) -> int:
        if not groups:
            return 0
        floor = None
        for g in groups:
            cand = _s(g["last-delivered-id"])
            if int(g.get("pending", 0)):
                summary = await self.redis.xpending(s, _s(g["name"]))
                if summary.get("min") is None:  # acked meanwhile: trim next time
                    return 0
                cand = _s(summary["min"])
            if floor is None or _id_lt(cand, floor):
                floor = cand
        if floor and floor != "0-0":
            return await self.redis.xtrim(s, minid=floor, approximate=False)
        return 0

    async def sweep(self) -> None:
        """Expires due holds and grants, partition by partition (one that is being rebuilt
        is swept once it is back). Which partitions have anything due is asked first, in one
        pipeline; those that answer "nothing" are not swept."""
        now = self.engine.now_ms()

        def due(pipe: Any, p: int) -> None:
            pk = self._pkeys[p]
            pipe.zrangebyscore(pk.hold_expiry, "-inf", now, start=0, num=1)
            pipe.zrangebyscore(pk.grant_expiry, "-inf", now, start=0, num=1)

        looked = await self._look_at(
            "due", [pk.hold_expiry for pk in self._pkeys] + [pk.grant_expiry for pk in self._pkeys], now
        )
        n = len(self._pkeys)
        found: list[list[Any] | BaseException]
        if looked is not None:  # -1: that key answered an error; the sweep shows it
            found = [[looked[p], looked[n + p]] for p in range(n)]
        else:
            found = await self._per_partition(due, 2)
        for p in range(n):
            answer = found[p]
            if not isinstance(answer, BaseException) and not any(answer):
                continue
            try:
                while True:
                    swept = await self.engine.sweep_partition(p)
                    self.stats.swept_holds += swept.holds
                    self.stats.swept_grants += swept.grants
                    if not swept.due_left:
                        break
                self._healed(p, "sweeping")
            except StateLost:
                continue
            except Exception as exc:
                self._fault(p, "sweeping", exc)

    async def _look_at(self, what: str, keys: list[str], now: int = 0) -> list[int] | None:
        """On a single server, one script call over many keys ("quiet", "due" or "trim", see _LOOK).
        None on a Cluster (no command spans slots) or when the call fails: the
        caller then asks partition by partition."""
        if self._look is None:
            return None
        try:
            return [int(x) for x in await self._look(keys=keys, args=[what, now, GROUP])]
        except Exception:
            return None

    async def _per_partition(
        self, ask: Callable[[Any, int], object], k: int, partitions: Iterable[int] | None = None
    ) -> list[list[Any] | BaseException]:
        """The `k` commands `ask(pipe, p)` queues for each partition (all by default), sent
        in one pipeline; per partition its k answers, or its first error. Should the pipeline
        fail as a whole (a Cluster node down fails every command sent to it), each partition
        is asked on its own, so those elsewhere still answer."""
        parts = list(range(len(self._streams)) if partitions is None else partitions)
        if not parts:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for p in parts:
            ask(pipe, p)
        try:
            flat = await pipe.execute(raise_on_error=False)
            return [_first_error(flat[i * k : (i + 1) * k]) for i in range(len(parts))]
        except Exception:
            pass

        async def one(p: int) -> list[Any] | BaseException:
            pipe = self.redis.pipeline(transaction=False)  # one partition: one node
            ask(pipe, p)
            return _first_error(await pipe.execute(raise_on_error=False))

        return list(await asyncio.gather(*(one(p) for p in parts), return_exceptions=True))

    async def forget_consumers(self) -> int:
        """Removes from the group the consumers (not this one) idle longer than
        forget_consumers_after_ms that own no pending entry; how many. A live worker reads
        at least every second, which resets its idle time, and one holding entries keeps
        them for claim_stale to take over."""
        infos = await self._per_partition(lambda pipe, p: pipe.xinfo_consumers(self._streams[p], GROUP), 1)
        pipe = self.redis.pipeline(transaction=False)
        gone: list[tuple[int, str]] = []
        for p, info in enumerate(infos):
            if isinstance(info, BaseException):
                continue  # no stream or group yet
            for c in info[0]:
                name = _s(c["name"])
                if (
                    name != self.consumer
                    and not int(c["pending"])
                    and int(c["idle"]) > self.forget_consumers_after_ms
                ):
                    pipe.xgroup_delconsumer(self._streams[p], GROUP, name)
                    gone.append((p, name))
        if gone:
            await pipe.execute(raise_on_error=False)
            log.info("removed %d idle consumers without pending entries from the group", len(gone))
        return len(gone)

    async def observe_streams(self) -> None:
        """The metrics' view of every partition: entries not yet stored (backlog), of them those
        delivered and not acknowledged (pending), dead letters and open holds. A partition that
        does not answer keeps its last figures."""
        assert self.metrics is not None

        def ask(pipe: Any, p: int) -> None:
            pipe.xinfo_groups(self._streams[p])
            pipe.xlen(self._streams[p])
            pipe.xlen(self._pkeys[p].dead)
            pipe.zcard(self._pkeys[p].hold_expiry)

        for p, answer in enumerate(await self._per_partition(ask, 4)):
            if isinstance(answer, BaseException):
                continue  # no stream or group yet, or out of reach: the drain's logs say why
            groups, length, dead, holds = answer
            group = next((g for g in groups if _s(g["name"]) == GROUP), None)
            if group is None:
                continue
            pending = int(group.get("pending") or 0)
            # Not yet stored: delivered and not acknowledged, plus never delivered ("lag";
            # None when Redis cannot tell, after entries were deleted: the whole stream then).
            lag = group.get("lag")
            self.metrics.pending.labels(str(p)).set(pending)
            self.metrics.backlog.labels(str(p)).set(pending + (int(lag) if lag is not None else int(length)))
            self.metrics.dead_letters.labels(str(p)).set(int(dead))
            self.metrics.holds_open.labels(str(p)).set(int(holds))

    async def _rebuild_job(self) -> None:
        try:
            await self.rebuild_lost()
        except Exception:
            log.exception("worker upkeep (rebuild_lost) failed; carrying on")

    async def rebuild_lost(self) -> None:
        """Rebuilds the partitions Redis lost (those nobody else is rebuilding) and gives
        them their consumer group back."""
        if self._single:
            # One EXISTS over every ready marker: all there, nothing lost (the usual answer).
            with contextlib.suppress(Exception):
                if await self.redis.exists(*[pk.ready for pk in self._pkeys]) == len(self._pkeys):
                    return
        status = await partition_status(self.redis, self.keys)
        if status.lost:
            log.warning("redis lost %d partitions: rebuilding them from the store", len(status.lost))
            await self.rehydrate(status.lost)
            await self.ensure_groups(status.lost)

    async def upkeep(self) -> None:
        """One pass of the timed jobs: rebuild lost partitions (in a task of its own: a rebuild
        can take tens of seconds, and the other partitions keep draining and being swept
        meanwhile), sweep expiries, take over stale entries, trim. Each job failing is logged
        and does not keep the next from running."""
        if self.rehydrate is not None and (self._rebuilding is None or self._rebuilding.done()):
            self._rebuilding = asyncio.create_task(self._rebuild_job(), name="credit-worker-rebuild")
        jobs = [self.sweep, self.claim_stale, self.trim]
        if self._passes % CLAIM_SCAN_EVERY == 1:  # with claim_stale's full pass, every 30th
            jobs.append(self.forget_consumers)
        if self.metrics is not None and time.monotonic() >= self._observed_at + OBSERVE_EVERY_SECONDS:
            self._observed_at = time.monotonic()
            jobs.append(self.observe_streams)
        for job in jobs:
            try:
                await job()
            except Exception:
                log.exception("worker upkeep (%s) failed; carrying on", job.__name__)

    async def _upkeep_loop(self, done: asyncio.Event) -> None:
        """Runs `upkeep` every `sweep_interval` (start to start) until `done`. A task of its
        own beside the drain: a pass over many partitions (or one slow partition) then never
        holds up the persisting of new events."""
        while not done.is_set():
            started = time.monotonic()
            await self.upkeep()
            wait = self.sweep_interval - (time.monotonic() - started)
            if wait <= 0:
                await asyncio.sleep(0)  # let the drain run between back-to-back passes
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), wait)

    # -- loop --------------------------------------------------------------------------

    async def run(self, *, burst: bool = False) -> WorkerStats:
        """Runs until stop() (or, with burst, until every stream is drained), with the
        upkeep on its own timer beside the drain."""
        await self.ensure_groups()
        # Our own pending entries first (a restart under the same consumer name).
        while await self._process(await self._read("0")):
            pass
        done = asyncio.Event()
        upkeep = asyncio.create_task(self._upkeep_loop(done), name="credit-worker-upkeep")
        side: list[asyncio.Future[None]] = (
            [] if burst else [asyncio.ensure_future(job(done)) for job in self.side_jobs]
        )
        try:
            await self._drain(burst, done, upkeep)
        finally:
            done.set()  # the pass under way finishes; none starts after it
            await asyncio.gather(upkeep, *side, return_exceptions=True)
            if self._rebuilding is not None:  # not cut half way (its lease would do, but why)
                await asyncio.gather(self._rebuilding, return_exceptions=True)
        return self.stats

    async def _drain(self, burst: bool, upkeep_done: asyncio.Event, upkeep: asyncio.Task) -> None:
        """The drain loop: read a batch of every partition, write it, acknowledge it. With
        nothing left to read, one blocking read over every stream waits for the next entry
        (on a single Redis server; on a Cluster the idle worker polls, see _pause)."""
        # The store write of one batch runs while the next batch is read and decoded.
        writing: asyncio.Task | None = None
        block = False  # the next read waits for an entry (the last one found none)
        try:
            while not self.stop_event.is_set():
                try:
                    if block:
                        entries, block = await self._wait_for_entries()
                    else:
                        entries = await self._read(">")
                        block = not entries and self._single and not burst
                    prepared = self._prepare(entries)
                    await _finish(writing)
                    writing = None
                    if entries:
                        writing = asyncio.create_task(self._commit(*prepared))
                except Exception:
                    # Not acknowledged: the entries stay pending and are claimed again once idle.
                    log.exception("batch failed; its entries stay pending")
                    writing = None
                    entries = []
                    block = False
                    await asyncio.sleep(self.idle_seconds)
                if entries:
                    self._idle_wait = self.idle_seconds
                    continue
                await _finish(writing)
                writing = None
                if burst:
                    if await self._drained():
                        if upkeep.done():
                            break
                        # What the last upkeep pass adds (expiry events) is drained too.
                        upkeep_done.set()
                        await asyncio.gather(upkeep, return_exceptions=True)
                        continue
                    # Entries pending on another (dead) consumer: take them once idle enough.
                    if not await self.claim_stale():
                        await asyncio.sleep(self.idle_seconds)
                    continue
                if not self._single:
                    await self._pause()
        finally:
            await _finish(writing)

    async def _wait_stopped(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop_event.wait(), seconds)

    async def _pause(self) -> None:
        """The idle wait where no blocking read is possible (Redis Cluster): idle_seconds
        after the last entry, doubling while nothing comes, up to block_ms."""
        await self._wait_stopped(self._idle_wait)
        self._idle_wait = min(self._idle_wait * 2, max(self.idle_seconds, self.block_ms / 1000))

    async def _wait_for_entries(self) -> tuple[list[tuple[int, str, dict]], bool]:
        """One XREADGROUP ... BLOCK over every partition stream at once: a single blocked
        connection, woken by the first entry appended to any of them, or after block_ms,
        or cut short by stop() (what it was handed meanwhile stays pending: claimed again).

        Returns the entries and whether the next read may block again: not when a stream
        filled its count (the adaptive per-partition rounds drain it), when the read failed
        (a partition without its group: the next round recreates it), or when partitions
        whose reads fail were left out of it (the next round polls them)."""
        faulty = {p for p, job in self._faults if job == "reading its stream"}
        parts = [p for p in range(len(self._streams)) if p not in faulty]
        if not parts:
            await self._wait_stopped(self.idle_seconds)
            return [], False
        # A stream's whole batch: what a wake-up and its linger find is rarely more, so the
        # round ends here instead of in a pipelined read of every partition.
        count = self.batch
        whole = self._all_streams if not faulty else None
        if whole is None:
            streams: dict[KeyT, StreamIdT] = {self._streams[p]: ">" for p in parts}
            read = asyncio.ensure_future(
                self.redis.xreadgroup(GROUP, self.consumer, streams, count=count, block=self.block_ms)
            )
        else:
            read = asyncio.ensure_future(whole.blocking())
        stop = asyncio.ensure_future(self.stop_event.wait())
        try:
            await asyncio.wait((read, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not read.done():
                read.cancel()
                await asyncio.gather(read, return_exceptions=True)
        if read.cancelled():
            return [], True
        exc = read.exception()
        if exc is not None:
            log.debug("blocking read failed (%s); the next round reads partition by partition", exc)
            await self._wait_stopped(self.idle_seconds)
            return [], False
        out: list[tuple[int, str, dict]] = []
        full = self._take(read.result(), count, out)
        if out and not full and self.linger_seconds > 0 and not self.stop_event.is_set():
            await asyncio.sleep(self.linger_seconds)
            try:
                if whole is None:
                    more = await self.redis.xreadgroup(GROUP, self.consumer, streams, count=count)
                else:
                    more = await whole.now()
            except Exception as exc:  # what was read is written; the next round reads the rest
                log.debug("the read after the linger failed (%s)", exc)
                return out, False
            full = self._take(more, count, out)
        return out, not full and not faulty

    def _take(self, reply: Any, count: int, out: list[tuple[int, str, dict]]) -> bool:
        """Appends a multi-stream XREADGROUP reply's entries to `out`; True when a stream
        filled its count (more may be waiting there)."""
        full = False
        for stream, entries in _per_stream(reply):
            p = self._partition_of[stream]
            full = full or len(entries) >= count
            for sid, fields in entries:
                if type(fields) is list:  # a raw reply (AllStreamsRead): field, value, ...
                    fields = dict(zip(fields[::2], fields[1::2], strict=True))
                out.append((p, _s(sid), fields or {}))
        return full

    async def _drained(self) -> bool:
        """True when no entry is pending (called right after a read of new entries found none)."""
        for s in self._streams:
            try:
                groups = await self.redis.xinfo_groups(s)
            except ResponseError:  # no stream (nothing pending), or not a stream (nothing to drain)
                continue
            for g in groups:
                if _s(g["name"]) == GROUP and int(g.get("pending", 0)):
                    return False
        return True

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        """Closes the audit file (once run() has returned)."""
        if self.audit is not None:
            self.audit.close()


async def _finish(task: asyncio.Task | None) -> None:
    """Waits for a batch's write. A failure is logged: its entries stay pending and are
    claimed again once idle (and dead-lettered after too many deliveries)."""
    if task is not None:
        try:
            await task
        except Exception:
            log.exception("batch failed; its entries stay pending")


def _per_stream(reply: XReadGroupResponse) -> list[tuple[bytes | str, list[Any]]]:
    """(stream, entries) of each stream in an XREADGROUP answer: a list of pairs (RESP2) or
    a map (RESP3)."""
    out: list[tuple[bytes | str, list[Any]]] = []
    pairs = reply.items() if isinstance(reply, dict) else reply or []
    for stream, entries in pairs:
        listed: list[Any] = list(entries)
        out.append((stream, listed))
    return out


def _first_error(answers: list[Any]) -> list[Any] | BaseException:
    return next((a for a in answers if isinstance(a, BaseException)), answers)


def _pending_of(groups: list[dict]) -> int | None:
    """Entries pending in the worker's group; None when the stream has no such group."""
    for g in groups:
        if _s(g["name"]) == GROUP:
            return int(g.get("pending", 0))
    return None


def _bounded_block_ms(redis: Any, block_ms: int) -> int:
    """block_ms, kept below half the client's socket timeout (a blocked read that outlasts
    it would fail as a timeout)."""
    pool = getattr(redis, "connection_pool", None)
    timeout = pool.connection_kwargs.get("socket_timeout") if pool is not None else None
    if timeout:
        block_ms = min(block_ms, int(timeout * 500))
    return max(1, block_ms)


def _id_lt(a: str, b: str) -> bool:
    am, _, asq = a.partition("-")
    bm, _, bsq = b.partition("-")
    return (int(am), int(asq or 0)) < (int(bm), int(bsq or 0))
