"""Request features an upstream bills beyond the tokens the price table prices, or that
escape the metering: refused unless the upstream's configuration allows them.

The gateway charges tokens (and a per-request fee). Some request fields make the upstream
bill more: a premium service tier, built-in tools priced per call (web search, code
execution, file search...), audio output at audio rates; others escape the metering: a
background response is fetched later, past the gateway; a stored conversation or
previous response makes the prompt far larger than the request shows. Forwarding them
unchecked would let a user spend what their hold never covered, so they are refused (400
`feature_not_allowed`, in the upstream's error format) unless the upstream lists them in
`allow_features`, which says the operator priced them in (e.g. a per-request fee).
"""

from __future__ import annotations

from typing import Any

# Every feature name an upstream's allow_features may list.
FEATURES = frozenset(
    {
        "service_tier",
        "web_search",
        "web_fetch",
        "file_search",
        "code_interpreter",
        "code_execution",
        "computer_use",
        "image_generation",
        "mcp",
        "audio",
        "background",
        "stored_context",
    }
)

# Built-in tool types (by prefix) and the feature each is.
_OPENAI_TOOLS = (
    ("web_search", "web_search"),
    ("file_search", "file_search"),
    ("code_interpreter", "code_interpreter"),
    ("computer_use", "computer_use"),
    ("image_generation", "image_generation"),
    ("mcp", "mcp"),
)
_ANTHROPIC_TOOLS = (
    ("web_search", "web_search"),
    ("web_fetch", "web_fetch"),
    ("code_execution", "code_execution"),
)


def _tools(body: dict[str, Any], prefixes: tuple[tuple[str, str], ...]) -> set[str]:
    found = set()
    tools = body.get("tools")
    for t in tools if isinstance(tools, list) else ():
        kind = t.get("type") if isinstance(t, dict) else None
        if isinstance(kind, str):
            found.update(f for p, f in prefixes if kind.startswith(p))
    return found


def requested_features(kind: str, path: str, body: dict[str, Any]) -> set[str]:
    """The features of FEATURES a request uses."""
    found: set[str] = set()
    if kind == "anthropic":
        if body.get("service_tier") not in (None, "auto", "standard_only"):
            found.add("service_tier")
        found |= _tools(body, _ANTHROPIC_TOOLS)
        if body.get("mcp_servers"):
            found.add("mcp")
        if body.get("container") is not None:
            found.add("code_execution")
        return found
    if body.get("service_tier") not in (None, "auto", "default"):
        found.add("service_tier")
    found |= _tools(body, _OPENAI_TOOLS)
    if body.get("web_search_options") is not None:
        found.add("web_search")
    modalities = body.get("modalities")
    if body.get("audio") is not None or (isinstance(modalities, list) and "audio" in modalities):
        found.add("audio")
    if body.get("background"):
        found.add("background")
    if (
        any(body.get(f) is not None for f in ("previous_response_id", "conversation", "prompt"))
        and path == "/v1/responses"
    ):
        found.add("stored_context")
    return found
