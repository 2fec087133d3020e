"""Who is calling the proxy: a gateway client key (then X-User-Id names the user), or a
per-user API key (which names the user by itself). Anything else is refused."""

from __future__ import annotations

from starlette.requests import Request

from ..core.apikeys import TOKEN_PREFIX, ApiKeys
from ..core.keyring import KeyRing, bearer
from ..core.keys import InvalidId, check_id


class IdentityError(Exception):
    """The caller is not identified; the message says why (never which keys exist).
    `status` is 401 (no valid key) or 403 (a valid key asking for another user)."""

    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.status = status


class Identity:
    def __init__(self, client_keys: KeyRing, api_keys: ApiKeys | None) -> None:
        self.client_keys = client_keys
        self.api_keys = api_keys

    async def user_of(self, request: Request) -> str:
        """The user to charge. May raise StateLost while a key's partition is rebuilt."""
        headers = request.headers
        token = bearer(headers.get("authorization")) or headers.get("x-api-key")
        if not token:
            raise IdentityError("an API key is required (Authorization: Bearer <key>)")
        claimed = headers.get("x-user-id")
        if token.startswith(TOKEN_PREFIX) and self.api_keys is not None:
            owner = await self.api_keys.owner(token)
            if owner is not None:
                if claimed and claimed != owner.user:
                    raise IdentityError("X-User-Id names another user than the API key's", 403)
                return owner.user
            # Not a user key: it may still be a client key that happens to look like one.
        if self.client_keys.match(token) is None:
            raise IdentityError("the API key is not valid")
        if not claimed:
            raise IdentityError("a client key needs the X-User-Id header")
        try:
            return check_id("X-User-Id", claimed)
        except InvalidId as exc:
            raise IdentityError(str(exc)) from exc
