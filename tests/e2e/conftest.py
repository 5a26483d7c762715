"""Fixtures of the end-to-end suites; `start_server` is tests/support/fixtures.py's."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.support.fixtures import ABORTED_UPLOADS, QUIET_COMMITTER, StartServer, start_server
from tests.support.server import ServerProcess

__all__ = ["ABORTED_UPLOADS", "QUIET_COMMITTER", "StartServer", "client", "server", "start_server"]


@pytest.fixture
async def server(start_server: StartServer) -> ServerProcess:
    return await start_server()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30.0) as http:
        yield http
