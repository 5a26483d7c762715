"""The floor the ingestor is measured against: a bare ASGI app, no framework.

The same server (hypercorn, trio worker) and the same decoder (msgspec into
Structs) as the ingestor, and nothing else: no validation beyond the types, no
dedup, no store, no durability. POST /pulses adds each amount to an in-memory
dict keyed by (tenant, sku, unit) and answers 202 with a small JSON. Every
figure of the ingestor is reported as a ratio to this app under the same load,
so "how fast" reads as "how close to what the stack itself can do".

    python bench/baseline.py --bind 127.0.0.1:8090

Also answers GET /readyz, and GET /aggregates?limit=&cursor= (pages of the
dict, sorted once per change) for the read scenario.
"""

from __future__ import annotations

import argparse
import datetime as dt
import signal
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs

import msgspec
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Pulse(msgspec.Struct, forbid_unknown_fields=True):
    tenant_id: str
    product_sku: str
    use_unit: str
    used_amount: Decimal
    id: str | None = None
    timestamp: dt.datetime | None = None


class Accepted(msgspec.Struct):
    accepted: int


class Row(msgspec.Struct):
    tenant_id: str
    product_sku: str
    use_unit: str
    used_amount: str


class Page(msgspec.Struct):
    aggregates: list[Row]
    next_cursor: str | None


_one = msgspec.json.Decoder(Pulse)
_many = msgspec.json.Decoder(list[Pulse])
_encode = msgspec.json.Encoder().encode
_JSON_HEADERS = [(b"content-type", b"application/json")]


class App:
    def __init__(self) -> None:
        self.totals: dict[tuple[str, str, str], Decimal] = {}
        self._sorted: list[tuple[tuple[str, str, str], Decimal]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        method, path = scope["method"], scope["path"]
        if method == "POST" and path == "/pulses":
            status, body = self.post_pulses(scope, await _body(receive))
        elif method == "GET" and path == "/readyz":
            status, body = 200, b'{"status":"ready"}'
        elif method == "GET" and path == "/aggregates":
            status, body = self.get_aggregates(scope)
        else:
            status, body = 404, b'{"error":{"code":"not_found","message":"no route"}}'
        await send({"type": "http.response.start", "status": status, "headers": _JSON_HEADERS})
        await send({"type": "http.response.body", "body": body})

    def post_pulses(self, scope: Scope, body: bytes) -> tuple[int, bytes]:
        ndjson = any(k == b"content-type" and b"ndjson" in v for k, v in scope["headers"])
        try:
            if ndjson:
                pulses = [_one.decode(line) for line in body.splitlines() if line.strip()]
            elif body.lstrip()[:1] == b"[":
                pulses = _many.decode(body)
            else:
                pulses = [_one.decode(body)]
        except msgspec.MsgspecError as exc:
            return 400, _encode({"error": {"code": "invalid", "message": str(exc)}})
        totals = self.totals
        for p in pulses:
            key = (p.tenant_id, p.product_sku, p.use_unit)
            totals[key] = totals.get(key, Decimal(0)) + p.used_amount
        self._sorted = None
        return 202, _encode(Accepted(len(pulses)))

    def get_aggregates(self, scope: Scope) -> tuple[int, bytes]:
        args = parse_qs(scope["query_string"].decode())
        limit = int(args.get("limit", ["1000"])[0])
        start = int(args.get("cursor", ["0"])[0])
        if self._sorted is None:
            self._sorted = sorted(self.totals.items())
        rows = self._sorted[start : start + limit]
        more = start + limit < len(self._sorted)
        page = Page(
            [Row(*key, str(amount)) for key, amount in rows], str(start + limit) if more else None
        )
        return 200, _encode(page)


async def _body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def main(bind: str) -> None:
    config = Config()
    config.bind = [bind]
    config.accesslog = None
    config.keep_alive_timeout = 75
    stop = trio.Event()

    async def wait_for_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                stop.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for_signal)
        await serve(App(), config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:8090")
    trio.run(main, parser.parse_args().bind)
