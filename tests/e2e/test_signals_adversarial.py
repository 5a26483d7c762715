"""Signals and the process lifecycle, as operators and orchestrators deliver them.

Kubernetes, systemd, docker and people send signals at awkward moments: while
the store opens, while a commit runs, while a batch waits on a slow billing
system, while a body is half uploaded, to every process of a `--workers`
group at once, twice in a row. The money rules hold whatever comes (DESIGN.md
section 3: a 2xx means stored, nothing acknowledged lost, nothing counted
twice), and the operator's: a clean stop exits 0 and says so, with no
traceback; no process outlives its group; the next start is clean.

    supervisor waiting for PostgreSQL   SIGTERM / SIGINT before any worker runs
    whole group paused, then resumed    SIGSTOP / SIGCONT of every process
                                        (a frozen container): no worker is
                                        killed as stuck for a pause they shared
    supervisor SIGKILLed early          under a subreaper (systemd --user, an
                                        init that is not PID 1): no orphan
    supervisor SIGKILLed under load     its workers drain, answer and exit
    SIGTERM then SIGINT to every        systemd's KillMode=control-group, an
    process of the group at once        impatient operator: exit 0, drained
    a worker SIGKILLed as it stops      exit 1 naming it; nothing acknowledged lost
    a second signal as the stop ends    exit 0 still, not death by that signal
    SIGTERM while the sink holds        stop does not wait for the sink; the
    a batch                             batch is sent again at the next start
    SIGTERM mid-upload                  the request in flight is answered
    SIGTERM mid-commit                  the commit is answered and whole
    the log pipe's reader gone          (SIGPIPE territory) serving goes on,
                                        the stop exits 0
    SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2   no handler: the process dies, as in a
                                        crash, and loses nothing acknowledged

Every process a test starts is killed at its end (its whole process group);
waits are polls bounded by generous deadlines.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio

from tests.faults.harness import Load, PulseFactory, audit, commit_days, wait_all_delivered
from tests.faults.sink_target import SinkTarget
from tests.support.fixtures import ABORTED_UPLOAD_WARNINGS
from tests.support.server import (
    Ledger,
    ServerProcess,
    check_bounds,
    check_pulses_stored_once,
    collect_pages,
    day_before,
    free_port,
    outbox_problems,
    post_until_stored,
    random_pulse,
    totals_of,
    wait_until,
)

pytestmark = [pytest.mark.e2e, *(pytest.mark.filterwarnings(r) for r in ABORTED_UPLOAD_WARNINGS)]

PYTHON = sys.executable
WORKER_MARK = b"spawn_main"  # multiprocessing's spawn command line
QUIET = {"INGESTOR_COMMIT_INTERVAL": "3600", "INGESTOR_COMMIT_GRACE": "30d"}
SECRET = "signals-secret"
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


# -- processes ------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, process group) of `pid`, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2])


def members(pgid: int, *, marker: bytes | None = None) -> list[int]:
    """The live (not zombie) processes of process group `pgid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _stat(int(entry))
        if stat is None or stat[2] != pgid or stat[0] in ("Z", "X"):
            continue
        if marker is not None:
            try:
                if marker not in Path(f"/proc/{entry}/cmdline").read_bytes():
                    continue
            except OSError:
                continue
        found.append(int(entry))
    return sorted(found)


def _stopped(pid: int) -> bool:
    """Whether every thread of `pid` is stopped (or it is gone)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for task in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{task}/stat").read_text()
        except OSError:
            continue
        if text[text.rindex(")") + 2] not in "tTZX":
            return False
    return True


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


class Group(ServerProcess):
    """`python -m ingestor serve` in a session of its own: its process group holds
    the supervisor, its workers and whatever they leave behind, for the test to
    signal as a terminal, systemd or a container runtime would, and to kill
    whole at the end. `pipe` sends the first run's output into a pipe the test
    reads (`read_pipe`) and may close."""

    def __init__(self, data_dir: Path, *, pipe: bool = False, **kwargs: Any) -> None:
        super().__init__(data_dir, **kwargs)
        self.pgids: list[int] = []
        self.pipe: trio.lowlevel.FdStream | None = None
        self._pipe_next = pipe
        self.piped = b""

    async def _spawn(self) -> None:
        with self._begin_run() as log:
            out: Any = log
            reader = writer = None
            if self._pipe_next:
                self._pipe_next = False
                reader, writer = os.pipe()
                out = writer
            try:
                self._process = await trio.lowlevel.open_process(
                    self.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    env=self.environment(),
                    cwd=self.run_dir,
                    start_new_session=True,
                )
            finally:
                if writer is not None:
                    os.close(writer)
            if reader is not None:
                self.pipe = trio.lowlevel.FdStream(reader)
        self.pgids.append(self._process.pid)
        with contextlib.suppress(OSError):  # SIGQUIT dumps no core into the test's dir
            resource.prlimit(self._process.pid, resource.RLIMIT_CORE, (0, 0))

    async def launch(self) -> None:
        """Start the command without waiting for it to be ready."""
        await self._spawn()

    async def read_pipe(self, pattern: str, count: int, within: float = 20) -> None:
        """Read the piped output until `pattern` occurs `count` times."""
        assert self.pipe is not None
        with trio.fail_after(within):
            while len(re.findall(pattern.encode(), self.piped)) < count:
                chunk = await self.pipe.receive_some(65536)
                assert chunk, f"the pipe closed; read:\n{self.piped.decode(errors='replace')}"
                self.piped += chunk

    def workers(self) -> list[int]:
        return members(self.pgids[-1], marker=WORKER_MARK) if self.pgids else []

    async def wait_exit(self, within: float) -> int | None:
        """The exit code, once the current run has exited; None if it still runs
        `within` seconds later."""
        process = self._current()
        with trio.move_on_after(within):
            code = await process.wait()
            self.exit_codes.append(code)
            return code
        return None

    def services_started(self) -> int:
        return self.output_of_run().count(" ingestor.service start ")

    async def all_serving(self, workers: int) -> list[int]:
        async def ready() -> list[int]:
            found = self.workers()
            if len(found) == workers and self.services_started() >= workers:
                return found
            return []

        return await wait_until(ready, within=30, what=f"{workers} workers serving")

    def left(self) -> list[int]:
        """Processes of any run of this server that are still alive."""
        return sorted(pid for pgid in self.pgids for pid in members(pgid))

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for pgid in self.pgids:
                _signal_group(pgid, signal.SIGCONT)
                _signal_group(pgid, signal.SIGKILL)
            await super().aclose()
            if self.pipe is not None:
                await self.pipe.aclose()
                self.pipe = None


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A TMPDIR for the servers, removed at the end with whatever they left in it.

    Short: a supervisor puts its workers' Unix sockets there only if its path
    is at most 64 bytes (pytest's tmp_path is longer), in /tmp otherwise."""
    path = Path(tempfile.mkdtemp(prefix="sig-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def group(
    data_dir: Path, tmp: Path, *, pipe: bool = False, **env: str
) -> AsyncIterator[Group]:
    """A Group (not started) on `data_dir`, with TMPDIR `tmp`, killed whole at the end."""
    server = Group(data_dir, pipe=pipe, env={**QUIET, "TMPDIR": str(tmp), **env}, stop_timeout=40)
    try:
        yield server
    finally:
        await server.aclose()


async def gone(server: Group, *, within: float, what: str) -> None:
    """Wait until no process of `server` is alive."""

    async def none_left() -> bool:
        return not server.left()

    await wait_until(none_left, within=within, what=what, interval=0.1)


def stored_unanswered(ledger: Ledger) -> list[tuple[str, str]]:
    """Ids stored by a request whose answer was lost (its resend came back duplicate)."""
    return [
        identity
        for identity, attempts in ledger.by_identity().items()
        if [a.answer for a in attempts][-2:] == ["no answer", "duplicate"]
    ]


async def refused(url: str) -> bool:
    async with httpx.AsyncClient(timeout=3) as http:
        try:
            await http.get(f"{url}/healthz")
        except httpx.ConnectError:
            return True
        except httpx.TransportError:
            return False
    return False


# -- 1. a signal while the supervisor waits for PostgreSQL ---------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_while_the_supervisor_waits_for_postgresql_stops_it_cleanly(
    tmp_path: Path, short_tmp: Path, signum: signal.Signals
) -> None:
    """`serve --workers 2` whose PostgreSQL accepts the connection and never
    answers (a database starting up, a stalled failover): the supervisor
    opens the store itself before any worker runs. Kubernetes deleting the
    pod sends SIGTERM then; Ctrl-C sends SIGINT. The single-process server
    stops at once, exits 0 and logs "stopped before start"; the group must
    too: exit 0, a line that says it stopped, no traceback, nothing left."""
    with trio.socket.socket() as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        async with group(
            tmp_path / "data",
            short_tmp,
            INGESTOR_WORKERS="2",
            INGESTOR_STORE=f"postgresql://bob@127.0.0.1:{port}/billing",
            INGESTOR_STORE_BUSY_TIMEOUT="60",
        ) as server:
            await server.launch()
            with trio.fail_after(20):
                connection, _ = await listener.accept()  # the supervisor opens its store
            with connection:
                await trio.sleep(0.3)
                assert server.running, server.tail()
                os.kill(server.pid or 0, signum)
                # 20 s, against a busy timeout of 60: waiting it out would be a hang.
                code = await server.wait_exit(20)
            output = server.output_of_run()
            problems = []
            if code is None:
                problems.append(f"still running 20 s after {signum.name}")
                await server.aclose()
            elif code != 0:
                raw = " (killed by the raw signal)" if code < 0 else ""
                problems.append(f"exit code {code}{raw}")
            if not re.search(r"INFO ingestor\.\w+ stop", output):
                problems.append("no line says it stopped")
            if "Traceback" in output:
                problems.append("a traceback: " + output.strip().splitlines()[-1])
            await gone(server, within=10, what="every process of the group gone")
    assert problems == [], (
        f"{signum.name} to the supervisor waiting for PostgreSQL: {problems};"
        f" output:\n{output[-1500:]}"
    )


# -- 2. the whole group paused and resumed -------------------------------------------------


async def test_a_group_paused_whole_and_resumed_keeps_its_workers_and_answers_everything(
    tmp_path: Path,
    short_tmp: Path,
) -> None:
    """`docker pause` / `unpause`, `kill -STOP -PGID` then `-CONT`, a VM frozen
    for a snapshot: the supervisor and both workers stop together for longer
    than `worker_timeout`, then go on together. No event loop was stuck: every
    worker runs again at once. The supervisor must not SIGKILL a worker for a
    pause it slept through itself (README: a worker "whose event loop has not
    run for `worker_timeout` is killed"); that kill cuts off the requests the
    worker holds, whose pulses may be stored and never answered.
    Requests sent during the pause wait in the backlog and are answered after
    it, and the audit holds."""
    worker_timeout = 3.0
    async with group(
        tmp_path / "data",
        short_tmp,
        INGESTOR_WORKERS="2",
        INGESTOR_WORKER_TIMEOUT=str(worker_timeout),
        INGESTOR_GRACEFUL_TIMEOUT="10",
    ) as server:
        await server.start()
        await server.all_serving(2)
        assert server.pid is not None
        ledger = Ledger()
        load = Load(server, ledger, PulseFactory(prefix="pause"), clients=4, seed=2, timeout=60.0)
        killed: list[str] = []

        async def all_stopped() -> bool:
            pids = server.left()
            return bool(pids) and all(_stopped(pid) for pid in pids)

        with trio.fail_after(80):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load.run)
                await load.flowing(200, what="before the pause")
                paused = trio.current_time()
                for _ in range(2):
                    _signal_group(server.pid, signal.SIGSTOP)
                    try:
                        await wait_until(
                            all_stopped, within=10, what="the group stopped", interval=0.01
                        )
                        await trio.sleep(worker_timeout + 1.5)
                    finally:
                        _signal_group(server.pid, signal.SIGCONT)
                    await load.flowing(100, within=40, what="after the pause")
                    await trio.sleep(1.0)  # the supervisor's first looks after the thaw
                    killed = [
                        line
                        for line in server.output_of_run().splitlines()
                        if "worker stopped answering" in line or "worker died" in line
                    ]
                    if killed:
                        break
                load.stop()
            cut_off = [e for e in load.exchanges if e.status is None and e.ended > paused]
            counts = await audit(server, ledger)
        code = await server.terminate()
    problems = []
    if killed:
        problems.append(f"workers killed after a pause the whole group shared: {killed}")
    if cut_off:
        problems.append(
            f"{len(cut_off)} requests lost their answer: {sorted({e.error for e in cut_off})}"
        )
    if code != 0:
        problems.append(f"SIGTERM afterwards: exit code {code}")
    print(f"\npaused group: {counts.line('pause')}; answers {dict(load.statuses)}")
    assert problems == [], problems


# -- 3. the supervisor SIGKILLed before its workers asked to die with it -------------------

REAPER = r"""
import ctypes, os, sys
ctypes.CDLL(None, use_errno=True).prctl(int(sys.argv[1]), 1, 0, 0, 0)
child = os.fork()
if child == 0:
    os.execv(sys.argv[2], sys.argv[2:])
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


async def test_a_supervisor_killed_as_its_workers_start_leaves_no_orphan_under_a_subreaper(
    tmp_path: Path,
    short_tmp: Path,
) -> None:
    """The supervisor is SIGKILLed (the OOM killer, `kill -9`, a crashed node
    agent) just after it started its workers, before they asked Linux to
    SIGTERM them when it dies (`PR_SET_PDEATHSIG`). The workers check for that
    by `os.getppid() == 1`; but where the supervisor runs under a subreaper
    (systemd's user manager, `tini -s`, a container runtime's shim, any
    service manager that adopts orphans) the orphans' parent is that
    subreaper, not PID 1. Orphaned workers then serve the port and write the
    store for ever, unsupervised: no heartbeat check, no restart, and a new
    group started beside them shares the port with them. They must exit."""
    port = free_port()
    data_dir = tmp_path / "data"
    log = tmp_path / "reaper.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTOR_")}
    env.update(QUIET, INGESTOR_WORKERS="2", TMPDIR=str(short_tmp))
    command = [PYTHON, "-m", "ingestor", "serve", "--bind", f"127.0.0.1:{port}"]
    command += ["--data-dir", str(data_dir)]
    with log.open("wb") as out:
        reaper = await trio.lowlevel.open_process(
            [PYTHON, "-c", REAPER, str(PR_SET_CHILD_SUBREAPER), *command],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        async def supervisor_started() -> bool:
            return "ingestor.workers start bind=" in log.read_text(errors="replace")

        await wait_until(
            supervisor_started, within=30, what="the supervisor started", interval=0.002
        )
        supervisor = [pid for pid in members(reaper.pid) if pid != reaper.pid]
        supervisor = [pid for pid in supervisor if (_stat(pid) or ("", 0, 0))[1] == reaper.pid]
        assert len(supervisor) == 1, supervisor
        os.kill(supervisor[0], signal.SIGKILL)
        killed_at = trio.current_time()

        async def no_orphan() -> bool:
            left = [pid for pid in members(reaper.pid) if pid != reaper.pid]
            return not left and await refused(url)

        with contextlib.suppress(AssertionError):
            await wait_until(no_orphan, within=10, what="no orphan", interval=0.2)
        orphans = members(reaper.pid, marker=WORKER_MARK)
        serving = not await refused(url)
        waited = trio.current_time() - killed_at
        taken = None
        if serving:  # what an orphan does with a pulse
            async with httpx.AsyncClient(timeout=10) as http:
                pulse = {"tenant_id": "o", "product_sku": "s", "use_unit": "u", "used_amount": 1}
                taken = (await http.post(f"{url}/pulses", json=pulse)).status_code
    finally:
        with trio.CancelScope(shield=True):
            _signal_group(reaper.pid, signal.SIGKILL)
            await reaper.wait()
    output = log.read_text(errors="replace")
    assert (orphans, serving) == ([], False), (
        f"{len(orphans)} orphaned workers still ran {waited:.0f} s after their supervisor was"
        f" SIGKILLed; the port {'still answers, a pulse' if serving else 'is closed'}"
        f" {'was answered ' + str(taken) if serving else ''}; output:\n{output[-2000:]}"
    )


# -- 4. the supervisor SIGKILLed under load ------------------------------------------------


async def test_a_supervisor_killed_under_load_lets_its_workers_drain_and_the_next_start_is_clean(
    tmp_path: Path,
    short_tmp: Path,
) -> None:
    """SIGKILL to the supervisor alone (its workers serving eight clients): each
    worker gets SIGTERM from the kernel and drains as a single process would,
    answering what it had begun. None outlives it, nothing is left in TMPDIR,
    and the group restarts at once on the same port and data dir, holding
    every acknowledged pulse once; the clients' resends settle the rest and
    every batch is delivered."""
    async with group(
        tmp_path / "data", short_tmp, INGESTOR_WORKERS="2", INGESTOR_GRACEFUL_TIMEOUT="10"
    ) as server:
        await server.start()
        await server.all_serving(2)
        ledger = Ledger()
        load = Load(server, ledger, PulseFactory(prefix="orphan"), clients=8, seed=4)
        with trio.fail_after(80):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load.run)
                await load.flowing(500, what="before the kill")
                await server.kill()
                load.down()
                await gone(server, within=20, what="every worker gone after the supervisor")
                output = server.output_of_run()
                leftovers = sorted(os.listdir(short_tmp))
                await server.start()
                await server.all_serving(2)
                await check_bounds(server, ledger)
                load.up.set()
                await load.flowing(300, what="after the restart")
                load.stop()
            counts = await audit(server, ledger)
        code = await server.terminate()
    assert output.count(" ingestor.service stop ") == 2, output[-2000:]
    assert "Traceback" not in server.output, server.output[-3000:]
    assert leftovers == [], f"left in TMPDIR: {leftovers}"
    assert stored_unanswered(ledger) == [], "a draining worker stored pulses it never answered"
    assert load.problems == [], load.problems[:5]
    assert code == 0, server.tail()
    print(f"\nsupervisor killed: {counts.line('orphans')}")


# -- 5. SIGTERM then SIGINT to every process of the group ----------------------------------


async def test_sigterm_then_sigint_to_every_process_of_the_group_drains_and_exits_0(
    tmp_path: Path,
    short_tmp: Path,
) -> None:
    """systemd's default `KillMode=control-group` sends SIGTERM to every
    process of the service at once, not to the supervisor alone; an operator
    who sees it take a moment presses Ctrl-C too. The supervisor forwards its
    SIGTERM to workers that already have theirs, and then SIGINT reaches
    them all mid-drain. The group must drain as for one SIGTERM: every
    request it had begun on answered, exit 0 with both workers' stops
    logged, no traceback, no process left; the next start clean."""
    async with group(
        tmp_path / "data", short_tmp, INGESTOR_WORKERS="2", INGESTOR_GRACEFUL_TIMEOUT="10"
    ) as server:
        await server.start()
        await server.all_serving(2)
        assert server.pid is not None
        ledger = Ledger()
        load = Load(server, ledger, PulseFactory(prefix="cgroup"), clients=8, seed=5)
        with trio.fail_after(80):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load.run)
                await load.flowing(500, what="before the signals")
                pgid = server.pid
                signalled = trio.current_time()
                _signal_group(pgid, signal.SIGTERM)
                # At once, so that it lands mid-drain (test 7 has one at the end).
                _signal_group(pgid, signal.SIGINT)
                load.down()
                code = await server.wait_exit(30)
                await gone(server, within=10, what="every process of the group gone")
                output = server.output_of_run()
                await server.start()
                await server.all_serving(2)
                await check_bounds(server, ledger)
                load.up.set()
                await load.flowing(300, what="after the restart")
                load.stop()
            counts = await audit(server, ledger)
        final = await server.terminate()
    cut_off = [
        e for e in load.exchanges if e.started < signalled - 0.5 < e.ended and e.status is None
    ]
    problems = []
    if code != 0:
        problems.append(f"exit code {code}")
    if "exit_codes='[0, 0]'" not in output:
        problems.append("the supervisor did not log both workers' clean exits")
    if output.count(" ingestor.service stop ") != 2:
        problems.append("not both workers logged their stop")
    if "Traceback" in output:
        problems.append("a traceback")
    if cut_off:
        problems.append(f"{len(cut_off)} requests begun before the signals got no answer")
    if stored_unanswered(ledger):
        problems.append(f"stored but never answered: {stored_unanswered(ledger)[:5]}")
    assert problems == [], f"{problems}; output:\n{output[-2500:]}"
    assert load.problems == [], load.problems[:5]
    assert final == 0, server.tail()
    print(f"\ngroup SIGTERM+SIGINT: {counts.line('cgroup')}")


# -- 6. a worker SIGKILLed as the group stops ----------------------------------------------


async def test_a_worker_killed_as_the_group_stops_is_reported_and_loses_nothing_acknowledged(
    tmp_path: Path, short_tmp: Path
) -> None:
    """SIGTERM to the supervisor under load and, at once, SIGKILL to one worker
    (the OOM killer, or a kill -9 meant for another process). That worker's
    requests in flight lose their answers: the stop was not clean, and the
    exit status and the log must say so (non-zero, the worker's -9). Nothing
    acknowledged is lost, the other worker drains, nothing is left running,
    and the next start is clean."""
    async with group(
        tmp_path / "data", short_tmp, INGESTOR_WORKERS="2", INGESTOR_GRACEFUL_TIMEOUT="10"
    ) as server:
        await server.start()
        await server.all_serving(2)
        ledger = Ledger()
        load = Load(server, ledger, PulseFactory(prefix="oom"), clients=8, seed=55)
        with trio.fail_after(80):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load.run)
                await load.flowing(500, what="before the signals")
                # The workers now: on a loaded machine one may have been replaced
                # (killed as stuck) while the load began.
                workers = await server.all_serving(2)
                # A worker drains in a few milliseconds: stopped first, it is
                # certain to be alive, its requests unanswered, when the kill
                # comes, however long this process waits between the signals.
                os.kill(workers[0], signal.SIGSTOP)
                os.kill(server.pid or 0, signal.SIGTERM)
                os.kill(workers[0], signal.SIGKILL)
                load.down()
                code = await server.wait_exit(30)
                await gone(server, within=10, what="every process of the group gone")
                output = server.output_of_run()
                await server.start()
                await server.all_serving(2)
                await check_bounds(server, ledger)
                load.up.set()
                await load.flowing(300, what="after the restart")
                load.stop()
            counts = await audit(server, ledger)
        final = await server.terminate()
    assert code == 1, f"exit code {code}; output:\n{output[-1500:]}"
    assert re.search(r"ingestor\.workers stop .*-9", output), output[-1500:]
    # The other worker drained; the killed one may have logged its stop first.
    assert output.count(" ingestor.service stop ") >= 1, output[-1500:]
    assert "Traceback" not in server.output, server.output[-3000:]
    assert load.problems == [], load.problems[:5]
    assert final == 0, server.tail()
    print(f"\nworker killed in the stop: {counts.line('oom')}")


# -- 7. a second signal as the stop ends ---------------------------------------------------


@pytest.mark.parametrize(
    ("workers", "second"),
    [(1, signal.SIGTERM), (1, signal.SIGINT), (2, signal.SIGINT)],
    ids=["1-SIGTERM-SIGTERM", "1-SIGTERM-SIGINT", "2-SIGTERM-SIGINT"],
)
async def test_a_second_signal_as_the_stop_ends_does_not_turn_a_clean_stop_into_a_kill(
    tmp_path: Path, short_tmp: Path, workers: int, second: signal.Signals
) -> None:
    """SIGTERM, and a second signal just as the process has logged its clean stop
    (an operator pressing Ctrl-C again, a script's `kill` repeated, a runtime
    whose first signal seemed ignored). The drain is over and the store
    closed: the process says so, and must then exit 0, not die of the second
    signal (exit -15 / -2, 143 / 130 to a shell or Kubernetes: a failed stop
    to whoever reads the status)."""
    async with group(tmp_path / "data", short_tmp, INGESTOR_WORKERS=str(workers)) as server:
        await server.start()
        if workers > 1:
            await server.all_serving(workers)
        stopped = " ingestor.workers stop " if workers > 1 else " ingestor.service stop "

        async def said_stop() -> bool:
            return stopped in server.output_of_run()

        os.kill(server.pid or 0, signal.SIGTERM)
        await wait_until(said_stop, within=30, what="the stop logged", interval=0.001)
        os.kill(server.pid or 0, second)
        code = await server.wait_exit(30)
        output = server.output_of_run()
        await gone(server, within=10, what="every process gone")
    assert code == 0, (
        f"logged a clean stop, then exit code {code} ({second.name} as it exited);"
        f" output:\n{output[-800:]}"
    )


# -- 8. SIGTERM while the sink holds a batch -----------------------------------------------


async def test_sigterm_while_the_billing_system_holds_a_batch_stops_and_the_next_start_sends_it(
    tmp_path: Path,
    short_tmp: Path,
) -> None:
    """The billing system has taken a batch's POST and not answered (slow, or
    hung). SIGTERM must not wait for it (sink timeout 30 s) and must not leave
    the batch leased to the stopped process (`2 x sink_timeout + 5` = 65 s):
    the next start sends it again at once, with the same bytes, and records it
    delivered once the billing system confirms."""
    target = SinkTarget(SECRET)
    target.set_mode("hang")
    day = day_before(1)
    async with trio.open_nursery() as background:
        await background.start(target.run)
        async with group(
            tmp_path / "data",
            short_tmp,
            INGESTOR_SINK=target.url,
            INGESTOR_SINK_SECRET=SECRET,
            INGESTOR_SINK_TIMEOUT="30",
        ) as server:
            await server.start()
            ledger = Ledger()
            async with httpx.AsyncClient(timeout=30) as http:
                rng = random.Random(6)
                pulses = [random_pulse(rng, f"hold-{n}", day, ["h1", "h2"]) for n in range(50)]
                await post_until_stored(http, server.url, ledger, pulses)
                made = await commit_days(http, server.url, [day])
                assert made, "nothing committed"

                async def held() -> bool:
                    return target.in_flight > 0

                await wait_until(held, within=20, what="the billing system holds a batch")
                first = {d.batch_id: d.body for d in target.received}
                stopping = trio.current_time()
                code = await server.terminate(within=25)
                took = trio.current_time() - stopping
                output = server.output_of_run()
                target.set_mode("ok")
                await server.start()
                restarted = trio.current_time()
                # The lease of the batch held at the stop would end 65 s after it was taken.
                rows: list[dict[str, Any]] = []
                with contextlib.suppress(AssertionError):
                    rows = await wait_all_delivered(http, server.url, within=30)
                delivered_after = trio.current_time() - restarted
                assert rows, (
                    "a batch held by the billing system at the stop was still not delivered"
                    f" {delivered_after:.0f} s after the restart: it stayed leased to the"
                    " stopped process"
                )
                await check_pulses_stored_once(http, server, ledger)
            whole = server.output
        background.cancel_scope.cancel()
    assert code == 0, output[-2000:]
    assert "ingestor.service stop" in output, output[-2000:]
    assert "Traceback" not in whole, whole[-3000:]
    changed = {bid for bid, bodies in target.bodies().items() if len(bodies) > 1}
    assert changed == set(), f"batches sent again with other bytes: {changed}"
    assert set(first) <= set(target.confirmed()), "a batch held at the stop was never confirmed"
    assert {row["batch_id"] for row in rows} == set(target.confirmed())
    print(f"\nstop took {took:.1f} s; redelivered {delivered_after:.1f} s after the restart")


# -- 9. SIGTERM while a big body is half uploaded ------------------------------------------


async def test_sigterm_mid_upload_answers_the_request_truthfully_and_exits_0(
    tmp_path: Path,
    short_tmp: Path,
) -> None:
    """A client is halfway through uploading 6,000 pulses when SIGTERM comes.
    The request is in flight: the server must wait for it (not close the
    connection under it), answer it, 202 with every pulse stored or 503 with
    Retry-After and none stored, then exit 0. After a restart, what is stored
    is what the answer said; the resend settles the rest."""
    day = day_before(2)
    rng = random.Random(7)
    pulses = [random_pulse(rng, f"up-{n}", day, ["u1", "u2", "u3"]) for n in range(6000)]
    body = msgspec.json.encode(pulses)
    half = len(body) // 2
    async with group(tmp_path / "data", short_tmp) as server:
        await server.start()
        ledger = Ledger()
        attempts = ledger.sent(pulses, "array")
        stream = await trio.open_tcp_stream(server.host, server.port)
        async with stream:
            head = (
                f"POST /pulses HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            await stream.send_all(head + body[:half])
            await trio.sleep(0.5)
            os.kill(server.pid or 0, signal.SIGTERM)
            await trio.sleep(1.5)
            alive_mid_upload = server.running
            try:
                await stream.send_all(body[half:])
                status, headers, answer = await _read_answer(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, AssertionError) as exc:
                status, headers, answer = 0, {}, repr(exc).encode()
        code = await server.wait_exit(30)
        output = server.output_of_run()
        if status:
            ledger.answered(attempts, httpx.Response(status, headers=headers, content=answer))
        else:
            ledger.answered(attempts, None, answer.decode())
        await server.start()
        async with httpx.AsyncClient(timeout=30) as http:
            await check_pulses_stored_once(http, server, ledger)
            await post_until_stored(http, server.url, ledger, pulses)
            await check_pulses_stored_once(http, server, ledger)
            rows = await collect_pages(http, f"{server.url}/aggregates", "aggregates", limit=1000)
        assert totals_of(rows) == ledger.expected_totals()
        await server.terminate()
    assert alive_mid_upload, f"the server exited while a request was in flight:\n{output[-1500:]}"
    assert status in (202, 503), f"the request in flight got {status} {answer[:300]!r}"
    if status == 503:
        assert headers.get("retry-after", "").isdigit(), headers
    assert code == 0, f"exit code {code}; output:\n{output[-1500:]}"
    assert "ingestor.service stop" in output, output[-1500:]
    assert "Traceback" not in output, output[-1500:]
    print(f"\nmid-upload SIGTERM: answered {status}")


async def _read_answer(stream: trio.SocketStream) -> tuple[int, dict[str, str], bytes]:
    data = b""
    with trio.fail_after(30):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            assert chunk, f"connection closed after {data!r}"
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        while len(rest) < int(headers.get("content-length", 0)):
            chunk = await stream.receive_some(65536)
            assert chunk, "connection closed mid-answer"
            rest += chunk
    return int(status_line.split()[1]), headers, rest


# -- 10. SIGTERM while a commit runs -------------------------------------------------------


async def test_sigterm_mid_commit_answers_the_commit_and_its_batches_are_whole(
    tmp_path: Path,
    short_tmp: Path,
) -> None:
    """POST /aggregates/commit of a day of 30,000 buckets, and SIGTERM while it
    runs (a rolling restart at the end of the billing day). The commit is a
    request in flight: it is answered, and the batches it reports are exactly
    the outbox's after a restart, every bucket in exactly one, each delivered
    with the bytes the outbox holds; the exit is 0."""
    day = day_before(1)
    pulses = [
        {
            "tenant_id": f"c{n % 300}",
            "product_sku": f"s{n // 300}",
            "use_unit": "call",
            "used_amount": f"{n % 97}.{n % 13}",
            "timestamp": f"{day}T12:00:00+00:00",
            "id": f"commit-{n}",
        }
        for n in range(30_000)
    ]
    async with group(tmp_path / "data", short_tmp, INGESTOR_DURABILITY="os") as server:
        await server.start()
        ledger = Ledger()
        async with httpx.AsyncClient(timeout=60) as http:
            for start in range(0, len(pulses), 5000):
                await post_until_stored(http, server.url, ledger, pulses[start : start + 5000])
            answer: list[httpx.Response | str] = []

            async def commit() -> None:
                try:
                    answer.append(
                        await http.post(f"{server.url}/aggregates/commit", json={"date": day})
                    )
                except httpx.TransportError as exc:
                    answer.append(repr(exc))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(commit)
                await trio.sleep(0.15)
                os.kill(server.pid or 0, signal.SIGTERM)
            code = await server.wait_exit(30)
            output = server.output_of_run()
            await server.start()
            outbox = await collect_pages(http, f"{server.url}/batches", "batches", limit=1000)
            views = [
                (await http.get(f"{server.url}/batches/{row['batch_id']}")).json() for row in outbox
            ]
        (response,) = answer
        assert isinstance(response, httpx.Response), f"the commit in flight: {response}"
        assert response.status_code in (200, 503), response.text[:300]
        reported = {b["batch_id"] for b in response.json().get("batches", [])}
        if response.status_code == 200:
            assert reported == {row["batch_id"] for row in outbox}, (
                f"the commit reported {len(reported)} batches, the outbox holds {len(outbox)}"
            )
            assert outbox_problems(views, ledger.expected_totals()) == []
        else:
            assert outbox == [], "a commit answered 503 left batches"
        counts = await audit(server, ledger)
        await server.terminate()
    assert code == 0, f"exit code {code}; output:\n{output[-1500:]}"
    assert "ingestor.service stop" in output, output[-1500:]
    assert "Traceback" not in output, output[-1500:]
    print(f"\nmid-commit SIGTERM: commit {response.status_code}; {counts.line('commit')}")


# -- 11. the log pipe's reader goes away ---------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_closed_log_pipe_neither_stops_serving_nor_spoils_the_exit(
    tmp_path: Path, short_tmp: Path, workers: int
) -> None:
    """stdout and stderr go to a pipe (`serve | logger`, a log shipper) whose
    reader exits. Every later log line meets EPIPE (SIGPIPE, were Python not
    ignoring it). The service must go on taking pulses, committing and
    delivering, and SIGTERM must still end it cleanly: exit 0 (an exit code
    of 120 for an unflushable stderr would read as a failure to systemd and
    Kubernetes alike). After a restart, everything acknowledged is there once."""
    async with group(
        tmp_path / "data", short_tmp, pipe=True, INGESTOR_WORKERS=str(workers)
    ) as server:
        await server.start()
        await server.read_pipe(r"ingestor\.service start ", workers)
        assert server.pipe is not None
        await server.pipe.aclose()
        server.pipe = None
        day = day_before(1)
        rng = random.Random(9)
        ledger = Ledger()
        for round_ in range(6):  # fresh connections: both workers, if two
            async with httpx.AsyncClient(timeout=30) as http:
                batch = [random_pulse(rng, f"pipe-{round_}-{n}", day, ["p1"]) for n in range(20)]
                await post_until_stored(http, server.url, ledger, batch)
        async with httpx.AsyncClient(timeout=30) as http:
            await commit_days(http, server.url, [day])
            await wait_all_delivered(http, server.url, within=30)
        assert server.running
        code = await server.terminate(within=30)
        await server.start()
        counts = await audit(server, ledger)
        await server.terminate()
    assert code == 0, f"exit code {code} after the log pipe's reader went away"
    print(f"\nclosed log pipe, {workers} worker(s): {counts.line('pipe')}")


# -- 12. signals with no handler -----------------------------------------------------------


async def test_signals_without_a_handler_lose_nothing_acknowledged_and_restart_clean(
    tmp_path: Path,
    short_tmp: Path,
) -> None:
    """SIGHUP (a terminal closed, or `systemctl reload` copied from another
    unit), SIGQUIT, SIGUSR1 and SIGUSR2 (a log rotation's habit) under load:
    the service installs no handler for them, so each ends the process as a
    crash would. Then, as after a crash: nothing acknowledged is lost, nothing
    counted twice, and the next start on the same port and data dir is clean."""
    async with group(tmp_path / "data", short_tmp) as server:
        await server.start()
        ledger = Ledger()
        load = Load(server, ledger, PulseFactory(prefix="unhandled"), clients=6, seed=10)
        codes: dict[str, int | None] = {}
        with trio.fail_after(80):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load.run)
                for signum in (signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
                    await load.flowing(200, what=f"before {signum.name}")
                    os.kill(server.pid or 0, signum)
                    load.down()
                    codes[signum.name] = await server.wait_exit(30)
                    if codes[signum.name] is None:
                        await server.terminate()
                    await server.start()
                    await check_bounds(server, ledger)
                    load.up.set()
                await load.flowing(200, what="at the end")
                load.stop()
            counts = await audit(server, ledger)
        final = await server.terminate()
    assert "Traceback" not in server.output, server.output[-3000:]
    assert None not in codes.values(), f"still running 30 s after the signal: {codes}"
    assert final == 0, server.tail()
    print(f"\nunhandled signals {codes}: {counts.line('unhandled')}")
