"""What the README and the deploy files promise an operator, held against the program.

An operator runs this service from its README: the settings table (names,
`INGESTOR_*` variables, defaults), the command lines, the HTTP examples, the
metrics it names, and the Dockerfile / docker-compose.yml / deploy/ files
that ship with it. Other suites test the code against DESIGN.md; none held
the operator's documents to the program: a default that drifts, a setting
the table forgets, a value that is accepted but cannot work, an example
whose answer changed, a deploy file that sets a variable the program does
not know, each costs an operator of a billing service an outage or a wrong
bill, and nothing noticed.

So each test here reads the README (or the deploy file) itself where it
can, and runs the real program: `python -m ingestor` as a child process
(`tests/support/server.py`), real HTTP, real files, a real PostgreSQL when
one is reachable, a real HTTP receiver for the http sink. No mocks. Waits
are polls bounded by deadlines. A test that finds the program and its
documentation apart asserts what an operator should be able to rely on, and
says in its message which side differs.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import hmac
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psycopg
import pytest
import trio
import yaml  # type: ignore[import-untyped]

from ingestor.config import Settings, load_settings, parse_duration
from ingestor.errors import ConfigError
from tests.e2e.cluster_support import fresh_database, require_postgres
from tests.support.fixtures import StartServer
from tests.support.server import ServerProcess, free_port, wait_until

pytestmark = [pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
PYTHON = sys.executable
ENTRY_POINT = Path(PYTHON).parent / "billing-ingestor"

# The fields of a batch that are its delivery state (GET /batches/{id} has them,
# a delivered file does not: DESIGN §5, "less the delivery state").
DELIVERY_STATE = {"status", "attempts", "last_error", "next_attempt_at", "delivered_at"}


# -- reading the README ---------------------------------------------------------


def settings_table() -> dict[str, str]:
    """The README's settings table as {setting: documented default (as written)}."""
    lines = README.splitlines()
    start = lines.index("| setting | default | meaning |")
    table: dict[str, str] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        names = re.findall(r"`([a-z_]+)`", cells[0])
        defaults = [d.strip().strip("`") for d in cells[1].split(",")]
        if len(defaults) == 1:
            defaults *= len(names)
        assert len(defaults) == len(names), f"README row {line!r}: names and defaults differ"
        table.update(zip(names, defaults, strict=True))
    assert len(table) >= 20, f"the README's settings table was not found whole: {table}"
    return table


def code_defaults() -> dict[str, Any]:
    """Every setting config.py accepts, with its default."""
    found: dict[str, Any] = {}
    for info in msgspec.structs.fields(Settings):
        if info.default is not msgspec.NODEFAULT:
            found[info.name] = info.default
        else:
            found[info.name] = info.default_factory()
    return found


_SIZE = re.compile(r"\A(\d+) (KiB|MiB)\Z")


def documented_value(name: str, text: str, code_default: object) -> object:
    """The README's default `text` as the value config.py would hold."""
    if text in ("\N{EN DASH}", "-", "none"):
        return type(code_default)()  # "", (): nothing configured
    if match := _SIZE.match(text):
        return int(match[1]) * {"KiB": 1024, "MiB": 1024 * 1024}[match[2]]
    if Settings.__annotations__[name] == "Seconds":
        return parse_duration(text)
    if isinstance(code_default, int):
        return int(text.replace(",", ""))
    return text


def readme_curl_example() -> tuple[str, bytes, dict[str, Any]]:
    """The "Sending usage" curl line: (Content-Type, body, the answer shown under it)."""
    match = re.search(
        r"curl -s localhost:8081/pulses -H 'Content-Type: ([^']+)' -d '(.*?)'\n# (\{[^\n]*\})",
        README,
        re.S,
    )
    assert match, "the README's curl example of POST /pulses is gone or reshaped"
    return match[1], match[2].encode(), json.loads(match[3])


def readme_routes() -> list[tuple[str, str]]:
    """(method, path) of every request in the README's "Reading and committing" table."""
    section = README.split("## Reading and committing", 1)[1].split("\n\n", 2)[1]
    found = re.findall(r"`(GET|POST) (/[^`?\s]*)", section)
    assert len(found) >= 9, f"the README's request table was not found whole: {found}"
    return found


# -- processes --------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """The runner's environment without its INGESTOR_* variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTOR_")}
    env.update(extra)
    return env


@dataclass
class Ran:
    args: list[str]
    code: int
    stdout: str
    stderr: str


async def run_cli(
    args: list[str], *, cwd: Path, env: Mapping[str, str] | None = None, within: float = 20
) -> Ran:
    """`python -m ingestor ARGS` to its end; a command still running at `within` fails."""
    command = [PYTHON, "-m", "ingestor", *args]
    with trio.fail_after(within):
        done = await trio.run_process(
            command,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=clean_env(**(env or {})),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
        )
    return Ran(command, done.returncode, done.stdout.decode(), done.stderr.decode())


@asynccontextmanager
async def child(
    args: list[str], *, cwd: Path, env: Mapping[str, str], log: Path
) -> AsyncIterator[trio.Process]:
    """`python -m ingestor ARGS` running in the background; SIGKILLed on the way out."""
    with log.open("ab") as out:
        process = await trio.lowlevel.open_process(
            [PYTHON, "-m", "ingestor", *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=clean_env(**env),
            cwd=cwd,
        )
    try:
        yield process
    finally:
        with trio.CancelScope(shield=True):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(15):
                    await process.wait()
            if process.poll() is None:
                process.kill()
                await process.wait()


def one_line(text: str) -> bool:
    return len([line for line in text.splitlines() if line.strip()]) == 1


# -- metrics ----------------------------------------------------------------------

_SAMPLE = re.compile(r"\A([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass
class Scrape:
    """GET /metrics (Prometheus text) as types and samples."""

    types: dict[str, str] = field(default_factory=dict)
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Scrape:
        scrape = cls()
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                scrape.types[name] = kind
            elif line and not line.startswith("#"):
                match = _SAMPLE.match(line)
                assert match, f"not a Prometheus sample line: {line!r}"
                labels = dict(_LABEL.findall(match[2] or ""))
                scrape.samples.append((match[1], labels, float(match[3])))
        return scrape

    def values(self, name: str, **labels: str) -> list[float]:
        return [
            value
            for sample, have, value in self.samples
            if sample == name and all(have.get(k) == v for k, v in labels.items())
        ]

    def labelled(self, name: str) -> list[dict[str, str]]:
        return [have for sample, have, _ in self.samples if sample == name]


async def scrape(http: httpx.AsyncClient, server: ServerProcess) -> Scrape:
    response = await http.get(f"{server.url}/metrics")
    assert response.status_code == 200, response.text[:300]
    return Scrape.parse(response.text)


# -- pulses -----------------------------------------------------------------------


def pulse(tenant: str, sku: str = "sku", amount: object = 1, **extra: object) -> dict[str, Any]:
    base = {"tenant_id": tenant, "product_sku": sku, "use_unit": "call", "used_amount": amount}
    return base | extra


def stamp(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def post(
    http: httpx.AsyncClient, server: ServerProcess, body: object, **headers: str
) -> httpx.Response:
    return await http.post(
        f"{server.url}/pulses",
        content=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **headers},
    )


# =================================================================================
# The settings table
# =================================================================================


def test_every_setting_config_py_accepts_is_in_the_readme_settings_table() -> None:
    """README "Configuration": the table is where an operator learns what exists.
    A setting the program reads but the README never names cannot be tuned by
    anyone who did not read config.py: graceful_timeout, for one, decides
    whether `docker compose stop` (stop_grace_period 40s) drains or kills."""
    table = settings_table()
    fields = set(code_defaults())
    unknown = sorted(set(table) - fields)
    assert unknown == [], f"the README's settings table names settings config.py lacks: {unknown}"
    # Named elsewhere in the README as settings (`[tenant_timezones]`, `nats_stream`, ...).
    elsewhere = {name for name in fields if re.search(rf"`\[?{name}\]?`", README)}
    undocumented = sorted(fields - set(table) - elsewhere)
    assert undocumented == [], (
        f"config.py accepts settings the README never names (nor their INGESTOR_* variables):"
        f" {undocumented}; an operator cannot know they exist, their defaults or bounds"
    )


def test_documented_defaults_are_the_defaults_of_config_py() -> None:
    """Every default in the README's settings table is the one config.py starts with."""
    defaults = code_defaults()
    wrong = []
    for name, text in settings_table().items():
        documented = documented_value(name, text, defaults[name])
        if documented != defaults[name]:
            wrong.append(f"{name}: README says {text!r}, config.py {defaults[name]!r}")
    assert wrong == [], "\n".join(wrong)
    # Defaults the prose gives: the NATS subject, the committer's timings.
    subject = re.search(r"`nats_subject` = `([^`]+)`", README)
    assert subject, "the README no longer gives nats_subject's default"
    assert subject[1] == defaults["nats_subject"], (subject[1], defaults["nats_subject"])
    timer = re.search(
        r"every `commit_interval` \((\d+) s\).*?`commit_grace` \((\d+) h\)", README, re.S
    )
    assert timer, "the README no longer gives the committer's timings"
    assert (float(timer[1]), float(timer[2]) * 3600) == (
        defaults["commit_interval"],
        defaults["commit_grace"],
    ), timer[0]
    # And the loaded settings with nothing configured are those defaults.
    loaded = load_settings(None, environ={})
    for name in settings_table():
        assert getattr(loaded, name) == defaults[name], name


def test_every_documented_duration_form_is_read_from_env_and_file(tmp_path: Path) -> None:
    """README: "Durations are seconds or strings such as `90s`, `15m`, `1h`, `35d`"."""
    sentence = re.search(r"Durations are seconds or strings such as ([^.]*)\.", README)
    assert sentence, "the README's sentence about durations is gone"
    forms = re.findall(r"`([^`]+)`", sentence[1])
    assert forms, sentence[0]
    unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    for form in [*forms, "45"]:
        expected = float(form[:-1]) * unit[form[-1]] if form[-1] in unit else float(form)
        from_env = load_settings(None, environ={"INGESTOR_COMMIT_GRACE": form})
        assert from_env.commit_grace == expected, form
        config = tmp_path / "durations.toml"
        value = form if form[-1] in unit else int(form)
        config.write_text(f"commit_grace = {json.dumps(value)}\n")
        assert load_settings(config, environ={}).commit_grace == expected, form


# One bad value per setting of the table, each a mistake an operator makes.
# A setting added to the table without one fails the test below: keep them together.
BAD_VALUES: dict[str, dict[str, str]] = {
    "bind": {"INGESTOR_BIND": "8081"},
    "durability": {"INGESTOR_DURABILITY": "sometimes"},
    "partitions": {"INGESTOR_PARTITIONS": "0"},
    "billing_timezone": {"INGESTOR_BILLING_TIMEZONE": "Mars/Olympus_Mons"},
    "late_window": {"INGESTOR_LATE_WINDOW": "forever"},
    "dedup_window": {"INGESTOR_DEDUP_WINDOW": "1d"},  # shorter than the late window
    "future_skew": {"INGESTOR_FUTURE_SKEW": "-5m"},
    "max_batch": {"INGESTOR_MAX_BATCH": "0"},
    "max_body_bytes": {"INGESTOR_MAX_BODY_BYTES": "16 MiB"},  # the table's own spelling
    "shard_queue": {"INGESTOR_SHARD_QUEUE": "0"},
    "commit_interval": {"INGESTOR_COMMIT_INTERVAL": "0"},
    "commit_grace": {"INGESTOR_COMMIT_GRACE": "1h30m"},
    "batch_max_records": {"INGESTOR_BATCH_MAX_RECORDS": "-1"},
    "batch_max_bytes": {"INGESTOR_BATCH_MAX_BYTES": "2048"},
    "sink": {"INGESTOR_SINK": "ftp://billing.example"},
    "sink_secret": {"INGESTOR_SINK": "https://billing.example/in", "INGESTOR_SINK_SECRET": ""},
    "sink_timeout": {"INGESTOR_SINK_TIMEOUT": "0s"},
    "retry_initial": {"INGESTOR_RETRY_INITIAL": "10m"},  # more than retry_max
    "retry_max": {"INGESTOR_RETRY_MAX": "0.5"},  # less than retry_initial
    "log_format": {"INGESTOR_LOG_FORMAT": "xml"},
    "log_level": {"INGESTOR_LOG_LEVEL": "verbose"},
    "workers": {"INGESTOR_WORKERS": "0"},
    "worker_timeout": {"INGESTOR_WORKER_TIMEOUT": "never"},
    "store": {"INGESTOR_STORE": "mysql://db.example/billing"},
    "store_pool_size": {"INGESTOR_STORE_POOL_SIZE": "0"},
    "api_keys": {"INGESTOR_API_KEYS": '[{"sha256": "00", "role": "admin"}]'},  # file only
    "max_in_flight": {"INGESTOR_MAX_IN_FLIGHT": "0"},
    "body_timeout": {"INGESTOR_BODY_TIMEOUT": "nan"},
    "max_line_bytes": {"INGESTOR_MAX_LINE_BYTES": "64 KiB"},
    "max_header_bytes": {"INGESTOR_MAX_HEADER_BYTES": "-1"},
    "store_busy_timeout": {"INGESTOR_STORE_BUSY_TIMEOUT": "10 seconds"},
    "max_in_flight_bytes": {"INGESTOR_MAX_IN_FLIGHT_BYTES": "1048576"},  # < max_body_bytes
    "group_max_pulses": {"INGESTOR_GROUP_MAX_PULSES": "1000000"},  # over its bound
    "delivery_concurrency": {"INGESTOR_DELIVERY_CONCURRENCY": "0"},
    "graceful_timeout": {"INGESTOR_GRACEFUL_TIMEOUT": "-30s"},
}
# data_dir has no value config.py can judge bad but the empty one (its own test).
NOT_IN_MATRIX = {"data_dir"}


def test_a_bad_value_of_every_documented_setting_is_refused_naming_it() -> None:
    """README: "A wrong setting stops the start with one line naming it", and the
    table's INGESTOR_<NAME> variables are the names the program reads: each
    documented setting, given a bad value by its variable, is refused by the
    settings loader `serve` runs first, in one line that names it."""
    table = settings_table()
    missing = sorted(set(table) - set(BAD_VALUES) - NOT_IN_MATRIX)
    assert missing == [], f"documented settings with no bad value tried here: {missing}"
    problems = []
    for name, env in BAD_VALUES.items():
        try:
            load_settings(None, environ=env)
        except ConfigError as exc:
            if name not in str(exc) or not one_line(str(exc)):
                problems.append(f"{name}: {env} refused as {str(exc)!r}")
        else:
            problems.append(f"{name}: {env} was accepted")
    assert problems == [], "\n".join(problems)


# Through the real command: one of each kind of mistake, from the environment
# (--bind's own check, a bound, a duration, two settings together, a file-only
# setting) and from the TOML file (a typo'd key, a bad enum, a wrong type).
COMMAND_SAMPLE = ["bind", "partitions", "commit_grace", "dedup_window", "api_keys"]
FILE_MISTAKES = {
    "max_batches": "max_batches = 5\n",  # a typo of max_batch
    "durability": 'durability = "sync"\n',
    "workers": "workers = 1.5\n",
}


async def test_a_wrong_setting_stops_the_command_with_exit_2_and_one_line(
    tmp_path: Path,
) -> None:
    """`python -m ingestor serve` with a wrong setting, in the environment or in
    the `--config` file: exit 2, one line on stderr naming the setting, no
    traceback, nothing on stdout, and no store created."""
    limiter = trio.CapacityLimiter(4)
    problems: list[str] = []

    async def attempt(
        name: str, env: dict[str, str], config: str | None, host: str = "127.0.0.1"
    ) -> None:
        data = tmp_path / f"data-{name}-{config is not None}-{host}"
        args = ["serve", "--data-dir", str(data)]
        if name != "bind":  # --bind beats the environment
            args += ["--bind", f"{host}:{free_port()}"]
        if config is not None:
            path = tmp_path / f"{name}.toml"
            path.write_text(config)
            args += ["--config", str(path)]
        async with limiter:
            ran = await run_cli(args, cwd=tmp_path, env=env)
        said = f"{env or config!r} -> exit {ran.code}, stderr {ran.stderr!r}, stdout {ran.stdout!r}"
        if ran.code != 2:
            problems.append(f"{name}: not refused with exit 2: {said}")
        elif not one_line(ran.stderr) or "Traceback" in ran.stderr or ran.stdout:
            problems.append(f"{name}: not one line on stderr: {said}")
        elif name not in ran.stderr:
            problems.append(f"{name}: the message does not name the setting: {said}")
        if data.exists():
            problems.append(f"{name}: a refused start created {data}: {sorted(data.rglob('*'))}")

    async with trio.open_nursery() as nursery:
        for name in COMMAND_SAMPLE:
            nursery.start_soon(attempt, name, BAD_VALUES[name], None)
        for name, text in FILE_MISTAKES.items():
            nursery.start_soon(attempt, name, {}, text)
        # README: "Bound to anything else [than loopback], the server refuses to
        # start without keys."
        nursery.start_soon(attempt, "api_keys", {}, None, "0.0.0.0")
    assert problems == [], "\n".join(sorted(problems))


async def test_an_empty_data_dir_is_refused_not_the_working_directory(tmp_path: Path) -> None:
    """`INGESTOR_DATA_DIR=` (what compose's `${DATA_DIR}` gives when the variable
    is unset) is a wrong setting, and must stop the start like any other. The
    program took it as "." and created the billing store in whatever directory
    it was started from: in a container, a directory no volume keeps."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {"INGESTOR_DATA_DIR": "", "INGESTOR_BIND": f"127.0.0.1:{free_port()}"}
    async with child(["serve"], cwd=cwd, env=env, log=tmp_path / "out.log") as process:

        async def settled() -> bool:
            return process.poll() is not None or (cwd / "store").exists()

        await wait_until(settled, within=20, what="the start to end or create a store")
        code = process.poll()
    output = (tmp_path / "out.log").read_text()
    assert not (cwd / "store").exists(), (
        f"INGESTOR_DATA_DIR='' was accepted: the store went to the working directory"
        f" ({sorted(p.name for p in cwd.iterdir())}); output: {output[-600:]!r}"
    )
    assert code == 2, output
    assert "data_dir" in output, output


# =================================================================================
# Settings taking effect, on real servers
# =================================================================================


async def test_request_limits_take_effect_and_flags_beat_env_beat_file(
    start_server: StartServer, tmp_path: Path
) -> None:
    """max_batch, max_body_bytes, max_line_bytes, max_in_flight, body_timeout and
    log_level, each changed, observed through HTTP; README: "environment beats
    file; `--bind` and `--data-dir` beat both"; "at most 10,000 pulses and 16 MiB"
    (at most: the limit itself is allowed); overload is 503 with Retry-After."""
    file_dir = tmp_path / "from-file"
    env_dir = tmp_path / "from-env"
    config = (
        f'bind = "127.0.0.1:{free_port()}"\ndata_dir = "{file_dir}"\n'
        "max_batch = 1\nlog_level = 'info'\n"
    )
    server = await start_server(
        config=config,
        INGESTOR_BIND=f"127.0.0.1:{free_port()}",
        INGESTOR_DATA_DIR=str(env_dir),
        INGESTOR_MAX_BATCH="3",
        INGESTOR_MAX_BODY_BYTES="1000",
        INGESTOR_MAX_LINE_BYTES="200",
        INGESTOR_MAX_IN_FLIGHT="1",
        INGESTOR_BODY_TIMEOUT="2s",
        INGESTOR_LOG_LEVEL="warning",
    )
    # Flags beat both (ServerProcess passes --bind and --data-dir): it serves on
    # the flag's port, from the flag's data dir.
    assert (server.data_dir / "store" / "store.sqlite").exists()
    assert not file_dir.exists(), "the config file's data_dir beat --data-dir"
    assert not env_dir.exists(), "INGESTOR_DATA_DIR beat --data-dir"
    log = server.output_of_run()
    assert " INFO " not in log, f"log_level=warning (env, over the file's info): {log[-800:]}"
    assert "WARNING" in log, log[-800:]
    async with httpx.AsyncClient(timeout=30) as http:
        # max_batch: 3 from the environment, not the file's 1.
        three = await post(http, server, [pulse("lim", amount=i, id=f"a{i}") for i in range(3)])
        assert three.status_code == 202, three.text
        four = await post(http, server, [pulse("lim", id=f"b{i}") for i in range(4)])
        assert four.status_code == 413, four.text
        assert four.json()["error"]["code"] == "too_many_pulses"

        # max_body_bytes: a body of exactly the limit is taken, one byte more is 413.
        base = json.dumps([pulse("lim", id="c1")])
        exact = base[:-1] + " " * (1000 - len(base)) + "]"
        assert (await post_raw(http, server, exact.encode())).status_code == 202
        over = await post_raw(http, server, (exact[:-1] + " ]").encode())
        assert over.status_code == 413, over.text
        assert over.json()["error"]["code"] == "body_too_large"

        # max_line_bytes: a longer NDJSON line is rejected alone.
        lines = [json.dumps(pulse("lim", id="d1")), json.dumps(pulse("lim", "s" * 150, id="d2"))]
        ndjson = await post_raw(http, server, "\n".join(lines).encode(), "application/x-ndjson")
        report = ndjson.json()
        assert ndjson.status_code == 202, report
        assert report["accepted"] == 1, report
        assert report["items"][0]["index"] == 1, report
        assert "max_line_bytes" in report["items"][0]["error"], report

        # max_in_flight (1) and body_timeout (2 s): a request whose body hangs
        # holds the only slot; another is 503 with Retry-After; the hanging one
        # is answered 408 about two seconds later.
        stream = await trio.open_tcp_stream(server.host, server.port)
        async with stream:
            await stream.send_all(
                b"POST /pulses HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n["
            )
            started = trio.current_time()

            async def holding() -> bool:
                metrics = await scrape(http, server)  # not counted in flight itself
                return metrics.values("ingestor_http_requests_in_flight") == [1.0]

            await wait_until(holding, within=5, what="the hanging request in flight")

            async def refused() -> httpx.Response | None:
                answer = await post(http, server, [pulse("lim", id="e1")])
                return answer if answer.status_code == 503 else None

            busy = await wait_until(refused, within=5, what="503 while max_in_flight is held")
            assert busy is not None
            assert busy.headers.get("Retry-After"), busy.headers
            assert busy.json()["error"]["code"] == "overloaded", busy.text
            data = b""
            with trio.fail_after(10):
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(65536)
                    assert chunk, f"closed without an answer after {data!r}"
                    data += chunk
            waited = trio.current_time() - started
        assert data.startswith(b"HTTP/1.1 408"), data[:200]
        assert 1.8 <= waited <= 6, f"body_timeout=2s answered after {waited:.2f} s"


async def post_raw(
    http: httpx.AsyncClient,
    server: ServerProcess,
    body: bytes,
    content_type: str = "application/json",
) -> httpx.Response:
    return await http.post(
        f"{server.url}/pulses", content=body, headers={"Content-Type": content_type}
    )


async def test_too_many_separators_means_more_than_32_a_pulse(start_server: StartServer) -> None:
    """README: "Too large is also a body with more than 32 separators a pulse it
    may hold (commas in an array that is not all valid pulses, newlines in
    NDJSON)". With max_batch 3 that is more than 96: 96 commas is still read
    (a broken array: 400), 97 is 413. The program refuses at 96 already."""
    server = await start_server(INGESTOR_MAX_BATCH="3")
    async with httpx.AsyncClient(timeout=30) as http:
        answers = {}
        for count in (96, 97):
            array = await post_raw(http, server, b"[" + b"," * count + b"]")
            lines = await post_raw(http, server, b"\n" * count, "application/x-ndjson")
            answers[count] = (array.status_code, lines.status_code)
    assert answers[97] == (413, 413), answers
    assert 413 not in answers[96], (
        f"96 separators (exactly 32 x max_batch, not more) answered {answers[96]}: the code"
        " refuses at >= 32 a pulse, the README says more than 32"
    )


async def test_max_header_bytes_above_16_kib_takes_effect_however_the_head_arrives(
    start_server: StartServer,
) -> None:
    """`max_header_bytes` is a setting (default 16 KiB): raised to 32 KiB, a 20 KB
    head must be served. It was, when the head came in one read; when it came in
    two (as over a real network, the first part over 16 KiB), hypercorn's own
    fixed 16 KiB limit on an incomplete head answered 431 with an empty body
    (not the JSON error of DESIGN §4)."""
    server = await start_server(INGESTOR_MAX_HEADER_BYTES="32768")
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 20_000 + b"\r\n\r\n"
    answers = []
    for split in (len(head), 17_000):  # all at once; then in two pieces
        stream = await trio.open_tcp_stream(server.host, server.port)
        async with stream:
            await stream.send_all(head[:split])
            if split < len(head):
                await trio.sleep(0.2)  # the first piece is read alone
                await stream.send_all(head[split:])
            data = b""
            with trio.fail_after(10):
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    data += chunk
        answers.append(data.split(b"\r\n", 1)[0].decode())
    assert answers == ["HTTP/1.1 200 ", "HTTP/1.1 200 "], (
        f"a 20,000-byte header with max_header_bytes=32768: {answers} (at once, in two"
        " pieces); the second 431 is hypercorn's h11_max_incomplete_size, fixed at 16 KiB"
    )


async def test_billing_day_settings_take_effect(start_server: StartServer, tmp_path: Path) -> None:
    """billing_timezone, [tenant_timezones], late_window and future_skew, changed,
    decide the billing day and what is too old or too far ahead."""
    config = '[tenant_timezones]\n"west" = "Etc/GMT+12"\n'
    server = await start_server(
        config=config,
        INGESTOR_BILLING_TIMEZONE="Pacific/Kiritimati",  # UTC+14
        INGESTOR_LATE_WINDOW="2d",
        INGESTOR_DEDUP_WINDOW="2d",
        INGESTOR_FUTURE_SKEW="30s",
    )
    moment = now() - dt.timedelta(hours=1)
    sent = [
        pulse("east", id="p0", timestamp=stamp(moment)),
        pulse("west", id="p1", timestamp=stamp(moment)),
        pulse("east", id="p2", timestamp=stamp(now() - dt.timedelta(days=3))),
        pulse("east", id="p3", timestamp=stamp(now() - dt.timedelta(days=1))),
        pulse("east", id="p4", timestamp=stamp(now() + dt.timedelta(seconds=90))),
        pulse("east", id="p5", timestamp=stamp(now() + dt.timedelta(seconds=5))),
    ]
    async with httpx.AsyncClient(timeout=30) as http:
        answer = await post(http, server, sent)
        assert answer.status_code == 202, answer.text
        report = answer.json()
        rejected = {item["index"] for item in report["items"] if item["status"] == "rejected"}
        assert rejected == {2, 4}, (
            f"late_window=2d and future_skew=30s: expected pulses 2 (3 days old) and 4"
            f" (90 s ahead) rejected, got {report}"
        )
        rows = (await http.get(f"{server.url}/aggregates", params={"status": "all"})).json()
    dates = collections.defaultdict(set)
    for row in rows["aggregates"]:
        dates[row["tenant_id"]].add(row["date"])
    # The same moment: in UTC+14 (billing_timezone) for east, UTC-12 for west.
    east = moment.astimezone(dt.timezone(dt.timedelta(hours=14))).date().isoformat()
    west = moment.astimezone(dt.timezone(dt.timedelta(hours=-12))).date().isoformat()
    assert dates["west"] == {west}, f"[tenant_timezones] west = Etc/GMT+12: {dict(dates)}"
    assert east in dates["east"], f"billing_timezone = Pacific/Kiritimati: {dict(dates)}"


async def test_store_settings_take_effect_and_the_store_dir_is_a_backup(
    start_server: StartServer, tmp_path: Path
) -> None:
    """partitions, shard_queue, batch_max_records, durability and log_format,
    changed, observed; the file sink writes `data/deliveries/<date>/<batch_id>.json`
    holding the batch; batch ids are `<store>-<YYYYMMDD>-p<NNN>-<NNNNN>`; SIGTERM
    exits 0 with a stop line; the store is `data/store/store.sqlite`, and the
    store directory, copied while stopped, serves the same totals (README
    "Backups"), with the stored partitions winning over a changed setting."""
    env = {
        "INGESTOR_PARTITIONS": "4",
        "INGESTOR_SHARD_QUEUE": "5",
        "INGESTOR_BATCH_MAX_RECORDS": "2",
        "INGESTOR_DURABILITY": "os",
        "INGESTOR_LOG_FORMAT": "json",
    }
    server = await start_server(**env)
    today = now().date().isoformat()
    async with httpx.AsyncClient(timeout=30) as http:
        store_id = (await http.get(f"{server.url}/readyz")).json()["store_id"]
        metrics = await scrape(http, server)
        assert sum(metrics.values("ingestor_shard_partitions")) == 4, metrics.labelled(
            "ingestor_shard_partitions"
        )
        # README: "a shard's queue holds this many per partition it owns".
        capacity = metrics.values("ingestor_shard_queue_capacity")
        assert sum(capacity) == 5 * 4, capacity
        sent = [pulse("one-tenant", f"sku{i}", id=f"s{i}") for i in range(5)]
        sent += [pulse(f"tenant{i}", id=f"t{i}") for i in range(6)]
        assert (await post(http, server, sent)).status_code == 202
        commit = await http.post(f"{server.url}/aggregates/commit", json={"date": today})
        assert commit.status_code == 200, commit.text
        batches = commit.json()["batches"]
        counts = [batch["record_count"] for batch in batches]
        assert max(counts) <= 2, f"batch_max_records=2: {batches}"
        assert sum(counts) == 11, batches
        for batch in batches:
            match = re.fullmatch(r"([0-9a-f]{12})-(\d{8})-p(\d{3})-(\d{5})", batch["batch_id"])
            assert match, f"batch id {batch['batch_id']!r} is not like the README's"
            assert match[1] == store_id, batch
            assert match[2] == today.replace("-", ""), batch
            assert int(match[3]) == batch["partition"] < 4, batch

        async def delivered() -> bool:
            listed = (await http.get(f"{server.url}/batches", params={"date": today})).json()
            states = [b["status"] for b in listed["batches"]]
            return bool(states) and set(states) == {"delivered"}

        await wait_until(delivered, within=10, what="the file sink delivering every batch")
        for batch in batches:
            view = (await http.get(f"{server.url}/batches/{batch['batch_id']}")).json()
            path = server.data_dir / "deliveries" / today / f"{batch['batch_id']}.json"
            assert path.exists(), (
                f"README: file sink writes data/deliveries/<date>/<id>.json: {path}"
            )
            written = json.loads(path.read_bytes())
            expected = {k: v for k, v in view.items() if k not in DELIVERY_STATE}
            assert written == expected, (written, view)
        totals = (await http.get(f"{server.url}/aggregates", params={"status": "all"})).json()

    assert await server.terminate() == 0, server.tail()
    log = server.output_of_run()
    events = []
    for line in log.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pytest.fail(f"log_format=json logged a line that is not JSON: {line!r}")
    names = [event.get("event") for event in events]
    assert names.count("start") == 1, names
    assert names.count("stop") == 1, names
    assert names.count("commit") == 1, f"README: one line per commit: {names}"
    start = events[names.index("start")]
    assert start.get("durability") == "os", start
    assert start.get("partitions") == 4, start

    store = server.data_dir / "store"
    assert (store / "store.sqlite").exists(), sorted(p.name for p in store.iterdir())
    copy = tmp_path / "restored"
    shutil.copytree(store, copy / "store")
    restored = await start_server(copy, **{**env, "INGESTOR_PARTITIONS": "8"})
    async with httpx.AsyncClient(timeout=30) as http:
        assert (await http.get(f"{restored.url}/readyz")).json()["store_id"] == store_id
        again = (await http.get(f"{restored.url}/aggregates", params={"status": "all"})).json()
        assert again == totals, "the copied store directory serves other totals"
        metrics = await scrape(http, restored)
        assert sum(metrics.values("ingestor_shard_partitions")) == 4, (
            "partitions changed to 8 on a store made with 4: the stored value must win"
        )


async def test_the_periodic_committer_follows_commit_interval_grace_and_every_zone(
    start_server: StartServer,
) -> None:
    """README: the committer "runs by itself every `commit_interval` and commits
    each day once it has ended in every billing time zone in use, plus
    `commit_grace`". With a 0.3 s interval and a 1 s grace, the day before
    yesterday is committed at once; yesterday only if it has also ended (plus
    the grace) in Etc/GMT+12, a tenant's zone; today never."""
    config = '[tenant_timezones]\n"far-west" = "Etc/GMT+12"\n'
    server = await start_server(
        config=config, INGESTOR_COMMIT_INTERVAL="0.3", INGESTOR_COMMIT_GRACE="1s"
    )
    today = now().date()
    days = [today - dt.timedelta(days=2), today - dt.timedelta(days=1), today]
    noon = dt.time(12, tzinfo=dt.UTC)
    sent = [
        pulse("utc-tenant", id=f"d{i}", timestamp=stamp(dt.datetime.combine(day, noon)))
        for i, day in enumerate(days[:2])
    ]
    sent.append(pulse("utc-tenant", id="d2"))
    async with httpx.AsyncClient(timeout=30) as http:
        assert (await post(http, server, sent)).status_code == 202

        async def committed(day: dt.date) -> bool:
            listed = await http.get(f"{server.url}/batches", params={"date": day.isoformat()})
            return bool(listed.json()["batches"])

        await wait_until(
            lambda: committed(days[0]), within=15, what="the timer committing two days ago"
        )
        # Yesterday ends in Etc/GMT+12 at today 12:00 UTC.
        ends_west = dt.datetime.combine(today, noon) + dt.timedelta(seconds=1)
        if abs((now() - ends_west).total_seconds()) > 20:
            # A later tick, seen by its work: a pulse of three days ago, committed.
            earlier = today - dt.timedelta(days=3)
            late = pulse("utc-tenant", id="d3", timestamp=stamp(dt.datetime.combine(earlier, noon)))
            assert (await post(http, server, late)).status_code == 202
            await wait_until(lambda: committed(earlier), within=15, what="a later tick")
            expected = now() > ends_west
            assert await committed(days[1]) == expected, (
                f"{days[1]} has {'' if expected else 'not '}ended in Etc/GMT+12 (a zone in"
                " use) plus commit_grace: it must " + ("" if expected else "not ") + "be committed"
            )
        assert not await committed(today), "today was committed by the timer"
        metrics = await scrape(http, server)
        assert metrics.values("ingestor_committer_leading") == [1.0], metrics.values(
            "ingestor_committer_leading"
        )
    commits = [line for line in server.output_of_run().splitlines() if " commit " in line]
    assert any(days[0].isoformat() in line for line in commits), commits


# -- the http sink, against a real receiver ------------------------------------------


class Receiver:
    """An HTTP/1.1 server that answers each POST from a script: a status, or
    "hang" (no answer); "200" once the script is used up."""

    def __init__(self, script: list[str]) -> None:
        self.script = collections.deque(script)
        self.requests: list[tuple[float, dict[str, str], bytes]] = []
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._answer, listeners)

    async def _answer(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")[1:]
                headers = {
                    k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)
                }
                while len(body) < int(headers.get("content-length", "0")):
                    body += await stream.receive_some(65536)
                self.requests.append((trio.current_time(), headers, body))
                answer = self.script.popleft() if self.script else "200"
                if answer == "hang":
                    await trio.sleep_forever()
                status = f"HTTP/1.1 {answer} X\r\n"
                await stream.send_all(
                    (status + "Content-Length: 4\r\nConnection: close\r\n\r\nnope").encode()
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def test_http_sink_signs_retries_fails_and_redelivers_as_documented(
    start_server: StartServer,
) -> None:
    """README sinks: POST with `Idempotency-Key: <batch_id>` and
    `X-Ingestor-Signature: sha256=<HMAC-SHA256 of the body with sink_secret>`;
    5xx and timeouts (sink_timeout) retried with backoff (retry_initial,
    retry_max); other 4xx mark the batch `failed`, visible in /batches and the
    metrics; `POST /batches/{id}/redeliver` puts it back once the downstream
    is fixed."""
    secret = "readme-secret"
    receiver = Receiver(["503", "hang", "400"])
    async with trio.open_nursery() as nursery:
        await nursery.start(receiver.serve)
        server = await start_server(
            INGESTOR_SINK=f"http://127.0.0.1:{receiver.port}/batches",
            INGESTOR_SINK_SECRET=secret,
            INGESTOR_SINK_TIMEOUT="0.5",
            INGESTOR_RETRY_INITIAL="0.2",
            INGESTOR_RETRY_MAX="0.4",
        )
        today = now().date().isoformat()
        async with httpx.AsyncClient(timeout=30) as http:
            assert (await post(http, server, [pulse("sinked", id="h1")])).status_code == 202
            commit = await http.post(f"{server.url}/aggregates/commit", json={"date": today})
            (batch,) = commit.json()["batches"]
            url = f"{server.url}/batches/{batch['batch_id']}"

            async def status_is(wanted: str) -> dict[str, Any] | None:
                view: dict[str, Any] = (await http.get(url)).json()
                return view if view["status"] == wanted else None

            failed = await wait_until(
                lambda: status_is("failed"), within=15, what="the batch failing on the 400"
            )
            assert failed is not None
            assert failed["attempts"] == 3, failed
            assert "400" in (failed["last_error"] or ""), failed
            metrics = await scrape(http, server)
            assert metrics.values("ingestor_outbox_batches", status="failed") == [1.0]
            assert metrics.values("ingestor_deliveries_total", outcome="failed") == [1.0]
            assert metrics.values("ingestor_deliveries_total", outcome="retried") == [2.0]

            redeliver = await http.post(f"{url}/redeliver")
            assert redeliver.status_code == 200, redeliver.text
            await wait_until(
                lambda: status_is("delivered"), within=10, what="delivery after redeliver"
            )
        nursery.cancel_scope.cancel()
    assert len(receiver.requests) == 4, [r[1] for r in receiver.requests]
    bodies = {body for _, _, body in receiver.requests}
    assert len(bodies) == 1, "each attempt of a batch must send the same bytes"
    for _, headers, body in receiver.requests:
        assert headers.get("idempotency-key") == batch["batch_id"], headers
        expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert headers.get("x-ingestor-signature") == expected, headers
        assert json.loads(body)["batch_id"] == batch["batch_id"]
    times = [moment for moment, _, _ in receiver.requests[:3]]
    after_503, after_hang = (later - earlier for earlier, later in itertools.pairwise(times))
    # retry_max (0.4 s) caps each wait; the hang lasts sink_timeout (0.5 s).
    # Slack of 0.3 s for a loaded machine.
    assert after_hang >= 0.45, (
        f"sink_timeout=0.5s, yet the hung attempt ended in {after_hang:.2f} s"
    )
    waits = (after_503 - 0.4, after_hang - 0.5 - 0.4)  # beyond what the settings allow
    assert max(waits) <= 0.3, (
        f"retry_max=0.4s: the retry after the 503 came {after_503:.2f} s later, the one after"
        f" the {0.5:g} s hang {after_hang:.2f} s later: the deliverer looks for due batches"
        " only every second (deliverer._IDLE_POLL), so no backoff below 1 s holds"
    )


# =================================================================================
# Commands, keys and the Python example
# =================================================================================


async def test_help_of_each_command_lists_what_the_readme_uses(tmp_path: Path) -> None:
    """Every `billing-ingestor ...` command line in the README and deploy/ uses
    subcommands and flags the program has (`--help` lists them)."""
    texts = README + (ROOT / "deploy" / "ingestor.example.toml").read_text()
    commands = re.findall(r"billing-ingestor ((?:serve|keys new)[^`\n]*)", texts)
    commands += re.findall(r"compose run --rm --no-deps ingestor ((?:keys new)[^`\n]*)", texts)
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        if "command" in service:
            commands.append(" ".join(service["command"]))
    assert len(commands) >= 5, commands
    helps = {}
    for words in (["serve"], ["keys", "new"]):
        ran = await run_cli([*words, "--help"], cwd=tmp_path)
        assert ran.code == 0, ran
        helps[" ".join(words)] = ran.stdout
    top = await run_cli(["--help"], cwd=tmp_path)
    assert top.code == 0, top
    assert "serve" in top.stdout, top
    assert "keys" in top.stdout, top
    unknown = []
    for command in commands:
        sub = "keys new" if command.startswith("keys new") else "serve"
        for flag in re.findall(r"(--[a-z-]+)", command):
            if flag not in helps[sub]:
                unknown.append(f"{command!r}: {flag} is not in `{sub} --help`")
    assert unknown == [], unknown


async def test_keys_new_as_the_readme_shows_then_the_keys_work(
    start_server: StartServer, tmp_path: Path
) -> None:
    """README "API keys": `.venv/bin/billing-ingestor keys new --role ingest
    --tenant t1 --tenant t2` prints the key once and the `[[api_keys]]` table
    (only its SHA-256); pasted into the config file, the key is a Bearer token
    for its tenants (another's pulse is `forbidden_tenant`); the admin key of
    deploy/ingestor.example.toml commits; /healthz, /readyz, /metrics and
    /openapi.json need no key; and the README's Python example sends with it."""
    line = re.search(r"\.venv/bin/billing-ingestor (keys new [^\n]*)", README)
    assert line, "the README's `keys new` command line is gone"
    printed: dict[str, tuple[str, str]] = {}
    for role, args in (("ingest", line[1].split()), ("admin", ["keys", "new", "--role", "admin"])):
        with trio.fail_after(20):
            done = await trio.run_process(
                [str(ENTRY_POINT), *args],
                capture_stdout=True,
                capture_stderr=True,
                env=clean_env(),
                cwd=tmp_path,
            )
        text = done.stdout.decode()
        key = re.search(r"\n\n    (\S+)\n\n", text)
        assert key, f"no key line in the output of `{' '.join(args)}`:\n{text}"
        table = text[text.index("[[api_keys]]") :]
        entry = tomllib.loads(table)["api_keys"][0]
        assert entry["sha256"] == hashlib.sha256(key[1].encode()).hexdigest(), entry
        assert key[1] not in table, "the key itself is in the config lines"
        printed[role] = (key[1], table)
    assert tomllib.loads(printed["ingest"][1])["api_keys"][0]["tenants"] == ["t1", "t2"]

    server = await start_server(config=printed["ingest"][1] + "\n" + printed["admin"][1])
    ingest = {"Authorization": f"Bearer {printed['ingest'][0]}"}
    admin = {"Authorization": f"Bearer {printed['admin'][0]}"}
    today = now().date().isoformat()
    async with httpx.AsyncClient(timeout=30) as http:
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            open_ = await http.get(f"{server.url}{path}")
            assert open_.status_code == 200, f"README: {path} needs no key: {open_.status_code}"
        assert (await post(http, server, pulse("t1", id="k0"))).status_code == 401
        mixed = await post(http, server, [pulse("t1", id="k1"), pulse("t3", id="k2")], **ingest)
        report = mixed.json()
        assert mixed.status_code == 202, report
        assert report["accepted"] == 1, report
        assert "forbidden_tenant" in report["items"][0]["error"], report
        no = await http.post(
            f"{server.url}/aggregates/commit", json={"date": today}, headers=ingest
        )
        assert no.status_code == 403, no.text

        # README "Sending from Python", with the printed key.
        def send() -> list[Any]:
            from ingestor.client import Client

            with Client(server.url, api_key=printed["ingest"][0]) as client:
                client.record("t1", "sku1", "api_call", 1)
                failures: list[Any] = client.flush()
                return failures

        assert await trio.to_thread.run_sync(send) == []
        yes = await http.post(
            f"{server.url}/aggregates/commit", json={"date": today}, headers=admin
        )
        assert yes.status_code == 200, yes.text
        assert yes.json()["batches"], yes.text


# =================================================================================
# The HTTP examples and DESIGN §4's statuses
# =================================================================================


async def test_the_readme_examples_answer_as_shown(start_server: StartServer) -> None:
    """The curl example of "Sending usage" answers exactly the JSON shown under
    it, and a resend is `duplicate`; the commit example of the request table
    answers 200 and is safe to repeat; every request of that table is served
    with the documented shape. (The late window is widened so that the
    example's fixed timestamp stays inside it as the calendar moves on.)"""
    server = await start_server(INGESTOR_LATE_WINDOW="3650d", INGESTOR_DEDUP_WINDOW="3650d")
    content_type, body, shown = readme_curl_example()
    # README "API keys": "On a loopback address the server runs open, and says
    # so in its log", for requests naming a loopback host; another host is 403.
    assert "no api_keys" in server.output_of_run(), server.tail()
    async with httpx.AsyncClient(timeout=30) as http:
        rebound = await http.get(f"{server.url}/aggregates", headers={"Host": "evil.example"})
        assert rebound.status_code == 403, rebound.text
        for host in ("localhost:8081", "[::1]"):
            named = await http.get(f"{server.url}/aggregates", headers={"Host": host})
            assert named.status_code == 200, (host, named.text)
        sent = await http.post(
            f"{server.url}/pulses", content=body, headers={"Content-Type": content_type}
        )
        assert (sent.status_code, sent.json()) == (202, shown), sent.text
        again = await http.post(
            f"{server.url}/pulses", content=body, headers={"Content-Type": content_type}
        )
        assert again.json()["duplicates"] == len(json.loads(body)), again.text

        example = re.search(r"`POST /aggregates/commit` `(\{[^`]*\})`", README)
        assert example, "the README's commit example is gone"
        for _ in range(2):
            commit = await http.post(f"{server.url}/aggregates/commit", json=json.loads(example[1]))
            assert commit.status_code == 200, commit.text
            assert set(commit.json()) == {"date", "batches"}, commit.text
        day = json.loads(body)[1]["timestamp"][:10]
        made = await http.post(f"{server.url}/aggregates/commit", json={"date": day})
        batch_id = made.json()["batches"][0]["batch_id"]

        shapes = {
            "/aggregates": {"aggregates", "next_cursor"},
            "/batches": {"batches", "next_cursor"},
            "/pulses": {"pulses", "next_cursor"},
            "/healthz": {"status"},
            "/readyz": {"status", "store_id"},
        }
        params = {"/pulses": {"tenant_id": "t1", "date": day}}
        for method, route in readme_routes():
            path = route.replace("{id}", batch_id)
            if method == "POST":
                continue  # commit above; redeliver below
            answer = await http.get(f"{server.url}{path}", params=params.get(path))
            assert answer.status_code == 200, f"{method} {path}: {answer.status_code} {answer.text}"
            if path in shapes:
                assert set(answer.json()) == shapes[path], f"{path}: {answer.text[:300]}"
        for status in ("open", "committed", "all"):
            listed = await http.get(f"{server.url}/aggregates", params={"status": status})
            assert listed.status_code == 200, listed.text
        for status in ("pending", "delivered", "failed"):
            listed = await http.get(f"{server.url}/batches", params={"status": status})
            assert listed.status_code == 200, listed.text
        pulses = (await http.get(f"{server.url}/pulses", params=params["/pulses"])).json()
        assert [p["id"] for p in pulses["pulses"]] == ["req-2"], pulses
        document = (await http.get(f"{server.url}/openapi.json")).json()
        assert document["openapi"].startswith("3.1"), document["openapi"]
        # A delivered batch is not redelivered: 409, JSON.
        redeliver = await http.post(f"{server.url}/batches/{batch_id}/redeliver")
        assert redeliver.status_code == 409, redeliver.text
        assert redeliver.json()["error"]["code"], redeliver.text


async def test_documented_error_statuses_each_with_a_json_error_body(
    start_server: StartServer,
) -> None:
    """README "Sending usage" and DESIGN §4: not JSON 400; a single invalid pulse
    422; a conflict 409; wrong content type 415; a future commit date 422;
    unknown batch 404; and every error is `{"error": {"code", "message"}}`, an
    unknown route and a wrong method too (never HTML)."""
    server = await start_server()
    future = (now().date() + dt.timedelta(days=2)).isoformat()
    async with httpx.AsyncClient(timeout=30) as http:
        assert (await post(http, server, pulse("e1", id="x"))).status_code == 202
        cases = [
            ("not JSON", 400, await post_raw(http, server, b"{nope")),
            ("invalid single", 422, await post(http, server, pulse("e1", amount=-1))),
            ("conflict", 409, await post(http, server, pulse("e1", amount=2, id="x"))),
            ("content type", 415, await post_raw(http, server, b"{}", "text/plain")),
            (
                "future commit",
                422,
                await http.post(f"{server.url}/aggregates/commit", json={"date": future}),
            ),
            ("unknown batch", 404, await http.get(f"{server.url}/batches/no-such-batch")),
            (
                "limit over 10,000",
                400,
                await http.get(f"{server.url}/aggregates", params={"limit": "10001"}),
            ),
            ("GET /pulses without tenant_id", 400, await http.get(f"{server.url}/pulses")),
            ("unknown route", 404, await http.get(f"{server.url}/no-such-route")),
            ("wrong method", 405, await http.delete(f"{server.url}/pulses")),
        ]
    wrong = []
    for what, status, answer in cases:
        try:
            error = answer.json()["error"]
            shaped = isinstance(error["code"], str) and isinstance(error["message"], str)
        except (ValueError, KeyError, TypeError):
            shaped = False
        if answer.status_code != status or not shaped:
            wrong.append(f"{what}: want {status} JSON, got {answer.status_code} {answer.text!r}")
    assert wrong == [], "\n".join(wrong)


# =================================================================================
# Metrics the README names
# =================================================================================


def readme_metric_names() -> set[str]:
    names = set(re.findall(r"`(ingestor_[a-z_]+)`", README))
    # "`ingestor_store_writer_lock_wait_seconds` and `..._held_seconds`"
    for short in re.findall(r"`\.\.\.(_[a-z_]+)`", README):
        names.update(
            name.rsplit("_", 2)[0] + short for name in list(names) if name.endswith("_seconds")
        )
    return names


class TwoWorkers(ServerProcess):
    """`billing-ingestor serve --workers 2`, as the README writes it."""

    def command(self) -> list[str]:
        return [*super().command(), "--workers", "2"]


async def test_metrics_the_readme_names_exist_with_their_type_and_worker_labels(
    start_server: StartServer,
) -> None:
    """README "More than one process": `--workers 2` runs two workers; "each
    worker's series carry a `worker=\"<index>\"` label ... and the store's
    (outbox, open buckets) come once, unlabelled"; each worker reports its
    turns at the writers' lock as `ingestor_store_writer_lock_wait_seconds` and
    `..._held_seconds`, "a count and a sum each"."""
    names = readme_metric_names()
    lock = {n for n in names if "writer_lock" in n}
    assert lock == {
        "ingestor_store_writer_lock_wait_seconds",
        "ingestor_store_writer_lock_held_seconds",
    }, names
    server = await start_server(kind=TwoWorkers)
    async with httpx.AsyncClient(timeout=30) as http:
        for i in range(4):  # new connections: the kernel spreads them over the workers
            async with httpx.AsyncClient(timeout=30) as fresh:
                assert (await post(fresh, server, [pulse(f"m{i}", id="m")])).status_code == 202

        async def both() -> Scrape | None:
            found = await scrape(http, server)
            workers = {labels.get("worker") for labels in found.labelled("ingestor_ready")}
            return found if workers == {"0", "1"} else None

        metrics = await wait_until(both, within=20, what="both workers in /metrics")
    assert metrics is not None
    for name in ("ingestor_open_buckets", "ingestor_outbox_pending_batches"):
        assert metrics.labelled(name) == [{}], (name, metrics.labelled(name))
    for name in sorted(lock):
        assert metrics.types.get(name) == "summary", (name, metrics.types.get(name))
        for part in ("_count", "_sum"):
            workers = {labels.get("worker") for labels in metrics.labelled(name + part)}
            assert workers == {"0", "1"}, (name + part, metrics.labelled(name + part))
    turns = metrics.values("ingestor_store_writer_lock_held_seconds_count")
    assert sum(turns) >= 1, f"no turn at the writers' lock after writes: {turns}"
    workers = {labels.get("worker") for labels in metrics.labelled("ingestor_pulses_total")}
    assert workers == {"0", "1"}, metrics.labelled("ingestor_pulses_total")
    # SIGTERM, not the fixture's SIGKILL: the supervisor removes its socket directory.
    assert await server.terminate() == 0, server.tail()


async def test_a_worker_timeout_the_config_accepts_does_not_kill_healthy_workers(
    tmp_path: Path,
) -> None:
    """README: "one whose event loop has not run for `worker_timeout` is killed
    and restarted". Was: config.py accepted any duration above 0; a worker's
    loop beats only once a second and its start (a Python process's imports)
    counted against the timeout, so with `worker_timeout = 0.5s` healthy
    workers were killed as they started, again and again, and the group never
    served. Now a timeout under 3 s is refused, and at 3 s both workers start."""
    with pytest.raises(ConfigError, match="worker_timeout"):
        load_settings(environ={"INGESTOR_WORKER_TIMEOUT": "0.5s"})
    env = {"INGESTOR_WORKER_TIMEOUT": "3s", "INGESTOR_COMMIT_INTERVAL": "3600"}
    port = free_port()
    args = ["serve", "--workers", "2", "--bind", f"127.0.0.1:{port}"]
    args += ["--data-dir", str(tmp_path / "data")]
    log = tmp_path / "out.log"
    async with child(args, cwd=tmp_path, env=env, log=log), httpx.AsyncClient(timeout=2) as http:

        async def settled() -> str | None:
            text = log.read_text()
            if "stopped answering" in text:
                return "killed"
            try:
                metrics = Scrape.parse((await http.get(f"http://127.0.0.1:{port}/metrics")).text)
            except httpx.TransportError:
                return None
            ready = {labels.get("worker") for labels in metrics.labelled("ingestor_ready")}
            return "ready" if ready == {"0", "1"} else None

        outcome = await wait_until(settled, within=20, what="both workers up, or one killed")
    output = log.read_text()
    kills = [line for line in output.splitlines() if "stopped answering" in line]
    assert not kills, (
        "worker_timeout=3s (accepted by config.py) killed healthy workers:\n" + "\n".join(kills[:4])
    )
    assert outcome == "ready", output[-1000:]


# =================================================================================
# PostgreSQL: what the README tells the operator to size and to watch
# =================================================================================


async def test_postgres_connections_stay_within_pool_size_plus_one_and_clock_is_exposed(
    start_server: StartServer,
) -> None:
    """README: each instance "holds up to `store_pool_size` connections plus one
    for the committer's lock" (keep their sum under max_connections), and its
    clock's offset is in /metrics as `ingestor_clock_offset_seconds`."""
    assert "ingestor_clock_offset_seconds" in readme_metric_names()
    admin = require_postgres()
    with fresh_database(admin) as url:
        database = url.rsplit("/", 1)[1]

        def connections() -> int:
            with psycopg.connect(admin) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)
                ).fetchone()
                return int(row[0]) if row else 0

        server = await start_server(INGESTOR_STORE=url, INGESTOR_STORE_POOL_SIZE="2")
        peak = 0
        async with httpx.AsyncClient(timeout=30) as http:

            async def load(worker: int) -> None:
                for round_ in range(8):
                    body = [pulse(f"pg{worker}-{i}", id=f"{round_}-{i}") for i in range(20)]
                    answer = await post(http, server, body)
                    assert answer.status_code == 202, answer.text

            async with trio.open_nursery() as nursery:
                for worker in range(12):
                    nursery.start_soon(load, worker)
                for _ in range(10):
                    peak = max(peak, await trio.to_thread.run_sync(connections))
                    await trio.sleep(0.05)
            today = now().date().isoformat()
            commit = await http.post(f"{server.url}/aggregates/commit", json={"date": today})
            assert commit.status_code == 200, commit.text
            peak = max(peak, await trio.to_thread.run_sync(connections))
            metrics = await scrape(http, server)
        assert metrics.types.get("ingestor_clock_offset_seconds") == "gauge", metrics.types
        assert len(metrics.values("ingestor_clock_offset_seconds")) == 1
        assert 1 <= peak <= 2 + 1, f"store_pool_size=2: {peak} connections to the database"
        assert await server.terminate() == 0


async def test_an_unreachable_postgresql_ends_the_start_with_one_line(tmp_path: Path) -> None:
    """README: "An instance that cannot connect at start exits with one line"."""
    store = f"postgresql://ingestor@127.0.0.1:{free_port()}/billing"
    args = ["serve", "--bind", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "d")]
    ran = await run_cli(args, cwd=tmp_path, env={"INGESTOR_STORE": store})
    assert ran.code == 1, ran
    assert "Traceback" not in ran.stderr, ran
    assert one_line(ran.stderr), (
        f"an unreachable PostgreSQL printed {len(ran.stderr.splitlines())} lines, not one:"
        f" {ran.stderr!r}"
    )


# =================================================================================
# The deploy files
# =================================================================================


def dockerfile_env() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    found: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            found.update(re.findall(r"(\w+)=(\S+)", line))
    return found


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def example_config_with_a_key(tmp_path: Path) -> Path:
    """deploy/ingestor.example.toml with one admin key added, as the README says to."""
    config = tmp_path / "ingestor.toml"
    config.write_text(
        (ROOT / "deploy" / "ingestor.example.toml").read_text()
        + f'\n[[api_keys]]\nsha256 = "{"ab" * 32}"\nrole = "admin"\ntenants = ["*"]\n'
    )
    return config


def test_dockerfile_env_and_example_config_are_valid_settings(tmp_path: Path) -> None:
    """The Dockerfile's INGESTOR_* variables name real settings with valid values;
    with deploy/ingestor.example.toml as shipped (no key) a container refuses to
    start, naming api_keys (README: "add keys first"); with a key it starts."""
    env = {k: v for k, v in dockerfile_env().items() if k.startswith("INGESTOR_")}
    assert env, "the Dockerfile sets no INGESTOR_* variable"
    example = ROOT / "deploy" / "ingestor.example.toml"
    with pytest.raises(ConfigError, match="api_keys"):
        load_settings(example, environ=env)
    settings = load_settings(example_config_with_a_key(tmp_path), environ=env)
    # README "Running it": "non-root user".
    users = re.findall(r"^USER (\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert users, "the Dockerfile never leaves root"
    assert users[-1] not in ("root", "0"), users
    assert settings.bind == env["INGESTOR_BIND"]
    assert settings.data_dir == env["INGESTOR_DATA_DIR"]


def test_ports_of_dockerfile_compose_and_nginx_agree(tmp_path: Path) -> None:
    """The port the container's server binds (Dockerfile INGESTOR_BIND) is the one
    it EXPOSEs, its HEALTHCHECK asks on /readyz, compose publishes, and nginx's
    upstream names, on compose services that exist."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    bind = dockerfile_env()["INGESTOR_BIND"]
    port = int(bind.rsplit(":", 1)[1])
    assert re.search(rf"^EXPOSE {port}$", dockerfile, re.M), "EXPOSE differs from INGESTOR_BIND"
    health = re.search(r"HEALTHCHECK.*?'(http://[^']+)'", dockerfile, re.S)
    assert health, "the Dockerfile has no HEALTHCHECK URL"
    assert health[1] == f"http://127.0.0.1:{port}/readyz", health[1]
    services = compose()["services"]
    assert f"127.0.0.1:{port}:{port}" in services["ingestor"]["ports"]
    # README "Running it": "data in a named volume".
    volume = next(v for v in services["ingestor"]["volumes"] if v.endswith(":/data"))
    assert volume.split(":")[0] in compose()["volumes"], volume
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    upstreams = re.findall(r"server ([\w-]+):(\d+)", nginx)
    assert upstreams, nginx
    for host, upstream_port in upstreams:
        assert host in services, f"nginx's upstream {host} is not a compose service"
        assert int(upstream_port) == port, (host, upstream_port)
    # nginx must let through every body the server takes.
    size = re.search(r"client_max_body_size (\d+)m;", nginx)
    assert size, "nginx.conf sets no client_max_body_size"
    assert int(size[1]) * 1024 * 1024 >= Settings().max_body_bytes, size[0]


def test_compose_settings_are_valid_and_the_grace_period_covers_the_drain(
    tmp_path: Path,
) -> None:
    """Each compose service running the ingestor: its environment (over the
    Dockerfile's) and the example config with a key load without error, and
    its stop_grace_period is longer than the drain it allows (graceful_timeout),
    so `docker compose stop` drains instead of killing."""
    config = example_config_with_a_key(tmp_path)
    checked = 0
    for name, service in compose()["services"].items():
        if service.get("build") != ".":
            continue
        env = {**dockerfile_env(), **{k: str(v) for k, v in service.get("environment", {}).items()}}
        unknown = [
            k
            for k in env
            if k.startswith("INGESTOR_") and k[9:].lower() not in Settings.__struct_fields__
        ]
        assert unknown == [], f"{name}: unknown settings {unknown}"
        settings = load_settings(config, environ=env)
        grace = parse_duration(service["stop_grace_period"])
        assert grace > settings.graceful_timeout, (name, grace, settings.graceful_timeout)
        checked += 1
    assert checked == 3, checked


def test_compose_cluster_profile_runs_only_the_replicas(tmp_path: Path) -> None:
    """README: the cluster command "runs two replicas on PostgreSQL and NATS
    behind one port". Was: `docker compose --profile cluster up`; a service
    without `profiles` is started by every profile, so the single-node
    `ingestor` (its own SQLite store) started beside the replicas, a second
    billing store on 8081 whose pulses never reach PostgreSQL or NATS. The
    README's command now names what to start; this follows its `depends_on`."""
    services = compose()["services"]
    [command] = re.findall(r"`(docker compose --profile cluster up[^`]*)`", README)
    named = [word for word in command.split()[5:] if not word.startswith("-")]
    active = {"cluster"}
    started: set[str] = set()
    waiting = list(named) or [
        name for name, s in services.items() if set(s.get("profiles", active)) & active
    ]
    while waiting:
        name = waiting.pop()
        if name not in started:
            started.add(name)
            depends = services[name].get("depends_on", [])
            waiting.extend(depends if isinstance(depends, list) else depends.keys())
    ingestors = sorted(name for name in started if services[name].get("build") == ".")
    assert ingestors == ["replica-a", "replica-b"], (
        f"`{command}` starts these ingestors: {ingestors} (a service with no `profiles`"
        " always starts, unless the command names the services to start)"
    )
    assert {"postgres", "nats", "balancer"} <= started, sorted(started)
