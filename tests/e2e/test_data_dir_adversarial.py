"""An operator, or another program, tampering with the data dir of a SQLite store.

Real `serve` processes on a data dir that someone else touches while they
run, or between runs. DESIGN §3 does not pause meanwhile: a 202 means stored
(every pulse it acknowledged is there after a restart), each unit of usage in
exactly one batch, a batch delivered until the sink confirms it, nothing
dropped silently. What the server cannot keep it must not acknowledge: it
should notice (503 with a clear error, /readyz 503, a loud log line), and a
restart should say what is missing rather than start a new, empty store.

    store removed        `rm -rf data/store` while the server takes pulses
    WAL removed          `store.sqlite-wal` removed (a cleanup of "temporary"
                         files), then the process dies
    store overwritten    another deployment's store.sqlite copied in between
                         runs, after a clean stop (copied over a running
                         one's, the same inode, it is not seen: the README
                         says never to)
    store read-only      the store's files and directory made immutable
                         (`chattr +i`: root ignores permissions, and chmod
                         does nothing to descriptors already open); the
                         whole directory, -shm included (`chattr -R +i`);
                         a read-only bind mount between runs
    deliveries           the file sink's directory removed, made immutable,
                         or replaced by a file while batches are pending
    two serve processes  two plain `serve` (not `--workers`) on one data dir
    cloned data dir      a copy started as a second instance (a VM snapshot):
                         same store id, same batch ids, other contents

Every wait is a poll with a deadline; every server, mount and immutable flag
is undone in a `finally`.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import subprocess
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.e2e.conftest import ABORTED_UPLOADS
from tests.faults.harness import DELIVERY_STATE, audit, commit_days
from tests.support.server import (
    Ledger,
    ServerError,
    ServerProcess,
    Total,
    collect_pages,
    day_before,
    post_until_stored,
    random_pulse,
    send_pulses,
    totals_of,
    wait_until,
)

pytestmark = [pytest.mark.e2e, *ABORTED_UPLOADS]

QUIET = {"INGESTOR_COMMIT_INTERVAL": "3600", "INGESTOR_COMMIT_GRACE": "30d"}
# Deliveries retried quickly, so "delivered once fixed" is seen within seconds.
FAST_RETRY = {**QUIET, "INGESTOR_RETRY_INITIAL": "0.1", "INGESTOR_RETRY_MAX": "0.3"}
TENANTS = ("acme", "globex", "initech")
NOTICE_WITHIN = 4.0  # how long a server has to notice its store went away
STORE_FILES = ("store.sqlite", "store.sqlite-wal", "store.sqlite-shm")


# -- helpers ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(
    data_dir: Path,
    *,
    start: bool = True,
    name: str | None = None,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[ServerProcess]:
    """A server on `data_dir` (over a quiet committer), killed on the way out.
    `name` gives it an output file of its own beside the data dir (two servers
    on one data dir would share one)."""
    server = ServerProcess(data_dir, env={**QUIET, **(env or {})})
    if name is not None:
        server.run_dir = data_dir.parent / f"{name}.server"
        server.run_dir.mkdir(parents=True, exist_ok=True)
        server.log_path = server.run_dir / "output.log"
    try:
        if start:
            await server.start()
        yield server
    finally:
        await server.aclose()


def pulses(
    rng: random.Random, prefix: str, day: str, count: int, tenants: Sequence[str] = TENANTS
) -> list[dict[str, Any]]:
    return [random_pulse(rng, f"{prefix}-{n}", day, tenants) for n in range(count)]


async def held(http: httpx.AsyncClient, server: ServerProcess) -> dict[Any, Total]:
    rows = await collect_pages(http, f"{server.url}/aggregates", "aggregates", limit=1000)
    return totals_of(rows)


async def store_id(http: httpx.AsyncClient, server: ServerProcess) -> str:
    response = await http.get(f"{server.url}/readyz")
    assert response.status_code == 200, response.text
    found: str = response.json()["store_id"]
    return found


async def missing_ids(
    http: httpx.AsyncClient, server: ServerProcess, ledger: Ledger
) -> list[tuple[str, str]]:
    """The (tenant, id) of acknowledged pulses that GET /pulses does not list."""
    wanted: dict[tuple[str, str], set[str]] = defaultdict(set)
    for attempt in ledger.stored():
        assert attempt.identity is not None
        wanted[attempt.identity[0], ledger.day_of(attempt)].add(attempt.identity[1])
    missing = []
    for (tenant, day), ids in sorted(wanted.items()):
        rows = await collect_pages(
            http,
            f"{server.url}/pulses",
            "pulses",
            {"tenant_id": tenant, "date": day},
            limit=10_000,
        )
        listed = {row["id"] for row in rows}
        missing += [(tenant, pulse_id) for pulse_id in sorted(ids - listed)]
    return missing


def acknowledged(ledger: Ledger) -> int:
    return sum(1 for a in ledger.attempts if a.answer == "accepted")


def loud_lines(text: str) -> list[str]:
    """WARNING or worse log lines that mention the store."""
    return [
        line
        for line in text.splitlines()
        if re.search(r"\b(WARNING|ERROR|CRITICAL)\b", line) and "store" in line.lower()
    ]


async def post_while_gone(
    http: httpx.AsyncClient,
    server: ServerProcess,
    ledger: Ledger,
    rng: random.Random,
    day: str,
    *,
    within: float = NOTICE_WITHIN,
) -> tuple[list[int | str], int]:
    """Post five pulses every 0.25 s for up to `within` seconds, until /readyz is
    not 200 and a post is refused: the answers (status or transport error),
    and /readyz's last status (0: no answer)."""
    statuses: list[int | str] = []
    ready = 200
    deadline = trio.current_time() + within
    for n in range(1000):
        sent = await send_pulses(http, server.url, ledger, pulses(rng, f"gone{n}", day, 5))
        statuses.append(sent.response.status_code if sent.response is not None else "no answer")
        try:
            ready = (await http.get(f"{server.url}/readyz")).status_code
        except httpx.TransportError:
            ready = 0
        if (ready != 200 and statuses[-1] != 202) or trio.current_time() >= deadline:
            break
        await trio.sleep(0.25)
    return statuses, ready


@contextlib.contextmanager
def immutable(*paths: Path, recursive: bool = False) -> Iterator[None]:
    """`chattr +i` on `paths` (root ignores permissions; this it does not); undone after."""
    flags = ["-R"] if recursive else []
    subprocess.run(["chattr", *flags, "+i", *map(str, paths)], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", *flags, "-i", *map(str, paths)], capture_output=True, check=False)


async def run(*command: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)


def require_chattr(tmp_path: Path) -> None:
    probe = tmp_path / "chattr-probe"
    probe.write_text("x")
    done = subprocess.run(["chattr", "+i", str(probe)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"chattr +i does not work here: {done.stderr.decode().strip()}")
    try:
        probe.write_text("y")
    except PermissionError:
        pass
    else:
        pytest.skip("chattr +i does not stop writes here")
    finally:
        subprocess.run(["chattr", "-i", str(probe)], check=True)
    probe.unlink()


async def batch(http: httpx.AsyncClient, server: ServerProcess, batch_id: str) -> dict[str, Any]:
    response = await http.get(f"{server.url}/batches/{batch_id}")
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


async def commit_one(http: httpx.AsyncClient, server: ServerProcess, day: str) -> str:
    """Commit `day`, which must make exactly one batch: its id."""
    response = await http.post(f"{server.url}/aggregates/commit", params={"date": day})
    assert response.status_code == 200, response.text
    [made] = response.json()["batches"]
    batch_id: str = made["batch_id"]
    return batch_id


def file_matches(path: Path, view: dict[str, Any]) -> bool:
    """Whether the file sink's `path` holds the batch GET /batches/{id} shows."""
    try:
        body = json.loads(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return False
    expected = {k: v for k, v in view.items() if k not in DELIVERY_STATE}
    return bool(body == expected)


async def watch_pending(
    http: httpx.AsyncClient, server: ServerProcess, batch_id: str, path: Path, seconds: float
) -> dict[str, Any]:
    """Poll the batch for `seconds` while the sink is broken: it must never be
    `delivered` without its file. Returns its last view."""
    deadline = trio.current_time() + seconds
    while True:
        view = await batch(http, server, batch_id)
        if view["status"] == "delivered":
            assert file_matches(path, view), (
                f"{batch_id} marked delivered, but {path} does not hold it: {view}"
            )
        if trio.current_time() >= deadline:
            return view
        await trio.sleep(0.1)


async def wait_delivered_to(
    http: httpx.AsyncClient,
    server: ServerProcess,
    batch_id: str,
    path: Path,
    *,
    within: float,
    what: str,
) -> dict[str, Any]:
    last: dict[str, Any] = {}

    async def delivered() -> bool:
        last.update(await batch(http, server, batch_id))
        return bool(last["status"] == "delivered")

    try:
        await wait_until(delivered, within=within, interval=0.1, what=what)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\nbatch {batch_id}: status {last.get('status')}, attempts"
            f" {last.get('attempts')}, last_error {last.get('last_error')!r};"
            f" {path} exists: {await trio.Path(path).exists()};"
            f" {path.parent} exists: {await trio.Path(path.parent).exists()}"
            f"\n{server.tail(5)}"
        ) from None
    assert file_matches(path, last), f"{batch_id} delivered, but {path} does not hold it"
    return last


# -- 1. the store removed or replaced while the server runs ---------------------------


async def test_store_directory_removed_while_running_is_noticed_not_acknowledged(
    tmp_path: Path,
) -> None:
    """`rm -rf data/store` while the server takes pulses.

    The SQLite connections keep writing into the unlinked inodes, which vanish
    when the process exits. Every 202 answered after the removal is then a
    pulse whose only copy is gone at the next start: the promise "a 2xx means
    stored" broken. The server must notice (503 to writes, /readyz 503, a log
    line), and a restart must not silently make a new, empty store (a new
    store id: its batch ids, and its totals, start from nothing)."""
    rng = random.Random(11)
    day = day_before(1)
    data = tmp_path / "data"
    before, after = Ledger(), Ledger()
    problems: list[str] = []
    async with httpx.AsyncClient(timeout=30) as http, serving(data) as server:
        await post_until_stored(http, server.url, before, pulses(rng, "before", day, 20))
        old_id = await store_id(http, server)
        shutil.rmtree(data / "store")

        statuses, ready = await post_while_gone(http, server, after, rng, day)
        taken = acknowledged(after)
        if taken:
            problems.append(
                f"{taken} pulses answered 202 after data/store was removed (answers"
                f" {statuses}): they went into an unlinked file"
            )
        if ready == 200:
            problems.append(f"/readyz still 200 {NOTICE_WITHIN} s after data/store was removed")
        if not loud_lines(server.output_of_run()):
            problems.append("no WARNING or ERROR log line about the store after its removal")
        said = server.output_of_run().count("store files gone")
        if said > 1:  # writes, /readyz and the watch all find it: one line is enough
            problems.append(f"the removal was logged {said} times, not once")

        await server.terminate(within=20)
        try:
            await server.start()
        except ServerError as refused:
            if "store" not in str(refused).lower():
                problems.append(f"the restart was refused without naming the store: {refused}")
            if taken:
                problems.append(f"the {taken} pulses acknowledged after the removal are lost")
        else:
            new_id = await store_id(http, server)
            lost = await missing_ids(http, server, after)
            if new_id != old_id:
                problems.append(
                    f"the restart silently made a new, empty store {new_id} (was {old_id});"
                    f" its start line: {server.output_of_run().splitlines()[:1]}"
                )
            if lost:
                problems.append(
                    f"{len(lost)} of {taken} pulses acknowledged after the removal are not"
                    f" there after the restart: {lost[:5]}"
                )
    assert problems == [], "\n".join(problems)


async def test_wal_removed_while_running_then_a_crash_loses_nothing_acknowledged_after(
    tmp_path: Path,
) -> None:
    """`store.sqlite-wal` removed while the server runs (a cleanup script that
    takes it for a temporary file), then the process dies (SIGKILL, power).

    Committed transactions live in the WAL until a checkpoint copies them into
    store.sqlite: the server keeps appending to the unlinked WAL and answers
    202. After the crash every pulse acknowledged after the removal must still
    be there, or the server must have refused it. Those acknowledged before
    the removal were in the removed WAL too; the server still holds it open
    and can checkpoint it into store.sqlite once it notices, so a restart that
    comes up without them, and without a word, is a defect as well."""
    rng = random.Random(12)
    day = day_before(1)
    data = tmp_path / "data"
    before, after = Ledger(), Ledger()
    problems: list[str] = []
    async with httpx.AsyncClient(timeout=30) as http, serving(data) as server:
        await post_until_stored(http, server.url, before, pulses(rng, "before", day, 20))
        old_id = await store_id(http, server)
        (data / "store" / "store.sqlite-wal").unlink()

        statuses, ready = await post_while_gone(http, server, after, rng, day)
        taken = acknowledged(after)
        if ready == 200:
            problems.append(f"/readyz still 200 {NOTICE_WITHIN} s after the WAL was removed")

        assert await server.kill() == -9
        await server.start()
        lost_after = await missing_ids(http, server, after)
        lost_before = await missing_ids(http, server, before)
        new_id = await store_id(http, server)
        if lost_after:
            problems.append(
                f"{len(lost_after)} of the {taken} pulses answered 202 after the WAL was"
                f" removed (answers {statuses}) are gone after the crash: {lost_after[:5]}"
            )
        if lost_before and not loud_lines(server.output_of_run()):
            problems.append(
                f"the restart (store {new_id}, was {old_id}) came up silently without"
                f" {len(lost_before)} of the 20 pulses acknowledged before the removal"
            )
    assert problems == [], "\n".join(problems)


async def test_another_stores_file_copied_in_between_runs_is_served_whole(
    tmp_path: Path,
) -> None:
    """Between runs (a clean stop), another deployment's store.sqlite copied in.

    The server then runs as that store: /readyz and its start line name its
    store id, and it serves that store's totals exactly, nothing of ours mixed
    in, and leaves the batches our store delivered as they are. (Nothing warns
    that the data dir's deliveries came from another store id.)"""
    rng = random.Random(14)
    day = day_before(1)
    ours, theirs = Ledger(), Ledger()
    other = tmp_path / "other"
    data = tmp_path / "data"
    async with httpx.AsyncClient(timeout=30) as http:
        async with serving(other) as foreign:
            await post_until_stored(http, foreign.url, theirs, pulses(rng, "o", day, 30, ["zeta"]))
            other_id = await store_id(http, foreign)
            assert await foreign.terminate(within=20) == 0
        async with serving(data, env=FAST_RETRY) as server:
            await post_until_stored(http, server.url, ours, pulses(rng, "a", day, 30))
            our_id = await store_id(http, server)
            delivered = await commit_one_settled(http, server, day)
            before = sorted(p.name for p in server.deliveries.rglob("*.json"))
            assert await server.terminate(within=20) == 0
            assert not (data / "store" / "store.sqlite-wal").exists()
            shutil.copyfile(other / "store" / "store.sqlite", data / "store" / "store.sqlite")

            await server.start()
            assert await store_id(http, server) == other_id != our_id
            assert f"store_id={other_id}" in server.output_of_run().splitlines()[0]
            assert await held(http, server) == theirs.expected_totals()
            assert sorted(p.name for p in server.deliveries.rglob("*.json")) == before
            assert delivered.startswith(our_id)
            assert "Traceback" not in server.output, server.output[-3000:]


async def commit_one_settled(http: httpx.AsyncClient, server: ServerProcess, day: str) -> str:
    """Commit `day` (one batch or more) and wait until every batch is delivered."""
    made = await commit_days(http, server.url, [day])
    assert made, "the commit made no batch"

    async def settled() -> bool:
        views = [await batch(http, server, b["batch_id"]) for b in made]
        return all(v["status"] == "delivered" for v in views)

    await wait_until(settled, within=15, interval=0.1, what="the batches delivered")
    first: str = made[0]["batch_id"]
    return first


# -- 3. the store made read-only ----------------------------------------------------


async def test_store_files_made_immutable_while_running_answer_503_then_recover(
    tmp_path: Path,
) -> None:
    """store.sqlite, its WAL and the store directory made immutable (`chattr +i`)
    while the server runs: a write cannot reach the disk. Writes and commits
    are answered 503 `store_unavailable` naming the store, nothing of them is
    counted; once the flag is gone the same pulses are taken, and after a
    restart every acknowledged pulse is there exactly once."""
    require_chattr(tmp_path)
    rng = random.Random(15)
    day = day_before(1)
    data = tmp_path / "data"
    store = data / "store"
    ledger = Ledger()
    async with httpx.AsyncClient(timeout=30) as http, serving(data) as server:
        await post_until_stored(http, server.url, ledger, pulses(rng, "before", day, 20))
        refused = pulses(rng, "during", day, 10)
        with immutable(store / "store.sqlite", store / "store.sqlite-wal", store):
            sent = await send_pulses(http, server.url, ledger, refused)
            assert sent.response is not None, sent.error
            assert sent.response.status_code == 503, sent.response.text
            error = sent.response.json()["error"]
            assert error["code"] == "store_unavailable", error
            assert "store" in error["message"], error
            assert "unwritable" in error["message"], error
            assert "Retry-After" in sent.response.headers
            commit = await http.post(f"{server.url}/aggregates/commit", params={"date": day})
            assert commit.status_code == 503, commit.text
            assert acknowledged(ledger) == 20
        await post_until_stored(http, server.url, ledger, refused)
        assert acknowledged(ledger) == 30
        assert await held(http, server) == ledger.expected_totals()
        await server.restart()
        assert await held(http, server) == ledger.expected_totals()
        assert await missing_ids(http, server, ledger) == []
        assert "Traceback" not in server.output, server.output[-3000:]


async def test_whole_store_directory_made_immutable_while_running_is_a_clear_error(
    tmp_path: Path,
) -> None:
    """`chattr -R +i data/store` (an operator freezing the data dir, say before a
    backup): -shm, the WAL index SQLite maps into memory, too.

    The server must answer 503 with a clear error (or at worst exit saying
    why), not vanish in silence; and once the flag is gone and it runs again,
    every pulse it acknowledged is there."""
    require_chattr(tmp_path)
    rng = random.Random(16)
    day = day_before(1)
    data = tmp_path / "data"
    ledger = Ledger()
    async with httpx.AsyncClient(timeout=30) as http, serving(data) as server:
        await post_until_stored(http, server.url, ledger, pulses(rng, "before", day, 20))
        problems: list[str] = []
        with immutable(data / "store", recursive=True):
            sent = await send_pulses(http, server.url, ledger, pulses(rng, "during", day, 10))
            answer = sent.response.status_code if sent.response is not None else sent.error
            await trio.sleep(0.3)
            if not server.running:
                # SQLite maps -shm into memory: its first write to the
                # immutable file is a SIGBUS, which no code of the server can
                # answer. At worst it must die saying so.
                code = server._current().poll()
                if "Fatal Python error: Bus error" not in server.output_of_run():
                    problems.append(
                        f"the server died (exit code {code}) on the write, answered"
                        f" {answer!r}, without a word why; the last lines of its log:"
                        f"\n{server.tail(3)}"
                    )
            elif answer != 503:
                problems.append(f"the write was answered {answer!r}, not 503")
        if not server.running:
            await server.start()
        await post_until_stored(http, server.url, ledger, pulses(rng, "after", day, 10))
        assert await missing_ids(http, server, ledger) == []
        assert await held(http, server) == ledger.expected_totals()
    assert problems == [], "\n".join(problems)


async def test_store_on_a_read_only_mount_is_refused_at_start_with_a_clear_message(
    tmp_path: Path,
) -> None:
    """data/store on a read-only bind mount between runs (a read-only remount of
    a mount with a file open for writing is refused by the kernel, so not
    while running). The start is refused with one line that says the store
    cannot be written; once writable again the server starts on the same
    store, every pulse there."""
    rng = random.Random(17)
    day = day_before(1)
    data = tmp_path / "data"
    store = data / "store"
    ledger = Ledger()
    async with httpx.AsyncClient(timeout=30) as http, serving(data) as server:
        await post_until_stored(http, server.url, ledger, pulses(rng, "a", day, 20))
        old_id = await store_id(http, server)
        assert await server.terminate(within=20) == 0
        bound = await run("mount", "--bind", str(store), str(store))
        if bound.returncode != 0:
            pytest.skip(f"cannot bind-mount here: {bound.stderr.decode().strip()}")
        try:
            remounted = await run("mount", "-o", "remount,ro,bind", str(store))
            assert remounted.returncode == 0, remounted.stderr
            with pytest.raises(ServerError) as refused:
                await server.start()
            message = server.output_of_run().strip()
            assert server.exit_codes[-1] == 1, message
            assert "Traceback" not in message, message
            assert "store" in message, message
            assert re.search(r"read-only|cannot be opened for writing", message), message
            assert "the server exited" in str(refused.value)
        finally:
            unmounted = await run("umount", str(store))
            assert unmounted.returncode == 0, unmounted.stderr
        await server.start()
        assert await store_id(http, server) == old_id
        assert await held(http, server) == ledger.expected_totals()


# -- 4. the file sink's directory ---------------------------------------------------


async def test_deliveries_directory_removed_after_a_batch_is_made_again_for_the_next(
    tmp_path: Path,
) -> None:
    """`rm -rf data/deliveries` after the sink has written a day's batch, then a
    correction batch of that day committed.

    The sink makes its directories again, as it did the first time, and
    delivers the correction there: never `delivered` without its file. It
    remembered the day's directory as made, and retried into it for ever
    (still pending after 49 attempts, until a restart)."""
    rng = random.Random(18)
    day = day_before(1)
    data = tmp_path / "data"
    ledger = Ledger()
    async with httpx.AsyncClient(timeout=30) as http, serving(data, env=FAST_RETRY) as server:
        await post_until_stored(http, server.url, ledger, pulses(rng, "a", day, 10, ["acme"]))
        await commit_one_settled(http, server, day)
        shutil.rmtree(server.deliveries)

        await post_until_stored(http, server.url, ledger, pulses(rng, "b", day, 10, ["acme"]))
        correction = await commit_one(http, server, day)
        path = server.deliveries / day / f"{correction}.json"
        await wait_delivered_to(
            http,
            server,
            correction,
            path,
            within=5,
            what=f"the correction delivered once {server.deliveries} was removed",
        )


async def test_deliveries_unwritable_or_a_file_keep_batches_pending_until_fixed(
    tmp_path: Path,
) -> None:
    """The day's delivery directory made immutable (`chattr +i`) while a batch of
    it is pending, then `data/deliveries` replaced by a plain file before a
    new day's first batch. Each batch stays pending with an error saying
    why, is never `delivered` without its file, and is delivered once fixed."""
    require_chattr(tmp_path)
    rng = random.Random(19)
    first, second = day_before(2), day_before(1)
    data = tmp_path / "data"
    ledger = Ledger()
    async with httpx.AsyncClient(timeout=30) as http, serving(data, env=FAST_RETRY) as server:
        await post_until_stored(http, server.url, ledger, pulses(rng, "a", first, 10, ["acme"]))
        await commit_one_settled(http, server, first)

        await post_until_stored(http, server.url, ledger, pulses(rng, "b", first, 10, ["acme"]))
        with immutable(server.deliveries / first):
            correction = await commit_one(http, server, first)
            path = server.deliveries / first / f"{correction}.json"
            view = await watch_pending(http, server, correction, path, 1.0)
            assert view["status"] == "pending", view
            assert "not permitted" in (view["last_error"] or ""), view
        await wait_delivered_to(
            http, server, correction, path, within=10, what="delivered once writable"
        )

        shutil.rmtree(server.deliveries)
        server.deliveries.write_text("not a directory")
        await post_until_stored(http, server.url, ledger, pulses(rng, "c", second, 10, ["acme"]))
        made = await commit_one(http, server, second)
        path = server.deliveries / second / f"{made}.json"
        view = await watch_pending(http, server, made, path, 1.0)
        assert view["status"] == "pending", view
        assert view["last_error"], view
        server.deliveries.unlink()
        await wait_delivered_to(
            http, server, made, path, within=10, what="delivered once the file is gone"
        )


# -- 5. two serve processes on one data dir -----------------------------------------


async def test_two_serve_processes_on_one_data_dir_count_and_commit_once(
    tmp_path: Path,
) -> None:
    """Two plain `serve` processes (not `--workers`) started at once on one new
    data dir, on two ports. The same ids sent to both at once are accepted
    once; commits raced on both make each unit of usage into exactly one
    batch; every batch is delivered once, adding up to the totals."""
    rng = random.Random(20)
    days = [day_before(2), day_before(1)]
    data = tmp_path / "data"
    ledger = Ledger()
    async with (
        httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as http,
        serving(data, start=False, name="first") as first,
        serving(data, start=False, name="second") as second,
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first.start)
            nursery.start_soon(second.start)
        assert await store_id(http, first) == await store_id(http, second)
        urls = [first.url, second.url]
        for round_ in range(3):
            sent = [
                random_pulse(rng, f"r{round_}-{n}", rng.choice(days), TENANTS) for n in range(200)
            ]
            async with trio.open_nursery() as nursery:
                for copy in range(4):
                    body = list(sent)
                    random.Random(copy).shuffle(body)
                    nursery.start_soon(post_until_stored, http, urls[copy % 2], ledger, body)
                for n in range(4):
                    nursery.start_soon(commit_days, http, urls[n % 2], days)
        assert ledger.problems() == []
        accepted = [a.identity for a in ledger.attempts if a.answer == "accepted"]
        assert len(accepted) == len(set(accepted)) == 600
        for server in (first, second):
            counts = await audit(server, ledger, deliver_within=20)
            assert counts.counted == counts.delivered == 600, counts
            assert counts.batches > 0, counts
        for server in (first, second):
            assert "Traceback" not in server.output, server.output[-3000:]


# -- 6. a clone of the data dir -----------------------------------------------------


async def test_a_cloned_data_dir_makes_the_same_batch_ids_and_a_shared_drop_refuses_the_second(
    tmp_path: Path,
) -> None:
    """A copy of a stopped server's data dir started as a second instance (a VM
    snapshot, a copied container volume). Both run on the same store id, so
    both make the next batch of a day under the same id, with other usage.
    Nothing in either instance detects the clone (/readyz shows one store id
    for both); a downstream that holds both is what can: here both deliver
    into one file drop (the clone's deliveries a link to the original's), and
    the clone's batch must stay `failed` with the reason, the original's file
    untouched, not be taken for delivered and its usage billed nowhere."""
    rng = random.Random(21)
    day = day_before(1)
    data, clone = tmp_path / "data", tmp_path / "clone"
    ledger = Ledger()
    async with httpx.AsyncClient(timeout=30) as http, serving(data, env=FAST_RETRY) as original:
        await post_until_stored(http, original.url, ledger, pulses(rng, "a", day, 10, ["acme"]))
        await commit_one_settled(http, original, day)
        assert await original.terminate(within=20) == 0
        shutil.copytree(data, clone)
        shutil.rmtree(clone / "deliveries")
        (clone / "deliveries").symlink_to(data / "deliveries", target_is_directory=True)

        await original.start()
        async with serving(clone, env=FAST_RETRY) as copy:
            assert await store_id(http, original) == await store_id(http, copy)
            await post_until_stored(
                http, original.url, Ledger(), pulses(rng, "o", day, 5, ["acme"])
            )
            await post_until_stored(http, copy.url, Ledger(), pulses(rng, "c", day, 7, ["acme"]))
            mine = await commit_one(http, original, day)
            path = original.deliveries / day / f"{mine}.json"
            view = await wait_delivered_to(http, original, mine, path, within=10, what="delivered")
            theirs = await commit_one(http, copy, day)
            assert theirs == mine, "the clone made another batch id: nothing to check"

            async def settled() -> dict[str, Any] | None:
                found = await batch(http, copy, theirs)
                return found if found["status"] != "pending" else None

            clone_view = await wait_until(settled, within=10, interval=0.1, what="clone settled")
            assert clone_view is not None
            assert clone_view["used_amount"] != view["used_amount"]
            assert clone_view["status"] == "failed", clone_view
            assert "another batch" in clone_view["last_error"], clone_view
            assert file_matches(path, view), "the first delivery's file was changed"
            metrics = (await http.get(f"{copy.url}/metrics")).text
            assert 'ingestor_outbox_batches{status="failed"} 1.0' in metrics
