"""Delivery to NATS JetStream while the server's storage runs out or goes away.

Each test runs the whole service in process (`open_service`, SQLite store,
the real wall clock, commits by hand) against a private nats-server of its
own: a free port on 127.0.0.1, a monitoring port (to count the service's
connections), a JetStream store dir of its own, restarted by the test as an
operator would. What must hold whatever the server's storage does
(DESIGN.md §3.4, README "sinks"):

- a batch is `delivered` only once the stream holds it, and the stream holds
  each batch once (Nats-Msg-Id), with the body GET /batches/{id} shows;
- a condition that passes (a full disk, a full stream, JetStream off) is
  retried with backoff, never `failed`, and `last_error` says what is wrong;
- once it is fixed, every batch is delivered, and the service is left with
  the one thread and the one connection of its sink.

Without root (the tmpfs) or nats-server the tests skip (fail under CI).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import subprocess
import threading
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import nats as nats_py
import pytest
import trio
from quart.typing import TestClientProtocol as Client

from ingestor.api import create_app
from ingestor.config import load_settings
from ingestor.runtime import Runtime
from ingestor.service import open_service
from tests.e2e.cluster_support import unavailable
from tests.faults.test_workers_exhaustion import Ballast, small_disk
from tests.support.nats import need_nats_server, start_nats_server, stream_messages
from tests.support.server import free_port, wait_until

DAY = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).date().isoformat()
STATE = {"status", "attempts", "last_error", "next_attempt_at", "delivered_at"}
RETRY_INITIAL, RETRY_MAX, SINK_TIMEOUT = 0.2, 1.0, 1.5


class Nats:
    """A nats-server on fixed ports and a store dir, started again as an operator would."""

    def __init__(self, store: Path, home: Path) -> None:
        self.store = store
        self.home = home
        self.port = free_port()
        self.monitor = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = home / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, *, jetstream: bool = True, max_file_store: int | None = None) -> None:
        command = ["nats-server", "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor)]
        if jetstream:
            limit = f", max_file_store: {max_file_store}" if max_file_store else ""
            config = self.home / "nats-server.conf"
            config.write_text(f'jetstream {{ store_dir: "{self.store}"{limit} }}\n')
            command += ["-c", str(config)]
        self.process = start_nats_server(command, self.port, self.log)

    def kill(self) -> None:
        """SIGKILL: a server whose JetStream hangs does not stop on SIGTERM."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def connections(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor}/connz", timeout=3) as answer:
            return int(json.load(answer)["num_connections"])


@pytest.fixture
def new_nats(tmp_path: Path) -> Iterator[Callable[[Path], Nats]]:
    need_nats_server()
    made: list[Nats] = []

    def make(store: Path) -> Nats:
        home = tmp_path / f"nats{len(made)}"
        home.mkdir()
        made.append(Nats(store, home))
        return made[-1]

    yield make
    for server in made:
        server.kill()


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, nats: Nats, stream: str) -> AsyncIterator[tuple[Runtime, Client]]:
    settings = load_settings(
        environ={},
        data_dir=str(tmp_path / "data"),
        partitions=4,
        commit_interval=3600,
        durability="os",
        sink=nats.url,
        nats_stream=stream,
        nats_subject=f"{stream.lower()}.{{date}}",
        sink_timeout=SINK_TIMEOUT,
        retry_initial=RETRY_INITIAL,
        retry_max=RETRY_MAX,
        batch_max_records=3,
    )
    async with open_service(settings) as runtime:
        yield runtime, create_app(runtime).test_client()


def new_stream() -> str:
    return f"ST{uuid.uuid4().hex[:10].upper()}"


async def commit_round(client: Client, tag: str, tenants: int) -> list[str]:
    """Pulses of `tenants` new tenants on DAY, committed: the new batches' ids."""
    stamp = f"{DAY}T12:00:00Z"
    pulses = [
        {
            "tenant_id": f"{tag}-{n}",
            "product_sku": "sku",
            "use_unit": "call",
            "used_amount": f"{n}.5",
            "timestamp": stamp,
            "id": f"{tag}-{n}",
        }
        for n in range(tenants)
    ]
    posted = await client.post("/pulses", json=pulses)
    assert posted.status_code == 202, await posted.get_data(as_text=True)
    committed = await client.post("/aggregates/commit", json={"date": DAY})
    assert committed.status_code == 200, await committed.get_data(as_text=True)
    ids = [b["batch_id"] for b in (await committed.get_json())["batches"]]
    assert ids, "the commit made no batch"
    return ids


async def views(client: Client, ids: list[str]) -> dict[str, dict[str, Any]]:
    found = {}
    for batch_id in ids:
        answer = await client.get(f"/batches/{batch_id}")
        assert answer.status_code == 200, batch_id
        found[batch_id] = await answer.get_json()
    return found


async def all_delivered(client: Client, ids: list[str]) -> dict[str, dict[str, Any]]:
    shown = await views(client, ids)
    return shown if all(v["status"] == "delivered" for v in shown.values()) else {}


async def attempted(client: Client, ids: list[str], times: int) -> dict[str, dict[str, Any]]:
    """The views once every batch of `ids` not delivered has been tried `times` times."""
    shown = await views(client, ids)
    waiting = [v for v in shown.values() if v["status"] != "delivered"]
    return shown if all(v["attempts"] >= times for v in waiting) else {}


async def check_stream(nats: Nats, stream: str, client: Client, ids: list[str]) -> None:
    """Each batch once on the stream, under its id, with the body the outbox shows."""
    found = await stream_messages(nats.url, stream)
    assert sorted(msg_id or "" for _, _, msg_id in found) == sorted(ids), "stream vs outbox"
    shown = await views(client, ids)
    for subject, data, msg_id in found:
        view = shown[msg_id or ""]
        assert view["status"] == "delivered", view
        assert subject == f"{stream.lower()}.{DAY}"
        assert json.loads(data) == {k: v for k, v in view.items() if k not in STATE}, msg_id


def sink_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("nats-sink"))


async def connections(nats: Nats) -> int:
    """The server's client connections, once the service's has come back (nats-py
    reconnects every second), and a moment later: any more is a leak."""

    async def some() -> int:
        return await trio.to_thread.run_sync(nats.connections)

    await wait_until(some, within=10, what="the sink connected again")
    await trio.sleep(1.5)
    return await some()


def no_failed(shown: dict[str, dict[str, Any]]) -> None:
    failed = {k: v["last_error"] for k, v in shown.items() if v["status"] == "failed"}
    assert failed == {}, f"batches failed for a condition that passes: {failed}"


async def measure_backoff(client: Client, ids: list[str], window: float) -> dict[str, int]:
    """Attempts each pending batch made during `window` s, checked against the
    deliverer's backoff: at least half of min(retry_max, initial * 2**n) between
    two attempts of a batch, so no more than 2 + window / (retry_max / 2) + the
    few shorter first ones (1 + 3)."""
    before = await views(client, ids)
    await trio.sleep(window)
    after = await views(client, ids)
    made = {i: after[i]["attempts"] - before[i]["attempts"] for i in ids}
    ceiling = 4 + window / (RETRY_MAX / 2) + 1
    busy = {i: n for i, n in made.items() if n > ceiling}
    assert busy == {}, f"attempts in {window} s above the backoff's {ceiling:.0f}: {busy}"
    idle = {i: n for i, n in made.items() if after[i]["status"] == "pending" and n < 1}
    assert idle == {}, f"pending batches not retried within {window} s: {idle}"
    return made


# -- 1. the disk under the JetStream store fills ------------------------------------------


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_disk_that_fills_under_the_stream_holds_batches_back_and_loses_none(
    tmp_path: Path, new_nats: Callable[[Path], Nats]
) -> None:
    """The store's disk (a 16 MiB tmpfs) fills with a ballast file while a
    day's batches go out. nats-server 2.9 hangs its JetStream on the write
    error (the stream's lock: publishes and stream reads time out, SIGTERM
    does nothing), so the operator frees the disk and kills and starts it
    again. Meanwhile each batch is retried, none failed, none delivered that
    the stream lacks; afterwards all of them are on the stream once."""
    with small_disk(tmp_path / "disk", 16) as disk:
        nats = new_nats(disk / "js")
        ballast = Ballast(disk)
        stream = new_stream()
        await trio.to_thread.run_sync(nats.start)
        try:
            async with serving(tmp_path, nats, stream) as (_, client):
                first = await commit_round(client, "a", 3)
                await wait_until(
                    lambda: all_delivered(client, first), within=10, what="before the fill"
                )
                threads = sink_threads()
                await trio.to_thread.run_sync(ballast.fill)
                later = await commit_round(client, "b", 60)
                shown = await wait_until(
                    lambda: attempted(client, later, 2), within=20, what="two attempts each"
                )
                no_failed(shown)
                pending = {k: v for k, v in shown.items() if v["status"] == "pending"}
                assert pending, "the full disk held no batch back: the scenario did not happen"
                unexplained = [v["last_error"] for v in pending.values() if not v["last_error"]]
                assert unexplained == []
                await trio.to_thread.run_sync(ballast.free)
                await trio.to_thread.run_sync(nats.kill)
                await trio.to_thread.run_sync(nats.start)
                fixed = trio.current_time()
                await wait_until(
                    lambda: all_delivered(client, first + later), within=25, what="after the fix"
                )
                took = trio.current_time() - fixed
                await check_stream(nats, stream, client, first + later)
                assert sink_threads() == threads
                assert await connections(nats) == 1
        finally:
            await trio.to_thread.run_sync(nats.kill)
    assert took < 15, f"{took:.1f} s to deliver once the server was back"


# -- 2. the server's own storage limit (max_file_store) -----------------------------------


async def test_a_server_out_of_its_storage_limit_is_retried_with_backoff_then_delivers(
    tmp_path: Path, new_nats: Callable[[Path], Nats]
) -> None:
    """`max_file_store` reached: nats-server 2.9 logs "JetStream resource
    limits exceeded for server" and turns JetStream off until a restart;
    every publish fails at once from then on. The batches are retried within
    the deliverer's backoff (no busy loop), never failed, and their
    last_error names JetStream; the operator raises the limit and restarts:
    every batch lands once, one thread and one connection left."""
    nats = new_nats(tmp_path / "js")
    stream = new_stream()
    await trio.to_thread.run_sync(lambda: nats.start(max_file_store=4096))
    async with serving(tmp_path, nats, stream) as (_, client):
        first = await commit_round(client, "a", 1)
        await wait_until(lambda: all_delivered(client, first), within=10, what="the first batch")
        threads = sink_threads()
        later = await commit_round(client, "b", 30)
        shown = await wait_until(
            lambda: attempted(client, later, 2), within=15, what="two attempts each"
        )
        no_failed(shown)
        pending = [v for v in shown.values() if v["status"] == "pending"]
        assert pending, "the limit held no batch back: the scenario did not happen"
        assert all("JetStream" in v["last_error"] for v in pending), pending[0]["last_error"]
        await measure_backoff(client, [v["batch_id"] for v in pending], 4.0)
        await trio.to_thread.run_sync(nats.kill)
        await trio.to_thread.run_sync(lambda: nats.start(max_file_store=64 << 20))
        await wait_until(
            lambda: all_delivered(client, first + later), within=15, what="after the fix"
        )
        await check_stream(nats, stream, client, first + later)
        assert sink_threads() == threads
        assert await connections(nats) == 1


# -- 3. the stream's own limits ------------------------------------------------------------


@pytest.mark.parametrize(("limit", "said"), [("max_msgs", "maximum messages"), ("max_bytes", "")])
async def test_a_full_stream_with_discard_new_waits_for_room_then_delivers(
    tmp_path: Path, new_nats: Callable[[Path], Nats], limit: str, said: str
) -> None:
    """A stream made by the operator with discard new and a small max_msgs or
    max_bytes: the batches past it stay pending (retried with backoff, told
    why), none failed; the operator raises the limit and they all go."""
    nats = new_nats(tmp_path / "js")
    stream = new_stream()
    await trio.to_thread.run_sync(nats.start)
    subjects = [f"{stream.lower()}.>"]
    size = {"max_msgs": 2, "max_bytes": 1500}[limit]

    async def make(client: Any) -> None:
        await client.jsm().add_stream(
            name=stream, subjects=subjects, discard="new", duplicate_window=86400, **{limit: size}
        )

    async def raise_limit(client: Any) -> None:
        info = await client.jsm().stream_info(stream)
        await client.jsm().update_stream(config=info.config.evolve(**{limit: -1}))

    await on_nats_at(nats, make)
    async with serving(tmp_path, nats, stream) as (_, client):
        ids = await commit_round(client, "a", 12)
        shown = await wait_until(lambda: attempted(client, ids, 2), within=15, what="2 attempts")
        no_failed(shown)
        pending = [v for v in shown.values() if v["status"] == "pending"]
        assert pending, "the stream took every batch: the scenario did not happen"
        assert all(said in v["last_error"] for v in pending), pending[0]["last_error"]
        await measure_backoff(client, [v["batch_id"] for v in pending], 3.0)
        await on_nats_at(nats, raise_limit)
        await wait_until(lambda: all_delivered(client, ids), within=10, what="after the fix")
        await check_stream(nats, stream, client, ids)


async def test_a_stream_that_discards_old_batches_is_warned_of_once(
    tmp_path: Path, new_nats: Callable[[Path], Nats], caplog: pytest.LogCaptureFixture
) -> None:
    """discard old with max_msgs 2 (by design: used, with one WARNING): over
    three commits and a dozen batches the warning comes once, each batch is
    delivered, and the stream holds two of the last commit's."""
    caplog.set_level(logging.WARNING, logger="ingestor")
    nats = new_nats(tmp_path / "js")
    stream = new_stream()
    await trio.to_thread.run_sync(nats.start)

    async def make(client: Any) -> None:
        await client.jsm().add_stream(
            name=stream, subjects=[f"{stream.lower()}.>"], max_msgs=2, duplicate_window=86400
        )

    await on_nats_at(nats, make)
    async with serving(tmp_path, nats, stream) as (_, client):
        ids: list[str] = []
        for tag in ("a", "b", "c"):
            last = await commit_round(client, tag, 5)
            ids += last
            await wait_until(partial(all_delivered, client, list(ids)), within=10, what=tag)
    warned = [r for r in caplog.records if "may delete batches" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in warned]
    found = await stream_messages(nats.url, stream)
    kept = [msg_id for _, _, msg_id in found]
    assert len(kept) == 2, kept
    assert set(kept) <= set(last), (kept, last)


async def on_nats_at(nats: Nats, operation: Callable[[Any], Any]) -> None:
    """`operation(client)` on a connection of its own to `nats` (asyncio, in a thread)."""

    async def run() -> None:
        client = await nats_py.connect(nats.url, allow_reconnect=False, connect_timeout=2)
        try:
            await operation(client)
        finally:
            await client.close()

    await trio.to_thread.run_sync(asyncio.run, run())


# -- 4. JetStream gone on restart ------------------------------------------------------------


@pytest.mark.parametrize("how", ["disabled", "store read-only"])
async def test_a_server_restarted_without_a_usable_jetstream_is_waited_for(
    tmp_path: Path, new_nats: Callable[[Path], Nats], how: str
) -> None:
    """The server comes back without JetStream (`-js` left out), or is started
    on a store remounted read-only (nats-server 2.9 then exits: "Can't start
    JetStream: storage directory is not writable"): deliveries are retried with
    backoff, not failed, and resume once it is fixed; no thread, no
    connection left over."""
    if how == "store read-only" and os.geteuid() != 0:
        unavailable("a read-only store needs root to mount a tmpfs")
    with contextlib.ExitStack() as stack:
        where = tmp_path / "js"
        if how == "store read-only":
            where = stack.enter_context(small_disk(tmp_path / "disk", 16)) / "js"
        nats = new_nats(where)
        stream = new_stream()
        await trio.to_thread.run_sync(nats.start)
        try:
            async with serving(tmp_path, nats, stream) as (_, client):
                first = await commit_round(client, "a", 3)
                await wait_until(lambda: all_delivered(client, first), within=10, what="first")
                threads = sink_threads()
                await trio.to_thread.run_sync(nats.kill)
                if how == "disabled":
                    await trio.to_thread.run_sync(lambda: nats.start(jetstream=False))
                else:
                    remount(where.parent, "ro")
                    with pytest.raises(AssertionError, match="storage directory is not writable"):
                        await trio.to_thread.run_sync(nats.start)
                later = await commit_round(client, "b", 9)
                shown = await wait_until(
                    lambda: attempted(client, later, 2), within=15, what="two attempts each"
                )
                no_failed(shown)
                pending = [v for v in shown.values() if v["status"] == "pending"]
                assert pending, f"JetStream {how} held no batch back"
                assert all(v["last_error"] for v in pending)
                await measure_backoff(client, [v["batch_id"] for v in pending], 3.0)
                await trio.to_thread.run_sync(nats.kill)
                if how == "store read-only":
                    remount(where.parent, "rw")
                await trio.to_thread.run_sync(nats.start)
                await wait_until(
                    lambda: all_delivered(client, first + later), within=15, what="after the fix"
                )
                await check_stream(nats, stream, client, first + later)
                assert sink_threads() == threads
                assert await connections(nats) == 1
        finally:
            await trio.to_thread.run_sync(nats.kill)


def remount(mount: Path, mode: str) -> None:
    done = subprocess.run(
        ["mount", "-o", f"remount,{mode}", str(mount)], capture_output=True, check=False
    )
    if done.returncode != 0:
        unavailable(f"cannot remount {mount} {mode}: {done.stderr.decode(errors='replace')}")
