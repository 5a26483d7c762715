"""Soak: a steady load for a long time, to see what drifts (memory, latency, throughput).

    python bench/soak.py [--minutes 10] [--rate R | --share 0.7] [--batch 100] ...
    make soak SOAK_ARGS="--minutes 30"

1. Starts the ingestor (as bench/harness.py does: its own process, pinned to
   core 1 where there are two; this generator pins itself to core 0).
2. Measures capacity, unless --rate is given: `--probe-connections` clients
   send back to back for `--probe-seconds`; capacity is the rate of 202s.
3. Runs an open-loop load at `--share` (default 70%) of that capacity, or at
   `--rate` requests per second, for `--minutes`: requests are scheduled at
   fixed times and latency counts from the scheduled time, so a server that
   falls behind shows as latency (no coordinated omission). A request that
   cannot even be started because every connection is busy counts as "late".
4. Samples the server every `--sample` seconds (RSS from /proc/PID/status,
   CPU seconds) and summarises every `--window` seconds (requests and pulses
   per second, latency percentiles, non-202 answers, RSS).
5. Checks that every acknowledged pulse is stored (sum of GET /aggregates
   pulse counts), stops the server with SIGTERM and records its exit code.

Writes bench/results/soak-<timestamp>.json (everything) and .md (the report:
summary, the RSS trend with its slope over the steady part, and one line per
window), and prints the report's path. Exit code 1 if a pulse was lost, the
server did not exit 0, or RSS still grew faster than --max-growth MiB per
minute over the last third of the run (a cache that fills up levels off by
then; a leak keeps growing).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import random
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import harness as h
import httpx
import msgspec
import trio

RESULTS = h.BENCH / "results"
_encode = msgspec.json.Encoder().encode


@dataclass
class Options:
    minutes: float
    rate: float | None
    share: float
    batch: int
    id_share: float
    connections: int
    probe_connections: int
    probe_seconds: float
    sample: float
    window: float
    durability: str
    workers: int
    data_root: str | None
    max_growth: float
    timeout: float


@dataclass
class Tally:
    """What one window of the load saw."""

    started: float
    latencies_ms: list[float] = field(default_factory=list)
    ok: int = 0
    pulses: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    late: int = 0

    def note(self, status: str) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1


class Bodies:
    """POST /pulses bodies: `batch` pulses over 100 tenants, ids that never repeat."""

    def __init__(self, batch: int, id_share: float, seed: int = 1) -> None:
        self.batch = batch
        self.id_share = id_share
        self.prefix = secrets.token_hex(4)
        self.rng = random.Random(seed)
        self.serial = itertools.count()

    def next(self) -> bytes:
        n = next(self.serial)
        pulses = []
        for k in range(self.batch):
            pulse: dict[str, Any] = {
                "tenant_id": f"t{self.rng.randrange(h.TENANTS)}",
                "product_sku": f"sku{self.rng.randrange(10)}",
                "use_unit": "api_call" if k % 2 else "gb_hour",
                "used_amount": self.rng.randrange(1, 10**6),
            }
            if self.rng.random() < self.id_share:
                pulse["id"] = f"{self.prefix}-{n}-{k}"
            pulses.append(pulse)
        return _encode(pulses)


def percentile(ordered: list[float], share: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) points, in MiB per minute."""
    if len(points) < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / len(points)
    mean_v = sum(v for _, v in points) / len(points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return 0.0
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in points) / spread


class Soak:
    def __init__(self, options: Options, server: h.Server) -> None:
        self.options = options
        self.server = server
        self.url = f"http://127.0.0.1:{server.port}/pulses"
        self.bodies = Bodies(options.batch, options.id_share)
        self.windows: list[Tally] = []
        self.samples: list[dict[str, float]] = []
        self.acknowledged = 0
        self.unanswered_pulses = 0
        self.began = 0.0

    # -- sending ----------------------------------------------------------------

    async def send(self, http: httpx.AsyncClient, body: bytes, due: float) -> None:
        tally = self.windows[-1]
        try:
            response = await http.post(
                self.url, content=body, headers={"Content-Type": "application/json"}
            )
        except httpx.HTTPError as exc:
            tally.note(type(exc).__name__)
            self.unanswered_pulses += self.options.batch
            return
        status = response.status_code
        tally.note(str(status))
        if status == 202:
            accepted = int(response.json()["accepted"])
            tally.ok += 1
            tally.pulses += accepted
            self.acknowledged += accepted
        tally.latencies_ms.append((trio.current_time() - due) * 1000)

    async def probe(self) -> float:
        """Requests per second answered 202 by back-to-back clients."""
        ok = 0
        go = trio.Event()
        deadline = math.inf

        async def client(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            nonlocal ok
            async with httpx.AsyncClient(timeout=self.options.timeout) as http:
                task_status.started()
                await go.wait()
                while trio.current_time() < deadline:
                    try:
                        response = await http.post(
                            self.url,
                            content=self.bodies.next(),
                            headers={"Content-Type": "application/json"},
                        )
                    except httpx.HTTPError:
                        self.unanswered_pulses += self.options.batch
                        continue
                    if response.status_code == 202:
                        ok += 1
                        self.acknowledged += int(response.json()["accepted"])

        async with trio.open_nursery() as nursery:
            for _ in range(self.options.probe_connections):
                await nursery.start(client)  # made before the clock starts (see `steady`)
            started = trio.current_time()
            deadline = started + self.options.probe_seconds
            go.set()
        return ok / (trio.current_time() - started)

    async def steady(self, rate: float) -> None:
        """Open loop at `rate` requests/s for the configured minutes."""
        options = self.options
        send_channel, receive_channel = trio.open_memory_channel[tuple[bytes, float]](0)

        async def worker(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            limits = httpx.Limits(max_keepalive_connections=1)
            async with httpx.AsyncClient(timeout=options.timeout, limits=limits) as http:
                task_status.started()
                async for body, due in receive_channel:
                    await self.send(http, body, due)

        async with trio.open_nursery() as nursery:
            # Every client is made before the schedule starts: making one costs
            # this process ~50 ms (its SSL context), and 32 made at the start
            # put the first second's requests up to 0.9 s behind their times,
            # on a server that sat idle meanwhile.
            for _ in range(options.connections):
                await nursery.start(worker)
            self.began = trio.current_time()
            end = self.began + options.minutes * 60
            self.windows.append(Tally(0.0))
            nursery.start_soon(self.sampler, end)
            async with send_channel:
                for n in itertools.count():
                    due = self.began + n / rate
                    if due >= end:
                        break
                    await trio.sleep_until(due)
                    now = trio.current_time()
                    if now - self.began >= len(self.windows) * options.window:
                        self.windows.append(Tally(now - self.began))
                    try:
                        send_channel.send_nowait((self.bodies.next(), due))
                    except trio.WouldBlock:
                        self.windows[-1].late += 1  # every connection busy: behind schedule

    async def sampler(self, end: float) -> None:
        cpu_before = self.server.cpu_seconds()
        while trio.current_time() < end:
            t = trio.current_time() - self.began
            self.samples.append(
                {
                    "t_s": round(t, 2),
                    "rss_mib": round(h.rss_kib(self.server.pid) / 1024, 2),
                    "cpu_s": round(self.server.cpu_seconds() - cpu_before, 2),
                    "acknowledged": self.acknowledged,
                }
            )
            await trio.sleep(self.options.sample)


def summarise(
    windows: list[Tally], samples: list[dict[str, float]], window: float
) -> list[dict[str, Any]]:
    rows = []
    for tally in windows:
        ordered = sorted(tally.latencies_ms)
        inside = [s for s in samples if tally.started <= s["t_s"] < tally.started + window]
        rows.append(
            {
                "t_s": round(tally.started, 1),
                "requests_per_s": round(tally.ok / window, 1),
                "pulses_per_s": round(tally.pulses / window, 1),
                "p50_ms": round(percentile(ordered, 0.50), 2),
                "p90_ms": round(percentile(ordered, 0.90), 2),
                "p99_ms": round(percentile(ordered, 0.99), 2),
                "p999_ms": round(percentile(ordered, 0.999), 2),
                "max_ms": round(ordered[-1], 2) if ordered else float("nan"),
                "non_202": {k: v for k, v in tally.statuses.items() if k != "202"},
                "late": tally.late,
                "rss_mib": max((s["rss_mib"] for s in inside), default=float("nan")),
            }
        )
    return rows


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        f"# Soak {result['meta']['started']}",
        "",
        f"- git {result['meta']['git']}{' (dirty)' if result['meta']['git_dirty'] else ''},"
        f" Python {result['meta']['python']}, {result['meta']['cores']} cores"
        f" ({'pinned' if result['meta']['pinned'] else 'not pinned'}), {result['meta']['cpu']}",
        f"- server: durability {result['options']['durability']},"
        f" workers {result['options']['workers']}; load: {result['options']['batch']} pulses"
        f" per request, {result['options']['id_share']:.0%} with ids,"
        f" {result['options']['connections']} connections",
        f"- capacity: {s['capacity']}; steady rate {s['rate_per_s']} requests/s"
        f" ({s['rate_basis']}) for {s['minutes']} min",
        "",
        "| | |",
        "|---|---|",
        f"| requests answered 202 | {s['ok_requests']} ({s['requests_per_s']}/s) |",
        f"| pulses acknowledged | {s['pulses']} ({s['pulses_per_s']}/s) |",
        f"| latency p50 / p90 / p99 / p99.9 / max | {s['p50_ms']} / {s['p90_ms']} /"
        f" {s['p99_ms']} / {s['p999_ms']} / {s['max_ms']} ms |",
        f"| non-202 answers | {s['non_202'] or 'none'} |",
        f"| requests late (every connection busy) | {s['late']} |",
        f"| server CPU | {s['server_cpu']} s per s |",
        f"| RSS start / end / peak | {s['rss_start_mib']} / {s['rss_end_mib']} /"
        f" {s['rss_peak_mib']} MiB |",
        f"| RSS slope after warm-up (first fifth) | {s['rss_slope_after_warmup_mib_per_min']}"
        " MiB/min |",
        f"| RSS slope over the last third | {s['rss_slope_last_third_mib_per_min']} MiB/min"
        f" (limit {s['max_growth']}) |",
        f"| stored vs acknowledged | {s['stored']} stored, {s['acknowledged_total']}"
        f" acknowledged, {s['unanswered_pulses']} unanswered: {s['stored_verdict']} |",
        f"| server exit code | {s['exit_code']} |",
        f"| verdict | **{s['verdict']}** |",
        "",
        "## Per window",
        "",
        "| t (s) | req/s | pulses/s | p50 | p90 | p99 | p99.9 | max (ms) | non-202 | late"
        " | RSS (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for w in result["windows"]:
        lines.append(
            f"| {w['t_s']} | {w['requests_per_s']} | {w['pulses_per_s']} | {w['p50_ms']}"
            f" | {w['p90_ms']} | {w['p99_ms']} | {w['p999_ms']} | {w['max_ms']}"
            f" | {w['non_202'] or ''} | {w['late']} | {w['rss_mib']} |"
        )
    return "\n".join(lines) + "\n"


def meta(started: str) -> dict[str, Any]:
    return {"started": started, **h.machine()}


def run(options: Options) -> int:
    started = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"soak-{started}"
    if h.pinning_available():
        os.sched_setaffinity(0, {int(h.LOAD_CPU)})
    with h.scratch_dir(options.data_root, "soak") as data:
        server = h.service_server(
            data / "data",
            stem.with_suffix(".log"),
            durability=options.durability,
            workers=options.workers,
        )
        with h.running(server):
            h.warm_up(server.port, ids=True)
            soak = Soak(options, server)
            capacity: float | None = None
            if options.rate is None:
                print(f"soak: measuring capacity for {options.probe_seconds:g} s", file=sys.stderr)
                capacity = trio.run(soak.probe)
                rate = capacity * options.share
                basis = f"{options.share:.0%} of measured capacity"
            else:
                rate, basis = options.rate, "--rate"
            print(
                f"soak: {rate:.1f} requests/s ({rate * options.batch:.0f} pulses/s)"
                f" for {options.minutes:g} min",
                file=sys.stderr,
            )
            wall = time.perf_counter()
            trio.run(soak.steady, rate)
            seconds = time.perf_counter() - wall
            stored = h.stored_pulses(server.port)
            exit_code = server.stop()
    windows = summarise(soak.windows, soak.samples, options.window)
    every = sorted(x for tally in soak.windows for x in tally.latencies_ms)
    ok = sum(t.ok for t in soak.windows)
    pulses = sum(t.pulses for t in soak.windows)
    non_202: dict[str, int] = {}
    for tally in soak.windows:
        for status, count in tally.statuses.items():
            if status != "202":
                non_202[status] = non_202.get(status, 0) + count
    rss = [(s["t_s"], s["rss_mib"]) for s in soak.samples]
    # After the first fifth (warm-up), and over the last third: a cache that
    # fills up flattens out by the end, a leak keeps its slope.
    seconds_total = options.minutes * 60
    slope_warm = slope_per_minute([(t, v) for t, v in rss if t >= seconds_total / 5])
    slope = slope_per_minute([(t, v) for t, v in rss if t >= seconds_total * 2 / 3])
    lost = stored < soak.acknowledged
    extra = stored - soak.acknowledged
    stored_verdict = (
        f"LOST {soak.acknowledged - stored}"
        if lost
        else "ok"
        if extra <= soak.unanswered_pulses
        else f"{extra} more than acknowledged"
    )
    verdict_problems = [
        *(["pulses lost"] if lost else []),
        *(["server exit code not 0"] if exit_code != 0 else []),
        *(
            [f"RSS still grows {slope:.2f} MiB/min over the last third"]
            if slope > options.max_growth
            else []
        ),
    ]
    summary = {
        "capacity": f"{capacity:.1f} requests/s" if capacity is not None else "not measured",
        "rate_per_s": round(rate, 1),
        "rate_basis": basis,
        "minutes": options.minutes,
        "ok_requests": ok,
        "requests_per_s": round(ok / seconds, 1),
        "pulses": pulses,
        "pulses_per_s": round(pulses / seconds, 1),
        "p50_ms": round(percentile(every, 0.5), 2),
        "p90_ms": round(percentile(every, 0.9), 2),
        "p99_ms": round(percentile(every, 0.99), 2),
        "p999_ms": round(percentile(every, 0.999), 2),
        "max_ms": round(every[-1], 2) if every else float("nan"),
        "non_202": non_202,
        "late": sum(t.late for t in soak.windows),
        "server_cpu": round(soak.samples[-1]["cpu_s"] / seconds, 2) if soak.samples else None,
        "rss_start_mib": rss[0][1] if rss else None,
        "rss_end_mib": rss[-1][1] if rss else None,
        "rss_peak_mib": max(v for _, v in rss) if rss else None,
        "rss_slope_after_warmup_mib_per_min": round(slope_warm, 3),
        "rss_slope_last_third_mib_per_min": round(slope, 3),
        "max_growth": options.max_growth,
        "stored": stored,
        "acknowledged_total": soak.acknowledged,
        "unanswered_pulses": soak.unanswered_pulses,
        "stored_verdict": stored_verdict,
        "exit_code": exit_code,
        "verdict": "; ".join(verdict_problems) or "ok",
    }
    result = {
        "meta": meta(started),
        "options": asdict(options),
        "summary": summary,
        "windows": windows,
        "samples": soak.samples,
    }
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"soak: report in {stem.with_suffix('.md')} and {stem.with_suffix('.json')}")
    return 1 if verdict_problems else 0


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="steady load time (10)")
    parser.add_argument(
        "--rate", type=float, help="requests per second (default: --share of measured capacity)"
    )
    parser.add_argument("--share", type=float, default=0.7, help="share of capacity (0.7)")
    parser.add_argument("--batch", type=int, default=100, help="pulses per request (100)")
    parser.add_argument("--id-share", type=float, default=0.7, help="pulses with an id (0.7)")
    parser.add_argument("--connections", type=int, default=32, help="steady-load connections")
    parser.add_argument("--probe-connections", type=int, default=8)
    parser.add_argument("--probe-seconds", type=float, default=15.0)
    parser.add_argument("--sample", type=float, default=1.0, help="RSS/CPU sample every s")
    parser.add_argument("--window", type=float, default=10.0, help="report window in s")
    parser.add_argument("--durability", choices=["fsync", "os"], default="fsync")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--data-root", help="where the scratch data dir goes")
    parser.add_argument(
        "--max-growth",
        type=float,
        default=2.0,
        help="RSS slope over the last third (MiB/min) above which the run fails (2.0)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="request timeout in s")
    args = parser.parse_args(argv)
    return Options(
        minutes=args.minutes,
        rate=args.rate,
        share=args.share,
        batch=args.batch,
        id_share=args.id_share,
        connections=args.connections,
        probe_connections=args.probe_connections,
        probe_seconds=args.probe_seconds,
        sample=args.sample,
        window=args.window,
        durability=args.durability,
        workers=args.workers,
        data_root=args.data_root,
        max_growth=args.max_growth,
        timeout=args.timeout,
    )


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
