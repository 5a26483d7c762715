"""The store's record of pulses: encodings joined end to end."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingestor.model import Pulse, decode_encoded, encode_pulses, join_encoded
from ingestor.money import MAX_AMOUNT, SCALE
from ingestor.shard import Ingest, Reply

# Amounts up to the largest one accepted: past 2**64 - 1 nanos, MessagePack
# cannot hold them, and the pulses are encoded as JSON.
PULSE = st.builds(
    Pulse,
    tenant_id=st.text(max_size=4),
    product_sku=st.text(max_size=4),
    use_unit=st.sampled_from(["u", "[", "]", ","]),
    nanos=st.one_of(
        st.integers(min_value=0, max_value=2**64 - 1),
        st.integers(min_value=0, max_value=int(MAX_AMOUNT) * SCALE - 1),
    ),
    pulse_id=st.text(max_size=4),
    client_id=st.booleans(),
    ts=st.integers(min_value=0, max_value=2**62),
    day=st.just("2026-11-28"),
    fingerprint=st.binary(max_size=16),
)
DAY = "2026-11-28"


@given(st.lists(st.lists(PULSE, max_size=3), min_size=1, max_size=4))
def test_joined_encodings_are_the_encoding_of_the_lists_end_to_end(
    lists: list[list[Pulse]],
) -> None:
    joined = join_encoded([encode_pulses(pulses) for pulses in lists])
    everything = [p for pulses in lists for p in pulses]
    assert decode_encoded(joined) == everything
    if all(p.nanos < 2**64 for p in everything):
        assert joined == encode_pulses(everything)
        assert msgspec.msgpack.decode(joined, type=list[Pulse]) == everything
    else:
        assert joined == msgspec.json.encode(everything)


@pytest.mark.parametrize(
    "sizes", [(15, 0), (15, 1), (7, 9), (65_535, 0), (65_535, 1), (40_000, 30_000), (70_000, 3)]
)
def test_joined_lengths_cross_every_header_size(sizes: tuple[int, ...]) -> None:
    """A MessagePack array's header has 1, 3 or 5 bytes by its length."""
    lists = [
        [Pulse("t", "s", "u", n, "", False, n, DAY, b"") for n in range(size)] for size in sizes
    ]
    joined = join_encoded([encode_pulses(pulses) for pulses in lists])
    everything = [p for pulses in lists for p in pulses]
    assert joined == encode_pulses(everything)
    assert decode_encoded(memoryview(joined)) == everything


def test_a_part_that_is_no_encoding_is_refused() -> None:
    with pytest.raises(ValueError, match="not a MessagePack array"):
        join_encoded([encode_pulses([]), b"\xc0"])


@given(st.lists(PULSE, max_size=3))
def test_an_ingest_message_carries_its_pulses_encoding(pulses: list[Pulse]) -> None:
    message = Ingest({3: pulses, 5: pulses[:1]}, Reply())
    assert decode_encoded(message.encoded[3]) == pulses
    assert decode_encoded(message.encoded[5]) == pulses[:1]
