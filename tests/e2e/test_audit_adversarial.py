"""An auditor reconciles every view of the money (DESIGN §3, §4).

For each tenant, SKU, unit and billing day, four views must agree to the
nano-unit and to the pulse:

1. what clients were told was stored (each pulse's status in a 2xx answer),
   kept by `Ledger` or, where tenants bill in zones of their own, by the
   test with the billing day written out by hand;
2. GET /pulses, every stored pulse, paged with cursors;
3. GET /aggregates, each bucket's total and its committed part;
4. the batches: GET /batches (whole, and by day and status), GET
   /batches/{id}, and what the sink received (files, the bodies an HTTP
   receiver got, or a JetStream stream's messages): revisions 1..n whose
   deltas add up to the committed part, each batch's own sums matching its
   records, no empty or negative delta, each batch delivered with the bytes
   the outbox holds.

The existing suites check each view alone or in process; these tests attack
the seams between them with real servers: pages read while clients write and
the same day is committed over and over (SQLite with two workers, and
PostgreSQL); three reads of the outbox and the totals around each commit; the
largest amounts in one bucket and one batch, with a SIGKILL right after their
commit; a client id shaped like one the server hands out; tenants in zones
far from UTC on the days their clocks change, committed by the periodic
committer under a fake clock; ids raced by several clients, replayed across
SIGKILL and SIGTERM while the day's batches wait for a receiver that is down;
cursors carried across a restart.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import random
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import trio

from ingestor.partition import partition_of
from tests.e2e.cluster_support import (
    NATS_URL,
    fresh_database,
    fresh_stream,
    require_nats,
    require_postgres,
)
from tests.e2e.conftest import ABORTED_UPLOADS, StartServer
from tests.e2e.test_weeks_adversarial import ServerClock
from tests.faults.sink_target import SinkTarget
from tests.support.server import (
    BucketKey,
    Form,
    Ledger,
    Payload,
    Sent,
    ServerProcess,
    Total,
    collect_pages,
    day_before,
    exact_sum,
    outbox_problems,
    send_pulses,
    totals_of,
    wait_until,
)

pytestmark = [pytest.mark.e2e, *ABORTED_UPLOADS]

DELIVERY_STATE = {"status", "attempts", "last_error", "next_attempt_at", "delivered_at"}
MAX = "999999999999999999.999999999"  # 18 integer digits, 9 fractional: the largest amount
NANO = "0.000000001"
PLAIN_DECIMAL = re.compile(r"\A[0-9]+(\.[0-9]*[1-9])?\Z")  # no exponent, no trailing zero
SECRET = "audit-adversarial-secret"
PARTITIONS = 16  # the default


# -- pulses and requests -------------------------------------------------------------


def pulse(
    tenant: str,
    amount: str | int | Decimal,
    *,
    sku: str = "sku",
    unit: str = "call",
    pulse_id: str | None = None,
    timestamp: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "tenant_id": tenant,
        "product_sku": sku,
        "use_unit": unit,
        "used_amount": amount,
    }
    if pulse_id is not None:
        body["id"] = pulse_id
    if timestamp is not None:
        body["timestamp"] = timestamp
    return body


def amount_of(rng: random.Random) -> str:
    """A decimal with up to nine fractional digits, as a string."""
    return f"{Decimal(rng.randint(1, 10**12)).scaleb(-rng.randint(0, 9)):f}"


def moment_in(day: str, rng: random.Random) -> str:
    midnight = dt.datetime.combine(dt.date.fromisoformat(day), dt.time(), dt.UTC)
    return (midnight + dt.timedelta(microseconds=rng.randrange(86_400 * 10**6))).isoformat()


def same_partition(count: int, prefix: str) -> list[str]:
    """`count` tenant names that share one partition: their buckets meet in one batch."""
    names: dict[int, list[str]] = defaultdict(list)
    for n in range(10_000):
        name = f"{prefix}{n}"
        found = names[partition_of(name, PARTITIONS)]
        found.append(name)
        if len(found) == count:
            return found
    raise AssertionError("no partition holds enough of the names")


async def post(
    http: httpx.AsyncClient,
    server_url: str,
    ledger: Ledger,
    payloads: Sequence[Payload],
    form: Form = "array",
) -> Sent:
    """POST pulses, record the answer, and insist on a 202 (or 409 for a lone conflict)."""
    sent = await send_pulses(http, server_url, ledger, payloads, form)
    assert sent.response is not None, sent.error
    assert sent.response.status_code in (202, 409), sent.response.text
    return sent


# -- reading every view --------------------------------------------------------------


async def all_aggregates(
    http: httpx.AsyncClient, url: str, params: Mapping[str, str] | None = None, *, limit: int = 7
) -> list[dict[str, Any]]:
    return await collect_pages(http, f"{url}/aggregates", "aggregates", params, limit=limit)


class Outbox:
    """The outbox as GET /batches and GET /batches/{id} show it; a batch's records
    never change, so each batch is opened once, its delivery state read anew."""

    def __init__(self, http: httpx.AsyncClient, url: str) -> None:
        self.http = http
        self.url = url
        self.records: dict[str, list[dict[str, Any]]] = {}

    async def views(self, **params: str) -> list[dict[str, Any]]:
        listed = await collect_pages(self.http, f"{self.url}/batches", "batches", params, limit=50)
        ids = [view["batch_id"] for view in listed]
        assert len(ids) == len(set(ids)), f"GET /batches lists a batch twice: {ids}"
        views = []
        for view in listed:
            if view["batch_id"] not in self.records:
                full = await self.open(view["batch_id"])
                self.records[view["batch_id"]] = full["records"]
            views.append({**view, "records": self.records[view["batch_id"]]})
        return views

    async def open(self, batch_id: str) -> dict[str, Any]:
        response = await self.http.get(f"{self.url}/batches/{batch_id}")
        assert response.status_code == 200, response.text
        view: dict[str, Any] = response.json()
        return view


def batch_problems(views: Sequence[Mapping[str, Any]]) -> list[str]:
    """What is wrong inside each batch, and between a bucket's batches."""
    problems = []
    by_bucket: dict[BucketKey, list[Mapping[str, Any]]] = defaultdict(list)
    for view in views:
        name = view["batch_id"]
        records = view["records"]
        if view["record_count"] != len(records):
            problems.append(f"{name}: record_count {view['record_count']}, {len(records)} records")
        total = exact_sum(Decimal(r["used_amount"]) for r in records)
        if Decimal(view["used_amount"]) != total:
            problems.append(f"{name}: used_amount {view['used_amount']}, its records sum {total}")
        for value in [view["used_amount"]] + [
            r[k] for r in records for k in ("used_amount", "total_amount")
        ]:
            if not PLAIN_DECIMAL.match(value):
                problems.append(f"{name}: amount {value!r} is not a plain decimal")
        for record in records:
            key = (record["tenant_id"], record["product_sku"], record["use_unit"], view["date"])
            by_bucket[key].append(record)
            first = record["revision"] == 1
            if (view["kind"] == "initial") != first:
                problems.append(f"{name} ({view['kind']}) holds revision {record['revision']}")
            if record["pulse_count"] < 1 or Decimal(record["used_amount"]) < 0:
                problems.append(f"{name}: an empty or negative delta {record}")
    for key, records in by_bucket.items():
        records.sort(key=lambda r: int(r["revision"]))
        amount, count = Decimal(0), 0
        for record in records:
            amount = exact_sum([amount, Decimal(record["used_amount"])])
            count += record["pulse_count"]
            if (Decimal(record["total_amount"]), record["total_count"]) != (amount, count):
                problems.append(
                    f"{key} revision {record['revision']}: total {record['total_amount']}"
                    f" in {record['total_count']}, its deltas so far add up to {amount} in {count}"
                )
    return problems


def committed_of(rows: Sequence[Mapping[str, Any]]) -> dict[BucketKey, Total]:
    return {
        (r["tenant_id"], r["product_sku"], r["use_unit"], r["date"]): Total(
            Decimal(r["committed_amount"]), r["committed_count"]
        )
        for r in rows
    }


def delta_sums(views: Sequence[Mapping[str, Any]]) -> dict[BucketKey, tuple[Total, int]]:
    """Per bucket: the deltas its batches carry, and how many revisions."""
    amounts: dict[BucketKey, list[Decimal]] = defaultdict(list)
    counts: Counter[BucketKey] = Counter()
    revisions: Counter[BucketKey] = Counter()
    for view in views:
        for r in view["records"]:
            key = (r["tenant_id"], r["product_sku"], r["use_unit"], view["date"])
            amounts[key].append(Decimal(r["used_amount"]))
            counts[key] += r["pulse_count"]
            revisions[key] += 1
    return {k: (Total(exact_sum(v), counts[k]), revisions[k]) for k, v in amounts.items()}


def files_in(deliveries: Path) -> dict[str, dict[str, Any]]:
    found = {}
    if deliveries.exists():
        for path in deliveries.glob("*/*.json"):
            found[path.stem] = json.loads(path.read_bytes())
    return found


async def audit(
    http: httpx.AsyncClient,
    url: str,
    expected: Mapping[BucketKey, Total],
    *,
    client_ids: Mapping[tuple[str, str], set[str]] | None = None,
    deliveries: Path | None = None,
    received: Mapping[str, set[bytes]] | None = None,
) -> list[str]:
    """Every way the four views disagree, with each other and with `expected`
    (what the answers say is stored). `client_ids`: the ids each (tenant, day)
    must list. Batches must all be delivered: to `deliveries` (the file sink)
    or, as `received` (bodies by batch id), to an HTTP receiver."""
    problems: list[str] = []
    rows = await all_aggregates(http, url)
    held = totals_of(rows)
    for key in sorted(held.keys() | expected.keys()):
        if held.get(key) != expected.get(key):
            problems.append(f"{key}: GET /aggregates {held.get(key)}, answers {expected.get(key)}")

    listed: dict[BucketKey, list[Decimal]] = defaultdict(list)
    for tenant, day in sorted({(k[0], k[3]) for k in held.keys() | expected.keys()}):
        pulses = await collect_pages(
            http, f"{url}/pulses", "pulses", {"tenant_id": tenant, "date": day}, limit=6
        )
        ids = Counter(p["id"] for p in pulses)
        twice = sorted(i for i, n in ids.items() if n > 1)
        if twice:
            problems.append(f"GET /pulses {tenant} {day}: ids listed more than once: {twice}")
        for p in pulses:
            if (p["tenant_id"], p["date"]) != (tenant, day):
                problems.append(f"GET /pulses {tenant} {day} lists {p}")
            listed[(tenant, p["product_sku"], p["use_unit"], day)].append(Decimal(p["used_amount"]))
        if client_ids is not None:
            given = {p["id"] for p in pulses if not p["id_assigned"]}
            want = client_ids.get((tenant, day), set())
            if given != want:
                problems.append(
                    f"GET /pulses {tenant} {day}: client ids {sorted(given - want)} listed but"
                    f" not acknowledged, {sorted(want - given)} acknowledged but not listed"
                )
    trail = {k: Total(exact_sum(v), len(v)) for k, v in listed.items()}
    for key in sorted(trail.keys() | held.keys()):
        if trail.get(key) != held.get(key):
            problems.append(
                f"{key}: GET /pulses adds up to {trail.get(key)}, GET /aggregates {held.get(key)}"
            )

    problems += await filter_problems(http, url, rows)
    outbox = Outbox(http, url)
    views = await outbox.views()
    problems += batch_problems(views)
    problems += await batch_filter_problems(http, url, views)
    committed = committed_of(rows)
    problems += outbox_problems(views, committed)
    carried = delta_sums(views)
    for row in rows:
        key = (row["tenant_id"], row["product_sku"], row["use_unit"], row["date"])
        revisions = carried.get(key, (Total(Decimal(0), 0), 0))[1]
        if row["revision"] != revisions:
            problems.append(f"{key}: revision {row['revision']}, {revisions} batches carry it")
    for view in views:
        if view["status"] != "delivered":
            problems.append(f"{view['batch_id']} is {view['status']}: {view['last_error']}")
    bodies = {
        view["batch_id"]: {k: v for k, v in view.items() if k not in DELIVERY_STATE}
        for view in views
    }
    if deliveries is not None:
        files = files_in(deliveries)
        if files.keys() != bodies.keys():
            problems.append(
                f"the sink holds files {sorted(files.keys() - bodies.keys())} of no batch;"
                f" batches {sorted(bodies.keys() - files.keys())} have no file"
            )
        for batch_id, body in files.items():
            if batch_id in bodies and body != bodies[batch_id]:
                problems.append(f"{batch_id}: the delivered file is not the batch")
    if received is not None:
        if received.keys() != bodies.keys():
            problems.append(
                f"the receiver got {sorted(received.keys() - bodies.keys())} of no batch;"
                f" batches {sorted(bodies.keys() - received.keys())} never reached it"
            )
        for batch_id, seen in received.items():
            if len(seen) != 1:
                problems.append(f"{batch_id} reached the receiver with {len(seen)} bodies")
            for raw in seen:
                if batch_id in bodies and json.loads(raw) != bodies[batch_id]:
                    problems.append(f"{batch_id}: the body received is not the batch")
    return problems


def bucket_of(row: Mapping[str, Any]) -> BucketKey:
    return (row["tenant_id"], row["product_sku"], row["use_unit"], row["date"])


async def filter_problems(
    http: httpx.AsyncClient, url: str, rows: Sequence[Mapping[str, Any]]
) -> list[str]:
    """GET /aggregates read through its filters gives the same rows as unfiltered:
    open and committed split the buckets, each tenant's, SKU's, unit's and day's
    rows are theirs of the whole listing."""
    problems = []
    whole = {bucket_of(r): dict(r) for r in rows}
    parts: dict[str, dict[BucketKey, dict[str, Any]]] = {}
    for status in ("open", "committed"):
        found = await all_aggregates(http, url, {"status": status}, limit=4)
        parts[status] = {bucket_of(r): r for r in found}
    if parts["open"].keys() & parts["committed"].keys():
        problems.append(f"open and committed both list {parts['open'].keys() & parts['committed']}")
    for status, part in parts.items():
        for key, row in part.items():
            if whole.get(key) != row:
                problems.append(f"status={status} shows {row}, unfiltered {whole.get(key)}")
        for key, row in whole.items():
            is_open = row["pulse_count"] > row["committed_count"]
            if (key in part) != (is_open == (status == "open")):
                problems.append(f"{key} ({row}) is wrongly in or out of status={status}")
    for index, name in ((0, "tenant_id"), (1, "product_sku"), (2, "use_unit")):
        for value in sorted({key[index] for key in whole}):
            listed = await all_aggregates(http, url, {name: value}, limit=5)
            want = [r for k, r in whole.items() if k[index] == value]
            if sorted(map(bucket_of, listed)) != sorted(map(bucket_of, want)) or any(
                whole.get(bucket_of(r)) != r for r in listed
            ):
                problems.append(f"GET /aggregates?{name}={value} differs from the whole listing")
    for day in sorted({key[3] for key in whole}):
        listed = await all_aggregates(http, url, {"from": day, "to": day}, limit=5)
        if [bucket_of(r) for r in listed] != [k for k in whole if k[3] == day]:
            problems.append(f"GET /aggregates?from={day}&to={day} differs from the whole listing")
    return problems


async def batch_filter_problems(
    http: httpx.AsyncClient, url: str, views: Sequence[Mapping[str, Any]]
) -> list[str]:
    """GET /batches by day and by status lists what the whole listing holds of them."""
    problems = []
    whole = {v["batch_id"]: v for v in views}
    for day in sorted({v["date"] for v in views}):
        listed = await collect_pages(http, f"{url}/batches", "batches", {"date": day}, limit=3)
        if [v["batch_id"] for v in listed] != [b for b, v in whole.items() if v["date"] == day]:
            problems.append(f"GET /batches?date={day} differs from the whole listing")
    for status in ("pending", "delivered", "failed"):
        listed = await collect_pages(http, f"{url}/batches", "batches", {"status": status}, limit=3)
        want = {b for b, v in whole.items() if v["status"] == status}
        if {v["batch_id"] for v in listed} != want:
            problems.append(f"GET /batches?status={status} differs from the whole listing")
    return problems


async def all_delivered(http: httpx.AsyncClient, url: str, within: float = 30) -> None:
    async def done() -> bool:
        views = await collect_pages(http, f"{url}/batches", "batches", limit=100)
        return all(v["status"] == "delivered" for v in views)

    await wait_until(done, within=within, what="every batch delivered")


def client_ids_of(ledger: Ledger) -> dict[tuple[str, str], set[str]]:
    found: dict[tuple[str, str], set[str]] = defaultdict(set)
    for attempt in ledger.stored():
        if attempt.identity is not None:
            found[(attempt.identity[0], ledger.day_of(attempt))].add(attempt.identity[1])
    return dict(found)


# -- stores ---------------------------------------------------------------------------


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    with fresh_database(require_postgres()) as url:
        yield url


@contextlib.asynccontextmanager
async def serving(
    store: str, start_server: StartServer, tmp_path: Path, **env: str
) -> AsyncIterator[ServerProcess]:
    """A server on `store`: "sqlite-2-workers" (one data dir, two worker processes
    behind one port), "sqlite", or "postgresql" (a fresh database)."""
    if store == "sqlite-2-workers":
        server = await start_server(INGESTOR_WORKERS="2", INGESTOR_GRACEFUL_TIMEOUT="10", **env)
        codes: list[int] = []
        try:
            yield server
        finally:
            with trio.CancelScope(shield=True):
                if server.running:  # SIGTERM: the supervisor stops its workers
                    codes.append(await server.terminate())
        assert codes == [0], server.tail()
    elif store == "postgresql":
        with postgres() as database:
            server = await start_server(INGESTOR_STORE=database, **env)
            try:
                yield server
            finally:
                await server.aclose()  # before its database is dropped
    else:
        yield await start_server(**env)


# -- 1. pages read while clients write and the day is committed again and again -----


@dataclass
class Race:
    """What the writers, pagers, committers and auditors of one run share."""

    url: str
    ledger: Ledger
    day: str
    tenants: Sequence[str]
    writing: bool = True
    problems: list[str] = field(default_factory=list)
    commit_answers: list[str] = field(default_factory=list)  # batch ids, as answered
    passes: int = 0
    snapshots: int = 0
    assigned: dict[str, tuple[str, str, str, str]] = field(default_factory=dict)
    expect: dict[int, str] = field(default_factory=dict)  # id(payload) -> its status

    def acknowledged_ids(self, tenant: str) -> set[str]:
        return {
            a.identity[1]
            for a in self.ledger.stored()
            if a.identity is not None
            and a.identity[0] == tenant
            and self.ledger.day_of(a) == self.day
        }

    def sent_ids(self, tenant: str) -> set[str]:
        return {
            a.identity[1] for a in self.ledger.attempts if a.identity and a.identity[0] == tenant
        }

    def acknowledged_without_id(self, tenant: str) -> int:
        return sum(
            1
            for a in self.ledger.stored()
            if a.identity is None
            and isinstance(a.payload, Mapping)
            and a.payload["tenant_id"] == tenant
            and self.ledger.day_of(a) == self.day
        )


async def write(race: Race, number: int) -> None:
    """Requests of new pulses (with and without ids, several tenants, so several
    partitions), each with an invalid pulse, a replay of an earlier one and a
    reuse of an earlier id for another amount, in random order: each pulse's
    expected status is noted, to hold its answer to."""
    rng = random.Random(number)
    earlier: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=30.0) as http:
        for request in range(30):
            payloads: list[dict[str, Any]] = []
            for n in range(6):
                made = pulse(
                    rng.choice(race.tenants),
                    amount_of(rng),
                    sku=rng.choice(["api", "gb"]),
                    pulse_id=f"w{number}-{request}-{n}" if n % 3 else None,
                    timestamp=moment_in(race.day, rng),
                )
                race.expect[id(made)] = "accepted"
                payloads.append(made)
            bad = pulse(rng.choice(race.tenants), "1.0000000001", pulse_id=f"w{number}-{request}-x")
            race.expect[id(bad)] = "rejected"
            payloads.append(bad)
            if earlier:
                replay = rng.choice(earlier)
                race.expect[id(replay)] = "duplicate"
                reuse = {**rng.choice(earlier)}
                reuse["used_amount"] = f"{Decimal(reuse['used_amount']) + 1:f}"
                race.expect[id(reuse)] = "conflict"
                payloads += [replay, reuse]
            rng.shuffle(payloads)
            sent = await post(
                http, race.url, race.ledger, payloads, "ndjson" if request % 2 else "array"
            )
            for attempt in sent.attempts:
                assert isinstance(attempt.payload, dict)
                expected = race.expect[id(attempt.payload)]
                if attempt.answer != expected:
                    race.problems.append(
                        f"{attempt.payload} answered {attempt.answer} ({attempt.error}),"
                        f" expected {expected}"
                    )
                if expected == "accepted" and "id" in attempt.payload:
                    earlier.append(attempt.payload)
            await trio.sleep(0.02)


async def page_pulses(race: Race) -> None:
    """Whole passes over each tenant's pulses of the day, while the others work."""
    async with httpx.AsyncClient(timeout=30.0) as http:
        while True:
            last = not race.writing
            for tenant in race.tenants:
                before = race.acknowledged_ids(tenant)
                without_id = race.acknowledged_without_id(tenant)
                rows = await collect_pages(
                    http,
                    f"{race.url}/pulses",
                    "pulses",
                    {"tenant_id": tenant, "date": race.day},
                    limit=5,
                )
                ids = Counter(row["id"] for row in rows)
                twice = [i for i, n in ids.items() if n > 1]
                if twice:
                    race.problems.append(f"pass {race.passes} of {tenant}: listed twice {twice}")
                given = {row["id"] for row in rows if not row["id_assigned"]}
                if before - given:
                    race.problems.append(
                        f"pass {race.passes} of {tenant}: acknowledged before the pass, never"
                        f" listed: {sorted(before - given)}"
                    )
                unknown = given - race.sent_ids(tenant)
                if unknown:
                    race.problems.append(f"{tenant}: ids nobody sent listed: {sorted(unknown)}")
                assigned = [row for row in rows if row["id_assigned"]]
                if len(assigned) < without_id:
                    race.problems.append(
                        f"pass {race.passes} of {tenant}: {len(assigned)} pulses without an id"
                        f" listed, {without_id} acknowledged before the pass"
                    )
                for row in assigned:
                    content = (
                        row["product_sku"],
                        row["use_unit"],
                        row["used_amount"],
                        row["timestamp"],
                    )
                    seen = race.assigned.setdefault(row["id"], content)
                    if seen != content:
                        race.problems.append(f"server id {row['id']} named {seen}, then {content}")
            race.passes += 1
            if last:
                return


async def commit_again_and_again(race: Race) -> None:
    async with httpx.AsyncClient(timeout=30.0) as http:
        while race.writing:
            response = await http.post(f"{race.url}/aggregates/commit", json={"date": race.day})
            if response.status_code != 200:
                race.problems.append(f"commit: {response.status_code} {response.text[:300]}")
                return
            race.commit_answers += [b["batch_id"] for b in response.json()["batches"]]
            await trio.sleep(0.03)


async def snapshot_outbox_and_totals(race: Race) -> None:
    """Batches, then totals, then batches again: every bucket's committed part lies
    between what the two outbox reads carry (a commit writes its batch and marks
    its bucket in one transaction), as does its revision."""
    async with httpx.AsyncClient(timeout=30.0) as http:
        outbox = Outbox(http, race.url)
        while race.writing:
            first = delta_sums(await outbox.views(date=race.day))
            rows = await all_aggregates(http, race.url, {"from": race.day, "to": race.day}, limit=3)
            then = delta_sums(await outbox.views(date=race.day))
            none = (Total(Decimal(0), 0), 0)
            for row in rows:
                key = (row["tenant_id"], row["product_sku"], row["use_unit"], row["date"])
                (low, low_revs), (high, high_revs) = first.get(key, none), then.get(key, none)
                amount, count = Decimal(row["committed_amount"]), row["committed_count"]
                used, pulses = Decimal(row["used_amount"]), row["pulse_count"]
                if not (
                    low.amount <= amount <= high.amount
                    and low.count <= count <= high.count
                    and low_revs <= row["revision"] <= high_revs
                    and amount <= used
                    and count <= pulses
                ):
                    race.problems.append(
                        f"snapshot {race.snapshots}, {key}: committed {amount} in {count}"
                        f" (revision {row['revision']}, total {used} in {pulses}); the batches"
                        f" read before carry {low} ({low_revs}), after {high} ({high_revs})"
                    )
            race.snapshots += 1


@pytest.mark.parametrize("store", ["sqlite-2-workers", "postgresql"])
async def test_pages_totals_and_batches_read_while_clients_write_and_commit_agree(
    store: str, start_server: StartServer, tmp_path: Path
) -> None:
    """Three clients write yesterday's pulses for three tenants (most with ids,
    some without, each request also holding an invalid pulse, a replay and a
    reuse of an earlier id for another amount) while another client commits
    yesterday every 30 ms, as does the periodic committer (no grace, every
    0.1 s; two records a batch), a pager reads whole passes of GET /pulses five
    rows a page, and an auditor reads the outbox, the totals and the outbox
    again. Each pulse gets the status it must (accepted, rejected, duplicate,
    conflict); each pass lists every pulse acknowledged before it once, nothing
    nobody sent, and names each server id's pulse alike; each snapshot finds
    the committed part (and revision) between what the two outbox reads carry;
    no two commits answer the same batch; in the end the four views agree."""
    ledger = Ledger()
    day = day_before(1)
    periodic = {
        "INGESTOR_COMMIT_INTERVAL": "0.1",
        "INGESTOR_COMMIT_GRACE": "0.001",
        "INGESTOR_BATCH_MAX_RECORDS": "2",
    }
    async with serving(store, start_server, tmp_path, **periodic) as server:
        url = server.url
        race = Race(url, ledger, day, ["acme", "globex", "initech"])
        async with trio.open_nursery() as readers:
            readers.start_soon(page_pulses, race)
            readers.start_soon(commit_again_and_again, race)
            readers.start_soon(snapshot_outbox_and_totals, race)
            async with trio.open_nursery() as writers:
                for number in range(3):
                    writers.start_soon(write, race, number)
            race.writing = False
        assert ledger.problems() == []
        assert race.problems == [], "\n".join(race.problems[:20])
        assert race.passes >= 2
        assert race.snapshots >= 2
        answered = Counter(race.commit_answers)
        assert [b for b, n in answered.items() if n > 1] == [], "a batch answered by two commits"
        async with httpx.AsyncClient(timeout=30.0) as http:
            response = await http.post(f"{url}/aggregates/commit", json={"date": day})
            assert response.status_code == 200, response.text
            race.commit_answers += [b["batch_id"] for b in response.json()["batches"]]
            listed = {v["batch_id"] for v in await Outbox(http, url).views(date=day)}
            assert set(race.commit_answers) <= listed, "a commit answered a batch nobody lists"
            await all_delivered(http, url)
            problems = await audit(
                http,
                url,
                ledger.expected_totals(),
                client_ids=client_ids_of(ledger),
                deliveries=server.deliveries,
            )
            assert problems == [], "\n".join(problems)


# -- 2. the largest amounts, in one bucket and one batch ----------------------------


@pytest.mark.parametrize(("store", "sink"), [("sqlite", "file"), ("postgresql", "nats")])
async def test_the_largest_amounts_add_up_exactly_in_every_view(
    store: str, sink: str, start_server: StartServer, tmp_path: Path
) -> None:
    """DESIGN §3.3: amounts of up to 18 integer and 9 fractional digits, sums exact.
    Three tenants of one partition (so one batch) each send the largest amount
    a dozen times, as a JSON number, a string and in exponent form, over several
    requests (so the store adds running totals to each other), with a nano-unit
    that carries into a 19th integer digit. A bucket then holds 29 significant
    digits and the batch more: past 64 bits in nano-units and past the 28
    digits of Python's default decimal context. The server is SIGKILLed as soon
    as the commit has answered, before or while its batch is sent. Then the
    same again, as a correction. Every view, and what the sink holds (files, or
    a JetStream stream), must say it exactly, each batch once."""
    ledger = Ledger()
    day = day_before(2)
    noon = f"{day}T12:00:00Z"
    tenants = same_partition(3, "big")
    forms: list[str | Decimal] = [MAX, Decimal(MAX), "9.99999999999999999999999999e17"]

    def heavy(tenant: str, n: int) -> list[dict[str, Any]]:
        return [
            pulse(
                tenant,
                forms[(n + i) % 3],
                sku="max",
                pulse_id=f"{tenant}-max-{n}-{i}",
                timestamp=noon,
            )
            for i in range(4)
        ] + [
            pulse(tenant, NANO, sku="carry", pulse_id=f"{tenant}-nano-{n}", timestamp=noon),
            pulse(tenant, MAX, sku="carry", pulse_id=f"{tenant}-carry-{n}", timestamp=noon),
            pulse(tenant, "0", sku="zero", pulse_id=f"{tenant}-zero-{n}", timestamp=noon),
        ]

    async with contextlib.AsyncExitStack() as stack:
        # A batch on its way at the kill is sent again once its lease (2 x
        # sink_timeout + 5 s) ends: 7 s, not 25.
        env = {"INGESTOR_SINK_TIMEOUT": "1"}
        stream = None
        if sink == "nats":
            require_nats()
            stream = await stack.enter_async_context(fresh_stream())
            env |= {
                "INGESTOR_SINK": NATS_URL,
                "INGESTOR_NATS_STREAM": stream.name,
                "INGESTOR_NATS_SUBJECT": stream.template,
            }
        server = await stack.enter_async_context(serving(store, start_server, tmp_path, **env))
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=30.0))
        for n in range(3):
            for tenant in tenants:
                await post(http, server.url, ledger, heavy(tenant, n), "ndjson" if n else "array")
        assert ledger.answers() == Counter({"accepted": len(ledger.attempts)})
        first = await commit(http, server.url, day)
        assert [b["kind"] for b in first] == ["initial"], first
        await server.kill()
        await server.start()
        for n in range(3, 5):
            for tenant in tenants:
                await post(http, server.url, ledger, heavy(tenant, n))
        second = await commit(http, server.url, day)
        assert [b["kind"] for b in second] == ["correction"], second

        expected = ledger.expected_totals()
        assert expected[(tenants[0], "max", "call", day)] == Total(
            Decimal("19999999999999999999.99999998"), 20
        )
        assert expected[(tenants[0], "carry", "call", day)] == Total(
            Decimal("5000000000000000000"), 10
        )
        for batches, rounds in ((first, 3), (second, 2)):
            per_tenant = exact_sum([Decimal(MAX)] * (5 * rounds) + [Decimal(NANO)] * rounds)
            want = exact_sum([per_tenant] * 3)
            assert Decimal(batches[0]["used_amount"]) == want, (batches, want)
            assert PLAIN_DECIMAL.match(batches[0]["used_amount"]), batches
        aggregates = await all_aggregates(http, server.url)
        for row in aggregates:
            for field_name in ("used_amount", "committed_amount"):
                assert PLAIN_DECIMAL.match(row[field_name]), row
        await all_delivered(http, server.url)
        received = None
        if stream is not None:
            messages = await stream.messages()
            ids = [m.headers.get("Nats-Msg-Id") if m.headers else None for m in messages]
            assert len(ids) == len(set(ids)), f"a batch is in the stream twice: {ids}"
            received = {str(i): {bytes(m.data or b"")} for i, m in zip(ids, messages, strict=True)}
        problems = await audit(
            http,
            server.url,
            expected,
            client_ids=client_ids_of(ledger),
            deliveries=server.deliveries if stream is None else None,
            received=received,
        )
        assert problems == [], "\n".join(problems)
        for tenant in tenants:
            pulses = await collect_pages(
                http,
                f"{server.url}/pulses",
                "pulses",
                {"tenant_id": tenant, "date": day},
                limit=9,
            )
            amounts = Counter(p["used_amount"] for p in pulses)
            assert amounts == Counter({MAX: 25, NANO: 5, "0": 5}), amounts


async def commit(http: httpx.AsyncClient, url: str, day: str) -> list[dict[str, Any]]:
    response = await http.post(f"{url}/aggregates/commit", json={"date": day})
    assert response.status_code == 200, response.text
    batches: list[dict[str, Any]] = response.json()["batches"]
    return batches


# -- 3. a client id shaped like the ones the server hands out -------------------------


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_a_client_id_shaped_like_a_server_id_does_not_name_two_pulses(
    store: str, start_server: StartServer, tmp_path: Path
) -> None:
    """GET /pulses is the audit trail, "each pulse as stored, with its id", and a
    pulse sent without one "gets one assigned by the server" (DESIGN §4); a
    pulse with an id "is counted once per (tenant_id, id)" (§3.2). A client that
    copies the id the trail shows for its pulse (to resend it safely, as the
    README asks of retries) must not make a second pulse under that same id, nor
    may a client id the server later hands out again: an auditor keyed on ids
    merges the two, and the bucket holds one pulse more than the trail names."""
    ledger = Ledger()
    day = day_before(1)
    stamp = f"{day}T08:00:00Z"
    async with (
        serving(store, start_server, tmp_path) as server,
        httpx.AsyncClient(timeout=30.0) as http,
    ):
        await post(http, server.url, ledger, [pulse("acme", "5", timestamp=stamp)])
        [shown] = await collect_pages(
            http,
            f"{server.url}/pulses",
            "pulses",
            {"tenant_id": "acme", "date": day},
            limit=10,
        )
        assert shown["id_assigned"], shown
        server_id = shown["id"]
        # The same pulse again, now with the id the trail shows for it.
        again = await post(
            http,
            server.url,
            ledger,
            [pulse("acme", "5", pulse_id=server_id, timestamp=stamp)],
        )
        # And the id the server will most likely hand out next, taken first.
        # (The first pulse, the resend and this one take a place each in the
        # store's log, whose place names the server's ids: the next is the third.)
        following = re.sub(r"\A(srv-\w+-)(\d+)", lambda m: f"{m[1]}{int(m[2]) + 3}", server_id)
        await post(
            http,
            server.url,
            ledger,
            [pulse("acme", "7", pulse_id=following, timestamp=stamp)],
        )
        for _ in range(3):
            await post(http, server.url, ledger, [pulse("acme", "1", timestamp=stamp)])
        pulses = await collect_pages(
            http,
            f"{server.url}/pulses",
            "pulses",
            {"tenant_id": "acme", "date": day},
            limit=10,
        )
        ids = Counter(p["id"] for p in pulses)
        [row] = await all_aggregates(http, server.url)
        named = [(p["id"], "server" if p["id_assigned"] else "client") for p in pulses]
        assert [i for i, n in ids.items() if n > 1] == [], (
            f"GET /pulses names two pulses of tenant acme with one id: {named}; the resend"
            f" of {server_id!r} was answered {again.attempts[0].answer}, the bucket"
            f" holds {row['pulse_count']} pulses"
        )
        assert row["pulse_count"] == len(ids)


# -- 4. tenants far from UTC, on the days their clocks change ---------------------------

TENANT_ZONES = {
    "ny": "America/New_York",
    "lhi": "Australia/Lord_Howe",
    "kiri": "Pacific/Kiritimati",
    "pago": "Pacific/Pago_Pago",
    "chat": "Pacific/Chatham",
    "utc": "UTC",
}
ZONES_CONFIG = 'billing_timezone = "UTC"\n[tenant_timezones]\n' + "".join(
    f'{tenant} = "{zone}"\n' for tenant, zone in TENANT_ZONES.items() if tenant != "utc"
)
FAKE_START = dt.datetime(2026, 11, 2, 10, 30, tzinfo=dt.UTC)

# (tenant, timestamp, the billing day it belongs to), written out by hand.
# New York's 2026-11-01 has 25 hours (01:00-02:00 twice); Lord Howe's
# 2026-10-04 has 23.5 (02:00 jumps to 02:30, +10:30 to +11); Kiritimati is
# UTC+14, Pago Pago UTC-11, Chatham UTC+13:45: 2026-11-01 ends last in Pago
# Pago, at 2026-11-02T11:00Z, and begins first in Kiritimati, at 10-31T10:00Z.
ZONED: list[tuple[str, str, str]] = [
    ("ny", "2026-10-31T23:59:59.999999-04:00", "2026-10-31"),
    ("ny", "2026-11-01T00:00:00-04:00", "2026-11-01"),
    ("ny", "2026-11-01T01:30:00-04:00", "2026-11-01"),  # 01:30, the first time
    ("ny", "2026-11-01T06:30:00Z", "2026-11-01"),  # 01:30 EST, the second time
    ("ny", "2026-11-02T04:59:59.9999999Z", "2026-11-01"),  # 23:59:59.9999999 EST
    ("ny", "2026-11-02T05:00:00Z", "2026-11-02"),
    ("lhi", "2026-10-03T13:29:59.999999Z", "2026-10-03"),
    ("lhi", "2026-10-03T13:30:00Z", "2026-10-04"),
    ("lhi", "2026-10-03T15:45:00Z", "2026-10-04"),  # 02:45 +11, past the skipped half hour
    ("lhi", "2026-10-04T23:59:59.999999+11:00", "2026-10-04"),
    ("lhi", "2026-10-04T13:00:00Z", "2026-10-05"),
    ("kiri", "2026-10-31T09:59:59.999999Z", "2026-10-31"),
    ("kiri", "2026-10-31T10:00:00Z", "2026-11-01"),
    ("kiri", "2026-11-01T09:59:59.999999999Z", "2026-11-01"),  # nine digits, not rounded up
    ("kiri", "2026-11-01T10:00:00Z", "2026-11-02"),
    ("kiri", "2026-11-02T10:33:00Z", "2026-11-03"),  # 3 minutes ahead: tomorrow in UTC
    ("pago", "2026-11-01T10:59:59.999999Z", "2026-10-31"),
    ("pago", "2026-11-01T11:00:00Z", "2026-11-01"),
    ("pago", "2026-11-02T10:29:00Z", "2026-11-01"),
    ("chat", "2026-11-01T10:14:59.999999Z", "2026-11-01"),
    ("chat", "2026-11-01T10:15:00Z", "2026-11-02"),
    ("chat", "2026-10-31T10:15:00+13:45", "2026-10-31"),
    ("utc", "2026-11-01T23:59:59.999999999Z", "2026-11-01"),
    ("utc", "2026-11-02T00:00:00Z", "2026-11-02"),
]
# Pulses without a timestamp at 2026-11-02T10:30Z: Kiritimati is at 11-03 00:30,
# Pago Pago at 11-01 23:30.
UNSTAMPED = [("kiri", "2026-11-03"), ("pago", "2026-11-01"), ("utc", "2026-11-02")]


@dataclass
class Zoned:
    """Pulses whose billing day the test writes out, and what became of them."""

    ledger: Ledger = field(default_factory=Ledger)
    day: dict[int, str] = field(default_factory=dict)  # id(payload) -> billing day

    async def send(
        self, http: httpx.AsyncClient, url: str, items: Sequence[tuple[dict[str, Any], str]]
    ) -> None:
        for payload, day in items:
            self.day[id(payload)] = day
        sent = await post(http, url, self.ledger, [payload for payload, _ in items])
        bad = [(a.payload, a.answer, a.error) for a in sent.attempts if a.answer != "accepted"]
        assert bad == [], bad

    def expected(self) -> dict[BucketKey, Total]:
        amounts: dict[BucketKey, list[Decimal]] = defaultdict(list)
        for attempt in self.ledger.stored():
            payload = attempt.payload
            assert isinstance(payload, Mapping)
            key = (
                payload["tenant_id"],
                payload["product_sku"],
                payload["use_unit"],
                self.day[id(payload)],
            )
            amounts[key].append(Decimal(payload["used_amount"]))
        return {k: Total(exact_sum(v), len(v)) for k, v in amounts.items()}

    def client_ids(self) -> dict[tuple[str, str], set[str]]:
        found: dict[tuple[str, str], set[str]] = defaultdict(set)
        for attempt in self.ledger.stored():
            if attempt.identity is not None:
                found[(attempt.identity[0], self.day[id(attempt.payload)])].add(attempt.identity[1])
        return found


@pytest.fixture
def fake_clock() -> Iterator[ServerClock]:
    base = Path(tempfile.mkdtemp(prefix="audit-clock-"))
    try:
        yield ServerClock(base / "faketime", FAKE_START)
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def open_days(http: httpx.AsyncClient, url: str, first: str, last: str) -> list[str]:
    rows = await all_aggregates(http, url, {"status": "open", "from": first, "to": last})
    return sorted({row["date"] for row in rows})


async def test_days_of_far_zones_and_clock_changes_agree_in_every_view_and_commit_once(
    start_server: StartServer, fake_clock: ServerClock
) -> None:
    """Tenants in New York (a 25-hour day), Lord Howe (a 23.5-hour day), Kiritimati
    (UTC+14), Pago Pago (UTC-11) and Chatham (UTC+13:45), on a server whose
    clock reads 2026-11-02T10:30Z, with a periodic committer every 0.2 s and a
    30-minute grace. Each pulse lands on the day written above; the committer
    commits a day only once it has ended in every zone in use plus the grace
    (2026-11-01 at 11:30Z: not at 10:58Z, though it has long ended in UTC, New
    York and Kiritimati), so each of that day's buckets comes in one initial
    batch, and a pulse of New York's second 01:30 sent afterwards is a
    correction. Kiritimati's today, tomorrow in UTC, may be committed by hand,
    the day after it not. The four views agree at the end."""
    server = await start_server(
        config=ZONES_CONFIG,
        INGESTOR_COMMIT_INTERVAL="0.2",
        INGESTOR_COMMIT_GRACE="30m",
        **fake_clock.env(),
    )
    zoned = Zoned()
    stamped = [
        (pulse(tenant, f"{n + 1}.{n:09d}", pulse_id=f"z{n}", timestamp=when), day)
        for n, (tenant, when, day) in enumerate(ZONED)
    ]
    for tenant, when, day in ZONED:  # the hand-written days, counted by zoneinfo
        moment = dt.datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", when))
        assert moment.astimezone(ZoneInfo(TENANT_ZONES[tenant])).date().isoformat() == day, when
    unstamped = [(pulse(t, "0.25", sku="now"), day) for t, day in UNSTAMPED]
    async with httpx.AsyncClient(timeout=30.0) as http:
        url = server.url
        await zoned.send(http, url, stamped[:12])
        await zoned.send(http, url, stamped[12:] + unstamped)

        # Days that ended in every zone (plus the grace) are committed by the timer.
        async def earlier_committed() -> bool:
            return await open_days(http, url, "2026-10-01", "2026-10-31") == []

        await wait_until(earlier_committed, within=20, what="days up to 10-31 committed")
        assert await open_days(http, url, "2026-11-01", "2026-11-05") == [
            "2026-11-01",
            "2026-11-02",
            "2026-11-03",
        ]

        # 10:58Z: 11-01 has ended everywhere but in Pago Pago. A pulse of 10-30,
        # long due, shows that the timer has ticked on this clock.
        fake_clock.set(dt.datetime(2026, 11, 2, 10, 58, tzinfo=dt.UTC))
        last = pulse("pago", "3", pulse_id="pago-last", timestamp="2026-11-02T10:59:59.999999Z")
        await zoned.send(http, url, [(last, "2026-11-01")])
        for probe in range(2):  # the second is committed by a tick that began at 10:58
            stamp = f"2026-10-30T12:00:0{probe}Z"
            await zoned.send(
                http,
                url,
                [
                    (
                        pulse("utc", "1", sku="probe", pulse_id=f"p{probe}", timestamp=stamp),
                        "2026-10-30",
                    )
                ],
            )
            await wait_until(earlier_committed, within=20, what="the probe of 10-30 committed")
        early = await collect_pages(
            http, f"{url}/batches", "batches", {"date": "2026-11-01"}, limit=10
        )
        assert early == [], "2026-11-01 committed before it ended in Pago Pago plus the grace"

        # 11:31Z: 11-01 has ended everywhere, and the grace has passed.
        fake_clock.set(dt.datetime(2026, 11, 2, 11, 31, tzinfo=dt.UTC))

        async def day_committed() -> bool:
            return await open_days(http, url, "2026-11-01", "2026-11-01") == []

        await wait_until(day_committed, within=20, what="2026-11-01 committed by the timer")
        views = await Outbox(http, url).views(date="2026-11-01")
        assert {v["kind"] for v in views} == {"initial"}, views
        rows = await all_aggregates(http, url, {"from": "2026-11-01", "to": "2026-11-01"})
        assert {row["revision"] for row in rows} == {1}, rows
        assert await open_days(http, url, "2026-11-02", "2026-11-05") == [
            "2026-11-02",
            "2026-11-03",
        ]

        # A late pulse of New York's second 01:30, after the day's initial batch.
        await zoned.send(
            http,
            url,
            [
                (
                    pulse(
                        "ny",
                        "0.000000007",
                        pulse_id="ny-late",
                        timestamp="2026-11-01T01:30:00-05:00",
                    ),
                    "2026-11-01",
                )
            ],
        )
        await wait_until(day_committed, within=20, what="the late pulse committed")
        views = await Outbox(http, url).views(date="2026-11-01")
        corrections = [v for v in views if v["kind"] == "correction"]
        assert [
            [
                (r["tenant_id"], r["revision"], r["used_amount"], r["pulse_count"])
                for r in v["records"]
            ]
            for v in corrections
        ] == [[("ny", 2, "0.000000007", 1)]], corrections

        # Kiritimati's today is tomorrow in UTC: it may be committed; the day after, not.
        assert (await commit(http, url, "2026-11-03")) != []
        refused = await http.post(f"{url}/aggregates/commit", json={"date": "2026-11-04"})
        assert refused.status_code == 422, refused.text
        await commit(http, url, "2026-11-02")
        assert await open_days(http, url, "2026-10-01", "2026-11-05") == []
        await all_delivered(http, url)
        problems = await audit(
            http,
            url,
            zoned.expected(),
            client_ids=zoned.client_ids(),
            deliveries=server.deliveries,
        )
        assert problems == [], "\n".join(problems)
        sent_at = {
            p["id"]: dt.datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", p["timestamp"]))
            for p, _ in stamped
        }
        for tenant in TENANT_ZONES:
            for day in ("2026-10-03", "2026-10-04", "2026-10-05", "2026-10-31", "2026-11-01"):
                for row in await collect_pages(
                    http, f"{url}/pulses", "pulses", {"tenant_id": tenant, "date": day}, limit=50
                ):
                    if row["id"] in sent_at:
                        shown = dt.datetime.fromisoformat(row["timestamp"])
                        assert shown == sent_at[row["id"]], (row, sent_at[row["id"]])


# -- 5. ids raced and replayed across SIGKILL and SIGTERM, batches waiting to be sent ---


def raced_payloads(client: int, day: str) -> list[Payload]:
    """Client `client`'s pulses for ids r0..r39: clients 0, 1 and 3 send the same
    payloads, client 2 another amount for every third id (a conflict)."""
    payloads: list[Payload] = []
    for i in range(40):
        amount = Decimal(f"{i + 1}.{i:09d}") + (1 if client == 2 and i % 3 == 0 else 0)
        payloads.append(
            pulse(
                "acme" if i % 2 else "globex",
                f"{amount:f}",
                sku=f"s{i % 3}",
                pulse_id=f"r{i}",
                timestamp=f"{day}T12:00:{i:02d}Z" if i % 4 else None,
            )
        )
    random.Random(client).shuffle(payloads)
    return payloads


async def send_raced(url: str, ledger: Ledger, day: str) -> None:
    async def one(client: int) -> None:
        payloads = raced_payloads(client, day)
        async with httpx.AsyncClient(timeout=30.0) as http:
            for start in range(0, len(payloads), 10):
                await post(
                    http,
                    url,
                    ledger,
                    payloads[start : start + 10],
                    "ndjson" if client == 3 else "array",
                )

    async with trio.open_nursery() as nursery:
        for client in range(4):
            nursery.start_soon(one, client)


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_raced_ids_replayed_across_kill_and_term_while_batches_wait_bill_once(
    store: str, start_server: StartServer, tmp_path: Path
) -> None:
    """Four clients send the same 40 ids at once (one of them another amount for
    some): each id is accepted once, with the payload the trail then shows. The
    day is committed while the billing system is down, so its batches wait;
    the server is SIGKILLed, and cursors of GET /pulses and GET /aggregates
    taken before go on after the restart without a repeat or a gap. Every
    request is sent again: nothing is accepted, a replay of what was stored is
    a duplicate, the other amount a conflict. Late pulses of the committed day
    come, then a SIGTERM and a restart, their replays are duplicates, and the
    next commit makes corrections carrying only them. Once the receiver is
    back, it has each batch with the outbox's bytes, and the views agree."""
    target = SinkTarget(SECRET)
    ledger = Ledger()
    day = day_before(1)
    sink = {
        "INGESTOR_SINK": target.url,
        "INGESTOR_SINK_SECRET": SECRET,
        "INGESTOR_SINK_TIMEOUT": "2",
        "INGESTOR_RETRY_INITIAL": "0.5",
        "INGESTOR_RETRY_MAX": "1",
    }
    async with (
        trio.open_nursery() as nursery,
        serving(store, start_server, tmp_path, **sink) as server,
    ):
        await nursery.start(target.run)
        # Down: a connection refused fails an attempt within a millisecond, so the
        # kill below seldom lands while one is in flight (its batch would wait out
        # the lease: 2 x sink_timeout + 5 s, and 30 s more on PostgreSQL).
        target.set_mode("refuse")
        url = server.url
        await send_raced(url, ledger, day)
        assert ledger.problems() == []
        accepted = Counter(a.identity for a in ledger.attempts if a.answer == "accepted")
        assert sorted(n for n in accepted.values()) == [1] * 40, accepted
        async with httpx.AsyncClient(timeout=30.0) as http:
            first_page = await http.get(
                f"{url}/pulses", params={"tenant_id": "acme", "date": day, "limit": "7"}
            )
            first_rows = await http.get(f"{url}/aggregates", params={"limit": "2"})
            today = dt.datetime.now(dt.UTC).date().isoformat()
            initial = await commit(http, url, day) + await commit(http, url, today)
            assert {b["kind"] for b in initial} == {"initial"}, initial

            async def tried() -> bool:
                views = await collect_pages(http, f"{url}/batches", "batches", limit=100)
                return len(views) == len(initial) and all(v["attempts"] for v in views)

            await wait_until(tried, within=20, what="every batch offered to the receiver")
            before = {v["batch_id"]: v["records"] for v in await Outbox(http, url).views()}
            assert before.keys() == {b["batch_id"] for b in initial}

            await server.kill()
            await server.start()

            # Cursors taken before the kill go on where they stopped.
            pulses = first_page.json()["pulses"] + await rest_of(
                http,
                f"{url}/pulses",
                "pulses",
                first_page.json()["next_cursor"],
                {"tenant_id": "acme", "date": day},
                limit=7,
            )
            whole = await collect_pages(
                http, f"{url}/pulses", "pulses", {"tenant_id": "acme", "date": day}, limit=100
            )
            assert [p["id"] for p in pulses] == [p["id"] for p in whole]
            rows = first_rows.json()["aggregates"] + await rest_of(
                http,
                f"{url}/aggregates",
                "aggregates",
                first_rows.json()["next_cursor"],
                {},
                limit=2,
            )
            assert totals_of(rows) == totals_of(await all_aggregates(http, url))
            after = {v["batch_id"]: v["records"] for v in await Outbox(http, url).views()}
            assert after == before, "a batch changed, or came or went, across the restart"
            kept = {
                a.payload["id"]: Decimal(a.payload["used_amount"])
                for a in ledger.attempts
                if a.answer == "accepted" and isinstance(a.payload, Mapping)
            }
            for tenant in ("acme", "globex"):
                for shown in await collect_pages(
                    http, f"{url}/pulses", "pulses", {"tenant_id": tenant, "date": day}, limit=50
                ):
                    assert Decimal(shown["used_amount"]) == kept[shown["id"]], shown

            replays = len(ledger.attempts)
            await send_raced(url, ledger, day)
            wrong = [
                (a.payload, a.answer)
                for a in ledger.attempts[replays:]
                if isinstance(a.payload, Mapping)
                and a.answer
                != (
                    "duplicate"
                    if Decimal(a.payload["used_amount"]) == kept[a.payload["id"]]
                    else "conflict"
                )
            ]
            assert wrong == [], wrong
            assert ledger.problems() == []

            rng = random.Random(5)
            late: list[dict[str, Any]] = [
                pulse(
                    tenant,
                    amount_of(rng),
                    sku=f"s{n % 3}",
                    pulse_id=f"late-{n}",
                    timestamp=f"{day}T23:59:59.999999Z",
                )
                for n, tenant in enumerate(["acme", "globex"] * 3)
            ]
            late.append(pulse("acme", "0.5", sku="s0", timestamp=f"{day}T00:00:00Z"))
            sent = await post(http, url, ledger, late, "ndjson")
            assert [a.answer for a in sent.attempts] == ["accepted"] * len(late)
            assert await server.terminate() == 0
            await server.start()
            again = await post(http, url, ledger, late[:-1])
            assert [a.answer for a in again.attempts] == ["duplicate"] * (len(late) - 1)

            corrections = await commit(http, url, day)
            assert {b["kind"] for b in corrections} == {"correction"}, corrections
            assert await commit(http, url, today) == []
            carried = exact_sum(Decimal(b["used_amount"]) for b in corrections)
            assert carried == exact_sum(Decimal(p["used_amount"]) for p in late), corrections
            assert sum(b["record_count"] for b in corrections) <= len(late)

            target.set_mode("ok")
            await all_delivered(http, url, within=60)  # a lease may be running: see above
            assert all(d.signature_ok for d in target.received)
            problems = await audit(
                http,
                url,
                ledger.expected_totals(),
                client_ids=client_ids_of(ledger),
                received=target.bodies(),
            )
            assert problems == [], "\n".join(problems)
        nursery.cancel_scope.cancel()


async def rest_of(
    http: httpx.AsyncClient,
    url: str,
    key: str,
    cursor: str | None,
    params: Mapping[str, str],
    *,
    limit: int,
) -> list[dict[str, Any]]:
    """The pages of a listing after `cursor` (none if it is None)."""
    rows: list[dict[str, Any]] = []
    while cursor is not None:
        response = await http.get(url, params={**params, "limit": str(limit), "cursor": cursor})
        assert response.status_code == 200, response.text
        body = response.json()
        rows += body[key]
        cursor = body["next_cursor"]
    return rows
