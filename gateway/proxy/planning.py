"""Sizing a metered call's hold: its input estimate, its output cap, and its worst case.

The hold pays for the estimated input plus every output token the request may produce, and
the upstream is sent the cap that hold paid for. A cap too costly for one operation, for
the user's credit or for the tokens-per-minute limit is lowered (clamped) rather than the
request refused, down to the configured minimum per choice.
"""

from __future__ import annotations

from ..core.money import MAX_UNITS
from ..core.pricing import Usage, ceil_div
from .call import Call
from .request_check import Admitted

# The output cap of a request that names none, for a model whose price names none either.
DEFAULT_MAX_OUTPUT = 4096


def plan(request_id: str, user: str, path: str, req: Admitted, chars_per_token: int) -> Call:
    """The call for an admitted request, its output cap written into the body. Raises
    worst_case.BadRequest when a field the worst case depends on is malformed."""
    kind, body, price, upstream = req.kind, req.body, req.price, req.upstream
    output_plan = kind.output_plan(path, body, chars_per_token)
    est_input = max(ceil_div(req.size, chars_per_token), kind.exact_input_tokens(path, body))
    max_out = 0
    output = kind.generates_output(path)
    if output:
        max_out = (
            output_plan.requested
            if output_plan.requested is not None
            else (price.max_output_tokens or DEFAULT_MAX_OUTPUT)
        )
        # A cap whose worst case is beyond any one operation's amount is lowered to what
        # fits (then to what the user can afford): a clamp, not a refusal.
        max_out = min(max_out, output_plan.per_choice(price.output_tokens_affordable(MAX_UNITS, est_input)))
    call = Call(
        request_id, user, kind, path, req.model, price, upstream, body, est_input, output_plan, max_out
    )
    if output:
        kind.set_output_cap(path, body, max_out, upstream.chat_cap_field)
    call.stream = bool(body.get("stream"))
    if call.stream:
        # Usage asked for on the client's behalf is kept from a client that did not ask.
        call.strip_usage_chunk = kind.ask_stream_usage(path, body)
    call.meta = {"request_id": request_id, "model": req.model, "path": path, "upstream": upstream.name}
    return call


def worst_units(call: Call) -> int:
    """The hold: the estimated input plus every output token the request may produce."""
    return call.price.cost(Usage(input=call.est_input, output=call.plan.total(call.max_output)))


def worst_tokens(call: Call) -> int:
    """The tokens the call may use at most: what the tokens-per-minute limit is charged
    until the settle corrects it."""
    return call.est_input + call.plan.total(call.max_output)


def clamp(call: Call, total_tokens: int, why: str, clamped: set[str], min_output_tokens: int) -> bool:
    """Lowers the output cap so that all choices together fit `total_tokens` (an answer
    shorter rather than none), once per reason in `clamped`, and never below
    `min_output_tokens` per choice. False: not possible."""
    tokens = min(call.plan.per_choice(total_tokens), call.max_output)
    if why in clamped or not call.max_output or tokens < min_output_tokens:
        return False
    clamped.add(why)
    call.max_output = tokens
    call.kind.set_output_cap(call.path, call.body, tokens, call.upstream.chat_cap_field)
    return True
