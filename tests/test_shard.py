"""The shard actor: group commit, replies only after the write, failures isolated."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

from ingestor.errors import Draining, Overloaded, StoreBusy, StoreError, StoreFull
from ingestor.logs import HUSH_S, Hushed
from ingestor.model import BatchSummary, Outcome, Pulse, join_encoded
from ingestor.shard import Commit, Ingest, Replies, Reply, Shard, Written
from ingestor.store.sqlite import SQLiteStore

NOW = 1_795_000_000_000_000


def make_pulse(n: int, *, tenant: str = "t1", pulse_id: str | None = None) -> Pulse:
    return Pulse(
        tenant,
        "sku",
        "unit",
        n * 1_000_000_000,
        pulse_id or f"id{n}",
        pulse_id is not None,
        NOW,
        "2026-11-28",
        b"fp%d" % n,
    )


class HeldStore:
    """A real SQLite store whose writes can be held, or made to fail, by the test."""

    def __init__(self, directory: Path) -> None:
        self.inner = SQLiteStore.open(directory, partitions=4, durability="os", busy_timeout=5)
        self.calls: list[int] = []
        self.written: list[tuple[int, list[str]]] = []  # (partition, pulse ids) a call
        self.rounds: list[list[int]] = []  # the partitions each writing_together wrote
        self.fail_next: Exception | None = None
        self.fail_partition: tuple[int, Exception] | None = None
        self.fail_round: StoreError | None = None
        self.gate = trio.Event()
        self.gate.set()
        self.token = trio.lowlevel.current_trio_token()

    def write_pulses(
        self,
        partition: int,
        pulses: Sequence[Pulse],
        received_us: int,
        encoded: bytes | None = None,
        ids: bool = True,
    ) -> list[Outcome]:
        trio.from_thread.run(self.gate.wait, trio_token=self.token)
        self.calls.append(len(pulses))
        self.written.append((partition, [p.pulse_id for p in pulses]))
        self.rounds[-1].append(partition)
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        if self.fail_partition is not None and self.fail_partition[0] == partition:
            raise self.fail_partition[1]
        return self.inner.write_pulses(partition, pulses, received_us, encoded, ids)

    def commit_day(
        self, partition: int, day: str, now_us: int, max_records: int, max_bytes: int
    ) -> list[BatchSummary]:
        return self.inner.commit_day(partition, day, now_us, max_records, max_bytes)

    @contextlib.contextmanager
    def writing_together(self) -> Iterator[None]:
        self.rounds.append([])
        with self.inner.writing_together():
            yield
            if self.fail_round is not None:
                raise self.fail_round


@pytest.fixture
async def held(tmp_path: Path) -> HeldStore:
    return HeldStore(tmp_path / "store")


def ingest(reply: Reply[Written], *pulses: Pulse, partition: int = 0) -> Ingest:
    return Ingest({partition: list(pulses)}, reply)


async def outcomes(reply: Reply[Written], partition: int = 0) -> list[Outcome]:
    written = (await reply.receive())[partition]
    if isinstance(written, StoreError):
        raise written
    return written


async def test_waiting_requests_share_one_transaction(held: HeldStore) -> None:
    shard = Shard(0, [0], held, queue_size=16, group_max_pulses=1000)  # type: ignore[arg-type]
    held.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        first: Reply[Written] = Reply()
        shard.submit_nowait(ingest(first, make_pulse(1)))
        await trio.testing.wait_all_tasks_blocked()  # the shard is inside the first write
        replies = []
        for n in range(2, 7):
            reply: Reply[Written] = Reply()
            shard.submit_nowait(ingest(reply, make_pulse(n), make_pulse(n + 100)))
            replies.append(reply)
        await trio.testing.wait_all_tasks_blocked()
        # Nothing is answered while the transaction has not finished.
        assert not any(r._event.is_set() for r in [first, *replies])
        held.gate.set()
        assert await outcomes(first) == ["accepted"]
        for reply in replies:
            assert await outcomes(reply) == ["accepted", "accepted"]
        shard.close()
    assert held.calls == [1, 10]  # the five waiting requests went in one transaction
    stats = shard.statistics()
    assert (stats.transactions, stats.pulses_written, stats.last_group_pulses) == (2, 11, 10)


async def test_group_respects_size_cap(held: HeldStore) -> None:
    shard = Shard(0, [0], held, queue_size=16, group_max_pulses=3)  # type: ignore[arg-type]
    held.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        replies = []
        for n in range(7):
            reply: Reply[Written] = Reply()
            shard.submit_nowait(ingest(reply, make_pulse(n)))
            replies.append(reply)
        held.gate.set()
        for reply in replies:
            await outcomes(reply)
        shard.close()
    assert held.calls == [3, 3, 1]


async def test_dedup_across_requests_of_one_group(held: HeldStore) -> None:
    shard = Shard(0, [0], held, queue_size=16, group_max_pulses=1000)  # type: ignore[arg-type]
    held.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        a: Reply[Written] = Reply()
        b: Reply[Written] = Reply()
        shard.submit_nowait(ingest(a, make_pulse(1, pulse_id="same")))
        shard.submit_nowait(ingest(b, make_pulse(1, pulse_id="same")))
        held.gate.set()
        assert await outcomes(a) == ["accepted"]
        assert await outcomes(b) == ["duplicate"]
        shard.close()


async def test_store_failure_fails_the_group_and_the_shard_goes_on(held: HeldStore) -> None:
    shard = Shard(0, [0], held, queue_size=16, group_max_pulses=1000)  # type: ignore[arg-type]
    held.fail_next = StoreFull("disk full")
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        failed: Reply[Written] = Reply()
        shard.submit_nowait(ingest(failed, make_pulse(1, pulse_id="x")))
        with pytest.raises(StoreFull):
            await outcomes(failed)
        retried: Reply[Written] = Reply()
        shard.submit_nowait(ingest(retried, make_pulse(1, pulse_id="x")))
        # The failed write kept nothing, so the retry is accepted, not a duplicate.
        assert await outcomes(retried) == ["accepted"]
        shard.close()
    day = dt.date(2026, 11, 28).isoformat()
    assert held.inner.open_days(0) == [day]


async def test_requests_waiting_behind_a_round_that_found_the_store_busy_are_refused(
    held: HeldStore,
) -> None:
    """A round waits up to the busy timeout for another process's lock and
    fails StoreBusy. What came meanwhile is refused busy too, unwritten.
    Was: taken into the next round, it waited a busy timeout more, up to
    twice the `store_busy_timeout` a request waits at most (4.1 s with 2 s,
    a PostgreSQL partition held by an instance that had stopped: see
    tests/e2e/test_frozen_adversarial.py). The shard then goes on."""
    shard = Shard(0, [0], held, queue_size=16, group_max_pulses=1)  # type: ignore[arg-type]
    held.gate = trio.Event()
    held.fail_next = StoreBusy("the store stayed locked by another process")
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        first: Reply[Written] = Reply()
        shard.submit_nowait(ingest(first, make_pulse(1)))
        await trio.testing.wait_all_tasks_blocked()  # the shard waits in the first round
        waiting: list[Reply[Written]] = []
        for n in range(2, 5):
            reply: Reply[Written] = Reply()
            shard.submit_nowait(ingest(reply, make_pulse(n)))
            waiting.append(reply)
        committed: Reply[list[BatchSummary]] = Reply()
        await shard.submit(Commit(0, "2026-11-28", NOW, 100, committed))
        held.gate.set()
        for reply in [first, *waiting]:
            with pytest.raises(StoreBusy):
                await outcomes(reply)
        with pytest.raises(StoreBusy):
            await committed.receive()
        assert held.calls == [1]  # only the first round wrote
        assert shard.statistics().queued == 0
        later: Reply[Written] = Reply()
        shard.submit_nowait(ingest(later, make_pulse(9)))
        assert await outcomes(later) == ["accepted"]
        shard.close()


async def test_out_of_memory_joining_a_round_fails_it_and_the_shard_goes_on(
    held: HeldStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: a MemoryError while the round's log rows were joined, before its
    write, escaped the shard and ended the process (a worker short of memory,
    tests/faults/test_workers_exhaustion.py)."""
    shard = Shard(0, [0], held, queue_size=16, group_max_pulses=1000)  # type: ignore[arg-type]
    joins: list[int] = []

    def join(parts: Sequence[bytes]) -> bytes:
        joins.append(len(parts))
        if len(joins) == 1:
            raise MemoryError
        return join_encoded(parts)

    monkeypatch.setattr("ingestor.shard.join_encoded", join)
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        failed: Reply[Written] = Reply()
        shard.submit_nowait(ingest(failed, make_pulse(1, pulse_id="x")))
        with pytest.raises(StoreError, match="out of memory"):
            await outcomes(failed)
        retried: Reply[Written] = Reply()
        shard.submit_nowait(ingest(retried, make_pulse(1, pulse_id="x")))
        assert await outcomes(retried) == ["accepted"]  # nothing of the failed one kept
        shard.close()
    assert held.calls == [1]  # the failed round wrote nothing


async def test_closed_shard_refuses_with_draining(held: HeldStore) -> None:
    shard = Shard(0, [0], held, queue_size=1, group_max_pulses=10)  # type: ignore[arg-type]
    shard.close()
    with pytest.raises(Draining):
        shard.submit_nowait(ingest(Reply(), make_pulse(1)))
    with pytest.raises(Draining):
        await shard.submit(Commit(0, "2026-11-28", NOW, 10, Reply()))


async def test_queued_messages_are_finished_after_close(held: HeldStore) -> None:
    shard = Shard(0, [0], held, queue_size=8, group_max_pulses=1)  # type: ignore[arg-type]
    replies = []
    for n in range(5):
        reply: Reply[Written] = Reply()
        shard.submit_nowait(ingest(reply, make_pulse(n)))
        replies.append(reply)
    shard.close()
    await shard.run()  # returns once the queue is drained
    for reply in replies:
        assert await outcomes(reply) == ["accepted"]


# --- a shard of several partitions ------------------------------------------


async def test_a_round_writes_every_waiting_partition_once_in_one_block(
    held: HeldStore,
) -> None:
    """Each partition's pulses of all the waiting messages go in one write, and
    every partition's write in one `writing_together`."""
    shard = Shard(0, [0, 1, 2, 3], held, queue_size=16, group_max_pulses=1000)  # type: ignore[arg-type]
    held.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        first: Reply[Written] = Reply()
        shard.submit_nowait(ingest(first, make_pulse(1), partition=3))
        await trio.testing.wait_all_tasks_blocked()  # the shard is inside the first write
        a: Reply[Written] = Reply()
        b: Reply[Written] = Reply()
        shard.submit_nowait(Ingest({1: [make_pulse(2)], 2: [make_pulse(3), make_pulse(4)]}, a))
        shard.submit_nowait(Ingest({2: [make_pulse(5)], 0: [make_pulse(6)]}, b))
        held.gate.set()
        assert await a.receive() == {1: ["accepted"], 2: ["accepted", "accepted"]}
        assert await b.receive() == {2: ["accepted"], 0: ["accepted"]}
        shard.close()
    assert [sorted(partitions) for partitions in held.rounds] == [[3], [0, 1, 2]]
    assert sorted(held.written[1:]) == [(0, ["id6"]), (1, ["id2"]), (2, ["id3", "id4", "id5"])]
    stats = shard.statistics()
    assert (stats.transactions, stats.pulses_written, stats.last_group_pulses) == (2, 6, 5)


async def test_a_round_looks_ids_up_if_any_of_its_messages_has_some(held: HeldStore) -> None:
    """A message without client ids (`ids=False`) joined in one write with one
    that has them: the write still finds the repeated id."""
    shard = Shard(0, [0], held, queue_size=16, group_max_pulses=1000)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        first: Reply[Written] = Reply()
        shard.submit_nowait(ingest(first, make_pulse(1, pulse_id="k")))
        assert await outcomes(first) == ["accepted"]
        held.gate = trio.Event()
        holder: Reply[Written] = Reply()
        shard.submit_nowait(ingest(holder, make_pulse(2)))
        await trio.testing.wait_all_tasks_blocked()  # the shard is inside that write
        plain: Reply[Written] = Reply()
        again: Reply[Written] = Reply()
        shard.submit_nowait(Ingest({0: [make_pulse(3)]}, plain, ids=False))
        shard.submit_nowait(ingest(again, make_pulse(1, pulse_id="k")))
        held.gate.set()
        assert await outcomes(holder) == ["accepted"]
        assert await outcomes(plain) == ["accepted"]
        assert await outcomes(again) == ["duplicate"]
        shard.close()
    assert held.written[-1] == (0, ["id3", "k"])  # the two went in one write


async def test_a_partition_whose_write_fails_fails_alone(held: HeldStore) -> None:
    shard = Shard(0, [0, 1], held, queue_size=16, group_max_pulses=1000)  # type: ignore[arg-type]
    held.fail_partition = (1, StoreFull("disk full"))
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        reply: Reply[Written] = Reply()
        shard.submit_nowait(Ingest({0: [make_pulse(1)], 1: [make_pulse(2)]}, reply))
        written = await reply.receive()
        assert written[0] == ["accepted"]
        assert isinstance(written[1], StoreFull)
        held.fail_partition = None
        again: Reply[Written] = Reply()  # the shard goes on
        shard.submit_nowait(ingest(again, make_pulse(3, tenant="t9"), partition=1))
        assert await outcomes(again, 1) == ["accepted"]
        shard.close()
    assert held.inner.open_days(0) == held.inner.open_days(1) == ["2026-11-28"]


async def test_writes_fail_together_when_their_block_fails(held: HeldStore) -> None:
    """The store's `writing_together` failing (its COMMIT, say) undoes every write
    in it: each partition gets that error, and one that failed keeps its own."""
    shard = Shard(0, [0, 1, 2], held, queue_size=16, group_max_pulses=1000)  # type: ignore[arg-type]
    held.fail_partition = (1, StoreFull("disk full"))
    held.fail_round = StoreError("the round did not commit")
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        reply: Reply[Written] = Reply()
        pulses = {partition: [make_pulse(partition)] for partition in (0, 1, 2)}
        shard.submit_nowait(Ingest(pulses, reply))
        written = await reply.receive()
        shard.close()
    assert len(held.rounds) == 1
    assert isinstance(written[1], StoreFull)
    for partition in (0, 2):
        assert isinstance(written[partition], StoreError)
        assert not isinstance(written[partition], StoreFull)
        assert "did not commit" in str(written[partition])


async def test_a_message_takes_a_queue_slot_per_partition_it_writes(held: HeldStore) -> None:
    """Two writes per partition owned: as much waiting as a shard per partition had."""
    shard = Shard(0, [0, 1], held, queue_size=2, group_max_pulses=1000)  # type: ignore[arg-type]
    assert shard.has_room(4)
    assert not shard.has_room(5)
    shard.submit_nowait(Ingest({0: [make_pulse(1)], 1: [make_pulse(2)]}, Reply()))
    shard.submit_nowait(ingest(Reply(), make_pulse(3)))
    assert (shard.has_room(1), shard.has_room(2)) == (True, False)
    with pytest.raises(Overloaded):
        shard.submit_nowait(Ingest({0: [make_pulse(4)], 1: [make_pulse(5)]}, Reply()))
    assert shard.statistics().queued == 3
    shard.close()
    await shard.run()  # takes them all
    assert (shard.statistics().queued, shard.has_room(4)) == (0, True)


async def test_replies_wake_their_task_once_all_have_come() -> None:
    replies: Replies[str] = Replies()
    first, second, third = replies.reply(), replies.reply(), replies.reply()
    woke: list[int] = []

    async def wait() -> None:
        await replies.wait()
        woke.append(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        first.send("a")
        third.fail(StoreFull("full"))
        await trio.testing.wait_all_tasks_blocked()
        assert woke == []  # one reply is still missing
        second.send("b")
    assert woke == [1]
    assert (first.result(), second.result()) == ("a", "b")
    with pytest.raises(StoreFull):
        third.result()


async def test_replies_with_none_to_wait_for_return_at_once() -> None:
    with trio.fail_after(1):
        await Replies[str]().wait()


async def test_writes_and_commits_never_wait_for_threads_that_reads_hold(held: HeldStore) -> None:
    """Every thread trio lends by default taken (reads of a store that answers
    slowly, each waiting in a thread): a shard's writes and commits still run,
    at once. They waited for one of those threads, and requests for them."""
    shard = Shard(0, [0], held, queue_size=16, group_max_pulses=1000)  # type: ignore[arg-type]
    released = threading.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        for _ in range(int(trio.to_thread.current_default_thread_limiter().total_tokens)):
            nursery.start_soon(trio.to_thread.run_sync, released.wait)
        await trio.testing.wait_all_tasks_blocked()
        assert trio.to_thread.current_default_thread_limiter().available_tokens == 0
        try:
            with trio.fail_after(5):
                reply: Reply[Written] = Reply()
                shard.submit_nowait(ingest(reply, make_pulse(1, pulse_id="a")))
                assert await outcomes(reply) == ["accepted"]
                committed: Reply[list[BatchSummary]] = Reply()
                await shard.submit(Commit(0, "2026-11-28", NOW, 100, committed))
                assert len(await committed.receive()) == 1
        finally:
            released.set()
        shard.close()


async def test_failed_writes_are_said_once_a_kind_at_a_time_with_how_many_more(
    held: HeldStore, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database that is full or down fails every write of every partition:
    said each, two instances wrote a thousand lines in 6 s. Each kind of error
    is said at once, then once every `HUSH_S` s with how many writes
    failed so meanwhile; another kind is said at once too."""
    import ingestor.shard as module

    clock = [1000.0]
    monkeypatch.setattr(module, "_failures", Hushed(module.log, lambda: clock[0]))
    caplog.set_level(logging.WARNING, logger="ingestor.shard")
    shard = Shard(0, [0, 1], held, queue_size=16, group_max_pulses=1000)  # type: ignore[arg-type]

    async def fail_once(error: StoreError, partition: int) -> None:
        held.fail_partition = (partition, error)
        reply: Reply[Written] = Reply()
        shard.submit_nowait(ingest(reply, make_pulse(1, pulse_id="x"), partition=partition))
        with pytest.raises(type(error)):
            await outcomes(reply, partition)

    def said() -> list[tuple[str, object]]:
        lines = [r for r in caplog.records if r.getMessage() == "write failed"]
        caplog.clear()
        return [
            (r.fields["error"], r.fields.get("repeated"))  # type: ignore[attr-defined]
            for r in lines
        ]

    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        for n in range(5):
            await fail_once(StoreFull("disk full"), n % 2)
        assert said() == [("disk full", None)]
        await fail_once(StoreBusy("locked"), 1)
        assert said() == [("locked", None)]
        clock[0] += HUSH_S
        await fail_once(StoreFull("disk still full"), 0)
        assert said() == [("disk still full", 4)]
        shard.close()
