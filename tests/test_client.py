"""gateway.client against the real app served by uvicorn (on a real redis-server and SQLite):
a hold settled, released on an exception and on an exit without a settle, retried after a
503 or a dropped connection into one hold, and every error code of docs/api.md raised as
its own exception."""

from __future__ import annotations

import asyncio
import contextlib
import re
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
import uvicorn
from aiohttp import web

from gateway import client as gc
from gateway.api.app import create_app
from gateway.client import CreditsClient
from tests.conftest import free_port
from tests.support.api_fixtures import ADMIN, CLIENT, settings_for

REPO = Path(__file__).resolve().parents[1]


@contextlib.asynccontextmanager
async def serving(app):
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 (uvicorn's Server offers a flag, no event)
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@pytest_asyncio.fixture
async def gw(redis, redis_url, tmp_path, clock):
    settings = settings_for(redis_url, sqlite_path=str(tmp_path / "c.db"))
    app = create_app(settings, clock=clock, run_worker=False)
    async with serving(app) as url:
        app.base = url
        yield app


class FaultyProxy:
    """In front of the gateway: each request takes the next fault, if any. "503-after" and
    "drop-after" forward the request (the gateway applies it) and then lose the answer: a
    503 instead, or a closed connection; "503" answers 503 without forwarding."""

    def __init__(self, target: str) -> None:
        self.target, self.faults, self.seen = target, [], []
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        fault = self.faults.pop(0) if self.faults else None
        self.seen.append((request.method, request.path, fault))
        if fault == "503":
            return web.json_response({"error": {"code": "state_lost", "message": "x"}}, status=503)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "x-user-id")}
        async with (
            aiohttp.ClientSession() as s,
            s.request(request.method, self.target + request.path_qs, data=await request.read(),
                      headers={**headers, "Content-Type": "application/json"}) as r,
        ):  # fmt: skip
            body, status = await r.read(), r.status
        if fault == "503-after":
            return web.json_response(
                {"error": {"code": "credit_store_unavailable", "message": "lost"}},
                status=503,
                headers={"Retry-After": "0"},
            )
        if fault == "drop-after":
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=200)
        return web.Response(body=body, status=status, content_type="application/json")


@pytest_asyncio.fixture
async def proxy(gw):
    p = FaultyProxy(gw.base)
    runner = web.AppRunner(p.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    p.url = f"http://{host}:{port}"
    yield p
    await runner.cleanup()


async def grant(gw, user, amount):
    await gw.state.services.engine.grant(user, amount, op_id=f"g-{user}-{amount}")


async def test_a_hold_is_settled_and_the_rest_returns(gw):
    await grant(gw, "ann", "10")
    async with CreditsClient(gw.base, CLIENT, backoff_seconds=0) as credits:
        async with credits.hold("ann", "2") as h:
            assert h.amount == Decimal("2.000000")
            result = await h.settle(Decimal("0.75"))
        assert (result["status"], result["charged"], result["available"]) == (
            "settled",
            "0.750000",
            "9.250000",
        )
        b = await credits.balance("ann")
    assert (b["available"], b["held"]) == ("9.250000", "0.000000")


async def test_a_hold_is_released_on_an_exception_and_on_an_exit_without_a_settle(gw):
    await grant(gw, "bea", "10")
    engine = gw.state.services.engine
    async with CreditsClient(gw.base, CLIENT, backoff_seconds=0) as credits:
        held = []

        async def failing_call():
            async with credits.hold("bea", "3") as h:
                held.append((h, (await engine.balance("bea")).held))
                raise RuntimeError("the LLM call failed")

        with pytest.raises(RuntimeError, match="the LLM call failed"):
            await failing_call()
        h, amount = held[0]
        assert amount == 3
        assert h.result is not None and h.result["status"] == "released"
        async with credits.hold("bea", "4") as h2:
            pass
        assert h2.result is not None and h2.result["status"] == "released"
    b = await engine.balance("bea")
    assert (b.available, b.held, b.spent) == (10, 0, 0)


async def test_a_reserve_retried_after_a_503_and_a_settle_after_a_drop_make_one_hold_charged_once(gw, proxy):
    await grant(gw, "cal", "10")
    engine = gw.state.services.engine
    proxy.faults = ["503-after"]  # the reserve's answer lost
    async with CreditsClient(proxy.url, CLIENT, backoff_seconds=0) as credits, credits.hold("cal", "2") as h:
        assert h.replayed  # the second try found the first one's hold
        assert len((await engine.account("cal")).holds) == 1
        proxy.faults = ["drop-after"]  # then the settle's
        result = await h.settle("1.5")
    assert result["replayed"] is True and result["charged"] == "1.500000"
    assert [(m, f) for m, _, f in proxy.seen] == [
        ("POST", "503-after"),
        ("POST", None),
        ("POST", "drop-after"),
        ("POST", None),
    ]
    assert len({p for _, p, _ in proxy.seen[:2]}) == 1  # the reserve retried, same body and path
    b = await engine.balance("cal")
    assert (b.available, b.held, b.spent) == (Decimal("8.5"), 0, Decimal("1.5"))


async def test_a_503_that_persists_raises_unavailable_after_the_attempts(gw, proxy):
    proxy.faults = ["503", "503"]
    async with CreditsClient(proxy.url, CLIENT, attempts=2, backoff_seconds=0) as credits:
        with pytest.raises(gc.Unavailable) as caught:
            await credits.reserve("dan", "1")
    assert (caught.value.status, caught.value.code) == (503, "state_lost")
    assert len(proxy.seen) == 2


def documented_codes() -> set[str]:
    """The codes of docs/api.md's error table."""
    text = (REPO / "docs/api.md").read_text()
    table = text.split("## Errors", 1)[1].split("## Retrying", 1)[0]
    return {
        c
        for row in table.splitlines()
        if row.startswith("| ")
        for c in re.findall(r"`([a-z_]+)`", row.split("|")[2])
    }


def test_every_documented_code_has_its_exception():
    codes = documented_codes()
    assert len(codes) > 30 and "insufficient_credits" in codes
    assert codes <= set(gc.CODES), codes - set(gc.CODES)
    assert all(issubclass(cls, gc.CreditsError) for cls in gc.CODES.values())


def test_floats_are_refused_before_anything_is_sent():
    credits = CreditsClient("http://127.0.0.1:9", CLIENT)
    with pytest.raises(TypeError, match="float"):
        credits.hold("x", 0.5)  # type: ignore[arg-type]


async def test_each_refusal_over_http_raises_its_exception(gw, clock):
    engine = gw.state.services.engine
    await grant(gw, "eve", "1")
    async with (
        CreditsClient(gw.base, CLIENT, backoff_seconds=0) as credits,
        CreditsClient(gw.base, "wrong-" + "k" * 40, backoff_seconds=0) as stranger,
    ):

        async def raises(cls, code, call):
            with pytest.raises(cls) as caught:
                await call
            assert caught.value.code == code, caught.value
            return caught.value

        e = await raises(gc.InsufficientCredits, "insufficient_credits", credits.reserve("eve", "5"))
        assert e.status == 402 and e.available == Decimal("1")
        await raises(gc.Unauthorized, "unauthorized", stranger.reserve("eve", "1"))
        await raises(gc.UserMissing, "missing_user", credits.reserve(None, "1"))
        await raises(gc.UserMissing, "invalid_user", credits.reserve("a/b", "1"))
        await raises(gc.InvalidAmount, "invalid_amount", credits.reserve("eve", "0.0000001"))
        await raises(gc.BadRequest, "invalid_id", credits.reserve("eve", "0.1", hold_id="req_mine"))
        h = await credits.reserve("eve", "0.5", hold_id="h-eve-1")
        await raises(gc.OpConflict, "op_conflict", credits.reserve("eve", "0.4", hold_id="h-eve-1"))
        await h.settle("0.1")
        await raises(gc.AlreadySettled, "already_settled", h.release())
        h2 = await credits.reserve("eve", "0.1")
        await h2.release()
        await raises(gc.AlreadyReleased, "already_released", h2.settle("0.1"))
        await raises(gc.HoldNotFound, "hold_not_found", gc.Hold(credits, "eve", "h-none", {}).settle("1"))
        h3 = await credits.reserve("eve", "0.1", ttl_seconds=5)
        clock.advance(6)
        await raises(gc.HoldExpired, "hold_expired", h3.settle("0.1"))
        # A settle above what is free puts the account in debt: it cannot hold again.
        h4 = await credits.reserve("eve", "0.1")
        await h4.settle("5")
        await raises(gc.InDebt, "in_debt", credits.reserve("eve", "0.1"))
        assert (await engine.balance("eve")).debt > 0
        # A user's own key naming another user.
        async with aiohttp.ClientSession() as s:
            r = await s.post(
                gw.base + "/admin/accounts/eve/keys", json={}, headers={"Authorization": f"Bearer {ADMIN}"}
            )
            user_key = (await r.json())["key"]
        async with CreditsClient(gw.base, user_key) as own:
            await raises(gc.Forbidden, "forbidden", own.reserve("fay", "0.1"))
            assert (await own.balance(None))["user_id"] == "eve"
