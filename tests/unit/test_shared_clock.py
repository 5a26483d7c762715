"""SharedClock: the clock every instance sharing a PostgreSQL keeps (ingestor/clock.py)."""

from __future__ import annotations

import time

import pytest
import trio

from ingestor.clock import SharedClock
from ingestor.errors import StoreError

HOUR_US = 3_600_000_000


def test_the_clock_is_this_machines_moved_by_the_measured_offset() -> None:
    clock = SharedClock(lambda: time.time_ns() // 1000 + HOUR_US)
    assert abs(clock() - time.time_ns() // 1000) < 1_000_000  # not measured yet
    clock.measure()
    assert abs(clock.offset_us - HOUR_US) < 100_000
    assert abs(clock() - (time.time_ns() // 1000 + HOUR_US)) < 100_000


def test_an_offset_past_a_second_is_logged_once_until_it_moves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    shift = [HOUR_US]
    clock = SharedClock(lambda: time.time_ns() // 1000 + shift[0])
    clock.measure()
    clock.measure()
    shift[0] = -HOUR_US
    clock.measure()
    warnings = [r for r in caplog.records if "differs from the store's" in r.getMessage()]
    assert len(warnings) == 2


async def test_a_store_that_does_not_answer_keeps_the_last_offset_and_the_service_starts() -> None:
    answers: list[int | None] = [time.time_ns() // 1000 + HOUR_US, None]

    def read() -> int:
        answer = answers.pop(0) if answers else None
        if answer is None:
            raise StoreError("read the clock: the database is down")
        return answer

    clock = SharedClock(read)
    async with trio.open_nursery() as nursery:
        await nursery.start(clock.run)
        assert abs(clock.offset_us - HOUR_US) < 100_000
        nursery.cancel_scope.cancel()
    down = SharedClock(read)
    async with trio.open_nursery() as nursery:
        await nursery.start(down.run)  # started though the first measurement failed
        assert down.offset_us == 0
        nursery.cancel_scope.cancel()
    with pytest.raises(StoreError):
        clock.measure()
    assert abs(clock.offset_us - HOUR_US) < 100_000
