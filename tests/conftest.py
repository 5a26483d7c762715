"""Fixtures shared by the in-process suites: a running service on a temp dir."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from ingestor.api import create_app
from ingestor.clock import epoch_us
from ingestor.config import Settings, load_settings
from ingestor.runtime import Runtime
from ingestor.service import open_service
from ingestor.sinks.memory import MemorySink
from ingestor.store import sqlite as sqlite_store


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
