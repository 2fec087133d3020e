"""Promo codes: defined by admins, claimed by users, never over-claimed.

A claim is two steps, because the code's counters and the user's account sit on different
partitions (on a Redis Cluster, different slots, which one script cannot both touch):
1. `promo_claim.lua` on the code's slot takes one use within the global and per-user limits
   and records the user's n-th claim as pending;
2. the grant, on the user's partition, with the op id `promo:<CODE>:<user>:<n>`;
3. `promo_done.lua` marks the claim granted.
A crash after 1 leaves the claim pending: the user's next claim resumes it (the script
answers "resume" with the same n), and the worker completes pending claims left for a
minute; the grant's op id makes a repeated step 2 a replay. Nothing grants twice (one op id
per claim) and nothing is lost (a pending claim is finished). Each claim is recorded in the
store before its grant, and Redis's counters are rebuilt from those records when Redis has
lost them (`promo_restore.lua`; a recorded claim whose grant is not in the ledger comes back
pending, and the worker's pass grants it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from gateway.core.engine import MAX_EXPIRY_MS, CreditEngine
from gateway.core.keys import ID_PATTERN
from gateway.core.money import MAX_UNITS, AmountError, credits_text, to_units
from gateway.core.store.base import Store
from gateway.core.store.promos import PromoRecord, claim_op_id

log = logging.getLogger("credit.promos")

CODE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
FIELDS = {
    "code", "credits", "description", "valid_from", "valid_until", "max_uses", "max_uses_per_user",
    "grant_expires_at", "grant_expires_after_seconds", "target_users", "new_accounts_days", "active",
}  # fmt: skip
PENDING_GRACE_MS = 60_000
MAX_GRANT_AFTER_S = 50 * 365 * 86_400


class PromoError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def normalize_code(value: Any) -> str:
    """Codes are case-insensitive and trimmed: "  launch100 " is LAUNCH100."""
    code = value.strip().upper() if isinstance(value, str) else ""
    if not code or len(code) > 40 or not set(code) <= CODE_CHARS:
        raise PromoError(400, "invalid_code", "a code is 1-40 letters, digits, _ or -")
    return code


def _time_ms(value: Any, name: str) -> int | None:
    if value is None:
        return None
    try:
        dt = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        dt = None
    if dt is None or dt.tzinfo is None:
        raise PromoError(400, "invalid_request", f"{name} is an ISO 8601 time with a timezone")
    return int(dt.timestamp() * 1000)


def _count(value: Any, name: str, *, minimum: int = 1, optional: bool = True) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PromoError(400, "invalid_request", f"{name} is a whole number of at least {minimum}")
    return value


def _iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


class Promos:
    def __init__(
        self, store: Store, engine: CreditEngine, *, now_ms: Callable[[], int] | None = None
    ) -> None:
        self.store, self.engine = store, engine
        self.scripts = engine.scripts  # the engine's registry: the Lua files are read once
        self.now_ms = now_ms or engine.now_ms

    def _keys(self, code: str) -> list[str]:
        tag = f"{self.engine.keys.prefix}:{{promo:{code}}}"
        return [f"{tag}:state", f"{tag}:pending"]

    # -- admin -------------------------------------------------------------------------------

    def _fields(self, body: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
        unknown = set(body) - FIELDS
        if unknown:
            raise PromoError(400, "invalid_request", f"unknown fields: {sorted(unknown)}")
        out = dict(base)
        if "credits" in body:
            try:
                units = to_units(body["credits"])
            except (AmountError, ValueError) as exc:
                raise PromoError(422, "invalid_amount", f"credits: {exc}") from None
            if units > MAX_UNITS:
                raise PromoError(422, "invalid_amount", "credits: at most 1,000,000,000")
            out["credits"] = units
        if "description" in body:
            d = body["description"]
            if d is not None and (not isinstance(d, str) or len(d) > 500):
                raise PromoError(400, "invalid_request", "description is a string of at most 500 characters")
            out["description"] = d
        for name, key in (("valid_from", "valid_from_ms"), ("valid_until", "valid_until_ms")):
            if name in body:
                out[key] = _time_ms(body[name], name)
        if "grant_expires_at" in body:
            out["grant_expires_at_ms"] = _time_ms(body["grant_expires_at"], "grant_expires_at")
        if "grant_expires_after_seconds" in body:
            out["grant_expires_after_s"] = _count(
                body["grant_expires_after_seconds"], "grant_expires_after_seconds"
            )
        if "max_uses" in body:
            out["max_uses"] = _count(body["max_uses"], "max_uses")
        if "max_uses_per_user" in body:
            out["max_uses_per_user"] = _count(body["max_uses_per_user"], "max_uses_per_user", optional=False)
        if "new_accounts_days" in body:
            out["new_accounts_days"] = _count(body["new_accounts_days"], "new_accounts_days")
        if "target_users" in body:
            users = body["target_users"]
            if users is not None and (
                not isinstance(users, list)
                or not all(isinstance(u, str) and ID_PATTERN.fullmatch(u) for u in users)
            ):
                raise PromoError(400, "invalid_request", "target_users is a list of user ids")
            out["target_users"] = sorted(set(users)) if users is not None else None
        if "active" in body:
            if not isinstance(body["active"], bool):
                raise PromoError(400, "invalid_request", "active is true or false")
            out["active"] = body["active"]
        if out.get("grant_expires_at_ms") is not None and out.get("grant_expires_after_s") is not None:
            raise PromoError(
                400, "invalid_request", "give grant_expires_at or grant_expires_after_seconds, not both"
            )
        at, after = out.get("grant_expires_at_ms"), out.get("grant_expires_after_s")
        if at is not None and not self.now_ms() < at <= MAX_EXPIRY_MS:
            raise PromoError(
                400, "invalid_request", "grant_expires_at must be in the future, and before 2248"
            )
        if after is not None and after > MAX_GRANT_AFTER_S:
            raise PromoError(400, "invalid_request", "grant_expires_after_seconds is at most 50 years")
        frm, until = out.get("valid_from_ms"), out.get("valid_until_ms")
        if frm is not None and until is not None and frm >= until:
            raise PromoError(400, "invalid_request", "valid_from must be before valid_until")
        return out

    def build(
        self, body: dict[str, Any], *, created_ms: int | None = None, imported_ms: int | None = None
    ) -> PromoRecord:
        """A validated code record, not stored yet."""
        code = normalize_code(body.get("code"))
        if "credits" not in body:
            raise PromoError(400, "invalid_request", "credits is required")
        now = self.now_ms()
        fields = self._fields({k: v for k, v in body.items() if k != "code"}, {})
        return PromoRecord(
            code=code, created_ms=created_ms or now, updated_ms=now, imported_ms=imported_ms, **fields
        )

    async def create(self, body: dict[str, Any]) -> PromoRecord:
        p = self.build(body)
        try:
            await self.store.create_promo(p)
        except KeyError:
            raise PromoError(
                409, "code_exists", f"the code {p.code} exists (codes are case-insensitive)"
            ) from None
        return p

    async def get(self, code: Any) -> PromoRecord:
        p = await self.store.promo(normalize_code(code))
        if p is None:
            raise PromoError(404, "unknown_code", "no such promo code")
        return p

    async def update(self, code: Any, body: dict[str, Any]) -> PromoRecord:
        p = await self.get(code)
        if "code" in body:
            raise PromoError(400, "invalid_request", "a code cannot be renamed")
        changes = self._fields(body, {})
        changes["updated_ms"] = self.now_ms()
        updated = await self.store.update_promo(p.code, changes)
        if updated is None:  # pragma: no cover - codes are never deleted
            raise PromoError(404, "unknown_code", "no such promo code")
        return updated

    # -- carried over from another system (gateway/migrate) ------------------------------------

    async def import_code(self, body: dict[str, Any], *, created_ms: int) -> PromoRecord | None:
        """Creates a code another system defined, as `create` does, marked imported now (see
        `import_claims`). None when the code exists already (imported before, or made here)."""
        p = self.build(body, created_ms=created_ms, imported_ms=self.now_ms())
        try:
            await self.store.create_promo(p)
        except KeyError:
            return None
        return p

    async def import_claims(self, p: PromoRecord, claims: list[tuple[str, int]]) -> int:
        """Records claims (user, n) made and granted in the system `p` was imported from, so
        that its limits count them; none is granted here. Each is recorded as taken just
        before the import, which is how a rebuild of the counters knows it was granted there
        (`_imported`); when Redis has the counters built already, they count it at once.
        Returns how many were new."""
        if p.imported_ms is None:
            raise ValueError(f"the code {p.code} was not imported: its claims are its own")
        known = {(u, n) for u, n, _ in await self.store.promo_claims(p.code)}
        new = [(u, n) for u, n in claims if (u, n) not in known]
        for user, n in new:
            await self.store.add_promo_claim(p.code, user, n, p.imported_ms - 1)
        args = [x for claim in claims for x in claim]
        if args:
            await self.scripts.call(self.engine.redis, "promo_import", self._keys(p.code), args)
        return len(new)

    async def claims_so_far(self, p: PromoRecord) -> int:
        await self._ensure_state(p)
        uses = await self.engine.redis.hget(self._keys(p.code)[0], "uses")
        return int(uses or 0)

    def view(self, p: PromoRecord, claims: int) -> dict[str, Any]:
        return {
            "code": p.code,
            "credits": credits_text(p.credits),
            "description": p.description,
            "valid_from": _iso(p.valid_from_ms),
            "valid_until": _iso(p.valid_until_ms),
            "max_uses": p.max_uses,
            "max_uses_per_user": p.max_uses_per_user,
            "grant_expires_at": _iso(p.grant_expires_at_ms),
            "grant_expires_after_seconds": p.grant_expires_after_s,
            "target_users": p.target_users,
            "new_accounts_days": p.new_accounts_days,
            "active": p.active,
            "claims": claims,
            "created_at": _iso(p.created_ms),
        }

    # -- users -------------------------------------------------------------------------------

    async def _refusal(self, p: PromoRecord, user: str) -> str | None:
        """Why `user` may not claim `p` now, from its definition alone (None: they may)."""
        now = self.now_ms()
        if not p.active:
            return "inactive"
        if p.valid_from_ms is not None and now < p.valid_from_ms:
            return "not_yet_valid"
        if p.valid_until_ms is not None and now >= p.valid_until_ms:
            return "expired"
        if p.grant_expires_at_ms is not None and now >= p.grant_expires_at_ms:
            return "expired"  # its credit would expire at once
        if p.target_users is not None and user not in p.target_users:
            return "not_targeted"
        if p.new_accounts_days is not None:
            first = await self.store.first_seen_ms(user)
            if first is not None and now - first > p.new_accounts_days * 86_400_000:
                return "not_a_new_account"
        return None

    async def eligibility(self, user: str, code: Any) -> dict[str, Any]:
        try:
            p = await self.get(code)
        except PromoError as exc:
            return {"eligible": False, "code": str(code)[:40], "credits": None, "reason": exc.code}
        reason = await self._refusal(p, user)
        if reason is None:
            await self._ensure_state(p)
            uses, mine = await self.engine.redis.hmget(self._keys(p.code)[0], ["uses", f"u:{user}"])
            if int(mine or 0) >= p.max_uses_per_user:
                reason = "already_claimed"
            elif p.max_uses is not None and int(uses or 0) >= p.max_uses:
                reason = "exhausted"
        return {
            "eligible": reason is None,
            "code": p.code,
            "credits": credits_text(p.credits),
            "reason": reason,
        }

    async def claim(self, user: str, code: Any) -> dict[str, Any]:
        p = await self.get(code)
        reason = await self._refusal(p, user)
        if reason is not None:
            status = 403 if reason in ("not_targeted", "not_a_new_account") else 409
            raise PromoError(status, reason, f"the code cannot be claimed: {reason.replace('_', ' ')}")
        keys = self._keys(p.code)
        args = [user, p.max_uses or 0, p.max_uses_per_user, self.now_ms()]
        result, n = await self.scripts.call(self.engine.redis, "promo_claim", keys, args)
        if _s(result) == "not_ready":
            await self._ensure_state(p)
            result, n = await self.scripts.call(self.engine.redis, "promo_claim", keys, args)
        result = _s(result)
        if result == "already_claimed":
            raise PromoError(409, "already_claimed", "you have claimed this code as often as it allows")
        if result == "exhausted":
            raise PromoError(409, "exhausted", "the code has no uses left")
        if result not in ("ok", "resume"):
            raise PromoError(503, "unavailable", f"the claim could not be taken ({result}); try again")
        return await self._grant(p, user, int(n))

    async def _grant(self, p: PromoRecord, user: str, n: int) -> dict[str, Any]:
        """Steps 2 and 3 of a claim taken (or resumed): the grant, then the claim marked."""
        keys = self._keys(p.code)
        taken_ms = await self.engine.redis.zscore(keys[1], f"{n}|{user}")
        at = int(taken_ms) if taken_ms is not None else self.now_ms()
        expires_ms = p.grant_expires_at_ms
        if p.grant_expires_after_s is not None:
            expires_ms = at + p.grant_expires_after_s * 1000
        expires = datetime.fromtimestamp(expires_ms / 1000, UTC) if expires_ms is not None else None
        # Durable before the grant: what Redis's counters are rebuilt from if Redis is lost.
        await self.store.add_promo_claim(p.code, user, n, at)
        r = await self.engine.grant_units(
            user,
            p.credits,
            op_id=claim_op_id(p.code, user, n),
            source="promo",
            expires_at=expires,
            metadata={"promo": p.code, "claim": n},
        )
        await self.scripts.call(self.engine.redis, "promo_done", keys, [user, n])
        return {
            "code": p.code,
            "credits": credits_text(p.credits),
            "claim": n,
            "expires_at": _iso(expires_ms),
            "available": str(r.state.available),
            "replayed": r.replayed,
        }

    async def _ensure_state(self, p: PromoRecord) -> None:
        """Builds the code's counters in Redis from the ledger, unless Redis has them."""
        keys = self._keys(p.code)
        if await self.engine.redis.hget(keys[0], "ready") is not None:
            return
        args: list[Any] = []
        for user, n, at_ms in await self.store.promo_claims(p.code):
            granted = _imported(p, at_ms) or await self.store.ledger_has(user, claim_op_id(p.code, user, n))
            args += [user, n, 1 if granted else 0, at_ms]
        await self.scripts.call(self.engine.redis, "promo_restore", keys, args)

    async def complete_pending(self, older_than_ms: int = PENDING_GRACE_MS) -> list[str]:
        """The worker's part: claims taken but not granted for a while (their claimant gone,
        or the process died between the steps) are granted. Returns a line per claim."""
        done = []
        cutoff = self.now_ms() - older_than_ms
        for p in await self.store.list_promos():
            for member in await self.engine.redis.zrangebyscore(self._keys(p.code)[1], "-inf", cutoff):
                n, _, user = _s(member).partition("|")
                try:
                    await self._grant(p, user, int(n))
                except Exception as exc:
                    # One claim that cannot be granted now holds up no other.
                    log.exception("promo %s: claim %s of %s not granted; tried again later", p.code, n, user)
                    done.append(f"FAILED {p.code}: claim {n} of {user}: {type(exc).__name__}: {exc}")
                    continue
                done.append(f"{p.code}: claim {n} of {user} granted")
        return done


def _imported(p: PromoRecord, at_ms: int) -> bool:
    """A claim made in the system the code was imported from (granted there, not here)."""
    return p.imported_ms is not None and at_ms < p.imported_ms


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)
