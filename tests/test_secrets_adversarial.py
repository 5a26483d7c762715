"""Secrets never leak: the sink's and the store's credentials, whatever fails.

The secrets: the http sink's userinfo password (and its Basic header, which
is base64 of `user:password`), a token in its query string, its signing
secret; a NATS server's password or token; the PostgreSQL URL's password.
The outputs: every line the server writes (text and JSON logs, at info and
debug), a refusal at start, error answers, GET /batches and
/batches/{id} (`last_error`), /metrics, /readyz, /healthz, /openapi.json.

Each secret is looked for as written, percent-encoded, inside a Basic
header, and in pieces (`fragments`): a message that shows "ssw0rd" of
"Pa@ssw0rd" shows the password. Real servers, real sockets: a small HTTP
receiver in the test's trio run, a private nats-server with a password, the
PostgreSQL at 127.0.0.1:5432 with a role of the test's own that has one.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import h11
import httpx
import psycopg
import pytest
import trio

import ingestor.__main__ as cli
from ingestor.errors import SinkError, SinkRejected, SinkRetryable
from ingestor.sinks.http import HttpSink
from tests.e2e.cluster_support import fresh_database, require_postgres
from tests.support.fixtures import QUIET_COMMITTER
from tests.support.server import (
    ServerError,
    ServerProcess,
    free_port,
    read_request,
    wait_until,
)

PYTHON = sys.executable
USER = "billsink"
HTTP_PASSWORD = "HttpPw7Qx9k"
QUERY_TOKEN = "QryTok3Kd8m"
SIGNING_SECRET = "SignKey5Vb2n"
NATS_PASSWORD = "NatsPw4Lm6p"
NATS_TOKEN = "NatsTok2Hy7r"
PG_PASSWORD = "PgPw/8Zr@1wQ"  # needs percent-encoding in a URL: both forms are looked for
PULSE = {"tenant_id": "t1", "product_sku": "sku", "use_unit": "call", "used_amount": 1}


# -- looking for secrets ---------------------------------------------------------


def fragments(secret: str) -> set[str]:
    """The pieces of `secret` between URL delimiters, of 4 characters or more."""
    return {piece for piece in re.split(r"[/?#@:&=]", secret) if len(piece) >= 4}


def forms(secret: str, user: str | None = None) -> set[str]:
    """`secret` as an output could show it: as written, percent-encoded, in pieces,
    and inside a Basic Authorization header (base64 of `user:secret`)."""
    found = {secret, quote(secret, safe=""), quote(secret)} | fragments(secret)
    if user is not None:
        found.add(base64.b64encode(f"{user}:{secret}".encode()).decode())
    return found


def leaks(text: str, *secrets_: str, user: str | None = None) -> list[str]:
    """Every form of every secret that `text` shows."""
    return sorted({form for secret in secrets_ for form in forms(secret, user) if form in text})


def lines_showing(text: str, *secrets_: str, user: str | None = None) -> list[str]:
    found = set(leaks(text, *secrets_, user=user))
    return [line for line in text.splitlines() if any(form in line for form in found)]


def start_line(output: str) -> str:
    lines = [line for line in output.splitlines() if "ingestor.service start" in line]
    assert len(lines) == 1, output
    return lines[0]


# -- a downstream played by the test ---------------------------------------------


class Receiver:
    """An HTTP/1.1 endpoint on a real socket. `answers` says how it answers each
    request in turn (the last one repeats): a status, "hang" (never answers),
    "close" (closes without a word), "garbage" (no HTTP at all), or "plain"
    (an HTTP answer as soon as a client connects, before it says anything:
    what a TLS client meets on a plain HTTP port)."""

    def __init__(self, *answers: int | str) -> None:
        self.answers = list(answers) or [200]
        self.heads: list[dict[str, str]] = []  # each request's headers
        self.port = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()  # listening already: a connection waits in the backlog
        await trio.serve_listeners(self._handle, listeners)

    def authorization(self) -> set[str]:
        return {head["authorization"] for head in self.heads if "authorization" in head}

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            if self.answers[0] == "plain":
                await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
                return
            received = await read_request(stream, h11.Connection(h11.SERVER))
            if received is None:
                return
            self.heads.append(received[0])
            answer = self.answers[min(len(self.heads), len(self.answers)) - 1]
            if answer == "hang":
                await trio.sleep_forever()
            if answer == "close":
                return
            if answer == "garbage":
                await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
                return
            text = b'{"error":"nope"}'
            await stream.send_all(
                b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (int(answer), len(text), text)
            )


@contextlib.asynccontextmanager
async def receiving(*answers: int | str) -> AsyncIterator[Receiver]:
    receiver = Receiver(*answers)
    async with trio.open_nursery() as nursery:
        await nursery.start(receiver.run)
        yield receiver
        nursery.cancel_scope.cancel()


# -- driving a server --------------------------------------------------------------


async def commit_one(client: httpx.AsyncClient, url: str) -> str:
    """Store a pulse, commit its day, and return the batch id."""
    assert (await client.post(f"{url}/pulses", json=PULSE)).status_code == 202
    day = (await client.get(f"{url}/aggregates")).json()["aggregates"][0]["date"]
    answer = await client.post(f"{url}/aggregates/commit", json={"date": day})
    assert answer.status_code == 200, answer.text
    batch_id: str = answer.json()["batches"][0]["batch_id"]
    return batch_id


async def wait_attempted(client: httpx.AsyncClient, url: str, batch_id: str) -> dict[str, object]:
    batch: dict[str, object] = {}

    async def attempted() -> bool:
        nonlocal batch
        batch = (await client.get(f"{url}/batches/{batch_id}")).json()
        return int(str(batch.get("attempts", 0))) >= 1 and batch.get("last_error") is not None

    await wait_until(attempted, within=10, what="a failed delivery attempt", interval=0.05)
    return batch


async def public_outputs(client: httpx.AsyncClient, url: str) -> str:
    """Every read answer a server gives, one after the other."""
    texts = []
    for path in ("/batches", "/batches?status=failed", "/metrics", "/readyz", "/healthz"):
        texts.append((await client.get(f"{url}{path}")).text)
    texts.append((await client.get(f"{url}/openapi.json")).text)
    return "\n".join(texts)


def server(tmp_path: Path, name: str, **env: str) -> ServerProcess:
    return ServerProcess(
        tmp_path / name, env={**QUIET_COMMITTER, **env}, ready_timeout=15, stop_timeout=15
    )


# == DEFECTS =========================================================================


async def test_a_delivery_the_sink_answered_logs_no_sink_credentials(tmp_path: Path) -> None:
    """httpx logs every answered request at INFO, URL and all, through the root
    logger the service set up; its password came out on each attempt."""
    async with receiving(503, 200) as receiver, httpx.AsyncClient(timeout=10) as client:
        sink = f"http://{USER}:{HTTP_PASSWORD}@127.0.0.1:{receiver.port}/hook"
        async with server(
            tmp_path,
            "data",
            INGESTOR_SINK=sink,
            INGESTOR_SINK_SECRET=SIGNING_SECRET,
            INGESTOR_RETRY_INITIAL="0.05",
            INGESTOR_LOG_FORMAT="json",
        ) as proc:
            batch_id = await commit_one(client, proc.url)

            async def delivered() -> bool:
                batch = (await client.get(f"{proc.url}/batches/{batch_id}")).json()
                return bool(batch["status"] == "delivered")

            await wait_until(delivered, within=10, what="the delivery", interval=0.05)
            # The credentials were in use: the receiver got them as Basic auth.
            basic = base64.b64encode(f"{USER}:{HTTP_PASSWORD}".encode()).decode()
            assert receiver.authorization() == {f"Basic {basic}"}
            shown = await public_outputs(client, proc.url)
            assert leaks(shown, HTTP_PASSWORD, SIGNING_SECRET, user=USER) == [], shown
            assert await proc.terminate() == 0
    showing = lines_showing(proc.output_of_run(), HTTP_PASSWORD, SIGNING_SECRET, user=USER)
    assert showing == [], "\n".join(showing)


async def test_a_token_in_the_sinks_query_string_is_not_in_the_start_line(
    tmp_path: Path,
) -> None:
    """`shown_url` hides userinfo and a `password=` parameter only."""
    sink = f"http://127.0.0.1:{free_port()}/hook?token={QUERY_TOKEN}"
    async with server(
        tmp_path, "data", INGESTOR_SINK=sink, INGESTOR_SINK_SECRET=SIGNING_SECRET
    ) as proc:
        assert await proc.terminate() == 0
    line = start_line(proc.output_of_run())
    assert leaks(line, QUERY_TOKEN, SIGNING_SECRET) == [], line


@pytest.mark.parametrize("scheme", ["http", "nats"])
async def test_a_password_holding_an_at_sign_is_hidden_whole_in_the_start_line(
    tmp_path: Path, scheme: str
) -> None:
    """`shown_url` stops the userinfo at its first "@": what follows it stays.

    Unencoded "@" in a password is what urlsplit, httpx and nats-py all read
    as part of the password (the last "@" ends the userinfo): the http sink
    delivers with it, as the receiver's Authorization header shows."""
    password = "Pa@ssw0rdTail9"
    async with receiving(200) as receiver:
        if scheme == "http":
            sink = f"http://{USER}:{password}@127.0.0.1:{receiver.port}/hook"
        else:
            sink = f"nats://{USER}:{password}@127.0.0.1:{free_port()}"
        proc = server(
            tmp_path,
            "data",
            INGESTOR_SINK=sink,
            INGESTOR_SINK_SECRET=SIGNING_SECRET,
            INGESTOR_RETRY_INITIAL="0.05",
            INGESTOR_SINK_TIMEOUT="1",
        )
        try:
            await proc.start()
        except ServerError:
            # Refusing such a URL at start would do too, if it says nothing of it.
            output = proc.output_of_run()
            assert "configuration error: sink" in output, output
            assert leaks(output, password, user=USER) == [], output
            return
        try:
            if scheme == "http":
                async with httpx.AsyncClient(timeout=10) as client:
                    await commit_one(client, proc.url)

                    async def heard() -> bool:
                        return bool(receiver.heads)

                    await wait_until(heard, within=10, what="a delivery", interval=0.05)
                basic = base64.b64encode(f"{USER}:{password}".encode()).decode()
                assert receiver.authorization() == {f"Basic {basic}"}
            assert await proc.terminate() == 0
        finally:
            await proc.aclose()
    line = start_line(proc.output_of_run())
    assert leaks(line, password, user=USER) == [], line


@pytest.mark.parametrize(
    ("sink", "secret"),
    [
        # "/" ends the authority: the password is read as a port, and the
        # redaction, which stops at "/", leaves the whole URL as written.
        ("https://bob:Hunter/2pwXYZ@billing.example/in", "Hunter/2pwXYZ"),
        # "#" and "?" too: urlsplit's error quotes the password's first part as the port.
        ("https://bob:Hunter#2pwXYZ@billing.example/in", "Hunter#2pwXYZ"),
        ("nats://bob:Hunter?2pwXYZ@127.0.0.1:4222", "Hunter?2pwXYZ"),
        # A query token and a port that is no port.
        (f"https://billing.example:99999/in?token={QUERY_TOKEN}", QUERY_TOKEN),
    ],
)
def test_a_refused_sink_url_shows_no_part_of_its_secret(
    sink: str,
    secret: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    def never_serve(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{sink} was accepted")

    monkeypatch.setattr("ingestor.service.run_service", never_serve)
    monkeypatch.chdir(tmp_path)
    for key in list(os.environ):
        if key.startswith("INGESTOR_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("INGESTOR_SINK", sink)
    monkeypatch.setenv("INGESTOR_SINK_SECRET", SIGNING_SECRET)
    code = cli.main(["serve", "--bind", "127.0.0.1:0", "--data-dir", str(tmp_path / "d")])
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.err.startswith("billing-ingestor: configuration error: sink"), captured.err
    assert leaks(captured.out + captured.err, secret, SIGNING_SECRET) == [], captured.err


@pytest.mark.parametrize(
    "url",
    [
        # libpq reads "bob" as the host and "pa" as the port; `_where` then
        # names "PostgreSQL at bob:pa/ssWORD-z9@127.0.0.1:5432/db".
        "postgresql://bob:pa/ssWORD-z9@127.0.0.1:5432/db",
        # libpq ends the userinfo at the first "@": the rest is the host.
        "postgresql://bob:Pa@ssWORD-z9@127.0.0.1:5432/db",
    ],
)
def test_a_refused_postgresql_url_shows_no_part_of_its_password(tmp_path: Path, url: str) -> None:
    password = url.split("bob:", 1)[1].rsplit("@", 1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTOR_")}
    env.update(INGESTOR_STORE=url, INGESTOR_STORE_BUSY_TIMEOUT="2")
    done = subprocess.run(
        [PYTHON, "-m", "ingestor", "serve", "--bind", "127.0.0.1:0", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=20,
        check=False,
    )
    # Refused (1, store error) or, if checked sooner, a configuration error (2).
    assert done.returncode in (1, 2), done.stderr
    assert done.stderr.startswith("billing-ingestor: "), done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert leaks(done.stdout + done.stderr, password) == [], done.stderr


# == what held =====================================================================


async def test_every_failure_of_the_http_sink_is_told_without_its_credentials() -> None:
    """Each way a delivery fails, as the deliverer logs it and /batches shows it
    (`str` of the sink's error), with credentials in the URL's userinfo and query."""
    secrets_ = (HTTP_PASSWORD, QUERY_TOKEN, SIGNING_SECRET)
    auth = f"{USER}:{HTTP_PASSWORD}"
    told: dict[str, str] = {}
    async with (
        receiving(503) as unavailable,
        receiving(404) as missing,
        receiving(301) as moved,
        receiving("hang") as hanging,
        receiving("close") as closing,
        receiving("plain") as plain,
        receiving("garbage") as garbage,
    ):
        cases = {
            "refused": f"http://{auth}@127.0.0.1:{free_port()}/hook",
            "dns": f"http://{auth}@billing-sink-{secrets.token_hex(4)}.invalid/hook",
            "tls": f"https://{auth}@127.0.0.1:{plain.port}/hook",
            "timeout": f"http://{auth}@127.0.0.1:{hanging.port}/hook",
            "closed": f"http://{auth}@127.0.0.1:{closing.port}/hook",
            "garbage": f"http://{auth}@127.0.0.1:{garbage.port}/hook",
            "503": f"http://{auth}@127.0.0.1:{unavailable.port}/hook",
            "404": f"http://{auth}@127.0.0.1:{missing.port}/hook",
            "301": f"http://{auth}@127.0.0.1:{moved.port}/hook",
        }
        for case, url in cases.items():
            sink = HttpSink(f"{url}?token={QUERY_TOKEN}", secret=SIGNING_SECRET, timeout=1)
            try:
                with pytest.raises(SinkError) as failed:
                    await sink.deliver("b-1", "2026-11-27", b'{"records": []}')
            finally:
                await sink.aclose()
            error = failed.value
            retried = isinstance(error, SinkRetryable)
            assert retried == (case not in ("404", "301")), (case, error)
            assert isinstance(error, SinkRejected) == (not retried)
            told[case] = f"{error} {error!r}"
    for case, text in told.items():
        assert leaks(text, *secrets_, user=USER) == [], (case, text)
    # Each case failed the way it was meant to, not all alike.
    for case in ("refused", "dns", "tls"):
        assert "ConnectError" in told[case], told
    assert "timed out" in told["timeout"], told


@pytest.fixture
async def nats_with_password() -> AsyncIterator[int]:
    """A private nats-server that wants user USER with a password nobody here knows."""
    binary = shutil.which("nats-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("nats-server is not installed")
        pytest.skip("nats-server is not installed")
    port = free_port()
    process = await trio.lowlevel.open_process(
        [binary, "-a", "127.0.0.1", "-p", str(port), "--user", USER, "--pass", "TheRightOne1"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        async def listening() -> bool:
            with contextlib.suppress(OSError):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.aclose()
                return True
            return False

        await wait_until(listening, within=10, what="nats-server", interval=0.02)
        yield port
    finally:
        process.kill()
        await process.wait()


async def test_a_nats_server_refusing_the_credentials_is_reported_without_them(
    tmp_path: Path, nats_with_password: int
) -> None:
    """Wrong password on one server, a token on another that is down; debug logs."""
    sink = (
        f"nats://{USER}:{NATS_PASSWORD}@127.0.0.1:{nats_with_password},"
        f"nats://{NATS_TOKEN}@127.0.0.1:{free_port()}"
    )
    async with (
        httpx.AsyncClient(timeout=10) as client,
        server(
            tmp_path,
            "data",
            INGESTOR_SINK=sink,
            INGESTOR_SINK_TIMEOUT="1",
            INGESTOR_RETRY_INITIAL="0.05",
            INGESTOR_LOG_LEVEL="debug",
        ) as proc,
    ):
        batch_id = await commit_one(client, proc.url)
        batch = await wait_attempted(client, proc.url, batch_id)
        assert str(batch["last_error"]).startswith("connecting to nats://"), batch
        shown = json.dumps(batch) + await public_outputs(client, proc.url)
        assert leaks(shown, NATS_PASSWORD, NATS_TOKEN, user=USER) == [], shown
        assert await proc.terminate() == 0
    output = proc.output_of_run()
    assert "Authorization Violation" in output
    showing = lines_showing(output, NATS_PASSWORD, NATS_TOKEN, user=USER)
    assert showing == [], "\n".join(showing)
    assert "Traceback" not in output


@contextlib.contextmanager
def role_with_password(admin: str) -> Iterator[tuple[str, str]]:
    """A login role with PG_PASSWORD and a database it owns: (role, its URL)."""
    role = f"ingestor_secret_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{PG_PASSWORD}'")
    try:
        with fresh_database(admin) as url:
            name = url.rsplit("/", 1)[1]
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f"ALTER DATABASE {name} OWNER TO {role}")
            yield role, f"postgresql://{role}:{quote(PG_PASSWORD, safe='')}@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP ROLE IF EXISTS {role}")


def shut_out(admin: str, role: str, *, out: bool) -> None:
    """Let `role` log in, or not and end its sessions (the database "goes away")."""
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"ALTER ROLE {role} {'NOLOGIN' if out else 'LOGIN'}")
        if out:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )


async def test_postgresql_password_stays_hidden_through_an_outage(tmp_path: Path) -> None:
    """The store shuts the service out mid-run, a second instance is refused at
    start, then the store comes back: the password (as written, encoded) is
    in no answer and no line."""
    admin = require_postgres()
    with role_with_password(admin) as (role, url):
        async with (
            httpx.AsyncClient(timeout=15) as client,
            server(
                tmp_path,
                "data",
                INGESTOR_STORE=url,
                INGESTOR_STORE_BUSY_TIMEOUT="0.5",
                INGESTOR_STORE_POOL_SIZE="2",
                INGESTOR_LOG_FORMAT="json",
                INGESTOR_LOG_LEVEL="debug",
            ) as proc,
        ):
            assert (await client.post(f"{proc.url}/pulses", json=PULSE)).status_code == 202
            await trio.to_thread.run_sync(lambda: shut_out(admin, role, out=True))
            down = [
                await client.post(f"{proc.url}/pulses", json=[PULSE, PULSE]),
                await client.get(f"{proc.url}/batches"),
            ]
            assert [answer.status_code for answer in down] == [503, 503], down
            for path in ("/metrics", "/readyz"):
                down.append(await client.get(f"{proc.url}{path}"))
            shown = "\n".join(answer.text for answer in down)
            assert leaks(shown, PG_PASSWORD, user=role) == [], shown
            # A second instance refused at start; its password from PGPASSWORD this time.
            refused = await trio.run_process(
                [PYTHON, "-m", "ingestor", "serve", "--data-dir", str(tmp_path / "second")],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env={
                    **{k: v for k, v in os.environ.items() if not k.startswith("INGESTOR_")},
                    "INGESTOR_STORE": url.replace(f":{quote(PG_PASSWORD, safe='')}@", "@"),
                    "INGESTOR_BIND": "127.0.0.1:0",
                    "INGESTOR_STORE_BUSY_TIMEOUT": "1",
                    "PGPASSWORD": PG_PASSWORD,
                },
            )
            said = (refused.stdout + refused.stderr).decode(errors="replace")
            assert refused.returncode == 1, said
            assert "not permitted to log in" in said, said
            assert leaks(said, PG_PASSWORD, user=role) == [], said
            await trio.to_thread.run_sync(lambda: shut_out(admin, role, out=False))

            async def back() -> bool:
                answer = await client.post(f"{proc.url}/pulses", json=PULSE)
                return answer.status_code == 202

            await wait_until(back, within=10, what="the store back", interval=0.1)
            assert await proc.terminate() == 0
    output = proc.output_of_run()
    assert "not permitted to log in" in output  # the outage was logged ...
    showing = lines_showing(output, PG_PASSWORD, user=role)
    assert showing == [], "\n".join(showing)  # ... without the password


def test_the_command_line_shows_a_new_key_once_and_no_configured_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("INGESTOR_SINK", f"https://{USER}:{HTTP_PASSWORD}@h/in?token={QUERY_TOKEN}")
    monkeypatch.setenv("INGESTOR_SINK_SECRET", SIGNING_SECRET)
    for argv in (["--help"], ["serve", "--help"], ["keys", "new", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        captured = capsys.readouterr()
        assert leaks(captured.out + captured.err, HTTP_PASSWORD, QUERY_TOKEN, SIGNING_SECRET) == []
    assert cli.main(["keys", "new", "--role", "read", "--tenant", "t1"]) == 0
    captured = capsys.readouterr()
    key = captured.out.split("\n\n")[1].strip()
    assert captured.err == ""
    assert captured.out.count(key) == 1
    assert leaks(captured.out, HTTP_PASSWORD, QUERY_TOKEN, SIGNING_SECRET) == []
