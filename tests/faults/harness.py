"""What the fault scenarios share: a mixed load that remembers every answer, and the audit.

    PulseFactory   seeded pulses over a few tenants, SKUs and units, exact
                   decimal amounts (numbers and strings), with an id or not,
                   each with a timestamp unique to the microsecond so that a
                   pulse sent without an id can still be recognised in
                   GET /pulses.
    Load           concurrent clients sending single, array and NDJSON
                   requests through a `Ledger`. Each resends what it must:
                   a pulse with an id after no answer or a 503 (same id, same
                   payload), a pulse without one only after a 503 or a "not
                   stored, retry" item (resending it after no answer could
                   count it twice; its fate is settled from GET /pulses).
                   `up` gates the clients while the test has the server down.
    audit          the issue's four checks, from the ledger alone:
                   1. every pulse answered 2xx is counted exactly once,
                   2. nothing answered otherwise is counted, unless a retry of
                      it later got a 2xx,
                   3. after commit, each bucket's delivered batches add up to
                      its total,
                   4. no batch id was delivered twice with different content;
                   and returns the counts a scenario reports.

Every wait is a poll bounded by a deadline (`wait_until`); the only sleeps are
a client's back-off after a 503 or a refused connection.
"""

from __future__ import annotations

import datetime as dt
import itertools
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio

from tests.support.server import (
    Attempt,
    BucketKey,
    Form,
    Ledger,
    Payload,
    ServerProcess,
    Total,
    check_bounds,
    collect_pages,
    exact_sum,
    send_pulses,
    totals_of,
    wait_until,
)

__all__ = [
    "Counts",
    "Load",
    "PulseFactory",
    "ZonedLedger",
    "audit",
    "check_bounds",
    "commit_days",
    "file_deliveries",
    "ingest",
    "rss_kib",
]

TENANTS = ("acme", "globex", "initech", "umbrella", "hooli", "vandelay", "tyrell", "wonka")
SKUS = ("sku-basic", "sku-pro")
UNITS = ("api_call", "gb_hour")
# What the outbox adds to a delivered batch (GET /batches/{id} less these = the body).
DELIVERY_STATE = ("status", "attempts", "last_error", "next_attempt_at", "delivered_at")


def rss_kib(pid: int) -> int:
    """The resident set size of process `pid` in KiB (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def _iso(moment: dt.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _moment(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


# -- the pulses ----------------------------------------------------------------


class PulseFactory:
    """Seeded pulses and requests; ids and timestamps never repeat within one factory."""

    def __init__(
        self,
        *,
        prefix: str,
        tenants: Sequence[str] = TENANTS,
        skus: Sequence[str] = SKUS,
        id_share: float = 0.7,
        max_array: int = 40,
        age_ms: int = 2_000,
        days: int = 0,
    ) -> None:
        self.prefix = prefix
        self.tenants = tenants
        self.skus = skus
        self.days = days
        self.id_share = id_share
        self.max_array = max_array
        self.age_ms = age_ms
        self._serial = itertools.count()

    def pulse(self, rng: random.Random, *, with_id: bool | None = None) -> dict[str, Any]:
        serial = next(self._serial)
        now = dt.datetime.now(dt.UTC)
        moment = now - dt.timedelta(
            days=rng.randint(0, self.days), milliseconds=rng.randint(0, self.age_ms)
        )
        # Unique to the microsecond within this factory: the last three digits are the serial's.
        moment = moment.replace(microsecond=moment.microsecond // 1000 * 1000 + serial % 1000)
        digits = rng.randint(0, 9)
        amount = Decimal(rng.randint(0, 10**11)).scaleb(-digits)
        pulse: dict[str, Any] = {
            "tenant_id": rng.choice(self.tenants),
            "product_sku": rng.choice(self.skus),
            "use_unit": rng.choice(UNITS),
            "used_amount": amount if rng.random() < 0.5 else f"{amount:f}",
            "timestamp": _iso(moment),
        }
        if with_id if with_id is not None else rng.random() < self.id_share:
            pulse["id"] = f"{self.prefix}-{serial}"
        return pulse

    def request(self, rng: random.Random) -> tuple[list[Payload], Form]:
        """A single pulse (a third of the time) or an array or NDJSON body of up to max_array."""
        if rng.random() < 0.33:
            return [self.pulse(rng)], "single"
        count = rng.randint(2, self.max_array)
        return [self.pulse(rng) for _ in range(count)], rng.choice(("array", "ndjson"))


# -- the load --------------------------------------------------------------------


@dataclass
class Exchange:
    """One POST /pulses as a client saw it (trio clock), for timing questions."""

    client: int
    started: float
    ended: float
    status: int | None
    error: str | None
    pulses: int


class Load:
    """Concurrent clients posting pulses to one server until `stop()`.

    `allowed` is the set of HTTP statuses a scenario accepts; anything else,
    a 503 without Retry-After, or a body that is not our JSON error shape is
    recorded in `problems`. `timeout` is the client's request timeout: a
    request that is not answered within it is recorded as a hang.
    """

    def __init__(
        self,
        server: ServerProcess,
        ledger: Ledger,
        factory: PulseFactory,
        *,
        clients: int,
        seed: int,
        allowed: Iterable[int] = (202, 503),
        timeout: float = 10.0,
        max_pause: float = 0.1,
        keepalive: bool = True,
    ) -> None:
        self.server = server
        self.ledger = ledger
        self.factory = factory
        self.clients = clients
        self.seed = seed
        self.allowed = frozenset(allowed)
        self.timeout = timeout
        self.max_pause = max_pause
        self.keepalive = keepalive
        self.up = trio.Event()
        self.up.set()
        self.stopping = False
        self.in_flight = 0
        self.exchanges: list[Exchange] = []
        self.problems: list[str] = []
        self.statuses: Counter[int | str] = Counter()
        self.retry_after: Counter[str] = Counter()
        self.error_codes: Counter[str] = Counter()
        self.timeouts = 0

    # -- what a test does ------------------------------------------------------

    def down(self) -> None:
        """Hold the clients: the test is about to stop the server."""
        self.up = trio.Event()

    def stop(self) -> None:
        """Let the clients finish what they must resend, then return."""
        self.stopping = True

    def acknowledged(self) -> int:
        return sum(1 for a in self.ledger.attempts if a.answer in ("accepted", "duplicate"))

    async def flowing(self, more: int, *, within: float = 30.0, what: str = "load") -> None:
        """Wait until `more` further pulses have been acknowledged."""
        floor = self.acknowledged() + more

        async def enough() -> bool:
            return self.acknowledged() >= floor

        await wait_until(enough, within=within, what=f"{what}: {more} more pulses acknowledged")

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for number in range(self.clients):
                nursery.start_soon(self._client, number)

    # -- one client --------------------------------------------------------------

    def must_resend(self, attempt: Attempt) -> bool:
        if attempt.identity is not None:
            return attempt.needs_retry
        return attempt.status_code == 503 or (
            attempt.answer == "rejected" and (attempt.error or "").startswith("not stored")
        )

    async def _client(self, number: int) -> None:
        rng = random.Random(self.seed * 1009 + number)
        limits = httpx.Limits(max_keepalive_connections=1 if self.keepalive else 0)
        pending: list[tuple[list[Payload], Form]] = []
        async with httpx.AsyncClient(timeout=self.timeout, limits=limits) as http:
            while True:
                if not pending:
                    if self.stopping:
                        return
                    pending.append(self.factory.request(rng))
                payloads, form = pending.pop()
                up = self.up
                await up.wait()
                started = trio.current_time()
                self.in_flight += 1
                try:
                    sent = await send_pulses(http, self.server.url, self.ledger, payloads, form)
                finally:
                    self.in_flight -= 1
                self._note(number, started, sent.response, sent.error, len(payloads))
                again = [a.payload for a in sent.attempts if self.must_resend(a)]
                if again:
                    pending.append((again, form))
                    await self._pause(sent.response, up)

    async def _pause(self, response: httpx.Response | None, up: trio.Event) -> None:
        if response is not None:
            retry_after = float(response.headers.get("Retry-After", "1"))
            await trio.sleep(min(retry_after, self.max_pause))
        elif self.up is up and up.is_set():
            await trio.sleep(0.02)  # refused or reset while the test thinks it is up

    def _note(
        self,
        client: int,
        started: float,
        response: httpx.Response | None,
        error: str | None,
        pulses: int,
    ) -> None:
        ended = trio.current_time()
        status = None if response is None else response.status_code
        self.exchanges.append(Exchange(client, started, ended, status, error, pulses))
        if response is None:
            self.statuses[(error or "").split(":", 1)[0]] += 1
            if (error or "").startswith(("ReadTimeout", "WriteTimeout", "PoolTimeout")):
                self.timeouts += 1
                if self.up.is_set():
                    self.problems.append(f"client {client}: no answer within {self.timeout} s")
            return
        self.statuses[status] += 1
        if status not in self.allowed:
            self.problems.append(f"client {client}: {status} {response.text[:300]}")
        if status == 202:
            return
        try:
            code = response.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            self.problems.append(f"client {client}: {status} without an error body")
            return
        self.error_codes[code] += 1
        if status == 503:
            value = response.headers.get("Retry-After")
            self.retry_after[str(value)] += 1
            if value is None or not value.isdigit():
                self.problems.append(f"client {client}: 503 {code} without a Retry-After")


# -- the audit ---------------------------------------------------------------------


class ResendingLoad(Load):
    """`Load`, also sending again the pulses with ids that a 202 reported "may be
    stored" (README: resend them with their ids); their outcome is unknown, as
    a lost answer's, so the ledger records them as "no answer"."""

    def must_resend(self, attempt: Attempt) -> bool:
        if attempt.answer == "rejected" and (attempt.error or "").startswith("may be stored"):
            attempt.answer = "no answer"
        return super().must_resend(attempt)


class ZonedLedger(Ledger):
    """A Ledger whose billing day is per tenant (tenant_timezones), UTC by default."""

    def __init__(self, zones: Mapping[str, dt.tzinfo], default: dt.tzinfo = dt.UTC) -> None:
        super().__init__(default)
        self.zones = dict(zones)

    def day_of(self, attempt: Attempt) -> str:
        payload = _fields(attempt)
        stamp = payload.get("timestamp")
        moment = _moment(stamp) if stamp else attempt.answered_at or attempt.sent_at
        zone = self.zones.get(payload["tenant_id"], self.zone)
        return moment.astimezone(zone).date().isoformat()


@dataclass
class Counts:
    """What a scenario reports: pulses and what became of them."""

    sent: int = 0  # distinct pulses (a resend is the same pulse)
    requests: int = 0  # POST /pulses made, resends included
    acknowledged: int = 0  # pulses answered accepted or duplicate
    unknown: int = 0  # pulses without an id whose every answer was lost
    unknown_stored: int = 0  # ... of which the server holds (GET /pulses)
    counted: int = 0  # sum of pulse_count over GET /aggregates
    batches: int = 0
    delivered: int = 0  # sum of the pulse_count deltas of every delivered batch
    redelivered: int = 0  # batch deliveries beyond the first (http sink)
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self, scenario: str) -> str:
        more = "".join(f", {key} {value}" for key, value in self.extra.items())
        return (
            f"{scenario}: sent {self.sent} pulses in {self.requests} requests,"
            f" acknowledged {self.acknowledged}, unknown {self.unknown}"
            f" ({self.unknown_stored} stored), counted {self.counted},"
            f" {self.batches} batches delivering {self.delivered}"
            f" (redelivered {self.redelivered}){more}"
        )


def _fields(attempt: Attempt) -> Mapping[str, Any]:
    assert not isinstance(attempt.payload, bytes)
    return attempt.payload


def _signature(fields: Mapping[str, Any]) -> tuple[str, str, str, Decimal, dt.datetime]:
    return (
        fields["tenant_id"],
        fields["product_sku"],
        fields["use_unit"],
        Decimal(str(fields["used_amount"])),
        _moment(fields["timestamp"]),
    )


def _pulses(ledger: Ledger) -> dict[int, list[Attempt]]:
    """The attempts of each distinct pulse (a resend reuses its payload object)."""
    grouped: dict[int, list[Attempt]] = defaultdict(list)
    for attempt in ledger.attempts:
        grouped[id(attempt.payload)].append(attempt)
    return dict(grouped)


async def _stored_pulses(
    http: httpx.AsyncClient, url: str, keys: Iterable[tuple[str, str]]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for tenant, day in sorted(set(keys)):
        rows += await collect_pages(
            http, f"{url}/pulses", "pulses", {"tenant_id": tenant, "date": day}, limit=10_000
        )
    return rows


async def expected_totals(
    http: httpx.AsyncClient, server: ServerProcess, ledger: Ledger, counts: Counts
) -> dict[BucketKey, Total]:
    """What the server must hold, from the answers, checked pulse by pulse in GET /pulses.

    Pulses with an id: the stored ids are exactly those acknowledged, each
    once. Pulses without: each acknowledged one is stored exactly once, each
    rejected one (503 or 4xx, never accepted on a resend) not at all, and one
    whose every answer was lost at most once; those found stored join the
    expected totals.
    """
    problems = ledger.problems()
    assert problems == [], "the answers contradict each other:\n" + "\n".join(problems[:20])
    unresolved_ids = [a for a in ledger.unresolved() if a.identity is not None]
    assert unresolved_ids == [], f"{len(unresolved_ids)} pulses with an id never got an answer"
    acknowledged: Counter[tuple[Any, ...]] = Counter()
    maybe: Counter[tuple[Any, ...]] = Counter()
    maybe_attempt: dict[tuple[Any, ...], Attempt] = {}
    expected_ids: set[tuple[str, str]] = set()
    keys: set[tuple[str, str]] = set()
    pulses = _pulses(ledger)
    counts.sent = len(pulses)
    for attempts in pulses.values():
        first = attempts[0]
        if isinstance(first.payload, bytes):
            continue
        keys.add((_fields(first)["tenant_id"], ledger.day_of(first)))
        answers = {a.answer for a in attempts}
        stored = bool(answers & {"accepted", "duplicate"})
        counts.acknowledged += stored
        if first.identity is not None:
            if stored:
                expected_ids.add(first.identity)
            continue
        signature = _signature(_fields(first))
        if stored:
            acknowledged[signature] += 1
        elif "no answer" in answers or None in answers:
            maybe[signature] += 1
            maybe_attempt[signature] = first
            counts.unknown += 1
    rows = await _stored_pulses(http, server.url, keys)
    held_ids = Counter((row["tenant_id"], row["id"]) for row in rows if not row["id_assigned"])
    twice = [key for key, n in held_ids.items() if n > 1]
    assert twice == [], f"pulses stored twice: {twice[:10]}"
    assert set(held_ids) == expected_ids, (
        f"stored ids differ from acknowledged ones: {len(set(held_ids) - expected_ids)}"
        f" stored but not acknowledged (e.g. {sorted(set(held_ids) - expected_ids)[:5]}),"
        f" {len(expected_ids - set(held_ids))} acknowledged but not stored"
        f" (e.g. {sorted(expected_ids - set(held_ids))[:5]})"
    )
    held = Counter(
        (
            row["tenant_id"],
            row["product_sku"],
            row["use_unit"],
            Decimal(row["used_amount"]),
            _moment(row["timestamp"]),
        )
        for row in rows
        if row["id_assigned"]
    )
    totals = ledger.expected_totals()
    extra: dict[BucketKey, list[Decimal]] = defaultdict(list)
    for signature in held.keys() | acknowledged.keys():
        got, low = held[signature], acknowledged[signature]
        high = low + maybe[signature]
        assert low <= got <= high, (
            f"pulse without id {signature}: stored {got} times, acknowledged {low},"
            f" answer lost for {maybe[signature]}"
        )
        for _ in range(got - low):
            extra[ledger.bucket_of(maybe_attempt[signature])].append(signature[3])
            counts.unknown_stored += 1
    for key, amounts in extra.items():
        base = totals.get(key, Total(Decimal(0), 0))
        totals[key] = Total(exact_sum([base.amount, *amounts]), base.count + len(amounts))
    return totals


async def check_totals(
    http: httpx.AsyncClient, server: ServerProcess, expected: Mapping[BucketKey, Total]
) -> dict[BucketKey, Total]:
    rows = await collect_pages(http, f"{server.url}/aggregates", "aggregates", limit=1000)
    held = totals_of(rows)
    wrong = {
        key: (held.get(key), expected.get(key))
        for key in held.keys() | expected.keys()
        if held.get(key) != expected.get(key)
    }
    assert wrong == {}, f"{len(wrong)} buckets differ (held, expected): {list(wrong.items())[:10]}"
    return held


async def commit_days(
    http: httpx.AsyncClient, url: str, days: Iterable[str], *, within: float = 30.0
) -> list[dict[str, Any]]:
    """POST /aggregates/commit for each day (resent on 503); the batches made."""
    batches: list[dict[str, Any]] = []
    for day in sorted(set(days)):

        async def committed(day: str = day) -> httpx.Response | None:
            response = await http.post(f"{url}/aggregates/commit", json={"date": day})
            if response.status_code == 503:
                return None
            assert response.status_code == 200, f"commit {day}: {response.text[:300]}"
            return response

        response = await wait_until(committed, within=within, what=f"commit {day}", interval=0.1)
        assert response is not None
        batches += response.json()["batches"]
    return batches


async def wait_all_delivered(
    http: httpx.AsyncClient, url: str, *, within: float = 60.0
) -> list[dict[str, Any]]:
    """Wait until no batch is pending; fail on a failed one; return every batch."""

    rows: list[dict[str, Any]] = []

    async def settled() -> bool:
        rows[:] = await collect_pages(http, f"{url}/batches", "batches", limit=1000)
        failed = [row for row in rows if row["status"] == "failed"]
        assert failed == [], f"batches failed for good: {failed[:3]}"
        return all(row["status"] == "delivered" for row in rows)

    await wait_until(settled, within=within, what="every batch delivered", interval=0.1)
    return rows


def file_deliveries(server: ServerProcess) -> dict[str, set[bytes]]:
    """The file sink's deliveries: {batch_id: {body}} (one body per file)."""
    found: dict[str, set[bytes]] = defaultdict(set)
    if not server.deliveries.exists():
        return {}
    for path in server.deliveries.glob("*/*.json"):
        found[path.stem].add(path.read_bytes())
    return dict(found)


async def audit(
    server: ServerProcess,
    ledger: Ledger,
    *,
    delivered: Callable[[], dict[str, set[bytes]]] | None = None,
    counts: Counts | None = None,
    commit: bool = True,
    deliver_within: float = 60.0,
) -> Counts:
    """The four checks of the issue against a running server; the scenario's counts.

    `delivered` returns {batch_id: {bodies}} as the downstream received them
    (default: the file sink's files). The days the ledger touched are
    committed first unless `commit` is False.
    """
    counts = counts or Counts()
    counts.requests = len({a.answered_seq for a in ledger.attempts})
    deliveries = delivered or (lambda: file_deliveries(server))
    async with httpx.AsyncClient(timeout=60.0) as http:
        expected = await expected_totals(http, server, ledger, counts)
        held = await check_totals(http, server, expected)
        counts.counted = sum(total.count for total in held.values())
        if commit:
            await commit_days(http, server.url, {key[3] for key in expected})
        outbox = await wait_all_delivered(http, server.url, within=deliver_within)
        bodies = deliveries()
        outbox_ids = {row["batch_id"] for row in outbox}
        changed = {bid: len(seen) for bid, seen in bodies.items() if len(seen) > 1}
        assert changed == {}, f"batch ids delivered with different content: {changed}"
        assert outbox_ids <= set(bodies), (
            f"outbox batches never delivered: {sorted(outbox_ids - set(bodies))[:10]}"
        )
        assert set(bodies) <= outbox_ids, (
            f"deliveries of batches not in the outbox: {sorted(set(bodies) - outbox_ids)[:10]}"
        )
        for batch_id in sorted(bodies):
            response = await http.get(f"{server.url}/batches/{batch_id}")
            assert response.status_code == 200, response.text
            view = response.json()
            for name in DELIVERY_STATE:
                view.pop(name)
            (body,) = bodies[batch_id]
            assert msgspec.json.decode(body) == view, f"{batch_id}: body differs from the outbox"
        sums = delivered_sums({bid: next(iter(seen)) for bid, seen in bodies.items()})
        if commit:
            wrong = {
                key: (sums.get(key), held.get(key))
                for key in sums.keys() | held.keys()
                if sums.get(key) != held.get(key)
            }
            assert wrong == {}, f"delivered batches do not add up to the totals: {wrong}"
        counts.batches = len(bodies)
        counts.delivered = sum(total.count for total in sums.values())
    return counts


def delivered_sums(bodies: Mapping[str, bytes]) -> dict[BucketKey, Total]:
    """Each bucket's sum over its delivered batches, checking the revision chain.

    A bucket's records must carry revisions 1, 2, ... with no gap or repeat,
    and each record's total must be the running sum of the deltas so far.
    """
    records: dict[BucketKey, list[dict[str, Any]]] = defaultdict(list)
    for body in bodies.values():
        batch = msgspec.json.decode(body)
        assert batch["record_count"] == len(batch["records"]), batch["batch_id"]
        assert Decimal(batch["used_amount"]) == exact_sum(
            Decimal(r["used_amount"]) for r in batch["records"]
        ), batch["batch_id"]
        for record in batch["records"]:
            key = (record["tenant_id"], record["product_sku"], record["use_unit"], batch["date"])
            records[key].append(record)
    sums: dict[BucketKey, Total] = {}
    for key, chain in records.items():
        chain.sort(key=lambda r: r["revision"])
        assert [r["revision"] for r in chain] == list(range(1, len(chain) + 1)), (
            f"{key}: revisions {[r['revision'] for r in chain]}"
        )
        amount, count = Decimal(0), 0
        for record in chain:
            amount = exact_sum([amount, Decimal(record["used_amount"])])
            count += record["pulse_count"]
            assert (Decimal(record["total_amount"]), record["total_count"]) == (amount, count), (
                f"{key} revision {record['revision']}: total is not the running sum"
            )
        sums[key] = Total(amount, count)
    return sums


async def ingest(
    server: ServerProcess, ledger: Ledger, payloads: Sequence[Payload], *, per_request: int = 500
) -> None:
    """POST `payloads` as arrays of `per_request` until every pulse is stored (no faults)."""
    async with httpx.AsyncClient(timeout=30.0) as http:
        for start in range(0, len(payloads), per_request):
            chunk = list(payloads[start : start + per_request])

            async def stored(chunk: list[Payload] = chunk) -> bool:
                sent = await send_pulses(http, server.url, ledger, chunk, "array")
                assert sent.response is not None, sent.error
                assert sent.response.status_code in (202, 503), sent.response.text[:300]
                again = [a.payload for a in sent.attempts if a.needs_retry]
                chunk[:] = again
                return not again

            await wait_until(stored, within=30, what="pulses stored", interval=0.05)
