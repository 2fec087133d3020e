"""Admin: grants, debits, account views and the ledger. Bearer admin key."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Response

from ...core.keys import ID_PATTERN
from ...core.money import from_units
from ...core.results import ms_to_dt
from ..deps import AdminCaller, EngineDep, StoreDep, idempotency_op_id
from ..body import DecimalRoute
from ..errors import ApiError
from ..schemas import (
    AccountResponse, Balance, DebitRequest, DebitResponse, GrantOut, GrantRequest, GrantResponse,
    HoldOut, LedgerItem, LedgerPage,
)

router = APIRouter(prefix="/admin/accounts", tags=["admin"], route_class=DecimalRoute)

UserId = Annotated[str, Path(pattern=ID_PATTERN.pattern, description="the account's user id")]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key")]


def _replayed(response: Response, replayed: bool) -> None:
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"


@router.post("/{user_id}/grants", status_code=201, response_model=GrantResponse)
async def add_grant(
    user_id: UserId, body: GrantRequest, caller: AdminCaller, engine: EngineDep, response: Response,
    idempotency_key: IdempotencyKey = None,
):
    """Adds credits to an account as a grant (repays any debt first)."""
    if body.expires_at is not None and body.expires_at.tzinfo is None:
        raise ApiError(422, "invalid_request", "expires_at needs a timezone (e.g. 2030-01-01T00:00:00Z)")
    op_id = idempotency_op_id(caller, "grants", idempotency_key) or f"adm-{uuid.uuid4().hex}"
    meta = {"description": body.description, "by": caller.key_id}
    if idempotency_key:
        meta["idempotency_key"] = idempotency_key
    r = await engine.grant(
        user_id, body.amount, op_id=op_id, source=body.source, expires_at=body.expires_at,
        priority=body.priority, metadata=meta,
    )
    _replayed(response, r.replayed)
    return GrantResponse(
        **Balance.of(user_id, r.state).model_dump(), grant_id=op_id, grant_seq=r.grant_seq, amount=r.amount,
        debt_repaid=r.debt_repaid, expires_at=r.expires_at, replayed=r.replayed,
    )


@router.post("/{user_id}/debits", status_code=201, response_model=DebitResponse)
async def add_debit(
    user_id: UserId, body: DebitRequest, caller: AdminCaller, engine: EngineDep, response: Response,
    idempotency_key: IdempotencyKey = None,
):
    """Charges credits at once; 402 when the account's free credit is short."""
    op_id = idempotency_op_id(caller, "debits", idempotency_key) or f"adm-{uuid.uuid4().hex}"
    meta = {"description": body.description, "by": caller.key_id}
    if idempotency_key:
        meta["idempotency_key"] = idempotency_key
    r = await engine.debit(user_id, body.amount, op_id=op_id, metadata=meta)
    _replayed(response, r.replayed)
    return DebitResponse(**Balance.of(user_id, r.state).model_dump(), debit_id=op_id, amount=r.amount, replayed=r.replayed)


@router.get("/{user_id}", response_model=AccountResponse)
async def get_account(user_id: UserId, caller: AdminCaller, engine: EngineDep):
    """Available, held, debt, grants in spend order, open holds."""
    v = await engine.account(user_id)
    s = v.state
    return AccountResponse(
        **Balance.of(user_id, s).model_dump(), granted=s.granted, spent=s.spent, expired=s.expired,
        grants=[
            GrantOut(
                seq=g.seq, grant_id=g.grant_id, source=g.source, amount=g.amount, remaining=g.free,
                held=g.earmarked, priority=g.priority, expires_at=g.expires_at, expired=g.expired,
                granted_at=g.granted_at, description=g.metadata.get("description"),
            )
            for g in v.grants
        ],
        holds=[HoldOut(hold_id=h.hold_id, amount=h.amount, expires_at=h.expires_at) for h in v.holds],
    )


_HIDDEN = {"a", "g", "gm", "res", "fp", "u", "v", "ts", "id", "t", "amt", "hold"}


@router.get("/{user_id}/ledger", response_model=LedgerPage)
async def get_ledger(
    user_id: UserId, caller: AdminCaller, store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
):
    """The account's durable ledger (from the store), newest first."""
    before = None
    if cursor is not None:
        if not cursor.isdigit():
            raise ApiError(422, "invalid_cursor", "cursor must be a next_cursor value from a previous page")
        before = int(cursor)
    rows = await store.ledger(user_id, before_version=before, limit=limit)
    items = []
    for e in rows:
        a = e.event.get("a") or {}
        items.append(
            LedgerItem(
                op_id=e.op_id, type=e.type, version=e.version, at=ms_to_dt(e.ts_ms), amount=from_units(e.amount),
                hold_id=e.hold_id, available=from_units(a.get("available", 0)), held=from_units(a.get("held", 0)),
                debt=from_units(a.get("debt", 0)),
                details={k: v for k, v in e.event.items() if k not in _HIDDEN},
            )
        )
    nxt = str(rows[-1].version) if len(rows) == limit and rows[-1].version > 1 else None
    return LedgerPage(user_id=user_id, entries=items, next_cursor=nxt)
