"""Fixtures for the store tests: a fresh store of each kind.

The PostgreSQL tests need a server (`bash .ci/services` starts one on
127.0.0.1:5432); `TEST_POSTGRES_URL` points them at another. The session
makes a database with a random name and drops it at the end; each test gets
a fresh schema in it (the URL's search_path), or a whole database of its own. Without
a server the tests are skipped, except under CI (the `CI` variable set), where
a missing server is a failure: a green CI run must have tested PostgreSQL.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from ingestor.store import Store
from ingestor.store.postgres import PostgresStore
from ingestor.store.sqlite import SQLiteStore

ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BUSY_TIMEOUT = 10.0


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


@pytest.fixture
def postgres_url(postgres_database: str) -> Iterator[str]:
    """A new, empty schema of the session's database, named by the URL's search_path."""
    schema = f"s_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_database, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield make_conninfo(postgres_database, options=f"-c search_path={schema}")
    finally:
        with psycopg.connect(postgres_database, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


class Backend:
    """Opens (and reopens) one store of one kind; closes what it opened."""

    def __init__(
        self,
        kind: str,
        opener: Callable[[int], Store],
        bump: Callable[[], None],
        occupy: Callable[[], None],
    ) -> None:
        self.kind = kind
        self._opener = opener
        self._bump = bump
        self._occupy = occupy
        self._opened: list[Store] = []

    def open(self, partitions: int = 4) -> Store:
        store = self._opener(partitions)
        self._opened.append(store)
        return store

    def bump_schema_version(self) -> None:
        """Make the stored schema version one this code does not know."""
        self._bump()

    def occupy(self) -> None:
        """Put something that is not a store where the store would be created."""
        self._occupy()

    def close(self) -> None:
        for store in self._opened:
            store.close()


def _sqlite_backend(directory: Path) -> Backend:
    def bump() -> None:
        import sqlite3

        conn = sqlite3.connect(directory / "store.sqlite")
        try:
            conn.execute("PRAGMA user_version = 99")
        finally:
            conn.close()

    def occupy() -> None:
        directory.mkdir(parents=True)
        (directory / "notes.txt").write_text("not a store")

    return Backend(
        "sqlite",
        lambda partitions: SQLiteStore.open(
            directory, partitions=partitions, durability="os", busy_timeout=BUSY_TIMEOUT
        ),
        bump,
        occupy,
    )


def _postgres_backend(url: str) -> Backend:
    def bump() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")

    def occupy() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE pulses (note text)")

    return Backend(
        "postgres",
        lambda partitions: PostgresStore.open(
            url, partitions=partitions, pool_size=4, busy_timeout=BUSY_TIMEOUT
        ),
        bump,
        occupy,
    )


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        made = _sqlite_backend(tmp_path / "store")
    else:
        made = _postgres_backend(request.getfixturevalue("postgres_url"))
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.open()
