"""The shipped reverse proxy, deploy/nginx.conf, in front of two replicas on one PostgreSQL.

docker-compose.yml's `cluster` profile puts nginx before two instances that
share a database. Each test runs a private nginx (in the foreground, on a
free port of 127.0.0.1) whose configuration is deploy/nginx.conf with only
its addresses changed: the upstream servers to real instances, the listen
port, logs and temporary files to a directory of the test's own. So what is
tested is what ships; a test fails at once, saying so, if the file no longer
has what it substitutes. The instances have an admin key: in containers they
bind 0.0.0.0 and need keys, and nginx names its upstream group as the host.

1. A rolling restart as an orchestrator runs it (the next replica stopped
   as soon as the previous one is ready): the replica back is used at once.
2. The same under steady load, clients with ids retrying (honouring
   Retry-After) and clients without: every POST answered 2xx or 503 with
   Retry-After (a stopping replica says `Connection: close` on each answer,
   so nginx sends nothing more on a connection it is closing), every
   acknowledged pulse counted once.
3. A replica frozen past nginx's read timeout: a POST that timed out on it
   is never given to the other replica as well (counted twice).
4. Bodies at max_body_bytes pass nginx, sized or chunked; one byte more is
   refused with the API's JSON error, not nginx's HTML page.
5. The X-Request-Id a client sends is the one it gets back.
6. nginx's own errors (a long header line, no replica answering, none
   reachable) are the API's JSON errors, with Retry-After where the
   request is to be sent again.

nginx is Debian's `nginx-light` (/usr/sbin/nginx); without it the tests skip,
or fail when the CI variable is set, as without PostgreSQL.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import pytest
import trio

from ingestor.auth import new_key
from tests.e2e.cluster_support import (
    alive,
    child_pids,
    fresh_database,
    frozen,
    require_postgres,
    unavailable,
)
from tests.e2e.conftest import ABORTED_UPLOADS, StartServer
from tests.support.server import (
    BucketKey,
    Ledger,
    Payload,
    ServerProcess,
    Total,
    check_pulses_stored_once,
    collect_pages,
    free_port,
    post_until_stored,
    send_pulses,
    totals_of,
    wait_until,
)

pytestmark = [pytest.mark.e2e, *ABORTED_UPLOADS]

SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "nginx.conf"
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
# What the access log says of each request: enough to tell which replica
# answered, and whether nginx tried more than one.
LOG_FORMAT = (
    "$msec $request_method $uri $status [$upstream_addr] [$upstream_status]"
    " $request_time $request_length $request_id"
)


# -- nginx, configured as shipped ---------------------------------------------------


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (path for path in NGINX_CANDIDATES if os.access(path, os.X_OK)), None
    )
    if found is None:
        unavailable("nginx is not installed (Debian: apt-get install nginx-light)")
    return found


def _substitute(text: str, pattern: str, replacement: str, what: str) -> str:
    changed, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert count == 1, (
        f"deploy/nginx.conf no longer has {what} (/{pattern}/ matched {count} times):"
        " the reverse-proxy tests cannot run it as shipped; update their substitutions"
    )
    return changed


def derived_config(
    shipped: str, upstreams: Sequence[int], port: int, run_dir: Path, **changes: str
) -> str:
    """deploy/nginx.conf with its replicas on 127.0.0.1:`upstreams`, listening on
    127.0.0.1:`port`, its logs and temporary files under `run_dir`.

    `changes` replaces a directive of the location by name (`proxy_read_timeout`
    = "5s"), for a test that needs to reach a limit sooner; each must exist.
    """
    text = shipped
    for name, upstream in zip(("replica-a", "replica-b"), upstreams, strict=True):
        text = _substitute(
            text,
            rf"^(\s*server\s+){name}:8081(\s)",
            rf"\g<1>127.0.0.1:{upstream}\g<2>",
            f"the upstream `server {name}:8081`",
        )
    text = _substitute(text, r"^(\s*listen\s+)8082;", rf"\g<1>127.0.0.1:{port};", "`listen 8082;`")
    paths = "\n".join(
        [
            f"    log_format probe '{LOG_FORMAT}';",
            f"    access_log {run_dir}/access.log probe;",
            *(
                f"    {kind}_temp_path {run_dir}/{kind}_temp;"
                for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            ),
        ]
    )
    text = _substitute(text, r"^http \{$", "http {\n" + paths, "the `http {` block")
    for name, value in changes.items():
        text = _substitute(
            text, rf"^(\s*{name}\s+)[^;]*;", rf"\g<1>{value};", f"the directive `{name}`"
        )
    return text


@dataclass
class Logged:
    """One line of the access log."""

    msec: float
    method: str
    uri: str
    status: int
    upstreams: list[str]
    upstream_statuses: list[str]
    request_id: str


class Balancer:
    """A private nginx in the foreground (no daemon), on a free port of 127.0.0.1."""

    def __init__(self, upstreams: Sequence[ServerProcess], **changes: str) -> None:
        self.binary = nginx_binary()
        # nginx's workers run as `nobody` when started by root: they must be
        # able to reach the temporary files, so not under pytest's private tmp.
        self.run_dir = Path(tempfile.mkdtemp(prefix="ingestor-nginx-"))
        self.run_dir.chmod(0o755)
        self.port = free_port()
        self.config_path = self.run_dir / "nginx.conf"
        try:
            ports = [server.port for server in upstreams]
            text = derived_config(SHIPPED.read_text(), ports, self.port, self.run_dir, **changes)
        except BaseException:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        self.config_path.write_text(text)
        self._process: trio.Process | None = None

    @property
    def process(self) -> trio.Process:
        assert self._process is not None, "nginx was never started"
        return self._process

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        directives = (
            f"daemon off; pid {self.run_dir}/nginx.pid; error_log {self.run_dir}/error.log info;"
        )
        return [self.binary, "-p", str(self.run_dir), "-c", str(self.config_path), "-g", directives]

    def error_log(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.run_dir / "error.log").read_text(errors="replace")
        return ""

    def access_log(self) -> list[Logged]:
        found = []
        with contextlib.suppress(FileNotFoundError):
            for line in (self.run_dir / "access.log").read_text().splitlines():
                match = re.fullmatch(
                    r"(\S+) (\S+) (\S+) (\d+) \[(.*?)\] \[(.*?)\] \S+ \d+ (\S+)", line
                )
                assert match, f"access log line not understood: {line!r}"
                msec, method, uri, status, addrs, statuses, request_id = match.groups()
                found.append(
                    Logged(
                        float(msec),
                        method,
                        uri,
                        int(status),
                        [a.strip() for a in re.split(r"[,:] ", addrs) if a.strip() != "-"],
                        [s.strip() for s in re.split(r"[,:] ", statuses) if s.strip() != "-"],
                        request_id,
                    )
                )
        return found

    def _output(self) -> BinaryIO:
        return open(self.run_dir / "output.log", "ab")  # closed by `start`

    async def start(self) -> None:
        with self._output() as output:
            self._process = await trio.lowlevel.open_process(
                self.command(), stdin=subprocess.DEVNULL, stdout=output, stderr=output
            )

        async def listening() -> bool:
            assert self._process is not None
            if self._process.poll() is not None:
                raise AssertionError(
                    f"nginx exited with {self._process.returncode}:"
                    f" {(self.run_dir / 'output.log').read_text()}{self.error_log()}"
                )
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            except OSError:
                return False
            await stream.aclose()
            return True

        await wait_until(listening, within=15, what="nginx listening")

    async def aclose(self) -> None:
        """Stop nginx (SIGTERM, then SIGKILL of it and its workers) and remove its files."""
        with trio.CancelScope(shield=True):
            process = self._process
            if process is not None and process.poll() is None:
                workers = child_pids(process.pid)
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await process.wait()
                if process.poll() is None:
                    process.kill()
                    await process.wait()
                for pid in workers:
                    if alive(pid):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
            shutil.rmtree(self.run_dir, ignore_errors=True)


# -- fixtures -----------------------------------------------------------------------


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A database of the test's own (skipped without PostgreSQL, failed under CI)."""
    with fresh_database(require_postgres()) as url:
        yield url


@dataclass
class Deployment:
    """Two replicas on one database, nginx in front, and the key clients send."""

    replicas: list[ServerProcess]
    balancer: Balancer
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(headers=self.headers, **{"timeout": 90.0, **kwargs})


@contextlib.asynccontextmanager
async def deployment(
    start_server: StartServer, postgres_url: str, **changes: str
) -> AsyncIterator[Deployment]:
    key, table = new_key("admin", ["*"])
    replicas = [await start_server(config=table, INGESTOR_STORE=postgres_url) for _ in range(2)]
    balancer = Balancer(replicas, **changes)
    try:
        await balancer.start()
        yield Deployment(replicas, balancer, key)
    finally:
        await balancer.aclose()


# -- pulses -------------------------------------------------------------------------


def day_before(days: int) -> str:
    return (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=days)).isoformat()


def pulse(rng: random.Random, tenant: str, pulse_id: str | None, day: str) -> dict[str, Any]:
    midnight = dt.datetime.combine(dt.date.fromisoformat(day), dt.time(), dt.UTC)
    moment = midnight + dt.timedelta(microseconds=rng.randrange(86_400 * 10**6))
    made: dict[str, Any] = {
        "tenant_id": tenant,
        "product_sku": rng.choice(("sku-basic", "sku-pro")),
        "use_unit": "api_call",
        "used_amount": f"{Decimal(rng.randint(1, 10**9)).scaleb(-rng.randint(0, 9)):f}",
        "timestamp": moment.isoformat().replace("+00:00", "Z"),
    }
    if pulse_id is not None:
        made["id"] = pulse_id
    return made


@dataclass
class Seen:
    """What clients were answered, request by request, while they sent."""

    statuses: Counter[str] = field(default_factory=Counter)
    without_retry_after: list[str] = field(default_factory=list)

    def saw(self, response: httpx.Response | None, error: str | None) -> None:
        if response is None:
            self.statuses[f"no answer ({(error or '').split(':')[0]})"] += 1
            return
        self.statuses[str(response.status_code)] += 1
        if response.status_code == 503 and "retry-after" not in response.headers:
            self.without_retry_after.append(response.text[:200])


def retry_after(response: httpx.Response | None) -> float:
    if response is None:
        return 0.2
    try:
        return min(float(response.headers.get("retry-after", "0.2")), 10.0)
    except ValueError:
        return 0.2


# -- load ---------------------------------------------------------------------------


@dataclass
class Load:
    """Clients posting through nginx until `stop`: those with ids send again what
    failed, with the same ids, honouring Retry-After; those without ids cannot
    retry safely and send each request once."""

    url: str
    rng: random.Random = field(default_factory=lambda: random.Random(20261207))
    day: str = field(default_factory=lambda: day_before(1))
    with_ids: Ledger = field(default_factory=Ledger)
    without_ids: Ledger = field(default_factory=Ledger)
    seen: Seen = field(default_factory=Seen)
    stop: trio.Event = field(default_factory=trio.Event)
    numbers: Iterator[int] = field(default_factory=itertools.count)

    async def client_with_ids(self, number: int, http: httpx.AsyncClient) -> None:
        while not self.stop.is_set():
            left: list[Payload] = [
                pulse(self.rng, f"id-tenant-{number}", f"p-{number}-{next(self.numbers)}", self.day)
                for _ in range(self.rng.randint(1, 4))
            ]
            while left:
                sent = await send_pulses(http, self.url, self.with_ids, left)
                self.seen.saw(sent.response, sent.error)
                left = [a.payload for a in sent.attempts if a.needs_retry]
                if left:
                    await trio.sleep(retry_after(sent.response))
            await trio.sleep(0.005)

    async def client_without_ids(self, number: int, http: httpx.AsyncClient) -> None:
        while not self.stop.is_set():
            payloads = [
                pulse(self.rng, f"anon-tenant-{number}", None, self.day)
                for _ in range(self.rng.randint(1, 4))
            ]
            sent = await send_pulses(http, self.url, self.without_ids, payloads)
            self.seen.saw(sent.response, sent.error)
            await trio.sleep(0.005)

    def start(self, nursery: trio.Nursery, http: httpx.AsyncClient, clients: int = 4) -> None:
        for number in range(clients):
            nursery.start_soon(self.client_with_ids, number, http)
            nursery.start_soon(self.client_without_ids, number, http)

    async def held(self, deployed: Deployment) -> dict[BucketKey, Total]:
        """The totals the store holds, by bucket."""
        async with deployed.client() as http:
            replica = next(r for r in deployed.replicas if r.running)
            rows = await collect_pages(http, f"{replica.url}/aggregates", "aggregates", limit=1000)
        return totals_of(rows)

    async def audit(self, deployed: Deployment) -> None:
        """Every acknowledged pulse counted once: those with ids exactly, once their
        clients have sent again whatever they were left not knowing; those without
        ids at least as acknowledged, and at most that plus the unanswered."""
        assert self.with_ids.problems() == []
        async with deployed.client() as http:
            unresolved = [a.payload for a in self.with_ids.unresolved()]
            if unresolved:
                await post_until_stored(http, deployed.balancer.url, self.with_ids, unresolved)
            replica = next(r for r in deployed.replicas if r.running)
            rows = await collect_pages(http, f"{replica.url}/aggregates", "aggregates", limit=1000)
            await check_pulses_stored_once(http, replica, self.with_ids)
        held = totals_of(rows)
        assert self.with_ids.problems() == []
        assert {k: v for k, v in held.items() if k[0].startswith("id-")} == (
            self.with_ids.expected_totals()
        ), "a pulse with an id acknowledged through nginx was lost, or counted twice"
        anon_held = sum(v.count for k, v in held.items() if k[0].startswith("anon-"))
        acknowledged = sum(v.count for v in self.without_ids.expected_totals().values())
        unknown = len(self.without_ids.unresolved())
        assert acknowledged <= anon_held <= acknowledged + unknown, (
            f"pulses without ids: {acknowledged} acknowledged, {unknown} unanswered,"
            f" {anon_held} counted: acknowledged usage lost, or usage counted twice"
        )


def passed_on_after_sending(logged: Sequence[Logged]) -> list[Logged]:
    """POSTs nginx gave to a second replica after the first had been sent them
    (anything but a refused connection, which nginx logs as 502 before sending)."""
    return [
        line
        for line in logged
        if line.method == "POST"
        and len(line.upstreams) > 1
        and any(status != "502" for status in line.upstream_statuses[:-1])
    ]


def failures_window(logged: Sequence[Logged], codes: frozenset[int]) -> str:
    times = [line.msec for line in logged if line.status in codes]
    if not times:
        return "none"
    return f"{len(times)} over {max(times) - min(times):.2f} s"


# -- the tests ----------------------------------------------------------------------


async def test_a_replica_back_from_a_restart_takes_requests_as_soon_as_it_is_ready(
    start_server: StartServer, postgres_url: str
) -> None:
    """A rolling restart as an orchestrator runs it: stop replica A, start it
    again, and as soon as its /readyz says 200, stop B. nginx marks A down
    once its connections are refused (`max_fails=3 fail_timeout=5s`) and
    keeps it out for the whole `fail_timeout` after it is back: with B gone
    too, nginx has no replica and answers every POST 502 for seconds, though
    A is up and ready. A 502 leaves a client without ids unable to tell
    whether its usage was counted, and one with ids retrying into an outage
    that is not there."""
    rng = random.Random(7)
    day = day_before(1)
    ledger = Ledger()
    async with deployment(start_server, postgres_url) as deployed:
        first, second = deployed.replicas
        url = deployed.balancer.url
        statuses: Counter[int] = Counter()
        async with deployed.client() as http:

            async def post(number: int) -> None:
                sent = await send_pulses(
                    http, url, ledger, [pulse(rng, "acme", f"restart-{number}", day)], "single"
                )
                assert sent.response is not None, sent.error
                statuses[sent.response.status_code] += 1

            numbers = itertools.count()
            await post(next(numbers))
            assert await first.terminate() == 0, first.tail()
            for _ in range(10):  # A refuses them; nginx sends each on to B
                await post(next(numbers))
            assert statuses == {202: 11}, f"with A stopped, B alone: {dict(statuses)}"
            await first.start()  # back, and ready
            assert await second.terminate() == 0, second.tail()
            statuses.clear()
            for _ in range(10):
                await post(next(numbers))
        logged = deployed.balancer.access_log()
        assert statuses == {202: 10}, (
            f"with A back and ready and B stopped, POSTs through nginx were answered"
            f" {dict(statuses)} (nginx's 502s: {failures_window(logged, frozenset({502}))};"
            f" its error log: {no_live_upstreams(deployed.balancer)} x 'no live upstreams')"
        )
        async with deployed.client() as http:
            rows = await collect_pages(http, f"{first.url}/aggregates", "aggregates", limit=1000)
        assert totals_of(rows) == ledger.expected_totals()


def no_live_upstreams(balancer: Balancer) -> int:
    return balancer.error_log().count("no live upstreams")


async def test_a_rolling_restart_under_load_answers_posts_stored_or_retry_and_counts_pulses_once(
    start_server: StartServer, postgres_url: str
) -> None:
    """Clients post through nginx while replica A is stopped (SIGTERM) and
    started again on the same database, then B, each as soon as the other is
    ready. Half the clients send ids and retry what failed with the same ids,
    honouring Retry-After; the others send without ids and cannot retry
    safely. A rolling restart is how releases roll out and keys are revoked:
    a user must be able to run one under load without a client losing usage,
    billing it twice, or being told anything but "stored" (2xx) or "not
    stored, try again" (503 + Retry-After). A 502 or 504 to a POST leaves a
    client without ids unable to tell whether its usage was counted.

    One 502 HTTP/1.1 leaves (README, behind a proxy): nginx sending a POST
    on an idle keep-alive connection just as the stopping replica closes
    it. The replica never read such a POST: each 502 must be one nginx
    logged so, and nothing a client without ids was answered 502 for may
    have been counted."""
    async with deployment(start_server, postgres_url) as deployed:
        load = Load(deployed.balancer.url)
        async with deployed.client() as http, trio.open_nursery() as nursery:
            load.start(nursery, http)
            await trio.sleep(1.0)
            for replica in deployed.replicas:
                assert await replica.terminate() == 0, replica.tail()
                await replica.start()
            await trio.sleep(1.0)
            load.stop.set()
        logged = deployed.balancer.access_log()
        assert passed_on_after_sending(logged) == []
        await load.audit(deployed)
        assert load.seen.without_retry_after == [], "a 503 reached a client without Retry-After"
        closed = upstream_closed(deployed.balancer)
        unexpected = {s: n for s, n in load.seen.statuses.items() if s not in ("202", "503", "502")}
        described = (
            f"during a rolling restart clients were answered {dict(load.seen.statuses)};"
            f" nginx's 502s: {failures_window(logged, frozenset({502}))}, 504s:"
            f" {failures_window(logged, frozenset({504}))}; its error log:"
            f" {no_live_upstreams(deployed.balancer)} x 'no live upstreams',"
            f" {closed} x a replica closing a connection nginx had just sent a POST on"
        )
        assert unexpected == {}, described
        assert load.seen.statuses.get("502", 0) <= closed, described
        held = await load.held(deployed)
        counted = sum(v.count for k, v in held.items() if k[0].startswith("anon-"))
        acknowledged = sum(v.count for v in load.without_ids.expected_totals().values())
        assert counted == acknowledged, (
            f"{counted} pulses without ids counted, {acknowledged} acknowledged: a POST answered"
            f" 502 was stored after all; {described}"
        )


def upstream_closed(balancer: Balancer) -> int:
    text = balancer.error_log()
    return text.count("prematurely closed connection while reading response header") + (
        text.count("Connection reset by peer) while reading response header")
    )


async def test_a_post_that_times_out_on_a_frozen_replica_is_never_sent_to_the_other(
    start_server: StartServer, postgres_url: str
) -> None:
    """Replica A is frozen (SIGSTOP: a paused container or VM) while clients
    post through nginx, for longer than nginx waits for an answer. The
    shipped `proxy_next_upstream error timeout` must not pass a POST that
    timed out on A to B: A holds it and stores it when it thaws, so B would
    count it a second time, and a pulse without an id twice is a customer
    billed twice. The wait is shortened to 3 s (`proxy_read_timeout`, 60 s as
    shipped) so that the test reaches it; nothing else is changed."""
    async with deployment(start_server, postgres_url, proxy_read_timeout="3s") as deployed:
        load = Load(deployed.balancer.url)
        first = deployed.replicas[0]
        assert first.pid is not None
        async with deployed.client() as http, trio.open_nursery() as nursery:
            load.start(nursery, http)
            await trio.sleep(1.0)
            with frozen(first.pid):
                await trio.sleep(6.0)
            await trio.sleep(1.0)
            load.stop.set()
        logged = deployed.balancer.access_log()
        timed_out = [line for line in logged if "504" in line.upstream_statuses]
        assert timed_out, f"no POST timed out on the frozen replica: {dict(load.seen.statuses)}"
        assert passed_on_after_sending(logged) == [], "a POST was sent to both replicas"
        await load.audit(deployed)


def pulses_body(size: int, rng: random.Random) -> bytes:
    """A JSON array of 1,000 valid pulses without ids, padded with spaces to `size` bytes."""
    day = day_before(1)
    head = b"[" + b",".join(json_bytes(pulse(rng, "bulk", None, day)) for _ in range(1000))
    assert len(head) + 1 <= size
    return head + b" " * (size - len(head) - 1) + b"]"


def json_bytes(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


MAX_BODY = 16 * 1024 * 1024  # max_body_bytes' default, and client_max_body_size 16m


async def test_a_body_of_max_body_bytes_passes_the_proxy_whether_sized_or_chunked(
    start_server: StartServer, postgres_url: str
) -> None:
    """A body of exactly max_body_bytes (16 MiB), which the server takes, must
    not be refused by nginx's `client_max_body_size 16m` (an off-by-one, or a
    limit counting headers, would refuse a batching client's largest
    requests: usage it then has to split or drop), neither with a
    Content-Length nor sent chunked, which nginx reads whole first."""
    body = pulses_body(MAX_BODY, random.Random(16))
    async with deployment(start_server, postgres_url) as deployed, deployed.client() as http:

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(body), 1 << 20):
                yield body[start : start + (1 << 20)]

        sized = await http.post(
            f"{deployed.balancer.url}/pulses",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        chunked = await http.post(
            f"{deployed.balancer.url}/pulses",
            content=chunks(),
            headers={"Content-Type": "application/json"},
        )
        for name, response in (("sized", sized), ("chunked", chunked)):
            assert response.status_code == 202, (name, response.status_code, response.text[:300])
            assert response.json()["accepted"] == 1000, (name, response.text[:300])
        rows = await collect_pages(
            http, f"{deployed.replicas[0].url}/aggregates", "aggregates", limit=1000
        )
        assert sum(row["pulse_count"] for row in rows) == 2000


async def test_a_body_past_max_body_bytes_is_refused_with_the_apis_json_error(
    start_server: StartServer, postgres_url: str
) -> None:
    """One byte past max_body_bytes, the server answers 413 with its JSON error
    (`body_too_large`), as every error of the API is (DESIGN §4: "never
    HTML"). Through nginx, `client_max_body_size 16m` answers first, with an
    HTML page: a client that reads the error's code to decide whether to
    split its batch (or to log why its usage was refused) cannot."""
    body = pulses_body(MAX_BODY + 1, random.Random(17))
    async with deployment(start_server, postgres_url) as deployed, deployed.client() as http:
        direct = await http.post(
            f"{deployed.replicas[0].url}/pulses",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        assert direct.status_code == 413, direct.text[:300]
        assert direct.json()["error"]["code"] == "body_too_large"
        proxied = await http.post(
            f"{deployed.balancer.url}/pulses",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        assert proxied.status_code == 413, proxied.text[:300]
        assert proxied.headers.get("content-type", "").startswith("application/json"), (
            f"nginx answered 413 with {proxied.headers.get('content-type')!r}:"
            f" {proxied.text[:200]!r}"
        )
        assert proxied.json()["error"]["code"] == "body_too_large"


async def test_the_request_id_a_client_sends_is_the_one_its_answer_and_the_logs_carry(
    start_server: StartServer, postgres_url: str
) -> None:
    """The server honours a client's X-Request-Id: it answers with it and its
    log lines carry it, so a client can find what happened to a request it
    billed. nginx's `proxy_set_header X-Request-Id $request_id` replaces it
    with an id of nginx's own: the client's id reaches no log, and the answer
    names an id the client never sent. nginx's own id is for requests that
    come without one."""
    async with deployment(start_server, postgres_url) as deployed, deployed.client() as http:
        given = "checkout-7f3a-0042"
        response = await http.post(
            f"{deployed.balancer.url}/pulses",
            json=pulse(random.Random(1), "acme", "rid-1", day_before(1)),
            headers={"X-Request-Id": given},
        )
        assert response.status_code == 202, response.text
        anonymous = await http.get(f"{deployed.balancer.url}/healthz")
        made = anonymous.headers.get("x-request-id", "")
        assert made, "a request without an id gets one"
        assert made != given
        assert response.headers.get("x-request-id") == given, (
            f"sent X-Request-Id {given!r}, answered {response.headers.get('x-request-id')!r}"
        )


def assert_json_error(response: httpx.Response, status: int, code: str, *, retry: bool) -> None:
    """`response` is the API's JSON error `code` with `status`, and says when to
    send again if `retry`."""
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers.get("content-type", "").startswith("application/json"), (
        f"nginx answered {status} with {response.headers.get('content-type')!r}:"
        f" {response.text[:200]!r}"
    )
    assert response.json()["error"]["code"] == code, response.text[:300]
    if retry:
        assert response.headers.get("retry-after") == "1", dict(response.headers)


async def test_the_proxys_own_errors_are_the_apis_json_and_say_when_to_send_again(
    start_server: StartServer, postgres_url: str
) -> None:
    """Every error of the API is JSON (DESIGN §4), and a client decides by its
    code: split a batch, fix a header, send again with the same ids. nginx
    answers some requests itself, with HTML pages as shipped before:
    - a header line over 8 KiB (its default buffer), which the replicas take
      up to max_header_bytes (16 KiB): 400 "Request Header Or Cookie Too
      Large", so a client with a long token could not send at all;
    - no replica answering within proxy_read_timeout: 504;
    - no replica reachable: 502.
    The last two give no Retry-After, though the request is to be sent
    again (and may have been stored: only pulses with ids are safe to)."""
    async with (
        deployment(start_server, postgres_url, proxy_read_timeout="1s") as deployed,
        deployed.client() as http,
    ):
        url = f"{deployed.balancer.url}/pulses"
        rng = random.Random(18)
        day = day_before(1)
        long_line = await http.post(
            url, json=pulse(rng, "acme", "h-1", day), headers={"X-Trace": "t" * 12 * 1024}
        )
        assert long_line.status_code == 202, long_line.text[:300]
        too_long = await http.post(
            url, json=pulse(rng, "acme", "h-2", day), headers={"X-Trace": "t" * 20 * 1024}
        )
        assert_json_error(too_long, 431, "headers_too_large", retry=False)

        pids = [replica.pid for replica in deployed.replicas]
        assert None not in pids
        with frozen(*(pid for pid in pids if pid is not None)):
            timed_out = await http.post(url, json=pulse(rng, "acme", "h-3", day))
        assert_json_error(timed_out, 504, "upstream_timeout", retry=True)

        for replica in deployed.replicas:
            await replica.kill()
        unreachable = await http.post(url, json=pulse(rng, "acme", "h-4", day))
        assert_json_error(unreachable, 502, "upstream_unavailable", retry=True)
