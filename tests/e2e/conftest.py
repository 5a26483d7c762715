"""Fixtures for suites that run real servers.

`start_server(**env)` starts `python -m ingestor serve` on a fresh data dir
(or a given one) with a long commit interval, so the periodic committer never
runs during a test and every commit is the test's own. Every server a test
started is killed when the test ends, and its output is checked for
tracebacks: an unexpected error answered as a 500 is a defect even when the
test's own assertions did not notice it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from tests.support.server import ServerProcess

StartServer = Callable[..., Awaitable[ServerProcess]]

# When a server is killed or closes a connection in the middle of an upload,
# httpx leaves its request-body async generator unfinished, and trio warns when
# it is garbage collected. That is the client library's leftover, not the server's.
ABORTED_UPLOADS = [
    pytest.mark.filterwarnings(
        "ignore:Async generator 'httpx._content.ByteStream.__aiter__':ResourceWarning"
    ),
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <async_generator object ByteStream.__aiter__"
        ":pytest.PytestUnraisableExceptionWarning"
    ),
]

QUIET_COMMITTER = {"INGESTOR_COMMIT_INTERVAL": "3600"}


@pytest.fixture
async def start_server(tmp_path: Path) -> AsyncIterator[StartServer]:
    servers: list[ServerProcess] = []

    async def start(
        data_dir: Path | None = None, *, config: str | None = None, **env: str
    ) -> ServerProcess:
        server = ServerProcess(
            data_dir or tmp_path / f"data{len(servers)}",
            env={**QUIET_COMMITTER, **env},
            config=config,
        )
        servers.append(server)
        await server.start()
        return server

    yield start
    for server in servers:
        await server.aclose()
    for server in servers:
        assert "Traceback" not in server.output, (
            f"the server on {server.data_dir} logged a traceback:\n{server.output[-4000:]}"
        )


@pytest.fixture
async def server(start_server: StartServer) -> ServerProcess:
    return await start_server()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30.0) as http:
        yield http
