"""Admin: per-user API keys (issued once, stored hashed, revocable) and per-account
rate-limit overrides. Both are written to the store first, then to Redis."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field

from ...core.keys import ID_PATTERN
from ...core.ratelimits import MAX_LIMIT, set_rate_limits
from ...core.results import ms_to_dt
from ...core.store.base import ApiKeyRecord, RateLimitOverride
from ..body import DecimalRoute
from ..deps import AdminCaller, EngineDep, ServicesDep
from ..errors import ApiError
from ..schemas import Count

router = APIRouter(
    prefix="/admin/accounts", tags=["access"], route_class=DecimalRoute, strict_content_type=False
)

UserId = Annotated[str, Path(pattern=ID_PATTERN.pattern, description="the account's user id")]
KeyId = Annotated[str, Path(pattern=r"^key_[0-9a-f]{16}$")]


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("", max_length=100, description="a label for the key (e.g. the app using it)")


class KeyOut(BaseModel):
    key_id: str
    user_id: str
    prefix: str = Field(description="the key's first characters, to recognise it")
    name: str
    created_at: datetime
    revoked_at: datetime | None = None

    @classmethod
    def of(cls, r: ApiKeyRecord) -> KeyOut:
        return cls(
            key_id=r.key_id,
            user_id=r.user,
            prefix=r.prefix,
            name=r.name,
            created_at=ms_to_dt(r.created_ms),
            revoked_at=ms_to_dt(r.revoked_ms) if r.revoked_ms is not None else None,
        )


class KeyIssued(KeyOut):
    key: str = Field(description="the API key itself: shown this once, never again")


class KeyList(BaseModel):
    user_id: str
    keys: list[KeyOut]


Limit = Annotated[
    Count | None, Field(ge=0, le=MAX_LIMIT, description="per minute; 0 = no limit, null = the default")
]


class LimitsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests_per_minute: Limit = None
    tokens_per_minute: Limit = None


class LimitsOut(BaseModel):
    user_id: str
    requests_per_minute: int | None = Field(description="the account's override (null: the default applies)")
    tokens_per_minute: int | None
    plan_requests_per_minute: int | None = Field(None, description="the subscriber's plan's limit")
    plan_tokens_per_minute: int | None = None
    allowed_models: list[str] | None = Field(None, description="the plan's models (null: every model)")
    effective_requests_per_minute: int = Field(description="what applies now (0 = no limit)")
    effective_tokens_per_minute: int


@router.post("/{user_id}/keys", status_code=201, response_model=KeyIssued)
async def issue_key(
    user_id: UserId, caller: AdminCaller, services: ServicesDep, _: EngineDep, body: KeyRequest | None = None
):
    """Issues an API key that identifies this user on the proxy without X-User-Id. The key is
    in this answer only; the gateway keeps its SHA-256 digest."""
    try:
        issued = await services.api_keys.issue(user_id, (body or KeyRequest()).name)
    except ValueError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from exc
    return KeyIssued(**KeyOut.of(issued.record).model_dump(), key=issued.token)


@router.get("/{user_id}/keys", response_model=KeyList)
async def list_keys(user_id: UserId, caller: AdminCaller, services: ServicesDep):
    """The user's keys, revoked ones included (never the keys themselves)."""
    return KeyList(user_id=user_id, keys=[KeyOut.of(r) for r in await services.api_keys.list(user_id)])


@router.delete("/{user_id}/keys/{key_id}", response_model=KeyOut)
async def revoke_key(
    user_id: UserId, key_id: KeyId, caller: AdminCaller, services: ServicesDep, _: EngineDep
):
    """Revokes a key on every gateway process at once. Revoking twice is harmless."""
    rec = await services.api_keys.revoke(user_id, key_id)
    if rec is None:
        raise ApiError(404, "key_not_found", f"user {user_id} has no key {key_id}")
    return KeyOut.of(rec)


def _limits_out(services, user_id: str, o: RateLimitOverride | None) -> LimitsOut:
    proxy = services.proxy
    defaults = proxy.config.rate_limits if proxy is not None else None
    o = o or RateLimitOverride(user_id)
    # The admin's override, else the plan's, else the gateway's default (as reserve.lua reads them).
    rpm = next(
        (v for v in (o.requests_per_minute, o.plan_requests_per_minute) if v is not None),
        defaults.requests_per_minute if defaults else 0,
    )
    tpm = next(
        (v for v in (o.tokens_per_minute, o.plan_tokens_per_minute) if v is not None),
        defaults.tokens_per_minute if defaults else 0,
    )
    return LimitsOut(
        user_id=user_id,
        requests_per_minute=o.requests_per_minute,
        tokens_per_minute=o.tokens_per_minute,
        plan_requests_per_minute=o.plan_requests_per_minute,
        plan_tokens_per_minute=o.plan_tokens_per_minute,
        allowed_models=o.allowed_models,
        effective_requests_per_minute=rpm,
        effective_tokens_per_minute=tpm,
    )


@router.get("/{user_id}/limits", response_model=LimitsOut)
async def get_limits(user_id: UserId, caller: AdminCaller, services: ServicesDep):
    """The account's rate-limit overrides and the limits in effect."""
    return _limits_out(services, user_id, await services.store.rate_limits(user_id))


@router.put("/{user_id}/limits", response_model=LimitsOut)
async def put_limits(
    user_id: UserId, body: LimitsIn, caller: AdminCaller, services: ServicesDep, engine: EngineDep
):
    """Replaces the account's overrides (null: the gateway's default; both null: no override)."""
    o = RateLimitOverride(user_id, body.requests_per_minute, body.tokens_per_minute)
    after = await set_rate_limits(engine.redis, engine.keys, services.store, o)
    return _limits_out(services, user_id, after)
