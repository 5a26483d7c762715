"""One suite, every store: each protocol method against hand-computed answers.

The `backend` fixture (conftest) runs every test on a fresh SQLite store and
on a fresh PostgreSQL store; a difference between them is a bug in one.
Stores are opened with 4 partitions. The tenants are chosen so that "a",
"B" and "e" live in different partitions and sort "B" < "a" < "e" (code
points, as the API's cursors assume).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import threading
from collections.abc import Sequence
from decimal import Decimal

import msgspec
import psycopg
import pytest

from ingestor.clock import epoch_us
from ingestor.errors import StoreMismatch
from ingestor.intake import Rules, decode_pulses
from ingestor.ledger import batch_id
from ingestor.model import (
    Aggregate,
    Batch,
    BatchRecord,
    BatchSummary,
    Outcome,
    Pulse,
    StoredPulse,
    payload_digest,
)
from ingestor.money import to_nanos
from ingestor.partition import partition_of
from ingestor.store import AggregateQuery, BatchQuery, PulseQuery, Store
from ingestor.store.sqlite import SQLiteStore

from .conftest import Backend

D1, D2, D3 = "2024-05-01", "2024-05-02", "2024-05-03"
T0 = epoch_us(dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC))
HOUR = 3_600_000_000
PARTITIONS = 4


def moment(us: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=us)


def pulse(
    tenant: str,
    amount: str,
    *,
    sku: str = "s1",
    unit: str = "u1",
    id: str | None = None,
    day: str = D1,
    ts: int = T0,
) -> Pulse:
    """A pulse as intake makes it; `ts` is the receive time, not the client's."""
    nanos = to_nanos(Decimal(amount))
    if id is None:
        return Pulse(tenant, sku, unit, nanos, "", False, ts, day, b"")
    return Pulse(tenant, sku, unit, nanos, id, True, ts, day, b"", False)


def write(store: Store, pulses: Sequence[Pulse], received_us: int = T0) -> list[Outcome]:
    """Write pulses through their partitions, one call each; outcomes in order."""
    by_partition: dict[int, list[int]] = {}
    for index, p in enumerate(pulses):
        by_partition.setdefault(partition_of(p.tenant_id, store.partitions), []).append(index)
    outcomes: list[Outcome | None] = [None] * len(pulses)
    for partition, indexes in by_partition.items():
        got = store.write_pulses(partition, [pulses[i] for i in indexes], received_us)
        assert len(got) == len(indexes)
        for i, outcome in zip(indexes, got, strict=True):
            outcomes[i] = outcome
    assert None not in outcomes
    return outcomes  # type: ignore[return-value]


def commit_all(
    store: Store, day: str, now_us: int = T0 + HOUR, max_records: int = 1000
) -> list[BatchSummary]:
    return [
        summary
        for partition in range(store.partitions)
        for summary in store.commit_day(partition, day, now_us, max_records)
    ]


def aggregate(
    store: Store, tenant: str, sku: str = "s1", unit: str = "u1", day: str = D1
) -> Aggregate:
    found = store.aggregates(
        AggregateQuery(tenant_id=tenant, product_sku=sku, use_unit=unit, date_from=day, date_to=day)
    )
    assert len(found) == 1
    return found[0]


def keys(rows: Sequence[Aggregate]) -> list[tuple[str, str, str, str]]:
    return [(r.date, r.tenant_id, r.product_sku, r.use_unit) for r in rows]


def test_tenants_of_the_suite_are_spread_over_partitions() -> None:
    assert len({partition_of(t, PARTITIONS) for t in ("a", "B", "e")}) == 3


def test_fresh_store(store: Store) -> None:
    assert store.partitions == PARTITIONS
    assert store.store_id.isalnum()
    assert "-" not in store.store_id
    assert store.aggregates(AggregateQuery()) == []
    assert store.outbox_statistics() == (0, None)
    assert store.outbox_batches() == {"pending": 0, "failed": 0}
    assert store.due_batches(T0, 10) == []
    assert store.batches(BatchQuery()) == []
    assert all(store.open_days(p) == [] for p in range(PARTITIONS))
    assert store.write_pulses(0, [], T0) == []
    assert store.commit_day(0, D1, T0, 10) == []


def test_writers_take_turns_at_a_lock_in_sqlite_alone(backend: Backend) -> None:
    """SQLite's writers, one process at a time, count their turns at its lock;
    PostgreSQL's lock the rows they write, and have no such turns."""
    store = backend.open()
    before = store.writer_lock()
    write(store, [pulse("a", "1", id="x")])
    with store.writing_together():
        write(store, [pulse("a", "2", id="y")])
        write(store, [pulse("b", "2")])
    after = store.writer_lock()
    if backend.kind == "postgres":
        assert before is after is None
        return
    assert before is not None
    assert after is not None
    assert after.turns == before.turns + 2  # one a transaction, a round's writes together
    assert after.held_seconds > before.held_seconds
    assert after.wait_seconds >= before.wait_seconds


# -- write_pulses: dedup, conflicts, id-less pulses, exact sums ------------


def test_dedup_and_conflict_within_one_group(store: Store) -> None:
    outcomes = write(
        store,
        [
            pulse("a", "1", id="x"),
            pulse("a", "1", id="x"),  # replay
            pulse("a", "2", id="x"),  # same id, other payload
            pulse("a", "3", id="y"),
            pulse("a", "4"),
            pulse("a", "1", id="x", sku="s2"),  # other payload too
        ],
    )
    assert outcomes == ["accepted", "duplicate", "conflict", "accepted", "accepted", "conflict"]
    got = aggregate(store, "a")
    assert (got.used_amount, got.pulse_count) == ("8", 3)
    assert store.aggregates(AggregateQuery(product_sku="s2")) == []


def test_dedup_and_conflict_across_calls(store: Store) -> None:
    assert write(store, [pulse("a", "1", id="x"), pulse("a", "3", id="y")]) == [
        "accepted",
        "accepted",
    ]
    outcomes = write(
        store,
        [
            pulse("a", "1", id="x"),
            pulse("a", "5", id="y"),
            pulse("a", "0.5", id="z"),
            pulse("a", "0.5", id="z"),
            pulse("B", "1", id="x"),  # ids are per tenant
        ],
    )
    assert outcomes == ["duplicate", "conflict", "accepted", "duplicate", "accepted"]
    got = aggregate(store, "a")
    assert (got.used_amount, got.pulse_count) == ("4.5", 3)
    other = aggregate(store, "B")
    assert (other.used_amount, other.pulse_count) == ("1", 1)
    # A conflict is not stored: the stored payload of "y" is still the first one.
    stored = store.pulses(PulseQuery(tenant_id="a", day=D1))
    assert [(p.id, p.used_amount) for _, p in stored] == [("x", "1"), ("y", "3"), ("z", "0.5")]


def test_a_replay_is_compared_with_the_pulse_stored_with_its_id(backend: Backend) -> None:
    """Intake gives a pulse no digest of its payload: the store compares a replay
    with the pulse it holds, also once it was reopened."""
    store = backend.open(partitions=PARTITIONS)
    given = msgspec.structs.replace(pulse("a", "2", id="stamped"), ts=T0 - HOUR, ts_given=True)
    assert write(store, [pulse("a", "1", id="plain"), given]) == ["accepted"] * 2
    replays = [
        pulse("a", "1", id="plain", ts=T0 + HOUR),  # received later, and sent without a timestamp
        msgspec.structs.replace(pulse("a", "1", id="plain"), ts_given=True),
        pulse("a", "1", id="plain", unit="u2"),
        msgspec.structs.replace(given, ts=T0 - HOUR + 1),
        msgspec.structs.replace(given, nanos=given.nanos + 1),
        msgspec.structs.replace(given, ts_given=False),
        given,
    ]
    expected = ["duplicate", "conflict", "conflict", "conflict", "conflict", "conflict"]
    assert write(store, replays) == [*expected, "duplicate"]
    store.close()
    store = backend.open(partitions=PARTITIONS)
    try:
        assert write(store, replays) == [*expected, "duplicate"]
        got = aggregate(store, "a")
        assert (got.used_amount, got.pulse_count) == ("3", 2)
    finally:
        store.close()


def test_ids_stored_with_the_digest_of_their_payload_are_compared_by_it(
    backend: Backend,
) -> None:
    """Earlier versions gave each pulse with an id the digest of its payload, and
    stores kept it: a replay is compared with that."""
    store = backend.open(partitions=PARTITIONS)
    old = pulse("a", "1", id="x")
    stamped = msgspec.structs.replace(pulse("a", "2", id="y"), ts_given=True)
    digested = [msgspec.structs.replace(p, fingerprint=payload_digest(p)) for p in (old, stamped)]
    assert write(store, digested) == ["accepted"] * 2
    replays = [
        pulse("a", "1", id="x", ts=T0 + HOUR),
        stamped,
        pulse("a", "1.5", id="x"),
        msgspec.structs.replace(old, ts_given=True),
        msgspec.structs.replace(stamped, ts=stamped.ts + 1),
    ]
    expected = ["duplicate", "duplicate", "conflict", "conflict", "conflict"]
    assert write(store, replays) == expected
    store.close()
    store = backend.open(partitions=PARTITIONS)
    try:
        assert write(store, replays) == expected
    finally:
        store.close()


def test_id_less_pulses_are_each_counted_and_named_by_their_store(store: Store) -> None:
    same = pulse("a", "2")
    assert write(store, [same, same]) == ["accepted", "accepted"]
    assert write(store, [pulse("e", "1"), pulse("a", "2")]) == ["accepted", "accepted"]
    # Stored before stores named such pulses: it keeps the name it was given.
    named = msgspec.structs.replace(pulse("a", "1"), pulse_id="srv-0a1b2c3d4e5f07-3")
    assert write(store, [named]) == ["accepted"]
    query = PulseQuery(tenant_id="a", day=D1)
    stored = [p for _, p in store.pulses(query)]
    assert [p.id_assigned for p in stored] == [True, True, True, True]
    ids = [p.id for p in stored]
    assert ids[3] == "srv-0a1b2c3d4e5f07-3"
    assert all(i.startswith(f"srv-{store.store_id}-") for i in ids[:3])
    [other] = [p.id for _, p in store.pulses(PulseQuery(tenant_id="e", day=D1))]
    assert len({*ids, other}) == 5
    # The same at every read: page by page, and once the totals are folded.
    got = aggregate(store, "a")
    assert (got.used_amount, got.pulse_count) == ("7", 4)
    paged: list[str] = []
    after = None
    while page := store.pulses(msgspec.structs.replace(query, after=after, limit=1)):
        after = page[-1][0]
        paged += [p.id for _, p in page]
    assert paged == ids


def test_replayed_request_is_reported_duplicate(store: Store) -> None:
    rules = Rules(late_window_s=35 * 86400, future_skew_s=300, max_batch=100)
    body = (
        b'[{"tenant_id": "a", "product_sku": "s1", "use_unit": "u1", "used_amount": "1.25",'
        b' "id": "r1", "timestamp": "2024-05-01T10:00:00Z"},'
        b' {"tenant_id": "a", "product_sku": "s1", "use_unit": "u1", "used_amount": 2,'
        b' "id": "r2"},'
        b' {"tenant_id": "a", "product_sku": "s1", "use_unit": "u1", "used_amount": "0.75"}]'
    )
    first = decode_pulses(body, "application/json", rules, T0)
    assert write(store, [p for _, p in first.pulses]) == ["accepted"] * 3
    # The replay comes a minute later: "r2" has no timestamp, so it lands on
    # the receive time; its payload fingerprint is still the same.
    replay = decode_pulses(body, "application/json", rules, T0 + 60_000_000)
    assert write(store, [p for _, p in replay.pulses]) == ["duplicate", "duplicate", "accepted"]
    got = aggregate(store, "a")
    assert (got.used_amount, got.pulse_count) == ("4.75", 4)


def test_sums_are_exact_beyond_1e20(store: Store) -> None:
    big = "999999999999999999.999999999"  # the largest amount a pulse may carry
    assert write(store, [pulse("a", big) for _ in range(50)]) == ["accepted"] * 50
    assert write(store, [pulse("a", big) for _ in range(51)]) == ["accepted"] * 51
    assert write(store, [pulse("a", "0.000000001"), pulse("a", "0")]) == ["accepted"] * 2
    got = aggregate(store, "a")
    # 101 * (10**18 - 10**-9) + 10**-9 = 101 * 10**18 - 100 * 10**-9
    assert (got.used_amount, got.pulse_count) == ("100999999999999999999.9999999", 103)
    stored = store.pulses(PulseQuery(tenant_id="a", day=D1, limit=200))
    assert {p.used_amount for _, p in stored} == {big, "0.000000001", "0"}
    [summary] = commit_all(store, D1)
    assert summary.used_amount == "100999999999999999999.9999999"
    view = store.batch(summary.batch_id)
    assert view is not None
    assert view.used_amount == "100999999999999999999.9999999"
    assert view.records is not None
    assert view.records[0].total_amount == "100999999999999999999.9999999"
    after = aggregate(store, "a")
    assert after.committed_amount == "100999999999999999999.9999999"


def test_amounts_are_shown_in_shortest_form(store: Store) -> None:
    write(store, [pulse("a", "1.50"), pulse("a", "98.5000")])
    write(store, [pulse("a", "0.10", sku="s2")])
    assert aggregate(store, "a").used_amount == "100"
    assert aggregate(store, "a", sku="s2").used_amount == "0.1"
    stored = store.pulses(PulseQuery(tenant_id="a", day=D1))
    assert [p.used_amount for _, p in stored] == ["1.5", "98.5", "0.1"]


# -- aggregates: filters, order, pagination --------------------------------


@pytest.fixture
def spread(store: Store) -> Store:
    """Six buckets over three days; D1 committed, then one late pulse on D1."""
    write(
        store,
        [
            pulse("a", "1", id="a1"),
            pulse("a", "2"),
            pulse("B", "5"),
            pulse("a", "1.5", sku="s2"),
            pulse("a", "10", unit="u2", day=D2, ts=T0 + 24 * HOUR),
            pulse("e", "0.25", day=D2, ts=T0 + 24 * HOUR),
            pulse("B", "7", sku="s2", unit="u2", day=D3, ts=T0 + 48 * HOUR),
        ],
    )
    assert len(commit_all(store, D1)) == 2  # one batch each for "a" and "B"
    write(store, [pulse("a", "1", id="late")], received_us=T0 + 2 * HOUR)
    return store


ALL_KEYS = [
    (D1, "B", "s1", "u1"),
    (D1, "a", "s1", "u1"),
    (D1, "a", "s2", "u1"),
    (D2, "a", "s1", "u2"),
    (D2, "e", "s1", "u1"),
    (D3, "B", "s2", "u2"),
]


def test_aggregates_values(spread: Store) -> None:
    assert spread.aggregates(AggregateQuery(tenant_id="a", date_to=D1)) == [
        Aggregate("a", "s1", "u1", D1, "4", 3, "3", 2, 1),
        Aggregate("a", "s2", "u1", D1, "1.5", 1, "1.5", 1, 1),
    ]
    assert spread.aggregates(AggregateQuery(tenant_id="e")) == [
        Aggregate("e", "s1", "u1", D2, "0.25", 1, "0", 0, 0),
    ]


FILTERS = [
    (AggregateQuery(), ALL_KEYS),
    (AggregateQuery(status="all"), ALL_KEYS),
    (AggregateQuery(tenant_id="a"), [ALL_KEYS[i] for i in (1, 2, 3)]),
    (AggregateQuery(tenant_id="B"), [ALL_KEYS[i] for i in (0, 5)]),
    (AggregateQuery(tenant_id="nobody"), []),
    (AggregateQuery(product_sku="s2"), [ALL_KEYS[i] for i in (2, 5)]),
    (AggregateQuery(use_unit="u2"), [ALL_KEYS[i] for i in (3, 5)]),
    (AggregateQuery(date_from=D2), ALL_KEYS[3:]),
    (AggregateQuery(date_to=D1), ALL_KEYS[:3]),
    (AggregateQuery(date_from=D2, date_to=D2), ALL_KEYS[3:5]),
    (AggregateQuery(status="open"), [ALL_KEYS[i] for i in (1, 3, 4, 5)]),
    (AggregateQuery(status="committed"), [ALL_KEYS[i] for i in (0, 2)]),
    (AggregateQuery(tenant_id="a", status="open", date_to=D1), [ALL_KEYS[1]]),
    (AggregateQuery(tenant_id="a", product_sku="s1", use_unit="u2"), [ALL_KEYS[3]]),
    (AggregateQuery(limit=2), ALL_KEYS[:2]),
    (AggregateQuery(after=ALL_KEYS[1]), ALL_KEYS[2:]),
    (AggregateQuery(after=(D1, "a", "s1", "u0")), ALL_KEYS[1:]),
    (AggregateQuery(after=ALL_KEYS[5]), []),
    (AggregateQuery(status="open", after=ALL_KEYS[1], limit=2), ALL_KEYS[3:5]),
    # A key's tenants, in one query.
    (AggregateQuery(tenants=("B", "e")), [ALL_KEYS[i] for i in (0, 4, 5)]),
    (AggregateQuery(tenants=("a", "nobody")), [ALL_KEYS[i] for i in (1, 2, 3)]),
    (AggregateQuery(tenants=("e", "B"), after=ALL_KEYS[0], limit=1), [ALL_KEYS[4]]),
    (AggregateQuery(tenants=("a", "B"), status="open", date_to=D1), [ALL_KEYS[1]]),
    (AggregateQuery(tenants=("a", "B", "e"), tenant_id="e"), [ALL_KEYS[4]]),
]


def test_aggregates_filters_and_order(spread: Store) -> None:
    # One store for every query: a fresh database per query would be slow.
    for query, expected in FILTERS:
        assert keys(spread.aggregates(query)) == expected, query


def test_aggregates_keyset_pagination(spread: Store) -> None:
    for size, tenant, pages in [(1, None, 6), (2, None, 3), (4, None, 2), (1, "a", 3)]:
        seen: list[tuple[str, str, str, str]] = []
        count = 0
        after: tuple[str, str, str, str] | None = None
        while page := keys(
            spread.aggregates(AggregateQuery(tenant_id=tenant, after=after, limit=size))
        ):
            assert len(page) <= size
            seen.extend(page)
            count += 1
            after = page[-1]
        assert count == pages
        assert seen == keys(spread.aggregates(AggregateQuery(tenant_id=tenant)))


def test_open_days(spread: Store) -> None:
    days = {p: spread.open_days(p) for p in range(PARTITIONS)}
    assert days[partition_of("a", PARTITIONS)] == [D1, D2]
    assert days[partition_of("B", PARTITIONS)] == [D3]
    assert days[partition_of("e", PARTITIONS)] == [D2]


def test_open_buckets_counts_buckets_with_uncommitted_usage(store: Store) -> None:
    assert store.open_buckets() == 0
    write(store, [pulse("a", "1"), pulse("a", "1", sku="s2"), pulse("e", "2", day=D2)])
    assert store.open_buckets() == 3
    store.commit_day(partition_of("a", PARTITIONS), D1, T0, 100)
    assert store.open_buckets() == 1
    write(store, [pulse("a", "5")])
    assert store.open_buckets() == 2


# -- pulses: the audit trail -----------------------------------------------


def test_pulses_query_and_pagination(store: Store) -> None:
    write(
        store,
        [
            pulse("a", "1", id="p1", ts=T0 + 1),
            pulse("a", "2", sku="s2", ts=T0 + 2),
            pulse("a", "3", id="p3", unit="u2", ts=T0 + 3),
            pulse("a", "4", id="p4", day=D2, ts=T0 + 24 * HOUR),
            pulse("B", "5", id="p5"),
        ],
        received_us=T0 + 10,
    )
    write(store, [pulse("a", "6", id="p6", ts=T0 + 4)], received_us=T0 + 20)
    rows = store.pulses(PulseQuery(tenant_id="a", day=D1))
    assert [(p.id if not p.id_assigned else "*") for _, p in rows] == ["p1", "*", "p3", "p6"]
    seqs = [seq for seq, _ in rows]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 4
    assert rows[0][1] == StoredPulse(
        id="p1",
        tenant_id="a",
        product_sku="s1",
        use_unit="u1",
        used_amount="1",
        timestamp=moment(T0 + 1),
        date=D1,
        received_at=moment(T0 + 10),
        id_assigned=False,
    )
    assert rows[3][1].received_at == moment(T0 + 20)
    sku = store.pulses(PulseQuery(tenant_id="a", day=D1, product_sku="s2"))
    assert [p.used_amount for _, p in sku] == ["2"]
    unit = store.pulses(PulseQuery(tenant_id="a", day=D1, use_unit="u2"))
    assert [p.id for _, p in unit] == ["p3"]
    assert [p.id for _, p in store.pulses(PulseQuery(tenant_id="a", day=D2))] == ["p4"]
    assert store.pulses(PulseQuery(tenant_id="a", day=D3)) == []
    assert store.pulses(PulseQuery(tenant_id="nobody", day=D1)) == []

    paged: list[str] = []
    after: int | None = None
    while True:
        page = store.pulses(PulseQuery(tenant_id="a", day=D1, after=after, limit=3))
        if not page:
            break
        paged.extend(p.id for _, p in page)
        after = page[-1][0]
    assert paged == [p.id for _, p in rows]
    assert store.pulses(PulseQuery(tenant_id="a", day=D1, after=seqs[1], limit=1)) == [rows[2]]


# -- commit_day ------------------------------------------------------------


def test_commit_day_initial_then_nothing_then_correction(store: Store) -> None:
    pa = partition_of("a", PARTITIONS)
    write(store, [pulse("a", "1"), pulse("a", "2", id="i"), pulse("a", "4", sku="s2")])
    write(store, [pulse("a", "8", day=D2, ts=T0 + 24 * HOUR)])
    now = T0 + HOUR
    first = store.commit_day(pa, D1, now, 100)
    bid1 = batch_id(store.store_id, D1, pa, 1)
    assert first == [BatchSummary(bid1, "initial", pa, 2, "7")]
    assert store.commit_day(pa, D1, now + 1, 100) == []
    assert store.open_days(pa) == [D2]
    assert aggregate(store, "a", day=D2).pulse_count == 1  # the other day is untouched

    write(store, [pulse("a", "0.5", sku="s2"), pulse("a", "2", id="i")])  # late + replay
    assert store.open_days(pa) == [D1, D2]
    now2 = T0 + 2 * HOUR
    second = store.commit_day(pa, D1, now2, 100)
    bid2 = batch_id(store.store_id, D1, pa, 2)
    assert second == [BatchSummary(bid2, "correction", pa, 1, "0.5")]
    view = store.batch(bid2)
    assert view is not None
    assert view.records == [BatchRecord("a", "s2", "u1", 2, "0.5", 1, "4.5", 2)]
    assert aggregate(store, "a", sku="s2") == Aggregate("a", "s2", "u1", D1, "4.5", 2, "4.5", 2, 2)

    # The body, handed out with a claim, is the msgspec JSON of the Batch, byte for byte.
    def claimed(bid: str) -> bytes | None:
        [due] = [d for d in store.due_batches(now2, 10) if d.batch_id == bid]
        return store.claim_batch(
            due.partition, bid, now_us=now2, latest_us=now2 + 10**9, lease_us=now2 + 10**6
        )

    assert claimed(bid2) == msgspec.json.encode(
        Batch(
            batch_id=bid2,
            store_id=store.store_id,
            date=D1,
            partition=pa,
            kind="correction",
            created_at=moment(now2),
            record_count=1,
            used_amount="0.5",
            records=[BatchRecord("a", "s2", "u1", 2, "0.5", 1, "4.5", 2)],
        )
    )
    first_body = msgspec.json.decode(claimed(bid1) or b"", type=Batch)
    assert first_body.records == [
        BatchRecord("a", "s1", "u1", 1, "3", 2, "3", 2),
        BatchRecord("a", "s2", "u1", 1, "4", 1, "4", 1),
    ]


def test_commit_day_initial_and_correction_in_one_commit(store: Store) -> None:
    pa = partition_of("a", PARTITIONS)
    write(store, [pulse("a", "1")])
    store.commit_day(pa, D1, T0 + HOUR, 100)
    write(store, [pulse("a", "2"), pulse("a", "3", sku="s0"), pulse("a", "4", sku="s9")])
    got = store.commit_day(pa, D1, T0 + 2 * HOUR, 100)
    assert got == [
        BatchSummary(batch_id(store.store_id, D1, pa, 2), "initial", pa, 2, "7"),
        BatchSummary(batch_id(store.store_id, D1, pa, 3), "correction", pa, 1, "2"),
    ]
    view = store.batch(got[0].batch_id)
    assert view is not None
    assert view.records == [
        BatchRecord("a", "s0", "u1", 1, "3", 1, "3", 1),
        BatchRecord("a", "s9", "u1", 1, "4", 1, "4", 1),
    ]


def test_commit_day_chunks_by_max_records(store: Store) -> None:
    pa = partition_of("a", PARTITIONS)
    write(store, [pulse("a", str(n), sku=f"s{n}") for n in range(1, 6)])
    got = store.commit_day(pa, D1, T0 + HOUR, 2)
    ids = [batch_id(store.store_id, D1, pa, seq) for seq in (1, 2, 3)]
    assert got == [
        BatchSummary(ids[0], "initial", pa, 2, "3"),
        BatchSummary(ids[1], "initial", pa, 2, "7"),
        BatchSummary(ids[2], "initial", pa, 1, "5"),
    ]
    records: list[tuple[str, str]] = []
    for bid in ids:
        view = store.batch(bid)
        assert view is not None
        assert view.records is not None
        records.extend((r.product_sku, r.used_amount) for r in view.records)
    assert records == [("s1", "1"), ("s2", "2"), ("s3", "3"), ("s4", "4"), ("s5", "5")]


def test_batch_ids_are_deterministic_per_day_and_partition(store: Store) -> None:
    write(store, [pulse(t, "1") for t in ("a", "B", "e")])
    write(store, [pulse("a", "1", day=D2, ts=T0 + 24 * HOUR)])
    first, second = commit_all(store, D1), commit_all(store, D2)
    assert [b.batch_id for b in first] == sorted(
        batch_id(store.store_id, D1, partition_of(t, PARTITIONS), 1) for t in ("a", "B", "e")
    )
    assert [b.batch_id for b in second] == [
        batch_id(store.store_id, D2, partition_of("a", PARTITIONS), 1)
    ]
    assert first[0].batch_id == f"{store.store_id}-20240501-p{first[0].partition:03d}-00001"


# -- the outbox: batches, batch, delivery ----------------------------------


@pytest.fixture
def outbox(store: Store) -> tuple[Store, list[str]]:
    """Three single-record batches in tenant a's partition (D1), one in B's (D2)."""
    write(store, [pulse("a", str(n), sku=f"s{n}") for n in (1, 2, 3)])
    write(store, [pulse("B", "9", day=D2, ts=T0 + 24 * HOUR)])
    ids = [b.batch_id for b in store.commit_day(partition_of("a", PARTITIONS), D1, T0, 1)]
    ids += [b.batch_id for b in store.commit_day(partition_of("B", PARTITIONS), D2, T0 + 5, 1)]
    assert len(ids) == 4
    return store, ids


def test_batch_views(outbox: tuple[Store, list[str]]) -> None:
    store, ids = outbox
    pa = partition_of("a", PARTITIONS)
    listed = store.batches(BatchQuery())
    assert [b.batch_id for b in listed] == ids
    first = listed[0]
    assert (first.store_id, first.date, first.partition, first.kind) == (
        store.store_id,
        D1,
        pa,
        "initial",
    )
    assert (first.record_count, first.used_amount, first.status, first.attempts) == (
        1,
        "1",
        "pending",
        0,
    )
    assert (first.created_at, first.next_attempt_at) == (moment(T0), moment(T0))
    assert (first.last_error, first.delivered_at, first.records) == (None, None, None)
    assert listed[3].date == D2
    assert listed[3].partition == partition_of("B", PARTITIONS)
    one = store.batch(ids[1])
    assert one is not None
    assert one.records == [BatchRecord("a", "s2", "u1", 1, "2", 1, "2", 1)]
    assert msgspec.structs.replace(one, records=None) == listed[1]
    assert store.batch("nope") is None
    assert store.batch(f"{'0' * 12}-20240501-p000-00001") is None
    assert store.batch(ids[0].replace("-00001", "-00009")) is None


def test_batches_filters_and_pagination(outbox: tuple[Store, list[str]]) -> None:
    store, ids = outbox
    assert [b.batch_id for b in store.batches(BatchQuery(day=D1))] == ids[:3]
    assert [b.batch_id for b in store.batches(BatchQuery(day=D2))] == ids[3:]
    assert store.batches(BatchQuery(day=D3)) == []
    store.record_delivery(
        partition_of("a", PARTITIONS),
        ids[1],
        status="delivered",
        error=None,
        next_attempt_us=None,
        now_us=T0 + 1,
    )
    assert [b.batch_id for b in store.batches(BatchQuery(status="delivered"))] == [ids[1]]
    assert [b.batch_id for b in store.batches(BatchQuery(status="pending"))] == [
        ids[0],
        ids[2],
        ids[3],
    ]
    assert store.batches(BatchQuery(status="failed")) == []
    paged: list[str] = []
    after: tuple[str, str] | None = None
    while page := store.batches(BatchQuery(after=after, limit=1)):
        paged.append(page[0].batch_id)
        after = (page[0].date, page[0].batch_id)
    assert paged == ids
    assert [b.batch_id for b in store.batches(BatchQuery(after=(D1, ids[2])))] == ids[3:]
    assert [b.batch_id for b in store.batches(BatchQuery(limit=2, status="pending"))] == [
        ids[0],
        ids[2],
    ]


def test_due_batches_and_record_delivery(outbox: tuple[Store, list[str]]) -> None:
    store, ids = outbox
    pa, pb = partition_of("a", PARTITIONS), partition_of("B", PARTITIONS)
    assert store.due_batches(T0 - 1, 10) == []
    due = store.due_batches(T0 + 5, 10)
    assert sorted((d.partition, d.batch_id, d.day, d.attempts) for d in due) == sorted(
        [(pa, ids[0], D1, 0), (pa, ids[1], D1, 0), (pa, ids[2], D1, 0), (pb, ids[3], D2, 0)]
    )
    assert [d.batch_id for d in due if d.partition == pa] == ids[:3]
    # At most `limit` per partition.
    assert sorted(d.batch_id for d in store.due_batches(T0 + 5, 1)) == sorted([ids[0], ids[3]])
    assert store.outbox_statistics() == (4, T0)

    store.record_delivery(
        pa, ids[0], status="delivered", error=None, next_attempt_us=None, now_us=T0 + 10
    )
    store.record_delivery(
        pa, ids[1], status="pending", error="timed out", next_attempt_us=T0 + 100, now_us=T0 + 10
    )
    store.record_delivery(
        pa, ids[2], status="failed", error="rejected: 400", next_attempt_us=None, now_us=T0 + 10
    )
    # Recording on a batch that is no longer pending changes nothing.
    store.record_delivery(
        pa, ids[0], status="failed", error="late", next_attempt_us=None, now_us=T0 + 20
    )

    views = {b.batch_id: b for b in store.batches(BatchQuery())}
    delivered, retrying, failed = views[ids[0]], views[ids[1]], views[ids[2]]
    assert (delivered.status, delivered.attempts, delivered.last_error) == ("delivered", 1, None)
    assert (delivered.delivered_at, delivered.next_attempt_at) == (moment(T0 + 10), None)
    assert (retrying.status, retrying.attempts, retrying.last_error) == (
        "pending",
        1,
        "timed out",
    )
    assert (retrying.next_attempt_at, retrying.delivered_at) == (moment(T0 + 100), None)
    assert (failed.status, failed.attempts, failed.last_error) == ("failed", 1, "rejected: 400")
    assert (failed.next_attempt_at, failed.delivered_at) == (None, None)

    assert [d.batch_id for d in store.due_batches(T0 + 99, 10)] == [ids[3]]
    # A retry set later than `latest_us` is due: the wall clock stepped back.
    assert [d.batch_id for d in store.due_batches(T0 + 40, 10, T0 + 100)] == [ids[3]]
    assert sorted(d.batch_id for d in store.due_batches(T0 + 40, 10, T0 + 99)) == sorted(
        [ids[1], ids[3]]
    )
    again = store.due_batches(T0 + 100, 10)
    assert sorted((d.batch_id, d.attempts) for d in again) == sorted([(ids[1], 1), (ids[3], 0)])
    assert store.outbox_statistics() == (2, T0)
    store.record_delivery(
        pb, ids[3], status="delivered", error=None, next_attempt_us=None, now_us=T0 + 30
    )
    assert store.outbox_statistics() == (1, T0)


def test_a_claimed_batch_is_not_due_until_its_lease_ends(outbox: tuple[Store, list[str]]) -> None:
    store, ids = outbox
    pa = partition_of("a", PARTITIONS)
    now, latest, lease = T0 + 10, T0 + 1000, T0 + 50
    body = store.claim_batch(pa, ids[0], now_us=now, latest_us=latest, lease_us=lease)
    assert body is not None
    assert msgspec.json.decode(body, type=Batch).batch_id == ids[0]
    # Taken: not due to anyone, nor claimable, until the lease ends.
    assert ids[0] not in [d.batch_id for d in store.due_batches(now, 10, latest)]
    assert store.claim_batch(pa, ids[0], now_us=now, latest_us=latest, lease_us=lease) is None
    assert store.claim_batch(pa, ids[0], now_us=lease - 1, latest_us=latest, lease_us=T0 + 90) is (
        None
    )
    # A sender that died: due again once the lease ends, with no attempt counted.
    [again] = [d for d in store.due_batches(lease, 10, latest) if d.batch_id == ids[0]]
    assert again.attempts == 0
    assert store.claim_batch(pa, ids[0], now_us=lease, latest_us=latest, lease_us=T0 + 90)
    # A lease further ahead than `latest` is a clock stepped back: claimable.
    assert store.claim_batch(pa, ids[0], now_us=now, latest_us=T0 + 80, lease_us=T0 + 95)
    # The outcome of the attempt is recorded as ever; a batch that is not
    # pending cannot be claimed.
    store.record_delivery(
        pa, ids[0], status="delivered", error=None, next_attempt_us=None, now_us=T0 + 60
    )
    assert store.claim_batch(pa, ids[0], now_us=T0 + 99, latest_us=latest, lease_us=T0 + 200) is (
        None
    )
    # A claim keeps its batch's other state.
    assert store.claim_batch(pa, ids[1], now_us=now, latest_us=latest, lease_us=lease)
    view = store.batch(ids[1])
    assert view is not None
    assert (view.status, view.attempts, view.next_attempt_at) == ("pending", 0, moment(lease))


def test_a_sender_past_its_lease_records_no_failure_over_the_next_claim(
    outbox: tuple[Store, list[str]],
) -> None:
    """A sender stopped past its lease (a paused machine) and then failed: its
    retry moved the lease the next sender had taken, so the batch was due
    again, and sent twice at once. Only a delivery counts whoever claimed."""
    store, ids = outbox
    pa = partition_of("a", PARTITIONS)
    latest = T0 + 1000
    assert store.claim_batch(pa, ids[0], now_us=T0, latest_us=latest, lease_us=T0 + 50)
    assert store.claim_batch(pa, ids[0], now_us=T0 + 50, latest_us=latest, lease_us=T0 + 100)
    for status in ("pending", "failed"):
        store.record_delivery(
            pa,
            ids[0],
            status=status,
            error="timed out",
            next_attempt_us=T0 + 51,
            now_us=T0 + 51,
            claimed_us=T0 + 50,
        )
    view = store.batch(ids[0])
    assert view is not None
    assert (view.status, view.attempts, view.next_attempt_at) == ("pending", 0, moment(T0 + 100))
    assert ids[0] not in [d.batch_id for d in store.due_batches(T0 + 60, 10, latest)]
    store.record_delivery(
        pa,
        ids[0],
        status="pending",
        error="refused",
        next_attempt_us=T0 + 120,
        now_us=T0 + 70,
        claimed_us=T0 + 100,
    )
    view = store.batch(ids[0])
    assert view is not None
    assert (view.status, view.attempts, view.last_error) == ("pending", 1, "refused")
    assert store.claim_batch(pa, ids[0], now_us=T0 + 120, latest_us=latest, lease_us=T0 + 200)
    store.record_delivery(
        pa,
        ids[0],
        status="delivered",
        error=None,
        next_attempt_us=None,
        now_us=T0 + 130,
        claimed_us=T0 + 100,
    )
    view = store.batch(ids[0])
    assert view is not None
    assert (view.status, view.attempts) == ("delivered", 2)


def test_two_stores_racing_to_claim_one_batch_take_it_once(backend: Backend) -> None:
    first, second = backend.open(), backend.open()
    write(first, [pulse("a", str(n), sku=f"s{n}") for n in range(12)])
    pa = partition_of("a", PARTITIONS)
    ids = [b.batch_id for b in first.commit_day(pa, D1, T0, 1)]
    taken: list[tuple[str, int]] = []

    def claim(store: Store, which: int) -> None:
        for bid in ids:
            if store.claim_batch(pa, bid, now_us=T0 + 10, latest_us=T0 + 999, lease_us=T0 + 50):
                taken.append((bid, which))

    racers = [threading.Thread(target=claim, args=(s, n)) for n, s in enumerate((first, second))]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    assert sorted(bid for bid, _ in taken) == sorted(ids)


def test_redeliver(outbox: tuple[Store, list[str]]) -> None:
    store, ids = outbox
    pa = partition_of("a", PARTITIONS)
    store.record_delivery(
        pa, ids[0], status="failed", error="no", next_attempt_us=None, now_us=T0 + 1
    )
    store.record_delivery(
        pa, ids[1], status="delivered", error=None, next_attempt_us=None, now_us=T0 + 1
    )
    assert store.outbox_statistics() == (2, T0)
    assert store.redeliver(ids[0], T0 + 50) is True
    view = store.batch(ids[0])
    assert view is not None
    assert (view.status, view.attempts, view.next_attempt_at) == (
        "pending",
        1,
        moment(T0 + 50),
    )
    assert store.outbox_statistics() == (3, T0)
    assert ids[0] not in [d.batch_id for d in store.due_batches(T0 + 49, 10)]
    assert ids[0] in [d.batch_id for d in store.due_batches(T0 + 50, 10)]
    assert store.redeliver(ids[0], T0 + 60) is False  # pending now
    assert store.redeliver(ids[1], T0 + 60) is False  # delivered
    assert store.redeliver(ids[2], T0 + 60) is False  # pending
    assert store.redeliver("nope", T0) is False
    assert store.redeliver(f"{'0' * 12}-20240501-p000-00001", T0) is False
    assert store.redeliver(ids[0].replace("-00001", "-00009"), T0) is False
    assert store.redeliver(f"{store.store_id}-20240501-p999-00001", T0) is False


# -- purge -----------------------------------------------------------------


def test_purge_forgets_old_pulses_and_their_ids(store: Store) -> None:
    pa = partition_of("a", PARTITIONS)
    # One pulse per write: the count purge returns is then the same whether a
    # store counts pulses or writes.
    write(store, [pulse("a", "1", id="old")], received_us=T0)
    write(store, [pulse("a", "2")], received_us=T0 + 1)
    write(store, [pulse("a", "4", id="new")], received_us=T0 + HOUR)
    write(store, [pulse("B", "8", id="old")], received_us=T0)
    assert store.purge(pa, T0 + 2) == 2
    assert [p.id for _, p in store.pulses(PulseQuery(tenant_id="a", day=D1))] == ["new"]
    # The buckets keep their totals; only the pulses and ids are forgotten.
    assert aggregate(store, "a").used_amount == "7"
    reuse = [pulse("a", "1", id="old"), pulse("a", "4", id="new")]
    assert write(store, reuse, received_us=T0 + 2 * HOUR) == ["accepted", "duplicate"]
    assert aggregate(store, "a").used_amount == "8"
    assert store.purge(pa, T0 + 2) == 0
    assert write(store, [pulse("B", "8", id="old")]) == ["duplicate"]  # other partition


def test_purge_many(store: Store) -> None:
    pa = partition_of("a", PARTITIONS)
    many = [pulse("a", "1", id=f"i{n}") for n in range(12_000)]
    assert set(write(store, many, received_us=T0)) == {"accepted"}
    assert set(write(store, many, received_us=T0)) == {"duplicate"}  # ids looked up in chunks
    for start in range(0, 6000, 10):  # more writes and pulses than any purge chunk
        write(store, [pulse("a", "1", id=f"j{n}") for n in range(start, start + 10)], T0 + 1)
    write(store, [pulse("a", "1", id="keep")], received_us=T0 + HOUR)
    assert store.purge(pa, T0 + HOUR) > 0
    assert store.purge(pa, T0 + HOUR) == 0
    assert [p.id for _, p in store.pulses(PulseQuery(tenant_id="a", day=D1))] == ["keep"]
    again = [many[0], many[-1], pulse("a", "1", id="j5999"), pulse("a", "1", id="keep")]
    assert write(store, again, T0 + HOUR) == ["accepted", "accepted", "accepted", "duplicate"]


def test_ids_after_a_purge_that_emptied_the_log_are_still_deduplicated(store: Store) -> None:
    """Sequence numbers are never reused once purge has removed the newest writes."""
    pa = partition_of("a", PARTITIONS)
    write(store, [pulse("a", "1", id="old")], received_us=T0)
    assert store.purge(pa, T0 + 1) == 1  # the log of the partition is now empty
    assert write(store, [pulse("a", "1", id="new")], T0 + HOUR) == ["accepted"]
    assert write(store, [pulse("a", "1", id="new")], T0 + HOUR) == ["duplicate"]


def test_purge_keeps_recent_pulses_stored_after_older_ones(backend: Backend) -> None:
    """Receive times come from each writer's wall clock: a clock stepped back
    (or, with PostgreSQL, another machine's clock) stores an older receive time
    after a newer one. Purge must still forget only what is old enough."""
    store = backend.open()
    pa = partition_of("a", PARTITIONS)
    write(store, [pulse("a", "1", id="recent")], received_us=T0 + HOUR)
    write(store, [pulse("a", "1", id="old")], received_us=T0)
    assert store.purge(pa, T0 + 1) == 1
    again = [pulse("a", "1", id="old"), pulse("a", "1", id="recent")]
    assert write(store, again, received_us=T0 + HOUR) == ["accepted", "duplicate"]


def test_outbox_batches_by_status(backend: Backend) -> None:
    """Pending and failed batches are counted apart, by the store (so the same
    after a restart); delivered ones are in neither."""
    store = backend.open()
    write(store, [pulse("a", str(n), sku=f"s{n}") for n in (1, 2, 3)])
    write(store, [pulse("B", "9", day=D2, ts=T0 + 24 * HOUR)])
    pa, pb = partition_of("a", PARTITIONS), partition_of("B", PARTITIONS)
    ids = [b.batch_id for b in store.commit_day(pa, D1, T0, 1)]
    ids += [b.batch_id for b in store.commit_day(pb, D2, T0 + 5, 1)]
    assert store.outbox_batches() == {"pending": 4, "failed": 0}
    for batch, status in zip(ids, ("delivered", "failed", "failed"), strict=False):
        store.record_delivery(
            pa, batch, status=status, error=None, next_attempt_us=None, now_us=T0 + 10
        )
    assert store.outbox_batches() == {"pending": 1, "failed": 2}
    store.close()

    again = backend.open()
    assert again.outbox_batches() == {"pending": 1, "failed": 2}
    assert again.redeliver(ids[1], T0 + 20) is True
    assert again.outbox_batches() == {"pending": 2, "failed": 1}


def test_a_store_made_without_the_failed_batches_index_gets_it_when_opened(
    backend: Backend, request: pytest.FixtureRequest
) -> None:
    """Failed batches are counted at every scrape: by an index, not by reading
    every batch (SQLite keeps a batch's status behind its body). A store made
    by a release without that index gets it when opened, and counts the same."""
    store = backend.open()
    write(store, [pulse("a", "1")])
    [summary] = commit_all(store, D1)
    store.record_delivery(
        summary.partition,
        summary.batch_id,
        status="failed",
        error="no",
        next_attempt_us=None,
        now_us=T0 + 10,
    )
    store.close()
    if backend.kind == "sqlite":
        assert isinstance(store, SQLiteStore)
        with contextlib.closing(sqlite3.connect(store.directory / "store.sqlite")) as conn:
            conn.execute("DROP INDEX batches_failed")
            conn.commit()

        def indexed() -> bool:
            with contextlib.closing(sqlite3.connect(store.directory / "store.sqlite")) as conn:
                found = conn.execute(
                    "SELECT 1 FROM sqlite_schema WHERE type = 'index' AND name = 'batches_failed'"
                ).fetchone()
            return found is not None
    else:
        url = request.getfixturevalue("postgres_url")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP INDEX batches_failed")

        def indexed() -> bool:
            with psycopg.connect(url, autocommit=True) as conn:
                row = conn.execute("SELECT to_regclass('batches_failed')").fetchone()
            return row is not None and row[0] is not None

    assert not indexed()
    again = backend.open()
    assert indexed()
    assert again.outbox_batches() == {"pending": 0, "failed": 1}


# -- open, reopen ----------------------------------------------------------


def test_reopen_keeps_everything(backend: Backend) -> None:
    store = backend.open(partitions=PARTITIONS)
    write(store, [pulse("a", "1.5", id="x"), pulse("e", "2")])
    summary = commit_all(store, D1)[0]
    store_id = store.store_id
    aggregates = store.aggregates(AggregateQuery())
    batches = store.batches(BatchQuery())
    store_batch = store.batch(summary.batch_id)
    assert store_batch is not None
    stored = store.pulses(PulseQuery(tenant_id="a", day=D1))
    store.close()

    again = backend.open(partitions=8)  # the stored count wins over the setting
    assert (again.store_id, again.partitions) == (store_id, PARTITIONS)
    assert again.aggregates(AggregateQuery()) == aggregates
    assert again.batches(BatchQuery()) == batches
    assert again.batch(summary.batch_id) == store_batch
    assert again.pulses(PulseQuery(tenant_id="a", day=D1)) == stored
    assert write(again, [pulse("a", "1.5", id="x")]) == ["duplicate"]
    assert commit_all(again, D1) == []
    write(again, [pulse("a", "1")])
    [correction] = commit_all(again, D1)
    assert correction.batch_id == batch_id(store_id, D1, partition_of("a", PARTITIONS), 2)


def test_one_instance_leads_the_committing(backend: Backend) -> None:
    first, second = backend.open(), backend.open()
    assert first.lead_committer() is True
    assert second.lead_committer() is False
    assert first.lead_committer() is True  # and stays the leader
    assert second.lead_committer() is False
    first.close()
    assert second.lead_committer() is True
    assert backend.open().lead_committer() is False


def test_unknown_schema_version_is_refused(backend: Backend) -> None:
    backend.open().close()
    backend.bump_schema_version()
    with pytest.raises(StoreMismatch, match="schema version"):
        backend.open()


def test_a_place_holding_something_else_is_refused(backend: Backend) -> None:
    backend.occupy()
    with pytest.raises(StoreMismatch, match="refusing"):
        backend.open()
