"""The supervision tree: start everything in order, stop it in reverse.

open_service(settings)
  store            opened in a thread; closed last
  shards           one actor per write lane of the store, owning its
                   partitions' writes; drained after HTTP stops
  committer        timer; cancelled after the shards drained
  deliverer        outbox -> sink; cancelled with the committer
serve(settings)
  open_service + hypercorn (trio worker) until SIGTERM/SIGINT, then:
  readyz 503 -> hypercorn stops accepting and finishes in-flight
  requests -> shards finish their queues -> store closes -> exit 0
"""

from __future__ import annotations

import gc
import logging
import math
import os
import resource
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio import run as hypercorn_run
from hypercorn.trio.run import worker_serve
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.utils import wrap_app

from .clock import SharedClock, wall_clock_us
from .committer import Committer
from .config import Settings, shown_url
from .deliverer import Deliverer
from .edge import Edge
from .intake import Rules
from .metrics import serve_siblings
from .runtime import Runtime, WorkerGroup
from .shard import Shard
from .sinks import Sink, open_sink
from .store import Store, open_store

__all__ = ["open_service", "serve"]

log = logging.getLogger("ingestor.service")
_SETTLE = 0.1  # seconds a drain waits, once idle, for requests still arriving
# How far the clocks of instances sharing a PostgreSQL may differ (NTP keeps
# them within milliseconds): a delivery's lease lasts that much longer.
_CLOCK_SKEW = 30.0
_noted: list[int] = []  # SIGTERMs and SIGINTs that came before `serve` took them (`run_service`)
_STORE_WATCH_S = 1.0  # how often the store is asked for its trouble, written to or not
# How long a write to a client may go without the client taking a chunk of it
# (`_OneConnection.protocol_send`), and the size of those chunks.
_WRITE_S = 10.0
_WRITE_CHUNK = 64 * 1024
_SPARE_FDS = 32  # open files left to the store, the sink and the rest (`_Connections`)


@asynccontextmanager
async def open_service(
    settings: Settings,
    *,
    store: Store | None = None,
    sink: Sink | None = None,
    clock: Callable[[], int] | None = None,
) -> AsyncIterator[Runtime]:
    """Start the store, shards, committer and deliverer; stop them in reverse.

    Without a `clock`, the service keeps the store's (`clock.SharedClock`)
    on PostgreSQL, and this machine's on SQLite.
    """
    if store is None:
        store = await trio.to_thread.run_sync(open_store, settings)
    sink = sink or open_sink(settings)
    shared = SharedClock(store.clock_offset_us) if clock is None and settings.on_postgres else None
    clock = clock or shared or wall_clock_us
    try:
        rules = Rules(
            late_window_s=settings.late_window,
            future_skew_s=settings.future_skew,
            max_batch=settings.max_batch,
            billing_timezone=settings.billing_timezone,
            tenant_timezones=settings.tenant_timezones,
            store_id=store.store_id,
        )
        rules.raise_horizon(await trio.to_thread.run_sync(store.purge_horizon))
        lanes = max(1, min(store.write_lanes, store.partitions))
        shards = [
            Shard(
                lane,
                range(lane, store.partitions, lanes),
                store,
                queue_size=settings.shard_queue,
                group_max_pulses=settings.group_max_pulses,
                clock=clock,
            )
            for lane in range(lanes)
        ]
        deliverer = Deliverer(
            store,
            sink,
            concurrency=settings.delivery_concurrency,
            retry_initial=settings.retry_initial,
            retry_max=settings.retry_max,
            lease=2 * settings.sink_timeout + 5,
            # Instances on other machines share a PostgreSQL; SQLite, one clock.
            clock_skew=_CLOCK_SKEW if settings.on_postgres else 0,
            clock=clock,
        )
        committer = Committer(
            shards,
            store,
            zones=rules.zones(),
            interval=settings.commit_interval,
            grace=settings.commit_grace,
            max_records=settings.batch_max_records,
            max_bytes=settings.batch_max_bytes,
            # An id is kept for the dedup window after its pulse arrived, and
            # a pulse may carry a timestamp up to future_skew after that: its
            # replay is inside the late window for as much longer.
            dedup_window=settings.dedup_window + settings.future_skew,
            on_commit=deliverer.wake,
            on_horizon=rules.raise_horizon,
            clock=clock,
        )
        runtime = Runtime(
            settings=settings,
            store=store,
            shards=shards,
            committer=committer,
            deliverer=deliverer,
            rules=rules,
            clock=clock,
        )
        async with trio.open_nursery() as actors:
            for shard in shards:
                await actors.start(shard.run)
            async with trio.open_nursery() as timers:
                if shared is not None:
                    await timers.start(shared.run)
                await timers.start(committer.run)
                await timers.start(deliverer.run)
                timers.start_soon(_watch_store, store)
                runtime.ready = True
                try:
                    yield runtime
                finally:
                    runtime.ready = False
                    runtime.draining = True
                    timers.cancel_scope.cancel()
            # Timers are gone; let the shards finish what they were given.
            for shard in shards:
                shard.close()
    finally:
        with trio.CancelScope(shield=True):
            await sink.aclose()
            await trio.to_thread.run_sync(store.close)


async def _watch_store(store: Store) -> None:
    """Ask the store for its trouble (`Store.trouble`) every second, whether or not
    anything writes: on SQLite, a WAL removed from an idle store is copied into
    the store file then, not at the next write, and a crash meanwhile lost
    every pulse it held."""
    while True:
        await trio.sleep(_STORE_WATCH_S)
        try:
            await trio.to_thread.run_sync(store.trouble)
        except Exception:
            log.exception("store check failed")


async def _no_protocol_switch(protocol: H11Protocol, request: object) -> None:
    """What replaces hypercorn's `H11Protocol._check_protocol`: the service
    speaks HTTP/1.1 only (see `_http1_only`)."""


def _http1_only() -> None:
    """Turn hypercorn's HTTP/2 over cleartext off.

    hypercorn switches a connection to HTTP/2 when a client opens with
    HTTP/2's preface or asks for `Upgrade: h2c`, with no setting to refuse
    it, and its HTTP/2 ends the whole server on a DATA frame for a stream
    it has already answered (hypercorn issue #329): one client posting
    without its key, or past max_body_bytes, stopped every request of the
    process. Without the switch, an Upgrade header is ignored, as RFC 9110
    §7.8 allows, and the preface is a malformed HTTP/1.1 request, answered
    with an error. The service has no TLS, so no ALPN offers HTTP/2 either.
    """
    if not hasattr(H11Protocol, "_check_protocol"):  # a hypercorn that checks elsewhere
        raise RuntimeError("hypercorn's H11Protocol._check_protocol is gone: see _http1_only")
    H11Protocol._check_protocol = _no_protocol_switch  # type: ignore[method-assign,assignment]


class _OneConnection(TCPServer):
    """hypercorn's handler of a connection, whose failure ends that connection only,
    which lets go of its socket once the client has closed, whose writes the
    client must take (`protocol_send`), and which is one of the service's
    `_Connections`.

    An exception that escaped hypercorn's handler of one connection ended
    the listeners' nursery, so the process, and every other request lost
    its answer: HTTP/2's did (`_http1_only`). The handler closes its
    stream on the way out; the failure is logged here.
    """

    async def run(self) -> None:
        connections = cast(_Config, self.config).connections
        connections.opened(self)
        try:
            await connections.make_room(self)
            await super().run()
        except Exception:
            log.exception("a connection failed: it is closed, the server goes on")
        finally:
            connections.closed(self)

    async def protocol_send(self, event: Event) -> None:
        """hypercorn's, but a write the client does not take ends its connection.

        hypercorn shields each write from cancellation, with no deadline: a
        client that stopped reading (frozen, or pipelining requests without
        reading the answers) held its request, its `max_in_flight` slot and
        its body's bytes for as long as it kept the socket, and SIGTERM never
        ended the process. A write now ends the connection once the client
        has taken no chunk of it for `_WRITE_S`, or when the drain ends
        (`_Connections.cut`). A write that finds the socket busy met the reading
        task closing it, the client gone: the connection is closed.
        """
        connections = cast(_Config, self.config).connections
        if not isinstance(event, RawData):
            if isinstance(event, Updated):
                connections.idle(self, event.idle)
            await super().protocol_send(event)
            return
        writes = connections.writes
        data = event.data
        async with self.send_lock:
            try:
                with trio.CancelScope(shield=True) as scope:
                    writes[scope] = trio.current_time()
                    try:
                        if connections.over:
                            scope.cancel()
                        if len(data) <= _WRITE_CHUNK:
                            await self.stream.send_all(data)
                        else:
                            view = memoryview(data)
                            for start in range(0, len(view), _WRITE_CHUNK):
                                writes[scope] = trio.current_time()
                                await self.stream.send_all(view[start : start + _WRITE_CHUNK])
                    finally:
                        del writes[scope]
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                await self.protocol.handle(Closed())
                return
        if scope.cancelled_caught:  # half written: the connection cannot go on
            with trio.CancelScope(shield=True):
                await self.stream.aclose()
                await self.protocol.handle(Closed())

    async def _read_data(self) -> None:
        try:
            await super()._read_data()
        finally:
            # The client has closed (or the read failed): nothing is left to
            # time out. hypercorn's trio handler left its keep-alive timer
            # running, and the connection's task group, with its socket,
            # waited for it, 75 s: a client opening a connection a request
            # held that many sockets, until the server could accept no more.
            await self.idle_task.stop()


class _Connections:
    """The service's client connections.

    Their writes in progress, each ended once its client has taken nothing
    of it for `_WRITE_S` (`watch`), and all by the end of a drain, with any
    that would begin after it (`cut`). And those idle: each holds a
    descriptor, and connections that send nothing (a port scan, a pool
    warming up, a flood) held every one the process may open, for their
    75 s keep-alive each; nothing was accepted meanwhile, /readyz included.
    A connection that would leave fewer than a tenth of the open-files
    limit (at least `_SPARE_FDS`) to the rest of the process closes idle
    ones first (`make_room`): those that never sent a request, oldest
    first, then those idle between requests, oldest first.
    """

    def __init__(self) -> None:
        # Each write in progress: when its client last took a chunk of it.
        self.writes: dict[trio.CancelScope, float] = {}
        self.over = False
        self.open = 0
        self._unused: dict[TCPServer, None] = {}  # no request yet
        self._idle: dict[TCPServer, None] = {}  # between requests
        self._others = _descriptors()  # the process's own, before any connection
        self._warned = -math.inf

    def cut(self) -> None:
        self.over = True
        for scope in self.writes:
            scope.cancel()

    async def watch(self) -> None:
        """End each write whose client has taken nothing of it for `_WRITE_S`.

        One task for them all: a deadline set on each write cost a
        single-pulse POST 1.5 µs a write, twice a request."""
        while True:
            await trio.sleep(1.0)
            now = trio.current_time()
            for scope, since in self.writes.items():
                if now - since > _WRITE_S:
                    scope.cancel()

    def opened(self, connection: TCPServer) -> None:
        self.open += 1
        self._unused[connection] = None

    def closed(self, connection: TCPServer) -> None:
        self.open -= 1
        self._unused.pop(connection, None)
        self._idle.pop(connection, None)

    def idle(self, connection: TCPServer, idle: bool) -> None:
        self._unused.pop(connection, None)
        self._idle.pop(connection, None)
        if idle:
            self._idle[connection] = None

    async def make_room(self, new: TCPServer) -> None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return
        if self._others + self.open + max(_SPARE_FDS, soft // 10) <= soft:
            return
        # One for one: those closed are counted open until their tasks end.
        # An unused one hypercorn has not set up yet closes one when it is.
        oldest = next((c for c in self._unused if c is not new), None)
        if oldest is None:
            oldest = next(iter(self._idle), None)
        if oldest is None or not hasattr(oldest, "protocol"):
            return
        self._unused.pop(oldest, None)
        self._idle.pop(oldest, None)
        now = trio.current_time()
        if now - self._warned > 60:
            self._warned = now
            log.warning(
                "open files near the limit: closing idle connections",
                extra={"fields": {"connections": self.open, "open_files_limit": soft}},
            )
        with trio.CancelScope(shield=True):
            await oldest._initiate_server_close()


def _descriptors() -> int:
    """How many files this process has open (0 where that cannot be seen)."""
    for listing in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(listing))
        except OSError:
            continue
    return 0


class _Config(HypercornConfig):
    """hypercorn's settings, and the service's client connections."""

    def __init__(self) -> None:
        super().__init__()
        self.connections = _Connections()


def _harden_hypercorn() -> None:
    _http1_only()
    hypercorn_run.TCPServer = _OneConnection  # type: ignore[attr-defined]


def hypercorn_config(settings: Settings) -> _Config:
    _harden_hypercorn()
    config = _Config()
    config.bind = [settings.bind]
    config.graceful_timeout = settings.graceful_timeout
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75
    # Quart cancels hypercorn's keep-alive timer when a request ends, so idle
    # connections would stay open for ever; a connection that sends nothing
    # for this long is closed instead.
    config.read_timeout = 75
    # A head still arriving is held up to this many bytes, then answered 431 by
    # hypercorn. Above `max_header_bytes`, which the edge checks once the head
    # is whole: the request line and the separators are not counted in it,
    # and a head that came in two reads was refused at hypercorn's 16 KiB.
    config.h11_max_incomplete_size = settings.max_header_bytes + 16 * 1024
    # Connections the kernel holds for us until they are accepted (capped by
    # net.core.somaxconn). Past hypercorn's 100, a burst of new connections
    # overflows the queue and the kernel drops or resets some: 240 clients
    # opening at once met resets instead of their 202 or 503.
    config.backlog = 2048
    return config


async def serve(
    settings: Settings,
    *,
    sockets: Sockets | None = None,
    worker: tuple[int, int] = (0, 1),
    group: WorkerGroup | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the service until SIGTERM or SIGINT, then drain and return.

    `sockets` are listening sockets made by a supervisor (see `workers`);
    without them the service binds `settings.bind` itself. `worker` is this
    process's (index, count) among the supervisor's workers, and `group`
    where they answer each other.

    The store is opened and the port bound before the service's nursery: a
    failure there (a store file that is not ours, a port in use) leaves as
    the plain StoreError or OSError that `__main__` reports in one line, not
    wrapped in an exception group that would end the process with a
    traceback. Signals are taken from the start: one that comes while the
    store opens (PostgreSQL may take its busy timeout to answer) ends the
    process at once, and cleanly.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        store = None if _noted else await _open_store(settings, worker, signals)
        if store is None:
            log.info("stopped before start", extra={"fields": {"bind": settings.bind}})
            return
        await _serve(
            settings,
            store,
            sockets=sockets,
            group=group,
            signals=signals,
            task_status=task_status,
        )


def run_service(serve_: Callable[..., Any], *args: Any) -> None:
    """`trio.run(serve_, *args)`, `serve_` calling `serve`, a process's one run.

    Until `serve` takes SIGTERM and SIGINT, and again once it has let them
    go, both are noted, not a death by the signal: `serve` stops before it
    starts if one came, and one after the stop is ignored. Raised as
    KeyboardInterrupt instead, one landed in trio's own teardown
    (TrioInternalError, exit 1, after a clean stop had been logged); left
    to their default, a second signal turned a logged clean stop into an
    exit status saying the process was killed.
    """

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: _noted.append(signum))
    try:
        trio.run(serve_, *args)
    finally:
        ignore_stop_signals()


def ignore_stop_signals() -> None:
    """Once a process has stopped: a SIGTERM or SIGINT more (an orchestrator's,
    a second Ctrl-C) is ignored (see `run_service`)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


async def _serve(
    settings: Settings,
    store: Store,
    *,
    sockets: Sockets | None,
    group: WorkerGroup | None,
    signals: AsyncIterator[int],
    task_status: trio.TaskStatus[None],
) -> None:
    from .api import create_app

    config = hypercorn_config(settings)
    if sockets is None:
        try:
            sockets = _listen(config)
        except BaseException:
            store.close()
            raise
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_wait_for_signal, signals, stop)
        nursery.start_soon(config.connections.watch)
        async with open_service(settings, store=store) as runtime:
            runtime.group = group
            app = create_app(runtime)
            edge, metrics = runtime.edge, runtime.metrics
            assert edge is not None  # installed by create_app
            assert metrics is not None
            if group is not None:
                await nursery.start(serve_siblings, metrics, group.socket(group.index))
            log.info(
                "start",
                extra={
                    "fields": {
                        "bind": settings.bind,
                        "store_id": runtime.store.store_id,
                        "partitions": runtime.store.partitions,
                        "durability": settings.durability,
                        "sink": runtime_sink(settings),
                        "api_keys": len(settings.api_keys),
                    }
                },
            )
            if not settings.api_keys:
                log.warning(
                    "no api_keys: every request to a loopback host acts as an admin of"
                    " every tenant (see README, API keys)"
                )

            async def shutdown_trigger() -> None:
                await stop.wait()
                runtime.draining = edge.closing = True

            _tune_collector()
            task_status.started()
            async with trio.open_nursery() as http:
                http.start_soon(
                    _drain,
                    stop,
                    edge,
                    settings.graceful_timeout,
                    http.cancel_scope,
                    config.connections,
                )
                await worker_serve(
                    wrap_app(app, config.wsgi_max_body_size, mode="asgi"),
                    config,
                    sockets=sockets,
                    shutdown_trigger=shutdown_trigger,
                )
                http.cancel_scope.cancel()
            runtime.draining = True
        nursery.cancel_scope.cancel()
    log.info("stop", extra={"fields": {"bind": settings.bind}})


def _tune_collector() -> None:
    """Make the cyclic garbage collector cheap on the ingest path.

    What start-up built lives as long as the process: freezing it keeps
    every full collection from walking it again. Requests allocate many
    short-lived containers but make few cycles, so collections of the
    youngest generation can wait for 50,000 allocations instead of 700.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(50_000, older, oldest)


def runtime_sink(settings: Settings) -> str:
    """The sink as it may be logged: a URL without its credentials."""
    return shown_url(settings.sink)


def _listen(config: HypercornConfig) -> Sockets:
    """Bind and listen on the configured addresses (what hypercorn does when given none)."""
    sockets = config.create_sockets()
    for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
        sock.listen(config.backlog)
    return sockets


async def _drain(
    stop: trio.Event,
    edge: Edge,
    graceful_timeout: float,
    http: trio.CancelScope,
    connections: _Connections,
) -> None:
    """After `stop`, end HTTP serving once no request is in flight (or at the timeout).

    Hypercorn stops accepting at `stop` and waits for its connections; idle
    keep-alive connections would hold it for the whole timeout, so the edge's
    count of requests in flight decides instead. A short settle lets a
    request whose head was being read when `stop` came reach the app. At
    the end, writes to clients still in progress are cut short: they are
    shielded from the cancellation.
    """
    await stop.wait()
    with trio.move_on_after(graceful_timeout):
        while True:
            await edge.wait_idle()
            await trio.sleep(_SETTLE)
            if not edge.in_flight:
                break
    connections.cut()
    http.cancel()


async def _open_store(
    settings: Settings, worker: tuple[int, int], signals: AsyncIterator[int]
) -> Store | None:
    """The store, or None if a signal came while it opened (it is then left to
    its thread: the process is ending)."""
    opened: list[Store] = []
    signalled = False
    with trio.CancelScope() as scope:

        async def watch() -> None:
            nonlocal signalled
            async for _ in signals:
                signalled = True
                scope.cancel()
                return

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                opened.append(
                    await trio.to_thread.run_sync(
                        partial(open_store, settings, worker=worker), abandon_on_cancel=True
                    )
                )
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # the opening's own error, as it is
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
    if signalled:
        for store in opened:
            store.close()
        return None
    return opened[0]


async def _wait_for_signal(signals: AsyncIterator[int], stop: trio.Event) -> None:
    """Stop at the first signal; take the later ones too, for the drain's whole
    length: a worker whose receiver had closed was killed, mid-drain, by the
    supervisor's SIGTERM after a Ctrl-C to their process group."""
    async for _ in signals:
        if stop.is_set():
            log.info("already stopping: draining the requests in flight")
        stop.set()
