"""Billing days (DESIGN §2): the slot cache of `Rules.day_of`, per-tenant zones,
local midnights, DST days, and where a day ends for the committer.

The zone scans cover every zone of the installed tz database, from the late
window before 2026-11-28 to a year after: each DST change of a year.
"""

from __future__ import annotations

import datetime as dt
import json
import zoneinfo
from collections.abc import Iterator

import pytest

from ingestor.clock import epoch_us
from ingestor.committer import day_closes_at
from ingestor.config import load_settings
from ingestor.intake import Intake, Rules, decode_pulses

UTC = dt.UTC
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
US = dt.timedelta(microseconds=1)
SLOT = dt.timedelta(minutes=15)
LATE = dt.timedelta(days=35)
NOW = dt.datetime(2026, 11, 28, 12, tzinfo=UTC)
ZONES = sorted(zoneinfo.available_timezones())


def rules(
    zone: str = "UTC", tenants: dict[str, str] | None = None, late: dt.timedelta = LATE
) -> Rules:
    return Rules(
        late_window_s=late.total_seconds(),
        future_skew_s=300,
        max_batch=10_000,
        billing_timezone=zone,
        tenant_timezones=tenants,
    )


def truth(moment: dt.datetime, zone: dt.tzinfo) -> str:
    return moment.astimezone(zone).date().isoformat()


def day_at(r: Rules, tenant: str, moment: dt.datetime) -> str:
    return r.day_of(tenant, epoch_us(moment))


def intake(r: Rules, pulses: list[dict[str, object]], now: dt.datetime = NOW) -> Intake:
    return decode_pulses(json.dumps(pulses).encode(), "application/json", r, epoch_us(now))


def pulse(tenant: str = "t1", **fields: object) -> dict[str, object]:
    return {"tenant_id": tenant, "product_sku": "s", "use_unit": "u", "used_amount": 1, **fields}


def transitions(
    zone: dt.tzinfo, start: dt.datetime, end: dt.datetime, step: dt.timedelta
) -> Iterator[tuple[dt.datetime, dt.timedelta, dt.timedelta]]:
    """(instant to the second, offset before, offset after) of each change in [start, end)."""
    at = start
    before = at.astimezone(zone).utcoffset()
    while at < end:
        after = (at + step).astimezone(zone).utcoffset()
        if after != before:
            low, high = at, at + step
            while high - low > dt.timedelta(seconds=1):
                middle = low + (high - low) / 2
                if middle.astimezone(zone).utcoffset() == before:
                    low = middle
                else:
                    high = middle
            assert before is not None
            assert after is not None
            yield high, before, after
            before = after
        at += step


# --- every change of every zone, near now ------------------------------------------


def test_day_of_is_exact_around_every_change_of_every_zone_near_now() -> None:
    now = NOW
    start, end = now - LATE - dt.timedelta(days=1), now + dt.timedelta(days=400)
    r = rules(tenants={name: name for name in ZONES})
    wrong = []
    for name in ZONES:
        zone = zoneinfo.ZoneInfo(name)
        for instant, _, _ in transitions(zone, start, end, dt.timedelta(hours=2)):
            slot = EPOCH + (instant - EPOCH) // SLOT * SLOT
            for moment in (instant - US, instant, instant + US, slot + SLOT - US):
                if day_at(r, name, moment) != truth(moment, zone):
                    wrong.append((name, moment.isoformat()))
    assert wrong == []


def test_a_day_ends_for_the_committer_where_day_of_turns_over_in_every_zone() -> None:
    """`day_closes_at` (the committer's day end) and `day_of` (intake's) agree on
    every day of every zone from the late window back to the next year: 23- and
    25-hour days, midnights skipped or repeated by DST (Santiago, Havana...)."""
    today = NOW.date()
    days = [today + dt.timedelta(days=n) for n in range(-36, 2)]
    disagree = []
    for name in ZONES:
        zone = zoneinfo.ZoneInfo(name)
        r = rules(zone=name)
        near = days + [
            instant.astimezone(zone).date()
            for instant, _, _ in transitions(
                zone,
                dt.datetime.combine(today, dt.time(), UTC),
                dt.datetime.combine(today + dt.timedelta(days=400), dt.time(), UTC),
                dt.timedelta(hours=6),
            )
        ]
        for day in near:
            end = day_closes_at(day, {zone})
            turned = (day_at(r, "x", end - US), day_at(r, "x", end))
            if turned != (day.isoformat(), (day + dt.timedelta(days=1)).isoformat()):
                disagree.append((name, day.isoformat(), turned))
    assert disagree == []


# --- slots that hold a change or a midnight -----------------------------------------

HISTORICAL = [
    # Newfoundland fell back at 00:01 local (NDT -02:30 -> NST -03:30) until 2011:
    # 2010-11-07T02:31Z is 23:01 on 11-06, inside the slot that starts at 00:00 on 11-07.
    ("America/St_Johns", "2010-11-07T02:35:00+00:00", "2010-11-06"),
    # Liberia kept -00:44:30 until 1972: 00:44:40Z is 00:00:10 local.
    ("Africa/Monrovia", "1971-06-01T00:44:40+00:00", "1971-06-01"),
    # Amsterdam time, +00:19:32 in 1937 winter: 23:40:28Z is midnight local.
    ("Europe/Amsterdam", "1937-01-01T23:41:00+00:00", "1937-01-02"),
]


@pytest.mark.parametrize(("zone", "instant", "day"), HISTORICAL)
def test_day_of_is_exact_where_a_zone_left_the_15_minute_slots(
    zone: str, instant: str, day: str
) -> None:
    """Nothing bounds `late_window` (a 100-year window is accepted), and
    `day_of` answers for any timestamp intake lets in; with the slot cache,
    it answers the day of the slot's start."""
    moment = dt.datetime.fromisoformat(instant)
    assert truth(moment, zoneinfo.ZoneInfo(zone)) == day  # what zoneinfo says
    long_window = dt.timedelta(days=365 * 100)
    settings = load_settings(environ={}, late_window="36500d", dedup_window="36500d")
    assert settings.late_window == long_window.total_seconds()  # accepted by config
    r = rules(zone=zone, late=long_window)
    [(_, accepted)] = intake(r, [pulse(timestamp=instant)]).pulses
    assert accepted.day == day


# --- timestamps finer than a microsecond ---------------------------------------------


@pytest.mark.parametrize(
    ("zone", "stamp", "day"),
    [
        ("UTC", "2026-11-27T23:59:59.999999999Z", "2026-11-27"),
        ("UTC", "2026-11-27T23:59:59.9999995Z", "2026-11-27"),
        ("America/New_York", "2026-11-27T23:59:59.999999999-05:00", "2026-11-27"),
        ("Asia/Kathmandu", "2026-11-27T18:14:59.9999999Z", "2026-11-27"),
    ],
)
def test_a_timestamp_just_before_local_midnight_keeps_its_day(
    zone: str, stamp: str, day: str
) -> None:
    """RFC 3339 allows any number of fractional digits (Go's RFC3339Nano writes
    nine; "23:59:59.999999999" is the usual end of a day). The billing day is
    the calendar date of the timestamp (§2): rounding it up to the microsecond
    must not move it to the next day."""
    [(_, p)] = intake(rules(zone=zone), [pulse(timestamp=stamp)]).pulses
    assert p.day == day
    assert p.ts == epoch_us(dt.datetime.fromisoformat(stamp))  # cut to the microsecond


NINES = "2026-11-27T23:59:59.9999999Z"
LAST_US = epoch_us(dt.datetime(2026, 11, 27, 23, 59, 59, 999_999, tzinfo=UTC))


@pytest.mark.parametrize("shape", ["application/json", "application/x-ndjson"])
@pytest.mark.parametrize("bad", [None, {"tenant_id": "t1"}, "not a pulse"])
def test_a_timestamp_is_cut_in_every_body_and_on_every_path(shape: str, bad: object) -> None:
    """Arrays and NDJSON, decoded whole or pulse by pulse (a bad one among
    them), with the nines escaped or not: each cut pulse is the one at its
    index; a whole second written as such, or rounded down to one, stays."""
    escaped = NINES.replace(".", "\\u002e")  # still RFC 3339 once decoded
    pulses: list[object] = [
        pulse(timestamp="2026-11-27T23:59:59Z"),
        pulse(timestamp=NINES),
        pulse(timestamp="2026-11-27T23:59:59.0000001Z"),
        pulse(timestamp="2026-11-27T23:59:59.1234565Z"),
    ]
    if bad is not None:
        pulses.insert(1, bad)
    if shape == "application/json":
        body = json.dumps(pulses).encode()
    else:
        body = "".join(json.dumps(p) + "\n" for p in pulses).encode()
    for text in (body, body.replace(NINES.encode(), escaped.encode())):
        got = decode_pulses(text, shape, rules(), epoch_us(NOW))
        whole = epoch_us(dt.datetime(2026, 11, 27, 23, 59, 59, tzinfo=UTC))
        offset = 0 if bad is None else 1
        assert [(i, p.ts) for i, p in got.pulses] == [
            (0, whole),
            (1 + offset, LAST_US),
            (2 + offset, whole),
            (3 + offset, whole + 123_457),  # rounding within the second stands
        ]
        assert len(got.items) == offset


def test_a_single_pulse_body_is_cut_too() -> None:
    body = json.dumps(pulse(timestamp=NINES)).encode()
    [(_, p)] = decode_pulses(body, "application/json", rules(), epoch_us(NOW)).pulses
    assert (p.ts, p.day) == (LAST_US, "2026-11-27")


def test_amounts_of_nines_leave_timestamps_as_they_are() -> None:
    """A body holding ".999999" elsewhere (an amount) goes through the cut's
    check; its whole-second timestamps are not nines, and stay."""
    stamp = "2026-11-28T00:00:00Z"
    body = [pulse(timestamp=stamp, used_amount="0.9999999"), pulse(timestamp=NINES)]
    got = [(p.ts, p.day) for _, p in intake(rules(), body).pulses]
    assert got == [
        (epoch_us(dt.datetime.fromisoformat(stamp)), "2026-11-28"),
        (LAST_US, "2026-11-27"),
    ]


def test_six_fractional_digits_are_exact_at_midnight() -> None:
    r = rules(zone="America/New_York")
    stamps = ["2026-11-27T23:59:59.999999-05:00", "2026-11-28T00:00:00-05:00"]
    days = [p.day for _, p in intake(r, [pulse(timestamp=s) for s in stamps]).pulses]
    assert days == ["2026-11-27", "2026-11-28"]


# --- midnights, zones, the cache -----------------------------------------------------


def test_a_pulse_at_exactly_local_midnight_belongs_to_the_new_day_however_written() -> None:
    r = rules(tenants={"ny": "America/New_York", "ktm": "Asia/Kathmandu"})
    ny = dt.datetime(2026, 11, 28, tzinfo=zoneinfo.ZoneInfo("America/New_York"))
    ktm = dt.datetime(2026, 11, 28, tzinfo=zoneinfo.ZoneInfo("Asia/Kathmandu"))
    offsets = [dt.timedelta(0), dt.timedelta(hours=14), dt.timedelta(hours=-11, minutes=-30)]
    body = [
        pulse(tenant, timestamp=(at + shift).astimezone(dt.timezone(o)).isoformat())
        for tenant, at in (("ny", ny), ("ktm", ktm))
        for shift in (-US, dt.timedelta(0))
        for o in offsets
    ]
    days = [p.day for _, p in intake(r, body, now=NOW + dt.timedelta(days=1)).pulses]
    assert days == ["2026-11-27"] * 3 + ["2026-11-28"] * 3 + ["2026-11-27"] * 3 + ["2026-11-28"] * 3


@pytest.mark.parametrize("before", [True, False])
def test_pulses_without_timestamp_take_each_tenants_day_at_receipt(before: bool) -> None:
    """Received at New York's midnight (05:00Z), or 1 µs before it: each tenant
    of one request gets the day of the moment received in its own zone."""
    r = rules(zone="America/New_York", tenants={"ktm": "Asia/Kathmandu", "utc": "UTC"})
    now = dt.datetime(2026, 11, 28, 5, tzinfo=UTC) - (US if before else dt.timedelta(0))
    body = [pulse(t) for t in ("ny", "ktm", "utc", "ny", "ktm")]
    got = {p.tenant_id: (p.day, p.ts) for _, p in intake(r, body, now=now).pulses}
    ny_day = "2026-11-27" if before else "2026-11-28"
    assert got == {
        "ny": (ny_day, epoch_us(now)),
        "ktm": ("2026-11-28", epoch_us(now)),
        "utc": ("2026-11-28", epoch_us(now)),
    }


def test_the_cache_of_one_zone_never_answers_for_another() -> None:
    """The same slot, asked first for the default zone, then for tenants of
    other zones (and back): each gets its own zone's day."""
    r = rules(tenants={"ktm": "Asia/Kathmandu", "pago": "Pacific/Pago_Pago", "u": "UTC"})
    moment = dt.datetime(2026, 11, 27, 18, 20, tzinfo=UTC)  # 00:05 on 11-28 in Kathmandu
    assert [day_at(r, t, moment) for t in ("x", "ktm", "pago", "u", "x", "ktm")] == [
        "2026-11-27",
        "2026-11-28",
        "2026-11-27",
        "2026-11-27",
        "2026-11-27",
        "2026-11-28",
    ]
    late = dt.datetime(2026, 11, 28, 11, 5, tzinfo=UTC)  # 00:05 on 11-28 in Pago Pago
    assert day_at(r, "pago", late) == "2026-11-28"
    assert day_at(r, "pago", late - dt.timedelta(minutes=6)) == "2026-11-27"


def test_the_cache_stays_bounded_and_exact_when_it_is_cleared() -> None:
    """Past 100,000 slots a zone's cache is cleared; days asked before, during
    and after stay exact, for tenants that share the zone too."""
    zone = zoneinfo.ZoneInfo("America/New_York")
    r = rules(zone="America/New_York", tenants={"also-ny": "America/New_York"})
    base = epoch_us(dt.datetime(2024, 1, 1, tzinfo=UTC))
    slot_us = 15 * 60 * 1_000_000
    probes = [base + n * 7_919 * slot_us + 1 for n in range(20)]
    for step in range(100_050):
        ts = base + step * slot_us + slot_us - 1
        r.day_of("any" if step % 2 else "also-ny", ts)
    sizes = {len(days) for days in r._days.values()}
    assert max(sizes) <= 100_001
    for ts in probes:
        expected = truth(EPOCH + ts * US, zone)
        assert r.day_of("any", ts) == expected
        assert r.day_of("also-ny", ts) == expected


def test_commit_rule_uses_the_latest_midnight_of_the_zones_in_use() -> None:
    r = rules(tenants={"kiri": "Pacific/Kiritimati", "pago": "Pacific/Pago_Pago"})
    day = dt.date(2026, 11, 27)
    # Kiritimati (+14) is done at 10:00Z on 11-27; Pago Pago (-11) at 11:00Z on 11-28.
    assert day_closes_at(day, r.zones()) == dt.datetime(2026, 11, 28, 11, tzinfo=UTC)
    last = dt.datetime(2026, 11, 28, 11, tzinfo=UTC) - US
    assert day_at(r, "pago", last) == "2026-11-27"
    assert day_at(r, "pago", last + US) == "2026-11-28"
