"""The file sink: atomic files, never written twice, failures are retryable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ingestor.errors import SinkRejected, SinkRetryable
from ingestor.sinks.file import FileSink


async def test_writes_the_body_under_its_date(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "deliveries")
    await sink.deliver("s-20261128-p001-00001", "2026-11-28", b'{"a":1}')
    path = tmp_path / "deliveries" / "2026-11-28" / "s-20261128-p001-00001.json"
    assert path.read_bytes() == b'{"a":1}'
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


async def test_an_existing_batch_is_not_written_again(tmp_path: Path) -> None:
    sink = FileSink(tmp_path)
    await sink.deliver("b1", "2026-11-28", b"first")
    path = sink.path_of("b1", "2026-11-28")
    before = os.stat(path)
    await sink.deliver("b1", "2026-11-28", b"first")
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


async def test_another_batch_under_an_existing_id_is_refused_and_the_file_kept(
    tmp_path: Path,
) -> None:
    """A store restored from a backup makes its later batches again under the
    same ids: one with other usage is not a repeat of the file's."""
    sink = FileSink(tmp_path)
    await sink.deliver("b1", "2026-11-28", b"first")
    with pytest.raises(SinkRejected, match="restored"):
        await sink.deliver("b1", "2026-11-28", b"other usage")
    assert sink.path_of("b1", "2026-11-28").read_bytes() == b"first"


async def test_a_stale_temporary_does_not_count_as_delivered(tmp_path: Path) -> None:
    sink = FileSink(tmp_path)
    day = tmp_path / "2026-11-28"
    day.mkdir()
    (day / ".b2.json.999.tmp").write_bytes(b"half")
    await sink.deliver("b2", "2026-11-28", b"whole")
    assert sink.path_of("b2", "2026-11-28").read_bytes() == b"whole"


async def test_os_errors_are_retryable(tmp_path: Path) -> None:
    blocker = tmp_path / "deliveries"
    blocker.write_bytes(b"a file where a directory should be")
    sink = FileSink(blocker)
    with pytest.raises(SinkRetryable, match="b3"):
        await sink.deliver("b3", "2026-11-28", b"{}")


@pytest.mark.parametrize("made_before", [False, True], ids=["new", "made-by-a-dead-writer"])
async def test_new_directories_are_durable_in_their_parents_before_a_delivery_returns(
    tmp_path: Path, fsynced: list[Path], made_before: bool
) -> None:
    """A file fsynced into a directory that is itself only in the page cache of
    its parent is lost with it on a power loss, although the outbox calls the
    batch delivered. The day's directory and the sink's own must have their
    entries synced: made by this delivery, or found made by a writer that may
    have died before syncing them.

    Was: only the day's directory was fsynced (its entry of the file), never
    the sink's directory (its entry of the day) nor the data dir (its entry
    of the sink's directory).
    """
    sink = FileSink(tmp_path / "deliveries")
    final = sink.path_of("b4", "2026-11-28")
    if made_before:
        final.parent.mkdir(parents=True)
    await sink.deliver("b4", "2026-11-28", b"{}")
    assert {tmp_path, tmp_path / "deliveries", final.parent} <= set(fsynced), fsynced
    assert fsynced[-1] == final.parent  # the file's own entry, last: the delivered point
