"""The batching client (ingestor.client) against single-pulse POSTs: pulses/s, same server.

    .venv/bin/python bench/client_bench.py                    # starts its own server
    .venv/bin/python bench/client_bench.py --url http://127.0.0.1:8081
    .venv/bin/python bench/client_bench.py --pulses 500000 --durability os --runs 5

Scenarios, run in turn (round robin) --runs times each:

    client     one thread calls `Client.record()` --pulses times, then `flush()`;
               timed from the first record() to flush()'s return, so every
               pulse is acknowledged (durably) when the clock stops
    post-1     one thread POSTs one pulse per request (httpx.Client, keep-alive)
    post-T     --threads threads do the same, each with its own httpx.Client;
               --posts requests in all

Every pulse carries an id (the client makes one; the POST loops number
theirs) and a timestamp, so the server does the same work per pulse in each
scenario. The table shows the median pulses/s, the min-max, and the ratio to
post-1. The server runs pinned to core 1 (`taskset`, as bench/run.py does)
and this process to core 0, when there are two cores. At the end the pulses
stored (GET /aggregates) are compared with those acknowledged.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import harness as h
import httpx
import msgspec

from ingestor.client import Client

TENANTS = 100
SKUS = 10


@dataclass
class Scenario:
    name: str
    pulses: int
    run: Callable[[str, str], tuple[float, float | None]]  # (url, tag) -> (seconds, record s)
    rates: list[float] = field(default_factory=list)
    record_rates: list[float] = field(default_factory=list)


def client_loop(pulses: int) -> Callable[[str, str], tuple[float, float | None]]:
    def run(url: str, tag: str) -> tuple[float, float | None]:
        tenants = [f"{tag}-{n}" for n in range(TENANTS)]
        skus = [f"sku{n}" for n in range(SKUS)]
        with Client(url) as client:
            started = time.perf_counter()
            for i in range(pulses):
                client.record(tenants[i % TENANTS], skus[i % SKUS], "api_call", 1)
            recorded = time.perf_counter()
            failures = client.flush()
            elapsed = time.perf_counter() - started
            stats = client.statistics()
        if failures or stats.accepted != pulses:
            raise RuntimeError(f"client: {stats}; failures: {failures[:3]}")
        return elapsed, recorded - started

    return run


def post_loop(posts: int, threads: int) -> Callable[[str, str], tuple[float, float | None]]:
    def run(url: str, tag: str) -> tuple[float, float | None]:
        errors: list[str] = []
        gate = threading.Barrier(threads + 1)

        def work(worker: int) -> None:
            encode = msgspec.json.Encoder().encode
            with httpx.Client(timeout=30) as http:
                gate.wait()
                for i in range(worker, posts, threads):
                    body = encode(
                        {
                            "tenant_id": f"{tag}-{i % TENANTS}",
                            "product_sku": f"sku{i % SKUS}",
                            "use_unit": "api_call",
                            "used_amount": "1",
                            "id": f"{tag}-{i}",
                            "timestamp": dt.datetime.now(dt.UTC).isoformat(),
                        }
                    )
                    response = http.post(
                        f"{url}/pulses", content=body, headers={"Content-Type": "application/json"}
                    )
                    if response.status_code != 202:
                        errors.append(f"{response.status_code} {response.text[:200]}")

        pool = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
        for thread in pool:
            thread.start()
        gate.wait()
        started = time.perf_counter()
        for thread in pool:
            thread.join()
        elapsed = time.perf_counter() - started
        if errors:
            raise RuntimeError(f"{len(errors)} POSTs failed; first: {errors[0]}")
        return elapsed, None

    return run


def stored(url: str) -> int:
    """Pulses the server holds, over every bucket (the warm-up tenant left out)."""
    total, cursor = 0, None
    with httpx.Client(timeout=120) as http:
        while True:
            params = {"limit": "10000", **({"cursor": cursor} if cursor else {})}
            page = http.get(f"{url}/aggregates", params=params).raise_for_status().json()
            rows = page["aggregates"]
            total += sum(int(r["pulse_count"]) for r in rows if r["tenant_id"] != "warmup")
            cursor = page["next_cursor"]
            if not cursor:
                return total


@contextmanager
def server_at(url: str | None, durability: str) -> Iterator[str]:
    if url is not None:
        yield url.rstrip("/")
        return
    with h.scratch_dir(None, "client") as scratch:
        server = h.service_server(scratch / "data", scratch / "server.log", durability=durability)
        with h.running(server):
            h.warm_up(server.port, ids=True)
            yield f"http://127.0.0.1:{server.port}"


def spread(values: list[float]) -> str:
    return f"{min(values):,.0f}-{max(values):,.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an ingestor already running (default: start one)")
    parser.add_argument("--durability", choices=["fsync", "os"], default="fsync")
    parser.add_argument("--pulses", type=int, default=200_000, help="pulses per client run")
    parser.add_argument("--posts", type=int, default=2_000, help="requests per POST run")
    parser.add_argument("--threads", type=int, default=4, help="threads of post-T")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jsonl", type=Path, help="append one JSON line per scenario here")
    options = parser.parse_args(argv)

    pinned = options.url is None and h.pinning_available()
    if pinned:
        os.sched_setaffinity(0, {int(h.LOAD_CPU)})
    scenarios = [
        Scenario("client (1 thread)", options.pulses, client_loop(options.pulses)),
        Scenario("post-1 (1 thread)", options.posts, post_loop(options.posts, 1)),
        Scenario(
            f"post-{options.threads} ({options.threads} threads)",
            options.posts,
            post_loop(options.posts, options.threads),
        ),
    ]
    with server_at(options.url, options.durability) as url:
        before = stored(url)
        for run in range(options.runs):
            for scenario in scenarios:
                seconds, recording = scenario.run(url, f"cb{secrets.token_hex(4)}")
                scenario.rates.append(scenario.pulses / seconds)
                if recording is not None:
                    scenario.record_rates.append(scenario.pulses / recording)
                print(
                    f"run {run + 1}: {scenario.name}: {scenario.pulses / seconds:,.0f} pulses/s",
                    file=sys.stderr,
                )
        held = stored(url) - before
    sent = sum(s.pulses * options.runs for s in scenarios)

    where = (
        f"server at {options.url}"
        if options.url
        else f"own server, durability={options.durability}"
    )
    print(f"\nclient bench: {where}; pinned={pinned}; median of {options.runs} runs\n")
    baseline = statistics.median(scenarios[1].rates)
    header = ("scenario", "pulses/run", "pulses/s", "min-max", "vs post-1")
    print("| {:<22} | {:>10} | {:>10} | {:>17} | {:>9} |".format(*header))
    print(f"|{'-' * 24}|{'-' * 11}:|{'-' * 11}:|{'-' * 18}:|{'-' * 10}:|")
    for scenario in scenarios:
        rate = statistics.median(scenario.rates)
        print(
            f"| {scenario.name:<22} | {scenario.pulses:>10,} | {rate:>10,.0f} |"
            f" {spread(scenario.rates):>17} | {rate / baseline:>8.1f}x |"
        )
    record_rate = statistics.median(scenarios[0].record_rates)
    print(
        f"\nthe record() loop before flush(): {record_rate:,.0f} calls/s (median; record()"
        " blocks while max_buffered = 100,000 pulses are unsettled, so a run longer than"
        " that goes at the server's pace)"
    )
    verdict = "ok" if held == sent else ("LOST" if held < sent else "more than sent")
    print(f"stored {held:,} of {sent:,} pulses acknowledged: {verdict}")

    if options.jsonl is not None:
        with options.jsonl.open("a") as out:
            for scenario in scenarios:
                record = {"scenario": scenario.name, "pulses": scenario.pulses,
                          "rates": scenario.rates, "median": statistics.median(scenario.rates),
                          "durability": options.durability, "pinned": pinned}  # fmt: skip
                out.write(json.dumps(record) + "\n")
    return 0 if held == sent else 1


if __name__ == "__main__":
    sys.exit(main())
