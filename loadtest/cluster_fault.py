"""A primary of a Redis Cluster dies under load and comes back: what the engine sees.

    .venv/bin/python loadtest/cluster_fault.py [--tasks 32] [--warm 5] [--down 10] [--after 15]
                                               [--timeout 1] [--client gateway|redis-py]

A measuring script, not a test. It starts its own 3-primary cluster (no replicas, no
persistence, cluster-require-full-coverage no; tests/support/redis-cluster.sh on free ports
in a temp dir), grants credits to users spread over every partition, persists them to a
SQLite store (a burst worker run), then runs reserve+settle cycles from --tasks asyncio
tasks on one engine whose client is built as the gateway builds it
(make_redis(Settings(redis_cluster=True, redis_timeout_seconds=--timeout))), or, with
--client redis-py, on a bare `RedisCluster.from_url` (what make_redis built before).

Timeline: --warm seconds of load, SIGKILL of one primary, --down seconds, the same node
started again on its port with its nodes.conf (it rejoins with its slots, empty), --after
seconds of load. An upkeep task does what the worker's upkeep does every second: rebuilds
the partitions whose ready marker is missing from the store (ensure_ready).

Printed: one line per second with the script calls that succeeded / failed on the
partitions of the healthy nodes and on those of the killed node ("lost"), the slowest
failing call of that second, and the failures by kind: `conn` (redis-py's ConnectionError
or TimeoutError family: what the API answers 503 credit_store_unavailable),
`state_lost` (the partition is being rebuilt: 503 state_lost), anything else by its
exception type (what would be a 500). Then a summary per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.core.connections import make_keys, make_redis
from gateway.core.engine import CreditEngine
from gateway.core.errors import StateLost
from gateway.core.recovery import ensure_ready
from gateway.core.settings import Settings
from gateway.core.store.sqlite import SQLiteStore
from gateway.worker.runner import Worker

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "support" / "redis-cluster.sh"
UNITS = 1_000


def free_port_run(n: int) -> int:
    """A first port P such that P..P+n-1 and their cluster bus ports look free."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + n + 10000 > 65535:
            continue
        ok = True
        for q in [*range(p, p + n), *range(p + 10000, p + 10000 + n)]:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", q))
                except OSError:
                    ok = False
                    break
        if ok:
            return p
    raise RuntimeError("no run of free ports")


def sh(*args: str) -> str:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


async def ash(*args: str) -> str:
    """sh() without blocking the event loop (the load keeps running meanwhile)."""
    proc = await asyncio.create_subprocess_exec("bash", str(SCRIPT), *args, stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"redis-cluster.sh {args[0]} failed")
    return out.decode().strip()


def kind(exc: BaseException) -> str:
    if isinstance(exc, StateLost):
        return "state_lost"
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        return f"conn:{type(exc).__name__}"
    return type(exc).__name__


class Tally:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.sec: dict[int, dict] = collections.defaultdict(
            lambda: {
                "h_ok": 0,
                "h_fail": 0,
                "l_ok": 0,
                "l_fail": 0,
                "slow": 0.0,
                "kinds": collections.Counter(),
                "h_slow": 0.0,
            }
        )

        self.traces: dict[str, str] = {}

    def add(self, lost: bool, ok: bool, took: float, exc: BaseException | None = None) -> None:
        if exc is not None and kind(exc) not in self.traces:
            self.traces[kind(exc)] = "".join(traceback.format_exception(exc))
        s = self.sec[int(time.monotonic() - self.t0)]
        side = "l" if lost else "h"
        s[f"{side}_{'ok' if ok else 'fail'}"] += 1
        if not ok:
            s["kinds"][("lost " if lost else "healthy ") + kind(exc)] += 1
            s["slow"] = max(s["slow"], took)
        elif not lost:
            s["h_slow"] = max(s["h_slow"], took)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--users", type=int, default=256)
    ap.add_argument("--warm", type=float, default=5)
    ap.add_argument("--down", type=float, default=10)
    ap.add_argument("--after", type=float, default=15)
    ap.add_argument("--timeout", type=float, default=1.0, help="CREDIT_REDIS_TIMEOUT_SECONDS")
    ap.add_argument("--traces", action="store_true", help="print the first traceback of each failure kind")
    ap.add_argument("--client", choices=("gateway", "redis-py"), default="gateway")
    args = ap.parse_args()
    if not shutil.which("redis-server"):
        print("needs redis-server and redis-cli on PATH", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="cluster-fault-"))
    p0 = free_port_run(3)
    print(sh("up", str(tmp), str(p0), "3"), flush=True)
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{p0}/0",
        redis_cluster=True,
        redis_timeout_seconds=args.timeout,
        sqlite_path=str(tmp / "store.db"),
    )
    if args.client == "gateway":
        redis = make_redis(settings)
    else:
        from redis.asyncio.cluster import RedisCluster

        redis = RedisCluster.from_url(settings.redis_url, max_connections=settings.redis_max_connections)
    store = SQLiteStore(settings.sqlite_path)
    await store.open()
    engine = CreditEngine(redis, keys=make_keys(settings))
    try:
        await ensure_ready(engine, store)
        users = [f"u{i}" for i in range(args.users)]
        for u in users:
            await engine.grant_units(u, 10**12, op_id="fund")
        await Worker(engine, store).run(burst=True)

        # The victim: the primary serving the second port; lost users are those on its slots.
        from redis.asyncio.cluster import RedisCluster

        probe = RedisCluster(host="127.0.0.1", port=p0)
        await probe.initialize()
        victim = p0 + 1
        lost_parts = {
            p
            for p in range(engine.keys.partitions)
            if int(probe.get_node_from_key(engine.keys.partition(p).events).port) == victim
        }
        await probe.aclose()
        lost_of = {u: engine.keys.partition_of(u) in lost_parts for u in users}
        print(
            f"client: {args.client}; timeout {args.timeout} s; {args.tasks} tasks; {len(users)} users; "
            f"{len(lost_parts)} of {engine.keys.partitions} partitions on node {victim}; "
            f"{sum(lost_of.values())} users there",
            flush=True,
        )

        tally = Tally()
        stop = asyncio.Event()
        marks: list[tuple[float, str]] = []

        async def call(lost: bool, coro) -> bool:
            t = time.monotonic()
            try:
                await coro
            except Exception as exc:
                tally.add(lost, False, time.monotonic() - t, exc)
                return False
            tally.add(lost, True, time.monotonic() - t)
            return True

        async def client(n: int) -> None:
            i = n
            seq = 0
            while not stop.is_set():
                u = users[i % len(users)]
                i += args.tasks
                seq += 1
                hid = f"h{n}-{seq}"
                lost = lost_of[u]
                if await call(lost, engine.reserve_units(u, UNITS, hold_id=hid, ttl_seconds=60)):
                    await call(lost, engine.settle_units(u, hid, UNITS // 2))

        upkeep_log: list[str] = []

        async def upkeep() -> None:
            while not stop.is_set():
                await asyncio.sleep(1)
                t = time.monotonic() - tally.t0
                try:
                    r = await ensure_ready(engine, store)
                    if r:
                        upkeep_log.append(
                            f"t={t:.1f}-{time.monotonic() - tally.t0:.1f}s rebuilt {r.partitions} "
                            f"partitions ({r.accounts} accounts)"
                        )
                except Exception as exc:
                    upkeep_log.append(f"t={t:.1f}s upkeep failed: {kind(exc)}")
                    tally.traces.setdefault(f"upkeep {kind(exc)}", "".join(traceback.format_exception(exc)))

        tasks = [asyncio.create_task(client(n)) for n in range(args.tasks)] + [asyncio.create_task(upkeep())]
        await asyncio.sleep(args.warm)
        await ash("kill", str(tmp), str(victim))
        marks.append((time.monotonic() - tally.t0, "killed"))
        await asyncio.sleep(args.down)
        await ash("start", str(tmp), str(victim))
        marks.append((time.monotonic() - tally.t0, "restarted"))
        await asyncio.sleep(args.after)
        stop.set()
        await asyncio.gather(*tasks)

        kill_t, back_t = marks[0][0], marks[1][0]
        print(f"killed at t={kill_t:.1f}s, restarted at t={back_t:.1f}s")
        print(
            f"{'t':>3} {'phase':8} {'healthy ok':>10} {'fail':>5} {'lost ok':>8} {'fail':>6} "
            f"{'slowest fail':>12} {'slowest healthy ok':>18}  failures by kind"
        )
        phases: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for t in sorted(tally.sec):
            s = tally.sec[t]
            phase = "before" if t < int(kill_t) else ("down" if t < int(back_t) else "back")
            if t in (int(kill_t), int(back_t)):
                phase += "*"
            kinds = ", ".join(f"{k} {v}" for k, v in s["kinds"].most_common())
            print(
                f"{t:>3} {phase:8} {s['h_ok']:>10} {s['h_fail']:>5} {s['l_ok']:>8} {s['l_fail']:>6} "
                f"{s['slow'] * 1000:>9.0f} ms {s['h_slow'] * 1000:>15.0f} ms  {kinds}"
            )
            agg = phases[phase.rstrip("*")]
            for k in ("h_ok", "h_fail", "l_ok", "l_fail"):
                agg[k] += s[k]
            agg["secs"] += 1
            for k, v in s["kinds"].items():
                agg[k] += v
        print("per phase (calls/s over its whole seconds, including the transition second):")
        for ph in ("before", "down", "back"):
            a = phases[ph]
            n = max(1, a["secs"])
            others = {k: v for k, v in a.items() if k.startswith(("lost ", "healthy "))}
            print(
                f"  {ph:6} healthy ok {a['h_ok'] / n:7.0f}/s fail {a['h_fail']:>6}; "
                f"lost ok {a['l_ok'] / n:7.0f}/s fail {a['l_fail']:>6}; {others}"
            )
        for line in upkeep_log:
            print("  upkeep:", line)
        if args.traces:
            for k, tb in tally.traces.items():
                print(f"--- first {k}:\n{tb}")
    finally:
        await store.close()
        with contextlib.suppress(Exception):
            await redis.aclose()
        print(sh("down", str(tmp), str(p0), "3"))
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
