"""GET /metrics: Prometheus text, read from the running service at scrape time.

Each app has its own CollectorRegistry (so two apps in one process, as in
the tests, never share a series). Two kinds of series live in it:

- per request, observed by the app's after-request hook: requests by route
  and status code, and the latency histogram. One observation per request,
  never per pulse.
- read at scrape time by `ServiceCollector` from what the actors already
  count: pulses by status (Runtime), shard queues and store transactions
  (Shard.statistics()), commits and batches (Committer), deliveries
  (Deliverer), and the outbox (store.outbox_statistics() and
  store.outbox_batches(), by status, counts over partial indexes, run in a
  worker thread before each scrape, for at most STORE_READ_SECONDS).

Open buckets (store.open_buckets(), a count over the partial index of
uncommitted buckets) are read in the same worker-thread call.
Failures are counted apart from what succeeded: a store write or a commit
that failed is in ..._failures_total, never in the transactions, pulses
written or commits.
The store's writers' lock (store.writer_lock(), SQLite's: one process at a
time writes) is read from counters the store keeps, at scrape time.
With several worker processes (`--workers`), whichever worker takes a
scrape answers for the group: it asks each sibling, on the sibling's Unix
socket, for its own series (OpenMetrics text), and labels every worker's with
`worker="<index>"`; the store's series (outbox, open buckets), the same
from every worker, come once, from the worker that answers, unlabeled. A
sibling that does not answer within SIBLING_SECONDS (restarting) is left
out of that scrape.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator

import msgspec
import trio
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.openmetrics.exposition import generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from .clock import SharedClock
from .errors import StoreError
from .runtime import Runtime, WorkerGroup
from .store import WriterLock

__all__ = ["Metrics", "ServiceCollector", "serve_siblings"]

log = logging.getLogger("ingestor.metrics")

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


# How long a scrape waits for the store's counts: well inside Prometheus'
# default scrape timeout (10 s), so that a store that does not answer loses
# the scrape its store gauges, not every series.
STORE_READ_SECONDS = 3.0
SIBLING_SECONDS = 1.0  # how long a group's scrape waits for a sibling worker's series
# The store's series: the same from every worker of a group (see the docstring).
_STORE_WIDE = frozenset(
    {
        "ingestor_open_buckets",
        "ingestor_outbox_batches",
        "ingestor_outbox_pending_batches",
        "ingestor_outbox_oldest_pending_age_seconds",
    }
)


class _StoreCounts(msgspec.Struct, frozen=True):
    outbox: tuple[int, int | None]  # store.outbox_statistics()
    by_status: dict[str, int]  # store.outbox_batches()
    open_buckets: int


class ServiceCollector:
    """Series read from the service's actors and store when Prometheus scrapes."""

    def __init__(
        self,
        runtime: Runtime,
        in_flight: Callable[[], int],
        bytes_in_flight: Callable[[], int] = lambda: 0,
    ) -> None:
        self._runtime = runtime
        self._in_flight = in_flight
        self._bytes_in_flight = bytes_in_flight
        self._store: _StoreCounts | None = None
        self._reading = False  # a worker thread is reading the store's counts

    async def refresh(self) -> None:
        """Read the store's outbox and open-bucket counts (blocking: in a worker thread).

        A store that fails, or does not answer within `STORE_READ_SECONDS`,
        leaves its gauges out of this scrape rather than the last values read:
        a gauge that stays flat through an outage looks like a healthy store.
        The thread of a read that did not answer is left to finish (the
        store's own timeouts end it); no other starts until it has, so an
        outage ties up one thread, not one a scrape.
        """
        self._store = None
        if self._reading:
            log.warning("metrics: store still not answering an earlier scrape")
            return
        store = self._runtime.store

        def read() -> _StoreCounts:
            try:
                return _StoreCounts(
                    store.outbox_statistics(), store.outbox_batches(), store.open_buckets()
                )
            finally:
                self._reading = False

        self._reading = True  # cleared by the thread, when it ends
        with trio.move_on_after(STORE_READ_SECONDS) as scope:
            try:
                self._store = await trio.to_thread.run_sync(read, abandon_on_cancel=True)
            except StoreError as exc:
                log.warning("metrics: store unreadable", extra={"fields": {"error": str(exc)}})
        if scope.cancelled_caught:
            log.warning(
                "metrics: store did not answer",
                extra={"fields": {"seconds": STORE_READ_SECONDS}},
            )

    def collect(self) -> Iterator[Metric]:
        runtime = self._runtime
        pulses = CounterMetricFamily(
            "ingestor_pulses", "Pulses answered, by status.", labels=["status"]
        )
        counts = runtime.pulses
        for status, value in (
            ("accepted", counts.accepted),
            ("duplicate", counts.duplicate),
            ("conflict", counts.conflict),
            ("rejected", counts.rejected),
        ):
            pulses.add_metric([status], value)
        yield pulses

        yield GaugeMetricFamily(
            "ingestor_http_requests_in_flight",
            "Requests being handled now.",
            value=self._in_flight(),
        )
        yield GaugeMetricFamily(
            "ingestor_http_request_bytes_in_flight",
            "Bytes of POST /pulses bodies the requests in flight hold (max_in_flight_bytes).",
            value=self._bytes_in_flight(),
        )
        yield GaugeMetricFamily(
            "ingestor_ready",
            "1 when the service takes requests (GET /readyz is 200).",
            value=int(runtime.ready and not runtime.draining),
        )
        yield from self._shards()
        lock = runtime.store.writer_lock()
        if lock is not None:
            yield from _writer_lock_series(lock)
        committer = runtime.committer
        yield CounterMetricFamily(
            "ingestor_commits",
            "Commits of a billing day (timer and API) that succeeded in every partition.",
            value=committer.commits,
        )
        yield CounterMetricFamily(
            "ingestor_commit_failures",
            "Commits of a billing day that failed in a partition (its batches may be missing).",
            value=committer.commit_failures,
        )
        yield CounterMetricFamily(
            "ingestor_batches_created",
            "Outbox batches created by commits.",
            value=committer.batches_created,
        )
        if isinstance(runtime.clock, SharedClock):
            yield GaugeMetricFamily(
                "ingestor_clock_offset_seconds",
                "How far the store's clock, which the service keeps, is ahead of this machine's.",
                value=runtime.clock.offset_us() / 1e6,
            )
        yield GaugeMetricFamily(
            "ingestor_committer_leading",
            "1 when this instance runs the periodic commits for the store.",
            value=int(committer.leading),
        )
        deliverer = runtime.deliverer
        deliveries = CounterMetricFamily(
            "ingestor_deliveries", "Delivery attempts, by outcome.", labels=["outcome"]
        )
        deliveries.add_metric(["delivered"], deliverer.delivered)
        deliveries.add_metric(["retried"], deliverer.retried)
        deliveries.add_metric(["failed"], deliverer.failed)
        yield deliveries
        yield from self._outbox_series()

    def _shards(self) -> Iterator[Metric]:
        labels = ["shard"]
        depth = GaugeMetricFamily(
            "ingestor_shard_queue_depth",
            "Partition writes waiting for the shard (a request counts one per partition).",
            labels=labels,
        )
        capacity = GaugeMetricFamily(
            "ingestor_shard_queue_capacity", "Size of the shard's queue.", labels=labels
        )
        owned = GaugeMetricFamily(
            "ingestor_shard_partitions", "Partitions whose writes the shard owns.", labels=labels
        )
        seconds = SummaryMetricFamily(
            "ingestor_store_transaction_seconds",
            "Store write transactions of the shard that wrote: count and total time.",
            labels=labels,
        )
        size = SummaryMetricFamily(
            "ingestor_store_transaction_pulses",
            "Store write transactions of the shard that wrote: count and pulses written.",
            labels=labels,
        )
        last = GaugeMetricFamily(
            "ingestor_store_last_transaction_pulses",
            "Pulses in the shard's latest write transaction (its group commit).",
            labels=labels,
        )
        failures = CounterMetricFamily(
            "ingestor_store_transaction_failures",
            "Store write transactions of the shard in which a write failed (answered 503):"
            " none of its pulses is in ingestor_store_transaction_pulses.",
            labels=labels,
        )
        for shard in self._runtime.shards:
            stats = shard.statistics()
            label = [str(stats.shard)]
            depth.add_metric(label, stats.queued)
            capacity.add_metric(label, stats.capacity)
            owned.add_metric(label, stats.partitions)
            seconds.add_metric(label, stats.transactions, stats.transaction_seconds)
            size.add_metric(label, stats.transactions, stats.pulses_written)
            last.add_metric(label, stats.last_group_pulses)
            failures.add_metric(label, stats.failed_transactions)
        yield from (depth, capacity, owned, seconds, size, last, failures)

    def _outbox_series(self) -> Iterator[Metric]:
        counts = self._store
        if counts is None:
            return
        yield GaugeMetricFamily(
            "ingestor_open_buckets",
            "Buckets holding usage not yet in a batch.",
            value=counts.open_buckets,
        )
        # The store's, so the same after a restart: a batch the sink refused
        # for good stays in `failed` until an operator redelivers it, whereas
        # ingestor_deliveries_total{outcome="failed"} starts again at 0.
        by_status = GaugeMetricFamily(
            "ingestor_outbox_batches",
            "Batches in the outbox, by status: pending (for the sink), failed"
            " (refused by the sink for good, until redelivered).",
            labels=["status"],
        )
        for status in ("pending", "failed"):
            by_status.add_metric([status], counts.by_status[status])
        yield by_status
        pending, oldest_us = counts.outbox
        yield GaugeMetricFamily(
            "ingestor_outbox_pending_batches",
            "Batches not yet confirmed by the sink.",
            value=pending,
        )
        age = 0.0 if oldest_us is None else max(0, self._runtime.clock() - oldest_us) / 1e6
        yield GaugeMetricFamily(
            "ingestor_outbox_oldest_pending_age_seconds",
            "Age of the oldest pending batch (0 when none is pending).",
            value=age,
        )


def _writer_lock_series(lock: WriterLock) -> Iterator[Metric]:
    """This process's turns at the store's writers' lock. Several worker processes
    on one SQLite file write one at a time: a lock the workers together hold
    nearly all the time is what bounds their writes."""
    wait = SummaryMetricFamily(
        "ingestor_store_writer_lock_wait_seconds",
        "Turns of this process at the store's writers' lock: count and time waited for them.",
    )
    wait.add_metric([], lock.turns, lock.wait_seconds)
    held = SummaryMetricFamily(
        "ingestor_store_writer_lock_held_seconds",
        "Turns of this process at the store's writers' lock: count and time held.",
    )
    held.add_metric([], lock.turns, lock.held_seconds)
    yield from (wait, held)


class Metrics:
    """One app's registry: the per-request instruments and the scrape-time collector."""

    def __init__(
        self,
        runtime: Runtime,
        in_flight: Callable[[], int],
        bytes_in_flight: Callable[[], int] = lambda: 0,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._requests = Counter(
            "ingestor_http_requests",
            "HTTP requests answered, by route and status code.",
            ["method", "route", "code"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "ingestor_http_request_duration_seconds",
            "Time from routing a request to its response, by route.",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._runtime = runtime
        self._service = ServiceCollector(runtime, in_flight, bytes_in_flight)
        self.registry.register(self._service)

    def observe(self, method: str, route: str, code: int, seconds: float) -> None:
        """Count one answered request (route is the URL rule, never the raw path)."""
        method = method if method in _METHODS else "other"
        self._requests.labels(method, route, str(code)).inc()
        self._latency.labels(method, route).observe(seconds)

    def own(self) -> bytes:
        """This process's series but the store's, as OpenMetrics text: a sibling's question."""
        return _own_text(list(self.registry.collect()))

    async def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The scrape body and its content type, negotiated from `accept`."""
        await self._service.refresh()
        encoder, content_type = choose_encoder(accept or "")
        group = self._runtime.group
        if group is None:
            return encoder(self.registry), content_type
        families = list(self.registry.collect())  # once: this worker's part and the store's
        texts = [(group.index, _own_text(families).decode()), *await _ask_siblings(group)]
        store_wide = [f for f in families if f.name in _STORE_WIDE]
        return encoder(_Families(lambda: _labelled(texts, store_wide))), content_type


def _own_text(families: list[Metric]) -> bytes:
    """`families` but the store's, as OpenMetrics text.

    OpenMetrics, not Prometheus text: read back, a counter keeps its
    `_created` sample, where Prometheus text makes it a gauge of its own,
    which clashes with the counter's in an OpenMetrics answer.
    """
    own = [f for f in families if f.name not in _STORE_WIDE]
    # prometheus_client's OpenMetrics functions are untyped.
    text: bytes = generate_latest(_Families(lambda: own))  # type: ignore[no-untyped-call]
    return text


class _Families:
    """What an encoder takes for a registry: something whose `collect` gives families."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self.collect = collect


def _labelled(texts: list[tuple[int, str]], unlabelled: list[Metric]) -> Iterator[Metric]:
    """Each worker's series (`texts`: its index and its own text) labelled with
    the worker, and after them the store's, `unlabelled`. Every worker's text,
    this one's too, is read back, so that each family comes out alike."""
    merged: dict[tuple[str, str], Metric] = {}
    for index, text in texts:
        worker = str(index)
        try:
            families = list(text_string_to_metric_families(text))  # type: ignore[no-untyped-call]
        except ValueError:  # cut short (no "# EOF"): a sibling that stopped while answering
            log.warning(
                "metrics: a worker's series did not parse", extra={"fields": {"worker": worker}}
            )
            continue
        for family in families:
            into = merged.get((family.name, family.type))
            if into is None:
                into = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name, family.type] = into
            into.samples.extend(
                sample._replace(labels={**sample.labels, "worker": worker})
                for sample in family.samples
            )
    yield from merged.values()
    yield from unlabelled


async def _ask_siblings(group: WorkerGroup) -> list[tuple[int, str]]:
    """The series of every other worker that answers within SIBLING_SECONDS."""
    found: list[tuple[int, str]] = []

    async def ask(index: int) -> None:
        # Not there (restarting), or gone while it answered: left out.
        with (
            trio.move_on_after(SIBLING_SECONDS),
            contextlib.suppress(OSError, trio.BrokenResourceError),
        ):
            stream = await trio.open_unix_socket(group.socket(index))
            async with stream:
                chunks = []
                while chunk := await stream.receive_some(1 << 16):
                    chunks.append(chunk)
            found.append((index, b"".join(chunks).decode()))

    async with trio.open_nursery() as nursery:
        for index in range(group.count):
            if index != group.index:
                nursery.start_soon(ask, index)
    return sorted(found)


async def serve_siblings(
    metrics: Metrics,
    path: str,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer the other workers of a group: each connection to `path` (a Unix
    socket) gets this process's own series (`Metrics.own`), then is closed.

    A socket that cannot be made leaves this worker out of its siblings'
    scrapes, with an error in the log; the worker serves on. When it stops,
    it removes its socket, and the directory if it was the last one there
    (the supervisor may have been killed and not cleaned it up).
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left by this worker's previous process
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen()
    except OSError as exc:
        sock.close()
        log.error("metrics: no socket for the other workers", extra={"fields": {"error": str(exc)}})
        task_status.started()
        return

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(metrics.own())

    task_status.started()
    try:
        await trio.serve_listeners(answer, [trio.SocketListener(sock)])
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
            os.rmdir(os.path.dirname(path))  # only once empty
