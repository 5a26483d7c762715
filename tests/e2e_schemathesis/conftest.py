"""A real server (`python -m ingestor serve`) with API keys, for the suites here.

The server runs with one admin key on loopback; `KEY` is that key. Every
server is killed at the end of its test and its output checked for tracebacks.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.support.server import ServerProcess

KEY = "e2e-admin-key"
CONFIG = f"""
[[api_keys]]
sha256 = "{hashlib.sha256(KEY.encode()).hexdigest()}"
role = "admin"
tenants = ["*"]
"""
QUIET = {"INGESTOR_COMMIT_INTERVAL": "3600", "INGESTOR_DURABILITY": "os"}

StartServer = Callable[..., Awaitable[ServerProcess]]


@pytest.fixture
async def start_server(tmp_path: Path) -> AsyncIterator[StartServer]:
    servers: list[ServerProcess] = []

    async def start(**env: str) -> ServerProcess:
        server = ServerProcess(
            tmp_path / f"data{len(servers)}", env={**QUIET, **env}, config=CONFIG
        )
        servers.append(server)
        await server.start()
        return server

    yield start
    for server in servers:
        await server.aclose()
    for server in servers:
        assert "Traceback" not in server.output, server.output[-4000:]
