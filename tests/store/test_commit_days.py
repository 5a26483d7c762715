"""Commits of single partitions and days between writes, on each store (DESIGN §3.4)."""

from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal

from ingestor.clock import epoch_us
from ingestor.model import Pulse
from ingestor.money import parse_nanos, to_nanos
from ingestor.partition import partition_of
from ingestor.store import AggregateQuery, BatchQuery, Store


def test_interleaved_writes_and_commits_of_days_over_partitions_add_up(store: Store) -> None:
    """Pulses of three days, for tenants of every partition, written between
    commits of single partitions and of whole days: in the end every bucket's
    batches add up to its total, revision by revision, and no bucket is open."""
    rng = random.Random(20261128)
    days = ["2026-11-27", "2026-11-28", "2026-11-29"]
    t0 = epoch_us(dt.datetime(2026, 11, 28, 12, tzinfo=dt.UTC))
    tenants = ["d", "b", "e", "a", "f", "g"]
    expected: dict[tuple[str, str, str], tuple[int, int]] = {}
    for step in range(60):
        if rng.random() < 0.7:
            tenant = rng.choice(tenants)
            batch = []
            for _ in range(rng.randint(1, 4)):
                day, sku = rng.choice(days), rng.choice(["s1", "s2"])
                nanos = to_nanos(Decimal(rng.randint(0, 10**6)) / 1000)
                batch.append(Pulse(tenant, sku, "u", nanos, "", False, t0 + step, day, b""))
                total, count = expected.get((day, tenant, sku), (0, 0))
                expected[day, tenant, sku] = (total + nanos, count + 1)
            store.write_pulses(partition_of(tenant, 4), batch, t0 + step)
        else:
            store.commit_day(rng.randrange(4), rng.choice(days), t0 + step, rng.choice([1, 3]))
    for partition in range(4):
        for day in store.open_days(partition):
            store.commit_day(partition, day, t0 + 100, 2)
    assert all(store.open_days(p) == [] for p in range(4))
    history: dict[tuple[str, str, str], list[tuple[int, int, int, int, int]]] = {}
    for day in days:
        for view in store.batches(BatchQuery(day=day, limit=10_000)):
            full = store.batch(view.batch_id)
            assert full is not None
            assert full.records is not None
            assert full.date == day
            for r in full.records:
                assert partition_of(r.tenant_id, 4) == full.partition
                history.setdefault((day, r.tenant_id, r.product_sku), []).append(
                    (
                        r.revision,
                        parse_nanos(r.used_amount),
                        r.pulse_count,
                        parse_nanos(r.total_amount),
                        r.total_count,
                    )
                )
    assert set(history) == set(expected)
    assert max(len(records) for records in history.values()) >= 3  # corrections happened
    for key, records in history.items():
        records.sort()
        assert [r[0] for r in records] == list(range(1, len(records) + 1)), key
        running = (0, 0)
        for _, nanos, count, total, total_count in records:
            running = (running[0] + nanos, running[1] + count)
            assert running == (total, total_count), key
        assert running == expected[key], key
    for row in store.aggregates(AggregateQuery(limit=10_000)):
        key = (row.date, row.tenant_id, row.product_sku)
        assert (to_nanos(Decimal(row.used_amount)), row.pulse_count) == expected[key]
        assert (row.committed_amount, row.committed_count) == (row.used_amount, row.pulse_count)
        assert row.revision == len(history[key])
