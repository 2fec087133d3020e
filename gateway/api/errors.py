"""One JSON error shape for every refusal: {"error": {"code", "message", ...details}}."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.errors import CreditError
from ..core.keys import InvalidId
from ..core.money import AmountError


def error_response(status: int, code: str, message: str, headers: dict | None = None, **details: Any) -> JSONResponse:
    body = {"code": code, "message": message}
    body.update({k: (str(v) if isinstance(v, Decimal) else v) for k, v in details.items()})
    return JSONResponse({"error": body}, status_code=status, headers=headers)


class ApiError(Exception):
    """A refusal raised by route code."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None, **details: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.details = status, code, message, headers, details


def _validation_message(exc: RequestValidationError) -> tuple[str, list]:
    problems = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        msg = e.get("msg", "invalid")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        problems.append({"field": loc, "problem": msg})
    text = "; ".join(f"{p['field']}: {p['problem']}" if p["field"] else p["problem"] for p in problems)
    return text or "invalid request", problems


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CreditError)
    async def _credit(_: Request, exc: CreditError):
        details = {k: v for k, v in exc.details.items() if k != "reason"}
        return error_response(exc.http_status, exc.code, str(exc.details.get("reason") or exc), **details)

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
    async def _validation(_: Request, exc: RequestValidationError):
        text, problems = _validation_message(exc)
        code = "malformed_json" if any(e.get("type") == "json_invalid" for e in exc.errors()) else "invalid_request"
        return error_response(422, code, text, problems=problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        codes = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail), getattr(exc, "headers", None))
