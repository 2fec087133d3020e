"""Token counts with the model's own tokenizer, offline.

For the requests and answers whose usage the upstream never reported (a stream cut before
its usage chunk, an answer without usage) the proxy charges counted tokens where it knows
the model's tokenizer, and falls back to its size estimate where it does not (None here).

Tokenizers: OpenAI's o200k_base and cl100k_base, through toktok-rs, whose wheels carry the
two vocabularies compiled in: nothing is downloaded, ever (tiktoken fetches its BPE files
on first use). Its counts equal tiktoken's (docs/tokens.md: how that was checked, and why
this package). Anthropic publishes no offline tokenizer for Claude: None (estimated).

Loading an encoding takes about a second and 15-30 MB, once per process, on first use:
call the counting from a worker thread (asyncio.to_thread), never on the event loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from .prompt_tokens import CL100K, O200K, Uncountable, prompt_tokens

log = logging.getLogger("credit.proxy.tokens")

# Exact names, then prefixes (first match wins; gpt-4o before gpt-4-). Dated and suffixed
# variants (gpt-4o-mini-2024-07-18, o3-pro, gpt-5-codex) take their family's encoding.
_EXACT = {
    "gpt-4": CL100K,
    "gpt-3.5-turbo": CL100K,
    "gpt-3.5": CL100K,
    "gpt-35-turbo": CL100K,
    "text-embedding-3-small": CL100K,
    "text-embedding-3-large": CL100K,
    "text-embedding-ada-002": CL100K,
    "davinci-002": CL100K,
    "babbage-002": CL100K,
    "o1": O200K,
    "o3": O200K,
    "o4-mini": O200K,
}
_PREFIXES = (
    ("gpt-4o", O200K),
    ("chatgpt-4o", O200K),
    ("gpt-4.1", O200K),
    ("gpt-4.5", O200K),
    ("gpt-5", O200K),
    ("o1-", O200K),
    ("o3-", O200K),
    ("o4-", O200K),
    ("gpt-4-", CL100K),
    ("gpt-3.5-turbo-", CL100K),
    ("gpt-35-turbo-", CL100K),
)


def encoding_for(model: str | None) -> str | None:
    """The encoding a model name uses, or None when no tokenizer is known for it."""
    if not isinstance(model, str) or not model:
        return None
    if model.startswith("ft:"):  # fine-tuned: ft:<base model>:<org>:<suffix>:<id>
        model = model[3:].split(":", 1)[0]
    name = _EXACT.get(model)
    if name is not None:
        return name
    for prefix, name in _PREFIXES:
        if model.startswith(prefix):
            return name
    return None


_lock = threading.Lock()
_loaded: dict[str, Callable[[str], int] | None] = {}  # per process: the vocabularies are large
_missing_logged = False


def _load(name: str) -> Callable[[str], int] | None:
    """The count function of an encoding, loaded once per process; None when the tokenizer
    package is not installed (logged once)."""
    if name in _loaded:
        return _loaded[name]
    global _missing_logged
    with _lock:
        if name in _loaded:
            return _loaded[name]
        try:
            import toktok

            if hasattr(toktok, "_encoding"):
                # Its tokenizer object counts one text without building the ids; the public
                # batch_count costs some 20 us more per call (its thread pool).
                fn = toktok._encoding(name).count
            else:
                fn = _batch_counter(toktok, name)
                fn("")  # loads the encoding now, under the lock
        except ImportError as exc:
            if not _missing_logged:
                log.warning(
                    "no tokenizer package (toktok-rs): token counts are estimated from sizes (%s)", exc
                )
                _missing_logged = True
            fn = None
        except Exception as exc:  # an incompatible toktok: estimate rather than fail a settle
            log.error("the tokenizer package cannot load %s: %r; token counts are estimated", name, exc)
            fn = None
        _loaded[name] = fn
        return fn


def _batch_counter(toktok: Any, name: str) -> Callable[[str], int]:
    def count(text: str) -> int:
        return toktok.batch_count([text], name, threads=1)[0]

    return count


def _counter(encoding: str) -> Callable[[str], int] | None:
    fn = _load(encoding)
    if fn is None:
        return None

    def count(text: str) -> int:
        try:
            return fn(text)
        except UnicodeEncodeError:  # lone surrogates (json takes them): counted as U+FFFD, as tiktoken does
            return fn(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))

    return count


class TokenCounter:
    """Counts text and request prompts for the models whose tokenizer is known.

    Every method returns None where it cannot count (unknown model, a part it cannot
    count, the tokenizer package missing): the caller then estimates. Thread-safe."""

    def encoding_for(self, model: str | None) -> str | None:
        return encoding_for(model)

    def available(self, model: str | None) -> bool:
        """Whether this model's text can be counted (loads its encoding)."""
        enc = encoding_for(model)
        return enc is not None and _load(enc) is not None

    def preload(self, *encodings: str) -> None:
        """Loads the encodings now (all known ones by default) instead of at first use."""
        for name in encodings or (O200K, CL100K):
            _load(name)

    def count_text(self, model: str | None, text: str) -> int | None:
        """Tokens of a plain text (special-token strings in it count as text, as in a
        prompt or an answer), or None when no tokenizer is known for the model."""
        enc = encoding_for(model)
        count = _counter(enc) if enc else None
        if count is None:
            return None
        try:
            return count(text) if text else 0
        except Exception:  # never fail a settle over a count: estimate instead
            log.exception("counting %d characters for %s failed; estimated", len(text), model)
            return None

    def count_prompt(self, path: str, body: dict[str, Any]) -> int | None:
        """Input tokens of an OpenAI request body (the model named in it), or None: by the
        formulas in prompt_tokens.py, None where a part of it cannot be counted exactly."""
        if not isinstance(body, dict):
            return None
        enc = encoding_for(body.get("model"))
        count = _counter(enc) if enc is not None else None
        if enc is None or count is None:
            return None
        try:
            return prompt_tokens(count, enc, path, body)
        except Uncountable:
            return None
        except Exception:  # a shape this code did not foresee: estimate rather than fail a settle
            log.exception("counting the prompt of %s for %s failed; estimated", path, body.get("model"))
            return None
