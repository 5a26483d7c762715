"""One committer among the instances sharing a store; another takes over when it goes."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import trio

from ingestor.committer import Committer
from ingestor.store.sqlite import SQLiteStore


def open_store(directory: Path) -> SQLiteStore:
    return SQLiteStore.open(directory, partitions=2, durability="os", busy_timeout=5)


def test_only_one_store_object_leads_and_leadership_passes_on_close(tmp_path: Path) -> None:
    first, second = open_store(tmp_path / "s"), open_store(tmp_path / "s")
    try:
        assert first.lead_committer()
        assert first.lead_committer()  # holding it is idempotent
        assert not second.lead_committer()
        first.close()
        assert second.lead_committer()
    finally:
        second.close()


def _hold_and_wait(directory: Path, held: multiprocessing.synchronize.Event) -> None:
    store = open_store(directory)
    assert store.lead_committer()
    held.set()
    threading_event = multiprocessing.Event()
    threading_event.wait()  # until killed


def test_leadership_is_released_when_the_leading_process_dies(tmp_path: Path) -> None:
    open_store(tmp_path / "s").close()
    context = multiprocessing.get_context("spawn")
    held = context.Event()
    leader = context.Process(target=_hold_and_wait, args=(tmp_path / "s", held))
    leader.start()
    try:
        assert held.wait(30)
        follower = open_store(tmp_path / "s")
        assert not follower.lead_committer()
        leader.kill()
        leader.join(10)
        assert follower.lead_committer()
        follower.close()
    finally:
        leader.kill()
        leader.join(10)


async def test_a_follower_committer_does_not_commit(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    leader_store, follower_store = open_store(tmp_path / "s"), open_store(tmp_path / "s")
    try:
        follower = Committer(
            [],
            follower_store,
            zones=set(),
            interval=60,
            grace=0,
            max_records=10,
            dedup_window=3600,
        )
        leader = Committer(
            [],
            leader_store,
            zones=set(),
            interval=60,
            grace=0,
            max_records=10,
            dedup_window=3600,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(leader.run)
            await leader.wait_ticks(1)
            nursery.start_soon(follower.run)
            await follower.wait_ticks(3)
            assert (leader.leading, follower.leading) == (True, False)
            nursery.cancel_scope.cancel()
        leader_store.close()
        # The follower takes over at its next try, seconds later, not a commit
        # interval. (Virtual time: the autojump clock also runs while a thread
        # works, so it is read, not bounded with fail_after.)
        async with trio.open_nursery() as nursery:
            started = trio.current_time()
            nursery.start_soon(follower.run)
            await follower.wait_ticks(follower.ticks + 1)
            assert follower.leading
            assert trio.current_time() - started < 60
            nursery.cancel_scope.cancel()
    finally:
        follower_store.close()
