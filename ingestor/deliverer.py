"""The deliverer: sends outbox batches to the sink until the sink confirms.

A batch is marked delivered only after the sink returned: a crash between the
two leaves it pending, and it is sent again, which every sink makes harmless
(idempotent by batch id). Retryable failures back off exponentially, capped,
with full jitter; a rejected batch is `failed` and waits for an operator. A
sink that raises anything else is retried the same way: one batch must not
stop the service, nor a restart find it due and stop it again.

A receiver's `Retry-After` (`SinkRetryable.retry_after`) is the least a
retry waits, up to `retry_max`.

Next attempts are wall-clock times, kept in the store for every process.
A batch set to retry further ahead than `retry_max` (or the lease, below)
is due: no backoff sets one so far, so the clock has stepped back since,
and the batch would otherwise wait out the step on top of its backoff.

Every process that delivers reads the same outbox. Each batch is claimed
just before it is sent (`Store.claim_batch`): its next attempt moves a
lease ahead, so no other process finds it due while it is on its way. A
receiver slower than the idle poll was otherwise sent every batch once by
each process. A sender that dies leaves its batch due again when the lease
ends; one whose delivery is cancelled (the service stops) gives it back,
due at once. A claim that comes back with less than half its lease left
(the process was frozen, or the store slow, meanwhile) is given back
unsent: the batch could otherwise still be on its way when another
process takes it over.
The lease is the attempt's bound: twice the sink's timeout and 5 s, plus
`clock_skew`, by which the clocks of the processes sharing the store may
differ (0 on SQLite, one machine's clock): a lease read on a clock that is
ahead has not ended yet. A delivery still going 1 s before its lease ends
is cut there and retried, whatever the sink.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import random
from collections.abc import Callable

import trio

from .clock import wall_clock_us
from .errors import SinkRejected, SinkRetryable, StoreError, out_of_resources
from .logs import Hushed
from .sinks import Sink
from .store import DueBatch, Store

__all__ = ["Deliverer", "backoff"]

log = logging.getLogger("ingestor.deliverer")
_store_failures = Hushed(log)  # the store failing every pass and claim, said once in a while
_IDLE_POLL = 1.0  # also picks up batches committed by other processes (at most this long idle)
# Pauses before recording an outcome again (`Deliverer._record`): the first
# ones, which a stop waits for; then doubling up to the last, till the lease ends.
_RECORD_AGAIN_S = (0.1, 0.5)
_RECORD_AGAIN_MAX_S = 5.0
# A delivery ends this long before its claim's lease at the latest, to record it.
_RECORD_IN_S = 1.0


def backoff(attempt: int, initial: float, cap: float, rng: random.Random) -> float:
    """Seconds before retry number `attempt` (1-based): capped exponential, jittered."""
    ceiling = min(cap, initial * 2 ** min(attempt - 1, 32))
    return float(ceiling / 2 + rng.uniform(0, ceiling / 2))


class Deliverer:
    def __init__(
        self,
        store: Store,
        sink: Sink,
        *,
        concurrency: int,
        retry_initial: float,
        retry_max: float,
        lease: float,
        clock_skew: float = 0.0,
        clock: Callable[[], int] = wall_clock_us,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._sink = sink
        self._limit = trio.Semaphore(concurrency)  # acquired here, released by the child
        # Threads of its own for the store's calls, one a delivery and one for
        # the pass: a sink's answer is recorded without waiting for one of the
        # threads trio lends everyone else, which slow reads may all hold (its
        # lease could end meanwhile, and the batch be sent again).
        self._threads = trio.CapacityLimiter(concurrency + 1)
        self._concurrency = concurrency
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._lease_us = int((lease + clock_skew) * 1_000_000)
        # A claim is sent on only while half its lease is left: the lease is
        # twice the delivery's bound and 5 s, so the delivery ends within it.
        self._send_by_us = self._lease_us // 2
        # No backoff and no lease sets a next attempt further ahead than this,
        # on any process's clock: a later one was set before a clock stepped back.
        furthest = max(retry_max, lease + clock_skew) + clock_skew
        self._furthest_us = int(furthest * 1_000_000)
        self._clock = clock
        self._rng = rng or random.Random()
        self._wake = trio.Event()
        # When this process's retries are due, soonest first: a retry sooner
        # than the idle poll (`retry_initial` under 1 s) waits for it, not the poll.
        self._retries: list[int] = []
        # One pass at a time: a pass reads the due batches and waits for all of
        # them, so a second pass never works from a list read before the
        # first one recorded its outcomes.
        self._pass = trio.Lock()
        self.delivered = 0
        self.retried = 0
        self.failed = 0
        self.unrecorded = 0  # outcomes the store could not take: due again at once

    def wake(self) -> None:
        """Look at the outbox now (a commit just added batches)."""
        self._wake.set()

    async def deliver_due(self) -> int:
        """Attempt every batch that is due now; return how many were attempted."""
        async with self._pass:
            now = self._clock()
            due = await trio.to_thread.run_sync(
                self._store.due_batches, now, 100, now + self._furthest_us, limiter=self._threads
            )
            async with trio.open_nursery() as nursery:
                for batch in due:
                    await self._limit.acquire()
                    nursery.start_soon(self._deliver_one, batch)
        return len(due)

    async def _deliver_one(self, batch: DueBatch) -> None:
        try:
            claimed = await self._claim(batch)
            if claimed is None:
                return
            lease, body = claimed
            # One reading of the clock for the check and the bound: a step of
            # the wall clock between two readings sent a batch with none left.
            left_us = lease - self._clock()
            if left_us < self._send_by_us:
                # Most of the lease went before the claim came back (the process
                # was frozen, or the store slow): sent now, the batch could
                # still be on its way when the lease ends and another process
                # sends it too. Given back, due at once.
                await self._give_back(
                    batch, lease, "claimed too late in its lease to send", sent=False
                )
                return
            status, error, next_at = "delivered", None, None
            try:
                # Each sink bounds its delivery by the sink timeout; this bound
                # holds whatever a sink's library does (nats-py once retried a
                # connect for ever, and the pass waited on it with every batch).
                # Counted on trio's clock from here, whatever the wall clock does.
                bound = max(0.0, left_us / 1_000_000 - _RECORD_IN_S)
                with trio.move_on_after(bound) as sending:
                    await self._sink.deliver(batch.batch_id, batch.day, body)
                if sending.cancelled_caught:
                    raise SinkRetryable(
                        f"the {self._sink.name} sink did not end the delivery within"
                        f" {bound:.1f} s, before the claim on the batch runs out"
                    )
            except trio.Cancelled:
                await self._give_back(batch, lease)
                raise
            except SinkRetryable as exc:
                status, error, next_at = self._retry(batch, str(exc), exc.retry_after)
            except SinkRejected as exc:
                status, error = "failed", str(exc)
                self.failed += 1
                log.error(
                    "delivery rejected",
                    extra={"fields": {"batch_id": batch.batch_id, "error": error}},
                )
            except Exception as exc:
                log.exception(
                    "delivery raised an unexpected error",
                    extra={"fields": {"batch_id": batch.batch_id}},
                )
                status, error, next_at = self._retry(batch, f"unexpected error: {exc!r}")
            else:
                self.delivered += 1
            await self._record(batch, lease, status, error, next_at)
        finally:
            self._limit.release()

    async def _record(
        self, batch: DueBatch, lease: int, status: str, error: str | None, next_at: int | None
    ) -> None:
        """Record an attempt's outcome, trying again while the store fails and
        the claim's lease lasts: a database failing over ends every session as
        a delivery's answer comes, and a full disk refuses writes for as long as
        it is full. A batch the sink had taken, recorded nowhere, is sent again
        when its lease ends (55 s with the default sink timeout, PostgreSQL):
        tried for only 0.6 s, a failover or a full disk that lasted longer had
        the receiver sent the batch twice. The first pauses are shielded like
        the tries (the sink has the batch as the stop comes); a stop during a
        later one leaves the batch pending, sent again later, harmlessly."""
        shielded = iter(_RECORD_AGAIN_S)
        pause = 0.0
        while True:
            try:
                # Shielded: a stop that cancelled this wait would leave a batch
                # the sink has taken pending in the store, sent again once its
                # lease ends. The store's busy timeout bounds each try.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(
                        lambda: self._store.record_delivery(
                            batch.partition,
                            batch.batch_id,
                            status=status,
                            error=error,
                            next_attempt_us=next_at,
                            now_us=self._clock(),
                            claimed_us=lease,
                        ),
                        limiter=self._threads,
                    )
                return
            except Exception as exc:
                if not _passing(exc):
                    raise  # a defect (see `run`)
                failure = str(exc) or repr(exc)
            first = next(shielded, None)
            pause = first if first is not None else min(2 * pause, _RECORD_AGAIN_MAX_S)
            if self._clock() + int(pause * 1_000_000) >= lease:
                # Still pending in the store: sent again once the lease ends.
                self._unrecorded(batch, failure)
                return
            try:
                with trio.CancelScope(shield=first is not None):
                    await trio.sleep(pause)
            except trio.Cancelled:
                self._unrecorded(batch, failure)
                raise

    def _unrecorded(self, batch: DueBatch, failure: str) -> None:
        self.unrecorded += 1
        log.warning(
            "could not record delivery",
            extra={"fields": {"batch_id": batch.batch_id, "error": failure}},
        )

    async def _give_back(
        self,
        batch: DueBatch,
        lease: int,
        why: str = "the service stopped before the sink answered",
        *,
        sent: bool = True,
    ) -> None:
        """A delivery cancelled (the service stops), or not begun (`sent` False):
        due again now, not at the end of its lease, for this process's next
        start or another process. Counted as an attempt if it was sent: the
        sink may have had it."""
        now = self._clock()
        with trio.CancelScope(shield=True), contextlib.suppress(StoreError):
            await trio.to_thread.run_sync(
                lambda: self._store.record_delivery(
                    batch.partition,
                    batch.batch_id,
                    status="pending",
                    error=why,
                    next_attempt_us=now,
                    now_us=now,
                    claimed_us=lease,
                    attempted=sent,
                ),
                limiter=self._threads,
            )

    async def _claim(self, batch: DueBatch) -> tuple[int, bytes] | None:
        """Take `batch` for this attempt (see the module docstring): the end of
        its lease, and its body; None if another process has it, or the store
        could not say."""
        now = self._clock()
        lease = now + self._lease_us
        try:
            body = await trio.to_thread.run_sync(
                lambda: self._store.claim_batch(
                    batch.partition,
                    batch.batch_id,
                    now_us=now,
                    latest_us=now + self._furthest_us,
                    lease_us=lease,
                ),
                limiter=self._threads,
            )
        except Exception as exc:
            if not _passing(exc):
                raise  # a defect (see `run`)
            # Still due: tried again after the idle poll, not in a busy loop.
            self.unrecorded += 1
            fields = {"batch_id": batch.batch_id, "error": str(exc) or repr(exc)}
            key = ("claim", type(exc).__name__)
            _store_failures.warning(key, "could not claim a batch", fields)
            return None
        return None if body is None else (lease, body)

    def _retry(
        self, batch: DueBatch, error: str, asked: float | None = None
    ) -> tuple[str, str, int]:
        """The outcome of a failed attempt that is retried: its status, error, next
        attempt. The backoff, or what the receiver `asked` (its Retry-After) if
        that is longer, up to `retry_max`: further ahead, a next attempt would
        be taken for one set before the clock stepped back (see the module
        docstring), and due at once."""
        attempt = batch.attempts + 1
        delay = backoff(attempt, self._retry_initial, self._retry_max, self._rng)
        if asked is not None:
            delay = max(delay, min(asked, self._retry_max))
        self.retried += 1
        log.warning(
            "delivery failed, will retry",
            extra={
                "fields": {
                    "batch_id": batch.batch_id,
                    "attempt": attempt,
                    "retry_in_s": round(delay, 1),
                    "error": error,
                }
            },
        )
        next_at = self._clock() + int(delay * 1_000_000)
        heapq.heappush(self._retries, next_at)
        return "pending", error, next_at

    def _idle_for(self) -> float:
        """Seconds to wait, unless woken, before the next pass: the idle poll, or
        less, until this process's next retry is due."""
        now = self._clock()
        while self._retries and self._retries[0] <= now:
            heapq.heappop(self._retries)
        if not self._retries:
            return _IDLE_POLL
        return min(_IDLE_POLL, (self._retries[0] - now) / 1_000_000)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._wake = trio.Event()
            unrecorded = self.unrecorded
            try:
                attempted = await self.deliver_due()
            except Exception as exc:
                # No thread to read in, no memory: tried again after the idle
                # poll, where it ended the process and every request with it.
                # A defect still does: its supervisor starts it again.
                if not _passing(exc):
                    raise
                fields = {"error": str(exc) or repr(exc)}
                key = ("read", type(exc).__name__)
                _store_failures.warning(key, "reading the outbox failed", fields)
                attempted = 0
            # A batch whose outcome the store did not take is due again at
            # once: sent again now, it would be sent in a busy loop.
            if attempted == 0 or self.unrecorded > unrecorded:
                with trio.move_on_after(self._idle_for()):
                    await self._wake.wait()


def _passing(exc: Exception) -> bool:
    """Whether the deliverer goes on after `exc`: the store failed, or the process
    is out of memory or threads for now. Anything else is a defect."""
    return isinstance(exc, StoreError) or out_of_resources(exc) is not None
