"""The errors of the ingestor, one hierarchy.

    IngestorError
    ├── ConfigError          a setting is wrong; the process does not start
    ├── StoreError           the store failed; nothing of the operation was kept
    │   ├── StoreFull        out of disk space: retry later (503)
    │   ├── StoreBusy        the store stayed locked past its timeout (503)
    │   ├── StoreOutcomeUnknown  lost as it committed: maybe kept (500)
    │   └── StoreMismatch    the data dir holds something that is not our store
    ├── Overloaded           a queue is full: retry later (503 + Retry-After)
    ├── Draining             the service is shutting down (503)
    ├── RequestError         the request as a whole is unacceptable (4xx)
    └── SinkError            a delivery failed
        ├── SinkRetryable    try again later (5xx, timeout, refused)
        └── SinkRejected     the sink refused the batch for good (4xx)

Driver errors (sqlite3, psycopg, httpx, nats) are translated into these where
they are caught, so code above the store and the sinks sees only ours.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "Draining",
    "IngestorError",
    "Overloaded",
    "RequestError",
    "SinkError",
    "SinkRejected",
    "SinkRetryable",
    "StoreBusy",
    "StoreError",
    "StoreFull",
    "StoreMismatch",
    "StoreOutcomeUnknown",
    "out_of_resources",
]


class IngestorError(Exception):
    """Base of every error the ingestor raises on purpose."""


class ConfigError(IngestorError):
    """A setting is missing or wrong. The message names the setting."""


class StoreError(IngestorError):
    """The store could not complete an operation; the transaction rolled back."""


class StoreFull(StoreError):
    """The disk under the store is full. Nothing of the operation was kept."""


class StoreBusy(StoreError):
    """The store stayed locked by another process past the busy timeout."""


class StoreOutcomeUnknown(StoreError):
    """The connection to the store was lost as it committed, and the store could not
    say whether it had: what was written may be kept. Not "retry later": a retry
    of pulses with ids is safe, of pulses without ids may count them twice."""


class StoreMismatch(StoreError):
    """The data dir holds a file that is not this store (foreign or corrupt)."""


class Overloaded(IngestorError):
    """A bounded queue is full; the client should retry after `retry_after` s."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Draining(IngestorError):
    """The service is shutting down and takes no new work."""


class SinkError(IngestorError):
    """Delivering a batch failed."""


class SinkRetryable(SinkError):
    """The sink may accept the batch later (5xx, timeout, connection refused);
    not before `retry_after` seconds, if the receiver said so."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SinkRejected(SinkError):
    """The sink refused the batch for good; it stays `failed` until redelivered."""


class RequestError(IngestorError):
    """The request as a whole is unacceptable; nothing of it was stored.

    Carries the HTTP status and error code it is answered with.
    """

    def __init__(self, status: int, code: str, message: str, details: object = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


def out_of_resources(exc: BaseException) -> Overloaded | None:
    """`exc` as an overload if it says the process ran out of memory or of threads
    (a container's memory or process limit): a request may succeed once others
    are done, so it is answered 503 with Retry-After, not 500. None otherwise."""
    if isinstance(exc, MemoryError):
        return Overloaded("the server is out of memory; retry later")
    if isinstance(exc, RuntimeError) and "can't start new thread" in str(exc):
        return Overloaded("the server cannot start a thread; retry later")
    return None
