"""Refusals in the upstream's own error format, so client SDKs read them as usual."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from .usage import ANTHROPIC

# Anthropic's error types by HTTP status (their documented set).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
}
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}


def proxy_error(
    kind: str, status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    if kind == ANTHROPIC:
        body: dict[str, Any] = {
            "type": "error",
            "error": {
                "type": _ANTHROPIC_TYPES.get(status, "api_error"),
                "message": message,
                "code": code,
                **extra,
            },
        }
    else:
        body = {
            "error": {
                "message": message,
                "type": _OPENAI_TYPES.get(status, "server_error"),
                "param": None,
                "code": code,
                **extra,
            }
        }
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)
