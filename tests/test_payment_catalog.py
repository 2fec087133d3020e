"""What credit costs: currencies' minor units, rates, packs and limits, all exact."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gateway.core.money import credits_text
from gateway.payments.catalog import (
    CatalogError,
    build_catalog,
    from_minor,
    parse_rates,
    to_minor,
)


def test_amounts_become_exact_minor_units_and_extra_decimals_are_refused():
    assert to_minor("19.99", "INR") == 1999  # never int(19.99 * 100) == 1998
    assert to_minor("500", "USD") == 50_000
    assert to_minor(Decimal("0.01"), "INR") == 1
    assert to_minor("1500", "JPY") == 1500
    assert to_minor("1.5e2", "INR") == 15_000
    for bad, cur in [("19.999", "INR"), ("1.5", "JPY"), ("0", "INR"), ("-5", "USD"), ("1e13", "INR")]:
        with pytest.raises(CatalogError):
            to_minor(bad, cur)
    with pytest.raises(CatalogError, match="not a float"):
        to_minor(19.99, "INR")  # type: ignore[arg-type]
    assert from_minor(1999, "INR") == Decimal("19.99") and from_minor(7, "JPY") == Decimal(7)


def test_rates_from_the_variable_win_over_the_file_currency_by_currency():
    assert parse_rates("INR=1, usd=90") == {"INR": Decimal(1), "USD": Decimal(90)}
    cat = build_catalog({"rates": {"INR": "2", "EUR": "95"}}, "INR=1,USD=90")
    assert cat.rates == {"INR": Decimal(1), "EUR": Decimal(95), "USD": Decimal(90)}
    for bad in ("INR", "INR=0", "XXX=1", "INR=abc", "INR=-1"):
        with pytest.raises(CatalogError):
            parse_rates(bad)


def test_a_price_is_credits_for_the_amount_rounded_down_to_a_micro_credit():
    cat = build_catalog({"rates": {"INR": "1", "USD": "90.5"}}, None)
    assert cat.price("500", "inr") == (50_000, "INR", 500_000_000)
    assert cat.price("19.99", "USD") == (1999, "USD", 1_809_095_000)
    third = build_catalog({"rates": {"INR": "0.333333333"}}, None)
    assert third.price("1", "INR")[2] == 333_333  # 333,333.333 micro-credits: down, not up
    with pytest.raises(CatalogError, match="not offered"):
        cat.price("5", "EUR")
    with pytest.raises(CatalogError, match="unknown currency"):
        cat.price("5", "BTC")


def test_minimum_and_maximum_per_currency():
    cat = build_catalog(
        {"rates": {"INR": "1"}, "min_amount": {"INR": "10"}, "max_amount": {"INR": "1000"}}, None
    )
    with pytest.raises(CatalogError, match=r"smallest payment is 10\.00 INR"):
        cat.price("9.99", "INR")
    with pytest.raises(CatalogError, match=r"largest payment is 1000\.00 INR"):
        cat.price("1000.01", "INR")
    assert cat.price("10", "INR")[0] == 1000
    with pytest.raises(CatalogError, match="above"):
        build_catalog({"rates": {"INR": "1"}, "min_amount": {"INR": "10"}, "max_amount": {"INR": "5"}}, None)


def test_packs_have_their_own_credits_or_the_rate_s():
    cat = build_catalog(
        {
            "rates": {"INR": "1"},
            "packs": {
                "starter": {"amount": "499", "currency": "INR", "credits": "550"},
                "plain": {"amount": "100", "currency": "INR"},
            },
        },
        None,
    )
    assert (cat.pack("starter").amount_minor, cat.pack("starter").credits) == (49_900, 550_000_000)
    assert cat.pack("plain").credits == 100_000_000
    with pytest.raises(CatalogError, match="unknown pack"):
        cat.pack("gold")
    with pytest.raises(CatalogError, match="no rate"):
        build_catalog({"packs": {"x": {"amount": "5", "currency": "USD"}}}, None)
    with pytest.raises(CatalogError, match="takes amount"):
        build_catalog(
            {"rates": {"INR": "1"}, "packs": {"x": {"amount": "5", "currency": "INR", "bonus": 1}}}, None
        )
    with pytest.raises(CatalogError, match="unknown keys"):
        build_catalog({"rate": {"INR": "1"}}, None)
    with pytest.raises(CatalogError):
        build_catalog({"rates": {"INR": 1.5}}, None)  # a float in the file: write "1.5"


def test_credits_are_shown_plainly():
    assert credits_text(500_000_000) == "500"
    assert credits_text(1_809_095_000) == "1809.095"
    assert credits_text(1) == "0.000001"
