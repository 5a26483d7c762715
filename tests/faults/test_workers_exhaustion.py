"""Several workers on one SQLite store when the machine's resources run out.

`serve --workers N` runs N processes that share one store file: they take
turns on flocks (`writer.lock`, `merge.lock`, `committer.lock`), fold one
another's log rows, merge one another's client ids into one index and
commit any partition's day. Every earlier attack on resources (a full
disk, file descriptors, memory, threads) ran one process; every earlier
attack on workers ran them with plenty of everything. What runs out on a
real machine runs out for the whole group at once, and a worker that dies
while it holds a lock, a merge plan or a half-written transaction leaves
its siblings to carry on from what it left. The promises attacked are
DESIGN.md section 3's: a 2xx means stored (1), exactly once per id (2),
exact sums (3), exactly-once commit (4), no silent drops (5), overload
answered 503 rather than memory grown (6); and README's supervisor: a dead
or stuck worker is restarted, SIGTERM drains the group, no worker outlives
it.

    full disk        the store's tmpfs fills while two workers write
                     (pulses with and without ids), one of them midway
                     through a merge of 22,000 ids: every request answered
                     202 or 503 store_full, every worker reads exact totals
                     while full, a commit is 200 or 503, the merging worker
                     SIGKILLed on the full disk is replaced and answers 503;
                     once space is back (no restart) every id replays as a
                     duplicate and the audit holds
    lock holders     three workers on a nearly full disk, the holder of the
                     writers' lock SIGKILLed three times under load while
                     both days are committed in a loop: nothing
                     acknowledged lost or counted twice, each unit in one
                     batch, revisions without gaps
    open files       the group under RLIMIT_NOFILE = 64, flooded with idle
                     connections until every worker is at its limit, one
                     worker SIGKILLed meanwhile: kept connections are
                     served, the flood's backlog is answered once it goes,
                     descriptors come back, connection churn is served, and
                     the log holds no traceback
    memory           one worker with 32 MiB of address space to spare
                     (RLIMIT_AS) taking six 10,000-pulse arrays at once:
                     each answered 202 or 503, or cut off where the worker
                     dies in C code whose allocation failed (msgspec's
                     encoder, the interpreter) and the supervisor replaces
                     it; no Python traceback; every acknowledged pulse
                     stored once, the group serving the resends
    clean restart    a group stopped cleanly, the disk then filled, the
                     group started again: it refuses in one line saying the
                     disk is full (its WAL index cannot be made), or serves
                     reads and answers 503; with space again, nothing lost

Each test ends with totals (Decimal) equal to what was acknowledged, and
where days were committed the audit (each bucket's delivered batches add
up to it), then a SIGTERM that must exit 0 and leave no worker behind.
Servers write their output beside the test, not on the small disk.
Mounting a tmpfs needs root: without it the disk tests skip, or fail
under CI.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os
import random
import re
import resource
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio

from tests.e2e.cluster_support import alive, child_pids, connection_owner, unavailable
from tests.faults.conftest import Report
from tests.faults.harness import Load, PulseFactory, audit, check_bounds, wait_all_delivered
from tests.support.server import (
    Ledger,
    ServerError,
    ServerProcess,
    collect_pages,
    day_before,
    encode_body,
    post_until_stored,
    random_pulse,
    totals_of,
    wait_until,
)

WORKER_MARK = "spawn_main"  # multiprocessing's spawn command line
QUIET = {"INGESTOR_COMMIT_INTERVAL": "3600", "INGESTOR_COMMIT_GRACE": "30d"}
FRESH = httpx.Limits(max_keepalive_connections=0)  # a new connection, so any worker, a request
TENANTS = [f"wx{n}" for n in range(6)]
BULK_IDS = 22_000  # more than the 20,000 recent ids that start a merge
FILES = 64  # RLIMIT_NOFILE of the group in the open-files test (a worker idles at ~24)
AS_ROOM = 32 << 20  # address space left to the worker of the memory test
ROUNDS = 600  # sends of an array until each of its pulses is stored (a disk heals slowly)
# Long SKU names: more bytes a pulse, so more memory a request for the same work.
SKUS = [f"sku-{n}-" + "x" * 120 for n in range(7)]


def pulse_of(rng: random.Random, pulse_id: str, day: str) -> dict[str, Any]:
    return random_pulse(rng, pulse_id, day, TENANTS)


# -- a small disk -----------------------------------------------------------------


@contextlib.contextmanager
def small_disk(where: Path, size_mib: int) -> Iterator[Path]:
    """A tmpfs of `size_mib` MiB mounted at `where` for the block (root only)."""
    where.mkdir()
    if os.geteuid() != 0 or os.environ.get("FAULTS_NO_MOUNT"):
        unavailable("a small disk needs root to mount a tmpfs (and FAULTS_NO_MOUNT unset)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        unavailable(f"cannot mount a tmpfs: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield where
    finally:
        # The servers are gone; a lazy unmount frees it even if a straggler holds a file.
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


class Ballast:
    """A file that takes the free space of its filesystem (`fill`) and gives it back."""

    def __init__(self, mount: Path) -> None:
        self.path = mount / "ballast"
        self.bytes = 0

    def fill(self, leave: int = 0) -> None:
        """Write until ENOSPC, then give `leave` bytes back."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 20, 1 << 16, 1 << 12):
                block = bytes(size)
                while True:
                    try:
                        self.bytes += os.write(fd, block)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
            if leave:
                self.bytes = max(0, self.bytes - leave)
                os.ftruncate(fd, self.bytes)
        finally:
            os.close(fd)

    def free(self) -> None:
        self.path.unlink(missing_ok=True)
        self.bytes = 0


def lock_holder(path: Path) -> int | None:
    """The process holding an flock on `path`, from /proc/locks (None: nobody)."""
    inode = os.stat(path).st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].endswith(f":{inode}"):
            return int(fields[4])
    return None


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return 0


def vm_size(pid: int) -> int:
    """VmSize of process `pid`, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmSize for pid {pid}")


# -- the group --------------------------------------------------------------------


class LowFileLimit(ServerProcess):
    """The group started under RLIMIT_NOFILE = FILES, soft and hard: every worker has it."""

    def command(self) -> list[str]:
        command = super().command()
        shim = (
            "import os, resource, sys;"
            f" resource.setrlimit(resource.RLIMIT_NOFILE, ({FILES}, {FILES}));"
            " os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
        )
        return [command[0], "-c", shim, *command[1:]]


class Group:
    """One `serve --workers N` supervisor and its workers, under test."""

    def __init__(
        self,
        data_dir: Path,
        workers: int,
        *,
        kind: type[ServerProcess] = ServerProcess,
        **env: str,
    ) -> None:
        self.workers = workers
        self.server = kind(
            data_dir,
            env={
                "INGESTOR_WORKERS": str(workers),
                "INGESTOR_GRACEFUL_TIMEOUT": "5",
                **QUIET,
                **env,
            },
            stop_timeout=20,
        )
        # The output beside the test, not on a small disk that the test fills.
        run_dir = data_dir.parent.parent / f"{data_dir.parent.name}-{data_dir.name}.server"
        run_dir.mkdir(exist_ok=True)
        self.server.run_dir = run_dir
        self.server.log_path = run_dir / "output.log"
        self.seen: set[int] = set()  # every worker pid ever seen: none may outlive the test

    @property
    def url(self) -> str:
        return self.server.url

    def pids(self) -> list[int]:
        if self.server.pid is None or not self.server.running:
            return []
        found = child_pids(self.server.pid, marker=WORKER_MARK)
        self.seen.update(found)
        return found

    def services_started(self) -> int:
        return self.server.output_of_run().count(" ingestor.service start ")

    async def start(self) -> None:
        await self.server.start()
        await self.all_serving(self.workers)

    async def all_serving(self, starts: int, within: float = 30) -> list[int]:
        """Until `starts` services have started in this run and every worker lives."""

        async def ready() -> list[int]:
            found = self.pids()
            return found if len(found) == self.workers and self.services_started() >= starts else []

        return await wait_until(ready, within=within, what=f"{self.workers} workers serving")

    async def kill_worker(self, victim: int) -> None:
        """SIGKILL worker `victim` and wait until its replacement serves."""
        starts = self.services_started()
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> bool:
            found = self.pids()
            return victim not in found and len(found) == self.workers

        await wait_until(replaced, within=40, what=f"worker {victim} replaced")
        await self.all_serving(starts + 1)

    async def stop(self) -> int:
        """SIGTERM the supervisor; its exit code. No worker may outlive it."""
        self.pids()
        code = await self.server.terminate()
        left = [pid for pid in sorted(self.seen) if alive(pid)]
        assert left == [], f"workers {left} outlived their supervisor (exit code {code})"
        return code

    async def aclose(self) -> None:
        self.pids()
        await self.server.aclose()
        for pid in self.seen:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def tracebacks(self) -> int:
        return self.server.output.count("Traceback (most recent call last)")


@contextlib.asynccontextmanager
async def group_on(
    data_dir: Path, workers: int = 2, *, kind: type[ServerProcess] = ServerProcess, **env: str
) -> AsyncIterator[Group]:
    group = Group(data_dir, workers, kind=kind, **env)
    try:
        await group.start()
        yield group
    finally:
        with trio.CancelScope(shield=True):
            await group.aclose()
    assert "Traceback" not in group.server.output, (
        f"the group logged {group.tracebacks()} tracebacks:\n{group.server.output[-4000:]}"
    )


async def send_in_parallel(url: str, ledger: Ledger, chunks: list[list[dict[str, Any]]]) -> None:
    """Each chunk as one array, until stored, by four clients on fresh connections."""
    async with (
        httpx.AsyncClient(timeout=60.0, limits=FRESH) as http,
        trio.open_nursery() as nursery,
    ):
        for client in range(4):

            async def run(mine: list[list[dict[str, Any]]] = chunks[client::4]) -> None:
                for chunk in mine:
                    await post_until_stored(http, url, ledger, chunk, rounds=ROUNDS)

            nursery.start_soon(run)


async def read_totals(url: str, times: int) -> list[dict[Any, Any]]:
    """GET /aggregates, every page, on `times` fresh connections (so every worker)."""
    seen = []
    async with httpx.AsyncClient(timeout=30.0, limits=FRESH) as http:
        for _ in range(times):
            rows = await collect_pages(http, f"{url}/aggregates", "aggregates", limit=1000)
            seen.append(totals_of(rows))
    return seen


async def settled(load: Load) -> None:
    """Hold the load's clients and wait until what they sent is answered."""
    load.down()

    async def idle() -> bool:
        return load.in_flight == 0

    await wait_until(idle, within=20, what="requests in flight answered")


# -- 1. the disk fills under two workers -----------------------------------------------


async def test_a_full_disk_under_two_workers_is_503_reads_stay_exact_and_it_heals(
    tmp_path: Path, report: Report
) -> None:
    ledger = Ledger()
    rng = random.Random(11)
    yesterday = day_before(1)
    bulk = [pulse_of(rng, f"bulk-{n}", yesterday) for n in range(BULK_IDS)]
    chunks = [bulk[i : i + 1000] for i in range(0, len(bulk), 1000)]
    with small_disk(tmp_path / "disk", 32) as disk:
        ballast = Ballast(disk)
        async with group_on(disk / "data", 2, INGESTOR_PARTITIONS="4") as group:
            store = disk / "data" / "store"
            factory = PulseFactory(prefix="fl", tenants=TENANTS, id_share=0.6, max_array=60)
            load = Load(group.server, ledger, factory, clients=6, seed=5, keepalive=False)
            refusals = 0

            async def refused(more: int) -> bool:
                return load.error_codes["store_full"] >= refusals + more

            with trio.fail_after(80):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(load.run)
                    await load.flowing(300, what="before the bulk")
                    await settled(load)
                    # Enough new ids for a merge, planned and left midway: its
                    # slices run one a write transaction, and the disk fills now.
                    await send_in_parallel(group.url, ledger, chunks)
                    merging = lock_holder(store / "merge.lock")
                    assert merging is not None, "no merge in progress: the scenario did not happen"
                    ballast.fill()
                    load.up.set()
                    await wait_until(partial(refused, 20), within=30, what="503 store_full")

                    async with httpx.AsyncClient(timeout=30.0) as http:
                        single = await http.post(
                            f"{group.url}/pulses",
                            json=pulse_of(rng, "while-full", yesterday),
                        )
                        commit = await http.post(
                            f"{group.url}/aggregates/commit", json={"date": yesterday}
                        )
                    await settled(load)
                    unanswered = ledger.unresolved()
                    expected = ledger.expected_totals()
                    reads = await read_totals(group.url, 8)
                    wrong_reads = [n for n, held in enumerate(reads) if held != expected]
                    # The merging worker dies on the full disk; its replacement must serve.
                    await group.kill_worker(merging)
                    await check_bounds(group.server, ledger)
                    refusals = load.error_codes["store_full"]
                    load.up.set()
                    await wait_until(
                        partial(refused, 5), within=30, what="503 store_full after the restart"
                    )
                    while_full = dict(load.statuses)
                    ballast.free()
                    await load.flowing(500, what="after the space came back, with no restart")
                    load.stop()

            assert single.status_code == 503, single.text
            assert single.headers.get("Retry-After", "").isdigit(), single.headers
            error = single.json()["error"]
            assert error["code"] == "store_full", error
            assert "disk" in error["message"], error
            assert "full" in error["message"], error
            assert commit.status_code in (200, 503), commit.text
            assert unanswered == [], (
                f"{len(unanswered)} pulses got no answer while the disk was full"
            )
            assert wrong_reads == [], (
                f"{len(wrong_reads)} of {len(reads)} reads on a full disk differ from what was"
                f" acknowledged ({sum(t.count for t in expected.values())} pulses)"
            )
            assert load.problems == [], load.problems[:10]
            assert set(load.statuses) <= {202, 503}, load.statuses
            assert set(load.error_codes) == {"store_full"}, load.error_codes
            mark = len(ledger.attempts)
            await send_in_parallel(group.url, ledger, chunks)
            replays = Counter(a.answer for a in ledger.attempts[mark:])
            assert replays == Counter({"duplicate": BULK_IDS}), (
                f"ids merged, or midway, when the disk filled and the merging worker died,"
                f" replayed: {dict(replays)}"
            )
            counts = await audit(group.server, ledger)
            assert await group.stop() == 0, group.server.tail()
    counts.extra["answers up to the space coming back"] = while_full
    counts.extra["commit while full"] = commit.status_code
    report(counts.line("workers, disk full"))


# -- 2. the holder of the writers' lock killed, the disk nearly full --------------------------


async def test_writer_lock_holders_killed_on_a_nearly_full_disk_lose_nothing_and_bill_once(
    tmp_path: Path, report: Report
) -> None:
    ledger = Ledger()
    kills: list[int] = []
    commits: Counter[int | str] = Counter()
    with small_disk(tmp_path / "disk", 24) as disk:
        ballast = Ballast(disk)
        async with group_on(disk / "data", 3, INGESTOR_PARTITIONS="4") as group:
            lock = disk / "data" / "store" / "writer.lock"
            factory = PulseFactory(
                prefix="kl", tenants=TENANTS, id_share=0.8, max_array=200, days=1
            )
            load = Load(
                group.server, ledger, factory, clients=6, seed=9, keepalive=False, timeout=20
            )

            async def committing() -> None:
                """Both days, again and again, on fresh connections (so any worker)."""
                async with httpx.AsyncClient(timeout=30.0, limits=FRESH) as http:
                    while not load.stopping:
                        for day in (day_before(1), day_before(0)):
                            try:
                                response = await http.post(
                                    f"{group.url}/aggregates/commit", json={"date": day}
                                )
                            except httpx.TransportError as exc:
                                commits[type(exc).__name__] += 1
                            else:
                                commits[response.status_code] += 1
                        await trio.sleep(0.2)

            first = set(group.pids())

            async def holder() -> int | None:
                """A worker of the first generation holding the lock: each dies once, so
                the supervisor's pause before a restart stays at its first, 1 s."""
                found = lock_holder(lock)
                return found if found in first else None

            with trio.fail_after(80):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(load.run)
                    nursery.start_soon(committing)
                    await load.flowing(600, what="before the disk fills")
                    ballast.fill(leave=1 << 20)
                    for kill in range(3):
                        victim = await wait_until(
                            holder, within=20, what="a worker holding writer.lock", interval=0.001
                        )
                        assert victim is not None
                        await group.kill_worker(victim)
                        kills.append(victim)
                        floor = sum(e.status is not None for e in load.exchanges) + 20

                        async def answered(floor: int = floor) -> bool:
                            return sum(e.status is not None for e in load.exchanges) >= floor

                        await wait_until(answered, within=30, what=f"answers after kill {kill + 1}")
                    ballast.free()
                    await load.flowing(300, what="after the space came back")
                    load.stop()

            assert load.problems == [], load.problems[:10]
            assert set(load.statuses) <= {202, 503, "RemoteProtocolError", "ReadError"}, (
                load.statuses
            )
            assert set(commits) <= {200, 503, "RemoteProtocolError", "ReadError"}, commits
            assert commits[200] > 0, commits
            counts = await audit(group.server, ledger)
            assert await group.stop() == 0, group.server.tail()
    counts.extra["writer.lock holders killed"] = len(kills)
    counts.extra["answers"] = dict(load.statuses)
    counts.extra["commits"] = dict(commits)
    report(counts.line("workers, lock holders killed, disk nearly full"))


# -- 3. the group at its open-file limit ---------------------------------------------------


class Raw:
    """One HTTP/1.1 connection, kept open: requests are sent on it one at a time."""

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self.stream = stream
        self.host = host
        self.buffer = b""

    @classmethod
    async def open(cls, server: ServerProcess) -> Raw:
        stream = await trio.open_tcp_stream(server.host, server.port)
        return cls(stream, f"{server.host}:{server.port}")

    @property
    def local_port(self) -> int:
        port: int = self.stream.socket.getsockname()[1]
        return port

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        await self.stream.send_all(head.encode() + b"\r\n" + body)
        while b"\r\n\r\n" not in self.buffer:
            await self._receive()
        head_bytes, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            await self._receive()
        payload, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split()[1]), payload

    async def _receive(self) -> None:
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            raise ConnectionError(f"closed by the server after {self.buffer[:200]!r}")
        self.buffer += chunk


def nofile_pulse(pulse_id: str) -> bytes:
    return msgspec.json.encode(
        {"tenant_id": "nofile", "product_sku": "s", "use_unit": "u", "used_amount": "1.5"}
        | {"id": pulse_id}
    )


async def counted_on(connection: Raw) -> tuple[int, Decimal]:
    status, body = await connection.request("GET", "/aggregates?tenant_id=nofile")
    assert status == 200, body
    rows = msgspec.json.decode(body)["aggregates"]
    return sum(r["pulse_count"] for r in rows), sum(
        (Decimal(r["used_amount"]) for r in rows), Decimal(0)
    )


async def test_a_group_at_its_open_file_limit_serves_recovers_and_logs_no_traceback(
    tmp_path: Path, report: Report
) -> None:
    acknowledged = 0
    answers: Counter[str] = Counter()
    kept: dict[int, Raw] = {}
    others: list[Raw] = []
    flood: list[trio.SocketStream] = []
    async with group_on(tmp_path / "data", 3, kind=LowFileLimit, INGESTOR_DURABILITY="os") as group:
        pids = group.pids()
        idle = {pid: open_fds(pid) for pid in pids}
        try:
            with trio.fail_after(60):
                # One kept connection to each worker, found by who accepted it.
                for _ in range(60):
                    if len(kept) == len(pids):
                        break
                    connection = await Raw.open(group.server)
                    status, _ = await connection.request("GET", "/healthz")
                    assert status == 200
                    owner = connection_owner(pids, group.server.port, connection.local_port)
                    assert owner is not None
                    if owner in kept:
                        others.append(connection)
                    else:
                        kept[owner] = connection
                assert len(kept) == len(pids), f"no connection reached every worker: {kept}"
                for connection in others:
                    await connection.aclose()
                others.clear()
                # Idle connections until every worker closes some to keep room.
                for _ in range(3 * FILES):
                    flood.append(await trio.open_tcp_stream(group.server.host, group.server.port))

                async def crowded() -> bool:
                    return group.server.output.count("open files near the limit") >= len(pids)

                await wait_until(crowded, within=10, what=f"every worker near {FILES} descriptors")
                for owner, connection in kept.items():
                    status, _ = await connection.request(
                        "POST", "/pulses", nofile_pulse(f"kept-{owner}")
                    )
                    answers[f"POST {status}"] += 1
                    acknowledged += status == 202
                    status, _ = await connection.request("GET", "/metrics")
                    answers[f"metrics {status}"] += 1
                    status, _ = await connection.request(
                        "POST", "/aggregates/commit", f'{{"date": "{day_before(0)}"}}'.encode()
                    )
                    answers[f"commit {status}"] += 1
                # A worker dies at its limit: its replacement starts under the same one.
                victim = pids[0]
                await kept.pop(victim).aclose()
                await group.kill_worker(victim)
                for stream in flood:
                    await stream.aclose()
                flood.clear()
                pids = group.pids()

                async def descriptors_back() -> bool:
                    # Idle, plus the kept connection and a file the sink may have open.
                    return all(open_fds(pid) <= max(idle.values()) + 3 for pid in pids)

                await wait_until(descriptors_back, within=15, what="descriptors given back")
                back = {pid: open_fds(pid) for pid in pids}
                unanswered = 0
                for number in range(90):  # one client, a new connection a request
                    answer: int | None = None
                    with trio.move_on_after(3):
                        connection = await Raw.open(group.server)
                        try:
                            answer, _ = await connection.request(
                                "POST", "/pulses", nofile_pulse(f"churn-{number}")
                            )
                        finally:
                            await connection.aclose()
                    unanswered += answer is None
                    acknowledged += answer == 202
                first = next(iter(kept.values()))
                count, amount = await counted_on(first)
                async with httpx.AsyncClient(timeout=30.0) as http:
                    response = await http.post(
                        f"{group.url}/aggregates/commit", json={"date": day_before(0)}
                    )
                    assert response.status_code == 200, response.text
                    batches = await wait_all_delivered(http, group.url, within=30)
        finally:
            for connection in [*kept.values(), *others]:
                await connection.aclose()
            for stream in flood:
                await stream.aclose()
        assert await group.stop() == 0, group.server.tail()
        output = group.server.output
        emfile = output.count("accept returned EMFILE")
        tracebacks = group.tracebacks()
        report(
            f"workers, open files: limit {FILES}, idle {sorted(idle.values())}, after the flood"
            f" {sorted(back.values())}; answers at the limit {dict(answers)}; churn unanswered"
            f" {unanswered}; {acknowledged} acknowledged, {count} counted; {len(batches)}"
            f" batches delivered; {emfile} EMFILE log lines, {tracebacks} tracebacks"
        )
        assert set(answers) <= {"POST 202", "metrics 200", "commit 200"}, answers
        assert unanswered == 0, f"{unanswered} of 90 churned connections got no answer in 3 s"
        assert (count, amount) == (acknowledged, Decimal("1.5") * acknowledged), (
            f"counted {count} pulses ({amount}), acknowledged {acknowledged}"
        )
        billed = sum((Decimal(b["used_amount"]) for b in batches), Decimal(0))
        assert billed == amount, f"batches bill {billed}, the totals hold {amount}"
        last = [line for line in output.splitlines() if line.startswith(("OSError", "Error"))]
        assert tracebacks == 0, (
            f"the workers logged {tracebacks} tracebacks while at their open-file limit:"
            f" {emfile} lines 'ERROR trio.serve_listeners accept returned EMFILE (Too many"
            f" open files); retrying in 0.1 seconds', each followed by the trace of the"
            f" failed accept, ten a second per listener for as long as the limit lasts;"
            f" last: {last[-1:]}"
        )


# -- 4. one worker short of memory ---------------------------------------------------------


async def test_a_worker_short_of_memory_loses_nothing_and_the_group_goes_on_serving(
    tmp_path: Path, report: Report
) -> None:
    ledger = Ledger()
    midnight = dt.datetime.combine(dt.date.fromisoformat(day_before(1)), dt.time(), dt.UTC)
    stamps = [(midnight + dt.timedelta(seconds=7 * n)).isoformat() for n in range(1000)]
    serial = iter(range(10**9))
    statuses: Counter[int | str] = Counter()

    def body() -> list[dict[str, Any]]:
        """A 10,000-pulse array, each pulse with an id (so a resend is safe)."""
        pulses = []
        for _ in range(10_000):
            n = next(serial)
            pulses.append(
                {
                    "tenant_id": TENANTS[n % len(TENANTS)],
                    "product_sku": SKUS[n % len(SKUS)],
                    "use_unit": "api_call",
                    "used_amount": f"{n % 997}.{n % 1000:03d}",
                    "timestamp": stamps[n % len(stamps)],
                    "id": f"mem-{n}",
                }
            )
        return pulses

    async with group_on(
        tmp_path / "data",
        2,
        INGESTOR_DURABILITY="os",
        INGESTOR_WORKER_TIMEOUT="5",
        PYTHONFAULTHANDLER="1",  # a crash in C code says where
    ) as group:
        pids = group.pids()
        victim = pids[0]
        # Six keep-alive connections that the kernel gave the victim.
        mine: list[Raw] = []
        spare: list[Raw] = []
        try:
            for _ in range(80):
                if len(mine) == 6:
                    break
                connection = await Raw.open(group.server)
                status, _ = await connection.request("GET", "/healthz")
                assert status == 200
                owner = connection_owner(pids, group.server.port, connection.local_port)
                (mine if owner == victim else spare).append(connection)
            assert len(mine) == 6, f"only {len(mine)} connections reached worker {victim}"
            limit = vm_size(victim) + AS_ROOM
            resource.prlimit(victim, resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))

            async def client(connection: Raw) -> None:
                payloads = body()
                attempts = ledger.sent(payloads, "array")
                try:
                    with trio.fail_after(30):
                        status, answer = await connection.request(
                            "POST", "/pulses", encode_body(payloads, "array")[0]
                        )
                except (
                    OSError,
                    ConnectionError,
                    trio.BrokenResourceError,
                    trio.TooSlowError,
                ) as exc:
                    ledger.answered(attempts, None, type(exc).__name__)
                    statuses[type(exc).__name__] += 1
                    return
                ledger.answered(attempts, httpx.Response(status, content=answer))
                statuses[status] += 1

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for connection in mine:
                        nursery.start_soon(client, connection)
        finally:
            for connection in [*mine, *spare]:
                with contextlib.suppress(OSError, trio.BrokenResourceError):
                    await connection.aclose()
        during = group.server.output  # what the supervisor said of the load under the limit
        if alive(victim):
            with contextlib.suppress(ProcessLookupError):
                resource.prlimit(victim, resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)
            # A victim stuck where no Python code runs stays stuck once the limit
            # is lifted: in CPython's Thread.start(), waiting for ever for a new
            # thread of trio's (a store call) that died of a MemoryError before
            # it said it had started. Its heartbeat stops, and the supervisor
            # kills it within worker_timeout and starts another, as for any
            # stuck worker. Let that happen now, not during the stop: the
            # stop's exit code is to say whether the stop itself went cleanly.
            await trio.sleep(5 + 1.5)
        # Settle every pulse: resend, with its id, each one not yet stored.
        stored = {a.identity for a in ledger.attempts if a.answer in ("accepted", "duplicate")}
        unique = list(
            {id(a.payload): a.payload for a in ledger.attempts if a.identity not in stored}.values()
        )
        async with httpx.AsyncClient(timeout=60.0) as http:
            for start in range(0, len(unique), 5000):
                await post_until_stored(
                    http, group.url, ledger, unique[start : start + 5000], rounds=ROUNDS
                )
            rows = await collect_pages(http, f"{group.url}/aggregates", "aggregates", limit=1000)
        accepted = Counter(a.identity for a in ledger.attempts if a.answer == "accepted")
        assert set(accepted.values()) == {1}, "an id was accepted twice"
        stored = {a.identity for a in ledger.attempts if a.answer in ("accepted", "duplicate")}
        assert len(stored) == next(serial), "a pulse was never stored"
        expected = ledger.expected_totals()
        assert totals_of(rows) == expected, "totals differ from what was acknowledged"
        assert await group.stop() == 0, group.server.tail()
        output = group.server.output
        deaths = re.findall(r"worker died, restarting worker=\d+ exit_code=(-?\d+)", during)
        killed = during.count("worker stopped answering, killing it")
        survived = not deaths and not killed
        stuck_after = output.count("worker stopped answering, killing it") - killed
        errors = Counter(
            line.strip()
            for line in output.splitlines()
            if line.startswith(("Fatal Python error", "MemoryError", "RuntimeError"))
            or line.startswith('  File "/work/main/ingestor')
        )
        report(
            f"workers, memory: RLIMIT_AS {limit >> 20} MiB on one worker; answers"
            f" {dict(statuses)}; the worker {'went on' if survived else 'DIED'} (exit codes"
            f" {deaths}, {killed} killed as stuck, {stuck_after} once the limit was lifted);"
            f" {group.tracebacks()} tracebacks;"
            f" {sum(t.count for t in expected.values())} pulses stored exactly once"
        )
        # A worker whose allocations fail may die where no Python code can
        # answer: msgspec's encoder, the interpreter itself (SIGSEGV, SIGABRT),
        # or a loop that cannot run its heartbeat (killed). Cut off, such a
        # request was never acknowledged, and the supervisor replaces the
        # worker. What is answered is 202 or 503; a Python traceback is a defect.
        wrong = {k: n for k, n in statuses.items() if isinstance(k, int) and k not in (202, 503)}
        cut = sum(n for k, n in statuses.items() if not isinstance(k, int))
        assert (wrong, group.tracebacks()) == ({}, 0), (
            f"a worker with {AS_ROOM >> 20} MiB of address space to spare, sent 10,000-pulse"
            f" arrays on 6 connections: answers {dict(statuses)}; the worker "
            + ("went on" if survived else "died")
            + f" (exit codes {deaths} in the supervisor's log, {killed} killed for a stale"
            f" heartbeat); {group.tracebacks()} tracebacks in the log; where:"
            f" {errors.most_common(8)}"
        )
        assert survived or cut, "the worker died, yet every request was answered"


# -- 5. a clean restart onto a full disk -------------------------------------------------------


async def test_a_group_restarted_on_a_full_disk_says_why_or_serves_and_loses_nothing(
    tmp_path: Path, report: Report
) -> None:
    ledger = Ledger()
    rng = random.Random(17)
    yesterday = day_before(1)
    with small_disk(tmp_path / "disk", 16) as disk:
        ballast = Ballast(disk)
        group = Group(disk / "data", 2, INGESTOR_PARTITIONS="4")
        try:
            await group.start()
            async with httpx.AsyncClient(timeout=30.0, limits=FRESH) as http:
                for n in range(4):
                    await post_until_stored(
                        http,
                        group.url,
                        ledger,
                        [pulse_of(rng, f"cr-{n}-{i}", yesterday) for i in range(250)],
                        rounds=ROUNDS,
                    )
            assert await group.stop() == 0, group.server.tail()
            left = sorted(p.name for p in (disk / "data" / "store").iterdir())
            ballast.fill()  # whatever else writes on that disk takes what the stop freed
            refused: str | None = None
            try:
                await group.start()
            except ServerError as exc:
                refused = str(exc).splitlines()[-1]
            report(
                f"workers, clean restart on a full disk: store files after the stop {left};"
                f" start: {refused or 'served'}"
            )
            # A clean stop leaves no WAL index; opening the store makes one (32
            # KiB), which a full disk refuses. The start must then fail in one
            # line that says why, and change nothing; a start with space again
            # finds everything (a reserve of disk for the store's own files
            # would let it serve reads meanwhile: not built).
            if refused is not None:
                assert re.search(r"disk full|disk under the store is full", refused), refused
                assert group.server.exit_codes[-1:] == [1], group.server.exit_codes
            else:
                reads = await read_totals(group.url, 4)
                assert all(held == ledger.expected_totals() for held in reads), reads
                async with httpx.AsyncClient(timeout=30.0) as http:
                    full = await http.post(
                        f"{group.url}/pulses", json=pulse_of(rng, "cr-full", yesterday)
                    )
                assert full.status_code == 503, full.text
                assert full.json()["error"]["code"] == "store_full", full.text
                assert await group.stop() == 0, group.server.tail()
            ballast.free()
            await group.start()
            async with httpx.AsyncClient(timeout=30.0) as http:
                await post_until_stored(
                    http, group.url, ledger, [pulse_of(rng, "cr-after", yesterday)], rounds=ROUNDS
                )
            await audit(group.server, ledger)
            assert await group.stop() == 0, group.server.tail()
        finally:
            await group.aclose()
    assert "Traceback" not in group.server.output, group.server.output[-4000:]
