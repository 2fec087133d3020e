"""Request bodies: a size cap before anything is parsed, and JSON numbers read as Decimal."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any, Callable

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response


class BodyLimitMiddleware:
    """Answers 413 when a body exceeds `limit(path)` bytes (by Content-Length, or as it streams)."""

    def __init__(self, app: ASGIApp, limit: Callable[[str], int]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = self.limit(scope["path"])
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > cap
                except ValueError:
                    too_big = True
                if too_big:
                    await error_response(413, "body_too_large", f"request body above {cap} bytes")(scope, receive, send)
                    return
        seen = 0

        async def capped() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > cap:
                    raise _TooLarge()
            return msg

        try:
            await self.app(scope, capped, send)
        except _TooLarge:
            await error_response(413, "body_too_large", f"request body above {cap} bytes")(scope, receive, send)


class _TooLarge(Exception):
    pass


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


class DecimalRequest(Request):
    """JSON numbers become Decimal (never float); NaN / Infinity are refused."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            self._json = json.loads(body, parse_float=Decimal, parse_constant=_no_constants)
        return self._json


class DecimalRoute(APIRoute):
    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            return await handler(DecimalRequest(request.scope, request.receive))

        return route
