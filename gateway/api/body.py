"""Request bodies: a size cap before anything is parsed, and JSON numbers read as Decimal."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
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
                    await error_response(413, "body_too_large", f"request body above {cap} bytes")(
                        scope, receive, send
                    )
                    return
        seen = 0

        async def capped() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > cap:
                    raise BodyTooLarge(cap)
            return msg

        try:
            await self.app(scope, capped, send)
        except BodyTooLarge:
            # Only reached when nothing in between answered it (the app's exception
            # handlers do, as a 413, when it is raised while a route reads the body).
            await error_response(413, "body_too_large", f"request body above {cap} bytes")(
                scope, receive, send
            )


class BodyTooLarge(HTTPException):
    """Raised from inside `receive` (a chunked body over the cap). An HTTPException, since
    FastAPI re-raises those from its body parsing (anything else becomes a 400 "There was
    an error parsing the body"); the app's handler answers it as 413 body_too_large."""

    def __init__(self, cap: int) -> None:
        super().__init__(413, f"request body above {cap} bytes")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _decimal(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:  # an exponent beyond Decimal's range: an amount refuses it
        return Decimal("-Infinity" if text.startswith("-") else "Infinity")


def _int(text: str) -> int | Decimal:
    # Python refuses int() of more than 4300 digits; no count or amount is that long, and a
    # Decimal is refused by every int field and by every amount check in range.
    return int(text) if len(text) <= 40 else Decimal(text)


def _lone_surrogate(x: Any) -> bool:
    if isinstance(x, str):
        return any("\ud800" <= c <= "\udfff" for c in x)
    if isinstance(x, dict):
        return any(_lone_surrogate(k) or _lone_surrogate(v) for k, v in x.items())
    if isinstance(x, list):
        return any(_lone_surrogate(v) for v in x)
    return False


def parse_json(body: bytes) -> Any:
    """JSON with every number exact: ints stay ints, the rest Decimal (never float).
    NaN / Infinity are refused, and so are strings that are not Unicode text (a lone
    surrogate, which no answer could carry back); every failure is a json.JSONDecodeError."""
    try:
        value = json.loads(body, parse_float=_decimal, parse_int=_int, parse_constant=_no_constants)
        # Only an escape (\ud800) or surrogate bytes (ED A0..BF) can make one.
        if (b"\\u" in body or b"\xed" in body) and _lone_surrogate(value):
            raise ValueError("a string holds a lone surrogate: not Unicode text")
        return value
    except json.JSONDecodeError:
        raise
    except ValueError as exc:  # a constant (NaN), or bytes that are not UTF-8
        raise json.JSONDecodeError(str(exc), body.decode("utf-8", "replace"), 0) from exc
    except RecursionError as exc:
        raise json.JSONDecodeError("nested too deeply", body.decode("utf-8", "replace"), 0) from exc


class DecimalRequest(Request):
    """JSON numbers become Decimal (never float); NaN / Infinity are refused."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class DecimalRoute(APIRoute):
    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            return await handler(DecimalRequest(request.scope, request.receive))

        return route
