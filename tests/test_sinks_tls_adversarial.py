"""The sinks as production runs them: over TLS, with a private CA, with credentials.

Every test runs the real service (`python -m ingestor serve`, SQLite, the
commit made by hand) against a real downstream of its own: a TLS HTTP
receiver in the test's trio run (trio.SSLStream on a real socket), or a
private nats-server with a `tls {}` block and an `authorization {}` block,
reloaded with SIGHUP as an operator would. The certificates are made here
with the openssl CLI: a private CA, a server certificate signed by it for
127.0.0.1, and the broken ones a deployment meets (signed by another CA,
for another host name, expired). The CA reaches the service the way Python
users give it, the SSL_CERT_FILE environment variable.

What must hold (README "Reading and committing", "Configuration"):

- a batch is delivered once, and recorded delivered only once the
  downstream has it;
- a certificate, handshake or credentials problem is retried, says what is
  wrong in the batch's last_error, and once it is fixed downstream the batch
  goes, without a restart;
- a misconfiguration is said clearly;
- no secret (a password, a token, the signing secret) appears in the log,
  last_error, /batches or /metrics.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import trio

from tests.support.fixtures import QUIET_COMMITTER
from tests.support.nats import need_nats_server, start_nats_server
from tests.support.nats import stream_messages as read_stream
from tests.support.server import ServerProcess, free_port, read_request, wait_until

SIGNING_SECRET = "SignKey9Tq4Wd"
NATS_USER = "biller"
NATS_PASSWORD = "NatsPw7Kx2Rv"
NATS_WRONG = "Wr0ngPw5Hz8"
NATS_TOKEN = "NatsTok3Jm6Ys"
SINK_TIMEOUT = "1.5"
FAST_RETRIES = {
    "INGESTOR_SINK_TIMEOUT": SINK_TIMEOUT,
    "INGESTOR_RETRY_INITIAL": "0.2",
    "INGESTOR_RETRY_MAX": "1",
    "INGESTOR_LOG_FORMAT": "json",
}
PULSE = {"tenant_id": "t1", "product_sku": "sku", "use_unit": "call", "used_amount": "1.5"}


# -- certificates ---------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=30
    )
    assert done.returncode == 0, f"openssl {' '.join(args)}:\n{done.stderr}"


class Pki:
    """A private CA and the certificates it (or another CA) signs, under `home`."""

    def __init__(self, home: Path, name: str = "ca") -> None:
        self.home = home
        self.name = name
        home.mkdir(parents=True, exist_ok=True)
        self.ca = home / f"{name}.pem"
        self.ca_key = home / f"{name}.key"
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(self.ca_key),
            "-out",
            str(self.ca),
            "-days",
            "3",
            "-subj",
            f"/CN=Billing Test {name}",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            cwd=home,
        )

    def issue(
        self, name: str, *, san: str = "IP:127.0.0.1,DNS:localhost", days: int = 2, usage: str = ""
    ) -> tuple[Path, Path]:
        """A leaf certificate and its key, signed by this CA; `days` -1 is expired."""
        key, csr, cert = (self.home / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
        ext = self.home / f"{name}.ext"
        ext.write_text(
            f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={usage or 'serverAuth,clientAuth'}\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
        )
        _openssl(
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(csr),
            "-subj",
            f"/CN={name}",
            cwd=self.home,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(self.ca),
            "-CAkey",
            str(self.ca_key),
            "-CAcreateserial",
            "-out",
            str(cert),
            "-days",
            str(days),
            "-extfile",
            str(ext),
            cwd=self.home,
        )
        return cert, key


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI")
    return Pki(tmp_path / "pki")


def server_context(cert: Path, key: Path, *, client_ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


# -- a TLS HTTP receiver ----------------------------------------------------------


class TlsReceiver:
    """An HTTPS endpoint on a real socket that answers every POST 200 and keeps
    each batch it got by its Idempotency-Key. `context` may be swapped while it
    runs (the operator fixes the certificate); `stall` makes it accept TCP and
    never begin the TLS handshake."""

    def __init__(self, context: ssl.SSLContext | None, *, stall: bool = False) -> None:
        self.context = context
        self.stall = stall
        self.port = 0
        self.received: list[tuple[str, bytes]] = []
        self.handshakes_failed: list[str] = []
        self.connections = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, raw: trio.SocketStream) -> None:
        self.connections += 1
        if self.stall or self.context is None:
            async with raw:
                await trio.sleep_forever()
        assert self.context is not None
        stream = trio.SSLStream(raw, self.context, server_side=True)
        try:
            await stream.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            self.handshakes_failed.append(repr(exc.__cause__ or exc))
            await raw.aclose()
            return
        try:
            received = await read_request(stream, h11.Connection(h11.SERVER))
            if received is None:
                return
            headers, body = received
            self.received.append((headers.get("idempotency-key", ""), body))
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            )
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.aclose()
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            self.handshakes_failed.append(repr(exc.__cause__ or exc))
        finally:
            await raw.aclose()


@contextlib.asynccontextmanager
async def receiving(receiver: TlsReceiver) -> AsyncIterator[TlsReceiver]:
    async with trio.open_nursery() as nursery:
        await nursery.start(receiver.run)
        yield receiver
        nursery.cancel_scope.cancel()


# -- the service --------------------------------------------------------------


def service(tmp_path: Path, sink: str, ca: Path | None, **env: str) -> ServerProcess:
    settings = {
        **QUIET_COMMITTER,
        **FAST_RETRIES,
        "INGESTOR_SINK": sink,
        "INGESTOR_SINK_SECRET": SIGNING_SECRET,
        # The runner's own CA settings must not decide the test.
        "SSL_CERT_FILE": str(ca) if ca is not None else "",
        "SSL_CERT_DIR": "",
        **env,
    }
    return ServerProcess(tmp_path / "data", env=settings, ready_timeout=20, stop_timeout=20)


async def commit(client: httpx.AsyncClient, url: str, tenants: int = 1) -> list[str]:
    """Pulses of `tenants` tenants, their day committed: the new batch ids."""
    pulses = [{**PULSE, "tenant_id": f"t{n}", "id": f"p{n}"} for n in range(tenants)]
    assert (await client.post(f"{url}/pulses", json=pulses)).status_code == 202
    day = (await client.get(f"{url}/aggregates")).json()["aggregates"][0]["date"]
    answer = await client.post(f"{url}/aggregates/commit", json={"date": day})
    assert answer.status_code == 200, answer.text
    ids = [batch["batch_id"] for batch in answer.json()["batches"]]
    assert ids
    return ids


async def batch(client: httpx.AsyncClient, url: str, batch_id: str) -> dict[str, Any]:
    answer = await client.get(f"{url}/batches/{batch_id}")
    assert answer.status_code == 200, answer.text
    shown: dict[str, Any] = answer.json()
    return shown


async def retried(
    client: httpx.AsyncClient, url: str, batch_id: str, times: int = 2, within: float = 30
) -> dict[str, Any]:
    """The batch once it has failed `times` attempts (never delivered meanwhile)."""
    last: dict[str, Any] = {}

    async def attempted() -> bool:
        last.update(await batch(client, url, batch_id))
        assert last["status"] == "pending", last
        return bool(last["attempts"] >= times and last["last_error"])

    with trio.move_on_after(within):
        await wait_until(attempted, within=within + 1, what=f"{times} attempts", interval=0.1)
        return last
    raise AssertionError(f"{batch_id}: not {times} failed attempts after {within} s: {last}")


async def delivered(
    client: httpx.AsyncClient, url: str, ids: list[str], within: float = 30
) -> None:
    async def done() -> bool:
        shown = [await batch(client, url, i) for i in ids]
        return all(view["status"] == "delivered" for view in shown)

    await wait_until(done, within=within, what="delivery", interval=0.1)


async def public_outputs(client: httpx.AsyncClient, url: str) -> str:
    texts = []
    for path in ("/batches", "/batches?status=failed", "/batches?status=pending", "/metrics"):
        texts.append((await client.get(f"{url}{path}")).text)
    return "\n".join(texts)


def stacks(proc: ServerProcess) -> str:
    """The service's threads' stacks (py-spy, if there), for a delivery that hangs."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if proc.pid is None or not Path(spy).exists():
        return ""
    done = subprocess.run(
        [spy, "dump", "--pid", str(proc.pid)], capture_output=True, text=True, check=False
    )
    return done.stdout + done.stderr


def showing(text: str, *secrets: str) -> list[str]:
    return [line for line in text.splitlines() if any(s in line for s in secrets)]


# == HTTPS ======================================================================


async def test_https_with_a_private_ca_in_ssl_cert_file_delivers_each_batch_once(
    tmp_path: Path, pki: Pki
) -> None:
    cert, key = pki.issue("receiver")
    async with (
        receiving(TlsReceiver(server_context(cert, key))) as receiver,
        httpx.AsyncClient(timeout=10) as client,
    ):
        sink = f"https://127.0.0.1:{receiver.port}/hook"
        async with service(tmp_path, sink, pki.ca) as proc:
            ids = await commit(client, proc.url, tenants=3)
            await delivered(client, proc.url, ids)
            await trio.sleep(1.5)  # a second delivery would come within the idle poll
            assert sorted(k for k, _ in receiver.received) == sorted(ids)
            for batch_id, body in receiver.received:
                assert json.loads(body)["batch_id"] == batch_id
            assert await proc.terminate() == 0
    assert receiver.handshakes_failed == []


@pytest.mark.parametrize("broken", ["unknown_ca", "hostname", "expired"])
async def test_a_bad_receiver_certificate_is_retried_said_and_delivered_once_fixed(
    tmp_path: Path, pki: Pki, broken: str
) -> None:
    """Not delivered while the certificate is wrong, retried with its reason in
    last_error, and delivered once the receiver presents a good one: no restart."""
    if broken == "unknown_ca":
        bad = Pki(tmp_path / "rogue", "rogue").issue("receiver")
        reason = "certificate verify failed"
    elif broken == "hostname":
        bad = pki.issue("receiver", san="DNS:billing.example")
        reason = "mismatch"
    else:
        bad = pki.issue("receiver", days=-1)
        reason = "expired"
    good = pki.issue("good")
    async with (
        receiving(TlsReceiver(server_context(*bad))) as receiver,
        httpx.AsyncClient(timeout=10) as client,
    ):
        sink = f"https://127.0.0.1:{receiver.port}/hook"
        async with service(tmp_path, sink, pki.ca) as proc:
            [batch_id] = await commit(client, proc.url)
            shown = await retried(client, proc.url, batch_id, times=2)
            assert "certificate" in shown["last_error"].lower(), shown
            assert reason in shown["last_error"].lower(), shown
            assert receiver.received == []
            receiver.context = server_context(*good)
            await delivered(client, proc.url, [batch_id])
            await trio.sleep(1.5)
            assert [k for k, _ in receiver.received] == [batch_id]
            assert await proc.terminate() == 0
        logged = [
            json.loads(line)
            for line in proc.output_of_run().splitlines()
            if "delivery failed, will retry" in line
        ]
        assert logged, proc.tail()
        assert all(reason in line["error"].lower() for line in logged), logged


async def test_a_receiver_that_requires_a_client_certificate_is_retried_not_delivered(
    tmp_path: Path, pki: Pki
) -> None:
    """mTLS: the service has no setting for a client certificate. The batch must
    stay pending and be retried, never recorded delivered, nor failed. (Its
    last_error says only "Server disconnected without sending a response":
    under TLS 1.3 the receiver's alert does not reach the client's error.)"""
    cert, key = pki.issue("receiver")
    async with (
        receiving(TlsReceiver(server_context(cert, key, client_ca=pki.ca))) as receiver,
        httpx.AsyncClient(timeout=10) as client,
    ):
        sink = f"https://127.0.0.1:{receiver.port}/hook"
        async with service(tmp_path, sink, pki.ca) as proc:
            [batch_id] = await commit(client, proc.url)
            shown = await retried(client, proc.url, batch_id, times=3)
            assert receiver.received == []
            assert any("CERTIFICATE" in h for h in receiver.handshakes_failed), receiver
            assert shown["status"] == "pending", shown
            assert await proc.terminate() == 0


async def timed_out_without_holding(
    client: httpx.AsyncClient,
    proc: ServerProcess,
    ids: list[str],
    *,
    times: int,
    within: float,
    stop: float,
) -> None:
    """Each batch of `ids` attempted `times` times within `within` s in all, each
    attempt ended "timed out"; the service answers meanwhile, and SIGTERM stops
    it cleanly within `stop` s."""
    started = trio.current_time()
    for batch_id in ids:
        shown = await retried(client, proc.url, batch_id, times=times, within=within)
        assert "timed out" in shown["last_error"], shown
    assert trio.current_time() - started < within
    with trio.fail_after(2):
        assert (await client.get(f"{proc.url}/healthz")).status_code == 200
    began = trio.current_time()
    assert await proc.terminate(within=2 * stop) == 0
    assert trio.current_time() - began < stop


async def test_a_tls_handshake_that_never_ends_is_bounded_by_the_sink_timeout(
    tmp_path: Path,
) -> None:
    """A receiver that takes the TCP connection and never answers the
    ClientHello: each attempt ends within sink_timeout and is retried, several
    batches at once do not hold the service, and SIGTERM stops it promptly."""
    async with (
        receiving(TlsReceiver(None, stall=True)) as receiver,
        httpx.AsyncClient(timeout=10) as client,
    ):
        sink = f"https://127.0.0.1:{receiver.port}/hook"
        async with service(
            tmp_path, sink, None, INGESTOR_BATCH_MAX_RECORDS="1", INGESTOR_SINK_TIMEOUT="1"
        ) as proc:
            ids = await commit(client, proc.url, tenants=6)
            assert len(ids) == 6
            # Six batches, four at a time, two attempts each of at most ~1 s plus
            # backoff under 1 s: a handshake left unbounded would take far longer.
            await timed_out_without_holding(client, proc, ids, times=2, within=15, stop=5)
        assert receiver.connections >= 12


@pytest.mark.parametrize(
    ("scheme", "ca_file"), [("https", "missing"), ("https", "not_pem"), ("http", "missing")]
)
async def test_an_unusable_ssl_cert_file_is_said_clearly(
    tmp_path: Path, pki: Pki, scheme: str, ca_file: str
) -> None:
    """SSL_CERT_FILE naming a file that is not there (a typo, a volume not yet
    mounted) or that holds no certificate: README "Configuration" promises a
    wrong setting stops the start with one line naming it; if the service
    starts anyway, each delivery must fail with a reason that names the CA
    file, and be retried. A plain http:// sink needs no CA at all."""
    cert, key = pki.issue("receiver")
    ca = tmp_path / "no-such-ca.pem"
    if ca_file == "not_pem":
        ca.write_text("this is not a certificate\n")
    async with (
        receiving(TlsReceiver(server_context(cert, key))) as receiver,
        httpx.AsyncClient(timeout=10) as client,
    ):
        sink = f"{scheme}://127.0.0.1:{receiver.port}/hook"
        proc = service(tmp_path, sink, ca)
        try:
            try:
                await proc.start()
            except AssertionError:
                output = proc.output_of_run()
                assert "Traceback" not in output, output
                lines = [line for line in output.splitlines() if line.strip()]
                assert lines, output
                assert "no-such-ca.pem" in lines[-1], output
                return
            [batch_id] = await commit(client, proc.url)
            if scheme == "http":  # the receiver speaks TLS: a plain POST is never answered
                shown = await retried(client, proc.url, batch_id, times=1)
                return
            shown = await retried(client, proc.url, batch_id, times=2)
            assert "no-such-ca.pem" in shown["last_error"], shown
            assert receiver.received == []
        finally:
            await proc.aclose()


# == NATS ======================================================================


class NatsTls:
    """A private nats-server with JetStream, TLS and credentials, from a config
    file the test rewrites and reloads (SIGHUP) as an operator would."""

    def __init__(self, home: Path) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = home / "nats.conf"
        self.log = home / "nats.log"
        self.process: subprocess.Popen[bytes] | None = None

    def write(
        self,
        *,
        cert: tuple[Path, Path] | None,
        auth: str = "",
        verify: bool = False,
        ca: Path | None = None,
    ) -> None:
        tls = ""
        if cert is not None:
            extra = f'\n  ca_file: "{ca}"\n  verify: true' if verify else ""
            files = f'cert_file: "{cert[0]}"\n  key_file: "{cert[1]}"'
            tls = f"tls {{\n  {files}\n  timeout: 2{extra}\n}}"
        self.config.write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            f'jetstream {{ store_dir: "{self.home / "js"}" }}\n'
            f"{tls}\n{auth}\n"
        )

    def start(self) -> None:
        self.process = start_nats_server(
            ["nats-server", "-c", str(self.config)], self.port, self.log
        )

    def reload(self) -> None:
        assert self.process is not None
        before = self.log.read_text().count("Reloaded")
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while self.log.read_text().count("Reloaded") <= before:
            assert time.monotonic() < deadline, self.log.read_text()[-2000:]
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def nats_tls(tmp_path: Path) -> Iterator[NatsTls]:
    need_nats_server()
    server = NatsTls(tmp_path / "nats")
    yield server
    server.stop()


def password_auth(password: str) -> str:
    return f'authorization {{ user: {NATS_USER}, password: "{password}" }}'


async def stream_messages(
    port: int, stream: str, ca: Path | None, auth: str = f"{NATS_USER}:{NATS_PASSWORD}"
) -> list[tuple[str, bytes, str | None]]:
    """(subject, data, Nats-Msg-Id) of every message on `stream`, over TLS if `ca`."""
    return await read_stream(f"nats://{auth}@127.0.0.1:{port}", stream, ca=ca)


def nats_env(stream: str) -> dict[str, str]:
    return {"INGESTOR_NATS_STREAM": stream, "INGESTOR_NATS_SUBJECT": "tlsbill.{date}"}


async def test_nats_over_tls_with_a_password_delivers_each_batch_once(
    tmp_path: Path, pki: Pki, nats_tls: NatsTls
) -> None:
    """A nats:// URL to a server that requires TLS, the private CA in
    SSL_CERT_FILE, user and password: each batch once on the stream, and the
    password nowhere in the log or the service's answers."""
    nats_tls.write(cert=pki.issue("nats"), auth=password_auth(NATS_PASSWORD))
    nats_tls.start()
    sink = f"nats://{NATS_USER}:{NATS_PASSWORD}@127.0.0.1:{nats_tls.port}"
    async with (
        httpx.AsyncClient(timeout=10) as client,
        service(tmp_path, sink, pki.ca, **nats_env("TLSBILL")) as proc,
    ):
        ids = await commit(client, proc.url, tenants=3)
        await delivered(client, proc.url, ids)
        found = await stream_messages(nats_tls.port, "TLSBILL", pki.ca)
        assert sorted(msg_id or "" for _, _, msg_id in found) == sorted(ids)
        outputs = await public_outputs(client, proc.url)
        assert showing(outputs, NATS_PASSWORD, SIGNING_SECRET) == []
        assert await proc.terminate() == 0
    assert showing(proc.output, NATS_PASSWORD, SIGNING_SECRET) == []


async def test_a_tls_scheme_nats_url_is_refused_in_one_line_saying_why(
    tmp_path: Path, pki: Pki
) -> None:
    """`tls://host:4222` tells NATS's Go client to speak TLS whatever the server
    announces. nats-py takes the scheme and does not: it sends the password
    in clear text to a server (or an interloper) that does not ask for TLS.
    The service refuses such a URL at start, in one line that says what to
    write instead, and shows no password."""
    sink = f"tls://{NATS_USER}:{NATS_PASSWORD}@127.0.0.1:{free_port()}"
    proc = service(tmp_path, sink, pki.ca, **nats_env("TLSSCHEME"))
    with pytest.raises(AssertionError):
        await proc.start()
    output = proc.output_of_run()
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "sink: tls:// URLs are not taken" in lines[0], output
    assert "Use nats://" in lines[0], output
    assert NATS_PASSWORD not in output
    await proc.aclose()


async def test_a_nats_server_with_an_untrusted_certificate_is_retried_then_delivered(
    tmp_path: Path, pki: Pki, nats_tls: NatsTls
) -> None:
    """The server's certificate is signed by a CA the service does not trust:
    retried, last_error says certificate; the operator installs a good one and
    reloads the server: delivered once, no restart of the service."""
    nats_tls.write(
        cert=Pki(tmp_path / "rogue", "rogue").issue("nats"), auth=password_auth(NATS_PASSWORD)
    )
    nats_tls.start()
    sink = f"nats://{NATS_USER}:{NATS_PASSWORD}@127.0.0.1:{nats_tls.port}"
    async with (
        httpx.AsyncClient(timeout=10) as client,
        service(tmp_path, sink, pki.ca, **nats_env("TLSFIX")) as proc,
    ):
        [batch_id] = await commit(client, proc.url)
        shown = await retried(client, proc.url, batch_id, times=2)
        assert "certificate verify failed" in shown["last_error"], shown
        nats_tls.write(cert=pki.issue("nats"), auth=password_auth(NATS_PASSWORD))
        nats_tls.reload()
        await delivered(client, proc.url, [batch_id])
        found = await stream_messages(nats_tls.port, "TLSFIX", pki.ca)
        assert [msg_id for _, _, msg_id in found] == [batch_id]
        assert await proc.terminate() == 0
    assert showing(proc.output, NATS_PASSWORD) == []


async def test_a_wrong_nats_password_is_retried_said_and_delivered_once_fixed(
    tmp_path: Path, pki: Pki, nats_tls: NatsTls
) -> None:
    """Over TLS, the service's password is not the server's: retried, last_error
    says authorization, no password anywhere; the operator fixes the server's
    config and reloads it (SIGHUP): delivered once."""
    nats_tls.write(cert=pki.issue("nats"), auth=password_auth(NATS_PASSWORD))
    nats_tls.start()
    sink = f"nats://{NATS_USER}:{NATS_WRONG}@127.0.0.1:{nats_tls.port}"
    async with (
        httpx.AsyncClient(timeout=10) as client,
        service(tmp_path, sink, pki.ca, **nats_env("TLSAUTH")) as proc,
    ):
        ids = await commit(client, proc.url, tenants=2)
        for batch_id in ids:
            try:
                shown = await retried(client, proc.url, batch_id, times=2)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{stacks(proc)}{proc.tail(30)}") from None
            assert "authorization" in shown["last_error"].lower(), (shown, proc.tail(15))
        outputs = await public_outputs(client, proc.url)
        assert showing(outputs, NATS_PASSWORD, NATS_WRONG, SIGNING_SECRET) == []
        nats_tls.write(cert=pki.issue("nats2"), auth=password_auth(NATS_WRONG))
        nats_tls.reload()
        await delivered(client, proc.url, ids)
        await trio.sleep(1.5)
        found = await stream_messages(
            nats_tls.port, "TLSAUTH", pki.ca, auth=f"{NATS_USER}:{NATS_WRONG}"
        )
        assert sorted(msg_id or "" for _, _, msg_id in found) == sorted(ids)
        assert await proc.terminate() == 0
    assert showing(proc.output, NATS_PASSWORD, NATS_WRONG, SIGNING_SECRET) == []


async def test_a_password_rotated_on_the_server_under_a_connected_service(
    tmp_path: Path, pki: Pki, nats_tls: NatsTls
) -> None:
    """Connected and delivering; the server's password changes (reload): the
    next batch is retried with authorization in last_error, not recorded
    delivered; the old password back: delivered once."""
    nats_tls.write(cert=pki.issue("nats"), auth=password_auth(NATS_PASSWORD))
    nats_tls.start()
    sink = f"nats://{NATS_USER}:{NATS_PASSWORD}@127.0.0.1:{nats_tls.port}"
    async with (
        httpx.AsyncClient(timeout=10) as client,
        service(tmp_path, sink, pki.ca, **nats_env("TLSROT")) as proc,
    ):
        first = await commit(client, proc.url)
        await delivered(client, proc.url, first)
        nats_tls.write(cert=pki.issue("nats"), auth=password_auth(NATS_WRONG))
        nats_tls.reload()
        pulse = {**PULSE, "tenant_id": "late", "id": "late"}
        assert (await client.post(f"{proc.url}/pulses", json=pulse)).status_code == 202
        day = (await batch(client, proc.url, first[0]))["date"]
        answer = await client.post(f"{proc.url}/aggregates/commit", json={"date": day})
        [second] = [b["batch_id"] for b in answer.json()["batches"]]
        shown = await retried(client, proc.url, second, times=2)
        assert "authorization" in shown["last_error"].lower(), shown
        nats_tls.write(cert=pki.issue("nats"), auth=password_auth(NATS_PASSWORD))
        nats_tls.reload()
        await delivered(client, proc.url, [second])
        await trio.sleep(1.5)
        found = await stream_messages(nats_tls.port, "TLSROT", pki.ca)
        assert sorted(msg_id or "" for _, _, msg_id in found) == sorted([*first, second])
        assert await proc.terminate() == 0
    assert showing(proc.output, NATS_PASSWORD, NATS_WRONG) == []


async def test_nats_token_auth_over_tls_delivers_and_hides_the_token(
    tmp_path: Path, pki: Pki, nats_tls: NatsTls
) -> None:
    nats_tls.write(cert=pki.issue("nats"), auth=f'authorization {{ token: "{NATS_TOKEN}" }}')
    nats_tls.start()
    sink = f"nats://{NATS_TOKEN}@127.0.0.1:{nats_tls.port}"
    async with (
        httpx.AsyncClient(timeout=10) as client,
        service(tmp_path, sink, pki.ca, **nats_env("TLSTOKEN")) as proc,
    ):
        ids = await commit(client, proc.url, tenants=2)
        await delivered(client, proc.url, ids)
        found = await stream_messages(nats_tls.port, "TLSTOKEN", pki.ca, auth=NATS_TOKEN)
        assert sorted(msg_id or "" for _, _, msg_id in found) == sorted(ids)
        outputs = await public_outputs(client, proc.url)
        assert showing(outputs, NATS_TOKEN) == []
        assert await proc.terminate() == 0
    assert showing(proc.output, NATS_TOKEN) == []


async def test_a_nats_server_that_requires_a_client_certificate_is_retried_and_said(
    tmp_path: Path, pki: Pki, nats_tls: NatsTls
) -> None:
    """`tls { verify: true }`: the service has no client certificate to give.
    Retried, never delivered, and last_error must say what is wrong (a
    certificate), not only that connecting timed out."""
    nats_tls.write(
        cert=pki.issue("nats"), auth=password_auth(NATS_PASSWORD), verify=True, ca=pki.ca
    )
    nats_tls.start()
    sink = f"nats://{NATS_USER}:{NATS_PASSWORD}@127.0.0.1:{nats_tls.port}"
    async with (
        httpx.AsyncClient(timeout=10) as client,
        service(tmp_path, sink, pki.ca, **nats_env("TLSMTLS")) as proc,
    ):
        [batch_id] = await commit(client, proc.url)
        shown = await retried(client, proc.url, batch_id, times=2)
        assert "certificate" in shown["last_error"].lower(), shown
        assert await proc.terminate() == 0


async def test_a_nats_tls_handshake_that_never_ends_is_bounded(tmp_path: Path) -> None:
    """A "server" that announces tls_required in its INFO and then never answers
    the ClientHello: each attempt ends within the sink timeout, retried; the
    service answers and stops promptly."""
    info = json.dumps(
        {
            "server_id": "STALL",
            "version": "2.9.10",
            "proto": 1,
            "host": "127.0.0.1",
            "port": 4222,
            "max_payload": 1048576,
            "tls_required": True,
            "headers": True,
        }
    )
    connections = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        async with stream:
            await stream.send_all(f"INFO {info}\r\n".encode())
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        sink = f"nats://{NATS_USER}:{NATS_PASSWORD}@127.0.0.1:{port}"
        async with (
            httpx.AsyncClient(timeout=10) as client,
            service(tmp_path, sink, None, **nats_env("TLSSTALL")) as proc,
        ):
            ids = await commit(client, proc.url, tenants=2)
            await timed_out_without_holding(client, proc, ids, times=3, within=20, stop=8)
        nursery.cancel_scope.cancel()
    assert connections >= 3
    assert showing(proc.output, NATS_PASSWORD) == []
