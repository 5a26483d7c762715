"""Adversarial tests of the amount path: wire text -> nano-units -> sums -> answers.

DESIGN §3.3 and §4: `used_amount` is a JSON number or a decimal string, >= 0,
finite, at most 9 fractional and 18 integer digits; sums are exact. Every
decoding path intake can take (the raw-amount `PulseInText`, the plain
`PulseInPlain`, the strict `PulseIn` that a backslash escape anywhere in the
body forces), in every body shape, must decide each amount alike, and as the
rule does.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterator
from decimal import Decimal, localcontext
from typing import Any

import msgspec
import psycopg
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quart.typing import TestClientProtocol as Client

from ingestor import money
from ingestor.errors import RequestError
from ingestor.intake import Intake, Rules, decode_pulses
from ingestor.money import KNOWN_NANOS, format_nanos, parse_nanos, to_nanos
from ingestor.runtime import Runtime
from ingestor.sinks.memory import MemorySink

NOW = 1_795_000_000_000_000
RULES = Rules(late_window_s=35 * 86400, future_skew_s=300, max_batch=10_000)
JSON = "application/json"
NDJSON = "application/x-ndjson"
LIMIT = 10**18
SHORTEST = re.compile(r"(0|[1-9][0-9]*)(\.[0-9]*[1-9])?")  # how every answer shows an amount

# Names that decode to the same strings, written plainly or with a backslash
# escape; the escape makes intake take the strict `PulseIn` path.
PLAIN_HEAD = '"tenant_id":"t1","product_sku":"s","use_unit":"u"'
ESCAPED_HEAD = '"tenant_id":"t1","product_sku":"\\u0073","use_unit":"u"'
SHAPES = ("single", "array", "ndjson")


# -- helpers -------------------------------------------------------------------


def obj(amount_fields: str, *, strict: bool) -> str:
    """A pulse object whose amount part is the raw JSON `amount_fields`."""
    return "{" + (ESCAPED_HEAD if strict else PLAIN_HEAD) + "," + amount_fields + "}"


def body_of(text: str, shape: str) -> tuple[bytes, str]:
    if shape == "single":
        return text.encode(), JSON
    if shape == "array":
        return f"[{text}]".encode(), JSON
    return f"{text}\n".encode(), NDJSON


def one_verdict(intake: Intake) -> tuple[str, object]:
    """("ok", nanos) or ("rejected", error) of a one-pulse request."""
    assert intake.total == 1
    if intake.pulses:
        [(_, p)] = intake.pulses
        assert not intake.items
        return "ok", p.nanos
    [item] = intake.items
    assert item.status == "rejected"
    return "rejected", item.error


def every_path(amount_fields: str) -> dict[tuple[str, bool], tuple[str, object]]:
    """The verdict on one pulse carrying `amount_fields`, by (shape, strict)."""
    found = {}
    for strict in (False, True):
        for shape in SHAPES:
            body, content_type = body_of(obj(amount_fields, strict=strict), shape)
            found[(shape, strict)] = one_verdict(decode_pulses(body, content_type, RULES, NOW))
    return found


def rule(value: Decimal | None) -> int | None:
    """The documented rule, computed independently: nano-units, or None if refused."""
    if value is None or not value.is_finite() or value < 0 or value >= LIMIT:
        return None
    _, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    coefficient = int("".join(map(str, digits)))
    if coefficient == 0:
        return 0
    shift = exponent + 9
    if shift >= 0:
        scaled: int = coefficient * 10**shift
        return scaled
    if -shift > len(digits):  # a nonzero coefficient has fewer zeros than that
        return None
    div, rest = divmod(coefficient, 10**-shift)
    return None if rest else div


def json_number_value(token: str) -> Decimal:
    value = json.loads(token, parse_float=Decimal, parse_int=Decimal)
    assert isinstance(value, Decimal)
    return value


def _not_a_number(name: str) -> Decimal:
    raise ValueError(name)


def decimal_string_value(text: str) -> Decimal | None:
    """A decimal string's value, or None: the text of a JSON number and nothing else."""
    if text != text.strip(" \t\r\n"):  # JSON's whitespace, which json.loads skips
        return None
    try:
        value = json.loads(
            text, parse_float=Decimal, parse_int=Decimal, parse_constant=_not_a_number
        )
    except ValueError:
        return None
    return value if isinstance(value, Decimal) else None


def assert_decided_as(amount_fields: str, expected: int | None) -> None:
    verdicts = every_path(amount_fields)
    for path, (status, detail) in verdicts.items():
        if expected is None:
            assert status == "rejected", (path, amount_fields, detail)
            assert "used_amount" in str(detail), (path, detail)
        else:
            assert (status, detail) == ("ok", expected), (path, amount_fields)


@pytest.fixture
def fresh_cache() -> Iterator[None]:
    """An empty KNOWN_NANOS (a cache: emptying it must change no answer), restored after."""
    saved = dict(KNOWN_NANOS)
    KNOWN_NANOS.clear()
    try:
        yield
    finally:
        KNOWN_NANOS.clear()
        KNOWN_NANOS.update(saved)


# -- every path decides as the rule does ---------------------------------------


@st.composite
def json_numbers(draw: st.DrawFn) -> str:
    """JSON number tokens: signs, zeros, fractions, trailing zeros, exponents."""
    sign = draw(st.sampled_from(["", "", "-"]))
    whole = draw(
        st.one_of(
            st.just("0"),
            st.integers(1, 10**20).map(str),
            st.sampled_from(["999999999999999999", "1000000000000000000"]),
        )
    )
    frac = draw(st.one_of(st.just(""), st.text("0123456789", min_size=1, max_size=14)))
    exp = draw(
        st.one_of(
            st.just(""),
            st.builds(
                lambda e, s, n: f"{e}{s}{n}",
                st.sampled_from(["e", "E"]),
                st.sampled_from(["", "+", "-"]),
                st.one_of(
                    st.integers(0, 30),
                    st.sampled_from([400, 999999999, 1000000000]),
                ),
            ),
        )
    )
    return f"{sign}{whole}{'.' + frac if frac else ''}{exp}"


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(token=json_numbers())
def test_json_numbers_are_decided_by_the_rule_on_every_path(token: str) -> None:
    assert_decided_as(f'"used_amount":{token}', rule(json_number_value(token)))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.one_of(
        json_numbers(),
        st.text("0123456789.eE+-", max_size=24),
        st.sampled_from(["NaN", "-NaN", "sNaN", "Infinity", "-Inf", "inf", "nan", "-0"]),
    )
)
def test_ascii_decimal_strings_are_decided_by_the_rule_on_every_path(text: str) -> None:
    assert_decided_as(f'"used_amount":{json.dumps(text)}', rule(decimal_string_value(text)))


@pytest.mark.parametrize(
    ("token", "nanos"),
    [
        ("1e-9", 1),
        ("1E2", 100 * 10**9),
        ("1.5e+3", 1500 * 10**9),
        ("0e0", 0),
        ("-0", 0),
        ("-0.0", 0),
        ('"-0"', 0),
        ('"-0.000"', 0),
        ("0e-999999999", 0),
        ("0E+999999999", 0),
        ('"0E+999999999"', 0),
        ("999999999999999999.999999999", 10**27 - 1),
        ('"9.99999999999999999999999999E+17"', 10**27 - 1),
        ("999999999999999999999999999e-9", 10**27 - 1),
        ('"1.0000000000"', 10**9),  # value 1: trailing zeros past the ninth place are no digits
        ('"1E-9"', 1),
        ("18446744073709551616", None),
        ("1e18", None),
        ("1e-10", None),
        ("1e999999999", None),
        ('"1e999999999"', None),
        ("1e-999999999", None),
        ('"1e-999999999"', None),
        ("999999999999999999.9999999991", None),
        ('"1e99999999999999999999"', None),  # past Decimal's exponent range
        ("true", None),
        ("false", None),
        ("null", None),
        ("[1]", None),
        ('{"v":1}', None),
    ],
)
def test_amount_edges_on_every_path(token: str, nanos: int | None) -> None:
    assert_decided_as(f'"used_amount":{token}', nanos)


@pytest.mark.parametrize(
    "token", ["007", "+1", ".5", "1.", "01.5", "1e", "1_000", "NaN", "Infinity", "-", "0x10"]
)
@pytest.mark.parametrize("strict", [False, True])
def test_invalid_json_number_tokens_are_never_amounts(token: str, strict: bool) -> None:
    text = obj(f'"used_amount":{token}', strict=strict)
    for shape in ("single", "array"):
        with pytest.raises(RequestError) as caught:
            decode_pulses(*body_of(text, shape), RULES, NOW)
        assert caught.value.status == 400
    status, error = one_verdict(decode_pulses(*body_of(text, "ndjson"), RULES, NOW))
    assert (status, error) == ("rejected", "not valid JSON")


@pytest.mark.parametrize(
    "text",
    [
        "\u0661\u0662",  # Arabic-Indic 12, which Decimal reads as 12
        "\uff11",  # a full-width 1
        "1_000",
        " 1",
        "1 ",
        "\t1",
        "+1",
        ".5",
        "1.",
        "007",
        "0x10",
        "1e",
        "",
    ],
)
def test_a_decimal_string_is_the_text_of_a_json_number_and_nothing_else(text: str) -> None:
    """Python's Decimal reads every one of these; a billing API's client means none."""
    assert_decided_as(f'"used_amount":{json.dumps(text)}', None)
    assert_decided_as(f'"used_amount":{json.dumps(text, ensure_ascii=False)}', None)
    assert fresh(text) == "used_amount: Invalid decimal string"


@pytest.mark.parametrize("text", ["NaN", "-Infinity", "sNaN", "inf"])
def test_a_string_decimal_reads_as_not_finite_is_refused_as_such(text: str) -> None:
    assert fresh(text) == "used_amount must be a finite number"
    assert_decided_as(f'"used_amount":{json.dumps(text)}', None)


@pytest.mark.parametrize(
    ("fields", "nanos"),
    [
        ('"used_amount":"abc","used_amount":5', 5 * 10**9),
        ('"used_amount":true,"used_amount":"2.5"', 2_500_000_000),
        ('"used_amount":[1,{}],"used_amount":7', 7 * 10**9),
        ('"used_amount":0.5,"used_amount":"abc"', None),
        ('"used_amount":5,"used_amount":null', None),
        ('"used_amount":5,"used_amount":1.0000000001', None),
    ],
)
def test_an_amount_written_twice_is_its_last_value_on_every_path(
    fields: str, nanos: int | None
) -> None:
    """msgspec keeps the last of a key written twice. The strict path decoded the
    amount as a Decimal, refusing an invalid first value as it parsed it: a
    backslash anywhere else in the body turned a billed pulse into a rejected one."""
    assert_decided_as(fields, nanos)


@pytest.mark.parametrize(
    ("token", "kind"),
    [("true", "bool"), ("false", "bool"), ("null", "null"), ("[]", "array"), ('{"a":1}', "object")],
)
def test_an_amount_that_is_not_a_number_says_what_it_is_on_every_path(
    token: str, kind: str
) -> None:
    for path, verdict in every_path(f'"used_amount":{token}').items():
        assert verdict == ("rejected", f"used_amount: Expected `decimal`, got `{kind}`"), path


def test_an_amount_is_read_without_the_whitespace_around_it(fresh_cache: None) -> None:
    assert_decided_as('"used_amount" :  2.5 \t', 2_500_000_000)
    assert_decided_as('"used_amount":\t"2.5"  ', 2_500_000_000)
    assert b"2.5" in KNOWN_NANOS  # the Raw's bytes: the number alone


@pytest.mark.parametrize("strict", [False, True])
def test_an_amount_nested_past_the_recursion_limit_is_a_400_not_a_500(strict: bool) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    text = obj(f'"used_amount":{deep}', strict=strict)
    for shape in ("single", "array"):
        with pytest.raises(RequestError) as caught:
            decode_pulses(*body_of(text, shape), RULES, NOW)
        assert (caught.value.status, caught.value.code) == (400, "invalid_json"), shape
        assert "nested too deeply" in caught.value.message
    status, error = one_verdict(decode_pulses(*body_of(text, "ndjson"), RULES, NOW))
    assert status == "rejected"
    assert "nested too deeply" in str(error)


def test_raw_amounts_are_remembered_by_their_bytes(fresh_cache: None) -> None:
    assert to_nanos(msgspec.json.decode(b"2.50", type=msgspec.Raw)) == 2_500_000_000
    assert to_nanos(msgspec.json.decode(b'"2.5"', type=msgspec.Raw)) == 2_500_000_000
    assert to_nanos(msgspec.json.decode(b'"\\u0032"', type=msgspec.Raw)) == 2 * 10**9
    assert KNOWN_NANOS[b"2.50"] == KNOWN_NANOS[b'"2.5"'] == KNOWN_NANOS["2.5"] == 2_500_000_000
    with pytest.raises(ValueError, match="Invalid decimal string"):
        to_nanos(msgspec.json.decode(b'"\\u0661"', type=msgspec.Raw))
    with pytest.raises(ValueError, match="18 integer digits"):
        to_nanos(msgspec.json.decode(b"1" + b"0" * 5000, type=msgspec.Raw))


# -- the KNOWN_NANOS cache -------------------------------------------------------


def fresh(amount: Decimal | int | str) -> int | str:
    """What `to_nanos` answers for `amount` with nothing remembered."""
    saved = dict(KNOWN_NANOS)
    KNOWN_NANOS.clear()
    try:
        return to_nanos(amount)
    except ValueError as exc:
        return str(exc)
    finally:
        KNOWN_NANOS.clear()
        KNOWN_NANOS.update(saved)


def remembered(amount: Decimal | int | str) -> int | str:
    try:
        return to_nanos(amount)
    except ValueError as exc:
        return str(exc)


SPELLINGS = st.one_of(
    st.integers(-5, 10**19),
    st.sampled_from(["1", "1.0", "1.00000000000", "1.0000000001", "-0", "1E0", "1e0", "+1"]),
    st.text("0123456789.eE-", max_size=12),
    st.decimals(allow_nan=True, allow_infinity=True, places=None),
    st.sampled_from([Decimal("1"), Decimal("1.0000000001"), Decimal("-0"), Decimal("sNaN")]),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(SPELLINGS, min_size=1, max_size=12))
def test_cache_never_changes_an_answer_whatever_came_before(
    fresh_cache: None, sequence: list[Decimal | int | str]
) -> None:
    for amount in sequence + sequence[::-1]:
        assert remembered(amount) == fresh(amount), amount


def test_cache_keys_of_int_str_and_decimal_spellings(fresh_cache: None) -> None:
    assert to_nanos(1) == to_nanos("1") == to_nanos(Decimal("1")) == 10**9
    assert to_nanos("1.0") == 10**9
    for refused in ("1.0000000001", Decimal("1.0000000001"), "-1", -1, "1e18", 10**18):
        with pytest.raises(ValueError, match="used_amount"):
            to_nanos(refused)
    assert all(not isinstance(key, bool) for key in KNOWN_NANOS)
    assert set(KNOWN_NANOS.values()) == {10**9}  # failures are never remembered


def test_cached_amount_does_not_leak_into_a_finer_spelling_through_intake(
    fresh_cache: None,
) -> None:
    for first, then in (('"1.0"', '"1.00000000001"'), ("1", "1.0000000001"), ('"7"', '"7.5e-10"')):
        body = obj(f'"used_amount":{first}', strict=False).encode()
        assert one_verdict(decode_pulses(body, JSON, RULES, NOW))[0] == "ok"
        assert_decided_as(f'"used_amount":{then}', None)


def test_cache_stays_bounded(fresh_cache: None) -> None:
    for n in range(money._KNOWN_MAX + 50):
        to_nanos(str(n))
        to_nanos(n)
    assert len(KNOWN_NANOS) <= money._KNOWN_MAX
    assert to_nanos(str(10**6 + 7)) == (10**6 + 7) * 10**9  # past the bound: still converts


# -- text forms ------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=10**32))
def test_format_parse_far_past_64_bits(nanos: int) -> None:
    text = format_nanos(nanos)
    assert SHORTEST.fullmatch(text)
    assert parse_nanos(text) == nanos
    with localcontext() as ctx:
        ctx.prec = 100
        assert Decimal(text) == Decimal(nanos).scaleb(-9)


# -- from the HTTP body to the delivered batch, in both stores ----------------------

ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(params=["sqlite", "postgres"])
def settings_overrides(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    if request.param == "sqlite":
        yield {}
        return
    try:
        admin = psycopg.connect(ADMIN_URL, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as exc:
        message = f"PostgreSQL is not reachable at {ADMIN_URL}: {exc}"
        if os.environ.get("CI"):  # a green CI run must have tested PostgreSQL
            pytest.fail(message)
        pytest.skip(message)
    schema = f"amounts_{secrets.token_hex(6)}"
    with admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            glue = "&" if "?" in ADMIN_URL else "?"
            yield {"store": f"{ADMIN_URL}{glue}options=-csearch_path%3D{schema}"}
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


BIG = "999999999999999999.999999999"
# (raw JSON amount, accepted?)
FIRST = [
    (f'"{BIG}"', True),
    (BIG, True),
    (f'"{BIG}"', True),
    ("1e-9", True),
    ('"1E-9"', True),
    ("0", True),
    ("-0", True),
    ('"-0.0"', True),
    ('"0.100000000"', True),
    ("12.5E-1", True),
    ("1e17", True),
    ('"1e-10"', False),
    ("-1", False),
    ('"NaN"', False),
    ("1e18", False),
    ("true", False),
]
SECOND = [(f'"{BIG}"', True), ("0.000000001", True), ('"3.3"', True), ('"-0.5"', False)]


async def post_amounts(client: Client, amounts: list[tuple[str, bool]], tag: str) -> Decimal:
    """POST one pulse per amount; check the report; the exact sum of those accepted."""
    texts = [
        obj(f'"used_amount":{a},"id":"{tag}{i}"', strict=False) for i, (a, _) in enumerate(amounts)
    ]
    response = await client.post(
        "/pulses", data=("[" + ",".join(texts) + "]").encode(), headers={"Content-Type": JSON}
    )
    assert response.status_code == 202
    report = await response.get_json()
    refused = {item["index"] for item in report["items"] if item["status"] == "rejected"}
    assert refused == {i for i, (_, ok) in enumerate(amounts) if not ok}
    assert report["accepted"] == len(amounts) - len(refused)
    with localcontext() as ctx:
        ctx.prec = 100
        return sum((json_number_value(a.strip('"')) for a, ok in amounts if ok), Decimal(0))


async def test_amounts_are_exact_from_body_to_delivered_batch(
    client: Client, runtime: Runtime, sink: MemorySink
) -> None:
    day = "2026-11-28"
    first = await post_amounts(client, FIRST, "a")
    assert first * 10**9 > 2**64  # the bucket's nano-units are past 64 bits
    [bucket] = (await (await client.get("/aggregates")).get_json())["aggregates"]
    assert bucket["used_amount"] == format_nanos(int(first * 10**9))
    assert SHORTEST.fullmatch(bucket["used_amount"])

    pulses = (await (await client.get(f"/pulses?tenant_id=t1&date={day}")).get_json())["pulses"]
    shown = {p["id"]: p["used_amount"] for p in pulses}
    for i, (amount, ok) in enumerate(FIRST):
        if ok:
            assert SHORTEST.fullmatch(shown[f"a{i}"]), shown[f"a{i}"]
            assert Decimal(shown[f"a{i}"]) == json_number_value(amount.strip('"'))
        else:
            assert f"a{i}" not in shown

    commits = [await client.post("/aggregates/commit", json={"date": day})]
    second = await post_amounts(client, SECOND, "b")
    commits.append(await client.post("/aggregates/commit", json={"date": day}))
    summaries = [s for c in commits for s in (await c.get_json())["batches"]]
    assert [s["kind"] for s in summaries] == ["initial", "correction"]

    total = first + second
    records = []
    for s, delta in zip(summaries, (first, second), strict=True):
        view = await (await client.get(f"/batches/{s['batch_id']}")).get_json()
        assert view["used_amount"] == s["used_amount"] == format_nanos(int(delta * 10**9))
        [record] = view["records"]
        records.append(record)
        assert record["used_amount"] == view["used_amount"]
        for field in ("used_amount", "total_amount"):
            assert SHORTEST.fullmatch(record[field])
    assert Decimal(records[0]["total_amount"]) == first
    assert Decimal(records[1]["total_amount"]) == total
    assert parse_nanos(records[0]["used_amount"]) + parse_nanos(records[1]["used_amount"]) == (
        parse_nanos(records[1]["total_amount"])
    )
    [bucket] = (await (await client.get("/aggregates")).get_json())["aggregates"]
    assert bucket["used_amount"] == bucket["committed_amount"] == records[1]["total_amount"]
    assert bucket["revision"] == 2

    with trio.fail_after(5):
        await runtime.deliverer.deliver_due()
    for s in summaries:
        delivered = json.loads(sink.delivered[s["batch_id"]])
        assert delivered["used_amount"] == s["used_amount"]
        assert [r["total_amount"] for r in delivered["records"]] in (
            [records[0]["total_amount"]],
            [records[1]["total_amount"]],
        )
