"""Structured logs: one line per event, as `key=value` text or JSON.

Callers pass their fields as `extra={"fields": {...}}`. Events are starts,
stops, commits and failures; never one line per pulse. A line logged while
the API handles a request carries that request's id (`request_id`, set by the
API in a context variable), the same id the client gets in `X-Request-Id`.
"""

from __future__ import annotations

import datetime as dt
import faulthandler
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Hashable
from contextvars import ContextVar
from typing import Any

import msgspec

__all__ = ["Hushed", "JsonFormatter", "TextFormatter", "request_id", "setup_logging"]

_encode = msgspec.json.Encoder().encode

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    found = fields if isinstance(fields, dict) else {}
    current = request_id.get()
    return found if current is None else {"request_id": current, **found}


def _when(record: logging.LogRecord) -> str:
    moment = dt.datetime.fromtimestamp(record.created, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [_when(record), record.levelname, record.name, record.getMessage()]
        for key, value in _fields(record).items():
            text = str(value)
            parts.append(f"{key}={text!r}" if (" " in text or not text) else f"{key}={text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _when(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _encode(entry).decode()


HUSH_S = 10.0  # how often a `Hushed` warning is said again at most


class Hushed:
    """A warning that comes again and again while something is wrong (a store
    that is down, full or refusing its connections fails every write, read,
    claim and tick): said at once, then at most once every `HUSH_S` s for each
    `key`, with how many times it came meanwhile (`repeated`). Said each time,
    two instances wrote a thousand lines in 6 s. Thread-safe."""

    def __init__(self, logger: logging.Logger, clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._clock = clock
        self._guard = threading.Lock()
        self._quiet_until: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}

    def warning(self, key: Hashable, message: str, fields: dict[str, Any]) -> None:
        now = self._clock()
        with self._guard:
            if now < self._quiet_until.get(key, -math.inf):
                self._held[key] = self._held.get(key, 0) + 1
                return
            self._quiet_until[key] = now + HUSH_S
            held = self._held.pop(key, 0)
        if held:
            fields = {**fields, "repeated": held}
        self._logger.warning(message, extra={"fields": fields})


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The HTTP sink's client logs each request's URL at INFO, query string
    # (a receiver's token) included; the deliverer logs what matters.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # The connection pool of the PostgreSQL store logs each failed attempt to
    # connect, several a second while the database refuses them; the store
    # says once that it cannot connect, and why, and once that it can again.
    logging.getLogger("psycopg.pool").setLevel(max(logging.ERROR, root.level))
    accepts = logging.getLogger("trio.serve_listeners")
    accepts.filters[:] = [_NoTracebackEvery(_ACCEPT_FAILURE_EVERY_S)]
    # The NATS sink's asyncio loop warns of each TLS connection a server
    # closes (asyncio's StreamReaderProtocol under SSL), once a second while
    # the server refuses the sink: the delivery's error says why.
    logging.getLogger("asyncio").filters[:] = [_Unless(_ASYNCIO_TLS_EOF)]
    # A process killed by a fault no Python code can catch (SIGBUS on the
    # store's shared memory file made immutable, SIGSEGV in C code) says so,
    # with its threads' stacks, on the log's stream: it died without a word.
    faulthandler.enable(sys.stderr)


# trio's listener logs each accept that fails for want of descriptors (EMFILE)
# as an ERROR with its traceback, and retries every 0.1 s: a process at its
# open-file limit wrote ten tracebacks a second a listener, for as long as
# the limit lasted, and buried every other line.
_ACCEPT_FAILURE_EVERY_S = 10.0


_ASYNCIO_TLS_EOF = "returning true from eof_received() has no effect when using ssl"


class _Unless(logging.Filter):
    """Every record but those whose message is `message`."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self._message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self._message


class _NoTracebackEvery(logging.Filter):
    """One line, without its traceback, every `seconds` at most."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self._seconds = seconds
        self._last = -seconds

    def filter(self, record: logging.LogRecord) -> bool:
        if record.created - self._last < self._seconds:
            return False
        self._last = record.created
        record.exc_info = None  # the message names the error
        record.exc_text = None
        return True
