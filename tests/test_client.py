"""ingestor.client against a real server, and behind a scripted proxy for the failures.

One server process serves the whole module. It runs from a thread with its own
trio loop, so the plain synchronous tests can use it as well as the trio ones;
each test writes to a tenant of its own. The proxy (`ScriptedProxy`) stands
between a client and that server and answers each request as its script
says: 503, a 500 after storing, a timeout after storing, a dropped connection,
a 401, a 413, or a report that withholds a pulse. Every total is checked
against GET /aggregates of the real server.
"""

from __future__ import annotations

import datetime as dt
import queue
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import h11
import httpx
import msgspec
import pytest
import trio

from ingestor.client import (
    BufferFull,
    Client,
    ClientClosed,
    Failure,
    FlushTimeout,
    TrioClient,
    Undelivered,
    open_client,
)
from tests.support.server import ServerProcess, free_port

pytestmark = pytest.mark.e2e

SERVER_ENV = {"INGESTOR_COMMIT_INTERVAL": "3600", "INGESTOR_DURABILITY": "os"}
CLIENT_THREAD = "ingestor-client"
FAST_RETRIES: dict[str, Any] = {"initial_backoff": 0.01, "max_backoff": 0.05}


# -- the shared server -----------------------------------------------------------


@contextmanager
def serving(data_dir: Path) -> Iterator[ServerProcess]:
    """A ServerProcess kept by a trio loop in a thread of its own."""
    handoff: queue.Queue[tuple[ServerProcess, trio.lowlevel.TrioToken, trio.CancelScope]] = (
        queue.Queue()
    )
    errors: list[BaseException] = []

    async def serve() -> None:
        async with ServerProcess(data_dir, env=SERVER_ENV) as server:
            with trio.CancelScope() as scope:
                handoff.put((server, trio.lowlevel.current_trio_token(), scope))
                await trio.sleep_forever()

    def run() -> None:
        try:
            trio.run(serve)
        except BaseException as exc:
            errors.append(exc)
            raise

    thread = threading.Thread(target=run, name="test-server")
    thread.start()
    while True:
        try:
            server, token, scope = handoff.get(timeout=0.1)
            break
        except queue.Empty:
            if not thread.is_alive():
                raise AssertionError("the test server did not start") from errors[0]
    try:
        yield server
    finally:
        token.run_sync_soon(scope.cancel)
        thread.join(timeout=60)
        assert not errors, errors
        assert "Traceback" not in server.output, server.output[-4000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(tmp_path_factory.mktemp("client") / "data") as running:
        yield running


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def _sum(rows: list[dict[str, Any]]) -> tuple[Decimal, int]:
    return (
        sum((Decimal(row["used_amount"]) for row in rows), Decimal(0)),
        sum(row["pulse_count"] for row in rows),
    )


def stored(url: str, tenant: str) -> tuple[Decimal, int]:
    """(used_amount, pulse_count) the server holds for `tenant`, over all its buckets."""
    response = httpx.get(f"{url}/aggregates", params={"tenant_id": tenant, "limit": "10000"})
    assert response.status_code == 200, response.text
    return _sum(response.json()["aggregates"])


async def stored_async(url: str, tenant: str) -> tuple[Decimal, int]:
    async with httpx.AsyncClient() as http:
        response = await http.get(
            f"{url}/aggregates", params={"tenant_id": tenant, "limit": "10000"}
        )
    assert response.status_code == 200, response.text
    return _sum(response.json()["aggregates"])


def client_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == CLIENT_THREAD]


def ids_of(lines: Sequence[bytes]) -> list[str]:
    return [msgspec.json.decode(line)["id"] for line in lines]


# -- a proxy that misbehaves on cue ---------------------------------------------------


@dataclass
class Seen:
    """One request the proxy received, and the step it answered with."""

    step: str
    at: float
    body: bytes
    authorization: str | None

    @property
    def lines(self) -> list[bytes]:
        return self.body.splitlines(keepends=True)


def _json(status: int, value: object) -> tuple[int, list[tuple[str, str]], bytes]:
    return status, [("Content-Type", "application/json")], msgspec.json.encode(value)


def _error(status: int, code: str) -> tuple[int, list[tuple[str, str]], bytes]:
    return _json(status, {"error": {"code": code, "message": f"{code} (scripted)"}})


class ScriptedProxy:
    """HTTP/1.1 in front of the real server: request n is answered as `script[n]` says.

    Steps: "503" (Retry-After: 1), "500 after storing", "timeout after
    storing" (forwards, then never answers), "drop after storing" (forwards,
    then closes the connection), "withhold first" (forwards all but the first
    pulse and reports that one "not stored, retry"), "401", "413 over 4"
    (413 if the body holds more than 4 pulses), "forward". After the script,
    every request gets `then`.
    """

    def __init__(
        self, upstream: str, http: httpx.AsyncClient, script: Sequence[str], then: str = "forward"
    ) -> None:
        self.upstream = upstream
        self.http = http
        self.script = list(script)
        self.then = then
        self.seen: list[Seen] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        async with stream:
            while (request := await self._read(stream, connection)) is not None:
                answer = await self._answer(*request)
                if answer is None:
                    return  # "drop": close without a word
                status, headers, body = answer
                headers = [*headers, ("Content-Length", str(len(body)))]
                for event in (
                    h11.Response(status_code=status, headers=headers),
                    h11.Data(data=body),
                    h11.EndOfMessage(),
                ):
                    await stream.send_all(connection.send(event) or b"")
                connection.start_next_cycle()

    async def _read(
        self, stream: trio.SocketStream, connection: h11.Connection
    ) -> tuple[h11.Request, bytes] | None:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                try:
                    connection.receive_data(await stream.receive_some(65536))
                except trio.BrokenResourceError:
                    return None
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, bytes(body)
            else:
                return None

    async def _forward(self, body: bytes) -> httpx.Response:
        return await self.http.post(
            f"{self.upstream}/pulses",
            content=body,
            headers={"Content-Type": "application/x-ndjson"},
        )

    async def _answer(
        self, request: h11.Request, body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes] | None:
        step = self.script.pop(0) if self.script else self.then
        authorization = dict(request.headers).get(b"authorization")
        self.seen.append(
            Seen(step, trio.current_time(), body, authorization.decode() if authorization else None)
        )
        match step:
            case "503":
                status, headers, payload = _error(503, "overloaded")
                return status, [*headers, ("Retry-After", "1")], payload
            case "401":
                return _error(401, "unauthorized")
            case "413 over 4" if len(body.splitlines()) > 4:
                return _error(413, "too_many_pulses")
            case "withhold first":
                first, *rest = body.splitlines(keepends=True)
                report = (await self._forward(b"".join(rest))).json()
                items = [{**item, "index": item["index"] + 1} for item in report["items"]]
                withheld = {
                    "index": 0,
                    "status": "rejected",
                    "id": msgspec.json.decode(first)["id"],
                    "error": "not stored, retry: the store is busy (scripted)",
                }
                report.update(items=[withheld, *items], rejected=report["rejected"] + 1)
                return _json(202, report)
        response = await self._forward(body)
        match step:
            case "500 after storing":
                return _error(500, "internal")
            case "timeout after storing":
                await trio.sleep_forever()
            case "drop after storing":
                return None
        headers = [("Content-Type", response.headers["Content-Type"])]
        return response.status_code, headers, response.content


# -- record(): checked and written at once ------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"used_amount": 1.5}, TypeError, "float"),
        ({"used_amount": True}, TypeError, "bool"),
        ({"used_amount": None}, TypeError, "NoneType"),
        ({"used_amount": -1}, ValueError, ">= 0"),
        ({"used_amount": "-0.5"}, ValueError, ">= 0"),
        ({"used_amount": 10**18}, ValueError, "10\\*\\*18"),
        ({"used_amount": "1.0000000001"}, ValueError, "9 fractional"),
        ({"used_amount": "NaN"}, ValueError, "finite"),
        ({"used_amount": "Infinity"}, ValueError, "finite"),
        ({"used_amount": "one"}, ValueError, "not a decimal"),
        ({"tenant_id": ""}, ValueError, "tenant_id must be 1 to 128"),
        ({"tenant_id": "t\n1"}, ValueError, "control"),
        ({"tenant_id": 7}, TypeError, "tenant_id must be a str"),
        ({"product_sku": "s" * 129}, ValueError, "product_sku"),
        ({"use_unit": "u" * 65}, ValueError, "use_unit must be 1 to 64"),
        ({"id": ""}, ValueError, "id must be 1 to 128"),
        ({"id": "a\x85b"}, ValueError, "control"),
        ({"timestamp": dt.datetime(2026, 1, 1)}, ValueError, "UTC offset"),
        ({"timestamp": "2026-01-01T00:00:00"}, ValueError, "UTC offset"),
        ({"timestamp": "yesterday"}, ValueError, "RFC 3339"),
        ({"timestamp": 1700000000}, TypeError, "timestamp"),
    ],
)
def test_record_refuses_a_bad_pulse_at_once(
    fields: dict[str, Any], error: type[Exception], match: str
) -> None:
    client = TrioClient("http://127.0.0.1:9")
    pulse: dict[str, Any] = {
        "tenant_id": "t1", "product_sku": "sku1", "use_unit": "call", "used_amount": 1, **fields,
    }  # fmt: skip
    with pytest.raises(error, match=match):
        client.record(**pulse)
    assert client.statistics().recorded == 0


def test_amounts_are_written_as_exact_decimal_strings() -> None:
    client = TrioClient("http://127.0.0.1:9")
    given: list[Decimal | int | str] = [
        7, "0.25", "1e3", " 2.5 ", Decimal("2.5000000000"), Decimal("0.000000001"),
        Decimal("999999999999999999.999999999"), Decimal("-0"), "1_000",
    ]  # fmt: skip
    for amount in given:
        client.record("t1", "sku1", "call", amount)
    sent = [msgspec.json.decode(line)["used_amount"] for line in client.undelivered()]
    assert sent == ["7", "0.25", "1000", "2.5", "2.500000000", "0.000000001",
                    "999999999999999999.999999999", "0", "1000"]  # fmt: skip


def test_ids_and_timestamps() -> None:
    client = TrioClient("http://127.0.0.1:9")
    other = TrioClient("http://127.0.0.1:9", stamp_timestamps=False)
    before = dt.datetime.now(dt.UTC)
    generated = [client.record("t1", "s", "u", 1) for _ in range(1000)]
    generated += [other.record("t1", "s", "u", 1) for _ in range(1000)]
    assert len(set(generated)) == 2000
    assert client.record("t1", "s", "u", 1, id="mine") == "mine"
    moment = dt.datetime(2026, 11, 28, 13, 30, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    client.record("t1", "s", "u", 1, timestamp=moment)
    client.record("t1", "s", "u", 1, timestamp="2026-11-28T12:30:00.5Z")
    lines = [msgspec.json.decode(line) for line in client.undelivered()]
    assert [line["id"] for line in lines[:1000]] == generated[:1000]
    stamped = dt.datetime.fromisoformat(lines[0]["timestamp"])
    assert before <= stamped <= dt.datetime.now(dt.UTC)
    assert lines[-2]["timestamp"] == "2026-11-28T12:30:00+00:00"
    assert lines[-1]["timestamp"] == "2026-11-28T12:30:00.500000+00:00"
    assert "timestamp" not in msgspec.json.decode(other.undelivered()[0])


# -- trio: against the real server ----------------------------------------------------------


async def test_trio_tasks_record_and_flush_delivers_exact_sums(
    server: ServerProcess, tenant: str
) -> None:
    amounts = [Decimal(f"{i}.{i:09d}"[-20:]) for i in range(1, 2001)]

    async with open_client(server.url, max_batch_pulses=300, flush_interval=0.01) as client:

        async def work(share: Sequence[Decimal]) -> None:
            for n, amount in enumerate(share):
                client.record(tenant, "sku1", "call", amount if n % 2 else str(amount))
                if n % 50 == 0:
                    await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            for k in range(4):
                nursery.start_soon(work, amounts[k::4])
        assert await client.flush() == []
        # flush() returned: everything is stored, no polling needed.
        assert await stored_async(server.url, tenant) == (sum(amounts), len(amounts))
        stats = client.statistics()
    assert (stats.recorded, stats.accepted, stats.duplicates, stats.failed) == (2000, 2000, 0, 0)
    assert stats.unsettled == 0
    assert stats.requests >= 2000 // 300


async def test_flush_sends_at_once_whatever_the_interval(
    server: ServerProcess, tenant: str
) -> None:
    async with open_client(server.url, flush_interval=3600, max_batch_pulses=10_000) as client:
        for _ in range(10):
            client.record(tenant, "sku1", "call", "0.1")
        with trio.fail_after(10):
            assert await client.flush() == []
        assert await stored_async(server.url, tenant) == (Decimal("1.0"), 10)
        assert client.statistics().requests == 1


async def test_rejected_and_conflicting_pulses_are_reported_not_retried(
    server: ServerProcess, tenant: str
) -> None:
    seen: list[Failure] = []
    now = dt.datetime.now(dt.UTC)
    async with open_client(server.url, on_failure=seen.append) as client:
        client.record(tenant, "sku1", "call", 1, id="same", timestamp=now)
        client.record(tenant, "sku1", "call", 5, timestamp=now - dt.timedelta(days=40))
        [rejected] = await client.flush()
        client.record(tenant, "sku1", "call", 1, id="same", timestamp=now)  # a replay
        client.record(tenant, "sku1", "call", 2, id="same", timestamp=now)  # another pulse
        [conflict] = await client.flush()
        stats = client.statistics()

    assert (rejected.status, rejected.http_status) == ("rejected", 202)
    assert "late window" in rejected.reason
    assert rejected.pulse()["used_amount"] == "5"
    assert (conflict.status, conflict.id) == ("conflict", "same")
    assert conflict.pulse()["used_amount"] == "2"
    assert seen == [rejected, conflict]
    assert (stats.accepted, stats.duplicates, stats.failed) == (1, 1, 2)
    assert (stats.requests, stats.retries) == (2, 0)
    assert await stored_async(server.url, tenant) == (Decimal(1), 1)


async def test_buffer_full_while_the_server_is_unreachable() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with trio.move_on_after(1) as outer:
        async with open_client(dead, max_buffered=3, **FAST_RETRIES) as client:
            recorded = [client.record("t1", "sku1", "call", 1) for _ in range(3)]
            with pytest.raises(BufferFull):
                client.record("t1", "sku1", "call", 1)
            with trio.move_on_after(0.3) as waiting:
                await client.wait_not_full()
            assert waiting.cancelled_caught
    assert outer.cancelled_caught  # leaving the block waited for a delivery that never came
    assert ids_of(client.undelivered()) == recorded
    assert client.statistics().retries > 0
    with pytest.raises(ClientClosed):
        client.record("t1", "sku1", "call", 1)


# -- trio: behind the scripted proxy ------------------------------------------------------------


async def test_retries_503_500_timeout_and_drop_then_counts_once(
    server: ServerProcess, tenant: str
) -> None:
    script = ["503", "500 after storing", "timeout after storing", "drop after storing"]
    amounts = [Decimal(i) / 1000 for i in range(1, 101)]
    async with httpx.AsyncClient(timeout=30) as http, trio.open_nursery() as nursery:
        proxy = ScriptedProxy(server.url, http, script)
        await nursery.start(proxy.serve)
        async with open_client(
            proxy.url, api_key="s3cret", timeout=1.0, flush_interval=3600, **FAST_RETRIES
        ) as client:
            for amount in amounts:
                client.record(tenant, "sku1", "call", amount)
            assert await client.flush() == []
            stats = client.statistics()
        nursery.cancel_scope.cancel()

    assert [seen.step for seen in proxy.seen] == [*script, "forward"]
    assert {seen.body for seen in proxy.seen} == {proxy.seen[0].body}  # same ids every time
    assert len(proxy.seen[0].lines) == 100
    assert {seen.authorization for seen in proxy.seen} == {"Bearer s3cret"}
    assert proxy.seen[1].at - proxy.seen[0].at >= 1.0  # Retry-After: 1
    # Stored by the second request; the last one learnt it: all duplicates.
    assert (stats.requests, stats.retries, stats.accepted, stats.duplicates) == (5, 4, 0, 100)
    assert await stored_async(server.url, tenant) == (sum(amounts), 100)


async def test_a_pulse_the_store_did_not_take_is_retried_alone(
    server: ServerProcess, tenant: str
) -> None:
    async with httpx.AsyncClient(timeout=30) as http, trio.open_nursery() as nursery:
        proxy = ScriptedProxy(server.url, http, ["withhold first"])
        await nursery.start(proxy.serve)
        async with open_client(proxy.url, flush_interval=3600, **FAST_RETRIES) as client:
            for amount in (1, 2, 3):
                client.record(tenant, "sku1", "call", amount)
            assert await client.flush() == []
            stats = client.statistics()
        nursery.cancel_scope.cancel()

    first, second = proxy.seen
    assert len(first.lines) == 3
    assert second.lines == first.lines[:1]
    assert (stats.accepted, stats.retries) == (3, 1)
    assert await stored_async(server.url, tenant) == (Decimal(6), 3)


async def test_413_halves_the_batch(server: ServerProcess, tenant: str) -> None:
    async with httpx.AsyncClient(timeout=30) as http, trio.open_nursery() as nursery:
        proxy = ScriptedProxy(server.url, http, [], then="413 over 4")
        await nursery.start(proxy.serve)
        async with open_client(proxy.url, flush_interval=3600) as client:
            for _ in range(10):
                client.record(tenant, "sku1", "call", 1)
            assert await client.flush() == []
            for _ in range(3):
                client.record(tenant, "sku1", "call", 1)
            assert await client.flush() == []
        nursery.cancel_scope.cancel()

    assert len(proxy.seen[0].lines) == 10
    forwarded = [len(seen.lines) for seen in proxy.seen if len(seen.lines) <= 4]
    assert sum(forwarded) == 13
    assert len(proxy.seen[-1].lines) <= 2  # smaller batches from then on
    assert await stored_async(server.url, tenant) == (Decimal(13), 13)


async def test_a_refused_request_fails_its_pulses_without_retry(
    server: ServerProcess, tenant: str
) -> None:
    async with httpx.AsyncClient(timeout=30) as http, trio.open_nursery() as nursery:
        proxy = ScriptedProxy(server.url, http, [], then="401")
        await nursery.start(proxy.serve)
        async with open_client(proxy.url, flush_interval=3600, **FAST_RETRIES) as client:
            recorded = [client.record(tenant, "sku1", "call", 1) for _ in range(3)]
            failures = await client.flush()
        nursery.cancel_scope.cancel()

    assert [(f.status, f.http_status, f.id) for f in failures] == [
        ("refused", 401, pulse_id) for pulse_id in recorded
    ]
    assert "unauthorized" in failures[0].reason
    assert len(proxy.seen) == 1
    assert await stored_async(server.url, tenant) == (Decimal(0), 0)


# -- the threaded client, from plain code ----------------------------------------------------------


def test_threads_record_concurrently_into_two_clients(server: ServerProcess, tenant: str) -> None:
    per_thread = 1000
    ids: list[list[str]] = [[] for _ in range(8)]
    with (
        Client(server.url, max_batch_pulses=500, flush_interval=0.01) as one,
        Client(server.url, max_batch_pulses=700, concurrency=1) as two,
    ):
        assert len(client_threads()) == 2

        def work(n: int) -> None:
            client = one if n % 2 else two
            for _ in range(per_thread):
                ids[n].append(client.record(tenant, "sku1", f"unit{n % 3}", Decimal("0.001")))

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert one.flush() == []
        assert two.flush() == []
        assert stored(server.url, tenant) == (Decimal("8.000"), 8 * per_thread)
        stats = [one.statistics(), two.statistics()]

    every_id = [pulse_id for share in ids for pulse_id in share]
    assert len(set(every_id)) == len(every_id) == 8 * per_thread
    assert sum(s.accepted for s in stats) == 8 * per_thread
    assert sum(s.duplicates + s.failed + s.unsettled for s in stats) == 0
    assert client_threads() == []
    with pytest.raises(ClientClosed):
        one.record(tenant, "sku1", "call", 1)


def test_sync_flush_waits_and_close_delivers(server: ServerProcess, tenant: str) -> None:
    client = Client(server.url, flush_interval=3600)
    client.record(tenant, "sku1", "call", "2.5")
    assert client.flush(timeout=10) == []
    assert stored(server.url, tenant) == (Decimal("2.5"), 1)
    client.record(tenant, "sku1", "call", "0.5")
    assert client.close() == []  # delivers what is left, then stops the thread
    assert client_threads() == []
    assert stored(server.url, tenant) == (Decimal(3), 2)
    assert client.close() == []  # twice is harmless


def test_sync_buffer_full_raises_or_blocks_and_close_hands_back_the_rest() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    eager = Client(dead, max_buffered=5, when_full="raise", **FAST_RETRIES)
    recorded = [eager.record("t1", "sku1", "call", 1) for _ in range(5)]
    with pytest.raises(BufferFull):
        eager.record("t1", "sku1", "call", 1)
    with pytest.raises(FlushTimeout):
        eager.flush(timeout=0.2)
    with pytest.raises(Undelivered) as undelivered:
        eager.close(timeout=0.2)
    assert ids_of(undelivered.value.lines) == recorded

    patient = Client(dead, max_buffered=2, **FAST_RETRIES)
    for _ in range(2):
        patient.record("t1", "sku1", "call", 1)
    outcome: list[str] = []

    def record_one_more() -> None:
        try:
            patient.record("t1", "sku1", "call", 1)
        except ClientClosed:
            outcome.append("closed")
        else:
            outcome.append("recorded")

    blocked = threading.Thread(target=record_one_more)
    blocked.start()
    blocked.join(timeout=0.2)
    assert blocked.is_alive()  # waiting for room
    with pytest.raises(Undelivered) as undelivered:
        patient.close(timeout=0.1)
    blocked.join(timeout=10)
    assert outcome == ["closed"]
    assert len(undelivered.value.lines) == 2
    assert client_threads() == []
