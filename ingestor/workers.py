"""Several worker processes on one port and one store (`--workers N`).

The supervisor binds the listening sockets and opens (creating if needed)
the store once, then starts N worker processes that each run the whole
service. The store's transactions and locks keep them correct together,
exactly as with several machines on one PostgreSQL.

Each worker listens on a socket of its own, all bound to the same TCP
address with SO_REUSEPORT, and the kernel spreads new connections across
them by a hash of each connection's addresses. On one shared socket,
whichever worker woke first accepted the whole backlog: a client opening
its keep-alive connections at once had every one of them served by one
worker while the other idled. The supervisor keeps each worker's socket, so
connections the kernel gives a worker that is restarting wait in its
backlog; none is refused. As with any SO_REUSEPORT server, a second
`--workers` instance started by the same user on the same address joins
the group instead of failing with "address in use"; a single-worker
instance still fails.

SIGTERM or SIGINT is passed on to every worker, which drains as a single
process would; a worker that dies on its own is restarted, after a pause
that doubles, up to 30 s, while it keeps dying soon after its start.

A worker that stops without dying is killed and restarted as if it had
died: stopped (SIGSTOP, a debugger), stuck in a loop, or blocked in a
call that never returns. Its event loop sets a heartbeat in memory it
shares with the supervisor every `_BEAT` s; one older than
`worker_timeout` gets the worker SIGKILLed. On SQLite a stuck worker may
hold the store's writers' lock, and then every other worker's writes
would wait on it for ever, all answered 503; the kernel releases its locks
when it dies. The
workers answer each other on Unix sockets in a directory of the
supervisor's (`WorkerGroup`): a scrape of /metrics, taken by any worker,
shows every worker's series.

A single process (`workers = 1`, the default) has no supervisor: a thread
of its own watches the same heartbeat (`run_alone`), and a process whose
event loop has not run for `worker_timeout` writes every thread's stack
and exits with status 70, for its service manager to start it again
(compose: `restart: unless-stopped`; systemd: `Restart=on-failure`).
Unwatched, such a process answered nothing, /healthz included, until
somebody killed it by hand.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import logging
import multiprocessing
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any

import trio
from hypercorn.config import Sockets

from .config import Settings
from .logs import setup_logging
from .runtime import WorkerGroup
from .store import open_store

__all__ = ["restart_pause", "run_alone", "run_workers"]

log = logging.getLogger("ingestor.workers")
_RESTART_PAUSE = 1.0  # before restarting a worker that died
_RESTART_PAUSE_MAX = 30.0  # ... doubled each time it dies again soon after its start
_STEADY = 60.0  # a worker that lived this long died by accident: back to the first pause
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_BEAT = 1.0  # how often a worker's event loop shows it runs (see the module docstring)
# A worker's start, before its event loop beats (a Python process's imports,
# slower on a loaded machine), is given this long on top of `worker_timeout`.
_STARTING = 10.0
_SIBLING_DIRECTORY = re.compile(r"ingestor-([0-9]+)-[a-z0-9_]+")  # `_sibling_directory`'s


def _die_with_parent(supervisor: int) -> None:
    """Ask Linux to SIGTERM this worker if the supervisor dies, even by kill -9.

    The worker then drains like any other; without this it would keep
    serving, orphaned, holding the port. Elsewhere this does nothing.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    # The supervisor died before the request took effect. Its orphans go to
    # the nearest subreaper (systemd's user manager, tini -s), not always to
    # pid 1: two workers served on, unsupervised, under one.
    if os.getppid() != supervisor:
        os.kill(os.getpid(), signal.SIGTERM)


async def _beat(heart: ctypes.c_double) -> None:
    """Show the supervisor, every `_BEAT` s, that this event loop runs."""
    while True:
        heart.value = time.monotonic()
        await trio.sleep(_BEAT)


_STOPPED = 2.0  # a watchdog sleep of `_BEAT` s taking this much more: the process was stopped
_STUCK_EXIT = 70  # EX_SOFTWARE: the status of a single process whose event loop stopped running


def run_alone(settings: Settings) -> None:
    """`serve` in this process alone, watched (see the module docstring)."""
    from .service import run_service, serve

    heart = ctypes.c_double(time.monotonic() + _STARTING)
    done = threading.Event()
    watchdog = threading.Thread(
        target=_watch_alone,
        args=(heart, settings.worker_timeout, done),
        name="ingestor-watchdog",
        daemon=True,
    )

    async def main() -> None:
        trio.lowlevel.spawn_system_task(_beat, heart)
        await serve(settings)

    watchdog.start()
    try:
        run_service(main)
    finally:
        done.set()  # the loop has ended: nothing beats any more, and nothing need


def _watch_alone(
    heart: ctypes.c_double,
    timeout: float,
    done: threading.Event,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Exit the process once its event loop has not beaten for `timeout` s.

    A sleep of this thread's that took `_STOPPED` s longer than asked says
    the whole process was stopped meanwhile (SIGSTOP, a paused container),
    or starved: the loop is given a full timeout again from then, as the
    supervisor gives a group it sees continued (SIGCONT)."""
    grace = 0.0
    last = clock()
    while not done.wait(_BEAT):
        now = clock()
        if now - last > _BEAT + _STOPPED:
            grace = now
        last = now
        silent = now - max(heart.value, grace)
        if silent > timeout and not done.is_set():
            log.critical(
                "the event loop has not run, exiting to be started again",
                extra={"fields": {"silent_s": round(silent, 1), "exit_code": _STUCK_EXIT}},
            )
            faulthandler.dump_traceback(all_threads=True)
            os._exit(_STUCK_EXIT)


def _worker(
    settings: Settings,
    sockets: Sockets,
    index: int,
    directory: str,
    heart: ctypes.c_double,
    *,
    supervisor: int,
) -> None:
    from .service import run_service, serve

    _die_with_parent(supervisor)
    setup_logging(settings.log_level, settings.log_format)
    log.info("worker start", extra={"fields": {"worker": index}})
    group = WorkerGroup(index, settings.workers, directory)

    async def main() -> None:
        # A system task: it beats while the store opens and while the service
        # drains, and ends with the main task, whose errors stay its own.
        trio.lowlevel.spawn_system_task(_beat, heart)
        await serve(settings, sockets=sockets, worker=(index, settings.workers), group=group)

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C before serve took signals
        run_service(main)


def _worker_sockets(settings: Settings) -> list[Sockets]:
    """The listening sockets of each worker (see the module docstring)."""
    from .service import hypercorn_config

    config = hypercorn_config(settings)  # plain HTTP: the service does not terminate TLS
    config.workers = settings.workers  # hypercorn sets SO_REUSEPORT before binding
    first = config.create_sockets()
    # The others on the address the first got: for port 0, the kernel's choice.
    config.bind = [_address(sock) for sock in first.insecure_sockets]
    every = [first, *(config.create_sockets() for _ in range(settings.workers - 1))]
    # Listening before any worker runs: a connection made while a worker starts
    # waits for it, instead of going to one that started sooner and staying there.
    for sockets in every:
        for sock in sockets.insecure_sockets:
            sock.listen(config.backlog)
    return every


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


def _sibling_directory() -> str:
    """A new directory where the workers answer each other (their metrics),
    private to this user, named after this supervisor's pid; the directories
    of supervisors that died without removing theirs (SIGKILL, OOM) are
    removed first: each crash left one behind for ever.

    A Unix socket's path is at most 107 bytes: under a long TMPDIR, in /tmp.
    """
    parent = tempfile.gettempdir()
    parent = parent if len(parent) <= 64 else "/tmp"
    with contextlib.suppress(OSError), os.scandir(parent) as entries:
        for entry in entries:
            match = _SIBLING_DIRECTORY.fullmatch(entry.name)
            if (
                match
                and entry.is_dir(follow_symlinks=False)
                and entry.stat(follow_symlinks=False).st_uid == os.geteuid()
                and not _alive(int(match[1]))
            ):
                shutil.rmtree(entry.path, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"ingestor-{os.getpid()}-", dir=parent)


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (maybe another one, reusing the pid: its
    directory is then kept, which is harmless)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def restart_pause(previous: float, lived: float) -> float:
    """Seconds to wait before restarting a worker that died after `lived` seconds,
    `previous` being the pause before its start (0 for the first).

    A worker that dies again soon after its start (a store it cannot open, a
    bad release) is restarted less and less often, not once a second for
    ever, each start costing a Python process's imports.
    """
    if lived >= _STEADY:
        return _RESTART_PAUSE
    return min(max(2 * previous, _RESTART_PAUSE), _RESTART_PAUSE_MAX)


def _made_store(settings: Settings, stopping: Callable[[], bool]) -> bool:
    """Open the store and close it (creating it here, never in racing workers),
    in a thread of its own: False if `stopping` says a signal came first
    (PostgreSQL may take its busy timeout to answer), the thread then left
    to end with the process."""
    failed: list[BaseException] = []

    def make() -> None:
        try:
            open_store(settings).close()
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=make, name="ingestor-open-store", daemon=True)
    thread.start()
    while thread.is_alive():
        if stopping():
            return False
        thread.join(0.05)
    if failed:
        raise failed[0]
    return True


def run_workers(settings: Settings) -> int:
    """Run `settings.workers` worker processes until SIGTERM/SIGINT; the exit code."""
    stopping = False
    processes: list[BaseProcess] = []
    resumed = 0.0  # when the supervisor was last continued after a stop (SIGCONT)

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for process in processes:
            if process.pid is not None and process.is_alive():
                process.terminate()  # SIGTERM: the worker drains

    def continued(signum: int, frame: Any) -> None:
        nonlocal resumed
        resumed = time.monotonic()

    # Taken from the start, as a single process takes them: a signal while the
    # store opens stopped the supervisor as the signal's death, unlogged.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGCONT, continued)
    if not _made_store(settings, lambda: stopping):
        log.info("stopped before start", extra={"fields": {"bind": settings.bind}})
        return 0
    every = _worker_sockets(settings)
    directory = _sibling_directory()
    context = multiprocessing.get_context("spawn")
    # Each worker's last heartbeat, on the monotonic clock every process shares.
    hearts = [context.Value("d", 0.0, lock=False) for _ in range(settings.workers)]

    def start(index: int) -> BaseProcess:
        hearts[index].value = time.monotonic() + _STARTING
        process = context.Process(
            target=_worker,
            args=(settings, every[index], index, directory, hearts[index]),
            kwargs={"supervisor": os.getpid()},
            name=f"ingestor-worker-{index}",
        )
        process.start()
        return process

    def kill_if_stuck(index: int) -> None:
        """Kill worker `index` if its heartbeat is older than `worker_timeout`.

        Counted from the supervisor's last SIGCONT at the latest: a group
        stopped whole (docker pause, kill -STOP -<group>) past the timeout
        and continued had a healthy worker killed, the supervisor looking
        before the worker's next beat, its requests cut off."""
        silent = time.monotonic() - max(hearts[index].value, resumed)
        if silent <= settings.worker_timeout:
            return
        log.error(
            "worker stopped answering, killing it",
            extra={"fields": {"worker": index, "silent_s": round(silent, 1)}},
        )
        processes[index].kill()
        hearts[index].value = time.monotonic()  # one kill: it is dead once the kernel is done

    for index in range(settings.workers):
        processes.append(start(index))
        if stopping:  # the signal came as it started, before `stop` could see it
            processes[index].terminate()
    born = [time.monotonic()] * settings.workers
    pauses = [0.0] * settings.workers
    restart_at: dict[int, float] = {}  # dead workers, while they wait out their pause
    log.info("start", extra={"fields": {"bind": settings.bind, "workers": settings.workers}})
    codes: dict[int, int] = {}
    while len(codes) < len(processes):
        for index, process in enumerate(processes):
            if index in codes:
                continue
            if index in restart_at:
                if stopping:  # the signal came in the pause: nothing to restart for
                    codes[index] = 0
                elif time.monotonic() < restart_at[index]:
                    time.sleep(0.05)
                    continue
                else:
                    processes[index] = start(index)
                    born[index] = time.monotonic()
                    if stopping:  # ... or while it started, before `stop` could see it
                        processes[index].terminate()
                del restart_at[index]
                continue
            process.join(timeout=0.2)
            if process.exitcode is None:
                kill_if_stuck(index)
                continue
            if stopping:
                # Killed by the SIGTERM we sent: it came before the worker
                # took signals, so before it served anything.
                code = process.exitcode
                codes[index] = 0 if code == -signal.SIGTERM else code
                continue
            pauses[index] = restart_pause(pauses[index], time.monotonic() - born[index])
            restart_at[index] = time.monotonic() + pauses[index]
            log.error(
                "worker died, restarting",
                extra={
                    "fields": {
                        "worker": index,
                        "exit_code": process.exitcode,
                        "restart_in_s": pauses[index],
                    }
                },
            )
    for sockets in every:
        for sock in sockets.insecure_sockets:
            sock.close()
    shutil.rmtree(directory, ignore_errors=True)
    exit_codes = sorted(codes.values())
    log.info("stop", extra={"fields": {"bind": settings.bind, "exit_codes": exit_codes}})
    return 0 if all(code == 0 for code in codes.values()) else 1
