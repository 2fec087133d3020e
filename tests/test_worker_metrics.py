"""The worker's metrics: what it stored, how late, its streams' backlog, pending entries and
dead letters, against a real redis-server; and the metrics port of a real worker process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import aiohttp
from prometheus_client import CollectorRegistry

from gateway.core.engine import CreditEngine
from gateway.core.keys import KeySpace
from gateway.worker.metrics import WorkerMetrics
from gateway.worker.runner import GROUP, Worker
from tests.support.serve_process import free_port
from tests.support.worker_helpers import REPO, worker_env


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    v = registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


async def test_a_stored_batch_is_counted_by_type_amount_and_lag(engine, store):
    m = WorkerMetrics()
    await engine.grant("a", "10", op_id="g1")
    await engine.reserve("a", "3", hold_id="h1", ttl_seconds=60)
    await engine.settle("a", "h1", "1.25")
    await engine.reserve("a", "2", hold_id="h2", ttl_seconds=60)
    await engine.release("a", "h2")
    stats = await Worker(engine, store, metrics=m).run(burst=True)
    assert stats.events == 5
    r = m.registry
    assert sample(r, "credit_worker_events_total", type="grant") == 1
    assert sample(r, "credit_worker_events_total", type="hold_open") == 2
    assert sample(r, "credit_ledger_micro_credits_total", type="grant") == 10_000_000
    assert sample(r, "credit_ledger_micro_credits_total", type="hold_open") == 5_000_000
    assert sample(r, "credit_ledger_micro_credits_total", type="hold_settled") == 1_250_000
    assert sample(r, "credit_settlement_lag_seconds_count") == 5
    assert sample(r, "credit_worker_batch_events_sum") == 5
    assert sample(r, "credit_store_write_seconds_count") == sample(r, "credit_worker_batch_events_count") >= 1


async def test_the_look_at_the_streams_reports_backlog_pending_and_dead_letters_per_partition(engine, store):
    m = WorkerMetrics()
    await engine.grant("z", "1", op_id="g1")
    p = engine.keys.partition_of("z")
    await engine.redis.xadd(engine.keys.partition(p).events, {"e": "{not json"})
    w = Worker(engine, store, metrics=m)
    stats = await w.run(burst=True)
    assert stats.dead_lettered == 1
    assert sample(m.registry, "credit_dead_lettered_events_total") == 1
    await w.observe_streams()  # all stored: nothing is backlog, though the stream keeps its newest entry
    assert await engine.redis.xlen(engine.keys.partition(p).events) >= 1
    assert sample(m.registry, "credit_stream_backlog_events", partition=str(p)) == 0
    # three more events, read by a consumer that dies before acknowledging them
    for i in range(2):
        await engine.grant("z", "1", op_id=f"g-more-{i}")
    await engine.reserve("z", "1", hold_id="open-hold", ttl_seconds=600)
    await engine.redis.xreadgroup(GROUP, "dead-consumer", {engine.keys.partition(p).events: ">"}, count=10)
    await w.observe_streams()
    assert sample(m.registry, "credit_dead_letter_events", partition=str(p)) == 1
    assert sample(m.registry, "credit_stream_pending_events", partition=str(p)) == 3
    assert sample(m.registry, "credit_stream_backlog_events", partition=str(p)) == 3  # pending, unstored
    assert sample(m.registry, "credit_holds_open", partition=str(p)) == 1
    other = (p + 1) % engine.keys.partitions
    assert sample(m.registry, "credit_stream_pending_events", partition=str(other)) == 0


async def test_a_worker_process_serves_its_metrics_on_its_port(redis, redis_url, tmp_path):
    engine = CreditEngine(redis, keys=KeySpace(partitions=16))  # real time: the lag is real
    for p in range(16):
        await engine.mark_ready(p)
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.worker",
        env=worker_env(redis_url, tmp_path / "w.db", CREDIT_WORKER_METRICS_PORT=port),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        for i in range(20):
            await engine.grant(f"u{i}", "2", op_id=f"g{i}")
        text = ""
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                try:
                    async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
                        text = await r.text()
                    if "credit_settlement_lag_seconds_count 20.0" in text:
                        break
                except aiohttp.ClientError:
                    pass  # not listening yet
                await asyncio.sleep(0.1)
        assert "credit_settlement_lag_seconds_count 20.0" in text, text[-2000:]
        assert 'credit_ledger_micro_credits_total{type="grant"} 4e+07' in text
        # the lag of events stored by a live worker: well under the slowest bucket
        assert 'credit_settlement_lag_seconds_bucket{le="60.0"} 20.0' in text
    finally:
        proc.terminate()
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out.decode()[-2000:]
    assert f"worker metrics on http://127.0.0.1:{port}/metrics" in out.decode()
