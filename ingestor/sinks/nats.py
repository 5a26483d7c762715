"""The nats sink: each batch published to a JetStream stream, deduplicated by batch id.

nats-py speaks asyncio only and the service runs on trio, so the sink keeps one
private asyncio event loop in a daemon thread, started on the first delivery,
and the NATS connection lives there. Each `deliver` crosses into that loop
once per batch; the trio task waits without blocking trio and without holding
a worker thread, and cancelling it cancels the publish:

    trio task ── run_coroutine_threadsafe ──▶ asyncio loop thread: connect,
        ▲                                     ensure the stream, publish,
        └─ TrioToken.run_sync_soon ◀───────── wait for the JetStream ack

The first delivery connects (bounded by the sink timeout, so a server that is
down gives `SinkRetryable`, and a later delivery connects once it is up) and
makes sure the stream exists: if it is missing it is created with the subject
template's `{date}` token as a wildcard (`billing.batches.>`), file storage,
one replica and a one-day duplicate window. A stream that already exists is
used as it is (a clustered deployment creates it beforehand with the
replicas it wants), but for a duplicate window shorter than a day, which is
raised to one: a batch whose ack was lost may be sent again minutes later,
after the deliverer's backoff, or hours later, after an outage, and a
shorter window stores it twice. A stream whose window cannot be raised (its
max_age is shorter) is refused, as is one set to `no_ack`, which acks no
batch ever, and one that keeps a few messages a subject
(`max_msgs_per_subject`), which would push a day's earlier batches off.
The stream is read before every batch: one an operator made again
meanwhile (with NATS's default window of 2 minutes) stored a batch sent
again twice. Once connected, nats-py reconnects by itself, for ever.

A stream that would delete batches the billing system may not have read
is used, and said once in a WARNING: one that drops its oldest messages
once it holds `max_msgs` or `max_bytes` (discard old, NATS's default; with
discard new it refuses the batch instead, and the deliverer tries again
until there is room), and one whose retention is interest while it has no
consumer (it deletes each batch as it stores it). Such a batch is still in
the outbox; sent again within the stream's duplicate window (a day), it
would be taken for a duplicate and not stored.

Delivered point: the JetStream publish ack, which the server sends once the
message is stored in the stream. The `Nats-Msg-Id` header is the batch id, so
a batch sent again (its ack was lost, or we crashed before recording it) is
dropped by the server as a duplicate within the stream's duplicate window;
a duplicate ack counts as delivered.

Errors: timeouts, an unreachable or reconnecting server and JetStream errors
that may pass are `SinkRetryable`. A batch larger than the server's
max_payload or the stream's max_msg_size, and a stream that cannot take the
batch's subject (it does not capture it, another stream does, the stream
config is invalid) are `SinkRejected`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import ssl
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import nats.errors
import nats.js.errors
import trio
from nats.aio.client import Client
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig, StreamInfo

from ..config import check_nats_names
from ..errors import SinkError, SinkRejected, SinkRetryable

__all__ = ["DUPLICATE_WINDOW", "NatsSink", "stream_subject", "subject_matches"]

log = logging.getLogger("ingestor.sinks.nats")
T = TypeVar("T")

# NATS's default window is 2 minutes, but a batch whose ack was lost is sent
# again only after the deliverer's backoff (up to retry_max, 5 minutes by
# default). A day of batch ids is a few thousand entries on the server.
DUPLICATE_WINDOW = 24 * 3600.0
# Notice a silently dead connection within about 30 s (two unanswered pings),
# not nats-py's default of about 6 minutes.
_PING_INTERVAL = 10
_RECONNECT_WAIT = 1
_CANCEL_AGAIN_S = 0.05  # how soon `_stop` cancels again a connect that went on

# JetStream error codes (nats-server's server/errors.json).
_STREAM_NAME_IN_USE = 10058
_REJECTED = {
    10052: "the stream configuration is invalid",
    10054: "the batch is larger than the stream's max_msg_size",
    10060: "the subject belongs to another stream",
    10065: "the stream's subjects overlap those of another stream",
}


def stream_subject(template: str) -> str:
    """The subjects a new stream captures: `{date}`'s token as a wildcard.

    A trailing token becomes `>` (`billing.batches.>`), one in the middle `*`.
    """
    tokens = template.split(".")
    wild = ["*" if "{date}" in token else token for token in tokens]
    if wild[-1] == "*":
        wild[-1] = ">"
    return ".".join(wild)


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether a stream subject `pattern` (with `*`, `>`) captures `subject`."""
    want, have = pattern.split("."), subject.split(".")
    for index, token in enumerate(want):
        if token == ">":
            return len(have) > index
        if index >= len(have) or token not in ("*", have[index]):
            return False
    return len(want) == len(have)


def _header_size(headers: dict[str, str]) -> int:
    """Bytes nats-py sends for `headers` (NATS/1.0 line, `Key: value` lines)."""
    return len(b"NATS/1.0\r\n\r\n") + sum(len(f"{k}: {v}\r\n".encode()) for k, v in headers.items())


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


class NatsSink:
    name = "nats"

    def __init__(self, url: str, *, stream: str, subject: str, timeout: float) -> None:
        check_nats_names(stream, subject)
        servers = [server.strip() for server in url.split(",")]
        self.url = ",".join(_without_credentials(server) for server in servers)
        self.stream = stream
        self.subject = subject
        self.timeout = timeout
        self._publisher = _Publisher(
            servers, shown=self.url, stream=stream, subject=subject, timeout=timeout
        )
        self._loop: _LoopThread | None = None
        self._closed = False

    async def deliver(self, batch_id: str, day: str, body: bytes) -> None:
        if self._closed:
            raise SinkRetryable("the nats sink is closed")
        if self._loop is None:
            self._loop = _LoopThread(f"nats-sink-{self.stream}")
        future = self._loop.submit(self._publisher.publish(batch_id, day, body))
        await _wait_done(future)
        if future.cancelled():
            raise SinkRetryable(f"publishing {batch_id}: the nats sink was closed meanwhile")
        future.result()

    async def aclose(self) -> None:
        """Drain and close the connection, then stop the loop thread."""
        if self._closed:
            return
        self._closed = True
        loop, self._loop = self._loop, None
        if loop is None:
            return
        # Shielded and never raising: the service closes the store after this.
        with trio.CancelScope(shield=True):
            closing = loop.submit(self._publisher.close())
            await _wait_done(closing)
            if not closing.cancelled() and (error := closing.exception()) is not None:
                log.warning(
                    "closing the nats connection failed", extra={"fields": {"error": repr(error)}}
                )
            await trio.to_thread.run_sync(loop.stop, self.timeout)


async def _wait_done(future: concurrent.futures.Future[Any]) -> None:
    """Wait until `future` is done without blocking trio; cancel it if we are cancelled."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: concurrent.futures.Future[Any]) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)

    future.add_done_callback(wake)
    try:
        await done.wait()
    finally:
        future.cancel()  # a no-op once it is done


class _LoopThread:
    """One asyncio event loop running in a daemon thread until `stop`."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def stop(self, timeout: float) -> None:
        """Stop the loop, cancel what still runs in it, and join the thread. Blocks."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning(
                "the nats sink's loop did not stop", extra={"fields": {"waited_s": timeout}}
            )

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


class _Publisher:
    """The NATS side of the sink. Every method runs in the sink's asyncio loop."""

    def __init__(
        self, servers: list[str], *, shown: str, stream: str, subject: str, timeout: float
    ) -> None:
        self._servers = servers
        self._shown = shown
        self._stream = stream
        self._subject = subject
        self._timeout = timeout
        self._client: Client | None = None
        self._stream_subjects: Sequence[str] | None = None  # None: not checked yet
        self._last_error: Exception | None = None
        self._lock = asyncio.Lock()  # binds to the sink's loop on first use
        self._warned: set[str] = set()  # what `_warn_of_deletions` said already

    async def publish(self, batch_id: str, day: str, body: bytes) -> None:
        """Publish one batch and wait for its ack. Raises only SinkError."""
        subject = self._subject.replace("{date}", day)
        headers = {"Nats-Msg-Id": batch_id, "Nats-Expected-Stream": self._stream}
        # Named while it waits: a delivery behind another's stuck stream check
        # (a server whose disk filled hangs there) said it timed out connecting.
        step = "waiting for another delivery to connect and check the stream"
        try:
            async with asyncio.timeout(self._timeout):
                async with self._lock:  # one caller connects and checks the stream
                    step = f"connecting to {self._shown}"
                    client = await self._connected()
                    step = f"checking stream {self._stream}"
                    subjects = await self._checked_stream(client)
                step = f"publishing {batch_id} to {subject}"
                self._check(client, subjects, subject, len(body) + _header_size(headers))
                # Delivered point: the ack says the stream stored it (or had it already).
                # Without one the batch stays pending and is sent again, deduplicated.
                ack = await client.jetstream().publish(
                    subject, body, timeout=self._timeout, headers=headers
                )
        except SinkError:
            raise
        except TimeoutError as exc:
            raise SinkRetryable(
                f"{step}: timed out after {self._timeout:g}s{self._last_error_text()}"
            ) from exc
        except nats.js.errors.NoStreamResponseError as exc:
            self._stream_subjects = None  # deleted meanwhile? check (and create) it again
            raise SinkRetryable(f"{step}: no JetStream stream answered") from exc
        except nats.js.errors.APIError as exc:
            raise _translate_api_error(step, exc) from exc
        except (nats.errors.MaxPayloadError, nats.errors.BadSubjectError) as exc:
            raise SinkRejected(f"{step}: {exc}") from exc
        except (nats.errors.Error, OSError) as exc:
            raise SinkRetryable(f"{step}: {exc}") from exc
        if ack.duplicate:
            log.debug("already on the stream", extra={"fields": {"batch_id": batch_id}})

    async def close(self) -> None:
        """Drain the connection (publishes in flight finish), then close it.

        A connection that is down (nats-py is reconnecting) has nothing to
        drain: what it buffered was never acknowledged, so it is sent again.
        """
        client, self._client = self._client, None
        if client is None or client.is_closed:
            return
        if not client.is_connected:
            await self._close_quietly(client)
            return
        try:
            async with asyncio.timeout(self._timeout):
                await client.drain()
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            log.warning(
                "draining the nats connection failed", extra={"fields": {"error": str(exc)}}
            )
        finally:
            await self._close_quietly(client)

    async def _connected(self) -> Client:
        if self._client is None or self._client.is_closed:
            self._client = await self._connect()
            self._stream_subjects = None
        return self._client

    async def _checked_stream(self, client: Client) -> Sequence[str]:
        # Every time (one round trip a batch): the stream may have been made
        # again since the last batch, with a window of 2 minutes.
        self._stream_subjects = await self._ensure_stream(client)
        return self._stream_subjects

    async def _connect(self) -> Client:
        # With max_reconnect_attempts=-1 nats-py retries a refused first
        # connect for ever; the caller's timeout bounds this attempt.
        client = Client()
        self._last_error = None
        # nats-py tries the servers one after another, each for connect_timeout:
        # the whole budget on the first, and a server that accepts but never
        # answers kept the others, healthy, from being tried.
        seconds = max(1, math.ceil(self._timeout / len(self._servers)))
        attempt = asyncio.ensure_future(
            client.connect(
                self._servers,
                name="billing-ingestor",
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                connect_timeout=seconds,
                drain_timeout=seconds,
                reconnect_time_wait=_RECONNECT_WAIT,
                max_reconnect_attempts=-1,
                ping_interval=_PING_INTERVAL,
            )
        )
        try:
            # Waited for, not awaited: cancelling this wait (the caller's
            # timeout) leaves the attempt to `_stop`, which makes sure it ends.
            await asyncio.wait({attempt})
            attempt.result()
        except BaseException:
            await _stop(attempt)
            await self._close_quietly(client)
            raise
        log.info("connected to NATS", extra={"fields": {"url": self._shown}})
        return client

    async def _close_quietly(self, client: Client) -> None:
        """Close `client` within the sink timeout, whatever it raises: its socket
        may be a TLS session whose peer never answers a close."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self._timeout):
                await client.close()

    async def _ensure_stream(self, client: Client) -> Sequence[str]:
        """Create the stream if it is missing; return the subjects it captures."""
        manager = client.jsm(timeout=self._timeout)
        try:
            info = await manager.stream_info(self._stream)
        except nats.js.errors.NotFoundError:
            config = StreamConfig(
                name=self._stream,
                subjects=[stream_subject(self._subject)],
                storage=StorageType.FILE,
                duplicate_window=DUPLICATE_WINDOW,
            )
            try:
                info = await manager.add_stream(config)
                log.info("created stream", extra={"fields": {"stream": self._stream}})
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != _STREAM_NAME_IN_USE:  # another instance was first
                    raise
                info = await manager.stream_info(self._stream)
        if info.config.no_ack:
            raise SinkRejected(
                f"stream {self._stream} is set to no_ack: it would store each batch"
                " and confirm none, and every batch would be sent again for ever"
            )
        per_subject = info.config.max_msgs_per_subject
        if per_subject is not None and per_subject > 0:
            raise SinkRejected(
                f"stream {self._stream} keeps at most {per_subject} message(s) a subject"
                f" (max_msgs_per_subject), and a day's batches share one ({self._subject}):"
                " each batch would push an earlier one of its day off the stream"
            )
        window = info.config.duplicate_window or 0.0
        if window < DUPLICATE_WINDOW:
            fields = {"stream": self._stream, "duplicate_window_s": window}
            try:
                await manager.update_stream(
                    dataclasses.replace(info.config, duplicate_window=DUPLICATE_WINDOW)
                )
            except nats.js.errors.APIError as exc:
                raise SinkRejected(
                    f"stream {self._stream} keeps batch ids for {window:g} s"
                    " (duplicate_window), and refused a window of a day"
                    f" ({exc.description}): a batch sent again after that would be"
                    " stored twice; give the stream a max_age of a day or more"
                ) from exc
            log.warning("raised the stream's duplicate window to a day", extra={"fields": fields})
        self._warn_of_deletions(info)
        return tuple(info.config.subjects or ())

    def _warn_of_deletions(self, info: StreamInfo) -> None:
        """Say, once for each, what of the stream's settings deletes batches
        whether or not the billing system has read them (see the module
        docstring): it cannot be told here whether it has."""
        config = info.config
        found = []
        if config.discard != DiscardPolicy.NEW:
            limits = [
                f"{name} {value}"
                for name, value in (("max_msgs", config.max_msgs), ("max_bytes", config.max_bytes))
                if value is not None and value > 0
            ]
            if limits:
                found.append(
                    f"it drops its oldest batches once it holds {' or '.join(limits)}"
                    " (discard old); with discard new it refuses a batch until there"
                    " is room, and the batch is sent again"
                )
        if config.retention == RetentionPolicy.INTEREST and not info.state.consumer_count:
            found.append(
                "its retention is interest and it has no consumer: it deletes each batch"
                " as it stores it"
            )
        for said in found:
            if said not in self._warned:
                self._warned.add(said)
                log.warning(
                    "the stream may delete batches the billing system has not read",
                    extra={"fields": {"stream": self._stream, "why": said}},
                )

    def _check(self, client: Client, subjects: Sequence[str], subject: str, size: int) -> None:
        """Reject what the server could never take (an oversize message closes the connection)."""
        if size > client.max_payload:
            raise SinkRejected(
                f"the batch is {size} bytes with its headers, more than the NATS server's "
                f"max_payload of {client.max_payload}"
            )
        if not any(subject_matches(pattern, subject) for pattern in subjects):
            self._stream_subjects = None  # read it again next time: it may be fixed by then
            raise SinkRejected(
                f"stream {self._stream} does not capture subject {subject} "
                f"(its subjects: {', '.join(subjects) or 'none'})"
            )

    def _last_error_text(self) -> str:
        return f" (last error: {self._last_error})" if self._last_error else ""

    async def _on_error(self, exc: Exception) -> None:
        # Failed connection attempts land here; deliveries report them. One that
        # says why (the server refused the credentials, the TLS handshake
        # failed) is not replaced by a plain connection error after it: a
        # server that refuses a password answers so and closes, and the
        # client's next write failing with a broken pipe hid the refusal.
        if not (_says_why(self._last_error) and not _says_why(exc)):
            self._last_error = exc
        log.debug("nats error", extra={"fields": {"error": repr(exc)}})

    async def _on_disconnected(self) -> None:
        if self._client is not None and not self._client.is_closed:
            log.warning(
                "disconnected from NATS, reconnecting", extra={"fields": {"url": self._shown}}
            )

    async def _on_reconnected(self) -> None:
        self._last_error = None
        log.info("reconnected to NATS", extra={"fields": {"url": self._shown}})


def _says_why(exc: BaseException | None) -> bool:
    """Whether `exc` names a cause, not only a connection that failed."""
    return isinstance(exc, (nats.errors.Error, ssl.SSLError))


async def _stop(task: asyncio.Future[Any]) -> None:
    """Cancel `task` until it has ended, however often it takes.

    nats-py's connect retries for ever (`max_reconnect_attempts=-1`), and a
    cancellation that lands in its clean-up of a failed try is swallowed
    there: cancelled once, a connect to a server refusing the password, or
    to one that never finished a TLS handshake, went on trying, and the
    delivery waiting for it never ended. A cancellation of this wait is
    taken too, and raised once the task has ended.
    """
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        task.cancel()
        try:
            await asyncio.wait({task}, timeout=_CANCEL_AGAIN_S)
        except asyncio.CancelledError as exc:
            cancelled = exc
    if not task.cancelled():
        task.exception()  # retrieved: the caller raises its own
    if cancelled is not None:
        raise cancelled


def _translate_api_error(step: str, exc: nats.js.errors.APIError) -> SinkError:
    if isinstance(exc, nats.js.errors.ServiceUnavailableError) and exc.err_code is None:
        return SinkRetryable(f"{step}: JetStream did not answer (is it enabled on the server?)")
    reason = _REJECTED.get(exc.err_code or 0)
    detail = f"{step}: {reason or 'JetStream error'}: {exc.description} (code {exc.err_code})"
    return SinkRejected(detail) if reason else SinkRetryable(detail)
