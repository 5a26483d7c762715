"""PostgreSQL failover to a streaming-replication standby under running instances
(README, "More than one process or machine"; DESIGN §3).

Each test runs a primary and a standby of its own (`replicated`): PostgreSQL
clusters in a directory of their own, each on a free port of 127.0.0.1, the
standby made by `pg_basebackup -R` and streaming from the primary, fsync on.
Real `python -m ingestor serve` processes point at them with a libpq
multi-host URL (`postgresql://u:pw@127.0.0.1:P1,127.0.0.1:P2/billing?
target_session_attrs=read-write`), or at the standby alone. Then the primary
goes (pg_ctl stop, fast or immediate) and the standby is promoted.

1. synchronous replication, the primary crashes under load (with ids and
   without) while the periodic committer runs and writes wait inside their
   transactions: only 202, 503 + Retry-After or 500 outcome_unknown
   meanwhile, no hang; the instances write to the new primary by themselves;
   every acknowledged pulse is counted once, one instance leads the
   committer again, every bucket's batches add up to its total and every
   batch the sink got is the store's.
2. asynchronous replication, a planned switchover (fast stop: the primary
   sends all its WAL before it goes): the same, nothing lost.
3. asynchronous replication, the standby lags (the primary's WAL sender
   stopped) and the primary crashes: acknowledged pulses are lost, as README
   warns ("a PostgreSQL failover that lost committed transactions"); measured
   here. Nothing may be counted twice, a batch id made again with other
   content must be refused by the sink and left `failed`, as README promises,
   and the clients' replay of what was lost must be taken, once.
4. synchronous replication, the standby goes away: nothing may be
   acknowledged that only the primary holds, no request may hang, and once
   the standby is back every acknowledged pulse is counted once.
5. the same, a request spanning a partition whose COMMIT was given up on
   and a partition still locked by another such write: never answered 503
   "not stored, retry" (it was, and the store kept some of its pulses).
6. README tells operators what keeps an acknowledged pulse across a
   failover: a synchronous standby (`synchronous_standby_names`).
7. an instance pointed at the standby alone: not ready, writes 503 + Retry-
   After, reads served; ready and writing after the promotion, no restart.

The server binaries are /usr/lib/postgresql/*/bin; as root they run as the
`postgres` user. Without them the tests skip, or fail under the CI variable.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio

from ingestor.partition import partition_of
from ingestor.store.postgres import APPLICATION, _where
from tests.e2e.cluster_support import child_pids, frozen, unavailable
from tests.e2e.conftest import ABORTED_UPLOADS
from tests.e2e.test_cluster import (
    all_committed,
    batches_with_records,
    check_outbox,
    sole_leader,
)
from tests.e2e.test_postgres_operations import (
    BUSY,
    TENANTS,
    Answered,
    Load,
    instances,
    post_one,
    pulse,
    resend_until_stored,
    timed,
    yesterday,
)
from tests.support.fixtures import StartServer
from tests.support.server import (
    Attempt,
    BucketKey,
    Ledger,
    Payload,
    ServerError,
    ServerProcess,
    Total,
    check_pulses_stored_once,
    collect_pages,
    exact_sum,
    free_port,
    post_until_stored,
    totals_of,
    wait_until,
)

pytestmark = [pytest.mark.e2e, *ABORTED_UPLOADS]

README = Path(__file__).resolve().parents[2] / "README.md"
DATABASE = "billing"
SECRET = f"pw-{secrets.token_hex(8)}"  # in the store URL; trust auth never asks for it
# An answer slower than this is a hang: a request waits a busy timeout for a
# pooled connection and about three for a database that stopped answering.
SLOWEST = 4 * BUSY + 2
OUTAGE = 4 * BUSY + 4  # how long the synchronous standby is gone: longer than any answer
# The periodic committer every second, for yesterday's pulses as they come.
COMMITTING = {"commit_interval": "1", "commit_grace": "1"}
DELIVERY_STATE = {"status", "attempts", "last_error", "next_attempt_at", "delivered_at"}
_SETTINGS = """
listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 4
max_connections = 60
shared_buffers = 16MB
wal_keep_size = 128MB
wal_receiver_status_interval = 1s
hot_standby = on
"""


# -- a primary and its standby ------------------------------------------------------


def _binaries() -> Path | None:
    found = sorted(
        (path.parent for path in Path("/usr/lib/postgresql").glob("*/bin/pg_basebackup")),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
    )
    return found[-1] if found else None


@dataclass
class Node:
    """One PostgreSQL cluster, run with pg_ctl as the owner of its files."""

    bin: Path
    root: Path
    name: str
    port: int
    as_owner: list[str]

    @property
    def data(self) -> Path:
        return self.root / self.name

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def url(self) -> str:
        return f"postgresql://postgres:{SECRET}@127.0.0.1:{self.port}/{DATABASE}"

    def run(self, program: str, *args: str, timeout: float = 60) -> str:
        done = subprocess.run(
            [*self.as_owner, str(self.bin / program), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert done.returncode == 0, (
            f"{program} {' '.join(args)}: {done.stdout}{done.stderr}\n{self.log_tail()}"
        )
        return done.stdout

    def pg_ctl(self, *args: str) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", *args)

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"

    def start(self) -> None:
        self.pg_ctl("-o", f"-p {self.port} -k {self.root}", "start")

    def stop(self, mode: str) -> None:
        self.pg_ctl("-m", mode, "stop")

    def promote(self) -> None:
        self.pg_ctl("promote")

    def sql(self, statement: str, url: str | None = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(url or self.admin_url, autocommit=True, connect_timeout=5) as conn:
            cursor = conn.execute(statement.encode())
            return cursor.fetchall() if cursor.description else []

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def processes(self) -> list[int]:
        """The postmaster and every process it runs."""
        try:
            postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        return [postmaster, *child_pids(postmaster)]


@dataclass
class Replicated:
    """A primary, streaming to a standby."""

    primary: Node
    standby: Node

    @property
    def url(self) -> str:
        """Both servers; libpq connects to whichever takes writes."""
        return (
            f"postgresql://postgres:{SECRET}@127.0.0.1:{self.primary.port},"
            f"127.0.0.1:{self.standby.port}/{DATABASE}?target_session_attrs=read-write"
        )

    def make_synchronous(self) -> None:
        """Commits on the primary wait for the standby's flush (set on the primary
        only, after the base backup: the promoted standby has no standby to wait for)."""
        self.primary.sql("ALTER SYSTEM SET synchronous_standby_names = '*'")
        self.primary.sql("SELECT pg_reload_conf()")
        self.wait_streaming("sync")

    def wait_streaming(self, state: str) -> None:
        """Until the standby streams, in `state` ("sync", "async" or "any")."""
        for _ in range(300):
            rows = self.primary.sql("SELECT state, sync_state FROM pg_stat_replication")
            if rows and rows[0][0] == "streaming" and (state == "any" or rows[0][1] == state):
                return
            time.sleep(0.05)
        raise AssertionError(f"the standby is not streaming ({state}): {rows}")

    def wal_sender(self) -> int:
        """The primary's process that streams to the standby."""
        rows = self.primary.sql("SELECT pid FROM pg_stat_replication")
        assert rows, "the primary streams to no standby"
        return int(rows[0][0])


# A write of an instance waiting inside its transaction: it holds its partition's
# advisory lock and waits, for a heavyweight lock, on the session `holder`, and
# began to wait less than `fresh` seconds ago (lock_timeout, a busy timeout, ends
# such a wait: a fresh one still waits as the primary is stopped right after).
_WAITING_WRITES = """
SELECT a.pid FROM pg_stat_activity AS a
WHERE a.datname = current_database() AND a.application_name = %(app)s
    AND a.state = 'active' AND a.wait_event_type = 'Lock'
    AND %(holder)s = ANY (pg_blocking_pids(a.pid))
    AND EXISTS (SELECT FROM pg_locks AS l
                WHERE l.pid = a.pid AND l.locktype = 'advisory' AND l.granted)
    AND clock_timestamp() - a.query_start < make_interval(secs => %(fresh)s)
"""


class PulseWritesHeld:
    """A transaction of the test's own on `node` holding the `pulses` table in
    SHARE ROW EXCLUSIVE mode. That mode conflicts with the ROW EXCLUSIVE lock an
    INSERT takes, not with the ACCESS SHARE of a SELECT: an instance's write
    (`PostgresStore.write_pulses`) begins its transaction, takes its partition's
    advisory lock, looks its ids up, and then waits at its INSERT INTO pulses,
    inside its transaction, until this one ends. The committer's and the
    deliverer's writes (buckets and batches only) go on. Blocking calls: run
    them in a thread."""

    def __init__(self, node: Node) -> None:
        self.holder = psycopg.connect(node.url, connect_timeout=5)  # a transaction
        try:
            self.watcher = psycopg.connect(node.url, autocommit=True, connect_timeout=5)
        except BaseException:
            self.holder.close()
            raise
        try:
            # Waits for the writes holding ROW EXCLUSIVE now (their COMMITs) to end.
            self.holder.execute("SET lock_timeout = '10s'")
            self.holder.execute("LOCK TABLE pulses IN SHARE ROW EXCLUSIVE MODE")
        except BaseException:
            self.close()
            raise

    def wait_for_writes(self, within: float = 10) -> list[int]:
        """The server processes of the writes now waiting inside their
        transactions on this lock, once there is one, each waiting for less
        than half a busy timeout."""
        holder = self.holder.info.backend_pid
        args = {"app": APPLICATION, "holder": holder, "fresh": BUSY / 2}
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            rows = self.watcher.execute(_WAITING_WRITES.encode(), args).fetchall()
            if rows:
                return [int(row[0]) for row in rows]
            time.sleep(0.01)
        raise AssertionError(f"no write waited on the lock on pulses within {within} s")

    def close(self) -> None:
        """Ends both sessions; once the server is gone, without a word."""
        self.holder.close()
        self.watcher.close()


@pytest.fixture(scope="module")
def template() -> Iterator[tuple[Path, Path, list[str]]]:
    """(binaries, a stopped cluster to copy, the owner's command prefix), made once."""
    binaries = _binaries()
    if binaries is None:
        unavailable("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin")
    assert binaries is not None
    owner: list[str] = []
    if os.geteuid() == 0:
        # initdb refuses root: the servers run as `postgres`, in directories it owns.
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root and there is no postgres user to run PostgreSQL as")
        if shutil.which("runuser") is None:
            unavailable("running as root without runuser: cannot run PostgreSQL as postgres")
        owner = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="ingestor-failover-template-"))
    try:
        if owner:
            shutil.chown(root, "postgres", "postgres")
        made = subprocess.run(
            [*owner, str(binaries / "initdb"), "-D", str(root / "data"), "-A", "trust",
             "-U", "postgres", "-E", "UTF8", "--no-sync"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if made.returncode != 0:
            unavailable(f"initdb failed: {made.stdout}{made.stderr}")
        with open(root / "data" / "postgresql.conf", "a") as conf:
            conf.write(_SETTINGS)
        yield binaries, root / "data", owner
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def replicated(template: tuple[Path, Path, list[str]]) -> Iterator[Replicated]:
    """A primary with a database `billing`, and a standby streaming from it
    (asynchronously); both stopped and removed at the end, whatever happened."""
    binaries, data, owner = template
    root = Path(tempfile.mkdtemp(prefix="ingestor-failover-"))
    primary = Node(binaries, root, "primary", free_port(), owner)
    standby = Node(binaries, root, "standby", free_port(), owner)
    try:
        if owner:
            shutil.chown(root, "postgres", "postgres")
        subprocess.run([*owner, "cp", "-a", str(data), str(primary.data)], check=True)
        primary.start()
        primary.sql(f"CREATE DATABASE {DATABASE}")
        primary.run(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
            "-D", str(standby.data), "-R", "-X", "stream", "-c", "fast",
        )  # fmt: skip
        standby.start()
        pair = Replicated(primary, standby)
        pair.wait_streaming("any")
        yield pair
    finally:
        for node in (standby, primary):
            for pid in node.processes():  # a test may have left a process stopped
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            if (node.data / "postmaster.pid").exists():
                subprocess.run(
                    [*owner, str(binaries / "pg_ctl"), "-D", str(node.data), "-m", "immediate",
                     "-w", "-t", "30", "stop"],
                    capture_output=True, timeout=60, check=False,
                )  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30.0) as client:
        yield client


# -- what the clients were told, against what the store holds -------------------------


def wrong_answers(answers: Sequence[Answered]) -> list[str]:
    """Answers other than 202, 503 + Retry-After or 500 outcome_unknown, and
    answers slower than a hang's bound."""
    wrong = [
        a.describe()
        for a in answers
        if a.status != 202
        and not (a.status == 503 and a.retry_after)
        and (a.status, a.code) != (500, "outcome_unknown")
    ]
    wrong += [f"slow: {a.describe()}" for a in answers if a.seconds > SLOWEST]
    return wrong


def _maybe_stored(attempt: Attempt) -> bool:
    """An answer that leaves open whether a pulse is stored."""
    return (
        attempt.status_code == 500
        or attempt.answer in (None, "no answer")
        or (attempt.error or "").startswith("may be stored")
    )


@dataclass
class Audit:
    """The store against the answers: `lost` (acknowledged, not stored: pulses
    with ids as (tenant, id), and buckets of pulses without), `doubled` (stored
    more than once, or more than acknowledged plus unknown outcomes) and
    `unknown` (an id stored that no answer accounts for)."""

    acknowledged: int
    lost_ids: list[tuple[str, str]]
    lost_buckets: list[str]
    doubled_ids: list[str]
    over_buckets: list[str]
    unknown: list[str]

    @property
    def lost(self) -> list[str]:
        return [f"{tenant}/{i}" for tenant, i in self.lost_ids] + self.lost_buckets

    @property
    def doubled(self) -> list[str]:
        return self.doubled_ids + self.over_buckets


async def audit(http: httpx.AsyncClient, server: ServerProcess, ledger: Ledger) -> Audit:
    """Pulses with ids (sku "sku") by id, through GET /pulses; pulses without
    (sku "no-id") by their buckets' totals, bounded above by the pulses whose
    outcome nobody knows."""
    day = yesterday()
    acknowledged: dict[str, set[str]] = defaultdict(set)
    for attempt in ledger.stored():
        if attempt.identity is not None:
            acknowledged[attempt.identity[0]].add(attempt.identity[1])
    lost_ids: list[tuple[str, str]] = []
    lost_buckets: list[str] = []
    doubled_ids: list[str] = []
    over_buckets: list[str] = []
    unknown: list[str] = []
    for tenant in TENANTS:
        rows = await collect_pages(
            http,
            f"{server.url}/pulses",
            "pulses",
            {"tenant_id": tenant, "date": day, "product_sku": "sku"},
            limit=10_000,
        )
        listed = Counter(row["id"] for row in rows)
        doubled_ids += [f"{tenant}/{i} x{n}" for i, n in listed.items() if n > 1]
        lost_ids += [(tenant, i) for i in sorted(acknowledged[tenant] - set(listed))]
        unknown += [f"{tenant}/{i}" for i in sorted(set(listed) - acknowledged[tenant])]
    expected = ledger.expected_totals()
    maybe: dict[BucketKey, list[Decimal]] = defaultdict(list)
    for attempt in ledger.attempts:
        if attempt.identity is None and _maybe_stored(attempt):
            assert isinstance(attempt.payload, Mapping)
            maybe[ledger.bucket_of(attempt)].append(Decimal(attempt.payload["used_amount"]))
    held = totals_of(
        await collect_pages(http, f"{server.url}/aggregates", "aggregates", limit=1000)
    )
    zero = Total(Decimal(0), 0)
    for key in (expected.keys() | held.keys() | maybe.keys()) - {
        k for k in expected.keys() | held.keys() if k[1] == "sku"
    }:
        low, got = expected.get(key, zero), held.get(key, zero)
        extra = maybe.get(key, [])
        high = Total(exact_sum([low.amount, *extra]), low.count + len(extra))
        if got.count < low.count or got.amount < low.amount:
            lost_buckets.append(f"{key}: {got} of {low} acknowledged")
        if got.count > high.count or got.amount > high.amount:
            over_buckets.append(f"{key}: {got}, at most {high} acknowledged or unknown")
    count = sum(len(ids) for ids in acknowledged.values())
    count += sum(total.count for key, total in expected.items() if key[1] != "sku")
    return Audit(count, lost_ids, lost_buckets, doubled_ids, over_buckets, unknown)


def sink_files(servers: Sequence[ServerProcess], day: str) -> dict[str, list[Any]]:
    """Every batch the file sinks of `servers` hold for `day`: id -> contents."""
    found: dict[str, list[Any]] = defaultdict(list)
    for server in servers:
        for path in sorted((server.deliveries / day).glob("*.json")):
            found[path.stem].append(json.loads(path.read_bytes()))
    return dict(found)


def as_delivered(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A batch as GET /batches/{id} shows it, less its delivery state: what a sink gets."""
    return {key: value for key, value in batch.items() if key not in DELIVERY_STATE}


async def settled_outbox(
    http: httpx.AsyncClient, servers: Sequence[ServerProcess], day: str
) -> dict[str, dict[str, Any]]:
    """The day's batches once every one is delivered or failed, or after 5 s (a
    batch whose claim a crash kept waits for its lease's end, README)."""

    async def settled() -> bool:
        batches = await batches_with_records(http, servers[0], [day])
        return all(b["status"] != "pending" for b in batches.values())

    with trio.move_on_after(5):
        await wait_until(settled, within=5, interval=0.2, what="batches delivered")
    return await batches_with_records(http, servers[0], [day])


def leased_too_long(batches: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Pending batches not due again within a lease (2 x sink_timeout + 5 s + 30 s)."""
    now = dt.datetime.now(dt.UTC)
    late = {}
    for batch_id, batch in batches.items():
        if batch["status"] == "pending" and batch["next_attempt_at"] is not None:
            left = (dt.datetime.fromisoformat(batch["next_attempt_at"]) - now).total_seconds()
            if left > 56:
                late[batch_id] = left
    return late


# -- 1, 2. a promotion under load -------------------------------------------------------


@pytest.mark.parametrize(
    ("synchronous", "mode"),
    [(True, "immediate"), (False, "fast")],
    ids=["synchronous-crash", "asynchronous-switchover"],
)
async def test_a_promoted_standby_takes_over_and_every_acknowledged_pulse_counts_once(
    replicated: Replicated,
    http: httpx.AsyncClient,
    tmp_path: Path,
    synchronous: bool,
    mode: str,
) -> None:
    """Two instances on a multi-host URL under load, with ids and without, the
    periodic committer running; the primary goes (a crash with a synchronous
    standby, a fast stop, which sends the standby all WAL first, with an
    asynchronous one) and the standby is promoted. Whatever the instances
    answered meanwhile must be true: a 202 whose pulse the new primary lacks is
    lost revenue, one counted twice an overcharge. They must not hang or answer
    500 with a traceback, must write to the new primary without a restart, hand
    the committer's lead to exactly one of them, and every batch a sink got must
    be the store's, each unit of usage in exactly one batch.

    The primary goes while writes wait inside their transactions (partition
    locks held, a lock of the test's own on `pulses` stopping their INSERTs):
    left to chance, on a loaded machine no write was in flight as it went, the
    failover failed none and the test proved nothing."""
    if synchronous:
        await trio.to_thread.run_sync(replicated.make_synchronous)
    day = yesterday()
    async with instances(tmp_path, replicated.url, 2, **COMMITTING) as servers:
        await wait_until(partial(sole_leader, http, servers), within=15, what="one instance leads")
        load = Load(servers)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for number in range(4):
                    nursery.start_soon(load.client, http, number)
                await load.flowing(300, 15, "load before the failover")
                # Writes held inside their transactions: the primary goes under one.
                held = await trio.to_thread.run_sync(PulseWritesHeld, replicated.primary)
                try:
                    waiting = await trio.to_thread.run_sync(held.wait_for_writes)
                    await trio.to_thread.run_sync(replicated.primary.stop, mode)
                finally:
                    held.close()  # its session went with the primary
                await trio.sleep(0.5)  # a dead primary and a read-only standby meanwhile
                await trio.to_thread.run_sync(replicated.standby.promote)
                back = await load.flowing(150, 15, "load on the promoted standby")
                load.stop.set()
            await resend_until_stored(http, servers, load.ledger)
        statuses = Counter((a.status, a.code) for a in load.answers)
        assert wrong_answers(load.answers) == [], statuses
        assert load.ledger.problems() == []
        assert any(a.status != 202 for a in load.answers) or any(
            a.answer == "rejected" for a in load.ledger.attempts
        ), f"the failover failed no write: the test proved nothing ({statuses})"

        leader = await wait_until(
            partial(sole_leader, http, servers), within=15, what="one instance leads again"
        )
        await wait_until(
            partial(all_committed, http, servers[0]), within=15, what="the day committed"
        )
        found = await audit(http, servers[0], load.ledger)
        assert (found.lost, found.doubled, found.unknown) == ([], [], []), (
            f"of {found.acknowledged} acknowledged pulses: lost {found.lost[:10]},"
            f" counted twice {found.doubled[:10]}, stored unacknowledged {found.unknown[:10]}"
        )
        totals = totals_of(
            await collect_pages(http, f"{servers[1].url}/aggregates", "aggregates", limit=1000)
        )
        batches = await settled_outbox(http, servers, day)
        assert check_outbox(batches, totals) == []
        assert [b for b, batch in batches.items() if batch["status"] == "failed"] == []
        assert leased_too_long(batches) == {}
        files = sink_files(servers, day)
        foreign = [b for b in files if b not in batches]
        changed = [b for b, held in files.items() if b in batches and any(
            content != as_delivered(batches[b]) for content in held
        )]  # fmt: skip
        assert (foreign, changed) == ([], []), (
            "batches the sinks got that the store does not hold, or holds with other content"
        )
    for server in servers:
        assert SECRET not in server.output, "the store URL's password is in the log"
    print(
        f"\n{'sync' if synchronous else 'async'} failover ({mode} stop): {found.acknowledged}"
        f" pulses acknowledged, {len(waiting)} writes waiting in their transactions as the"
        f" primary went, answers {dict(statuses)},"
        f" {sum(a.answer == 'rejected' for a in load.ledger.attempts)} pulses rejected;"
        f" writing again {back:.2f} s after the promotion; leader {leader[0].port};"
        f" {len(batches)} batches, {len(files)} in sinks"
    )


# -- 3. a lagging asynchronous standby --------------------------------------------------


def _quit_pending(pid: int) -> bool:
    bit = 1 << (signal.SIGQUIT - 1)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("SigPnd", "ShdPnd") and int(value.strip(), 16) & bit:
            return True
    return False


async def told_to_quit(pid: int) -> bool:
    """Whether a SIGQUIT waits for process `pid` (stopped, it has not acted on it)."""
    return await trio.to_thread.run_sync(_quit_pending, pid)


async def test_a_lagging_asynchronous_standby_loses_pulses_but_counts_none_twice(
    replicated: Replicated, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """With asynchronous replication a commit returns before the standby has it:
    a crash of the primary while the standby lags loses acknowledged pulses, and
    batches already delivered (README: "a PostgreSQL failover that lost
    committed transactions"). How many is measured here. What must hold anyway:
    nothing counted twice, the instance writing to the new primary by itself, the
    store's own outbox adding up, and a batch id made again with other content
    refused by the sink and left `failed` (README), not delivered over the
    first: a billing system that took both would bill the forgotten usage and
    the new usage under one id, or drop one of them."""
    day = yesterday()
    async with instances(tmp_path, replicated.url, 1, **COMMITTING) as servers:
        load = Load(servers)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for number in range(3):
                    nursery.start_soon(load.client, http, number)
                await load.flowing(200, 15, "load before the lag")
                sender = await trio.to_thread.run_sync(replicated.wal_sender)
                with frozen(sender):
                    acknowledged_before = load.accepted()
                    await load.flowing(300, 15, "load while the standby lags")
                    await trio.sleep(1.5)  # commits of the day, and their deliveries
                    lag = load.accepted() - acknowledged_before
                    # The primary crashes before it sends the standby anything more:
                    # the WAL sender goes on only once told to quit with the rest.
                    async with trio.open_nursery() as crash:
                        crash.start_soon(
                            trio.to_thread.run_sync, replicated.primary.stop, "immediate"
                        )
                        await wait_until(
                            partial(told_to_quit, sender), within=10, what="SIGQUIT sent"
                        )
                        os.kill(sender, signal.SIGCONT)
                await trio.to_thread.run_sync(replicated.standby.promote)
                back = await load.flowing(150, 15, "load on the promoted standby")
                load.stop.set()
            await resend_until_stored(http, servers, load.ledger)
        statuses = Counter((a.status, a.code) for a in load.answers)
        assert wrong_answers(load.answers) == [], statuses
        assert load.ledger.problems() == []
        await wait_until(
            partial(all_committed, http, servers[0]), within=15, what="the day committed"
        )
        found = await audit(http, servers[0], load.ledger)
        assert (found.doubled, found.unknown) == ([], []), (
            f"counted twice {found.doubled[:10]}, stored unacknowledged {found.unknown[:10]}"
        )
        totals = totals_of(
            await collect_pages(http, f"{servers[0].url}/aggregates", "aggregates", limit=1000)
        )
        batches = await settled_outbox(http, servers, day)
        assert check_outbox(batches, totals) == []
        assert leased_too_long(batches) == {}
        files = sink_files(servers, day)
        forgotten = [b for b in files if b not in batches]
        reused = {b for b, held in files.items() if b in batches and any(
            content != as_delivered(batches[b]) for content in held
        )}  # fmt: skip
        delivered_over = [b for b in sorted(reused) if batches[b]["status"] != "failed"]
        assert delivered_over == [], (
            "batch ids the sink holds with other content, yet not failed in the store:"
            f" {[(b, batches[b]['status'], batches[b]['last_error']) for b in delivered_over]}"
        )

        # What is left is the clients' own record: replayed, each lost pulse must
        # be taken again, once, not refused as a duplicate of what is gone.
        lost = set(found.lost_ids)
        replayed = [a.payload for a in load.ledger.stored() if a.identity in lost]
        replay = Ledger()
        await post_until_stored(http, servers[0].url, replay, replayed)
        assert replay.problems() == []
        assert [a.answer for a in replay.attempts if a.answer == "duplicate"] == []
        after = await audit(http, servers[0], load.ledger)
        assert (after.lost_ids, after.doubled, after.unknown) == ([], [], []), (
            f"after the replay: lost {after.lost_ids[:10]}, counted twice {after.doubled[:10]},"
            f" unacknowledged {after.unknown[:10]}"
        )
    print(
        f"\nasync failover while the standby lagged: {lag} pulses acknowledged during the"
        f" lag, {len(found.lost_ids)} acknowledged pulses with ids and"
        f" {len(found.lost_buckets)} buckets' pulses without lost, of {found.acknowledged};"
        f" answers {dict(statuses)};"
        f" writing again {back:.2f} s after the promotion; {len(batches)} batches,"
        f" {len(reused)} ids made again with other content (failed), {len(forgotten)}"
        " delivered batches the store forgot"
    )


# -- 4, 5. a synchronous standby that goes away ----------------------------------------------


async def test_without_its_synchronous_standby_a_primary_acknowledges_nothing_and_none_hangs(
    replicated: Replicated, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """The synchronous standby stops (its machine reboots, its network goes):
    every commit on the primary waits for it, partition locks held. An
    instance that answered 202 meanwhile would acknowledge pulses only the
    primary holds (its sessions' synchronous_commit turned down, a wait cut
    short), which the next failover loses; one that waited on would leave
    clients hanging. Each request must be answered within a few busy timeouts,
    never 202 with a pulse accepted, and once the standby is back the instance
    must take pulses again with every acknowledged one counted once."""
    await trio.to_thread.run_sync(replicated.make_synchronous)
    async with instances(tmp_path, replicated.url, 1) as servers:
        load = Load(servers)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for number in range(3):
                    nursery.start_soon(load.client, http, number)
                await load.flowing(150, 15, "load with the standby")
                await trio.to_thread.run_sync(replicated.standby.stop, "fast")
                gone, gone_at = trio.current_time(), dt.datetime.now(dt.UTC)
                await trio.sleep(OUTAGE)
                during = [a for a in load.answers if a.started > gone]
                returning_at = dt.datetime.now(dt.UTC)
                await trio.to_thread.run_sync(replicated.standby.start)
                back = await load.flowing(150, 15, "load once the standby is back")
                load.stop.set()
            await resend_until_stored(http, servers, load.ledger)
        statuses = Counter((a.status, a.code) for a in load.answers)
        assert wrong_answers(load.answers) == [], statuses
        assert load.ledger.problems() == []
        acknowledged = [
            attempt.payload
            for attempt in load.ledger.attempts
            if attempt.answer == "accepted"
            and attempt.sent_at > gone_at
            and attempt.answered_at is not None
            and attempt.answered_at < returning_at
        ]
        assert acknowledged == [], (
            f"{len(acknowledged)} pulses acknowledged while no standby could have them:"
            f" {acknowledged[:3]}"
        )
        # Pulses without ids answered 503 may be stored here all the same (the
        # test below shows how, every time): their buckets are not compared here.
        found = await audit(http, servers[0], load.ledger)
        assert (found.lost, found.doubled_ids, found.unknown) == ([], [], []), (
            f"of {found.acknowledged} acknowledged pulses: lost {found.lost[:10]},"
            f" stored twice {found.doubled_ids[:10]}, stored unacknowledged {found.unknown[:10]}"
        )
    print(
        f"\nthe synchronous standby gone for {OUTAGE:g} s: answers meanwhile"
        f" {dict(Counter(a.describe().split(' in ')[0] for a in during))}, the slowest"
        f" {max((a.seconds for a in during), default=0):.2f} s; writing again {back:.2f} s"
        f" after it was back; buckets of pulses without ids holding more than was"
        f" acknowledged or answered 'may be stored': {len(found.over_buckets)}"
    )


async def test_a_request_whose_pulses_may_be_stored_is_never_answered_not_stored(
    replicated: Replicated, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Without its synchronous standby, a write's COMMIT waits, its partition's
    lock held: the instance gives up on it after three busy timeouts and cannot
    tell whether it will commit (it does, once the standby is back). A request
    whose pulses span such a partition and one still locked by an earlier such
    write must be answered 500 outcome_unknown (or "may be stored" items), as
    README says: never 503 "not stored, retry", which a client answers by
    sending the pulses again, and pulses without ids are then billed twice."""
    held = TENANTS[0]
    other = next(t for t in TENANTS if partition_of(t, 16) != partition_of(held, 16))
    await trio.to_thread.run_sync(replicated.make_synchronous)
    async with instances(tmp_path, replicated.url, 1) as [server]:
        ledger = Ledger()
        warm = [pulse(t, pulse_id=f"warm-{t}") for t in (held, other)]
        await post_until_stored(http, server.url, ledger, warm)
        await trio.to_thread.run_sync(replicated.standby.stop, "fast")
        answers: dict[str, Answered] = {}

        async def post(name: str, payloads: list[Payload]) -> None:
            answers[name], _ = await timed(http.post(f"{server.url}/pulses", json=payloads))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                # Its COMMIT waits for the standby, holding `held`'s partition.
                nursery.start_soon(post, "first", [pulse(held, "5", pulse_id=None, sku="first")])
                await trio.sleep(0.5)
                await post(
                    "mixed",
                    [
                        pulse(other, "7", pulse_id=None, sku="mixed"),
                        pulse(held, "11", pulse_id=None, sku="mixed"),
                    ],
                )
            await trio.to_thread.run_sync(replicated.standby.start)
            await post_until_stored(
                http, server.url, ledger, [pulse(t, pulse_id=f"back-{t}") for t in (held, other)]
            )
        totals = totals_of(
            await collect_pages(http, f"{server.url}/aggregates", "aggregates", limit=1000)
        )
    day = yesterday()
    kept = {
        tenant: totals.get((tenant, "mixed", "call", day), Total(Decimal(0), 0)).count
        for tenant in (other, held)
    }
    mixed, first = answers["mixed"], answers["first"]
    assert first.status == 500, first.describe()  # the COMMIT given up on: outcome unknown
    assert not (mixed.status == 503 and any(kept.values())), (
        f"answered {mixed.describe()} ({mixed.message}), yet the store kept {kept} of its"
        " pulses: a client told 'not stored, retry' sends them again and they count twice"
    )
    assert mixed.status in (202, 500), mixed.describe()


# -- 6. what README tells operators -------------------------------------------------------


def test_readme_tells_operators_which_setting_keeps_acknowledged_pulses_across_a_failover() -> None:
    """A 202 promises the pulse is stored durably. With PostgreSQL's default
    asynchronous replication a failover loses what the standby had not yet
    received (test above): acknowledged pulses, i.e. usage never billed, and
    delivered batches whose ids are made again with other content. README
    mentions such a failover only as a cause of reused batch ids; an operator
    setting up high availability must be told that only a synchronous standby
    (`synchronous_standby_names` on the primary, `synchronous_commit` on, which
    every instance's sessions set) keeps every acknowledged pulse."""
    text = README.read_text()
    assert "synchronous_standby_names" in text, (
        "README never names synchronous_standby_names: an operator running a standby"
        " gets asynchronous replication, and a failover loses acknowledged pulses"
    )


# -- 7. an instance on the standby --------------------------------------------------------


class AnswersWhileUnready(ServerProcess):
    """Started once GET /readyz answers at all, 200 or not: an instance on a
    standby is not ready until the promotion."""

    async def _wait_ready(self) -> None:
        deadline = trio.current_time() + self.ready_timeout
        async with httpx.AsyncClient(timeout=2.0) as client:
            while self.running:
                try:
                    await client.get(f"{self.url}/readyz")
                except httpx.TransportError:
                    pass
                else:
                    return
                if trio.current_time() >= deadline:
                    await self.kill()
                    raise ServerError(f"no answer within {self.ready_timeout} s:\n{self.tail()}")
                await trio.sleep(0.05)
        raise ServerError(f"the server exited before it answered:\n{self.tail()}")


async def test_an_instance_on_the_standby_refuses_writes_then_takes_them_once_promoted(
    replicated: Replicated,
    http: httpx.AsyncClient,
    tmp_path: Path,
    start_server: StartServer,
) -> None:
    """An instance whose store URL names the standby (a DNS name not yet moved, a
    replica's address in its config): its writes cannot be stored, so it must
    not pass for ready (a balancer would send it traffic) and must answer 503 +
    Retry-After, which a client retries, never 202, nor 500 (whose pulses a
    client may take as possibly stored). Reads are served. Once the standby is
    promoted it must become ready and store pulses without a restart, and the
    committer's lead must rest with exactly one instance."""
    async with instances(tmp_path, replicated.url, 1, **COMMITTING) as [writer]:
        ledger = Ledger()
        early = [pulse(t, "3", pulse_id=f"early-{t}") for t in TENANTS]
        await post_until_stored(http, writer.url, ledger, early)
        on_standby = await start_server(
            kind=AnswersWhileUnready,
            INGESTOR_STORE=replicated.standby.url,
            INGESTOR_STORE_BUSY_TIMEOUT=str(BUSY),
            INGESTOR_COMMIT_INTERVAL="1",
            INGESTOR_COMMIT_GRACE="1",
        )
        ready, _ = await timed(http.get(f"{on_standby.url}/readyz"))
        refused: list[Answered] = []
        for n in range(3):
            refused.append(
                await post_one(http, on_standby, pulse("tenant-1", pulse_id=f"refused-{n}"))
            )
        ready_after, _ = await timed(http.get(f"{on_standby.url}/readyz"))

        async def replicated_reads() -> bool:
            response = await http.get(f"{on_standby.url}/aggregates")
            assert response.status_code == 200, response.text
            rows = response.json()["aggregates"]
            return sum(int(row["pulse_count"]) for row in rows) == len(early)

        await wait_until(replicated_reads, within=10, what="the standby's reads")
        assert (ready.status, ready.code) == (503, "store_unavailable"), ready.describe()
        assert ready.retry_after, ready.describe()
        assert [(a.status, bool(a.retry_after)) for a in refused] == [(503, True)] * 3, [
            a.describe() for a in refused
        ]
        assert ready_after.status == 503, ready_after.describe()

        await trio.to_thread.run_sync(replicated.primary.stop, "fast")
        await trio.to_thread.run_sync(replicated.standby.promote)
        promoted = trio.current_time()

        async def is_ready() -> bool:
            return (await http.get(f"{on_standby.url}/readyz")).status_code == 200

        await wait_until(is_ready, within=10, what="the promoted standby's instance ready")
        became_ready = trio.current_time() - promoted
        late = [pulse(t, "5", pulse_id=f"late-{t}") for t in TENANTS]
        await post_until_stored(http, on_standby.url, ledger, late[:12], rounds=40)
        await post_until_stored(http, writer.url, ledger, late[12:], rounds=100)
        servers = [writer, on_standby]
        leader = await wait_until(
            partial(sole_leader, http, servers), within=15, what="one instance leads"
        )
        assert ledger.problems() == []
        for server in servers:
            await check_pulses_stored_once(http, server, ledger)
        await wait_until(
            partial(all_committed, http, on_standby), within=15, what="the day committed"
        )
    assert became_ready < 5, f"ready {became_ready:.2f} s after the promotion"
    print(
        f"\nan instance on the standby: ready {became_ready:.2f} s after the promotion;"
        f" writes before it {[a.describe() for a in refused]}; leader afterwards"
        f" {'the one on the standby' if leader[0] is on_standby else 'the other'}"
    )


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://app:pw@h1:5433,h2:5434/billing", "h1:5433,h2:5434/billing"),
        ("postgresql://app:pw@h1,h2/billing", "h1:5432,h2:5432/billing"),
        ("postgresql://h1,h2:6000/billing", "h1:5432,h2:6000/billing"),
        ("postgresql://h1:6000/billing", "h1:6000/billing"),
    ],
)
def test_messages_name_each_host_of_a_list_with_its_own_port(url: str, shown: str) -> None:
    """An operator reading "cannot connect" must be told which servers were
    tried: a list of hosts was shown as `h1,h2:5433,5434`, which reads as
    ports of one host, and a password never."""
    assert _where(url) == f"PostgreSQL at {shown}"
    assert "pw" not in _where(url)
