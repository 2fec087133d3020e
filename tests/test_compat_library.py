"""credit-management's library names (gateway/library/compat.py) against a real redis-server:
its example app runs with only its import lines changed, X-Estimated-Tokens sizes the hold,
a refusal has the old body, X-Credits-Deducted carries the charge, a float cost is refused."""

from __future__ import annotations

import importlib
import sys
from decimal import Decimal

import httpx
import pytest
from fastapi import FastAPI

from gateway.library.compat import CreditMiddleware, UsageError, addLlmUsage
from tests.test_library import events_of, lifespan_of


@pytest.fixture
def example(redis, redis_url, tmp_path, monkeypatch):
    monkeypatch.setenv("CREDIT_REDIS_URL", redis_url)
    monkeypatch.setenv("CREDIT_SQLITE_PATH", str(tmp_path / "example.db"))
    monkeypatch.setenv("CREDIT_AUDIT_PATH", "")
    sys.modules.pop("examples.credit_management_app", None)
    module = importlib.import_module("examples.credit_management_app")
    yield module
    sys.modules.pop("examples.credit_management_app", None)


async def test_the_old_readme_app_is_charged_what_it_recorded(example):
    app, credits = example.app, example.credits
    async with (
        lifespan_of(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as c,
    ):
        engine = credits()
        await engine.grant("ravi", "2", op_id="g-ravi")
        r = await c.post("/api/chat", json={"message": "hi"}, headers={"X-User-Id": "ravi"})
        assert r.status_code == 200, r.text
        assert r.headers["x-credits-deducted"] == r.headers["x-credits-charged"] == "0.004200"
        assert (await engine.balance("ravi")).available == Decimal("1.9958")
        settled = [e for e in await events_of(engine, "ravi") if e["t"] == "hold_settled"]
        # The call's provider and metadata are kept with the settle, for the ledger.
        (call,) = settled[0]["x"]["calls"]
        assert (call["model"], call["metadata"]) == ("gpt-4o-mini", {"provider": "openai", "feature": "chat"})
        # The hold is 1,000 tokens at 1 credit per 1k by default: 1 credit. Too much for "poor".
        await engine.grant("poor", "0.5", op_id="g-poor")
        short = await c.post("/api/chat", json={}, headers={"X-User-Id": "poor"})
        assert short.status_code == 402
        body = short.json()
        assert (body["code"], body["error"]["code"]) == ("INSUFFICIENT_CREDITS", "insufficient_credits")
        assert body["detail"] and body["error"]["available"] == "0.500000"
        # X-Estimated-Tokens sizes the hold: 100 tokens hold 0.1 credit, which it can cover.
        ok = await c.post("/api/chat", json={}, headers={"X-User-Id": "poor", "X-Estimated-Tokens": "100"})
        assert ok.status_code == 200 and ok.headers["x-credits-deducted"] == "0.004200"
        bad = await c.post("/api/chat", json={}, headers={"X-User-Id": "poor", "X-Estimated-Tokens": "1.5"})
        assert bad.status_code == 400 and "X-Estimated-Tokens" in bad.json()["detail"]
        # Skipped and outside the prefix: not metered (no user needed).
        assert (await c.get("/api/health")).status_code == 200
        assert (await c.get("/docs")).status_code == 200
        nouser = await c.post("/api/chat", json={})
        assert (nouser.status_code, nouser.json()["code"]) == (401, "MISSING_USER")


async def test_a_float_cost_is_refused_at_the_call_and_an_app_error_is_not_rewritten(engine):
    app = FastAPI()
    app.add_middleware(CreditMiddleware, engine=engine, path_prefix="/", skip_paths=[])
    seen: list[str] = []

    @app.post("/float")
    async def with_float():
        try:
            addLlmUsage(model="m", cost=0.1)
        except UsageError as exc:
            seen.append(str(exc))
        await addLlmUsage(model="m", cost="0.25")  # awaiting it is fine too
        return {"ok": True}

    @app.post("/own-402")
    async def own_402():
        from fastapi.responses import JSONResponse

        return JSONResponse({"mine": True}, status_code=402)

    await engine.grant("u", "5", op_id="g-u")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as c:
        r = await c.post("/float", headers={"X-User-Id": "u"})
        assert r.status_code == 200 and r.headers["x-credits-deducted"] == "0.250000"
        assert "float" in seen[0] and "'0.1'" in seen[0]
        own = await c.post("/own-402", headers={"X-User-Id": "u"})
        assert own.status_code == 402 and own.json() == {"mine": True}
    assert (await engine.balance("u")).available == Decimal("4.75")
