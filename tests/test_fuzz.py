"""Hostile bodies at POST /pulses (hypothesis, through the Quart test client).

Whatever arrives (arbitrary bytes, JSON of the wrong shape, huge numbers,
NaN and Infinity as strings and as bare tokens, deep nesting, invalid UTF-8,
byte order marks, duplicate keys, mixed NDJSON lines, any Content-Type):

- the answer is never a 5xx and nothing is logged as an unexpected error;
- the body is JSON: the ingest report or the error shape, nothing else;
- the stored totals change by exactly the pulses reported accepted (count
  and amount, read back from the store), so a rejected pulse leaves nothing;
- GET /readyz is still 200 at the end.

Hypothesis runs in a worker thread and sends each example back into the
test's trio loop, so one running service takes every example.
"""

from __future__ import annotations

import json
import logging
from decimal import Context, Decimal, localcontext
from typing import Any

import msgspec
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quart.typing import TestClientProtocol as Client

from ingestor.model import ErrorBody, IngestReport
from ingestor.runtime import Runtime
from ingestor.store import AggregateQuery

Json = bytes  # a JSON text (or something meant to look like one)


def quoted(text: bytes) -> Json:
    return b'"' + text + b'"'


# -- field values ---------------------------------------------------------------

NASTY: list[Json] = [
    b"1e400",
    b"-1e400",
    b"1E+999999999",
    b'"1e400"',
    b'"1E-1000000000"',
    b'"0E-1000000000"',
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"nan",
    b'"NaN"',
    b'"Infinity"',
    b'"-Infinity"',
    b'"sNaN"',
    b'"-0"',
    b"-0",
    b"-1",
    b'"-1"',
    b"0.0000000001",
    b'"1.0000000001"',
    b"1" * 30,
    quoted(b"9" * 30),
    b"1" + b"0" * 5000,
    quoted(b"1" * 5000),
    b"1" * 18 + b".5",
    b"null",
    b"true",
    b"[]",
    b"{}",
    b'"1_000"',
    b'" 1"',
    b'"\\u0661"',
    b'"\xff\xfe"',
    b'"\xc3"',
    b'"\xed\xa0\x80"',
    b'"\\ud800"',
    b'"\\u0000"',
    b'"a\\nb"',
    b'"\xc2\x85"',
    b'"\x7f"',
    b'"\xef\xbb\xbf1"',
    b'""',
    quoted(b"x" * 129),
    quoted(b"y" * 65),
    b"[[[[[[1]]]]]]",
    b'{"a": {"b": {"c": 1}}}',
    b"1.",
    b".5",
    b"01",
    b"+1",
    b"0x10",
]
AMOUNTS: list[Json] = [
    b"1",
    b"0",
    b"2.5",
    b'"0.000000001"',
    b'"3"',
    b"123456789012345678",
    b'"999999999999999999.999999999"',
    b"1e2",
    b'"1.50000000000"',
]
TENANTS: list[Json] = [b'"t1"', b'"t2"', b'"tenant-\xc3\xa9"', quoted(b"t" * 128)]
UNITS: list[Json] = [b'"api_call"', b'"byte"', quoted(b"u" * 64)]
IDS: list[Json] = [b'"a"', b'"b"', b'"c"', b"null"]
TIMES: list[Json] = [
    b'"2026-11-28T11:00:00Z"',
    b'"2026-11-27T23:59:59.999999-05:00"',
    b'"2026-11-28T10:00:00"',
    b'"2020-01-01T00:00:00Z"',
    b'"2027-01-01T00:00:00Z"',
    b'"yesterday"',
    b"1764320400",
    b'"2026-11-28T12:04:00+00:00"',
    b'"2026-02-30T00:00:00Z"',
]


def choice(good: list[Json]) -> st.SearchStrategy[Json]:
    """Mostly a good value (so that pulses get stored), sometimes a nasty one or random text."""
    text = st.text(max_size=20).map(lambda s: json.dumps(s).encode())
    return st.integers(0, 11).flatmap(
        lambda n: st.sampled_from(NASTY) if n == 0 else text if n == 1 else st.sampled_from(good)
    )


KEYS = ["tenant_id", "product_sku", "use_unit", "used_amount", "id", "timestamp", "colour", ""]


@st.composite
def pulse_object(draw: st.DrawFn) -> Json:
    fields: list[tuple[str, Json]] = [
        ("tenant_id", draw(choice(TENANTS))),
        ("product_sku", draw(choice([b'"sku1"', b'"sku2"']))),
        ("use_unit", draw(choice(UNITS))),
        ("used_amount", draw(choice(AMOUNTS))),
    ]
    if draw(st.booleans()):
        fields.append(("id", draw(choice(IDS))))
    if draw(st.booleans()):
        fields.append(("timestamp", draw(st.sampled_from(TIMES))))
    fields = [f for f in fields if draw(st.integers(0, 15)) or f[0] != "used_amount"]
    if draw(st.integers(0, 4)) == 0:  # duplicate and unknown keys
        fields += draw(
            st.lists(
                st.tuples(st.sampled_from(KEYS), st.sampled_from(NASTY + AMOUNTS)),
                min_size=1,
                max_size=2,
            )
        )
    fields = draw(st.permutations(fields))
    return b"{" + b",".join(json.dumps(k).encode() + b":" + v for k, v in fields) + b"}"


def json_value() -> st.SearchStrategy[Json]:
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=12,
    )
    return values.map(lambda v: json.dumps(v).encode())


@st.composite
def deep(draw: st.DrawFn) -> Json:
    depth = draw(st.integers(1, 30_000))
    opener = draw(st.sampled_from([b"[", b'{"a":', b'{"tenant_id":[', b'[{"id":']))
    closed = draw(st.booleans())
    return opener * depth + ((b"]" if opener == b"[" else b"}") * depth if closed else b"")


element = st.integers(0, 9).flatmap(
    lambda n: (
        json_value()
        if n == 0
        else st.sampled_from(NASTY)
        if n == 1
        else st.binary(max_size=40)
        if n == 2
        else pulse_object()
    )
)


@st.composite
def body(draw: st.DrawFn) -> bytes:
    shape = draw(st.sampled_from(["object", "array", "ndjson", "bytes", "json", "deep"]))
    if shape == "object":
        out = draw(pulse_object())
    elif shape == "array":
        out = b"[" + b",".join(draw(st.lists(element, max_size=8))) + b"]"
    elif shape == "ndjson":
        lines = draw(st.lists(st.one_of(element, st.just(b""), st.just(b"  ")), max_size=8))
        out = draw(st.sampled_from([b"\n", b"\r\n", b"\r"])).join(lines)
    elif shape == "bytes":
        out = draw(st.binary(max_size=300))
    elif shape == "json":
        out = draw(json_value())
    else:
        out = draw(deep())
    if draw(st.integers(0, 9)) == 0:
        out = b"\xef\xbb\xbf" + out
    return out


CONTENT_TYPES = [
    None,
    *["application/json"] * 6,
    *["application/x-ndjson"] * 4,
    "application/jsonl",
    "application/json; charset=utf-8",
    "application/vnd.api+json",
    "APPLICATION/JSON",
    "text/plain",
    "",
    "application/xml",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/json;;",
    "application/x-jsonlines; charset=latin-1",
]
NDJSON_TYPES = {"application/x-ndjson", "application/jsonl", "application/x-jsonlines"}


# -- the oracle ------------------------------------------------------------------


def parsed_elements(data: bytes, content_type: str | None) -> list[Any] | None:
    """The pulses of a body as an independent parser (Python's json) reads them."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()

    def load(text: bytes) -> Any:
        try:
            return json.loads(text.decode("utf-8"), parse_float=Decimal, parse_int=Decimal)
        except (ValueError, RecursionError):
            return None

    if kind in NDJSON_TYPES:
        return [load(line) for line in data.splitlines() if line.strip()]
    whole = load(data)
    if isinstance(whole, dict):
        return [whole]
    if isinstance(whole, list):
        return whole
    # Each pulse of an array stands alone: an element that is not JSON (say,
    # invalid UTF-8 in a string) is rejected alone and the others are stored.
    # Split the array, then read each element independently.
    try:
        raws = msgspec.json.decode(data, type=list[msgspec.Raw])
    except (msgspec.MsgspecError, RecursionError, UnicodeDecodeError):
        return None
    return [load(bytes(raw)) for raw in raws]


def expected_amount(elements: list[Any] | None, accepted: set[int]) -> Decimal:
    assert elements is not None, "pulses were accepted from a body Python cannot parse"
    with localcontext(EXACT):
        total = Decimal(0)
        for index in accepted:
            amount = elements[index]["used_amount"]
            total += amount if isinstance(amount, Decimal) else Decimal(amount)
        return total


EXACT = Context(prec=60)  # totals of many 18-digit amounts exceed the default 28 digits

REPORT_KEYS = {"accepted", "duplicates", "rejected", "items", "conflicts"}


# -- the test --------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings_overrides",
    [{"max_batch": 6, "max_body_bytes": 256 * 1024, "max_line_bytes": 4096, "partitions": 2}],
)
async def test_hostile_bodies_never_break_the_service(
    client: Client, runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ingestor")

    def stored() -> tuple[int, Decimal]:
        rows = runtime.store.aggregates(AggregateQuery(limit=1_000_000))
        with localcontext(EXACT):
            return sum(r.pulse_count for r in rows), sum(
                (Decimal(r.used_amount) for r in rows), Decimal(0)
            )

    async def one(data: bytes, content_type: str | None) -> None:
        count, amount = await trio.to_thread.run_sync(stored)
        headers = {} if content_type is None else {"Content-Type": content_type}
        response = await client.post("/pulses", data=data, headers=headers)
        status = response.status_code
        text = await response.get_data()
        assert status < 500, text
        assert response.content_type == "application/json"
        accepted: set[int] = set()
        if status == 202:
            assert set(json.loads(text)) == REPORT_KEYS
            report = msgspec.json.decode(text, type=IngestReport, strict=True)
            statuses = [item.status for item in report.items]
            assert report.duplicates == statuses.count("duplicate")
            assert report.conflicts == statuses.count("conflict")
            assert report.rejected == statuses.count("rejected")
            assert "accepted" not in statuses
            indexes = [item.index for item in report.items]
            assert indexes == sorted(set(indexes))
            if report.accepted:
                elements = parsed_elements(data, content_type)
                assert elements is not None
                accepted = set(range(len(elements))) - set(indexes)
                assert len(accepted) == report.accepted
        else:
            assert 400 <= status < 500
            assert set(json.loads(text)) == {"error"}
            error = msgspec.json.decode(text, type=ErrorBody, strict=True).error
            assert error.code
            assert error.message
        new_count, new_amount = await trio.to_thread.run_sync(stored)
        assert new_count - count == len(accepted)
        if accepted:
            with localcontext(EXACT):
                added = new_amount - amount
            assert added == expected_amount(parsed_elements(data, content_type), accepted)
        else:
            assert new_amount == amount

    @settings(
        max_examples=500,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=body(), content_type=st.sampled_from(CONTENT_TYPES))
    def fuzz(data: bytes, content_type: str | None) -> None:
        trio.from_thread.run(one, data, content_type)

    await trio.to_thread.run_sync(fuzz)
    assert (await client.get("/readyz")).status_code == 200
    assert runtime.pulses.accepted > 0  # the strategies do reach the store
    unexpected = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert unexpected == []
