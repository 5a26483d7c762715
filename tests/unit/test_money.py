"""Exact amounts: the wire decimal, nano-units inside, and back."""

from __future__ import annotations

import decimal
import re
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestor import money
from ingestor.money import format_nanos, parse_nanos, to_nanos

NANO = Decimal("1e-9")
LIMIT = 10**18  # exclusive bound on the amount, in units
# Nano-unit counts of every valid amount: 0 .. 10**18 - 10**-9.
valid_nanos = st.integers(min_value=0, max_value=LIMIT * 10**9 - 1)


def exact(value: Decimal) -> Decimal:
    """`value` as nano-units, computed in a context far wider than any amount."""
    with decimal.localcontext() as ctx:
        ctx.prec = 200
        return value * 10**9


def amount(nanos: int) -> Decimal:
    return Decimal(nanos).scaleb(-9)


@given(st.decimals(min_value=0, max_value=Decimal(LIMIT) - NANO, places=9))
def test_to_nanos_matches_decimal_arithmetic(value: Decimal) -> None:
    expected = exact(value)
    assert expected == expected.to_integral_value()
    assert to_nanos(value) == int(expected)


@given(valid_nanos, st.integers(min_value=0, max_value=12))
def test_to_nanos_ignores_how_the_amount_is_written(nanos: int, extra_zeros: int) -> None:
    base = amount(nanos)
    spellings = {
        base,
        base.normalize(),
        base.quantize(Decimal(1).scaleb(-9 - extra_zeros), context=decimal.Context(prec=60)),
        Decimal(format(base, "E")),
    }
    for spelling in spellings:
        assert spelling == base
        assert to_nanos(spelling) == nanos


@given(valid_nanos)
def test_format_then_parse_round_trips(nanos: int) -> None:
    text = format_nanos(nanos)
    assert parse_nanos(text) == nanos
    assert Decimal(text) == amount(nanos)
    assert to_nanos(Decimal(text)) == nanos


@given(valid_nanos)
def test_format_is_the_shortest_plain_decimal(nanos: int) -> None:
    text = format_nanos(nanos)
    # Plain digits, no exponent, no trailing fractional zeros, no bare point.
    assert re.fullmatch(r"(0|[1-9][0-9]*)(\.[0-9]*[1-9])?", text), text


@given(st.decimals(min_value=0, max_value=Decimal(LIMIT) - NANO, places=9))
def test_wire_amount_round_trips_through_nanos(value: Decimal) -> None:
    text = format_nanos(to_nanos(value))
    assert Decimal(text) == value
    assert parse_nanos(text) == to_nanos(value)


@pytest.mark.parametrize(
    ("text", "units", "nanos_part"),
    [
        ("0", 0, 0),
        ("1.5000000000000", 1, 500_000_000),
        ("1.500000000", 1, 500_000_000),
        ("0.000000001", 0, 1),
        ("0E-20", 0, 0),
        ("1E+17", 10**17, 0),
        ("999999999999999999.999999999", LIMIT - 1, 999_999_999),
        ("12.340000000000000000000", 12, 340_000_000),
    ],
)
def test_accepted_amounts(text: str, units: int, nanos_part: int) -> None:
    assert to_nanos(Decimal(text)) == units * 10**9 + nanos_part


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("1.0000000001", "fractional"),
        ("0.0000000001", "fractional"),
        ("0.0000000005", "fractional"),
        ("999999999999999999.9999999991", "fractional"),
        ("1E-10", "fractional"),
        ("-1", ">= 0"),
        ("-0.000000001", ">= 0"),
        ("NaN", "finite"),
        ("-NaN", "finite"),
        ("sNaN", "finite"),
        ("Infinity", "finite"),
        ("-Infinity", "finite"),
        ("1000000000000000000", "18 integer digits"),
        ("1E+18", "18 integer digits"),
        ("1000000000000000000.000000001", "18 integer digits"),
        ("1E+400", "18 integer digits"),
    ],
)
def test_rejected_amounts_say_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        to_nanos(Decimal(text))


@given(
    st.decimals(min_value=0, max_value=Decimal(LIMIT) - NANO, places=9),
    st.integers(min_value=10, max_value=30),
)
def test_more_than_nine_fractional_digits_are_rejected(value: Decimal, places: int) -> None:
    # Add one unit in a place beyond the ninth: the amount is no longer a whole
    # number of nano-units, whatever else it is.
    with decimal.localcontext() as ctx:
        ctx.prec = 100
        finer = value + Decimal(1).scaleb(-places)
    assert finer < LIMIT
    with pytest.raises(ValueError, match="fractional"):
        to_nanos(finer)


def test_sums_are_exact_far_beyond_float_and_the_single_amount_limit() -> None:
    largest = Decimal(LIMIT) - NANO
    amounts = [largest, Decimal("0.000000001"), Decimal("123456789.987654321")] * 40_000
    total = sum(to_nanos(a) for a in amounts)
    with decimal.localcontext() as ctx:
        ctx.prec = 100
        expected = sum(amounts, Decimal(0))
    assert expected > Decimal(10) ** 22
    assert Decimal(format_nanos(total)) == expected
    assert parse_nanos(format_nanos(total)) == total
    # A float sum of the same amounts is visibly wrong: the exactness is real.
    assert Decimal(sum(float(a) for a in amounts)) != expected


@settings(max_examples=50)
@given(st.lists(valid_nanos, min_size=1, max_size=400))
def test_sums_of_many_amounts_match_high_precision_decimal(values: list[int]) -> None:
    # Every amount given three times over, so the totals pass 10**20 easily.
    texts = [format_nanos(n) for n in values] * 3
    total = sum(to_nanos(Decimal(t)) for t in texts)
    with decimal.localcontext() as ctx:
        ctx.prec = 100
        expected = sum((Decimal(t) for t in texts), Decimal(0))
    assert Decimal(format_nanos(total)) == expected
    assert parse_nanos(format_nanos(total)) == total


def test_sum_at_exactly_ten_to_the_twentieth() -> None:
    nanos = to_nanos(Decimal("999999999999999999.999999999")) * 100 + 100 * to_nanos(
        Decimal("0.000000001")
    )
    assert format_nanos(nanos) == str(10**20)
    assert parse_nanos(str(10**20)) == 10**29


@given(
    st.decimals(allow_nan=False, allow_infinity=False, places=None).filter(
        lambda d: abs(d) < Decimal(10**19)
    )
)
def test_remembered_amounts_convert_as_fresh_ones(amount: Decimal) -> None:
    """to_nanos remembers what it converted by value: equal decimals written apart
    ("1", "1.0", "1E0") must get the answer a fresh conversion gives, or the same error."""
    for written in (amount, amount.normalize(), Decimal(f"{amount:f}")):
        for _ in range(2):  # the second call may come from memory
            try:
                fresh: int | str = money._convert(written)
            except ValueError as exc:
                fresh = str(exc)
            try:
                got: int | str = to_nanos(written)
            except ValueError as exc:
                got = str(exc)
            assert got == fresh
