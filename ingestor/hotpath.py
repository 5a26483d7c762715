"""POST /pulses on plain ASGI: the one route whose cost per request matters.

Every other route goes through Quart. This one does, in order, what the
app's before/after hooks and error handlers do for them, with nothing else:

    request id ─▶ 503 over max_in_flight ─▶ 431 headers ─▶ key and role
      ─▶ body (413 over max_body_bytes, 503 over max_in_flight_bytes,
         408 past body_timeout) ─▶ api.ingest
      ─▶ answer with X-Request-Id, and count it in the metrics

so its contract is the same as the framework's, and the API tests, which go
through the same ASGI entry, check both. Routing, request and response
objects, contexts and hooks were much of a single-pulse POST's time: with
this route (and the SQLite fold of the same change set) `make bench-quick`
went from 0.33x to 0.61x of the bare hypercorn baseline for single POSTs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

from .auth import Keyring
from .edge import OVER_LIMIT, admit
from .errors import IngestorError, Overloaded, RequestError, out_of_resources
from .logs import request_id
from .metrics import Metrics
from .routes import NEEDS
from .runtime import Runtime

__all__ = ["PulseRoute"]

log = logging.getLogger("ingestor.api")
_JSON = (b"content-type", b"application/json")

ErrorParts = Callable[[Exception], tuple[int, bytes, list[tuple[str, str]]]]
Ingest = Callable[..., Awaitable[tuple[int, bytes]]]


class PulseRoute:
    """The ASGI handler of POST /pulses (see the module docstring)."""

    def __init__(
        self,
        runtime: Runtime,
        keyring: Keyring,
        metrics: Metrics,
        *,
        ingest: Ingest,
        error_parts: ErrorParts,
        new_request_id: Callable[[str | None], str],
        limit: Callable[[], int],
    ) -> None:
        settings = runtime.settings
        self._runtime = runtime
        self._keyring = keyring
        self._metrics = metrics
        self._ingest = ingest
        self._error_parts = error_parts
        self._new_request_id = new_request_id
        self._limit = limit
        self._need = NEEDS["post_pulses"]
        self._max_body = settings.max_body_bytes
        # Bytes of the bodies of requests in flight, from their arrival to their
        # answer: max_in_flight alone let 1,024 requests of 16 MiB each, and
        # their decoded pulses, take tens of GB.
        self._budget = settings.max_in_flight_bytes
        self.bytes_in_flight = 0
        self._max_headers = settings.max_header_bytes
        self._body_timeout = settings.body_timeout

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        started = time.perf_counter()
        given = content_type = None
        authorization: list[str] = []
        hosts: list[str] = []
        origins: list[str] = []
        length: bytes | None = None
        size = 0
        for name, value in scope["headers"]:  # type: ignore[typeddict-item]
            size += len(name) + len(value)
            if name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"authorization":
                authorization.append(value.decode("latin-1"))
            elif name == b"content-length":
                length = value
            elif name == b"x-request-id":
                given = value.decode("latin-1")
            elif name == b"host":
                hosts.append(value.decode("latin-1"))
            elif name == b"origin":
                origins.append(value.decode("latin-1"))
        rid = self._new_request_id(given)
        token = request_id.set(rid)
        held = _Held()
        headers: list[tuple[bytes, bytes]] = [_JSON, (b"x-request-id", rid.encode())]
        try:
            try:
                admit(
                    over_limit=bool(scope.get(OVER_LIMIT)),
                    limit=self._limit(),
                    header_bytes=size,
                    max_header_bytes=self._max_headers,
                )
                principal = self._keyring.authenticate(authorization, hosts, origins)
                self._keyring.require(principal, self._need, "POST /pulses")
                body = await self._read_body(receive, length, held)
                status, payload = await self._ingest(self._runtime, body, content_type, principal)
            except _Gone:
                return
            except IngestorError as exc:
                status, payload, extra = self._error_parts(exc)
                headers += [(k.lower().encode(), v.encode()) for k, v in extra]
            except Exception as exc:
                exhausted = out_of_resources(exc)
                if exhausted is None:
                    log.exception("unexpected error", extra={"fields": {"path": "/pulses"}})
                else:  # no defect: answered 503, said in one line
                    log.warning(
                        "out of resources",
                        extra={"fields": {"path": "/pulses", "error": repr(exc)}},
                    )
                status, payload, extra = self._error_parts(
                    exhausted or RequestError(500, "internal", "internal error; see the server log")
                )
            headers.append((b"content-length", str(len(payload)).encode()))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": payload, "more_body": False})
        finally:
            self.bytes_in_flight -= held.bytes
            request_id.reset(token)
        self._metrics.observe("POST", "/pulses", status, time.perf_counter() - started)

    def _take(self, held: _Held, size: int) -> None:
        """Count `size` more bytes of a body in flight, or raise Overloaded: with
        the bodies in flight, past `max_in_flight_bytes`. A declared length is
        taken whole before the body is read; a chunked body as it comes."""
        more = size - held.bytes
        if more <= 0:
            return
        if self.bytes_in_flight + more > self._budget:
            raise Overloaded(
                f"the bodies of the requests in flight would exceed {self._budget} bytes"
                " (max_in_flight_bytes); retry later"
            )
        self.bytes_in_flight += more
        held.bytes = size

    async def _read_body(
        self, receive: ASGIReceiveCallable, length: bytes | None, held: _Held
    ) -> bytes:
        limit = self._max_body
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise RequestError(400, "bad_request", "Content-Length is not a number") from None
            if declared > limit:
                raise _too_large(limit)
            self._take(held, declared)
        chunks: list[bytes] = []
        received = 0
        with trio.move_on_after(self._body_timeout) as timer:
            while True:
                message: Any = await receive()
                if message["type"] != "http.request":
                    raise _Gone  # http.disconnect: nobody is left to answer
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limit:
                    raise _too_large(limit)
                self._take(held, received)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        if timer.cancelled_caught:
            raise RequestError(
                408,
                "request_timeout",
                f"the request body did not arrive within {self._body_timeout:g} s (body_timeout)",
            )
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _Held:
    """The bytes of `max_in_flight_bytes` one request holds."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


class _Gone(Exception):
    """The client disconnected before its body was read."""


def _too_large(limit: int) -> RequestError:
    return RequestError(
        413, "body_too_large", f"the request body exceeds {limit} bytes (max_body_bytes)"
    )
