"""Attacks on the store's start-up and upgrade paths, with real server processes.

A base store is made once by a real server (two partitions, pulses with and
without ids, part of the log folded, a tail not yet folded) and copied for
each case. The cases turn it into stores of earlier releases, interrupt
upgrades and creations with SIGKILL, fill the disk under them, or start
several processes on one data dir at once. Whatever happened, a server then
started on the data dir must either refuse it in one clear line or serve it
whole: every pulse acknowledged before counted exactly once (GET
/aggregates, GET /pulses), a replay of an old id a duplicate, the same id
with another payload a conflict, and the day committed once.

Stores of earlier releases are made here as those releases wrote them
(checked against the code of the commits named, run on a store):

    v2-days-with-each-write   schema 2 as 4e12a76..6dd8a16^ wrote it: a
                              `pulse_days` row per (tenant, day) with each
                              write, so the log's unfolded tail is listed too
    v2-ids-by-tenant-and-id   schema 2 as 671a874..4e12a76^ wrote it: the
                              same, and `pulse_ids` keyed by (tenant_id, pulse_id)
    v3-days                   schema 3 as 54f6232..f644e74^ wrote it: MessagePack
                              log rows with digests, and `pulse_days` (no spans)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio

import ingestor.store.sqlite as sqlite_store
from ingestor.partition import partition_of
from ingestor.store.postgres import PostgresStore
from tests.support.fixtures import QUIET_COMMITTER
from tests.support.server import ServerError, ServerProcess
from tests.test_sqlite_upgrade import (
    as_version_2,
    as_version_3,
    digests_as_before,
    spans_as_days,
)

pytestmark = pytest.mark.e2e

PARTITIONS = 2
ENV = {**QUIET_COMMITTER, "INGESTOR_PARTITIONS": str(PARTITIONS)}
TENANTS = ("acme", "globex", "initech", "umbrella", "hooli", "wonka")
LATECOMER = "latecomer"  # sends only after the fold: its pulses are all in the log's tail
ROOT = Path(__file__).resolve().parents[1]


# -- the pulses and what a store must hold ------------------------------------


@dataclass
class Made:
    """A data dir a real server wrote, and every pulse it acknowledged."""

    data_dir: Path
    pulses: list[dict[str, Any]]

    @property
    def day(self) -> str:
        return str(self.pulses[0]["timestamp"])[:10]

    def totals(self) -> dict[tuple[str, str, str, str], tuple[Decimal, int]]:
        found: dict[tuple[str, str, str, str], tuple[Decimal, int]] = {}
        for p in self.pulses:
            key = (p["tenant_id"], p["product_sku"], p["use_unit"], self.day)
            amount, count = found.get(key, (Decimal(0), 0))
            found[key] = (amount + Decimal(p["used_amount"]), count + 1)
        return found

    def copy_to(self, data_dir: Path) -> Made:
        shutil.copytree(self.data_dir / "store", data_dir / "store")
        return Made(data_dir, self.pulses)


def _pulses(
    serial: Iterator[int], moment: dt.datetime, ids: bool, tenants: Sequence[str] = TENANTS
) -> list[dict[str, Any]]:
    made = []
    for tenant in tenants:
        for unit in ("api_call", "gb"):
            n = next(serial)
            pulse = {
                "tenant_id": tenant,
                "product_sku": "sku-1",
                "use_unit": unit,
                "used_amount": f"{n}.{n:03d}000001",
                # Unique to the microsecond: GET /pulses tells each pulse by it.
                "timestamp": (moment + dt.timedelta(microseconds=n)).isoformat(),
            }
            if ids:
                pulse["id"] = f"old-{n}"
            made.append(pulse)
    return made


def _output_in(server: ServerProcess, run_dir: Path) -> ServerProcess:
    """`server` writing its output to `run_dir`: of its own when several servers
    share a data dir, and off a data dir's disk that is full or read-only."""
    run_dir.mkdir(parents=True, exist_ok=True)
    server.run_dir = run_dir
    server.log_path = run_dir / "output.log"
    return server


async def _post(http: httpx.AsyncClient, url: str, pulses: Sequence[Mapping[str, Any]]) -> Any:
    response = await http.post(f"{url}/pulses", json=list(pulses))
    assert response.status_code in (200, 202), response.text
    return response.json()


async def _make_base(data_dir: Path) -> list[dict[str, Any]]:
    moment = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=2)
    if moment.time() < dt.time(0, 0, 5):  # every pulse, and the later ones, on one day
        moment -= dt.timedelta(seconds=5)
    serial = iter(range(1, 10_000))
    first = _pulses(serial, moment, ids=True)
    second = [
        *_pulses(serial, moment, ids=True, tenants=(*TENANTS, LATECOMER)),
        *_pulses(serial, moment, ids=False),
    ]
    async with ServerProcess(data_dir, env=ENV) as server, httpx.AsyncClient(timeout=30) as http:
        assert (await _post(http, server.url, first))["accepted"] == len(first)
        # A read folds what is logged so far (and writes its spans) ...
        response = await http.get(f"{server.url}/aggregates", params={"limit": "1000"})
        assert response.status_code == 200
        # ... and these stay in the log's tail: the server stops before folding them.
        assert (await _post(http, server.url, second))["accepted"] == len(second)
        assert await server.terminate() == 0
    return first + second


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Made:
    data_dir = tmp_path_factory.mktemp("base") / "data"
    assert {partition_of(t, PARTITIONS) for t in TENANTS} == set(range(PARTITIONS))
    pulses = trio.run(_make_base, data_dir)
    made = Made(data_dir, pulses)
    with _connect(made) as conn:
        marks = dict(conn.execute("SELECT key, value FROM meta WHERE key LIKE 'buckets_seq/%'"))
        tail = [
            seq
            for seq, part in conn.execute("SELECT seq, part FROM pulse_log")
            if seq > int(marks.get(f"buckets_seq/{part}", 0))
        ]
    assert tail, "the base store was meant to have an unfolded tail"
    return made


@contextlib.contextmanager
def _connect(made: Made) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(made.data_dir / "store" / "store.sqlite", isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def _version(made: Made) -> int:
    path = made.data_dir / "store" / "store.sqlite"
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_schema")}
    finally:
        conn.close()
    # Never half upgraded: schema 2's index or this version's spans, not both.
    assert ("pulse_days" in tables) == (version == 2), (version, sorted(tables))
    assert ("pulse_spans" in tables) == (version == 4), (version, sorted(tables))
    return int(version)


async def check_counted_once(http: httpx.AsyncClient, url: str, made: Made) -> None:
    """Every acknowledged pulse counted and listed once; replays deduplicated; the
    day commits once, in batches that add up to its totals."""
    response = await http.get(f"{url}/aggregates", params={"limit": "1000"})
    assert response.status_code == 200, response.text
    totals = {
        (a["tenant_id"], a["product_sku"], a["use_unit"], a["date"]): (
            Decimal(a["used_amount"]),
            a["pulse_count"],
        )
        for a in response.json()["aggregates"]
    }
    assert totals == made.totals()

    with_ids = [p for p in made.pulses if "id" in p]
    replay = await _post(http, url, with_ids)
    assert (replay["accepted"], replay["duplicates"]) == (0, len(with_ids)), replay
    other = {**with_ids[0], "used_amount": "999"}
    assert (await _post(http, url, [other]))["conflicts"] == 1

    # And the store still takes new pulses, with ids.
    new = []
    for n in range(3):
        stamp = dt.datetime.fromisoformat(made.pulses[0]["timestamp"])
        fresh = {
            **made.pulses[0],
            "id": f"new-{n}",
            "used_amount": "1",
            "timestamp": (stamp + dt.timedelta(milliseconds=n + 1)).isoformat(),
        }
        assert (await _post(http, url, [fresh]))["accepted"] == 1
        new.append(fresh)

    response = await http.post(f"{url}/aggregates/commit", json={"date": made.day})
    assert response.status_code == 200, response.text
    committed = sum(
        (Decimal(b["used_amount"]) for b in response.json()["batches"]), start=Decimal(0)
    )
    assert committed == sum(
        (amount for amount, _ in made.totals().values()), start=Decimal(len(new))
    )
    again = await http.post(f"{url}/aggregates/commit", json={"date": made.day})
    assert again.status_code == 200, again.text
    assert again.json()["batches"] == []

    # GET /pulses, the audit trail: each pulse once.
    for tenant in (*TENANTS, LATECOMER):
        response = await http.get(
            f"{url}/pulses", params={"tenant_id": tenant, "date": made.day, "limit": "1000"}
        )
        assert response.status_code == 200, response.text
        listed = Counter(
            dt.datetime.fromisoformat(p["timestamp"]) for p in response.json()["pulses"]
        )
        expected = Counter(
            dt.datetime.fromisoformat(p["timestamp"])
            for p in made.pulses + new
            if p["tenant_id"] == tenant
        )
        assert listed == expected, (
            f"GET /pulses of {tenant}: {sum((listed - expected).values())} of"
            f" {sum(expected.values())} pulses listed twice,"
            f" {sum((expected - listed).values())} missing"
        )


# -- stores of earlier releases -----------------------------------------------


def _with_digests(path: Path) -> None:
    """Each client id's pulse with the digest of its payload, in its log row and in
    `pulse_ids`, as intake gave it before schema 4 (see `as_version_3`)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        digests_as_before(conn)
        conn.execute("COMMIT")
    finally:
        conn.close()


def _days_of_the_tail(path: Path) -> None:
    """A `pulse_days` row for each (tenant, day) of each log row of the unfolded
    tail too: schema 2 before 6dd8a16 wrote them with each write, not at the fold."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        marks = dict(conn.execute("SELECT key, value FROM meta WHERE key LIKE 'buckets_seq/%'"))
        rows = [
            (p.tenant_id, p.day, seq)
            for seq, part, body in conn.execute("SELECT seq, part, body FROM pulse_log")
            if seq > int(marks.get(f"buckets_seq/{part}", 0))
            for p in sqlite_store._decode_pulses(body)
        ]
        assert rows
        conn.executemany("INSERT OR IGNORE INTO pulse_days VALUES (?, ?, ?)", rows)
    finally:
        conn.close()


def _ids_by_tenant_and_id(path: Path) -> None:
    """`pulse_ids` as schema 2 had it before 4e12a76: keyed by (tenant_id, pulse_id)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.executescript(
            """
            BEGIN;
            CREATE TABLE old_ids (
                tenant_id TEXT NOT NULL, pulse_id TEXT NOT NULL, fingerprint BLOB NOT NULL,
                seq INTEGER NOT NULL, PRIMARY KEY (tenant_id, pulse_id)) STRICT, WITHOUT ROWID;
            INSERT INTO old_ids SELECT substr(id_key, 1, instr(id_key, char(31)) - 1),
                substr(id_key, instr(id_key, char(31)) + 1), fingerprint, seq FROM pulse_ids;
            DROP TABLE pulse_ids;
            ALTER TABLE old_ids RENAME TO pulse_ids;
            CREATE INDEX pulse_ids_by_seq ON pulse_ids (seq);
            COMMIT;
            """
        )
    finally:
        conn.close()


def _v3_with_days(path: Path) -> None:
    """Schema 3 as 54f6232 wrote it: `pulse_days` rows written by the fold, and
    both indexes by log row; no `pulse_spans` (f644e74 brought those, as 3)."""
    as_version_3(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        spans_as_days(conn)
        conn.execute("COMMIT")
    finally:
        conn.close()


def _v2(path: Path) -> None:
    _with_digests(path)
    as_version_2(path)


def _v2_days_with_each_write(path: Path) -> None:
    _v2(path)
    _days_of_the_tail(path)


def _v2_ids_by_tenant_and_id(path: Path) -> None:
    _v2_days_with_each_write(path)
    _ids_by_tenant_and_id(path)


LAYOUTS: dict[str, Callable[[Path], None]] = {
    "v2-days-with-each-write": _v2_days_with_each_write,
    "v2-ids-by-tenant-and-id": _v2_ids_by_tenant_and_id,
    "v3-days": _v3_with_days,
}


def _refused_clearly(server: ServerProcess, store_file: Path) -> None:
    output = server.output_of_run()
    assert server.exit_codes[-1] not in (0, None), output
    assert "Traceback" not in output, output
    assert str(store_file) in output, f"the refusal does not name {store_file}:\n{output}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
async def test_a_store_of_an_earlier_layout_is_served_whole_or_refused(
    layout: str, base: Made, tmp_path: Path
) -> None:
    """A schema version number names the layout of the file: a store whose
    version the upgrade accepts must come out of it whole. Schema 2 and 3 each
    had layouts that `_upgrade` does not expect."""
    made = base.copy_to(tmp_path / "data")
    store_file = made.data_dir / "store" / "store.sqlite"
    LAYOUTS[layout](store_file)
    server = ServerProcess(made.data_dir, env=ENV, ready_timeout=20)
    try:
        try:
            await server.start()
        except ServerError:
            _refused_clearly(server, store_file)
            return
        async with httpx.AsyncClient(timeout=30) as http:
            await check_counted_once(http, server.url, made)
    finally:
        await server.aclose()


# -- an upgrade interrupted ---------------------------------------------------


def _ghosts(path: Path, count: int) -> None:
    """Bulk for schema 2's index, so the upgrade takes a while: `count` rows of
    tenants that never sent anything, each listing real log rows."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        (rows,) = conn.execute("SELECT max(seq) FROM pulse_log").fetchone()
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
            " INSERT INTO pulse_days SELECT 'ghost-' || (i / ?), '2026-01-01', 1 + i % ?"
            " FROM n",
            (count - 1, rows, rows),
        )
    finally:
        conn.close()


def _writing(server: ServerProcess, shm: Path) -> bool:
    """Whether `server` is in a write transaction on the store: holds the WAL write
    lock, a POSIX lock of byte 120 of the -shm file (/proc/locks)."""
    try:
        inode = shm.stat().st_ino
    except FileNotFoundError:
        return False
    for line in Path("/proc/locks").read_text().splitlines():
        # "1: POSIX  ADVISORY  WRITE <pid> <major>:<minor>:<inode> <start> <end>"
        fields = line.split()
        if (
            fields[1:5] == ["POSIX", "ADVISORY", "WRITE", str(server.pid)]
            and fields[5].rsplit(":", 1)[-1] == str(inode)
            and fields[6] == "120"
        ):
            return True
    return False


async def test_an_upgrade_killed_at_random_moments_completes_later_and_loses_nothing(
    base: Made, tmp_path: Path
) -> None:
    """A schema-2 store whose upgrade takes a while; the server is SIGKILLed in
    the middle of it, three times. The file is never half upgraded; then two
    servers start on it at once, one upgrades it, both serve it whole."""
    made = base.copy_to(tmp_path / "data")
    store_file = made.data_dir / "store" / "store.sqlite"
    _v2(store_file)
    _ghosts(store_file, 300_000)
    shm = store_file.with_name("store.sqlite-shm")
    rng = random.Random(20261207)
    interrupted = 0
    server = ServerProcess(made.data_dir, env=ENV)
    try:
        for _ in range(3):
            await server._spawn()
            # The upgrade's transaction holds SQLite's WAL write lock: kill inside it.
            deadline = trio.current_time() + 20
            while not _writing(server, shm):
                assert server.running, server.tail()
                assert trio.current_time() < deadline, "the upgrade never began"
                await trio.sleep(0.002)
            await trio.sleep(rng.uniform(0.0, 0.3))
            upgraded = "store upgraded" in server.output_of_run()
            await server.kill()
            version = _version(made)
            if not upgraded and version == 2:
                interrupted += 1
            if version == 4:
                break
    finally:
        await server.aclose()
    assert interrupted >= 1, "no kill landed in the middle of the upgrade"

    other = _output_in(ServerProcess(made.data_dir, env=ENV), tmp_path / "other")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.start)
            nursery.start_soon(other.start)
        assert _version(made) == 4
        async with httpx.AsyncClient(timeout=30) as http:
            await check_counted_once(http, server.url, made)
            response = await http.get(f"{other.url}/aggregates", params={"status": "open"})
            assert response.status_code == 200
            assert response.json()["aggregates"] == []  # all committed, through either server
    finally:
        await server.aclose()
        await other.aclose()


# -- a disk that is full ------------------------------------------------------


async def _refused_start(server: ServerProcess) -> str:
    """Start `server`, which must stop before it is ready; what it printed."""
    try:
        with pytest.raises(ServerError, match="before it was ready"):
            await server.start()
    finally:
        await server.aclose()
    return server.output_of_run()


def _cannot(reason: str) -> None:
    """Skip where this machine cannot fill a disk; a CI run (root) must run it."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@contextlib.contextmanager
def _tmpfs(mount: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes at `mount`, for a disk the test can fill (root only)."""
    mount.mkdir()
    if os.geteuid() != 0:
        _cannot("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        _cannot(f"cannot mount a tmpfs: {done.stderr.decode(errors='replace')}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


def _remount_read_only(mount: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True)


def _fill(mount: Path, leave: int = 0) -> Path:
    """Fill the filesystem at `mount` with a ballast file, then give `leave` bytes back."""
    ballast = mount / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12):
            block = bytes(size)
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, block)
        if leave:
            os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)
    return ballast


async def test_a_store_created_on_a_full_disk_is_refused_in_one_line(tmp_path: Path) -> None:
    """No store yet, and no room for one: the start fails with a line that says
    the disk is full, as it does for a store that exists, not with a traceback."""
    with _tmpfs(tmp_path / "disk", 2 << 20) as disk:
        data_dir = disk / "data"
        data_dir.mkdir()
        _fill(disk)
        server = _output_in(ServerProcess(data_dir, env=ENV, ready_timeout=20), tmp_path / "run")
        output = await _refused_start(server)
        assert server.exit_codes[-1] not in (0, None), output
        assert "Traceback" not in output, output
        assert "full" in output or "No space left" in output, output
        assert sorted(p.name for p in data_dir.iterdir()) == []  # nothing half made


async def test_a_store_on_a_read_only_disk_is_refused_with_a_message_naming_it(
    base: Made, tmp_path: Path
) -> None:
    """The data dir's disk mounted read-only (a remount after errors, a volume
    mounted :ro): the start is refused, as it must be, with a line that says
    which file and why, as for a damaged store file."""
    with _tmpfs(tmp_path / "disk", 16 << 20) as disk:
        made = base.copy_to(disk / "data")
        store_file = made.data_dir / "store" / "store.sqlite"
        server = _output_in(
            ServerProcess(made.data_dir, env=ENV, ready_timeout=20), tmp_path / "run"
        )
        _remount_read_only(disk)
        output = await _refused_start(server)
        assert "Traceback" not in output, output
        assert str(store_file) in output or "read-only" in output, output


async def test_an_upgrade_that_fills_the_disk_changes_nothing_and_completes_later(
    base: Made, tmp_path: Path
) -> None:
    """A schema-2 store on a disk with 256 KiB free, less than its upgrade
    writes: the start is refused in one line and the file stays as it was; once
    there is room, the upgrade completes and every pulse is there once."""
    with _tmpfs(tmp_path / "disk", 16 << 20) as disk:
        made = base.copy_to(disk / "data")
        store_file = made.data_dir / "store" / "store.sqlite"
        _v2(store_file)
        _ghosts(store_file, 100_000)
        ballast = _fill(disk, leave=256 << 10)
        server = _output_in(
            ServerProcess(made.data_dir, env=ENV, ready_timeout=20), tmp_path / "run"
        )
        try:
            with pytest.raises(ServerError, match="before it was ready"):
                await server.start()
            output = server.output_of_run()
            assert "Traceback" not in output, output
            assert "the disk under the store is full" in output, output
            assert _version(made) == 2
            ballast.unlink()
            await server.start()
            assert _version(made) == 4
            async with httpx.AsyncClient(timeout=30) as http:
                await check_counted_once(http, server.url, made)
        finally:
            await server.aclose()


# -- creation: several processes, or a crash in the middle ---------------------

# Imports the server, waits for the moment given, then runs it: several
# processes reach the store's creation within a millisecond of each other.
_AT_ONCE = """
import sys, time
import ingestor.service, ingestor.store.sqlite
from ingestor.__main__ import main
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
sys.exit(main(sys.argv[2:]))
"""

# Runs the server, SIGKILLed where the new store would be renamed into place.
_KILLED_AT_RENAME = """
import os, pathlib, signal, sys
rename = pathlib.Path.rename
def killed(self, target):
    if self.name.startswith(".creating-"):
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(self, target)
pathlib.Path.rename = killed
from ingestor.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


class ScriptedServer(ServerProcess):
    """`python -m ingestor serve ...` run as `python -c <script> [arg] serve ...`."""

    def __init__(self, data_dir: Path, script: str, *args: str, **options: Any) -> None:
        super().__init__(data_dir, env=ENV, **options)
        self.script = [script, *args]

    def command(self) -> list[str]:
        python, _, _, *serve = super().command()
        return [python, "-c", *self.script, *serve]


async def _try_start(server: ServerProcess, failures: list[str]) -> None:
    try:
        await server.start()
    except ServerError as exc:
        failures.append(str(exc))


async def test_servers_started_together_on_a_fresh_data_dir_share_one_store(
    tmp_path: Path,
) -> None:
    """Processes share a store (SQLite's lock and the writers' flock arbitrate):
    three started at once on an empty data dir all serve the one store made."""
    data_dir = tmp_path / "data"
    at = time.time() + 1.5
    servers = [
        _output_in(ScriptedServer(data_dir, _AT_ONCE, str(at)), tmp_path / f"run{n}")
        for n in range(3)
    ]
    failures: list[str] = []
    try:
        async with trio.open_nursery() as nursery:
            for server in servers:
                nursery.start_soon(_try_start, server, failures)
        assert failures == [], f"{len(failures)} of 3 did not start:\n" + "\n".join(failures)
        async with httpx.AsyncClient(timeout=30) as http:
            ids = {(await http.get(f"{s.url}/readyz")).json()["store_id"] for s in servers}
            assert len(ids) == 1
    finally:
        for server in servers:
            await server.aclose()
    assert sorted(p.name for p in data_dir.iterdir() if p.name.startswith(".creating-")) == []


async def test_a_crash_while_the_store_is_made_leaves_none_and_the_next_start_makes_it(
    tmp_path: Path,
) -> None:
    """The data dir has an empty `store` directory (a deployment made it); the
    first start is killed once the new store is whole but not yet in place. The
    next start serves a store of its own, and what it acknowledges survives a
    kill -9; it removes the killed one's staging directory once that is old."""
    data_dir = tmp_path / "data"
    (data_dir / "store").mkdir(parents=True)
    crashed = ScriptedServer(data_dir, _KILLED_AT_RENAME, ready_timeout=20)
    try:
        with pytest.raises(ServerError, match="before it was ready"):
            await crashed.start()
    finally:
        await crashed.aclose()
    assert crashed.exit_codes == [-signal.SIGKILL], crashed.output
    assert not (data_dir / "store").exists()
    [staging] = [p for p in data_dir.iterdir() if p.name.startswith(".creating-")]
    assert (staging / "store.sqlite").exists()
    # Left an hour ago, it is litter; one made a moment ago may be another
    # process's creation under way, and stays.
    an_hour_ago = time.time() - 3600
    os.utime(staging, (an_hour_ago, an_hour_ago))
    under_way = data_dir / ".creating-0123456789ab"
    under_way.mkdir()

    server = ServerProcess(data_dir, env=ENV)
    try:
        await server.start()
        assert not staging.exists(), "the killed creation's staging directory is still there"
        assert under_way.exists()
        moment = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
        pulses = _pulses(iter(range(1, 100)), moment, ids=True)
        async with httpx.AsyncClient(timeout=30) as http:
            assert (await _post(http, server.url, pulses))["accepted"] == len(pulses)
            await server.kill()
            await server.start()
            await check_counted_once(http, server.url, Made(data_dir, pulses))
    finally:
        await server.aclose()


# -- PostgreSQL: an instance killed while it creates the schema -----------------

# A real instance opening the store, made to linger inside the transaction
# that creates the schema (holding the creation lock, its tables made) until
# it is killed: the store id it draws there takes a minute.
_LINGERING_CREATOR = """
import sys, time, types
import ingestor.store.postgres as pg
def linger(n):
    print("creating", flush=True)
    time.sleep(60)
pg.secrets = types.SimpleNamespace(token_hex=linger)
pg.PostgresStore.open(sys.argv[1], partitions=5, pool_size=1, busy_timeout=10)
"""


def test_postgres_instances_waiting_on_a_creator_that_is_killed_make_one_whole_store(
    fresh_database: str,
) -> None:
    """An instance is killed inside the transaction that creates the schema on an
    empty database, while three others wait for its lock: nothing it made
    stays, and the three make one whole store, with one id."""
    creator = subprocess.Popen(
        [sys.executable, "-c", _LINGERING_CREATOR, fresh_database],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert creator.stdout is not None
        # Its transaction holds the creation lock and has made the tables.
        assert creator.stdout.readline().strip() == "creating"

        opened: list[PostgresStore | BaseException] = []

        def open_one(partitions: int) -> None:
            try:
                opened.append(
                    PostgresStore.open(
                        fresh_database, partitions=partitions, pool_size=1, busy_timeout=10
                    )
                )
            except BaseException as exc:
                opened.append(exc)

        threads = [
            threading.Thread(target=open_one, args=(partitions,)) for partitions in (2, 3, 4)
        ]
        for thread in threads:
            thread.start()
        with psycopg.connect(fresh_database, autocommit=True) as conn:
            waiting = 0
            for _ in range(250):  # until the three wait on the creation lock
                row = conn.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                ).fetchone()
                waiting = 0 if row is None else row[0]
                if waiting == 3:
                    break
                time.sleep(0.02)
        assert waiting == 3
        creator.send_signal(signal.SIGKILL)
        creator.wait(10)
        for thread in threads:
            thread.join(20)
        stores = [s for s in opened if isinstance(s, PostgresStore)]
        try:
            assert len(stores) == 3, opened
            assert len({(s.store_id, s.partitions) for s in stores}) == 1
            assert stores[0].partitions in (2, 3, 4)  # not the killed creator's 5
        finally:
            for store in stores:
                store.close()
        with psycopg.connect(fresh_database) as conn:
            meta: dict[str, str] = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            columns = {
                name
                for (name,) in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = 'pulses'"
                )
            }
        assert meta["store_id"] == stores[0].store_id
        assert {"tenant_id", "pulse_id", "used_amount"} <= columns
    finally:
        if creator.poll() is None:
            creator.kill()
        creator.wait()
        if creator.stdout is not None:
            creator.stdout.close()
