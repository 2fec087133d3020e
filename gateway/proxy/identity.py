"""Who is calling the proxy: a gateway client key (then X-User-Id names the user)."""

from __future__ import annotations

from starlette.requests import Request

from ..api.auth import KeyRing, bearer
from ..core.keys import InvalidId, check_id


class IdentityError(Exception):
    """The caller is not identified; the message says why (never which keys exist)."""


class Identity:
    def __init__(self, client_keys: KeyRing) -> None:
        self.client_keys = client_keys

    async def user_of(self, request: Request) -> str:
        token = bearer(request.headers.get("authorization")) or request.headers.get("x-api-key")
        if not token:
            raise IdentityError("an API key is required (Authorization: Bearer <key>)")
        if self.client_keys.match(token) is None:
            raise IdentityError("the API key is not valid")
        user = request.headers.get("x-user-id")
        if not user:
            raise IdentityError("a client key needs the X-User-Id header")
        try:
            return check_id("X-User-Id", user)
        except InvalidId as exc:
            raise IdentityError(str(exc)) from exc
