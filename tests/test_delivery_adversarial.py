"""Adversarial delivery tests: downstreams that misbehave, stores that fail, clocks that jump.

The downstreams are real: an HTTP/1.1 server (h11 on trio) in the test's own
trio run whose answer each test programs, the NATS server on 127.0.0.1:4222
and PostgreSQL on 127.0.0.1:5432. Stores are real SQLite or PostgreSQL
stores; the deliverer runs against them with an injected wall clock.

Tests that wait on timeouts run on `lazy_clock`: a trio MockClock that jumps
to the next deadline once the run has been idle for 30 ms of real time (the
autojump clock jumps at once, also while a store call runs in a thread, and
would fire the test's own deadlines during an SQLite read).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import h11
import msgspec
import nats
import nats.js.errors
import psycopg
import pytest
import trio
import trio.testing

from ingestor.api import create_app
from ingestor.clock import epoch_us
from ingestor.config import Settings, load_settings
from ingestor.deliverer import Deliverer
from ingestor.errors import ConfigError, StoreFull
from ingestor.model import Batch, Pulse
from ingestor.partition import partition_of
from ingestor.service import open_service
from ingestor.sinks import Sink
from ingestor.sinks.file import FileSink
from ingestor.sinks.http import HttpSink
from ingestor.sinks.memory import MemorySink
from ingestor.sinks.nats import NatsSink
from ingestor.store import Store
from ingestor.store.postgres import PostgresStore
from ingestor.store.sqlite import SQLiteStore
from tests.support.server import read_request, signed

from .conftest import FakeClock, pulse
from .sinks.test_nats import nats_server, on_nats

__all__ = ["nats_server"]  # a fixture this module's tests take from tests/sinks/test_nats.py

DAY = "2026-11-28"
T0 = epoch_us(dt.datetime(2026, 11, 28, 12, tzinfo=dt.UTC))
SECRET = "adversarial-secret"
NATS_URL = "nats://127.0.0.1:4222"


# -- a programmable downstream ------------------------------------------------------------


@dataclass
class Exchange:
    """One POST the downstream received; the test's `answer` replies through it."""

    batch_id: str
    body: bytes
    headers: dict[str, str]
    stream: trio.SocketStream
    connection: h11.Connection
    status: int | None = None

    @property
    def signature_ok(self) -> bool:
        return signed(SECRET, self.headers, self.body)

    async def respond(
        self, status: int, body: bytes = b'{"ok":true}', headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        head = [("Content-Length", str(len(body))), *headers]
        if not any(name.lower() == "content-type" for name, _ in head):
            head.append(("Content-Type", "application/json"))
        await self.stream.send_all(
            self.connection.send(h11.Response(status_code=status, headers=head))
            + self.connection.send(h11.Data(data=body))
            + self.connection.send(h11.EndOfMessage())
        )
        self.status = status

    async def drip(self, status: int, every: float) -> None:
        """Answer `status` at once, then a body of one byte every `every` s, for ever."""
        await self.stream.send_all(
            self.connection.send(
                h11.Response(status_code=status, headers=[("Content-Type", "application/json")])
            )
        )
        self.status = status
        while True:
            await trio.sleep(every)
            await self.stream.send_all(self.connection.send(h11.Data(data=b" ")))

    async def drop(self) -> None:
        """Close the connection without an answer (the confirmation is lost)."""
        await self.stream.aclose()


Answer = Callable[[Exchange], Awaitable[None]]


@dataclass
class Downstream:
    """An HTTP/1.1 server in the test's trio run; `answer` decides each reply."""

    answer: Answer
    received: list[Exchange] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/billing"

    def of(self, batch_id: str) -> list[Exchange]:
        return [e for e in self.received if e.batch_id == batch_id]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async with stream:
                while True:
                    exchange = await self._read(stream, connection)
                    if exchange is None:
                        return
                    self.received.append(exchange)
                    await self.answer(exchange)
                    if connection.our_state is not h11.DONE:
                        return
                    connection.start_next_cycle()

    async def _read(self, stream: trio.SocketStream, connection: h11.Connection) -> Exchange | None:
        received = await read_request(stream, connection)
        if received is None:
            return None
        headers, body = received
        return Exchange(headers.get("idempotency-key", ""), body, headers, stream, connection)


@contextlib.asynccontextmanager
async def downstream(answer: Answer) -> AsyncIterator[Downstream]:
    server = Downstream(answer)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def http_sink(url: str, seconds: float = 5) -> AsyncIterator[HttpSink]:
    sink = HttpSink(url, secret=SECRET, timeout=seconds)
    try:
        yield sink
    finally:
        await sink.aclose()


# -- stores, batches, deliverers ---------------------------------------------------------


@pytest.fixture
def lazy_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0.03)


@pytest.fixture
def wall() -> FakeClock:
    return FakeClock(dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore.open(tmp_path / "store", partitions=2, durability="os", busy_timeout=5)
    yield opened
    opened.close()


def make_batches(store: Store, buckets: int, tenant: str = "t1", now_us: int = T0) -> list[str]:
    """`buckets` buckets of `tenant` on DAY, committed one batch each; their ids in order."""
    pulses = [
        Pulse(tenant, f"sku{i:04d}", "api_call", 10**9, "", False, T0, DAY, b"")
        for i in range(buckets)
    ]
    partition = partition_of(tenant, store.partitions)
    store.write_pulses(partition, pulses, T0)
    return [s.batch_id for s in store.commit_day(partition, DAY, now_us, max_records=1)]


def deliverer_of(store: Store, sink: Sink, wall: FakeClock, **options: Any) -> Deliverer:
    settings: dict[str, Any] = {
        "concurrency": 4,
        "retry_initial": 1.0,
        "retry_max": 60.0,
        "lease": 25.0,
    }
    settings.update(options)
    return Deliverer(store, sink, clock=wall, **settings)


def state(store: Store, batch_id: str) -> tuple[str, int, str | None]:
    view = store.batch(batch_id)
    assert view is not None
    return view.status, view.attempts, view.last_error


# -- a downstream or a store that the deliverer did not survive, before each fix -----------


@pytest.mark.parametrize("status", [200, 503])
async def test_an_answer_whose_body_never_ends_does_not_hold_up_delivery(
    store: SQLiteStore, wall: FakeClock, lazy_clock: trio.testing.MockClock, status: int
) -> None:
    """A downstream that answers and then trickles its body must not hold delivery.

    httpx's timeout bounds each socket read, not the request: a byte every 2 s
    kept a 5 s timeout from ever firing, and the deliverer's pass waits for
    every batch it started, so no other batch (nor any later commit) moved.
    A 2xx is decided by its status line, the body unread; an error's body is
    read for its message, within the sink's timeout.
    """
    stuck, other = make_batches(store, 2)

    async def answer(exchange: Exchange) -> None:
        if exchange.batch_id == stuck:
            await exchange.drip(status, every=2.0)
        await exchange.respond(200)

    async with downstream(answer) as server, http_sink(server.url, seconds=5) as sink:
        deliverer = deliverer_of(store, sink, wall)
        with trio.move_on_after(300) as window:
            await deliverer.deliver_due()
    assert not window.cancelled_caught, "one batch held the delivery pass for 300 s (timeout 5 s)"
    assert state(store, other)[0] == "delivered"
    assert state(store, stuck)[0] == ("delivered" if status == 200 else "pending")


async def test_a_2xx_with_an_undecodable_body_is_delivered(
    store: SQLiteStore, wall: FakeClock
) -> None:
    """2xx means stored (DESIGN §5: "2xx or 409 = delivered"), whatever the body says.

    A body announced as gzip that is not makes httpx raise DecodingError while
    reading it; the sink turns that into SinkRetryable, so a batch the
    downstream confirmed is sent again and again, and never marked delivered.
    """
    [batch_id] = make_batches(store, 1)

    async def answer(exchange: Exchange) -> None:
        await exchange.respond(200, b"stored, thanks", (("Content-Encoding", "gzip"),))

    async with downstream(answer) as server, http_sink(server.url) as sink:
        deliverer = deliverer_of(store, sink, wall)
        await deliverer.deliver_due()
        wall.advance(3600)
        await deliverer.deliver_due()
    assert [e.status for e in server.received][:1] == [200]
    assert state(store, batch_id)[0] == "delivered", state(store, batch_id)
    assert len(server.received) == 1, "a confirmed batch was sent again"


class RecordingFails:
    """The SQLite store, except that recording a delivery outcome fails (a full disk)."""

    def __init__(self, inner: SQLiteStore) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def record_delivery(self, *args: Any, **kwargs: Any) -> None:
        raise StoreFull("record delivery: the disk under the store is full")


class CountingFileSink(FileSink):
    """The file sink, counting its deliveries; cancels `stop` after `limit` of them."""

    def __init__(self, directory: Path, limit: int) -> None:
        super().__init__(directory)
        self.calls = 0
        self.limit = limit
        self.stop: trio.CancelScope | None = None

    async def deliver(self, batch_id: str, day: str, body: bytes) -> None:
        self.calls += 1
        if self.calls >= self.limit and self.stop is not None:
            self.stop.cancel()
        await super().deliver(batch_id, day, body)


async def test_a_store_that_cannot_record_outcomes_does_not_make_the_deliverer_spin(
    store: SQLiteStore, wall: FakeClock, tmp_path: Path, lazy_clock: trio.testing.MockClock
) -> None:
    """A delivery whose outcome cannot be recorded is "sent again later" (deliverer.py).

    `run` loops again at once whenever a pass attempted anything, and the
    batch is still due: with record_delivery failing (disk full, a read-only
    PostgreSQL after a failover) it re-sends the same batches in a tight loop,
    hammering the downstream and the CPU, instead of waiting.
    """
    make_batches(store, 3)
    sink = CountingFileSink(tmp_path / "deliveries", limit=200)
    deliverer = deliverer_of(RecordingFails(store), sink, wall)  # type: ignore[arg-type]
    with trio.move_on_after(5) as window:
        sink.stop = window
        await deliverer.run()
    assert sink.calls <= 3 * 6, f"{sink.calls} deliveries of 3 batches in 5 s: a busy loop"


async def test_the_file_sink_makes_a_file_found_in_place_durable_before_confirming(
    tmp_path: Path, fsynced: list[Path]
) -> None:
    """The file sink's delivered point is "the directory entry is on disk".

    A writer killed between os.replace and the directory fsync leaves the file
    in place but its entry maybe only in the page cache. The next delivery of
    that (still pending) batch finds the file, returns at once and the batch
    is recorded delivered without any fsync: a power loss then loses a batch
    the outbox calls delivered.
    """
    sink = FileSink(tmp_path / "deliveries")
    final = sink.path_of("b-1", DAY)
    final.parent.mkdir(parents=True)
    final.write_bytes(b'{"batch_id":"b-1"}')  # renamed into place, then the writer was killed
    await sink.deliver("b-1", DAY, b'{"batch_id":"b-1"}')
    assert final.parent in fsynced, f"confirmed with only {fsynced} synced"


async def test_a_retry_is_not_stalled_by_the_wall_clock_stepping_back(
    store: SQLiteStore, wall: FakeClock
) -> None:
    """No retry waits longer than retry_max after its failure, whatever the wall clock does.

    next_attempt_at is wall time; stepped back an hour (NTP, a VM restored),
    every retrying batch waits that hour on top of its backoff.
    """
    [batch_id] = make_batches(store, 1)
    statuses = [503]

    async def answer(exchange: Exchange) -> None:
        await exchange.respond(statuses.pop(0) if statuses else 200)

    async with downstream(answer) as server, http_sink(server.url) as sink:
        deliverer = deliverer_of(store, sink, wall, retry_initial=1.0, retry_max=60.0)
        assert await deliverer.deliver_due() == 1
        assert state(store, batch_id)[:2] == ("pending", 1)
        wall.advance(-3600)  # the clock is stepped back an hour
        wall.advance(61)  # more than retry_max later
        attempted = await deliverer.deliver_due()
    assert attempted == 1, "the retry waits for the wall clock to catch up (an hour)"
    assert state(store, batch_id)[0] == "delivered"


@pytest.mark.parametrize(
    "url",
    ["https://[::1/billing", "http://", "nats://127.0.0.1:notaport", "nats://[::1:4222"],
)
def test_a_malformed_sink_url_is_refused_at_start(tmp_path: Path, url: str) -> None:
    """DESIGN §5: config is "checked at start with a clear message for each mistake".

    Only the scheme is checked, so these pass. Later: https://[::1 raises
    httpx.InvalidURL at the first delivery, http:// is retried for ever,
    nats://...:notaport raises AssertionError (nats-py) at the first delivery,
    nats://[::1 raises a bare ValueError when the service opens its sink.
    """
    with pytest.raises(ConfigError, match="sink"):
        load_settings(environ={}, data_dir=str(tmp_path), sink=url, sink_secret="k")


class _Broken:
    """A sink with a bug: it raises what no sink error covers."""

    name = "broken"

    async def deliver(self, batch_id: str, day: str, body: bytes) -> None:
        raise ValueError("a bug in the sink")

    async def aclose(self) -> None:
        return None


async def test_a_sink_error_outside_the_sink_hierarchy_is_retried_not_fatal(
    store: SQLiteStore, wall: FakeClock
) -> None:
    """One batch's delivery failing unexpectedly must not take ingestion down.

    The deliverer caught only SinkError: anything else escaped the pass, the
    deliverer task and the service's nursery, and after a restart the batch
    was due again at once. It is now a failed attempt, retried.
    """
    [batch_id] = make_batches(store, 1)
    deliverer = deliverer_of(store, _Broken(), wall)
    assert await deliverer.deliver_due() == 1
    status, attempts, error = state(store, batch_id)
    assert (status, attempts) == ("pending", 1)
    assert error is not None
    assert "a bug in the sink" in error
    assert await deliverer.deliver_due() == 0  # it backs off like any retry


# -- what holds: identical resends, status classes, backoff, fairness ----------------------


async def test_a_lost_confirmation_resends_byte_identical_signed_batches(
    store: SQLiteStore, wall: FakeClock, lazy_clock: trio.testing.MockClock
) -> None:
    """Stored but unconfirmed (connection dropped, then a hang past the timeout): the
    batch goes again with the same id, the same bytes and a valid signature."""
    [batch_id] = make_batches(store, 1)
    plan = ["drop", "hang"]

    async def answer(exchange: Exchange) -> None:
        step = plan.pop(0) if plan else "ok"
        if step == "drop":
            await exchange.drop()
        elif step == "hang":
            await trio.sleep_forever()
        else:
            await exchange.respond(200)

    async with downstream(answer) as server, http_sink(server.url, seconds=2) as sink:
        deliverer = deliverer_of(store, sink, wall)
        for _ in range(3):
            await deliverer.deliver_due()
            wall.advance(120)
    exchanges = server.of(batch_id)
    assert len(exchanges) == 3
    assert {e.body for e in exchanges} == {exchanges[0].body}
    assert all(e.signature_ok for e in exchanges)
    view = store.batch(batch_id)
    assert view is not None
    assert (view.status, view.attempts) == ("delivered", 3)
    assert msgspec.json.decode(exchanges[0].body, type=Batch).batch_id == batch_id


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (200, b"<html>not json at all</html>", "delivered"),
        (204, b"", "delivered"),
        (409, b"already have it", "delivered"),
        (301, b"", "failed"),
        (307, b"", "failed"),
        (308, b"", "failed"),
        (403, b"bad signature", "failed"),
        (413, b"too large", "failed"),
        (425, b"too early", "pending"),
        (502, b"bad gateway", "pending"),
    ],
)
async def test_each_status_class_ends_as_the_sink_documents(
    store: SQLiteStore, wall: FakeClock, status: int, body: bytes, outcome: str
) -> None:
    """2xx/409 delivered; 3xx is no confirmation (never delivered, not followed);
    other 4xx failed; 425/5xx pending for a retry."""
    [batch_id] = make_batches(store, 1)

    async def answer(exchange: Exchange) -> None:
        headers = (("Location", "http://127.0.0.1:1/elsewhere"),) if 300 <= status < 400 else ()
        await exchange.respond(status, body, headers)

    async with downstream(answer) as server, http_sink(server.url) as sink:
        await deliverer_of(store, sink, wall).deliver_due()
    assert len(server.received) == 1
    got, attempts, error = state(store, batch_id)
    assert (got, attempts) == (outcome, 1)
    assert (error is None) == (outcome == "delivered")
    if error is not None:
        assert f"HTTP {status}" in error


async def test_backoff_through_the_outbox_doubles_and_is_capped(
    store: SQLiteStore, wall: FakeClock
) -> None:
    """Each failed attempt schedules the next within [c/2, c], c = min(cap, initial * 2^(n-1)),
    counted from the attempts the store holds."""
    [batch_id] = make_batches(store, 1)

    async def answer(exchange: Exchange) -> None:
        await exchange.respond(503, b"down")

    delays: list[float] = []
    async with downstream(answer) as server, http_sink(server.url) as sink:
        deliverer = deliverer_of(store, sink, wall, retry_initial=0.5, retry_max=30.0)
        for _ in range(10):
            assert await deliverer.deliver_due() == 1
            view = store.batch(batch_id)
            assert view is not None
            assert view.next_attempt_at is not None
            delay = (view.next_attempt_at - wall.now).total_seconds()
            delays.append(delay)
            wall.now_us = epoch_us(view.next_attempt_at) - 1
            assert await deliverer.deliver_due() == 0, "attempted before its backoff passed"
            wall.now_us += 1
    for attempt, delay in enumerate(delays, start=1):
        ceiling = min(30.0, 0.5 * 2 ** (attempt - 1))
        assert ceiling / 2 - 1e-6 <= delay <= ceiling + 1e-6, (attempt, delay)
    assert max(delays) <= 30.0
    assert state(store, batch_id)[:2] == ("pending", 10)


async def test_a_poisoned_batch_and_a_flapping_one_do_not_hold_back_hundreds_of_others(
    store: SQLiteStore, wall: FakeClock
) -> None:
    """More due batches than one read takes (100 a partition): every healthy one is
    delivered, exactly once, while one is refused (failed) and one keeps failing (pending)."""
    ids = make_batches(store, 230)
    poisoned, flapping = ids[0], ids[1]

    async def answer(exchange: Exchange) -> None:
        if exchange.batch_id == poisoned:
            await exchange.respond(422, b"schema")
        elif exchange.batch_id == flapping:
            await exchange.respond(500, b"oops")
        else:
            await exchange.respond(200)

    async with downstream(answer) as server, http_sink(server.url) as sink:
        deliverer = deliverer_of(store, sink, wall, concurrency=8)
        passes = 0
        while await deliverer.deliver_due():
            passes += 1
            assert passes < 10
    healthy = ids[2:]
    assert [state(store, b)[0] for b in healthy] == ["delivered"] * len(healthy)
    assert sorted(e.batch_id for e in server.received if e.status == 200) == sorted(healthy)
    assert state(store, poisoned)[:2] == ("failed", 1)
    assert state(store, flapping)[:2] == ("pending", 1)
    assert passes >= 2


async def test_file_deliveries_hold_the_batch_as_the_api_shows_it(
    tmp_path: Path, wall: FakeClock
) -> None:
    """DESIGN §5: the file holds the batch as GET /batches/{id} shows it, less the delivery
    state; files are not writable by others and no temporary is left behind."""
    settings: Settings = load_settings(
        environ={},
        data_dir=str(tmp_path / "data"),
        partitions=4,
        commit_interval=3600,
        durability="os",
        batch_max_records=2,
    )
    async with open_service(settings, clock=wall) as runtime:
        client = create_app(runtime).test_client()
        for sku in ("a", "b", "c"):
            response = await client.post("/pulses", json=pulse(product_sku=sku, used_amount="1.5"))
            assert response.status_code == 202
        made = await (await client.post("/aggregates/commit", json={"date": DAY})).get_json()
        ids = [b["batch_id"] for b in made["batches"]]
        assert len(ids) == 2
        await runtime.deliverer.deliver_due()
        views = {i: await (await client.get(f"/batches/{i}")).get_json() for i in ids}
    directory = settings.data_path / "deliveries" / DAY
    assert sorted(p.name for p in directory.iterdir()) == sorted(f"{i}.json" for i in ids)
    delivery_state = {"status", "attempts", "last_error", "next_attempt_at", "delivered_at"}
    total = Decimal(0)
    for batch_id, view in views.items():
        assert view["status"] == "delivered"
        path = directory / f"{batch_id}.json"
        assert path.stat().st_mode & 0o022 == 0
        on_disk = json.loads(path.read_bytes())
        assert on_disk == {k: v for k, v in view.items() if k not in delivery_state}
        total += sum(Decimal(r["used_amount"]) for r in on_disk["records"])
    assert total == Decimal("4.5")


# -- several instances on one PostgreSQL, delivering to one JetStream stream -------------


@pytest.fixture
async def nats_stream(nats_server: str) -> AsyncIterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:12]
    stream, template = f"TEST_ADV_{tag}", f"test.adv.{tag}.{{date}}"
    yield stream, template

    async def delete(client: Any) -> None:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await client.jsm().delete_stream(stream)

    await on_nats(delete)


async def test_two_instances_on_one_postgres_put_each_batch_on_the_stream_once(
    fresh_database: str, nats_stream: tuple[str, str], wall: FakeClock
) -> None:
    """Both instances see the same due batches and both may publish them; the
    stream keeps one message per batch id and both outboxes end delivered."""
    stream, template = nats_stream
    stores = [
        PostgresStore.open(fresh_database, partitions=4, pool_size=2, busy_timeout=10)
        for _ in range(2)
    ]
    sinks = [NatsSink(NATS_URL, stream=stream, subject=template, timeout=5) for _ in range(2)]
    try:
        ids = make_batches(stores[0], 12, tenant="pg-tenant")
        assert sorted(d.batch_id for d in stores[1].due_batches(T0, 100)) == sorted(ids)
        with psycopg.connect(fresh_database) as conn:
            bodies = dict(conn.execute("SELECT batch_id, body FROM batches").fetchall())
        deliverers = [deliverer_of(s, k, wall) for s, k in zip(stores, sinks, strict=True)]
        async with trio.open_nursery() as nursery:
            for deliverer in deliverers:
                nursery.start_soon(deliverer.deliver_due)
        # As after a lost ack or a crash before recording: published again.
        for batch_id in ids[:3]:
            await sinks[1].deliver(batch_id, DAY, bodies[batch_id])
    finally:
        for sink in sinks:
            await sink.aclose()

    async def read(client: Any) -> list[tuple[str, bytes]]:
        manager = client.jsm()
        info = await manager.stream_info(stream)
        messages = [
            await manager.get_msg(stream, seq=seq)
            for seq in range(info.state.first_seq, info.state.last_seq + 1)
        ]
        return [(m.headers["Nats-Msg-Id"], m.data) for m in messages]

    try:
        on_stream = await on_nats(read)
        assert sorted(batch_id for batch_id, _ in on_stream) == sorted(ids)
        for batch_id, data in on_stream:
            assert data == bodies[batch_id]
        for store in stores:
            assert {state(store, b)[0] for b in ids} == {"delivered"}
    finally:
        for store in stores:
            store.close()


class _Held:
    """A sink that takes each batch and never answers."""

    def __init__(self) -> None:
        self.taken: list[str] = []

    async def deliver(self, batch_id: str, day: str, body: bytes) -> None:
        self.taken.append(batch_id)
        await trio.sleep_forever()

    async def aclose(self) -> None:
        pass


async def test_a_delivery_cancelled_by_a_stop_gives_its_batch_back_at_once(
    store: SQLiteStore, wall: FakeClock
) -> None:
    """A claimed batch is not due to anyone until its lease ends: that is for
    a sender that died. One whose delivery was cancelled (the service stops)
    gives it back, due at once, its attempt counted; before, the next start
    waited the lease out (25 s by default)."""
    [batch_id] = make_batches(store, 1)
    held = _Held()
    deliverer = deliverer_of(store, held, wall)  # type: ignore[arg-type]
    with trio.move_on_after(0.5):
        await deliverer.deliver_due()
    assert held.taken == [batch_id]
    assert state(store, batch_id) == (
        "pending",
        1,
        "the service stopped before the sink answered",
    )
    assert [d.batch_id for d in store.due_batches(wall(), 10)] == [batch_id]
    # Not given back, a claimed batch waits out its lease.
    assert store.claim_batch(
        partition_of("t1", store.partitions),
        batch_id,
        now_us=wall(),
        latest_us=wall() + 10**9,
        lease_us=wall() + 10**6,
    )
    assert store.due_batches(wall(), 10) == []


class _TakenAsTheStopComes:
    """A sink that takes each batch and answers just as the service stops: the
    stop's cancellation is pending when its delivery returns."""

    def __init__(self, stop: trio.CancelScope) -> None:
        self.stop = stop
        self.taken: list[str] = []

    async def deliver(self, batch_id: str, day: str, body: bytes) -> None:
        self.taken.append(batch_id)
        self.stop.cancel()

    async def aclose(self) -> None:
        pass


async def test_a_batch_the_sink_took_as_the_service_stopped_is_recorded_delivered(
    store: SQLiteStore, wall: FakeClock
) -> None:
    """The sink has the batch: the outcome is recorded though the stop cancels
    what follows. Before, the record was cancelled: the batch stayed pending,
    claimed, and was sent again once its lease ended (25 s by default)."""
    [batch_id] = make_batches(store, 1)
    with trio.CancelScope() as stop:
        sink = _TakenAsTheStopComes(stop)
        await deliverer_of(store, sink, wall).deliver_due()  # type: ignore[arg-type]
    assert stop.cancel_called
    assert sink.taken == [batch_id]
    assert state(store, batch_id) == ("delivered", 1, None)


async def test_a_claim_that_came_back_late_in_its_lease_is_given_back_not_sent(
    store: SQLiteStore, wall: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch is sent by one process at a time: the claim's lease (here 25 s)
    outlasts the delivery it covers (the sink's timeout bounds it). A process
    frozen (a VM paused) between taking its claim and sending, or a store
    that took most of the lease to answer the claim, sent the batch when
    another process may already have taken it over, the lease having ended
    meanwhile: two senders at once. Here the claim comes back 20 s into its
    25 s lease. The batch must not be sent on it, but given back, due at
    once, and sent on the next pass."""
    [batch_id] = make_batches(store, 1)
    sink = MemorySink()
    claim = store.claim_batch

    def late(*args: Any, **kwargs: Any) -> bytes | None:
        body = claim(*args, **kwargs)
        wall.advance(20)
        return body

    monkeypatch.setattr(store, "claim_batch", late)
    deliverer = deliverer_of(store, sink, wall, lease=25.0)
    assert await deliverer.deliver_due() == 1
    assert sink.delivered == {}, "sent on a claim with less than the delivery's time left"
    view = store.batch(batch_id)
    assert view is not None
    assert (view.status, view.attempts) == ("pending", 0)  # never sent: no attempt
    assert view.next_attempt_at is not None
    assert view.next_attempt_at <= wall.now
    monkeypatch.setattr(store, "claim_batch", claim)
    assert await deliverer.deliver_due() == 1
    assert batch_id in sink.delivered
    assert state(store, batch_id)[:2] == ("delivered", 1)
