"""API keys: configuration, 401/403, roles, tenant scope on writes and reads, redelivery."""

from __future__ import annotations

import hashlib
import hmac
import json
import tomllib
from typing import Any

import pytest
import trio
from quart.typing import TestClientProtocol as Client

from ingestor import reads
from ingestor.__main__ import main
from ingestor.auth import Keyring, Unauthorized
from ingestor.config import ApiKey, load_settings
from ingestor.errors import ConfigError, SinkRejected
from ingestor.runtime import Runtime
from ingestor.sinks.memory import MemorySink

from .conftest import pulse

ADMIN = "admin-key"
INGEST_T1 = "ingest-key-for-t1"
INGEST_ALL = "ingest-key-for-all"
READ_T1 = "read-key-for-t1"
READ_T1_T3 = "read-key-for-t1-and-t3"
READ_ALL = "read-key-for-all"


def table(key: str, role: str, *tenants: str) -> dict[str, Any]:
    return {
        "sha256": hashlib.sha256(key.encode()).hexdigest(),
        "role": role,
        "tenants": list(tenants),
    }


KEYS = [
    table(ADMIN, "admin", "*"),
    table(INGEST_T1, "ingest", "t1"),
    table(INGEST_ALL, "ingest", "*"),
    table(READ_T1, "read", "t1"),
    table(READ_T1_T3, "read", "t1", "t3"),
    table(READ_ALL, "read", "*"),
]


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"api_keys": KEYS}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def send(client: Client, body: Any, key: str = ADMIN) -> Any:
    return await client.post("/pulses", json=body, headers=bearer(key))


async def get_json(client: Client, url: str, key: str, status: int = 200) -> Any:
    response = await client.get(url, headers=bearer(key))
    assert response.status_code == status, await response.get_data()
    return await response.get_json()


# -- configuration -------------------------------------------------------------


def config_error(**overrides: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={}, **overrides)
    return str(caught.value)


@pytest.mark.parametrize("bind", ["0.0.0.0:8081", "[::]:8081", "10.1.2.3:80", "example.com:80"])
def test_open_mode_refuses_a_non_loopback_bind(bind: str) -> None:
    message = config_error(bind=bind)
    assert message.startswith("api_keys: none configured")
    assert "keys new" in message
    assert load_settings(environ={}, bind=bind, api_keys=KEYS[:1]).bind == bind


@pytest.mark.parametrize("bind", ["127.0.0.1:8081", "127.0.0.2:1", "[::1]:8081", "localhost:80"])
def test_open_mode_is_allowed_on_loopback(bind: str) -> None:
    assert load_settings(environ={}, bind=bind).api_keys == ()


def test_keys_come_from_the_config_file_only() -> None:
    with pytest.raises(ConfigError, match="INGESTOR_API_KEYS: set api_keys in the config file"):
        load_settings(environ={"INGESTOR_API_KEYS": "[]"})


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ({"sha256": "abc", "role": "read", "tenants": ["t1"]}, "api_keys[0].sha256: expected"),
        ({"sha256": "0" * 64, "role": "root", "tenants": ["*"]}, "api_keys[0].role"),
        ({"sha256": "0" * 64, "role": "read"}, "api_keys[0]"),
        ({"sha256": "0" * 64, "role": "read", "tenants": []}, "api_keys[0].tenants"),
        ({"sha256": "0" * 64, "role": "read", "tenants": ["*", "t1"]}, "api_keys[0].tenants"),
        ({"sha256": "0" * 64, "role": "admin", "tenants": ["t1"]}, "api_keys[0].tenants"),
        ({"sha256": "0" * 64, "role": "read", "tenants": ["a\nb"]}, "api_keys[0].tenants"),
        ({"sha256": "0" * 64, "role": "read", "tenants": ["t"], "key": "x"}, "api_keys[0]"),
    ],
)
def test_bad_key_tables_are_named(key: dict[str, Any], expected: str) -> None:
    assert config_error(api_keys=[key]).startswith(expected)


def test_the_same_key_twice_is_a_mistake() -> None:
    twice = [
        table(ADMIN, "admin", "*"),
        {**table(ADMIN, "read", "t1"), "sha256": table(ADMIN, "admin")["sha256"].upper()},
    ]
    assert config_error(api_keys=twice).startswith("api_keys[1].sha256: the same key")


def test_keys_from_a_toml_file(tmp_path: Any) -> None:
    path = tmp_path / "ingestor.toml"
    path.write_text(
        'bind = "0.0.0.0:8081"\n\n[[api_keys]]\nsha256 = "' + "a" * 64 + '"\nrole = "read"\n'
        'tenants = ["t1", "t2"]\n'
    )
    [key] = load_settings(path, {}).api_keys
    assert key == ApiKey("a" * 64, "read", ("t1", "t2"))


def test_every_configured_hash_is_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit at a match: the time taken does not depend on which key matched."""
    keyring = Keyring([ApiKey(**k) for k in [{**k, "tenants": tuple(k["tenants"])} for k in KEYS]])
    calls: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    assert keyring.authenticate(f"Bearer {ADMIN}").role == "admin"
    assert len(calls) == len(KEYS)
    calls.clear()
    with pytest.raises(Unauthorized):
        keyring.authenticate("Bearer nobody")
    assert len(calls) == len(KEYS)


def test_keys_new_prints_a_key_and_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "new", "--role", "ingest", "--tenant", "t1", "--tenant", "b\u00e9"]) == 0
    out = capsys.readouterr().out
    key = out.split("\n\n")[1].strip()
    assert len(key) >= 43
    text = out[out.index("[[api_keys]]") :]
    [entry] = tomllib.loads(text)["api_keys"]
    assert entry == {
        "sha256": hashlib.sha256(key.encode()).hexdigest(),
        "role": "ingest",
        "tenants": ["t1", "b\u00e9"],
    }
    assert key not in text
    settings = load_settings(environ={}, api_keys=[entry])
    principal = Keyring(settings.api_keys).authenticate(f"Bearer {key}")
    assert principal.tenants == frozenset({"t1", "b\u00e9"})


def test_keys_new_admin_is_for_every_tenant(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "new", "--role", "admin"]) == 0
    assert 'tenants = ["*"]' in capsys.readouterr().out


@pytest.mark.parametrize(
    "args",
    [
        ["--role", "read"],
        ["--role", "admin", "--tenant", "t1"],
        ["--role", "ingest", "--tenant", "a\tb"],
    ],
)
def test_keys_new_refuses_what_the_server_would(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "new", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err


# -- 401 and 403 ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "invalid_token"),
    [
        ({}, False),
        ({"Authorization": "Bearer nobody"}, True),
        ({"Authorization": f"Basic {ADMIN}"}, True),
        ({"Authorization": "Bearer"}, True),
        ({"Authorization": f"Bearer {ADMIN}x"}, True),
    ],
)
async def test_no_or_unknown_key_is_401(
    client: Client, headers: dict[str, str], invalid_token: bool
) -> None:
    for method, url in [("GET", "/aggregates"), ("POST", "/pulses"), ("GET", "/batches/x")]:
        response = await client.open(url, method=method, headers=headers, json=pulse())
        assert response.status_code == 401, url
        body = await response.get_json()
        assert body["error"]["code"] == "unauthorized"
        challenge = response.headers["WWW-Authenticate"]
        assert challenge.startswith("Bearer ")
        assert ('error="invalid_token"' in challenge) is invalid_token
    assert await get_json(client, "/aggregates", ADMIN) == {"aggregates": [], "next_cursor": None}


async def test_bearer_scheme_is_case_insensitive(client: Client) -> None:
    response = await client.get("/aggregates", headers={"Authorization": f"bearer {READ_ALL}"})
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("key", "method", "url"),
    [
        (READ_ALL, "POST", "/pulses"),
        (INGEST_ALL, "GET", "/aggregates"),
        (INGEST_ALL, "GET", "/pulses?tenant_id=t1&date=2026-11-28"),
        (INGEST_ALL, "GET", "/batches"),
        (INGEST_ALL, "GET", "/batches/x"),
        (READ_ALL, "POST", "/aggregates/commit?date=2026-11-28"),
        (INGEST_ALL, "POST", "/aggregates/commit?date=2026-11-28"),
        (READ_ALL, "POST", "/batches/x/redeliver"),
    ],
)
async def test_key_without_the_role_is_403(client: Client, key: str, method: str, url: str) -> None:
    response = await client.open(url, method=method, headers=bearer(key), json=pulse())
    assert response.status_code == 403
    error = (await response.get_json())["error"]
    assert error["code"] == "forbidden"
    assert "role" in error["message"]
    assert await get_json(client, "/aggregates", ADMIN) == {"aggregates": [], "next_cursor": None}


@pytest.mark.parametrize("url", ["/healthz", "/readyz", "/metrics", "/openapi.json"])
async def test_health_metrics_and_openapi_need_no_key(client: Client, url: str) -> None:
    assert (await client.get(url)).status_code == 200


async def test_admin_may_do_everything(client: Client) -> None:
    assert (await send(client, pulse(), ADMIN)).status_code == 202
    await get_json(client, "/aggregates", ADMIN)
    await get_json(client, "/pulses?tenant_id=t1&date=2026-11-28", ADMIN)
    response = await client.post("/aggregates/commit?date=2026-11-28", headers=bearer(ADMIN))
    assert response.status_code == 200
    await get_json(client, "/batches", ADMIN)


# -- tenant scope: writes ----------------------------------------------------------


async def test_pulses_of_other_tenants_are_rejected_the_rest_stored(client: Client) -> None:
    body = [
        pulse(tenant_id="t1", id="a"),
        pulse(tenant_id="t2", id="b"),
        pulse(tenant_id="t1", used_amount="2"),
        pulse(tenant_id="t9"),
    ]
    response = await send(client, body, INGEST_T1)
    assert response.status_code == 202
    report = await response.get_json()
    assert (report["accepted"], report["rejected"]) == (2, 2)
    assert [(i["index"], i["status"], i.get("id")) for i in report["items"]] == [
        (1, "rejected", "b"),
        (3, "rejected", None),
    ]
    assert all(i["error"].startswith("forbidden_tenant") for i in report["items"])
    rows = (await get_json(client, "/aggregates", READ_ALL))["aggregates"]
    assert [(r["tenant_id"], r["used_amount"], r["pulse_count"]) for r in rows] == [("t1", "3", 2)]


async def test_ndjson_of_other_tenants_is_rejected_line_by_line(client: Client) -> None:
    lines = b"\n".join(json.dumps(pulse(tenant_id=t)).encode() for t in ("t2", "t1"))
    response = await client.post(
        "/pulses",
        data=lines,
        headers={**bearer(INGEST_T1), "Content-Type": "application/x-ndjson"},
    )
    report = await response.get_json()
    assert (report["accepted"], report["rejected"]) == (1, 1)
    assert report["items"][0]["index"] == 0


async def test_single_pulse_of_another_tenant_is_403(client: Client) -> None:
    response = await send(client, pulse(tenant_id="t2"), INGEST_T1)
    assert response.status_code == 403
    error = (await response.get_json())["error"]
    assert error["code"] == "forbidden_tenant"
    assert error["details"]["items"][0]["status"] == "rejected"
    assert (await get_json(client, "/aggregates", READ_ALL))["aggregates"] == []
    assert (await send(client, pulse(tenant_id="t2"), INGEST_ALL)).status_code == 202


async def test_forbidden_pulses_count_as_rejected(client: Client, runtime: Runtime) -> None:
    await send(client, [pulse(tenant_id="t2"), pulse(tenant_id="t1")], INGEST_T1)
    assert (runtime.pulses.accepted, runtime.pulses.rejected) == (1, 1)


# -- tenant scope: reads -------------------------------------------------------------


async def seed(client: Client) -> None:
    body = [
        pulse(tenant_id=t, product_sku=s, used_amount=str(n))
        for n, (t, s) in enumerate(
            [(t, s) for t in ("t1", "t2", "t3", "t4") for s in ("a", "b")], start=1
        )
    ]
    assert (await send(client, body, ADMIN)).status_code == 202


async def test_scoped_read_without_filter_shows_only_its_tenants(client: Client) -> None:
    await seed(client)
    rows = (await get_json(client, "/aggregates", READ_T1))["aggregates"]
    assert {r["tenant_id"] for r in rows} == {"t1"}
    assert len((await get_json(client, "/aggregates", READ_ALL))["aggregates"]) == 8


async def test_scoped_read_pages_over_its_tenants_in_order(client: Client) -> None:
    await seed(client)
    seen: list[tuple[str, str]] = []
    url = "/aggregates?limit=1"
    while True:
        page = await get_json(client, url, READ_T1_T3)
        seen += [(r["tenant_id"], r["product_sku"]) for r in page["aggregates"]]
        if page["next_cursor"] is None:
            break
        url = f"/aggregates?limit=1&cursor={page['next_cursor']}"
    assert seen == [("t1", "a"), ("t1", "b"), ("t3", "a"), ("t3", "b")]


async def test_scoped_read_of_another_tenant_is_403(client: Client) -> None:
    await seed(client)
    for url in ["/aggregates?tenant_id=t2", "/pulses?tenant_id=t2&date=2026-11-28"]:
        body = await get_json(client, url, READ_T1, status=403)
        assert body["error"]["code"] == "forbidden_tenant"
    own = await get_json(client, "/pulses?tenant_id=t1&date=2026-11-28", READ_T1)
    assert len(own["pulses"]) == 2
    assert len((await get_json(client, "/aggregates?tenant_id=t1", READ_T1))["aggregates"]) == 2


@pytest.mark.parametrize("settings_overrides", [{"api_keys": KEYS, "partitions": 1}])
async def test_scoped_batches_show_only_own_records(client: Client) -> None:
    await seed(client)
    response = await client.post("/aggregates/commit?date=2026-11-28", headers=bearer(ADMIN))
    [summary] = (await response.get_json())["batches"]  # one partition: one batch
    assert summary["record_count"] == 8

    [listed] = (await get_json(client, "/batches", READ_T1))["batches"]
    assert (listed["batch_id"], listed["record_count"], listed["used_amount"]) == (
        summary["batch_id"],
        2,
        "3",
    )
    view = await get_json(client, f"/batches/{summary['batch_id']}", READ_T1)
    assert {r["tenant_id"] for r in view["records"]} == {"t1"}
    assert (view["record_count"], view["used_amount"]) == (2, "3")
    full = await get_json(client, f"/batches/{summary['batch_id']}", READ_ALL)
    assert (full["record_count"], full["used_amount"]) == (8, "36")


async def test_scoped_key_does_not_see_batches_without_its_tenants(client: Client) -> None:
    await send(client, [pulse(tenant_id="t2")], ADMIN)
    response = await client.post("/aggregates/commit?date=2026-11-28", headers=bearer(ADMIN))
    [summary] = (await response.get_json())["batches"]
    assert (await get_json(client, "/batches", READ_T1)) == {"batches": [], "next_cursor": None}
    body = await get_json(client, f"/batches/{summary['batch_id']}", READ_T1, status=404)
    assert body["error"]["code"] == "not_found"


@pytest.mark.parametrize("settings_overrides", [{"api_keys": KEYS, "partitions": 8}])
async def test_scoped_batch_listing_pages_within_its_scan_budget(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reads, "SCAN_BUDGET", 3)
    monkeypatch.setattr(reads, "_SCAN_PAGE", 2)
    await send(client, [pulse(tenant_id=f"x{i}") for i in range(40)] + [pulse(tenant_id="t1")])
    response = await client.post("/aggregates/commit?date=2026-11-28", headers=bearer(ADMIN))
    batches = (await response.get_json())["batches"]
    assert len(batches) == 8
    mine: list[str] = []
    url, pages = "/batches?limit=5", 0
    while True:
        page = await get_json(client, url, READ_T1)
        pages += 1
        mine += [b["batch_id"] for b in page["batches"]]
        if page["next_cursor"] is None:
            break
        url = f"/batches?limit=5&cursor={page['next_cursor']}"
    assert pages > 1  # 8 batches, at most 3 (+1) opened per page
    assert len(mine) == 1
    view = await get_json(client, f"/batches/{mine[0]}", READ_T1)
    assert [r["tenant_id"] for r in view["records"]] == ["t1"]


# -- redelivery --------------------------------------------------------------------


async def failed_batch(client: Client, runtime: Runtime, sink: MemorySink) -> str:
    sink.fail_with(SinkRejected("HTTP 400: bad schema"))
    sink.block()
    await send(client, pulse())
    response = await client.post("/aggregates/commit?date=2026-11-28", headers=bearer(ADMIN))
    [batch] = (await response.get_json())["batches"]
    sink.unblock()
    await runtime.deliverer.deliver_due()
    return str(batch["batch_id"])


async def test_redeliver_a_failed_batch(
    client: Client, runtime: Runtime, sink: MemorySink, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch_id = await failed_batch(client, runtime, sink)
    woken: list[bool] = []
    monkeypatch.setattr(runtime.deliverer, "wake", lambda: woken.append(True))
    response = await client.post(f"/batches/{batch_id}/redeliver", headers=bearer(ADMIN))
    assert response.status_code == 200
    view = await response.get_json()
    assert (view["batch_id"], view["status"]) == (batch_id, "pending")
    assert woken == [True]
    with trio.fail_after(5):
        await runtime.deliverer.deliver_due()
    assert batch_id in sink.delivered
    again = await client.post(f"/batches/{batch_id}/redeliver", headers=bearer(ADMIN))
    assert again.status_code == 409
    error = (await again.get_json())["error"]
    assert (error["code"], "delivered" in error["message"]) == ("not_failed", True)


async def test_redeliver_a_pending_batch_is_409(
    client: Client, runtime: Runtime, sink: MemorySink
) -> None:
    sink.block()
    await send(client, pulse())
    response = await client.post("/aggregates/commit?date=2026-11-28", headers=bearer(ADMIN))
    [batch] = (await response.get_json())["batches"]
    again = await client.post(f"/batches/{batch['batch_id']}/redeliver", headers=bearer(ADMIN))
    assert again.status_code == 409
    sink.unblock()


@pytest.mark.parametrize("batch_id", ["nope", "a-b-p1-c", "x" * 300])
async def test_redeliver_an_unknown_batch_is_404(client: Client, batch_id: str) -> None:
    response = await client.post(f"/batches/{batch_id}/redeliver", headers=bearer(ADMIN))
    assert response.status_code == 404
    assert (await response.get_json())["error"]["code"] == "not_found"
