"""SQLite writes run together: one transaction per write-lane round, each write its own.

The write lane runs the writes of several partitions inside
`writing_together()`. Each must keep its own result (a failed one leaves
nothing behind, in the file or in memory), none may be visible or durable
before the round commits, and if the round fails, none of them lasts.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import ingestor.store.sqlite as sqlite_store
from ingestor.errors import StoreBusy, StoreError
from ingestor.model import Pulse
from ingestor.partition import partition_of
from ingestor.store.sqlite import SQLiteStore

DAY = "2026-11-28"
PARTITIONS = 4


def tenant_of(partition: int) -> str:
    """A tenant that falls in `partition`."""
    return next(
        name
        for name in (f"tenant-{n}" for n in range(1000))
        if partition_of(name, PARTITIONS) == partition
    )


def pulses(partition: int, *ids: str) -> list[Pulse]:
    tenant = tenant_of(partition)
    return [Pulse(tenant, "sku", "unit", 1, i, True, 0, DAY, b"fp") for i in ids]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore.open(
        tmp_path / "s", partitions=PARTITIONS, durability="os", busy_timeout=5
    )
    yield opened
    opened.close()


def logged(store: SQLiteStore) -> dict[int, int]:
    """Committed log rows per partition, as another connection sees them."""
    conn = sqlite3.connect(store.directory / "store.sqlite")
    try:
        return dict(conn.execute("SELECT part, count(*) FROM pulse_log GROUP BY part"))
    finally:
        conn.close()


def counted(store: SQLiteStore) -> dict[str, int]:
    """Pulses counted per tenant."""
    found: dict[str, int] = {}
    for bucket in store.aggregates(sqlite_store.AggregateQuery()):
        found[bucket.tenant_id] = found.get(bucket.tenant_id, 0) + bucket.pulse_count
    return found


def test_writes_of_a_round_commit_together_each_with_its_result(store: SQLiteStore) -> None:
    with store.writing_together():
        assert store.write_pulses(0, pulses(0, "a", "b"), 0) == ["accepted", "accepted"]
        assert logged(store) == {}  # not visible, so not durable, before the round ends
        assert store.write_pulses(1, pulses(1, "a"), 0) == ["accepted"]
        assert store.write_pulses(2, pulses(2, "c", "c"), 0) == ["accepted", "duplicate"]
    assert logged(store) == {0: 1, 1: 1, 2: 1}
    assert counted(store) == {tenant_of(0): 2, tenant_of(1): 1, tenant_of(2): 1}
    # Each partition's memory holds its own ids once the round has committed.
    assert store.write_pulses(0, pulses(0, "a", "z"), 0) == ["duplicate", "accepted"]
    assert store.write_pulses(1, pulses(1, "a"), 0) == ["duplicate"]


def test_a_write_that_fails_in_a_round_leaves_nothing_and_spares_the_others(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    fold = sqlite_store._fold

    def fold_failing_in_1(conn: sqlite3.Connection, part: sqlite_store._Partition) -> None:
        fold(conn, part)
        if part.index == 1:  # after its log row and its fold are written
            raise sqlite3.OperationalError("injected")

    monkeypatch.setattr(sqlite_store, "_FOLD_AT_KEYS", 0)
    monkeypatch.setattr(sqlite_store, "_fold", fold_failing_in_1)
    with store.writing_together():
        store.write_pulses(0, pulses(0, "old"), 0)
    with store.writing_together():
        assert store.write_pulses(0, pulses(0, "x"), 0) == ["accepted"]
        with pytest.raises(StoreError, match="injected"):
            store.write_pulses(1, pulses(1, "lost"), 0)
        assert store.write_pulses(2, pulses(2, "y"), 0) == ["accepted"]
    assert logged(store) == {0: 2, 2: 1}
    monkeypatch.setattr(sqlite_store, "_fold", fold)
    assert counted(store) == {tenant_of(0): 2, tenant_of(2): 1}
    # Partition 1 remembers nothing of the write that failed; the others all of theirs.
    assert store.write_pulses(1, pulses(1, "lost"), 0) == ["accepted"]
    assert store.write_pulses(0, pulses(0, "x", "old"), 0) == ["duplicate", "duplicate"]
    assert store.write_pulses(2, pulses(2, "y"), 0) == ["duplicate"]
    assert counted(store) == {tenant_of(0): 2, tenant_of(1): 1, tenant_of(2): 1}


def test_when_a_round_fails_none_of_its_writes_lasts(store: SQLiteStore) -> None:
    store.write_pulses(0, pulses(0, "before"), 0)

    def round_that_ends_badly() -> None:
        with store.writing_together():
            assert store.write_pulses(0, pulses(0, "a"), 0) == ["accepted"]
            assert store.write_pulses(3, pulses(3, "b"), 0) == ["accepted"]
            raise RuntimeError("the round ends badly")

    with pytest.raises(RuntimeError):
        round_that_ends_badly()
    assert logged(store) == {0: 1}
    # The replies said "accepted", but the round did not commit: memory
    # forgets those ids, so a retry counts them once, not never.
    assert store.write_pulses(0, pulses(0, "a", "before"), 0) == ["accepted", "duplicate"]
    assert store.write_pulses(3, pulses(3, "b"), 0) == ["accepted"]
    assert counted(store) == {tenant_of(0): 2, tenant_of(3): 1}


def test_a_partition_writes_once_per_round(store: SQLiteStore) -> None:
    """A second write would not see the first one's ids, which join memory at COMMIT."""
    with store.writing_together():
        assert store.write_pulses(0, pulses(0, "a"), 0) == ["accepted"]
        with pytest.raises(StoreError, match="twice in one round"):
            store.write_pulses(0, pulses(0, "a"), 0)
    assert counted(store) == {tenant_of(0): 1}
    assert store.write_pulses(0, pulses(0, "a"), 0) == ["duplicate"]


def test_other_transactions_wait_for_the_round_and_stay_their_own(
    store: SQLiteStore,
) -> None:
    """Outside a round (commits, folds, deliveries) a transaction is its own,
    even from a thread other than the round's."""
    done: list[object] = []
    with store.writing_together():
        store.write_pulses(0, pulses(0, "a"), 0)
        thread = threading.Thread(target=lambda: done.append(store.open_days(0)))
        thread.start()
        thread.join(0.2)
        assert done == []  # it waits for the round's lock; it is not inside the round
    thread.join()
    assert done == [[DAY]]


# -- merging the recent ids of every partition at once ---------------------------------


def merged_marks(store: SQLiteStore) -> list[int]:
    conn = sqlite3.connect(store.directory / "store.sqlite")
    try:
        marks = dict(conn.execute("SELECT key, value FROM meta"))
    finally:
        conn.close()
    return [int(marks.get(f"ids_merged_seq/{n}", 0)) for n in range(PARTITIONS)]


def test_a_merge_moves_every_partitions_ids_into_the_index(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "_MERGE_AT", 6)
    with store.writing_together():
        for partition in range(PARTITIONS):
            store.write_pulses(partition, pulses(partition, "a", "b"), 0)
    assert merged_marks(store) == [0] * PARTITIONS
    store.write_pulses(3, pulses(3, "c"), 0)  # 8 ids wait: this write merges them all
    assert all(merged_marks(store))
    # Memory keeps only the merging write's own id, which joined it after COMMIT.
    assert [len(part.recent) for part in store._parts] == [0, 0, 0, 1]
    for partition in range(PARTITIONS):  # now known from the index
        assert store.write_pulses(partition, pulses(partition, "a", "b"), 0) == ["duplicate"] * 2


def test_a_write_that_fails_after_merging_leaves_every_partition_knowing_its_ids(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merge empties other partitions' memory inside the failing write's
    savepoint: once that is rolled back, their memory must be read back."""
    fold = sqlite_store._fold

    def fold_failing_in_0(conn: sqlite3.Connection, part: sqlite_store._Partition) -> None:
        fold(conn, part)
        if part.index == 0:
            raise sqlite3.OperationalError("injected")

    monkeypatch.setattr(sqlite_store, "_MERGE_AT", 4)
    store.write_pulses(1, pulses(1, "a", "b"), 0)
    store.write_pulses(2, pulses(2, "a", "b"), 0)
    monkeypatch.setattr(sqlite_store, "_FOLD_AT_KEYS", 0)
    monkeypatch.setattr(sqlite_store, "_fold", fold_failing_in_0)
    with store.writing_together():
        with pytest.raises(StoreError, match="injected"):
            store.write_pulses(0, pulses(0, "x"), 0)  # merges, then fails
        assert store.write_pulses(3, pulses(3, "y"), 0) == ["accepted"]
    assert merged_marks(store) == [0] * PARTITIONS
    monkeypatch.setattr(sqlite_store, "_fold", fold)
    assert store.write_pulses(1, pulses(1, "a", "b"), 0) == ["duplicate"] * 2
    assert store.write_pulses(2, pulses(2, "b", "new"), 0) == ["duplicate", "accepted"]
    assert store.write_pulses(0, pulses(0, "x"), 0) == ["accepted"]
    assert counted(store) == {
        tenant_of(0): 1,
        tenant_of(1): 2,
        tenant_of(2): 3,
        tenant_of(3): 1,
    }


# -- processes take turns to write -------------------------------------------------------


def test_a_writer_waits_for_another_process_then_gives_up_as_busy(tmp_path: Path) -> None:
    """Processes queue on writer.lock (an flock, held per open file, so two
    stores opened here stand for two processes)."""
    ours = SQLiteStore.open(tmp_path / "s", partitions=2, durability="os", busy_timeout=0.3)
    other = os.open(tmp_path / "s" / "writer.lock", os.O_RDWR)
    try:
        fcntl.flock(other, fcntl.LOCK_EX)  # another process is writing, and goes on
        with pytest.raises(StoreBusy, match="locked by another process"):
            ours.write_pulses(0, pulses(0, "a"), 0)
        fcntl.flock(other, fcntl.LOCK_UN)
        assert ours.write_pulses(0, pulses(0, "a"), 0) == ["accepted"]  # nothing was kept
    finally:
        os.close(other)
        ours.close()


def test_a_round_runs_one_slice_of_a_merge(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However many writes a round holds, it inserts one slice: the pause a
    merge puts on writes stays that of one slice."""
    monkeypatch.setattr(sqlite_store, "_MERGE_AT", 6)
    monkeypatch.setattr(sqlite_store, "_MERGE_CHUNK", 2)
    for partition in range(PARTITIONS):
        # The last of these plans a merge of the 6 ids before it, and runs a slice.
        store.write_pulses(partition, pulses(partition, "a", "b"), 0)
    executed: list[str] = []
    store._file.writer.set_trace_callback(executed.append)
    counts, inserted = [], []
    for step in range(3):
        with store.writing_together():
            for partition in range(PARTITIONS):
                store.write_pulses(partition, pulses(partition, f"r{step}"), 0)
        counts.append(
            store._file.read(lambda c: c.execute("SELECT count(*) FROM pulse_ids").fetchone()[0])
        )
        inserted.append(sum("INTO pulse_ids" in sql for sql in executed))  # one per row
        executed.clear()
    # The plan's last two slices, then the first slice of the next plan.
    assert counts == [4, 6, 8]
    assert inserted == [2, 2, 2]


CATCH_UP = "SELECT seq, body, ids FROM pulse_log WHERE part = "  # `_catch_up`'s read


def test_a_round_reads_other_processes_rows_before_it_waits_to_write(
    store: SQLiteStore,
) -> None:
    """What another process logged is read before the round takes the writers' lock,
    which every process waits on; the round itself finds nothing more to read."""
    other = SQLiteStore.open(
        store.directory, partitions=PARTITIONS, durability="os", busy_timeout=5
    )
    try:
        for partition in range(PARTITIONS):
            other.write_pulses(partition, pulses(partition, "theirs"), 0)
        executed: list[str] = []
        store._file.writer.set_trace_callback(executed.append)
        with store.writing_together():
            assert store.write_pulses(0, pulses(0, "theirs", "ours"), 0) == [
                "duplicate",
                "accepted",
            ]
        begin = executed.index("BEGIN IMMEDIATE")
        reads = [n for n, sql in enumerate(executed) if sql.startswith(CATCH_UP)]
        assert len(reads) == PARTITIONS  # every partition's tail, the other's rows in it
        assert max(reads) < begin
        # Memory is up to date for every partition, not only those the round wrote.
        executed.clear()
        with store.writing_together():
            for partition in range(1, PARTITIONS):
                assert store.write_pulses(partition, pulses(partition, "theirs"), 0) == [
                    "duplicate"
                ]
        # Nothing committed by another since: one question, and no read transaction.
        assert executed[:2] == ["PRAGMA data_version", "BEGIN IMMEDIATE"]
        assert not any(sql.startswith(CATCH_UP) for sql in executed)
    finally:
        other.close()


def test_a_round_folds_one_partition_for_being_due_and_any_that_waited_twice_as_long(
    store: SQLiteStore,
) -> None:
    """Partitions fall due together; folding them all in one round held up each
    request in it. The one that has waited twice as long folds regardless."""
    with store.writing_together():
        for partition in range(PARTITIONS):
            store.write_pulses(partition, pulses(partition, f"first-{partition}"), 0)
    now = time.monotonic()
    waited = [1.5, 1.2, 2.5, 1.1]  # in units of _FOLD_AFTER_S
    for part, factor in zip(store._parts, waited, strict=True):
        part.pending_since = now - factor * sqlite_store._FOLD_AFTER_S

    def folded() -> list[int]:
        return [part.folded_seq for part in store._parts]

    before = folded()

    def round_of(*partitions: int) -> list[bool]:
        marks = folded()
        with store.writing_together():
            for partition in partitions:
                store.write_pulses(partition, pulses(partition, f"n{partition}-{marks}"), 0)
        return [after != mark for after, mark in zip(folded(), marks, strict=True)]

    # 1 is due and first: it folds; 0 and 3 are due and wait; 2 has waited too long.
    assert round_of(1, 0, 2, 3) == [False, True, True, False]
    assert round_of(3, 0) == [False, False, False, True]  # then the next one
    assert round_of(1, 0) == [True, False, False, False]  # 1 is not due again yet
    assert all(after > first for after, first in zip(folded(), before, strict=True))
    written = [4, 3, 2, 3]  # the first round's pulse, and one a round written in
    assert counted(store) == {tenant_of(n): written[n] for n in range(PARTITIONS)}
