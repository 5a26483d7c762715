"""Adversarial tests of the PostgreSQL store shared by several instances.

Each instance is a PostgresStore with its own pool, as a separate process
would have. Races are made deterministic by holding what the store waits for
(a partition's advisory lock, a row lock, an uncommitted key) from a
connection of the test's own, waiting until every racer is queued behind it
(as the server reports in pg_locks / pg_stat_activity), and then letting go.
"""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import msgspec
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from ingestor.clock import epoch_us
from ingestor.errors import StoreBusy, StoreError
from ingestor.model import Batch, BatchSummary, Pulse, payload_digest
from ingestor.money import format_nanos, to_nanos
from ingestor.partition import partition_of
from ingestor.store import AggregateQuery, BatchQuery
from ingestor.store.postgres import PostgresStore, _lock_key
from tests.conftest import _create_database, _drop_database, new_schema

from .conftest import BUSY_TIMEOUT

DAY = "2024-05-01"
T0 = epoch_us(dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC))
HOUR = 3_600_000_000
PARTITIONS = 4
TENANT = "a"
PART = partition_of(TENANT, PARTITIONS)


def pulse(
    tenant: str = TENANT,
    nanos: int = 1_000_000_000,
    *,
    id: str | None = None,
    sku: str = "s1",
    unit: str = "u1",
) -> Pulse:
    """A pulse as intake makes it: no fingerprint, no client timestamp."""
    if id is None:
        return Pulse(tenant, sku, unit, nanos, "", False, T0, DAY, b"")
    return Pulse(tenant, sku, unit, nanos, id, True, T0, DAY, b"")


def open_store(url: str, *, busy_timeout: float = BUSY_TIMEOUT, pool: int = 2) -> PostgresStore:
    return PostgresStore.open(url, partitions=PARTITIONS, pool_size=pool, busy_timeout=busy_timeout)


@contextmanager
def several(url: str, count: int, **kwargs: Any) -> Iterator[list[PostgresStore]]:
    stores = [open_store(url, **kwargs) for _ in range(count)]
    try:
        yield stores
    finally:
        for store in stores:
            store.close()


@pytest.fixture
def instances(postgres_url: str) -> Iterator[list[PostgresStore]]:
    with several(postgres_url, 4) as stores:
        yield stores


def wait_until(url: str, sql: str, args: tuple[Any, ...] = ()) -> Any:
    """Poll the server until `sql` yields a true first column; return that row."""
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(1000):
            row = conn.execute(sql, args).fetchone()
            if row is not None and row[0]:
                return row
            time.sleep(0.01)
    raise AssertionError(f"the server never reported: {sql}")


_WAITING_FOR_PARTITION = (
    "SELECT count(*) >= %s FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    " AND objsubid = 2 AND database = (SELECT oid FROM pg_database"
    "  WHERE datname = current_database())"
)


@contextmanager
def partition_held(url: str, store: PostgresStore, partition: int) -> Iterator[None]:
    """Hold `partition`'s writer lock, as another instance's transaction would."""
    with psycopg.connect(url) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_lock_key(store.store_id), partition))
        yield
        conn.rollback()


def race(
    url: str,
    store: PostgresStore,
    partition: int,
    tasks: dict[str, Callable[[], Any]],
    while_queued: Callable[[], object] = lambda: None,
) -> dict[str, Any]:
    """Queue every task behind the partition's lock, call `while_queued`, then let
    them all go.

    Returns each task's result, or the StoreError it raised.
    """
    results: dict[str, Any] = {}

    def run(name: str, task: Callable[[], Any]) -> None:
        try:
            results[name] = task()
        except StoreError as exc:
            results[name] = exc

    threads = [threading.Thread(target=run, args=item) for item in tasks.items()]
    with partition_held(url, store, partition):
        for thread in threads:
            thread.start()
        wait_until(url, _WAITING_FOR_PARTITION, (len(tasks),))
        while_queued()
    for thread in threads:
        thread.join(30)
    assert set(results) == set(tasks)
    return results


def rows(url: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, args).fetchall()


def outbox(url: str) -> list[tuple[int, int, Batch]]:
    """Every batch as (partition, seq, body), in seq order per partition."""
    return [
        (partition, seq, msgspec.json.decode(body, type=Batch))
        for partition, seq, body in rows(
            url, "SELECT partition, seq, body FROM batches ORDER BY partition, seq"
        )
    ]


def check_ledger(url: str, store: PostgresStore) -> dict[tuple[str, str, str], int]:
    """The outbox against the buckets: exactly-once commit, contiguous seqs and revisions.

    Returns each bucket's committed nanos (the sum of its batches' deltas).
    """
    batches = outbox(url)
    by_partition: dict[int, list[int]] = defaultdict(list)
    for partition, seq, _ in batches:
        by_partition[partition].append(seq)
    for seqs in by_partition.values():
        assert seqs == list(range(1, len(seqs) + 1)), "batch seqs are not 1..n"
    ids = [b.batch_id for _, _, b in batches]
    assert len(ids) == len(set(ids))
    delivered: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    revisions: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for _, _, batch in batches:
        for record in batch.records:
            key = (record.tenant_id, record.product_sku, record.use_unit)
            sums = delivered[key]
            sums[0] += to_nanos(Decimal(record.used_amount))
            sums[1] += record.pulse_count
            assert (record.total_amount, record.total_count) == (format_nanos(sums[0]), sums[1])
            revisions[key].append(record.revision)
    assert all(r == list(range(1, len(r) + 1)) for r in revisions.values())
    for row in store.aggregates(AggregateQuery(limit=10_000)):
        key = (row.tenant_id, row.product_sku, row.use_unit)
        sums = delivered.get(key, [0, 0])
        assert (row.committed_amount, row.committed_count) == (format_nanos(sums[0]), sums[1])
        assert len(revisions.get(key, [])) == row.revision
    return {key: sums[0] for key, sums in delivered.items()}


def bucket(store: PostgresStore, tenant: str = TENANT, sku: str = "s1") -> tuple[str, int]:
    [row] = store.aggregates(AggregateQuery(tenant_id=tenant, product_sku=sku))
    return row.used_amount, row.pulse_count


# -- the database's defaults, which the store no longer trusts ----------------


@pytest.fixture(scope="module", params=["read committed", "repeatable read", "serializable"])
def isolation_database(request: pytest.FixtureRequest, postgres_admin: str) -> Iterator[str]:
    """A database whose DBA set default_transaction_isolation (read committed: the control)."""
    name = _create_database(postgres_admin)
    with psycopg.connect(postgres_admin, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {name} SET default_transaction_isolation = '{request.param}'")
    url = make_conninfo(postgres_admin, dbname=name)
    try:
        assert rows(url, "SHOW default_transaction_isolation") == [(request.param,)]
        yield url
    finally:
        _drop_database(postgres_admin, name)


@pytest.fixture
def isolation_url(isolation_database: str) -> Iterator[str]:
    with new_schema(isolation_database) as url:
        yield url


@pytest.mark.parametrize(
    "scenario", ["same id", "same id, other payload", "id-less", "two commits", "write+commit"]
)
def test_instances_racing_on_a_partition_are_serialised_under_any_default_isolation(
    isolation_url: str, scenario: str
) -> None:
    """The partition lock orders the racers; each must then see what the last one
    committed. The store never sets the isolation level, so in a database whose
    default is REPEATABLE READ or SERIALIZABLE the snapshot is taken when the lock
    statement starts, before the wait: the loser works from a stale view and fails."""
    with several(isolation_url, 2) as (one, two):
        if scenario in ("two commits", "write+commit"):
            assert one.write_pulses(PART, [pulse(nanos=5)], T0) == ["accepted"]
        tasks: dict[str, Callable[[], Any]] = {
            "same id": lambda: one.write_pulses(PART, [pulse(nanos=5, id="k1")], T0),
            "same id, other payload": lambda: one.write_pulses(PART, [pulse(nanos=5, id="k1")], T0),
            "id-less": lambda: one.write_pulses(PART, [pulse(nanos=5)], T0),
            "two commits": lambda: one.commit_day(PART, DAY, T0, 10),
            "write+commit": lambda: one.write_pulses(PART, [pulse(nanos=7)], T0),
        }
        rival: dict[str, Callable[[], Any]] = {
            "same id": lambda: two.write_pulses(PART, [pulse(nanos=5, id="k1")], T0),
            "same id, other payload": lambda: two.write_pulses(PART, [pulse(nanos=9, id="k1")], T0),
            "id-less": lambda: two.write_pulses(PART, [pulse(nanos=5)], T0),
            "two commits": lambda: two.commit_day(PART, DAY, T0, 10),
            "write+commit": lambda: two.commit_day(PART, DAY, T0, 10),
        }
        got = race(isolation_url, one, PART, {"one": tasks[scenario], "two": rival[scenario]})
        failed = {name: repr(v) for name, v in got.items() if isinstance(v, StoreError)}
        assert failed == {}, f"a racer was refused instead of being serialised: {failed}"
        if scenario == "same id":
            assert sorted([*got["one"], *got["two"]]) == ["accepted", "duplicate"]
        elif scenario == "same id, other payload":
            assert sorted([*got["one"], *got["two"]]) == ["accepted", "conflict"]
        elif scenario == "id-less":
            assert got == {"one": ["accepted"], "two": ["accepted"]}
            assert bucket(one) == ("0.00000001", 2)
        elif scenario == "two commits":
            assert sorted(len(v) for v in got.values()) == [0, 1]
        else:
            assert got["one"] == ["accepted"]
            two.commit_day(PART, DAY, T0, 10)
            assert check_ledger(isolation_url, two) == {(TENANT, "s1", "u1"): 12}


def test_write_transactions_flush_their_commit_whatever_the_database_default(
    fresh_database: str,
) -> None:
    """A 2xx means stored (durability "fsync" by default): the store's commits
    must wait for the WAL flush even where the DBA turned synchronous_commit off.
    Observed from inside the store's own write transaction by a trigger."""
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        name = conn.execute("SELECT current_database()").fetchone()
        assert name is not None
        conn.execute(f"ALTER DATABASE {name[0]} SET synchronous_commit = off")
    with several(fresh_database, 1) as (store,):
        with psycopg.connect(fresh_database, autocommit=True) as conn:
            conn.execute("CREATE TABLE observed (setting text)")
            conn.execute(
                "CREATE FUNCTION observe() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                " INSERT INTO observed VALUES (current_setting('synchronous_commit'));"
                " RETURN NULL; END $$"
            )
            conn.execute(
                "CREATE TRIGGER observe AFTER INSERT ON pulses"
                " FOR EACH STATEMENT EXECUTE FUNCTION observe()"
            )
        assert store.write_pulses(PART, [pulse(id="k1")], T0) == ["accepted"]
        assert rows(fresh_database, "SELECT setting FROM observed") == [("on",)]


# -- guards: what holds on the default READ COMMITTED -------------------------


@pytest.mark.parametrize("payload", ["same", "different"])
def test_one_id_sent_to_four_instances_at_once_is_accepted_once(
    postgres_url: str, instances: list[PostgresStore], payload: str
) -> None:
    def send(store: PostgresStore, n: int) -> Callable[[], Any]:
        nanos = 5 if payload == "same" or n == 0 else 5 + n
        return lambda: store.write_pulses(PART, [pulse(nanos=nanos, id="k1")], T0)

    got = race(
        postgres_url,
        instances[0],
        PART,
        {f"i{n}": send(store, n) for n, store in enumerate(instances)},
    )
    outcomes = Counter(o for result in got.values() for o in result)
    assert outcomes["accepted"] == 1
    assert outcomes["accepted"] + outcomes["duplicate"] + outcomes["conflict"] == 4
    assert outcomes["duplicate" if payload == "same" else "conflict"] == 3
    [winner] = [name for name, result in got.items() if result == ["accepted"]]
    nanos = 5 if payload == "same" or winner == "i0" else 5 + int(winner[1:])
    assert bucket(instances[1]) == (format_nanos(nanos), 1)
    assert rows(postgres_url, "SELECT count(*) FROM pulses WHERE pulse_id = 'k1'") == [(1,)]


def test_commits_from_three_instances_at_once_with_writes_queued_among_them(
    postgres_url: str, instances: list[PostgresStore]
) -> None:
    first = instances[0]
    first.write_pulses(PART, [pulse(nanos=n, sku=f"s{n % 3}") for n in range(1, 10)], T0)
    first.commit_day(PART, DAY, T0, 2)  # every bucket has revision 1 now
    first.write_pulses(PART, [pulse(nanos=100, sku="s0"), pulse(nanos=1, sku="s9")], T0)
    written = 1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 9 + 100 + 1
    tasks: dict[str, Callable[[], Any]] = {
        f"commit{n}": (lambda s=store: s.commit_day(PART, DAY, T0 + HOUR, 1))
        for n, store in enumerate(instances[:3])
    }
    tasks["write"] = lambda: instances[3].write_pulses(
        PART, [pulse(nanos=1000, sku="s1"), pulse(nanos=10_000, sku="new")], T0
    )
    tasks["write2"] = lambda: instances[2].write_pulses(PART, [pulse(nanos=20_000, sku="s2")], T0)
    got = race(postgres_url, first, PART, tasks)
    assert not any(isinstance(v, StoreError) for v in got.values()), got
    made: list[BatchSummary] = [b for n in range(3) for b in got[f"commit{n}"]]
    assert len({b.batch_id for b in made}) == len(made)
    written += 1000 + 10_000 + 20_000
    check_ledger(postgres_url, first)
    first.commit_day(PART, DAY, T0 + 2 * HOUR, 1)
    committed = check_ledger(postgres_url, first)
    assert sum(committed.values()) == written
    assert first.open_days(PART) == []


def test_a_write_queued_behind_a_stalled_commit_becomes_a_correction(
    postgres_url: str, instances: list[PostgresStore]
) -> None:
    committer, writer, later = instances[0], instances[1], instances[2]
    committer.write_pulses(PART, [pulse(nanos=5)], T0)
    results: dict[str, Any] = {}
    with psycopg.connect(postgres_url) as blocker:
        blocker.execute("SELECT 1 FROM buckets WHERE tenant_id = %s FOR UPDATE", (TENANT,))
        commit = threading.Thread(
            target=lambda: results.update(commit=committer.commit_day(PART, DAY, T0, 10))
        )
        commit.start()  # it holds the partition and waits to mark the bucket committed
        wait_until(
            postgres_url,
            "SELECT count(*) = 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query LIKE 'UPDATE buckets%%' AND datname = current_database()",
        )
        write = threading.Thread(
            target=lambda: results.update(write=writer.write_pulses(PART, [pulse(nanos=7)], T0))
        )
        write.start()
        wait_until(postgres_url, _WAITING_FOR_PARTITION, (1,))
        blocker.rollback()
    commit.join(30)
    write.join(30)
    [first_batch] = results["commit"]
    assert (first_batch.kind, first_batch.used_amount) == ("initial", "0.000000005")
    assert results["write"] == ["accepted"]
    assert later.open_days(PART) == [DAY]
    [correction] = later.commit_day(PART, DAY, T0, 10)
    assert (correction.kind, correction.used_amount) == ("correction", "0.000000007")
    assert check_ledger(postgres_url, later) == {(TENANT, "s1", "u1"): 12}


@pytest.mark.parametrize("first", ["purge", "write"])
def test_a_purge_racing_a_write_of_the_id_it_removes(
    postgres_url: str, instances: list[PostgresStore], first: str
) -> None:
    purger, writer = instances[0], instances[1]
    old = T0 - 40 * 24 * HOUR
    assert purger.write_pulses(PART, [pulse(nanos=5, id="k1")], old) == ["accepted"]
    results: dict[str, Any] = {}

    def purge() -> None:
        results["purge"] = purger.purge(PART, T0 - 35 * 24 * HOUR)

    def write() -> None:
        results["write"] = writer.write_pulses(PART, [pulse(nanos=5, id="k1"), pulse(nanos=3)], T0)

    threads = {"purge": threading.Thread(target=purge), "write": threading.Thread(target=write)}
    with psycopg.connect(postgres_url) as blocker:
        if first == "purge":  # the purge holds the partition, stuck deleting the id's row
            blocker.execute("SELECT 1 FROM pulses WHERE pulse_id = 'k1' FOR UPDATE")
            stuck = "\nDELETE FROM pulses%"
        else:  # the write holds it, stuck adding to the bucket
            blocker.execute("SELECT 1 FROM buckets WHERE tenant_id = %s FOR UPDATE", (TENANT,))
            stuck = "\nINSERT INTO buckets%"
        threads[first].start()
        wait_until(
            postgres_url,
            "SELECT count(*) = 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query LIKE %s AND datname = current_database()",
            (stuck,),
        )
        second = "write" if first == "purge" else "purge"
        threads[second].start()
        wait_until(postgres_url, _WAITING_FOR_PARTITION, (1,))
        blocker.rollback()
    for thread in threads.values():
        thread.join(30)

    assert results["purge"] == 1
    stored = rows(postgres_url, "SELECT received_at FROM pulses WHERE pulse_id = 'k1'")
    if first == "purge":  # the id was forgotten first: the write is new usage
        assert results["write"] == ["accepted", "accepted"]
        assert stored == [(T0,)]
        assert bucket(writer) == ("0.000000013", 3)
    else:  # the write saw the id: a duplicate; then the purge forgot it
        assert results["write"] == ["duplicate", "accepted"]
        assert stored == []
        assert bucket(writer) == ("0.000000008", 2)
        assert writer.write_pulses(PART, [pulse(nanos=5, id="k1")], T0) == ["accepted"]


def _uncommitted_key_holder(url: str) -> psycopg.Connection[Any]:
    """A writer that bypasses the partition lock: it inserts id k1 and stays open."""
    conn = psycopg.connect(url)
    conn.execute(
        "INSERT INTO pulses (partition, tenant_id, pulse_id, client_id, product_sku, use_unit,"
        " day, used_amount, ts, received_at, fingerprint)"
        " VALUES (%s, %s, 'k1', true, 's1', 'u1', %s, 5, %s, %s, %s)",
        (PART, TENANT, DAY, T0, T0, payload_digest(pulse(nanos=5, id="k1"))),
    )
    return conn


@pytest.mark.parametrize("end", ["rollback", "commit", "kill the writer"])
def test_a_write_stuck_on_a_key_held_by_a_lock_bypassing_writer(
    postgres_url: str, instances: list[PostgresStore], end: str
) -> None:
    """The unique index is the safety net under the partition lock: the store's INSERT
    waits on the other transaction's key, and every ending of that wait is exact."""
    store, other = instances[0], instances[1]
    group = [pulse(nanos=5, id="k1"), pulse(nanos=3)]
    results: dict[str, Any] = {}

    def write() -> None:
        try:
            results["write"] = store.write_pulses(PART, group, T0)
        except StoreError as exc:
            results["write"] = exc

    holder = _uncommitted_key_holder(postgres_url)
    try:
        thread = threading.Thread(target=write)
        thread.start()
        [_, pid] = wait_until(
            postgres_url,
            "SELECT true, pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query LIKE '%%INSERT INTO pulses%%' AND datname = current_database()",
        )
        if end == "rollback":
            holder.rollback()
        elif end == "commit":
            holder.commit()
        else:
            with psycopg.connect(postgres_url, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        thread.join(30)
    finally:
        holder.close()

    got = results["write"]
    if end == "rollback":
        assert got == ["accepted", "accepted"]
        assert bucket(other) == ("0.000000008", 2)
        return
    assert isinstance(got, StoreError)
    # Nothing of the refused write is kept: not the id-less pulse, not the bucket.
    assert rows(postgres_url, "SELECT count(*) FROM pulses WHERE pulse_id = ''") == [(0,)]
    assert other.aggregates(AggregateQuery(tenant_id=TENANT)) == []
    if end == "commit":
        assert isinstance(got, StoreBusy)  # 503: the retry settles it
        assert other.write_pulses(PART, group, T0) == ["duplicate", "accepted"]
    else:
        assert not isinstance(got, StoreBusy)
        assert "connection" in str(got)
        assert other.write_pulses(PART, group, T0) == ["accepted", "accepted"]
    # The instance whose connection was killed still works.
    assert store.write_pulses(PART, group[:1], T0) == ["duplicate"]


def test_instances_killed_while_queued_for_a_partition_keep_nothing(
    postgres_url: str, instances: list[PostgresStore]
) -> None:
    store = instances[0]
    store.write_pulses(PART, [pulse(nanos=5)], T0)

    def kill_the_queued() -> None:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            killed = conn.execute(
                "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks AS l"
                " WHERE l.locktype = 'advisory' AND NOT l.granted AND l.objsubid = 2"
                " AND l.database = (SELECT oid FROM pg_database"
                "  WHERE datname = current_database())"
            ).fetchone()
        assert killed == (2,)

    tasks: dict[str, Callable[[], Any]] = {
        "write": lambda: instances[1].write_pulses(PART, [pulse(nanos=7, id="k1")], T0),
        "commit": lambda: instances[2].commit_day(PART, DAY, T0, 10),
    }
    results = race(postgres_url, store, PART, tasks, while_queued=kill_the_queued)
    for name in tasks:
        assert isinstance(results[name], StoreError), (name, results[name])
        assert not isinstance(results[name], StoreBusy)
    assert store.batches(BatchQuery()) == []
    assert bucket(store) == ("0.000000005", 1)
    assert instances[1].write_pulses(PART, [pulse(nanos=7, id="k1")], T0) == ["accepted"]
    assert len(instances[2].commit_day(PART, DAY, T0, 10)) == 1


def test_ten_thousand_ids_against_a_table_of_many_ids(postgres_url: str) -> None:
    """A full-size request against 200,000 stored ids, within a 3 s statement timeout."""
    same = pulse(nanos=1, id="x")
    with several(postgres_url, 2, busy_timeout=3.0) as (first, second):
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO pulses (partition, tenant_id, pulse_id, client_id, product_sku,"
                " use_unit, day, used_amount, ts, received_at, fingerprint)"
                " SELECT %s, %s, 'old-' || g, true, 's1', 'u1', %s, 0.000000001, %s, %s, %s"
                " FROM generate_series(1, 200000) AS g",
                (PART, TENANT, DAY, T0, T0, payload_digest(same)),
            )
            conn.execute("ANALYZE pulses")
        group = (
            [pulse(nanos=1, id=f"old-{n}") for n in range(1, 4001)]  # replays
            + [pulse(nanos=2, id=f"old-{n}") for n in range(4001, 5001)]  # conflicts
            + [pulse(nanos=3, id=f"new-{n}") for n in range(4000)]  # new
            + [pulse(nanos=3, id=f"new-{n}") for n in range(1000)]  # repeats within it
        )
        assert len(group) == 10_000
        got = first.write_pulses(PART, group, T0)
        assert Counter(got) == {"accepted": 4000, "duplicate": 5000, "conflict": 1000}
        assert got[:4000] == ["duplicate"] * 4000
        assert got[4000:5000] == ["conflict"] * 1000
        assert got[5000:9000] == ["accepted"] * 4000
        again = second.write_pulses(PART, group, T0)
        assert Counter(again) == {"duplicate": 9000, "conflict": 1000}
        assert bucket(second) == (format_nanos(3 * 4000), 4000)


# Pairs that a natural-language collation orders otherwise than code points.
AWKWARD = ["a", "B", "Z", "b", "é", "e\u0301", "f", "ß", "ss", "_x", "-x", "10", "9", "NULL", "\\N"]


def test_code_point_order_in_a_database_with_a_natural_language_collation(
    fresh_database: str,
) -> None:
    with psycopg.connect(fresh_database) as conn:
        natural = conn.execute("SELECT 'a' < 'B', 'ss' = 'ß'").fetchone()
    if natural != (True, False):
        pytest.skip("the server could not make a database with a natural-language collation")
    with several(fresh_database, 2) as (first, second):
        for n, tenant in enumerate(AWKWARD):
            store = (first, second)[n % 2]
            group = [pulse(tenant, 1, sku=sku, id=f"{tenant}/{sku}") for sku in AWKWARD[:6]]
            assert store.write_pulses(partition_of(tenant, PARTITIONS), group, T0) == [
                "accepted"
            ] * len(group)
        everything = [(r.tenant_id, r.product_sku) for r in first.aggregates(AggregateQuery())]
        expected = sorted((t, s) for t in AWKWARD for s in AWKWARD[:6])
        assert everything == expected
        paged: list[tuple[str, str]] = []
        after: tuple[str, str, str, str] | None = None
        while page := second.aggregates(AggregateQuery(after=after, limit=7)):
            paged.extend((r.tenant_id, r.product_sku) for r in page)
            last = page[-1]
            after = (last.date, last.tenant_id, last.product_sku, last.use_unit)
        assert paged == expected
        for partition in range(PARTITIONS):
            for summary in (first, second)[partition % 2].commit_day(partition, DAY, T0, 4):
                batch = first.batch(summary.batch_id)
                assert batch is not None
                assert batch.records is not None
                keys = [(r.tenant_id, r.product_sku) for r in batch.records]
                assert keys == sorted(keys)
        ids = [b.batch_id for b in second.batches(BatchQuery(limit=1000))]
        assert ids == sorted(ids)
        per_partition = Counter(partition_of(t, PARTITIONS) for t, _ in expected)
        assert len(ids) == sum(-(-n // 4) for n in per_partition.values())


def _lead_until_killed(url: str, leading: Any) -> None:
    store = PostgresStore.open(url, partitions=PARTITIONS, pool_size=1, busy_timeout=5)
    assert store.lead_committer()
    leading.set()
    threading.Event().wait()  # until the process is killed


def test_leadership_moves_when_the_leading_process_is_killed(
    postgres_url: str, instances: list[PostgresStore]
) -> None:
    context = multiprocessing.get_context("spawn")
    leading = context.Event()
    leader = context.Process(target=_lead_until_killed, args=(postgres_url, leading))
    leader.start()
    try:
        assert leading.wait(30)
        assert [s.lead_committer() for s in instances] == [False] * len(instances)
        leader.kill()
        leader.join(10)
        # The server ends the dead process's session (and its lock) on its own time.
        wait_until(
            postgres_url,
            "SELECT NOT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
            " AND objsubid = 2 AND objid = 4294967295 AND granted AND database ="
            "  (SELECT oid FROM pg_database WHERE datname = current_database()))",
        )
        assert instances[1].lead_committer() is True
        assert [s.lead_committer() for s in instances] == [False, True, False, False]
    finally:
        leader.kill()
        leader.join(10)


# The store's session settings, on a connection without the client's own
# bounds (keepalives, tcp_user_timeout): what the server does alone.
_STREAMING = """
import sys
import time
import psycopg
from ingestor.store.postgres import _Connector
conn = psycopg.connect(sys.argv[1], autocommit=True)
_Connector(sys.argv[1], busy_timeout=float(sys.argv[2])).configure(conn)
with conn.transaction():
    conn.execute("SELECT pg_advisory_xact_lock(4242)")
    # The window to catch the server waiting on this socket is the
    # statement's: on a loaded machine, longer than a busy timeout.
    conn.execute("SET LOCAL statement_timeout = '60s'")
    print("locked", flush=True)
    rows = conn.cursor().stream("SELECT repeat('x', 1000) FROM generate_series(1, 10000000)")
    for number, _ in enumerate(rows):
        if number % 100 == 0:
            # Slower than the server sends, on a busy machine too: its
            # sends wait on this socket (ClientWrite) nearly all the time.
            time.sleep(0.01)
"""


def test_a_stopped_instance_the_server_is_sending_rows_to_lets_its_locks_go(
    postgres_url: str,
) -> None:
    """An instance stopped without dying (a paused container or VM) while the
    server sends it rows: its socket takes no more, and the server waits to
    send, in its transaction, locks held. Neither statement_timeout nor the
    idle-in-transaction timeout ends that (a commit's 20,000 buckets held
    their partition for a whole stop, tests/e2e/test_frozen_adversarial.py).
    The session's tcp_user_timeout does, after three busy timeouts (the
    statement's own timeout is a minute here: nothing else can).
    Was: still held 30 s later."""
    busy = 1.0
    with subprocess.Popen(
        [sys.executable, "-c", _STREAMING, postgres_url, str(busy)],
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "locked"
            [_, backend] = wait_until(
                postgres_url,
                "SELECT wait_event = 'ClientWrite', pid FROM pg_stat_activity"
                " WHERE query LIKE '%%generate_series(1, 10000000)%%' AND pid <> pg_backend_pid()",
            )
            os.kill(child.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            with psycopg.connect(postgres_url, autocommit=True) as monitor:
                while True:
                    held = monitor.execute(
                        "SELECT count(*) FROM pg_locks WHERE pid = %s AND locktype = 'advisory'",
                        (backend,),
                    ).fetchone()
                    if held == (0,):
                        break
                    assert time.monotonic() - stopped < 3 * busy + 3, "the lock is still held"
                    time.sleep(0.1)
        finally:
            os.kill(child.pid, signal.SIGCONT)
            child.kill()


# Takes a partition's lock as a writer does, then sends a statement whose
# parameters are larger than the socket takes, and never sends the rest: an
# instance stopped mid-send (a paused VM), where the server waits for the
# rest of the message.
_STALLED_SENDER = """
import sys
import time
import psycopg
from ingestor.store.postgres import _Connector
url, busy, key, partition = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
conn = psycopg.connect(url, autocommit=True)
_Connector(url, busy_timeout=busy).configure(conn)
conn.execute("BEGIN")
conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (key, partition))
conn.pgconn.nonblocking = 1
conn.pgconn.send_query_params(b"SELECT length($1)", [b"x" * 64_000_000])
print("sending", flush=True)
time.sleep(120)
"""


def test_a_lock_holder_stalled_mid_send_is_ended_by_the_next_writer(postgres_url: str) -> None:
    """A writer holding a partition's lock stops partway through sending a
    statement (a batch's body, a write's pulses): the server waits for the
    rest with no timeout, and the stopped machine's kernel answers its
    keepalives. A writer of that partition that waits past three busy
    timeouts of it ends that session, and the next write goes through.
    Was: refused for as long as the sender stayed stopped (a commit test
    caught it, frozen "active: INSERT INTO batches")."""
    busy = 1.0
    with several(postgres_url, 1, busy_timeout=busy) as [store]:
        partition = partition_of(TENANT, store.partitions)
        command = [
            sys.executable,
            "-c",
            _STALLED_SENDER,
            postgres_url,
            str(busy),
            str(_lock_key(store.store_id)),
            str(partition),
        ]
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as child:
            try:
                assert child.stdout is not None
                assert child.stdout.readline().strip() == "sending"
                wait_until(
                    postgres_url,
                    "SELECT count(*) = 1 FROM pg_stat_activity WHERE state = 'active'"
                    " AND wait_event = 'ClientRead' AND query LIKE 'SELECT length($1)%%'",
                )
                stalled = time.monotonic()
                refused = 0
                while True:
                    try:
                        store.write_pulses(partition, [pulse(TENANT, id="after")], T0)
                        break
                    except StoreBusy:
                        refused += 1
                    assert time.monotonic() - stalled < 3 * busy + 5, (
                        f"the stalled sender still holds partition {partition}'s lock"
                    )
                waited = time.monotonic() - stalled
            finally:
                child.kill()
    assert refused >= 1, "the write went through at once: the sender held nothing"
    assert waited > 3 * busy - 0.5, f"the holder was ended after {waited:.1f} s, too soon"


class _FrozenOnce:
    """`time` as the store sees it, with the process frozen for `seconds` during
    each of its first `readings` of the clock: `before` the query (the reading
    began that long before the database answered), or after it (it ended
    that long after)."""

    def __init__(self, seconds: float, before: bool, readings: int = 1) -> None:
        # What to add to each of the first readings' two reads of the clock.
        shift = int(seconds * 1e9)
        self._shifts = ([-shift, 0] if before else [0, shift]) * readings

    def monotonic_ns(self) -> int:
        return time.monotonic_ns() + (self._shifts.pop(0) if self._shifts else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.mark.parametrize("before", [True, False], ids=["before the query", "after the query"])
def test_a_clock_reading_the_process_was_frozen_across_is_not_taken(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, before: bool
) -> None:
    """Every instance keeps the database's clock, read as its time at the middle
    of the query's round trip (`clock_offset_us`). A process frozen during a
    reading (a VM paused, a container stopped) for 120 s made the round trip
    120 s: the midpoint was 60 s off, and so was its clock until the next
    reading 30 s later. A clock 60 s off takes over a delivery whose lease
    has not ended (two senders of one batch), or keeps its own claim 60 s
    past its end; and it purges, and bills pulses without a timestamp, by
    the wrong minute. The reading must come from a round trip short enough
    to trust: here within a second of the truth, as the database is on this
    machine."""
    import ingestor.store.postgres as module

    store = open_store(postgres_url)
    try:
        truth = store.clock_offset_us()  # the database and this machine share a clock
        monkeypatch.setattr(module, "time", _FrozenOnce(120, before))
        read = store.clock_offset_us()
    finally:
        monkeypatch.undo()
        store.close()
    assert abs(read - truth) < 1_000_000, (
        f"a reading across a 120 s freeze put the clock {(read - truth) / 1e6:+.1f} s off"
    )


def test_a_clock_that_cannot_be_read_precisely_is_not_read_at_all(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three readings in a row, each across a freeze: none is taken, and the
    store says so, as when the database does not answer (the instance keeps
    the clock it has, `SharedClock.measure`)."""
    import ingestor.store.postgres as module

    store = open_store(postgres_url)
    try:
        monkeypatch.setattr(module, "time", _FrozenOnce(5, before=False, readings=3))
        with pytest.raises(StoreError, match=r"each of 3 readings took longer than 1 s"):
            store.clock_offset_us()
        monkeypatch.undo()
        assert abs(store.clock_offset_us() - (time.time_ns() - time.monotonic_ns()) // 1000) < 10**6
    finally:
        monkeypatch.undo()
        store.close()


@pytest.fixture
def own_database(postgres_admin: str) -> Iterator[tuple[str, str]]:
    """A database of the test's own, and its name: it may be closed to connections."""
    name = _create_database(postgres_admin)
    try:
        yield make_conninfo(postgres_admin, dbname=name), name
    finally:
        with psycopg.connect(postgres_admin, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        _drop_database(postgres_admin, name)


def test_a_database_out_of_reach_is_told_from_a_busy_one(
    postgres_admin: str, own_database: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """The database stops taking connections (here closed to them, its sessions
    ended, as a restart or a host gone would): a write waits its busy timeout
    for a session the pool cannot make, and must say the database cannot be
    reached, naming it (StoreError: 503 store_unavailable), not that every
    session was in use (StoreBusy: 503 store_busy, retried after a second,
    logged as "no database connection became free in time"), as it did.
    Sessions all in use, with none to make, are still StoreBusy, before the
    outage and after it, and once the database takes connections again,
    writes go through. Once it is known out of reach, a request waits a
    second for a session, not its busy timeout (3 s here)."""
    url, name = own_database
    caplog.set_level(logging.INFO, logger="ingestor.store")
    store = open_store(url, busy_timeout=3, pool=1)
    try:
        assert store.write_pulses(PART, [pulse(id="before")], T0) == ["accepted"]
        with store._pool.connection(), pytest.raises(StoreBusy, match="became free in time"):
            store.write_pulses(PART, [pulse(id="busy")], T0)
        with psycopg.connect(postgres_admin, autocommit=True) as admin:
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            with pytest.raises(StoreError) as refused:
                store.write_pulses(PART, [pulse(id="out of reach")], T0)
            # Known out of reach now: told within a second, not the busy timeout.
            started = time.monotonic()
            with pytest.raises(StoreError, match="cannot connect"):
                store.write_pulses(PART, [pulse(id="still out of reach")], T0)
            told_in = time.monotonic() - started
            store._pool.check()  # more refused attempts: failures older than the next success
            time.sleep(0.5)
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        assert not isinstance(refused.value, StoreBusy), refused.value
        assert "cannot connect to PostgreSQL at 127.0.0.1:" in str(refused.value)
        assert name in str(refused.value)
        assert "is not currently accepting connections" in str(refused.value)  # the server's why
        assert told_in < 1.5, f"a request waited {told_in:.1f} s to be told it again"
        deadline = time.monotonic() + 10
        while True:  # the pool connects again within a busy timeout or two
            try:
                assert store.write_pulses(PART, [pulse(id="after")], T0) == ["accepted"]
                break
            except StoreError:
                assert time.monotonic() < deadline, "no write 10 s after the database was back"
                time.sleep(0.1)
        assert bucket(store)[1] == 2  # "before" and "after": nothing else stored
        # Back: the failures the pool met before are not taken for an outage.
        with store._pool.connection(), pytest.raises(StoreBusy, match="became free in time"):
            store.write_pulses(PART, [pulse(id="busy again")], T0)
    finally:
        store.close()
    said = [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.name == "ingestor.store" and "the store" in r.getMessage()
    ]
    assert said == [
        ("WARNING", "cannot connect to the store"),
        ("INFO", "connected to the store again"),
    ]
