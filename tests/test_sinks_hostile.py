"""Hostile and broken billing receivers: what reaches them, and what the outbox says.

The billing system behind a sink is someone else's code; the money depends on
each batch reaching it exactly once and unchanged (DESIGN §3, guarantee 4),
on no batch being taken for delivered that the receiver did not confirm, on
the service staying responsive and bounded in memory whatever the receiver
does, and on an operator being able to see what happened.

The HTTP receivers are the programmable h11 downstream of
tests/test_delivery_adversarial.py, here answering with raw bytes where a
well-formed answer is not the point. The NATS tests use the server on
127.0.0.1:4222 and a stream of their own (tests/sinks/test_nats.py). What
tests/test_delivery_adversarial.py and tests/sinks/ already cover (status
classes, 3xx not followed, a trickling 2xx/5xx body, lost confirmations,
deleted streams, max_payload, a restarted server) is not repeated here.
"""

from __future__ import annotations

import dataclasses
import gc
import gzip
import logging
import re
import socket
import struct
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing
from nats.aio.client import Client

from ingestor.api import create_app
from ingestor.config import load_settings
from ingestor.errors import SinkError, SinkRejected, SinkRetryable
from ingestor.logs import TextFormatter
from ingestor.service import open_service
from ingestor.sinks.http import HttpSink
from ingestor.sinks.nats import NatsSink
from ingestor.store.sqlite import SQLiteStore
from tests.support.server import wait_until

from .conftest import FakeClock, pulse
from .sinks.test_nats import NATS_URL, Place, nats_server, on_nats, place
from .test_delivery_adversarial import (
    DAY,
    SECRET,
    Answer,
    Exchange,
    deliverer_of,
    downstream,
    http_sink,
    lazy_clock,
    make_batches,
    state,
    store,
    wall,
)

__all__ = ["lazy_clock", "nats_server", "place", "store", "wall"]  # fixtures taken from elsewhere


# trio warns (ResourceWarning) of an async generator left unexhausted when it is
# collected, and closes it then. httpx's body generators are left so whenever a
# timeout cancels a POST mid-body, and when the sink stops reading an error's
# body after the 200 bytes it keeps (each level of httpx's and httpcore's
# streams is a generator; closing the outer one leaves the inner ones). The
# connection itself is closed at once. Python ignores ResourceWarning unless
# asked; this suite makes warnings errors, so the tests that leave a body
# part-read carry this filter, and the collection after each test keeps such a
# warning in the test that caused it.
UNCLOSED = pytest.mark.filterwarnings("ignore:Async generator:ResourceWarning")


@pytest.fixture(autouse=True)
def collected() -> Iterator[None]:
    yield
    gc.collect()


# -- raw answers ----------------------------------------------------------------------------


def _reset(stream: trio.SocketStream) -> None:
    """Make closing `stream` send a TCP reset, not an orderly FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def raw(data: bytes, *, reset: bool = False) -> Answer:
    """An answer of exactly these bytes, then the connection closed (reset if asked)."""

    async def answer(exchange: Exchange) -> None:
        await exchange.stream.send_all(data)
        if reset:
            _reset(exchange.stream)
        await exchange.stream.aclose()

    return answer


def zeros_gzipped(size: int, layers: int) -> bytes:
    """`size` zero bytes, gzipped `layers` times (without holding `size` bytes at once)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    packed = b"".join(packer.compress(block) for _ in range(size // len(block)))
    packed += packer.flush()
    for _ in range(layers - 1):
        packed = gzip.compress(packed, 9)
    return packed


# -- HTTP: answers that are not what they seem -----------------------------------------------


@pytest.mark.parametrize(
    ("answer", "reset", "outcome"),
    [
        # A status line and then a reset: no complete answer, no confirmation.
        (b"HTTP/1.1 200 OK\r\n", True, "pending"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", True, "pending"),
        (b"HTTP/1.1 200 OK\r\n", False, "pending"),
        # Not HTTP at all, or not a status code.
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", False, "pending"),
        (b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n", False, "pending"),
        # Two lengths that disagree: the answer cannot be framed.
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nContent-Length: 7\r\n\r\n", False, "pending"),
        # HTTP/1.0, no length, closed after a body: a complete 2xx.
        (b"HTTP/1.0 200 OK\r\n\r\nstored", False, "delivered"),
        # A 2xx whose head is complete and whose body is cut short: decided by the status.
        (b"HTTP/1.1 201 Created\r\nContent-Length: 100\r\n\r\nsho", False, "delivered"),
    ],
)
async def test_a_torn_or_malformed_answer_is_never_taken_for_a_confirmation(
    store: SQLiteStore, wall: FakeClock, answer: bytes, reset: bool, outcome: str
) -> None:
    """Tries to get a batch marked delivered by an answer that is not a whole,
    well-formed 2xx (a status line and a reset, a header cut in half, another
    protocol, a five-digit status, conflicting lengths), and checks the two
    well-formed 2xx among them are taken, so the test can tell the difference.
    A batch left pending is sent again byte for byte and then confirmed."""
    [batch_id] = make_batches(store, 1)
    answers = [raw(answer, reset=reset)]

    async def respond(exchange: Exchange) -> None:
        if answers:
            await answers.pop(0)(exchange)
        else:
            await exchange.respond(200)

    async with downstream(respond) as server, http_sink(server.url) as sink:
        deliverer = deliverer_of(store, sink, wall)
        await deliverer.deliver_due()
        got, attempts, error = state(store, batch_id)
        assert (got, attempts) == (outcome, 1), error
        wall.advance(120)
        await deliverer.deliver_due()
    assert state(store, batch_id)[0] == "delivered"
    sent = server.of(batch_id)
    assert len(sent) == (2 if outcome == "pending" else 1)
    assert {e.body for e in sent} == {sent[0].body}
    assert all(e.signature_ok for e in sent)


async def test_an_extra_answer_on_a_kept_alive_connection_does_not_confirm_the_next_batch(
    store: SQLiteStore, wall: FakeClock
) -> None:
    """Tries HTTP response desync: the receiver (or a proxy before it) answers
    the first batch 500 and then, on the same kept-alive connection, a second,
    unasked-for `200 OK`. The next batch is sent on that connection and the
    receiver answers it 503 (not stored). Taking the stale 200 queued on the
    connection for the next batch's answer marks a batch delivered that the
    receiver refused: billed nowhere, and the outbox says it was."""
    first, second = make_batches(store, 2)
    stray = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

    async def answer(exchange: Exchange) -> None:
        if exchange.batch_id == first:
            response = h11.Response(status_code=500, headers=[("Content-Length", "4")])
            await exchange.stream.send_all(
                exchange.connection.send(response)
                + exchange.connection.send(h11.Data(data=b"oops"))
                + exchange.connection.send(h11.EndOfMessage())
                + stray
            )
            exchange.status = 500
        else:
            await exchange.respond(503, b"overloaded, not stored")

    async with downstream(answer) as server, http_sink(server.url) as sink:
        with pytest.raises(SinkRetryable, match="HTTP 500"):
            await sink.deliver(first, DAY, b'{"batch": 1}')
        with pytest.raises(SinkRetryable, match="HTTP 503"):
            await sink.deliver(second, DAY, b'{"batch": 2}')
    assert [e.status for e in server.received] == [500, 503]


@pytest.mark.parametrize(("status", "outcome"), [(422, "failed"), (500, "pending")])
async def test_an_error_answer_whose_body_trickles_keeps_its_status(
    store: SQLiteStore,
    wall: FakeClock,
    lazy_clock: trio.testing.MockClock,
    status: int,
    outcome: str,
) -> None:
    """Tries a receiver that answers an error at once and then sends its body a
    byte a second, for ever. The status line is the answer: a 422 is a refusal
    for good (README: "other 4xx mark the batch failed"), a 500 a retry, and
    the batch's last error names the status the receiver gave. Reading the
    body for the error's detail must not turn either into "no answer"."""
    [batch_id] = make_batches(store, 1)

    async def answer(exchange: Exchange) -> None:
        await exchange.drip(status, every=1.0)

    async with downstream(answer) as server, http_sink(server.url, seconds=5) as sink:
        deliverer = deliverer_of(store, sink, wall)
        with trio.fail_after(30):
            await deliverer.deliver_due()
    assert [e.status for e in server.received] == [status]
    got, attempts, error = state(store, batch_id)
    assert (got, attempts) == (outcome, 1), error
    assert error is not None
    assert f"HTTP {status}" in error, error


@UNCLOSED
@pytest.mark.parametrize(
    ("encoding", "size"), [("gzip", 64 << 20), ("gzip, gzip", 256 << 20)], ids=["gzip", "gzip2"]
)
async def test_a_compressed_error_body_does_not_blow_up_memory(encoding: str, size: int) -> None:
    """Tries a decompression bomb in an error answer: a 503 whose body is
    `Content-Encoding: gzip` zeros (64 KiB on the wire, 64 MiB unpacked), or
    gzipped twice (about 1 KiB on the wire, 256 MiB unpacked; each further
    layer multiplies it again). The sink keeps 200 bytes of an error's body for
    the batch's last error; it must not unpack megabytes for them, nor
    gigabytes for a receiver that nests its encodings."""
    bomb = zeros_gzipped(size, layers=encoding.count("gzip"))

    async def answer(exchange: Exchange) -> None:
        await exchange.respond(
            503, bomb, (("Content-Encoding", encoding), ("Content-Type", "text/plain"))
        )

    async with downstream(answer) as server, http_sink(server.url) as sink:
        tracemalloc.start()
        try:
            with pytest.raises(SinkRetryable, match="HTTP 503"):
                await sink.deliver("b-bomb", DAY, b'{"batch": "bomb"}')
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert [e.status for e in server.received] == [503]
    assert peak < 16 << 20, f"{peak >> 20} MiB allocated for a {len(bomb)}-byte error body"


@pytest.mark.parametrize(
    ("informational", "final", "outcome"),
    [
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n", 200, None),
        (b"HTTP/1.1 102 Processing\r\n\r\n", 503, SinkRetryable),
        (b"HTTP/1.1 100 Continue\r\n\r\n", 422, SinkRejected),
    ],
)
async def test_informational_answers_are_not_the_answer(
    informational: bytes, final: int, outcome: type[SinkError] | None
) -> None:
    """Tries 1xx answers before the final one: a 100 or 102 must not be taken for
    a confirmation, nor hide the final status that follows it."""
    sent: list[bytes] = []

    async def answer(exchange: Exchange) -> None:
        sent.append(exchange.body)
        await exchange.stream.send_all(informational)
        await exchange.respond(final, b"final")

    async with downstream(answer) as server, http_sink(server.url) as sink:
        if outcome is None:
            await sink.deliver("b-1", DAY, b'{"batch": 1}')
        else:
            with pytest.raises(outcome, match=f"HTTP {final}"):
                await sink.deliver("b-1", DAY, b'{"batch": 1}')
    assert sent == [b'{"batch": 1}']
    assert len(server.received) == 1


async def test_endless_informational_answers_are_bounded_by_the_sink_timeout(
    lazy_clock: trio.testing.MockClock,
) -> None:
    """Tries a receiver that answers `102 Processing` every second and never
    anything else: each 1xx resets httpx's read timeout, so only the sink's
    own bound ends the attempt, which is then no confirmation."""

    async def answer(exchange: Exchange) -> None:
        while True:
            await exchange.stream.send_all(b"HTTP/1.1 102 Processing\r\n\r\n")
            await trio.sleep(1)

    async with downstream(answer) as server, http_sink(server.url, seconds=5) as sink:
        started = trio.current_time()
        with pytest.raises(SinkRetryable, match="timed out"):
            await sink.deliver("b-1", DAY, b"{}")
        assert trio.current_time() - started <= 5.5
    assert len(server.received) == 1


@pytest.mark.parametrize(
    ("head", "outcome"),
    [
        # A head that never ends: no answer at all.
        (b"HTTP/1.1 200 OK\r\n", SinkRetryable),
        # A 2xx whose chunked body never ends, at full speed: the status is the answer.
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", None),
    ],
    ids=["head", "body"],
)
async def test_an_endless_answer_at_full_speed_grows_no_memory(
    head: bytes, outcome: type[SinkError] | None
) -> None:
    """Tries a receiver that sends a 200 status line and then header lines, or a
    body, at full speed, for ever: memory stays flat, the attempt ends well
    within the sink timeout, and only a whole head counts as an answer."""
    filler = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    if outcome is None:
        filler = b"%x\r\n%s\r\n" % (len(filler), filler)

    async def answer(exchange: Exchange) -> None:
        await exchange.stream.send_all(head)
        while True:
            await exchange.stream.send_all(filler * 64)

    async with downstream(answer) as server, http_sink(server.url, seconds=10) as sink:
        tracemalloc.start()
        try:
            started = trio.current_time()
            if outcome is None:
                await sink.deliver("b-1", DAY, b"{}")
            else:
                with pytest.raises(outcome):
                    await sink.deliver("b-1", DAY, b"{}")
            elapsed = trio.current_time() - started
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert len(server.received) == 1
    assert elapsed < 5, f"{elapsed:.1f} s on an answer that never ends"
    assert peak < 16 << 20, f"{peak >> 20} MiB for an answer that never ends"


@UNCLOSED
async def test_a_receiver_that_never_reads_a_large_batch_is_bounded_by_the_sink_timeout(
    lazy_clock: trio.testing.MockClock,
) -> None:
    """Tries a receiver that accepts the connection and never reads: a batch
    larger than the socket buffers blocks the sender mid-body. The attempt
    still ends within the sink timeout, as a retry, not a confirmation."""
    accepted: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, hold, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        async with http_sink(f"http://127.0.0.1:{port}/billing", seconds=5) as sink:
            started = trio.current_time()
            with pytest.raises(SinkRetryable, match="timed out"):
                await sink.deliver("b-big", DAY, b"x" * (32 << 20))
            assert trio.current_time() - started <= 5.5
        nursery.cancel_scope.cancel()
    assert len(accepted) == 1


@pytest.mark.parametrize(
    "retry_after", ["31536000", "-5", "soon", "Fri, 31 Dec 9999 23:59:59 GMT", "1e309"]
)
async def test_a_receivers_retry_after_never_parks_a_batch_past_retry_max(
    store: SQLiteStore, wall: FakeClock, retry_after: str
) -> None:
    """Tries 429 and 503 answers with a Retry-After of a year, negative, garbage,
    the year 9999 or an overflowing float: none of them may park a batch
    beyond `retry_max`, make it due at once (a busy loop), or break the
    attempt's record."""
    ids = make_batches(store, 2)
    statuses = dict(zip(ids, (429, 503), strict=True))

    async def answer(exchange: Exchange) -> None:
        await exchange.respond(
            statuses[exchange.batch_id], b"later", (("Retry-After", retry_after),)
        )

    async with downstream(answer) as server, http_sink(server.url) as sink:
        deliverer = deliverer_of(store, sink, wall, retry_initial=1.0, retry_max=60.0)
        assert await deliverer.deliver_due() == 2
        assert await deliverer.deliver_due() == 0, "due again at once"
    assert len(server.received) == 2
    for batch_id in ids:
        view = store.batch(batch_id)
        assert view is not None
        assert (view.status, view.attempts) == ("pending", 1)
        assert view.next_attempt_at is not None
        assert 0 < (view.next_attempt_at - wall.now).total_seconds() <= 60


# -- the service: what an operator sees of a hostile receiver -------------------------------


@UNCLOSED
async def test_an_operator_sees_a_refusal_in_one_line_in_batches_metrics_and_log(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Tries to hide a refusal from the operator, or flood the log with it: the
    receiver refuses with 400 and a 1 MiB HTML page of many lines, with a
    forged log line and terminal escapes in it. The service keeps taking
    pulses and answering /readyz; GET /batches shows the batch failed with a
    short last error; /metrics counts it; the log has one line for it, no
    traceback, and nothing of the page that starts a line of its own."""
    page = b"<html>\n" + b"\x1b[2J2026-11-28T12:00:00Z INFO delivered batch_id=x\n" * 20_000
    page += b"</html>\n"

    async def answer(exchange: Exchange) -> None:
        await exchange.respond(400, page, (("Content-Type", "text/html"),))

    settings = load_settings(
        environ={},
        data_dir=str(tmp_path / "data"),
        partitions=4,
        commit_interval=3600,
        durability="os",
        sink_timeout=5,
    )
    caplog.set_level(logging.INFO)
    async with downstream(answer) as server:
        sink = HttpSink(server.url, secret=SECRET, timeout=5)
        async with open_service(settings, sink=sink, clock=clock) as runtime:
            client = create_app(runtime).test_client()
            assert (await client.post("/pulses", json=pulse())).status_code == 202
            made = await (await client.post("/aggregates/commit", json={"date": DAY})).get_json()
            [batch_id] = [b["batch_id"] for b in made["batches"]]

            async def failed() -> dict[str, Any]:
                view: dict[str, Any] = await (await client.get(f"/batches/{batch_id}")).get_json()
                return view if view["status"] == "failed" else {}

            view = await wait_until(failed, what="the refused batch failed", within=10)
            assert (await client.get("/readyz")).status_code == 200
            assert (await client.post("/pulses", json=pulse(id="later"))).status_code == 202
            listed = await (await client.get("/batches?status=failed")).get_json()
            metrics = await (await client.get("/metrics")).get_data(as_text=True)
    assert len(server.received) == 1
    assert view["attempts"] == 1
    assert view["last_error"].startswith("HTTP 400")
    assert len(view["last_error"]) <= 400
    assert [b["batch_id"] for b in listed["batches"]] == [batch_id]
    assert re.search(r'ingestor_outbox_batches\{[^}]*status="failed"[^}]*\} 1(\.0)?\b', metrics)
    assert re.search(r'ingestor_deliveries_total\{[^}]*outcome="failed"[^}]*\} 1(\.0)?\b', metrics)
    about = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and batch_id in TextFormatter().format(r)
    ]
    assert len(about) == 1, [r.getMessage() for r in about]
    [record] = about
    assert record.levelno == logging.ERROR
    assert record.exc_info is None
    line = TextFormatter().format(record)
    assert "\n" not in line
    assert "\x1b" not in line


# -- NATS: streams that cannot keep the promise ---------------------------------------------


async def _update(place: Place, **changes: Any) -> None:
    async def update(client: Client) -> None:
        manager = client.jsm()
        info = await manager.stream_info(place.stream)
        await manager.update_stream(dataclasses.replace(info.config, **changes))

    await on_nats(update)


def _ids(messages: list[Any]) -> list[str]:
    return [(m.headers or {}).get("Nats-Msg-Id", "") for m in messages]


@pytest.fixture
async def nats_sink(place: Place) -> AsyncIterator[NatsSink]:
    sink = NatsSink(NATS_URL, stream=place.stream, subject=place.template, timeout=2)
    yield sink
    await sink.aclose()


async def test_a_stream_whose_duplicate_window_cannot_be_raised_never_stores_a_batch_twice(
    nats_sink: NatsSink, place: Place
) -> None:
    """Tries a stream the sink cannot fix: its duplicate window is 1 s and its
    max_age 60 s, and JetStream refuses a window longer than max_age, so the
    sink's raise to a day fails. A batch whose ack was lost is published
    again after the deliverer's backoff (here 1.6 s): it must not be stored
    twice on the stream the billing side reads, whether the sink refuses such
    a stream or keeps a window it can have."""
    await place.create(place.stream, subjects=[f"{place.prefix}.>"], duplicate_window=1, max_age=60)
    try:
        await nats_sink.deliver("b-1", DAY, b"one")
        await trio.sleep(1.6)  # a resend after a lost ack and a backoff
        await nats_sink.deliver("b-1", DAY, b"one")
    except SinkRejected:
        refused = True  # the sink refuses a stream whose window it cannot make a day
    else:
        refused = False
    found = _ids(await place.messages())
    assert found.count("b-1") <= 1, f"b-1 is {found.count('b-1')} times on the stream"
    assert refused or found == ["b-1"]


async def test_a_stream_replaced_under_the_sink_still_deduplicates_a_resend(
    nats_sink: NatsSink, place: Place
) -> None:
    """Tries an operator replacing the stream while the sink runs: deleted and
    made again with the same subjects and a 1 s duplicate window (NATS's
    default is 2 minutes). The sink checked (and raised) the window of the
    stream it first met; a batch whose ack is lost on the new stream and is
    sent again after a backoff must still be stored once."""
    await nats_sink.deliver("b-1", DAY, b"one")

    async def replace(client: Client) -> None:
        manager = client.jsm()
        await manager.delete_stream(place.stream)
        await manager.add_stream(
            name=place.stream, subjects=[f"{place.prefix}.>"], duplicate_window=1
        )

    await on_nats(replace)
    await nats_sink.deliver("b-2", DAY, b"two")
    await trio.sleep(1.6)  # a resend after a lost ack and a backoff
    await nats_sink.deliver("b-2", DAY, b"two")
    assert _ids(await place.messages()) == ["b-2"]


async def test_a_sealed_stream_confirms_nothing_and_says_so(
    nats_sink: NatsSink, place: Place
) -> None:
    """Tries a stream sealed (made read-only) between two deliveries: the
    second batch is not taken for delivered, the error says why, and the
    first is still on the stream once."""
    await nats_sink.deliver("b-1", DAY, b"one")
    await _update(place, sealed=True)
    with pytest.raises(SinkError, match=r"(?i)seal"):
        await nats_sink.deliver("b-2", DAY, b"two")
    assert _ids(await place.messages()) == ["b-1"]


async def test_a_stream_that_never_acknowledges_is_refused_not_retried_as_timeouts(
    nats_sink: NatsSink, place: Place
) -> None:
    """Tries a stream created with `no_ack`: it stores each publish and never
    answers, so no batch can ever be confirmed. The sink reads the stream's
    config before it publishes; waiting the full timeout on every attempt and
    reporting "timed out" (a slow server, for the operator) hides a batch
    that is on the stream behind a retry that can never succeed."""
    await place.create(place.stream, subjects=[f"{place.prefix}.>"], no_ack=True)
    with pytest.raises(SinkRejected, match=r"(?i)ack"):
        await nats_sink.deliver("b-1", DAY, b"one")


async def test_a_stream_that_keeps_few_messages_a_subject_is_refused(
    nats_sink: NatsSink, place: Place
) -> None:
    """Tries a stream with `max_msgs_per_subject = 1`: a day's batches share one
    subject (`<prefix>.<date>`), so each batch of a day would push the one
    before it off the stream, acknowledged and recorded delivered, before the
    billing system reads it. The sink must refuse such a stream, saying why,
    not confirm batches the stream throws away."""
    await place.create(place.stream, subjects=[f"{place.prefix}.>"], max_msgs_per_subject=1)
    with pytest.raises(SinkRejected, match="max_msgs_per_subject"):
        await nats_sink.deliver("b-1", DAY, b"one")
    assert _ids(await place.messages()) == []


def _deletion_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        getattr(r, "fields", {}).get("why", "")
        for r in caplog.records
        if r.levelno == logging.WARNING and "may delete batches" in r.getMessage()
    ]


async def test_a_stream_that_drops_its_oldest_batches_past_a_limit_is_said_once(
    nats_sink: NatsSink, place: Place, caplog: pytest.LogCaptureFixture
) -> None:
    """Tries a stream with `max_msgs = 2` and NATS's default discard policy
    (old): the third batch pushes the first off the stream, acknowledged and
    recorded delivered, whether or not the billing system has read it. The
    sink cannot know whether it has, so it uses the stream, but the operator
    must be told, once, which setting does it and what to set instead."""
    caplog.set_level(logging.WARNING, logger="ingestor.sinks.nats")
    await place.create(place.stream, subjects=[f"{place.prefix}.>"], max_msgs=2)
    for n in (1, 2, 3):
        await nats_sink.deliver(f"b-{n}", DAY, b"batch")
    assert _ids(await place.messages()) == ["b-2", "b-3"]  # b-1 is gone: what is warned of
    [why] = _deletion_warnings(caplog)
    assert "max_msgs 2" in why
    assert "discard old" in why
    assert "discard new" in why  # what to set instead


async def test_a_full_stream_that_discards_new_keeps_the_batch_for_a_retry(
    nats_sink: NatsSink, place: Place, caplog: pytest.LogCaptureFixture
) -> None:
    """Tries the setting the warning above advises: `max_msgs = 2` with discard
    new. The third batch is refused by the stream; it must not be taken for
    delivered but retried (room may come), the two stored stay, and nothing
    is warned of."""
    caplog.set_level(logging.WARNING, logger="ingestor.sinks.nats")
    await place.create(place.stream, subjects=[f"{place.prefix}.>"], max_msgs=2, discard="new")
    await nats_sink.deliver("b-1", DAY, b"batch")
    await nats_sink.deliver("b-2", DAY, b"batch")
    with pytest.raises(SinkRetryable, match=r"(?i)maximum messages"):
        await nats_sink.deliver("b-3", DAY, b"batch")
    assert _ids(await place.messages()) == ["b-1", "b-2"]
    assert _deletion_warnings(caplog) == []


async def test_a_stream_of_interest_without_a_consumer_is_said_to_delete_every_batch(
    nats_sink: NatsSink, place: Place, caplog: pytest.LogCaptureFixture
) -> None:
    """Tries a stream with interest retention and no consumer yet (the billing
    system's is made later, or was deleted): JetStream acknowledges each
    batch and deletes it at once. Said once, for the two batches sent."""
    caplog.set_level(logging.WARNING, logger="ingestor.sinks.nats")
    await place.create(place.stream, subjects=[f"{place.prefix}.>"], retention="interest")
    await nats_sink.deliver("b-1", DAY, b"batch")
    await nats_sink.deliver("b-2", DAY, b"batch")
    assert _ids(await place.messages()) == []
    [why] = _deletion_warnings(caplog)
    assert "interest" in why
    assert "no consumer" in why


async def test_a_delivery_behind_another_deliverys_stream_check_says_what_it_waited_for(
    nats_sink: NatsSink, place: Place
) -> None:
    """One delivery stuck checking the stream (a NATS server whose disk filled
    hangs there), the others wait for it: their timeout must say so, not
    blame the connection ("connecting to ...: timed out"), which is up."""
    await nats_sink.deliver("b-1", DAY, b"one")
    loop, publisher = nats_sink._loop, nats_sink._publisher
    assert loop is not None
    await trio.to_thread.run_sync(lambda: loop.submit(publisher._lock.acquire()).result(5))
    try:
        with pytest.raises(SinkRetryable) as waited:
            await nats_sink.deliver("b-2", DAY, b"two")
    finally:
        loop.submit(_release(publisher._lock)).result(5)
    assert str(waited.value).startswith("waiting for another delivery"), waited.value
    await nats_sink.deliver("b-2", DAY, b"two")
    assert _ids(await place.messages()) == ["b-1", "b-2"]


async def _release(lock: Any) -> None:
    lock.release()
