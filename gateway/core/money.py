"""Credits at the edge (Decimal, up to 6 places) and micro-credits inside (int).

1 credit = 1,000,000 units. Floats never enter: a float amount is refused.

What counts as an amount: an int, a Decimal, or a string of plain ASCII decimal notation
(`AMOUNT_TEXT`: an optional minus, digits, an optional fraction, an optional exponent of
at most 9 digits). Python's Decimal() would also read "1_000", " 1 ", "+1" and digits of
other scripts (U+0661, Arabic-Indic one): those are refused before Decimal sees them.
Magnitudes are checked before any arithmetic, so no amount can raise decimal.Overflow.
"""

from __future__ import annotations

import re
from decimal import Context, Decimal, Inexact, InvalidOperation

UNITS_PER_CREDIT = 1_000_000
SCALE = Decimal(UNITS_PER_CREDIT)
# Lua does arithmetic in doubles: one amount stays far below 2^53 so totals do too.
MAX_UNITS = 10**15  # 1,000,000,000 credits in one operation

AMOUNT_TEXT = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]{1,9})?", re.ASCII)
# Enough digits for any amount in range; a digit that would be rounded away is not a
# whole micro-credit (Inexact), however many trailing zeros come first.
_EXACT = Context(prec=40, traps=[InvalidOperation, Inexact])


class AmountError(ValueError):
    """An amount that is not a valid number of credits."""


def parse_amount(value: Decimal | str | int) -> Decimal:
    """An amount as a Decimal, refusing floats, booleans and anything but plain notation."""
    if isinstance(value, (bool, float)):
        # JSON numbers reach this as Decimal; a Python float is inexact, a boolean no number.
        raise AmountError(
            f"an amount is a decimal string, an integer or a Decimal, not a {type(value).__name__}"
        )
    if isinstance(value, Decimal):
        d = value
    elif isinstance(value, int):
        d = Decimal(value)
    elif isinstance(value, str):
        if not AMOUNT_TEXT.fullmatch(value):
            raise AmountError(f'not a plain decimal number: {value[:40]!r} (write it like "1.25")')
        try:
            d = Decimal(value)
        except InvalidOperation as exc:  # pragma: no cover - the pattern admits only valid text
            raise AmountError(f"not a number: {value[:40]!r}") from exc
    else:
        raise AmountError(f"amounts must be decimal strings or integers, not {type(value).__name__}")
    if not d.is_finite():
        raise AmountError("amount must be a finite number")
    return d


def to_units(value: Decimal | str | int, *, allow_zero: bool = False) -> int:
    """Credits (Decimal, str or int) -> micro-credits. Refuses floats, >6 decimals, <= 0."""
    d = parse_amount(value)
    if d.is_zero():
        if not allow_zero:
            raise AmountError("amount must be positive")
        return 0
    if d.is_signed():
        raise AmountError("amount must be positive" if not allow_zero else "amount must not be negative")
    limit = f"amount above the limit of {MAX_UNITS // UNITS_PER_CREDIT} credits"
    if d.adjusted() > 15:  # 10^16 credits or more: refused before any arithmetic
        raise AmountError(limit)
    try:
        units = _EXACT.multiply(d, SCALE)
        if units != _EXACT.to_integral_value(units):
            raise Inexact
    except (Inexact, InvalidOperation):
        raise AmountError("at most 6 decimal places") from None
    n = int(units)
    if n > MAX_UNITS:
        raise AmountError(limit)
    return n


def from_units(units: int | str) -> Decimal:
    """Micro-credits -> credits, exact (6 decimal places)."""
    return Decimal(int(units)).scaleb(-6)


def credits_text(units: int) -> str:
    """Micro-credits as plain text without trailing zeros ("1809.095"), for messages and
    the payment and promo views."""
    return format(from_units(units).normalize(), "f")
