"""Several instances on one store (DESIGN §3, §5, §6; issue 5).

1. Three server processes share one PostgreSQL database and one NATS
   JetStream stream. Clients post to all of them at once, with overlapping
   tenants, the same ids sent to two or three instances at the same moment,
   replays and conflicting reuses of stored ids. One instance is SIGKILLed
   mid-load, with requests in flight (one of them cut in the middle of its
   body) and a commit of its own just sent; what it left unanswered is sent
   again to a survivor. The two survivors commit the same days at the same
   time, during the load and after it. Then the answers alone (`Ledger`) must
   predict the totals and the stored ids, each unit of usage must be in
   exactly one batch, and the stream must hold each batch once, as the store
   holds it.
2. With a one-second committer timer, exactly one instance leads the
   periodic commits; SIGKILL it and another takes over within seconds and
   commits the late pulses that arrive next as corrections.
3. `--workers 2` on SQLite: SIGKILL the worker holding a request in flight,
   the supervisor restarts it, totals stay exact, and SIGTERM ends the
   supervisor with 0 at once (an idle keep-alive connection must not hold it).

PostgreSQL and NATS are real servers (`bash .ci/services` starts them); the
tests skip without them, or fail when the CI variable is set. Every wait is
a poll with a deadline.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import os
import random
import signal
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.e2e.cluster_support import (
    NATS_URL,
    Cluster,
    Stream,
    alive,
    child_pids,
    connection_owner,
    fresh_database,
    fresh_stream,
    metrics,
    require_nats,
    require_postgres,
)
from tests.e2e.conftest import ABORTED_UPLOADS
from tests.support.server import (
    Attempt,
    BucketKey,
    Form,
    Ledger,
    Payload,
    Sent,
    ServerProcess,
    Total,
    check_pulses_stored_once,
    collect_pages,
    encode_body,
    exact_sum,
    post_until_stored,
    send_pulses,
    totals_of,
    wait_until,
)

pytestmark = [pytest.mark.e2e, *ABORTED_UPLOADS]

TENANTS = ("acme", "globex", "initech", "umbrella", "hooli", "vandelay", "wonka", "stark")
SKUS = ("sku-basic", "sku-pro")
UNITS = ("api_call", "gb_hour")
DELIVERY_STATE = {"status", "attempts", "last_error", "next_attempt_at", "delivered_at"}
QUIET = {"INGESTOR_COMMIT_INTERVAL": "3600", "INGESTOR_COMMIT_GRACE": "30d"}


# -- fixtures ----------------------------------------------------------------------


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A database of the test's own on the PostgreSQL server, dropped afterwards."""
    with fresh_database(require_postgres()) as url:
        yield url


@pytest.fixture
def nats_url() -> str:
    return require_nats()


@pytest.fixture
async def stream(nats_url: str) -> AsyncIterator[Stream]:
    async with fresh_stream() as made:
        yield made


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30.0) as client:
        yield client


# -- pulses ------------------------------------------------------------------------


def day_before(days: int) -> str:
    return (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=days)).isoformat()


def new_pulse(rng: random.Random, pulse_id: str, day: str, **fixed: str) -> dict[str, Any]:
    """An id-bearing pulse at a random moment of `day` (UTC), with an exact random amount."""
    midnight = dt.datetime.combine(dt.date.fromisoformat(day), dt.time(), dt.UTC)
    moment = midnight + dt.timedelta(microseconds=rng.randrange(86_400 * 10**6))
    amount = Decimal(rng.randint(0, 10**12)).scaleb(-rng.randint(0, 9))
    pulse: dict[str, Any] = {
        "tenant_id": rng.choice(TENANTS),
        "product_sku": rng.choice(SKUS),
        "use_unit": rng.choice(UNITS),
        "used_amount": amount if rng.random() < 0.5 else f"{amount:f}",
        "id": pulse_id,
        "timestamp": moment.isoformat().replace("+00:00", "Z"),
    }
    pulse.update(fixed)
    return pulse


def changed(pulse: Payload) -> dict[str, Any]:
    """The same tenant and id with another amount: a conflicting reuse of the id."""
    assert isinstance(pulse, Mapping)
    return {**pulse, "used_amount": f"{Decimal(str(pulse['used_amount'])) + 1:f}"}


def form_for(count: int, rng: random.Random) -> Form:
    return "single" if count == 1 else rng.choice(("array", "array", "ndjson"))


def accepted(ledger: Ledger) -> int:
    return sum(1 for a in ledger.attempts if a.answer == "accepted")


# -- the load on several instances -------------------------------------------------


@dataclass
class Job:
    """Pulses to (re)send until each has an answer, and the answers allowed for them."""

    payloads: list[Payload]
    form: Form
    allowed: frozenset[str]
    failed_on: ServerProcess | None = None


@dataclass
class Load:
    """What the clients and the test body share."""

    ledger: Ledger
    alive: list[ServerProcess]
    days: Sequence[str]
    stopping: bool = False
    in_flight: Counter[int] = field(default_factory=Counter)  # by port
    stored: list[list[Payload]] = field(default_factory=list)  # requests fully accepted
    violations: list[str] = field(default_factory=list)
    concurrent: Counter[str] = field(default_factory=Counter)  # races checked, by kind
    resent_elsewhere: int = 0
    requests: int = 0

    def target(self, rng: random.Random, avoid: ServerProcess | None = None) -> ServerProcess:
        choices = [s for s in self.alive if s is not avoid] or self.alive
        return rng.choice(choices)

    async def send(
        self, http: httpx.AsyncClient, server: ServerProcess, job: Job
    ) -> tuple[Sent, Job | None]:
        """Send `job` to `server`; check the answers; return what still needs an answer."""
        self.in_flight[server.port] += 1
        self.requests += 1
        try:
            sent = await send_pulses(http, server.url, self.ledger, job.payloads, job.form)
        finally:
            self.in_flight[server.port] -= 1
        where = f"{server.data_dir.name} ({server.url})"
        if sent.response is not None and sent.response.status_code not in (202, 409, 503):
            self.violations.append(
                f"{where}: {sent.response.status_code} {sent.response.text[:300]}"
            )
        again: list[Payload] = []
        for attempt in sent.attempts:
            if attempt.needs_retry:
                again.append(attempt.payload)
            elif attempt.answer not in job.allowed:
                self.violations.append(
                    f"{where}: pulse {attempt.identity} answered {attempt.answer!r}"
                    f" ({attempt.error}), expected one of {sorted(job.allowed)}"
                )
        if not again:
            return sent, None
        form: Form = job.form
        if len(again) < len(job.payloads):
            form = "single" if len(again) == 1 else "array"
        # A retry finds the pulse stored (by the attempt that got no answer) or not.
        allowed = job.allowed | {"duplicate"} if "accepted" in job.allowed else job.allowed
        return sent, Job(again, form, allowed, server)


async def send_together(
    http: httpx.AsyncClient,
    load: Load,
    sends: Sequence[tuple[ServerProcess, Job]],
    retry: deque[Job],
    kind: str,
) -> None:
    """Send the jobs at the same moment; if all were answered, exactly one stored each id."""
    results: list[Sent | None] = [None] * len(sends)

    async def one(index: int, server: ServerProcess, job: Job) -> None:
        sent, left = await load.send(http, server, job)
        results[index] = sent
        if left is not None:
            retry.append(left)

    async with trio.open_nursery() as nursery:
        for index, (server, job) in enumerate(sends):
            nursery.start_soon(one, index, server, job)
    done = [sent for sent in results if sent is not None]
    if len(done) < len(sends) or any(a.needs_retry for s in done for a in s.attempts):
        return  # a side was cut off (kill, overload): its retry settles it
    load.concurrent[kind] += 1
    want = (
        Counter({"accepted": 1, "duplicate": len(sends) - 1})
        if kind == "same"
        else Counter({"accepted": 1, "conflict": len(sends) - 1})
    )
    for index in range(len(sends[0][1].payloads)):
        got = Counter(str(s.attempts[index].answer) for s in done)
        if got != want:
            load.violations.append(
                f"{kind} payload of {done[0].attempts[index].identity} sent to"
                f" {[server.data_dir.name for server, _ in sends]} at once: {dict(got)}"
            )


async def run_client(number: int, load: Load) -> None:
    """Send until told to stop, then resend what is unanswered until all is answered."""
    rng = random.Random(7100 + number)
    ids = (f"c{number}-{n}" for n in itertools.count())
    retry: deque[Job] = deque()
    failures_in_a_row = 0

    def fresh(count: int) -> list[Payload]:
        day = rng.choice(load.days)
        return [new_pulse(rng, next(ids), day) for _ in range(count)]

    async with httpx.AsyncClient(timeout=15.0) as http:
        while True:
            if retry:
                job = retry.popleft()
                server = load.target(rng, avoid=job.failed_on)
                load.resent_elsewhere += server is not job.failed_on
                sent, left = await load.send(http, server, job)
                if left is None:
                    failures_in_a_row = 0
                    continue
                retry.appendleft(left)
                failures_in_a_row += 1
                if failures_in_a_row > 100:
                    raise AssertionError(
                        f"client {number}: 100 failed retries in a row; last:"
                        f" {sent.error or sent.response}\n{server.tail()}"
                    )
                if sent.response is not None:  # 503: let the server breathe
                    await trio.sleep(0.05)
                continue
            if load.stopping:
                return
            roll = rng.random()
            if roll < 0.55 or not load.stored:
                payloads = fresh(rng.randint(1, 30))
                sent, left = await load.send(
                    http,
                    load.target(rng),
                    Job(payloads, form_for(len(payloads), rng), frozenset({"accepted"})),
                )
                if left is None:
                    load.stored.append(payloads)
                else:
                    retry.append(left)
            elif roll < 0.80:
                kind = "same" if roll < 0.70 else "conflict"
                servers = rng.sample(load.alive, min(len(load.alive), rng.choice((2, 3))))
                if kind == "conflict":
                    servers = servers[:2]
                payloads = fresh(rng.randint(1, 10))
                form = form_for(len(payloads), rng)
                allowed = frozenset({"accepted", "duplicate" if kind == "same" else "conflict"})
                sends = [
                    (
                        server,
                        Job(
                            payloads
                            if i == 0 or kind == "same"
                            else [changed(p) for p in payloads],
                            form,
                            allowed,
                        ),
                    )
                    for i, server in enumerate(servers)
                ]
                await send_together(http, load, sends, retry, kind)
            else:
                # An id stored before (by any client, on any instance) sent again to
                # some instance: the same payload is a duplicate, another a conflict.
                earlier = rng.choice(load.stored)
                if roll < 0.95:
                    job = Job(list(earlier), form_for(len(earlier), rng), frozenset({"duplicate"}))
                else:
                    payloads = [changed(p) for p in earlier]
                    job = Job(payloads, form_for(len(payloads), rng), frozenset({"conflict"}))
                sent, left = await load.send(http, load.target(rng), job)
                if left is not None:
                    retry.append(left)


@dataclass
class HalfSent:
    """A POST /pulses cut in the middle of its body: certainly in flight when the server dies."""

    stream: trio.SocketStream
    job: Job
    attempts: list[Attempt]
    rest: bytes

    @property
    def client_port(self) -> int:
        port: int = self.stream.socket.getsockname()[1]
        return port


async def send_half(ledger: Ledger, server: ServerProcess, payloads: list[Payload]) -> HalfSent:
    body, content_type = encode_body(payloads, "array")
    head = (
        f"POST /pulses HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    attempts = ledger.sent(payloads, "array")
    stream = await trio.open_tcp_stream(server.host, server.port)
    await stream.send_all(head + body[: len(body) // 2])
    # Never stored (its body never arrived whole): the retry must be accepted.
    return HalfSent(
        stream,
        Job(payloads, "array", frozenset({"accepted"}), server),
        attempts,
        body[len(body) // 2 :],
    )


async def expect_cut_off(half: HalfSent, ledger: Ledger) -> None:
    """After the kill: the rest of the body goes nowhere and no answer comes."""
    data = b""
    with trio.fail_after(10):
        try:
            await half.stream.send_all(half.rest)
            data = await half.stream.receive_some(65536)
        except trio.BrokenResourceError:
            pass
        finally:
            await half.stream.aclose()
    assert data == b"", f"the killed server answered: {data[:300]!r}"
    ledger.answered(half.attempts, None, "cut off by the kill")


async def settle(http: httpx.AsyncClient, load: Load, job: Job, rng: random.Random) -> None:
    """Send `job` again (to another instance where there is one) until all is answered."""
    left: Job | None = job
    for _ in range(100):
        if left is None:
            return
        server = load.target(rng, avoid=left.failed_on)
        load.resent_elsewhere += server is not left.failed_on
        sent, left = await load.send(http, server, left)
        if left is not None and sent.response is not None:
            await trio.sleep(0.05)  # 503: let the server breathe
    raise AssertionError(f"no answer after 100 tries: {job.payloads[:3]}...")


async def commit_cut_short(
    http: httpx.AsyncClient,
    server: ServerProcess,
    day: str,
    sent: trio.Event,
    answers: list[list[dict[str, Any]] | None],
) -> None:
    """POST /aggregates/commit, setting `sent` once the request is out; None if unanswered."""

    async def trace(event: str, info: Mapping[str, Any]) -> None:
        if event == "http11.send_request_body.complete":
            sent.set()

    try:
        response = await http.post(
            f"{server.url}/aggregates/commit", json={"date": day}, extensions={"trace": trace}
        )
    except httpx.TransportError:
        answers.append(None)
        return
    finally:
        sent.set()
    assert response.status_code == 200, f"commit {day}: {response.text[:500]}"
    answers.append(response.json()["batches"])


async def commit_together(
    http: httpx.AsyncClient, servers: Sequence[ServerProcess], days: Sequence[str]
) -> list[dict[str, Any]]:
    """POST /aggregates/commit for every day on every server, all at the same moment."""
    batches: list[dict[str, Any]] = []

    async def commit(server: ServerProcess, day: str) -> None:
        response = await http.post(f"{server.url}/aggregates/commit", json={"date": day})
        assert response.status_code == 200, (
            f"commit {day} on {server.url}: {response.status_code} {response.text[:500]}\n"
            f"{server.tail()}"
        )
        body = response.json()
        assert body["date"] == day, body
        batches.extend(body["batches"])

    async with trio.open_nursery() as nursery:
        for day in days:
            for server in servers:
                nursery.start_soon(commit, server, day)
    return batches


# -- reading the outbox ------------------------------------------------------------


async def batches_with_records(
    http: httpx.AsyncClient, server: ServerProcess, days: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Every batch of `days`, with its records, as GET /batches/{id} shows it."""
    found: dict[str, dict[str, Any]] = {}
    for day in days:
        listed = await collect_pages(
            http, f"{server.url}/batches", "batches", {"date": day}, limit=100
        )
        for row in listed:
            response = await http.get(f"{server.url}/batches/{row['batch_id']}")
            assert response.status_code == 200, (row["batch_id"], response.text[:300])
            assert row["batch_id"] not in found, f"batch {row['batch_id']} listed twice"
            found[row["batch_id"]] = response.json()
    return found


def check_outbox(
    batches: Mapping[str, Mapping[str, Any]], expected: Mapping[BucketKey, Total]
) -> list[str]:
    """Each bucket's batches: revisions 1..n, deltas adding up to each running total
    and, in the end, to the expected total; initial batches hold revision 1 only."""
    wrong: list[str] = []
    records: dict[BucketKey, list[tuple[int, Mapping[str, Any]]]] = defaultdict(list)
    for batch_id, batch in batches.items():
        if len(batch["records"]) != batch["record_count"]:
            wrong.append(f"{batch_id}: record_count {batch['record_count']} is not its records")
        amounts = [Decimal(r["used_amount"]) for r in batch["records"]]
        if exact_sum(amounts) != Decimal(batch["used_amount"]):
            wrong.append(f"{batch_id}: used_amount {batch['used_amount']} is not its records' sum")
        for record in batch["records"]:
            key = (record["tenant_id"], record["product_sku"], record["use_unit"], batch["date"])
            if (record["revision"] == 1) != (batch["kind"] == "initial"):
                wrong.append(
                    f"{batch_id} ({batch['kind']}): {key} at revision {record['revision']}"
                )
            records[key].append((record["revision"], record))
    for key in expected.keys() | records.keys():
        got = sorted(records.get(key, []), key=lambda pair: pair[0])
        if [revision for revision, _ in got] != list(range(1, len(got) + 1)):
            wrong.append(f"{key}: revisions {[revision for revision, _ in got]}")
            continue
        amount, count = Decimal(0), 0
        for revision, record in got:
            amount = exact_sum([amount, Decimal(record["used_amount"])])
            count += record["pulse_count"]
            if (Decimal(record["total_amount"]), record["total_count"]) != (amount, count):
                wrong.append(f"{key} revision {revision}: totals {record} after deltas {amount}")
        if Total(amount, count) != expected.get(key):
            wrong.append(
                f"{key}: batches add up to {amount} / {count}, expected {expected.get(key)}"
            )
    return wrong


# -- 1. three instances, one store, one stream -------------------------------------


async def test_three_instances_share_postgres_and_publish_each_batch_once(
    postgres_url: str, stream: Stream, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Concurrent load on 3 instances, one killed mid-load, concurrent commits from
    the other two: exact totals, each unit of usage in one batch, each batch once on
    the stream with the content the store holds."""
    env = {
        "INGESTOR_STORE": postgres_url,
        "INGESTOR_SINK": NATS_URL,
        "INGESTOR_NATS_STREAM": stream.name,
        "INGESTOR_NATS_SUBJECT": stream.template,
        **QUIET,
    }
    days = (day_before(2), day_before(1))
    ledger = Ledger()
    commit_answers: list[dict[str, Any]] = []
    cut_commit: list[list[dict[str, Any]] | None] = []
    async with Cluster(tmp_path, 3, env) as cluster:
        first, second, victim = cluster
        load = Load(ledger, list(cluster), days)
        with trio.fail_after(60):
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                for number in range(6):
                    nursery.start_soon(run_client, number, load)

                async def flowing(floor: int) -> bool:
                    return accepted(ledger) >= floor

                await wait_until(lambda: flowing(3000), within=25, what="load on three instances")
                three_up = (accepted(ledger), trio.current_time() - started)

                async def busy() -> bool:
                    return load.in_flight[victim.port] >= 3

                rng = random.Random(99)
                half = await send_half(
                    ledger, victim, [new_pulse(rng, f"half-{n}", days[0]) for n in range(20)]
                )
                await wait_until(busy, within=5, interval=0.001, what="requests in flight")
                # A commit on the victim too, killed as soon as its request is sent:
                # its shards' transactions are cut at some point, or all done.
                commit_sent = trio.Event()
                nursery.start_soon(commit_cut_short, http, victim, days[0], commit_sent, cut_commit)
                await commit_sent.wait()
                load.alive.remove(victim)
                in_flight_at_kill = load.in_flight[victim.port]
                assert await victim.kill() == -9
                await expect_cut_off(half, ledger)
                await settle(http, load, half.job, rng)

                await wait_until(lambda: flowing(5000), within=25, what="load after the kill")
                # Both survivors commit both days at once, while the load goes on.
                commit_answers += await commit_together(http, [first, second], days)
                await wait_until(lambda: flowing(6500), within=25, what="load after a commit")
                load.stopping = True
            load_seconds = trio.current_time() - started

        # Every pulse has its answer; none contradicts another.
        assert load.violations == []
        assert ledger.unresolved() == []
        assert ledger.problems() == []
        cut_off = [a for a in ledger.attempts if a.answer == "no answer"]
        assert cut_off, "the kill cut off no request: the test proved nothing"
        assert load.resent_elsewhere > 0
        assert load.concurrent["same"] > 0
        assert load.concurrent["conflict"] > 0
        expected = ledger.expected_totals()

        with trio.fail_after(30):
            commit_answers += await commit_together(http, [first, second], days)
            assert await commit_together(http, [first, second], days) == []

            # Totals from either survivor: exactly what the answers say, all committed.
            for server in (first, second):
                rows = await collect_pages(
                    http, f"{server.url}/aggregates", "aggregates", limit=500
                )
                assert totals_of(rows) == expected, f"totals on {server.data_dir.name}"
                open_ = [r for r in rows if r["committed_count"] != r["pulse_count"]]
                assert open_ == [], "buckets left uncommitted"
                assert all(r["committed_amount"] == r["used_amount"] for r in rows)
            committed = {
                (r["tenant_id"], r["product_sku"], r["use_unit"], r["date"]): Total(
                    Decimal(r["committed_amount"]), r["committed_count"]
                )
                for r in rows
            }

            # Each acknowledged id stored once, none other (the audit trail behind the totals).
            await check_pulses_stored_once(http, second, ledger)

            # Each batch created by exactly one of the concurrent commits; each bucket's
            # batches add up to what it has committed.
            outbox = await batches_with_records(http, first, days)
            made = Counter(b["batch_id"] for b in commit_answers)
            assert [bid for bid, n in made.items() if n > 1] == [], "a batch reported twice"
            [victims_batches] = cut_commit
            if victims_batches is None:  # its answer was lost: some batches may be its
                assert set(made) <= set(outbox)
                assert {outbox[b]["date"] for b in set(outbox) - set(made)} <= {days[0]}
            else:
                made.update(b["batch_id"] for b in victims_batches)
                assert set(made) == set(outbox)
            assert [bid for bid, n in made.items() if n > 1] == [], "a batch reported twice"
            assert check_outbox(outbox, committed) == []
            kinds = Counter(b["kind"] for b in outbox.values())
            assert kinds["correction"] > 0, f"no correction after the mid-load commit: {kinds}"

            # Delivered by the survivors' deliverers (both may send the same batch).
            async def all_delivered() -> bool:
                rows = await collect_pages(http, f"{second.url}/batches", "batches", limit=500)
                return all(row["status"] == "delivered" for row in rows)

            await wait_until(all_delivered, within=20, interval=0.2, what="batches delivered")
            messages = await stream.messages()

        ids = Counter(m.headers.get("Nats-Msg-Id") if m.headers else None for m in messages)
        assert {bid: n for bid, n in ids.items() if n != 1} == {}, "a batch on the stream twice"
        assert set(ids) == set(outbox), "the stream's batches are not the store's"
        on_stream: dict[str, dict[str, Any]] = {}
        for message in messages:
            assert message.headers is not None
            assert message.data is not None
            body = json.loads(message.data)
            batch_id = message.headers["Nats-Msg-Id"]
            assert body["batch_id"] == batch_id
            assert message.subject == f"{stream.prefix}.{body['date']}"
            stored = {k: v for k, v in outbox[batch_id].items() if k not in DELIVERY_STATE}
            assert body == stored, f"{batch_id}: the stream's content differs from the store's"
            on_stream[batch_id] = body
        assert check_outbox(on_stream, expected) == []

    acknowledged = accepted(ledger)
    print(
        f"\n3 instances on PostgreSQL: {three_up[0]} pulses accepted in {three_up[1]:.1f} s"
        f" ({three_up[0] / three_up[1]:.0f}/s) before the kill; {acknowledged} in"
        f" {load_seconds:.1f} s ({acknowledged / load_seconds:.0f}/s) in all, over"
        f" {load.requests} requests from 6 clients;"
        f" {len(cut_off)} pulses cut off by the kill ({in_flight_at_kill} requests in flight),"
        f" {load.resent_elsewhere} resends to another instance,"
        f" races checked {dict(load.concurrent)}, {len(outbox)} batches; the commit on the"
        f" killed instance was {'cut off' if victims_batches is None else 'answered'},"
        f" {len(set(outbox) - set(made))} batches of it found unreported"
    )


# -- 2. one leading committer ------------------------------------------------------


def commit_lines(server: ServerProcess, day: str) -> list[str]:
    return [
        line
        for line in server.output_of_run().splitlines()
        if " ingestor.committer commit " in f"{line} " and f"date={day}" in line
    ]


async def revisions(http: httpx.AsyncClient, server: ServerProcess) -> dict[BucketKey, int]:
    rows = await collect_pages(http, f"{server.url}/aggregates", "aggregates", limit=500)
    return {
        (r["tenant_id"], r["product_sku"], r["use_unit"], r["date"]): r["revision"] for r in rows
    }


LATE_BUCKETS = [(t, s, u) for t in TENANTS[:4] for s in SKUS for u in UNITS]


async def post_late_wave(
    http: httpx.AsyncClient,
    servers: Sequence[ServerProcess],
    ledger: Ledger,
    rng: random.Random,
    *,
    wave: str,
    day: str,
    until_stored: bool = False,
) -> set[BucketKey]:
    """Four rounds over `servers` of twelve new pulses of `day` each, all 202
    (or, `until_stored`, sent again after a 503 until they are); the buckets
    they touched."""
    touched: set[BucketKey] = set()
    for n, server in enumerate(list(servers) * 4):
        payloads = []
        for k in range(12):
            tenant, sku, unit = rng.choice(LATE_BUCKETS)
            payloads.append(
                new_pulse(
                    rng, f"{wave}-{n}-{k}", day, tenant_id=tenant, product_sku=sku, use_unit=unit
                )
            )
        if until_stored:
            await post_until_stored(http, server.url, ledger, payloads)
            touched.update((p["tenant_id"], p["product_sku"], p["use_unit"], day) for p in payloads)
            continue
        sent = await send_pulses(http, server.url, ledger, payloads)
        assert sent.response is not None, sent.error
        assert sent.response.status_code == 202, sent.response.text
        touched.update(ledger.bucket_of(attempt) for attempt in sent.attempts)
    return touched


async def all_committed(http: httpx.AsyncClient, server: ServerProcess) -> bool:
    rows = await collect_pages(
        http, f"{server.url}/aggregates", "aggregates", {"status": "open"}, limit=500
    )
    return not rows


async def leaders(http: httpx.AsyncClient, servers: Sequence[ServerProcess]) -> list[ServerProcess]:
    found = []
    for server in servers:
        if (await metrics(http, server))["ingestor_committer_leading"] == 1:
            found.append(server)
    return found


async def sole_leader(
    http: httpx.AsyncClient, servers: Sequence[ServerProcess]
) -> list[ServerProcess]:
    """[the one of `servers` that leads], or [] while none or several do
    (for `wait_until`)."""
    found = await leaders(http, servers)
    return found if len(found) == 1 else []


async def test_one_instance_leads_the_committer_and_a_survivor_takes_over(
    postgres_url: str, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Late pulses for yesterday on three instances: only the leader commits them.
    SIGKILL the leader: another instance leads within seconds and commits the next
    late pulses as corrections."""
    env = {
        "INGESTOR_STORE": postgres_url,
        "INGESTOR_COMMIT_INTERVAL": "1",
        "INGESTOR_COMMIT_GRACE": "1",
    }
    yesterday = day_before(1)
    rng = random.Random(77)
    ledger = Ledger()

    async def post_late(servers: Sequence[ServerProcess], wave: str) -> set[BucketKey]:
        return await post_late_wave(http, servers, ledger, rng, wave=wave, day=yesterday)

    async with Cluster(tmp_path, 3, env) as cluster:
        with trio.fail_after(40):
            [leader] = await wait_until(
                lambda: sole_leader(http, cluster.running()),
                within=10,
                interval=0.1,
                what="a leader",
            )
            others = [s for s in cluster if s is not leader]

            await post_late(list(cluster), "early")
            await wait_until(
                lambda: all_committed(http, others[0]),
                within=10,
                interval=0.1,
                what="first wave committed",
            )
            first_batches = await batches_with_records(http, others[0], [yesterday])
            before = await revisions(http, others[0])
            assert first_batches
            assert commit_lines(leader, yesterday), leader.tail()
            for other in others:
                assert commit_lines(other, yesterday) == [], other.tail()
                seen = await metrics(http, other)
                assert seen["ingestor_commits_total"] == 0, other.data_dir.name
                assert seen["ingestor_batches_created_total"] == 0, other.data_dir.name
                assert seen["ingestor_committer_leading"] == 0, other.data_dir.name
            seen = await metrics(http, leader)
            assert seen["ingestor_batches_created_total"] == len(first_batches)

            assert await leader.kill() == -9
            killed_at = trio.current_time()

            [successor] = await wait_until(
                lambda: sole_leader(http, others),
                within=8,
                interval=0.1,
                what="another instance leading",
            )
            takeover = trio.current_time() - killed_at
            bystander = next(s for s in others if s is not successor)

            late_buckets = await post_late(others, "late")
            await wait_until(
                lambda: all_committed(http, bystander),
                within=10,
                interval=0.1,
                what="late wave committed",
            )

            every = await batches_with_records(http, bystander, [yesterday])
            later = {bid: b for bid, b in every.items() if bid not in first_batches}
            assert later, "the late pulses made no batch"
            assert {b["kind"] for b in later.values()} == {"correction"}
            assert commit_lines(successor, yesterday), successor.tail()
            assert commit_lines(bystander, yesterday) == [], bystander.tail()
            assert (await metrics(http, bystander))["ingestor_batches_created_total"] == 0
            seen = await metrics(http, successor)
            assert seen["ingestor_batches_created_total"] == len(later)

            assert ledger.problems() == []
            expected = ledger.expected_totals()
            rows = await collect_pages(http, f"{successor.url}/aggregates", "aggregates", limit=500)
            assert totals_of(rows) == expected
            after = await revisions(http, successor)
            assert {k for k in after if after[k] != before.get(k)} == late_buckets
            assert check_outbox(every, expected) == []

    print(
        f"\nleader {leader.data_dir.name} killed; {successor.data_dir.name} led"
        f" {takeover:.2f} s later and committed {len(later)} correction batches"
    )


async def test_a_frozen_leader_loses_the_lead_and_takes_no_part_once_thawed(
    postgres_url: str, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """SIGSTOP the leader (a paused container or VM, a process that stops
    without dying): its process, and its session holding the leader's lock, do
    not go away. Another instance must lead and commit the late pulses sent
    meanwhile; the frozen one, thawed, must find it no longer leads and commit
    nothing, and every bucket is committed once, exactly.

    Stopped inside a transaction (its purges run every second here), it also
    holds a partition's lock until the server ends the transaction, after
    three busy timeouts: writes to that partition are 503 until then, and
    sent again."""
    env = {
        "INGESTOR_STORE": postgres_url,
        "INGESTOR_COMMIT_INTERVAL": "1",
        "INGESTOR_COMMIT_GRACE": "1",
        "INGESTOR_STORE_BUSY_TIMEOUT": "2",
    }
    yesterday = day_before(1)
    rng = random.Random(78)
    ledger = Ledger()
    async with Cluster(tmp_path, 2, env) as cluster:
        [leader] = await wait_until(
            lambda: sole_leader(http, cluster.running()), within=10, interval=0.1, what="a leader"
        )
        [other] = [s for s in cluster if s is not leader]
        await post_late_wave(http, [other], ledger, rng, wave="before", day=yesterday)
        await wait_until(
            lambda: all_committed(http, other), within=10, interval=0.1, what="committed"
        )
        assert leader.pid is not None
        os.kill(leader.pid, signal.SIGSTOP)
        stopped_at = trio.current_time()
        try:
            await post_late_wave(
                http, [other], ledger, rng, wave="frozen", day=yesterday, until_stored=True
            )

            async def other_leads() -> bool:
                return (await metrics(http, other))["ingestor_committer_leading"] == 1

            await wait_until(other_leads, within=30, interval=0.2, what="the other leading")
            takeover = trio.current_time() - stopped_at
            await wait_until(
                lambda: all_committed(http, other),
                within=20,
                interval=0.1,
                what="the pulses sent while the leader was frozen committed",
            )
        finally:
            os.kill(leader.pid, signal.SIGCONT)
        commits_before = len(commit_lines(leader, yesterday))

        async def leader_knows() -> bool:
            return (await metrics(http, leader))["ingestor_committer_leading"] == 0

        await wait_until(leader_knows, within=15, interval=0.2, what="the thawed one not leading")
        assert await leaders(http, list(cluster)) == [other]
        await post_late_wave(http, [leader, other], ledger, rng, wave="thawed", day=yesterday)
        await wait_until(
            lambda: all_committed(http, leader), within=10, interval=0.1, what="last wave"
        )
        assert len(commit_lines(leader, yesterday)) == commits_before, leader.tail()
        assert ledger.problems() == []
        expected = ledger.expected_totals()
        rows = await collect_pages(http, f"{other.url}/aggregates", "aggregates", limit=500)
        assert totals_of(rows) == expected
        every = await batches_with_records(http, other, [yesterday])
        assert check_outbox(every, expected) == []
    print(f"\nleader SIGSTOPped; the other led {takeover:.2f} s later")


# -- 3. --workers 2 on SQLite ------------------------------------------------------

WORKER_MARK = "spawn_main"  # multiprocessing's spawn command line; the resource tracker's differs
GRACEFUL_TIMEOUT = 15


async def run_worker_client(number: int, load: Load, server: ServerProcess) -> None:
    """Fresh requests and replays of stored ones, each resent until answered.

    A new connection per request, so the kernel spreads the requests over both
    workers, the restarted one too.
    """
    rng = random.Random(5300 + number)
    ids = (f"w{number}-{n}" for n in itertools.count())
    retry: deque[Job] = deque()
    failures_in_a_row = 0
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=15.0, limits=limits) as http:
        while retry or not load.stopping:
            if retry:
                job = retry.popleft()
            elif rng.random() < 0.8 or not load.stored:
                day = rng.choice(load.days)
                payloads: list[Payload] = [
                    new_pulse(rng, next(ids), day) for _ in range(rng.randint(1, 30))
                ]
                job = Job(payloads, form_for(len(payloads), rng), frozenset({"accepted"}))
            else:
                earlier = rng.choice(load.stored)
                job = Job(list(earlier), form_for(len(earlier), rng), frozenset({"duplicate"}))
            sent, left = await load.send(http, server, job)
            if left is None:
                failures_in_a_row = 0
                if job.allowed == {"accepted"}:
                    load.stored.append(job.payloads)
                continue
            retry.appendleft(left)
            failures_in_a_row += 1
            if failures_in_a_row > 100:
                raise AssertionError(
                    f"client {number}: 100 failed tries in a row; last:"
                    f" {sent.error or sent.response}\n{server.tail()}"
                )
            if sent.response is not None:
                await trio.sleep(0.05)


async def test_two_workers_on_sqlite_survive_a_killed_worker(
    http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """`--workers 2`: SIGKILL a worker mid-load; it is restarted, totals stay exact,
    and SIGTERM to the supervisor drains both workers and exits 0, promptly even
    with an idle keep-alive connection open (as a load balancer keeps one)."""
    server = ServerProcess(
        tmp_path / "data",
        env={
            "INGESTOR_WORKERS": "2",
            "INGESTOR_GRACEFUL_TIMEOUT": str(GRACEFUL_TIMEOUT),
            **QUIET,
        },
        stop_timeout=GRACEFUL_TIMEOUT + 15,
    )
    ledger = Ledger()
    load = Load(ledger, [server], (day_before(2), day_before(1)))
    try:
        await server.start()
        assert server.pid is not None
        supervisor = server.pid

        async def two_workers() -> list[int]:
            found = child_pids(supervisor, marker=WORKER_MARK)
            return found if len(found) == 2 else []

        def services_started() -> int:
            return server.output_of_run().count(" ingestor.service start ")

        with trio.fail_after(45):
            workers = await wait_until(two_workers, within=10, what="two workers")

            async def both_ready() -> bool:
                return services_started() == 2

            await wait_until(both_ready, within=10, what="both workers serving")
            async with trio.open_nursery() as nursery:
                for number in range(6):
                    nursery.start_soon(run_worker_client, number, load, server)

                async def flowing(floor: int) -> bool:
                    return accepted(ledger) >= floor

                await wait_until(lambda: flowing(1500), within=20, what="load on two workers")

                # A request cut in the middle of its body: it is certainly in flight
                # on the worker that accepted it, which is the one to kill.
                rng = random.Random(98)
                half = await send_half(
                    ledger, server, [new_pulse(rng, f"half-{n}", load.days[0]) for n in range(20)]
                )

                async def owner() -> int | None:
                    return connection_owner(workers, server.port, half.client_port)

                victim = await wait_until(owner, within=5, what="the worker holding the request")
                assert victim is not None
                os.kill(victim, signal.SIGKILL)
                await expect_cut_off(half, ledger)
                async with httpx.AsyncClient(timeout=15.0) as resend:
                    await settle(resend, load, half.job, rng)
                load.stored.append(half.job.payloads)  # the clients may replay it now

                async def replaced() -> list[int]:
                    found = await two_workers()
                    return found if found and victim not in found else []

                restarted = await wait_until(replaced, within=15, what="the worker restarted")
                newcomer = next(pid for pid in restarted if pid not in workers)

                async def newcomer_ready() -> bool:
                    return services_started() == 3

                await wait_until(newcomer_ready, within=15, what="the new worker serving")
                floor = accepted(ledger) + 1500
                await wait_until(lambda: flowing(floor), within=20, what="load after restart")
                load.stopping = True

            assert load.violations == []
            assert ledger.unresolved() == []
            assert ledger.problems() == []
            cut_off = [a for a in ledger.attempts if a.answer == "no answer"]
            assert cut_off, "the kill cut off no request: the test proved nothing"
            rows = await collect_pages(http, f"{server.url}/aggregates", "aggregates", limit=500)
            assert totals_of(rows) == ledger.expected_totals()
            await check_pulses_stored_once(http, server, ledger)
            assert "worker died, restarting" in server.output_of_run()
            # `http` now holds an idle keep-alive connection to one of the workers.
            assert (await http.get(f"{server.url}/healthz")).status_code == 200

        began = trio.current_time()
        code = await server.terminate()
        took = trio.current_time() - began
        assert code == 0, server.tail()
        assert not alive(newcomer)
        assert [pid for pid in workers if alive(pid)] == []
        assert "Traceback" not in server.output, server.output[-4000:]
        print(
            f"\n--workers 2: {accepted(ledger)} pulses accepted; worker {victim} killed,"
            f" {len(cut_off)} pulses cut off and resent; {newcomer} took its place;"
            f" SIGTERM to exit: {took:.1f} s"
        )
        # Nothing is in flight: draining must not wait out the graceful timeout
        # for a connection that is merely idle.
        assert took < 5, (
            f"SIGTERM took {took:.1f} s to exit with one idle keep-alive connection open"
            f" (graceful_timeout {GRACEFUL_TIMEOUT} s):\n{server.tail()}"
        )
    finally:
        # Killing the supervisor alone would leave its workers running as orphans.
        children = child_pids(server.pid) if server.running and server.pid else []
        await server.aclose()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_two_workers_share_a_burst_of_keep_alive_connections(tmp_path: Path) -> None:
    """Connections opened at once, as a client's pool opens them, are served by both
    workers: each worker has its own SO_REUSEPORT socket, listening from the start.
    On one shared socket the first worker to wake accepted the whole burst, and
    kept every connection for as long as it stayed open."""
    async with ServerProcess(tmp_path / "data", env={"INGESTOR_WORKERS": "2", **QUIET}) as server:
        assert server.pid is not None
        supervisor = server.pid

        async def two_workers() -> list[int]:
            found = child_pids(supervisor, marker=WORKER_MARK)
            return found if len(found) == 2 else []

        workers = await wait_until(two_workers, within=10, what="two workers")
        streams: list[trio.SocketStream] = []
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(16):  # all on one worker: 2 in 65,536 by the kernel's hash

                    async def connect() -> None:
                        streams.append(await trio.open_tcp_stream(server.host, server.port))

                    nursery.start_soon(connect)
            for stream in streams:
                await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            for stream in streams:
                with trio.fail_after(15):
                    head = await stream.receive_some(4096)
                assert head.startswith(b"HTTP/1.1 200"), head
            owners = Counter(
                connection_owner(workers, server.port, stream.socket.getsockname()[1])
                for stream in streams
            )
        finally:
            for stream in streams:
                await stream.aclose()
        assert set(owners) == set(workers), owners
