"""Process resource exhaustion: file descriptors, worker threads, the store's lock.

Real server processes and real sockets; the limits are the kernel's
(`prlimit` on the running child) or a lock the test takes on the store.

1. Connection churn. One client, never more than one connection open, sends
   POST /pulses on a new connection each time and closes it once answered
   (what curl in a loop, a cron job or a client without keep-alive does). The
   server runs with RLIMIT_NOFILE = its idle descriptors + 48. Every request
   must be answered, and once the client has closed its connections the
   server's descriptors must come back. Meanwhile a keep-alive connection
   opened before must keep working (POST, /metrics, /readyz), the server must
   not spin on EMFILE, and every acknowledged pulse is counted once.
2. Worker threads that cannot start (RLIMIT_AS leaves no room for one more
   thread stack, as a cgroup's pids.max or a tight memory limit does) while
   reads hold the existing ones: every request must be answered 2xx or 503
   with Retry-After, and the process must go on serving.
3. The store held by another process (an operator's `BEGIN IMMEDIATE`, a
   sibling worker stuck while holding `writer.lock`) while GET /aggregates
   keep coming: POST /pulses must be answered, 503 `store_busy` or 202,
   within about its busy timeout, however many reads wait.
4. Many clients at once. The server is started with a soft RLIMIT_NOFILE of
   128, as systemd gives a service (1,024) or a shell's `ulimit -n` may, and
   a hard limit far above it. 300 keep-alive connections, each holding on
   after its answer as a client's pool does, must every one be answered.
5. Large bodies at once. Bodies in flight are held from their first byte to
   their answer, and `max_in_flight` bounds their count, not their size:
   with `max_in_flight_bytes` set, a body that would take the bodies in
   flight past it is 503 with Retry-After before it is read, and the others
   are stored.
"""

from __future__ import annotations

import fcntl
import os
import resource
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio

from tests.faults.conftest import QUIET_COMMITTER, Report, StartServer
from tests.support.server import ServerProcess

TENANT = "exhaust"
HEADROOM_FDS = 48  # descriptors the server may open beyond those it holds idle
CHURN = 120  # sequential one-request connections: more than HEADROOM_FDS
ANSWER_S = 2.0  # a request to an idle, local server is answered well within this
STACK = 256 << 20  # each new thread's stack (RLIMIT_STACK at exec): larger than the AS room
AS_ROOM = 48 << 20  # address space left for the allocations of a request
BUSY_S = 1.0  # store_busy_timeout of scenario 3


def pulse(pulse_id: str, amount: int = 1) -> bytes:
    return msgspec.json.encode(
        {
            "tenant_id": TENANT,
            "product_sku": "sku",
            "use_unit": "call",
            "used_amount": amount,
            "id": pulse_id,
        }
    )


# -- the process, seen from /proc ---------------------------------------------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_size(pid: int) -> int:
    """VmSize of process `pid`, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmSize for pid {pid}")


def running_pid(server: ServerProcess) -> int:
    assert server.running, server.tail()
    assert server.pid is not None
    return server.pid


# -- raw HTTP/1.1 --------------------------------------------------------------


Answer = tuple[int, dict[str, str], bytes]


class Connection:
    """One HTTP/1.1 connection, kept open: requests are sent on it one at a time."""

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self.stream = stream
        self.host = host
        self._buffer = b""

    @classmethod
    async def open(cls, server: ServerProcess) -> Connection:
        stream = await trio.open_tcp_stream(server.host, server.port)
        return cls(stream, f"{server.host}:{server.port}")

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def request(self, method: str, path: str, body: bytes = b"") -> Answer:
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        await self.stream.send_all(head.encode() + b"\r\n" + body)
        return await self.answer()

    async def answer(self) -> Answer:
        """The next response on the connection."""
        while b"\r\n\r\n" not in self._buffer:
            await self._receive()
        head_bytes, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
        length = int(headers["content-length"])
        while len(self._buffer) < length:
            await self._receive()
        payload, self._buffer = self._buffer[:length], self._buffer[length:]
        return int(status_line.split()[1]), headers, payload

    async def _receive(self) -> None:
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            raise ConnectionError(f"closed by the server after {self._buffer[:200]!r}")
        self._buffer += chunk


async def once(server: ServerProcess, method: str, path: str, body: bytes = b"") -> Answer | None:
    """One request on a new connection, closed once answered; None if no answer in ANSWER_S."""
    with trio.move_on_after(ANSWER_S):
        connection = await Connection.open(server)
        try:
            return await connection.request(method, path, body)
        finally:
            await connection.aclose()
    return None


def gauge(exposition: bytes, name: str) -> float:
    """The value of the unlabelled series `name` in a /metrics answer."""
    for line in exposition.decode().splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def counted(connection: Connection) -> int:
    status, _, body = await connection.request("GET", f"/aggregates?tenant_id={TENANT}")
    assert status == 200, body
    rows: list[dict[str, Any]] = msgspec.json.decode(body)["aggregates"]
    return sum(int(row["pulse_count"]) for row in rows)


# -- 1. descriptors --------------------------------------------------------------


async def test_connection_churn_of_one_client_never_runs_the_server_out_of_descriptors(
    tmp_path: Path, report: Report
) -> None:
    server = ServerProcess(tmp_path / "data", env={**QUIET_COMMITTER, "INGESTOR_DURABILITY": "os"})
    async with server:
        pid = running_pid(server)
        kept = await Connection.open(server)
        try:
            status, _, _ = await kept.request("GET", "/healthz")
            assert status == 200
            idle_fds = open_fds(pid)
            limit = idle_fds + HEADROOM_FDS
            _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))

            acknowledged = unanswered = 0
            first_unanswered: int | None = None
            for number in range(CHURN):
                answer = await once(server, "POST", "/pulses", pulse(f"churn-{number}"))
                if answer is None:
                    unanswered += 1
                    first_unanswered = number
                    break  # every later one would wait for the same descriptors
                assert answer[0] == 202, answer
                acknowledged += 1
            churn_fds = open_fds(pid)

            # The server now holds what it holds: no connection of the client is open.
            before = cpu_seconds(pid)
            await trio.sleep(1.0)
            idle_cpu = cpu_seconds(pid) - before
            kept_post, _, kept_body = await kept.request("POST", "/pulses", pulse("kept-0"))
            acknowledged += kept_post == 202
            metrics, _, _ = await kept.request("GET", "/metrics")
            ready, _, _ = await kept.request("GET", "/readyz")
            closed_fds = open_fds(pid)
            fresh = await once(server, "POST", "/pulses", pulse("fresh-0"))
            if fresh is None:
                unanswered += 1
            else:
                acknowledged += fresh[0] == 202
            stored = await counted(kept)
        finally:
            await kept.aclose()

    report(
        f"exhaustion, connection churn: {acknowledged} pulses acknowledged, {stored} counted;"
        f" descriptors idle {idle_fds}, limit {limit}, after the churn {churn_fds},"
        f" 1 s after its last connection closed {closed_fds};"
        f" first unanswered connection #{first_unanswered}; server CPU {idle_cpu:.2f} s in 1 s"
    )
    # What holds under the exhaustion.
    assert idle_cpu < 0.5, f"the server spun on EMFILE: {idle_cpu:.2f} s of CPU in 1 s"
    assert (kept_post, metrics, ready) == (202, 200, 200), (kept_post, kept_body, metrics, ready)
    assert acknowledged <= stored <= acknowledged + unanswered, (acknowledged, stored, unanswered)
    # What does not: the client's closed connections are not the server's.
    held = (
        f"the server held {churn_fds} descriptors (limit {limit}, {idle_fds} idle), and"
        f" {closed_fds} one second after the client had closed them all"
    )
    assert first_unanswered is None, (
        f"connection #{first_unanswered} of a client that never had more than one"
        f" connection open got no answer within {ANSWER_S} s: {held}"
    )
    assert fresh is not None, f"a new connection, 1 s later, got no answer either: {held}"
    assert closed_fds <= idle_fds + 4, (
        f"{closed_fds - idle_fds} descriptors of connections the client closed still held"
    )


# -- 2. threads --------------------------------------------------------------------


class BigStacks(ServerProcess):
    """The server with RLIMIT_STACK = STACK at exec: each thread it starts maps STACK."""

    def command(self) -> list[str]:
        command = super().command()
        shim = (
            "import os, resource, sys;"
            f" resource.setrlimit(resource.RLIMIT_STACK, ({STACK},"
            " resource.getrlimit(resource.RLIMIT_STACK)[1]));"
            " os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
        )
        return [command[0], "-c", shim, *command[1:]]


async def test_worker_threads_that_cannot_start_are_503_and_never_end_the_process(
    tmp_path: Path, report: Report
) -> None:
    data = tmp_path / "data"
    server = BigStacks(
        data,
        env={**QUIET_COMMITTER, "INGESTOR_STORE_BUSY_TIMEOUT": "2", "INGESTOR_DURABILITY": "os"},
    )
    answers: list[tuple[str, int | str, str | None, bytes]] = []
    acknowledged = unknown = 0
    async with server:
        pid = running_pid(server)
        async with httpx.AsyncClient(timeout=10.0) as http:
            for number in range(3):
                sent = await http.post(
                    f"{server.url}/pulses",
                    content=pulse(f"before-{number}"),
                    headers={"Content-Type": "application/json"},
                )
                assert sent.status_code == 202, sent.text
                acknowledged += 1
        # No room for one more thread stack; room enough for what a request allocates.
        resource.prlimit(pid, resource.RLIMIT_AS, (vm_size(pid) + AS_ROOM, resource.RLIM_INFINITY))
        lock = os.open(data / "store" / "writer.lock", os.O_RDWR)
        fcntl.flock(lock, fcntl.LOCK_EX)  # the reads below hold their threads ~2 s
        try:
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(timeout=10.0, limits=limits) as http:

                async def call(what: str, method: str, path: str, body: bytes = b"") -> None:
                    nonlocal acknowledged, unknown
                    try:
                        response = await http.request(
                            method,
                            f"{server.url}{path}",
                            content=body,
                            headers={"Content-Type": "application/json"},
                        )
                    except httpx.TransportError as exc:
                        answers.append((what, type(exc).__name__, None, b""))
                        unknown += what == "POST"
                        return
                    acknowledged += what == "POST" and response.status_code == 202
                    answers.append(
                        (
                            what,
                            response.status_code,
                            response.headers.get("Retry-After"),
                            response.content[:160],
                        )
                    )

                async def later(delay: float, *args: Any) -> None:
                    await trio.sleep(delay)
                    await call(*args)

                async with trio.open_nursery() as nursery:
                    for _ in range(12):
                        nursery.start_soon(call, "GET", "GET", f"/aggregates?tenant_id={TENANT}")
                    for number in range(3):
                        nursery.start_soon(
                            later, 0.3, "POST", "POST", "/pulses", pulse(f"during-{number}")
                        )
                    await trio.sleep(3.0)
                    fcntl.flock(lock, fcntl.LOCK_UN)
        finally:
            os.close(lock)
        await trio.sleep(0.3)
        survived = server.running
        exit_code = None if survived else await server.terminate(within=5)  # its exit code
        if survived:
            resource.prlimit(pid, resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)
        else:
            await server.start()  # what was acknowledged must be there
        async with httpx.AsyncClient(timeout=10.0) as http:
            after = await http.post(
                f"{server.url}/pulses",
                content=pulse("after-0"),
                headers={"Content-Type": "application/json"},
            )
            acknowledged += after.status_code == 202
            connection = await Connection.open(server)
            try:
                stored = await counted(connection)
            finally:
                await connection.aclose()
        output = server.output

    wrong = [
        a
        for a in answers
        if not (isinstance(a[1], int) and (200 <= a[1] < 300 or (a[1] == 503 and a[2])))
    ]
    kinds = Counter(f"{what} {status}" for what, status, _, _ in answers)
    fate = "went on serving" if survived else f"EXITED with code {exit_code}"
    cause = output.count("RuntimeError: can't start new thread")
    report(
        f"exhaustion, threads: answers {dict(kinds)}; the process {fate};"
        f" {acknowledged} acknowledged, {stored} counted"
    )
    assert acknowledged <= stored <= acknowledged + unknown, (acknowledged, stored, unknown)
    seen = (
        f"worker threads could not start ({cause} x RuntimeError: can't start new thread"
        f" in the log): the process {fate}; answers {dict(kinds)}, of which {len(wrong)}"
        f" neither 2xx nor 503 with Retry-After, e.g. {wrong[:1]}"
    )
    assert survived, seen
    assert not wrong, seen


# -- 3. the store's lock ------------------------------------------------------------


async def test_reads_waiting_on_a_locked_store_do_not_hold_up_the_answer_to_a_post(
    start_server: StartServer, report: Report
) -> None:
    server = await start_server(INGESTOR_STORE_BUSY_TIMEOUT=str(BUSY_S), INGESTOR_DURABILITY="os")
    hold = 4.5
    reads: list[tuple[int, float]] = []
    posts: list[tuple[int, str | None, float, bytes]] = []
    lock = os.open(server.data_dir / "store" / "writer.lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # another process's turn at the store, not ending
    try:
        async with httpx.AsyncClient(timeout=30.0, limits=httpx.Limits(max_connections=32)) as h:

            async def read(delay: float) -> None:
                await trio.sleep(delay)
                started = time.monotonic()
                response = await h.get(f"{server.url}/aggregates", params={"tenant_id": TENANT})
                reads.append((response.status_code, time.monotonic() - started))

            async def post(delay: float) -> None:
                await trio.sleep(delay)
                started = time.monotonic()
                response = await h.post(
                    f"{server.url}/pulses",
                    content=pulse("convoy-0"),
                    headers={"Content-Type": "application/json"},
                )
                posts.append(
                    (
                        response.status_code,
                        response.headers.get("Retry-After"),
                        time.monotonic() - started,
                        response.content[:160],
                    )
                )

            async with trio.open_nursery() as nursery:
                for number in range(8):  # a dashboard's reads, one after another
                    nursery.start_soon(read, 0.05 * number)
                nursery.start_soon(post, 0.6)
                await trio.sleep(hold)
                fcntl.flock(lock, fcntl.LOCK_UN)
    finally:
        os.close(lock)

    bound = 2 * BUSY_S + 0.5  # the round in progress and its own, each up to the busy timeout
    [(status, retry_after, waited, body)] = posts
    report(
        f"exhaustion, locked store: POST answered {status} after {waited:.2f} s"
        f" (busy timeout {BUSY_S:g} s, lock held {hold:g} s);"
        f" reads {sorted(round(s, 1) for _, s in reads)} s"
    )
    assert all(code == 200 for code, _ in reads), reads
    assert status == 202 or (status == 503 and retry_after), (status, body)
    assert waited <= bound, (
        f"POST /pulses waited {waited:.2f} s for its answer ({status}) with"
        f" store_busy_timeout = {BUSY_S:g} s: it queued behind {len(reads)} reads, each of"
        f" which waits out the busy timeout in turn (read latencies"
        f" {sorted(round(s, 1) for _, s in reads)} s)"
    )


# -- 4. many clients ------------------------------------------------------------------

SOFT_FDS = 128  # the soft RLIMIT_NOFILE the server starts with
CLIENTS = 300  # keep-alive connections open at once: more than SOFT_FDS


class LowSoftLimit(ServerProcess):
    """The server started with a soft RLIMIT_NOFILE of SOFT_FDS, its hard limit kept."""

    def command(self) -> list[str]:
        command = super().command()
        shim = (
            "import os, resource, sys;"
            f" resource.setrlimit(resource.RLIMIT_NOFILE, ({SOFT_FDS},"
            " resource.getrlimit(resource.RLIMIT_NOFILE)[1]));"
            " os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
        )
        return [command[0], "-c", shim, *command[1:]]


async def test_many_keep_alive_clients_are_all_served_whatever_soft_limit_it_started_with(
    tmp_path: Path, report: Report
) -> None:
    """Was: a server started under a soft limit of open files (systemd's 1,024,
    a shell's `ulimit -n`) answered only as many clients as that limit held
    connections; a client past it waited in the accept queue until another
    closed, 75 s for an idle keep-alive one, while the hard limit would have
    held them all. Fix: at start the server raises its soft limit to the hard
    one, as Go's runtime does for every program.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * CLIENTS:
        raise AssertionError(f"this machine's hard limit, {hard}, is too low for the test")
    server = LowSoftLimit(tmp_path / "data", env={**QUIET_COMMITTER, "INGESTOR_DURABILITY": "os"})
    async with server:
        pid = running_pid(server)
        soft, _ = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        connections: list[Connection] = []
        answers: list[int] = []

        async def client(number: int) -> None:
            connection = await Connection.open(server)
            connections.append(connection)
            status, _, _ = await connection.request("POST", "/pulses", pulse(f"many-{number}"))
            answers.append(status)

        try:
            with trio.move_on_after(5 * ANSWER_S):
                async with trio.open_nursery() as nursery:
                    for number in range(CLIENTS):
                        nursery.start_soon(client, number)
            held = open_fds(pid)
            stored = await counted(connections[0]) if answers else 0
        finally:
            for connection in connections:
                await connection.aclose()
    report(
        f"exhaustion, many clients: started with a soft limit of {SOFT_FDS}, running with"
        f" {soft}; {len(answers)} of {CLIENTS} connections answered, {held} descriptors held,"
        f" {stored} pulses counted"
    )
    assert len(answers) == CLIENTS, (
        f"{CLIENTS - len(answers)} of {CLIENTS} clients got no answer within"
        f" {5 * ANSWER_S:g} s: the server ran with a soft limit of {soft} open files"
        f" (hard {hard}) and held {held}"
    )
    assert Counter(answers) == {202: CLIENTS}, Counter(answers)
    assert stored == CLIENTS, (stored, CLIENTS)


# -- 5. large bodies at once ------------------------------------------------------------

BUDGET = 3 * 1024 * 1024  # max_in_flight_bytes
BODY = 1400 * 1024  # two of these fit in BUDGET, three do not


def large_body(prefix: str) -> bytes:
    """A JSON array of pulses with ids, padded by their ids to BODY bytes."""
    pulses = []
    size = 2
    number = 0
    while size < BODY - 400:
        entry = pulse(f"{prefix}-{number}-" + "x" * 100)
        pulses.append(entry)
        size += len(entry) + 1
        number += 1
    return b"[" + b",".join(pulses) + b"]"


async def test_bodies_past_max_in_flight_bytes_are_503_before_they_are_read(
    tmp_path: Path, report: Report
) -> None:
    """Was: `max_in_flight` (1,024) bounded the requests in flight, not their
    bodies (16 MiB each, and their decoded pulses as much again): a few
    hundred large uploads at once took gigabytes, and the process was killed
    for its memory instead of answering 503 (DESIGN §3.6)."""
    env = {
        **QUIET_COMMITTER,
        "INGESTOR_DURABILITY": "os",
        "INGESTOR_MAX_BODY_BYTES": str(2 * 1024 * 1024),
        "INGESTOR_MAX_IN_FLIGHT_BYTES": str(BUDGET),
    }
    server = ServerProcess(tmp_path / "data", env=env)
    bodies = [large_body(f"big{n}") for n in range(3)]
    async with server:
        host = f"{server.host}:{server.port}"
        streams = []
        for body in bodies:
            stream = await trio.open_tcp_stream(server.host, server.port)
            head = (
                f"POST /pulses HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            await stream.send_all(head.encode() + body[:1000])  # held: the rest comes later
            streams.append(stream)
            await trio.sleep(0.2)  # each is taken in turn
        third = Connection(streams[2], host)
        with trio.fail_after(ANSWER_S * 5):
            refused, headers, why = await third.answer()
        scraped = await once(server, "GET", "/metrics")
        assert scraped is not None
        held = gauge(scraped[2], "ingestor_http_request_bytes_in_flight")
        answers = []
        for stream, body in zip(streams[:2], bodies[:2], strict=True):
            await stream.send_all(body[1000:])
            with trio.fail_after(ANSWER_S * 5):
                answers.append((await Connection(stream, host).answer())[0])
        for stream in streams:
            await stream.aclose()
        again = await once(server, "POST", "/pulses", bodies[2])
        scraped = await once(server, "GET", "/metrics")
        assert scraped is not None
        held_after = gauge(scraped[2], "ingestor_http_request_bytes_in_flight")
        kept = await Connection.open(server)
        try:
            stored = await counted(kept)
        finally:
            await kept.aclose()
    per_body = bodies[0].count(b'"id"')
    report(
        f"exhaustion, large bodies: max_in_flight_bytes {BUDGET}, bodies of {len(bodies[0])} bytes:"
        f" the third answered {refused} before it was sent, the first two {answers}, the third"
        f" sent again {again and again[0]}; {stored} pulses counted; bytes in flight"
        f" {held} while two were held, {held_after} after"
    )
    assert refused == 503, (refused, why)
    assert headers.get("retry-after"), headers
    assert b"max_in_flight_bytes" in why, why
    assert answers == [202, 202], answers
    assert again is not None, "the third, sent again alone, got no answer"
    assert again[0] == 202, again
    assert stored == 3 * per_body, (stored, per_body)
    assert held == 2 * len(bodies[0]), held  # their declared lengths, taken before the bodies
    assert held_after == 0, held_after
