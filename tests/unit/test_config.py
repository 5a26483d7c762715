"""Settings: defaults, TOML file, INGESTOR_* environment, keyword overrides, checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ingestor.config import Settings, load_settings, parse_duration
from ingestor.errors import ConfigError

DAY = 86_400


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ingestor.toml"
    path.write_text(text, encoding="utf-8")
    return path


def fails(
    name: str,
    *,
    config_file: Path | None = None,
    environ: dict[str, str] | None = None,
    **overrides: object,
) -> str:
    """Load, expect a ConfigError whose message starts with `name`, return the message."""
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file, {} if environ is None else environ, **overrides)
    message = str(caught.value)
    assert re.match(rf"{re.escape(name)}(?![A-Za-z0-9_])", message), message
    return message


# --- sources and precedence ---------------------------------------------------------


def test_defaults_follow_the_design() -> None:
    s = load_settings(environ={})
    assert s == Settings()
    assert s.bind_port == 8081
    assert s.partitions == 16
    assert s.billing_timezone == "UTC"
    assert s.tenant_timezones == {}
    assert s.durability == "fsync"
    assert s.late_window == 35 * DAY
    assert s.dedup_window == 35 * DAY
    assert s.future_skew == 300
    assert s.max_batch == 10_000
    assert s.max_body_bytes == 16 * 1024 * 1024
    assert s.commit_interval == 60
    assert s.commit_grace == 3600
    assert s.sink == "file"
    assert s.store == "sqlite"


def test_settings_from_a_toml_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
bind = "0.0.0.0:9000"
partitions = 4
durability = "os"
billing_timezone = "America/New_York"
late_window = "7d"
dedup_window = "10d"
commit_interval = "90s"
commit_grace = 120
sink = "https://billing.example/batches"
sink_secret = "s3cret"

[tenant_timezones]
acme = "Asia/Kathmandu"
"big corp" = "Australia/Lord_Howe"

[[api_keys]]
sha256 = "{"0" * 64}"
role = "admin"
tenants = ["*"]
""",
    )
    s = load_settings(path, {})
    assert (s.bind_host, s.bind_port) == ("0.0.0.0", 9000)
    assert s.partitions == 4
    assert s.durability == "os"
    assert s.billing_timezone == "America/New_York"
    assert s.tenant_timezones == {"acme": "Asia/Kathmandu", "big corp": "Australia/Lord_Howe"}
    assert s.late_window == 7 * DAY
    assert s.dedup_window == 10 * DAY
    assert s.commit_interval == 90
    assert s.commit_grace == 120
    assert s.sink == "https://billing.example/batches"
    assert s.max_batch == 10_000  # untouched settings keep their default


def test_environment_beats_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'partitions = 4\ncommit_interval = "90s"\nlog_level = "debug"\n')
    env = {"INGESTOR_PARTITIONS": "8", "INGESTOR_COMMIT_INTERVAL": "15m", "PATH": "/bin"}
    s = load_settings(path, env)
    assert s.partitions == 8
    assert s.commit_interval == 15 * 60
    assert s.log_level == "debug"


def test_keyword_overrides_beat_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "partitions = 4\nmax_batch = 10\n")
    env = {"INGESTOR_PARTITIONS": "8", "INGESTOR_MAX_BATCH": "20", "INGESTOR_BIND": "[::1]:1"}
    s = load_settings(path, env, partitions=32, bind=None, max_batch=None)
    assert s.partitions == 32
    # None means "not given on the command line": the environment still counts.
    assert s.max_batch == 20
    assert s.bind == "[::1]:1"
    assert (s.bind_host, s.bind_port) == ("::1", 1)


def test_environment_values_are_converted() -> None:
    env = {
        "INGESTOR_MAX_BATCH": "250",
        "INGESTOR_DURABILITY": "os",
        "INGESTOR_FUTURE_SKEW": "2m",
        "INGESTOR_DATA_DIR": "/var/lib/ingestor",
    }
    s = load_settings(environ=env)
    assert s.max_batch == 250
    assert s.durability == "os"
    assert s.future_skew == 120
    assert s.data_path == Path("/var/lib/ingestor")


def test_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("INGESTOR_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("INGESTOR_PARTITIONS", "3")
    assert load_settings().partitions == 3


def test_other_variables_are_ignored() -> None:
    s = load_settings(environ={"PATH": "/bin", "INGESTORX": "1", "ingestor_partitions": "2"})
    assert s == Settings()


# --- durations ----------------------------------------------------------------------

DURATIONS = [
    ("90s", 90),
    ("15m", 900),
    ("1h", 3600),
    ("35d", 35 * DAY),
    ("1.5h", 5400),
    ("250ms", 0.25),
    ("45", 45),
    (" 2 m ", 120),
    (30, 30),
    (2.5, 2.5),
]


@pytest.mark.parametrize(("value", "seconds"), DURATIONS)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(("value", "seconds"), DURATIONS)
def test_durations_in_every_source(tmp_path: Path, value: object, seconds: float) -> None:
    assert load_settings(environ={}, commit_grace=value).commit_grace == pytest.approx(seconds)
    toml_value = f'"{value}"' if isinstance(value, str) else str(value)
    path = write(tmp_path, f"commit_grace = {toml_value}\n")
    assert load_settings(path, {}).commit_grace == pytest.approx(seconds)
    env = {"INGESTOR_COMMIT_GRACE": str(value)}
    assert load_settings(environ=env).commit_grace == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["abc", "-5s", "5x", "5 days", "", "1h30m", True, [1], "0s", 0])
def test_bad_durations_name_the_setting(value: object) -> None:
    fails("commit_grace", commit_grace=value)


def test_bad_duration_in_the_environment() -> None:
    fails("late_window", environ={"INGESTOR_LATE_WINDOW": "soon"})


# --- mistakes -----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["sixteen", "1.5", "", "0", "1025", "-1"])
def test_bad_int_from_the_environment(value: str) -> None:
    fails("partitions", environ={"INGESTOR_PARTITIONS": value})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("partitions", 0),
        ("partitions", 2000),
        ("max_batch", 0),
        ("max_batch", "lots"),
        ("shard_queue", -3),
        ("batch_max_records", 1.5),
    ],
)
def test_bad_ints(name: str, value: object) -> None:
    fails(name, **{name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("durability", "sometimes"),
        ("durability", "FSYNC"),
        ("log_level", "loud"),
        ("log_format", "xml"),
    ],
)
def test_bad_enum(name: str, value: str) -> None:
    message = fails(name, **{name: value})
    assert value in message


def test_bad_enum_in_the_environment() -> None:
    fails("durability", environ={"INGESTOR_DURABILITY": "never"})


def test_unknown_setting_in_the_environment() -> None:
    message = fails("INGESTOR_PARTITION", environ={"INGESTOR_PARTITION": "4"})
    assert "unknown" in message


def test_tenant_timezones_cannot_come_from_the_environment() -> None:
    fails("INGESTOR_TENANT_TIMEZONES", environ={"INGESTOR_TENANT_TIMEZONES": "a=UTC"})


def test_unknown_setting_in_the_file(tmp_path: Path) -> None:
    message = fails("partiton", config_file=write(tmp_path, "partiton = 4\n"))
    assert "unknown" in message


def test_unknown_table_in_the_file(tmp_path: Path) -> None:
    fails("server", config_file=write(tmp_path, '[server]\nbind = "127.0.0.1:1"\n'))


def test_wrong_type_in_the_file(tmp_path: Path) -> None:
    fails("partitions", config_file=write(tmp_path, 'partitions = "many"\n'))
    fails("tenant_timezones", config_file=write(tmp_path, "[tenant_timezones]\nacme = 5\n"))


@pytest.mark.parametrize(
    "bind", ["localhost", "127.0.0.1", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:65536", ":80"]
)
def test_bad_bind(bind: str) -> None:
    fails("bind", bind=bind)


@pytest.mark.parametrize("bind", ["0.0.0.0:0", "localhost:65535", "[::]:8081"])
def test_good_bind(bind: str) -> None:
    # A bind beyond loopback needs API keys (tests/test_auth.py).
    keys = [{"sha256": "0" * 64, "role": "admin", "tenants": ["*"]}]
    assert load_settings(environ={}, bind=bind, api_keys=keys).bind == bind


@pytest.mark.parametrize("zone", ["Mars/Olympus", "utc ", "", "../etc/passwd", "/etc/localtime"])
def test_unknown_billing_timezone(zone: str) -> None:
    fails("billing_timezone", billing_timezone=zone)


@pytest.mark.parametrize("zone", ["Europe", "America"])
def test_zone_directory_is_an_unknown_time_zone(zone: str) -> None:
    """A zone *area* such as "Europe" is not a zone.

    `zoneinfo.ZoneInfo("Europe")` raises IsADirectoryError (it opens the tzdata
    directory), which `_check` in config.py does not catch: it only catches
    ZoneInfoNotFoundError and ValueError, so the start fails with a raw
    OSError traceback instead of a ConfigError naming the setting.
    """
    fails("billing_timezone", billing_timezone=zone)


def test_unknown_tenant_timezone(tmp_path: Path) -> None:
    path = write(tmp_path, '[tenant_timezones]\nacme = "Nowhere/City"\n')
    message = fails("tenant_timezones", config_file=path)
    assert "acme" in message


def test_good_zones() -> None:
    for zone in ("UTC", "America/New_York", "Asia/Kathmandu", "Australia/Lord_Howe"):
        assert load_settings(environ={}, billing_timezone=zone).billing_timezone == zone


@pytest.mark.parametrize("sink", ["http://billing.local/in", "https://billing.example/batches"])
def test_http_sink_needs_a_secret(sink: str) -> None:
    fails("sink_secret", sink=sink)
    assert load_settings(environ={}, sink=sink, sink_secret="k").sink == sink


def test_file_sink_needs_no_secret() -> None:
    assert load_settings(environ={}, sink="file").sink_secret == ""


def test_bad_sink_and_store() -> None:
    fails("sink", sink="ftp://somewhere")
    fails("store", store="mysql://db")


def test_dedup_window_must_cover_the_late_window() -> None:
    fails("dedup_window", late_window="35d", dedup_window="34d")
    fails("dedup_window", environ={"INGESTOR_LATE_WINDOW": "2h", "INGESTOR_DEDUP_WINDOW": "1h"})
    s = load_settings(environ={}, late_window="2d", dedup_window="48h")
    assert s.dedup_window == s.late_window == 2 * DAY


def test_retry_max_must_cover_retry_initial() -> None:
    fails("retry_max", retry_initial="10m", retry_max="1m")


def test_batch_max_bytes_must_hold_a_record_at_its_longest() -> None:
    assert "at least 3072" in fails("batch_max_bytes", batch_max_bytes=3071)
    assert load_settings(environ={"INGESTOR_BATCH_MAX_BYTES": "3072"}).batch_max_bytes == 3072
    assert load_settings(environ={}).batch_max_bytes == 1_000_000


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    message = fails("config file", config_file=missing)
    assert str(missing) in message


def test_config_file_that_is_a_directory(tmp_path: Path) -> None:
    message = fails("config file", config_file=tmp_path)
    assert str(tmp_path) in message


@pytest.mark.parametrize(
    "text", ["partitions = ", "bind = 127.0.0.1:1\n", "[tenant_timezones\n", "a = 1\na = 2\n"]
)
def test_invalid_toml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    message = fails("config file", config_file=path)
    assert str(path) in message
    assert "TOML" in message


def test_undecodable_toml(tmp_path: Path) -> None:
    """A config file that is not UTF-8 is an invalid TOML file, and says so.

    `tomllib.load` decodes the bytes first and raises UnicodeDecodeError,
    which `load_settings` does not catch (it catches OSError and
    TOMLDecodeError only), so the start fails with a raw traceback.
    """
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'store = "caf\xe9"\n')
    fails("config file", config_file=path)
