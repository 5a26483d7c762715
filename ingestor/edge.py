"""The ASGI edge: what every HTTP request passes through before the app.

The jobs the framework does not do for us, for every route, including
those answered by a handler of `routes` instead of the framework:

- Count requests in flight, from their arrival to the end of their
  response. Shutdown stops as soon as none is left (Quart keeps a request's
  task waiting on an idle keep-alive connection, which would otherwise hold
  a drain for the whole graceful timeout), and /metrics reports the count.
- Mark a request that arrives while `limit` are already in flight, so the
  app answers it 503 like any other overload. Health, metrics and the
  OpenAPI document are not counted: probes and scrapes answer under load.
- Route a request by its path as Quart routes it (absolute-form targets,
  leading slashes).
- Close the connection after an error answered before the request body was
  read (a 413 on Content-Length, a 404 or 405 with a body): the unread
  body would otherwise be taken for the next request on the connection.
- Close the connection after each answer once the service is stopping
  (`closing`), saying so (`Connection: close`): hypercorn closed it
  unannounced, and a proxy keeping it for its next request sent that
  request on a connection being closed, and answered its client 502.
- Let a whole request run to its answer though its client half-closes
  (`receive_body`).
- Let a response's last write finish. When the answer closes the
  connection (`Connection: close`, HTTP/1.0), hypercorn closes it inside
  that write and reports the disconnect, on which quart-trio cancels the
  request: the close stopped halfway, and the socket stayed open until
  `read_timeout`. The write is shielded, for `_LAST_WRITE_S` at most.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import urlsplit

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope

from .errors import Overloaded, RequestError

__all__ = ["OVER_LIMIT", "PUBLIC_PATHS", "Edge", "admit"]

OVER_LIMIT = "ingestor.over_limit"  # scope key set on a request beyond the limit
_LAST_WRITE_S = 10.0  # how long a response's last write may outlive its request's cancellation
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})


def admit(*, over_limit: bool, limit: int, header_bytes: int, max_header_bytes: int) -> None:
    """The checks before any other: requests in flight (503), then header size (431).

    Every route makes them, through Quart's hook or on its own ASGI path.
    """
    if over_limit:
        raise Overloaded(f"more than {limit} requests in flight (max_in_flight)")
    # hypercorn bounds headers only while they are incomplete; this bounds them always.
    if header_bytes > max_header_bytes:
        raise RequestError(
            431,
            "headers_too_large",
            f"request headers exceed {max_header_bytes} bytes (max_header_bytes)",
        )


def _framing(scope: HTTPScope) -> tuple[bool, bool]:
    """Whether the request has a body (by the first of Content-Length and
    Transfer-Encoding it names), and whether it names both.

    One named both is read by its Transfer-Encoding, and its connection is
    closed after the answer (RFC 9112 §6.1): a proxy in front may have read
    it by its Content-Length, and taken what follows for another request
    (request smuggling). One pass over the headers: every request pays it.
    """
    body: bool | None = None
    length = chunked = False
    for name, value in scope["headers"]:
        if name == b"content-length":
            length = True
            if body is None:
                body = value.strip() not in (b"0", b"")
        elif name == b"transfer-encoding":
            chunked = True
            if body is None:
                body = True
    return bool(body), length and chunked


class Edge:
    """Wraps the ASGI app; see the module docstring."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, limit: int) -> None:
        self.app = app
        self.limit = limit
        # (method, path) -> a handler that answers that route instead of `app`.
        self.routes: dict[tuple[str, str], Callable[..., Awaitable[None]]] = {}
        self.in_flight = 0
        self.closing = False  # stopping: each answer closes its connection
        self._idle = trio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no request is in flight."""
        while self.in_flight:
            await self._idle.wait()

    def _finished(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._idle.set()

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        http: HTTPScope = scope
        path = http["path"]
        if not path.startswith("/") or path.startswith("//"):
            # The path as Quart routes it, so that both route it alike: of an
            # absolute-form target ("POST http://host/pulses", RFC 9112
            # §3.2.2), which hypercorn passes on whole, its path; and leading
            # slashes as one, as werkzeug takes them ("//pulses" was answered
            # by the app's placeholder of the route this edge answers).
            headers = http["headers"]
            if not path.startswith("/"):
                target = urlsplit(path)
                path = target.path
                # The target's host, not the Host header, names the host
                # (RFC 9112 §3.2.2): it is what open mode checks.
                host = target.netloc.rpartition("@")[2].encode("utf-8", "surrogateescape")
                headers = [(k, v) for k, v in headers if k != b"host"] + [(b"host", host)]
            path = "/" + path.lstrip("/")
            http = {**http, "path": path, "raw_path": path.encode(), "headers": headers}
        counted = path not in PUBLIC_PATHS
        finished = not counted
        has_body, framed_twice = _framing(http)
        body_read = not has_body
        whole = False  # the request's last message (its body's end) has been received
        close = has_body and framed_twice
        if counted:
            if not self.in_flight:
                self._idle = trio.Event()
            self.in_flight += 1
            if self.in_flight > self.limit:
                http = cast(HTTPScope, {**http, OVER_LIMIT: True})

        async def receive_body() -> Any:
            nonlocal body_read, whole
            if whole:
                # The request is whole: it runs to its answer. A client that
                # half-closes once it has sent it (`nc -N`, shutdown(SHUT_WR))
                # waits for that answer, but hypercorn reports its end of
                # input as a disconnect, on which quart-trio cancelled the
                # request: a commit so sent was not made, and no answer came.
                # A client that is gone loses only the answer, when written.
                await trio.sleep_forever()
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_read = whole = True
            return message

        async def send_response(message: Any) -> None:
            nonlocal finished
            if message["type"] == "http.response.start" and (
                close or not body_read or self.closing
            ):
                message = {
                    **message,
                    "headers": [*message.get("headers", ()), (b"connection", b"close")],
                }
            last = message["type"] == "http.response.body" and not message.get("more_body")
            try:
                if last:
                    with trio.CancelScope(shield=True) as shielded:
                        shielded.deadline = trio.current_time() + _LAST_WRITE_S
                        await send(message)
                else:
                    await send(message)
            except trio.BusyResourceError:
                # hypercorn ends a response with a write of its own (empty,
                # for a Content-Length body). A client that has the whole
                # answer may close first, and hypercorn's reading task then
                # shuts the socket without the lock its writes take, so that
                # last write finds the socket busy. The answer was delivered.
                if not last:
                    raise
            if last and not finished:
                finished = True
                self._finished()

        handler = self.routes.get((http["method"], path), self.app)
        try:
            await handler(http, receive_body, send_response)
        finally:
            if not finished:
                self._finished()
