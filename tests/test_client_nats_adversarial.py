"""The threaded Python client and the NATS sink, against real servers, where it hurts.

Part one drives `ingestor.client.Client` from plain synchronous code: many
recording threads, close() from two threads, close() after Undelivered,
Ctrl-C, interpreter exit, fork, long 503s, a server killed and started again,
a full buffer. The server is a real `python -m ingestor serve` (run from a
trio loop in a thread of its own, so a test can kill and restart it); where
an answer has to be scripted, a small threaded HTTP endpoint stands in front
of it. Totals are read back from GET /aggregates.

Part two drives the NATS sink: against the shared JetStream server on
127.0.0.1:4222 (tests/sinks/test_nats.py's fixtures), and against
nats-server processes of its own (with a password, or restarted mid-run).
The last test runs the whole service with the NATS sink and compares every
message on the stream with GET /batches/{id}.

A docstring that begins "Was:" tells a defect the test found, since fixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import http.server
import json
import logging
import os
import queue
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import nats.aio.client
import nats.js.errors
import pytest
import trio
from nats.aio.client import Client as NatsClient
from nats.js.api import DiscardPolicy

from ingestor.client import (
    BufferFull,
    Client,
    ClientClosed,
    FlushTimeout,
    Undelivered,
)
from ingestor.errors import SinkRetryable
from ingestor.sinks.nats import NatsSink
from tests.sinks.test_nats import DAY, NATS_URL, Place, nats_server, on_nats, place
from tests.support.fixtures import ABORTED_UPLOAD_WARNINGS
from tests.support.nats import need_nats_server, start_nats_server, stream_messages
from tests.support.server import ServerProcess, free_port

__all__ = ["nats_server", "place"]  # fixtures taken from tests/sinks/test_nats.py

pytestmark = [
    pytest.mark.e2e,
    *(pytest.mark.filterwarnings(rule) for rule in ABORTED_UPLOAD_WARNINGS),
    # Senders cancelled mid-response leave httpcore's body generator unfinished.
    pytest.mark.filterwarnings("ignore:Async generator '(httpcore|httpx)[.]:ResourceWarning"),
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <async_generator object"
        ":pytest.PytestUnraisableExceptionWarning"
    ),
]

ROOT = Path(__file__).resolve().parent.parent
SERVER_ENV = {"INGESTOR_COMMIT_INTERVAL": "3600", "INGESTOR_DURABILITY": "os"}
FAST: dict[str, Any] = {"initial_backoff": 0.01, "max_backoff": 0.05}
NDJSON = "application/x-ndjson"


# -- a real server, run from a trio loop in a thread, that a test can kill and restart ----


class ThreadedServer:
    """A ServerProcess owned by a trio loop in a thread; `call` runs its coroutines there."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self._data_dir = data_dir
        self._env = env
        self._handoff: queue.Queue[tuple[ServerProcess, trio.lowlevel.TrioToken]] = queue.Queue()
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="test-server", daemon=True)

    def __enter__(self) -> ServerProcess:
        self._thread.start()
        while True:
            try:
                self.server, self._token = self._handoff.get(timeout=0.1)
                return self.server
            except queue.Empty:
                if not self._thread.is_alive():
                    raise AssertionError("the test server did not start") from self._errors[0]

    def __exit__(self, *exc: object) -> None:
        self._token.run_sync_soon(self._scope.cancel)
        self._thread.join(timeout=60)
        assert not self._errors, self._errors

    def call(self, function: Callable[[], Any]) -> Any:
        return trio.from_thread.run(function, trio_token=self._token)

    def _run(self) -> None:
        async def serve() -> None:
            async with ServerProcess(self._data_dir, env=self._env) as server:
                with trio.CancelScope() as self._scope:
                    self._handoff.put((server, trio.lowlevel.current_trio_token()))
                    await trio.sleep_forever()

        try:
            trio.run(serve)
        except BaseException as exc:
            self._errors.append(exc)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    threaded = ThreadedServer(tmp_path_factory.mktemp("client-nats") / "data", SERVER_ENV)
    with threaded:
        yield threaded


@pytest.fixture
def server(running: ThreadedServer) -> ServerProcess:
    if not running.server.running:  # a test before this one killed it and failed
        running.call(running.server.start)
    return running.server


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def stored(url: str, tenant: str) -> tuple[Decimal, int]:
    """(used_amount, pulse_count) the server holds for `tenant`, over all its buckets."""
    response = httpx.get(f"{url}/aggregates", params={"tenant_id": tenant, "limit": "10000"})
    assert response.status_code == 200, response.text
    rows = response.json()["aggregates"]
    return (
        sum((Decimal(row["used_amount"]) for row in rows), Decimal(0)),
        sum(row["pulse_count"] for row in rows),
    )


def ids_of(lines: list[bytes]) -> list[str]:
    return [msgspec.json.decode(line)["id"] for line in lines]


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


# -- a scripted HTTP endpoint in front of the real server, for plain threaded tests ------

Scripted = tuple[int, dict[str, str], bytes]


class Front:
    """A threaded HTTP server: request n is answered by `answer(n, body)`, or
    forwarded to `upstream` when that returns None."""

    def __init__(self, upstream: str, answer: Callable[[int, bytes], Scripted | None]) -> None:
        self.bodies: list[bytes] = []
        self.times: list[float] = []
        self._lock = threading.Lock()
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with front._lock:
                    n = len(front.bodies)
                    front.bodies.append(body)
                    front.times.append(time.monotonic())
                reply = answer(n, body)
                if reply is None:
                    forwarded = httpx.post(
                        f"{upstream}/pulses", content=body, headers={"Content-Type": NDJSON}
                    )
                    reply = (
                        forwarded.status_code,
                        {"Content-Type": forwarded.headers["Content-Type"]},
                        forwarded.content,
                    )
                status, headers, payload = reply
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> Front:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def error(status: int, **headers: str) -> Scripted:
    body = json.dumps({"error": {"code": f"e{status}", "message": "scripted"}}).encode()
    return status, {"Content-Type": "application/json", **headers}, body


# -- scripts run in a process of their own (Ctrl-C, interpreter exit, fork) ---------------


def run_script(source: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source), *args],
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# == part one: the threaded client ==========================================================


AMOUNTS = ["0.000000001", "1", "0.1", "999999.999999999", "12.5", "0", "3.000000000", "7e2"]


def test_many_threads_record_exact_amounts_with_unique_ids_and_concurrent_flushes(
    server: ServerProcess, tenant: str
) -> None:
    """Eight threads record, two more flush in a loop meanwhile: every id is new,
    every pulse is counted once, the sum is exact to the nano-unit."""
    client = Client(server.url, max_batch_pulses=97, flush_interval=0.01, concurrency=3)
    returned: list[list[str]] = [[] for _ in range(8)]
    flushes: list[list[Any]] = []
    done = threading.Event()

    def record(n: int) -> None:
        for i in range(300):
            returned[n].append(client.record(tenant, "sku", f"u{n % 3}", AMOUNTS[i % 8]))

    def flush() -> None:
        while not done.is_set():
            flushes.append(client.flush(timeout=20))

    flushers = [threading.Thread(target=flush) for _ in range(2)]
    recorders = [threading.Thread(target=record, args=(n,)) for n in range(8)]
    for thread in flushers + recorders:
        thread.start()
    for thread in recorders:
        thread.join(timeout=30)
    done.set()
    for thread in flushers:
        thread.join(timeout=30)
    assert client.close() == []

    every = [pulse_id for share in returned for pulse_id in share]
    expected = sum(Decimal(AMOUNTS[i % 8]) for i in range(300)) * 8
    assert len(set(every)) == len(every) == 2400
    assert all(failures == [] for failures in flushes)
    assert stored(server.url, tenant) == (expected, 2400)
    stats = client.statistics()
    assert (stats.accepted, stats.duplicates, stats.failed, stats.unsettled) == (2400, 0, 0, 0)


def test_a_second_close_from_another_thread_returns_before_anything_is_delivered() -> None:
    """Was: close() says it returns once everything is settled, or raises
    Undelivered. While one thread is in close() (the server is down), a
    close() from another thread (a shutdown hook, a `with` block's exit)
    returns [] at once with the pulse still unacknowledged: `_closed` is set
    before the first close() has finished, and the second only takes the
    failures. The first later raises Undelivered; the second caller was told
    all was well."""
    client = Client(dead_url(), flush_interval=3600, **FAST)
    client.record("t1", "sku", "u", 1)
    first: list[object] = []

    def close_first() -> None:
        try:
            first.append(client.close(timeout=1.5))
        except Undelivered as exc:
            first.append(exc)

    thread = threading.Thread(target=close_first)
    thread.start()
    time.sleep(0.3)
    try:
        second: object = client.close()
        unsettled_then = client.statistics().unsettled
    except Undelivered as exc:
        second, unsettled_then = exc, 0
    thread.join(timeout=10)
    assert isinstance(first[0], Undelivered)
    # Returning normally is only right once nothing is left unacknowledged.
    assert (second, unsettled_then) != ([], 1), "the second close() returned [] at once"


def test_close_again_after_undelivered_reports_success() -> None:
    """Was: close(timeout=...) raised Undelivered (the server was down); a
    later close() (e.g. the `with` block's exit after the caller handled the
    timeout, or the caller retrying the close) returns [] as if every pulse
    had been acknowledged. It should raise Undelivered again with the same
    lines: the pulses are still not stored. Cause: close() returns
    `take_failures()` whenever `_closed` is set, without looking at what is
    still undelivered."""
    client = Client(dead_url(), flush_interval=3600, **FAST)
    recorded = client.record("t1", "sku", "u", 1)
    with pytest.raises(Undelivered) as first:
        client.close(timeout=0.3)
    assert ids_of(first.value.lines) == [recorded]
    with pytest.raises(Undelivered) as again:
        client.close()
    assert ids_of(again.value.lines) == [recorded]


def test_record_after_close_and_flush_after_close(server: ServerProcess, tenant: str) -> None:
    client = Client(server.url, flush_interval=3600)
    client.record(tenant, "sku", "u", "2.5")
    assert client.close() == []
    with pytest.raises(ClientClosed):
        client.record(tenant, "sku", "u", 1)
    assert client.flush(timeout=5) == []
    assert client.close() == []
    assert stored(server.url, tenant) == (Decimal("2.5"), 1)
    assert client.statistics().recorded == 1


INTERRUPT = """
    import json, signal, sys, threading, time
    from ingestor.client import Client, Undelivered

    def interrupt(times):
        for _ in range(times):
            time.sleep(0.6)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
"""


def test_ctrl_c_in_a_with_block_loses_the_pulses_without_a_word() -> None:
    """Was: a Ctrl-C during flush() in `with Client(...)` makes __exit__ call
    close() with no timeout; with the server down that hangs, so the user
    presses Ctrl-C again. That second KeyboardInterrupt leaves close() after
    it set `_closed` and unregistered the atexit hook, and the sender thread
    is a daemon: the process exits and the unacknowledged pulse is gone with
    no log line at all (neither "not acknowledged" nor the count nor the id).
    Fix: unregister the atexit hook only once close() has finished (and
    re-arm `_closed` on an exception), so the exit hook still reports what is
    lost; or let __exit__ use a bounded timeout when the block raised
    BaseException."""
    result = run_script(
        INTERRUPT
        + """
    threading.Thread(target=interrupt, args=(2,), daemon=True).start()
    with Client(sys.argv[1], flush_interval=3600, initial_backoff=0.05, max_backoff=0.1) as c:
        print("recorded", c.record("t1", "sku", "u", 1), flush=True)
        c.flush()
    """,
        dead_url(),
    )
    assert result.returncode != 0
    pulse_id = result.stdout.split()[1]
    quiet = "\n".join(line for line in result.stderr.splitlines() if "retrying" not in line)
    assert "not acknowledged" in quiet or pulse_id in quiet, quiet[-3000:]


def test_keyboard_interrupt_during_flush_leaves_the_client_consistent() -> None:
    """Ctrl-C while flush() waits: the client's lock is released, its pulse is
    still unsettled, and close(timeout) hands back exactly that line."""
    result = run_script(
        INTERRUPT
        + """
    c = Client(sys.argv[1], flush_interval=3600, initial_backoff=0.05, max_backoff=0.1)
    pulse_id = c.record("t1", "sku", "u", 1)
    threading.Thread(target=interrupt, args=(1,), daemon=True).start()
    try:
        c.flush()
        outcome = "flush returned"
    except KeyboardInterrupt:
        outcome = "interrupted"
    stats = c.statistics()
    try:
        c.close(timeout=0.3)
        lines = []
    except Undelivered as exc:
        lines = [json.loads(line)["id"] for line in exc.lines]
    print(json.dumps([outcome, pulse_id, lines, stats.unsettled]))
    """,
        dead_url(),
    )
    outcome, pulse_id, lines, unsettled = json.loads(result.stdout.splitlines()[-1])
    assert (outcome, lines, unsettled) == ("interrupted", [pulse_id], 1), result.stderr[-2000:]


def test_interpreter_exit_delivers_what_was_never_flushed(
    server: ServerProcess, tenant: str
) -> None:
    result = run_script(
        """
        import sys
        from ingestor.client import Client
        client = Client(sys.argv[1], flush_interval=3600, max_batch_pulses=100)
        for i in range(1000):
            client.record(sys.argv[2], "sku", "u", "0.001")
        """,
        server.url,
        tenant,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert stored(server.url, tenant) == (Decimal("1.000"), 1000)


def test_interpreter_exit_with_the_server_down_says_how_many_were_lost() -> None:
    result = run_script(
        """
        import sys
        import ingestor.client
        ingestor.client._EXIT_TIMEOUT = 0.5
        client = ingestor.client.Client(sys.argv[1], flush_interval=3600,
                                        initial_backoff=0.05, max_backoff=0.1)
        for i in range(3):
            client.record("t1", "sku", "u", 1)
        """,
        dead_url(),
    )
    assert result.returncode == 0
    assert "3 pulses were not acknowledged" in result.stderr
    # ... and which: their lines, to send again.
    assert result.stderr.count('"tenant_id":"t1"') == 3, result.stderr[-2000:]


def test_fork_in_sync_mode_child_exits_cleanly_and_counts_once(
    server: ServerProcess, tenant: str
) -> None:
    """The parent's Client has a pulse waiting at the fork. In the child it
    refuses pulses, its flush() returns, a Client made there works with ids
    of its own, and the child's normal exit (atexit) neither hangs nor sends
    the parent's pulse; the parent's is delivered once, by the parent."""
    result = run_script(
        """
        import json, os, sys
        from ingestor.client import Client, ClientClosed
        url, tenant = sys.argv[1], sys.argv[2]
        parent_client = Client(url, flush_interval=3600)
        parent_id = parent_client.record(tenant, "sku", "u", 1)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            try:
                parent_client.record(tenant, "sku", "u", 100)
                refused = False
            except ClientClosed:
                refused = True
            flushed = parent_client.flush(timeout=5)
            child_client = Client(url, flush_interval=3600)
            child_id = child_client.record(tenant, "sku", "u", 5)
            child_failures = child_client.flush(timeout=10)
            os.write(write_end, json.dumps([refused, flushed, child_id, child_failures]).encode())
            os.close(write_end)
            sys.exit(0)  # atexit runs: both clients are closed there
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            child = json.loads(pipe.read())
        _, status = os.waitpid(pid, 0)
        print(json.dumps([parent_id, child, os.waitstatus_to_exitcode(status),
                          parent_client.close()]))
        """,
        server.url,
        tenant,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    parent_id, child, child_code, closed = json.loads(result.stdout.splitlines()[-1])
    refused, flushed, child_id, child_failures = child
    assert (refused, flushed, child_failures, child_code, closed) == (True, [], [], 0, [])
    assert child_id.split("-")[0] != parent_id.split("-")[0]
    assert stored(server.url, tenant) == (Decimal(6), 2)


def test_a_long_run_of_503_retry_after_is_honoured_then_counted_once(
    server: ServerProcess, tenant: str
) -> None:
    """503 Retry-After: 1 for the first three requests: flush(timeout) says
    what is unsettled and loses nothing; the retries keep their distance;
    then every pulse is stored once."""

    def answer(n: int, body: bytes) -> Scripted | None:
        return error(503, **{"Retry-After": "1"}) if n < 3 else None

    with Front(server.url, answer) as front:
        client = Client(front.url, flush_interval=3600, concurrency=1, **FAST)
        for _ in range(50):
            client.record(tenant, "sku", "u", "0.02")
        with pytest.raises(FlushTimeout) as timed_out:
            client.flush(timeout=0.5)
        assert timed_out.value.unsettled == 50
        assert client.flush(timeout=15) == []
        assert client.close() == []
    gaps = [later - earlier for earlier, later in zip(front.times, front.times[1:], strict=False)]
    assert len(front.bodies) == 4
    assert all(gap >= 0.95 for gap in gaps[:3]), gaps
    assert stored(server.url, tenant) == (Decimal(1), 50)


def test_the_server_killed_and_restarted_while_threads_record(
    running: ThreadedServer, server: ServerProcess, tenant: str
) -> None:
    """SIGKILL mid-stream (requests in flight, answers lost), then a restart on
    the same port: each pulse is counted exactly once and none is lost."""
    client = Client(server.url, max_batch_pulses=50, flush_interval=0.005, timeout=5, **FAST)
    returned: list[list[str]] = [[] for _ in range(4)]
    halfway = threading.Event()

    def record(n: int) -> None:
        for i in range(400):
            returned[n].append(client.record(tenant, "sku", f"u{n}", "0.001"))
            if i == 200:
                halfway.set()
            if i % 50 == 0:
                time.sleep(0.01)

    threads = [threading.Thread(target=record, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    assert halfway.wait(10)
    running.call(server.kill)
    time.sleep(0.3)
    running.call(server.start)
    for thread in threads:
        thread.join(timeout=30)
    assert client.close(timeout=30) == []
    every = [pulse_id for share in returned for pulse_id in share]
    stats = client.statistics()
    assert len(set(every)) == len(every) == 1600
    assert stats.accepted + stats.duplicates == 1600
    assert stored(server.url, tenant) == (Decimal("1.600"), 1600)


def test_a_batch_refused_400_fails_exactly_its_own_pulses(
    server: ServerProcess, tenant: str
) -> None:
    def answer(n: int, body: bytes) -> Scripted | None:
        return error(400) if n == 0 else None

    with Front(server.url, answer) as front:
        client = Client(front.url, max_batch_pulses=10, flush_interval=3600, concurrency=1)
        ids = [client.record(tenant, "sku", "u", 1) for _ in range(30)]
        failures = client.flush(timeout=10)
        client.close()
    assert [f.id for f in failures] == ids[:10]
    assert {(f.status, f.http_status) for f in failures} == {("refused", 400)}
    assert [f.line for f in failures] == front.bodies[0].splitlines(keepends=True)
    assert stored(server.url, tenant) == (Decimal(20), 20)


def test_partial_rejection_reports_each_pulse_and_stores_the_rest(
    server: ServerProcess, tenant: str
) -> None:
    client = Client(server.url, flush_interval=3600)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
    client.record(tenant, "sku", "u", 1, id="same", timestamp=dt.datetime.now(dt.UTC))
    assert client.flush(timeout=10) == []
    good = [client.record(tenant, "sku", "u", 2) for _ in range(3)]
    too_old = client.record(tenant, "sku", "u", 4, timestamp=old)
    client.record(tenant, "sku", "u", 8, id="same", timestamp=dt.datetime.now(dt.UTC))
    failures = client.close()
    assert sorted((f.status, f.id) for f in failures) == [
        ("conflict", "same"),
        ("rejected", too_old),
    ]
    [rejected] = [f for f in failures if f.status == "rejected"]
    assert (rejected.pulse()["id"], rejected.http_status) == (too_old, 202)
    assert len(set(good)) == 3
    assert stored(server.url, tenant) == (Decimal(7), 4)


def test_a_full_buffer_bounds_memory_and_every_id_is_delivered_or_handed_back() -> None:
    """Server down, `max_buffered` 64: blocked recorders are released by close(),
    `raise` mode raises BufferFull, and Undelivered holds exactly the ids
    record() returned, no more, no fewer."""
    client = Client(dead_url(), max_buffered=64, flush_interval=0.01, **FAST)
    returned: list[list[str]] = [[] for _ in range(4)]
    endings: list[str] = []

    def record(n: int) -> None:
        try:
            while True:
                returned[n].append(client.record("t1", "sku", "u", 1))
        except ClientClosed:
            endings.append("closed")

    threads = [threading.Thread(target=record, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    assert client.statistics().unsettled == 64
    with pytest.raises(Undelivered) as undelivered:
        client.close(timeout=0.3)
    for thread in threads:
        thread.join(timeout=10)
    every = [pulse_id for share in returned for pulse_id in share]
    assert endings == ["closed"] * 4
    assert sorted(ids_of(undelivered.value.lines)) == sorted(every)
    assert len(every) == 64

    raising = Client(dead_url(), max_buffered=3, when_full="raise", **FAST)
    for _ in range(3):
        raising.record("t1", "sku", "u", 1)
    with pytest.raises(BufferFull):
        raising.record("t1", "sku", "u", 1)
    with pytest.raises(Undelivered) as left:
        raising.close(timeout=0.2)
    assert len(left.value.lines) == 3


def test_an_out_of_range_timestamp_raises_value_error_as_documented() -> None:
    """Was: "Invalid arguments to record() raise TypeError or ValueError there."
    A timestamp whose conversion to UTC leaves datetime's range (year 1 with a
    positive offset, year 9999 with a negative one) raises OverflowError from
    `_timestamp`'s `astimezone(dt.UTC)`, which a caller catching ValueError
    does not expect. Fix: catch OverflowError there and raise ValueError."""
    client = Client(dead_url(), flush_interval=3600)
    try:
        for value in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
            with pytest.raises(ValueError, match="timestamp"):
                client.record("t1", "sku", "u", 1, timestamp=value)
    finally:
        assert client.close() == []


# == part two: the NATS sink ================================================================


class NatsProcess:
    """A nats-server with JetStream of our own, on a free port, restartable on its store."""

    def __init__(self, store: Path, *extra: str) -> None:
        self.port = free_port()
        self.store = store
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        command = ["nats-server", "-a", "127.0.0.1", "-p", str(self.port), "-js"]
        command += ["-sd", str(self.store), *self.extra]
        self.process = start_nats_server(command, self.port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[Callable[..., NatsProcess]]:
    need_nats_server()
    started: list[NatsProcess] = []

    def start(*extra: str) -> NatsProcess:
        process = NatsProcess(tmp_path / f"nats{len(started)}", *extra)
        process.start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


async def test_credentials_never_reach_errors_or_logs(
    own_nats: Callable[..., NatsProcess], caplog: pytest.LogCaptureFixture
) -> None:
    """Wrong password, a token, several URLs with credentials, the right one:
    no secret in any error, log line or the sink's shown URL."""
    caplog.set_level(logging.DEBUG)
    server = own_nats("--user", "alice", "--pass", "Corr3ctHorse")
    secrets = ["Wr0ngBattery", "T0kenStaple42", "Corr3ctHorse"]
    dead = f"127.0.0.1:{free_port()}"
    urls = [
        f"nats://alice:Wr0ngBattery@{server.address}",
        f"nats://T0kenStaple42@{server.address}",
        f"nats://alice:Corr3ctHorse@{dead}, nats://alice:Corr3ctHorse@{server.address}",
    ]
    errors: list[str] = []
    for url in urls:
        sink = NatsSink(url, stream="CREDS", subject="creds.{date}", timeout=1.5)
        try:
            await sink.deliver("b-1", DAY, b"one")
        except SinkRetryable as exc:
            errors.append(f"{exc} {exc.__cause__!r} {sink.url}")
        else:
            errors.append(f"delivered {sink.url}")
        finally:
            await sink.aclose()
    assert len(errors) == 3, errors
    assert errors[2].startswith("delivered"), errors
    assert errors[0].startswith(f"connecting to nats://{server.address}: timed out"), errors
    text = "\n".join(errors) + caplog.text
    assert [secret for secret in secrets if secret in text] == []
    assert [
        m[1] for m in await stream_messages(f"nats://alice:Corr3ctHorse@{server.address}", "CREDS")
    ] == [b"one"]


async def test_a_hung_first_server_keeps_the_sink_from_reaching_a_healthy_second(
    nats_server: str, place: Place, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: with `sink = "nats://hung:4222,nats://good:4222"` and the first
    server accepting TCP but never answering (a wedged process, a half-open
    host), no delivery ever connects when nats-py tries the hung one first:
    `_connect` passes connect_timeout=ceil(sink timeout), which is the whole
    budget `publish` allows (asyncio.timeout(sink timeout)), so the attempt
    ends before the second server is tried. nats-py shuffles the list, so in
    production it fails at random (half the time with two servers, most of
    the time with several hung ones). Here the list is kept in order.
    Fix: give each server a share of the timeout (timeout / len(servers)),
    or try servers one by one within the budget."""
    monkeypatch.setattr(nats.aio.client, "shuffle", lambda pool: None)
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    try:
        url = f"nats://127.0.0.1:{hung.getsockname()[1]},{nats_server}"
        sink = NatsSink(url, stream=place.stream, subject=place.template, timeout=2)
        try:
            await sink.deliver("b-1", DAY, b"one")
        finally:
            await sink.aclose()
    finally:
        hung.close()
    assert [m.data for m in await place.messages()] == [b"one"]


async def test_a_restarted_server_keeps_deduplicating_and_takes_each_batch_once(
    own_nats: Callable[..., NatsProcess],
) -> None:
    """The server stops under a connected sink, a publish times out meanwhile
    (nats-py keeps it buffered), the server comes back on its store: the
    buffered copy, the sink's resend and a resend of a batch stored before the
    restart all land once."""
    server = own_nats()
    url = f"nats://{server.address}"
    sink = NatsSink(url, stream="RESTART", subject="restart.{date}", timeout=1.5)
    try:
        await sink.deliver("b-1", DAY, b"one")
        await trio.to_thread.run_sync(server.stop)
        with pytest.raises(SinkRetryable):
            await sink.deliver("b-2", DAY, b"two")
        await trio.to_thread.run_sync(server.start)
        for batch_id, body in [("b-2", b"two"), ("b-1", b"one"), ("b-3", b"three")]:
            for attempt in range(10):
                try:
                    await sink.deliver(batch_id, DAY, body)
                    break
                except SinkRetryable:
                    assert attempt < 9
                    await trio.sleep(0.3)
    finally:
        await sink.aclose()
    found = await stream_messages(url, "RESTART")
    assert sorted((msg_id, data) for _, data, msg_id in found) == [
        ("b-1", b"one"),
        ("b-2", b"two"),
        ("b-3", b"three"),
    ]


async def _cut_after_publish(cut: dict[str, bool], client: trio.SocketStream) -> None:
    """Forward to NATS; on the first connection, drop everything the server sends
    after the sink's first HPUB (its ack) and then close the connection."""
    first = not cut.get("used")
    cut["used"] = True
    async with client, await trio.open_tcp_stream("127.0.0.1", 4222) as server:
        seen = trio.Event()

        async def up(nursery: trio.Nursery) -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                async for chunk in client:
                    publish = first and b"HPUB " in chunk
                    if publish:
                        # Set before the send: once sent, the ack may come back
                        # (and be forwarded) before this task runs again.
                        seen.set()
                    await server.send_all(chunk)
                    if publish:
                        await trio.sleep(0.3)  # stored by now; its ack is dropped below
                        break
            nursery.cancel_scope.cancel()

        async def down(nursery: trio.Nursery) -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                async for chunk in server:
                    if not seen.is_set():
                        await client.send_all(chunk)
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(up, nursery)
            nursery.start_soon(down, nursery)


async def test_a_lost_ack_is_resent_and_deduplicated(nats_server: str, place: Place) -> None:
    port = free_port()
    cut: dict[str, bool] = {}
    async with trio.open_nursery() as proxy:
        await proxy.start(
            partial(trio.serve_tcp, partial(_cut_after_publish, cut), port, host="127.0.0.1")
        )
        sink = NatsSink(
            f"nats://127.0.0.1:{port}", stream=place.stream, subject=place.template, timeout=2
        )
        try:
            with pytest.raises(SinkRetryable):
                await sink.deliver("b-1", DAY, b"one")
            assert [m.data for m in await place.messages()] == [b"one"]  # stored, ack lost
            with trio.fail_after(10):
                while True:
                    try:
                        await sink.deliver("b-1", DAY, b"one")
                        break
                    except SinkRetryable:
                        await trio.sleep(0.2)
            await sink.deliver("b-2", DAY, b"two")
        finally:
            await sink.aclose()
        proxy.cancel_scope.cancel()
    found = await place.messages()
    assert [(m.headers or {}).get("Nats-Msg-Id") for m in found] == ["b-1", "b-2"]
    assert [m.data for m in found] == [b"one", b"two"]


async def test_a_full_stream_with_discard_new_is_retried_not_delivered(
    sink_on_place: NatsSink, place: Place
) -> None:
    await place.create(
        place.stream, subjects=[f"{place.prefix}.>"], max_msgs=1, discard=DiscardPolicy.NEW
    )
    await sink_on_place.deliver("b-1", DAY, b"one")
    with pytest.raises(SinkRetryable, match="maximum messages"):
        await sink_on_place.deliver("b-2", DAY, b"two")
    await sink_on_place.deliver("b-1", DAY, b"one")  # a resend is still a duplicate
    assert [m.data for m in await place.messages()] == [b"one"]


async def test_a_stream_with_a_short_duplicate_window_stores_a_resend_twice(
    sink_on_place: NatsSink, place: Place
) -> None:
    """Was: an existing stream is used as it is, even when its duplicate window
    is far shorter than the time a resend can take (the deliverer backs off
    up to retry_max, 5 minutes by default, and a lost ack is only noticed on
    the next attempt; NATS's own default window is 2 minutes). The sink only
    logs at INFO and goes on, so a batch whose ack was lost is stored twice:
    exactly-once on the stream is broken. Fix: raise the stream's
    duplicate_window to DUPLICATE_WINDOW with an update (no other setting is
    touched), or refuse the stream (SinkRejected) with a message saying why."""
    await place.create(place.stream, subjects=[f"{place.prefix}.>"], duplicate_window=1)
    await sink_on_place.deliver("b-1", DAY, b"one")
    await trio.sleep(1.6)  # a resend after the window, as after a lost ack and a backoff
    await sink_on_place.deliver("b-1", DAY, b"one")
    assert [m.data for m in await place.messages()] == [b"one"]


@pytest.fixture
async def sink_on_place(place: Place) -> Any:
    sink = NatsSink(NATS_URL, stream=place.stream, subject=place.template, timeout=5)
    yield sink
    await sink.aclose()


async def test_slow_core_subscriber_does_not_hold_up_deliveries(
    sink_on_place: NatsSink, place: Place
) -> None:
    """A core NATS subscriber on the batches' subjects that never reads: the
    JetStream acks do not wait for it."""

    async def never_done(msg: Any) -> None:
        await asyncio.sleep(3600)

    async def stall(client: NatsClient) -> None:
        await client.subscribe(f"{place.prefix}.>", cb=never_done, pending_msgs_limit=1)
        await client.flush()
        await asyncio.sleep(3)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_nats, stall)
        await trio.sleep(0.3)
        with trio.fail_after(2.5):
            for n in range(20):
                await sink_on_place.deliver(f"b-{n}", DAY, b"x" * 1000)
    assert len(await place.messages()) == 20


async def test_every_committed_batch_is_on_the_stream_once_as_get_batches_shows_it(
    nats_server: str, place: Place, tmp_path: Path
) -> None:
    """The whole service with the NATS sink: pulses for two past days over
    several tenants, each day committed (twice), the server restarted: each
    batch is on the stream once, under its id and day's subject, and its
    body is the batch GET /batches/{id} shows."""
    env = {
        **SERVER_ENV,
        "INGESTOR_SINK": nats_server,
        "INGESTOR_NATS_STREAM": place.stream,
        "INGESTOR_NATS_SUBJECT": place.template,
        "INGESTOR_PARTITIONS": "4",
    }
    today = dt.datetime.now(dt.UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    days = [today - dt.timedelta(days=2), today - dt.timedelta(days=1)]
    lines = [
        json.dumps(
            {
                "tenant_id": f"t{n % 7}",
                "product_sku": "sku",
                "use_unit": f"u{n % 3}",
                "used_amount": f"{n}.000000001",
                "timestamp": days[n % 2].isoformat(),
                "id": f"p{n}",
            }
        )
        for n in range(200)
    ]
    async with ServerProcess(tmp_path / "data", env=env) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            posted = await http.post(
                "/pulses", content="\n".join(lines), headers={"Content-Type": NDJSON}
            )
            assert (posted.status_code, posted.json()["accepted"]) == (202, 200)
            batch_ids: list[str] = []
            for day in days:
                for _ in range(2):
                    committed = await http.post(
                        "/aggregates/commit", json={"date": day.date().isoformat()}
                    )
                    assert committed.status_code == 200, committed.text
                    batch_ids += [b["batch_id"] for b in committed.json()["batches"]]
            assert len(batch_ids) == len(set(batch_ids)) > 2

            async def views() -> dict[str, dict[str, Any]]:
                found = {}
                for batch_id in batch_ids:
                    response = await http.get(f"/batches/{batch_id}")
                    assert response.status_code == 200, response.text
                    found[batch_id] = response.json()
                return found

            with trio.fail_after(20):
                while any(v["status"] != "delivered" for v in (await views()).values()):  # noqa: ASYNC110
                    await trio.sleep(0.1)
        await server.restart()
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            await trio.sleep(0.5)
            shown = await views()
    found = await place.messages()
    assert sorted((m.headers or {}).get("Nats-Msg-Id") for m in found) == sorted(batch_ids)
    state = {"status", "attempts", "last_error", "next_attempt_at", "delivered_at"}
    total = Decimal(0)
    for message in found:
        body = json.loads(message.data or b"")
        view = shown[body["batch_id"]]
        assert message.subject == f"{place.prefix}.{view['date']}"
        assert body == {k: v for k, v in view.items() if k not in state}
        total += sum(Decimal(r["used_amount"]) for r in body["records"])
    assert total == sum(Decimal(f"{n}.000000001") for n in range(200))
