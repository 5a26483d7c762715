"""The issue's acceptance, end to end: real server processes, HTTP, delivered files.

Every expected total is computed on the client side, with Decimal, from the
answers the server gave (`Ledger`), never read back from the server first.
Timestamps are earlier today or yesterday (UTC, the default billing zone),
so the late window and the future skew never get in the way.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import random
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import trio

from tests.e2e.conftest import ABORTED_UPLOADS, StartServer
from tests.support.server import (
    Attempt,
    BucketKey,
    Form,
    Ledger,
    Payload,
    Sent,
    ServerProcess,
    Total,
    collect_pages,
    encode_body,
    exact_sum,
    send_pulses,
    totals_of,
    wait_until,
)

pytestmark = [pytest.mark.e2e, *ABORTED_UPLOADS]

DELIVERY_STATE = {"status", "attempts", "last_error", "next_attempt_at", "delivered_at"}
MAX_AMOUNT = Decimal("999999999999999999.999999999")
Expect = str | frozenset[str]  # one status, or the statuses a race may end in


# -- times and pulses ------------------------------------------------------------


@dataclass(frozen=True)
class Days:
    """Today and yesterday (UTC), and timestamps inside them that are not in the future."""

    now: dt.datetime
    today: dt.date
    yesterday: dt.date

    @classmethod
    def current(cls) -> Days:
        now = dt.datetime.now(dt.UTC)
        return cls(now, now.date(), now.date() - dt.timedelta(days=1))

    def earlier_today(self, rng: random.Random) -> dt.datetime:
        midnight = dt.datetime.combine(self.today, dt.time(), dt.UTC)
        return midnight + (self.now - midnight) * rng.random()

    def during_yesterday(self, rng: random.Random) -> dt.datetime:
        midnight = dt.datetime.combine(self.yesterday, dt.time(), dt.UTC)
        return midnight + dt.timedelta(seconds=rng.uniform(0, 86_399))


def stamp(moment: dt.datetime, offset_minutes: int = 0) -> str:
    """RFC 3339 with an offset; UTC is written as Z."""
    zone = dt.timezone(dt.timedelta(minutes=offset_minutes))
    return moment.astimezone(zone).isoformat().replace("+00:00", "Z")


def random_amount(rng: random.Random) -> Decimal | str | int:
    """A JSON number (int or exact decimal) or a decimal string, 0 to 9 fractional digits."""
    digits = rng.randint(0, 9)
    value = Decimal(rng.randint(0, 10**12)).scaleb(-digits)
    kind = rng.randrange(3)
    if kind == 0:
        return value  # encoded as a JSON number, written exactly
    if kind == 1:
        return f"{value:f}"
    return rng.randint(0, 10_000)


def pulse(tenant: str, sku: str, unit: str, amount: object, **extra: object) -> dict[str, Any]:
    return {
        "tenant_id": tenant,
        "product_sku": sku,
        "use_unit": unit,
        "used_amount": amount,
        **extra,
    }


def invalid_pulses(days: Days) -> list[dict[str, Any]]:
    """One pulse object for each way a pulse can be wrong; each must come back `rejected`."""
    ok = {"tenant_id": "acme", "product_sku": "sku-basic", "use_unit": "api_call"}
    when = stamp(days.now - dt.timedelta(minutes=1))
    return [
        {**ok, "used_amount": -1},
        {**ok, "used_amount": "-0.5"},
        {**ok, "used_amount": "1.0000000001"},  # 10 fractional digits
        {**ok, "used_amount": Decimal("2.0000000001")},
        {**ok, "used_amount": "1000000000000000000"},  # 19 integer digits
        {**ok, "used_amount": "NaN"},
        {**ok, "used_amount": "Infinity"},
        {**ok, "used_amount": "ten"},
        {**ok, "used_amount": ""},
        {**ok, "used_amount": True},
        {**ok, "used_amount": None},
        {"tenant_id": "acme", "product_sku": "sku-basic", "use_unit": "api_call"},
        {**ok, "tenant_id": "", "used_amount": 1},
        {**ok, "tenant_id": "t" * 129, "used_amount": 1},
        {**ok, "product_sku": "sku\nbasic", "used_amount": 1},
        {**ok, "product_sku": "sku\x7f", "used_amount": 1},
        {**ok, "use_unit": "u" * 65, "used_amount": 1},
        {**ok, "used_amount": 1, "amount": 1},  # unknown field
        {**ok, "used_amount": 1, "tenantid": "acme"},  # a typo must not pass
        {**ok, "used_amount": 1, "id": ""},
        {**ok, "used_amount": 1, "id": "i" * 129},
        {**ok, "used_amount": 1, "id": 12345},
        {**ok, "used_amount": 1, "timestamp": when.removesuffix("Z")},  # no offset
        {**ok, "used_amount": 1, "timestamp": stamp(days.now + dt.timedelta(hours=1))},
        {**ok, "used_amount": 1, "timestamp": stamp(days.now - dt.timedelta(days=40))},
        {**ok, "used_amount": 1, "timestamp": "yesterday"},
    ]


NOT_OBJECTS: list[Payload] = [b"5", b'"a pulse"', b"null", b"[]", b"true"]


# -- the mixed workload of several concurrent clients ------------------------------

TENANTS = ("acme", "globex", "initech", "umbrella", "h\u00e9l\u00e8ne-gmbh")
SKUS = ("sku-basic", "sku-pro")
UNITS = ("api_call", "gb_hour")
RACE_DUPLICATE = pulse("acme", "sku-basic", "api_call", "7.25", id="race-same")


@dataclass
class Request:
    form: Form
    pulses: list[tuple[Payload, Expect]]

    @property
    def status(self) -> Expect:
        """The HTTP status this request must get."""
        if self.form != "single":
            return "202"
        expect = self.pulses[0][1]
        assert isinstance(expect, str)
        return {"accepted": "202", "duplicate": "202", "conflict": "409", "rejected": "422"}[expect]


def valid_pulse(client: int, n: int, rng: random.Random, days: Days) -> dict[str, Any]:
    """A valid pulse; most carry an id (unique to this client), some a timestamp."""
    tenant, sku, unit = rng.choice(TENANTS), rng.choice(SKUS), rng.choice(UNITS)
    extra: dict[str, object] = {}
    if rng.random() < 0.75:
        extra["id"] = f"c{client}-{n}"
    roll = rng.random()
    if roll < 0.45:
        extra["timestamp"] = stamp(days.earlier_today(rng), rng.choice((0, 0, 60, -300)))
    elif roll < 0.75:
        extra["timestamp"] = stamp(days.during_yesterday(rng), rng.choice((0, 120, 330)))
    # else: no timestamp, the server stamps it with the time it was received
    return pulse(tenant, sku, unit, random_amount(rng), **extra)


def client_plan(client: int, rng: random.Random, days: Days) -> list[Request]:
    """What one client sends: valid, duplicate, conflicting and invalid pulses, all forms."""
    counter = iter(range(10_000))

    def fresh() -> dict[str, Any]:
        return valid_pulse(client, next(counter), rng, days)

    first = {**fresh(), "id": f"c{client}-first", "used_amount": Decimal("1.5")}
    no_id = {k: v for k, v in fresh().items() if k not in ("id", "timestamp")}
    bad: list[Payload] = [*invalid_pulses(days)]
    rng.shuffle(bad)
    not_objects = list(NOT_OBJECTS)
    rng.shuffle(not_objects)
    array = [(fresh(), "accepted") for _ in range(20)]
    with_id = next(p for p, _ in array if "id" in p)
    array.insert(5, (dict(with_id), "duplicate"))  # the same pulse twice in one request
    array.insert(9, ({**with_id, "used_amount": "0.000000001"}, "conflict"))
    array[3:3] = [(bad.pop(), "rejected"), (not_objects.pop(), "rejected")]
    reused_id = {**fresh(), "used_amount": "-1", "id": f"c{client}-was-rejected"}
    lines: list[tuple[Payload, Expect]] = [(fresh(), "accepted") for _ in range(15)]
    lines[4:4] = [
        (dict(first), "duplicate"),
        (reused_id, "rejected"),  # rejected: its id is not taken (request 8 reuses it)
        (b'{"tenant_id": "acme", "product_sku": ', "rejected"),  # a line that is not JSON
        (bad.pop(), "rejected"),
    ]
    same_id_other_tenants = [
        (pulse(tenant, "sku-pro", "api_call", client + 1, id=f"shared-{client}"), "accepted")
        for tenant in TENANTS[:3]
    ]
    huge = [(pulse("globex", "sku-max", "api_call", MAX_AMOUNT), "accepted")] * 2
    huge.append((pulse("globex", "sku-max", "api_call", f"{MAX_AMOUNT}"), "accepted"))
    race: list[tuple[Payload, Expect]] = [
        (dict(RACE_DUPLICATE), frozenset({"accepted", "duplicate"})),
        (
            pulse("acme", "sku-basic", "api_call", client + 1, id="race-other"),
            frozenset({"accepted", "conflict"}),
        ),
    ]
    return [
        Request("single", [(first, "accepted")]),
        Request("single", [(no_id, "accepted")]),
        Request("array", array),
        Request("ndjson", lines),
        Request("single", [(dict(first), "duplicate")]),
        Request("single", [({**first, "used_amount": "1.6"}, "conflict")]),
        Request("single", [(bad.pop(), "rejected")]),
        Request("array", [({**fresh(), "id": f"c{client}-was-rejected"}, "accepted")]),
        Request("ndjson", same_id_other_tenants + huge),
        Request(rng.choice(("array", "ndjson")), race),
        Request(
            "array", [(bad.pop(), "rejected") for _ in range(3)] + [(not_objects.pop(), "rejected")]
        ),
        Request("array", [(fresh(), "accepted") for _ in range(rng.randint(30, 60))]),
    ]


def check_answer(request: Request, sent: Sent) -> list[str]:
    """Every way the answer to `request` differs from what the contract says."""
    wrong: list[str] = []
    response = sent.response
    where = f"{request.form} request starting at pulse #{sent.attempts[0].sent_seq}"
    if response is None:
        return [f"{where}: no answer ({sent.error})"]
    if str(response.status_code) != request.status:
        wrong.append(
            f"{where}: status {response.status_code}, expected {request.status}:"
            f" {response.text[:300]}"
        )
    if response.headers.get("content-type", "").split(";")[0] != "application/json":
        wrong.append(f"{where}: Content-Type {response.headers.get('content-type')!r}")
    body = response.json()
    items: list[dict[str, Any]] = []
    if response.status_code == 202:
        items = body["items"]
    elif "error" in body:
        items = (body["error"].get("details") or {}).get("items", [])
    by_index = {item["index"]: item for item in items}
    for index, ((payload, expect), attempt) in enumerate(
        zip(request.pulses, sent.attempts, strict=True)
    ):
        allowed = {expect} if isinstance(expect, str) else expect
        if attempt.answer not in allowed:
            wrong.append(
                f"{where}: pulse {index} {payload!r} was {attempt.answer}"
                f" ({attempt.error}), expected {sorted(allowed)}"
            )
        item = by_index.get(index)
        if attempt.answer == "accepted" or item is None:
            continue
        fields = payload if isinstance(payload, Mapping) else {}
        given_id = fields.get("id")
        if isinstance(given_id, str) and item.get("id") != given_id:
            wrong.append(f"{where}: item {index} has id {item.get('id')!r}, sent {given_id!r}")
        if item["status"] == "rejected" and not item.get("error"):
            wrong.append(f"{where}: rejected item {index} carries no error: {item}")
    return wrong


async def run_mixed_clients(server: ServerProcess, clients: int = 8) -> Ledger:
    """`clients` concurrent clients send their plans; returns the ledger, fails on a bad answer."""
    days, ledger, wrong = Days.current(), Ledger(), []

    async def one_client(number: int) -> None:
        rng = random.Random(1000 + number)
        async with httpx.AsyncClient(timeout=30.0) as http:
            for request in client_plan(number, rng, days):
                payloads = [payload for payload, _ in request.pulses]
                sent = await send_pulses(http, server.url, ledger, payloads, request.form)
                wrong.extend(check_answer(request, sent))

    async with trio.open_nursery() as nursery:
        for number in range(clients):
            nursery.start_soon(one_client, number)
    assert not wrong, "answers that break the contract:\n" + "\n".join(wrong[:40])
    assert ledger.problems() == []
    assert ledger.unresolved() == []
    return ledger


async def all_aggregates(
    client: httpx.AsyncClient, server: ServerProcess, limit: int = 1000, **params: str
) -> list[dict[str, Any]]:
    return await collect_pages(
        client, f"{server.url}/aggregates", "aggregates", params, limit=limit
    )


# -- ingest and aggregates ---------------------------------------------------------


async def test_mixed_concurrent_ingest_adds_up_exactly(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    """8 clients, all forms, valid/duplicate/conflicting/invalid pulses: exact totals."""
    ledger = await run_mixed_clients(server)

    by_race = {
        pulse_id: Counter(a.answer for a in attempts)
        for (_, pulse_id), attempts in ledger.by_identity().items()
        if pulse_id.startswith("race-")
    }
    assert by_race == {
        "race-same": Counter({"accepted": 1, "duplicate": 7}),
        "race-other": Counter({"accepted": 1, "conflict": 7}),
    }

    expected = ledger.expected_totals()
    rows = await all_aggregates(client, server, limit=7)
    assert totals_of(rows) == expected
    order = [(r["date"], r["tenant_id"], r["product_sku"], r["use_unit"]) for r in rows]
    assert order == sorted(order), "GET /aggregates is not ordered by date, tenant, sku, unit"
    for row in rows:
        assert (row["committed_amount"], row["committed_count"], row["revision"]) == ("0", 0, 0)
    huge = [total for key, total in expected.items() if key[1] == "sku-max"]
    # 24 times the largest amount: far beyond 64-bit integers, and still exact.
    assert huge == [Total(exact_sum([MAX_AMOUNT] * 24), 24)]

    days = Days.current()
    acme_today = await all_aggregates(
        client,
        server,
        limit=2,
        tenant_id="acme",
        **{"from": days.today.isoformat(), "to": days.today.isoformat()},
    )
    assert totals_of(acme_today) == {
        key: total
        for key, total in expected.items()
        if key[0] == "acme" and key[3] == days.today.isoformat()
    }
    assert totals_of(await all_aggregates(client, server, limit=5, status="open")) == expected
    assert await all_aggregates(client, server, status="committed") == []


def stored_pulse_view(attempt: Attempt, ledger: Ledger) -> tuple[object, ...]:
    fields = attempt.payload
    assert isinstance(fields, Mapping)
    return (
        fields["product_sku"],
        fields["use_unit"],
        Decimal(str(fields["used_amount"])),
        ledger.day_of(attempt),
    )


async def test_pulses_of_a_bucket_are_exactly_the_accepted_ones(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    """GET /pulses: each accepted pulse once, with its id; server ids for pulses without one."""
    ledger = await run_mixed_clients(server)
    days = Days.current()
    for tenant, day, narrow in (
        ("acme", days.today, {"product_sku": "sku-basic", "use_unit": "api_call"}),
        ("acme", days.today, {}),
        ("initech", days.yesterday, {"use_unit": "gb_hour"}),
    ):
        rows = await collect_pages(
            client,
            f"{server.url}/pulses",
            "pulses",
            {"tenant_id": tenant, "date": day.isoformat(), **narrow},
            limit=4,
        )
        mine = [
            a
            for a in ledger.stored()
            if isinstance(a.payload, Mapping)
            and a.payload["tenant_id"] == tenant
            and ledger.day_of(a) == day.isoformat()
            and all(a.payload[field] == value for field, value in narrow.items())
        ]
        assert mine, "the workload should have put pulses in this bucket"
        ids = [row["id"] for row in rows]
        assert len(ids) == len(set(ids)), f"GET /pulses lists an id twice: {ids}"
        for row in rows:
            assert (row["tenant_id"], row["date"]) == (tenant, day.isoformat())
            assert all(row[field] == value for field, value in narrow.items())

        with_id = {a.payload["id"]: a for a in mine if "id" in a.payload}
        listed = {row["id"]: row for row in rows if not row["id_assigned"]}
        assert listed.keys() == with_id.keys()
        for pulse_id, attempt in with_id.items():
            row = listed[pulse_id]
            assert (
                row["product_sku"],
                row["use_unit"],
                Decimal(row["used_amount"]),
                row["date"],
            ) == stored_pulse_view(attempt, ledger)
            given = attempt.payload.get("timestamp")
            if given is not None:
                assert dt.datetime.fromisoformat(row["timestamp"]) == dt.datetime.fromisoformat(
                    given
                )

        assigned = [row for row in rows if row["id_assigned"]]
        without_id = [a for a in mine if "id" not in a.payload]
        assert all(row["id"] for row in assigned)
        assert Counter(
            (row["product_sku"], row["use_unit"], Decimal(row["used_amount"]), row["date"])
            for row in assigned
        ) == Counter(stored_pulse_view(a, ledger) for a in without_id)


# -- commit and delivery --------------------------------------------------------------


async def ingest_buckets(
    server: ServerProcess, ledger: Ledger, days: Days, *, seed: int, per_client: int = 40
) -> None:
    """4 concurrent clients send valid pulses (all kinds of amounts) for today and yesterday."""

    async def one_client(number: int) -> None:
        rng = random.Random(seed * 100 + number)
        async with httpx.AsyncClient(timeout=30.0) as http:
            payloads = []
            for n in range(per_client):
                when = days.earlier_today(rng) if n % 3 else days.during_yesterday(rng)
                payloads.append(
                    pulse(
                        rng.choice(TENANTS[:4]),
                        rng.choice(SKUS),
                        "api_call",
                        random_amount(rng),
                        id=f"s{seed}-c{number}-{n}",
                        timestamp=stamp(when),
                    )
                )
            for start in range(0, per_client, 10):
                sent = await send_pulses(
                    http,
                    server.url,
                    ledger,
                    payloads[start : start + 10],
                    "ndjson" if start % 20 else "array",
                )
                assert sent.response is not None, sent
                assert sent.response.status_code == 202, sent.response.text

    async with trio.open_nursery() as nursery:
        for number in range(4):
            nursery.start_soon(one_client, number)
    assert ledger.answers() == Counter({"accepted": 4 * per_client})


async def commit(
    client: httpx.AsyncClient, server: ServerProcess, day: dt.date, *, in_query: bool = False
) -> list[dict[str, Any]]:
    if in_query:
        response = await client.post(
            f"{server.url}/aggregates/commit", params={"date": day.isoformat()}
        )
    else:
        response = await client.post(
            f"{server.url}/aggregates/commit", json={"date": day.isoformat()}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["date"] == day.isoformat()
    batches: list[dict[str, Any]] = body["batches"]
    return batches


async def wait_delivered(
    client: httpx.AsyncClient, server: ServerProcess, day: dt.date, batch_ids: set[str]
) -> dict[str, dict[str, Any]]:
    """Wait until every batch of `day` is delivered; return each delivered file's JSON."""

    async def all_delivered() -> list[dict[str, Any]] | None:
        views = await collect_pages(
            client, f"{server.url}/batches", "batches", {"date": day.isoformat()}, limit=1
        )
        done = all(view["status"] == "delivered" for view in views)
        return views if done and {v["batch_id"] for v in views} >= batch_ids else None

    views = await wait_until(all_delivered, within=15, what=f"every batch of {day} delivered")
    assert {view["batch_id"] for view in views} == batch_ids
    files = read_deliveries(server.deliveries / day.isoformat())
    assert files.keys() == batch_ids, "the deliveries folder holds other files than the batches"
    for view in views:
        assert view["attempts"] == 1, view
        assert view["last_error"] is None, view
        assert view["delivered_at"] is not None, view
    for status, expected in (("pending", set()), ("failed", set()), ("delivered", batch_ids)):
        listed = await collect_pages(
            client,
            f"{server.url}/batches",
            "batches",
            {"date": day.isoformat(), "status": status},
            limit=2,
        )
        assert {view["batch_id"] for view in listed} == expected, status
    return files


def read_deliveries(folder: Path) -> dict[str, dict[str, Any]]:
    """{batch_id: JSON} of every file in a day's deliveries folder."""
    files = {}
    for path in folder.iterdir():
        assert path.suffix == ".json", f"not a delivered batch: {path}"
        files[path.stem] = json.loads(path.read_bytes())
    return files


async def batch_view(
    client: httpx.AsyncClient, server: ServerProcess, batch_id: str
) -> dict[str, Any]:
    response = await client.get(f"{server.url}/batches/{batch_id}")
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


def check_batch(view: Mapping[str, Any]) -> None:
    """A batch's own arithmetic: its used_amount and record_count are its records'."""
    records = view["records"]
    assert view["record_count"] == len(records)
    assert Decimal(view["used_amount"]) == exact_sum(Decimal(r["used_amount"]) for r in records)


async def test_commit_today_delivers_every_batch_exactly_once(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    """Commit today: each bucket in one initial batch, each batch delivered as a file equal
    to GET /batches/{id} less the delivery state; committing again makes nothing."""
    days, ledger = Days.current(), Ledger()
    await ingest_buckets(server, ledger, days, seed=1)
    expected = ledger.expected_totals()
    today = {k: t for k, t in expected.items() if k[3] == days.today.isoformat()}
    yesterday = {k: t for k, t in expected.items() if k[3] == days.yesterday.isoformat()}
    assert today
    assert yesterday

    batches = await commit(client, server, days.today)
    assert batches, "committing a day with usage made no batch"
    assert {b["kind"] for b in batches} == {"initial"}
    assert exact_sum(Decimal(b["used_amount"]) for b in batches) == exact_sum(
        t.amount for t in today.values()
    )
    assert sum(b["record_count"] for b in batches) == len(today)

    ids = {b["batch_id"] for b in batches}
    assert len(ids) == len(batches)
    files = await wait_delivered(client, server, days.today, ids)

    seen: dict[BucketKey, dict[str, Any]] = {}
    partition_of_tenant: dict[str, int] = {}
    for summary in batches:
        view = await batch_view(client, server, summary["batch_id"])
        shown = {k: v for k, v in view.items() if k not in DELIVERY_STATE}
        assert files[summary["batch_id"]] == shown, "the delivered file is not the batch"
        assert view["status"] == "delivered"
        assert (view["kind"], view["record_count"], view["used_amount"], view["partition"]) == (
            summary["kind"],
            summary["record_count"],
            summary["used_amount"],
            summary["partition"],
        )
        assert view["date"] == days.today.isoformat()
        check_batch(view)
        for record in view["records"]:
            key = (record["tenant_id"], record["product_sku"], record["use_unit"], view["date"])
            assert key not in seen, f"bucket {key} is in two batches of one commit"
            seen[key] = record
            tenant_partition = partition_of_tenant.setdefault(key[0], view["partition"])
            assert tenant_partition == view["partition"], f"tenant {key[0]} in two partitions"
    assert seen.keys() == today.keys()
    for key, record in seen.items():
        total = today[key]
        assert record["revision"] == 1
        assert Decimal(record["used_amount"]) == Decimal(record["total_amount"]) == total.amount
        assert record["pulse_count"] == record["total_count"] == total.count

    assert await commit(client, server, days.today) == []
    rows = await all_aggregates(client, server, limit=3)
    assert totals_of(rows) == expected
    for row in rows:
        committed = row["date"] == days.today.isoformat()
        assert row["revision"] == (1 if committed else 0)
        assert (Decimal(row["committed_amount"]), row["committed_count"]) == (
            (Decimal(row["used_amount"]), row["pulse_count"]) if committed else (0, 0)
        )
    assert totals_of(await all_aggregates(client, server, status="committed")) == today
    assert totals_of(await all_aggregates(client, server, status="open")) == yesterday


async def test_late_pulses_become_corrections(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    """Late pulses of committed buckets: a correction, revision 2, delta and new total."""
    days, ledger, rng = Days.current(), Ledger(), random.Random(7)
    await ingest_buckets(server, ledger, days, seed=2, per_client=20)
    first_today = await commit(client, server, days.today)
    first_yesterday = await commit(client, server, days.yesterday, in_query=True)
    assert first_today
    assert first_yesterday
    committed = ledger.expected_totals()
    some_today = next(k for k in committed if k[3] == days.today.isoformat())
    some_yesterday = next(k for k in committed if k[3] == days.yesterday.isoformat())
    new_bucket = ("umbrella", "sku-late", "gb_hour", days.yesterday.isoformat())
    late = (
        [
            pulse(
                *some_today[:3],
                random_amount(rng),
                id=f"late-t-{n}",
                timestamp=stamp(days.earlier_today(rng)),
            )
            for n in range(3)
        ]
        + [
            pulse(
                *some_yesterday[:3],
                random_amount(rng),
                id=f"late-y-{n}",
                timestamp=stamp(days.during_yesterday(rng), 60),
            )
            for n in range(2)
        ]
        + [
            pulse(*new_bucket[:3], "0.000000001", timestamp=stamp(days.during_yesterday(rng))),
        ]
    )
    sent = await send_pulses(client, server.url, ledger, late, "ndjson")
    assert sent.response is not None
    assert sent.response.status_code == 202
    assert [a.answer for a in sent.attempts] == ["accepted"] * len(late)
    totals = ledger.expected_totals()
    reopened = {some_today, some_yesterday, new_bucket}
    assert totals_of(await all_aggregates(client, server, status="open")) == {
        k: totals[k] for k in reopened
    }

    corrections_today = await commit(client, server, days.today)
    assert [(b["kind"], b["record_count"]) for b in corrections_today] == [("correction", 1)]
    view = await batch_view(client, server, corrections_today[0]["batch_id"])
    [record] = view["records"]
    assert (record["tenant_id"], record["product_sku"], record["use_unit"]) == some_today[:3]
    assert record["revision"] == 2
    assert (
        exact_sum([Decimal(record["used_amount"]), committed[some_today].amount])
        == totals[some_today].amount
    )
    assert record["pulse_count"] == 3
    assert (Decimal(record["total_amount"]), record["total_count"]) == (
        totals[some_today].amount,
        totals[some_today].count,
    )

    corrections_yesterday = await commit(client, server, days.yesterday)
    assert Counter(b["kind"] for b in corrections_yesterday) == Counter(
        {"correction": 1, "initial": 1}
    )
    assert totals_of(await all_aggregates(client, server, status="open")) == {}

    # Every bucket: its batches' deltas add up to its total, revisions count 1, 2, ...
    for day, batches in (
        (days.today, first_today + corrections_today),
        (days.yesterday, first_yesterday + corrections_yesterday),
    ):
        files = await wait_delivered(client, server, day, {b["batch_id"] for b in batches})
        deltas: dict[BucketKey, list[dict[str, Any]]] = defaultdict(list)
        for summary in batches:
            view = await batch_view(client, server, summary["batch_id"])
            assert files[summary["batch_id"]] == {
                k: v for k, v in view.items() if k not in DELIVERY_STATE
            }
            check_batch(view)
            for record in view["records"]:
                key = (
                    record["tenant_id"],
                    record["product_sku"],
                    record["use_unit"],
                    day.isoformat(),
                )
                deltas[key].append(record)
        of_day = {k: t for k, t in totals.items() if k[3] == day.isoformat()}
        assert deltas.keys() == of_day.keys()
        for key, records in deltas.items():
            assert [r["revision"] for r in records] == list(range(1, len(records) + 1)), key
            assert (
                Total(
                    exact_sum(Decimal(r["used_amount"]) for r in records),
                    sum(r["pulse_count"] for r in records),
                )
                == of_day[key]
            ), key
            assert (
                Total(Decimal(records[-1]["total_amount"]), records[-1]["total_count"])
                == of_day[key]
            ), key
        assert len(deltas[new_bucket if day == days.yesterday else some_today]) == (
            1 if day == days.yesterday else 2
        )
    rows = {
        (r["tenant_id"], r["product_sku"], r["use_unit"], r["date"]): r
        for r in await all_aggregates(client, server)
    }
    assert totals_of(list(rows.values())) == totals
    assert rows[some_today]["revision"] == rows[some_yesterday]["revision"] == 2
    assert rows[new_bucket]["revision"] == 1
    for row in rows.values():
        assert (Decimal(row["committed_amount"]), row["committed_count"]) == (
            Decimal(row["used_amount"]),
            row["pulse_count"],
        )


# -- the error contract --------------------------------------------------------------


def error_problems(response: httpx.Response, status: int, code: str | None = None) -> list[str]:
    """How an error answer differs from {"error": {"code", "message", "details"?}} + status."""
    where = f"{response.request.method} {response.request.url.path}"
    found = []
    if response.status_code != status:
        found.append(
            f"{where}: status {response.status_code}, expected {status}: {response.text[:300]}"
        )
    content_type = response.headers.get("content-type", "").split(";")[0].strip()
    if content_type != "application/json":
        found.append(f"{where}: Content-Type {content_type!r}, expected application/json")
        return found
    try:
        body = response.json()
    except ValueError:
        return [*found, f"{where}: body is not JSON: {response.text[:300]!r}"]
    error = body.get("error") if isinstance(body, dict) else None
    if set(body) != {"error"} or not isinstance(error, dict):
        return [*found, f"{where}: body is not {{'error': {{...}}}}: {body}"]
    if not set(error) <= {"code", "message", "details"}:
        found.append(f"{where}: unexpected keys in error: {sorted(error)}")
    if not (isinstance(error.get("code"), str) and error["code"]):
        found.append(f"{where}: error.code missing: {error}")
    if not (isinstance(error.get("message"), str) and error["message"]):
        found.append(f"{where}: error.message missing: {error}")
    if code is not None and error.get("code") != code:
        found.append(f"{where}: error.code {error.get('code')!r}, expected {code!r}")
    return found


async def test_error_answers(server: ServerProcess) -> None:
    """400, 404, 405, 409, 415, 422: right status, JSON error body, nothing stored.

    A connection per request: what an early error does to a kept-alive
    connection is `test_an_early_error_does_not_leave_the_connection_hanging`.
    """
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=15.0, limits=no_reuse) as client:
        await check_error_answers(server, client)


async def check_error_answers(server: ServerProcess, client: httpx.AsyncClient) -> None:
    days, ledger = Days.current(), Ledger()
    url = server.url
    json_type = {"Content-Type": "application/json"}
    first = pulse(
        "acme",
        "sku-basic",
        "api_call",
        "2.5",
        id="e-1",
        timestamp=stamp(days.now - dt.timedelta(seconds=5)),
    )
    sent = await send_pulses(client, url, ledger, [first], "single")
    assert sent.response is not None
    assert sent.response.status_code == 202

    wrong: list[str] = []
    for body in (b"not json", b'{"tenant_id": "acme", ', b"[1, 2", b"", b'"a string"', b"42"):
        response = await client.post(f"{url}/pulses", content=body, headers=json_type)
        wrong += error_problems(response, 400)

    conflict = await send_pulses(client, url, ledger, [{**first, "used_amount": "2.6"}], "single")
    assert conflict.response is not None
    wrong += error_problems(conflict.response, 409, "conflict")
    items = conflict.response.json().get("error", {}).get("details", {}).get("items", [])
    if [(i.get("status"), i.get("id")) for i in items] != [("conflict", "e-1")]:
        wrong.append(f"409 details do not name the conflicting id: {conflict.response.text}")

    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        body, _ = encode_body([first], "single")
        headers = {"Content-Type": content_type} if content_type else {}
        response = await client.post(f"{url}/pulses", content=body, headers=headers)
        wrong += error_problems(response, 415)

    for bad in invalid_pulses(days):
        rejected = await send_pulses(client, url, ledger, [bad], "single")
        assert rejected.response is not None
        wrong += error_problems(rejected.response, 422)

    tomorrow = days.today + dt.timedelta(days=1)
    response = await client.post(f"{url}/aggregates/commit", json={"date": tomorrow.isoformat()})
    wrong += error_problems(response, 422)
    response = await client.post(
        f"{url}/aggregates/commit", params={"date": (tomorrow + dt.timedelta(days=300)).isoformat()}
    )
    wrong += error_problems(response, 422)
    for body in (b'{"date": "28/11/2026"}', b"{}", b"nonsense"):
        response = await client.post(f"{url}/aggregates/commit", content=body, headers=json_type)
        wrong += error_problems(response, 422)

    for path in (
        "/batches/no-such-batch",
        "/batches/0123456789ab-20260101-p000-00001",
        "/no/such/path",
    ):
        wrong += error_problems(await client.get(f"{url}{path}"), 404)
    wrong += error_problems(
        await client.put(f"{url}/pulses", content=b"{}", headers=json_type), 405
    )
    for params in (
        {"limit": "0"},
        {"limit": "10001"},
        {"cursor": "not-a-cursor"},
        {"status": "closed"},
        {"from": "yesterday"},
        {"tenantid": "acme"},
    ):
        response = await client.get(f"{url}/aggregates", params=params)
        wrong += error_problems(response, 400)
    response = await client.get(f"{url}/pulses", params={"date": days.today.isoformat()})
    wrong += error_problems(response, 400)  # tenant_id is required

    assert not wrong, "error answers that break the contract:\n" + "\n".join(wrong)
    assert ledger.problems() == []
    assert (
        totals_of(await all_aggregates(client, server))
        == ledger.expected_totals()
        == {("acme", "sku-basic", "api_call", days.today.isoformat()): Total(Decimal("2.5"), 1)}
    )


class Chunks(httpx.AsyncByteStream):
    """A request body sent piece by piece, without Content-Length.

    A plain iterator, not an async generator: the server may answer before the
    body is all sent, and httpx then drops the stream unfinished, which an async
    generator reports as a ResourceWarning when it is garbage collected.
    """

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = iter(chunks)

    def __aiter__(self) -> Chunks:
        return self

    async def __anext__(self) -> bytes:
        await trio.lowlevel.checkpoint()
        try:
            return next(self._chunks)
        except StopIteration:
            raise StopAsyncIteration from None


async def test_size_limits_answer_413(start_server: StartServer) -> None:
    """Over max_body_bytes or max_batch: 413 with a JSON error, nothing stored.

    A connection per request: what an early 413 does to a kept-alive
    connection is `test_an_early_error_does_not_leave_the_connection_hanging`.
    """
    server = await start_server(INGESTOR_MAX_BODY_BYTES="2048", INGESTOR_MAX_BATCH="5")
    days, ledger = Days.current(), Ledger()
    when = stamp(days.now - dt.timedelta(seconds=5))
    json_type = {"Content-Type": "application/json"}

    def pulses(count: int, prefix: str) -> list[Payload]:
        return [
            pulse("acme", "sku-basic", "api_call", 1, id=f"{prefix}-{n}", timestamp=when)
            for n in range(count)
        ]

    padded = pulse("acme", "sku-basic", "api_call", 1, id="padded", timestamp=when)
    body, _ = encode_body([padded], "single")

    chunks = [b"[" + body]
    chunks += [b"," + encode_body(pulses(1, f"chunk-{n}"), "single")[0] for n in range(40)]
    chunks.append(b"]")

    wrong: list[str] = []
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=15.0, limits=no_reuse) as client:
        for form in ("array", "ndjson"):
            sent = await send_pulses(client, server.url, ledger, pulses(6, f"six-{form}"), form)
            assert sent.response is not None
            wrong += error_problems(sent.response, 413, "too_many_pulses")
            sent = await send_pulses(client, server.url, ledger, pulses(5, f"five-{form}"), form)
            assert sent.response is not None
            if sent.response.status_code != 202:
                wrong.append(f"5 pulses (= max_batch) as {form}: {sent.response.status_code}")

        exactly = body[:-1] + b" " * (2048 - len(body)) + b"}"
        assert len(exactly) == 2048
        attempts = ledger.sent([padded], "single")
        response = await client.post(f"{server.url}/pulses", content=exactly, headers=json_type)
        ledger.answered(attempts, response)
        if response.status_code != 202:
            wrong.append(
                f"a body of exactly max_body_bytes: {response.status_code} {response.text}"
            )

        too_big = body[:-1] + b" " * 3000 + b"}"
        response = await client.post(f"{server.url}/pulses", content=too_big, headers=json_type)
        wrong += error_problems(response, 413)
        # No Content-Length: the limit must hold while the body is read.
        upload = client.build_request("POST", f"{server.url}/pulses", headers=json_type)
        upload.stream = Chunks(chunks)
        upload.headers.pop("Content-Length", None)
        upload.headers["Transfer-Encoding"] = "chunked"
        wrong += error_problems(await client.send(upload), 413)

        assert not wrong, "size limits that break the contract:\n" + "\n".join(wrong)
        assert (
            totals_of(await all_aggregates(client, server))
            == ledger.expected_totals()
            == {("acme", "sku-basic", "api_call", days.today.isoformat()): Total(Decimal(11), 11)}
        )


async def read_response_head(stream: trio.SocketStream, buffer: bytearray) -> bytes | None:
    """Read one HTTP/1.1 response (head and Content-Length body); None if the peer closed."""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        data = await stream.receive_some(65536)
        if not data:
            return None
        rest += data
    buffer[:] = rest[length:]
    return head


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("POST", "/pulses", 413), ("PUT", "/pulses", 405), ("POST", "/no/such/path", 404)],
)
async def test_an_early_error_does_not_leave_the_connection_hanging(
    start_server: StartServer, client: httpx.AsyncClient, method: str, path: str, status: int
) -> None:
    """An error answered before the request body was read (too large, wrong method,
    unknown path): the next request on that connection is answered, or the connection
    is closed. A client must never wait forever on a kept-alive connection.

    The client sends the request head, gets the error, and sends the body and a
    GET /healthz only after a round trip on another connection (so the server is
    done with the error), as a client streaming an upload does.
    """
    server = await start_server(INGESTOR_MAX_BODY_BYTES="2048")
    body = b"[" + b" " * 4000 + b"]"
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    buffer = bytearray()
    stream = await trio.open_tcp_stream(server.host, server.port)
    async with stream:
        await stream.send_all(head)
        with trio.fail_after(5):
            first = await read_response_head(stream, buffer)
        assert first is not None
        assert first.startswith(f"HTTP/1.1 {status}".encode()), first
        if b"connection: close" in first.lower():
            return  # announced: the client knows to open a new connection
        assert (await client.get(f"{server.url}/healthz")).status_code == 200
        second: bytes | None = b"(nothing)"
        with trio.move_on_after(3):
            try:
                await stream.send_all(body + b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                second = await read_response_head(stream, buffer)
            except trio.BrokenResourceError:
                second = None  # the server closed the connection: fine
        assert second is None or second.startswith(b"HTTP/1.1 200"), (
            f"after the {status} the connection stayed open (no Connection: close) but the"
            f" next request on it got no answer within 3 s: {second!r}"
        )


# -- zones, overload, operations -------------------------------------------------------


async def test_billing_day_follows_the_configured_zones(
    start_server: StartServer, client: httpx.AsyncClient
) -> None:
    """A TOML config sets the billing zone and a tenant's own zone; days follow them."""
    server = await start_server(
        config='billing_timezone = "Pacific/Kiritimati"\n'
        "[tenant_timezones]\n"
        'west = "America/Los_Angeles"\n'
    )
    ledger = Ledger()
    moment = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    sent = await send_pulses(
        client,
        server.url,
        ledger,
        [
            pulse("east", "sku", "api_call", "1.25", id="z-1", timestamp=stamp(moment)),
            pulse("west", "sku", "api_call", "2.5", id="z-2", timestamp=stamp(moment, 330)),
        ],
    )
    assert sent.response is not None
    assert sent.response.status_code == 202, sent.response.text
    kiritimati = moment.astimezone(ZoneInfo("Pacific/Kiritimati")).date().isoformat()
    los_angeles = moment.astimezone(ZoneInfo("America/Los_Angeles")).date().isoformat()
    assert totals_of(await all_aggregates(client, server)) == {
        ("east", "sku", "api_call", kiritimati): Total(Decimal("1.25"), 1),
        ("west", "sku", "api_call", los_angeles): Total(Decimal("2.5"), 1),
    }
    # Today in the zone furthest ahead may be tomorrow in UTC: it has begun, so it commits.
    batches = await commit(client, server, dt.date.fromisoformat(kiritimati))
    on_that_day = [Decimal("1.25")] + ([Decimal("2.5")] if los_angeles == kiritimati else [])
    assert sum(b["record_count"] for b in batches) == len(on_that_day)
    assert exact_sum(Decimal(b["used_amount"]) for b in batches) == exact_sum(on_that_day)
    day_after = dt.date.fromisoformat(kiritimati) + dt.timedelta(days=1)
    response = await client.post(
        f"{server.url}/aggregates/commit", json={"date": day_after.isoformat()}
    )
    assert error_problems(response, 422) == []


async def test_overload_answers_503_with_retry_after_and_stores_nothing_of_it(
    start_server: StartServer,
) -> None:
    """A one-message shard queue under 24 concurrent requests: some 503 + Retry-After.

    A 503 stores nothing of its request: sent again, every one of its pulses is
    `accepted`, and the totals are exact.
    """
    server = await start_server(INGESTOR_SHARD_QUEUE="1")
    days, ledger = Days.current(), Ledger()
    refused: list[httpx.Response] = []
    retry: list[list[Payload]] = []

    async def one_client(number: int) -> None:
        rng = random.Random(700 + number)
        async with httpx.AsyncClient(timeout=30.0) as http:
            # Four requests each, and more until one is refused: on a loaded
            # machine the clients may be too slow to fill the queue at first.
            for n in range(16):
                if n >= 4 and refused:
                    break
                payloads: list[Payload] = [
                    pulse(
                        "acme",
                        "sku-basic",
                        "api_call",
                        random_amount(rng),
                        id=f"o{number}-{n}-{k}",
                        timestamp=stamp(days.earlier_today(rng)),
                    )
                    for k in range(200)
                ]
                sent = await send_pulses(http, server.url, ledger, payloads, "array")
                assert sent.response is not None, sent.error
                if sent.response.status_code == 503:
                    refused.append(sent.response)
                    retry.append(payloads)
                else:
                    assert sent.response.status_code == 202, sent.response.text

    async with trio.open_nursery() as nursery:
        for number in range(24):
            nursery.start_soon(one_client, number)
    assert refused, "24 concurrent requests never overloaded a one-message queue"
    for response in refused:
        assert error_problems(response, 503) == []
        assert int(response.headers.get("Retry-After", "0")) >= 1, response.headers

    async with httpx.AsyncClient(timeout=30.0) as http:
        for payloads in retry:
            sent = await send_pulses(http, server.url, ledger, payloads, "array")
            assert sent.response is not None
            assert sent.response.status_code == 202, sent.response.text
            assert {a.answer for a in sent.attempts} == {"accepted"}
        assert ledger.problems() == []
        assert totals_of(await all_aggregates(http, server)) == ledger.expected_totals()


async def test_operational_endpoints(server: ServerProcess, client: httpx.AsyncClient) -> None:
    """/healthz, /readyz, /metrics (Prometheus text) and /openapi.json answer (DESIGN §4)."""
    wrong = []
    for path in ("/healthz", "/readyz"):
        response = await client.get(f"{server.url}{path}")
        if response.status_code != 200 or "status" not in response.json():
            wrong.append(f"GET {path}: {response.status_code} {response.text[:200]}")
    response = await client.get(f"{server.url}/metrics")
    if response.status_code != 200 or not response.headers.get("content-type", "").startswith(
        "text/plain"
    ):
        wrong.append(f"GET /metrics: {response.status_code} {response.text[:200]}")
    response = await client.get(f"{server.url}/openapi.json")
    if response.status_code != 200 or "/pulses" not in response.json().get("paths", {}):
        wrong.append(f"GET /openapi.json: {response.status_code} {response.text[:200]}")
    assert not wrong, "\n".join(wrong)


# -- stopping --------------------------------------------------------------------------


async def test_sigterm_exits_zero_and_a_restart_shows_the_same_aggregates(
    start_server: StartServer, tmp_path: Path
) -> None:
    """SIGTERM: exit code 0; restarted on the same data dir, the same aggregates (and the
    commit made before it), and the ids are still known (replays are duplicates)."""
    data = tmp_path / "kept"
    server = await start_server(data)
    days, ledger = Days.current(), Ledger()
    await ingest_buckets(server, ledger, days, seed=3, per_client=30)
    async with httpx.AsyncClient(timeout=30.0) as http:
        before = await all_aggregates(http, server, limit=4)
        committed = await commit(http, server, days.yesterday)
    assert totals_of(before) == ledger.expected_totals()
    assert committed

    assert await server.terminate(within=15) == 0
    assert " stop " in server.output_of_run(), server.tail()

    await server.start()
    async with httpx.AsyncClient(timeout=30.0) as http:
        after = await all_aggregates(http, server, limit=4)
        assert totals_of(after) == ledger.expected_totals()
        assert {tuple(sorted(r.items())) for r in after} == {
            tuple(sorted({**r, **_committed_view(r, days)}.items())) for r in before
        }
        replay = await send_pulses(
            http, server.url, ledger, [a.payload for a in ledger.attempts[:10]], "array"
        )
        assert [a.answer for a in replay.attempts] == ["duplicate"] * 10  # ids survived too
    assert ledger.problems() == []


def _committed_view(row: Mapping[str, Any], days: Days) -> dict[str, Any]:
    if row["date"] != days.yesterday.isoformat():
        return {}
    return {
        "committed_amount": row["used_amount"],
        "committed_count": row["pulse_count"],
        "revision": 1,
    }


async def test_sigterm_with_an_idle_keep_alive_connection_exits_promptly(
    server: ServerProcess,
) -> None:
    """A client that pooled its connection (every HTTP/1.1 client does) must not delay exit.

    Draining finishes in-flight requests; an idle connection has none, so the
    process should exit at once, not after graceful_timeout (30 s).
    """
    async with httpx.AsyncClient(timeout=30.0) as http:
        response = await http.get(f"{server.url}/healthz")
        assert response.status_code == 200
        code = await server.terminate(within=5)
    assert code == 0


async def test_sigterm_under_load_answers_what_it_stored(
    start_server: StartServer, tmp_path: Path
) -> None:
    """SIGTERM while 6 clients send: exit 0 promptly; a request is either answered or
    not stored at all, so after a restart every resent pulse is `accepted`, never
    `duplicate`, and the totals are exact.

    Clients open a connection per request here: what an idle kept-alive
    connection does to the drain is the previous test's subject.
    """
    server = await start_server(tmp_path / "drained")
    days, ledger = Days.current(), Ledger()
    stopped = trio.Event()
    unanswered: list[list[Payload]] = []

    async def one_client(number: int) -> None:
        rng = random.Random(500 + number)
        no_reuse = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=30.0, limits=no_reuse) as http:
            for n in itertools.count():
                payloads = [
                    pulse(
                        rng.choice(TENANTS),
                        rng.choice(SKUS),
                        "api_call",
                        random_amount(rng),
                        id=f"t{number}-{n}-{k}",
                        timestamp=stamp(days.earlier_today(rng)),
                    )
                    for k in range(rng.randint(1, 20))
                ]
                sent = await send_pulses(http, server.url, ledger, payloads, "array")
                if sent.response is None or sent.response.status_code == 503:
                    unanswered.append(payloads)
                    if stopped.is_set():
                        return
                elif sent.response.status_code != 202:
                    raise AssertionError(f"{sent.response.status_code} {sent.response.text}")

    async def flowing() -> bool:
        return ledger.answers()["accepted"] >= 300

    async with trio.open_nursery() as nursery:
        for number in range(6):
            nursery.start_soon(one_client, number)
        await wait_until(flowing, within=20, what="300 pulses accepted")
        stopped.set()
        code = await server.terminate(within=10)
    assert code == 0, server.tail()
    assert ledger.answers()["accepted"] >= 300

    await server.start()
    async with httpx.AsyncClient(timeout=30.0) as http:
        resent = []
        for payloads in unanswered:
            sent = await send_pulses(http, server.url, ledger, payloads, "array")
            assert sent.response is not None
            assert sent.response.status_code == 202, sent.response.text
            resent += sent.attempts
        stored_unanswered = [a.payload for a in resent if a.answer != "accepted"]
        assert stored_unanswered == [], "stored during the drain, yet never answered"
        assert ledger.unresolved() == []
        assert ledger.problems() == []
        assert totals_of(await all_aggregates(http, server)) == ledger.expected_totals()
