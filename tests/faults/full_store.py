"""`python -m tests.faults.full_store serve ...`: the ingestor on a disk that fills on demand.

The fallback of the disk-full scenario where no tiny filesystem can be
mounted (not root, no tmpfs). While the file named by FAULTS_DISK_FULL_FLAG
exists, every store write fails as SQLite reports a full disk (the
StoreFull the SQLite store translates SQLITE_FULL into) and the file sink's
writes fail with ENOSPC; remove the file and the space is back.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ingestor.__main__ import main
from ingestor.errors import StoreFull
from ingestor.sinks.file import FileSink
from ingestor.store.sqlite import SQLiteStore

FLAG = Path(os.environ.get("FAULTS_DISK_FULL_FLAG", "/nonexistent/disk-full"))


def _store_write(method: Callable[..., Any], what: str) -> Callable[..., Any]:
    def write(*args: Any, **kwargs: Any) -> Any:
        if FLAG.exists():
            raise StoreFull(f"{what}: the disk under the store is full")
        return method(*args, **kwargs)

    return write


def _file_write(method: Callable[..., None]) -> Callable[..., None]:
    def write(*args: Any) -> None:
        if FLAG.exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        method(*args)

    return write


SQLiteStore.write_pulses = _store_write(SQLiteStore.write_pulses, "write pulses")  # type: ignore[method-assign]
SQLiteStore.commit_day = _store_write(SQLiteStore.commit_day, "commit")  # type: ignore[method-assign]
SQLiteStore.record_delivery = _store_write(SQLiteStore.record_delivery, "record delivery")  # type: ignore[method-assign]
FileSink._write = _file_write(FileSink._write)  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
