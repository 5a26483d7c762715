"""Time as the ingestor keeps it: integer microseconds since the epoch, UTC.

Integers compare, store and add exactly; datetimes appear only at the edges
(decoding a timestamp, showing one). The wall clock is injected wherever it
is read, so tests move it by hand.

Instances on several machines share one PostgreSQL, and each decides by its
clock: whose delivery lease has run out, when the next attempt is due, which
ids a purge forgets, the billing day of a pulse without a timestamp. Clocks
that disagree by minutes (NTP broken on one machine) made a batch be sent
again while another instance was still sending it, undid each other's
backoff, and had a leader ahead of the others purge ids within their dedup
window, counting a retry twice. `SharedClock` is their one clock: the
database's, read at start and every `_MEASURE_EVERY` seconds, and carried
between readings by this machine's monotonic clock. Not by its wall clock:
one that stepped 40 days ahead between two readings had its instance's
purge forget ids stored seconds before (a retry counted twice), commit
today, and raise the store's purge horizon, which only moves forward, past
the present: every instance then refused pulses stamped now for days.
A step of the wall clock has the database read again at once: where the
database's clock stepped too (both corrected by one NTP), the instance
follows it within `_STEP_CHECK` seconds.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Final

import trio

from .errors import StoreError

__all__ = ["EPOCH", "SharedClock", "epoch_us", "moment", "wall_clock_us"]

log = logging.getLogger("ingestor.clock")

EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def wall_clock_us() -> int:
    return time.time_ns() // 1000


def epoch_us(at: dt.datetime) -> int:
    """Exact microseconds since the epoch of an aware datetime (no float)."""
    delta = at - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def moment(us: int) -> dt.datetime:
    """The UTC datetime of `us` microseconds since the epoch."""
    return EPOCH + dt.timedelta(microseconds=us)


class SharedClock:
    """The wall clock of every instance sharing a store (see the module docstring).

    `read_offset` measures, in a worker thread, how far the shared clock (the
    database's) is ahead of this machine's monotonic clock, in microseconds;
    `run` keeps it. While the database does not answer, the clock runs on
    from the last reading; until a first one, it is this machine's wall clock.
    """

    def __init__(self, read_offset: Callable[[], int]) -> None:
        self._read_offset = read_offset
        self._ahead_of_monotonic_us: int | None = None
        self._last_offset_us = 0  # from the wall clock, at the last reading
        self._wall_ahead_us = _wall_ahead_of_monotonic_us()  # ... and the wall's own

    @property
    def measured(self) -> bool:
        return self._ahead_of_monotonic_us is not None

    def __call__(self) -> int:
        ahead = self._ahead_of_monotonic_us
        if ahead is None:
            return time.time_ns() // 1000
        return time.monotonic_ns() // 1000 + ahead

    def offset_us(self) -> int:
        """How far this clock is ahead of this machine's wall clock now."""
        return self() - time.time_ns() // 1000

    def measure(self) -> None:
        first, previous = not self.measured, self._last_offset_us
        # Before reading: a database that does not answer is asked again in
        # `_MEASURE_EVERY` s, not at each look for a step.
        self._wall_ahead_us = _wall_ahead_of_monotonic_us()
        self._ahead_of_monotonic_us = self._read_offset()
        offset = self._last_offset_us = self.offset_us()
        if abs(offset) >= _NOTED_US and (first or abs(offset - previous) >= _NOTED_US):
            log.warning(
                "this machine's clock differs from the store's: the service keeps the store's",
                extra={"fields": {"offset_s": round(offset / 1e6, 3)}},
            )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Measure now, then every `_MEASURE_EVERY` s, and at once when this
        machine's wall clock steps (the database's may have stepped with it, as
        when both follow one NTP that was corrected); started once measured, or
        once a first measurement failed (the service then starts on this
        machine's clock, and the next one corrects it: tried again after 1 s,
        then 2, 4 ... up to 30, not only 30 s later)."""
        retry = _STEP_CHECK
        while True:
            try:
                await trio.to_thread.run_sync(self.measure)
            except StoreError as exc:
                log.warning(
                    "could not read the store's clock", extra={"fields": {"error": str(exc)}}
                )
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            wait = _MEASURE_EVERY
            if not self.measured:
                wait, retry = retry, min(2 * retry, _MEASURE_EVERY)
            for _ in range(int(wait / _STEP_CHECK)):
                await trio.sleep(_STEP_CHECK)
                if abs(_wall_ahead_of_monotonic_us() - self._wall_ahead_us) >= _NOTED_US:
                    break


def _wall_ahead_of_monotonic_us() -> int:
    return (time.time_ns() - time.monotonic_ns()) // 1000


_MEASURE_EVERY: Final = 30.0  # seconds between measurements of a SharedClock's offset
_STEP_CHECK: Final = 1.0  # seconds between looks for a step of this machine's wall clock
_NOTED_US: Final = 1_000_000  # an offset, or a change of it, that is logged
