"""Instances on one PostgreSQL whose wall clocks disagree (DESIGN §3, §6).

One machine's NTP is broken: its instance reads a wall clock seconds, minutes
or days away from the others', and uses it for the billing day of pulses
without a timestamp, the late window, when a day is due, delivery leases and
the purge horizon. Each test runs real servers on one fresh database, the
skewed ones under libfaketime (`LD_PRELOAD`, `FAKETIME="+120s"`, with
`FAKETIME_DONT_FAKE_MONOTONIC=1` so trio's monotonic clock stays true), and
first checks that the skew reached the server (its HTTP `Date` header).

Each instance once decided all of these by its own clock; the only clock
requirement the README stated was the delivery lease's 30 s of slack. A
machine whose clock is minutes or a day off is what a broken NTP gives, so
these tests hold the money promises (§3.2 once per id within the dedup
window, §3.4 every unit in exactly one batch, each batch delivered) at such
skews. Every instance now keeps the database's clock (`clock.SharedClock`).

1. A batch claimed by one instance is not sent again by another while the
   first still sends it: 20 s, 2 min ahead, 10 min behind. Raw POSTs are
   counted, not distinct Idempotency-Keys: one sender at a time is the
   promise, and two concurrent POSTs of one batch are what a receiver's
   "seen this key?" check races on.
2. A leader whose clock is ahead purges: an id stored by another instance is
   still recognised when retried seconds later, well within the dedup window.
3. Instances two days apart: every pulse falls on the store's day, the
   leader does not commit it early, commits by hand through each instance
   make exact corrections, every batch reaches the sink, and retries to
   instances on other clocks are duplicates.
4. Retries to a receiver that fails back off exponentially, also when the
   instances taking turns at them read different clocks.

PostgreSQL and libfaketime (Debian: `apt-get install faketime`) must be
there; without them the tests skip, or fail when the CI variable is set.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.e2e.cluster_support import (
    fresh_database,
    libfaketimes,
    metrics,
    require_postgres,
    unavailable,
)
from tests.e2e.conftest import ABORTED_UPLOADS
from tests.faults.sink_target import SinkTarget
from tests.support.server import (
    Ledger,
    ServerProcess,
    collect_pages,
    outbox_problems,
    send_pulses,
    totals_of,
    wait_until,
)

pytestmark = [pytest.mark.e2e, *ABORTED_UPLOADS]

SECRET = "clock-skew-secret"


# -- the environment ---------------------------------------------------------------


@cache
def _libfaketime() -> str | None:
    """The path of a libfaketime that really moves a child's wall clock, or None."""
    found = libfaketimes()
    for path in found:
        env = {**os.environ, **_faked(path, 3600)}
        try:
            told = subprocess.run(
                [sys.executable, "-c", "import time; print(time.time() - time.monotonic())"],
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        offset = float(told) - (time.time() - time.monotonic())
        if abs(offset - 3600) < 5:
            return path
    return None


def _faked(library: str, seconds: int) -> dict[str, str]:
    preload = " ".join(p for p in (library, os.environ.get("LD_PRELOAD", "")) if p)
    return {
        "LD_PRELOAD": preload,
        "FAKETIME": f"{seconds:+d}s",
        # trio's deadlines must not jump with the wall clock.
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def skewed(env: Mapping[str, str], seconds: int) -> dict[str, str]:
    """`env` for a server whose wall clock is `seconds` ahead (negative: behind)."""
    library = _libfaketime()
    if library is None:
        unavailable("libfaketime is not installed or does not work (apt-get install -y faketime)")
    return {**env, **_faked(library, seconds)}


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with fresh_database(require_postgres()) as url:
        yield url


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30.0) as client:
        yield client


@pytest.fixture
async def target() -> AsyncIterator[SinkTarget]:
    """The billing side: an HTTP receiver that keeps every POST it gets."""
    receiver = SinkTarget(SECRET)
    async with trio.open_nursery() as nursery:
        await nursery.start(receiver.run)
        yield receiver
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def running(*servers: ServerProcess) -> AsyncIterator[None]:
    """Start `servers` together; kill them at the end and fail on a logged traceback."""
    try:
        async with trio.open_nursery() as nursery:
            for server in servers:
                nursery.start_soon(server.start)
        yield
    finally:
        for server in servers:
            await server.aclose()
    for server in servers:
        assert "Traceback" not in server.output, f"{server.data_dir.name}:\n{server.output[-4000:]}"


async def check_clock(http: httpx.AsyncClient, server: ServerProcess, seconds: int) -> None:
    """The server's wall clock (its Date header) is `seconds` from ours: the skew took."""
    response = await http.get(f"{server.url}/healthz")
    told = email.utils.parsedate_to_datetime(response.headers["date"])
    offset = (told - dt.datetime.now(dt.UTC)).total_seconds()
    assert abs(offset - seconds) < 3, (
        f"{server.data_dir.name} runs {offset:+.0f} s from the test's clock, not {seconds:+d} s"
    )


async def leads(http: httpx.AsyncClient, server: ServerProcess) -> bool:
    return (await metrics(http, server))["ingestor_committer_leading"] == 1


def steady_and_skewed(
    postgres_url: str, target: SinkTarget, tmp_path: Path, skew: int
) -> tuple[ServerProcess, ServerProcess]:
    """Two instances on the store delivering to `target`, the second `skew` s off.
    Nothing is due for the periodic committer: the test commits, on the first."""
    env = {
        "INGESTOR_STORE": postgres_url,
        "INGESTOR_SINK": target.url,
        "INGESTOR_SINK_SECRET": SECRET,
        "INGESTOR_COMMIT_GRACE": "3d",
    }
    return (
        ServerProcess(tmp_path / "steady", env=env),
        ServerProcess(tmp_path / "other", env=skewed(env, skew)),
    )


def today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


# -- 1. delivery leases ------------------------------------------------------------


@pytest.mark.parametrize("skew", [20, 120, -600], ids=["20s-ahead", "2min-ahead", "10min-behind"])
async def test_a_batch_one_instance_is_sending_is_not_sent_again_by_another(
    skew: int, postgres_url: str, http: httpx.AsyncClient, target: SinkTarget, tmp_path: Path
) -> None:
    """The receiver takes 3 s to confirm. Pulses for yesterday, committed on the
    instance with the true clock, which is woken by its commit and claims every
    batch first; the other instance, `skew` seconds off, polls the outbox every
    second meanwhile. Every batch must reach the receiver, each in one POST.

    Lease arithmetic (sink_timeout 10 s): a claim sets the next attempt 55 s
    (25 s lease + 30 s skew) after the claimer's now; another instance finds
    it due when that is before its own now (an instance more than 55 s ahead)
    or more than 330 s after it (max(retry_max, 55 s) + 30 s: "the clock
    stepped back"; an instance more than 275 s behind)."""
    target.delay = 3.0
    steady, other = steady_and_skewed(postgres_url, target, tmp_path, skew)
    yesterday = (today() - dt.timedelta(days=1)).isoformat()
    payloads = [
        {
            "tenant_id": f"tenant-{n}",
            "product_sku": "sku",
            "use_unit": "call",
            "used_amount": str(n + 1),
            "id": f"p{n}",
            "timestamp": f"{yesterday}T12:00:00Z",
        }
        for n in range(6)
    ]
    overlapping: set[str] = set()  # batches with two POSTs unanswered at once

    async def watch() -> None:
        while True:
            unanswered = Counter(d.batch_id for d in target.received if d.status is None)
            overlapping.update(batch_id for batch_id, n in unanswered.items() if n > 1)
            await trio.sleep(0.02)

    async with running(steady, other), trio.open_nursery() as watching:
        watching.start_soon(watch)
        with trio.fail_after(40):
            await check_clock(http, steady, 0)
            await check_clock(http, other, skew)
            ledger = Ledger()
            sent = await send_pulses(http, steady.url, ledger, payloads)
            assert sent.response is not None, sent.error
            assert sent.response.status_code == 202, sent.response.text
            assert ledger.answers() == Counter({"accepted": len(payloads)})
            response = await http.post(f"{steady.url}/aggregates/commit", json={"date": yesterday})
            assert response.status_code == 200, response.text
            batch_ids = {b["batch_id"] for b in response.json()["batches"]}
            assert batch_ids

            async def all_delivered() -> bool:
                rows = await collect_pages(
                    http, f"{steady.url}/batches", "batches", {"date": yesterday}, limit=100
                )
                return all(row["status"] == "delivered" for row in rows) and target.in_flight == 0

            await wait_until(all_delivered, within=30, interval=0.1, what="every batch delivered")
        watching.cancel_scope.cancel()

    posts = Counter(delivery.batch_id for delivery in target.received)
    assert set(posts) == batch_ids
    assert all(d.signature_ok and d.status == 200 for d in target.received)
    repeated = {batch_id: n for batch_id, n in posts.items() if n > 1}
    assert repeated == {}, (
        f"with one instance {skew:+d} s off, {len(repeated)} of {len(batch_ids)} batches"
        f" reached the receiver more than once ({sorted(repeated.values())} POSTs),"
        f" {len(overlapping & set(repeated))} of them while an earlier POST of the same"
        " batch was still waiting for its answer"
    )


# -- 2. the purge horizon ----------------------------------------------------------


async def test_a_purge_by_a_leader_whose_clock_is_ahead_keeps_the_ids_of_the_dedup_window(
    postgres_url: str, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """dedup_window = late_window = 1 h; the leader's clock is 90 min ahead.
    A pulse with an id and no timestamp is stored through the instance with the
    true clock, then retried there about 15 s later, by when the leader has
    purged (every second, each horizon announced 10 s before use). Within the
    dedup window the retry must be a duplicate, counted once (§3.2).

    Purges forget pulses by `received_at`, stamped by the receiving instance's
    clock, up to a horizon the leader computes from its own: an instance X
    behind the leader has its ids forgotten X - future_skew early. With the
    default 35 d window and a clock a day off, a retry on day 34 counts twice;
    the short window here makes "early" come within seconds."""
    env = {
        "INGESTOR_STORE": postgres_url,
        "INGESTOR_COMMIT_INTERVAL": "1",
        "INGESTOR_LATE_WINDOW": "1h",
        "INGESTOR_DEDUP_WINDOW": "1h",
    }
    ahead = ServerProcess(tmp_path / "ahead", env=skewed(env, 90 * 60))
    steady = ServerProcess(tmp_path / "steady", env=env)
    pulse = {
        "tenant_id": "retrying-tenant",
        "product_sku": "sku",
        "use_unit": "call",
        "used_amount": "7",
        "id": "request-1",
    }
    async with running(ahead):
        await wait_until(lambda: leads(http, ahead), within=10, what="the fast instance leading")
        async with running(steady):
            with trio.fail_after(45):
                await check_clock(http, ahead, 90 * 60)
                await check_clock(http, steady, 0)
                first = await http.post(f"{steady.url}/pulses", json=pulse)
                assert first.status_code == 202, first.text
                assert first.json()["accepted"] == 1, first.text
                [row] = await collect_pages(
                    http,
                    f"{steady.url}/aggregates",
                    "aggregates",
                    {"tenant_id": pulse["tenant_id"]},
                    limit=10,
                )
                day = row["date"]

                async def forgotten() -> bool:
                    rows = await collect_pages(
                        http,
                        f"{steady.url}/pulses",
                        "pulses",
                        {"tenant_id": pulse["tenant_id"], "date": day},
                        limit=10,
                    )
                    return not rows

                # Up to six leader ticks past the 10 s announcement: a store that
                # keeps the id never forgets it, and the retry comes then anyway.
                stored_at = trio.current_time()
                gone = await forgotten()
                while not gone and trio.current_time() < stored_at + 16:
                    await trio.sleep(0.2)
                    gone = await forgotten()
                retried_after = trio.current_time() - stored_at
                retry = await http.post(f"{steady.url}/pulses", json=pulse)
                [after] = await collect_pages(
                    http,
                    f"{steady.url}/aggregates",
                    "aggregates",
                    {"tenant_id": pulse["tenant_id"]},
                    limit=10,
                )
    assert retry.status_code == 202, retry.text
    assert (retry.json()["accepted"], retry.json()["duplicates"]) == (0, 1), (
        f"a retry of id {pulse['id']!r} within the 1 h dedup window was accepted again"
        f" {retried_after:.1f} s after it was stored (the leader, 90 min ahead, had purged"
        f" it: {gone}): {retry.text}"
    )
    assert (after["used_amount"], after["pulse_count"]) == ("7", 1), after


# -- 3. a day committed by a leader that is ahead ------------------------------------


async def test_instances_two_days_apart_keep_one_day_and_exact_corrections(
    postgres_url: str, http: httpx.AsyncClient, target: SinkTarget, tmp_path: Path
) -> None:
    """Three instances: `ahead` (+2 d, the leader), `steady` and `behind` (-1 d).
    Three waves of pulses with ids and no timestamp, each through its tenant's
    own instance and retried through another; after each, the day is committed
    by hand, through each instance in turn. Every pulse falls on the store's
    day, whichever instance took it; the leader's periodic committer leaves
    that day open (it is not over); each wave after the first is a correction.
    Nothing may be lost or counted twice, and every batch must reach the sink.

    Was: each instance stamped pulses with its own day, and the leader, two
    days ahead, committed the others' today on its own, a day before its end.
    """
    env = {
        "INGESTOR_STORE": postgres_url,
        "INGESTOR_COMMIT_INTERVAL": "1",
        "INGESTOR_SINK": target.url,
        "INGESTOR_SINK_SECRET": SECRET,
    }
    offsets = {"ahead": 2 * 86400, "steady": 0, "behind": -86400}
    ahead = ServerProcess(tmp_path / "ahead", env=skewed(env, offsets["ahead"]))
    steady = ServerProcess(tmp_path / "steady", env=env)
    behind = ServerProcess(tmp_path / "behind", env=skewed(env, offsets["behind"]))
    servers = {"ahead": ahead, "steady": steady, "behind": behind}
    tenants = {name: [f"{name}-a", f"{name}-b"] for name in servers}
    ledger = Ledger()  # the day of a pulse without a timestamp: the true clock's
    skus = ("compute", "storage")

    async def open_rows(server: ServerProcess) -> list[dict[str, Any]]:
        return await collect_pages(
            http, f"{server.url}/aggregates", "aggregates", {"status": "open"}, limit=500
        )

    async with running(ahead):
        await wait_until(lambda: leads(http, ahead), within=10, what="the fast instance leading")
        async with running(steady, behind):
            with trio.fail_after(50):
                for name, server in servers.items():
                    await check_clock(http, server, offsets[name])
                names = list(servers)
                for wave in range(3):
                    for n, name in enumerate(names):
                        payloads = [
                            {
                                "tenant_id": tenant,
                                "product_sku": sku,
                                "use_unit": "unit",
                                "used_amount": f"{wave + 1}.{k}{n}",
                                "id": f"w{wave}-{tenant}-{sku}-{k}",
                            }
                            for tenant in tenants[name]
                            for sku in skus
                            for k in range(3)
                        ]
                        for via in (name, names[(n + 1) % 3]):  # stored, then retried
                            sent = await send_pulses(http, servers[via].url, ledger, payloads)
                            assert sent.response is not None, sent.error
                            assert sent.response.status_code == 202, sent.response.text
                    await trio.sleep(2)  # two ticks of the leader's periodic committer
                    for server in servers.values():
                        days = {row["date"] for row in await open_rows(server)}
                        assert days == {today().isoformat()}, (server.url, days)
                    via = servers[names[wave]]
                    response = await http.post(
                        f"{via.url}/aggregates/commit", json={"date": today().isoformat()}
                    )
                    assert response.status_code == 200, response.text

                async def settled() -> list[dict[str, Any]]:
                    if await open_rows(steady):
                        return []
                    rows = await collect_pages(http, f"{steady.url}/batches", "batches", limit=500)
                    done = all(row["status"] == "delivered" for row in rows)
                    return rows if done and target.in_flight == 0 else []

                listed = await wait_until(settled, within=20, interval=0.1, what="all delivered")
                batches = []
                for row in listed:
                    response = await http.get(f"{steady.url}/batches/{row['batch_id']}")
                    assert response.status_code == 200, response.text
                    batches.append(response.json())
                views = {
                    name: totals_of(
                        await collect_pages(
                            http, f"{server.url}/aggregates", "aggregates", limit=500
                        )
                    )
                    for name, server in servers.items()
                }

    answers = ledger.answers()
    assert ledger.problems() == []
    assert set(answers) == {"accepted", "duplicate"}, answers
    assert answers["accepted"] == answers["duplicate"] == 3 * 3 * 2 * 2 * 3, answers
    expected = ledger.expected_totals()
    assert views["steady"] == expected
    assert views["ahead"] == views["behind"] == views["steady"]
    assert outbox_problems(batches, expected) == []
    revisions: dict[str, set[int]] = defaultdict(set)
    for batch in batches:
        for record in batch["records"]:
            owner = record["tenant_id"].rsplit("-", 1)[0]
            revisions[owner].add(int(record["revision"]))
    # One commit a wave: the first, then a correction for each later wave.
    assert revisions == {"ahead": {1, 2, 3}, "steady": {1, 2, 3}, "behind": {1, 2, 3}}
    confirmed = target.confirmed()
    assert set(confirmed) == {b["batch_id"] for b in batches}
    assert all(len(bodies) == 1 for bodies in target.bodies().values())
    print(
        f"\n{len(batches)} batches, {len(target.received)} POSTs to the receiver"
        f" ({len(target.received) - len(confirmed)} repeats)"
    )


# -- 4. backoff ------------------------------------------------------------------------


async def test_retries_to_a_failing_receiver_back_off_when_clocks_differ(
    postgres_url: str, http: httpx.AsyncClient, target: SinkTarget, tmp_path: Path
) -> None:
    """The receiver answers 500 to everything; one instance is 10 min ahead.
    Retries back off exponentially from retry_initial (1 s), jittered down to
    half: attempt n + 1 comes at least 2**(n - 2) s after attempt n, so the
    sixth of a batch comes 15.5 s after its first at the earliest, whichever
    instance makes it (the attempt count is the store's). Within 8 s of the
    commit no batch may get six (with both clocks true: 4 each)."""
    skew = 600
    target.set_mode("error")
    steady, other = steady_and_skewed(postgres_url, target, tmp_path, skew)
    yesterday = (today() - dt.timedelta(days=1)).isoformat()
    payloads = [
        {
            "tenant_id": f"tenant-{n}",
            "product_sku": "sku",
            "use_unit": "call",
            "used_amount": "1",
            "timestamp": f"{yesterday}T12:00:00Z",
        }
        for n in range(3)
    ]
    async with running(steady, other):
        await check_clock(http, other, skew)
        response = await http.post(f"{steady.url}/pulses", json=payloads)
        assert response.status_code == 202, response.text
        response = await http.post(f"{steady.url}/aggregates/commit", json={"date": yesterday})
        assert response.status_code == 200, response.text

        async def six_posts() -> bool:
            return max(Counter(d.batch_id for d in target.received).values(), default=0) >= 6

        with trio.move_on_after(8):  # the window; the poll's own deadline is later
            await wait_until(six_posts, within=9, what="a batch POSTed six times")
    posts = Counter(d.batch_id for d in target.received)
    assert max(posts.values()) < 6, (
        f"with one instance {skew:+d} s off, the failing receiver got {sorted(posts.values())}"
        " POSTs per batch within 8 s: the instances undo each other's backoff"
    )
