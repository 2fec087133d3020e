"""Admitting a proxied request: the checks it passes before anything is held.

Who sends it (an API key); on a metered route, a body within the size limit that is a
JSON object naming a model an upstream serves on that path, at a price, with no feature
that upstream may not meter; on another configured route, a price, its method and a body
within the limit. A path or method not served is refused as well. Each refusal is in the
upstream kind's own error format; what passes comes back as one `Admitted` (or
`FlatAdmitted`) request.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from ..core.errors import StateLost
from ..core.keys import PROXY_HOLD_PREFIX
from ..core.pricing import ModelPrice
from .config import ExtraRoute, ProxyConfig, Upstream
from .errors import proxy_error, state_lost, unavailable
from .identity import Identity, IdentityError
from .kinds import Adapter, for_path, metered_routes
from .pricing_cache import PricingCache

log = logging.getLogger("credit.proxy")

_METERED_ROUTES = frozenset(metered_routes())


@dataclass(frozen=True, slots=True)
class Admitted:
    """A metered request that passed every check: what planning sizes its hold from."""

    body: dict[str, Any]
    size: int  # the body's length in bytes, as received
    model: str
    price: ModelPrice
    upstream: Upstream
    kind: Adapter  # the upstream's kind (it may differ from the one the path suggests)


@dataclass(frozen=True, slots=True)
class FlatAdmitted:
    """A request to a flat-priced route that passed its checks: forwarded as it came."""

    route: ExtraRoute
    upstream: Upstream
    raw: bytes


async def identify(
    identity: Identity, request: Request, kind: Adapter, rid: dict[str, str]
) -> str | Response:
    """The user whose key sent the request, or the refusal to answer."""
    try:
        return await identity.user_of(request)
    except IdentityError as exc:
        code = "unauthorized" if exc.status == 401 else "forbidden"
        return proxy_error(kind, exc.status, code, str(exc), rid)
    except StateLost:
        return state_lost(kind, rid)
    except RedisError as exc:
        log.error("API key lookup failed: %s", exc)
        return unavailable(kind, rid)


async def read_body(request: Request, cap: int) -> bytes | None:
    """The request body, or None when it is (or declares itself) longer than `cap` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def admit(
    request: Request,
    path: str,
    kind: Adapter,
    config: ProxyConfig,
    pricing: PricingCache,
    rid: dict[str, str],
) -> Admitted | Response:
    """Reads and checks a metered request's body: the `Admitted` request, or its refusal."""
    raw = await read_body(request, config.max_body_bytes)
    if raw is None:
        return proxy_error(
            kind, 413, "body_too_large", f"request body above {config.max_body_bytes} bytes", rid
        )
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return proxy_error(kind, 400, "malformed_json", "the request body is not valid JSON", rid)
    if not isinstance(body, dict):
        return proxy_error(kind, 400, "invalid_request", "the request body must be a JSON object", rid)
    if any(isinstance(body.get(f), float) and body[f] >= 2**63 for f in kind.count_fields):
        body = json.loads(raw)  # orjson reads integers past 64 bits as floats: a huge cap is still a cap
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return proxy_error(kind, 400, "invalid_request", 'the request names no model (field "model")', rid)
    upstream = config.upstream_for(path, model)
    if upstream is None:
        return proxy_error(
            kind, 404, "model_not_served", f"no upstream serves model {model!r} on {path}", rid
        )
    kind = upstream.adapter
    table = pricing.table  # read once the body is in: the latest prices
    price = table.models.get(model)
    if price is None and config.unknown_model == "default":
        price = table.default
    if price is None:
        return proxy_error(kind, 400, "unknown_model", f"model {model!r} has no price; it is refused", rid)
    denied = kind.features(path, body) - upstream.allow_features
    if denied:
        return proxy_error(
            kind,
            400,
            "feature_not_allowed",
            f"this gateway does not meter {', '.join(sorted(denied))}: the request is refused",
            rid,
            features=sorted(denied),
        )
    return Admitted(body, len(raw), model, price, upstream, kind)


async def admit_flat(
    request: Request, kind: Adapter, config: ProxyConfig, rid: dict[str, str]
) -> FlatAdmitted | Response:
    """Checks a request to another configured route: one with a price (free included) that
    serves its method, and a body within the limit."""
    route = config.route_for(request.url.path)
    if route is None or route.price_units is None or request.method not in route.methods:
        return proxy_error(
            kind, 404, "route_not_served", f"{request.method} {request.url.path} is not served", rid
        )
    upstream = config.upstream(route.upstream)
    if upstream is None:  # the configuration checks every route's upstream at load
        return proxy_error(kind, 404, "route_not_served", f"{route.path} names no upstream", rid)
    raw = await read_body(request, config.max_body_bytes)
    if raw is None:
        return proxy_error(kind, 413, "body_too_large", "request body too large", rid)
    return FlatAdmitted(route, upstream, raw)


def not_served(request: Request, config: ProxyConfig) -> Response:
    """A path or method the proxy does not serve: refused in the upstream's error format
    (the caller is an LLM client, whose SDK reads that format)."""
    path = request.scope["path"]
    kind = for_path(path)
    rid = {"X-Request-Id": f"{PROXY_HOLD_PREFIX}{uuid.uuid4().hex}"}
    if path in _METERED_ROUTES or config.route_for(path) is not None:
        return proxy_error(kind, 405, "method_not_allowed", f"{request.method} is not served on {path}", rid)
    return proxy_error(kind, 404, "route_not_served", f"{request.method} {path} is not served", rid)
