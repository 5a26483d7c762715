"""`durability = "fsync"` on SQLite: the WAL is fsynced after each COMMIT, outside the
writers' lock, and before anything written or read is answered (see the store's
module docstring). A power loss cannot be made here; what is checked is that the
sync comes after what it must cover and before the caller gets a result."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ingestor.errors import StoreOutcomeUnknown
from ingestor.model import Pulse
from ingestor.store import AggregateQuery
from ingestor.store.sqlite import SQLiteStore

DAY = "2026-11-28"


def pulse(pulse_id: str) -> Pulse:
    return Pulse("acme", "sku", "unit", 1_000_000_000, pulse_id, True, 0, DAY, b"fp")


def open_store(directory: Path, durability: str = "fsync") -> SQLiteStore:
    return SQLiteStore.open(directory, partitions=2, durability=durability, busy_timeout=5)


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SQL the store runs and the files it fdatasyncs, in order."""
    seen: list[str] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        real(fd)
        seen.append(f"fdatasync {Path(os.readlink(f'/proc/self/fd/{fd}')).name}")

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return seen


def trace(store: SQLiteStore, events: list[str]) -> None:
    store._file.writer.set_trace_callback(events.append)
    store._file.reader.set_trace_callback(lambda sql: events.append(f"read: {sql}"))


def test_a_write_returns_only_after_its_commit_is_synced(tmp_path: Path, events: list[str]) -> None:
    store = open_store(tmp_path / "s")
    try:
        trace(store, events)
        assert store.write_pulses(0, [pulse("a")], 0) == ["accepted"]
        commit = events.index("COMMIT")
        assert events[commit + 1 :] == ["fdatasync store.sqlite-wal"]
        # SQLite's own sync at COMMIT is off: the store's is the one.
        mode = store._file.writer.execute("PRAGMA synchronous").fetchone()[0]
        assert mode == 1  # NORMAL
        events.clear()
        with store.writing_together():
            store.write_pulses(0, [pulse("b")], 0)
            store.write_pulses(1, [pulse("c")], 0)
            assert not any(e.startswith("fdatasync") for e in events)  # not before the round ends
        assert events[-2:] == ["COMMIT", "fdatasync store.sqlite-wal"]
    finally:
        store.close()


def test_a_read_is_synced_before_it_is_answered(tmp_path: Path, events: list[str]) -> None:
    """Another process may have committed what we read without having synced it yet."""
    store, other = open_store(tmp_path / "s"), open_store(tmp_path / "s")
    try:
        other.write_pulses(0, [pulse("a")], 0)
        trace(store, events)
        [bucket] = store.aggregates(AggregateQuery())
        assert bucket.pulse_count == 1
        reads = [n for n, e in enumerate(events) if e.startswith("read: ")]
        assert reads
        assert events[max(reads) + 1 :] == ["fdatasync store.sqlite-wal"]
    finally:
        store.close()
        other.close()


def test_durability_os_leaves_syncing_to_the_checkpoints(tmp_path: Path, events: list[str]) -> None:
    store = open_store(tmp_path / "s", durability="os")
    try:
        store.write_pulses(0, [pulse("a")], 0)
        store.aggregates(AggregateQuery())
        assert events == []
    finally:
        store.close()


def test_a_failed_sync_is_an_error_and_the_write_is_not_counted_twice(
    tmp_path: Path, events: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit is in the file but was not known to be on disk: the caller gets an
    error, and memory reads the row back rather than taking it on trust."""
    store = open_store(tmp_path / "s")
    try:
        store.write_pulses(0, [pulse("a")], 0)  # memory is in step with the file
        synced = os.fdatasync

        def failing(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "fdatasync", failing)
        with pytest.raises(StoreOutcomeUnknown, match="could not sync the store to disk"):
            store.write_pulses(0, [pulse("b")], 0)
        monkeypatch.setattr(os, "fdatasync", synced)
        # The client resends: the row lasted, so the id is a duplicate.
        assert store.write_pulses(0, [pulse("b"), pulse("c")], 0) == ["duplicate", "accepted"]
        [bucket] = store.aggregates(AggregateQuery())
        assert bucket.pulse_count == 3
    finally:
        store.close()


def test_the_store_syncs_the_file_its_connections_write(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s")
    try:
        fd = store._file._wal_fd
        assert os.readlink(f"/proc/self/fd/{fd}") == str(tmp_path / "s" / "store.sqlite-wal")
        store.write_pulses(0, [pulse("a")], 0)
        assert os.fstat(fd).st_size > 0  # the commit went to that file
        assert os.fstat(fd).st_ino == (tmp_path / "s" / "store.sqlite-wal").stat().st_ino
    finally:
        store.close()
