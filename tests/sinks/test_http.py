"""The http sink against a real local HTTP server."""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ingestor.errors import SinkRejected, SinkRetryable
from ingestor.sinks.http import HttpSink, retry_after, sign


class Receiver:
    """A downstream that answers each request with the next programmed status."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.retry_after: str | None = None  # the Retry-After of every answer
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.stall = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body))
                if receiver.stall.is_set():
                    receiver.stall.wait(0)
                    threading.Event().wait(2)  # longer than the sink's timeout
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                if receiver.retry_after is not None:
                    self.send_header("Retry-After", receiver.retry_after)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/batches"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.close()


async def test_posts_signed_body_with_idempotency_key(receiver: Receiver) -> None:
    sink = HttpSink(receiver.url, secret="s3cret", timeout=5)
    try:
        await sink.deliver("batch-1", "2026-11-28", b'{"records":[]}')
    finally:
        await sink.aclose()
    [(headers, body)] = receiver.requests
    assert body == b'{"records":[]}'
    assert headers["Idempotency-Key"] == "batch-1"
    assert headers["Content-Type"] == "application/json"
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert headers["X-Ingestor-Signature"] == f"sha256={expected}"
    assert sign("s3cret", body) == f"sha256={expected}"


@pytest.mark.parametrize("status", [200, 201, 202, 204, 409])
async def test_success_and_409_are_delivered(receiver: Receiver, status: int) -> None:
    receiver.statuses = [status]
    sink = HttpSink(receiver.url, secret="k", timeout=5)
    try:
        await sink.deliver("b", "2026-11-28", b"{}")
    finally:
        await sink.aclose()


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (500, SinkRetryable),
        (503, SinkRetryable),
        (429, SinkRetryable),
        (408, SinkRetryable),
        (400, SinkRejected),
        (401, SinkRejected),
        (404, SinkRejected),
        (422, SinkRejected),
    ],
)
async def test_failures_are_classified(
    receiver: Receiver, status: int, error: type[Exception]
) -> None:
    receiver.statuses = [status]
    sink = HttpSink(receiver.url, secret="k", timeout=5)
    try:
        with pytest.raises(error, match=str(status)):
            await sink.deliver("b", "2026-11-28", b"{}")
    finally:
        await sink.aclose()


async def test_timeout_is_retryable(receiver: Receiver) -> None:
    receiver.stall.set()
    sink = HttpSink(receiver.url, secret="k", timeout=0.2)
    try:
        with pytest.raises(SinkRetryable, match="timed out"):
            await sink.deliver("b", "2026-11-28", b"{}")
    finally:
        await sink.aclose()


async def test_refused_connection_is_retryable(receiver: Receiver) -> None:
    url = receiver.url
    receiver.close()
    sink = HttpSink(url, secret="k", timeout=2)
    try:
        with pytest.raises(SinkRetryable, match="request failed"):
            await sink.deliver("b", "2026-11-28", b"{}")
    finally:
        await sink.aclose()


@pytest.mark.parametrize(
    ("status", "header", "asked"),
    [
        (429, "30", 30.0),
        (503, "in 120 s", 120.0),  # an HTTP date, made in the test
        (500, None, None),
        (503, "soon", None),
        (429, "Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # past: no wait
    ],
)
async def test_a_retried_answer_says_how_long_the_receiver_asked_to_wait(
    receiver: Receiver, status: int, header: str | None, asked: float | None
) -> None:
    """Retry-After, in seconds or as an HTTP date, comes with the retried error
    (the deliverer waits at least that long) and is named in its text."""
    if header == "in 120 s":
        header = email.utils.formatdate(time.time() + 120, usegmt=True)
    receiver.statuses = [status]
    receiver.retry_after = header
    sink = HttpSink(receiver.url, secret="k", timeout=5)
    try:
        with pytest.raises(SinkRetryable, match=str(status)) as caught:
            await sink.deliver("b", "2026-11-28", b"{}")
    finally:
        await sink.aclose()
    if asked is None:
        assert caught.value.retry_after is None
        assert "Retry-After" not in str(caught.value)
    else:
        assert caught.value.retry_after == pytest.approx(asked, abs=2)
        assert f"(Retry-After: {caught.value.retry_after:g} s)" in str(caught.value)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("45", 45.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("-5", None),
        ("1.5", None),
        ("1e3", None),
        ("٣", None),  # a digit to str.isdigit, not to RFC 9110
        ("", None),
        ("99999999999999999999", 86_400.0),
        ("Thu, 01 Jan 1970 00:01:40 GMT", 60.0),
        ("Thu, 01 Jan 1970 00:00:10 GMT", 0.0),
    ],
)
def test_retry_after_reads_seconds_and_http_dates(value: str, seconds: float | None) -> None:
    assert retry_after(value, now=40.0) == seconds
