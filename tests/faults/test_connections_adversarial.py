"""Abuse at the connection level, against real server processes.

Clients that no library would write, but that the network, a frozen process
or an attacker produce: connections that never finish their head
(slowloris), that pipeline requests and never read an answer, that
half-close their side right after the body, that are reset in the middle of
an upload, and idle connections that take every descriptor the process may
open. Each is spoken byte by byte over a raw socket, so what is tested is the
server's handling of the connection, not a client library's.

The promises attacked are DESIGN.md §3's (a 2xx means stored, exactly once
per id, bounded memory and 503 instead of growth) and README's
`graceful_timeout`: SIGTERM waits that long for requests in flight, then
stops. Every server runs with `durability = "os"`: the connection, not the
disk, is under test.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from tests.faults.conftest import Report, StartServer
from tests.faults.harness import rss_kib
from tests.support.server import (
    Ledger,
    ServerError,
    ServerProcess,
    check_pulses_stored_once,
    encode_body,
    post_until_stored,
    wait_until,
)

OS = {"INGESTOR_DURABILITY": "os"}
SMALL_BUFFER = 4096  # SO_RCVBUF / SO_SNDBUF of a client that reads (or sends) slowly
INVALID = 9_999  # invalid pulses beside the valid one of a request with a long answer


def pulse(tenant: str, pulse_id: str, amount: int | str = 1) -> dict[str, Any]:
    return {
        "tenant_id": tenant,
        "product_sku": "sku",
        "use_unit": "call",
        "used_amount": amount,
        "id": pulse_id,
    }


def head(
    server: ServerProcess,
    length: int | None,
    *,
    method: str = "POST",
    path: str = "/pulses",
    extra: str = "",
) -> bytes:
    framing = "" if length is None else f"Content-Length: {length}\r\n"
    kind = "Content-Type: application/json\r\n" if method == "POST" else ""
    host = f"Host: {server.host}:{server.port}\r\n"
    return f"{method} {path} HTTP/1.1\r\n{host}{kind}{framing}{extra}\r\n".encode()


def request(server: ServerProcess, body: bytes, *, extra: str = "") -> bytes:
    """A whole POST /pulses with a JSON body framed by its Content-Length."""
    return head(server, len(body), extra=extra) + body


def long_answer_body(valid: dict[str, Any]) -> bytes:
    """An array of one valid pulse and INVALID empty objects: 30 KB that the
    server answers with a report of about 870 KB (one item per rejected pulse)."""
    return b"[" + json.dumps(valid).encode() + b",{}" * INVALID + b"]"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Raw:
    """One TCP connection to the server, spoken to byte by byte."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.buffer = b""
        self.interim: list[int] = []  # 1xx statuses seen before the answers

    @classmethod
    async def open(
        cls,
        server: ServerProcess,
        *,
        receive_buffer: int | None = None,
        send_buffer: int | None = None,
    ) -> Raw:
        sock = trio.socket.socket()
        try:
            # Set before connect: the window the client offers is fixed by then.
            if receive_buffer is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            if send_buffer is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
            await sock.connect((server.host, server.port))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]

    async def answer(self, within: float = 10.0) -> Answer | None:
        """The next final answer on the connection (1xx ones are noted and
        skipped); None if the server closed first or none came in time."""
        with trio.move_on_after(within):
            while True:
                while b"\r\n\r\n" not in self.buffer:
                    if not await self._fill():
                        return None
                raw_head, _, rest = self.buffer.partition(b"\r\n\r\n")
                status_line, *lines = raw_head.decode("latin-1").split("\r\n")
                status = int(status_line.split()[1])
                headers = {
                    k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)
                }
                if status < 200:
                    self.interim.append(status)
                    self.buffer = rest
                    continue
                length = int(headers.get("content-length", "0"))
                while len(rest) < length:
                    if not await self._fill():
                        return None
                    rest = self.buffer.partition(b"\r\n\r\n")[2]
                self.buffer = rest[length:]
                return Answer(status, headers, rest[:length])
        return None

    async def closed_by_server(self, within: float) -> bool:
        """Whether the server closes the connection within `within` seconds
        (whatever else it sends before is read and dropped)."""
        with trio.move_on_after(within):
            while await self._fill():
                pass
            return True
        return False

    def half_close(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def reset(self) -> None:
        """Close with RST instead of FIN (SO_LINGER 0): what a crashing client,
        a killed container or a middlebox timing out does."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    async def _fill(self) -> bool:
        try:
            chunk = await self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return False
        self.buffer += chunk
        return bool(chunk)


def as_response(answer: Answer) -> httpx.Response:
    """An answer read off a raw socket, as the Ledger takes answers."""
    return httpx.Response(answer.status, headers=answer.headers, content=answer.body)


async def gauges(server: ServerProcess) -> dict[str, float]:
    """The server's unlabelled metrics, by name."""
    async with httpx.AsyncClient(timeout=10.0) as http:
        scraped = await http.get(f"{server.url}/metrics")
    assert scraped.status_code == 200, scraped.text
    found: dict[str, float] = {}
    for line in scraped.text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            found[name] = float(value)
    return found


async def settled(server: ServerProcess) -> bool:
    """No request is in flight and no body is held."""
    now = await gauges(server)
    return (
        now["ingestor_http_requests_in_flight"] == 0
        and now["ingestor_http_request_bytes_in_flight"] == 0
    )


async def pulses_counted(server: ServerProcess, tenant: str) -> int:
    async with httpx.AsyncClient(timeout=10.0) as http:
        got = await http.get(f"{server.url}/aggregates", params={"tenant_id": tenant})
    assert got.status_code == 200, got.text
    return sum(int(row["pulse_count"]) for row in got.json()["aggregates"])


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def running_pid(server: ServerProcess) -> int:
    assert server.running, server.tail()
    assert server.pid is not None
    return server.pid


# -- answers nobody reads ------------------------------------------------------------------


async def test_sigterm_stops_within_graceful_timeout_though_a_client_never_reads_its_answers(
    start_server: StartServer, report: Report
) -> None:
    """A client pipelines POST /pulses whose answers are long, and never reads
    one (a frozen process, a debugger on a breakpoint, a client stuck on a
    lock: its socket stays open and its window closed). The server must not
    read ahead without bound (its memory stays where it was), and SIGTERM
    must stop it within `graceful_timeout`, as README promises: an
    orchestrator that waits longer for a rolling restart than its own grace
    period SIGKILLs the process, and every other request in flight loses its
    answer. Every pulse the server stored must be counted once when the
    client sends it again."""
    graceful = 3
    server = await start_server(**OS, INGESTOR_GRACEFUL_TIMEOUT=str(graceful))
    pid = running_pid(server)
    idle_kib = rss_kib(pid)
    ledger = Ledger()
    tenant = "unread"
    raw = await Raw.open(server, receive_buffer=SMALL_BUFFER, send_buffer=SMALL_BUFFER)
    sent = 0
    try:
        for number in range(400):
            valid = pulse(tenant, f"unread-{number}")
            attempts = ledger.sent([valid], "array")
            with trio.move_on_after(1.5) as blocked:
                await raw.send(request(server, long_answer_body(valid)))
            ledger.answered(attempts, None, "never read")
            if blocked.cancelled_caught:
                break  # the server stopped reading: its buffers and ours are full
            sent += 1
        await trio.sleep(0.5)
        held_kib = rss_kib(pid)
        stuck = (await gauges(server))["ingestor_http_requests_in_flight"]
        taken = await pulses_counted(server, tenant)
        signalled = time.monotonic()
        try:
            exit_code: int | str = await server.terminate(within=graceful + 10)
        except ServerError as exc:
            exit_code = f"none: {str(exc).splitlines()[0]}"
        stopped = time.monotonic() - signalled
    finally:
        raw.close()

    await server.start()  # the same data dir: what was stored is there
    async with httpx.AsyncClient(timeout=30.0) as http:
        await post_until_stored(http, server.url, ledger, [a.payload for a in ledger.attempts])
        await check_pulses_stored_once(http, server, ledger)
    assert ledger.problems() == [], ledger.problems()[:5]
    grown_mib = (held_kib - idle_kib) / 1024
    report(
        f"connections, unread answers: {sent} requests pipelined whole before the socket"
        f" blocked, {taken} of them stored, {stuck:g} in flight; RSS grew {grown_mib:.0f} MiB;"
        f" SIGTERM: exit {exit_code} after {stopped:.1f} s (graceful_timeout {graceful} s)"
    )
    assert grown_mib < 64, f"RSS grew {grown_mib:.0f} MiB for one connection nobody reads"
    assert exit_code == 0, (
        f"SIGTERM with one client not reading its answer ({stuck:g} request(s) in flight):"
        f" no exit within graceful_timeout ({graceful} s) + 10 s, exit code {exit_code}."
        " The answer's write waits for ever for a window the client never opens, and"
        " the drain's cancellation does not reach it"
    )


async def test_an_answer_nobody_reads_gives_its_request_slot_back_in_bounded_time(
    start_server: StartServer, report: Report
) -> None:
    """Two clients each post a request with a long answer and stop reading
    (their windows closed, their sockets open). Each holds one of the
    `max_in_flight` slots while its answer is written; once no byte of it
    has moved for a while, the server must give up on it and take other
    clients again. Otherwise two stalled peers (or 1,024 with the default
    limit) answer every other client 503 for as long as they keep their
    sockets, and every pulse of a paying tenant is refused."""
    server = await start_server(**OS, INGESTOR_MAX_IN_FLIGHT="2")
    stalled: list[Raw] = []
    honest: Counter[int] = Counter()
    try:
        for number in range(2):
            raw = await Raw.open(server, receive_buffer=SMALL_BUFFER)
            stalled.append(raw)
            await raw.send(request(server, long_answer_body(pulse("stall", f"stall-{number}"))))

        async def both_held() -> bool:
            return (await gauges(server))["ingestor_http_requests_in_flight"] >= 2

        await wait_until(both_held, within=10, what="both stalled answers in flight")
        held_at = time.monotonic()
        body = json.dumps(pulse("honest", "honest-0")).encode()
        served_after: float | None = None
        async with httpx.AsyncClient(timeout=10.0) as http:
            while time.monotonic() - held_at < 20:
                answer = await http.post(
                    f"{server.url}/pulses",
                    content=body,
                    headers={"Content-Type": "application/json"},
                )
                honest[answer.status_code] += 1
                if answer.status_code == 202:
                    served_after = time.monotonic() - held_at
                    break
                assert answer.status_code == 503, answer.text
                assert answer.headers.get("Retry-After"), answer.headers
                await trio.sleep(0.5)
        ready = (await gauges(server))["ingestor_http_requests_in_flight"]
    finally:
        for raw in stalled:
            raw.close()
    report(
        f"connections, stalled answers: honest client's answers {dict(honest)}; served"
        f" {served_after and round(served_after, 1)} s after two stalled readers took"
        f" max_in_flight = 2; {ready:g} in flight at the end"
    )
    assert served_after is not None, (
        "two clients that stopped reading their answers held both max_in_flight slots"
        f" for 20 s: every other client was answered 503 ({dict(honest)}). A response"
        " write has no timeout (the edge's own 10 s bound on the last write does not"
        " reach hypercorn's shielded send)"
    )


# -- half-closed connections ---------------------------------------------------------------


async def test_a_client_that_half_closes_after_its_body_gets_its_answer_and_is_counted_once(
    start_server: StartServer,
) -> None:
    """`printf ... | nc -N`, and clients that signal "no more requests" with
    shutdown(SHUT_WR), send a whole request and then FIN. The request is
    complete: it must be stored and answered on the still-open read side
    (a 202 the client never sees makes it send again, and a pulse without an
    id is then counted twice). Three framings: Content-Length, chunked, and
    two pipelined requests before the FIN."""
    server = await start_server(**OS)
    ledger = Ledger()
    chunked_pulse = pulse("half", "half-chunked", "2.5")
    chunked_body = json.dumps(chunked_pulse).encode()
    cases: list[tuple[str, list[list[dict[str, Any]]], bytes]] = []
    single = [pulse("half", "half-length", 7)]
    cases.append(("content-length", [single], request(server, encode_body(single, "array")[0])))
    cases.append(
        (
            "chunked",
            [[chunked_pulse]],
            head(server, None, extra="Transfer-Encoding: chunked\r\n")
            + b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunked_body), chunked_body),
        )
    )
    first = [pulse("half", "half-p1", 1), pulse("half", "half-p2", 2)]
    second = [pulse("half", "half-p1", 1), pulse("half", "half-p3", 3)]  # one duplicate
    cases.append(
        (
            "pipelined",
            [first, second],
            request(server, encode_body(first, "array")[0])
            + request(server, encode_body(second, "array")[0]),
        )
    )
    got: dict[str, list[int | None]] = {}
    for name, requests, data in cases:
        raw = await Raw.open(server)
        try:
            attempts = [ledger.sent(payloads, "array") for payloads in requests]
            await raw.send(data)
            raw.half_close()
            got[name] = []
            for sent in attempts:
                answer = await raw.answer(within=10)
                ledger.answered(sent, None if answer is None else as_response(answer))
                got[name].append(None if answer is None else answer.status)
            closed = await raw.closed_by_server(5)
        finally:
            raw.close()
        assert closed, f"{name}: the server kept a half-closed connection open after its answers"
    assert got == {
        "content-length": [202],
        "chunked": [202],
        "pipelined": [202, 202],
    }, got
    assert ledger.problems() == [], ledger.problems()
    assert Counter(a.answer for a in ledger.attempts) == {"accepted": 5, "duplicate": 1}
    async with httpx.AsyncClient(timeout=10.0) as http:
        await check_pulses_stored_once(http, server, ledger)
    await wait_until(lambda: settled(server), within=10, what="nothing left in flight")


async def test_answers_given_while_stopping_close_their_connection_and_say_so(
    start_server: StartServer,
) -> None:
    """A proxy (nginx's `keepalive`) sends its next request on a connection
    as soon as the answer before it is in, unless the answer said
    `Connection: close`. A stopping server that closed each connection after
    its answer without saying so had the proxy's next POST sent on a
    connection being closed, answered 502 to its client, which cannot tell
    whether anything was stored. Two uploads are in flight at SIGTERM, and
    finish during the drain: each is answered (503 `draining`, with
    Retry-After), says `Connection: close`, and its connection is closed."""
    server = await start_server(**OS)
    body = encode_body([pulse("stopping", "before", 1)], "array")[0]
    raw = await Raw.open(server)
    try:  # before the stop: the connection is kept
        await raw.send(request(server, body))
        before = await raw.answer(within=10)
    finally:
        raw.close()
    assert before is not None, "no answer before the stop"
    assert before.status == 202, before
    assert before.headers.get("connection", "").lower() != "close", before.headers
    uploads = [await Raw.open(server) for _ in range(2)]
    try:
        for number, raw in enumerate(uploads):
            held = encode_body([pulse("stopping", f"during-{number}", 1)], "array")[0]
            await raw.send(head(server, len(held)) + held[:-1])  # in flight, one byte short
        await wait_until(
            lambda: _in_flight_at_least(server, 2), within=10, what="both uploads in flight"
        )
        process = server._current()
        process.send_signal(signal.SIGTERM)
        await trio.sleep(0.5)  # the stop has begun; the drain waits for the uploads
        answers = []
        for raw in uploads:
            await raw.send(b"]")
            answers.append(await raw.answer(within=10))
        closed = [await raw.closed_by_server(5) for raw in uploads]
    finally:
        for raw in uploads:
            raw.close()
    for answer in answers:
        assert answer is not None, "an upload in flight at SIGTERM got no answer"
        assert answer.status == 503, (answer.status, answer.body)
        assert answer.json()["error"]["code"] == "draining", answer.body
        assert "retry-after" in answer.headers, answer.headers
        assert answer.headers.get("connection", "").lower() == "close", answer.headers
    assert closed == [True, True], "a connection was kept open after its answer while stopping"
    with trio.fail_after(15):
        assert await process.wait() == 0, server.tail()


async def _in_flight_at_least(server: ServerProcess, count: int) -> bool:
    return (await gauges(server))["ingestor_http_requests_in_flight"] >= count


async def test_half_closed_requests_to_every_other_route_are_answered_like_post_pulses(
    start_server: StartServer, report: Report
) -> None:
    """The same half-close (the whole request sent, then FIN) on the routes
    served by the framework: POST /aggregates/commit, GET /aggregates,
    /readyz, /metrics. POST /pulses answers such a request; these must too.
    A commit sent by a cron job through `nc -N` was dropped without an
    answer and without committing, so the day's batches were not made; a
    TCP health checker that half-closes saw a ready server as down."""
    server = await start_server(**OS)
    async with httpx.AsyncClient(timeout=10.0) as http:
        stored = await http.post(f"{server.url}/pulses", json=pulse("halfroute", "hr-1", 5))
        assert stored.status_code == 202, stored.text
    day = time.strftime("%Y-%m-%d", time.gmtime())
    commit = json.dumps({"date": day}).encode()
    cases = {
        "POST /aggregates/commit": head(server, len(commit), path="/aggregates/commit") + commit,
        "GET /aggregates": head(server, None, method="GET", path="/aggregates?tenant_id=halfroute"),
        "GET /readyz": head(server, None, method="GET", path="/readyz"),
        "GET /metrics": head(server, None, method="GET", path="/metrics"),
        "GET /healthz": head(server, None, method="GET", path="/healthz"),
    }
    got: dict[str, int | None] = {}
    for name, data in cases.items():
        raw = await Raw.open(server)
        try:
            await raw.send(data)
            raw.half_close()
            answer = await raw.answer(within=10)
        finally:
            raw.close()
        got[name] = None if answer is None else answer.status
    async with httpx.AsyncClient(timeout=10.0) as http:
        batches = (await http.get(f"{server.url}/batches", params={"date": day})).json()
    report(f"connections, half-closed routes: {got}; batches of {day}: {len(batches['batches'])}")
    assert got == dict.fromkeys(cases, 200), (
        f"half-closed complete requests answered {got} (None: the connection was closed"
        " without an answer); POST /pulses answers the same request"
    )
    assert len(batches["batches"]) == 1, batches


# -- resets ----------------------------------------------------------------------------------


async def test_a_connection_reset_anywhere_in_an_upload_then_its_retry_counts_each_pulse_once(
    start_server: StartServer, report: Report
) -> None:
    """A client is reset (RST, not FIN) at every point of a POST /pulses: in
    its head, in its body, right after its body, and while a long answer is
    being written to it. It then sends the same pulses again on a new
    connection, as a client whose request failed does. Each pulse must be
    counted once whatever the moment; the server must give back the request's
    slot and the bytes it held for the body, and go on serving."""
    server = await start_server(**OS)
    ledger = Ledger()
    cuts: dict[str, int | None] = {}
    payloads = [[pulse("reset", f"rst-{cut}-{n}", n + 1) for n in range(50)] for cut in range(4)]
    bodies = [encode_body(p, "array")[0] for p in payloads]
    whole = [request(server, body) for body in bodies]
    points = {
        "in the head": len(head(server, len(bodies[0]))) // 2,
        "in the body": len(whole[1]) - len(bodies[1]) // 2,
        "after the body": len(whole[2]),
    }
    for number, (name, cut) in enumerate(points.items()):
        raw = await Raw.open(server)
        attempts = ledger.sent(payloads[number], "array")
        try:
            await raw.send(whole[number][:cut])
            await trio.sleep(0.3)  # taken in by the server before the reset
        finally:
            raw.reset()
        ledger.answered(attempts, None, f"reset {name}")
        cuts[name] = cut
    # A long answer, not read, then the reset while it is being written.
    long_payloads = [pulse("reset-long", "rst-long", 9)]
    raw = await Raw.open(server, receive_buffer=SMALL_BUFFER)
    attempts = ledger.sent(long_payloads, "array")
    try:
        await raw.send(request(server, long_answer_body(long_payloads[0])))

        async def writing() -> bool:
            stored = await pulses_counted(server, "reset-long") == 1
            return stored and (await gauges(server))["ingestor_http_requests_in_flight"] >= 1

        await wait_until(writing, within=10, what="the long answer stored and being written")
    finally:
        raw.reset()
    ledger.answered(attempts, None, "reset while answered")
    cuts["while answered"] = None

    await wait_until(lambda: settled(server), within=15, what="every reset request let go")
    counted_before = await pulses_counted(server, "reset")
    async with httpx.AsyncClient(timeout=30.0) as http:
        for sent in [*payloads[:3], long_payloads]:
            await post_until_stored(http, server.url, ledger, sent)
        await check_pulses_stored_once(http, server, ledger)
    answers = Counter(a.answer for a in ledger.attempts if a.answer != "no answer")
    report(
        f"connections, resets: {counted_before} pulses stored by reset requests"
        f" (reset at {cuts}); the retries were {dict(answers)}"
    )
    assert ledger.problems() == [], ledger.problems()[:5]
    # Only a request whose body was whole can have been stored.
    assert counted_before in (0, 50), counted_before
    assert server.running, server.tail()


# -- pipelining -------------------------------------------------------------------------------


async def test_sixty_pipelined_posts_are_answered_in_order_and_each_pulse_is_counted_once(
    start_server: StartServer,
) -> None:
    """Sixty POST /pulses in one write on one connection, read only once all
    are sent. Each repeats an id of the request before it (a retry that
    overtook its answer) and every tenth reuses an id with another amount
    (a client bug). The answers must come in order, each saying what
    happened to its own pulses: a duplicate only after the pulse it repeats
    was stored, a conflict not counted, every accepted pulse counted once."""
    server = await start_server(**OS)
    ledger = Ledger()
    requests: list[list[dict[str, Any]]] = []
    for number in range(60):
        pulses = [pulse("pipe", f"pipe-{number}-{n}", n + 1) for n in range(3)]
        if number:
            pulses.append(pulse("pipe", f"pipe-{number - 1}-0", 1))  # a duplicate
        if number and number % 10 == 0:
            pulses.append(pulse("pipe", f"pipe-{number - 2}-1", 99))  # a conflict
        requests.append(pulses)
    data = b"".join(
        request(server, encode_body(p, "array")[0], extra=f"X-Request-Id: pipe-{n}\r\n")
        for n, p in enumerate(requests)
    )
    raw = await Raw.open(server)
    ids: list[str | None] = []
    try:
        attempts = [ledger.sent(p, "array") for p in requests]
        await raw.send(data)
        for sent in attempts:
            answer = await raw.answer(within=15)
            assert answer is not None, f"no answer after {len(ids)} of {len(requests)}"
            ids.append(answer.headers.get("x-request-id"))
            ledger.answered(sent, as_response(answer))
    finally:
        raw.close()
    assert ids == [f"pipe-{n}" for n in range(60)], ids
    assert ledger.problems() == [], ledger.problems()[:5]
    tally = Counter(a.answer for a in ledger.attempts)
    assert tally == {"accepted": 180, "duplicate": 59, "conflict": 5}, tally
    async with httpx.AsyncClient(timeout=10.0) as http:
        await check_pulses_stored_once(http, server, ledger)
    assert await pulses_counted(server, "pipe") == 180


# -- slow heads and bodies --------------------------------------------------------------------

SLOW_HEADS = 250  # connections trickling their request head, a byte a second
SILENT_BODIES = 30  # connections that ask for 100-continue and never send the body
BODY_TIMEOUT = 3


async def test_slowloris_and_silent_bodies_leave_honest_clients_served_and_memory_bounded(
    start_server: StartServer, report: Report
) -> None:
    """250 connections trickle their request heads a byte a second, and 30
    announce a body (Expect: 100-continue) that never comes. Meanwhile an
    honest client posts pulses on new connections: each must be answered
    202 within 10 s, /readyz must stay 200, and the server's memory must not
    grow with the slow connections beyond a few MiB each. Each silent body
    must be answered 408 within its body_timeout and its connection closed;
    once the slow clients go, their descriptors come back."""
    server = await start_server(**OS, INGESTOR_BODY_TIMEOUT=str(BODY_TIMEOUT))
    pid = running_pid(server)
    idle_kib = rss_kib(pid)
    idle_fds = open_fds(pid)
    peak_kib = idle_kib
    slow: list[Raw] = []
    silent_answers: list[tuple[list[int], int | None, bool]] = []
    honest: list[tuple[int | None, float]] = []
    ready: Counter[int | str] = Counter()
    trickle = head(server, 200, extra="X-Padding: " + "p" * 40 + "\r\n")

    async def slowloris(raw: Raw, offset: float) -> None:
        await trio.sleep(offset)
        for byte in trickle[:-4]:  # never the blank line that ends the head
            await raw.send(bytes([byte]))
            await trio.sleep(1.0)

    async def silent(raw: Raw) -> None:
        await raw.send(head(server, 500, extra="Expect: 100-continue\r\n"))
        answer = await raw.answer(within=BODY_TIMEOUT + 10)
        closed = await raw.closed_by_server(5)
        silent_answers.append((raw.interim, None if answer is None else answer.status, closed))

    async def honest_client() -> None:
        async with httpx.AsyncClient(timeout=10.0, limits=httpx.Limits(max_connections=1)) as h:
            for number in range(16):
                started = time.monotonic()
                try:
                    answer = await h.post(
                        f"{server.url}/pulses",
                        json=pulse("honest", f"honest-{number}"),
                        headers={"Connection": "close"},
                    )
                    status: int | None = answer.status_code
                except httpx.TransportError:
                    status = None
                honest.append((status, time.monotonic() - started))
                try:
                    probe = await h.get(f"{server.url}/readyz", headers={"Connection": "close"})
                    ready[probe.status_code] += 1
                except httpx.TransportError as exc:
                    ready[type(exc).__name__] += 1
                await trio.sleep(0.4)

    try:
        for _ in range(SLOW_HEADS + SILENT_BODIES):
            slow.append(await Raw.open(server))
        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                for number, raw in enumerate(slow[:SLOW_HEADS]):
                    nursery.start_soon(slowloris, raw, number / SLOW_HEADS)
                for raw in slow[SLOW_HEADS:]:
                    nursery.start_soon(silent, raw)
                await trio.sleep(1.0)
                await honest_client()
                peak_kib = max(peak_kib, rss_kib(pid))
                held_fds = open_fds(pid)
                nursery.cancel_scope.cancel()
    finally:
        for raw in slow:
            raw.close()

    async def descriptors_back() -> bool:
        return open_fds(pid) <= idle_fds + 4

    await wait_until(descriptors_back, within=15, what="the slow connections' descriptors back")
    grown_mib = (peak_kib - idle_kib) / 1024
    slowest = max(seconds for _, seconds in honest)
    report(
        f"connections, slowloris: {SLOW_HEADS} trickling heads + {SILENT_BODIES} silent bodies;"
        f" honest answers {Counter(s for s, _ in honest)}, slowest {slowest:.1f} s; readyz"
        f" {dict(ready)}; silent bodies {Counter((tuple(i), s, c) for i, s, c in silent_answers)};"
        f" RSS +{grown_mib:.0f} MiB; descriptors {idle_fds} idle, {held_fds} held"
    )
    assert [s for s, _ in honest] == [202] * 16, honest
    assert ready == {200: 16}, ready
    assert silent_answers == [([100], 408, True)] * SILENT_BODIES, silent_answers
    assert grown_mib < 48, f"RSS grew {grown_mib:.0f} MiB with {len(slow)} slow connections"
    assert await pulses_counted(server, "honest") == 16


# -- the open-files limit -----------------------------------------------------------------------

HEADROOM = 40  # descriptors the server may open beyond those it holds idle
IDLE_FLOOD = 120  # idle connections opened: more than HEADROOM


async def test_idle_connections_at_the_open_file_limit_do_not_lock_out_a_new_client(
    start_server: StartServer, report: Report
) -> None:
    """A flood of connections that connect and send nothing (a port scanner,
    a pool warming up, an attacker) takes every descriptor the process may
    open (its hard limit, here lowered to its idle count + 40). A new
    client with pulses to send must then be answered within 10 s, served or
    refused with a 503 it can retry on, and /readyz must answer. The
    server held each silent connection for its 75 s keep-alive timeout and
    accepted nothing meanwhile: a client saw only a timeout, and an
    orchestrator's probe a server that had stopped answering."""
    server = await start_server(**OS)
    pid = running_pid(server)
    idle_fds = open_fds(pid)
    limit = idle_fds + HEADROOM
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
    flood: list[Raw] = []
    got: dict[str, int | str] = {}
    try:
        for _ in range(IDLE_FLOOD):
            flood.append(await Raw.open(server))

        async def crowded() -> bool:
            return "open files near the limit" in server.output

        await wait_until(crowded, within=10, what=f"the flood near the limit of {limit} files")
        held = open_fds(pid)
        assert held < limit, f"{held} files open of {limit}: nothing left to accept with"
        async with httpx.AsyncClient(timeout=10.0) as http:

            async def ask(name: str, method: str, path: str, body: Any = None) -> None:
                try:
                    answer = await http.request(method, f"{server.url}{path}", json=body)
                    got[name] = answer.status_code
                except httpx.TransportError as exc:
                    got[name] = type(exc).__name__

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, "POST /pulses", "POST", "/pulses", pulse("new", "new-1"))
                nursery.start_soon(ask, "GET /readyz", "GET", "/readyz")
    finally:
        for raw in flood:
            raw.close()

    async def serving() -> bool:
        async with httpx.AsyncClient(timeout=5.0) as http:
            try:
                return (await http.get(f"{server.url}/readyz")).status_code == 200
            except httpx.TransportError:
                return False

    await wait_until(serving, within=15, what="serving again once the flood closed")
    assert server.running, server.tail()
    report(
        f"connections, idle flood: limit {limit} files ({idle_fds} idle), {IDLE_FLOOD} silent"
        f" connections; a new client got {got}"
    )
    assert got["POST /pulses"] in (202, 503), (
        f"with {IDLE_FLOOD} silent connections holding every descriptor, a new client's"
        f" POST /pulses got {got['POST /pulses']} within 10 s (readyz: {got['GET /readyz']})"
    )
    assert got["GET /readyz"] in (200, 503), got
