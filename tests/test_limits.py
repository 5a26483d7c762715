"""Limits on hostile input, each answered with the contract's status and a JSON error.

Body size and pulses per request are in test_api.py; this file covers string
lengths, nesting, NDJSON line length, the slow-body timeout and the number of
requests in flight. Header size is tested against a real server
(tests/e2e_schemathesis/test_real_server.py): it is hypercorn's limit.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing
from quart import Quart
from quart.typing import TestClientProtocol as Client

from ingestor.runtime import Runtime

from .conftest import pulse

JSON = {"Content-Type": "application/json"}
NDJSON = {"Content-Type": "application/x-ndjson"}


async def post(client: Client, data: bytes, headers: dict[str, str] = JSON) -> Any:
    return await client.post("/pulses", data=data, headers=headers)


async def totals(client: Client) -> list[tuple[str, str, int]]:
    body = await (await client.get("/aggregates")).get_json()
    return [(a["tenant_id"], a["used_amount"], a["pulse_count"]) for a in body["aggregates"]]


@pytest.mark.parametrize(
    ("field", "limit"), [("tenant_id", 128), ("product_sku", 128), ("use_unit", 64), ("id", 128)]
)
async def test_string_lengths(client: Client, field: str, limit: int) -> None:
    longest = pulse(**{field: "x" * limit})
    too_long = pulse(**{field: "y" * (limit + 1)})
    response = await post(client, json.dumps([longest, too_long]).encode())
    report = await response.get_json()
    assert (report["accepted"], report["rejected"]) == (1, 1)
    assert field in report["items"][0]["error"]
    single = await post(client, json.dumps(too_long).encode())
    assert single.status_code == 422


# -- nesting ----------------------------------------------------------------------

DEEP = 100_000


@pytest.mark.parametrize(
    "body",
    [
        b"[" * DEEP,
        b"[" * DEEP + b"]" * DEEP,
        b'{"a":' * DEEP,
        b'{"tenant_id": 1, "id": ' + b"[" * DEEP + b"]" * DEEP + b"}",
        b'[{"id": ' + b"[" * DEEP + b"]" * DEEP + b"}]",
        b"[" + b'{"a":' * DEEP,
    ],
    ids=[
        "open-arrays",
        "closed-arrays",
        "objects",
        "single-deep-field",
        "array-deep-field",
        "array-of-deep-objects",
    ],
)
async def test_deep_nesting_is_400_not_a_crash(client: Client, body: bytes) -> None:
    response = await post(client, body)
    assert response.status_code == 400
    error = (await response.get_json())["error"]
    assert error["code"] == "invalid_json"
    assert await totals(client) == []
    assert (await client.get("/readyz")).status_code == 200


async def test_deep_ndjson_line_is_rejected_alone(client: Client) -> None:
    deep = b'{"id": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    data = deep + b"\n" + json.dumps(pulse()).encode() + b"\n" + b"[" * DEEP + b"\n"
    response = await post(client, data, NDJSON)
    assert response.status_code == 202
    report = await response.get_json()
    assert (report["accepted"], report["rejected"]) == (1, 2)
    assert await totals(client) == [("t1", "1", 1)]


async def test_moderate_nesting_in_a_known_field_is_a_rejected_pulse(client: Client) -> None:
    nested = pulse(used_amount=[[[[1]]]])
    response = await post(client, json.dumps([nested, pulse()]).encode())
    report = await response.get_json()
    assert (report["accepted"], report["rejected"]) == (1, 1)


# -- invalid UTF-8 (msgspec raises UnicodeDecodeError, not one of its own errors) ------

BAD_UTF8 = b'{"tenant_id": "t\xff", "product_sku": "s", "use_unit": "u", "used_amount": 1}'


async def test_invalid_utf8_single_object_is_400(client: Client) -> None:
    response = await post(client, BAD_UTF8)
    assert response.status_code == 400
    assert (await response.get_json())["error"]["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("data", "headers"),
    [
        (b"[" + BAD_UTF8 + b"," + json.dumps(pulse()).encode() + b"]", JSON),
        (b'[{"tenant_id": 5},' + BAD_UTF8 + b"," + json.dumps(pulse()).encode() + b"]", JSON),
        (BAD_UTF8 + b"\n" + json.dumps(pulse()).encode(), NDJSON),
    ],
    ids=["array", "array-after-a-bad-pulse", "ndjson"],
)
async def test_invalid_utf8_pulse_is_rejected_alone(
    client: Client, data: bytes, headers: dict[str, str]
) -> None:
    response = await post(client, data, headers)
    assert response.status_code == 202
    report = await response.get_json()
    assert report["accepted"] == 1
    assert "not valid JSON" in [item["error"] for item in report["items"]]
    assert await totals(client) == [("t1", "1", 1)]


# -- NDJSON line length ---------------------------------------------------------------


@pytest.mark.parametrize("settings_overrides", [{"max_line_bytes": 200}])
async def test_long_ndjson_line_is_rejected_the_others_stored(client: Client) -> None:
    short = json.dumps(pulse(id="short")).encode()
    long = json.dumps(pulse(id="long", product_sku="s" * 120, use_unit="u" * 60)).encode()
    assert len(short) <= 200 < len(long)
    response = await post(
        client, b"\n".join([short, long, short.replace(b"short", b"other")]), NDJSON
    )
    report = await response.get_json()
    assert (report["accepted"], report["rejected"]) == (2, 1)
    [item] = report["items"]
    assert item["index"] == 1
    assert "max_line_bytes" in item["error"]
    assert await totals(client) == [("t1", "2", 2)]


async def test_max_line_bytes_default_is_64_kib(runtime: Runtime) -> None:
    assert runtime.settings.max_line_bytes == 64 * 1024


# -- slow bodies ---------------------------------------------------------------------


@pytest.mark.parametrize("settings_overrides", [{"body_timeout": 5}])
async def test_trickling_body_gets_408_and_never_holds_a_shard(
    client: Client, runtime: Runtime, autojump_clock: trio.testing.MockClock
) -> None:
    assert runtime.settings.body_timeout == 5
    started = trio.current_time()
    async with client.request("/pulses", method="POST", headers=JSON) as slow:
        await slow.send(b'[{"tenant_id": "t1", ')
        await slow.send(b'"product_sku": ')
        # The body is not complete, so nothing reached a shard; others are served.
        assert all(shard.statistics().queued == 0 for shard in runtime.shards)
        other = await post(client, json.dumps(pulse(tenant_id="t2")).encode())
        assert other.status_code == 202
        response = await slow.as_response()
    assert response.status_code == 408
    assert (await response.get_json())["error"]["code"] == "request_timeout"
    assert trio.current_time() - started >= 5
    assert await totals(client) == [("t2", "1", 1)]


async def test_body_timeout_reaches_quart(app: Quart) -> None:
    assert app.config["BODY_TIMEOUT"] == 30


# -- requests in flight -----------------------------------------------------------------


@pytest.mark.parametrize("settings_overrides", [{"max_in_flight": 2}])
async def test_requests_over_max_in_flight_are_503(app: Quart, client: Client) -> None:
    async with (
        client.request("/pulses", method="POST", headers=JSON) as first,
        client.request("/pulses", method="POST", headers=JSON) as second,
    ):
        await first.send(b"[")
        await second.send(b"[")
        await trio.testing.wait_all_tasks_blocked()
        assert app.asgi_app.in_flight == 2  # type: ignore[attr-defined]

        over = await post(client, json.dumps(pulse()).encode())
        assert over.status_code == 503
        assert over.headers["Retry-After"] == "1"
        error = (await over.get_json())["error"]
        assert (error["code"], "max_in_flight" in error["message"]) == ("overloaded", True)
        listing = await client.get("/aggregates")
        assert listing.status_code == 503
        # Probes and scrapes are not counted, and still answer.
        assert (await client.get("/readyz")).status_code == 200
        scrape = await (await client.get("/metrics")).get_data(as_text=True)
        assert "ingestor_http_requests_in_flight 2.0" in scrape

        for connection in (first, second):
            await connection.send(json.dumps(pulse()).encode() + b"]")
            await connection.send_complete()
            assert (await connection.as_response()).status_code == 202
    assert app.asgi_app.in_flight == 0  # type: ignore[attr-defined]
    assert (await post(client, json.dumps(pulse()).encode())).status_code == 202
    assert await totals(client) == [("t1", "3", 3)]


@pytest.mark.parametrize("settings_overrides", [{"max_in_flight": 1}])
async def test_a_disconnected_client_frees_its_slot(app: Quart, client: Client) -> None:
    """A client that goes away mid-body is uncounted (driven as raw ASGI: the test
    client cannot disconnect without waiting for a response that never comes)."""
    gone = trio.Event()
    messages = [{"type": "http.request", "body": b"[", "more_body": True}]
    answered: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        answered.append(message)

    scope = {
        "type": "http",
        "asgi": {"spec_version": "2.1"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/pulses",
        "raw_path": b"/pulses",
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8081),
        "extensions": {},
        "headers": [(b"host", b"localhost"), (b"content-type", b"application/json")],
    }
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app, scope, receive, send)
        await trio.testing.wait_all_tasks_blocked()
        assert app.asgi_app.in_flight == 1  # type: ignore[attr-defined]
        gone.set()
    assert app.asgi_app.in_flight == 0  # type: ignore[attr-defined]
    assert answered == []
    assert (await post(client, json.dumps(pulse()).encode())).status_code == 202


# -- header size -----------------------------------------------------------------------


@pytest.mark.parametrize("url", ["/pulses", "/healthz"])
async def test_oversized_headers_are_431(client: Client, url: str) -> None:
    """hypercorn bounds headers only while they arrive incomplete; the app always does."""
    fits = await client.get("/healthz", headers={"X-Big": "a" * 15_000})
    assert fits.status_code == 200
    response = await client.open(
        url,
        method="POST" if url == "/pulses" else "GET",
        headers={"X-Big": "a" * 17_000},
        json=pulse(),
    )
    assert response.status_code == 431
    error = (await response.get_json())["error"]
    assert (error["code"], "max_header_bytes" in error["message"]) == ("headers_too_large", True)
    assert await totals(client) == []
