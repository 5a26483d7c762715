"""Private nats-servers for the suites that attack the NATS sink.

    need_nats_server  skip a test without the nats-server binary (fail it
                      under CI, where `.ci/services` installs it)
    start_nats_server run a nats-server command line and return once its port
                      takes connections; fail with its log if it exits or
                      does not listen within 10 s
    stream_messages   (subject, data, Nats-Msg-Id) of every message of a
                      stream, read back through nats-py, over TLS if given

nats-py speaks asyncio only: `stream_messages` runs it in `asyncio.run` in a
worker thread, so a trio test awaits it like any other call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import nats
import pytest
import trio

__all__ = ["need_nats_server", "start_nats_server", "stream_messages"]


def need_nats_server() -> None:
    if shutil.which("nats-server") is None:
        message = "no nats-server binary: run `bash .ci/services`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def start_nats_server(
    command: Sequence[str], port: int, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start `command`, its output appended to `log` (or dropped), and wait until
    127.0.0.1:`port` takes connections."""
    with contextlib.ExitStack() as files:
        out = files.enter_context(log.open("ab")) if log is not None else subprocess.DEVNULL
        process = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return process
        time.sleep(0.05)
    process.kill()
    process.wait(10)
    said = log.read_text()[-2000:] if log is not None else "(output not kept)"
    raise AssertionError(f"nats-server did not start: {' '.join(command)}\n{said}")


async def stream_messages(
    url: str, stream: str, *, ca: Path | None = None
) -> list[tuple[str, bytes, str | None]]:
    """(subject, data, Nats-Msg-Id) of every message on `stream`; over TLS trusting
    `ca` if given."""

    async def read() -> list[tuple[str, bytes, str | None]]:
        tls = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
        client = await nats.connect(url, allow_reconnect=False, connect_timeout=3, tls=tls)
        try:
            manager = client.jsm()
            state = (await manager.stream_info(stream)).state
            found = []
            for seq in range(state.first_seq, state.last_seq + 1) if state.messages else ():
                message = await manager.get_msg(stream, seq=seq)
                msg_id = message.headers.get("Nats-Msg-Id") if message.headers else None
                found.append((message.subject or "", message.data or b"", msg_id))
            return found
        finally:
            await client.close()

    return await trio.to_thread.run_sync(asyncio.run, read())
