"""What a metered request may cost at most, and the output cap that bounds it upstream.

The hold is only a bound if the forwarded request cannot produce more than the hold paid
for. So every request is read for (a) the output cap it names, in the field(s) its route
uses, (b) everything that multiplies the output (`n`, `best_of`) or adds to it (a chat
prediction, billed at output rates when rejected), and (c) for embeddings, the input itself
(token arrays are counted exactly). The gateway then always sends the cap its hold paid
for, in the field the upstream obeys. Malformed values are refused, never defaulted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.pricing import ceil_div

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"
EMBEDDINGS = "/v1/embeddings"

# Fields that cap a route's output, and fields that multiply it.
CAP_FIELDS = {
    CHAT: ("max_completion_tokens", "max_tokens"),
    COMPLETIONS: ("max_tokens",),
    RESPONSES: ("max_output_tokens",),
    MESSAGES: ("max_tokens",),
    EMBEDDINGS: (),
}
CHAT_CAP_FIELDS = ("max_completion_tokens", "max_tokens")
# An OpenAI-compatible server may read another route's field as well ("max_tokens" on
# /v1/responses, "max_completion_tokens" on /v1/completions, "n" anywhere): every one of
# them present in a request is validated, counted, and sent with the cap.
ANY_CAP_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
MULTIPLIER_FIELDS = ("n", "best_of")  # best_of completions are generated (and billed) server-side
COUNT_FIELDS = ANY_CAP_FIELDS + MULTIPLIER_FIELDS


class BadRequest(ValueError):
    """A request field the worst case cannot be computed from (answered 400)."""


def _count(body: dict[str, Any], name: str) -> int | None:
    """A positive integer field, None when absent (or null)."""
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise BadRequest(f"{name} must be a positive integer (got {v!r:.40})")
    return v


@dataclass(frozen=True, slots=True)
class OutputPlan:
    """The output side of a request: the cap per choice it asked for (None: none named),
    how many choices it generates, and output tokens it adds regardless of the cap."""

    requested: int | None
    multiplier: int = 1
    extra: int = 0

    def total(self, per_choice: int) -> int:
        return per_choice * self.multiplier + self.extra

    def per_choice(self, total: int) -> int:
        """The largest cap per choice whose total stays within `total` tokens."""
        return max(0, (total - self.extra) // self.multiplier)


def output_plan(path: str, body: dict[str, Any], chars_per_token: int) -> OutputPlan:
    if path == EMBEDDINGS:
        return OutputPlan(None)
    caps = [c for c in (_count(body, f) for f in ANY_CAP_FIELDS) if c is not None]
    multiplier = max([m for m in (_count(body, f) for f in MULTIPLIER_FIELDS) if m is not None], default=1)
    extra = 0
    if path == CHAT:
        extra = _prediction_tokens(body.get("prediction"), chars_per_token)
    # Several cap fields named: the tighter one is what the caller asked for.
    return OutputPlan(min(caps) if caps else None, multiplier, extra)


def _prediction_tokens(pred: Any, chars_per_token: int) -> int:
    """Predicted output that the model rejects is billed at output rates: count it in."""
    if not isinstance(pred, dict):
        return 0
    content = pred.get("content")
    if isinstance(content, str):
        size = len(content.encode())
    elif isinstance(content, list):
        size = sum(
            len(p["text"].encode()) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    else:
        return 0
    return ceil_div(size, chars_per_token)


def set_output_cap(path: str, body: dict[str, Any], tokens: int, chat_field: str) -> None:
    """Writes the cap into the request: into the route's own field, and into any other cap
    field the caller named. Chat: into whichever of max_completion_tokens / max_tokens the
    caller used (both, consistently, if it used both), else `chat_field` (OpenAI refuses
    max_tokens for its reasoning models; some compatible servers only know max_tokens: the
    upstream's configuration says which)."""
    if path == CHAT:
        named = [f for f in CHAT_CAP_FIELDS if body.get(f) is not None]
        for f in named or [chat_field]:
            body[f] = tokens
    elif CAP_FIELDS.get(path):
        body[CAP_FIELDS[path][0]] = tokens
    for f in ANY_CAP_FIELDS:  # another route's field the caller named: the same cap
        if body.get(f) is not None:
            body[f] = tokens


def embedding_input_tokens(body: dict[str, Any]) -> int:
    """Tokens of an embeddings input given as token arrays, counted exactly (a JSON array
    of small ints is 2 bytes a token, below any size-based estimate); 0 for text."""
    inp = body.get("input")
    if not isinstance(inp, list) or not inp:
        return 0
    if all(isinstance(t, int) and not isinstance(t, bool) for t in inp):
        return len(inp)
    return sum(len(x) for x in inp if isinstance(x, list))
