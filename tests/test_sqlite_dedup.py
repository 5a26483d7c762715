"""SQLite's two-tier dedup: memory from the durable log, merged into the index.

Two store objects on one directory stand in for two processes. They run
as two workers would share the partition's deltas (see `SQLiteStore.open`):
both keep them (two single-worker processes), one does, or neither does.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ingestor.store.sqlite as sqlite_store
from ingestor.errors import StoreError
from ingestor.model import Pulse, encode_pulses
from ingestor.money import parse_nanos
from ingestor.store.sqlite import SQLiteStore

DAY = "2026-11-28"
T = TypeVar("T")


def pulse(pulse_id: str, amount: int = 1, tenant: str = "t") -> Pulse:
    """As intake makes it: a replay is compared with the pulse its store holds."""
    return Pulse(tenant, "sku", "unit", amount, pulse_id, True, 0, DAY, b"", False)


def open_store(directory: Path, worker: tuple[int, int] = (0, 1)) -> SQLiteStore:
    """A one-partition store in `directory`, as every test here opens it."""
    return SQLiteStore.open(directory, partitions=1, durability="os", busy_timeout=5, worker=worker)


def spy_decodes(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """From now on, the pulse ids of each log row the store decodes, in turn."""
    decoded: list[list[str]] = []
    decode_row = sqlite_store._decode_pulses

    def decode(body: bytes) -> list[Pulse]:
        found = decode_row(body)
        decoded.append([p.pulse_id for p in found])
        return found

    monkeypatch.setattr(sqlite_store, "_decode_pulses", decode)
    return decoded


def two_workers(directory: Path) -> list[SQLiteStore]:
    """Workers 0 and 1 of two on a store of two partitions: 0 keeps partition 0's
    deltas, 1 partition 1's."""
    return [
        SQLiteStore.open(directory, partitions=2, durability="os", busy_timeout=5, worker=(i, 2))
        for i in (0, 1)
    ]


# Partition 0 is kept by worker index 0 of any count.
SHARES = {
    "both keep": ((0, 1), (0, 1)),
    "one keeps": ((0, 2), (1, 2)),
    "neither keeps": ((1, 2), (1, 2)),
}


@pytest.fixture
def small_merges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Merges of 7 ids, however many the index holds."""
    monkeypatch.setattr(sqlite_store, "_MERGE_AT", 7)
    monkeypatch.setattr(sqlite_store, "_MERGE_MAX", 7)


@pytest.fixture(params=list(SHARES))
def stores(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[SQLiteStore, SQLiteStore]]:
    first, second = SHARES[request.param]
    a = open_store(tmp_path / "s", first)
    b = open_store(tmp_path / "s", second)
    yield a, b
    a.close()
    b.close()


def watermark(store: SQLiteStore, key: str) -> int:
    """A meta watermark of partition 0 (0 if never set)."""
    row = store._file.read(
        lambda c: c.execute("SELECT value FROM meta WHERE key = ?", (f"{key}/0",)).fetchone()
    )
    return int(row[0]) if row else 0


def merged_watermark(store: SQLiteStore) -> int:
    return watermark(store, "ids_merged_seq")


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


def test_the_log_keeps_only_accepted_pulses_whatever_encoding_comes_with_them(
    tmp_path: Path,
) -> None:
    """A write's `encoded` covers all its pulses: with a duplicate among them it is
    not the log row, or a reopened store would count the duplicate again."""
    store = open_store(tmp_path / "s")
    first = [pulse("a", amount=5)]
    assert store.write_pulses(0, first, 0, encode_pulses(first)) == ["accepted"]
    again = [pulse("a", amount=5), pulse("b", amount=7)]
    assert store.write_pulses(0, again, 0, encode_pulses(again)) == ["duplicate", "accepted"]
    store.close()
    reopened = open_store(tmp_path / "s")  # memory rebuilt from the log alone
    try:
        [bucket] = reopened.aggregates(sqlite_store.AggregateQuery())
        assert (bucket.pulse_count, parse_nanos(bucket.used_amount)) == (2, 12)
        listed = reopened.pulses(sqlite_store.PulseQuery(tenant_id="t", day=DAY))
        assert sorted(p.id for _, p in listed) == ["a", "b"]
    finally:
        reopened.close()


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


@contextmanager
def failing_before_commit(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Writes fail inside their transaction, after their log row: every write
    folds, and the fold fails."""

    def explode(*args: object) -> object:
        raise sqlite3.OperationalError("injected")

    with monkeypatch.context() as patch:
        patch.setattr(sqlite_store, "_FOLD_AT_KEYS", 0)
        patch.setattr(sqlite_store, "_fold", explode)
        yield


def test_a_purge_that_rolls_back_after_merging_leaves_every_id_known(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Purge merges memory's ids into the index before it removes any, moving
    memory's mark at once; undone, the mark in the file is behind memory's, and
    memory reads the ids after it again."""
    store = open_store(tmp_path / "s")
    try:
        store.write_pulses(0, [pulse("a"), pulse("b")], 10)
        store.write_pulses(0, [plain("old")], 0)  # gives purge a row to remove
        with failing_before_commit(monkeypatch), pytest.raises(StoreError):
            store.purge(0, before_us=5)
        assert (merged_watermark(store), rows(store, "pulse_ids")) == (0, 0)
        assert store.write_pulses(0, [pulse("a"), pulse("b")], 0) == ["duplicate"] * 2
    finally:
        store.close()


@pytest.mark.usefixtures("small_merges")
def test_a_merge_that_rolls_back_leaves_memory_rebuilt(
    stores: tuple[SQLiteStore, SQLiteStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = stores
    a.write_pulses(0, [pulse(f"p{i}") for i in range(10)], 0)
    # The next write merges, then fails before COMMIT: nothing of it is kept.
    with failing_before_commit(monkeypatch), pytest.raises(StoreError):
        a.write_pulses(0, [pulse("q")], 0)
    assert merged_watermark(a) == 0
    # Memory said "merged"; the watermark says not: the next write rebuilds
    # from the log and still knows every earlier id, and q was never stored.
    again = [pulse(f"p{i}") for i in range(10)] + [pulse("q")]
    assert a.write_pulses(0, again, 0) == ["duplicate"] * 10 + ["accepted"]


def test_a_reopened_store_knows_unmerged_ids(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s")
    store.write_pulses(0, [pulse("kept")], 0)
    store.close()
    reopened = open_store(tmp_path / "s")
    try:
        assert merged_watermark(reopened) == 0
        assert reopened.write_pulses(0, [pulse("kept")], 0) == ["duplicate"]
    finally:
        reopened.close()


def test_ids_of_a_write_that_rolled_back_are_not_remembered(
    stores: tuple[SQLiteStore, SQLiteStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = stores
    assert a.write_pulses(0, [pulse("first")], 0) == ["accepted"]
    # The log row of "lost" is written, then the transaction fails before COMMIT.
    with failing_before_commit(monkeypatch), pytest.raises(StoreError):
        a.write_pulses(0, [pulse("lost")], 0)
    assert a.write_pulses(0, [pulse("lost"), pulse("first")], 0) == ["accepted", "duplicate"]
    assert b.write_pulses(0, [pulse("lost")], 0) == ["duplicate"]
    [bucket] = b.aggregates(sqlite_store.AggregateQuery())
    assert bucket.pulse_count == 2


def test_a_lone_writer_never_reads_its_own_log_back(
    stores: tuple[SQLiteStore, SQLiteStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ids of a committed write join memory directly; the log is read only when
    another connection has committed since, and where an id comes again, the
    one row holding its pulse, to compare the two. Another process's rows are
    decoded only for the deltas of the partitions it keeps: their ids come
    in a column of their own (`_id_keys`)."""
    a, b = stores
    a.write_pulses(0, [pulse("one")], 0)
    reads = spy_decodes(monkeypatch)
    assert a.write_pulses(0, [pulse("two"), pulse("one")], 0) == ["accepted", "duplicate"]
    assert a.write_pulses(0, [pulse("two")], 0) == ["duplicate"]
    assert a.write_pulses(0, [pulse("four")], 0) == ["accepted"]
    assert reads == [["one"], ["two"]]
    reads.clear()
    assert b.write_pulses(0, [pulse("three"), pulse("two")], 0) == ["accepted", "duplicate"]
    # b read a's rows if it keeps their deltas, then the one holding "two" again.
    caught_up = [["one"], ["two"], ["four"]] if b._parts[0].keeps else []
    assert reads == [*caught_up, ["two"]]
    reads.clear()
    assert a.write_pulses(0, [pulse("three")], 0) == ["duplicate"]
    caught_up = [["three"]] if a._parts[0].keeps else []
    assert reads == [*caught_up, ["three"]]  # and again to compare


# -- bucket totals folded from the log ----------------------------------------------


def totals(store: SQLiteStore) -> tuple[int, int]:
    buckets = store.aggregates(sqlite_store.AggregateQuery())
    return (
        sum(parse_nanos(b.used_amount) for b in buckets),
        sum(b.pulse_count for b in buckets),
    )


def folded_watermark(store: SQLiteStore) -> int:
    return watermark(store, "buckets_seq")


def test_a_read_sees_deltas_another_process_has_not_folded(
    stores: tuple[SQLiteStore, SQLiteStore],
) -> None:
    a, b = stores
    a.write_pulses(0, [pulse("x", 5)], 0)
    assert folded_watermark(a) == 0  # a keeps the delta in memory; the log holds it
    assert totals(b) == (5, 1)  # b folds a's logged delta before reading
    assert folded_watermark(a) > 0
    a.write_pulses(0, [pulse("y", 7)], 0)  # a learns its memory was folded by b
    assert totals(a) == (12, 2)
    assert totals(b) == (12, 2)


def test_deltas_survive_a_restart_before_any_fold(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s")
    store.write_pulses(0, [pulse("kept", 3), pulse("also", 4)], 0)
    assert folded_watermark(store) == 0
    store.close()  # as after a kill: nothing folded
    reopened = open_store(tmp_path / "s")
    try:
        [batch] = reopened.commit_day(0, DAY, 0, 100)
        assert (batch.record_count, batch.used_amount) == (1, "0.000000007")
        assert totals(reopened) == (7, 2)
    finally:
        reopened.close()


def test_a_fold_that_rolls_back_keeps_its_deltas_pending(
    stores: tuple[SQLiteStore, SQLiteStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = stores
    monkeypatch.setattr(sqlite_store, "_FOLD_AFTER_S", 0.0)  # every write folds what it keeps
    a.write_pulses(0, [pulse("one", 1)], 0)
    a.write_pulses(0, [pulse("two", 2)], 0)  # folds "one" if it keeps the deltas
    b.purge(0, 0)  # folds: from the log, if it does not keep them
    a.write_pulses(0, [pulse("four", 4)], 0)
    fold = sqlite_store._fold

    def fold_then_fail(conn: sqlite3.Connection, part: object) -> None:
        fold(conn, part)  # type: ignore[arg-type]
        raise sqlite3.OperationalError("injected")

    with monkeypatch.context() as patch:
        patch.setattr(sqlite_store, "_fold", fold_then_fail)
        for store in stores:
            with pytest.raises(StoreError):
                store.purge(0, 0)
        if a._parts[0].keeps:  # a write folds, and goes with its fold
            with pytest.raises(StoreError):
                a.write_pulses(0, [pulse("lost", 100)], 0)
    a.write_pulses(0, [pulse("three", 3)], 0)
    assert totals(a) == totals(b) == (10, 4)


@pytest.mark.parametrize("fold_after", [0.0, 1000.0])
@pytest.mark.usefixtures("small_merges")
def test_totals_and_commits_add_up_whoever_writes_reads_and_folds(
    stores: tuple[SQLiteStore, SQLiteStore], monkeypatch: pytest.MonkeyPatch, fold_after: float
) -> None:
    monkeypatch.setattr(sqlite_store, "_FOLD_AFTER_S", fold_after)
    rng = random.Random(11)
    accepted: dict[str, int] = {}
    committed = 0
    for step in range(120):
        store = rng.choice(stores)
        action = rng.random()
        if action < 0.7:
            ids = [f"id{rng.randrange(150)}" for _ in range(rng.randrange(1, 5))]
            batch = [pulse(i, amount=int(i[2:]) + 1) for i in ids]
            for p, outcome in zip(batch, store.write_pulses(0, batch, 0), strict=True):
                if outcome == "accepted":
                    assert p.pulse_id not in accepted
                    accepted[p.pulse_id] = p.nanos
        elif action < 0.85:
            assert totals(store) == (sum(accepted.values()), len(accepted)), step
        else:
            committed += sum(parse_nanos(b.used_amount) for b in store.commit_day(0, DAY, 0, 10))
    committed += sum(parse_nanos(b.used_amount) for b in stores[0].commit_day(0, DAY, 0, 10))
    assert committed == sum(accepted.values())
    assert totals(stores[1]) == (sum(accepted.values()), len(accepted))


def plain(pulse_id: str, amount: int = 1) -> Pulse:
    """A pulse without a client id (the server named it)."""
    return Pulse("t", "sku", "unit", amount, pulse_id, False, 0, DAY, b"")


@pytest.mark.usefixtures("small_merges")
@pytest.mark.parametrize("fold_after", [0.0, 0.01, 1000.0])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_writes_without_ids_that_skip_reading_the_log_count_once(
    stores: tuple[SQLiteStore, SQLiteStore],
    monkeypatch: pytest.MonkeyPatch,
    fold_after: float,
    seed: int,
) -> None:
    """A write without ids does not read what other processes logged before it
    (its row is held `ahead`); whatever order writes, rounds, folds, merges, reads,
    commits and purges come in, from either process, each pulse counts once."""
    monkeypatch.setattr(sqlite_store, "_FOLD_AFTER_S", fold_after)
    rng = random.Random(seed)
    accepted: dict[str, int] = {}
    committed = 0
    names = iter(range(10**9))
    for step in range(200):
        store = rng.choice(stores)
        action = rng.random()
        if action < 0.6:
            batch = [
                pulse(f"id{rng.randrange(150)}", amount=7)
                if rng.random() < 0.3
                else plain(f"srv-{next(names)}", amount=rng.randrange(1, 9))
                for _ in range(rng.randrange(1, 5))
            ]
            if rng.random() < 0.5:
                with store.writing_together():
                    outcomes = store.write_pulses(0, batch, 0)
            else:
                outcomes = store.write_pulses(0, batch, 0)
            for p, outcome in zip(batch, outcomes, strict=True):
                if outcome == "accepted":
                    assert p.pulse_id not in accepted, step
                    accepted[p.pulse_id] = p.nanos
        elif action < 0.8:
            assert totals(store) == (sum(accepted.values()), len(accepted)), step
        elif action < 0.9:
            committed += sum(parse_nanos(b.used_amount) for b in store.commit_day(0, DAY, 0, 10))
        else:
            old = plain(f"old-{step}")  # one row to remove: purge merges every id first
            assert store.write_pulses(0, [old], -1) == ["accepted"]
            accepted[old.pulse_id] = old.nanos
            assert store.purge(0, 0) == 1  # and folds: its amount stays counted
    committed += sum(parse_nanos(b.used_amount) for b in stores[0].commit_day(0, DAY, 0, 10))
    assert committed == sum(accepted.values())
    for store in stores:
        assert totals(store) == (sum(accepted.values()), len(accepted))
    # Memory agrees with the file: a replay of every id is a duplicate everywhere.
    replay = [pulse(i, amount=7) for i in accepted if i.startswith("id")]
    for store in stores:
        assert set(store.write_pulses(0, replay, 0)) <= {"duplicate"}


def log_rows(store: SQLiteStore, part: int) -> set[int]:
    query = "SELECT seq FROM pulse_log WHERE part = ?"
    return store._file.read(lambda c: {seq for (seq,) in c.execute(query, (part,))})


def test_each_worker_keeps_the_deltas_of_its_share_of_partitions(tmp_path: Path) -> None:
    """Two workers: each adds up in memory the deltas of its partitions, its own
    pulses and the other's, and of the other partitions none, not even its own."""
    workers = two_workers(tmp_path / "s")
    try:
        for n, store in enumerate(workers):
            for part in (0, 1):
                store.write_pulses(part, [plain(f"{n}-{part}-{k}", k + 1) for k in range(3)], 0)
        for n, store in enumerate(workers):
            for part in (0, 1):  # a write with an id reads what the other logged
                assert store.write_pulses(part, [pulse(f"id-{n}-{part}", 10)], 0) == ["accepted"]
        for n, store in enumerate(workers):
            with store.writing_together():
                pass  # reads all the other has logged
            kept, other = store._parts[n], store._parts[1 - n]
            assert sum(d.count for d in kept.pending.values()) == 8  # 2 x 3 plain, 2 ids
            assert sum(d.nanos for d in kept.pending.values()) == 2 * 6 + 20
            assert {seq for rows in kept.days.values() for seq in rows} == log_rows(
                store, kept.index
            )
            assert not other.pending
            assert not other.days
        assert totals(workers[0]) == totals(workers[1]) == (2 * 2 * 6 + 4 * 10, 16)
    finally:
        for store in workers:
            store.close()


NAMES = st.text(alphabet=st.sampled_from('t,"\\rue[]x'), max_size=8)


@given(
    st.lists(
        st.builds(
            Pulse,
            tenant_id=NAMES,
            product_sku=NAMES,
            use_unit=NAMES,
            nanos=st.integers(min_value=0, max_value=10**27),
            pulse_id=NAMES,
            client_id=st.booleans(),
            ts=st.integers(min_value=0, max_value=2**62),
            day=st.just(DAY),
            fingerprint=st.binary(max_size=16),
            ts_given=st.booleans(),
        ),
        max_size=4,
    )
)
def test_a_log_row_with_a_client_id_is_never_taken_for_one_without(
    pulses: list[Pulse],
) -> None:
    """Names made of the characters of `,true,`, quotes and backslashes included, in
    the rows of schema version 2 (JSON, read as they are) and in this version's."""
    ids = any(p.client_id for p in pulses)
    if ids:
        assert sqlite_store._may_hold_ids(msgspec.json.encode(pulses))
    row = sqlite_store._log_row(encode_pulses(pulses), ids)
    assert sqlite_store._may_hold_ids(row) == ids
    assert sqlite_store._decode_pulses(row) == pulses


def test_another_process_decodes_a_row_for_its_ids_only_if_it_may_hold_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker 0 does not keep partition 1's deltas: of worker 1's rows there, it
    decodes only those that may hold an id, and still knows every id."""
    workers = two_workers(tmp_path / "s")
    try:
        other = workers[1]
        other.write_pulses(1, [plain("p1"), plain("p2")], 0)
        other.write_pulses(1, [Pulse("a,true,b", "sku", "unit", 1, "p3", False, 0, DAY, b"")], 0)
        other.write_pulses(1, [plain("p4"), pulse("theirs")], 0)
        other.write_pulses(0, [plain("p5")], 0)  # partition 0 is kept: its deltas are read
        decoded = spy_decodes(monkeypatch)
        # As rows written before their id keys had a column of their own.
        conn = sqlite3.connect(tmp_path / "s" / "store.sqlite")
        with conn:
            conn.execute("UPDATE pulse_log SET ids = NULL")
        conn.close()
        with workers[0].writing_together():
            pass  # reads all the other has logged
        # p3's tenant holds `,true,`, which a row of schema version 2 was searched
        # for; a row's head byte now says it has no id.
        assert sorted(decoded) == [["p4", "theirs"], ["p5"]]
        assert workers[0].write_pulses(1, [pulse("theirs")], 0) == ["duplicate"]
        assert totals(workers[0]) == totals(other) == (6, 6)
    finally:
        for store in workers:
            store.close()


def test_another_process_takes_a_rows_ids_from_their_column_without_decoding_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker 0 does not keep partition 1's deltas: it decodes none of worker 1's
    rows there, and knows their ids from the keys each row carries (`_id_keys`);
    a row whose pulse brings a digest has none, and is decoded."""
    workers = two_workers(tmp_path / "s")
    try:
        other = workers[1]
        other.write_pulses(1, [pulse("a"), plain("p1"), pulse("b")], 0)
        digested = msgspec.structs.replace(pulse("c"), fingerprint=b"digest")
        other.write_pulses(1, [digested], 0)
        decoded = spy_decodes(monkeypatch)
        with workers[0].writing_together():
            pass  # reads all the other has logged
        assert decoded == [["c"]]
        assert sorted(workers[0]._parts[1].recent) == ["t\x1fa", "t\x1fb", "t\x1fc"]
        assert workers[0]._parts[1].digests == {"t\x1fc": b"digest"}
        outcomes = workers[0].write_pulses(1, [pulse("a"), pulse("b", 2), digested], 0)
        assert outcomes == ["duplicate", "conflict", "duplicate"]
    finally:
        for store in workers:
            store.close()


def test_a_write_without_ids_reads_no_log_while_other_writers_wait(
    stores: tuple[SQLiteStore, SQLiteStore],
) -> None:
    a, b = stores
    b.write_pulses(0, [pulse("theirs"), plain("b1")], 0)
    executed: list[str] = []
    a._file.writer.set_trace_callback(executed.append)
    assert a.write_pulses(0, [plain("a1")], 0) == ["accepted"]
    inside = executed[executed.index("BEGIN IMMEDIATE") : executed.index("COMMIT")]
    assert not any("FROM pulse_log" in sql for sql in inside), inside
    assert a._parts[0].ahead  # its row waits for b's rows to be read
    # A write with an id must know b's ids first: it reads b's row, and skips its own.
    assert a.write_pulses(0, [pulse("theirs")], 0) == ["duplicate"]
    assert not a._parts[0].ahead
    assert totals(a) == (3, 3)


def test_reads_that_cannot_fold_add_the_log_tail_themselves(
    stores: tuple[SQLiteStore, SQLiteStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a fold cannot be written (a full disk), reads answer exactly what they
    would after it, from the table and the log, and write nothing."""
    a, b = stores
    rng = random.Random(3)
    days = ["2026-11-26", "2026-11-27", "2026-11-28"]

    def some(count: int, prefix: str) -> list[Pulse]:
        return [
            Pulse(
                f"t{rng.randrange(3)}",
                f"s{rng.randrange(2)}",
                "u",
                rng.randrange(1, 10**12),
                f"{prefix}{n}",
                True,
                0,
                rng.choice(days),
                b"f",
            )
            for n in range(count)
        ]

    a.write_pulses(0, some(60, "a"), 0)
    assert a.commit_day(0, days[0], 0, 100)  # folds everything so far
    a.write_pulses(0, some(60, "b"), 0)  # left in a's memory and the log
    b.write_pulses(0, some(40, "c"), 0)  # and in b's
    Query = sqlite_store.AggregateQuery
    queries = [
        Query(),
        Query(status="open"),
        Query(status="committed"),
        Query(tenant_id="t1"),
        Query(product_sku="s0", date_from=days[1]),
        Query(date_to=days[1], limit=3),
        Query(after=(days[0], "t1", "s1", "u"), limit=5),
        Query(status="open", after=(days[1], "t0", "s1", "u"), limit=4),
    ]

    def everything(store: SQLiteStore) -> list[object]:
        return [*(store.aggregates(q) for q in queries), store.open_days(0), store.open_buckets()]

    before = folded_watermark(a)
    with monkeypatch.context() as patch:
        patch.setattr(SQLiteStore, "_settle", lambda self, parts: False)
        unfolded = everything(a)
    assert folded_watermark(a) == before  # nothing was written
    folded = everything(b)
    assert folded_watermark(a) > before
    assert unfolded == folded
    assert sum(len(rows) for rows in folded[:3]) > 10  # the queries select something


def test_a_catch_up_that_fails_midway_counts_nothing_twice(
    stores: tuple[SQLiteStore, SQLiteStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = stores
    b.write_pulses(0, [pulse("first", 1)], 0)
    a.write_pulses(0, [pulse("x", 5)], 0)
    a.write_pulses(0, [pulse("y", 7)], 0)
    calls: list[int] = []

    def failing_second(read: Callable[[bytes], T]) -> Callable[[bytes], T]:
        def second_fails(body: bytes) -> T:
            calls.append(1)
            if len(calls) == 2:  # b has taken in part of a's rows, not all
                raise sqlite3.OperationalError("injected")
            return read(body)

        return second_fails

    with monkeypatch.context() as patch:
        # A row's ids come from its column, its deltas from its pulses.
        for name in ("_decode_pulses", "_unpack_keys"):
            patch.setattr(sqlite_store, name, failing_second(getattr(sqlite_store, name)))
        with pytest.raises(StoreError, match="injected"):
            b.write_pulses(0, [pulse("z", 11)], 0)
    assert b.write_pulses(0, [pulse("x", 5), pulse("z", 11)], 0) == ["duplicate", "accepted"]
    assert totals(b) == (1 + 5 + 7 + 11, 4)
    assert totals(a) == (1 + 5 + 7 + 11, 4)


# -- GET /pulses: the index below the watermark, the log above it ------------------


def listed(store: SQLiteStore, tenant: str, limit: int) -> list[str]:
    """Every id of `tenant`'s pulses on DAY, page by page."""
    ids: list[str] = []
    after = None
    while True:
        page = store.pulses(
            sqlite_store.PulseQuery(tenant_id=tenant, day=DAY, after=after, limit=limit)
        )
        ids += [p.id for _, p in page]
        if len(page) < limit:
            return ids
        after = page[-1][0]


def rows(store: SQLiteStore, table: str) -> int:
    count: int = store._file.read(
        lambda c: c.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    )
    return count


def spans(store: SQLiteStore) -> list[tuple[str, int]]:
    """(tenant, how many log rows it lists) of each span, in key order."""
    found: list[tuple[str, int]] = store._file.read(
        lambda c: [
            (tenant, len(sqlite_store._unpack_seqs(seqs)))
            for tenant, seqs in c.execute(
                "SELECT tenant_id, seqs FROM pulse_spans ORDER BY tenant_id, day, seq"
            )
        ]
    )
    return found


def test_pulses_are_listed_from_the_index_and_the_unfolded_log(
    stores: tuple[SQLiteStore, SQLiteStore],
) -> None:
    a, b = stores
    written: dict[str, list[str]] = {"t1": [], "t2": []}

    def write(store: SQLiteStore, count: int) -> None:
        batch = [
            pulse(f"{store is a}-{len(written['t1'])}-{n}", tenant=f"t{n % 2 + 1}")
            for n in range(count)
        ]
        store.write_pulses(0, batch, 0)
        for p in batch:
            written[p.tenant_id].append(p.pulse_id)

    write(a, 5)
    write(b, 3)
    assert spans(a) == []  # writes add no index row: the fold does
    assert folded_watermark(a) == 0
    for store in stores:
        for limit in (1, 2, 1000):
            assert listed(store, "t1", limit) == written["t1"]
    totals(b)  # folds both writes
    assert spans(a) == [("t1", 2), ("t2", 2)]  # a (tenant, day) a fold, listing both rows
    write(a, 4)  # left above the watermark
    for store in stores:
        for tenant in ("t1", "t2"):
            for limit in (1, 3, 1000):
                assert listed(store, tenant, limit) == written[tenant]
    restarted = open_store(a.directory)  # memory rebuilt from the log, then folded
    try:
        totals(restarted)
        assert spans(restarted) == [("t1", 2), ("t1", 1), ("t2", 2), ("t2", 1)]
        assert listed(restarted, "t2", 2) == written["t2"]
    finally:
        restarted.close()


def test_a_fold_lists_its_log_rows_in_spans_of_at_most_span_max(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "_SPAN_MAX", 2)
    store = open_store(tmp_path / "s")
    try:
        for n in range(5):
            store.write_pulses(0, [pulse(f"p{n}"), pulse(f"q{n}", tenant="u")], 0)
        totals(store)
        assert spans(store) == [("t", 2), ("t", 2), ("t", 1), ("u", 2), ("u", 2), ("u", 1)]
        store.write_pulses(0, [pulse("p5")], 0)  # the tail
        for limit in (1, 2, 3, 1000):
            assert listed(store, "t", limit) == [f"p{n}" for n in range(6)]
            assert listed(store, "u", limit) == [f"q{n}" for n in range(5)]
    finally:
        store.close()


def test_a_span_goes_with_the_last_log_row_it_lists(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s")
    try:
        store.write_pulses(0, [pulse("old-1")], 10)
        store.write_pulses(0, [pulse("recent")], 10**12)  # the clock stepped back after it
        store.write_pulses(0, [pulse("old-2")], 10)
        totals(store)  # one fold: one span, listing the three rows
        assert spans(store) == [("t", 3)]
        assert store.purge(0, 100) == 2
        assert spans(store) == [("t", 3)]  # it still lists "recent"
        assert listed(store, "t", 1) == ["recent"]
        store.write_pulses(0, [pulse("new")], 10**12 + 1)
        totals(store)
        assert spans(store) == [("t", 3), ("t", 1)]
        assert store.purge(0, 10**12 + 1) == 1
        assert spans(store) == [("t", 1)]
        assert listed(store, "t", 1) == ["new"]
    finally:
        store.close()


def test_purge_forgets_the_ids_of_the_rows_it_removes_and_no_other(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s")
    try:
        store.write_pulses(0, [pulse("old-1"), plain("old-plain")], 10)
        store.write_pulses(0, [pulse("recent")], 10**12)  # the clock stepped back after it
        store.write_pulses(0, [pulse("old-2"), pulse("old-3")], 10)
        assert store.purge(0, 100) == 2  # merges every id into the index first
        kept = store._file.read(lambda c: c.execute("SELECT id_key, seq FROM pulse_ids").fetchall())
        assert kept == [("t\x1frecent", 2)]
        again = [pulse("old-1"), pulse("recent"), pulse("old-3")]
        assert store.write_pulses(0, again, 10**12) == ["accepted", "duplicate", "accepted"]
    finally:
        store.close()


def test_a_purge_that_finds_nothing_old_leaves_the_ids_in_memory(tmp_path: Path) -> None:
    """Merging is the writers' job, in slices of all partitions together; purge
    merges only before it removes rows."""
    store = open_store(tmp_path / "s")
    try:
        store.write_pulses(0, [pulse("a"), pulse("b")], 10)
        assert store.purge(0, 10) == 0
        assert (merged_watermark(store), rows(store, "pulse_ids")) == (0, 0)
        assert store.write_pulses(0, [pulse("a"), pulse("c")], 10) == ["duplicate", "accepted"]
    finally:
        store.close()


def test_a_span_lists_its_log_rows_in_log_order_when_memory_took_them_out_of_it(
    stores: tuple[SQLiteStore, SQLiteStore],
) -> None:
    """A row of ours written while another process's row before it was unread
    joins memory first (`_Partition.ahead`); the listing still follows the log."""
    a, b = stores
    a.write_pulses(0, [pulse("first")], 0)  # a's memory is in step with the file
    b.write_pulses(0, [plain("b1")], 0)
    a.write_pulses(0, [plain("a1")], 0)  # b's row is not read: a1's is held ahead
    b.write_pulses(0, [plain("b2")], 0)
    a.write_pulses(0, [plain("a2")], 0)
    totals(a)  # a reads b's rows, then folds
    assert spans(a) == [("t", 5)]
    for store in stores:
        assert listed(store, "t", 1) == ["first", "b1", "a1", "b2", "a2"]


def test_a_fold_during_a_listing_neither_repeats_nor_skips_a_pulse(
    stores: tuple[SQLiteStore, SQLiteStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watermark, the index and the log are read in one snapshot."""
    a, b = stores
    a.write_pulses(0, [pulse("folded")], 0)
    totals(a)
    a.write_pulses(0, [pulse("unfolded-1"), pulse("unfolded-2")], 0)
    read = a._file.read

    class FoldAfterWatermark:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
            cursor = self.conn.execute(sql, *args)
            if "FROM meta" in sql:
                totals(b)  # another process folds the tail meanwhile
            return cursor

    monkeypatch.setattr(a._file, "read", lambda fn: read(lambda c: fn(FoldAfterWatermark(c))))
    before = folded_watermark(b)
    assert listed(a, "t", 1000) == ["folded", "unfolded-1", "unfolded-2"]
    assert folded_watermark(b) > before  # the fold did happen during the listing


# -- a merge runs in slices, one per transaction -----------------------------------


def indexed(store: SQLiteStore) -> int:
    return rows(store, "pulse_ids")


@pytest.fixture
def slices_of_3(small_merges: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "_MERGE_CHUNK", 3)


FIRST = [pulse(f"m{i}") for i in range(8)]  # enough to plan a merge


@pytest.mark.usefixtures("slices_of_3")
def test_a_merge_inserts_a_slice_per_transaction_and_forgets_no_id(
    stores: tuple[SQLiteStore, SQLiteStore],
) -> None:
    a, b = stores
    assert a.write_pulses(0, FIRST, 0) == ["accepted"] * 8
    counts, marks = [], []
    for step in range(4):
        # Each write runs one slice; ids of the plan are known all along.
        outcomes = a.write_pulses(0, [pulse(f"m{7 - step}"), pulse(f"n{step}")], 0)
        assert outcomes == ["duplicate", "accepted"], step
        counts.append(indexed(a))
        marks.append(merged_watermark(a))
    assert counts == [3, 6, 8, 8]  # slices of 3, 3 and 2; then nothing waits
    assert marks[:2] == [0, 0]
    assert marks[2] == marks[3] > 0  # moved with the last slice
    assert sorted(a._parts[0].recent) == [f"t\x1fn{i}" for i in range(4)]
    again = [*FIRST, *(pulse(f"n{i}") for i in range(4))]
    assert b.write_pulses(0, again, 0) == ["duplicate"] * 12


def test_a_merge_indexes_each_id_with_its_log_row_however_many_a_statement_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ids are inserted `_INSERT_ROWS` a statement and the rest one by one: a merge
    of two such statements and 7 more indexes every id, each with the log row
    that holds it, and none else."""
    count = 2 * sqlite_store._INSERT_ROWS + 7
    monkeypatch.setattr(sqlite_store, "_MERGE_AT", count)
    monkeypatch.setattr(sqlite_store, "_MERGE_MAX", count)
    monkeypatch.setattr(sqlite_store, "_MERGE_CHUNK", 10 * count)
    first = [pulse(f"a{i}") for i in range(300)]
    second = [pulse(f"b{i}", tenant="u") for i in range(count - 300)]
    store, other = open_store(tmp_path / "s"), open_store(tmp_path / "s")
    try:
        assert store.write_pulses(0, first, 0) == ["accepted"] * len(first)
        assert store.write_pulses(0, second, 0) == ["accepted"] * len(second)
        assert indexed(store) == 0
        assert store.write_pulses(0, [pulse("c")], 0) == ["accepted"]  # runs the merge
        seq_a, seq_b, _ = store._file.read(
            lambda c: [seq for (seq,) in c.execute("SELECT seq FROM pulse_log ORDER BY seq")]
        )
        found = dict(
            store._file.read(lambda c: c.execute("SELECT id_key, seq FROM pulse_ids").fetchall())
        )
        assert found == {
            **{f"t\x1fa{i}": seq_a for i in range(len(first))},
            **{f"u\x1fb{i}": seq_b for i in range(len(second))},
        }
        assert sorted(store._parts[0].recent) == ["t\x1fc"]
        changed = [pulse(p.pulse_id, 2, p.tenant_id) for p in (*first[-1:], *second[-1:])]
        assert other.write_pulses(0, [*first, *second], 0) == ["duplicate"] * count
        assert other.write_pulses(0, changed, 0) == ["conflict"] * 2
    finally:
        store.close()
        other.close()


@pytest.mark.usefixtures("slices_of_3")
def test_memory_stays_bounded_when_each_write_brings_more_ids_than_a_slice(
    tmp_path: Path,
) -> None:
    """Writes of 10 new ids each, slices of 3: merges keep pace with the writes,
    so the ids waiting in memory stop growing, and every id stays known."""
    store = open_store(tmp_path / "s")
    try:
        waiting, plans = [], []
        for n in range(120):
            batch = [pulse(f"w{n}-{i}") for i in range(10)]
            assert store.write_pulses(0, batch, 0) == ["accepted"] * 10
            waiting.append(len(store._parts[0].recent))
            if store._merging is not None:
                plans.append(store._merging.size)
        # A plan is done by the time half as many new ids wait: it holds at most
        # about two writes' ids, and memory what it plans plus what has joined.
        assert max(plans[len(plans) // 2 :]) <= 2 * 10 + 10
        assert max(waiting[60:]) <= max(waiting[:60]) <= 50
        everything = [pulse(f"w{n}-{i}") for n in range(120) for i in range(10)]
        assert store.write_pulses(0, everything, 0) == ["duplicate"] * 1200
        assert indexed(store) + len(store._parts[0].recent) >= 1200
    finally:
        store.close()


def test_merges_grow_while_each_id_costs_much_and_shrink_once_it_costs_little(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each plan that cost more than `_MERGE_DEAR` CPU seconds an id doubles the
    ids waiting that start the next, up to `_MERGE_MAX`; each that cost less
    than `_MERGE_CHEAP` halves it, down to `_MERGE_AT`. Every process reads
    it from the file: a plan takes every id waiting, from that many to that
    many plus the ids of one write."""
    monkeypatch.setattr(sqlite_store, "_MERGE_AT", 7)
    monkeypatch.setattr(sqlite_store, "_MERGE_MAX", 28)
    plans: list[int] = []  # the size of each plan made

    class Plan(sqlite_store._MergePlan):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            plans.append(self.size)

    monkeypatch.setattr(sqlite_store, "_MergePlan", Plan)
    stores = [open_store(tmp_path / "s"), open_store(tmp_path / "s")]
    try:
        written = 0

        def plan_sizes(count: int) -> list[int]:
            nonlocal written
            del plans[:]
            while len(plans) < count:
                store = stores[written % 2]
                batch = [pulse(f"g{written}-{i}") for i in range(3)]
                assert store.write_pulses(0, batch, 0) == ["accepted"] * 3
                written += 1
            return plans[:count]

        monkeypatch.setattr(sqlite_store, "_MERGE_DEAR", 0.0)  # every merge costs much
        sizes = plan_sizes(5)
        starts = [7, 14, 28, 28, 28]
        assert all(s <= n < s + 3 for s, n in zip(starts, sizes, strict=True)), sizes
        monkeypatch.setattr(sqlite_store, "_MERGE_DEAR", 1.0)
        monkeypatch.setattr(sqlite_store, "_MERGE_CHEAP", 1.0)  # ... and now little
        sizes = plan_sizes(4)
        starts = [28, 14, 7, 7]
        assert all(s <= n < s + 3 for s, n in zip(starts, sizes, strict=True)), sizes
        everything = [pulse(f"g{n}-{i}") for n in range(written) for i in range(3)]
        for store in stores:
            assert store.write_pulses(0, everything, 0) == ["duplicate"] * len(everything)
    finally:
        for store in stores:
            store.close()


def test_a_process_merges_alone_only_past_four_times_the_merge_size_in_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Merges have grown to 28 ids (from 7): while `a` merges, `b` merges alone
    once `_MERGE_ALONE_AT` / `_MERGE_AT` times that wait in its memory (twice
    here: 56), not twice 7."""
    monkeypatch.setattr(sqlite_store, "_MERGE_AT", 7)
    monkeypatch.setattr(sqlite_store, "_MERGE_MAX", 28)
    monkeypatch.setattr(sqlite_store, "_MERGE_ALONE_AT", 14)
    monkeypatch.setattr(sqlite_store, "_MERGE_DEAR", 0.0)  # every merge costs much
    a, b = open_store(tmp_path / "s"), open_store(tmp_path / "s")
    try:
        n = 0
        while a._file.read(lambda c: sqlite_store._meta_int(c, "merge_at")) < 28:
            a.write_pulses(0, [pulse(f"a{n}-{i}") for i in range(3)], 0)
            n += 1
        monkeypatch.setattr(sqlite_store, "_MERGE_CHUNK", 2)  # a's next plan spans writes
        while a._merging is None:
            a.write_pulses(0, [pulse(f"a{n}-{i}") for i in range(3)], 0)
            n += 1
        waiting: list[int] = []
        while b._merging is None:
            b.write_pulses(0, [pulse(f"b{len(waiting)}-{i}") for i in range(3)], 0)
            waiting.append(len(b._parts[0].recent))
        # Each write asks with the ids waiting before its own join.
        assert waiting[0] > 14  # twice 7: unscaled, b would have merged at once
        assert max(waiting[:-2]) < 56 <= waiting[-2]
        everything = [pulse(f"a{k}-{i}") for k in range(n) for i in range(3)]
        everything += [pulse(f"b{k}-{i}") for k in range(len(waiting)) for i in range(3)]
        while a._merging is not None or b._merging is not None:
            for store in (a, b):
                store.write_pulses(0, everything[:1], 0)
        for store in (a, b):
            assert store.write_pulses(0, everything, 0) == ["duplicate"] * len(everything)
    finally:
        a.close()
        b.close()


def orphans(store: SQLiteStore) -> int:
    """Ids the index holds whose log row is gone."""
    count: int = store._file.read(
        lambda c: c.execute(
            "SELECT count(*) FROM pulse_ids WHERE seq NOT IN (SELECT seq FROM pulse_log)"
        ).fetchone()[0]
    )
    return count


@pytest.mark.usefixtures("slices_of_3")
def test_every_id_the_index_holds_names_a_log_row_whoever_merges_or_purges(
    stores: tuple[SQLiteStore, SQLiteStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random writes, some of rows old enough to purge, and purges, from two
    processes that both merge: no id the index holds outlives its log row,
    and every write finds what it looks up."""
    monkeypatch.setattr(sqlite_store, "_MERGE_ALONE_AT", 9)  # both merge, the same ids
    rng = random.Random(7)
    purged = 0
    for step in range(200):
        store = rng.choice(stores)
        if rng.random() < 0.9:
            batch = [pulse(f"id{rng.randrange(400)}") for _ in range(rng.randrange(1, 6))]
            store.write_pulses(0, batch, -1 if rng.random() < 0.3 else 1)
        else:
            purged += store.purge(0, 0)  # the rows written at -1, and their ids
        assert orphans(store) == 0, step
    assert purged
    assert indexed(stores[0]) > 50


@pytest.mark.usefixtures("slices_of_3")
@pytest.mark.parametrize("purger", [0, 1], ids=["the merging process", "another"])
def test_a_purge_during_a_sliced_merge_never_puts_back_the_ids_it_removed(
    stores: tuple[SQLiteStore, SQLiteStore], purger: int
) -> None:
    """The plan holds ids of a row that a purge removes before its later slices
    run: they must not go back into the index, whose entry would name a log
    row that is gone (each later write of the id then failed)."""
    a, _ = stores
    old = [pulse(f"old{i}") for i in range(8)]
    a.write_pulses(0, old, -1)
    a.write_pulses(0, [pulse("n0")], 1)  # plans the merge of `old`, inserts 3
    assert a._merging is not None
    assert indexed(a) == 3
    assert stores[purger].purge(0, 0) == 1
    assert indexed(a) == 1  # n0, merged by the purge
    for step in range(3):  # the plan's slices would have run here
        assert a.write_pulses(0, [pulse(f"n{step + 1}")], 1) == ["accepted"]
    assert orphans(a) == 0
    # Forgotten with their row, as the dedup window says: new again, once.
    assert stores[purger].write_pulses(0, old, 1) == ["accepted"] * 8
    assert stores[1 - purger].write_pulses(0, old, 1) == ["duplicate"] * 8
    assert stores[1].write_pulses(0, [pulse(f"n{i}") for i in range(4)], 1) == ["duplicate"] * 4


@pytest.mark.usefixtures("slices_of_3")
def test_another_process_merging_makes_memory_drop_ids_not_read_the_log_again(
    stores: tuple[SQLiteStore, SQLiteStore],
) -> None:
    """`b` has read every row up to its own when `a`'s merge moves the mark: it
    drops the ids up to the mark and reads on from where it was, not from the
    mark, and still knows every id."""
    a, b = stores
    a.write_pulses(0, FIRST, 0)
    a.write_pulses(0, [pulse("n0")], 0)  # plans a merge of FIRST, and runs a slice
    b.write_pulses(0, [pulse("b0")], 0)  # reads FIRST's and n0's rows
    a.write_pulses(0, [pulse("n1")], 0)
    a.write_pulses(0, [pulse("n2")], 0)  # the last slice: the mark moves
    mark, seen = merged_watermark(a), b._parts[0].seen_seq
    assert 0 < mark < seen
    executed: list[str] = []
    b._file.writer.set_trace_callback(executed.append)
    again = [pulse("m3"), pulse("n0"), pulse("b0"), pulse("n2"), pulse("b1")]
    assert b.write_pulses(0, again, 0) == ["duplicate"] * 4 + ["accepted"]
    bounds = [
        int(sql.rsplit("seq > ", 1)[1].split()[0])
        for sql in executed
        if "FROM pulse_log WHERE part = 0 AND seq >" in sql
    ]
    assert bounds == [seen]
    assert sorted(b._parts[0].recent) == [f"t\x1f{i}" for i in ("b0", "b1", "n0", "n1", "n2")]
    assert sorted(a._parts[0].recent) == [f"t\x1f{i}" for i in ("b0", "n0", "n1", "n2")]


@pytest.mark.usefixtures("slices_of_3")
def test_a_last_slice_that_rolls_back_is_run_again(
    stores: tuple[SQLiteStore, SQLiteStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = stores
    a.write_pulses(0, FIRST, 0)
    a.write_pulses(0, [pulse("x0")], 0)
    a.write_pulses(0, [pulse("x1")], 0)
    assert indexed(a) == 6
    with failing_before_commit(monkeypatch), pytest.raises(StoreError):
        a.write_pulses(0, [pulse("lost")], 0)  # runs the last slice, then fails
    assert (indexed(a), merged_watermark(a)) == (6, 0)
    outcomes = a.write_pulses(0, [*FIRST, pulse("lost")], 0)  # runs it again
    assert outcomes == ["duplicate"] * 8 + ["accepted"]
    assert indexed(a) == 8
    assert merged_watermark(a) > 0


@pytest.mark.usefixtures("slices_of_3")
def test_a_merge_by_another_process_meanwhile_never_moves_a_mark_back(
    stores: tuple[SQLiteStore, SQLiteStore],
) -> None:
    a, b = stores
    a.write_pulses(0, FIRST, 0)
    a.write_pulses(0, [pulse("x0")], 0)  # a plans the merge of FIRST, runs a slice
    b.write_pulses(0, [pulse("y0")], 0)
    b.write_pulses(0, [plain("old")], -1)
    b.purge(0, 0)  # removes that row, but merges every id first, x0 and y0 too
    theirs = merged_watermark(b)
    assert indexed(b) == 10
    for step in range(3):  # a's remaining slices, and more
        assert a.write_pulses(0, [pulse("x0"), pulse(f"z{step}")], 0) == [
            "duplicate",
            "accepted",
        ]
    assert merged_watermark(a) == theirs  # a's plan ended below b's mark
    assert a._merging is None
    everything = [*FIRST, pulse("x0"), pulse("y0"), *(pulse(f"z{i}") for i in range(3))]
    for store in stores:
        assert store.write_pulses(0, everything, 0) == ["duplicate"] * 13


@pytest.mark.usefixtures("small_merges")
def test_a_plan_that_finds_every_id_merged_meanwhile_ends_with_nothing_to_insert(
    stores: tuple[SQLiteStore, SQLiteStore],
) -> None:
    """`a` counts enough ids in memory to plan a merge, but catching up it finds
    that `b` has merged them all: its plan is empty, and ends at once."""
    a, b = stores
    first = [pulse(f"e{i}") for i in range(8)]
    a.write_pulses(0, first, 0)
    assert b.write_pulses(0, first[:1], 0) == ["duplicate"]  # b merges a's 8 ids
    assert b._merging is None
    assert indexed(b) == 8
    # Without an id, a's write catches up only once it has planned the merge.
    assert a.write_pulses(0, [plain("e8")], 0) == ["accepted"]
    assert a._merging is None
    assert a.write_pulses(0, first, 0) == ["duplicate"] * 8


@pytest.mark.usefixtures("small_merges")
def test_one_process_merges_at_a_time_unless_it_falls_far_behind(
    stores: tuple[SQLiteStore, SQLiteStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "_MERGE_CHUNK", 2)  # a plan spans transactions
    monkeypatch.setattr(sqlite_store, "_MERGE_ALONE_AT", 14)
    a, b = stores
    a.write_pulses(0, [pulse(f"a{i}") for i in range(8)], 0)
    a.write_pulses(0, [pulse("a8")], 0)  # plans the merge of 8 ids, inserts 2 of them
    assert a._merging is not None
    for n in range(3):
        b.write_pulses(0, [pulse(f"b{n}{i}") for i in range(2)], 0)
        assert b._merging is None, n  # 9 of a's ids and its own: a merges them
    b.write_pulses(0, [pulse("b30")], 0)  # holds 15: a is too slow, it merges too
    assert b._merging is not None
    written = [pulse(f"a{i}") for i in range(9)]
    written += [pulse(f"b{n}{i}") for n in range(3) for i in range(2)] + [pulse("b30")]
    while a._merging is not None or b._merging is not None:
        for store in stores:
            assert store.write_pulses(0, written[:1], 0) == ["duplicate"]
    other = open_store(a.directory)
    try:
        assert other._lock_merges()  # nobody merges: the lock is free
    finally:
        other.close()
    for store in stores:
        assert store.write_pulses(0, written, 0) == ["duplicate"] * len(written)
    assert indexed(a) == len(written)


# -- a restart after a checkpoint that died midway ---------------------------------


def test_a_store_whose_checkpoint_died_midway_opens_with_its_wal(tmp_path: Path) -> None:
    """A kill during a checkpoint leaves the file with some pages of the WAL and
    not others: only file and WAL together are the store. Opening it must read
    both, never the file alone, which SQLite then finds malformed."""
    store = open_store(tmp_path / "s")
    store._file.writer.execute("PRAGMA wal_autocheckpoint = 0")  # all stays in the WAL
    for n in range(60):
        store.write_pulses(0, [pulse(f"w{n}-{i}", tenant=f"t{i}") for i in range(40)], 0)
    dead = tmp_path / "dead"
    dead.mkdir()
    for name in ("store.sqlite", "store.sqlite-wal"):  # as a kill leaves them
        (dead / name).write_bytes((tmp_path / "s" / name).read_bytes())
    store.close()
    wal = (dead / "store.sqlite-wal").read_bytes()
    page_size = int.from_bytes(wal[8:12], "big")
    latest: dict[int, bytes] = {}
    for at in range(32, len(wal), 24 + page_size):
        latest[int.from_bytes(wal[at : at + 4], "big")] = wal[at + 24 : at + 24 + page_size]
    assert len(latest) > 10
    with (dead / "store.sqlite").open("r+b") as db:  # the checkpoint copied half
        for page in sorted(latest)[: len(latest) // 2]:
            db.seek((page - 1) * page_size)
            db.write(latest[page])
    reopened = open_store(dead)
    try:
        assert totals(reopened) == (60 * 40, 60 * 40)
        assert reopened.write_pulses(0, [pulse("w0-0", tenant="t0")], 0) == ["duplicate"]
    finally:
        reopened.close()
