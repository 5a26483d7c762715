"""The configuration changed between restarts, or different at once, on the same data.

An operator edits the TOML file or an INGESTOR_* variable and restarts, or
rolls a change out instance by instance, so for a while two instances on one
PostgreSQL run with different settings. The contract (DESIGN §3) does not
pause meanwhile: every acknowledged pulse counted once, an id idempotent
within its tenant for the dedup window, each unit of usage in exactly one
batch, a bucket's batches adding up to its total. A change the store cannot
honour must be refused at start with a clear message; silently counting
twice, or a crash loop, is a defect.

    partitions        16 -> 4 on one SQLite data dir, at the same restart as
                      durability fsync -> os and a late window of 35 d -> 1 d
                      with an old day open; 4 and 16 at once on PostgreSQL
    time zones        billing_timezone and tenant_timezones changed while a
                      day is committed in the old zone and open in it
    dedup window      shortened for a while (on SQLite between restarts; on
                      PostgreSQL by one instance of two), then a replay: it
                      is refused as older than the store's purge horizon
                      (`Committer.purge`), not counted again
    workers           2 -> 1 on one SQLite data dir, the first run SIGKILLed
                      with deltas still unfolded

Each test held after the fixes its docstring names, or from the start.

Real server processes, a real PostgreSQL (skipped without one, failed under
CI), the file sink read from disk. Every wait is a poll with a deadline.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import zoneinfo
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from ingestor.partition import partition_of
from tests.e2e.cluster_support import alive, child_pids, fresh_database, require_postgres
from tests.support.server import ServerProcess, collect_pages, wait_until

pytestmark = [pytest.mark.e2e]

QUIET = {"INGESTOR_COMMIT_INTERVAL": "3600", "INGESTOR_COMMIT_GRACE": "30d"}
# Ids forgotten 10.5 s after they arrived (a purge horizon waits 10 s in the
# store before ids older than it go), by a purge every 0.1 s.
SHORT_WINDOWS = {
    "INGESTOR_LATE_WINDOW": "0.3s",
    "INGESTOR_DEDUP_WINDOW": "0.3s",
    "INGESTOR_FUTURE_SKEW": "0.2s",
    "INGESTOR_COMMIT_INTERVAL": "0.1s",
}
TENANTS = tuple(f"tenant-{n:02d}" for n in range(12))
SKU, UNIT = "sku-1", "api_call"
Bucket = tuple[str, str, str, str]  # tenant, sku, unit, day
Total = tuple[Decimal, int]


# -- fixtures and helpers -------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30.0) as client:
        yield client


@pytest.fixture
def postgres() -> Iterator[str]:
    """A database of the test's own, dropped afterwards (skip without PostgreSQL)."""
    with fresh_database(require_postgres()) as url:
        yield url


@contextlib.asynccontextmanager
async def running(data_dir: Path, **env: str) -> AsyncIterator[ServerProcess]:
    """One server on `data_dir` with `env` (over a quiet committer); SIGTERMed after,
    and its whole output must hold no traceback."""
    server = ServerProcess(data_dir, env={**QUIET, **env})
    try:
        await server.start()
        yield server
        if server.running:
            await settle(server)
            assert await server.terminate() == 0, server.tail()
    finally:
        await server.aclose()
    assert "Traceback" not in server.output, server.output[-4000:]


@contextlib.asynccontextmanager
async def running_together(
    first: tuple[Path, dict[str, str]], second: tuple[Path, dict[str, str]]
) -> AsyncIterator[tuple[ServerProcess, ServerProcess]]:
    """Two servers, started at the same time (each `(data_dir, env)`), as `running`."""
    a, b = (ServerProcess(path, env={**QUIET, **env}) for path, env in (first, second))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.start)
            nursery.start_soon(b.start)
        yield a, b
        for server in (a, b):
            if server.running:
                await settle(server)
                assert await server.terminate() == 0, server.tail()
    finally:
        await a.aclose()
        await b.aclose()
    for server in (a, b):
        assert "Traceback" not in server.output, server.output[-4000:]


async def settle(server: ServerProcess) -> None:
    """Wait until the outbox has nothing pending. A SIGTERM during a delivery can
    leave the batch taken (leased) though the sink has it, to be sent again
    when the lease ends (25 s, 55 s on PostgreSQL): out of this file's scope,
    and it would only slow these tests."""

    async def idle() -> bool:
        async with httpx.AsyncClient(timeout=30.0) as http:
            response = await http.get(f"{server.url}/batches", params={"status": "pending"})
        assert response.status_code == 200, response.text
        return response.json()["batches"] == []

    await wait_until(idle, within=15, what="nothing pending in the outbox", interval=0.1)


def evening(days_ago: int, minute: int = 0) -> dt.datetime:
    """23:30 UTC (plus `minute` minutes) `days_ago` days before today: another date
    in Asia/Tokyo, the same in America/Los_Angeles."""
    day = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=days_ago)
    return dt.datetime.combine(day, dt.time(23, 30), tzinfo=dt.UTC) + dt.timedelta(minutes=minute)


def pulse(tenant: str, pulse_id: str, amount: int | str, at: dt.datetime) -> dict[str, Any]:
    return {
        "tenant_id": tenant,
        "product_sku": SKU,
        "use_unit": UNIT,
        "used_amount": str(amount),
        "id": pulse_id,
        "timestamp": at.isoformat(),
    }


class Expected:
    """What the server must hold: each accepted pulse once, in the bucket of the day
    the zone in force when it was accepted gave it."""

    def __init__(self) -> None:
        self.totals: dict[Bucket, Total] = {}
        self.ids: dict[tuple[str, str], set[str]] = defaultdict(set)

    def add(self, pulses: Iterable[dict[str, Any]], zone: str = "UTC") -> None:
        for p in pulses:
            at = dt.datetime.fromisoformat(p["timestamp"])
            day = at.astimezone(zoneinfo.ZoneInfo(zone)).date()
            key = (p["tenant_id"], p["product_sku"], p["use_unit"], day.isoformat())
            amount, count = self.totals.get(key, (Decimal(0), 0))
            self.totals[key] = (amount + Decimal(p["used_amount"]), count + 1)
            self.ids[p["tenant_id"], day.isoformat()].add(p["id"])


async def post(
    http: httpx.AsyncClient, url: str, pulses: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    response = await http.post(f"{url}/pulses", json=list(pulses))
    assert response.status_code == 202, response.text
    answer: dict[str, Any] = response.json()
    return answer


def outcome(answer: dict[str, Any]) -> tuple[int, int, int]:
    """(accepted, duplicates, rejected) of a POST /pulses answer."""
    return answer["accepted"], answer["duplicates"], answer["rejected"]


async def totals(http: httpx.AsyncClient, url: str) -> dict[Bucket, Total]:
    rows = await collect_pages(
        http, f"{url}/aggregates", "aggregates", {"status": "all"}, limit=500
    )
    found: dict[Bucket, Total] = {}
    for row in rows:
        key = (row["tenant_id"], row["product_sku"], row["use_unit"], row["date"])
        assert key not in found, f"bucket {key} listed twice"
        found[key] = (Decimal(row["used_amount"]), row["pulse_count"])
    return found


async def open_buckets(http: httpx.AsyncClient, url: str) -> int:
    rows = await collect_pages(
        http, f"{url}/aggregates", "aggregates", {"status": "open"}, limit=500
    )
    return len(rows)


async def commit(http: httpx.AsyncClient, url: str, day: str) -> list[dict[str, Any]]:
    response = await http.post(f"{url}/aggregates/commit", json={"date": day})
    assert response.status_code == 200, response.text
    batches: list[dict[str, Any]] = response.json()["batches"]
    return batches


async def check_audit(http: httpx.AsyncClient, url: str, expected: Expected) -> None:
    """GET /pulses lists each accepted id once, in the day it was counted in."""
    for (tenant, day), ids in sorted(expected.ids.items()):
        rows = await collect_pages(
            http, f"{url}/pulses", "pulses", {"tenant_id": tenant, "date": day}, limit=1000
        )
        listed = Counter(row["id"] for row in rows)
        assert [i for i, n in listed.items() if n > 1] == [], (tenant, day, "listed twice")
        assert set(listed) == ids, (tenant, day, sorted(set(listed) ^ ids))


def delivered(*data_dirs: Path) -> dict[str, dict[str, Any]]:
    """Every batch the file sinks wrote, by id (a batch written by two instances
    must be the same batch)."""
    found: dict[str, dict[str, Any]] = {}
    for data_dir in data_dirs:
        for path in sorted((data_dir / "deliveries").glob("*/*.json")):
            batch = json.loads(path.read_bytes())
            assert found.setdefault(batch["batch_id"], batch) == batch, path
    return found


def check_batches(batches: Iterable[dict[str, Any]], expected: dict[Bucket, Total]) -> None:
    """Each bucket's batch records: revisions 1..n once each, deltas adding up to
    the bucket's total, each record's total the running sum."""
    records: dict[Bucket, list[dict[str, Any]]] = defaultdict(list)
    for batch in batches:
        for record in batch["records"]:
            key = (record["tenant_id"], record["product_sku"], record["use_unit"], batch["date"])
            records[key].append(record)
    assert set(records) == set(expected), sorted(set(records) ^ set(expected))
    for key, found in records.items():
        found.sort(key=lambda r: r["revision"])
        assert [r["revision"] for r in found] == list(range(1, len(found) + 1)), (key, found)
        amount, count = Decimal(0), 0
        for record in found:
            amount += Decimal(record["used_amount"])
            count += record["pulse_count"]
            assert (Decimal(record["total_amount"]), record["total_count"]) == (amount, count)
        assert (amount, count) == expected[key], (key, found)


async def wait_delivered(
    http: httpx.AsyncClient, url: str, count: int | None = None
) -> list[dict[str, Any]]:
    """Wait until the outbox holds `count` batches (some, if None), all delivered."""

    last: list[Any] = []

    async def done() -> list[dict[str, Any]]:
        rows = await collect_pages(http, f"{url}/batches", "batches", limit=500)
        last[:] = [(r["batch_id"], r["status"], r["attempts"], r["last_error"]) for r in rows]
        if count is not None and len(rows) != count:
            return []
        if rows and all(row["status"] == "delivered" for row in rows):
            return rows
        return []

    try:
        return await wait_until(done, within=15, what=f"{count} batches delivered")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; outbox: {last}") from None


# -- partitions -------------------------------------------------------------------------


async def test_sqlite_partitions_durability_and_late_window_changed_at_one_restart(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """Run 1: 16 partitions, the defaults. Run 2 on the same data dir: 4 partitions,
    durability "os", late_window = dedup_window = 1 d, a periodic committer
    (every 0.3 s, grace 1 s), with a day 3 days old still open.

    The README: partitions are "fixed when the store is created (the stored
    value wins afterwards)". So every replay after the change is a duplicate
    (its id looked up where it was stored), totals and the audit trail stay
    exact, and the batches name the partition of 16 each tenant hashes to.
    The shorter late window rejects a replay of the old pulses with a reason
    (not counted, not lost), and the old open day is still committed by the
    periodic committer and delivered once.
    """
    data = tmp_path / "data"
    expected = Expected()
    recent = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    first = [
        pulse(t, f"{t}-a{n}", n + 1, recent + dt.timedelta(minutes=n))
        for t in TENANTS
        for n in range(3)
    ]
    old = [pulse(t, f"{t}-old", 5, evening(3)) for t in TENANTS[:6]]
    old_day = evening(3).date().isoformat()
    async with running(data, INGESTOR_PARTITIONS="16") as server:
        assert outcome(await post(http, server.url, first)) == (36, 0, 0)
        assert outcome(await post(http, server.url, old)) == (6, 0, 0)
        expected.add(first)
        made = [
            b
            for day in {k[3] for k in expected.totals}
            for b in await commit(http, server.url, day)
        ]
        assert len(made) > 0
        expected.add(old)

    second = [pulse(t, f"{t}-b", "0.5", recent + dt.timedelta(minutes=5)) for t in TENANTS]
    async with running(
        data,
        INGESTOR_PARTITIONS="4",
        INGESTOR_DURABILITY="os",
        INGESTOR_LATE_WINDOW="1d",
        INGESTOR_DEDUP_WINDOW="1d",
        INGESTOR_COMMIT_INTERVAL="0.3",
        INGESTOR_COMMIT_GRACE="1s",
    ) as server:
        assert "partitions=16" in server.output_of_run()
        assert outcome(await post(http, server.url, first)) == (0, 36, 0)
        answer = await post(http, server.url, old)
        assert outcome(answer) == (0, 0, 6), answer
        assert {item["status"] for item in answer["items"]} == {"rejected"}
        assert outcome(await post(http, server.url, second)) == (12, 0, 0)
        assert outcome(await post(http, server.url, first + second)) == (0, 48, 0)
        expected.add(second)
        assert await totals(http, server.url) == expected.totals
        await check_audit(http, server.url, expected)

        async def old_day_committed() -> bool:
            rows = await collect_pages(
                http,
                f"{server.url}/aggregates",
                "aggregates",
                {"status": "open", "from": old_day, "to": old_day},
                limit=500,
            )
            return rows == []

        await wait_until(old_day_committed, within=10, what="the old open day committed")
        for day in sorted({k[3] for k in expected.totals} - {old_day}):
            await commit(http, server.url, day)
        assert await open_buckets(http, server.url) == 0
        await wait_delivered(http, server.url)

    batches = delivered(data)
    check_batches(batches.values(), expected.totals)
    for batch in batches.values():
        assert f"-p{batch['partition']:03d}-" in batch["batch_id"]
        for record in batch["records"]:
            assert partition_of(record["tenant_id"], 16) == batch["partition"], batch


async def test_postgres_instances_with_different_partitions_share_one_dedup(
    tmp_path: Path, http: httpx.AsyncClient, postgres: str
) -> None:
    """Two instances on one database at once, configured with 4 and 16 partitions.

    The store's count (4, from the instance that created it) must win in both:
    an id stored through one is a duplicate through the other, also when both
    take it at the same moment, and the totals and batches are exact.
    """
    expected = Expected()
    first = [pulse(t, f"{t}-a{n}", n + 1, evening(2, n)) for t in TENANTS for n in range(2)]
    raced = [pulse(t, f"{t}-race", 3, evening(2, 20)) for t in TENANTS]
    day = evening(2).date().isoformat()
    async with (
        running(tmp_path / "a", INGESTOR_STORE=postgres, INGESTOR_PARTITIONS="4") as a,
        running(tmp_path / "b", INGESTOR_STORE=postgres, INGESTOR_PARTITIONS="16") as b,
    ):
        assert "partitions=4" in b.output_of_run()
        assert outcome(await post(http, a.url, first)) == (24, 0, 0)
        expected.add(first)
        assert outcome(await post(http, b.url, first)) == (0, 24, 0)
        answers: list[tuple[int, int, int]] = []

        async def send(url: str) -> None:
            answers.append(outcome(await post(http, url, raced)))

        async with trio.open_nursery() as nursery:
            for url in (a.url, b.url, a.url, b.url):
                nursery.start_soon(send, url)
        assert sum(x[0] for x in answers) == 12, answers
        assert sum(x[1] for x in answers) == 36, answers
        expected.add(raced)
        assert await totals(http, a.url) == expected.totals
        assert await totals(http, b.url) == expected.totals
        await check_audit(http, b.url, expected)
        made = await commit(http, b.url, day)
        assert await commit(http, a.url, day) == []
        late = [pulse(t, f"{t}-late", 1, evening(2, 25)) for t in TENANTS]
        assert outcome(await post(http, a.url, late)) == (12, 0, 0)
        expected.add(late)
        assert await totals(http, b.url) == expected.totals
        made += await commit(http, a.url, day)
        assert await commit(http, b.url, day) == []
        outbox = await wait_delivered(http, a.url, len(made))
    batches = delivered(tmp_path / "a", tmp_path / "b")
    assert set(batches) == {b["batch_id"] for b in outbox} == {b["batch_id"] for b in made}
    check_batches(batches.values(), expected.totals)
    assert {b["partition"] for b in batches.values()} <= set(range(4))


# -- time zones -------------------------------------------------------------------------


async def test_billing_timezone_changed_with_days_committed_and_open(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """UTC -> Asia/Tokyo (one tenant in America/Los_Angeles), on one data dir.

    Pulses at 23:30 UTC fall on day D in UTC and D+1 in Tokyo. A day committed
    and a day still open in the old zone, then replays and new pulses in the
    new one: a replay is a duplicate whatever day the new zone gives it, each
    new pulse counts once in its new day, and the periodic committer of the
    new run commits every day left open, in either zone (none is never
    delivered, none twice), each bucket's batches adding up to its total.
    """
    data = tmp_path / "data"
    expected = Expected()
    tenants = TENANTS[:4]
    d = evening(3).date()  # D+1 has ended in Los Angeles too: every day is due
    committed = [pulse(t, f"{t}-a{n}", n + 1, evening(3, n)) for t in tenants for n in range(3)]
    still_open = [pulse(t, f"{t}-b", 10, evening(3, 10)) for t in tenants]
    async with running(data) as server:
        assert outcome(await post(http, server.url, committed)) == (12, 0, 0)
        expected.add(committed)
        assert len(await commit(http, server.url, d.isoformat())) > 0
        assert outcome(await post(http, server.url, still_open)) == (4, 0, 0)
        expected.add(still_open)

    config = (
        'billing_timezone = "Asia/Tokyo"\n'
        f'[tenant_timezones]\n"{tenants[3]}" = "America/Los_Angeles"\n'
    )
    tokyo = [pulse(t, f"{t}-c", "0.25", evening(3, 15)) for t in tenants[:3]]
    pacific = [pulse(tenants[3], f"{tenants[3]}-c", "0.25", evening(3, 15))]
    server = ServerProcess(
        data, env={"INGESTOR_COMMIT_INTERVAL": "0.3", "INGESTOR_COMMIT_GRACE": "1s"}, config=config
    )
    async with server:
        answer = await post(http, server.url, committed + still_open)
        assert outcome(answer) == (0, 16, 0), answer
        assert outcome(await post(http, server.url, tokyo + pacific)) == (4, 0, 0)
        expected.add(tokyo, "Asia/Tokyo")
        expected.add(pacific, "America/Los_Angeles")
        assert await totals(http, server.url) == expected.totals
        await check_audit(http, server.url, expected)

        async def all_committed() -> bool:
            return await open_buckets(http, server.url) == 0

        await wait_until(all_committed, within=10, what="every open day committed")
        await wait_delivered(http, server.url)
        answer = await post(http, server.url, committed + still_open + tokyo + pacific)
        assert outcome(answer) == (0, 20, 0), answer
        assert await totals(http, server.url) == expected.totals
        await settle(server)
        assert await server.terminate() == 0
    assert "Traceback" not in server.output
    check_batches(delivered(data).values(), expected.totals)


# -- late and dedup windows ------------------------------------------------------------


async def _wait_forgotten(http: httpx.AsyncClient, url: str, tenant: str, day: str) -> None:
    """Wait until the purge has taken the tenant's pulses of `day` out of GET /pulses."""

    async def gone() -> bool:
        response = await http.get(f"{url}/pulses", params={"tenant_id": tenant, "date": day})
        assert response.status_code == 200, response.text
        return response.json()["pulses"] == []

    await wait_until(gone, within=30, what=f"{tenant}'s pulses of {day} purged", interval=0.1)


async def test_sqlite_dedup_window_shortened_for_a_while_then_replay_is_not_counted_again(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """Defaults -> a run with late_window = dedup_window = 0.3 s -> defaults again.

    The contract (DESIGN §3.2, README): a pulse with an id is counted once per
    (tenant, id) for the dedup window, 35 days by default. In the last run the
    window is 35 days again, and the pulses' timestamps (1 h old) are inside
    it, but the short run's purge forgot their ids for good. Before the fix,
    their replay was accepted and counted a second time (10 pulses and 55
    units became 20 pulses and 110 units). Now the store keeps its purge
    horizon, and a pulse stamped before it is refused as too old to be told
    from a replay."""
    data = tmp_path / "data"
    at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    sent = [pulse("tenant-x", f"x-{n}", n + 1, at) for n in range(10)]
    async with running(data) as server:
        assert outcome(await post(http, server.url, sent)) == (10, 0, 0)
        before = await totals(http, server.url)
    assert list(before.values()) == [(Decimal(55), 10)]
    async with running(
        data,
        **SHORT_WINDOWS,
    ) as server:
        await _wait_forgotten(http, server.url, "tenant-x", at.date().isoformat())
        assert await totals(http, server.url) == before  # the purge keeps the amounts
    async with running(data) as server:
        answer = await post(http, server.url, sent)
        after = await totals(http, server.url)
    assert (outcome(answer), after) == ((0, 0, 10), before), (
        f"replay after the ids were purged: {outcome(answer)} (accepted, duplicates,"
        f" rejected); totals {before} -> {after}"
    )


async def test_postgres_instance_with_a_short_dedup_window_does_not_make_another_count_twice(
    tmp_path: Path, http: httpx.AsyncClient, postgres: str
) -> None:
    """Two instances on one database at once: A with late_window = dedup_window = 0.3 s
    (it leads the periodic committer, and so runs the purge), B with the defaults.

    B promises its clients that an id is idempotent for 35 days (DESIGN §3.2).
    A's purge deletes the ids B took seconds ago, by A's own window. Before
    the fix, a replay to B was then accepted and counted twice (10 pulses and
    55 units became 20 and 110). Now A announces its purge horizon in the
    store 10 s before it forgets anything older; B reads the horizon every few
    seconds and refuses older pulses."""
    at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    sent = [pulse("tenant-y", f"y-{n}", n + 1, at) for n in range(10)]
    async with running_together(
        (tmp_path / "a", {"INGESTOR_STORE": postgres, **SHORT_WINDOWS}),
        (tmp_path / "b", {"INGESTOR_STORE": postgres}),
    ) as (a, b):
        first = outcome(await post(http, b.url, sent))
        before = await totals(http, b.url)
        # Taken, or refused at once if B has already read A's horizon: A forgets
        # an id half a second after its pulse came, and B cannot tell a replay
        # of a pulse stamped before then (300 s of future_skew later).
        assert (first, list(before.values())) in (
            ((10, 0, 0), [(Decimal(55), 10)]),
            ((0, 0, 10), []),
        )
        await _wait_forgotten(http, b.url, "tenant-y", at.date().isoformat())
        answer = await post(http, b.url, sent)
        after = await totals(http, b.url)
        assert a.running
    assert (outcome(answer), after) == ((0, 0, 10), before), (
        f"replay to B after A purged: {outcome(answer)} (accepted, duplicates, rejected);"
        f" totals {before} -> {after}"
    )


# -- workers ------------------------------------------------------------------------------


async def _kill_group(server: ServerProcess) -> None:
    """SIGKILL the supervisor and every worker at once."""
    assert server.pid is not None
    victims = child_pids(server.pid, marker="spawn_main")
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    await server.kill()

    async def gone() -> bool:
        return not any(alive(pid) for pid in victims)

    await wait_until(gone, within=10, what="every worker gone")


async def _serving(server: ServerProcess, workers: int) -> None:
    async def ready() -> bool:
        assert server.pid is not None
        if workers == 1:  # served by the process itself
            return True
        started = server.output_of_run().count(" ingestor.service start ")
        return len(child_pids(server.pid, marker="spawn_main")) == workers and started >= workers

    await wait_until(ready, within=20, what=f"{workers} workers serving")


async def test_sqlite_workers_count_changed_between_crashes(tmp_path: Path) -> None:
    """--workers 2 -> 1 on one data dir; the first run SIGKILLed (supervisor and
    workers) right after its last acknowledgement, so deltas are left unfolded
    in the log for a worker count that shares the partitions out differently
    (`SQLiteStore.open`: worker i keeps the deltas of partitions i mod n).

    Each run: replays of every earlier pulse are duplicates on every worker,
    totals and the audit trail are exact; at the end one commit puts each
    unit in exactly one batch.
    """
    data = tmp_path / "data"
    expected = Expected()
    sent: list[dict[str, Any]] = []
    for run, workers in enumerate((2, 1)):
        server = ServerProcess(data, env={**QUIET, "INGESTOR_WORKERS": str(workers)})
        try:
            await server.start()
            await _serving(server, workers)
            fresh = [pulse(t, f"{t}-r{run}", run + 1, evening(2, run)) for t in TENANTS]
            # A connection per request, so the kernel spreads them over the workers.
            for chunk in (sent[i : i + 6] for i in range(0, len(sent), 6)):
                async with httpx.AsyncClient(timeout=30.0) as http:
                    answer = await post(http, server.url, chunk)
                assert outcome(answer) == (0, len(chunk), 0), (run, answer)
            for chunk in (fresh[i : i + 3] for i in range(0, len(fresh), 3)):
                async with httpx.AsyncClient(timeout=30.0) as http:
                    assert outcome(await post(http, server.url, chunk)) == (len(chunk), 0, 0)
            sent += fresh
            expected.add(fresh)
            async with httpx.AsyncClient(timeout=30.0) as http:
                assert await totals(http, server.url) == expected.totals, run
                await check_audit(http, server.url, expected)
                if run == 1:
                    made = await commit(http, server.url, evening(2).date().isoformat())
                    await wait_delivered(http, server.url, len(made))
                    assert await server.terminate() == 0
                    break
                # Taken after the read, so still unfolded at the kill.
                extra = [p | {"id": p["id"] + "+"} for p in fresh[:4]]
                for one in extra:
                    assert outcome(await post(http, server.url, [one])) == (1, 0, 0)
                sent += extra
                expected.add(extra)
            await _kill_group(server)
        finally:
            if server.running:
                await _kill_group(server)
        assert "Traceback" not in server.output, server.output[-4000:]
    check_batches(delivered(data).values(), expected.totals)
