"""The shared store: one PostgreSQL database for several processes or machines.

It keeps the semantics of the SQLite store exactly; only the arbitration
differs. SQLite has a file per partition and its write lock; here every
partition shares the tables, and each writing transaction on partition `p`
first takes `pg_advisory_xact_lock(<store key>, p)`. Writers of one partition
are therefore serialised across every instance, as they are on one SQLite
file, so "look up the ids, then insert" and "read the open buckets, then
mark them committed" are race-free. The unique index on client ids stays as
a safety net. The lock ends with the transaction, also when the connection
dies, so a killed instance never leaves a partition locked or half-written.

Amounts are NUMERIC (exact, unbounded), timestamps µs since the epoch as in
SQLite, and names are `COLLATE "C"` so every order (and so every cursor) is
the code-point order SQLite and Python use, whatever the database's locale.

Errors of psycopg and its pool become `StoreError`s here: lock and pool
timeouts `StoreBusy`, a full disk `StoreFull`, a database that is not ours
`StoreMismatch`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import os
import secrets
import socket
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import msgspec
import psycopg
import psycopg_pool
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow

from ..clock import moment
from ..config import shown_url, without_secrets
from ..errors import StoreBusy, StoreError, StoreFull, StoreMismatch, StoreOutcomeUnknown
from ..ledger import (
    BATCH_MAX_BYTES,
    BucketState,
    bucket_deltas,
    new_batches,
    partition_of_batch,
    resolve,
)
from ..model import (
    Aggregate,
    Batch,
    BatchSummary,
    BatchView,
    Outcome,
    Pulse,
    StoredPulse,
    assigned_id,
    payload_digest,
)
from ..money import format_nanos
from ..partition import partition_of
from . import LEAD_LAPSE, AggregateQuery, BatchQuery, DueBatch, PulseQuery, WriterLock
from .filters import aggregate_filter, batch_filter, where

__all__ = ["PostgresStore"]

APPLICATION = "billing-ingestor"
SCHEMA_VERSION = 1
_CREATE_LOCK = 0x42494E47  # "BING": one-key advisory lock around schema creation
_LEADER = -1  # second key of the committer's lock; partitions' locks use 0, 1, ...
_PROBES = 5  # statements a session, two sessions, that tell a pooler sharing them
_PURGE_CHUNK = 5000
# A reading of the database's clock is trusted if its round trip took at most
# this long (its error is half of it), and tried this many times at most.
_CLOCK_TRIP_NS = 1_000_000_000
_CLOCK_TRIES = 3

log = logging.getLogger("ingestor.store")

Connection = psycopg.Connection[TupleRow]
_OUT_OF_REACH_WAIT = 1.0  # seconds a request waits for a session of a database out of reach

# What `outbox_batches` counts failed batches by, at every scrape, rather than
# reading the whole table. Stores made before it get it when opened
# (`_add_indexes`): an index needs no new schema version.
_FAILED_BATCHES = (
    "CREATE INDEX IF NOT EXISTS batches_failed ON batches (partition) WHERE status = 'failed'"
)
_OUTBOX_BATCHES = (
    "SELECT (SELECT count(*) FROM batches WHERE status = 'pending'),"
    " (SELECT count(*) FROM batches WHERE status = 'failed')"
)

_SCHEMA = f"""
CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE pulses (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    partition integer NOT NULL,
    tenant_id text COLLATE "C" NOT NULL,
    pulse_id text COLLATE "C" NOT NULL,
    client_id boolean NOT NULL,
    product_sku text COLLATE "C" NOT NULL,
    use_unit text COLLATE "C" NOT NULL,
    day date NOT NULL,
    used_amount numeric NOT NULL,
    ts bigint NOT NULL,
    received_at bigint NOT NULL,
    fingerprint bytea
);
CREATE UNIQUE INDEX pulses_client_id ON pulses (tenant_id, pulse_id) WHERE client_id;
CREATE INDEX pulses_by_day ON pulses (tenant_id, day, seq);
CREATE INDEX pulses_by_age ON pulses (partition, received_at);
CREATE TABLE buckets (
    partition integer NOT NULL,
    day date NOT NULL,
    tenant_id text COLLATE "C" NOT NULL,
    product_sku text COLLATE "C" NOT NULL,
    use_unit text COLLATE "C" NOT NULL,
    used_amount numeric NOT NULL,
    pulse_count bigint NOT NULL,
    committed_amount numeric NOT NULL,
    committed_count bigint NOT NULL,
    revision integer NOT NULL,
    PRIMARY KEY (partition, day, tenant_id, product_sku, use_unit)
);
CREATE INDEX buckets_listing ON buckets (day, tenant_id, product_sku, use_unit);
CREATE INDEX buckets_open ON buckets (partition, day) WHERE pulse_count > committed_count;
CREATE TABLE batches (
    batch_id text COLLATE "C" PRIMARY KEY,
    partition integer NOT NULL,
    day date NOT NULL,
    seq integer NOT NULL,
    kind text NOT NULL CHECK (kind IN ('initial', 'correction')),
    created_at bigint NOT NULL,
    record_count integer NOT NULL,
    used_amount numeric NOT NULL,
    body bytea NOT NULL,
    status text NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts integer NOT NULL,
    last_error text,
    next_attempt_at bigint,
    delivered_at bigint,
    UNIQUE (partition, day, seq)
);
CREATE INDEX batches_listing ON batches (day, batch_id);
CREATE INDEX batches_due ON batches (partition, next_attempt_at) WHERE status = 'pending';
{_FAILED_BATCHES};
"""
_TABLES = ("meta", "pulses", "buckets", "batches")

_KNOWN_IDS = """
SELECT p.tenant_id, p.pulse_id, p.fingerprint
FROM unnest(%s::text[], %s::text[]) AS k (tenant_id, pulse_id)
JOIN pulses AS p ON p.client_id AND p.tenant_id = k.tenant_id AND p.pulse_id = k.pulse_id
"""

# A write's pulses go as one JSON array in one INSERT, not a COPY. A COPY's
# rows arrive after its statement has begun, and the server waits for them
# however long: neither statement_timeout nor the idle-in-transaction timeout
# ends a session waiting for COPY data. An instance that stopped there (a
# paused container or VM) kept its partition's lock for as long as it was
# stopped, and every instance's writes and commits of that partition were
# refused. A statement's parameters come with it: a session stopped while
# sending them is idle in its transaction, and ended after three busy
# timeouts. JSON encoded by msgspec also costs the instance less than the
# COPY's rows (0.6 against 1.05 CPU µs a row of 1,000), the server more
# (about 1.6 µs a pulse, bench/RESULTS.md).
_INSERT_PULSES = """
INSERT INTO pulses (partition, tenant_id, pulse_id, client_id, product_sku, use_unit, day,
                    used_amount, ts, received_at, fingerprint)
SELECT %s, r->>0, r->>1, (r->>2)::boolean, r->>3, r->>4, (r->>5)::date,
       (r->>6)::numeric, (r->>7)::bigint, %s, decode(r->>8, 'base64')
FROM jsonb_array_elements(%s::text::jsonb) WITH ORDINALITY AS e (r, n)
ORDER BY n
"""

_UPSERT_BUCKETS = """
INSERT INTO buckets AS b (partition, day, tenant_id, product_sku, use_unit, used_amount,
                          pulse_count, committed_amount, committed_count, revision)
SELECT %s, d.day, d.tenant_id, d.product_sku, d.use_unit, d.used_amount, d.pulse_count, 0, 0, 0
FROM unnest(%s::date[], %s::text[], %s::text[], %s::text[], %s::numeric[], %s::bigint[])
    AS d (day, tenant_id, product_sku, use_unit, used_amount, pulse_count)
ON CONFLICT (partition, day, tenant_id, product_sku, use_unit) DO UPDATE SET
    used_amount = b.used_amount + excluded.used_amount,
    pulse_count = b.pulse_count + excluded.pulse_count
"""

_INSERT_BATCH = """
INSERT INTO batches (batch_id, partition, day, seq, kind, created_at, record_count,
                     used_amount, body, status, attempts, next_attempt_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s::numeric, %s, 'pending', 0, %s)
"""

# The oldest pulses of the partition by the age index, then each deleted by
# its key: with a plain `IN (SELECT ...)` the planner may hash-join the table.
_PURGE = """
DELETE FROM pulses WHERE seq = ANY (ARRAY (
    SELECT seq FROM pulses WHERE partition = %s AND received_at < %s
    ORDER BY received_at LIMIT %s
))
"""

# A meta number (a time) that only moves forward, whoever writes it.
_KEEP_LATEST = """
INSERT INTO meta (key, value) VALUES (%s, %s)
ON CONFLICT (key) DO UPDATE SET value = GREATEST(meta.value::bigint, excluded.value::bigint)::text
"""

_NEVER = 1 << 62  # "no latest_us": later than any next attempt
_DUE_BATCHES = """
SELECT p.partition, b.batch_id, b.day, b.attempts
FROM generate_series(0, %s - 1) AS p (partition)
CROSS JOIN LATERAL (
    SELECT batch_id, day, attempts, next_attempt_at FROM batches
    WHERE batches.partition = p.partition AND status = 'pending'
        AND (next_attempt_at <= %s OR next_attempt_at > %s)
    ORDER BY next_attempt_at, batch_id LIMIT %s
) AS b
ORDER BY p.partition, b.next_attempt_at, b.batch_id
"""

_BUCKET_COLUMNS = (
    "day, tenant_id, product_sku, use_unit, used_amount, pulse_count,"
    " committed_amount, committed_count, revision"
)
_BATCH_COLUMNS = (
    "batch_id, partition, day, kind, created_at, record_count, used_amount, status, attempts,"
    " last_error, next_attempt_at, delivered_at"
)

_encode = msgspec.json.Encoder().encode
_decode_batch = msgspec.json.Decoder(Batch).decode


def _nanos(amount: Decimal) -> int:
    """A NUMERIC read back, as exact nano-units (no decimal context, so no rounding)."""
    _, digits, exponent = amount.as_tuple()
    assert isinstance(exponent, int)  # we never store NaN
    mantissa = int("".join(map(str, digits)))
    scale: int = 10 ** abs(exponent + 9)
    return mantissa * scale if exponent >= -9 else mantissa // scale


def _amount(amount: Decimal) -> str:
    return format_nanos(_nanos(amount))


def _moment(us: int | None) -> dt.datetime | None:
    return None if us is None else moment(us)


def _where(conninfo: str) -> str:
    """Where the database is, for messages: never the password."""
    try:
        # From the URL without its credentials: libpq reads pieces of a
        # password holding an unencoded "/" or "@" as the host or the port.
        params = conninfo_to_dict(shown_url(conninfo))
    except psycopg.ProgrammingError:
        return "the configured PostgreSQL URL"
    # A list of hosts (a standby to fail over to) pairs each with its port,
    # or all with the one port given.
    hosts = str(params.get("host") or "localhost").split(",")
    ports = str(params.get("port") or "5432").split(",")
    if len(ports) != len(hosts):
        ports = ports[:1] * len(hosts)
    places = ",".join(f"{host}:{port or 5432}" for host, port in zip(hosts, ports, strict=True))
    return f"PostgreSQL at {places}/{params.get('dbname') or ''}"


def _translate(exc: psycopg.Error, what: str) -> StoreError:
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return StoreBusy(f"{what}: no database connection became free in time ({exc})")
    if isinstance(exc, psycopg_pool.PoolClosed):
        return StoreError(f"{what}: the store is closed")
    if isinstance(exc, pg_errors.DiskFull):
        return StoreFull(f"{what}: the disk under the database is full: {exc}")
    if isinstance(
        exc,
        pg_errors.LockNotAvailable
        | pg_errors.QueryCanceled
        | pg_errors.SerializationFailure
        | pg_errors.DeadlockDetected
        | pg_errors.InsufficientResources,
    ):
        return StoreBusy(f"{what}: the database stayed busy past the busy timeout: {exc}")
    if isinstance(exc, pg_errors.UniqueViolation):
        # Only reachable if a writer bypassed the partition lock: the retry
        # sees the row that won and reports the pulse as a duplicate.
        return StoreBusy(f"{what}: a concurrent writer stored the same key; retry: {exc}")
    if isinstance(exc, pg_errors.UndefinedTable | pg_errors.UndefinedColumn):
        return StoreMismatch(f"{what}: the database no longer holds our schema: {exc}")
    if isinstance(exc, psycopg.OperationalError):
        return StoreError(f"{what}: lost the connection to PostgreSQL: {exc}")
    return StoreError(f"{what}: {exc}")


@contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except psycopg.Error as exc:
        raise _translate(exc, what) from exc


def _require_utf8(conn: Connection, where: str) -> None:
    """Raise StoreMismatch unless the database keeps text as UTF-8: tenants, SKUs
    and units are any Unicode, and a write holding one the database's encoding
    cannot hold fails, with every pulse its round writes, at each retry."""
    row = conn.execute("SHOW server_encoding", prepare=False).fetchone()
    encoding = None if row is None else str(row[0])
    if encoding != "UTF8":
        raise StoreMismatch(
            f"{where} keeps text as {encoding}; the store needs a UTF8 database"
            " (CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0)"
        )


def _ensure_schema(conn: Connection, partitions: int) -> dict[str, str]:
    """Create the schema if it is missing and return the meta table.

    One transaction under a one-key advisory lock: of several processes that
    start on an empty database together, one creates the store (and its id)
    and the others wait, then find it. A crash inside leaves no schema at all.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_CREATE_LOCK,))
        missing = [
            name
            for name, oid in conn.execute(
                "SELECT t, to_regclass(t) FROM unnest(%s::text[]) AS t", (list(_TABLES),)
            )
            if oid is None
        ]
        if missing == list(_TABLES):
            _refuse_unreached_store(conn)
            try:
                conn.execute(_SCHEMA)
            except pg_errors.DuplicateTable as exc:
                raise StoreMismatch(
                    f"the database already holds a table that is not ours ({exc});"
                    " refusing to use it: give the store its own database or schema"
                ) from exc
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO meta (key, value) VALUES (%s, %s)",
                    [
                        ("application", APPLICATION),
                        ("schema_version", str(SCHEMA_VERSION)),
                        ("store_id", secrets.token_hex(6)),
                        ("partitions", str(partitions)),
                        ("created_at", dt.datetime.now(dt.UTC).isoformat()),
                    ],
                )
        elif missing:
            present = ", ".join(name for name in _TABLES if name not in missing)
            raise StoreMismatch(
                f"the database holds tables named {present} but no whole store;"
                " refusing to use it: give the store its own database or schema"
            )
        rows = conn.execute("SELECT key, value FROM meta").fetchall()
    meta = {str(key): str(value) for key, value in rows}
    if meta.get("application") != APPLICATION:
        raise StoreMismatch("the database's meta table is not a billing-ingestor store's")
    if meta.get("schema_version") != str(SCHEMA_VERSION):
        raise StoreMismatch(
            f"schema version {meta.get('schema_version')}, this version reads {SCHEMA_VERSION}"
        )
    return meta


def _refuse_unreached_store(conn: Connection) -> None:
    """Raise StoreMismatch if a schema the session's search_path does not reach
    holds a store this role writes: the search_path changed since (a DBA
    applying the manual's "secure schema usage pattern", search_path =
    "$user"), and a new, empty store made here would take again, as new,
    every id the other holds, and bill again every day it delivered.

    A store this role cannot write (no INSERT on its tables, or no USAGE of
    its schema) is another deployment's, and is left alone.
    """
    found = conn.execute(
        "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relname = 'meta' AND c.relkind IN ('r', 'p')"
        " AND has_table_privilege(c.oid, 'INSERT') AND has_schema_privilege(n.oid, 'USAGE')"
        " AND (SELECT count(*) FROM pg_class t WHERE t.relnamespace = c.relnamespace"
        "      AND t.relname = ANY(%s::text[])) = %s"
        " ORDER BY 1",
        (list(_TABLES), len(_TABLES)),
    ).fetchall()
    if found:
        schemas = ", ".join(str(schema) for (schema,) in found)
        path = conn.execute("SHOW search_path", prepare=False).fetchone()
        raise StoreMismatch(
            f"schema {schemas} holds a store this role writes, but the search_path"
            f" ({path[0] if path else ''}) does not reach it, and a new, empty store would"
            " count again every pulse it holds: put that schema on the search_path (in the"
            " store URL: options=-csearch_path%3D<schema>, or ALTER ROLE ... SET"
            " search_path), or, to start a new store here, take from this role the INSERT"
            " on that store's tables or the USAGE of its schema"
        )


def _lock_key(store_id: str) -> int:
    """The first key of this store's partition locks: an int4 made from its id."""
    return zlib.crc32(store_id.encode()) - 2**31


def _add_indexes(conn: Connection) -> None:
    """Add the indexes a store made by an earlier release lacks (see `_FAILED_BATCHES`).

    Only when one is missing: creating an index locks out writes to its table.
    Under the schema's lock, as two processes creating one index at once may
    both fail."""
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_CREATE_LOCK,))
            row = conn.execute("SELECT to_regclass('batches_failed')").fetchone()
            if row is not None and row[0] is None:
                conn.execute(_FAILED_BATCHES)
    except pg_errors.InsufficientPrivilege as exc:
        # A role granted only reads and writes (its tables made by their
        # owner): a start was refused for an index that only speeds up the
        # count of failed batches, and an upgrade took every instance down.
        log.warning(
            "store index missing",
            extra={
                "fields": {
                    "error": str(exc).strip(),
                    "note": "the failed-batches count reads every batch of the outbox until"
                    f" the tables' owner runs: {_FAILED_BATCHES}",
                }
            },
        )


class _Watchdog:
    """Ends a session whose database has stopped answering: shuts its socket
    down once it has been lent for `limit` seconds, so the call in progress
    fails as a lost connection, and is answered 503, instead of waiting.

    Keepalives and the TCP user timeout (`_Connector`) notice a database
    that cannot be reached, not one whose host still acknowledges every
    packet while the database does nothing (an I/O stall, a paused VM, its
    processes stopped): requests then waited as long as it stayed so. One
    thread for the store, woken four times a second; a session is watched
    only while it is lent, and its socket shut down only under the lock
    that ends its watch, so never once it is back in the pool.
    """

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._watched: dict[int, tuple[float, int]] = {}  # id(conn) -> (deadline, socket)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, conn: Connection) -> Iterator[None]:
        key = id(conn)
        with self._lock:
            self._watched[key] = (time.monotonic() + self.limit, conn.pgconn.socket)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="postgres-watchdog", daemon=True
                )
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                del self._watched[key]

    def close(self) -> None:
        self._closed.set()

    def _run(self) -> None:
        while not self._closed.wait(min(0.25, self.limit / 4)):
            now = time.monotonic()
            with self._lock:
                for deadline, fd in self._watched.values():
                    if deadline < now:
                        with (
                            contextlib.suppress(OSError),
                            socket.socket(fileno=os.dup(fd)) as dup,
                        ):
                            dup.shutdown(socket.SHUT_RDWR)


class _CheckAll:
    """The pool's check of a connection it lends. One found dead (the database
    restarted, or ended idle sessions) has every idle one checked at once:
    checked one a try, with a pause between tries, each dead session cost a
    request up to a second, and a pool of them the whole busy timeout."""

    def __init__(self, watchdog: _Watchdog) -> None:
        self.pool: psycopg_pool.ConnectionPool[Connection] | None = None
        self._watchdog = watchdog

    def __call__(self, conn: Connection) -> None:
        try:
            with self._watchdog.watch(conn):
                psycopg_pool.ConnectionPool.check_connection(conn)
        except Exception:
            if self.pool is not None:
                self.pool.check()
            raise


class _Connector:
    """How this store connects: the URL, and the session settings of every connection."""

    def __init__(self, url: str, busy_timeout: float) -> None:
        self.url = url
        self.where = _where(url)
        self.busy_timeout = busy_timeout
        # UTF-8 whatever the database or the role sets: in another client
        # encoding a tenant's name that encoding cannot hold raised out of
        # psycopg and stopped the process, and in SQL_ASCII every text came
        # back as bytes, names a batch carried as base64.
        self.kwargs: dict[str, Any] = {"autocommit": True, "client_encoding": "UTF8"}
        if "application_name" not in url:
            self.kwargs["application_name"] = APPLICATION
        # The session's timeouts are the server's to enforce: a server that
        # cannot be reached (packets dropped, not refused) never answers, and a
        # thread waiting on it waited until the kernel gave up on the
        # connection, many minutes later. Keepalives notice a silent server
        # while a statement runs, the user timeout data it never acknowledges:
        # either closes the connection after about three busy timeouts, and
        # the call fails with a StoreError. The URL's own settings win.
        try:
            given = conninfo_to_dict(url)
        except psycopg.ProgrammingError:
            given = {}  # connecting says what is wrong with the URL
        idle = max(1, round(busy_timeout))
        bound = {
            "keepalives": 1,
            "keepalives_idle": idle,
            "keepalives_interval": idle,
            "keepalives_count": 2,
            "tcp_user_timeout": 3 * idle * 1000,
        }
        self.kwargs.update({k: v for k, v in bound.items() if k not in given})
        self._timeout_ms = str(max(1, round(busy_timeout * 1000)))
        self._idle_ms = str(max(1, round(busy_timeout * 3000)))
        self.watchdog = _Watchdog(3 * busy_timeout)
        # When a connection was last made, and last refused (monotonic), and
        # why; what the log last said: nothing yet (a store that cannot be
        # opened says so in the one line the start ends with), "up" or "out".
        self.connected_at = -math.inf
        self.refused_at = -math.inf
        self.refusal = ""
        self._said_state = ""
        self._said = threading.Lock()

    def refused(self, exc: psycopg.Error) -> None:
        """A connection could not be made: remembered, with the server's reason
        (for the answers of requests that waited for one), and said once."""
        self.refusal = " ".join(without_secrets(str(exc), self.url).split())
        self.refused_at = time.monotonic()
        with self._said:
            was, self._said_state = self._said_state, self._said_state and "out"
        if was == "up":
            log.warning(
                "cannot connect to the store",
                extra={"fields": {"store": self.where, "error": self.refusal}},
            )

    def connection_class(self) -> type[Connection]:
        """The pool's connections, whose failures to connect `refused` hears of
        (psycopg_pool only logs them)."""
        connector = self

        class Reported(psycopg.Connection[TupleRow]):
            @classmethod
            def connect(cls, conninfo: str = "", **kwargs: Any) -> Reported:
                try:
                    return super().connect(conninfo, **kwargs)
                except psycopg.Error as exc:
                    connector.refused(exc)
                    raise

        return Reported

    def configure(self, conn: Connection) -> None:
        # lock_timeout bounds the wait for a partition lock (SQLite's busy
        # timeout); statement_timeout bounds any one statement; a session
        # that stalls inside a transaction is ended so it cannot keep a
        # partition locked for every other instance.
        #
        # And two of the database's defaults are not left to it. READ
        # COMMITTED: a transaction's statements after its partition lock
        # see what the lock's previous holder committed (under REPEATABLE
        # READ the snapshot was taken by the lock's own SELECT, before the
        # wait, and every racer lost with an error). synchronous_commit on:
        # COMMIT returns once the WAL is flushed, which a 2xx promises.
        #
        # And the server's own sends: one blocked sending rows to an instance
        # that stopped without dying (a paused container or VM), whose
        # socket takes no more, waits for it however long, locks held, and
        # statement_timeout does not end it (a commit's 20,000 buckets held
        # their partition for the whole stop). The server's tcp_user_timeout
        # ends that connection after three busy timeouts too. Over a Unix
        # socket there is no such bound.
        #
        # Watched: a pooler (PgBouncer) lets a client log in at once and
        # queues its first statement until a server connection is free, for
        # two minutes by default; a start, or the leader's next try, waited
        # that long, and a shutdown behind it.
        with self.watchdog.watch(conn):
            self._configure(conn)
        self.connected_at = time.monotonic()
        with self._said:
            was, self._said_state = self._said_state, "up"
        if was == "out":
            log.info("connected to the store again", extra={"fields": {"store": self.where}})

    def _configure(self, conn: Connection) -> None:
        conn.execute(
            "SELECT set_config('lock_timeout', %s, false),"
            " set_config('statement_timeout', %s, false),"
            " set_config('idle_in_transaction_session_timeout', %s, false),"
            " set_config('tcp_user_timeout', %s, false),"
            " set_config('default_transaction_isolation', 'read committed', false),"
            " set_config('synchronous_commit', 'on', false)",
            (self._timeout_ms, self._timeout_ms, self._idle_ms, self._idle_ms),
        )

    def connect(self) -> Connection:
        """One connection of its own, outside the pool. Raises StoreError."""
        try:
            conn = psycopg.connect(
                self.url, connect_timeout=max(2, round(self.busy_timeout)), **self.kwargs
            )
        except psycopg.Error as exc:
            self.refused(exc)
            raise StoreError(f"cannot connect to {self.where}: {self.refusal}") from exc
        try:
            with _translated(f"configure a connection to {self.where}"):
                self.configure(conn)
        except BaseException:
            conn.close()
            raise
        return conn


_SHARED = (
    "{where} shares its server sessions between clients, transaction by transaction"
    " or statement by statement (a pooler such as PgBouncer in transaction or statement"
    " pool mode): the committer's leadership is a session's lock, and needs a session of"
    " its own. Use session pooling (PgBouncer's pool_mode = session), or connect directly"
)


def _refuse_shared_sessions(one: Connection, other: Connection, where: str) -> None:
    """Raise StoreMismatch if `one` and `other`, two client connections, are not
    each a server session of its own all along: a pooler lends server
    sessions a transaction or a statement at a time.

    Statements on one and the other in turn, each a transaction: such a
    pooler soon lends one the session the other just gave back (PgBouncer
    lends the last given back first), or one another than before. A pooler
    that lends whole client connections (session pooling) passes, as a
    direct connection does.
    """
    seen: list[set[int]] = [set(), set()]
    for _ in range(_PROBES):
        for conn, pids in zip((one, other), seen, strict=True):
            row = conn.execute("SELECT pg_backend_pid()", prepare=False).fetchone()
            assert row is not None
            pids.add(int(row[0]))
    if len(seen[0]) > 1 or len(seen[1]) > 1 or seen[0] & seen[1]:
        raise StoreMismatch(_SHARED.format(where=where))


def _relayed(conn: Connection) -> bool:
    """Whether something relays `conn` to the server (a pooler, a proxy): the
    server then sees another peer than this end of the connection."""
    row = conn.execute("SELECT inet_client_port()", prepare=False).fetchone()
    seen = None if row is None else row[0]
    with socket.socket(fileno=os.dup(conn.pgconn.socket)) as ours:
        if ours.family == socket.AF_UNIX:
            return seen is not None
        return bool(seen != ours.getsockname()[1])


def _end_when_silent(conn: Connection, lapse: float) -> None:
    """Have the server end `conn`'s session once it has been idle, or its peer
    silent, for about `lapse` seconds (see `PostgresStore.lead_committer`).
    Over a Unix socket there are no keepalives: the server ignores them."""
    probe = str(max(1, round(lapse / 4)))
    settings = [
        ("tcp_keepalives_idle", probe),
        ("tcp_keepalives_interval", probe),
        ("tcp_keepalives_count", "3"),
    ]
    if conn.info.server_version >= 140000:
        settings.append(("idle_session_timeout", str(max(1, round(lapse * 1000)))))
    conn.execute(
        "SELECT " + ", ".join("set_config(%s, %s, false)" for _ in settings),
        [value for setting in settings for value in setting],
    )


class PostgresStore:
    """The `Store` on one PostgreSQL database shared by every instance.

    Thread-safe: each method takes a connection from a bounded pool (waiting
    at most `busy_timeout` for one) and runs one transaction on it.
    """

    def __init__(
        self,
        connector: _Connector,
        pool: psycopg_pool.ConnectionPool[Connection],
        store_id: str,
        partitions: int,
        watchdog: _Watchdog,
    ) -> None:
        self.store_id = store_id
        self.partitions = partitions
        self.write_lanes = partitions
        self._connector = connector
        self._pool = pool
        self._watchdog = watchdog
        self._lock = _lock_key(store_id)
        self._leader: Connection | None = None
        self._leader_pid = 0  # the server process of the leader's session
        self._leader_guard = threading.Lock()
        self._shared: str | None = None  # why the sessions are not our own (`lead_committer`)
        self._read_only: str | None = None  # why writes are refused, till one may write (`trouble`)

    @classmethod
    def open(
        cls, url: str, *, partitions: int, pool_size: int, busy_timeout: float
    ) -> PostgresStore:
        """Connect, create the schema if it is missing, and open the pool.

        The partition count recorded in the database wins over `partitions`,
        which only applies when this call creates the store.
        """
        connector = _Connector(url, busy_timeout)
        with connector.connect() as conn, connector.connect() as other:
            try:
                _require_utf8(conn, connector.where)
                _refuse_shared_sessions(conn, other, connector.where)
                if _relayed(conn):
                    # Behind a pooler, a statement psycopg prepared on one
                    # session could be run by name on another where that
                    # name is another statement, and bind our values to it.
                    connector.kwargs["prepare_threshold"] = None
                    log.info(
                        "store relayed",
                        extra={
                            "fields": {
                                "note": "the database sees another peer (a pooler, a proxy):"
                                " no prepared statements"
                            }
                        },
                    )
                meta = _ensure_schema(conn, partitions)
                _add_indexes(conn)
            except psycopg.Error as exc:
                raise _translate(exc, f"open {connector.where}") from exc
        store_id, count = meta["store_id"], int(meta["partitions"])
        watchdog = connector.watchdog
        check = _CheckAll(watchdog)
        pool: psycopg_pool.ConnectionPool[Connection] = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs=connector.kwargs,
            connection_class=connector.connection_class(),
            configure=connector.configure,
            check=check,
            timeout=busy_timeout,
            # A connection lost (the database restarted) is made again by the
            # pool's own loop, whose tries come 1, 3, 7, 15, 31 ... s apart for
            # up to 5 minutes, and no other try is made meanwhile: after an
            # outage of 40 s, 23.7 s more of 503s. Given up after a busy
            # timeout, the next request that finds no connection tries at once.
            reconnect_timeout=busy_timeout,
            name=f"store-{store_id}",
            open=False,
        )
        check.pool = pool
        try:
            pool.open(wait=True, timeout=busy_timeout)
        except psycopg_pool.PoolTimeout as exc:
            pool.close()
            message = without_secrets(str(exc), connector.url)
            raise StoreError(f"cannot connect to {connector.where}: {message}") from exc
        store = cls(connector, pool, store_id, count, watchdog)
        if not store._writable():
            # Opening a store only reads: served, each write answered 503, and
            # /readyz 503, until a session may write.
            store._read_only = f"{connector.where} takes no writes (a read-only transaction)"
            log.warning("store read-only", extra={"fields": {"error": store._read_only}})
        return store

    def close(self) -> None:
        with self._leader_guard:
            if self._leader is not None:
                self._leader.close()  # ends the session, and the leadership with it
                self._leader = None
        self._pool.close()
        self._watchdog.close()

    def writing_together(self) -> contextlib.AbstractContextManager[None]:
        # Each write is its own transaction on its own connection: a shard
        # per partition runs them side by side (`write_lanes`).
        return contextlib.nullcontext()

    def lead_committer(self, lapse: float = LEAD_LAPSE) -> bool:
        """Hold a session-level advisory lock on a connection of our own.

        The lock lives exactly as long as that session: closing the store,
        the process dying or the server ending the session releases it, and
        then another instance's next try takes it. A process that stops
        without dying (SIGSTOP, a paused container or machine) or is cut off
        leaves its session open, and kept the lock, so that no instance
        committed, until the server's keepalives gave up (two hours by
        default). So the server is asked to end the session once it has been
        idle for `lapse` (`idle_session_timeout`, PostgreSQL 14 and later), or
        its peer has not answered keepalives for about as long (on 13, only
        that: a stopped process on a running machine keeps the lock there).
        """
        with self._leader_guard:
            if self._shared is not None:
                return False
            if self._leader is not None:
                try:
                    with self._watchdog.watch(self._leader):
                        row = self._leader.execute(
                            "SELECT pg_backend_pid()", prepare=False
                        ).fetchone()
                except psycopg.Error:
                    # The session is gone and its lock with it; another
                    # instance may lead by now, so try again like a newcomer.
                    self._leader.close()
                    self._leader = None
                else:
                    if row is not None and row[0] == self._leader_pid:
                        return True
                    self._leader.close()
                    self._leader = None
                    self._shared = _SHARED.format(where=self._connector.where)
                    log.error("store sessions shared", extra={"fields": {"error": self._shared}})
                    return False
            conn = self._connector.connect()
            try:
                with _translated("lead committer"), self._watchdog.watch(conn):
                    _end_when_silent(conn, lapse)
                    row = conn.execute(
                        "SELECT pg_try_advisory_lock(%s, %s), pg_backend_pid()",
                        (self._lock, _LEADER),
                    ).fetchone()
            except BaseException:
                conn.close()
                raise
            if row is None or not row[0]:
                conn.close()
                return False
            self._leader, self._leader_pid = conn, row[1]
            return True

    @contextmanager
    def _session(self, what: str) -> Iterator[Connection]:
        """A pooled session. A wait for one that ran out while the database is
        out of reach (the last attempt to connect failed) says so, naming it
        and giving the server's reason (StoreError: 503 `store_unavailable`),
        rather than that every session was in use
        (StoreBusy, which the caller's `_translated` makes of the timeout):
        a database that was down answered every request `store_busy`,
        retried after a second, and logged that no connection "became free
        in time". While it is out of reach a request waits `_OUT_OF_REACH_WAIT`
        s at most, not its busy timeout, to be told so: each held its place
        among the requests in flight for the whole busy timeout (10 s by
        default) to be told the same. A session made meanwhile is still
        taken at once."""
        connector = self._connector
        out = connector.refused_at > connector.connected_at
        wait = min(connector.busy_timeout, _OUT_OF_REACH_WAIT) if out else None
        given = False
        try:
            with self._pool.connection(timeout=wait) as conn:
                given = True
                yield conn
        except psycopg_pool.PoolTimeout as exc:
            if not given and connector.refused_at > connector.connected_at:
                raise StoreError(
                    f"{what}: cannot connect to {connector.where}: {connector.refusal}"
                ) from exc
            raise

    @contextmanager
    def _writing(self, partition: int, what: str) -> Iterator[Connection]:
        """One transaction holding partition `partition`'s lock. Any error: nothing
        kept, but `StoreOutcomeUnknown` if the connection went as it committed."""
        with _translated(what), self._session(what) as conn:
            committing = False
            try:
                with self._watchdog.watch(conn), conn.transaction():
                    # Waits (up to lock_timeout) for the partition's writer in
                    # any instance; released at COMMIT or ROLLBACK, or when the
                    # session dies.
                    conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (self._lock, partition))
                    yield conn
                    committing = True
                    # Leaving the block COMMITs: with synchronous_commit on, the
                    # WAL is flushed there. A crash before that keeps nothing of
                    # the transaction (the caller got no answer), after it all of it.
            except (pg_errors.LockNotAvailable, pg_errors.QueryCanceled):
                # The lock not had within the lock or the statement timeout
                # (both a busy timeout): its holder may be stalled for good.
                self._end_stalled_holder(conn, partition)
                raise
            except pg_errors.ReadOnlySqlTransaction as exc:
                # A read-only server (a failover target not yet promoted): the
                # pool opens a new session, wherever the host name leads by
                # then, rather than lend this one for the rest of its life.
                # Or a role or database read-only by default (a DBA freezing
                # writes for a move): answered 503 until a session may write.
                conn.close()
                self._read_only = f"{what}: {exc}"
                raise
            except psycopg.OperationalError as exc:
                # The connection went as COMMIT was sent: the database may have
                # committed. Answered "not stored", a retry of pulses without ids
                # counted them twice. Asking the database (pg_xact_status) cannot
                # tell either: after a crash, an id the transaction had taken may
                # be given to another, which commits.
                if not committing:
                    raise
                message = without_secrets(str(exc), self._connector.url)
                raise StoreOutcomeUnknown(
                    f"{what}: lost the connection to PostgreSQL as it committed: {message}"
                ) from exc

    def _end_stalled_holder(self, conn: Connection, partition: int) -> None:
        """End the session holding `partition`'s lock if it has waited on its own
        client for three busy timeouts: an instance stopped without dying
        (SIGSTOP, a paused VM) as it sent a statement's parameters, a
        batch's body or a write's pulses. The server waits for the rest of
        that message with no timeout at all: neither statement_timeout nor
        the idle-in-transaction one acts there, and the stopped machine's
        kernel still acknowledges every keepalive. Every instance's writes
        and commits of the partition were refused for as long as it stayed
        stopped. Its transaction is undone, as if it had died."""
        stalled = f"{3 * self._connector.busy_timeout:.3f} seconds"
        try:
            with self._watchdog.watch(conn):
                rows = conn.execute(
                    "SELECT a.pid, a.state, a.query, pg_terminate_backend(a.pid)"
                    " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
                    " AND l.classid::bigint = %s AND l.objid::bigint = %s"
                    " AND l.database = (SELECT oid FROM pg_database"
                    "  WHERE datname = current_database())"
                    " AND a.state = 'active' AND a.wait_event = 'ClientRead'"
                    " AND a.state_change < now() - %s::interval",
                    (self._lock & 0xFFFFFFFF, partition, stalled),
                ).fetchall()
        except psycopg.Error as exc:  # not allowed to, say: the holder stays
            log.warning(
                "stalled lock holder",
                extra={"fields": {"partition": partition, "error": str(exc)}},
            )
            return
        for pid, state, query, ended in rows:
            log.warning(
                "stalled lock holder ended",
                extra={
                    "fields": {
                        "partition": partition,
                        "pid": pid,
                        "ended": ended,
                        "note": f"{state} for {stalled}, waiting on its client to send"
                        f" the rest of: {' '.join(query.split())[:80]}",
                    }
                },
            )

    @contextmanager
    def _reading(self, what: str) -> Iterator[Connection]:
        with _translated(what), self._session(what) as conn, self._watchdog.watch(conn):
            yield conn

    # -- writes ---------------------------------------------------------

    def write_pulses(
        self,
        partition: int,
        pulses: Sequence[Pulse],
        received_us: int,
        encoded: bytes | None = None,  # rows are sent one by one: no use for it
        ids: bool = True,
    ) -> list[Outcome]:
        with self._writing(partition, "write pulses") as conn:
            # Under the partition lock no other instance can store these ids
            # before we commit, so the lookup stays true until then; the ids
            # go in with the amounts, in this one transaction.
            known = _known_ids(conn, pulses) if ids else {}
            outcomes = resolve(pulses, known)
            accepted = [p for p, o in zip(pulses, outcomes, strict=True) if o == "accepted"]
            if not accepted:
                return outcomes
            rows = [
                (
                    p.tenant_id,
                    p.pulse_id,
                    p.client_id,
                    p.product_sku,
                    p.use_unit,
                    p.day,
                    format_nanos(p.nanos),
                    p.ts,
                    # Kept per id here, as before intake left it to the
                    # stores: rows of earlier versions hold it too.
                    payload_digest(p) if p.client_id else None,
                )
                for p in accepted
            ]
            conn.execute(_INSERT_PULSES, (partition, received_us, _encode(rows).decode()))
            deltas = sorted(bucket_deltas(accepted).items(), key=lambda item: item[0])
            conn.execute(
                _UPSERT_BUCKETS,
                (
                    partition,
                    [key[0] for key, _ in deltas],
                    [key[1] for key, _ in deltas],
                    [key[2] for key, _ in deltas],
                    [key[3] for key, _ in deltas],
                    [format_nanos(delta.nanos) for _, delta in deltas],
                    [delta.count for _, delta in deltas],
                ),
            )
        return outcomes

    def commit_day(
        self,
        partition: int,
        day: str,
        now_us: int,
        max_records: int,
        max_bytes: int = BATCH_MAX_BYTES,
    ) -> list[BatchSummary]:
        with self._writing(partition, "commit") as conn:
            rows = conn.execute(
                f"SELECT {_BUCKET_COLUMNS} FROM buckets"
                " WHERE partition = %s AND day = %s AND pulse_count > committed_count",
                (partition, day),
            ).fetchall()
            if not rows:
                return []
            states = [_bucket_state(row) for row in rows]
            found = conn.execute(
                "SELECT coalesce(max(seq), 0) FROM batches WHERE partition = %s AND day = %s",
                (partition, day),
            ).fetchone()
            last_seq = int(found[0]) if found else 0
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
            # One statement at a time, not executemany: psycopg sends that as
            # a pipeline, and a server waiting for the rest of a pipeline
            # applies no idle-in-transaction timeout, so an instance stopped
            # midway (SIGSTOP, a paused VM) would hold the partition's lock
            # for as long as it stays stopped.
            for insert in inserts:
                conn.execute(_INSERT_BATCH, insert)
            # Same transaction as the outbox rows above: a bucket is marked
            # committed if and only if its delta is in a batch.
            conn.execute(
                "UPDATE buckets SET committed_amount = used_amount,"
                " committed_count = pulse_count, revision = revision + 1"
                " WHERE partition = %s AND day = %s AND pulse_count > committed_count",
                (partition, day),
            )
        return summaries

    def claim_batch(
        self, partition: int, batch_id: str, *, now_us: int, latest_us: int, lease_us: int
    ) -> bytes | None:
        # Under the partition's lock: a racer claims once this one has
        # committed, and finds the batch no longer due.
        with self._writing(partition, "claim batch") as conn:
            row = conn.execute(
                "UPDATE batches SET next_attempt_at = %s"
                " WHERE partition = %s AND batch_id = %s AND status = 'pending'"
                " AND (next_attempt_at <= %s OR next_attempt_at > %s) RETURNING body",
                (lease_us, partition, batch_id, now_us, latest_us),
            ).fetchone()
            return None if row is None else bytes(row[0])

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
        with self._writing(partition, "record delivery") as conn:
            conn.execute(
                "UPDATE batches SET status = %s, attempts = attempts + %s, last_error = %s,"
                " next_attempt_at = %s,"
                " delivered_at = CASE WHEN %s = 'delivered' THEN %s ELSE delivered_at END"
                " WHERE partition = %s AND batch_id = %s AND status = 'pending'"
                + ("" if ours else " AND next_attempt_at = %s"),
                (
                    status,
                    int(attempted),
                    error,
                    next_attempt_us,
                    status,
                    now_us,
                    partition,
                    batch_id,
                )
                + (() if ours else (claimed_us,)),
            )

    def redeliver(self, batch_id: str, now_us: int) -> bool:
        partition = self._partition_of_batch(batch_id)
        if partition is None:
            return False
        with self._writing(partition, "redeliver") as conn:
            cursor = conn.execute(
                "UPDATE batches SET status = 'pending', next_attempt_at = %s"
                " WHERE partition = %s AND batch_id = %s AND status = 'failed'",
                (now_us, partition, batch_id),
            )
            return cursor.rowcount == 1

    def purge(self, partition: int, before_us: int) -> int:
        """Forget old pulses, a chunk per transaction so writers never wait long."""
        removed = 0
        while True:
            with self._writing(partition, "purge") as conn:
                cursor = conn.execute(_PURGE, (partition, before_us, _PURGE_CHUNK))
            removed += cursor.rowcount
            if cursor.rowcount < _PURGE_CHUNK:
                return removed

    def note_zones(self, zones: Sequence[str], now_us: int, since_us: int) -> list[str]:
        what = "note time zones"
        with _translated(what), self._session(what) as conn:
            with conn.transaction():
                for zone in sorted(zones):  # one order: two instances never deadlock
                    conn.execute(_KEEP_LATEST, (f"zone/{zone}", str(now_us)))
            rows = conn.execute(
                "SELECT key FROM meta WHERE starts_with(key, 'zone/')"
                " AND CASE WHEN starts_with(key, 'zone/') THEN value::bigint END >= %s",
                (since_us,),
            ).fetchall()
        return sorted(str(key).removeprefix("zone/") for (key,) in rows)

    def announce_purge(self, before_us: int) -> None:
        what = "announce a purge"
        with _translated(what), self._session(what) as conn:
            conn.execute(_KEEP_LATEST, ("purge_horizon", str(before_us)))

    def purge_horizon(self) -> int | None:
        with self._reading("read") as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'purge_horizon'").fetchone()
        return int(row[0]) if row else None

    def clock_offset_us(self) -> int:
        # The database's time is taken to be that of the middle of the round
        # trip, which is right within half of it. A process frozen during a
        # reading (a VM paused) for 120 s put its clock 60 s off until the
        # next one: two senders of a batch, a claim kept past its lease. A
        # reading whose round trip is too long to trust is made again.
        trips: list[float] = []
        with self._reading("read the clock") as conn:
            for _ in range(_CLOCK_TRIES):
                # Timed around the query alone: waiting for a pooled session
                # is no part of the round trip.
                started = time.monotonic_ns()
                row = conn.execute(
                    "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint"
                ).fetchone()
                ended = time.monotonic_ns()
                assert row is not None
                if ended - started <= _CLOCK_TRIP_NS:
                    return int(row[0]) - (started + ended) // 2000
                trips.append((ended - started) / 1e9)
        raise StoreError(
            f"read the clock: each of {_CLOCK_TRIES} readings took longer than"
            f" {_CLOCK_TRIP_NS / 1e9:g} s ({', '.join(f'{t:.1f} s' for t in trips)})"
        )

    # -- reads ----------------------------------------------------------

    def open_days(self, partition: int) -> list[str]:
        with self._reading("read") as conn:
            rows = conn.execute(
                "SELECT DISTINCT day FROM buckets"
                " WHERE partition = %s AND pulse_count > committed_count ORDER BY day",
                (partition,),
            ).fetchall()
        return [day.isoformat() for (day,) in rows]

    def aggregates(self, query: AggregateQuery) -> list[Aggregate]:
        clauses, args = aggregate_filter(query, "%s")
        if query.tenant_id is not None:
            clauses.insert(0, "partition = %s")
            args.insert(0, partition_of(query.tenant_id, self.partitions))
        args.append(query.limit)
        sql = (
            f"SELECT {_BUCKET_COLUMNS} FROM buckets {where(clauses)}"
            " ORDER BY day, tenant_id, product_sku, use_unit LIMIT %s"
        )
        with self._reading("read") as conn:
            rows = conn.execute(sql, args).fetchall()
        return [_aggregate(row) for row in rows]

    def pulses(self, query: PulseQuery) -> list[tuple[int, StoredPulse]]:
        clauses = ["partition = %s", "tenant_id = %s", "day = %s"]
        args: list[Any] = [
            partition_of(query.tenant_id, self.partitions),
            query.tenant_id,
            query.day,
        ]
        if query.product_sku is not None:
            clauses.append("product_sku = %s")
            args.append(query.product_sku)
        if query.use_unit is not None:
            clauses.append("use_unit = %s")
            args.append(query.use_unit)
        if query.after is not None:
            clauses.append("seq > %s")
            args.append(query.after)
        args.append(query.limit)
        sql = (
            "SELECT seq, pulse_id, client_id, tenant_id, product_sku, use_unit, used_amount,"
            " ts, day, received_at FROM pulses"
            f" WHERE {' AND '.join(clauses)} ORDER BY seq LIMIT %s"
        )
        with self._reading("read") as conn:
            rows = conn.execute(sql, args).fetchall()
        return [
            (
                seq,
                StoredPulse(
                    id=pulse_id or assigned_id(self.store_id, seq),
                    tenant_id=tenant,
                    product_sku=sku,
                    use_unit=unit,
                    used_amount=_amount(amount),
                    timestamp=_moment(ts),  # type: ignore[arg-type]
                    date=day.isoformat(),
                    received_at=_moment(received),  # type: ignore[arg-type]
                    id_assigned=not client_id,
                ),
            )
            for seq, pulse_id, client_id, tenant, sku, unit, amount, ts, day, received in rows
        ]

    def batches(self, query: BatchQuery) -> list[BatchView]:
        clauses, args = batch_filter(query, "%s")
        args.append(query.limit)
        sql = (
            f"SELECT {_BATCH_COLUMNS}, NULL FROM batches {where(clauses)}"
            " ORDER BY day, batch_id LIMIT %s"
        )
        with self._reading("read") as conn:
            rows = conn.execute(sql, args).fetchall()
        return [self._batch_view(row) for row in rows]

    def batch(self, batch_id: str) -> BatchView | None:
        with self._reading("read") as conn:
            row = conn.execute(
                f"SELECT {_BATCH_COLUMNS}, body FROM batches WHERE batch_id = %s", (batch_id,)
            ).fetchone()
        return None if row is None else self._batch_view(row)

    def _batch_view(self, row: tuple[Any, ...]) -> BatchView:
        (bid, partition, day, kind, created, count, amount, status, attempts, error,
         next_at, done, body) = row  # fmt: skip
        return BatchView(
            batch_id=bid,
            store_id=self.store_id,
            date=day.isoformat(),
            partition=partition,
            kind=kind,
            created_at=_moment(created),  # type: ignore[arg-type]
            record_count=count,
            used_amount=_amount(amount),
            status=status,
            attempts=attempts,
            last_error=error,
            next_attempt_at=_moment(next_at) if status == "pending" else None,
            delivered_at=_moment(done),
            records=None if body is None else _decode_batch(body).records,
        )

    def _partition_of_batch(self, batch_id: str) -> int | None:
        return partition_of_batch(batch_id, self.store_id, self.partitions)

    def due_batches(self, now_us: int, limit: int, latest_us: int | None = None) -> list[DueBatch]:
        latest = _NEVER if latest_us is None else latest_us
        with self._reading("read") as conn:
            rows = conn.execute(_DUE_BATCHES, (self.partitions, now_us, latest, limit)).fetchall()
        return [
            DueBatch(partition, bid, day.isoformat(), attempts)
            for partition, bid, day, attempts in rows
        ]

    def open_buckets(self) -> int:
        with self._reading("read") as conn:
            row = conn.execute(
                "SELECT count(*) FROM buckets WHERE pulse_count > committed_count"
            ).fetchone()
        return int(row[0]) if row else 0

    def trouble(self) -> str | None:
        # Sessions a pooler shares are found by the leader's pings, a database
        # that takes no writes by a write, or at open: asked again here until
        # a new session may write, as no write comes to an instance whose
        # /readyz answers 503.
        if self._shared is None and self._read_only is not None and self._writable():
            # The other pooled sessions may have begun while writes were
            # frozen, and keep that default: a write lent one after /readyz
            # said 200 was refused. All are made anew, those lent out when
            # they come back.
            self._pool.drain()
            self._read_only = None
        return self._shared or self._read_only

    def _writable(self) -> bool:
        """Whether a transaction begun now may write: not on a standby, nor where
        default_transaction_read_only is on for the role or the database."""
        try:
            with self._reading("check the store takes writes") as conn:
                row = conn.execute("SHOW transaction_read_only", prepare=False).fetchone()
                writable = row is not None and row[0] == "off"
                if not writable:
                    # A session keeps the defaults it began with: the next
                    # check is made on a new one, which has the DBA's latest.
                    conn.close()
        except StoreError:
            return False
        return writable

    def writer_lock(self) -> WriterLock | None:
        return None  # writers lock the rows they write, not the store

    def outbox_statistics(self) -> tuple[int, int | None]:
        with self._reading("read") as conn:
            row = conn.execute(
                "SELECT count(*), min(created_at) FROM batches WHERE status = 'pending'"
            ).fetchone()
        assert row is not None
        return int(row[0]), row[1]

    def outbox_batches(self) -> dict[str, int]:
        with self._reading("read") as conn:
            row = conn.execute(_OUTBOX_BATCHES).fetchone()
        assert row is not None
        return {"pending": int(row[0]), "failed": int(row[1])}


def _known_ids(conn: Connection, pulses: Sequence[Pulse]) -> dict[tuple[str, str], bytes]:
    """The stored payload digests of the client ids among `pulses`, in one statement."""
    keys = {(p.tenant_id, p.pulse_id) for p in pulses if p.client_id}
    if not keys:
        return {}
    tenants, ids = zip(*keys, strict=True)
    rows = conn.execute(_KNOWN_IDS, (list(tenants), list(ids))).fetchall()
    return {(tenant, pulse_id): bytes(fingerprint) for tenant, pulse_id, fingerprint in rows}


def _bucket_state(row: tuple[Any, ...]) -> BucketState:
    day, tenant, sku, unit, used, count, committed, committed_count, revision = row
    return BucketState(
        (day.isoformat(), tenant, sku, unit),
        _nanos(used),
        count,
        _nanos(committed),
        committed_count,
        revision,
    )


def _aggregate(row: tuple[Any, ...]) -> Aggregate:
    day, tenant, sku, unit, used, count, committed, committed_count, revision = row
    return Aggregate(
        tenant,
        sku,
        unit,
        day.isoformat(),
        _amount(used),
        count,
        _amount(committed),
        committed_count,
        revision,
    )
