"""An in-memory sink for tests, with failure injection.

`fail_with(exc, times=n)` makes the next n deliveries raise `exc`;
`block()` / `unblock()` hold deliveries open to test what happens meanwhile.
"""

from __future__ import annotations

import trio

__all__ = ["MemorySink"]


class MemorySink:
    name = "memory"

    def __init__(self) -> None:
        self.delivered: dict[str, bytes] = {}
        self.attempts: list[str] = []
        self._failures: list[Exception] = []
        self._open = trio.Event()
        self._open.set()

    def fail_with(self, error: Exception, times: int = 1) -> None:
        self._failures.extend([error] * times)

    def block(self) -> None:
        self._open = trio.Event()

    def unblock(self) -> None:
        self._open.set()

    async def deliver(self, batch_id: str, day: str, body: bytes) -> None:
        self.attempts.append(batch_id)
        await self._open.wait()
        if self._failures:
            raise self._failures.pop(0)
        previous = self.delivered.setdefault(batch_id, body)
        if previous != body:
            raise AssertionError(f"batch {batch_id} delivered twice with different content")

    async def aclose(self) -> None:
        return None
