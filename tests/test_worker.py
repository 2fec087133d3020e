"""The worker against a real redis-server: drain, crash, claim, dead-letter, trim, recover."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from redis.exceptions import ResponseError

from gateway.core import errors
from gateway.core.events import decode
from gateway.core.reconcile import reconcile
from gateway.core.recovery import rehydrate
from gateway.worker.audit import AuditLog
from gateway.worker.metrics import WorkerMetrics
from gateway.worker.runner import GROUP, Worker, _s
from tests.support.store_fixtures import store_env
from tests.support.worker_helpers import equals as _eq
from tests.support.worker_helpers import (
    ledger_count,
    make_traffic,
    until,
    users_on_distinct_partitions,
    worker_env,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(durable_store):
    """Every worker test on SQLite and on PostgreSQL (tests/support/store_fixtures.py)."""
    return durable_store


async def stream_len(engine) -> int:
    return sum([await engine.redis.xlen(pk.events) for pk in engine.keys.all_partitions()])


async def test_worker_drains_every_event_once_with_audit_lines(engine, store, tmp_path):
    n = await make_traffic(engine)
    audit = AuditLog(str(tmp_path / "audit.jsonl"))
    stats = await Worker(engine, store, audit=audit, batch=7).run(burst=True)
    audit.close()
    assert stats.events == n and stats.new_ledger_rows == n
    assert await ledger_count(store, ["u1", "u2", "u3", "u4"]) == n
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert len(lines) == n and {json.loads(x)["u"] for x in lines} == {"u1", "u2", "u3", "u4"}
    assert await reconcile(engine, store) == []


async def test_redelivered_batch_duplicates_nothing(engine, store):
    n = await make_traffic(engine, users=("a",))
    w = Worker(engine, store)
    await w.ensure_groups()
    entries = await w._read(">")
    await store.write_events([decode(sid, f, p) for p, sid, f in entries])  # written, never acked
    w2 = Worker(engine, store, claim_idle_ms=0)
    stats = await w2.run(burst=True)
    assert stats.claimed == n and stats.new_ledger_rows == 0
    assert await ledger_count(store, ["a"]) == n
    assert await reconcile(engine, store) == []


async def test_two_workers_at_once_store_each_event_once(engine, store):
    n = await make_traffic(engine, users=[f"m{i}" for i in range(12)], rounds=4)
    workers = [Worker(engine, store, batch=1), Worker(engine, store, batch=1)]
    stats = await asyncio.gather(*(w.run(burst=True) for w in workers))
    assert sum(s.events for s in stats) == n and all(s.events > 0 for s in stats)
    assert await ledger_count(store, [f"m{i}" for i in range(12)]) == n
    assert await reconcile(engine, store) == []


async def test_undecodable_entry_goes_to_dead_letter(engine, store):
    await engine.grant("z", "1", op_id="g1")
    p = engine.keys.partition_of("z")
    await engine.redis.xadd(engine.keys.partition(p).events, {"e": "{not json"})
    stats = await Worker(engine, store).run(burst=True)
    assert stats.dead_lettered == 1 and stats.events == 1
    dead = await engine.redis.xrange(engine.keys.partition(p).dead)
    assert len(dead) == 1 and b"reason" in dead[0][1]


class FlakyStore:
    """A store in front of the real one: `down` fails every write and ping (an outage);
    `poison` fails any write that holds that operation id while the store answers."""

    def __init__(self, inner, *, down: bool = False, poison: str | None = None):
        self.inner, self.down, self.poison = inner, down, poison
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def ping(self):
        return not self.down

    async def write_events(self, events):
        self.calls += 1
        if self.down:
            raise ConnectionError("store down")
        if any(e.op_id == self.poison for e in events):
            raise ValueError("the store refuses this event")
        return await self.inner.write_events(events)


async def test_a_poison_event_is_dead_lettered_alone_and_its_batch_is_stored(engine, store):
    await engine.grant("y", "1", op_id="g1")
    await engine.grant("y", "2", op_id="g2")
    await engine.grant("z", "3", op_id="g3")
    w = Worker(engine, FlakyStore(store, poison="g2"), sweep_interval=0.0, idle_seconds=0.01)
    await w.run(burst=True)
    dead = await engine.redis.xrange(engine.keys.partition(engine.keys.partition_of("y")).dead)
    assert len(dead) == 1 and b"refuses" in dead[0][1][b"reason"]
    assert json.loads(dead[0][1][b"e"])["id"] == "g2"
    assert [e.op_id async for e in store.ledger_all("y")] == ["g1"]
    assert [e.op_id async for e in store.ledger_all("z")] == ["g3"]


async def test_a_store_outage_longer_than_max_deliveries_dead_letters_nothing(engine, store):
    await engine.grant("amy", "10", op_id="g1")
    await engine.reserve("amy", "3", hold_id="h1", ttl_seconds=600)
    await engine.settle("amy", "h1", "2")
    flaky = FlakyStore(store, down=True)
    metrics = WorkerMetrics()
    w = Worker(
        engine,
        flaky,
        claim_idle_ms=0,
        max_deliveries=2,
        sweep_interval=0.0,
        idle_seconds=0.01,
        metrics=metrics,
    )
    task = asyncio.create_task(w.run())
    p = engine.keys.partition_of("amy")
    stream = engine.keys.partition(p).events
    for _ in range(300):  # delivered many more times than max_deliveries
        await asyncio.sleep(0.02)
        with contextlib.suppress(ResponseError):  # no group until the worker made it
            pending = await engine.redis.xpending_range(stream, "cg-worker", min="-", max="+", count=10)
            if pending and min(int(r["times_delivered"]) for r in pending) > 4:
                break
    assert await engine.redis.xlen(engine.keys.partition(p).dead) == 0
    flaky.down = False
    for _ in range(200):
        if len([e async for e in store.ledger_all("amy")]) == 3:
            break
        await asyncio.sleep(0.02)
    w.stop()
    await task
    assert await engine.redis.xlen(engine.keys.partition(p).dead) == 0
    assert await reconcile(engine, store) == []
    # written on the path for entries delivered too often, and counted like any stored batch
    assert metrics.registry.get_sample_value("credit_settlement_lag_seconds_count") >= 3


async def test_trim_never_drops_pending_or_undelivered_entries(engine, store):
    await engine.grant("t", "10", op_id="g1")
    w = Worker(engine, store)
    await w.ensure_groups()
    await w._process(await w._read(">"))  # g1 stored and acked
    await engine.reserve("t", "1", hold_id="h1", ttl_seconds=60)
    pending = await w._read(">")  # delivered, not acked
    await engine.reserve("t", "1", hold_id="h2", ttl_seconds=60)  # not delivered yet
    removed = await w.trim()
    stream = engine.keys.partition(engine.keys.partition_of("t")).events
    left = [json.loads(f[b"e"])["id"] for _, f in await engine.redis.xrange(stream)]
    assert removed == 1 and left == ["h1", "h2"]
    await w._process(pending)
    await w.run(burst=True)
    await w.trim()
    left = [json.loads(f[b"e"])["id"] for _, f in await engine.redis.xrange(stream)]
    assert left == ["h2"]  # the newest acked entry stays as the floor
    assert await ledger_count(store, ["t"]) == 3


async def test_flushall_then_rehydrate_restores_every_balance_and_open_hold(engine, store, clock):
    await make_traffic(engine, rounds=7)
    in_an_hour = datetime.fromtimestamp(clock() + 3600, UTC)
    await engine.grant("u1", "5", op_id="exp-grant", expires_at=in_an_hour, priority=7)
    await Worker(engine, store).run(burst=True)
    before = {u: await engine.account(u) for u in ("u1", "u2", "u3", "u4")}
    assert any(v.holds for v in before.values())
    await engine.redis.flushall()
    assert len(await engine.missing_partitions()) == engine.keys.partitions
    report = await rehydrate(engine, store)
    assert report.accounts == 4
    after = {u: await engine.account(u) for u in before}
    assert after == before
    # A replayed operation answers the same after the rebuild and changes nothing.
    again = await engine.grant("u1", "100", op_id="g-u1")
    assert again.replayed and again.state.version == 1 and again.state.granted == 100
    assert await engine.account("u1") == before["u1"]
    # Holds restored are real holds: they settle.
    hid = before["u2"].holds[0].hold_id
    await engine.settle("u2", hid, "1")
    await Worker(engine, store).run(burst=True)
    assert await reconcile(engine, store) == []


async def test_writes_wait_for_rebuild_after_state_loss(engine, store):
    from gateway.core.errors import StateLost

    await engine.grant("w", "5", op_id="g1")
    await Worker(engine, store).run(burst=True)
    await engine.redis.flushall()
    with pytest.raises(StateLost):
        await engine.grant("w", "1", op_id="g2")  # would rebuild over a stale, empty account
    await rehydrate(engine, store)
    assert (await engine.grant("w", "1", op_id="g2")).state.available == 6


async def test_reconcile_reports_planted_drift(engine, store):
    await make_traffic(engine, users=("r1", "r2"))
    await Worker(engine, store).run(burst=True)
    assert await reconcile(engine, store) == []
    acct = engine.keys.account_keys("r1")[0]
    await engine.redis.hincrby(acct, "spent", 7)
    drift = await reconcile(engine, store)
    assert [(d.user, d.what) for d in drift] == [("r1", "spent")]


# -- real processes ------------------------------------------------------------------------


@pytest.mark.faults
async def test_worker_killed_with_sigkill_mid_drain_loses_and_duplicates_nothing(
    engine, redis_url, tmp_path, store
):
    users = [f"k{i}" for i in range(40)]
    n = await make_traffic(engine, users=users, rounds=10)
    env = worker_env(
        redis_url, tmp_path / "kill.db", CREDIT_WORKER_BATCH=3, CREDIT_CLAIM_IDLE_MS=200, **store_env(store)
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.worker", env=env, cwd=REPO, stderr=subprocess.DEVNULL
    )
    try:
        # Kill it once it has stored part of the stream (some entries read but not acked).
        deadline = time.time() + 60
        while time.time() < deadline:
            await asyncio.sleep(0.05)
            if await ledger_count(store, users) > n // 4:
                break
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
        stored = await ledger_count(store, users)
        assert 0 < stored < n, "the kill must land mid-drain"
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "gateway.worker", "--burst"],
            env=env,
            cwd=REPO,
            timeout=120,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert await ledger_count(store, users) == n
        for u in users:
            versions = [e.version async for e in store.ledger_all(u)]
            assert versions == list(range(1, len(versions) + 1))
        assert await reconcile(engine, store) == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_worker_stops_cleanly_on_sigterm(redis_url, tmp_path):
    env = worker_env(redis_url, tmp_path / "term.db")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.worker"], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert "stopped" in proc.stderr.read()


async def test_reconcile_command_exits_zero_when_clean_and_nonzero_on_drift(engine, redis_url, tmp_path):
    await make_traffic(engine, users=("c1", "c2"))
    env = worker_env(redis_url, tmp_path / "rc.db")
    cmd = [sys.executable, "-m", "gateway.cli", "reconcile"]
    clean = await asyncio.to_thread(
        subprocess.run, cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "0 drift" in clean.stdout
    await engine.redis.hincrby(engine.keys.account_keys("c2")[0], "held", 5)
    drifted = await asyncio.to_thread(
        subprocess.run, cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert drifted.returncode == 1 and "DRIFT c2: held" in drifted.stdout


# -- Redis losing data under a running worker ------------------------------------------------


async def test_a_running_worker_persists_again_after_redis_loses_its_data(engine, store):
    from functools import partial

    users = users_on_distinct_partitions(engine, 6, "lost")
    for u in users:
        await engine.grant(u, "10", op_id=f"g1-{u}")
    w = Worker(
        engine, store, sweep_interval=0.05, idle_seconds=0.01, rehydrate=partial(rehydrate, engine, store)
    )
    task = asyncio.create_task(w.run())
    try:
        await until(lambda: _eq(ledger_count(store, users), len(users)), "the first grants stored")
        await engine.redis.flushall()  # streams, consumer group, accounts, ready markers: all gone
        await until(
            lambda: _eq(engine.missing_partitions(), []), "the worker's upkeep rebuilt the partitions"
        )
        for u in users:
            await engine.grant(u, "1", op_id=f"g2-{u}")
            await engine.reserve(u, "2", hold_id=f"h-{u}", ttl_seconds=60)
        # No restart: the same worker stores what was written after the loss.
        await until(
            lambda: _eq(ledger_count(store, users), 3 * len(users)), "the events after the loss stored"
        )
    finally:
        w.stop()
        await task
    assert await reconcile(engine, store) == []


async def test_one_partition_without_its_group_or_stream_stalls_no_other(engine, store):
    users = users_on_distinct_partitions(engine, engine.keys.partitions, "part")
    destroyed, deleted, broken, *others = users
    stream = {u: engine.keys.partition(engine.keys.partition_of(u)).events for u in users}
    for u in users:
        await engine.grant(u, "10", op_id=f"g1-{u}")
    w = Worker(engine, store, sweep_interval=0.05, idle_seconds=0.01)
    task = asyncio.create_task(w.run())
    try:
        await until(lambda: _eq(ledger_count(store, users), len(users)), "the first grants stored")
        await engine.redis.xgroup_destroy(stream[destroyed], "cg-worker")  # its group gone
        await engine.redis.delete(stream[deleted])  # its stream gone (with its group)
        await engine.redis.delete(stream[broken])
        await engine.redis.set(stream[broken], "not a stream")  # every read of it fails
        # A worker's timed jobs get through the broken partition too.
        spare = Worker(engine, store)
        await spare.claim_stale()
        await spare.trim()
        for u in [destroyed, deleted, *others]:
            await engine.grant(u, "1", op_id=f"g2-{u}")
        live = [destroyed, deleted, *others]
        await until(lambda: _eq(ledger_count(store, live), 2 * len(live)), "the other partitions drained")
        # The broken partition comes back once its stream is usable again.
        await engine.redis.delete(stream[broken])
        await engine.grant(broken, "1", op_id=f"g2-{broken}")
        await until(lambda: _eq(ledger_count(store, [broken]), 2), "the broken partition drained")
    finally:
        w.stop()
        await task
    for u in users:
        assert [e.version async for e in store.ledger_all(u)] == [1, 2]


class NodeDown:
    """A Redis client as a Cluster client behaves with one node down: a pipeline touching it
    fails as a whole, and so does every command on that node's keys."""

    def __init__(self, inner, down_keys):
        self.inner, self.down = inner, set(down_keys)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def pipeline(self, transaction=False):
        real = self.inner.pipeline(transaction=transaction)

        class Pipe:
            def __getattr__(_, name):
                return getattr(real, name)

            async def execute(_, raise_on_error=True):
                if any(k in self.down for cmd in real.command_stack for k in cmd[0]):
                    await real.reset()
                    raise ConnectionError("node down")
                return await real.execute(raise_on_error=raise_on_error)

        return Pipe()

    async def xreadgroup(self, group, consumer, streams, **kw):
        if set(streams) & self.down:
            raise ConnectionError("node down")
        return await self.inner.xreadgroup(group, consumer, streams, **kw)


async def test_a_failing_node_does_not_stop_the_reads_of_the_others(engine, store):
    users = users_on_distinct_partitions(engine, 4, "nd")
    for u in users:
        await engine.grant(u, "1", op_id=f"g-{u}")
    w = Worker(engine, store)
    await w.ensure_groups()
    down = engine.keys.partition(engine.keys.partition_of(users[0])).events
    w.redis = NodeDown(engine.redis, [down])
    got = await w._read(">")
    assert sorted(json.loads(f[b"e"])["u"] for _, _, f in got) == sorted(users[1:])
    w.redis = engine.redis  # the node is back: its entries were never lost
    got = await w._read(">")
    assert [json.loads(f[b"e"])["u"] for _, _, f in got] == [users[0]]


async def test_a_growing_backlog_raises_an_alert_before_holds_are_refused(engine, store, caplog):
    import logging

    engine.max_backlog = 8
    user = "backlogged"
    await engine.grant(user, "10", op_id="g")
    w = Worker(engine, store)
    await w.ensure_groups()
    caplog.set_level(logging.INFO, logger="credit.worker")
    await w.trim()
    assert "backlog" not in caplog.text  # one event: below half the limit
    for i in range(3):  # 4 events: half of 8
        await engine.reserve(user, "1", hold_id=f"a{i}", ttl_seconds=60)
    await w.trim()
    assert "past half of CREDIT_MAX_BACKLOG" in caplog.text
    for i in range(4):  # 8 events: the limit
        await engine.reserve(user, "1", hold_id=f"b{i}", ttl_seconds=60)
    await w.trim()
    assert "reached CREDIT_MAX_BACKLOG" in caplog.text
    with pytest.raises(errors.BacklogFull):
        await engine.reserve(user, "1", hold_id="c", ttl_seconds=60)
    await w.run(burst=True)  # the store catches up: stored, trimmed, the alert clears
    await w.trim()
    assert "backlog down to" in caplog.text
    await engine.reserve(user, "1", hold_id="c", ttl_seconds=60)


async def test_a_long_rebuild_does_not_stop_the_other_partitions_draining(engine, store):
    lost_user, live_user = users_on_distinct_partitions(engine, 2, "lr")
    await engine.grant(lost_user, "1", op_id="g")
    started, release = asyncio.Event(), asyncio.Event()

    async def slow_rehydrate(partitions):  # a rebuild that takes as long as the test wants
        started.set()
        await release.wait()
        await rehydrate(engine, store, partitions, only_missing=True)

    w = Worker(engine, store, sweep_interval=0.0, idle_seconds=0.01, rehydrate=slow_rehydrate)
    await engine.redis.delete(engine.keys.partition(engine.keys.partition_of(lost_user)).ready)
    task = asyncio.create_task(w.run())
    await asyncio.wait_for(started.wait(), 10)
    await engine.grant(live_user, "2", op_id="g-live")  # while the rebuild runs
    await until(lambda: ledger_count(store, [live_user]), "the live partition drained during the rebuild")
    release.set()
    await until(lambda: _eq(engine.missing_partitions(), []), "the rebuild finished")
    w.stop()
    await task


@pytest.mark.parametrize("job", ["sweep", "claim_stale", "trim"])
async def test_the_drain_keeps_persisting_while_an_upkeep_pass_is_stuck(engine, store, monkeypatch, job):
    """The upkeep runs on its own timer: one of its jobs hanging (a slow partition, a
    64-partition pass) holds up no event on its way to the store."""
    stuck, release = asyncio.Event(), asyncio.Event()
    original = getattr(Worker, job)

    async def slow(self):
        stuck.set()
        await release.wait()
        return await original(self)

    monkeypatch.setattr(Worker, job, slow)
    w = Worker(engine, store, sweep_interval=0.0, idle_seconds=0.01)
    task = asyncio.create_task(w.run())
    try:
        await asyncio.wait_for(stuck.wait(), 10)
        await engine.grant("during", "5", op_id="g-during")
        await engine.debit("during", "1", op_id="d-during")
        await until(lambda: _eq(ledger_count(store, ["during"]), 2), "the events stored while upkeep hangs")
        assert not task.done()
    finally:
        release.set()
        w.stop()
        await task


async def test_an_idle_worker_blocks_on_its_streams_and_stores_a_new_event_at_once(engine, store):
    """Idle, the worker waits in one blocking read over every partition stream instead of
    polling them (64 reads every idle_seconds): Redis sees a handful of commands over 2 s.
    An event appended meanwhile wakes it and is stored."""
    await engine.grant("idle-a", "1", op_id="g-a")
    w = Worker(engine, store, block_ms=500)
    task = asyncio.create_task(w.run())
    try:
        await until(lambda: _eq(ledger_count(store, ["idle-a"]), 1), "the first grant stored")
        await asyncio.sleep(0.2)  # the batch's acknowledgement and the first upkeep pass
        await engine.redis.config_resetstat()
        await asyncio.sleep(2)
        stats = await engine.redis.info("commandstats")
        reads = stats.get("cmdstat_xreadgroup", {}).get("calls", 0)
        total = sum(s["calls"] for s in stats.values())  # with those the upkeep's scripts make
        # Polling reads 64 partitions every idle_seconds: 2,560 reads in 2 s. Blocking, with
        # block_ms=500: about 4 reads; and 2 upkeep passes of a few commands.
        assert reads <= 8, stats
        assert total < 600, stats
        await engine.grant("idle-b", "1", op_id="g-b")
        await until(lambda: _eq(ledger_count(store, ["idle-b"]), 1), "the event stored", limit_s=10)
    finally:
        w.stop()
        await task
    assert await reconcile(engine, store) == []


async def test_stopping_cuts_a_blocking_read_short(engine, store):
    w = Worker(engine, store, block_ms=600_000)
    task = asyncio.create_task(w.run())
    await engine.grant("stopper", "1", op_id="g-s")
    await until(lambda: _eq(ledger_count(store, ["stopper"]), 1), "the grant stored")
    w.stop()
    await asyncio.wait_for(task, 30)  # not the ten minutes of the read it was blocked in


async def test_a_blocking_read_cut_short_leaves_no_answer_for_the_next_command(engine, store):
    """The blocked read shares the client's pool. Cut short, its answer would still come
    (here: an entry appended right after) and be read by whoever took the connection next."""
    w = Worker(engine, store, block_ms=3000)
    task = asyncio.create_task(w.run())
    await engine.grant("cut-a", "1", op_id="g-a")
    await until(lambda: _eq(ledger_count(store, ["cut-a"]), 1), "the grant stored")
    await asyncio.sleep(0.1)  # blocked again
    w.stop()
    await asyncio.wait_for(task, 30)
    await engine.grant("cut-b", "1", op_id="g-b")  # would answer the abandoned read
    await asyncio.sleep(0.05)
    for i in range(20):  # the pool hands back its most recently released connection first
        assert await engine.redis.get(f"no-such-key-{i}") is None
    assert (await engine.grant("cut-b", "1", op_id="g-b")).state.available == 1


@pytest.mark.parametrize(("linger", "most_batches"), [(0.2, 10), (0.0, None)], ids=["linger", "none"])
async def test_a_woken_worker_lingers_so_a_light_steady_rate_is_written_in_few_batches(
    engine, store, linger, most_batches
):
    # One entry at a time wakes the blocking read; without the linger each one would be its
    # own batch (a store transaction and an XACK each).
    users = [f"trickle-{i}" for i in range(40)]
    w = Worker(engine, store, block_ms=500, linger_seconds=linger)
    task = asyncio.create_task(w.run())
    try:
        await asyncio.sleep(0.2)  # blocked in its read by now
        before = w.stats.batches
        for i, u in enumerate(users):
            await engine.grant(u, "1", op_id=f"t-{i}")
            await asyncio.sleep(0.001)
        await until(lambda: _eq(ledger_count(store, users), len(users)), "every grant stored")
    finally:
        w.stop()
        await task
    batches = w.stats.batches - before
    if most_batches is not None:
        assert batches <= most_batches, batches
    else:
        assert batches > 10, batches  # the same trickle, written as it comes


async def test_idle_consumers_without_pending_entries_are_removed_from_the_group(engine, store):
    """Each restart of a worker under a default (pid-based) name leaves a consumer in the
    group; those idle with nothing pending go, one holding entries stays for the claim."""
    await engine.grant("cons", "1", op_id="g1")
    w = Worker(engine, store, forget_consumers_after_ms=100)
    await w.run(burst=True)
    stream = engine.keys.partition(engine.keys.partition_of("cons")).events
    await engine.redis.xgroup_createconsumer(stream, GROUP, "ghost-empty")  # a worker gone, owing nothing
    await engine.grant("cons", "1", op_id="g2")
    await engine.redis.xreadgroup(GROUP, "ghost-holding", {stream: ">"}, count=10)  # holds g2
    await asyncio.sleep(0.3)
    assert await w.forget_consumers() == 1
    names = {_s(c["name"]) for c in await engine.redis.xinfo_consumers(stream, GROUP)}
    assert "ghost-empty" not in names and {"ghost-holding", w.consumer} <= names
    # the held entry is still taken over and stored
    w.claim_idle_ms = 0
    await w.claim_stale()
    assert [e.op_id async for e in store.ledger_all("cons")] == ["g1", "g2"]
