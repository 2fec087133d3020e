"""Gives every HTTP request an id, set in REQUEST_ID while it is served (for the log lines).

The caller's X-Request-Id is kept when it is a plain token (letters, digits, `._-`, up to
64), so a request can be followed from the client through the gateway; otherwise a fresh
one is made. Responses are left as they are.
"""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Receive, Scope, Send

from ..logs import REQUEST_ID

_TOKEN = re.compile(rb"[A-Za-z0-9._-]{1,64}")


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for name, value in scope["headers"]:
            if name == b"x-request-id" and _TOKEN.fullmatch(value):
                rid = value.decode()
                break
        token = REQUEST_ID.set(rid or uuid.uuid4().hex)
        try:
            await self.app(scope, receive, send)
        finally:
            REQUEST_ID.reset(token)
