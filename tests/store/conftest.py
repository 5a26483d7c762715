"""Fixtures for the store tests: a fresh store of each kind.

The PostgreSQL fixtures (`postgres_url`, `fresh_database`) are tests/conftest.py's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from ingestor.store import Store
from ingestor.store.postgres import PostgresStore
from ingestor.store.sqlite import SQLiteStore

BUSY_TIMEOUT = 10.0


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
