"""At start, the gateway logs what its proxy serves: one line per upstream (name, kind,
base URL without credentials, models), the metered routes and the extra routes; never a key."""

from __future__ import annotations

import asyncio
import logging

from gateway.api.app import create_app
from gateway.core.settings import Settings

SECRET_ENV_KEY = "sk-from-env-" + "q" * 30
SECRET_FILE_KEY = "sk-in-file-" + "w" * 30
SECRET_HEADER = "hdr-secret-" + "h" * 30
SECRET_URL_PASSWORD = "url-password-" + "p" * 20

CONFIG = f"""
[[upstreams]]
name = "primary"
kind = "openai"
base_url = "https://user:{SECRET_URL_PASSWORD}@llm.example.com:8443/openai"
api_key_env = "SUMMARY_TEST_KEY"
models = ["gpt-x", "gpt-y"]
headers = {{ "X-Org-Token" = "{SECRET_HEADER}" }}

[[upstreams]]
name = "claude"
kind = "anthropic"
base_url = "https://anthropic.example.com"
api_key = "{SECRET_FILE_KEY}"

[[routes]]
path = "/v1/models"
upstream = "primary"
methods = ["GET"]
price = "0"

[[routes]]
path = "/v1/files"
upstream = "primary"
methods = ["POST"]

[[routes]]
path = "/v1/images/generations"
upstream = "primary"
methods = ["POST"]
price = "0.05"

[pricing.models."gpt-x"]
input = "2.5"
output = "10"
"""


async def _settle() -> None:
    # fakeredis (2.41) swallows a cancellation that lands in a pub/sub subscription's first
    # get_message, and an app stopped within milliseconds of its start then never stops:
    # let the subscriptions settle first.
    await asyncio.sleep(0.2)


async def test_start_logs_upstreams_and_routes_without_any_credential(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("SUMMARY_TEST_KEY", SECRET_ENV_KEY)
    (tmp_path / "gw.toml").write_text(CONFIG)
    settings = Settings(
        gateway_config=str(tmp_path / "gw.toml"),
        sqlite_path=str(tmp_path / "p.db"),
        audit_path=None,
        admin_keys="a" * 40,
    )
    app = create_app(settings)
    with caplog.at_level(logging.INFO, logger="credit.gateway"):
        async with app.router.lifespan_context(app):
            await _settle()
    lines = [r.getMessage() for r in caplog.records if r.name == "credit.gateway"]
    text = "\n".join(lines)
    assert (
        "proxy upstream primary: kind openai, https://***@llm.example.com:8443/openai, timeout 120 s, "
        "models: gpt-x, gpt-y" in lines
    )
    assert (
        "proxy upstream claude: kind anthropic, https://anthropic.example.com, timeout 120 s, models: *"
        in lines
    )
    assert (
        "proxy metered routes (POST): /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses, "
        "/v1/messages"
    ) in lines
    assert "proxy extra route GET /v1/models -> primary: free" in lines
    assert "proxy extra route POST /v1/files -> primary: refused" in lines
    assert "proxy extra route POST /v1/images/generations -> primary: 0.050000 credits per request" in lines
    assert any(
        line.startswith("proxy priced models") and "gpt-x" in line and "other models: refused" in line
        for line in lines
    )
    for secret in (SECRET_ENV_KEY, SECRET_FILE_KEY, SECRET_HEADER, SECRET_URL_PASSWORD, "user:"):
        assert secret not in caplog.text, secret
    assert "X-Org-Token" not in text


async def test_no_proxy_lines_without_a_config(tmp_path, caplog):
    settings = Settings(sqlite_path=str(tmp_path / "n.db"), audit_path=None, admin_keys="a" * 40)
    app = create_app(settings)
    with caplog.at_level(logging.INFO, logger="credit.gateway"):
        async with app.router.lifespan_context(app):
            await _settle()
    assert "credit gateway starting" in caplog.text
    assert "proxy upstream" not in caplog.text
