"""What the worker costs: CPU when idle, CPU per event and events/s while draining.

    .venv/bin/python loadtest/worker_cost.py [--idle-seconds 10] [--events 50000] [--rounds 3]

A measuring script, not a test: nothing here asserts on timings. It starts its own
redis-server (no persistence, in a temp dir) and runs the worker as production does:
`python -m gateway.worker` in a subprocess, audit file on, SQLite store in the temp dir,
64 partitions. The worker's CPU is read from /proc/<pid>/stat (utime + stime, all threads:
the SQLite writes run on a thread of their own).

1. Idle: no traffic at all; the worker's CPU over --idle-seconds, as % of one core.
2. Drain, --rounds times: the worker is paused (SIGSTOP), --events events are appended to
   the partition streams (copies, under distinct users, of what the engine wrote for a
   realistic grant + reserve/settle sample: loadtest/engine_bench.py's templates), then the
   worker is resumed and timed until every entry is delivered and acknowledged. CPU per
   event = the worker's CPU over that drain / events; drain rate = events / wall time.
   The figures are the median round. The worker's upkeep (sweep, claim, trim) keeps running
   meanwhile, as in production, and is part of the cost.
3. Steady, --rounds times per rate in --rates: events appended at that rate (a slice every
   10 ms) for --steady-seconds while the worker runs, as a gateway under load appends them;
   CPU per event over the round until the last entry is acknowledged. This is where the
   per-batch costs show: a wake-up, a linger, a read, a transaction per few entries.

The machine is shared: other processes show as noise, hence rounds and medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from engine_bench import PARTITIONS, fill_streams, make_templates, proc_cpu_s  # beside this script
from redis_server import RedisServer

from gateway.core.keys import KeySpace
from gateway.worker.runner import GROUP

ROOT = Path(__file__).resolve().parents[1]
IDLE_TARGET_PCT = 0.5
EVENT_TARGET_MS = 0.05


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


async def group_state(r: aioredis.Redis, streams: list[str]) -> tuple[int, int]:
    """(entries read by the worker's group, entries pending) over every partition stream."""
    pipe = r.pipeline(transaction=False)
    for s in streams:
        pipe.xinfo_groups(s)
    read = pending = 0
    for groups in await pipe.execute(raise_on_error=False):
        if isinstance(groups, Exception):
            continue
        for g in groups:
            if g["name"] in (GROUP, GROUP.encode()):
                read += int(g.get("entries-read") or 0)
                pending += int(g.get("pending") or 0)
    return read, pending


async def wait_groups(r: aioredis.Redis, streams: list[str], proc: Workers, limit: float) -> None:
    """Until the worker has created its consumer group on every stream."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the worker exited ({proc.returncode})")
        pipe = r.pipeline(transaction=False)
        for s in streams:
            pipe.xinfo_groups(s)
        replies = await pipe.execute(raise_on_error=False)
        if all(not isinstance(g, Exception) and g for g in replies):
            return
        await asyncio.sleep(0.1)
    raise SystemExit("the worker did not create its consumer groups in time")


def start_worker(url: str, workdir: str, linger: float | None = None, index: int = 0) -> subprocess.Popen:
    env = {
        **os.environ,
        "CREDIT_REDIS_URL": url,
        "CREDIT_PARTITIONS": str(PARTITIONS),
        "CREDIT_SQLITE_PATH": os.path.join(workdir, "worker.sqlite3"),
        "CREDIT_AUDIT_PATH": os.path.join(workdir, "audit.jsonl"),
        "CREDIT_WORKER_NAME": f"cost-bench-{index}",
    }
    env.pop("CREDIT_MONGO_URI", None)
    if linger is not None:
        env["CREDIT_WORKER_LINGER_SECONDS"] = str(linger)
    logf = open(os.path.join(workdir, f"worker-{index}.log"), "wb")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.worker"], env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT
    )


class Workers:
    """The worker processes of a run (--procs), signalled and measured together."""

    def __init__(self, procs: list[subprocess.Popen]) -> None:
        self.procs = procs

    def cpu(self) -> float:
        return sum(proc_cpu_s(p.pid) for p in self.procs)

    def send_signal(self, sig: int) -> None:
        for p in self.procs:
            p.send_signal(sig)

    def poll(self) -> int | None:
        return next((rc for p in self.procs if (rc := p.poll()) is not None), None)

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def wait(self, timeout: float) -> None:
        for p in self.procs:
            p.wait(timeout)


async def measure_idle(proc: Workers, seconds: float) -> dict[str, float]:
    c0, t0 = proc.cpu(), time.monotonic()
    await asyncio.sleep(seconds)
    c1, t1 = proc.cpu(), time.monotonic()
    return {"seconds": t1 - t0, "cpu_s": c1 - c0, "cpu_pct": 100 * (c1 - c0) / (t1 - t0)}


async def drain_round(
    url: str, r: aioredis.Redis, streams: list[str], proc: Workers, templates: list, n: int, tag: str
) -> dict[str, float]:
    read0, _ = await group_state(r, streams)
    proc.send_signal(signal.SIGSTOP)
    try:
        n = await fill_streams(url, templates, n, tag)
    finally:
        c0 = proc.cpu()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGCONT)
    while True:
        await asyncio.sleep(0.02)
        read, pending = await group_state(r, streams)
        if read - read0 >= n and pending == 0:
            break
        if proc.poll() is not None:
            raise SystemExit(f"the worker exited ({proc.returncode}) during the drain")
    el = time.monotonic() - t0
    cpu = proc.cpu() - c0
    return {
        "events": n,
        "seconds": el,
        "events_per_s": n / el,
        "cpu_s": cpu,
        "cpu_ms_per_event": 1e3 * cpu / n,
        "cpu_pct": 100 * cpu / el,
    }


async def steady_round(
    url: str,
    r: aioredis.Redis,
    streams: list[str],
    proc: Workers,
    templates: list,
    rate: int,
    seconds: float,
    tag: str,
) -> dict[str, float]:
    """Appends events at `rate` a second for `seconds` (a slice every 10 ms) while the worker
    runs, then waits until every entry is acknowledged: CPU per event at a steady rate, where
    the worker wakes, lingers and writes small batches (unlike a drain's full batches)."""
    read0, _ = await group_state(r, streams)
    c0, t0 = proc.cpu(), time.monotonic()
    sent = step = 0
    tick = 0.01
    while (now := time.monotonic()) < t0 + seconds:
        due = int(rate * (now - t0 + tick))
        if due > sent:
            sent += await fill_streams(url, templates, due - sent, f"{tag}s{step}", chunk=10_000)
            step += 1
        await asyncio.sleep(max(0.0, t0 + step * tick - time.monotonic()))
    while True:
        read, pending = await group_state(r, streams)
        if read - read0 >= sent and pending == 0:
            break
        if proc.poll() is not None:
            raise SystemExit(f"the worker exited ({proc.returncode}) during the steady round")
        await asyncio.sleep(0.02)
    el = time.monotonic() - t0
    cpu = proc.cpu() - c0
    return {
        "rate": rate,
        "events": sent,
        "seconds": el,
        "cpu_ms_per_event": 1e3 * cpu / sent,
        "cpu_pct": 100 * cpu / el,
    }


async def main_async(cfg: argparse.Namespace, out: dict[str, Any], procs: list[subprocess.Popen]) -> None:
    server = RedisServer(cfg.workdir)
    server.start()
    log(f"redis-server {server.url}, workdir {cfg.workdir}, cpus={os.cpu_count()}")
    r = aioredis.Redis.from_url(server.url)
    try:
        tcfg = argparse.Namespace(sample_users=16, sample_cycles=4)
        templates = await make_templates(server.url, tcfg)  # flushes Redis before and after
        streams = [pk.events for pk in KeySpace(partitions=PARTITIONS).all_partitions()]
        started = [start_worker(server.url, cfg.workdir, cfg.linger, i) for i in range(cfg.procs)]
        procs.extend(started)
        proc = Workers(started)
        await wait_groups(r, streams, proc, 30)
        await asyncio.sleep(cfg.settle)  # startup done, first upkeep passes over
        idle = await measure_idle(proc, cfg.idle_seconds)
        out["idle"] = idle
        log(f"idle: {idle['cpu_pct']:.2f}% of a core over {idle['seconds']:.1f}s")
        rounds = []
        for i in range(cfg.rounds):
            res = await drain_round(server.url, r, streams, proc, templates, cfg.events, f"w{i}r")
            rounds.append(res)
            log(
                f"drain round {i + 1}: {res['events']:,} events in {res['seconds']:.2f}s = "
                f"{res['events_per_s']:,.0f}/s, {res['cpu_ms_per_event']:.4f} ms CPU/event "
                f"({res['cpu_pct']:.0f}% of a core)"
            )
            # An empty stream between rounds: what is acknowledged is trimmed by the upkeep.
            await asyncio.sleep(cfg.pause)
        out["drain_rounds"] = rounds
        steady = []
        for rate in cfg.rates:
            per = [
                await steady_round(
                    server.url, r, streams, proc, templates, rate, cfg.steady_seconds, f"w{rate}x{i}"
                )
                for i in range(cfg.rounds)
            ]
            res = {k: statistics.median(x[k] for x in per) for k in ("cpu_ms_per_event", "cpu_pct")}
            steady.append({"rate": rate, **res, "rounds": per})
            log(
                f"steady {rate:,} events/s: {res['cpu_ms_per_event']:.4f} ms CPU/event "
                f"({res['cpu_pct']:.1f}% of a core)"
            )
            await asyncio.sleep(cfg.pause)
        out["steady"] = steady
        keys = ("events_per_s", "cpu_ms_per_event", "cpu_pct")
        if rounds:
            out["drain"] = {k: statistics.median(x[k] for x in rounds) for k in keys}
        if cfg.idle_after:
            idle2 = await measure_idle(proc, cfg.idle_seconds)
            out["idle_after"] = idle2
            log(f"idle after the drains: {idle2['cpu_pct']:.2f}% of a core")
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        proc.wait(30)
        out["stop_seconds"] = time.monotonic() - t0
        log(f"worker stopped by SIGTERM in {out['stop_seconds']:.2f}s (rc {proc.returncode})")
    finally:
        await r.aclose()
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settle", type=float, default=2.0, help="seconds after startup before measuring")
    ap.add_argument("--pause", type=float, default=1.5, help="seconds between drain rounds")
    ap.add_argument("--idle-after", action="store_true", help="measure idle again after the drains")
    ap.add_argument(
        "--rates",
        type=lambda v: [int(x) for x in v.split(",") if x],
        default=[200, 1000, 4000],
        help="steady rates, events/s, comma separated (default 200,1000,4000; empty: none)",
    )
    ap.add_argument(
        "--procs", type=int, default=1, help="worker processes (one consumer group, split entries)"
    )
    ap.add_argument(
        "--linger", type=float, help="the worker's CREDIT_WORKER_LINGER_SECONDS (default: its own)"
    )
    ap.add_argument("--steady-seconds", type=float, default=5.0, help="length of a steady round")
    ap.add_argument("--json", help="also write the results as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (SQLite file, audit, logs)")
    cfg = ap.parse_args()
    cfg.workdir = tempfile.mkdtemp(prefix="worker-cost-")
    out: dict[str, Any] = {"partitions": PARTITIONS, "cpus": os.cpu_count(), "procs": cfg.procs}
    procs: list[subprocess.Popen] = []
    try:
        asyncio.run(main_async(cfg, out, procs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
        if not cfg.keep:
            shutil.rmtree(cfg.workdir, ignore_errors=True)
    d = out.get("drain", {})
    print("\n--- the worker's cost ---")
    print(f"  idle CPU           {out['idle']['cpu_pct']:8.2f} % of a core   (target < {IDLE_TARGET_PCT})")
    if d:
        print(f"  CPU per event      {d['cpu_ms_per_event']:8.4f} ms          (target < {EVENT_TARGET_MS})")
        print(f"  drain rate         {d['events_per_s']:8,.0f} events/s")
    for st in out.get("steady", []):
        print(
            f"  steady {st['rate']:>6,}/s     {st['cpu_ms_per_event']:8.4f} ms/event, "
            f"{st['cpu_pct']:.1f}% of a core"
        )
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
