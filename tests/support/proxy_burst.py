"""Runs a gateway (uvicorn) in front of the fake upstream and fires N concurrent metered
requests for one user; prints a JSON report. Used by tests/test_proxy.py in a process of
its own (CPython 3.11.7's AST validator misreads the recursion depth after this burst runs
inside pytest's deep stack, which breaks later tests that parse source).

    python -m tests.support.proxy_burst REDIS_URL WORKDIR USER FUNDS N
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from decimal import Decimal
from pathlib import Path

import aiohttp
import uvicorn

from gateway.api.app import create_app
from gateway.core.settings import Settings
from gateway.devtools.mock_upstream import MockUpstream as FakeUpstream


async def main(
    redis_url: str, workdir: str, user: str, funds: str, n: int, config_template: str, admin: str, client: str
) -> dict:
    fake = FakeUpstream(record=False)
    url = await fake.start()
    cfg = f"{workdir}/burst.toml"
    # A small config file, written once before the server starts.
    Path(cfg).write_text(config_template.format(url=url, timeout=5))  # noqa: ASYNC240
    settings = Settings(
        redis_url=redis_url,
        admin_keys=admin,
        client_keys=client,
        partitions=16,
        sqlite_path=f"{workdir}/burst.db",
        audit_path=None,
        gateway_config=cfg,
    )
    app = create_app(settings, run_worker=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 (uvicorn's Server offers a flag, no event)
        await asyncio.sleep(0.02)
    engine = app.state.services.engine
    await engine.grant(user, funds, op_id=f"burst-{user}")
    body = {"model": "gpt-test", "max_tokens": 40, "messages": [{"role": "user", "content": "x"}]}
    hdr = {
        "Authorization": f"Bearer {client}",
        "X-User-Id": user,
        "X-Fake-Input-Tokens": "20",
        "X-Fake-Output-Tokens": "40",
    }

    async def one(sess: aiohttp.ClientSession) -> tuple[int, str | None]:
        async with sess.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=hdr) as r:
            await r.read()
            return r.status, r.headers.get("X-Credits-Charged")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n)) as sess:
        results = await asyncio.gather(*(one(sess) for _ in range(n)))
    b = await engine.balance(user)
    server.should_exit = True
    await task
    await fake.stop()
    return {
        "statuses": [s for s, _ in results],
        "charged": [c for s, c in results if s == 200],
        "available": str(b.available),
        "held": str(b.held),
        "debt": str(b.debt),
        "sum_charged": str(sum((Decimal(c) for s, c in results if s == 200), Decimal(0))),
    }


if __name__ == "__main__":
    from tests.support.proxy_fixtures import ADMIN, CLIENT, CONFIG

    redis_url, workdir, user, funds, n = sys.argv[1:6]
    print(json.dumps(asyncio.run(main(redis_url, workdir, user, funds, int(n), CONFIG, ADMIN, CLIENT))))
