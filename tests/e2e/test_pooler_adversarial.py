"""Instances that reach PostgreSQL through PgBouncer (DESIGN §3; README, "More than one
process or machine").

Production deployments often put a connection pooler between the instances
and PostgreSQL. Each test here starts a PgBouncer of its own (a child
process in the foreground, on a free port of 127.0.0.1, its ini and auth
file in a directory of its own) in front of a database of its own on the
local PostgreSQL, and real `python -m ingestor serve` processes whose
`store` is PgBouncer's address.

1. pool_mode = session, three instances under load with late pulses, the
   periodic committer and commits from clients: the leader is SIGKILLed and
   another takes over; PgBouncer itself is restarted mid-load, and later
   drops every connection to the database (`KILL` on its console) and holds
   new ones back for a second (`RESUME`). Only 202, 503 + Retry-After or 500
   outcome_unknown meanwhile, the instances recover by themselves, exactly
   one leads, every acknowledged pulse is counted once and every bucket's
   batches add up to its total.
2. pool_mode = session with fewer server connections (default_pool_size) or
   client slots (max_client_conn) than the instances want: requests are
   answered (202 or 503 + Retry-After), never left waiting; an instance
   started while every server connection is taken is ready, or exits with
   one line, within a bounded time; SIGTERM stops an instance within its
   graceful timeout; nothing acknowledged is lost or counted twice.
3. pool_mode = transaction: a session's state (prepared statements, the
   committer's session-level advisory lock, `set_config(..., false)`
   settings) stays on whichever server connection ran the statement, and the
   next statement may run on another. Either the instances refuse to start,
   with a message that names the pooling mode, or they work: no failures on
   a healthy database, exactly one leader; and whatever happens, exact totals
   and every unit of usage in exactly one batch.
4. pool_mode = statement: no transactions at all; refused at start, clearly.

Instances that cannot be served a connection in time answer 503; "in time"
here is the store's busy timeout, 1 s. An answer that takes `HANG` seconds
is a hang. An instance connected straight to the database (the "auditor")
reads the store where the pooled ones may not be able to.

PgBouncer is Debian's `pgbouncer` (1.18). As root it runs as the `postgres`
user (`-u postgres`; it refuses to run as root), its files in a directory that
user owns. Without it the tests skip, or fail under the CI variable.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import random
import re
import shutil
import signal
import subprocess
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
import trio

from ingestor.store.postgres import PostgresStore
from tests.e2e.cluster_support import (
    Cluster,
    fresh_database,
    require_postgres,
    unavailable,
)
from tests.e2e.conftest import ABORTED_UPLOADS
from tests.e2e.test_cluster import (
    all_committed,
    batches_with_records,
    check_outbox,
    day_before,
    leaders,
    new_pulse,
    post_late_wave,
    sole_leader,
)
from tests.e2e.test_postgres_operations import resend_until_stored
from tests.support.server import (
    Form,
    Ledger,
    ServerError,
    ServerProcess,
    check_pulses_stored_once,
    collect_pages,
    free_port,
    send_pulses,
    totals_of,
    wait_until,
)

pytestmark = [pytest.mark.e2e, *ABORTED_UPLOADS]

BUSY = 1.0  # store_busy_timeout of the instances, seconds
# How long an answer may take before the test calls it a hang: a request
# waits at most a busy timeout for a pooled connection and about three for a
# database that stopped answering (README), far less than this.
HANG = 20.0
LEADING = {
    "INGESTOR_COMMIT_INTERVAL": "1",
    "INGESTOR_COMMIT_GRACE": "1",
    "INGESTOR_STORE_BUSY_TIMEOUT": str(BUSY),
}
# What an instance that cannot work through a pooler in this mode should say.
NAMES_THE_MODE = {
    "transaction": re.compile(r"(?i)transaction.{0,20}pool|pgbouncer"),
    "statement": re.compile(r"(?i)statement.{0,20}pool|pgbouncer"),
}


# -- PgBouncer ------------------------------------------------------------------------


def _pgbouncer_binary() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    for path in ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer", "/usr/local/bin/pgbouncer"):
        if os.access(path, os.X_OK):
            return path
    return None


class PgBouncer:
    """One PgBouncer process in front of one database of the local PostgreSQL.

    `settings` are extra keys of its [pgbouncer] section. `start` returns once
    it accepts connections; `stop` ends it (SIGTERM: its immediate shutdown)
    and waits for it; `admin` runs a command on its console.
    """

    def __init__(self, database_url: str, mode: str, **settings: object) -> None:
        binary = _pgbouncer_binary()
        if binary is None:
            unavailable(
                "pgbouncer is not installed (Debian: apt-get install -y pgbouncer);"
                " the pooler tests need it"
            )
        assert binary is not None
        self.binary = binary
        parts = urlsplit(database_url)
        self.database = parts.path.lstrip("/")
        self.user = parts.username or "postgres"
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.mode = mode
        self.settings = settings
        self.port = free_port()
        self.prefix: list[str] = []
        self.root = Path(tempfile.mkdtemp(prefix="ingestor-pgbouncer-"))
        if os.geteuid() == 0:
            # "PgBouncer should not run as root": it drops to this user, and
            # reads its files (again on a reload) as that user.
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.root, ignore_errors=True)
                unavailable("running as root and there is no postgres user to run PgBouncer as")
            self.prefix = ["-u", "postgres"]
        self.log_path = self.root / "pgbouncer.log"
        self._process: trio.Process | None = None
        self._write_config()

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    @property
    def admin_url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/pgbouncer"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no pgbouncer log)"
        return "\n".join(text.splitlines()[-lines:])

    def _write_config(self) -> None:
        host, port = self.upstream
        users = self.root / "users.txt"
        users.write_text(f'"{self.user}" ""\n')
        lines = [
            "[databases]",
            f"{self.database} = host={host} port={port} dbname={self.database}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {users}",
            f"admin_users = {self.user}",
            f"pool_mode = {self.mode}",
            "logfile =",
            "pidfile =",
            *(f"{key} = {value}" for key, value in self.settings.items()),
        ]
        (self.root / "pgbouncer.ini").write_text("\n".join(lines) + "\n")
        if self.prefix:
            for path in (self.root, *self.root.iterdir()):
                shutil.chown(path, "postgres")

    async def start(self) -> None:
        assert not self.running
        with open(self.log_path, "ab") as log:  # noqa: ASYNC230 - a local file, at once
            self._process = await trio.lowlevel.open_process(
                [self.binary, *self.prefix, str(self.root / "pgbouncer.ini")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = trio.current_time() + 10
        while True:
            if self._process.poll() is not None:
                raise AssertionError(f"pgbouncer exited at start:\n{self.log()}")
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            except OSError:
                if trio.current_time() > deadline:
                    raise AssertionError(
                        f"pgbouncer not listening after 10 s:\n{self.log()}"
                    ) from None
                await trio.sleep(0.02)
            else:
                await stream.aclose()
                return

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        with trio.move_on_after(10):
            await process.wait()
            return
        process.kill()
        await process.wait()
        raise AssertionError(f"pgbouncer still running 10 s after signal {sig}:\n{self.log()}")

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def admin(self, command: str) -> list[tuple[Any, ...]]:
        """A command on PgBouncer's console (simple query protocol: no parameters)."""
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
            cursor = conn.execute(command.encode())
            return cursor.fetchall() if cursor.description else []

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                if self.running:
                    assert self._process is not None
                    self._process.kill()
                if self._process is not None:
                    await self._process.wait()
            finally:
                shutil.rmtree(self.root, ignore_errors=True)


@contextlib.asynccontextmanager
async def pgbouncer(database_url: str, mode: str, **settings: object) -> AsyncIterator[PgBouncer]:
    bouncer = PgBouncer(database_url, mode, **settings)
    try:
        await bouncer.start()
        yield bouncer
    finally:
        await bouncer.aclose()


@pytest.fixture
def database() -> Iterator[str]:
    """A database of the test's own on the local PostgreSQL, dropped afterwards
    (with the sessions PgBouncer still holds on it)."""
    with fresh_database(require_postgres()) as url:
        yield url


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=HANG) as client:
        yield client


# -- load and its answers -------------------------------------------------------------


@dataclass
class Reply:
    """One answer as these tests judge it."""

    server: str
    what: str  # "pulses" or "commit"
    status: int | None  # None: no answer
    code: str | None
    retry_after: str | None
    detail: str

    def describe(self) -> str:
        return (
            f"{self.what} on {self.server}: {self.status} {self.code}"
            f" Retry-After={self.retry_after} {self.detail[:200]}"
        )


def reply_of(
    server: ServerProcess, what: str, response: httpx.Response | None, error: str
) -> Reply:
    if response is None:
        return Reply(server.data_dir.name, what, None, None, None, error)
    code, detail = None, ""
    if response.status_code >= 400:
        try:
            body = response.json()["error"]
            code, detail = body["code"], body["message"]
        except (ValueError, KeyError, TypeError):
            detail = response.text[:300]
    return Reply(
        server.data_dir.name,
        what,
        response.status_code,
        code,
        response.headers.get("retry-after"),
        detail,
    )


def wrong_replies(replies: Sequence[Reply], *, cut_off: Sequence[str] = ()) -> list[str]:
    """Answers other than success, 503 + Retry-After or 500 outcome_unknown; no
    answer at all only from an instance in `cut_off` (killed)."""
    wrong = []
    for reply in replies:
        ok = 202 if reply.what == "pulses" else 200
        if reply.status == ok:
            continue
        if reply.status == 503 and reply.retry_after:
            continue
        if reply.status == 500 and reply.code == "outcome_unknown":
            continue
        if reply.status is None and reply.server in cut_off:
            continue
        wrong.append(reply.describe())
    return wrong


@dataclass
class Traffic:
    """Clients posting id-bearing pulses of `days` to `targets` in turn, and
    committing the first day now and then, recording every answer."""

    ledger: Ledger
    targets: list[ServerProcess]
    days: Sequence[str]
    tag: str = "p"
    replies: list[Reply] = field(default_factory=list)
    stop: trio.Event = field(default_factory=trio.Event)
    turn: int = 0

    def accepted(self) -> int:
        return sum(1 for a in self.ledger.attempts if a.answer == "accepted")

    def target(self) -> ServerProcess:
        self.turn += 1
        return self.targets[self.turn % len(self.targets)]

    async def client(self, number: int) -> None:
        rng = random.Random(number)
        ids = (f"{self.tag}{number}-{n}" for n in itertools.count())
        forms: tuple[Form, ...] = ("array", "ndjson")
        async with httpx.AsyncClient(timeout=HANG) as http:
            while not self.stop.is_set():
                server = self.target()
                payloads = [
                    new_pulse(rng, next(ids), rng.choice(self.days))
                    for _ in range(rng.randint(1, 20))
                ]
                sent = await send_pulses(http, server.url, self.ledger, payloads, rng.choice(forms))
                self.replies.append(reply_of(server, "pulses", sent.response, sent.error or ""))
                if sent.response is None or sent.response.status_code != 202:
                    await trio.sleep(0.05)

    async def committer(self) -> None:
        """POST /aggregates/commit of the first day, racing the periodic committer."""
        async with httpx.AsyncClient(timeout=HANG) as http:
            while not self.stop.is_set():
                server = self.target()
                try:
                    response = await http.post(
                        f"{server.url}/aggregates/commit", json={"date": self.days[0]}
                    )
                except httpx.TransportError as exc:
                    self.replies.append(reply_of(server, "commit", None, repr(exc)))
                else:
                    self.replies.append(reply_of(server, "commit", response, ""))
                await trio.sleep(0.3)

    async def flowing(self, more: int, within: float, what: str) -> None:
        floor = self.accepted() + more

        async def enough() -> bool:
            return self.accepted() >= floor

        await wait_until(enough, within=within, what=what, interval=0.02)


async def check_promises(
    http: httpx.AsyncClient, servers: Sequence[ServerProcess], ledger: Ledger, days: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """After every pulse was sent until stored and every day committed: the
    answers agree with each other, every instance shows exactly the totals
    the answers imply, each id is stored once, and each bucket's batches add
    up to its total. Returns the outbox."""
    assert ledger.problems() == []
    assert ledger.unresolved() == [], "pulses whose fate is unknown after the resends"
    expected = ledger.expected_totals()
    for server in servers:
        rows = await collect_pages(http, f"{server.url}/aggregates", "aggregates", limit=1000)
        assert totals_of(rows) == expected, (
            f"totals on {server.data_dir.name}: acknowledged pulses lost or counted twice"
        )
    await check_pulses_stored_once(http, servers[0], ledger)
    outbox = await batches_with_records(http, servers[-1], days)
    assert check_outbox(outbox, expected) == []
    return outbox


@contextlib.asynccontextmanager
async def instances(root: Path, size: int, env: dict[str, str]) -> AsyncIterator[Cluster]:
    """A `Cluster` not yet started: killed at the end, its output checked for tracebacks."""
    cluster = Cluster(root, size, env)
    try:
        yield cluster
    finally:
        await cluster.aclose()
    for server in cluster:
        assert "Traceback" not in server.output, (
            f"{server.data_dir.name} logged a traceback:\n{server.output[-4000:]}"
        )


async def stop_together(servers: Sequence[ServerProcess]) -> dict[str, int | str]:
    """SIGTERM every one of `servers` at once; each one's exit code, by its data
    dir's name, or what it did instead of exiting within 8 s."""
    stopped: dict[str, int | str] = {}

    async def stop(server: ServerProcess) -> None:
        try:
            stopped[server.data_dir.name] = await server.terminate(within=8)
        except ServerError:
            stopped[server.data_dir.name] = (
                f"still running 8 s after SIGTERM (killed); last line: {server.tail(1)[:160]!r}"
            )

    async with trio.open_nursery() as nursery:
        for server in servers:
            nursery.start_soon(stop, server)
    return stopped


def auditor_of(tmp_path: Path, database: str, **env: str) -> ServerProcess:
    """An instance connected straight to `database`, committing nothing by
    itself, that reads back what the pooled ones did."""
    return ServerProcess(
        tmp_path / "auditor",
        env={"INGESTOR_STORE": database, "INGESTOR_COMMIT_INTERVAL": "3600", **env},
    )


async def start_or_refusal(cluster: Cluster, mode: str) -> bool:
    """Start every instance of `cluster`; True if they all run. If any refuses
    to start, it must have exited by itself with one line naming PgBouncer's
    pooling mode, not hung or died with a traceback: False then."""
    try:
        await cluster.start()
    except BaseExceptionGroup as group:
        failures = group.exceptions
        if not all(isinstance(exc, ServerError) for exc in failures):
            raise
        refused = [s for s in cluster if s.exit_codes and s.exit_codes[-1] > 0]
        assert refused, f"an instance neither started nor exited by itself: {failures}"
        for server in refused:
            lines = [line for line in server.output_of_run().splitlines() if line.strip()]
            assert lines, f"{server.data_dir.name} exited {server.exit_codes} without a word"
            assert NAMES_THE_MODE[mode].search(lines[-1]), (
                f"{server.data_dir.name} refused PgBouncer's {mode} pooling, but its message"
                f" does not say so: {lines[-1]!r}"
            )
        return False
    return True


# -- 4. statement pooling ---------------------------------------------------------------


async def test_statement_pooling_is_refused_at_start_with_a_clear_message(
    database: str, tmp_path: Path
) -> None:
    """Statement pooling allows no transaction at all: the instance must exit
    at start, with one line that says why, not serve and fail every write."""
    async with pgbouncer(database, "statement") as bouncer:
        env = {"INGESTOR_STORE": bouncer.url, **LEADING}
        async with instances(tmp_path, 1, env) as cluster:
            cluster[0].ready_timeout = HANG
            started = await start_or_refusal(cluster, "statement")
            assert not started, (
                "an instance started through PgBouncer's statement pooling, where no"
                f" transaction can run:\n{cluster[0].tail()}"
            )
            assert cluster[0].exit_codes == [1], cluster[0].tail()


# -- 3. transaction pooling -------------------------------------------------------------


def store_warnings(servers: Sequence[ServerProcess]) -> list[str]:
    """The WARNING and ERROR lines of the instances' output."""
    return [
        f"{server.data_dir.name}: {line}"
        for server in servers
        for line in server.output_of_run().splitlines()
        if " WARNING " in line or " ERROR " in line
        if "no api_keys" not in line
    ]


async def test_transaction_pooling_is_refused_or_serves_a_healthy_database_without_errors(
    database: str, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Two instances through transaction pooling, a database that is up and idle,
    one client sending one request at a time: either the instances refuse to
    start (naming the pooling mode), or every request succeeds. A 503
    store_unavailable for a database that is up, or a 500, is the "random
    errors later" an operator cannot act on."""
    async with (
        pgbouncer(database, "transaction", default_pool_size=20) as bouncer,
        instances(tmp_path, 2, {"INGESTOR_STORE": bouncer.url, **LEADING}) as cluster,
    ):
        if not await start_or_refusal(cluster, "transaction"):
            return
        rng = random.Random(3)
        ledger = Ledger()
        replies: list[Reply] = []
        days = (day_before(1), day_before(2))
        with trio.fail_after(40):
            for n in range(60):
                server = cluster[n % 2]
                payloads = [new_pulse(rng, f"calm-{n}-{k}", rng.choice(days)) for k in range(5)]
                sent = await send_pulses(http, server.url, ledger, payloads)
                replies.append(reply_of(server, "pulses", sent.response, sent.error or ""))
                if n % 10 == 9:
                    response = await http.post(
                        f"{server.url}/aggregates/commit", json={"date": days[0]}
                    )
                    replies.append(reply_of(server, "commit", response, ""))
                    for read in ("aggregates", "batches", "metrics"):
                        response = await http.get(f"{server.url}/{read}")
                        replies.append(reply_of(server, read, response, ""))
        failed = [r.describe() for r in replies if r.status not in (200, 202)]
        failed += [
            f"pulse {a.identity} on a 202: {a.answer} ({a.error})"
            for a in ledger.attempts
            if a.status_code == 202 and a.answer != "accepted"
        ]
        statuses = Counter((r.what, r.status, r.code) for r in replies)
        assert failed == [], (
            f"{len(failed)} failures on a healthy database through transaction pooling:"
            f" requests {dict(statuses)}, pulses {dict(ledger.answers())};"
            f" first: {failed[:4]}; instance warnings: {store_warnings(list(cluster))[:6]}"
        )
        assert store_warnings(list(cluster)) == []


async def leading_now(
    http: httpx.AsyncClient, servers: Sequence[ServerProcess]
) -> tuple[list[ServerProcess], list[ServerProcess]]:
    """(the instances whose /metrics say they lead, those whose /metrics did not
    answer 200 in five tries: see the healthy-database test)."""
    found, unknown = [], []
    for server in servers:
        for _ in range(5):
            response = await http.get(f"{server.url}/metrics")
            if response.status_code == 200:
                line = re.search(r"^ingestor_committer_leading (\S+)$", response.text, re.M)
                assert line is not None, f"no ingestor_committer_leading on {server.url}"
                if float(line.group(1)) == 1:
                    found.append(server)
                break
            await trio.sleep(0.02)
        else:
            unknown.append(server)
    return found, unknown


def acted_as_leader(server: ServerProcess) -> list[str]:
    """The lines of the current run in which `server` did what only the leader
    does: a periodic commit or purge (or its failure). No test here commits
    over HTTP where it reads these."""
    return [
        line
        for line in server.output_of_run().splitlines()
        if " ingestor.committer commit " in f"{line} "
        or "periodic commit failed" in line
        or "purge failed" in line
    ]


def leader_lock_holders(database_url: str) -> list[str]:
    """The sessions that hold the committer's leader lock (second key -1), as
    "pid client:port state 'last query'", straight from the database."""
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT l.pid, a.client_port, a.state, a.query FROM pg_locks l"
            " JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
            " AND l.objid = 4294967295"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchall()
    return [f"pid {pid} port {port} {state} {query[:60]!r}" for pid, port, state, query in rows]


async def test_transaction_pooling_is_refused_or_leaves_exactly_one_leader(
    database: str, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Three instances through transaction pooling. The committer's leadership is
    a session-level advisory lock, but here a "session" is whichever server
    connection PgBouncer lends for the next statement: the lock stays on that
    server connection, which any instance may be lent next, and the leader's
    "am I still there" ping succeeds on any other. (Two server connections in
    PgBouncer's pool make the next instance to try land on the lock's within
    seconds; a bigger pool only makes it take longer.) Either the instances
    refuse to start, or exactly one of them leads (by its metrics, and by who
    runs the periodic commits of the late pulses sent meanwhile), and another
    takes over once it is killed."""
    yesterday = day_before(1)
    async with (
        pgbouncer(database, "transaction", default_pool_size=2) as bouncer,
        instances(tmp_path, 3, {"INGESTOR_STORE": bouncer.url, **LEADING}) as cluster,
    ):
        if not await start_or_refusal(cluster, "transaction"):
            return
        rng = random.Random(5)
        ledger = Ledger()
        with trio.fail_after(40):
            seen: list[list[str]] = []
            for wave in range(4):
                await post_late_wave(
                    http, list(cluster), ledger, rng, wave=f"w{wave}", day=yesterday,
                    until_stored=True,
                )  # fmt: skip
                for _ in range(3):
                    found, unknown = await leading_now(http, list(cluster))
                    seen.append(
                        [s.data_dir.name for s in found] + [f"{s.data_dir.name}?" for s in unknown]
                    )
                    await trio.sleep(0.2)
            acting = {s.data_dir.name: len(acted_as_leader(s)) for s in cluster}
            by_metrics = {name for names in seen for name in names if not name.endswith("?")}
            one = len(by_metrics) == 1 and sum(1 for n in acting.values() if n) <= 1
            assert one, (
                "not exactly one instance leads the committer through transaction pooling:"
                f" leaders by /metrics, sample by sample ('?': /metrics failed): {seen};"
                f" periodic commit and purge lines (or their failures) by instance: {acting};"
                f" the database's holders of the leader lock: {leader_lock_holders(database)}"
            )
            [leader] = [s for s in cluster if s.data_dir.name in by_metrics]
            assert await leader.kill() == -9
            others = [s for s in cluster if s is not leader]

            async def successor() -> list[ServerProcess]:
                found, unknown = await leading_now(http, others)
                return found if len(found) == 1 and not unknown else []

            await wait_until(successor, within=10, interval=0.1, what="a successor leading")


async def commit_until_done(
    http: httpx.AsyncClient,
    servers: Sequence[ServerProcess],
    auditor: ServerProcess,
    days: Sequence[str],
    *,
    rounds: int = 60,
) -> tuple[list[Reply], bool]:
    """POST /aggregates/commit of every day to `servers` in turn until one round
    of them all is 200 and `auditor` sees no open bucket, at most `rounds`
    times: (the answers, whether that happened)."""
    replies: list[Reply] = []
    for round_ in range(rounds):
        server = servers[round_ % len(servers)]
        done = True
        for day in days:
            response = await http.post(f"{server.url}/aggregates/commit", json={"date": day})
            replies.append(reply_of(server, "commit", response, ""))
            done = done and response.status_code == 200
        if done and await all_committed(http, auditor):
            return replies, True
        await trio.sleep(0.1)
    return replies, False


async def test_transaction_pooling_is_refused_or_keeps_every_promise_under_load(
    database: str, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Two instances through transaction pooling under load, late pulses,
    their periodic committers and clients' commits racing. Whatever errors the
    pooling causes, only 202, 503 + Retry-After or 500 outcome_unknown may be
    answered, and once everything is sent until stored and committed, an
    instance connected straight to the database must find every acknowledged
    pulse once and every bucket's batches adding up to its total: a statement
    run on a server connection that holds another client's prepared statement
    of the same name must never do something else than what was asked."""
    days = (day_before(1), day_before(2))
    async with (
        pgbouncer(database, "transaction", default_pool_size=20) as bouncer,
        instances(tmp_path, 2, {"INGESTOR_STORE": bouncer.url, **LEADING}) as cluster,
    ):
        if not await start_or_refusal(cluster, "transaction"):
            return
        auditor = auditor_of(tmp_path, database, INGESTOR_COMMIT_GRACE="30d")
        async with auditor:
            ledger = Ledger()
            traffic = Traffic(ledger, list(cluster), days)
            with trio.fail_after(45):
                async with trio.open_nursery() as nursery:
                    for number in range(4):
                        nursery.start_soon(traffic.client, number)
                    nursery.start_soon(traffic.committer)
                    await traffic.flowing(1500, 20, "load through transaction pooling")
                    traffic.stop.set()
                await resend_until_stored(http, list(cluster), ledger)
                # Committed through the pooler if it can; what it cannot commit
                # (see the healthy-database test), the auditor commits.
                commits, through_pooler = await commit_until_done(
                    http, list(cluster), auditor, days, rounds=20
                )
                replies = traffic.replies + commits
                if not through_pooler:
                    _, done = await commit_until_done(http, [auditor], auditor, days)
                    assert done, "the auditor could not commit the days"
                assert wrong_replies(replies) == []
                outbox = await check_promises(http, [auditor], ledger, days)
        statuses = Counter((r.what, r.status, r.code) for r in replies)
        print(
            f"\ntransaction pooling under load: {traffic.accepted()} pulses accepted,"
            f" answers {dict(statuses)}, {len(outbox)} batches; the days committed through"
            f" the pooler: {through_pooler}"
        )


# -- 1. session pooling -----------------------------------------------------------------


async def test_session_pooling_survives_a_killed_leader_and_pgbouncer_restarts_under_load(
    database: str, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Three instances through session pooling under load (late pulses of two
    closed days, the periodic committer, clients' commits racing it). The
    leader is SIGKILLed: another leads. PgBouncer is restarted, then told to
    drop every connection to the database and hold new ones for a second
    (KILL, RESUME): meanwhile only 202, 503 + Retry-After or 500
    outcome_unknown, afterwards the instances take pulses again by
    themselves and exactly one leads. In the end every acknowledged pulse is
    counted once and every bucket's batches add up to its total."""
    days = (day_before(1), day_before(2))
    async with (
        pgbouncer(
            database,
            "session",
            default_pool_size=60,
            max_client_conn=200,
            max_db_connections=60,
            # After KILL, a server connection opened during the pause is closed
            # ("pause mode") and PgBouncer waits server_login_retry (15 s by
            # default) before it opens another: its own delay, not the instances'.
            server_login_retry=1,
        ) as bouncer,
        instances(tmp_path, 3, {"INGESTOR_STORE": bouncer.url, **LEADING}) as cluster,
    ):
        assert await start_or_refusal(cluster, "session"), "refused session pooling"
        ledger = Ledger()
        traffic = Traffic(ledger, list(cluster), days)
        with trio.fail_after(50):
            [leader] = await wait_until(
                lambda: sole_leader(http, list(cluster)), within=10, interval=0.1, what="a leader"
            )
            survivors = [s for s in cluster if s is not leader]
            async with trio.open_nursery() as nursery:
                for number in range(4):
                    nursery.start_soon(traffic.client, number)
                nursery.start_soon(traffic.committer)
                await traffic.flowing(500, 15, "load through session pooling")

                traffic.targets[:] = survivors
                assert await leader.kill() == -9
                [successor] = await wait_until(
                    lambda: sole_leader(http, survivors),
                    within=10,
                    interval=0.1,
                    what="a survivor leading after the leader's kill",
                )
                await traffic.flowing(300, 10, "load after the leader's kill")

                await bouncer.restart()
                await traffic.flowing(300, 15, "load after PgBouncer's restart")
                await wait_until(
                    lambda: sole_leader(http, survivors),
                    within=10,
                    interval=0.1,
                    what="one leader after PgBouncer's restart",
                )

                await trio.to_thread.run_sync(bouncer.admin, f"KILL {bouncer.database}")
                await trio.sleep(1)
                await trio.to_thread.run_sync(bouncer.admin, f"RESUME {bouncer.database}")
                await traffic.flowing(300, 15, "load after PgBouncer's KILL and RESUME")
                traffic.stop.set()

            await resend_until_stored(http, survivors, ledger)
            await wait_until(
                lambda: sole_leader(http, survivors),
                within=10,
                interval=0.1,
                what="one leader at the end",
            )
            for day in days:
                await traffic_commit(http, survivors, day)
            for server in survivors:
                await wait_until(
                    partial(all_committed, http, server),
                    within=10,
                    interval=0.1,
                    what=f"every bucket committed, as {server.data_dir.name} sees it",
                )
            assert wrong_replies(traffic.replies, cut_off=[leader.data_dir.name]) == []
            outbox = await check_promises(http, survivors, ledger, days)
    statuses = Counter((r.what, r.status, r.code) for r in traffic.replies)
    print(
        f"\nsession pooling: {traffic.accepted()} pulses accepted; answers {dict(statuses)};"
        f" {successor.data_dir.name} took over from {leader.data_dir.name};"
        f" {len(outbox)} batches"
    )


async def traffic_commit(
    http: httpx.AsyncClient, servers: Sequence[ServerProcess], day: str
) -> None:
    """POST /aggregates/commit of `day` until one instance answers 200."""
    for attempt in range(40):
        server = servers[attempt % len(servers)]
        response = await http.post(f"{server.url}/aggregates/commit", json={"date": day})
        if response.status_code == 200:
            return
        await trio.sleep(0.1)
    raise AssertionError(
        f"commit of {day} never answered 200: {response.status_code} {response.text}"
    )


# -- 2. too few server connections --------------------------------------------------------


async def test_session_pooling_with_too_few_server_connections_answers_and_never_hangs(
    database: str, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """PgBouncer (session pooling) lends 3 server connections to the database;
    two instances under load want up to 4 each, plus one for the committer's
    leadership. A client of PgBouncer that finds no server connection free
    is let in, and its first query waits in PgBouncer's queue
    (query_wait_timeout: two minutes by default), not the instance's busy
    timeout. Still, as README promises: every request is answered (202, or 503 +
    Retry-After); a third instance started meanwhile is ready, or exits with
    one line, within a bounded time; SIGTERM stops an instance within its
    graceful timeout; and nothing acknowledged is lost or counted twice.
    (Whether one leads is not checked: the pools may hold every server
    connection, and the committer's leadership needs one of its own.)"""
    days = (day_before(1), day_before(2))
    async with pgbouncer(
        database, "session", default_pool_size=3, max_db_connections=3, max_client_conn=50
    ) as bouncer:
        env = {
            "INGESTOR_STORE": bouncer.url,
            "INGESTOR_STORE_POOL_SIZE": "4",
            "INGESTOR_GRACEFUL_TIMEOUT": "3",
            **LEADING,
        }
        auditor = auditor_of(tmp_path, database)
        async with instances(tmp_path, 3, env) as cluster, auditor:
            first, second, late = cluster
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first.start)
                nursery.start_soon(second.start)
            ledger = Ledger()
            traffic = Traffic(ledger, [first, second], days)
            late.ready_timeout = 8  # a busy timeout is 1 s, connecting 2 s at most
            late_start = "ready"
            problems: list[str] = []
            with trio.fail_after(50):
                async with trio.open_nursery() as nursery:
                    for number in range(4):
                        nursery.start_soon(traffic.client, number)
                    nursery.start_soon(traffic.committer)
                    await traffic.flowing(200, 15, "load through 3 server connections")
                    try:
                        await late.start()
                    except ServerError as exc:
                        late_start = str(exc)
                    await traffic.flowing(200, 15, "load after the third instance's start")
                    traffic.stop.set()
                found = await leaders(http, [first, second])
                waiting = [row[3] for row in bouncer.admin("SHOW CLIENTS")].count("waiting")
                await resend_until_stored(http, [first, second], ledger)
                commits, _ = await commit_until_done(
                    http, [first, second], auditor, days, rounds=10
                )
                _, done = await commit_until_done(http, [auditor], auditor, days)
                assert done, "the auditor could not commit the days"
                assert wrong_replies(traffic.replies + commits) == []
                await check_promises(http, [auditor], ledger, days)

                # SIGTERM both at once: each must drain and exit 0 within its
                # graceful timeout (3 s), whatever PgBouncer keeps waiting.
                stopped = await stop_together([first, second])
            if late_start != "ready":
                lines = [line for line in late.output_of_run().splitlines() if line.strip()]
                if late.exit_codes[-1:] == [-9]:
                    problems.append(
                        "an instance started while PgBouncer had no server connection to lend"
                        f" neither became ready nor exited within {late.ready_timeout} s:"
                        f" {late_start[-200:]}"
                    )
                elif not lines or not lines[-1].startswith("billing-ingestor: "):
                    problems.append(f"the third instance exited without one line: {lines[-3:]}")
            if stopped != {first.data_dir.name: 0, second.data_dir.name: 0}:
                problems.append(f"SIGTERM did not stop every instance within 8 s: {stopped}")
            assert problems == [], "\n".join(problems)
    statuses = Counter((r.what, r.status, r.code) for r in traffic.replies)
    print(
        f"\n3 server connections: {traffic.accepted()} accepted; answers {dict(statuses)};"
        f" {len(found)} instances leading, {waiting} of PgBouncer's clients waiting"
    )


async def test_session_pooling_with_too_few_client_slots_answers_503_not_errors(
    database: str, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """PgBouncer takes 4 clients in all (max_client_conn) and refuses the next
    ("no more connections allowed"); two instances under load want up to 5
    each. Every request is answered 202 or 503 + Retry-After, SIGTERM stops
    each within its graceful timeout, and nothing acknowledged is lost or
    counted twice. (Whether one leads is not checked: the pools may hold
    every slot, and the committer's leadership needs one of its own.)"""
    days = (day_before(1), day_before(2))
    async with pgbouncer(database, "session", default_pool_size=20, max_client_conn=4) as bouncer:
        env = {
            "INGESTOR_STORE": bouncer.url,
            "INGESTOR_STORE_POOL_SIZE": "4",
            "INGESTOR_GRACEFUL_TIMEOUT": "3",
            **LEADING,
        }
        auditor = auditor_of(tmp_path, database)
        async with instances(tmp_path, 2, env) as cluster, auditor:
            assert await start_or_refusal(cluster, "session"), "refused session pooling"
            ledger = Ledger()
            traffic = Traffic(ledger, list(cluster), days)
            with trio.fail_after(40):
                async with trio.open_nursery() as nursery:
                    for number in range(4):
                        nursery.start_soon(traffic.client, number)
                    nursery.start_soon(traffic.committer)
                    await traffic.flowing(400, 15, "load through 4 client slots")
                    traffic.stop.set()
                found = await leaders(http, list(cluster))
                await resend_until_stored(http, list(cluster), ledger)
                _, done = await commit_until_done(http, [auditor], auditor, days)
                assert done, "the auditor could not commit the days"
                assert wrong_replies(traffic.replies) == []
                await check_promises(http, [auditor], ledger, days)
                stopped = await stop_together(list(cluster))
            assert stopped == {server.data_dir.name: 0 for server in cluster}, stopped
    statuses = Counter((r.what, r.status, r.code) for r in traffic.replies)
    print(
        f"\n4 client slots: {traffic.accepted()} accepted; answers {dict(statuses)};"
        f" {len(found)} instances leading"
    )


# -- 5. the store's own checks, below the HTTP layer -------------------------------------


def _prepared_on_a_pooled_session(url: str) -> tuple[int, str | None]:
    """Open a store on `url`, read through it more often than psycopg's threshold
    for preparing a statement, and give (how many statements the session
    that read holds prepared, the store's trouble)."""
    store = PostgresStore.open(url, partitions=2, pool_size=1, busy_timeout=BUSY)
    try:
        for _ in range(10):
            store.open_buckets()
        with store._pool.connection() as conn:
            row = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()
        return (0 if row is None else int(row[0])), store.trouble()
    finally:
        store.close()


async def test_a_store_behind_a_pooler_prepares_no_statement(database: str) -> None:
    """A statement psycopg prepared on one server session, run by name where a
    pooler lent another, ran that session's statement of the same name with
    our values (seen through transaction pooling: "bind message supplies 2
    parameters, but prepared statement "_pg3_3" requires 7"). Behind a
    pooler, even one in session mode, the store prepares none; connected
    directly, it does, as before."""
    direct = await trio.to_thread.run_sync(_prepared_on_a_pooled_session, database)
    assert direct[0] > 0, "connected directly, the store prepared nothing: this proves nothing"
    async with pgbouncer(database, "session") as bouncer:
        relayed = await trio.to_thread.run_sync(_prepared_on_a_pooled_session, bouncer.url)
    assert relayed == (0, None)


async def test_a_pooler_turned_to_transaction_pooling_is_found_by_the_leader(
    database: str,
) -> None:
    """The start's check passed (session pooling), then the operator turned the
    pooler to transaction pooling and reloaded it. The leader's next ping,
    lent another server session than the one holding its lock, says so:
    it stops leading, for good, and /readyz's trouble names the cause."""
    async with pgbouncer(database, "session") as bouncer:
        store = await trio.to_thread.run_sync(
            partial(PostgresStore.open, bouncer.url, partitions=2, pool_size=1, busy_timeout=BUSY)
        )
        try:
            bouncer.mode = "transaction"
            bouncer._write_config()
            await trio.to_thread.run_sync(bouncer.admin, "RELOAD")
            assert await trio.to_thread.run_sync(store.lead_committer, 20.0)
            assert store.trouble() is None

            def ping_while_the_lock_holder_is_lent() -> bool:
                with (
                    psycopg.connect(bouncer.url, autocommit=True) as other,
                    other.transaction(),  # holds the session just given back
                ):
                    other.execute("SELECT 1")
                    return store.lead_committer(20.0)

            assert not await trio.to_thread.run_sync(ping_while_the_lock_holder_is_lent)
            trouble = store.trouble()
            assert trouble is not None
            assert "transaction or statement pool mode" in trouble
            assert not await trio.to_thread.run_sync(store.lead_committer, 20.0)
        finally:
            await trio.to_thread.run_sync(store.close)
