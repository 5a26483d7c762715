"""GET /metrics: Prometheus text, read from the service at scrape time."""

from __future__ import annotations

import fcntl
import json
import os
import threading
from functools import partial
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from quart.typing import TestClientProtocol as Client

from ingestor import metrics
from ingestor.api import create_app
from ingestor.errors import SinkRejected, SinkRetryable, StoreFull
from ingestor.runtime import Runtime
from ingestor.sinks.memory import MemorySink

from .conftest import FakeClock, pulse
from .support.server import wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: Client, accept: str | None = None) -> Samples:
    headers = {"Accept": accept} if accept else {}
    response = await client.get("/metrics", headers=headers)
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    text = await response.get_data(as_text=True)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def commit(client: Client) -> list[dict[str, Any]]:
    response = await client.post("/aggregates/commit", json={"date": "2026-11-28"})
    assert response.status_code == 200
    batches: list[dict[str, Any]] = (await response.get_json())["batches"]
    return batches


async def test_pulses_by_status(client: Client) -> None:
    await client.post("/pulses", json=[pulse(id="a"), pulse(id="b"), pulse(used_amount="-1")])
    await client.post("/pulses", json=[pulse(id="a"), pulse(id="b", used_amount="2")])
    samples = await scrape(client)
    assert value(samples, "ingestor_pulses_total", status="accepted") == 2
    assert value(samples, "ingestor_pulses_total", status="duplicate") == 1
    assert value(samples, "ingestor_pulses_total", status="conflict") == 1
    assert value(samples, "ingestor_pulses_total", status="rejected") == 1


async def test_requests_by_route_and_code_with_latency(client: Client) -> None:
    for _ in range(3):
        await client.post("/pulses", json=pulse())
    await client.post("/pulses", data=b"nope", headers={"Content-Type": "application/json"})
    await client.get("/batches/some-id")
    await client.get("/no/such/page")
    await client.open("/pulses", method="BREW")
    samples = await scrape(client)
    requests = "ingestor_http_requests_total"
    assert value(samples, requests, method="POST", route="/pulses", code="202") == 3
    assert value(samples, requests, method="POST", route="/pulses", code="400") == 1
    # The route is the rule, never the raw path: ids do not make new series.
    assert value(samples, requests, method="GET", route="/batches/<batch_id>", code="404") == 1
    assert value(samples, requests, method="GET", route="unmatched", code="404") == 1
    assert value(samples, requests, method="other", route="unmatched", code="405") == 1
    latency = "ingestor_http_request_duration_seconds"
    assert value(samples, f"{latency}_count", method="POST", route="/pulses") == 4
    assert value(samples, f"{latency}_bucket", method="POST", route="/pulses", le="+Inf") == 4
    assert value(samples, f"{latency}_sum", method="POST", route="/pulses") > 0


async def test_shard_queues_and_store_transactions(client: Client, runtime: Runtime) -> None:
    await client.post("/pulses", json=[pulse(tenant_id=f"t{i}") for i in range(12)])
    samples = await scrape(client)
    shards = [str(shard.index) for shard in runtime.shards]
    assert shards == ["0"]  # SQLite: one shard owns every partition
    partitions = runtime.store.partitions
    assert value(samples, "ingestor_shard_queue_depth", shard="0") == 0
    assert value(samples, "ingestor_shard_queue_capacity", shard="0") == 64 * partitions
    assert value(samples, "ingestor_shard_partitions", shard="0") == partitions
    assert value(samples, "ingestor_store_transaction_pulses_sum", shard="0") == 12
    assert value(samples, "ingestor_store_transaction_seconds_count", shard="0") == 1
    assert value(samples, "ingestor_store_transaction_seconds_sum", shard="0") > 0


async def test_commits_deliveries_and_the_outbox(
    client: Client, runtime: Runtime, sink: MemorySink, clock: FakeClock
) -> None:
    await client.post("/pulses", json=[pulse(tenant_id=f"t{i}") for i in range(8)])
    sink.block()
    batches = await commit(client)
    samples = await scrape(client)
    assert value(samples, "ingestor_commits_total") == 1
    assert value(samples, "ingestor_batches_created_total") == len(batches)
    assert value(samples, "ingestor_outbox_pending_batches") == len(batches)
    assert value(samples, "ingestor_outbox_oldest_pending_age_seconds") == 0
    clock.advance(90)
    samples = await scrape(client)
    assert value(samples, "ingestor_outbox_oldest_pending_age_seconds") == 90

    sink.fail_with(SinkRetryable("HTTP 503"))
    sink.fail_with(SinkRejected("HTTP 400"))
    sink.unblock()
    with trio.fail_after(5):
        await runtime.deliverer.deliver_due()
    samples = await scrape(client)
    assert value(samples, "ingestor_deliveries_total", outcome="retried") == 1
    assert value(samples, "ingestor_deliveries_total", outcome="failed") == 1
    assert value(samples, "ingestor_deliveries_total", outcome="delivered") == len(batches) - 2
    assert value(samples, "ingestor_outbox_pending_batches") == 1  # the retried one
    assert value(samples, "ingestor_outbox_batches", status="pending") == 1
    assert value(samples, "ingestor_outbox_batches", status="failed") == 1  # the refused one


async def test_failed_store_writes_are_counted_apart(
    client: Client, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write the store failed (503) is a failed transaction, not one that wrote."""
    with monkeypatch.context() as patched:

        def full(*args: Any, **kwargs: Any) -> Any:
            raise StoreFull("the disk under the store is full")

        patched.setattr(runtime.store, "write_pulses", full)
        assert (await client.post("/pulses", json=[pulse(), pulse()])).status_code == 503
        samples = await scrape(client)
        assert value(samples, "ingestor_store_transaction_failures_total", shard="0") == 1
        assert value(samples, "ingestor_store_transaction_pulses_count", shard="0") == 0
        assert value(samples, "ingestor_store_transaction_seconds_count", shard="0") == 0
    assert (await client.post("/pulses", json=[pulse()] * 3)).status_code == 202
    samples = await scrape(client)
    assert value(samples, "ingestor_store_transaction_failures_total", shard="0") == 1
    assert value(samples, "ingestor_store_transaction_pulses_sum", shard="0") == 3
    assert value(samples, "ingestor_store_last_transaction_pulses", shard="0") == 3


async def test_failed_commits_are_counted_apart(
    client: Client, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    await client.post("/pulses", json=pulse())
    with monkeypatch.context() as patched:

        def full(*args: Any, **kwargs: Any) -> Any:
            raise StoreFull("the disk under the store is full")

        patched.setattr(runtime.store, "commit_day", full)
        response = await client.post("/aggregates/commit", json={"date": "2026-11-28"})
        assert response.status_code == 503
        samples = await scrape(client)
        assert value(samples, "ingestor_commits_total") == 0
        assert value(samples, "ingestor_commit_failures_total") == 1
    await commit(client)
    samples = await scrape(client)
    assert value(samples, "ingestor_commits_total") == 1
    assert value(samples, "ingestor_commit_failures_total") == 1
    assert value(samples, "ingestor_batches_created_total") == 1


async def test_no_outbox_means_age_zero(client: Client) -> None:
    samples = await scrape(client)
    assert value(samples, "ingestor_outbox_pending_batches") == 0
    assert value(samples, "ingestor_outbox_oldest_pending_age_seconds") == 0
    assert value(samples, "ingestor_ready") == 1


async def test_each_app_has_its_own_registry(runtime: Runtime) -> None:
    first, second = create_app(runtime).test_client(), create_app(runtime).test_client()
    await first.post("/pulses", json=pulse())
    assert "ingestor_http_requests_total" in json.dumps([k[0] for k in await scrape(first)])
    samples = await scrape(second)
    assert (
        "ingestor_http_requests_total",
        frozenset({("method", "POST"), ("route", "/pulses"), ("code", "202")}),
    ) not in samples


async def test_openmetrics_on_request(client: Client) -> None:
    response = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.content_type.startswith("application/openmetrics-text")
    assert (await response.get_data(as_text=True)).endswith("# EOF\n")


@pytest.mark.parametrize("settings_overrides", [{"partitions": 1}])
async def test_store_errors_leave_out_only_the_outbox(
    client: Client, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ingestor.errors import StoreBusy

    def busy() -> tuple[int, int | None]:
        raise StoreBusy("locked")

    monkeypatch.setattr(runtime.store, "outbox_statistics", busy)
    samples = await scrape(client)
    assert ("ingestor_outbox_pending_batches", frozenset()) not in samples
    assert value(samples, "ingestor_shard_queue_depth", shard="0") == 0


@pytest.mark.parametrize("settings_overrides", [{"partitions": 1}])
async def test_a_store_that_does_not_answer_costs_a_scrape_its_store_gauges_only(
    client: Client, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store read that does not answer within the bound leaves the store's
    gauges out; the next scrape starts no second read while it is stuck."""
    monkeypatch.setattr(metrics, "STORE_READ_SECONDS", 0.2)
    release, calls = threading.Event(), []
    read = runtime.store.open_buckets

    def stuck() -> int:
        calls.append(1)
        release.wait(10)
        return read()

    monkeypatch.setattr(runtime.store, "open_buckets", stuck)
    try:
        for _ in range(2):
            started = trio.current_time()
            samples = await scrape(client)
            assert trio.current_time() - started < 2
            assert ("ingestor_open_buckets", frozenset()) not in samples
            assert ("ingestor_outbox_pending_batches", frozenset()) not in samples
            assert value(samples, "ingestor_shard_queue_depth", shard="0") == 0
        assert len(calls) == 1
    finally:
        release.set()
    monkeypatch.setattr(runtime.store, "open_buckets", read)

    async def answered() -> bool:
        return ("ingestor_open_buckets", frozenset()) in await scrape(client)

    await wait_until(answered, within=5, what="the store's gauges to come back")


async def test_open_buckets_follow_commits(client: Client) -> None:
    assert value(await scrape(client), "ingestor_open_buckets") == 0
    await client.post("/pulses", json=[pulse(tenant_id=f"t{i}") for i in range(8)])
    assert value(await scrape(client), "ingestor_open_buckets") == 8
    await commit(client)
    assert value(await scrape(client), "ingestor_open_buckets") == 0
    await client.post("/pulses", json=pulse(tenant_id="t3"))
    assert value(await scrape(client), "ingestor_open_buckets") == 1


async def test_the_writers_lock_turns_waited_for_and_held(client: Client, runtime: Runtime) -> None:
    """Another process holding SQLite's writers' lock makes this one wait for its
    turn; the metrics say how many turns, and how long waited and held."""
    lock = "ingestor_store_writer_lock"
    before = await scrape(client)  # a scrape takes a turn too: it folds before counting
    # As another process sharing the store takes it.
    fd = os.open(runtime.settings.data_path / "store" / "writer.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(client.post, "/pulses", json=pulse()))
            await trio.sleep(0.3)
            waiting = runtime.store.writer_lock()
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    after = await scrape(client)
    assert waiting is not None
    assert waiting.turns == value(before, f"{lock}_wait_seconds_count")  # none while held
    for samples in (before, after):
        turns = value(samples, f"{lock}_wait_seconds_count")
        assert value(samples, f"{lock}_held_seconds_count") == turns
    # The write's turn, and the second scrape's.
    turns = value(after, f"{lock}_wait_seconds_count") - value(before, f"{lock}_wait_seconds_count")
    assert turns == 2
    waited = value(after, f"{lock}_wait_seconds_sum") - value(before, f"{lock}_wait_seconds_sum")
    assert 0.25 < waited < 5
    assert value(after, f"{lock}_held_seconds_sum") > value(before, f"{lock}_held_seconds_sum")
