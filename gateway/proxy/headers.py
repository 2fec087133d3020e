"""Which headers cross the proxy: the client's headers an upstream may see (with the
gateway's credential added), and the upstream's headers the client gets back."""

from __future__ import annotations

import aiohttp
from starlette.requests import Request

from .config import Upstream

# Hop-by-hop headers (RFC 9110 7.6.1, and the old names proxies still see): one connection's.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Never forwarded, whatever the configuration allows: credentials, cookies, hop-by-hop
# headers, the gateway's own, and what the HTTP client sets itself.
NEVER_FORWARDED = HOP_BY_HOP | frozenset(
    {
        "host",
        "content-length",
        "authorization",
        "cookie",
        "x-api-key",
        "x-user-id",
        "accept-encoding",
        "expect",
        "content-type",
    }
)
# Never passed back to the client from the upstream.
DROP_RESPONSE_HEADERS = HOP_BY_HOP | frozenset(
    {
        "content-length",
        "content-encoding",
        "set-cookie",
        "server",
        "date",
        # the gateway's upstream account, not the client's business
        "openai-organization",
        "openai-project",
        "anthropic-organization-id",
    }
)
# The upstream's names for what the gateway answers itself: passed on under another name.
RENAMED_RESPONSE_HEADERS = {"x-request-id": "x-upstream-request-id", "request-id": "x-upstream-request-id"}


def forwarded_headers(request: Request, upstream: Upstream) -> dict[str, str]:
    """The client's headers that `upstream` may see (its configured headers not included):
    its kind's allow-list and the upstream's `forward_headers`, never NEVER_FORWARDED."""
    allowed = upstream.adapter.forwarded_headers
    prefixes = tuple(h[:-1] for h in upstream.forward_headers if h.endswith("*"))
    # The raw ASGI pairs (names lower-case): starlette's Headers.items() decodes them all
    # into a new list on every call.
    raw: list[tuple[bytes, bytes]] = request.scope["headers"]
    connection = next((v for k, v in raw if k == b"connection"), b"").decode("latin-1")
    named_by_connection = {t.strip().lower() for t in connection.split(",") if t.strip()}
    out = {}
    for k, v in raw:
        lk = k.decode("latin-1").lower()
        if lk in NEVER_FORWARDED or lk in named_by_connection or lk.startswith(("x-credit", "proxy-")):
            continue
        if lk in allowed or lk in upstream.forward_headers or (prefixes and lk.startswith(prefixes)):
            out[lk] = v.decode("latin-1")
    return out


def upstream_headers(request: Request, upstream: Upstream) -> dict[str, str]:
    """Every header a request to `upstream` carries (content-type aside)."""
    headers = forwarded_headers(request, upstream)
    for k, v in upstream.headers.items():
        headers[k.lower()] = v  # the configured value wins over the client's
    headers["accept-encoding"] = "identity"
    if upstream.api_key:
        headers.update(upstream.adapter.auth_headers(upstream.api_key))
    return headers


def passed_headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
    """The upstream's response headers the client gets."""
    out = {}
    for k, v in resp.headers.items():
        lk = k.lower()
        if lk in DROP_RESPONSE_HEADERS or lk.startswith("x-credits-"):
            continue
        out[RENAMED_RESPONSE_HEADERS.get(lk, lk)] = v
    return out
