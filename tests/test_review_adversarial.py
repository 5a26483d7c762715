"""A hostile review of the changes of c5f330b..HEAD, each attacked where money is at stake.

batches      bodies within batch_max_bytes at the extremes (29-digit totals,
             names of four-byte characters, `"` and `\\`, big partitions and
             sequence numbers); every open bucket in exactly one batch; a
             commit over many small batches SIGKILLed mid-way is still
             exactly once, corrections included (holds)
outbox       the body comes with the claim: two deliverers on one store,
             outcomes recorded again after StoreOutcomeUnknown, a stop
             during the pauses between tries (holds)
reads        a scoped key's /aggregates, one store query for all its
             tenants: odd Unicode and array-literal names, thousands of
             tenants, cursors at their longest, page by page against an
             admin key's view, on SQLite (folded and unfolded) and
             PostgreSQL (holds)
intake       ids of the form the store assigns, on every decode path
             (holds); an id the store assigned before it named pulses
             `srv-<store id>-...`, shown as assigned by GET /pulses and
             resent: counted twice (DEFECT)
postgres     a new store refused for a store in a schema the role cannot
             even reach (DEFECT); after a read-only freeze is lifted,
             readiness and writes come back directly (holds), but never
             through PgBouncer in session pooling (DEFECT)
sqlite       a store upgraded from schema 2 commits through `INDEXED BY
             buckets_open` (holds)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import random
import secrets
import shutil
import types
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import msgspec
import psycopg
import pytest
import trio

from ingestor.api import create_app
from ingestor.auth import Principal
from ingestor.clock import epoch_us
from ingestor.config import load_settings
from ingestor.deliverer import Deliverer
from ingestor.errors import StoreBusy, StoreError, StoreOutcomeUnknown
from ingestor.intake import Rules, decode_pulses
from ingestor.ledger import BATCH_MIN_BYTES, BucketState, commit_batches, new_batches
from ingestor.model import Batch, Pulse
from ingestor.money import parse_nanos
from ingestor.partition import partition_of
from ingestor.reads import list_aggregates
from ingestor.runtime import Runtime
from ingestor.service import open_service
from ingestor.sinks.memory import MemorySink
from ingestor.store import AggregateQuery, Store, open_store
from ingestor.store.postgres import PostgresStore
from ingestor.store.sqlite import SQLiteStore
from tests.e2e.cluster_support import fresh_database, require_postgres
from tests.support.server import ServerProcess, day_before, wait_until

DAY = "2026-11-27"
T0 = epoch_us(dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC))
NOW = epoch_us(dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC))
_decode_batch = msgspec.json.Decoder(Batch).decode

# Names a SQL array literal, a JSON text or a byte comparison could get wrong.
ODD_TENANTS = [
    "\U0010ffff" * 128,  # the longest name: 512 bytes of UTF-8
    '"' * 128,
    "\\" * 128,
    "NULL",
    "null",
    "{a,b}",
    "a,b",
    " lead",
    "trail ",
    "é",  # NFC
    "e\u0301",  # NFD: another tenant
    "租户🧾",
    "line\u2028sep",
    "\ufeffbom",
    "it's",
    "%_*",
    "[1]",
]
LONG_SKU = "\U0001f9fe" * 128
LONG_UNIT = "\U0010ffff" * 64


def nanos(text: str) -> int:
    return parse_nanos(text)


def idless(tenant: str, sku: str, unit: str, amount: int, *, day: str = DAY, ts: int = T0) -> Pulse:
    return Pulse(tenant, sku, unit, amount, "", False, ts, day, b"")


def write(store: Store, pulses: Sequence[Pulse], received_us: int = T0) -> None:
    by_partition: dict[int, list[Pulse]] = defaultdict(list)
    for p in pulses:
        by_partition[partition_of(p.tenant_id, store.partitions)].append(p)
    for partition, group in sorted(by_partition.items()):
        outcomes = store.write_pulses(partition, group, received_us)
        assert outcomes == ["accepted"] * len(group)


def commit(store: Store, now_us: int, max_records: int, max_bytes: int) -> list[Any]:
    summaries = []
    for partition in range(store.partitions):
        summaries += store.commit_day(partition, DAY, now_us, max_records, max_bytes)
    return summaries


# -- 1. batches: bytes, exactly once ---------------------------------------------------


def _extreme_buckets(rng: random.Random, count: int) -> list[BucketState]:
    alphabet = ["a", '"', "\\", "é", "租", "🧾", "\U0010ffff", "\u2028"]

    def name(limit: int) -> str:
        if rng.random() < 0.3:  # at its longest, of one character
            return rng.choice(alphabet) * limit
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, limit)))

    buckets: dict[tuple[str, str, str, str], BucketState] = {}
    while len(buckets) < count:
        key = (DAY, name(128), name(128), name(64))
        # Totals up to 29 integer digits (what 10^11 pulses of the largest
        # amount add up to), 9 fractional; some already committed in part.
        used = rng.choice([10**38 - 1, rng.randrange(10**38), rng.randrange(1, 10**12)])
        revision = rng.choice([0, 0, 1, 7])
        count_ = rng.randint(2, 10**12)
        committed = 0 if revision == 0 else rng.randrange(used)
        committed_count = 0 if revision == 0 else rng.randrange(1, count_)
        buckets[key] = BucketState(key, used, count_, committed, committed_count, revision)
    return list(buckets.values())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_batch_bodies_fit_their_bytes_at_the_extremes_and_hold_each_bucket_once(
    seed: int,
) -> None:
    """A body over batch_max_bytes is refused by NATS's max_payload or a
    receiver's body limit for good, and its usage billed nowhere. At the
    extremes of every field (names of 128 four-byte characters or of JSON
    escapes, 29-digit totals, partition 9999, sequence numbers past 99999),
    for every size from the least allowed up: each body is at most
    batch_max_bytes, each open bucket is in exactly one batch with its delta
    and total, and the same buckets in another order make the same batches."""
    rng = random.Random(seed)
    buckets = _extreme_buckets(rng, 120)
    for max_bytes in (BATCH_MIN_BYTES, BATCH_MIN_BYTES + 1, 4_000, 9_999, 65_536):
        for max_records in (1, 3, 1000):
            rows, summaries = new_batches(
                "0123456789ab",
                DAY,
                9999,
                99_990,
                buckets,
                max_records=max_records,
                now_us=NOW,
                max_bytes=max_bytes,
            )
            shuffled = rng.sample(buckets, len(buckets))
            again, _ = new_batches(
                "0123456789ab",
                DAY,
                9999,
                99_990,
                shuffled,
                max_records=max_records,
                now_us=NOW,
                max_bytes=max_bytes,
            )
            assert again == rows, "the same buckets in another order made other batches"
            seen: dict[tuple[str, str, str], int] = {}
            for row, summary in zip(rows, summaries, strict=True):
                body = row[8]
                assert len(body) <= max_bytes, (
                    f"a body of {len(body)} bytes, over batch_max_bytes {max_bytes}"
                )
                batch = _decode_batch(body)
                assert batch.batch_id == row[0] == summary.batch_id
                assert 1 <= batch.record_count == len(batch.records) <= max_records
                total = sum(nanos(r.used_amount) for r in batch.records)
                assert nanos(batch.used_amount) == total == nanos(summary.used_amount)
                for r in batch.records:
                    key = (r.tenant_id, r.product_sku, r.use_unit)
                    assert key not in seen, f"a bucket in two batches: {key!r}"[:200]
                    seen[key] = 1
                    bucket = next(b for b in buckets if b.key[1:] == key)
                    assert batch.kind == ("initial" if bucket.revision == 0 else "correction")
                    assert r.revision == bucket.revision + 1
                    assert nanos(r.used_amount) == bucket.used_nanos - bucket.committed_nanos
                    assert nanos(r.total_amount) == bucket.used_nanos
                    assert r.pulse_count == bucket.pulse_count - bucket.committed_count
                    assert r.total_count == bucket.pulse_count
            assert len(seen) == len(buckets)
            assert [row[3] for row in rows] == list(range(99_991, 99_991 + len(rows)))
            assert len({row[0] for row in rows}) == len(rows)
    # The split by bytes changes nothing where bytes do not bind.
    plain = commit_batches(buckets, 7, 10**9)
    for kind in ("initial", "correction"):
        sizes = [len(records) for k, records in plain if k == kind]
        assert all(size == 7 for size in sizes[:-1])
        assert 1 <= sizes[-1] <= 7


# -- 2. the outbox: the body with its claim --------------------------------------------


class _FlakyStore:
    """A store whose record_delivery commits and then reports StoreOutcomeUnknown
    (`unknown` times per batch), or fails before writing (`busy` times), as a
    database failing over does to the session it was answering on."""

    def __init__(
        self,
        store: SQLiteStore,
        *,
        unknown: int = 0,
        busy: int = 0,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._on_failure = on_failure
        self.unknown = unknown
        self.busy = busy
        self.records: list[tuple[str, str]] = []
        self._tries: dict[str, int] = defaultdict(int)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def record_delivery(self, partition: int, batch_id: str, **kwargs: Any) -> None:
        self.records.append((batch_id, kwargs["status"]))
        tries = self._tries[batch_id] = self._tries[batch_id] + 1
        if tries <= self.busy:
            if self._on_failure is not None:
                trio.from_thread.run_sync(self._on_failure)
            raise StoreBusy("record delivery: the store is busy")
        self._store.record_delivery(partition, batch_id, **kwargs)
        if tries <= self.busy + self.unknown:
            raise StoreOutcomeUnknown("record delivery: lost the connection as it committed")


class _WatchingSink:
    """Records each delivery, and fails if one batch is on its way twice at once
    or is sent with a body that is not its own."""

    def __init__(self, store: SQLiteStore, pause: float, retryable: set[str]) -> None:
        self.name = "watching"
        self._store = store
        self._pause = pause
        self._retryable = retryable
        self.sent: list[str] = []
        self.on_the_way: set[str] = set()
        self.problems: list[str] = []

    async def deliver(self, batch_id: str, day: str, body: bytes) -> None:
        from ingestor.errors import SinkRetryable

        if batch_id in self.on_the_way:
            self.problems.append(f"{batch_id} sent twice at once")
        self.on_the_way.add(batch_id)
        try:
            self.sent.append(batch_id)
            batch = _decode_batch(body)
            view = self._store.batch(batch_id)
            assert view is not None
            if batch.batch_id != batch_id or batch.records != view.records or day != view.date:
                self.problems.append(f"{batch_id} sent with the body of {batch.batch_id}")
            await trio.sleep(self._pause)
            if batch_id in self._retryable:
                self._retryable.discard(batch_id)
                raise SinkRetryable("HTTP 503")
        finally:
            self.on_the_way.discard(batch_id)

    async def aclose(self) -> None:
        return None


def _outbox(tmp_path: Path) -> tuple[SQLiteStore, list[str]]:
    store = SQLiteStore.open(tmp_path / "store", partitions=4, durability="os", busy_timeout=5)
    pulses = [
        idless(f"tenant-{n}-{'租' * 100}", f"sku{k}", "unit", nanos("999999999999999999.5"))
        for n in range(24)
        for k in range(3)
    ]
    write(store, pulses)
    summaries = commit(store, NOW, 1000, BATCH_MIN_BYTES)
    ids = [s.batch_id for s in summaries]
    assert len(ids) >= 12  # the bytes split them: a few records a batch at most
    return store, ids


async def test_two_deliverers_send_each_batch_once_with_its_own_body_and_record_it_once(
    tmp_path: Path,
) -> None:
    """Two processes deliver from one store; every outcome's first write commits
    but is reported StoreOutcomeUnknown, so each is recorded again. No batch is
    on its way twice at once, each goes with its own body, each outcome counts
    once (attempts), and a retried batch's recorded next attempt is the one its
    own claim set, not overwritten by a try that landed on nothing."""
    store, ids = _outbox(tmp_path)
    try:
        retryable = set(ids[::5])
        sink = _WatchingSink(store, 0.02, set(retryable))
        flaky = _FlakyStore(store, unknown=1)
        clock = [NOW + 1_000_000]

        def deliverer() -> Deliverer:
            return Deliverer(
                cast(Store, flaky),
                sink,
                concurrency=4,
                retry_initial=60,
                retry_max=600,
                lease=30,
                clock=lambda: clock[0],
                rng=random.Random(5),
            )

        first, second = deliverer(), deliverer()
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first.deliver_due)
                nursery.start_soon(second.deliver_due)
        assert sink.problems == []
        assert sorted(sink.sent) == sorted(ids), "each batch sent once, by one of the two"
        for batch_id in ids:
            view = store.batch(batch_id)
            assert view is not None
            if batch_id in retryable:
                assert (view.status, view.attempts) == ("pending", 1), (batch_id, view)
            else:
                assert (view.status, view.attempts) == ("delivered", 1), (batch_id, view)
        assert first.unrecorded == second.unrecorded == 0
        # The retries come due after their backoff, not at the end of a lease.
        assert store.due_batches(clock[0], 100) == []
        clock[0] += 61_000_000
        with trio.fail_after(30):
            await first.deliver_due()
        assert sink.problems == []
        for batch_id in ids:
            view = store.batch(batch_id)
            assert view is not None
            assert view.status == "delivered", (batch_id, view)
            assert view.attempts == (2 if batch_id in retryable else 1)
        assert sorted(sink.sent) == sorted([*ids, *retryable])
    finally:
        store.close()


async def test_a_stop_during_the_pause_between_tries_still_records_the_outcome(
    tmp_path: Path,
) -> None:
    """SIGTERM cancels the deliverer while a sink has just taken a batch and the
    store failed its first try: the outcome must still be recorded (else the
    batch goes again once its lease ends), and the stop must not hang."""
    store, _ = _outbox(tmp_path)
    try:
        failed = trio.Event()
        flaky = _FlakyStore(store, busy=2, on_failure=failed.set)
        sink = MemorySink()
        deliverer = Deliverer(
            cast(Store, flaky),
            sink,
            concurrency=2,
            retry_initial=1,
            retry_max=60,
            lease=30,
            clock=lambda: NOW + 1_000_000,
        )
        with trio.fail_after(10):
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(deliverer.deliver_due)

                    async def stop_at_first_failure() -> None:
                        await failed.wait()
                        scope.cancel()  # during the 0.1 s pause

                    nursery.start_soon(stop_at_first_failure)
        attempted = set(sink.attempts)
        assert attempted, "nothing was sent before the stop"
        for batch_id in attempted:
            view = store.batch(batch_id)
            assert view is not None
            if batch_id in sink.delivered:
                assert (view.status, view.attempts) == ("delivered", 1), (batch_id, view)
            else:  # cancelled on its way: given back, due at once
                assert view.status == "pending"
                assert store.due_batches(NOW + 2_000_000, 100) != []
    finally:
        store.close()


# -- 3. scoped reads ---------------------------------------------------------------------


def _bucket_pulses() -> list[Pulse]:
    pulses = []
    for n, tenant in enumerate(ODD_TENANTS):
        skus = (("s", "u"), (LONG_SKU, LONG_UNIT), ('"\\', '\\"'), ("\U0010ffff", "u"))
        for sku, unit in skus:
            amount = nanos("999999999999999999.999999999") if n % 3 == 0 else n + 1
            pulses.append(idless(tenant, sku, unit, amount))
    for n in range(40):  # tenants no key below names
        pulses.append(idless(f"other-{n}", "s", "u", n + 1))
    return pulses


async def _pages(store: Store, principal: Principal, **args: str) -> tuple[list[Any], int]:
    runtime = cast(Runtime, types.SimpleNamespace(store=store))
    rows: list[Any] = []
    cursor: str | None = None
    longest = 0
    while True:
        query = dict(args)
        if cursor is not None:
            query["cursor"] = cursor
            longest = max(longest, len(cursor))
        page = await list_aggregates(runtime, principal, query)
        rows += page.aggregates
        cursor = page.next_cursor
        if cursor is None:
            return rows, longest


@contextmanager
def _store_of(kind: str, tmp_path: Path) -> Iterator[Store]:
    if kind.startswith("sqlite"):
        store: Store = SQLiteStore.open(
            tmp_path / "store", partitions=8, durability="os", busy_timeout=5
        )
        try:
            yield store
        finally:
            store.close()
        return
    with fresh_database(require_postgres()) as url:
        store = PostgresStore.open(url, partitions=8, pool_size=2, busy_timeout=5)
        try:
            yield store
        finally:
            store.close()


@pytest.mark.parametrize("kind", ["sqlite", "sqlite-unfolded", "postgres"])
async def test_a_scoped_keys_pages_are_the_admin_view_of_its_tenants(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read key of odd tenants (astral, quotes, backslashes, NULL, braces and
    commas an array literal holds, NFC and NFD spellings, a BOM) and 3,000
    tenants without usage: its /aggregates, one store query, page by page, is
    exactly the admin key's view of those tenants, with every cursor (up to the
    longest names) taken back. Also on SQLite's unfolded path (a fold that
    cannot be written) and with some usage still in the log's tail."""
    with _store_of(kind, tmp_path) as store:
        pulses = _bucket_pulses()
        write(store, pulses[: len(pulses) // 2])
        await trio.to_thread.run_sync(store.aggregates, AggregateQuery(limit=10))  # folds
        write(store, pulses[len(pulses) // 2 :])  # a tail, unfolded on SQLite
        # Committed in part, then more: every status has rows.
        commit(store, NOW, 1000, BATCH_MIN_BYTES)
        write(store, [idless(t, "s", "u", 5) for t in ODD_TENANTS[::2]])
        if kind == "sqlite-unfolded":
            monkeypatch.setattr(store, "_settle", lambda parts: False)
        admin = Principal("admin", None, "admin")
        tenants = frozenset([*ODD_TENANTS[:-2], *(f"ghost-{n}" for n in range(3000))])
        key = Principal("read", tenants, "key")
        for status in ("all", "open", "committed"):
            everything, _ = await _pages(store, admin, status=status, limit="7")
            expected = [a for a in everything if a.tenant_id in tenants]
            assert expected
            for limit in ("1", "4", "10000"):
                got, longest = await _pages(store, key, status=status, limit=limit)
                assert got == expected, (kind, status, limit)
                assert longest <= 2048
        everything, _ = await _pages(store, admin, limit="100")
        single = Principal("read", frozenset([ODD_TENANTS[0]]), "one")
        got, longest = await _pages(store, single, limit="1")
        assert got == [a for a in everything if a.tenant_id == ODD_TENANTS[0]]
        assert longest > 1024  # the longest names made the longest cursors


# -- 4. intake: ids the store assigns ----------------------------------------------------

STORE_ID = "71c6bea67204"


def _rules() -> Rules:
    return Rules(late_window_s=35 * 86400, future_skew_s=300, max_batch=100, store_id=STORE_ID)


def _pulse_json(pulse_id: str, escaped: bool = False) -> str:
    text = json.dumps(pulse_id, ensure_ascii=False)
    if escaped:  # each "s" as \u0073, and every byte of it as a JSON escape may hide it
        text = text.replace("s", "\\u0073")
    return (
        '{"tenant_id": "t1", "product_sku": "s", "use_unit": "u", "used_amount": "1",'
        f' "id": {text}}}'
    )


@pytest.mark.parametrize("form", ["object", "array", "ndjson", "ndjson-broken-line"])
@pytest.mark.parametrize("escaped", [False, True])
def test_an_id_of_the_stores_own_form_is_refused_on_every_decode_path(
    form: str, escaped: bool
) -> None:
    """`srv-<this store>-...` is refused whatever path decodes it (the fast one,
    the strict one a backslash forces, line by line after a broken line);
    its case variants and other stores' ids are the client's own."""
    own = [f"srv-{STORE_ID}-1-0", f"srv-{STORE_ID}-", f"srv-{STORE_ID}-x"]
    theirs = [f"SRV-{STORE_ID}-1-0", f"srv-{STORE_ID.upper()}-1-0", "srv-0123456789ab-1-0"]
    ids = [*own, *theirs]
    lines = [_pulse_json(i, escaped) for i in ids]
    if form == "object":
        for pulse_id, line in zip(ids, lines, strict=True):
            intake = decode_pulses(line.encode(), "application/json", _rules(), NOW)
            if pulse_id in own:
                assert [i.status for i in intake.items] == ["rejected"], pulse_id
                assert intake.pulses == []
            else:
                assert intake.items == [], pulse_id
                assert len(intake.pulses) == 1, pulse_id
        return
    if form == "array":
        body, kind = "[" + ",".join(lines) + "]", "application/json"
    else:
        if form == "ndjson-broken-line":
            lines.append("{not json")
        body, kind = "\n".join(lines), "application/x-ndjson"
    intake = decode_pulses(body.encode(), kind, _rules(), NOW)
    refused = {item.index for item in intake.items if item.status == "rejected"}
    expected = set(range(len(own)))
    if form == "ndjson-broken-line":
        expected.add(len(ids))
    assert refused == expected
    assert sorted(index for index, _ in intake.pulses) == list(range(len(own), len(ids)))


async def test_resending_a_pulse_with_the_id_its_store_assigned_before_srv_store_ids_counts_once(
    tmp_path: Path,
) -> None:
    """Until 68f0622 (two days before this change) a pulse sent without an id
    was named `srv-<run><request>-<index>` and kept that name: upgraded stores
    hold such pulses for the 35-day window, and GET /pulses shows each with
    `id_assigned: true`. The change refuses, as a client id, an id "of the
    form the store gives pulses sent without one" so that a resend of such a
    pulse, with the id the trail showed, is not counted twice (README: "A
    pulse sent with an id of that form is rejected: the store gave it to a
    pulse it holds already"). The older names of the same store get no such
    protection: resent, the pulse is accepted and billed twice."""
    settings = load_settings(
        environ={},
        data_dir=str(tmp_path / "data"),
        partitions=4,
        commit_interval=3600,
        durability="os",
    )
    clock_us = epoch_us(dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC))
    ts = clock_us - 3600 * 1_000_000
    old_name = "srv-0a1b2c3d4e5f07-3"  # as the releases before 68f0622 named it
    store = open_store(settings)
    try:
        # Stored by such a release: an id-less pulse that kept its name.
        before = Pulse(
            "t1", "sku1", "api_call", nanos("2.5"), old_name, False, ts, "2026-11-28", b""
        )
        assert store.write_pulses(partition_of("t1", store.partitions), [before], ts) == [
            "accepted"
        ]
    finally:
        store.close()
    async with open_service(settings, sink=MemorySink(), clock=lambda: clock_us) as runtime:
        client = create_app(runtime).test_client()
        trail = await (await client.get("/pulses?tenant_id=t1&date=2026-11-28")).get_json()
        [shown] = trail["pulses"]
        assert (shown["id"], shown["id_assigned"]) == (old_name, True)
        resend = {
            "tenant_id": shown["tenant_id"],
            "product_sku": shown["product_sku"],
            "use_unit": shown["use_unit"],
            "used_amount": shown["used_amount"],
            "timestamp": shown["timestamp"],
            "id": shown["id"],
        }
        answer = await (await client.post("/pulses", json=resend)).get_json()
        aggregates = await (await client.get("/aggregates?tenant_id=t1")).get_json()
    [bucket] = aggregates["aggregates"]
    assert (bucket["used_amount"], bucket["pulse_count"]) == ("2.5", 1), (
        f"the pulse the trail shows as {old_name!r} (id_assigned), resent with that id,"
        f" was answered {answer} and counted again: {bucket}"
    )


# -- 5. PostgreSQL: false refusals, readiness after a freeze ------------------------------


def _execute(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        for statement in statements:
            conn.execute(statement.encode())


def _as(url: str, role: str, schema: str) -> str:
    """`url` as `role` (trust: no password), its sessions' search_path `schema`."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    options = "options=" + quote(f"-csearch_path={schema}", safe="")
    return urlunsplit(parts._replace(netloc=f"{role}@{host}", query=options))


@contextmanager
def _roles(count: int) -> Iterator[list[str]]:
    """LOGIN roles of the test's own, dropped afterwards (open them before the
    database they are used in, so that it is dropped first)."""
    admin = require_postgres()
    names = [f"rv_review_{secrets.token_hex(4)}" for _ in range(count)]
    try:
        for name in names:
            _execute(admin, f"CREATE ROLE {name} LOGIN")
        yield names
    finally:
        for name in names:
            _execute(admin, f"DROP ROLE IF EXISTS {name}")


def test_a_store_in_a_schema_the_role_cannot_reach_does_not_refuse_a_new_deployment() -> None:
    """Three deployments share a database, each with a role and a schema of its
    own (the manual's secure schema usage pattern). A and B start. Then a
    blanket grant gives PUBLIC INSERT on A's tables (not USAGE on A's schema:
    C's role cannot read, let alone write, one row of A's store). C's first
    start must make its own store: the refusal is meant for "a store this role
    writes" that the search_path stopped reaching, and C writes nothing of A.
    Refused, C cannot start at all, and the message's way out (take the
    role's INSERT on that meta table) is A's owner's to take, not C's."""
    admin = require_postgres()
    with _roles(3) as (role_a, role_b, role_c), fresh_database(admin) as url:
        for role, schema in ((role_a, "a"), (role_b, "b"), (role_c, "c")):
            _execute(url, f"CREATE SCHEMA {schema} AUTHORIZATION {role}")
        opened: dict[str, str] = {}
        for role, schema in ((role_a, "a"), (role_b, "b")):
            store = PostgresStore.open(
                _as(url, role, schema), partitions=2, pool_size=1, busy_timeout=5
            )
            opened[schema] = store.store_id
            store.close()
        _execute(_as(url, role_a, "a"), "GRANT INSERT ON ALL TABLES IN SCHEMA a TO PUBLIC")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # C cannot write A's store
            _execute(_as(url, role_c, "c"), "INSERT INTO a.meta VALUES ('k', 'v')")
        try:
            store = PostgresStore.open(
                _as(url, role_c, "c"), partitions=2, pool_size=1, busy_timeout=5
            )
        except StoreError as exc:
            pytest.fail(f"deployment C, whose role cannot reach schema a, was refused: {exc}")
        try:
            assert store.store_id not in opened.values()
        finally:
            store.close()


async def _trouble_gone(store: PostgresStore, within: float) -> str | None:
    """None once `trouble()` answers None (polled as /readyz and the service's
    watcher do), or the last trouble after `within` seconds."""
    trouble: str | None = "never asked"
    with trio.move_on_after(within):
        while True:
            trouble = await trio.to_thread.run_sync(store.trouble)
            if trouble is None:
                return None
            await trio.sleep(0.25)
    return trouble


@pytest.mark.parametrize("via", ["direct", "pgbouncer"])
async def test_readiness_and_writes_come_back_once_a_read_only_freeze_is_lifted(via: str) -> None:
    """A DBA freezes writes (`ALTER DATABASE ... SET default_transaction_read_only
    = on`, sessions ended so it takes effect), then lifts it (`RESET`). The
    instance rightly answers 503 and /readyz 503 meanwhile; once lifted it must
    be ready again and take writes, as README promises ("until a new session
    may write"). Through PgBouncer in session pooling, closing a client
    connection does not end the server session behind it, which keeps the
    read-only default it began with (a DISCARD ALL does not reset it): until
    PgBouncer recycles that session (server_lifetime, an hour by default),
    or is told to (RECONNECT on its console, as the README says)."""
    from tests.e2e.test_pooler_adversarial import PgBouncer

    admin = require_postgres()
    with fresh_database(admin) as url:
        db = urlsplit(url).path.lstrip("/")
        bouncer = PgBouncer(url, "session") if via == "pgbouncer" else None
        try:
            if bouncer is not None:
                await bouncer.start()
            target = url if bouncer is None else bouncer.url
            store = await trio.to_thread.run_sync(
                lambda: PostgresStore.open(target, partitions=2, pool_size=3, busy_timeout=3)
            )
            try:
                part = partition_of("acme", store.partitions)
                sent = iter(range(1_000_000))

                def one_write() -> str:
                    p = Pulse("acme", "s", "u", 10**9, f"p{next(sent)}", True, T0, DAY, b"")
                    try:
                        return store.write_pulses(part, [p], T0)[0]
                    except StoreError as exc:
                        return f"refused: {exc}"

                assert await trio.to_thread.run_sync(one_write) == "accepted"
                _execute(
                    admin,
                    f"ALTER DATABASE {db} SET default_transaction_read_only = on",
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    f" WHERE datname = '{db}' AND pid <> pg_backend_pid()",
                )
                frozen = [await trio.to_thread.run_sync(one_write) for _ in range(4)]
                assert "accepted" not in frozen, frozen
                assert await trio.to_thread.run_sync(store.trouble) is not None
                _execute(admin, f"ALTER DATABASE {db} RESET default_transaction_read_only")
                if bouncer is not None:
                    # A pooler keeps its server sessions, with the defaults they
                    # began with: the README has the operator tell it to open new ones.
                    await trio.to_thread.run_sync(bouncer.admin, "RECONNECT")
                trouble = await _trouble_gone(store, within=10)
                if trouble is not None and bouncer is not None:
                    # What the pooler held: which of its sessions outlived the
                    # RECONNECT, and what it logged about them.
                    servers = await trio.to_thread.run_sync(bouncer.admin, "SHOW SERVERS")
                    trouble += f"\npgbouncer's servers: {servers}\n{bouncer.log()}"
                after = [await trio.to_thread.run_sync(one_write) for _ in range(6)]
            finally:
                await trio.to_thread.run_sync(store.close)
        finally:
            if bouncer is not None:
                await bouncer.stop()
                shutil.rmtree(bouncer.root, ignore_errors=True)
    assert trouble is None, f"not ready 10 s after the freeze was lifted ({via}): {trouble}"
    assert after == ["accepted"] * len(after), f"writes after the freeze was lifted: {after}"


# -- 6. a commit over many batches, killed mid-way (e2e) ----------------------------------

BucketId = tuple[str, str, str]
QUIET = {"INGESTOR_COMMIT_INTERVAL": "3600", "INGESTOR_COMMIT_GRACE": "30d"}


def _wave(rng: random.Random, size: int, fresh: int) -> list[dict[str, Any]]:
    """`size` pulses, over buckets of names from short to longest, `fresh` new ones."""
    pulses = []
    for n in range(size):
        b = rng.randrange(fresh)
        tenant = f"t{b % 37}-" + "租" * (b % 5) * 25
        sku = ('"\\' * (b % 3) * 20 + f"sku{b}")[:128]
        unit = ["u", "\U0010ffff" * 64, "gb"][b % 3]
        amount = rng.choice(["999999999999999999.999999999", "0.000000001", str(n % 97)])
        pulses.append(
            {
                "tenant_id": tenant,
                "product_sku": sku,
                "use_unit": unit,
                "used_amount": amount,
                "id": f"w{secrets.token_hex(8)}",
            }
        )
    return pulses


async def _all_batches(http: httpx.AsyncClient, server: ServerProcess, day: str) -> list[Any]:
    found: list[Any] = []
    cursor = None
    while True:
        params = {"date": day, "limit": "1000", **({"cursor": cursor} if cursor else {})}
        page = (await http.get(f"{server.url}/batches", params=params)).json()
        found += page["batches"]
        cursor = page["next_cursor"]
        if cursor is None:
            return found


async def test_a_commit_of_many_small_batches_killed_mid_way_is_exactly_once(
    tmp_path: Path,
) -> None:
    """batch_max_bytes at its least splits a day into hundreds of batches of a
    few records (names up to their longest, 29-digit totals). The commit is
    SIGKILLed a moment after it begins, twice (initials, then corrections for
    late pulses), the server restarted and the day committed again: every
    file the sink holds is at most batch_max_bytes, is the batch its name
    says, and each bucket's deltas, revisions 1..n with one initial, add up to
    exactly what was acknowledged, as /aggregates and /batches agree."""
    rng = random.Random(20261207)
    day = day_before(1)
    env = {
        **QUIET,
        "INGESTOR_BATCH_MAX_BYTES": str(BATCH_MIN_BYTES),
        "INGESTOR_PARTITIONS": "8",
        "INGESTOR_RETRY_INITIAL": "0.1",
        "INGESTOR_RETRY_MAX": "0.5",
        # A batch on its way when the process was killed goes again once its
        # lease (2 x sink_timeout + 5 s) ends.
        "INGESTOR_SINK_TIMEOUT": "0.5",
    }
    expected: dict[BucketId, tuple[Decimal, int]] = defaultdict(lambda: (Decimal(0), 0))
    server = ServerProcess(tmp_path / "data", env=env)
    try:
        await server.start()
        async with httpx.AsyncClient(timeout=60) as http:
            for wave, (size, fresh) in enumerate(((3000, 900), (800, 1100))):
                pulses = _wave(rng, size, fresh)
                for p in pulses:
                    p["timestamp"] = f"{day}T{12 + wave}:00:00Z"
                for start in range(0, len(pulses), 500):
                    chunk = pulses[start : start + 500]
                    answer = await http.post(f"{server.url}/pulses", json=chunk)
                    assert answer.status_code == 202, answer.text
                    assert answer.json()["accepted"] == len(chunk), answer.text
                for p in pulses:
                    key = (p["tenant_id"], p["product_sku"], p["use_unit"])
                    amount, count = expected[key]
                    expected[key] = (amount + Decimal(p["used_amount"]), count + 1)

                async def doomed_commit() -> None:
                    with contextlib.suppress(httpx.TransportError):  # killed under it
                        await http.post(f"{server.url}/aggregates/commit", json={"date": day})

                # Killed early, then later: a commit writes a partition a
                # transaction, and one of these lands between two (0.02 s
                # into the request did, on a 2-core VM, 147 batches of 250).
                for delay in (0.005, 0.015, 0.03):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(doomed_commit)
                        await trio.sleep(delay)
                        await server.kill()
                    await server.start()
                again = await http.post(f"{server.url}/aggregates/commit", json={"date": day})
                assert again.status_code == 200, again.text

                async def delivered() -> bool:
                    batches = await _all_batches(http, server, day)
                    return all(b["status"] == "delivered" for b in batches)

                await wait_until(delivered, within=60, interval=0.2, what="every batch delivered")
            batches = await _all_batches(http, server, day)
            aggregates: list[Any] = []
            cursor = None
            while True:
                params = {"from": day, "to": day, "limit": "10000"}
                if cursor:
                    params["cursor"] = cursor
                page = (await http.get(f"{server.url}/aggregates", params=params)).json()
                aggregates += page["aggregates"]
                cursor = page["next_cursor"]
                if cursor is None:
                    break
    finally:
        await server.aclose()
    files = {path.stem: path.read_bytes() for path in (server.deliveries / day).glob("*.json")}
    assert sorted(files) == sorted(b["batch_id"] for b in batches)
    assert len(files) > 100, "the bytes did not split the day"
    shares: dict[BucketId, list[tuple[int, str, Decimal, int, Decimal, int]]] = defaultdict(list)
    for name, body in files.items():
        assert len(body) <= BATCH_MIN_BYTES, f"{name}: {len(body)} bytes"
        batch = _decode_batch(body)
        assert batch.batch_id == name
        for r in batch.records:
            shares[(r.tenant_id, r.product_sku, r.use_unit)].append(
                (
                    r.revision,
                    batch.kind,
                    Decimal(r.used_amount),
                    r.pulse_count,
                    Decimal(r.total_amount),
                    r.total_count,
                )
            )
    assert set(shares) == set(expected)
    problems = []
    for key, (amount, count) in expected.items():
        got = sorted(shares[key])
        revisions = [g[0] for g in got]
        kinds = [g[1] for g in got]
        if (
            revisions != list(range(1, len(got) + 1))
            or kinds[0] != "initial"
            or ("initial" in kinds[1:])
        ):
            problems.append(f"{key!r:.80}: revisions {revisions}, kinds {kinds}")
        if sum(g[2] for g in got) != amount or sum(g[3] for g in got) != count:
            problems.append(f"{key!r:.80}: deltas add up to {sum(g[2] for g in got)}, not {amount}")
        if (got[-1][4], got[-1][5]) != (amount, count):
            problems.append(f"{key!r:.80}: last total {got[-1][4]}, not {amount}")
    assert not problems, "\n".join(problems[:20])
    held = {
        (a["tenant_id"], a["product_sku"], a["use_unit"]): (
            Decimal(a["used_amount"]),
            a["pulse_count"],
            Decimal(a["committed_amount"]),
            a["committed_count"],
        )
        for a in aggregates
    }
    assert held == {k: (a, c, a, c) for k, (a, c) in expected.items()}


# -- 7. SQLite: INDEXED BY buckets_open on an upgraded store -----------------------------


def test_a_store_upgraded_from_schema_2_commits_through_buckets_open(tmp_path: Path) -> None:
    """Commits now name the index `buckets_open` (INDEXED BY): a store without
    it would fail every commit. A store of schema 2, upgraded when opened,
    commits its day, initials and a correction, and every bucket once."""
    from tests.test_sqlite_upgrade import as_version_2

    directory = tmp_path / "store"
    store = SQLiteStore.open(directory, partitions=4, durability="os", busy_timeout=5)
    pulses = [idless(f"t{n}", "s", "u", n + 1) for n in range(40)]
    write(store, pulses)
    store.aggregates(AggregateQuery(limit=1))  # folded, then a tail that is not
    write(store, [idless(f"t{n}", "s", "u", 1000) for n in range(0, 40, 3)])
    store.close()
    as_version_2(directory / "store.sqlite")
    store = SQLiteStore.open(directory, partitions=4, durability="os", busy_timeout=5)
    try:
        first = commit(store, NOW, 1000, BATCH_MIN_BYTES)
        write(store, [idless("t1", "s", "u", 7)])
        second = commit(store, NOW + 1, 1000, BATCH_MIN_BYTES)
        assert [s.kind for s in second] == ["correction"]
        assert commit(store, NOW + 2, 1000, BATCH_MIN_BYTES) == []
        committed = sum(nanos(s.used_amount) for s in [*first, *second])
        assert committed == sum(range(1, 41)) + 1000 * len(range(0, 40, 3)) + 7
        assert sum(s.record_count for s in first) == 40
        rows = store.aggregates(AggregateQuery(status="open", limit=100))
        assert rows == []
    finally:
        store.close()
