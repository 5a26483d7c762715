"""Scenario 2, crash during commit and delivery.

Each cycle stores a few thousand pulses over hundreds of buckets on the last
four days (later cycles add to buckets already committed: corrections), then
commits the four days at once, and kills the server with SIGKILL while the
commits and the deliveries run: at a random moment, or once a random number
of this cycle's batches has reached the sink. Small batches
(batch_max_records = 3) make hundreds of them per cycle.

- File sink: after every restart the delivered files are noted (inode, mtime,
  bytes); in the end each batch is exactly one file, none was ever rewritten,
  no temporary file of a killed write is left, and the files add up to the
  totals.
- Http sink, with a slow target (each answer takes 30 ms): the target sees
  some batch ids more than once (a kill between its answer and the outbox
  update), always with identical, correctly signed content, and in the end
  every batch is confirmed and the batches add up to the totals.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import httpx
import trio

from tests.faults.conftest import Report, StartServer
from tests.faults.harness import (
    PulseFactory,
    audit,
    check_bounds,
    file_deliveries,
    ingest,
)
from tests.faults.sink_target import SinkTarget
from tests.support.server import Ledger, ServerProcess, collect_pages, wait_until

CYCLES = 6
SECRET = "fault-suite-secret"
ENV = {
    "INGESTOR_BATCH_MAX_RECORDS": "3",
    "INGESTOR_RETRY_INITIAL": "0.05",
    "INGESTOR_RETRY_MAX": "0.2",
    # A batch whose sender was killed is sent again when its lease ends
    # (2 x sink_timeout + 5 s): 9 s here, not 25. The receiver answers in 30 ms.
    "INGESTOR_SINK_TIMEOUT": "2",
}


def factory(prefix: str) -> PulseFactory:
    skus = tuple(f"sku-{n}" for n in range(12))
    return PulseFactory(prefix=prefix, skus=skus, id_share=0.8, days=3)


async def commit_until_killed(url: str, days: list[str]) -> int:
    """POST a commit of each day at once; how many were answered before the kill."""
    answered = 0

    async def commit(day: str) -> None:
        nonlocal answered
        async with httpx.AsyncClient(timeout=30.0) as http:
            try:
                response = await http.post(f"{url}/aggregates/commit", json={"date": day})
            except httpx.TransportError:
                return
        assert response.status_code in (200, 503), response.text[:300]
        answered += 1

    async with trio.open_nursery() as nursery:
        for day in days:
            nursery.start_soon(commit, day)
    return answered


async def pending_after_restart(server: ServerProcess) -> tuple[int, int]:
    """(pending batches, open buckets) right after a restart: what the kill cut off."""
    async with httpx.AsyncClient(timeout=30.0) as http:
        batches = await collect_pages(
            http, f"{server.url}/batches", "batches", {"status": "pending"}, limit=1000
        )
        buckets = await collect_pages(
            http, f"{server.url}/aggregates", "aggregates", {"status": "open"}, limit=1000
        )
    return len(batches), len(buckets)


async def crash_cycles(
    server: ServerProcess,
    *,
    ledger: Ledger,
    pulses: PulseFactory,
    progress: Callable[[], int],
    seed: int,
    after_restart: Callable[[], None] | None = None,
) -> list[tuple[int, int]]:
    """Store, commit, kill mid-way, restart, CYCLES times; what each kill cut off.

    `progress` counts what has reached the sink so far; even cycles kill once
    it has grown by a random amount, odd ones at a random moment.
    """
    rng = random.Random(seed)
    cut_off: list[tuple[int, int]] = []
    for cycle in range(CYCLES):
        payloads = [pulses.pulse(rng) for _ in range(2_000)]
        await ingest(server, ledger, payloads)
        days = sorted({ledger.day_of(a) for a in ledger.attempts})
        target = progress() + rng.randint(0, 120)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit_until_killed, server.url, days)
            if cycle % 2:
                await trio.sleep(rng.uniform(0.0, 0.3))  # a random moment of commit + delivery
            else:

                async def reached(target: int = target) -> bool:
                    return progress() >= target

                with trio.move_on_after(10):  # kill anyway if it never gets there
                    await wait_until(reached, within=11, what="deliveries", interval=0.002)
            await server.kill()
        await server.start()
        await check_bounds(server, ledger)
        cut_off.append(await pending_after_restart(server))
        if after_restart is not None:
            after_restart()
    return cut_off


async def test_kills_during_commit_and_file_delivery_deliver_each_batch_once(
    start_server: StartServer, tmp_path: Path, report: Report
) -> None:
    server = await start_server(tmp_path / "data", **ENV)
    ledger = Ledger()
    seen: dict[Path, tuple[int, int, bytes]] = {}

    swept = 0

    def note_files() -> None:
        nonlocal swept
        swept += len(list(server.deliveries.glob("*/.*.tmp")))
        for path in server.deliveries.glob("*/*.json"):
            stat = path.stat()
            if path in seen:
                assert seen[path] == (stat.st_ino, stat.st_mtime_ns, path.read_bytes()), (
                    f"{path} was written again"
                )
            seen[path] = (stat.st_ino, stat.st_mtime_ns, path.read_bytes())

    def progress() -> int:
        return len(file_deliveries(server))

    with trio.fail_after(150):
        cut_off = await crash_cycles(
            server,
            ledger=ledger,
            pulses=factory("file"),
            progress=progress,
            seed=21,
            after_restart=note_files,
        )
        counts = await audit(server, ledger)
    note_files()
    stems = [path.stem for path in server.deliveries.glob("*/*.json")]
    assert len(stems) == len(set(stems)) == counts.batches, "a batch delivered as two files"
    leftovers = [p.name for p in server.deliveries.glob("*/*") if not p.name.endswith(".json")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"
    assert sum(p for p, _ in cut_off) > 0, f"no kill hit a delivery in progress: {cut_off}"
    counts.extra["(pending batches, open buckets) after each kill"] = cut_off
    counts.extra["temporary files seen right after restarts"] = swept
    report(counts.line("crash during commit + file delivery"))


async def test_kills_during_slow_http_delivery_resend_identical_batches(
    start_server: StartServer, tmp_path: Path, report: Report
) -> None:
    target = SinkTarget(SECRET, delay=0.03)
    async with trio.open_nursery() as background:
        await background.start(target.run)
        server = await start_server(
            tmp_path / "data", INGESTOR_SINK=target.url, INGESTOR_SINK_SECRET=SECRET, **ENV
        )
        ledger = Ledger()

        def progress() -> int:
            return len(target.received)

        with trio.fail_after(150):
            cut_off = await crash_cycles(
                server, ledger=ledger, pulses=factory("http"), progress=progress, seed=22
            )
            counts = await audit(server, ledger, delivered=target.bodies)
        background.cancel_scope.cancel()

    assert all(d.signature_ok for d in target.received), "a delivery with a wrong signature"
    confirmed = target.confirmed()
    assert set(confirmed) == set(target.bodies()), "a batch the target never confirmed"
    counts.redelivered = len(target.received) - len(target.bodies())
    assert counts.redelivered > 0, "no batch was sent twice: no kill hit a delivery in flight"
    counts.extra["(pending batches, open buckets) after each kill"] = cut_off
    report(counts.line("crash during commit + slow http delivery"))
