"""An async client of the gateway's holds API (aiohttp): hold, settle or release, retried safely.

    async with CreditsClient("http://gateway:8000", CLIENT_KEY) as credits:
        async with credits.hold("alice", "0.5") as h:
            cost = await my_llm_call()
            await h.settle(cost)

The hold is released when the block raises, and when it ends without a settle. A call that
fails transiently (a connection error, a timeout, a 5xx such as 503) is retried with the
same identity: the reserve with the hold id this client chose, the settle and release by
that hold id, so a retry whose first try did land answers that first answer (docs/api.md,
"Retrying"), and one hold is placed however often it is retried. Every error code of the
API raises its own exception class (CODES), all CreditsError.

Amounts are Decimal, decimal strings or ints, sent as strings; floats are refused.
"""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from types import TracebackType
from typing import Any

import aiohttp

__all__ = ["CODES", "CreditsClient", "CreditsError", "Hold"]


class CreditsError(Exception):
    """The API refused the call: `status`, `code` and `details` as answered."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.details = details or {}


class BadRequest(CreditsError):
    """The request is refused as written (a field, an amount, an id, the body)."""


class InvalidAmount(BadRequest):
    pass


class Unauthorized(CreditsError):
    pass


class Forbidden(CreditsError):
    pass


class UserMissing(BadRequest):
    """A client key without a usable X-User-Id."""


class PaymentRequired(CreditsError):
    """402: the account cannot pay for the hold."""


class InsufficientCredits(PaymentRequired):
    @property
    def available(self) -> Decimal | None:
        a = self.details.get("available")
        return None if a is None else Decimal(a)


class InDebt(PaymentRequired):
    pass


class NotFound(CreditsError):
    pass


class HoldNotFound(NotFound):
    pass


class HoldResolved(CreditsError):
    """409: the hold was resolved before (`details["hold_status"]`)."""


class AlreadySettled(HoldResolved):
    pass


class AlreadyReleased(HoldResolved):
    pass


class HoldExpired(HoldResolved):
    pass


class HoldExists(CreditsError):
    """409: the hold id is taken by another operation; choose a new one."""


class Conflict(CreditsError):
    pass


class OpConflict(CreditsError):
    """422: the same hold id (or Idempotency-Key) with other fields."""


class BodyTooLarge(BadRequest):
    pass


class RateLimited(CreditsError):
    pass


class Unavailable(CreditsError):
    """503 (or another 5xx) still answered after the retries."""


class PlanRefused(CreditsError):
    """Plans and subscriptions: no such plan, none subscribed, a plan not open."""


# Every error code of docs/api.md, and the exception it raises.
CODES: dict[str, type[CreditsError]] = {
    "missing_user": UserMissing,
    "invalid_user": UserMissing,
    "invalid_idempotency_key": BadRequest,
    "unauthorized": Unauthorized,
    "insufficient_credits": InsufficientCredits,
    "in_debt": InDebt,
    "forbidden": Forbidden,
    "model_not_allowed": Forbidden,
    "unknown_plan": PlanRefused,
    "no_subscription": PlanRefused,
    "plan_inactive": PlanRefused,
    "already_subscribed": PlanRefused,
    "invalid_request": BadRequest,
    "provider_not_configured": BadRequest,
    "unknown_provider": BadRequest,
    "hold_not_found": HoldNotFound,
    "not_found": NotFound,
    "key_not_found": NotFound,
    "proxy_not_configured": NotFound,
    "already_settled": AlreadySettled,
    "already_released": AlreadyReleased,
    "hold_expired": HoldExpired,
    "hold_exists": HoldExists,
    "body_too_large": BodyTooLarge,
    "op_conflict": OpConflict,
    "invalid_amount": InvalidAmount,
    "invalid_expiry": BadRequest,
    "invalid_id": BadRequest,
    "malformed_json": BadRequest,
    "invalid_cursor": BadRequest,
    "invalid_pricing": BadRequest,
    "invalid_kind": BadRequest,
    "invalid_status": BadRequest,
    "provider_refused": BadRequest,
    "in_flight": Conflict,
    "rate_limited": RateLimited,
    "credit_store_unavailable": Unavailable,
    "store_unavailable": Unavailable,
    "state_lost": Unavailable,
    "backlog_full": Unavailable,
    "not_ready": Unavailable,
}
_BY_STATUS: dict[int, type[CreditsError]] = {
    400: BadRequest, 401: Unauthorized, 402: PaymentRequired, 403: Forbidden, 404: NotFound,
    409: Conflict, 413: BodyTooLarge, 422: BadRequest, 429: RateLimited,
}  # fmt: skip


def error_of(status: int, body: Any) -> CreditsError:
    """The exception for an error answer: by its code, else by its status."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {"code": f"http_{status}", "message": str(body)[:200]}
    code = str(err.get("code", f"http_{status}"))
    details = {k: v for k, v in err.items() if k not in ("code", "message")}
    cls = CODES.get(code) or _BY_STATUS.get(status) or (Unavailable if status >= 500 else CreditsError)
    return cls(status, code, str(err.get("message", "")), details)


def _amount(value: Decimal | str | int) -> str:
    if isinstance(value, (float, bool)) or not isinstance(value, (Decimal, str, int)):
        raise TypeError(
            f"an amount is a Decimal, a decimal string or an int, not a {type(value).__name__}"
            " (a float cannot hold credits exactly)"
        )
    return str(value)


class CreditsClient:
    """The holds API of one gateway, with a client key (then `user` names who pays on each
    call, sent as X-User-Id) or a user's own `cgk_` key (then `user` may be None)."""

    def __init__(
        self,
        base_url: str,
        key: str,
        *,
        session: aiohttp.ClientSession | None = None,
        attempts: int = 4,
        backoff_seconds: float = 0.2,
        max_wait_seconds: float = 5.0,
        timeout_seconds: float = 10.0,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.base_url = base_url.rstrip("/")
        self._key = key
        self._session = session
        self._own_session = session is None
        self.attempts = attempts
        self.backoff_seconds = backoff_seconds
        self.max_wait_seconds = max_wait_seconds
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)

    async def __aenter__(self) -> CreditsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    async def request(
        self, method: str, path: str, user: str | None, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """One API call, retried on a connection error, a timeout or a 5xx (after its
        Retry-After, at most `max_wait_seconds`) up to `attempts` tries; the answer, or the
        error's exception."""
        headers = {"Authorization": f"Bearer {self._key}"}
        if user is not None:
            headers["X-User-Id"] = user
        for attempt in range(1, self.attempts + 1):
            last = attempt == self.attempts
            try:
                async with self._http().request(
                    method, self.base_url + path, json=body, headers=headers
                ) as r:
                    try:
                        answer = await r.json(content_type=None)
                    except ValueError:
                        answer = None
                    if r.status < 400:
                        return answer if isinstance(answer, dict) else {}
                    error = error_of(r.status, answer)
                    if r.status < 500 or last:
                        raise error
                    wait = _retry_after(
                        r.headers.get("Retry-After"), self.backoff_seconds * 2 ** (attempt - 1)
                    )
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError):
                # The call may have landed: the retry's identity makes it answer that.
                if last:
                    raise
                wait = self.backoff_seconds * 2 ** (attempt - 1)
            await asyncio.sleep(min(wait, self.max_wait_seconds))
        raise AssertionError("unreachable")  # pragma: no cover

    # -- the holds API -------------------------------------------------------------------------

    async def reserve(
        self,
        user: str | None,
        amount: Decimal | str | int,
        *,
        ttl_seconds: int = 300,
        hold_id: str | None = None,
        description: str | None = None,
    ) -> Hold:
        """Places a hold (its id chosen here unless given, so a retry places no second one)."""
        hid = hold_id or f"h-{uuid.uuid4().hex}"
        body: dict[str, Any] = {"amount": _amount(amount), "ttl_seconds": ttl_seconds, "hold_id": hid}
        if description is not None:
            body["description"] = description
        answer = await self.request("POST", "/credits/holds", user, body)
        return Hold(self, user, hid, answer)

    def hold(
        self,
        user: str | None,
        amount: Decimal | str | int,
        *,
        ttl_seconds: int = 300,
        hold_id: str | None = None,
        description: str | None = None,
    ) -> _HoldBlock:
        """`async with client.hold(user, "0.5") as h: ...; await h.settle(cost)`: the hold is
        released if the block raises or ends without settling it."""
        _amount(amount)  # a float is refused here, before anything is sent
        return _HoldBlock(self, user, amount, ttl_seconds, hold_id, description)

    async def balance(self, user: str | None) -> dict[str, Any]:
        return await self.request("GET", "/credits/balance", user)


def _retry_after(value: str | None, default: float) -> float:
    try:
        return max(float(value), 0.0) if value is not None else default
    except ValueError:
        return default


class Hold:
    """A placed hold: settle it or release it (once; retried by its id)."""

    def __init__(self, client: CreditsClient, user: str | None, hold_id: str, answer: dict[str, Any]) -> None:
        self.client, self.user, self.hold_id = client, user, hold_id
        self.amount = Decimal(answer.get("amount", "0"))
        self.expires_at: str | None = answer.get("expires_at")
        self.replayed = bool(answer.get("replayed"))
        self.result: dict[str, Any] | None = None  # the settle's or release's answer

    @property
    def resolved(self) -> bool:
        return self.result is not None

    async def settle(self, amount: Decimal | str | int) -> dict[str, Any]:
        """Charges `amount` (>= 0); the rest of the hold returns to the account."""
        body = {"amount": _amount(amount)}
        self.result = await self.client.request(
            "POST", f"/credits/holds/{self.hold_id}/settle", self.user, body
        )
        return self.result

    async def release(self) -> dict[str, Any]:
        """Gives the whole hold back."""
        self.result = await self.client.request("POST", f"/credits/holds/{self.hold_id}/release", self.user)
        return self.result


class _HoldBlock:
    def __init__(
        self,
        client: CreditsClient,
        user: str | None,
        amount: Decimal | str | int,
        ttl_seconds: int,
        hold_id: str | None,
        description: str | None,
    ) -> None:
        self.args = (client, user, amount, ttl_seconds, hold_id, description)
        self.hold: Hold | None = None

    async def __aenter__(self) -> Hold:
        client, user, amount, ttl, hid, desc = self.args
        self.hold = await client.reserve(user, amount, ttl_seconds=ttl, hold_id=hid, description=desc)
        return self.hold

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        h = self.hold
        if h is None or h.resolved:
            return
        try:
            await h.release()
        except HoldResolved:
            pass  # settled or expired meanwhile (a settle whose answer was lost): nothing held
        except (CreditsError, aiohttp.ClientError, TimeoutError):
            if kind is None:
                raise
            # The block's own error matters more; the hold expires by itself at its TTL.
