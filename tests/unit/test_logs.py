"""The log's writer: lines wait for an output that takes none, up to a bound."""

from __future__ import annotations

import logging
import threading
import time

from ingestor.logs import TextFormatter, _Writer


class Stalled:
    """A stream whose writes wait until `release` (a pipe nobody reads)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lines: list[str] = []

    def write(self, text: str) -> None:
        self.release.wait()
        self.lines.append(text)

    def flush(self) -> None:
        return None


class Broken:
    """A stream whose reader has gone (EPIPE)."""

    def write(self, text: str) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        return None


def logger_to(handler: logging.Handler, name: str) -> logging.Logger:
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def test_a_stalled_output_holds_no_caller_and_the_lines_dropped_are_said() -> None:
    """With the output taking nothing, 200 lines are logged at once (none waits
    on it): the first is stuck in the write, 5 wait, the rest are dropped.
    Once the output takes lines again, those 6 come out in order, then a line
    saying 194 were dropped, then what is logged after."""
    stream = Stalled()
    writer = _Writer(stream, capacity=5)
    log = logger_to(writer, "test.logs.stalled")
    log.info("first")
    deadline = time.monotonic() + 5
    while writer._lines.qsize() and time.monotonic() < deadline:
        time.sleep(0.001)  # the thread has taken "first" and waits in write
    began = time.monotonic()
    for n in range(199):
        log.info("line", extra={"fields": {"n": n}})
    assert time.monotonic() - began < 1  # no caller waited on the output
    stream.release.set()
    assert writer.drain(5)
    log.info("after")
    assert writer.drain(5)
    writer.close()
    said = [line.split(" ", 3)[3].rstrip("\n") for line in stream.lines]
    assert said[:6] == ["first", "line n=0", "line n=1", "line n=2", "line n=3", "line n=4"]
    assert said[6].startswith("log lines dropped dropped=194 "), said[6]
    assert said[7:] == ["after"]


def test_lines_a_broken_output_refused_are_counted_when_it_takes_them_again() -> None:
    writer = _Writer(Broken())
    log = logger_to(writer, "test.logs.broken")
    for n in range(3):
        log.warning("lost", extra={"fields": {"n": n}})
    assert writer.drain(5)
    stream = Stalled()
    stream.release.set()
    writer._stream = stream
    log.warning("back")
    assert writer.drain(5)
    writer.close()
    said = [line.split(" ", 3)[3].rstrip("\n") for line in stream.lines]
    assert said[0].startswith("log lines dropped dropped=3 "), said
    assert said[1:] == ["back"]


def test_closing_writes_what_waits_and_ends_within_its_bound_on_a_stalled_output() -> None:
    stream = Stalled()
    writer = _Writer(stream, capacity=5)
    log = logger_to(writer, "test.logs.closing")
    log.info("stuck")
    began = time.monotonic()
    writer.close()  # the thread never gets past the write: close gives up
    assert time.monotonic() - began < 6
    stream.release.set()
