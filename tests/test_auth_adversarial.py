"""Adversarial tests of authentication and authorisation (README "API keys").

What is attacked: the Authorization header as it comes off the wire (case,
whitespace, duplicates, non-ASCII bytes, empty keys), the role each route
needs (every rule of the app, including ones added later), tenant-scoped
keys writing or reading another tenant through look-alike names, duplicate
JSON members, ids or batches, how keys are configured (config file, env,
`keys new`) and whether a mistake leaves the service open, and whether a
key or a tenant leaks into an answer, /metrics or the server's log.

Most tests run the app in process (tests/conftest.py); those about bytes on
the wire or the server's own output run `python -m ingestor serve`
(tests/support/server.py). A docstring that begins "Was:" tells a defect
the test found, since fixed.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trio
from quart import Quart
from quart.typing import TestClientProtocol as Client

from ingestor.__main__ import main
from ingestor.auth import Keyring, Unauthorized
from ingestor.config import ApiKey, load_settings
from ingestor.errors import ConfigError, SinkRejected
from ingestor.routes import NEEDS
from ingestor.runtime import Runtime
from ingestor.sinks.memory import MemorySink

from .conftest import pulse
from .support.server import ServerProcess

DAY = "2026-11-28"  # the FakeClock's day
YESTERDAY = "2026-11-27"

ADMIN = "aa-admin-key-0001"
INGEST_T1 = "aa-ingest-t1-0002"
READ_T1 = "aa-read-t1-0003"
READ_T9 = "aa-read-t9-0004"  # a tenant that never sends anything
INGEST_ALL = "aa-ingest-all-0005"
UNKNOWN = "aa-nobody-0006"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def table(key: str, role: str, *tenants: str) -> dict[str, Any]:
    return {"sha256": sha(key), "role": role, "tenants": list(tenants)}


KEYS = [
    table(ADMIN, "admin", "*"),
    table(INGEST_T1, "ingest", "t1"),
    table(READ_T1, "read", "t1"),
    table(READ_T9, "read", "t9"),
    table(INGEST_ALL, "ingest", "*"),
]
WITH_KEYS = pytest.mark.parametrize("settings_overrides", [{"api_keys": KEYS}])
ONE_PARTITION = pytest.mark.parametrize("settings_overrides", [{"api_keys": KEYS, "partitions": 1}])


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key is not None else {}


def keyring(*keys: tuple[str, str, tuple[str, ...]]) -> Keyring:
    return Keyring([ApiKey(sha(key), role, tenants) for key, role, tenants in keys])  # type: ignore[arg-type]


async def send(client: Client, body: Any, key: str) -> Any:
    return await client.post("/pulses", json=body, headers=bearer(key))


async def aggregates(client: Client, key: str = ADMIN) -> list[dict[str, Any]]:
    response = await client.get("/aggregates", headers=bearer(key))
    assert response.status_code == 200, await response.get_data()
    rows: list[dict[str, Any]] = (await response.get_json())["aggregates"]
    return rows


async def commit(client: Client, day: str = DAY) -> list[dict[str, Any]]:
    response = await client.post(f"/aggregates/commit?date={day}", headers=bearer(ADMIN))
    assert response.status_code == 200, await response.get_data()
    batches: list[dict[str, Any]] = (await response.get_json())["batches"]
    return batches


# -- the Authorization header, parsed ----------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        f"Bearer {ADMIN}",
        f"bearer {ADMIN}",  # the scheme is case-insensitive (RFC 9110 §11.1)
        f"BEARER {ADMIN}",
        [f"Bearer {ADMIN}"],  # one header, as a request lists them
    ],
)
def test_the_configured_key_is_accepted(header: str | list[str]) -> None:
    ring = keyring((ADMIN, "admin", ("*",)), (READ_T1, "read", ("t1",)))
    assert ring.authenticate(header).role == "admin"


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        [],
        "Bearer",
        "Bearer ",
        "Bearer      ",
        ADMIN,  # no scheme
        f"Basic {ADMIN}",
        f"Token {ADMIN}",
        f"Bearer:{ADMIN}",
        f"Bearer\t{ADMIN}",
        f"Bearer {ADMIN.upper()}",  # keys are case-sensitive
        f"Bearer {ADMIN[:-1]}",
        f"Bearer {ADMIN}x",
        f"Bearer {ADMIN}:",
        f"Bearer {ADMIN},",
        f"Bearer {ADMIN} {ADMIN}",
        f"Bearer {ADMIN}, Bearer {ADMIN}",  # two values folded into one header
        f"Bearer {ADMIN}\u200b",
        f"Bearer {ADMIN}\u00e9",
        f"Bearer {ADMIN}".encode().decode("latin-1") + "\u00ff",
        [f"Bearer {ADMIN}", f"Bearer {ADMIN}"],  # the same key twice is still two headers
        [f"Bearer {READ_T1}", f"Bearer {ADMIN}"],
        [f"Bearer {ADMIN}", ""],
    ],
)
def test_anything_but_one_exact_key_is_401_and_never_echoed(header: Any) -> None:
    ring = keyring((ADMIN, "admin", ("*",)), (READ_T1, "read", ("t1",)))
    with pytest.raises(Unauthorized) as caught:
        ring.authenticate(header)
    assert caught.value.status == 401
    assert ADMIN not in caught.value.message
    assert READ_T1 not in caught.value.message
    assert caught.value.challenge.startswith('Bearer realm="billing-ingestor"')


def test_a_configured_hash_of_the_empty_key_never_matches() -> None:
    """An operator who hashed an empty string must not open the service to
    every request that sends `Bearer` with nothing after it."""
    ring = keyring(("", "admin", ("*",)))
    for header in ("", "Bearer", "Bearer ", "Bearer  ", None, [""]):
        with pytest.raises(Unauthorized):
            ring.authenticate(header)


def test_a_key_holding_a_colon_is_a_bearer_token_not_basic_credentials() -> None:
    ring = keyring(("user:secret", "read", ("t1",)))
    assert ring.authenticate("Bearer user:secret").tenants == frozenset({"t1"})
    for header in ("Basic dXNlcjpzZWNyZXQ=", "Bearer user", "Bearer secret", "user:secret"):
        with pytest.raises(Unauthorized):
            ring.authenticate(header)


# -- every route needs what it should ------------------------------------------------------

NO_KEY, BAD_KEY = None, UNKNOWN
# (method, url, JSON body) -> status for: ingest t1, read t1, admin
ROUTES: list[tuple[str, str, Any, tuple[int, int, int]]] = [
    ("POST", "/pulses", pulse(), (202, 403, 202)),
    ("GET", f"/pulses?tenant_id=t1&date={DAY}", None, (403, 200, 200)),
    ("HEAD", f"/pulses?tenant_id=t1&date={DAY}", None, (403, 200, 200)),
    ("GET", "/aggregates", None, (403, 200, 200)),
    ("HEAD", "/aggregates", None, (403, 200, 200)),
    ("POST", f"/aggregates/commit?date={YESTERDAY}", None, (403, 403, 200)),
    ("POST", "/aggregates/commit", {"date": YESTERDAY}, (403, 403, 200)),
    ("GET", "/batches", None, (403, 200, 200)),
    ("HEAD", "/batches", None, (403, 200, 200)),
    ("GET", "/batches/nope", None, (403, 404, 404)),
    ("POST", "/batches/nope/redeliver", None, (403, 403, 404)),
]


@WITH_KEYS
@pytest.mark.parametrize(("method", "url", "body", "expected"), ROUTES)
async def test_each_route_answers_each_role_as_documented(
    client: Client, method: str, url: str, body: Any, expected: tuple[int, int, int]
) -> None:
    extra: dict[str, Any] = {} if body is None else {"json": body}
    for key in (NO_KEY, BAD_KEY):
        response = await client.open(url, method=method, headers=bearer(key), **extra)
        assert response.status_code == 401, (key, method, url)
        assert response.headers["WWW-Authenticate"].startswith("Bearer ")
    for key, status in zip((INGEST_T1, READ_T1, ADMIN), expected, strict=True):
        response = await client.open(url, method=method, headers=bearer(key), **extra)
        assert response.status_code == status, (key, method, url, await response.get_data())
        if status == 403:
            assert (await response.get_json())["error"]["code"] == "forbidden"


@WITH_KEYS
@pytest.mark.parametrize("url", ["/healthz", "/readyz", "/metrics", "/openapi.json"])
async def test_public_routes_ignore_a_bad_key_and_a_missing_one(client: Client, url: str) -> None:
    for headers in ({}, bearer(UNKNOWN), {"Authorization": "Basic Zm9vOmJhcg=="}):
        assert (await client.get(url, headers=headers)).status_code == 200


@WITH_KEYS
async def test_every_rule_of_the_app_is_in_the_role_table_and_guarded(app: Quart) -> None:
    """A route added to the app without an entry in routes.NEEDS, or marked public
    by mistake, shows up here: only the four documented routes answer without a key."""
    client = app.test_client()
    public = set()
    for rule in app.url_map.iter_rules():
        assert rule.endpoint in NEEDS, rule.rule
        url = re.sub(r"<[^>]+>", "x", rule.rule)
        for method in sorted((rule.methods or set()) - {"OPTIONS"}):
            response = await client.open(url, method=method, json=pulse())
            if NEEDS[rule.endpoint] == "public":
                public.add(rule.rule)
                assert response.status_code in (200, 503), (method, url)
            else:
                assert response.status_code == 401, (method, url)
    assert public == {"/healthz", "/readyz", "/metrics", "/openapi.json"}


@WITH_KEYS
async def test_no_method_or_path_trick_reaches_a_guarded_action(client: Client) -> None:
    await send(client, pulse(), ADMIN)
    # Methods the route does not have: nobody commits through them, not even an admin.
    for method, headers in [
        ("GET", {"X-HTTP-Method-Override": "POST"}),
        ("GET", {"X-HTTP-Method": "POST"}),
        ("OPTIONS", {}),
        ("PUT", {}),
        ("PATCH", {}),
    ]:
        for key in (None, READ_T1, INGEST_T1, ADMIN):
            url = f"/aggregates/commit?date={DAY}"
            response = await client.open(
                url, method=method, headers={**headers, **bearer(key)}, json={"date": DAY}
            )
            assert response.status_code in (401, 403, 405), (method, headers, key)
    listing = await (await client.get("/batches", headers=bearer(ADMIN))).get_json()
    assert listing["batches"] == []  # nothing was committed
    # Spellings of the path that reach the route still need its role.
    for url in (
        f"//aggregates/commit?date={DAY}",
        f"/aggregates//commit?date={DAY}",
        f"/aggregates/commit/?date={DAY}",
        f"/%61ggregates/commit?date={DAY}",
        "/batches/x/redeliver/",
    ):
        for key in (None, READ_T1, INGEST_T1):
            response = await client.post(url, headers=bearer(key))
            assert response.status_code in (308, 401, 403, 404), (url, key)
    listing = await (await client.get("/batches", headers=bearer(ADMIN))).get_json()
    assert listing["batches"] == []


# -- tenant scope on writes ------------------------------------------------------------------


@WITH_KEYS
async def test_look_alike_tenants_are_other_tenants(client: Client) -> None:
    lookalikes = ["T1", "t1 ", " t1", "t1\u200b", "\uff541", "t1\u0301", "t\u0130", "*", "t"]
    body = [pulse(tenant_id=t, id=f"p{i}") for i, t in enumerate(["t1", *lookalikes])]
    response = await send(client, body, INGEST_T1)
    assert response.status_code == 202
    report = await response.get_json()
    assert (report["accepted"], report["rejected"]) == (1, len(lookalikes))
    assert all(item["error"].startswith("forbidden_tenant") for item in report["items"])
    assert [r["tenant_id"] for r in await aggregates(client)] == ["t1"]


@WITH_KEYS
async def test_a_duplicated_tenant_member_never_writes_the_other_tenant(client: Client) -> None:
    """JSON objects may repeat a member; whichever the decoder keeps, the key's
    scope is checked against that same value, never against the other."""
    fields = '"product_sku": "s", "use_unit": "u", "used_amount": "1"'
    for first, last in [("t1", "t2"), ("t2", "t1")]:
        raw = f'{{"tenant_id": "{first}", {fields}, "tenant_id": "{last}"}}'
        for content_type, data in [
            ("application/json", raw),
            ("application/json", f"[{raw}, {raw}]"),
            ("application/x-ndjson", f"{raw}\n{raw}\n"),
        ]:
            headers = {**bearer(INGEST_T1), "Content-Type": content_type}
            response = await client.post("/pulses", data=data.encode(), headers=headers)
            assert response.status_code in (202, 403, 422), await response.get_data()
    assert {r["tenant_id"] for r in await aggregates(client)} <= {"t1"}


@WITH_KEYS
async def test_escaped_tenant_names_are_checked_after_decoding(client: Client) -> None:
    lines = [
        b'{"tenant_id": "t\\u0031", "product_sku": "s", "use_unit": "u", "used_amount": 1}',
        b'{"tenant_id": "\\u0074\\u0032", "product_sku": "s", "use_unit": "u", "used_amount": 1}',
        b'{"tenant_id": "t2\\u0000", "product_sku": "s", "use_unit": "u", "used_amount": 1}',
        b'{"tenant_id": "t1\\u001fx", "product_sku": "s", "use_unit": "u", "used_amount": 1}',
    ]
    response = await client.post(
        "/pulses",
        data=b"\n".join(lines),
        headers={**bearer(INGEST_T1), "Content-Type": "application/x-ndjson"},
    )
    report = await response.get_json()
    assert (report["accepted"], report["rejected"]) == (1, 3), report
    assert report["items"][0]["error"].startswith("forbidden_tenant")
    rows = await aggregates(client)
    assert [(r["tenant_id"], r["pulse_count"]) for r in rows] == [("t1", 1)]


@WITH_KEYS
async def test_another_tenants_ids_are_no_oracle_and_are_not_consumed(client: Client) -> None:
    """A scoped key learns nothing of another tenant's ids (no duplicate or
    conflict for them) and cannot spend them: ids are per tenant."""
    assert (await send(client, pulse(tenant_id="t2", id="shared"), ADMIN)).status_code == 202
    probes = [
        pulse(tenant_id="t2", id="shared"),  # same payload
        pulse(tenant_id="t2", id="shared", used_amount="9"),  # different payload
        pulse(tenant_id="t2", id="fresh"),
    ]
    report = await (await send(client, probes, INGEST_T1)).get_json()
    assert [(i["status"], i["error"].split(":")[0]) for i in report["items"]] == [
        ("rejected", "forbidden_tenant")
    ] * 3
    assert (report["duplicates"], report.get("conflicts", 0)) == (0, 0)
    # "fresh" was not recorded for t2 by the rejected attempt ...
    fresh = await (await send(client, pulse(tenant_id="t2", id="fresh"), INGEST_ALL)).get_json()
    assert (fresh["accepted"], fresh["duplicates"]) == (1, 0)
    # ... and t1 may use the id t2 holds.
    own = await (await send(client, pulse(tenant_id="t1", id="shared"), INGEST_T1)).get_json()
    assert (own["accepted"], own["duplicates"]) == (1, 0)
    totals = {r["tenant_id"]: r["pulse_count"] for r in await aggregates(client)}
    assert totals == {"t1": 1, "t2": 2}


@WITH_KEYS
async def test_a_single_foreign_pulse_is_403_and_stores_nothing(client: Client) -> None:
    for body in (pulse(tenant_id="t2"), pulse(tenant_id="t2", id="x")):
        response = await send(client, body, INGEST_T1)
        assert response.status_code == 403
        assert (await response.get_json())["error"]["code"] == "forbidden_tenant"
    response = await client.post(
        "/pulses",
        data=json.dumps(pulse(tenant_id="t2")).encode(),
        headers={**bearer(INGEST_T1), "Content-Type": "application/x-ndjson"},
    )
    assert response.status_code in (202, 403)
    assert (await response.get_json()).get("accepted", 0) == 0
    assert await aggregates(client) == []


# -- tenant scope on reads ---------------------------------------------------------------------


@ONE_PARTITION
async def test_a_key_of_a_silent_tenant_sees_nothing_of_the_others(
    client: Client, sink: MemorySink
) -> None:
    sink.block()
    body = [pulse(tenant_id=t, product_sku=s) for t in ("t1", "t2") for s in ("a", "b")]
    assert (await send(client, body, ADMIN)).status_code == 202
    [batch] = await commit(client)
    assert await aggregates(client, READ_T9) == []
    listing = await (await client.get("/batches", headers=bearer(READ_T9))).get_json()
    assert listing == {"batches": [], "next_cursor": None}
    for params in ("status=pending", f"date={DAY}", "limit=1"):
        page = await (await client.get(f"/batches?{params}", headers=bearer(READ_T9))).get_json()
        assert page["batches"] == [], params
    # Another tenant's batch answers exactly as a batch that does not exist.
    seen = await client.get(f"/batches/{batch['batch_id']}", headers=bearer(READ_T9))
    missing = await client.get(f"/batches/{batch['batch_id']}0", headers=bearer(READ_T9))
    assert seen.status_code == missing.status_code == 404
    unseen, absent = (await seen.get_json())["error"], (await missing.get_json())["error"]
    assert unseen["code"] == absent["code"] == "not_found"
    assert unseen["message"].replace(batch["batch_id"], "ID") == absent["message"].replace(
        batch["batch_id"] + "0", "ID"
    )
    for url in ("/aggregates?tenant_id=t1", f"/pulses?tenant_id=t1&date={DAY}"):
        response = await client.get(url, headers=bearer(READ_T9))
        assert response.status_code == 403
    head = await client.head(f"/pulses?tenant_id=t1&date={DAY}", headers=bearer(READ_T9))
    assert head.status_code == 403
    sink.unblock()


@ONE_PARTITION
async def test_a_scoped_key_does_not_read_the_sinks_words_about_a_shared_batch(
    client: Client, runtime: Runtime, sink: MemorySink
) -> None:
    """Was: a key scoped to t1 read `last_error` of a shared batch verbatim.

    A batch holds one partition's day, records of several tenants, and its
    `last_error` is the sink's answer about the whole batch (for the http
    sink, "HTTP <status>: <the start of the billing system's response>"). A
    billing system that names the record it refused tells a t1 key about
    t2's usage, which README ("read ... showing only its tenants") and
    reads.py ("each showing only those records") say a scoped key never sees.
    """
    secret = "record 3 refused: tenant t2 (acme-secret-customer) sku b amount 1"
    sink.fail_with(SinkRejected(f"HTTP 422: {secret}"))
    sink.block()
    body = [pulse(tenant_id=t, product_sku=s) for t in ("t1", "t2") for s in ("a", "b")]
    assert (await send(client, body, ADMIN)).status_code == 202
    [batch] = await commit(client)
    sink.unblock()
    await runtime.deliverer.deliver_due()
    full = await (
        await client.get(f"/batches/{batch['batch_id']}", headers=bearer(ADMIN))
    ).get_json()
    assert full["status"] == "failed"
    assert secret in full["last_error"]

    view = await (
        await client.get(f"/batches/{batch['batch_id']}", headers=bearer(READ_T1))
    ).get_json()
    assert {r["tenant_id"] for r in view["records"]} == {"t1"}  # the records are restricted
    listed = await (await client.get("/batches", headers=bearer(READ_T1))).get_json()
    for shown in (view, *listed["batches"]):
        assert "t2" not in (shown["last_error"] or ""), shown["last_error"]
        assert "acme-secret-customer" not in (shown["last_error"] or "")


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bind",
    [
        "0.0.0.0:8081",
        "[::]:8081",
        "[::ffff:0.0.0.0]:8081",
        "LOCALHOST:8081",  # not the name the check trusts: refused, not guessed
        "localhost.:8081",
        "127.1:8081",
        " 127.0.0.1:8081",
        "127.0.0.1 :8081",
        "127.0.0.1.nip.io:8081",
        "localhost.example.com:8081",
    ],
)
def test_no_keys_on_anything_not_plainly_loopback_refuses_to_start(bind: str) -> None:
    with pytest.raises(ConfigError):
        load_settings(environ={}, bind=bind)
    with pytest.raises(ConfigError):
        load_settings(environ={"INGESTOR_BIND": bind})


def test_an_empty_key_list_in_the_file_is_no_keys(tmp_path: Path) -> None:
    path = tmp_path / "ingestor.toml"
    path.write_text('bind = "0.0.0.0:8081"\napi_keys = []\n')
    with pytest.raises(ConfigError, match="api_keys: none configured"):
        load_settings(path, {})


@pytest.mark.parametrize("value", ["", "[]", "x"])
def test_keys_cannot_come_from_the_environment(value: str) -> None:
    with pytest.raises(ConfigError, match="INGESTOR_API_KEYS"):
        load_settings(environ={"INGESTOR_API_KEYS": value})


def test_a_key_pasted_instead_of_its_hash_is_not_repeated_in_the_error(tmp_path: Path) -> None:
    raw = "sk_live_R2d2C3poLukeLeiaHanChewie0123456789abcdef"
    path = tmp_path / "ingestor.toml"
    for entry in (
        f'sha256 = "{raw}"\nrole = "admin"\ntenants = ["*"]',
        f'sha256 = "{raw}"\nrole = "root"\ntenants = ["*"]',
        f'sha256 = "{raw}"\nrole = "read"\ntenants = []',
        f'sha256 = "{raw}"\nrole = "read"\ntenants = ["t1"]\nkey = "{raw}"',
    ):
        path.write_text(f'bind = "0.0.0.0:8081"\n[[api_keys]]\n{entry}\n')
        with pytest.raises(ConfigError) as caught:
            load_settings(path, {})
        assert raw not in str(caught.value), str(caught.value)


def run_keys_new(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["keys", "new", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "tenants",
    [['t"1', "a\\b"], ["a b", "\u2028x"], ["caf\u00e9", "\u65e5\u672c"], ["]", "[[api_keys]]"]],
)
def test_keys_new_tables_round_trip_any_tenant_name(
    tenants: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_keys_new(["--role", "read", *[f"--tenant={t}" for t in tenants]], capsys)
    assert code == 0, err
    key = out.split("\n\n")[1].strip()
    text = out[out.index("[[api_keys]]") :]
    assert key not in text
    [entry] = tomllib.loads(text)["api_keys"]
    assert entry["tenants"] == tenants
    settings = load_settings(environ={}, api_keys=[entry])
    assert Keyring(settings.api_keys).authenticate(f"Bearer {key}").tenants == frozenset(tenants)


def test_keys_new_takes_a_tenant_outside_the_basic_multilingual_plane(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Was: `billing-ingestor keys new --role ingest --tenant 😀` exited 2 with
    "Escaped character is not a Unicode scalar value".

    The tenant is valid everywhere else (pulses take it, and a config file
    that lists it is accepted), but auth.new_key writes tenants with
    json.dumps, whose ASCII escapes of such characters are UTF-16 surrogate
    pairs (\\ud83d\\ude00), which TOML forbids. Fix: write the TOML string
    with json.dumps(tenant, ensure_ascii=False) (escaping only what TOML
    needs), or escape non-BMP characters as \\UXXXXXXXX.
    """
    tenant = "shop-\U0001f600"
    settings = load_settings(environ={}, api_keys=[table("k", "ingest", tenant)])
    assert settings.api_keys[0].tenants == (tenant,)  # the server takes it from a file
    code, out, err = run_keys_new(["--role", "ingest", "--tenant", tenant], capsys)
    assert code == 0, err
    [entry] = tomllib.loads(out[out.index("[[api_keys]]") :])["api_keys"]
    assert entry["tenants"] == [tenant]


# -- open mode ----------------------------------------------------------------------------------


async def test_open_mode_answers_only_a_loopback_host_so_no_web_page_can_rebind_to_it(
    client: Client,
) -> None:
    """Was: with no keys (open mode, loopback only) every request acted as an admin
    of every tenant, whatever its Host header says.

    Loopback is taken to mean "only this machine", but DNS rebinding lets any
    web page that a browser on this machine opens talk to 127.0.0.1 as its own
    origin: it reads every tenant's /aggregates, /pulses and /batches and can
    POST usage for any tenant. Such requests carry the attacker's host name in
    Host. Fix: in open mode answer only requests whose Host is a loopback
    name or address (localhost, 127.0.0.0/8, [::1], with any port), e.g. 421
    or 403 otherwise, before authenticating.
    """
    assert (await client.post("/pulses", json=pulse())).status_code == 202
    for host in ("127.0.0.1:8081", "localhost:8081", "[::1]:8081", "localhost"):
        response = await client.get("/aggregates", headers={"Host": host})
        assert response.status_code == 200, host
    for host in ("rebind.attacker.example", "rebind.attacker.example:8081", "10.0.0.7:8081"):
        response = await client.get("/aggregates", headers={"Host": host})
        assert response.status_code in (400, 403, 421), (host, await response.get_data())
        response = await client.post("/pulses", json=pulse(), headers={"Host": host})
        assert response.status_code in (400, 403, 421), host


async def test_open_mode_takes_no_request_a_page_of_another_site_sends(client: Client) -> None:
    """Was: a web page of any site, opened in a browser on the machine of an
    open server, committed a day by `fetch("http://127.0.0.1:8081/aggregates/
    commit?date=...", {method: "POST", mode: "no-cors"})`: a request without a
    body or a custom header is sent without a CORS preflight, names the
    loopback host it is sent to, and in open mode needs no key. The day's
    usage so far went downstream as an initial batch before the day ended.

    Browsers name the page's origin in `Origin` on every such POST (and on
    every cross-origin fetch), "null" for a sandboxed frame or a file. Fix:
    in open mode, a request with an Origin that is not a loopback one is
    403. A page served from this machine (a dashboard on localhost:3000)
    still may.
    """
    assert (await client.post("/pulses", json=pulse(used_amount="7"))).status_code == 202
    today = (await (await client.get("/aggregates")).get_json())["aggregates"][0]["date"]
    for origin in ("https://attacker.example", "http://10.0.0.7:8081", "null"):
        commit = await client.post(f"/aggregates/commit?date={today}", headers={"Origin": origin})
        assert commit.status_code == 403, (origin, await commit.get_data())
        error = (await commit.get_json())["error"]
        assert "Origin" in error["message"], error
        posted = await client.post(
            "/pulses", json=pulse(used_amount="1"), headers={"Origin": origin}
        )
        assert posted.status_code == 403, origin
        read = await client.get("/aggregates", headers={"Origin": origin})
        assert read.status_code == 403, origin
    [bucket] = (await (await client.get("/aggregates")).get_json())["aggregates"]
    assert (bucket["used_amount"], bucket["committed_amount"]) == ("7", "0"), bucket
    for origin in ("http://localhost:3000", "http://127.0.0.1:8081", "http://[::1]"):
        posted = await client.post(
            "/pulses", json=pulse(used_amount="1"), headers={"Origin": origin}
        )
        assert posted.status_code == 202, origin
    [bucket] = (await (await client.get("/aggregates")).get_json())["aggregates"]
    assert bucket["used_amount"] == "10", bucket


# -- what /metrics and answers show -------------------------------------------------------------


@ONE_PARTITION
async def test_metrics_show_no_tenant_key_or_batch_id(client: Client) -> None:
    tenant = "tenant-name-zq81"
    await send(client, [pulse(tenant_id=tenant), pulse(tenant_id="t1")], ADMIN)
    [batch] = await commit(client)
    for key in (UNKNOWN, "k" * 300, ADMIN[:-1]):
        await client.get("/aggregates", headers=bearer(key))
        await client.post("/pulses", json=pulse(tenant_id=tenant), headers=bearer(key))
    await client.get(f"/batches/{batch['batch_id']}", headers=bearer(ADMIN))
    await client.get(f"/batches/{batch['batch_id']}", headers=bearer(READ_T9))
    text = await (await client.get("/metrics")).get_data(as_text=True)
    for secret in (tenant, UNKNOWN, ADMIN, batch["batch_id"], sha(ADMIN)[:12], "Bearer"):
        assert secret not in text, secret
    # Refused requests are counted (a burst of 401s is visible), by route rule.
    refused = [
        line
        for line in text.splitlines()
        if line.startswith("ingestor_http_requests_total{")
        and 'code="401"' in line
        and 'route="/aggregates"' in line
    ]
    assert refused
    assert float(refused[0].rsplit(" ", 1)[1]) == 3


# -- on the wire: a real server -----------------------------------------------------------------


def server_config(*extra: str) -> str:
    lines = ['durability = "os"', 'commit_interval = "1d"', *extra]
    for entry in KEYS:
        tenants = ", ".join(json.dumps(t) for t in entry["tenants"])
        lines += [
            "[[api_keys]]",
            f'sha256 = "{entry["sha256"]}"',
            f'role = "{entry["role"]}"',
            f"tenants = [{tenants}]",
        ]
    return "\n".join(lines) + "\n"


async def raw_http(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes, bytes]:
    """Send one request as given (Connection: close is added) and read the whole answer."""
    request = head.rstrip(b"\r\n") + b"\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    if body:
        request += b"Content-Length: %d\r\n" % len(body)
    request += b"\r\n" + body
    with trio.fail_after(15):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    answer_head, _, answer_body = data.partition(b"\r\n\r\n")
    return int(answer_head.split(b" ", 2)[1]), answer_head, answer_body


PULSE_T1 = json.dumps(pulse()).encode()
JSON_CT = b"Content-Type: application/json\r\n"


async def test_on_the_wire_headers_are_strict_and_keys_never_leak(tmp_path: Path) -> None:
    async with ServerProcess(tmp_path / "data", config=server_config()) as server:
        port = server.port
        accepted = [
            (
                b"POST /pulses HTTP/1.1\r\n"
                + JSON_CT
                + b"authorization: Bearer %s" % INGEST_T1.encode(),
                PULSE_T1,
            ),
            (b"GET /aggregates HTTP/1.1\r\nAUTHORIZATION: bearer %s" % READ_T1.encode(), b""),
        ]
        for head, body in accepted:
            status, _, _ = await raw_http(port, head, body)
            assert status in (200, 202), head
        refused = [
            # Two headers, in any spelling: one route would read the first, another the last.
            b"Authorization: Bearer %s\r\nauthorization: Bearer %s"
            % (READ_T1.encode(), ADMIN.encode()),
            b"Authorization: Bearer %s\r\nAuthorization: Bearer %s"
            % (UNKNOWN.encode(), ADMIN.encode()),
            b"Authorization: Bearer %s\r\nAuthorization:" % ADMIN.encode(),
            # Bytes that are no ASCII token: UTF-8, Latin-1, an obs-text byte.
            b"Authorization: Bearer " + (ADMIN + "\u00e9").encode(),
            b"Authorization: Bearer " + ADMIN.encode() + b"\xe9",
            b"Authorization: Bearer \xff\xfe" + ADMIN.encode(),
            b"Authorization: Bearer " + "cl\u00e9-\u65e5\u672c".encode(),
            b"Authorization: Bearer",
            b"Authorization: Bearer    ",
            b"Authorization: Basic " + ADMIN.encode(),
            b"Authorization: Bearer %s" % UNKNOWN.encode(),
        ]
        for auth in refused:
            for head, body in [
                (b"POST /pulses HTTP/1.1\r\n" + JSON_CT + auth, PULSE_T1),
                (b"GET /aggregates HTTP/1.1\r\n" + auth, b""),
                (
                    b"POST /aggregates/commit?date=" + YESTERDAY.encode() + b" HTTP/1.1\r\n" + auth,
                    b"",
                ),
                (b"GET /batches HTTP/1.1\r\n" + auth, b""),
            ]:
                status, answer_head, answer_body = await raw_http(port, head, body)
                assert status in (400, 401), (auth, head, status, answer_body)
                for key in (ADMIN, READ_T1, UNKNOWN):
                    assert key.encode() not in answer_head + answer_body
        # Header bytes the HTTP parser refuses (a control byte) are a 400, not a 500.
        status, _, _ = await raw_http(
            port, b"GET /aggregates HTTP/1.1\r\nAuthorization: Bearer " + ADMIN.encode() + b"\x01"
        )
        assert status in (400, 401)
        # Only the one good pulse was stored, for t1.
        status, _, body = await raw_http(
            port, b"GET /aggregates HTTP/1.1\r\nAuthorization: Bearer " + ADMIN.encode()
        )
        rows = json.loads(body)["aggregates"]
        assert [(r["tenant_id"], r["pulse_count"]) for r in rows] == [("t1", 1)]
        await server.terminate()
    output = server.output
    assert "Traceback" not in output
    for key in (ADMIN, INGEST_T1, READ_T1, UNKNOWN):
        assert key not in output, key


async def test_an_absolute_form_request_target_is_routed_by_its_path(tmp_path: Path) -> None:
    """Was: `POST http://host/pulses HTTP/1.1` (absolute-form, which RFC 9112
    §3.2.2 says a server MUST accept) with a valid ingest key is answered
    500 "internal error", and the log shows AssertionError("POST /pulses is
    answered by hotpath.PulseRoute").

    The key is checked first (no bypass), but the request never reaches the
    ingest path: edge.Edge routes POST /pulses to hotpath.PulseRoute by
    `scope["path"]`, which hypercorn leaves as "http://host/pulses" for an
    absolute-form target, while Quart takes the path out of that URL and
    routes to api.post_pulses, which only raises. The same target also makes
    the edge count /metrics and /readyz as in-flight requests. Fix: in
    Edge.__call__, route on the URL's path (urlsplit(path).path when the path
    does not start with "/"), or make api.post_pulses answer by calling
    `ingest` with g.principal instead of raising.
    """
    async with ServerProcess(tmp_path / "data", config=server_config()) as server:
        port = server.port
        target = b"http://127.0.0.1:%d/pulses" % port
        # The key is still required on that path.
        status, _, _ = await raw_http(
            port, b"POST " + target + b" HTTP/1.1\r\n" + JSON_CT, PULSE_T1
        )
        assert status == 401
        status, _, _ = await raw_http(
            port,
            b"GET http://127.0.0.1:%d/aggregates HTTP/1.1\r\n" % port
            + b"Authorization: Bearer "
            + READ_T1.encode(),
        )
        assert status == 200
        auth = b"Authorization: Bearer " + INGEST_T1.encode()
        status, _, body = await raw_http(
            port, b"POST " + target + b" HTTP/1.1\r\n" + JSON_CT + auth, PULSE_T1
        )
        assert status == 202, body


async def test_open_mode_is_said_at_start(tmp_path: Path) -> None:
    """Was: a server started without keys ran open (every request is an admin
    of every tenant), and nothing in its output says so.

    README allows it on a loopback bind, but a loopback server is often
    published by a reverse proxy on the same machine, and then anyone can
    read and write all usage. The start line (service._serve: bind,
    store_id, partitions, durability, sink) does not name the mode, and no
    warning is logged. Fix: log a WARNING at start when Keyring.open
    ("no api_keys configured: open mode, every request acts as admin"), and
    add the number of keys to the start line.
    """
    async with ServerProcess(tmp_path / "data", config='durability = "os"\n') as server:
        response = await raw_http(server.port, b"POST /aggregates/commit?date=2026-01-01 HTTP/1.1")
        assert response[0] == 200  # open: no key needed, even to commit
        await server.terminate()
    output = server.output
    assert re.search(
        r"(?i)open mode|no api[_ ]keys|without (api )?keys|unauthenticated|api_keys=0|keys=0",
        output,
    ), output


async def test_without_a_key_no_body_is_waited_for(tmp_path: Path) -> None:
    """A client without a key cannot hold a connection (and a slot of
    max_in_flight) by announcing a body and sending it slowly: it is refused
    before the body is read, long before body_timeout."""
    config = server_config('body_timeout = "60s"')
    async with ServerProcess(tmp_path / "data", config=config) as server:
        for target in (b"/pulses", b"/aggregates/commit"):
            head = (
                b"POST "
                + target
                + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                + JSON_CT
                + b"Content-Length: 1000000\r\n\r\n{"
            )
            with trio.fail_after(10):
                stream = await trio.open_tcp_stream("127.0.0.1", server.port)
                async with stream:
                    await stream.send_all(head)
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = await stream.receive_some(65536)
                        assert chunk, data
                        data += chunk
            assert data.startswith(b"HTTP/1.1 401"), data
