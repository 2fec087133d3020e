"""GET /metrics: who may read it, and that the proxy's figures are the ledger's (a real
gateway in front of the fake upstream, on a real redis-server)."""

from __future__ import annotations

import re
from decimal import Decimal

import aiohttp
import pytest

from tests.support.proxy_fixtures import ADMIN, CLIENT, post, running_gateway

METRICS_KEY = "metrics-" + "m" * 40


async def scrape(gw, key: str | None = ADMIN) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as s, s.get(gw.base + "/metrics", headers=headers) as r:
        return r.status, await r.text()


def value(text: str, name: str, **labels: str) -> float:
    """A sample's value (0 when the series is absent)."""
    for line in text.splitlines():
        m = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if have == labels:
            return float(m.group(3))
    return 0.0


@pytest.fixture
async def gwm(redis, redis_url, tmp_path, monkeypatch):
    monkeypatch.setenv("CREDIT_METRICS_KEYS", METRICS_KEY)  # read by Settings()
    async with running_gateway(redis_url, tmp_path) as g:
        yield g


@pytest.mark.parametrize(
    ("key", "status"),
    [(None, 401), ("wrong-" + "x" * 40, 401), (CLIENT, 401), (ADMIN, 200), (METRICS_KEY, 200)],
    ids=["none", "wrong", "client", "admin", "metrics"],
)
async def test_metrics_need_a_metrics_or_admin_key(gwm, key, status):
    got, text = await scrape(gwm, key)
    assert got == status
    if status == 200:
        assert "# TYPE credit_http_requests_total counter" in text
    else:
        assert "credit_http_requests_total" not in text


async def test_proxied_calls_are_counted_as_the_ledger_has_them(gw):
    await gw.grant("alice", "1")
    chat = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
    charged = Decimal(0)
    for _ in range(3):
        status, h, raw = await post(
            gw, "/v1/chat/completions", chat, **{"X-Fake-Input-Tokens": "100", "X-Fake-Output-Tokens": "30"}
        )
        assert status == 200, raw
        charged += Decimal(h["X-Credits-Charged"])
    streamed = {**chat, "stream": True}
    status, h, raw = await post(gw, "/v1/chat/completions", streamed, **{"X-Fake-Output-Tokens": "5"})
    assert status == 200
    charged += Decimal(re.search(rb"credits charged=([0-9.]+)", raw).group(1).decode())
    status, _, _ = await post(gw, "/v1/chat/completions", chat, **{"X-Fake-Status": "500"})
    assert status == 500  # released: nothing charged
    status, _, _ = await post(gw, "/v1/chat/completions", chat, user="broke")  # no credit
    assert status == 402

    _, text = await scrape(gw)
    route = "/v1/chat/completions"
    assert value(text, "credit_http_requests_total", method="POST", route=route, status="200") == 4
    assert value(text, "credit_http_requests_total", method="POST", route=route, status="500") == 1
    assert value(text, "credit_http_requests_total", method="POST", route=route, status="402") == 1
    assert value(text, "credit_reserve_results_total", result="ok") == 5
    assert value(text, "credit_reserve_results_total", result="insufficient_credits") == 1
    # the usage of 100 input tokens is above the estimate held for "hi": charged beyond the hold
    over = value(text, "credit_proxy_charged_over_hold_micro_credits_total")
    assert 0 < over < int(charged * 1_000_000)
    b = await gw.balance("alice")
    assert b.held == 0 and Decimal(1) - b.available == charged
    # the upstream's timings, by outcome
    assert value(text, "credit_upstream_duration_seconds_count", upstream="openai", outcome="ok") == 4
    assert value(text, "credit_upstream_duration_seconds_count", upstream="openai", outcome="http_5xx") == 1
    assert value(text, "credit_upstream_first_byte_seconds_count", upstream="openai") == 5


async def test_routes_are_labelled_by_their_template_never_their_ids(gw):
    async with aiohttp.ClientSession() as s:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        for user in ("u1", "u2", "u3"):
            async with s.get(f"{gw.base}/admin/accounts/{user}", headers=admin) as r:
                assert r.status == 200
        async with s.get(f"{gw.base}/no/such/path/abc123") as r:
            assert r.status == 404
    _, text = await scrape(gw)
    assert (
        value(
            text, "credit_http_requests_total", method="GET", route="/admin/accounts/{user_id}", status="200"
        )
        == 3
    )
    assert value(text, "credit_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert "u1" not in text and "abc123" not in text


def test_flushed_counts_and_observations_equal_prometheus_own():
    """The hot path counts in memory and adds at flush (through the histogram's own values):
    the figures must be exactly those of observing each value with prometheus-client."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from gateway.metrics import HTTP_BUCKETS, HotCounter, HotHistogram

    direct_reg, hot_reg = CollectorRegistry(), CollectorRegistry()
    direct = Histogram("h", "h", ["route"], buckets=HTTP_BUCKETS, registry=direct_reg)
    hot = HotHistogram("h", "h", ["route"], HTTP_BUCKETS, hot_reg)
    direct_c = Counter("c", "c", ["r"], registry=direct_reg)
    hot_c = HotCounter(Counter("c", "c", ["r"], registry=hot_reg))
    # on the bounds, between them, below the first and past the last
    values = [0.0, 0.001, 0.0011, 0.0025, 0.003, 0.5, 1.0, 59.9, 60.0, 61.0, 1e6, *HTTP_BUCKETS]
    for n, v in enumerate(values):
        route = "/a" if n % 3 else "/b"
        direct.labels(route).observe(v)
        hot.observe((route,), v)
        direct_c.labels(route).inc(n)
        hot_c.inc((route,), n)
        if n == 5:
            hot.flush()  # flushes add up
            hot_c.flush()
    hot.flush()
    hot_c.flush()
    assert hot.data == {} and hot_c.counts == {}

    def samples(reg):
        return sorted(
            (s.name, tuple(sorted(s.labels.items())), s.value)
            for m in reg.collect()
            for s in m.samples
            if not s.name.endswith("_created")
        )

    assert samples(hot_reg) == samples(direct_reg)


async def test_webhook_deliveries_are_counted_by_provider_outcome_and_status(gw):
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.post(f"{gw.base}/webhooks/razorpay", data=b'{"event": "payment.captured"}') as r:
                assert r.status == 401  # no signature (and no secret configured): refused
    _, text = await scrape(gw)
    refused = [
        line
        for line in text.splitlines()
        if line.startswith("credit_payment_webhooks_total{") and 'status="401"' in line
    ]
    assert len(refused) == 1 and 'provider="razorpay"' in refused[0] and refused[0].endswith(" 2.0"), refused


def test_the_grafana_dashboard_names_only_metrics_the_gateway_and_worker_export():
    import json
    from pathlib import Path

    from gateway.metrics import Metrics
    from gateway.worker.metrics import WorkerMetrics

    dashboard = json.loads(
        (Path(__file__).resolve().parents[1] / "deploy" / "grafana-dashboard.json").read_text()
    )
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"\b(credit_[a-z_]+)", e)}
    exported = set()
    for registry in (Metrics().registry, WorkerMetrics().registry):
        for family in registry.collect():
            exported |= {s.name for s in family.samples} | {family.name}
    # a histogram's series exist once observed; its family name stands for them
    families = {n.removesuffix(s) for n in exported for s in ("_bucket", "_count", "_sum")}
    missing = {n for n in used if n not in exported and n.removesuffix("_bucket") not in families}
    missing = {n for n in missing if not (n.endswith("_total") and n.removesuffix("_total") in exported)}
    assert not missing, missing
    assert len(used) >= 15  # the dashboard covers the metrics, not a few of them


async def test_plain_routes_are_labelled_by_their_path_and_a_catch_all_by_its_template(gw):
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gw.base}/docs") as r:
            assert r.status == 200
        async with s.get(
            f"{gw.base}/v1/models", headers={"Authorization": f"Bearer {CLIENT}", "X-User-Id": "m"}
        ) as r:
            assert r.status in (200, 402)  # a configured proxy route (priced per call)
        async with s.get(f"{gw.base}/v1/not/a/route/xyz42") as r:
            assert r.status == 404  # the catch-all for unserved /v1 paths
    _, text = await scrape(gw)
    assert value(text, "credit_http_requests_total", method="GET", route="/docs", status="200") == 1
    assert (
        sum(
            value(text, "credit_http_requests_total", method="GET", route="/v1/models", status=st)
            for st in ("200", "402")
        )
        == 1
    )
    assert value(text, "credit_http_requests_total", method="GET", route="/v1/{rest}", status="404") == 1
    assert "xyz42" not in text
