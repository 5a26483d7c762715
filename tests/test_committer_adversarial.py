"""Adversarial tests of the committer and everything it does on a clock.

Wall-clock jumps (forward by days, back after a commit), a zero grace, a
zone far behind UTC, a commit interval longer than a day, purges of days
that are still open, a StoreError for one partition or one day, an OSError
while taking the committer's lock, a shutdown in the middle of a commit, a
crash between the outbox insert and the bucket mark, a leader whose session
dies, max_records boundaries, and commits racing pulses of the same day.

Every time-driven test uses an injected wall clock (FakeClock, or one tied
to trio's virtual clock) and trio's autojump clock: nothing sleeps for real.
Store-level tests run on SQLite and on PostgreSQL (skipped if none answers
at TEST_POSTGRES_URL, default postgresql://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import sqlite3
import threading
import zoneinfo
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from quart.typing import TestClientProtocol as Client

from ingestor.api import create_app
from ingestor.clock import epoch_us
from ingestor.committer import Committer
from ingestor.config import Settings
from ingestor.errors import StoreBusy, StoreError
from ingestor.model import BatchRecord, BatchSummary, Pulse
from ingestor.money import parse_nanos, to_nanos
from ingestor.partition import partition_of
from ingestor.runtime import Runtime
from ingestor.service import open_service
from ingestor.shard import Shard
from ingestor.sinks.memory import MemorySink
from ingestor.store import AggregateQuery, BatchQuery, Store
from ingestor.store.postgres import PostgresStore, _lock_key
from ingestor.store.sqlite import SQLiteStore

from .conftest import FakeClock, pulse

SPREAD = ("d", "b", "e", "a")  # one tenant in each of 4 partitions: 0, 1, 2, 3
DAY_US = 86_400_000_000
HOUR_US = 3_600_000_000
Key = tuple[str, str, str, str]


# -- stores ------------------------------------------------------------------


class Opener:
    """Opens stores of one kind on one place; closes them all at the end."""

    def __init__(self, kind: str, place: str) -> None:
        self.kind = kind
        self.place = place
        self.opened: list[Store] = []

    def __call__(self) -> Store:
        store: Store
        if self.kind == "sqlite":
            store = SQLiteStore.open(
                Path(self.place), partitions=4, durability="os", busy_timeout=10
            )
        else:
            store = PostgresStore.open(self.place, partitions=4, pool_size=4, busy_timeout=10)
        self.opened.append(store)
        return store

    def close(self) -> None:
        for store in self.opened:
            store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    if request.param == "sqlite":
        made = Opener("sqlite", str(tmp_path / "store"))
    else:
        made = Opener("postgres", request.getfixturevalue("postgres_url"))
    try:
        yield made
    finally:
        made.close()


def make(
    tenant: str, day: str, amount: str = "1", *, sku: str = "s", pid: str | None = None, ts: int = 0
) -> Pulse:
    nanos = to_nanos(Decimal(amount))
    if pid is None:
        return Pulse(tenant, sku, "u", nanos, "", False, ts, day, b"")
    return Pulse(tenant, sku, "u", nanos, pid, True, ts, day, b"", False)


def write(store: Store, pulses: Sequence[Pulse], received_us: int) -> list[str]:
    by_partition: dict[int, list[Pulse]] = {}
    for p in pulses:
        by_partition.setdefault(partition_of(p.tenant_id, store.partitions), []).append(p)
    outcomes: list[str] = []
    for partition, group in by_partition.items():
        outcomes.extend(store.write_pulses(partition, group, received_us))
    return outcomes


def expect(pulses: Sequence[Pulse]) -> dict[Key, tuple[int, int]]:
    totals: dict[Key, tuple[int, int]] = {}
    for p in pulses:
        key = (p.day, p.tenant_id, p.product_sku, p.use_unit)
        nanos, count = totals.get(key, (0, 0))
        totals[key] = (nanos + p.nanos, count + 1)
    return totals


def audit(store: Store, expected: dict[Key, tuple[int, int]] | None = None) -> dict[Key, list[int]]:
    """DESIGN §3.4 on the store: each bucket's batches are revisions 1..n whose
    deltas add up, record by record, to the totals they carry and, in the end,
    to the bucket; every bucket is committed. Returns each bucket's batch seqs."""
    history: dict[Key, list[tuple[BatchRecord, str]]] = {}
    for view in store.batches(BatchQuery(limit=10_000)):
        full = store.batch(view.batch_id)
        assert full is not None
        assert full.records is not None
        for r in full.records:
            key = (full.date, r.tenant_id, r.product_sku, r.use_unit)
            history.setdefault(key, []).append((r, view.batch_id))
    rows = {
        (a.date, a.tenant_id, a.product_sku, a.use_unit): a
        for a in store.aggregates(AggregateQuery(limit=10_000))
    }
    assert set(history) == set(rows), "a bucket without a batch, or a batch without a bucket"
    seqs: dict[Key, list[int]] = {}
    for key, records in history.items():
        records.sort(key=lambda item: item[0].revision)
        assert [r.revision for r, _ in records] == list(range(1, len(records) + 1)), key
        nanos = count = 0
        for r, _ in records:
            nanos += parse_nanos(r.used_amount)
            count += r.pulse_count
            assert (nanos, count) == (parse_nanos(r.total_amount), r.total_count), key
        row = rows[key]
        assert (nanos, count) == (parse_nanos(row.used_amount), row.pulse_count), key
        assert (row.committed_amount, row.committed_count) == (row.used_amount, row.pulse_count)
        assert row.revision == len(records)
        if expected is not None:
            assert (nanos, count) == expected[key], key
        seqs[key] = [int(batch.rsplit("-", 1)[1]) for _, batch in records]
    if expected is not None:
        assert set(expected) == set(rows)
    return seqs


def open_days(store: Store) -> dict[int, list[str]]:
    return {p: days for p in range(store.partitions) if (days := store.open_days(p))}


def day_of_batch(summary: BatchSummary) -> str:
    raw = summary.batch_id.split("-")[1]
    return f"{raw[:4]}-{raw[4:6]}-{raw[6:]}"


@asynccontextmanager
async def parts(
    store: Store,
    clock: Callable[[], int],
    *,
    grace: float = 0.0,
    interval: float = 60.0,
    max_records: int = 1000,
    dedup_window: float = 35 * 86400,
    zones: set[dt.tzinfo] | None = None,
) -> AsyncIterator[Committer]:
    """The shards of `store` (as open_service makes them) and a committer on them."""
    lanes = max(1, min(store.write_lanes, store.partitions))
    shards = [
        Shard(
            lane,
            range(lane, store.partitions, lanes),
            store,
            queue_size=64,
            group_max_pulses=50_000,
            clock=clock,
        )
        for lane in range(lanes)
    ]
    committer = Committer(
        shards,
        store,
        zones=zones or {dt.UTC},
        interval=interval,
        grace=grace,
        max_records=max_records,
        dedup_window=dedup_window,
        clock=clock,
    )
    async with trio.open_nursery() as nursery:
        for shard in shards:
            await nursery.start(shard.run)
        try:
            yield committer
        finally:
            for shard in shards:
                shard.close()


class TrioWallClock:
    """A wall clock that moves with trio's (virtual) clock."""

    def __init__(self, start: dt.datetime) -> None:
        self.start_us = epoch_us(start)

    def __call__(self) -> int:
        return self.start_us + int(trio.current_time() * 1_000_000)


async def post(client: Client, body: Any) -> dict[str, Any]:
    response = await client.post("/pulses", json=body)
    assert response.status_code == 202, await response.get_data()
    answer: dict[str, Any] = await response.get_json()
    return answer


# -- wall-clock jumps ----------------------------------------------------------


async def test_a_jump_forward_by_days_commits_every_skipped_day_once_and_in_order(
    opener: Opener,
) -> None:
    store = opener()
    clock = FakeClock(dt.datetime(2026, 11, 20, 12, tzinfo=dt.UTC))
    written: list[Pulse] = []
    for offset in range(5):  # the leader was away for five days
        day = (dt.date(2026, 11, 20) + dt.timedelta(days=offset)).isoformat()
        batch = [make(t, day, f"{offset + 1}.{n}", sku=f"k{n}") for n, t in enumerate(SPREAD)]
        write(store, batch, clock.now_us + offset * DAY_US)
        written += batch
    async with parts(store, clock, grace=3600) as committer:
        clock.advance(15 * 86400)  # the wall clock jumps 15 days
        made = await committer.commit_due()
        assert [day_of_batch(b) for b in made] == sorted(day_of_batch(b) for b in made)
        assert {day_of_batch(b) for b in made} == {f"2026-11-2{n}" for n in range(5)}
        assert len(made) == 20
        assert {b.kind for b in made} == {"initial"}
        assert await committer.commit_due() == []
    assert open_days(store) == {}
    seqs = audit(store, expect(written))
    assert set(map(tuple, seqs.values())) == {(1,)}


async def test_a_jump_back_after_a_commit_commits_nothing_twice_and_loses_no_correction(
    opener: Opener,
) -> None:
    store = opener()
    clock = FakeClock(dt.datetime(2026, 11, 28, 12, tzinfo=dt.UTC))
    first = [make(t, "2026-11-28", "2.5") for t in SPREAD]
    write(store, first, clock.now_us)
    async with parts(store, clock, grace=3600) as committer:
        clock.now_us = epoch_us(dt.datetime(2026, 11, 29, 1, 0, 1, tzinfo=dt.UTC))
        assert len(await committer.commit_due()) == 4
        clock.now_us = epoch_us(dt.datetime(2026, 11, 28, 18, tzinfo=dt.UTC))  # NTP steps back
        assert await committer.commit_due() == []
        late = [make("d", "2026-11-28", "0.125"), make("a", "2026-11-28", "7")]
        write(store, late, clock.now_us)
        assert await committer.commit_due() == []  # not due on the stepped-back clock
        assert len(store.batches(BatchQuery(limit=100))) == 4  # nothing committed twice
        clock.now_us = epoch_us(dt.datetime(2026, 11, 29, 1, 0, 1, tzinfo=dt.UTC))
        again = await committer.commit_due()
        assert sorted((b.kind, b.partition, b.used_amount) for b in again) == [
            ("correction", 0, "0.125"),
            ("correction", 3, "7"),
        ]
        assert await committer.commit_due() == []
    audit(store, expect(first + late))


async def test_zero_grace_and_a_zone_twelve_hours_behind_commit_at_the_exact_instant(
    opener: Opener,
) -> None:
    """Etc/GMT+12 is UTC-12: 11-28 ends there at 11-29 12:00Z. With no grace the
    day is due at that microsecond and not one before; the next day stays open."""
    store = opener()
    zones: set[dt.tzinfo] = {dt.UTC, zoneinfo.ZoneInfo("Etc/GMT+12")}
    clock = FakeClock(dt.datetime(2026, 11, 29, 11, 59, 59, 999999, tzinfo=dt.UTC))
    write(store, [make("d", "2026-11-28"), make("b", "2026-11-29")], clock.now_us)
    async with parts(store, clock, grace=0, zones=zones) as committer:
        assert await committer.commit_due() == []
        clock.now_us += 1
        [made] = await committer.commit_due()
        assert (day_of_batch(made), made.partition) == ("2026-11-28", 0)
    assert open_days(store) == {1: ["2026-11-29"]}


async def test_a_commit_interval_longer_than_a_day_commits_every_day_due_at_each_tick(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    store = SQLiteStore.open(tmp_path / "s", partitions=4, durability="os", busy_timeout=10)
    clock = TrioWallClock(dt.datetime(2026, 11, 28, 12, tzinfo=dt.UTC))
    try:
        early = [make(t, d) for t in SPREAD for d in ("2026-11-26", "2026-11-27", "2026-11-28")]
        write(store, early, clock())
        async with (
            # Over a day and a half: each day simulated costs the leader's
            # pings every 5 s (17,000 a day, a thread hop each).
            parts(store, clock, grace=3600, interval=1.6 * 86400) as committer,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(committer.run)
            await committer.wait_ticks(1)  # the first try to lead, 5 s in
            assert committer.leading
            assert open_days(store) == {p: ["2026-11-28"] for p in range(4)}
            late = [make(t, d) for t in SPREAD for d in ("2026-11-28", "2026-11-29")]
            write(store, late, clock())
            await committer.wait_ticks(2)  # a day and a half later: 11-29 has ended
            assert open_days(store) == {}
            nursery.cancel_scope.cancel()
        seqs = audit(store, expect(early + late))
        assert all(len(s) == 1 for s in seqs.values())  # 11-28 was committed once, whole
    finally:
        store.close()


# -- purge ------------------------------------------------------------------------


async def test_a_day_is_due_once_it_has_ended_in_the_zones_of_every_instance(
    opener: Opener,
) -> None:
    """Instances on one store in different zones (a rolling change of
    billing_timezone, or one per region): the leader committed a day once it
    had ended in its own zones, while an instance twelve hours behind still
    took pulses of it as its today, and each became a correction. A zone
    counts for ten minutes after its instance last said it."""
    store = opener()
    clock = FakeClock(dt.datetime(2026, 11, 28, 1, 0, tzinfo=dt.UTC))
    day = dt.date(2026, 11, 27)
    utc, behind = {zoneinfo.ZoneInfo("UTC")}, {zoneinfo.ZoneInfo("Etc/GMT+12")}
    async with (
        parts(store, clock, zones=utc) as leader,
        parts(store, clock, zones=behind) as other,
    ):
        assert leader.is_due(day, clock.now)  # it has ended in UTC
        await other.note_zones()
        await leader.note_zones()
        assert not leader.is_due(day, clock.now)  # 13:00 on the 27th, twelve hours behind
        clock.advance(9 * 60)
        await leader.note_zones()
        assert not leader.is_due(day, clock.now)
        clock.advance(2 * 60)  # the other instance has not said its zones for 11 minutes
        await leader.note_zones()
        assert leader.is_due(day, clock.now)


async def test_a_purge_past_the_dedup_window_keeps_open_buckets_and_pending_corrections(
    opener: Opener,
) -> None:
    """The leader was away for three days with a one-day dedup window: the
    purge forgets the log rows, but every open bucket and the late correction of
    a partly committed day are still committed, exactly once."""
    store = opener()
    clock = FakeClock(dt.datetime(2026, 11, 1, 12, tzinfo=dt.UTC))
    first = [make(t, "2026-11-01", "3", pid=f"id-{t}") for t in SPREAD]
    write(store, first, clock.now_us)
    assert store.commit_day(0, "2026-11-01", clock.now_us, 1000)  # partition 0 only
    late = [make("d", "2026-11-01", "0.5", pid="late-d"), make("b", "2026-11-01", "4")]
    write(store, late, clock.now_us + HOUR_US)
    async with parts(store, clock, grace=3600, dedup_window=86400) as committer:
        clock.advance(3 * 86400)
        assert await committer.purge() == 0  # announced (see Committer.purge)
        clock.advance(10)
        assert await committer.purge() > 0
        assert await committer.purge() == 0
        assert open_days(store) == {p: ["2026-11-01"] for p in range(4)}
        made = await committer.commit_due()
        assert sorted((b.partition, b.kind) for b in made) == [
            (0, "correction"),
            (1, "initial"),
            (2, "initial"),
            (3, "initial"),
        ]
    audit(store, expect(first + late))


@pytest.mark.parametrize(
    "settings_overrides", [{"dedup_window": 86400, "late_window": 86400, "future_skew": 300}]
)
async def test_a_future_stamped_pulse_replayed_after_the_purge_is_not_counted_twice(
    client: Client, runtime: Runtime, clock: FakeClock
) -> None:
    """A pulse may carry a timestamp up to `future_skew` ahead. The purge forgot
    its id `dedup_window` after it was *received*, while the late window kept
    accepting its timestamp for `future_skew` longer: a replay in that gap (a
    client's retry queue draining after an outage) was counted again. Ids are
    now kept for the dedup window and the skew."""
    stamp = (clock.now + dt.timedelta(seconds=299)).isoformat()
    body = pulse(tenant_id="d", id="retry-me", used_amount="10", timestamp=stamp)
    control = pulse(tenant_id="d", id="control", timestamp=clock.now.isoformat())
    assert (await post(client, [body, control]))["accepted"] == 2
    clock.advance(86400 + 60)  # one purge tick past the dedup window
    assert await runtime.committer.purge() == 0  # not past the window and the skew
    # A pulse stamped when it was sent is outside the late window by now: safe.
    late = await client.post("/pulses", json=control)
    assert late.status_code == 422
    replay = await post(client, body)  # its timestamp is still inside the late window
    [bucket] = runtime.store.aggregates(AggregateQuery(tenant_id="d"))
    assert (replay["accepted"], replay["duplicates"], bucket.pulse_count) == (0, 1, 2), (
        f"replay answered {replay}, bucket now {bucket.used_amount} from"
        f" {bucket.pulse_count} pulses: the same id counted twice"
    )
    clock.advance(300)  # past the window and the skew: the id may go, and its pulse is too old
    assert await runtime.committer.purge() == 0  # announced (see Committer.purge)
    clock.advance(10)
    assert await runtime.committer.purge() == 1  # their one log row
    assert (await client.post("/pulses", json=body)).status_code == 422


# -- failures during a commit --------------------------------------------------------


async def test_a_store_error_in_one_partition_keeps_the_others_and_is_retried_once(
    client: Client, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    stamp = "2026-11-27T10:00:00Z"
    await post(client, [pulse(tenant_id=t, used_amount="2", timestamp=stamp) for t in SPREAD])
    store = runtime.store
    commit_day = store.commit_day
    failures = [StoreBusy("commit: the store stayed locked by another process")]

    def flaky(partition: int, day: str, *args: Any) -> list[BatchSummary]:
        if partition == 2 and failures:
            raise failures.pop()
        return commit_day(partition, day, *args)

    monkeypatch.setattr(store, "commit_day", flaky)
    with pytest.raises(StoreBusy):
        await runtime.committer.commit_due()
    assert open_days(store) == {2: ["2026-11-27"]}
    [retried] = await runtime.committer.commit_due()
    assert (retried.partition, retried.kind, retried.used_amount) == (2, "initial", "2")
    assert await runtime.committer.commit_due() == []
    assert set(map(tuple, audit(store).values())) == {(1,)}


@pytest.mark.parametrize("settings_overrides", [{"commit_interval": 60}])
async def test_a_failing_partition_of_one_day_does_not_hold_back_later_days_or_the_purge(
    autojump_clock: trio.testing.MockClock,
    client: Client,
    runtime: Runtime,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Partition 0's commit of 11-26 fails at every tick (a damaged page, a lock
    some other instance keeps): the periodic committer never committed 11-27
    of partition 1, which has nothing to do with it, and never purged."""
    store = runtime.store
    commit_day, announce = store.commit_day, store.announce_purge
    purges: list[int] = []  # the horizons a purge announced, its first step

    def broken(partition: int, day: str, *args: Any) -> list[BatchSummary]:
        if (partition, day) == (0, "2026-11-26"):
            raise StoreError("commit: I/O error under the store")
        return commit_day(partition, day, *args)

    def counted(before_us: int) -> None:
        purges.append(before_us)
        announce(before_us)

    monkeypatch.setattr(store, "commit_day", broken)
    monkeypatch.setattr(store, "announce_purge", counted)
    await post(client, pulse(tenant_id="d", timestamp="2026-11-26T10:00:00Z"))
    await post(client, pulse(tenant_id="b", timestamp="2026-11-27T10:00:00Z"))
    committer = runtime.committer
    await committer.wait_ticks(committer.ticks + 3)
    assert committer.leading
    still_open = open_days(store)
    assert (still_open, bool(purges)) == ({0: ["2026-11-26"]}, True), (
        f"after 3 ticks: open {still_open}, purge ran: {bool(purges)}"
    )


async def test_an_os_error_taking_the_committer_lock_does_not_kill_the_committer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLiteStore.lead_committer let a raw OSError out (here EMFILE, a process
    at its open-files limit under load). `Committer.run` caught only
    StoreError, so its task ended with it, and the service's nursery with it."""
    store = SQLiteStore.open(tmp_path / "s", partitions=4, durability="os", busy_timeout=10)
    clock = TrioWallClock(dt.datetime(2026, 11, 28, 12, tzinfo=dt.UTC))
    real_open = os.open
    faults = [OSError(errno.EMFILE, "Too many open files")]

    def limited(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith("committer.lock") and faults:
            raise faults.pop()
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", limited)
    crashed: BaseException | None = None
    try:
        async with parts(store, clock, interval=60) as committer:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(committer.run)
                    await committer.wait_ticks(2)
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                crashed = group.exceptions[0]
            assert crashed is None, f"the committer's loop died of {crashed!r}"
            assert committer.leading  # the next try, once the fault passed, leads
    finally:
        store.close()


# -- shutdown and crashes mid-commit ---------------------------------------------------


@pytest.mark.parametrize("settings_overrides", [{"commit_interval": 60}])
async def test_shutdown_while_the_periodic_commit_runs_finishes_it_and_a_restart_does_the_rest(
    autojump_clock: trio.testing.MockClock,
    settings: Settings,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM (the service's context exits) while partition 0's commit is in its
    transaction: the shard finishes it before the store closes, the batch and
    the mark both land; after a restart the other partitions are committed and
    no bucket is in two batches."""
    store = SQLiteStore.open(
        settings.data_path / "store", partitions=4, durability="os", busy_timeout=10
    )
    written = [make(t, "2026-11-27", "1.5", pid=f"p-{t}") for t in SPREAD]
    write(store, written, clock.now_us)
    entered, gate = trio.Event(), threading.Event()
    token = trio.lowlevel.current_trio_token()
    commit_day = store.commit_day

    def held(partition: int, *args: Any) -> list[BatchSummary]:
        trio.from_thread.run_sync(entered.set, trio_token=token)
        assert gate.wait(30)
        return commit_day(partition, *args)

    monkeypatch.setattr(store, "commit_day", held)

    async def release_soon() -> None:
        await trio.sleep(1)
        gate.set()

    async with (
        trio.open_nursery() as outer,
        open_service(settings, store=store, sink=MemorySink(), clock=clock),
    ):
        await entered.wait()  # the timer's commit of partition 0 is in the store
        outer.start_soon(release_soon)
    assert gate.is_set()
    again = SQLiteStore.open(
        settings.data_path / "store", partitions=4, durability="os", busy_timeout=10
    )
    try:
        assert open_days(again) == {p: ["2026-11-27"] for p in (1, 2, 3)}
        [kept] = again.batches(BatchQuery(limit=10))
        assert (kept.status, kept.record_count) == ("pending", 1)
        async with parts(again, clock, grace=3600) as committer:
            assert len(await committer.commit_due()) == 3
        seqs = audit(again, expect(written))
        assert set(map(tuple, seqs.values())) == {(1,)}
    finally:
        again.close()


def _crash_on_mark(opener: Opener) -> Callable[[bool], None]:
    """A trigger that fails the UPDATE marking buckets committed: the commit's
    transaction dies after its outbox INSERT, as in a crash between the two."""
    if opener.kind == "sqlite":

        def arm_sqlite(on: bool) -> None:
            conn = sqlite3.connect(Path(opener.place) / "store.sqlite", isolation_level=None)
            try:
                if on:
                    conn.execute(
                        "CREATE TRIGGER crash_on_mark BEFORE UPDATE ON buckets"
                        " WHEN NEW.revision > OLD.revision"
                        " BEGIN SELECT RAISE(ABORT, 'power cut'); END"
                    )
                else:
                    conn.execute("DROP TRIGGER crash_on_mark")
            finally:
                conn.close()

        return arm_sqlite

    def arm_postgres(on: bool) -> None:
        with psycopg.connect(opener.place, autocommit=True) as conn:
            if on:
                conn.execute(
                    "CREATE FUNCTION crash_on_mark() RETURNS trigger LANGUAGE plpgsql AS $$"
                    " BEGIN IF NEW.revision > OLD.revision THEN RAISE EXCEPTION 'power cut';"
                    " END IF; RETURN NEW; END $$"
                )
                conn.execute(
                    "CREATE TRIGGER crash_on_mark BEFORE UPDATE ON buckets"
                    " FOR EACH ROW EXECUTE FUNCTION crash_on_mark()"
                )
            else:
                conn.execute("DROP TRIGGER crash_on_mark ON buckets")

    return arm_postgres


async def test_a_commit_that_dies_between_its_batch_and_its_mark_leaves_neither(
    opener: Opener,
) -> None:
    store = opener()
    clock = FakeClock(dt.datetime(2026, 11, 28, 12, tzinfo=dt.UTC))
    written = [make("d", "2026-11-27", "4"), make("b", "2026-11-27", "6")]
    write(store, written, clock.now_us)
    arm = _crash_on_mark(opener)
    async with parts(store, clock, grace=3600) as committer:
        arm(True)
        with pytest.raises(StoreError, match="power cut"):
            await committer.commit_due()
        assert store.batches(BatchQuery(limit=10)) == []
        assert open_days(store) == {0: ["2026-11-27"], 1: ["2026-11-27"]}
        write(store, [make("d", "2026-11-27", "1")], clock.now_us)
        written.append(make("d", "2026-11-27", "1"))
        arm(False)
        made = await committer.commit_due()
        assert sorted((b.partition, b.kind, b.used_amount) for b in made) == [
            (0, "initial", "5"),
            (1, "initial", "6"),
        ]
    assert set(map(tuple, audit(store, expect(written)).values())) == {(1,)}


async def test_postgres_leader_whose_session_dies_mid_day_hands_over_and_steps_down(
    postgres_url: str, autojump_clock: trio.testing.MockClock
) -> None:
    """Instance A leads and has committed two partitions of a day when the
    server ends its session. B takes over at its next try (seconds, not an
    interval) and commits the rest once; A, asked again, no longer leads."""
    made = Opener("postgres", postgres_url)
    try:
        a, b = made(), made()
        clock = TrioWallClock(dt.datetime(2026, 11, 28, 12, tzinfo=dt.UTC))
        written = [make(t, "2026-11-27", "3") for t in SPREAD]
        write(a, written, clock())
        assert (a.lead_committer(), b.lead_committer()) == (True, False)
        for partition in (0, 1):
            assert a.commit_day(partition, "2026-11-27", clock(), 1000)
        key = _lock_key(a.store_id) % 2**32
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
                " AND classid = %s AND objid = %s AND objsubid = 2 AND granted",
                (key, 2**32 - 1),
            ).fetchall()
        assert killed == [(True,)]
        async with (
            parts(b, clock, grace=3600, interval=3600) as follower,
            trio.open_nursery() as nursery,
        ):
            started = trio.current_time()
            nursery.start_soon(follower.run)
            await follower.wait_ticks(1)
            assert follower.leading
            # At its next try, not an interval (3600 s) later. The clock jumps
            # to the next timer whenever every task waits, also on a thread's
            # store call, and a tick's leader pings (`_keep_leading`) are timers:
            # on a loaded machine a tick took 65 s of this clock.
            assert trio.current_time() - started < 600
            nursery.cancel_scope.cancel()
        assert a.lead_committer() is False
        assert open_days(b) == {}
        assert set(map(tuple, audit(b, expect(written)).values())) == {(1,)}
    finally:
        made.close()


# -- max_records ---------------------------------------------------------------------


async def test_max_records_boundaries_exactly_one_more_and_none(opener: Opener) -> None:
    store = opener()
    clock = FakeClock(dt.datetime(2026, 11, 28, 12, tzinfo=dt.UTC))
    exact = [make("d", "2026-11-25", sku=f"k{n}") for n in range(3)]
    over = [make("d", "2026-11-26", sku=f"k{n}") for n in range(4)]
    write(store, exact + over, clock.now_us)
    async with parts(store, clock, max_records=3) as committer:
        assert [b.record_count for b in await committer.commit_day(dt.date(2026, 11, 25))] == [3]
        sizes = [
            (b.kind, b.record_count) for b in await committer.commit_day(dt.date(2026, 11, 26))
        ]
        assert sizes == [("initial", 3), ("initial", 1)]
        assert await committer.commit_day(dt.date(2026, 11, 24)) == []  # no bucket at all
        assert await committer.commit_day(dt.date(2026, 11, 26)) == []  # all committed
        # Corrections of all four and four new buckets: 3 + 1 of each kind.
        more = [make("d", "2026-11-26", "2", sku=f"k{n}") for n in range(8)]
        write(store, more, clock.now_us)
        second = await committer.commit_day(dt.date(2026, 11, 26))
        assert [(b.kind, b.record_count) for b in second] == [
            ("initial", 3),
            ("initial", 1),
            ("correction", 3),
            ("correction", 1),
        ]
        assert [int(b.batch_id.rsplit("-", 1)[1]) for b in second] == [3, 4, 5, 6]
    audit(store, expect(exact + over + more))


# -- commits racing pulses of the same day ------------------------------------------


async def _race(client: Client, committer: Committer, store: Store) -> None:
    """Posters send pulses of today while a committer commits today over and over:
    each pulse ends in exactly one batch, now or in a correction."""
    expected: dict[Key, tuple[int, int]] = {}
    posting = 8
    done = trio.Event()

    async def poster(number: int) -> None:
        nonlocal posting
        for step in range(12):
            body = [
                pulse(tenant_id=t, product_sku=f"k{number % 3}", used_amount=f"{step}.{number}")
                for t in SPREAD
            ]
            answer = await post(client, body)
            assert answer["accepted"] == len(body)
            for p in body:
                key = ("2026-11-28", p["tenant_id"], p["product_sku"], "api_call")
                nanos, count = expected.get(key, (0, 0))
                expected[key] = (nanos + to_nanos(Decimal(p["used_amount"])), count + 1)
        posting -= 1
        if not posting:
            done.set()

    commits = 0

    async def committing() -> None:
        nonlocal commits
        while not done.is_set():
            await committer.commit_day(dt.date(2026, 11, 28))
            commits += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(committing)
        for number in range(posting):
            nursery.start_soon(poster, number)
    await committer.commit_day(dt.date(2026, 11, 28))
    assert commits >= 2
    seqs = audit(store, expected)
    assert max(len(s) for s in seqs.values()) >= 2  # corrections did happen


async def test_commits_racing_pulses_of_the_same_day_count_each_pulse_once_sqlite(
    client: Client, runtime: Runtime
) -> None:
    await _race(client, runtime.committer, runtime.store)


async def test_commits_racing_pulses_of_the_same_day_count_each_pulse_once_postgres(
    postgres_url: str, settings: Settings, clock: FakeClock
) -> None:
    store = PostgresStore.open(postgres_url, partitions=4, pool_size=8, busy_timeout=10)
    async with open_service(settings, store=store, sink=MemorySink(), clock=clock) as rt:
        assert len(rt.shards) == 4  # a shard per partition: commits run side by side
        await _race(create_app(rt).test_client(), rt.committer, rt.store)
