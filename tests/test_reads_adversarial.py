"""Adversarial tests of the read API (DESIGN.md §4): GET /aggregates, /pulses,
/batches, /batches/{id}.

Billing systems page through these to reconcile money: a page that skips or
repeats a row, a filter that lets another tenant's data through, or a bad
cursor that is answered as a server error (so retried for ever) is a billing
error. The service runs in process on SQLite (tests/conftest.py); the same
reads over PostgreSQL are in tests/store/test_reads_differential.py.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlencode

import pytest
from quart.typing import TestClientProtocol as Client

from ingestor.partition import partition_of
from ingestor.runtime import Runtime
from ingestor.sinks.memory import MemorySink

from .conftest import FakeClock, pulse

DAY = "2026-11-28"  # the FakeClock's day
YESTERDAY = "2026-11-27"

ADMIN = "adv-admin"
READ_T1 = "adv-read-t1"
READ_T1_T3 = "adv-read-t1-t3"
READ_NFC = "adv-read-nfc"
NFC, NFD = "\u00e9", "e\u0301"  # "é" composed, and "e" + combining acute


def _table(key: str, role: str, *tenants: str) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(key.encode()).hexdigest(), "role": role, "tenants": [*tenants]}


KEYS = [
    _table(ADMIN, "admin", "*"),
    _table(READ_T1, "read", "t1"),
    _table(READ_T1_T3, "read", "t1", "t3"),
    _table(READ_NFC, "read", NFC),
]
SCOPED = pytest.mark.parametrize("settings_overrides", [{"api_keys": KEYS, "partitions": 4}])


def forged(value: Any) -> str:
    """A cursor as the API encodes them (url-safe base64 of JSON, unpadded)."""
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def send(client: Client, body: Any, key: str | None = None) -> dict[str, Any]:
    response = await client.post("/pulses", json=body, headers=auth(key))
    assert response.status_code == 202, await response.get_data()
    report: dict[str, Any] = await response.get_json()
    assert report["rejected"] == 0, report
    return report


async def get(
    client: Client, path: str, params: Sequence[tuple[str, Any]] = (), key: str | None = None
) -> tuple[int, Any]:
    url = f"{path}?{urlencode(list(params))}" if params else path
    response = await client.get(url, headers=auth(key))
    return response.status_code, await response.get_json()


async def ok(
    client: Client, path: str, params: Sequence[tuple[str, Any]] = (), key: str | None = None
) -> Any:
    status, body = await get(client, path, params, key)
    assert status == 200, body
    return body


async def commit(client: Client, day: str, key: str | None = None) -> list[dict[str, Any]]:
    response = await client.post("/aggregates/commit", json={"date": day}, headers=auth(key))
    assert response.status_code == 200, await response.get_data()
    batches: list[dict[str, Any]] = (await response.get_json())["batches"]
    return batches


async def page_through(
    client: Client,
    path: str,
    field: str,
    params: Sequence[tuple[str, Any]] = (),
    *,
    key: str | None = None,
    between: Any = None,
    max_pages: int = 500,
) -> list[dict[str, Any]]:
    """Every row of a listing, page by page; `between` (async) runs between pages."""
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(max_pages):
        body = await ok(client, path, [*params, *([("cursor", cursor)] if cursor else [])], key)
        rows += body[field]
        cursor = body["next_cursor"]
        if cursor is None:
            return rows
        if between is not None:
            await between()
    raise AssertionError(f"{path} did not end within {max_pages} pages")


def agg_key(row: dict[str, Any]) -> tuple[str, str, str, str]:
    return (row["date"], row["tenant_id"], row["product_sku"], row["use_unit"])


# -- parameters ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/aggregates", [("limit", "0")]),
        ("/aggregates", [("limit", "-1")]),
        ("/aggregates", [("limit", "10001")]),
        ("/aggregates", [("limit", "abc")]),
        ("/aggregates", [("limit", "")]),
        ("/aggregates", [("from", "2026-02-30")]),
        ("/aggregates", [("from", "2026-1-5")]),
        ("/aggregates", [("to", "2026-11-28T00:00:00Z")]),
        ("/aggregates", [("date_from", DAY)]),  # the Struct's field name, not the API's
        ("/aggregates", [("tenant", "t1")]),  # a typo must not return every tenant
        ("/aggregates", [("tenant_id", "")]),
        ("/aggregates", [("tenant_id", "x" * 129)]),
        ("/aggregates", [("tenant_id", "t1\n")]),
        ("/aggregates", [("use_unit", "u" * 65)]),
        ("/aggregates", [("status", "OPEN")]),
        ("/aggregates", [("cursor", "")]),
        ("/pulses", [("tenant_id", "t1"), ("date", DAY), ("sku", "x")]),
        ("/pulses", [("tenant_id", "t1"), ("date", "2026-11-31")]),
        ("/pulses", [("tenant_id", "t1"), ("date", DAY), ("limit", "10001")]),
        ("/pulses", [("date", DAY)]),
        ("/batches", [("day", DAY)]),
        ("/batches", [("limit", "1001")]),
        ("/batches", [("status", "open")]),
        ("/batches", [("date", "28/11/2026")]),
    ],
)
async def test_bad_parameters_are_400_not_ignored(
    client: Client, path: str, params: list[tuple[str, str]]
) -> None:
    await send(client, [pulse(), pulse(tenant_id="t2")])
    status, body = await get(client, path, params)
    assert status == 400, body
    assert body["error"]["code"] == "invalid_parameter"


async def test_limits_at_the_edges_are_taken(client: Client) -> None:
    await send(client, [pulse(tenant_id=f"t{i}") for i in range(3)])
    assert len((await ok(client, "/aggregates", [("limit", "10000")]))["aggregates"]) == 3
    one = await ok(client, "/aggregates", [("limit", "1")])
    assert len(one["aggregates"]) == 1
    assert one["next_cursor"]
    assert (await ok(client, "/batches", [("limit", "1000")]))["batches"] == []


async def test_from_after_to_is_empty_not_everything(client: Client, clock: FakeClock) -> None:
    await send(client, [pulse(timestamp=(clock.now - dt.timedelta(days=1)).isoformat()), pulse()])
    body = await ok(client, "/aggregates", [("from", DAY), ("to", YESTERDAY)])
    assert body == {"aggregates": [], "next_cursor": None}
    both = await ok(client, "/aggregates", [("from", YESTERDAY), ("to", DAY)])
    assert [r["date"] for r in both["aggregates"]] == [YESTERDAY, DAY]


async def test_repeated_filter_parameter_is_not_silently_narrowed(client: Client) -> None:
    """?tenant_id=a&tenant_id=b is ambiguous: the server must not pick one of them
    and answer as if the other was never asked for (a reconciler asking for two
    tenants would silently get one)."""
    await send(client, [pulse(tenant_id="a"), pulse(tenant_id="b")])
    for params in (
        [("tenant_id", "a"), ("tenant_id", "b")],
        [("limit", "1"), ("limit", "2")],
        [("status", "open"), ("status", "committed")],
    ):
        status, body = await get(client, "/aggregates", params)
        assert status == 400, (params, body)


# -- cursors -----------------------------------------------------------------------


async def test_cursor_from_another_endpoint_is_400(client: Client) -> None:
    await send(client, [pulse(tenant_id=f"t{i}") for i in range(4)])
    await send(client, [pulse(tenant_id="t1") for _ in range(3)])
    await commit(client, DAY)
    agg = (await ok(client, "/aggregates", [("limit", "1")]))["next_cursor"]
    bat = (await ok(client, "/batches", [("limit", "1")]))["next_cursor"]
    pul = (await ok(client, "/pulses", [("tenant_id", "t1"), ("date", DAY), ("limit", "1")]))[
        "next_cursor"
    ]
    assert agg
    assert bat
    assert pul
    for path, extra, cursor in [
        ("/aggregates", [], bat),
        ("/aggregates", [], pul),
        ("/batches", [], agg),
        ("/batches", [], pul),
        ("/pulses", [("tenant_id", "t1"), ("date", DAY)], agg),
        ("/pulses", [("tenant_id", "t1"), ("date", DAY)], bat),
        ("/aggregates", [], agg[:-3]),  # truncated
        ("/aggregates", [], agg + "A"),
        ("/aggregates", [], forged(["2026-11-28", "t1", "sku1"])),
        ("/aggregates", [], forged({"day": DAY})),
        ("/aggregates", [], forged([DAY, "t1", "sku1", 7])),
        ("/pulses", [("tenant_id", "t1"), ("date", DAY)], forged("12")),
        ("/pulses", [("tenant_id", "t1"), ("date", DAY)], forged(1.5)),
        ("/aggregates", [], "x" * 1025),
    ]:
        status, body = await get(client, path, [*extra, ("cursor", cursor)])
        assert status == 400, (path, cursor, body)
        assert body["error"]["code"] == "invalid_parameter"


async def test_a_pulse_cursor_no_page_gave_out_is_400(client: Client) -> None:
    """Negative, or past 64 bits (it reached SQLite, whose OverflowError was a
    500): not a cursor this API gave out."""
    await send(client, [pulse(used_amount="1"), pulse(used_amount="2")])
    for cursor in (forged(-7), forged(2**63), forged(2**90)):
        params = [("tenant_id", "t1"), ("date", DAY), ("cursor", cursor)]
        response = await client.get("/pulses", query_string=params)
        assert response.status_code == 400, await response.get_data()
    body = await ok(client, "/pulses", [("tenant_id", "t1"), ("date", DAY), ("cursor", forged(0))])
    assert [p["used_amount"] for p in body["pulses"]] == ["1", "2"]


# -- ordering and paging -----------------------------------------------------------

# Names that sort differently by code point, by locale, and by normalisation;
# a 128-character name (the limit) and its 127-character prefix; characters
# beyond the BMP (UTF-16 would order them before U+FFxx).
ODD_NAMES = [
    "a",
    "B",
    "Z",
    "z",
    "_",
    "-",
    "~",
    " x",
    "x ",
    "a-b",
    "a.b",
    NFC,
    NFD,
    "\uff21",
    "\U0001f600",
    "\u00e0",
    "A" * 128,
    "A" * 127,
    "\u00e9" * 128,
]


async def test_aggregates_page_in_code_point_order_exactly_once(client: Client) -> None:
    body = [
        pulse(tenant_id=t, product_sku=s, use_unit=u)
        for t in ODD_NAMES[:8] + ODD_NAMES[11:]
        for s, u in [("a", "u"), ("B", "u"), (NFD, "\U0001f600"), (NFC, "\uffe0")]
    ]
    await send(client, body)
    everything = (await ok(client, "/aggregates", [("limit", "10000")]))["aggregates"]
    keys = [agg_key(r) for r in everything]
    assert len(keys) == len(body)
    assert keys == sorted(keys)  # Python's str order is code-point order
    for size in (1, 3, 7):
        paged = await page_through(client, "/aggregates", "aggregates", [("limit", size)])
        assert [agg_key(r) for r in paged] == keys
    for tenant in (NFC, NFD, "A" * 128, "\U0001f600"):
        only = await page_through(
            client, "/aggregates", "aggregates", [("tenant_id", tenant), ("limit", 1)]
        )
        assert {r["tenant_id"] for r in only} == {tenant}
        assert len(only) == 4


async def test_paging_while_pulses_arrive_and_days_commit_sees_each_row_once(
    client: Client, clock: FakeClock
) -> None:
    """Every bucket present before the first page and after the last is seen exactly
    once, in order, although new buckets (before and after the cursor), new
    pulses into seen buckets, and commits land between the pages."""
    yesterday = (clock.now - dt.timedelta(days=1)).isoformat()
    start = [
        pulse(tenant_id=t, product_sku=s, timestamp=ts)
        for t in ("t1", "t3", "t5", "t7")
        for s in ("s1", "s3")
        for ts in (yesterday, None)
    ]
    await send(client, start)
    before = {
        agg_key(r) for r in (await ok(client, "/aggregates", [("limit", 10000)]))["aggregates"]
    }
    turn = iter(range(1000))

    async def disturb() -> None:
        n = next(turn)
        await send(
            client,
            [
                pulse(tenant_id="t0", product_sku=f"n{n}"),  # before any cursor
                pulse(tenant_id="t9", product_sku=f"n{n}", timestamp=yesterday),
                pulse(tenant_id="t4", product_sku="s2"),  # between the seeded ones
                pulse(tenant_id="t1", product_sku="s1"),  # into a bucket seen already
            ],
        )
        if n % 2:
            await commit(client, YESTERDAY if n % 4 == 1 else DAY)

    for status in ("all", "committed", "open"):
        seen = await page_through(
            client, "/aggregates", "aggregates", [("limit", 2), ("status", status)], between=disturb
        )
        keys = [agg_key(r) for r in seen]
        assert keys == sorted(set(keys)), status  # ordered, no repeats
        if status == "all":
            assert before <= set(keys)
    after = {
        agg_key(r) for r in (await ok(client, "/aggregates", [("limit", 10000)]))["aggregates"]
    }
    assert before <= after


async def test_status_open_after_a_partial_commit(client: Client, clock: FakeClock) -> None:
    yesterday = (clock.now - dt.timedelta(days=1)).isoformat()
    await send(
        client,
        [pulse(tenant_id="a", timestamp=yesterday), pulse(tenant_id="a"), pulse(tenant_id="b")],
    )
    await commit(client, YESTERDAY)  # one of the two days
    await send(client, [pulse(tenant_id="c", timestamp=yesterday)])  # a new bucket of that day
    opened = await page_through(
        client, "/aggregates", "aggregates", [("status", "open"), ("limit", 1)]
    )
    assert [agg_key(r)[:2] for r in opened] == [(YESTERDAY, "c"), (DAY, "a"), (DAY, "b")]
    assert all(r["pulse_count"] > r["committed_count"] for r in opened)
    done = await page_through(
        client, "/aggregates", "aggregates", [("status", "committed"), ("limit", 1)]
    )
    assert [agg_key(r)[:2] for r in done] == [(YESTERDAY, "a")]
    assert done[0]["committed_amount"] == done[0]["used_amount"] == "1"
    # A correction re-opens a committed bucket.
    await send(client, [pulse(tenant_id="a", timestamp=yesterday, used_amount="2")])
    reopened = (await ok(client, "/aggregates", [("status", "open"), ("tenant_id", "a")]))[
        "aggregates"
    ]
    assert [(r["date"], r["used_amount"], r["committed_amount"]) for r in reopened] == [
        (YESTERDAY, "3", "1"),
        (DAY, "1", "0"),
    ]


# -- GET /pulses ---------------------------------------------------------------------


async def test_pulses_page_exactly_once_while_pulses_arrive_and_fold(client: Client) -> None:
    """Pages of a bucket's pulses, with writes, folds (a read of /aggregates folds
    SQLite's log) and a commit between pages: each pulse stored before the first
    page is listed once, in order, and the ids are unique."""
    first = [pulse(id=f"c{i}", used_amount=str(i)) for i in range(5)]
    first += [pulse(used_amount=str(100 + i)) for i in range(5)]  # without ids
    await send(client, first)
    await send(client, [pulse(product_sku="other", id="o1"), pulse(tenant_id="t2", id="c0")])
    turn = iter(range(1000))

    async def disturb() -> None:
        n = next(turn)
        await send(client, [pulse(id=f"late{n}", used_amount="7"), pulse(used_amount="8")])
        await ok(client, "/aggregates")  # folds
        if n == 2:
            await commit(client, DAY)

    seen = await page_through(
        client,
        "/pulses",
        "pulses",
        [("tenant_id", "t1"), ("date", DAY), ("limit", 3)],
        between=disturb,
    )
    ids = [p["id"] for p in seen]
    assert len(ids) == len(set(ids))
    assert [p["used_amount"] for p in seen[:10]] == [str(i) for i in range(5)] + [
        str(100 + i) for i in range(5)
    ]
    assert "o1" in ids
    assert {p["tenant_id"] for p in seen} == {"t1"}
    total = await ok(client, "/aggregates", [("tenant_id", "t1"), ("limit", 10000)])
    listed = await page_through(
        client, "/pulses", "pulses", [("tenant_id", "t1"), ("date", DAY), ("limit", 4)]
    )
    assert sum(r["pulse_count"] for r in total["aggregates"]) == len(listed)
    assert [p["id"] for p in listed[: len(seen)]] == ids
    # The same pulses, by sku filter: each is in exactly one sku's listing.
    by_sku = [
        p["id"]
        for sku in ("sku1", "other")
        for p in await page_through(
            client,
            "/pulses",
            "pulses",
            [("tenant_id", "t1"), ("date", DAY), ("product_sku", sku), ("limit", 2)],
        )
    ]
    assert sorted(by_sku) == sorted(p["id"] for p in listed)


async def test_pulses_after_a_purge_and_across_it(
    client: Client, clock: FakeClock, runtime: Runtime
) -> None:
    await send(client, [pulse(id="old1"), pulse(), pulse(id="old2")])
    clock.advance(600)
    cut = clock.now_us
    clock.advance(600)
    await send(client, [pulse(id="new1"), pulse(used_amount="5")])
    page = await ok(client, "/pulses", [("tenant_id", "t1"), ("date", DAY), ("limit", 2)])
    assert [p["id"] for p in page["pulses"]][:1] == ["old1"]
    await ok(client, "/aggregates")  # fold, so the purge works on spans
    removed = runtime.store.purge(partition_of("t1", runtime.store.partitions), cut)
    assert removed == 1
    rest = await ok(
        client,
        "/pulses",
        [("tenant_id", "t1"), ("date", DAY), ("limit", 2), ("cursor", page["next_cursor"])],
    )
    tail = [p["used_amount"] for p in rest["pulses"]]
    more = rest["next_cursor"]
    while more:
        nxt = await ok(
            client, "/pulses", [("tenant_id", "t1"), ("date", DAY), ("limit", 2), ("cursor", more)]
        )
        tail += [p["used_amount"] for p in nxt["pulses"]]
        more = nxt["next_cursor"]
    assert tail == ["1", "5"]
    after = await page_through(client, "/pulses", "pulses", [("tenant_id", "t1"), ("date", DAY)])
    assert next(p["id"] for p in after) == "new1"
    assert len(after) == 2
    # The totals are not purged: the bucket still counts all five.
    [bucket] = (await ok(client, "/aggregates", [("tenant_id", "t1")]))["aggregates"]
    assert bucket["pulse_count"] == 5


async def test_pulses_of_other_days_units_and_lookalike_tenants_stay_out(
    client: Client, clock: FakeClock
) -> None:
    yesterday = (clock.now - dt.timedelta(days=1)).isoformat()
    await send(
        client,
        [
            pulse(tenant_id=NFC, id="mine"),
            pulse(tenant_id=NFD, id="mine"),
            pulse(tenant_id=NFC, id="y", timestamp=yesterday),
            pulse(tenant_id=NFC.upper(), id="upper"),
            pulse(tenant_id=NFC, id="u2", use_unit="u2"),
        ],
    )
    got = await page_through(client, "/pulses", "pulses", [("tenant_id", NFC), ("date", DAY)])
    assert [(p["tenant_id"], p["id"]) for p in got] == [(NFC, "mine"), (NFC, "u2")]
    unit = await ok(client, "/pulses", [("tenant_id", NFC), ("date", DAY), ("use_unit", "u2")])
    assert [p["id"] for p in unit["pulses"]] == ["u2"]
    nfd = await ok(client, "/pulses", [("tenant_id", NFD), ("date", DAY)])
    assert [(p["tenant_id"], p["id"]) for p in nfd["pulses"]] == [(NFD, "mine")]


# -- tenant scope --------------------------------------------------------------------


async def seed_tenants(client: Client) -> None:
    await send(
        client,
        [
            pulse(tenant_id=t, product_sku=s, used_amount=str(n))
            for n, (t, s) in enumerate(
                [(t, s) for t in ("t1", "t2", "t3", "T1", "t1 ", NFC, NFD) for s in ("a", "b")],
                start=1,
            )
        ],
        ADMIN,
    )


@SCOPED
async def test_scoped_key_sees_only_its_tenants_under_any_filter_or_cursor(
    client: Client,
) -> None:
    await seed_tenants(client)
    combos: list[list[tuple[str, Any]]] = [
        [],
        [("product_sku", "a")],
        [("use_unit", "api_call")],
        [("status", "open")],
        [("from", DAY), ("to", DAY)],
        [("limit", 1)],
        [("cursor", forged([DAY, "t0", "a", "api_call"]))],  # before t1
        [("cursor", forged([DAY, "t1", "b", "api_call"]))],  # after t1's rows
        [("cursor", forged(["0001-01-01", " ", " ", " "]))],  # before every row
        [("cursor", forged([YESTERDAY, "t2", "a", "api_call"]))],
    ]
    for key, tenants in [(READ_T1, {"t1"}), (READ_T1_T3, {"t1", "t3"}), (READ_NFC, {NFC})]:
        for params in combos:
            cursor_given = any(name == "cursor" for name, _ in params)
            if cursor_given:
                body = await ok(client, "/aggregates", params, key)
                rows = body["aggregates"]
            else:
                rows = await page_through(client, "/aggregates", "aggregates", params, key=key)
            assert {r["tenant_id"] for r in rows} <= tenants, (key, params)
            if not cursor_given:  # every seeded bucket is open too
                assert {r["tenant_id"] for r in rows} == tenants, (key, params)
        for other in ("t2", "T1", "t1 ", NFD, "t4"):
            if other in tenants:
                continue
            for path, params in [
                ("/aggregates", [("tenant_id", other)]),
                ("/aggregates", [("tenant_id", other), ("cursor", forged([DAY, "t1", "a", "x"]))]),
                ("/pulses", [("tenant_id", other), ("date", DAY)]),
                ("/pulses", [("tenant_id", other), ("date", DAY), ("cursor", forged(0))]),
            ]:
                status, body = await get(client, path, params, key)
                assert status == 403, (key, path, params, body)
                assert body["error"]["code"] == "forbidden_tenant"
    # A repeated tenant_id can never widen the scope.
    for params in (
        [("tenant_id", "t1"), ("tenant_id", "t2")],
        [("tenant_id", "t2"), ("tenant_id", "t1")],
    ):
        status, body = await get(client, "/aggregates", params, READ_T1)
        if status == 200:
            assert {r["tenant_id"] for r in body["aggregates"]} <= {"t1"}
        else:
            assert status in (400, 403)


@pytest.mark.parametrize("settings_overrides", [{"api_keys": KEYS, "partitions": 1}])
async def test_scoped_batches_of_mixed_tenants_show_only_own_records(
    client: Client, sink: MemorySink
) -> None:
    await seed_tenants(client)  # one partition: one batch of every tenant
    sink.block()  # the batch stays pending while it is read
    [batch] = await commit(client, DAY, ADMIN)
    assert batch["record_count"] == 14
    state, other = "pending", "delivered"
    for key, tenants, count, amount in [
        (READ_T1, {"t1"}, 2, "3"),
        (READ_T1_T3, {"t1", "t3"}, 4, "14"),
        (READ_NFC, {NFC}, 2, "23"),
    ]:
        for params in ([], [("date", DAY)], [("status", state)], [("limit", 1)]):
            got = await ok(client, "/batches", params, key)
            assert len(got["batches"]) == 1, (key, params, got)
            [listed] = got["batches"]
            assert (listed["record_count"], listed["used_amount"]) == (count, amount)
            assert listed.get("records") is None
        view = await ok(client, f"/batches/{batch['batch_id']}", key=key)
        assert {r["tenant_id"] for r in view["records"]} == tenants
        assert (view["record_count"], view["used_amount"]) == (count, amount)
        assert (await ok(client, "/batches", [("date", YESTERDAY)], key))["batches"] == []
        assert (await ok(client, "/batches", [("status", other)], key))["batches"] == []
    full = await ok(client, f"/batches/{batch['batch_id']}", key=ADMIN)
    assert len(full["records"]) == 14
    sink.unblock()


@SCOPED
async def test_scoped_pages_merge_several_tenants_in_order(
    client: Client, clock: FakeClock
) -> None:
    yesterday = (clock.now - dt.timedelta(days=1)).isoformat()
    await send(
        client,
        [
            pulse(tenant_id=t, product_sku=s, timestamp=ts)
            for t in ("t1", "t3", "t2")
            for s in ("B", "a", NFC)
            for ts in (None, yesterday)
        ],
        ADMIN,
    )
    everything = await page_through(
        client, "/aggregates", "aggregates", [("limit", 100)], key=READ_T1_T3
    )
    keys = [agg_key(r) for r in everything]
    assert len(keys) == 12
    assert keys == sorted(keys)
    for size in (1, 2, 5):
        paged = await page_through(
            client, "/aggregates", "aggregates", [("limit", size)], key=READ_T1_T3
        )
        assert [agg_key(r) for r in paged] == keys


# -- auth of reads ------------------------------------------------------------------------


@SCOPED
async def test_reads_need_a_key(client: Client) -> None:
    await seed_tenants(client)
    for path in ("/aggregates", "/batches", f"/pulses?tenant_id=t1&date={DAY}", "/batches/x"):
        response = await client.get(path)
        assert response.status_code == 401, path
