"""Fixtures of the fault suite: real servers, a tiny disk, and the scenario report.

`start_server` is tests/support/fixtures.py's: real servers, killed when the
test ends, whose output must hold no traceback.

`tiny_disk` is a 6 MiB tmpfs mounted for the test (root only); where mounting
is impossible (or FAULTS_NO_MOUNT=1) it is None and the disk-full test uses a
store wrapper instead.

Each scenario calls `report(line)`; the lines are printed after the run, so
`pytest tests/faults -q` ends with every scenario's counts. They travel as
the test's `user_properties`, which pytest-xdist brings back from its
workers to the process that prints the summary (tests/conftest.py's hook:
that process loads no conftest below tests/).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import SCENARIO
from tests.support.fixtures import (
    ABORTED_UPLOAD_WARNINGS,
    QUIET_COMMITTER,
    StartServer,
    start_server,
)

__all__ = ["QUIET_COMMITTER", "StartServer", "report", "start_server", "tiny_disk"]

Report = Callable[[str], None]

TINY_DISK_BYTES = 6 * 1024 * 1024


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: fault injection against real server processes")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.faults)
            for rule in ABORTED_UPLOAD_WARNINGS:
                item.add_marker(pytest.mark.filterwarnings(rule))


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Report:
    properties = request.node.user_properties
    return lambda line: properties.append((SCENARIO, line))


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
