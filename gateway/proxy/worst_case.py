"""What a metered request may cost at most, and the output cap that bounds it upstream.

The hold is only a bound if the forwarded request cannot produce more than the hold paid
for. So every request is read for (a) the output cap it names, in every field an upstream
may obey, (b) everything that multiplies the output (`n`, `best_of`) or adds to it, and
(c) input it states exactly (token arrays). The gateway then always sends the cap its
hold paid for. Malformed values are refused, never defaulted. Which fields a request has
is the upstream kind's business (gateway/proxy/kinds/); the reading is done here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


class BadRequest(ValueError):
    """A request field the worst case cannot be computed from (answered 400)."""


def positive_int(body: dict[str, Any], name: str) -> int | None:
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


def output_plan(
    body: dict[str, Any], cap_fields: Iterable[str], multiplier_fields: Iterable[str], extra: int = 0
) -> OutputPlan:
    """The plan of a request whose output is capped by `cap_fields` and multiplied by
    `multiplier_fields` (every one present is validated); `extra` tokens are added."""
    caps = [c for c in (positive_int(body, f) for f in cap_fields) if c is not None]
    multiplier = max(
        [m for m in (positive_int(body, f) for f in multiplier_fields) if m is not None], default=1
    )
    # Several cap fields named: the tighter one is what the caller asked for.
    return OutputPlan(min(caps) if caps else None, multiplier, extra)


def set_output_cap(body: dict[str, Any], own: Iterable[str], tokens: int, named: Iterable[str]) -> None:
    """Writes the cap into the request: into the route's own field(s) `own`, and into every
    field of `named` the caller named (one of them may be what the upstream obeys)."""
    for f in own:
        body[f] = tokens
    for f in named:
        if body.get(f) is not None:
            body[f] = tokens
