"""Fixtures of the fault suite: real servers, a tiny disk, and the scenario report.

`start_server(data_dir=None, kind=ServerProcess, config=None, **env)` starts
`python -m ingestor serve` (or what a ServerProcess subclass `kind` runs;
`config` is the text of a TOML settings file) with a
quiet periodic committer (every commit is the test's own unless a test sets
INGESTOR_COMMIT_INTERVAL). Every server is killed when its test ends, and its
output must hold no traceback: an unexpected error is a defect even when the
test's own checks did not notice it.

`tiny_disk` is a 6 MiB tmpfs mounted for the test (root only); where mounting
is impossible (or FAULTS_NO_MOUNT=1) it is None and the disk-full test uses a
store wrapper instead.

Each scenario calls `report(line)`; the lines are printed after the run, so
`pytest tests/faults -q` ends with every scenario's counts.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from tests.support.server import ServerProcess

StartServer = Callable[..., Awaitable[ServerProcess]]
Report = Callable[[str], None]

QUIET_COMMITTER = {"INGESTOR_COMMIT_INTERVAL": "3600"}
TINY_DISK_BYTES = 6 * 1024 * 1024
_REPORT: list[str] = []

# A client cut off mid-upload (the server was killed) leaves httpx's request-body
# generator unfinished; trio warns when it is collected. The client's leftover.
ABORTED_UPLOADS = [
    "ignore:Async generator 'httpx._content.ByteStream.__aiter__':ResourceWarning",
    "ignore:Exception ignored in. <async_generator object ByteStream.__aiter__"
    ":pytest.PytestUnraisableExceptionWarning",
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: fault injection against real server processes")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.faults)
            for rule in ABORTED_UPLOADS:
                item.add_marker(pytest.mark.filterwarnings(rule))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _REPORT:
        terminalreporter.section("fault scenarios")
        for line in _REPORT:
            terminalreporter.write_line(line)


@pytest.fixture
def report() -> Report:
    return _REPORT.append


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


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path | None]:
    """A directory on a 6 MiB tmpfs of its own, or None where it cannot be mounted."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or os.environ.get("FAULTS_NO_MOUNT"):
        yield None
        return
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TINY_DISK_BYTES},mode=0755", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        # The test killed its server; a lazy unmount still frees it if a straggler holds a file.
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)
