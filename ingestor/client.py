"""A client that turns single pulses into NDJSON batches (DESIGN.md §4, POST /pulses).

    async with open_client("http://127.0.0.1:8081") as client:     # in trio code
        client.record("t1", "sku1", "api_call", 1)
        failures = await client.flush()

    with Client("http://127.0.0.1:8081") as client:                 # in plain threaded code
        client.record("t1", "sku1", "api_call", "0.25")
        failures = client.flush()

How a pulse travels

    record()   validates cheaply, gives the pulse an id and a timestamp (the moment
               of the call) unless it has them, writes its NDJSON line and
               appends it to the buffer. Returns the id at once. A pulse given
               its id but no timestamp is not stamped: a record of it again
               (after a restart, say) must match it to be a `duplicate`, and
               a second stamp would not.
    senders    `concurrency` trio tasks. Each takes a batch when `max_batch_pulses`
               or `max_batch_bytes` is reached, `flush_interval` after the first
               waiting pulse, or at once on flush() and close(); POSTs it as
               application/x-ndjson; and keeps it until every pulse is settled.
    settled    delivered (`accepted`, or `duplicate`: the server already held it,
               from an earlier attempt of ours or an earlier record of that id),
               or failed (a `Failure`: final, never retried).

Retries. A timeout, a connection error, 408/425/429 and every 5xx are retried
with capped exponential backoff and jitter, never sooner than `Retry-After`.
Nothing is dropped on them: every pulse carries its id from the first attempt,
so a request that was stored although its answer was lost comes back
`duplicate` and is counted once. A pulse the server reports "not stored,
retry" (its store failed) or "may be stored" (its store lost the answer to
its commit) is retried alone. 413 splits the batch in two (and
lowers `max_batch_pulses` for the rest of the client's life); a single pulse
answered 413 fails. Any other 4xx for the whole request (400, 401, 403, 415...)
means a bug in the client, its data or its key: every pulse of it fails as
`refused`. Per-pulse `rejected` and `conflict` fail as they are.

Failures are logged (logger `ingestor.client`), passed to `on_failure` if
given (called in the client's trio thread), and returned by the next flush()
or close(), which hand each failure out once (at most `max_buffered` are kept
for them; statistics() counts all).

Bounded memory. At most `max_buffered` pulses are unsettled (waiting or in
flight). Beyond that `TrioClient.record` raises `BufferFull` (a sync call
cannot wait in trio: `await client.wait_not_full()` first if you would rather
wait), and `Client.record` blocks until there is room (`when_full="block"`,
the default) or raises `BufferFull` (`when_full="raise"`).

Amounts are `Decimal`, `int` or decimal strings, sent as exact decimal
strings. Floats are refused with TypeError: a float is already rounded, and
which decimal it meant is the caller's decision (`Decimal(str(x))` if that is
the one). Timestamps are stamped at record() time, so a pulse that waits out an
outage is still billed on the day it happened (`stamp_timestamps=False`
leaves it to the server's clock at arrival; a client clock more than five
minutes ahead of the server's gets its pulses rejected). With ids of your
own, give the event's timestamp too: a pulse with its id and no timestamp
is billed on the day it reaches the server.

Processes. Generated ids stay unique in a process forked after the client
was made (a pre-forking server's workers): the child's client draws a new
prefix. A client whose senders were running when the process forked has
none in the child: there it takes no pulses (ClientClosed), and leaves the
parent's to the parent.

Errors

    ClientError
    ├── ClientClosed    record() after close(), or the senders stopped
    ├── BufferFull      `max_buffered` pulses are unsettled
    ├── FlushTimeout    flush(timeout=...) ran out; the pulses are still retried
    └── Undelivered     close(timeout=...) ran out, or the senders were cancelled;
                        `.lines` holds the NDJSON lines that may not be stored.
                        Resending them is safe: their ids dedupe. `.failures`
                        holds the failures not handed out before.

Invalid arguments to record() raise TypeError or ValueError there.
"""

from __future__ import annotations

import atexit
import datetime as dt
import email.utils
import itertools
import logging
import math
import os
import random
import re
import secrets
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from decimal import Context, Decimal, Inexact, InvalidOperation
from types import TracebackType
from typing import Any, Literal, Self, TypedDict, Unpack

import httpx
import msgspec
import trio

from . import __version__
from .model import IngestReport

__all__ = [
    "BufferFull",
    "Client",
    "ClientClosed",
    "ClientError",
    "ClientStatistics",
    "Failure",
    "FlushTimeout",
    "Options",
    "TrioClient",
    "Undelivered",
    "open_client",
]

log = logging.getLogger("ingestor.client")

NDJSON = "application/x-ndjson"
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_MAX_AMOUNT = 10**18  # exclusive: at most 18 integer digits
_NANO = Decimal("1e-9")
_EXACT = Context(prec=60, traps=[Inexact, InvalidOperation])
_RETRY_STATUSES = frozenset({408, 425, 429})
# How the server starts the reason of a pulse its store failed: not kept, or
# maybe kept (its connection lost as it committed). Either is sent again: this
# client gives every pulse an id, so a kept one comes back a duplicate.
_NOT_STORED = ("not stored", "may be stored")
_MAX_RETRY_AFTER = 300.0
_EXIT_TIMEOUT = 30.0
_decode_report = msgspec.json.Decoder(IngestReport).decode


# -- what the caller sees -----------------------------------------------------


class ClientError(Exception):
    """Base of the errors this module raises on purpose."""


class ClientClosed(ClientError):
    """The client is closed (or its senders stopped) and takes no more pulses."""


class BufferFull(ClientError):
    """`max_buffered` pulses are waiting or in flight."""


class FlushTimeout(ClientError, TimeoutError):
    """flush() ran out of time. Nothing is lost: the pulses are still being retried."""

    def __init__(self, unsettled: int) -> None:
        super().__init__(f"{unsettled} pulses are not settled yet; they are still being retried")
        self.unsettled = unsettled


class Undelivered(ClientError):
    """The client stopped with pulses the server may not hold; `lines` are their NDJSON lines."""

    def __init__(self, lines: list[bytes], failures: Sequence[Failure] = ()) -> None:
        super().__init__(
            f"{len(lines)} pulses were not acknowledged before the client stopped; resend"
            " `.lines` (their ids make a resend safe)"
        )
        self.lines = lines
        self.failures = list(failures)


FailureStatus = Literal["rejected", "conflict", "refused"]


@dataclass(frozen=True, slots=True)
class Failure:
    """A pulse the server will not count, and why. Final: it is not retried.

    `status` is the server's verdict on the pulse (`rejected`, `conflict`) or
    `refused` when the whole request was answered 4xx (`http_status` says which).
    """

    status: FailureStatus
    reason: str
    id: str | None
    http_status: int
    line: bytes

    def pulse(self) -> dict[str, Any]:
        """The pulse as it was sent."""
        fields: dict[str, Any] = msgspec.json.decode(self.line)
        return fields


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    recorded: int  # pulses record() took
    accepted: int  # stored by the server on our request
    duplicates: int  # the server held them already: delivered
    failed: int  # settled as a Failure
    unsettled: int  # waiting or in flight
    requests: int  # POST /pulses sent, retries included
    retries: int


class Options(TypedDict, total=False):
    """The options of `TrioClient`, `Client` and `open_client` (see TrioClient)."""

    api_key: str | None
    max_batch_pulses: int
    max_batch_bytes: int
    flush_interval: float
    max_buffered: int
    concurrency: int
    timeout: float
    initial_backoff: float
    max_backoff: float
    stamp_timestamps: bool
    on_failure: Callable[[Failure], None] | None


# -- one pulse, checked and written once ---------------------------------------


def _check_name(value: object, field: str, limit: int) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a str, not {type(value).__name__}")
    if not 0 < len(value) <= limit:
        raise ValueError(f"{field} must be 1 to {limit} characters, not {len(value)}")
    if _CONTROL.search(value):
        raise ValueError(f"{field} must not contain control characters: {value!r}")
    return value


def _json(text: str) -> str:
    return msgspec.json.encode(text).decode()


def _amount(value: object) -> str:
    """`value` as the exact decimal string the server takes, or TypeError/ValueError."""
    if type(value) is int:
        if 0 <= value < _MAX_AMOUNT:
            return str(value)
        raise ValueError(f"used_amount must be >= 0 and below 10**18, not {value}")
    if isinstance(value, bool | float):
        raise TypeError(
            f"used_amount must be a Decimal, int or decimal string, not {type(value).__name__}"
            " (a float is already rounded: pass Decimal(str(x)) if that is the amount you mean)"
        )
    if isinstance(value, str):
        try:
            number = Decimal(value)
        except InvalidOperation:
            raise ValueError(f"used_amount is not a decimal number: {value!r}") from None
    elif isinstance(value, Decimal | int):
        number = Decimal(value)
    else:
        raise TypeError(f"used_amount must be a Decimal, int or str, not {type(value).__name__}")
    if not number.is_finite():
        raise ValueError(f"used_amount must be finite, not {value!r}")
    if number.is_zero():
        return "0"
    if number < 0 or number >= _MAX_AMOUNT:
        raise ValueError(f"used_amount must be >= 0 and below 10**18, not {value!r}")
    exponent = number.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -9:
        try:
            number = number.quantize(_NANO, context=_EXACT)
        except (Inexact, InvalidOperation):
            raise ValueError(
                f"used_amount must have at most 9 fractional digits: {value!r}"
            ) from None
    return format(number, "f")


def _timestamp(value: object) -> str:
    if isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"timestamp is not an RFC 3339 date-time: {value!r}") from None
    elif isinstance(value, dt.datetime):
        moment = value
    else:
        raise TypeError(f"timestamp must be a datetime or str, not {type(value).__name__}")
    if moment.utcoffset() is None:
        raise ValueError(f"timestamp must carry a UTC offset: {value!r}")
    try:
        return moment.astimezone(dt.UTC).isoformat()
    except OverflowError:  # 0001-01-01T00:00+01:00 is in year 0 in UTC
        raise ValueError(f"timestamp is out of range in UTC: {value!r}") from None


class _Encoder:
    """Checks a pulse and writes its NDJSON line. Safe to share between threads.

    Generated ids are a random 96-bit prefix per client and a counter: unique
    without coordination, and 30-odd characters.
    """

    def __init__(self, stamp: bool) -> None:
        self._stamp = stamp
        self.renew()
        self._heads: dict[tuple[str, str, str], str] = {}
        self._second = (-1, "")

    def renew(self) -> None:
        """A new prefix for the ids it makes: in a forked child, the parent's would repeat."""
        self._id_prefix = f"c{secrets.token_hex(12)}-"
        self._ids = itertools.count(1)  # next() is atomic under the GIL

    def encode(
        self,
        tenant_id: str,
        product_sku: str,
        use_unit: str,
        used_amount: Decimal | int | str,
        *,
        pulse_id: str | None,
        timestamp: dt.datetime | str | None,
    ) -> tuple[str, bytes]:
        key = (tenant_id, product_sku, use_unit)
        head = self._heads.get(key)
        if head is None:
            head = self._head(key)
        amount = _amount(used_amount)
        stamp = self._stamp
        if pulse_id is None:
            pulse_id = f"{self._id_prefix}{next(self._ids):x}"
            id_json = f'"{pulse_id}"'
        else:
            id_json = _json(_check_name(pulse_id, "id", 128))
            stamp = False  # a record of it again must match it (see the module docstring)
        if timestamp is not None:
            when = _timestamp(timestamp)
        elif stamp:
            when = self._now()
        else:
            return pulse_id, f'{head}"{amount}","id":{id_json}}}\n'.encode()
        return pulse_id, f'{head}"{amount}","id":{id_json},"timestamp":"{when}"}}\n'.encode()

    def _head(self, key: tuple[str, str, str]) -> str:
        tenant_id, product_sku, use_unit = key
        head = (
            f'{{"tenant_id":{_json(_check_name(tenant_id, "tenant_id", 128))},'
            f'"product_sku":{_json(_check_name(product_sku, "product_sku", 128))},'
            f'"use_unit":{_json(_check_name(use_unit, "use_unit", 64))},"used_amount":'
        )
        if len(self._heads) >= 10_000:
            self._heads.clear()
        self._heads[key] = head
        return head

    def _now(self) -> str:
        micros = time.time_ns() // 1000
        second, fraction = divmod(micros, 1_000_000)
        cached = self._second
        if cached[0] != second:
            cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
            self._second = cached
        return f"{cached[1]}.{fraction:06d}Z"


# -- the buffer, shared by recording threads and the senders --------------------


class _Batch:
    __slots__ = ("lines", "seqs")

    def __init__(self, lines: list[bytes], seqs: Sequence[int]) -> None:
        self.lines = lines
        self.seqs = seqs


def _ignore() -> None:
    pass


class _Outbox:
    """Every pulse not yet settled. One lock guards it; `changed` wakes waiting threads.

    Each pulse gets a sequence number. Waiting pulses are a FIFO; a batch takes
    a prefix of it and stays in flight until each of its pulses is settled.
    "Everything recorded before flush() is settled" is then one comparison:
    the lowest unsettled number is past the last number given out before.
    """

    def __init__(self, max_buffered: int, batch_pulses: int, batch_bytes: int) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.notify: Callable[[], None] = _ignore  # wakes the senders; set by the client
        self.max_buffered = max_buffered
        self.batch_pulses = batch_pulses
        self.batch_bytes = batch_bytes
        self.closing = False
        self.stopped = False
        self.stop_reason = "the client is closed"
        self._lines: list[bytes] = []
        self._bytes = 0
        self._next_seq = 1
        self._in_flight: list[_Batch] = []
        self._unsettled = 0
        self._flush_through = 0
        self._failures: list[Failure] = []
        self._counts = {"accepted": 0, "duplicates": 0, "failed": 0, "requests": 0, "retries": 0}

    # recording side (any thread)

    def put(self, line: bytes, wait: bool) -> None:
        with self.lock:
            while True:
                if self.closing:
                    raise ClientClosed(self.stop_reason)
                if self._unsettled < self.max_buffered:
                    break
                if not wait:
                    raise BufferFull(
                        f"{self._unsettled} pulses are waiting or in flight (max_buffered)"
                    )
                self.changed.wait()
            self._lines.append(line)
            count = len(self._lines)
            before = self._bytes
            self._bytes = before + len(line)
            self._next_seq += 1
            self._unsettled += 1
            wake = count in (1, self.batch_pulses) or before < self.batch_bytes <= self._bytes
        if wake:
            self.notify()

    def request_flush(self) -> int:
        """Make every waiting pulse due; the sequence number flush() waits for."""
        with self.lock:
            target = self._next_seq - 1
            self._flush_through = max(self._flush_through, target)
        self.notify()
        return target

    def close(self) -> int:
        with self.lock:
            self.closing = True
            target = self._next_seq - 1
            self.changed.notify_all()
        self.notify()
        return target

    def wait_settled(self, target: int, timeout: float | None) -> bool:
        with self.lock:
            return self.changed.wait_for(
                lambda: self.stopped or self._lowest_unsettled() > target, timeout
            )

    def settled(self, target: int) -> bool:
        with self.lock:
            return self._lowest_unsettled() > target

    def full(self) -> bool:
        with self.lock:
            return self._unsettled >= self.max_buffered

    def has_waiting(self) -> bool:
        return bool(self._lines)

    def take_failures(self) -> list[Failure]:
        with self.lock:
            failures, self._failures = self._failures, []
            return failures

    def undelivered(self) -> list[bytes]:
        with self.lock:
            batches = sorted(self._in_flight, key=lambda batch: batch.seqs[0])
            return [line for batch in batches for line in batch.lines] + self._lines

    def statistics(self) -> ClientStatistics:
        with self.lock:
            return ClientStatistics(
                recorded=self._next_seq - 1, unsettled=self._unsettled, **self._counts
            )

    # sending side (the client's trio thread)

    def take(self, due: bool) -> tuple[_Batch | None, int]:
        """A batch if one is due, and how many pulses wait after it."""
        with self.lock:
            count = len(self._lines)
            first = self._next_seq - count
            if not count or not (
                due
                or self.closing
                or first <= self._flush_through
                or count >= self.batch_pulses
                or self._bytes >= self.batch_bytes
            ):
                return None, count
            if count <= self.batch_pulses and self._bytes <= self.batch_bytes:
                taken, size = count, self._bytes
            else:
                taken = size = 0
                for line in self._lines:
                    if taken == self.batch_pulses or (
                        taken and size + len(line) > self.batch_bytes
                    ):
                        break
                    taken += 1
                    size += len(line)
            batch = _Batch(self._lines[:taken], range(first, first + taken))
            del self._lines[:taken]
            self._bytes -= size
            self._in_flight.append(batch)
            return batch, count - taken

    def split(self, batch: _Batch) -> list[_Batch]:
        """Halve a batch the server found too large, and send smaller ones from now on."""
        with self.lock:
            half = len(batch.lines) // 2
            parts = [
                _Batch(batch.lines[:half], batch.seqs[:half]),
                _Batch(batch.lines[half:], batch.seqs[half:]),
            ]
            self._in_flight.remove(batch)
            self._in_flight.extend(parts)
            self.batch_pulses = min(self.batch_pulses, half)
            return parts

    def count_request(self, retry: bool) -> None:
        with self.lock:
            self._counts["requests"] += 1
            self._counts["retries"] += retry

    def settle(
        self,
        batch: _Batch,
        keep: Sequence[int],
        duplicates: int,
        failures: Sequence[Failure],
    ) -> None:
        """Settle every pulse of `batch` but those at the indexes `keep` (retried)."""
        with self.lock:
            settled = len(batch.lines) - len(keep)
            self._unsettled -= settled
            self._counts["accepted"] += settled - duplicates - len(failures)
            self._counts["duplicates"] += duplicates
            self._counts["failed"] += len(failures)
            room = max(0, self.max_buffered - len(self._failures))
            self._failures.extend(failures[:room])
            if keep:
                batch.lines = [batch.lines[i] for i in keep]
                batch.seqs = [batch.seqs[i] for i in keep]
            else:
                self._in_flight.remove(batch)
            self.changed.notify_all()

    def stop(self, reason: str) -> None:
        with self.lock:
            self.stopped = self.closing = True
            self.stop_reason = reason
            self.changed.notify_all()

    def forked(self, senders: bool) -> None:
        """In a forked child: new locks (a parent's thread may have held them).
        With `senders` (they ran in the parent, and none runs here) it takes no
        more pulses, and the parent's are the parent's to deliver."""
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        if senders:
            self._lines, self._bytes, self._in_flight, self._unsettled = [], 0, [], 0
            self.stopped = self.closing = True
            self.stop_reason = (
                "the client was made in the parent process, where its senders run:"
                " make a new one after forking"
            )

    def _lowest_unsettled(self) -> int:
        low = self._next_seq - len(self._lines)
        for batch in self._in_flight:
            low = min(low, batch.seqs[0])
        return low


# -- HTTP answers ---------------------------------------------------------------


def _error_text(response: httpx.Response) -> str:
    try:
        error = msgspec.json.decode(response.content)["error"]
        return f"{error['code']}: {error['message']}"
    except (msgspec.MsgspecError, KeyError, TypeError):
        return f"{response.status_code} {response.reason_phrase}: {response.text[:200]}"


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds the server asked us to wait (delta-seconds or an HTTP date), capped."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        return min(float(value), _MAX_RETRY_AFTER)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    wait = (moment - dt.datetime.now(dt.UTC)).total_seconds()
    return min(max(wait, 0.0), _MAX_RETRY_AFTER)


def _id_of(line: bytes) -> str | None:
    found = msgspec.json.decode(line).get("id")
    return found if isinstance(found, str) else None


# -- the trio client ---------------------------------------------------------------


class TrioClient:
    """Batches pulses to POST /pulses from trio code.

    `async with open_client(url) as client:` runs it; to put its senders in
    your own supervision tree, `await nursery.start(client.run)` and
    `await client.aclose()` at the end. Call it from its trio thread only
    (`Client` is the one for other threads).

    Options: `api_key` (sent as `Authorization: Bearer <key>`);
    `max_batch_pulses` (5,000) and `max_batch_bytes` (4 MiB) per request, below
    the server's 10,000 pulses / 16 MiB; `flush_interval` (0.2 s) the longest a
    pulse waits for its batch to fill; `max_buffered` (100,000) unsettled
    pulses at most; `concurrency` (2) requests in flight; `timeout` (30 s) per
    request; `initial_backoff` (0.1 s) doubling to `max_backoff` (30 s);
    `stamp_timestamps` (True); `on_failure`.
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        max_batch_pulses: int = 5_000,
        max_batch_bytes: int = 4 * 1024 * 1024,
        flush_interval: float = 0.2,
        max_buffered: int = 100_000,
        concurrency: int = 2,
        timeout: float = 30.0,
        initial_backoff: float = 0.1,
        max_backoff: float = 30.0,
        stamp_timestamps: bool = True,
        on_failure: Callable[[Failure], None] | None = None,
    ) -> None:
        base = httpx.URL(url)
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"url must be an http:// or https:// URL, not {url!r}")
        for name, value in [
            ("max_batch_pulses", max_batch_pulses), ("max_batch_bytes", max_batch_bytes),
            ("max_buffered", max_buffered), ("concurrency", concurrency),
            ("flush_interval", flush_interval), ("timeout", timeout),
            ("initial_backoff", initial_backoff), ("max_backoff", max_backoff),
        ]:  # fmt: skip
            if not value > 0:
                raise ValueError(f"{name} must be > 0, not {value!r}")
        self.url = f"{url.rstrip('/')}/pulses"
        self._headers = {"Content-Type": NDJSON, "User-Agent": f"billing-ingestor/{__version__}"}
        if api_key is not None:
            if not (api_key and api_key.isascii() and api_key.isprintable()):
                raise ValueError("api_key must be printable ASCII: it goes in a header")
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._flush_interval = flush_interval
        self._concurrency = concurrency
        self._timeout = timeout
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._on_failure = on_failure
        self._encoder = _Encoder(stamp_timestamps)
        self._outbox = _Outbox(max_buffered, max_batch_pulses, max_batch_bytes)
        self._outbox.notify = self._on_wake
        self._wakeup = trio.lowlevel.ParkingLot()  # senders waiting for pulses
        self._progress = trio.lowlevel.ParkingLot()  # flush(), wait_not_full(), aclose()
        self._linger_deadline: float | None = None
        self._running = False
        self._stopped = trio.Event()
        self._http: httpx.AsyncClient | None = None
        _CLIENTS.add(self)

    # -- the API ----------------------------------------------------------------

    def record(
        self,
        tenant_id: str,
        product_sku: str,
        use_unit: str,
        used_amount: Decimal | int | str,
        *,
        id: str | None = None,
        timestamp: dt.datetime | str | None = None,
    ) -> str:
        """Buffer one pulse and return its id (given, or made here).

        Raises TypeError or ValueError for a pulse the server would reject on
        its face, BufferFull when `max_buffered` pulses are unsettled, and
        ClientClosed after aclose().
        """
        return self._record(
            tenant_id, product_sku, use_unit, used_amount, pulse_id=id, timestamp=timestamp
        )

    async def wait_not_full(self) -> None:
        """Wait until record() has room; it stays so until this task's next checkpoint."""
        while self._outbox.full():
            if self._outbox.closing:
                raise ClientClosed(self._outbox.stop_reason)
            await self._progress.park()

    async def flush(self) -> list[Failure]:
        """Send everything recorded so far; return once all of it is settled.

        Returns the failures not handed out before (by an earlier flush).
        """
        if not self._running:
            raise RuntimeError("the client's senders are not running: use open_client()")
        await self._wait_settled(self._outbox.request_flush())
        return self._outbox.take_failures()

    async def aclose(self) -> list[Failure]:
        """Refuse new pulses, deliver the buffered ones, stop the senders.

        Returns the failures not handed out before. Raises Undelivered if the
        senders stopped (or never ran) with pulses unsettled.
        """
        target = self._outbox.close()
        self._progress.unpark_all()
        if self._running:
            while not (self._outbox.stopped or self._outbox.settled(target)):
                await self._progress.park()
            await self._stopped.wait()
        lines = self._outbox.undelivered()
        if lines:
            raise Undelivered(lines, self._outbox.take_failures())
        return self._outbox.take_failures()

    def statistics(self) -> ClientStatistics:
        return self._outbox.statistics()

    def undelivered(self) -> list[bytes]:
        """The NDJSON lines of every unsettled pulse (after a cancelled run: to keep)."""
        return self._outbox.undelivered()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the senders until the client is closed and everything is settled."""
        if self._running:
            raise RuntimeError("the client's senders run already")
        self._running = True
        reason = "the client is closed"
        limits = httpx.Limits(
            max_connections=self._concurrency, max_keepalive_connections=self._concurrency
        )
        try:
            async with httpx.AsyncClient(timeout=self._timeout, limits=limits) as http:
                self._http = http
                async with trio.open_nursery() as nursery:
                    for _ in range(self._concurrency):
                        nursery.start_soon(self._send_batches)
                    task_status.started()
        except BaseException as exc:
            reason = f"the client's senders stopped: {exc!r}"
            raise
        finally:
            self._outbox.stop(reason)
            self._stopped.set()
            self._progress.unpark_all()
            left = self._outbox.statistics().unsettled
            if left:
                log.error("%d pulses were not acknowledged when the client stopped: %s",
                          left, reason)  # fmt: skip

    # -- inside ------------------------------------------------------------------

    def _forked(self) -> None:
        self._encoder.renew()
        self._outbox.forked(senders=self._running and not self._stopped.is_set())

    def _record(
        self,
        tenant_id: str,
        product_sku: str,
        use_unit: str,
        used_amount: Decimal | int | str,
        *,
        pulse_id: str | None,
        timestamp: dt.datetime | str | None,
        wait: bool = False,
    ) -> str:
        pulse_id, line = self._encoder.encode(
            tenant_id, product_sku, use_unit, used_amount, pulse_id=pulse_id, timestamp=timestamp
        )
        self._outbox.put(line, wait)
        return pulse_id

    def _on_wake(self) -> None:
        """Pulses are waiting, or due: wake the senders (in the client's trio thread)."""
        if not self._running:
            return
        if self._linger_deadline is None and self._outbox.has_waiting():
            self._linger_deadline = trio.current_time() + self._flush_interval
        self._wakeup.unpark_all()

    async def _wait_settled(self, target: int) -> None:
        while not self._outbox.settled(target):
            if self._outbox.stopped:
                raise ClientClosed(self._outbox.stop_reason)
            await self._progress.park()

    async def _send_batches(self) -> None:
        while (batch := await self._next_batch()) is not None:
            await self._deliver(batch)

    async def _next_batch(self) -> _Batch | None:
        while True:
            now = trio.current_time()
            deadline = self._linger_deadline
            batch, waiting = self._outbox.take(deadline is not None and now >= deadline)
            if not waiting:
                self._linger_deadline = None
            elif deadline is None:
                self._linger_deadline = now + self._flush_interval
            if batch is not None:
                return batch
            if waiting:
                with trio.move_on_at(self._linger_deadline or now):
                    await self._wakeup.park()
            elif self._outbox.closing:
                return None
            else:
                await self._wakeup.park()

    async def _deliver(self, batch: _Batch) -> None:
        """POST `batch` until each of its pulses is settled."""
        assert self._http is not None
        for attempt in itertools.count():
            self._outbox.count_request(retry=attempt > 0)
            retry_after: float | None = None
            try:
                response = await self._http.post(
                    self.url, content=b"".join(batch.lines), headers=self._headers
                )
            except httpx.RequestError as exc:  # timeouts, lost connections, garbled answers
                why = f"{type(exc).__name__}: {exc}"
            else:
                status = response.status_code
                if status == 202:
                    why = self._settle(batch, response)
                    if not why:
                        return
                elif status == 413 and len(batch.lines) > 1:
                    for part in self._outbox.split(batch):
                        await self._deliver(part)
                    return
                elif status >= 500 or status in _RETRY_STATUSES:
                    why = _error_text(response)
                    retry_after = _retry_after(response)
                else:
                    self._fail_all(batch, status, _error_text(response))
                    return
            delay = self._backoff(attempt, retry_after)
            log.warning("POST %s: %s; retrying %d pulses in %.2f s",
                        self.url, why, len(batch.lines), delay)  # fmt: skip
            await trio.sleep(delay)

    def _settle(self, batch: _Batch, response: httpx.Response) -> str:
        """Settle what a 202 report settles; what remains to retry, described ('' if none)."""
        try:
            report = _decode_report(response.content)
        except msgspec.MsgspecError as exc:
            return f"202 with an unreadable report ({exc})"
        keep: list[int] = []
        failures: list[Failure] = []
        duplicates = 0
        for item in report.items:
            if not 0 <= item.index < len(batch.lines):
                log.error("POST %s: report item %r is out of range", self.url, item)
            elif item.status == "duplicate":
                duplicates += 1
            elif item.status == "rejected" and (item.error or "").startswith(_NOT_STORED):
                keep.append(item.index)
            elif item.status != "accepted":
                status: FailureStatus = "conflict" if item.status == "conflict" else "rejected"
                reason = item.error or f"id {item.id!r} was already used for another pulse"
                failures.append(Failure(status, reason, item.id, 202, batch.lines[item.index]))
        self._outbox.settle(batch, keep, duplicates, failures)
        self._report(failures)
        return f"{len(keep)} pulses not stored by the server" if keep else ""

    def _fail_all(self, batch: _Batch, status: int, reason: str) -> None:
        failures = [Failure("refused", reason, _id_of(line), status, line) for line in batch.lines]
        self._outbox.settle(batch, (), 0, failures)
        self._report(failures)

    def _report(self, failures: list[Failure]) -> None:
        self._progress.unpark_all()
        if not failures:
            return
        first = failures[0]
        log.warning("%d pulses failed; the first: %s (%s)", len(failures), first.reason,
                    first.line.decode(errors="replace").rstrip())  # fmt: skip
        if self._on_failure is not None:
            for failure in failures:
                try:
                    self._on_failure(failure)
                except Exception:
                    log.exception("on_failure raised")

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        ceiling = min(self._max_backoff, math.ldexp(self._initial_backoff, min(attempt, 32)))
        delay = ceiling * (0.5 + random.random() / 2)
        if retry_after is not None:
            delay = max(delay, retry_after * (1 + random.random() / 10))
        return delay


# Every client of this process, for `_after_fork`.
_CLIENTS: weakref.WeakSet[TrioClient] = weakref.WeakSet()


def _after_fork() -> None:
    for client in list(_CLIENTS):
        client._forked()


os.register_at_fork(after_in_child=_after_fork)


@asynccontextmanager
async def open_client(url: str, **options: Unpack[Options]) -> AsyncIterator[TrioClient]:
    """A running TrioClient; leaving the block delivers what was recorded, then stops it.

    The block's own exception is raised as it is (not in an exception group)
    once the recorded pulses are settled.
    """
    client = TrioClient(url, **options)
    error: Exception | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        try:
            yield client
        except Exception as exc:  # delivered first, re-raised below outside the nursery
            error = exc
        await client.aclose()
    if error is not None:
        raise error


# -- the threaded client -------------------------------------------------------------


class Client:
    """Batches pulses to POST /pulses from plain code: `with Client(url) as client:`.

    The senders run in a background thread with their own trio loop; record()
    is safe from any number of threads. Options are TrioClient's, plus
    `when_full`: "block" (record waits for room) or "raise" (BufferFull).
    `on_failure` runs in the client's thread: it must not call flush() or close().

    Leaving the `with` block closes the client, which waits until everything
    recorded is settled, even when the block raised. A client not closed is
    closed at interpreter exit (waiting at most 30 s, then logging what is lost).
    """

    def __init__(
        self,
        url: str,
        *,
        when_full: Literal["block", "raise"] = "block",
        **options: Unpack[Options],
    ) -> None:
        if when_full not in ("block", "raise"):
            raise ValueError(f'when_full must be "block" or "raise", not {when_full!r}')
        self._core = TrioClient(url, **options)
        self._wait = when_full == "block"
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel = trio.CancelScope()
        self._error: BaseException | None = None
        self._closed = False  # the thread has stopped: `close` has nothing more to wait for
        self._closing = threading.Lock()  # a second `close` waits for the first
        self._interrupted = False  # a `close` was interrupted (Ctrl-C)
        self._thread = threading.Thread(target=self._main, name="ingestor-client", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise ClientError("the client's sender thread did not start") from self._error
        atexit.register(self._close_at_exit)

    @property
    def url(self) -> str:
        return self._core.url

    def record(
        self,
        tenant_id: str,
        product_sku: str,
        use_unit: str,
        used_amount: Decimal | int | str,
        *,
        id: str | None = None,
        timestamp: dt.datetime | str | None = None,
    ) -> str:
        """Buffer one pulse and return its id; when full, block or raise (`when_full`)."""
        return self._core._record(
            tenant_id, product_sku, use_unit, used_amount,
            pulse_id=id, timestamp=timestamp, wait=self._wait,
        )  # fmt: skip

    def flush(self, timeout: float | None = None) -> list[Failure]:
        """Send everything recorded so far; return once all of it is settled.

        Returns the failures not handed out before. Raises FlushTimeout if
        `timeout` seconds pass first (the pulses are still retried).
        """
        outbox = self._core._outbox
        target = outbox.request_flush()
        if not outbox.wait_settled(target, timeout):
            raise FlushTimeout(outbox.statistics().unsettled)
        if not outbox.settled(target):
            raise ClientClosed(outbox.stop_reason)
        return outbox.take_failures()

    def close(self, timeout: float | None = None) -> list[Failure]:
        """Refuse new pulses, deliver the buffered ones, stop the thread.

        Returns the failures not handed out before. If `timeout` seconds pass
        first, the senders are cancelled and Undelivered carries what is left.
        Called again, from any thread, it waits for the first call and answers
        the same: Undelivered again while pulses are left unacknowledged.
        Interrupted (Ctrl-C), it leaves the exit hook in place, which reports
        what is lost.
        """
        outbox = self._core._outbox
        with self._closing:
            if not self._closed:
                try:
                    settled = outbox.wait_settled(outbox.close(), timeout)
                except BaseException:
                    self._interrupted = True  # the exit hook waits no more
                    raise
                if not settled:
                    self._call_soon(self._cancel.cancel)
                self._thread.join()
                self._closed = True
                atexit.unregister(self._close_at_exit)
        lines = outbox.undelivered()
        if lines:
            raise Undelivered(lines, outbox.take_failures())
        if self._error is not None:
            raise ClientError("the client's sender thread failed") from self._error
        return outbox.take_failures()

    def statistics(self) -> ClientStatistics:
        return self._core.statistics()

    def undelivered(self) -> list[bytes]:
        return self._core.undelivered()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None or issubclass(exc_type, Exception):
            self.close()
            return
        # Ctrl-C or an exit: the user is leaving, the server may be down. Wait
        # a while, not for ever, and say what is lost rather than raise over
        # the interruption.
        try:
            self.close(timeout=_EXIT_TIMEOUT)
        except Undelivered as lost:
            _log_lost(lost)

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:
            self._error = exc
            log.error("the client's sender thread failed", exc_info=exc)
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._core._outbox.notify = lambda: self._call_soon(self._core._on_wake)
        with self._cancel:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._core.run)
                self._ready.set()

    def _call_soon(self, function: Callable[[], object]) -> None:
        """Run `function` in the client's trio thread (nothing once it has finished)."""
        if self._token is None:
            return
        with suppress(trio.RunFinishedError):
            self._token.run_sync_soon(function)

    def _close_at_exit(self) -> None:
        try:
            self.close(timeout=0 if self._interrupted else _EXIT_TIMEOUT)
        except Undelivered as lost:
            _log_lost(lost)
        except ClientError:
            log.exception("closing the ingestor client at interpreter exit")


def _log_lost(lost: Undelivered) -> None:
    """Log the lines of pulses a client stopped without, so they can be sent again."""
    log.error(
        "%s The lines follow, one a line.\n%s",
        lost,
        b"".join(lost.lines).decode(errors="replace").rstrip("\n"),
    )
