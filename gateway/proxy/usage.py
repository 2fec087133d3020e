"""Token usage out of upstream answers: OpenAI (chat, completions, embeddings, responses)
and Anthropic Messages, as JSON bodies or as SSE streams."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import orjson

from ..core.pricing import Usage, ceil_div

log = logging.getLogger("credit.proxy")

OPENAI = "openai"
ANTHROPIC = "anthropic"
# Output text a StreamMeter keeps to count when the stream ends without usage: 1 Mi
# characters is past the longest answer a model gives (~250k tokens); beyond it the rest
# is estimated from its length.
DEFAULT_KEEP_CHARS = 1 << 20
_COMPACT_AT = 512  # small deltas joined into one string at this many (memory per delta)


class _Malformed(ValueError):
    """Usage whose counts are not counts: the answer is treated as carrying none (counted)."""


def _count(u: dict[str, Any], name: str, required: bool = False) -> int:
    """A token count as reported: a non-negative whole number (NaN, infinities, strings,
    negatives and fractions are not counts); absent: 0, or malformed when required."""
    x = u.get(name)
    if x is None:
        if required:
            raise _Malformed(f"no {name}")
        return 0
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x < float("inf") or x != int(x):
        raise _Malformed(f"{name} = {x!r:.40}")
    return int(x)


def _parsed(parse: Callable[[dict[str, Any]], Usage], u: Any) -> Usage | None:
    if not isinstance(u, dict):
        return None
    try:
        return parse(u)
    except _Malformed as exc:
        log.warning("the upstream reported malformed usage (%s): it is counted instead", exc)
        return None


def from_openai_usage(u: Any, output_required: bool = True) -> Usage | None:
    """chat/completions/embeddings use prompt_/completion_tokens; responses uses
    input_/output_tokens. None: no usage, or usage that is not counts (then the gateway
    counts it); embeddings report no output (`output_required` False)."""

    def parse(u: dict[str, Any]) -> Usage:
        if "input_tokens" in u or "output_tokens" in u:
            details = u.get("input_tokens_details") or {}
            return Usage(
                input=_count(u, "input_tokens", True),
                output=_count(u, "output_tokens", output_required),
                cached_input=_count(details, "cached_tokens") if isinstance(details, dict) else 0,
            )
        details = u.get("prompt_tokens_details") or {}
        return Usage(
            input=_count(u, "prompt_tokens", True),
            output=_count(u, "completion_tokens", output_required),
            cached_input=_count(details, "cached_tokens") if isinstance(details, dict) else 0,
        )

    return _parsed(parse, u)


def from_anthropic_usage(u: Any) -> Usage | None:
    """Anthropic's input_tokens exclude cache reads and writes; here input includes reads."""

    def parse(u: dict[str, Any]) -> Usage:
        read = _count(u, "cache_read_input_tokens")
        return Usage(
            input=_count(u, "input_tokens", True) + read,
            output=_count(u, "output_tokens", True),
            cached_input=read,
            cache_write=_count(u, "cache_creation_input_tokens"),
        )

    return _parsed(parse, u)


def from_json_body(kind: str, body: Any, path: str = "") -> Usage | None:
    """Usage of a whole (non-streamed) answer, or None when it carries none (or none that
    is counts)."""
    if not isinstance(body, dict):
        return None
    if kind == ANTHROPIC:
        return from_anthropic_usage(body.get("usage"))
    return from_openai_usage(body.get("usage"), output_required=path != "/v1/embeddings")


def count_output(
    texts: Iterable[str], count: Callable[[str], int | None], chars_per_token: int, extra_chars: int = 0
) -> int:
    """Output tokens of some texts: counted by `count` (None: no tokenizer for the model),
    else, as `extra_chars` always, estimated at ceil(chars / chars_per_token)."""
    texts = list(texts)
    total = 0
    for text in texts:
        n = count(text) if text else 0
        if n is None:
            return ceil_div(sum(map(len, texts)) + extra_chars, chars_per_token)
        total += n
    return total + ceil_div(extra_chars, chars_per_token)


def answer_texts(kind: str, body: Any) -> list[str] | None:
    """The texts a whole (non-streamed) answer generated: its output tokens when it reports
    no usage. One entry per message part, tool call argument or text block; an embeddings
    answer generates none. None: not an answer shape known here (estimate from its size)."""
    if not isinstance(body, dict):
        return None
    out: list[str] = []
    if kind == ANTHROPIC:
        blocks = body.get("content")
        if not isinstance(blocks, list):
            return None
        for b in blocks:
            if not isinstance(b, dict):
                continue
            if b.get("type") == "text":
                _add(out, b.get("text"))
            elif b.get("type") == "thinking":
                _add(out, b.get("thinking"))
            elif b.get("type") == "tool_use":
                _add(out, b.get("name"))
                out.append(json.dumps(b.get("input"), ensure_ascii=False, separators=(",", ":")))
        return out
    if isinstance(body.get("choices"), list):
        for ch in body["choices"]:
            if not isinstance(ch, dict):
                continue
            msg = ch.get("message")
            if isinstance(msg, dict):
                if msg.get("audio"):
                    return None  # audio tokens are not text
                content = msg.get("content")
                if isinstance(content, list):
                    for part in content:
                        if isinstance(part, dict):
                            _add(out, part.get("text"))
                else:
                    _add(out, content)
                _add(out, msg.get("refusal"))
                for call in msg.get("tool_calls") or ():
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict):
                        _add(out, fn.get("name"))
                        _add(out, fn.get("arguments"))
                fc = msg.get("function_call")
                if isinstance(fc, dict):
                    _add(out, fc.get("name"))
                    _add(out, fc.get("arguments"))
            else:
                _add(out, ch.get("text"))  # legacy completions
        return out
    if isinstance(body.get("output"), list):  # Responses API
        for item in body["output"]:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "message":
                for part in item.get("content") or ():
                    if isinstance(part, dict):
                        _add(
                            out,
                            part.get("text") if part.get("type") == "output_text" else part.get("refusal"),
                        )
            elif item.get("type") == "function_call":
                _add(out, item.get("name"))
                _add(out, item.get("arguments"))
        return out
    if isinstance(body.get("data"), list):  # embeddings: vectors, no generated text
        return out
    return None


def _add(out: list[str], value: Any) -> None:
    if isinstance(value, str) and value:
        out.append(value)


class StreamMeter:
    """Follows an SSE stream event by event: the usage it reports, and the text it carried
    (to count output when the stream ends before any usage arrives).

    The text is kept per choice / output item / content block (each counted on its own),
    up to `keep_chars` characters in all; past that only its length is kept."""

    def __init__(self, kind: str, keep_chars: int = DEFAULT_KEEP_CHARS) -> None:
        self.kind = kind
        self.usage: Usage | None = None
        self.final = False  # the upstream's own final usage arrived
        self.text_chars = 0
        # For a bound that text dense in tokens cannot slip under (the hard cap): ASCII text
        # is estimated at chars_per_token, anything else at one token per UTF-8 byte (byte-
        # level BPE never makes more tokens than bytes; emoji, CJK and such are 1-3 a char).
        self.ascii_chars = 0
        self.other_bytes = 0
        self._keep = keep_chars
        self._room = keep_chars  # characters it may still keep
        self._parts: dict[Hashable, list[str]] = {}  # recent deltas, per key
        self._chunks: dict[Hashable, list[str]] = {}  # joined deltas, per key
        self._anthropic_input: dict[str, Any] = {}

    def _text(self, key: Hashable, s: str) -> None:
        # Runs for every delta: the common case is one length check and one append.
        n = len(s)
        self.text_chars += n
        if s.isascii():
            self.ascii_chars += n
        else:
            self.other_bytes += len(s.encode("utf-8", "surrogatepass"))
        if n > self._room:
            if self._room <= 0:
                return
            s, n = s[: self._room], self._room
        self._room -= n
        parts = self._parts.get(key)
        if parts is None:
            self._parts[key] = [s]
        else:
            parts.append(s)
            if len(parts) >= _COMPACT_AT:
                self._chunks.setdefault(key, []).append("".join(parts))
                parts.clear()

    def bound_tokens(self, chars_per_token: int) -> int:
        """Output tokens streamed so far, at most: the ASCII text at chars_per_token, the
        rest at one token per byte."""
        return ceil_div(self.ascii_chars, chars_per_token) + self.other_bytes

    @property
    def kept_chars(self) -> int:
        return self._keep - self._room

    def texts(self) -> list[str]:
        """The kept output text, one string per choice / output item / content block."""
        return ["".join(self._chunks.get(k, ())) + "".join(p) for k, p in self._parts.items()]

    def output_tokens(self, count: Callable[[str], int | None], chars_per_token: int) -> int:
        """Output tokens streamed so far: the kept text counted by `count` (None: no
        tokenizer for the model; then all of it is estimated at chars_per_token), the text
        past the cap estimated."""
        return count_output(self.texts(), count, chars_per_token, self.text_chars - self.kept_chars)

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
            if t in _RESPONSES_TEXT and isinstance(obj.get("delta"), str):
                self._text(obj.get("output_index"), obj["delta"])
            resp = obj.get("response")
            if isinstance(resp, dict) and resp.get("usage"):
                self.usage = from_openai_usage(resp["usage"])
                self.final = self.usage is not None  # malformed: counted instead
            return
        if obj.get("usage"):
            self.usage = from_openai_usage(obj["usage"])
            self.final = self.usage is not None  # malformed: counted instead
        for ch in obj.get("choices") or ():
            if not isinstance(ch, dict):
                continue
            delta = ch.get("delta")
            if isinstance(delta, dict):
                content = delta.get("content")
                if isinstance(content, str):
                    self._text(ch.get("index"), content)
                if len(delta) > 1 or content is None:  # rarer: a refusal, tool or function calls
                    self._delta_calls(ch.get("index"), delta)
            elif isinstance(ch.get("text"), str):  # legacy completions
                self._text(ch.get("index"), ch["text"])

    def _delta_calls(self, index: Any, delta: dict[str, Any]) -> None:
        if isinstance(delta.get("refusal"), str):
            self._text(index, delta["refusal"])
        for call in delta.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                key = (index, "tool", call.get("index"))
                for k in ("name", "arguments"):
                    if isinstance(fn.get(k), str):
                        self._text(key, fn[k])
        fc = delta.get("function_call")
        if isinstance(fc, dict):
            for k in ("name", "arguments"):
                if isinstance(fc.get(k), str):
                    self._text((index, "function"), fc[k])

    def _feed_anthropic(self, obj: dict[str, Any]) -> None:
        t = obj.get("type")
        if t == "message_start":
            msg = obj.get("message") or {}
            u = msg.get("usage") if isinstance(msg, dict) else None
            self._anthropic_input = u if isinstance(u, dict) else {}
        elif t == "content_block_delta":
            d = obj.get("delta") or {}
            for k in ("text", "partial_json", "thinking"):
                if isinstance(d.get(k), str):
                    self._text(obj.get("index"), d[k])
        elif t == "message_delta":
            u = obj.get("usage")
            u = u if isinstance(u, dict) else {}
            merged = {**self._anthropic_input, **{k: v for k, v in u.items() if v is not None}}
            self.usage = from_anthropic_usage(merged)  # None when malformed: counted instead
            self.final = self.usage is not None and "output_tokens" in u
        if t == "message_start":
            self.usage = from_anthropic_usage(self._anthropic_input)


# Responses API stream events whose delta is generated text.
_RESPONSES_TEXT = frozenset(
    {"response.output_text.delta", "response.refusal.delta", "response.function_call_arguments.delta"}
)
