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
window, counting a retry twice. `SharedClock` is their one clock: this
machine's, moved by how far it is from the database's, measured at start
and every `_MEASURE_EVERY` seconds.
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
    database's) is ahead of this machine's, in microseconds; `run` keeps that
    offset. While the database does not answer, it is the last one measured.
    """

    def __init__(self, read_offset: Callable[[], int]) -> None:
        self._read_offset = read_offset
        self.offset_us = 0
        self.measured = False

    def __call__(self) -> int:
        return time.time_ns() // 1000 + self.offset_us

    def measure(self) -> None:
        offset = self._read_offset()
        if abs(offset) >= _NOTED_US and (
            not self.measured or abs(offset - self.offset_us) >= _NOTED_US
        ):
            log.warning(
                "this machine's clock differs from the store's: the service keeps the store's",
                extra={"fields": {"offset_s": round(offset / 1e6, 3)}},
            )
        self.offset_us = offset
        self.measured = True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Measure now, then every `_MEASURE_EVERY` s; started once measured, or once
        a first measurement failed (the service then starts on this machine's
        clock, and the next one corrects it)."""
        while True:
            try:
                await trio.to_thread.run_sync(self.measure)
            except StoreError as exc:
                log.warning(
                    "could not read the store's clock", extra={"fields": {"error": str(exc)}}
                )
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            await trio.sleep(_MEASURE_EVERY)


_MEASURE_EVERY: Final = 30.0  # seconds between measurements of a SharedClock's offset
_NOTED_US: Final = 1_000_000  # an offset, or a change of it, that is logged
