"""A plan's allowed models at the metering proxy: a model outside the plan is refused with
403 in the upstream's own error format, before any credit is held; the plan's models are
allowed as before."""

from __future__ import annotations

import json

from tests.support.proxy_fixtures import post


async def _subscribe(gw, user: str, models: list[str]) -> None:
    subs = gw.services.subscriptions
    plan = await subs.plans.create(
        {"name": "Small", "credits": "5", "period": "monthly", "allowed_models": models}
    )
    await subs.subscribe(user, {"plan_id": plan.plan_id})


async def test_a_model_outside_the_plan_is_refused_in_the_upstream_s_format(gw):
    await _subscribe(gw, "pat", ["gpt-test"])
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    status, _, raw = await post(gw, "/v1/chat/completions", {"model": "gpt-test", **chat}, user="pat")
    assert status == 200, raw
    before = await gw.balance("pat")
    status, headers, raw = await post(gw, "/v1/messages", {"model": "claude-test", **chat}, user="pat")
    body = json.loads(raw)
    assert status == 403, raw
    assert (body["type"], body["error"]["type"], body["error"]["code"]) == (
        "error", "permission_error", "model_not_allowed"
    )  # fmt: skip
    assert "claude-test" in body["error"]["message"] and headers["X-Request-Id"]
    status, _, raw = await post(gw, "/v1/embeddings", {"model": "embed-test", "input": "hi"}, user="pat")
    assert status == 403 and json.loads(raw)["error"]["type"] == "permission_error"
    after = await gw.balance("pat")
    assert (after.available, after.held) == (before.available, 0)  # nothing held, nothing charged
    # The upstream never saw the refused calls.
    assert [r["path"] for r in gw.fake.requests] == ["/v1/chat/completions"]
