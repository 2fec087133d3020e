"""Benchmark of the credit engine and the worker against a real, private redis-server.

    .venv/bin/python loadtest/engine_bench.py [--quick] [--json out.json]

A measuring script, not a test: nothing here asserts on timings. It starts its own
redis-server (no persistence, in a temp dir) and measures in one run:

1. reserve+settle cycles/s at the same concurrency (N asyncio tasks, one redis.asyncio
   client with a pool, hiredis parser) for three variants, interleaved in rounds (the
   machine is shared and noisy) and summarised by the median round:
     engine   engine.reserve_units / engine.settle_units
     decimal  engine.reserve / engine.settle (Decimal credits)
     bare     redis.evalsha of the same scripts with the same KEYS / ARGV the engine sends
   and the ratio engine/bare (target >= 0.85).
2. The worker's drain rate into SQLite: streams pre-filled with N valid events (copies of
   a realistic sample the engine produced, under distinct users), then
   `Worker(engine, SQLiteStore(path), batch=1000).run(burst=True)` timed, audit off and on
   (target >= 10,000 events/s).
3. The worker's memory while draining 1,000,000 events (50,000 with --quick): the worker
   runs as `python -m gateway.worker --burst` in a subprocess; its VmRSS is sampled every 0.5 s
   against the drain progress (the consumer group's entries-read). The worker reads up to
   batch x partitions entries per round, so RSS saw-tooths; the figures at 10/50/90% are
   the peak RSS of the round that passed that point.

--profile adds cProfile tables (client cycles, worker drain) and a per-stage breakdown of
the drain. Client cost per cycle is also measured against a stub Redis (no noise).
The run is bounded (--quick < 90 s, full < 10 min): the memory part stops its worker at
the deadline and reports the part drained (PARTIAL).

A summary table (one line per figure, target, PASS/MISS) ends the output; --json also
writes it as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import hiredis
import redis.asyncio as aioredis
import redis.utils
from redis_server import RedisServer  # beside this script

from gateway.core.engine import CreditEngine
from gateway.core.events import decode
from gateway.core.keys import KeySpace
from gateway.core.multiplex import MultiplexedRedis
from gateway.core.store.sqlite import SQLiteStore
from gateway.worker.audit import AuditLog
from gateway.worker.runner import GROUP, Worker

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 64
UNITS = 1_000  # micro-credits per hold (0.001 credit)
UNITS_DEC = Decimal("0.001")
FUND = Decimal("1000000")  # credits granted to every bench user: nothing is ever refused
PH = "@@USER@@"  # user placeholder in the event templates

CYCLE_TARGET = 0.85
DRAIN_TARGET = 10_000.0
# Memory: "flat" = after the first 10% of the drain, RSS grows by at most this much.
RSS_GROWTH_TARGET_MB = 32.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- redis-server ----------------------------------------------------------------------------


def new_client(url: str, pool: int = 64) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, max_connections=pool)


async def mark_all_ready(engine: CreditEngine) -> None:
    for p in range(engine.keys.partitions):
        await engine.mark_ready(p)


async def trim_streams(r: aioredis.Redis, ks: KeySpace) -> None:
    pipe = r.pipeline(transaction=False)
    for pk in ks.all_partitions():
        pipe.xtrim(pk.events, maxlen=0, approximate=False)
    await pipe.execute()


async def bounded_gather(n: int, coros: list[Awaitable[Any]]) -> None:
    sem = asyncio.Semaphore(n)

    async def one(c: Awaitable[Any]) -> None:
        async with sem:
            await c

    await asyncio.gather(*(one(c) for c in coros))


# -- 1. reserve+settle cycles/s ------------------------------------------------------------


Cycle = Callable[[str, str], Awaitable[None]]


def make_cycles(
    engine: CreditEngine, r: aioredis.Redis, mux_engine: CreditEngine | None = None
) -> dict[str, Cycle]:
    async def engine_units(user: str, hid: str) -> None:
        await engine.reserve_units(user, UNITS, hold_id=hid, ttl_seconds=60)
        await engine.settle_units(user, hid, UNITS)

    async def engine_mux(user: str, hid: str) -> None:
        await mux_engine.reserve_units(user, UNITS, hold_id=hid, ttl_seconds=60)
        await mux_engine.settle_units(user, hid, UNITS)

    async def engine_decimal(user: str, hid: str) -> None:
        await engine.reserve(user, UNITS_DEC, hold_id=hid, ttl_seconds=60)
        await engine.settle(user, hid, UNITS_DEC)

    ks = engine.keys
    rsha = engine.scripts["reserve"].sha
    ssha = engine.scripts["settle"].sha
    retention = engine.retention_s
    evalsha = r.evalsha

    async def bare(user: str, hid: str) -> None:
        # Exactly the KEYS / ARGV of engine.reserve_units / settle_units (op id defaults).
        now = int(time.time() * 1000)
        code, _ = await evalsha(
            rsha,
            11,
            *ks.account_keys(user, hid, hid),
            *ks.rate_keys(user),
            now,
            retention,
            user,
            hid,
            hid,
            UNITS,
            60_000,
            "{}",
            0,
            0,
            "",
            engine.max_backlog,
        )
        if code != b"ok":
            raise RuntimeError(f"reserve answered {code!r}")
        op = "!settle:" + hid
        now = int(time.time() * 1000)
        code, _ = await evalsha(
            ssha,
            11,
            *ks.account_keys(user, op, hid),
            *ks.rate_keys(user),
            now,
            retention,
            user,
            op,
            hid,
            UNITS,
            "{}",
            "",
        )
        if code != b"ok":
            raise RuntimeError(f"settle answered {code!r}")

    cycles = {"engine": engine_units, "decimal": engine_decimal, "bare": bare}
    if mux_engine is not None:  # the engine as the gateway runs it: scripts over the multiplexed client
        cycles["multiplexed"] = engine_mux
    return cycles


async def run_round(cycle: Cycle, users: list[str], conc: int, seconds: float, tag: str) -> tuple[int, float]:
    """`conc` tasks run cycles until the deadline; returns (cycles, seconds)."""
    n = len(users)
    counts = [0] * conc
    deadline = time.perf_counter() + seconds
    clock = time.perf_counter

    async def task(t: int) -> None:
        i = 0
        while clock() < deadline:
            await cycle(users[(t + i * conc) % n], f"{tag}-{t}-{i}")
            i += 1
        counts[t] = i

    t0 = clock()
    await asyncio.gather(*(task(t) for t in range(conc)))
    return sum(counts), clock() - t0


CLK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


async def measured_round(
    r: aioredis.Redis, redis_pid: int, cycle: Cycle, users: list[str], cfg: argparse.Namespace, tag: str
) -> dict[str, float]:
    """One round, with the CPU both sides spent per cycle (the box is shared: a variant that
    got less CPU shows here) and Redis's own time in EVALSHA."""
    await r.config_resetstat()
    c0, rc0 = time.process_time(), proc_cpu_s(redis_pid)
    n, el = await run_round(cycle, users, cfg.concurrency, cfg.round_seconds, tag)
    c1, rc1 = time.process_time(), proc_cpu_s(redis_pid)
    ev = (await r.info("commandstats")).get("cmdstat_evalsha", {})
    return {
        "rate": n / el,
        "cycles": n,
        "seconds": el,
        "py_cpu_pct": 100 * (c1 - c0) / el,
        "redis_cpu_pct": 100 * (rc1 - rc0) / el,
        "py_cpu_us_per_cycle": 1e6 * (c1 - c0) / max(n, 1),
        "redis_cpu_us_per_cycle": 1e6 * (rc1 - rc0) / max(n, 1),
        "redis_evalsha_us_per_call": float(ev.get("usec_per_call", 0.0)),
    }


async def client_overhead(engine: CreditEngine, r: aioredis.Redis, user: str, reps: int) -> dict[str, float]:
    """Client-side cost of one cycle per variant, with Redis replaced by a stub answering
    real replies instantly (noise-free: sequential, best of 5 batches), in microseconds."""
    ks, ret = engine.keys, engine.retention_s
    rsha, ssha = engine.scripts["reserve"].sha, engine.scripts["settle"].sha
    hid, op = "stub-capture", "!settle:stub-capture"
    now = engine.now_ms()
    replies = {
        rsha: await r.evalsha(
            rsha,
            11,
            *ks.account_keys(user, hid, hid),
            *ks.rate_keys(user),
            now,
            ret,
            user,
            hid,
            hid,
            UNITS,
            60_000,
            "{}",
            0,
            0,
            "",
        ),
        ssha: await r.evalsha(
            ssha,
            11,
            *ks.account_keys(user, op, hid),
            *ks.rate_keys(user),
            now,
            ret,
            user,
            op,
            hid,
            UNITS,
            "{}",
            "",
        ),
    }

    class Stub:
        async def evalsha(self, sha: str, numkeys: int, *args: Any) -> Any:
            return replies[sha]

    stub = Stub()
    cycles = make_cycles(CreditEngine(stub, keys=ks, scripts=engine.scripts), stub)  # type: ignore[arg-type]
    out = {}
    for v, cyc in cycles.items():
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _i in range(reps):
                await cyc(user, "h")
            best = min(best, (time.perf_counter() - t0) / reps)
        out[v] = best * 1e6
    return out


async def bench_cycles(url: str, redis_pid: int, cfg: argparse.Namespace, out: dict) -> None:
    r = new_client(url, pool=max(64, cfg.concurrency * 2))
    try:
        await r.flushall()
        engine = CreditEngine(r, keys=KeySpace(partitions=PARTITIONS))
        await mark_all_ready(engine)
        users = [f"bench-u{i}" for i in range(cfg.users)]
        t0 = time.perf_counter()
        await bounded_gather(
            cfg.concurrency, [engine.grant(u, FUND, op_id=f"fund-{u}", source="payment") for u in users]
        )
        log(f"funded {len(users)} users in {time.perf_counter() - t0:.1f}s")
        for name in ("reserve", "settle"):
            sha = await r.script_load(engine.scripts[name].source)
            assert sha == engine.scripts[name].sha, "registry sha differs from SCRIPT LOAD"
        mux = MultiplexedRedis(url, connections=2)
        cycles = make_cycles(engine, r, CreditEngine(r, keys=engine.keys, script_redis=mux))
        names = list(cycles)
        # Sanity: one cycle of each variant moves exactly UNITS.
        before = await engine.balance(users[0])
        for v in names:
            await cycles[v](users[0], f"check-{v}")
        after = await engine.balance(users[0])
        assert after.spent - before.spent == Decimal(UNITS * len(names)) / 1_000_000, (before, after)
        assert after.held == before.held
        for v in names:  # warm-up (discarded)
            await run_round(cycles[v], users, cfg.concurrency, cfg.warmup, f"w{v[0]}")
        await trim_streams(r, engine.keys)
        rounds: dict[str, list[dict[str, float]]] = {v: [] for v in names}
        for rnd in range(cfg.rounds):
            order = names[rnd % len(names) :] + names[: rnd % len(names)]  # rotate: A/B/C, B/C/A, ...
            line = []
            for v in order:
                m = await measured_round(r, redis_pid, cycles[v], users, cfg, f"r{rnd}{v[0]}")
                rounds[v].append(m)
                line.append(
                    f"{v}={m['rate']:,.0f} (py {m['py_cpu_pct']:.0f}% redis {m['redis_cpu_pct']:.0f}%)"
                )
                await trim_streams(r, engine.keys)  # keep Redis memory bounded, outside the timing
            log(f"round {rnd + 1}/{cfg.rounds} cycles/s: " + "  ".join(line))
        rates = {v: [m["rate"] for m in ms] for v, ms in rounds.items()}
        med = {v: statistics.median(x) for v, x in rates.items()}
        per_cycle = {
            v: {
                k: statistics.median(m[k] for m in ms)
                for k in ms[0]
                if k not in ("rate", "cycles", "seconds")
            }
            for v, ms in rounds.items()
        }
        paired = [e / b for e, b in zip(rates["engine"], rates["bare"], strict=False)]
        paired_dec = [e / b for e, b in zip(rates["decimal"], rates["bare"], strict=False)]
        stub = await client_overhead(engine, r, users[1], cfg.stub_reps)
        log("client-side us/cycle with a stub Redis: " + "  ".join(f"{v}={x:.1f}" for v, x in stub.items()))
        out["cycles"] = {
            "concurrency": cfg.concurrency,
            "users": cfg.users,
            "rounds": cfg.rounds,
            "round_seconds": cfg.round_seconds,
            "rates": rates,
            "median": med,
            "per_cycle_medians": per_cycle,
            "stub_client_us_per_cycle": stub,
            "ratio_engine_bare": med["engine"] / med["bare"],
            "ratio_decimal_bare": med["decimal"] / med["bare"],
            "ratio_engine_bare_paired_median": statistics.median(paired),
            "ratio_decimal_bare_paired_median": statistics.median(paired_dec),
            "ratio_multiplexed_bare": med["multiplexed"] / med["bare"],
        }
        await mux.aclose()
        if cfg.profile:
            await profile_cycles(cycles, users, cfg)
    finally:
        await r.aclose()


async def profile_cycles(cycles: dict[str, Cycle], users: list[str], cfg: argparse.Namespace) -> None:
    import cProfile
    import pstats

    for v in ("engine", "bare"):
        prof = cProfile.Profile()
        prof.enable()
        await run_round(cycles[v], users, cfg.concurrency, 2.0, f"p{v[0]}")
        prof.disable()
        print(f"--- cProfile, {v} cycles (2 s, tottime) ---")
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


# -- event samples and stream filling ------------------------------------------------------


async def make_templates(url: str, cfg: argparse.Namespace) -> list[list[str]]:
    """Runs the engine on a few users (grant + reserve/settle cycles with metadata, as the
    HTTP API sends them) and returns each user's events as JSON templates, in order."""
    r = new_client(url)
    try:
        await r.flushall()
        engine = CreditEngine(r, keys=KeySpace(partitions=PARTITIONS))
        await mark_all_ready(engine)
        users = [f"sample-user-{i:03d}" for i in range(cfg.sample_users)]

        async def life(i: int, u: str) -> None:
            await engine.grant(
                u,
                Decimal("250.5"),
                op_id=f"pay-{i:06d}-7f3a",
                source="payment",
                metadata={"invoice": f"in_1P{i:08d}xYz", "plan": "pro"},
            )
            for k in range(cfg.sample_cycles):
                hid = f"req_{i:04d}_{k:04d}_9c1e2b7d"
                await engine.reserve(
                    u,
                    Decimal("0.125"),
                    hold_id=hid,
                    ttl_seconds=120,
                    metadata={"description": "chat.completions gpt-4o-mini"},
                )
                await engine.settle(
                    u, hid, Decimal("0.083417"), metadata={"description": "chat.completions gpt-4o-mini"}
                )

        await asyncio.gather(*(life(i, u) for i, u in enumerate(users)))
        per_user: dict[str, list[tuple[int, str]]] = {u: [] for u in users}
        for p, pk in enumerate(engine.keys.all_partitions()):
            for sid, fields in await r.xrange(pk.events):
                ev = decode(sid, fields, p)  # must decode like the worker does
                raw = json.loads(fields[b"e"])
                assert raw["u"] == ev.user
                raw["u"] = PH
                per_user[ev.user].append((ev.version, json.dumps(raw, separators=(",", ":"))))
        templates = [[t for _, t in sorted(evs)] for evs in per_user.values()]
        assert all(len(t) == 1 + 2 * cfg.sample_cycles for t in templates)
        await r.flushall()
        return templates
    finally:
        await r.aclose()


async def fill_streams(
    url: str, templates: list[list[str]], n_events: int, tag: str, chunk: int = 10_000
) -> int:
    """XADDs copies of the templates under distinct users (each user's events in order, on
    its own partition stream) until at least n_events. Commands are packed by hiredis and
    pipelined on a raw connection in chunks of `chunk`. Returns the count."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    ks = KeySpace(partitions=PARTITIONS)
    streams = [pk.events.encode() for pk in ks.all_partitions()]
    tmpl = [[t.encode().split(PH.encode()) for t in tl] for tl in templates]
    pack = hiredis.pack_command
    total = copy = 0

    async def flush(buf: list[bytes], count: int) -> None:
        writer.write(b"".join(buf))
        await writer.drain()
        rd = hiredis.Reader()
        got = 0
        while got < count:
            data = await reader.read(1 << 20)
            if not data:
                raise RuntimeError("redis closed the connection during the fill")
            rd.feed(data)
            while (reply := rd.gets()) is not False:
                if isinstance(reply, hiredis.ReplyError):
                    raise RuntimeError(f"XADD failed: {reply}")
                got += 1

    try:
        buf: list[bytes] = []
        queued = 0
        while total < n_events:
            for si, tl in enumerate(tmpl):
                user = f"{tag}{copy}u{si}"
                ub = user.encode()
                stream = streams[ks.partition_of(user)]
                for parts in tl:
                    buf.append(pack((b"XADD", stream, b"*", b"e", ub.join(parts))))
                queued += len(tl)
                total += len(tl)
                if queued >= chunk:
                    await flush(buf, queued)
                    buf, queued = [], 0
                if total >= n_events:
                    break
            copy += 1
        if queued:
            await flush(buf, queued)
        return total
    finally:
        writer.close()
        await writer.wait_closed()


# -- 2. worker drain rate --------------------------------------------------------------------


async def bench_drain(
    url: str, workdir: str, templates: list[list[str]], cfg: argparse.Namespace, audit: bool, out: dict
) -> None:
    label = "audit_on" if audit else "audit_off"
    r = new_client(url)
    store = SQLiteStore(os.path.join(workdir, f"drain-{label}.sqlite3"))
    alog = AuditLog(os.path.join(workdir, f"drain-{label}.jsonl")) if audit else None
    try:
        await r.flushall()
        t0 = time.perf_counter()
        n = await fill_streams(url, templates, cfg.drain_events, f"d{'a' if audit else 'n'}")
        fill_s = time.perf_counter() - t0
        log(f"drain ({label}): filled {n:,} events in {fill_s:.1f}s ({n / fill_s:,.0f}/s)")
        await store.open()
        engine = CreditEngine(r, keys=KeySpace(partitions=PARTITIONS))
        worker = Worker(engine, store, audit=alog, batch=1000)
        t0 = time.perf_counter()
        stats = await worker.run(burst=True)
        el = time.perf_counter() - t0
        rows = await store._call(lambda: store.db.execute("SELECT count(*) FROM ledger").fetchone()[0])
        ok = stats.events == n and stats.new_ledger_rows == n and rows == n and stats.dead_lettered == 0
        log(
            f"drain ({label}): {n:,} events in {el:.2f}s = {n / el:,.0f} events/s "
            f"(batches={stats.batches}, ledger rows={rows:,}, dead={stats.dead_lettered}, valid={ok})"
        )
        out.setdefault("drain", {})[label] = {
            "events": n,
            "seconds": el,
            "events_per_s": n / el,
            "batches": stats.batches,
            "ledger_rows": rows,
            "dead_lettered": stats.dead_lettered,
            "valid": ok,
        }
        if cfg.profile and not audit:
            await profile_drain(url, workdir, templates, cfg)
    finally:
        await store.close()
        if alog is not None:
            alog.close()
        await r.aclose()


async def profile_drain(url: str, workdir: str, templates: list[list[str]], cfg: argparse.Namespace) -> None:
    import cProfile
    import pstats

    r = new_client(url)
    store = SQLiteStore(os.path.join(workdir, "drain-profile.sqlite3"))
    try:
        await r.flushall()
        n = await fill_streams(url, templates, min(cfg.drain_events, 50_000), "dp")
        await store.open()
        worker = Worker(CreditEngine(r, keys=KeySpace(partitions=PARTITIONS)), store, batch=1000)
        prof = cProfile.Profile()
        prof.enable()
        t0 = time.perf_counter()
        await worker.run(burst=True)
        el = time.perf_counter() - t0
        prof.disable()
        print(
            f"--- cProfile, worker drain of {n:,} events ({n / el:,.0f}/s under the profiler; "
            "event-loop thread only, SQLite runs in its own thread) ---"
        )
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
        await stage_breakdown(url, workdir, templates, r)
    finally:
        await store.close()
        await r.aclose()


async def stage_breakdown(url: str, workdir: str, templates: list[list[str]], r: aioredis.Redis) -> None:
    """Where a drained event's time goes: each stage of Worker._process run alone on 20k events."""
    from gateway.core.store.batch import collapse
    from gateway.core.store.sqlite import _run_to_end

    await r.flushall()
    n = await fill_streams(url, templates, 20_000, "sb")
    store = SQLiteStore(os.path.join(workdir, "stages.sqlite3"))
    alog = AuditLog(os.path.join(workdir, "stages.jsonl"))
    await store.open()
    try:
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        entries = []
        for p, pk in enumerate(KeySpace(partitions=PARTITIONS).all_partitions()):
            entries += [(p, sid, f) for sid, f in await r.xrange(pk.events)]
        t["redis read (XRANGE, redis-py parse)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        events = [decode(sid, f, p) for p, sid, f in entries]
        t["events.decode (json.loads)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        batches = [collapse(events[i : i + 1000]) for i in range(0, n, 1000)]
        t["store collapse (incl. json.dumps of each event)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        await store._call(lambda: [_run_to_end(store._write_batch, b) for b in batches])
        t["SQLite _write_batch (1000-event transactions)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(0, n, 1000):
            alog.write(events[i : i + 1000])
        t["AuditLog.write"] = time.perf_counter() - t0
        print(f"--- drain stages, alone, on {n:,} events (us/event) ---")
        for k, v in t.items():
            print(f"  {k:<50} {1e6 * v / n:8.1f}")
        total = sum(t.values())
        print(f"  {'sum':<50} {1e6 * total / n:8.1f}  (= {n / total:,.0f} events/s if serial)")
    finally:
        alog.close()
        await store.close()


# -- 3. worker memory over a long drain ------------------------------------------------------


def read_rss_kb(pid: int) -> tuple[int, int] | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            vals = {}
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    vals[k] = int(v.split()[0])
            return vals.get("VmRSS", 0), vals.get("VmHWM", 0)
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None


async def delivered(r: aioredis.Redis, streams: list[str]) -> int:
    pipe = r.pipeline(transaction=False)
    for s in streams:
        pipe.xinfo_groups(s)
    total = 0
    for groups in await pipe.execute():
        for g in groups or []:
            name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
            if name == GROUP:
                total += int(g.get("entries-read") or 0)
    return total


def round_peaks(samples: list[tuple[float, int, int]]) -> list[tuple[int, int]]:
    """(delivered, peak RSS kB) per worker round: the worker reads up to batch x partitions
    entries at once, so RSS saw-tooths within a round; its peak is what can grow."""
    peaks: list[list[int]] = []
    for _t, d, rss in samples:
        if d == 0:
            continue
        if peaks and peaks[-1][0] == d:
            peaks[-1][1] = max(peaks[-1][1], rss)
        else:
            peaks.append([d, rss])
    return [(d, kb) for d, kb in peaks]


def peak_at(peaks: list[tuple[int, int]], n: int, frac: float) -> int:
    """Peak RSS of the round during which the drain passed frac of n."""
    for d, kb in peaks:
        if d >= frac * n:
            return kb
    return peaks[-1][1]


async def bench_memory(
    url: str,
    workdir: str,
    templates: list[list[str]],
    cfg: argparse.Namespace,
    out: dict,
    procs: list[subprocess.Popen],
) -> None:
    """Drains cfg.memory_events in a `python -m gateway.worker --burst` subprocess, sampling its RSS.
    Stops the worker (SIGTERM) at cfg.deadline: the figures then cover what was drained."""
    r = new_client(url)
    try:
        await r.flushall()
        t0 = time.perf_counter()
        n = await fill_streams(url, templates, cfg.memory_events, "m")
        fill_s = time.perf_counter() - t0
        info = await r.info("memory")
        log(
            f"memory: filled {n:,} events in {fill_s:.1f}s ({n / fill_s:,.0f}/s); "
            f"redis used_memory={info['used_memory'] / 2**20:,.0f} MB"
        )
        env = {
            **os.environ,
            "CREDIT_REDIS_URL": url,
            "CREDIT_SQLITE_PATH": os.path.join(workdir, "memory.sqlite3"),
            "CREDIT_PARTITIONS": str(PARTITIONS),
            "CREDIT_AUDIT_PATH": os.path.join(workdir, "memory-audit.jsonl"),
            "PYTHONUNBUFFERED": "1",
        }
        t_start = time.perf_counter()
        # Starting the process does not block: the loop below polls it. The log file is
        # local and opened once.
        with open(os.path.join(workdir, "worker.log"), "wb") as wlog:  # noqa: ASYNC230
            proc = subprocess.Popen(  # noqa: ASYNC220
                [sys.executable, "-m", "gateway.worker", "--burst"],
                cwd=str(ROOT),
                env=env,
                stdout=wlog,
                stderr=subprocess.STDOUT,
            )
        procs.append(proc)
        streams = [pk.events for pk in KeySpace(partitions=PARTITIONS).all_partitions()]
        samples: list[tuple[float, int, int]] = []  # (t, delivered, rss kB)
        hwm = 0
        last_log = 0.0
        partial = False
        while proc.poll() is None:
            if time.monotonic() > cfg.deadline and not partial:
                partial = True
                log("memory: time budget reached, stopping the worker (figures cover the part drained)")
                proc.terminate()
            rss = read_rss_kb(proc.pid)
            try:
                d = await delivered(r, streams)
            except Exception:
                d = 0
            if rss is not None and rss[0]:
                t = time.perf_counter() - t_start
                samples.append((t, d, rss[0]))
                hwm = max(hwm, rss[1])
                if t - last_log >= 10:
                    last_log = t
                    log(
                        f"memory: t={t:5.1f}s delivered={d:,} ({100 * d / n:.0f}%) rss={rss[0] / 1024:.1f} MB"
                    )
            await asyncio.sleep(cfg.sample_interval)
        total_s = time.perf_counter() - t_start
        if proc.returncode != 0 and not partial:
            raise RuntimeError(f"worker exited {proc.returncode}; see {workdir}/worker.log")
        if not samples:
            raise RuntimeError("no RSS sample taken")
        rows = await asyncio.to_thread(_count_rows, env["CREDIT_SQLITE_PATH"])
        n_all = n
        if partial and rows >= n:
            partial = False  # stopped while already drained (its exit checks)
        if partial:
            n = max(1, max(s[1] for s in samples))
        drain = [s for s in samples if s[1] > 0]
        started = drain[0][0] if drain else 0.0
        mb = lambda kb: kb / 1024  # noqa: E731
        peaks = round_peaks(samples) or [(n, max(s[2] for s in samples))]
        p10, p50, p90 = (peak_at(peaks, n, f) for f in (0.1, 0.5, 0.9))
        tail = [(d, kb) for d, kb in peaks if d >= 0.1 * n]
        slope = _slope([d / 100_000 for d, _ in tail], [mb(kb) for _, kb in tail]) if len(tail) >= 3 else 0.0
        mx = max(s[2] for s in samples)
        res = {
            "events": n,
            "events_filled": n_all,
            "partial": partial,
            "ledger_rows": rows,
            "valid": rows == n or partial,
            "worker_seconds": total_s,
            "drain_events_per_s": n / (total_s - started) if total_s > started else None,
            "samples": len(samples),
            "rss_mb_at_10pct": mb(p10),
            "rss_mb_at_50pct": mb(p50),
            "rss_mb_at_90pct": mb(p90),
            "rss_mb_max": mb(mx),
            "vmhwm_mb": mb(hwm),
            "rss_mb_min_after_start": mb(min(s[2] for s in samples if s[1] > 0)) if peaks else None,
            "rss_growth_10_90_mb": mb(p90 - p10),
            "rss_slope_mb_per_100k_events": slope,
            "round_peaks_mb": [(d, round(mb(kb), 1)) for d, kb in peaks],
        }
        out["memory"] = res
        log(
            f"memory: drained {n:,} events in {total_s:.1f}s (ledger rows {rows:,}); round-peak RSS MB "
            f"10%={res['rss_mb_at_10pct']:.1f} 50%={res['rss_mb_at_50pct']:.1f} "
            f"90%={res['rss_mb_at_90pct']:.1f} max={res['rss_mb_max']:.1f}; slope {slope:+.2f} MB/100k events"
        )
    finally:
        await r.aclose()


def _count_rows(path: str) -> int:
    import sqlite3

    with sqlite3.connect(path) as c:
        return c.execute("SELECT count(*) FROM ledger").fetchone()[0]


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=False)) / den if den else 0.0


# -- summary ---------------------------------------------------------------------------------


def summary_rows(out: dict) -> list[dict]:
    rows: list[dict] = []

    def row(name: str, value: float | None, unit: str, target: str = "-", ok: bool | None = None) -> None:
        rows.append(
            {
                "figure": name,
                "value": value,
                "unit": unit,
                "target": target,
                "result": "-" if ok is None else ("PASS" if ok else "MISS"),
            }
        )

    c = out.get("cycles")
    if c:
        m = c["median"]
        row("engine reserve+settle (units API)", m["engine"], "cycles/s")
        row("engine reserve+settle (Decimal API)", m["decimal"], "cycles/s")
        row("bare EVALSHA reserve+settle", m["bare"], "cycles/s")
        if "multiplexed" in m:
            row(
                "engine reserve+settle, multiplexed client (as the gateway runs)",
                m["multiplexed"],
                "cycles/s",
            )
            row(
                "  multiplexed: client CPU per cycle (live, median)",
                c["per_cycle_medians"]["multiplexed"]["py_cpu_us_per_cycle"],
                "us",
            )
            row("ratio multiplexed engine / bare redis-py", c["ratio_multiplexed_bare"], "x")
        pc = c["per_cycle_medians"]
        for v in ("engine", "decimal", "bare"):
            row(f"  {v}: client CPU per cycle (live, median)", pc[v]["py_cpu_us_per_cycle"], "us")
        for v in ("engine", "decimal", "bare"):
            row(f"  {v}: client cost per cycle (stub Redis)", c["stub_client_us_per_cycle"][v], "us")
        row("  redis CPU per cycle (engine rounds)", pc["engine"]["redis_cpu_us_per_cycle"], "us")
        st = c["stub_client_us_per_cycle"]
        bare_cpu = pc["bare"]["py_cpu_us_per_cycle"]
        row(
            "  ratio model if client-bound: bare/(bare+overhead)",
            bare_cpu / (bare_cpu + st["engine"] - st["bare"]),
            "x",
        )
        row(
            "ratio engine/bare (units)",
            c["ratio_engine_bare"],
            "x",
            f">= {CYCLE_TARGET}",
            c["ratio_engine_bare"] >= CYCLE_TARGET,
        )
        row(
            "ratio engine/bare (Decimal)",
            c["ratio_decimal_bare"],
            "x",
            f">= {CYCLE_TARGET}",
            c["ratio_decimal_bare"] >= CYCLE_TARGET,
        )
    for label, name in (("audit_off", "worker drain, audit off"), ("audit_on", "worker drain, audit on")):
        d = out.get("drain", {}).get(label)
        if d:
            row(
                name,
                d["events_per_s"],
                "events/s",
                f">= {DRAIN_TARGET:,.0f}",
                d["events_per_s"] >= DRAIN_TARGET and d["valid"],
            )
    mem = out.get("memory")
    if mem:
        tag = f"{mem['events']:,} events" + (" PARTIAL" if mem.get("partial") else "")
        if mem.get("drain_events_per_s"):
            row(
                f"worker drain, subprocess, audit on ({tag})",
                mem["drain_events_per_s"],
                "events/s",
                f">= {DRAIN_TARGET:,.0f}",
                mem["drain_events_per_s"] >= DRAIN_TARGET and mem["valid"],
            )
        row(f"worker RSS (round peak) at 10% of drain ({tag})", mem["rss_mb_at_10pct"], "MB")
        row("worker RSS (round peak) at 50% of drain", mem["rss_mb_at_50pct"], "MB")
        row("worker RSS (round peak) at 90% of drain", mem["rss_mb_at_90pct"], "MB")
        row("worker RSS max", mem["rss_mb_max"], "MB")
        if mem.get("rss_mb_min_after_start") is not None:
            row("worker RSS min once draining (saw-tooth floor)", mem["rss_mb_min_after_start"], "MB")
        row(
            "worker RSS growth 10% -> 90% (round peaks)",
            mem["rss_growth_10_90_mb"],
            "MB",
            f"<= {RSS_GROWTH_TARGET_MB:.0f}",
            mem["rss_growth_10_90_mb"] <= RSS_GROWTH_TARGET_MB,
        )
        row("worker RSS slope of round peaks (after 10%)", mem["rss_slope_mb_per_100k_events"], "MB/100k ev")
    return rows


def print_summary(rows: list[dict]) -> None:
    w = max(len(r["figure"]) for r in rows) if rows else 10
    print()
    print(f"{'figure':<{w}}  {'value':>12}  {'unit':<11}  {'target':<10}  result")
    print("-" * (w + 48))
    for r in rows:
        v = r["value"]
        vs = (
            "n/a"
            if v is None
            else (f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:,.1f}")
        )
        print(f"{r['figure']:<{w}}  {vs:>12}  {r['unit']:<11}  {r['target']:<10}  {r['result']}")


# -- main --------------------------------------------------------------------------------------


async def main_async(cfg: argparse.Namespace, out: dict, procs: list[subprocess.Popen]) -> None:
    workdir = cfg.workdir
    server = RedisServer(workdir)
    server.start()
    log(
        f"redis-server {server.url} (pid {server.proc.pid}), workdir {workdir}, "
        f"hiredis={redis.utils.HIREDIS_AVAILABLE}, cpus={os.cpu_count()}"
    )
    try:
        if "cycles" in cfg.parts:
            await bench_cycles(server.url, server.proc.pid, cfg, out)
        templates = await make_templates(server.url, cfg)
        if "drain" in cfg.parts:
            await bench_drain(server.url, workdir, templates, cfg, False, out)
            await bench_drain(server.url, workdir, templates, cfg, True, out)
        if "memory" in cfg.parts and cfg.memory_events > 0:
            await bench_memory(server.url, workdir, templates, cfg, out, procs)
    finally:
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short rounds, small drains (< 90 s)")
    ap.add_argument("--json", help="also write the results and summary as JSON here")
    ap.add_argument("--parts", default="cycles,drain,memory", help="comma list of cycles,drain,memory")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--users", type=int, default=2048)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--round-seconds", type=float)
    ap.add_argument("--drain-events", type=int)
    ap.add_argument("--memory-events", type=int)
    ap.add_argument("--profile", action="store_true", help="print cProfile tables of the hot paths")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (SQLite files, logs)")
    cfg = ap.parse_args()
    q = cfg.quick
    cfg.parts = set(cfg.parts.split(","))
    cfg.rounds = cfg.rounds or (3 if q else 5)
    cfg.round_seconds = cfg.round_seconds or (1.5 if q else 3.0)
    cfg.warmup = 0.5 if q else 1.0
    cfg.drain_events = cfg.drain_events or (20_000 if q else 100_000)
    cfg.memory_events = cfg.memory_events if cfg.memory_events is not None else (50_000 if q else 1_000_000)
    cfg.sample_users = 16
    cfg.sample_cycles = 4  # 9 events per user: grant, then (hold_open, hold_settled) x 4
    cfg.sample_interval = 0.5
    cfg.stub_reps = 300 if q else 1000
    budget = 88.0 if q else 590.0
    cfg.workdir = tempfile.mkdtemp(prefix="engine-bench-")
    out: dict[str, Any] = {"quick": q, "concurrency": cfg.concurrency}
    cfg.deadline = time.monotonic() + budget - 12  # the memory part stops its worker here
    procs: list[subprocess.Popen] = []
    t0 = time.perf_counter()
    timed_out = False
    try:
        asyncio.run(asyncio.wait_for(main_async(cfg, out, procs), budget))
    except TimeoutError:
        timed_out = True
        print(f"!! time budget of {budget:.0f}s exhausted: partial results", flush=True)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
        if not cfg.keep:
            shutil.rmtree(cfg.workdir, ignore_errors=True)
    out["run_seconds"] = time.perf_counter() - t0
    out["timed_out"] = timed_out
    rows = summary_rows(out)
    out["summary"] = rows
    print_summary(rows)
    print(f"\ntotal run time {out['run_seconds']:.1f}s")
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(out, indent=2, default=str))
    return 1 if timed_out else 0


if __name__ == "__main__":
    raise SystemExit(main())
