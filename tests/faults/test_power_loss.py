"""Power loss, modelled: a disk that keeps only what was synced (DESIGN §3.1).

`durability = "fsync"` promises that whatever was answered 2xx survives a
power loss. A power cut cannot be made here, so the disk is modelled:
powercut.c, LD_PRELOADed into every server process (workers inherit it),
records at each fsync and fdatasync of a file or directory under the data
dir what that call makes durable, before the call returns: a copy of the
file, or the directory's entries, keyed by inode. `restore_after_power_loss`
rebuilds from those records the data dir a disk would hold after the cut:
from the root's synced entries down, each file with its last synced content,
or empty if it was never synced; an entry never synced into its directory is
not there. Nothing else survives: no page cache, no unsynced write, no
unsynced rename. The shim refuses (aborts the server on) every other way of
making data durable, so a run cannot pass on something the model does not
hold.

A cut stops the server's whole process group: SIGSTOP, at a random moment
or at a chosen sync (the shim stops the group itself just before it), and
what the records hold then is the disk at that moment; every answer a client
has received by then was sent before it. The last cut is SIGKILL to the
group. Each cut's disk is restored into a directory of its own, a server
without the shim is started on it, and it must hold what was acknowledged.

    test_the_model_keeps_only_what_was_synced    the model itself, on a few files
    test_durability_os_loses_acknowledged_pulses the control: the model drops
                                                 what `os` never synced
    test_durability_fsync_survives_power_cuts    cuts in a mixed load with commits
                                                 and deliveries; one and two workers
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.faults.conftest import Report, StartServer
from tests.faults.harness import Load, PulseFactory, audit
from tests.support.server import (
    Attempt,
    Ledger,
    ServerProcess,
    collect_pages,
    day_before,
    post_until_stored,
    send_pulses,
    wait_until,
)

SHIM = Path(__file__).with_name("powercut.c")
# What a restored store must not say at start.
BROKEN = ("malformed", "corrupt", "refus", "not a database", "Traceback")


# -- the model -------------------------------------------------------------------


@pytest.fixture(scope="session")
def powercut_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """powercut.c built for this machine (gcc is part of every machine of this kind)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail(
            "gcc not found: the power-loss model (tests/faults/powercut.c) cannot be built;"
            " install gcc (apt-get install -y gcc) rather than skip what it tests"
        )
    library = tmp_path_factory.mktemp("powercut") / "powercut.so"
    command = [gcc, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", str(library), str(SHIM)]
    built = subprocess.run([*command, "-ldl"], capture_output=True, text=True, check=False)
    assert built.returncode == 0, f"{' '.join(command)}:\n{built.stderr}"
    return library


class Disk:
    """The shim's records for one data dir (`root`): what a disk holds after a cut.

    The records live in `shadow` (tmpfs where there is one: the shim copies
    the WAL at every commit). Each is replaced by a rename, never rewritten,
    so hard links to them (`snapshot`) keep the disk of one moment.
    """

    def __init__(self, library: Path, root: Path, shadow: Path) -> None:
        self.library = library
        self.root = root.resolve()
        self.shadow = shadow
        self.snapshots = itertools.count()

    def environment(self) -> dict[str, str]:
        return {
            "LD_PRELOAD": str(self.library),
            "POWERCUT_ROOT": str(self.root),
            "POWERCUT_SHADOW": str(self.shadow),
        }

    def sync_root(self) -> None:
        """fsync the (empty) data dir through the shim: the root's entry on disk."""
        self.root.mkdir(parents=True, exist_ok=True)
        code = "import os, sys; os.fsync(os.open(sys.argv[1], os.O_RDONLY))"
        subprocess.run(
            [sys.executable, "-c", code, str(self.root)],
            env={**os.environ, **self.environment()},
            check=True,
        )
        assert self.syncs() == [("fsync", self.root)], "the shim did not record the root's sync"

    def syncs(self, log: Path | None = None) -> list[tuple[str, Path]]:
        """Every sync the shim recorded, in order: (call, path)."""
        try:
            lines = (log or self.shadow / "log").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [(call, Path(path)) for _, _, call, path in (line.split(" ", 3) for line in lines)]

    def snapshot(self) -> Path:
        """The records as they are now (the processes that write them stopped or dead)."""
        into = self.shadow.with_name(f"{self.shadow.name}.cut{next(self.snapshots)}")
        into.mkdir()
        for record in self.shadow.iterdir():
            if record.name.startswith(("f.", "d.")):
                os.link(record, into / record.name)
        shutil.copyfile(self.shadow / "log", into / "log")
        return into

    def restore(self, records: Path, into: Path) -> Restored:
        found = self.root.stat()
        return restore_after_power_loss(records, (found.st_dev, found.st_ino), into)


@dataclasses.dataclass
class Restored:
    """What a restore rebuilt: files with synced content, and files never synced."""

    files: dict[Path, int] = dataclasses.field(default_factory=dict)  # path: bytes
    never_synced: list[Path] = dataclasses.field(default_factory=list)


def restore_after_power_loss(records: Path, root: tuple[int, int], into: Path) -> Restored:
    """Rebuild in `into` (made here) the tree a disk holding only `records` shows.

    From the durable listing of the root (`root` is its device and inode),
    down through the durable listings of its directories: a directory never
    synced is empty; a file gets its last synced content, or none if it was
    never synced. Entries are followed by inode, so a directory made under one
    name and renamed is found under the name its parent's listing gives.
    """
    listings = {path.name[2:]: path for path in records.glob("d.*")}
    contents = {path.name[2:]: path for path in records.glob("f.*")}
    roots = [key for key in listings if key.startswith(f"{root[0]}-{root[1]}-")]
    assert len(roots) == 1, f"the root's listing is not recorded once: {roots}"
    restored = Restored()
    seen: set[str] = set()

    def build(key: str, where: Path) -> None:
        assert key not in seen, f"{where}: a directory in two durable listings"
        seen.add(key)
        where.mkdir()
        listing = listings.get(key)
        for line in listing.read_text().splitlines() if listing is not None else []:
            kind, entry, name = line.split(" ", 2)
            if kind == "d":
                build(entry, where / name)
            elif kind == "f" and entry in contents:
                shutil.copyfile(contents[entry], where / name)
                restored.files[where / name] = (where / name).stat().st_size
            elif kind == "f":
                (where / name).touch()
                restored.never_synced.append(where / name)
            else:
                raise AssertionError(f"{where / name}: neither file nor directory, not modelled")

    build(roots[0], into)
    return restored


# -- cutting ---------------------------------------------------------------------


class GroupServer(ServerProcess):
    """A server in a process group of its own: one signal reaches all its processes."""

    own_session = True

    def group(self) -> dict[int, list[str]]:
        """{pid: the states of its threads} of every process in the group."""
        assert self.pid is not None
        found: dict[int, list[str]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) != self.pid:
                    continue
                found[int(entry.name)] = [
                    (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    for task in (entry / "task").iterdir()
                ]
            except (OSError, IndexError):
                continue
        return found

    async def wait_stopped(self) -> None:
        """Until every thread of every process of the group is stopped (or dead)."""

        async def stopped() -> bool:
            return all(state in "TtZX" for states in self.group().values() for state in states)

        await wait_until(stopped, within=10, what="the server's processes stopped", interval=0.002)

    async def cut(self) -> None:
        """SIGKILL the whole group at once, and wait until none of it runs."""
        assert self.pid is not None
        os.killpg(self.pid, signal.SIGKILL)
        self._exited(await self._current().wait())
        await self.wait_stopped()

    def scrap(self) -> None:
        """Kill whatever is left of the group (a test that failed midway)."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)


@dataclasses.dataclass
class Cut:
    """The disk and what the clients had been told at one cut."""

    name: str
    records: Path
    ledger: Ledger
    confirmed: dict[str, tuple[str, bytes]]  # batch id: (date, body), delivered before
    syncs: int  # syncs recorded before the cut


def as_told(ledger: Ledger) -> Ledger:
    """A copy of `ledger` as it stands: the answers received so far, the rest unknown.

    Resends then go into the copy, numbered after what it holds.
    """
    copy = Ledger(ledger.zone)
    copy.attempts = [dataclasses.replace(attempt) for attempt in ledger.attempts]
    copy._problems = list(ledger._problems)
    numbers = [a.answered_seq or a.sent_seq for a in copy.attempts]
    copy._seq = itertools.count(max(numbers, default=0) + 1)
    return copy


def shadow_dir(fallback: Path) -> Path:
    """A directory for the records, on tmpfs if there is one."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="powercut-", dir=shm if shm.is_dir() else fallback))


@pytest.fixture
async def powered(
    powercut_library: Path, tmp_path: Path, start_server: StartServer
) -> AsyncIterator[Callable[..., Any]]:
    """start(**env) -> (server, disk): a server under the shim on a fresh data dir."""
    shadows = shadow_dir(tmp_path)
    # Workers make their sockets' directory in TMPDIR (in /tmp if its path is long):
    # one of ours, removed even when the processes were killed.
    sockets = Path(tempfile.mkdtemp(prefix="pl-", dir="/tmp"))
    servers: list[GroupServer] = []

    async def start(**env: str) -> tuple[GroupServer, Disk]:
        number = len(servers)
        disk = Disk(powercut_library, tmp_path / f"powered{number}", shadows / f"s{number}")
        disk.shadow.mkdir()
        disk.sync_root()
        # A batch on its way at a cut is leased for 2 x sink_timeout + 5 s.
        settings = {**disk.environment(), "TMPDIR": str(sockets), "INGESTOR_SINK_TIMEOUT": "0.5"}
        settings.update(env)
        server = await start_server(disk.root, kind=GroupServer, **settings)
        assert isinstance(server, GroupServer)
        servers.append(server)
        return server, disk

    try:
        yield start
    finally:
        for server in servers:
            server.scrap()
        shutil.rmtree(shadows, ignore_errors=True)
        shutil.rmtree(sockets, ignore_errors=True)


# -- checking a cut ----------------------------------------------------------------


async def lost_and_doubled(
    server: ServerProcess, ledger: Ledger
) -> tuple[list[Attempt], list[tuple[str, str]]]:
    """Acknowledged pulses with an id the server does not hold; ids it holds twice."""
    acknowledged = {a.identity: a for a in ledger.stored() if a.identity is not None}
    rows: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=30) as http:
        for tenant, day in sorted({(key[0], ledger.day_of(a)) for key, a in acknowledged.items()}):
            query = {"tenant_id": tenant, "date": day}
            rows += await collect_pages(http, f"{server.url}/pulses", "pulses", query, limit=10_000)
    held = Counter((row["tenant_id"], row["id"]) for row in rows if not row["id_assigned"])
    lost = [attempt for key, attempt in acknowledged.items() if key not in held]
    return lost, sorted(key for key, n in held.items() if n > 1)


async def counted(server: ServerProcess) -> int:
    async with httpx.AsyncClient(timeout=30) as http:
        rows = await collect_pages(http, f"{server.url}/aggregates", "aggregates", limit=1000)
    return sum(row["pulse_count"] for row in rows)


async def restart_on(
    disk: Disk, cut: Cut, into: Path, start_server: StartServer
) -> tuple[ServerProcess, Restored]:
    """Restore the cut's disk into `into` and start a server (no shim) on it."""
    restored = disk.restore(cut.records, into)
    server = await start_server(into)
    said = server.output_of_run()
    assert not [word for word in BROKEN if word in said], f"{cut.name}: at start:\n{said}"
    return server, restored


def lost_report(cut: Cut, disk: Disk, lost: list[Attempt]) -> str:
    syncs = disk.syncs(cut.records / "log")
    tail = "\n".join(f"  {call} {path}" for call, path in syncs[-12:])
    some = [(a.identity, a.answered_seq, a.answered_at) for a in lost[:8]]
    return (
        f"{cut.name}: {len(lost)} acknowledged pulses lost, e.g. {some};"
        f" {len(syncs)} syncs recorded before the cut, the last:\n{tail}"
    )


async def check_cut(disk: Disk, cut: Cut, into: Path, start_server: StartServer) -> dict[str, int]:
    """Everything acknowledged before the cut is there once; confirmed batches stand."""
    server, restored = await restart_on(disk, cut, into, start_server)
    lost, doubled = await lost_and_doubled(server, cut.ledger)
    assert lost == [], lost_report(cut, disk, lost)
    assert doubled == [], f"{cut.name}: ids stored twice: {doubled[:10]}"
    for batch_id, (day, body) in sorted(cut.confirmed.items()):
        file = server.deliveries / day / f"{batch_id}.json"
        assert file.exists(), f"{cut.name}: batch {batch_id}, delivered before the cut, is gone"
        assert file.read_bytes() == body, f"{cut.name}: batch {batch_id} changed"
    again = [a.payload for a in cut.ledger.stored() if a.identity is not None]
    resent = Ledger()
    async with httpx.AsyncClient(timeout=30) as http:
        for start in range(0, len(again), 500):
            sent = await send_pulses(http, server.url, resent, again[start : start + 500])
            assert sent.response is not None, sent.error
            assert sent.response.status_code == 202, sent.response.text[:300]
        answers = Counter(a.answer for a in resent.attempts)
        assert answers == Counter(duplicate=len(again)), f"{cut.name}: resent: {answers}"
        unknown = {a.identity: a.payload for a in cut.ledger.unresolved() if a.identity}
        if unknown:
            await post_until_stored(http, server.url, cut.ledger, list(unknown.values()))
    counts = await audit(server, cut.ledger)
    for batch_id, (day, body) in cut.confirmed.items():
        assert (server.deliveries / day / f"{batch_id}.json").read_bytes() == body
    await server.terminate()
    return {
        "acknowledged": counts.acknowledged,
        "unknown": counts.unknown + len(unknown),
        "confirmed batches": len(cut.confirmed),
        "files never synced": len(restored.never_synced),
    }


# -- the load ------------------------------------------------------------------------


class Traffic:
    """The load, and commits of past days with the file sink's deliveries watched."""

    def __init__(self, server: GroupServer, load: Load, days: list[str]) -> None:
        self.server = server
        self.load = load
        self.days = days
        self.confirmed: dict[str, tuple[str, bytes]] = {}
        self.commits = 0

    async def commit_and_watch(self) -> None:
        """Commit the past days again and again; note each batch once it is delivered."""
        async with httpx.AsyncClient(timeout=10) as http:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    for day in self.days:
                        url = f"{self.server.url}/aggregates/commit"
                        response = await http.post(url, json={"date": day})
                        assert response.status_code in (200, 503), response.text
                        self.commits += response.status_code == 200
                    url = f"{self.server.url}/batches"
                    for row in await collect_pages(http, url, "batches", limit=1000):
                        if row["status"] == "delivered" and row["batch_id"] not in self.confirmed:
                            file = self.server.deliveries / row["date"] / f"{row['batch_id']}.json"
                            self.confirmed[row["batch_id"]] = (row["date"], file.read_bytes())
                await trio.sleep(0.15)

    def take(self, name: str, disk: Disk) -> Cut:
        """The cut of this moment (every server process stopped or dead)."""
        records = disk.snapshot()
        syncs = len(disk.syncs(records / "log"))
        return Cut(name, records, as_told(self.load.ledger), dict(self.confirmed), syncs)

    async def freeze(self, name: str, disk: Disk, *, at: str | None = None) -> Cut:
        """Stop the group now, or at the next sync of a path ending in `at`; take the cut."""
        if at is None:
            assert self.server.pid is not None
            os.killpg(self.server.pid, signal.SIGSTOP)
        else:
            request = disk.shadow / "freeze.request"
            request.write_text(at)
            request.rename(disk.shadow / "freeze")
            taken = disk.shadow / "freeze.taken"

            async def reached() -> bool:
                return taken.exists()

            await wait_until(reached, within=20, what=f"a sync of *{at}", interval=0.002)
            taken.unlink()
        await self.server.wait_stopped()
        cut = self.take(name, disk)
        assert self.server.pid is not None
        os.killpg(self.server.pid, signal.SIGCONT)
        return cut


def load_on(server: GroupServer, *, prefix: str, seed: int, max_array: int) -> Load:
    factory = PulseFactory(prefix=prefix, id_share=0.6, max_array=max_array, days=2)
    return Load(server, Ledger(), factory, clients=6, seed=seed)


# -- the tests --------------------------------------------------------------------------


def test_the_model_keeps_only_what_was_synced(powercut_library: Path, tmp_path: Path) -> None:
    """The model drops what was not synced: content written after a file's last sync,
    a file never synced, an entry never synced into its directory; and follows a
    directory renamed after its parent's sync by inode, not by name."""
    disk = Disk(powercut_library, tmp_path / "root", tmp_path / "shadow")
    disk.shadow.mkdir()
    disk.sync_root()
    script = """
import os, sys
root = sys.argv[1]
def sync(path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
os.mkdir(f"{root}/.staging")
with open(f"{root}/.staging/kept", "wb") as f:
    f.write(b"synced")
    f.flush()
    os.fdatasync(f.fileno())
    f.write(b" and more")
open(f"{root}/.staging/empty", "wb").write(b"written, never synced")
sync(f"{root}/.staging")
open(f"{root}/.staging/unlisted", "wb").write(b"its entry never synced")
os.rename(f"{root}/.staging", f"{root}/dir")
sync(root)
os.mkdir(f"{root}/gone")
"""
    env = {**os.environ, **disk.environment()}
    subprocess.run([sys.executable, "-c", script, str(disk.root)], env=env, check=True)
    restored = disk.restore(disk.snapshot(), tmp_path / "after")
    after = tmp_path / "after"
    assert sorted(p.relative_to(after).as_posix() for p in after.rglob("*")) == [
        "dir",
        "dir/empty",
        "dir/kept",
    ]
    assert (after / "dir" / "kept").read_bytes() == b"synced"
    assert (after / "dir" / "empty").read_bytes() == b""
    assert restored.never_synced == [after / "dir" / "empty"]
    for call, path in [("fdatasync", ".staging/kept"), ("fsync", ".staging"), ("fsync", "")]:
        assert (call, disk.root / path) in [(c, p) for c, p in disk.syncs()]


async def test_durability_os_loses_acknowledged_pulses(
    powered: Callable[..., Any], start_server: StartServer, tmp_path: Path, report: Report
) -> None:
    """The control: with `durability = "os"` a commit is not synced, so a power cut
    under load must lose acknowledged pulses in this model; and what a checkpoint
    synced must be kept. If nothing were lost, the model would keep what was never
    synced, and the fsync test would prove nothing.

    SQLite syncs the WAL only at a checkpoint (once it holds 1,000 pages), then the
    store file: the cut comes after the first checkpoint, once more pulses have
    been acknowledged, so the pulses answered before it must be there and some
    after it gone (small requests: many commits, so the WAL soon holds 1,000 pages)."""
    server, disk = await powered(INGESTOR_DURABILITY="os")
    load = load_on(server, prefix="os", seed=3, max_array=10)
    traffic = Traffic(server, load, [])
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load.run)
            # Stopped at the first checkpoint's sync of the store file: its sync of
            # the WAL holds every commit answered so far (one writer commits at a time).
            first = await traffic.freeze("first checkpoint", disk, at="/store/store.sqlite")
            before = first.ledger
            await load.flowing(500)
            load.down()
            await server.cut()
            cut = traffic.take("durability os, SIGKILL", disk)
            nursery.cancel_scope.cancel()
    restarted, _ = await restart_on(disk, cut, tmp_path / "os-restored", start_server)
    lost, doubled = await lost_and_doubled(restarted, cut.ledger)
    lost_before, _ = await lost_and_doubled(restarted, before)
    acknowledged = len(cut.ledger.stored())
    kept = await counted(restarted)
    assert doubled == []
    assert lost, f"durability os lost nothing of {acknowledged} acknowledged pulses at a cut"
    assert lost_before == [], f"{len(lost_before)} pulses lost that a checkpoint had synced"
    assert 0 < kept < acknowledged
    report(
        f"power loss, durability os: {acknowledged} pulses acknowledged, {kept} counted after"
        f" the cut ({len(before.stored())} acknowledged before the first checkpoint);"
        f" {len(lost)} of those with ids lost; {cut.syncs} syncs recorded"
    )


SETUPS = {
    "one worker": {},
    "two workers": {"INGESTOR_WORKERS": "2", "INGESTOR_PARTITIONS": "2"},
}


@pytest.mark.parametrize("setup", list(SETUPS))
async def test_durability_fsync_survives_power_cuts(
    setup: str,
    powered: Callable[..., Any],
    start_server: StartServer,
    tmp_path: Path,
    report: Report,
) -> None:
    """Cuts at four places of a mixed load (ids and none, eight tenants, three
    days, single, array and NDJSON bodies) while past days are committed and
    delivered to the file sink: at a random moment (a write round), just before a
    checkpoint syncs the store file (the WAL synced, the store file's pages
    written but not), just before a delivery's file is synced, and last SIGKILL
    to every process at once. After each, on the restored disk: every
    acknowledged pulse counted exactly once, each acknowledged id answered
    `duplicate` when resent, every batch delivered before the cut still there
    with the same bytes and the same in the store, nothing refused or corrupt."""
    server, disk = await powered(**SETUPS[setup])
    load = load_on(server, prefix="fsync", seed=7, max_array=20)
    traffic = Traffic(server, load, [day_before(2), day_before(1)])
    moments = random.Random(11)
    cuts: list[Cut] = []
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load.run)
            nursery.start_soon(traffic.commit_and_watch)
            await load.flowing(500)
            await trio.sleep(moments.uniform(0, 0.3))
            cuts.append(await traffic.freeze("a random moment", disk))
            cuts.append(await traffic.freeze("a checkpoint", disk, at="/store/store.sqlite"))
            cuts.append(await traffic.freeze("a delivery", disk, at=".tmp"))
            await load.flowing(500)
            await trio.sleep(moments.uniform(0, 0.3))
            load.down()
            await server.cut()
            cuts.append(traffic.take("SIGKILL", disk))
            nursery.cancel_scope.cancel()
    assert load.problems == [], load.problems[:10]
    # Each cut on a server of its own, at once: a batch on its way at a cut is
    # sent again only once its lease (2 x sink_timeout + 5 s) has ended.
    figures = [""] * len(cuts)

    async def check(number: int, cut: Cut) -> None:
        found = await check_cut(disk, cut, tmp_path / f"cut{number}", start_server)
        figures[number] = f"{cut.name}: {found}"

    async with trio.open_nursery() as nursery:
        for number, cut in enumerate(cuts):
            nursery.start_soon(check, number, cut)
    report(f"power loss, durability fsync ({setup}), {traffic.commits} commits: {figures}")
