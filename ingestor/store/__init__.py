"""The store: the source of truth for pulses, buckets and the outbox.

`Store` is the interface every implementation keeps; `sqlite` is the embedded
default. Its methods block and are thread-safe per partition: callers run them
with `trio.to_thread.run_sync`, one call per batch of work, never per pulse.
Each writing method is one transaction, so a crash leaves all of it or none.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Final, Protocol

import msgspec

from ..config import Settings
from ..ledger import BATCH_MAX_BYTES
from ..model import Aggregate, BatchSummary, BatchView, Outcome, Pulse, StoredPulse

__all__ = [
    "LEAD_LAPSE",
    "AggregateQuery",
    "BatchQuery",
    "DueBatch",
    "PulseQuery",
    "Store",
    "WriterLock",
    "open_store",
]

# How long the committers' leader may go without `Store.lead_committer` before
# it loses the lead: the committer calls it every few seconds while it leads.
LEAD_LAPSE: Final = 20.0


class AggregateQuery(msgspec.Struct, frozen=True, kw_only=True):
    tenant_id: str | None = None
    tenants: tuple[str, ...] | None = None  # only these tenants' (a key's), if given: not ()
    product_sku: str | None = None
    use_unit: str | None = None
    date_from: str | None = None
    date_to: str | None = None
    status: str = "all"  # open | committed | all
    after: tuple[str, str, str, str] | None = None  # (day, tenant, sku, unit)
    limit: int = 1000


class PulseQuery(msgspec.Struct, frozen=True, kw_only=True):
    tenant_id: str
    day: str
    product_sku: str | None = None
    use_unit: str | None = None
    after: int | None = None  # the store's sequence number of the last pulse seen
    limit: int = 1000


class BatchQuery(msgspec.Struct, frozen=True, kw_only=True):
    day: str | None = None
    status: str | None = None
    after: tuple[str, str] | None = None  # (day, batch_id)
    limit: int = 100


class WriterLock(msgspec.Struct, frozen=True):
    """This process's turns at a store's writers' lock, which one process at a
    time holds: how many it took, and the seconds it waited for them and held
    them. Held nearly all the time, by all processes together, the lock is
    what bounds their writes."""

    turns: int
    wait_seconds: float
    held_seconds: float


class DueBatch(msgspec.Struct, frozen=True):
    """A pending batch whose next delivery attempt is due. Its body comes with
    its claim (`Store.claim_batch`): read with the list, every body due was
    held for a whole pass, up to 100 a partition of up to `batch_max_bytes`."""

    partition: int
    batch_id: str
    day: str
    attempts: int


class Store(Protocol):
    """What the shards, the committer, the deliverer and the API need of a store."""

    store_id: str
    partitions: int
    # How many partitions' writes are best run at once, each in its own
    # thread: the service makes a shard of each lane (see `shard`). SQLite's
    # writes are local work: one shard runs them all, and each one more only
    # adds hops and contention. A server's writes wait on the network: one
    # shard per partition.
    write_lanes: int

    def write_pulses(
        self,
        partition: int,
        pulses: Sequence[Pulse],
        received_us: int,
        encoded: bytes | None = None,
        ids: bool = True,
    ) -> list[Outcome]:
        """Dedup, store and add up `pulses` in one durable transaction.

        `encoded`, if given, is `encode_pulses(pulses)`, made by the caller
        while the pulses were fresh in its CPU's cache; a store that keeps
        that encoding may use it rather than encode them again. `ids` False says
        that no pulse has a client id (the caller saw each one): a store
        need not look for them.
        """
        ...

    def writing_together(self) -> AbstractContextManager[None]:
        """A block whose `write_pulses` calls (from this thread) may share one
        transaction: each keeps its own result, a failed one leaves nothing,
        and none is durable before the block ends; if the block fails, none is."""
        ...

    def commit_day(
        self,
        partition: int,
        day: str,
        now_us: int,
        max_records: int,
        max_bytes: int = BATCH_MAX_BYTES,
    ) -> list[BatchSummary]:
        """Turn the day's open buckets into outbox batches, in one transaction:
        each of at most `max_records` records and `max_bytes` of body."""
        ...

    def open_days(self, partition: int) -> list[str]:
        """The days that have uncommitted usage in `partition`."""
        ...

    def aggregates(self, query: AggregateQuery) -> list[Aggregate]: ...

    def pulses(self, query: PulseQuery) -> list[tuple[int, StoredPulse]]: ...

    def batches(self, query: BatchQuery) -> list[BatchView]: ...

    def batch(self, batch_id: str) -> BatchView | None: ...

    def due_batches(self, now_us: int, limit: int, latest_us: int | None = None) -> list[DueBatch]:
        """Pending batches whose next attempt is due, at most `limit` per partition.

        Due: set at `now_us` or before, or after `latest_us` (no backoff sets
        one so late: the wall clock has stepped back since).
        """
        ...

    def claim_batch(
        self, partition: int, batch_id: str, *, now_us: int, latest_us: int, lease_us: int
    ) -> bytes | None:
        """Take a batch for one delivery attempt: if it is still due (as
        `due_batches` says, at `now_us` with `latest_us`), set its next attempt
        to `lease_us` and answer its body; None if it is not, as when another
        process took it first. Until the attempt's outcome is recorded, no
        process finds it due before `lease_us`, when a sender that died has
        left it to be sent again."""
        ...

    def record_delivery(
        self,
        partition: int,
        batch_id: str,
        *,
        status: str,
        error: str | None,
        next_attempt_us: int | None,
        now_us: int,
        claimed_us: int | None = None,
        attempted: bool = True,
    ) -> None:
        """Record one delivery attempt's outcome; `attempted` False: the batch was
        claimed but not sent (its attempts are not counted up).

        `claimed_us` is the lease its `claim_batch` set. An attempt that did
        not deliver is recorded only while the batch is still under that
        lease: a sender that stopped past its lease (a paused machine) and
        then failed must not move the lease another process has taken since,
        which made the batch due again and sent twice at once. A delivery is
        recorded whoever holds the batch.
        """
        ...

    def redeliver(self, batch_id: str, now_us: int) -> bool:
        """Put a failed batch back to pending; False if it is not failed."""
        ...

    def purge(self, partition: int, before_us: int) -> int:
        """Forget pulses (and their ids) received before `before_us`.

        Returns how many stored writes (groups of pulses) were forgotten.
        Only after `announce_purge` of as much (see `Committer.purge`).
        """
        ...

    def note_zones(self, zones: Sequence[str], now_us: int, since_us: int) -> list[str]:
        """Record that an instance bills days in `zones` (IANA names) at `now_us`;
        every zone any instance on the store recorded at `since_us` or later."""
        ...

    def announce_purge(self, before_us: int) -> None:
        """Keep `before_us` as the purge horizon, if it is later than the one kept."""
        ...

    def purge_horizon(self) -> int | None:
        """The latest `announce_purge`, whichever instance made it and with
        whatever dedup window; None if none was made.

        An id received before it may be gone: a replay of its pulse would
        count again. Intake refuses pulses that old (`Rules.horizon_us`).
        """
        ...

    def lead_committer(self, lapse: float = LEAD_LAPSE) -> bool:
        """Try to become (or stay) the one committer among all instances on this store.

        Non-blocking. True while this store object holds the leadership; it is
        released when the holder closes the store or its process dies, so
        another instance takes over at its next try. A holder that calls no
        more for `lapse` seconds (its process stopped without dying, its
        machine paused or cut off) loses it too, where the store can tell.
        """
        ...

    def open_buckets(self) -> int:
        """How many buckets hold uncommitted usage (a count over a partial index)."""
        ...

    def outbox_statistics(self) -> tuple[int, int | None]:
        """(pending batches, created_at of the oldest pending one in µs)."""
        ...

    def outbox_batches(self) -> dict[str, int]:
        """How many batches wait in the outbox, by status, both keys always there:
        `pending` (for the sink) and `failed` (refused by the sink for good, for
        an operator to redeliver). A count over a partial index each."""
        ...

    def clock_offset_us(self) -> int:
        """How far the clock every instance sharing the store keeps
        (`clock.SharedClock`) is ahead of this machine's monotonic clock
        (`time.monotonic_ns`), in microseconds, within half a round trip: the
        database's for PostgreSQL; this machine's wall clock for SQLite,
        which only processes of this machine share. Raises StoreError if
        the database does not answer, or answers too slowly to tell its
        time within half a second."""
        ...

    def trouble(self) -> str | None:
        """Why this process can no longer write to the store whatever happens
        next, for /readyz (and asked every second by the service, which lets
        a store act on it idle); None while it can. Blocks: a few stats, no query,
        and, on SQLite once its files are lost, a wait for the writers' lock."""
        ...

    def writer_lock(self) -> WriterLock | None:
        """This process's turns at the store's writers' lock so far; None for a
        store whose writers take no turns (each holds the rows it writes)."""
        ...

    def close(self) -> None: ...


def open_store(settings: Settings, worker: tuple[int, int] = (0, 1)) -> Store:
    """Open (or create) the store the settings name. Blocks: call in a thread.

    `worker`: this process's (index, count) among the workers sharing it,
    which SQLite uses to share out work (see `SQLiteStore.open`).
    """
    if settings.on_postgres:
        from .postgres import PostgresStore

        return PostgresStore.open(
            settings.store,
            partitions=settings.partitions,
            pool_size=settings.store_pool_size,
            busy_timeout=settings.store_busy_timeout,
        )
    from .sqlite import SQLiteStore

    return SQLiteStore.open(
        settings.data_path / "store",
        partitions=settings.partitions,
        durability=settings.durability,
        busy_timeout=settings.store_busy_timeout,
        worker=worker,
    )
