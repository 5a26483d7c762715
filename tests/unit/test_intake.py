"""Decoding and validating POST /pulses bodies (DESIGN §4)."""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import json
import tracemalloc
import zoneinfo
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestor.clock import epoch_us
from ingestor.errors import RequestError
from ingestor.intake import Intake, Rules, decode_pulses
from ingestor.model import IngestItem, Pulse, payload_digest, same_payload

JSON = "application/json"
NDJSON = "application/x-ndjson"
UTC = dt.UTC
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
MICRO = dt.timedelta(microseconds=1)
LATE = dt.timedelta(days=35)
SKEW = dt.timedelta(minutes=5)
NOW = dt.datetime(2026, 3, 15, 12, 0, tzinfo=UTC)


def us(moment: dt.datetime) -> int:
    """Reference microseconds since the epoch: exact timedelta floor division."""
    return (moment - EPOCH) // MICRO


def make_rules(
    *, max_batch: int = 10_000, zone: str = "UTC", tenants: dict[str, str] | None = None
) -> Rules:
    return Rules(
        late_window_s=LATE.total_seconds(),
        future_skew_s=SKEW.total_seconds(),
        max_batch=max_batch,
        billing_timezone=zone,
        tenant_timezones=tenants,
    )


RULES = make_rules()


DROP = object()  # a field value meaning "leave this field out"


def pulse(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "tenant_id": "t1",
        "product_sku": "sku1",
        "use_unit": "api_call",
        "used_amount": 100,
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not DROP}


def encode(value: object) -> bytes:
    return json.dumps(value).encode()


def with_number(fields: dict[str, object], number: str) -> bytes:
    """`fields` as a JSON object whose used_amount is the JSON number `number`, verbatim."""
    rest = {k: v for k, v in fields.items() if k != "used_amount"}
    return encode(rest)[:-1] + f', "used_amount": {number}}}'.encode()


def decode(
    body: bytes,
    content_type: str | None = JSON,
    rules: Rules = RULES,
    now: dt.datetime = NOW,
) -> Intake:
    return decode_pulses(body, content_type, rules, us(now))


def accept(
    body: bytes, content_type: str | None = JSON, rules: Rules = RULES, now: dt.datetime = NOW
) -> Pulse:
    intake = decode(body, content_type, rules, now)
    assert intake.items == [], intake.items
    assert intake.total == 1
    [(index, p)] = intake.pulses
    assert index == 0
    return p


def reject(body: bytes, rules: Rules = RULES, now: dt.datetime = NOW) -> IngestItem:
    intake = decode(body, JSON, rules, now)
    assert intake.pulses == []
    assert intake.total == 1
    [item] = intake.items
    assert item.index == 0
    assert item.status == "rejected"
    assert item.error
    return item


def nanos_of(text: str) -> int:
    with decimal.localcontext() as ctx:
        ctx.prec = 100
        value = Decimal(text) * 10**9
    assert value == value.to_integral_value()
    return int(value)


# --- body shapes ------------------------------------------------------------


def test_single_object_body() -> None:
    intake = decode(encode(pulse(used_amount="2.5", id="p-1")))
    assert intake.single is True
    assert intake.total == 1
    assert intake.items == []
    [(index, p)] = intake.pulses
    assert index == 0
    assert (p.tenant_id, p.product_sku, p.use_unit) == ("t1", "sku1", "api_call")
    assert p.nanos == 2_500_000_000
    assert p.pulse_id == "p-1"
    assert p.client_id is True
    assert p.ts == us(NOW)
    assert p.day == "2026-03-15"


def test_array_body_keeps_order_and_indexes() -> None:
    body = encode([pulse(used_amount=n, id=f"p{n}") for n in range(5)])
    intake = decode(body)
    assert intake.single is False
    assert intake.total == 5
    assert intake.items == []
    assert [(i, p.pulse_id, p.nanos) for i, p in intake.pulses] == [
        (n, f"p{n}", n * 10**9) for n in range(5)
    ]


def test_array_of_one_is_not_single() -> None:
    intake = decode(encode([pulse()]))
    assert intake.single is False
    assert len(intake.pulses) == 1


def test_empty_array_is_an_empty_request() -> None:
    intake = decode(b"  []  ")
    assert (intake.total, intake.pulses, intake.items) == (0, [], [])


def test_ndjson_body() -> None:
    lines = [encode(pulse(used_amount=n, id=f"p{n}")) for n in (1, 2, 3)]
    intake = decode(b"\n".join(lines), NDJSON)
    assert intake.single is False
    assert intake.total == 3
    assert intake.items == []
    assert [(i, p.pulse_id, p.nanos) for i, p in intake.pulses] == [
        (0, "p1", 10**9),
        (1, "p2", 2 * 10**9),
        (2, "p3", 3 * 10**9),
    ]


def test_ndjson_skips_blank_lines_and_accepts_crlf() -> None:
    a, b, c = (encode(pulse(used_amount=n)) for n in (1, 2, 3))
    body = b"\n\n" + a + b"\r\n   \r\n" + b + b"\n\t\n\n" + c + b"\n\n"
    intake = decode(body, NDJSON)
    assert intake.total == 3
    assert intake.items == []
    assert sorted(p.nanos for _, p in intake.pulses) == [10**9, 2 * 10**9, 3 * 10**9]


def test_ndjson_with_only_blank_lines_is_empty() -> None:
    intake = decode(b"\n \n\r\n", NDJSON)
    assert (intake.total, intake.pulses, intake.items) == (0, [], [])


def test_ndjson_bad_line_is_rejected_alone() -> None:
    lines = [
        encode(pulse(id="a")),
        b'{"tenant_id": "t1", "product_sku": ',  # not JSON
        encode(pulse(id="c")),
        encode(pulse(id="d", used_amount=-1)),  # JSON, invalid amount
        encode(pulse(id="e", colour="red")),  # unknown field
        encode([pulse(id="f")]),  # an array, not a pulse
        encode(pulse(id="g")),
    ]
    intake = decode(b"\n".join(lines), NDJSON)
    assert intake.total == 7
    assert [(i, p.pulse_id) for i, p in intake.pulses] == [(0, "a"), (2, "c"), (6, "g")]
    by_index = {item.index: item for item in intake.items}
    assert sorted(by_index) == [1, 3, 4, 5]
    assert all(item.status == "rejected" and item.error for item in intake.items)
    assert by_index[3].id == "d"
    assert "used_amount" in (by_index[3].error or "")
    assert by_index[4].id == "e"
    assert "colour" in (by_index[4].error or "")


def test_ndjson_lines_end_at_newline_alone() -> None:
    """A bare "\r" is JSON's whitespace inside a line, not a line's end; a line
    of only \x0b or \x0c (bytes.strip's whitespace, not JSON's) is reported."""
    cr = encode(pulse(id="a")).replace(b",", b",\r", 1)
    body = b"\n".join([cr, b"\x0b", encode(pulse(id="c")), b"\x0c\r", encode(pulse(id="e"))])
    intake = decode(body, NDJSON)
    assert intake.total == 5
    assert [(i, p.pulse_id) for i, p in intake.pulses] == [(0, "a"), (2, "c"), (4, "e")]
    assert [(item.index, item.status) for item in intake.items] == [
        (1, "rejected"),
        (3, "rejected"),
    ]


def test_ndjson_line_with_two_pulses_is_rejected() -> None:
    good = encode(pulse(id="ok"))
    double = encode(pulse(id="x")) + b", " + encode(pulse(id="y"))
    intake = decode(good + b"\n" + double + b"\n", NDJSON)
    assert intake.total == 2
    assert [(i, p.pulse_id) for i, p in intake.pulses] == [(0, "ok")]
    [item] = intake.items
    assert (item.index, item.status) == (1, "rejected")


def test_ndjson_lines_cannot_borrow_from_each_other() -> None:
    """Each NDJSON line must be one JSON value on its own (DESIGN §4: one per line).

    Line 0 holds two pulses; lines 1 and 2 are the halves of one object, not
    JSON alone. Joined with commas they happen to make a valid array of three
    pulses, and the fast path in `_decode_ndjson` accepts all three because the
    count matches the line count.
    """
    p = encode(pulse(id="x"))
    half_1 = b'{"tenant_id": "t1", "product_sku": "sku1"'
    half_2 = b'"use_unit": "api_call", "used_amount": 7}'
    intake = decode(p + b", " + p.replace(b'"x"', b'"y"') + b"\n" + half_1 + b"\n" + half_2, NDJSON)
    assert intake.total == 3
    assert intake.pulses == []
    assert [(item.index, item.status) for item in intake.items] == [
        (0, "rejected"),
        (1, "rejected"),
        (2, "rejected"),
    ]


def test_mixed_array_keeps_the_valid_pulses() -> None:
    body = encode(
        [
            pulse(id="a"),
            pulse(id="b", used_amount="-1"),
            pulse(),
            5,
            pulse(id="e", tenant="typo"),
            pulse(id="f", tenant_id=""),
            pulse(id="g", used_amount="0.5"),
        ]
    )
    intake = decode(body)
    assert intake.single is False
    assert intake.total == 7
    assert [i for i, _ in intake.pulses] == [0, 2, 6]
    assert intake.pulses[0][1].pulse_id == "a"
    assert intake.pulses[2][1].nanos == 500_000_000
    items = {item.index: item for item in intake.items}
    assert sorted(items) == [1, 3, 4, 5]
    assert {item.status for item in intake.items} == {"rejected"}
    assert (items[1].id, items[3].id, items[4].id, items[5].id) == ("b", None, "e", "f")
    assert "used_amount" in (items[1].error or "")
    assert "tenant" in (items[4].error or "")
    assert "tenant_id" in (items[5].error or "")
    assert items[3].error


def test_array_where_only_business_rules_fail_reports_each() -> None:
    # Every element decodes as a pulse; two fail the amount and window rules.
    old = (NOW - LATE - dt.timedelta(days=1)).isoformat()
    body = encode([pulse(id="a"), pulse(id="b", used_amount="-2"), pulse(id="c", timestamp=old)])
    intake = decode(body)
    assert [(i, p.pulse_id) for i, p in intake.pulses] == [(0, "a")]
    assert [(item.index, item.id, item.status) for item in intake.items] == [
        (1, "b", "rejected"),
        (2, "c", "rejected"),
    ]
    assert "used_amount" in (intake.items[0].error or "")
    assert "timestamp" in (intake.items[1].error or "")


def test_rejected_single_object_is_reported_not_raised() -> None:
    intake = decode(encode(pulse(id="z", used_amount=-1)))
    assert intake.single is True
    assert intake.total == 1
    assert intake.pulses == []
    [item] = intake.items
    assert (item.index, item.id, item.status) == (0, "z", "rejected")
    assert "used_amount" in (item.error or "")


# --- whole-body errors ---------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b"hello",
        b"{broken",
        b"[1, 2",
        b'[{"tenant_id": 1}',
        b'"a string"',
        b"42",
        b"null",
        b"true",
        encode(pulse()) + b" trailing",
        encode([pulse()]) + b" trailing",
    ],
)
def test_body_that_is_not_an_object_or_array_of_json_is_400(body: bytes) -> None:
    with pytest.raises(RequestError) as caught:
        decode(body)
    assert caught.value.status == 400


@pytest.mark.parametrize(
    "body",
    [
        b'{"tenant_id": 1',
        b'{"tenant_id": "t1", "colour": "red"',
        b'{"tenant_id": "t1"} {"tenant_id": "t2"}',
    ],
)
def test_malformed_single_object_is_400_even_if_a_field_is_wrong_first(body: bytes) -> None:
    """A truncated or trailing-garbage object body is not JSON: 400, like an array body.

    `decode_pulses` reports it as one rejected pulse (a 422) instead, because
    msgspec raises ValidationError for the first bad field before it reaches
    the syntax error, and the `start == b"{"` branch treats that as a pulse
    problem. `[{"tenant_id": 1}` (the array form) is correctly a 400.
    """
    with pytest.raises(RequestError) as caught:
        decode(body)
    assert caught.value.status == 400


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "text/plain",
        "application/xml",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "text/json-ish",
    ],
)
def test_wrong_or_missing_content_type_is_415(content_type: str | None) -> None:
    with pytest.raises(RequestError) as caught:
        decode(encode(pulse()), content_type)
    assert caught.value.status == 415


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "Application/JSON", " application/json "]
)
def test_json_content_type_variants(content_type: str) -> None:
    assert accept(encode(pulse()), content_type=content_type).nanos == 100 * 10**9


def test_ndjson_content_type_with_parameters() -> None:
    body = encode(pulse()) + b"\n" + encode(pulse())
    intake = decode(body, "application/x-ndjson; charset=utf-8")
    assert len(intake.pulses) == 2
    assert len(decode(body, 'application/x-ndjson;CHARSET="UTF8"').pulses) == 2


@pytest.mark.parametrize("charset", ["iso-8859-1", "utf-16", '"latin1"'])
def test_a_body_declared_in_another_charset_is_415(charset: str) -> None:
    """JSON is UTF-8: Latin-1 bytes read as UTF-8 would name a tenant nobody sent."""
    for content_type in (JSON, NDJSON):
        with pytest.raises(RequestError) as caught:
            decode(encode(pulse()), f"{content_type}; charset={charset}")
        assert (caught.value.status, caught.value.code) == (415, "unsupported_media_type")


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (encode([pulse()] * 4), JSON),
        (encode([pulse(), pulse(), 5, pulse(used_amount="x")]), JSON),
        (b"\n".join([encode(pulse())] * 4), NDJSON),
        (b"\n".join([encode(pulse()), b"{bad", encode(pulse()), b"{bad"]), NDJSON),
    ],
)
def test_more_than_max_batch_pulses_is_413(body: bytes, content_type: str) -> None:
    with pytest.raises(RequestError) as caught:
        decode(body, content_type, rules=make_rules(max_batch=3))
    assert caught.value.status == 413


_16_MIB = 16 * 1024 * 1024


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"[" + b"1," * (_16_MIB // 2 - 1) + b"1]", JSON),
        (b"[" + b"{}," * (_16_MIB // 3 - 1) + b"{}]", JSON),
        (b"[" + encode(pulse(used_amount="x")) + b",[]" * (_16_MIB // 3) + b"]", JSON),
        (b"\n" * _16_MIB, NDJSON),
        (b"1\n" * (_16_MIB // 2), NDJSON),
        (encode(pulse()) + b"\n" * _16_MIB, NDJSON),
    ],
    ids=["ones", "objects", "bad-pulse-then-arrays", "newlines", "ndjson-ones", "blank-lines"],
)
def test_a_body_of_millions_of_tiny_values_is_413_before_any_is_built(
    body: bytes, content_type: str
) -> None:
    """Bounded memory (DESIGN §3.6): split into its elements or lines before they
    were counted, 16 MiB of "1," took 450 MB and 1.6 s of the event loop."""
    tracemalloc.start()
    try:
        with pytest.raises(RequestError) as caught:
            decode(body, content_type)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (caught.value.status, caught.value.code) == (413, "too_many_pulses")
    assert "at most 10000 pulses" in caught.value.message
    assert peak < 1024 * 1024


def test_a_single_pulse_with_millions_of_values_in_a_field_is_reported_without_building_them() -> (
    None
):
    # An unknown field makes the pulse rejected; whether the rest is JSON is
    # then checked without building its values.
    body = encode(pulse()).replace(b"{", b'{"extra":[' + b"{}," * (_16_MIB // 3) + b"{}],", 1)
    tracemalloc.start()
    try:
        intake = decode(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [item.status for item in intake.items] == ["rejected"]
    assert "unknown field `extra`" in (intake.items[0].error or "")
    assert peak < 1024 * 1024
    with pytest.raises(RequestError) as caught:
        decode(body[:-1] + b",}")
    assert (caught.value.status, caught.value.code) == (400, "invalid_json")
    with pytest.raises(RequestError) as caught:
        decode(body.replace(b'"extra":[', b'"extra":["\xff",', 1))
    assert (caught.value.status, caught.value.code) == (400, "invalid_json")


def test_many_commas_or_blank_lines_below_the_bound_are_still_read_pulse_by_pulse() -> None:
    small = make_rules(max_batch=3)  # bound: 96 separators
    commas = pulse(use_unit="," * 60)
    # Valid pulses decode whole, however many commas their names hold.
    assert len(decode(encode([commas] * 3), rules=small).pulses) == 3
    # An invalid one makes the body read element by element, below the bound...
    intake = decode(encode([commas, 5]), rules=small)
    assert [item.index for item in intake.items] == [1]
    # ... and past it, refused whole.
    with pytest.raises(RequestError) as caught:
        decode(encode([commas, commas, 5]), rules=small)
    assert caught.value.status == 413
    blank = b"\n" * 40
    assert len(decode(blank + encode(pulse()) + blank, NDJSON, rules=small).pulses) == 1
    with pytest.raises(RequestError) as caught:
        decode(blank * 2 + encode(pulse()) + blank, NDJSON, rules=small)
    assert caught.value.status == 413


def test_exactly_max_batch_pulses_is_fine() -> None:
    small = make_rules(max_batch=3)
    assert len(decode(encode([pulse()] * 3), rules=small).pulses) == 3
    ndjson = b"\n\n".join([encode(pulse())] * 3) + b"\n\n\n"
    assert len(decode(ndjson, NDJSON, rules=small).pulses) == 3


# --- field rules -----------------------------------------------------------------

NAME_FIELDS = [("tenant_id", 128), ("product_sku", 128), ("use_unit", 64), ("id", 128)]


@pytest.mark.parametrize(("field", "longest"), NAME_FIELDS)
def test_string_length_boundaries(field: str, longest: int) -> None:
    for value in ("x", "x" * longest, "é" * longest, "日" * longest):
        p = accept(encode(pulse(**{field: value})))
        got = {
            "tenant_id": p.tenant_id,
            "product_sku": p.product_sku,
            "use_unit": p.use_unit,
            "id": p.pulse_id,
        }[field]
        assert got == value
    for value in ("", "x" * (longest + 1), "é" * (longest + 1)):
        item = reject(encode(pulse(**{field: value})))
        assert field in (item.error or "")


@pytest.mark.parametrize(("field", "_longest"), NAME_FIELDS)
@pytest.mark.parametrize(
    "value",
    ["\x00", "a\x00b", "\x1f", "a\tb", "a\n", "\na", "a\r", "\x7f", "\x80", "a\x85", "\x9f"],
)
def test_control_characters_are_rejected(field: str, _longest: int, value: str) -> None:
    item = reject(encode(pulse(**{field: value})))
    assert field in (item.error or "")


@pytest.mark.parametrize(("field", "_longest"), NAME_FIELDS)
@pytest.mark.parametrize("value", ["a b", "\xa0", "tenant/ä", "☃", "\U0001f680"])
def test_printable_characters_are_accepted(field: str, _longest: int, value: str) -> None:
    accept(encode(pulse(**{field: value})))


@pytest.mark.parametrize("field", ["tenant_id", "product_sku", "use_unit", "used_amount"])
def test_required_fields(field: str) -> None:
    item = reject(encode(pulse(**{field: DROP})))
    assert field in (item.error or "")


@pytest.mark.parametrize("field", ["tenant_id", "product_sku", "use_unit", "id"])
@pytest.mark.parametrize("value", [5, None, ["t"], {"a": 1}, True])
def test_name_fields_must_be_strings(field: str, value: object) -> None:
    if field == "id" and value is None:
        # "id": null is the same as leaving it out.
        assert accept(encode(pulse(id=None))).client_id is False
        return
    item = reject(encode(pulse(**{field: value})))
    assert field in (item.error or "")


@pytest.mark.parametrize(
    "number",
    [
        "0",
        "-0",
        "1",
        "1.5",
        "0.000000001",
        "100.25",
        "999999999999999999.999999999",
        "1.5000000000000",
        "1e3",
        "12.5E-1",
        "123456789012345678",
    ],
)
def test_used_amount_as_json_number(number: str) -> None:
    p = accept(with_number(pulse(), number))
    assert p.nanos == nanos_of(number)


@pytest.mark.parametrize(
    "text",
    ["0", "1.5", "1.50", "0.000000001", "999999999999999999.999999999", "1.5000000000000", "42"],
)
def test_used_amount_as_decimal_string(text: str) -> None:
    assert accept(encode(pulse(used_amount=text))).nanos == nanos_of(text)


@pytest.mark.parametrize(
    "number",
    [
        "-1",
        "-0.000000001",
        "1.0000000001",
        "0.0000000001",
        "1e18",
        "1000000000000000000",
        "1e400",
        "-1e400",
    ],
)
def test_bad_used_amount_numbers(number: str) -> None:
    item = reject(with_number(pulse(), number))
    assert "used_amount" in (item.error or "")


@pytest.mark.parametrize(
    "value",
    [
        "-1",
        "-0.5",
        "NaN",
        "Infinity",
        "-Infinity",
        "1.0000000001",
        "1000000000000000000",
        "99999999999999999999",
        "abc",
        "",
        "1.2.3",
        True,
        None,
        [1],
        {"v": 1},
    ],
)
def test_bad_used_amount_values(value: object) -> None:
    item = reject(encode(pulse(used_amount=value)))
    assert "used_amount" in (item.error or "")


@given(st.integers(min_value=0, max_value=10**27 - 1), st.booleans())
@settings(max_examples=60)
def test_used_amount_nanos_match_decimal(nanos: int, as_string: bool) -> None:
    text = str(Decimal(nanos).scaleb(-9))
    body = encode(pulse(used_amount=text)) if as_string else with_number(pulse(), text)
    assert accept(body).nanos == nanos


def test_unknown_fields_are_rejected() -> None:
    for extra in ({"colour": "red"}, {"Tenant_ID": "t1"}, {"amount": 1}, {"ts": "x"}):
        item = reject(encode({**pulse(id="k"), **extra}))
        [name] = extra
        assert name in (item.error or "")
        assert item.id == "k"


def test_id_is_optional_and_left_for_the_store_to_name() -> None:
    intake = decode(encode([pulse(), pulse(id="mine")]))
    assert [(p.pulse_id, p.client_id) for _, p in intake.pulses] == [("", False), ("mine", True)]


def test_intake_says_whether_any_valid_pulse_has_a_client_id() -> None:
    """The store looks ids up only if intake says there are some: a request
    with one id among many must say so, wherever the id is."""
    assert not decode(encode([pulse(), pulse(tenant_id="t2")])).ids
    for where in range(3):
        pulses = [pulse(used_amount=n + 1) for n in range(3)]
        pulses[where]["id"] = "mine"
        assert decode(encode(pulses)).ids, where
    assert decode(encode(pulse(id="mine"))).ids
    assert decode(encode(pulse(id="mine")).replace(b"}", b"}\n"), NDJSON).ids
    # An id on a rejected pulse is nothing to look up.
    assert not decode(encode([pulse(), pulse(id="mine", used_amount=-1)])).ids


# --- timestamps --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "2026-03-15T10:00:00Z",
        "2026-03-15T10:00:00+00:00",
        "2026-03-15T15:45:00+05:45",
        "2026-03-15T05:00:00-05:00",
        "2026-03-15T10:00:00.000000Z",
        "2026-03-14T23:00:00-11:00",
    ],
)
def test_timestamp_with_offset(text: str) -> None:
    p = accept(encode(pulse(timestamp=text)))
    assert p.ts == us(dt.datetime.fromisoformat(text))
    assert p.ts == us(dt.datetime(2026, 3, 15, 10, tzinfo=UTC))


@pytest.mark.parametrize(
    "value",
    [
        "2026-03-15T10:00:00",
        "2026-03-15T10:00:00.123456",
        "2026-03-15",
        "10:00:00Z",
        "yesterday",
        "",
        1773568800,
        1773568800.5,
    ],
)
def test_timestamp_needs_an_offset(value: object) -> None:
    item = reject(encode(pulse(timestamp=value)))
    assert "timestamp" in (item.error or "")


def test_missing_timestamp_means_now() -> None:
    p = accept(encode(pulse()))
    assert p.ts == us(NOW)
    assert p.day == NOW.date().isoformat()


@pytest.mark.parametrize("zone", [UTC, dt.timezone(dt.timedelta(hours=5, minutes=45))])
def test_late_window_edge(zone: dt.tzinfo) -> None:
    edge = NOW - LATE
    p = accept(encode(pulse(timestamp=edge.astimezone(zone).isoformat())))
    assert p.ts == us(NOW) - 35 * 86_400 * 10**6
    item = reject(encode(pulse(timestamp=(edge - MICRO).astimezone(zone).isoformat())))
    assert "timestamp" in (item.error or "")


@pytest.mark.parametrize("zone", [UTC, dt.timezone(-dt.timedelta(hours=9, minutes=30))])
def test_future_skew_edge(zone: dt.tzinfo) -> None:
    edge = NOW + SKEW
    p = accept(encode(pulse(timestamp=edge.astimezone(zone).isoformat())))
    assert p.ts == us(NOW) + 300 * 10**6
    item = reject(encode(pulse(timestamp=(edge + MICRO).astimezone(zone).isoformat())))
    assert "timestamp" in (item.error or "")


def test_windows_follow_the_rules() -> None:
    tight = Rules(late_window_s=3600, future_skew_s=1, max_batch=10)
    hour = dt.timedelta(hours=1)
    second = dt.timedelta(seconds=1)
    accept(encode(pulse(timestamp=(NOW - hour).isoformat())), rules=tight)
    reject(encode(pulse(timestamp=(NOW - hour - MICRO).isoformat())), rules=tight)
    accept(encode(pulse(timestamp=(NOW + second).isoformat())), rules=tight)
    reject(encode(pulse(timestamp=(NOW + second + MICRO).isoformat())), rules=tight)


@given(
    st.datetimes(
        min_value=dt.datetime(1900, 1, 1),
        max_value=dt.datetime(2200, 1, 1),
        timezones=st.sampled_from(
            [
                UTC,
                dt.timezone(dt.timedelta(hours=5, minutes=45)),
                dt.timezone(-dt.timedelta(hours=9, minutes=30)),
                zoneinfo.ZoneInfo("America/New_York"),
            ]
        ),
    )
)
def test_epoch_us_is_exact(moment: dt.datetime) -> None:
    assert epoch_us(moment) == us(moment)


# --- billing day -----------------------------------------------------------------

NEW_YORK = make_rules(zone="America/New_York")


def day_at(rules: Rules, text: str, tenant: str = "t1") -> str:
    return rules.day_of(tenant, us(dt.datetime.fromisoformat(text)))


@pytest.mark.parametrize(
    ("instant", "day"),
    [
        ("2026-03-15T00:00:00Z", "2026-03-15"),
        ("2026-03-15T23:59:59.999999Z", "2026-03-15"),
        ("2026-03-16T00:00:00Z", "2026-03-16"),
        ("2026-03-16T01:00:00+02:00", "2026-03-15"),
        ("2026-03-15T20:00:00-05:00", "2026-03-16"),
    ],
)
def test_billing_day_in_utc(instant: str, day: str) -> None:
    assert day_at(RULES, instant) == day


@pytest.mark.parametrize(
    ("instant", "day"),
    [
        # EST (-05:00) before the change on 2026-03-08 at 02:00 local.
        ("2026-03-08T04:59:59.999999Z", "2026-03-07"),
        ("2026-03-08T05:00:00Z", "2026-03-08"),
        ("2026-03-08T06:59:59.999999Z", "2026-03-08"),
        ("2026-03-08T07:00:00Z", "2026-03-08"),
        # EDT (-04:00) afterwards: the next midnight is at 04:00Z.
        ("2026-03-09T03:59:59.999999Z", "2026-03-08"),
        ("2026-03-09T04:00:00Z", "2026-03-09"),
        # Back to EST on 2026-11-01 at 02:00 local (06:00Z).
        ("2026-11-01T03:59:59.999999Z", "2026-10-31"),
        ("2026-11-01T04:00:00Z", "2026-11-01"),
        ("2026-11-01T05:30:00Z", "2026-11-01"),
        ("2026-11-01T06:30:00Z", "2026-11-01"),
        ("2026-11-02T04:59:59.999999Z", "2026-11-01"),
        ("2026-11-02T05:00:00Z", "2026-11-02"),
        ("2026-11-28T04:30:00Z", "2026-11-27"),
        ("2026-11-28T05:00:00Z", "2026-11-28"),
    ],
)
def test_billing_day_in_new_york(instant: str, day: str) -> None:
    assert day_at(NEW_YORK, instant) == day


@pytest.mark.parametrize(
    ("zone", "instant", "day"),
    [
        # Kathmandu is +05:45: midnight falls at 18:15Z.
        ("Asia/Kathmandu", "2026-03-15T18:14:59.999999Z", "2026-03-15"),
        ("Asia/Kathmandu", "2026-03-15T18:15:00Z", "2026-03-16"),
        # Lord Howe is +11:00 in (southern) summer, +10:30 in winter.
        ("Australia/Lord_Howe", "2026-03-15T12:59:59.999999Z", "2026-03-15"),
        ("Australia/Lord_Howe", "2026-03-15T13:00:00Z", "2026-03-16"),
        ("Australia/Lord_Howe", "2026-06-15T13:29:59.999999Z", "2026-06-15"),
        ("Australia/Lord_Howe", "2026-06-15T13:30:00Z", "2026-06-16"),
    ],
)
def test_billing_day_in_odd_offset_zones(zone: str, instant: str, day: str) -> None:
    assert day_at(make_rules(zone=zone), instant) == day


def test_decoded_pulse_gets_the_new_york_day() -> None:
    now = dt.datetime(2026, 11, 28, 5, tzinfo=UTC)
    p = accept(encode(pulse(timestamp="2026-11-28T04:30:00Z")), rules=NEW_YORK, now=now)
    assert p.day == "2026-11-27"
    # Without a timestamp the day is that of the moment received, in the zone.
    received = dt.datetime(2026, 11, 28, 4, 30, tzinfo=UTC)
    assert accept(encode(pulse()), rules=NEW_YORK, now=received).day == "2026-11-27"


def test_per_tenant_zones_override_the_default() -> None:
    rules = make_rules(tenants={"ny": "America/New_York", "ktm": "Asia/Kathmandu"})
    now = dt.datetime(2026, 11, 28, 5, tzinfo=UTC)
    body = encode(
        [pulse(tenant_id=t, timestamp="2026-11-28T04:30:00Z") for t in ("ny", "ktm", "other")]
    )
    days = [p.day for _, p in decode(body, rules=rules, now=now).pulses]
    assert days == ["2026-11-27", "2026-11-28", "2026-11-28"]
    late_evening = "2026-11-27T19:00:00Z"  # 00:45 next day in Kathmandu, 14:00 in NY
    assert day_at(rules, late_evening, "ktm") == "2026-11-28"
    assert day_at(rules, late_evening, "ny") == "2026-11-27"
    assert day_at(rules, late_evening, "other") == "2026-11-27"


def test_tenant_override_back_to_utc_from_a_zoned_default() -> None:
    rules = make_rules(zone="America/New_York", tenants={"u": "UTC"})
    assert day_at(rules, "2026-11-28T04:30:00Z", "u") == "2026-11-28"
    assert day_at(rules, "2026-11-28T04:30:00Z", "x") == "2026-11-27"


DAY_ZONES = [
    "UTC",
    "America/New_York",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
    "America/St_Johns",
    "Asia/Kolkata",
    "Europe/London",
    "Pacific/Kiritimati",
    "America/Santiago",
]
MANY_ZONES = make_rules(tenants={zone: zone for zone in DAY_ZONES})


@settings(max_examples=300)
@given(
    st.sampled_from(DAY_ZONES),
    st.integers(
        min_value=us(dt.datetime(2000, 1, 1, tzinfo=UTC)),
        max_value=us(dt.datetime(2100, 1, 1, tzinfo=UTC)),
    ),
)
def test_day_of_matches_astimezone(zone: str, ts: int) -> None:
    moment = EPOCH + dt.timedelta(microseconds=ts)
    expected = moment.astimezone(zoneinfo.ZoneInfo(zone)).date().isoformat()
    # Twice: the second answer comes from the slot cache.
    assert MANY_ZONES.day_of(zone, ts) == expected
    assert MANY_ZONES.day_of(zone, ts) == expected


@pytest.mark.parametrize("zone", DAY_ZONES)
def test_day_of_at_every_local_midnight_of_2026(zone: str) -> None:
    tz = zoneinfo.ZoneInfo(zone)
    rules = make_rules(zone=zone)
    day = dt.date(2025, 12, 31)
    while day < dt.date(2027, 1, 2):
        midnight = dt.datetime(day.year, day.month, day.day, tzinfo=tz)
        edge = us(midnight)
        for ts in (edge - 1, edge, edge + 1, edge + 15 * 60 * 10**6 - 1):
            moment = EPOCH + dt.timedelta(microseconds=ts)
            assert rules.day_of("any", ts) == moment.astimezone(tz).date().isoformat()
        day += dt.timedelta(days=1)


# --- fingerprints ------------------------------------------------------------------

BASE = {
    "tenant_id": "t1",
    "product_sku": "sku1",
    "use_unit": "api_call",
    "id": "p-1",
    "timestamp": "2026-03-15T10:00:00Z",
}


def replay(body: bytes) -> Pulse:
    """The pulse of `body`, which has a client id: intake leaves its digest to the
    stores, which compare a replay with the pulse itself (`same_payload`), or
    with the digest an earlier version kept (`payload_digest`)."""
    p = accept(body)
    assert p.client_id is True
    assert p.fingerprint == b""
    return p


def test_a_payload_is_the_same_however_it_is_written() -> None:
    reference = replay(with_number(BASE, "1.5"))
    spellings = [
        encode({**BASE, "used_amount": "1.50"}),
        encode({**BASE, "used_amount": "1.5"}),
        with_number(BASE, "1.500000000000"),
        with_number(BASE, "15e-1"),
        encode({**BASE, "used_amount": "1.5", "timestamp": "2026-03-15T15:45:00+05:45"}),
        encode({**BASE, "used_amount": 1.5, "timestamp": "2026-03-15T05:00:00-05:00"}),
        encode({**BASE, "used_amount": 1.5, "timestamp": "2026-03-15T10:00:00.000000+00:00"}),
        encode(dict(reversed(list({**BASE, "used_amount": "1.5"}.items())))),
        b'{ "used_amount" : 1.5 ,\n' + encode(BASE)[1:],
    ]
    for body in spellings:
        p = replay(body)
        assert same_payload(reference, p), body
        assert same_payload(payload_digest(reference), p), body
        assert payload_digest(p) == payload_digest(reference), body


@pytest.mark.parametrize(
    "change",
    [
        {"product_sku": "sku2"},
        {"use_unit": "api_calls"},
        {"used_amount": "1.500000001"},
        {"used_amount": "15"},
        {"timestamp": "2026-03-15T10:00:00.000001Z"},
        {"timestamp": "2026-03-15T10:00:00+01:00"},
        {"timestamp": DROP},
    ],
)
def test_a_payload_differs_when_a_field_does(change: dict[str, object]) -> None:
    reference = replay(encode({**BASE, "used_amount": "1.5"}))
    changed = {k: v for k, v in {**BASE, "used_amount": "1.5", **change}.items() if v is not DROP}
    p = replay(encode(changed))
    assert not same_payload(reference, p)
    assert not same_payload(p, reference)
    assert not same_payload(payload_digest(reference), p)
    assert payload_digest(p) != payload_digest(reference)


def test_a_replay_without_a_timestamp_is_the_same_payload_received_later() -> None:
    without = {k: v for k, v in BASE.items() if k != "timestamp"}
    body = encode({**without, "used_amount": "1.5"})
    first = decode(body, now=NOW).pulses[0][1]
    later = decode(body, now=NOW + dt.timedelta(hours=1)).pulses[0][1]
    assert first.ts != later.ts
    assert same_payload(first, later)
    # The moment it was received is no timestamp of the client's.
    received = (EPOCH + first.ts * MICRO).isoformat()
    stamped = replay(encode({**without, "used_amount": "1.5", "timestamp": received}))
    assert stamped.ts == first.ts
    assert not same_payload(first, stamped)
    assert not same_payload(stamped, first)


def test_pulses_are_grouped_by_tenant_in_request_order() -> None:
    body = encode(
        [
            pulse(tenant_id="a", used_amount=1),
            pulse(tenant_id="b", used_amount=2),
            pulse(tenant_id="a", used_amount=3),
            pulse(tenant_id="b", used_amount=-1),  # rejected: in neither group
            pulse(tenant_id="b", used_amount=5),
        ]
    )
    intake = decode(body)
    grouped = {
        tenant: (intake.indexes(tenant), [p.nanos // 10**9 for p in pulses])
        for tenant, pulses in intake.tenants.items()
    }
    assert grouped == {"a": ([0, 2], [1, 3]), "b": ([1, 4], [2, 5])}
    assert [index for index, _ in intake.pulses] == [0, 1, 2, 4]
    assert [item.index for item in intake.items] == [3]


@pytest.mark.parametrize("kind", [JSON, NDJSON])
def test_indexes_pass_over_both_kinds_of_rejected_pulse(kind: str) -> None:
    """Where each valid pulse is in the request, once some pulse did not decode
    (index 1: no amount) and another decoded but is not valid (index 3)."""
    pulses = [
        pulse(tenant_id="a", used_amount=1),
        pulse(tenant_id="b", used_amount=DROP),
        pulse(tenant_id="b", used_amount=2),
        pulse(tenant_id="a", used_amount=-1),
        pulse(tenant_id="a", used_amount=4),
    ]
    body = encode(pulses) if kind == JSON else b"\n".join(encode(p) for p in pulses)
    intake = decode(body, kind)
    assert [(item.index, item.status) for item in intake.items] == [
        (1, "rejected"),
        (3, "rejected"),
    ]
    assert {tenant: intake.indexes(tenant) for tenant in intake.tenants} == {
        "a": [0, 4],
        "b": [2],
    }
    assert [(i, p.nanos // 10**9) for i, p in intake.pulses] == [(0, 1), (2, 2), (4, 4)]
    assert intake.indexes("nobody") == []


def test_pulses_share_one_str_per_name_across_requests() -> None:
    rules = make_rules()
    first = decode(encode([pulse(), pulse(used_amount=2)]), rules=rules).pulses
    second = decode(encode(pulse(used_amount=3)), rules=rules).pulses
    pulses = [p for _, p in first + second]
    for field in ("tenant_id", "product_sku", "use_unit"):
        assert len({id(getattr(p, field)) for p in pulses}) == 1, field


def test_shared_names_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ingestor.intake._NAMES_MAX", 8)
    rules = make_rules()
    decode(encode([pulse(tenant_id=f"t{n}") for n in range(20)]), rules=rules)
    assert len(rules.names) == 22  # 20 tenants, a SKU and a unit
    [(_, p)] = decode(encode(pulse(tenant_id="t3")), rules=rules).pulses
    assert sorted(rules.names) == ["api_call", "sku1", "t3"]  # the next request began anew
    assert (p.tenant_id, p.product_sku, p.use_unit) == ("t3", "sku1", "api_call")


def test_the_digest_is_the_one_stores_already_hold() -> None:
    """Stores of earlier versions kept a digest of the payload of each id they saw:
    a replay sent after an upgrade must give the same bytes, so the recipe may
    never change."""
    ts = us(dt.datetime(2026, 3, 15, 10, tzinfo=UTC))
    recipe = f"sku1\x00api_call\x00{1_500_000_000}\x00{ts}".encode()
    assert payload_digest(replay(encode({**BASE, "used_amount": "1.5"}))) == (
        hashlib.blake2b(recipe, digest_size=16).digest()
    )
    without = {k: v for k, v in BASE.items() if k != "timestamp"}
    recipe = f"sku1\x00api_call\x00{1_500_000_000}\x00None".encode()
    assert payload_digest(replay(encode({**without, "used_amount": "1.5"}))) == (
        hashlib.blake2b(recipe, digest_size=16).digest()
    )


def test_an_id_of_the_kind_the_store_assigns_is_refused_as_a_client_id() -> None:
    """An id `srv-<this store>-...` names a pulse the store keeps without a
    client id: taken from a client, two pulses had one id in GET /pulses. Ids
    of another store, or merely beginning with srv-, are the client's own."""
    rules = Rules(
        late_window_s=LATE.total_seconds(),
        future_skew_s=SKEW.total_seconds(),
        max_batch=100,
        store_id="71c6bea67204",
    )
    item = reject(encode(pulse(id="srv-71c6bea67204-1-0")), rules)
    assert item.id == "srv-71c6bea67204-1-0"
    assert "srv-71c6bea67204-" in (item.error or "")
    # The forms of releases before, which the pulses they stored keep: a
    # process's 12 hex, a request's count in hex, the index; 12 hex a pulse.
    for before in ("srv-0a1b2c3d4e5f07-3", "srv-0a1b2c3d4e5f1a-0", "srv-0a1b2c3d4e5f"):
        assert reject(encode(pulse(id=before)), rules).id == before
        assert reject(encode(pulse(id=before))).id == before  # whatever the store
    for own in ("srv-0123456789ab-1-0", "srv-71C6BEA67204-1-0", "srv-east-1", "srv-"):
        assert accept(encode(pulse(id=own)), rules=rules).pulse_id == own
    assert accept(encode(pulse(id="srv-71c6bea67204-1-0"))).client_id  # no store: no such ids
    many = decode(encode([pulse(id="a"), pulse(id="srv-71c6bea67204-9"), pulse()]), rules=rules)
    assert [i for i, _ in many.pulses] == [0, 2]
    assert [(item.index, item.status) for item in many.items] == [(1, "rejected")]
