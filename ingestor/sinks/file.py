"""The file sink: each batch as `<dir>/<date>/<batch_id>.json`, written atomically.

The bytes are written to a temporary file, fsynced, and renamed into place,
then the directory is fsynced: a crash leaves either the whole file or none.
A batch whose file already exists was written before (its content never
changes), so it is not written twice; its directory is fsynced again, since
the writer may have died between its rename and that fsync. Unless the file
holds other bytes: a store restored from a backup, or rolled back, makes
its later batches again under the same ids, with the usage that came since.
Such a batch is refused for good (it stays `failed`, for an operator to
compare with the file), not taken for delivered and its usage billed nowhere. A process
killed mid-write leaves its temporary file (`.<batch_id>.json.<pid>.tmp`)
behind; the first write into a day's directory by a later process removes
those whose process is gone.

A new directory lasts a power loss only once its entry in its parent is on
disk too: the first write into a day's directory by each process makes it,
and the sink's own directory, with their entries fsynced, whoever created
them (a writer may have died before it synced what it made); so does the
next write after one found either gone.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import trio

from ..errors import SinkRejected, SinkRetryable

__all__ = ["FileSink"]


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (another worker may be writing its file)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileSink:
    name = "file"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._prepared: set[Path] = set()

    def path_of(self, batch_id: str, day: str) -> Path:
        return self.directory / day / f"{batch_id}.json"

    async def deliver(self, batch_id: str, day: str, body: bytes) -> None:
        try:
            await trio.to_thread.run_sync(self._write, batch_id, day, body)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                # A directory removed, or replaced by a file, since it was
                # made: made again at the next attempt.
                self._prepared.discard(self.path_of(batch_id, day).parent)
            reason = "disk full" if exc.errno == errno.ENOSPC else exc.strerror
            where = f" ({exc.filename})" if exc.filename else ""
            raise SinkRetryable(f"writing {batch_id}: {reason}{where}") from exc

    def _write(self, batch_id: str, day: str, body: bytes) -> None:
        final = self.path_of(batch_id, day)
        self._prepare(final.parent)
        try:
            held = final.read_bytes()
        except FileNotFoundError:
            pass
        else:
            if held != body:
                raise SinkRejected(
                    f"{final} holds another batch under the id {batch_id}: was the store"
                    " restored from a backup, or rolled back? Compare them before redelivering."
                )
            _fsync_path(final.parent)  # the delivered point, which its writer may not have reached
            return
        temporary = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        # Delivered point: once the directory entry is on disk, so is the batch.
        _fsync_path(final.parent)

    def _prepare(self, directory: Path) -> None:
        """Once per day's directory and process: make it and the sink's directory,
        each entry durable in its parent, and remove temporary files of dead
        writers."""
        if directory in self._prepared:
            return
        for made in (self.directory, directory):
            made.mkdir(parents=True, exist_ok=True)
            _fsync_path(made.parent)
        self._prepared.add(directory)
        for leftover in directory.glob(".*.tmp"):
            pid = leftover.name.rsplit(".", 2)[-2]
            if pid.isdigit() and not _alive(int(pid)):
                leftover.unlink(missing_ok=True)

    async def aclose(self) -> None:
        return None
