"""Embedded mode: no Redis configured, one process runs the gateway and the worker on
fakeredis and SQLite. (fakeredis is the embedded engine here, not a stand-in for Redis.)"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from gateway.api.app import create_app
from gateway.core.settings import Settings

REPO = Path(__file__).resolve().parents[1]
ADMIN = "admin-" + "e" * 40
CLIENT = "client-" + "e" * 40


async def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_embedded_app_persists_through_its_in_process_worker_and_survives_restart(tmp_path):
    settings = Settings(admin_keys=ADMIN, client_keys=CLIENT, sqlite_path=str(tmp_path / "e.db"),
                        audit_path=str(tmp_path / "a.jsonl"), sweep_interval_seconds=0.2)
    assert settings.embedded
    admin = {"Authorization": f"Bearer {ADMIN}"}
    user = {"Authorization": f"Bearer {CLIENT}", "X-User-Id": "emb"}
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            assert (await c.post("/admin/accounts/emb/grants", json={"amount": "5"}, headers=admin)).status_code == 201
            assert (await c.post("/credits/holds", json={"amount": "2", "hold_id": "h1"}, headers=user)).status_code == 201

            async def ledger_has_two():
                r = await c.get("/admin/accounts/emb/ledger", headers=admin)
                return len(r.json()["entries"]) == 2

            assert await wait_for(ledger_has_two)
    # A new process (new in-memory Redis) rebuilds the account and its open hold from SQLite.
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            b = (await c.get("/credits/balance", headers=user)).json()
            assert b["available"] == "3.000000" and b["held"] == "2.000000"
            r = await c.post("/credits/holds/h1/settle", json={"amount": "1"}, headers=user)
            assert r.status_code == 200 and r.json()["available"] == "4.000000"
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) >= 2


def test_serve_without_configuration_says_embedded_and_prints_a_working_admin_key(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDIT_")}
    env.update(CREDIT_SQLITE_PATH=str(tmp_path / "serve.db"), CREDIT_AUDIT_PATH=str(tmp_path / "serve.jsonl"),
               PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        out = []
        key = None
        deadline = time.time() + 30
        while time.time() < deadline:
            line = proc.stdout.readline()
            out.append(line)
            m = re.match(r"^\s+(\S{40,})\s*$", line)
            if m:
                key = m.group(1)
            if "Uvicorn running" in line or "Application startup complete" in line:
                break
        text = "".join(out)
        assert "Embedded mode" in text and key, text
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            assert c.get("/healthz").status_code == 200
            assert c.get("/readyz").status_code == 200
            assert c.get("/admin/accounts/x").status_code == 401
            r = c.post("/admin/accounts/x/grants", json={"amount": "1"}, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 201, r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
