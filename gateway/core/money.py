"""Credits at the edge (Decimal, up to 6 places) and micro-credits inside (int).

1 credit = 1,000,000 units. Floats never enter: a float amount is refused.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

UNITS_PER_CREDIT = 1_000_000
SCALE = Decimal(UNITS_PER_CREDIT)
# Lua does arithmetic in doubles: one amount stays far below 2^53 so totals do too.
MAX_UNITS = 10**15  # 1,000,000,000 credits in one operation


class AmountError(ValueError):
    """An amount that is not a valid number of credits."""


def to_units(value: Decimal | str | int, *, allow_zero: bool = False) -> int:
    """Credits (Decimal, str or int) -> micro-credits. Refuses floats, >6 decimals, <= 0."""
    if isinstance(value, bool) or isinstance(value, float):
        raise AmountError("amounts must be decimal strings or integers, not floats")
    try:
        d = value if isinstance(value, Decimal) else Decimal(str(value).strip())
    except (InvalidOperation, ValueError) as exc:
        raise AmountError(f"not a number: {value!r}") from exc
    if not d.is_finite():
        raise AmountError("amount must be finite")
    units = d * SCALE
    if units != units.to_integral_value():
        raise AmountError("at most 6 decimal places")
    n = int(units)
    if n < 0 or (n == 0 and not allow_zero):
        raise AmountError("amount must be positive" if not allow_zero else "amount must not be negative")
    if n > MAX_UNITS:
        raise AmountError(f"amount above the limit of {MAX_UNITS // UNITS_PER_CREDIT} credits")
    return n


def from_units(units: int | str) -> Decimal:
    """Micro-credits -> credits, exact (6 decimal places)."""
    return Decimal(int(units)).scaleb(-6)
