"""Exact amounts.

Inside the ingestor an amount is an `int` count of nano-units (10**-9), so sums
are exact and never overflow; at the edges it is a decimal string. The wire
accepts a JSON number or a decimal string with at most 9 fractional digits and
18 integer digits; floats never touch the money path.
"""

from __future__ import annotations

import decimal
from decimal import Decimal

__all__ = ["KNOWN_NANOS", "MAX_AMOUNT", "SCALE", "format_nanos", "parse_nanos", "to_nanos"]

SCALE = 10**9
MAX_AMOUNT = Decimal(10**18)  # exclusive: at most 18 integer digits
_MAX_WHOLE = int(MAX_AMOUNT)
_DIGITS = 9
_EXACT = decimal.Context(prec=40, traps=[decimal.Inexact, decimal.InvalidOperation])


# Amounts already converted, by what the wire gave: the text of a Decimal, a
# string's text, an int. Pulses repeat a few. Not by the Decimal itself:
# hashing one costs ~330 ns (a modular power when it has fractional digits),
# a third of a pulse's decode; its text costs ~30. Each key names one value
# (a string's is that of `Decimal(text)`, as the wire's Decimal is built),
# and equal values ("1", "1.0", 1) convert alike. Intake looks a str or an
# int up here itself, before calling `to_nanos`: the call was a tenth of its
# loop over a request's pulses.
KNOWN_NANOS: dict[str | int, int] = {}
_KNOWN_MAX = 4096
_INVALID = "used_amount: Invalid decimal string"  # msgspec's words, for the same string
_NEGATIVE = "used_amount must be >= 0"
_TOO_BIG = "used_amount must have at most 18 integer digits"


def to_nanos(amount: Decimal | int | str) -> int:
    """Convert a wire amount to nano-units, or raise ValueError saying why not.

    A str is the text of a JSON string, read as msgspec reads a Decimal field
    (`Decimal(text)`); an int, a JSON integer.
    """
    key = str(amount) if isinstance(amount, Decimal) else amount
    try:
        return KNOWN_NANOS[key]
    except KeyError:
        pass
    if isinstance(amount, int):
        nanos = _whole(amount)
    else:
        if isinstance(amount, str):
            try:
                amount = Decimal(amount)
            except decimal.InvalidOperation:
                raise ValueError(_INVALID) from None
        nanos = _convert(amount)
    if len(KNOWN_NANOS) < _KNOWN_MAX:
        KNOWN_NANOS[key] = nanos
    return nanos


def _whole(amount: int) -> int:
    if amount < 0:
        raise ValueError(_NEGATIVE)
    if amount >= _MAX_WHOLE:
        raise ValueError(_TOO_BIG)
    return amount * SCALE


def _convert(amount: Decimal) -> int:
    if not amount.is_finite():
        raise ValueError("used_amount must be a finite number")
    if amount < 0:
        raise ValueError(_NEGATIVE)
    if amount >= MAX_AMOUNT:
        raise ValueError(_TOO_BIG)
    try:
        # Exact or it raises: a valid amount has at most 27 significant digits,
        # and the bounded precision keeps a 10,000-digit amount cheap to refuse.
        scaled = amount.scaleb(_DIGITS, _EXACT)
    except decimal.Inexact:
        raise ValueError("used_amount must have at most 9 fractional digits") from None
    if scaled != scaled.to_integral_value():
        raise ValueError("used_amount must have at most 9 fractional digits")
    return int(scaled)


def format_nanos(nanos: int) -> str:
    """Render nano-units as the shortest exact decimal string ("1.5", "100")."""
    whole, frac = divmod(nanos, SCALE)
    if not frac:
        return str(whole)
    return f"{whole}.{frac:09d}".rstrip("0")


def parse_nanos(text: str) -> int:
    """Read a decimal string written by `format_nanos` back into nano-units."""
    whole, _, frac = text.partition(".")
    return int(whole) * SCALE + int(frac.ljust(_DIGITS, "0") or "0")
