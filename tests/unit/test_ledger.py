"""Bucket arithmetic: dedup decisions, deltas, commit batches and batch ids."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestor.ledger import (
    BATCH_MIN_BYTES,
    BucketKey,
    BucketState,
    Delta,
    add_pulses,
    batch_id,
    bucket_deltas,
    commit_batches,
    new_batches,
    resolve,
)
from ingestor.model import Pulse
from ingestor.money import parse_nanos

MAX_NANOS = 10**27 - 1


def make_pulse(
    tenant_id: str = "t1",
    pulse_id: str = "p1",
    *,
    fingerprint: bytes = b"f1",
    client_id: bool = True,
    nanos: int = 1_000_000_000,
    sku: str = "sku1",
    unit: str = "call",
    day: str = "2026-03-15",
) -> Pulse:
    return Pulse(
        tenant_id=tenant_id,
        product_sku=sku,
        use_unit=unit,
        nanos=nanos,
        pulse_id=pulse_id,
        client_id=client_id,
        ts=0,
        day=day,
        fingerprint=fingerprint if client_id else b"",
    )


def units(text: str) -> Decimal:
    """A wire amount as an exact Decimal (independent of `money`)."""
    value = Decimal(text)
    assert value >= 0
    return value


def nanos_as_units(nanos: int) -> Decimal:
    return Decimal(nanos).scaleb(-9)


# --- resolve -----------------------------------------------------------------


def test_first_id_of_a_group_wins() -> None:
    group = [
        make_pulse(fingerprint=b"A"),
        make_pulse(fingerprint=b"A"),
        make_pulse(fingerprint=b"B"),
        make_pulse(fingerprint=b"A"),
    ]
    assert resolve(group, {}) == ["accepted", "duplicate", "conflict", "duplicate"]


def test_a_conflict_does_not_replace_the_first_payload() -> None:
    group = [make_pulse(fingerprint=fp) for fp in (b"A", b"B", b"B")]
    assert resolve(group, {}) == ["accepted", "conflict", "conflict"]


def test_ids_are_per_tenant() -> None:
    group = [make_pulse("t1", "x", fingerprint=b"A"), make_pulse("t2", "x", fingerprint=b"B")]
    assert resolve(group, {}) == ["accepted", "accepted"]
    assert resolve(group, {("t1", "x"): b"A"}) == ["duplicate", "accepted"]


def test_known_ids_from_the_store_are_respected() -> None:
    known = {("t1", "old"): b"A"}
    group = [
        make_pulse(pulse_id="old", fingerprint=b"A"),
        make_pulse(pulse_id="old", fingerprint=b"B"),
        make_pulse(pulse_id="new", fingerprint=b"A"),
        make_pulse(pulse_id="new", fingerprint=b"A"),
    ]
    assert resolve(group, known) == ["duplicate", "conflict", "accepted", "duplicate"]
    assert known == {("t1", "old"): b"A"}  # the caller's mapping is left alone


def test_id_less_pulses_are_always_accepted() -> None:
    group = [make_pulse(pulse_id="srv-1-0", client_id=False) for _ in range(3)]
    assert resolve(group, {("t1", "srv-1-0"): b"zz"}) == ["accepted"] * 3


def test_empty_group() -> None:
    assert resolve([], {("t1", "a"): b"A"}) == []


pulse_groups = st.lists(
    st.builds(
        make_pulse,
        tenant_id=st.sampled_from(["t1", "t2"]),
        pulse_id=st.sampled_from(["a", "b", "c"]),
        fingerprint=st.sampled_from([b"X", b"Y"]),
        client_id=st.booleans(),
    ),
    max_size=30,
)
known_ids = st.dictionaries(
    st.tuples(st.sampled_from(["t1", "t2"]), st.sampled_from(["a", "b", "c"])),
    st.sampled_from([b"X", b"Y"]),
    max_size=4,
)


@given(pulse_groups, known_ids)
def test_a_group_resolves_as_if_its_pulses_came_one_by_one(
    group: list[Pulse], known: dict[tuple[str, str], bytes]
) -> None:
    store = dict(known)
    one_by_one = []
    for p in group:
        [outcome] = resolve([p], store)
        one_by_one.append(outcome)
        if outcome == "accepted" and p.client_id:
            store[(p.tenant_id, p.pulse_id)] = p.fingerprint
    assert resolve(group, known) == one_by_one


@given(pulse_groups, known_ids)
def test_each_client_id_is_counted_at_most_once(
    group: list[Pulse], known: dict[tuple[str, str], bytes]
) -> None:
    outcomes = resolve(group, known)
    assert len(outcomes) == len(group)
    accepted_keys = [
        (p.tenant_id, p.pulse_id)
        for p, o in zip(group, outcomes, strict=True)
        if o == "accepted" and p.client_id
    ]
    assert len(accepted_keys) == len(set(accepted_keys))
    assert not set(accepted_keys) & set(known)
    fresh = {(p.tenant_id, p.pulse_id) for p in group if p.client_id} - set(known)
    assert set(accepted_keys) == fresh
    for p, outcome in zip(group, outcomes, strict=True):
        if not p.client_id:
            assert outcome == "accepted"


# --- bucket_deltas -------------------------------------------------------------

bucket_pulses = st.lists(
    st.builds(
        make_pulse,
        tenant_id=st.sampled_from(["t1", "t2"]),
        pulse_id=st.just("p"),
        nanos=st.integers(min_value=0, max_value=MAX_NANOS),
        sku=st.sampled_from(["s1", "s2"]),
        unit=st.sampled_from(["call", "byte"]),
        day=st.sampled_from(["2026-03-14", "2026-03-15"]),
    ),
    max_size=40,
)


def as_plain(deltas: dict[BucketKey, Delta]) -> dict[BucketKey, tuple[int, int]]:
    return {key: (d.nanos, d.count) for key, d in deltas.items()}


def test_bucket_deltas_groups_by_day_tenant_sku_unit() -> None:
    pulses = [
        make_pulse(nanos=5, day="2026-03-15"),
        make_pulse(nanos=7, day="2026-03-15"),
        make_pulse(nanos=11, day="2026-03-16"),
        make_pulse("t2", nanos=13),
        make_pulse(nanos=17, sku="sku2"),
        make_pulse(nanos=19, unit="byte"),
        make_pulse(nanos=0),
    ]
    assert as_plain(bucket_deltas(pulses)) == {
        ("2026-03-15", "t1", "sku1", "call"): (12, 3),
        ("2026-03-16", "t1", "sku1", "call"): (11, 1),
        ("2026-03-15", "t2", "sku1", "call"): (13, 1),
        ("2026-03-15", "t1", "sku2", "call"): (17, 1),
        ("2026-03-15", "t1", "sku1", "byte"): (19, 1),
    }


def test_bucket_deltas_of_nothing() -> None:
    assert bucket_deltas([]) == {}


@given(bucket_pulses, st.data())
def test_bucket_deltas_do_not_depend_on_order(pulses: list[Pulse], data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(pulses))
    assert as_plain(bucket_deltas(shuffled)) == as_plain(bucket_deltas(pulses))


@given(bucket_pulses, bucket_pulses)
def test_adding_pulses_to_deltas_equals_deltas_of_both(
    first: list[Pulse], second: list[Pulse]
) -> None:
    deltas = bucket_deltas(first)
    add_pulses(deltas, second)
    assert as_plain(deltas) == as_plain(bucket_deltas(first + second))


@given(bucket_pulses)
def test_bucket_deltas_conserve_amounts_and_counts(pulses: list[Pulse]) -> None:
    deltas = bucket_deltas(pulses)
    assert sum(d.nanos for d in deltas.values()) == sum(p.nanos for p in pulses)
    assert sum(d.count for d in deltas.values()) == len(pulses)
    expected: dict[BucketKey, list[int]] = defaultdict(list)
    for p in pulses:
        expected[(p.day, p.tenant_id, p.product_sku, p.use_unit)].append(p.nanos)
    assert as_plain(deltas) == {k: (sum(v), len(v)) for k, v in expected.items()}


# --- commit_batches --------------------------------------------------------------


def state(
    tenant: str = "t1",
    *,
    used: int,
    count: int,
    committed: int = 0,
    committed_count: int = 0,
    revision: int = 0,
    sku: str = "sku1",
    unit: str = "call",
    day: str = "2026-03-15",
) -> BucketState:
    return BucketState(
        key=(day, tenant, sku, unit),
        used_nanos=used,
        pulse_count=count,
        committed_nanos=committed,
        committed_count=committed_count,
        revision=revision,
    )


def test_first_commit_is_initial_revision_one() -> None:
    [(kind, [record])] = commit_batches([state(used=1_500_000_000, count=3)], 100)
    assert kind == "initial"
    assert (record.tenant_id, record.product_sku, record.use_unit) == ("t1", "sku1", "call")
    assert record.revision == 1
    assert (record.pulse_count, record.total_count) == (3, 3)
    assert units(record.used_amount) == Decimal("1.5")
    assert units(record.total_amount) == Decimal("1.5")


def test_later_commit_is_a_correction_with_delta_and_total() -> None:
    bucket = state(
        used=10_250_000_000, count=7, committed=4_000_000_000, committed_count=5, revision=2
    )
    [(kind, [record])] = commit_batches([bucket], 100)
    assert kind == "correction"
    assert record.revision == 3
    assert units(record.used_amount) == Decimal("6.25")
    assert record.pulse_count == 2
    assert units(record.total_amount) == Decimal("10.25")
    assert record.total_count == 7


def test_zero_amount_pulses_still_commit() -> None:
    [(kind, [record])] = commit_batches(
        [state(used=5, count=2, committed=5, committed_count=1, revision=1)], 10
    )
    assert kind == "correction"
    assert units(record.used_amount) == 0
    assert record.pulse_count == 1


def test_buckets_with_nothing_uncommitted_are_skipped() -> None:
    closed = [
        state("a", used=5, count=1, committed=5, committed_count=1, revision=1),
        state("b", used=0, count=0),
        state("c", used=9, count=4, committed=9, committed_count=4, revision=3),
    ]
    assert commit_batches(closed, 10) == []
    [(kind, [record])] = commit_batches([*closed, state("d", used=1, count=1)], 10)
    assert (kind, record.tenant_id) == ("initial", "d")


def test_batches_are_chunked_by_max_records_and_never_mix_kinds() -> None:
    buckets = [state(f"i{n}", used=n, count=1) for n in range(5)] + [
        state(f"c{n}", used=10 + n, count=2, committed=n, committed_count=1, revision=1)
        for n in range(3)
    ]
    batches = commit_batches(buckets, 2)
    assert [(kind, len(records)) for kind, records in batches] == [
        ("initial", 2),
        ("initial", 2),
        ("initial", 1),
        ("correction", 2),
        ("correction", 1),
    ]
    tenants = [r.tenant_id for _, records in batches for r in records]
    assert sorted(tenants) == sorted(b.key[1] for b in buckets)


bucket_states = st.lists(
    st.builds(
        lambda tenant, sku, committed, committed_count, extra, extra_count, revision: state(
            tenant,
            sku=sku,
            used=committed + extra,
            count=committed_count + extra_count,
            committed=committed,
            committed_count=committed_count,
            revision=revision if committed_count else 0,
        ),
        tenant=st.text("abc", min_size=1, max_size=3),
        sku=st.sampled_from(["s1", "s2"]),
        committed=st.integers(min_value=0, max_value=MAX_NANOS),
        committed_count=st.integers(min_value=0, max_value=5),
        extra=st.integers(min_value=0, max_value=MAX_NANOS),
        extra_count=st.integers(min_value=0, max_value=5),
        revision=st.integers(min_value=1, max_value=5),
    ),
    max_size=25,
    unique_by=lambda b: b.key,
)


@given(bucket_states, st.integers(min_value=1, max_value=7), st.data())
def test_commit_batches_properties(
    buckets: list[BucketState], max_records: int, data: st.DataObject
) -> None:
    batches = commit_batches(buckets, max_records)
    open_buckets = {b.key[1:]: b for b in buckets if b.pulse_count != b.committed_count}
    seen = []
    for kind, records in batches:
        assert 1 <= len(records) <= max_records
        for r in records:
            b = open_buckets[(r.tenant_id, r.product_sku, r.use_unit)]
            assert kind == ("initial" if b.revision == 0 else "correction")
            assert r.revision == b.revision + 1
            assert units(r.used_amount) == nanos_as_units(b.used_nanos - b.committed_nanos)
            assert units(r.total_amount) == nanos_as_units(b.used_nanos)
            assert r.pulse_count == b.pulse_count - b.committed_count
            assert r.total_count == b.pulse_count
            seen.append((r.tenant_id, r.product_sku, r.use_unit))
    assert sorted(seen) == sorted(open_buckets)
    # The order the store reads its rows in does not change the batches.
    assert commit_batches(data.draw(st.permutations(buckets)), max_records) == batches


# Names up to their longest, in characters of one to four bytes of UTF-8, and
# the two JSON escapes: what makes a record's size.
long_names = st.text(st.sampled_from(["a", '"', "\\", "é", "租", "🧾"]), min_size=1, max_size=128)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.builds(
            lambda tenant, sku, unit, used, count, revision: state(
                tenant,
                sku=sku,
                unit=unit[:64],
                used=used,
                count=count,
                committed=0 if revision == 0 else 1,
                committed_count=0 if revision == 0 else 1,
                revision=revision,
            ),
            long_names,
            long_names,
            long_names,
            st.integers(min_value=2, max_value=MAX_NANOS),
            st.integers(min_value=2, max_value=10**12),
            st.integers(min_value=0, max_value=2),
        ),
        min_size=20,
        max_size=60,
        unique_by=lambda b: b.key,
    ),
    st.integers(min_value=1, max_value=60),
    st.integers(min_value=BATCH_MIN_BYTES, max_value=16_000),
)
def test_batches_stay_within_their_bytes_and_are_full_otherwise(
    buckets: list[BucketState], max_records: int, max_bytes: int
) -> None:
    """Every batch's body, as the outbox keeps and a sink sends it, is at most
    `max_bytes`; a batch is cut short only where the next record would not fit
    (or at `max_records`, or where corrections begin), and none is lost."""
    rows, _ = new_batches(
        "0123456789ab",
        "2026-03-15",
        0,
        0,
        buckets,
        max_records=max_records,
        now_us=1_700_000_000_000_000,
        max_bytes=max_bytes,
    )
    bodies = [json.loads(row[8]) for row in rows]
    for row, body, following in zip(rows, bodies, [*bodies[1:], None], strict=True):
        assert len(row[8]) <= max_bytes
        if following is None or following["kind"] != body["kind"]:
            continue
        if len(body["records"]) < max_records:
            nearly = {**body, "records": [*body["records"], following["records"][0]]}
            compact = json.dumps(nearly, ensure_ascii=False, separators=(",", ":"))
            assert len(compact.encode()) > max_bytes - 1024
    sent = [(r["tenant_id"], r["product_sku"], r["use_unit"]) for b in bodies for r in b["records"]]
    assert sorted(sent) == sorted(b.key[1:] for b in buckets)


class Model:
    """What a store keeps per bucket, applied to commit_batches' answers."""

    def __init__(self) -> None:
        self.added: dict[str, list[int]] = defaultdict(list)
        self.committed_nanos: dict[str, int] = defaultdict(int)
        self.committed_count: dict[str, int] = defaultdict(int)
        self.revision: dict[str, int] = defaultdict(int)
        self.delta_sum: dict[str, Decimal] = defaultdict(Decimal)
        self.delta_count: dict[str, int] = defaultdict(int)
        self.dirty: set[str] = set()
        self.commits_with_work: dict[str, int] = defaultdict(int)

    def add(self, tenant: str, nanos: int) -> None:
        self.added[tenant].append(nanos)
        self.dirty.add(tenant)

    def commit(self, max_records: int) -> None:
        states = [
            state(
                tenant,
                used=sum(amounts),
                count=len(amounts),
                committed=self.committed_nanos[tenant],
                committed_count=self.committed_count[tenant],
                revision=self.revision[tenant],
            )
            for tenant, amounts in self.added.items()
        ]
        committed_now = set()
        for _kind, records in commit_batches(states, max_records):
            for r in records:
                tenant = r.tenant_id
                assert tenant not in committed_now
                committed_now.add(tenant)
                assert r.revision == self.revision[tenant] + 1
                self.delta_sum[tenant] += units(r.used_amount)
                self.delta_count[tenant] += r.pulse_count
                assert self.delta_sum[tenant] == units(r.total_amount)
                assert self.delta_count[tenant] == r.total_count
                # What the store writes in the commit transaction.
                self.committed_nanos[tenant] = sum(self.added[tenant])
                self.committed_count[tenant] = len(self.added[tenant])
                self.revision[tenant] = r.revision
        assert committed_now == self.dirty
        for tenant in self.dirty:
            self.commits_with_work[tenant] += 1
        self.dirty = set()


steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"),
            st.sampled_from(["t1", "t2", "t3"]),
            st.one_of(st.just(0), st.integers(min_value=0, max_value=MAX_NANOS)),
        ),
        st.tuples(st.just("commit"), st.just(""), st.integers(min_value=1, max_value=3)),
    ),
    max_size=40,
)


@settings(max_examples=150)
@given(steps)
def test_committed_deltas_add_up_to_each_bucket_total(plan: list[tuple[str, str, int]]) -> None:
    """Random adds and commits; a final commit leaves every bucket fully accounted for."""
    model = Model()
    for step, tenant, number in plan:
        if step == "add":
            model.add(tenant, number)
        else:
            model.commit(max_records=number)
    model.commit(2)
    for tenant, amounts in model.added.items():
        exact_total = sum((Decimal(n).scaleb(-9) for n in amounts), Decimal(0))
        assert model.delta_sum[tenant] == exact_total
        assert model.delta_count[tenant] == len(amounts)
        assert model.revision[tenant] == model.commits_with_work[tenant]
        assert model.revision[tenant] >= 1
    # A further commit finds nothing to do.
    before = dict(model.revision)
    model.commit(1)
    assert dict(model.revision) == before


# --- batch_id -----------------------------------------------------------------------

store_ids = st.text("0123456789abcdef", min_size=12, max_size=12)
days = st.dates().map(lambda d: d.isoformat())
partitions = st.integers(min_value=0, max_value=1023)
seqs = st.integers(min_value=1, max_value=10**7)


@given(store_ids, days, partitions, seqs)
def test_batch_id_is_deterministic_and_file_name_safe(
    store: str, day: str, partition: int, seq: int
) -> None:
    made = batch_id(store, day, partition, seq)
    assert batch_id(store, day, partition, seq) == made
    assert re.fullmatch(r"[A-Za-z0-9-]+", made), made
    assert store in made


@given(
    st.tuples(store_ids, days, partitions, seqs),
    st.tuples(store_ids, days, partitions, seqs),
)
def test_batch_ids_differ_when_anything_differs(
    a: tuple[str, str, int, int], b: tuple[str, str, int, int]
) -> None:
    if a != b:
        assert batch_id(*a) != batch_id(*b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("0123456789ab", "2026-03-15", 1, 12), ("0123456789ab", "2026-03-15", 11, 2)),
        (("0123456789ab", "2026-03-15", 1, 1), ("0123456789ab", "2026-03-15", 1, 100_001)),
        (("0123456789ab", "2026-03-15", 100, 1), ("0123456789ab", "2026-03-15", 1000, 1)),
        (("0123456789ab", "2026-03-15", 0, 1), ("ba9876543210", "2026-03-15", 0, 1)),
        (("0123456789ab", "2026-03-15", 0, 1), ("0123456789ab", "2026-03-16", 0, 1)),
    ],
)
def test_batch_ids_of_near_neighbours_differ(
    a: tuple[str, str, int, int], b: tuple[str, str, int, int]
) -> None:
    assert batch_id(*a) != batch_id(*b)


def test_parse_nanos_reads_record_amounts() -> None:
    [(_, [record])] = commit_batches([state(used=123_000_000_456, count=1)], 1)
    assert parse_nanos(record.used_amount) == 123_000_000_456
