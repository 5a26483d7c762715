"""Where the server's time goes under load: py-spy while wrk runs a scenario.

    python bench/profile.py array1000-ids             # fsync, 10 s
    python bench/profile.py single-ids --durability os --duration 20
    python bench/profile.py aggregates                # GET /aggregates pages
    python bench/profile.py svc-fsync-ndjson1000-noids --top 40
    python bench/profile.py array1000-ids --workers 2 --connections 16
    python bench/profile.py array1000-noids --native  # perf: C code and the kernel

SCENARIO is a body shape and ids (`single-ids`, `array100-noids`,
`array1000-ids`, `ndjson1000-ids`, ...; a `svc-<durability>-` prefix as in
the bench report is accepted too), or `aggregates`. The server runs pinned
to core 1 as in the bench; py-spy samples it (`--nonblocking`, so the
process is not paused) from core 0, next to wrk. Prints the top functions by
own time (the leaf frame of each sample) and by total time (anywhere on the
stack), and keeps the raw collapsed stacks, which speedscope.app and
flamegraph.pl open as they are.

py-spy sees Python frames only: the C a function calls (msgspec, SQLite,
the interpreter itself) and the kernel's work for its system calls count as
that function's own time. `--native` samples with Linux perf instead
(installed with apt-get if missing) and prints the CPU by shared object
(the interpreter, msgspec, SQLite, libc, the kernel), the top C symbols,
and the system calls' share with all they run in the kernel.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import harness as h
import run as bench


def ensure_py_spy() -> str:
    found = shutil.which("py-spy") or (Path(h.PYTHON).parent / "py-spy")
    if Path(found).exists():
        return str(found)
    print("profile: installing py-spy into this venv", file=sys.stderr)
    subprocess.run([h.PYTHON, "-m", "pip", "install", "-q", "py-spy"], check=True)
    return str(Path(h.PYTHON).parent / "py-spy")


_IDLE_WORKER = "WorkerThread._work "
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*)\)$")


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['func']} ({path})"


def summarize(raw: Path, top: int) -> str:
    """Tables of own time, total time, and the event loop's own time."""
    own: Counter[str] = Counter()
    loop_own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    by_thread: Counter[str] = Counter()
    samples = idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        head, *rest = stack.split(";")
        thread = "event loop (MainThread)" if head.endswith("MainThread") else "worker threads"
        if not rest:
            continue  # the thread was between Python frames
        frames = [_short(f) for f in rest]
        if frames[-1].startswith(_IDLE_WORKER):
            idle += count  # a trio worker thread waiting for its next job
            continue
        samples += count
        by_thread[thread] += count
        own[frames[-1]] += count
        if thread.startswith("event loop"):
            loop_own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    if not samples:
        return "no samples (did py-spy attach? is the server busy?)"

    def table(title: str, counts: Counter[str], n: int) -> list[str]:
        rows = [title, f"{'%':>6} {'samples':>8}  function (file:line)"]
        for frame, count in counts.most_common(n):
            rows.append(f"{100 * count / samples:6.1f} {count:8d}  {frame[:110]}")
        return rows

    split = ", ".join(f"{name} {100 * n / samples:.0f}%" for name, n in by_thread.most_common())
    return "\n".join(
        [
            f"{samples} samples of busy threads ({split}); {idle} samples of idle trio "
            "worker threads left out.",
            "Percentages are of thread-time, not of one CPU: a store thread waiting in fsync",
            "counts as busy, and several threads can be sampled at once. Own time of a",
            "function includes the C code it calls (sqlite3, msgspec): py-spy sees no C frames.",
            "",
            *table(f"top {top} by own time", own, top),
            "",
            *table(
                "top 15 by own time on the event loop thread (it serializes all Python work "
                "of requests)",
                loop_own,
                15,
            ),
            "",
            *table("top 15 by total time (the function or anything it calls)", total, 15),
        ]
    )


def ensure_perf() -> str:
    found = h.apt_tool("perf", "linux-perf")
    if found is None:
        raise SystemExit("profile: --native needs Linux perf (Debian's linux-perf)")
    return found


_PERCENT = re.compile(r"^\s*(?P<pct>[\d.]+)%\s+(?:[\d.]+%\s+)?(?P<what>\S.*?)\s*$")


def _perf_rows(perf: str, data: Path, *args: str) -> list[tuple[float, str]]:
    """(percent, name) rows of a `perf report` of `data`, sorted as `args` say."""
    out = subprocess.run(
        [perf, "report", "-i", str(data), "--stdio", "-g", "none", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = []
    for line in out.splitlines():
        if not line.startswith("#") and (match := _PERCENT.match(line)):
            rows.append((float(match["pct"]), " ".join(match["what"].split())))
    return rows


def native_summary(perf: str, data: Path, top: int) -> str:
    """The CPU by shared object and by symbol, and the system calls' share."""
    objects = _perf_rows(perf, data, "--no-children", "--sort", "dso")
    symbols = _perf_rows(perf, data, "--no-children", "--sort", "dso,sym")
    # With children: a system call's entry point holds all the kernel did for it.
    calls = [
        (pct, name.removeprefix("[k] "))
        for pct, name in _perf_rows(perf, data, "--children", "--sort", "sym")
        if re.match(r"\[k\] __(x64|do)_sys_", name)
    ]
    if not objects:
        return "no samples (did perf attach? is the server busy?)"

    def table(title: str, rows: list[tuple[float, str]], n: int) -> list[str]:
        return [title, *(f"{pct:6.2f}%  {name[:110]}" for pct, name in rows[:n])]

    return "\n".join(
        [
            "Percentages are of the server's CPU samples, every thread (perf -F 999).",
            "",
            *table("by shared object (libpython: the interpreter running Python code)", objects, 8),
            "",
            *table(f"top {top} symbols by own time", symbols, top),
            "",
            *table("system calls, with what the kernel runs for them", calls, 10),
        ]
    )


def sampler(opts: argparse.Namespace, tool: str, server: h.Server, raw: Path) -> list[str]:
    """The command that samples `server` into `raw` for `opts.duration` s with
    `tool`: perf with `--native`, else py-spy."""
    if opts.native:
        pids = ",".join(map(str, server.pids()))
        return [
            *[tool, "record", "-F", "999", "-g", "-p", pids, "-o", str(raw), "--quiet"],
            *["--", "sleep", str(opts.duration)],
        ]
    return [
        tool,
        "record",
        "--pid",
        str(server.pid),
        "--format",
        "raw",
        "--output",
        str(raw),
        "--rate",
        str(opts.rate),
        "--duration",
        str(opts.duration),
        "--nonblocking",
        *([] if opts.lines else ["--function"]),
        "--threads",
        *(["--idle"] if opts.idle else []),
        *(["--subprocesses"] if opts.workers > 1 else []),
        *(["--gil"] if opts.gil else []),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", help="e.g. array1000-ids, single-noids, aggregates")
    parser.add_argument("--durability", choices=["fsync", "os"], default=None)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument(
        "--rate", type=int, default=200, help="py-spy's samples per second (perf takes 999)"
    )
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--idle", action="store_true", help="count idle threads too (e.g. threads waiting in fsync)"
    )
    parser.add_argument(
        "--gil",
        action="store_true",
        help="only samples holding the GIL: Python work, without waits and GIL-free C code",
    )
    parser.add_argument(
        "--lines",
        action="store_true",
        help="attribute samples to the line running, not to the function's first line",
    )
    parser.add_argument(
        "--native",
        action="store_true",
        help="sample with Linux perf: C code and the kernel, not Python frames",
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--connections",
        type=int,
        help="wrk's connections (default: the bench's for the shape; two workers need 16,"
        " see bench/stores.py)",
    )
    parser.add_argument(
        "--output",
        help="where to keep the raw stacks (default bench/results/profile-<scenario>-<time>.txt)",
    )
    opts = parser.parse_args()
    if opts.native and (opts.idle or opts.gil or opts.lines):
        parser.error("--idle, --gil and --lines are py-spy's; perf (--native) has no such view")

    name = opts.scenario
    durability = opts.durability or "fsync"
    if m := re.match(r"svc-(fsync|os)-(.*)", name):
        durability = opts.durability or m[1]
        name = m[2]
    aggregates = name.startswith("aggregates")
    if not aggregates:
        shape, _, ids_text = name.rpartition("-")
        if shape not in bench.SHAPES or ids_text not in ("ids", "noids"):
            parser.error(
                f"unknown scenario {opts.scenario!r}; shapes: "
                f"{', '.join(bench.SHAPES)}, each -ids or -noids; or aggregates"
            )
    wrk = h.ensure_wrk()
    tool = ensure_perf() if opts.native else ensure_py_spy()
    results = h.BENCH / "results"
    results.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = (
        f"perf-{opts.scenario}-{stamp}.data"
        if opts.native
        else f"profile-{opts.scenario}-{stamp}.txt"
    )
    raw = Path(opts.output) if opts.output else results / name

    with h.scratch_dir(None, "profile") as scratch:
        quiet = {"INGESTOR_COMMIT_INTERVAL": "1d", "INGESTOR_COMMIT_GRACE": "7d"}
        extra = quiet if aggregates else {}
        server = h.service_server(
            scratch / "data",
            scratch / "server.log",
            durability=durability,
            workers=opts.workers,
            extra_env=extra,
            # Several workers share both cores with the load, as in bench/stores.py.
            cpus=h.SERVER_CPU if opts.workers == 1 else "0,1",
        )
        with h.running(server):
            if aggregates:
                yesterday = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
                pulses = bench.bucket_pulses(100_000, yesterday)
                bench.preload_buckets(server.port, pulses)
                bench.page_paths(server.port, 100_000, scratch / "paths.txt")
                load = h.Load.pages(scratch / "paths.txt", connections=4)
            else:
                kind, count, connections = bench.SHAPES[shape]
                connections = opts.connections or connections
                h.warm_up(server.port, ids_text == "ids")
                load = h.Load.pulses(kind, count, ids_text == "ids", connections)
            argv = h.pinned(h.LOAD_CPU, sampler(opts, tool, server, raw))
            spying = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)  # let the sampler attach; the load outlasts its sampling
            measured = h.measure(server, wrk, load, opts.duration + 1)
            _, err = spying.communicate(timeout=opts.duration + 60)
            if spying.returncode != 0:
                failure = err.decode()[-2000:]
                print(f"{tool} failed ({spying.returncode}): {failure}", file=sys.stderr)
                return 1
        problems = server.log_problems()
    print(
        f"profile of {opts.scenario} ({durability}, {opts.duration} s, "
        f"server on {f'core {h.SERVER_CPU}' if opts.workers == 1 else 'cores 0,1'})"
    )
    print(
        f"load: {measured.get('pulses_per_s')} pulses/s, {measured.get('requests_per_s')} "
        f"req/s, latency {measured.get('latency_ms')}, statuses {measured.get('statuses')}, "
        f"server CPU {measured.get('server_cpu')} (sampling slows the server somewhat)"
    )
    if problems.get("errors") or problems.get("warnings"):
        print(f"server log: {problems}")
    print()
    if opts.native:
        print(native_summary(tool, raw, opts.top))
        print(f"\nperf data: {raw} (perf report -i {raw})")
    else:
        print(summarize(raw, opts.top))
        print(f"\nraw stacks: {raw} (open in https://www.speedscope.app or flamegraph.pl)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
