"""Gives every HTTP request an id, set in REQUEST_ID while it is served (for the log lines).

The caller's X-Request-Id is kept when it is a plain token (letters, digits, `._-`, up to
64), so a request can be followed from the client through the gateway; otherwise a fresh
one is made. The answer carries the id as X-Request-Id, unless the route set its own (the
proxy answers with its call's hold id, and logs under that id).
"""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

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

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", [])
                if not any(name.lower() == b"x-request-id" for name, _ in headers):
                    # The id now, not at the start: a route may have set its own meanwhile.
                    rid_now = (REQUEST_ID.get() or "").encode()
                    message = {**message, "headers": [*headers, (b"x-request-id", rid_now)]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
