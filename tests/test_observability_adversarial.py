"""Attacks on what the service says about itself: /metrics, /healthz, /readyz, /openapi.json.

- /metrics must tell the truth after mixed traffic, failures, commits and
  deliveries; keep its label sets bounded whatever tenants, paths or methods
  clients send; parse as Prometheus and OpenMetrics text; hold no secret; and
  stay meaningful when several worker processes answer on one port.
- /readyz and /healthz must follow the service's life.
- /openapi.json must describe every status, body, media type and header the
  server really answers with, each provoked here and checked against the
  document's own schemas; and no request, however odd its method or path,
  gets HTML or a 500.

Most checks run in process on the conftest service; those about sockets,
worker processes and process death start real servers.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import string
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jsonschema_rs
import msgspec
import pytest
import trio
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import conninfo_to_dict
from quart import Quart
from quart.typing import TestClientProtocol as Client

from ingestor.api import create_app
from ingestor.config import Settings, load_settings
from ingestor.errors import SinkRejected, StoreFull
from ingestor.runtime import Runtime
from ingestor.service import open_service
from ingestor.sinks.memory import MemorySink

from .conftest import FakeClock, pulse
from .e2e.cluster_support import child_pids
from .support.server import ServerProcess, exchange, wait_until

DAY = "2026-11-28"  # the conftest clock's day
ADMIN = "obs-admin-key"
INGEST_T1 = "obs-ingest-t1"
READ_T1 = "obs-read-t1"
SINK_SECRET = "obs-sink-secret-0123456789"
SINK_PASSWORD = "obs-sink-password"


def _table(key: str, role: str, *tenants: str) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(key.encode()).hexdigest(), "role": role, "tenants": [*tenants]}


KEYS = [
    _table(ADMIN, "admin", "*"),
    _table(INGEST_T1, "ingest", "t1"),
    _table(READ_T1, "read", "t1"),
]
KEYED = {"api_keys": KEYS, "max_batch": 50, "max_body_bytes": 64 * 1024}
QUIET = {"INGESTOR_COMMIT_INTERVAL": "3600", "INGESTOR_DURABILITY": "os"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- reading /metrics ---------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape_text(client: Client, accept: str | None = None) -> str:
    response = await client.get("/metrics", headers={"Accept": accept} if accept else {})
    assert response.status_code == 200
    return await response.get_data(as_text=True)


async def scrape(client: Client) -> Samples:
    return parse(await scrape_text(client))


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def requests_by_code(samples: Samples) -> dict[tuple[str, str, str], float]:
    """(method, route, code) -> count, leaving out the scrapes themselves."""
    found: dict[tuple[str, str, str], float] = {}
    for (name, labels), count in samples.items():
        if name != "ingestor_http_requests_total":
            continue
        label = dict(labels)
        if label["route"] == "/metrics":
            continue
        found[label["method"], label["route"], label["code"]] = count
    return found


# -- reading /openapi.json ----------------------------------------------------------


class Contract:
    """/openapi.json, and a check of one real answer against it."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc

    def operation(self, method: str, path: str) -> dict[str, Any]:
        op: dict[str, Any] = self.doc["paths"][path][method.lower()]
        return op

    def problems(
        self, method: str, path: str, status: int, headers: dict[str, str], body: bytes
    ) -> list[str]:
        """What in this answer the document does not say; empty if it conforms."""
        where = f"{method} {path} -> {status}"
        op = self.operation(method, path)
        answer = op["responses"].get(str(status))
        if answer is None:
            return [f"{where}: status not documented (documented: {sorted(op['responses'])})"]
        found: list[str] = []
        lowered = {k.lower(): v for k, v in headers.items()}
        for name, spec in answer.get("headers", {}).items():
            if spec.get("required") and name.lower() not in lowered:
                found.append(f"{where}: documented header {name} missing")
        content = answer.get("content")
        if not content:
            if body:
                found.append(f"{where}: a body the document does not describe")
            return found
        media = lowered.get("content-type", "").split(";")[0].strip()
        if media not in content:
            return [*found, f"{where}: content type {media!r} not documented ({sorted(content)})"]
        if media == "application/json":
            schema = {**content[media]["schema"], "components": self.doc["components"]}
            validator = jsonschema_rs.validator_for(schema)
            instance = msgspec.json.decode(body)
            found += [f"{where}: {error}" for error in validator.iter_errors(instance)]
        return found


@pytest.fixture
async def contract(client: Client) -> Contract:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    return Contract(await response.get_json())


async def answer(
    client: Client, method: str, url: str, **kwargs: Any
) -> tuple[int, dict[str, str], bytes]:
    response = await client.open(url, method=method, **kwargs)
    return response.status_code, dict(response.headers), await response.get_data()


async def failed_batch(client: Client, sink: MemorySink) -> str:
    """The id of a batch the sink refused for good (status `failed`)."""
    assert (await client.post("/pulses", json=pulse(), headers=bearer(ADMIN))).status_code == 202
    sink.fail_with(SinkRejected("HTTP 400 from the billing system"))
    response = await client.post("/aggregates/commit", json={"date": DAY}, headers=bearer(ADMIN))
    assert response.status_code == 200
    [batch] = (await response.get_json())["batches"]

    async def failed() -> bool:
        got = await client.get(f"/batches/{batch['batch_id']}", headers=bearer(ADMIN))
        return bool((await got.get_json())["status"] == "failed")

    await wait_until(failed, within=10, what="the batch to be failed")
    batch_id: str = batch["batch_id"]
    return batch_id


# == /metrics: the counters tell the truth =========================================


@pytest.mark.parametrize("settings_overrides", [KEYED])
async def test_request_and_pulse_counters_match_a_mixed_workload_exactly(
    client: Client, runtime: Runtime
) -> None:
    """Every answer of a mixed workload is counted once, by route and code, and
    every pulse that got a status is counted by that status; whole-request
    refusals (400, 413, 415, 401, 503) count no pulse."""
    admin = bearer(ADMIN)
    expected: dict[tuple[str, str, str], int] = {}

    async def send(method: str, url: str, route: str, code: int, **kwargs: Any) -> None:
        response = await client.open(url, method=method, **kwargs)
        assert response.status_code == code, (method, url, await response.get_data())
        key = ("other" if method == "BREW" else method, route, str(code))
        expected[key] = expected.get(key, 0) + 1

    # accepted 3 + 1, duplicate 1, conflict 1 + 1, rejected 1 + 1 + 1 (forbidden)
    mixed = [pulse(id="a"), pulse(id="b"), pulse(id="c"), pulse(used_amount="-1")]
    await send("POST", "/pulses", "/pulses", 202, json=mixed, headers=admin)
    replay = [pulse(id="a"), pulse(id="b", used_amount="7"), pulse(id="d")]
    await send("POST", "/pulses", "/pulses", 202, json=replay, headers=admin)
    await send(
        "POST", "/pulses", "/pulses", 409, json=pulse(id="c", used_amount="9"), headers=admin
    )
    await send("POST", "/pulses", "/pulses", 422, json=pulse(use_unit=""), headers=admin)
    await send(
        "POST", "/pulses", "/pulses", 403, json=pulse(tenant_id="t2"), headers=bearer(INGEST_T1)
    )
    await send(
        "POST",
        "/pulses",
        "/pulses",
        400,
        data=b"{nope",
        headers={**admin, "Content-Type": "application/json"},
    )
    await send("POST", "/pulses", "/pulses", 413, json=[pulse()] * 51, headers=admin)
    await send(
        "POST",
        "/pulses",
        "/pulses",
        413,
        data=b" " * (65 * 1024),
        headers={**admin, "Content-Type": "application/json"},
    )
    await send(
        "POST", "/pulses", "/pulses", 415, data=b"x", headers={**admin, "Content-Type": "text/csv"}
    )
    await send("POST", "/pulses", "/pulses", 401, json=pulse())
    await send("POST", "/pulses", "/pulses", 403, json=pulse(), headers=bearer(READ_T1))
    await send(
        "POST", "/pulses", "/pulses", 431, json=pulse(), headers={**admin, "X-Big": "b" * 17_000}
    )
    await send("GET", "/aggregates?limit=0", "/aggregates", 400, headers=admin)
    await send("GET", "/aggregates", "/aggregates", 401)
    await send("GET", "/pulses?tenant_id=t2&date=" + DAY, "/pulses", 403, headers=bearer(READ_T1))
    await send("GET", "/batches/no-such-batch", "/batches/<batch_id>", 404, headers=admin)
    await send("GET", "/nowhere/" + "x" * 40, "unmatched", 404)
    await send("DELETE", "/pulses", "unmatched", 405)
    await send("BREW", "/healthz", "unmatched", 405)
    await send("POST", "/aggregates/commit", "/aggregates/commit", 422, data=b"[]", headers=admin)
    await send(
        "POST", "/aggregates/commit", "/aggregates/commit", 200, json={"date": DAY}, headers=admin
    )
    await send("GET", "/healthz", "/healthz", 200)
    runtime.draining = True
    await send("POST", "/pulses", "/pulses", 503, json=pulse(), headers=admin)
    await send("GET", "/readyz", "/readyz", 503)
    runtime.draining = False

    samples = await scrape(client)
    assert requests_by_code(samples) == {key: float(n) for key, n in expected.items()}
    assert {
        status: value(samples, "ingestor_pulses_total", status=status)
        for status in ("accepted", "duplicate", "conflict", "rejected")
    } == {"accepted": 4, "duplicate": 1, "conflict": 2, "rejected": 3}
    assert value(samples, "ingestor_commits_total") == 1
    assert value(samples, "ingestor_http_requests_in_flight") == 0
    latency = sum(
        count
        for (name, labels), count in samples.items()
        if name == "ingestor_http_request_duration_seconds_count"
        and dict(labels)["route"] != "/metrics"
    )
    assert latency == sum(expected.values())


@pytest.mark.parametrize("settings_overrides", [{"partitions": 1}])
async def test_a_failed_store_write_is_not_counted_as_pulses_written(
    client: Client, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: a store write that failed (disk full) is counted in
    `ingestor_store_transaction_pulses` ("count and pulses written") and in
    `ingestor_store_transaction_seconds` as if it had been written.

    During a full disk every request is a 503 store_full, yet the store's
    write rate in /metrics keeps climbing with the pulses that were refused, and
    no series counts the failed transactions: the dashboard says the store is
    healthy and busy. Cause: Shard._ingest (shard.py) adds every attempted
    transaction and its pulses to `_transactions` and `_pulses_written`
    whatever `_write` returned. Fix: count only partitions whose write
    succeeded as written, and add a failed-transactions counter (e.g.
    `ingestor_store_transaction_failures_total{shard}`)."""
    before = await scrape(client)

    def full(*args: Any, **kwargs: Any) -> Any:
        raise StoreFull("write pulses: the disk under the store is full")

    monkeypatch.setattr(runtime.store, "write_pulses", full)
    for n in range(5):
        response = await client.post("/pulses", json=[pulse(id=f"p{n}-{i}") for i in range(20)])
        assert response.status_code == 503
        assert (await response.get_json())["error"]["code"] == "store_full"
    after = await scrape(client)
    assert value(after, "ingestor_pulses_total", status="accepted") == 0
    written = "ingestor_store_transaction_pulses_sum"
    assert value(after, written, shard="0") == value(before, written, shard="0"), (
        "pulses that were refused with 503 store_full are counted as written"
    )


async def test_a_failed_commit_is_not_counted_as_a_commit(
    client: Client, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: POST /aggregates/commit that fails (503 store_full) still adds one to
    `ingestor_commits_total`, and nothing counts the failure.

    An operator alerting on "no commit in 25 h" is told commits happen while
    every one of them fails, and the periodic committer's failures are only in
    the log. Cause: Committer.commit_day (committer.py) does `self.commits += 1`
    before `if failure is not None: raise failure`. Fix: count the commit only
    when no partition failed, and count failures apart (e.g.
    `ingestor_commit_failures_total`)."""
    assert (await client.post("/pulses", json=pulse())).status_code == 202

    def full(*args: Any, **kwargs: Any) -> Any:
        raise StoreFull("commit: the disk under the store is full")

    monkeypatch.setattr(runtime.store, "commit_day", full)
    for _ in range(3):
        response = await client.post("/aggregates/commit", json={"date": DAY})
        assert response.status_code == 503
    samples = await scrape(client)
    assert value(samples, "ingestor_batches_created_total") == 0
    assert value(samples, "ingestor_commits_total") == 0, "failed commits are counted as commits"


@pytest.mark.parametrize("settings_overrides", [{"partitions": 1}])
async def test_failed_batches_stay_visible_in_metrics_after_a_restart(
    settings: Settings, clock: FakeClock
) -> None:
    """Was: a batch the sink refused for good (`failed`, waiting for an operator
    to redeliver it: billing data that never arrived) is in no gauge of
    /metrics. `ingestor_outbox_pending_batches` counts only `pending`, and
    `ingestor_deliveries_total{outcome="failed"}` is a per-process counter that
    is 0 again after any restart, so once the process restarts nothing in
    /metrics says a batch is stuck.

    Cause: store.outbox_statistics() (store/sqlite.py, store/postgres.py)
    selects `status = 'pending'` only, and ServiceCollector._outbox_series
    (metrics.py) exports nothing else. Fix: export the outbox by status from
    the store, e.g. `ingestor_outbox_batches{status="pending"|"failed"}`."""
    sink = MemorySink()
    async with open_service(settings, sink=sink, clock=clock) as runtime:
        client = create_app(runtime).test_client()
        assert (await client.post("/pulses", json=pulse())).status_code == 202
        sink.fail_with(SinkRejected("HTTP 400 from the billing system"))
        assert (await client.post("/aggregates/commit", json={"date": DAY})).status_code == 200
        with trio.fail_after(5):
            await runtime.deliverer.deliver_due()
        samples = await scrape(client)
        assert value(samples, "ingestor_deliveries_total", outcome="failed") == 1
        assert value(samples, "ingestor_outbox_pending_batches") == 0
    async with open_service(settings, sink=sink, clock=clock) as runtime:
        client = create_app(runtime).test_client()
        listed = await (await client.get("/batches?status=failed")).get_json()
        assert len(listed["batches"]) == 1  # the store knows
        samples = await scrape(client)
        failed = [
            (name, dict(labels), count)
            for (name, labels), count in samples.items()
            if "failed" in dict(labels).values() and count >= 1
        ]
        assert failed, "after a restart no series of /metrics shows the failed batch"


async def test_store_derived_gauges_survive_a_restart_and_counters_restart_at_zero(
    settings: Settings, clock: FakeClock
) -> None:
    """Gauges read from the store (open buckets, pending outbox and its age) say
    the same after a restart; per-process counters start again at zero (a
    counter reset Prometheus' rate() handles), never at a wrong value."""
    sink = MemorySink()
    async with open_service(settings, sink=sink, clock=clock) as runtime:
        client = create_app(runtime).test_client()
        await client.post("/pulses", json=[pulse(tenant_id=f"t{i}") for i in range(6)])
        sink.block()
        response = await client.post("/aggregates/commit", json={"date": DAY})
        batches = len((await response.get_json())["batches"])
        await client.post("/pulses", json=[pulse(tenant_id="late", id="late")])
        clock.advance(30)
        first = await scrape(client)
        # The sink stays blocked: the stop gives the batches back, pending. A
        # batch the sink took before the stop is recorded delivered.
    sink.block()  # nothing is delivered by the second run until it is scraped
    async with open_service(settings, sink=sink, clock=clock) as runtime:
        client = create_app(runtime).test_client()
        second = await scrape(client)
        sink.unblock()
    for name in (
        "ingestor_open_buckets",
        "ingestor_outbox_pending_batches",
        "ingestor_outbox_oldest_pending_age_seconds",
    ):
        assert value(second, name) == value(first, name), name
    assert value(first, "ingestor_outbox_pending_batches") == batches > 0
    assert value(first, "ingestor_open_buckets") == 1
    assert value(first, "ingestor_pulses_total", status="accepted") == 7
    assert value(second, "ingestor_pulses_total", status="accepted") == 0
    assert value(second, "ingestor_commits_total") == 0


# == /metrics: bounded, valid, no secrets ==========================================


@pytest.mark.parametrize(
    "settings_overrides", [{"max_batch": 10_000, "max_body_bytes": 4 * 1024 * 1024}]
)
async def test_label_sets_stay_bounded_whatever_clients_send(client: Client) -> None:
    """10,000 tenants, hundreds of random paths, ids and methods: the series
    stay those of the routes, methods and codes, and the body stops growing."""
    rng = random.Random(7)

    def word(n: int = 16) -> str:
        return "".join(rng.choices(string.ascii_letters + string.digits, k=n))

    response = await client.post(
        "/pulses",
        json=[pulse(tenant_id=f"tenant-{i}", product_sku=f"sku-{i % 97}") for i in range(10_000)],
    )
    assert response.status_code == 202
    assert (await response.get_json())["accepted"] == 10_000

    async def hostile_round() -> None:
        for _ in range(150):
            await client.get(f"/{word()}/{word()}")
            await client.get(f"/batches/{word(30)}")
            await client.post(f"/batches/{word(30)}/redeliver")
            await client.get(f"/pulses?tenant_id={word()}&date={DAY}")
            await client.open(f"/{word()}", method=rng.choice(["BREW", "PROPFIND", "X" + word(5)]))
            await client.open("/healthz", method=word(6).upper())

    await scrape_text(client)  # the scrape's own series exist from now on
    await hostile_round()
    text = await scrape_text(client)
    first = {key for key in parse(text) if key[0] != "ingestor_http_requests_created"}
    await hostile_round()
    text = await scrape_text(client)
    second = {key for key in parse(text) if key[0] != "ingestor_http_requests_created"}
    assert second == first
    assert len(text) < 64 * 1024, len(text)
    assert "tenant-" not in text
    assert "sku-" not in text
    routes = {
        dict(labels)["route"] for name, labels in second if name == "ingestor_http_requests_total"
    }
    assert routes <= {
        "unmatched",
        "/metrics",
        "/pulses",
        "/batches/<batch_id>",
        "/batches/<batch_id>/redeliver",
    }
    methods = {
        dict(labels)["method"] for name, labels in second if name == "ingestor_http_requests_total"
    }
    assert methods <= {"GET", "POST", "other"}
    assert value(parse(text), "ingestor_open_buckets") == 10_000


@pytest.mark.parametrize(
    "settings_overrides",
    [
        {
            "api_keys": KEYS,
            "sink": f"https://billing:{SINK_PASSWORD}@billing.example/usage",
            "sink_secret": SINK_SECRET,
        }
    ],
)
async def test_exposition_is_valid_in_both_formats_and_holds_no_secret(client: Client) -> None:
    await client.post("/pulses", json=[pulse(), pulse(used_amount="x")], headers=bearer(ADMIN))
    await client.get("/aggregates", headers=bearer("wrong-key"))
    plain = await scrape_text(client)
    families = {f.name: f for f in text_string_to_metric_families(plain)}
    assert {"ingestor_pulses", "ingestor_http_requests", "ingestor_shard_queue_depth"} <= set(
        families
    )
    assert families["ingestor_pulses"].type == "counter"
    open_metrics = await scrape_text(client, "application/openmetrics-text; version=1.0.0")
    assert open_metrics.endswith("# EOF\n")
    names = {f.name for f in openmetrics_families(open_metrics)}
    assert "ingestor_pulses" in names
    for text in (plain, open_metrics):
        for secret in (
            SINK_SECRET,
            SINK_PASSWORD,
            ADMIN,
            "wrong-key",
            KEYS[0]["sha256"],
            KEYS[0]["sha256"][:12],
            "billing.example",
        ):
            assert secret not in text, secret


async def test_ready_gauge_and_readyz_follow_draining(client: Client, runtime: Runtime) -> None:
    assert value(await scrape(client), "ingestor_ready") == 1
    runtime.draining = True
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert (await response.get_json())["error"]["code"] == "draining"
    assert value(await scrape(client), "ingestor_ready") == 0
    assert (await client.get("/healthz")).status_code == 200  # alive while draining
    runtime.draining = False
    runtime.ready = False
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert (await response.get_json())["error"]["code"] == "starting"
    assert value(await scrape(client), "ingestor_ready") == 0
    runtime.ready = True


async def test_metrics_answer_while_the_store_fails(
    client: Client, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that cannot be read leaves out its gauges; the rest is still served."""
    from ingestor.errors import StoreError

    def down(*args: Any, **kwargs: Any) -> Any:
        raise StoreError("server closed the connection unexpectedly")

    monkeypatch.setattr(runtime.store, "outbox_statistics", down)
    monkeypatch.setattr(runtime.store, "open_buckets", down)
    text = await scrape_text(client)
    samples = parse(text)
    assert ("ingestor_open_buckets", frozenset()) not in samples
    assert ("ingestor_outbox_pending_batches", frozenset()) not in samples
    assert value(samples, "ingestor_ready") == 1


# == /openapi.json against what the server answers ================================


@pytest.mark.parametrize("settings_overrides", [KEYED])
async def test_every_provoked_status_is_documented_with_its_body_and_headers(
    client: Client, runtime: Runtime, sink: MemorySink, contract: Contract
) -> None:
    """Provoke every status each route can answer and check each answer (status,
    media type, body schema, required headers) against /openapi.json."""
    admin = bearer(ADMIN)
    json_admin = {**admin, "Content-Type": "application/json"}
    batch_id = await failed_batch(client, sink)
    day = f"tenant_id=t1&date={DAY}"
    cases: list[tuple[str, str, str, int, dict[str, Any]]] = [
        ("POST", "/pulses", "/pulses", 202, {"json": [pulse(id="x")], "headers": admin}),
        (
            "POST",
            "/pulses",
            "/pulses",
            202,
            {"json": [pulse(id="x"), pulse(unit=1)], "headers": admin},
        ),
        (
            "POST",
            "/pulses",
            "/pulses",
            409,
            {"json": pulse(id="x", used_amount="5"), "headers": admin},
        ),
        ("POST", "/pulses", "/pulses", 422, {"json": pulse(used_amount="1e400"), "headers": admin}),
        ("POST", "/pulses", "/pulses", 400, {"data": b"\x00", "headers": json_admin}),
        ("POST", "/pulses", "/pulses", 413, {"json": [pulse()] * 51, "headers": admin}),
        ("POST", "/pulses", "/pulses", 413, {"data": b"[" * 70_000, "headers": json_admin}),
        (
            "POST",
            "/pulses",
            "/pulses",
            415,
            {"data": b"a,b", "headers": {**admin, "Content-Type": "text/csv"}},
        ),
        ("POST", "/pulses", "/pulses", 401, {"json": pulse()}),
        ("POST", "/pulses", "/pulses", 401, {"json": pulse(), "headers": bearer("nope")}),
        ("POST", "/pulses", "/pulses", 403, {"json": pulse(), "headers": bearer(READ_T1)}),
        (
            "POST",
            "/pulses",
            "/pulses",
            403,
            {"json": pulse(tenant_id="t9"), "headers": bearer(INGEST_T1)},
        ),
        (
            "POST",
            "/pulses",
            "/pulses",
            431,
            {"json": pulse(), "headers": {**admin, "X-Big": "b" * 17_000}},
        ),
        ("GET", f"/pulses?{day}", "/pulses", 200, {"headers": bearer(READ_T1)}),
        ("GET", "/pulses?tenant_id=t1", "/pulses", 400, {"headers": admin}),
        ("GET", f"/pulses?{day}&tenant_id=t1", "/pulses", 400, {"headers": admin}),
        ("GET", f"/pulses?tenant_id=t2&date={DAY}", "/pulses", 403, {"headers": bearer(READ_T1)}),
        ("GET", f"/pulses?{day}", "/pulses", 403, {"headers": bearer(INGEST_T1)}),
        ("GET", f"/pulses?{day}", "/pulses", 401, {}),
        ("GET", "/aggregates?status=all", "/aggregates", 200, {"headers": bearer(READ_T1)}),
        ("GET", "/aggregates?cursor=%21%21", "/aggregates", 400, {"headers": admin}),
        ("GET", "/aggregates?tenant_id=t2", "/aggregates", 403, {"headers": bearer(READ_T1)}),
        ("GET", "/aggregates", "/aggregates", 401, {"headers": {"Authorization": "Basic eDp5"}}),
        ("GET", "/batches?status=failed", "/batches", 200, {"headers": admin}),
        ("GET", "/batches?limit=1001", "/batches", 400, {"headers": admin}),
        ("GET", f"/batches/{batch_id}", "/batches/{batch_id}", 200, {"headers": admin}),
        ("GET", "/batches/none", "/batches/{batch_id}", 404, {"headers": admin}),
        ("GET", f"/batches/{batch_id}", "/batches/{batch_id}", 401, {}),
        (
            "POST",
            "/aggregates/commit",
            "/aggregates/commit",
            200,
            {"json": {"date": DAY}, "headers": admin},
        ),
        (
            "POST",
            "/aggregates/commit?date=2999-01-01",
            "/aggregates/commit",
            422,
            {"headers": admin},
        ),
        (
            "POST",
            "/aggregates/commit",
            "/aggregates/commit",
            422,
            {"data": b"{", "headers": json_admin},
        ),
        (
            "POST",
            "/aggregates/commit",
            "/aggregates/commit",
            403,
            {"json": {"date": DAY}, "headers": bearer(READ_T1)},
        ),
        ("POST", "/aggregates/commit", "/aggregates/commit", 401, {"json": {"date": DAY}}),
        (
            "POST",
            f"/batches/{batch_id}/redeliver",
            "/batches/{batch_id}/redeliver",
            200,
            {"headers": admin},
        ),
        (
            "POST",
            f"/batches/{batch_id}/redeliver",
            "/batches/{batch_id}/redeliver",
            409,
            {"headers": admin},
        ),
        (
            "POST",
            "/batches/none/redeliver",
            "/batches/{batch_id}/redeliver",
            404,
            {"headers": admin},
        ),
        (
            "POST",
            "/batches/none/redeliver",
            "/batches/{batch_id}/redeliver",
            403,
            {"headers": bearer(READ_T1)},
        ),
        ("GET", "/healthz", "/healthz", 200, {}),
        ("GET", "/healthz", "/healthz", 431, {"headers": {"X-Big": "b" * 17_000}}),
        ("GET", "/readyz", "/readyz", 200, {}),
        ("GET", "/metrics", "/metrics", 200, {}),
        ("GET", "/openapi.json", "/openapi.json", 200, {}),
    ]
    problems: list[str] = []
    for method, url, path, status, kwargs in cases:
        got, headers, body = await answer(client, method, url, **kwargs)
        assert got == status, (method, url, got, body[:300])
        problems += contract.problems(method, path, got, headers, body)
    runtime.draining = True
    for method, url, path, kwargs in [
        ("POST", "/pulses", "/pulses", {"json": pulse(), "headers": admin}),
        (
            "POST",
            "/aggregates/commit",
            "/aggregates/commit",
            {"json": {"date": DAY}, "headers": admin},
        ),
        ("GET", "/readyz", "/readyz", {}),
    ]:
        got, headers, body = await answer(client, method, url, **kwargs)
        assert got == 503, (url, body)
        problems += contract.problems(method, path, got, headers, body)
    runtime.draining = False
    assert problems == []


@pytest.mark.parametrize("settings_overrides", [KEYED])
async def test_commit_with_a_body_over_the_limit_is_a_documented_answer(
    client: Client, contract: Contract
) -> None:
    """Was: POST /aggregates/commit with a body over max_body_bytes is answered
    413 body_too_large, a status /openapi.json does not list for the operation
    (it lists 200, 401, 403, 408, 422, 431, 500, 503), so generated clients
    and schemathesis' status check see an undocumented answer.

    Cause: routes.py gives post_commit `_errors("admin", 408, 422)` while
    api.post_commit reads the body with request.get_data(), which Quart
    refuses past MAX_CONTENT_LENGTH (api.create_app sets it to
    max_body_bytes). Fix: add 413 to post_commit's statuses in routes.py."""
    got, headers, body = await answer(
        client,
        "POST",
        "/aggregates/commit",
        data=b'{"date": "' + b" " * (70 * 1024) + b'"}',
        headers={**bearer(ADMIN), "Content-Type": "application/json"},
    )
    assert got == 413
    assert msgspec.json.decode(body)["error"]["code"] == "body_too_large"
    assert contract.problems("POST", "/aggregates/commit", got, headers, body) == []


async def test_openmetrics_answer_is_a_documented_media_type(
    client: Client, contract: Contract
) -> None:
    """Was: GET /metrics negotiates OpenMetrics (`Accept:
    application/openmetrics-text`, which Prometheus sends by default) and
    answers `application/openmetrics-text; version=1.0.0`, but /openapi.json
    documents only `text/plain` for its 200: an answer of a media type the
    document does not list.

    Cause: routes.py declares the metrics answer as
    `Answer(200, ..., str, "text/plain")` while metrics.Metrics.exposition
    picks the encoder from Accept. Fix: let an Answer carry several media
    types and list both `text/plain` and `application/openmetrics-text`."""
    response = await client.get(
        "/metrics",
        headers={"Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"},
    )
    body = await response.get_data()
    assert response.status_code == 200
    problems = contract.problems("GET", "/metrics", 200, dict(response.headers), body)
    assert problems == []


async def test_head_options_and_unknown_methods_answer_json(app: Quart, contract: Contract) -> None:
    """On every documented path: HEAD of a GET route answers its GET's status
    and headers without a body; any other method not in the document is 405
    JSON with Allow; none is HTML or a 500."""
    client = app.test_client()
    for path, item in contract.doc["paths"].items():
        url = path.replace("{batch_id}", "none")
        allowed = {method.upper() for method in item}
        for method in ("HEAD", "OPTIONS", "PUT", "PATCH", "DELETE", "TRACE", "BREW", "get"):
            response = await client.open(url, method=method)
            body = await response.get_data()
            where = f"{method} {url}"
            assert response.status_code < 500, (where, body)
            assert response.headers["X-Request-Id"], where
            if (method == "HEAD" and "GET" in allowed) or method.upper() in allowed:
                continue
            assert response.content_type == "application/json", where
            assert response.status_code == 405, (where, response.status_code)
            assert msgspec.json.decode(body)["error"]["code"] == "method_not_allowed", where
            assert set(response.headers["Allow"].replace(" ", "").split(",")) - {"HEAD"} == allowed


# == real servers ==================================================================


async def test_paths_with_doubled_slashes_are_json_answers_not_html_or_500(tmp_path: Path) -> None:
    """Was: a path that routes only once its slashes are merged escapes the
    JSON error contract:

    - `POST //pulses` reaches the Quart placeholder view, which raises
      AssertionError: 500 `internal`, with a traceback in the log. hotpath's
      route is looked up by the exact path (`edge.routes[("POST",
      "/pulses")]`), while werkzeug's map merges slashes and matches
      `/pulses` anyway.
    - `GET /batches//x` (and `POST /batches//x/redeliver`) is a 308 redirect
      with werkzeug's HTML page: routing's RequestRedirect is answered by
      Quart itself, not by api.http_error, and 308 is in no operation of
      /openapi.json.

    Fix: build the app with `app.url_map.merge_slashes = False` (so such
    paths are plain 404 JSON), or answer the hot path by the merged path
    too and route RequestRedirect through the JSON error table; and the
    placeholder view should never be reachable."""
    async with ServerProcess(tmp_path / "data", env=QUIET) as server:
        answers = {
            "POST //pulses": await exchange(
                server,
                b"POST //pulses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 2\r\n\r\n[]",
            ),
            "GET /batches//x": await exchange(
                server, b"GET /batches//x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            ),
            "POST /batches//x/redeliver": await exchange(
                server,
                b"POST /batches//x/redeliver HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Length: 0\r\n\r\n",
            ),
        }
        await server.terminate()
    wrong = {
        what: (status, headers.get("content-type"), body[:120])
        for what, (status, headers, body) in answers.items()
        if status >= 500
        or status in (301, 302, 307, 308)
        or headers.get("content-type") != "application/json"
    }
    assert wrong == {}
    assert "Traceback" not in server.output


async def test_with_two_workers_every_scrape_shows_each_worker_labelled(tmp_path: Path) -> None:
    """Was: with `--workers 2`, GET /metrics was answered by whichever worker
    the kernel gave the connection, both with the same series and labels:
    successive scrapes saw `ingestor_pulses_total{status="accepted"}` jump
    between the workers' counts (counter resets to Prometheus, so rate() was
    wrong), and no scrape gave the group's total. Now the worker that takes
    a scrape asks its sibling for its series: every scrape shows both, each
    labelled with its worker, and the store's series once, unlabelled.
    A worker that is killed is left out until its restart answers."""
    env = {**QUIET, "INGESTOR_WORKERS": "2"}
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    async with (
        ServerProcess(tmp_path / "data", env=env) as server,
        httpx.AsyncClient(base_url=server.url, limits=no_reuse, timeout=10) as http,
    ):
        for n in range(24):
            response = await http.post("/pulses", json=pulse(tenant_id=f"t{n}", id=f"p{n}"))
            assert response.status_code == 202
        scrapes = [parse((await http.get("/metrics")).text) for _ in range(16)]
        for samples in scrapes:
            accepted = {
                dict(labels)["worker"]: count
                for (name, labels), count in samples.items()
                if name == "ingestor_pulses_total" and dict(labels)["status"] == "accepted"
            }
            assert set(accepted) == {"0", "1"}
            assert sum(accepted.values()) == 24  # the group's total, in every scrape
            outbox = [
                labels for (name, labels), _ in samples.items() if name == "ingestor_outbox_batches"
            ]
            assert sorted(dict(labels)["status"] for labels in outbox) == ["failed", "pending"]
            assert all("worker" not in dict(labels) for labels in outbox)
        # Each worker's counters only grow from scrape to scrape.
        by_worker: dict[frozenset[tuple[str, str]], list[float]] = {}
        for samples in scrapes:
            for (name, labels), count in samples.items():
                if name == "ingestor_http_requests_total":
                    by_worker.setdefault(labels, []).append(count)
        assert by_worker
        for labels, counts in by_worker.items():
            assert counts == sorted(counts), labels

        assert server.pid is not None
        workers = child_pids(server.pid, marker="spawn_main")
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        seen: set[str] = set()
        with trio.fail_after(20):
            while seen != {"0", "1"}:  # one worker alone at first, then both again
                response = await http.get("/metrics")
                assert response.status_code == 200, server.tail(80)
                seen = {
                    dict(labels)["worker"]
                    for (name, labels), _ in parse(response.text).items()
                    if name == "ingestor_pulses_total"
                }
                assert seen
                await trio.sleep(0.2)
        await server.terminate()


class _DelivererCrash(ServerProcess):
    """The server with a store whose outbox read raises an unexpected error once
    the file named by OBS_CRASH_FLAG exists: a deliverer that dies."""

    def command(self) -> list[str]:
        python, _, _, *rest = super().command()
        program = (
            "import os, sys\n"
            "from ingestor.__main__ import main\n"
            "from ingestor.store.sqlite import SQLiteStore\n"
            "read = SQLiteStore.due_batches\n"
            "def due(self, *args, **kwargs):\n"
            "    if os.path.exists(os.environ['OBS_CRASH_FLAG']):\n"
            "        raise RuntimeError('a defect in the outbox read')\n"
            "    return read(self, *args, **kwargs)\n"
            "SQLiteStore.due_batches = due\n"
            "sys.argv[0] = 'billing-ingestor'\n"
            "sys.exit(main())\n"
        )
        return [python, "-c", program, *rest]


async def test_a_dead_deliverer_does_not_leave_a_ready_process(tmp_path: Path) -> None:
    """If the deliverer dies, the process must not stay up answering /readyz 200
    with nobody delivering: it ends (and its supervisor restarts it)."""
    flag = tmp_path / "crash"
    server = _DelivererCrash(tmp_path / "data", env={**QUIET, "OBS_CRASH_FLAG": str(flag)})
    async with server:
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
            assert (await http.get("/readyz")).status_code == 200
            flag.touch()

            async def gone() -> bool:
                return not server.running

            await wait_until(gone, within=15, what="the process to end")
        assert server._current().returncode not in (None, 0)
    assert "a defect in the outbox read" in server.output


async def test_after_sigterm_the_port_stops_taking_connections_before_the_drain_ends(
    tmp_path: Path,
) -> None:
    """While a slow request drains, no new connection reaches a server that
    would call itself ready; the slow request still gets its answer."""
    env = {**QUIET, "INGESTOR_BODY_TIMEOUT": "2"}
    async with ServerProcess(tmp_path / "data", env=env) as server:
        slow = await trio.open_tcp_stream(server.host, server.port)
        await slow.send_all(
            b"POST /pulses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n["
        )
        await trio.sleep(0.2)
        process = server._current()
        process.send_signal(signal.SIGTERM)
        await trio.sleep(0.3)
        assert server.running
        async with httpx.AsyncClient(base_url=server.url, timeout=3) as http:
            try:
                ready = (await http.get("/readyz")).status_code
            except httpx.TransportError:
                ready = None
        assert ready in (None, 503)
        with trio.fail_after(10):
            data = await slow.receive_some(4096)
        await slow.aclose()
        assert data.startswith(b"HTTP/1.1 408"), data[:100]
        with trio.fail_after(15):
            assert await process.wait() == 0


# == PostgreSQL out of reach ========================================================


class Blackhole:
    """A TCP proxy to PostgreSQL that can go silent: once cut, it forwards
    nothing either way and accepts new connections without answering, as a
    database host that fell off the network does. `heal` closes every
    connection it holds (their clients see an error) and forwards again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.silent = False
        self._held: set[trio.CancelScope] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._serve, listeners)

    def cut(self) -> None:
        self.silent = True

    def heal(self) -> None:
        self.silent = False
        for scope in self._held:
            scope.cancel()

    async def _serve(self, client: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            self._held.add(scope)
            try:
                async with client:
                    if self.silent:
                        await trio.sleep_forever()
                    server = await trio.open_tcp_stream(*self.target)
                    async with server, trio.open_nursery() as nursery:
                        nursery.start_soon(self._pipe, client, server)
                        nursery.start_soon(self._pipe, server, client)
            finally:
                self._held.discard(scope)

    async def _pipe(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        while data := await source.receive_some(65536):
            if not self.silent:
                await sink.send_all(data)
        await trio.sleep_forever()  # one side closed: the other is closed by heal or teardown


async def test_a_scrape_answers_within_a_scrape_timeout_while_postgres_is_unreachable(
    postgres_url: str, tmp_path: Path
) -> None:
    """Was: with the PostgreSQL host unreachable (packets dropped, not refused),
    GET /metrics does not answer at all: it waits on the store for as long as
    the outage lasts (here until the proxy is healed after 12 s; with a real
    partition, until the kernel gives up on the TCP connection, many minutes),
    although store_busy_timeout is 3 s. Prometheus' scrape times out (10 s by
    default), so exactly during the outage every series is lost, the 503
    counters included, and the target only shows as down.

    Cause: ServiceCollector.refresh (metrics.py) reads outbox_statistics() and
    open_buckets() with an unbounded `trio.to_thread.run_sync`, and the
    PostgreSQL store's timeouts (statement_timeout, lock_timeout) are enforced
    by the server, which never answers; a pooled connection has no client-side
    timeout. Fix: bound the refresh (`trio.move_on_after(...)` with
    `abandon_on_cancel=True`, serving the gauges as absent or last known), and
    give the connections a client-side bound (TCP keepalives /
    `tcp_user_timeout` in the connection parameters)."""
    where = conninfo_to_dict(postgres_url)
    proxy = Blackhole((str(where.get("host", "127.0.0.1")), int(where.get("port", 5432))))
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        settings = load_settings(
            environ={},
            data_dir=str(tmp_path / "data"),
            store=f"postgresql://{where.get('user', 'postgres')}@127.0.0.1:{proxy.port}"
            f"/{where['dbname']}?options={quote(str(where.get('options', '')))}",
            partitions=2,
            commit_interval=3600,
            store_busy_timeout=3,
        )
        async with open_service(settings, sink=MemorySink()) as runtime:
            client = create_app(runtime).test_client()
            assert (await client.post("/pulses", json=pulse())).status_code == 202
            assert value(await scrape(client), "ingestor_open_buckets") == 1
            proxy.cut()
            nursery.start_soon(_heal_after, proxy, 12.0)
            started = trio.current_time()
            response = await client.get("/metrics")
            elapsed = trio.current_time() - started
            text = await response.get_data(as_text=True)
            proxy.heal()
        nursery.cancel_scope.cancel()
    assert response.status_code == 200
    assert "ingestor_http_requests_total" in text
    assert elapsed < 10, f"GET /metrics took {elapsed:.1f} s with the database unreachable"


async def _heal_after(proxy: Blackhole, seconds: float) -> None:
    await trio.sleep(seconds)
    proxy.heal()
