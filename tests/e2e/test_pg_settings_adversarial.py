"""PostgreSQL configured by somebody else: the DBA's, the platform's settings.

In production the server, database and role settings are not ours: a DBA, a
managed service or a cloud provider sets them with `ALTER DATABASE ... SET`
and `ALTER ROLE ... SET`, grants the app role what they think it needs, and
changes all of that while instances run. Each test here does that to a
database of its own (`fresh_database`, or one made with another encoding and
dropped by the test) under real `python -m ingestor serve` processes, and
checks what a user of a money system requires: every guarantee of DESIGN.md
§3 still holds, or the instance refuses at start with one clear line and a
non-zero exit. Never a wrong number or name, a lost or doubled pulse, a hang,
or 5xx on a healthy database.

    styles       DateStyle, TimeZone, IntervalStyle, bytea_output,
                 standard_conforming_strings, extra_float_digits, array_nulls,
                 JIT for every statement, a tiny work_mem, generic plans (holds)
    hostile      the role's idle_session_timeout 1 s, short statement, lock
                 and idle-in-transaction timeouts, synchronous_commit off,
                 SERIALIZABLE DEFERRABLE by default, two instances (holds; the
                 store's own write transactions observed by a trigger)
    encodings    a client_encoding (or a database encoding) that cannot hold
                 every tenant name, SQL_ASCII at start, SQL_ASCII set by the
                 DBA under a running instance (the process died, the start
                 was refused for a false reason, batches named base64
                 tenants: sessions now speak UTF-8, and a database that
                 does not keep UTF-8 is refused)
    search_path  an empty one (refused clearly); the "secure schema usage
                 pattern" of PostgreSQL's manual applied to the app's role,
                 then a restart (a new, empty store took every id again: now
                 refused, naming the schema the store is in)
    privileges   an app role with no CREATE on public (refused clearly), an
                 app role with DML only on a store its owner made, three such
                 instances at once, and the same on a store of an earlier
                 release lacking an index; a database read-only by default
                 (it was ready while it answered every write 503: now not
                 ready until a session may write)

Roles made here are dropped at the end of their test, after its database.
"""

from __future__ import annotations

import contextlib
import json
import random
import secrets
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
import trio

from tests.e2e.cluster_support import ADMIN_URL, Cluster, fresh_database, require_postgres
from tests.e2e.conftest import ABORTED_UPLOADS
from tests.support.server import (
    BucketKey,
    Ledger,
    ServerError,
    ServerProcess,
    Total,
    check_pulses_stored_once,
    collect_pages,
    day_before,
    outbox_problems,
    post_until_stored,
    random_pulse,
    send_pulses,
    totals_of,
    wait_until,
)

pytestmark = [pytest.mark.e2e, *ABORTED_UPLOADS]

QUIET = {
    "INGESTOR_COMMIT_INTERVAL": "3600",
    "INGESTOR_COMMIT_GRACE": "30d",
    "INGESTOR_STORE_BUSY_TIMEOUT": "2",
    "INGESTOR_RETRY_INITIAL": "0.1",
    "INGESTOR_RETRY_MAX": "0.5",
}
# Names a billing system must get back byte for byte: Latin-1, CJK, astral
# emoji, SQL and array-literal punctuation, and the word NULL.
TENANTS = ("acme", "café-müller", "租户-7", 'O\'Brien \\ "q" {a,b}', "NULL", "emoji-🧾")
DELIVERY_STATE = {"status", "attempts", "last_error", "next_attempt_at", "delivered_at"}
APPLICATION = "billing-ingestor"


# -- the database side ------------------------------------------------------------------


def execute(url: str, *statements: str) -> list[tuple[Any, ...]]:
    """Run `statements` on a connection of their own (autocommit); the last one's rows."""
    rows: list[tuple[Any, ...]] = []
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        for statement in statements:
            cursor = conn.execute(statement.encode())
            rows = cursor.fetchall() if cursor.description else []
    return rows


def dbname(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def as_role(url: str, role: str) -> str:
    """`url` with `role` as its user (trust authentication: no password)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}@{host}"))


@contextlib.contextmanager
def app_role() -> Iterator[str]:
    """A LOGIN role of the test's own, dropped afterwards (open it before the
    database it is used in, so the database is dropped first)."""
    name = f"ingestor_app_{secrets.token_hex(5)}"
    execute(ADMIN_URL, f"CREATE ROLE {name} LOGIN")
    try:
        yield name
    finally:
        execute(ADMIN_URL, f"DROP ROLE IF EXISTS {name}")


@contextlib.contextmanager
def encoded_database(encoding: str) -> Iterator[str]:
    """A new database whose server encoding is `encoding`; dropped afterwards."""
    name = f"ingestor_enc_{secrets.token_hex(6)}"
    execute(
        ADMIN_URL,
        f"CREATE DATABASE {name} ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C'"
        " TEMPLATE template0",
    )
    try:
        yield urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{name}"))
    finally:
        execute(ADMIN_URL, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def end_sessions(url: str) -> int:
    """End every session the instances hold on `url`'s database, as a failover
    or a restart of the database does: their pools open new ones, with the
    database's settings of now."""
    rows = execute(
        ADMIN_URL,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        f" WHERE datname = '{dbname(url)}' AND application_name = '{APPLICATION}'",
    )
    return int(rows[0][0])


# -- the service side -------------------------------------------------------------------


def instance(root: Path, url: str, name: str = "node") -> ServerProcess:
    return ServerProcess(root / name, env={**QUIET, "INGESTOR_STORE": url})


async def start_or_refusal(server: ServerProcess) -> str | None:
    """Start `server`: None once it is ready, or what it wrote if it exited first."""
    try:
        await server.start()
    except ServerError:
        return server.output_of_run()
    return None


def refusal_problems(server: ServerProcess, output: str, *, naming: Sequence[str]) -> list[str]:
    """What is wrong with a refusal to start: it must be an exit (not a hang, not
    killed by us), non-zero, with one line, no traceback, saying which of
    `naming` is the matter."""
    lines = [line for line in output.splitlines() if line.strip()]
    code = server.exit_codes[-1] if server.exit_codes else None
    problems = []
    if code in (None, 0, -9):
        problems.append(f"the refusal was no clean non-zero exit (exit code {code})")
    if "Traceback" in output or len(lines) != 1:
        problems.append(f"the refusal is not one line: {output[-1500:]!r}")
    if not any(word.lower() in output.lower() for word in naming):
        problems.append(f"the refusal does not name {' or '.join(naming)}: {output.strip()!r}")
    return problems


async def aggregates(http: httpx.AsyncClient, server: ServerProcess) -> list[dict[str, Any]]:
    return await collect_pages(http, f"{server.url}/aggregates", "aggregates", limit=1000)


async def batch_views(http: httpx.AsyncClient, server: ServerProcess) -> list[dict[str, Any]]:
    """Every batch as GET /batches/{id} shows it (with its records)."""
    listed = await collect_pages(http, f"{server.url}/batches", "batches", limit=1000)
    views = []
    for row in listed:
        response = await http.get(f"{server.url}/batches/{row['batch_id']}")
        assert response.status_code == 200, f"GET /batches/{row['batch_id']}: {response.text}"
        views.append(response.json())
    return views


async def all_delivered(http: httpx.AsyncClient, server: ServerProcess) -> list[dict[str, Any]]:
    """Wait until every batch of the outbox is delivered; their rows."""

    async def done() -> list[dict[str, Any]]:
        rows = await collect_pages(http, f"{server.url}/batches", "batches", limit=1000)
        return rows if rows and all(row["status"] == "delivered" for row in rows) else []

    return await wait_until(done, within=40, interval=0.2, what="every batch delivered")


def delivered_files(servers: Sequence[ServerProcess]) -> dict[str, list[dict[str, Any]]]:
    """What the billing system holds: the file sink's batches of every instance, by id."""
    found: dict[str, list[dict[str, Any]]] = {}
    for server in servers:
        for path in sorted(server.deliveries.rglob("*.json")):
            body = json.loads(path.read_text(encoding="utf-8"))
            found.setdefault(body["batch_id"], []).append(body)
    return found


async def commit(http: httpx.AsyncClient, server: ServerProcess, day: str) -> list[dict[str, Any]]:
    response = await http.post(f"{server.url}/aggregates/commit", json={"date": day})
    assert response.status_code == 200, f"commit {day}: {response.status_code} {response.text}"
    batches: list[dict[str, Any]] = response.json()["batches"]
    return batches


def pulse(tenant: str, pulse_id: str, day: str, amount: str, sku: str = "sku1") -> dict[str, Any]:
    return {
        "tenant_id": tenant,
        "product_sku": sku,
        "use_unit": "api_call",
        "used_amount": amount,
        "timestamp": f"{day}T12:34:56.789012+00:00",
        "id": pulse_id,
    }


def total_problems(
    held: Mapping[BucketKey, Total], expected: Mapping[BucketKey, Total]
) -> list[str]:
    return [
        f"bucket {key}: GET /aggregates holds {held.get(key)}, the acknowledgements say"
        f" {expected.get(key)}"
        for key in sorted(held.keys() | expected.keys())
        if held.get(key) != expected.get(key)
    ]


async def settled_problems(
    http: httpx.AsyncClient, servers: Sequence[ServerProcess], ledger: Ledger
) -> list[str]:
    """Everything a billing system needs to be so once all is committed and
    delivered, against what the clients were told (`ledger`)."""
    server = servers[0]
    problems = list(ledger.problems())
    problems += [f"unresolved: {a.payload!r}" for a in ledger.unresolved()]
    expected = ledger.expected_totals()
    rows = await aggregates(http, server)
    problems += total_problems(totals_of(rows), expected)
    problems += [
        f"bucket {row} is not wholly committed"
        for row in rows
        if (row["committed_amount"], row["committed_count"])
        != (row["used_amount"], row["pulse_count"])
    ]
    views = await batch_views(http, server)
    problems += [f"outbox: {p}" for p in outbox_problems(views, expected)]
    files = delivered_files(servers)
    problems += [
        f"delivered: {p}" for p in outbox_problems([b[0] for b in files.values()], expected)
    ]
    for view in views:
        held = files.get(view["batch_id"], [])
        shown = {k: v for k, v in view.items() if k not in DELIVERY_STATE}
        if not held or any(body != shown for body in held):
            problems.append(f"batch {view['batch_id']}: delivered as {held}, shown as {shown}")
    problems += [
        f"a delivered batch {bid} that the outbox does not hold"
        for bid in files.keys() - {v["batch_id"] for v in views}
    ]
    return problems


async def billing_day_flow(
    http: httpx.AsyncClient,
    servers: Sequence[ServerProcess],
    ledger: Ledger,
    seed: int,
    *,
    lull: float = 0.0,
) -> None:
    """Pulses of two days over `servers` (edge amounts, replays, a conflicting
    reuse of an id), both days committed, a late pulse and its correction, every
    batch delivered; then every promise checked against `ledger`. `lull`: a
    pause between the steps, in which the instances are idle."""
    rng = random.Random(seed)
    days = [day_before(2), day_before(1)]
    payloads = [random_pulse(rng, f"p{n}", days[n % 2], TENANTS) for n in range(120)]
    payloads += [
        pulse(TENANTS[1], "huge", days[0], "123456789012345678.123456789", sku="sku-ß"),
        pulse(TENANTS[2], "tiny", days[0], "0.000000001", sku="sku-ß"),
    ]
    for n, chunk in enumerate(payloads[i : i + 20] for i in range(0, len(payloads), 20)):
        await post_until_stored(http, servers[n % len(servers)].url, ledger, chunk)
    # Replays of stored pulses, and one id reused for another amount.
    await trio.sleep(lull)
    replays = rng.sample(payloads, 15)
    await post_until_stored(http, servers[-1].url, ledger, replays)
    reused = {**payloads[0], "used_amount": "7.5"}
    await send_pulses(http, servers[0].url, ledger, [reused], "single")
    await trio.sleep(lull)
    for day in days:
        await commit(http, servers[0], day)
    await trio.sleep(lull)
    late = [pulse(tenant, f"late-{n}", days[0], "0.25") for n, tenant in enumerate(TENANTS)]
    await post_until_stored(http, servers[-1].url, ledger, late)
    corrections = await commit(http, servers[-1], days[0])
    assert corrections, "a late pulse of a committed day made no correction batch"
    await all_delivered(http, servers[0])
    problems = await settled_problems(http, servers, ledger)
    answers = ledger.answers()
    assert answers["duplicate"] >= len(replays), f"replays not reported duplicate: {answers}"
    assert answers["conflict"] == 1, f"the reused id was not a conflict: {answers}"
    assert not problems, "\n".join(problems)
    await check_pulses_stored_once(http, servers[0], ledger)


# -- 1. session styles and the planner (holds) -------------------------------------------

STYLES = {
    "german-kiritimati-escaped-bytea": [
        "DateStyle = 'German'",
        "TimeZone = 'Pacific/Kiritimati'",
        "IntervalStyle = 'sql_standard'",
        "bytea_output = 'escape'",
        "standard_conforming_strings = off",
        "extra_float_digits = 3",
        "array_nulls = off",
    ],
    "us-st-johns-jit-tiny-memory": [
        "DateStyle = 'Postgres, MDY'",
        "TimeZone = 'America/St_Johns'",
        "IntervalStyle = 'iso_8601'",
        "jit = on",
        "jit_above_cost = 0",
        "work_mem = '64kB'",
        "plan_cache_mode = 'force_generic_plan'",
        "extra_float_digits = -15",
    ],
}


@pytest.mark.parametrize("settings", list(STYLES.values()), ids=list(STYLES))
async def test_the_dbas_session_styles_change_no_number_no_name_and_no_day(
    tmp_path: Path, settings: list[str]
) -> None:
    """Dates come back as 01.05.2024 or 05-01-2024, bytea as octal escapes,
    backslashes in literals are escapes, every statement is JIT-compiled and
    sorts spill to disk: the service must bill exactly as on the defaults."""
    admin = require_postgres()
    with fresh_database(admin) as url:
        execute(admin, *(f"ALTER DATABASE {dbname(url)} SET {s}" for s in settings))
        async with httpx.AsyncClient(timeout=30) as http, instance(tmp_path, url) as server:
            await billing_day_flow(http, [server], Ledger(), seed=len(settings))


# -- 2. hostile session defaults on the app's role (holds) -------------------------------

HOSTILE = [
    "idle_session_timeout = '1s'",
    "statement_timeout = '200ms'",
    "lock_timeout = '100ms'",
    "idle_in_transaction_session_timeout = '200ms'",
    "synchronous_commit = off",
    "default_transaction_isolation = 'serializable'",
    "default_transaction_deferrable = on",
]
OBSERVE = [
    "CREATE TABLE observed (sync text, isolation text)",
    "CREATE FUNCTION observe() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
    " INSERT INTO observed VALUES (current_setting('synchronous_commit'),"
    " current_setting('transaction_isolation')); RETURN NULL; END $$",
    "CREATE TRIGGER observe AFTER INSERT ON pulses FOR EACH STATEMENT EXECUTE FUNCTION observe()",
]


async def test_hostile_session_defaults_of_the_apps_role_keep_every_promise(
    tmp_path: Path,
) -> None:
    """The role's defaults: idle sessions ended after 1 s (so the pools hold dead
    sessions after every lull), short statement, lock and idle-in-transaction
    timeouts, synchronous_commit off, SERIALIZABLE DEFERRABLE. Two instances
    share the store. Every pulse is counted once, every day billed once, no
    request of the healthy database answered 5xx; and the store's own write
    transactions, seen from inside by a trigger, flush their commit (a 2xx is
    durable) and run READ COMMITTED."""
    admin = require_postgres()
    with app_role() as role, fresh_database(admin) as url:
        db = dbname(url)
        execute(
            admin,
            f"ALTER DATABASE {db} OWNER TO {role}",
            *(f"ALTER ROLE {role} IN DATABASE {db} SET {s}" for s in HOSTILE),
        )
        env = {**QUIET, "INGESTOR_STORE": as_role(url, role)}
        async with httpx.AsyncClient(timeout=30) as http, Cluster(tmp_path, 2, env) as cluster:
            execute(url, *OBSERVE, f"GRANT INSERT ON observed TO {role}")
            ledger = Ledger()
            await billing_day_flow(http, list(cluster), ledger, seed=7, lull=1.6)
            errors = [
                (a.status_code, a.error) for a in ledger.attempts if (a.status_code or 0) >= 500
            ]
            assert errors == [], f"5xx answers on a healthy database: {errors[:5]}"
            observed = {tuple(row) for row in execute(url, "SELECT * FROM observed")}
            assert observed == {("on", "read committed")}, (
                "the store's write transactions ran with (synchronous_commit, isolation)"
                f" {observed}"
            )


# -- 3. encodings (DEFECTS) --------------------------------------------------------------


@contextlib.contextmanager
def latin1_database(admin: str, where: str) -> Iterator[str]:
    if where == "client_encoding":
        with fresh_database(admin) as url:
            execute(admin, f"ALTER DATABASE {dbname(url)} SET client_encoding = 'LATIN1'")
            yield url
    else:
        with encoded_database("LATIN1") as url:
            yield url


@pytest.mark.parametrize("where", ["client_encoding", "server_encoding"])
async def test_a_tenant_name_latin1_cannot_hold_is_answered_and_kills_no_instance(
    tmp_path: Path, where: str
) -> None:
    """The database's client_encoding is LATIN1 (set by the DBA for a legacy
    client), or the database itself is LATIN1. A tenant named in CJK is no
    reason to die: the service must store it exactly, or reject that pulse
    with a reason, or refuse to start naming the encoding. It must not drop
    the connection of every request in flight and exit."""
    require_postgres()
    with latin1_database(ADMIN_URL, where) as url:
        server = instance(tmp_path, url)
        try:
            refused = await start_or_refusal(server)
            if refused is not None:
                problems = refusal_problems(server, refused, naming=["encoding"])
                assert not problems, "\n".join(problems)
                return
            day = day_before(1)
            ledger = Ledger()
            requests = [
                [pulse("café-müller", "a1", day, "1.5")],
                [pulse("租户-7", "c1", day, "2.25"), pulse("acme", "a2", day, "3")],
                [pulse("acme", "a3", day, "4")],
            ]
            problems = []
            async with httpx.AsyncClient(timeout=30) as http:
                for payloads in requests:
                    sent = await send_pulses(http, server.url, ledger, payloads)
                    if sent.response is None:
                        problems.append(
                            f"tenants {[p['tenant_id'] for p in payloads]}: no answer"
                            f" ({sent.error})"
                        )
                for attempt in ledger.attempts:
                    tenant = attempt.identity[0] if attempt.identity else "?"
                    if tenant != "租户-7" and attempt.answer != "accepted":
                        problems.append(f"{tenant!r}: answered {attempt.answer} {attempt.error}")
                    elif tenant == "租户-7" and not (
                        (attempt.status_code == 202 and attempt.answer in ("accepted", "rejected"))
                        or 400 <= (attempt.status_code or 0) < 500
                    ):
                        problems.append(
                            f"{tenant!r}: answered {attempt.status_code} {attempt.answer}"
                            f" {attempt.error}, neither stored nor rejected with a reason"
                        )
                await trio.sleep(1.0)
                if not server.running:
                    problems.append(f"the instance exited:\n{server.tail(8)}")
                else:
                    ready = await http.get(f"{server.url}/readyz")
                    if ready.status_code != 200:
                        problems.append(f"/readyz {ready.status_code} {ready.text}")
                    held = totals_of(await aggregates(http, server))
                    problems += total_problems(held, ledger.expected_totals())
            assert not problems, "\n".join(problems)
        finally:
            await server.aclose()


@contextlib.contextmanager
def sql_ascii_database(admin: str, where: str) -> Iterator[str]:
    if where == "client_encoding":
        with fresh_database(admin) as url:
            execute(admin, f"ALTER DATABASE {dbname(url)} SET client_encoding = 'SQL_ASCII'")
            yield url
    else:
        with encoded_database("SQL_ASCII") as url:
            yield url


@pytest.mark.parametrize("where", ["client_encoding", "server_encoding"])
async def test_an_sql_ascii_database_is_served_exactly_or_refused_naming_the_encoding(
    tmp_path: Path, where: str
) -> None:
    """SQL_ASCII sessions (set by the DBA, or an SQL_ASCII database, as old
    clusters often are) hand text back undecoded. The service must bill
    exactly on it, or refuse at start with a line that names the encoding,
    not one that sends the operator looking for foreign tables in an empty
    database."""
    require_postgres()
    with sql_ascii_database(ADMIN_URL, where) as url:
        server = instance(tmp_path, url)
        try:
            refused = await start_or_refusal(server)
            if refused is not None:
                problems = refusal_problems(server, refused, naming=["encoding"])
                assert not problems, "\n".join(problems)
                return
            async with httpx.AsyncClient(timeout=30) as http:
                await billing_day_flow(http, [server], Ledger(), seed=3)
        finally:
            await server.aclose()


async def test_sql_ascii_set_under_a_running_instance_never_bills_a_wrong_tenant(
    tmp_path: Path,
) -> None:
    """The DBA sets client_encoding = SQL_ASCII on the database while an
    instance runs; a failover (here: its sessions ended) gives its pool new
    sessions with it. What clients and the billing system see must stay
    true: GET /aggregates names the tenants that were sent, a replay of an
    acknowledged pulse is a duplicate (not a 503 for ever while /readyz says
    ready), and once the DBA has undone it every batch names the right
    tenants and adds up to the acknowledged totals."""
    admin = require_postgres()
    with fresh_database(admin) as url:
        async with httpx.AsyncClient(timeout=30) as http, instance(tmp_path, url) as server:
            ledger = Ledger()
            day = day_before(1)
            first = [pulse(t, f"before-{n}", day, f"{n + 1}.5") for n, t in enumerate(TENANTS)]
            await post_until_stored(http, server.url, ledger, first)
            execute(admin, f"ALTER DATABASE {dbname(url)} SET client_encoding = 'SQL_ASCII'")
            assert end_sessions(url) > 0
            problems: list[str] = []
            statuses: list[int | str] = []
            for _ in range(10):
                sent = await send_pulses(http, server.url, ledger, first)
                statuses.append(sent.response.status_code if sent.response else str(sent.error))
                if statuses[-1] == 202:
                    break
                await trio.sleep(0.2)
            ready = await http.get(f"{server.url}/readyz")
            if ready.status_code == 200 and statuses[-1] != 202:
                problems.append(
                    f"while /readyz answered 200, a replay of acknowledged pulses was answered"
                    f" {statuses}"
                )
            during = [pulse(t, f"during-{n}", day, "0.5") for n, t in enumerate(TENANTS)]
            await send_pulses(http, server.url, ledger, during)
            shown = await http.get(f"{server.url}/aggregates")
            if shown.status_code == 200:
                names = {row["tenant_id"] for row in shown.json()["aggregates"]}
                if names - set(TENANTS):
                    problems.append(
                        f"GET /aggregates names tenants nobody sent: {sorted(names - set(TENANTS))}"
                    )
            made = await http.post(f"{server.url}/aggregates/commit", json={"date": day})
            # The DBA undoes it; the next failover brings the usual sessions back.
            execute(admin, f"ALTER DATABASE {dbname(url)} RESET client_encoding")
            end_sessions(url)
            await post_until_stored(http, server.url, ledger, first + during)
            await commit(http, server, day)
            try:
                await all_delivered(http, server)
            except AssertionError as exc:
                problems.append(str(exc))
            problems += await settled_problems(http, [server], ledger)
            assert not problems, f"(the commit meanwhile: {made.status_code})\n" + "\n".join(
                problems
            )


# -- 4. search_path (DEFECT) -------------------------------------------------------------


async def test_an_empty_search_path_is_refused_at_start_with_one_line(tmp_path: Path) -> None:
    """search_path = '' (a hardening some DBAs apply): on a fresh database and
    on one that holds a store, the instance starts and bills on the store, or
    refuses with one line naming the schema or search_path."""
    admin = require_postgres()
    with fresh_database(admin) as url, fresh_database(admin) as used:
        async with instance(tmp_path, used, "maker"):
            pass
        for name, database in (("fresh", url), ("used", used)):
            execute(admin, f"ALTER DATABASE {dbname(database)} SET search_path = ''")
            server = instance(tmp_path, database, name)
            try:
                refused = await start_or_refusal(server)
                if refused is None:
                    async with httpx.AsyncClient(timeout=30) as http:
                        await billing_day_flow(http, [server], Ledger(), seed=5)
                else:
                    problems = refusal_problems(server, refused, naming=["schema", "search_path"])
                    assert not problems, f"{name}: " + "\n".join(problems)
            finally:
                await server.aclose()


async def test_the_manuals_secure_schema_pattern_does_not_start_an_empty_store(
    tmp_path: Path,
) -> None:
    """PostgreSQL's manual (5.9.6, "secure schema usage pattern") tells a DBA to
    give each role a schema of its own, `CREATE SCHEMA alice AUTHORIZATION
    alice`, and to take public out of the search path, `ALTER ROLE ... SET
    search_path = "$user"`. Done to the app's role of a running deployment,
    then a restart: the store the instances used is still in public, in the
    same database. The instance must keep billing on it, or refuse to start
    with one line naming the schema: never make a new, empty store and count
    every pulse again, with new batch ids the billing system cannot
    recognise as repeats."""
    admin = require_postgres()
    with app_role() as role, fresh_database(admin) as url:
        db = dbname(url)
        execute(admin, f"ALTER DATABASE {db} OWNER TO {role}")
        server = instance(tmp_path, as_role(url, role))
        try:
            async with httpx.AsyncClient(timeout=30) as http:
                await server.start()
                ledger = Ledger()
                day = day_before(1)
                sent = [pulse(t, f"k{n}", day, f"{n}.125") for n, t in enumerate(TENANTS)]
                await post_until_stored(http, server.url, ledger, sent)
                await commit(http, server, day)
                await all_delivered(http, server)
                store = (await http.get(f"{server.url}/readyz")).json()["store_id"]
                # Step one alone: public is still on the path, nothing changes.
                execute(url, f"CREATE SCHEMA {role} AUTHORIZATION {role}")
                await server.restart()
                await post_until_stored(http, server.url, ledger, sent)
                assert ledger.problems() == [], ledger.problems()
                # Step two: public off the role's path.
                execute(admin, f'ALTER ROLE {role} IN DATABASE {db} SET search_path = "$user"')
                await server.terminate()
                refused = await start_or_refusal(server)
                if refused is not None:
                    problems = refusal_problems(server, refused, naming=["schema", "search_path"])
                    assert not problems, "\n".join(problems)
                    return
                problems = []
                now = (await http.get(f"{server.url}/readyz")).json()["store_id"]
                if now != store:
                    problems.append(
                        f"the restart opened another store ({store} -> {now}): the schema"
                        f" {role} the DBA made for the role, empty until then"
                    )
                await post_until_stored(http, server.url, ledger, sent)
                await commit(http, server, day)
                await all_delivered(http, server)
                problems += await settled_problems(http, [server], ledger)
                assert not problems, "\n".join(problems)
        finally:
            await server.aclose()


# -- 5. the app's privileges (holds) -----------------------------------------------------


async def test_an_app_role_without_create_on_public_is_refused_clearly_by_every_instance(
    tmp_path: Path,
) -> None:
    """PostgreSQL 15 and later grant no CREATE on public: three instances started
    at once by a role that may not create the store each exit with one line."""
    admin = require_postgres()
    with app_role() as role, fresh_database(admin) as url:
        servers = [instance(tmp_path, as_role(url, role), f"n{n}") for n in range(3)]
        outputs: dict[int, str | None] = {}

        async def start(index: int) -> None:
            outputs[index] = await start_or_refusal(servers[index])

        try:
            async with trio.open_nursery() as nursery:
                for index in range(3):
                    nursery.start_soon(start, index)
        finally:
            for server in servers:
                await server.aclose()
        problems = []
        for index, output in sorted(outputs.items()):
            if output is None:
                problems.append(f"instance {index} started without a store it could make")
            else:
                problems += [
                    f"instance {index}: {p}"
                    for p in refusal_problems(servers[index], output, naming=["permission"])
                ]
        assert not problems, "\n".join(problems)


async def test_an_app_role_with_dml_only_bills_from_three_instances_and_upgrades_or_says_why(
    tmp_path: Path,
) -> None:
    """The owner made the store (an instance of its own, once) and granted the
    app's role what an operator grants an app: USAGE on the schema, SELECT,
    INSERT, UPDATE and DELETE on its tables. Three instances of the app role
    start at once and bill exactly. Then the store is one of an earlier
    release (it lacks an index the owner alone may add): an instance starts,
    says so, and bills (a refusal took every instance down at an upgrade)."""
    admin = require_postgres()
    with app_role() as role, fresh_database(admin) as url:
        async with instance(tmp_path, url, "owner"):
            pass
        execute(
            url,
            f"GRANT USAGE ON SCHEMA public TO {role}",
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}",
        )
        env = {**QUIET, "INGESTOR_STORE": as_role(url, role)}
        async with httpx.AsyncClient(timeout=30) as http:
            async with Cluster(tmp_path, 3, env) as cluster:
                await billing_day_flow(http, list(cluster), Ledger(), seed=11)
            execute(url, "DROP INDEX batches_failed")
            server = instance(tmp_path, as_role(url, role), "upgraded")
            try:
                # Started: the index only speeds up a count, and is said to be missing.
                await server.start()
                assert "WARNING ingestor.store store index missing" in server.output_of_run()
                ledger = Ledger()
                day = day_before(1)
                await post_until_stored(http, server.url, ledger, [pulse("acme", "u1", day, "1")])
                assert await commit(http, server, day) != []
            finally:
                await server.aclose()


async def test_a_database_read_only_by_default_is_not_ready_until_writes_come_back(
    tmp_path: Path,
) -> None:
    """`default_transaction_read_only = on`, as a DBA freezes writes for a move,
    or meant for a reporting role and put on the app's. On a fresh database the
    instance refuses to start (it cannot make the store). On the store it made
    before, it must not write past the freeze, nor tell the load balancer it is
    ready while it answers every pulse 503: /readyz 503 naming the cause, at
    start and when set under a running instance, and 200 again, every write
    taken, once the DBA lifts it."""
    admin = require_postgres()
    with app_role() as role, fresh_database(admin) as url:
        db = dbname(url)
        app = as_role(url, role)
        execute(admin, f"ALTER DATABASE {db} OWNER TO {role}")
        ledger = Ledger()
        day = day_before(1)
        frozen = f"ALTER ROLE {role} IN DATABASE {db} SET default_transaction_read_only = on"
        thawed = f"ALTER ROLE {role} IN DATABASE {db} RESET default_transaction_read_only"
        async with httpx.AsyncClient(timeout=30) as http:

            async def not_ready() -> bool:
                ready = await http.get(f"{server.url}/readyz")
                return ready.status_code == 503 and "read-only" in ready.text

            async def ready() -> bool:
                return (await http.get(f"{server.url}/readyz")).status_code == 200

            async def refused() -> bool:
                sent = await send_pulses(
                    http, server.url, ledger, [pulse("acme", f"ro{len(ledger.attempts)}", day, "1")]
                )
                return sent.response is not None and sent.response.status_code == 503

            async with instance(tmp_path, app, "maker"):
                pass  # the store, made
            execute(admin, frozen)
            server = instance(tmp_path, app, "frozen")
            server.ready_timeout = 5
            try:
                with pytest.raises(ServerError, match=r"not ready.*503.*read-only"):
                    await server.start()  # served, but never ready
            finally:
                await server.aclose()
            execute(admin, thawed)

            server = instance(tmp_path, app)
            try:
                await server.start()
                await post_until_stored(
                    http, server.url, ledger, [pulse("acme", "before", day, "2")]
                )
                execute(admin, frozen)
                end_sessions(url)  # sessions keep the defaults they began with
                await wait_until(refused, within=15, interval=0.2, what="writes refused")
                await wait_until(not_ready, within=15, interval=0.2, what="/readyz 503")
                execute(admin, thawed)
                end_sessions(url)
                await wait_until(ready, within=15, interval=0.2, what="/readyz 200")
                await post_until_stored(
                    http, server.url, ledger, [pulse("acme", "after", day, "3")]
                )
                held = totals_of(await aggregates(http, server))
                assert not total_problems(held, ledger.expected_totals())
            finally:
                await server.aclose()
