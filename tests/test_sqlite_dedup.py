"""SQLite's two-tier dedup: memory from the durable log, merged into the index.

Two store objects on one directory stand in for two processes.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

import ingestor.store.sqlite as sqlite_store
from ingestor.errors import StoreError
from ingestor.model import Pulse
from ingestor.money import parse_nanos
from ingestor.store.sqlite import SQLiteStore

DAY = "2026-11-28"


def pulse(pulse_id: str, amount: int = 1, tenant: str = "t") -> Pulse:
    return Pulse(tenant, "sku", "unit", amount, pulse_id, True, 0, DAY, b"fp%d" % amount)


@pytest.fixture
def small_merges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "_MERGE_AT", 7)


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[SQLiteStore, SQLiteStore]]:
    a = SQLiteStore.open(tmp_path / "s", partitions=1, durability="os", busy_timeout=5)
    b = SQLiteStore.open(tmp_path / "s", partitions=1, durability="os", busy_timeout=5)
    yield a, b
    a.close()
    b.close()


def merged_watermark(store: SQLiteStore) -> int:
    row = store._parts[0].read(
        lambda c: c.execute("SELECT value FROM meta WHERE key = 'ids_merged_seq'").fetchone()
    )
    return int(row[0]) if row else 0


@pytest.mark.usefixtures("small_merges")
def test_two_writers_count_each_id_once_across_merges(
    stores: tuple[SQLiteStore, SQLiteStore],
) -> None:
    rng = random.Random(5)
    accepted: dict[str, int] = {}
    for _ in range(60):
        writer = rng.choice(stores)
        ids = [f"id{rng.randrange(80)}" for _ in range(rng.randrange(1, 6))]
        batch = [pulse(i, amount=int(i[2:]) + 1) for i in ids]
        for p, outcome in zip(batch, writer.write_pulses(0, batch, 0), strict=True):
            if outcome == "accepted":
                assert p.pulse_id not in accepted, f"{p.pulse_id} accepted twice"
                accepted[p.pulse_id] = p.nanos
            else:
                assert outcome == "duplicate"
                assert p.pulse_id in accepted
    assert merged_watermark(stores[0]) > 0  # merges happened along the way
    [bucket] = stores[1].aggregates(sqlite_store.AggregateQuery())
    assert bucket.pulse_count == len(accepted)
    assert parse_nanos(bucket.used_amount) == sum(accepted.values())


@pytest.mark.usefixtures("small_merges")
def test_conflict_detected_from_memory_and_from_the_index(
    stores: tuple[SQLiteStore, SQLiteStore],
) -> None:
    a, b = stores
    assert a.write_pulses(0, [pulse("x", 1)], 0) == ["accepted"]
    assert b.write_pulses(0, [pulse("x", 2)], 0) == ["conflict"]  # b learns x from the log
    a.write_pulses(0, [pulse(f"fill{i}") for i in range(10)], 0)
    a.write_pulses(0, [pulse("y")], 0)  # this write merges everything before it
    assert merged_watermark(a) > 0
    assert b.write_pulses(0, [pulse("x", 2), pulse("x", 1)], 0) == ["conflict", "duplicate"]


@pytest.mark.usefixtures("small_merges")
def test_a_merge_that_rolls_back_leaves_memory_rebuilt(
    stores: tuple[SQLiteStore, SQLiteStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = stores
    a.write_pulses(0, [pulse(f"p{i}") for i in range(10)], 0)
    # The next write merges, then fails before COMMIT: nothing of it is kept.
    original = sqlite_store.bucket_deltas

    def explode(*args: object) -> object:
        raise sqlite3.OperationalError("injected")

    monkeypatch.setattr(sqlite_store, "bucket_deltas", explode)
    with pytest.raises(StoreError):
        a.write_pulses(0, [pulse("q")], 0)
    monkeypatch.setattr(sqlite_store, "bucket_deltas", original)
    assert merged_watermark(a) == 0
    # Memory said "merged"; the watermark says not: the next write rebuilds
    # from the log and still knows every earlier id, and q was never stored.
    again = [pulse(f"p{i}") for i in range(10)] + [pulse("q")]
    assert a.write_pulses(0, again, 0) == ["duplicate"] * 10 + ["accepted"]


def test_a_reopened_store_knows_unmerged_ids(tmp_path: Path) -> None:
    store = SQLiteStore.open(tmp_path / "s", partitions=1, durability="os", busy_timeout=5)
    store.write_pulses(0, [pulse("kept")], 0)
    store.close()
    reopened = SQLiteStore.open(tmp_path / "s", partitions=1, durability="os", busy_timeout=5)
    try:
        assert merged_watermark(reopened) == 0
        assert reopened.write_pulses(0, [pulse("kept")], 0) == ["duplicate"]
    finally:
        reopened.close()
