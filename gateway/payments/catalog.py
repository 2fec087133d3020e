"""What credit costs: currencies and their minor units, credits per unit of currency, packs,
and the smallest and largest payment accepted.

Money is Decimal at the edge and an integer of the currency's minor unit inside (paise,
cents; yen have none). An amount with more decimals than its currency has is refused,
never rounded: 19.999 INR is a mistake, not 20.00.

Configured by `CREDIT_PAYMENT_RATES="INR=1,USD=90"` (credits per one unit of the currency)
and/or a `[payments]` section in the gateway's config file:

    [payments]
    rates = { INR = "1", USD = "90" }
    min_amount = { INR = "10", USD = "1" }
    max_amount = { INR = "500000" }
    [payments.packs.starter]
    amount = "499"
    currency = "INR"
    credits = "550"        # optional: the rate's figure when left out

The variable's rates win over the file's, currency by currency.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from gateway.core.money import UNITS_PER_CREDIT, AmountError, parse_amount

# ISO 4217 minor-unit digits of the currencies both providers take; others are refused
# rather than guessed.
MINOR_DIGITS: dict[str, int] = {
    "INR": 2, "USD": 2, "EUR": 2, "GBP": 2, "AUD": 2, "CAD": 2, "SGD": 2, "AED": 2,
    "CHF": 2, "HKD": 2, "MYR": 2, "NZD": 2, "SEK": 2, "NOK": 2, "DKK": 2, "ZAR": 2,
    "BRL": 2, "MXN": 2, "THB": 2, "PHP": 2, "IDR": 2, "SAR": 2, "QAR": 2,
    "JPY": 0, "KRW": 0, "VND": 0, "CLP": 0,
}  # fmt: skip
MAX_MINOR = 10**12  # far above any single top-up; keeps products with rates exact and small


class CatalogError(ValueError):
    """A configuration or a request the catalog cannot price."""


def currency_code(value: Any) -> str:
    if not isinstance(value, str) or value.strip().upper() not in MINOR_DIGITS:
        raise CatalogError(f"unknown currency {str(value)[:12]!r}; known: {', '.join(sorted(MINOR_DIGITS))}")
    return value.strip().upper()


def to_minor(amount: Decimal | str | int, currency: str) -> int:
    """An amount of `currency` in its minor unit, exactly; refuses <= 0 and extra decimals."""
    try:
        d = parse_amount(amount)
    except AmountError as exc:
        raise CatalogError(str(exc)) from None
    digits = MINOR_DIGITS[currency]
    if d <= 0:
        raise CatalogError("the amount must be more than zero")
    if d.is_finite() and d.adjusted() > 15:  # scaleb would overflow Decimal's context first
        raise CatalogError("the amount is too large")
    minor = d.scaleb(digits)
    if minor != minor.to_integral_value():
        raise CatalogError(f"{currency} amounts have at most {digits} decimal places")
    if minor <= 0:
        raise CatalogError("the amount must be more than zero")
    if minor > MAX_MINOR:
        raise CatalogError("the amount is too large")
    return int(minor)


def from_minor(minor: int, currency: str) -> Decimal:
    return Decimal(minor).scaleb(-MINOR_DIGITS[currency])


@dataclass(frozen=True)
class Pack:
    name: str
    amount_minor: int
    currency: str
    credits: int  # micro-credits


@dataclass(frozen=True)
class Catalog:
    rates: dict[str, Decimal] = field(default_factory=dict)  # credits per unit of currency
    packs: dict[str, Pack] = field(default_factory=dict)
    min_minor: dict[str, int] = field(default_factory=dict)
    max_minor: dict[str, int] = field(default_factory=dict)

    def price(self, amount: Any, currency: Any) -> tuple[int, str, int]:
        """(amount in minor units, currency, micro-credits) for a top-up of `amount`."""
        cur = currency_code(currency)
        if cur not in self.rates:
            raise CatalogError(f"payments in {cur} are not offered (no rate configured)")
        minor = to_minor(amount, cur)
        low, high = self.min_minor.get(cur), self.max_minor.get(cur)
        if low is not None and minor < low:
            raise CatalogError(f"the smallest payment is {from_minor(low, cur)} {cur}")
        if high is not None and minor > high:
            raise CatalogError(f"the largest payment is {from_minor(high, cur)} {cur}")
        return minor, cur, self.credits_for(minor, cur)

    def credits_for(self, minor: int, currency: str) -> int:
        """Micro-credits bought by `minor` of `currency` at its rate, rounded down to a
        whole micro-credit (never more than paid for)."""
        units = from_minor(minor, currency) * self.rates[currency] * UNITS_PER_CREDIT
        return int(units.to_integral_value(rounding="ROUND_FLOOR"))

    def pack(self, name: Any) -> Pack:
        if not isinstance(name, str) or name not in self.packs:
            known = ", ".join(sorted(self.packs)) or "none configured"
            raise CatalogError(f"unknown pack {str(name)[:40]!r} (packs: {known})")
        return self.packs[name]


def parse_rates(text: str | None) -> dict[str, Decimal]:
    """`INR=1,USD=90` -> {"INR": Decimal("1"), "USD": Decimal("90")}."""
    rates: dict[str, Decimal] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        cur, sep, value = part.partition("=")
        if not sep:
            raise CatalogError(f"CREDIT_PAYMENT_RATES: {part.strip()[:30]!r} is not CURRENCY=credits")
        rates[currency_code(cur)] = _positive(value.strip(), f"the rate for {cur.strip().upper()}")
    return rates


def _positive(value: Any, what: str) -> Decimal:
    try:
        d = parse_amount(value)  # a TOML/YAML float is refused: write "19.99", not 19.99
    except AmountError as exc:
        raise CatalogError(f"{what}: {exc}") from None
    if d <= 0:
        raise CatalogError(f"{what} must be more than zero")
    return d


def _per_currency(section: dict[str, Any], key: str) -> dict[str, Decimal]:
    raw = section.get(key) or {}
    if not isinstance(raw, dict):
        raise CatalogError(f"[payments] {key} must be a table of CURRENCY = amount")
    return {currency_code(k): _positive(v, f"[payments] {key}.{k}") for k, v in raw.items()}


def build_catalog(section: dict[str, Any] | None, rates_env: str | None) -> Catalog:
    """The catalog from the config file's `[payments]` section and CREDIT_PAYMENT_RATES."""
    section = section or {}
    if not isinstance(section, dict):
        raise CatalogError("[payments] must be a table")
    unknown = set(section) - {"rates", "packs", "min_amount", "max_amount"}
    if unknown:
        raise CatalogError(f"[payments]: unknown keys {sorted(unknown)}")
    rates = {**_per_currency(section, "rates"), **parse_rates(rates_env)}
    mins = {c: to_minor(v, c) for c, v in _per_currency(section, "min_amount").items()}
    maxs = {c: to_minor(v, c) for c, v in _per_currency(section, "max_amount").items()}
    for c in mins.keys() & maxs.keys():
        if mins[c] > maxs[c]:
            raise CatalogError(f"[payments] min_amount.{c} is above max_amount.{c}")
    catalog = Catalog(rates=rates, min_minor=mins, max_minor=maxs)
    packs_raw = section.get("packs") or {}
    if not isinstance(packs_raw, dict):
        raise CatalogError("[payments.packs] must be a table of packs")
    packs = {}
    for name, p in packs_raw.items():
        where = f"[payments.packs.{name}]"
        if not isinstance(p, dict) or set(p) - {"amount", "currency", "credits"}:
            raise CatalogError(f"{where} takes amount, currency and credits")
        cur = currency_code(p.get("currency"))
        minor = to_minor(_positive(p.get("amount"), f"{where} amount"), cur)
        if "credits" in p:
            credits = _positive(p["credits"], f"{where} credits") * UNITS_PER_CREDIT
            if credits != credits.to_integral_value():
                raise CatalogError(f"{where} credits: at most 6 decimal places")
            units = int(credits)
        elif cur in rates:
            units = catalog.credits_for(minor, cur)
        else:
            raise CatalogError(f"{where}: no credits given and no rate for {cur}")
        packs[name] = Pack(name=name, amount_minor=minor, currency=cur, credits=units)
    return Catalog(rates=rates, packs=packs, min_minor=mins, max_minor=maxs)
