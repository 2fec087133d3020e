"""Admin: read and replace the model pricing table (applies to new requests at once, on
every gateway process)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from ...core.pricing import PricingTable
from ..body import DecimalRoute
from ..deps import AdminCaller, ServicesDep
from ..errors import ApiError
from ..schemas import Count, CreditsOrZero

router = APIRouter(
    prefix="/admin/pricing", tags=["pricing"], route_class=DecimalRoute, strict_content_type=False
)


class PriceIn(BaseModel):
    """Credits per million tokens, and per request; decimal strings are safest."""

    model_config = ConfigDict(extra="forbid")
    input: CreditsOrZero
    output: CreditsOrZero
    cached_input: CreditsOrZero | None = None
    request: CreditsOrZero | None = None
    max_output_tokens: Count | None = Field(None, ge=1)


class PricingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: dict[str, PriceIn] = Field(default_factory=dict)
    default: PriceIn | None = None
    version: Count | None = Field(
        None,
        description="the version this change was made from (GET's): refused with "
        "409 if the table changed since; omit to replace whatever is there",
    )


def _require(services) -> Any:
    if services.pricing is None:
        raise ApiError(404, "proxy_not_configured", "no CREDIT_GATEWAY_CONFIG: the metering proxy is off")
    return services.pricing


@router.get("")
async def get_pricing(caller: AdminCaller, services: ServicesDep) -> dict:
    """The pricing table in force: credits per million tokens (input, cached input, output)
    and a per-request fee, per model."""
    table = _require(services).table
    return {"version": table.version, **table.to_json()}


@router.put("")
async def put_pricing(body: PricingIn, caller: AdminCaller, services: ServicesDep) -> dict:
    """Replaces the whole table."""
    cache = _require(services)
    if not body.models and body.default is None:
        raise ApiError(
            422, "invalid_pricing", "the table would price no model: every metered call would be refused"
        )
    try:
        table = PricingTable.from_json(body.model_dump(exclude_none=True, exclude={"version"}))
    except (ValueError, TypeError) as exc:
        raise ApiError(422, "invalid_pricing", str(exc)) from exc
    if (
        services.proxy is not None
        and services.proxy.config.unknown_model == "default"
        and table.default is None
    ):
        raise ApiError(422, "invalid_pricing", "unknown_model = 'default' needs a default price")
    if body.version is not None:
        await cache.reload()
        if cache.table.version != body.version:
            raise ApiError(
                409,
                "version_conflict",
                f"the table is at version {cache.table.version} now, not "
                f"{body.version}: GET it again and redo the change",
            )
    table = await cache.replace(table)
    return {"version": table.version, **table.to_json()}
