"""The exposure rules over real sockets: start-up refusal, keys, header size, slow bodies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from tests.support.server import exchange, free_port

from .conftest import KEY, StartServer


async def test_open_mode_on_a_public_address_refuses_to_start(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "ingestor",
        "serve",
        "--bind",
        f"0.0.0.0:{free_port()}",
        "--data-dir",
        str(tmp_path / "data"),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTOR_")}
    with trio.fail_after(30):
        done = await trio.run_process(
            command,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    assert done.returncode == 2
    message = done.stderr.decode()
    assert "configuration error: api_keys: none configured" in message
    assert "Traceback" not in message
    assert not (tmp_path / "data").exists()  # refused before anything was created


async def test_keys_over_http(start_server: StartServer) -> None:
    server = await start_server()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        assert (await http.get("/readyz")).status_code == 200
        denied = await http.get("/aggregates")
        assert denied.status_code == 401
        assert denied.headers["www-authenticate"].startswith("Bearer")
        allowed = await http.get("/aggregates", headers={"Authorization": f"Bearer {KEY}"})
        assert allowed.status_code == 200
        assert allowed.headers["x-request-id"]


async def test_oversized_headers_are_431_even_when_they_arrive_at_once(
    start_server: StartServer,
) -> None:
    server = await start_server()
    big = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
    status, headers, body = await exchange(server, big)
    assert status == 431
    assert headers["content-type"] == "application/json"
    assert b'"headers_too_large"' in body


async def test_a_trickling_body_gets_408_over_a_real_socket(start_server: StartServer) -> None:
    server = await start_server(INGESTOR_BODY_TIMEOUT="0.5")
    request = (
        b"POST /pulses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n[{"
    )
    with trio.fail_after(10):
        status, _, body = await exchange(server, request)
    assert status == 408
    assert b'"request_timeout"' in body
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(f"{server.url}/readyz")).status_code == 200
