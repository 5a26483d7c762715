"""What the multi-instance tests need besides `tests.support.server`.

    require_postgres  the maintenance URL of a reachable PostgreSQL, or skip
    require_nats      the URL of a reachable NATS server, or skip
                      (both fail instead of skipping when the CI variable is
                      set: a green CI run must have run these tests)
    fresh_database    a database of its own for one test, dropped afterwards
    fresh_stream      a JetStream stream name and subject prefix of its own,
                      the stream deleted afterwards; `messages()` reads it back
    Cluster           several `ServerProcess`es with the same settings, started
                      together, killed at the end, their output checked for
                      tracebacks
    metrics           GET /metrics as {name: value}
    child_pids        a process's children, from /proc (no psutil); `alive`
    connection_owner  which process holds the server side of a TCP connection
    unavailable       skip a test that lacks something of the machine, or fail
                      it when the CI variable is set
    libfaketimes      where Debian's libfaketime may be, to try in turn
    moved_clock       the settings of a child whose wall clock a file moves;
                      `write_clock` moves it

nats-py speaks asyncio only: inside a trio test each NATS call runs in
`asyncio.run` in a worker thread (`on_nats`). psycopg is only used by the
synchronous fixtures, before and after the trio part of a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import secrets
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
import nats
import nats.js.errors
import psycopg
import pytest
import trio
from nats.aio.client import Client
from nats.js.api import RawStreamMsg

from tests.support.server import ServerProcess

__all__ = [
    "ADMIN_URL",
    "NATS_URL",
    "Cluster",
    "Stream",
    "alive",
    "child_pids",
    "connection_owner",
    "fresh_database",
    "fresh_stream",
    "frozen",
    "metrics",
    "on_nats",
    "require_nats",
    "require_postgres",
    "unavailable",
]

T = TypeVar("T")

ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
NATS_URL = os.environ.get("TEST_NATS_URL", "nats://127.0.0.1:4222")
_HOW = "start them with `bash .ci/services`"


def unavailable(message: str) -> NoReturn:
    """Skip: the machine lacks what the test needs; fail under CI, whose green
    run must have run it."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def libfaketimes() -> list[str]:
    """The paths where a libfaketime may be (Debian's package `faketime`), first
    the usual ones; the caller tries each on a child process."""
    usual = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
        "/usr/local/lib/faketime/libfaketime.so.1",
    ]
    found = [path for path in usual if os.path.exists(path)]
    return found + sorted(set(glob.glob("/usr/lib/*/faketime/libfaketime.so.1")) - set(found))


def moved_clock(library: str, timestamp_file: Path) -> dict[str, str]:
    """Settings under which a child's wall clock is the true one plus the offset in
    `timestamp_file`, read again at every reading of the clock, while its
    monotonic clock (trio's timers and timeouts) stays true.

    libfaketime 0.9.10 reads the file into a buffer it first sets to "+0", shared
    by every thread: a thread that reads the clock while another is between the
    two reads the true date. The threads of a Python process take turns holding
    the GIL, but one waiting for it reads the clock without it, through
    libfaketime's own `pthread_cond_timedwait`, whose fix for faked monotonic
    clocks is of no use here: `FAKETIME_FORCE_MONOTONIC_FIX=0`. Four threads
    reading the clock, and two writing SQLite, then read the true date 0 times
    in 4.3 million readings, against 50 to 120 in one million with the fix on.
    That wait's deadline is also moved by the fake offset (each hand-off of the
    GIL took milliseconds), unless `FAKETIME_WAIT_MS` fixes it: 5 ms, the GIL's
    own interval."""
    preload = " ".join(p for p in (library, os.environ.get("LD_PRELOAD", "")) if p)
    return {
        "LD_PRELOAD": preload,
        "FAKETIME_TIMESTAMP_FILE": str(timestamp_file),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_FORCE_MONOTONIC_FIX": "0",
        "FAKETIME_WAIT_MS": "5",
    }


def write_clock(timestamp_file: Path, seconds: int) -> None:
    """Put a `moved_clock` child's wall clock `seconds` ahead of the true one.
    Written beside the file and renamed over it: a file read half-written is
    "+0", the true date."""
    part = timestamp_file.with_name(timestamp_file.name + ".part")
    part.write_text(f"{seconds:+d}\n")
    part.replace(timestamp_file)


def require_postgres() -> str:
    """ADMIN_URL if PostgreSQL answers there; else skip (fail under CI)."""
    try:
        with psycopg.connect(ADMIN_URL, connect_timeout=3):
            pass
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL is not reachable at {ADMIN_URL} ({exc}); {_HOW}")
    return ADMIN_URL


def require_nats() -> str:
    """NATS_URL if a NATS server with JetStream answers there; else skip (fail under CI)."""
    parts = urlsplit(NATS_URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), 2):
            pass
    except OSError as exc:
        unavailable(f"NATS is not reachable at {NATS_URL} ({exc}); {_HOW}")

    async def account(client: Client) -> None:
        await client.jetstream().account_info()

    try:
        asyncio.run(_on_nats(account))
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        unavailable(f"NATS at {NATS_URL} does not offer JetStream ({exc!r}); {_HOW}")
    return NATS_URL


@contextlib.contextmanager
def fresh_database(admin: str) -> Iterator[str]:
    """The postgresql:// URL of a new, empty database; dropped (with its sessions) afterwards.

    `admin` must be a URL too: the server's `store` setting takes no other form.
    """
    name = f"ingestor_cluster_{secrets.token_hex(6)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield urlunsplit(urlsplit(admin)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def _on_nats(operation: Callable[[Client], Awaitable[T]]) -> T:
    client = await nats.connect(NATS_URL, allow_reconnect=False, connect_timeout=2)
    try:
        return await operation(client)
    finally:
        await client.close()


async def on_nats(operation: Callable[[Client], Awaitable[T]]) -> T:
    """Run `operation` on a NATS connection of its own, in asyncio in a worker thread."""
    return await trio.to_thread.run_sync(asyncio.run, _on_nats(operation))


@dataclass(frozen=True)
class Stream:
    """A test's own stream, and the subject template (under a prefix of its own) for it."""

    name: str
    prefix: str

    @property
    def template(self) -> str:
        return f"{self.prefix}.{{date}}"

    async def messages(self) -> list[RawStreamMsg]:
        """Every message the stream holds, in sequence order ([] if it does not exist)."""

        async def read(client: Client) -> list[RawStreamMsg]:
            manager = client.jsm()
            try:
                state = (await manager.stream_info(self.name)).state
            except nats.js.errors.NotFoundError:
                return []
            if not state.messages:
                return []
            return [
                await manager.get_msg(self.name, seq=seq)
                for seq in range(state.first_seq, state.last_seq + 1)
            ]

        return await on_nats(read)

    async def delete(self) -> None:
        async def delete(client: Client) -> None:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await client.jsm().delete_stream(self.name)

        await on_nats(delete)


@contextlib.asynccontextmanager
async def fresh_stream() -> AsyncIterator[Stream]:
    tag = secrets.token_hex(6)
    stream = Stream(name=f"TEST_CLUSTER_{tag}", prefix=f"test.{tag}.batches")
    try:
        yield stream
    finally:
        with trio.CancelScope(shield=True):
            await stream.delete()


class Cluster:
    """`size` servers with the same settings, each on a data dir and a port of its own.

    `start` starts them together (so they also race to create a shared
    store). Leaving `async with` kills every one still running, then fails
    if any of them logged a traceback.
    """

    def __init__(
        self, root: Path, size: int, env: Mapping[str, str], *, name: str = "node"
    ) -> None:
        self.servers = [ServerProcess(root / f"{name}{index}", env=env) for index in range(size)]

    def __getitem__(self, index: int) -> ServerProcess:
        return self.servers[index]

    def __iter__(self) -> Iterator[ServerProcess]:
        return iter(self.servers)

    def running(self) -> list[ServerProcess]:
        return [server for server in self.servers if server.running]

    async def start(self) -> None:
        async with trio.open_nursery() as nursery:
            for server in self.servers:
                nursery.start_soon(server.start)

    async def __aenter__(self) -> Cluster:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
        for server in self.servers:
            assert "Traceback" not in server.output, (
                f"the server on {server.url} ({server.data_dir.name}) logged a traceback:\n"
                f"{server.output[-4000:]}"
            )

    async def aclose(self) -> None:
        for server in self.servers:
            await server.aclose()


async def metrics(client: httpx.AsyncClient, server: ServerProcess) -> dict[str, float]:
    """GET /metrics as {name: value}, for the samples without labels."""
    response = await client.get(f"{server.url}/metrics")
    assert response.status_code == 200, f"GET /metrics: {response.status_code} {response.text}"
    found: dict[str, float] = {}
    for line in response.text.splitlines():
        if not line or line.startswith("#") or "{" in line:
            continue
        name, _, value = line.partition(" ")
        found[name] = float(value.split()[0])
    return found


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


@contextlib.contextmanager
def frozen(*pids: int) -> Iterator[None]:
    """SIGSTOP `pids` for the block (a paused container or VM); SIGCONT whatever
    happens, to those still alive."""
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def child_pids(parent: int, *, marker: str | None = None) -> list[int]:
    """The live children of `parent` (whose command line holds `marker`, if given)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _stat(int(entry))
        if stat is None or stat[1] != parent or stat[0] == "Z":
            continue
        if marker is not None:
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if marker.encode() not in cmdline:
                continue
        found.append(int(entry))
    return sorted(found)


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def connection_owner(pids: Sequence[int], local_port: int, remote_port: int) -> int | None:
    """Which of `pids` holds the accepted TCP connection local_port <- remote_port (or None)."""
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                local, remote, inode = fields[1], fields[2], fields[9]
                if (
                    int(local.rsplit(":", 1)[1], 16) == local_port
                    and int(remote.rsplit(":", 1)[1], 16) == remote_port
                    and inode != "0"
                ):
                    inodes.add(inode)
    for pid in pids:
        if inodes & _socket_inodes(pid):
            return pid
    return None


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"
