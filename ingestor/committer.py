"""The committer: turns finished billing days into outbox batches.

Every `commit_interval` it asks the store, partition by partition, for the
days that still have uncommitted usage and commits those whose end, plus
`commit_grace`, has passed in every billing time zone in use. POST
/aggregates/commit calls `commit_day` directly. Commits run in the shards'
loops, so a commit and the pulses it covers are never interleaved within a
transaction. The timer only wakes the loop; `commit_due` does the work and
is tested on its own.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import zoneinfo
from collections.abc import Callable, Sequence

import trio

from .clock import moment, wall_clock_us
from .errors import Draining, StoreError, out_of_resources
from .ledger import BATCH_MAX_BYTES
from .logs import Hushed
from .model import BatchSummary
from .shard import Commit, Reply, Shard
from .store import Store

__all__ = ["Committer", "day_closes_at"]

log = logging.getLogger("ingestor.committer")
_store_failures = Hushed(log)  # a tick's steps failing while the store is down
_LEAD_RETRY = 5.0  # seconds between tries to take over from a lost leader
# A leader that has not told the store it leads for this many of those
# seconds loses the lead (`Store.lead_committer`'s lapse): 20 s.
_LAPSE_PINGS = 4
# How long a purge horizon is in the store before ids older than it are
# forgotten: every instance reads it at least every _LEAD_RETRY.
_ANNOUNCED_US = int(2 * _LEAD_RETRY * 1_000_000)
# How old this instance's reading of the purge horizon may be when it takes
# pulses: under the `_ANNOUNCED_US` a horizon waits before ids are forgotten.
_HORIZON_FRESH = 0.7 * _ANNOUNCED_US / 1_000_000
# The zones of every instance on the store (`note_zones`): each says its own
# at start and then every minute, and counts for ten minutes after.
_ZONES_NOTED_US = 60 * 1_000_000
_ZONES_KEPT_US = 10 * 60 * 1_000_000


def day_closes_at(day: dt.date, zones: set[dt.tzinfo]) -> dt.datetime:
    """When `day` has ended in every zone of `zones` (the latest local midnight)."""
    following = day + dt.timedelta(days=1)
    return max(dt.datetime.combine(following, dt.time(), tzinfo=z) for z in zones).astimezone(
        dt.UTC
    )


class Committer:
    def __init__(
        self,
        shards: Sequence[Shard],
        store: Store,
        *,
        zones: set[dt.tzinfo],
        interval: float,
        grace: float,
        max_records: int,
        max_bytes: int = BATCH_MAX_BYTES,
        dedup_window: float,
        on_commit: Callable[[], None] = lambda: None,
        on_horizon: Callable[[int | None], None] = lambda before_us: None,
        clock: Callable[[], int] = wall_clock_us,
    ) -> None:
        self._shards = shards
        self._store = store
        self._own_zones = zones
        self._zones = set(zones)  # and those of the other instances on the store
        self._zones_noted: int | None = None
        self._interval = interval
        self._grace = dt.timedelta(seconds=grace)
        self._max_records = max_records
        self._max_bytes = max_bytes
        self._dedup_window_us = int(dedup_window * 1_000_000)
        self._on_commit = on_commit
        self._on_horizon = on_horizon
        self._announced: collections.deque[tuple[int, int]] = collections.deque()
        self._ready: int | None = None  # the latest horizon announced long enough ago
        self._clock = clock
        self.commits = 0  # commits of a day that finished in every partition
        self.commit_failures = 0  # ... and those that failed in a partition (to retry)
        self.batches_created = 0
        self.ticks = 0
        self.leading = False
        self._horizon_read: float | None = None  # trio.current_time() of the last reading
        self._horizon_lock = trio.Lock()
        self._ticked = trio.Event()

    def now(self) -> dt.datetime:
        return moment(self._clock())

    def is_due(self, day: dt.date, now: dt.datetime) -> bool:
        return day_closes_at(day, self._zones) + self._grace <= now

    async def note_zones(self) -> None:
        """Tell the store the zones this instance bills in, and take in those of
        every instance on it: a day is due once it has ended in all of them.

        An instance in a later zone still takes pulses of a day that has
        ended here (its pulses without a timestamp fall on its own today);
        committed by this instance's zones alone, they all became corrections.
        """
        now = self._clock()
        found = await trio.to_thread.run_sync(
            self._store.note_zones,
            sorted(str(zone) for zone in self._own_zones),
            now,
            now - _ZONES_KEPT_US,
        )
        zones = set(self._own_zones)
        for name in found:
            try:
                zones.add(zoneinfo.ZoneInfo(name))
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                log.warning(
                    "an instance bills in a zone unknown here", extra={"fields": {"zone": name}}
                )
        self._zones = zones
        self._zones_noted = now

    async def commit_day(self, day: dt.date) -> list[BatchSummary]:
        """Commit every open bucket of `day`, one transaction per partition.

        Each shard is given its partitions' commits one at a time, the next
        once the last is done, so pulses that arrive meanwhile are written
        between them, not after all of them: a commit of a big day holds up
        ingest for one partition's commit at a time. Shards commit side by side.
        """
        now_us = self._clock()
        found: dict[int, list[BatchSummary]] = {}
        failure: StoreError | Draining | None = None

        async def commit(shard: Shard) -> None:
            nonlocal failure
            for partition in shard.partitions:
                reply: Reply[list[BatchSummary]] = Reply()
                try:
                    await shard.submit(
                        Commit(
                            partition,
                            day.isoformat(),
                            now_us,
                            self._max_records,
                            reply,
                            max_bytes=self._max_bytes,
                        )
                    )
                    found[partition] = await reply.receive()
                except Draining as exc:
                    failure = exc
                    return
                except StoreError as exc:
                    failure = exc

        async with trio.open_nursery() as nursery:
            for shard in self._shards:
                nursery.start_soon(commit, shard)
        batches = [batch for partition in sorted(found) for batch in found[partition]]
        # The partitions that committed made their batches even if another failed.
        self.batches_created += len(batches)
        if failure is None:
            self.commits += 1
        else:
            self.commit_failures += 1
        if batches:
            self._on_commit()
            log.info(
                "commit",
                extra={
                    "fields": {
                        "date": day.isoformat(),
                        "batches": len(batches),
                        "records": sum(b.record_count for b in batches),
                    }
                },
            )
        if failure is not None:
            # The partitions that committed keep their batches; committing
            # again finishes the rest, so the caller may simply retry.
            raise failure
        return batches

    async def commit_due(self) -> list[BatchSummary]:
        """Commit every day with open buckets whose end plus grace has passed.

        A day or a partition that fails is retried at the next tick, and does
        not hold back the others: one bad partition-day stalled every later
        day of every tenant. The first failure is raised once all are tried.
        """
        now = self.now()
        days: set[str] = set()
        failure: StoreError | None = None
        for partition in range(self._store.partitions):
            try:
                days.update(await trio.to_thread.run_sync(self._store.open_days, partition))
            except StoreError as exc:
                failure = failure or exc
        batches: list[BatchSummary] = []
        for day in sorted(days):
            if self.is_due(dt.date.fromisoformat(day), now):
                try:
                    batches.extend(await self.commit_day(dt.date.fromisoformat(day)))
                except StoreError as exc:
                    failure = failure or exc
        if failure is not None:
            raise failure
        return batches

    async def purge(self) -> int:
        """Forget pulses (and their ids) older than the dedup window.

        Announce, wait, forget. Instances sharing a store may have different
        dedup windows (a restart with another setting, or a rolling change),
        and a replay of a forgotten id would count again. So the horizon goes
        to this instance's intake and into the store first; every instance
        reads it at least every `_LEAD_RETRY` and refuses older pulses; and
        ids are forgotten up to a horizon announced `_ANNOUNCED_US` ago.
        """
        now = self._clock()
        horizon = now - self._dedup_window_us
        self._on_horizon(horizon)
        await trio.to_thread.run_sync(self._store.announce_purge, horizon)
        self._announced.append((now, horizon))
        while self._announced and self._announced[0][0] <= now - _ANNOUNCED_US:
            self._ready = self._announced.popleft()[1]
        if self._ready is None:
            return 0
        removed = 0
        for partition in range(self._store.partitions):
            removed += await trio.to_thread.run_sync(self._store.purge, partition, self._ready)
        return removed

    async def _note_zones_when_due(self) -> None:
        if self._zones_noted is None or self._clock() - self._zones_noted >= _ZONES_NOTED_US:
            try:
                await self.note_zones()
            except Exception as exc:
                _tick_failed("noting time zones", exc)

    async def wait_ticks(self, count: int) -> None:
        """Wait until the timer has fired and finished its work `count` times in all."""
        while self.ticks < count:
            await self._ticked.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Every `interval`, if this instance leads, commit the due days and purge.

        Only one instance among those sharing the store leads; the others try
        to take over every few seconds, so losing the leader moves the job
        quickly. (Committing from several instances would also be safe, as
        every commit is one transaction; leading only saves the work.) The
        leader tells the store it is there every few seconds, while it waits
        and while a tick works: one that stops without dying loses the lead
        (`Store.lead_committer`).
        """
        task_status.started()
        retry_lead = min(self._interval, _LEAD_RETRY)
        await self._note_zones_when_due()  # at start: the leader learns of this one's zones
        while True:
            if self.leading:
                await self._sleep_leading(retry_lead)
            else:
                await trio.sleep(retry_lead)
            await self._note_zones_when_due()
            # Each step apart: a failed commit does not skip the purge (the
            # log and the ids would grow), and nothing of one tick, not even
            # an error no store raises, stops the committer or the service.
            await self._lead(retry_lead)
            if self.leading:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keep_leading, retry_lead)
                    try:
                        await self.commit_due()
                    except Exception as exc:
                        _tick_failed("periodic commit", exc)
                    try:
                        await self.purge()
                    except Exception as exc:
                        _tick_failed("purge", exc)
                    nursery.cancel_scope.cancel()
            await self._read_horizon()
            self.ticks += 1
            self._ticked.set()
            self._ticked = trio.Event()

    async def _lead(self, every: float) -> None:
        """Lead, or go on leading, if the store agrees; the caller asks again
        within `every` seconds while it leads."""
        try:
            self.leading = await trio.to_thread.run_sync(
                self._store.lead_committer, _LAPSE_PINGS * every
            )
        except Exception as exc:
            self.leading = False
            _tick_failed("leading", exc)

    async def _keep_leading(self, every: float) -> None:
        """While a tick works, tell the store every `every` seconds that this
        instance still leads. Told only between ticks, a leader whose tick
        outlasted the lapse (a partition at a time over a link of 400 ms round
        trips: 23 s) had its session ended by the server, and the lead went
        back and forth between instances over a link that was only slow.
        It reads the purge horizon as often, as between ticks."""
        while True:
            await trio.sleep(every)
            await self._lead(every)
            await self._read_horizon()

    async def _sleep_leading(self, every: float) -> None:
        """The leader's wait for its next tick, `interval`: it tells the store it
        leads every `every` seconds meanwhile, and stops waiting once it no
        longer does (during a tick, `_keep_leading` tells it). Losing the lead
        only moves the work: commits and purges are safe from several
        instances."""
        deadline = trio.current_time() + self._interval
        while self.leading and trio.current_time() + every < deadline:
            await trio.sleep(every)
            await self._lead(every)
            await self._read_horizon()
        if self.leading:
            await trio.sleep_until(deadline)

    async def _read_horizon(self) -> None:
        """Take in the store's purge horizon: another instance's purge, maybe
        with a shorter dedup window, forgets ids `_ANNOUNCED_US` after it
        announced it."""
        try:
            self._on_horizon(await trio.to_thread.run_sync(self._store.purge_horizon))
        except Exception as exc:
            _tick_failed("reading how far purges reach", exc)
        else:
            self._horizon_read = trio.current_time()

    async def fresh_horizon(self) -> None:
        """Make sure the purge horizon intake checks was read lately, reading it
        now if not. Raises StoreError if the store cannot say.

        The ticks read it every few seconds; a process that stopped without
        dying (a paused container or VM) read none meanwhile, and once going
        again it took the requests already waiting with what it knew before:
        replays of ids forgotten while it was stopped counted twice.
        """
        if self._stale():
            async with self._horizon_lock:
                if self._stale():
                    self._on_horizon(await trio.to_thread.run_sync(self._store.purge_horizon))
                    self._horizon_read = trio.current_time()

    def _stale(self) -> bool:
        read = self._horizon_read
        return read is None or trio.current_time() - read > _HORIZON_FRESH


def _tick_failed(what: str, exc: Exception) -> None:
    fields = {"error": str(exc) or repr(exc)}
    if isinstance(exc, StoreError) or out_of_resources(exc) is not None:
        # Said in one line, once in a while: the next tick tries again, as
        # the deliverer does, and a store that is down fails every one.
        _store_failures.warning((what, type(exc).__name__), f"{what} failed", fields)
    else:
        log.exception(f"{what} failed", extra={"fields": fields})
