"""The whole service, through its HTTP API, against a model kept with Decimal.

Hypothesis writes a list of steps; each example plays them against a service
opened in process (its store, shards, committer and deliverer, on a wall
clock moved by hand) on a store of its own, SQLite or PostgreSQL, and against
a plain model of what a user is promised (DESIGN §2 to §4). The steps:

- POST /pulses: JSON arrays, NDJSON and single objects, of three tenants
  (two billed in time zones of their own, two sharing a partition), two SKUs
  and two units; with ids and without; replays of earlier ids with the same
  payload (spelled otherwise) and with another; resends of an id the audit
  trail gave a pulse sent without one; timestamps on several billing days,
  on days already committed, at the edges of the late window and the future
  skew, too old and too far ahead; amounts with up to 9 decimals, up to the
  largest allowed, written as numbers, strings and exponents; and pulses a
  client got wrong (negative, too precise, too large, an unknown field);
- POST /aggregates/commit of a day (today, the past, the future; repeated),
  and the periodic committer's work (`commit_due`);
- deliveries to a downstream that may answer "later" or refuse a batch for
  good, POST /batches/{id}/redeliver, and a downstream that holds a batch
  while the service stops;
- restarts on the same data dir or database, and the clock moving forward.

After each step:

- each request's answer (status, counts, items) is the model's;
- GET /aggregates is the model's, bucket by bucket: used_amount,
  pulse_count, committed_amount, committed_count, revision;
- the outbox (GET /batches, GET /batches/{id}) is the model's, batch by
  batch and record by record, with its delivery state; from the service's
  own batches, each bucket's revisions run 1, 2, 3… with no gap, each record's
  total is the running sum of the deltas, and the last is the bucket's
  committed part; a batch never changes; the downstream holds each batch as
  the outbox shows it, and never two bodies under one id;
- GET /pulses lists exactly the accepted pulses of a (tenant, day).

The trio loop of an example runs on a clock that stands still: the service's
timers (the committer's tick, the deliverer's idle poll) fire only when a
step does their work, so every example is played the same way each time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import decimal
import json
import os
import shutil
import tempfile
import urllib.parse
import zlib
import zoneinfo
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict
from quart.typing import TestClientProtocol as Client

from ingestor.api import create_app
from ingestor.config import Settings, load_settings
from ingestor.errors import SinkRejected, SinkRetryable
from ingestor.runtime import Runtime
from ingestor.service import open_service

from .conftest import FakeClock, new_schema

# -- the product's settings in these examples ----------------------------------------

PARTITIONS = 4
MAX_RECORDS = 2  # records a batch: a day's partition is split into several
RETRY_MAX_S = 5  # the deliverer's longest backoff; every clock step is longer
TENANTS = ("acme", "globex", "initech")  # acme and globex share partition 2
ZONES = {"globex": "America/St_Johns", "initech": "Pacific/Kiritimati"}
SKUS = ("sku1", "Sku-2")
UNITS = ("api_call", "GB")
IDS = ("r1", "r2", "r3", "r4")
START = dt.datetime(2026, 11, 28, 12, tzinfo=dt.UTC)
LATE_US = 35 * 86400 * 1_000_000
SKEW_US = 300 * 1_000_000
GRACE = dt.timedelta(hours=1)
MAX_AMOUNT = Decimal(10) ** 18  # exclusive
ZONE_OF = {t: zoneinfo.ZoneInfo(ZONES.get(t, "UTC")) for t in TENANTS}
BILLING_ZONES = {zoneinfo.ZoneInfo("UTC"), *ZONE_OF.values()}
# Sums of amounts of 27 digits: a context that would round them raises instead.
EXACT = decimal.Context(prec=200, traps=[decimal.Inexact, decimal.Rounded])
JSON = {"Content-Type": "application/json"}
NDJSON = {"Content-Type": "application/x-ndjson"}
DELIVERY_STATE = ("status", "attempts", "last_error", "next_attempt_at", "delivered_at")
REFUSED = "the billing system refused the batch"
BUSY = "the billing system is busy"
SAID = object()  # a last_error of the service's own words: any text will do

# A timestamp's time of day as a client writes it, and where it is from the
# UTC midnight of its date; nine digits stay in their second.
TIMES = (
    ("T00:00:00Z", dt.timedelta(0)),
    ("T12:00:00+01:00", dt.timedelta(hours=11)),
    ("T23:59:59.999999Z", dt.timedelta(days=1, microseconds=-1)),
    ("T23:59:59.999999999Z", dt.timedelta(days=1, microseconds=-1)),
    ("T00:30:00+02:00", dt.timedelta(hours=-1, minutes=-30)),
    ("T09:15:00.25-05:00", dt.timedelta(hours=14, minutes=15, milliseconds=250)),
    ("T22:45:00-03:30", dt.timedelta(days=1, hours=2, minutes=15)),
)
# Timestamps at the edges of what is taken, seconds from now.
EDGES = (300, 301, -35 * 86400, -35 * 86400 - 1, -40 * 86400, -1)


def moment(us: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=us)


def epoch_us(when: dt.datetime) -> int:
    delta = when - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def parse_time(text: str) -> int:
    return epoch_us(dt.datetime.fromisoformat(text))


def shown(amount: Decimal) -> str:
    """An amount as the API writes it: the shortest exact decimal."""
    text = f"{amount:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def partition_of(tenant: str) -> int:
    return zlib.crc32(tenant.encode()) % PARTITIONS


def billing_day(tenant: str, us: int) -> str:
    return moment(us).astimezone(ZONE_OF[tenant]).date().isoformat()


def day_closes(day: str) -> dt.datetime:
    """When `day` has ended in every billing zone."""
    following = dt.date.fromisoformat(day) + dt.timedelta(days=1)
    return max(dt.datetime.combine(following, dt.time(), tzinfo=z) for z in BILLING_ZONES)


# -- what the steps are ---------------------------------------------------------------


@dataclass(frozen=True)
class PulseSpec:
    """One pulse of a request, before the example's history gives it meaning."""

    tenant: str
    sku: str
    unit: str
    amount: Decimal
    spelling: str  # number | string | padded | exponent
    # None; ("new", name); ("again", k, change): the k-th id sent before, with
    # its payload or another; ("trail", k): an id GET /pulses gave a pulse
    # sent without one.
    ident: tuple[Any, ...] | None
    # None (the time received); ("day", days back, index in TIMES); ("edge", index
    # in EDGES); ("late", k): noon of the k-th bucket committed, in its bucket
    stamp: tuple[Any, ...] | None
    flaw: str | None  # negative | precise | huge | unknown


@dataclass(frozen=True)
class Send:
    pulses: tuple[PulseSpec, ...]
    form: str  # array | ndjson | single


@dataclass(frozen=True)
class Commit:
    back: int  # days before today (UTC); negative: days ahead
    in_query: bool


@dataclass(frozen=True)
class Tick:
    """The periodic committer's work: every open day past its end and grace."""


@dataclass(frozen=True)
class Advance:
    seconds: int


@dataclass(frozen=True)
class Trouble:
    """The downstream will answer the next `times` deliveries so."""

    kind: str  # busy | refuse
    times: int


@dataclass(frozen=True)
class Deliver:
    """Let the downstream answer: every batch due is attempted once."""


@dataclass(frozen=True)
class Redeliver:
    pick: int
    failed: bool  # pick among the failed batches (else among them all)


@dataclass(frozen=True)
class Restart:
    pass


Step = Send | Commit | Tick | Advance | Trouble | Deliver | Redeliver | Restart

AMOUNTS = st.one_of(
    st.integers(0, 1000).map(Decimal),
    st.integers(0, 10**13).map(lambda n: Decimal(n).scaleb(-9)),
    st.integers(0, 10**27 - 1).map(lambda n: Decimal(n).scaleb(-9)),
    st.sampled_from(
        [
            Decimal("0"),
            Decimal("0.000000001"),
            Decimal("18446744073.709551616"),  # past 64-bit nanos
            Decimal("999999999999999999.999999999"),  # the largest
        ]
    ),
)
IDENT_KINDS: dict[str, st.SearchStrategy[tuple[Any, ...] | None]] = {
    "none": st.none(),
    "new": st.tuples(st.just("new"), st.sampled_from(IDS)),
    "again": st.tuples(
        st.just("again"),
        st.integers(0, 50),
        st.sampled_from([None, None, "amount", "sku", "stamp"]),
    ),
    "trail": st.tuples(st.just("trail"), st.integers(0, 50)),
}
IDENTS = st.sampled_from(["none"] * 3 + ["new"] * 4 + ["again"] * 3 + ["trail"]).flatmap(
    IDENT_KINDS.__getitem__
)
STAMP_KINDS: dict[str, st.SearchStrategy[tuple[Any, ...] | None]] = {
    "none": st.none(),
    "day": st.tuples(st.just("day"), st.integers(0, 4), st.integers(0, len(TIMES) - 1)),
    "edge": st.tuples(st.just("edge"), st.integers(0, len(EDGES) - 1)),
    "late": st.tuples(st.just("late"), st.integers(0, 50)),
}
STAMPS = st.sampled_from(["none"] * 3 + ["day"] * 3 + ["late"] * 2 + ["edge"]).flatmap(
    STAMP_KINDS.__getitem__
)
PULSES = st.builds(
    PulseSpec,
    tenant=st.sampled_from(TENANTS),
    sku=st.sampled_from(SKUS),
    unit=st.sampled_from(UNITS),
    amount=AMOUNTS,
    spelling=st.sampled_from(["number", "string", "padded", "exponent"]),
    ident=IDENTS,
    stamp=STAMPS,
    flaw=st.sampled_from([None] * 24 + ["negative", "precise", "huge", "unknown"]),
)
SENDS = st.builds(
    Send,
    pulses=st.lists(PULSES, min_size=1, max_size=6).map(tuple),
    form=st.sampled_from(["array", "ndjson", "single"]),
)
# Each kind of step, as often as it is named here.
KINDS: dict[str, st.SearchStrategy[Step]] = {
    "send": SENDS,
    "commit": st.builds(
        Commit, back=st.sampled_from([0, 1, -1, 2, 3, -2, 35]), in_query=st.booleans()
    ),
    "tick": st.builds(Tick),
    "advance": st.builds(Advance, seconds=st.sampled_from([10, 3600, 6 * 3600, 86400, 2 * 86400])),
    "trouble": st.builds(
        Trouble, kind=st.sampled_from(["busy", "refuse"]), times=st.integers(1, 3)
    ),
    "deliver": st.builds(Deliver),
    "redeliver": st.builds(Redeliver, pick=st.integers(0, 50), failed=st.booleans()),
    "restart": st.builds(Restart),
}
WEIGHTS = [*["send"] * 6, *["commit"] * 3, *["tick", "deliver"] * 2]
WEIGHTS += ["advance", "trouble", "redeliver", "restart"]
STEP: st.SearchStrategy[Step] = st.sampled_from(WEIGHTS).flatmap(KINDS.__getitem__)
STEPS = st.lists(STEP, min_size=10, max_size=40)


# -- the model --------------------------------------------------------------------------

Key = tuple[str, str, str, str]  # (day, tenant, sku, unit): the order of GET /aggregates


@dataclass(frozen=True)
class Wire:
    """A pulse as sent: its text and what it means."""

    text: str
    tenant: str
    sku: str
    unit: str
    amount: Decimal
    pulse_id: str | None
    ts: int | None  # µs; None: no timestamp
    flaw: str | None


@dataclass
class Bucket:
    amount: Decimal = Decimal(0)
    count: int = 0
    committed_amount: Decimal = Decimal(0)
    committed_count: int = 0
    revision: int = 0


@dataclass
class Stored:
    """An accepted pulse, as GET /pulses must list it."""

    tenant: str
    day: str
    sku: str
    unit: str
    pulse_id: str | None  # None: sent without one
    amount: Decimal
    ts: int
    received: int


@dataclass
class ModelBatch:
    batch_id: str
    day: str
    partition: int
    kind: str
    created: int
    records: list[dict[str, Any]]
    status: str = "pending"
    due: bool = True
    attempts: int = 0
    last_error: str | object | None = None
    delivered_at: int | None = None

    @property
    def amount(self) -> Decimal:
        return sum((Decimal(r["used_amount"]) for r in self.records), Decimal(0))


@dataclass
class Model:
    now: int
    store_id: str = ""
    buckets: dict[Key, Bucket] = field(default_factory=dict)
    ids: dict[tuple[str, str], tuple[str, str, Decimal, int | None]] = field(default_factory=dict)
    stored: list[Stored] = field(default_factory=list)
    batches: dict[str, ModelBatch] = field(default_factory=dict)
    seqs: dict[tuple[int, str], int] = field(default_factory=dict)

    def today(self) -> dt.date:
        """The latest date it is in any billing zone: a later one is the future."""
        return max(moment(self.now).astimezone(z).date() for z in BILLING_ZONES)

    # -- ingest -------------------------------------------------------------------

    def ingest(self, wires: list[Wire]) -> list[tuple[str, str | None]]:
        """Each pulse's (status, id), in request order."""
        outcomes: list[tuple[str, str | None]] = []
        for w in wires:
            outcomes.append((self._one(w), w.pulse_id))
        return outcomes

    def _one(self, w: Wire) -> str:
        if w.flaw is not None:
            return "rejected"
        nanos = EXACT.multiply(w.amount, Decimal(10**9))
        if not Decimal(0) <= w.amount < MAX_AMOUNT or nanos != nanos.to_integral_value():
            return "rejected"
        if w.ts is not None and not self.now - LATE_US <= w.ts <= self.now + SKEW_US:
            return "rejected"
        if w.pulse_id is not None:
            if w.pulse_id.startswith(f"srv-{self.store_id}-"):
                return "rejected"
            payload = (w.sku, w.unit, w.amount, w.ts)
            known = self.ids.get((w.tenant, w.pulse_id))
            if known is not None:
                return "duplicate" if known == payload else "conflict"
            self.ids[w.tenant, w.pulse_id] = payload
        ts = self.now if w.ts is None else w.ts
        day = billing_day(w.tenant, ts)
        bucket = self.buckets.setdefault((day, w.tenant, w.sku, w.unit), Bucket())
        bucket.amount = EXACT.add(bucket.amount, w.amount)
        bucket.count += 1
        self.stored.append(Stored(w.tenant, day, w.sku, w.unit, w.pulse_id, w.amount, ts, self.now))
        return "accepted"

    # -- commit -------------------------------------------------------------------

    def open_days(self) -> list[str]:
        return sorted({k[0] for k, b in self.buckets.items() if b.count > b.committed_count})

    def commit_day(self, day: str) -> list[ModelBatch]:
        made: list[ModelBatch] = []
        for partition in range(PARTITIONS):
            initial: list[dict[str, Any]] = []
            correction: list[dict[str, Any]] = []
            for key in sorted(self.buckets):
                b = self.buckets[key]
                if key[0] != day or partition_of(key[1]) != partition:
                    continue
                if b.count == b.committed_count:
                    continue
                record = {
                    "tenant_id": key[1],
                    "product_sku": key[2],
                    "use_unit": key[3],
                    "revision": b.revision + 1,
                    "used_amount": shown(EXACT.subtract(b.amount, b.committed_amount)),
                    "pulse_count": b.count - b.committed_count,
                    "total_amount": shown(b.amount),
                    "total_count": b.count,
                }
                (initial if b.revision == 0 else correction).append(record)
                b.committed_amount, b.committed_count = b.amount, b.count
                b.revision += 1
            for kind, records in (("initial", initial), ("correction", correction)):
                for start in range(0, len(records), MAX_RECORDS):
                    seq = self.seqs.get((partition, day), 0) + 1
                    self.seqs[partition, day] = seq
                    bid = f"{self.store_id}-{day.replace('-', '')}-p{partition:03d}-{seq:05d}"
                    batch = ModelBatch(
                        bid, day, partition, kind, self.now, records[start : start + MAX_RECORDS]
                    )
                    self.batches[bid] = batch
                    made.append(batch)
        return made

    def commit_due(self) -> list[ModelBatch]:
        now = moment(self.now)
        return [
            batch
            for day in self.open_days()
            if day_closes(day) + GRACE <= now
            for batch in self.commit_day(day)
        ]

    # -- delivery -----------------------------------------------------------------

    def due(self) -> list[str]:
        return sorted(b.batch_id for b in self.batches.values() if b.status == "pending" and b.due)

    def answered(self, batch_id: str, outcome: str) -> None:
        """The downstream's answer to one attempt, as the outbox must record it."""
        b = self.batches[batch_id]
        b.attempts += 1
        if outcome == "delivered":
            b.status, b.delivered_at = "delivered", self.now
        elif outcome == "busy":
            b.status, b.due, b.last_error = "pending", False, BUSY
        elif outcome == "refuse":
            b.status, b.last_error = "failed", REFUSED
        else:  # the service stopped while the downstream held it: due again at once
            b.status, b.due, b.last_error = "pending", True, SAID

    def advance(self, seconds: int) -> None:
        self.now += seconds * 1_000_000
        for b in self.batches.values():
            b.due = True  # every backoff (at most RETRY_MAX_S) has run out


def summary(batch: ModelBatch) -> dict[str, Any]:
    return {
        "batch_id": batch.batch_id,
        "kind": batch.kind,
        "partition": batch.partition,
        "record_count": len(batch.records),
        "used_amount": shown(batch.amount),
    }


# -- the downstream -----------------------------------------------------------------------


class Downstream:
    """A billing system receiving batches: it answers only while it is let to
    (`open`), may be told to answer "later" or to refuse, and keeps every body
    it took."""

    name = "downstream"

    def __init__(self) -> None:
        self.answers: list[tuple[str, str]] = []  # (batch id, outcome), in order
        self.bodies: dict[str, list[bytes]] = {}
        self.troubles: list[str] = []
        self._gate = trio.Event()

    def open(self) -> None:
        self._gate.set()

    def close(self) -> None:
        if self._gate.is_set():
            self._gate = trio.Event()

    async def deliver(self, batch_id: str, day: str, body: bytes) -> None:
        try:
            await self._gate.wait()
        except trio.Cancelled:
            self.answers.append((batch_id, "stopped"))
            raise
        if self.troubles:
            trouble = self.troubles.pop(0)
            self.answers.append((batch_id, trouble))
            if trouble == "busy":
                raise SinkRetryable(BUSY)
            raise SinkRejected(REFUSED)
        self.answers.append((batch_id, "delivered"))
        self.bodies.setdefault(batch_id, []).append(body)

    async def aclose(self) -> None:
        return None


# -- playing an example -----------------------------------------------------------------


class Example:
    def __init__(self, settings: Settings, steps: list[Step]) -> None:
        self.settings = settings
        self.steps = steps
        self.clock = FakeClock(START)
        self.model = Model(self.clock.now_us)
        self.downstream = Downstream()
        self.exits: AsyncExitStack | None = None
        self.runtime: Runtime
        self.client: Client
        self.heard = 0  # the downstream's answers the model has taken in
        self.contents: dict[str, dict[str, Any]] = {}  # each batch as first read
        self.trail_ids: dict[int, str] = {}  # index in model.stored -> the id the trail gave
        self.touched: set[tuple[str, str]] = set()  # (tenant, day) whose pulses changed
        self.aggregates: list[dict[str, Any]] = []  # GET /aggregates, as last read

    async def play(self) -> None:
        try:
            await self.start()
            for number, step in enumerate(self.steps):
                await self.do(step)
                self.take_answers()
                await self.check(full=isinstance(step, Restart), after=f"step {number}: {step}")
            await self.check(full=True, after="the last step")
        finally:
            await self.stop()

    async def start(self) -> None:
        self.exits = AsyncExitStack()
        self.runtime = await self.exits.enter_async_context(
            open_service(self.settings, sink=self.downstream, clock=self.clock)
        )
        self.client = create_app(self.runtime).test_client()
        response = await self.client.get("/readyz")
        assert response.status_code == 200
        store_id = (await response.get_json())["store_id"]
        if self.model.store_id:
            assert store_id == self.model.store_id, "a restart must keep the store's id"
        self.model.store_id = store_id

    async def stop(self) -> None:
        if self.exits is not None:
            exits, self.exits = self.exits, None
            await exits.aclose()

    def take_answers(self) -> None:
        for batch_id, outcome in self.downstream.answers[self.heard :]:
            self.model.answered(batch_id, outcome)
        self.heard = len(self.downstream.answers)

    # -- steps --------------------------------------------------------------------

    async def do(self, step: Step) -> None:
        if isinstance(step, Send):
            await self.send(step)
        elif isinstance(step, Commit):
            await self.commit(step)
        elif isinstance(step, Tick):
            made = await self.runtime.committer.commit_due()
            expected = [summary(b) for b in self.model.commit_due()]
            assert [msgspec.to_builtins(b) for b in made] == expected
        elif isinstance(step, Advance):
            self.clock.advance(step.seconds)
            self.model.advance(step.seconds)
        elif isinstance(step, Trouble):
            self.downstream.troubles.extend([step.kind] * step.times)
        elif isinstance(step, Deliver):
            await self.deliver()
        elif isinstance(step, Redeliver):
            await self.redeliver(step)
        else:
            await self.stop()
            self.take_answers()  # deliveries the stop cut short
            await self.start()

    def wire(self, spec: PulseSpec) -> Wire:
        """The pulse `spec` stands for, given what was sent before."""
        tenant, sku, unit, amount = spec.tenant, spec.sku, spec.unit, spec.amount
        pulse_id: str | None = None
        ts: int | None = None
        stamp_text: str | None = None
        if spec.stamp is not None and spec.stamp[0] == "day":
            _, back, which = spec.stamp
            date = moment(self.model.now).date() - dt.timedelta(days=back)
            stamp_text = date.isoformat() + TIMES[which][0]
            midnight = dt.datetime.combine(date, dt.time(), tzinfo=dt.UTC)
            ts = epoch_us(midnight + TIMES[which][1])
        elif spec.stamp is not None and spec.stamp[0] == "edge":
            ts = self.model.now + EDGES[spec.stamp[1]] * 1_000_000
        elif spec.stamp is not None:
            committed = sorted(k for k, b in self.model.buckets.items() if b.revision)
            if committed:
                day, tenant, sku, unit = committed[spec.stamp[1] % len(committed)]
                noon = dt.datetime.combine(dt.date.fromisoformat(day), dt.time(12))
                ts = epoch_us(noon.replace(tzinfo=ZONE_OF[tenant]))
        ident = spec.ident
        held = list(self.model.ids.items())  # the ids the store holds, oldest first
        if ident is not None and ident[0] == "again" and not held:
            ident = ("new", IDS[ident[1] % len(IDS)])
        if ident is not None and ident[0] == "new":
            pulse_id = ident[1]
        elif ident is not None and ident[0] == "again":
            _, k, change = ident
            (tenant, pulse_id), (sku, unit, amount, ts) = held[k % len(held)]
            stamp_text = None
            if change == "amount":
                amount = amount + 1 if amount + 1 < MAX_AMOUNT else amount - 1
            elif change == "sku":
                sku = SKUS[1 - SKUS.index(sku)]
            elif change == "stamp":
                ts = self.model.now - 1_000_000 if ts is None else ts - 1_000_000
        elif ident is not None:
            trail = sorted(self.trail_ids.values())
            pulse_id = (
                trail[ident[1] % len(trail)] if trail else f"srv-{self.model.store_id}-{ident[1]}"
            )
        if ts is not None and stamp_text is None:
            stamp_text = moment(ts).isoformat().replace("+00:00", "Z")
        fields = [
            f'"tenant_id": {json.dumps(tenant)}',
            f'"product_sku": {json.dumps(sku)}',
            f'"use_unit": {json.dumps(unit)}',
            f'"used_amount": {spelled(amount, spec.spelling, spec.flaw)}',
        ]
        if pulse_id is not None:
            fields.append(f'"id": {json.dumps(pulse_id)}')
        if stamp_text is not None:
            fields.append(f'"timestamp": "{stamp_text}"')
        if spec.flaw == "unknown":
            fields.append('"colour": "blue"')
        text = "{" + ", ".join(fields) + "}"
        return Wire(text, tenant, sku, unit, amount, pulse_id, ts, spec.flaw)

    async def send(self, step: Send) -> None:
        wires = [self.wire(spec) for spec in step.pulses]
        form = "array" if step.form == "single" and len(wires) > 1 else step.form
        if form == "ndjson":
            body, headers = "\n".join(w.text for w in wires) + "\n", NDJSON
        elif form == "array":
            body, headers = "[" + ", ".join(w.text for w in wires) + "]", JSON
        else:
            body, headers = wires[0].text, JSON
        stored_before = len(self.model.stored)
        outcomes = self.model.ingest(wires)
        for s in self.model.stored[stored_before:]:
            self.touched.add((s.tenant, s.day))
        response = await self.client.post("/pulses", data=body.encode(), headers=headers)
        answer = await response.get_json()
        items = [
            {"index": i, "status": status, **({"id": pid} if pid is not None else {})}
            for i, (status, pid) in enumerate(outcomes)
            if status != "accepted"
        ]
        counted = [status for status, _ in outcomes]
        where = f"{body}\n-> {response.status_code} {answer}"
        if form == "single" and items and items[0]["status"] in ("rejected", "conflict"):
            refused = items[0]["status"] == "rejected"
            assert response.status_code == (422 if refused else 409), where
            assert answer["error"]["code"] == ("invalid_pulse" if refused else "conflict"), where
            assert _without_errors(answer["error"]["details"]["items"]) == items, where
            return
        assert response.status_code == 202, where
        assert {k: answer[k] for k in ("accepted", "duplicates", "conflicts", "rejected")} == {
            "accepted": counted.count("accepted"),
            "duplicates": counted.count("duplicate"),
            "conflicts": counted.count("conflict"),
            "rejected": counted.count("rejected"),
        }, where
        assert _without_errors(answer["items"]) == items, where

    async def commit(self, step: Commit) -> None:
        day = moment(self.model.now).date() - dt.timedelta(days=step.back)
        if step.in_query:
            response = await self.client.post(f"/aggregates/commit?date={day.isoformat()}")
        else:
            response = await self.client.post(
                "/aggregates/commit", data=json.dumps({"date": day.isoformat()}), headers=JSON
            )
        answer = await response.get_json()
        if day > self.model.today():
            assert response.status_code == 422, answer
            assert answer["error"]["code"] == "future_date"
            return
        expected = [summary(b) for b in self.model.commit_day(day.isoformat())]
        assert response.status_code == 200, answer
        assert answer == {"date": day.isoformat(), "batches": expected}

    async def deliver(self) -> None:
        """Every batch due is attempted exactly once: by the deliverer's own
        pass (woken by a commit, and held by the downstream until now) or by
        this one."""
        due = self.model.due()
        heard = len(self.downstream.answers)
        self.downstream.open()
        try:
            while await self.runtime.deliverer.deliver_due() >= 100:
                pass
        finally:
            self.downstream.close()
        attempted = sorted(batch_id for batch_id, _ in self.downstream.answers[heard:])
        assert attempted == due

    async def redeliver(self, step: Redeliver) -> None:
        failed = sorted(b for b, v in self.model.batches.items() if v.status == "failed")
        every = sorted(self.model.batches)
        pool = failed if step.failed and failed else every
        batch_id = pool[step.pick % len(pool)] if pool else f"{self.model.store_id}-none"
        response = await self.client.post(f"/batches/{batch_id}/redeliver")
        answer = await response.get_json()
        batch = self.model.batches.get(batch_id)
        if batch is None:
            assert response.status_code == 404, answer
        elif batch.status != "failed":
            assert response.status_code == 409, answer
            assert answer["error"]["code"] == "not_failed"
        else:
            assert response.status_code == 200, answer
            assert answer["status"] == "pending"
            batch.status, batch.due = "pending", True

    # -- what must hold after every step ------------------------------------------

    async def check(self, *, full: bool, after: str) -> None:
        try:
            await self.check_aggregates()
            await self.check_outbox(full)
            await self.check_trail(full)
        except AssertionError as exc:
            raise AssertionError(f"after {after}: {exc}") from exc

    async def pages(self, path: str, key: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            url = path if cursor is None else f"{path}&cursor={cursor}"
            response = await self.client.get(url)
            assert response.status_code == 200, url
            page = await response.get_json()
            found.extend(page[key])
            cursor = page["next_cursor"]
            if cursor is None:
                return found

    async def check_aggregates(self) -> None:
        listed = await self.pages("/aggregates?limit=7", "aggregates")
        expected: list[dict[str, Any]] = [
            {
                "tenant_id": tenant,
                "product_sku": sku,
                "use_unit": unit,
                "date": day,
                "used_amount": shown(b.amount),
                "pulse_count": b.count,
                "committed_amount": shown(b.committed_amount),
                "committed_count": b.committed_count,
                "revision": b.revision,
            }
            for (day, tenant, sku, unit), b in sorted(self.model.buckets.items())
        ]
        assert listed == expected
        # "open": the buckets with usage no batch carries yet.
        still_open = await self.pages("/aggregates?status=open&limit=1000", "aggregates")
        assert still_open == [a for a in expected if a["pulse_count"] > a["committed_count"]]
        self.aggregates = listed

    async def check_outbox(self, full: bool) -> None:
        model = self.model
        listed = await self.pages("/batches?limit=5", "batches")
        assert [(v["date"], v["batch_id"]) for v in listed] == sorted(
            (b.day, b.batch_id) for b in model.batches.values()
        )
        for view in listed:
            b = model.batches[view["batch_id"]]
            where = f"batch {b.batch_id}: {view}"
            assert view["store_id"] == model.store_id, where
            assert (view["kind"], view["partition"], view["date"]) == (
                b.kind,
                b.partition,
                b.day,
            ), where
            assert view["record_count"] == len(b.records), where
            assert view["used_amount"] == shown(b.amount), where
            assert parse_time(view["created_at"]) == b.created, where
            assert (view["status"], view["attempts"]) == (b.status, b.attempts), where
            assert (view["next_attempt_at"] is not None) == (b.status == "pending"), where
            if b.status == "delivered":
                assert parse_time(view["delivered_at"]) == b.delivered_at, where
            else:
                assert view["delivered_at"] is None, where
            if b.status != "delivered" and b.last_error is SAID:
                assert isinstance(view["last_error"], str), where
                assert view["last_error"], where
            elif b.status != "delivered":
                assert view["last_error"] == b.last_error, where
            if full or b.batch_id not in self.contents:
                await self.read_batch(b)
        # Each bucket's history, from the service's own batches.
        history: dict[Key, list[dict[str, Any]]] = {}
        for content in self.contents.values():
            for r in content["records"]:
                key = (content["date"], r["tenant_id"], r["product_sku"], r["use_unit"])
                history.setdefault(key, []).append(r)
        aggregates = {
            (a["date"], a["tenant_id"], a["product_sku"], a["use_unit"]): a for a in self.aggregates
        }
        for key, records in history.items():
            records.sort(key=lambda r: int(r["revision"]))
            assert [r["revision"] for r in records] == list(range(1, len(records) + 1)), key
            amount, count = Decimal(0), 0
            for r in records:
                amount = EXACT.add(amount, Decimal(r["used_amount"]))
                count += r["pulse_count"]
                assert (Decimal(r["total_amount"]), r["total_count"]) == (amount, count), key
            bucket = aggregates[key]
            assert (Decimal(bucket["committed_amount"]), bucket["committed_count"]) == (
                amount,
                count,
            ), key
            assert bucket["revision"] == len(records), key
        for key, bucket in aggregates.items():
            if bucket["revision"] == 0:
                assert key not in history, key
        # What the downstream holds: each batch once, as the outbox shows it.
        for batch_id, bodies in self.downstream.bodies.items():
            assert all(body == bodies[0] for body in bodies), f"{batch_id} sent with two bodies"
            assert json.loads(bodies[0]) == self.contents[batch_id], batch_id
            assert model.batches[batch_id].status == "delivered", batch_id

    async def read_batch(self, b: ModelBatch) -> None:
        response = await self.client.get(f"/batches/{b.batch_id}")
        assert response.status_code == 200
        view = await response.get_json()
        assert view["records"] == b.records, b.batch_id
        content = {k: v for k, v in view.items() if k not in DELIVERY_STATE}
        first = self.contents.setdefault(b.batch_id, content)
        assert content == first, f"batch {b.batch_id} changed"

    async def check_trail(self, full: bool) -> None:
        trails: dict[tuple[str, str], list[tuple[int, Stored]]] = {}
        for index, s in enumerate(self.model.stored):
            trails.setdefault((s.tenant, s.day), []).append((index, s))
        pairs = sorted(trails) if full else sorted(self.touched)
        self.touched = set()
        for tenant, day in pairs:
            listed = await self.pages(f"/pulses?tenant_id={tenant}&date={day}&limit=4", "pulses")
            expected = trails.get((tenant, day), [])
            assert len(listed) == len(expected), (tenant, day, listed)
            for pulse, (index, s) in zip(listed, expected, strict=True):
                where = f"{tenant} {day}: {pulse}"
                assert (pulse["tenant_id"], pulse["date"]) == (tenant, day), where
                assert (pulse["product_sku"], pulse["use_unit"]) == (s.sku, s.unit), where
                assert pulse["used_amount"] == shown(s.amount), where
                assert parse_time(pulse["timestamp"]) == s.ts, where
                assert parse_time(pulse["received_at"]) == s.received, where
                assert pulse["id_assigned"] == (s.pulse_id is None), where
                if s.pulse_id is not None:
                    assert pulse["id"] == s.pulse_id, where
                else:
                    assert pulse["id"].startswith(f"srv-{self.model.store_id}-"), where
                    known = self.trail_ids.setdefault(index, pulse["id"])
                    assert pulse["id"] == known, f"{where}: its id was {known}"
        assigned = list(self.trail_ids.values())
        assert len(set(assigned)) == len(assigned), "two pulses under one assigned id"


def spelled(amount: Decimal, spelling: str, flaw: str | None) -> str:
    """The JSON of an amount as a client may write it."""
    if flaw == "negative":
        return '"-1"'
    if flaw == "precise":
        return "0.0000000001"
    if flaw == "huge":
        return '"1000000000000000000"'
    plain = f"{amount:f}"
    if spelling == "string":
        return json.dumps(plain)
    if spelling == "padded":  # trailing zeros, up to nine decimals
        whole, _, fraction = plain.partition(".")
        return f"{whole}.{fraction.ljust(9, '0')}"
    if spelling == "exponent":
        return f"{amount:e}"
    return plain


def _without_errors(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A report's items less their reasons: a rejected one must give one, others none."""
    stripped = []
    for answered in items:
        item = dict(answered)
        error = item.pop("error", None)
        assert (error is not None) == (item["status"] == "rejected"), answered
        assert error is None or (isinstance(error, str) and error), answered
        stripped.append(item)
    return stripped


# -- the stores ---------------------------------------------------------------------------


def as_url(conninfo: str) -> str:
    """A `postgresql://` URL for a libpq connection string (the setting takes URLs)."""
    parts = conninfo_to_dict(conninfo)
    user = urllib.parse.quote(str(parts.get("user", "postgres")))
    password = parts.get("password")
    auth = user if password is None else f"{user}:{urllib.parse.quote(str(password))}"
    host = parts.get("host", "127.0.0.1")
    port = parts.get("port", 5432)
    url = f"postgresql://{auth}@{host}:{port}/{parts['dbname']}"
    if "options" in parts:
        url += "?" + urllib.parse.urlencode({"options": parts["options"]}, quote_via=quote)
    return url


@contextlib.contextmanager
def service_settings(kind: str, database: str | None) -> Iterator[Settings]:
    """The settings of a service on a new, empty store of `kind`; the store is gone after."""
    tmp = Path(tempfile.mkdtemp(prefix="service-model-"))
    try:
        store = "sqlite"
        with contextlib.ExitStack() as exits:
            if kind == "postgres":
                assert database is not None
                store = as_url(exits.enter_context(new_schema(database)))
            yield load_settings(
                environ={},
                data_dir=str(tmp / "data"),
                store=store,
                partitions=PARTITIONS,
                durability="os",
                tenant_timezones=ZONES,
                commit_interval=3600,
                batch_max_records=MAX_RECORDS,
                retry_initial=1,
                retry_max=RETRY_MAX_S,
                store_pool_size=4,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def play(kind: str, database: str | None, steps: list[Step]) -> None:
    with service_settings(kind, database) as config:
        trio.run(Example(config, steps).play, clock=trio.testing.MockClock())


def pulse(tenant: str = "acme", amount: str = "1", **fields: Any) -> PulseSpec:
    spec = PulseSpec(tenant, "sku1", "api_call", Decimal(amount), "string", None, None, None)
    return dataclasses.replace(spec, **fields)


# A day's life with every kind of step: usage, a commit, late usage and its
# correction, replays, a billing system that is busy, then refuses, then holds
# a batch while the service restarts; a redelivery and the next day's tick.
A_DAY = [
    Send((pulse(), pulse("globex", "0.5", ident=("new", "r1"))), "array"),
    Send((pulse("initech", "999999999999999999.999999999", stamp=("day", 1, 2)),), "ndjson"),
    Commit(0, in_query=False),
    Send(
        (pulse(amount="2.25", stamp=("late", 0)), pulse("globex", "0.5", ident=("again", 0, None))),
        "ndjson",
    ),
    Send((pulse("globex", "7", ident=("again", 0, "amount")),), "single"),
    Commit(0, in_query=True),
    Commit(0, in_query=True),
    Trouble("busy", 1),
    Deliver(),
    Trouble("refuse", 1),
    Advance(10),
    Deliver(),
    Redeliver(0, failed=True),
    Send((pulse(ident=("trail", 0)),), "single"),
    Restart(),
    Deliver(),
    Advance(86400),
    Tick(),
    Deliver(),
]


# Examples a store: the file runs in about half a minute on two cores. SERVICE_EXAMPLES
# runs a longer campaign.
EXAMPLES = {"sqlite": 30, "postgres": 15}


@pytest.fixture(params=["sqlite", "postgres"])
def store_kind(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    if request.param == "postgres":
        return "postgres", request.getfixturevalue("postgres_database")
    return "sqlite", None


def test_the_service_bills_what_the_model_bills_through_its_api(
    store_kind: tuple[str, str | None],
) -> None:
    """Every step a client, an operator, the billing system or a restart may
    take, in any order; after each, the service's every answer agrees with the
    model's. What it tries to break: a pulse counted twice or not at all, a
    total that drifts from its batches, a correction that skips or repeats a
    revision, a batch that changes or reaches the billing system twice with
    other content, anything lost or repeated across a restart."""
    kind, database = store_kind

    @settings(
        max_examples=int(os.environ.get("SERVICE_EXAMPLES", EXAMPLES[kind])),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    )
    @given(steps=STEPS)
    @example(steps=A_DAY)
    def run(steps: list[Step]) -> None:
        play(kind, database, steps)

    run()
