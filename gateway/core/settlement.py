"""Settling, releasing and charging when Redis falters, without losing or doubling a charge.

Every call here is idempotent by its operation id (a settle's is the hold's, by default),
so it is simply tried again under the same id: at once on a connection error or timeout
(`retrying`), then, for a charge (settle, debit), in the background until it lands (or
`debit_retry_seconds` after the hold's deadline, or after the debit was asked for: then it
is logged with its amount). A try whose write reached Redis but whose answer was lost is
answered from the stored first answer on the next try: never applied twice. A settle that
finds its hold expired uncharged is charged as a debit instead: what was used is owed.

Web-free: the metering proxy and library mode both use it.

    settler = Settler(engine)
    r = await settler.settle(user, hold.hold_id, units, expires_at_ms=hold.expires_at_ms, metadata=meta)
    if r is None:
        ...  # not confirmed yet (retried in the background): show no figure, not a wrong one
    ...
    await settler.drain(timeout=30)  # at shutdown, before closing Redis

Other refusals (CreditError: already_settled, op_conflict...) are raised to the caller as
they are; `None` always means "not confirmed, still being retried".
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .engine import CreditEngine
from .errors import CreditError, HoldExpired, HoldNotFound, StateLost
from .keys import MAX_ID_LENGTH
from .results import DebitResult, HoldResolution

log = logging.getLogger("credit.settlement")

T = TypeVar("T")

# A settle answered so: its hold is gone uncharged (expired, or lost with Redis's data before
# the worker stored it). A settle that did land never answers so: its replay does.
UNCHARGED = (HoldExpired, HoldNotFound)

# Tried again at once: the connection broke or the answer did not come in time.
RETRY_AT_ONCE = (RedisConnectionError, RedisTimeoutError)
# Tried again later, in the background: any Redis failure, and a partition being rebuilt
# after Redis lost data (the hold and the operation ids come back with it).
RETRY_LATER = (RedisError, StateLost)


def _ignore(_: str) -> None:
    pass


def late_op_id(hold_id: str) -> str:
    """The operation id of the debit that stands in for a hold's settle once the hold expired
    uncharged: one per hold, so that it too applies once."""
    op = f"{hold_id}.late"
    return op if len(op) <= MAX_ID_LENGTH else "late." + hashlib.sha256(hold_id.encode()).hexdigest()[:40]


async def retrying(
    op: Callable[[], Awaitable[T]],
    attempts: int = 3,
    backoff_seconds: float = 0.05,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """Runs an engine call, again on a Redis connection error or timeout (at most
    `attempts` tries, `backoff_seconds` * n apart). Only for idempotent calls: every
    engine call is, by its operation id."""
    for attempt in range(attempts):
        try:
            return await op()
        except RETRY_AT_ONCE:
            if attempt == attempts - 1:
                raise
            if on_retry is not None:
                on_retry()
            await asyncio.sleep(backoff_seconds * (attempt + 1))
    raise AssertionError("unreachable")


class Settler:
    """Settles, releases and debits through `engine` with retries, and owns the background
    tasks of the charges Redis has not confirmed yet (`drain` them at shutdown).

    attempts / backoff_seconds: the tries at once (see `retrying`).
    retry_interval_seconds: the pause between background tries.
    debit_retry_seconds: how long an unconfirmed debit is tried in the background, and an
      unconfirmed settle after its hold's deadline.
    observe: told what happens to the charges, for the metrics: "retry" (tried again at
      once), "unconfirmed" (left to the background), "confirmed_later", "given_up",
      "late_debit" (a hold gone uncharged, charged as a debit).
    """

    def __init__(
        self,
        engine: CreditEngine,
        *,
        attempts: int = 3,
        backoff_seconds: float = 0.05,
        retry_interval_seconds: float = 1.0,
        debit_retry_seconds: float = 3600.0,
        observe: Callable[[str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.observe = observe or _ignore
        self.attempts = attempts
        self.backoff_seconds = backoff_seconds
        self.retry_interval_seconds = retry_interval_seconds
        self.debit_retry_ms = round(debit_retry_seconds * 1000)
        self._pending: set[asyncio.Task] = set()

    # -- the calls -------------------------------------------------------------------------

    async def settle(
        self,
        user: str,
        hold_id: str,
        units: int,
        *,
        expires_at_ms: int,
        metadata: dict[str, Any] | None = None,
        tokens: int | None = None,
        op_id: str | None = None,
    ) -> HoldResolution | DebitResult | None:
        """Posts the hold at `units` micro-credits (`expires_at_ms`: the hold's deadline, as
        the reserve answered it). The resolution, or None when Redis did not confirm it:
        then it keeps being tried in the background (and is logged with its amount if it
        never lands). A hold gone uncharged before the settle landed (hold_expired, or
        hold_not_found after Redis lost it; a settle that did land answers neither: its
        replay does) is charged all the same, as a debit under `<hold id>.late` that may go
        into debt: what was used is owed. Other refusals are raised."""

        def call() -> Awaitable[HoldResolution]:
            return self.engine.settle_units(
                user, hold_id, units, op_id=op_id, metadata=metadata, tokens=tokens
            )

        async def late() -> DebitResult | None:
            self.observe("late_debit")
            log.warning(
                "hold %s of %s is gone uncharged (expired, or lost with Redis's data) before its settle "
                "of %d micro-credits landed; charging it as a debit",
                hold_id,
                user,
                units,
            )
            return await self.debit(
                user,
                units,
                op_id=late_op_id(hold_id),
                metadata={**(metadata or {}), "hold_id": hold_id, "reason": "hold_expired"},
            )

        what = f"settle of {hold_id} for {user} at {units} micro-credits"
        # Tried until the hold is sure to have expired and a debit's own window after that:
        # until it answers, whether the settle landed is unknown, so no debit may stand in.
        deadline = max(expires_at_ms, self.engine.now_ms()) + self.debit_retry_ms
        return await self._charge(call, what, deadline, on_expired=late)

    async def debit(
        self,
        user: str,
        units: int,
        *,
        op_id: str,
        metadata: dict[str, Any] | None = None,
        allow_debt: bool = True,
    ) -> DebitResult | None:
        """Charges `units` micro-credits at once; by default what free credit cannot cover
        becomes debt (usage reported after its request settled). The result, or None when
        Redis did not confirm it: then it keeps being tried in the background for
        `debit_retry_seconds`. Refusals are raised."""

        def call() -> Awaitable[DebitResult]:
            return self.engine.debit_units(user, units, op_id=op_id, metadata=metadata, allow_debt=allow_debt)

        what = f"debit {op_id} of {user} at {units} micro-credits"
        return await self._charge(call, what, self.engine.now_ms() + self.debit_retry_ms)

    async def release(
        self,
        user: str,
        hold_id: str,
        *,
        metadata: dict[str, Any] | None = None,
        void_if_unknown: bool = False,
        op_id: str | None = None,
        until_ms: int | None = None,
    ) -> HoldResolution | None:
        """Voids the hold; None when Redis did not confirm it: then, given `until_ms` (when
        the hold expires by itself anyway), it keeps being tried in the background until
        then, so the credit is not locked for the hold's whole life. Refusals are raised
        (HoldNotFound too, also with void_if_unknown); in the background they end it."""

        def call() -> Awaitable[HoldResolution]:
            return self.engine.release(
                user, hold_id, op_id=op_id, metadata=metadata, void_if_unknown=void_if_unknown
            )

        try:
            return await retrying(call, self.attempts, self.backoff_seconds, self._retried)
        except RETRY_LATER as exc:
            self.observe("unconfirmed")
            log.warning(
                "release of %s for %s not confirmed by Redis (%r)%s",
                hold_id,
                user,
                exc,
                "; trying again in the background" if until_ms else "; the hold expires by itself",
            )
            if until_ms is not None:
                self.spawn(self._release_later(call, f"release of {hold_id} for {user}", until_ms))
            return None

    # -- background tasks ------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Runs `coro` as a task this settler keeps (and `drain` waits for)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    @property
    def pending(self) -> int:
        """Background tasks still running."""
        return len(self._pending)

    # `timeout` is not a deadline on the call (ASYNC109): past it, the rest are cancelled and counted.
    async def drain(self, timeout: float | None = None) -> int:  # noqa: ASYNC109
        """Waits for the background tasks (at shutdown, before Redis is closed); after
        `timeout` seconds the rest are cancelled. Returns how many were cancelled (a
        cancelled charge is logged with its amount)."""
        if not self._pending:
            return 0
        tasks = list(self._pending)
        _, left = await asyncio.wait(tasks, timeout=timeout)
        for t in left:
            t.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)
        return len(left)

    # -- internals -------------------------------------------------------------------------

    async def _release_later(self, call: Callable[[], Awaitable[Any]], what: str, until_ms: int) -> None:
        while self.engine.now_ms() < until_ms:
            await asyncio.sleep(self.retry_interval_seconds)
            try:
                await call()
            except RETRY_LATER:
                continue
            except CreditError as exc:  # resolved meanwhile, or (a give-back) never placed
                log.info("%s on a later try: %s", what, exc.code)
                return
            self.observe("confirmed_later")
            log.info("%s confirmed on a later try", what)
            return
        self.observe("given_up")

    def _retried(self) -> None:
        self.observe("retry")

    async def _charge(
        self,
        call: Callable[[], Awaitable[T]],
        what: str,
        deadline_ms: int,
        on_expired: Callable[[], Awaitable[Any]] | None = None,
    ) -> Any:
        try:
            return await retrying(call, self.attempts, self.backoff_seconds, self._retried)
        except UNCHARGED:
            if on_expired is None:
                raise
            return await on_expired()
        except RETRY_LATER as exc:
            self.observe("unconfirmed")
            log.warning("%s not confirmed by Redis (%r); trying again in the background", what, exc)
            self.spawn(self._later(call, what, deadline_ms, on_expired))
            return None

    async def _later(
        self,
        call: Callable[[], Awaitable[Any]],
        what: str,
        deadline_ms: int,
        on_expired: Callable[[], Awaitable[Any]] | None,
    ) -> None:
        try:
            while True:
                await asyncio.sleep(self.retry_interval_seconds)
                if self.engine.now_ms() >= deadline_ms:
                    self.observe("given_up")
                    log.error("%s never confirmed by Redis; given up", what)
                    return
                try:
                    await call()
                except RETRY_LATER:
                    continue
                except UNCHARGED:
                    if on_expired is not None:
                        await on_expired()
                        return
                    log.error("%s refused on a later try: hold_expired", what)
                    return
                except CreditError as exc:
                    log.error("%s refused on a later try: %s %s", what, exc.code, exc.details)
                    return
                except Exception:  # a bug, not Redis: say so rather than die silently
                    log.exception("%s failed on a later try; given up", what)
                    return
                self.observe("confirmed_later")
                log.info("%s confirmed on a later try", what)
                return
        except asyncio.CancelledError:
            self.observe("given_up")
            log.error("%s not confirmed by Redis before shutdown; given up", what)
            raise
