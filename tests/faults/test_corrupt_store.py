"""Scenario 7, a corrupted or foreign store file: refuse to start, touch nothing.

A real store (two partitions, a few hundred pulses, one committed and
delivered day) is made once and copied for each case; then its file is
damaged or swapped:

    garbage         store.sqlite overwritten with random bytes
    foreign         store.sqlite is another application's SQLite database
    empty           store.sqlite truncated to zero bytes
    earlier-layout  store.sqlite replaced by the meta.sqlite of schema version 1

The server must exit non-zero before it is ready, with a message that names
the file (not a traceback), and every file of the store must be byte for
byte what it was, none removed. (Reading a WAL-mode file read-only, SQLite
may create its -shm/-wal companions; those are reported, not failed.)
"""

from __future__ import annotations

import hashlib
import random
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio

from tests.faults.conftest import Report
from tests.faults.harness import PulseFactory, commit_days, ingest, wait_all_delivered
from tests.support.server import Ledger, ServerError, ServerProcess


async def _make_store(data_dir: Path, seed: int) -> None:
    server = ServerProcess(data_dir, env={"INGESTOR_PARTITIONS": "2"})
    async with server:
        ledger = Ledger()
        rng = random.Random(seed)
        pulses = PulseFactory(prefix=f"store{seed}")
        await ingest(server, ledger, [pulses.pulse(rng) for _ in range(300)])
        async with httpx.AsyncClient(timeout=30.0) as http:
            await commit_days(http, server.url, {ledger.day_of(a) for a in ledger.attempts})
            await wait_all_delivered(http, server.url)
        assert await server.terminate() == 0


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real store, made once for every case."""
    root = tmp_path_factory.mktemp("stores")
    trio.run(_make_store, root / "ours", 1)
    return root / "ours"


def _garbage(path: Path) -> None:
    path.write_bytes(random.Random(7).randbytes(3 * 4096))


def _foreign(path: Path) -> None:
    path.unlink()
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT);"
        "INSERT INTO users (name) VALUES ('ada'), ('grace');"
    )
    conn.close()


def _earlier_layout(path: Path) -> None:
    path.unlink()
    _garbage(path.parent / "meta.sqlite")  # a store of schema version 1 has this instead


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "garbage": (_garbage, "cannot be read"),
    "foreign": (_foreign, "not a billing-ingestor store"),
    "empty": (lambda p: p.write_bytes(b""), "not a billing-ingestor store"),
    "earlier-layout": (_earlier_layout, "schema version 1"),
}


def _snapshot(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("case", list(CASES))
async def test_a_damaged_or_foreign_store_file_stops_the_start_and_is_left_alone(
    case: str, store: Path, tmp_path: Path, report: Report
) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(store, data_dir)
    damage, reason = CASES[case]
    damaged = data_dir / "store" / "store.sqlite"
    damage(damaged)
    before = _snapshot(data_dir / "store")

    server = ServerProcess(data_dir, ready_timeout=20)
    try:
        with pytest.raises(ServerError, match="before it was ready"):
            await server.start()
    finally:
        await server.aclose()
    output = server.output_of_run()
    assert server.exit_codes[-1] not in (0, None), output
    assert str(damaged) in output, f"the message does not name {damaged}:\n{output}"
    assert reason in output, output
    assert "Traceback" not in output, output
    after = _snapshot(data_dir / "store")
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    assert changed == [], f"the server changed or removed store files: {changed}"
    # SQLite's own companions of a WAL-mode file it read; the file itself is intact.
    created = sorted(set(after) - set(before))
    assert all(name.endswith(("-shm", "-wal")) for name in created), created
    message = next(line for line in output.splitlines() if str(damaged) in line)
    report(
        f"corrupt store ({case}): exit {server.exit_codes[-1]}, files unchanged"
        f"{f' (SQLite created {created})' if created else ''}; {message.strip()}"
    )
