"""The registry of upstream kinds: a kind's name -> its adapter.

Adding a kind (Gemini, a vLLM/TGI server with its own API, Bedrock) is one module
subclassing Adapter (base.py) and one entry here.
"""

from __future__ import annotations

from .anthropic import Anthropic
from .base import Adapter
from .openai import OpenAI

ADAPTERS: dict[str, Adapter] = {a.name: a for a in (OpenAI(), Anthropic())}
# The error format of paths no kind claims: the one most LLM client SDKs read.
FALLBACK: Adapter = ADAPTERS["openai"]


def adapter(kind: str) -> Adapter:
    """The adapter of a configured kind (KeyError: no such kind)."""
    return ADAPTERS[kind]


_BY_ROUTE: dict[str, Adapter] = {}
for _a in ADAPTERS.values():
    for _r in _a.routes:
        _BY_ROUTE.setdefault(_r, _a)


def for_route(path: str) -> Adapter:
    """The first kind metering `path`, else FALLBACK: whose format a refusal on a request
    to `path` takes before an upstream is chosen."""
    return _BY_ROUTE.get(path, FALLBACK)


def for_path(path: str) -> Adapter:
    """Like for_route, for a path no route serves: the kind whose routes or error prefixes
    claim it (e.g. Anthropic's /v1/messages/batches), else FALLBACK."""
    return _BY_ROUTE.get(path) or next((a for a in ADAPTERS.values() if a.claims(path)), FALLBACK)


def metered_routes(kinds: set[str] | None = None) -> tuple[str, ...]:
    """The metered POST paths of `kinds` (default: every registered kind), in order."""
    routes: list[str] = []
    for a in ADAPTERS.values():
        if kinds is None or a.name in kinds:
            routes.extend(r for r in a.routes if r not in routes)
    return tuple(routes)


__all__ = ["ADAPTERS", "FALLBACK", "Adapter", "adapter", "for_path", "for_route", "metered_routes"]
