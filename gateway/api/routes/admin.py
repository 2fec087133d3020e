"""Admin: grants, debits, account views and the ledger. Bearer admin key."""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response

from ...core.errors import InvalidExpiry
from ...core.keys import ID_PATTERN
from ...core.money import from_units
from ...core.results import ms_to_dt
from ..body import DecimalRoute
from ..deps import AdminCaller, EngineDep, IdempotencyKey, StoreDep, idempotency_op_id
from ..errors import ApiError
from ..schemas import (
    AccountResponse,
    Balance,
    DebitRequest,
    DebitResponse,
    Expiring,
    GrantOut,
    GrantRequest,
    GrantResponse,
    HoldOut,
    LedgerItem,
    LedgerPage,
    QueryCount,
)

router = APIRouter(
    prefix="/admin/accounts", tags=["admin"], route_class=DecimalRoute, strict_content_type=False
)

UserId = Annotated[str, Path(pattern=ID_PATTERN.pattern, description="the account's user id")]
CURSOR = re.compile(r"[0-9]{1,18}", re.ASCII)


def _replayed(response: Response, replayed: bool) -> None:
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"


@router.post("/{user_id}/grants", status_code=201, response_model=GrantResponse)
async def add_grant(
    user_id: UserId,
    body: GrantRequest,
    caller: AdminCaller,
    engine: EngineDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
):
    """Adds credits to an account as a grant (repays any debt first)."""
    op_id = idempotency_op_id(caller, "grants", idempotency_key) or f"adm-{uuid.uuid4().hex}"
    meta = {"description": body.description, "by": caller.key_id}
    if idempotency_key:
        meta["idempotency_key"] = idempotency_key
    try:
        r = await engine.grant(
            user_id,
            body.amount,
            op_id=op_id,
            source=body.source,
            expires_at=body.expires_at,
            priority=body.priority,
            metadata=meta,
        )
    except InvalidExpiry:
        # The schema checked the range; what the script refuses is a date not after its clock
        # (so one was given).
        when = body.expires_at.isoformat() if body.expires_at else "(none)"
        raise ApiError(422, "invalid_expiry", f"expires_at {when} is in the past") from None
    _replayed(response, r.replayed)
    return GrantResponse(
        **Balance.of(user_id, r.state).model_dump(),
        grant_id=op_id,
        grant_seq=r.grant_seq,
        amount=r.amount,
        debt_repaid=r.debt_repaid,
        expires_at=r.expires_at,
        replayed=r.replayed,
    )


@router.post("/{user_id}/debits", status_code=201, response_model=DebitResponse)
async def add_debit(
    user_id: UserId,
    body: DebitRequest,
    caller: AdminCaller,
    engine: EngineDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
):
    """Charges credits at once; 402 when the account's free credit is short."""
    op_id = idempotency_op_id(caller, "debits", idempotency_key) or f"adm-{uuid.uuid4().hex}"
    meta = {"description": body.description, "by": caller.key_id}
    if idempotency_key:
        meta["idempotency_key"] = idempotency_key
    r = await engine.debit(user_id, body.amount, op_id=op_id, metadata=meta)
    _replayed(response, r.replayed)
    return DebitResponse(
        **Balance.of(user_id, r.state).model_dump(), debit_id=op_id, amount=r.amount, replayed=r.replayed
    )


@router.get("/{user_id}", response_model=AccountResponse)
async def get_account(
    user_id: UserId,
    caller: AdminCaller,
    engine: EngineDep,
    expiring_days: Annotated[int, Query(ge=0, le=3650)] = 30,
):
    """Available, held, debt, grants in spend order, open holds, and the credit expiring
    within `expiring_days` (30 by default)."""
    v = await engine.account(user_id)
    s = v.state
    return AccountResponse(
        **Balance.of(user_id, s).model_dump(),
        granted=s.granted,
        spent=s.spent,
        expired=s.expired,
        grants=[
            GrantOut(
                seq=g.seq,
                grant_id=g.grant_id,
                source=g.source,
                amount=g.amount,
                remaining=g.free,
                held=g.earmarked,
                priority=g.priority,
                expires_at=g.expires_at,
                expired=g.expired,
                granted_at=g.granted_at,
                description=g.metadata.get("description"),
            )
            for g in v.grants
        ],
        holds=[HoldOut(hold_id=h.hold_id, amount=h.amount, expires_at=h.expires_at) for h in v.holds],
        expiring=Expiring.of(v.grants, engine.now_ms(), expiring_days),
    )


_HIDDEN = {"a", "g", "gm", "res", "fp", "u", "v", "ts", "id", "t", "amt", "hold"}
# Event fields in micro-credits (lua/includes/lib.lua): shown in credits, like every amount
# a client sees. `h` is the hold after the change; its `ear` lists "grant seq=units,...".
_AMOUNTS = {"returned", "lapsed", "debt_added", "held_amt", "debt_repaid"}
_HOLD_AMOUNTS = {"amt", "fin"}


def _credits(v: Any) -> Any:
    try:
        return str(from_units(v)) if isinstance(v, (int, str)) and not isinstance(v, bool) else v
    except ValueError:  # not an integer: left as it is
        return v


def _earmarks(ear: Any) -> Any:
    if not isinstance(ear, str):
        return ear
    out = {}
    for part in filter(None, ear.split(",")):
        seq, _, units = part.partition("=")
        out[seq] = _credits(units)
    return out


def _details(event: dict[str, Any]) -> dict[str, Any]:
    """An event's fields for the ledger view, amounts in credits (strings, 6 places)."""
    out = {k: (_credits(v) if k in _AMOUNTS else v) for k, v in event.items() if k not in _HIDDEN}
    h = out.get("h")
    if isinstance(h, dict):
        out["h"] = {
            k: (_credits(v) if k in _HOLD_AMOUNTS else _earmarks(v) if k == "ear" else v)
            for k, v in h.items()
        }
    return out


@router.get("/{user_id}/ledger", response_model=LedgerPage)
async def get_ledger(
    user_id: UserId,
    caller: AdminCaller,
    store: StoreDep,
    limit: Annotated[QueryCount, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
):
    """The account's durable ledger (from the store), newest first."""
    before = None
    if cursor is not None:
        if not CURSOR.fullmatch(cursor):
            raise ApiError(422, "invalid_cursor", "cursor must be a next_cursor value from a previous page")
        before = int(cursor)
    rows = await store.ledger(user_id, before_version=before, limit=limit)
    items = []
    for e in rows:
        a = e.event.get("a") or {}
        items.append(
            LedgerItem(
                op_id=e.op_id,
                type=e.type,
                version=e.version,
                at=ms_to_dt(e.ts_ms),
                amount=from_units(e.amount),
                hold_id=e.hold_id,
                available=from_units(a.get("available", 0)),
                held=from_units(a.get("held", 0)),
                debt=from_units(a.get("debt", 0)),
                details=_details(e.event),
            )
        )
    nxt = str(rows[-1].version) if len(rows) == limit and rows[-1].version > 1 else None
    return LedgerPage(user_id=user_id, entries=items, next_cursor=nxt)
