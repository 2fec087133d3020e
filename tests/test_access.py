"""Who may spend whose credits on the proxy, and how fast: per-user API keys (issued once,
stored hashed, revocable on every process at once, rebuilt after Redis loss) and
per-minute rate limits answering 429 with Retry-After. Real gateway, real redis-server."""

from __future__ import annotations

import asyncio
import hashlib
import json
from decimal import Decimal

import aiohttp
import pytest

from gateway.core.recovery import ensure_ready
from gateway.worker.runner import Worker
from tests.support.proxy_fixtures import ADMIN, CLIENT, charged, running_gateway

pytestmark = pytest.mark.redis

ADM = {"Authorization": f"Bearer {ADMIN}"}
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
ANTHROPIC = {"model": "claude-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}


async def call(gw, method, path, headers, json=None):
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, gw.base + path, headers=headers, json=json) as r,
    ):
        body = await r.json(content_type=None) if r.content_type == "application/json" else await r.read()
        return r.status, r.headers.copy(), body


async def issue(gw, user, name="") -> dict:
    status, _, body = await call(gw, "POST", f"/admin/accounts/{user}/keys", ADM, {"name": name})
    assert status == 201, body
    return body


def with_key(key: str, **extra) -> dict:
    return {"Authorization": f"Bearer {key}", **extra}


async def test_a_user_key_identifies_its_user_without_x_user_id(gw):
    await gw.grant("bob", "1")
    k = await issue(gw, "bob", "bob's app")
    assert k["key"].startswith("cgk_") and k["user_id"] == "bob" and k["key"].startswith(k["prefix"])
    status, h, body = await call(gw, "POST", "/v1/chat/completions", with_key(k["key"]), CHAT)
    assert status == 200, body
    assert (await gw.balance("bob")).available == Decimal(1) - charged(h)
    # The Anthropic shape takes it as x-api-key too.
    status, h, body = await call(gw, "POST", "/v1/messages", {"x-api-key": k["key"]}, ANTHROPIC)
    assert status == 200, body
    # A user key cannot speak for someone else.
    status, _, body = await call(
        gw, "POST", "/v1/chat/completions", with_key(k["key"], **{"X-User-Id": "carol"}), CHAT
    )
    assert status == 403 and body["error"]["code"] == "forbidden"
    # The same user named again is fine.
    status, _, _ = await call(
        gw, "POST", "/v1/chat/completions", with_key(k["key"], **{"X-User-Id": "bob"}), CHAT
    )
    assert status == 200
    # Unknown keys of the same shape, and admin keys, are refused.
    for bad in ("cgk_" + "x" * 43, ADMIN):
        status, _, body = await call(gw, "POST", "/v1/chat/completions", with_key(bad), CHAT)
        assert status == 401, body


async def test_keys_are_shown_once_and_stored_only_as_digests(gw, redis, tmp_path):
    k = await issue(gw, "dora", "ci")
    status, _, listing = await call(gw, "GET", "/admin/accounts/dora/keys", ADM)
    assert status == 200 and [x["key_id"] for x in listing["keys"]] == [k["key_id"]]
    assert "key" not in listing["keys"][0] and listing["keys"][0]["name"] == "ci"
    token = k["key"].encode()
    digest = hashlib.sha256(token).hexdigest()
    # Nowhere in Redis and nowhere in the store's file: only the digest.
    for name in await redis.keys("*"):
        assert token not in name
        if await redis.type(name) == b"string":
            assert token not in (await redis.get(name) or b"")
    assert any(digest.encode() in n for n in await redis.keys("*apikey*"))
    db = b"".join(p.read_bytes() for p in tmp_path.glob("p.db*"))
    assert token not in db and digest.encode() in db
    # Admin only.
    status, _, _ = await call(gw, "POST", "/admin/accounts/dora/keys", with_key(CLIENT), {})
    assert status == 401
    status, _, _ = await call(gw, "POST", "/admin/accounts/dora/keys", with_key(k["key"]), {})
    assert status == 401


async def test_revocation_reaches_every_process_at_once(gw, redis_url, tmp_path):
    await gw.grant("erin", "1")
    k = await issue(gw, "erin")
    async with running_gateway(redis_url, tmp_path, fake=gw.fake, db="p.db") as other:
        # The second process caches the key on first use.
        status, _, _ = await call(other, "POST", "/v1/chat/completions", with_key(k["key"]), CHAT)
        assert status == 200
        status, _, body = await call(gw, "DELETE", f"/admin/accounts/erin/keys/{k['key_id']}", ADM)
        assert status == 200 and body["revoked_at"] is not None
        # Its cache lives 10 s; the pub/sub message must drop it well before.
        for _ in range(40):
            status, _, _ = await call(other, "POST", "/v1/chat/completions", with_key(k["key"]), CHAT)
            if status == 401:
                break
            await asyncio.sleep(0.05)
        assert status == 401
        status, _, _ = await call(gw, "POST", "/v1/chat/completions", with_key(k["key"]), CHAT)
        assert status == 401
    # Revoking again is harmless; an unknown key id is a 404.
    status, _, again = await call(gw, "DELETE", f"/admin/accounts/erin/keys/{k['key_id']}", ADM)
    assert status == 200 and again["revoked_at"] == body["revoked_at"]
    status, _, _ = await call(gw, "DELETE", "/admin/accounts/erin/keys/key_0123456789abcdef", ADM)
    assert status == 404
    status, _, _ = await call(gw, "DELETE", f"/admin/accounts/someone-else/keys/{k['key_id']}", ADM)
    assert status == 404


async def test_keys_come_back_after_redis_loses_its_data(gw, redis):
    await gw.grant("fred", "1")
    live = await issue(gw, "fred")
    dead = await issue(gw, "fred")
    await call(gw, "DELETE", f"/admin/accounts/fred/keys/{dead['key_id']}", ADM)
    await Worker(gw.services.engine, gw.services.store).run(burst=True)  # the grant reaches the store
    await redis.flushall()
    gw.services.api_keys._cache.clear()  # what a fresh process would have
    status, _, body = await call(gw, "POST", "/v1/chat/completions", with_key(live["key"]), CHAT)
    assert status == 503, body  # the partition is being rebuilt: not "unknown key"
    report = await ensure_ready(gw.services.engine, gw.services.store)
    assert report.api_keys == 1
    status, _, _ = await call(gw, "POST", "/v1/chat/completions", with_key(live["key"]), CHAT)
    assert status == 200
    status, _, _ = await call(gw, "POST", "/v1/chat/completions", with_key(dead["key"]), CHAT)
    assert status == 401


# -- rate limits -------------------------------------------------------------------------


async def test_requests_per_minute_answers_429_with_retry_after_in_each_format(gw):
    await gw.grant("gina", "1")
    status, _, body = await call(gw, "PUT", "/admin/accounts/gina/limits", ADM, {"requests_per_minute": 2})
    assert status == 200 and body["effective_requests_per_minute"] == 2 and body["tokens_per_minute"] is None
    for _ in range(2):
        status, _, _ = await call(gw, "POST", "/v1/chat/completions", gw.headers("gina"), CHAT)
        assert status == 200
    before = await gw.balance("gina")
    status, h, body = await call(gw, "POST", "/v1/chat/completions", gw.headers("gina"), CHAT)
    assert (
        status == 429
        and body["error"]["code"] == "rate_limited"
        and body["error"]["type"] == "rate_limit_exceeded"
    )
    assert 1 <= int(h["Retry-After"]) <= 30 and h["X-Request-Id"]
    status, h, body = await call(gw, "POST", "/v1/messages", gw.headers("gina"), ANTHROPIC)
    assert status == 429 and body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert int(h["Retry-After"]) >= 1
    after = await gw.balance("gina")
    assert (after.available, after.held) == (before.available, before.held)  # nothing held or charged
    # Another user is not affected; lifting the override (0 = no limit) lets gina through.
    await gw.grant("hank", "1")
    status, _, _ = await call(gw, "POST", "/v1/chat/completions", gw.headers("hank"), CHAT)
    assert status == 200
    status, _, body = await call(gw, "PUT", "/admin/accounts/gina/limits", ADM, {"requests_per_minute": 0})
    assert body["effective_requests_per_minute"] == 0
    status, _, _ = await call(gw, "POST", "/v1/chat/completions", gw.headers("gina"), CHAT)
    assert status == 200
    # Bad limits are refused.
    for bad in ({"requests_per_minute": -1}, {"tokens_per_minute": 1.5}, {"rpm": 3}):
        status, _, _ = await call(gw, "PUT", "/admin/accounts/gina/limits", ADM, bad)
        assert status == 422


async def test_tokens_per_minute_counts_real_usage_not_the_worst_case(gw):
    await gw.grant("ivan", "10")
    # Each call reserves ~43 tokens (a ~23-token prompt estimate + max_tokens 20) but uses
    # 3 in + 2 out; the limit is 100 a minute.
    await call(gw, "PUT", "/admin/accounts/ivan/limits", ADM, {"tokens_per_minute": 100})
    fake = {"X-Fake-Input-Tokens": "3", "X-Fake-Output-Tokens": "2"}
    for i in range(8):  # counted at the worst case, the 3rd call would be refused
        status, _, body = await call(gw, "POST", "/v1/chat/completions", gw.headers("ivan", **fake), CHAT)
        assert status == 200, (i, body)
    # A request asking for more output than the limit holds is answered shorter...
    await call(gw, "PUT", "/admin/accounts/ivy/limits", ADM, {"tokens_per_minute": 100})
    await gw.grant("ivy", "10")
    status, _, body = await call(
        gw, "POST", "/v1/chat/completions", gw.headers("ivy"), {**CHAT, "max_tokens": 500}
    )
    assert status == 200, body
    sent = json.loads(gw.fake.requests[-1]["body"])
    assert 4 <= sent["max_tokens"] <= 100 - 20
    # ...and one whose prompt alone exceeds it can never pass: 429 without Retry-After.
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 1000}]}
    status, h, body = await call(gw, "POST", "/v1/chat/completions", gw.headers("ivan"), big)
    assert status == 429 and body["error"]["code"] == "request_too_large" and "Retry-After" not in h


async def test_default_limits_come_from_the_configuration(redis, redis_url, tmp_path):
    extra = "\n[rate_limits]\nrequests_per_minute = 3\ntokens_per_minute = 100000\n"
    async with running_gateway(redis_url, tmp_path, extra) as g:
        await g.grant("jill", "1")
        codes = [
            (await call(g, "POST", "/v1/chat/completions", g.headers("jill"), CHAT))[0] for _ in range(4)
        ]
        assert codes == [200, 200, 200, 429]
        status, _, body = await call(g, "GET", "/admin/accounts/jill/limits", ADM)
        assert body["requests_per_minute"] is None and body["effective_requests_per_minute"] == 3
        # The flat-priced route counts as a request too.
        status, _, _ = await call(g, "GET", "/v1/models", g.headers("jill"))
        assert status == 429


async def test_a_revocation_racing_a_rebuild_stays_revoked(gw, redis, monkeypatch):
    from gateway.core.apikeys import restore_api_keys

    api, store = gw.services.api_keys, gw.services.store
    k = await issue(gw, "gus")
    await redis.flushall()
    real = store.active_api_keys

    async def read_then_revoked():
        records = [r async for r in real()]  # the rebuild has read the key as live...
        await api.revoke("gus", k["key_id"])  # ...then the revocation lands
        for r in records:
            yield r

    monkeypatch.setattr(store, "active_api_keys", read_then_revoked)
    await restore_api_keys(redis, gw.services.engine.keys, store, set(range(16)))
    for p in range(16):
        await gw.services.engine.mark_ready(p)
    assert await api.owner(k["key"]) is None


async def test_a_lookup_answered_before_a_revocation_is_not_cached(gw, monkeypatch):
    from gateway.core.apikeys import digest_of

    api = gw.services.api_keys
    k = await issue(gw, "hal")
    digest = digest_of(k["key"])
    real_mget = api.redis.mget

    async def revoked_meanwhile(*keys):
        values = await real_mget(*keys)
        api._forget(digest)  # the pub/sub message arrives while Redis was answering
        return values

    monkeypatch.setattr(api.redis, "mget", revoked_meanwhile)
    assert (await api.owner(k["key"])).user == "hal"
    assert digest not in api._cache  # so the next lookup asks Redis again
