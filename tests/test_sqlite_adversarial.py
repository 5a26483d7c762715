"""Adversarial tests of the SQLite store shared by several processes.

Two `SQLiteStore` objects opened on one directory, each with connections of
its own, stand in for two worker processes (as in `test_sqlite_dedup.py`);
the crash tests fork a real child process and kill it with `os._exit`.

- A hypothesis state machine drives both stores with writes (alone and in
  rounds), sliced merges, purges, commits, folds, reopenings and writes that
  fail (a full disk, a statement that fails, SQLite undoing the whole
  transaction, an fsync that fails after COMMIT), and after every step
  compares either store's answers with a model: each id accepted once,
  replays duplicate, changed payloads conflict, totals, listings and the
  outbox adding up.
- A child process writes, merges, folds, purges and commits on the store
  another store object holds open, and dies at a chosen point (after COMMIT
  before its fsync, inside a merge slice, a fold, a purge, a commit): nothing
  it acknowledged is lost, nothing is counted twice, and the survivor and a
  reopened store agree with the model.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import random
import re
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

import ingestor.store.sqlite as sqlite_store
from ingestor.errors import StoreError, StoreMismatch
from ingestor.model import Pulse
from ingestor.money import parse_nanos
from ingestor.partition import partition_of
from ingestor.store import AggregateQuery, BatchQuery, PulseQuery
from ingestor.store.sqlite import SQLiteStore

DAY = "2026-11-28"
PARTS = 2
OLD, NEW, PURGE_BEFORE = 0, 10, 5  # received_at of old and new rows; purge takes the old


def tenants_of(partition: int, count: int) -> list[str]:
    names = (f"tenant-{n}" for n in range(1000))
    return [name for name in names if partition_of(name, PARTS) == partition][:count]


TENANTS = [*tenants_of(0, 2), *tenants_of(1, 1)]
PART_OF = {t: partition_of(t, PARTS) for t in TENANTS}

# (worker of the first store, worker of the second): which partitions' deltas each keeps.
SHARES = {
    "both keep": ((0, 1), (0, 1)),
    "one keeps each": ((0, 2), (1, 2)),
    "same share": ((1, 2), (1, 2)),
}


def make_pulse(tenant: str, pulse_id: str | None, amount: int) -> Pulse:
    if pulse_id is None:
        return Pulse(tenant, "sku", "unit", amount, "", False, 0, DAY, b"")
    return Pulse(tenant, "sku", "unit", amount, pulse_id, True, 0, DAY, b"")


def open_at(directory: Path, worker: tuple[int, int], durability: str = "os") -> SQLiteStore:
    return SQLiteStore.open(
        directory, partitions=PARTS, durability=durability, busy_timeout=5, worker=worker
    )


@pytest.fixture
def small_merges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Merges of 5 ids, 2 a transaction; a process merges alone past 10."""
    monkeypatch.setattr(sqlite_store, "_MERGE_AT", 5)
    monkeypatch.setattr(sqlite_store, "_MERGE_MAX", 5)
    monkeypatch.setattr(sqlite_store, "_MERGE_CHUNK", 2)
    monkeypatch.setattr(sqlite_store, "_MERGE_ALONE_AT", 10)
    # Reads that cannot fold say so in a warning: expected here, by the hundred.
    monkeypatch.setattr(logging.getLogger("ingestor.store"), "disabled", True)


# -- the model both stores are compared with -----------------------------------------


class Row:
    """A log row of the model: its partition, when it was received, its pulses."""

    def __init__(self, partition: int, received: int, pulses: list[Pulse]) -> None:
        self.partition = partition
        self.received = received
        self.pulses = pulses


class Model:
    """What the store must hold: the log rows not purged, and every amount counted."""

    def __init__(self) -> None:
        self.rows: list[Row] = []  # in log order
        self.total: dict[str, tuple[int, int]] = {t: (0, 0) for t in TENANTS}

    def live_ids(self) -> dict[tuple[str, str], int]:
        return {
            (p.tenant_id, p.pulse_id): p.nanos for r in self.rows for p in r.pulses if p.client_id
        }

    def expect(self, pulses: list[Pulse]) -> list[str]:
        known = self.live_ids()
        outcomes = []
        for p in pulses:
            key = (p.tenant_id, p.pulse_id)
            if not p.client_id:
                outcomes.append("accepted")
            elif key not in known:
                known[key] = p.nanos
                outcomes.append("accepted")
            else:
                outcomes.append("duplicate" if known[key] == p.nanos else "conflict")
        return outcomes

    def take(self, partition: int, received: int, pulses: list[Pulse], outcomes: list[str]) -> None:
        accepted = [p for p, o in zip(pulses, outcomes, strict=True) if o == "accepted"]
        if accepted:
            self.rows.append(Row(partition, received, accepted))
        for p in accepted:
            amount, count = self.total[p.tenant_id]
            self.total[p.tenant_id] = (amount + p.nanos, count + 1)

    def purged(self, partition: int, before: int) -> list[Row]:
        return [r for r in self.rows if r.partition == partition and r.received < before]

    def purge(self, partition: int, before: int) -> None:
        gone = self.purged(partition, before)
        self.rows = [r for r in self.rows if all(r is not g for g in gone)]

    def owned(self, partition: int) -> int:
        return sum(a for t, (a, _) in self.total.items() if PART_OF[t] == partition)

    # -- what a store must answer ---------------------------------------------

    def check_totals(self, store: SQLiteStore) -> None:
        buckets = store.aggregates(AggregateQuery())
        found = {t: (0, 0) for t in TENANTS}
        committed = [0] * PARTS
        for bucket in buckets:
            found[bucket.tenant_id] = (parse_nanos(bucket.used_amount), bucket.pulse_count)
            committed[PART_OF[bucket.tenant_id]] += parse_nanos(bucket.committed_amount)
            assert bucket.committed_count <= bucket.pulse_count
        assert found == self.total
        assert committed == outbox(store)  # a bucket is committed iff its delta is in a batch

    def check_listing(self, store: SQLiteStore, tenant: str, limit: int) -> None:
        listed: list[tuple[str, bool]] = []
        after = None
        while True:
            page = store.pulses(PulseQuery(tenant_id=tenant, day=DAY, after=after, limit=limit))
            listed += [(p.id, p.id_assigned) for _, p in page]
            if len(page) < limit:
                break
            after = page[-1][0]
        expected = [
            ("", True) if not p.client_id else (p.pulse_id, False)
            for r in self.rows
            for p in r.pulses
            if p.tenant_id == tenant
        ]
        assert [("" if assigned else i, assigned) for i, assigned in listed] == expected
        assigned = [i for i, a in listed if a]
        assert len(set(assigned)) == len(assigned)

    def check_replays(self, store: SQLiteStore, changed: bool = False) -> None:
        """Every live id replayed is a duplicate; with another amount, a conflict."""
        for partition in range(PARTS):
            replay = [
                make_pulse(t, i, 3 - a if changed else a)
                for (t, i), a in self.live_ids().items()
                if PART_OF[t] == partition
            ]
            if replay:
                outcome = "conflict" if changed else "duplicate"
                assert store.write_pulses(partition, replay, NEW) == [outcome] * len(replay)

    def check_everything(self, store: SQLiteStore) -> None:
        self.check_totals(store)
        for tenant in TENANTS:
            self.check_listing(store, tenant, 2)
        self.check_replays(store)
        self.check_replays(store, changed=True)


def outbox(store: SQLiteStore) -> list[int]:
    """The amount of every batch in the outbox, per partition."""
    amounts = [0] * PARTS
    for batch in store.batches(BatchQuery(limit=10_000)):
        amounts[batch.partition] += parse_nanos(batch.used_amount)
    return amounts


def old_rows(store: SQLiteStore, partition: int, before: int) -> int:
    count: int = store._file.read(
        lambda c: c.execute(
            "SELECT count(*) FROM pulse_log WHERE part = ? AND received_at < ?",
            (partition, before),
        ).fetchone()[0]
    )
    return count


# -- faults ------------------------------------------------------------------------


class Faulty:
    """The writer connection, whose `countdown`-th statement from now fails as
    SQLITE_FULL would: alone, or (`undo`) with SQLite rolling back the whole
    transaction first. A read transaction's COMMIT never fails."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.countdown: int | None = None
        self.undo = False
        self.fired = False
        self.writing = False

    def _tick(self, sql: str) -> None:
        if sql.startswith("BEGIN"):
            self.writing = sql == "BEGIN IMMEDIATE"
        if self.countdown is None or (sql == "COMMIT" and not self.writing):
            return
        if self.countdown > 0:
            self.countdown -= 1
            return
        self.countdown = None
        self.fired = True
        if self.undo and self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        error = sqlite3.OperationalError("database or disk is full")
        error.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
        raise error

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        self._tick(sql)
        return self.conn.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:
        self._tick(sql)
        return self.conn.executemany(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


# None, ("stmt", n, undo): the n-th statement fails; ("full",): the file may not
# grow by a page; ("sync",): the next fsync fails, after its COMMIT.
FAULT = st.one_of(
    st.none(),
    st.tuples(st.just("stmt"), st.integers(0, 24), st.booleans()),
    st.just(("full",)),
    st.just(("sync",)),
)
Fault = tuple[Any, ...] | None


@contextmanager
def faulty(store: SQLiteStore, fault: Fault) -> Iterator[list[bool]]:
    """Arm `fault` on `store`; the list yielded says, once the block ends,
    whether it may have fired."""
    fired = [False]
    writer: Faulty = store._file.writer  # type: ignore[assignment]
    writer.fired = False
    if fault is not None and fault[0] == "stmt":
        writer.countdown, writer.undo = fault[1], fault[2]
    elif fault == ("full",):
        (pages,) = writer.conn.execute("PRAGMA page_count").fetchone()
        writer.conn.execute(f"PRAGMA max_page_count = {pages}")
    elif fault == ("sync",):

        def failing_sync(what: str) -> None:
            del store._file._sync  # once
            fired[0] = True
            raise StoreError(f"{what}: injected fsync failure")

        store._file._sync = failing_sync  # type: ignore[method-assign]
    try:
        yield fired
    finally:
        writer.countdown = None
        fired[0] = fired[0] or writer.fired
        if fault == ("full",):
            writer.conn.execute("PRAGMA max_page_count = 1073741823")
            fired[0] = True  # maybe: whether a write needed a new page is SQLite's affair
        if "_sync" in vars(store._file):
            del store._file._sync


# -- the state machine ---------------------------------------------------------------

PULSE = st.tuples(
    st.sampled_from(TENANTS),
    st.one_of(st.none(), st.sampled_from([f"id{i}" for i in range(12)])),
    st.sampled_from([1, 2]),
)
Batch = list[tuple[str, str | None, int]]


class TwoProcesses(RuleBasedStateMachine):
    share: tuple[tuple[int, int], tuple[int, int]] = SHARES["both keep"]

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="adversarial-"))
        self.directory = self.tmp / "s"
        self.stores = [self.open(0), self.open(1)]
        self.model = Model()

    def open(self, which: int) -> SQLiteStore:
        store = open_at(self.directory, self.share[which])
        store._file.writer = Faulty(store._file.writer)  # type: ignore[assignment]
        return store

    def teardown(self) -> None:
        for store in self.stores:
            store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    @rule(which=st.integers(0, 1), batch=st.lists(PULSE, min_size=1, max_size=5),
          old=st.booleans(), fault=FAULT)  # fmt: skip
    def write(self, which: int, batch: Batch, old: bool, fault: Fault) -> None:
        """One partition's write, alone."""
        store, received = self.stores[which], OLD if old else NEW
        partition = PART_OF[batch[0][0]]
        pulses = [make_pulse(t, i, a) for t, i, a in batch if PART_OF[t] == partition]
        expected = self.model.expect(pulses)
        with faulty(store, fault) as fired:
            try:
                got = store.write_pulses(partition, pulses, received)
            except StoreError:
                got = None
        if got is None:
            assert fired[0]
            if fault == ("sync",):  # committed, not acknowledged: it is in the file
                self.model.take(partition, received, pulses, expected)
            return
        assert got == expected
        self.model.take(partition, received, pulses, expected)

    @rule(which=st.integers(0, 1), batch=st.lists(PULSE, min_size=1, max_size=6),
          old=st.booleans(), fault=FAULT)  # fmt: skip
    def write_round(self, which: int, batch: Batch, old: bool, fault: Fault) -> None:
        """Every partition's share of a batch in one round (one transaction), as a
        shard writes them: a write that fails alone leaves the others."""
        store, received = self.stores[which], OLD if old else NEW
        results = []
        with faulty(store, fault) as fired:
            try:
                with store.writing_together():
                    for partition in range(PARTS):
                        pulses = [
                            make_pulse(t, i, a) for t, i, a in batch if PART_OF[t] == partition
                        ]
                        if not pulses:
                            continue
                        expected = self.model.expect(pulses)
                        try:
                            got = store.write_pulses(partition, pulses, received)
                        except StoreError:
                            continue  # this write alone left nothing
                        assert got == expected
                        results.append((partition, pulses, expected))
            except StoreError:
                if fault != ("sync",):
                    results = []  # the round rolled back: none of it counts
        if fault is None:
            assert not fired[0]
        for partition, pulses, expected in results:
            self.model.take(partition, received, pulses, expected)

    @rule(which=st.integers(0, 1), partition=st.integers(0, PARTS - 1), fault=FAULT,
          everything=st.booleans())  # fmt: skip
    def purge(self, which: int, partition: int, fault: Fault, everything: bool) -> None:
        store = self.stores[which]
        before = NEW + 1 if everything else PURGE_BEFORE
        gone = len(self.model.purged(partition, before))
        with faulty(store, fault) as fired:
            try:
                removed: int | None = store.purge(partition, before)
            except StoreError:
                removed = None
        if removed is None:
            # A transaction a slice of old rows, then one that finds none: the
            # one that failed may be either.
            assert fired[0]
            left = old_rows(store, partition, before)
            assert left in (0, gone)
            if left:
                return
        else:
            assert removed == gone
        self.model.purge(partition, before)

    @rule(which=st.integers(0, 1), partition=st.integers(0, PARTS - 1), fault=FAULT)
    def commit_day(self, which: int, partition: int, fault: Fault) -> None:
        store = self.stores[which]
        before = outbox(store)[partition]
        with faulty(store, fault) as fired:
            try:
                batches = store.commit_day(partition, DAY, 0, 2)
            except StoreError:
                batches = None
        after = outbox(store)[partition]
        if batches is None:
            assert fired[0]
            assert after in (before, self.model.owned(partition))
            return
        assert before + sum(parse_nanos(b.used_amount) for b in batches) == after
        # Every pulse acknowledged by either store is in a batch, once.
        assert after == self.model.owned(partition)

    @rule(which=st.integers(0, 1))
    def reopen(self, which: int) -> None:
        self.stores[which].close()
        self.stores[which] = self.open(which)

    @rule(which=st.integers(0, 1), fault=FAULT)
    def totals_agree(self, which: int, fault: Fault) -> None:
        """A read that cannot fold adds the log's tail itself: the same answer."""
        store = self.stores[which]
        with faulty(store, fault) as fired:
            try:
                buckets = store.aggregates(AggregateQuery())
                open_count = store.open_buckets()
                open_days = [store.open_days(p) for p in range(PARTS)]
            except StoreError:
                assert fault == ("sync",)  # a read is synced before it is answered
                return
        if fault is None:
            assert not fired[0]
        self.model.check_totals(store)
        is_open = [b.pulse_count > b.committed_count for b in buckets]
        assert open_count == sum(is_open)
        # All partitions together (each alone: test_open_days_of_a_partition_...).
        assert sorted(set().union(*open_days)) == ([DAY] if any(is_open) else [])

    @rule(which=st.integers(0, 1), tenant=st.sampled_from(TENANTS),
          limit=st.sampled_from([1, 2, 100]))  # fmt: skip
    def listing_agrees(self, which: int, tenant: str, limit: int) -> None:
        self.model.check_listing(self.stores[which], tenant, limit)

    @rule(which=st.integers(0, 1), changed=st.booleans())
    def replays(self, which: int, changed: bool) -> None:
        self.model.check_replays(self.stores[which], changed)


@pytest.mark.usefixtures("small_merges")
@pytest.mark.parametrize("fold_after", [0.0, 1000.0], ids=["every write folds", "reads fold"])
@pytest.mark.parametrize("share", list(SHARES))
def test_two_processes_agree_with_the_model_whatever_fails(
    share: str, fold_after: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "_FOLD_AFTER_S", fold_after)

    class Machine(TwoProcesses):
        pass

    Machine.share = SHARES[share]
    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=int(os.environ.get("ADVERSARIAL_EXAMPLES", "40")),
            stateful_step_count=int(os.environ.get("ADVERSARIAL_STEPS", "40")),
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        ),
    )


# -- reads that cannot fold ------------------------------------------------------


@pytest.mark.usefixtures("small_merges")
def test_open_days_of_a_partition_that_cannot_fold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the disk full, `open_days(p)` reads the buckets table without folding
    (`_unfolded`): it must still answer partition p's open days, as it does
    when it can fold, not every partition's."""
    a, b = open_at(tmp_path / "s", (0, 1)), open_at(tmp_path / "s", (0, 1))
    try:
        [tenant, *_] = tenants_of(0, 1)
        assert a.write_pulses(0, [make_pulse(tenant, "x", 1)], NEW) == ["accepted"]
        assert (a.open_days(0), a.open_days(1)) == ([DAY], [])  # folded: in the table
        assert b.write_pulses(0, [make_pulse(tenant, "y", 1)], NEW) == ["accepted"]

        def full(*args: object) -> None:
            error = sqlite3.OperationalError("database or disk is full")
            error.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
            raise error

        monkeypatch.setattr(sqlite_store, "_fold", full)
        assert a.open_days(0) == [DAY]
        assert a.open_days(1) == []  # partition 1 has no bucket at all
    finally:
        a.close()
        b.close()


# -- two stores racing, each in a thread of its own -------------------------------------


@pytest.mark.usefixtures("small_merges")
@pytest.mark.parametrize("share", list(SHARES))
@pytest.mark.parametrize("seed", [1, 2])
def test_two_stores_racing_in_threads_count_each_id_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, share: str, seed: int
) -> None:
    """Two stores write the same ids, alone and in rounds, fold, merge and commit
    at the same time (SQLite's lock and the writers' flock arbitrate, not the
    order of the test's steps): each id is accepted once, by one of them."""
    monkeypatch.setattr(sqlite_store, "_FOLD_AFTER_S", 0.002)
    monkeypatch.setattr(sqlite_store, "_MERGE_ALONE_AT", 5)  # both merge, the same ids
    stores = [open_at(tmp_path / "s", worker) for worker in SHARES[share]]
    answered: list[tuple[Pulse, str]] = []
    committed: list[int] = []
    failed: list[BaseException] = []

    def run(which: int) -> None:
        rng, store = random.Random(seed * 10 + which), stores[which]
        try:
            for _ in range(120):
                items = [
                    (rng.choice(TENANTS), rng.choice([None, f"id{rng.randrange(60)}"]), 1)
                    for _ in range(rng.randrange(1, 5))
                ]
                action = rng.random()
                if action < 0.5:
                    partition = PART_OF[items[0][0]]
                    pulses = pulses_of(items, partition)
                    answered.extend(
                        zip(pulses, store.write_pulses(partition, pulses, NEW), strict=True)
                    )
                elif action < 0.8:
                    with store.writing_together():
                        for partition in range(PARTS):
                            if pulses := pulses_of(items, partition):
                                got = store.write_pulses(partition, pulses, NEW)
                                answered.extend(zip(pulses, got, strict=True))
                elif action < 0.9:
                    store.aggregates(AggregateQuery())
                else:
                    batches = store.commit_day(rng.randrange(PARTS), DAY, 0, 3)
                    committed.extend(parse_nanos(b.used_amount) for b in batches)
        except BaseException as exc:  # reported below, in the test's thread
            failed.append(exc)

    threads = [threading.Thread(target=run, args=(which,)) for which in (0, 1)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failed == []
        model = Model()
        accepted = [p for p, outcome in answered if outcome == "accepted"]
        ids = [(p.tenant_id, p.pulse_id) for p in accepted if p.client_id]
        assert len(ids) == len(set(ids))  # no id accepted twice
        assert {o for p, o in answered if p.client_id and (p.tenant_id, p.pulse_id) not in ids} <= {
            "duplicate"
        }
        for p in accepted:
            model.take(PART_OF[p.tenant_id], NEW, [p], ["accepted"])
        for partition in range(PARTS):
            batches = stores[1].commit_day(partition, DAY, 0, 3)
            committed.extend(parse_nanos(b.used_amount) for b in batches)
        assert sum(committed) == len(accepted)
        for store in stores:
            model.check_totals(store)
            model.check_replays(store)
    finally:
        for store in stores:
            store.close()


# -- a process killed at chosen points ------------------------------------------------

KILLED = 17
# The child's work: ("write", partition, [(tenant, id, amount)], received),
# ("round", [...all partitions' pulses...], received), ("read",) (folds),
# ("purge", partition), ("commit", partition). Every write holds a new id of
# its own (`m...`), by which the parent finds whether it lasted.
T0, T1 = tenants_of(0, 1)[0], tenants_of(1, 1)[0]
SCRIPT: list[tuple[Any, ...]] = [
    ("write", 0, [(T0, "m0", 1), (T0, "b0", 1), (T0, None, 2), (T0, "c0", 1)], OLD),
    ("write", 1, [(T1, "m1", 1), (T1, "b1", 2), (T1, "c1", 1)], OLD),
    ("round", [(T0, "m2", 1), (T1, "m3", 1), (T0, "c2", 2), (T1, None, 1)], NEW),
    ("write", 0, [(T0, "m4", 2), (T0, "b0", 1), (T0, "c0", 2), (T0, "c3", 1)], NEW),
    ("read",),
    ("write", 1, [(T1, "m5", 1), (T1, "c4", 1), (T1, "c5", 1), (T1, "b1", 2)], NEW),
    ("purge", 0),
    ("write", 0, [(T0, "m6", 1), (T0, "c0", 1), (T0, "c6", 1), (T0, None, 1)], NEW),
    ("commit", 1),
    ("round", [(T0, "m7", 1), (T1, "m8", 2), (T1, "c1", 1), (T0, "c7", 2)], NEW),
    ("purge", 1),
    ("write", 1, [(T1, "m9", 1), (T1, "c8", 1), (T1, "c9", 1)], NEW),
    ("commit", 0),
]


def pulses_of(items: list[tuple[str, str | None, int]], partition: int) -> list[Pulse]:
    return [make_pulse(t, i, a) for t, i, a in items if PART_OF[t] == partition]


def run_child(directory: Path, point: str, at: int, durability: str, conn: Connection) -> None:
    """Run SCRIPT on a store of its own, telling the parent each step it starts and
    each it finishes, and die (`os._exit`) at the `at`-th call of `point`."""
    calls = [0]

    def deadly(real: Callable[..., Any], after: bool) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == at and not after:
                os._exit(KILLED)
            result = real(*args, **kwargs)
            if calls[0] == at:
                os._exit(KILLED)
            return result

        return call

    if point == "sync":  # after COMMIT, before its fsync
        sqlite_store._File._sync = deadly(sqlite_store._File._sync, False)  # type: ignore[method-assign]
    else:  # after it has run, inside its transaction
        setattr(sqlite_store, point, deadly(getattr(sqlite_store, point), True))
    store = open_at(directory, (1, 2), durability)
    for step, op in enumerate(SCRIPT):
        conn.send(("start", step))
        result: Any = None
        if op[0] == "write":
            result = store.write_pulses(op[1], pulses_of(op[2], op[1]), op[3])
        elif op[0] == "round":
            with store.writing_together():
                result = [store.write_pulses(p, pulses_of(op[1], p), op[2]) for p in range(PARTS)]
        elif op[0] == "read":
            store.aggregates(AggregateQuery())
        elif op[0] == "purge":
            result = store.purge(op[1], PURGE_BEFORE)
        else:
            result = [b.used_amount for b in store.commit_day(op[1], DAY, 0, 2)]
        conn.send(("done", step, result))
    os._exit(0)


def logged_ids(store: SQLiteStore) -> set[str]:
    """Every client id in the log, read from the file."""
    bodies = store._file.read(lambda c: c.execute("SELECT body FROM pulse_log").fetchall())
    return {p.pulse_id for (body,) in bodies for p in sqlite_store._decode_pulses(body)}


KILL_POINTS = [
    # After COMMIT, before its fsync: each of the script's transactions (the
    # writes, the rounds, the merge slices in them, the folds of a read, the
    # two of each purge, the commits).
    *(("sync", n) for n in range(1, 17)),
    # After it has run, inside its transaction: merge slices (the 4th is the
    # one a purge makes), folds, a purge's merge, a commit's batches.
    *(("_insert_ids", n) for n in (1, 2, 4, 5)),
    *(("_fold", n) for n in (1, 2, 3, 5)),
    *(("_merge_ids", n) for n in (1, 2)),
    *(("new_batches", n) for n in (1, 2)),
    ("sync", 10_000),  # not killed: the script runs to its end
]


@pytest.mark.usefixtures("small_merges")
@pytest.mark.parametrize(("point", "at"), KILL_POINTS)
def test_a_process_killed_anywhere_loses_nothing_acknowledged_and_counts_nothing_twice(
    tmp_path: Path, point: str, at: int
) -> None:
    directory = tmp_path / "s"
    survivor = open_at(directory, (0, 2))
    model = Model()
    try:
        # The survivor writes first: the child replays some of its ids.
        mine = [(T0, "b0", 1), (T0, "s0", 1), (T0, None, 3)], [(T1, "b1", 2), (T1, "s1", 1)]
        for partition, items in enumerate(mine):
            pulses = pulses_of(items, partition)
            expected = model.expect(pulses)
            assert survivor.write_pulses(partition, pulses, OLD) == expected
            model.take(partition, OLD, pulses, expected)
        survivor.aggregates(AggregateQuery())  # holds memory in step with the file

        fork = multiprocessing.get_context("fork")
        ours, theirs = fork.Pipe()
        child = fork.Process(target=run_child, args=(directory, point, at, "fsync", theirs))
        child.start()
        theirs.close()
        messages = []
        with contextlib.suppress(EOFError):  # the child is gone
            while True:
                messages.append(ours.recv())
        child.join(timeout=30)
        assert child.exitcode == (0 if at == 10_000 else KILLED)
        started = [m[1] for m in messages if m[0] == "start"]
        done = {m[1]: m[2] for m in messages if m[0] == "done"}
        in_flight = started[-1] if started[-1] not in done else None
        if at == 10_000:
            assert in_flight is None
            assert len(done) == len(SCRIPT)

        # Replay the child's steps on the model: those acknowledged as they
        # were answered, the one it died in as the file says it ended.
        in_log = logged_ids(survivor)
        for step in sorted(done) + ([in_flight] if in_flight is not None else []):
            op, result = SCRIPT[step], done.get(step)
            lasted = step in done
            if op[0] in ("write", "round"):
                parts = [op[1]] if op[0] == "write" else list(range(PARTS))
                items, received = (op[2], op[3]) if op[0] == "write" else (op[1], op[2])
                results = [result] if op[0] == "write" else result
                for n, partition in enumerate(parts):
                    pulses = pulses_of(items, partition)
                    expected = model.expect(pulses)
                    if lasted:
                        assert results[n] == expected, (step, partition)
                    marker = next(p.pulse_id for p in pulses if p.pulse_id.startswith("m"))
                    if lasted or marker in in_log:  # (the listings check the rest)
                        model.take(partition, received, pulses, expected)
            elif op[0] == "purge":
                gone = len(model.purged(op[1], PURGE_BEFORE))
                if lasted:
                    assert result == gone
                if lasted or old_rows(survivor, op[1], PURGE_BEFORE) == 0:
                    model.purge(op[1], PURGE_BEFORE)
            elif op[0] == "commit" and lasted:
                assert sum(parse_nanos(a) for a in result) == model.owned(op[1])

        reopened = open_at(directory, (1, 2))
        try:
            for store in (survivor, reopened):
                model.check_everything(store)
            # Both go on: commit what is open, and write (merging) after the crash.
            for partition in range(PARTS):
                survivor.commit_day(partition, DAY, 0, 2)
            assert outbox(reopened) == [model.owned(p) for p in range(PARTS)]
            for n in range(4):
                store = (survivor, reopened)[n % 2]
                pulses = [make_pulse(T0, f"after{n}-{i}", 1) for i in range(3)]
                assert store.write_pulses(0, pulses, NEW) == model.expect(pulses)
                model.take(0, NEW, pulses, ["accepted"] * 3)
            for store in (reopened, survivor):
                model.check_everything(store)
        finally:
            reopened.close()
    finally:
        survivor.close()


# -- memory that cannot follow a commit ----------------------------------------------


@pytest.mark.parametrize("ids", [True, False])
def test_memory_failing_halfway_after_a_commit_keeps_the_write_and_counts_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ids: bool
) -> None:
    """Out of memory while a committed row's ids and deltas join memory, halfway:
    the write is durable, so it is reported as written, and memory, which may
    hold half the row, is rebuilt from the file rather than read on from it,
    which added the half twice."""
    store = open_at(tmp_path / "s", (0, 1))
    tenant = TENANTS[0]
    try:
        store.write_pulses(PART_OF[tenant], [make_pulse(tenant, "a" if ids else None, 1)], 0)
        added = sqlite_store._add_pulses

        def half(part: Any, seq: int, pulses: Any) -> None:
            added(part, seq, pulses)  # the deltas are in memory, the row not yet seen
            raise MemoryError

        monkeypatch.setattr(sqlite_store, "_add_pulses", half)
        batch = [make_pulse(tenant, f"b{n}" if ids else None, 10) for n in range(3)]
        assert store.write_pulses(PART_OF[tenant], batch, 0) == ["accepted"] * 3
        monkeypatch.setattr(sqlite_store, "_add_pulses", added)
        again = [make_pulse(tenant, "b0" if ids else None, 10), make_pulse(tenant, None, 100)]
        assert store.write_pulses(PART_OF[tenant], again, 0) == (
            ["duplicate", "accepted"] if ids else ["accepted", "accepted"]
        )
        [bucket] = store.aggregates(AggregateQuery())
        assert (parse_nanos(bucket.used_amount), bucket.pulse_count) == (
            (131, 5) if ids else (141, 6)
        )
    finally:
        store.close()


# -- the store's files removed, moved or replaced under a running process ---------


def _write_one(store: SQLiteStore, pulse_id: str) -> None:
    tenant = TENANTS[0]
    store.write_pulses(PART_OF[tenant], [make_pulse(tenant, pulse_id, 1)], NEW)


@pytest.mark.parametrize("durability", ["os", "fsync"])
@pytest.mark.parametrize("how", ["removed", "moved", "replaced", "wal removed", "shm removed"])
def test_a_store_whose_files_go_refuses_writes_and_says_how_to_get_them_back(
    tmp_path: Path, how: str, durability: str
) -> None:
    """SQLite writes on into the files it has open whatever their names now lead
    to: a write acknowledged after `rm -rf data/store` was in a file gone at
    exit. The next write is refused, /readyz's `trouble` says why and how to
    get the data back, and nothing acknowledged before is lost (a removed
    WAL is copied into the store file first)."""
    directory = tmp_path / "store"
    store = open_at(directory, (0, 1), durability)
    try:
        _write_one(store, "before")
        assert store.trouble() is None
        path = directory / "store.sqlite"
        if how == "removed":
            shutil.rmtree(directory)
        elif how == "moved":
            directory.rename(tmp_path / "elsewhere")
        elif how == "replaced":
            path.rename(tmp_path / "old.sqlite")
            shutil.copyfile(tmp_path / "old.sqlite", path)
        else:
            path.with_name(f"store.sqlite-{how.split(maxsplit=1)[0]}").unlink()
        with pytest.raises(StoreError, match="while the store was in use"):
            _write_one(store, "after")
        with pytest.raises(StoreError, match="writes are refused"):
            _write_one(store, "again")
        trouble = store.trouble()
        assert trouble is not None
        if how == "removed":
            assert f"copy /proc/{os.getpid()}/fd/" in trouble, trouble
        elif how == "moved":
            assert f"now at {tmp_path / 'elsewhere' / 'store.sqlite'}" in trouble, trouble
        elif how == "replaced":
            assert f"now at {tmp_path / 'old.sqlite'}" in trouble, trouble
        else:
            assert "until the service is restarted" in trouble, trouble
    finally:
        store.close()
    if how.endswith(("wal removed", "shm removed")):
        # What the removed file held was copied into the store file: a new
        # process, reading that file alone, finds the write made before.
        reopened = open_at(directory, (0, 1), durability)
        try:
            stored = reopened.pulses(PulseQuery(tenant_id=TENANTS[0], day=DAY, limit=10))
            assert [p.id for _, p in stored] == ["before"]
        finally:
            reopened.close()


def test_a_data_dir_whose_store_is_gone_is_not_given_a_new_empty_one(tmp_path: Path) -> None:
    """`data/store.id` keeps the id of the store the data dir holds: a start that
    finds the store gone refuses to make a new one, which would bill from
    nothing under new batch ids, until an operator removes that file."""
    directory = tmp_path / "store"
    store = open_at(directory, (0, 1))
    store_id = store.store_id
    store.close()
    marker = tmp_path / "store.id"
    assert marker.read_text() == f"{store_id}\n"
    shutil.rmtree(directory)
    with pytest.raises(StoreMismatch, match=f"held store {store_id}"):
        open_at(directory, (0, 1))
    assert not directory.exists()
    marker.unlink()
    fresh = open_at(directory, (0, 1))
    try:
        assert fresh.store_id != store_id
        assert marker.read_text() == f"{fresh.store_id}\n"
    finally:
        fresh.close()


def test_a_removed_store_copied_back_as_readyz_says_holds_every_acknowledged_pulse(
    tmp_path: Path,
) -> None:
    """`rm -rf data/store` on an idle process: /readyz's check finds it, copies
    the WAL into the removed store file, and says where to read that file; a
    copy of it, alone, is the whole store."""
    directory = tmp_path / "store"
    store = open_at(directory, (0, 1))
    try:
        for n in range(3):
            _write_one(store, f"before-{n}")  # in the WAL: no checkpoint yet
        shutil.rmtree(directory)
        trouble = store.trouble()
        assert trouble is not None
        found = re.search(r"copy (/proc/\d+/fd/\d+) back", trouble)
        assert found, trouble
        directory.mkdir()
        shutil.copyfile(found[1], directory / "store.sqlite")
    finally:
        store.close()
    restored = open_at(directory, (0, 1))
    try:
        stored = restored.pulses(PulseQuery(tenant_id=TENANTS[0], day=DAY, limit=10))
        assert sorted(p.id for _, p in stored) == ["before-0", "before-1", "before-2"]
    finally:
        restored.close()
