"""A webhook receiver for the notification tests: an aiohttp server on 127.0.0.1 that checks
each request's signature with the code the README shows (read from README.md and run, so
the README's check is the one tested), deduplicates on the event id as a receiver should,
and answers `status` (500 while "down")."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_check() -> Callable[[str, bytes, str], bool]:
    """`verify_signature(secret, body, header)` as the README's Notifications section defines it."""
    text = README.read_text()
    section = text[text.index("## Notifications") :]
    code = next(b for b in re.findall(r"```python\n(.*?)```", section, re.S) if "def verify_signature" in b)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    return scope["verify_signature"]


class Receiver:
    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.check = readme_check()
        self.status = 200
        self.requests = 0
        self.bad_signatures = 0
        self.events: dict[str, dict] = {}  # id -> the event, once (the receiver's dedup)
        self.accepted: Counter[str] = Counter()  # id -> 2xx answers given
        self._runner: web.AppRunner | None = None
        self.url = ""
        # While `gate` is set and closed, a request waits for it (a receiver that hangs);
        # `entered` says one is waiting.
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests += 1
        if self.gate is not None and not self.gate.is_set():
            self.entered.set()
            await self.gate.wait()
        try:
            good = self.check(self.secret, body, request.headers.get("X-Credit-Signature", ""))
        except (ValueError, KeyError):  # no header, or not of the form t=...,v1=...
            good = False
        if not good:
            self.bad_signatures += 1
            return web.Response(status=400, text="bad signature")
        if self.status >= 300:
            return web.Response(status=self.status, text="receiver down")
        event = json.loads(body)
        assert request.headers["X-Credit-Event-Id"] == event["id"]
        self.events.setdefault(event["id"], event)
        self.accepted[event["id"]] += 1
        return web.json_response({"ok": True})

    async def start(self, port: int = 0) -> str:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        host, real_port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{real_port}/hook"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
