"""Attacks on the latest changes: delivery leases, group metrics, the open
mode's Host check, the edge's path normalization, and amounts read as Raw.

Delivery runs against real stores (PostgreSQL on 127.0.0.1:5432, SQLite),
several deliverers on one outbox standing in for several instances; group
metrics, the Host check and the edge against real `python -m ingestor serve`
processes. A test whose docstring starts with "Was:" found a defect, since
fixed, and says what it was; the others are attacks that held.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import stat
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from quart.typing import TestClientProtocol as Client

from ingestor import money
from ingestor.clock import epoch_us
from ingestor.deliverer import Deliverer
from ingestor.errors import SinkRejected, SinkRetryable, StoreBusy
from ingestor.intake import Rules, decode_pulses
from ingestor.store.postgres import PostgresStore
from ingestor.store.sqlite import SQLiteStore
from tests.conftest import FakeClock, pulse
from tests.e2e.cluster_support import alive, child_pids
from tests.support.server import ServerError, ServerProcess, exchange, wait_until
from tests.test_delivery_adversarial import (
    T0,
    Exchange,
    downstream,
    http_sink,
    make_batches,
    state,
)
from tests.test_delivery_adversarial import deliverer_of as deliverer

QUIET = {"INGESTOR_COMMIT_INTERVAL": "3600", "INGESTOR_COMMIT_GRACE": "30d"}
SECOND = 1_000_000
WORKER_MARK = "spawn_main"
STORE_WIDE = {
    "ingestor_open_buckets",
    "ingestor_outbox_batches",
    "ingestor_outbox_pending_batches",
    "ingestor_outbox_oldest_pending_age_seconds",
}


@pytest.fixture
def lazy_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0.03)


# == delivery: claims and leases ======================================================


class HeldSink:
    """A receiver that records each delivery and answers only when `release` is set
    (at once when `hold` is False); `fail` makes it raise instead of confirming."""

    name = "held"

    def __init__(self, who: str, sent: list[tuple[str, str]], *, hold: bool = True) -> None:
        self.who = who
        self.sent = sent
        self.hold = hold
        self.release = trio.Event()
        self.arrived = trio.Event()
        self.fail: Exception | None = None

    async def deliver(self, batch_id: str, day: str, body: bytes) -> None:
        self.sent.append((self.who, batch_id))
        self.arrived.set()
        if self.hold:
            await self.release.wait()
        if self.fail is not None:
            raise self.fail

    async def aclose(self) -> None:
        pass


def clock_at(us: int) -> FakeClock:
    clock = FakeClock(dt.datetime(2026, 11, 28, tzinfo=dt.UTC))
    clock.now_us = us
    return clock


@pytest.fixture
def pg_stores(postgres_url: str) -> Iterator[list[PostgresStore]]:
    """Three instances' stores on one PostgreSQL schema."""
    stores = [
        PostgresStore.open(postgres_url, partitions=4, pool_size=2, busy_timeout=10)
        for _ in range(3)
    ]
    try:
        yield stores
    finally:
        for store in stores:
            store.close()


async def arrival(sink: HeldSink) -> None:
    with trio.fail_after(5):
        await sink.arrived.wait()


async def test_three_instances_send_each_batch_once_while_the_receiver_is_slow(
    pg_stores: list[PostgresStore],
) -> None:
    """Three deliverers (real wall clock) run on one PostgreSQL outbox while the
    receiver takes 1.3 s an answer, longer than the idle poll: every batch is
    sent once, and every one ends delivered."""
    now = epoch_us(dt.datetime.now(dt.UTC))
    ids = make_batches(pg_stores[0], 10, tenant="slow-rx", now_us=now - SECOND)
    sent: list[tuple[str, str]] = []

    class Slow(HeldSink):
        async def deliver(self, batch_id: str, day: str, body: bytes) -> None:
            self.sent.append((self.who, batch_id))
            await trio.sleep(1.3)

    deliverers = [
        Deliverer(
            s,
            Slow(str(n), sent),
            concurrency=3,
            retry_initial=1.0,
            retry_max=60.0,
            lease=25.0,
        )
        for n, s in enumerate(pg_stores)
    ]
    with trio.move_on_after(4.5):
        async with trio.open_nursery() as nursery:
            for d in deliverers:
                nursery.start_soon(d.run)
    per_batch = Counter(batch_id for _, batch_id in sent)
    assert {b: n for b, n in per_batch.items() if n != 1} == {}
    assert sorted(per_batch) == sorted(ids)
    assert {state(pg_stores[2], b)[0] for b in ids} == {"delivered"}
    assert len({who for who, _ in sent}) >= 2  # the instances did share the work


async def test_instances_whose_clocks_differ_by_30_s_send_a_batch_once(
    pg_stores: list[PostgresStore],
) -> None:
    """Was: two instances whose wall clocks differ by 30 s (inside the 60 s
    that deliverer.py's `_SKEW` says a clock of another process may be off)
    both send a batch while the receiver is slow.

    Instance A (clock T0) claims the batch: its lease is A's T0 + 25 s.
    Instance B, whose clock reads T0 + 30 s, finds that lease already over
    (`next_attempt_at <= now`) and claims and sends the same batch while A's
    delivery is still on its way. `_SKEW` only widens `latest_us` (the "clock
    stepped back" test) for a clock that is ahead; a clock that is behind by
    more than the lease (2 x sink_timeout + 5 s, 25 s by default) hands its
    every batch to the others. Fix: lengthen the lease by the skew allowed
    (`lease_us = now + lease + _SKEW`, and `_furthest_us` accordingly), or
    take the lease's times from one clock, PostgreSQL's `now()`."""
    [batch_id] = make_batches(pg_stores[0], 1, tenant="skewed", now_us=T0 - 120 * SECOND)
    sent: list[tuple[str, str]] = []
    a_sink = HeldSink("a", sent)
    b_sink = HeldSink("b", sent, hold=False)
    # As the service builds them on PostgreSQL: leases allow for 30 s of skew.
    a = deliverer(pg_stores[0], a_sink, clock_at(T0), clock_skew=30.0)
    b = deliverer(pg_stores[1], b_sink, clock_at(T0 + 30 * SECOND), clock_skew=30.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.deliver_due)
        await arrival(a_sink)
        await b.deliver_due()
        a_sink.release.set()
    assert sent == [("a", batch_id)], "sent by both instances while A's delivery was on its way"


@pytest.mark.parametrize("b_offset_s", [0, -30, 10])
async def test_a_claimed_batch_is_not_sent_by_another_instance(
    pg_stores: list[PostgresStore], b_offset_s: int
) -> None:
    """While A's delivery hangs, B (clock the same, 30 s behind, or 10 s
    ahead, less than the lease) sends nothing, and nor does C with
    `retry_max` (0.5 s) far smaller than the lease; A's outcome is recorded."""
    [batch_id] = make_batches(pg_stores[0], 1, tenant="held", now_us=T0 - 120 * SECOND)
    sent: list[tuple[str, str]] = []
    a_sink = HeldSink("a", sent)
    a = deliverer(pg_stores[0], a_sink, clock_at(T0))
    b = deliverer(pg_stores[1], HeldSink("b", sent), clock_at(T0 + b_offset_s * SECOND))
    c = deliverer(pg_stores[2], HeldSink("c", sent), clock_at(T0 + SECOND), retry_max=0.5)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.deliver_due)
            await arrival(a_sink)
            with trio.move_on_after(2):
                await b.deliver_due()
                await c.deliver_due()
            a_sink.release.set()
    assert sent == [("a", batch_id)]
    assert state(pg_stores[1], batch_id) == ("delivered", 1, None)


async def test_a_claimer_that_died_leaves_the_batch_to_another_after_the_lease(
    pg_stores: list[PostgresStore],
) -> None:
    """A process that claimed a batch and died mid-send: nobody sends it
    before the lease ends, another does right after, and it ends delivered."""
    [batch_id] = make_batches(pg_stores[0], 1, tenant="dead", now_us=T0 - 60 * SECOND)
    [due] = pg_stores[0].due_batches(T0, 10)
    assert pg_stores[0].claim_batch(
        due.partition,
        batch_id,
        now_us=T0,
        latest_us=T0 + 200 * SECOND,
        lease_us=T0 + 25 * SECOND,
    )
    sent: list[tuple[str, str]] = []
    clock = clock_at(T0 + 24 * SECOND)
    b = deliverer(pg_stores[1], HeldSink("b", sent, hold=False), clock)
    await b.deliver_due()
    assert sent == []
    clock.advance(1)
    await b.deliver_due()
    assert sent == [("b", batch_id)]
    assert state(pg_stores[2], batch_id)[0] == "delivered"


async def test_redeliver_of_a_leased_batch_is_refused_and_sends_it_once(
    pg_stores: list[PostgresStore],
) -> None:
    """A batch the sink refused is redelivered, claimed by A, and while A sends
    it a second redeliver is refused (it is pending, not failed) and another
    instance does not send it: the redelivery reaches the receiver once."""
    [batch_id] = make_batches(pg_stores[0], 1, tenant="redo", now_us=T0 - 60 * SECOND)
    sent: list[tuple[str, str]] = []
    refusing = HeldSink("a", sent, hold=False)
    refusing.fail = SinkRejected("HTTP 400: bad")
    await deliverer(pg_stores[0], refusing, clock_at(T0)).deliver_due()
    assert state(pg_stores[0], batch_id)[0] == "failed"
    assert pg_stores[1].redeliver(batch_id, T0 + SECOND)
    a_sink = HeldSink("a", sent)
    a = deliverer(pg_stores[0], a_sink, clock_at(T0 + 2 * SECOND))
    b = deliverer(pg_stores[1], HeldSink("b", sent, hold=False), clock_at(T0 + 3 * SECOND))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.deliver_due)
        await arrival(a_sink)
        assert not pg_stores[2].redeliver(batch_id, T0 + 3 * SECOND)
        await b.deliver_due()
        a_sink.release.set()
    assert sent == [("a", batch_id), ("a", batch_id)]
    assert state(pg_stores[1], batch_id)[0] == "delivered"


async def test_backoff_after_a_claimed_attempt_is_honoured_by_every_instance(
    pg_stores: list[PostgresStore],
) -> None:
    """A retryable failure replaces the lease by the backoff (here 0.25-0.5 s,
    `retry_max` 0.5 s, far below the 25 s lease): not sent again before it,
    sent by another instance once it is over."""
    [batch_id] = make_batches(pg_stores[0], 1, tenant="backoff", now_us=T0 - 60 * SECOND)
    sent: list[tuple[str, str]] = []
    failing = HeldSink("a", sent, hold=False)
    failing.fail = SinkRetryable("HTTP 503")
    await deliverer(pg_stores[0], failing, clock_at(T0), retry_max=0.5).deliver_due()
    assert state(pg_stores[0], batch_id)[:2] == ("pending", 1)
    b_clock = clock_at(T0 + 200_000)
    b = deliverer(pg_stores[1], HeldSink("b", sent, hold=False), b_clock, retry_max=0.5)
    await b.deliver_due()
    assert sent == [("a", batch_id)]
    b_clock.advance(0.31)
    await b.deliver_due()
    assert sent == [("a", batch_id), ("b", batch_id)]
    assert state(pg_stores[0], batch_id)[:2] == ("delivered", 2)


class ClaimFails:
    """The SQLite store, except that claiming fails while `broken` (a busy store)."""

    def __init__(self, inner: SQLiteStore) -> None:
        self._inner = inner
        self.broken = True
        self.claims = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def claim_batch(self, *args: Any, **kwargs: Any) -> bytes | None:
        self.claims += 1
        if self.broken:
            raise StoreBusy("claim batch: the store is busy")
        result: bytes | None = self._inner.claim_batch(*args, **kwargs)
        return result


async def test_a_claim_that_fails_neither_spins_nor_loses_the_batch(
    tmp_path: Path, lazy_clock: trio.testing.MockClock
) -> None:
    """Claims that raise StoreError: about one try a second (the idle poll),
    no attempt counted, nothing sent; once the store answers, delivered."""
    inner = SQLiteStore.open(tmp_path / "store", partitions=2, durability="os", busy_timeout=5)
    try:
        [batch_id] = make_batches(inner, 1, now_us=T0 - 60 * SECOND)
        store = ClaimFails(inner)
        sent: list[tuple[str, str]] = []
        d = deliverer(store, HeldSink("a", sent, hold=False), clock_at(T0))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(d.run)
            await trio.sleep(10)
            assert 5 <= store.claims <= 15, store.claims
            assert sent == []
            assert state(inner, batch_id) == ("pending", 0, None)
            store.broken = False
            await trio.sleep(3)
            nursery.cancel_scope.cancel()
        assert sent == [("a", batch_id)]
        assert state(inner, batch_id)[0] == "delivered"
    finally:
        inner.close()


async def test_a_receiver_that_never_answers_leaves_a_backoff_not_the_lease(
    tmp_path: Path, lazy_clock: trio.testing.MockClock
) -> None:
    """The HTTP sink's timeout (1 s) ends an attempt the receiver never answers,
    long before the lease (7 s): the batch is due again after its backoff."""
    store = SQLiteStore.open(tmp_path / "store", partitions=2, durability="os", busy_timeout=5)
    try:
        [batch_id] = make_batches(store, 1, now_us=T0 - 60 * SECOND)

        async def never(exchange: Exchange) -> None:
            await trio.sleep_forever()

        async with downstream(never) as server, http_sink(server.url, seconds=1) as sink:
            d = deliverer(store, sink, clock_at(T0), lease=7.0, retry_initial=0.5)
            with trio.fail_after(5):
                await d.deliver_due()
        status, attempts, error = state(store, batch_id)
        assert (status, attempts) == ("pending", 1)
        assert "timed out" in (error or "")
        assert [b.batch_id for b in store.due_batches(T0 + SECOND, 10, T0 + 200 * SECOND)] == [
            batch_id
        ]
    finally:
        store.close()


# == group metrics (--workers) =======================================================


@contextlib.contextmanager
def short_tmpdir() -> Iterator[Path]:
    """A TMPDIR of our own for a group (its sockets' directory goes there)."""
    path = Path(tempfile.mkdtemp(prefix="bi-", dir="/tmp"))
    try:
        yield path
    finally:
        for child in sorted(path.rglob("*"), reverse=True):
            with contextlib.suppress(OSError):
                child.rmdir() if child.is_dir() else child.unlink()
        with contextlib.suppress(OSError):
            path.rmdir()


@contextlib.asynccontextmanager
async def group_of(data: Path, tmp: Path, workers: int = 2) -> AsyncIterator[ServerProcess]:
    env = {**QUIET, "INGESTOR_WORKERS": str(workers), "TMPDIR": str(tmp)}
    server = ServerProcess(data, env=env, stop_timeout=25)
    try:
        await server.start()
        assert server.pid is not None

        async def serving() -> bool:
            return len(child_pids(server.pid, marker=WORKER_MARK)) == workers and (
                server.output_of_run().count(" ingestor.service start ") >= workers
            )

        await wait_until(serving, within=20, what="every worker serving")
        yield server
    finally:
        await close_group(server)


async def close_group(server: ServerProcess) -> None:
    """Stop the supervisor, then SIGKILL any of its workers it left behind."""
    workers_left = child_pids(server.pid, marker=WORKER_MARK) if server.running else []
    await server.aclose()
    for pid in workers_left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def samples_of(text: str) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    return [
        (s.name, tuple(sorted(s.labels.items())))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


async def post_some(url: str, count: int) -> None:
    fresh = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=fresh, timeout=10) as http:
        for n in range(count):
            answer = await http.post("/pulses", json=pulse(tenant_id=f"g{n}", id=f"g{n}"))
            assert answer.status_code == 202


async def test_group_scrapes_are_valid_prometheus_text_at_once_and_with_a_hung_sibling(
    tmp_path: Path,
) -> None:
    """With --workers 2: 24 scrapes at once all parse, with no series twice,
    every worker's series labelled and the store's once, unlabelled; the
    sockets' directory is private (0700, ours); a stopped sibling costs a
    scrape about SIBLING_SECONDS and is left out; SIGTERM removes the directory."""
    with short_tmpdir() as tmp:
        async with group_of(tmp_path / "data", tmp) as server:
            await post_some(server.url, 12)
            [directory] = list(tmp.iterdir())
            info = directory.stat()
            assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o700, os.getuid())
            assert sorted(p.name for p in directory.iterdir()) == [
                "worker-0.sock",
                "worker-1.sock",
            ]
            texts: list[str] = []
            fresh = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=server.url, limits=fresh, timeout=15) as http:

                async def scrape() -> None:
                    answer = await http.get("/metrics")
                    assert answer.status_code == 200
                    texts.append(answer.text)

                async with trio.open_nursery() as nursery:
                    for _ in range(24):
                        nursery.start_soon(scrape)
            for text in texts:
                found = samples_of(text)
                assert [k for k, n in Counter(found).items() if n > 1] == []
                types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
                assert [k for k, n in Counter(types).items() if n > 1] == []
                workers = {dict(labels).get("worker") for name, labels in found}
                for name, labels in found:
                    family = name.removesuffix("_created")
                    if family in STORE_WIDE:
                        assert "worker" not in dict(labels), name
                    else:
                        assert dict(labels).get("worker") in ("0", "1"), (name, labels)
                assert {"0", "1"} <= workers
                accepted = sum(
                    1
                    for name, labels in found
                    if name == "ingestor_pulses_total" and dict(labels)["status"] == "accepted"
                )
                assert accepted == 2

            assert server.pid is not None
            stopped = child_pids(server.pid, marker=WORKER_MARK)[1]
            os.kill(stopped, signal.SIGSTOP)
            try:
                answered = []
                async with httpx.AsyncClient(base_url=server.url, limits=fresh) as http:
                    for _ in range(6):
                        started = trio.current_time()
                        with contextlib.suppress(httpx.TimeoutException):
                            # A sibling gets 1 s; a scrape taken by the stopped
                            # worker itself hangs, and is given up after 2.
                            answer = await http.get("/metrics", timeout=2.0)
                            answered.append((trio.current_time() - started, answer.text))
                        if len(answered) == 2:
                            break
                assert answered, "no scrape answered while one worker was stopped"
                for seconds, text in answered:
                    assert seconds < 2.0
                    found = samples_of(text)
                    assert [k for k, n in Counter(found).items() if n > 1] == []
                    workers = {dict(labels).get("worker") for _, labels in found} - {None}
                    assert len(workers) == 1, workers  # the stopped one is left out
            finally:
                os.kill(stopped, signal.SIGCONT)
            assert await server.terminate() == 0
        assert list(tmp.iterdir()) == [], "the sockets' directory was left after SIGTERM"


async def test_group_openmetrics_scrape_is_valid_openmetrics(tmp_path: Path) -> None:
    """Was: with --workers 2, GET /metrics with `Accept:
    application/openmetrics-text` (what Prometheus asks for by default) is not
    valid OpenMetrics: the OpenMetrics parser refuses it with "Clashing name:
    ingestor_http_requests_created".

    Cause: metrics._labelled re-reads each worker's Prometheus text
    (`generate_latest`), in which a counter's or histogram's `_created`
    samples are a gauge family of their own (`ingestor_http_requests_created`);
    re-encoded as OpenMetrics, that gauge clashes with the `_created` series
    the counter `ingestor_http_requests` reserves. A single worker's answer
    (encoded straight from the registry) is valid. Fix: have siblings answer
    in OpenMetrics (`openmetrics.exposition.generate_latest`) and parse that
    with the OpenMetrics parser, which keeps `_created` inside its family, or
    fold `<name>_created` gauges back into the counter/histogram `<name>`."""
    with short_tmpdir() as tmp:
        async with group_of(tmp_path / "data", tmp) as server:
            await post_some(server.url, 4)
            fresh = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=server.url, limits=fresh, timeout=10) as http:
                answer = await http.get(
                    "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
                )
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith("application/openmetrics-text")
            assert answer.text.endswith("# EOF\n")
            try:
                families = list(openmetrics_families(answer.text))
            except ValueError as exc:
                pytest.fail(f"the group's OpenMetrics answer does not parse: {exc}")
            names = {f.name for f in families}
            assert "ingestor_pulses" in names
            await server.terminate()


async def test_a_group_serves_when_tmpdir_is_long(tmp_path: Path) -> None:
    """Was: `serve --workers 2` with a TMPDIR of 80 characters never becomes
    ready: every worker dies at start with "OSError: AF_UNIX path too long"
    and the supervisor restarts it for ever (1, 2, 4 ... 30 s apart).

    Cause: workers.run_workers puts the workers' metrics sockets in
    `tempfile.mkdtemp()` and metrics.serve_siblings binds
    `<tmpdir>/billing-ingestor-XXXXXXXX/worker-N.sock`; a Unix socket's path
    is limited to 107 bytes, so any TMPDIR longer than about 65 characters
    (CI workspaces, nested containers) takes the whole service down for a
    metrics side channel. Fix: make the directory with a short, fixed
    parent (e.g. `/tmp`, or `$XDG_RUNTIME_DIR`) when TMPDIR's is too long, or
    bind an abstract socket (Linux), and never let a failure of the sibling
    listener stop a worker from serving (log it, scrape without siblings)."""
    with short_tmpdir() as tmp:
        long_dir = tmp / ("x" * (80 - len(str(tmp)) - 1))
        long_dir.mkdir()
        assert len(str(long_dir)) == 80
        env = {**QUIET, "INGESTOR_WORKERS": "2", "TMPDIR": str(long_dir)}
        server = ServerProcess(tmp_path / "data", env=env, ready_timeout=8, stop_timeout=10)
        try:
            with contextlib.suppress(ServerError):
                await server.start()
            ready = server.running and "AF_UNIX path too long" not in server.output
        finally:
            await close_group(server)
        assert ready, "not ready with a long TMPDIR:\n" + server.output[-1500:]


async def test_sigkill_of_the_supervisor_leaves_no_socket_directory(tmp_path: Path) -> None:
    """Was: SIGKILL of the `--workers` supervisor (OOM killer, `kill -9`, a
    container runtime) leaves its `billing-ingestor-XXXXXXXX` directory and
    every worker's socket in TMPDIR for good: one more after every such stop.

    The workers outlive the supervisor for their drain (PR_SET_PDEATHSIG
    sends them SIGTERM), but nothing of theirs removes what `run_workers`
    made: only the supervisor's normal return runs `shutil.rmtree`. Fix:
    each worker unlinks its socket when `serve_siblings` ends and the last
    one out removes the directory (rmdir fails while a sibling's socket is
    there), or the directory is kept under the data dir and reused."""
    with short_tmpdir() as tmp:
        async with group_of(tmp_path / "data", tmp) as server:
            assert server.pid is not None
            workers = child_pids(server.pid, marker=WORKER_MARK)
            await server.kill()

            async def gone() -> bool:
                return not any(alive(pid) for pid in workers)

            await wait_until(gone, within=20, what="the workers to end")
            left = [str(p.relative_to(tmp)) for p in tmp.rglob("*")]
        assert left == [], f"left in TMPDIR after the supervisor's SIGKILL: {left}"


# == the open mode's Host check ======================================================


def raw_request(method: str, target: bytes, hosts: list[bytes], version: bytes = b"1.1") -> bytes:
    body = b'{"tenant_id":"h1","product_sku":"s","use_unit":"u","used_amount":1}'
    head = [method.encode() + b" " + target + b" HTTP/" + version]
    head += [b"Host: " + host for host in hosts]
    if method == "POST":
        head += [b"Content-Type: application/json", b"Content-Length: %d" % len(body)]
    return (
        b"\r\n".join(head) + b"\r\nConnection: close\r\n\r\n" + (body if method == "POST" else b"")
    )


@pytest.fixture
async def open_server(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    async with ServerProcess(tmp_path / "data", env=QUIET) as server:
        yield server


async def test_the_open_mode_answers_loopback_hosts_and_refuses_others(
    open_server: ServerProcess,
) -> None:
    """Every loopback spelling is answered on every path (the hot POST /pulses
    and a Quart route alike); foreign, look-alike and duplicated Host headers
    are not. An empty Host is answered, as no Host at all (HTTP/1.0): no
    browser sends either."""
    port = str(open_server.port).encode()
    allowed = [
        b"localhost",
        b"LOCALHOST:" + port,
        b"LocalHost",
        b"127.0.0.1:" + port,
        b"127.0.0.1",
        b"[::1]",
        b"[::1]:" + port,
        b"[0:0:0:0:0:0:0:1]:" + port,
        b"",
    ]
    refused = [
        b"evil.example",
        b"evil.example:" + port,
        b"localhost.evil.example",
        b"127.0.0.1.nip.io",
        b"[::2]",
        b"0.0.0.0",
        b"[fe80::1]",
    ]
    wrong: dict[str, Any] = {}
    for method, target in (("POST", b"/pulses"), ("GET", b"/aggregates")):
        for host in allowed:
            status, _, _ = await exchange(open_server, raw_request(method, target, [host]))
            if status >= 300:
                wrong[f"{method} {host!r}"] = status
        for host in refused:
            status, _, body = await exchange(open_server, raw_request(method, target, [host]))
            if status != 403:
                wrong[f"{method} {host!r}"] = (status, body[:80])
        for hosts in ([b"localhost", b"evil.example"], [b"evil.example", b"localhost"]):
            status, _, _ = await exchange(open_server, raw_request(method, target, hosts))
            if status < 400:
                wrong[f"{method} {hosts!r}"] = status
    assert wrong == {}


async def test_http10_without_host_is_answered_alike_on_every_route(
    open_server: ServerProcess,
) -> None:
    """Was: an HTTP/1.0 request without a Host header (an old client, a
    `printf | nc` health script; no browser sends one) is answered on POST
    /pulses (202) but refused 403 "this one is to ''" on every other route
    (GET /aggregates, /batches, commit, redeliver) of the same open server.

    Cause: the hot path (hotpath.py) passes the scope's Host headers, none,
    to Keyring.authenticate, which then admits; api.py passes Quart's
    `request.headers.getlist("Host")`, and Quart adds `Host: ""` to a
    request that has none (quart/asgi.py, `headers.setdefault("Host",
    SERVER_NAME or "")`), which `_loopback` refuses. Fix: read the Host
    headers from the ASGI scope in api.py too (or skip empty ones), so both
    decide alike."""
    answers = {}
    for method, target in (("POST", b"/pulses"), ("GET", b"/aggregates"), ("GET", b"/batches")):
        status, _, _ = await exchange(open_server, raw_request(method, target, [], b"1.0"))
        answers[f"{method} {target.decode()}"] = status
    assert answers["POST /pulses"] == 202
    assert answers == {"POST /pulses": 202, "GET /aggregates": 200, "GET /batches": 200}


async def test_an_absolute_form_target_names_the_host_that_is_checked(
    open_server: ServerProcess,
) -> None:
    """Was (minor): the open mode checks the Host header even when the
    request-target is in absolute form, whose authority RFC 9112 §3.2.2 says
    the server must use instead of Host. `POST http://evil.example/pulses`
    with `Host: localhost` is stored as an admin's request (202), while
    `POST http://localhost/pulses` with `Host: evil.example` is refused 403.

    Cause: edge.Edge takes the path out of an absolute-form target but drops
    its authority, and Keyring.authenticate sees only the Host headers.
    Fix: in the edge, when the target is absolute, check (or replace the
    Host header by) its authority, so the host the request names is the one
    the open mode checks."""
    foreign, _, _ = await exchange(
        open_server, raw_request("POST", b"http://evil.example/pulses", [b"localhost"])
    )
    local, _, _ = await exchange(
        open_server, raw_request("POST", b"http://localhost/pulses", [b"evil.example"])
    )
    assert (foreign, local) == (403, 202)


# == edge path normalization =========================================================


async def test_every_route_is_answered_alike_however_its_path_is_written(
    open_server: ServerProcess,
) -> None:
    """Absolute-form targets (with queries), doubled leading slashes, an
    encoded slash and non-ASCII paths reach the route their path names, with
    the same answer as the plain path; /metrics labels them by route (no
    label per spelling) and no request stays counted in flight."""
    cases = [
        ("GET", b"/aggregates?limit=1", b"http://localhost/aggregates?limit=1"),
        ("GET", b"/aggregates?limit=1", b"//aggregates?limit=1"),
        ("GET", b"/aggregates?limit=1", b"http://localhost//aggregates?limit=1"),
        ("GET", b"/aggregates", b"/%2Faggregates"),
        ("GET", b"/batches", b"///batches"),
        ("GET", b"/batches/nope", b"//batches/nope"),
        ("GET", b"/batches/%C3%A9t%C3%A9", b"//batches/%C3%A9t%C3%A9"),
        ("GET", b"/batches/a%2Fb", b"//batches/a%2Fb"),
        ("GET", b"/pulses?tenant_id=h1", b"//pulses?tenant_id=h1"),
        ("GET", b"/healthz", b"//healthz"),
        ("GET", b"/readyz", b"http://127.0.0.1/readyz?x=1"),
        ("GET", b"/openapi.json", b"//openapi.json"),
        ("POST", b"/pulses", b"//pulses"),
        ("POST", b"/pulses", b"http://localhost//pulses?x=%2F"),
        ("POST", b"/pulses", b"/%2Fpulses"),
        ("POST", b"/aggregates/commit", b"//aggregates/commit"),
        ("POST", b"/batches/nope/redeliver", b"//batches/nope/redeliver"),
    ]
    differ = {}
    for method, plain, other in cases:
        a = await exchange(open_server, raw_request(method, plain, [b"localhost"]))
        b = await exchange(open_server, raw_request(method, other, [b"localhost"]))
        if (a[0], a[1].get("content-type")) != (b[0], b[1].get("content-type")) or (
            method == "GET" and plain != b"/readyz" and a[2] != b[2]
        ):
            differ[other.decode()] = (a[0], b[0], b[2][:100])
    assert differ == {}
    status, _, body = await exchange(open_server, raw_request("GET", b"//metrics", [b"localhost"]))
    assert status == 200
    routes = {
        dict(labels)["route"]
        for name, labels in samples_of(body.decode())
        if name == "ingestor_http_requests_total"
    }
    assert all(route.startswith("/") or route == "unmatched" for route in routes), routes
    assert not any("//" in route or "http:" in route or "%" in route for route in routes), routes
    in_flight = [
        s.value
        for f in text_string_to_metric_families(body.decode())
        for s in f.samples
        if s.name == "ingestor_http_requests_in_flight"
    ]
    assert in_flight == [0.0]


# == amounts =========================================================================

RULES = Rules(late_window_s=35 * 86400, future_skew_s=300, max_batch=10_000)


def decided(body: bytes, content_type: str = "application/json") -> object:
    """What intake makes of `body`: the amounts in nanos, or the reasons, or the error."""
    now = epoch_us(dt.datetime.now(dt.UTC))
    try:
        intake = decode_pulses(body, content_type, RULES, now)
    except Exception as exc:
        return ("error", getattr(exc, "status", type(exc).__name__))
    nanos = [p.nanos for pulses in intake.tenants.values() for p in pulses]
    return ("ok", nanos) if nanos else ("rejected", [i.error for i in intake.items])


AMOUNTS: list[tuple[bytes, int | None]] = [
    (b"1", 10**9),
    (b"1.0", 10**9),
    (b'"1"', 10**9),
    (b'"1.5e3"', 1500 * 10**9),
    (b"1.5E+3", 1500 * 10**9),
    (rb'"\u0031"', 10**9),
    (rb'"\u0031\u002e\u0035"', 15 * 10**8),
    (b"-0", 0),
    (b'"-0.0"', 0),
    (b"1e-9", 1),
    (b"0e-99999999999", 0),
    (b"999999999999999999.999999999", 10**27 - 1),
    (b"1e-10", None),
    (b'"0.0000000001"', None),
    (rb'"1\u0000"', None),
    (b'" 1"', None),
    (b'"+1"', None),
    (b'".5"', None),
    (b'"1_000"', None),
    ('"١٢"'.encode(), None),
    (rb'"\uff11"', None),
    (b'"Infinity"', None),
    (b'"NaN"', None),
    (b"-1", None),
    (b'"-1"', None),
    (b"1000000000000000000", None),
    (b'"1e18"', None),
    (b"1e999999999999999999999", None),
    (b'"1e-99999999999999999999"', None),
    (b"true", None),
    (b"null", None),
    (b"[[[[1]]]]", None),
    (b"{}", None),
    (b'"0x10"', None),
    (b"1" + b"0" * 5000, None),
]


@pytest.mark.parametrize(("amount", "nanos"), AMOUNTS, ids=lambda v: repr(v)[:30])
def test_an_amount_is_decided_alike_in_every_body_shape(amount: bytes, nanos: int | None) -> None:
    """One object, an array, NDJSON, with an escape elsewhere (the strict
    decoders), after or before a duplicate key: the same amount or refusal."""
    fields = b'"tenant_id":"t1","product_sku":"s","use_unit":"u","used_amount":' + amount
    single = b"{" + fields + b"}"
    shapes = {
        "single": decided(single),
        "escaped": decided(b"{" + fields + rb',"id":"\u0061"}'),
        "array": decided(b"[" + single + b"," + single + b"]"),
        "escaped array": decided(b"[" + single + b"," + b"{" + fields + rb',"id":"\u0062"}]'),
        "ndjson": decided(single + b"\n" + single, "application/x-ndjson"),
        "last key counts": decided(b'{"used_amount":"junk",' + fields + b"}"),
    }
    first = shapes["single"]
    if nanos is None:
        assert first[0] == "rejected", first
    else:
        assert first == ("ok", [nanos])
    for shape in ("escaped", "last key counts"):
        assert shapes[shape] == first, (shape, shapes[shape])
    both = (first[0], list(first[1]) * 2)  # type: ignore[index]
    for shape in ("array", "escaped array", "ndjson"):
        assert shapes[shape] == both, (shape, shapes[shape])
    money.KNOWN_NANOS.clear()


def test_cached_amounts_are_the_values_their_keys_name() -> None:
    """Raw bytes, string text and ints share one cache: after warming it with
    every spelling, each is still read as its own value (no key of one
    form answers for another)."""
    money.KNOWN_NANOS.clear()
    spellings = [(b"1", 10**9), (b'"1"', 10**9), (b"10", 10**10), (b'"10"', 10**10)]
    spellings += [(rb'"\u0031"', 10**9), (b"1.5", 15 * 10**8), (b'"1.5"', 15 * 10**8)]
    for _ in range(2):
        for amount, nanos in spellings:
            body = b'{"tenant_id":"t","product_sku":"s","use_unit":"u","used_amount":' + amount
            assert decided(body + b"}") == ("ok", [nanos]), amount
    bad = b'{"tenant_id":"t","product_sku":"s","use_unit":"u","used_amount":"1.5x"}'
    assert decided(bad) == ("rejected", ["used_amount: Invalid decimal string"])


async def test_amounts_of_megabytes_are_not_kept_in_the_amount_cache(client: Client) -> None:
    """Was: a valid amount can be megabytes long ("1." and a million zeros
    is exactly 1), and money.to_nanos keeps it, as the key of
    KNOWN_NANOS, for the life of the process: the cache is bounded in
    entries (4,096), not in bytes. Eight such requests of 1 MB leave 8 MB
    held; 4,096 requests of 16 MiB (max_body_bytes) would hold 64 GiB, where
    DESIGN §3.6 promises bounded memory.

    Cause: `to_nanos` caches every amount it converted under its full text
    (a Raw's bytes, a string, a Decimal's text). Fix: cache only short keys
    (a valid amount needs at most 18 + 1 + 9 characters unless it pads with
    zeros or an exponent; say `len(key) <= 40`)."""
    money.KNOWN_NANOS.clear()
    for n in range(8):
        amount = "1." + "0" * (1_000_000 + n)
        answer = await client.post(
            "/pulses",
            data='{"tenant_id":"big","product_sku":"s","use_unit":"u","used_amount":'
            + amount
            + "}",
            headers={"Content-Type": "application/json"},
        )
        assert answer.status_code == 202, await answer.get_data()
    held = sum(len(key) for key in money.KNOWN_NANOS if not isinstance(key, int))
    money.KNOWN_NANOS.clear()
    assert held < 100_000, f"the amount cache holds {held:,} bytes of keys"


async def test_a_16_mib_body_of_amount_text_is_answered_quickly(client: Client) -> None:
    """A 16 MiB body that is one amount (digits, escapes, or an exponent) is
    refused or taken in well under a second, and nothing of it stays cached."""
    money.KNOWN_NANOS.clear()
    size = 16 * 1024 * 1024 - 200
    heads = {
        "digits": b"1" * size,
        "escaped": b'"' + rb"\u0031" * (size // 6) + b'"',
        "fraction": b"0." + b"0" * size + b"1",
    }
    for name, amount in heads.items():
        body = b'{"tenant_id":"big","product_sku":"s","use_unit":"u","used_amount":' + amount + b"}"
        started = trio.current_time()
        answer = await client.post(
            "/pulses", data=body, headers={"Content-Type": "application/json"}
        )
        elapsed = trio.current_time() - started
        assert answer.status_code in (413, 422), (name, answer.status_code)
        assert elapsed < 3.0, (name, elapsed)
    assert sum(len(k) for k in money.KNOWN_NANOS if not isinstance(k, int)) < 1000
