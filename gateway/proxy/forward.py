"""The metering proxy's hold lifecycle: reserve -> forward -> settle or release.

One metered request, once admitted (request_check.py) and sized (planning.py): a hold on
its worst case, its output cap lowered to what the user can afford -> forwarded to the
configured upstream with the gateway's credential -> settled from the usage the upstream
reports, or counted (fallback_count.py) -> answered with X-Request-Id / X-Credits-Charged /
X-Credits-Remaining. A stream past what it holds holds more (extension holds, settled with
the call) or is cut at the credit cap. Failures before any output release the hold; a
client that goes away mid-stream pays for what was produced. A flat-priced route takes the
same hold at its price. Nothing here leaks a hold: every path settles or releases, a
crashed process's holds expire (their timeout covers the upstream timeout), and drain
waits for the settlements still running at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import aiohttp
import orjson
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..core.engine import CreditEngine, RateCharge
from ..core.errors import (
    AccountInDebt,
    BacklogFull,
    CreditError,
    HoldNotFound,
    InsufficientCredits,
    ModelNotAllowed,
    RateLimited,
    StateLost,
)
from ..core.keys import PROXY_HOLD_PREFIX
from ..core.money import MAX_UNITS, from_units, to_units
from ..core.pricing import Usage
from ..core.settlement import Settler
from ..logs import REQUEST_ID
from ..metrics import Metrics
from .call import Call
from .config import ProxyConfig, Upstream
from .credit_cap import CreditCap, usage_so_far
from .errors import insufficient_credits, proxy_error, reserve_refusal, unavailable
from .fallback_count import answer_usage, stream_usage
from .headers import passed_headers, upstream_headers
from .identity import Identity
from .kinds import Adapter, for_route, metered_routes
from .planning import clamp, plan, worst_tokens, worst_units
from .pricing_cache import PricingCache
from .request_check import admit, admit_flat, identify, not_served
from .sse import event_end, sse_data
from .stream_meter import StreamMeter
from .tokens import TokenCounter
from .worst_case import BadRequest

log = logging.getLogger("credit.proxy")

# How many times a stream past its hold may hold more credit before it is cut (each time at
# least the first hold's amount): bounds what an upstream ignoring the cap can spend.
MAX_EXTENSIONS = 8
_METERED_ROUTES = frozenset(metered_routes())


class MeteringProxy:
    """One process's proxy: takes each proxied request through its hold, from reserve to
    settle or release, and keeps the settlements still running until drained."""

    def __init__(
        self,
        engine: CreditEngine,
        config: ProxyConfig,
        pricing: PricingCache,
        identity: Identity,
        session: aiohttp.ClientSession,
        metrics: Metrics,
    ) -> None:
        self.engine = engine
        self.config = config
        self.pricing = pricing
        self.identity = identity
        self.session = session
        self.settler = Settler(engine, observe=lambda what: metrics.settles.labels(what).inc())
        self.tokens = TokenCounter()  # loads a vocabulary at first use only
        # One timeout object per upstream, not one per request.
        self.timeouts = {u.name: aiohttp.ClientTimeout(total=u.timeout_seconds) for u in config.upstreams}
        self.metrics = metrics

    # -- entry -------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        # The raw ASGI path: request.url builds a whole URL object per request. For the
        # metered routes it equals request.url.path; any other path goes to _flat, which
        # reads request.url (its query string is forwarded).
        path = request.scope["path"]
        kind = for_route(path)
        # 128 random bits as hex: uuid4().hex's length and alphabet without its UUID object.
        request_id = PROXY_HOLD_PREFIX + os.urandom(16).hex()
        rid = {"X-Request-Id": request_id}
        # The id the client gets back is the one its log lines (and its settle's) carry.
        REQUEST_ID.set(request_id)
        user = await identify(self.identity, request, kind, rid)
        if isinstance(user, Response):
            return user
        if path not in _METERED_ROUTES:
            return await self._flat(request, user, kind, request_id)
        req = await admit(request, path, kind, self.config, self.pricing, rid)
        if isinstance(req, Response):
            return req
        try:
            call = plan(request_id, user, path, req, self.config.chars_per_token)
        except BadRequest as exc:
            return proxy_error(req.kind, 400, "invalid_request", str(exc), rid)
        refusal = await self._reserve(call)
        if refusal is not None:
            return refusal
        return await self._forward(request, call)

    # -- reserving ---------------------------------------------------------------------

    async def _reserve(self, call: Call) -> Response | None:
        worst = worst_units(call)
        ttl = call.upstream.timeout_seconds + self.config.hold_margin_seconds
        rid = {"X-Request-Id": call.request_id}
        limits = self.config.rate_limits
        clamped: set[str] = set()  # each limit may lower the requested output once
        for _ in range(3):
            # The tokens-per-minute count takes the worst case too; settle corrects it.
            rate = RateCharge(
                worst_tokens(call), limits.requests_per_minute, limits.tokens_per_minute, call.model
            )
            try:
                hold = await self.engine.reserve_units(
                    call.user, worst, hold_id=call.request_id, ttl_seconds=ttl, metadata=call.meta, rate=rate
                )
                call.hold_units, call.hold_expires_ms = worst, hold.expires_at_ms
                call.budget_units = worst
                self.metrics.reserves.inc(("ok",))
                if clamped:
                    self.metrics.reserves.inc(("clamped",))
                return None
            except RateLimited as exc:
                # Alone over the tokens limit: answer shorter when the prompt leaves room.
                if exc.retry_after_ms < 0 and exc.details.get("limit") == "tokens_per_minute":
                    fit = int(exc.details.get("value", 0)) - call.est_input
                    if clamp(call, fit, "tpm", clamped, self.config.min_output_tokens):
                        worst = worst_units(call)
                        continue
                return self._refused(call, exc, rid)
            except InsufficientCredits as exc:
                available = to_units(exc.details.get("available", 0), allow_zero=True)
                affordable = call.price.output_tokens_affordable(available, call.est_input)
                if clamp(call, affordable, "credit", clamped, self.config.min_output_tokens):
                    worst = worst_units(call)
                    continue
                return self._refused(call, exc, rid)
            except (AccountInDebt, StateLost, BacklogFull, ModelNotAllowed) as exc:
                return self._refused(call, exc, rid)
            except RedisError as exc:
                self.metrics.reserves.inc(("unconfirmed",))
                return self._reserve_unconfirmed(call.kind, call.user, call.request_id, call.meta, exc, ttl)
        self.metrics.reserves.inc((InsufficientCredits.code,))
        return insufficient_credits(call.kind, rid)

    def _refused(self, call: Call, exc: CreditError, rid: dict[str, str]) -> Response:
        self.metrics.reserves.inc((exc.code,))
        return reserve_refusal(call.kind, exc, rid)

    def _reserve_unconfirmed(
        self, kind: Adapter, user: str, hold_id: str, meta: dict[str, Any], exc: RedisError, ttl: float
    ) -> Response:
        """Redis did not confirm a reserve: the hold may or may not exist. It is given back
        when Redis answers again (it would expire by itself anyway); the client retries."""
        log.error("reserve of %s for %s failed: %s", hold_id, user, exc)
        until = self.engine.now_ms() + round(ttl * 1000)
        meta = {**meta, "reason": "reserve_unconfirmed"}
        self.settler.spawn(self._give_back(user, hold_id, meta, until, void_if_unknown=True))
        return unavailable(kind, {"X-Request-Id": hold_id})

    # -- forwarding --------------------------------------------------------------------

    async def _forward(self, request: Request, call: Call) -> Response:
        url = call.upstream.base_url + call.path
        headers = upstream_headers(request, call.upstream)
        headers["content-type"] = "application/json"
        timeout = self._timeout(call.upstream)
        rid = {"X-Request-Id": call.request_id}
        uncharged = {**rid, "X-Credits-Charged": "0"}  # the hold is given back: nothing charged
        sent = time.perf_counter()
        try:
            resp = await self.session.post(
                url, data=orjson.dumps(call.body), headers=headers, allow_redirects=False, timeout=timeout
            )
        except TimeoutError:
            self._upstream_done(call, sent, "timeout")
            await self._release(call, "upstream_timeout")
            return proxy_error(
                call.kind, 504, "upstream_timeout", "the upstream did not answer in time", uncharged
            )
        except aiohttp.ClientError as exc:
            self._upstream_done(call, sent, "unreachable")
            await self._release(call, "upstream_unreachable")
            log.warning("upstream %s unreachable: %s", call.upstream.name, exc)
            return proxy_error(
                call.kind, 502, "upstream_unreachable", "the upstream could not be reached", uncharged
            )
        self.metrics.upstream_first_byte_seconds.observe((call.upstream.name,), time.perf_counter() - sent)
        if resp.status >= 300:
            try:
                raw = await resp.read()
            except (TimeoutError, aiohttp.ClientError):
                raw = b""
            finally:
                resp.release()
            self._upstream_done(call, sent, f"http_{resp.status // 100}xx")
            await self._release(call, f"upstream_status_{resp.status}")
            return Response(raw, status_code=resp.status, headers={**passed_headers(resp), **uncharged})
        if call.stream and resp.content_type == "text/event-stream":
            return StreamingResponse(
                self._stream(call, resp, sent),
                status_code=resp.status,
                headers={**passed_headers(resp), **rid},
                media_type="text/event-stream",
            )
        return await self._whole(call, resp, sent)

    def _upstream_done(self, call: Call, sent: float, outcome: str) -> None:
        self.metrics.upstream_seconds.observe((call.upstream.name, outcome), time.perf_counter() - sent)

    def _timeout(self, upstream: Upstream) -> aiohttp.ClientTimeout:
        timeout = self.timeouts.get(upstream.name)
        if timeout is None or timeout.total != upstream.timeout_seconds:
            timeout = self.timeouts[upstream.name] = aiohttp.ClientTimeout(total=upstream.timeout_seconds)
        return timeout

    async def _whole(self, call: Call, resp: aiohttp.ClientResponse, sent: float) -> Response:
        rid = {"X-Request-Id": call.request_id}
        try:
            raw = await resp.read()
        except (TimeoutError, aiohttp.ClientError):
            resp.release()
            self._upstream_done(call, sent, "broken")
            await self._release(call, "upstream_failed")
            return proxy_error(
                call.kind,
                502,
                "upstream_failed",
                "the upstream answer broke off",
                {**rid, "X-Credits-Charged": "0"},
            )
        headers = passed_headers(resp)
        resp.release()
        self._upstream_done(call, sent, "ok")
        usage, answer = None, None
        try:
            answer = orjson.loads(raw)
            usage = call.kind.usage_of(call.path, answer)
        except orjson.JSONDecodeError:
            pass
        if usage is None:  # no usage reported: count the prompt and the answer's text
            usage = await answer_usage(self.tokens, call, answer, len(raw), self.config.chars_per_token)
        charged, remaining = await self._settle(call, usage, partial=False)
        headers.update(rid)
        if charged is not None:  # unconfirmed: no figure rather than a wrong one
            headers["X-Credits-Charged"] = str(from_units(charged))
        if remaining is not None:
            headers["X-Credits-Remaining"] = str(from_units(remaining))
        return Response(raw, status_code=resp.status, headers=headers)

    async def _stream(self, call: Call, resp: aiohttp.ClientResponse, sent: float) -> AsyncIterator[bytes]:
        meter = call.kind.stream_meter()
        cap = CreditCap(call, meter, self.config.chars_per_token) if self.config.hard_cap else None
        done = False
        outcome = "client_gone"
        try:
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                # The complete events of one upstream read go out as one write: a send per
                # event through Starlette and uvicorn was the largest cost of a stream.
                out = []
                while True:
                    cut, sep = event_end(buf)
                    if cut < 0:
                        break
                    event, buf = buf[: cut + sep], buf[cut + sep :]
                    obj = meter.feed(sse_data(event))
                    if call.strip_usage_chunk and obj is not None and call.kind.is_asked_usage_event(obj):
                        continue  # the usage chunk we asked for on the client's behalf
                    out.append(event)
                    while cap is not None and cap.passed(meter):
                        if not await self._extend(call, meter):
                            yield b"".join(out)  # up to and including the event that reached the cap
                            raise _HardCap()
                if out:
                    yield b"".join(out)
            if buf:
                yield buf
            done, outcome = True, "ok"
            charged, remaining = await self._settle_stream(call, meter, partial=False)
            tail = f": credits charged={_credits(charged)}"
            if remaining is not None:
                tail += f" remaining={from_units(remaining)}"
            yield (tail + f" request_id={call.request_id}\n\n").encode()
        except _HardCap:
            done, outcome = True, "credit_cap"
            resp.close()
            charged, remaining = await self._settle_stream(call, meter, partial=True)
            yield f": stopped at the credit cap; credits charged={_credits(charged)}\n\n".encode()
        except (TimeoutError, aiohttp.ClientError) as exc:
            # The upstream broke off mid-stream: pay for what was produced, tell the client.
            done, outcome = True, "broken"
            resp.close()
            charged, _ = await self._settle_stream(call, meter, partial=True)
            why = (
                "upstream stream timed out (its timeout_seconds)"
                if isinstance(exc, asyncio.TimeoutError)
                else "upstream stream broke off"
            )
            yield f": {why}; credits charged={_credits(charged)}\n\n".encode()
        finally:
            resp.release()
            self._upstream_done(call, sent, outcome)
            if not done:
                # The client went away (or we were cancelled): close the upstream and settle
                # what was produced, in a task of its own so the cancellation cannot stop it.
                resp.close()
                self.settler.spawn(self._settle_counted(call, meter, partial=True))

    async def _settle_counted(
        self, call: Call, meter: StreamMeter, *, partial: bool
    ) -> tuple[int | None, int | None]:
        usage = await stream_usage(self.tokens, call, meter, self.config.chars_per_token)
        return await self._settle(call, usage, partial=partial)

    def _settle_stream(
        self, call: Call, meter: StreamMeter, *, partial: bool
    ) -> Awaitable[tuple[int | None, int | None]]:
        """Settles a stream in a task of its own, awaited through a shield: a client that
        goes away as the stream ends (SDKs close on [DONE]) cancels the response, which must
        not cancel the settle half way."""
        return asyncio.shield(self.settler.spawn(self._settle_counted(call, meter, partial=partial)))

    # -- settling ----------------------------------------------------------------------

    async def _settle(self, call: Call, usage: Usage, *, partial: bool) -> tuple[int | None, int | None]:
        """(charged, remaining) in micro-credits; charged is None when Redis could not
        confirm the settle (it is logged; the hold then expires uncharged)."""
        cost = call.price.cost(usage)
        if cost > MAX_UNITS:
            # Beyond what one operation may carry (a billion credits): absurd usage is still
            # charged, as much of it as an operation can hold, and never dropped.
            log.error(
                "usage of %s for %s costs %d micro-credits, above the per-operation limit; charging %d",
                call.request_id,
                call.user,
                cost,
                MAX_UNITS,
            )
            cost = MAX_UNITS
        meta = {
            **call.meta,
            "usage": {"input": usage.input, "output": usage.output, "cached_input": usage.cached_input},
            "partial": partial,
        }
        tokens = usage.input + usage.cache_write + usage.output
        # The cost is posted to the call's holds in order, each up to its amount; the last
        # takes the rest (above all of them: the overage policy).
        holds = [(call.request_id, call.hold_units, call.hold_expires_ms), *call.extensions]
        charged = 0
        remaining: int | None = None
        for i, (hold_id, units, expires_ms) in enumerate(holds):
            part = cost if i == len(holds) - 1 else min(cost, units)
            cost -= part
            try:
                r = await self.settler.settle(
                    call.user,
                    hold_id,
                    part,
                    expires_at_ms=expires_ms,
                    metadata=meta if i == 0 else {**call.meta, "extends": call.request_id},
                    tokens=tokens if i == 0 else None,
                )
            except CreditError as exc:
                log.error("settle of %s for %s failed: %s %s", hold_id, call.user, exc.code, exc.details)
                continue
            if r is None:  # not confirmed: retried in the background until shortly before the hold expires
                return None, None
            charged += r.charged_units
            remaining = r.state.available_units
            if r.charged_units > units:  # usage beyond the estimate (the overage policy)
                self.metrics.charged_over_hold.inc(r.charged_units - units)
        return charged, remaining

    async def _extend(self, call: Call, meter: StreamMeter) -> bool:
        """A stream whose cost passed what its call holds: holds more of the user's free
        credit (a hold of its own, `<request id>.x<n>`, settled with the call), at least as
        much as the call held at first. Holding it, not merely counting what is free, keeps
        concurrent streams from spending the same credit. False: nothing more can be held
        (the stream is cut there)."""
        if len(call.extensions) >= MAX_EXTENSIONS:
            return False
        need = call.price.cost(usage_so_far(call, meter, self.config.chars_per_token)) - call.budget_units
        units = max(call.hold_units, need, 1)
        hold_id = f"{call.request_id}.x{len(call.extensions) + 1}"
        ttl = max(call.hold_expires_ms - self.engine.now_ms(), 1000) / 1000
        meta = {**call.meta, "extends": call.request_id}
        for _ in range(2):
            try:
                hold = await self.engine.reserve_units(
                    call.user, units, hold_id=hold_id, ttl_seconds=ttl, metadata=meta
                )
            except InsufficientCredits as exc:
                units = to_units(exc.details.get("available", 0), allow_zero=True)
                if units < need or units <= 0:
                    return False
                continue  # what is free, if it covers what was passed
            except (CreditError, RedisError) as exc:
                log.warning("extending the hold of %s for %s failed: %r", call.request_id, call.user, exc)
                return False
            call.extensions.append((hold_id, units, hold.expires_at_ms))
            call.budget_units += units
            return True
        return False

    async def _release(self, call: Call, reason: str, *, void_if_unknown: bool = False) -> None:
        until = call.hold_expires_ms or self._hold_end(call.upstream)
        await self._give_back(
            call.user, call.request_id, {**call.meta, "reason": reason}, until, void_if_unknown
        )

    def _hold_end(self, upstream: Upstream) -> int:
        """The latest a hold placed now for `upstream` can expire (ms)."""
        return self.engine.now_ms() + round(
            (upstream.timeout_seconds + self.config.hold_margin_seconds) * 1000
        )

    async def _give_back(
        self, user: str, hold_id: str, meta: dict[str, Any], until_ms: int, void_if_unknown: bool = False
    ) -> None:
        """Releases a hold; a refusal is logged, and a release Redis does not confirm is
        tried again in the background until the hold would have expired by itself."""
        try:
            await self.settler.release(
                user, hold_id, metadata=meta, void_if_unknown=void_if_unknown, until_ms=until_ms
            )
        except HoldNotFound:
            if not void_if_unknown:
                log.error("release of %s for %s: no such hold", hold_id, user)
        except CreditError as exc:
            log.error("release of %s for %s failed: %s", hold_id, user, exc.code)

    # A deadline, not a timeout on the call: what is left past it is given up and logged.
    async def drain(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Waits for settlements still running (at shutdown), at most `timeout` seconds: what
        is left then is given up and logged with its amount."""
        left = await self.settler.drain(timeout)
        if left:
            log.error("%d settlements still unconfirmed at shutdown were given up (logged above)", left)

    def not_served(self, request: Request) -> Response:
        """Any other /v1/ path or method: refused in the upstream's error format."""
        return not_served(request, self.config)

    # -- other configured paths: the same hold at a flat price ----------------------------

    async def _flat(self, request: Request, user: str, kind: Adapter, request_id: str) -> Response:
        rid = {"X-Request-Id": request_id}
        admitted = await admit_flat(request, kind, self.config, rid)
        if isinstance(admitted, Response):
            return admitted
        route, upstream, raw = admitted.route, admitted.upstream, admitted.raw
        meta = {"request_id": request_id, "path": route.path, "upstream": upstream.name}
        expires_ms = 0
        if route.price_units:
            # The same hold as a metered call's, at the route's price and with no tokens.
            ttl = upstream.timeout_seconds + self.config.hold_margin_seconds
            limits = self.config.rate_limits
            try:
                hold = await self.engine.reserve_units(
                    user,
                    route.price_units,
                    hold_id=request_id,
                    ttl_seconds=ttl,
                    metadata=meta,
                    rate=RateCharge(0, limits.requests_per_minute, limits.tokens_per_minute),
                )
                expires_ms = hold.expires_at_ms
            except (InsufficientCredits, AccountInDebt, RateLimited, StateLost, BacklogFull) as exc:
                return reserve_refusal(kind, exc, rid)
            except RedisError as exc:
                return self._reserve_unconfirmed(kind, user, request_id, meta, exc, ttl)
        headers = upstream_headers(request, upstream)
        if raw and request.headers.get("content-type"):
            headers["content-type"] = request.headers["content-type"]
        timeout = self._timeout(upstream)
        uncharged = {**rid, "X-Credits-Charged": "0"}
        try:
            async with self.session.request(
                request.method,
                upstream.base_url + route.path,
                data=raw or None,
                headers=headers,
                params=request.query_params,
                allow_redirects=False,
                timeout=timeout,
            ) as resp:
                body = await resp.read()
                status, passed = resp.status, passed_headers(resp)
        except (TimeoutError, aiohttp.ClientError):
            if route.price_units:
                await self._give_back(user, request_id, meta, expires_ms)
            return proxy_error(
                kind, 502, "upstream_unreachable", "the upstream could not be reached", uncharged
            )
        if not route.price_units:
            return Response(body, status_code=status, headers={**passed, **uncharged})
        if status >= 300:
            await self._give_back(
                user, request_id, {**meta, "reason": f"upstream_status_{status}"}, expires_ms
            )
            return Response(body, status_code=status, headers={**passed, **uncharged})
        try:
            r = await self.settler.settle(
                user, request_id, route.price_units, expires_at_ms=expires_ms, metadata=meta
            )
        except CreditError as exc:
            log.error("settle of %s for %s failed: %s %s", request_id, user, exc.code, exc.details)
            return Response(body, status_code=status, headers={**passed, **uncharged})
        headers = {**passed, **rid}
        if r is not None:  # unconfirmed: no figure rather than a wrong one
            headers["X-Credits-Charged"] = str(from_units(r.charged_units))
            headers["X-Credits-Remaining"] = str(from_units(r.state.available_units))
        return Response(body, status_code=status, headers=headers)


def _credits(units: int | None) -> str:
    return "unconfirmed" if units is None else str(from_units(units))


class _HardCap(Exception):
    pass
