"""API keys: a ring of SHA-256 digests that bearer tokens are checked against, in constant time."""

from __future__ import annotations

import hashlib
import hmac


class KeyRing:
    """A set of key digests. Every candidate is compared with every digest (no early exit)."""

    def __init__(self, digests: list[bytes]) -> None:
        self.digests = list(digests)

    def match(self, presented: str | None) -> str | None:
        """The matching key's id (first 8 hex digits of its digest), or None."""
        if not presented:
            return None
        d = hashlib.sha256(presented.encode()).digest()
        found = None
        for known in self.digests:
            if hmac.compare_digest(d, known):
                found = known
        return found.hex()[:8] if found else None


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None
