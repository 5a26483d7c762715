"""Scenario 7, a corrupted or foreign store file: refuse to start, touch nothing.

A real store (two partitions, a few hundred pulses, one committed and
delivered day) is made once and copied for each case; then one file is
damaged or swapped:

    garbage      p000.sqlite overwritten with random bytes
    foreign      p000.sqlite is another application's SQLite database
    missing      p001.sqlite deleted
    empty        p001.sqlite truncated to zero bytes
    other-store  p001.sqlite taken from another store (same name, other id)
    bad-meta     meta.sqlite overwritten with random bytes

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
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two real stores, made once for every case: (the one to damage, another one)."""
    root = tmp_path_factory.mktemp("stores")

    async def make() -> None:
        await _make_store(root / "ours", 1)
        await _make_store(root / "theirs", 2)

    trio.run(make)
    return root / "ours", root / "theirs"


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


CASES: dict[str, tuple[str, Callable[[Path, Path], None], str]] = {
    "garbage": ("p000.sqlite", lambda p, _: _garbage(p), "cannot be read"),
    "foreign": ("p000.sqlite", lambda p, _: _foreign(p), "not a billing-ingestor store"),
    "missing": ("p001.sqlite", lambda p, _: p.unlink(), "missing"),
    "empty": ("p001.sqlite", lambda p, _: p.write_bytes(b""), "not a billing-ingestor store"),
    "other-store": (
        "p001.sqlite",
        lambda p, other: shutil.copyfile(other / p.name, p),
        "another store",
    ),
    "bad-meta": ("meta.sqlite", lambda p, _: _garbage(p), "cannot be read"),
}


def _snapshot(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("case", list(CASES))
async def test_a_damaged_or_foreign_store_file_stops_the_start_and_is_left_alone(
    case: str, stores: tuple[Path, Path], tmp_path: Path, report: Report
) -> None:
    ours, theirs = stores
    data_dir = tmp_path / "data"
    shutil.copytree(ours, data_dir)
    name, damage, reason = CASES[case]
    damaged = data_dir / "store" / name
    damage(damaged, theirs / "store")
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
