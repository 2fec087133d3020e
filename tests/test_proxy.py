"""The metering proxy end to end: a real gateway (uvicorn) in front of the fake upstream,
on a real redis-server, with a SQLite store."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest

from gateway.api.app import create_app
from gateway.core.settings import Settings
from gateway.devtools.mock_upstream import MockUpstream as FakeUpstream
from gateway.logs import configure_logging
from gateway.worker.runner import Worker
from tests.support.proxy_fixtures import ADMIN, CLIENT, KNOWN_MODELS, charged, post, running_gateway

REPO = Path(__file__).resolve().parents[1]


async def test_exact_charge_for_known_usage_openai_chat(gw):
    await gw.grant("alice", "1")
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
    status, h, raw = await post(
        gw,
        "/v1/chat/completions",
        body,
        **{"X-Fake-Input-Tokens": "100", "X-Fake-Output-Tokens": "30", "X-Fake-Cached-Tokens": "20"},
    )
    assert status == 200, raw
    # 80 uncached x 1 + 20 cached x 0.5 + 30 out x 2 = 150 micro-credits
    assert charged(h) == Decimal("0.000150")
    assert Decimal(h["X-Credits-Remaining"]) == Decimal("0.999850")
    assert h["X-Request-Id"].startswith("req_")
    b = await gw.balance("alice")
    assert b.available == Decimal("0.999850") and b.held == 0


@pytest.mark.parametrize(
    ("path", "model", "body", "expect"),
    [
        (
            "/v1/messages",
            "claude-test",
            {"max_tokens": 40, "messages": [{"role": "user", "content": "x"}]},
            12 + 2 * 7,
        ),
        ("/v1/embeddings", "embed-test", {"input": "x"}, 12),
        ("/v1/responses", "gpt-test", {"input": "x", "max_output_tokens": 40}, 12 + 2 * 7),
        ("/v1/completions", "gpt-test", {"prompt": "x", "max_tokens": 40}, 12 + 2 * 7),
    ],
)
async def test_exact_charge_on_every_metered_route(gw, path, model, body, expect):
    await gw.grant("bob", "1")
    status, h, raw = await post(
        gw,
        path,
        {"model": model, **body},
        user="bob",
        **{"X-Fake-Input-Tokens": "12", "X-Fake-Output-Tokens": "7"},
    )
    assert status == 200, raw
    assert charged(h) == Decimal(expect) / 1_000_000


async def test_streaming_settles_the_final_usage_and_strips_the_injected_chunk(gw):
    await gw.grant("carol", "1")
    body = {
        "model": "gpt-test",
        "stream": True,
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "x"}],
    }
    status, _h, raw = await post(
        gw,
        "/v1/chat/completions",
        body,
        user="carol",
        **{"X-Fake-Input-Tokens": "10", "X-Fake-Output-Tokens": "5"},
    )
    assert status == 200
    text = raw.decode()
    assert '"usage"' not in text  # the client did not ask for the usage chunk
    assert "data: [DONE]" in text
    assert ": credits charged=0.000020" in text  # 10 x 1 + 5 x 2
    forwarded = gw.fake.requests[-1]["body"]
    assert '"include_usage":true' in forwarded.replace(" ", "")
    assert (await gw.balance("carol")).available == Decimal("0.999980")


async def test_streaming_keeps_the_usage_chunk_when_the_client_asked(gw):
    await gw.grant("dan", "1")
    body = {
        "model": "gpt-test",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "x"}],
    }
    _status, _h, raw = await post(
        gw,
        "/v1/chat/completions",
        body,
        user="dan",
        **{"X-Fake-Input-Tokens": "10", "X-Fake-Output-Tokens": "5"},
    )
    assert '"usage"' in raw.decode() and ": credits charged=0.000020" in raw.decode()


async def test_anthropic_stream_settles_message_delta_usage(gw):
    await gw.grant("erin", "1")
    body = {
        "model": "claude-test",
        "stream": True,
        "max_tokens": 30,
        "messages": [{"role": "user", "content": "x"}],
    }
    status, _h, raw = await post(
        gw, "/v1/messages", body, user="erin", **{"X-Fake-Input-Tokens": "10", "X-Fake-Output-Tokens": "6"}
    )
    assert status == 200 and "message_stop" in raw.decode()
    assert ": credits charged=0.000022" in raw.decode()


@pytest.mark.parametrize(
    ("headers", "expected"),
    [({"X-Fake-Status": "500"}, 500), ({"X-Fake-Latency-Ms": "3000"}, 504)],
    ids=["upstream-error-passed-on", "upstream-timeout"],
)
async def test_upstream_error_or_timeout_charges_nothing(gw, headers, expected):
    await gw.grant("fay", "1")
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]}
    status, _h, _raw = await post(gw, "/v1/chat/completions", body, user="fay", **headers)
    assert status == expected
    b = await gw.balance("fay")
    assert b.available == Decimal("1") and b.held == 0


async def test_unreachable_upstream_charges_nothing(gw, tmp_path):
    await gw.fake.stop()
    await gw.grant("gus", "1")
    status, _h, raw = await post(
        gw, "/v1/chat/completions", {"model": "gpt-test", "messages": []}, user="gus"
    )
    assert status == 502 and b'"upstream_unreachable"' in raw
    assert (await gw.balance("gus")).held == 0


async def test_a_proxied_calls_log_lines_carry_the_request_id_it_answers_with(gw):
    out = io.StringIO()
    configure_logging("json", stream=out)
    try:
        await gw.fake.stop()
        await gw.grant("gil", "1")
        _status, headers, _raw = await post(
            gw, "/v1/chat/completions", {"model": "gpt-test", "messages": []}, user="gil"
        )
    finally:
        root = logging.getLogger()
        for h in [h for h in root.handlers if h.get_name() == "credit-gateway"]:
            root.removeHandler(h)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    unreachable = [r for r in lines if "unreachable" in r["message"]]
    assert unreachable and unreachable[0]["request_id"] == headers["X-Request-Id"]
    assert len(headers.getall("X-Request-Id")) == 1  # the hold id only


async def test_client_disconnect_mid_stream_charges_only_what_was_produced(gw):
    await gw.grant("hal", "1")
    body = {
        "model": "gpt-test",
        "stream": True,
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "x"}],
    }
    headers = gw.headers(
        "hal", **{"X-Fake-Input-Tokens": "10", "X-Fake-Output-Tokens": "100", "X-Fake-Chunk-Delay-Ms": "20"}
    )
    got = 0
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.base + "/v1/chat/completions", json=body, headers=headers) as r,
    ):
        async for chunk in r.content.iter_any():
            got += chunk.count(b"tok ")
            if got >= 5:
                break  # the client goes away
    for _ in range(100):
        b = await gw.balance("hal")
        if b.held == 0:
            break
        await asyncio.sleep(0.05)
    b = await gw.balance("hal")
    assert b.held == 0
    spent_units = 1_000_000 - b.available_units
    # input (estimated from the body) + only the few output tokens produced, far from 100
    assert 10 <= spent_units < 150 + 2 * 25, spent_units


async def test_mid_stream_upstream_failure_settles_what_was_streamed(gw):
    await gw.grant("ian", "1")
    body = {
        "model": "gpt-test",
        "stream": True,
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "x"}],
    }
    _status, _h, _raw = await post(
        gw,
        "/v1/chat/completions",
        body,
        user="ian",
        **{"X-Fake-Output-Tokens": "50", "X-Fake-Fail-After": "4"},
    )
    b = await gw.balance("ian")
    assert b.held == 0 and 0 < 1_000_000 - b.available_units < 100 + 2 * 10


async def test_unaffordable_request_is_clamped_or_refused_with_402_in_upstream_format(gw):
    await gw.grant("jo", "0.000100")  # 100 micro-credits
    body = {"model": "gpt-test", "max_tokens": 1000, "messages": [{"role": "user", "content": "x"}]}
    status, _h, raw = await post(
        gw, "/v1/chat/completions", body, user="jo", **{"X-Fake-Output-Tokens": "1000"}
    )
    assert status == 200, raw  # clamped: max_tokens lowered to what 100 micro-credits pay for
    import json as _json

    sent = _json.loads(gw.fake.requests[-1]["body"])
    assert 4 <= sent["max_tokens"] < 50
    status, _h, raw = await post(gw, "/v1/chat/completions", body, user="nobody")
    assert status == 402 and _json.loads(raw)["error"]["code"] == "insufficient_credits"
    status, _h, raw = await post(
        gw, "/v1/messages", {"model": "claude-test", "max_tokens": 10, "messages": []}, user="nobody"
    )
    assert status == 402 and _json.loads(raw)["type"] == "error"


async def test_500_concurrent_requests_never_overdraw_and_ledger_matches_headers(redis, redis_url, tmp_path):
    # Funded for 100 calls at most (10,000 micro-credits; a call costs >= 100): 500 at once.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.proxy_burst",
        redis_url,
        str(tmp_path),
        "kim",
        "0.010000",
        "500",
        cwd=str(REPO),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-3000:]
    report = json.loads(out.decode().strip().splitlines()[-1])
    ok = [Decimal(c) for c in report["charged"]]
    assert set(report["statuses"]) <= {200, 402}
    assert 0 < len(ok) <= 100
    assert Decimal(report["held"]) == 0 and Decimal(report["debt"]) == 0 and Decimal(report["available"]) >= 0
    assert sum(ok) + Decimal(report["available"]) == Decimal("0.01")
    # After the worker drains, the ledger's charges equal the headers' sum.
    from gateway.core.engine import CreditEngine
    from gateway.core.keys import KeySpace
    from gateway.core.store.sqlite import SQLiteStore

    store = SQLiteStore(str(tmp_path / "burst.db"))
    await store.open()
    try:
        await Worker(CreditEngine(redis, keys=KeySpace(partitions=16)), store).run(burst=True)
        total = 0
        async for e in store.ledger_all("kim"):
            if e.type == "hold_settled":
                total += e.amount
        assert Decimal(total) / 1_000_000 == sum(ok)
    finally:
        await store.close()


@pytest.mark.parametrize("auth", [None, "Bearer not-a-key-" + "x" * 30, f"Bearer {ADMIN}"])
async def test_forged_or_missing_keys_are_refused(gw, auth):
    headers = {"X-User-Id": "lee"}
    if auth:
        headers["Authorization"] = auth
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.base + "/v1/chat/completions", json={"model": "gpt-test"}, headers=headers) as r,
    ):
        assert r.status == 401
    assert gw.fake.requests == []


async def test_client_credentials_never_reach_the_upstream_and_the_gateway_injects_its_own(gw):
    await gw.grant("max", "1")
    await post(
        gw,
        "/v1/chat/completions",
        {"model": "gpt-test", "messages": []},
        user="max",
        Cookie="session=abc",
        Connection="keep-alive, X-Secret-Hop",
        **{"X-Secret-Hop": "1"},
    )
    sent = {k.lower(): v for k, v in gw.fake.requests[-1]["headers"].items()}
    assert sent["authorization"] == "Bearer sk-upstream-secret"
    assert CLIENT not in str(sent) and "cookie" not in sent and "x-user-id" not in sent
    assert "x-secret-hop" not in sent
    await post(gw, "/v1/messages", {"model": "claude-test", "max_tokens": 5, "messages": []}, user="max")
    sent = {k.lower(): v for k, v in gw.fake.requests[-1]["headers"].items()}
    assert sent["x-api-key"] == "ant-upstream-secret" and "authorization" not in sent


async def test_a_request_naming_an_upstream_url_cannot_reach_it(gw):
    await gw.grant("ned", "1")
    other = FakeUpstream()
    other_url = await other.start()
    try:
        body = {"model": "gpt-test", "messages": [], "base_url": other_url, "url": other_url}
        await post(
            gw,
            "/v1/chat/completions",
            body,
            user="ned",
            Host=other_url.split("//")[1],
            **{"X-Forwarded-Host": other_url.split("//")[1], "X-Upstream": other_url},
        )
        async with (
            aiohttp.ClientSession() as s,
            s.get(gw.base + f"/{other_url}/v1/models", headers=gw.headers("ned")) as r,
        ):
            assert r.status == 404
        assert other.requests == [] and len(gw.fake.requests) == 1
        # A redirect from the upstream is not followed.
        async with (
            aiohttp.ClientSession() as s,
            s.get(gw.base + "/v1/redirect", headers=gw.headers("ned"), allow_redirects=False) as r,
        ):
            assert r.status == 302
    finally:
        await other.stop()


async def test_flat_priced_route_charges_its_price(gw):
    await gw.grant("olga", "1")
    async with aiohttp.ClientSession() as s, s.get(gw.base + "/v1/models", headers=gw.headers("olga")) as r:
        assert r.status == 200 and r.headers["X-Credits-Charged"] == "0.500000"
    assert (await gw.balance("olga")).available == Decimal("0.5")


async def test_pricing_change_applies_at_once_on_every_process(gw, redis_url, tmp_path):
    # A second gateway process (app) on the same Redis sees the change.
    settings = Settings(
        redis_url=redis_url,
        admin_keys=ADMIN,
        client_keys=CLIENT,
        partitions=16,
        sqlite_path=str(tmp_path / "p2.db"),
        audit_path=None,
        gateway_config=gw.services.settings.gateway_config,
    )
    other = create_app(settings, run_worker=False)
    async with other.router.lifespan_context(other):
        async with aiohttp.ClientSession() as s:
            adm = {"Authorization": f"Bearer {ADMIN}"}
            async with s.get(gw.base + "/admin/pricing", headers=adm) as r:
                table = await r.json()
            table.pop("version")
            table["models"]["gpt-test"]["output"] = "3"
            async with s.put(gw.base + "/admin/pricing", json=table, headers=adm) as r:
                assert r.status == 200, await r.text()
        for _ in range(100):
            if other.state.services.pricing.table.models["gpt-test"].output == 3_000_000:
                break
            await asyncio.sleep(0.02)
        assert other.state.services.pricing.table.models["gpt-test"].output == 3_000_000
    await gw.grant("pia", "1")
    _status, h, _raw = await post(
        gw,
        "/v1/chat/completions",
        {"model": "gpt-test", "messages": []},
        user="pia",
        **{"X-Fake-Input-Tokens": "10", "X-Fake-Output-Tokens": "5"},
    )
    assert charged(h) == Decimal("0.000025")


async def test_unknown_model_is_refused(gw):
    await gw.grant("quinn", "1")
    status, _h, _raw = await post(
        gw, "/v1/chat/completions", {"model": "gpt-unpriced", "messages": []}, user="quinn"
    )
    assert status == 404 and (await gw.balance("quinn")).held == 0


async def test_hard_cap_stops_a_stream_before_it_puts_the_user_into_debt(gw):
    assert gw.services.proxy.config.hard_cap  # on by default
    await gw.grant("rex", "0.000100")  # 100 micro-credits: the hold (~70) and little beside it
    # The upstream reports far more input than the body suggests: the cost passes what the
    # user holds in all as soon as message_start arrives.
    body = {
        "model": "claude-test",
        "stream": True,
        "max_tokens": 30,
        "messages": [{"role": "user", "content": "x"}],
    }
    _status, _h, raw = await post(
        gw, "/v1/messages", body, user="rex", **{"X-Fake-Input-Tokens": "500", "X-Fake-Output-Tokens": "30"}
    )
    text = raw.decode()
    assert "stopped at the credit cap" in text
    assert text.count("text_delta") < 30 and "message_stop" not in text
    b = await gw.balance("rex")
    assert b.held == 0 and b.available == 0
    # A user with credit to spare is never cut: the overage is drawn from it.
    await gw.grant("rex-rich", "1")
    _status, _h, raw = await post(
        gw,
        "/v1/messages",
        body,
        user="rex-rich",
        **{"X-Fake-Input-Tokens": "500", "X-Fake-Output-Tokens": "30"},
    )
    assert "message_stop" in raw.decode() and ": credits charged=0.000560" in raw.decode()
    assert (await gw.balance("rex-rich")).debt == 0


async def test_redis_faults_on_the_hot_path_never_charge_twice_or_strand_a_hold(gw, monkeypatch):
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    engine = gw.services.engine
    await gw.grant("fay", "1")
    body = {"model": "gpt-test", "messages": [], "max_tokens": 10}
    fake = {"X-Fake-Input-Tokens": "10", "X-Fake-Output-Tokens": "5"}  # 10 + 5 x 2 = 20 micro-credits

    # A settle whose answer is lost is retried under the same operation id: charged once.
    real_settle = engine.settle_units
    lost = []

    async def settle_answer_lost_once(*a, **kw):
        r = await real_settle(*a, **kw)
        if not lost:
            lost.append(1)
            raise RedisTimeoutError("answer lost")
        return r

    monkeypatch.setattr(engine, "settle_units", settle_answer_lost_once)
    status, h, _ = await post(gw, "/v1/chat/completions", body, user="fay", **fake)
    assert status == 200 and charged(h) == Decimal("0.00002") and lost == [1]
    bal = await gw.balance("fay")
    assert (bal.spent, bal.held) == (Decimal("0.00002"), 0)

    # A reserve applied in Redis whose answer is lost: 503, and the hold is given back.
    monkeypatch.setattr(engine, "settle_units", real_settle)
    real_reserve = engine.reserve_units

    async def reserve_answer_lost(*a, **kw):
        await real_reserve(*a, **kw)
        raise RedisTimeoutError("answer lost")

    monkeypatch.setattr(engine, "reserve_units", reserve_answer_lost)
    status, h, raw = await post(gw, "/v1/chat/completions", body, user="fay", **fake)
    assert (
        status == 503 and json.loads(raw)["error"]["code"] == "credit_store_unavailable" and h["Retry-After"]
    )
    await gw.services.proxy.drain()
    assert (await gw.balance("fay")).held == 0

    # A settle Redis never confirms: no figure in the header rather than a wrong one.
    monkeypatch.setattr(engine, "reserve_units", real_reserve)

    async def settle_down(*a, **kw):
        raise RedisConnectionError("down")

    monkeypatch.setattr(engine, "settle_units", settle_down)
    status, h, _ = await post(gw, "/v1/chat/completions", body, user="fay", **fake)
    assert status == 200 and "X-Credits-Charged" not in h
    # Redis comes back before the hold expires: the background retry charges it, once.
    monkeypatch.setattr(engine, "settle_units", real_settle)
    await gw.services.proxy.drain()
    bal = await gw.balance("fay")
    assert (bal.spent, bal.held) == (Decimal("0.00004"), 0)


async def test_the_ledger_traces_a_charge_to_its_request_and_the_hold_outlives_the_upstream_timeout(gw):
    await gw.grant("tia", "1")
    body = {"model": "gpt-test", "messages": [], "max_tokens": 10}
    status, h, _ = await post(
        gw,
        "/v1/chat/completions",
        body,
        user="tia",
        **{"X-Fake-Input-Tokens": "7", "X-Fake-Output-Tokens": "3"},
    )
    assert status == 200
    rid = h["X-Request-Id"]
    await Worker(gw.services.engine, gw.services.store).run(burst=True)
    entries = {e.type: e for e in await gw.services.store.ledger("tia", limit=10)}
    opened, settled = entries["hold_open"], entries["hold_settled"]
    assert opened.hold_id == settled.hold_id == rid
    # The hold's timeout covers the upstream timeout (2 s here) plus the margin (5 s).
    hold = opened.event["h"]
    assert int(hold["exp"]) - int(hold["at"]) == (2 + 5) * 1000
    x = settled.event["x"]
    assert x["request_id"] == rid and x["model"] == "gpt-test" and x["usage"]["output"] == 3
    assert Decimal(settled.amount) / 1_000_000 == charged(h)


async def test_usage_missing_is_counted_with_the_models_tokenizer(redis, redis_url, tmp_path):
    from gateway.proxy.tokens import TokenCounter

    fake = FakeUpstream()
    url = await fake.start()
    counter = TokenCounter()
    messages = [{"role": "user", "content": "This late pivot means we don't have time to boil the ocean."}]
    prompt = counter.count_prompt("/v1/chat/completions", {"model": "gpt-4o", "messages": messages})
    try:
        async with running_gateway(redis_url, tmp_path, KNOWN_MODELS.format(url=url), fake=fake) as gw:
            # A stream cut before its usage: the prompt and the streamed text counted exactly.
            await gw.grant("cut", "1")
            body = {"model": "gpt-4o", "stream": True, "max_tokens": 100, "messages": messages}
            status, h, raw = await post(
                gw,
                "/v1/chat/completions",
                body,
                user="cut",
                **{"X-Fake-Output-Tokens": "50", "X-Fake-Fail-After": "6"},
            )
            assert b"broke off" in raw
            b = await gw.balance("cut")
            assert b.held == 0
            assert 1_000_000 - b.available_units == prompt + 2 * counter.count_text("gpt-4o", "tok " * 6)
            # A whole answer without usage: its text counted.
            await gw.grant("whole", "1")
            await post(
                gw,
                "/v1/chat/completions",
                {"model": "gpt-4o", "messages": messages, "max_tokens": 7},
                user="whole",
                **{"X-Fake-No-Usage": "1"},
            )
            b = await gw.balance("whole")
            assert 1_000_000 - b.available_units == prompt + 2 * counter.count_text("gpt-4o", "tok " * 7)
            # Embeddings without usage: the input counted, text and token arrays alike.
            await gw.grant("emb", "1")
            status, h, raw = await post(
                gw,
                "/v1/embeddings",
                {"model": "text-embedding-3-small", "input": ["hello world", [1, 2, 3]]},
                user="emb",
                **{"X-Fake-No-Usage": "1"},
            )
            assert status == 200 and charged(h) == Decimal("0.000005")
    finally:
        await fake.stop()


async def test_a_full_backlog_refuses_new_holds_with_503(gw):
    await gw.grant("blg", "1")  # one event in the partition's stream, which no worker drains here
    gw.services.engine.max_backlog = 1
    body = {"model": "gpt-test", "messages": [], "max_tokens": 10}
    status, h, raw = await post(gw, "/v1/chat/completions", body, user="blg")
    assert status == 503 and json.loads(raw)["error"]["code"] == "backlog_full" and h["Retry-After"]
    assert gw.fake.requests == [] and (await gw.balance("blg")).held == 0


async def test_a_client_closing_at_done_does_not_cancel_the_streams_settle(gw, monkeypatch):
    engine = gw.services.engine
    await gw.grant("zed", "1")
    real = engine.settle_units

    async def slow_settle(*a, **kw):  # a Redis round trip that takes a moment (or a tokenizer load)
        await asyncio.sleep(0.3)
        return await real(*a, **kw)

    monkeypatch.setattr(engine, "settle_units", slow_settle)
    body = {
        "model": "gpt-test",
        "stream": True,
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "x"}],
    }
    headers = gw.headers("zed", **{"X-Fake-Input-Tokens": "10", "X-Fake-Output-Tokens": "5"})
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.base + "/v1/chat/completions", json=body, headers=headers) as r,
    ):
        seen = b""
        async for chunk in r.content.iter_any():
            seen += chunk
            if b"[DONE]" in seen:
                break  # what SDKs do: stop at [DONE] and close
    await gw.services.proxy.drain()
    b = await gw.balance("zed")
    assert b.held == 0 and b.spent == Decimal("0.00002")


async def test_pricing_can_be_put_back_as_read_and_is_never_emptied_or_overwritten_blindly(gw):
    adm = {"Authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession() as s, s.get(gw.base + "/admin/pricing", headers=adm) as r:
        table = await r.json()
        async with s.put(
            gw.base + "/admin/pricing", json=table, headers=adm
        ) as r:  # as read, version and all
            assert r.status == 200, await r.text()
            assert (await r.json())["version"] > table["version"]
        async with s.put(
            gw.base + "/admin/pricing", json=table, headers=adm
        ) as r:  # made from an old version
            assert r.status == 409 and (await r.json())["error"]["code"] == "version_conflict"
        async with s.put(gw.base + "/admin/pricing", json={}, headers=adm) as r:
            assert r.status == 422 and (await r.json())["error"]["code"] == "invalid_pricing"


async def test_flat_priced_route_refuses_an_account_in_debt_as_the_metered_route_does(gw):
    # An account owing credits: no new hold on any route, and the same answer on both.
    await gw.services.engine.debit("pat", "0.000001", op_id="pat-debt", allow_debt=True)
    assert (await gw.balance("pat")).debt > 0
    body = {"model": "gpt-test", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}
    status, _h, raw = await post(gw, "/v1/chat/completions", body, user="pat")
    metered = json.loads(raw)["error"]
    async with aiohttp.ClientSession() as s, s.get(gw.base + "/v1/models", headers=gw.headers("pat")) as r:
        flat_status, flat = r.status, (await r.json())["error"]
    assert (status, metered["code"]) == (402, "in_debt")
    assert (flat_status, flat["code"]) == (402, "in_debt")
    assert flat == metered
    assert gw.fake.requests == []  # neither reached the upstream
