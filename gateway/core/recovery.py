"""Rebuilding Redis from the store (rehydrate), and which partitions are ready to serve.

The rebuild of a partition: take its lease (one process at a time; see lua/rebuild_lease.lua),
write its accounts, the operation ids of the retention window, its API keys and rate-limit
overrides, then set its ready marker, which re-opens it to writes. The writes go in
pipelines, several in flight at once, for every partition being rebuilt together. Every
write is safe to repeat or to race: accounts are restored only over an older version, op
ids and API keys only where nothing is (SET NX: never over a newer answer or a revoked
key's tombstone). The marker is set only while the lease is still ours: a lease gone
means Redis lost the partition again meanwhile, and with it part of what we wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.exceptions import NoScriptError

from .apikeys import restore_api_keys
from .engine import CreditEngine
from .keys import KeySpace
from .ratelimits import restore_rate_limits
from .redis_client import RedisClient
from .store.base import AccountSnapshot, Store

log = logging.getLogger("credit.recovery")

OPS_PER_CALL = 500  # operation ids per restore_ops script call (one partition's)
ACCOUNTS_PER_PIPELINE = 100  # restore scripts per pipeline (each carries an account's state)
PIPELINES_IN_FLIGHT = 8
LEASE_MS = 30_000  # renewed every third of it while the rebuild runs


@dataclass
class RehydrateReport:
    accounts: int = 0
    skipped: int = 0
    operations: int = 0
    resolved_holds: int = 0
    partitions: int = 0  # rebuilt and marked ready by this call
    api_keys: int = 0
    rate_limits: int = 0
    busy: list[int] = field(default_factory=list)  # another process was rebuilding them
    unfinished: list[int] = field(default_factory=list)  # lease lost midway: left not ready


@dataclass(frozen=True)
class PartitionStatus:
    """What the ready markers say: partitions without one, with or without a rebuild under way."""

    total: int
    lost: list[int]  # no ready marker and nobody rebuilding it
    rebuilding: list[int]  # no ready marker; a process holds its rebuild lease
    unreachable: list[int] = field(default_factory=list)  # Redis did not answer for them (a node down)

    @property
    def not_ready(self) -> list[int]:
        return sorted(self.lost + self.rebuilding)

    @property
    def unavailable(self) -> list[int]:
        """Partitions that cannot serve now: not ready, or out of reach."""
        return sorted(self.lost + self.rebuilding + self.unreachable)


async def partition_status(redis: RedisClient, keys: KeySpace) -> PartitionStatus:
    """One pipeline of EXISTS (markers and leases); on a Cluster it is split by node. Should
    it fail as a whole (a Cluster node down), each partition is asked on its own, and those
    that do not answer are `unreachable`; none answering raises (Redis is down)."""
    parts = keys.all_partitions()
    pipe = redis.pipeline(transaction=False)
    for pk in parts:
        pipe.exists(pk.ready)
    for pk in parts:
        pipe.exists(pk.rebuild)
    n = len(parts)
    try:
        flags = await pipe.execute()
    except Exception:
        return await _partition_status_one_by_one(redis, keys)
    lost = [p for p in range(n) if not flags[p] and not flags[n + p]]
    rebuilding = [p for p in range(n) if not flags[p] and flags[n + p]]
    return PartitionStatus(n, lost, rebuilding)


async def _partition_status_one_by_one(redis: RedisClient, keys: KeySpace) -> PartitionStatus:
    async def one(pk: Any) -> list[int]:
        pipe = redis.pipeline(transaction=False)  # one hash tag: one node
        pipe.exists(pk.ready)
        pipe.exists(pk.rebuild)
        return await pipe.execute()

    parts = keys.all_partitions()
    replies = await asyncio.gather(*(one(pk) for pk in parts), return_exceptions=True)
    errors = [r for r in replies if isinstance(r, BaseException)]
    if len(errors) == len(parts):
        raise errors[0]
    status = PartitionStatus(len(parts), [], [])
    for p, r in enumerate(replies):
        if isinstance(r, BaseException):
            status.unreachable.append(p)
        elif not r[0]:
            (status.rebuilding if r[1] else status.lost).append(p)
    return status


def _restore_state(snap: AccountSnapshot) -> dict[str, Any]:
    t = snap.totals
    return {
        **{
            k: str(int(t.get(k, 0)))
            for k in ("seq", "held", "debt", "debt_total", "granted", "spent", "expired")
        },
        "grants": [
            {
                "seq": g["seq"],
                "r": str(g["r"]),
                "e": str(g["e"]),
                "x": str(g["x"]),
                "pri": int(g["pri"]),
                "m": g["m"],
            }
            for g in snap.grants
        ],
        "holds": [
            {
                "id": h["id"],
                "amt": str(h["amt"]),
                "exp": str(h["exp"]),
                "ear": h.get("ear") or "",
                "at": str(h.get("at") or 0),
                "op": h.get("op") or h["id"],
                "x": h.get("x") or "{}",
            }
            for h in snap.holds
        ],
    }


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


async def _scripts(engine: CreditEngine, name: str, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
    """Runs one script many times in one pipeline; an answer of NOSCRIPT (a node that lost
    its script cache meanwhile) is run again on its own, which loads it there. A call with
    a key count the script does not declare raises ScriptError before any call is sent."""
    script = engine.scripts[name]
    pipe = engine.redis.pipeline(transaction=False)
    for keys, args in calls:
        script.check_keys(keys)
        # Not pipe.evalsha: redis-py's cluster pipeline refuses that method (not the command).
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
    replies = await pipe.execute(raise_on_error=False)
    out = []
    for (keys, args), reply in zip(calls, replies, strict=False):
        if isinstance(reply, NoScriptError):
            reply = await engine.scripts.call(engine.redis, name, keys, args)
        elif isinstance(reply, Exception):
            raise reply
        out.append(reply)
    return out


class _InFlight:
    """At most `width` coroutines running at once; the first failure is raised by the next
    spawn() or by wait()."""

    def __init__(self, width: int) -> None:
        self._slots = asyncio.Semaphore(width)
        self._tasks: set[asyncio.Task] = set()
        self._error: BaseException | None = None

    async def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        if self._error is None:
            await self._slots.acquire()
        if self._error is not None:
            coro.close()
            raise self._error
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None and self._error is None:
            self._error = task.exception()

    async def wait(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._error is not None:
            raise self._error

    async def cancel(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class _Leases:
    """This rebuild's leases on its partitions (lua/rebuild_lease.lua)."""

    def __init__(self, engine: CreditEngine, lease_ms: int) -> None:
        self.engine = engine
        self.lease_ms = lease_ms
        self.token = uuid.uuid4().hex

    async def _run(self, op: str, parts: list[int], flag: str = "") -> list[int]:
        if not parts:
            return []
        calls = []
        for p in parts:
            pk = self.engine.keys.partition(p)
            calls.append(([pk.rebuild, pk.ready], [op, self.token, self.lease_ms, flag]))
        return [int(r) for r in await _scripts(self.engine, "rebuild_lease", calls)]

    async def take(self, parts: list[int], *, even_if_ready: bool) -> tuple[list[int], list[int]]:
        """(taken, busy): the partitions now ours, those another process is rebuilding;
        with even_if_ready False, partitions found ready are neither."""
        got = await self._run("take", parts, "1" if even_if_ready else "")
        return [p for p, r in zip(parts, got, strict=False) if r == 1], [
            p for p, r in zip(parts, got, strict=False) if r == 0
        ]

    async def keep(self, parts: list[int]) -> None:
        """Renews the leases until cancelled."""
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            try:
                lost = [p for p, r in zip(parts, await self._run("renew", parts), strict=False) if r != 1]
                if lost:
                    log.warning("rebuild lease of partitions %s lost (Redis lost them again?)", lost)
            except Exception:
                log.exception("renewing the rebuild leases failed")

    async def done(self, parts: list[int]) -> list[int]:
        """Sets the ready marker of each partition still ours; returns those."""
        return [p for p, r in zip(parts, await self._run("done", parts), strict=False) if r == 1]

    async def drop(self, parts: list[int]) -> None:
        await self._run("drop", parts)


async def _snapshots(store: Store, keys: KeySpace, wanted: set[int]) -> AsyncIterator[AccountSnapshot]:
    """The accounts of the wanted partitions: one scan for most of them, else one query each."""
    if len(wanted) * 2 > keys.partitions:
        sources = [store.snapshots()]
    else:
        sources = [store.snapshots(p) for p in sorted(wanted)]
    for source in sources:
        async for snap in source:
            if keys.partition_of(snap.user) in wanted:
                yield snap


async def _restore_accounts(
    engine: CreditEngine, snaps: list[AccountSnapshot], report: RehydrateReport
) -> None:
    # The holds Redis still lists as open, per account (a partial loss leaves some): restore
    # deletes those the store does not know. The account script reads them from the 'o:' fields.
    pipe = engine.redis.pipeline(transaction=False)
    for snap in snaps:
        pipe.hkeys(engine.keys.account_keys(snap.user)[0])
    fields = await pipe.execute()
    calls = []
    for snap, names in zip(snaps, fields, strict=False):
        stale = [f[2:] for f in map(_s, names) if f.startswith("o:")]
        calls.append(engine.restore_call(snap.user, snap.version, _restore_state(snap), stale))
    for code, _ in await _scripts(engine, "restore", calls):
        if _s(code) == "ok":
            report.accounts += 1
        else:
            report.skipped += 1


async def _restore_holds(
    engine: CreditEngine, holds: list[tuple[str, tuple[str, int]]], report: RehydrateReport
) -> None:
    await engine.scripts.call(
        engine.redis, "restore_holds", [k for k, _ in holds], [orjson.dumps([v for _, v in holds])]
    )
    report.resolved_holds += len(holds)


async def _restore_ops(
    engine: CreditEngine, ops: list[tuple[str, str, str, str, int]], report: RehydrateReport
) -> None:
    # One script call per partition's chunk: redis-py spends ~20 us of CPU per pipelined
    # command, which a million SETs would pay a million times.
    keys, args = engine.restore_ops_call(ops)
    await engine.scripts.call(engine.redis, "restore_ops", keys, args)
    report.operations += len(ops)


async def rehydrate(
    engine: CreditEngine,
    store: Store,
    partitions: list[int] | None = None,
    *,
    only_missing: bool = False,
    width: int = PIPELINES_IN_FLIGHT,
    lease_ms: int = LEASE_MS,
) -> RehydrateReport:
    """Rebuilds accounts, grants, open holds, recent operation ids, API keys and rate-limit
    overrides of the given partitions (all by default) from the store.

    Only accounts Redis does not already hold at the same or a newer version are written;
    each partition's ready marker is set at the end, which re-opens it to writes. Partitions
    another process is rebuilding are left to it (`report.busy`); with `only_missing`, those
    found ready by then are left alone too.
    """
    report = RehydrateReport()
    asked = sorted(set(range(engine.keys.partitions) if partitions is None else partitions))
    for name in ("rebuild_lease", "restore", "restore_holds", "restore_ops"):  # on every node of a Cluster
        await engine.redis.script_load(engine.scripts[name].source)
    leases = _Leases(engine, lease_ms)
    taken, report.busy = await leases.take(asked, even_if_ready=not only_missing)
    if report.busy:
        log.info("partitions %s are being rebuilt by another process", report.busy)
    if not taken:
        return report
    wanted = set(taken)
    keeper = asyncio.create_task(leases.keep(taken))
    flight = _InFlight(width)
    try:
        accounts: list[AccountSnapshot] = []
        async for snap in _snapshots(store, engine.keys, wanted):
            accounts.append(snap)
            if len(accounts) == ACCOUNTS_PER_PIPELINE:
                await flight.spawn(_restore_accounts(engine, accounts, report))
                accounts = []
        if accounts:
            await flight.spawn(_restore_accounts(engine, accounts, report))
        # Operation ids answered within the retention window answer the same after the
        # rebuild. After the accounts: a hold's reserve record lives in its hash, which the
        # account's restore writes anew.
        await flight.wait()
        now_ms = engine.now_ms()
        retention_s = engine.retention_s
        partition_of = engine.keys.partition_of
        # Holds resolved within the window: their status (already_settled...), and their ids
        # stay taken. A hold resolves by its deadline and is kept the retention after that.
        resolved: dict[int, list[tuple[str, tuple[str, int]]]] = {p: [] for p in wanted}
        async for h in store.resolved_holds_since(now_ms - retention_s * 1000):
            p = partition_of(h.user)
            if p in wanted:
                ttl = retention_s - max(now_ms - h.expires_ms, 0) // 1000
                resolved[p].append((engine.keys.hold_key(h.user, h.hold_id), (h.status, ttl)))
                if len(resolved[p]) == OPS_PER_CALL:
                    await flight.spawn(_restore_holds(engine, resolved[p], report))
                    resolved[p] = []
        for holds in resolved.values():
            if holds:
                await flight.spawn(_restore_holds(engine, holds, report))
        await flight.wait()
        op_chunks: dict[int, list[tuple[str, str, str, str, int]]] = {p: [] for p in wanted}
        parts: dict[str, int] = {}  # a user's partition (a user has many operations)
        async for op in store.operations_since(now_ms - retention_s * 1000):
            cached = parts.get(op.user)
            if cached is None:  # not seen yet (or forgotten): compute it and remember it
                if len(parts) > 100_000:
                    parts.clear()
                op_part = parts[op.user] = partition_of(op.user)
            else:
                op_part = cached
            if op_part not in wanted:
                continue
            ttl = retention_s - (now_ms - op.ts_ms) // 1000
            if ttl > 0:
                ops = op_chunks[op_part]
                # '#v<version>': the ledger's name of an id applied again after Redis forgot
                # it; Redis knows the operation by its own id.
                ops.append((op.user, op.op_id.partition("#")[0], op.fingerprint, op.result, ttl))
                if len(ops) == OPS_PER_CALL:
                    await flight.spawn(_restore_ops(engine, ops, report))
                    op_chunks[op_part] = []
        for ops in op_chunks.values():
            if ops:
                await flight.spawn(_restore_ops(engine, ops, report))
        # The admin records that live on these partitions: API keys and rate-limit overrides.
        report.api_keys = await restore_api_keys(engine.redis, engine.keys, store, wanted)
        report.rate_limits = await restore_rate_limits(engine.redis, engine.keys, store, wanted)
        await flight.wait()
    except BaseException:
        await flight.cancel()
        keeper.cancel()
        with contextlib.suppress(Exception):
            await asyncio.shield(leases.drop(taken))
        raise
    keeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await keeper
    marked = await leases.done(taken)
    report.partitions = len(marked)
    report.unfinished = sorted(wanted - set(marked))
    if report.unfinished:
        log.warning(
            "partitions %s lost their rebuild lease (Redis lost them again?): left not ready, "
            "to be rebuilt again",
            report.unfinished,
        )
    log.info("rehydrated %s", report)
    return report


async def ensure_ready(engine: CreditEngine, store: Store) -> RehydrateReport | None:
    """Rebuilds the partitions whose ready marker is missing (Redis lost them, or first start)
    and that no other process is rebuilding already."""
    status = await partition_status(engine.redis, engine.keys)
    if not status.lost:
        return None
    return await rehydrate(engine, store, status.lost, only_missing=True)


# A gateway leaves a lost partition to the worker (whose upkeep rebuilds it within about a
# second) for this long before rebuilding it itself: then no worker is running.
GATEWAY_REBUILD_GRACE_S = 5.0


async def watch_partitions(engine: CreditEngine, store: Store, interval: float) -> None:
    """Checks the ready markers every `interval` seconds and rebuilds a partition that has
    stayed lost (no marker, nobody rebuilding it) for GATEWAY_REBUILD_GRACE_S. A gateway
    without an in-process worker runs this until cancelled."""
    lost_since: dict[int, float] = {}
    while True:
        await asyncio.sleep(interval)
        try:
            status = await partition_status(engine.redis, engine.keys)
            now = time.monotonic()
            lost_since = {p: lost_since.get(p, now) for p in status.lost}
            due = [p for p, t in lost_since.items() if now - t >= GATEWAY_REBUILD_GRACE_S]
            if due:
                log.warning(
                    "partitions %s have been lost for %.0f s with nobody rebuilding them: "
                    "rebuilding them here",
                    due,
                    GATEWAY_REBUILD_GRACE_S,
                )
                await rehydrate(engine, store, due, only_missing=True)
        except Exception:
            log.exception("checking or rebuilding lost partitions failed")
