"""Library mode: usage recorded inside a FastAPI handler is charged (it never was in the
seed project), from the handler and from tasks it spawns; a short account gets 402."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import httpx
import pytest
from fastapi import FastAPI

from gateway.core.pricing import PricingTable
from gateway.library import CreditMiddleware, NoMeteredRequest, add_llm_usage

PRICES = PricingTable.from_json({"models": {"m": {"input": "1", "output": "2"}}})  # per million tokens


def make_app(engine) -> FastAPI:
    app = FastAPI()
    app.add_middleware(CreditMiddleware, engine=engine, pricing=PRICES, reserve="0.01", ttl_seconds=30)

    @app.post("/summarise")
    async def summarise():
        add_llm_usage(model="m", input_tokens=1000, output_tokens=500)  # 1000 + 1000 micro-credits
        return {"ok": True}

    @app.post("/fan-out")
    async def fan_out():
        async def sub_call(n):
            await asyncio.sleep(0.01)
            add_llm_usage(cost=Decimal("0.000100") * n)

        await asyncio.gather(*(asyncio.create_task(sub_call(n)) for n in (1, 2, 3)))
        return {"ok": True}

    @app.post("/nothing")
    async def nothing():
        return {"ok": True}

    @app.post("/boom")
    async def boom():
        add_llm_usage(model="m", input_tokens=10, output_tokens=0)
        raise RuntimeError("handler failed after a paid call")

    return app


@pytest.fixture
async def client(engine):
    app = make_app(engine)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
        yield c


async def test_usage_recorded_in_a_handler_is_charged(client, engine):
    await engine.grant("lib", "1", op_id="g")
    r = await client.post("/summarise", headers={"X-User-Id": "lib"})
    assert r.status_code == 200
    assert Decimal(r.headers["x-credits-charged"]) == Decimal("0.002")
    b = await engine.balance("lib")
    assert b.available == Decimal("0.998") and b.held == 0


async def test_usage_from_spawned_tasks_is_charged(client, engine):
    await engine.grant("lib2", "1", op_id="g")
    r = await client.post("/fan-out", headers={"X-User-Id": "lib2"})
    assert Decimal(r.headers["x-credits-charged"]) == Decimal("0.0006")
    assert (await engine.balance("lib2")).available == Decimal("0.9994")


async def test_no_usage_charges_nothing_and_a_failed_handler_still_pays_its_calls(client, engine):
    await engine.grant("lib3", "1", op_id="g")
    assert (await client.post("/nothing", headers={"X-User-Id": "lib3"})).headers["x-credits-charged"] == "0.000000"
    r = await client.post("/boom", headers={"X-User-Id": "lib3"})
    assert r.status_code == 500
    b = await engine.balance("lib3")
    assert b.available == Decimal("0.99999") and b.held == 0


async def test_short_account_gets_402_and_missing_user_401(client, engine):
    r = await client.post("/summarise", headers={"X-User-Id": "broke"})
    assert r.status_code == 402 and r.json()["code"] == "INSUFFICIENT_CREDITS"
    assert (await client.post("/summarise")).status_code == 401


def test_add_llm_usage_outside_a_metered_request_is_an_error():
    with pytest.raises(NoMeteredRequest):
        add_llm_usage(model="m", input_tokens=1)
