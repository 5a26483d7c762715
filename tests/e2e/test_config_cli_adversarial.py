"""Configuration, the command line, start-up and shutdown, as an operator meets them.

Each source of a setting (TOML file, INGESTOR_* environment, flags) is given
mistakes, and the command must answer with exit code 2 and one line that
names the setting: never a traceback, never a secret. Start-up failures
(port in use, a data dir that cannot hold a store, a store that cannot be
reached) must end the process with a clear message; SIGTERM and SIGINT must
end it cleanly at any moment, with one process or several workers.

Waits are polls of the process's output or of /readyz, bounded by deadlines.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import pytest
import trio

import ingestor.__main__ as cli
from ingestor.config import load_settings
from ingestor.errors import ConfigError
from tests.e2e.cluster_support import fresh_database, require_postgres
from tests.support.fixtures import StartServer
from tests.support.server import ServerError, free_port, wait_until

PYTHON = sys.executable
SECRET = "Hunter2pw"  # a password or secret that no message may show
ADMIN_KEY = {"sha256": "0" * 64, "role": "admin", "tenants": ["*"]}


def clean_env(**extra: str) -> dict[str, str]:
    """The runner's environment without its INGESTOR_* variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTOR_")}
    env.update(extra)
    return env


def run_cli(
    args: list[str], cwd: Path, *, timeout: float = 15, **env: str
) -> subprocess.CompletedProcess[str]:
    """`python -m ingestor ARGS` to its end (a server still running at `timeout` fails)."""
    return subprocess.run(
        [PYTHON, "-m", "ingestor", *args],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


class _Started(Exception):
    """The command went on to serve: the configuration was accepted."""


@pytest.fixture
def cli_in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> Any:
    """Run `main(argv)` here, with `env` as the only INGESTOR_* variables; never serve."""

    def refuse_to_serve(*args: object, **kwargs: object) -> None:
        raise _Started

    monkeypatch.setattr("ingestor.service.run_service", refuse_to_serve)
    monkeypatch.setattr("ingestor.workers.run_workers", refuse_to_serve)
    monkeypatch.chdir(tmp_path)

    def run(argv: list[str], env: dict[str, str] | None = None) -> tuple[int | str, str]:
        for key in list(os.environ):
            if key.startswith("INGESTOR_"):
                monkeypatch.delenv(key)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        try:
            code: int | str = cli.main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
        except _Started:
            code = "started"
        except Exception as exc:
            pytest.fail(f"{argv} {env}: raised {exc!r} instead of a configuration error")
        return code, capsys.readouterr().err

    return run


def _new_log(cwd: Path) -> tuple[Path, BinaryIO]:
    log = cwd / f"output-{len(list(cwd.glob('output-*')))}.log"
    return log, open(log, "wb")


class Spawned:
    """A `python -m ingestor ...` child whose output goes to a file."""

    def __init__(self, process: trio.Process, log: Path) -> None:
        self.process = process
        self.log = log

    @classmethod
    async def start(
        cls, args: list[str], cwd: Path, *, new_session: bool = False, **env: str
    ) -> Spawned:
        log, out = _new_log(cwd)
        with out:
            process = await trio.lowlevel.open_process(
                [PYTHON, "-m", "ingestor", *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=clean_env(**env),
                cwd=cwd,
                start_new_session=new_session,
            )
        return cls(process, log)

    @property
    def output(self) -> str:
        return self.log.read_bytes().decode(errors="replace")

    async def wait_output(self, pattern: str, count: int = 1, within: float = 15) -> None:
        async def seen() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"exited {self.process.returncode}:\n{self.output}")
            return len(re.findall(pattern, self.output)) >= count

        await wait_until(seen, within=within, what=f"{count} x {pattern!r}", interval=0.01)

    async def wait_exit(self, within: float) -> int:
        with trio.move_on_after(within):
            return await self.process.wait()
        self.kill()
        await self.process.wait()
        raise AssertionError(f"still running {within} s later; output:\n{self.output}")

    def kill(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.process.kill()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            self.kill()
            await self.process.wait()


async def wait_ready(url: str, process: Spawned, within: float = 20) -> None:
    async with httpx.AsyncClient(timeout=2) as http:

        async def ready() -> bool:
            if process.process.poll() is not None:
                raise AssertionError(f"exited {process.process.returncode}:\n{process.output}")
            try:
                return (await http.get(f"{url}/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_until(ready, within=within, what=f"{url}/readyz 200", interval=0.02)


# --- configuration mistakes: exit 2, one line naming the setting ----------------------


@pytest.mark.parametrize(
    ("argv", "env", "name"),
    [
        (["--workers", "0"], {}, "workers"),
        (["--workers", "-2"], {}, "workers"),
        (["--bind", ""], {}, "bind"),
        (["--bind", "0.0.0.0:8081"], {}, "api_keys"),
        ([], {"INGESTOR_PARTITIONS": " 8 "}, "partitions"),
        ([], {"INGESTOR_PARTITIONS": "9" * 40}, "partitions"),
        ([], {"INGESTOR_MAX_BODY_BYTES": "-1"}, "max_body_bytes"),
        ([], {"INGESTOR_WORKERS": "1.5"}, "workers"),
        ([], {"INGESTOR_LATE_WINDOW": "1d2h"}, "late_window"),
        ([], {"INGESTOR_FUTURE_SKEW": "5M"}, "future_skew"),
        ([], {"INGESTOR_COMMIT_INTERVAL": "1e3"}, "commit_interval"),
        ([], {"INGESTOR_DURABILITY": ""}, "durability"),
        ([], {"INGESTOR_LOG_LEVEL": "INFO"}, "log_level"),
        ([], {"INGESTOR_SINK": "http://billing.local/in"}, "sink_secret"),
        ([], {"INGESTOR_CONFIG": "ingestor.toml"}, "INGESTOR_CONFIG"),
        ([], {"INGESTOR_API_KEYS": "[]"}, "INGESTOR_API_KEYS"),
        ([], {"INGESTOR_RETRY_INITIAL": "10m", "INGESTOR_RETRY_MAX": "5m"}, "retry_max"),
    ],
)
def test_cli_config_mistakes_exit_2_with_one_line_naming_the_setting(
    cli_in_process: Any, argv: list[str], env: dict[str, str], name: str
) -> None:
    code, err = cli_in_process(["serve", *argv], env)
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"billing-ingestor: configuration error: {name}"), err


def test_cross_check_across_sources_file_late_window_env_dedup_window(
    cli_in_process: Any, tmp_path: Path
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('late_window = "2d"\n')
    code, err = cli_in_process(["serve", "--config", str(config)], {"INGESTOR_DEDUP_WINDOW": "1d"})
    assert (code, err.split(": ")[2]) == (2, "dedup_window"), err


@pytest.mark.parametrize(
    ("toml", "name"),
    [
        ("workers = 2.5\n", "workers"),
        ("partiton = 4\n", "partiton"),
        (
            "[[api_keys]]\nrole = 'admin'\ntenants = ['*']\nsha256 = 'plainTextKey-Hunter2pw'\n",
            "api_keys[0].sha256",
        ),
        (
            "[[api_keys]]\nrole = 'admin'\ntenants = ['*']\nsha256 = '"
            + "a" * 64
            + "'\nkey = 'x'\n",
            "api_keys[0]",
        ),
        ("sink_secret = 123\n", "sink_secret"),
    ],
)
def test_file_mistakes_name_the_setting_and_echo_no_key(
    cli_in_process: Any, tmp_path: Path, toml: str, name: str
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(toml)
    code, err = cli_in_process(["serve", "--config", str(config)])
    assert code == 2, err
    assert err.startswith(f"billing-ingestor: configuration error: {name}"), err
    assert SECRET not in err


@pytest.mark.parametrize("which", ["missing", "directory"])
def test_config_file_missing_or_a_directory(
    cli_in_process: Any, tmp_path: Path, which: str
) -> None:
    path = tmp_path / "nope.toml" if which == "missing" else tmp_path
    code, err = cli_in_process(["serve", "--config", str(path)])
    assert code == 2
    assert err.startswith("billing-ingestor: configuration error: config file"), err
    assert str(path) in err


def test_argparse_mistakes_and_help_list_what_exists(
    cli_in_process: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_in_process(["serve", "--workers", "many"])[0] == 2
    assert cli_in_process(["frobnicate"])[0] == 2
    assert cli_in_process(["serve", "--port", "1"])[0] == 2
    with pytest.raises(SystemExit) as done:
        cli.main(["serve", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--bind", "--data-dir", "--config", "--workers"):
        assert flag in text
    # Every flag --help shows is one serve accepts.
    assert set(re.findall(r"--[a-z-]+", text)) == {
        "--help",
        "--bind",
        "--data-dir",
        "--config",
        "--workers",
    }


def test_bind_port_in_unicode_digits_is_a_config_error(cli_in_process: Any) -> None:
    """'²'.isdigit() is True but int('²') raises: `_check` lets a ValueError out."""
    code, err = cli_in_process(["serve", "--bind", "127.0.0.1:²"])
    assert code == 2, err
    assert err.startswith("billing-ingestor: configuration error: bind"), err


@pytest.mark.parametrize(
    ("toml", "names"),
    [
        ("late_window = inf\ndedup_window = inf\n", ("late_window", "dedup_window")),
        ("dedup_window = inf\n", ("dedup_window",)),
        ("future_skew = inf\n", ("future_skew",)),
        ("commit_grace = inf\n", ("commit_grace",)),
        ("retry_max = inf\n", ("retry_max",)),
    ],
)
def test_infinite_duration_in_the_file_is_a_config_error_not_a_traceback(
    tmp_path: Path, toml: str, names: tuple[str, ...]
) -> None:
    """TOML has `inf`; `Seconds` asked only gt=0, and `int(inf * 1e6)` failed at start."""
    config = tmp_path / "inf.toml"
    config.write_text(toml)
    args = ["serve", "--bind", "127.0.0.1:0", "--data-dir", str(tmp_path / "d")]
    done = run_cli([*args, "--config", str(config)], tmp_path)
    assert "Traceback" not in done.stderr, done.stderr[-1500:]
    assert done.returncode == 2, done.stderr[-1500:]
    assert re.match(rf"billing-ingestor: configuration error: ({'|'.join(names)})", done.stderr), (
        done.stderr
    )


# --- secrets ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"INGESTOR_STORE": f"postgress://bob:{SECRET}@db.internal/billing"}, "store"),
        ({"INGESTOR_SINK": f"htps://bob:{SECRET}@billing.internal/in"}, "sink"),
        (
            {"INGESTOR_SINK": f"https://bob:{SECRET}@billing:443x/in", "INGESTOR_SINK_SECRET": "s"},
            "sink",
        ),
        (
            {"INGESTOR_SINK": f"https://bob:{SECRET}@/in", "INGESTOR_SINK_SECRET": "s"},
            "sink",
        ),
    ],
)
def test_config_errors_about_urls_do_not_echo_their_password(
    cli_in_process: Any, env: dict[str, str], name: str
) -> None:
    code, err = cli_in_process(["serve"], env)
    assert code == 2, err
    assert err.startswith(f"billing-ingestor: configuration error: {name}"), err
    assert SECRET not in err, err


def test_store_error_does_not_echo_the_postgresql_password(tmp_path: Path) -> None:
    url = f"postgresql://bob:p%zz{SECRET}@127.0.0.1:1/billing"
    done = run_cli(
        ["serve", "--bind", "127.0.0.1:0", "--data-dir", str(tmp_path / "d")],
        tmp_path,
        INGESTOR_STORE=url,
        INGESTOR_STORE_BUSY_TIMEOUT="2",
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("billing-ingestor: store error:"), done.stderr
    assert SECRET not in done.stderr, done.stderr


async def test_start_log_hides_the_credentials_of_every_nats_server(
    start_server: StartServer,
) -> None:
    sink = (
        f"nats://alice:first{SECRET}@127.0.0.1:{free_port()},"
        f"nats://alice:second{SECRET}@127.0.0.1:{free_port()}"
    )
    server = await start_server(INGESTOR_SINK=sink)
    assert await server.terminate() == 0
    assert "ingestor.service start" in server.output
    assert SECRET not in server.output, server.output


async def test_json_logs_carry_no_secret_through_start_delivery_failure_and_stop(
    start_server: StartServer, client: httpx.AsyncClient
) -> None:
    sink = f"http://alice:url{SECRET}@127.0.0.1:{free_port()}/in"
    server = await start_server(
        INGESTOR_LOG_FORMAT="json",
        INGESTOR_SINK=sink,
        INGESTOR_SINK_SECRET=f"sink{SECRET}",
        INGESTOR_RETRY_INITIAL="0.05",
    )
    pulse = {"tenant_id": "t", "product_sku": "s", "use_unit": "u", "used_amount": 1}
    assert (await client.post(f"{server.url}/pulses", json=pulse)).status_code == 202
    today = (await client.get(f"{server.url}/aggregates")).json()["aggregates"][0]["date"]
    commit = await client.post(f"{server.url}/aggregates/commit", json={"date": today})
    assert commit.status_code == 200, commit.text

    async def attempted() -> bool:
        batches = (await client.get(f"{server.url}/batches")).json()["batches"]
        return bool(batches) and batches[0].get("attempts", 0) >= 1

    await wait_until(attempted, within=10, what="a failed delivery attempt")
    assert await server.terminate() == 0
    events = []
    for line in server.output_of_run().splitlines():
        entry = json.loads(line)  # every line is one JSON object
        assert {"ts", "level", "logger", "event"} <= entry.keys(), line
        events.append(entry["event"])
    assert "start" in events
    assert "stop" in events
    assert SECRET not in server.output, server.output


# --- start-up failures -------------------------------------------------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
def test_port_in_use_exits_1_with_a_clear_message(tmp_path: Path, workers: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli(
            ["serve", "--bind", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "d")],
            tmp_path,
            INGESTOR_WORKERS=workers,
        )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().endswith("Address already in use"), done.stderr
    assert "Traceback" not in done.stderr


def test_data_dir_that_is_a_file_exits_1_naming_it(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    done = run_cli(["serve", "--bind", "127.0.0.1:0", "--data-dir", str(afile)], tmp_path)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("billing-ingestor: cannot start:"), done.stderr
    assert str(afile) in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("name", ["with space", "naïve-dïr"])
async def test_data_dir_with_spaces_or_non_ascii_works(
    start_server: StartServer, client: httpx.AsyncClient, tmp_path: Path, name: str
) -> None:
    server = await start_server(tmp_path / name / "data")
    pulse = {"tenant_id": "t", "product_sku": "s", "use_unit": "u", "used_amount": 1}
    assert (await client.post(f"{server.url}/pulses", json=pulse)).status_code == 202
    assert (tmp_path / name / "data" / "store" / "store.sqlite").is_file()


@pytest.mark.parametrize("mark", ["#", "?", "%41"])
async def test_data_dir_with_uri_characters_works_and_writes_nothing_outside(
    start_server: StartServer, tmp_path: Path, mark: str
) -> None:
    """The store opens its file as an SQLite URI built by string formatting."""
    top = f"x{mark}y"
    failure = None
    try:
        await start_server(tmp_path / top / "data")
    except ServerError as exc:
        failure = str(exc).splitlines()[-1]
    strays = sorted(set(os.listdir(tmp_path)) - {top})
    assert (failure, strays) == (None, []), (failure, strays)


def test_ipv6_loopback_is_loopback_for_the_open_mode() -> None:
    for bind in ("[::1]:0", "localhost:0", "127.0.0.2:0"):
        assert load_settings(environ={}, bind=bind).bind == bind
    for bind in ("[::]:0", "[::ffff:127.0.0.1]:0", "127.1:0", "0:0"):
        with pytest.raises(ConfigError, match=r"^api_keys"):
            load_settings(environ={}, bind=bind)


async def test_ipv6_bind_serves_and_sigterm_exits_0(tmp_path: Path) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            port = probe.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback here")
    args = ["serve", "--bind", f"[::1]:{port}", "--data-dir", str(tmp_path / "d")]
    server = await Spawned.start(args, tmp_path)
    try:
        await wait_ready(f"http://[::1]:{port}", server)
        server.process.send_signal(signal.SIGTERM)
        assert await server.wait_exit(10) == 0, server.output
    finally:
        await server.aclose()


# --- signals during start-up ---------------------------------------------------------


async def _stuck_in_store_open(tmp_path: Path) -> tuple[Spawned, trio.socket.SocketType]:
    """A server whose PostgreSQL accepts the connection and never answers."""
    with trio.socket.socket() as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        server = await Spawned.start(
            ["serve", "--bind", "127.0.0.1:0", "--data-dir", str(tmp_path / "d")],
            tmp_path,
            INGESTOR_STORE=f"postgresql://bob:{SECRET}@127.0.0.1:{port}/billing",
            INGESTOR_STORE_BUSY_TIMEOUT="4",
        )
        with trio.fail_after(15):
            connection, _ = await listener.accept()  # the server is now opening its store
    return server, connection


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_signal_while_the_store_opens_ends_the_process_promptly_and_cleanly(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """Nothing is running yet: the process should stop at once, with no traceback,
    and not be killed by the raw signal (README: SIGTERM or Ctrl-C ... exits 0)."""
    server, connection = await _stuck_in_store_open(tmp_path)
    try:
        with connection:
            server.process.send_signal(signum)
            sent = trio.current_time()
            code = await server.wait_exit(15)
            took = trio.current_time() - sent
    finally:
        await server.aclose()
    output = server.output
    assert SECRET not in output
    problems = []
    if took > 2.5:
        problems.append(f"exited {took:.1f} s after the signal (store busy timeout: 4 s)")
    if code < 0:
        problems.append(f"killed by the raw signal (exit code {code})")
    if "Traceback" in output:
        problems.append("printed a traceback: " + output.strip().splitlines()[-1])
    assert problems == [], output[-800:]


# --- several workers -----------------------------------------------------------------


async def _workers(tmp_path: Path, **env: str) -> tuple[Spawned, str]:
    port = free_port()
    server = await Spawned.start(
        ["serve", "--bind", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "d")],
        tmp_path,
        new_session=True,
        INGESTOR_WORKERS="2",
        **env,
    )
    return server, f"http://127.0.0.1:{port}"


async def test_workers_sigterm_once_all_run_exits_0(tmp_path: Path) -> None:
    server, url = await _workers(tmp_path)
    try:
        await wait_ready(url, server)
        await server.wait_output(r"hypercorn\.error Running on", count=2)
        server.process.send_signal(signal.SIGTERM)
        assert await server.wait_exit(15) == 0, server.output
    finally:
        await server.aclose()
    assert "exit_codes='[0, 0]'" in server.output, server.output


async def test_workers_ctrl_c_to_the_process_group_drains_and_exits_0(tmp_path: Path) -> None:
    """A terminal's Ctrl-C: SIGINT reaches the supervisor and every worker at once."""
    server, url = await _workers(tmp_path)
    try:
        await wait_ready(url, server)
        await server.wait_output(r"hypercorn\.error Running on", count=2)
        os.killpg(server.process.pid, signal.SIGINT)
        code = await server.wait_exit(15)
    finally:
        await server.aclose()
    assert code == 0, server.output[-1500:]


async def test_workers_sigterm_while_workers_start_exits_0(tmp_path: Path) -> None:
    server, _ = await _workers(tmp_path)
    try:
        await server.wait_output(r"ingestor\.workers start ")
        server.process.send_signal(signal.SIGTERM)
        code = await server.wait_exit(15)
    finally:
        await server.aclose()
    assert "Traceback" not in server.output
    assert code == 0, server.output[-1500:]


async def test_workers_on_postgresql_serve_and_hide_the_password(
    tmp_path: Path, client: httpx.AsyncClient
) -> None:
    admin = require_postgres()
    with fresh_database(admin) as url:
        with_password = url.replace("@", f":{SECRET}@", 1)
        server, base = await _workers(tmp_path, INGESTOR_STORE=with_password)
        try:
            await wait_ready(base, server)
            await server.wait_output(r"hypercorn\.error Running on", count=2)
            pulse = {"tenant_id": "t", "product_sku": "s", "use_unit": "u", "used_amount": 2}
            for _ in range(4):  # new connections: the kernel spreads them over both
                async with httpx.AsyncClient(timeout=10) as fresh:
                    answer = await fresh.post(f"{base}/pulses", json=pulse)
                    assert answer.status_code == 202, answer.text
            rows = (await client.get(f"{base}/aggregates")).json()["aggregates"]
            assert [(r["used_amount"], r["pulse_count"]) for r in rows] == [("8", 4)]
            server.process.send_signal(signal.SIGTERM)
            assert await server.wait_exit(15) == 0, server.output
        finally:
            await server.aclose()
    assert SECRET not in server.output
