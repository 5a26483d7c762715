"""Instances that run, but slowly (a tight CPU quota, a noisy neighbour, a VM
short of CPU).

Without cgroups, a quota is emulated by duty-cycling processes from the test:
SIGSTOP for most of every 100 ms, SIGCONT for the rest (`throttled`). Such a
process keeps every session, lock and lease it holds; its event loop runs,
only a fraction of the time. test_frozen_adversarial.py stops processes for
seconds; here they never stop for longer than a slice, and the README's
promises must hold for them and their peers:

1. `--workers 2` on SQLite, the whole group throttled (as a container's
   cgroup is): the workers are slow, not stuck, so none is killed as stuck
   (`worker_timeout`); every answer is 202 or 503 with Retry-After; nothing
   acknowledged is lost.
2. `--workers 2`, one worker throttled, the other not: the writers' lock is
   handed on both ways (each worker stores pulses), the healthy worker's
   answers come within the busy timeout, the slow one is not killed.
3. Two instances on PostgreSQL, the committer's leader throttled: the lead
   does not flap between them nor is held by both, each unit of usage is in
   exactly one batch, each batch goes to the receiver one POST at a time,
   the healthy instance answers within the busy timeout, the slow one
   truthfully.
4. A throttled instance on PostgreSQL that does not lead, under light load:
   it keeps taking pulses (its purge-horizon reading, `fresh_horizon`, stays
   fresh or is refreshed), not 503s.

Every process stopped is sent SIGCONT in a `finally`; every server is killed
at the end of its test.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import httpx
import pytest
import trio

from tests.e2e.cluster_support import (
    Cluster,
    child_pids,
    fresh_database,
    metrics,
    require_postgres,
)
from tests.e2e.conftest import ABORTED_UPLOADS
from tests.e2e.test_cluster import (
    QUIET,
    WORKER_MARK,
    batches_with_records,
    check_outbox,
    day_before,
    sole_leader,
)
from tests.e2e.test_frozen_adversarial import (
    SLACK,
    Answered,
    Post,
    Receiver,
    keep_posting,
    keep_posting_pinned,
    pin_connections,
    settle_unresolved,
    too_slow,
    wrong_answers,
)
from tests.support.server import (
    Ledger,
    ServerProcess,
    check_pulses_stored_once,
    collect_pages,
    totals_of,
    wait_until,
)

pytestmark = [pytest.mark.e2e, *ABORTED_UPLOADS]

SECRET = "throttled-secret"
PERIOD = 0.1  # one slice of the emulated CPU quota


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A database of the test's own (skipped without PostgreSQL, failed under CI)."""
    with fresh_database(require_postgres()) as url:
        yield url


# -- the emulated CPU quota ------------------------------------------------------------


def _signal_all(pids: Sequence[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


@contextlib.asynccontextmanager
async def throttled(targets: Callable[[], Sequence[int]], *, stopped: float) -> AsyncIterator[None]:
    """For the block, keep the processes `targets()` names (asked again every slice:
    a restarted worker is throttled too) SIGSTOPped for `stopped` of every
    `PERIOD`; every process ever stopped is sent SIGCONT at the end, whatever
    happens."""
    ever: set[int] = set()

    async def cycle() -> None:
        while True:
            pids = list(targets())
            ever.update(pids)
            try:
                _signal_all(pids, signal.SIGSTOP)
                await trio.sleep(PERIOD * stopped)
            finally:
                _signal_all(pids, signal.SIGCONT)
            await trio.sleep(PERIOD * (1 - stopped))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cycle)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()
    finally:
        _signal_all(sorted(ever), signal.SIGCONT)


def group_of(supervisor: int) -> Callable[[], list[int]]:
    """The supervisor and all its children, as a container's cgroup holds them."""
    return lambda: [supervisor, *child_pids(supervisor)]


def killed_lines(server: ServerProcess) -> list[str]:
    return [
        line
        for line in server.output.splitlines()
        if "worker stopped answering" in line or "worker died" in line
    ]


async def two_workers_serving(server: ServerProcess) -> list[int]:
    assert server.pid is not None
    supervisor = server.pid

    async def two() -> list[int]:
        found = child_pids(supervisor, marker=WORKER_MARK)
        return found if len(found) == 2 else []

    workers = await wait_until(two, within=15, what="two workers")

    async def both_ready() -> bool:
        return server.output_of_run().count(" ingestor.service start ") == 2

    await wait_until(both_ready, within=15, what="both workers serving")
    return workers


async def stop_workers(server: ServerProcess) -> None:
    """Kill the supervisor and any worker left (killing it alone orphans them)."""
    children = child_pids(server.pid) if server.running and server.pid else []
    _signal_all(children, signal.SIGCONT)
    await server.aclose()
    _signal_all(children, signal.SIGKILL)


def summary(log: Sequence[Answered], origin: float) -> str:
    statuses: dict[object, int] = {}
    for entry in log:
        statuses[entry.status] = statuses.get(entry.status, 0) + 1
    slowest = max(log, key=lambda e: e.took, default=None)
    return f"{statuses}; slowest: {slowest.describe(origin) if slowest else '-'}"


# -- 1. --workers 2, the whole group throttled -----------------------------------------


async def test_two_workers_throttled_together_are_slow_not_stuck(tmp_path: Path) -> None:
    """README: a worker "whose event loop has not run for `worker_timeout` is
    killed and restarted". A container on a tight CPU quota (its supervisor and
    both workers stopped 95% of every 100 ms) runs its event loops every slice:
    none may be killed as stuck. Every answer is 202 or 503 with Retry-After
    (500 only `outcome_unknown`), and every acknowledged pulse is stored once."""
    worker_timeout, busy = 4.0, 1.0
    server = ServerProcess(
        tmp_path / "data",
        env={
            "INGESTOR_WORKERS": "2",
            "INGESTOR_WORKER_TIMEOUT": str(worker_timeout),
            "INGESTOR_STORE_BUSY_TIMEOUT": str(busy),
            **QUIET,
        },
    )
    ledger = Ledger()
    log: list[Answered] = []
    day = day_before(1)
    try:
        await server.start()
        assert server.pid is not None
        await two_workers_serving(server)
        origin = trio.current_time()
        with trio.fail_after(40):
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                for number in range(6):
                    nursery.start_soon(
                        lambda n=number: keep_posting(
                            server,
                            ledger,
                            log,
                            stop,
                            prefix=f"g{n}",
                            day=day,
                            size=1000,
                            fresh_connections=True,
                        )
                    )
                async with throttled(group_of(server.pid), stopped=0.95):
                    await trio.sleep(8)
                stop.set()
            async with httpx.AsyncClient(timeout=30.0) as http:
                resent = await settle_unresolved(http, server, ledger)
                assert ledger.problems() == []
                rows = await collect_pages(
                    http, f"{server.url}/aggregates", "aggregates", limit=1000
                )
                assert totals_of(rows) == ledger.expected_totals()
                await check_pulses_stored_once(http, server, ledger)
        stored = sum(1 for e in log if e.status == 202)
        print(f"\nthrottled group: {summary(log, origin)}; {resent} resent")
        assert killed_lines(server) == [], (
            f"a worker that ran every 100 ms was killed as stuck (worker_timeout"
            f" {worker_timeout:g} s): {killed_lines(server)}; answers: {summary(log, origin)}"
        )
        assert wrong_answers(log) == []
        assert stored > 0, f"nothing stored while throttled: {summary(log, origin)}"
        assert "Traceback" not in server.output, server.output[-4000:]
    finally:
        await stop_workers(server)


# -- 2. --workers 2, one worker throttled ----------------------------------------------


async def test_a_throttled_worker_and_a_healthy_one_hand_the_writers_lock_on(
    tmp_path: Path,
) -> None:
    """One worker stopped 90% of every 100 ms (a noisy neighbour on its core),
    the other free, each with two keep-alive clients of its own. The README's
    workers "write one at a time": the lock must go to each in turn (each
    stores pulses while the other writes), the healthy worker's answers come
    within the busy timeout, the slow worker is not killed as stuck, every
    answer is 202 or 503 with Retry-After, and nothing acknowledged is lost."""
    worker_timeout, busy = 3.0, 1.0
    server = ServerProcess(
        tmp_path / "data",
        env={
            "INGESTOR_WORKERS": "2",
            "INGESTOR_WORKER_TIMEOUT": str(worker_timeout),
            "INGESTOR_STORE_BUSY_TIMEOUT": str(busy),
            **QUIET,
        },
    )
    ledger = Ledger()
    day = day_before(1)
    try:
        await server.start()
        slow_pid, healthy_pid = await two_workers_serving(server)
        pinned = await pin_connections(server, [slow_pid, healthy_pid], each=2)
        logs: dict[int, list[Answered]] = {slow_pid: [], healthy_pid: []}
        origin = trio.current_time()
        with trio.fail_after(40):
            stop = trio.Event()
            async with (
                throttled(lambda: [slow_pid], stopped=0.9),
                trio.open_nursery() as nursery,
            ):
                for pid, connections in pinned.items():
                    for index, connection in enumerate(connections):
                        nursery.start_soon(
                            lambda c=connection, p=pid, i=index: keep_posting_pinned(
                                c,
                                ledger,
                                logs[p],
                                stop,
                                prefix=f"w{p}-{i}",
                                day=day,
                                size=200,
                            )
                        )
                await trio.sleep(8)
                stop.set()
            for connections in pinned.values():
                for connection in connections:
                    await connection.stream.aclose()
            async with httpx.AsyncClient(timeout=30.0) as http:
                resent = await settle_unresolved(http, server, ledger)
                assert ledger.problems() == []
                rows = await collect_pages(
                    http, f"{server.url}/aggregates", "aggregates", limit=1000
                )
                assert totals_of(rows) == ledger.expected_totals()
        slow, healthy = logs[slow_pid], logs[healthy_pid]
        print(
            f"\nthrottled worker: {summary(slow, origin)}\nhealthy worker:"
            f" {summary(healthy, origin)}; {resent} resent"
        )
        assert killed_lines(server) == [], (
            f"the slow worker was killed as stuck: {killed_lines(server)}"
        )
        assert wrong_answers(slow + healthy) == []
        for name, entries in (("throttled", slow), ("healthy", healthy)):
            assert any(e.status == 202 for e in entries), (
                f"the {name} worker stored nothing in 8 s: the writers' lock was not"
                f" handed to it; {summary(entries, origin)}"
            )
        late = too_slow(healthy, busy_timeout=busy, slack=SLACK)
        assert late == [], (
            f"{len(late)} of the healthy worker's {len(healthy)} answers took longer than"
            f" store_busy_timeout ({busy:g} s) + {SLACK:g} s: "
            + "; ".join(e.describe(origin) for e in late[:5])
        )
        assert "Traceback" not in server.output, server.output[-4000:]
    finally:
        await stop_workers(server)


# -- 3. PostgreSQL: the committer's leader throttled -----------------------------------


def overlapping(posts: Sequence[Post]) -> list[str]:
    """Batches two of whose POSTs were open at once."""
    found = []
    by_batch: dict[str, list[Post]] = {}
    for post in posts:
        by_batch.setdefault(post.batch_id, []).append(post)
    for batch_id, sent in by_batch.items():
        for a, b in itertools.pairwise(sent):
            if a.ended is None or b.arrived < a.ended:
                found.append(f"{batch_id}: POSTs at {a.arrived:.2f} and {b.arrived:.2f}")
    return found


@pytest.fixture
async def prompt_receiver() -> AsyncIterator[Receiver]:
    """A billing system that answers every POST 200 after 0.3 s."""
    made = Receiver(SECRET, delay=0.3, hold_first=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(made.run)
        yield made
        nursery.cancel_scope.cancel()


async def leading_of(http: httpx.AsyncClient, server: ServerProcess) -> float | None:
    with trio.move_on_after(3):
        try:
            return (await metrics(http, server))["ingestor_committer_leading"]
        except (httpx.TransportError, AssertionError):
            return None
    return None


def handovers(
    held: Sequence[tuple[float, float, float]],
) -> tuple[int, list[tuple[float, float, float]]]:
    """(how many times the lead moved, the samples in which both instances said
    they led other than at a handover), from samples (time, slow's gauge,
    healthy's gauge).

    An instance whose session the database ended believes it leads until
    its next ping finds the lead gone: during a handover both may say so
    (leading only saves work, README). Anywhere else, both is a fault.
    """
    states: list[tuple[float, float]] = []
    at: list[list[tuple[float, float, float]]] = []
    for t, a, b in held:
        if not states or states[-1] != (a, b):
            states.append((a, b))
            at.append([])
        at[-1].append((round(t, 1), a, b))
    both = []
    for index, state in enumerate(states):
        between = {states[index - 1], states[index + 1]} if 0 < index < len(states) - 1 else set()
        if state == (1, 1) and between != {(1, 0), (0, 1)}:
            both.extend(at[index])
    alone = [state for state in states if state != (1, 1)]
    moves = sum(1 for x, y in itertools.pairwise(alone) if x != y)
    return moves, both


async def test_a_throttled_leader_keeps_the_lead_and_every_day_is_committed_once(
    postgres_url: str, prompt_receiver: Receiver, tmp_path: Path
) -> None:
    """README: "one instance at a time runs the periodic committer", and a batch
    "is sent by one process at a time". Two instances on PostgreSQL, the
    leader stopped 90% of every 100 ms for 10 s while both take late pulses
    for yesterday, committed every second and sent to an HTTP receiver. The
    lead must not flap (move more than once) nor be held by both at a sample;
    each bucket's batches add up to its total; no batch is POSTed twice at
    once; the healthy instance answers within the busy timeout, both
    truthfully."""
    busy = 2.0
    env = {
        "INGESTOR_STORE": postgres_url,
        "INGESTOR_COMMIT_INTERVAL": "1",
        "INGESTOR_COMMIT_GRACE": "1",
        "INGESTOR_STORE_BUSY_TIMEOUT": str(busy),
        "INGESTOR_SINK": prompt_receiver.url,
        "INGESTOR_SINK_SECRET": SECRET,
        "INGESTOR_SINK_TIMEOUT": "3",
        "INGESTOR_RETRY_INITIAL": "0.2",
        "INGESTOR_RETRY_MAX": "1",
    }
    yesterday = day_before(1)
    ledger = Ledger()
    logs: dict[str, list[Answered]] = {"slow": [], "healthy": []}
    samples: list[tuple[float, float | None, float | None]] = []
    async with (
        httpx.AsyncClient(timeout=30.0) as http,
        Cluster(tmp_path, 2, env) as cluster,
    ):
        [slow] = await wait_until(
            lambda: sole_leader(http, cluster.running()), within=15, interval=0.1, what="a leader"
        )
        [healthy] = [s for s in cluster if s is not slow]
        assert slow.pid is not None
        slow_pid = slow.pid
        origin = trio.current_time()
        with trio.fail_after(45):
            stop = trio.Event()

            async def sample() -> None:
                async with httpx.AsyncClient(timeout=3.0) as probe:
                    while not stop.is_set():
                        a, b = await leading_of(probe, slow), await leading_of(probe, healthy)
                        samples.append((trio.current_time() - origin, a, b))
                        await trio.sleep(0.5)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample)
                async with throttled(lambda: [slow_pid], stopped=0.9):
                    for name, server in (("slow", slow), ("healthy", healthy)):
                        for index in range(2):
                            nursery.start_soon(
                                lambda s=server, n=name, i=index: keep_posting(
                                    s, ledger, logs[n], stop, prefix=f"{n}{i}", day=yesterday
                                )
                            )
                    await trio.sleep(10)
                    stop.set()
            await settle_unresolved(http, healthy, ledger)

            async def committed_and_sent() -> bool:
                rows = await collect_pages(
                    http, f"{healthy.url}/aggregates", "aggregates", {"status": "open"}, limit=500
                )
                pending = await collect_pages(
                    http, f"{healthy.url}/batches", "batches", {"status": "pending"}, limit=500
                )
                return not rows and not pending

            await wait_until(
                committed_and_sent, within=20, interval=0.2, what="committed and delivered"
            )
            expected = ledger.expected_totals()
            rows = await collect_pages(http, f"{healthy.url}/aggregates", "aggregates", limit=500)
            every = await batches_with_records(http, healthy, [yesterday])
        held = [(t, a, b) for t, a, b in samples if a is not None and b is not None]
        moves, both = handovers(held)
        print(
            f"\nslow instance: {summary(logs['slow'], origin)}\nhealthy instance:"
            f" {summary(logs['healthy'], origin)}\nleading (slow, healthy) each 0.5 s:"
            f" {[(round(t, 1), a, b) for t, a, b in samples]}\n{len(every)} batches,"
            f" {len(prompt_receiver.posts)} POSTs"
        )
        assert ledger.problems() == []
        assert totals_of(rows) == expected
        assert check_outbox(every, expected) == []
        assert wrong_answers(logs["slow"] + logs["healthy"]) == []
        assert overlapping(prompt_receiver.posts) == []
        assert all(post.signature_ok for post in prompt_receiver.posts)
        assert {post.batch_id for post in prompt_receiver.posts} == set(every)
        assert both == [], f"both instances reported leading at once, not at a handover: {both}"
        assert moves <= 1, (
            f"the lead moved {moves} times between two running instances in"
            f" {held[-1][0]:.0f} s: {[(round(t, 1), a, b) for t, a, b in held]}"
        )
        late = too_slow(logs["healthy"], busy_timeout=busy, slack=SLACK)
        assert late == [], (
            f"{len(late)} of the healthy instance's {len(logs['healthy'])} answers took"
            f" longer than store_busy_timeout ({busy:g} s) + {SLACK:g} s: "
            + "; ".join(e.describe(origin) for e in late[:5])
        )


# -- 4. PostgreSQL: a throttled instance that does not lead, lightly loaded ------------


async def test_a_throttled_follower_keeps_taking_pulses(postgres_url: str, tmp_path: Path) -> None:
    """README: an instance that has not read the purge horizon for 7 s "reads it
    before it takes pulses"; a 503 is for overload, a busy or unreachable
    store. An instance stopped 90% of every 100 ms, not leading, one small
    request at a time from one client, the store idle otherwise: it must
    take every pulse (202), not fall into 503s, for 10 s."""
    busy = 1.0
    env = {
        "INGESTOR_STORE": postgres_url,
        "INGESTOR_STORE_BUSY_TIMEOUT": str(busy),
        **QUIET,
    }
    ledger = Ledger()
    log: list[Answered] = []
    async with (
        httpx.AsyncClient(timeout=30.0) as http,
        Cluster(tmp_path, 2, env) as cluster,
    ):
        [leader] = await wait_until(
            lambda: sole_leader(http, cluster.running()), within=15, interval=0.1, what="a leader"
        )
        [slow] = [s for s in cluster if s is not leader]
        assert slow.pid is not None
        slow_pid = slow.pid
        origin = trio.current_time()
        with trio.fail_after(40):
            stop = trio.Event()
            async with throttled(lambda: [slow_pid], stopped=0.9), trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: keep_posting(
                        slow, ledger, log, stop, prefix="follower", day=day_before(1), size=5
                    )
                )
                await trio.sleep(10)
                stop.set()
            await settle_unresolved(http, leader, ledger)
            rows = await collect_pages(http, f"{leader.url}/aggregates", "aggregates", limit=500)
        print(f"\nthrottled follower: {summary(log, origin)}")
        assert ledger.problems() == []
        assert totals_of(rows) == ledger.expected_totals()
        assert wrong_answers(log) == []
        refused = [e for e in log if e.status != 202]
        assert len(log) >= 10, f"only {len(log)} requests answered in 10 s: {summary(log, origin)}"
        assert refused == [], (
            f"{len(refused)} of {len(log)} requests to the throttled, idle-store instance were"
            " not taken: " + "; ".join(e.describe(origin) for e in refused[:5])
        )


# -- 5. --workers 2: a worker restarted inside a throttled container -------------------


async def test_a_worker_restarted_under_a_cpu_quota_comes_up(tmp_path: Path) -> None:
    """README: a stuck worker is killed and restarted, and "a starting worker has
    10 s more" than `worker_timeout`. In a container stopped 95% of every
    100 ms, a worker that died (SIGKILL here) is restarted under the same
    quota: its start is slow, not stuck, and it must come up and serve,
    not be killed as stuck while it imports and opens the store."""
    worker_timeout = 3.0
    server = ServerProcess(
        tmp_path / "data",
        env={
            "INGESTOR_WORKERS": "2",
            "INGESTOR_WORKER_TIMEOUT": str(worker_timeout),
            "INGESTOR_STORE_BUSY_TIMEOUT": "1",
            **QUIET,
        },
    )
    try:
        await server.start()
        assert server.pid is not None
        supervisor = server.pid
        victim, _ = await two_workers_serving(server)
        origin = trio.current_time()
        with trio.fail_after(40):
            async with throttled(group_of(supervisor), stopped=0.95):
                os.kill(victim, signal.SIGKILL)

                async def serving() -> bool:
                    return server.output_of_run().count(" ingestor.service start ") >= 3

                with trio.move_on_after(30):
                    await wait_until(serving, within=30, interval=0.2, what="restarted worker")
                came_up = trio.current_time() - origin
        stuck = [line for line in killed_lines(server) if "stopped answering" in line]
        print(f"\nrestarted worker serving after {came_up:.1f} s; killed as stuck: {stuck}")
        assert stuck == [], (
            f"a worker starting under a CPU quota was killed as stuck (worker_timeout"
            f" {worker_timeout:g} s + 10 s for a start): {stuck}; serving"
            f" {server.output_of_run().count(' ingestor.service start ') - 2} restarted"
            f" worker(s) after {came_up:.1f} s"
        )
        assert server.output_of_run().count(" ingestor.service start ") >= 3, server.tail()
        async with httpx.AsyncClient(timeout=10.0) as http:
            assert (await http.get(f"{server.url}/readyz")).status_code == 200
    finally:
        await stop_workers(server)
