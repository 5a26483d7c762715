"""X-Request-Id: honoured (sanitised) or made, returned, and carried by log lines."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from quart.typing import TestClientProtocol as Client

from ingestor.logs import JsonFormatter, TextFormatter

from .conftest import pulse


class Lines(logging.Handler):
    """Formats each record when it is emitted, in the emitting task's context."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def json_lines() -> Iterator[Lines]:
    handler = Lines(JsonFormatter())
    logger = logging.getLogger("ingestor")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


async def test_an_id_is_made_when_none_is_given(client: Client) -> None:
    first = await client.get("/healthz")
    second = await client.post("/pulses", json=pulse())
    ids = [first.headers["X-Request-Id"], second.headers["X-Request-Id"]]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert ids[0] != ids[1]


@pytest.mark.parametrize(
    ("given", "returned"),
    [
        ("abc-123", "abc-123"),
        ("4bf92f35-77b3-4da6-a3ce-929d0e0e4736", "4bf92f35-77b3-4da6-a3ce-929d0e0e4736"),
        ("{req} <b>42</b>; drop", "reqb42/bdrop"),
        ("trace:ab/cd+ef=@x.y_z~", "trace:ab/cd+ef=@x.y_z~"),
        ("x" * 500, "x" * 128),
    ],
)
async def test_a_given_id_is_honoured_sanitised_and_bounded(
    client: Client, given: str, returned: str
) -> None:
    response = await client.get("/healthz", headers={"X-Request-Id": given})
    assert response.headers["X-Request-Id"] == returned


@pytest.mark.parametrize("given", ["", "   ", "<>{}", "\u00e9\u00e8"])
async def test_an_id_with_nothing_usable_is_replaced(client: Client, given: str) -> None:
    response = await client.get("/healthz", headers={"X-Request-Id": given})
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-Id"])


@pytest.mark.parametrize(
    ("method", "url", "status"),
    [("GET", "/nowhere", 404), ("DELETE", "/pulses", 405), ("POST", "/aggregates/commit", 422)],
)
async def test_errors_carry_the_id_too(client: Client, method: str, url: str, status: int) -> None:
    response = await client.open(url, method=method, headers={"X-Request-Id": "err-1"})
    assert response.status_code == status
    assert response.headers["X-Request-Id"] == "err-1"


async def test_log_lines_of_a_request_carry_its_id(client: Client, json_lines: Lines) -> None:
    await client.post("/pulses", json=pulse())
    response = await client.post(
        "/aggregates/commit", json={"date": "2026-11-28"}, headers={"X-Request-Id": "commit-7"}
    )
    assert response.status_code == 200
    entries: list[dict[str, Any]] = [json.loads(line) for line in json_lines.lines]
    [commit] = [e for e in entries if e["event"] == "commit"]
    assert commit["request_id"] == "commit-7"
    assert commit["date"] == "2026-11-28"


async def test_unexpected_errors_are_logged_with_the_id(
    client: Client, json_lines: Lines, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ingestor import api

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("a defect")

    monkeypatch.setattr(api, "decode_pulses", broken)
    response = await client.post("/pulses", json=pulse(), headers={"X-Request-Id": "boom"})
    assert response.status_code == 500
    assert (await response.get_json())["error"]["code"] == "internal"
    [entry] = [json.loads(line) for line in json_lines.lines]
    assert (entry["event"], entry["request_id"]) == ("unexpected error", "boom")
    assert "ZeroDivisionError" in entry["exception"]


def test_lines_outside_a_request_have_no_id() -> None:
    record = logging.LogRecord("ingestor.x", logging.INFO, __file__, 1, "tick", None, None)
    assert "request_id" not in json.loads(JsonFormatter().format(record))
    assert "request_id" not in TextFormatter().format(record)
