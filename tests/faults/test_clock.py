"""Scenario 8, clock trouble: midnights, DST changes, zones a day apart, the late window.

The service has no clock to fake from outside, so every timestamp is picked
relative to now, with a late window of 400 days (dedup window the same) so
that the last DST changes of any zone are always inside it. The billing zone
is America/New_York; tenants have their own zones: `kiri` Pacific/Kiritimati
(UTC+14), `pago` Pacific/Pago_Pago (UTC-11), `chile` America/Santiago (whose
DST changes happen at midnight). Kiritimati and Pago Pago are 25 hours apart,
so "now" always straddles a local midnight between them: a day that is over
for `kiri` has not ended for `pago`.

Pulses land 1 µs before, at and 1 µs after: the last two local midnights of
each zone, the last UTC midnight, each zone's last two DST changes (and the
two local midnights of those days, of 23 and 25 hours), and 01:30 twice on
New York's fall-back day. Each case has its own SKU, so GET /aggregates shows
the billing day each one got; every one must be the day zoneinfo gives. The
same instant written with different UTC offsets lands on the same day.

Then the periodic committer (every 0.2 s, grace 1 s) must commit exactly the
days that have ended in every zone in use, and leave the others open; a
late pulse into a committed day becomes a correction (revision 2). At the
late-window edge, 5 s inside is accepted and 1 s outside rejected (422);
at the future-skew edge, 1 s inside is accepted and 5 s outside rejected.
(The server reads its clock a little after the client: the margin on the
side that latency could cross is 5 s, on the other 1 s.) A commit of tomorrow (in the zone furthest
ahead) is 422. In the end the delivered batches add up to every total.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.faults.conftest import Report, StartServer
from tests.faults.harness import ZonedLedger, audit
from tests.support.server import collect_pages, send_pulses, wait_until

NEW_YORK = zoneinfo.ZoneInfo("America/New_York")
TENANT_ZONES = {
    "kiri": zoneinfo.ZoneInfo("Pacific/Kiritimati"),
    "pago": zoneinfo.ZoneInfo("Pacific/Pago_Pago"),
    "chile": zoneinfo.ZoneInfo("America/Santiago"),
}
WINDOW_DAYS = 400
SKEW_S = 300
GRACE_S = 1
US = dt.timedelta(microseconds=1)
CONFIG = f"""
billing_timezone = "America/New_York"
late_window = "{WINDOW_DAYS}d"
dedup_window = "{WINDOW_DAYS}d"
future_skew = {SKEW_S}
commit_grace = {GRACE_S}

[tenant_timezones]
kiri = "Pacific/Kiritimati"
pago = "Pacific/Pago_Pago"
chile = "America/Santiago"
"""


def transitions(zone: dt.tzinfo, start: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
    """The instants (UTC, to the second) where `zone`'s UTC offset changes in [start, end)."""
    found: list[dt.datetime] = []
    hour = dt.timedelta(hours=1)
    moment = start
    while moment < end:
        if moment.astimezone(zone).utcoffset() != (moment + hour).astimezone(zone).utcoffset():
            low, high = moment, moment + hour  # offset(low) != offset(high)
            while high - low > dt.timedelta(seconds=1):
                middle = low + (high - low) / 2
                if middle.astimezone(zone).utcoffset() == low.astimezone(zone).utcoffset():
                    low = middle
                else:
                    high = middle
            found.append(high.replace(microsecond=0))
        moment += hour
    return found


def midnight(day: dt.date, zone: dt.tzinfo) -> dt.datetime:
    """The instant `day` begins in `zone` (its first local moment, even where 00:00 is skipped)."""
    # Where 00:00 is skipped (a DST jump at midnight), zoneinfo reads it with
    # the offset before the jump: the instant of the jump, when the day begins.
    moment = dt.datetime.combine(day, dt.time(), tzinfo=zone).astimezone(dt.UTC)
    assert moment.astimezone(zone).date() == day
    assert (moment - US).astimezone(zone).date() < day
    return moment


def window(now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """Where DST changes are looked for: well inside the late window, days before now."""
    return now - dt.timedelta(days=WINDOW_DAYS - 5), now - dt.timedelta(days=3)


def offset(moment: dt.datetime, zone: dt.tzinfo) -> dt.timedelta:
    found = moment.astimezone(zone).utcoffset()
    assert found is not None
    return found


def _stamp(moment: dt.datetime, offset_minutes: int = 0) -> str:
    zone = dt.timezone(dt.timedelta(minutes=offset_minutes))
    return moment.astimezone(zone).isoformat().replace("+00:00", "Z")


class Cases:
    """One pulse per case, each with its own SKU and id, around one instant."""

    def __init__(self) -> None:
        self.pulses: list[dict[str, Any]] = []

    def around(self, tenant: str, name: str, moment: dt.datetime) -> None:
        for label, at in (("before", moment - US), ("at", moment), ("after", moment + US)):
            self.add(tenant, f"{name}-{label}", at)

    def add(self, tenant: str, sku: str, moment: dt.datetime, offset_minutes: int = 0) -> None:
        number = len(self.pulses)
        self.pulses.append(
            {
                "tenant_id": tenant,
                "product_sku": sku,
                "use_unit": "api_call",
                "used_amount": f"{number + 1}.{number:09d}",
                "id": f"clock-{number}",
                "timestamp": _stamp(moment, offset_minutes),
            }
        )


def build_cases(now: dt.datetime) -> Cases:
    cases = Cases()
    zones = {"ny": NEW_YORK, **TENANT_ZONES}
    for tenant, zone in zones.items():
        today = now.astimezone(zone).date()
        for back in (0, 1):
            day = today - dt.timedelta(days=back)
            cases.around(tenant, f"midnight-{back}", midnight(day, zone))
        changes = transitions(zone, *window(now))
        for change in changes[-2:]:  # a spring-forward and a fall-back
            kind = "shorter" if offset(change, zone) > offset(change - US, zone) else "longer"
            cases.around(tenant, f"dst-{kind}", change)
            day = change.astimezone(zone).date()
            cases.around(tenant, f"dst-{kind}-day-start", midnight(day, zone))
            cases.around(tenant, f"dst-{kind}-day-end", midnight(day + dt.timedelta(days=1), zone))
    utc_midnight = dt.datetime.combine(now.date(), dt.time(), tzinfo=dt.UTC)
    cases.around("ny", "utc-midnight", utc_midnight)
    # 01:30 twice on New York's last fall-back day: EDT, then EST an hour later.
    fall_backs = [
        change
        for change in transitions(NEW_YORK, *window(now))
        if offset(change, NEW_YORK) < offset(change - US, NEW_YORK)
    ]
    day = fall_backs[-1].astimezone(NEW_YORK).date()
    for fold in (0, 1):
        local = dt.datetime.combine(day, dt.time(1, 30), tzinfo=NEW_YORK).replace(fold=fold)
        cases.add("ny", f"ambiguous-0130-fold{fold}", local.astimezone(dt.UTC))
    # One instant 1 µs before New York's midnight, written with four offsets.
    instant = midnight(now.astimezone(NEW_YORK).date(), NEW_YORK) - US
    for minutes in (0, 14 * 60, -11 * 60, 5 * 60 + 45):
        cases.add("ny", "same-instant", instant, minutes)
    return cases


def due(day: str, now: dt.datetime) -> bool:
    """The committer's rule: `day` has ended in every zone in use, plus the grace."""
    following = dt.date.fromisoformat(day) + dt.timedelta(days=1)
    zones = [NEW_YORK, *TENANT_ZONES.values()]
    ends = max(dt.datetime.combine(following, dt.time(), tzinfo=z) for z in zones)
    return ends + dt.timedelta(seconds=GRACE_S) <= now


async def test_days_follow_the_billing_zone_through_midnights_dst_and_the_late_window(
    start_server: StartServer, tmp_path: Path, report: Report
) -> None:
    server = await start_server(tmp_path / "data", config=CONFIG, INGESTOR_COMMIT_INTERVAL="0.2")
    ledger = ZonedLedger(TENANT_ZONES, NEW_YORK)
    now = dt.datetime.now(dt.UTC)
    cases = build_cases(now)
    edge: dict[str, int] = {}
    with trio.fail_after(90):
        async with httpx.AsyncClient(timeout=30.0) as http:
            sent = await send_pulses(http, server.url, ledger, cases.pulses, "array")
            assert sent.response is not None, sent
            assert sent.response.status_code == 202, sent.response.text
            assert [a.answer for a in sent.attempts] == ["accepted"] * len(cases.pulses), (
                sent.response.text
            )

            # The late-window and future-skew edges, each as a single pulse.
            for name, shift, expected in (
                ("late-inside", -dt.timedelta(days=WINDOW_DAYS) + dt.timedelta(seconds=5), 202),
                ("late-outside", -dt.timedelta(days=WINDOW_DAYS) - dt.timedelta(seconds=1), 422),
                ("future-inside", dt.timedelta(seconds=SKEW_S - 1), 202),
                ("future-outside", dt.timedelta(seconds=SKEW_S + 5), 422),
            ):
                moment = dt.datetime.now(dt.UTC) + shift
                pulse = {
                    "tenant_id": "ny",
                    "product_sku": name,
                    "use_unit": "api_call",
                    "used_amount": "1",
                    "id": f"edge-{name}",
                    "timestamp": _stamp(moment),
                }
                answer = await send_pulses(http, server.url, ledger, [pulse], "single")
                assert answer.response is not None
                assert answer.response.status_code == expected, (name, answer.response.text)
                edge[name] = expected
                if expected == 422:
                    error = answer.response.json()["error"]
                    why = "older than the late window" if "late" in name else "in the future"
                    assert why in error["message"], error

            # The periodic committer commits exactly the days over in every zone.
            days = {ledger.day_of(a) for a in ledger.stored()}
            due_now = {day for day in days if due(day, dt.datetime.now(dt.UTC))}

            async def committed() -> bool:
                rows = await collect_pages(
                    http, f"{server.url}/aggregates", "aggregates", {"status": "open"}, limit=1000
                )
                return not {row["date"] for row in rows} & due_now

            await wait_until(committed, within=20, what=f"the due days {sorted(due_now)} committed")
            rows = await collect_pages(http, f"{server.url}/aggregates", "aggregates", limit=1000)
            later = dt.datetime.now(dt.UTC)
            stay_open = {day for day in days if not due(day, later)}
            wrongly = [r for r in rows if r["date"] in stay_open and r["committed_count"]]
            assert wrongly == [], f"days not over everywhere were committed: {wrongly[:5]}"
            assert stay_open, "no open day: the straddle case did not happen"

            # A late pulse into a committed day is a correction, revision 2.
            late = next(p for p in cases.pulses if p["product_sku"] == "dst-longer-at")
            late_day = next(ledger.day_of(a) for a in ledger.stored() if a.payload is late)
            assert late_day in due_now
            assert not isinstance(late, bytes)
            correction = {**late, "id": "clock-correction", "used_amount": "0.000000001"}
            answer = await send_pulses(http, server.url, ledger, [correction], "single")
            assert answer.response is not None, answer
            assert answer.response.status_code == 202, answer.response.text

            async def corrected() -> bool:
                found = await collect_pages(
                    http,
                    f"{server.url}/aggregates",
                    "aggregates",
                    {
                        "from": late_day,
                        "to": late_day,
                        "tenant_id": "ny",
                        "product_sku": correction["product_sku"],
                    },
                    limit=10,
                )
                return any(
                    r["revision"] == 2 and r["committed_count"] == r["pulse_count"] for r in found
                )

            await wait_until(corrected, within=20, what="the correction committed")

            ahead = max(now.astimezone(z).date() for z in [NEW_YORK, *TENANT_ZONES.values()])
            tomorrow = (ahead + dt.timedelta(days=1)).isoformat()
            future = await http.post(f"{server.url}/aggregates/commit", json={"date": tomorrow})
            assert future.status_code == 422, future.text

        counts = await audit(server, ledger)

    landed = {a.identity: ledger.day_of(a) for a in ledger.stored()}
    counts.extra["cases"] = len(cases.pulses)
    counts.extra["days"] = len(days)
    counts.extra["committed by the timer"] = len(due_now)
    counts.extra["left open (not over in every zone)"] = sorted(stay_open)
    counts.extra["edges"] = edge
    counts.extra["ambiguous 01:30 (EDT, EST)"] = [
        landed[("ny", p["id"])] for p in cases.pulses if p["product_sku"].startswith("ambiguous")
    ]
    report(counts.line("clock trouble"))


async def test_an_id_is_deduplicated_for_the_whole_window_even_after_a_purge(
    start_server: StartServer, tmp_path: Path, report: Report
) -> None:
    """The dedup window's edge: a 2 s window, purged every 0.2 s.

    A first pulse is stored and then purged with the whole log of its
    partition (one partition). A new pulse with another id is sent twice,
    well within the window: the second must be a duplicate.
    """
    server = await start_server(
        tmp_path / "data",
        INGESTOR_PARTITIONS="1",
        INGESTOR_LATE_WINDOW="2s",
        INGESTOR_DEDUP_WINDOW="2s",
        INGESTOR_FUTURE_SKEW="1s",  # ids are kept for the dedup window and the skew
        INGESTOR_COMMIT_INTERVAL="0.2",
    )
    ledger = ZonedLedger({}, NEW_YORK)
    base = {"tenant_id": "ny", "product_sku": "window", "use_unit": "api_call", "used_amount": "1"}
    with trio.fail_after(30):
        async with httpx.AsyncClient(timeout=10.0) as http:
            first = await send_pulses(http, server.url, ledger, [{**base, "id": "old"}], "single")
            assert first.attempts[0].answer == "accepted"
            day = dt.datetime.now(NEW_YORK).date().isoformat()

            async def purged() -> bool:
                rows = await collect_pages(
                    http,
                    f"{server.url}/pulses",
                    "pulses",
                    {"tenant_id": "ny", "date": day},
                    limit=100,
                )
                return not rows

            await wait_until(purged, within=15, what="the first pulse purged with the log")
            answers = []
            for _ in range(2):
                sent = await send_pulses(
                    http, server.url, ledger, [{**base, "id": "new"}], "single"
                )
                answers.append(sent.attempts[0].answer)
            rows = await collect_pages(
                http, f"{server.url}/aggregates", "aggregates", {"tenant_id": "ny"}, limit=10
            )
    report(
        f"dedup window after a purge: answers to one id sent twice {answers},"
        f" bucket count {sum(r['pulse_count'] for r in rows)} (expected 2)"
    )
    assert answers == ["accepted", "duplicate"], answers
    assert sum(r["pulse_count"] for r in rows) == 2
