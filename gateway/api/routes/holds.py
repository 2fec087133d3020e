"""Holds for apps that meter their own work: client key + X-User-Id, or a user's own key."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from ...core.errors import HoldNotFound
from ...core.keys import ID_PATTERN, METERED_HOLD_PREFIXES, is_metered_hold
from ...core.results import HoldResolution
from ..body import DecimalRoute
from ..deps import ClientCaller, EngineDep, ServicesDep
from ..errors import ApiError
from ..schemas import Balance, Expiring, HoldRequest, HoldResponse, ResolutionResponse, SettleRequest

router = APIRouter(prefix="/credits", tags=["holds"], route_class=DecimalRoute, strict_content_type=False)

HoldId = Annotated[str, Path(pattern=ID_PATTERN.pattern)]


def _own(hold_id: str) -> str:
    """A hold of the caller's own: the gateway's metering holds are not resolved here."""
    if is_metered_hold(hold_id):
        raise HoldNotFound()
    return hold_id


def _resolution(user: str, r: HoldResolution, response: Response) -> ResolutionResponse:
    if r.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return ResolutionResponse(
        **Balance.of(user, r.state).model_dump(),
        hold_id=r.hold_id,
        status=r.status,
        charged=r.charged,
        returned=r.returned,
        lapsed=r.lapsed,
        debt_added=r.debt_added,
        debt_repaid=r.debt_repaid,
        replayed=r.replayed,
    )


@router.post("/holds", status_code=201, response_model=HoldResponse)
async def create_hold(
    body: HoldRequest, caller: ClientCaller, engine: EngineDep, services: ServicesDep, response: Response
):
    """Reserves credits; 402 when the user cannot afford it. Retrying with the same hold_id is safe."""
    if body.ttl_seconds > services.settings.max_hold_ttl_seconds:
        problem = f"above the limit of {services.settings.max_hold_ttl_seconds}"
        raise ApiError(
            422,
            "invalid_request",
            f"ttl_seconds: {problem}",
            problems=[{"field": "ttl_seconds", "problem": problem}],
        )
    if body.hold_id is not None and is_metered_hold(body.hold_id):
        raise ApiError(
            422,
            "invalid_id",
            f"hold ids beginning with {' or '.join(METERED_HOLD_PREFIXES)} are the "
            "gateway's own (its metered calls)",
        )
    hold_id = body.hold_id or f"h-{uuid.uuid4().hex}"
    h = await engine.reserve(
        caller.user_id,
        body.amount,
        hold_id=hold_id,
        ttl_seconds=body.ttl_seconds,
        metadata={"description": body.description} if body.description else None,
    )
    if h.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return HoldResponse(
        **Balance.of(caller.user_id, h.state).model_dump(),
        hold_id=h.hold_id,
        amount=h.amount,
        expires_at=h.expires_at,
        replayed=h.replayed,
    )


@router.post("/holds/{hold_id}/settle", response_model=ResolutionResponse)
async def settle_hold(
    hold_id: HoldId, body: SettleRequest, caller: ClientCaller, engine: EngineDep, response: Response
):
    """Charges the real cost; the rest of the hold returns. Above the hold, see the overage policy."""
    r = await engine.settle(
        caller.user_id,
        _own(hold_id),
        body.amount,
        metadata={"description": body.description} if body.description else None,
    )
    return _resolution(caller.user_id, r, response)


@router.post("/holds/{hold_id}/release", response_model=ResolutionResponse)
async def release_hold(hold_id: HoldId, caller: ClientCaller, engine: EngineDep, response: Response):
    """Cancels the hold; every held credit returns."""
    return _resolution(caller.user_id, await engine.release(caller.user_id, _own(hold_id)), response)


@router.get("/balance", response_model=Balance)
async def balance(caller: ClientCaller, engine: EngineDep):
    """The calling user's balance."""
    return Balance.of(caller.user_id, await engine.balance(caller.user_id))


@router.get("/expiring", response_model=Expiring)
async def expiring(caller: ClientCaller, engine: EngineDep, days: Annotated[int, Query(ge=0, le=3650)] = 30):
    """The calling user's credit that expires within `days` days, soonest first."""
    return Expiring.of((await engine.account(caller.user_id)).grants, engine.now_ms(), days)
