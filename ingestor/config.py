"""Settings: one TOML file plus INGESTOR_* environment variables.

Precedence: command-line flags > environment > config file > defaults. Every
setting is checked before anything starts; a mistake stops the start with one
line that names the setting and says what is wrong.

Durations are seconds, or strings such as "90s", "15m", "1h", "35d".
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import tomllib
import zoneinfo
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

import msgspec

from .errors import ConfigError
from .ledger import BATCH_MAX_BYTES, BATCH_MIN_BYTES

__all__ = ["ApiKey", "Settings", "check_nats_names", "load_settings", "parse_duration"]

# At most 1,000 years: "inf" passed gt=0 and then failed as microseconds.
Seconds = Annotated[float, msgspec.Meta(gt=0, le=1000 * 365.25 * 86400)]
Count = Annotated[int, msgspec.Meta(ge=1)]
_SHA256_HEX = re.compile(r"\A[0-9a-fA-F]{64}\Z")
_TENANT = re.compile(r"\A[^\x00-\x1f\x7f-\x9f]{1,128}\Z")  # model.Name, as a check here


class ApiKey(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One `[[api_keys]]` table: a key known only by its SHA-256, a role, its tenants.

    `tenants = ["*"]` means every tenant; admin keys always act on every tenant.
    """

    sha256: str
    role: Literal["ingest", "read", "admin"]
    tenants: tuple[str, ...]


class Settings(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Every setting, with its default. Field names are the TOML keys."""

    bind: str = "127.0.0.1:8081"
    data_dir: str = "./data"
    store: str = "sqlite"
    durability: Literal["fsync", "os"] = "fsync"
    partitions: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16
    billing_timezone: str = "UTC"
    tenant_timezones: dict[str, str] = msgspec.field(default_factory=dict)
    late_window: Seconds = 35 * 86400
    dedup_window: Seconds = 35 * 86400
    future_skew: Seconds = 300
    max_batch: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 10_000
    max_body_bytes: Count = 16 * 1024 * 1024
    shard_queue: Count = 64
    # A group is at most group_max_pulses + max_batch pulses, < 2**20 (store cursors).
    group_max_pulses: Annotated[int, msgspec.Meta(ge=1, le=500_000)] = 50_000
    commit_interval: Seconds = 60
    commit_grace: Seconds = 3600
    batch_max_records: Count = 1_000
    batch_max_bytes: Count = BATCH_MAX_BYTES
    store_pool_size: Count = 8
    sink: str = "file"
    nats_stream: str = "BILLING_BATCHES"
    nats_subject: str = "billing.batches.{date}"
    sink_secret: str = ""
    sink_timeout: Seconds = 10
    delivery_concurrency: Count = 4
    retry_initial: Seconds = 1
    retry_max: Seconds = 300
    store_busy_timeout: Seconds = 10
    graceful_timeout: Seconds = 30
    workers: Count = 1
    worker_timeout: Seconds = 30
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    api_keys: tuple[ApiKey, ...] = ()
    max_line_bytes: Count = 64 * 1024
    body_timeout: Seconds = 30
    max_in_flight: Count = 1024
    max_in_flight_bytes: Count = 256 * 1024 * 1024
    max_header_bytes: Count = 16 * 1024

    @property
    def on_postgres(self) -> bool:
        """Whether `store` names a PostgreSQL database (else it is "sqlite")."""
        return self.store.startswith(("postgresql://", "postgres://"))

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def bind_host(self) -> str:
        return self.bind.rsplit(":", 1)[0].strip("[]")

    @property
    def bind_port(self) -> int:
        return int(self.bind.rsplit(":", 1)[1])


_DURATION = re.compile(r"\A\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*\Z")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_DURATIONS = frozenset(name for name, kind in Settings.__annotations__.items() if kind == "Seconds")


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like "90s", "15m", "1h", "35d"."""
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and (match := _DURATION.match(value)):
        return float(match[1]) * _UNIT_SECONDS[match[2]]
    raise ValueError(f"expected a duration such as 30, '90s', '15m', '1h' or '35d', got {value!r}")


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    fields = set(Settings.__struct_fields__)
    found: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith("INGESTOR_"):
            continue
        name = key.removeprefix("INGESTOR_").lower()
        if name not in fields:
            raise ConfigError(f"{key}: unknown setting (known: {', '.join(sorted(fields))})")
        if name in ("tenant_timezones", "api_keys"):
            raise ConfigError(f"{key}: set {name} in the config file (not by environment)")
        found[name] = value
    return found


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Read, merge and check the settings; raise ConfigError on the first mistake."""
    raw: dict[str, Any] = {}
    if config_file is not None:
        try:
            with open(config_file, "rb") as f:
                raw.update(tomllib.load(f))
        except OSError as exc:
            raise ConfigError(f"config file {config_file}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {config_file}: not valid TOML: {exc}") from None
    raw.update(_from_env(os.environ if environ is None else environ))
    raw.update({k: v for k, v in overrides.items() if v is not None})

    for name in _DURATIONS & raw.keys():
        try:
            raw[name] = parse_duration(raw[name])
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc)) from None
    _check(settings)
    _check_trust(settings, os.environ)
    return settings


def _explain(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    match = re.search(r" - at `\$\.?([^`]*)`", text)
    if match:
        return f"{match[1] or 'config'}: {text[: match.start()]}"
    if m := re.search(r"unknown field `([^`]+)`", text):
        return f"{m[1]}: unknown setting"
    return text


# Workers beat once a second (`workers._BEAT`): a shorter timeout would kill
# a healthy worker between two beats.
WORKER_TIMEOUT_MIN = 3.0


def _check(settings: Settings) -> None:
    host, sep, port = settings.bind.rpartition(":")
    if not sep or not host or not _PORT.fullmatch(port) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"bind: expected HOST:PORT, got {settings.bind!r}")
    for name, zone in [("billing_timezone", settings.billing_timezone)] + [
        (f"tenant_timezones.{tenant}", zone) for tenant, zone in settings.tenant_timezones.items()
    ]:
        try:
            zoneinfo.ZoneInfo(zone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            raise ConfigError(f"{name}: unknown IANA time zone {zone!r}") from None
    if not settings.data_dir.strip():
        # What a compose file's `${DATA_DIR}` gives when the variable is unset:
        # taken as ".", it made a store in whatever directory the server ran in.
        raise ConfigError("data_dir: empty; name a directory (the default is ./data)")
    if settings.worker_timeout < WORKER_TIMEOUT_MIN:
        raise ConfigError(
            f"worker_timeout: must be at least {WORKER_TIMEOUT_MIN:g}s (a worker shows it"
            f" runs once a second), got {settings.worker_timeout:g}s"
        )
    if settings.max_in_flight_bytes < settings.max_body_bytes:
        raise ConfigError(
            f"max_in_flight_bytes: must be at least max_body_bytes ({settings.max_body_bytes}),"
            f" or a body of that size could never be taken; got {settings.max_in_flight_bytes}"
        )
    if settings.store != "sqlite" and not settings.on_postgres:
        raise ConfigError(
            f"store: expected 'sqlite' or a postgresql:// URL, got {shown_url(settings.store)!r}"
        )
    sink = settings.sink
    if sink.startswith("tls://"):
        # NATS's Go client insists on TLS for such a URL; nats-py does not, and
        # sends the credentials to a server that does not ask for TLS in clear.
        raise ConfigError(
            "sink: tls:// URLs are not taken: the NATS client used here would not"
            " insist on TLS for them. Use nats://, over which TLS is used whenever"
            " the server requires it (a tls {} block in its config)"
        )
    if sink != "file" and not sink.startswith(("http://", "https://", "nats://")):
        raise ConfigError(
            f"sink: expected 'file', an http(s):// URL or a nats:// URL, got {shown_url(sink)!r}"
        )
    if sink != "file":
        # Checked now, not at the first delivery: a URL no request can go to
        # would fail every batch, or raise where no sink error is expected.
        for server in sink.split(",") if sink.startswith("nats://") else [sink]:
            _check_url("sink", server.strip())
    if "{date}" not in settings.nats_subject:
        raise ConfigError("nats_subject: must contain {date}, e.g. 'billing.batches.{date}'")
    if sink.startswith("nats://"):
        check_nats_names(settings.nats_stream, settings.nats_subject)
    if sink.startswith("http") and not settings.sink_secret:
        raise ConfigError("sink_secret: required with an http sink, to sign each delivery")
    if settings.batch_max_bytes < BATCH_MIN_BYTES:
        raise ConfigError(
            f"batch_max_bytes: must be at least {BATCH_MIN_BYTES} (a record with its names"
            f" at their longest, and the batch's own fields), got {settings.batch_max_bytes}"
        )
    if settings.retry_max < settings.retry_initial:
        raise ConfigError("retry_max: must be >= retry_initial")
    if settings.dedup_window < settings.late_window:
        raise ConfigError(
            "dedup_window: must be >= late_window, or a late replay could count twice"
        )
    _check_api_keys(settings)


_INVALID_STREAM_CHARS = frozenset(">*. /\\\t\r\n")


def check_nats_names(stream: str, subject: str) -> None:
    """Refuse a JetStream stream name or subject template the server would refuse."""
    if not stream or _INVALID_STREAM_CHARS & set(stream):
        raise ConfigError(
            f"nats_stream: {stream!r} is not a valid stream name (no spaces, '.', '*', '>')"
        )
    tokens = subject.split(".")
    if any(not token or any(c.isspace() or c in "*>" for c in token) for token in tokens):
        raise ConfigError(
            f"nats_subject: {subject!r} is not a valid subject "
            "(dot-separated tokens, no spaces or wildcards)"
        )


def _is_loopback(host: str) -> bool:
    """Whether `host` (a bind address) is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_api_keys(settings: Settings) -> None:
    if not settings.api_keys and not _is_loopback(settings.bind_host):
        raise ConfigError(
            f"api_keys: none configured, and bind {settings.bind!r} is not a loopback address;"
            " anyone who reaches it could write and read usage. Add [[api_keys]] tables"
            " (make one with `billing-ingestor keys new`) or bind to 127.0.0.1"
        )
    seen: set[str] = set()
    for number, key in enumerate(settings.api_keys):
        where = f"api_keys[{number}]"
        if not _SHA256_HEX.match(key.sha256):
            raise ConfigError(
                f"{where}.sha256: expected the 64 hex digits of the key's SHA-256"
                " (`billing-ingestor keys new` prints them), never the key itself"
            )
        if key.sha256.lower() in seen:
            raise ConfigError(f"{where}.sha256: the same key is listed twice")
        seen.add(key.sha256.lower())
        if not key.tenants:
            raise ConfigError(f'{where}.tenants: name at least one tenant, or ["*"] for all')
        if "*" in key.tenants and len(key.tenants) > 1:
            raise ConfigError(f'{where}.tenants: "*" means every tenant and stands alone')
        if key.role == "admin" and key.tenants != ("*",):
            raise ConfigError(f'{where}.tenants: an admin key acts on every tenant; use ["*"]')
        for tenant in key.tenants:
            if tenant != "*" and not _TENANT.match(tenant):
                raise ConfigError(
                    f"{where}.tenants: {tenant!r} is not a tenant id"
                    " (1-128 characters, no control characters)"
                )


def _check_trust(settings: Settings, environ: Mapping[str, str]) -> None:
    """The CA certificates that SSL_CERT_FILE or SSL_CERT_DIR name, where the
    sink may speak TLS: they are read from the process's environment by the
    sinks' TLS (httpx, and OpenSSL under nats-py), whatever `load_settings`
    was given. httpx loads them as the sink is made: a file that was not
    there (a typo, a volume not mounted yet) stopped the start with a
    traceback naming no file, a plain http:// sink's too. OpenSSL passes over
    one, and every delivery to NATS failed "unable to get local issuer
    certificate"."""
    if settings.sink == "file":
        return
    cafile, capath = environ.get("SSL_CERT_FILE"), environ.get("SSL_CERT_DIR")
    if capath and not os.path.isdir(capath):
        raise ConfigError(f"SSL_CERT_DIR: {capath!r} is not a directory of CA certificates")
    if cafile:
        try:
            ssl.create_default_context(cafile=cafile)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(
                f"SSL_CERT_FILE: cannot load CA certificates from {cafile!r}: {exc}"
            ) from None


def _check_url(name: str, url: str) -> None:
    """A URL with a scheme, a host and, if any, a numeric port, or ConfigError."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError as exc:
        raise ConfigError(
            f"{name}: not a valid URL, {shown_url(url)!r}: {without_secrets(str(exc), url)}"
        ) from None
    if not parts.scheme or not parts.hostname:
        raise ConfigError(f"{name}: the URL {shown_url(url)!r} names no host")


# Where a URL that lists several servers starts the next (nats://a@h1,nats://b@h2).
_NEXT_SERVER = re.compile(r",(?=[A-Za-z][A-Za-z0-9+.-]*://)")
_QUERY_VALUE = re.compile(r"([?&][^=&#]*=)([^&#]*)")
_PIECES = re.compile(r"[/?#@:&=]")  # where a driver may cut a password it misreads
_PORT = re.compile(r"[0-9]{1,5}")  # ASCII digits: str.isdigit() takes "²", which int() refuses


def _servers(url: str) -> list[tuple[str, str]]:
    """Each server of `url` as (its userinfo, the rest after it): the userinfo
    runs to the server's last "@", as urlsplit, httpx and nats-py read it, so a
    password holding an unencoded "@", "/" or "#" is found whole."""
    found = []
    for server in _NEXT_SERVER.split(url):
        scheme, sep, rest = server.partition("://")
        userinfo, at, after = rest.rpartition("@")
        found.append((userinfo if at else "", f"{scheme}{sep}***@{after}" if at else server))
    return found


def shown_url(url: str) -> str:
    """`url` as a message or a log line may show it: without the credentials of
    any of its servers (nats://a:pw@h1,nats://b:pw@h2), nor the value of any of
    its query parameters (a token, a password)."""
    return ",".join(_QUERY_VALUE.sub(r"\1***", shown) for _, shown in _servers(url))


def without_secrets(text: str, url: str) -> str:
    """`text` (a driver's message about `url`) with the secrets of `url` taken
    out: each server's userinfo, its password, the password's pieces (a driver
    may quote a token it could not parse, or take part of the password for a
    host or a port), and every query value, as written and percent-decoded."""
    found: set[str] = set()
    for userinfo, _ in _servers(url):
        user, _, password = userinfo.partition(":")
        found.update((userinfo, password or user))
        found.update(piece for piece in _PIECES.split(password) if len(piece) > 2)
    found.update(m[2] for m in _QUERY_VALUE.finditer(url))
    forms = {form for secret in found for form in (secret, unquote(secret)) if len(form) > 1}
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, "***")
    return text
