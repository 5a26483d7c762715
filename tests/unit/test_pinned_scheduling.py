"""Rules of the deliverer's and the committer's scheduling, pinned case by case.

Each test states one decision the outbox or the ledger depends on (how long a
claim holds a batch, which next attempts a stepped-back clock explains, how
many deliveries are in flight, which outcomes an attempt whose lease ended may
still record, which days are due, when a purge horizon may be relied on) at
its edge, where getting it slightly wrong would still pass every other test.
Stores are SQLite in a temporary directory; clocks are fakes; sinks are
in-memory.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from ingestor.clock import epoch_us
from ingestor.committer import Committer
from ingestor.errors import (
    Draining,
    SinkRejected,
    SinkRetryable,
    StoreBusy,
    StoreError,
    StoreFull,
)
from ingestor.ledger import BATCH_MIN_BYTES
from ingestor.model import BatchSummary
from ingestor.partition import partition_of
from ingestor.shard import Shard
from ingestor.sinks.memory import MemorySink
from ingestor.store import DueBatch
from ingestor.store.sqlite import SQLiteStore
from tests.conftest import FakeClock
from tests.test_committer_adversarial import (
    TrioWallClock,
    day_of_batch,
    make,
    open_days,
    parts,
    write,
)
from tests.test_delivery_adversarial import (
    deliverer_of,
    lazy_clock,
    make_batches,
    state,
    store,
    wall,
)

__all__ = ["lazy_clock", "store", "wall"]  # fixtures taken from tests/test_delivery_adversarial.py

S = 1_000_000  # microseconds a second
START = dt.datetime(2026, 11, 28, 12, tzinfo=dt.UTC)  # when `make_batches` makes its batches due


# --- the deliverer ------------------------------------------------------------


class Holding:
    """A sink that takes each batch and answers once the test releases it,
    with `error` if one is set; `arrived` is set at the first batch."""

    def __init__(self, error: Exception | None = None) -> None:
        self.taken: list[str] = []
        self.arrived = trio.Event()
        self.release = trio.Event()
        self.error = error

    async def deliver(self, batch_id: str, day: str, body: bytes) -> None:
        self.taken.append(batch_id)
        self.arrived.set()
        await self.release.wait()
        if self.error is not None:
            raise self.error

    async def aclose(self) -> None:
        return None


class Wrapped:
    """The SQLite store, with some of its methods replaced by a test."""

    def __init__(self, inner: SQLiteStore, **replaced: Any) -> None:
        self._inner = inner
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def next_attempt_us(store: SQLiteStore, batch_id: str) -> int:
    view = store.batch(batch_id)
    assert view is not None
    assert view.next_attempt_at is not None
    return epoch_us(view.next_attempt_at)


def claim_elsewhere(store: SQLiteStore, batch_id: str, now_us: int, until_us: int) -> bytes | None:
    """Another process's claim of `batch_id`, at `now_us`, until `until_us`."""
    return store.claim_batch(
        int(batch_id.split("-")[2].removeprefix("p")),  # the partition its id names
        batch_id,
        now_us=now_us,
        latest_us=now_us + 10**12,
        lease_us=until_us,
    )


async def test_a_claim_holds_the_batch_for_the_lease_and_the_clock_skew(
    store: SQLiteStore, wall: FakeClock
) -> None:
    """While the sink has a batch, no process may find it due: its next attempt
    is the lease (the attempt's bound) plus `clock_skew`, as a process whose
    clock is ahead by the skew reads it. A shorter claim lets that process send
    the batch again while this one's delivery is still on its way."""
    [batch_id] = make_batches(store, 1)
    sink = Holding()
    deliverer = deliverer_of(store, sink, wall, lease=25.0, clock_skew=5.0)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(deliverer.deliver_due)
        await sink.arrived.wait()
        assert next_attempt_us(store, batch_id) == wall() + 30 * S
        assert store.due_batches(wall() + 30 * S - 1, 10, wall() + 10**12) == []
        sink.release.set()
    assert state(store, batch_id) == ("delivered", 1, None)


@pytest.mark.parametrize(
    "bounds",
    [
        # (retry_max, lease, clock_skew, the furthest next attempt any process sets)
        (60.0, 25.0, 0.0, 60.0),  # the longest backoff, longer than the lease
        (60.0, 25.0, 5.0, 65.0),  # ... set on a clock ahead by the skew
        (10.0, 25.0, 5.0, 35.0),  # a claim (lease and skew) on a clock ahead by the skew
    ],
)
async def test_a_next_attempt_no_process_could_set_that_far_ahead_is_the_only_one_taken_early(
    store: SQLiteStore, wall: FakeClock, bounds: tuple[float, float, float, float]
) -> None:
    """A next attempt further ahead than any backoff or claim can set (the longer
    of `retry_max` and the lease with the skew, plus the skew) was set before the
    clock stepped back, and the batch is sent at once. One that a backoff or
    another process's claim could have set is not: sending it early breaks the
    backoff a downstream asked for, or sends a batch that is on its way."""
    retry_max, lease, skew, furthest = bounds
    within, beyond = make_batches(store, 2)
    assert claim_elsewhere(store, within, wall(), wall() + int(furthest * S))
    assert claim_elsewhere(store, beyond, wall(), wall() + int(furthest * S) + 1)
    sink = MemorySink()
    deliverer = deliverer_of(store, sink, wall, retry_max=retry_max, lease=lease, clock_skew=skew)
    assert await deliverer.deliver_due() == 1
    assert sink.attempts == [beyond]
    assert state(store, within) == ("pending", 0, None)


class Peak:
    """A sink that holds each batch for 5 s of (virtual) time, counting how many
    it held at once."""

    def __init__(self) -> None:
        self.held = 0
        self.peak = 0
        self.taken: list[str] = []

    async def deliver(self, batch_id: str, day: str, body: bytes) -> None:
        self.taken.append(batch_id)
        self.held += 1
        self.peak = max(self.peak, self.held)
        await trio.sleep(5)
        self.held -= 1

    async def aclose(self) -> None:
        return None


async def test_no_more_deliveries_are_in_flight_than_the_concurrency(
    store: SQLiteStore, wall: FakeClock, lazy_clock: trio.testing.MockClock
) -> None:
    """`delivery_concurrency` bounds the sink's connections and the threads the
    deliveries hold: a downstream sized for it is not sent a pass's whole
    outbox (100 batches a partition) at once."""
    ids = make_batches(store, 6)
    sink = Peak()
    deliverer = deliverer_of(store, sink, wall, concurrency=2)  # type: ignore[arg-type]
    assert await deliverer.deliver_due() == 6
    assert sorted(sink.taken) == sorted(ids)
    assert sink.peak <= 2
    assert [state(store, b)[0] for b in ids] == ["delivered"] * 6


async def test_the_counters_say_how_each_attempt_ended(store: SQLiteStore, wall: FakeClock) -> None:
    """The deliveries metric (delivered, retried, failed) is how an operator sees
    a downstream refusing batches: each attempt is counted once, by its end."""
    make_batches(store, 3)
    sink = MemorySink()
    sink.fail_with(SinkRejected("HTTP 422"))
    sink.fail_with(SinkRetryable("HTTP 503"))
    deliverer = deliverer_of(store, sink, wall)
    assert await deliverer.deliver_due() == 3
    assert (deliverer.delivered, deliverer.retried, deliverer.failed) == (1, 1, 1)


async def test_an_outcome_recorded_again_is_kept_though_the_service_stops_in_the_pause(
    store: SQLiteStore, wall: FakeClock, autojump_clock: trio.testing.MockClock
) -> None:
    """The sink took the batch, the store failed the first record, and the stop
    came: the pause before recording again is shielded like the record itself.
    Cancelled there, the batch stayed pending, claimed, and was sent again when
    its lease ended."""
    [batch_id] = make_batches(store, 1)
    tries: list[str] = []

    def record_delivery(*args: Any, **kwargs: Any) -> None:
        tries.append(kwargs["status"])
        if len(tries) == 1:
            raise StoreBusy("record delivery: the store is locked")
        store.record_delivery(*args, **kwargs)

    class TakenAsTheStopComes:
        async def deliver(self, batch_id: str, day: str, body: bytes) -> None:
            stop.cancel()

        async def aclose(self) -> None:
            return None

    failing = Wrapped(store, record_delivery=record_delivery)
    with trio.CancelScope() as stop:
        await deliverer_of(failing, TakenAsTheStopComes(), wall).deliver_due()  # type: ignore[arg-type]
    assert tries == ["delivered", "delivered"]
    assert state(store, batch_id) == ("delivered", 1, None)


def failing_records(store: SQLiteStore, clock: trio.testing.MockClock, failures: int) -> Wrapped:
    """`store`, its first `failures` records of a delivery failing (a full disk),
    the (virtual) time of each try noted in `.tries`."""
    tries: list[float] = []

    def record_delivery(*args: Any, **kwargs: Any) -> None:
        tries.append(clock.current_time())
        if len(tries) <= failures:
            raise StoreFull("record delivery: the disk under the database is full")
        store.record_delivery(*args, **kwargs)

    return Wrapped(store, record_delivery=record_delivery, tries=tries)


async def test_an_outcome_is_recorded_again_while_the_lease_lasts_and_no_longer(
    store: SQLiteStore, lazy_clock: trio.testing.MockClock
) -> None:
    """The sink took the batch and the store refuses every record (its disk is
    full): tried again after 0.1, 0.5, 1, 2 and 4 s, then every 5 s, while
    the claim's lease (25 s) lasts; a try the lease would end first is not
    made: past it another process may hold the batch, and sends it again.
    Tried for 0.6 s only, a failover or a full disk that lasted a second had
    the receiver sent the batch twice."""
    [batch_id] = make_batches(store, 1)
    failing = failing_records(store, lazy_clock, failures=10**6)
    deliverer = deliverer_of(failing, MemorySink(), VirtualWall(lazy_clock), lease=25.0)  # type: ignore[arg-type]
    assert await deliverer.deliver_due() == 1
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(failing.tries)]
    assert gaps == [0.1, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert failing.tries[-1] + 5 >= 25 > failing.tries[-1]
    assert deliverer.unrecorded == 1
    assert state(store, batch_id) == ("pending", 0, None)


async def test_a_store_back_within_the_lease_takes_the_outcome_once(
    store: SQLiteStore, lazy_clock: trio.testing.MockClock
) -> None:
    """The same store, back after 6 failed records (8 s): the delivery is
    recorded then, once, and the batch is never sent again."""
    [batch_id] = make_batches(store, 1)
    failing = failing_records(store, lazy_clock, failures=6)
    sink = MemorySink()
    deliverer = deliverer_of(failing, sink, VirtualWall(lazy_clock), lease=25.0)  # type: ignore[arg-type]
    assert await deliverer.deliver_due() == 1
    assert len(failing.tries) == 7
    assert (deliverer.unrecorded, state(store, batch_id)) == (0, ("delivered", 1, None))
    await trio.sleep(60)  # past the lease: nothing due
    assert await deliverer.deliver_due() == 0
    assert sink.attempts == [batch_id]


async def test_a_stop_waits_for_the_first_tries_to_record_and_not_for_the_later(
    store: SQLiteStore, lazy_clock: trio.testing.MockClock
) -> None:
    """The stop comes at 1.2 s, in the third pause (1 s, after tries at 0, 0.1
    and 0.6 s) of a store that refuses records: the service stops then, the
    batch left pending (sent again once its lease ends, harmlessly, and said
    in the log), not held up for the rest of the lease."""
    [batch_id] = make_batches(store, 1)
    failing = failing_records(store, lazy_clock, failures=10**6)
    deliverer = deliverer_of(failing, MemorySink(), VirtualWall(lazy_clock), lease=25.0)  # type: ignore[arg-type]
    with trio.move_on_after(1.2):
        await deliverer.deliver_due()
    assert trio.current_time() == pytest.approx(1.2, abs=0.05)
    assert [round(t, 2) for t in failing.tries] == [0.0, 0.1, 0.6]
    assert deliverer.unrecorded == 1
    assert state(store, batch_id) == ("pending", 0, None)


@pytest.mark.parametrize("ending", ["cancelled", "retryable"])
async def test_an_attempt_whose_lease_ended_leaves_the_next_claim_alone(
    store: SQLiteStore, wall: FakeClock, ending: str
) -> None:
    """A sink slower than the lease: another process found the batch due and
    claimed it. This attempt's end, given back at a stop or a retry, must not
    move that claim: the batch would be due again while the other process is
    sending it, and be sent a third time."""
    [batch_id] = make_batches(store, 1)
    sink = Holding(SinkRetryable("HTTP 503"))
    deliverer = deliverer_of(store, sink, wall, lease=25.0)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(deliverer.deliver_due)
        await sink.arrived.wait()
        wall.advance(30)
        theirs = wall() + 25 * S
        assert claim_elsewhere(store, batch_id, wall(), theirs)
        if ending == "cancelled":
            nursery.cancel_scope.cancel()
        else:
            sink.release.set()
    assert state(store, batch_id) == ("pending", 0, None)
    assert next_attempt_us(store, batch_id) == theirs
    assert store.due_batches(wall(), 10, wall() + 10**12) == []


async def test_a_store_error_giving_a_batch_back_does_not_turn_the_stop_into_a_crash(
    store: SQLiteStore, wall: FakeClock
) -> None:
    """Giving a batch back is a courtesy (the lease would end anyway): the store
    failing it must not raise out of the service's stop in place of the
    cancellation, and the batch stays claimed until its lease ends."""
    [batch_id] = make_batches(store, 1)

    def record_delivery(*args: Any, **kwargs: Any) -> None:
        raise StoreError("record delivery: the disk is gone")

    sink = Holding()
    deliverer = deliverer_of(Wrapped(store, record_delivery=record_delivery), sink, wall)  # type: ignore[arg-type]
    with trio.CancelScope() as stop:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(deliverer.deliver_due)
            await sink.arrived.wait()
            stop.cancel()
    assert stop.cancelled_caught
    assert state(store, batch_id) == ("pending", 0, None)
    assert store.due_batches(wall(), 10, wall() + 10**12) == []


async def test_a_batch_claimed_elsewhere_after_the_outbox_was_read_is_not_sent(
    store: SQLiteStore, wall: FakeClock
) -> None:
    """Two processes read the same due list; the other claims a batch first.
    This one's claim, made for batches due now (or stepped back), fails and the
    batch is not sent twice."""
    [batch_id] = make_batches(store, 1)

    def due_batches(now_us: int, limit: int, latest_us: int | None = None) -> list[DueBatch]:
        due = store.due_batches(now_us, limit, latest_us)
        assert claim_elsewhere(store, batch_id, now_us, now_us + 25 * S)
        return due

    sink = MemorySink()
    deliverer = deliverer_of(Wrapped(store, due_batches=due_batches), sink, wall)
    assert await deliverer.deliver_due() == 1
    assert sink.attempts == []
    assert state(store, batch_id) == ("pending", 0, None)


async def test_a_claim_the_store_could_not_make_is_counted_and_a_defect_is_raised(
    store: SQLiteStore, wall: FakeClock
) -> None:
    """A store error claiming a batch, or the process out of memory: not sent,
    counted as an outcome not recorded (so `run` waits before the next pass
    instead of spinning on a store that fails), and still due. Anything else
    is a defect, raised for the supervisor, not logged and skipped for ever."""
    [batch_id] = make_batches(store, 1)
    raised: list[Exception] = [StoreBusy("claim batch: locked"), MemoryError(), ValueError("a bug")]

    def claim_batch(*args: Any, **kwargs: Any) -> bytes | None:
        raise raised.pop(0)

    sink = MemorySink()
    deliverer = deliverer_of(Wrapped(store, claim_batch=claim_batch), sink, wall)
    assert await deliverer.deliver_due() == 1
    assert await deliverer.deliver_due() == 1
    assert deliverer.unrecorded == 2
    assert sink.attempts == []
    assert [d.batch_id for d in store.due_batches(wall(), 10)] == [batch_id]
    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="a bug")):
        await deliverer.deliver_due()


async def test_claims_reads_and_give_backs_never_wait_for_threads_that_reads_hold(
    store: SQLiteStore, wall: FakeClock
) -> None:
    """Every thread trio lends by default taken (slow reads of the store, each
    waiting in a thread): the deliverer still reads its outbox, claims, records
    and gives back in threads of its own. A claim that waited for one had its
    lease running from before the wait, and ended before the sink answered."""
    first, second = make_batches(store, 2)
    # Not given back, a claim stays held: the second batch waits its turn.
    assert claim_elsewhere(store, second, wall(), wall() + 50 * S)
    released = threading.Event()
    limiter = trio.to_thread.current_default_thread_limiter()

    async def hold_a_thread() -> None:
        await trio.to_thread.run_sync(released.wait)

    async with trio.open_nursery() as nursery:
        for _ in range(int(limiter.total_tokens)):
            nursery.start_soon(hold_a_thread)

        async def release_later() -> None:
            await trio.sleep(5)
            released.set()

        nursery.start_soon(release_later)
        await trio.testing.wait_all_tasks_blocked()
        assert limiter.available_tokens == 0
        started = trio.current_time()
        sink = MemorySink()
        assert await deliverer_of(store, sink, wall).deliver_due() == 1
        assert list(sink.delivered) == [first]
        wall.advance(51)
        held = Holding()
        async with trio.open_nursery() as delivering:
            delivering.start_soon(deliverer_of(store, held, wall).deliver_due)  # type: ignore[arg-type]
            await held.arrived.wait()
            delivering.cancel_scope.cancel()
        assert trio.current_time() - started < 4
        released.set()
        nursery.cancel_scope.cancel()
    assert state(store, first) == ("delivered", 1, None)
    assert state(store, second) == ("pending", 1, "the service stopped before the sink answered")


async def test_a_defect_recording_an_outcome_is_raised_not_logged(
    store: SQLiteStore, wall: FakeClock
) -> None:
    """Only a store error (or the process out of memory) is retried and then
    left to the lease: a defect recording outcomes would otherwise send every
    batch again and again, each failure a warning, for ever."""
    make_batches(store, 1)

    def record_delivery(*args: Any, **kwargs: Any) -> None:
        raise TypeError("a bug")

    deliverer = deliverer_of(Wrapped(store, record_delivery=record_delivery), MemorySink(), wall)
    with pytest.RaisesGroup(pytest.RaisesExc(TypeError, match="a bug")):
        await deliverer.deliver_due()
    assert deliverer.unrecorded == 0


class VirtualWall:
    """A wall clock moving with trio's mock clock, readable from any thread (the
    deliverer reads its clock in the store's threads)."""

    def __init__(self, clock: trio.testing.MockClock) -> None:
        self.clock = clock

    def __call__(self) -> int:
        return epoch_us(START) + int(self.clock.current_time() * S)


class Timed(MemorySink):
    """The in-memory sink, noting the (virtual) time of each attempt; `done` is
    set once `expected` batches are delivered."""

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.times: list[float] = []
        self.expected = expected
        self.done = trio.Event()

    async def deliver(self, batch_id: str, day: str, body: bytes) -> None:
        self.times.append(trio.current_time())
        await super().deliver(batch_id, day, body)
        if len(self.delivered) >= self.expected:
            self.done.set()


async def test_a_retry_sooner_than_the_idle_poll_is_attempted_when_due(
    store: SQLiteStore, lazy_clock: trio.testing.MockClock
) -> None:
    """`retry_initial` under a second: the retry is made when its backoff ends,
    not at the next idle poll, a second later."""
    [batch_id] = make_batches(store, 1)
    sink = Timed(expected=1)
    sink.fail_with(SinkRetryable("HTTP 503"))
    wall = VirtualWall(lazy_clock)
    deliverer = deliverer_of(store, sink, wall, retry_initial=0.1, retry_max=0.1)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(deliverer.run)
        with trio.fail_after(10):
            await sink.done.wait()
        nursery.cancel_scope.cancel()
    first, second = sink.times
    assert 0.05 <= second - first <= 0.1
    assert state(store, batch_id) == ("delivered", 2, None)


async def test_a_pass_that_attempted_batches_is_followed_at_once(
    store: SQLiteStore, lazy_clock: trio.testing.MockClock
) -> None:
    """A pass reads at most 100 batches a partition: after a full one the next
    pass starts at once, not after the idle poll. An outbox of thousands (a
    sink down for an hour) would otherwise drain at 100 batches a second."""
    ids = make_batches(store, 101)
    sink = Timed(expected=101)
    deliverer = deliverer_of(store, sink, VirtualWall(lazy_clock))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(deliverer.run)
        with trio.fail_after(10):
            await sink.done.wait()
        nursery.cancel_scope.cancel()
    assert sorted(sink.delivered) == sorted(ids)
    assert max(sink.times) < 0.5


async def test_an_idle_deliverer_reads_the_outbox_once_a_poll_even_when_reading_fails(
    store: SQLiteStore, lazy_clock: trio.testing.MockClock
) -> None:
    """Nothing due, or the store failing the read: the next read is an idle poll
    (1 s) later, not at once (a busy loop on the store that fails). A defect
    reading it ends `run` for its supervisor."""
    reads: list[float] = []
    answers: list[Exception | None] = [None, StoreBusy("read: locked"), MemoryError(), None]

    def due_batches(now_us: int, limit: int, latest_us: int | None = None) -> list[DueBatch]:
        reads.append(trio.from_thread.run_sync(trio.current_time))
        if not answers:
            raise ValueError("a bug")
        answer = answers.pop(0)
        if answer is not None:
            raise answer
        return store.due_batches(now_us, limit, latest_us)

    failing = Wrapped(store, due_batches=due_batches)
    deliverer = deliverer_of(failing, MemorySink(), VirtualWall(lazy_clock))  # type: ignore[arg-type]
    with trio.fail_after(30), pytest.raises(ValueError, match="a bug"):
        await deliverer.run()
    gaps = [b - a for a, b in itertools.pairwise(reads)]
    assert gaps == pytest.approx([1.0] * 4)


async def test_a_wake_starts_a_pass_before_the_idle_poll_ends(
    store: SQLiteStore, lazy_clock: trio.testing.MockClock
) -> None:
    """A commit wakes the deliverer: its batches go out at once, not up to a
    second later."""
    sink = Timed(expected=1)
    deliverer = deliverer_of(store, sink, VirtualWall(lazy_clock))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(deliverer.run)
        await trio.sleep(0.5)  # the first pass found nothing: idle until 1.0
        make_batches(store, 1)
        deliverer.wake()
        with trio.fail_after(10):
            await sink.done.wait()
        nursery.cancel_scope.cancel()
    assert sink.times == [pytest.approx(0.5)]


# --- the committer ------------------------------------------------------------

DAY1, DAY2 = "2026-11-26", "2026-11-27"  # both over at START, in UTC
P0, P1 = "d", "a"  # a tenant in each partition of the 2-partition `store`


def write_days(store: SQLiteStore, *placed: tuple[str, str]) -> None:
    """A pulse of each (tenant, day) in `placed`, received at START."""
    write(store, [make(tenant, day) for tenant, day in placed], epoch_us(START))


def committer_of(store: Any, clock: Callable[[], int], **options: Any) -> Committer:
    """A committer without shards: for leading, purging and reading horizons."""
    settings: dict[str, Any] = {
        "zones": {dt.UTC},
        "interval": 60.0,
        "grace": 0.0,
        "max_records": 100,
        "dedup_window": 3600.0,
    }
    settings.update(options)
    return Committer([], store, clock=clock, **settings)


async def test_the_periodic_commit_finds_open_days_in_every_partition(
    store: SQLiteStore, wall: FakeClock
) -> None:
    """Every partition is asked for its open days: one left out keeps its
    tenants' usage out of every batch, and off their invoices, for ever."""
    assert (partition_of(P0, 2), partition_of(P1, 2)) == (0, 1)
    write_days(store, (P0, DAY1), (P1, DAY2))
    async with parts(store, wall) as committer:
        batches = await committer.commit_due()
    assert sorted(day_of_batch(b) for b in batches) == [DAY1, DAY2]
    assert open_days(store) == {}


async def test_the_periodic_commit_tries_everything_and_raises_the_first_failure(
    store: SQLiteStore, wall: FakeClock
) -> None:
    """A partition that cannot list its open days, or a day that cannot be
    committed, holds back nothing else, and the tick still fails (logged,
    retried): the first failure is the one raised, the rest are tried."""
    write_days(store, (P1, DAY1), (P1, DAY2))
    unlisted: set[int] = set()
    uncommitted: set[str] = set()

    def listing(partition: int) -> list[str]:
        if partition in unlisted:
            raise StoreError(f"open days of partition {partition}")
        return store.open_days(partition)

    def committing(partition: int, day: str, *args: Any, **kwargs: Any) -> list[BatchSummary]:
        if day in uncommitted:
            raise StoreError(f"commit of {day}")
        return store.commit_day(partition, day, *args, **kwargs)

    failing = Wrapped(store, open_days=listing, commit_day=committing)
    async with parts(failing, wall) as committer:
        unlisted.update({0, 1})
        with pytest.raises(StoreError, match="open days of partition 0"):
            await committer.commit_due()
        unlisted.discard(1)
        uncommitted.update({DAY1, DAY2})
        with pytest.raises(StoreError, match="open days of partition 0"):
            await committer.commit_due()
        unlisted.clear()
        with pytest.raises(StoreError, match=f"commit of {DAY1}"):
            await committer.commit_due()
        uncommitted.discard(DAY2)
        with pytest.raises(StoreError, match=f"commit of {DAY1}"):
            await committer.commit_due()
        assert committer.batches_created == 1
        assert open_days(store) == {1: [DAY1]}
        assert committer.commit_failures == 5


async def test_a_commit_a_stopping_shard_refused_is_a_failure(
    store: SQLiteStore, wall: FakeClock
) -> None:
    """POST /aggregates/commit during a stop: the shards take no more commits,
    and the caller is told so, not answered with an empty, finished commit of
    a day whose usage is still open."""
    write_days(store, (P0, DAY1), (P1, DAY1))
    shard = Shard(0, range(2), store, queue_size=4, group_max_pulses=100, clock=wall)
    shard.close()
    committer = Committer(
        [shard], store, zones={dt.UTC}, interval=60, grace=0, max_records=100, dedup_window=3600
    )
    with pytest.raises(Draining):
        await committer.commit_day(dt.date.fromisoformat(DAY1))
    assert (committer.commits, committer.commit_failures) == (0, 1)
    assert open_days(store) == {0: [DAY1], 1: [DAY1]}


async def test_a_purge_forgets_ids_of_every_partition_ten_seconds_after_announcing(
    store: SQLiteStore, wall: FakeClock
) -> None:
    """A purge tells this instance's intake its horizon, then the store (for the
    other instances, which read it every 5 s), and forgets ids only up to a
    horizon announced 10 s before: an instance that had not read it yet would
    count a replay of a forgotten id again. Every partition is purged."""
    received = wall()
    write(store, [make(P0, DAY2, pid="p0"), make(P1, DAY2, pid="p1")], received)
    seen: list[int | None] = []
    committer = committer_of(store, wall, on_horizon=seen.append, dedup_window=3600.0)
    wall.advance(3601)
    assert await committer.purge() == 0
    assert seen == [wall() - 3600 * S]
    assert store.purge_horizon() == wall() - 3600 * S
    wall.advance(9.999)
    assert await committer.purge() == 0
    wall.now_us += 1_000
    assert await committer.purge() == 2
    assert store.purge_horizon() == wall() - 3600 * S


async def test_a_purge_horizon_read_within_seven_seconds_is_taken_as_it_is(
    store: SQLiteStore, wall: FakeClock, autojump_clock: trio.testing.MockClock
) -> None:
    """Intake checks pulses against the purge horizon: read within 7 s (under
    the 10 s an announced horizon waits before ids go), it is used as read;
    older, or never read, it is read again before pulses are taken. A longer
    bound let a paused instance count replays of ids already forgotten; a
    shorter one is a store read a request."""
    store.announce_purge(12345)
    reads: list[float] = []

    def purge_horizon() -> int | None:
        reads.append(trio.from_thread.run_sync(trio.current_time))
        return store.purge_horizon()

    seen: list[int | None] = []
    committer = committer_of(
        Wrapped(store, purge_horizon=purge_horizon), wall, on_horizon=seen.append
    )
    await committer.fresh_horizon()
    assert (len(reads), seen) == (1, [12345])
    await trio.sleep(6.9)
    await committer.fresh_horizon()
    assert len(reads) == 1
    await trio.sleep(0.2)
    await committer.fresh_horizon()
    assert len(reads) == 2
    assert seen == [12345, 12345]


def store_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Have the committer call the store in the test's own (mock) time: in a
    thread, autojump moved the clock to the next timer (the leader's, during
    a tick) while the thread worked, and times read then were seconds late."""

    async def at_once(call: Callable[..., Any], *args: Any, **_: Any) -> Any:
        return call(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", at_once)


@pytest.mark.parametrize("leading", [True, False])
async def test_every_instance_reads_the_purge_horizon_every_five_seconds(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    leading: bool,
) -> None:
    """Ids are forgotten 10 s after their horizon is announced: the leader
    (between its commit ticks, a minute apart, and during them) and every
    follower read it at least every 5 s, and a request in between needs no
    read of its own."""
    store_at_once(monkeypatch)
    store = SQLiteStore.open(tmp_path / "s", partitions=2, durability="os", busy_timeout=5)
    other = SQLiteStore.open(tmp_path / "s", partitions=2, durability="os", busy_timeout=5)
    try:
        assert (other if leading else store).lead_committer(20)
        reads: list[float] = []

        def purge_horizon() -> int | None:
            reads.append(trio.current_time())
            return store.purge_horizon()

        committer = committer_of(
            Wrapped(other, purge_horizon=purge_horizon), TrioWallClock(START), interval=60
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(committer.run)
            await committer.wait_ticks(3)
            assert committer.leading is leading
            gaps = [b - a for a, b in itertools.pairwise(reads)]
            assert len(reads) >= 3
            assert max(gaps) <= 5.0 + 1e-6, reads
            before = len(reads)
            await committer.fresh_horizon()
            assert len(reads) == before
            nursery.cancel_scope.cancel()
    finally:
        other.close()
        store.close()


async def test_a_failed_reading_of_the_purge_horizon_is_not_taken_for_a_fresh_one(
    store: SQLiteStore, autojump_clock: trio.testing.MockClock
) -> None:
    """The tick's reading of the horizon failed: the request that follows reads
    it itself (and fails, answered 503), rather than take pulses with a
    horizon of unknown age."""

    def purge_horizon() -> int | None:
        raise StoreError("purge horizon: the connection was lost")

    committer = committer_of(Wrapped(store, purge_horizon=purge_horizon), TrioWallClock(START))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.run)
        await committer.wait_ticks(1)
        with pytest.raises(StoreError, match="connection was lost"):
            await committer.fresh_horizon()
        nursery.cancel_scope.cancel()


async def test_the_committer_says_its_zones_at_start_and_its_ticks_purge(
    store: SQLiteStore, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At start, before its first tick, the instance tells the store its billing
    zones: a leader deciding meanwhile which days are due must count them. And
    the leader's tick purges, as well as commits: otherwise the log and the ids
    grow without end."""
    store_at_once(monkeypatch)
    noted: list[float] = []
    announced: list[int] = []

    def note_zones(zones: list[str], now_us: int, since_us: int) -> list[str]:
        noted.append(trio.current_time())
        return store.note_zones(zones, now_us, since_us)

    def announce_purge(before_us: int) -> None:
        announced.append(before_us)
        store.announce_purge(before_us)

    wrapped = Wrapped(store, note_zones=note_zones, announce_purge=announce_purge)
    committer = committer_of(wrapped, TrioWallClock(START))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.run)
        await committer.wait_ticks(1)
        nursery.cancel_scope.cancel()
    assert noted[0] == 0.0
    assert committer.leading
    assert announced == [epoch_us(START) + 5 * S - 3600 * S]


async def test_the_committer_says_its_zones_every_minute(
    store: SQLiteStore, autojump_clock: trio.testing.MockClock
) -> None:
    """A zone counts on the store for ten minutes after its instance last said
    it: an instance that said it less often dropped out of the leader's zones
    between times, and the leader committed days that had not ended there (its
    pulses of them all became corrections)."""
    noted: list[float] = []

    def note_zones(zones: list[str], now_us: int, since_us: int) -> list[str]:
        noted.append(trio.from_thread.run_sync(trio.current_time))
        return store.note_zones(zones, now_us, since_us)

    committer = committer_of(Wrapped(store, note_zones=note_zones), TrioWallClock(START))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.run)
        await committer.wait_ticks(5)
        nursery.cancel_scope.cancel()
    assert trio.current_time() >= 240
    gaps = [b - a for a, b in itertools.pairwise(noted)]
    assert len(gaps) >= 3
    assert max(gaps) <= 2 * 60 + 5, noted


async def test_a_commit_that_made_batches_wakes_the_deliverer_and_lists_them_by_partition(
    store: SQLiteStore, wall: FakeClock
) -> None:
    """The batches of a commit go out at once (the deliverer is woken, not left
    to its poll), and only a commit that made some wakes it. POST
    /aggregates/commit lists them in partition order, whichever partition's
    shard finished first."""
    write_days(store, (P0, DAY1), (P1, DAY1))
    later = threading.Event()

    def committing(partition: int, *args: Any, **kwargs: Any) -> list[BatchSummary]:
        if partition == 0:
            assert later.wait(5), "partition 1 never committed"
        made = store.commit_day(partition, *args, **kwargs)
        later.set()
        return made

    wrapped = Wrapped(store, commit_day=committing)
    shards = [
        Shard(p, range(p, p + 1), wrapped, queue_size=4, group_max_pulses=100, clock=wall)
        for p in (0, 1)
    ]
    woken: list[int] = []
    committer = Committer(
        shards,
        store,
        zones={dt.UTC},
        interval=60,
        grace=0,
        max_records=100,
        dedup_window=3600,
        on_commit=lambda: woken.append(1),
    )
    async with trio.open_nursery() as nursery:
        for shard in shards:
            await nursery.start(shard.run)
        made = await committer.commit_day(dt.date.fromisoformat(DAY1))
        assert [b.batch_id.split("-")[2] for b in made] == ["p000", "p001"]
        assert woken == [1]
        assert await committer.commit_day(dt.date.fromisoformat(DAY2)) == []
        assert woken == [1]
        for shard in shards:
            shard.close()


async def test_a_leader_that_cannot_confirm_its_lead_stops_leading(
    store: SQLiteStore, autojump_clock: trio.testing.MockClock
) -> None:
    """The store failing to confirm the lead (a PostgreSQL session lost, whose
    lock went with it): the instance no longer counts itself the leader, in the
    `leading` gauge or in its ticks, which neither commit nor purge until the
    store says it leads again."""
    answers: list[bool | Exception] = [True]
    announced: list[float] = []

    def lead_committer(lapse: float) -> bool:
        answer = answers[-1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def announce_purge(before_us: int) -> None:
        announced.append(trio.from_thread.run_sync(trio.current_time))

    wrapped = Wrapped(store, lead_committer=lead_committer, announce_purge=announce_purge)
    committer = committer_of(wrapped, TrioWallClock(START))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.run)
        await committer.wait_ticks(1)
        assert committer.leading
        assert len(announced) == 1
        answers.append(StoreError("lead the committer: the session was lost"))
        await committer.wait_ticks(committer.ticks + 2)
        assert not committer.leading
        assert len(announced) == 1
        nursery.cancel_scope.cancel()


async def test_a_commit_makes_batches_no_bigger_than_batch_max_bytes_stamped_at_its_time(
    store: SQLiteStore, wall: FakeClock
) -> None:
    """`batch_max_bytes` is set to what the downstream takes (NATS' max_payload,
    a proxy's body limit): a bigger batch is refused every time it is sent, and
    its usage is never billed. Each batch is stamped with the commit's time."""
    write(store, [make(P0, DAY1, sku=f"sku{i:03d}") for i in range(40)], wall())
    shard = Shard(0, range(2), store, queue_size=4, group_max_pulses=100, clock=wall)
    committer = Committer(
        [shard],
        store,
        zones={dt.UTC},
        interval=60,
        grace=0,
        max_records=1000,
        max_bytes=BATCH_MIN_BYTES,
        dedup_window=3600,
        clock=wall,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        made = await committer.commit_day(dt.date.fromisoformat(DAY1))
        shard.close()
    assert len(made) > 1
    assert sum(b.record_count for b in made) == 40
    for summary in made:
        body = claim_elsewhere(store, summary.batch_id, wall(), wall() + S)
        assert body is not None
        assert len(body) <= BATCH_MIN_BYTES
        view = store.batch(summary.batch_id)
        assert view is not None
        assert view.created_at == wall.now
