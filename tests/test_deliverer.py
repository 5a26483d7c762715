"""The deliverer: retries with backoff, failed batches, redelivery."""

from __future__ import annotations

import datetime as dt
import itertools
import random
import threading
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from quart.typing import TestClientProtocol as Client

from ingestor.deliverer import backoff
from ingestor.errors import SinkRejected, SinkRetryable, StoreError
from ingestor.runtime import Runtime
from ingestor.sinks.memory import MemorySink

from .conftest import FakeClock, pulse
from .support.server import wait_until


@given(
    attempt=st.integers(1, 200),
    initial=st.floats(0.01, 10),
    cap=st.floats(10, 3600),
    seed=st.integers(0, 2**32),
)
def test_backoff_is_capped_exponential_with_jitter(
    attempt: int, initial: float, cap: float, seed: int
) -> None:
    delay = backoff(attempt, initial, cap, random.Random(seed))
    ceiling = min(cap, initial * 2 ** (attempt - 1))
    assert ceiling / 2 <= delay <= ceiling


def test_backoff_spreads_retries() -> None:
    rng = random.Random(7)
    delays = {round(backoff(5, 1, 300, rng), 3) for _ in range(50)}
    assert len(delays) > 40


async def committed_batch(client: Client, runtime: Runtime) -> str:
    response = await client.post("/pulses", json=pulse())
    assert response.status_code == 202
    result = await (await client.post("/aggregates/commit", json={"date": "2026-11-28"})).get_json()
    [batch] = result["batches"]
    return str(batch["batch_id"])


async def view(client: Client, batch_id: str) -> dict[str, Any]:
    body: dict[str, Any] = await (await client.get(f"/batches/{batch_id}")).get_json()
    return body


@pytest.mark.parametrize("settings_overrides", [{"retry_initial": 10, "retry_max": 60}])
async def test_retryable_failure_stays_pending_until_it_succeeds(
    client: Client, runtime: Runtime, sink: MemorySink, clock: FakeClock
) -> None:
    sink.fail_with(SinkRetryable("HTTP 503"), times=2)
    sink.block()
    batch_id = await committed_batch(client, runtime)
    sink.unblock()
    await runtime.deliverer.deliver_due()
    state = await view(client, batch_id)
    assert (state["status"], state["attempts"], state["last_error"]) == ("pending", 1, "HTTP 503")
    assert batch_id not in sink.delivered
    # Not due yet: nothing is attempted until the backoff has passed.
    assert await runtime.deliverer.deliver_due() == 0
    clock.advance(10)
    assert await runtime.deliverer.deliver_due() == 1
    assert (await view(client, batch_id))["attempts"] == 2
    clock.advance(20)
    await runtime.deliverer.deliver_due()
    state = await view(client, batch_id)
    assert (state["status"], state["attempts"]) == ("delivered", 3)
    assert state["delivered_at"] is not None
    assert batch_id in sink.delivered
    assert runtime.deliverer.retried == 2


@pytest.mark.parametrize("settings_overrides", [{"retry_initial": 0.1, "retry_max": 60}])
@pytest.mark.parametrize("asked_waited", [(30, 30), (600, 60), (0, None)])
async def test_a_retry_waits_what_the_receiver_asked_up_to_retry_max(
    client: Client,
    runtime: Runtime,
    sink: MemorySink,
    clock: FakeClock,
    asked_waited: tuple[float, float | None],
) -> None:
    """A receiver's Retry-After is the least the next attempt waits (a billing
    system rate-limiting, 429 Retry-After: 30, was tried again 0.1 s later and
    every few seconds after), but no more than retry_max; shorter than the
    backoff, the backoff stands."""
    asked, waited = asked_waited
    sink.fail_with(SinkRetryable("HTTP 429", retry_after=asked))
    sink.block()
    batch_id = await committed_batch(client, runtime)
    sink.unblock()
    await runtime.deliverer.deliver_due()
    state = await view(client, batch_id)
    assert (state["status"], state["attempts"]) == ("pending", 1), state
    wait = (dt.datetime.fromisoformat(state["next_attempt_at"]) - clock.now).total_seconds()
    if waited is None:
        assert 0.05 <= wait <= 0.1, wait  # the backoff of a first retry
    else:
        assert wait == pytest.approx(waited, abs=0.001), wait
        clock.advance(waited - 1)
        assert await runtime.deliverer.deliver_due() == 0
    clock.advance(1)
    await runtime.deliverer.deliver_due()
    assert (await view(client, batch_id))["status"] == "delivered"


async def test_rejected_batch_is_failed_and_can_be_redelivered(
    client: Client, runtime: Runtime, sink: MemorySink, clock: FakeClock
) -> None:
    sink.fail_with(SinkRejected("HTTP 400: bad schema"))
    sink.block()
    batch_id = await committed_batch(client, runtime)
    sink.unblock()
    await runtime.deliverer.deliver_due()
    state = await view(client, batch_id)
    assert (state["status"], state["last_error"]) == ("failed", "HTTP 400: bad schema")
    failed = await (await client.get("/batches?status=failed")).get_json()
    assert [b["batch_id"] for b in failed["batches"]] == [batch_id]
    clock.advance(3600)
    assert await runtime.deliverer.deliver_due() == 0  # failed batches wait for an operator
    assert await trio.to_thread.run_sync(runtime.store.redeliver, batch_id, clock())
    assert not await trio.to_thread.run_sync(runtime.store.redeliver, batch_id, clock())
    await runtime.deliverer.deliver_due()
    assert (await view(client, batch_id))["status"] == "delivered"


@pytest.mark.parametrize("settings_overrides", [{"sink_timeout": 0.1}])
async def test_a_delivery_that_never_ends_is_cut_before_its_claim_runs_out(
    client: Client, runtime: Runtime, sink: MemorySink, clock: FakeClock
) -> None:
    """Each sink bounds a delivery by the sink timeout; one that does not end
    (nats-py once went on connecting for ever) is cut 1 s before the claim's
    lease ends and retried: the pass waited on it, and with it every batch."""
    sink.block()
    batch_id = await committed_batch(client, runtime)  # the service's deliverer takes it
    lease = 2 * 0.1 + 5  # the lease the service gives a claim, in s of `clock`
    started = trio.current_time()
    with trio.fail_after(30):
        await runtime.deliverer.deliver_due()  # after the pass that has the batch
    waited = trio.current_time() - started
    state = await view(client, batch_id)
    assert (state["status"], state["attempts"]) == ("pending", 1), state
    assert "memory sink did not end the delivery within 4.2 s" in state["last_error"], state
    assert waited < lease, waited  # `clock` stands still: the cut comes at lease - 1 s
    assert batch_id not in sink.delivered
    sink.unblock()
    clock.advance(60)
    await runtime.deliverer.deliver_due()
    assert (await view(client, batch_id))["status"] == "delivered"
    assert sink.attempts == [batch_id, batch_id]


@pytest.mark.parametrize("settings_overrides", [{"sink_timeout": 0.1}])
async def test_a_wall_clock_stepping_as_a_batch_is_claimed_does_not_cut_its_delivery(
    client: Client, runtime: Runtime, sink: MemorySink, clock: FakeClock
) -> None:
    """The wall clock steps 2.5 s forward at each reading the deliverer makes (NTP
    at work). A claim's lease is 5.2 s here, and a claim is sent on only while
    2.6 s of it are left: after one step 2.7 s are, so the batch is sent, its
    delivery bounded from there on trio's clock. Read again to bound the
    delivery, the clock put the end of the claim behind it: the delivery was
    cut at once and sent again later (a batch delivered in two attempts, seen
    under a stepped clock)."""
    steps = itertools.count()
    runtime.deliverer._clock = lambda: clock() + next(steps) * 2_500_000
    batch_id = await committed_batch(client, runtime)  # the service's deliverer takes it

    async def ended() -> dict[str, Any] | None:
        state = await view(client, batch_id)
        return state if state["status"] != "pending" or state["attempts"] else None

    state = await wait_until(ended, within=10, what="the attempt recorded")
    assert (state["status"], state["attempts"], state["last_error"]) == ("delivered", 1, None)
    assert sink.attempts == [batch_id]


async def test_outbox_statistics_track_pending(
    client: Client, runtime: Runtime, sink: MemorySink, clock: FakeClock
) -> None:
    sink.block()
    await committed_batch(client, runtime)
    pending, oldest = await trio.to_thread.run_sync(runtime.store.outbox_statistics)
    assert pending == 1
    assert oldest == clock()
    sink.unblock()
    await runtime.deliverer.deliver_due()
    assert await trio.to_thread.run_sync(runtime.store.outbox_statistics) == (0, None)


async def test_deliveries_never_wait_for_threads_that_reads_hold(
    client: Client, runtime: Runtime, sink: MemorySink
) -> None:
    """Every thread trio lends by default taken (reads of a store that answers
    slowly, each waiting in a thread) while the sink holds a batch: its answer
    is still recorded at once. Waiting for one of those threads, it could go
    unrecorded past the batch's lease, and the batch be sent again."""
    sink.block()
    batch_id = await committed_batch(client, runtime)

    async def sent() -> bool:  # by the service's own deliverer
        return batch_id in sink.attempts

    await wait_until(sent, within=5, what="the batch sent")
    released = threading.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(int(trio.to_thread.current_default_thread_limiter().total_tokens)):
            nursery.start_soon(trio.to_thread.run_sync, released.wait)
        await trio.testing.wait_all_tasks_blocked()
        assert trio.to_thread.current_default_thread_limiter().available_tokens == 0
        sink.unblock()
        try:
            with trio.fail_after(5):
                # Waits for the pass that sent it, its outcome recorded; then
                # finds nothing due.
                assert await runtime.deliverer.deliver_due() == 0
        finally:
            released.set()
    assert sink.attempts == [batch_id]
    assert (await view(client, batch_id))["status"] == "delivered"


@pytest.mark.parametrize("failures", [1, 2, 4])
async def test_an_outcome_the_store_could_not_take_is_recorded_again_soon(
    client: Client,
    runtime: Runtime,
    sink: MemorySink,
    monkeypatch: pytest.MonkeyPatch,
    failures: int,
) -> None:
    """A database failing over ends every session as the sink's answer comes:
    the outcome is recorded again, soon and again while the store fails (here
    for 3.6 s), not left pending until the batch's lease ends (55 s with the
    default sink timeout) for the batch to be sent again. (Tried for 0.6 s,
    the fourth failure left it so.)"""
    sink.block()
    batch_id = await committed_batch(client, runtime)

    async def sent() -> bool:  # by the service's own deliverer
        return batch_id in sink.attempts

    await wait_until(sent, within=5, what="the batch sent")
    record = runtime.store.record_delivery
    tries: list[str] = []

    def failing(*args: Any, **kwargs: Any) -> None:
        tries.append(kwargs["status"])
        if len(tries) <= failures:
            raise StoreError("record delivery: lost the connection to PostgreSQL")
        record(*args, **kwargs)

    monkeypatch.setattr(runtime.store, "record_delivery", failing)
    sink.unblock()
    with trio.fail_after(10):
        await runtime.deliverer.deliver_due()  # once the pass that sent it is done
    assert tries == ["delivered"] * (failures + 1)
    assert (await view(client, batch_id))["status"] == "delivered"
    assert runtime.deliverer.unrecorded == 0
    assert sink.attempts == [batch_id]
