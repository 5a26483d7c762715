"""Both stores side by side, one worker and two, in one run.

    .venv/bin/python bench/stores.py [--runs 3] [--duration 5] [--postgres URL]
    .venv/bin/python bench/stores.py --stores sqlite --scenarios array1000-noids --connections 64

For SQLite and PostgreSQL, with 1 and 2 worker processes: 1,000-pulse JSON
arrays with and without new ids (16 connections) and single-pulse POSTs (64
connections), durability fsync. `array1000-randomids`, run only when named,
gives each pulse an id of random digits, as a client making UUIDs would,
instead of a client's prefix and a counter: such ids land all over the
store's id index.

The kernel spreads connections across workers by a hash of their
addresses: of 4, all land on one worker one time in eight and three on one
half the time; 16 leave each worker enough to stay busy whichever way they
fall. One worker is pinned to one core; two workers get both cores, which
they share with wrk (this machine has two), so the 2-worker figures
understate what two free cores give. The table's "ceiling" is what two
workers would reach against one if they took every cycle wrk leaves and
each pulse cost them what it costs one worker: (2 - wrk's CPU) / (one
worker's CPU). A local PostgreSQL shares the cores too: its processes' CPU
a pulse is reported beside the server's. Every run starts on a fresh data
dir or a fresh PostgreSQL database.

`sqlite-apart` measures what the machine itself allows two workers: two
single-worker servers, each on a store of its own and free to run on
either core, each loaded by a wrk of its own with half the connections, at
the same time. Nothing is shared but the machine, so its ratio to one
worker is the most two workers sharing one store could reach here.
"""

from __future__ import annotations

import argparse
import os
import resource
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h

# name, body shape, pulses a request, ids (None, "counter" or "random"), connections
SCENARIOS = [
    ("array1000-ids", "array", 1000, "counter", 16),
    ("array1000-noids", "array", 1000, None, 16),
    ("single-ids", "single", 1, "counter", 64),
    ("array1000-randomids", "array", 1000, "random", 16),
]
DEFAULT_SCENARIOS = ["array1000-ids", "array1000-noids", "single-ids"]
CONFIGS = [
    ("sqlite", 1),
    ("sqlite", 2),
    ("sqlite-apart", 2),
    ("postgresql", 1),
    ("postgresql", 2),
]


class Row(NamedTuple):
    """A scenario's runs on one store and worker count: medians, and the rates' spread."""

    name: str
    store: str
    workers: int
    rate: float
    low: float
    high: float
    cpu: float
    database: float
    server_cpu: float
    load_cpu: float


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


class Run(NamedTuple):
    rate: float  # pulses/s
    cpu: float  # the server's CPU µs a pulse, every worker's
    database: float  # CPU µs a pulse of the local PostgreSQL's processes; 0 for SQLite
    server_cpu: float  # the server's CPU seconds a second
    load_cpu: float  # wrk's


def one_run(
    store: str,
    workers: int,
    scenario: tuple[str, str, int, str | None, int],
    options: argparse.Namespace,
) -> Run:
    name, kind, count, ids, connections = scenario
    connections = options.connections or connections
    logs = Path(options.logs)
    logs.mkdir(parents=True, exist_ok=True)
    if store == "sqlite-apart":
        return apart_run(scenario, connections, logs, options)
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
            load = h.Load.pulses(
                kind, count, ids is not None, connections, random_ids=ids == "random"
            )
            result = h.measure(server, options.wrk, load, options.duration)
            database = (postgres_cpu_seconds() - before) / (time.perf_counter() - started)
    if result["non_2xx"] or _socket_errors(result["socket_errors"]):
        print(f"  {store}/{workers} {name}: {result['statuses']} {result['first_error']}")
    rate = float(result["pulses_per_s"])
    server_cpu, load_cpu = float(result["server_cpu"]), float(result["load_cpu"])
    if not rate:
        return Run(rate, float("nan"), float("nan"), server_cpu, load_cpu)
    database = database if store == "postgresql" else 0.0
    return Run(rate, server_cpu / rate * 1e6, database / rate * 1e6, server_cpu, load_cpu)


def _socket_errors(errors: dict[str, int]) -> int:
    """wrk's count of connections that failed (its "status" errors are non-2xx answers)."""
    return sum(count for kind, count in errors.items() if kind != "status")


def apart_run(
    scenario: tuple[str, str, int, str | None, int],
    connections: int,
    logs: Path,
    options: argparse.Namespace,
) -> Run:
    """Two single-worker servers on stores of their own, loaded at once (see the
    module docstring); their rates and CPU added up."""
    name, kind, count, ids, _ = scenario
    with ExitStack() as stack:
        servers = []
        for n in range(2):
            scratch = stack.enter_context(h.scratch_dir(None, f"{name}-apart{n}"))
            server = h.service_server(
                scratch / "data", logs / f"stores-sqlite-apart{n}-{name}.log", cpus="0,1"
            )
            servers.append(stack.enter_context(h.running(server)))
        for server in servers:
            h.warm_up(server.port, True)
        load = h.Load.pulses(
            kind, count, ids is not None, connections // 2, random_ids=ids == "random"
        )
        results: list[dict[str, Any]] = [{}, {}]

        def drive(n: int) -> None:
            results[n] = h.run_load(options.wrk, servers[n].port, load, options.duration)

        cpu_before = [server.cpu_seconds() for server in servers]
        load_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        threads = [threading.Thread(target=drive, args=(n,)) for n in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        load_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = sum(s.cpu_seconds() - before for s, before in zip(servers, cpu_before, strict=True))
    rate = 0.0
    seconds = max(result["duration_us"] for result in results) / 1e6
    for result in results:
        ok = sum(int(v) for k, v in result["statuses"].items() if k.startswith("2"))
        if ok < result["requests"] or _socket_errors(result["errors"]):
            print(f"  sqlite-apart {name}: {result['statuses']} {result.get('first_error')}")
        rate += ok * count / (result["duration_us"] / 1e6)
    load_cpu = (
        load_after.ru_utime + load_after.ru_stime - load_before.ru_utime - load_before.ru_stime
    ) / seconds
    server_cpu = cpu / seconds
    return Run(rate, server_cpu / rate * 1e6 if rate else float("nan"), 0.0, server_cpu, load_cpu)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--logs", default=str(h.ROOT / "bench" / "results" / "stores-logs"))
    parser.add_argument(
        "--stores", default="sqlite,sqlite-apart,postgresql", help="which stores to run"
    )
    parser.add_argument(
        "--scenarios", default=",".join(DEFAULT_SCENARIOS), help=f"of {[s[0] for s in SCENARIOS]}"
    )
    parser.add_argument(
        "--connections", type=int, default=0, help="for every scenario (default: its own)"
    )
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
            rates = [run.rate for run in runs]
            row = Row(
                name,
                store,
                workers,
                statistics.median(rates),
                min(rates),
                max(rates),
                *(
                    statistics.median(getattr(run, field) for run in runs)
                    for field in ("cpu", "database", "server_cpu", "load_cpu")
                ),
            )
            rows.append(row)
            print(
                f"{name} {store} x{workers}: {row.rate:,.0f} pulses/s, {row.cpu:.2f} CPU us a"
                f" pulse (PostgreSQL {row.database:.2f}), server CPU {row.server_cpu:.2f},"
                f" wrk {row.load_cpu:.2f}",
                flush=True,
            )
    print(
        "\n| scenario | store | workers | pulses/s (median) | min-max | vs 1 worker | ceiling"
        " | server CPU µs a pulse (median) | PostgreSQL CPU µs a pulse | server / wrk CPU |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    single = {(row.name, row.store): row for row in rows if row.workers == 1}
    for row in rows:
        one = single.get((row.name, row.store.removesuffix("-apart")))
        ratio = f"{row.rate / one.rate:.2f}x" if one else "-"
        # What wrk leaves of the two cores, over what one worker used.
        ceiling = f"{(2 - row.load_cpu) / one.server_cpu:.2f}x" if one and row.workers == 2 else "-"
        db = f"{row.database:.2f}" if row.store == "postgresql" else "-"
        print(
            f"| {row.name} | {row.store} | {row.workers} | {row.rate:,.0f}"
            f" | {row.low:,.0f}-{row.high:,.0f} | {ratio} | {ceiling} | {row.cpu:.2f} | {db}"
            f" | {row.server_cpu:.2f} / {row.load_cpu:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
