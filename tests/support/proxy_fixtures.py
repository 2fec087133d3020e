"""The metering proxy's shared test setup: a real gateway (uvicorn, in this process) in
front of the fake upstream, its config, the `gw` fixture and the request helpers.
Registered as a plugin in tests/conftest.py."""

from __future__ import annotations

import asyncio
import contextlib
from decimal import Decimal

import aiohttp
import pytest
import uvicorn
from multidict import CIMultiDict

from gateway.api.app import create_app
from gateway.core.settings import Settings
from gateway.devtools.mock_upstream import MockUpstream as FakeUpstream
from tests.conftest import free_port

ADMIN = "admin-" + "p" * 40
CLIENT = "client-" + "q" * 40
# 1 credit per million input tokens = 1 micro-credit per token; output 2 per token.
CONFIG = """
[gateway]
min_output_tokens = 4
chars_per_token = 4
hold_margin_seconds = 5

[[upstreams]]
name = "openai"
kind = "openai"
base_url = "{url}"
api_key = "sk-upstream-secret"
timeout_seconds = {timeout}
models = ["gpt-test", "embed-test"]
forward_headers = ["x-fake-*"]

[[upstreams]]
name = "anthropic"
kind = "anthropic"
base_url = "{url}"
api_key = "ant-upstream-secret"
timeout_seconds = {timeout}
models = ["claude-test"]
forward_headers = ["x-fake-*"]

[[routes]]
path = "/v1/models"
upstream = "openai"
methods = ["GET"]
price = "0.5"

[[routes]]
path = "/v1/redirect"
upstream = "openai"
methods = ["GET"]
price = "0"

[pricing.models."gpt-test"]
input = "1"
cached_input = "0.5"
output = "2"
max_output_tokens = 100

[pricing.models."claude-test"]
input = "1"
output = "2"
max_output_tokens = 100

[pricing.models."embed-test"]
input = "1"
output = "0"
"""


class Gateway:
    def __init__(self, base: str, app, fake: FakeUpstream) -> None:
        self.base, self.app, self.fake = base, app, fake

    @property
    def services(self):
        return self.app.state.services

    def headers(self, user: str, **extra) -> dict:
        return {"Authorization": f"Bearer {CLIENT}", "X-User-Id": user, **extra}

    async def grant(self, user: str, amount: str) -> None:
        await self.services.engine.grant(user, amount, op_id=f"g-{user}-{amount}")

    async def balance(self, user: str):
        return await self.services.engine.balance(user)


@contextlib.asynccontextmanager
async def running_gateway(
    redis_url, tmp_path, extra_config: str = "", fake: FakeUpstream | None = None, db: str = "p.db"
):
    """A gateway (uvicorn, in this process) in front of a fake upstream (its own unless given)."""
    own_fake = fake is None
    fake = fake or FakeUpstream()
    url = await fake.start() if own_fake else f"http://127.0.0.1:{fake.port}"
    cfg = tmp_path / f"gateway-{free_port()}.toml"
    cfg.write_text(CONFIG.format(url=url, timeout=2) + extra_config)
    settings = Settings(
        redis_url=redis_url,
        admin_keys=ADMIN,
        client_keys=CLIENT,
        partitions=16,
        sqlite_path=str(tmp_path / db),
        audit_path=None,
        gateway_config=str(cfg),
    )
    app = create_app(settings, run_worker=False)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 (uvicorn's Server offers a flag, no event)
        await asyncio.sleep(0.02)
    try:
        yield Gateway(f"http://127.0.0.1:{port}", app, fake)
    finally:
        server.should_exit = True
        await task
        if own_fake:
            await fake.stop()


@pytest.fixture
async def gw(redis, redis_url, tmp_path):
    async with running_gateway(redis_url, tmp_path) as g:
        yield g


async def post(gw, path, body, user="alice", **headers):
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.base + path, json=body, headers=gw.headers(user, **headers)) as r,
    ):
        return r.status, CIMultiDict(r.headers), await r.read()


def charged(headers) -> Decimal:
    assert "X-Credits-Charged" in headers, list(headers.items())
    return Decimal(headers["X-Credits-Charged"])


KNOWN_MODELS = """
[[upstreams]]
name = "openai-known"
kind = "openai"
base_url = "{url}"
api_key = "sk-upstream-secret"
timeout_seconds = 2
models = ["gpt-4o", "text-embedding-3-small"]
forward_headers = ["x-fake-*"]

[pricing.models."gpt-4o"]
input = "1"
output = "2"
max_output_tokens = 100

[pricing.models."text-embedding-3-small"]
input = "1"
output = "0"
"""
