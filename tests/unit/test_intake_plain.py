"""The plain fast path (no patterns, raw amounts) decides exactly as the strict PulseIn does."""

from __future__ import annotations

import json
from unittest.mock import patch

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestor import intake as intake_module
from ingestor.errors import RequestError
from ingestor.intake import Rules, decode_pulses
from ingestor.model import PulseIn

NOW = 1_795_000_000_000_000
RULES = Rules(late_window_s=35 * 86400, future_skew_s=300, max_batch=10_000)
CONTROLS = st.sampled_from(["\x00", "\n", "\t", "\x1f", "\x7f", "\x80", "\x85", "\x9f"])
TEXT = st.one_of(
    st.text(min_size=0, max_size=8),
    st.builds(lambda a, c, b: a + c + b, st.text(max_size=3), CONTROLS, st.text(max_size=3)),
)
PULSE = st.fixed_dictionaries(
    {"tenant_id": TEXT, "product_sku": TEXT, "use_unit": TEXT, "used_amount": st.just("1")},
    optional={"id": TEXT},
)


def strict_verdicts(pulses: list[dict[str, str]]) -> list[bool]:
    verdicts = []
    for p in pulses:
        try:
            msgspec.json.decode(json.dumps(p).encode(), type=PulseIn)
        except msgspec.ValidationError:
            verdicts.append(False)
        else:
            verdicts.append(True)
    return verdicts


@settings(max_examples=300)
@given(pulses=st.lists(PULSE, min_size=1, max_size=5), ascii_only=st.booleans())
def test_fast_path_agrees_with_the_strict_schema(
    pulses: list[dict[str, str]], ascii_only: bool
) -> None:
    body = json.dumps(pulses, ensure_ascii=ascii_only).encode()
    intake = decode_pulses(body, "application/json", RULES, NOW)
    accepted = {index for index, _ in intake.pulses}
    assert [i in accepted for i in range(len(pulses))] == strict_verdicts(pulses)


@settings(max_examples=200)
@given(pulses=st.lists(PULSE, min_size=1, max_size=5), ascii_only=st.booleans())
def test_fast_path_agrees_for_ndjson(pulses: list[dict[str, str]], ascii_only: bool) -> None:
    body = "\n".join(json.dumps(p, ensure_ascii=ascii_only) for p in pulses).encode()
    intake = decode_pulses(body, "application/x-ndjson", RULES, NOW)
    accepted = {index for index, _ in intake.pulses}
    assert [i in accepted for i in range(len(pulses))] == strict_verdicts(pulses)


# Amounts as JSON text: every form the wire may carry and a good many it may not.
AMOUNT_STRINGS = st.one_of(
    st.sampled_from(
        [
            "1",
            "1.5",
            " 1",
            "1 ",
            "1_000",
            "\u0661\u0662",
            "1e3",
            "1E-9",
            "NaN",
            "-NaN",
            "sNaN",
            "Infinity",
            "-Infinity",
            "-0",
            "+1",
            "-1",
            "0.0000000001",
            "",
            "1.2.3",
            "99999999999999999999",
            "999999999999999999.999999999",
            "0x10",
            "1,5",
        ]
    ),
    st.text(alphabet="0123456789.eE+-_ ", max_size=12),
    st.text(max_size=6),
).map(json.dumps)
AMOUNT_NUMBERS = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**20).map(str),
    st.decimals(allow_nan=False, allow_infinity=False, places=None).map(str),
    st.sampled_from(["1.0", "-0.0", "1e3", "1E+3", "12.5E-1", "0.0000000001", "1e400"]),
    st.sampled_from(
        ["0", "-0", "-1", "999999999999999999", "1000000000000000000", "18446744073709551616"]
    ),
)
AMOUNT = st.one_of(
    AMOUNT_STRINGS, AMOUNT_NUMBERS, st.sampled_from(["true", "null", "[1]", '{"v":1}'])
)
OTHER = st.fixed_dictionaries(
    {"tenant_id": st.sampled_from(["t1", "t2", "t3", "", "x" * 129]), "product_sku": st.just("s")},
    optional={
        "id": st.sampled_from(["a", "b", ""]),
        "timestamp": st.sampled_from(["2026-11-10T10:00:00Z", "2026-11-20T10:00:00Z", 5]),
    },
)


def pulse_text(other: dict[str, object], amount: str) -> str:
    fields = [f"{json.dumps(k)}:{json.dumps(v)}" for k, v in other.items()]
    fields.insert(2, f'"use_unit":"u","used_amount":{amount}')
    return "{" + ",".join(fields) + "}"


def verdicts(body: bytes, content_type: str) -> list[tuple[object, ...]]:
    intake = decode_pulses(body, content_type, RULES, NOW)
    found: list[tuple[object, ...]] = [
        (i, p.nanos, p.day, p.ts, p.fingerprint) for i, p in intake.pulses
    ]
    found += [(item.index, item.status, item.id, item.error) for item in intake.items]
    return sorted(found, key=lambda v: v[0])


@settings(max_examples=400)
@given(
    pulses=st.lists(st.tuples(OTHER, AMOUNT), min_size=1, max_size=4),
    shape=st.sampled_from(["array", "ndjson", "single"]),
    cut=st.booleans(),
)
def test_amounts_decide_as_the_strict_schema_decides(
    pulses: list[tuple[dict[str, object], str]], shape: str, cut: bool
) -> None:
    """The plain type reads amounts as ints and text; PulseIn's Decimal decides."""
    texts = [pulse_text(other, amount) for other, amount in pulses]
    if cut:  # broken JSON after the amount: which error comes first?
        texts[-1] = texts[-1][:-1]
    if shape == "single":
        body, content_type = texts[0].encode(), "application/json"
    elif shape == "array":
        body, content_type = ("[" + ",".join(texts) + "]").encode(), "application/json"
    else:
        body, content_type = "\n".join(texts).encode(), "application/x-ndjson"
    try:
        fast = verdicts(body, content_type)
    except RequestError as exc:
        fast = [("error", exc.status, exc.message)]
    with patch.object(intake_module, "_may_hide_controls", return_value=True):
        try:
            strict = verdicts(body, content_type)
        except RequestError as exc:
            strict = [("error", exc.status, exc.message)]
    assert fast == strict
