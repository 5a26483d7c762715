"""Several PostgresStore instances on one database, as separate processes would be.

Each instance has its own pool; several threads use each at once. The
partition locks, not luck, must make the answers exact: every id counted
once, every unit of usage in exactly one batch, and a writer killed while
it holds a partition leaves nothing behind.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from decimal import Decimal

import msgspec
import psycopg
import pytest

from ingestor.clock import epoch_us
from ingestor.errors import StoreBusy, StoreError
from ingestor.model import Batch, Pulse
from ingestor.money import format_nanos, to_nanos
from ingestor.partition import partition_of
from ingestor.store import AggregateQuery, BatchQuery, PulseQuery
from ingestor.store.postgres import PostgresStore

from .conftest import BUSY_TIMEOUT

DAY = "2024-05-01"
T0 = epoch_us(dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC))
PARTITIONS = 4
TENANTS = ("a", "B", "e")  # three different partitions of four


def pulse(tenant: str, nanos: int, *, sku: str = "s1", id: str | None = None) -> Pulse:
    if id is None:
        return Pulse(
            tenant, sku, "u1", nanos, f"srv-{random.getrandbits(64):x}", False, T0, DAY, b""
        )
    fingerprint = hashlib.blake2b(f"{sku}\0{nanos}".encode(), digest_size=16).digest()
    return Pulse(tenant, sku, "u1", nanos, id, True, T0, DAY, fingerprint)


def amount_of(number: int) -> int:
    """The fixed payload of id `number`: a few fractional digits, so sums are not trivial."""
    return to_nanos(Decimal(number) / 8 + Decimal("0.001"))


@pytest.fixture
def instances(postgres_url: str) -> Iterator[list[PostgresStore]]:
    stores = [
        PostgresStore.open(
            postgres_url, partitions=PARTITIONS, pool_size=3, busy_timeout=BUSY_TIMEOUT
        )
        for _ in range(3)
    ]
    try:
        yield stores
    finally:
        for store in stores:
            store.close()


def run_all(tasks: list[Callable[[], object]]) -> list[object]:
    """Run the tasks in threads at once; re-raise the first failure."""
    start = threading.Barrier(len(tasks))

    def go(task: Callable[[], object]) -> object:
        start.wait()
        return task()

    with ThreadPoolExecutor(len(tasks)) as pool:
        futures: list[Future[object]] = [pool.submit(go, task) for task in tasks]
        return [future.result() for future in futures]


def test_instances_created_together_make_one_store(fresh_database: str) -> None:
    def make() -> PostgresStore:
        return PostgresStore.open(
            fresh_database, partitions=PARTITIONS, pool_size=1, busy_timeout=BUSY_TIMEOUT
        )

    made = run_all([make] * 4)
    stores = [s for s in made if isinstance(s, PostgresStore)]
    try:
        assert len({s.store_id for s in stores}) == 1
        assert {s.partitions for s in stores} == {PARTITIONS}
        with psycopg.connect(fresh_database) as conn:
            rows = conn.execute("SELECT value FROM public.meta WHERE key = 'store_id'").fetchall()
        assert rows == [(stores[0].store_id,)]
    finally:
        for store in stores:
            store.close()


def test_concurrent_writes_with_retried_ids_count_each_id_once(
    instances: list[PostgresStore],
) -> None:
    ids = 300
    accepted: Counter[tuple[str, str]] = Counter()
    idless: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def client(store: PostgresStore, seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(15):
            tenant = rng.choice(TENANTS)
            numbers = rng.sample(range(ids), 40)
            group = [pulse(tenant, amount_of(n), id=f"id-{n}") for n in numbers]
            group += [pulse(tenant, 1_000_000_000) for _ in range(2)]
            partition = partition_of(tenant, store.partitions)
            for attempt in range(2):  # the client retries the whole request once
                got = store.write_pulses(partition, group, T0)
                with lock:
                    outcomes.update(got)
                    for p, outcome in zip(group, got, strict=True):
                        if outcome == "accepted":
                            if p.client_id:
                                accepted[(tenant, p.pulse_id)] += 1
                            else:
                                idless[tenant] += 1
                if attempt == 1:
                    assert all(
                        o == "duplicate" for o, p in zip(got, group, strict=True) if p.client_id
                    )

    run_all(
        [
            lambda store=store, seed=seed: client(store, seed)  # type: ignore[misc]
            for seed, store in enumerate(instances * 2)
        ]
    )

    assert outcomes["conflict"] == 0
    assert set(accepted.values()) == {1}
    store = instances[0]
    for tenant in TENANTS:
        mine = [int(key[1].removeprefix("id-")) for key in accepted if key[0] == tenant]
        [bucket] = store.aggregates(AggregateQuery(tenant_id=tenant))
        expected = sum(amount_of(n) for n in mine) + idless[tenant] * 1_000_000_000
        assert bucket.used_amount == format_nanos(expected)
        assert bucket.pulse_count == len(mine) + idless[tenant]
        stored = store.pulses(PulseQuery(tenant_id=tenant, day=DAY, limit=10_000))
        client_ids = [p.id for _, p in stored if not p.id_assigned]
        assert sorted(client_ids) == sorted(f"id-{n}" for n in mine)


def test_concurrent_commits_while_pulses_arrive(
    postgres_url: str, instances: list[PostgresStore]
) -> None:
    writing = threading.Event()
    written: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    lock = threading.Lock()
    summaries: list[str] = []

    def writer(store: PostgresStore, seed: int) -> None:
        rng = random.Random(seed)
        for round_ in range(60):
            tenant = rng.choice(TENANTS)
            group = [
                pulse(
                    tenant,
                    rng.randrange(1, 10**12),
                    sku=f"s{rng.randrange(5)}",
                    id=f"w{seed}-{round_}-{n}" if n % 2 else None,
                )
                for n in range(rng.randrange(1, 20))
            ]
            got = store.write_pulses(partition_of(tenant, store.partitions), group, T0)
            assert set(got) == {"accepted"}
            with lock:
                for p in group:
                    totals = written[(tenant, p.product_sku)]
                    totals[0] += p.nanos
                    totals[1] += 1

    def committer(store: PostgresStore) -> None:
        while writing.is_set():
            for partition in range(store.partitions):
                made = store.commit_day(partition, DAY, T0, 3)
                with lock:
                    summaries.extend(b.batch_id for b in made)

    def writers() -> None:
        try:
            run_all(
                [
                    lambda store=store, seed=seed: writer(store, seed)  # type: ignore[misc]
                    for seed, store in enumerate(instances[:2] * 2)
                ]
            )
        finally:
            writing.clear()

    writing.set()
    run_all([writers, lambda: committer(instances[1]), lambda: committer(instances[2])])
    for partition in range(PARTITIONS):  # the last pulses
        summaries.extend(b.batch_id for b in instances[0].commit_day(partition, DAY, T0, 3))

    assert len(summaries) == len(set(summaries)), "a batch id was handed out twice"
    store = instances[0]
    batches: list[Batch] = []
    with psycopg.connect(postgres_url) as conn:
        for partition in range(PARTITIONS):
            rows = conn.execute(
                "SELECT seq, body FROM batches WHERE partition = %s ORDER BY seq", (partition,)
            ).fetchall()
            assert [seq for seq, _ in rows] == list(range(1, len(rows) + 1))
            batches.extend(msgspec.json.decode(body, type=Batch) for _, body in rows)
    assert sorted(b.batch_id for b in batches) == sorted(summaries)

    delivered: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    revisions: dict[tuple[str, str], list[int]] = defaultdict(list)
    for batch in batches:
        for record in batch.records:
            key = (record.tenant_id, record.product_sku)
            sums = delivered[key]
            sums[0] += to_nanos(Decimal(record.used_amount))
            sums[1] += record.pulse_count
            assert record.total_amount == format_nanos(sums[0])
            assert record.total_count == sums[1]
            revisions[key].append(record.revision)
    assert dict(delivered) == dict(written)
    assert all(r == list(range(1, len(r) + 1)) for r in revisions.values())
    assert any(len(r) > 1 for r in revisions.values()), "no commit overlapped the writers"
    for row in store.aggregates(AggregateQuery(limit=10_000)):
        assert [row.used_amount, row.pulse_count] == [
            format_nanos(written[(row.tenant_id, row.product_sku)][0]),
            written[(row.tenant_id, row.product_sku)][1],
        ]
        assert (row.committed_amount, row.committed_count) == (row.used_amount, row.pulse_count)


@contextmanager
def row_locked(url: str, tenant: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """Hold tenant's bucket rows FOR UPDATE, so a store's upsert or commit waits there."""
    with psycopg.connect(url) as conn:
        conn.execute("SELECT 1 FROM buckets WHERE tenant_id = %s FOR UPDATE", (tenant,))
        yield conn
        conn.rollback()


def waiting_backend(url: str, statement: str) -> int:
    """The pid of the session that waits for a row lock while running `statement`."""
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(500):
            row = conn.execute(
                "SELECT a.pid FROM pg_stat_activity AS a"
                " WHERE a.datname = current_database() AND a.wait_event_type = 'Lock'"
                " AND a.query LIKE %s AND EXISTS (SELECT 1 FROM pg_locks AS l"
                "  WHERE l.pid = a.pid AND l.locktype = 'advisory' AND l.granted)",
                (statement + "%",),
            ).fetchone()
            if row is not None:
                return int(row[0])
            time.sleep(0.01)
    raise AssertionError(f"no session got stuck in {statement!r}")


def terminate(url: str, pid: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_writer_killed_holding_the_partition_leaves_nothing(
    postgres_url: str, instances: list[PostgresStore]
) -> None:
    first, other = instances[0], instances[1]
    part = partition_of("a", PARTITIONS)
    assert first.write_pulses(part, [pulse("a", 5, id="before")], T0) == ["accepted"]
    group = [pulse("a", 1, id="k1"), pulse("a", 2, id="k2"), pulse("a", 3, sku="s9")]

    with ThreadPoolExecutor(1) as pool, row_locked(postgres_url, "a"):
        stuck = pool.submit(first.write_pulses, part, group, T0)
        # Its pulses are inserted; it waits in the bucket upsert, holding the partition.
        terminate(postgres_url, waiting_backend(postgres_url, "\nINSERT INTO buckets"))
        with pytest.raises(StoreError, match="connection") as raised:
            stuck.result()
        assert not isinstance(raised.value, StoreBusy)

    assert [p.id for _, p in first.pulses(PulseQuery(tenant_id="a", day=DAY))] == ["before"]
    [bucket] = first.aggregates(AggregateQuery(tenant_id="a"))
    assert (bucket.used_amount, bucket.pulse_count) == ("0.000000005", 1)
    # The partition is free at once, and the same ids are new: nothing half-kept.
    assert other.write_pulses(part, group, T0) == ["accepted"] * 3
    # The killed instance's pool replaced the dead connection.
    assert first.write_pulses(part, group[:2], T0) == ["duplicate"] * 2


def test_committer_killed_holding_the_partition_leaves_nothing(
    postgres_url: str, instances: list[PostgresStore]
) -> None:
    first, other = instances[0], instances[1]
    part = partition_of("a", PARTITIONS)
    first.write_pulses(part, [pulse("a", 5), pulse("a", 7, sku="s2")], T0)

    with ThreadPoolExecutor(1) as pool, row_locked(postgres_url, "a"):
        stuck = pool.submit(first.commit_day, part, DAY, T0, 1)
        # Its batches are inserted; it waits to mark the buckets committed.
        terminate(postgres_url, waiting_backend(postgres_url, "UPDATE buckets"))
        with pytest.raises(StoreError, match="connection"):
            stuck.result()

    assert first.batches(BatchQuery()) == []
    assert first.open_days(part) == [DAY]
    made = other.commit_day(part, DAY, T0, 1)
    assert [(b.batch_id.rsplit("-", 1)[1], b.used_amount) for b in made] == [
        ("00001", "0.000000005"),
        ("00002", "0.000000007"),
    ]


def test_waiting_for_a_held_partition_times_out_as_busy(
    postgres_url: str, instances: list[PostgresStore]
) -> None:
    first = instances[0]
    impatient = PostgresStore.open(
        postgres_url, partitions=PARTITIONS, pool_size=1, busy_timeout=0.5
    )
    try:
        part = partition_of("a", PARTITIONS)
        first.write_pulses(part, [pulse("a", 5)], T0)
        with ThreadPoolExecutor(1) as pool, row_locked(postgres_url, "a"):
            stuck = pool.submit(first.write_pulses, part, [pulse("a", 1)], T0)
            waiting_backend(postgres_url, "\nINSERT INTO buckets")
            # Another partition is not held up.
            other = partition_of("B", PARTITIONS)
            assert instances[1].write_pulses(other, [pulse("B", 1)], T0) == ["accepted"]
            with pytest.raises(StoreBusy, match="busy timeout"):
                impatient.write_pulses(part, [pulse("a", 2)], T0)
            with pytest.raises(StoreBusy, match="busy timeout"):
                impatient.commit_day(part, DAY, T0, 10)
        assert stuck.result() == ["accepted"]
        [bucket] = first.aggregates(AggregateQuery(tenant_id="a"))
        assert (bucket.used_amount, bucket.pulse_count) == ("0.000000006", 2)
    finally:
        impatient.close()


def test_unreachable_server_is_a_clear_store_error() -> None:
    with pytest.raises(StoreError, match=r"cannot connect to PostgreSQL at 127\.0\.0\.1:1/"):
        PostgresStore.open(
            "postgresql://postgres@127.0.0.1:1/nothing", partitions=4, pool_size=1, busy_timeout=1
        )


def test_pooled_connections_killed_while_idle_are_replaced(
    postgres_url: str, instances: list[PostgresStore]
) -> None:
    part = partition_of("a", PARTITIONS)
    for store in instances:
        store.write_pulses(part, [pulse("a", 1)], T0)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        killed = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND application_name = 'billing-ingestor'"
        ).fetchone()
    assert killed is not None
    assert killed[0] >= len(instances)
    for store in instances:
        assert store.write_pulses(part, [pulse("a", 1)], T0) == ["accepted"]
        assert store.open_days(part) == [DAY]


def test_leadership_moves_when_the_leaders_session_dies(
    postgres_url: str, instances: list[PostgresStore]
) -> None:
    leader, follower = instances[0], instances[1]
    assert leader.lead_committer() is True
    assert follower.lead_committer() is False
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        # The leadership lock: two-key advisory, second key -1 (as an oid).
        killed = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks"
            " WHERE locktype = 'advisory' AND objsubid = 2 AND objid = 4294967295"
            " AND granted AND database = (SELECT oid FROM pg_database"
            "  WHERE datname = current_database())"
        ).fetchall()
    assert killed == [(True,)]
    for _ in range(100):  # the server ends the session asynchronously
        if follower.lead_committer():
            break
        time.sleep(0.02)
    else:
        raise AssertionError("the follower never took over")
    assert leader.lead_committer() is False
    assert instances[2].lead_committer() is False
