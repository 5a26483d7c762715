"""The shards: the actors that own the store's writes in this process.

Each shard owns some partitions and is the only writer of them here; a
request sends each shard it touches one message, holding its pulses of
each partition, over a bounded trio memory channel. Each turn of a shard's
loop takes every message already waiting (group commit), writes each
partition's pulses of all of them in one `write_pulses`, every partition
in one `writing_together` block in a worker thread, and only then replies:
a reply means durable. A full channel is overload, answered 503 by the API,
never a growing queue.

How many shards there are is the store's choice (`Store.write_lanes`). On
SQLite, one owns every partition: one file, one transaction a round. A
shard per partition, whose writes went to one thread together, cost a
1,000-pulse request sixteen messages, sixteen tasks woken twice, and
sixteen replies. On PostgreSQL, a shard per partition: its writes wait on
the network, and each partition's lock, side by side.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import msgspec
import trio

from .clock import wall_clock_us
from .errors import Draining, Overloaded, StoreBusy, StoreError, out_of_resources
from .ledger import BATCH_MAX_BYTES
from .logs import Hushed
from .model import BatchSummary, Outcome, Pulse, encode_pulses, join_encoded
from .store import Store

__all__ = ["Commit", "Ingest", "Replies", "Reply", "Shard", "ShardStatistics", "Written"]

log = logging.getLogger("ingestor.shard")
# Failed writes, a line a kind of error (full, busy, unavailable) once in a while.
_failures = Hushed(log)
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

    A request sends a message to each shard it touches (on PostgreSQL, a
    1,000-pulse request touches sixteen): waiting for their replies one by
    one woke its task as many times.
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


# Each partition's outcomes, in the order of its pulses, or why it was not written.
Written = dict[int, list[Outcome] | StoreError]


class Ingest(msgspec.Struct):
    """A request's pulses for one shard, by partition, and where their outcomes go.

    `encoded` (`encode_pulses`, by partition) is made with the message, by
    the request that has just decoded the pulses. In the store's round it
    cost as much CPU (there the pulses had left the CPU's cache: ~310 ns a
    pulse against ~140 for a hot group), but inside the writers' lock, which
    every process sharing the store waits on: 1.8 µs a pulse of lock, 1.2
    without it.
    """

    pulses: dict[int, list[Pulse]]
    reply: Reply[Written]
    encoded: dict[int, bytes] = {}
    ids: bool = True  # False: no pulse has a client id, so the store looks none up

    def __post_init__(self) -> None:
        self.encoded = {partition: encode_pulses(p) for partition, p in self.pulses.items()}


class Commit(msgspec.Struct):
    partition: int
    day: str
    now_us: int
    max_records: int
    reply: Reply[list[BatchSummary]]
    max_bytes: int = BATCH_MAX_BYTES


Message = Ingest | Commit


class ShardStatistics(msgspec.Struct, frozen=True):
    shard: int
    partitions: int
    queued: int
    capacity: int
    transactions: int  # rounds that wrote something; their time is in transaction_seconds
    pulses_written: int
    last_group_pulses: int
    transaction_seconds: float
    failed_transactions: int  # rounds in which a write failed (and kept nothing of it)


class Shard:
    """The actor that owns the writes of `partitions` in this process.

    Its queue holds `queue_size` writes per partition it owns: a message
    counts once per partition it writes, as it did when each partition had
    a shard and a queue of its own.
    """

    def __init__(
        self,
        index: int,
        partitions: Sequence[int],
        store: Store,
        *,
        queue_size: int,
        group_max_pulses: int,
        clock: Callable[[], int] = wall_clock_us,
    ) -> None:
        self.index = index
        self.partitions = tuple(partitions)
        self._store = store
        self._group_max = group_max_pulses
        self._clock = clock
        self._capacity = queue_size * len(self.partitions)
        # The shard's own thread: it runs one write or commit at a time, and
        # never waits for one of the threads trio lends everyone else, which
        # reads of a store that answers slowly may all hold.
        self._thread = trio.CapacityLimiter(1)
        self._send, self._receive = trio.open_memory_channel[Message](self._capacity)
        self._queued = 0  # partitions' writes waiting in the channel
        self._transactions = 0
        self._pulses_written = 0
        self._last_group = 0
        self._transaction_seconds = 0.0
        self._failed_transactions = 0

    def has_room(self, writes: int = 1) -> bool:
        """True if a message writing `writes` partitions would be taken right now."""
        return self._queued + writes <= self._capacity

    def submit_nowait(self, message: Ingest) -> None:
        writes = len(message.pulses)
        if not self.has_room(writes):
            raise Overloaded(f"shard {self.index} queue is full")
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            raise Overloaded(f"shard {self.index} queue is full") from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise Draining("the service is shutting down") from None
        self._queued += writes

    async def submit(self, message: Commit) -> None:
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
            shard=self.index,
            partitions=len(self.partitions),
            queued=self._queued,
            capacity=self._capacity,
            transactions=self._transactions,
            pulses_written=self._pulses_written,
            last_group_pulses=self._last_group,
            transaction_seconds=self._transaction_seconds,
            failed_transactions=self._failed_transactions,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with self._receive:
            async for first in self._receive:
                busy: StoreBusy | None = None
                for group in self._take_group(first):
                    if busy is not None:
                        _refuse(group, busy)
                    elif isinstance(group, Commit):
                        busy = await self._commit(group)
                    else:
                        busy = await self._ingest(group)
                if busy is not None:
                    self._refuse_waiting(busy)

    def _refuse_waiting(self, busy: StoreBusy) -> None:
        """Answer `busy` to every message waiting now.

        They came while a round waited the busy timeout for a lock another
        process held, and failed. Taken into the next round, they waited a
        busy timeout more: up to twice the `store_busy_timeout` a request
        waits at most (4.1 s with 2 s, a PostgreSQL partition held by an
        instance that had stopped).
        """
        while True:
            try:
                message = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            if isinstance(message, Ingest):
                self._queued -= len(message.pulses)
                _refuse([message], busy)
            else:
                _refuse(message, busy)

    def _take_group(self, first: Message) -> list[Commit | list[Ingest]]:
        """`first` and everything already waiting, consecutive ingests grouped."""
        steps: list[Commit | list[Ingest]] = []
        pulses = 0
        message: Message | None = first
        while message is not None:
            if isinstance(message, Commit):
                steps.append(message)
            else:
                self._queued -= len(message.pulses)
                if not steps or not isinstance(steps[-1], list):
                    steps.append([])
                steps[-1].append(message)  # type: ignore[union-attr]
                pulses += sum(len(p) for p in message.pulses.values())
            if pulses >= self._group_max:
                break
            try:
                message = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                message = None
        return steps

    async def _ingest(self, group: list[Ingest]) -> StoreBusy | None:
        """Write `group` in one round; the StoreBusy it failed with, if it did."""
        by_partition: dict[int, list[Ingest]] = {}
        for request in group:
            for partition in request.pulses:
                by_partition.setdefault(partition, []).append(request)
        try:
            writes = {
                partition: (
                    [p for request in requests for p in request.pulses[partition]],
                    join_encoded([request.encoded[partition] for request in requests]),
                    any(request.ids for request in requests),
                )
                for partition, requests in by_partition.items()
            }
        except Exception as exc:
            # Out of memory joining the round: nothing is written, each
            # request is answered 503, and the shard goes on.
            failed = _exhausted(exc, "join pulses")
            for request in group:
                request.reply.send(dict.fromkeys(request.pulses, failed))
            return None
        started = time.perf_counter()
        try:
            written = await trio.to_thread.run_sync(
                self._write, writes, self._clock(), limiter=self._thread
            )
        except Exception as exc:
            # No thread to write in, or the store's thread out of memory before
            # its COMMIT (after it, the store keeps the outcomes): nothing of the
            # round is kept.
            written = dict.fromkeys(writes, _exhausted(exc, "write pulses"))
        self._count(writes, written, time.perf_counter() - started)
        # Replies go out only now, after the transaction is durable.
        starts = dict.fromkeys(writes, 0)
        for request in group:
            answer: Written = {}
            for partition, pulses in request.pulses.items():
                outcomes = written[partition]
                if isinstance(outcomes, StoreError):
                    answer[partition] = outcomes
                    continue
                start = starts[partition]
                answer[partition] = outcomes[start : start + len(pulses)]
                starts[partition] = start + len(pulses)
            request.reply.send(answer)
        return next((w for w in written.values() if isinstance(w, StoreBusy)), None)

    def _count(
        self, writes: dict[int, tuple[list[Pulse], bytes, bool]], written: Written, seconds: float
    ) -> None:
        """Count a round's writes: only what the store kept is written.

        A failed write keeps nothing (its request is answered 503); counting its
        pulses as written made a full disk look like a busy, healthy store.
        """
        failed = {p for p, outcome in written.items() if isinstance(outcome, StoreError)}
        if failed:
            self._failed_transactions += 1
        if len(failed) < len(written):
            self._transactions += 1
            self._last_group = sum(len(w[0]) for p, w in writes.items() if p not in failed)
            self._pulses_written += self._last_group
            self._transaction_seconds += seconds

    def _write(self, writes: dict[int, tuple[list[Pulse], bytes, bool]], now_us: int) -> Written:
        """In a worker thread: each partition's write, all in one `writing_together`.

        Each write's failure is its own; if the block fails, every write in it does.
        """
        written: Written = {}
        try:
            with self._store.writing_together():
                for partition, (pulses, encoded, ids) in writes.items():
                    try:
                        written[partition] = self._store.write_pulses(
                            partition, pulses, now_us, encoded, ids
                        )
                    except StoreError as exc:
                        written[partition] = exc
        except StoreError as exc:  # what they did together did not last, or may not
            for partition in writes:
                if not isinstance(written.get(partition), StoreError):
                    written[partition] = exc
        for partition, outcome in written.items():
            if isinstance(outcome, StoreError):
                fields = {"partition": partition, "error": str(outcome)}
                _failures.warning(type(outcome).__name__, "write failed", fields)
        return written

    async def _commit(self, message: Commit) -> StoreBusy | None:
        """Commit one partition's day; the StoreBusy it failed with, if it did."""
        try:
            batches = await trio.to_thread.run_sync(
                self._store.commit_day,
                message.partition,
                message.day,
                message.now_us,
                message.max_records,
                message.max_bytes,
                limiter=self._thread,
            )
        except StoreError as exc:
            message.reply.fail(exc)
            return exc if isinstance(exc, StoreBusy) else None
        except Exception as exc:
            message.reply.fail(_exhausted(exc, "commit"))
            return None
        message.reply.send(batches)
        return None


def _refuse(step: Commit | list[Ingest], busy: StoreBusy) -> None:
    """Answer `busy` to a commit, or to each request of a round, without writing."""
    if isinstance(step, Commit):
        step.reply.fail(busy)
        return
    for request in step:
        request.reply.send(dict.fromkeys(request.pulses, busy))


def _exhausted(exc: Exception, what: str) -> StoreError:
    """`exc`, raised by a call to the store's thread, as the StoreError its callers
    get, if the process ran out of threads or memory: the shard goes on, where
    this ended the process. Any other error is a defect, raised again: the
    process ends, and its supervisor starts it again."""
    exhausted = out_of_resources(exc)
    if exhausted is None:
        raise exc
    log.error(f"{what} failed", extra={"fields": {"error": repr(exc)}})
    return StoreError(f"{what}: {exhausted}")
