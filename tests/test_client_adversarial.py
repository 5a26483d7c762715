"""ingestor.client pushed where tests/test_client.py does not go.

A real server (tests/test_client.py's, run from a thread so the plain
synchronous tests can use it too) holds every pulse; totals are read back
from GET /aggregates. Where a failure has to be injected, a small HTTP endpoint
(`Endpoint`) stands in front of that server: request n is answered as the
test's `answer(endpoint, n, body)` says, usually by forwarding to the real
server, sometimes with a status, a header or a body no healthy server sends.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import Decimal

import h11
import httpx
import msgspec
import pytest
import trio

from ingestor.client import (
    Client,
    ClientClosed,
    Failure,
    TrioClient,
    Undelivered,
    open_client,
)
from tests.support.fixtures import ABORTED_UPLOAD_WARNINGS
from tests.support.server import ServerProcess, free_port
from tests.test_client import FAST_RETRIES, ids_of, server, stored, stored_async, tenant

__all__ = ["server", "tenant"]  # fixtures this module's tests take from tests/test_client.py

pytestmark = [
    pytest.mark.e2e,
    *(pytest.mark.filterwarnings(rule) for rule in ABORTED_UPLOAD_WARNINGS),
]

# The shared server and the helpers that read it back are tests/test_client.py's.
NDJSON = "application/x-ndjson"


# -- an endpoint that answers as the test says ---------------------------------------------

Reply = tuple[int, list[tuple[str, bytes]], bytes]
Answer = Callable[["Endpoint", int, bytes], Awaitable[Reply | None]]


def error_reply(status: int, *headers: tuple[str, bytes]) -> Reply:
    body = msgspec.json.encode({"error": {"code": f"e{status}", "message": "scripted"}})
    return status, [("Content-Type", b"application/json"), *headers], body


class Endpoint:
    """HTTP/1.1 on a free port. Each request is answered by `answer(self, n, body)`
    (None: close without a word), written as raw bytes so that a test can send
    headers and bodies h11 would refuse to write; one request per connection."""

    def __init__(self, upstream: str, http: httpx.AsyncClient, answer: Answer) -> None:
        self.upstream = upstream
        self.http = http
        self.answer = answer
        self.bodies: list[bytes] = []
        self.times: list[float] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def forward(self, body: bytes) -> Reply:
        response = await self.http.post(
            f"{self.upstream}/pulses", content=body, headers={"Content-Type": NDJSON}
        )
        return (
            response.status_code,
            [("Content-Type", response.headers["Content-Type"].encode())],
            response.content,
        )

    async def _connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            connection = h11.Connection(h11.SERVER)
            body = bytearray()
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    try:
                        data = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        return
                    if not data:
                        return
                    connection.receive_data(data)
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif not isinstance(event, h11.Request):
                    return
            n = len(self.bodies)
            self.bodies.append(bytes(body))
            self.times.append(trio.current_time())
            reply = await self.answer(self, n, bytes(body))
            if reply is None:
                return
            status, headers, payload = reply
            head = [
                f"HTTP/1.1 {status} Scripted".encode(),
                *(name.encode() + b": " + value for name, value in headers),
                b"Content-Length: %d" % len(payload),
                b"Connection: close",
            ]
            with trio.move_on_after(5):
                await stream.send_all(b"\r\n".join(head) + b"\r\n\r\n" + payload)


@asynccontextmanager
async def endpoint(upstream: str, answer: Answer) -> AsyncIterator[Endpoint]:
    async with httpx.AsyncClient(timeout=30) as http, trio.open_nursery() as nursery:
        running = Endpoint(upstream, http, answer)
        await nursery.start(running.serve)
        yield running
        nursery.cancel_scope.cancel()


def first_then_forward(first: Reply) -> Answer:
    async def answer(ep: Endpoint, n: int, body: bytes) -> Reply | None:
        return first if n == 0 else await ep.forward(body)

    return answer


# -- each of these failed against the client before the fix that followed it ----------------


GARBLED_503 = (503, [("Content-Encoding", b"gzip")], b"this is not gzip")
SUPERSCRIPT_RETRY_AFTER = (503, [("Retry-After", b"\xb2")], b"")  # latin-1 "²": isdigit()


# When the senders die mid-response, httpcore's body generator is left unfinished.
DEAD_SENDER_WARNINGS = [
    "ignore:Async generator '(httpcore|httpx)[.]:ResourceWarning",
    "ignore:Exception ignored in. <async_generator object "
    "[A-Za-z0-9]+[.](__aiter__|_receive_response_body) "
    ":pytest.PytestUnraisableExceptionWarning",
]


@pytest.mark.parametrize(
    "first", [GARBLED_503, SUPERSCRIPT_RETRY_AFTER], ids=["garbled-gzip", "retry-after-superscript"]
)
@pytest.mark.filterwarnings(DEAD_SENDER_WARNINGS[0])
@pytest.mark.filterwarnings(DEAD_SENDER_WARNINGS[1])
async def test_a_malformed_transient_answer_is_retried_not_fatal(
    server: ServerProcess, tenant: str, first: Reply
) -> None:
    """One bad 503 from a middlebox must cost a retry, not the client's senders."""
    outcome: object = None
    async with endpoint(server.url, first_then_forward(first)) as ep:
        try:
            with trio.fail_after(5):
                async with open_client(ep.url, flush_interval=3600, **FAST_RETRIES) as client:
                    for _ in range(3):
                        client.record(tenant, "sku1", "call", "0.5")
                    outcome = await client.flush()
        except Exception as exc:
            outcome = f"the client stopped: {exc!r}"
    assert outcome == []
    assert len(ep.bodies) == 2
    assert await stored_async(server.url, tenant) == (Decimal("1.5"), 3)


@pytest.mark.parametrize("api_key", ["key\r\nX-Injected: 1", "ключ"], ids=["crlf", "non-ascii"])
async def test_an_unsendable_api_key_fails_fast_not_retried_forever(
    server: ServerProcess, api_key: str
) -> None:
    """A key no request can carry is a bug in the caller's key: refuse it at once
    (ValueError) or fail its pulses as `refused`; never retry it forever or die."""

    async def answer(ep: Endpoint, n: int, body: bytes) -> Reply | None:
        return error_reply(401)

    outcome = "flush() had not returned after 2 s: the request is retried forever"
    async with endpoint(server.url, answer) as ep:
        try:
            with trio.move_on_after(2):
                async with open_client(ep.url, api_key=api_key, **FAST_RETRIES) as client:
                    client.record("t1", "sku1", "call", 1)
                    failures = await client.flush()
                    outcome = f"failed as {sorted({f.status for f in failures})}"
        except ValueError:
            outcome = "refused at construction"
        except Exception as exc:
            outcome = f"the client stopped: {exc!r}"
    assert outcome in ("refused at construction", "failed as ['refused']")


async def test_recording_an_explicit_id_again_is_a_duplicate_not_a_conflict(
    server: ServerProcess, tenant: str
) -> None:
    """The module's promise: `duplicate` (delivered) covers "an earlier record of that
    id". A caller replaying its own event id (after a restart, say) must not be told
    the pulse failed as a conflict: it was billed, and a caller that believes it was
    not will record it again under a new id."""
    async with open_client(server.url, flush_interval=3600) as client:
        client.record(tenant, "sku1", "call", 1, id="order-42")
        first = await client.flush()
        client.record(tenant, "sku1", "call", 1, id="order-42")  # the same event again
        again = await client.flush()
        stats = client.statistics()
    assert [(f.status, f.reason) for f in first + again] == []
    assert (stats.accepted, stats.duplicates, stats.failed) == (1, 1, 0)
    assert await stored_async(server.url, tenant) == (Decimal(1), 1)


def test_ids_stay_unique_in_processes_forked_after_the_client_was_made(
    server: ServerProcess, tenant: str
) -> None:
    """A client made at import time, then a fork (a pre-forking server, a
    multiprocessing pool): each worker's pulses must keep ids of their own, or
    the server takes the second worker's pulse for a replay of the first's."""
    client = TrioClient(server.url, stamp_timestamps=False, flush_interval=3600)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: records one pulse and hands its NDJSON line back
        try:
            client.record(tenant, "sku1", "call", 1)
            os.write(write_end, b"".join(client.undelivered()))
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        worker_line = pipe.read()
    # What the worker's senders would have POSTed:
    response = httpx.post(client.url, content=worker_line, headers={"Content-Type": NDJSON})
    assert (response.status_code, response.json()["accepted"]) == (202, 1)

    async def parent() -> tuple[str, list[Failure]]:  # the parent runs the same client
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            pulse_id = client.record(tenant, "sku1", "call", 1)
            failures = await client.flush()
            await client.aclose()
        return pulse_id, failures

    parent_id, failures = trio.run(parent)
    worker_id = ids_of([worker_line])[0]
    assert failures == []
    assert (worker_id != parent_id, stored(server.url, tenant)) == (True, (Decimal(2), 2))


async def test_aclose_after_the_senders_stopped_raises_undelivered() -> None:
    """TrioClient.aclose: "Raises Undelivered if the senders stopped (or never ran)
    with pulses unsettled" -- the caller needs the lines to keep them."""
    client = TrioClient(f"http://127.0.0.1:{free_port()}", **FAST_RETRIES)
    senders = trio.CancelScope()
    stopped = trio.Event()

    async def supervised(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with senders:
            await client.run(task_status=task_status)
        stopped.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(supervised)
        recorded = client.record("t1", "sku1", "call", 1)
        senders.cancel()  # e.g. the supervisor restarts its children
        await stopped.wait()
        try:
            await client.aclose()
        except Undelivered as exc:
            outcome: object = ids_of(exc.lines)
        except ClientClosed as exc:
            outcome = f"ClientClosed: {exc}"
        else:
            outcome = "nothing raised"
    assert outcome == [recorded]


def test_a_client_running_when_the_process_forks_takes_nothing_in_the_child(
    server: ServerProcess, tenant: str
) -> None:
    """Its senders stay in the parent: in the child, record() says so
    (ClientClosed) instead of buffering for nobody, close() has nothing to
    deliver, and the parent's waiting pulse is delivered once, by the parent."""
    client = Client(server.url, flush_interval=3600)
    client.record(tenant, "sku1", "call", 1)  # waiting in the parent's buffer at the fork
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        outcome = b"nothing raised"
        try:
            try:
                client.record(tenant, "sku1", "call", 5)
            except ClientClosed as exc:
                outcome = b"closed: " + str(exc).encode()
            outcome += b" | close: " + repr(client.close(timeout=5)).encode()
        except BaseException as exc:  # the parent reads whatever happened
            outcome = repr(exc).encode()
        finally:
            os.write(write_end, outcome)
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        child = pipe.read().decode()
    assert client.close() == []
    assert child.startswith("closed: the client was made in the parent process")
    assert child.endswith(" | close: []")
    assert stored(server.url, tenant) == (Decimal(1), 1)


async def test_undelivered_carries_the_failures_not_handed_out() -> None:
    """A pulse refused, then the senders stopped with another in flight: aclose()
    raises Undelivered with the second's line and the first's failure."""
    refused, retried = trio.Event(), trio.Event()

    async def answer(ep: Endpoint, n: int, body: bytes) -> Reply | None:
        if n == 0:
            return error_reply(422)
        retried.set()
        return error_reply(503)

    async with endpoint(f"http://127.0.0.1:{free_port()}", answer) as ep:
        client = TrioClient(ep.url, flush_interval=0.01, on_failure=lambda f: refused.set())
        senders = trio.CancelScope()
        async with trio.open_nursery() as nursery:

            async def supervised(
                *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
            ) -> None:
                with senders:
                    await client.run(task_status=task_status)

            await nursery.start(supervised)
            first = client.record("t1", "sku1", "call", 1)
            await refused.wait()
            second = client.record("t1", "sku1", "call", 2)
            await retried.wait()  # the second is in flight, answered 503
            senders.cancel()
        with pytest.raises(Undelivered) as caught:
            await client.aclose()
    assert ids_of(caught.value.lines) == [second]
    assert [(f.status, f.id, f.http_status) for f in caught.value.failures] == [
        ("refused", first, 422)
    ]


# -- what holds ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 409, 415, 422])
async def test_a_refused_request_fails_every_pulse_once_without_retry(
    server: ServerProcess, status: int
) -> None:
    async def answer(ep: Endpoint, n: int, body: bytes) -> Reply | None:
        return error_reply(status)

    seen: list[Failure] = []
    async with (
        endpoint(server.url, answer) as ep,
        open_client(ep.url, on_failure=seen.append, **FAST_RETRIES) as client,
    ):
        recorded = [client.record("t1", "sku1", "call", n) for n in range(3)]
        failures = await client.flush()
        assert await client.flush() == []  # handed out once
        stats = client.statistics()
    assert [(f.status, f.http_status, f.id) for f in failures] == [
        ("refused", status, pulse_id) for pulse_id in recorded
    ]
    assert [f.pulse()["used_amount"] for f in failures] == ["0", "1", "2"]
    assert seen == failures
    assert (len(ep.bodies), stats.retries, stats.failed, stats.unsettled) == (1, 0, 3, 0)


async def test_a_single_pulse_too_large_fails_as_refused() -> None:
    async def answer(ep: Endpoint, n: int, body: bytes) -> Reply | None:
        return error_reply(413)

    async with (
        endpoint("http://unused", answer) as ep,
        open_client(ep.url, **FAST_RETRIES) as client,
    ):
        for _ in range(4):
            client.record("t1", "sku1", "call", 1)
        failures = await client.flush()
    assert [(f.status, f.http_status) for f in failures] == [("refused", 413)] * 4
    assert [len(body.splitlines()) for body in ep.bodies] == [4, 2, 1, 1, 2, 1, 1]


async def test_408_429_502_and_503_without_retry_after_are_retried_and_counted_once(
    server: ServerProcess, tenant: str
) -> None:
    script = [
        error_reply(408),
        error_reply(429),
        (502, [("Content-Type", b"text/html")], b"<html>bad gateway</html>"),
        error_reply(503),
    ]

    async def answer(ep: Endpoint, n: int, body: bytes) -> Reply | None:
        if n == 2:  # this one was stored before the gateway failed
            await ep.forward(body)
        return script[n] if n < len(script) else await ep.forward(body)

    async with (
        endpoint(server.url, answer) as ep,
        open_client(ep.url, flush_interval=3600, **FAST_RETRIES) as client,
    ):
        for amount in ("0.1", "0.2", "0.3"):
            client.record(tenant, "sku1", "call", amount)
        assert await client.flush() == []
        stats = client.statistics()
    assert len(set(ep.bodies)) == 1  # the same ids every time
    assert ep.times[-1] - ep.times[0] < 2  # no Retry-After: backoff only
    assert (stats.requests, stats.accepted, stats.duplicates) == (5, 0, 3)
    assert await stored_async(server.url, tenant) == (Decimal("0.6"), 3)


async def test_an_http_date_retry_after_is_honoured(server: ServerProcess, tenant: str) -> None:
    async def answer(ep: Endpoint, n: int, body: bytes) -> Reply | None:
        if n == 0:
            when = email.utils.formatdate(time.time() + 2, usegmt=True).encode()
            return error_reply(503, ("Retry-After", when))
        return await ep.forward(body)

    async with (
        endpoint(server.url, answer) as ep,
        open_client(ep.url, flush_interval=3600, **FAST_RETRIES) as client,
    ):
        client.record(tenant, "sku1", "call", 7)
        assert await client.flush() == []
    assert len(ep.bodies) == 2
    assert ep.times[1] - ep.times[0] >= 1.0  # the date is whole seconds: 1 to 2 s away
    assert await stored_async(server.url, tenant) == (Decimal(7), 1)


async def test_a_mixed_batch_reports_each_failure_with_its_own_line(
    server: ServerProcess, tenant: str
) -> None:
    now = dt.datetime.now(dt.UTC)
    async with open_client(server.url, flush_interval=3600) as client:
        client.record(tenant, "sku1", "call", 1, id="dup", timestamp=now)
        assert await client.flush() == []
        ok_first = client.record(tenant, "sku1", "call", "0.25")
        late = client.record(tenant, "sku1", "call", 5, timestamp=now - dt.timedelta(days=40))
        client.record(tenant, "sku1", "call", 1, id="dup", timestamp=now)  # duplicate
        client.record(tenant, "sku1", "call", 2, id="dup", timestamp=now)  # conflict
        ahead = client.record(tenant, "sku1", "call", 7, timestamp=now + dt.timedelta(hours=1))
        client.record(tenant, "sku1", "call", Decimal("0.000000001"))
        failures = await client.flush()
        stats = client.statistics()
    assert ok_first not in [f.id for f in failures]
    assert [(f.status, f.id, f.pulse()["used_amount"]) for f in failures] == [
        ("rejected", late, "5"),
        ("conflict", "dup", "2"),
        ("rejected", ahead, "7"),
    ]
    assert all(f.http_status == 202 and f.reason for f in failures)
    assert (stats.accepted, stats.duplicates, stats.failed, stats.requests) == (3, 1, 3, 2)
    assert await stored_async(server.url, tenant) == (Decimal("1.250000001"), 3)


async def test_not_stored_pulses_are_retried_alone_and_failures_reported_once(
    server: ServerProcess, tenant: str
) -> None:
    """First answer: pulse 0 rejected by the real server, pulse 1 "not stored, retry"."""

    async def answer(ep: Endpoint, n: int, body: bytes) -> Reply | None:
        if n > 0:
            return await ep.forward(body)
        late, withheld, good = body.splitlines(keepends=True)
        status, headers, payload = await ep.forward(late + good)
        report = msgspec.json.decode(payload)
        items = [{**item, "index": 2 * item["index"]} for item in report["items"]]
        items.append(
            {
                "index": 1,
                "status": "rejected",
                "id": msgspec.json.decode(withheld)["id"],
                "error": "not stored, retry: the store is busy (scripted)",
            }
        )
        report.update(items=sorted(items, key=lambda item: item["index"]), rejected=2)
        return status, headers, msgspec.json.encode(report)

    now = dt.datetime.now(dt.UTC)
    async with (
        endpoint(server.url, answer) as ep,
        open_client(ep.url, flush_interval=3600, **FAST_RETRIES) as client,
    ):
        late = client.record(tenant, "sku1", "call", 5, timestamp=now - dt.timedelta(days=40))
        client.record(tenant, "sku1", "call", 2)
        client.record(tenant, "sku1", "call", 3)
        failures = await client.flush()
        assert await client.flush() == []
        stats = client.statistics()
    assert [(f.status, f.id) for f in failures] == [("rejected", late)]
    assert ep.bodies[1] == ep.bodies[0].splitlines(keepends=True)[1]
    assert (stats.accepted, stats.failed, stats.retries, stats.unsettled) == (2, 1, 1, 0)
    assert await stored_async(server.url, tenant) == (Decimal(5), 2)


async def test_pulses_recorded_while_a_flush_is_in_flight(
    server: ServerProcess, tenant: str
) -> None:
    arrived = trio.Event()
    release = trio.Event()

    async def answer(ep: Endpoint, n: int, body: bytes) -> Reply | None:
        if n == 0:
            arrived.set()
            await release.wait()
        return await ep.forward(body)

    flushed = trio.Event()
    async with endpoint(server.url, answer) as ep:
        async with open_client(ep.url, flush_interval=3600, concurrency=1) as client:

            async def flush_first() -> None:
                assert await client.flush() == []
                flushed.set()

            for _ in range(5):
                client.record(tenant, "sku1", "call", 1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flush_first)
                await arrived.wait()
                for _ in range(7):
                    client.record(tenant, "sku1", "call", 10)
                assert not flushed.is_set()
                release.set()
            assert await stored_async(server.url, tenant) == (Decimal(5), 5)
            assert await client.flush() == []
        assert await stored_async(server.url, tenant) == (Decimal(75), 12)
    assert [len(body.splitlines()) for body in ep.bodies] == [5, 7]


async def test_a_batch_over_the_servers_max_batch_is_split(
    server: ServerProcess, tenant: str
) -> None:
    async with open_client(server.url, max_batch_pulses=25_000, flush_interval=3600) as client:
        for _ in range(12_000):
            client.record(tenant, "sku1", "call", "0.001")
        assert await client.flush() == []
        stats = client.statistics()
    assert (stats.requests, stats.accepted, stats.failed) == (3, 12_000, 0)  # 413, 6000, 6000
    assert await stored_async(server.url, tenant) == (Decimal("12.000"), 12_000)


async def test_an_on_failure_that_raises_does_not_stop_the_client(
    server: ServerProcess, tenant: str
) -> None:
    calls: list[str | None] = []

    def on_failure(failure: Failure) -> None:
        calls.append(failure.id)
        raise RuntimeError("a broken callback")

    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
    async with open_client(server.url, on_failure=on_failure) as client:
        late = client.record(tenant, "sku1", "call", 1, timestamp=old)
        assert [f.id for f in await client.flush()] == [late]
        client.record(tenant, "sku1", "call", 2)
        assert await client.flush() == []
    assert calls == [late]
    assert await stored_async(server.url, tenant) == (Decimal(2), 1)


def test_close_while_threads_record_loses_and_doubles_nothing(
    server: ServerProcess, tenant: str
) -> None:
    client = Client(server.url, max_batch_pulses=100, flush_interval=0.005)
    returned: list[list[str]] = [[] for _ in range(4)]
    endings: list[str] = []
    enough = threading.Event()

    def work(n: int) -> None:
        while True:
            try:
                returned[n].append(client.record(tenant, "sku1", f"unit{n}", "0.5"))
            except ClientClosed:
                endings.append("closed")
                return
            if len(returned[n]) == 300:
                enough.set()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    assert enough.wait(timeout=10)
    assert client.close() == []
    for thread in threads:
        thread.join(timeout=10)
    every_id = [pulse_id for share in returned for pulse_id in share]
    assert endings == ["closed"] * 4
    assert len(set(every_id)) == len(every_id)
    assert stored(server.url, tenant) == (Decimal("0.5") * len(every_id), len(every_id))
    assert client.statistics().accepted == len(every_id)
