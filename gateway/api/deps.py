"""Request dependencies as Annotated aliases: the services, and who is calling (admin or client)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from ..core.engine import CreditEngine
from ..core.keyring import bearer
from ..core.store.base import Store
from ..proxy.identity import Identity, IdentityError
from .errors import ApiError
from .services import Services

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_engine(services: ServicesDep) -> CreditEngine:
    if not services.ready:
        raise ApiError(503, "not_ready", "the gateway is still rebuilding its state; retry shortly")
    return services.engine


def get_store(services: ServicesDep) -> Store:
    return services.store


EngineDep = Annotated[CreditEngine, Depends(get_engine)]
StoreDep = Annotated[Store, Depends(get_store)]


@dataclass(frozen=True)
class Admin:
    """A caller with an admin key: `key_id` names the key (never the key itself)."""

    key_id: str


@dataclass(frozen=True)
class Client:
    """A caller acting for one user: a client key with X-User-Id, or the user's own key."""

    key_id: str
    user_id: str


def require_admin(services: ServicesDep, authorization: Annotated[str | None, Header()] = None) -> Admin:
    key_id = services.admin_keys.match(bearer(authorization))
    if key_id is None:
        raise ApiError(
            401, "unauthorized", "a valid admin key is required (Authorization: Bearer <key>)", _CHALLENGE
        )
    return Admin(key_id)


async def require_client_user(
    request: Request,
    services: ServicesDep,
    authorization: Annotated[
        str | None, Header(description="Bearer <client key> or Bearer <the user's cgk_ key>")
    ] = None,
    x_user_id: Annotated[str | None, Header(description="the user; required with a client key")] = None,
    x_api_key: Annotated[
        str | None, Header(alias="x-api-key", description="the user's cgk_ key (instead of Authorization)")
    ] = None,
) -> Client:
    """A client key with X-User-Id naming the user, or the user's own API key (cgk_..., as
    a bearer token or x-api-key), which names its user by itself: with it, X-User-Id may be
    left out, and naming another user is refused (403). The same rule as the proxy's."""
    try:
        user = await Identity(services.client_keys, services.api_keys).user_of(request)
    except IdentityError as exc:
        if exc.status == 403:
            raise ApiError(403, "forbidden", str(exc)) from None
        client_key = services.client_keys.match(bearer(authorization) or x_api_key)
        if client_key is not None:  # a good client key: what is wrong is the X-User-Id
            if not x_user_id:
                raise ApiError(
                    400, "missing_user", "the X-User-Id header is required with a client key"
                ) from None
            raise ApiError(400, "invalid_user", str(exc)) from None
        raise ApiError(
            401,
            "unauthorized",
            "a valid client key (with X-User-Id) or the user's own API key is "
            "required (Authorization: Bearer <key>)",
            _CHALLENGE,
        ) from None
    key_id = services.client_keys.match(bearer(authorization))
    return Client(key_id or "user-key", user)


AdminCaller = Annotated[Admin, Depends(require_admin)]
ClientCaller = Annotated[Client, Depends(require_client_user)]


def idempotency_key(request: Request) -> str | None:
    """The request's Idempotency-Key header; two of them are refused (which one would the
    caller mean?)."""
    values = request.headers.getlist("idempotency-key")
    if len(values) > 1:
        raise ApiError(400, "invalid_idempotency_key", "send one Idempotency-Key header, not several")
    return values[0] if values else None


IdempotencyKey = Annotated[str | None, Depends(idempotency_key)]


def idempotency_op_id(caller: Admin | Client, route: str, key: str | None) -> str | None:
    """An Idempotency-Key, scoped by caller and route, as an operation id (None without one)."""
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise ApiError(400, "invalid_idempotency_key", "Idempotency-Key must be 1-255 printable characters")
    digest = hashlib.sha256(f"{caller.key_id}|{route}|{key}".encode()).hexdigest()[:40]
    return f"idem-{digest}"
