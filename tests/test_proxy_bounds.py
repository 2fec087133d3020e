"""The hold bounds what the upstream may produce: attacks on the worst case.

Each case funds a user with little credit and sends what an attacker would (many choices,
no cap, two caps, malformed caps, absurd usage). The fake upstream obeys the cap it is sent,
in the field its route reads, and bills every choice it generates; it reports as many input
tokens as the gateway estimated or fewer, so the documented overage bound (the cost of input
tokens beyond the estimate) is zero here: the user must never end in debt.
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import aiohttp
import pytest

from gateway.core.money import MAX_UNITS
from gateway.devtools.mock_upstream import MockUpstream as FakeUpstream
from tests.support.proxy_fixtures import charged, post, running_gateway

LOW_INPUT = {"X-Fake-Input-Tokens": "5"}  # at most the estimate of any body below
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def gw(redis, redis_url, tmp_path):
    async with running_gateway(redis_url, tmp_path) as g:
        yield g


def sent(gw) -> dict:
    return json.loads(gw.fake.requests[-1]["body"])


async def assert_no_debt(gw, user: str, funded: str) -> None:
    b = await gw.balance(user)
    assert b.debt == 0 and b.held == 0, b
    assert b.spent <= Decimal(funded)


async def test_n_choices_are_part_of_the_worst_case(gw):
    await gw.grant("n1", "0.000300")  # 300 micro-credits; output costs 2 a token
    body = {"model": "gpt-test", "messages": MSG, "max_tokens": 100, "n": 2}
    status, _h, raw = await post(
        gw, "/v1/chat/completions", body, user="n1", **LOW_INPUT, **{"X-Fake-Output-Tokens": "100"}
    )
    assert status == 200, raw
    # Two choices must fit: the cap per choice is lowered so that both are paid for.
    assert sent(gw)["max_tokens"] * 2 * 2 <= 300 and "max_completion_tokens" not in sent(gw)
    await assert_no_debt(gw, "n1", "0.0003")
    # 128 choices cannot be afforded at the minimum output each: refused, nothing held.
    status, _h, raw = await post(gw, "/v1/chat/completions", {**body, "n": 128}, user="n1", **LOW_INPUT)
    assert status == 402 and json.loads(raw)["error"]["code"] == "insufficient_credits"
    await assert_no_debt(gw, "n1", "0.0003")


async def test_best_of_is_part_of_the_worst_case(gw):
    await gw.grant("bo", "0.000300")
    body = {"model": "gpt-test", "prompt": "x", "max_tokens": 100, "n": 1, "best_of": 3}
    status, _h, raw = await post(
        gw, "/v1/completions", body, user="bo", **LOW_INPUT, **{"X-Fake-Output-Tokens": "100"}
    )
    assert status == 200, raw
    assert sent(gw)["max_tokens"] * 3 * 2 <= 300
    await assert_no_debt(gw, "bo", "0.0003")


async def test_a_request_without_a_cap_is_sent_the_cap_its_hold_paid_for(gw):
    await gw.grant("nc", "0.000150")
    body = {"model": "gpt-test", "messages": MSG}  # no cap: the upstream would write 5,000 tokens
    status, _h, raw = await post(
        gw, "/v1/chat/completions", body, user="nc", **LOW_INPUT, **{"X-Fake-Output-Tokens": "5000"}
    )
    assert status == 200, raw
    forwarded = sent(gw)
    assert "max_tokens" not in forwarded  # OpenAI refuses both fields, and max_tokens on o-series
    assert 4 <= forwarded["max_completion_tokens"] <= 100  # the price's cap, clamped to the credit
    await assert_no_debt(gw, "nc", "0.00015")
    # Anthropic and the Responses API get their own field.
    await gw.grant("nc2", "1")
    await post(gw, "/v1/responses", {"model": "gpt-test", "input": "x"}, user="nc2", **LOW_INPUT)
    assert sent(gw)["max_output_tokens"] == 100


async def test_many_uncapped_requests_at_once_never_leave_debt(gw):
    await gw.grant("burst", "0.001")  # 1,000 micro-credits
    body = {"model": "gpt-test", "messages": MSG}
    results = await asyncio.gather(
        *(
            post(
                gw,
                "/v1/chat/completions",
                body,
                user="burst",
                **LOW_INPUT,
                **{"X-Fake-Output-Tokens": "5000"},
            )
            for _ in range(20)
        )
    )
    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 402} and 200 in statuses
    total = sum(charged(h) for s, h, _ in results if s == 200)
    b = await gw.balance("burst")
    assert b.debt == 0 and b.held == 0 and total + b.available == Decimal("0.001")


@pytest.mark.parametrize(
    ("path", "field", "body"),
    [
        ("/v1/chat/completions", "max_tokens", {"messages": MSG}),
        ("/v1/chat/completions", "max_completion_tokens", {"messages": MSG}),
        ("/v1/chat/completions", "n", {"messages": MSG}),
        ("/v1/completions", "best_of", {"prompt": "x"}),
        ("/v1/responses", "max_output_tokens", {"input": "x"}),
        ("/v1/messages", "max_tokens", {"messages": MSG}),
    ],
)
@pytest.mark.parametrize("value", [-5, 0, "5000", 5000.0, True, [1]])
async def test_malformed_caps_and_multipliers_are_refused_in_the_upstreams_format(
    gw, path, field, body, value
):
    await gw.grant("bad", "1")
    model = "claude-test" if path == "/v1/messages" else "gpt-test"
    status, _h, raw = await post(gw, path, {"model": model, **body, field: value}, user="bad")
    assert status == 400, raw
    err = json.loads(raw)
    if path == "/v1/messages":
        assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    else:
        assert err["error"]["type"] == "invalid_request_error" and err["error"]["code"] == "invalid_request"
    assert field in err["error"]["message"]
    assert gw.fake.requests == [] and (await gw.balance("bad")).held == 0


async def test_two_cap_fields_are_sent_consistent(gw):
    await gw.grant("two", "1")
    body = {"model": "gpt-test", "messages": MSG, "max_tokens": 20, "max_completion_tokens": 5000}
    status, h, raw = await post(
        gw, "/v1/chat/completions", body, user="two", **LOW_INPUT, **{"X-Fake-Output-Tokens": "5000"}
    )
    assert status == 200, raw
    assert sent(gw)["max_tokens"] == sent(gw)["max_completion_tokens"] == 20
    assert charged(h) <= Decimal("0.000045")  # 5 input + 20 output x 2
    await assert_no_debt(gw, "two", "1")
    # The float form of the same attack is malformed.
    status, _, _ = await post(
        gw, "/v1/chat/completions", {**body, "max_completion_tokens": 5000.0}, user="two"
    )
    assert status == 400


@pytest.mark.parametrize("cap", [2**63 - 1, 2**64, 10**30])
async def test_a_huge_cap_is_clamped_not_refused(gw, cap):
    await gw.grant("huge", "0.000100")
    body = {"model": "gpt-test", "messages": MSG, "max_tokens": cap}
    status, _h, raw = await post(gw, "/v1/chat/completions", body, user="huge", **LOW_INPUT)
    assert status == 200, raw
    assert 4 <= sent(gw)["max_tokens"] <= 50
    await assert_no_debt(gw, "huge", "0.0001")


async def test_absurd_usage_is_charged_as_overage_never_dropped(gw):
    await gw.grant("abs", "1")
    body = {"model": "gpt-test", "messages": MSG, "max_tokens": 10}
    status, h, raw = await post(
        gw, "/v1/chat/completions", body, user="abs", **{"X-Fake-Input-Tokens": str(10**16)}
    )
    assert status == 200, raw
    b = await gw.balance("abs")
    # As much as one operation can carry is charged: the credit, then the rest as debt.
    assert b.held == 0 and b.available == 0 and b.spent == 1
    assert b.debt_units == MAX_UNITS - 1_000_000
    assert charged(h) * 1_000_000 == MAX_UNITS


async def test_embeddings_hold_their_whole_input_token_arrays_counted_exactly(gw):
    await gw.grant("emb", "0.004")  # 4,000 micro-credits at 1 a token
    tokens = [0] * 5000  # 2 bytes a token in JSON: a size estimate would say 2,500
    body = {"model": "embed-test", "input": tokens}
    status, h, raw = await post(gw, "/v1/embeddings", body, user="emb", **{"X-Fake-Input-Tokens": "5000"})
    assert status == 402, raw
    assert gw.fake.requests == []
    batch = {"model": "embed-test", "input": [[0] * 1000, [0] * 1000]}
    status, h, raw = await post(gw, "/v1/embeddings", batch, user="emb", **{"X-Fake-Input-Tokens": "2000"})
    assert status == 200 and charged(h) == Decimal("0.002")
    await assert_no_debt(gw, "emb", "0.004")


async def test_upstream_timeout_says_nothing_was_charged(gw):
    await gw.grant("late", "1")
    body = {"model": "gpt-test", "messages": MSG}
    status, h, _raw = await post(
        gw, "/v1/chat/completions", body, user="late", **{"X-Fake-Latency-Ms": "3000"}
    )
    assert status == 504 and h["X-Credits-Charged"] == "0"
    assert (await gw.balance("late")).available == 1


async def test_only_allowed_client_headers_reach_the_upstream_and_configured_ones_win(gw):
    await gw.grant("hdr", "1")
    leaky = {
        "OpenAI-Organization": "org-other",
        "OpenAI-Project": "proj-x",
        "X-Forwarded-For": "10.0.0.1",
        "User-Agent": "client-app/1.0",
        "Anthropic-Beta": "context-1m-2025-08-07",
        "Anthropic-Version": "2099-01-01",
        "OpenAI-Beta": "assistants=v2",
    }
    await post(gw, "/v1/chat/completions", {"model": "gpt-test", "messages": MSG}, user="hdr", **leaky)
    got = {k.lower(): v for k, v in gw.fake.requests[-1]["headers"].items()}
    for name in (
        "openai-organization",
        "openai-project",
        "x-forwarded-for",
        "anthropic-beta",
        "anthropic-version",
    ):
        assert name not in got, name
    assert got.get("user-agent", "").startswith("client-app") is False
    assert got["openai-beta"] == "assistants=v2"
    await post(
        gw, "/v1/messages", {"model": "claude-test", "max_tokens": 5, "messages": MSG}, user="hdr", **leaky
    )
    got = {k.lower(): v for k, v in gw.fake.requests[-1]["headers"].items()}
    assert got["anthropic-version"] == "2023-06-01" and "anthropic-beta" not in got


async def test_clear_refusals_for_a_missing_model_and_unserved_paths(gw):
    await gw.grant("err", "1")
    status, _h, raw = await post(gw, "/v1/chat/completions", {"messages": MSG}, user="err")
    assert status == 400 and "model" in json.loads(raw)["error"]["message"]
    assert "None" not in json.loads(raw)["error"]["message"]
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base + "/v1/images/generations", json={}, headers=gw.headers("err")) as r:
            err = await r.json()
            assert r.status == 404 and err["error"]["code"] == "route_not_served" and "type" in err["error"]
        async with s.get(gw.base + "/v1/chat/completions", headers=gw.headers("err")) as r:
            err = await r.json()
            assert r.status == 405 and err["error"]["type"] == "invalid_request_error"
        async with s.get(gw.base + "/v1/messages/batches", headers=gw.headers("err")) as r:
            assert r.status == 404 and (await r.json())["type"] == "error"


@pytest.mark.parametrize(
    "usage",
    [
        {},
        {"prompt_tokens": 5},
        {"prompt_tokens": 5, "completion_tokens": "9999999"},
        {"prompt_tokens": -5, "completion_tokens": 10},
        {"prompt_tokens": 5, "completion_tokens": 2.5},
        {"prompt_tokens": float("inf"), "completion_tokens": 3},
        {"prompt_tokens": 5, "completion_tokens": True},
    ],
)
def test_usage_that_is_not_counts_is_treated_as_missing_and_counted(usage):
    from gateway.proxy.kinds import adapter
    from gateway.proxy.kinds.openai import from_openai_usage

    assert from_openai_usage(usage) is None
    assert adapter("openai").usage_of("/v1/chat/completions", {"usage": usage}) is None
    meter = adapter("openai").stream_meter()
    meter.feed(json.dumps({"choices": [], "usage": usage}))
    assert meter.usage is None and not meter.final


def test_well_formed_usage_is_read_as_is():
    from gateway.proxy.kinds import adapter

    openai = adapter("openai")
    u = openai.usage_of("/v1/chat/completions", {"usage": {"prompt_tokens": 5, "completion_tokens": 7.0}})
    assert (u.input, u.output) == (5, 7)
    embedded = openai.usage_of("/v1/embeddings", {"usage": {"prompt_tokens": 5, "total_tokens": 5}})
    assert embedded.input == 5
    meter = adapter("anthropic").stream_meter()
    meter.feed('{"type":"message_start","message":{"usage":{"input_tokens":9,"output_tokens":1}}}')
    meter.feed('{"type":"message_delta","usage":{"output_tokens":"lots"}}')  # malformed: counted instead
    assert meter.usage is None and not meter.final


async def test_an_answer_whose_usage_is_not_counts_is_charged_by_counting(gw):
    await gw.grant("mal", "1")
    body = {"model": "gpt-test", "messages": MSG, "max_tokens": 50}
    for usage in (
        "%7B%7D",
        "%7B%22prompt_tokens%22%3A5%2C%22completion_tokens%22%3A%2299%22%7D",
    ):  # {}, a string
        status, h, _raw = await post(
            gw,
            "/v1/chat/completions",
            body,
            user="mal",
            **{"X-Fake-Output-Tokens": "40", "X-Fake-Usage": usage},
        )
        assert status == 200
        assert charged(h) >= Decimal("0.00008")  # the 40 output tokens at 2, counted from the text


def test_the_hard_cap_computes_the_cost_only_when_it_could_have_passed_the_budget():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from gateway.core.pricing import ModelPrice, Usage
    from gateway.proxy.call import Call
    from gateway.proxy.credit_cap import CreditCap, usage_so_far
    from gateway.proxy.kinds import adapter
    from gateway.proxy.worst_case import OutputPlan

    @settings(max_examples=300, deadline=None)
    @given(
        pin=st.integers(0, 5_000_000),
        pout=st.integers(0, 20_000_000),
        fee=st.integers(0, 5000),
        est=st.integers(0, 3000),
        budget=st.integers(0, 200_000),
        cpt=st.integers(1, 6),
        deltas=st.lists(st.integers(1, 40), max_size=60),
        start_in=st.none() | st.integers(0, 5000),
    )
    def check(pin, pout, fee, est, budget, cpt, deltas, start_in):
        price = ModelPrice(pin, pout, pin // 2, fee)
        call = Call(
            "r",
            "u",
            adapter("anthropic"),
            "/v1/messages",
            "m",
            price,
            None,
            {},
            est,
            OutputPlan(None),
            100,
            budget_units=budget,
        )
        meter = adapter("anthropic").stream_meter()
        if start_in is not None:  # the real prompt, reported at the start
            meter.feed(
                f'{{"type":"message_start","message":{{"usage":{{"input_tokens":{start_in},"output_tokens":1}}}}}}'
            )
        cap = CreditCap(call, meter, cpt)
        for i, n in enumerate(deltas):
            text = (
                "x" * n if i % 3 else "\u00e9\ud83d\ude00" * (n // 4 + 1)
            )  # ASCII, and text dense in tokens
            meter.feed(f'{{"type":"content_block_delta","delta":{{"type":"text_delta","text":"{text}"}}}}')
            exact = price.cost(usage_so_far(call, meter, cpt)) > budget
            assert cap.passed(meter) == exact
            if exact:
                break

    check()
    assert ModelPrice(2_000_000, 3_000_000, 1_000_000, 7).output_tokens_within(7 + 20, Usage(input=5)) == 3


async def test_a_users_own_key_cannot_resolve_the_hold_of_its_proxied_call(gw):
    # The proxy's hold id is the X-Request-Id the client sees before the body; were the
    # holds API to release or settle it mid-stream, the stream would run on free.
    await gw.grant("thief", "1")
    key = (await gw.services.api_keys.issue("thief")).token
    h = {"Authorization": f"Bearer {key}"}
    body = {"model": "gpt-test", "stream": True, "max_tokens": 50, "messages": MSG}
    async with aiohttp.ClientSession() as s:
        async with s.post(
            gw.base + "/v1/chat/completions",
            json=body,
            headers={
                **h,
                "X-Fake-Output-Tokens": "40",
                "X-Fake-Chunk-Delay-Ms": "20",
                "X-Fake-Input-Tokens": "5",
            },
        ) as r:
            rid = r.headers["X-Request-Id"]
            for action, payload in (("release", None), ("settle", {"amount": "0"})):
                async with s.post(f"{gw.base}/credits/holds/{rid}/{action}", json=payload, headers=h) as a:
                    assert a.status == 404 and (await a.json())["error"]["code"] == "hold_not_found"
            text = (await r.read()).decode()
        # Nor can the namespace be taken: a hold of the caller's own named like the proxy's.
        async with s.post(
            gw.base + "/credits/holds", json={"amount": "0.1", "hold_id": "req_x"}, headers=h
        ) as a:
            assert a.status == 422 and (await a.json())["error"]["code"] == "invalid_id"
    assert ": credits charged=0.000085" in text  # 5 input + 40 output x 2
    b = await gw.balance("thief")
    assert b.spent == Decimal("0.000085") and b.held == 0


IGNORING = {"X-Fake-Ignore-Cap": "1", "X-Fake-Input-Tokens": "5", "X-Fake-Chunk-Delay-Ms": "2"}


async def test_concurrent_streams_from_an_upstream_ignoring_its_cap_cannot_spend_the_same_credit(gw):
    # Each stream holds what it may spend: passing it, it must hold more of the free credit
    # (atomically), not count what was free when it started, which its neighbours count too.
    await gw.grant("many", "0.000300")
    body = {"model": "gpt-test", "stream": True, "max_tokens": 20, "messages": MSG}
    results = await asyncio.gather(
        *(
            post(gw, "/v1/chat/completions", body, user="many", **IGNORING, **{"X-Fake-Output-Tokens": "200"})
            for _ in range(20)
        )
    )
    assert {s for s, _, _ in results} <= {200, 402}
    assert any(b"stopped at the credit cap" in raw for _, _, raw in results)
    b = await gw.balance("many")
    assert b.held == 0 and b.available == 0
    # At most the one event (a token: 2 micro-credits) that crossed the line, per stream cut.
    assert b.debt_units <= 2 * sum(b"stopped at the credit cap" in raw for _, _, raw in results)


async def test_a_stream_past_its_hold_holds_more_of_a_users_credit_and_is_charged_in_full(gw):
    await gw.grant("rich", "1")
    body = {"model": "gpt-test", "stream": True, "max_tokens": 20, "messages": MSG}
    _status, _h, raw = await post(
        gw, "/v1/chat/completions", body, user="rich", **IGNORING, **{"X-Fake-Output-Tokens": "60"}
    )
    text = raw.decode()
    assert "stopped at the credit cap" not in text and "[DONE]" in text
    assert ": credits charged=0.000125" in text  # 5 input + 60 output x 2: the usage, all of it
    b = await gw.balance("rich")
    assert (b.spent, b.held, b.debt) == (Decimal("0.000125"), 0, 0)
    # A runaway is cut after a bounded number of extensions, charged what it streamed.
    _status, _h, raw = await post(
        gw, "/v1/chat/completions", body, user="rich", **IGNORING, **{"X-Fake-Output-Tokens": "5000"}
    )
    assert b"stopped at the credit cap" in raw
    b2 = await gw.balance("rich")
    assert b2.held == 0 and b2.debt == 0 and b2.spent - b.spent < Decimal("0.001")


async def test_a_streams_final_usage_past_its_hold_is_delivered_whole_and_charged_as_overage(gw):
    # The upstream's total arrives when generation is over: nothing is left to stop, so the
    # stream is neither cut nor extended there; the settle charges it (overage as debt).
    await gw.grant("tight", "0.000100")
    body = {"model": "gpt-test", "stream": True, "max_tokens": 20, "messages": MSG}
    status, _h, raw = await post(
        gw, "/v1/chat/completions", body, user="tight", **{"X-Fake-Input-Tokens": "500"}
    )
    text = raw.decode()
    assert status == 200
    assert "stopped at the credit cap" not in text and "[DONE]" in text
    assert ": credits charged=0.000520" in text  # 500 input + 10 output x 2
    b = await gw.balance("tight")
    # Spent is what the balance paid; the rest of the charge is debt.
    assert (b.spent, b.held, b.debt, b.available) == (Decimal("0.000100"), 0, Decimal("0.000420"), 0)


async def test_text_dense_in_tokens_cannot_slip_under_the_hard_cap(redis, redis_url, tmp_path):
    from tests.support.proxy_fixtures import KNOWN_MODELS

    fake = FakeUpstream()
    url = await fake.start()
    try:
        async with running_gateway(redis_url, tmp_path, KNOWN_MODELS.format(url=url), fake=fake) as g:
            await g.grant("emoji", "0.000100")
            body = {"model": "gpt-4o", "stream": True, "max_tokens": 20, "messages": MSG}
            _status, _h, raw = await post(
                g,
                "/v1/chat/completions",
                body,
                user="emoji",
                **IGNORING,
                **{"X-Fake-Output-Tokens": "500", "X-Fake-Token-Text": "%F0%9F%98%80%F0%9F%A6%8A"},
            )
            assert b"stopped at the credit cap" in raw
            b = await g.balance("emoji")
            # Settled on the tokens counted with gpt-4o's tokenizer: within the one event that crossed.
            assert b.held == 0 and b.debt_units <= 2 * 8
    finally:
        await fake.stop()


async def test_the_upstreams_own_request_id_and_account_do_not_shadow_the_gateways(gw):
    await gw.grant("hdr2", "1")
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw.base + "/v1/chat/completions",
            json={"model": "gpt-test", "messages": MSG},
            headers=gw.headers("hdr2"),
        ) as r,
    ):
        assert r.status == 200
        assert len(r.headers.getall("X-Request-Id")) == 1 and r.headers["X-Request-Id"].startswith("req_")
        assert not r.headers["X-Request-Id"].startswith("req_mock")
        assert r.headers["x-upstream-request-id"].startswith("req_mock")
        assert "openai-organization" not in r.headers
        assert len(r.headers.getall("X-Credits-Charged")) == 1


async def test_a_partition_being_rebuilt_answers_503_state_lost_as_the_api_does(gw):
    await gw.grant("lostp", "1")
    keys = gw.services.engine.keys
    await gw.services.redis.delete(keys.partition(keys.partition_of("lostp")).ready)
    status, h, raw = await post(
        gw, "/v1/chat/completions", {"model": "gpt-test", "messages": MSG}, user="lostp"
    )
    assert status == 503 and json.loads(raw)["error"]["code"] == "state_lost" and h["Retry-After"]


@pytest.mark.parametrize(
    ("path", "model", "body", "read"),
    [
        (
            "/v1/completions",
            "gpt-test",
            {"prompt": "x", "max_completion_tokens": 100000},
            "max_completion_tokens",
        ),
        (
            "/v1/messages",
            "claude-test",
            {"messages": MSG, "max_tokens": 10, "max_completion_tokens": 100000},
            "max_completion_tokens",
        ),
        ("/v1/responses", "gpt-test", {"input": "x", "max_tokens": 100000}, "max_tokens"),
        ("/v1/responses", "gpt-test", {"input": "x", "n": 50}, "max_output_tokens"),
        ("/v1/messages", "claude-test", {"messages": MSG, "max_tokens": 10, "n": 50}, "max_tokens"),
    ],
)
async def test_another_routes_cap_or_multiplier_is_counted_and_capped_too(gw, path, model, body, read):
    # A loosely compatible server that reads the other route's field (or n anywhere).
    await gw.grant("loose", "0.001")
    status, _h, raw = await post(
        gw,
        path,
        {"model": model, **body},
        user="loose",
        **LOW_INPUT,
        **{"X-Fake-Cap-Field": read, "X-Fake-Output-Tokens": "100000"},
    )
    assert status == 200, raw  # served, with that field capped too
    assert sent(gw)[read] <= 500
    await assert_no_debt(gw, "loose", "0.001")


@pytest.mark.parametrize(
    ("path", "model", "extra", "feature"),
    [
        ("/v1/chat/completions", "gpt-test", {"messages": MSG, "service_tier": "priority"}, "service_tier"),
        ("/v1/chat/completions", "gpt-test", {"messages": MSG, "web_search_options": {}}, "web_search"),
        ("/v1/chat/completions", "gpt-test", {"messages": MSG, "modalities": ["text", "audio"]}, "audio"),
        (
            "/v1/responses",
            "gpt-test",
            {"input": "x", "tools": [{"type": "web_search_preview"}]},
            "web_search",
        ),
        (
            "/v1/responses",
            "gpt-test",
            {"input": "x", "tools": [{"type": "code_interpreter"}]},
            "code_interpreter",
        ),
        ("/v1/responses", "gpt-test", {"input": "x", "background": True}, "background"),
        ("/v1/responses", "gpt-test", {"input": "x", "previous_response_id": "resp_1"}, "stored_context"),
        (
            "/v1/messages",
            "claude-test",
            {
                "messages": MSG,
                "max_tokens": 5,
                "tools": [{"type": "web_search_20250305", "name": "web_search"}],
            },
            "web_search",
        ),
    ],
)
async def test_features_billed_beyond_tokens_are_refused_unless_allowed(gw, path, model, extra, feature):
    await gw.grant("feat", "1")
    status, _h, raw = await post(gw, path, {"model": model, **extra}, user="feat")
    assert status == 400, raw
    err = json.loads(raw)["error"]
    assert err["code"] == "feature_not_allowed" and err["features"] == [feature]
    assert gw.fake.requests == []


async def test_plain_tools_and_an_allowed_feature_pass(gw):
    from dataclasses import replace

    await gw.grant("feat2", "1")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    status, _, raw = await post(
        gw, "/v1/chat/completions", {"model": "gpt-test", "messages": MSG, "tools": tools}, user="feat2"
    )
    assert status == 200, raw
    cfg = gw.services.proxy.config
    gw.services.proxy.config = replace(
        cfg, upstreams=tuple(replace(u, allow_features=frozenset({"service_tier"})) for u in cfg.upstreams)
    )
    status, _, raw = await post(
        gw,
        "/v1/chat/completions",
        {"model": "gpt-test", "messages": MSG, "service_tier": "flex"},
        user="feat2",
    )
    assert status == 200, raw
