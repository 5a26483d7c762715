"""The shard: one actor per partition, the only writer of that partition here.

Requests reach it over a bounded trio memory channel. Each turn of its loop
takes every message already waiting (group commit), writes all their pulses
in one store transaction, and only then replies: a reply means durable. A full
channel is overload, answered 503 by the API, never a growing queue.

The write itself runs in a worker thread through a `WriteLane` that shards
share as the store prefers (`Store.write_lanes`): on SQLite, one lane takes
every shard's waiting write to one thread in one hop, and one transaction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Generic, TypeVar

import msgspec
import trio

from .clock import wall_clock_us
from .errors import Draining, Overloaded, StoreError
from .model import BatchSummary, Outcome, Pulse, encode_pulses, join_encoded
from .store import Store

__all__ = ["Commit", "Ingest", "Replies", "Reply", "Shard", "ShardStatistics", "WriteLane"]

log = logging.getLogger("ingestor.shard")
T = TypeVar("T")


class Reply(Generic[T]):
    """A one-shot answer from an actor to the task waiting for it.

    Made by `Replies`, it is one of several that task waits for together.
    """

    __slots__ = ("_error", "_event", "_group", "_value")

    def __init__(self, group: Replies[T] | None = None) -> None:
        self._group = group
        self._event = trio.Event() if group is None else None
        self._value: T | None = None
        self._error: BaseException | None = None

    def send(self, value: T) -> None:
        self._value = value
        self._answered()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._answered()

    def _answered(self) -> None:
        if self._group is not None:
            self._group.answered()
        else:
            assert self._event is not None
            self._event.set()

    async def receive(self) -> T:
        assert self._event is not None, "wait for its Replies"
        await self._event.wait()
        return self.result()

    def result(self) -> T:
        """The answer that has come (see `Replies.wait`)."""
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


class Replies(Generic[T]):
    """Replies to one task from several actors; the task wakes once, when all have come.

    A 1,000-pulse request sends a message to each of the sixteen shards:
    waiting for their replies one by one woke its task sixteen times.
    """

    def __init__(self) -> None:
        self._event = trio.Event()
        self._waiting = 0

    def reply(self) -> Reply[T]:
        self._waiting += 1
        return Reply(self)

    def answered(self) -> None:
        self._waiting -= 1
        if not self._waiting:
            self._event.set()

    async def wait(self) -> None:
        """Until every reply made so far has come."""
        if not self._waiting:
            self._event.set()
        await self._event.wait()


class _Job:
    __slots__ = ("args", "done", "error", "fn", "leads", "value")

    def __init__(self, fn: Callable[..., object], args: tuple[object, ...]) -> None:
        self.fn = fn
        self.args = args
        self.done = trio.Event()  # set when it has run, or when it is to lead
        self.leads = False
        self.value: object = None
        # Until it has run: a write that never ran is answered as not stored.
        self.error: BaseException | None = StoreError("the write did not run")


def _run_jobs(jobs: list[_Job], together: Callable[[], AbstractContextManager[None]]) -> None:
    try:
        with together():
            for job in jobs:
                try:
                    job.value = job.fn(*job.args)
                    job.error = None
                except BaseException as exc:  # each job's failure is its own
                    job.error = exc
    except BaseException as exc:  # what they did together did not last
        for job in jobs:
            if job.error is None:
                job.value, job.error = None, exc


class WriteLane:
    """The shards' pulse writes, taken to a worker thread together.

    A 1,000-pulse request spread over 16 partitions gave 16 shards a write
    each, and a thread hop each: handing work to a thread, waking it, and
    waking the event loop again cost more than the transactions themselves.
    Through the lane, the writes that are waiting when one starts go in one
    hop and run one after another, each with its own result: whoever finds
    the lane idle leads and runs every waiting write; those that arrive
    meanwhile wait, and the first of them leads next. The writes of one hop
    run inside `together()` (the store's `writing_together`), which may make
    them one durable transaction; if it fails, so does every write in it.
    """

    def __init__(
        self, together: Callable[[], AbstractContextManager[None]] = nullcontext
    ) -> None:
        self._together = together
        self._waiting: list[_Job] = []
        self._busy = False

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` in a worker thread; like `trio.to_thread.run_sync`, never cancelled."""
        job = _Job(fn, args)
        self._waiting.append(job)
        with trio.CancelScope(shield=True):
            if self._busy:
                await job.done.wait()
            else:
                self._busy = job.leads = True
            if job.leads:
                # Shards made runnable by the same request queue theirs first.
                await trio.lowlevel.checkpoint()
                jobs, self._waiting = self._waiting, []
                try:
                    await trio.to_thread.run_sync(_run_jobs, jobs, self._together)
                finally:
                    for done in jobs:
                        done.done.set()
                    if self._waiting:
                        follower = self._waiting[0]
                        follower.leads = True  # the lane stays busy: it leads next
                        follower.done.set()
                    else:
                        self._busy = False
        if job.error is not None:
            raise job.error
        return job.value  # type: ignore[return-value]


class Ingest(msgspec.Struct):
    """Pulses for the shard to write, and where their outcomes go.

    `encoded` (`encode_pulses`) is made with the message, by the request
    that has just decoded the pulses. In the store's round it cost as much
    CPU (there the pulses had left the CPU's cache: ~310 ns a pulse against
    ~140 for a hot group), but inside the writers' lock, which every process
    sharing the store waits on: 1.8 µs a pulse of lock, 1.2 without it.
    """

    pulses: list[Pulse]
    reply: Reply[list[Outcome]]
    encoded: bytes = b""

    def __post_init__(self) -> None:
        self.encoded = encode_pulses(self.pulses)


class Commit(msgspec.Struct):
    day: str
    now_us: int
    max_records: int
    reply: Reply[list[BatchSummary]]


Message = Ingest | Commit


class ShardStatistics(msgspec.Struct, frozen=True):
    partition: int
    queued: int
    capacity: int
    transactions: int
    pulses_written: int
    last_group_pulses: int
    transaction_seconds: float


class Shard:
    """The actor that owns one partition's writes in this process."""

    def __init__(
        self,
        partition: int,
        store: Store,
        *,
        queue_size: int,
        group_max_pulses: int,
        clock: Callable[[], int] = wall_clock_us,
        lane: WriteLane | None = None,
    ) -> None:
        self.partition = partition
        self._lane = lane or WriteLane(store.writing_together)
        self._store = store
        self._group_max = group_max_pulses
        self._clock = clock
        self._send, self._receive = trio.open_memory_channel[Message](queue_size)
        self._capacity = queue_size
        self._transactions = 0
        self._pulses_written = 0
        self._last_group = 0
        self._transaction_seconds = 0.0

    def has_room(self) -> bool:
        """True if `submit_nowait` would not raise Overloaded right now."""
        return self._send.statistics().current_buffer_used < self._capacity

    def submit_nowait(self, message: Message) -> None:
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            raise Overloaded(f"shard {self.partition} queue is full") from None
        except trio.ClosedResourceError:
            raise Draining("the service is shutting down") from None

    async def submit(self, message: Message) -> None:
        """Queue `message`, waiting for room (for work that may wait, like commits)."""
        try:
            await self._send.send(message)
        except trio.ClosedResourceError:
            raise Draining("the service is shutting down") from None

    def close(self) -> None:
        """Take no new messages; `run` returns once the queued ones are done."""
        self._send.close()

    def statistics(self) -> ShardStatistics:
        return ShardStatistics(
            partition=self.partition,
            queued=self._send.statistics().current_buffer_used,
            capacity=self._capacity,
            transactions=self._transactions,
            pulses_written=self._pulses_written,
            last_group_pulses=self._last_group,
            transaction_seconds=self._transaction_seconds,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with self._receive:
            async for first in self._receive:
                for group in self._take_group(first):
                    if isinstance(group, Commit):
                        await self._commit(group)
                    else:
                        await self._ingest(group)

    def _take_group(self, first: Message) -> list[Commit | list[Ingest]]:
        """`first` and everything already waiting, consecutive ingests grouped."""
        steps: list[Commit | list[Ingest]] = []
        pulses = 0
        message: Message | None = first
        while message is not None:
            if isinstance(message, Commit):
                steps.append(message)
            else:
                if not steps or not isinstance(steps[-1], list):
                    steps.append([])
                steps[-1].append(message)  # type: ignore[union-attr]
                pulses += len(message.pulses)
            if pulses >= self._group_max:
                break
            try:
                message = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                message = None
        return steps

    async def _ingest(self, group: list[Ingest]) -> None:
        pulses = [p for request in group for p in request.pulses]
        encoded = join_encoded([request.encoded for request in group])
        started = time.perf_counter()
        try:
            outcomes = await self._lane.run(
                self._store.write_pulses, self.partition, pulses, self._clock(), encoded
            )
        except StoreError as exc:
            log.warning(
                "write failed", extra={"fields": {"partition": self.partition, "error": str(exc)}}
            )
            for request in group:
                request.reply.fail(exc)
            return
        self._transactions += 1
        self._pulses_written += len(pulses)
        self._last_group = len(pulses)
        self._transaction_seconds += time.perf_counter() - started
        # Replies go out only now, after the transaction is durable.
        start = 0
        for request in group:
            end = start + len(request.pulses)
            request.reply.send(outcomes[start:end])
            start = end

    async def _commit(self, message: Commit) -> None:
        try:
            batches = await trio.to_thread.run_sync(
                self._store.commit_day,
                self.partition,
                message.day,
                message.now_us,
                message.max_records,
            )
        except StoreError as exc:
            message.reply.fail(exc)
            return
        message.reply.send(batches)
