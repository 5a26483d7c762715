"""Turn a bench/results/<timestamp>.jsonl into a Markdown report and a chart.

    python bench/report.py bench/results/20250101-120000.jsonl

Per scenario: the median of its runs and their min-max, and the ratio of the
median to the baseline's median under the same load (same body shape, same
ids or none). The chart (PNG, needs matplotlib) shows pulses/s and p99 per
scenario; without matplotlib the report is written and the chart skipped.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

Record = dict[str, Any]
X = "\u00d7"  # multiplication sign
DASH = "\u2013"  # en dash, for ranges


def load(path: Path) -> tuple[Record, list[Record], list[Record]]:
    meta: Record = {}
    runs: list[Record] = []
    other: list[Record] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("kind") == "meta":
            meta = record
        elif record.get("kind") == "run":
            runs.append(record)
        else:
            other.append(record)
    return meta, runs, other


def _group(runs: list[Record]) -> dict[str, list[Record]]:
    by: dict[str, list[Record]] = defaultdict(list)
    for r in runs:
        by[r["scenario"]].append(r)
    return by


def _stat(runs: list[Record], get: Callable[[Record], float]) -> tuple[float, float, float]:
    values = [get(r) for r in runs]
    return median(values), min(values), max(values)


def _num(value: float, digits: int = 0) -> str:
    if value >= 100 or digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _cell(stat: tuple[float, float, float], digits: int = 0) -> str:
    mid, low, high = stat
    return f"{_num(mid, digits)} ({_num(low, digits)}{DASH}{_num(high, digits)})"


def _fewer(runs: list[Record], meta: Record) -> str:
    """ " (1 of 3 runs)" after a scenario whose figures rest on fewer runs than
    the bench asked for (it failed), else nothing."""
    asked = meta.get("runs") or 0
    return f" ({len(runs)} of {asked} runs)" if len(runs) < asked else ""


def _ratio(value: float, base: float | None) -> str:
    if not base:
        return "—"
    return f"{value / base:.2f}{X}"


def _baseline_for(r: Record, by: dict[str, list[Record]]) -> list[Record] | None:
    """The baseline's runs of the same body shape and ids: none, no ratio."""
    return by.get(f"base-{r['shape']}-{'ids' if r['ids'] else 'noids'}")


def _problems(runs: list[Record]) -> str:
    non_2xx = sum(r.get("non_2xx", 0) for r in runs)
    sock = sum(
        sum(r.get("socket_errors", {}).values()) - r.get("socket_errors", {}).get("status", 0)
        for r in runs
    )
    lost = sum(r.get("lost_pulses", 0) for r in runs)
    logged = sum((r.get("server_log") or {}).get("errors", 0) for r in runs)
    parts = []
    if non_2xx:
        codes: dict[str, int] = defaultdict(int)
        for r in runs:
            for code, n in r.get("statuses", {}).items():
                if not code.startswith("2"):
                    codes[code] += n
        parts.append("non-2xx " + ", ".join(f"{c}{X}{n}" for c, n in sorted(codes.items())))
    if sock:
        parts.append(f"socket errors/timeouts {sock}")
    if lost:
        parts.append(f"**LOST {lost} acked pulses**")
    if logged:
        parts.append(f"{logged} error lines in log")
    contended = [r for r in runs if (r.get("core_contention") or 0) > 0.15]
    if contended:
        worst = max(r["core_contention"] for r in contended)
        parts.append(
            f"{len(contended)} run(s) shared the server's core with other processes "
            f"(up to {worst:.0%})"
        )
    if runs and median([r.get("load_cpu", 0) for r in runs]) > 0.9:
        parts.append("load generator near 100% CPU: a floor, not the server's limit")
    return "; ".join(parts) or "none"


def render(meta: Record, runs: list[Record], other: list[Record]) -> str:
    by = _group(runs)
    dirty = " + uncommitted changes in ingestor/" if meta.get("git_dirty") else ""
    lines = [
        f"# Bench {meta.get('started', '')}{' (quick)' if meta.get('quick') else ''}",
        "",
        f"- commit `{meta.get('git', '?')}`{dirty}; "
        f"Python {meta.get('python')}; {meta.get('cores')} cores ({meta.get('cpu')})",
        f"- load: {meta.get('load_tool')}; {meta.get('runs')} runs per scenario, "
        f"{meta.get('duration_s')} s each after {meta.get('warmup_s')} s warm-up; "
        f"ingestor workers: {meta.get('workers')}",
        (
            "- **pinned**: server on core "
            f"{meta.get('server_cpu')} (`taskset -c {meta.get('server_cpu')}`), load generator on "
            f"core {meta.get('load_cpu')} (`taskset -c {meta.get('load_cpu')}`): per-core figures "
            "are for one core of server."
            if meta.get("pinned")
            else "- **not pinned** (no taskset or one core): server and load share the cores"
        ),
        f"- the machine is shared and noisy: read min{DASH}max before reading medians; "
        "ratios compare runs of the same bench run.",
        f"- cells are `median (min{DASH}max)`; {X}base is the median over the baseline's median "
        "(bench/baseline.py, same body shape and ids) — for p99, lower is better.",
        "",
        "## Ingest (POST /pulses)",
        "",
        f"| scenario | conns | pulses/s | {X}base | requests/s | p50 ms | p99 ms | {X}base p99 "
        "| server CPU | problems |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    ingest = [s for s, rs in by.items() if rs[0]["group"] == "ingest"]
    ingest.sort(key=lambda s: (by[s][0]["target"] != "baseline", s))
    for name in ingest:
        rs = by[name]
        pulses = _stat(rs, lambda r: r["pulses_per_s"])
        reqs = _stat(rs, lambda r: r["requests_per_s"])
        p50 = _stat(rs, lambda r: r["latency_ms"]["p50"])
        p99 = _stat(rs, lambda r: r["latency_ms"]["p99"])
        cpu = median([r["server_cpu"] for r in rs])
        base = _baseline_for(rs[0], by) if rs[0]["target"] == "service" else None
        base_p = median([r["pulses_per_s"] for r in base]) if base else None
        base_p99 = median([r["latency_ms"]["p99"] for r in base]) if base else None
        lines.append(
            f"| {name}{_fewer(rs, meta)} | {rs[0]['connections']} | {_cell(pulses)} "
            f"| {_ratio(pulses[0], base_p)} "
            f"| {_cell(reqs, 1)} | {_cell(p50, 1)} | {_cell(p99, 1)} "
            f"| {_ratio(p99[0], base_p99)} | {cpu:.2f} | {_problems(rs)} |"
        )
    reads = [s for s, rs in by.items() if rs[0]["group"] == "aggregates"]
    if reads:
        base_reads = next((by[s] for s in reads if by[s][0]["target"] == "baseline"), None)
        base_rows = median([r["rows_per_s"] for r in base_reads]) if base_reads else None
        lines += [
            "",
            f"## GET /aggregates?limit=1000 over {by[reads[0]][0]['buckets']:,} "
            "buckets (every page in turn, 4 connections)",
            "",
            f"| scenario | pages/s | rows/s | {X}base | p50 ms | p99 ms | server CPU | problems |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name in sorted(reads):
            rs = by[name]
            rows = _stat(rs, lambda r: r["rows_per_s"])
            lines.append(
                f"| {name}{_fewer(rs, meta)} "
                f"| {_cell(_stat(rs, lambda r: r['requests_per_s']), 1)} "
                f"| {_cell(rows)} "
                f"| {_ratio(rows[0], base_rows) if name.startswith('svc') else '—'} "
                f"| {_cell(_stat(rs, lambda r: r['latency_ms']['p50']), 1)} "
                f"| {_cell(_stat(rs, lambda r: r['latency_ms']['p99']), 1)} "
                f"| {median([r['server_cpu'] for r in rs]):.2f} | {_problems(rs)} |"
            )
    commits = [s for s, rs in by.items() if rs[0]["group"] in ("commit", "preload")]
    if commits:
        lines += [
            "",
            "## Commit and bulk load",
            "",
            "| scenario | what | seconds | rate | problems |",
            "|---|---|---:|---:|---|",
        ]
        for name in sorted(commits):
            rs = by[name]
            if rs[0]["group"] == "commit":
                bad = [r for r in rs if r.get("status") != 200 or r.get("records") != r["buckets"]]
                trouble = "; ".join(
                    str(r.get("error") or f"committed {r.get('records'):,} of {r['buckets']:,}")
                    for r in bad
                )
                lines.append(
                    f"| {name} | POST /aggregates/commit of a day with {rs[0]['buckets']:,} "
                    f"buckets (fsync) | {_cell(_stat(rs, lambda r: r['commit_s']), 3)} "
                    f"| {_cell(_stat(rs, lambda r: r['buckets_per_s']))} buckets/s "
                    f"| {trouble or 'none'} |"
                )
            else:
                lines.append(
                    f"| {name} | {rs[0]['pulses']:,} pulses as 10,000-pulse arrays, one client, "
                    f"fsync | {_cell(_stat(rs, lambda r: r['seconds']), 3)} "
                    f"| {_cell(_stat(rs, lambda r: r['pulses_per_s']))} pulses/s | none |"
                )
    starts = [s for s, rs in by.items() if rs[0]["group"] == "startup"]
    if starts:
        base_start = by.get("base-startup")
        base_s = median([r["ready_s"] for r in base_start]) if base_start else None
        lines += [
            "",
            "## Start-up (process spawn to first GET /readyz 200)",
            "",
            f"| scenario | store | seconds | {X}base |",
            "|---|---|---:|---:|",
        ]
        for name in sorted(starts):
            rs = by[name]
            store = (
                f"{rs[0]['pulses']:,} pulses, {rs[0].get('store_mib', 0):,.0f} MiB "
                "(page cache warm)"
                if rs[0].get("pulses")
                else "new, empty"
                if rs[0]["target"] == "service"
                else "—"
            )
            stat = _stat(rs, lambda r: r["ready_s"])
            lines.append(
                f"| {name} | {store} | {_cell(stat, 3)} "
                f"| {_ratio(stat[0], base_s) if name.startswith('svc') else '—'} |"
            )
    failures = [r for r in other if r.get("kind") == "failure"]
    if failures:
        lines += ["", "## Failed steps", ""]
        for r in failures:
            text = r["error"].splitlines() or [""]
            tail = " / ".join(line.strip() for line in text[-2:]) if len(text) > 1 else ""
            where = f"{r['scenario']} #{r['run']}: " if "scenario" in r else ""
            lines.append(f"- {where}{text[0][:300]}" + (f" … {tail[:300]}" if tail else ""))
    firsts = [(s, r["first_error"]) for s, rs in by.items() for r in rs if r.get("first_error")]
    if firsts:
        lines += ["", "## First error answer per scenario", ""]
        seen = set()
        for name, text in firsts:
            if name not in seen:
                seen.add(name)
                lines.append(f"- {name}: `{text[:200]}`")
    end = next((r for r in other if r.get("kind") == "end"), None)
    if end:
        lines += ["", f"Total bench time: {end['elapsed_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def chart(runs: list[Record], out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "report: matplotlib not installed; no chart (pip install matplotlib)", file=sys.stderr
        )
        return None
    by = _group(runs)
    ingest = sorted(
        (s for s, rs in by.items() if rs[0]["group"] == "ingest"),
        key=lambda s: (by[s][0]["target"] != "baseline", s),
    )
    timed = ingest + sorted(s for s, rs in by.items() if rs[0]["group"] == "aggregates")
    if not ingest:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 0.42 * len(timed) + 1.8), sharey=False)

    def bars(ax: Any, names: list[str], get: Callable[[Record], float], title: str) -> None:
        stats = [_stat(by[n], get) for n in names]
        mids = [s[0] for s in stats]
        errors = [[s[0] - s[1] for s in stats], [s[2] - s[0] for s in stats]]
        colors = [
            "#999999"
            if by[n][0]["target"] == "baseline"
            else "#1f77b4"
            if by[n][0].get("durability", "fsync") == "fsync"  # reads: the default
            else "#2ca02c"
            for n in names
        ]
        ax.barh(range(len(names)), mids, xerr=errors, color=colors, capsize=3)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", which="both", alpha=0.3)

    bars(left, ingest, lambda r: r["pulses_per_s"], f"pulses/s (median, min{DASH}max; log)")
    bars(
        right,
        timed,
        lambda r: r["latency_ms"]["p99"],
        f"p99 latency ms (median, min{DASH}max; log)",
    )
    fig.suptitle(
        "billing-ingestor bench — grey: baseline, blue: fsync, green: os (server pinned to 1 core)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(path: Path) -> tuple[Path, Path | None]:
    meta, runs, other = load(path)
    markdown = path.with_suffix(".md")
    markdown.write_text(render(meta, runs, other))
    return markdown, chart(runs, path.with_suffix(".png"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/report.py bench/results/<timestamp>.jsonl")
    md, png = write_report(Path(sys.argv[1]))
    print(md, png or "")
