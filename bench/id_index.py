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

Then the layout that would replace it, sorted runs (`--run`, 20,000): one
table keyed by (run, id_key), so that each run, written in key order under
a run number above every other, appends to the B-tree instead of landing
all over it. The --ids random ids are written as one run, then 400,000 new
ones as runs of --run ids; 8 of those runs are compacted into one (copied
in key order under a new number, the old ones deleted); and 1,000 absent
keys are looked up in 1, 4 and 16 runs, a statement a run and a seek a
run a key, as a layout without filters would.

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

from ingestor.store.sqlite import _insert_ids

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
    """Insert `keys`, sorted, with log row `seq`, as the store's merge does."""
    conn.execute("BEGIN IMMEDIATE")
    _insert_ids(conn, [value for key in keys for value in (key, seq)])
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


def _write_run(conn: sqlite3.Connection, run: int, keys: list[str]) -> None:
    """Run `run`: `keys`, sorted, in one transaction, 250 rows a statement."""
    one = "INSERT INTO id_runs (run, id_key, seq) VALUES (?, ?, ?)"
    many = one + ", (?, ?, ?)" * 249
    whole = len(keys) - len(keys) % 250
    conn.execute("BEGIN IMMEDIATE")
    for start in range(0, whole, 250):
        batch = keys[start : start + 250]
        conn.execute(many, [value for key in batch for value in (run, key, run)])
    conn.executemany(one, [(run, key, run) for key in keys[whole:]])
    conn.execute("COMMIT")


def sorted_runs(path: Path, ids: int, run_size: int) -> None:
    conn = _connect(path)
    conn.execute(
        "CREATE TABLE id_runs (run INTEGER NOT NULL, id_key TEXT NOT NULL, seq INTEGER NOT NULL,"
        " PRIMARY KEY (run, id_key)) STRICT, WITHOUT ROWID"
    )
    every = sorted(_keys(ids))
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, ids, 100_000):  # one run, written in key order
        _write_run(conn, 0, every[start : start + 100_000])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(
        f"runs    {ids:,} ids as one run: "
        f"{wall / ids * 1e6:5.1f} µs/id wall, {cpu / ids * 1e6:5.1f} µs/id CPU"
    )
    batches = [sorted(_keys(run_size)) for _ in range(max(1, 400_000 // run_size))]
    wall, cpu = time.perf_counter(), time.process_time()
    for run, batch in enumerate(batches, start=1):
        _write_run(conn, run, batch)
    count = sum(len(b) for b in batches)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(
        f"runs    {run_size:>7,} new ids a run, beside {ids:,}: "
        f"{wall / count * 1e6:5.1f} µs/id wall, {cpu / count * 1e6:5.1f} µs/id CPU"
    )
    fanin = min(8, len(batches))
    wall, cpu = time.perf_counter(), time.process_time()
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(
        "INSERT INTO id_runs (run, id_key, seq) SELECT ?, id_key, seq FROM id_runs"
        " WHERE run BETWEEN 1 AND ? ORDER BY id_key",
        (len(batches) + 1, fanin),
    )
    conn.execute("DELETE FROM id_runs WHERE run BETWEEN 1 AND ?", (fanin,))
    conn.execute("COMMIT")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    moved = fanin * run_size
    print(
        f"runs    {fanin} runs of {run_size:,} compacted into one: "
        f"{wall / moved * 1e6:5.1f} µs/id wall, {cpu / moved * 1e6:5.1f} µs/id CPU"
    )
    live = [run for (run,) in conn.execute("SELECT DISTINCT run FROM id_runs ORDER BY run")]
    for count_of in (1, 4, 16):
        runs = live[:count_of]
        for _ in range(2):  # the second round is the one to read: caches are warm
            spent = 0.0
            for _ in range(100):
                keys = _keys(1_000)
                started = time.perf_counter()
                found = [
                    row
                    for run in runs
                    for row in conn.execute(
                        # CROSS: keys outside, each a seek; SQLite would scan the run
                        "SELECT i.id_key FROM json_each(?) AS k"
                        " CROSS JOIN id_runs AS i ON i.run = ? AND i.id_key = k.value",
                        (_encode(keys), run),
                    )
                ]
                spent += time.perf_counter() - started
                assert not found
        print(f"lookup  in {len(runs):>2} runs: {spent / 100_000 * 1e6:5.2f} µs/id")
    conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=1_000_000)
    parser.add_argument("--merges", default="5000,20000,80000")
    parser.add_argument(
        "--slices", type=int, default=20_000, help="the store's planned merge, run in slices"
    )
    parser.add_argument("--run", type=int, default=20_000, help="ids a sorted run")
    parser.add_argument("--dir", help="where the scratch files go (default: a temp dir)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=options.dir) as scratch:
        directory = Path(scratch)
        sizes = [int(size) for size in options.merges.split(",")]
        merges(directory / "merges.sqlite", options.ids, sizes)
        merges(directory / "merges.sqlite", options.ids, [5_000], options.slices)
        lookups(directory, options.ids)
        sorted_runs(directory / "runs.sqlite", options.ids, options.run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
