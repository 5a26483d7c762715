"""The disk under PostgreSQL fills up while instances run (README: the PostgreSQL
store; DESIGN §3).

tests/faults/test_disk_full.py fills SQLite's disk, and
tests/e2e/test_postgres_operations.py fills a private PostgreSQL's disk under
one instance sending arrays by hand. Here a PostgreSQL cluster of the test's
own has its data directory on one small tmpfs and its pg_wal on another
(`initdb --waldir`, 1 MiB segments), and two real `python -m ingestor serve`
instances share it under a mixed load (singles, arrays, NDJSON; pulses with
and without ids, today and yesterday), the periodic committer running every
second, a watcher committing both days by hand through either instance,
every instance's file sink delivering. A `Ballast` then takes every free byte
of one of the disks:

1. the data directory's disk: PostgreSQL stays up, and a write that needs a
   new page fails with ERROR 53100 "could not extend file" (psycopg's
   DiskFull, the store's `StoreFull`);
2. pg_wal's disk (WAL segments forced by `pg_switch_wal()`): PostgreSQL
   PANICs ("could not write to file pg_wal/xlogtemp") and, with
   `restart_after_crash = off` as under a cluster manager, stays down; the
   operator removes the ballast and starts it again (crash recovery).

What must hold, from README and DESIGN §3, each an assertion that can fail:
while the disk is full, POST /pulses is answered only 202, 503 + Retry-After
(`store_full`; `store_unavailable` while PostgreSQL is down) or 500
`outcome_unknown`, within a few busy timeouts; a commit the same or 200;
/healthz 200; GET /aggregates 200 while only writes fail. Once space is
back, without a restart of the instances: writes taken again within
seconds; the committer still leads and commits the due day by itself; no
acknowledged pulse lost, none counted twice (pulses with ids whose outcome
was unknown are sent again); every bucket's batches add up to its total (a
commit or a delivery record cut by the full disk left nothing half-done);
every batch in exactly one sink, once, with the outbox's content, none
failed; no traceback in the instances' output, and a line an operator
understands saying the disk is full. (/readyz stays 200: a full or
stopped database is every instance's alike, README.)

Found (DEFECT): while PostgreSQL was down, requests were answered 503
`store_busy`, not `store_unavailable`; and a delivery the sink had taken,
whose record the full disk refused for more than 0.6 s, stayed pending, to
be sent to the receiver again once its lease ended. Acknowledged pulses and
commits held in both cases.

Needs root (tmpfs mounts, PostgreSQL run as `postgres` through runuser) and
the server binaries under /usr/lib/postgresql/*/bin; without them the tests
skip, or fail under the CI variable (`unavailable`). Clusters are stopped,
tmpfs unmounted and directories removed at the end of each test.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psycopg
import pytest
import trio

from tests.e2e.cluster_support import Cluster, unavailable
from tests.e2e.conftest import ABORTED_UPLOADS
from tests.e2e.test_cluster import batches_with_records, check_outbox, sole_leader
from tests.e2e.test_failover_adversarial import DATABASE, Node, _binaries
from tests.faults.harness import (
    DELIVERY_STATE,
    Counts,
    PulseFactory,
    ResendingLoad,
    check_totals,
    commit_days,
    expected_totals,
)
from tests.faults.test_workers_exhaustion import Ballast
from tests.support.server import (
    Ledger,
    ServerError,
    ServerProcess,
    collect_pages,
    free_port,
    wait_until,
)

pytestmark = [pytest.mark.e2e, *ABORTED_UPLOADS]

BUSY = 1.0  # every instance's store_busy_timeout, in seconds
# An answer slower than this is a hang: a request waits up to two rounds of
# its shard (a busy timeout each), and about three for a session that died.
SLOWEST = 4 * BUSY + 2
HEAL_WITHIN = 10.0  # seconds from space (and PostgreSQL) back to pulses taken again
_SETTINGS = """
listen_addresses = '127.0.0.1'
max_connections = 60
shared_buffers = 16MB
restart_after_crash = off
min_wal_size = 2MB
max_wal_size = 1GB
checkpoint_timeout = 1h
"""


# -- a PostgreSQL cluster on two small disks ------------------------------------------


class DiskNode(Node):
    """`Node` whose data directory is on a tmpfs (`disk`) and pg_wal on another
    (`wal`); its log is beside them, never on a disk the test fills."""

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    @property
    def disk(self) -> Path:
        return self.root / "disk"

    @property
    def wal(self) -> Path:
        return self.root / "wal"

    def running(self) -> bool:
        try:
            with psycopg.connect(self.admin_url, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False


def _mount(path: Path, size_mib: int) -> None:
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        unavailable(f"cannot mount a tmpfs: {done.stderr.decode(errors='replace').strip()}")
    shutil.chown(path, "postgres", "postgres")


@contextlib.contextmanager
def postgres_on_small_disks(data_mib: int, wal_mib: int) -> Iterator[DiskNode]:
    """A running cluster with a database `billing`, its data directory on a
    tmpfs of `data_mib` MiB and its WAL on one of `wal_mib`; stopped, unmounted
    and removed at the end, whatever happened."""
    binaries = _binaries()
    if binaries is None:
        unavailable("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin")
    assert binaries is not None
    if os.geteuid() != 0:
        unavailable("filling PostgreSQL's disks needs root: a tmpfs mount, runuser")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        unavailable("running as root and there is no postgres user to run PostgreSQL as")
    if shutil.which("runuser") is None:
        unavailable("running as root without runuser: cannot run PostgreSQL as postgres")
    owner = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="ingestor-pg-disk-full-"))
    node = DiskNode(binaries, root, "disk/data", 0, owner)
    try:
        shutil.chown(root, "postgres", "postgres")
        _mount(node.disk, data_mib)
        _mount(node.wal, wal_mib)
        made = subprocess.run(
            [*owner, str(binaries / "initdb"), "-D", str(node.data), "--waldir",
             str(node.wal / "pg_wal"), "--wal-segsize=1", "-A", "trust", "-U", "postgres",
             "-E", "UTF8", "--no-sync"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if made.returncode != 0:
            unavailable(f"initdb failed: {made.stdout}{made.stderr}")
        with open(node.data / "postgresql.conf", "a") as conf:
            conf.write(_SETTINGS)
        node.port = free_port()
        node.start()
        node.sql(f"CREATE DATABASE {DATABASE}")
        yield node
    finally:
        for pid in node.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if (node.data / "postmaster.pid").exists():
            subprocess.run(
                [*owner, str(binaries / "pg_ctl"), "-D", str(node.data), "-m", "immediate",
                 "-w", "-t", "30", "stop"],
                capture_output=True, timeout=60, check=False,
            )  # fmt: skip
        for mount in (node.wal, node.disk):
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


def switch_wal_until_down(node: DiskNode, within: float) -> None:
    """Make PostgreSQL start new WAL segments until it goes down (pg_wal full)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            node.sql(
                "SELECT pg_logical_emit_message(false, 'fill', repeat('x', 100000)),"
                " pg_switch_wal()"
            )
        except psycopg.Error:
            if not node.running():
                return
        time.sleep(0.1)
    raise AssertionError(f"PostgreSQL still up {within} s after pg_wal filled:\n{node.log_tail()}")


# -- what clients and watchers saw --------------------------------------------------


class DiskLoad(ResendingLoad):
    """`ResendingLoad`, noting the error code of each refused answer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refused: list[tuple[float, float, str]] = []  # (started, ended, error code)

    def _note(
        self,
        client: int,
        started: float,
        response: httpx.Response | None,
        error: str | None,
        pulses: int,
    ) -> None:
        super()._note(client, started, response, error, pulses)
        if response is not None and response.status_code >= 400:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                code = response.json()["error"]["code"]
                self.refused.append((started, trio.current_time(), code))


@dataclass(frozen=True)
class Seen:
    """One request of a watcher, and its answer."""

    what: str
    server: int
    started: float
    took: float
    status: int | None
    code: str | None = None
    retry_after: str | None = None

    def describe(self) -> str:
        return (
            f"{self.what} via node{self.server}: {self.status} {self.code}"
            f" Retry-After={self.retry_after} in {self.took:.2f} s"
        )


async def look(
    http: httpx.AsyncClient, what: str, server: int, method: str, url: str, **kw: Any
) -> Seen:
    started = trio.current_time()
    try:
        response = await http.request(method, url, **kw)
    except httpx.HTTPError:
        return Seen(what, server, started, trio.current_time() - started, None)
    code = None
    if response.status_code >= 400:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            code = response.json()["error"]["code"]
    took = trio.current_time() - started
    return Seen(
        what, server, started, took, response.status_code, code, response.headers.get("retry-after")
    )


@dataclass
class Run:
    """One outage under load: the instances' answers, the watchers' and the times."""

    loads: list[DiskLoad]
    seen: list[Seen] = field(default_factory=list)
    full_at: float = 0.0  # the ballast in place
    freed_at: float = 0.0  # the ballast gone (and PostgreSQL started again, if it went)
    healed_in: float = 0.0  # from `freed_at` to 200 more pulses acknowledged

    @property
    def statuses(self) -> Counter[int | str]:
        return sum((load.statuses for load in self.loads), Counter[int | str]())

    @property
    def codes(self) -> Counter[str]:
        return sum((load.error_codes for load in self.loads), Counter[str]())

    def refusals(self) -> int:
        return self.statuses[503]

    def during(self, what: str) -> list[Seen]:
        return [
            s for s in self.seen if s.what == what and self.full_at <= s.started < self.freed_at
        ]

    def slow(self) -> list[str]:
        exchanges = [x for load in self.loads for x in load.exchanges]
        return [
            f"{x.ended - x.started:.2f} s: {x.status or x.error}"
            for x in exchanges
            if x.ended - x.started > SLOWEST
        ]


def yesterday_and_today() -> list[str]:
    today = dt.datetime.now(dt.UTC).date()
    return [(today - dt.timedelta(days=1)).isoformat(), today.isoformat()]


async def outage_under_load(
    cluster: Cluster,
    http: httpx.AsyncClient,
    *,
    fill: Callable[[], Awaitable[None]],
    heal: Callable[[], Awaitable[None]],
    refused: int,
    hold: float,
) -> Run:
    """Load on both instances, watchers on both; `fill` (in the middle of the
    load), then `hold` seconds more once `refused` writes were refused, then
    `heal`; until 200 more pulses are taken. The load is stopped (each client
    resending what it must) before this returns."""
    ledger = Ledger()
    loads = [
        DiskLoad(
            server,
            ledger,
            PulseFactory(prefix=f"n{n}", days=1, max_array=30),
            clients=4,
            seed=40 + n,
            allowed=(202, 500, 503),
            timeout=2 * SLOWEST,
        )
        for n, server in enumerate(cluster)
    ]
    run = Run(loads)
    by_hand = trio.CancelScope()

    async def watch(n: int) -> None:
        url = cluster[n].url
        while True:
            for what, path in (("readyz", "/readyz"), ("healthz", "/healthz")):
                run.seen.append(await look(http, what, n, "GET", url + path))
            run.seen.append(await look(http, "aggregates", n, "GET", f"{url}/aggregates?limit=10"))
            await trio.sleep(0.25)

    async def commit_by_hand() -> None:
        with by_hand:
            for turn in range(10_000):
                n, day = turn % 2, yesterday_and_today()[turn // 2 % 2]
                url = f"{cluster[n].url}/aggregates/commit"
                run.seen.append(await look(http, "commit", n, "POST", url, json={"date": day}))
                await trio.sleep(0.4)

    async def flowing(more: int, within: float, what: str) -> float:
        started = trio.current_time()
        floor = loads[0].acknowledged() + more  # the loads share one ledger

        async def enough() -> bool:
            return loads[0].acknowledged() >= floor

        await wait_until(enough, within=within, what=what, interval=0.05)
        return trio.current_time() - started

    async def refusing() -> bool:
        return run.refusals() >= refused

    with trio.fail_after(50):
        async with trio.open_nursery() as watchers:
            watchers.start_soon(watch, 0)
            watchers.start_soon(watch, 1)
            watchers.start_soon(commit_by_hand)
            async with trio.open_nursery() as clients:
                for load in loads:
                    clients.start_soon(load.run)
                await flowing(300, 15, "load before the disk fills")
                run.full_at = trio.current_time()
                await fill()
                try:
                    await wait_until(refusing, within=15, what=f"{refused} writes refused")
                except AssertionError as exc:
                    raise AssertionError(
                        f"{exc}: answers {dict(run.statuses)}, codes {dict(run.codes)}"
                    ) from None
                await trio.sleep(hold)
                await heal()
                run.freed_at = trio.current_time()
                # Commits by hand would hide a committer that stopped for good.
                by_hand.cancel()
                run.healed_in = await flowing(200, HEAL_WITHIN, "pulses taken again")
                for load in loads:
                    load.stop()
            watchers.cancel_scope.cancel()
    return run


def deliveries(cluster: Cluster) -> dict[str, list[bytes]]:
    """Every file each instance's sink wrote: {batch_id: [body, one per file]}."""
    found: dict[str, list[bytes]] = {}
    for server in cluster:
        for path in server.deliveries.glob("*/*.json"):
            found.setdefault(path.stem, []).append(path.read_bytes())
    return found


async def audit_instances(http: httpx.AsyncClient, cluster: Cluster, ledger: Ledger) -> Counts:
    """Every acknowledged pulse stored once, nothing refused stored (pulses whose
    every answer was lost at most once: tests/faults/harness.py), the same on
    both instances; then both days committed and every batch in exactly one
    sink, once, with the outbox's content, each bucket's batches adding up to
    its total."""
    server = cluster[0]
    counts = Counts(requests=len({a.answered_seq for a in ledger.attempts}))
    expected = await expected_totals(http, server, ledger, counts)
    held = await check_totals(http, server, expected)
    await check_totals(http, cluster[1], expected)
    counts.counted = sum(total.count for total in held.values())
    days = sorted({key[3] for key in expected})
    await commit_days(http, server.url, days)
    outbox: list[dict[str, Any]] = []

    async def settled() -> bool:
        outbox[:] = await collect_pages(http, f"{server.url}/batches", "batches", limit=1000)
        return all(row["status"] != "pending" for row in outbox)

    with trio.move_on_after(20):
        await wait_until(settled, within=20, what="every batch delivered", interval=0.1)
    pending = [
        (row["batch_id"], row["attempts"], row["last_error"])
        for row in outbox
        if row["status"] != "delivered"
    ]
    bodies = deliveries(cluster)
    unrecorded = [line for server in cluster for line in log_lines(server, "could not record")]
    assert pending == [], (
        f"batches not delivered 20 s after the commit (id, attempts, last error): {pending[:5]};"
        f" of them in a sink already: {[b for b, *_ in pending if b in bodies]};"
        f" deliveries whose outcome the store did not take: {unrecorded[:3]}"
    )
    twice = {batch: len(files) for batch, files in bodies.items() if len(files) > 1}
    assert twice == {}, f"batches sent more than once: {twice}"
    assert set(bodies) == {row["batch_id"] for row in outbox}, "the sinks and the outbox differ"
    batches = await batches_with_records(http, server, days)
    for batch_id, [body] in sorted(bodies.items()):
        view = {k: v for k, v in batches[batch_id].items() if k not in DELIVERY_STATE}
        assert msgspec.json.decode(body) == view, f"{batch_id}: the sink's body is not the outbox's"
    wrong = check_outbox(batches, held)
    assert wrong == [], f"buckets whose batches do not add up to their totals: {wrong[:10]}"
    counts.batches = len(bodies)
    counts.delivered = sum(
        record["pulse_count"] for batch in batches.values() for record in batch["records"]
    )
    return counts


async def healed(http: httpx.AsyncClient, cluster: Cluster, run: Run) -> Counts:
    """Once space (and PostgreSQL) is back, without a restart: the committer
    commits yesterday by itself, one instance leads, and the audit holds."""
    day = yesterday_and_today()[0]

    async def committed_by_itself() -> bool:
        rows = await collect_pages(
            http,
            f"{cluster[0].url}/aggregates",
            "aggregates",
            {"status": "open", "from": day, "to": day},
            limit=500,
        )
        return not rows

    await wait_until(committed_by_itself, within=10, what="the committer commits yesterday again")
    await wait_until(partial(sole_leader, http, list(cluster)), within=10, what="a leader")
    return await audit_instances(http, cluster, run.loads[0].ledger)


def log_lines(server: ServerProcess, *words: str) -> list[str]:
    return [
        line
        for line in server.output.splitlines()
        if all(word.lower() in line.lower() for word in words)
    ]


class Instances(Cluster):
    """A `Cluster` stopped with SIGTERM at the end (killed only if that fails):
    a killed instance leaves its workers' directory, /tmp/ingestor-*, behind."""

    async def aclose(self) -> None:
        for server in self.servers:
            if server.running:
                with contextlib.suppress(ServerError):
                    await server.terminate(within=15)
        await super().aclose()


def instances(tmp_path: Path, node: DiskNode) -> Cluster:
    env = {
        "INGESTOR_STORE": node.url,
        "INGESTOR_STORE_BUSY_TIMEOUT": str(BUSY),
        "INGESTOR_PARTITIONS": "8",
        "INGESTOR_COMMIT_INTERVAL": "1",
        "INGESTOR_COMMIT_GRACE": "1",
        "INGESTOR_RETRY_INITIAL": "0.2",
        # Small batches: a commit inserts several outbox rows, a cut among
        # them must undo all; more deliveries to record on the full disk.
        "INGESTOR_BATCH_MAX_RECORDS": "4",
    }
    return Instances(tmp_path, 2, env)


def check_answers(run: Run, codes: set[str]) -> None:
    """Only 202, 503 + Retry-After and 500 outcome_unknown, in time, to the clients
    and to the commits by hand; /healthz 200 all along."""
    problems = [problem for load in run.loads for problem in load.problems]
    assert problems == [], problems[:10]
    assert run.codes.keys() <= codes, f"answered {dict(run.codes)}; only {codes} may be"
    assert run.slow() == [], f"answers slower than {SLOWEST} s: {run.slow()[:10]}"
    commits = [s for s in run.seen if s.what == "commit"]
    wrong = [
        s.describe()
        for s in commits
        if not (
            s.status == 200
            or (s.status == 503 and s.retry_after and s.code in codes)
            or (s.status, s.code) == (500, "outcome_unknown")
        )
        or s.took > SLOWEST
    ]
    assert wrong == [], f"commits by hand answered so: {wrong[:10]}"
    health = [s.describe() for s in run.seen if s.what == "healthz" and s.status != 200]
    assert health == [], health[:10]


_LOGGED = re.compile(r"^\S+ (WARNING|ERROR|CRITICAL) (\S+) (.*?)(?= [a-z_]+=|$)")


def warnings(cluster: Cluster) -> Counter[str]:
    """The instances' WARNING and ERROR lines, by logger and event."""
    found: Counter[str] = Counter()
    for server in cluster:
        for line in server.output.splitlines():
            logged = _LOGGED.match(line)
            if logged and not logged[3].startswith("no api_keys"):
                found[f"{logged[1]} {logged[2]} {logged[3]}"] += 1
    return found


def report(case: str, run: Run, counts: Counts, cluster: Cluster) -> str:
    commits = Counter((s.status, s.code) for s in run.seen if s.what == "commit")
    ready = Counter((s.status, s.code) for s in run.during("readyz"))
    reads = Counter((s.status, s.code) for s in run.during("aggregates"))
    lines = [len(server.output.splitlines()) for server in cluster]
    slowest = max(x.ended - x.started for load in run.loads for x in load.exchanges)
    return (
        f"\n{counts.line(case)}\nanswers {dict(run.statuses)}, codes {dict(run.codes)};"
        f" commits by hand {dict(commits)}; while full /readyz {dict(ready)},"
        f" GET /aggregates {dict(reads)}; pulses taken again {run.healed_in:.2f} s after"
        f" the space came back; slowest answer {slowest:.2f} s; instances' output lines"
        f" {lines}\nlogged {dict(warnings(cluster))}"
    )


# -- 1. the data directory's disk full --------------------------------------------------


async def test_a_full_data_disk_refuses_writes_as_store_full_and_loses_nothing(
    tmp_path: Path,
) -> None:
    """The disk under PostgreSQL's data directory fills (its WAL has room):
    every write needing a new page fails with 53100 "could not extend file",
    commits and delivery records too. Two instances under load must answer
    503 store_full + Retry-After (or 500 outcome_unknown), never another 500
    or a hang; commits by hand likewise; reads and /healthz go on. Once the
    ballast is gone, without restarting them: pulses taken within seconds,
    the committer commits yesterday by itself, every acknowledged pulse is
    counted once, every batch delivered once with the outbox's content and
    every bucket's batches add up to it; no traceback, and a log line that
    says the disk is full.

    (DEFECT, once in about eight runs: a batch pending 20 s after the audit's
    commit, no attempt recorded.) The deliverer tried to record a delivery
    three times in 0.6 s; the full disk refused them, and the batch waited
    for its lease to end (55 s) to be sent to the receiver a second time. It
    now tries again while the lease lasts (`Deliverer._record`)."""
    with postgres_on_small_disks(data_mib=64, wal_mib=256) as node:
        ballast = Ballast(node.disk)
        async with instances(tmp_path, node) as cluster, httpx.AsyncClient(timeout=30) as http:
            await wait_until(
                partial(sole_leader, http, list(cluster)), within=15, what="one leader"
            )

            async def fill() -> None:
                await trio.to_thread.run_sync(ballast.fill)

            async def heal() -> None:
                ballast.free()

            run = await outage_under_load(cluster, http, fill=fill, heal=heal, refused=20, hold=5)
            check_answers(run, {"store_full", "outcome_unknown"})
            reads = [s.describe() for s in run.during("aggregates") if s.status != 200]
            assert reads == [], f"reads failed while only writes could: {reads[:10]}"

            counts = await healed(http, cluster, run)
            tracebacks = [server.output.count("Traceback") for server in cluster]
            said = [len(log_lines(server, "disk", "full")) for server in cluster]
            print(report("data disk full", run, counts, cluster), f"full-disk lines {said}")
            assert tracebacks == [0, 0], f"tracebacks in the instances' output: {tracebacks}"
            assert sum(said) > 0, "no log line says the disk under the database is full"


# -- 2. pg_wal's disk full: a PANIC ------------------------------------------------------


async def test_a_full_wal_disk_panics_postgres_and_the_instances_heal_once_it_is_started(
    tmp_path: Path,
) -> None:
    """pg_wal's disk fills: the next WAL segment cannot be made, PostgreSQL
    PANICs and (restart_after_crash off) stays down, every session gone, some
    as their COMMIT was on its way. Two instances under load must answer 503
    + Retry-After (store_unavailable, store_full) or 500 outcome_unknown,
    never another 500 or a hang, while /healthz stays 200. The operator frees
    the disk and starts PostgreSQL (crash recovery); without restarting the
    instances, pulses are taken again within seconds, the committer leads and
    commits again, and the audit holds: a 202 was flushed to the WAL before
    the PANIC, so nothing acknowledged is lost, and pulses with ids whose
    COMMIT's answer was lost are sent again and counted once.

    (DEFECT, the last assertion.) While PostgreSQL was down, writes, commits
    and reads were answered 503 `store_busy` (Retry-After 1, "no database
    connection became free in time"), not `store_unavailable`: a client
    backed off 1 s instead of 5, and an operator reading the log looked at
    the pool's size, not at a database refusing connections. Every
    `psycopg_pool.PoolTimeout` was `StoreBusy`; a wait that ran out while
    every connection the pool tried failed is now the database out of reach
    (`PostgresStore._session`)."""
    with postgres_on_small_disks(data_mib=160, wal_mib=24) as node:
        ballast = Ballast(node.wal)
        async with instances(tmp_path, node) as cluster, httpx.AsyncClient(timeout=30) as http:
            await wait_until(
                partial(sole_leader, http, list(cluster)), within=15, what="one leader"
            )
            went_down: list[float] = []

            async def fill() -> None:
                await trio.to_thread.run_sync(ballast.fill)
                await trio.to_thread.run_sync(switch_wal_until_down, node, 15.0)
                went_down.append(trio.current_time())

            async def heal() -> None:
                ballast.free()
                await trio.to_thread.run_sync(node.start)

            run = await outage_under_load(cluster, http, fill=fill, heal=heal, refused=20, hold=3)
            panicked = "PANIC" in node.log.read_text(errors="replace")
            # The codes themselves are checked last, below, after the audit.
            check_answers(run, {"store_full", "store_unavailable", "store_busy", "outcome_unknown"})
            reads = [
                s.describe()
                for s in run.during("aggregates")
                if not (s.status == 200 or (s.status == 503 and s.retry_after))
            ]
            assert reads == [], f"reads answered so while PostgreSQL was down: {reads[:10]}"
            counts = await healed(http, cluster, run)
            tracebacks = [server.output.count("Traceback") for server in cluster]
            print(
                report("pg_wal full, PANIC", run, counts, cluster),
                f"PANIC in the server's log: {panicked}; down {run.freed_at - went_down[0]:.2f} s",
            )
            assert panicked, f"PostgreSQL went down without a PANIC:\n{node.log_tail()}"
            assert tracebacks == [0, 0], f"tracebacks in the instances' output: {tracebacks}"
            # Asked once PostgreSQL was down and every session gone (a busy
            # timeout after it went), answered before it was started again.
            down = Counter(
                code
                for load in run.loads
                for started, ended, code in load.refused
                if started > went_down[0] + BUSY and ended < run.freed_at
            )
            busy = [line for server in cluster for line in log_lines(server, "became free")]
            assert down["store_unavailable"] > 0, f"answers while down: {dict(down)}"
            assert down["store_busy"] == 0, (
                f"answered 503 store_busy {down['store_busy']} times while PostgreSQL"
                f" was down (of {dict(down)}); the instances logged: {busy[:1]}"
            )
