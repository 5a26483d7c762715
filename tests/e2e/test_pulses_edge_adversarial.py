"""POST /pulses at the HTTP edge, against a real server: odd bodies, odd headers,
odd connections.

Each test starts `python -m ingestor serve` (tests/support/server.py) and speaks
to it with httpx, or over a raw socket where the point is what happens on the
wire: pipelining, HTTP/1.0, a body shorter than its Content-Length, a client
that leaves before its answer, whether a connection announced closed is closed.

DESIGN.md §3 and §4: every pulse of a request gets a status (at the index the
client gave it), bad input gets a clear error and changes nothing, overload is
a 503 with Retry-After, a 2xx means stored.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import pytest
import trio

from tests.e2e.conftest import ABORTED_UPLOADS, StartServer
from tests.e2e.test_end_to_end import Chunks
from tests.support.server import ServerProcess, wait_until

pytestmark = [pytest.mark.e2e, *ABORTED_UPLOADS]

JSON = "application/json"
NDJSON = "application/x-ndjson"
ADMIN = "edge-adversarial-admin-key"
READER = "edge-adversarial-read-key"
KEYS = "".join(
    f'[[api_keys]]\nsha256 = "{hashlib.sha256(key.encode()).hexdigest()}"\n'
    f'role = "{role}"\ntenants = ["*"]\n'
    for key, role in ((ADMIN, "admin"), (READER, "read"))
)


def pulse(tenant: str, amount: object = 1, **fields: Any) -> dict[str, Any]:
    return {
        "tenant_id": tenant,
        "product_sku": "sku",
        "use_unit": "call",
        "used_amount": amount,
        **fields,
    }


def line(tenant: str, amount: object = 1, **fields: Any) -> bytes:
    return json.dumps(pulse(tenant, amount, **fields), ensure_ascii=False).encode()


async def stored(
    client: httpx.AsyncClient, server: ServerProcess, **params: str
) -> list[tuple[str, str, str, Decimal, int]]:
    """(tenant, sku, unit, amount, count) of every bucket the server holds."""
    response = await client.get(
        f"{server.url}/aggregates",
        params={**params, "limit": "1000"},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert response.status_code == 200, response.text
    return [
        (
            row["tenant_id"],
            row["product_sku"],
            row["use_unit"],
            Decimal(row["used_amount"]),
            row["pulse_count"],
        )
        for row in response.json()["aggregates"]
    ]


async def in_flight(client: httpx.AsyncClient, server: ServerProcess) -> float:
    text = (await client.get(f"{server.url}/metrics")).text
    found = re.search(r"^ingestor_http_requests_in_flight (\S+)$", text, re.MULTILINE)
    assert found, "no ingestor_http_requests_in_flight in /metrics"
    return float(found.group(1))


def assert_error(response: httpx.Response | RawResponse, status: int, code: str) -> None:
    body = response.json()
    assert (response.status_code, set(body), body["error"]["code"]) == (status, {"error"}, code), (
        response.status_code,
        body,
    )
    assert body["error"]["message"]


# -- a raw HTTP/1.1 connection -------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def status_code(self) -> int:
        return self.status

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name.lower()]
        return values[-1] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class RawConnection:
    """Bytes out as given; responses in, parsed by Content-Length."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    @classmethod
    async def open(cls, server: ServerProcess) -> RawConnection:
        return cls(await trio.open_tcp_stream(server.host, server.port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.buffer += data
        return bool(data)

    async def response(self, within: float = 10.0) -> RawResponse:
        """The next final (non-1xx) response."""
        with trio.fail_after(within):
            while True:
                while b"\r\n\r\n" not in self.buffer:
                    assert await self._fill(), f"closed before a response: {bytes(self.buffer)!r}"
                head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
                status_line, *lines = head.decode("latin-1").split("\r\n")
                status = int(status_line.split(" ")[1])
                headers = []
                for text in lines:
                    name, _, value = text.partition(":")
                    headers.append((name.strip().lower(), value.strip()))
                self.buffer[:] = rest
                if status >= 200:
                    break
            length = int(dict(headers).get("content-length", "0"))
            while len(self.buffer) < length:
                assert await self._fill(), "closed in the middle of a response body"
            body, self.buffer[:] = bytes(self.buffer[:length]), self.buffer[length:]
            return RawResponse(status, headers, body)

    async def closed_by_server(self, within: float) -> bool:
        """Whether the server closes the connection (EOF or reset) within `within` s."""
        with trio.move_on_after(within):
            try:
                while await self._fill():
                    pass
            except trio.BrokenResourceError:
                pass
            return True
        return False

    async def aclose(self) -> None:
        await self.stream.aclose()


def request(
    body: bytes,
    *,
    method: str = "POST",
    path: str = "/pulses",
    version: str = "1.1",
    content_type: str | None = JSON,
    length: int | None = None,
    extra: str = "",
) -> bytes:
    head = f"{method} {path} HTTP/{version}\r\nHost: 127.0.0.1\r\n"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    head += f"Content-Length: {len(body) if length is None else length}\r\n{extra}\r\n"
    return head.encode("latin-1") + body


# -- NDJSON ------------------------------------------------------------------------


async def test_ndjson_crlf_whitespace_lines_and_last_line_without_newline(
    start_server: StartServer, client: httpx.AsyncClient
) -> None:
    """CRLF endings, lines of only spaces/tabs/CR, and a last line with no newline:
    three pulses, three stored, no report. U+2028/U+2029/U+0085 are not line
    breaks in a byte body: a name holding U+2028 is one pulse, stored as sent."""
    server = await start_server()
    body = (
        line("crlf", 1, id="a")
        + b"\r\n \t \r\n\r\n\t\n"
        + line("crlf", 2, id="b")
        + b"\r\n\r\n   \r\n"
        + line("crlf", 3, id="c")
    )
    response = await client.post(
        f"{server.url}/pulses", content=body, headers={"Content-Type": NDJSON}
    )
    assert (response.status_code, response.json()) == (
        202,
        {"accepted": 3, "duplicates": 0, "rejected": 0, "conflicts": 0, "items": []},
    )
    assert await stored(client, server, tenant_id="crlf") == [
        ("crlf", "sku", "call", Decimal(6), 3)
    ]

    odd = "a\u2028b\u2029c"
    body = line("ls", 1, product_sku=odd) + b"\n" + line("ls", 2, use_unit="x\u2028y")
    response = await client.post(
        f"{server.url}/pulses", content=body, headers={"Content-Type": NDJSON}
    )
    assert (response.status_code, response.json()["accepted"]) == (202, 2), response.text
    assert sorted(await stored(client, server, tenant_id="ls")) == [
        ("ls", odd, "call", Decimal(1), 1),
        ("ls", "sku", "x\u2028y", Decimal(2), 1),
    ]


async def test_ndjson_lines_that_are_arrays_or_scalars_are_rejected_one_by_one(
    start_server: StartServer, client: httpx.AsyncClient
) -> None:
    """A line that is an array (even of valid pulses), a scalar, null or {} is one
    rejected pulse at its own index; the lines around it are stored."""
    server = await start_server()
    lines = [
        line("shape", 1, id="first"),
        b"[" + line("shape", 100) + b"," + line("shape", 100) + b"]",
        b"42",
        b'"a string"',
        b"null",
        b"{}",
        line("shape", 2, id="last"),
    ]
    response = await client.post(
        f"{server.url}/pulses", content=b"\n".join(lines), headers={"Content-Type": NDJSON}
    )
    assert response.status_code == 202, response.text
    report = response.json()
    assert (report["accepted"], report["rejected"]) == (2, 5)
    assert [(i["index"], i["status"]) for i in report["items"]] == [
        (n, "rejected") for n in range(1, 6)
    ]
    assert await stored(client, server, tenant_id="shape") == [
        ("shape", "sku", "call", Decimal(3), 2)
    ]


async def test_ndjson_line_with_a_carriage_return_inside_is_one_pulse(
    start_server: StartServer, client: httpx.AsyncClient
) -> None:
    """CR is JSON whitespace, and NDJSON/JSON Lines separate records by LF only
    (a CRLF's CR is whitespace the JSON parser skips). A line holding a CR
    between two members is one valid pulse: the pulses after it must keep the
    index the client gave them, or the client is told the wrong pulse failed."""
    server = await start_server()
    with_cr = b'{"tenant_id": "cr", "product_sku": "sku",\r"use_unit": "call", "used_amount": 1}'
    assert json.loads(with_cr) == pulse("cr", 1)
    body = b"\n".join([with_cr, line("cr", -5, id="bad"), line("cr", 7, id="good")]) + b"\n"
    response = await client.post(
        f"{server.url}/pulses", content=body, headers={"Content-Type": NDJSON}
    )
    assert response.status_code == 202, response.text
    report = response.json()
    stored_now = await stored(client, server, tenant_id="cr")
    assert (report["accepted"], report["rejected"], report["items"]) == (
        2,
        1,
        [{"index": 1, "id": "bad", "status": "rejected", "error": "used_amount must be >= 0"}],
    ), f"3 lines sent; report {report}; stored {stored_now}"
    assert stored_now == [("cr", "sku", "call", Decimal(8), 2)]


async def test_exactly_max_batch_ndjson_with_blank_lines_then_one_more_is_413(
    start_server: StartServer, client: httpx.AsyncClient
) -> None:
    """Blank lines are not pulses: max_batch pulses among many blank lines are
    stored; max_batch + 1 is 413 and stores nothing."""
    server = await start_server(INGESTOR_MAX_BATCH="3")
    blanks = b"\n \n\t\n\r\n" * 5
    body = blanks + blanks.join(line("mb", n, id=f"ok-{n}") for n in range(3)) + blanks
    response = await client.post(
        f"{server.url}/pulses", content=body, headers={"Content-Type": NDJSON}
    )
    assert (response.status_code, response.json()["accepted"]) == (202, 3), response.text
    body = blanks.join(line("mb", 10, id=f"over-{n}") for n in range(4))
    response = await client.post(
        f"{server.url}/pulses", content=body, headers={"Content-Type": NDJSON}
    )
    assert_error(response, 413, "too_many_pulses")
    assert await stored(client, server, tenant_id="mb") == [("mb", "sku", "call", Decimal(3), 3)]


# -- media types and charsets ---------------------------------------------------------


async def test_content_type_parameters_casing_and_aliases(
    start_server: StartServer, client: httpx.AsyncClient
) -> None:
    """Media types are case-insensitive and take parameters; the NDJSON aliases
    and +json types are taken; other types are 415 and store nothing."""
    server = await start_server()
    taken = [
        "Application/JSON; Charset=UTF-8",
        'application/json;charset="utf-8"',
        "application/json ; charset=us-ascii",
        "application/vnd.acme.pulse+json",
        "APPLICATION/X-NDJSON ; charset=utf-8",
        "application/jsonl",
        "application/x-jsonlines",
    ]
    for n, content_type in enumerate(taken):
        response = await client.post(
            f"{server.url}/pulses",
            content=line("ct", 1, id=f"ct-{n}"),
            headers={"Content-Type": content_type},
        )
        assert (response.status_code, response.json().get("accepted")) == (202, 1), content_type
    for content_type in ("text/json", "application/json-seq", "application/x-json", "json"):
        response = await client.post(
            f"{server.url}/pulses", content=line("ct", 100), headers={"Content-Type": content_type}
        )
        assert_error(response, 415, "unsupported_media_type")
    assert await stored(client, server, tenant_id="ct") == [
        ("ct", "sku", "call", Decimal(len(taken)), len(taken))
    ]


@pytest.mark.parametrize(
    ("charset", "tenant"),
    [
        # Two Latin-1 characters whose bytes (C3 A9) happen to be UTF-8 for "é".
        ("iso-8859-1", "t\u00c3\u00a9"),
        ("utf-16", "t\u00e9"),
    ],
)
async def test_a_body_in_another_charset_is_refused_not_misread(
    start_server: StartServer, client: httpx.AsyncClient, charset: str, tenant: str
) -> None:
    """JSON on the wire is UTF-8 (RFC 8259 §8.1). A body declared in another
    charset is either refused (415) and stores nothing, or read in the charset
    it declares. Never stored under names the client did not send."""
    server = await start_server()
    body = json.dumps(pulse(tenant), ensure_ascii=False).encode(charset)
    response = await client.post(
        f"{server.url}/pulses", content=body, headers={"Content-Type": f"{JSON}; charset={charset}"}
    )
    held = await stored(client, server)
    if response.status_code == 415:
        assert_error(response, 415, "unsupported_media_type")
        assert held == []
    else:
        assert (response.status_code, held) == (
            202,
            [(tenant, "sku", "call", Decimal(1), 1)],
        ), f"{charset} body: {response.status_code} {response.text}; stored {held}"


async def test_a_utf8_bom_is_a_clear_400_for_json_and_one_rejected_line_for_ndjson(
    start_server: StartServer, client: httpx.AsyncClient
) -> None:
    server = await start_server()
    bom = b"\xef\xbb\xbf"
    for body in (bom + line("bom"), bom + b"[" + line("bom") + b"]"):
        response = await client.post(
            f"{server.url}/pulses", content=body, headers={"Content-Type": JSON}
        )
        assert_error(response, 400, "invalid_json")
    body = bom + line("bom", 5, id="first") + b"\n" + line("bom", 2, id="second")
    response = await client.post(
        f"{server.url}/pulses", content=body, headers={"Content-Type": NDJSON}
    )
    assert response.status_code == 202, response.text
    report = response.json()
    assert (report["accepted"], [(i["index"], i["status"]) for i in report["items"]]) == (
        1,
        [(0, "rejected")],
    )
    assert await stored(client, server) == [("bom", "sku", "call", Decimal(2), 1)]


# -- Authorization ---------------------------------------------------------------------


async def test_authorization_variants_on_pulses(
    start_server: StartServer, client: httpx.AsyncClient
) -> None:
    """The scheme is case-insensitive and spaces around the key do not matter;
    anything else is a 401 with a Bearer challenge and stores nothing."""
    server = await start_server(config=KEYS)
    for n, value in enumerate([f"bearer {ADMIN}", f"BEARER   {ADMIN}", f"Bearer {ADMIN}"]):
        response = await client.post(
            f"{server.url}/pulses",
            json=pulse("auth", 1, id=f"a-{n}"),
            headers={"Authorization": value},
        )
        assert response.status_code == 202, (value, response.text)
    for value in ("Bearer", f"Bearer{ADMIN}", f"Token {ADMIN}", f"Bearer {ADMIN} extra", ""):
        response = await client.post(
            f"{server.url}/pulses", json=pulse("auth", 100), headers={"Authorization": value}
        )
        assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer "), value
    response = await client.post(
        f"{server.url}/pulses",
        json=pulse("auth", 100),
        headers={"Authorization": f"Bearer {READER}"},
    )
    assert_error(response, 403, "forbidden")
    assert await stored(client, server) == [("auth", "sku", "call", Decimal(3), 3)]


@pytest.mark.parametrize("order", ["unknown-then-admin", "admin-then-unknown"])
async def test_two_authorization_headers_are_refused_on_pulses_as_on_every_route(
    start_server: StartServer, client: httpx.AsyncClient, order: str
) -> None:
    """Authorization is a singleton field (RFC 9110 §11.6.2): a request with two
    is ambiguous. POST /pulses must not pick one the Quart routes would not:
    refused (400/401), nothing stored, whichever comes first."""
    server = await start_server(config=KEYS)
    values = [f"Bearer {ADMIN}", "Bearer nobody-knows-this-key"]
    if order == "unknown-then-admin":
        values.reverse()
    headers = [("Authorization", v) for v in values]
    write = await client.post(
        f"{server.url}/pulses",
        content=line("dup"),
        headers=[*headers, ("Content-Type", JSON)],
    )
    read = await client.get(f"{server.url}/aggregates", headers=headers)
    held = await stored(client, server)
    assert write.status_code in (400, 401), (
        f"POST /pulses with Authorization {values}: {write.status_code} {write.text};"
        f" GET /aggregates with the same headers: {read.status_code}; stored {held}"
    )
    assert held == []


# -- connections -------------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order_each_with_its_id(
    start_server: StartServer, client: httpx.AsyncClient
) -> None:
    """Three requests in one write: three answers in order (202, 202 with a
    report, 422), each with its own X-Request-Id (sanitised, at most 128
    characters), then the close the last one asked for."""
    server = await start_server()
    long_id = "r" * 500
    ndjson = line("pipe", 2, id="p-2") + b"\n" + line("pipe", -1, id="p-bad") + b"\n"
    data = (
        request(line("pipe", 1, id="p-1"), extra="X-Request-Id: first<>{}\r\n")
        + request(ndjson, content_type=NDJSON, extra=f"X-Request-Id: {long_id}\r\n")
        + request(
            line("pipe", 1, use_unit=""),
            extra="X-Request-Id: third\r\nX-Injected: 1\r\nConnection: close\r\n",
        )
    )
    connection = await RawConnection.open(server)
    try:
        await connection.send(data)
        answers = [await connection.response() for _ in range(3)]
        closed = await connection.closed_by_server(5)
    finally:
        await connection.aclose()
    assert [a.status for a in answers] == [202, 202, 422], [a.body for a in answers]
    assert [a.header("x-request-id") for a in answers] == ["first", "r" * 128, "third"]
    assert all(a.header("x-injected") is None for a in answers)
    assert [(i["index"], i["status"]) for i in answers[1].json()["items"]] == [(1, "rejected")]
    assert_error(answers[2], 422, "invalid_pulse")
    assert closed
    assert await stored(client, server) == [("pipe", "sku", "call", Decimal(3), 2)]


async def test_http_1_0_post_is_stored_answered_and_closed(
    start_server: StartServer, client: httpx.AsyncClient
) -> None:
    server = await start_server()
    connection = await RawConnection.open(server)
    try:
        await connection.send(request(line("old", 4, id="h10"), version="1.0"))
        answer = await connection.response()
        closed = await connection.closed_by_server(5)
    finally:
        await connection.aclose()
    assert (answer.status, answer.json()["accepted"], closed) == (202, 1, True)
    assert await stored(client, server) == [("old", "sku", "call", Decimal(4), 1)]


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (request(b"", method="PUT", extra="Connection: close\r\n"), 405),
        (request(b"", method="DELETE", version="1.0"), 405),
        (request(line("typo"), path="/pulse", extra="Connection: close\r\n"), 404),
    ],
    ids=["PUT-1.1-close", "DELETE-1.0", "POST-/pulse-1.1-close"],
)
async def test_an_error_answer_that_says_connection_close_closes_the_connection(
    start_server: StartServer, raw: bytes, status: int
) -> None:
    """A wrong method or path on /pulses is a JSON 405 (with Allow) or 404. When
    the answer is the last on its connection (Connection: close, or HTTP/1.0),
    the server must close the connection, not hold it until read_timeout (75 s)
    while a client reading to the end of the stream hangs."""
    server = await start_server()
    connection = await RawConnection.open(server)
    try:
        await connection.send(raw)
        answer = await connection.response()
        closed = await connection.closed_by_server(2)
    finally:
        await connection.aclose()
    assert answer.status == status
    assert answer.json()["error"]["code"] in ("method_not_allowed", "not_found")
    if status == 405:
        assert "POST" in (answer.header("allow") or ""), answer.headers
    assert closed, (
        f"{status} answered with Connection: close, but the server still held the"
        " connection open 2 s later"
    )


async def test_a_body_shorter_than_its_content_length_is_408_closed_and_stores_nothing(
    start_server: StartServer, client: httpx.AsyncClient
) -> None:
    server = await start_server(INGESTOR_BODY_TIMEOUT="1")
    body = line("short", 9, id="short")
    connection = await RawConnection.open(server)
    try:
        await connection.send(request(body, length=len(body) + 20))
        answer = await connection.response(within=10)
        closed = await connection.closed_by_server(5)
    finally:
        await connection.aclose()
    assert_error(answer, 408, "request_timeout")
    assert "body_timeout" in answer.json()["error"]["message"]
    assert closed, "the rest of the body was never read: the connection must not be reused"
    assert await stored(client, server) == []
    assert await in_flight(client, server) == 0


async def test_a_client_gone_after_sending_its_body_is_stored_and_nothing_is_logged(
    start_server: StartServer, client: httpx.AsyncClient
) -> None:
    """Clients that send a whole request and close at once: no one is left to
    answer, but the requests were complete. They are stored once each (their
    retries would be duplicates), the in-flight count returns to 0, and the
    server logs no error."""
    server = await start_server()
    count = 6
    for n in range(count):
        connection = await RawConnection.open(server)
        payload = [pulse("gone", 1, id=f"g-{n}"), pulse("gone", 2, id=f"h-{n}")]
        await connection.send(request(json.dumps(payload).encode()))
        await connection.aclose()

    async def all_stored() -> list[tuple[str, str, str, Decimal, int]]:
        held = await stored(client, server)
        return held if held and held[0][4] >= 2 * count else []

    held = await wait_until(all_stored, within=10, what="every completed request stored")
    assert held == [("gone", "sku", "call", Decimal(3 * count), 2 * count)]

    async def idle() -> bool:
        return await in_flight(client, server) == 0

    await wait_until(idle, within=10, what="no request left in flight")
    output = server.output_of_run()
    assert not re.search(r" (ERROR|CRITICAL) |Traceback|Exception", output), output[-3000:]


async def test_max_in_flight_reached_is_a_json_503_with_retry_after_storing_nothing(
    start_server: StartServer, client: httpx.AsyncClient
) -> None:
    server = await start_server(INGESTOR_MAX_IN_FLIGHT="1")
    first = line("busy", 1, id="slow")
    connection = await RawConnection.open(server)
    try:
        await connection.send(request(first[:10], length=len(first)))

        async def one_in_flight() -> bool:
            return await in_flight(client, server) == 1

        await wait_until(one_in_flight, within=10, what="the slow request counted")
        over = await client.post(
            f"{server.url}/pulses",
            content=line("busy", 100, id="over"),
            headers={"Content-Type": JSON},
        )
        assert_error(over, 503, "overloaded")
        assert over.headers["Retry-After"] == "1"
        assert "max_in_flight" in over.json()["error"]["message"]
        assert over.headers.get("X-Request-Id")
        await connection.send(first[10:])
        answer = await connection.response()
        assert answer.status == 202, answer.body
    finally:
        await connection.aclose()
    again = await client.post(
        f"{server.url}/pulses", content=line("busy", 2, id="over"), headers={"Content-Type": JSON}
    )
    assert (again.status_code, again.json()["accepted"]) == (202, 1)
    assert await stored(client, server) == [("busy", "sku", "call", Decimal(3), 2)]


async def test_chunked_body_of_exactly_max_body_bytes_is_stored_one_byte_more_is_413(
    start_server: StartServer, client: httpx.AsyncClient
) -> None:
    limit = 1024
    server = await start_server(INGESTOR_MAX_BODY_BYTES=str(limit))
    no_reuse = httpx.Limits(max_keepalive_connections=0)

    async def chunked(body: bytes) -> httpx.Response:
        async with httpx.AsyncClient(timeout=15.0, limits=no_reuse) as http:
            upload = http.build_request(
                "POST", f"{server.url}/pulses", headers={"Content-Type": JSON}
            )
            upload.stream = Chunks([body[i : i + 100] for i in range(0, len(body), 100)])
            upload.headers.pop("Content-Length", None)
            upload.headers["Transfer-Encoding"] = "chunked"
            return await http.send(upload)

    def padded(size: int, id_: str) -> bytes:
        body = b"[" + line("chunk", 1, id=id_) + b"]"
        return body[:-1] + b" " * (size - len(body)) + b"]"

    response = await chunked(padded(limit, "exact"))
    assert (response.status_code, response.json().get("accepted")) == (202, 1), response.text
    response = await chunked(padded(limit + 1, "over"))
    assert_error(response, 413, "body_too_large")
    assert await stored(client, server) == [("chunk", "sku", "call", Decimal(1), 1)]


async def test_expect_100_continue_gets_the_final_answer_after_the_body(
    start_server: StartServer, client: httpx.AsyncClient
) -> None:
    """With Expect: 100-continue the final answer follows the body: 202 and
    stored; a declared length over max_body_bytes is 413 and stores nothing."""
    server = await start_server(INGESTOR_MAX_BODY_BYTES="2048")
    body = line("expect", 6, id="e-1")
    connection = await RawConnection.open(server)
    try:
        await connection.send(request(b"", length=len(body), extra="Expect: 100-continue\r\n"))
        with trio.fail_after(5):
            while b"\r\n\r\n" not in connection.buffer:
                assert await connection._fill()
        assert connection.buffer.startswith(b"HTTP/1.1 100"), bytes(connection.buffer)
        await connection.send(body)
        answer = await connection.response()
        assert (answer.status, answer.json()["accepted"]) == (202, 1)
        await connection.send(
            request(b"", length=5000, extra="Expect: 100-continue\r\nConnection: close\r\n")
        )
        too_big = await connection.response()
    finally:
        await connection.aclose()
    assert_error(too_big, 413, "body_too_large")
    assert await stored(client, server) == [("expect", "sku", "call", Decimal(6), 1)]


async def test_a_body_framed_by_both_transfer_encoding_and_length_closes_its_connection(
    start_server: StartServer,
) -> None:
    """RFC 9112 §6.1: a request with both Transfer-Encoding and Content-Length is
    read by its Transfer-Encoding and its connection closed after the answer.
    A proxy in front may have framed it by its Content-Length and taken the
    rest for another request (request smuggling); the connection was kept
    alive, and a request hidden in the body would have been answered."""
    server = await start_server()
    body = json.dumps(pulse("smuggle")).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    hidden = (
        f"POST /pulses HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    head = (
        f"POST /pulses HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(chunked)}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    stream = await trio.open_tcp_stream(server.host, server.port)
    received = b""
    async with stream:
        await stream.send_all(head + chunked + hidden)
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                received += chunk
    assert received.startswith(b"HTTP/1.1 202 "), received[:200]
    assert b"\r\nconnection: close\r\n" in received.lower(), received[:400]
    assert received.count(b"HTTP/1.1 ") == 1, received  # the hidden request is not answered
    async with httpx.AsyncClient(timeout=10) as client:
        assert await stored(client, server, tenant_id="smuggle") == [
            ("smuggle", "sku", "call", Decimal(1), 1)
        ]
