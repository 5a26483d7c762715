"""The pattern-free fast path decides exactly as the strict PulseIn does."""

from __future__ import annotations

import json

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

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
