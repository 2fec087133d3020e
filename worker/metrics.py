"""The worker's Prometheus metrics, served on a port of its own (CREDIT_WORKER_METRICS_PORT).

Settlement lag is the time from an operation in Redis (its event's timestamp) to its row in
the store: what a crash of Redis could lose, and how far behind the record is. Counts of
stored events are at least once, like the stream: a batch delivered again after a crash is
counted again (its rows are not written twice).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from gateway.core.events import Event

log = logging.getLogger("credit.worker")

LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.batch_events = Histogram(
            "credit_worker_batch_events",
            "events per batch written to the store",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.store_write_seconds = Histogram(
            "credit_store_write_seconds",
            "time to write one batch to the store",
            buckets=WRITE_BUCKETS,
            registry=r,
        )
        self.settlement_lag_seconds = Histogram(
            "credit_settlement_lag_seconds",
            "from an operation in Redis (its event's time) to its row in the store",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.events = Counter(
            "credit_worker_events", "events stored, by type (at least once)", ["type"], registry=r
        )
        self.micro_credits = Counter(
            "credit_ledger_micro_credits",
            "micro-credits of stored events by type: grant, debit, hold_open (held), hold_settled "
            "(charged), hold_released, hold_expired, grant_expired (at least once)",
            ["type"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "credit_dead_lettered_events", "events moved to a dead-letter stream", registry=r
        )
        self.write_failures = Counter(
            "credit_store_write_failures", "batches the store did not take (retried)", registry=r
        )
        self.backlog = Gauge(
            "credit_stream_backlog_events",
            "entries of a partition's stream not yet stored: pending and never delivered",
            ["partition"],
            registry=r,
        )
        self.pending = Gauge(
            "credit_stream_pending_events",
            "entries delivered to a worker and not yet acknowledged, per partition",
            ["partition"],
            registry=r,
        )
        self.notifications = Counter(
            "credit_notification_deliveries",
            "notification webhook attempts by kind and result: delivered, retry (tried again "
            "later), failed (given up after CREDIT_NOTIFY_RETRY_SECONDS)",
            ["kind", "result"],
            registry=r,
        )
        self.holds_open = Gauge(
            "credit_holds_open",
            "open holds per partition (their expiry entries in Redis)",
            ["partition"],
            registry=r,
        )
        self.dead_letters = Gauge(
            "credit_dead_letter_events",
            "entries in a partition's dead-letter stream",
            ["partition"],
            registry=r,
        )

    def notification_delivered(self, kind: str, result: str) -> None:
        self.notifications.labels(kind, result).inc()

    def stored(self, events: Iterable[Event], seconds: float) -> None:
        """A batch written: its size, the write's time, and each event's lag and amount."""
        now_ms = time.time() * 1000
        n = 0
        lag = self.settlement_lag_seconds
        for ev in events:
            n += 1
            lag.observe(max(now_ms - ev.ts_ms, 0) / 1000)
            self.events.labels(ev.type).inc()
            if ev.amount:
                self.micro_credits.labels(ev.type).inc(abs(ev.amount))
        self.batch_events.observe(n)
        self.store_write_seconds.observe(seconds)

    @contextmanager
    def served(self, host: str, port: int) -> Iterator[int | None]:
        """Serves /metrics on host:port (a thread) while inside; yields the port, or None
        when it cannot listen there: that is logged, and the worker goes on storing events
        without its metrics (port 0 asks for none)."""
        if not port:
            yield None
            return
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            log.error("worker metrics: cannot listen on %s:%d (%s); going on without them", host, port, exc)
            yield None
            return
        log.info("worker metrics on http://%s:%d/metrics", host, port)
        try:
            yield port
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)
