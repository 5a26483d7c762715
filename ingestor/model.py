"""The ingestor's values: what the wire carries and what the store keeps.

Types are the schema. The same Structs decode requests, encode answers and
produce /openapi.json. Amounts are decimal strings on the wire and `int`
nano-units inside (see `money`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from typing import Annotated, Literal

import msgspec

from .money import DECIMAL_TEXT

__all__ = [
    "Aggregate",
    "AggregatePage",
    "Batch",
    "BatchPage",
    "BatchRecord",
    "BatchSummary",
    "BatchView",
    "CommitRequest",
    "CommitResult",
    "ErrorBody",
    "ErrorDetail",
    "IngestItem",
    "IngestReport",
    "Outcome",
    "Pulse",
    "PulseIn",
    "PulseInPlain",
    "PulseInText",
    "PulsePage",
    "StoredPulse",
    "assigned_id",
    "decode_encoded",
    "encode_pulses",
    "join_encoded",
    "payload_digest",
    "same_payload",
]

# No control characters (C0, DEL, C1). \A and \Z, because `$` would let a
# trailing newline through.
_PRINTABLE = r"\A[^\x00-\x1f\x7f-\x9f]+\Z"

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=_PRINTABLE)]
Unit = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=_PRINTABLE)]
Timestamp = Annotated[dt.datetime, msgspec.Meta(tz=True)]
DecimalString = Annotated[str, msgspec.Meta(pattern=r"\A[0-9]+(\.[0-9]+)?\Z")]
# A pulse's amount as JSON wrote it, the text of a number or a string, for
# `money.to_nanos` to read. Decoded as a Decimal, a string was read as Python
# reads one ("١٢", "1_000" and " 1" were amounts), and of a key written twice
# the first value could refuse a pulse that `PulseInText`, keeping the last
# as msgspec does, took.
Amount = Annotated[
    msgspec.Raw,
    msgspec.Meta(
        description=(
            "A JSON number, or its text as a string: >= 0, at most 18 integer"
            " and 9 fractional digits."
        ),
        extra_json_schema={
            "anyOf": [
                {"type": "number", "minimum": 0},
                {
                    "type": "string",
                    "format": "decimal",
                    "pattern": "^" + DECIMAL_TEXT.pattern.removeprefix("-?") + "$",
                },
            ]
        },
    ),
]

Outcome = Literal["accepted", "duplicate", "conflict", "rejected"]
BatchKind = Literal["initial", "correction"]
DeliveryStatus = Literal["pending", "delivered", "failed"]


class PulseIn(msgspec.Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    """One usage pulse as a client sends it.

    `gc=False`: it holds only strings, a Raw and a datetime, so it can be
    in no reference cycle, and a 1,000-pulse body adds nothing for the
    collector to scan.
    """

    tenant_id: Name
    product_sku: Name
    use_unit: Unit
    used_amount: Amount
    id: Name | None = None
    timestamp: Timestamp | None = None


_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
_Unit = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class PulseInPlain(msgspec.Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    """`PulseIn` without the control-character patterns, for bodies that cannot hold one.

    JSON carries a control character only as a backslash escape or a raw
    DEL/C1 byte; intake uses this type only when the body has neither, and
    there it decides exactly as `PulseIn` does, four regex matches cheaper.
    """

    tenant_id: _Name
    product_sku: _Name
    use_unit: _Unit
    used_amount: Amount
    id: _Name | None = None
    timestamp: Timestamp | None = None


class PulseInText(msgspec.Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    """`PulseInPlain` with the amount as an integer or a string's text, not a Raw.

    Intake tries it first where it would use `PulseInPlain`: the amount is
    looked up in `money.KNOWN_NANOS` as it is, where a Raw must become bytes
    first. A number with a fraction or an exponent does not fit, nor does
    anything else this type refuses: intake then decodes the same bytes as
    `PulseInPlain`, so what it decides, and every reason it gives, is the
    documented schema's.
    """

    tenant_id: _Name
    product_sku: _Name
    use_unit: _Unit
    used_amount: int | str
    id: _Name | None = None
    timestamp: Timestamp | None = None


class Pulse(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """A validated pulse, ready for its shard.

    `ts` is microseconds since the epoch (UTC); `day` is the billing day in the
    tenant's zone. `pulse_id` is the client's id, or "" for a pulse sent
    without one: its store names it by where it keeps it (`assigned_id`).
    Encoded as an array, it is also the store's compact record of the pulse.

    A replay of a client id is told from a conflicting reuse by the payload
    (`same_payload`): product, unit, amount, and the timestamp if the client
    gave one (`ts_given`). Intake leaves `fingerprint` empty: the pulse is its
    own record of that. A pulse stored by an earlier version has the digest
    of its payload there (`payload_digest`), and is compared by digest.
    """

    tenant_id: str
    product_sku: str
    use_unit: str
    nanos: int
    pulse_id: str
    client_id: bool
    ts: int
    day: str
    fingerprint: bytes
    ts_given: bool = False  # last: log rows of earlier versions have no such item


def payload_digest(p: Pulse) -> bytes:
    """The digest that identifies the payload of `p`'s client id: `p.fingerprint`
    if it has one, else the one intake gave each pulse before it left them empty,
    which the stores of that time hold for the ids they saw. Its recipe may
    never change."""
    if p.fingerprint:
        return p.fingerprint
    given = p.ts if p.ts_given else None
    blake = _BLAKE2B_16.copy()
    blake.update(f"{p.product_sku}\x00{p.use_unit}\x00{p.nanos}\x00{given}".encode())
    return blake.digest()


def same_payload(stored: Pulse | bytes, p: Pulse) -> bool:
    """Whether `p` has the payload of `stored`, an earlier pulse with its client id
    (or the digest of that pulse's payload, `payload_digest`)."""
    if isinstance(stored, Pulse):
        if not (stored.fingerprint or p.fingerprint):
            return (
                stored.product_sku == p.product_sku
                and stored.use_unit == p.use_unit
                and stored.nanos == p.nanos
                and stored.ts_given == p.ts_given
                and (not p.ts_given or stored.ts == p.ts)
            )
        stored = payload_digest(stored)
    return stored == payload_digest(p)


# Copied for each digest: cheaper than a new one's keyword arguments.
_BLAKE2B_16 = hashlib.blake2b(digest_size=16)


def assigned_id(store_id: str, *place: int) -> str:
    """The id of a pulse sent without one: `srv-<store id>-<place>`, where `place`
    is where its store keeps it (log row and position, or row).

    Named when read, it costs the write nothing. A name made per pulse by
    the request, and kept in the log, was a fifth of a log row's bytes; in
    1,000-pulse arrays, decoding took 0.98 µs a pulse with it, 0.83 without,
    and the store's write 1.27 and 1.21 (`bench/stages.py`). It is the same
    at every read, and unique among every store's pulses. Pulses stored
    before keep the names they were given then.
    """
    return "-".join(["srv", store_id, *map(str, place)])


_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder(list[Pulse]).decode
_to_json = msgspec.json.Encoder().encode
_from_json = msgspec.json.Decoder(list[Pulse]).decode
_JSON_ARRAY = 0x5B  # "[": no MessagePack array begins with it


def encode_pulses(pulses: Sequence[Pulse]) -> bytes:
    """`pulses` as an array of `Pulse` arrays: how the SQLite log keeps them.

    MessagePack: a 1,000-pulse request's pulses take 56 bytes each where
    JSON took 87, and encode and decode faster. Under load (arrays without
    ids, 4 connections, 6 runs alternated with JSON) the server's CPU a
    pulse went from 4.51 to 4.00 µs, median. MessagePack's integers have 64
    bits: an amount of 18,446,744,073.709551616 or more does not fit in
    them as nanos, and pulses holding one are encoded as JSON, which
    `decode_encoded` tells by its first byte.
    """
    try:
        return _pack(pulses)
    except OverflowError:
        return _to_json(pulses)


def decode_encoded(encoded: bytes | memoryview) -> list[Pulse]:
    """The pulses `encode_pulses` encoded, in either of its encodings."""
    if encoded[0] == _JSON_ARRAY:
        return _from_json(encoded)
    return _unpack(encoded)


def join_encoded(parts: Sequence[bytes]) -> bytes:
    """`encode_pulses` of lists laid end to end, from their encodings.

    A MessagePack array is a header holding its length, then its items: the
    join is one header, for the sum of the lengths, and every part's items.
    """
    if len(parts) == 1:
        return parts[0]
    if all(part[0] != _JSON_ARRAY for part in parts):
        count = 0
        items: list[memoryview] = []
        for part in parts:
            length, start = _array_head(part)
            count += length
            items.append(memoryview(part)[start:])
        return _array_header(count) + b"".join(items)
    if all(part[0] == _JSON_ARRAY for part in parts):
        return b"[" + b",".join(part[1:-1] for part in parts if len(part) > 2) + b"]"
    # Both encodings (an amount too big for MessagePack): all as JSON.
    return _to_json([p for part in parts for p in decode_encoded(part)])


def _array_head(packed: bytes) -> tuple[int, int]:
    """(length, size of the header) of the MessagePack array `packed`."""
    head = packed[0]
    if head & 0xF0 == 0x90:  # fixarray: up to 15 items
        return head & 0x0F, 1
    if head == 0xDC:
        return int.from_bytes(packed[1:3], "big"), 3
    if head == 0xDD:
        return int.from_bytes(packed[1:5], "big"), 5
    raise ValueError(f"not a MessagePack array: first byte {head:#04x}")


def _array_header(length: int) -> bytes:
    """The header MessagePack (and `encode_pulses`) gives an array of `length` items."""
    if length < 16:
        return bytes((0x90 | length,))
    if length < 1 << 16:
        return b"\xdc" + length.to_bytes(2, "big")
    return b"\xdd" + length.to_bytes(4, "big")


class IngestItem(msgspec.Struct, omit_defaults=True):
    """A pulse of a request that was not plainly accepted."""

    index: int
    status: Outcome
    id: str | None = None
    error: str | None = None


class IngestReport(msgspec.Struct):
    """The answer to POST /pulses."""

    accepted: int
    duplicates: int
    rejected: int
    items: list[IngestItem]
    conflicts: int = 0


class ErrorDetail(msgspec.Struct, omit_defaults=True):
    code: str
    message: str
    details: object | None = None


class ErrorBody(msgspec.Struct):
    """Every error answer: {"error": {"code", "message", "details"?}}."""

    error: ErrorDetail


class Aggregate(msgspec.Struct):
    """The running totals of one bucket (tenant, sku, unit, billing day)."""

    tenant_id: str
    product_sku: str
    use_unit: str
    date: str
    used_amount: DecimalString
    pulse_count: int
    committed_amount: DecimalString
    committed_count: int
    revision: int


class AggregatePage(msgspec.Struct):
    aggregates: list[Aggregate]
    next_cursor: str | None


class StoredPulse(msgspec.Struct):
    """A pulse as the store keeps it: the audit trail behind a total."""

    id: str
    tenant_id: str
    product_sku: str
    use_unit: str
    used_amount: DecimalString
    timestamp: dt.datetime
    date: str
    received_at: dt.datetime
    id_assigned: bool


class PulsePage(msgspec.Struct):
    pulses: list[StoredPulse]
    next_cursor: str | None


class BatchRecord(msgspec.Struct, frozen=True):
    """One bucket's share of a batch: the delta since its last batch and the total."""

    tenant_id: str
    product_sku: str
    use_unit: str
    revision: int
    used_amount: DecimalString
    pulse_count: int
    total_amount: DecimalString
    total_count: int


class Batch(msgspec.Struct, frozen=True):
    """An outbox batch as it is delivered. Never changed once created."""

    batch_id: str
    store_id: str
    date: str
    partition: int
    kind: BatchKind
    created_at: dt.datetime
    record_count: int
    used_amount: DecimalString
    records: list[BatchRecord]


class BatchView(msgspec.Struct):
    """A batch with its delivery state, as GET /batches shows it."""

    batch_id: str
    store_id: str
    date: str
    partition: int
    kind: BatchKind
    created_at: dt.datetime
    record_count: int
    used_amount: DecimalString
    status: DeliveryStatus
    attempts: int
    last_error: str | None
    next_attempt_at: dt.datetime | None
    delivered_at: dt.datetime | None
    records: list[BatchRecord] | None = None


class BatchPage(msgspec.Struct):
    batches: list[BatchView]
    next_cursor: str | None


class BatchSummary(msgspec.Struct, frozen=True):
    batch_id: str
    kind: BatchKind
    partition: int
    record_count: int
    used_amount: DecimalString


class CommitRequest(msgspec.Struct, forbid_unknown_fields=True):
    date: dt.date


class CommitResult(msgspec.Struct):
    date: str
    batches: list[BatchSummary]
