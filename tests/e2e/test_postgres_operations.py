"""What a DBA or the platform does to the PostgreSQL under running instances.

Real `python -m ingestor serve` processes (`ServerProcess`) on a PostgreSQL
server of this module's own (`private_postgres`: data files on a tmpfs, its own
port and socket directory), so that it may be restarted, crashed, frozen,
filled and run out of connections without touching the shared server of the
other tests. Each test has a database of its own on it.

    restarts      `pg_ctl restart -m fast` and `-m immediate` (crash recovery)
                  under load with and without ids and during a commit: 202 or
                  503 + Retry-After meanwhile, then every acknowledged pulse
                  counted once, the day committed once, every batch delivered
    frozen        the server's processes stopped (an I/O stall, a paused VM):
                  a request is answered within a few busy timeouts, not never
    lost COMMIT   a proxy forwards a write's COMMIT and drops its answer: the
                  instance must not say "not stored, retry" for what it stored
    dead pool     after a restart, or the DBA's idle_session_timeout, the pool
                  holds dead sessions: a request must not wait for them in turn
    outage        after the database was down for seconds, the instance takes
                  pulses again as soon as it is back
    read-only     sessions opened while the target was read-only (a failover)
                  must not keep refusing writes once the primary is writable
    DBA settings  the database's statement_timeout, lock_timeout and
                  idle_in_transaction_session_timeout, a long LOCK TABLE
    connections   max_connections reached: a clear start-up error, no hang
    disk full     the database's disk fills: 503 store_full, then recovery

The server binaries are /usr/lib/postgresql/*/bin; as root they run as the
`postgres` user. Without them the tests skip, or fail under the CI variable.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import pwd
import random
import secrets
import shutil
import signal
import struct
import subprocess
import tempfile
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio

from tests.e2e.cluster_support import child_pids, frozen
from tests.e2e.conftest import ABORTED_UPLOADS
from tests.support.server import (
    Attempt,
    BucketKey,
    Ledger,
    Payload,
    ServerError,
    ServerProcess,
    Total,
    collect_pages,
    exact_sum,
    free_port,
    send_pulses,
    totals_of,
    wait_until,
)

pytestmark = [pytest.mark.e2e, *ABORTED_UPLOADS]

BUSY = 1.0  # store_busy_timeout of the instances: seconds
QUIET = {"INGESTOR_COMMIT_INTERVAL": "3600", "INGESTOR_COMMIT_GRACE": "30d"}
TENANTS = tuple(f"tenant-{n}" for n in range(24))  # spread over the 16 partitions
DELIVERY_STATE = {"status", "attempts", "last_error", "next_attempt_at", "delivered_at"}


def _unavailable(message: str) -> None:
    """Skip, or fail under CI: a green CI run must have run every test here."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


# -- a PostgreSQL server of our own ---------------------------------------------------


@dataclass
class PrivatePostgres:
    """One PostgreSQL cluster in a directory of its own, run with pg_ctl."""

    bin: Path
    root: Path
    port: int
    as_postgres: list[str]  # the command prefix that runs a binary as its owner
    tmpfs: bool

    @property
    def disk(self) -> Path:
        """The data files' file system (a tmpfs if `tmpfs`); the WAL is elsewhere."""
        return self.root / "disk"

    @property
    def data(self) -> Path:
        return self.disk / "data"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.as_postgres, *args], capture_output=True, text=True, timeout=timeout, check=False
        )

    def pg_ctl(self, *args: str) -> None:
        done = self.run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w",
            *args,
        )  # fmt: skip
        assert done.returncode == 0, f"pg_ctl {' '.join(args)}: {done.stdout}{done.stderr}"

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
            " -c max_connections=40 -c superuser_reserved_connections=0"
        )
        self.pg_ctl("-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("-m", mode, "stop")

    def restart(self, mode: str) -> None:
        """Stop (fast: sessions ended; immediate: a crash, then recovery) and start."""
        self.stop(mode)
        self.start()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.root / "log").read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def processes(self) -> list[int]:
        """The postmaster and every process it runs (backends included)."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        return [postmaster, *child_pids(postmaster)]

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Every process of the server stopped: its kernel still answers TCP."""
        with frozen(*self.processes()):
            yield

    def new_database(self) -> str:
        name = f"ops_{secrets.token_hex(5)}"
        self.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def execute(self, sql: str, url: str | None = None) -> list[tuple[Any, ...]]:
        return query(url or self.admin_url, sql)

    def running(self) -> bool:
        try:
            with psycopg.connect(self.admin_url, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    """Run one statement on a connection of its own; its rows, if any."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        cursor = conn.execute(sql.encode())
        return cursor.fetchall() if cursor.description else []


def _binaries() -> Path | None:
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else None


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PrivatePostgres]:
    binaries = _binaries()
    if binaries is None:
        _unavailable("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin")
    assert binaries is not None
    as_root = os.geteuid() == 0
    if as_root:
        # initdb refuses root: the server runs as `postgres`, in directories it owns.
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("running as root and there is no postgres user to run PostgreSQL as")
        if shutil.which("runuser") is None:
            _unavailable("running as root without runuser: cannot run PostgreSQL as postgres")
    root = Path(tempfile.mkdtemp(prefix="ingestor-pg-ops-"))
    (root / "disk").mkdir()
    prefix: list[str] = []
    tmpfs = False
    if as_root:
        prefix = ["runuser", "-u", "postgres", "--"]
        # The data files on a tmpfs of their own, which the disk-full test fills.
        # The WAL stays on /tmp: a WAL that cannot grow is a PANIC, after which
        # PostgreSQL shuts down for good (`could not write to file "pg_wal/..."`).
        mount = ["mount", "-t", "tmpfs", "-o", "size=384m,mode=0700", "tmpfs", str(root / "disk")]
        tmpfs = subprocess.run(mount, capture_output=True, check=False).returncode == 0
        for path in (root, root / "disk"):
            shutil.chown(path, "postgres", "postgres")
    server = PrivatePostgres(binaries, root, free_port(), prefix, tmpfs)
    try:
        made = server.run(
            str(binaries / "initdb"), "-D", str(server.data), "--waldir", str(root / "wal"),
            "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        if made.returncode != 0:
            _unavailable(f"initdb failed: {made.stdout}{made.stderr}")
        server.start()
        yield server
    finally:
        with contextlib.suppress(Exception):
            for pid in server.processes():
                os.kill(pid, signal.SIGCONT)
        server.run(str(binaries / "pg_ctl"), "-D", str(server.data), "-m", "immediate", "stop")
        if tmpfs:
            subprocess.run(["umount", "-l", str(server.disk)], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def database(private_postgres: PrivatePostgres) -> str:
    """A database of the test's own on the private server."""
    if not private_postgres.running():
        private_postgres.start()  # a test before this one left it stopped
    return private_postgres.new_database()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=60.0) as client:
        yield client


@contextlib.asynccontextmanager
async def instances(
    tmp_path: Path, url: str, count: int = 1, **settings: str
) -> AsyncIterator[list[ServerProcess]]:
    """`count` servers on `url`, started together; killed at the end, their output
    checked for tracebacks."""
    env = {"INGESTOR_STORE": url, "INGESTOR_STORE_BUSY_TIMEOUT": str(BUSY), **QUIET}
    env.update({f"INGESTOR_{k.upper()}": v for k, v in settings.items()})
    servers = [ServerProcess(tmp_path / f"node{n}", env=env) for n in range(count)]
    try:
        async with trio.open_nursery() as nursery:
            for server in servers:
                nursery.start_soon(server.start)
        yield servers
    finally:
        for server in servers:
            await server.aclose()
    for server in servers:
        assert "Traceback" not in server.output, server.output[-4000:]


# -- pulses and answers ---------------------------------------------------------------


def yesterday() -> str:
    return (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).isoformat()


def pulse(tenant: str, amount: str = "1", *, pulse_id: str | None, sku: str = "sku") -> Payload:
    payload: dict[str, Any] = {
        "tenant_id": tenant,
        "product_sku": sku,
        "use_unit": "call",
        "used_amount": amount,
        "timestamp": f"{yesterday()}T12:00:00Z",
    }
    if pulse_id is not None:
        payload["id"] = pulse_id
    return payload


@dataclass
class Answered:
    """One HTTP answer as a test reads it."""

    started: float
    seconds: float
    status: int | None  # None: no answer at all
    retry_after: str | None = None
    code: str | None = None  # the error's code, if any
    message: str = ""

    @classmethod
    def of(cls, started: float, response: httpx.Response | None) -> Answered:
        seconds = trio.current_time() - started
        if response is None:
            return cls(started, seconds, None)
        code, message = None, ""
        if response.status_code >= 400:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                error = response.json()["error"]
                code, message = error["code"], error["message"]
        retry_after = response.headers.get("retry-after")
        return cls(started, seconds, response.status_code, retry_after, code, message)

    def describe(self) -> str:
        return f"{self.status} {self.code} Retry-After={self.retry_after} in {self.seconds:.2f} s"


async def timed(request: Awaitable[httpx.Response]) -> tuple[Answered, httpx.Response | None]:
    started = trio.current_time()
    try:
        response = await request
    except httpx.TransportError:
        return Answered.of(started, None), None
    return Answered.of(started, response), response


async def send(
    http: httpx.AsyncClient, server: ServerProcess, ledger: Ledger, payloads: Sequence[Payload]
) -> Answered:
    """`send_pulses`, timed."""
    started = trio.current_time()
    sent = await send_pulses(http, server.url, ledger, payloads)
    return Answered.of(started, sent.response)


async def post_one(http: httpx.AsyncClient, server: ServerProcess, payload: Payload) -> Answered:
    answered, _ = await timed(http.post(f"{server.url}/pulses", json=payload))
    return answered


async def resend_until_stored(
    http: httpx.AsyncClient, servers: Sequence[ServerProcess], ledger: Ledger
) -> None:
    """Send every id-bearing pulse not yet known to be stored again, until it is."""
    for _ in range(40):
        pending: dict[tuple[str, str], Payload] = {}
        for identity, attempts in ledger.by_identity().items():
            if not any(a.answer in ("accepted", "duplicate") for a in attempts):
                pending[identity] = attempts[-1].payload
        if not pending:
            return
        payloads = list(pending.values())
        for n, start in enumerate(range(0, len(payloads), 500)):
            server = servers[n % len(servers)]
            await send_pulses(http, server.url, ledger, payloads[start : start + 500])
        await trio.sleep(0.1)
    raise AssertionError(f"pulses never stored: {list(pending)[:5]}")


async def batches_of(
    http: httpx.AsyncClient, server: ServerProcess, day: str
) -> dict[str, dict[str, Any]]:
    """Every batch of `day`, with its records, as GET /batches/{id} shows it."""
    found = {}
    listed = await collect_pages(http, f"{server.url}/batches", "batches", {"date": day}, limit=100)
    for row in listed:
        response = await http.get(f"{server.url}/batches/{row['batch_id']}")
        assert response.status_code == 200, response.text
        found[row["batch_id"]] = response.json()
    return found


async def aggregates(http: httpx.AsyncClient, server: ServerProcess) -> dict[BucketKey, Total]:
    return totals_of(
        await collect_pages(http, f"{server.url}/aggregates", "aggregates", limit=1000)
    )


# -- 1. restarts under load (holds) ---------------------------------------------------


@dataclass
class Load:
    """Clients posting 12-pulse arrays (a quarter without ids) to the servers in turn."""

    servers: list[ServerProcess]
    ledger: Ledger = field(default_factory=Ledger)
    answers: list[Answered] = field(default_factory=list)
    stop: trio.Event = field(default_factory=trio.Event)
    sequence: int = 0

    def accepted(self) -> int:
        return sum(1 for a in self.ledger.attempts if a.answer == "accepted")

    async def client(self, http: httpx.AsyncClient, number: int) -> None:
        rng = random.Random(number)
        while not self.stop.is_set():
            self.sequence += 1
            server = self.servers[self.sequence % len(self.servers)]
            payloads = []
            for k in range(12):
                tenant = rng.choice(TENANTS)
                if rng.random() < 0.25:  # without an id: a retry could not be recognised
                    payloads.append(
                        pulse(tenant, str(rng.randint(1, 999)), pulse_id=None, sku="no-id")
                    )
                else:
                    pulse_id = f"c{number}-{self.sequence}-{k}"
                    payloads.append(pulse(tenant, str(rng.randint(1, 999)), pulse_id=pulse_id))
            answered = await send(http, server, self.ledger, payloads)
            self.answers.append(answered)
            if answered.status != 202:
                await trio.sleep(0.05)

    async def flowing(self, more: int, within: float, what: str) -> float:
        """Wait until `more` pulses more are accepted; return how long that took."""
        start, floor = trio.current_time(), self.accepted() + more

        async def enough() -> bool:
            return self.accepted() >= floor

        await wait_until(enough, within=within, what=what, interval=0.02)
        return trio.current_time() - start


def _maybe_stored(attempt: Attempt) -> bool:
    """An answer that leaves it open whether the pulse is stored: 500
    outcome_unknown, or a 202's item "may be stored"."""
    return attempt.status_code == 500 or (attempt.error or "").startswith("may be stored")


async def test_restarts_and_a_crash_under_load_lose_nothing_and_commit_once(
    private_postgres: PrivatePostgres, database: str, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Two instances under load; the database restarts (fast), then crashes
    (immediate) while a commit runs. Meanwhile only 202 or 503 + Retry-After;
    afterwards both instances work by themselves, every acknowledged pulse is
    counted once, the day is committed once and every batch delivered."""
    day = yesterday()
    async with instances(tmp_path, database, 2) as servers:
        load = Load(servers)
        commit_answers: list[Answered] = []
        recovery: list[float] = []
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for number in range(4):
                    nursery.start_soon(load.client, http, number)
                await load.flowing(300, 10, "load before the restart")

                await trio.to_thread.run_sync(private_postgres.restart, "fast")
                recovery.append(await load.flowing(50, 10, "load after the fast restart"))

                # A crash while a commit of the day runs on the first instance.
                async def commit() -> None:
                    answered, _ = await timed(
                        http.post(f"{servers[0].url}/aggregates/commit", json={"date": day})
                    )
                    commit_answers.append(answered)

                nursery.start_soon(commit)
                await trio.sleep(0.01)
                await trio.to_thread.run_sync(private_postgres.restart, "immediate")
                recovery.append(await load.flowing(50, 10, "load after the crash"))
                await load.flowing(100, 10, "load after recovery")
                load.stop.set()

            await resend_until_stored(http, servers, load.ledger)

            # Commit the day on both at once, until both answer 200.
            async def commit_on(server: ServerProcess) -> None:
                for _ in range(20):
                    answered, _ = await timed(
                        http.post(f"{server.url}/aggregates/commit", json={"date": day})
                    )
                    if answered.status == 200:
                        return
                    await trio.sleep(0.2)
                raise AssertionError(f"commit on {server.url} never succeeded")

            async with trio.open_nursery() as nursery:
                for server in servers:
                    nursery.start_soon(commit_on, server)

            statuses = Counter((a.status, a.code) for a in load.answers)
            # 500 outcome_unknown: a session ended as it committed (see the
            # lost-answer test below); its pulses may or may not be stored.
            wrong = [
                a.describe()
                for a in load.answers
                if a.status not in (202, 503) and (a.status, a.code) != (500, "outcome_unknown")
            ]
            wrong += [a.describe() for a in load.answers if a.status == 503 and not a.retry_after]
            wrong += [
                a.describe()
                for a in commit_answers
                if a.status != 200
                and (a.status != 503 or not a.retry_after)
                and (a.status, a.code) != (500, "outcome_unknown")
            ]
            assert wrong == [], f"answers other than 202 / 503 + Retry-After: {wrong[:10]}"
            assert statuses[(503, "store_unavailable")] + statuses[(503, "store_busy")] > 0 or any(
                a.answer == "rejected" for a in load.ledger.attempts
            ), f"the restarts failed no write: the test proved nothing ({statuses})"
            slowest = max(a.seconds for a in load.answers)
            assert slowest < 3 * BUSY + 2, f"an answer took {slowest:.2f} s"
            assert load.ledger.problems() == []
            unknown = [a for a in load.ledger.attempts if _maybe_stored(a)]
            assert [a for a in load.ledger.unresolved() if a not in unknown] == []

            # Id-bearing pulses: exactly what the answers say. Without an id, a
            # pulse answered 500 outcome_unknown or "may be stored" may be
            # stored or not: a session that a restart ends in its COMMIT is told
            # "terminating connection" whether or not the commit happened. Such
            # pulses bound the totals from above.
            expected = load.ledger.expected_totals()
            maybe: dict[BucketKey, list[Decimal]] = defaultdict(list)
            for attempt in load.ledger.attempts:
                if attempt.identity is None and _maybe_stored(attempt):
                    assert isinstance(attempt.payload, Mapping)
                    amount = Decimal(attempt.payload["used_amount"])
                    maybe[load.ledger.bucket_of(attempt)].append(amount)
            zero = Total(Decimal(0), 0)
            totals = await aggregates(http, servers[0])
            assert await aggregates(http, servers[1]) == totals
            off: list[tuple[BucketKey, Total, Total, Total]] = []
            for key in expected.keys() | totals.keys():
                low, got = expected.get(key, zero), totals.get(key, zero)
                extra = maybe.get(key, [])
                high = Total(exact_sum([low.amount, *extra]), low.count + len(extra))
                bounded = low.count <= got.count <= high.count
                bounded = bounded and low.amount <= got.amount <= high.amount
                if not bounded or (key[1] == "sku" and got != low):
                    off.append((key, low, got, high))
            assert off == [], f"acknowledged pulses lost or counted twice: {off}"
            kept_anyway = sum(got.count - expected.get(k, zero).count for k, got in totals.items())

            # Committed once: every bucket's batches add up to its total.
            batches = await batches_of(http, servers[1], day)
            sums: dict[BucketKey, list[Decimal]] = defaultdict(list)
            counts: Counter[BucketKey] = Counter()
            for batch in batches.values():
                for record in batch["records"]:
                    key = (record["tenant_id"], record["product_sku"], record["use_unit"], day)
                    sums[key].append(Decimal(record["used_amount"]))
                    counts[key] += record["pulse_count"]
            in_batches = {key: Total(exact_sum(v), counts[key]) for key, v in sums.items()}
            assert in_batches == totals, "the batches do not add up to the totals"

            # Delivered, each batch as the store holds it. A claim or an outcome
            # the crash kept from its instance leaves that batch to its lease's
            # end (2 x sink_timeout + 5 s + 30 s): it is due again by then.
            async def delivered() -> bool:
                listed = await batches_of(http, servers[0], day)
                return all(b["status"] == "delivered" for b in listed.values())

            with trio.move_on_after(5):
                await wait_until(delivered, within=5, interval=0.2, what="batches delivered")
            listed = await batches_of(http, servers[0], day)
            now = dt.datetime.now(dt.UTC)
            leased = {
                bid: dt.datetime.fromisoformat(b["next_attempt_at"]) - now
                for bid, b in listed.items()
                if b["status"] != "delivered"
            }
            late = {bid: left for bid, left in leased.items() if left > dt.timedelta(seconds=56)}
            assert late == {}, f"batches neither delivered nor due within a lease: {late}"
        files: Counter[str] = Counter()
        for server in servers:
            for path in (server.deliveries / day).glob("*.json"):
                files[path.stem] += 1
                held = {k: v for k, v in batches[path.stem].items() if k not in DELIVERY_STATE}
                assert json.loads(path.read_bytes()) == held, f"{path.name} is not the store's"
        delivered_ids = {bid for bid, b in listed.items() if b["status"] == "delivered"}
        assert delivered_ids <= set(files) <= set(batches)
    print(
        f"\nrestarts under load: {load.accepted()} pulses accepted in {len(load.answers)}"
        f" requests, answers {dict(statuses)}, pulses {dict(load.ledger.answers())};"
        f" writes again {recovery[0]:.2f} s after the fast restart and {recovery[1]:.2f} s"
        f" after the crash; the commit during the crash:"
        f" {[a.describe() for a in commit_answers]}; {kept_anyway} pulses without an id"
        f" answered 'not stored' were stored; {len(batches)} batches, {len(files)} in the"
        f" sinks, {len(leased)} waiting for their lease's end"
        f" ({sorted(round(left.total_seconds()) for left in leased.values())} s)"
    )


# -- 2. a frozen database (DEFECT) ----------------------------------------------------


async def test_a_frozen_database_gets_503_within_a_few_busy_timeouts_not_a_hang(
    private_postgres: PrivatePostgres, database: str, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """The database's processes stop (an I/O stall, a paused VM: its kernel
    still acknowledges every packet and keepalive). `_Connector` promises a
    store call that fails "after about three busy timeouts"; with the wait for
    a pooled connection (one busy timeout) a request must be answered 503 +
    Retry-After within four, not wait as long as the database stays frozen."""
    async with instances(tmp_path, database) as [server]:
        warm = [pulse(t, pulse_id=f"warm-{t}") for t in TENANTS]
        assert (await http.post(f"{server.url}/pulses", json=warm)).status_code == 202
        bound = 4 * BUSY + 0.5
        freeze = bound + 1.5
        answers: dict[str, Answered] = {}

        async def ask(name: str, request: Any) -> None:
            answers[name], _ = await timed(request)

        async with trio.open_nursery() as nursery:
            with private_postgres.frozen():
                for name, request in (
                    (
                        "one pulse",
                        http.post(f"{server.url}/pulses", json=pulse("tenant-1", pulse_id="f1")),
                    ),
                    (
                        "24 tenants",
                        http.post(
                            f"{server.url}/pulses",
                            json=[pulse(t, pulse_id=f"f-{t}") for t in TENANTS],
                        ),
                    ),
                    ("aggregates", http.get(f"{server.url}/aggregates")),
                ):
                    nursery.start_soon(ask, name, request)
                await trio.sleep(freeze)
            # Thawed: whatever waits finishes now.
        after = await post_one(http, server, pulse("tenant-2", pulse_id="after"))
    assert after.status == 202, after.describe()
    slow = {name: a.describe() for name, a in answers.items() if a.seconds > bound}
    assert slow == {}, (
        f"with store_busy_timeout = {BUSY} s, requests to a database frozen for {freeze} s"
        f" were answered only when it thawed, not within {bound} s: {slow}"
    )
    unclear = {n: a.describe() for n, a in answers.items() if a.status != 503 or not a.retry_after}
    assert unclear == {}, f"not a 503 + Retry-After: {unclear}"


# -- 3. the answer to COMMIT lost (DEFECT) --------------------------------------------


class CommitCutter:
    """A TCP proxy to PostgreSQL that, when armed, forwards the COMMIT of a
    transaction that wrote pulses and then cuts the connection: the server
    commits, the instance never hears so (the connection lost between COMMIT
    and its answer). Plain protocol only (the URL says sslmode=disable)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.armed = 0
        self.cut = 0
        self.listen_port = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.listen_port = listeners[0].socket.getsockname()[1]
        task_status.started(self.listen_port)
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream("127.0.0.1", self.port) as server:
            await self._pump(client, server)

    async def _pump(self, client: trio.SocketStream, server: trio.SocketStream) -> None:
        doomed = trio.Event()

        async def upstream() -> None:
            buffer, started, writing = b"", False, False
            while data := await client.receive_some(65536):
                buffer += data
                out = b""
                while True:
                    if not started:  # the startup message has no type byte
                        if len(buffer) < 4 or len(buffer) < struct.unpack("!I", buffer[:4])[0]:
                            break
                        size = struct.unpack("!I", buffer[:4])[0]
                        out, buffer, started = out + buffer[:size], buffer[size:], True
                        continue
                    if len(buffer) < 5 or len(buffer) < 1 + struct.unpack("!I", buffer[1:5])[0]:
                        break
                    size = 1 + struct.unpack("!I", buffer[1:5])[0]
                    message, buffer = buffer[:size], buffer[size:]
                    out += message
                    if message[:1] in (b"Q", b"P"):  # a query, or one with parameters
                        text = message[5:]
                        if b"INSERT INTO pulses" in text:
                            writing = True
                        elif message[:1] == b"Q" and text.startswith(b"COMMIT"):
                            if writing and self.armed:
                                self.armed -= 1
                                self.cut += 1
                                doomed.set()
                            writing = False
                await server.send_all(out)
                if doomed.is_set():
                    await trio.sleep(0.3)  # the server commits; its answer goes nowhere
                    return

        async def downstream() -> None:
            while (data := await server.receive_some(65536)) and not doomed.is_set():
                await client.send_all(data)

        async with trio.open_nursery() as nursery:

            async def pump(direction: Any) -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await direction()
                nursery.cancel_scope.cancel()

            nursery.start_soon(pump, upstream)
            nursery.start_soon(pump, downstream)


@contextlib.asynccontextmanager
async def behind_a_cutter(
    private_postgres: PrivatePostgres, database: str, tmp_path: Path
) -> AsyncIterator[tuple[CommitCutter, ServerProcess]]:
    """A server on `database` through a `CommitCutter`."""
    cutter = CommitCutter(private_postgres.port)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(cutter.serve)
        proxied = database.replace(f":{private_postgres.port}/", f":{port}/")
        url = f"{proxied}?sslmode=disable&gssencmode=disable"
        async with instances(tmp_path, url) as [server]:
            yield cutter, server
        nursery.cancel_scope.cancel()


async def test_a_write_whose_commit_answer_is_lost_is_not_answered_not_stored(
    private_postgres: PrivatePostgres, database: str, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """The connection breaks between COMMIT and its answer. The instance cannot
    know the outcome, and must say so: 500 outcome_unknown. It answered 503
    "store_unavailable" (a 503 is "nothing was stored: retry"), and a client
    that retried as told counted a pulse without an id twice. (Asking the
    database, pg_xact_status, is no way out: after a crash, the transaction's
    id may be given to another that commits.)"""
    async with behind_a_cutter(private_postgres, database, tmp_path) as (cutter, server):
        # With an id the retry is recognised: counted once (holds).
        cutter.armed = 1
        first = await post_one(http, server, pulse("tenant-1", "7", pulse_id="with-id"))
        again = await post_one(http, server, pulse("tenant-1", "7", pulse_id="with-id"))
        # Without an id: the client that resends it counts it twice.
        cutter.armed = 1
        lost = await post_one(http, server, pulse("tenant-2", "5", pulse_id=None))
        retried = await post_one(http, server, pulse("tenant-2", "5", pulse_id=None))
        assert cutter.cut == 2, "the proxy cut no COMMIT: the test proved nothing"
        totals = await aggregates(http, server)
    day = yesterday()
    with_id = totals[("tenant-1", "sku", "call", day)]
    without = totals[("tenant-2", "sku", "call", day)]
    assert (first.status, first.code) == (500, "outcome_unknown"), first.describe()
    assert again.status == 202, again.describe()  # a duplicate: counted once
    assert with_id == Total(Decimal(7), 1), "an id-bearing pulse counted twice"
    assert (lost.status, lost.code) == (500, "outcome_unknown"), (
        f"the COMMIT's answer was lost: the instance answered {lost.describe()} for a pulse"
        f" it had stored; retried, it is counted {without.count} times ({without.amount} for 5)"
    )
    assert retried.status == 202


# -- 4. dead sessions in the pool (DEFECT) --------------------------------------------


async def grow_pool(http: httpx.AsyncClient, server: ServerProcess, url: str, tag: str) -> int:
    """Writes to every partition at once until the instance holds several sessions."""

    async def post(payloads: list[Payload]) -> None:
        await http.post(f"{server.url}/pulses", json=payloads)

    for round_ in range(10):
        async with trio.open_nursery() as nursery:
            for n in range(3):
                nursery.start_soon(
                    post, [pulse(t, pulse_id=f"{tag}-{round_}-{n}-{t}") for t in TENANTS]
                )
        [(sessions,)] = await trio.to_thread.run_sync(
            query,
            url,
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 'billing-ingestor' AND datname = current_database()",
        )
        if sessions >= 5:
            return int(sessions)
    return int(sessions)


async def read_and_write(
    http: httpx.AsyncClient, server: ServerProcess, tag: str
) -> tuple[Answered, Answered]:
    """GET /aggregates and a one-pulse POST, at the same time."""
    answers: dict[str, Answered] = {}

    async def ask(name: str, request: Awaitable[httpx.Response]) -> None:
        answers[name], _ = await timed(request)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, "read", http.get(f"{server.url}/aggregates"))
        nursery.start_soon(
            ask, "write", http.post(f"{server.url}/pulses", json=pulse("tenant-3", pulse_id=tag))
        )
    return answers["read"], answers["write"]


async def test_dead_pooled_sessions_are_not_handed_out_one_after_another(
    private_postgres: PrivatePostgres, database: str, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """After the database restarted, or ended idle sessions by the DBA's
    idle_session_timeout, the pool still holds those sessions. A request must
    get a live one at once: the database is up. The pool tries the dead ones
    one after another, sleeping 0, 1, 2, 4 s between them, and answers 503
    store_busy when the busy timeout is over."""
    problems: list[str] = []
    figures: list[str] = []
    async with instances(tmp_path, database) as [server]:
        sessions = await grow_pool(http, server, database, "a")
        await trio.to_thread.run_sync(private_postgres.restart, "fast")
        read, write = await read_and_write(http, server, "after-restart")
        figures.append(f"restart, {sessions} sessions: {read.describe()}, {write.describe()}")
        if read.status != 200 or write.status != 202:
            problems.append(
                f"right after a restart of the database (up again), with {sessions} sessions"
                f" pooled: GET /aggregates {read.describe()}, POST {write.describe()}"
            )
    name = database.rsplit("/", 1)[1]
    private_postgres.execute(f"ALTER DATABASE {name} SET idle_session_timeout = '1s'")
    async with instances(tmp_path / "idle", database) as [server]:
        sessions = await grow_pool(http, server, database, "b")
        await trio.sleep(1.5)  # a lull: the server ends the idle sessions
        read, write = await read_and_write(http, server, "after-lull")
        figures.append(f"lull, {sessions} sessions: {read.describe()}, {write.describe()}")
        if read.status != 200 or write.status != 202:
            problems.append(
                f"after a lull longer than the database's idle_session_timeout (1 s), with"
                f" {sessions} sessions pooled: GET /aggregates"
                f" {read.describe()}, POST {write.describe()}"
            )
    print(f"\ndead pool: {figures}")
    assert not problems, "\n".join(problems)


# -- 5. back after an outage (DEFECT) -------------------------------------------------


async def test_an_instance_takes_pulses_again_once_the_database_is_back(
    private_postgres: PrivatePostgres, database: str, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """The database is down for a few seconds under light load, then back. The
    instance must take pulses again within about a busy timeout of its return.
    The pool reconnects only in psycopg_pool's retry loop, whose attempts come
    at 0, 1, 3, 7, 15, 31, ... s (each +-10%) after the first failure, for up
    to 5 minutes: after an outage of 3.6 s the next attempt is at 6.3-7.7 s.
    (A pool of one connection: one retry loop, so the figures are exact; a
    bigger pool runs a few loops side by side, as many gaps, some shorter.)"""
    async with instances(tmp_path, database, store_pool_size="1") as [server]:
        answers: list[Answered] = []
        stop = trio.Event()

        async def trickle() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                answers.append(await post_one(http, server, pulse("tenant-4", pulse_id=f"t{n}")))
                await trio.sleep(0.1)

        limit, patience = BUSY + 0.5, BUSY + 2.5
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            await trio.sleep(0.3)
            await trio.to_thread.run_sync(private_postgres.stop, "fast")
            await trio.sleep(3.6)
            await trio.to_thread.run_sync(private_postgres.start)
            back = trio.current_time()

            async def writing() -> bool:
                return any(a.status == 202 and a.started + a.seconds > back for a in answers)

            with trio.move_on_after(patience):
                await wait_until(writing, within=patience, what="a 202", interval=0.02)
            stop.set()
    during = Counter(a.describe().split(" in ")[0] for a in answers if a.status != 202)
    taken = [a.started + a.seconds - back for a in answers if a.status == 202]
    taken = [seconds for seconds in taken if seconds > 0]
    late = f"{taken[0]:.2f}" if taken else f"more than {patience}"
    assert taken, f"no 202 within {patience} s of the database's return: {dict(during)}"
    assert taken[0] <= limit, (
        f"the database was back, yet the instance answered 503 for {late} s more"
        f" (store_busy_timeout {BUSY} s; answers during the outage: {dict(during)})"
    )


# -- 6. a read-only failover target (DEFECT) ------------------------------------------


async def test_sessions_opened_on_a_read_only_target_do_not_refuse_writes_for_ever(
    private_postgres: PrivatePostgres, database: str, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """A failover: the sessions drop and reconnect to a target that is still
    read-only (a standby not yet promoted, a DNS name not yet moved); writes
    get 503 meanwhile (holds). Then the database is writable again: the pool
    keeps the read-only sessions for their lifetime (an hour), and every write
    on them still gets 503."""
    name = database.rsplit("/", 1)[1]
    async with instances(tmp_path, database) as [server]:
        assert (await post_one(http, server, pulse("tenant-5", pulse_id="before"))).status == 202
        private_postgres.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
        private_postgres.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()",
            database,
        )
        seen: list[Answered] = []

        async def refused() -> bool:
            answered, response = await timed(
                http.post(
                    f"{server.url}/pulses",
                    json=[pulse(t, pulse_id=f"ro-{len(seen)}-{t}") for t in TENANTS],
                )
            )
            seen.append(answered)
            return response is not None and "read-only" in response.text

        await wait_until(refused, within=10, what="writes refused as read-only")
        assert all(a.status == 503 and a.retry_after for a in seen), [a.describe() for a in seen]
        read, _ = await timed(http.get(f"{server.url}/aggregates"))
        assert read.status == 200, read.describe()

        private_postgres.execute(f"ALTER DATABASE {name} RESET default_transaction_read_only")
        after: list[Answered] = []
        deadline = trio.current_time() + 2
        while trio.current_time() < deadline:
            after.append(
                await post_one(http, server, pulse("tenant-5", pulse_id=f"rw{len(after)}"))
            )
            if after[-1].status == 202:
                break
            await trio.sleep(0.2)
    assert after[-1].status == 202, (
        f"the database has been writable for 2 s, and {len(after)} writes since all got"
        f" {Counter(a.describe().split(' in ')[0] for a in after)}: the pool keeps"
        " the sessions opened while it was read-only"
    )


# -- 7. the DBA's session defaults and locks (holds) ----------------------------------


async def test_database_timeouts_and_a_long_lock_table(
    private_postgres: PrivatePostgres, database: str, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """ALTER DATABASE sets statement_timeout 50 ms, lock_timeout 20 ms and
    idle_in_transaction_session_timeout 50 ms: the instances' own session
    settings win, so a write that waits 0.4 s for a lock still succeeds. A
    LOCK TABLE held longer than the busy timeout: writes, reads and commits
    get 503 store_busy + Retry-After within about that timeout, /readyz stays
    200, and everything works once it is released."""
    name = database.rsplit("/", 1)[1]
    for setting in (
        "statement_timeout = '50ms'",
        "lock_timeout = '20ms'",
        "idle_in_transaction_session_timeout = '50ms'",
    ):
        private_postgres.execute(f"ALTER DATABASE {name} SET {setting}")
    ledger = Ledger()
    async with instances(tmp_path, database) as [server]:
        await send_pulses(http, server.url, ledger, [pulse(t, pulse_id=f"a-{t}") for t in TENANTS])

        @contextlib.contextmanager
        def locked(tables: str) -> Iterator[None]:
            with psycopg.connect(database) as conn:
                # The DBA's session, which the database's new defaults would end.
                conn.execute("SET idle_in_transaction_session_timeout = 0")
                conn.execute(f"LOCK TABLE {tables} IN ACCESS EXCLUSIVE MODE")
                yield
                conn.rollback()

        async def release_after(seconds: float, stack: contextlib.ExitStack) -> None:
            await trio.sleep(seconds)
            stack.close()

        with contextlib.ExitStack() as stack:
            stack.enter_context(locked("buckets"))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(release_after, 0.4, stack)
                short = await send_pulses(
                    http, server.url, ledger, [pulse(t, pulse_id=f"b-{t}") for t in TENANTS]
                )
        assert short.response is not None
        assert short.response.status_code == 202
        assert short.response.json()["accepted"] == len(TENANTS), short.response.text

        answers: dict[str, Answered] = {}

        async def ask(name: str, request: Awaitable[httpx.Response]) -> None:
            answers[name], _ = await timed(request)

        with locked("pulses, buckets, batches"):
            async with trio.open_nursery() as nursery:
                for name, request in (
                    (
                        "write",
                        http.post(f"{server.url}/pulses", json=pulse("tenant-6", pulse_id="l")),
                    ),
                    ("read", http.get(f"{server.url}/aggregates")),
                    (
                        "commit",
                        http.post(f"{server.url}/aggregates/commit", json={"date": yesterday()}),
                    ),
                ):
                    nursery.start_soon(ask, name, request)
            ready = await http.get(f"{server.url}/readyz")
        for name, answered in answers.items():
            assert answered.status == 503, (name, answered.describe())
            assert answered.code == "store_busy", (name, answered.describe())
            assert answered.retry_after is not None
            # A commit's partitions wait for a pooled connection, then for the
            # lock: a few busy timeouts, not as long as the lock is held.
            assert answered.seconds < 4 * BUSY + 1, (name, answered.describe())
        assert ready.status_code == 200

        await send_pulses(http, server.url, ledger, [pulse("tenant-6", pulse_id="l")])
        committed = await http.post(f"{server.url}/aggregates/commit", json={"date": yesterday()})
        assert committed.status_code == 200, committed.text
        assert await aggregates(http, server) == ledger.expected_totals()
    assert ledger.problems() == []


# -- 8. max_connections reached (holds) -----------------------------------------------


async def test_max_connections_reached_fails_a_start_clearly_and_running_ones_go_on(
    private_postgres: PrivatePostgres, database: str, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Other clients take every connection the server allows. A new instance
    stops at once with one line that says so; a running one, whose pool cannot
    grow, still answers every request (202 here, else 503 + Retry-After) and
    none waits long; once connections are free, the new instance starts."""
    ledger = Ledger()
    hogs: list[psycopg.Connection[Any]] = []
    refused = ""
    late = ServerProcess(
        tmp_path / "late",
        env={"INGESTOR_STORE": database, "INGESTOR_STORE_BUSY_TIMEOUT": str(BUSY), **QUIET},
    )
    async with instances(tmp_path, database) as [running]:
        try:
            while len(hogs) < 100 and not refused:
                try:
                    hogs.append(psycopg.connect(private_postgres.admin_url, connect_timeout=5))
                except psycopg.OperationalError as exc:
                    refused = str(exc)
            assert "too many clients" in refused, refused
            started = trio.current_time()
            with pytest.raises(ServerError, match="too many clients"):
                await late.start()
            assert trio.current_time() - started < 5
            assert late.exit_codes == [1], late.output
            assert "Traceback" not in late.output

            answers: list[Answered] = []

            async def client(n: int) -> None:
                for i in range(5):
                    payloads = [pulse(t, pulse_id=f"m{n}-{i}-{t}") for t in TENANTS]
                    answers.append(await send(http, running, ledger, payloads))

            async with trio.open_nursery() as nursery:
                for n in range(4):
                    nursery.start_soon(client, n)
        finally:
            for hog in hogs:
                hog.close()
        wrong = [a.describe() for a in answers if a.status != 202 and not a.retry_after]
        assert wrong == [], f"neither 202 nor 503 + Retry-After: {wrong}"
        assert max(a.seconds for a in answers) < 2 * BUSY + 1
        await resend_until_stored(http, [running], ledger)
        assert await aggregates(http, running) == ledger.expected_totals()
        try:
            await late.start()
            assert await aggregates(http, late) == ledger.expected_totals()
        finally:
            await late.aclose()
    print(
        f"\nmax_connections: {len(hogs)} idle connections took the rest;"
        f" the running instance answered {Counter(a.status for a in answers)}"
    )


# -- 9. the database's disk full (holds) ----------------------------------------------


def fill(path: Path, leave: int) -> None:
    """Write zeros to `path` until `leave` bytes are free on its file system."""
    stat = os.statvfs(path.parent)
    chunk = b"\0" * (1 << 20)
    with open(path, "wb") as out:
        for _ in range((stat.f_bavail * stat.f_frsize - leave) // len(chunk)):
            out.write(chunk)


async def test_a_full_disk_under_the_database_is_503_store_full_then_recovers(
    private_postgres: PrivatePostgres, database: str, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """The database's disk fills up: writes and commits get 503 store_full +
    Retry-After (or, in a request of several partitions, items "not stored,
    retry"), reads go on; once space is freed, the same pulses are stored,
    exactly once, and the day commits."""
    if not private_postgres.tmpfs:
        _unavailable("no tmpfs for the database (mounting one needs root): cannot fill its disk")
    filler = private_postgres.disk / "filler"
    ledger = Ledger()
    day = yesterday()
    async with instances(tmp_path, database) as [server]:
        try:
            await trio.to_thread.run_sync(fill, filler, 3 << 20)
            full: list[Answered] = []
            not_stored: list[str] = []
            for n in range(60):
                payloads = [
                    pulse(t, pulse_id=f"{n}-{k}-{t}-{'x' * 90}") for k in range(40) for t in TENANTS
                ]
                started = trio.current_time()
                sent = await send_pulses(http, server.url, ledger, payloads)
                answered = Answered.of(started, sent.response)
                if answered.status == 202 and sent.response is not None:
                    items = sent.response.json()["items"]
                    not_stored += [item["error"] for item in items]
                    if items:
                        full.append(answered)
                elif answered.status != 202:
                    full.append(answered)
                if len([a for a in full if a.status == 503]) >= 2:
                    break
            assert full, "the disk never filled: the test proved nothing"
            wrong = [
                f"{a.describe()}: {a.message}"
                for a in full
                if a.status != 202
                and (a.status, a.code, a.retry_after) != (503, "store_full", "10")
            ]
            wrong += [
                e for e in not_stored if not e.startswith("not stored, retry") or "full" not in e
            ]
            assert wrong == [], (
                f"not a 503 store_full + Retry-After: {wrong[:5]}\n{private_postgres.log_tail()}"
            )
            commit, _ = await timed(
                http.post(f"{server.url}/aggregates/commit", json={"date": day})
            )
            assert commit.status in (200, 503), commit.describe()
            read, _ = await timed(http.get(f"{server.url}/aggregates", params={"limit": "10"}))
            assert read.status == 200, read.describe()
        finally:
            filler.unlink(missing_ok=True)
        await resend_until_stored(http, [server], ledger)
        committed = await http.post(f"{server.url}/aggregates/commit", json={"date": day})
        assert committed.status_code == 200, committed.text
        totals = await aggregates(http, server)
        assert totals == ledger.expected_totals()
        assert all(key[3] == day for key in totals)
    assert ledger.problems() == []
    print(f"\ndisk full: {[a.describe() for a in full]}; the commit meanwhile {commit.describe()}")
