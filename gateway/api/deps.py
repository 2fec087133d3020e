"""Request dependencies as Annotated aliases: services, and who is calling."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from ..core.engine import CreditEngine
from ..core.keys import check_id
from ..core.store.base import Store
from .auth import bearer
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
class Caller:
    """An authenticated caller: `key_id` names the key (never the key itself)."""

    key_id: str
    user_id: str | None = None


def require_admin(services: ServicesDep, authorization: Annotated[str | None, Header()] = None) -> Caller:
    key_id = services.admin_keys.match(bearer(authorization))
    if key_id is None:
        raise ApiError(401, "unauthorized", "a valid admin key is required (Authorization: Bearer <key>)", _CHALLENGE)
    return Caller(key_id)


def require_client_user(
    services: ServicesDep,
    authorization: Annotated[str | None, Header()] = None,
    x_user_id: Annotated[str | None, Header()] = None,
) -> Caller:
    key_id = services.client_keys.match(bearer(authorization))
    if key_id is None:
        raise ApiError(401, "unauthorized", "a valid client key is required (Authorization: Bearer <key>)", _CHALLENGE)
    if not x_user_id:
        raise ApiError(400, "missing_user", "the X-User-Id header is required")
    try:
        check_id("X-User-Id", x_user_id)
    except ValueError as exc:
        raise ApiError(400, "invalid_user", str(exc)) from exc
    return Caller(key_id, x_user_id)


AdminCaller = Annotated[Caller, Depends(require_admin)]
ClientCaller = Annotated[Caller, Depends(require_client_user)]


def idempotency_op_id(caller: Caller, route: str, key: str | None) -> str | None:
    """An Idempotency-Key, scoped by caller and route, as an operation id (None without one)."""
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise ApiError(400, "invalid_idempotency_key", "Idempotency-Key must be 1-255 printable characters")
    digest = hashlib.sha256(f"{caller.key_id}|{route}|{key}".encode()).hexdigest()[:40]
    return f"idem-{digest}"
