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

This module names the features; each upstream kind says which of them a request of its
API uses (gateway/proxy/kinds/).
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


def tools_used(body: dict[str, Any], prefixes: tuple[tuple[str, str], ...]) -> set[str]:
    """The features among a request's built-in tools: `prefixes` maps a tool type prefix to
    the feature it is."""
    found: set[str] = set()
    tools = body.get("tools")
    for t in tools if isinstance(tools, list) else ():
        tool_type = t.get("type") if isinstance(t, dict) else None
        if isinstance(tool_type, str):
            found.update(f for p, f in prefixes if tool_type.startswith(p))
    return found
