"""The shard actor: group commit, replies only after the write, failures isolated."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from ingestor import shard as shard_module
from ingestor.errors import Draining, StoreError, StoreFull
from ingestor.model import Outcome, Pulse
from ingestor.shard import Ingest, Replies, Reply, Shard, WriteLane
from ingestor.store.sqlite import SQLiteStore

NOW = 1_795_000_000_000_000


def make_pulse(n: int, *, tenant: str = "t1", pulse_id: str | None = None) -> Pulse:
    return Pulse(
        tenant, "sku", "unit", n * 1_000_000_000, pulse_id or f"id{n}", pulse_id is not None,
        NOW, "2026-11-28", b"fp%d" % n,
    )


class HeldStore:
    """A real SQLite store whose writes can be held, or made to fail, by the test."""

    def __init__(self, directory: Path) -> None:
        self.inner = SQLiteStore.open(directory, partitions=1, durability="os", busy_timeout=5)
        self.calls: list[int] = []
        self.fail_next: Exception | None = None
        self.gate = trio.Event()
        self.gate.set()
        self.token = trio.lowlevel.current_trio_token()

    def write_pulses(
        self,
        partition: int,
        pulses: Sequence[Pulse],
        received_us: int,
        encoded: bytes | None = None,
    ) -> list[Outcome]:
        trio.from_thread.run(self.gate.wait, trio_token=self.token)
        self.calls.append(len(pulses))
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        return self.inner.write_pulses(partition, pulses, received_us, encoded)

    def writing_together(self) -> AbstractContextManager[None]:
        return self.inner.writing_together()


@pytest.fixture
async def held(tmp_path: Path) -> HeldStore:
    return HeldStore(tmp_path / "store")


async def test_waiting_requests_share_one_transaction(held: HeldStore) -> None:
    shard = Shard(0, held, queue_size=16, group_max_pulses=1000)  # type: ignore[arg-type]
    held.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        first: Reply[list[Outcome]] = Reply()
        shard.submit_nowait(Ingest([make_pulse(1)], first))
        await trio.testing.wait_all_tasks_blocked()  # the shard is inside the first write
        replies = []
        for n in range(2, 7):
            reply: Reply[list[Outcome]] = Reply()
            shard.submit_nowait(Ingest([make_pulse(n), make_pulse(n + 100)], reply))
            replies.append(reply)
        await trio.testing.wait_all_tasks_blocked()
        # Nothing is answered while the transaction has not finished.
        assert not any(r._event.is_set() for r in [first, *replies])
        held.gate.set()
        assert await first.receive() == ["accepted"]
        for reply in replies:
            assert await reply.receive() == ["accepted", "accepted"]
        shard.close()
    assert held.calls == [1, 10]  # the five waiting requests went in one transaction
    stats = shard.statistics()
    assert (stats.transactions, stats.pulses_written, stats.last_group_pulses) == (2, 11, 10)


async def test_group_respects_size_cap(held: HeldStore) -> None:
    shard = Shard(0, held, queue_size=16, group_max_pulses=3)  # type: ignore[arg-type]
    held.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        replies = []
        for n in range(7):
            reply: Reply[list[Outcome]] = Reply()
            shard.submit_nowait(Ingest([make_pulse(n)], reply))
            replies.append(reply)
        held.gate.set()
        for reply in replies:
            await reply.receive()
        shard.close()
    assert held.calls == [3, 3, 1]


async def test_dedup_across_requests_of_one_group(held: HeldStore) -> None:
    shard = Shard(0, held, queue_size=16, group_max_pulses=1000)  # type: ignore[arg-type]
    held.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        a: Reply[list[Outcome]] = Reply()
        b: Reply[list[Outcome]] = Reply()
        shard.submit_nowait(Ingest([make_pulse(1, pulse_id="same")], a))
        shard.submit_nowait(Ingest([make_pulse(1, pulse_id="same")], b))
        held.gate.set()
        assert await a.receive() == ["accepted"]
        assert await b.receive() == ["duplicate"]
        shard.close()


async def test_store_failure_fails_the_group_and_the_shard_goes_on(held: HeldStore) -> None:
    shard = Shard(0, held, queue_size=16, group_max_pulses=1000)  # type: ignore[arg-type]
    held.fail_next = StoreFull("disk full")
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        failed: Reply[list[Outcome]] = Reply()
        shard.submit_nowait(Ingest([make_pulse(1, pulse_id="x")], failed))
        with pytest.raises(StoreFull):
            await failed.receive()
        retried: Reply[list[Outcome]] = Reply()
        shard.submit_nowait(Ingest([make_pulse(1, pulse_id="x")], retried))
        # The failed write kept nothing, so the retry is accepted, not a duplicate.
        assert await retried.receive() == ["accepted"]
        shard.close()
    day = dt.date(2026, 11, 28).isoformat()
    assert held.inner.open_days(0) == [day]


async def test_closed_shard_refuses_with_draining(held: HeldStore) -> None:
    shard = Shard(0, held, queue_size=1, group_max_pulses=10)  # type: ignore[arg-type]
    shard.close()
    with pytest.raises(Draining):
        shard.submit_nowait(Ingest([], Reply()))
    with pytest.raises(Draining):
        await shard.submit(Ingest([], Reply()))


async def test_queued_messages_are_finished_after_close(held: HeldStore) -> None:
    shard = Shard(0, held, queue_size=8, group_max_pulses=1)  # type: ignore[arg-type]
    replies = []
    for n in range(5):
        reply: Reply[list[Outcome]] = Reply()
        shard.submit_nowait(Ingest([make_pulse(n)], reply))
        replies.append(reply)
    shard.close()
    await shard.run()  # returns once the queue is drained
    for reply in replies:
        assert await reply.receive() == ["accepted"]


# --- the write lane ---------------------------------------------------------


class LaneWrites:
    """Writes for a lane: "a" holds its thread until `gate` is set; "bad" fails."""

    def __init__(self) -> None:
        self.entered = trio.Event()
        self.gate = trio.Event()
        self.token = trio.lowlevel.current_trio_token()
        self.ran: list[str] = []

    def __call__(self, name: str) -> str:
        if name == "a":
            trio.from_thread.run_sync(self.entered.set, trio_token=self.token)
            trio.from_thread.run(self.gate.wait, trio_token=self.token)
        self.ran.append(name)
        if name == "bad":
            raise StoreFull("disk full")
        return name.upper()


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The names of the writes each worker-thread hop of a lane ran."""
    seen: list[list[str]] = []
    run_jobs = shard_module._run_jobs

    def counted(jobs: list[Any], together: Any) -> None:
        seen.append([job.args[0] for job in jobs])
        run_jobs(jobs, together)

    monkeypatch.setattr(shard_module, "_run_jobs", counted)
    return seen


async def test_lane_takes_the_writes_that_wait_meanwhile_in_one_hop(
    hops: list[list[str]],
) -> None:
    lane, writes = WriteLane(), LaneWrites()
    results: dict[str, str] = {}

    async def call(name: str) -> None:
        results[name] = await lane.run(writes, name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, "a")
        await writes.entered.wait()
        for name in "bcd":
            nursery.start_soon(call, name)
        await trio.testing.wait_all_tasks_blocked()
        waiting = (list(hops), dict(results))
        writes.gate.set()
    # b, c and d waited for the lane, not in threads of their own:
    assert waiting == ([["a"]], {})
    assert len(hops) == 2
    assert sorted(hops[1]) == ["b", "c", "d"]
    assert writes.ran == ["a", *hops[1]]  # one after another, in the order they queued
    assert results == {"a": "A", "b": "B", "c": "C", "d": "D"}


async def outcomes_of(lane: WriteLane, writes: LaneWrites, *names: str) -> dict[str, object]:
    """Each named write's result or error, the writes started together."""
    outcomes: dict[str, object] = {}

    async def call(name: str) -> None:
        try:
            outcomes[name] = await lane.run(writes, name)
        except StoreError as exc:
            outcomes[name] = exc

    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(call, name)
    return outcomes


async def test_lane_failure_is_only_its_own_writes(hops: list[list[str]]) -> None:
    lane, writes = WriteLane(), LaneWrites()
    writes.gate.set()
    outcomes = await outcomes_of(lane, writes, "x", "bad", "y")
    assert len(hops) == 1
    assert sorted(hops[0]) == ["bad", "x", "y"]
    assert outcomes["x"] == "X"
    assert outcomes["y"] == "Y"
    assert isinstance(outcomes["bad"], StoreFull)
    # The lane goes on.
    assert await lane.run(writes, "z") == "Z"


async def test_lane_writes_fail_together_when_what_holds_them_fails() -> None:
    """The store's `writing_together` failing (its COMMIT, say) undoes every write
    in it: each caller gets that error, and a write that failed keeps its own."""
    ended: list[str] = []

    @contextlib.contextmanager
    def together() -> Iterator[None]:
        yield
        ended.append("commit")
        raise StoreError("the round did not commit")

    lane, writes = WriteLane(together), LaneWrites()
    writes.gate.set()
    outcomes = await outcomes_of(lane, writes, "x", "bad", "y")
    assert ended == ["commit"]  # one hop, one round
    assert sorted(writes.ran) == ["bad", "x", "y"]
    assert isinstance(outcomes["bad"], StoreFull)
    for name in ("x", "y"):
        assert isinstance(outcomes[name], StoreError)
        assert not isinstance(outcomes[name], StoreFull)
        assert "did not commit" in str(outcomes[name])


async def test_lane_finishes_a_write_whose_caller_is_cancelled() -> None:
    """Like trio.to_thread.run_sync: a write that was handed over is finished and
    its result returned, so a shard never loses track of what it wrote."""
    lane, writes = WriteLane(), LaneWrites()
    results: dict[str, str] = {}

    async def call(name: str, scope: trio.CancelScope) -> None:
        with scope:
            results[name] = await lane.run(writes, name)

    async with trio.open_nursery() as nursery:
        first, second = trio.CancelScope(), trio.CancelScope()
        nursery.start_soon(call, "a", first)
        await writes.entered.wait()
        nursery.start_soon(call, "b", second)  # waits for the lane
        await trio.testing.wait_all_tasks_blocked()
        first.cancel()
        second.cancel()
        await trio.testing.wait_all_tasks_blocked()
        before = dict(results)
        writes.gate.set()
    assert before == {}  # still running, or waiting to run: not abandoned
    assert results == {"a": "A", "b": "B"}
    assert writes.ran == ["a", "b"]


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
