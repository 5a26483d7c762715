"""One committer among the instances sharing a store; another takes over when it goes."""

from __future__ import annotations

import itertools
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


class RecordedLeads:
    """A store whose `lead_committer` answers are recorded, and can be refused."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.asked: list[tuple[float, float]] = []  # (when, lapse)
        self.refuse_after: float | None = None

    def lead_committer(self, lapse: float) -> bool:
        now = trio.from_thread.run_sync(trio.current_time)
        self.asked.append((now, lapse))
        if self.refuse_after is not None and now > self.refuse_after:
            return False
        return self.store.lead_committer(lapse)

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)


async def test_the_leader_tells_the_store_every_few_seconds_between_its_ticks(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """With a commit interval of a minute, the leader still calls the store
    every 5 s, with a lapse of 20 s: a leader that stops loses the lead in
    20 s, not in three intervals. And a call that finds the lead lost ends
    the wait: the next tick tries again at once, not a minute later."""
    store = open_store(tmp_path / "s")
    recorded = RecordedLeads(store)
    committer = Committer(
        [],
        recorded,  # type: ignore[arg-type]
        zones=set(),
        interval=60,
        grace=0,
        max_records=10,
        dedup_window=3600,
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(committer.run)
            await committer.wait_ticks(3)
            assert committer.leading
            times = [when for when, _ in recorded.asked]
            assert {lapse for _, lapse in recorded.asked} == {20.0}
            gaps = {round(b - a, 3) for a, b in itertools.pairwise(times)}
            assert gaps == {5.0}, times
            assert len(times) >= 2 * 12  # two intervals of twelve calls
            recorded.refuse_after = trio.current_time()
            ticks = committer.ticks
            await committer.wait_ticks(ticks + 1)
            assert not committer.leading
            refused = [when for when, _ in recorded.asked if when > recorded.refuse_after]
            # The first refusal ends the leader's wait; its tick asks once more.
            assert refused[1] - refused[0] < 1, refused
            assert refused[0] - recorded.refuse_after <= 5
            nursery.cancel_scope.cancel()
    finally:
        store.close()
