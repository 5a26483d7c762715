"""The nats sink against the real NATS server (JetStream) on 127.0.0.1:4222.

Each test publishes on its own stream and subject prefix (a uuid) and deletes
its streams afterwards. The tests read the stream back with a connection of
their own, in asyncio in a worker thread. Without a server they are skipped
(run `bash .ci/services`), or fail when the CI variable is set.

A TCP forwarder in front of the server lets a test start the sink while NATS
is "down", and take the connection away under a sink that is connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import nats
import nats.js.errors
import pytest
import trio
from nats.aio.client import Client
from nats.js.api import RawStreamMsg, StreamInfo

from ingestor.errors import ConfigError, SinkRejected, SinkRetryable
from ingestor.sinks.nats import DUPLICATE_WINDOW, NatsSink, stream_subject, subject_matches

T = TypeVar("T")

HOST, PORT = "127.0.0.1", 4222
NATS_URL = f"nats://{HOST}:{PORT}"
DAY = "2026-11-28"


def _nats_is_up() -> bool:
    try:
        with socket.create_connection((HOST, PORT), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def nats_server() -> str:
    if not _nats_is_up():
        message = f"NATS is not running on {HOST}:{PORT}: run `bash .ci/services`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return NATS_URL


async def on_nats(operation: Callable[[Client], Awaitable[T]]) -> T:
    """Run `operation` on a connection of its own, in asyncio in a worker thread."""

    async def run() -> T:
        client = await nats.connect(NATS_URL, allow_reconnect=False, connect_timeout=2)
        try:
            return await operation(client)
        finally:
            await client.close()

    return await trio.to_thread.run_sync(asyncio.run, run())


@dataclass(frozen=True)
class Place:
    """A test's own stream, and its subject template under a prefix of its own."""

    stream: str
    prefix: str

    @property
    def template(self) -> str:
        return f"{self.prefix}.{{date}}"

    @property
    def other_stream(self) -> str:
        return f"{self.stream}_OTHER"

    async def info(self) -> StreamInfo:
        return await on_nats(lambda client: client.jsm().stream_info(self.stream))

    async def messages(self) -> list[RawStreamMsg]:
        async def read(client: Client) -> list[RawStreamMsg]:
            manager = client.jsm()
            state = (await manager.stream_info(self.stream)).state
            if not state.messages:
                return []
            return [
                await manager.get_msg(self.stream, seq=seq)
                for seq in range(state.first_seq, state.last_seq + 1)
            ]

        return await on_nats(read)

    async def create(self, name: str, **config: Any) -> None:
        await on_nats(lambda client: client.jsm().add_stream(name=name, **config))


@pytest.fixture
async def place(nats_server: str) -> AsyncIterator[Place]:
    tag = uuid.uuid4().hex[:12]
    place = Place(stream=f"TEST_NATS_SINK_{tag}", prefix=f"test.{tag}.batches")
    yield place

    async def delete(client: Client) -> None:
        for name in (place.stream, place.other_stream):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await client.jsm().delete_stream(name)

    await on_nats(delete)


@pytest.fixture
async def sink(place: Place) -> AsyncIterator[NatsSink]:
    sink = NatsSink(NATS_URL, stream=place.stream, subject=place.template, timeout=5)
    yield sink
    await sink.aclose()


def sink_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("nats-sink")]


# --- what lands on the stream ---------------------------------------------------------


async def test_delivers_batch_with_subject_body_and_msg_id(sink: NatsSink, place: Place) -> None:
    body = b'{"batch_id":"b-1","date":"2026-11-28","records":[]}'
    await sink.deliver("b-1", DAY, body)

    [message] = await place.messages()
    assert message.subject == f"{place.prefix}.{DAY}"
    assert message.data == body
    assert message.headers is not None
    assert message.headers["Nats-Msg-Id"] == "b-1"
    info = await place.info()
    assert info.config.subjects == [f"{place.prefix}.>"]
    assert info.config.duplicate_window == DUPLICATE_WINDOW


async def test_same_batch_twice_is_stored_once(sink: NatsSink, place: Place) -> None:
    await sink.deliver("b-1", DAY, b"one")
    await sink.deliver("b-1", DAY, b"one")
    # As after a restart: another sink, another connection, the same batch.
    again = NatsSink(NATS_URL, stream=place.stream, subject=place.template, timeout=5)
    try:
        await again.deliver("b-1", DAY, b"one")
    finally:
        await again.aclose()

    assert [m.headers and m.headers["Nats-Msg-Id"] for m in await place.messages()] == ["b-1"]


async def test_concurrent_deliveries_all_arrive(sink: NatsSink, place: Place) -> None:
    batches = {f"b-{i}": (f"2026-11-{10 + i % 5}", f"body {i}".encode()) for i in range(30)}
    async with trio.open_nursery() as nursery:
        for batch_id, (day, body) in batches.items():
            nursery.start_soon(sink.deliver, batch_id, day, body)

    found = {
        m.headers["Nats-Msg-Id"]: (m.subject, m.data)
        for m in await place.messages()
        if m.headers is not None
    }
    assert found == {
        batch_id: (f"{place.prefix}.{day}", body) for batch_id, (day, body) in batches.items()
    }


# --- the stream as the sink finds it --------------------------------------------------


async def test_existing_stream_is_used_as_it_is_but_for_a_short_duplicate_window(
    sink: NatsSink, place: Place
) -> None:
    await place.create(
        place.stream, subjects=[f"{place.prefix}.*"], duplicate_window=60, max_msgs=1000
    )

    await sink.deliver("b-1", DAY, b"one")

    info = await place.info()
    assert info.config.subjects == [f"{place.prefix}.*"]
    assert info.config.max_msgs == 1000
    # A batch re-sent after the deliverer's backoff must still be a duplicate.
    assert info.config.duplicate_window == DUPLICATE_WINDOW
    assert info.state.messages == 1


async def test_stream_that_does_not_capture_the_subject_rejects(
    sink: NatsSink, place: Place
) -> None:
    await place.create(place.stream, subjects=[f"{place.prefix}.elsewhere.>"])

    with pytest.raises(SinkRejected, match="does not capture subject"):
        await sink.deliver("b-1", DAY, b"one")


async def test_subjects_owned_by_another_stream_reject(sink: NatsSink, place: Place) -> None:
    await place.create(place.other_stream, subjects=[f"{place.prefix}.>"])

    with pytest.raises(SinkRejected, match="overlap"):
        await sink.deliver("b-1", DAY, b"one")


async def test_batch_over_the_stream_max_msg_size_rejects(sink: NatsSink, place: Place) -> None:
    await place.create(place.stream, subjects=[f"{place.prefix}.>"], max_msg_size=512)

    with pytest.raises(SinkRejected, match="max_msg_size"):
        await sink.deliver("b-1", DAY, b"x" * 1024)
    await sink.deliver("b-2", DAY, b"small")


async def test_batch_over_max_payload_rejects_and_the_sink_keeps_working(
    sink: NatsSink, place: Place
) -> None:
    # Sent, it would make the server close the connection; the sink refuses it first.
    max_payload = await on_nats(_max_payload)

    def fill(batch_id: str, extra: int = 0) -> bytes:
        headers = (
            f"NATS/1.0\r\nNats-Msg-Id: {batch_id}\r\nNats-Expected-Stream: {place.stream}\r\n\r\n"
        )
        return b"x" * (max_payload - len(headers) + extra)

    with pytest.raises(SinkRejected, match="max_payload"):
        await sink.deliver("b-big", DAY, fill("b-big", extra=1))
    await sink.deliver("b-fits", DAY, fill("b-fits"))
    await sink.deliver("b-1", DAY, b"small")

    assert [m.data for m in await place.messages()] == [fill("b-fits"), b"small"]


async def _max_payload(client: Client) -> int:
    return client.max_payload


async def test_stream_deleted_meanwhile_is_created_again(sink: NatsSink, place: Place) -> None:
    """The stream is read before each batch: one deleted since the last batch is
    made again before the next is published, which is not lost."""
    await sink.deliver("b-1", DAY, b"one")
    await on_nats(lambda client: client.jsm().delete_stream(place.stream))

    await sink.deliver("b-2", DAY, b"two")

    assert [m.data for m in await place.messages()] == [b"two"]


# --- an unreachable server, a server that comes and goes ------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


async def _pipe(
    source: trio.SocketStream, target: trio.SocketStream, done: trio.CancelScope
) -> None:
    try:
        async for chunk in source:
            await target.send_all(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    done.cancel()


async def _forward_to_nats(client: trio.SocketStream) -> None:
    async with (
        client,
        await trio.open_tcp_stream(HOST, PORT) as server,
        trio.open_nursery() as pipes,
    ):
        pipes.start_soon(_pipe, client, server, pipes.cancel_scope)
        pipes.start_soon(_pipe, server, client, pipes.cancel_scope)


@pytest.fixture
def proxy_port(nats_server: str) -> int:
    return free_port()


async def test_unreachable_server_is_retryable_within_the_timeout() -> None:
    sink = NatsSink("nats://127.0.0.1:1", stream="UNREACHABLE", subject="x.{date}", timeout=0.5)
    started = trio.current_time()
    with (
        trio.fail_after(5),
        pytest.raises(SinkRetryable, match=r"connecting to nats://127.0.0.1:1"),
    ):
        await sink.deliver("b-1", DAY, b"one")
    assert trio.current_time() - started < 2
    await sink.aclose()
    assert sink_threads() == []


async def test_cancelling_a_delivery_returns_at_once() -> None:
    sink = NatsSink("nats://127.0.0.1:1", stream="UNREACHABLE", subject="x.{date}", timeout=60)
    started = trio.current_time()
    with trio.move_on_after(0.2) as scope:
        await sink.deliver("b-1", DAY, b"one")
    assert scope.cancelled_caught
    assert trio.current_time() - started < 1
    with trio.fail_after(5):
        await sink.aclose()
    assert sink_threads() == []


async def test_server_down_at_start_delivers_once_it_is_up(place: Place, proxy_port: int) -> None:
    sink = NatsSink(
        f"nats://{HOST}:{proxy_port}", stream=place.stream, subject=place.template, timeout=1
    )
    try:
        with pytest.raises(SinkRetryable, match="Connect call failed"):
            await sink.deliver("b-1", DAY, b"one")

        async with trio.open_nursery() as proxy:
            await proxy.start(partial(trio.serve_tcp, _forward_to_nats, proxy_port, host=HOST))
            await sink.deliver("b-1", DAY, b"one")
            proxy.cancel_scope.cancel()
    finally:
        await sink.aclose()

    assert [m.data for m in await place.messages()] == [b"one"]


async def test_reconnects_after_losing_the_server(place: Place, proxy_port: int) -> None:
    sink = NatsSink(
        f"nats://{HOST}:{proxy_port}", stream=place.stream, subject=place.template, timeout=2
    )
    serve = partial(trio.serve_tcp, _forward_to_nats, proxy_port, host=HOST)
    try:
        async with trio.open_nursery() as proxy:
            await proxy.start(serve)
            await sink.deliver("b-1", DAY, b"one")
            proxy.cancel_scope.cancel()

        with pytest.raises(SinkRetryable, match="timed out"):
            await sink.deliver("b-2", DAY, b"two")

        async with trio.open_nursery() as proxy:
            await proxy.start(serve)
            # nats-py reconnects by itself; b-2, kept in its buffer, may land first.
            await sink.deliver("b-2", DAY, b"two")
            await sink.deliver("b-3", DAY, b"three")
            proxy.cancel_scope.cancel()
    finally:
        await sink.aclose()

    assert [m.data for m in await place.messages()] == [b"one", b"two", b"three"]


# --- closing --------------------------------------------------------------------------


async def test_aclose_stops_the_thread_and_refuses_later_deliveries(place: Place) -> None:
    sink = NatsSink(NATS_URL, stream=place.stream, subject=place.template, timeout=5)
    await sink.deliver("b-1", DAY, b"one")
    assert len(sink_threads()) == 1

    await sink.aclose()
    await sink.aclose()

    assert sink_threads() == []
    with pytest.raises(SinkRetryable, match="closed"):
        await sink.deliver("b-2", DAY, b"two")


async def test_aclose_of_an_unused_sink_starts_nothing() -> None:
    sink = NatsSink(NATS_URL, stream="UNUSED", subject="x.{date}", timeout=5)
    await sink.aclose()
    assert sink_threads() == []


# --- names ----------------------------------------------------------------------------


def test_stream_subject_puts_a_wildcard_where_the_date_goes() -> None:
    assert stream_subject("billing.batches.{date}") == "billing.batches.>"
    assert stream_subject("billing.{date}.batches") == "billing.*.batches"


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("billing.batches.>", "billing.batches.2026-11-28", True),
        ("billing.batches.*", "billing.batches.2026-11-28", True),
        ("billing.>", "billing.batches.2026-11-28", True),
        ("billing.batches.2026-11-28", "billing.batches.2026-11-28", True),
        ("billing.batches.>", "billing.batches", False),
        ("billing.*", "billing.batches.2026-11-28", False),
        ("other.batches.>", "billing.batches.2026-11-28", False),
    ],
)
def test_subject_matches(pattern: str, subject: str, expected: bool) -> None:
    assert subject_matches(pattern, subject) is expected


@pytest.mark.parametrize(
    ("stream", "subject"),
    [
        ("BILLING.BATCHES", "billing.{date}"),
        ("", "billing.{date}"),
        ("B", "billing..{date}"),
        ("B", "billing.*.{date}"),
        ("B", "billing batches.{date}"),
    ],
)
def test_bad_names_are_config_errors(stream: str, subject: str) -> None:
    with pytest.raises(ConfigError):
        NatsSink(NATS_URL, stream=stream, subject=subject, timeout=5)
