"""Committing billing days (DESIGN §3.4, §4): today, tenants' zones, partitions.

They run on the injected clock (2026-11-28T12:00Z) and call the committer's
`commit_due` directly instead of waiting for its timer. What the stores do
with commits between writes: tests/store/test_commit_days.py.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
from quart.typing import TestClientProtocol as Client

from ingestor.clock import epoch_us
from ingestor.partition import partition_of
from ingestor.runtime import Runtime

from .conftest import FakeClock, pulse

# One tenant in each of the 4 partitions the service fixture makes.
SPREAD = ("d", "b", "e", "a")


async def post(client: Client, body: Any) -> dict[str, Any]:
    response = await client.post("/pulses", json=body)
    assert response.status_code == 202, await response.get_data()
    answer: dict[str, Any] = await response.get_json()
    return answer


async def commit(client: Client, day: str) -> list[dict[str, Any]]:
    response = await client.post("/aggregates/commit", json={"date": day})
    assert response.status_code == 200, await response.get_data()
    batches: list[dict[str, Any]] = (await response.get_json())["batches"]
    return batches


async def get_all(client: Client, path: str, key: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    cursor = None
    while True:
        sep = "&" if "?" in path else "?"
        url = path + (f"{sep}cursor={cursor}" if cursor else "")
        page = await (await client.get(url)).get_json()
        found.extend(page[key])
        cursor = page["next_cursor"]
        if cursor is None:
            return found


async def audit(client: Client) -> list[dict[str, Any]]:
    """Every bucket's batches add up to its total, revision by revision; none is open."""
    buckets = await get_all(client, "/aggregates?limit=1000", "aggregates")
    records: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for summary in await get_all(client, "/batches?limit=100", "batches"):
        batch = await (await client.get(f"/batches/{summary['batch_id']}")).get_json()
        keys = [
            (batch["date"], r["tenant_id"], r["product_sku"], r["use_unit"])
            for r in batch["records"]
        ]
        assert len(keys) == len(set(keys)), "a bucket twice in one batch"
        for key, record in zip(keys, batch["records"], strict=True):
            assert partition_of(key[1], 4) == batch["partition"]
            records.setdefault(key, []).append(record)
    assert {(b["date"], b["tenant_id"], b["product_sku"], b["use_unit"]) for b in buckets} == set(
        records
    )
    for b in buckets:
        key = (b["date"], b["tenant_id"], b["product_sku"], b["use_unit"])
        history = sorted(records[key], key=lambda r: r["revision"])
        assert [r["revision"] for r in history] == list(range(1, len(history) + 1))
        assert sum(Decimal(r["used_amount"]) for r in history) == Decimal(b["used_amount"])
        assert sum(r["pulse_count"] for r in history) == b["pulse_count"]
        assert Decimal(history[-1]["total_amount"]) == Decimal(b["used_amount"])
        assert b["committed_amount"] == b["used_amount"]
        assert b["committed_count"] == b["pulse_count"]
        assert b["revision"] == len(history)
    return buckets


async def test_committing_today_then_pulses_of_today_become_corrections_in_each_partition(
    client: Client, clock: FakeClock
) -> None:
    await post(client, [pulse(tenant_id=t, used_amount="1.5") for t in SPREAD])
    first = await commit(client, "2026-11-28")
    assert sorted(b["kind"] for b in first) == ["initial"] * 4
    assert {b["partition"] for b in first} == {0, 1, 2, 3}
    clock.advance(3600)  # still 2026-11-28: more pulses of today, without a timestamp
    await post(client, [pulse(tenant_id="d", used_amount="2"), pulse(tenant_id="a")])
    await post(client, pulse(tenant_id="e", product_sku="new", used_amount="0.25"))
    second = await commit(client, "2026-11-28")
    by_partition = {(b["partition"], b["kind"]): b for b in second}
    assert set(by_partition) == {(0, "correction"), (3, "correction"), (2, "initial")}
    assert by_partition[0, "correction"]["used_amount"] == "2"
    assert by_partition[3, "correction"]["used_amount"] == "1"
    assert await commit(client, "2026-11-28") == []
    buckets = await audit(client)
    assert {b["tenant_id"]: b["revision"] for b in buckets if b["product_sku"] == "sku1"} == {
        "d": 2,
        "b": 1,
        "e": 1,
        "a": 2,
    }


@pytest.mark.parametrize(
    "settings_overrides",
    [{"billing_timezone": "Pacific/Pago_Pago", "tenant_timezones": {"kiri": "Pacific/Kiritimati"}}],
)
async def test_commit_allows_today_of_the_zone_furthest_ahead_and_nothing_later(
    client: Client, clock: FakeClock
) -> None:
    # 12:00Z on 11-28 is 02:00 on 11-29 in Kiritimati, 01:00 on 11-28 in Pago Pago.
    await post(client, [pulse(tenant_id="kiri"), pulse(tenant_id="pago")])
    days = {b["tenant_id"]: b["date"] for b in await get_all(client, "/aggregates", "aggregates")}
    assert days == {"kiri": "2026-11-29", "pago": "2026-11-28"}
    [kiri] = await commit(client, "2026-11-29")
    assert kiri["record_count"] == 1
    too_far = await client.post("/aggregates/commit", json={"date": "2026-11-30"})
    assert too_far.status_code == 422
    # Later pulses of Kiritimati's today are a correction of it.
    await post(client, pulse(tenant_id="kiri", used_amount="3"))
    [correction] = await commit(client, "2026-11-29")
    assert (correction["kind"], correction["used_amount"]) == ("correction", "3")
    clock.advance(12 * 3600)  # 11-29 00:00Z: 13:00 on 11-28 in Pago Pago
    await commit(client, "2026-11-28")
    await audit(client)


@pytest.mark.parametrize(
    "settings_overrides",
    [{"commit_grace": 600, "tenant_timezones": {"pago": "Pacific/Pago_Pago"}}],
)
async def test_the_committer_waits_for_the_day_to_end_in_a_tenants_zone(
    client: Client, runtime: Runtime, clock: FakeClock
) -> None:
    """The default zone is UTC; one tenant bills in Pago Pago (-11): 11-28 ends
    there at 11:00Z on 11-29, so the UTC tenant's 11-28 waits for it too."""
    committer = runtime.committer
    stamp = "2026-11-28T11:30:00Z"  # 00:30 on 11-28 in Pago Pago
    await post(client, [pulse(tenant_id="d", timestamp=stamp), pulse(tenant_id="pago")])
    clock.now_us = epoch_us(dt.datetime(2026, 11, 29, 0, 20, tzinfo=dt.UTC))
    assert await committer.commit_due() == []
    clock.now_us = epoch_us(dt.datetime(2026, 11, 29, 11, 9, 59, tzinfo=dt.UTC))
    assert await committer.commit_due() == []
    clock.advance(1)  # 11:10:00Z: over in every zone, plus the grace
    made = await committer.commit_due()
    assert sorted(b.partition for b in made) == sorted(partition_of(t, 4) for t in ("d", "pago"))
    open_now = await get_all(client, "/aggregates?status=open", "aggregates")
    assert open_now == []
    # A pulse of Pago Pago's 11-29 (received now, 00:10 local) stays open.
    await post(client, pulse(tenant_id="pago"))
    assert await committer.commit_due() == []
    [still_open] = await get_all(client, "/aggregates?status=open", "aggregates")
    assert still_open["date"] == "2026-11-29"


@pytest.mark.parametrize(
    "settings_overrides", [{"billing_timezone": "America/New_York", "commit_grace": 60}]
)
async def test_a_25_hour_day_is_committed_whole_and_once(
    client: Client, runtime: Runtime, clock: FakeClock
) -> None:
    """New York's 2026-11-01 lasts 25 hours (04:00Z to 05:00Z next day): pulses
    at its first and last microsecond share its one bucket."""
    clock.now_us = epoch_us(dt.datetime(2026, 11, 2, 6, tzinfo=dt.UTC))
    stamps = [
        "2026-11-01T04:00:00Z",
        "2026-11-01T05:30:00Z",  # 01:30 EDT
        "2026-11-01T06:30:00Z",  # 01:30 EST
        "2026-11-02T04:59:59.999999Z",
        "2026-11-02T05:00:00Z",
        "2026-11-01T03:59:59.999999Z",
    ]
    await post(client, [pulse(timestamp=s) for s in stamps])
    rows = await get_all(client, "/aggregates", "aggregates")
    assert {r["date"]: r["pulse_count"] for r in rows} == {
        "2026-10-31": 1,
        "2026-11-01": 4,
        "2026-11-02": 1,
    }
    made = await runtime.committer.commit_due()  # 06:00Z: 10-31 and 11-01 are over
    assert sorted(b.record_count for b in made) == [1, 1]
    [left] = await get_all(client, "/aggregates?status=open", "aggregates")
    assert left["date"] == "2026-11-02"
