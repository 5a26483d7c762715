"""Sinks: where committed batches go.

A sink delivers one batch (its immutable JSON body) and returns only when the
downstream has confirmed it. Delivery is idempotent by batch id, so the
deliverer may hand the same batch over again after a crash; every sink must
make that harmless. Failures are `SinkRetryable` (try later) or `SinkRejected`
(the downstream refused it for good).
"""

from __future__ import annotations

from typing import Protocol

from ..config import Settings

__all__ = ["Sink", "open_sink"]


class Sink(Protocol):
    name: str

    async def deliver(self, batch_id: str, day: str, body: bytes) -> None:
        """Deliver one batch; return once the downstream has confirmed it."""
        ...

    async def aclose(self) -> None: ...


def open_sink(settings: Settings) -> Sink:
    """The sink the settings name (`file`, an http(s) URL, a nats URL)."""
    if settings.sink == "file":
        from .file import FileSink

        return FileSink(settings.data_path / "deliveries")
    if settings.sink.startswith("nats://"):
        from .nats import NatsSink

        return NatsSink(
            settings.sink,
            stream=settings.nats_stream,
            subject=settings.nats_subject,
            timeout=settings.sink_timeout,
        )
    from .http import HttpSink

    return HttpSink(settings.sink, secret=settings.sink_secret, timeout=settings.sink_timeout)
