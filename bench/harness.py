"""The moving parts the bench scripts share: servers, load, small HTTP calls.

A server (the ingestor or bench/baseline.py) runs as its own process pinned
to one core (`taskset -c 1`); the load generator (wrk, with the Lua scripts in
bench/lua/) runs pinned to the other (`taskset -c 0`), so "per core" means one
core of server. Without taskset, or on a one-core machine, nothing is pinned
and the report says so.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
LUA = BENCH / "lua"
PYTHON = sys.executable
SERVER_CPU = "1"
LOAD_CPU = "0"
TENANTS = 100


def pinning_available() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


def pinned(cpu: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if pinning_available() else argv


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def apt_tool(command: str, package: str) -> str | None:
    """`command`'s path; installs Debian's `package` with apt-get when it is
    missing and that is possible (root, apt-get there). None if it is not."""
    found = shutil.which(command)
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        print(f"bench: {command} not found; installing {package} with apt-get", file=sys.stderr)
        for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
            subprocess.run(argv, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        found = shutil.which(command)
    return found


def ensure_wrk() -> str | None:
    """wrk's path; installs it with apt-get when missing and possible.

    BENCH_NO_WRK=1 forces the Python fallback (bench/pyload.py), for testing it.
    """
    if os.environ.get("BENCH_NO_WRK"):
        return None
    found = apt_tool("wrk", "wrk")
    if found is None:
        print(
            "bench: wrk unavailable; using the Python load generator (slower, "
            "its own limits show in the figures)",
            file=sys.stderr,
        )
    return found


def command_output(argv: list[str]) -> str:
    """What `argv` prints, stripped; "" if it cannot run."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=False)
    except OSError:
        return ""
    return done.stdout.strip()


def machine() -> dict[str, Any]:
    """What a result was measured with and on: the commit, Python, the CPU, the pinning."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "git": command_output(["git", "rev-parse", "--short", "HEAD"]),
        "git_dirty": bool(command_output(["git", "status", "--porcelain", "--", "ingestor"])),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "pinned": pinning_available(),
    }


# -- HTTP calls of the harness itself (setup and checks, never timed load) -----


def request(
    port: int,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    content_type: str = "application/json",
    timeout: float = 120,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": content_type} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def post_json(port: int, path: str, value: object, timeout: float = 300) -> tuple[int, Any]:
    status, body = request(port, "POST", path, body=json.dumps(value).encode(), timeout=timeout)
    return status, json.loads(body) if body else None


def get_json(port: int, path: str) -> tuple[int, Any]:
    status, body = request(port, "GET", path)
    return status, json.loads(body) if body else None


# -- servers ------------------------------------------------------------------


@dataclass
class Server:
    """One server process, pinned, logging to a file."""

    argv: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cpus: str = SERVER_CPU  # taskset list: one core, or "0,1" for several workers
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready_after: float | None = None

    def start(self, ready_timeout: float = 600) -> float:
        """Start and wait for GET /readyz 200; the seconds from spawn to ready."""
        env = {**os.environ, **self.env}
        log = self.log_path.open("ab")
        self.started_at = time.perf_counter()
        self.process = subprocess.Popen(
            pinned(self.cpus, self.argv),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        log.close()
        deadline = self.started_at + ready_timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.process.returncode}; "
                    f"see {self.log_path}:\n{self.log_tail()}"
                )
            try:
                status, _ = request(self.port, "GET", "/readyz", timeout=2)
            except OSError:
                status = 0
            if status == 200:
                self.ready_after = time.perf_counter() - self.started_at
                return self.ready_after
            time.sleep(0.005)
        self.stop()
        raise RuntimeError(f"server not ready after {ready_timeout}s; see {self.log_path}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def pids(self) -> list[int]:
        """The server process and its worker processes (`--workers`), its children."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        return [self.pid, *map(int, children)]

    def cpu_seconds(self) -> float:
        """User + system CPU time so far of the server process (all its threads)
        and of its worker processes."""
        try:
            total = 0
            for pid in self.pids():
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        except OSError:
            return float("nan")
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_problems(self) -> dict[str, Any]:
        """Counts of WARNING/ERROR/Traceback lines in the log, and the first few."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return {}
        bad = [
            line
            for line in text
            if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")
        ]
        warnings = [line for line in text if " WARNING " in line]
        return {"errors": len(bad), "warnings": len(warnings), "first": (bad + warnings)[:3]}


def service_server(
    data_dir: Path,
    log_path: Path,
    *,
    durability: str = "fsync",
    workers: int = 1,
    extra_env: dict[str, str] | None = None,
    cpus: str = SERVER_CPU,
) -> Server:
    port = free_port()
    env = {
        "INGESTOR_DURABILITY": durability,
        "INGESTOR_WORKERS": str(workers),
        "INGESTOR_LOG_LEVEL": "warning",
        **(extra_env or {}),
    }
    argv = [
        PYTHON,
        "-m",
        "ingestor",
        "serve",
        "--bind",
        f"127.0.0.1:{port}",
        "--data-dir",
        str(data_dir),
    ]
    return Server(argv, port, log_path, env, cpus)


def baseline_server(log_path: Path) -> Server:
    port = free_port()
    return Server(
        [PYTHON, str(BENCH / "baseline.py"), "--bind", f"127.0.0.1:{port}"], port, log_path
    )


@contextmanager
def running(server: Server) -> Iterator[Server]:
    server.start()
    try:
        yield server
    except (OSError, RuntimeError) as exc:
        code = server.process.poll() if server.process else None
        state = "still running" if code is None else f"exited with {code}"
        raise RuntimeError(f"{exc} (server {state}; log: {server.log_path})") from exc
    finally:
        server.stop()


@contextmanager
def scratch_dir(root: str | None, name: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- load -----------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """What one load run sends: a Lua script and its arguments."""

    script: str
    args: tuple[str, ...]
    connections: int
    pulses_per_request: int = 0

    @staticmethod
    def pulses(
        shape: str, count: int, ids: bool, connections: int, *, random_ids: bool = False
    ) -> Load:
        """`ids`: every pulse has a new id; `random_ids`: made of random digits, not
        of a prefix and a counter (see lua/pulses.lua)."""
        prefix = secrets.token_hex(6)  # new per run: ids never repeat across runs
        mode = ("random" if random_ids else "1") if ids else "0"
        return Load(
            "pulses.lua",
            (shape, str(count), mode, prefix, str(TENANTS)),
            connections,
            count,
        )

    @staticmethod
    def pages(paths_file: Path, connections: int) -> Load:
        return Load("pages.lua", (str(paths_file),), connections)


def run_wrk(wrk: str, port: int, load: Load, duration: int, timeout_s: int = 10) -> dict[str, Any]:
    """One wrk run; its JSON summary (see lua/report.lua) plus the raw text."""
    argv = pinned(
        LOAD_CPU,
        [
            wrk,
            "-t1",
            f"-c{load.connections}",
            f"-d{duration}s",
            f"--timeout={timeout_s}s",
            "--latency",
            "-s",
            str(LUA / load.script),
            f"http://127.0.0.1:{port}",
            "--",
            *load.args,
        ],
    )
    env = {**os.environ, "BENCH_LUA_DIR": str(LUA)}
    done = subprocess.run(
        argv,
        env=env,
        capture_output=True,
        text=True,
        timeout=duration + timeout_s + 60,
        check=False,
    )
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            result: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
            result["tool"] = "wrk"
            return result
    raise RuntimeError(
        f"wrk gave no summary (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    )


def run_python_load(port: int, load: Load, duration: int, timeout_s: int = 10) -> dict[str, Any]:
    """The fallback when wrk cannot be had: bench/pyload.py in its own process."""
    argv = pinned(
        LOAD_CPU,
        [
            PYTHON,
            str(BENCH / "pyload.py"),
            "--port",
            str(port),
            "--connections",
            str(load.connections),
            "--duration",
            str(duration),
            "--timeout",
            str(timeout_s),
            "--script",
            load.script,
            "--",
            *load.args,
        ],
    )
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration + timeout_s + 60, check=False
    )
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            result: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
            result["tool"] = "pyload"
            return result
    raise RuntimeError(f"pyload gave no summary (exit {done.returncode}):\n{done.stderr}")


def run_load(wrk: str | None, port: int, load: Load, duration: int) -> dict[str, Any]:
    if wrk:
        return run_wrk(wrk, port, load, duration)
    return run_python_load(port, load, duration)


def core_busy(cpu: str) -> tuple[float, float]:
    """(busy, total) jiffies of one core so far, from /proc/stat."""
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith(f"cpu{cpu} "):
                ticks = [int(x) for x in line.split()[1:]]
                idle = ticks[3] + ticks[4]  # idle + iowait
                return sum(ticks) - idle, sum(ticks)
    except OSError:
        pass
    return float("nan"), float("nan")


def _refuse_unclean(server: Server, raw: dict[str, Any], non_2xx: int) -> None:
    """Raise RuntimeError if a run's figures would not be the server's own.

    wrk's latencies cover every answer, the 503s of a server shedding load
    among them, and leave out those slower than its timeout, though it
    counts their statuses: a run with either, or with a connection that
    failed, would report a latency no client had. A server that exited
    during the load took only part of it.
    """
    process = getattr(server, "process", None)
    if process is not None and process.poll() is not None:
        raise RuntimeError(f"the server exited with {process.returncode} during the load")
    errors = {kind: n for kind, n in raw["errors"].items() if kind != "status" and n}
    if non_2xx or errors:
        raise RuntimeError(
            f"{non_2xx} answers not 2xx, socket errors {errors or 'none'}"
            f" (first error: {raw.get('first_error')}): the run's figures are not the server's"
        )


def measure(server: Server, wrk: str | None, load: Load, duration: int) -> dict[str, Any]:
    """Load `server` for `duration` s; rates, latency, status counts, server CPU."""
    core_before = core_busy(SERVER_CPU)
    cpu_before = server.cpu_seconds()
    load_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    raw = run_load(wrk, server.port, load, duration)
    load_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_after = server.cpu_seconds()
    core_after = core_busy(SERVER_CPU)
    load_cpu = (
        load_after.ru_utime + load_after.ru_stime - load_before.ru_utime - load_before.ru_stime
    )
    seconds = raw["duration_us"] / 1e6
    busy, total = core_after[0] - core_before[0], core_after[1] - core_before[1]
    core_share = busy / total if total else float("nan")
    statuses = {k: int(v) for k, v in raw["statuses"].items()}
    ok = sum(v for k, v in statuses.items() if k.startswith("2"))
    _refuse_unclean(server, raw, raw["requests"] - ok)
    # The pulses the server said it took; a load of pages has none to count.
    accepted = raw.get("accepted", ok * load.pulses_per_request)
    lat = raw["latency_us"]
    return {
        "tool": raw["tool"],
        "connections": load.connections,
        "duration_s": round(seconds, 3),
        "requests": raw["requests"],
        "ok_requests": ok,
        "requests_per_s": round(ok / seconds, 1),
        "pulses_per_request": load.pulses_per_request,
        "accepted_pulses": accepted,
        "pulses_per_s": round(accepted / seconds, 1),
        "latency_ms": {
            k: round(lat[k] / 1000, 3) for k in ("p50", "p90", "p99", "p999", "max", "mean")
        },
        "statuses": statuses,
        "non_2xx": raw["requests"] - ok,
        "socket_errors": raw["errors"],
        "first_error": raw.get("first_error"),
        "server_cpu": round((cpu_after - cpu_before) / seconds, 3),
        # Near 1.0 means the load generator, not the server, set the pace.
        "load_cpu": round(load_cpu / seconds, 3),
        # The server's core busy with other processes: a shared machine's noise.
        "core_contention": round(max(0.0, core_share - (cpu_after - cpu_before) / seconds), 3)
        if not math.isnan(core_share)
        else None,
    }


# -- small helpers for the scenarios ---------------------------------------------


def rss_kib(pid: int) -> int:
    """The resident memory of process `pid`, in KiB (0 if /proc does not say)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def warm_up(port: int, ids: bool) -> None:
    """A few requests of each kind, so lazy imports and caches are not timed."""
    tag = secrets.token_hex(4)
    for i in range(5):
        pulse = {"tenant_id": "warmup", "product_sku": "s", "use_unit": "u", "used_amount": "1"}
        if ids:
            pulse["id"] = f"warm-{tag}-{i}"
        post_json(port, "/pulses", pulse)
        post_json(
            port,
            "/pulses",
            [dict(pulse, id=f"warm-{tag}-{i}-{j}") if ids else pulse for j in range(100)],
        )


def stored_pulses(port: int) -> int:
    """Pulses stored so far (sum of pulse_count over all buckets), warm-up excluded."""
    total, cursor = 0, None
    while True:
        path = "/aggregates?limit=10000" + (f"&cursor={cursor}" if cursor else "")
        status, page = get_json(port, path)
        if status != 200:
            raise RuntimeError(f"GET /aggregates answered {status}: {page}")
        total += sum(
            int(row["pulse_count"]) for row in page["aggregates"] if row["tenant_id"] != "warmup"
        )
        cursor = page.get("next_cursor")
        if not cursor:
            return total
