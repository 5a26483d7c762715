"""Time as the ingestor keeps it: integer microseconds since the epoch, UTC.

Integers compare, store and add exactly; datetimes appear only at the edges
(decoding a timestamp, showing one). The wall clock is injected wherever it
is read, so tests move it by hand.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Final

__all__ = ["EPOCH", "epoch_us", "moment", "wall_clock_us"]

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
