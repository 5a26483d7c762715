"""What SQLite's client-id index costs, alone: merges of sorted ids, and lookups.

    .venv/bin/python bench/id_index.py                       # 1,000,000 ids
    .venv/bin/python bench/id_index.py --ids 3000000 --merges 5000,20000,80000

The table is the store's `pulse_ids` (one text key per id, WITHOUT ROWID,
plus the index by log row), in a WAL file with synchronous = FULL and the
store writer's page cache. It is filled with --ids random ids in sorted
batches of 100,000, then, for each merge size, 400,000 more random ids are
merged in sorted batches of that size, one transaction each: the cost per
id is what the store pays to move its recent ids into the index. Lookups
join 1,000 random keys at a time (none present, as for new ids) through
json_each, as the store does, against the older form keyed by
(tenant_id, pulse_id) and fed pairs through json_extract.

Then the store's way: plans of --slices sorted ids (20,000), each
inserted 5,000 at a time, a transaction per slice: each slice lands on its
own stretch of the index, as densely as the whole plan.

Prints µs per id, wall and CPU, per merge size, and per lookup form.
"""

from __future__ import annotations

import argparse
import random
import secrets
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import msgspec

TENANTS = 100
_encode = msgspec.json.Encoder().encode


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA cache_size = -65536")  # the store writer's cache
    return conn


def _keys(count: int) -> list[str]:
    return [f"t{random.randrange(TENANTS)}\x1f{secrets.token_hex(12)}" for _ in range(count)]


def _merge(conn: sqlite3.Connection, keys: list[str], seq: int) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT OR IGNORE INTO pulse_ids (id_key, fingerprint, seq) VALUES (?, ?, ?)",
        [(key, b"f" * 16, seq) for key in keys],
    )
    conn.execute("COMMIT")


def _single_key_table(path: Path, ids: int) -> sqlite3.Connection:
    conn = _connect(path)
    conn.execute(
        "CREATE TABLE pulse_ids (id_key TEXT PRIMARY KEY, fingerprint BLOB NOT NULL,"
        " seq INTEGER NOT NULL) STRICT, WITHOUT ROWID"
    )
    conn.execute("CREATE INDEX pulse_ids_by_seq ON pulse_ids (seq)")
    for seq in range(ids // 100_000):
        _merge(conn, sorted(_keys(100_000)), seq)
    return conn


def merges(path: Path, ids: int, sizes: list[int], slice_of: int | None = None) -> None:
    """Merges of each size; with `slice_of`, each merge is a sorted plan of that
    many ids, inserted `size` at a time, one transaction a slice, as the store does."""
    for size in sizes:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        conn = _single_key_table(path, ids)
        if slice_of is None:
            batches = [sorted(_keys(size)) for _ in range(max(1, 400_000 // size))]
        else:
            plans = [sorted(_keys(slice_of)) for _ in range(max(1, 400_000 // slice_of))]
            batches = [plan[i : i + size] for plan in plans for i in range(0, slice_of, size)]
        wall, cpu = time.perf_counter(), time.process_time()
        for seq, batch in enumerate(batches, start=1_000_000):
            _merge(conn, batch, seq)
        count = sum(len(b) for b in batches)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        conn.close()
        how = f" (slices of plans of {slice_of:,})" if slice_of else ""
        print(
            f"merge   {size:>7,} ids at a time into {ids:,}{how}: "
            f"{wall / count * 1e6:5.1f} µs/id wall, {cpu / count * 1e6:5.1f} µs/id CPU"
        )


def lookups(directory: Path, ids: int) -> None:
    single = _single_key_table(directory / "single.sqlite", ids)
    pairs = _connect(directory / "pairs.sqlite")
    pairs.execute(
        "CREATE TABLE pulse_ids (tenant_id TEXT NOT NULL, pulse_id TEXT NOT NULL,"
        " fingerprint BLOB NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (tenant_id, pulse_id))"
        " STRICT, WITHOUT ROWID"
    )
    pairs.execute("BEGIN")
    pairs.executemany(
        "INSERT INTO pulse_ids VALUES (?, ?, ?, ?)",
        sorted(
            (*key.split("\x1f"), fingerprint, seq)
            for key, fingerprint, seq in single.execute("SELECT * FROM pulse_ids")
        ),
    )
    pairs.execute("COMMIT")
    forms = {
        "one text key": lambda keys: single.execute(
            "SELECT i.id_key, i.fingerprint FROM json_each(?) AS j"
            " JOIN pulse_ids AS i ON i.id_key = j.value",
            (_encode(keys),),
        ).fetchall(),
        "(tenant, id) pairs": lambda keys: pairs.execute(
            "SELECT i.tenant_id, i.pulse_id, i.fingerprint FROM json_each(?) AS j"
            " JOIN pulse_ids AS i ON i.tenant_id = json_extract(j.value, '$[0]')"
            " AND i.pulse_id = json_extract(j.value, '$[1]')",
            (_encode([key.split("\x1f") for key in keys]),),
        ).fetchall(),
    }
    for _ in range(2):  # the second round is the one to read: caches are warm
        for name, lookup in forms.items():
            spent = 0.0
            for _ in range(100):
                keys = _keys(1_000)
                started = time.perf_counter()
                found = lookup(keys)
                spent += time.perf_counter() - started
                assert not found
            print(f"lookup  {name:<18} among {ids:,}: {spent / 100_000 * 1e6:5.2f} µs/id")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=1_000_000)
    parser.add_argument("--merges", default="5000,20000,80000")
    parser.add_argument(
        "--slices", type=int, default=20_000, help="the store's planned merge, run in slices"
    )
    parser.add_argument("--dir", help="where the scratch files go (default: a temp dir)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=options.dir) as scratch:
        directory = Path(scratch)
        sizes = [int(size) for size in options.merges.split(",")]
        merges(directory / "merges.sqlite", options.ids, sizes)
        merges(directory / "merges.sqlite", options.ids, [5_000], options.slices)
        lookups(directory, options.ids)
    return 0


if __name__ == "__main__":
    sys.exit(main())
