"""The http sink: POST each batch to a URL, signed, idempotent by batch id.

Headers: `Idempotency-Key: <batch_id>` and `X-Ingestor-Signature:
sha256=<hex HMAC-SHA256 of the body with the configured secret>`. A 2xx or 409
(the receiver already has it) is delivered; 5xx, 408, 429, timeouts and
connection errors are retried; any other 4xx fails the batch until an
operator redelivers it.
"""

from __future__ import annotations

import hashlib
import hmac

import httpx

from ..errors import SinkRejected, SinkRetryable

__all__ = ["HttpSink", "sign"]

_RETRY_STATUSES = frozenset({408, 425, 429})


def sign(secret: str, body: bytes) -> str:
    """The value of X-Ingestor-Signature for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class HttpSink:
    name = "http"

    def __init__(self, url: str, *, secret: str, timeout: float) -> None:
        self.url = url
        self._secret = secret
        self._client = httpx.AsyncClient(timeout=timeout)

    async def deliver(self, batch_id: str, day: str, body: bytes) -> None:
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": batch_id,
            "X-Ingestor-Signature": sign(self._secret, body),
        }
        try:
            response = await self._client.post(self.url, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise SinkRetryable(f"timed out: {exc!r}") from exc
        except httpx.HTTPError as exc:
            raise SinkRetryable(f"request failed: {exc!r}") from exc
        status = response.status_code
        if 200 <= status < 300 or status == 409:
            return
        detail = f"HTTP {status}: {response.text[:200]}"
        if status >= 500 or status in _RETRY_STATUSES:
            raise SinkRetryable(detail)
        raise SinkRejected(detail)

    async def aclose(self) -> None:
        await self._client.aclose()
