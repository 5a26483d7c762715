"""Both stores side by side, one worker and two, in one run.

    .venv/bin/python bench/stores.py [--runs 3] [--duration 5] [--postgres URL]

For SQLite and PostgreSQL, with 1 and 2 worker processes: 1,000-pulse JSON
arrays with and without new ids (16 connections) and single-pulse POSTs (64
connections), durability fsync. The kernel spreads connections across
workers by a hash of their addresses: of 4, all land on one worker one time
in eight and three on one half the time; 16 leave each worker enough to
stay busy whichever way they fall. One worker is pinned to one core; two
workers get both cores, which they share with wrk (this machine has two),
so the 2-worker figures understate what two free cores give. A local
PostgreSQL shares them too: its processes' CPU a pulse is reported beside
the server's. Every run starts on a fresh data dir or a fresh PostgreSQL
database.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h

SCENARIOS = [
    ("array1000-ids", "array", 1000, True, 16),
    ("array1000-noids", "array", 1000, False, 16),
    ("single-ids", "single", 1, True, 64),
]
CONFIGS = [("sqlite", 1), ("sqlite", 2), ("postgresql", 1), ("postgresql", 2)]


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    name = f"bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextmanager
def store_env(store: str, admin_url: str) -> Iterator[dict[str, str]]:
    if store == "sqlite":
        yield {}
        return
    with fresh_database(admin_url) as url:
        yield {"INGESTOR_STORE": url}


def postgres_cpu_seconds() -> float:
    """CPU time of this machine's PostgreSQL processes: every backend's, and the
    postmaster's children that have exited. 0 where there is none (a remote server)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() not in {"postgres", "postmaster"}:
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / tick


def one_run(
    store: str, workers: int, scenario: tuple[str, str, int, bool, int], options: argparse.Namespace
) -> tuple[float, float, float]:
    """Pulses/s, and the CPU µs per pulse of the server (every worker's) and of
    PostgreSQL (its local processes'; 0 for SQLite)."""
    name, kind, count, ids, connections = scenario
    logs = Path(options.logs)
    logs.mkdir(parents=True, exist_ok=True)
    with h.scratch_dir(None, name) as scratch, store_env(store, options.postgres) as env:
        server = h.service_server(
            scratch / "data",
            logs / f"stores-{store}-{workers}-{name}.log",
            workers=workers,
            extra_env=env,
            cpus=h.SERVER_CPU if workers == 1 else "0,1",
        )
        with h.running(server):
            h.warm_up(server.port, True)
            before, started = postgres_cpu_seconds(), time.perf_counter()
            result = h.measure(
                server, options.wrk, h.Load.pulses(kind, count, ids, connections), options.duration
            )
            database = (postgres_cpu_seconds() - before) / (time.perf_counter() - started)
    if result["non_2xx"] or result["socket_errors"]:
        print(f"  {store}/{workers} {name}: {result['statuses']} {result['first_error']}")
    rate = float(result["pulses_per_s"])
    if not rate:
        return rate, float("nan"), float("nan")
    database = database if store == "postgresql" else 0.0
    return rate, float(result["server_cpu"]) / rate * 1e6, database / rate * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--logs", default=str(h.ROOT / "bench" / "results" / "stores-logs"))
    parser.add_argument("--stores", default="sqlite,postgresql", help="which stores to run")
    parser.add_argument("--scenarios", default=",".join(s[0] for s in SCENARIOS))
    options = parser.parse_args()
    options.wrk = h.ensure_wrk()
    rows = []
    stores = options.stores.split(",")
    for name, *_ in SCENARIOS:
        if name not in options.scenarios.split(","):
            continue
        for store, workers in CONFIGS:
            if store not in stores:
                continue
            scenario = next(s for s in SCENARIOS if s[0] == name)
            runs = [one_run(store, workers, scenario, options) for _ in range(options.runs)]
            rates = [rate for rate, _, _ in runs]
            cpu = statistics.median(cost for _, cost, _ in runs)
            database = statistics.median(cost for _, _, cost in runs)
            median = statistics.median(rates)
            rows.append((name, store, workers, median, min(rates), max(rates), cpu, database))
            print(
                f"{name} {store} x{workers}: {median:,.0f} pulses/s, {cpu:.2f} CPU us a pulse"
                f" (PostgreSQL {database:.2f})",
                flush=True,
            )
    print(
        "\n| scenario | store | workers | pulses/s (median) | min-max | vs 1 worker"
        " | server CPU µs a pulse (median) | PostgreSQL CPU µs a pulse |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    single = {(row[0], row[1]): row[3] for row in rows if row[2] == 1}
    for name, store, workers, med, low, high, cpu, database in rows:
        ratio = med / single[(name, store)]
        spread = f"{low:,.0f}-{high:,.0f}"
        db = f"{database:.2f}" if store == "postgresql" else "-"
        print(
            f"| {name} | {store} | {workers} | {med:,.0f} | {spread} | {ratio:.2f}x"
            f" | {cpu:.2f} | {db} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
