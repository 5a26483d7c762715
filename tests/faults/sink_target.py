"""A programmable downstream for the http sink: the billing side, played by the test.

SinkTarget      a small HTTP/1.1 server (h11 on trio) in the test's own
                trio run, on a fixed port across its whole life. Its
                `mode` says how it answers each POST:
                  "ok"       2xx after `delay` seconds (a slow billing system)
                  "error"    500
                  "hang"     reads the request, never answers (the sink times out)
                  "refuse"   nothing listens: connections are refused
                Every request that reached it is kept in `received`, in
                order, with its batch id, body, signature and what it was
                answered, so a test can check "every batch arrived" and
                "the same id always carried the same bytes".
"""

from __future__ import annotations

import socket
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import h11
import trio

from tests.support.server import free_port, read_request, signed

__all__ = ["Delivery", "Mode", "SinkTarget"]

Mode = Literal["ok", "error", "hang", "refuse"]
_MAX_BODY = 64 * 1024 * 1024


@dataclass
class Delivery:
    """One POST the target received, and how it answered (None: not, or not yet)."""

    batch_id: str
    body: bytes
    signature_ok: bool
    status: int | None


class SinkTarget:
    """See the module docstring. Start it with `await nursery.start(target.run)`."""

    def __init__(self, secret: str, *, delay: float = 0.0) -> None:
        self.secret = secret
        self.delay = delay
        self.port = free_port()
        self.mode: Mode = "ok"
        self.received: list[Delivery] = []
        self._mode_changed = trio.Event()
        self._connections: set[trio.CancelScope] = set()
        self.in_flight = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/billing"

    # -- what a test asks ------------------------------------------------------

    def set_mode(self, mode: Mode) -> None:
        """Answer from now on as `mode`; connections already open are dropped."""
        self.mode = mode
        for scope in list(self._connections):
            scope.cancel()
        self._mode_changed.set()
        self._mode_changed = trio.Event()

    def bodies(self) -> dict[str, set[bytes]]:
        """Every distinct body seen per batch id (one each, or a batch changed)."""
        seen: dict[str, set[bytes]] = defaultdict(set)
        for delivery in self.received:
            seen[delivery.batch_id].add(delivery.body)
        return dict(seen)

    def confirmed(self) -> dict[str, bytes]:
        """The batches the target answered 2xx to, with their body."""
        return {d.batch_id: d.body for d in self.received if d.status == 200}

    # -- serving -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; while the mode is "refuse", hold no listener."""
        started = False
        async with trio.open_nursery() as nursery:
            while True:
                if self.mode == "refuse":
                    await self._mode_changed.wait()
                    continue
                async with trio.SocketListener(await self._listen()) as listening:
                    if not started:
                        task_status.started()
                        started = True
                    with trio.CancelScope() as accepting:
                        nursery.start_soon(self._stop_on_refuse, accepting)
                        while True:
                            stream = await listening.accept()
                            nursery.start_soon(self._serve, stream)

    async def _listen(self) -> trio.socket.SocketType:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        return sock

    async def _stop_on_refuse(self, accepting: trio.CancelScope) -> None:
        while self.mode != "refuse":
            await self._mode_changed.wait()
        accepting.cancel()  # the listener closes: connections are refused

    async def _serve(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_BODY)
        with trio.CancelScope() as scope:
            self._connections.add(scope)
            try:
                async with stream:
                    while await self._one_exchange(stream, connection):
                        connection.start_next_cycle()
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
                pass
            finally:
                self._connections.discard(scope)

    async def _one_exchange(self, stream: trio.SocketStream, connection: h11.Connection) -> bool:
        """Read one request and answer it per the mode; False when the connection ends."""
        received = await read_request(stream, connection)
        if received is None:
            return False
        headers, body = received
        batch_id = headers.get("idempotency-key", "")
        signature_ok = signed(self.secret, headers, body)
        mode = self.mode
        delivery = Delivery(batch_id, body, signature_ok, None)
        self.received.append(delivery)
        self.in_flight += 1
        try:
            if mode == "hang":
                await trio.sleep_forever()  # until the sink gives up or the mode changes
            if mode == "ok" and self.delay:
                await trio.sleep(self.delay)
            status = 200 if mode == "ok" and self.mode == "ok" else 500
            payload = b'{"ok": true}' if status == 200 else b'{"error": "down"}'
            await stream.send_all(
                connection.send(
                    h11.Response(
                        status_code=status,
                        headers=[
                            ("Content-Type", "application/json"),
                            ("Content-Length", str(len(payload))),
                        ],
                    )
                )
                + connection.send(h11.Data(data=payload))
                + connection.send(h11.EndOfMessage())
            )
            delivery.status = status
        finally:
            self.in_flight -= 1
        return connection.our_state is h11.IDLE and connection.their_state is h11.DONE
