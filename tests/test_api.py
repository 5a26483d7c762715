"""The HTTP contract of DESIGN.md §4, through the Quart test client."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Any

import pytest
import trio
import trio.testing
from quart.typing import TestClientProtocol as Client

from ingestor.runtime import Runtime
from ingestor.shard import Ingest, Reply
from ingestor.sinks.memory import MemorySink

from .conftest import FakeClock, pulse

JSON = {"Content-Type": "application/json"}
NDJSON = {"Content-Type": "application/x-ndjson"}


async def post(client: Client, body: Any, headers: dict[str, str] = JSON) -> Any:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await client.post("/pulses", data=data, headers=headers)


async def aggregates(client: Client, query: str = "") -> list[dict[str, Any]]:
    response = await client.get(f"/aggregates{query}")
    assert response.status_code == 200
    body = await response.get_json()
    return list(body["aggregates"])


def assert_error(body: dict[str, Any], code: str) -> None:
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]


# -- POST /pulses -----------------------------------------------------------


async def test_single_pulse_is_accepted_and_counted(client: Client) -> None:
    response = await post(client, pulse(used_amount="2.5", id="a"))
    assert response.status_code == 202
    assert response.content_type == "application/json"
    assert await response.get_json() == {
        "accepted": 1,
        "duplicates": 0,
        "rejected": 0,
        "conflicts": 0,
        "items": [],
    }
    [bucket] = await aggregates(client)
    assert bucket["used_amount"] == "2.5"
    assert bucket["pulse_count"] == 1
    assert bucket["date"] == "2026-11-28"
    assert bucket["committed_amount"] == "0"
    assert bucket["revision"] == 0


async def test_replay_is_duplicate_and_not_counted(client: Client) -> None:
    assert (await post(client, pulse(id="a", used_amount="1.5"))).status_code == 202
    # The same payload written differently is the same pulse.
    response = await post(client, pulse(id="a", used_amount=1.50))
    assert response.status_code == 202
    body = await response.get_json()
    assert body["accepted"] == 0
    assert body["duplicates"] == 1
    assert body["items"] == [{"index": 0, "id": "a", "status": "duplicate"}]
    [bucket] = await aggregates(client)
    assert (bucket["used_amount"], bucket["pulse_count"]) == ("1.5", 1)


async def test_same_id_other_payload_is_conflict_409(client: Client) -> None:
    await post(client, pulse(id="a", used_amount="1"))
    response = await post(client, pulse(id="a", used_amount="2"))
    assert response.status_code == 409
    body = await response.get_json()
    assert_error(body, "conflict")
    assert body["error"]["details"]["items"][0]["status"] == "conflict"
    [bucket] = await aggregates(client)
    assert (bucket["used_amount"], bucket["pulse_count"]) == ("1", 1)


async def test_ids_are_scoped_per_tenant(client: Client) -> None:
    await post(client, [pulse(tenant_id="t1", id="x"), pulse(tenant_id="t2", id="x")])
    buckets = await aggregates(client)
    assert [(b["tenant_id"], b["pulse_count"]) for b in buckets] == [("t1", 1), ("t2", 1)]


async def test_mixed_array_stores_valid_and_reports_every_other(
    client: Client,
) -> None:
    await post(client, pulse(id="seen"))
    body = [
        pulse(id="new", used_amount="0.000000001"),
        pulse(id="seen"),  # duplicate
        pulse(id="seen", used_amount="9"),  # conflict
        pulse(used_amount="-1", id="neg"),  # rejected
        pulse(colour="blue"),  # unknown field: rejected
        pulse(id="new", used_amount="0.000000001"),  # duplicate within the request
        pulse(used_amount=3),
    ]
    response = await post(client, body)
    assert response.status_code == 202
    report = await response.get_json()
    assert (report["accepted"], report["duplicates"], report["rejected"]) == (2, 2, 2)
    assert report["conflicts"] == 1
    statuses = [(i["index"], i["status"], i.get("id")) for i in report["items"]]
    assert statuses == [
        (1, "duplicate", "seen"),
        (2, "conflict", "seen"),
        (3, "rejected", "neg"),
        (4, "rejected", None),
        (5, "duplicate", "new"),
    ]
    assert "used_amount" in report["items"][2]["error"]
    assert "colour" in report["items"][3]["error"]
    [bucket] = await aggregates(client)
    assert bucket["used_amount"] == "4.000000001"
    assert bucket["pulse_count"] == 3


async def test_ndjson_body(client: Client) -> None:
    lines = [json.dumps(pulse(used_amount=i, id=f"n{i}")) for i in range(1, 4)]
    data = ("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n{not json\n").encode()
    response = await post(client, data, NDJSON)
    assert response.status_code == 202
    report = await response.get_json()
    assert report["accepted"] == 3
    assert report["items"] == [{"index": 3, "status": "rejected", "error": "not valid JSON"}]
    [bucket] = await aggregates(client)
    assert bucket["used_amount"] == "6"


async def test_single_rejected_pulse_is_422(client: Client) -> None:
    response = await post(client, pulse(used_amount="1.0000000001"))
    assert response.status_code == 422
    body = await response.get_json()
    assert_error(body, "invalid_pulse")
    assert "fractional" in body["error"]["message"]
    assert await aggregates(client) == []


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"this is not json", 400, "invalid_json"),
        (b"[{]", 400, "invalid_json"),
        (b'"a string"', 400, "invalid_json"),
        (b"", 400, "invalid_json"),
    ],
)
async def test_body_that_is_not_json_is_400(
    client: Client, data: bytes, status: int, code: str
) -> None:
    response = await post(client, data)
    assert response.status_code == status
    assert_error(await response.get_json(), code)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
async def test_wrong_content_type_is_415(client: Client, content_type: str) -> None:
    response = await post(client, pulse(), {"Content-Type": content_type})
    assert response.status_code == 415
    assert_error(await response.get_json(), "unsupported_media_type")


@pytest.mark.parametrize("settings_overrides", [{"max_batch": 3}])
async def test_too_many_pulses_is_413_and_stores_nothing(client: Client) -> None:
    response = await post(client, [pulse()] * 4)
    assert response.status_code == 413
    assert_error(await response.get_json(), "too_many_pulses")
    assert await aggregates(client) == []
    assert (await post(client, [pulse()] * 3)).status_code == 202


@pytest.mark.parametrize("settings_overrides", [{"max_body_bytes": 1024}])
async def test_body_too_large_is_413(client: Client) -> None:
    response = await post(client, [pulse(id=f"{i:040d}") for i in range(20)])
    assert response.status_code == 413
    assert_error(await response.get_json(), "body_too_large")
    assert await aggregates(client) == []


async def test_timestamp_sets_billing_day_and_windows(client: Client, clock: FakeClock) -> None:
    yesterday = (clock.now - dt.timedelta(hours=13)).isoformat()
    too_old = (clock.now - dt.timedelta(days=35, seconds=1)).isoformat()
    future = (clock.now + dt.timedelta(minutes=6)).isoformat()
    report = await (
        await post(
            client,
            [
                pulse(timestamp=yesterday),
                pulse(timestamp=too_old),
                pulse(timestamp=future),
                pulse(timestamp="2026-11-28T10:00:00"),  # no offset
            ],
        )
    ).get_json()
    assert report["accepted"] == 1
    errors = [item["error"] for item in report["items"]]
    assert "late window" in errors[0]
    assert "future" in errors[1]
    assert "timezone" in errors[2]
    [bucket] = await aggregates(client)
    assert bucket["date"] == "2026-11-27"


@pytest.mark.parametrize(
    "settings_overrides",
    [{"billing_timezone": "America/New_York", "tenant_timezones": {"tokyo": "Asia/Tokyo"}}],
)
async def test_billing_day_in_configured_zones(client: Client) -> None:
    moment = "2026-11-28T03:30:00Z"  # 22:30 the day before in New York, 12:30 in Tokyo
    await post(
        client,
        [pulse(tenant_id="ny", timestamp=moment), pulse(tenant_id="tokyo", timestamp=moment)],
    )
    days = {(b["tenant_id"], b["date"]) for b in await aggregates(client)}
    assert days == {("ny", "2026-11-27"), ("tokyo", "2026-11-28")}


async def test_pulses_without_id_get_one_and_are_listed(client: Client) -> None:
    await post(client, [pulse(used_amount="1"), pulse(used_amount="2", id="mine")])
    response = await client.get("/pulses?tenant_id=t1&date=2026-11-28")
    assert response.status_code == 200
    listed = (await response.get_json())["pulses"]
    assert [p["used_amount"] for p in listed] == ["1", "2"]
    assert listed[0]["id"]
    assert listed[0]["id_assigned"] is True
    assert (listed[1]["id"], listed[1]["id_assigned"]) == ("mine", False)


async def test_get_pulses_paginates(client: Client) -> None:
    await post(client, [pulse(id=f"p{i}", used_amount=i) for i in range(7)])
    seen: list[str] = []
    url = "/pulses?tenant_id=t1&date=2026-11-28&limit=3"
    cursor = None
    while True:
        body = await (await client.get(url + (f"&cursor={cursor}" if cursor else ""))).get_json()
        seen += [p["id"] for p in body["pulses"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"p{i}" for i in range(7)]


async def test_get_pulses_requires_tenant_and_date(client: Client) -> None:
    response = await client.get("/pulses?tenant_id=t1")
    assert response.status_code == 400
    assert_error(await response.get_json(), "invalid_parameter")


# -- GET /aggregates --------------------------------------------------------


async def test_aggregates_filters_order_and_cursor(client: Client, clock: FakeClock) -> None:
    day_before = (clock.now - dt.timedelta(days=1)).isoformat()
    expected: dict[tuple[str, str, str, str], Decimal] = {}
    batch = []
    for tenant in ("t3", "t1", "t2"):
        for sku in ("b", "a"):
            for stamp, day in ((None, "2026-11-28"), (day_before, "2026-11-27")):
                batch.append(
                    pulse(tenant_id=tenant, product_sku=sku, used_amount="1.25", timestamp=stamp)
                )
                expected[(day, tenant, sku, "api_call")] = Decimal("1.25")
    await post(client, batch)

    collected: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = "?limit=5" + (f"&cursor={cursor}" if cursor else "")
        body = await (await client.get(f"/aggregates{query}")).get_json()
        assert len(body["aggregates"]) <= 5
        collected += body["aggregates"]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    keys = [(a["date"], a["tenant_id"], a["product_sku"], a["use_unit"]) for a in collected]
    assert keys == sorted(expected)

    only = await aggregates(client, "?tenant_id=t2&product_sku=a&from=2026-11-28&to=2026-11-28")
    assert [(a["tenant_id"], a["product_sku"], a["date"]) for a in only] == [
        ("t2", "a", "2026-11-28")
    ]
    assert len(await aggregates(client, "?to=2026-11-27")) == 6


async def test_aggregates_status_filter(client: Client) -> None:
    await post(client, [pulse(tenant_id="a"), pulse(tenant_id="b")])
    await client.post("/aggregates/commit", json={"date": "2026-11-28"})
    await post(client, pulse(tenant_id="b"))
    assert [a["tenant_id"] for a in await aggregates(client, "?status=open")] == ["b"]
    assert [a["tenant_id"] for a in await aggregates(client, "?status=committed")] == ["a"]
    assert len(await aggregates(client, "?status=all")) == 2


@pytest.mark.parametrize(
    "query",
    ["?limit=0", "?limit=10001", "?status=done", "?from=yesterday", "?cursor=%%%", "?colour=red"],
)
async def test_aggregates_bad_parameters_are_400(client: Client, query: str) -> None:
    response = await client.get(f"/aggregates{query}")
    assert response.status_code == 400
    assert_error(await response.get_json(), "invalid_parameter")


# -- commit and batches ------------------------------------------------------


async def commit(client: Client, day: str) -> dict[str, Any]:
    response = await client.post("/aggregates/commit", json={"date": day})
    assert response.status_code == 200, await response.get_data()
    result: dict[str, Any] = await response.get_json()
    return result


async def test_commit_creates_batches_once(
    client: Client, runtime: Runtime, sink: MemorySink
) -> None:
    await post(client, [pulse(tenant_id=f"t{i}", used_amount="0.1") for i in range(10)])
    result = await commit(client, "2026-11-28")
    assert result["date"] == "2026-11-28"
    assert {b["kind"] for b in result["batches"]} == {"initial"}
    assert sum(b["record_count"] for b in result["batches"]) == 10
    assert sum(Decimal(b["used_amount"]) for b in result["batches"]) == Decimal("1.0")
    assert (await commit(client, "2026-11-28"))["batches"] == []

    with trio.fail_after(5):
        await runtime.deliverer.deliver_due()
    assert len(sink.delivered) == len(result["batches"])
    for summary in result["batches"]:
        view = await (await client.get(f"/batches/{summary['batch_id']}")).get_json()
        delivered = json.loads(sink.delivered[summary["batch_id"]])
        state = {"status", "attempts", "last_error", "next_attempt_at", "delivered_at"}
        assert {k: v for k, v in view.items() if k not in state} == delivered
    for committed in await aggregates(client):
        assert committed["committed_amount"] == committed["used_amount"] == "0.1"
        assert committed["revision"] == 1


async def test_commit_by_query_parameter(client: Client) -> None:
    await post(client, pulse())
    response = await client.post("/aggregates/commit?date=2026-11-28")
    assert response.status_code == 200
    assert len((await response.get_json())["batches"]) == 1


async def test_late_pulse_becomes_correction(client: Client, clock: FakeClock) -> None:
    await post(client, pulse(used_amount="10"))
    await commit(client, "2026-11-28")
    clock.advance(3600)
    earlier = (clock.now - dt.timedelta(hours=2)).isoformat()
    await post(client, pulse(used_amount="2.5", timestamp=earlier))
    [batch] = (await commit(client, "2026-11-28"))["batches"]
    assert batch["kind"] == "correction"
    view = await (await client.get(f"/batches/{batch['batch_id']}")).get_json()
    assert view["records"] == [
        {
            "tenant_id": "t1",
            "product_sku": "sku1",
            "use_unit": "api_call",
            "revision": 2,
            "used_amount": "2.5",
            "pulse_count": 1,
            "total_amount": "12.5",
            "total_count": 2,
        }
    ]
    [bucket] = await aggregates(client)
    assert (bucket["revision"], bucket["committed_amount"]) == (2, "12.5")


async def test_commit_future_date_is_422(client: Client) -> None:
    response = await client.post("/aggregates/commit", json={"date": "2026-11-29"})
    assert response.status_code == 422
    assert_error(await response.get_json(), "future_date")


@pytest.mark.parametrize("body", [b"{}", b'{"date": "28/11/2026"}', b"nope"])
async def test_commit_bad_body_is_422(client: Client, body: bytes) -> None:
    response = await client.post("/aggregates/commit", data=body, headers=JSON)
    assert response.status_code == 422
    assert_error(await response.get_json(), "invalid_commit")


async def test_batches_listing_filters_and_pages(client: Client) -> None:
    await post(client, [pulse(tenant_id=f"t{i}") for i in range(20)])
    created = {b["batch_id"] for b in (await commit(client, "2026-11-28"))["batches"]}
    assert len(created) > 1
    seen: list[str] = []
    cursor = None
    while True:
        url = "/batches?date=2026-11-28&limit=1" + (f"&cursor={cursor}" if cursor else "")
        body = await (await client.get(url)).get_json()
        seen += [b["batch_id"] for b in body["batches"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == seen
    assert set(seen) == created
    empty = await (await client.get("/batches?date=2026-11-27")).get_json()
    assert empty == {"batches": [], "next_cursor": None}


async def test_unknown_batch_is_404(client: Client) -> None:
    response = await client.get("/batches/nope")
    assert response.status_code == 404
    assert_error(await response.get_json(), "not_found")


async def test_unknown_route_and_method_are_json(client: Client) -> None:
    response = await client.get("/nowhere")
    assert response.status_code == 404
    assert_error(await response.get_json(), "not_found")
    response = await client.delete("/pulses")
    assert response.status_code == 405
    assert_error(await response.get_json(), "method_not_allowed")


# -- health, overload, draining ----------------------------------------------


async def test_health_and_readiness(client: Client, runtime: Runtime) -> None:
    assert (await client.get("/healthz")).status_code == 200
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert (await ready.get_json())["store_id"] == runtime.store.store_id
    runtime.draining = True
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    rejected = await post(client, pulse())
    assert rejected.status_code == 503
    assert_error(await rejected.get_json(), "draining")


@pytest.mark.parametrize("settings_overrides", [{"shard_queue": 1, "partitions": 1}])
async def test_full_queue_is_503_with_retry_after_and_stores_nothing(
    client: Client, runtime: Runtime
) -> None:
    [shard] = runtime.shards

    taken: Reply[Any] = Reply()
    queued: Reply[Any] = Reply()
    async with trio.open_nursery() as nursery:
        await nursery.start(_occupy, runtime)
        shard.submit_nowait(Ingest({0: []}, taken))  # the shard takes it, waits on the store
        await trio.testing.wait_all_tasks_blocked()
        shard.submit_nowait(Ingest({0: []}, queued))  # fills the one queue slot
        assert not shard.has_room()
        response = await post(client, pulse(id="later"))
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        assert_error(await response.get_json(), "overloaded")
        nursery.cancel_scope.cancel()
    await taken.receive()
    await queued.receive()
    assert await aggregates(client) == []
    assert (await post(client, pulse(id="later"))).status_code == 202


async def _occupy(runtime: Runtime, *, task_status: trio.TaskStatus[None]) -> None:
    """Keep the store's writer busy so the shard cannot take its next message.

    Started, not just spawned: other threads (the committer's) may hold the
    lock for a moment, and only once it is ours is it sure to be released.
    """
    store = runtime.store
    lock = store._file.write_lock  # type: ignore[attr-defined]
    await trio.to_thread.run_sync(lock.acquire)
    try:
        task_status.started()
        await trio.sleep_forever()
    finally:
        lock.release()
