"""The periodic committer: timer-driven, day boundaries, grace, zones, purge."""

from __future__ import annotations

import datetime as dt
import threading
import zoneinfo
from typing import Any

import pytest
import trio
import trio.testing
from quart.typing import TestClientProtocol as Client

from ingestor.committer import Committer, day_closes_at
from ingestor.partition import partition_of
from ingestor.runtime import Runtime

from .conftest import FakeClock, pulse
from .support.server import wait_until

NY = zoneinfo.ZoneInfo("America/New_York")


def test_day_closes_at_latest_midnight_of_all_zones() -> None:
    day = dt.date(2026, 11, 27)
    utc_end = dt.datetime(2026, 11, 28, tzinfo=dt.UTC)
    assert day_closes_at(day, {dt.UTC}) == utc_end
    assert day_closes_at(day, {dt.UTC, NY}) == utc_end + dt.timedelta(hours=5)
    tokyo = zoneinfo.ZoneInfo("Asia/Tokyo")
    assert day_closes_at(day, {dt.UTC, tokyo}) == utc_end


def test_day_closes_at_across_dst() -> None:
    # 2026-11-01 in New York lasts 25 hours: it ends at 05:00Z on 11-02 (EST).
    assert day_closes_at(dt.date(2026, 11, 1), {NY}) == dt.datetime(2026, 11, 2, 5, tzinfo=dt.UTC)
    # 2026-03-08 lasts 23 hours and ends at 04:00Z on 03-09 (EDT).
    assert day_closes_at(dt.date(2026, 3, 8), {NY}) == dt.datetime(2026, 3, 9, 4, tzinfo=dt.UTC)


async def next_tick(committer: Committer) -> None:
    """Wait for a whole timer tick that began after the clock was last moved."""
    await committer.wait_ticks(committer.ticks + 2)


async def post(client: Client, body: Any) -> None:
    response = await client.post("/pulses", json=body)
    assert response.status_code == 202


@pytest.mark.parametrize("settings_overrides", [{"commit_interval": 60, "commit_grace": 3600}])
async def test_timer_commits_a_day_once_its_grace_has_passed(
    autojump_clock: trio.testing.MockClock,
    client: Client,
    runtime: Runtime,
    clock: FakeClock,
) -> None:
    committer = runtime.committer
    clock.now_us -= 12 * 3600 * 1_000_000 - 1  # 2026-11-28 00:00:00.000001Z
    await post(client, [pulse(tenant_id="a"), pulse(tenant_id="b", used_amount="2")])
    clock.advance(24 * 3600 + 3000)  # 11-29 00:50Z: the day is over, the grace is not
    await next_tick(committer)
    assert committer.batches_created == 0
    clock.advance(700)  # 11-29 01:01:40Z
    await next_tick(committer)
    assert committer.batches_created == 2
    open_buckets = await trio.to_thread.run_sync(runtime.store.open_days, 0)
    assert open_buckets == []
    # A late pulse for the committed day becomes a correction on the next tick.
    late = (clock.now - dt.timedelta(days=1)).isoformat()
    await post(client, pulse(tenant_id="a", used_amount="5", timestamp=late))
    await next_tick(committer)
    assert committer.batches_created == 3
    today = await (await client.get("/batches?date=2026-11-28")).get_json()
    assert sorted(b["kind"] for b in today["batches"]) == ["correction", "initial", "initial"]


@pytest.mark.parametrize(
    "settings_overrides",
    [{"commit_interval": 60, "commit_grace": 600, "billing_timezone": "America/New_York"}],
)
async def test_timer_waits_for_the_day_to_end_in_the_billing_zone(
    autojump_clock: trio.testing.MockClock, client: Client, runtime: Runtime, clock: FakeClock
) -> None:
    # 12:00Z on 11-28 is 07:00 in New York. Push to 11-29 04:59Z = 23:59 on 11-28 there.
    await post(client, pulse())
    clock.advance(16 * 3600 + 59 * 60)
    await next_tick(runtime.committer)
    assert runtime.committer.batches_created == 0
    clock.advance(11 * 60)  # 05:10Z: 00:10 in New York, the grace of 10 min is over
    await next_tick(runtime.committer)
    assert runtime.committer.batches_created == 1


@pytest.mark.parametrize("settings_overrides", [{"dedup_window": 86400, "late_window": 86400}])
async def test_purge_forgets_ids_after_the_dedup_window(
    client: Client, runtime: Runtime, clock: FakeClock
) -> None:
    await post(client, pulse(id="once"))
    clock.advance(3600)
    assert await runtime.committer.purge() == 0
    replay = await (await client.post("/pulses", json=pulse(id="once"))).get_json()
    assert replay["duplicates"] == 1
    clock.advance(86400)
    assert await runtime.committer.purge() == 0  # announced: forgotten from the next purge on
    clock.advance(10)
    assert await runtime.committer.purge() == 1
    again = await (await client.post("/pulses", json=pulse(id="once"))).get_json()
    assert again["accepted"] == 1


async def test_pulses_that_arrive_during_a_commit_are_written_between_partitions(
    client: Client, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One shard owns every partition (SQLite): the committer gives it one
    partition's commit at a time, so ingest waits for one commit, not all."""
    store = runtime.store
    calls: list[tuple[str, int]] = []
    entered, gate = trio.Event(), threading.Event()
    token = trio.lowlevel.current_trio_token()
    commit_day, write_pulses = store.commit_day, store.write_pulses

    def held_commit(partition: int, *args: Any) -> Any:
        calls.append(("commit", partition))
        if len(calls) == 1:
            trio.from_thread.run_sync(entered.set, trio_token=token)
            gate.wait()
        return commit_day(partition, *args)

    def logged_write(partition: int, *args: Any) -> Any:
        calls.append(("write", partition))
        return write_pulses(partition, *args)

    monkeypatch.setattr(store, "commit_day", held_commit)
    monkeypatch.setattr(store, "write_pulses", logged_write)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runtime.committer.commit_day, dt.date(2026, 11, 27))
        await entered.wait()  # the first partition's commit is running
        nursery.start_soon(post, client, pulse(tenant_id="a"))

        # Queued behind the commit: the request may first read the purge
        # horizon in a thread, which no task waiting on it shows.
        async def queued() -> bool:
            return runtime.shards[0].statistics().queued >= 1

        await wait_until(queued, within=10, what="the request queued behind the commit")
        gate.set()
    assert len(runtime.shards) == 1
    commits = [partition for kind, partition in calls if kind == "commit"]
    assert commits == list(range(store.partitions))
    assert calls[:3] == [
        ("commit", 0),
        ("write", partition_of("a", store.partitions)),
        ("commit", 1),
    ]
