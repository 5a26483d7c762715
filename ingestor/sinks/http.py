"""The http sink: POST each batch to a URL, signed, idempotent by batch id.

Headers: `Idempotency-Key: <batch_id>` and `X-Ingestor-Signature:
sha256=<hex HMAC-SHA256 of the body with the configured secret>`. A 2xx or 409
(the receiver already has it) is delivered; 5xx, 408, 425, 429, timeouts and
connection errors are retried; any other 4xx fails the batch until an
operator redelivers it. A retried answer's `Retry-After` (seconds, or an
HTTP date) is the least the next attempt waits (`SinkRetryable.retry_after`).

The status line decides: a 2xx is delivered whatever its body, which is
not read (a receiver's garbled body once kept a delivered batch retried),
and an error is decided by its status even if its body never ends.
`timeout` bounds the whole delivery, not only each read: a receiver that
sent its answer a byte at a time held up every delivery behind it.

Each batch goes on a connection of its own. On a kept-alive one, a second,
unasked-for answer a receiver (or a proxy before it) sent after its 500 was
taken for the next batch's answer: a batch the receiver refused with 503
was recorded delivered. Of an error's body, the first 200 bytes are kept
for the batch's last error, as they came: asked for no encoding, a
receiver that gzips anyway is not unpacked (64 KiB of gzip held 141 MiB,
and a body gzipped twice 557 MiB, for those 200 bytes).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import hashlib
import hmac
import time
from collections.abc import AsyncGenerator
from typing import cast

import httpx
import trio

from ..errors import SinkRejected, SinkRetryable

__all__ = ["HttpSink", "retry_after", "sign"]

_RETRY_STATUSES = frozenset({408, 425, 429})
_DETAIL_BYTES = 200  # of an error answer's body, for the batch's last_error
# Beyond any backoff (a day): a larger Retry-After is taken as this.
_RETRY_AFTER_MAX = 86_400


def sign(secret: str, body: bytes) -> str:
    """The value of X-Ingestor-Signature for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class HttpSink:
    name = "http"

    def __init__(self, url: str, *, secret: str, timeout: float) -> None:
        self.url = url
        self._secret = secret
        self._timeout = timeout
        # Credentials in the URL go as an Authorization header, and nowhere
        # else: not in a URL that httpx may log or put in an error message.
        target = httpx.URL(url)
        auth = httpx.BasicAuth(target.username, target.password) if target.userinfo else None
        self._target = target.copy_with(userinfo=b"")
        self._client = httpx.AsyncClient(
            timeout=timeout, auth=auth, limits=httpx.Limits(max_keepalive_connections=0)
        )

    async def deliver(self, batch_id: str, day: str, body: bytes) -> None:
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": batch_id,
            "X-Ingestor-Signature": sign(self._secret, body),
            "Accept-Encoding": "identity",
        }
        status: int | None = None
        detail = ""
        wait: float | None = None
        with trio.move_on_after(self._timeout):
            try:
                async with self._client.stream(
                    "POST", self._target, content=body, headers=headers
                ) as response:
                    status = response.status_code
                    if 200 <= status < 300 or status == 409:
                        return
                    wait = retry_after(response.headers.get("retry-after"), time.time())
                    # What the batch's last error says if the timeout cuts the body short.
                    detail = f"HTTP {status}: (its body did not come within {self._timeout:g} s)"
                    detail = f"HTTP {status}: {await _head(response)}"
            except httpx.TimeoutException as exc:
                if status is None:
                    raise SinkRetryable(f"timed out: {_described(exc)}") from exc
            except httpx.HTTPError as exc:
                if status is None:
                    raise SinkRetryable(f"request failed: {_described(exc)}") from exc
        if status is None:
            raise SinkRetryable(f"timed out: no answer within {self._timeout:g} s")
        if status >= 500 or status in _RETRY_STATUSES:
            if wait is not None:
                detail = f"{detail} (Retry-After: {wait:g} s)"
            raise SinkRetryable(detail, retry_after=wait)
        raise SinkRejected(detail)

    async def aclose(self) -> None:
        await self._client.aclose()


def retry_after(value: str | None, now: float) -> float | None:
    """The seconds a `Retry-After` header asks to wait from `now` (epoch seconds):
    a whole number of seconds, or an HTTP date; None if it says neither. A
    date already past asks for no wait."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(min(int(value), _RETRY_AFTER_MAX))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110's dates are GMT; "-0000" parses as naive
        when = when.replace(tzinfo=dt.UTC)
    return float(min(max(0.0, round(when.timestamp() - now, 3)), _RETRY_AFTER_MAX))


def _described(exc: BaseException) -> str:
    """`exc` with the deepest error of its chain that says something, if its
    own text does not hold it: under trio, httpx's errors often say nothing
    themselves, and a receiver's certificate refused by the TLS handshake
    was "ConnectError('')", its reason three causes down."""
    said = str(exc)
    deepest: BaseException | None = None
    seen = {id(exc)}
    cause = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if str(cause):
            deepest = cause
        cause = cause.__cause__ or cause.__context__
    if deepest is not None and str(deepest) not in said:
        said = f"{said}: {deepest}" if said else f"{type(deepest).__name__}: {deepest}"
    return f"{type(exc).__name__}: {said}" if said else repr(exc)


async def _head(response: httpx.Response) -> str:
    """The start of an error answer's body, as text, for the batch's last_error:
    as it came, never unpacked (see the module docstring)."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        return f"(a body in {encoding[:40]!r}, not unpacked)"
    head = b""
    try:
        raw = cast(AsyncGenerator[bytes, None], response.aiter_raw())
        async with contextlib.aclosing(raw) as chunks:
            async for chunk in chunks:
                head += chunk
                if len(head) >= _DETAIL_BYTES:
                    break
    except httpx.HTTPError as exc:
        return f"(body unreadable: {exc!r})"
    return head[:_DETAIL_BYTES].decode(errors="replace")
