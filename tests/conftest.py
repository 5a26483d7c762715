"""Fixtures shared by the in-process suites: a running service on a temp dir."""

from __future__ import annotations

import datetime as dt
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from quart import Quart
from quart.typing import TestClientProtocol as Client

from ingestor.api import create_app
from ingestor.clock import epoch_us
from ingestor.config import Settings, load_settings
from ingestor.runtime import Runtime
from ingestor.service import open_service
from ingestor.sinks.memory import MemorySink
from ingestor.store import sqlite as sqlite_store

# The user property under which a fault scenario reports its counts
# (tests/faults/conftest.py's `report`), printed after the run.
SCENARIO = "fault scenario"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = sorted(
        str(value)
        for reports in terminalreporter.stats.values()
        for test in reports
        if getattr(test, "when", None) == "call"
        for name, value in getattr(test, "user_properties", ())
        if name == SCENARIO
    )
    if lines:
        terminalreporter.section("fault scenarios")
        for line in lines:
            terminalreporter.write_line(line)


class FakeClock:
    """Wall-clock microseconds that a test sets and moves by hand."""

    def __init__(self, start: dt.datetime) -> None:
        self.now_us = epoch_us(start)

    def __call__(self) -> int:
        return self.now_us

    def advance(self, seconds: float) -> None:
        self.now_us += int(seconds * 1_000_000)

    @property
    def now(self) -> dt.datetime:
        return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=self.now_us)


@pytest.fixture(autouse=True)
def merges_of_the_size_a_test_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite's merges of recent ids keep the size a test sets: a merge of a few
    ids costs far more CPU an id than one of 20,000, and would double the next
    (`_next_merge_at`). The tests of that sizing set their own bounds."""
    monkeypatch.setattr(sqlite_store, "_MERGE_DEAR", float("inf"))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC))


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
def settings(tmp_path: Path, settings_overrides: dict[str, Any]) -> Settings:
    base: dict[str, Any] = {
        "data_dir": str(tmp_path / "data"),
        "partitions": 4,
        "commit_interval": 3600,
        "durability": "os",
    }
    base.update(settings_overrides)
    return load_settings(environ={}, **base)


@pytest.fixture
def sink() -> MemorySink:
    return MemorySink()


@pytest.fixture
async def runtime(settings: Settings, sink: MemorySink, clock: FakeClock) -> AsyncIterator[Runtime]:
    async with open_service(settings, sink=sink, clock=clock) as running:
        yield running


@pytest.fixture
def app(runtime: Runtime) -> Quart:
    return create_app(runtime)


@pytest.fixture
def client(app: Quart) -> Client:
    return app.test_client()


def pulse(**fields: Any) -> dict[str, Any]:
    """A valid pulse, with `fields` replacing or adding to the defaults."""
    base: dict[str, Any] = {
        "tenant_id": "t1",
        "product_sku": "sku1",
        "use_unit": "api_call",
        "used_amount": "1",
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


# -- PostgreSQL -------------------------------------------------------------------
#
# The PostgreSQL tests need a server (`bash .ci/services` starts one on
# 127.0.0.1:5432); `TEST_POSTGRES_URL` points them at another. The session
# makes a database with a random name and drops it at the end; each test gets
# a fresh schema in it (the URL's search_path), or a whole database of its own.
# Without a server the tests are skipped, except under CI (the `CI` variable
# set), where a missing server is a failure: a green CI run must have tested
# PostgreSQL.

ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def postgres_admin() -> str:
    """The URL of a reachable server's maintenance database, or skip (fail under CI)."""
    try:
        with psycopg.connect(ADMIN_URL, connect_timeout=3):
            pass
    except psycopg.OperationalError as exc:
        message = (
            f"PostgreSQL is not reachable at {ADMIN_URL} ({exc}); start it with"
            " `bash .ci/services` or set TEST_POSTGRES_URL"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return ADMIN_URL


def _create_database(admin: str) -> str:
    name = f"ingestor_test_{secrets.token_hex(6)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        try:
            # A locale that sorts "a" before "B" proves the store's order is
            # code-point order (COLLATE "C"), as in SQLite, not the locale's.
            conn.execute(
                f"CREATE DATABASE {name} TEMPLATE template0"
                " LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
            )
        except psycopg.Error:
            conn.execute(f"CREATE DATABASE {name}")
    return name


def _drop_database(admin: str, name: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def fresh_database(postgres_admin: str) -> Iterator[str]:
    """A new, empty database of its own: the store goes into its `public` schema."""
    name = _create_database(postgres_admin)
    try:
        yield make_conninfo(postgres_admin, dbname=name)
    finally:
        _drop_database(postgres_admin, name)


@pytest.fixture(scope="session")
def postgres_database(postgres_admin: str) -> Iterator[str]:
    """One throw-away database for the session (a database per test is slow)."""
    name = _create_database(postgres_admin)
    try:
        yield make_conninfo(postgres_admin, dbname=name)
    finally:
        _drop_database(postgres_admin, name)


@contextmanager
def new_schema(database: str) -> Iterator[str]:
    """A new, empty schema of `database`, named by the URL's search_path; dropped after."""
    schema = f"s_{secrets.token_hex(6)}"
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield make_conninfo(database, options=f"-c search_path={schema}")
    finally:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def postgres_url(postgres_database: str) -> Iterator[str]:
    """A new, empty schema of the session's database."""
    with new_schema(postgres_database) as url:
        yield url


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The path of each descriptor `os.fsync` is called on during the test, in order."""
    synced: list[Path] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return synced
