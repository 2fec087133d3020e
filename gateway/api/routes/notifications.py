"""Notifications, for admins: the outbox (list, one, resend) and an account's low-balance
threshold. Bearer admin key."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path

from ...core.keys import ID_PATTERN
from ...notifications import Notifier, NotifyError
from ..body import DecimalRoute
from ..deps import AdminCaller, ServicesDep
from ..errors import ApiError, refusal

router = APIRouter(tags=["notifications"], route_class=DecimalRoute, strict_content_type=False)

UserId = Annotated[str, Path(pattern=ID_PATTERN.pattern, description="the account's user id")]


def _notifier(services: Any) -> Notifier:
    if services.notifications is None:  # pragma: no cover - built with every app
        raise ApiError(503, "unavailable", "notifications are not running")
    return services.notifications


@router.get("/admin/notifications")
async def list_notifications(
    _: AdminCaller,
    services: ServicesDep,
    user: str | None = None,
    kind: str | None = None,
    status: str | None = None,
    before: str | None = None,
    limit: str = "50",
):
    """Newest first; `before` is the previous page's `next_cursor`."""
    if not limit.isdigit() or len(limit) > 4:
        raise ApiError(400, "invalid_request", "limit is a whole number between 1 and 200")
    try:
        return await _notifier(services).list(
            user=user, kind=kind, status=status, before=before, limit=int(limit)
        )
    except NotifyError as exc:
        raise refusal(exc) from None


@router.get("/admin/notifications/{notification_id}")
async def get_notification(notification_id: str, _: AdminCaller, services: ServicesDep):
    notifier = _notifier(services)
    try:
        return notifier.view(await notifier.get(notification_id))
    except NotifyError as exc:
        raise refusal(exc) from None


@router.post("/admin/notifications/{notification_id}/resend")
async def resend_notification(notification_id: str, _: AdminCaller, services: ServicesDep):
    """Back to pending: delivered again, with the same id."""
    notifier = _notifier(services)
    try:
        return notifier.view(await notifier.resend(notification_id))
    except NotifyError as exc:
        raise refusal(exc) from None


@router.get("/admin/accounts/{user_id}/notifications")
async def account_notifications(user_id: UserId, _: AdminCaller, services: ServicesDep):
    return await _notifier(services).account_settings(user_id)


@router.put("/admin/accounts/{user_id}/notifications")
async def set_account_notifications(
    user_id: UserId, body: Annotated[Any, Body()], _: AdminCaller, services: ServicesDep
):
    """`{"low_balance_threshold": "5"}`, or null for the gateway's default
    (CREDIT_LOW_BALANCE_THRESHOLD). Re-arms the account's low-balance notification."""
    try:
        return await _notifier(services).set_account_settings(user_id, body)
    except NotifyError as exc:
        raise refusal(exc) from None
