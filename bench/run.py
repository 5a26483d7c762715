"""The benchmark: the ingestor and the baseline under the same load, side by side.

    python bench/run.py            # full run, about 15 minutes
    python bench/run.py --quick    # under two minutes: fewer, shorter scenarios
    python bench/run.py --only array1000 --runs 5

Every scenario runs --runs times (at least 3); each run of the ingestor gets a
fresh data dir and a fresh process. Results are appended as JSON lines to
bench/results/<timestamp>.jsonl, then bench/report.py turns them into
<timestamp>.md and <timestamp>.png. See bench/README.md for what each
scenario measures and how to read the figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness as h
import report

SHAPES = {  # shape: (body kind, pulses per request, connections)
    "single": ("single", 1, 64),
    "array100": ("array", 100, 8),
    "array1000": ("array", 1000, 4),
    "ndjson1000": ("ndjson", 1000, 4),
}
QUICK_INGEST = [
    ("baseline", "fsync", "single", True),
    ("baseline", "fsync", "array1000", True),
    ("baseline", "fsync", "ndjson1000", True),
    ("service", "fsync", "single", True),
    ("service", "fsync", "array1000", True),
    ("service", "fsync", "ndjson1000", True),
    ("service", "os", "single", True),
]
PAGE = 1000  # GET /aggregates?limit= in the read scenario


@dataclass(frozen=True)
class Options:
    quick: bool
    runs: int
    duration: int
    warmup: int
    workers: int
    buckets: int
    startup_pulses: int
    only: list[str]
    data_root: str | None
    wrk: str | None


class Recorder:
    """Appends one JSON line per run, and prints a one-line summary of it."""

    def __init__(self, path: Path, run_id: str, options: Options) -> None:
        self.path = path
        self.run_id = run_id
        self.options = options

    def write(self, record: dict[str, Any]) -> None:
        record = {"run_id": self.run_id, **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def run(
        self, scenario: str, group: str, target: str, index: int, **fields: Any
    ) -> dict[str, Any]:
        record = {
            "kind": "run",
            "scenario": scenario,
            "group": group,
            "target": target,
            "run": index,
            "workers": self.options.workers,
            **fields,
        }
        self.write(record)
        print(f"  {scenario} #{index}: {_summary(record)}", flush=True)
        return record


def _summary(r: dict[str, Any]) -> str:
    parts = []
    if "pulses_per_s" in r and r.get("pulses_per_request"):
        parts.append(f"{r['pulses_per_s']:,.0f} pulses/s")
    if "requests_per_s" in r:
        parts.append(f"{r['requests_per_s']:,.1f} req/s")
    if "latency_ms" in r:
        parts.append(f"p50 {r['latency_ms']['p50']} ms p99 {r['latency_ms']['p99']} ms")
    for key in ("ready_s", "commit_s"):
        if key in r:
            parts.append(f"{key} {r[key]:.3f}")
    if r.get("non_2xx"):
        parts.append(f"NON-2XX {r['non_2xx']} {r.get('statuses')}")
    if r.get("lost_pulses"):
        parts.append(f"LOST {r['lost_pulses']}")
    if "server_cpu" in r:
        parts.append(
            f"cpu server {r['server_cpu']} load {r['load_cpu']} other {r['core_contention']}"
        )
    return ", ".join(parts)


def _wanted(options: Options, name: str) -> bool:
    return not options.only or any(word in name for word in options.only)


# -- ingest ---------------------------------------------------------------------


def ingest_name(target: str, durability: str, shape: str, ids: bool) -> str:
    tail = f"{shape}-{'ids' if ids else 'noids'}"
    return f"base-{tail}" if target == "baseline" else f"svc-{durability}-{tail}"


def ingest_scenarios(options: Options) -> list[tuple[str, str, str, bool]]:
    if options.quick:
        return QUICK_INGEST
    found: list[tuple[str, str, str, bool]] = []
    for shape in SHAPES:
        for ids in (True, False):
            found.append(("baseline", "fsync", shape, ids))
    for durability in ("fsync", "os"):
        for shape in SHAPES:
            for ids in (True, False):
                found.append(("service", durability, shape, ids))
    return found


def run_ingest(
    rec: Recorder,
    options: Options,
    scenarios: list[tuple[str, str, str, bool]],
    logs: Path,
) -> None:
    """Scenarios of one body shape and ids, run in turn: run 1 of each, then run 2, ...

    A shared VM's speed drifts by half within minutes. Run back to back, a
    scenario's runs and its baseline's were minutes apart, and their ratio
    moved with the drift (0.32x one hour, 0.47x the hour before, same code);
    taken in turn, each run of the ingestor has a run of the baseline next
    to it in time.
    """
    failed: list[str] = []  # a scenario that failed twice skips its later runs
    for index in range(1, options.runs + 1):
        for scenario in scenarios:
            name = ingest_name(*scenario)
            if name in failed:
                continue
            try:
                _ingest_once(rec, options, scenario, index, logs)
            except RuntimeError:
                failed.append(name)
    if failed:
        raise RuntimeError(f"failed twice: {', '.join(failed)}")


def _ingest_once(
    rec: Recorder,
    options: Options,
    scenario: tuple[str, str, str, bool],
    index: int,
    logs: Path,
) -> None:
    target, durability, shape, ids = scenario
    name = ingest_name(*scenario)
    kind, count, connections = SHAPES[shape]
    info = {"shape": shape, "ids": ids, "durability": durability if target == "service" else None}
    print(f"{name} #{index}", flush=True)

    def one(server: h.Server) -> None:
        # A Load for each wrk run: its ids' prefix is new, so no id repeats.
        h.warm_up(server.port, ids)
        if options.warmup:
            h.measure(
                server, options.wrk, h.Load.pulses(kind, count, ids, connections), options.warmup
            )
        before = h.stored_pulses(server.port) if target == "service" else 0
        result = h.measure(
            server, options.wrk, h.Load.pulses(kind, count, ids, connections), options.duration
        )
        extra: dict[str, Any] = {}
        if target == "service":
            # Every pulse the server said it accepted must be in the totals.
            # (More may be stored: requests still in flight when wrk stopped.)
            stored = h.stored_pulses(server.port) - before
            acked = result["accepted_pulses"]
            extra = {
                "acked_pulses": acked,
                "stored_pulses": stored,
                "lost_pulses": max(0, acked - stored),
            }
        rec.run(
            name,
            "ingest",
            target,
            index,
            **info,
            **result,
            **extra,
            ready_s=server.ready_after,
            server_log=server.log_problems(),
        )

    for attempt in (1, 2):  # a shared machine can kill or starve a run: one retry
        log = logs / f"{name}-{index}{'' if attempt == 1 else '-retry'}.log"
        try:
            if target == "baseline":
                with h.running(h.baseline_server(log)) as server:
                    one(server)
                return
            with h.scratch_dir(options.data_root, name) as scratch:
                server = h.service_server(
                    scratch / "data", log, durability=durability, workers=options.workers
                )
                with h.running(server):
                    one(server)
            return
        except RuntimeError as exc:
            rec.write({"kind": "failure", "scenario": name, "run": index, "error": str(exc)[:2000]})
            print(f"  {name} #{index} attempt {attempt} FAILED: {exc}", flush=True)
            if attempt == 2:
                raise


# -- reads and commit over many buckets --------------------------------------------


def bucket_pulses(buckets: int, day: dt.date) -> list[dict[str, str]]:
    """One pulse per bucket: tenants x 100 SKUs, all on `day`."""
    stamp = f"{day.isoformat()}T12:00:00Z"
    return [
        {
            "tenant_id": f"agg-t{n // 100:05d}",
            "product_sku": f"sku-{n % 100:03d}",
            "use_unit": "api_call",
            "used_amount": "1.5",
            "timestamp": stamp,
        }
        for n in range(buckets)
    ]


def preload_buckets(port: int, pulses: list[dict[str, str]]) -> float:
    """POST in 10,000-pulse arrays (the largest a request may be); the seconds taken."""
    started = time.perf_counter()
    for start in range(0, len(pulses), 10_000):
        status, answer = h.post_json(port, "/pulses", pulses[start : start + 10_000])
        if status != 202 or answer["accepted"] != len(pulses[start : start + 10_000]):
            raise RuntimeError(f"preload answered {status}: {str(answer)[:300]}")
    return time.perf_counter() - started


def page_paths(port: int, expect: int, paths_file: Path) -> int:
    """Walk GET /aggregates?limit=1000 once; write each page's path for wrk."""
    paths, cursor, rows = [], None, 0
    while True:
        path = f"/aggregates?limit={PAGE}" + (f"&cursor={cursor}" if cursor else "")
        status, page = h.get_json(port, path)
        if status != 200:
            raise RuntimeError(f"GET {path} answered {status}: {str(page)[:300]}")
        paths.append(path)
        rows += len(page["aggregates"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    if rows != expect:
        print(f"  WARNING: /aggregates listed {rows} buckets, expected {expect}", flush=True)
    paths_file.write_text("\n".join(paths) + "\n")
    return rows


def run_buckets(rec: Recorder, options: Options, logs: Path) -> None:
    n = options.buckets
    label = f"{n // 1000}k" if n % 1000 == 0 else str(n)
    day = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    pulses = bucket_pulses(n, day)
    reads, commit, preload = f"svc-aggregates-{label}", f"svc-commit-{label}", "svc-preload-10k"
    base_reads = f"base-aggregates-{label}"
    if _wanted(options, reads) or _wanted(options, commit):
        print(f"{reads} / {commit}", flush=True)
        for index in range(1, options.runs + 1):
            with h.scratch_dir(options.data_root, "buckets") as scratch:
                # The periodic committer must not commit the day while we time it:
                # yesterday is due an hour after it ended, unless the grace is longer.
                server = h.service_server(
                    scratch / "data",
                    logs / f"{reads}-{index}.log",
                    workers=options.workers,
                    extra_env={"INGESTOR_COMMIT_INTERVAL": "1d", "INGESTOR_COMMIT_GRACE": "7d"},
                )
                with h.running(server):
                    seconds = preload_buckets(server.port, pulses)
                    rec.run(
                        preload,
                        "preload",
                        "service",
                        index,
                        durability="fsync",
                        pulses_per_request=10_000,
                        pulses=n,
                        seconds=round(seconds, 3),
                        pulses_per_s=round(n / seconds, 1),
                    )
                    rows = page_paths(server.port, n, scratch / "paths.txt")
                    load = h.Load.pages(scratch / "paths.txt", connections=4)
                    result = h.measure(server, options.wrk, load, options.duration)
                    rec.run(
                        reads,
                        "aggregates",
                        "service",
                        index,
                        durability="fsync",
                        buckets=rows,
                        page=PAGE,
                        rows_per_s=round(result["requests_per_s"] * PAGE, 1),
                        **result,
                    )
                    started = time.perf_counter()
                    status, answer = h.post_json(
                        server.port, "/aggregates/commit", {"date": day.isoformat()}
                    )
                    took = time.perf_counter() - started
                    records = (
                        sum(b["record_count"] for b in answer.get("batches", []))
                        if status == 200
                        else 0
                    )
                    rec.run(
                        commit,
                        "commit",
                        "service",
                        index,
                        durability="fsync",
                        buckets=n,
                        status=status,
                        commit_s=round(took, 3),
                        buckets_per_s=round(records / took, 1),
                        records=records,
                        batches=len(answer.get("batches", [])) if status == 200 else 0,
                        error=None if status == 200 else str(answer)[:300],
                        server_log=server.log_problems(),
                    )
    if _wanted(options, base_reads):
        print(base_reads, flush=True)
        with h.scratch_dir(options.data_root, "base") as scratch:
            server = h.baseline_server(logs / f"{base_reads}.log")
            with h.running(server):
                preload_buckets(server.port, pulses)
                rows = page_paths(server.port, n, scratch / "paths.txt")
                for index in range(1, options.runs + 1):
                    load = h.Load.pages(scratch / "paths.txt", connections=4)
                    result = h.measure(server, options.wrk, load, options.duration)
                    rec.run(
                        base_reads,
                        "aggregates",
                        "baseline",
                        index,
                        buckets=rows,
                        page=PAGE,
                        rows_per_s=round(result["requests_per_s"] * PAGE, 1),
                        **result,
                    )


# -- start-up ---------------------------------------------------------------------


def _count_label(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def run_startup(rec: Recorder, options: Options, logs: Path) -> None:
    full = f"svc-startup-{_count_label(options.startup_pulses)}"
    if _wanted(options, full):
        print(f"{full} (preloading {options.startup_pulses:,} pulses)", flush=True)
        with h.scratch_dir(options.data_root, "startup") as scratch:
            started = time.perf_counter()
            subprocess.run(
                [
                    h.PYTHON,
                    str(h.BENCH / "preload.py"),
                    str(scratch / "data"),
                    str(options.startup_pulses),
                ],
                check=True,
                stderr=subprocess.DEVNULL,
            )
            took = time.perf_counter() - started
            size = sum(f.stat().st_size for f in (scratch / "data").rglob("*") if f.is_file())
            print(f"  preloaded in {took:.0f}s, {size / 2**20:,.0f} MiB", flush=True)
            for index in range(1, options.runs + 1):
                server = h.service_server(
                    scratch / "data", logs / f"{full}-{index}.log", workers=options.workers
                )
                with h.running(server):
                    pass
                rec.run(
                    full,
                    "startup",
                    "service",
                    index,
                    pulses=options.startup_pulses,
                    store_mib=round(size / 2**20, 1),
                    ready_s=round(server.ready_after or 0, 4),
                    server_log=server.log_problems(),
                )
    empty = "svc-startup-empty"
    if _wanted(options, empty):
        print(empty, flush=True)
        for index in range(1, options.runs + 1):
            with h.scratch_dir(options.data_root, "empty") as scratch:
                server = h.service_server(
                    scratch / "data", logs / f"{empty}-{index}.log", workers=options.workers
                )
                with h.running(server):
                    pass
                rec.run(
                    empty,
                    "startup",
                    "service",
                    index,
                    pulses=0,
                    ready_s=round(server.ready_after or 0, 4),
                )
    base = "base-startup"
    if _wanted(options, base):
        print(base, flush=True)
        for index in range(1, options.runs + 1):
            server = h.baseline_server(logs / f"{base}.log")
            with h.running(server):
                pass
            rec.run(base, "startup", "baseline", index, ready_s=round(server.ready_after or 0, 4))


# -- the run ------------------------------------------------------------------------


def _meta(options: Options, started: str) -> dict[str, Any]:
    return {
        "kind": "meta",
        "started": started,
        "quick": options.quick,
        "runs": options.runs,
        "duration_s": options.duration,
        "warmup_s": options.warmup,
        "workers": options.workers,
        "buckets": options.buckets,
        "startup_pulses": options.startup_pulses,
        **h.machine(),
        "server_cpu": h.SERVER_CPU,
        "load_cpu": h.LOAD_CPU,
        "load_tool": h.command_output([options.wrk, "--version"]).splitlines()[0]
        if options.wrk
        else "pyload (Python fallback)",
        "data_root": options.data_root or "(system temp dir)",
    }


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer scenarios, 2 s runs: under two minutes"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario (>= 3)")
    parser.add_argument(
        "--duration", type=int, help="seconds of load per run (default 8, --quick 2)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        help="seconds of untimed wrk load before each run (default 1, --quick 0)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="passed to the ingestor as INGESTOR_WORKERS"
    )
    parser.add_argument(
        "--buckets",
        type=int,
        help="buckets for the /aggregates and commit scenarios (default 100k, --quick 50k)",
    )
    parser.add_argument(
        "--startup-pulses",
        type=int,
        help="pulses in the start-up data dir (default 10M, --quick 200k)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated words: run only "
        "scenarios whose name holds one (e.g. array1000,startup)",
    )
    parser.add_argument(
        "--data-root",
        help="where scratch data dirs go (default: temp dir; "
        "fsync figures depend on the disk under it)",
    )
    opts = parser.parse_args(argv)
    if opts.runs < 3:
        parser.error("--runs: at least 3, or min-max says nothing")
    return Options(
        quick=opts.quick,
        runs=opts.runs,
        duration=opts.duration or (2 if opts.quick else 8),
        warmup=opts.warmup if opts.warmup is not None else (0 if opts.quick else 1),
        workers=opts.workers,
        buckets=opts.buckets or (50_000 if opts.quick else 100_000),
        startup_pulses=opts.startup_pulses or (200_000 if opts.quick else 10_000_000),
        only=[w for w in opts.only.split(",") if w],
        data_root=opts.data_root,
        wrk=h.ensure_wrk(),
    )


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    started = dt.datetime.now()
    stamp = started.strftime("%Y%m%d-%H%M%S")
    results = h.BENCH / "results"
    logs = results / f"{stamp}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = results / f"{stamp}.jsonl"
    rec = Recorder(path, stamp, options)
    rec.write(_meta(options, started.isoformat(timespec="seconds")))
    if not h.pinning_available():
        print(
            "bench: taskset or a second core missing; server and load are NOT pinned",
            file=sys.stderr,
        )
    clock = time.perf_counter()
    steps: list[Callable[[], None]] = []
    groups: dict[tuple[str, bool], list[tuple[str, str, str, bool]]] = {}
    for scenario in ingest_scenarios(options):
        if _wanted(options, ingest_name(*scenario)):
            groups.setdefault((scenario[2], scenario[3]), []).append(scenario)
    for group in groups.values():
        steps.append(lambda g=group: run_ingest(rec, options, g, logs))  # type: ignore[misc]
    steps.append(lambda: run_buckets(rec, options, logs))
    steps.append(lambda: run_startup(rec, options, logs))
    failed = 0
    for step in steps:
        try:
            step()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            failed += 1
            print(f"  FAILED: {exc}", file=sys.stderr, flush=True)
            rec.write({"kind": "failure", "error": str(exc)[:2000]})
    elapsed = time.perf_counter() - clock
    rec.write({"kind": "end", "elapsed_s": round(elapsed, 1), "failed_steps": failed})
    markdown, chart = report.write_report(path)
    print(
        f"\nbench: {elapsed:.0f}s; results {path}\n       report {markdown}"
        + (f"\n       chart  {chart}" if chart else "")
    )
    print("\n" + markdown.read_text())
    if not any(logs.iterdir()):
        shutil.rmtree(logs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
