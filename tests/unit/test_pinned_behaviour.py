"""Rules of the billing arithmetic, of intake and of the shared clock, pinned case by case.

Each test states one behaviour a user's invoices depend on, at its edge: the
amount, bucket, batch or moment where getting it slightly wrong would still
look right almost everywhere else.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from decimal import Decimal

import pytest
import trio
import trio.testing

from ingestor.clock import SharedClock
from ingestor.errors import RequestError
from ingestor.intake import Rules, decode_pulses
from ingestor.ledger import (
    BucketKey,
    BucketState,
    Delta,
    add_pulses,
    batch_id,
    new_batches,
    partition_of_batch,
)
from ingestor.model import Pulse

UTC = dt.UTC
NOW = dt.datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
STORE = "0123456789ab"


def us(at: dt.datetime) -> int:
    """Microseconds since the epoch, by exact timedelta division."""
    return (at - EPOCH) // dt.timedelta(microseconds=1)


# --- ledger -------------------------------------------------------------------


@pytest.mark.parametrize("partition", [0, 1, 7, 15])
def test_a_batch_id_of_this_store_names_the_partition_it_was_made_in(partition: int) -> None:
    """GET /batches/{id} and redelivery find a batch by the partition its id names:
    the wrong one would answer 404 for a batch the outbox holds, or redeliver
    nothing while an operator believes the batch is on its way."""
    made = batch_id(STORE, "2026-11-27", partition, 3)
    assert partition_of_batch(made, STORE, 16) == partition


@pytest.mark.parametrize(
    "candidate",
    [
        "ba9876543210-20261127-p003-00001",  # another store's batch
        "0123456789ab-20261127-p016-00001",  # a partition this store does not have
        "0123456789ab-20261127-p999-00001",
        "0123456789ab-20261127-q003-00001",  # not a partition piece
        "0123456789ab-20261127-pxyz-00001",
        "0123456789ab-20261127-p003",  # too few pieces
        "0123456789ab-20261127-p003-00001-x",  # too many
    ],
)
def test_a_batch_id_that_is_not_one_of_this_stores_names_no_partition(candidate: str) -> None:
    """An id from another deployment, or a mistyped one, must be answered as
    unknown, not looked up in some partition (or crash the request)."""
    assert partition_of_batch(candidate, STORE, 16) is None


@pytest.mark.parametrize("partition", [100, 123, 255])
def test_partitions_past_a_hundred_are_read_from_every_digit(partition: int) -> None:
    """A store made with many partitions writes three digits: all of them name
    the batch's partition, not the last two."""
    assert partition_of_batch(batch_id(STORE, "2026-11-27", partition, 1), STORE, 256) == partition


def test_the_last_partition_is_a_partition_and_the_next_is_not() -> None:
    """A store of 4 partitions has partitions 0 to 3: the batches of the last
    one are as reachable as any other."""
    assert partition_of_batch(batch_id(STORE, "2026-11-27", 3, 1), STORE, 4) == 3
    assert partition_of_batch(batch_id(STORE, "2026-11-27", 4, 1), STORE, 4) is None


def test_adding_pulses_names_every_tenant_and_day_they_fall_on() -> None:
    """The store lists, per tenant and day, where their pulses are: GET /pulses
    (the audit trail behind a bill) and the purge read that list, so a tenant
    or day left out of it hides pulses that were counted. Intake shares one
    string per name, so a tenant changing on the same day, or a day changing
    for the same tenant, must each be noticed."""
    t1, t2, d1, d2 = "t1", "t2", "2026-11-27", "2026-11-28"

    def at(tenant: str, day: str, nanos: int) -> Pulse:
        return Pulse(tenant, "sku1", "call", nanos, "", False, 0, day, b"")

    deltas: dict[BucketKey, Delta] = {}
    pulses = [at(t1, d1, 1), at(t1, d1, 2), at(t2, d1, 4), at(t2, d2, 8), at(t1, d1, 16)]
    assert add_pulses(deltas, pulses) == {(t1, d1), (t2, d1), (t2, d2)}
    assert add_pulses(deltas, []) == set()
    assert {key: (d.nanos, d.count) for key, d in deltas.items()} == {
        (d1, t1, "sku1", "call"): (19, 3),
        (d1, t2, "sku1", "call"): (4, 1),
        (d2, t2, "sku1", "call"): (8, 1),
    }


def bucket(
    tenant: str, used: int, count: int, *, committed: int = 0, done: int = 0, revision: int = 0
) -> BucketState:
    return BucketState(
        ("2026-11-27", tenant, "sku1", "call"), used, count, committed, done, revision
    )


def test_new_batches_continue_the_days_sequence_and_are_due_at_once() -> None:
    """Each commit of a day's partition numbers its batches after the last one
    made: a number used twice would give two batches one id, and a receiver
    that drops repeats by id would drop a day's usage."""
    now = us(NOW)
    buckets = [
        bucket("a", 1_500_000_000, 2),
        bucket("b", 250_000_000, 1),
        bucket("c", 3_000_000_000, 4, committed=1_000_000_000, done=1, revision=1),
    ]
    rows, summaries = new_batches(STORE, "2026-11-27", 5, 7, buckets, max_records=1, now_us=now)
    seqs = [row[3] for row in rows]
    assert seqs == [8, 9, 10]
    assert [row[0] for row in rows] == [batch_id(STORE, "2026-11-27", 5, s) for s in seqs]
    assert [row[1] for row in rows] == [5, 5, 5]
    assert [row[2] for row in rows] == ["2026-11-27"] * 3
    assert [row[4] for row in rows] == ["initial", "initial", "correction"]
    assert [(row[5], row[9]) for row in rows] == [(now, now)] * 3  # made now, due now
    assert [row[6] for row in rows] == [1, 1, 1]
    # The correction carries the delta, 3 - 1 units, not the bucket's total.
    assert [Decimal(row[7]) for row in rows] == [Decimal("1.5"), Decimal("0.25"), Decimal(2)]
    bodies = [json.loads(row[8]) for row in rows]
    assert [b["batch_id"] for b in bodies] == [row[0] for row in rows]
    assert {b["created_at"] for b in bodies} == {"2026-03-15T12:00:00Z"}
    assert [(s.batch_id, s.kind, s.partition, s.record_count) for s in summaries] == [
        (row[0], row[4], 5, 1) for row in rows
    ]
    assert [Decimal(s.used_amount) for s in summaries] == [Decimal(row[7]) for row in rows]


def test_a_batchs_amount_is_the_sum_of_its_records_deltas() -> None:
    """The amount an outbox row and its summary show is what the batch bills:
    the exact sum of its records' deltas."""
    buckets = [
        bucket("a", 100_000_000_001, 1),
        bucket("b", 1, 1),
        bucket("c", 999_999_999, 5, committed=999_999_998, done=4, revision=2),
    ]
    rows, summaries = new_batches(
        STORE, "2026-11-27", 0, 0, buckets, max_records=10, now_us=us(NOW)
    )
    assert [(row[4], row[6], row[7]) for row in rows] == [
        ("initial", 2, "100.000000002"),
        ("correction", 1, "0.000000001"),
    ]
    assert [s.used_amount for s in summaries] == ["100.000000002", "0.000000001"]


LONG = "\U0001d11e" * 128  # 128 four-byte characters: names near their longest


@pytest.mark.parametrize(
    ("count", "suffix", "max_bytes"),
    [(5_000, "", 200_000), (60, LONG, 20_000)],
    ids=["thousands of small records", "records with the longest names"],
)
def test_every_batch_body_stays_within_its_byte_limit(
    count: int, suffix: str, max_bytes: int
) -> None:
    """A sink refuses a message over its size (NATS's max_payload), and a batch
    it refuses is never delivered: whatever records a batch holds, with the
    commas between them, its body stays within `max_bytes`, and every record
    is in exactly one batch."""
    buckets = [
        BucketState(
            ("2026-11-27", f"t{i:04d}{suffix}", f"sku{suffix}", f"unit{suffix}"), 10**9, 1, 0, 0, 0
        )
        for i in range(count)
    ]
    rows, _ = new_batches(
        STORE, "2026-11-27", 0, 0, buckets, max_records=10_000, now_us=us(NOW), max_bytes=max_bytes
    )
    assert len(rows) > 1
    assert all(len(row[8]) <= max_bytes for row in rows)
    sent = [r["tenant_id"] for row in rows for r in json.loads(row[8])["records"]]
    assert sent == [f"t{i:04d}{suffix}" for i in range(count)]


# --- intake ---------------------------------------------------------------------

LATE_S = 35 * 86_400
SKEW_S = 300
MICRO = dt.timedelta(microseconds=1)


def rules() -> Rules:
    return Rules(late_window_s=LATE_S, future_skew_s=SKEW_S, max_batch=100)


def stamped(*moments: dt.datetime) -> bytes:
    return json.dumps(
        [
            {
                "tenant_id": "t1",
                "product_sku": "sku1",
                "use_unit": "call",
                "used_amount": 1,
                "id": f"p{i}",
                "timestamp": at.isoformat(),
            }
            for i, at in enumerate(moments)
        ]
    ).encode()


def verdicts(body: bytes, with_rules: Rules) -> list[str | None]:
    """Each pulse's fate: None if accepted, else the reason it was rejected."""
    intake = decode_pulses(body, "application/json", with_rules, us(NOW))
    reasons: dict[int, str | None] = {item.index: item.error for item in intake.items}
    return [reasons.get(index) for index in range(intake.total)]


def test_pulses_stamped_before_a_purge_horizon_are_refused_and_those_after_it_kept() -> None:
    """Once a purge forgets ids up to a moment, a replay of a pulse stamped before
    it would be counted twice: such pulses are refused, saying why, while pulses
    stamped from the horizon plus the allowed clock skew on are counted."""
    checked = rules()
    horizon = NOW - dt.timedelta(days=3)
    checked.raise_horizon(us(horizon))
    edge = horizon + dt.timedelta(seconds=SKEW_S)
    found = verdicts(stamped(edge, edge - MICRO, NOW - dt.timedelta(days=36)), checked)
    assert found[0] is None
    assert "still knows" in (found[1] or "")
    assert "late window" in (found[2] or "")


def test_a_purge_horizon_only_moves_forward() -> None:
    """Instances announce horizons at different times, with different dedup
    windows; an older announcement read later must not reopen the pulses a
    newer one closed."""
    checked = rules()
    newer, older = NOW - dt.timedelta(days=2), NOW - dt.timedelta(days=20)
    checked.raise_horizon(us(newer))
    checked.raise_horizon(us(older))
    checked.raise_horizon(None)  # a store that announced no purge says nothing new
    assert checked.horizon_us == us(newer)
    found = verdicts(stamped(NOW - dt.timedelta(days=10)), checked)
    assert "still knows" in (found[0] or "")


def test_a_purge_horizon_older_than_the_late_window_does_not_widen_it() -> None:
    """The late window (35 days) holds whatever a purge announced: a pulse older
    than it is refused even where the horizon lies further back."""
    checked = rules()
    checked.raise_horizon(us(NOW - dt.timedelta(days=60)))
    late = NOW - dt.timedelta(seconds=LATE_S)
    found = verdicts(stamped(late, late - MICRO), checked)
    assert found[0] is None
    assert "late window" in (found[1] or "")


def test_reports_of_a_request_come_in_request_order_whatever_was_wrong() -> None:
    """A client reads `items` beside what it sent: a pulse refused for its
    timestamp and one that is not even JSON are reported in the order sent."""
    old = (NOW - dt.timedelta(days=40)).isoformat()
    lines = [
        json.dumps({"tenant_id": "t1", "product_sku": "s", "use_unit": "u", "used_amount": 1}),
        json.dumps(
            {
                "tenant_id": "t1",
                "product_sku": "s",
                "use_unit": "u",
                "used_amount": 1,
                "timestamp": old,
            }
        ),
        "{not json",
        json.dumps(
            {
                "tenant_id": "t1",
                "product_sku": "s",
                "use_unit": "u",
                "used_amount": 1,
                "timestamp": old,
            }
        ),
    ]
    body = "\n".join(lines).encode()
    intake = decode_pulses(body, "application/x-ndjson", rules(), us(NOW))
    assert [item.index for item in intake.items] == [1, 2, 3]
    assert [index for index, _ in intake.pulses] == [0]


def test_a_body_with_exactly_thirty_two_separators_a_pulse_is_still_read() -> None:
    """Only a body with more than 32 separators for each pulse it may hold is
    refused unread (README): one at the limit gets its pulses' own reports."""
    with_rules = Rules(late_window_s=LATE_S, future_skew_s=SKEW_S, max_batch=3)
    fields = {"tenant_id": "t1", "product_sku": "s", "use_unit": "u", "used_amount": 1}
    head = json.dumps([{**fields, "id": ""}, 7])
    padding = 3 * 32 - head.count(",")
    body = json.dumps([{**fields, "id": "," * padding}, 7]).encode()
    assert body.count(b",") == 96
    intake = decode_pulses(body, "application/json", with_rules, us(NOW))
    assert [(item.index, item.status) for item in intake.items] == [(1, "rejected")]
    assert [index for index, _ in intake.pulses] == [0]
    more = json.dumps([{**fields, "id": "," * (padding + 1)}, 7]).encode()
    with pytest.raises(RequestError) as refused:
        decode_pulses(more, "application/json", with_rules, us(NOW))
    assert (refused.value.status, refused.value.code) == (413, "too_many_pulses")


# --- clock ----------------------------------------------------------------------


def test_the_store_clock_is_read_every_thirty_seconds_and_again_within_seconds_of_a_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Instances decide leases, purges and billing days by the store's clock; when
    this machine's clock steps (NTP corrected both), the store's is read again
    within a couple of seconds, not at the next half-minute reading, and
    otherwise it is not read more often than that."""
    reads: list[int] = []

    def read_offset() -> int:
        reads.append(len(reads))
        return (time.time_ns() - time.monotonic_ns()) // 1000

    async def at_once(read: Callable[[], None]) -> None:
        read()  # the store's clock is read in this test's own time, not a thread's

    monkeypatch.setattr(trio.to_thread, "run_sync", at_once)

    async def main() -> None:
        clock = SharedClock(read_offset)
        async with trio.open_nursery() as nursery:
            await nursery.start(clock.run)
            await trio.sleep(29)
            assert len(reads) == 1
            await trio.sleep(2)
            assert len(reads) == 2  # at 30 s
            true_wall = time.time_ns
            monkeypatch.setattr(time, "time_ns", lambda: true_wall() + 3_600 * 10**9)
            await trio.sleep(2.5)
            assert len(reads) == 3  # the step had it read again
            await trio.sleep(25)
            assert len(reads) == 3  # and the step, taken in, does not again
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
