"""Scenario 3, downstream outage: the http sink's target fails three ways, then recovers.

Eight clients ingest all along. The target (a server in this test) answers
500, then accepts requests and never answers (the sink times out after
0.5 s), then refuses connections. In each phase the test commits what was
stored so far and waits until GET /batches shows the new batches pending
with an attempt made and the phase's error recorded, and until the clients
got a few hundred more pulses acknowledged: ingestion does not depend on the
downstream. Then the target recovers; every batch arrives, each id always
with the same bytes, and the batches add up to the totals.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.faults.conftest import Report, StartServer
from tests.faults.harness import Load, PulseFactory, audit, commit_days
from tests.faults.sink_target import Mode, SinkTarget
from tests.support.server import Ledger, collect_pages, wait_until

SECRET = "outage-secret"
PHASES: list[tuple[Mode, str]] = [
    ("error", "HTTP 500"),
    ("hang", "timed out"),
    ("refuse", "ConnectError"),
]


async def pending_with(
    http: httpx.AsyncClient, url: str, made: list[dict[str, Any]], error: str
) -> list[dict[str, Any]] | None:
    """The batches `made` if every one is pending, tried, and failed with `error`."""
    ids = {batch["batch_id"] for batch in made}
    rows = await collect_pages(http, f"{url}/batches", "batches", {"status": "pending"}, limit=1000)
    failing = [
        row
        for row in rows
        if row["batch_id"] in ids and row["attempts"] >= 1 and error in (row["last_error"] or "")
    ]
    return failing if len(failing) == len(ids) else None


async def test_ingestion_carries_on_through_a_downstream_outage_and_every_batch_arrives(
    start_server: StartServer, tmp_path: Path, report: Report
) -> None:
    target = SinkTarget(SECRET)
    async with trio.open_nursery() as background:
        await background.start(target.run)
        server = await start_server(
            tmp_path / "data",
            INGESTOR_SINK=target.url,
            INGESTOR_SINK_SECRET=SECRET,
            INGESTOR_SINK_TIMEOUT="0.5",
            INGESTOR_RETRY_INITIAL="0.05",
            INGESTOR_RETRY_MAX="0.3",
            INGESTOR_BATCH_MAX_RECORDS="4",
        )
        ledger = Ledger()
        load = Load(server, ledger, PulseFactory(prefix="outage"), clients=8, seed=3)
        seen_pending: dict[str, int] = {}
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load.run)
                async with httpx.AsyncClient(timeout=30.0) as http:
                    for mode, error in PHASES:
                        target.set_mode(mode)
                        confirmed = len(target.confirmed())
                        await load.flowing(100, what=f"{mode}: before the commit")
                        days = {ledger.day_of(a) for a in ledger.attempts}
                        made = await commit_days(http, server.url, days)
                        assert made, f"{mode}: the commit made no batch"

                        shown = await wait_until(
                            partial(pending_with, http, server.url, made, error),
                            within=20,
                            what=f"{mode}: every new batch pending with {error!r}",
                        )
                        seen_pending[mode] = len(shown)
                        await load.flowing(300, what=f"{mode}: ingestion during the outage")
                        assert len(target.confirmed()) == confirmed, f"{mode}: a batch got through"
                target.set_mode("ok")
                load.stop()
        counts = await audit(server, ledger, delivered=target.bodies)
        background.cancel_scope.cancel()

    assert load.problems == [], load.problems[:10]
    assert all(d.signature_ok for d in target.received)
    assert set(target.confirmed()) == set(target.bodies())
    counts.redelivered = len(target.received) - len(target.bodies())
    counts.extra["pending batches seen per phase"] = seen_pending
    report(counts.line("downstream outage"))
