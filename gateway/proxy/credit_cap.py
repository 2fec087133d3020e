"""The hard cap of a stream: has the cost of what it streamed passed what its call holds?"""

from __future__ import annotations

from ..core.pricing import Usage
from .call import Call
from .stream_meter import StreamMeter


def usage_so_far(call: Call, meter: StreamMeter, chars_per_token: int) -> Usage:
    """The usage of a stream so far, cheaply and on the high side: what the upstream
    reported, with the output bounded from the streamed text until its final usage arrives
    (ASCII at chars_per_token, other text at a token per byte)."""
    u = meter.usage
    bound = meter.bound_tokens(chars_per_token)
    if u is None:
        return Usage(input=call.est_input, output=bound)
    if not meter.final:
        # Usage known so far (Anthropic's message_start): output from what was streamed.
        return Usage(
            input=u.input, output=max(u.output, bound), cached_input=u.cached_input, cache_write=u.cache_write
        )
    return u


class CreditCap:
    """The hard cap of one stream: has the cost of what it streamed passed what the call
    holds (its hold and any extensions)? Checked after every event, so cheaply: with the
    usage known so far, the streamed text may grow to `units` (ASCII characters, plus
    chars_per_token for each byte of other text) before the cost can pass the budget, and
    the cost is computed only past that or when new usage arrives."""

    __slots__ = ("call", "cpt", "units", "usage")

    def __init__(self, call: Call, meter: StreamMeter, chars_per_token: int) -> None:
        self.call, self.cpt = call, chars_per_token
        self._bound(meter)

    def passed(self, meter: StreamMeter) -> bool:
        if meter.ascii_chars + meter.other_bytes * self.cpt <= self.units and meter.usage is self.usage:
            return False
        if meter.final:
            # The upstream's own total has arrived: generation is over, so there is nothing
            # left to stop and the settle charges it (overage past the hold as debt).
            self._bound(meter)
            return False
        if self.call.price.cost(usage_so_far(self.call, meter, self.cpt)) > self.call.budget_units:
            return True
        self._bound(meter)
        return False

    def _bound(self, meter: StreamMeter) -> None:
        u = self.usage = meter.usage
        if u is not None and meter.final:  # the upstream's own total: the text no longer counts
            self.units = 1 << 62
            return
        known = Usage(input=self.call.est_input) if u is None else u
        self.units = self.call.price.output_tokens_within(self.call.budget_units, known) * self.cpt
