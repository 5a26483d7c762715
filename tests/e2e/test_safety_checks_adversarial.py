"""Attacks on the four safety checks, mostly for false positives.

1. SQLite's check that its files are still those it opened (`_File._check_in_place`,
   `trouble`, `_rescue`): workers replaced while others run, an operator's
   `sqlite3` on the live store (checkpoint, VACUUM, .backup, the online backup
   the README advises) must refuse nothing; a WAL removed while the server is
   idle must not take acknowledged pulses with it at the next crash.
2. `data/store.id`: concurrent first starts, a data dir of the previous
   release, a garbage marker beside a whole store, a read-only data dir over a
   writable store mount: all legitimate starts.
3. PostgreSQL's shared-session and relay probes: many instances starting at
   once, a Unix socket, a plain TCP forwarder (one upstream per client), which
   must be accepted and prepare no statements.
4. The stalled-holder kill: a healthy writer sending a large request over a
   slow link while others contend for its partition must not be killed, and
   every answer must be true.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
import trio

from tests.e2e.cluster_support import (
    ADMIN_URL,
    Cluster,
    child_pids,
    fresh_database,
    require_postgres,
    unavailable,
)
from tests.e2e.conftest import ABORTED_UPLOADS
from tests.e2e.test_data_dir_adversarial import (
    QUIET,
    held,
    loud_lines,
    missing_ids,
    pulses,
    run,
    serving,
    store_id,
)
from tests.e2e.test_pooler_adversarial import _prepared_on_a_pooled_session
from tests.support.server import (
    Ledger,
    ServerError,
    ServerProcess,
    day_before,
    post_until_stored,
    send_pulses,
    wait_until,
)

pytestmark = [pytest.mark.e2e, *ABORTED_UPLOADS]

WORKER_MARK = "spawn_main"  # multiprocessing's spawn command line
GONE = "store files gone"


# -- helpers ------------------------------------------------------------------------


async def readyz_everywhere(url: str, tries: int = 12) -> list[tuple[int, str]]:
    """GET /readyz on `tries` fresh connections (SO_REUSEPORT spreads them over
    the workers): every answer that is not 200."""
    bad = []
    for _ in range(tries):
        async with httpx.AsyncClient(timeout=10) as fresh:
            try:
                response = await fresh.get(f"{url}/readyz")
            except httpx.TransportError as exc:
                bad.append((0, repr(exc)))
                continue
            if response.status_code != 200:
                bad.append((response.status_code, response.text[:300]))
    return bad


async def workers_of(server: ServerProcess, count: int) -> list[int]:
    assert server.pid is not None
    found: list[int] = []

    async def all_there() -> bool:
        found[:] = child_pids(server.pid or 0, marker=WORKER_MARK)
        return len(found) == count

    await wait_until(all_there, within=20, interval=0.1, what=f"{count} workers")
    return list(found)


async def replaced(server: ServerProcess, old: set[int], count: int) -> list[int]:
    """Wait until `count` workers run, none of them in `old`, and all are ready."""
    found: list[int] = []

    async def back() -> bool:
        found[:] = child_pids(server.pid or 0, marker=WORKER_MARK)
        return len(found) == count and not set(found) & old

    await wait_until(back, within=30, interval=0.1, what="workers replaced")

    async def ready() -> bool:
        return await readyz_everywhere(server.url, tries=6) == []

    await wait_until(ready, within=30, interval=0.2, what="replaced workers ready")
    return list(found)


@contextlib.asynccontextmanager
async def forwarder(port: int, *, rate: float | None = None) -> AsyncIterator[int]:
    """A plain TCP forwarder to 127.0.0.1:`port`: one upstream connection per
    client connection, not a pooler. `rate` throttles client-to-server bytes/s.
    Yields the port it listens on."""
    chunk = 4096

    async def pump(src: trio.SocketStream, dst: trio.SocketStream, limit: float | None) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            while True:
                data = await src.receive_some(chunk if limit else 65536)
                if not data:
                    break
                await dst.send_all(data)
                if limit:
                    await trio.sleep(len(data) / limit)
            await dst.send_eof()

    async def handle(client: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            async with client:
                upstream = await trio.open_tcp_stream("127.0.0.1", port)
                async with upstream, trio.open_nursery() as pair:
                    pair.start_soon(pump, client, upstream, rate)
                    pair.start_soon(pump, upstream, client, None)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, handle, 0)
        found = [
            listener.socket.getsockname()[1]
            for listener in listeners
            if listener.socket.family.name == "AF_INET"
        ]
        yield found[0]
        nursery.cancel_scope.cancel()


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"postgres@127.0.0.1:{port}"))


@pytest.fixture
def database() -> Any:
    admin = require_postgres()
    with fresh_database(admin) as url:
        yield url


# -- 1. SQLite: files in place ------------------------------------------------------------


async def test_sqlite_workers_replaced_and_an_operators_sqlite3_on_the_live_store_refuse_nothing(
    tmp_path: Path,
) -> None:
    """`--workers 3`: one worker SIGKILLed (the supervisor replaces it) while the
    others take pulses; then all three killed at once; meanwhile an operator
    runs `sqlite3` on the live store: PRAGMA wal_checkpoint(TRUNCATE), VACUUM,
    .backup, and Python's online backup (the README's advice). None of that
    removes or replaces a store file: no worker may refuse a write or answer
    /readyz 503, and every acknowledged pulse is held, once."""
    if shutil.which("sqlite3") is None:
        unavailable("the sqlite3 command-line shell is missing")
    rng = random.Random(1)
    day = day_before(1)
    data = tmp_path / "data"
    live = data / "store" / "store.sqlite"
    ledger = Ledger()
    refused: list[str] = []
    async with (
        httpx.AsyncClient(timeout=30) as http,
        serving(data, env={"INGESTOR_WORKERS": "3"}) as server,
    ):
        workers = await workers_of(server, 3)

        async def traffic(rounds: int, prefix: str) -> None:
            for n in range(rounds):
                sent = await send_pulses(
                    http, server.url, ledger, pulses(rng, f"{prefix}{n}", day, 20)
                )
                if sent.response is not None and sent.response.status_code == 503:
                    code = sent.response.json()["error"]["code"]
                    if code != "store_busy":
                        refused.append(f"{prefix}{n}: 503 {sent.response.text[:300]}")
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic, 60, "a")
            await trio.sleep(0.3)
            os.kill(workers[0], signal.SIGKILL)
            workers = await replaced(server, {workers[0]}, 3)
            for command in (
                ["sqlite3", str(live), "PRAGMA wal_checkpoint(TRUNCATE);"],
                ["sqlite3", str(live), "VACUUM;"],
                ["sqlite3", str(live), f".backup {tmp_path / 'backup.sqlite'}"],
            ):
                done = await run(*command)
                # A busy store may refuse the operator (SQLITE_BUSY): that is his to retry.
                assert done.returncode == 0 or b"locked" in done.stderr or b"busy" in done.stderr, (
                    command,
                    done.stderr,
                )

            def online_backup() -> None:
                source = sqlite3.connect(f"file:{live}?mode=ro", uri=True)
                target = sqlite3.connect(tmp_path / "online.sqlite")
                try:
                    source.backup(target)
                finally:
                    target.close()
                    source.close()

            await trio.to_thread.run_sync(online_backup)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic, 40, "b")
            await trio.sleep(0.3)
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            workers = await replaced(server, set(workers), 3)
        await traffic(20, "c")
        not_ready = await readyz_everywhere(server.url)
        # Whatever was refused or left unanswered, sent again until stored.
        retry = [a.payload for a in ledger.attempts if a.needs_retry]
        if retry:
            await post_until_stored(http, server.url, ledger, retry)
        output = server.output
        assert refused == [], f"writes refused on a healthy store: {refused[:3]}"
        assert not_ready == [], f"/readyz not 200 on a healthy store: {not_ready[:3]}"
        assert GONE not in output, [line for line in output.splitlines() if GONE in line][:3]
        assert await held(http, server) == ledger.expected_totals()
        assert await missing_ids(http, server, ledger) == []


async def test_sqlite_wal_removed_while_idle_then_a_crash_loses_nothing_acknowledged(
    tmp_path: Path,
) -> None:
    """Pulses acknowledged, folded, then nothing happens; the WAL is removed (a
    cleanup script) and, seconds later, the process dies (SIGKILL, OOM) before
    any write or /readyz came. The acknowledged pulses were still only in the
    WAL: unless the server noticed on its own and checkpointed, they are gone,
    and the restart serves the store without them. The commit says "a removed
    WAL takes nothing with it"; that holds only if something asks."""
    rng = random.Random(2)
    day = day_before(1)
    data = tmp_path / "data"
    ledger = Ledger()
    async with httpx.AsyncClient(timeout=30) as http, serving(data) as server:
        await post_until_stored(http, server.url, ledger, pulses(rng, "idle", day, 30))
        assert await held(http, server) == ledger.expected_totals()  # folded by now
        await trio.sleep(1.5)
        (data / "store" / "store.sqlite-wal").unlink()
        await trio.sleep(3.0)  # idle: no request at all
        assert await server.kill() == -9
        await server.start()
        lost = await missing_ids(http, server, ledger)
        first_run_said = loud_lines(server.output)
        assert lost == [], (
            f"{len(lost)} of 30 pulses acknowledged (202) before the WAL was removed are"
            f" gone after a crash 3 s later; the server logged: {first_run_said[:3]}"
        )


# -- 2. data/store.id -------------------------------------------------------------------


async def test_marker_concurrent_first_starts_on_an_empty_data_dir_all_serve_one_store(
    tmp_path: Path,
) -> None:
    """Three `serve --workers 3` processes started at once on one empty data
    dir, twice over (nine processes racing to make the store and its marker):
    every one starts, on one store, and the marker names it."""
    for round_ in range(2):
        data = tmp_path / f"data{round_}"
        async with contextlib.AsyncExitStack() as stack, httpx.AsyncClient(timeout=30) as http:
            servers = [
                await stack.enter_async_context(
                    serving(data, start=False, name=f"s{round_}{n}", env={"INGESTOR_WORKERS": "3"})
                )
                for n in range(3)
            ]
            try:
                async with trio.open_nursery() as nursery:
                    for server in servers:
                        nursery.start_soon(server.start)
            except BaseExceptionGroup as group:
                outputs = [s.output_of_run()[-600:] for s in servers if not s.running]
                raise AssertionError(f"a concurrent first start was refused: {outputs}") from group
            ids = set()
            for server in servers:
                ids.add(await store_id(http, server))
                assert await readyz_everywhere(server.url, tries=6) == []
            assert len(ids) == 1, ids
            assert (data / "store.id").read_text().strip() == ids.pop()
            assert not list(data.glob(".creating-*")), list(data.iterdir())


async def test_marker_of_the_previous_release_missing_then_garbage_beside_a_whole_store(
    tmp_path: Path,
) -> None:
    """A data dir made by the previous release has a store and no marker: the
    start serves it and writes the marker. A marker that is garbage (bytes
    that are not UTF-8, a disk error's leftovers) beside a whole store is no
    reason to refuse the store either: the marker matters only when the store
    is missing, and one naming another store is already overwritten with a
    warning."""
    rng = random.Random(3)
    day = day_before(1)
    data = tmp_path / "data"
    marker = data / "store.id"
    ledger = Ledger()
    async with httpx.AsyncClient(timeout=30) as http, serving(data) as server:
        await post_until_stored(http, server.url, ledger, pulses(rng, "m", day, 10))
        old = await store_id(http, server)
        assert await server.terminate(within=20) == 0
        marker.unlink()  # the previous release wrote none
        await server.start()
        assert await store_id(http, server) == old
        assert marker.read_text().strip() == old
        assert await server.terminate(within=20) == 0
        marker.write_bytes(b"\xff\xfe\x00garbage\x80\n")
        try:
            await server.start()
        except ServerError:
            pytest.fail(
                "a whole store was refused because its marker is unreadable: "
                + server.output_of_run().strip()[-400:]
            )
        assert await store_id(http, server) == old
        assert await held(http, server) == ledger.expected_totals()


async def test_marker_on_a_read_only_data_dir_over_a_writable_store_mount_starts(
    tmp_path: Path,
) -> None:
    """A read-only root file system (Kubernetes' readOnlyRootFilesystem) with
    the store's volume mounted at data/store, delivering over HTTP: the store
    is writable, the data dir is not. Before the marker this layout started;
    a marker that cannot be written must not stop a start on a whole store
    (it could be kept in the store directory, or its write failure logged)."""
    rng = random.Random(4)
    day = day_before(1)
    made = tmp_path / "made"
    ledger = Ledger()
    sink = {
        "INGESTOR_SINK": "http://127.0.0.1:9/",
        "INGESTOR_SINK_SECRET": "s",
        "INGESTOR_RETRY_INITIAL": "60",
    }
    async with httpx.AsyncClient(timeout=30) as http, serving(made, env=sink) as first:
        await post_until_stored(http, first.url, ledger, pulses(rng, "ro", day, 10))
        old = await store_id(http, first)
        assert await first.terminate(within=20) == 0
    data = tmp_path / "data"
    (data / "store").mkdir(parents=True)
    mounted: list[Path] = []
    try:
        for command in (["mount", "--bind", str(data), str(data)],):
            done = await run(*command)
            if done.returncode != 0:
                unavailable(f"cannot bind-mount here: {done.stderr.decode().strip()}")
        mounted.append(data)
        done = await run("mount", "-o", "remount,ro,bind", str(data))
        assert done.returncode == 0, done.stderr
        done = await run("mount", "--bind", str(made / "store"), str(data / "store"))
        assert done.returncode == 0, done.stderr
        mounted.append(data / "store")
        async with (
            httpx.AsyncClient(timeout=30) as http,
            serving(data, start=False, env=sink, name="ro") as server,
        ):
            try:
                await server.start()
            except ServerError:
                pytest.fail(
                    "the start on a writable store under a read-only data dir was refused: "
                    + server.output_of_run().strip()[-400:]
                )
            assert await store_id(http, server) == old
            assert await held(http, server) == ledger.expected_totals()
    finally:
        for point in reversed(mounted):
            await run("umount", str(point))


# -- 3. PostgreSQL: shared sessions and relays -------------------------------------------

PG = {**QUIET, "INGESTOR_STORE_POOL_SIZE": "2", "INGESTOR_STORE_BUSY_TIMEOUT": "2"}


async def test_postgres_many_instances_starting_at_once_directly_are_all_accepted(
    tmp_path: Path, database: str
) -> None:
    """Eight instances start at once on a new database, connected directly:
    the shared-session probe must find each session its own, and none
    relayed."""
    async with Cluster(tmp_path, 8, {**PG, "INGESTOR_STORE": database}) as cluster:
        async with httpx.AsyncClient(timeout=30) as http:
            ids = {await store_id(http, server) for server in cluster}
        assert len(ids) == 1
        for server in cluster:
            out = server.output
            assert "store relayed" not in out, out[-600:]
            assert "shares its server sessions" not in out, out[-600:]


async def test_postgres_over_a_unix_socket_is_accepted_and_not_relayed(
    tmp_path: Path, database: str
) -> None:
    """`postgresql:///db?host=/var/run/postgresql`: accepted, not taken for a relay."""
    socket_dir = "/var/run/postgresql"
    if not await trio.Path(f"{socket_dir}/.s.PGSQL.5432").exists():
        unavailable(f"no PostgreSQL socket in {socket_dir}")
    name = urlsplit(database).path.lstrip("/")
    url = f"postgresql:///{name}?host={socket_dir}&user=postgres"
    try:
        psycopg.connect(url, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        unavailable(f"cannot connect over {socket_dir}: {exc}")
    rng = random.Random(5)
    ledger = Ledger()
    async with (
        httpx.AsyncClient(timeout=30) as http,
        serving(tmp_path / "data", env={**PG, "INGESTOR_STORE": url}) as server,
    ):
        await post_until_stored(http, server.url, ledger, pulses(rng, "u", day_before(1), 20))
        assert await held(http, server) == ledger.expected_totals()
        assert "store relayed" not in server.output
        assert await readyz_everywhere(server.url, tries=2) == []


async def test_postgres_through_a_plain_tcp_forwarder_is_accepted_and_prepares_nothing(
    tmp_path: Path, database: str
) -> None:
    """A TCP forwarder (one upstream connection per client: no pooler) between
    the instances and the database: two instances start through it and serve,
    the store logs it is relayed, and prepares no statement."""
    port = urlsplit(ADMIN_URL).port or 5432
    rng = random.Random(6)
    ledger = Ledger()
    async with forwarder(port) as relay:
        url = with_port(database, relay)
        async with (
            httpx.AsyncClient(timeout=30) as http,
            Cluster(tmp_path, 2, {**PG, "INGESTOR_STORE": url}) as cluster,
        ):
            for n, server in enumerate(cluster):
                await post_until_stored(
                    http, server.url, ledger, pulses(rng, f"f{n}", day_before(1), 20)
                )
            assert await held(http, cluster[0]) == ledger.expected_totals()
            for server in cluster:
                assert "store relayed" in server.output, server.output[-600:]
                assert await readyz_everywhere(server.url, tries=2) == []
        prepared = await trio.to_thread.run_sync(_prepared_on_a_pooled_session, url)
    assert prepared == (0, None)


# -- 4. PostgreSQL: the stalled-holder kill -----------------------------------------------


async def test_postgres_a_healthy_writer_on_a_slow_link_is_not_ended_by_contending_writers(
    tmp_path: Path, database: str
) -> None:
    """Instance A reaches the database through a link throttled to 700 kB/s and
    posts 4,000 pulses of one tenant with long ids (about 1.4 MB of statement
    parameters under its partition's lock, about 2.3 s to send, within A's own
    bounds of a busy timeout (2 s) a statement and three a transaction).
    Instance B, connected directly, posts to the same tenant meanwhile, and its
    lock waits time out: the holder is 'active' and waiting on ClientRead, but
    is not stalled, and must not be ended. Every answer must be true and the
    totals exact."""
    port = urlsplit(ADMIN_URL).port or 5432
    rng = random.Random(7)
    day = day_before(1)
    ledger = Ledger()
    big = [
        {
            **p,
            "tenant_id": "acme",
            "id": f"{'x' * 100}-{n:06d}",
        }
        for n, p in enumerate(pulses(rng, "big", day, 4000, ("acme",)))
    ]
    async with forwarder(port, rate=700_000) as relay:
        env = {**PG, "INGESTOR_STORE_POOL_SIZE": "4"}
        async with (
            httpx.AsyncClient(timeout=60) as http,
            serving(
                tmp_path / "a", name="a", env={**env, "INGESTOR_STORE": with_port(database, relay)}
            ) as a,
            serving(tmp_path / "b", name="b", env={**env, "INGESTOR_STORE": database}) as b,
        ):
            answers: list[int | str] = []

            async def contend(stop: trio.Event) -> None:
                n = 0
                while not stop.is_set():
                    sent = await send_pulses(
                        http, b.url, ledger, pulses(rng, f"b{n}", day, 5, ("acme",))
                    )
                    answers.append(sent.response.status_code if sent.response else "none")
                    n += 1
                    await trio.sleep(0.05)

            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(contend, stop)
                await trio.sleep(0.2)
                began = trio.current_time()
                sent = await send_pulses(http, a.url, ledger, big)
                took = trio.current_time() - began
                stop.set()
            big_answer = sent.response.status_code if sent.response else sent.error
            killed = [line for line in b.output.splitlines() if "stalled lock holder" in line]
            retry = [x.payload for x in ledger.attempts if x.needs_retry]
            if retry:
                await post_until_stored(http, b.url, ledger, retry)
            assert set(answers) <= {202, 503}, answers
            assert 503 in answers, (
                f"B never timed out on the lock (A took {took:.1f} s): this proves nothing"
            )
            assert await held(http, b) == ledger.expected_totals()
            assert await missing_ids(http, b, ledger) == []
            assert killed == [], f"a healthy writer was ended (A answered {big_answer}): {killed}"
            assert big_answer == 202, (
                f"A's healthy write ({took:.1f} s) answered {big_answer}: {a.tail(5)}"
            )
