"""Reading token counts: the checks every kind's usage parser applies to reported counts,
and output tokens counted from generated text when none are reported."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from ..core.pricing import Usage, ceil_div

log = logging.getLogger("credit.proxy")


class Malformed(ValueError):
    """Usage whose counts are not counts: the answer is treated as carrying none (counted)."""


def count(u: dict[str, Any], name: str, required: bool = False) -> int:
    """A token count as reported: a non-negative whole number (NaN, infinities, strings,
    negatives and fractions are not counts); absent: 0, or malformed when required."""
    x = u.get(name)
    if x is None:
        if required:
            raise Malformed(f"no {name}")
        return 0
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x < float("inf") or x != int(x):
        raise Malformed(f"{name} = {x!r:.40}")
    return int(x)


def parsed(parse: Callable[[dict[str, Any]], Usage], u: Any) -> Usage | None:
    """`parse(u)`, or None when `u` is no usage object or its counts are malformed."""
    if not isinstance(u, dict):
        return None
    try:
        return parse(u)
    except Malformed as exc:
        log.warning("the upstream reported malformed usage (%s): it is counted instead", exc)
        return None


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


def add_text(out: list[str], value: Any) -> None:
    """Appends `value` to an answer's texts when it is non-empty text."""
    if isinstance(value, str) and value:
        out.append(value)
