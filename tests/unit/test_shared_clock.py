"""SharedClock: the clock every instance sharing a PostgreSQL keeps (ingestor/clock.py).

The offset itself is measured against a real PostgreSQL in
tests/e2e/test_clock_skew_adversarial.py; here, what the clock does with it.
"""

from __future__ import annotations

import time

import pytest
import trio

from ingestor.clock import SharedClock
from ingestor.errors import StoreError

HOUR_US = 3_600_000_000


def test_the_clock_is_this_machines_moved_by_the_measured_offset() -> None:
    clock = SharedClock(lambda: HOUR_US)
    assert abs(clock() - time.time_ns() // 1000) < 1_000_000  # not measured yet
    clock.measure()
    assert clock.offset_us == HOUR_US
    assert abs(clock() - (time.time_ns() // 1000 + HOUR_US)) < 1_000_000


def test_an_offset_past_a_second_is_logged_once_until_it_moves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    offsets = [HOUR_US, HOUR_US + 500_000, -HOUR_US, 1_000]
    clock = SharedClock(lambda: offsets.pop(0))
    for _ in range(4):
        clock.measure()
    ours = [r for r in caplog.records if r.name == "ingestor.clock"]
    logged = [r.__dict__["fields"]["offset_s"] for r in ours]
    assert logged == [3600.0, -3600.0]
    assert clock.offset_us == 1_000


async def test_a_store_that_does_not_answer_keeps_the_last_offset_and_the_service_starts() -> None:
    answers: list[int | None] = [HOUR_US, None, None]

    def read() -> int:
        answer = answers.pop(0)
        if answer is None:
            raise StoreError("read the clock: the database is down")
        return answer

    clock = SharedClock(read)
    async with trio.open_nursery() as nursery:
        await nursery.start(clock.run)
        assert clock.offset_us == HOUR_US
        nursery.cancel_scope.cancel()
    down = SharedClock(read)
    async with trio.open_nursery() as nursery:
        await nursery.start(down.run)  # started though its first measurement failed
        assert (down.offset_us, down.measured) == (0, False)
        nursery.cancel_scope.cancel()
    with pytest.raises(StoreError):
        clock.measure()
    assert clock.offset_us == HOUR_US
