"""Builds a Worker from Settings and runs it until SIGTERM (or drained, with --burst)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial

from gateway.core.connections import describe, make_engine, make_redis, make_store
from gateway.core.engine import CreditEngine
from gateway.core.recovery import ensure_ready, rehydrate
from gateway.core.settings import Settings, load_settings
from gateway.core.store.base import Store
from gateway.logs import configure_logging
from gateway.notifications.delivery import Deliverer, build_sink
from gateway.notifications.detect import Detector
from gateway.notifications.expiring import ExpiringScan
from gateway.notifications.notifier import prune_outbox
from gateway.selling import Selling, build_selling

from .audit import AuditLog
from .metrics import WorkerMetrics
from .runner import Worker, WorkerStats

log = logging.getLogger("credit.worker")


def notification_jobs(
    settings: Settings, store: Store, now_ms: Callable[[], int], metrics: WorkerMetrics | None = None
) -> list[Callable[[asyncio.Event], Awaitable[None]]]:
    """The worker's notification loops: the expiring-credit scan, and the delivery loop when
    a sink is configured (else notifications stay pending in the outbox)."""
    scan = ExpiringScan(store, days=settings.notify_expiring_days, now_ms=now_ms)
    jobs: list[Callable[[asyncio.Event], Awaitable[None]]] = [
        partial(every, settings.notify_expiring_interval_seconds, scan.run, at_start=True),
        partial(every, 3600.0, partial(prune_outbox, store, now_ms, settings.notify_keep_days)),
    ]
    sink = build_sink(settings)  # a bad CREDIT_NOTIFY_SINK stops the start here
    if sink is not None:
        observe = None if metrics is None else metrics.notification_delivered
        deliverer = Deliverer.from_settings(settings, store, sink, now_ms, observe)

        async def deliver(stop: asyncio.Event) -> None:
            try:
                await deliverer.run(stop, settings.notify_poll_seconds)
            finally:
                await sink.close()

        jobs.append(deliver)
    return jobs


def build_worker(
    settings: Settings,
    engine: CreditEngine,
    store: Store,
    selling: Selling | None = None,
    metrics: WorkerMetrics | None = None,
) -> Worker:
    """A Worker configured as `settings` say, on `engine` and `store`, with its notification
    detection (before each batch is acknowledged) and loops, and the selling services' timed
    jobs when given (all of them beside the drain, not in a burst)."""
    audit = AuditLog(settings.audit_path) if settings.audit_path else None
    detector = Detector(
        store, default_threshold_units=settings.low_balance_threshold_units, now_ms=engine.now_ms
    )
    return Worker(
        engine,
        store,
        audit=audit,
        consumer=settings.worker_name,
        batch=settings.worker_batch,
        idle_seconds=settings.worker_idle_seconds,
        # Embedded mode answers a write once the worker has stored it: no lingering there.
        linger_seconds=0 if settings.embedded else settings.worker_linger_seconds,
        claim_idle_ms=settings.claim_idle_ms,
        max_deliveries=settings.max_deliveries,
        sweep_interval=settings.sweep_interval_seconds,
        rehydrate=partial(rehydrate, engine, store, only_missing=True),
        on_stored=detector.batch,
        side_jobs=[
            *notification_jobs(settings, store, engine.now_ms, metrics),
            *(selling_jobs(settings, selling) if selling is not None else []),
        ],
        metrics=metrics,
    )


async def run_worker(settings: Settings, *, burst: bool = False) -> WorkerStats:
    """The worker process: connects, rebuilds what Redis lost, drains until stopped."""
    if settings.embedded:
        raise SystemExit(
            "the worker needs CREDIT_REDIS_URL; in embedded mode `credit-gateway serve` runs it in-process"
        )
    redis = make_redis(settings)
    store = make_store(settings)
    await store.open()
    engine = make_engine(settings, redis)
    stack = AsyncExitStack()  # the payment providers' clients, the metrics server
    try:
        metrics = WorkerMetrics()
        stack.enter_context(metrics.served(settings.worker_metrics_host, settings.worker_metrics_port))
        worker = build_worker(
            settings, engine, store, await build_selling(stack, settings, None, store, engine), metrics
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        log.info("worker %s starting; %s", worker.consumer, describe(settings))
        try:
            await ensure_ready(engine, store)
            _tune_gc()
            stats = await worker.run(burst=burst)
        finally:
            worker.close()
    finally:
        await stack.aclose()
        await store.close()
        await redis.aclose()
    log.info("worker %s stopped: %s", worker.consumer, stats)
    return stats


def selling_jobs(settings: Settings, selling: Selling) -> list[Callable[[asyncio.Event], Awaitable[None]]]:
    """The worker's timed jobs for the selling services (each runs until its stop event)."""
    jobs: list[Callable[[asyncio.Event], Awaitable[None]]] = [
        # Claims a crash left between their two steps are finished (see gateway/promos.py).
        partial(every, 60.0, selling.promos.complete_pending),
        # Renewals, grants a crash left fixed but not made, and ended subscriptions' wind-up.
        partial(every, settings.plan_renewal_interval_seconds, selling.subscriptions.run_due, at_start=True),
    ]
    interval = settings.payment_reconcile_interval_seconds
    if selling.payments.providers and interval > 0:
        after_ms = int(settings.payment_reconcile_after_seconds * 1000)
        jobs.append(partial(every, interval, partial(selling.payments.reconcile, after_ms)))
    return jobs


async def every(
    interval: float, job: Callable[[], Awaitable[list[str]]], stop: asyncio.Event, *, at_start: bool = False
) -> None:
    """`job` every `interval` seconds until `stop` (and once at the start, with `at_start`),
    each line it returns logged. Jobs are idempotent (several workers running them at once
    change each thing once), and one that fails is tried again next time."""
    name = getattr(job, "__qualname__", None) or getattr(getattr(job, "func", None), "__qualname__", "job")
    first = at_start
    while not stop.is_set():
        if not first:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
        first = False
        if stop.is_set():
            return
        try:
            for line in await job():
                log.info("%s: %s", name, line)
        except Exception:
            log.exception("%s failed; trying again in %.0f s", name, interval)


def _tune_gc() -> None:
    """Fewer cyclic collections in the worker process. Decoding a batch allocates some ten
    containers per event, freed by reference counting; at the default threshold (700) the
    collector runs every ~70 events and, each tenth time, walks the whole heap. Freezing
    what startup made (modules, clients) and collecting every 50,000 allocations cut the
    CPU per event by about a third (loadtest/worker_cost.py). Cycles are rare here, so
    memory stays bounded by the batch."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.worker", description="Persist credit events to the store."
    )
    parser.add_argument("--burst", action="store_true", help="drain every stream, then exit")
    args = parser.parse_args(argv)
    settings = load_settings()
    configure_logging(settings.log_format)
    try:
        asyncio.run(run_worker(settings, burst=args.burst))
    except Exception as exc:
        # Through the configured handler: one JSON line (traceback inside) when asked for JSON.
        log.critical("worker stopped: %s", exc, exc_info=True)
        return 1
    return 0
