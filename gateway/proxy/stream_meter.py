"""Following an SSE stream of an LLM answer: the usage it reports and the text it carries.

The text is what a stream that ends without usage is charged from, and what the hard cap
bounds the cost with while the stream runs (gateway/proxy/credit_cap.py). Each upstream
kind subclasses StreamMeter to read its own events (gateway/proxy/kinds/).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from typing import Any

import orjson

from ..core.pricing import Usage, ceil_div
from .usage import count_output

# Output text a StreamMeter keeps to count when the stream ends without usage: 1 Mi
# characters is past the longest answer a model gives (~250k tokens); beyond it the rest
# is estimated from its length.
DEFAULT_KEEP_CHARS = 1 << 20
_COMPACT_AT = 512  # small deltas joined into one string at this many (memory per delta)


class StreamMeter(ABC):
    """Follows an SSE stream event by event: the usage it reports, and the text it carried
    (to count output when the stream ends before any usage arrives).

    The text is kept per choice / output item / content block (each counted on its own),
    up to `keep_chars` characters in all; past that only its length is kept. A kind's
    subclass reads its events (`_event`): the usage they report, the text they carry."""

    def __init__(self, keep_chars: int | None = None) -> None:
        if keep_chars is None:
            keep_chars = DEFAULT_KEEP_CHARS
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
            obj = orjson.loads(data)  # every event is parsed: orjson is the fast parser
        except orjson.JSONDecodeError:
            try:  # what orjson refuses and json takes (NaN, huge ints, lone surrogates)
                obj = json.loads(data)
            except ValueError:
                return None
        if not isinstance(obj, dict):
            return None
        self._event(obj)
        return obj

    @abstractmethod
    def _event(self, obj: dict[str, Any]) -> None:
        """One parsed event: sets `usage` / `final` from it, passes its text to `_text`."""
