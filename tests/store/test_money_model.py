"""The money path, on each store, against a model small enough to be right.

A hypothesis state machine runs one or two instances of the service's core
on one store (SQLite: two store objects on one directory, as two worker
processes keeping each other's partitions' deltas; PostgreSQL: two store
objects on one schema, as two machines), each with its intake rules (two
tenants billed in zones of their own), shards and committer, on a wall clock
moved by hand, forward and, now and then, back. Its rules:

- bodies of pulses (with ids and without; amounts with fractions, past
  MessagePack's integers, the largest allowed; timestamps on several billing
  days, rounded to the microsecond or not, in the future, too old) through
  intake (`decode_pulses`) to the store, through the shards as the API routes
  them (one body, or several in one round) or straight to `write_pulses`;
  pulses stamped on days already committed (corrections); earlier bodies
  again, byte for byte, with their amounts changed, or twice in one round;
- commits: the store's `commit_day` of one partition, the committer's
  `commit_day` of a whole day through the shards, and `commit_due`;
- deliveries: a due batch claimed and delivered, retried, refused for good,
  or lost with its sender (its lease runs out); outcomes recorded late or
  twice; claims of any batch; failed batches put back;
- purges through a committer (announce, wait 10 s, forget), also with the
  horizon landing exactly on a write; the instances have different dedup
  windows, and each reads the store's purge horizon as its committer's loop
  does, at least every 5 s;
- a store closed and opened again (its deltas maybe not folded yet, with
  another `partitions` setting, as another worker share); SQLite reads while
  another process holds the writers' lock (they cannot fold).

After each step the store's answers are compared with a model written here,
which shares no code with the stores:

- every pulse's outcome: accepted, duplicate (an id replayed with the same
  payload), conflict (the same id, another payload), rejected (a timestamp
  before the late window or the purge horizon the instance knows, or in the
  future);
- every bucket's totals, committed part and revision, which are open, and
  each partition's open days;
- every batch, record by record, with its delivery state; and, from the
  store's batches alone, for every bucket: the deltas of its revisions 1..n
  add up to the totals they carry and to its committed part, the model's
  sum of the accepted pulses committed so far (DESIGN §3.4);
- no batch the sink took, and that was recorded delivered, is due or
  claimable again;
- the audit trail (`pulses`) of every (tenant, day) whose pulses are not purged.

SQLite runs on a temporary directory (sometimes folding at every write, or
merging ids into the index in slices of two), PostgreSQL on a fresh schema,
each example.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import fcntl
import logging
import os
import shutil
import tempfile
import zoneinfo
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ingestor.clock import epoch_us
from ingestor.committer import Committer
from ingestor.errors import StoreError
from ingestor.intake import Intake, Rules, decode_pulses
from ingestor.model import Batch, BatchRecord, BatchSummary, Outcome, Pulse
from ingestor.money import format_nanos, parse_nanos
from ingestor.partition import partition_of
from ingestor.shard import Ingest, Replies, Reply, Shard, Written
from ingestor.store import AggregateQuery, BatchQuery, PulseQuery, Store
from ingestor.store import sqlite as sqlite_store
from ingestor.store.postgres import PostgresStore
from ingestor.store.sqlite import SQLiteStore

from ..conftest import new_schema

T = TypeVar("T")

PARTITIONS = 4
# "gamma" and "delta" share partition 1; "acme" is alone in partition 2.
TENANTS = ("gamma", "delta", "acme")
SKUS = ("s1", "s2")
UNITS = ("u", "GB")
IDS = ("id0", "id1", "id2", "id3")
# Billing days are UTC's but for two tenants: one 14 hours ahead, one 3.5
# hours behind that leaves summer time (-2:30) on 2026-11-01 at 04:30 UTC.
ZONES = {"acme": "Pacific/Kiritimati", "delta": "America/St_Johns"}
ZONE_OF = {tenant: zoneinfo.ZoneInfo(ZONES.get(tenant, "UTC")) for tenant in TENANTS}
START = dt.datetime(2026, 10, 30, 12, tzinfo=dt.UTC)
SECOND = 1_000_000
HOUR = 3600 * SECOND
DAY = 24 * HOUR
LATE_S = 3 * 86400  # intake's late window
SKEW_S = 300  # ... and how far ahead a timestamp may be
# Each instance's committer's dedup window (the service adds the skew to the
# setting): instances on one store may be configured apart.
DEDUP_S = (3 * 86400, 2 * 86400)
GRACE_S = 3600
COMMITTER_RECORDS = 2  # records a batch of the committers' commits
ANNOUNCED = 10 * SECOND  # how long a purge horizon is announced before ids go
HORIZON_READ = 5 * SECOND  # how often a committer's loop reads it at least
LEASE = 30 * SECOND
RETRY = 60 * SECOND
LATEST = 600 * SECOND  # no lease or retry is set further ahead than this

# (the JSON text of an amount, its value)
AMOUNTS = (
    ("1", "1"),
    ("0", "0"),
    ('"0.5"', "0.5"),
    ("2.25", "2.25"),
    ('"0.000000001"', "0.000000001"),
    ("1.5e3", "1500"),
    ('"123456789.123456789"', "123456789.123456789"),
    ('"18446744073.709551616"', "18446744073.709551616"),  # past MessagePack's integers
    ('"999999999999999999.999999999"', "999999999999999999.999999999"),  # the largest
)
# A timestamp's time of day as a client writes it, and the UTC time it is
# from the midnight of its date (intake keeps a timestamp in the second its
# client wrote: see `intake._rounded_up`).
TIMES = (
    ("T00:00:00Z", dt.timedelta(0)),
    ("T12:00:00+01:00", dt.timedelta(hours=11)),
    ("T23:59:59.999999Z", dt.timedelta(hours=24, microseconds=-1)),
    ("T23:59:59.9999999Z", dt.timedelta(hours=24, microseconds=-1)),
    ("T00:30:00+02:00", dt.timedelta(hours=-1, minutes=-30)),
    ("T09:15:00.25-05:00", dt.timedelta(hours=14, minutes=15, milliseconds=250)),
)


def nanos_of(value: str) -> int:
    return int(Decimal(value).scaleb(9))


def moment(us: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=us)


def day_of(us: int, tenant: str | None = None) -> str:
    """The billing day of instant `us` for `tenant`; UTC's if None."""
    zone = dt.UTC if tenant is None else ZONE_OF[tenant]
    return moment(us).astimezone(zone).date().isoformat()


def day_ends(day: str) -> int:
    """When `day` has ended in every billing zone, µs."""
    following = dt.date.fromisoformat(day) + dt.timedelta(days=1)
    zones = {dt.UTC, *ZONE_OF.values()}
    return max(epoch_us(dt.datetime.combine(following, dt.time(), tzinfo=z)) for z in zones)


# -- what clients send ------------------------------------------------------------


@dataclass(frozen=True)
class Wire:
    """One pulse as a client wrote it, and what it means."""

    text: str  # its JSON
    tenant: str
    sku: str
    unit: str
    nanos: int
    pulse_id: str | None
    ts: int | None  # its timestamp, µs; None if it has none


@dataclass(frozen=True)
class Sent:
    """One pulse of a body, to be written at some time."""

    tenant: str
    sku: str
    unit: str
    amount: int  # index into AMOUNTS
    pulse_id: str | None
    # None: no timestamp; ("day", days from today, index into TIMES);
    # ("now", seconds from now); ("at", µs since the epoch).
    stamp: tuple[Any, ...] | None

    def wire(self, now_us: int, amount: int | None = None) -> Wire:
        text, value = AMOUNTS[self.amount if amount is None else amount]
        fields = [
            f'"tenant_id": "{self.tenant}"',
            f'"product_sku": "{self.sku}"',
            f'"use_unit": "{self.unit}"',
            f'"used_amount": {text}',
        ]
        if self.pulse_id is not None:
            fields.append(f'"id": "{self.pulse_id}"')
        ts: int | None = None
        if self.stamp is not None and self.stamp[0] == "day":
            _, days, which = self.stamp
            date = (moment(now_us) + dt.timedelta(days=days)).date()
            fields.append(f'"timestamp": "{date.isoformat()}{TIMES[which][0]}"')
            ts = epoch_us(dt.datetime.combine(date, dt.time(), tzinfo=dt.UTC) + TIMES[which][1])
        elif self.stamp is not None:
            ts = self.stamp[1] if self.stamp[0] == "at" else now_us + self.stamp[1] * SECOND
            fields.append(f'"timestamp": "{moment(ts).isoformat().replace("+00:00", "Z")}"')
        text = "{" + ", ".join(fields) + "}"
        return Wire(text, self.tenant, self.sku, self.unit, nanos_of(value), self.pulse_id, ts)


STAMP = st.one_of(
    st.none(),
    st.tuples(st.just("day"), st.integers(-4, 1), st.integers(0, len(TIMES) - 1)),
    st.tuples(st.just("now"), st.sampled_from([-3600, -1, 0, 240, 400])),
)


def pulses(ids: st.SearchStrategy[str | None]) -> st.SearchStrategy[Sent]:
    return st.builds(
        Sent,
        tenant=st.sampled_from(TENANTS),
        sku=st.sampled_from(SKUS),
        unit=st.sampled_from(UNITS),
        amount=st.integers(0, len(AMOUNTS) - 1),
        pulse_id=ids,
        stamp=STAMP,
    )


# A body of pulses with ids and without, or of pulses without (no lookups).
BODY = st.one_of(
    st.lists(pulses(st.one_of(st.none(), st.sampled_from(IDS))), min_size=1, max_size=8),
    st.lists(pulses(st.none()), min_size=1, max_size=4),
)


# -- the model --------------------------------------------------------------------

Key = tuple[str, str, str, str]  # (day, tenant, sku, unit): the order batches list them in


@dataclass
class Bucket:
    nanos: int = 0
    count: int = 0
    committed_nanos: int = 0
    committed_count: int = 0
    revision: int = 0


@dataclass
class Known:
    """A client id the store must still know: its payload and when it came."""

    payload: tuple[Any, ...]
    received: int


@dataclass
class Stored:
    """An accepted pulse, for the audit trail."""

    tenant: str
    day: str
    sku: str
    pulse_id: str | None
    nanos: int
    ts: int
    received: int


@dataclass
class ModelBatch:
    batch_id: str
    partition: int
    day: str
    kind: str
    created: int
    records: list[BatchRecord]
    next_at: int | None
    status: str = "pending"
    attempts: int = 0
    last_error: str | None = None
    delivered_at: int | None = None

    @property
    def nanos(self) -> int:
        return sum(parse_nanos(r.used_amount) for r in self.records)


@dataclass
class Purger:
    """A committer's purge as the model sees it: what it announced, and when."""

    dedup_us: int
    announced: collections.deque[tuple[int, int]] = field(default_factory=collections.deque)
    ready: int | None = None


@dataclass
class Model:
    store_id: str
    buckets: dict[Key, Bucket] = field(default_factory=dict)
    ids: dict[tuple[str, str], Known] = field(default_factory=dict)
    stored: list[Stored] = field(default_factory=list)
    batches: dict[str, ModelBatch] = field(default_factory=dict)
    seqs: dict[tuple[int, str], int] = field(default_factory=dict)  # batches a partition's day
    horizon: int | None = None  # the store's purge horizon
    delivered: set[str] = field(default_factory=set)  # batches the sink took, recorded so

    # -- ingest ---------------------------------------------------------------

    def ingest(self, wires: list[Wire], now: int, horizon: int | None) -> dict[int, Outcome]:
        """`wires` received at `now` by an instance that knows purge `horizon`."""
        late = now - LATE_S * SECOND
        oldest = late if horizon is None else max(late, horizon + SKEW_S * SECOND)
        outcomes: dict[int, Outcome] = {}
        for index, w in enumerate(wires):
            if w.ts is not None and not oldest <= w.ts <= now + SKEW_S * SECOND:
                outcomes[index] = "rejected"
                continue
            if w.pulse_id is not None:
                payload = (w.sku, w.unit, w.nanos, w.ts)
                known = self.ids.get((w.tenant, w.pulse_id))
                if known is not None:
                    outcomes[index] = "duplicate" if known.payload == payload else "conflict"
                    continue
                self.ids[w.tenant, w.pulse_id] = Known(payload, now)
            outcomes[index] = "accepted"
            key = (day_of(now if w.ts is None else w.ts, w.tenant), w.tenant, w.sku, w.unit)
            bucket = self.buckets.setdefault(key, Bucket())
            bucket.nanos += w.nanos
            bucket.count += 1
            ts = now if w.ts is None else w.ts
            self.stored.append(Stored(w.tenant, key[0], w.sku, w.pulse_id, w.nanos, ts, now))
        return outcomes

    # -- commit ---------------------------------------------------------------

    def open_keys(self) -> list[Key]:
        return sorted(k for k, b in self.buckets.items() if b.count > b.committed_count)

    def open_days(self, partition: int) -> list[str]:
        return sorted(
            {k[0] for k in self.open_keys() if partition_of(k[1], PARTITIONS) == partition}
        )

    def commit(self, partition: int, day: str, now: int, max_records: int) -> list[ModelBatch]:
        initial: list[BatchRecord] = []
        correction: list[BatchRecord] = []
        for key in self.open_keys():
            if key[0] != day or partition_of(key[1], PARTITIONS) != partition:
                continue
            b = self.buckets[key]
            record = BatchRecord(
                key[1],
                key[2],
                key[3],
                b.revision + 1,
                format_nanos(b.nanos - b.committed_nanos),
                b.count - b.committed_count,
                format_nanos(b.nanos),
                b.count,
            )
            (initial if b.revision == 0 else correction).append(record)
            b.committed_nanos, b.committed_count, b.revision = b.nanos, b.count, b.revision + 1
        made: list[ModelBatch] = []
        for kind, records in (("initial", initial), ("correction", correction)):
            for start in range(0, len(records), max_records):
                seq = self.seqs.get((partition, day), 0) + 1
                self.seqs[partition, day] = seq
                bid = f"{self.store_id}-{day.replace('-', '')}-p{partition:03d}-{seq:05d}"
                chunk = records[start : start + max_records]
                self.batches[bid] = ModelBatch(bid, partition, day, kind, now, chunk, now)
                made.append(self.batches[bid])
        return made

    def commit_day(self, day: str, now: int) -> list[ModelBatch]:
        return [
            batch
            for partition in range(PARTITIONS)
            for batch in self.commit(partition, day, now, COMMITTER_RECORDS)
        ]

    # -- delivery -------------------------------------------------------------

    def due(self, now: int) -> set[str]:
        return {bid for bid, b in self.batches.items() if self.claimable(bid, now)}

    def claimable(self, bid: str, now: int) -> bool:
        b = self.batches[bid]
        return (
            b.status == "pending"
            and b.next_at is not None
            and (b.next_at <= now or b.next_at > now + LATEST)
        )

    def record(
        self, bid: str, status: str, error: str | None, next_at: int | None, now: int
    ) -> None:
        b = self.batches[bid]
        if b.status != "pending":
            return
        b.status, b.last_error, b.next_at = status, error, next_at
        b.attempts += 1
        if status == "delivered":
            b.delivered_at = now

    # -- purge ----------------------------------------------------------------

    def purge(self, purger: Purger, now: int) -> int:
        """A committer's `purge` at `now`: announce, then forget what is ready.
        Returns the horizon it announced."""
        horizon = now - purger.dedup_us
        self.horizon = horizon if self.horizon is None else max(self.horizon, horizon)
        purger.announced.append((now, horizon))
        while purger.announced and purger.announced[0][0] <= now - ANNOUNCED:
            purger.ready = purger.announced.popleft()[1]
        if purger.ready is not None:
            ready = purger.ready
            self.ids = {k: v for k, v in self.ids.items() if v.received >= ready}
            self.stored = [s for s in self.stored if s.received >= ready]
        return horizon


# -- the machine ------------------------------------------------------------------


def routed(intake: Intake) -> dict[int, tuple[list[str], list[Pulse]]]:
    """Each partition's tenants and pulses, as the API groups them (`api.ingest`)."""
    by_partition: dict[int, tuple[list[str], list[Pulse]]] = {}
    for tenant, pulses in intake.tenants.items():
        partition = partition_of(tenant, PARTITIONS)
        part = by_partition.get(partition)
        if part is None:
            by_partition[partition] = ([tenant], list(pulses))
        else:
            part[0].append(tenant)
            part[1].extend(pulses)
    return by_partition


def outcomes_of(intake: Intake, written: Written) -> dict[int, Outcome]:
    """Each pulse's outcome by its index in the request, as `api.ingest` reports it."""
    got: dict[int, Outcome] = {item.index: item.status for item in intake.items}
    for partition, (tenants, _) in routed(intake).items():
        outcomes = written[partition]
        assert not isinstance(outcomes, StoreError), outcomes
        indexes = [i for tenant in tenants for i in intake.indexes(tenant)]
        got.update(zip(indexes, outcomes, strict=True))
    return got


class Instance:
    """A service's core on the shared store: its rules, shards and committer."""

    def __init__(self, machine: MoneyPath, index: int, store: Store | None = None) -> None:
        self.machine = machine
        self.index = index
        self.store = machine.open(index) if store is None else store
        self.rules = Rules(
            late_window_s=LATE_S, future_skew_s=SKEW_S, max_batch=100, tenant_timezones=ZONES
        )
        self.rules.raise_horizon(self.store.purge_horizon())  # as `open_service` does
        self.shards: list[Shard] = []  # the committer's: made anew for each `run`
        self.committer = Committer(
            self.shards,
            self.store,
            zones=self.rules.zones(),
            interval=60,
            grace=GRACE_S,
            max_records=COMMITTER_RECORDS,
            dedup_window=DEDUP_S[index],
            on_horizon=self.rules.raise_horizon,
            clock=machine.clock,
        )
        self.purger = Purger(DEDUP_S[index] * SECOND)
        self.horizon = machine.model.horizon if machine.started else None  # what rules know

    def run(self, work: Callable[[], Awaitable[T]]) -> T:
        """`work` with this instance's shards running, as `open_service` runs them."""

        async def main() -> T:
            partitions = self.store.partitions
            lanes = max(1, min(self.store.write_lanes, partitions))
            self.shards[:] = [
                Shard(
                    lane,
                    range(lane, partitions, lanes),
                    self.store,
                    queue_size=64,
                    group_max_pulses=50_000,
                    clock=self.machine.clock,
                )
                for lane in range(lanes)
            ]
            async with trio.open_nursery() as nursery:
                for shard in self.shards:
                    await nursery.start(shard.run)
                try:
                    return await work()
                finally:
                    for shard in self.shards:
                        shard.close()

        return trio.run(main)

    def intake(self, wires: list[Wire]) -> tuple[bytes, Intake]:
        body = ("[" + ", ".join(w.text for w in wires) + "]").encode()
        return body, decode_pulses(body, "application/json", self.rules, self.machine.now)

    def submit(self, intake: Intake) -> Reply[Written]:
        """Queue a request's pulses to the shards, as `api.ingest` does."""
        by_shard: dict[int, dict[int, list[Pulse]]] = {}
        for partition, (_, pulses) in routed(intake).items():
            by_shard.setdefault(partition % len(self.shards), {})[partition] = pulses
        replies: Replies[Written] = Replies()
        waiting: list[Reply[Written]] = []
        for lane, writes in by_shard.items():
            reply = replies.reply()
            self.shards[lane].submit_nowait(Ingest(writes, reply, ids=intake.ids))
            waiting.append(reply)
        whole: Reply[Written] = Reply()

        async def gather() -> None:
            await replies.wait()
            whole.send({p: o for reply in waiting for p, o in reply.result().items()})

        self.machine.nursery.start_soon(gather)
        return whole


class MoneyPath(RuleBasedStateMachine):
    kind = "sqlite"
    database = ""  # PostgreSQL: the session's database, a fresh schema each example

    def __init__(self) -> None:
        super().__init__()
        self.exits = contextlib.ExitStack()
        self.now = epoch_us(START)
        self.started = False
        self.steps = 0
        self.sent: list[tuple[int, list[Sent]]] = []  # each body, and when it was first sent
        self.instances: list[Instance] = []
        self.nursery: trio.Nursery

    @initialize(
        count=st.sampled_from([1, 2]), fold_at_once=st.booleans(), small_merges=st.booleans()
    )
    def start(self, count: int, fold_at_once: bool, small_merges: bool) -> None:
        if self.kind == "sqlite":
            tmp = Path(tempfile.mkdtemp(prefix="money-"))
            self.exits.callback(shutil.rmtree, tmp, ignore_errors=True)
            self.place = str(tmp / "store")
            knobs: dict[str, float] = {}
            if fold_at_once:  # every write folds its partition's deltas, or reads do
                knobs["_FOLD_AFTER_S"] = 0.0
            if small_merges:  # recent ids go to the index in slices, as under load
                knobs.update(_MERGE_AT=3, _MERGE_MAX=3, _MERGE_CHUNK=2, _MERGE_ALONE_AT=6)
            for name, value in knobs.items():
                self.exits.callback(setattr, sqlite_store, name, getattr(sqlite_store, name))
                setattr(sqlite_store, name, value)
        else:
            self.place = self.exits.enter_context(new_schema(self.database))
        self.count = count
        first = Instance(self, 0)
        self.model = Model(first.store.store_id)
        self.instances = [first, *(Instance(self, i) for i in range(1, count))]
        self.started = True

    def open(self, index: int, partitions: int = PARTITIONS, alone: bool = False) -> Store:
        """Instance `index`'s store, opened with `partitions` set (the stored count
        wins); SQLite: as one of `count` workers, each keeping some partitions'
        deltas, or (`alone`) as the only one, keeping all of them."""
        store: Store
        if self.kind == "sqlite":
            store = SQLiteStore.open(
                Path(self.place),
                partitions=partitions,
                durability="os",
                busy_timeout=10,
                worker=(0, 1) if alone else (index, self.count),
            )
        else:
            store = PostgresStore.open(
                self.place, partitions=partitions, pool_size=4, busy_timeout=10
            )
        self.exits.callback(store.close)
        assert store.partitions == PARTITIONS
        return store

    def clock(self) -> int:
        return self.now

    def teardown(self) -> None:
        try:
            if self.started and self.steps:
                for instance in self.instances:
                    self.check_everything(instance)
        finally:
            self.exits.close()

    def instance(self, which: int) -> Instance:
        return self.instances[which % len(self.instances)]

    # -- writes ---------------------------------------------------------------

    def send(self, instance: Instance, bodies: list[list[Wire]], how: str) -> None:
        """`bodies` from clients to `instance`: each through the shards alone
        ("shards"), all in one round of the shards ("round"), or each straight
        to the store ("store")."""
        self.steps += 1
        expected = [self.model.ingest(wires, self.now, instance.horizon) for wires in bodies]
        made = [instance.intake(wires) for wires in bodies]
        got: list[dict[int, Outcome]] = []
        if how == "store":
            for _, intake in made:
                written: Written = {
                    partition: instance.store.write_pulses(
                        partition, pulses, self.now, None, intake.ids
                    )
                    for partition, (_, pulses) in routed(intake).items()
                }
                got.append(outcomes_of(intake, written))
        else:

            async def requests() -> list[Written]:
                answers: list[Written] = []
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    if how == "round":  # queued together: one round of the shards
                        replies = [instance.submit(intake) for _, intake in made]
                        for reply in replies:
                            answers.append(await reply.receive())
                    else:
                        for _, intake in made:
                            answers.append(await instance.submit(intake).receive())
                return answers

            answers = instance.run(requests)
            got = [outcomes_of(intake, a) for (_, intake), a in zip(made, answers, strict=True)]
        for (body, _), mine, theirs in zip(made, expected, got, strict=True):
            assert theirs == mine, body

    @rule(
        which=st.integers(0, 1),
        bodies=st.lists(BODY, min_size=1, max_size=3),
        how=st.sampled_from(["shards", "round", "store"]),
    )
    def write(self, which: int, bodies: list[list[Sent]], how: str) -> None:
        self.sent.extend((self.now, body) for body in bodies)
        self.send(self.instance(which), [[s.wire(self.now) for s in b] for b in bodies], how)

    @precondition(
        lambda self: self.started and any(b.revision for b in self.model.buckets.values())
    )
    @rule(
        which=st.integers(0, 1),
        bucket=st.integers(0, 1000),
        amounts=st.lists(st.integers(0, len(AMOUNTS) - 1), min_size=1, max_size=3),
        pulse_id=st.one_of(st.none(), st.sampled_from(IDS)),
        how=st.sampled_from(["shards", "round", "store"]),
    )
    def late_pulses(
        self, which: int, bucket: int, amounts: list[int], pulse_id: str | None, how: str
    ) -> None:
        """Pulses stamped on a day already committed, for one of its buckets:
        corrections, if that day is still within the windows."""
        committed = sorted(k for k, b in self.model.buckets.items() if b.revision)
        day, tenant, sku, unit = committed[bucket % len(committed)]
        noon = dt.datetime.combine(dt.date.fromisoformat(day), dt.time(12), ZONE_OF[tenant])
        stamp = ("at", epoch_us(noon))
        body = [Sent(tenant, sku, unit, a, pulse_id, stamp) for a in amounts]
        self.sent.append((self.now, body))
        self.send(self.instance(which), [[s.wire(self.now) for s in body]], how)

    @precondition(lambda self: self.sent)
    @rule(
        which=st.integers(0, 1),
        body=st.integers(0, 1000),
        how=st.sampled_from(["shards", "round", "store"]),
        changed=st.one_of(st.none(), st.none(), st.integers(0, len(AMOUNTS) - 1)),
        twice=st.booleans(),
    )
    def replay(self, which: int, body: int, how: str, changed: int | None, twice: bool) -> None:
        """A body sent before, again (a client's retry): byte for byte, or with
        every amount `changed` (its ids reused for other pulses); `twice`: the
        retry races another copy of itself (in one round of the shards)."""
        then, sent = self.sent[body % len(self.sent)]
        wires = [s.wire(then, changed) for s in sent]
        self.send(self.instance(which), [wires, wires] if twice else [wires], how)

    @rule(seconds=st.sampled_from([1, 11, 600, 3600, 6 * 3600, 25 * 3600]))
    def tick(self, seconds: int) -> None:
        self.advance(seconds * SECOND)

    @precondition(lambda self: self.sent)
    @rule(
        body=st.integers(0, 1000),
        which=st.integers(0, 1),
        off=st.sampled_from([-SECOND, -1, 0, 1, 12 * SECOND]),
    )
    def purge_at_window(self, body: int, which: int, off: int) -> None:
        """On to where an instance's purge horizon falls `off` µs after a body sent
        earlier, and purge there, twice 11 s apart: the horizon that is forgotten
        up to lands on a write (strictly before it, on it, or just after it)."""
        then = self.sent[body % len(self.sent)][0]
        target = then + self.instance(which).purger.dedup_us + off
        if target > self.now:
            self.advance(target - self.now)
            self.purge(which, again=True)

    def advance(self, us: int) -> None:
        self.now += us
        if us >= HORIZON_READ:
            # Each committer's loop reads the store's purge horizon at least this often.
            for instance in self.instances:
                instance.rules.raise_horizon(instance.store.purge_horizon())
                instance.horizon = self.model.horizon

    @rule(seconds=st.sampled_from([5, 30, 3600]))
    def step_back(self, seconds: int) -> None:
        """The wall clock steps back (NTP): receive times, commits, leases and
        announcements are made on it out of order."""
        self.now -= seconds * SECOND

    # -- commits --------------------------------------------------------------

    @rule(
        which=st.integers(0, 1),
        partition=st.sampled_from([1, 2, 0]),
        back=st.integers(-1, 4),
        max_records=st.sampled_from([1, 3, 1000]),
    )
    def commit_partition(self, which: int, partition: int, back: int, max_records: int) -> None:
        self.steps += 1
        day = day_of(self.now - back * DAY)
        got = self.instance(which).store.commit_day(partition, day, self.now, max_records)
        self.same_summaries(got, self.model.commit(partition, day, self.now, max_records))

    @rule(which=st.integers(0, 1), back=st.integers(-1, 4))
    def commit_day(self, which: int, back: int) -> None:
        self.steps += 1
        instance = self.instance(which)
        day = dt.date.fromisoformat(day_of(self.now - back * DAY))
        got = instance.run(lambda: instance.committer.commit_day(day))
        self.same_summaries(got, self.model.commit_day(day.isoformat(), self.now))

    @rule(which=st.integers(0, 1))
    def commit_due(self, which: int) -> None:
        self.steps += 1
        instance = self.instance(which)
        got = instance.run(instance.committer.commit_due)
        expected: list[ModelBatch] = []
        for day in sorted({k[0] for k in self.model.open_keys()}):
            if day_ends(day) + GRACE_S * SECOND <= self.now:
                expected.extend(self.model.commit_day(day, self.now))
        self.same_summaries(got, expected)

    @staticmethod
    def same_summaries(got: list[BatchSummary], expected: list[ModelBatch]) -> None:
        assert [(b.batch_id, b.kind, b.partition, b.record_count, b.used_amount) for b in got] == [
            (b.batch_id, b.kind, b.partition, len(b.records), format_nanos(b.nanos))
            for b in expected
        ]

    # -- delivery -------------------------------------------------------------

    @rule(
        which=st.integers(0, 1),
        batch=st.integers(0, 1000),
        outcome=st.sampled_from(["delivered", "retry", "failed", "lost"]),
    )
    def deliver(self, which: int, batch: int, outcome: str) -> None:
        """One attempt of a deliverer: a due batch, claimed, sent, its outcome recorded."""
        self.steps += 1
        store = self.instance(which).store
        due = {d.batch_id: d for d in store.due_batches(self.now, 1000, self.now + LATEST)}
        assert set(due) == self.model.due(self.now)
        if not due:
            return
        chosen = due[sorted(due)[batch % len(due)]]
        mine = self.model.batches[chosen.batch_id]
        assert (chosen.partition, chosen.day, chosen.attempts) == (
            mine.partition,
            mine.day,
            mine.attempts,
        )
        claimed = store.claim_batch(
            chosen.partition,
            chosen.batch_id,
            now_us=self.now,
            latest_us=self.now + LATEST,
            lease_us=self.now + LEASE,
        )
        assert claimed is not None
        body = msgspec.json.decode(claimed, type=Batch)
        assert (body.batch_id, body.kind, body.records, body.used_amount) == (
            mine.batch_id,
            mine.kind,
            mine.records,
            format_nanos(mine.nanos),
        )
        mine.next_at = self.now + LEASE
        # The sink takes it: a batch it took before, recorded delivered, is never sent again.
        assert chosen.batch_id not in self.model.delivered, "a delivered batch was sent again"
        if outcome == "lost":  # the sender died: the lease ends, the batch is due again
            return
        status, error, next_at = {
            "delivered": ("delivered", None, None),
            "retry": ("pending", "timed out", self.now + RETRY),
            "failed": ("failed", "refused: 400", None),
        }[outcome]
        store.record_delivery(
            chosen.partition,
            chosen.batch_id,
            status=status,
            error=error,
            next_attempt_us=next_at,
            now_us=self.now,
        )
        self.model.record(chosen.batch_id, status, error, next_at, self.now)
        if status == "delivered":
            self.model.delivered.add(chosen.batch_id)

    def pick(self, batch: int) -> ModelBatch:
        return self.model.batches[sorted(self.model.batches)[batch % len(self.model.batches)]]

    @precondition(lambda self: self.started and self.model.batches)
    @rule(
        which=st.integers(0, 1),
        batch=st.integers(0, 1000),
        status=st.sampled_from(["delivered", "failed", "pending"]),
    )
    def late_outcome(self, which: int, batch: int, status: str) -> None:
        """An outcome recorded late, or twice: it changes a pending batch only."""
        self.steps += 1
        mine = self.pick(batch)
        next_at = self.now + RETRY if status == "pending" else None
        self.instance(which).store.record_delivery(
            mine.partition,
            mine.batch_id,
            status=status,
            error="late",
            next_attempt_us=next_at,
            now_us=self.now,
        )
        self.model.record(mine.batch_id, status, "late", next_at, self.now)
        if mine.status == "delivered":
            self.model.delivered.add(mine.batch_id)

    @precondition(lambda self: self.started and self.model.batches)
    @rule(which=st.integers(0, 1), batch=st.integers(0, 1000))
    def claim(self, which: int, batch: int) -> None:
        """A claim of any batch (its sender then dies): only a due one is taken."""
        self.steps += 1
        mine = self.pick(batch)
        expected = self.model.claimable(mine.batch_id, self.now)
        got = self.instance(which).store.claim_batch(
            mine.partition,
            mine.batch_id,
            now_us=self.now,
            latest_us=self.now + LATEST,
            lease_us=self.now + LEASE,
        )
        assert (got is not None) == expected, mine
        if got is not None:
            mine.next_at = self.now + LEASE

    @precondition(lambda self: self.started and self.model.batches)
    @rule(which=st.integers(0, 1), batch=st.integers(0, 1000))
    def redeliver(self, which: int, batch: int) -> None:
        self.steps += 1
        mine = self.pick(batch)
        expected = mine.status == "failed"
        assert self.instance(which).store.redeliver(mine.batch_id, self.now) == expected
        if expected:
            mine.status, mine.next_at = "pending", self.now

    # -- purge, restart -------------------------------------------------------

    @rule(which=st.integers(0, 1), again=st.booleans())
    def purge(self, which: int, again: bool) -> None:
        """A committer's purge; `again`: and its next one 11 s later, by when
        what the first announced may be forgotten."""
        self.steps += 1
        instance = self.instance(which)
        for turn in range(2 if again else 1):
            if turn:
                self.advance(11 * SECOND)
            instance.run(instance.committer.purge)
            announced = self.model.purge(instance.purger, self.now)
            known = instance.horizon
            instance.horizon = announced if known is None else max(known, announced)
            assert instance.rules.horizon_us == instance.horizon

    @rule(which=st.integers(0, 1), partitions=st.sampled_from([4, 16]), alone=st.booleans())
    def restart(self, which: int, partitions: int, alone: bool) -> None:
        """Close an instance's store (its deltas maybe not folded) and start it
        again, maybe with another `partitions` setting, or as the only worker."""
        self.steps += 1
        index = which % len(self.instances)
        self.instances[index].store.close()
        store = self.open(index, partitions, alone)
        again = self.instances[index] = Instance(self, index, store)
        assert again.store.store_id == self.model.store_id
        assert again.rules.horizon_us == self.model.horizon
        self.check_everything(again)

    @precondition(lambda self: self.started and self.kind == "sqlite")
    @rule()
    def read_while_another_writes(self) -> None:
        """SQLite: reads while another process holds the writers' lock longer than
        the reader waits cannot fold; they add the log's tail themselves."""
        self.steps += 1
        reader = SQLiteStore.open(
            Path(self.place), partitions=PARTITIONS, durability="os", busy_timeout=0.001
        )
        held = os.open(Path(self.place) / "writer.lock", os.O_RDWR)
        quiet = logging.getLogger("ingestor.store")  # says it reads without folding
        try:
            fcntl.flock(held, fcntl.LOCK_EX)
            quiet.disabled = True
            self.check_buckets(reader)
        finally:
            quiet.disabled = False
            os.close(held)
            reader.close()

    # -- what a store must answer ---------------------------------------------

    @rule(which=st.integers(0, 1))
    def check(self, which: int) -> None:
        self.check_everything(self.instance(which))

    def check_everything(self, instance: Instance) -> None:
        self.check_buckets(instance.store)
        self.check_batches(instance.store)
        self.check_trail(instance.store)
        assert instance.store.purge_horizon() == self.model.horizon

    def check_buckets(self, store: Store) -> None:
        model = self.model
        rows = store.aggregates(AggregateQuery(limit=10_000))
        assert [
            (
                (r.date, r.tenant_id, r.product_sku, r.use_unit),
                parse_nanos(r.used_amount),
                r.pulse_count,
                parse_nanos(r.committed_amount),
                r.committed_count,
                r.revision,
            )
            for r in rows
        ] == [
            (k, b.nanos, b.count, b.committed_nanos, b.committed_count, b.revision)
            for k, b in sorted(model.buckets.items())
        ]
        for r in rows:  # in shortest form
            assert r.used_amount == format_nanos(parse_nanos(r.used_amount))
            assert r.committed_amount == format_nanos(parse_nanos(r.committed_amount))
        opened = store.aggregates(AggregateQuery(status="open", limit=10_000))
        assert [(r.date, r.tenant_id, r.product_sku, r.use_unit) for r in opened] == (
            model.open_keys()
        )
        closed = store.aggregates(AggregateQuery(status="committed", limit=10_000))
        assert len(closed) + len(opened) == len(rows)
        for partition in range(PARTITIONS):
            assert store.open_days(partition) == model.open_days(partition), partition
        assert store.open_buckets() == len(model.open_keys())

    def check_batches(self, store: Store) -> None:
        model = self.model
        views = store.batches(BatchQuery(limit=10_000))
        assert sorted(v.batch_id for v in views) == sorted(model.batches)
        history: dict[Key, list[BatchRecord]] = {}
        for view in views:
            mine = model.batches[view.batch_id]
            pending = mine.status == "pending" and mine.next_at is not None
            assert (
                view.partition,
                view.date,
                view.kind,
                view.created_at,
                view.record_count,
                view.used_amount,
                view.status,
                view.attempts,
                view.last_error,
                view.next_attempt_at,
                view.delivered_at,
            ) == (
                mine.partition,
                mine.day,
                mine.kind,
                moment(mine.created),
                len(mine.records),
                format_nanos(mine.nanos),
                mine.status,
                mine.attempts,
                mine.last_error,
                moment(mine.next_at) if pending and mine.next_at is not None else None,
                None if mine.delivered_at is None else moment(mine.delivered_at),
            ), view.batch_id
            full = store.batch(view.batch_id)
            assert full is not None
            assert full.records == mine.records, view.batch_id
            for r in full.records:
                history.setdefault((view.date, r.tenant_id, r.product_sku, r.use_unit), []).append(
                    r
                )
        # DESIGN §3.4 from the store's own batches: each committed bucket's
        # revisions 1..n, their deltas adding up to the totals they carry, to
        # its committed part, and to the accepted pulses committed so far.
        committed = {k: b for k, b in model.buckets.items() if b.revision}
        assert set(history) == set(committed)
        for key, records in history.items():
            records.sort(key=lambda r: r.revision)
            assert [r.revision for r in records] == list(range(1, len(records) + 1)), key
            nanos = count = 0
            for r in records:
                nanos += parse_nanos(r.used_amount)
                count += r.pulse_count
                assert (nanos, count) == (parse_nanos(r.total_amount), r.total_count), key
            bucket = committed[key]
            assert (nanos, count) == (bucket.committed_nanos, bucket.committed_count), key
        statuses = collections.Counter(b.status for b in model.batches.values())
        assert store.outbox_batches() == {
            "pending": statuses["pending"],
            "failed": statuses["failed"],
        }
        waiting = [b.created for b in model.batches.values() if b.status == "pending"]
        assert store.outbox_statistics() == (len(waiting), min(waiting, default=None))

    def check_trail(self, store: Store) -> None:
        """The pulses behind each (tenant, day), as stored and not purged."""
        trails: dict[tuple[str, str], list[Stored]] = {}
        for s in self.model.stored:
            trails.setdefault((s.tenant, s.day), []).append(s)
        for (tenant, day), expected in sorted(trails.items()):
            listed = store.pulses(PulseQuery(tenant_id=tenant, day=day, limit=1000))
            assert [
                (
                    p.product_sku,
                    None if p.id_assigned else p.id,
                    parse_nanos(p.used_amount),
                    p.timestamp,
                    p.received_at,
                    p.date,
                )
                for _, p in listed
            ] == [
                (s.sku, s.pulse_id, s.nanos, moment(s.ts), moment(s.received), day)
                for s in expected
            ], (tenant, day)
            assigned = [p.id for _, p in listed if p.id_assigned]
            assert len(set(assigned)) == len(assigned)


# Examples a store (each up to STEPS steps): the file runs in about 15 s on two
# cores. MONEY_EXAMPLES and MONEY_STEPS run longer campaigns.
EXAMPLES = {"sqlite": 30, "postgres": 15}
STEPS = 50


def run_machine(machine: type[MoneyPath]) -> None:
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=int(os.environ.get("MONEY_EXAMPLES", EXAMPLES[machine.kind])),
            stateful_step_count=int(os.environ.get("MONEY_STEPS", STEPS)),
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        ),
    )


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_the_money_path_agrees_with_the_model(kind: str, request: pytest.FixtureRequest) -> None:
    class Machine(MoneyPath):
        pass

    Machine.kind = kind
    if kind == "postgres":
        Machine.database = request.getfixturevalue("postgres_database")
    run_machine(Machine)
