"""High cardinality and memory bounds: a client that sends endless distinct values.

A buggy client, or a tenant whose API key acts badly, sends pulses whose
tenant ids, SKUs, units, ids, amounts (spelled every way a decimal may be),
timestamps (every microsecond, every day of the late window, in many billing
time zones), request ids, API keys, content types, paths and query strings
never repeat. Whatever the service keeps per distinct value (intake's name
and day caches, `money.KNOWN_NANOS`, the partition cache, the SQLite store's
pending deltas and recent ids, the metrics' label sets, the client's line
heads) must stay bounded, and a cache cleared or evicted must never change
an answer or a total. Answers must stay usable when they are huge: pages of
GET /aggregates over very many buckets, a commit of a day holding very many
buckets (split into batches of `batch_max_records`), its delivery.

    plateau            100,000 then 50,000 pulses of distinct everything:
                       the server's RSS grows in the second phase, pulse
                       for pulse, by less than a quarter of the first;
                       every total is the ledger's, replays are duplicates
                       however spelled
    metrics            /metrics has the same series after a flood of
                       distinct paths, methods, keys, content types, queries
    cursor             a next_cursor of GET /aggregates is accepted back,
                       whatever the (valid) names of the page's last bucket
    big commit         a day of 3,000 buckets, batches of 7 records, then
                       late pulses: every bucket in batches adding up to it
    NATS               a day of 1,000 buckets with long (valid) names is
                       delivered with the default settings and NATS sink
    delivery pass      a pass of the deliverer holds the bodies it sends,
                       not every batch due
    reseller key       a page of GET /aggregates for a key of many tenants
                       holds about a page, as an admin's does
    caches             intake's names and days, KNOWN_NANOS and the client's
                       line heads, each past its bound, answer as before

Every wait is a poll with a deadline; servers and NATS streams are removed
at the end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import itertools
import os
import random
import socket
import tracemalloc
import uuid
import zoneinfo
from collections import Counter
from collections.abc import Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import msgspec
import nats
import nats.js.errors
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from ingestor import intake, money
from ingestor.auth import OPEN, Principal
from ingestor.client import _Encoder
from ingestor.clock import wall_clock_us
from ingestor.deliverer import Deliverer
from ingestor.intake import Rules, decode_pulses
from ingestor.model import Pulse
from ingestor.partition import partition_of
from ingestor.reads import list_aggregates
from ingestor.runtime import Runtime
from ingestor.store import AggregateQuery
from ingestor.store.sqlite import SQLiteStore
from tests.e2e.conftest import ABORTED_UPLOADS, StartServer
from tests.faults.harness import ZonedLedger, rss_kib
from tests.support.server import (
    Form,
    Ledger,
    Payload,
    ServerProcess,
    collect_pages,
    encode_body,
    outbox_problems,
    post_until_stored,
    totals_of,
    wait_until,
)

pytestmark = [pytest.mark.e2e, *ABORTED_UPLOADS]

ADMIN_KEY = "cardinality-admin-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
# Zones whose offsets are not whole hours, or that moved by other than an
# hour, or that are as far ahead or behind as any: their billing days begin
# at every odd moment of the UTC day.
ZONES = (
    "America/St_Johns",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
    "Asia/Tehran",
    "America/Caracas",
    "Pacific/Kiritimati",
    "Pacific/Pago_Pago",
    "Europe/London",
    "America/New_York",
    "Australia/Adelaide",
    "Asia/Kolkata",
    "America/Sao_Paulo",
    "Africa/Casablanca",
    "Europe/Dublin",
    "Pacific/Apia",
)
ZONED = {f"zoned-{i:02d}": ZONES[i % len(ZONES)] for i in range(48)}
JSON_TYPES = (
    "application/json",
    "application/json; charset=utf-8",
    "application/vnd.cardinality+json",
    "Application/JSON;charset=UTF-8",
)
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/x-jsonlines")
FILLERS = ("x", "é", "租", "ü", "Ω", "Ж")  # 1-, 2- and 3-byte UTF-8


def config_text(*, keys: bool = True, zones: bool = True) -> str:
    """A TOML settings file: an admin key (the only one), and the zoned tenants."""
    lines: list[str] = []
    if keys:
        digest = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
        lines += ["[[api_keys]]", f'sha256 = "{digest}"', 'role = "admin"', 'tenants = ["*"]']
    if zones:
        lines += ["[tenant_timezones]", *(f'"{t}" = "{z}"' for t, z in ZONED.items())]
    return "\n".join(lines) + "\n"


def yesterday() -> str:
    return (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).isoformat()


# -- distinct values ----------------------------------------------------------------


def spell(nanos: int, rng: random.Random) -> Any:
    """An amount of `nanos` nano-units, spelled one of the many valid ways."""
    value = Decimal(nanos).scaleb(-9)
    text = format(value.normalize(), "f") if nanos else "0"
    choice = rng.randrange(8)
    if choice == 0:
        return int(value) if nanos % 10**9 == 0 else value  # a JSON number
    if choice == 1:
        return text
    if choice == 2:
        return text + ("000" if "." in text else ".000")  # trailing zeros
    if choice == 3:
        return f"{nanos}e-9"
    if choice == 4:
        return Decimal(f"{nanos}E-9")  # a JSON number with an exponent
    if choice == 5:
        return f"{nanos * 1000}E-12"
    if choice == 6:
        return f"{format(Decimal(nanos).scaleb(-12), 'f')}e3"
    return Decimal(text)


# Spellings README says are not amounts: each such pulse must be rejected.
INVALID_AMOUNTS = ("01", "+1", " 1", ".5", "1_0", "1e-10", "0x10", "1.", "-1", "NaN")


class DistinctPulses:
    """Pulses whose every value is new: names of up to their 128 (units 64)
    characters, some multi-byte, ids, amounts spelled every way, timestamps of every
    microsecond of the last 34 days with every offset; some for tenants
    billed in their own zones."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.serial = itertools.count()
        self.tag = f"{seed:x}"

    def name(self, what: str, n: int, limit: int) -> str:
        rng = self.rng
        head = f"{what}{self.tag}-{n:x}-"
        filler = FILLERS[rng.randrange(len(FILLERS))]
        return head + filler * rng.randrange(limit // 2 - len(head), limit - len(head))

    def pulse(self, now: dt.datetime) -> dict[str, Any]:
        rng = self.rng
        n = next(self.serial)
        if rng.random() < 0.02:
            tenant = f"zoned-{rng.randrange(len(ZONED)):02d}"
        else:
            tenant = self.name("t", n, 128)
        moment = now - dt.timedelta(microseconds=rng.randrange(3_600 * 10**6, 34 * 86_400 * 10**6))
        offset = dt.timedelta(minutes=rng.choice((0, 0, 345, -210, 840, -570, 765)))
        stamp = moment.astimezone(dt.timezone(offset)).isoformat()
        if rng.random() < 0.5:
            stamp = stamp.replace("+00:00", "Z")
        amount: Any = spell(rng.randrange(10**15), rng)
        if rng.random() < 0.01:
            amount = rng.choice(INVALID_AMOUNTS)
        return {
            "tenant_id": tenant,
            "product_sku": self.name("s", n, 128),
            "use_unit": self.name("u", n, 64),
            "used_amount": amount,
            "id": f"{self.tag}:{n}:{rng.getrandbits(48):x}",
            "timestamp": stamp,
        }


async def post_pulses(
    http: httpx.AsyncClient,
    server: ServerProcess,
    ledger: Ledger,
    payloads: Sequence[Payload],
    *,
    content_type: str,
    request_id: str,
) -> httpx.Response:
    """POST `payloads` with `content_type` (an array or NDJSON as it says); in `ledger`."""
    form: Form = "ndjson" if content_type in NDJSON_TYPES else "array"
    body, _ = encode_body(payloads, form)
    attempts = ledger.sent(payloads, form)
    response = await http.post(
        f"{server.url}/pulses",
        content=body,
        headers={"Content-Type": content_type, "X-Request-Id": request_id},
    )
    ledger.answered(attempts, response)
    return response


def forged_cursor(rng: random.Random) -> str:
    key = [yesterday(), f"t{rng.getrandbits(64):x}", f"s{rng.getrandbits(32):x}", "u"]
    return base64.urlsafe_b64encode(msgspec.json.encode(key)).decode().rstrip("=")


async def noise(http: httpx.AsyncClient, server: ServerProcess, rng: random.Random) -> Counter[int]:
    """Requests that each carry a value never seen before: keys, paths, methods,
    query strings, cursors, request ids. Their statuses, counted."""
    statuses: Counter[int] = Counter()
    url = server.url
    for i in range(40):
        token = f"{rng.getrandbits(128):x}"
        rid = {"X-Request-Id": f"noise-{token}" + "/:@=+" * rng.randrange(40)}
        answers = [
            await http.post(
                f"{url}/pulses",
                json=[{"tenant_id": "t", "product_sku": "s", "use_unit": "u", "used_amount": 1}],
                headers={"Authorization": f"Bearer wrong-{token}", **rid},
            ),
            await http.get(f"{url}/{token}/{i}", headers=rid),
            await http.request(f"X{token[:10].upper()}", f"{url}/aggregates", headers=rid),
            await http.get(
                f"{url}/aggregates",
                params={"tenant_id": f"t{token}", "cursor": forged_cursor(rng), "limit": "3"},
                headers=rid,
            ),
            await http.get(f"{url}/aggregates", params={"cursor": token}, headers=rid),
            await http.get(
                f"{url}/pulses",
                params={"tenant_id": f"t{token}", "date": yesterday(), "cursor": "MTIz"},
                headers=rid,
            ),
            await http.get(f"{url}/batches/{token}", headers=rid),
            await http.post(
                f"{url}/pulses",
                content=b"[]",
                headers={"Content-Type": f"text/x-{token}", **rid},
            ),
        ]
        statuses.update(answer.status_code for answer in answers)
    return statuses


# -- the plateau ------------------------------------------------------------------------

FIRST_PHASE = 100_000  # enough to fill every bounded structure, SQLite's page cache too
SECOND_PHASE = 50_000
REQUEST_PULSES = 10_000


async def test_sustained_distinct_values_plateau_and_every_total_stays_exact(
    start_server: StartServer,
) -> None:
    """A phase of 100,000 pulses whose every value is new (and the noise of
    every other distinct value a client can send), then another of 50,000:
    whatever is kept per distinct value must be bounded by the end of the
    first (SQLite's page cache, 80 MiB, is full by then), so the second may
    grow the server's RSS, pulse for pulse, by a quarter of what the first
    did at most. Then every bucket holds exactly what was acknowledged, no
    amount README calls invalid was taken, and replays of ids from both
    phases, their amounts spelled anew, are duplicates (the caches are long
    past their bounds, the ids merged into the index)."""
    server = await start_server(config=config_text(), INGESTOR_DURABILITY="os")
    assert server.pid is not None
    zones = {tenant: zoneinfo.ZoneInfo(zone) for tenant, zone in ZONED.items()}
    ledger = ZonedLedger(zones)
    made = DistinctPulses(seed=0xC0FFEE)
    rng = random.Random(7)
    types = itertools.cycle(JSON_TYPES + NDJSON_TYPES)
    statuses: Counter[int] = Counter()
    async with httpx.AsyncClient(timeout=120.0, headers=AUTH) as http:

        async def phase(pulses: int) -> int:
            for _ in range(pulses // REQUEST_PULSES):
                now = dt.datetime.now(dt.UTC)
                response = await post_pulses(
                    http,
                    server,
                    ledger,
                    [made.pulse(now) for _ in range(REQUEST_PULSES)],
                    content_type=next(types),
                    request_id=f"{rng.getrandbits(96):x}",
                )
                assert response.status_code == 202, response.text[:500]
            statuses.update(await noise(http, server, rng))
            # Anything that reads buckets folds the deltas held in memory.
            folded = await http.get(f"{server.url}/aggregates", params={"limit": "1"})
            assert folded.status_code == 200, folded.text[:300]
            return rss_kib(server.pid or 0)

        # A first request of each kind, so the baseline has every module loaded.
        start = dt.datetime.now(dt.UTC)
        warm = await post_pulses(
            http,
            server,
            ledger,
            [made.pulse(start) for _ in range(100)],
            content_type="application/json",
            request_id="warm",
        )
        assert warm.status_code == 202, warm.text[:300]
        statuses.update(await noise(http, server, rng))
        baseline = rss_kib(server.pid)
        first = await phase(FIRST_PHASE)
        second = await phase(SECOND_PHASE)
        grown_first, grown_second = first - baseline, second - first
        assert grown_second / SECOND_PHASE <= grown_first / FIRST_PHASE / 4, (
            f"RSS {baseline / 1024:.0f} MiB, after {FIRST_PHASE} pulses of distinct values"
            f" {first / 1024:.0f} MiB (+{grown_first / 1024:.0f}), after {SECOND_PHASE} more"
            f" {second / 1024:.0f} MiB (+{grown_second / 1024:.0f}): what it keeps per value"
            " is not bounded"
        )
        assert set(statuses) <= {200, 400, 401, 404, 405, 415}, statuses

        # Replays of ids acknowledged in either phase, spelled anew, then with
        # another amount: duplicates, then conflicts; nothing counted again.
        stored = [a.payload for a in ledger.stored() if not isinstance(a.payload, bytes)]
        picked = [p for p in rng.sample(stored, 3_600) if not isinstance(p, bytes)]
        replays: list[Payload] = []
        for sent in picked[:3_000]:
            payload = dict(sent)
            nanos = int(Decimal(str(payload["used_amount"])).scaleb(9))
            payload["used_amount"] = spell(nanos, rng)
            replays.append(payload)
        for sent in picked[3_000:]:
            payload = dict(sent)
            payload["used_amount"] = f"{Decimal(str(payload['used_amount'])) + 1}"
            replays.append(payload)
        for start_at in range(0, len(replays), 2_000):
            response = await post_pulses(
                http,
                server,
                ledger,
                replays[start_at : start_at + 2_000],
                content_type="application/json",
                request_id=f"replay-{start_at}",
            )
            assert response.status_code == 202, response.text[:300]
        tally = Counter(a.answer for a in ledger.attempts[-len(replays) :])
        assert tally == {"duplicate": 3_000, "conflict": 600}, tally
        assert ledger.problems() == []
        answers = ledger.answers()
        assert answers["accepted"] > (FIRST_PHASE + SECOND_PHASE) * 0.98, answers
        taken = [
            a.payload
            for a in ledger.attempts
            if not isinstance(a.payload, bytes)
            and a.payload["used_amount"] in INVALID_AMOUNTS
            and a.answer != "rejected"
        ]
        assert taken == [], f"{len(taken)} invalid amounts taken, such as {taken[:3]}"

        rows = await collect_pages(
            http, f"{server.url}/aggregates", "aggregates", limit=10_000, max_pages=1_000
        )
    expected = ledger.expected_totals()
    held = totals_of(rows)
    missing = sorted(expected.keys() - held.keys())
    extra = sorted(held.keys() - expected.keys())
    wrong = [
        (k, expected[k], held[k]) for k in expected.keys() & held.keys() if expected[k] != held[k]
    ]
    assert (missing[:3], extra[:3], wrong[:3]) == ([], [], []), (
        f"{len(missing)} buckets missing, {len(extra)} not acknowledged, {len(wrong)} wrong"
    )


# -- /metrics --------------------------------------------------------------------------


def series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every sample of a Prometheus text exposition, by name and labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_series_stay_the_same_whatever_distinct_values_clients_send(
    start_server: StartServer,
) -> None:
    """No label of /metrics takes a value a client chose: after one request of
    each kind, 20 to 120 more of each kind with values never seen before (paths,
    methods, keys, content types, request ids, tenants, query strings,
    cursors) add no series, and the scrape does not grow."""
    server = await start_server(config=config_text(zones=False), INGESTOR_DURABILITY="os")
    rng = random.Random(11)
    made = DistinctPulses(seed=0xBEEF)
    ledger = Ledger()
    async with httpx.AsyncClient(timeout=60.0, headers=AUTH) as http:

        async def traffic(requests: int) -> None:
            for i in range(requests):
                now = dt.datetime.now(dt.UTC)
                response = await post_pulses(
                    http,
                    server,
                    ledger,
                    [made.pulse(now) for _ in range(50)],
                    content_type=JSON_TYPES[i % len(JSON_TYPES)],
                    request_id=f"{rng.getrandbits(96):x}",
                )
                assert response.status_code == 202, response.text[:300]

        await traffic(1)
        await noise(http, server, random.Random(1))
        await http.get(f"{server.url}/metrics")  # counted after it answers: the next shows it
        before = (await http.get(f"{server.url}/metrics")).text
        await traffic(20)
        for round_ in range(3):
            await noise(http, server, random.Random(100 + round_))
        after = (await http.get(f"{server.url}/metrics")).text
    new = sorted(series(after) - series(before))
    assert new == [], f"{len(new)} new series, such as {new[:5]}"
    assert len(after) <= len(before) * 1.1 + 512, (len(before), len(after))


# -- GET /aggregates: a cursor for every valid name ---------------------------------


@pytest.mark.parametrize(
    "filler",
    [
        pytest.param("租", id="cjk"),
        pytest.param("😀", id="emoji"),
    ],
)
async def test_aggregates_cursor_is_accepted_back_whatever_names_the_page_ends_on(
    start_server: StartServer, filler: str
) -> None:
    """Tenant, SKU and unit of 128, 128 and 64 characters are valid in any
    script (DESIGN §4). A reconciler that follows `next_cursor` must get every
    bucket; a cursor the API gave out must not be refused."""
    server = await start_server(INGESTOR_DURABILITY="os")
    day = yesterday()
    pulses = [
        {
            "tenant_id": filler * 128,
            "product_sku": f"{n}" + filler * 127,
            "use_unit": filler * 64,
            "used_amount": f"{n + 1}.5",
            "id": f"c-{n}",
            "timestamp": f"{day}T12:00:00Z",
        }
        for n in range(3)
    ]
    ledger = Ledger()
    async with httpx.AsyncClient(timeout=30.0) as http:
        await post_until_stored(http, server.url, ledger, pulses)
        rows: list[dict[str, Any]] = []
        cursor: str | None = None
        for page in range(10):
            params = {"limit": "1", **({"cursor": cursor} if cursor else {})}
            response = await http.get(f"{server.url}/aggregates", params=params)
            assert response.status_code == 200, (
                f"page {page + 1}, with the cursor page {page} gave out"
                f" ({len(cursor or '')} characters): {response.status_code} {response.text[:300]}"
            )
            rows += response.json()["aggregates"]
            cursor = response.json()["next_cursor"]
            if cursor is None:
                break
    assert totals_of(rows) == ledger.expected_totals()


# -- a day of very many buckets ------------------------------------------------------


async def fetch_batches(
    http: httpx.AsyncClient, url: str, ids: Sequence[str]
) -> list[dict[str, Any]]:
    """GET /batches/{id} of each of `ids`, eight at a time."""
    found: dict[str, dict[str, Any]] = {}
    limiter = trio.CapacityLimiter(8)

    async def one(batch_id: str) -> None:
        async with limiter:
            response = await http.get(f"{url}/batches/{batch_id}")
        assert response.status_code == 200, response.text[:300]
        found[batch_id] = response.json()

    async with trio.open_nursery() as nursery:
        for batch_id in ids:
            nursery.start_soon(one, batch_id)
    return [found[batch_id] for batch_id in ids]


async def test_commit_of_a_day_of_many_buckets_splits_it_exactly(
    start_server: StartServer,
) -> None:
    """3,000 buckets of 300 tenants on one day, committed in batches of at most
    7 records (`batch_max_records`), then late pulses for 500 of them and 100
    new ones, committed again: every batch at most 7 records, listed once by
    GET /batches page after page, and each bucket's batches revisions 1..n
    adding up to its total. The audit trail of the busiest tenant pages too."""
    server = await start_server(INGESTOR_BATCH_MAX_RECORDS="7", INGESTOR_DURABILITY="os")
    day = yesterday()
    rng = random.Random(3)
    ledger = Ledger()

    def pulse(tenant: int, sku: int, n: int) -> dict[str, Any]:
        return {
            "tenant_id": f"tenant-{tenant:03d}",
            "product_sku": f"sku-{sku}",
            "use_unit": "call",
            "used_amount": spell(rng.randrange(1, 10**13), rng),
            "id": f"{tenant}-{sku}-{n}",
            "timestamp": f"{day}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:00.{n:06d}Z",
        }

    first = [pulse(t, s, n) for t in range(300) for s in range(10) for n in range(1 + (t + s) % 3)]
    late = [pulse(t, s, 9) for t in range(0, 300, 3) for s in range(5)]
    late += [pulse(t, 10, 0) for t in range(100)]
    async with httpx.AsyncClient(timeout=60.0) as http:
        url = server.url
        made: list[dict[str, Any]] = []
        for pulses in (first, late):
            for at in range(0, len(pulses), 2_000):
                await post_until_stored(http, url, ledger, pulses[at : at + 2_000])
            response = await http.post(f"{url}/aggregates/commit", json={"date": day})
            assert response.status_code == 200, response.text[:300]
            made += response.json()["batches"]
        assert all(1 <= b["record_count"] <= 7 for b in made), made[:3]
        assert sum(b["record_count"] for b in made) == 3_000 + 500 + 100
        assert Counter(b["kind"] for b in made)["correction"] >= 500 // 7

        listed = await collect_pages(
            http, f"{url}/batches", "batches", {"date": day}, limit=100, max_pages=100
        )
        listed_ids = [b["batch_id"] for b in listed]
        assert sorted(listed_ids) == sorted(b["batch_id"] for b in made)
        assert len(set(listed_ids)) == len(listed_ids)
        batches = await fetch_batches(http, url, listed_ids)
        assert outbox_problems(batches, ledger.expected_totals()) == []

        aggregates = await collect_pages(http, f"{url}/aggregates", "aggregates", limit=97)
        assert totals_of(aggregates) == ledger.expected_totals()
        trail = await collect_pages(
            http, f"{url}/pulses", "pulses", {"tenant_id": "tenant-000", "date": day}, limit=3
        )
    sent = {str(p["id"]) for p in first + late if p["tenant_id"] == "tenant-000"}
    assert sorted(row["id"] for row in trail) == sorted(sent)


# -- NATS: a batch of long names -----------------------------------------------------


def nats_is_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 4222), timeout=1):
            return True
    except OSError:
        return False


async def delete_stream(name: str) -> None:
    async def run() -> None:
        client = await nats.connect("nats://127.0.0.1:4222", allow_reconnect=False)
        try:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await client.jsm().delete_stream(name)
        finally:
            await client.close()

    await trio.to_thread.run_sync(asyncio.run, run())


async def test_nats_delivers_a_day_of_buckets_with_long_names(start_server: StartServer) -> None:
    """1,000 buckets whose names are valid (128, 128 and 64 characters, in
    Chinese), committed with the default `batch_max_records`, to the NATS
    sink with its server's default max_payload (1 MiB): each unit of usage
    must reach the billing side. The commit decides how many records a
    batch holds, never how many bytes, so it must not make a batch the sink
    can never take."""
    if not nats_is_up():
        message = "NATS is not running on 127.0.0.1:4222: run `bash .ci/services`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    tag = uuid.uuid4().hex[:10]
    stream = f"CARDINALITY_{tag}"
    try:
        server = await start_server(
            INGESTOR_DURABILITY="os",
            INGESTOR_PARTITIONS="1",
            INGESTOR_SINK="nats://127.0.0.1:4222",
            INGESTOR_NATS_STREAM=stream,
            INGESTOR_NATS_SUBJECT=f"cardinality.{tag}.{{date}}",
            INGESTOR_RETRY_INITIAL="0.1",
            INGESTOR_RETRY_MAX="0.5",
        )
        day = yesterday()
        pulses = [
            {
                "tenant_id": "租" * 128,
                "product_sku": f"{n:05d}" + "品" * 123,
                "use_unit": "单" * 64,
                "used_amount": "1",
                "id": f"n-{n}",
                "timestamp": f"{day}T12:00:00Z",
            }
            for n in range(1_000)
        ]
        ledger = Ledger()
        async with httpx.AsyncClient(timeout=60.0) as http:
            await post_until_stored(http, server.url, ledger, pulses)
            response = await http.post(f"{server.url}/aggregates/commit", json={"date": day})
            assert response.status_code == 200, response.text[:300]

            async def settled() -> list[dict[str, Any]] | None:
                rows = await collect_pages(
                    http, f"{server.url}/batches", "batches", {"date": day}, limit=100
                )
                return None if any(r["status"] == "pending" for r in rows) else rows

            rows = await wait_until(settled, within=30.0, what="every batch settled") or []
        failed = [(r["batch_id"], r["record_count"], r["last_error"]) for r in rows]
        assert all(r["status"] == "delivered" for r in rows), (
            f"batches that can never be delivered: {failed}"
        )
        assert sum(r["record_count"] for r in rows) == 1_000
    finally:
        await delete_stream(stream)


# -- the deliverer: what one pass holds ------------------------------------------------


class DiscardingSink:
    """A sink that confirms every batch at once and keeps nothing but sizes."""

    name = "discard"

    def __init__(self) -> None:
        self.sizes: list[int] = []

    async def deliver(self, batch_id: str, day: str, body: bytes) -> None:
        self.sizes.append(len(body))
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        return None


async def test_a_delivery_pass_holds_what_it_sends_not_every_batch_due(tmp_path: Path) -> None:
    """A day of 16,000 buckets with long names, committed on 16 partitions in
    batches of 250 records: 64 batches of ~260 KB. The deliverer sends
    `delivery_concurrency` (4) at a time; the bodies it holds at once should
    be about that many, not every batch due (up to 100 a partition: with the
    default 1,000 records a batch and 1,024 partitions allowed, gigabytes
    after the commit of a big day, or a sink's outage)."""
    partitions = 16
    store = SQLiteStore.open(
        tmp_path / "store", partitions=partitions, durability="os", busy_timeout=10
    )
    try:
        day = yesterday()
        by_partition: dict[int, list[Pulse]] = {}
        for n in range(16_000):
            tenant = f"{n:05d}" + "租" * 123
            pulse = Pulse(tenant, f"{n:06d}" + "品" * 122, "单" * 64, 10**9, "", False, 0, day, b"")
            by_partition.setdefault(partition_of(tenant, partitions), []).append(pulse)
        with store.writing_together():
            for partition, pulses in by_partition.items():
                store.write_pulses(partition, pulses, wall_clock_us(), ids=False)
        made = [
            batch
            for partition in range(partitions)
            for batch in store.commit_day(partition, day, wall_clock_us(), 250)
        ]
        sink = DiscardingSink()
        deliverer = Deliverer(
            store, sink, concurrency=4, retry_initial=1.0, retry_max=5.0, lease=25.0
        )
        tracemalloc.start()
        try:
            held_before = tracemalloc.get_traced_memory()[0]
            attempted = await deliverer.deliver_due()
            peak = tracemalloc.get_traced_memory()[1] - held_before
        finally:
            tracemalloc.stop()
    finally:
        store.close()
    assert attempted == len(made) == len(sink.sizes) == 64
    largest = max(sink.sizes)
    bound = 8 * largest + 2 * 2**20
    assert peak <= bound, (
        f"one pass of {attempted} batches ({sum(sink.sizes) / 2**20:.1f} MiB of bodies, the"
        f" largest {largest / 1024:.0f} KiB) peaked at {peak / 2**20:.1f} MiB of Python memory;"
        f" sending 4 at a time needs about {bound / 2**20:.1f} MiB"
    )


# -- intake's caches, KNOWN_NANOS and the client's heads, past their bounds ------------


def rules(**overrides: Any) -> Rules:
    settings: dict[str, Any] = {
        "late_window_s": 35 * 86_400.0,
        "future_skew_s": 300.0,
        "max_batch": 10_000,
        "billing_timezone": "UTC",
        "tenant_timezones": dict(ZONED),
    }
    settings.update(overrides)
    return Rules(**settings)


def test_intake_name_cache_stays_bounded_and_every_pulse_keeps_its_own_names() -> None:
    """300,000 distinct names in 10 requests (the cache shares up to 65,536 and
    is cleared past that): the cache never holds more than its bound and one
    request's names, and each decoded pulse carries exactly the names sent."""
    found = rules()
    now = wall_clock_us()
    largest = 0
    for request in range(10):
        body: list[dict[str, Any]] = [
            {
                "tenant_id": f"t{request}-{n}",
                "product_sku": f"s{request}-{n}",
                "use_unit": f"u{request}-{n}",
                "used_amount": n,
            }
            for n in range(10_000)
        ]
        decoded = decode_pulses(msgspec.json.encode(body), "application/json", found, now)
        largest = max(largest, len(found.names))
        assert decoded.items == []
        got = sorted(
            (p.tenant_id, p.product_sku, p.use_unit, p.nanos)
            for pulses in decoded.tenants.values()
            for p in pulses
        )
        sent = sorted(
            (p["tenant_id"], p["product_sku"], p["use_unit"], p["used_amount"] * 10**9)
            for p in body
        )
        assert got == sent
    assert largest <= intake._NAMES_MAX + 3 * 10_000, largest


def days_of(found: Rules, tenant: str, stamps: Sequence[int]) -> Iterator[tuple[int, str, str]]:
    """(moment, the day intake gives it, the day its tenant's zone gives it) of each of `stamps`."""
    zone = zoneinfo.ZoneInfo(ZONED.get(tenant, "UTC"))
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    for ts in stamps:
        want = (epoch + dt.timedelta(microseconds=ts)).astimezone(zone).date().isoformat()
        yield ts, found.day_of(tenant, ts), want


def test_intake_day_cache_stays_bounded_and_exact_in_every_zone() -> None:
    """A late window of three years holds ~105,000 quarter hours per zone,
    past the day cache's bound (it is cleared at 100,000): every microsecond
    asked, in each zone, gets the day its zone gives it, before and after the
    cache is cleared, at midnights and DST changes too."""
    found = rules(late_window_s=3 * 365 * 86_400.0)
    rng = random.Random(5)
    now = wall_clock_us()
    slot = 15 * 60 * 10**6
    first = now - 3 * 365 * 86_400 * 10**6
    wrong: list[tuple[str, int, str, str]] = []
    for tenant in ("someone", "zoned-00", "zoned-02"):
        # Every quarter hour's first and last microsecond, in an order that
        # fills the cache past its bound; one between them in some.
        starts = list(range(first - first % slot, now, slot))
        rng.shuffle(starts)
        stamps = [ts for start in starts for ts in (start, start + slot - 1)]
        stamps += [start + rng.randrange(slot) for start in starts[::10]]
        for ts, got, want in days_of(found, tenant, stamps):
            if got != want:
                wrong.append((tenant, ts, got, want))
        sizes = [len(days) for days in found._days.values()]
        assert max(sizes) <= 100_001, sizes
    assert wrong[:5] == [], f"{len(wrong)} moments on the wrong billing day"


def test_known_nanos_stays_bounded_and_every_spelling_converts_exactly() -> None:
    """20,000 amounts, each spelled another way (numbers, strings, exponents,
    trailing zeros), through intake: `KNOWN_NANOS` stops growing at its bound,
    and every amount, cached, uncached or past the bound, converts exactly."""
    saved = dict(money.KNOWN_NANOS)
    money.KNOWN_NANOS.clear()
    try:
        found = rules()
        rng = random.Random(9)
        now = wall_clock_us()
        wrong: list[tuple[Any, int, int]] = []
        for _ in range(4):
            nanos = [rng.randrange(10**17) for _ in range(5_000)]
            spelled = [spell(n, rng) for n in nanos]
            body = [
                {"tenant_id": "t", "product_sku": "s", "use_unit": "u", "used_amount": a}
                for a in spelled
            ]
            decoded = decode_pulses(encode_body(body, "array")[0], "application/json", found, now)
            assert decoded.items == []
            got = [p.nanos for p in decoded.tenants["t"]]
            wrong += [(a, n, g) for a, n, g in zip(spelled, nanos, got, strict=True) if n != g]
            assert len(money.KNOWN_NANOS) <= money._KNOWN_MAX
        assert wrong[:5] == [], f"{len(wrong)} amounts converted wrongly"
        assert len(money.KNOWN_NANOS) == money._KNOWN_MAX
    finally:
        money.KNOWN_NANOS.clear()
        money.KNOWN_NANOS.update(saved)


def test_client_line_heads_stay_bounded_and_every_line_is_its_pulse() -> None:
    """The client keeps a line head per (tenant, SKU, unit) up to 10,000 and
    then starts again: 25,000 distinct ones give each line its own names."""
    encoder = _Encoder(stamp=False)
    for n in range(25_000):
        names = (f"t{n}-" + "é" * (n % 50), f"s{n}", f"u{n % 7}")
        pulse_id, line = encoder.encode(
            *names, Decimal(n).scaleb(-3), pulse_id=None, timestamp=None
        )
        fields = msgspec.json.decode(line)
        assert (fields["tenant_id"], fields["product_sku"], fields["use_unit"]) == names
        assert Decimal(fields["used_amount"]) == Decimal(n).scaleb(-3)
        assert fields["id"] == pulse_id
        assert len(encoder._heads) <= 10_000


# -- GET /aggregates for a key of many tenants -----------------------------------------


async def test_a_page_for_a_key_of_many_tenants_holds_about_a_page(tmp_path: Path) -> None:
    """A read key scoped to 40 tenants (a reseller's), each with 400 buckets:
    a page of 400 rows should hold about a page in memory, as an admin key's
    does, not 400 rows of each of the key's tenants (with `limit` 10,000 and
    a key of 100 busy tenants, a million rows for one request)."""
    partitions = 16
    store = SQLiteStore.open(
        tmp_path / "store", partitions=partitions, durability="os", busy_timeout=10
    )
    try:
        day = yesterday()
        tenants = [f"reseller-tenant-{i:03d}" for i in range(40)]
        by_partition: dict[int, list[Pulse]] = {}
        for tenant in tenants:
            by_partition.setdefault(partition_of(tenant, partitions), []).extend(
                Pulse(tenant, f"sku-{k:04d}-" + "x" * 60, "call", 10**9, "", False, 0, day, b"")
                for k in range(400)
            )
        with store.writing_together():
            for partition, pulses in by_partition.items():
                store.write_pulses(partition, pulses, wall_clock_us(), ids=False)
        runtime = cast(Runtime, SimpleNamespace(store=store))
        store.aggregates(AggregateQuery(limit=1))  # folded before either is measured
        peaks: dict[str, int] = {}
        pages: dict[str, list[Any]] = {}
        for who, principal in (
            ("admin", OPEN),
            ("reseller", Principal("read", frozenset(tenants), "reseller")),
        ):
            tracemalloc.start()
            try:
                page = await list_aggregates(runtime, principal, {"limit": "400"})
                peaks[who] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            pages[who] = page.aggregates
    finally:
        store.close()
    assert pages["reseller"] == pages["admin"]
    assert peaks["reseller"] <= 3 * peaks["admin"] + 2**20, (
        f"a page of 400 rows took {peaks['admin'] / 2**20:.1f} MiB for an admin key and"
        f" {peaks['reseller'] / 2**20:.1f} MiB for a key of {len(tenants)} tenants"
    )
