"""The store's record of pulses: encodings joined end to end."""

from __future__ import annotations

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from ingestor.model import Pulse, encode_pulses, join_encoded
from ingestor.shard import Ingest, Reply

PULSE = st.builds(
    Pulse,
    tenant_id=st.text(max_size=4),
    product_sku=st.text(max_size=4),
    use_unit=st.sampled_from(["u", "[", "]", ","]),
    nanos=st.integers(min_value=0, max_value=10**27),
    pulse_id=st.text(max_size=4),
    client_id=st.booleans(),
    ts=st.integers(min_value=0, max_value=2**62),
    day=st.just("2026-11-28"),
    fingerprint=st.binary(max_size=16),
)


@given(st.lists(st.lists(PULSE, max_size=3), min_size=1, max_size=4))
def test_joined_encodings_are_the_encoding_of_the_lists_end_to_end(
    lists: list[list[Pulse]],
) -> None:
    joined = join_encoded([encode_pulses(pulses) for pulses in lists])
    everything = [p for pulses in lists for p in pulses]
    assert joined == encode_pulses(everything)
    assert msgspec.json.decode(joined, type=list[Pulse]) == everything


@given(st.lists(PULSE, max_size=3))
def test_an_ingest_message_carries_its_pulses_encoding(pulses: list[Pulse]) -> None:
    message = Ingest({3: pulses, 5: pulses[:1]}, Reply())
    assert msgspec.json.decode(message.encoded[3], type=list[Pulse]) == pulses
    assert msgspec.json.decode(message.encoded[5], type=list[Pulse]) == pulses[:1]
