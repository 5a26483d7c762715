"""Scenario 1, crash loop: ten kill -9 at random moments of a mixed load.

Twelve clients send single pulses, JSON arrays and NDJSON bodies, most
pulses with an id and some without. Ten times the server is SIGKILLed at a
random moment and restarted on the same data dir;
right after each restart, before anything is resent, every acknowledged
pulse must be there. The clients resend every pulse with an id that got no
answer (same id, same payload) until it is answered; a pulse without an id
whose answer was lost is not resent (that could count it twice) and its fate
is read from GET /pulses. Then the audit: each acknowledged pulse counted
once, nothing else, and the delivered batches add up to the totals.

Three setups: one process (durability fsync), one process with durability
"os" (which promises to survive a process crash), and two worker processes
on one store, all killed at once (see SETUPS).

(tests/e2e/test_crash.py kills five times under a load of id-bearing arrays;
this one adds pulses without ids, NDJSON, durability os, two workers, twice
the cycles and the delivery check.)
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
from pathlib import Path

import pytest
import trio

from tests.faults.conftest import Report, StartServer
from tests.faults.harness import Load, PulseFactory, audit, check_bounds
from tests.support.server import Ledger, ServerProcess

CYCLES = 10
CLIENTS = 12

# (settings, largest array, pulses acknowledged between two kills)
SETUPS = {
    "one process": ({"INGESTOR_DURABILITY": "fsync"}, 40, 300),
    # durability = "os" promises to survive a process crash (not power loss).
    "durability os": ({"INGESTOR_DURABILITY": "os"}, 40, 300),
    # Two worker processes on a two-partition store, every process killed at
    # once: the ids' in-memory tier of each process (merged into the index
    # every 20,000 ids, 5,000 per transaction) is crashed and rebuilt again
    # and again,
    # and a resend may reach the other process than the first attempt.
    "two workers": (
        {"INGESTOR_DURABILITY": "fsync", "INGESTOR_WORKERS": "2", "INGESTOR_PARTITIONS": "2"},
        400,
        6_000,
    ),
}


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (children, grandchildren...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


async def kill_all(server: ServerProcess) -> int:
    """SIGKILL the server and every process it started, as a power cut would."""
    assert server.pid is not None
    for child in descendants(server.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    return await server.kill()


@pytest.mark.parametrize("setup", list(SETUPS))
async def test_ten_kills_under_mixed_load_lose_nothing_and_count_once(
    setup: str, start_server: StartServer, tmp_path: Path, report: Report
) -> None:
    env, max_array, per_cycle = SETUPS[setup]
    server = await start_server(tmp_path / "data", **env)
    ledger = Ledger()
    load = Load(
        server,
        ledger,
        PulseFactory(prefix="loop", id_share=0.75, max_array=max_array),
        clients=CLIENTS,
        seed=1,
    )
    moments = random.Random(4)
    in_flight_at_kill: list[int] = []
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load.run)
            for cycle in range(CYCLES):
                await load.flowing(per_cycle, what=f"cycle {cycle}")
                await trio.sleep(moments.uniform(0.0, 0.25))  # the random moment of the kill
                load.down()
                in_flight_at_kill.append(load.in_flight)
                assert await kill_all(server) == -9
                await server.start()
                await check_bounds(server, ledger)
                load.up.set()
            load.stop()

    assert load.problems == [], load.problems[:10]
    assert sum(in_flight_at_kill) > 0, "no kill hit a request in flight: the test proved nothing"
    counts = await audit(server, ledger)
    counts.extra["kills"] = CYCLES
    counts.extra["in flight at the kills"] = in_flight_at_kill
    resent = sum(1 for a in ledger.attempts if a.answer == "no answer")
    counts.extra["answers lost"] = resent
    assert resent > 0, "no answer was lost to a kill"
    merged = merged_watermarks(server.data_dir / "store")
    counts.extra["ids merged into the index up to log row"] = merged
    if setup == "two workers":
        assert all(merged), "no partition merged its recent ids: the merge path never ran"
    report(counts.line(f"crash loop ({setup})"))


def merged_watermarks(store: Path) -> list[int]:
    """Each partition's `ids_merged_seq/<n>` (0: its in-memory ids were never merged)."""
    conn = sqlite3.connect(f"file:{store / 'store.sqlite'}?mode=ro", uri=True)
    try:
        marks = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    finally:
        conn.close()
    return [int(marks.get(f"ids_merged_seq/{n}", 0)) for n in range(int(marks["partitions"]))]
