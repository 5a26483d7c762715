"""What the bench harness (bench/) must get right for its figures to be true.

Every performance claim of the project (README "Performance", bench/RESULTS.md)
is a figure bench/harness.py, bench/run.py and bench/report.py made. These
tests feed them wrk output captured from real runs (wrk 4.1.0 with
bench/lua/pulses.lua and report.lua, against bench/baseline.py, the ingestor,
or a stub server answering as the comment above each capture says), and run
one short load of the real ingestor. Only that one needs wrk; it fails
instead of skipping when CI is set.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.cluster_support import unavailable

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # bench/run.py imports `harness` and `report` by these names
harness: Any = importlib.import_module("harness")
report: Any = importlib.import_module("report")
bench_run: Any = importlib.import_module("run")

Record = dict[str, Any]


def _stdout(*lines: str) -> str:
    return "\n".join(lines) + "\n"


# bench/baseline.py, single pulses with ids, 64 connections, 2 s: a clean run.
BASE_SINGLE = _stdout(
    "Running 2s test @ http://127.0.0.1:35469",
    "  1 threads and 64 connections",
    "  Thread Stats   Avg      Stdev     Max   +/- Stdev",
    "    Latency    48.19ms   10.77ms 151.50ms   84.99%",
    "    Req/Sec     1.33k   161.69     1.65k    70.00%",
    "  Latency Distribution",
    "     50%   47.33ms",
    "     75%   52.04ms",
    "     90%   57.46ms",
    "     99%   80.38ms",
    "  2642 requests in 2.01s, 417.36KB read",
    "Requests/sec:   1317.38",
    "Transfer/sec:    208.11KB",
    'BENCH_JSON {"duration_us":2005500,"requests":2642,"bytes":427375,"errors":{"connect"'
    ':0,"read":0,"write":0,"status":0,"timeout":0},"latency_us":{"min":11423,"mean":48185'
    '.6,"max":151504,"p50":47334,"p90":57460,"p99":80378,"p999":144499},"statuses":{"202"'
    ':2642},"first_error":null}',
)
# A stub answering every POST 202 after 1.5 s; wrk with --timeout=1s (the bench
# uses 10 s: the same happens to a server that stalls longer than that).
STUB_SLOW = _stdout(
    "Running 2s test @ http://127.0.0.1:34267",
    "  1 threads and 8 connections",
    "  Thread Stats   Avg      Stdev     Max   +/- Stdev",
    "    Latency     0.00us    0.00us   0.00us    -nan%",
    "    Req/Sec    11.50     12.02    20.00    100.00%",
    "  Latency Distribution",
    "     50%    0.00us",
    "     75%    0.00us",
    "     90%    0.00us",
    "     99%    0.00us",
    "  7 requests in 2.00s, 1.48KB read",
    "  Socket errors: connect 0, read 0, write 0, timeout 7",
    "Requests/sec:      3.49",
    "Transfer/sec:     757.87B",
    'BENCH_JSON {"duration_us":2004306,"requests":7,"bytes":1519,"errors":{"connect":0,"r'
    'ead":0,"write":0,"status":0,"timeout":7},"latency_us":{"min":-9223372036854775808,"m'
    'ean":0.0,"max":0,"p50":0,"p90":0,"p99":0,"p999":0},"statuses":{"202":7},"first_error'
    '":null}',
)
# A stub shedding load as the ingestor does when its queues are full: 199 of
# every 200 POSTs answered 503 at once, the 200th answered 202 after 0.2 s.
STUB_MIXED = _stdout(
    "Running 2s test @ http://127.0.0.1:58411",
    "  1 threads and 8 connections",
    "  Thread Stats   Avg      Stdev     Max   +/- Stdev",
    "    Latency    44.44ms   16.56ms 243.76ms   96.25%",
    "    Req/Sec   158.80     35.24   240.00     55.00%",
    "  Latency Distribution",
    "     50%   43.88ms",
    "     75%   43.98ms",
    "     90%   44.04ms",
    "     99%   89.55ms",
    "  317 requests in 2.00s, 75.53KB read",
    "  Non-2xx or 3xx responses: 316",
    "Requests/sec:    158.12",
    "Transfer/sec:     37.67KB",
    'BENCH_JSON {"duration_us":2004863,"requests":317,"bytes":77345,"errors":{"connect":0'
    ',"read":0,"write":0,"status":316,"timeout":0},"latency_us":{"min":1121,"mean":44439.'
    '9,"max":243764,"p50":43882,"p90":44040,"p99":89546,"p999":243764},"statuses":{"202":'
    '1,"503":316},"first_error":"503 {\\u0022error\\u0022:{\\u0022code\\u0022:\\u0022overloade'
    'd\\u0022,\\u0022message\\u0022:\\u0022ingest queues are full; retry later\\u0022}}"}',
)
# bench/baseline.py, 1,000-pulse arrays with ids, 4 connections, killed 1 s into a 2 s run.
BASE_KILLED = _stdout(
    "Running 2s test @ http://127.0.0.1:50129",
    "  1 threads and 4 connections",
    "  Thread Stats   Avg      Stdev     Max   +/- Stdev",
    "    Latency     9.56ms    6.35ms  41.17ms   78.06%",
    "    Req/Sec   350.10    104.80   530.00     70.00%",
    "  Latency Distribution",
    "     50%    7.14ms",
    "     75%   10.86ms",
    "     90%   19.05ms",
    "     99%   40.06ms",
    "  351 requests in 2.01s, 56.83KB read",
    "  Socket errors: connect 0, read 4, write 2281, timeout 0",
    "Requests/sec:    174.46",
    "Transfer/sec:     28.24KB",
    'BENCH_JSON {"duration_us":2011875,"requests":351,"bytes":58189,"errors":{"connect":0'
    ',"read":4,"write":2281,"status":0,"timeout":0},"latency_us":{"min":2059,"mean":9558.'
    '1,"max":41172,"p50":7140,"p90":19050,"p99":40064,"p999":41172},"statuses":{"202":351'
    '},"first_error":null}',
)

SINGLE = harness.Load.pulses("single", 1, True, 64)
ARRAY1000 = harness.Load.pulses("array", 1000, True, 4)


def _measure(monkeypatch: pytest.MonkeyPatch, stdout: str, load: Any) -> Record:
    """harness.measure over a wrk run whose output was `stdout`."""

    def wrk_printed(argv: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 0, stdout=stdout, stderr="")

    monkeypatch.setattr(harness.subprocess, "run", wrk_printed)
    server = types.SimpleNamespace(port=1, cpu_seconds=lambda: 0.0)
    result: Record = harness.measure(server, "wrk", load, 2)
    return result


def _measure_or_refuse(monkeypatch: pytest.MonkeyPatch, stdout: str, load: Any) -> Record | None:
    """The figures, or None when the harness refuses the run (a RuntimeError)."""
    try:
        return _measure(monkeypatch, stdout, load)
    except RuntimeError:
        return None


def _text_percentile_ms(stdout: str, percent: int) -> float:
    """wrk's human-readable percentile line (us, ms or s), in ms."""
    found = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)$", stdout, re.MULTILINE)
    assert found is not None
    return float(found[1]) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[found[2]]


# -- measure: what one wrk run becomes ----------------------------------------


def test_measure_takes_rates_and_latency_in_ms_from_wrks_summary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = _measure(monkeypatch, BASE_SINGLE, SINGLE)

    assert result["requests"] == result["ok_requests"] == 2642
    assert result["requests_per_s"] == round(2642 / 2.0055, 1)
    assert result["pulses_per_s"] == round(2642 / 2.0055, 1)
    assert result["non_2xx"] == 0
    assert result["latency_ms"]["p99"] == pytest.approx(_text_percentile_ms(BASE_SINGLE, 99), 0.01)
    assert result["latency_ms"]["p50"] == pytest.approx(_text_percentile_ms(BASE_SINGLE, 50), 0.01)


def test_measure_counts_only_2xx_answers_as_throughput(monkeypatch: pytest.MonkeyPatch) -> None:
    result = _measure_or_refuse(monkeypatch, STUB_MIXED, SINGLE)
    if result is None:
        return
    assert result["ok_requests"] == 1
    assert result["non_2xx"] == 316
    assert result["pulses_per_s"] == round(1 / 2.004863, 1)


def test_p99_of_answers_that_all_came_after_the_timeout_is_not_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # wrk counts an answer slower than --timeout as a request and a 202, but
    # leaves its latency out of the histogram: every answer here took 1.5 s.
    result = _measure_or_refuse(monkeypatch, STUB_SLOW, SINGLE)
    if result is None:
        return
    p99 = result["latency_ms"]["p99"]
    assert p99 is None or p99 >= 1000, (
        f"every answer took over 1 s (wrk timeout 1 s), yet the run records p99 {p99} ms "
        f"and {result['requests_per_s']} req/s of 202s"
    )


def test_p99_is_not_the_latency_of_error_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    # The one 202 took at least 0.2 s; the 316 fast 503s set wrk's percentiles.
    result = _measure_or_refuse(monkeypatch, STUB_MIXED, SINGLE)
    if result is None:
        return
    p99 = result["latency_ms"]["p99"]
    assert p99 is None or p99 >= 200, (
        f"p99 {p99} ms is the 503s' latency: the only accepted request took >= 200 ms"
    )


def _need_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        unavailable("wrk is not installed (apt-get install wrk)")
    assert wrk is not None
    return wrk


def test_pulses_per_s_counts_pulses_the_server_accepted(tmp_path: Path) -> None:
    # One tenant, ids of a fixed prefix: the second load resends ids the first
    # stored, with other contents. The ingestor answers each request 202 with
    # "accepted": 0 and every pulse a conflict, and stores none of them.
    wrk = _need_wrk()
    load = harness.Load("pulses.lua", ("array", "100", "1", "fixed", "1"), 4, 100)
    with harness.scratch_dir(str(tmp_path), "svc") as scratch:
        server = harness.service_server(scratch / "data", tmp_path / "server.log")
        with harness.running(server):
            harness.measure(server, wrk, load, 2)
            before = harness.stored_pulses(server.port)
            result = harness.measure(server, wrk, load, 1)
            stored = harness.stored_pulses(server.port) - before
    claimed = result["pulses_per_s"] * result["duration_s"]
    in_flight = 2 * load.connections * load.pulses_per_request  # of either run, at its end
    assert claimed <= stored + in_flight, (
        f"the run reports {result['pulses_per_s']:,.0f} pulses/s ({claimed:,.0f} pulses, "
        f"{result['statuses']}) while the server stored {stored:,} of them"
    )


# -- run.py: a server that dies during its load ---------------------------------


@pytest.mark.parametrize("target", ["baseline", "service"])
def test_a_server_that_dies_during_its_load_gives_no_figures(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, target: str
) -> None:
    started: list[Any] = []
    real_start = harness.Server.start

    def start(self: Any, ready_timeout: float = 600) -> float:
        started.append(self)
        took: float = real_start(self, ready_timeout)
        return took

    def load_that_outlives_the_server(
        wrk: str | None, port: int, load: Any, seconds: int
    ) -> Record:
        server = next(s for s in started if s.port == port)
        server.process.kill()
        server.process.wait()
        summary = BASE_KILLED.split("BENCH_JSON ", 1)[1]
        return {**json.loads(summary), "tool": "wrk"}

    monkeypatch.setattr(harness.Server, "start", start)
    monkeypatch.setattr(harness, "run_load", load_that_outlives_the_server)
    scratch, logs = tmp_path / "scratch", tmp_path / "logs"
    scratch.mkdir()
    logs.mkdir()
    options = bench_run.Options(
        quick=True,
        runs=3,
        duration=2,
        warmup=0,
        workers=1,
        buckets=1000,
        startup_pulses=1000,
        only=[],
        data_root=str(scratch),
        wrk="wrk",
    )
    results = tmp_path / "results.jsonl"
    rec = bench_run.Recorder(results, "test", options)
    with contextlib.suppress(RuntimeError):
        bench_run._ingest_once(rec, options, (target, "fsync", "array1000", True), 1, logs)

    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert started
    assert all(s.process.poll() is not None for s in started), "a server process was left running"
    assert not any(scratch.iterdir()), "a scratch data dir was left behind"
    figures = [
        f"{r['scenario']}: {r['pulses_per_s']:,.0f} pulses/s" for r in records if r["kind"] == "run"
    ]
    assert not figures, f"the server died during the load, yet the run was recorded: {figures}"


# -- report.py: medians, ranges, ratios, problems ---------------------------------


def _ingest(
    scenario: str, run: int, pulses_per_s: float, p99: float, *, ids: bool = True
) -> Record:
    """A run record as bench/run.py writes it for 1,000-pulse arrays."""
    target = "baseline" if scenario.startswith("base-") else "service"
    return {
        "run_id": "test",
        "kind": "run",
        "scenario": scenario,
        "group": "ingest",
        "target": target,
        "run": run,
        "workers": 1,
        "shape": "array1000",
        "ids": ids,
        "durability": "fsync" if target == "service" else None,
        "tool": "wrk",
        "connections": 4,
        "duration_s": 2.0,
        "requests": round(pulses_per_s / 500),
        "ok_requests": round(pulses_per_s / 500),
        "requests_per_s": pulses_per_s / 1000,
        "pulses_per_request": 1000,
        "pulses_per_s": pulses_per_s,
        "latency_ms": {"p50": p99 / 2, "p90": p99, "p99": p99, "p999": p99, "max": p99, "mean": 1},
        "statuses": {"202": round(pulses_per_s / 500)},
        "non_2xx": 0,
        "socket_errors": {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0},
        "first_error": None,
        "server_cpu": 1.0,
        "load_cpu": 0.3,
        "core_contention": 0.0,
    }


META: Record = {"kind": "meta", "runs": 3, "quick": False, "pinned": True}


def _row(markdown: str, scenario: str) -> str:
    """The report's row of `scenario`, whose name may say on how few runs it rests."""
    named = re.compile(rf"\| {re.escape(scenario)}( \(\d+ of \d+ runs\))? \|")
    return next(line for line in markdown.splitlines() if named.match(line))


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_report_takes_medians_ranges_and_ratios_of_even_and_odd_run_counts() -> None:
    runs = [
        _ingest("base-array1000-ids", 1, 100_000, 10),
        _ingest("base-array1000-ids", 2, 300_000, 30),
        _ingest("base-array1000-ids", 3, 200_000, 20),
        _ingest("base-array1000-ids", 4, 1_000_000, 40),
        _ingest("svc-fsync-array1000-ids", 1, 50_000, 5),
        _ingest("svc-fsync-array1000-ids", 2, 125_000, 15),
        _ingest("svc-fsync-array1000-ids", 3, 75_000, 10),
    ]
    markdown = report.render({**META, "runs": 4}, runs, [])

    base = _cells(_row(markdown, "base-array1000-ids"))
    svc = _cells(_row(markdown, "svc-fsync-array1000-ids"))
    assert base[2] == "250,000 (100,000\u20131,000,000)"
    assert base[6] == "25.0 (10.0\u201340.0)"
    assert svc[2] == "75,000 (50,000\u2013125,000)"
    assert svc[3] == "0.30\u00d7"  # 75,000 / 250,000
    assert svc[7] == "0.40\u00d7"  # p99 10 / 25


@pytest.mark.parametrize(
    "stdout", [BASE_KILLED, STUB_MIXED, STUB_SLOW], ids=["killed", "shedding", "timeouts"]
)
def test_a_run_with_error_answers_socket_errors_or_timeouts_is_refused(
    monkeypatch: pytest.MonkeyPatch, stdout: str
) -> None:
    assert _measure_or_refuse(monkeypatch, stdout, ARRAY1000) is None


def test_report_flags_error_answers_and_socket_errors_of_recorded_runs() -> None:
    """Records written before such runs were refused still show what went wrong."""

    def record(stdout: str, scenario: str, run: int) -> Record:
        line = next(x for x in stdout.splitlines() if x.startswith("BENCH_JSON "))
        raw = json.loads(line.removeprefix("BENCH_JSON "))
        statuses = raw["statuses"]
        ok = sum(n for code, n in statuses.items() if code.startswith("2"))
        found = {"statuses": statuses, "socket_errors": raw["errors"]}
        return {**_ingest(scenario, run, 0, 0), **found, "non_2xx": raw["requests"] - ok}

    runs = [
        record(BASE_KILLED, "base-array1000-ids", 1),
        record(STUB_MIXED, "svc-fsync-array1000-ids", 1),
    ]
    markdown = report.render(META, runs, [])

    assert "socket errors/timeouts 2285" in _row(markdown, "base-array1000-ids")
    assert "non-2xx 503\u00d7316" in _row(markdown, "svc-fsync-array1000-ids")


def test_ratio_is_to_a_baseline_of_the_same_ids_or_none() -> None:
    # The baseline without ids failed twice in its first run, so it has no runs;
    # the one with ids ran. The header says ratios compare the same body shape and ids.
    runs = [
        *(_ingest("base-array1000-ids", i, 400_000, 20) for i in (1, 2, 3)),
        *(_ingest("svc-fsync-array1000-noids", i, 300_000, 30, ids=False) for i in (1, 2, 3)),
    ]
    failures = [
        {"kind": "failure", "scenario": "base-array1000-noids", "run": 1, "error": "died"},
        {"kind": "failure", "error": "failed twice: base-array1000-noids"},
    ]
    markdown = report.render(META, runs, failures)

    svc = _cells(_row(markdown, "svc-fsync-array1000-noids"))
    assert "\u00d7" not in svc[3], f"pulses/s ratio {svc[3]} is to the baseline WITH ids"
    assert "\u00d7" not in svc[7], f"p99 ratio {svc[7]} is to the baseline WITH ids"


def test_a_figure_from_fewer_runs_than_asked_does_not_read_as_a_median_of_all() -> None:
    # run_ingest skips a scenario's later runs once it failed twice: here the
    # baseline has its run 1 only, rendered as if it were the median of 3.
    three = [_ingest("base-array1000-ids", i, 400_000, 20) for i in (1, 2, 3)]
    one = three[:1]
    failures = [
        {"kind": "failure", "scenario": "base-array1000-ids", "run": 2, "error": "died"},
        {"kind": "failure", "error": "failed twice: base-array1000-ids"},
    ]
    all_ran = _row(report.render(META, three, []), "base-array1000-ids")
    one_ran = _row(report.render(META, one, failures), "base-array1000-ids")

    assert one_ran != all_ran, f"1 run of 3 and 3 of 3 render alike: {one_ran}"


# -- report.py: the chart -------------------------------------------------------


class _Axes:
    """Records what report.chart draws on one side of the figure."""

    def __init__(self) -> None:
        self.widths: list[float] = []
        self.errors: list[list[float]] = []
        self.colors: list[str] = []
        self.labels: list[str] = []

    def barh(self, _y: Any, widths: Any, *, xerr: Any, color: Any, **_: Any) -> None:
        self.widths, self.errors, self.colors = list(widths), [list(e) for e in xerr], list(color)

    def set_yticks(self, _ticks: Any, labels: Any, **_: Any) -> None:
        self.labels = list(labels)

    def __getattr__(self, _name: str) -> Any:
        return lambda *_, **__: None

    def drawn(self) -> dict[str, tuple[float, float, float, str]]:
        """label: (median, min, max, colour) as the bar and its error bar show them."""
        return {
            label: (width, width - low, width + high, color)
            for label, width, low, high, color in zip(
                self.labels, self.widths, *self.errors, self.colors, strict=True
            )
        }


def _chart(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, runs: list[Record]) -> list[_Axes]:
    """report.chart with matplotlib replaced by recorders (it need not be installed)."""
    axes = [_Axes(), _Axes()]

    def ignore(*_: Any, **__: Any) -> None:
        return None

    figure = types.SimpleNamespace(suptitle=ignore, tight_layout=ignore, savefig=ignore)
    pyplot = types.ModuleType("matplotlib.pyplot")
    pyplot.subplots = lambda *_, **__: (figure, tuple(axes))  # type: ignore[attr-defined]
    pyplot.close = lambda *_: None  # type: ignore[attr-defined]
    matplotlib = types.ModuleType("matplotlib")
    matplotlib.use = lambda *_: None  # type: ignore[attr-defined]
    matplotlib.pyplot = pyplot  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "matplotlib", matplotlib)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    report.chart(runs, tmp_path / "chart.png")
    return axes


def _reads(scenario: str, run: int, pages_per_s: float, p99: float) -> Record:
    """A GET /aggregates run record as bench/run.py wrote it before it named the
    durability (the service's default, fsync)."""
    record = _ingest(scenario, run, 0, p99)
    for key in ("shape", "ids", "durability"):
        del record[key]
    record.update(
        group="aggregates",
        buckets=50_000,
        page=1000,
        requests_per_s=pages_per_s,
        rows_per_s=pages_per_s * 1000,
        pulses_per_request=0,
    )
    return record


def test_chart_draws_the_reports_medians_and_ranges(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    runs = [
        _ingest("base-array1000-ids", 1, 100_000, 10),
        _ingest("base-array1000-ids", 2, 300_000, 30),
        _ingest("base-array1000-ids", 3, 200_000, 20),
        _ingest("svc-fsync-array1000-ids", 1, 50_000, 50),
        _ingest("svc-fsync-array1000-ids", 2, 75_000, 70),
        _ingest("svc-fsync-array1000-ids", 3, 60_000, 90),
    ]
    pulses, p99 = _chart(monkeypatch, tmp_path, runs)

    assert pulses.drawn()["base-array1000-ids"][:3] == (200_000, 100_000, 300_000)
    assert pulses.drawn()["svc-fsync-array1000-ids"][:3] == (60_000, 50_000, 75_000)
    assert p99.drawn()["svc-fsync-array1000-ids"][:3] == (70, 50, 90)


def test_chart_does_not_draw_the_fsync_reads_in_the_colour_of_durability_os(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # svc-aggregates runs on the default durability, fsync; the legend says
    # "blue: fsync, green: os". Its records hold no durability field.
    runs = [
        _ingest("svc-fsync-array1000-ids", 1, 50_000, 50),
        _ingest("svc-os-array1000-ids", 1, 60_000, 40),
        _reads("svc-aggregates-50k", 1, 250, 30),
    ]
    runs[1]["durability"] = "os"
    _, p99 = _chart(monkeypatch, tmp_path, runs)

    colours = {name: drawn[3] for name, drawn in p99.drawn().items()}
    assert colours["svc-aggregates-50k"] != colours["svc-os-array1000-ids"], colours
