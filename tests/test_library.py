"""Library mode (gateway/library/) against a real redis-server.

Usage recorded inside a FastAPI handler is charged, from the handler and from tasks it
spawns; what the headers, SSE comment and trailers say is what was settled; late usage is
charged even when it puts the account in debt; a settle Redis does not confirm lands later,
once; bad usage is refused at the call; the README's example runs as written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import pytest_asyncio
from fastapi import BackgroundTasks, FastAPI
from fastapi.responses import StreamingResponse

from gateway.core.engine import CreditEngine
from gateway.core.pricing import PricingTable
from gateway.library import CreditMiddleware, NoMeteredRequest, add_llm_usage

REPO = Path(__file__).resolve().parents[1]
PRICES = PricingTable.from_json({"models": {"m": {"input": "1", "output": "2"}}})  # per million tokens


def make_app(engine, settler=None, **options) -> FastAPI:
    app = FastAPI()
    late: list[asyncio.Task] = []  # the background tasks, referenced until they finish
    opts = {"pricing": PRICES, "reserve": "0.01", "ttl_seconds": 30, **options}
    app.add_middleware(CreditMiddleware, engine=engine, settler=settler, **opts)

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

    @app.post("/boom-unpaid")
    async def boom_unpaid():
        raise RuntimeError("handler failed before any call")

    @app.post("/all-then-late")
    async def all_then_late():
        add_llm_usage(cost="0.01")  # the whole hold

        async def after():
            await asyncio.sleep(0.05)
            add_llm_usage(cost="0.005")  # recorded after the request settled

        late.append(asyncio.create_task(after()))
        return {"ok": True}

    @app.post("/stream")
    async def stream():
        async def body():
            yield b"part one, "
            add_llm_usage(model="m", input_tokens=1000, output_tokens=500)
            yield b"part two"

        return StreamingResponse(body(), media_type="text/plain")

    @app.post("/sse")
    async def sse():
        async def events():
            yield b"data: one\n\n"
            add_llm_usage(model="m", input_tokens=1000, output_tokens=500)
            yield b"data: two\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/background")
    async def background(tasks: BackgroundTasks):
        add_llm_usage(cost="0.001")

        async def later():
            add_llm_usage(cost="0.002")

        tasks.add_task(later)
        return {"ok": True}

    @app.post("/sync")
    def sync_handler(tasks: BackgroundTasks):
        add_llm_usage(cost="0.001")
        tasks.add_task(lambda: add_llm_usage(cost="0.0005"))  # a sync background task: a worker thread
        return {"ok": True}

    @app.post("/bad-usage")
    async def bad_usage():
        from gateway.library import UsageError

        refused = []
        for kwargs in (
            {"model": "unpriced", "input_tokens": 5},
            {"cost": 0.002},
            {"model": "m", "input_tokens": -1},
            {"cost": "0.0000001"},
            {"model": "m", "input_tokens": 1.5},
        ):
            try:
                add_llm_usage(**kwargs)
            except UsageError as exc:
                refused.append(str(exc))
        add_llm_usage(cost="0.003")  # what the app records instead
        return {"refused": refused}

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.get("/open/thing")
    async def open_thing():
        return {"ok": True}

    return app


@pytest_asyncio.fixture
async def settler(engine):
    from gateway.core.settlement import Settler

    s = Settler(engine)
    yield s
    await s.drain(timeout=10)


@pytest_asyncio.fixture
async def client(engine, settler):
    app = make_app(engine, settler)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
        yield c


async def events_of(engine: CreditEngine, user: str) -> list[dict]:
    pk = engine.keys.partition(engine.keys.partition_of(user))
    return [
        e for e in (json.loads(f[b"e"]) for _, f in await engine.redis.xrange(pk.events)) if e["u"] == user
    ]


# -- charging what the handler recorded -------------------------------------------------


async def test_usage_recorded_in_a_handler_is_charged(client, engine):
    await engine.grant("lib", "1", op_id="g")
    r = await client.post("/summarise", headers={"X-User-Id": "lib"})
    assert r.status_code == 200
    assert Decimal(r.headers["x-credits-charged"]) == Decimal("0.002")
    assert Decimal(r.headers["x-credits-remaining"]) == Decimal("0.998")
    assert r.headers["x-request-id"].startswith("lib-")
    b = await engine.balance("lib")
    assert b.available == Decimal("0.998") and b.held == 0


async def test_usage_from_spawned_tasks_is_charged(client, engine):
    await engine.grant("lib2", "1", op_id="g")
    r = await client.post("/fan-out", headers={"X-User-Id": "lib2"})
    assert Decimal(r.headers["x-credits-charged"]) == Decimal("0.0006")
    assert (await engine.balance("lib2")).available == Decimal("0.9994")


async def test_no_usage_charges_nothing(client, engine):
    await engine.grant("lib3", "1", op_id="g")
    r = await client.post("/nothing", headers={"X-User-Id": "lib3"})
    assert r.headers["x-credits-charged"] == "0.000000"
    b = await engine.balance("lib3")
    assert b.available == Decimal("1") and b.held == 0


async def test_a_handler_that_raises_after_a_paid_call_still_pays_for_it(client, engine):
    await engine.grant("lib4", "1", op_id="g")
    r = await client.post("/boom", headers={"X-User-Id": "lib4"})
    assert r.status_code == 500
    b = await engine.balance("lib4")
    assert b.available == Decimal("0.99999") and b.held == 0 and b.spent == Decimal("0.00001")
    settled = [e for e in await events_of(engine, "lib4") if e["t"] == "hold_settled"]
    assert len(settled) == 1 and settled[0]["amt"] == "10"
    # ...and one that raises before recording anything pays nothing (its hold is released).
    r = await client.post("/boom-unpaid", headers={"X-User-Id": "lib4"})
    assert r.status_code == 500
    assert (await events_of(engine, "lib4"))[-1]["t"] == "hold_released"
    assert (await engine.balance("lib4")).available == Decimal("0.99999")


async def test_refusals_are_json_errors(client, engine):
    r = await client.post("/summarise", headers={"X-User-Id": "broke"})
    assert r.status_code == 402
    assert r.json() == {
        "error": {
            "code": "insufficient_credits",
            "message": "not enough credits for this request",
            "available": "0.000000",
        }
    }
    r = await client.post("/summarise")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_user"


def test_add_llm_usage_outside_a_metered_request_is_an_error():
    with pytest.raises(NoMeteredRequest):
        add_llm_usage(model="m", input_tokens=1)


# -- 1. late usage is never lost ---------------------------------------------------------


async def test_late_usage_on_an_exhausted_account_becomes_debt(client, engine, settler):
    await engine.grant("late", "0.01", op_id="g")
    r = await client.post("/all-then-late", headers={"X-User-Id": "late"})
    assert r.status_code == 200 and r.headers["x-credits-charged"] == "0.010000"
    await asyncio.sleep(0.1)  # the spawned task records its usage after the settle
    await settler.drain(timeout=10)
    b = await engine.balance("late")
    assert (b.available, b.spent, b.debt, b.held) == (0, Decimal("0.01"), Decimal("0.005"), 0)
    late = [e for e in await events_of(engine, "late") if e["t"] == "debit"]
    assert len(late) == 1 and late[0]["x"]["request_id"] == r.headers["x-request-id"]
    assert late[0]["debt_added"] == "5000" and late[0]["x"]["late"] is True
    # In debt: the next request is refused until a grant repays it.
    r = await client.post("/summarise", headers={"X-User-Id": "late"})
    assert r.status_code == 402 and r.json()["error"]["code"] == "in_debt"


# -- 3. what the headers say -------------------------------------------------------------


async def test_a_streamed_answer_has_no_charged_header_but_is_charged(client, engine):
    await engine.grant("strm", "1", op_id="g")
    r = await client.post("/stream", headers={"X-User-Id": "strm"})
    assert r.status_code == 200 and r.text == "part one, part two"
    assert "x-credits-charged" not in r.headers  # not known when the headers left
    assert r.headers["x-request-id"].startswith("lib-")
    assert (await engine.balance("strm")).spent == Decimal("0.002")


async def test_an_event_stream_ends_with_the_charge_in_an_sse_comment(client, engine):
    await engine.grant("sse", "1", op_id="g")
    r = await client.post("/sse", headers={"X-User-Id": "sse"})
    assert "x-credits-charged" not in r.headers
    rid = r.headers["x-request-id"]
    assert (
        r.text
        == f"data: one\n\ndata: two\n\n: credits charged=0.002000 remaining=0.998000 request_id={rid}\n\n"
    )
    assert (await engine.balance("sse")).spent == Decimal("0.002")


async def test_background_task_usage_is_charged_after_the_header_under_the_same_request_id(
    client, engine, settler
):
    await engine.grant("bg", "1", op_id="g")
    r = await client.post("/background", headers={"X-User-Id": "bg"})
    await settler.drain(timeout=10)
    rid = r.headers["x-request-id"]
    # The header is the settle's charge: the handler's own usage, confirmed before it left.
    assert r.headers["x-credits-charged"] == "0.001000"
    evs = await events_of(engine, "bg")
    settled = [e for e in evs if e["t"] == "hold_settled"]
    assert [(e["amt"], e["x"]["request_id"]) for e in settled] == [("1000", rid)]
    late = [e for e in evs if e["t"] == "debit"]
    assert [(e["amt"], e["x"]["request_id"]) for e in late] == [("2000", rid)]
    assert (await engine.balance("bg")).spent == Decimal("0.003")


async def test_a_sync_handler_and_a_sync_background_task_are_charged(client, engine, settler):
    await engine.grant("sync", "1", op_id="g")
    r = await client.post("/sync", headers={"X-User-Id": "sync"})
    assert r.status_code == 200 and r.headers["x-credits-charged"] == "0.001000"
    for _ in range(100):  # the thread's late usage reaches the loop, then the settler
        if settler.pending or (await engine.balance("sync")).spent == Decimal("0.0015"):
            break
        await asyncio.sleep(0.01)
    await settler.drain(timeout=10)
    assert (await engine.balance("sync")).spent == Decimal("0.0015")


async def run_asgi(app, scope: dict) -> list[dict]:
    sent: list[dict] = []
    received = False

    async def receive():
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()

    async def send(m):
        sent.append(m)

    await app(scope, receive, send)
    return sent


def http_scope(path: str, user: str, *, trailers: bool, te: bool) -> dict:
    headers = [(b"host", b"app"), (b"x-user-id", user.encode())] + ([(b"te", b"trailers")] if te else [])
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("app", 80),
        "extensions": {"http.response.trailers": {}} if trailers else {},
    }


async def test_a_stream_carries_the_charge_in_trailers_when_server_and_client_take_them(engine, settler):
    await engine.grant("trl", "1", op_id="g")
    app = make_app(engine, settler)
    sent = await run_asgi(app, http_scope("/stream", "trl", trailers=True, te=True))
    start = sent[0]
    assert start["type"] == "http.response.start" and start.get("trailers") is True
    assert (b"trailer", b"x-credits-charged, x-credits-remaining") in start["headers"]
    assert b"x-credits-charged" not in dict(start["headers"])
    assert sent[-2]["type"] == "http.response.body" and not sent[-2].get("more_body")
    assert sent[-1] == {
        "type": "http.response.trailers",
        "more_trailers": False,
        "headers": [(b"x-credits-charged", b"0.002000"), (b"x-credits-remaining", b"0.998000")],
    }
    # A server without the extension, or a client that did not ask: no trailers at all.
    for trailers, te in ((False, True), (True, False)):
        sent = await run_asgi(app, http_scope("/stream", "trl", trailers=trailers, te=te))
        assert not sent[0].get("trailers") and all(m["type"] != "http.response.trailers" for m in sent)
    assert (await engine.balance("trl")).spent == Decimal("0.006")


# -- 5. bad usage is refused at the call ---------------------------------------------------


async def test_bad_usage_is_refused_at_the_call_and_records_nothing(client, engine):
    await engine.grant("bad", "1", op_id="g")
    r = await client.post("/bad-usage", headers={"X-User-Id": "bad"})
    assert r.status_code == 200
    refused = r.json()["refused"]
    assert len(refused) == 5
    assert "unpriced" in refused[0] and "float" in refused[1] and "input_tokens" in refused[2]
    assert r.headers["x-credits-charged"] == "0.003000"  # only what the app recorded instead
    assert (await engine.balance("bad")).spent == Decimal("0.003")


async def test_usage_error_is_a_value_error():
    from gateway.library import UsageError

    assert issubclass(UsageError, ValueError)


async def test_a_handler_that_outlives_its_hold_still_pays_for_its_calls(engine, clock, settler):
    await engine.grant("slow", "1", op_id="g")
    app = make_app(engine, settler, ttl_seconds=5)

    @app.post("/slow")
    async def slow():
        clock.advance(10)  # past the hold's timeout
        add_llm_usage(cost="0.004")
        return {"ok": True}

    app.middleware_stack = None
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as c:
        r = await c.post("/slow", headers={"X-User-Id": "slow"})
    assert r.headers["x-credits-charged"] == "0.004000"
    b = await engine.balance("slow")
    assert (b.spent, b.held, b.available) == (Decimal("0.004"), 0, Decimal("0.996"))


# -- 4. starting it: paths, the engine, the README example ----------------------------------


async def test_docs_openapi_and_health_are_not_metered_by_default(client):
    for path in ("/docs", "/openapi.json", "/redoc", "/health"):
        r = await client.get(path)
        assert r.status_code == 200, path
        assert "x-request-id" not in r.headers
    r = await client.options(
        "/summarise", headers={"Origin": "http://x", "Access-Control-Request-Method": "POST"}
    )
    assert r.status_code != 401  # a CORS preflight is not metered


async def test_paths_skip_paths_and_metered_choose_what_is_metered(engine, settler):
    await engine.grant("paths", "1", op_id="g")

    async def status(app, path: str, method: str = "POST") -> int:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as c:
            return (await c.request(method, path)).status_code  # no X-User-Id: 401 when metered

    only = make_app(engine, settler, paths=["/summarise", "/fan-*"])
    assert await status(only, "/summarise") == 401 and await status(only, "/fan-out") == 401
    assert await status(only, "/nothing") == 200 and await status(only, "/open/thing", "GET") == 200
    skip = make_app(engine, settler, skip_paths=["/open/*"])
    assert await status(skip, "/open/thing", "GET") == 200
    assert await status(skip, "/health", "GET") == 401  # the defaults are replaced, not added to
    custom = make_app(engine, settler, metered=lambda scope: scope["method"] == "POST")
    assert await status(custom, "/health", "GET") == 200 and await status(custom, "/nothing") == 401


async def test_an_engine_not_open_yet_answers_503_not_ready(settler):
    app = make_app(lambda: None, settler)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as c:
        r = await c.post("/summarise", headers={"X-User-Id": "x"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "not_ready"


async def test_credit_engine_makes_a_fresh_redis_ready_and_closes_everything(redis, redis_url, tmp_path):
    from gateway.core.settings import Settings
    from gateway.library import credit_engine

    settings = Settings(redis_url=redis_url, sqlite_path=str(tmp_path / "s.db"), partitions=8)
    assert await redis.dbsize() == 0  # a fresh Redis: no partition is ready
    credits = credit_engine(settings)
    assert credits() is None
    async with credits as engine:
        assert credits() is engine and engine.script_redis is not engine.redis  # multiplexed script calls
        await engine.grant("fresh", "1", op_id="g")
        hold = await engine.reserve("fresh", "0.5", hold_id="h", ttl_seconds=30)
        assert hold.amount == Decimal("0.5")
    assert credits() is None
    from redis.exceptions import ConnectionError as RedisConnectionError

    with pytest.raises(RedisConnectionError, match="closed"):
        await engine.balance("fresh")  # its script client is closed
    async with credit_engine(settings) as engine:  # a second start: nothing to rebuild
        assert (await engine.balance("fresh")).held == Decimal("0.5")


async def test_credit_engine_in_embedded_mode_persists_through_its_own_worker(tmp_path):
    from gateway.core.settings import Settings
    from gateway.core.store.sqlite import SQLiteStore
    from gateway.library import credit_engine

    settings = Settings(sqlite_path=str(tmp_path / "e.db"), audit_path=None, partitions=4)
    assert settings.embedded
    async with credit_engine(settings) as engine:
        await engine.grant("emb", "1", op_id="g")
        await engine.reserve("emb", "0.5", hold_id="h", ttl_seconds=30)
        await engine.settle("emb", "h", "0.2")
    store = SQLiteStore(settings.sqlite_path)
    await store.open()
    try:
        assert [e.type for e in await store.ledger("emb", limit=10)] == ["hold_settled", "hold_open", "grant"]
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def lifespan_of(app):
    """Runs the app's ASGI lifespan through its whole middleware stack (as uvicorn does)."""
    to_app: asyncio.Queue = asyncio.Queue()
    from_app: asyncio.Queue = asyncio.Queue()
    task = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, to_app.get, from_app.put)
    )
    await to_app.put({"type": "lifespan.startup"})
    msg = await from_app.get()
    assert msg["type"] == "lifespan.startup.complete", msg
    try:
        yield
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        msg = await from_app.get()
        assert msg["type"] == "lifespan.shutdown.complete", msg
        await task


def python_example(doc: Path) -> str:
    """The first ```python block of `doc` that uses credit_engine."""
    for block in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S):
        if "credit_engine" in block:
            return block
    raise AssertionError(f"no library example in {doc}")


@pytest.mark.parametrize("doc", ["README.md", "docs/library.md"])
async def test_the_documented_example_runs_as_written(doc, redis, redis_url, tmp_path, monkeypatch):
    monkeypatch.setenv("CREDIT_REDIS_URL", redis_url)
    monkeypatch.setenv("CREDIT_SQLITE_PATH", str(tmp_path / "example.db"))
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "example_app"}
    exec(compile(python_example(REPO / doc), f"{doc} example", "exec"), ns)
    app, credits = ns["app"], ns["credits"]
    async with lifespan_of(app):
        engine = credits()
        await engine.grant("reader", "1", op_id="g")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as c:
            r = await c.post("/summarise", headers={"X-User-Id": "reader"})
            assert r.status_code == 200, r.text
            assert r.headers["x-credits-charged"] == "0.006000"  # 1200 * 2.50 + 300 * 10 per million
            assert (await c.get("/docs")).status_code == 200
            assert (await c.post("/summarise")).status_code == 401
        assert (await engine.balance("reader")).available == Decimal("0.994")
    assert credits() is None


# -- 2. a settle Redis does not confirm ---------------------------------------------------


@pytest_asyncio.fixture
async def flaky(redis_url):
    from tests.support.flaky_redis import FlakyRedisProxy

    u = urlsplit(redis_url)
    proxy = await FlakyRedisProxy(u.hostname, u.port).start()
    yield proxy
    await proxy.close()


@pytest_asyncio.fixture
async def flaky_engine(engine, flaky):
    """The test engine (same clock and keys), with its script calls through the proxy, on
    redis-py's default pool."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(flaky.url)
    yield CreditEngine(engine.redis, keys=engine.keys, clock=engine.clock, script_redis=client)
    await client.aclose()


async def test_a_settle_whose_reply_is_lost_is_charged_once_and_the_header_is_right(
    flaky_engine, flaky, engine
):
    from gateway.core.settlement import Settler

    await engine.grant("flaky", "1", op_id="g")
    settler = Settler(flaky_engine)
    app = make_app(flaky_engine, settler)
    flaky.lose_reply_to(flaky_engine.scripts["settle"].sha.encode())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as c:
        r = await c.post("/summarise", headers={"X-User-Id": "flaky"})
    assert flaky.lost_replies == 1
    assert r.status_code == 200 and r.headers["x-credits-charged"] == "0.002000"
    b = await engine.balance("flaky")
    assert (b.spent, b.held) == (Decimal("0.002"), 0)
    assert [e["t"] for e in await events_of(engine, "flaky")].count("hold_settled") == 1


async def test_a_settle_redis_does_not_confirm_shows_no_figure_and_lands_later(flaky_engine, flaky, engine):
    from gateway.core.settlement import Settler

    await engine.grant("later", "1", op_id="g")
    settler = Settler(flaky_engine, retry_interval_seconds=0.1)
    app = make_app(flaky_engine, settler)

    @app.post("/redis-goes-away")
    async def redis_goes_away():
        add_llm_usage(cost="0.003")
        flaky.down()
        return {"ok": True}

    app.middleware_stack = None
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as c:
        r = await c.post("/redis-goes-away", headers={"X-User-Id": "later"})
    assert r.status_code == 200 and "x-credits-charged" not in r.headers  # no figure rather than a wrong one
    assert (await engine.balance("later")).held == Decimal("0.01")
    flaky.up()
    assert await settler.drain(timeout=30) == 0
    b = await engine.balance("later")
    assert (b.spent, b.held) == (Decimal("0.003"), 0)


async def test_a_reserve_redis_does_not_answer_is_a_503_and_its_hold_is_given_back(
    flaky_engine, flaky, engine
):
    from gateway.core.settlement import Settler

    await engine.grant("nored", "1", op_id="g")
    settler = Settler(flaky_engine)
    app = make_app(flaky_engine, settler)
    flaky.lose_reply_to(flaky_engine.scripts["reserve"].sha.encode())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as c:
        r = await c.post("/summarise", headers={"X-User-Id": "nored"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "credit_store_unavailable"
        await settler.drain(timeout=10)
        b = await engine.balance("nored")
        assert (b.available, b.held, b.spent) == (Decimal("1"), 0, 0)  # the hold Redis placed was released
        # A partition being rebuilt: 503 state_lost.
        await engine.redis.delete(engine.keys.partition(engine.keys.partition_of("nored")).ready)
        r = await c.post("/summarise", headers={"X-User-Id": "nored"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "state_lost"
