"""The gateway's Prometheus metrics: one Metrics per app (create_app builds it), exposed at
GET /metrics.

When several processes serve one port (`serve --workers N`), prometheus-client's
multiprocess mode is on: each process writes its values to files in
PROMETHEUS_MULTIPROC_DIR (the CLI makes and empties a directory when none is given, before
the processes start, because the mode is chosen when prometheus-client is imported), and a
scrape answered by any process sums them all. Without that variable the values stay in this
app's own registry, so two apps in one process (tests) count apart.

Names carry no user ids: a label's values are bounded (route templates, upstream names,
result codes), so the series do not grow with the traffic.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from bisect import bisect_left
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The text format every Prometheus reads (2.x does not know 1.0.0's header; the body is the same).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# Seconds: a gateway answer is a few ms, an LLM call seconds to minutes.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0)


class HotCounter:
    """A labelled counter counted in this process's memory and added to its Prometheus
    counter at flush: on the hot path a dict update instead of a locked (in multiprocess
    mode, mmap-written) update per count."""

    __slots__ = ("counts", "metric")

    def __init__(self, metric: Counter) -> None:
        self.metric = metric
        self.counts: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...], n: float = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def flush(self) -> None:
        counts, self.counts = self.counts, {}
        for key, n in counts.items():
            self.metric.labels(*key).inc(n)


class HotHistogram:
    """A labelled histogram observed into this process's memory (its sum and bucket counts
    per label values) and added to its Prometheus histogram at flush."""

    __slots__ = ("bounds", "data", "metric")

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: list[str],
        buckets: tuple[float, ...],
        registry: CollectorRegistry | None,
    ) -> None:
        self.metric = Histogram(name, documentation, labels, buckets=buckets, registry=registry)
        self.bounds = list(buckets)  # +Inf is the histogram's last bucket beyond these
        self.data: dict[tuple[str, ...], list[float]] = {}

    def observe(self, key: tuple[str, ...], value: float) -> None:
        d = self.data.get(key)
        if d is None:
            d = self.data[key] = [0.0] * (len(self.bounds) + 2)  # the sum, then each bucket
        d[0] += value
        d[1 + bisect_left(self.bounds, value)] += 1  # buckets are "less or equal"

    def flush(self) -> None:
        data, self.data = self.data, {}
        for key, d in data.items():
            child = self.metric.labels(*key)
            # prometheus-client offers observe() one value at a time; its child keeps the
            # sum and the per-bucket counts as values (tests/test_metrics.py checks that
            # flushed figures equal observed ones, so a change there fails a test).
            child._sum.inc(d[0])
            for i, n in enumerate(d[1:]):
                if n:
                    child._buckets[i].inc(n)


class Metrics:
    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROCESS_ENV))
        self.registry = CollectorRegistry()
        # In multiprocess mode the values live in the shared files, not in a registry.
        reg = None if self.multiprocess else self.registry
        self.requests = HotCounter(
            Counter(
                "credit_http_requests",
                "HTTP requests answered, by route template, method and status",
                ["route", "method", "status"],
                registry=reg,
            )
        )
        self.request_seconds = HotHistogram(
            "credit_http_request_duration_seconds",
            "time to the end of the answer (a stream: its last byte), by route template",
            ["route"],
            HTTP_BUCKETS,
            reg,
        )
        self.upstream_seconds = HotHistogram(
            "credit_upstream_duration_seconds",
            "proxied calls: from sending to the upstream until its answer ended, by upstream and outcome",
            ["upstream", "outcome"],
            UPSTREAM_BUCKETS,
            reg,
        )
        self.upstream_first_byte_seconds = HotHistogram(
            "credit_upstream_first_byte_seconds",
            "proxied calls: time from sending to the upstream until its answer's head arrived",
            ["upstream"],
            UPSTREAM_BUCKETS,
            reg,
        )
        self.reserves = HotCounter(
            Counter(
                "credit_reserve_results",
                "the proxy's reserves by result: ok, insufficient_credits, in_debt, rate_limited, "
                "model_not_allowed, unconfirmed, ...; clamped: a reserve whose output was lowered to fit",
                ["result"],
                registry=reg,
            )
        )
        self.charged_over_hold = Counter(
            "credit_proxy_charged_over_hold_micro_credits",
            "micro-credits proxied calls were charged beyond their hold (usage above the "
            "estimate, charged by the overage policy); what was held, charged and released is "
            "counted from the ledger by the worker",
            registry=reg,
        )
        self.settles = Counter(
            "credit_settle_events",
            "the proxy's charges Redis did not confirm at once: retry (tried again at once), "
            "unconfirmed (left to the background), confirmed_later, given_up, late_debit (a hold "
            "gone uncharged, charged as a debit)",
            ["event"],
            registry=reg,
        )
        self.webhooks = HotCounter(
            Counter(
                "credit_payment_webhooks",
                "the payment providers' webhook deliveries by provider, outcome (applied, "
                "duplicate, anomaly, signature_refused, ...) and the HTTP status answered",
                ["provider", "outcome", "status"],
                registry=reg,
            )
        )
        self._included: list[CollectorRegistry] = []
        self._hot = (self.webhooks, self.requests, self.request_seconds, self.upstream_seconds,
                     self.upstream_first_byte_seconds, self.reserves)  # fmt: skip

    def answered(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.inc((route, method, str(status)))
        self.request_seconds.observe((route,), seconds)

    def flush(self) -> None:
        """Adds what the hot path counted in memory to the Prometheus metrics (each scrape
        does; so does `flush_every`, for the other processes' share in multiprocess mode)."""
        for hot in self._hot:
            hot.flush()

    async def flush_every(self, seconds: float) -> None:
        try:
            while True:
                await asyncio.sleep(seconds)
                self.flush()
        finally:
            self.flush()  # at shutdown too: nothing counted is dropped

    def include(self, registry: CollectorRegistry) -> None:
        """Another registry of this process answered with these (the in-process worker's)."""
        self._included.append(registry)

    def exposition(self) -> bytes:
        self.flush()
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            text = generate_latest(registry)
        else:
            text = generate_latest(self.registry)
        return text + b"".join(generate_latest(r) for r in self._included)


def route_of(scope: Scope) -> str:
    """The matched route's template (`/admin/accounts/{user}`), never the raw path, so that
    ids in paths do not become series; a path no route matched is `unmatched`."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    # The proxy's short path (GatewayApp) skips the router: its paths are a fixed few.
    if scope.get("path") in getattr(scope.get("app"), "proxy_paths", ()):
        return str(scope["path"])
    if "endpoint" in scope:
        # A plain Starlette route (the docs, a configured proxy route) names no route in the
        # scope, only its endpoint and parameters: the template is the path with each
        # parameter's value put back as its name.
        template = str(scope.get("path", ""))
        for name, value in (scope.get("path_params") or {}).items():
            template = template.replace(str(value), "{" + name + "}", 1) if value != "" else template
        return template
    return "unmatched"


class MetricsMiddleware:
    """Counts and times every HTTP answer by route, method and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # an exception before the answer began: the server answers 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.answered(route_of(scope), scope["method"], status, time.perf_counter() - start)


@contextmanager
def shared_metrics_dir() -> Iterator[str]:
    """PROMETHEUS_MULTIPROC_DIR for processes started inside: the one the environment names
    (emptied first: files of an earlier run would be summed in), else a temporary directory
    removed afterwards. Set before the processes start, as they choose the mode on import."""
    given = os.environ.get(MULTIPROCESS_ENV)
    if given:
        os.makedirs(given, exist_ok=True)
        for name in os.listdir(given):
            if name.endswith(".db"):
                os.remove(os.path.join(given, name))
        yield given
        return
    made = tempfile.mkdtemp(prefix="credit-metrics-")
    os.environ[MULTIPROCESS_ENV] = made
    try:
        yield made
    finally:
        os.environ.pop(MULTIPROCESS_ENV, None)
        shutil.rmtree(made, ignore_errors=True)
