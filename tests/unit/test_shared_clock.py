"""SharedClock: the clock every instance sharing a PostgreSQL keeps (ingestor/clock.py).

The offset itself is measured against a real PostgreSQL in
tests/e2e/test_clock_skew_adversarial.py; here, what the clock does with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import trio

from ingestor.clock import SharedClock
from ingestor.errors import StoreError

HOUR_US = 3_600_000_000
DAY_US = 24 * HOUR_US


def ahead(of_wall_us: int) -> int:
    """What a store reads for a database `of_wall_us` ahead of this machine's wall
    clock: how far the database is ahead of the monotonic clock."""
    return (time.time_ns() - time.monotonic_ns()) // 1000 + of_wall_us


def test_the_clock_is_this_machines_moved_by_the_measured_offset() -> None:
    clock = SharedClock(lambda: ahead(HOUR_US))
    assert abs(clock() - time.time_ns() // 1000) < 1_000_000  # not measured yet
    clock.measure()
    assert abs(clock.offset_us() - HOUR_US) < 1_000
    assert abs(clock() - (time.time_ns() // 1000 + HOUR_US)) < 1_000_000


def test_a_step_of_this_machines_wall_clock_between_readings_does_not_move_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Was: the clock was this machine's wall clock plus the offset last read; one
    that stepped 40 days ahead between two readings moved it 40 days, and its
    instance purged, committed and stamped by it (tests/e2e/test_weeks_adversarial.py)."""
    clock = SharedClock(lambda: ahead(0))
    clock.measure()
    before = clock()
    true_wall = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: true_wall() + 40 * DAY_US * 1000)
    assert abs(clock() - before) < 1_000_000
    assert abs(clock.offset_us() + 40 * DAY_US) < 1_000_000  # what /metrics shows


def test_an_offset_past_a_second_is_logged_once_until_it_moves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    offsets = [HOUR_US, HOUR_US + 500_000, -HOUR_US, 1_000]
    clock = SharedClock(lambda: ahead(offsets.pop(0)))
    for _ in range(4):
        clock.measure()
    ours = [r for r in caplog.records if r.name == "ingestor.clock"]
    logged = [r.__dict__["fields"]["offset_s"] for r in ours]
    assert logged == [3600.0, -3600.0]
    assert abs(clock.offset_us() - 1_000) < 1_000


async def test_a_store_that_does_not_answer_keeps_the_last_offset_and_the_service_starts() -> None:
    answers: list[int | None] = [HOUR_US, None, None]

    def read() -> int:
        answer = answers.pop(0)
        if answer is None:
            raise StoreError("read the clock: the database is down")
        return ahead(answer)

    clock = SharedClock(read)
    async with trio.open_nursery() as nursery:
        await nursery.start(clock.run)
        assert abs(clock.offset_us() - HOUR_US) < 1_000
        nursery.cancel_scope.cancel()
    down = SharedClock(read)
    async with trio.open_nursery() as nursery:
        await nursery.start(down.run)  # started though its first measurement failed
        assert (abs(down.offset_us()) < 1_000, down.measured) == (True, False)
        nursery.cancel_scope.cancel()
    with pytest.raises(StoreError):
        clock.measure()
    assert abs(clock.offset_us() - HOUR_US) < 1_000


def test_a_first_reading_that_failed_is_made_again_within_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Until a first reading succeeds the instance runs on this machine's wall
    clock, the one SharedClock is there not to trust (NTP broken, 40 days
    ahead: a leader purging by it forgets ids inside the dedup window). Was:
    after a failed first reading the next came 30 s later; now 1 s later,
    then 2, 4 ... (a store that never answers in time is not asked, nor
    logged about, every second), and once one succeeds every 30 s again."""
    answers: list[int | None] = [None, None, None, HOUR_US, HOUR_US]
    reads: list[float] = []

    def read() -> int:
        reads.append(trio.current_time())
        answer = answers.pop(0) if answers else HOUR_US
        if answer is None:
            raise StoreError("read the clock: each of 3 readings took longer than 1 s")
        return ahead(answer)

    async def at_once(call: Callable[[], None]) -> None:
        call()  # in this test's own (mock) time, not a thread's

    monkeypatch.setattr(trio.to_thread, "run_sync", at_once)

    async def main() -> None:
        clock = SharedClock(read)
        async with trio.open_nursery() as nursery:
            await nursery.start(clock.run)
            assert not clock.measured
            await trio.sleep(7.5)
            assert clock.measured
            assert abs(clock.offset_us() - HOUR_US) < 1_000
            await trio.sleep(40)
            nursery.cancel_scope.cancel()
        assert reads[:4] == [0, 1, 3, 7], reads
        assert reads[4:] == [37], reads  # then every 30 s

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
