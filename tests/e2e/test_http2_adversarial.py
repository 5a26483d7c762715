"""HTTP/2 over cleartext: refused, and no client of it can stop the server.

hypercorn switched a connection to HTTP/2 for a client that opened with the
HTTP/2 preface ("prior knowledge": `httpx.AsyncClient(http1=False,
http2=True)`) or asked for `Upgrade: h2c`, and its HTTP/2 ended the whole
process on a DATA frame for a stream it had answered (hypercorn issue #329):
a client posting 100 KB without its key got its 401, sent the rest, and every
request of the server lost its answer. The service now speaks HTTP/1.1 only
(`service._http1_only`): each test here brought a server down before. And
whatever fails in hypercorn's handler of one connection ends that connection
only (`service._OneConnection`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import h2.config
import h2.connection
import httpx
import pytest
import trio

from tests.e2e.conftest import ABORTED_UPLOADS, QUIET_COMMITTER, StartServer
from tests.support.server import ServerProcess, exchange

pytestmark = [pytest.mark.e2e, *ABORTED_UPLOADS]

KEY = "h2-adversarial-ingest-key"
KEYS = (
    f'[[api_keys]]\nsha256 = "{hashlib.sha256(KEY.encode()).hexdigest()}"\n'
    'role = "ingest"\ntenants = ["*"]\n'
)
PULSE = {"tenant_id": "h2", "product_sku": "sku", "use_unit": "call", "used_amount": 1}


async def _still_serves(server: ServerProcess, **headers: str) -> None:
    """The process is alive and a plain HTTP/1.1 POST is stored."""
    assert server.running, server.output[-2000:]
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.post(f"{server.url}/pulses", json=PULSE, headers=headers)
    assert answer.status_code == 202, answer.text


async def _talk_h2(server: ServerProcess, body: bytes, headers: list[tuple[str, str]]) -> bytes:
    """Open with HTTP/2's preface, send one request and its body in 16 KiB DATA
    frames without waiting for an answer, and return all the server sent."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    connection.send_headers(1, headers)
    for start in range(0, len(body), 16384):
        connection.send_data(1, body[start : start + 16384], end_stream=False)
    connection.end_stream(1)
    received = b""
    stream = await trio.open_tcp_stream(server.host, server.port)
    async with stream:
        await stream.send_all(connection.data_to_send())
        with trio.move_on_after(3):
            while chunk := await stream.receive_some(65536):
                received += chunk
    return received


async def test_a_prior_knowledge_client_posting_without_its_key_cannot_stop_the_server(
    start_server: StartServer,
) -> None:
    server = await start_server(config=KEYS)
    # Under HTTP/2's first flow-control window (64 KiB), in 16 KiB DATA frames
    # that follow the headers at once: some arrive after any early answer.
    body = json.dumps([PULSE] * 700).encode()
    assert 32768 < len(body) < 65535
    authority = f"{server.host}:{server.port}"
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", authority),
        (":path", "/pulses"),
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
    ]
    for _ in range(3):
        received = await _talk_h2(server, body, headers)
        # No HTTP/2 SETTINGS frame (9-byte header, type 4) opens the answer:
        # the preface is read as a malformed HTTP/1.1 request.
        assert received[3:4] != b"\x04", received[:40]
        assert received.startswith(b"HTTP/1.1 4") or not received, received[:40]
    await _still_serves(server, authorization=f"Bearer {KEY}")


async def test_httpx_over_http2_only_fails_its_connection_not_the_server(
    start_server: StartServer,
) -> None:
    server = await start_server(config=KEYS, INGESTOR_MAX_IN_FLIGHT="3")
    async with httpx.AsyncClient(http1=False, http2=True, timeout=5) as http:

        async def post() -> None:
            with pytest.raises(httpx.HTTPError):
                await http.post(f"{server.url}/pulses", content=b"[" + b" " * 100_000 + b"]")

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(post)
    await _still_serves(server, authorization=f"Bearer {KEY}")


@pytest.mark.parametrize("settings", ["AAMAAABkAARAAAAAAAIAAAAA", "AAMAAAB"])
async def test_an_h2c_upgrade_is_answered_over_http1(
    start_server: StartServer, settings: str
) -> None:
    """`Upgrade: h2c` is ignored (RFC 9110 §7.8), with a valid or a malformed
    HTTP2-Settings: the malformed one raised in the connection's task and
    ended the process."""
    server = await start_server()
    request = (
        f"GET /aggregates HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
        f"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        f"HTTP2-Settings: {settings}\r\n\r\n"
    ).encode()
    status, _, body = await exchange(server, request)  # one HTTP/1.1 answer, no 101
    assert status == 200, body[:200]
    await _still_serves(server)


# A server whose handler of a connection raises on a request with
# X-Fail-Connection: a stand-in for any bug in hypercorn's protocol code.
_FAILING = """
import sys
import hypercorn.protocol.h11 as h11
create = h11.H11Protocol._create_stream
async def _create_stream(self, request):
    if any(name.lower() == b"x-fail-connection" for name, _ in request.headers):
        raise RuntimeError("a connection handler failed")
    return await create(self, request)
h11.H11Protocol._create_stream = _create_stream
from ingestor.__main__ import main
sys.exit(main())
"""


class _FailingConnections(ServerProcess):
    def command(self) -> list[str]:
        return [self._python, "-c", _FAILING, *super().command()[3:]]  # after "-m ingestor"


async def test_a_failing_connection_handler_ends_its_connection_not_the_server(
    tmp_path: Path,
) -> None:
    server = _FailingConnections(tmp_path / "data", env=dict(QUIET_COMMITTER))
    await server.start()
    try:
        request = (
            f"POST /pulses HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
            "X-Fail-Connection: 1\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        stream = await trio.open_tcp_stream(server.host, server.port)
        received = b""
        async with stream:
            await stream.send_all(request)
            with trio.fail_after(10), contextlib.suppress(trio.BrokenResourceError):
                received = await stream.receive_some(65536)
        assert received == b"", received[:200]  # closed without an answer
        await _still_serves(server)
        assert "a connection failed: it is closed, the server goes on" in server.output
    finally:
        await server.aclose()
