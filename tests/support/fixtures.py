"""Fixtures shared by the suites that run real servers (tests/e2e, tests/faults).

`start_server(data_dir=None, *, kind=ServerProcess, config=None, **env)` starts
`python -m ingestor serve` (or what a ServerProcess subclass `kind` runs;
`config` is the text of a TOML settings file) on a fresh data dir, or a given
one, with a quiet periodic committer, so every commit is the test's own unless
a test sets INGESTOR_COMMIT_INTERVAL. Every server a test started is killed
when the test ends, and its output must hold no traceback: an unexpected error
answered as a 500 is a defect even when the test's own checks did not notice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.support.server import ServerProcess

__all__ = [
    "ABORTED_UPLOADS",
    "ABORTED_UPLOAD_WARNINGS",
    "QUIET_COMMITTER",
    "StartServer",
    "start_server",
]

StartServer = Callable[..., Awaitable[ServerProcess]]
QUIET_COMMITTER = {"INGESTOR_COMMIT_INTERVAL": "3600"}

# When a server is killed or closes a connection in the middle of an upload,
# httpx leaves its request-body async generator unfinished, and trio warns when
# it is garbage collected. That is the client library's leftover, not the server's.
ABORTED_UPLOAD_WARNINGS = [
    "ignore:Async generator 'httpx._content.ByteStream.__aiter__':ResourceWarning",
    "ignore:Exception ignored in. <async_generator object ByteStream.__aiter__"
    ":pytest.PytestUnraisableExceptionWarning",
]
ABORTED_UPLOADS = [pytest.mark.filterwarnings(rule) for rule in ABORTED_UPLOAD_WARNINGS]


@pytest.fixture
async def start_server(tmp_path: Path) -> AsyncIterator[StartServer]:
    servers: list[ServerProcess] = []

    async def start(
        data_dir: Path | None = None,
        *,
        kind: type[ServerProcess] = ServerProcess,
        config: str | None = None,
        **env: str,
    ) -> ServerProcess:
        server = kind(
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
