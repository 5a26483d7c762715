"""The http sink against a real local HTTP server."""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ingestor.errors import SinkRejected, SinkRetryable
from ingestor.sinks.http import HttpSink, sign


class Receiver:
    """A downstream that answers each request with the next programmed status."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
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
