"""The embedded store: one SQLite file in WAL mode, holding every partition.

Layout under the store directory:

    store.sqlite       store id, partition count, schema version, and all
                       partitions' pulses, ids, buckets and outbox
    committer.lock     held by the one process that runs the committer
    merge.lock         held by the process merging recent ids into the index
    writer.lock        held by the process whose transaction is writing

Partitions are logical here: rows carry theirs (`part`), and each has its own
memory below. One file makes the writes a process has waiting one
transaction: the shard runs them in one `writing_together`, each in a
savepoint of its own (a failed write leaves nothing), and one COMMIT makes
them all durable, with one fsync. A file per partition cost one transaction
and one fsync per partition a round touched, and a 1,000-pulse request
touches all sixteen.

Pulses are kept as a log: each write appends one row holding all its
accepted pulses (`Pulse` arrays, client ids included; see `_log_row`),
and nothing else. Nothing on the write path costs a row per
pulse, nor an index entry per tenant.

The log row is also the durable record of the amounts. Bucket totals are
folded from it: the writer keeps the deltas of each partition's log tail in
memory (`pending`) and adds them to `buckets` at most every `_FOLD_AFTER_S`,
in one upsert per bucket however many pulses it got, moving the partition's
meta key `buckets_seq/<n>` (the last log row folded) in the same
transaction. Anything that reads buckets folds first (commits, purges,
reads), so the table it reads holds every acknowledged pulse, whichever
process took it; a read that cannot write the fold (a full disk) adds the
log's tail itself. An upsert of a bucket costs about 10 µs, as much as the
rest of a pulse's write: folding turns one per bucket per transaction into
one per bucket per second.

The same fold writes the `pulse_spans` of the tail, by which `GET /pulses`
finds a tenant's pulses; it reads the tail after the watermark itself. A
span is a row per (tenant, day) a fold, listing the log rows it folded
that hold that tenant's pulses of that day (`_SPAN_MAX` at most). Written
with each log row, a row per (tenant, day, log row) dirtied an index page
per tenant per write, and cost a third of a 1,000-pulse write. Sorted and
written once a second (schema 2's `pulse_days`), they still cost 2.8 µs
each, and under load every round's log row holds most of a partition's
tenants: 900 rows a fold, 3% of the server's CPU, in the round the fold
holds up. A span a fold instead: p99 34.7 → 28.0 ms (1,000-pulse arrays
without ids, 4 connections, 6 runs alternated, medians, every pair in
favour); the CPU a pulse moved less than the machine's noise.

Dedup reads two tiers. The log row is the durable record of an id: it
commits with the amounts. Ids of the log's tail live in memory (`recent`),
added only once their log row has committed. Once there are `_MERGE_AT`
of them (all partitions together: they share one index), they are merged,
sorted, into the indexed `pulse_ids` table, and the meta keys
`ids_merged_seq/<n>` record up to which log row that is done. A sorted
merge writes each index page it touches once, but once the index has more
pages than the merge has ids, that is still about a page per id: into an
index of 1,000,000 ids, merges of 5,000 cost ~23 µs an id here, of 80,000
~6.5, and a merge holds up every write while it runs (at 20,000 the soak's
p99 was 155 ms instead of 72). So a merge is planned big and run in
slices: `_MergePlan` takes a sorted snapshot of the ids waiting, once
there are 20,000 of them, or up to 160,000 while merging costs much an id
(`_next_merge_at`; the meta key `merge_at` holds it), and inserts
`_MERGE_CHUNK` of them per transaction, in key order, or more where rounds
bring more new ids (see `_merge_slice`). Each slice lands on its own
stretch of the index, as densely as the whole merge would. Into 1,000,000
ids (`bench/id_index.py`): 12.6 µs an id CPU in plans of 20,000, 11.0 in
plans of 80,000, against 22.6 for merges of 5,000. Until the last slice
commits, with the watermarks, the snapshot's ids stay in memory too; a
purge that removes ids meanwhile ends the plan (the meta key `ids_purged`
tells every process), so no slice puts back an id whose row is gone. One
process merges at a time, the one holding an flock of `merge.lock`: every
process holds the others' recent ids too (read from the `ids` of their log
rows, see `_id_keys`), and with two workers both merged the same ids, the
second finding each one already there. The others wait for the marks to
move, unless their memory reaches four times as many ids
(`_MERGE_ALONE_AT`: the merging process is stuck): they merge then
anyway, which INSERT OR IGNORE makes harmless. Each transaction first
asks SQLite whether another connection has committed since (`PRAGMA
data_version`). If one has (another process wrote, or merged), or a
write of ours rolled back, memory is brought up from the watermark and the
log tail, so it can never hold an id that is not durable, nor miss one that
is.

Several processes share the file: SQLite's lock and `BEGIN IMMEDIATE`
arbitrate between them. Before that, they queue on an flock of
`writer.lock`, tried every 0.2 ms up to the busy timeout: SQLite's own
wait sleeps 1, 2, 5, ... up to 100 ms between tries, time in which two
workers sat idle. Each round first reads, in a read transaction, what the
others have logged since its memory was last in step (`_read_ahead`), so
its own transaction, during which every process waits, reads only what
they commit in between; a write without client ids and without a fold to
make does not even read that: it needs neither, and its row is held
`ahead` in memory until the rows before it have been read. Each worker
keeps the deltas of its share of the partitions only, and folds the others'
from the log when it must (`SQLiteStore.open`).

The store directory is made under a temporary name and renamed into place,
so a crash during creation leaves either a whole store or none.

`durability = "fsync"`: the WAL is fsynced after every commit, before
anything the transaction decided is told to anyone, so what was acknowledged
survives power loss. The fsync is ours (`_File._sync`), made once COMMIT has
returned and the writers' lock is released, so other processes do not wait
on it: with two workers, COMMIT and its fsync (`synchronous = FULL`) held
the lock a quarter to a third of its time. Another process may then read a
row before it is on disk, but whatever it answers or delivers waits on its
own fsync of the same file, made after the read (`_File.read` too), which
covers that row. A checkpoint cannot move the row out of the WAL unsynced:
with `synchronous = NORMAL`, SQLite syncs the WAL before each checkpoint.
`"os"` leaves syncing to the checkpoints: a commit survives the process
dying, not the machine.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import itertools
import logging
import operator
import os
import secrets
import shutil
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import msgspec

from ..clock import moment
from ..errors import StoreBusy, StoreError, StoreFull, StoreMismatch, StoreOutcomeUnknown
from ..ledger import (
    BATCH_MAX_BYTES,
    BucketKey,
    BucketState,
    Delta,
    add_pulses,
    new_batches,
    partition_of_batch,
    resolve,
)
from ..model import (
    Aggregate,
    Batch,
    BatchRecord,
    BatchSummary,
    BatchView,
    Outcome,
    Pulse,
    StoredPulse,
    assigned_id,
    decode_encoded,
    encode_pulses,
)
from ..money import format_nanos, parse_nanos
from ..partition import partition_of
from . import LEAD_LAPSE, AggregateQuery, BatchQuery, DueBatch, PulseQuery, WriterLock
from .filters import aggregate_filter, batch_filter, where

__all__ = ["SQLiteStore"]

log = logging.getLogger("ingestor.store")

APPLICATION_ID = 0x42494E47  # "BING": marks our files, so a foreign file is refused
# 1: a file per partition; 2: JSON log rows, no spans; 3: payload digests
# kept with client ids, log rows without their id keys (see `_upgrade`)
SCHEMA_VERSION = 4
_UPGRADABLE = (2, 3)  # the earlier versions `_upgrade` brings to this one
_FILE = "store.sqlite"
_MARKER = "store.id"  # beside the store's directory: the id of the store it holds
_STAGING_ABANDONED = 600.0  # seconds after which a creation's staging directory is litter
_WRITER_CACHE_KIB = 64 * 1024  # holds the hot part of the id index and the buckets
_READER_CACHE_KIB = 16 * 1024
_MERGE_AT = 20_000  # recent ids, all partitions together, that start a merge (~2 MB)
_MERGE_MAX = 160_000  # ... or up to this many while merging costs much (`_next_merge_at`)
_MERGE_DEAR = 6e-6  # CPU seconds an id merged above which the next merges double
_MERGE_CHEAP = 3e-6  # ... and below which they halve
_MERGE_CHUNK = 5_000  # ids of a merge inserted per transaction, at least
_MERGE_ALONE_AT = 4 * _MERGE_AT  # ... that start a merge even while another process merges
# How long logged deltas may wait before the writer folds them. Partitions
# start waiting together, and one round folding all of them held up every
# request in it: a round folds one partition for being due, the next round
# the next one; only one that has waited twice as long folds regardless.
_FOLD_AFTER_S = 1.0
_FOLD_AT_KEYS = 20_000  # ... or how many buckets they may touch
_ALL = 1 << 62  # "no limit" for a query

_SPAN_MAX = 1_000  # log rows a span lists at most: a page of GET /pulses reads it whole
# Added by schema 3 (see `_upgrade`): a statement each, for the upgrade.
_SPANS = [
    """
CREATE TABLE pulse_spans (
    tenant_id TEXT NOT NULL,
    day TEXT NOT NULL,
    seq INTEGER NOT NULL,       -- the first log row it lists
    last_seq INTEGER NOT NULL,  -- the last one
    seqs BLOB NOT NULL,         -- every log row it lists, ascending (MessagePack)
    PRIMARY KEY (tenant_id, day, seq)
) STRICT, WITHOUT ROWID""",
    "CREATE INDEX pulse_spans_by_last ON pulse_spans (last_seq)",
]

# What `outbox_batches` counts failed batches by, at every scrape. A batch's
# status lies behind its body in the row: without it, counting them read every
# batch ever made (5,000 batches of 64 KiB: 150-550 ms; with it, 0.1 ms).
# Stores made before it get it when opened (`_add_indexes`): an index needs
# no new schema version, and an earlier version keeps it up to date unaware.
_FAILED_BATCHES = (
    "CREATE INDEX IF NOT EXISTS batches_failed ON batches (part) WHERE status = 'failed'"
)

# Keyed by one text a client id since 4e12a76; by (tenant_id, pulse_id) before (see `_upgrade`).
_PULSE_IDS = """
CREATE TABLE pulse_ids (
    id_key TEXT PRIMARY KEY,  -- see _id_key
    fingerprint BLOB NOT NULL,
    seq INTEGER NOT NULL
) STRICT, WITHOUT ROWID"""
_SCHEMA = (
    """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
CREATE TABLE pulse_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, even after purge (see _catch_up)
    part INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    body BLOB NOT NULL,
    ids BLOB  -- see _id_keys
) STRICT;
CREATE INDEX pulse_log_by_part ON pulse_log (part, seq);
"""
    + _PULSE_IDS
    + """;
CREATE TABLE buckets (
    day TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    product_sku TEXT NOT NULL,
    use_unit TEXT NOT NULL,
    part INTEGER NOT NULL,
    used_amount TEXT NOT NULL,
    pulse_count INTEGER NOT NULL,
    committed_amount TEXT NOT NULL,
    committed_count INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    PRIMARY KEY (day, tenant_id, product_sku, use_unit)
) STRICT, WITHOUT ROWID;
CREATE INDEX buckets_open ON buckets (part, day) WHERE pulse_count > committed_count;
CREATE TABLE batches (
    batch_id TEXT PRIMARY KEY,
    part INTEGER NOT NULL,
    day TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    record_count INTEGER NOT NULL,
    used_amount TEXT NOT NULL,
    body BLOB NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    last_error TEXT,
    next_attempt_at INTEGER,
    delivered_at INTEGER,
    UNIQUE (part, day, seq)
) STRICT;
CREATE INDEX batches_due ON batches (part, next_attempt_at) WHERE status = 'pending';
"""
    + "".join(f"{statement};\n" for statement in (*_SPANS, _FAILED_BATCHES))
)

# Amounts are exact decimal text; dec_add adds them in Python integers.
_UPSERT_BUCKET = """
INSERT INTO buckets (day, tenant_id, product_sku, use_unit, part, used_amount, pulse_count,
                     committed_amount, committed_count, revision)
VALUES (?, ?, ?, ?, ?, ?, ?, '0', 0, 0)
ON CONFLICT (day, tenant_id, product_sku, use_unit) DO UPDATE SET
    used_amount = dec_add(used_amount, excluded.used_amount),
    pulse_count = pulse_count + excluded.pulse_count
"""

# A join on one text key, fed a JSON array of keys: ~2.0 µs an absent id
# among 1,000,000, against ~2.6 on (tenant_id, pulse_id) fed pairs through
# json_extract (bench/id_index.py).
_LOOKUP_IDS = """
SELECT i.id_key, i.fingerprint, i.seq
FROM json_each(?) AS j JOIN pulse_ids AS i ON i.id_key = j.value
"""

# A merge: the recent ids, then the digests among them (see `_MergePlan`).
# `_INSERT_ROWS` ids a statement, each bound as (id_key, seq): sqlite3's
# `executemany` costs about 0.45 µs a row of its own, as much as SQLite's
# insert of a key next to the last. Merging 20,000 ids of a prefix and a
# counter into 2,000,000 cost 1.05 µs of CPU an id that way, 0.61 in
# statements of 100 or 400 rows, 0.72 of 1,000, 0.77 of 4,000.
_INSERT_ROWS = 250
_INSERT_ID = "INSERT OR IGNORE INTO pulse_ids (id_key, seq, fingerprint) VALUES (?, ?, x'')"
_INSERT_IDS = _INSERT_ID + ", (?, ?, x'')" * (_INSERT_ROWS - 1)
_SET_DIGESTS = "UPDATE pulse_ids SET fingerprint = ? WHERE id_key = ?"

# A meta key set to a value (a watermark, the merge size), whatever it held.
_SET_META = (
    "INSERT INTO meta (key, value) VALUES (?, ?)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)

_BUCKET_COLUMNS = (
    "day, tenant_id, product_sku, use_unit, used_amount, pulse_count,"
    " committed_amount, committed_count, revision"
)
_BATCH_COLUMNS = (
    "batch_id, day, kind, created_at, record_count, used_amount, status, attempts,"
    " last_error, next_attempt_at, delivered_at"
)
# A count over each status's partial index (`batches_due`, `batches_failed`).
_OUTBOX_BATCHES = (
    "SELECT (SELECT count(*) FROM batches WHERE status = 'pending'),"
    " (SELECT count(*) FROM batches WHERE status = 'failed')"
)

_SEP = "\x1f"  # tenants hold no control characters; SQLite's JSON cuts a string at NUL


def _id_key(tenant_id: str, pulse_id: str) -> str:
    """One text key for a client id: it sorts as (tenant_id, pulse_id), and looks up
    in one probe (see `_LOOKUP_IDS`)."""
    return f"{tenant_id}{_SEP}{pulse_id}"


_encode = msgspec.json.Encoder().encode
_first = operator.itemgetter(0)
_decode_batch = msgspec.json.Decoder(Batch).decode
_pack = msgspec.msgpack.Encoder().encode  # a span's log rows, a log row's id keys
_unpack_seqs = msgspec.msgpack.Decoder(list[int]).decode
_unpack_keys = msgspec.msgpack.Decoder(list[str]).decode
_POSITIONS = 1 << 20  # a GET /pulses cursor is seq * _POSITIONS + position in the log row
T = TypeVar("T")


def _dec_add(a: str, b: str) -> str:
    return format_nanos(parse_nanos(a) + parse_nanos(b))


def _moment(us: int | None) -> dt.datetime | None:
    return None if us is None else moment(us)


def _translate(exc: sqlite3.Error, what: str) -> StoreError:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        primary = code & 0xFF
        if primary == sqlite3.SQLITE_FULL:
            return StoreFull(f"{what}: the disk under the store is full")
        if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return StoreBusy(f"{what}: the store stayed locked by another process")
        if primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            return StoreMismatch(f"{what}: the store file is damaged or not ours: {exc}")
        if primary in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
            return StoreError(
                f"{what}: the store cannot be opened for writing"
                f" (a read-only disk or file, or permissions?): {exc}"
            )
        if primary == sqlite3.SQLITE_IOERR:
            return StoreError(
                f"{what}: I/O error under the store (disk full or failing, or its files made"
                f" unwritable?): {exc}"
            )
    return StoreError(f"{what}: {exc}")


class _File:
    """The store file: a writer and a reader connection, each behind a lock.

    Every write is a `transaction`. Inside `together` (the shard's
    round), each is a savepoint of the round's one transaction instead: its
    failure undoes only itself, and nothing is durable before the round's
    COMMIT. Memory follows only what has committed (`on_commit`).
    """

    def __init__(self, path: Path, durability: str, busy_timeout: float) -> None:
        self.writer = _connect(path, busy_timeout, _WRITER_CACHE_KIB)
        self.reader = _connect(path, busy_timeout, _READER_CACHE_KIB)
        self._wal_fd = -1
        # SQLite makes the WAL and its index at a connection's first read.
        self.writer.execute("SELECT count(*) FROM meta").fetchone()
        if durability == "fsync":
            # With synchronous = NORMAL, SQLite syncs the WAL's directory
            # entry only at the first checkpoint: sync it here.
            self._wal_fd = os.open(path.with_name(f"{path.name}-wal"), os.O_RDONLY)
            _fsync(path.parent)
        # The files SQLite keeps open, by (device, inode): see `_check_in_place`.
        self._files = {
            place: _identity(place)
            for place in (
                path,
                path.with_name(f"{path.name}-wal"),
                path.with_name(f"{path.name}-shm"),
            )
        }
        self.lost: str | None = None  # why the files are no longer those in use
        self._lost_lock = threading.Lock()
        self._rescued = False
        self.write_lock = threading.Lock()
        self.read_lock = threading.Lock()
        self._busy_timeout = busy_timeout
        self._writers_fd = os.open(path.with_name("writer.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        # Under write_lock: what the open transaction will do to memory once
        # it commits, which partitions' memory it may move (all of them, and
        # those of the open savepoint), and which partitions wrote in the round.
        self._on_commit: list[Callable[[], None]] = []
        self._touched: set[_Partition] = set()
        self._point: list[_Partition] | None = None
        self._written: set[_Partition] = set()
        self._round: int | None = None  # the thread running writes together
        self.serial = 0  # counts transactions: what ran in the open one
        # This process's turns at the writers' lock (`SQLiteStore.writer_lock`).
        self.turns = 0
        self.wait_seconds = self.held_seconds = 0.0
        self._turn_since = 0.0
        self._version = (-1, 0)  # (serial, data_version) of a write transaction

    def on_commit(self, update: Callable[[], None]) -> None:
        """Run `update` (of memory, never of the file) once this transaction is durable."""
        self._on_commit.append(update)

    def touch(self, part: _Partition) -> None:
        """The open transaction may move `part`'s memory: re-read it if that is undone."""
        self._touched.add(part)
        if self._point is not None:
            self._point.append(part)

    @contextmanager
    def together(
        self, what: str = "write pulses", before: Callable[[], None] | None = None
    ) -> Iterator[None]:
        """One transaction for every `transaction` in the block, made by this thread.

        `before` runs first, under `write_lock` but outside the transaction.
        """
        deadline = self._take_write_lock(what)
        try:
            if before is not None:
                before()
            with self._transaction(what, deadline):
                self._round = threading.get_ident()
                try:
                    yield
                finally:
                    self._round = None
        finally:
            self.write_lock.release()

    def transaction(
        self, what: str, part: _Partition
    ) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT. On any error: ROLLBACK, nothing is kept.

        `part` is the partition whose memory the transaction may move.
        """
        if self._round == threading.get_ident():
            return self._savepoint(what, part)
        return self._alone(what, part)

    @contextmanager
    def _alone(self, what: str, part: _Partition) -> Iterator[sqlite3.Connection]:
        deadline = self._take_write_lock(what)
        try:
            with self._transaction(what, deadline) as conn:
                self._touched.add(part)
                yield conn
        finally:
            self.write_lock.release()

    def _take_write_lock(self, what: str) -> float:
        """Take `write_lock` within the busy timeout, and give the monotonic time by
        which the writers' lock must be had too: one wait for both. Each waiter
        spent the whole timeout at the writers' lock once it had this one, so
        writes queued behind reads of a store another process held waited as
        many timeouts as there were reads before them."""
        deadline = time.monotonic() + self._busy_timeout
        if not self.write_lock.acquire(timeout=self._busy_timeout):
            raise StoreBusy(f"{what}: the store stayed busy with this process's other writes")
        return deadline

    def data_version(self) -> int:
        """The writer's `PRAGMA data_version`, inside a write transaction. Read once
        a transaction: no other connection commits while this one writes."""
        serial, version = self._version
        if serial != self.serial:
            (version,) = self.writer.execute("PRAGMA data_version").fetchone()
            self._version = (self.serial, version)
        return version

    @contextmanager
    def _transaction(self, what: str, deadline: float) -> Iterator[sqlite3.Connection]:
        conn = self.writer
        self.serial += 1
        self._on_commit.clear()
        self._touched.clear()
        self._written.clear()
        self._lock_writers(what, deadline)
        try:
            if self.lost is not None:
                self._rescue()
                raise StoreError(f"{what}: {self.lost}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                self._check_in_place(what)
                # A crash before this line loses the whole transaction (the
                # client got no answer); after it, all of it, unless the
                # machine loses power before `_sync` below.
                conn.execute("COMMIT")
            except BaseException:
                # Memory may have moved with what is now undone: re-read it.
                for part in self._touched:
                    part.version = None
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if self.lost is not None:
                    self._rescue()
                raise
        except sqlite3.Error as exc:
            raise _translate(exc, what) from exc
        finally:
            fcntl.flock(self._writers_fd, fcntl.LOCK_UN)
            self.held_seconds += time.perf_counter() - self._turn_since
        try:
            self._sync(what)
        except BaseException as exc:
            # Committed, maybe not durable: memory does not take it in, and
            # reads it back from the file if it lasts. The caller is told it
            # may have lasted: "not stored, retry" counted pulses without ids
            # twice whenever it had.
            for part in self._touched:
                part.version = None
            if isinstance(exc, StoreError):
                raise StoreOutcomeUnknown(f"{exc}; committed, it may or may not last") from exc
            raise
        # Until every update has run, memory is not known to match the file.
        versions = [(part, part.version) for part in self._touched]
        for part, _ in versions:
            part.version = None
        try:
            for update in self._on_commit:
                update()
        except Exception:
            # Out of memory halfway through: what is durable stands, and the
            # callers are told so. Memory may hold part of a row, which reading
            # on from it would add twice: it is dropped, and rebuilt from the file.
            log.exception("memory could not follow a commit: it is rebuilt from the store")
            for part in self._touched:
                _forget(part)
            return
        for part, version in versions:
            part.version = version

    def _sync(self, what: str) -> None:
        """The durability point of `durability = "fsync"`: fdatasync the WAL, which
        holds every committed transaction no checkpoint has synced yet, whichever
        process made it. Whatever was read or written before is then on disk."""
        if self._wal_fd < 0:
            return
        try:
            os.fdatasync(self._wal_fd)
        except OSError as exc:
            raise StoreError(f"{what}: could not sync the store to disk: {exc}") from exc

    def trouble(self) -> str | None:
        """Why this process can write no more to the store (`_check_in_place`), or
        None. May wait for the writers' lock, as a write does."""
        if self.lost is None:
            what = "check the store's files"
            try:
                self._check_in_place(what)
            except StoreError:
                with contextlib.suppress(StoreError):  # busy: the next write does it
                    deadline = self._take_write_lock(what)
                    try:
                        self._lock_writers(what, deadline)
                        try:
                            self._rescue()
                        finally:
                            fcntl.flock(self._writers_fd, fcntl.LOCK_UN)
                    finally:
                        self.write_lock.release()
        return self.lost

    def _check_in_place(self, what: str) -> None:
        """Raise StoreError if the store's files are no longer those this process
        has open: removed (`rm -rf data/store`, a cleanup script taking the WAL
        for a temporary file) or replaced by other files.

        SQLite goes on writing into files it has open whatever their names
        now lead to: every write acknowledged after that would be in a file
        that is gone once the process exits, or in a WAL that no other
        process, nor the next start, reads. A stat of each file a
        transaction, under the writers' lock. A file copied over the store's
        own (same inode) is not seen: the README says never to.
        """
        if self.lost is not None:
            raise StoreError(f"{what}: {self.lost}")
        for place, identity in self._files.items():
            try:
                now = _identity(place)
            except (FileNotFoundError, NotADirectoryError):
                now = None
            except OSError:
                continue  # cannot be told now (EACCES, EIO): a write says more
            if now == identity:
                continue
            done = "removed" if now is None else "replaced by another file"
            if place.name.endswith(("-wal", "-shm")):
                lost = (
                    f"{place} was {done} while the store was in use: writes are refused"
                    f" until the service is restarted (what the store held is kept in"
                    f" {place.with_name(_FILE)})"
                )
            else:
                lost = (
                    f"{place} was {done} while the store was in use: writes are refused."
                    " Every pulse acknowledged before is in the file this process has open"
                    + _where_now(place, identity)
                )
            with self._lost_lock:  # a write and the watch may find it at once: said once
                if self.lost is None:
                    self.lost = lost
                    log.error("store files gone", extra={"fields": {"error": lost}})
            raise StoreError(f"{what}: {self.lost}")

    def _rescue(self) -> None:
        """Once the store's files are lost, under the writers' lock and outside a
        transaction: copy what the WAL holds into the store file, so a WAL that
        was removed takes nothing acknowledged with it, and a store file that
        was removed holds, alone, every pulse acknowledged."""
        if self._rescued:
            return
        self._rescued = True
        try:
            self.writer.execute("PRAGMA wal_checkpoint(FULL)").fetchone()
        except sqlite3.Error as exc:
            log.error(
                "store files gone: could not copy the WAL into the store file",
                extra={"fields": {"error": str(exc)}},
            )

    def _lock_writers(self, what: str, deadline: float) -> None:
        """Wait for this process's turn to write (see the module docstring), until
        `deadline` (monotonic)."""
        started = time.perf_counter()
        while True:
            try:
                fcntl.flock(self._writers_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._turn_since = time.perf_counter()
                self.turns += 1
                self.wait_seconds += self._turn_since - started
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreBusy(f"{what}: the store stayed locked by another process") from None
            time.sleep(0.0002)

    @contextmanager
    def _savepoint(self, what: str, part: _Partition) -> Iterator[sqlite3.Connection]:
        conn = self.writer
        if part in self._written:
            # Its memory does not yet hold the first write's ids: the second
            # would not see them. One shard has one write in flight.
            raise StoreError(f"{what}: partition {part.index} wrote twice in one round")
        self._written.add(part)
        self._touched.add(part)
        self._point = [part]
        updates = len(self._on_commit)
        try:
            if not conn.in_transaction:
                # SQLite undid the whole round (a full disk, an I/O error):
                # a savepoint now would begin a transaction of its own.
                raise StoreError(f"{what}: the round's transaction was rolled back")
            conn.execute("SAVEPOINT write")
            try:
                yield conn
                conn.execute("RELEASE write")
            except BaseException:
                for touched in self._point:
                    touched.version = None
                del self._on_commit[updates:]
                if conn.in_transaction:
                    conn.execute("ROLLBACK TO write")
                    conn.execute("RELEASE write")
                raise
        except sqlite3.Error as exc:
            raise _translate(exc, what) from exc
        finally:
            self._point = None

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self.read_lock:
            try:
                found = fn(self.reader)
            except sqlite3.Error as exc:
                raise _translate(exc, "read") from exc
        # What another process committed may not be on disk yet: nothing read
        # is shown or delivered before it is (see the module docstring).
        self._sync("read")
        return found

    def close(self) -> None:
        with self.write_lock, self.read_lock:
            self.reader.close()
            self.writer.close()
            for fd in (self._writers_fd, self._wal_fd):
                if fd >= 0:
                    os.close(fd)
            self._writers_fd = self._wal_fd = -1


class _Partition:
    """One partition's memory of the file: its log tail's ids and deltas.

    `keeps`: whether this process keeps the tail's deltas in memory and folds
    them as it writes. If not, `pending` and `days` stay empty, and `_fold`
    reads the deltas from the log when it must fold (see `SQLiteStore.open`).
    """

    def __init__(self, file: _File, index: int, keeps: bool = True) -> None:
        self.file = file
        self.index = index
        self.keeps = keeps
        self.merged_key = f"ids_merged_seq/{index}"
        self.folded_key = f"buckets_seq/{index}"
        # Under the file's write_lock: client ids of this partition's log
        # rows after `merged_seq`, up to `seen_seq`, keyed by `_id_key`, each
        # the seq of its log row; in `digests`, those whose pulse an earlier
        # version gave the digest of its payload, with it (see `_known_ids`).
        self.recent: dict[str, int] = {}
        self.digests: dict[str, bytes] = {}
        self.seen_seq = 0
        # Our log rows after `seen_seq` whose ids and deltas are in memory
        # already: written while rows of other processes before them were not
        # yet read (`write_pulses`). `_catch_up` skips them, and empties this.
        self.ahead: set[int] = set()
        self.merged_seq = -1  # unknown: the first transaction reads it
        # Under write_lock, if it `keeps` them: the bucket deltas of log rows
        # after `folded_seq` (the meta key `buckets_seq/<n>`), up to
        # `seen_seq`, and the log rows of each (tenant, day) among them (the
        # fold's `pulse_spans`); since when they wait.
        self.pending: dict[BucketKey, Delta] = {}
        self.days: dict[tuple[str, str], list[int]] = {}
        self.folded_seq = -1
        self.pending_since: float | None = None
        # The writer's `PRAGMA data_version` that memory is up to date with,
        # or None. It changes only when another connection (another process)
        # commits, so while it stands, nothing but this writer has touched
        # the log and the watermarks, and `_catch_up` has nothing to read.
        self.version: int | None = None

    def transaction(self, what: str) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return self.file.transaction(what, self)

    def on_commit(self, update: Callable[[], None]) -> None:
        self.file.on_commit(update)

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return self.file.read(fn)


def _uri(path: Path) -> str:
    """`path` as an SQLite URI: a "#", "?" or "%" in it otherwise ends or escapes
    the path (a data dir named "x#y" opened the file "x", outside it)."""
    return f"file:{urllib.parse.quote(str(path))}"


def _read_marker(marker: Path) -> str:
    """The id of the store this data dir held (`_MARKER`), or "" if none is known."""
    try:
        return marker.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"{marker}: cannot be read: {exc}") from exc


def _keep_marker(marker: Path, store_id: str, directory: Path) -> None:
    """Keep `store_id` in `marker`, saying so if it held another store's. The
    store is there and whole: a marker that cannot be read or written is
    said, not fatal (a read-only data dir over a writable store's mount)."""
    try:
        held = _read_marker(marker)
    except StoreError as exc:
        log.warning("store id marker", extra={"fields": {"error": str(exc)}})
        held = "?"
    if held == store_id:
        return
    if held:
        log.warning(
            "another store",
            extra={
                "fields": {
                    "held": held,
                    "store_id": store_id,
                    "note": f"{directory} holds another store than before; serving it",
                }
            },
        )
    try:
        _write_marker(marker, store_id)
    except StoreError as exc:
        log.warning(
            "store id marker",
            extra={
                "fields": {
                    "error": str(exc),
                    "note": "a start that finds the store gone will make a new one",
                }
            },
        )


def _write_marker(marker: Path, store_id: str) -> None:
    """Remember, beside the store's directory, the id of the store it holds: a
    start that finds the store gone (`rm -rf data/store`, a volume not mounted)
    then refuses to make a new, empty one in its place, which would bill from
    nothing under new batch ids as if the old had never been."""
    temporary = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w") as f:
            f.write(f"{store_id}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, marker)
        _fsync(marker.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise StoreError(f"{marker}: cannot be written: {exc}") from exc


def _identity(path: Path) -> tuple[int, int]:
    found = os.stat(path)
    return found.st_dev, found.st_ino


def _held_at(identity: tuple[int, int]) -> tuple[str, str] | None:
    """(where this process's open descriptor of the file `identity` can be read,
    where that file is now) from Linux's /proc, or None."""
    with contextlib.suppress(OSError):
        for fd in os.listdir("/proc/self/fd"):
            link = f"/proc/self/fd/{fd}"
            with contextlib.suppress(OSError):
                found = os.stat(link)
                if (found.st_dev, found.st_ino) == identity:
                    return f"/proc/{os.getpid()}/fd/{fd}", os.readlink(link)
    return None


def _where_now(place: Path, identity: tuple[int, int]) -> str:
    """How an operator gets back the store file `identity`, no longer at `place`."""
    held = _held_at(identity)
    if held is None:
        return ""
    fd, target = held
    if target.endswith(" (deleted)"):
        return f", and is gone once it exits: copy {fd} back to {place} before stopping it"
    return f", now at {target}: move it back to {place}, with its -wal and -shm files"


def _connect(path: Path, busy_timeout: float, cache_kib: int) -> sqlite3.Connection:
    conn = sqlite3.connect(
        f"{_uri(path)}?mode=rw",
        uri=True,
        isolation_level=None,
        check_same_thread=False,
        timeout=busy_timeout,
    )
    # Either durability: "fsync" syncs after COMMIT itself (`_File._sync`).
    conn.execute("PRAGMA synchronous = NORMAL")
    # KiB of page cache per connection; there are two, so this is the
    # store's memory: 64 + 16 MiB at most.
    conn.execute(f"PRAGMA cache_size = -{cache_kib}")
    conn.create_function("dec_add", 2, _dec_add, deterministic=True)
    return conn


def _check_file(path: Path) -> tuple[int, dict[str, str]]:
    """Refuse a file that is not ours; its schema version and meta. Never writes to it."""
    try:
        # immutable: read without creating -wal/-shm files beside a file we may
        # refuse. Not when a WAL is there: a process killed while writing leaves
        # committed transactions in it, and one killed during a checkpoint a file
        # that is whole only with it (read alone, SQLite finds it malformed).
        wal = path.with_name(f"{path.name}-wal").exists()
        mode = "ro" if wal else "ro&immutable=1"
        conn = sqlite3.connect(f"{_uri(path)}?mode={mode}", uri=True)
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if app_id != APPLICATION_ID:
                raise StoreMismatch(f"{path}: not a billing-ingestor store file; refusing it")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreMismatch(
            f"{path}: cannot be read as a billing-ingestor store ({exc}); refusing to use it"
        ) from exc
    if version not in (*_UPGRADABLE, SCHEMA_VERSION):
        raise StoreMismatch(
            f"{path}: schema version {version}, this version reads {SCHEMA_VERSION}"
        )
    return version, meta


def _upgrade(path: Path, busy_timeout: float) -> None:
    """Make a store file of schema version 2 or 3 one of this version, in one
    transaction.

    Version 2 wrote its log rows in JSON, without a head byte (`_log_row`):
    they stay as they are and are read as they are. Versions 2 and 3 kept
    the digest of each client id's payload with it, where this one keeps
    none (see `_known_ids`): their ids keep theirs, and are compared by it.

    Each version had more than one layout, so what is done is decided by
    what the file holds, not by its version number:

    - `pulse_ids` keyed by (tenant_id, pulse_id) gets one `_id_key` a row;
      its index by log row goes (see `SQLiteStore.purge`);
    - a `pulse_days` row per (tenant, day, log row), where a tenant's pulses
      are, becomes spans, and the table goes. Only the rows of log rows
      folded already: until 6dd8a16 each write listed its own at once, and
      the next fold spans the log's tail again, from memory;
    - log rows get their column of id keys (`_id_keys`).

    An earlier version cannot read what this one writes (it would take a
    replay of an id for a conflict): the version number makes it refuse the
    file. Several workers may open the store at once: the first one upgrades
    it.
    """
    conn = _connect(path, busy_timeout, _READER_CACHE_KIB)
    try:
        conn.execute("BEGIN IMMEDIATE")
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version in _UPGRADABLE:
            _upgrade_layout(conn)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
            )
            upgraded = True
        else:  # another process has upgraded it meanwhile
            upgraded = False
        conn.execute("COMMIT")
    finally:
        conn.close()
    if upgraded:
        log.info("store upgraded", extra={"fields": {"path": str(path), "schema": SCHEMA_VERSION}})


def _upgrade_layout(conn: sqlite3.Connection) -> None:
    """The tables of a version 2 or 3 file as this version has them (see `_upgrade`)."""

    def columns(table: str) -> set[str]:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}

    tables = {
        name for (name,) in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")
    }
    conn.execute("DROP INDEX IF EXISTS pulse_ids_by_seq")  # see `SQLiteStore.purge`
    if "id_key" not in columns("pulse_ids"):
        conn.execute("ALTER TABLE pulse_ids RENAME TO pulse_ids_by_pair")
        conn.execute(_PULSE_IDS)
        conn.execute(
            "INSERT INTO pulse_ids (id_key, fingerprint, seq)"
            " SELECT tenant_id || ? || pulse_id, fingerprint, seq FROM pulse_ids_by_pair"
            " ORDER BY 1",
            (_SEP,),
        )
        conn.execute("DROP TABLE pulse_ids_by_pair")
    if "pulse_days" in tables:
        if "pulse_spans" not in tables:
            for statement in _SPANS:
                conn.execute(statement)
        listed = conn.execute(
            "SELECT d.tenant_id, d.day, d.seq FROM pulse_days AS d"
            " JOIN pulse_log AS l ON l.seq = d.seq"
            " JOIN meta AS m ON m.key = 'buckets_seq/' || l.part"
            " WHERE d.seq <= CAST(m.value AS INTEGER)"
            " ORDER BY d.tenant_id, d.day, d.seq"
        )
        conn.executemany(
            "INSERT INTO pulse_spans (tenant_id, day, seq, last_seq, seqs) VALUES (?, ?, ?, ?, ?)",
            (
                row
                for key, rows in itertools.groupby(listed, key=lambda row: row[:2])
                for row in _span_rows(key, [seq for _, _, seq in rows])
            ),
        )
        conn.execute("DROP TABLE pulse_days")
    if "ids" not in columns("pulse_log"):
        conn.execute("ALTER TABLE pulse_log ADD COLUMN ids BLOB")  # see `_id_keys`


def _add_indexes(path: Path, busy_timeout: float) -> None:
    """Add the indexes a store made by an earlier release lacks (see `_FAILED_BATCHES`).

    Writes only when one is missing; several workers may open the store at
    once, and the first one adds it."""
    conn = _connect(path, busy_timeout, _READER_CACHE_KIB)
    try:
        found = conn.execute(
            "SELECT 1 FROM sqlite_schema WHERE type = 'index' AND name = 'batches_failed'"
        ).fetchone()
        if found is None:
            conn.execute(_FAILED_BATCHES)
    finally:
        conn.close()


def _fsync(path: Path) -> None:
    """fsync a file or a directory (its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SQLiteStore:
    """The `Store` on one SQLite file under one directory."""

    def __init__(
        self,
        directory: Path,
        store_id: str,
        file: _File,
        partitions: int,
        worker: tuple[int, int] = (0, 1),
    ) -> None:
        self.directory = directory
        self.store_id = store_id
        self.partitions = partitions
        self.write_lanes = 1
        self._file = file
        index, workers = worker
        # Only other workers read our rows' id keys (`_id_keys`): one worker
        # spares their bytes, 3-12% of the store's write of new ids.
        self._share_keys = workers > 1
        self._parts = [
            _Partition(file, part, keeps=part % workers == index) for part in range(partitions)
        ]
        self._merging: _MergePlan | None = None
        self._merge_checked = -1  # the last transaction (`_File.serial`) that asked
        self._folded_in = -1  # the last transaction (`_File.serial`) that folded
        self._merge_fd = os.open(directory / "merge.lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._leader_fd: int | None = None

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        partitions: int,
        durability: str,
        busy_timeout: float,
        worker: tuple[int, int] = (0, 1),
    ) -> SQLiteStore:
        """Open the store in `directory`, creating it if it does not exist.

        `worker` is (index, count) of this process among the workers that
        share the store. Each keeps in memory, and folds as it writes, the
        bucket deltas of the partitions whose number is its index modulo the
        count; it adds up another partition's deltas, read from the log, only
        when it must fold them itself (before a read of buckets, a commit, a
        purge). Every process keeping every partition's deltas had each read
        and add up the others' pulses as well as its own: with two workers
        taking 1,000-pulse arrays, adding up deltas was 20% of their Python
        time (15% for one worker), and keeping a share cut their CPU a pulse
        by 15%. Which process keeps what changes nothing in what is counted:
        the log and the watermark decide that.
        """
        path = directory / _FILE
        marker = directory.with_name(_MARKER)
        if not path.exists():
            if (directory / "meta.sqlite").exists():
                raise StoreMismatch(
                    f"{path}: missing; {directory} holds a store of schema version 1"
                    f" (a file per partition), and this version reads {SCHEMA_VERSION}"
                )
            # (A process started with this one may have made the store since.)
            if directory.exists() and any(directory.iterdir()) and not path.exists():
                raise StoreMismatch(
                    f"{path}: missing, and {directory} holds other files; refusing to use it"
                )
            # Read before the store is looked for again: a process started
            # with this one writes the marker only once the store it made is there.
            held = _read_marker(marker)
            if held and not path.exists():
                raise StoreMismatch(
                    f"{path}: missing, but this data dir held store {held} ({marker}):"
                    " restore the store from a backup, or, to start a new, empty one (new"
                    f" batch ids, every total from nothing), remove {marker}"
                )
            try:
                cls._create(directory, partitions)
            except sqlite3.Error as exc:
                raise _translate(exc, f"create {path}") from exc
        version, meta = _check_file(path)
        try:
            if version != SCHEMA_VERSION:
                _upgrade(path, busy_timeout)
            _add_indexes(path, busy_timeout)
            file = _File(path, durability, busy_timeout)
        except sqlite3.Error as exc:
            raise _translate(exc, f"open {path}") from exc
        try:
            _keep_marker(marker, meta["store_id"], directory)
        except BaseException:
            file.close()
            raise
        return cls(directory, meta["store_id"], file, int(meta["partitions"]), worker)

    @staticmethod
    def _create(directory: Path, partitions: int) -> None:
        parent = directory.parent
        parent.mkdir(parents=True, exist_ok=True)
        # A creation killed midway leaves its staging directory behind: one
        # takes milliseconds, so one untouched for a while is such litter.
        for leftover in parent.glob(".creating-*"):
            with contextlib.suppress(OSError):
                if time.time() - leftover.stat().st_mtime > _STAGING_ABANDONED:
                    shutil.rmtree(leftover)
        staging = parent / f".creating-{secrets.token_hex(6)}"
        staging.mkdir()
        try:
            path = staging / _FILE
            conn = sqlite3.connect(path, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.executescript(_SCHEMA)
                meta = {
                    "store_id": secrets.token_hex(6),
                    "schema_version": str(SCHEMA_VERSION),
                    "partitions": str(partitions),
                    "created_at": dt.datetime.now(dt.UTC).isoformat(),
                }
                conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
            finally:
                conn.close()
            _fsync(path)
            _fsync(staging)
            try:
                with contextlib.suppress(FileNotFoundError):
                    directory.rmdir()  # empty, checked by the caller
                # The creation point: before this rename there is no store, after it a whole one.
                staging.rename(directory)
            except OSError as exc:
                # Processes started together on a new data dir: the first
                # rename wins, and the others open the store it made.
                if (
                    exc.errno not in (errno.ENOTEMPTY, errno.EEXIST)
                    or not (directory / _FILE).exists()
                ):
                    raise
                shutil.rmtree(staging, ignore_errors=True)
                return
            _fsync(parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def close(self) -> None:
        if self._leader_fd is not None:
            os.close(self._leader_fd)  # releases the lock
            self._leader_fd = None
        if self._merge_fd >= 0:
            os.close(self._merge_fd)
            self._merge_fd = -1
        self._file.close()

    def writing_together(self) -> contextlib.AbstractContextManager[None]:
        return self._file.together(before=self._read_ahead)

    def _read_ahead(self) -> None:
        """Bring every partition's memory up to what other processes have logged, in a
        read transaction, before the round waits for its turn to write.

        The round's own `_catch_up` then reads only what they commit meanwhile.
        Without this it read all of it while holding the writers' lock, which
        every process waits on: with two workers taking 1,000-pulse arrays,
        about a fifth of the lock's time (see the module docstring).
        """
        conn = self._file.writer
        try:
            (version,) = conn.execute("PRAGMA data_version").fetchone()
            if all(part.version == version and not part.ahead for part in self._parts):
                return  # no other connection has committed: nothing to read
            conn.execute("BEGIN")
            try:
                for part in self._parts:
                    _catch_up(conn, part, version)
            finally:
                conn.execute("COMMIT")  # it wrote nothing
        except sqlite3.Error as exc:
            raise _translate(exc, "write pulses") from exc

    def lead_committer(self, lapse: float = LEAD_LAPSE) -> bool:
        # An flock on a file beside the store: held by one open file
        # description at a time, dropped by the kernel when its process dies.
        # `lapse` is not needed: a worker that stops without dying is killed by
        # its supervisor (`worker_timeout`), and the flock goes with it.
        if self._leader_fd is not None:
            return True
        try:
            fd = os.open(self.directory / "committer.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:  # too many open files, say: try again next time
            raise StoreError(f"lead the committer: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"lead the committer: {exc}") from exc
        self._leader_fd = fd
        return True

    def _part(self, partition: int) -> _Partition:
        return self._parts[partition]

    # -- writes ---------------------------------------------------------

    def write_pulses(
        self,
        partition: int,
        pulses: Sequence[Pulse],
        received_us: int,
        encoded: bytes | None = None,
        ids: bool = True,
    ) -> list[Outcome]:
        part = self._part(partition)
        with part.transaction("write pulses") as conn:
            waited = 0.0 if part.pending_since is None else time.monotonic() - part.pending_since
            # One partition a transaction folds for being due (see `_FOLD_AFTER_S`).
            fold = (
                len(part.pending) >= _FOLD_AT_KEYS
                or waited >= 2 * _FOLD_AFTER_S
                or (waited >= _FOLD_AFTER_S and self._folded_in != self._file.serial)
            )
            if fold:
                self._folded_in = self._file.serial
            # The caller's word, where it has one: a search of the pulses, or of
            # their encoding, would cost this thread what intake had at hand.
            ids = ids and any(p.client_id for p in pulses)
            behind = False
            if fold or ids:
                _catch_up(conn, part, self._file.data_version())
            else:
                # No id to look up and nothing to fold: what other processes
                # logged meanwhile is read after the round, out of the lock that
                # every writer waits on (`_read_ahead`).
                behind = self._file.data_version() != part.version or bool(part.ahead)
            self._merge_slice(conn)
            outcomes: list[Outcome]
            accepted: Sequence[Pulse]
            keys: list[str] | None = None  # the accepted pulses' `_id_key`s, made once
            if ids:
                known, looked_up = _known_ids(conn, part, pulses)
                if known or None in looked_up or len(set(looked_up)) < len(looked_up):
                    outcomes = resolve(pulses, known)
                    accepted = [p for p, o in zip(pulses, outcomes, strict=True) if o == "accepted"]
                    keys = [
                        key
                        for key, o in zip(looked_up, outcomes, strict=True)
                        if o == "accepted" and key is not None
                    ]
                else:  # each pulse has an id, neither stored nor repeated here: all are new
                    outcomes, accepted = ["accepted"] * len(pulses), pulses
                    keys = cast(list[str], looked_up)
            else:  # no id to look up: each pulse is new
                outcomes, accepted = ["accepted"] * len(pulses), pulses
            if not accepted:
                return outcomes
            # The durable record of every accepted pulse and client id, in the
            # same transaction as the bucket totals below.
            if encoded is None or len(accepted) < len(pulses):
                encoded = encode_pulses(accepted)
            seq = conn.execute(
                "INSERT INTO pulse_log (part, received_at, body, ids) VALUES (?, ?, ?, ?)",
                (
                    partition,
                    received_us,
                    _log_row(encoded, ids),
                    _id_keys(keys, accepted) if self._share_keys else None,
                ),
            ).lastrowid
            assert seq is not None
            if fold:
                _fold(conn, part)
            part.on_commit(lambda: _remember(part, seq, accepted, behind, keys))
        return outcomes

    def _lock_merges(self) -> bool:
        """Whether this process may plan a merge: one at a time merges (see the
        module docstring). Held until the plan's last slice commits."""
        try:
            fcntl.flock(self._merge_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _merge_slice(self, conn: sqlite3.Connection) -> None:
        """One slice of the ids merge, at most one per transaction (see the module
        docstring); the first plans it, once enough ids wait."""
        if self._merge_checked == self._file.serial:
            return  # a round's partitions each ask; the recent ids stand till it commits
        self._merge_checked = self._file.serial
        plan = self._merging
        if plan is not None and _meta_int(conn, "ids_purged") != plan.purged:
            # A purge has removed ids since the plan was made, maybe some of its
            # own: its next slices would put them back, with the seq of a log
            # row that is gone, and every later write of such an id would fail.
            # What it has not merged is still in memory: a new plan takes it.
            self._merging = plan = None
            fcntl.flock(self._merge_fd, fcntl.LOCK_UN)
        if plan is None:
            waiting = sum(len(p.recent) for p in self._parts)
            if waiting < _MERGE_AT:
                return
            start = min(max(_meta_int(conn, "merge_at"), _MERGE_AT), _MERGE_MAX)
            alone = start * _MERGE_ALONE_AT // _MERGE_AT
            if waiting < start or (waiting < alone and not self._lock_merges()):
                return
            # All partitions at once: their ids share one index.
            for other in self._parts:
                self._file.touch(other)
                _catch_up(conn, other, self._file.data_version())
            plan = self._merging = _MergePlan(self._parts, _meta_int(conn, "ids_purged"), start)
        # A slice takes `_MERGE_CHUNK` ids, or twice as many as have joined
        # memory since the plan was made if that is more: the plan is done by
        # the time half as many new ids wait as it holds, so plans settle near
        # the larger of `merge_at` and two rounds' ids, and memory stays
        # bounded however many new ids each round brings. Slices of
        # `_MERGE_CHUNK` alone fell behind rounds that bring more: under
        # 1,000-pulse arrays of new ids at 16 connections, the server's RSS
        # grew from 190 to 687 MiB in a minute. Twice, not once: each plan
        # also takes the ids of the round that finished the one before, and
        # at once as many, plans grew by a round each (to 343,000 ids in that
        # minute).
        joined = sum(len(p.recent) for p in self._parts) - plan.size
        end = min(max(plan.done + _MERGE_CHUNK, 2 * joined), plan.size)
        started = time.thread_time()
        _insert_ids(conn, plan.params[2 * plan.done : 2 * end])
        plan.cpu += time.thread_time() - started
        if end < plan.size:
            self._file.on_commit(lambda: setattr(plan, "done", end))
            return
        # The last slice: every id up to the marks is in the index. Another
        # process may have merged further meanwhile; a mark never goes back.
        conn.executemany(_SET_DIGESTS, plan.digests)
        conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE"
            " SET value = CAST(max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))"
            " AS TEXT)",
            [(part.merged_key, str(mark)) for part, mark in plan.marks.items()],
        )
        conn.execute(
            _SET_META,
            # A plan can find nothing left to merge: another process merged it.
            ("merge_at", str(_next_merge_at(plan.merge_at, plan.cpu / max(plan.size, 1)))),
        )
        for part in self._parts:
            self._file.touch(part)

        def merged() -> None:
            for part, mark in plan.marks.items():
                part.merged_seq = max(part.merged_seq, mark)
                _forget_merged(part)
            self._merging = None
            fcntl.flock(self._merge_fd, fcntl.LOCK_UN)

        self._file.on_commit(merged)

    def commit_day(
        self,
        partition: int,
        day: str,
        now_us: int,
        max_records: int,
        max_bytes: int = BATCH_MAX_BYTES,
    ) -> list[BatchSummary]:
        part = self._part(partition)
        with part.transaction("commit") as conn:
            _catch_up(conn, part, self._file.data_version())
            _fold(conn, part)  # the day's buckets hold every logged pulse before they are read
            # INDEXED BY: SQLite's planner took the primary key's day, and
            # each partition's commit read every bucket of the day, all
            # partitions'. Committing a day of 60,000 buckets with long names
            # took 2.45 s of CPU over 64 partitions, 0.94 this way (16: 1.25,
            # 1.04).
            rows = conn.execute(
                f"SELECT {_BUCKET_COLUMNS} FROM buckets INDEXED BY buckets_open"
                " WHERE part = ? AND day = ? AND pulse_count > committed_count",
                (partition, day),
            ).fetchall()
            if not rows:
                return []
            states = [_bucket_state(row) for row in rows]
            (last_seq,) = conn.execute(
                "SELECT coalesce(max(seq), 0) FROM batches WHERE part = ? AND day = ?",
                (partition, day),
            ).fetchone()
            inserts, summaries = new_batches(
                self.store_id,
                day,
                partition,
                last_seq,
                states,
                max_records=max_records,
                max_bytes=max_bytes,
                now_us=now_us,
            )
            conn.executemany(
                "INSERT INTO batches (batch_id, part, day, seq, kind, created_at, record_count,"
                " used_amount, body, status, attempts, next_attempt_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?)",
                inserts,
            )
            # Same transaction as the outbox rows above: a bucket is marked
            # committed if and only if its delta is in a batch.
            conn.execute(
                "UPDATE buckets INDEXED BY buckets_open SET committed_amount = used_amount,"
                " committed_count = pulse_count, revision = revision + 1"
                " WHERE part = ? AND day = ? AND pulse_count > committed_count",
                (partition, day),
            )
        return summaries

    def claim_batch(
        self, partition: int, batch_id: str, *, now_us: int, latest_us: int, lease_us: int
    ) -> bytes | None:
        with self._part(partition).transaction("claim batch") as conn:
            cursor = conn.execute(
                "UPDATE batches SET next_attempt_at = ? WHERE batch_id = ? AND status = 'pending'"
                " AND (next_attempt_at <= ? OR next_attempt_at > ?)",
                (lease_us, batch_id, now_us, latest_us),
            )
            if cursor.rowcount != 1:
                return None
            (body,) = conn.execute(
                "SELECT body FROM batches WHERE batch_id = ?", (batch_id,)
            ).fetchone()
            return bytes(body)

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
        ours = status == "delivered" or claimed_us is None
        with self._part(partition).transaction("record delivery") as conn:
            conn.execute(
                "UPDATE batches SET status = ?, attempts = attempts + ?, last_error = ?,"
                " next_attempt_at = ?,"
                " delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END"
                " WHERE batch_id = ? AND status = 'pending'"
                + ("" if ours else " AND next_attempt_at = ?"),
                (status, int(attempted), error, next_attempt_us, status, now_us, batch_id)
                + (() if ours else (claimed_us,)),
            )

    def redeliver(self, batch_id: str, now_us: int) -> bool:
        partition = self._partition_of_batch(batch_id)
        if partition is None:
            return False
        with self._part(partition).transaction("redeliver") as conn:
            cursor = conn.execute(
                "UPDATE batches SET status = 'pending', next_attempt_at = ?"
                " WHERE batch_id = ? AND status = 'failed'",
                (now_us, batch_id),
            )
            return cursor.rowcount == 1

    def note_zones(self, zones: Sequence[str], now_us: int, since_us: int) -> list[str]:
        with self._file.transaction("note time zones", self._parts[0]) as conn:
            conn.executemany(_KEEP_LATEST, [(_ZONE + zone, now_us) for zone in zones])
            rows = conn.execute(
                "SELECT key FROM meta WHERE substr(key, 1, ?) = ? AND CAST(value AS INTEGER) >= ?",
                (len(_ZONE), _ZONE, since_us),
            ).fetchall()
        return sorted(key.removeprefix(_ZONE) for (key,) in rows)

    def announce_purge(self, before_us: int) -> None:
        with self._file.transaction("announce a purge", self._parts[0]) as conn:
            conn.execute(_KEEP_LATEST, ("purge_horizon", before_us))

    def purge_horizon(self) -> int | None:
        def read(conn: sqlite3.Connection) -> int | None:
            row = conn.execute("SELECT value FROM meta WHERE key = 'purge_horizon'").fetchone()
            return int(row[0]) if row else None

        return self._file.read(read)

    def purge(self, partition: int, before_us: int) -> int:
        part = self._part(partition)
        removed = 0
        while True:
            with part.transaction("purge") as conn:
                _catch_up(conn, part, self._file.data_version())
                _fold(conn, part)  # every amount is in buckets before any row goes
                # The log is appended in about time order, so the old rows are
                # at its head: look only there, never scan the table. Only rows
                # that are old themselves go, even if a newer one sits among
                # them (a clock step, or two processes on one store).
                old = [
                    seq
                    for (seq,) in conn.execute(
                        "SELECT seq FROM (SELECT seq, received_at FROM pulse_log"
                        " WHERE part = ? ORDER BY seq LIMIT 500) WHERE received_at < ?",
                        (partition, before_us),
                    )
                ]
                if not old:
                    # Most purges find nothing old. Merging memory's ids anyway,
                    # a partition at a time, was a burst of sixteen small merges
                    # every commit interval, each writing more index pages an id
                    # than the writers' merges of all partitions together.
                    return removed
                if part.recent:
                    _merge_ids(conn, [part])  # and every id in pulse_ids
                marks = ",".join("?" * len(old))
                # Their ids, found in the rows themselves: an index of
                # `pulse_ids` by log row, which only this used, made the
                # store's write of new ids cost 20% more CPU (5.82 against
                # 4.86 µs a pulse, `bench/stages.py --ids`).
                ids: list[tuple[str, int]] = []
                for seq, body in conn.execute(
                    f"SELECT seq, body FROM pulse_log WHERE seq IN ({marks})", old
                ):
                    if _may_hold_ids(body):
                        ids.extend(
                            (_id_key(p.tenant_id, p.pulse_id), seq)
                            for p in _decode_pulses(body)
                            if p.client_id
                        )
                conn.executemany("DELETE FROM pulse_ids WHERE id_key = ? AND seq = ?", ids)
                if ids:  # see `_merge_slice`
                    conn.execute(
                        "INSERT INTO meta (key, value) VALUES ('ids_purged', '1')"
                        " ON CONFLICT (key) DO UPDATE"
                        " SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT)"
                    )
                conn.execute(f"DELETE FROM pulse_log WHERE seq IN ({marks})", old)
                # A span goes once every log row it lists has: once they are
                # all older than the oldest row left, of any partition.
                conn.execute(
                    "DELETE FROM pulse_spans"
                    " WHERE last_seq < (SELECT coalesce(min(seq), ?) FROM pulse_log)",
                    (_ALL,),
                )
            removed += len(old)

    # -- reads ----------------------------------------------------------

    def _settle(self, parts: Sequence[_Partition]) -> bool:
        """Fold every logged delta, this process's or another's, into `buckets`.

        Before any read of buckets, so a pulse acknowledged anywhere is in
        every total read after it. False if that cannot be written (a full
        disk, a partition held too long): the read then adds the log's tail
        itself (`_unfolded`), slower but as exact.
        """
        try:
            with self._file.together("fold"):
                for part in parts:
                    with part.transaction("fold") as conn:
                        _catch_up(conn, part, self._file.data_version())
                        _fold(conn, part)
        except StoreError as exc:
            log.warning("reading buckets without folding", extra={"fields": {"error": str(exc)}})
            return False
        return True

    def _unfolded(
        self, parts: Sequence[_Partition], query: AggregateQuery
    ) -> list[tuple[Any, ...]]:
        rows = self._file.read(lambda conn: _unfolded_buckets(conn, parts, query))
        rows.sort(key=lambda row: row[:4])
        return rows[: query.limit]

    def open_days(self, partition: int) -> list[str]:
        part = self._part(partition)
        if not self._settle([part]):
            rows = self._unfolded([part], AggregateQuery(status="open", limit=_ALL))
            return sorted({row[0] for row in rows})
        return part.read(
            lambda conn: [
                day
                for (day,) in conn.execute(
                    "SELECT DISTINCT day FROM buckets"
                    " WHERE part = ? AND pulse_count > committed_count ORDER BY day",
                    (partition,),
                )
            ]
        )

    def aggregates(self, query: AggregateQuery) -> list[Aggregate]:
        clauses, args = aggregate_filter(query, "?")
        sql = (
            f"SELECT {_BUCKET_COLUMNS} FROM buckets {where(clauses)}"
            " ORDER BY day, tenant_id, product_sku, use_unit LIMIT ?"
        )
        args.append(query.limit)
        if query.tenant_id is not None:
            parts = [self._part(partition_of(query.tenant_id, self.partitions))]
        elif query.tenants is not None:
            chosen = {partition_of(tenant, self.partitions) for tenant in query.tenants}
            parts = [part for part in self._parts if part.index in chosen]
        else:
            parts = self._parts
        if self._settle(parts):
            rows = self._file.read(lambda conn: conn.execute(sql, args).fetchall())
        else:
            rows = self._unfolded(parts, query)
        return [_aggregate(row) for row in rows]

    def pulses(self, query: PulseQuery) -> list[tuple[int, StoredPulse]]:
        after = -1 if query.after is None else query.after
        after_seq, after_pos = divmod(after, _POSITIONS) if after >= 0 else (-1, 0)
        part = self._part(partition_of(query.tenant_id, self.partitions))

        def read(conn: sqlite3.Connection) -> list[tuple[int, StoredPulse]]:
            # One read transaction: the watermark, the index below it and the
            # log above it in the same state, whatever a fold does meanwhile.
            conn.execute("BEGIN")
            try:
                return scan(conn)
            finally:
                conn.execute("COMMIT")

        def scan(conn: sqlite3.Connection) -> list[tuple[int, StoredPulse]]:
            found: list[tuple[int, StoredPulse]] = []
            folded = _meta_int(conn, part.folded_key)
            spanned = _spanned(conn, query.tenant_id, query.day, after_seq)
            tail = conn.execute(
                "SELECT seq, received_at, body FROM pulse_log"
                " WHERE part = ? AND seq > ? AND seq >= ? ORDER BY seq",
                (part.index, folded, after_seq),
            )
            for seq, received_us, body in itertools.chain(spanned, tail):
                received = _moment(received_us)
                for position, p in enumerate(_decode_pulses(body)):
                    if (seq, position) <= (after_seq, after_pos) and after >= 0:
                        continue
                    if (
                        p.tenant_id != query.tenant_id
                        or p.day != query.day
                        or (query.product_sku is not None and p.product_sku != query.product_sku)
                        or (query.use_unit is not None and p.use_unit != query.use_unit)
                    ):
                        continue
                    stored = self._stored(p, received, seq, position)
                    found.append((seq * _POSITIONS + position, stored))
                    if len(found) == query.limit:
                        return found
            return found

        return part.read(read)

    def _stored(
        self, p: Pulse, received: dt.datetime | None, seq: int, position: int
    ) -> StoredPulse:
        """Pulse `position` of log row `seq`, as `GET /pulses` shows it."""
        return StoredPulse(
            id=p.pulse_id or assigned_id(self.store_id, seq, position),
            tenant_id=p.tenant_id,
            product_sku=p.product_sku,
            use_unit=p.use_unit,
            used_amount=format_nanos(p.nanos),
            timestamp=_moment(p.ts),  # type: ignore[arg-type]
            date=p.day,
            received_at=received,  # type: ignore[arg-type]
            id_assigned=not p.client_id,
        )

    def batches(self, query: BatchQuery) -> list[BatchView]:
        clauses, args = batch_filter(query, "?")
        args.append(query.limit)
        sql = (
            f"SELECT {_BATCH_COLUMNS} FROM batches {where(clauses)} ORDER BY day, batch_id LIMIT ?"
        )
        rows = self._file.read(lambda conn: conn.execute(sql, args).fetchall())
        return [self._batch_view(row, None) for row in rows]

    def batch(self, batch_id: str) -> BatchView | None:
        partition = self._partition_of_batch(batch_id)
        if partition is None:
            return None
        row = self._part(partition).read(
            lambda conn: conn.execute(
                f"SELECT {_BATCH_COLUMNS}, body FROM batches WHERE batch_id = ?", (batch_id,)
            ).fetchone()
        )
        if row is None:
            return None
        return self._batch_view(row[:-1], _decode_batch(row[-1]).records)

    def _batch_view(self, row: tuple[Any, ...], records: list[BatchRecord] | None) -> BatchView:
        (bid, day, kind, created, count, amount, status, attempts, error, next_at, done) = row
        partition = self._partition_of_batch(bid)
        assert partition is not None  # an id from our own outbox
        return BatchView(
            batch_id=bid,
            store_id=self.store_id,
            date=day,
            partition=partition,
            kind=kind,
            created_at=_moment(created),  # type: ignore[arg-type]
            record_count=count,
            used_amount=amount,
            status=status,
            attempts=attempts,
            last_error=error,
            next_attempt_at=_moment(next_at) if status == "pending" else None,
            delivered_at=_moment(done),
            records=records,
        )

    def _partition_of_batch(self, batch_id: str) -> int | None:
        return partition_of_batch(batch_id, self.store_id, self.partitions)

    def due_batches(self, now_us: int, limit: int, latest_us: int | None = None) -> list[DueBatch]:
        latest = _ALL if latest_us is None else latest_us

        def read(conn: sqlite3.Connection) -> list[DueBatch]:
            found: list[DueBatch] = []
            for partition in range(self.partitions):
                rows = conn.execute(
                    "SELECT batch_id, day, attempts FROM batches"
                    " WHERE part = ? AND status = 'pending'"
                    " AND (next_attempt_at <= ? OR next_attempt_at > ?)"
                    " ORDER BY next_attempt_at LIMIT ?",
                    (partition, now_us, latest, limit),
                )
                found.extend(DueBatch(partition, bid, day, n) for bid, day, n in rows)
            return found

        return self._file.read(read)

    def open_buckets(self) -> int:
        if not self._settle(self._parts):
            return len(self._unfolded(self._parts, AggregateQuery(status="open", limit=_ALL)))
        count: int = self._file.read(
            lambda conn: conn.execute(
                "SELECT count(*) FROM buckets WHERE pulse_count > committed_count"
            ).fetchone()[0]
        )
        return count

    def clock_offset_us(self) -> int:
        return (time.time_ns() - time.monotonic_ns()) // 1000

    def trouble(self) -> str | None:
        return self._file.trouble()

    def writer_lock(self) -> WriterLock:
        file = self._file
        return WriterLock(file.turns, file.wait_seconds, file.held_seconds)

    def outbox_statistics(self) -> tuple[int, int | None]:
        pending, oldest = self._file.read(
            lambda conn: conn.execute(
                "SELECT count(*), min(created_at) FROM batches WHERE status = 'pending'"
            ).fetchone()
        )
        return pending, oldest

    def outbox_batches(self) -> dict[str, int]:
        pending, failed = self._file.read(lambda conn: conn.execute(_OUTBOX_BATCHES).fetchone())
        return {"pending": pending, "failed": failed}


def _catch_up(conn: sqlite3.Connection, part: _Partition, version: int) -> None:
    """Bring `part.recent` and `part.pending` up to the committed log (see the module
    docstring), whose `PRAGMA data_version` is `version`."""
    if version == part.version and not part.ahead:
        return  # no other connection has committed since memory was last in step
    marks = dict(
        conn.execute(
            "SELECT key, value FROM meta WHERE key IN (?, ?)", (part.merged_key, part.folded_key)
        ).fetchall()
    )
    merged, folded = int(marks.get(part.merged_key, 0)), int(marks.get(part.folded_key, 0))
    ids_after = part.seen_seq
    deltas_after = part.seen_seq if part.keeps else _ALL  # see `_Partition.keeps`
    # Rows of ours already in memory (see `_Partition.ahead`), unless it was cleared.
    ids_ahead = deltas_ahead = part.ahead
    if merged > part.merged_seq:
        # Another process merged: the ids of rows up to its mark are in the
        # index, and memory holds those after it. Reading those rows again, at
        # each of the other's merges, was work in the writers' lock, which the
        # other waits on: two workers taking new ids spent ~15% less time
        # catching up without it.
        part.merged_seq = merged
        _forget_merged(part)
        ids_after = max(ids_after, merged)
    elif merged != part.merged_seq:  # our merge rolled back: memory lost ids the log has
        part.recent.clear()
        part.digests.clear()
        part.merged_seq = ids_after = merged
        ids_ahead = set()
    if folded != part.folded_seq:  # another process folded
        part.pending.clear()
        part.days.clear()
        part.pending_since = None
        part.folded_seq = folded
        deltas_after = folded if part.keeps else _ALL
        deltas_ahead = set()
    seen = max(part.seen_seq, merged, folded, *part.ahead)
    try:
        for seq, body, keys in conn.execute(
            "SELECT seq, body, ids FROM pulse_log WHERE part = ? AND seq > ? ORDER BY seq",
            (part.index, min(ids_after, deltas_after)),
        ):
            seen = max(seen, seq)
            ids = seq > ids_after and seq not in ids_ahead and _may_hold_ids(body)
            deltas = seq > deltas_after and seq not in deltas_ahead
            if ids and keys is not None:
                part.recent.update(zip(_unpack_keys(keys), itertools.repeat(seq)))
                ids = False
            if not (ids or deltas):
                continue
            pulses = _decode_pulses(body)
            if ids:
                _add_ids(part, seq, pulses)
            if deltas:
                _add_pulses(part, seq, pulses)
    except BaseException:
        # Some rows' deltas are in memory and `seen_seq` does not say so:
        # read again they would count twice. Rebuild from the watermarks.
        _forget(part)
        raise
    part.seen_seq = seen
    part.ahead = set()
    part.version = version


# A log row is a head byte, then `encode_pulses` of its pulses. The head
# says whether a pulse may have a client id: `_catch_up` decodes another
# process's rows for their ids only where one may. Each worker decoded
# every log row of the others to find their ids, also where it does not
# keep the partition's deltas (`_Partition.keeps`) and the row holds no id:
# with two workers taking arrays without ids, skipping those cut their CPU
# a pulse from 3.22 / 3.22 to 3.12 / 3.18 µs. Rows of schema version 2 have
# no head: they are JSON, and begin with "[".
_NO_IDS, _IDS = b"\x00", b"\x01"
_SCHEMA_2_ROW = ord("[")


def _log_row(encoded: bytes, ids: bool) -> bytes:
    """The log row of pulses encoded as `encoded`; `ids`: whether one may have a client id."""
    return (_IDS if ids else _NO_IDS) + encoded


def _id_keys(keys: list[str] | None, accepted: Sequence[Pulse]) -> bytes | None:
    """The `ids` column of a log row: the `_id_key`s of its client ids, as the
    writer made them to look them up, so another process adds them to its
    memory (`_catch_up`) without decoding the row, nor making them again in
    Python. Of two workers taking new ids, decoding the other's rows and
    making their keys were 17% of the GIL samples. NULL where the row has no
    client id, or a pulse brings the digest of its payload (see
    `_Partition.digests`): such a row is decoded for its ids, as rows written
    before the column are, and rows of a process that is the only worker
    (`SQLiteStore._share_keys`)."""
    if not keys or any(p.fingerprint for p in accepted):
        return None
    return _pack(keys)


def _decode_pulses(body: bytes) -> list[Pulse]:
    """The pulses of log row `body`."""
    if body[0] == _SCHEMA_2_ROW:
        return decode_encoded(body)
    return decode_encoded(memoryview(body)[1:])


def _may_hold_ids(body: bytes) -> bool:
    """Whether log row `body` may hold a client id (see `_log_row`).

    In a row of schema version 2, a pulse with one is encoded
    `[..., "<id>",true,<ts>, ...]`: a row without `,true,` has none, and
    one with it only inside a string is decoded for nothing.
    """
    if body[0] == _SCHEMA_2_ROW:
        return b",true," in body
    return body[:1] != _NO_IDS


def _span_rows(key: tuple[str, str], seqs: list[int]) -> Iterator[tuple[str, str, int, int, bytes]]:
    """The `pulse_spans` rows of (tenant, day) `key` listing log rows `seqs`, ascending."""
    for start in range(0, len(seqs), _SPAN_MAX):
        chunk = seqs[start : start + _SPAN_MAX]
        yield (*key, chunk[0], chunk[-1], _pack(chunk))


def _spanned(
    conn: sqlite3.Connection, tenant: str, day: str, after_seq: int
) -> Iterator[tuple[int, int, bytes]]:
    """(seq, received_at, body) of each log row from `after_seq` on that a span of
    `tenant`'s `day` lists, in log order; a row purged since is left out.

    Spans of one partition list disjoint stretches of its log, one fold
    after the other: the one holding `after_seq` is the last to start at or
    before it.
    """
    (start,) = conn.execute(
        "SELECT coalesce(max(seq), -1) FROM pulse_spans"
        " WHERE tenant_id = ? AND day = ? AND seq <= ?",
        (tenant, day, after_seq),
    ).fetchone()
    spans = conn.execute(
        "SELECT seqs FROM pulse_spans WHERE tenant_id = ? AND day = ? AND seq >= ? ORDER BY seq",
        (tenant, day, start),
    )
    for (packed,) in spans:
        for seq in _unpack_seqs(packed):
            if seq < after_seq:
                continue
            row = conn.execute(
                "SELECT seq, received_at, body FROM pulse_log WHERE seq = ?", (seq,)
            ).fetchone()
            if row is not None:
                yield row


# Meta keys of the zones instances bill in (`Store.note_zones`): "zone/<name>".
_ZONE = "zone/"
# A meta number (a time) that only moves forward, whoever writes it.
_KEEP_LATEST = (
    "INSERT INTO meta (key, value) VALUES (?, CAST(? AS TEXT))"
    " ON CONFLICT (key) DO UPDATE SET value = CAST(MAX(CAST(value AS INTEGER),"
    " CAST(excluded.value AS INTEGER)) AS TEXT)"
)


def _meta_int(conn: sqlite3.Connection, key: str) -> int:
    """A number the meta table keeps: the log row a watermark (`buckets_seq/<n>`,
    ...) stands at, or a merge's size (`merge_at`), or a count (`ids_purged`);
    0 if never set."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row else 0


def _forget(part: _Partition) -> None:
    """Drop a partition's memory: the next `_catch_up` rebuilds it from the file."""
    part.ahead = set()
    part.recent.clear()
    part.digests.clear()
    part.pending.clear()
    part.days.clear()
    part.pending_since = None
    part.seen_seq = 0
    part.merged_seq = part.folded_seq = -1
    part.version = None


def _unfolded_buckets(
    conn: sqlite3.Connection, parts: Sequence[_Partition], query: AggregateQuery
) -> list[tuple[Any, ...]]:
    """The rows of `query` with the unfolded deltas of `parts` added, read without writing.

    `parts` holds every partition the query's rows may come from, and only
    theirs are read (open_days of one partition read every partition's). One
    read transaction holds the watermarks, the log tails and the table in the
    same state. Every bucket the filters select is read, so this is the
    slow way, for when a fold cannot be written; the answer is the same.
    """
    wide = msgspec.structs.replace(query, status="all", after=None)
    clauses, args = aggregate_filter(wide, "?")
    clauses.append(f"part IN ({', '.join('?' * len(parts))})")
    args.extend(part.index for part in parts)
    conn.execute("BEGIN")
    try:
        tail: dict[BucketKey, Delta] = {}
        for part in parts:
            for (body,) in conn.execute(
                "SELECT body FROM pulse_log WHERE part = ? AND seq > ?",
                (part.index, _meta_int(conn, part.folded_key)),
            ):
                add_pulses(tail, _decode_pulses(body))
        rows = {
            tuple(r[:4]): list(r)
            for r in conn.execute(f"SELECT {_BUCKET_COLUMNS} FROM buckets {where(clauses)}", args)
        }
    finally:
        conn.execute("COMMIT")
    tenants = None if wide.tenants is None else set(wide.tenants)
    for key, delta in tail.items():
        day, tenant, sku, unit = key
        if (
            (wide.tenant_id is not None and tenant != wide.tenant_id)
            or (tenants is not None and tenant not in tenants)
            or (wide.product_sku is not None and sku != wide.product_sku)
            or (wide.use_unit is not None and unit != wide.use_unit)
            or (wide.date_from is not None and day < wide.date_from)
            or (wide.date_to is not None and day > wide.date_to)
        ):
            continue
        found = rows.setdefault(key, [*key, "0", 0, "0", 0, 0])
        found[4] = format_nanos(parse_nanos(found[4]) + delta.nanos)
        found[5] += delta.count
    selected = []
    for key, r in rows.items():
        if query.after is not None and key <= query.after:
            continue
        if (query.status == "open" and r[5] <= r[7]) or (
            query.status == "committed" and r[5] != r[7]
        ):
            continue
        selected.append(tuple(r))
    return selected


def _remember(
    part: _Partition, seq: int, accepted: Sequence[Pulse], behind: bool, keys: list[str] | None
) -> None:
    """After log row `seq` is durable: its client ids (the `_id_key`s `keys`, None
    if it has none) and bucket deltas join memory.

    What `_catch_up` would read back from that row, without reading it. If
    memory was `behind` the log when it was written, rows before it are not
    in memory yet: it is held `ahead` until they are.
    """
    if keys is not None:
        _add_ids(part, seq, accepted, keys)
    if part.keeps:
        _add_pulses(part, seq, accepted)
    if behind:
        part.ahead.add(seq)
    else:
        part.seen_seq = seq


def _add_ids(
    part: _Partition, seq: int, pulses: Sequence[Pulse], keys: list[str] | None = None
) -> None:
    """The client ids of log row `seq`, whose `_id_key`s are `keys` if the caller
    has them, into memory (see `_Partition.recent`)."""
    read_back = keys is None  # else a write of this process, whose pulses have no digest
    if keys is None:
        keys = [_id_key(p.tenant_id, p.pulse_id) for p in pulses if p.client_id]
    part.recent.update(zip(keys, itertools.repeat(seq)))
    if read_back and any(p.fingerprint for p in pulses):  # stored by an earlier version
        part.digests.update(
            (_id_key(p.tenant_id, p.pulse_id), p.fingerprint) for p in pulses if p.fingerprint
        )


def _forget_merged(part: _Partition) -> None:
    """Drop from memory the ids that `pulse_ids` holds: those up to `merged_seq`."""
    mark = part.merged_seq
    part.recent = {key: seq for key, seq in part.recent.items() if seq > mark}
    if part.digests:
        part.digests = {key: d for key, d in part.digests.items() if key in part.recent}


def _add_pulses(part: _Partition, seq: int, pulses: Sequence[Pulse]) -> None:
    """The bucket deltas of log row `seq`, and where its pulses are, into memory."""
    _add_deltas(part.pending, part.days, seq, pulses)
    if part.pending_since is None:
        part.pending_since = time.monotonic()


def _add_deltas(
    pending: dict[BucketKey, Delta],
    days: dict[tuple[str, str], list[int]],
    seq: int,
    pulses: Sequence[Pulse],
) -> None:
    """The bucket deltas of log row `seq` into `pending`, and `seq` into the list of
    each (tenant, day) its pulses are of, in `days`."""
    for key in add_pulses(pending, pulses):
        rows = days.get(key)
        if rows is None:
            days[key] = [seq]
        else:
            rows.append(seq)


def _fold(conn: sqlite3.Connection, part: _Partition) -> None:
    """Add the pending deltas to `buckets`, write a span of each (tenant, day) the
    folded log rows hold, and move `buckets_seq`, in the caller's transaction;
    memory follows once it commits.

    Memory holds every log row up to `seen_seq` (the caller has caught up). A
    partition this process does not keep the deltas of has them read from
    those rows now.
    """
    seq = part.seen_seq
    if seq == part.folded_seq:
        return
    pending, days = part.pending, part.days
    if not part.keeps:
        pending, days = {}, {}
        for row, body in conn.execute(
            "SELECT seq, body FROM pulse_log WHERE part = ? AND seq > ? AND seq <= ?",
            (part.index, part.folded_seq, seq),
        ):
            _add_deltas(pending, days, row, _decode_pulses(body))
    conn.executemany(
        _UPSERT_BUCKET,
        [(*key, part.index, format_nanos(d.nanos), d.count) for key, d in pending.items()],
    )
    # A row of ours can join memory before the rows of others before it
    # (`_Partition.ahead`): each list is sorted here.
    conn.executemany(
        "INSERT INTO pulse_spans (tenant_id, day, seq, last_seq, seqs) VALUES (?, ?, ?, ?, ?)",
        sorted(row for key, rows in days.items() for row in _span_rows(key, sorted(rows))),
    )
    conn.execute(_SET_META, (part.folded_key, str(seq)))

    def folded() -> None:
        part.pending.clear()
        part.days.clear()
        part.pending_since = None
        part.folded_seq = seq

    part.on_commit(folded)


class _MergePlan:
    """A merge of recent ids into `pulse_ids`, run a slice per transaction.

    `params` is every partition's recent ids when it was planned, `size`
    of them, sorted, flat: id_key, seq, id_key, seq, ..., as `_insert_ids`
    takes them (a tuple an id cost 48 bytes more); `digests`, the payload
    digests among them, as `_SET_DIGESTS` takes them; `marks`, how far each
    partition's log they cover; `purged`, the meta count `ids_purged` then;
    `merge_at`, how many ids waiting made it (see `_next_merge_at`). The ids
    stay in memory until the last slice has committed, so a lookup finds
    each of them somewhere all along.
    """

    def __init__(
        self, parts: Sequence[_Partition], purged: int = 0, merge_at: int = _MERGE_AT
    ) -> None:
        # Keys are unique across partitions (a tenant has one): sorted by key
        # alone, all in C, which compares strings faster than pairs (5.4
        # against 8.9 ms for 20,000).
        rows = sorted(itertools.chain.from_iterable(p.recent.items() for p in parts), key=_first)
        self.size = len(rows)
        self.params: list[str | int] = list(itertools.chain.from_iterable(rows))
        self.digests = [(digest, key) for p in parts for key, digest in p.digests.items()]
        self.marks = {part: part.seen_seq for part in parts}
        self.purged = purged
        self.merge_at = merge_at
        self.cpu = 0.0  # CPU seconds its slices' inserts took, in this thread
        self.done = 0  # rows inserted by committed transactions


def _next_merge_at(merge_at: int, cost: float) -> int:
    """How many recent ids start the next merge, after one planned at `merge_at`
    whose inserts cost `cost` CPU seconds an id: twice as many while that is
    more than `_MERGE_DEAR`, up to `_MERGE_MAX`; half as many, down to
    `_MERGE_AT`, once it is less than `_MERGE_CHEAP`.

    Once the index has far more pages than a merge has ids, each id costs
    about a page written, wherever the ids land. Merging random ids (as
    clients making UUIDs send) into 4,000,000 cost 17.5 µs of CPU an id in
    plans of 20,000, 12.0 in plans of 80,000, 7.2 in plans of 320,000
    (24 / 15 / 8 wall); into 1,000,000, 9.4 / 5.9 / 5.1. With 4,000,000
    random ids indexed (`bench/big_index.py`), the server took 26,789
    pulses/s of 1,000-pulse arrays of new random ids with plans of 20,000,
    and 50,872 this way, at ~35 MiB more RSS. Ids of a prefix and a counter
    land on a few pages whatever the plan, and cost about 1 µs in the
    server (0.6 alone; 1.5-3 when inserted a row a statement): there, bigger
    plans would only cost memory, and a longer pause in each round that
    plans or ends one (sorting, dropping the merged ids), so they stay at
    `_MERGE_AT`. Sized by the index's count instead, plans grew to 160,000
    in every store past 2,560,000 ids: in `make soak` (ids of a counter),
    RSS +24%.
    """
    if cost > _MERGE_DEAR:
        return min(2 * merge_at, _MERGE_MAX)
    if cost < _MERGE_CHEAP:
        return max(merge_at // 2, _MERGE_AT)
    return merge_at


def _merge_ids(conn: sqlite3.Connection, parts: Sequence[_Partition]) -> None:
    """Move the recent ids of `parts` into `pulse_ids`, in index order, within the
    caller's transaction, which has touched `parts` (`_File.touch`).

    If that transaction rolls back, the watermarks stay behind the memory's,
    and the next `_catch_up` rebuilds memory from the log.
    """
    plan = _MergePlan(parts)
    _insert_ids(conn, plan.params)
    conn.executemany(_SET_DIGESTS, plan.digests)
    conn.executemany(_SET_META, [(part.merged_key, str(mark)) for part, mark in plan.marks.items()])
    for part, mark in plan.marks.items():
        part.recent.clear()
        part.digests.clear()
        part.merged_seq = mark


def _insert_ids(conn: sqlite3.Connection, params: list[str | int]) -> None:
    """Insert into `pulse_ids` the ids `params` (id_key, seq, id_key, seq, ...), those
    it holds already left as they are, `_INSERT_ROWS` a statement."""
    step = 2 * _INSERT_ROWS
    whole = len(params) - len(params) % step
    for start in range(0, whole, step):
        conn.execute(_INSERT_IDS, params[start : start + step])
    rest = params[whole:]
    conn.executemany(_INSERT_ID, zip(rest[::2], rest[1::2], strict=True))


def _known_ids(
    conn: sqlite3.Connection, part: _Partition, pulses: Sequence[Pulse]
) -> tuple[dict[tuple[str, str], Pulse | bytes], list[str | None]]:
    """What `resolve` compares each known client id among `pulses` with: the pulse
    stored with it, read from its log row, or the digest of its payload, which
    earlier versions kept with each id. Memory first, then the index. And the
    `_id_key` of each pulse, None for one without a client id."""
    known: dict[tuple[str, str], Pulse | bytes] = {}
    keys: list[str | None] = []
    missing: list[str] = []
    rows: dict[int, set[tuple[str, str]]] = {}  # log row -> known ids stored in it
    recent, digests = part.recent, part.digests
    for p in pulses:
        if not p.client_id:
            keys.append(None)
            continue
        key = _id_key(p.tenant_id, p.pulse_id)
        keys.append(key)
        seq = recent.get(key)
        if seq is None:
            missing.append(key)
        elif digests and key in digests:
            known[(p.tenant_id, p.pulse_id)] = digests[key]
        else:
            rows.setdefault(seq, set()).add((p.tenant_id, p.pulse_id))
    if missing:
        # One statement, whatever the count: the keys go in as one JSON
        # array, and each is looked up through the primary key.
        for key, digest, seq in conn.execute(_LOOKUP_IDS, (_encode(missing),)):
            tenant, _, pulse_id = key.partition(_SEP)
            if digest:
                known[(tenant, pulse_id)] = digest
            else:
                rows.setdefault(seq, set()).add((tenant, pulse_id))
    if rows:
        # Found only where an id comes again: new ids cost nothing here.
        for seq, body in conn.execute(
            "SELECT seq, body FROM pulse_log WHERE seq IN (SELECT value FROM json_each(?))",
            (_encode(list(rows)),),
        ):
            wanted = rows.pop(seq)
            for p in _decode_pulses(body):
                if p.client_id and (p.tenant_id, p.pulse_id) in wanted:
                    known[(p.tenant_id, p.pulse_id)] = p
        if rows:  # purge takes an id with its row, in one transaction
            raise StoreError(f"write pulses: log rows {sorted(rows)} of known ids are missing")
    return known, keys


def _bucket_state(row: tuple[Any, ...]) -> BucketState:
    day, tenant, sku, unit, used, count, committed, committed_count, revision = row
    return BucketState(
        (day, tenant, sku, unit),
        parse_nanos(used),
        count,
        parse_nanos(committed),
        committed_count,
        revision,
    )


def _aggregate(row: tuple[Any, ...]) -> Aggregate:
    day, tenant, sku, unit, used, count, committed, committed_count, revision = row
    return Aggregate(tenant, sku, unit, day, used, count, committed, committed_count, revision)
