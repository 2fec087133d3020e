"""Token usage out of upstream answers: OpenAI (chat, completions, embeddings, responses)
and Anthropic Messages, as JSON bodies or as SSE streams."""

from __future__ import annotations

import json
from typing import Any

import orjson

from ..core.pricing import Usage

OPENAI = "openai"
ANTHROPIC = "anthropic"


def _int(x: Any) -> int:
    return int(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 else 0


def from_openai_usage(u: dict[str, Any] | None) -> Usage | None:
    """chat/completions/embeddings use prompt_/completion_tokens; responses uses input_/output_tokens."""
    if not isinstance(u, dict):
        return None
    if "input_tokens" in u or "output_tokens" in u:
        details = u.get("input_tokens_details") or {}
        return Usage(input=_int(u.get("input_tokens")), output=_int(u.get("output_tokens")),
                     cached_input=_int(details.get("cached_tokens")))
    details = u.get("prompt_tokens_details") or {}
    return Usage(input=_int(u.get("prompt_tokens")), output=_int(u.get("completion_tokens")),
                 cached_input=_int(details.get("cached_tokens")))


def from_anthropic_usage(u: dict[str, Any] | None) -> Usage | None:
    """Anthropic's input_tokens exclude cache reads and writes; here input includes reads."""
    if not isinstance(u, dict):
        return None
    read = _int(u.get("cache_read_input_tokens"))
    return Usage(input=_int(u.get("input_tokens")) + read, output=_int(u.get("output_tokens")),
                 cached_input=read, cache_write=_int(u.get("cache_creation_input_tokens")))


def from_json_body(kind: str, body: dict[str, Any]) -> Usage | None:
    """Usage of a whole (non-streamed) answer, or None when it carries none."""
    if not isinstance(body, dict):
        return None
    if kind == ANTHROPIC:
        return from_anthropic_usage(body.get("usage"))
    return from_openai_usage(body.get("usage"))


class StreamMeter:
    """Follows an SSE stream event by event: the usage it reports, and the text it carried
    (to count output when the stream ends before any usage arrives)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.usage: Usage | None = None
        self.final = False  # the upstream's own final usage arrived
        self.text_chars = 0
        self._anthropic_input: dict[str, Any] = {}
        self._anthropic_output = 0

    def feed(self, data: str) -> dict[str, Any] | None:
        """One event's data; returns the parsed JSON (None for [DONE] or non-JSON)."""
        if not data or data == "[DONE]":
            return None
        try:
            obj = orjson.loads(data)  # every event is parsed: orjson is several times faster
        except orjson.JSONDecodeError:
            try:  # what orjson refuses and json takes (NaN, huge ints, lone surrogates)
                obj = json.loads(data)
            except ValueError:
                return None
        if not isinstance(obj, dict):
            return None
        if self.kind == ANTHROPIC:
            self._feed_anthropic(obj)
        else:
            self._feed_openai(obj)
        return obj

    def _feed_openai(self, obj: dict[str, Any]) -> None:
        t = obj.get("type")
        if isinstance(t, str) and t.startswith("response."):  # Responses API stream
            if t == "response.output_text.delta" and isinstance(obj.get("delta"), str):
                self.text_chars += len(obj["delta"])
            resp = obj.get("response")
            if isinstance(resp, dict) and resp.get("usage"):
                self.usage = from_openai_usage(resp["usage"])
                self.final = True
            return
        if obj.get("usage"):
            self.usage = from_openai_usage(obj["usage"])
            self.final = True
        for ch in obj.get("choices") or ():
            if not isinstance(ch, dict):
                continue
            delta = ch.get("delta") or {}
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str):
                self.text_chars += len(content)
            elif isinstance(ch.get("text"), str):  # legacy completions
                self.text_chars += len(ch["text"])

    def _feed_anthropic(self, obj: dict[str, Any]) -> None:
        t = obj.get("type")
        if t == "message_start":
            msg = obj.get("message") or {}
            self._anthropic_input = msg.get("usage") or {}
            self._anthropic_output = _int(self._anthropic_input.get("output_tokens"))
        elif t == "content_block_delta":
            d = obj.get("delta") or {}
            for k in ("text", "partial_json", "thinking"):
                if isinstance(d.get(k), str):
                    self.text_chars += len(d[k])
        elif t == "message_delta":
            u = obj.get("usage") or {}
            self._anthropic_output = max(self._anthropic_output, _int(u.get("output_tokens")))
            merged = {**self._anthropic_input, **{k: v for k, v in u.items() if v is not None}}
            merged["output_tokens"] = self._anthropic_output
            self.usage = from_anthropic_usage(merged)
            self.final = "output_tokens" in u
        if t == "message_start":
            merged = {**self._anthropic_input, "output_tokens": self._anthropic_output}
            self.usage = from_anthropic_usage(merged)
