"""The API's refusals: every exception a route may raise, answered as one JSON error shape
({"error": {"code", "message", ...details}}, built by gateway/http_errors.py).

Domain refusals (gateway/core/errors.py) get their HTTP status here, from http_errors.

Every 503 carries Retry-After. Redis not answering (a connection refused or lost, a timeout,
a cluster failing over) is 503 `credit_store_unavailable`; the durable store not answering
(admin reads such as the ledger, key and limit records) is 503 `store_unavailable`. Both are
logged as one line, never as a traceback: they say nothing about the code.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping
from typing import Any, Protocol

import redis.exceptions as redis_errors
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.errors import CreditError
from ..core.keys import ID_CHARS, ID_PATTERN, InvalidId
from ..core.money import AmountError
from ..http_errors import error_body, status_of

log = logging.getLogger("credit.api")

RETRY_AFTER_S = "1"

# Redis did not answer. redis-py and the multiplexed client (gateway/core/multiplex.py)
# raise the same classes: ConnectionError (BusyLoadingError, a full pool, a refused or
# lost connection) and TimeoutError; a cluster adds its failover answers.
REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.MasterDownError,
    redis_errors.ReadOnlyError,
)

# The durable store did not answer (SQLite busy or failing I/O; MongoDB or PostgreSQL
# unreachable, slow, or refusing connections).
STORE_UNAVAILABLE: tuple[type[Exception], ...] = (sqlite3.OperationalError,)
try:
    from pymongo.errors import ConnectionFailure, ExecutionTimeout, WTimeoutError

    STORE_UNAVAILABLE += (ConnectionFailure, ExecutionTimeout, WTimeoutError)
except ImportError:  # pragma: no cover - pymongo is optional (SQLite deployments)
    pass
try:
    from asyncpg import (
        CannotConnectNowError,
        PostgresConnectionError,
        QueryCanceledError,
        TooManyConnectionsError,
    )

    from ..core.store.postgres_pool import StoreUnreachable

    STORE_UNAVAILABLE += (
        StoreUnreachable,
        PostgresConnectionError,
        CannotConnectNowError,
        TooManyConnectionsError,
        QueryCanceledError,
    )
except ImportError:  # pragma: no cover - asyncpg is optional (the postgres extra)
    pass


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None, /, **details: Any
) -> JSONResponse:
    if status == 503 and not any(h.lower() == "retry-after" for h in (headers or {})):
        headers = {**(headers or {}), "Retry-After": RETRY_AFTER_S}
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


class ApiError(Exception):
    """A refusal raised by route code."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        /,
        **details: Any,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.details = (
            status,
            code,
            message,
            headers,
            details,
        )


class ServiceRefusal(Protocol):
    """A selling service's refusal (payments, promo codes, plans, notifications): it names
    its own status."""

    status: int
    code: str
    message: str


def refusal(exc: ServiceRefusal) -> ApiError:
    """The API's error for a selling service's refusal."""
    return ApiError(exc.status, exc.code, exc.message)


# Error types of the API's own validators (gateway/api/schemas.py) that are also its codes.
_OWN_CODES = {"invalid_amount", "invalid_expiry"}

# Pydantic error types that mean "the body is not a JSON object" when reported on the body itself.
_NOT_AN_OBJECT = {"model_attributes_type", "model_type", "dict_type"}


def _json_error_message(e: dict, doc: Any) -> str:
    reason = (e.get("ctx") or {}).get("error") or "JSON decode error"
    loc = e.get("loc", ())
    pos = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
    if pos is None:
        return f"the body is not valid JSON: {reason}"
    if isinstance(doc, (bytes, bytearray)):
        doc = doc.decode("utf-8", "replace")
    if isinstance(doc, str):
        line = doc.count("\n", 0, pos) + 1
        col = pos - (doc.rfind("\n", 0, pos) + 1) + 1
        return f"the body is not valid JSON: {reason} at line {line}, column {col} (character {pos})"
    return f"the body is not valid JSON: {reason} at character {pos}"


def _validation_message(exc: RequestValidationError, content_type: str) -> tuple[str, str, list]:
    """(code, message, problems) for a refused request."""
    errors = exc.errors()
    problems = []
    for e in errors:
        loc = tuple(e.get("loc", ()))
        kind = e.get("type")
        msg = str(e.get("msg", "invalid"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if kind == "json_invalid":
            problems.append({"field": "", "problem": _json_error_message(e, exc.body)})
            continue
        if loc == ("body",) and kind == "missing":
            msg = "a JSON body is required"
        elif loc == ("body",) and kind in _NOT_AN_OBJECT:
            if content_type and "json" not in content_type.lower():
                msg = (
                    "the body must be a JSON object sent with Content-Type: application/json "
                    f"(not {content_type[:60]})"
                )
            else:
                msg = "the body must be a JSON object"
        elif kind == "string_pattern_mismatch" and (e.get("ctx") or {}).get("pattern") == ID_PATTERN.pattern:
            msg = f"must be 1-128 characters of {ID_CHARS}"
        field = ".".join(str(p) for p in loc if p != "body")
        if loc and loc[0] in ("header", "query", "path"):
            field = f"{loc[0]} {'.'.join(str(p) for p in loc[1:])}"
        problems.append({"field": field, "problem": msg})
    text = "; ".join(f"{p['field']}: {p['problem']}" if p["field"] else p["problem"] for p in problems)
    if any(e.get("type") == "json_invalid" for e in errors):
        code = "malformed_json"
    elif errors and len({e.get("type") for e in errors}) == 1 and errors[0].get("type") in _OWN_CODES:
        code = errors[0]["type"]
    else:
        code = "invalid_request"
    return code, text or "invalid request", problems


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CreditError)
    async def _credit(_: Request, exc: CreditError):
        details = {k: v for k, v in exc.details.items() if k != "reason"}
        return error_response(
            status_of(exc), exc.code, str(exc.details.get("reason") or exc), None, **details
        )

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers, **exc.details)

    @app.exception_handler(AmountError)
    async def _amount(_: Request, exc: AmountError):
        return error_response(422, "invalid_amount", str(exc))

    @app.exception_handler(InvalidId)
    async def _ident(_: Request, exc: InvalidId):
        return error_response(422, "invalid_id", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        code, text, problems = _validation_message(exc, request.headers.get("content-type", ""))
        return error_response(422, code, text, None, problems=problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        codes = {
            401: "unauthorized",
            403: "forbidden",
            404: "not_found",
            405: "method_not_allowed",
            413: "body_too_large",
        }
        return error_response(
            exc.status_code,
            codes.get(exc.status_code, "http_error"),
            str(exc.detail),
            getattr(exc, "headers", None),
        )

    async def _redis_down(request: Request, exc: Exception):
        log.warning(
            "%s %s: Redis did not answer: %s: %s", request.method, request.url.path, type(exc).__name__, exc
        )
        return error_response(
            503, "credit_store_unavailable", "the credit store (Redis) did not answer; retry shortly"
        )

    async def _store_down(request: Request, exc: Exception):
        log.warning(
            "%s %s: the store did not answer: %s: %s",
            request.method,
            request.url.path,
            type(exc).__name__,
            exc,
        )
        return error_response(503, "store_unavailable", "the durable store did not answer; retry shortly")

    for cls in REDIS_UNAVAILABLE:
        app.add_exception_handler(cls, _redis_down)
    for cls in STORE_UNAVAILABLE:
        app.add_exception_handler(cls, _store_down)
