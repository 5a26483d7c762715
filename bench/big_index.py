"""New ids into a store whose id index already holds millions: sustained, not a burst.

    .venv/bin/python bench/big_index.py                          # 4,000,000 random ids, 60 s
    .venv/bin/python bench/big_index.py --ids 1000000 --counter --duration 30

The other scenarios start on an empty store and run for seconds: the id
index stays small enough for SQLite's page cache, and the bench's ids (a
prefix and a counter) land on a few of its pages. A store that has run for
days with clients sending random ids (UUIDs) holds millions of them, spread
over every page. This fills a store's `pulse_ids` with --ids random ids
(written into the file directly, in sorted batches: minutes of the server's
time otherwise), then loads the server with 1,000-pulse arrays of new ids
(random digits, or with --counter a prefix and a counter) for --duration
seconds at --connections, long enough for the merges of recent ids into the
index to run many times over: what is measured is the pace they allow, and
the memory they hold. Prints pulses/s, the server's CPU a pulse, latency,
and its RSS every 5 s.

With --keep DIR the filled store is made in DIR once, and reused by later
runs; without, it goes with the run's scratch directory.
"""

from __future__ import annotations

import argparse
import random
import secrets
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import harness as h

BATCH = 200_000


def make_store(directory: Path, ids: int) -> None:
    """A store made by the server, its `pulse_ids` then filled with `ids` random
    ids of the bench's tenants (as lua/pulses.lua makes them with IDS=random)."""
    directory.mkdir(parents=True, exist_ok=True)
    server = h.service_server(directory / "data", directory / "make.log")
    with h.running(server):
        h.warm_up(server.port, True)
    conn = sqlite3.connect(directory / "data" / "store" / "store.sqlite", isolation_level=None)
    try:
        for start in range(0, ids, BATCH):
            keys = sorted(
                f"t{random.randint(1, h.TENANTS)}\x1f{secrets.token_hex(16)}"
                for _ in range(min(BATCH, ids - start))
            )
            conn.execute("BEGIN IMMEDIATE")
            # seq 1: never read, since no id of the load is among them
            conn.executemany(
                "INSERT OR IGNORE INTO pulse_ids (id_key, fingerprint, seq) VALUES (?, x'', 1)",
                [(key,) for key in keys],
            )
            conn.execute(
                "UPDATE meta SET value = (SELECT count(*) FROM pulse_ids) WHERE key = 'ids_indexed'"
            )
            conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def run(template: Path, scratch: Path, options: argparse.Namespace) -> dict[str, Any]:
    data = scratch / "data"
    shutil.rmtree(data, ignore_errors=True)
    shutil.copytree(template / "data", data)
    server = h.service_server(data, scratch / "server.log")
    with h.running(server):
        h.warm_up(server.port, True)
        load = h.Load.pulses(
            "array", 1000, True, options.connections, random_ids=not options.counter
        )
        found: dict[str, Any] = {}
        wrk = h.ensure_wrk()
        loading = threading.Thread(
            target=lambda: found.update(h.measure(server, wrk, load, options.duration))
        )
        loading.start()
        rss = [h.rss_kib(server.pid) // 1024]
        while loading.is_alive():
            loading.join(5)
            rss.append(h.rss_kib(server.pid) // 1024)
    found["rss_mib"] = rss
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=4_000_000, help="random ids indexed first")
    parser.add_argument("--duration", type=int, default=60)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--counter", action="store_true", help="ids of a prefix and a counter")
    parser.add_argument("--keep", help="directory of a filled store to reuse, or to fill")
    options = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-big-index-"))
    template = Path(options.keep) if options.keep else scratch / "template"
    try:
        if not (template / "data").exists():
            started = time.perf_counter()
            make_store(template, options.ids)
            print(f"filled: {options.ids:,} ids in {time.perf_counter() - started:.0f} s")
        for number in range(options.runs):
            found = run(template, scratch, options)
            rate = found["pulses_per_s"]
            cpu = found["server_cpu"] / rate * 1e6 if rate else float("nan")
            latency = found["latency_ms"]
            print(
                f"run {number + 1}: {rate:,.0f} pulses/s, {cpu:.2f} CPU µs a pulse,"
                f" p50 / p99 {latency['p50']:.0f} / {latency['p99']:.0f} ms,"
                f" answers {found['statuses']}, RSS MiB every 5 s {found['rss_mib']}",
                flush=True,
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
