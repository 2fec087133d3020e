"""The Anthropic kind: the Messages API (/v1/messages), its stream events and its error format."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

from ...core.pricing import Usage
from ...http_errors import error_body
from ..features import tools_used
from ..stream_meter import StreamMeter
from ..usage import add_text, count, parsed
from .base import Adapter

MESSAGES = "/v1/messages"

# Built-in tool types (by prefix) and the feature each is.
_TOOLS = (
    ("web_search", "web_search"),
    ("web_fetch", "web_fetch"),
    ("code_execution", "code_execution"),
)


class Anthropic(Adapter):
    name = "anthropic"
    routes = (MESSAGES,)
    error_prefixes = (MESSAGES,)  # count_tokens, batches...: refused in this format too
    forwarded_headers = frozenset({"accept"})
    default_headers: ClassVar[Mapping[str, str]] = {"anthropic-version": "2023-06-01"}
    # Its own cap is max_tokens; the other names and multipliers are read too, as a
    # compatible server may obey them.
    cap_fields = ("max_tokens", "max_completion_tokens", "max_output_tokens")
    route_cap_fields: ClassVar[Mapping[str, tuple[str, ...]]] = {MESSAGES: ("max_tokens",)}
    multiplier_fields = ("n", "best_of")
    # Their documented error types by HTTP status.
    error_types: ClassVar[Mapping[int, str]] = {
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
    default_error_type = "api_error"

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"x-api-key": api_key}

    def features(self, path: str, body: dict[str, Any]) -> set[str]:
        found: set[str] = set()
        if body.get("service_tier") not in (None, "auto", "standard_only"):
            found.add("service_tier")
        found |= tools_used(body, _TOOLS)
        if body.get("mcp_servers"):
            found.add("mcp")
        if body.get("container") is not None:
            found.add("code_execution")
        return found

    def usage_of(self, path: str, body: Any) -> Usage | None:
        return from_anthropic_usage(body.get("usage")) if isinstance(body, dict) else None

    def answer_texts(self, body: Any) -> list[str] | None:
        if not isinstance(body, dict):
            return None
        blocks = body.get("content")
        if not isinstance(blocks, list):
            return None
        out: list[str] = []
        for b in blocks:
            if not isinstance(b, dict):
                continue
            if b.get("type") == "text":
                add_text(out, b.get("text"))
            elif b.get("type") == "thinking":
                add_text(out, b.get("thinking"))
            elif b.get("type") == "tool_use":
                add_text(out, b.get("name"))
                out.append(json.dumps(b.get("input"), ensure_ascii=False, separators=(",", ":")))
        return out

    def stream_meter(self, keep_chars: int | None = None) -> StreamMeter:
        return AnthropicStreamMeter(keep_chars)

    def error_body(self, status: int, code: str, message: str, details: Mapping[str, Any]) -> dict[str, Any]:
        return error_body(
            code, message, details, fields=self.error_fields(status), envelope={"type": "error"}
        )


def from_anthropic_usage(u: Any) -> Usage | None:
    """Anthropic's input_tokens exclude cache reads and writes; here input includes reads."""

    def parse(u: dict[str, Any]) -> Usage:
        read = count(u, "cache_read_input_tokens")
        return Usage(
            input=count(u, "input_tokens", True) + read,
            output=count(u, "output_tokens", True),
            cached_input=read,
            cache_write=count(u, "cache_creation_input_tokens"),
        )

    return parsed(parse, u)


class AnthropicStreamMeter(StreamMeter):
    """message_start (input usage), content_block_delta (text), message_delta (output usage)."""

    def __init__(self, keep_chars: int | None = None) -> None:
        super().__init__(keep_chars)
        self._input: dict[str, Any] = {}

    def _event(self, obj: dict[str, Any]) -> None:
        t = obj.get("type")
        if t == "message_start":
            msg = obj.get("message") or {}
            u = msg.get("usage") if isinstance(msg, dict) else None
            self._input = u if isinstance(u, dict) else {}
        elif t == "content_block_delta":
            d = obj.get("delta") or {}
            for k in ("text", "partial_json", "thinking"):
                if isinstance(d.get(k), str):
                    self._text(obj.get("index"), d[k])
        elif t == "message_delta":
            u = obj.get("usage")
            u = u if isinstance(u, dict) else {}
            merged = {**self._input, **{k: v for k, v in u.items() if v is not None}}
            self.usage = from_anthropic_usage(merged)  # None when malformed: counted instead
            self.final = self.usage is not None and "output_tokens" in u
        if t == "message_start":
            self.usage = from_anthropic_usage(self._input)
