"""The read queries on SQLite and on PostgreSQL give the same answers.

Random pulses with names that sort specially (case, accents composed and
decomposed, characters beyond the BMP, 128-character names) are written to
a fresh store of each kind; commits (whole days, single partitions) and
corrections land in between. Every listing is then paged with several page
sizes and filter sets on both stores and compared row by row with each
other and with totals computed here. The read API's cursors are also tried
over both stores through the HTTP app.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import random
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import msgspec
import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from ingestor.api import create_app
from ingestor.clock import epoch_us
from ingestor.config import Settings
from ingestor.model import Aggregate, Pulse
from ingestor.money import format_nanos, to_nanos
from ingestor.partition import partition_of
from ingestor.runtime import Runtime
from ingestor.service import open_service
from ingestor.sinks.memory import MemorySink
from ingestor.store import AggregateQuery, BatchQuery, PulseQuery, Store
from ingestor.store import sqlite as sqlite_store
from ingestor.store.postgres import PostgresStore
from ingestor.store.sqlite import SQLiteStore

from ..conftest import FakeClock
from .conftest import BUSY_TIMEOUT, Backend

PARTITIONS = 4
DAYS = ["2024-05-01", "2024-05-02", "2024-05-03"]
T0 = epoch_us(dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC))
HOUR = 3_600_000_000
TENANTS = [
    "a",
    "B",
    "Z",
    "z",
    "\u00e9",
    "e\u0301",
    "\u00c9",
    "\uff21",
    "\U0001f600",
    "a b",
    "a-b",
    "x" * 128,
    "x" * 127,
]
SKUS = ["s", "S", "\u00e9", "e\u0301", "s" * 128, "\U0001f600"]
UNITS = ["u", "U", "\u00fc", "u" * 64]
Key = tuple[str, str, str, str]


def make_pulse(
    tenant: str, sku: str, unit: str, amount: str, day: str, *, ts: int, id: str | None
) -> Pulse:
    nanos = to_nanos(Decimal(amount))
    if id is None:
        return Pulse(tenant, sku, unit, nanos, "", False, ts, day, b"")
    return Pulse(tenant, sku, unit, nanos, id, True, ts, day, b"", False)


def write(store: Store, pulses: list[Pulse], received_us: int) -> None:
    groups: dict[int, list[Pulse]] = {}
    for p in pulses:
        groups.setdefault(partition_of(p.tenant_id, store.partitions), []).append(p)
    for partition, group in sorted(groups.items()):
        outcomes = store.write_pulses(partition, group, received_us)
        assert set(outcomes) <= {"accepted", "duplicate", "conflict"}, outcomes


@pytest.fixture
def pair(tmp_path: Path, postgres_url: str) -> Iterator[tuple[Store, Store]]:
    lite = SQLiteStore.open(
        tmp_path / "lite", partitions=PARTITIONS, durability="os", busy_timeout=BUSY_TIMEOUT
    )
    pg = PostgresStore.open(
        postgres_url, partitions=PARTITIONS, pool_size=4, busy_timeout=BUSY_TIMEOUT
    )
    try:
        yield lite, pg
    finally:
        lite.close()
        pg.close()


class Model:
    """What the stores should answer: the pulses written, by bucket and in order."""

    def __init__(self) -> None:
        self.totals: dict[Key, list[int]] = {}  # key -> [nanos, count]
        self.order: dict[tuple[str, str], list[Pulse]] = {}  # (tenant, day) -> pulses
        self.ids: set[tuple[str, str]] = set()

    def add(self, pulses: list[Pulse]) -> list[Pulse]:
        fresh = []
        for p in pulses:
            if p.client_id:
                if (p.tenant_id, p.pulse_id) in self.ids:
                    continue
                self.ids.add((p.tenant_id, p.pulse_id))
            fresh.append(p)
            total = self.totals.setdefault((p.day, p.tenant_id, p.product_sku, p.use_unit), [0, 0])
            total[0] += p.nanos
            total[1] += 1
            self.order.setdefault((p.tenant_id, p.day), []).append(p)
        return fresh


def random_pulses(rng: random.Random, n: int, serial: list[int]) -> list[Pulse]:
    out = []
    for _ in range(n):
        serial[0] += 1
        with_id = rng.random() < 0.5
        ident = f"id{rng.randrange(40)}" if with_id else None  # some replays
        amount = str(Decimal(rng.randrange(0, 10**6)) / Decimal(10 ** rng.randrange(0, 10)))
        out.append(
            make_pulse(
                rng.choice(TENANTS),
                rng.choice(SKUS),
                rng.choice(UNITS),
                amount,
                rng.choice(DAYS),
                ts=T0 + serial[0],
                id=ident,
            )
        )
    return out


def page_aggregates(store: Store, query: AggregateQuery, size: int) -> list[Aggregate]:
    rows: list[Aggregate] = []
    after: Key | None = None
    for _ in range(10_000):
        page = store.aggregates(msgspec.structs.replace(query, after=after, limit=size))
        assert len(page) <= size
        rows += page
        if len(page) < size:
            return rows
        last = page[-1]
        after = (last.date, last.tenant_id, last.product_sku, last.use_unit)
    raise AssertionError("did not end")


def row_key(a: Aggregate) -> Key:
    return (a.date, a.tenant_id, a.product_sku, a.use_unit)


def queries(rng: random.Random) -> list[AggregateQuery]:
    fixed = [
        AggregateQuery(),
        AggregateQuery(status="open"),
        AggregateQuery(status="committed"),
        AggregateQuery(date_from=DAYS[1]),
        AggregateQuery(date_from=DAYS[2], date_to=DAYS[0]),
    ]
    randoms = [
        AggregateQuery(
            tenant_id=rng.choice([None, *TENANTS]),
            product_sku=rng.choice([None, None, *SKUS]),
            use_unit=rng.choice([None, None, *UNITS]),
            date_from=rng.choice([None, *DAYS]),
            date_to=rng.choice([None, *DAYS]),
            status=rng.choice(["all", "open", "committed"]),
            # A key's tenants (one query for all of them), or none.
            tenants=rng.choice([None, tuple(rng.sample(TENANTS, rng.randint(1, len(TENANTS))))]),
        )
        for _ in range(16)
    ]
    return fixed + randoms


def expected_keys(model: Model, query: AggregateQuery) -> list[Key]:
    return sorted(
        k
        for k in model.totals
        if (query.tenant_id is None or k[1] == query.tenant_id)
        and (query.tenants is None or k[1] in query.tenants)
        and (query.product_sku is None or k[2] == query.product_sku)
        and (query.use_unit is None or k[3] == query.use_unit)
        and (query.date_from is None or k[0] >= query.date_from)
        and (query.date_to is None or k[0] <= query.date_to)
    )


def same_pulses(store: Store, tenant: str, day: str, size: int) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    after: int | None = None
    cursors: list[int] = []
    for _ in range(10_000):
        page = store.pulses(PulseQuery(tenant_id=tenant, day=day, after=after, limit=size))
        rows += [
            (
                p.tenant_id,
                p.product_sku,
                p.use_unit,
                p.used_amount,
                p.timestamp,
                p.date,
                None if p.id_assigned else p.id,
            )
            for _, p in page
        ]
        cursors += [seq for seq, _ in page]
        if len(page) < size:
            assert cursors == sorted(set(cursors))
            return rows
        after = page[-1][0]
    raise AssertionError("did not end")


@pytest.mark.parametrize("seed", [1, 2])
def test_random_data_reads_the_same_on_sqlite_and_postgres(
    pair: tuple[Store, Store], seed: int
) -> None:
    lite, pg = pair
    rng = random.Random(seed)
    model = Model()
    serial = [0]
    summaries: dict[str, list[list[Any]]] = {"lite": [], "pg": []}
    for step in range(4):
        pulses = random_pulses(rng, 60, serial)
        model.add(pulses)
        for store in pair:
            write(store, pulses, T0 + step)
        # Commits between the writes: a whole day, then one partition of another.
        day = DAYS[step % len(DAYS)]
        partitions = range(PARTITIONS) if step % 2 == 0 else [rng.randrange(PARTITIONS)]
        for name, store in (("lite", lite), ("pg", pg)):
            summaries[name].append(
                sorted(
                    [s.kind, s.record_count, s.used_amount]
                    for p in partitions
                    for s in store.commit_day(p, day, T0 + HOUR + step, 1000)
                )
            )
    assert summaries["lite"] == summaries["pg"]

    everything = lite.aggregates(AggregateQuery(limit=10_000))
    assert everything == pg.aggregates(AggregateQuery(limit=10_000))
    assert [row_key(a) for a in everything] == sorted(model.totals)
    for a in everything:
        nanos, count = model.totals[row_key(a)]
        assert (a.used_amount, a.pulse_count) == (format_nanos(nanos), count)

    for query in queries(rng):
        want = expected_keys(model, query)
        for size in (1, 4, 50):
            got_lite = page_aggregates(lite, query, size)
            got_pg = page_aggregates(pg, query, size)
            assert got_lite == got_pg, (query, size)
            keys = [row_key(a) for a in got_lite]
            if query.status == "all":
                assert keys == want, query
            else:
                assert keys == [k for k in want if k in set(keys)], query
                for a in got_lite:
                    open_ = a.pulse_count > a.committed_count
                    assert open_ == (query.status == "open"), (query, a)

    for tenant, day in sorted(model.order):
        listed_lite = same_pulses(lite, tenant, day, 3)
        assert listed_lite == same_pulses(pg, tenant, day, 3)
        wanted = [
            (
                p.tenant_id,
                p.product_sku,
                p.use_unit,
                format_nanos(p.nanos),
                dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=p.ts),
                p.day,
                p.pulse_id if p.client_id else None,
            )
            for p in model.order[(tenant, day)]
        ]
        assert listed_lite == wanted

    def batches(store: Store) -> list[tuple[Any, ...]]:
        out = []
        after = None
        while page := store.batches(BatchQuery(after=after, limit=3)):
            for view in page:
                full = store.batch(view.batch_id)
                assert full is not None
                out.append((view.date, view.partition, view.kind, view.record_count,
                            view.used_amount, full.records))  # fmt: skip
            after = (page[-1].date, page[-1].batch_id)
        return sorted(out, key=repr)

    assert batches(lite) == batches(pg)


def test_sqlite_reads_without_a_fold_answer_as_with_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slow path (`_unfolded`, for when a fold cannot be written) selects and
    pages exactly as the table does."""
    store = SQLiteStore.open(
        tmp_path / "s", partitions=PARTITIONS, durability="os", busy_timeout=BUSY_TIMEOUT
    )
    try:
        rng = random.Random(7)
        serial = [0]
        write(store, random_pulses(rng, 80, serial), T0)
        for p in range(PARTITIONS):
            store.commit_day(p, DAYS[0], T0 + HOUR, 1000)
        write(store, random_pulses(rng, 80, serial), T0 + 1)  # left unfolded below
        cases = queries(rng)
        monkeypatch.setattr(sqlite_store.SQLiteStore, "_settle", lambda self, parts: False)
        unfolded = {
            (i, size): page_aggregates(store, q, size)
            for i, q in enumerate(cases)
            for size in (1, 5)
        }
        monkeypatch.undo()
        for (i, size), rows in unfolded.items():
            assert rows == page_aggregates(store, cases[i], size), (cases[i], size)
    finally:
        store.close()


# -- the HTTP read API over each store --------------------------------------------------


@pytest.fixture
async def runtime(
    backend: Backend, settings: Settings, sink: MemorySink, clock: FakeClock
) -> AsyncIterator[Runtime]:
    async with open_service(settings, store=backend.open(), sink=sink, clock=clock) as running:
        yield running


@pytest.fixture
def app(runtime: Runtime) -> Quart:
    return create_app(runtime)


def forged(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def cursor_url(path: str, cursor: Any) -> str:
    sep = "&" if "?" in path else "?"
    return f"{path}{sep}{urlencode({'cursor': forged(cursor)})}"


@pytest.mark.parametrize(
    "url",
    [
        cursor_url("/aggregates", ["not-a-date", "t1", "sku1", "api_call"]),
        cursor_url("/aggregates", ["2026-11-28", "t1\u0000", "sku1", "api_call"]),
        cursor_url("/batches", ["28/11/2026", "b"]),
        cursor_url("/batches", ["2026-11-28", "b\u0000"]),
        cursor_url("/pulses?tenant_id=t1&date=2026-11-28", 2**90),
        "/batches/%00",
        "/batches/a%00b",
        "/batches/" + "x" * 3000,
    ],
)
async def test_a_forged_cursor_or_batch_id_is_never_a_server_error(app: Quart, url: str) -> None:
    """A cursor that decodes but that the API never gave out, or a batch id that no
    store could hold, is a client error (400, or 404 for the batch), never a
    5xx: 503 + Retry-After tells a billing client to retry it for ever. Nor
    an empty last page, which tells it that it has seen every row."""
    client: Client = app.test_client()
    response = await client.post(
        "/pulses",
        json=[{"tenant_id": "t1", "product_sku": "sku1", "use_unit": "api_call", "used_amount": 1}],
    )
    assert response.status_code == 202
    await client.post("/aggregates/commit", json={"date": "2026-11-28"})
    response = await client.get(url)
    body = await response.get_json()
    expected = (404, "not_found") if "cursor" not in url else (400, "invalid_parameter")
    assert (response.status_code, body["error"]["code"]) == expected, body


async def test_paging_over_http_while_writes_and_commits_land(app: Quart) -> None:
    """Over each store: every bucket and every pulse present before the first page
    is seen exactly once and in order, and batches page in (date, batch_id)
    order without repeats, while pulses and commits land between the pages."""
    client: Client = app.test_client()

    def p(tenant: str, sku: str = "s", amount: int = 1, **extra: Any) -> dict[str, Any]:
        return {"tenant_id": tenant, "product_sku": sku, "use_unit": "u", "used_amount": amount,
                **extra}  # fmt: skip

    async def send(body: list[dict[str, Any]]) -> None:
        response = await client.post("/pulses", json=body)
        assert response.status_code == 202
        assert (await response.get_json())["rejected"] == 0

    async def pages(path: str, field: str, between: Any) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        cursor = None
        for _ in range(200):
            url = path + (f"&{urlencode({'cursor': cursor})}" if cursor else "")
            response = await client.get(url)
            assert response.status_code == 200, await response.get_data()
            body = await response.get_json()
            rows += body[field]
            cursor = body["next_cursor"]
            if cursor is None:
                return rows
            await between()
        raise AssertionError("no end")

    yesterday = "2026-11-27T12:00:00Z"
    await send([p(t, s, ts) for t in TENANTS for s in SKUS[:3] for ts in (1, 2)])
    await send([p(t, "s", 3, timestamp=yesterday) for t in TENANTS])
    await send([p("a", "s", 10 + i, id=f"i{i}") for i in range(5)] + [p("a", "s", 20)])
    first = await (await client.get("/aggregates?limit=10000")).get_json()
    before = {
        (r["date"], r["tenant_id"], r["product_sku"], r["use_unit"]) for r in first["aggregates"]
    }
    turn = iter(range(10_000))

    async def disturb() -> None:
        n = next(turn)
        await send([p("0", f"n{n}"), p("a", "s", 5), p("\U0001f601", "s", timestamp=yesterday)])
        if n % 3 == 0:
            day = "2026-11-27" if n % 2 else "2026-11-28"
            response = await client.post("/aggregates/commit", json={"date": day})
            assert response.status_code == 200

    for status in ("all", "open", "committed"):
        rows = await pages(f"/aggregates?limit=3&status={status}", "aggregates", disturb)
        keys = [(r["date"], r["tenant_id"], r["product_sku"], r["use_unit"]) for r in rows]
        assert keys == sorted(set(keys)), status
        if status == "all":
            assert before <= set(keys)

    pulses = await pages("/pulses?tenant_id=a&date=2026-11-28&limit=2", "pulses", disturb)
    ids = [x["id"] for x in pulses]
    assert len(ids) == len(set(ids))
    mine = [x["id"] for x in pulses if not x["id_assigned"]]
    assert mine == [f"i{i}" for i in range(5)]

    batches = await pages("/batches?limit=1", "batches", disturb)
    order = [(b["date"], b["batch_id"]) for b in batches]
    assert order == sorted(set(order))
    assert order, "commits made batches"


def test_sqlite_pulses_page_across_span_chunks_folds_and_purges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tenant-day whose log rows fill several spans (`_SPAN_MAX` made 2), some
    folded and some still in the log's tail, with rows of other tenants and
    days between them: every page size lists each pulse once, in order; after
    a purge of the oldest rows, the rest."""
    monkeypatch.setattr(sqlite_store, "_SPAN_MAX", 2)
    store = SQLiteStore.open(
        tmp_path / "s", partitions=1, durability="os", busy_timeout=BUSY_TIMEOUT
    )
    try:
        written: list[str] = []
        for i in range(15):
            rows = [
                make_pulse("t", "s", "u", str(100 * i + j), DAYS[0], ts=T0 + i, id=None)
                for j in range(i % 3 + 1)
            ]
            rows.insert(1, make_pulse("other", "s", "u", "9", DAYS[0], ts=T0 + i, id=None))
            rows.append(make_pulse("t", "s", "u", "9", DAYS[1], ts=T0 + i, id=None))
            write(store, rows, received_us=T0 + i)
            written += [
                format_nanos(p.nanos) for p in rows if p.tenant_id == "t" and p.day == DAYS[0]
            ]
            if i in (4, 9):
                store.aggregates(AggregateQuery(limit=1))  # folds: spans for rows so far
        for size in (1, 2, 3, 7, 100):
            got = [row[3] for row in same_pulses(store, "t", DAYS[0], size)]
            assert got == written, size
        store.aggregates(AggregateQuery(limit=1))
        store.purge(0, T0 + 3)  # the first three log rows
        kept = [a for a in written if int(a) >= 300]
        for size in (1, 2, 5):
            assert [row[3] for row in same_pulses(store, "t", DAYS[0], size)] == kept, size
    finally:
        store.close()
