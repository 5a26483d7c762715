"""Exact amounts.

Inside the ingestor an amount is an `int` count of nano-units (10**-9), so sums
are exact and never overflow; at the edges it is a decimal string. The wire
accepts a JSON number or a decimal string with at most 9 fractional digits and
18 integer digits; floats never touch the money path.

A decimal string is the text of a JSON number ("12", "0.5", "1.5e3"), no
more: Python's Decimal also reads "١٢" (12), "1_000", " 1", "+1", ".5" and
"Infinity", which a client of a billing API does not mean to send, and
which a JSON number could not be.
"""

from __future__ import annotations

import decimal
import re
from decimal import Decimal

import msgspec

__all__ = [
    "DECIMAL_TEXT",
    "KNOWN_NANOS",
    "MAX_AMOUNT",
    "SCALE",
    "format_nanos",
    "parse_nanos",
    "to_nanos",
]

SCALE = 10**9
MAX_AMOUNT = Decimal(10**18)  # exclusive: at most 18 integer digits
_MAX_WHOLE = int(MAX_AMOUNT)
_DIGITS = 9
_EXACT = decimal.Context(prec=40, traps=[decimal.Inexact, decimal.InvalidOperation])
DECIMAL_TEXT = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")  # fullmatch


# Amounts already converted, by what the wire gave: a string's text, an int,
# the bytes of a Raw, the text of a Decimal. Pulses repeat a few. Not by the
# Decimal itself: hashing one costs ~330 ns (a modular power when it has
# fractional digits); its text costs ~30. Each key names one value, and
# equal values ("1", "1.0", 1) convert alike. Intake looks a str or an int
# up here itself, before calling `to_nanos`: the call was a tenth of its
# loop over a request's pulses.
KNOWN_NANOS: dict[str | int | bytes, int] = {}
_KNOWN_MAX = 4096
# Longer spellings are converted, not kept: "1." and a million zeros is a
# valid amount, and 4,096 of them would keep gigabytes.
_KEY_MAX = 64
_INVALID = "used_amount: Invalid decimal string"  # msgspec's words, for the same string
_NEGATIVE = "used_amount must be >= 0"
_TOO_BIG = "used_amount must have at most 18 integer digits"
_NOT_FINITE = "used_amount must be a finite number"
# What a Raw's first byte says it is, when it is neither a number nor a string.
_KIND = {
    ord("t"): "bool",
    ord("f"): "bool",
    ord("n"): "null",
    ord("["): "array",
    ord("{"): "object",
}


def to_nanos(amount: Decimal | int | str | msgspec.Raw) -> int:
    """Convert a wire amount to nano-units, or raise ValueError saying why not.

    A str is the text of a JSON string, a decimal string; an int, a JSON
    integer; a Raw, the amount as JSON wrote it, a number or a string.
    """
    key = (
        bytes(amount)
        if isinstance(amount, msgspec.Raw)
        else str(amount)
        if isinstance(amount, Decimal)
        else amount
    )
    try:
        return KNOWN_NANOS[key]
    except KeyError:
        pass
    if isinstance(amount, msgspec.Raw):
        nanos = _raw(bytes(amount))
    elif isinstance(amount, Decimal):
        nanos = _convert(amount)
    elif isinstance(amount, str):
        nanos = _convert(_decimal(amount))
    else:
        nanos = _whole(amount)
    if len(KNOWN_NANOS) < _KNOWN_MAX and (isinstance(key, int) or len(key) <= _KEY_MAX):
        KNOWN_NANOS[key] = nanos
    return nanos


def _raw(text: bytes) -> int:
    """A JSON value's text as an amount: msgspec has checked it is JSON."""
    first = text[0]
    if first == ord('"'):
        return to_nanos(msgspec.json.decode(text, type=str))
    kind = _KIND.get(first)
    if kind is not None:
        raise ValueError(f"used_amount: Expected `decimal`, got `{kind}`")
    number = text.decode()
    if len(number) <= 18 and number.isdigit():  # longer, int() would be slow or refuse it
        return _whole(int(number))
    return _convert(_number(number))


def _decimal(text: str) -> Decimal:
    if DECIMAL_TEXT.fullmatch(text) is None:
        try:
            value = Decimal(text)
        except decimal.InvalidOperation:
            raise ValueError(_INVALID) from None
        raise ValueError(_INVALID if value.is_finite() else _NOT_FINITE)
    return _number(text)


def _number(text: str) -> Decimal:
    """A JSON number's text as a Decimal: its exponent may be past Decimal's."""
    try:
        return Decimal(text)
    except decimal.InvalidOperation:
        raise ValueError("used_amount is out of range") from None


def _whole(amount: int) -> int:
    if amount < 0:
        raise ValueError(_NEGATIVE)
    if amount >= _MAX_WHOLE:
        raise ValueError(_TOO_BIG)
    return amount * SCALE


def _convert(amount: Decimal) -> int:
    if not amount.is_finite():
        raise ValueError(_NOT_FINITE)
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
