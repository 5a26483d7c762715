"""The edge's handling of what hypercorn's transport may raise while answering."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from ingestor.edge import Edge

SCOPE: dict[str, Any] = {
    "type": "http",
    "method": "POST",
    "path": "/pulses",
    "headers": [(b"content-length", b"2")],
}


async def app(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 202, "headers": []})
    await send({"type": "http.response.body", "body": b"{}", "more_body": False})


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"{}", "more_body": False}


async def test_a_socket_busy_closing_after_the_whole_answer_is_not_an_error() -> None:
    """The client has the answer and closed; hypercorn's close raced its last write."""
    sent: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])
        if message["type"] == "http.response.body":
            raise trio.BusyResourceError("another task is currently sending data")

    edge = Edge(app, limit=10)
    await edge(SCOPE, receive, send)  # type: ignore[arg-type]
    assert sent == ["http.response.start", "http.response.body"]
    assert edge.in_flight == 0


async def test_a_socket_busy_before_the_answer_ends_is_still_an_error() -> None:
    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            raise trio.BusyResourceError("another task is currently sending data")

    edge = Edge(app, limit=10)
    with pytest.raises(trio.BusyResourceError):
        await edge(SCOPE, receive, send)  # type: ignore[arg-type]
    assert edge.in_flight == 0
