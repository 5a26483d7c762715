"""kill -9 in the middle of the load: no acknowledged pulse lost, none counted twice.

Clients send id-bearing pulses in a loop (durability = fsync). The server is
SIGKILLed at a random moment while requests are in flight and restarted on
the same data dir, several times. Every request that got no answer is sent
again, with the same ids and payloads, until it is answered. Then the
answers alone (`Ledger`) must predict the server's state exactly.
"""

from __future__ import annotations

import datetime as dt
import random
from collections import deque
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import trio

from tests.e2e.conftest import ABORTED_UPLOADS, StartServer
from tests.support.server import (
    Form,
    Ledger,
    Payload,
    ServerProcess,
    check_bounds,
    check_pulses_stored_once,
    collect_pages,
    send_pulses,
    totals_of,
    wait_until,
)

pytestmark = [pytest.mark.e2e, *ABORTED_UPLOADS]

CLIENTS = 8
CYCLES = 5
TENANTS = ("acme", "globex", "initech", "umbrella", "hooli", "vandelay")


class Load:
    """What the clients and the killer share.

    `up` is replaced by a fresh, unset Event just before each kill and set
    once the restarted server is ready: a client whose request failed waits
    on it instead of spinning against a dead port.
    """

    def __init__(self, server: ServerProcess, ledger: Ledger) -> None:
        self.server = server
        self.ledger = ledger
        self.up = trio.Event()
        self.up.set()
        self.stopping = False
        self.in_flight = 0
        self.in_flight_at_kill: list[int] = []
        self.failures_while_up = 0


def new_request(client: int, n: int, rng: random.Random) -> tuple[list[Payload], Form]:
    """A single pulse or an array of up to 40, each with a fresh id and a random amount."""
    now = dt.datetime.now(dt.UTC)
    count = 1 if rng.random() < 0.3 else rng.randint(2, 40)
    payloads: list[Payload] = []
    for k in range(count):
        digits = rng.randint(0, 9)
        amount = Decimal(rng.randint(0, 10**11)).scaleb(-digits)
        payloads.append(
            {
                "tenant_id": rng.choice(TENANTS),
                "product_sku": rng.choice(("sku-basic", "sku-pro")),
                "use_unit": rng.choice(("api_call", "gb_hour")),
                "used_amount": amount if rng.random() < 0.5 else f"{amount:f}",
                "id": f"k{client}-{n}-{k}",
                "timestamp": (now - dt.timedelta(milliseconds=rng.randint(0, 5000)))
                .isoformat()
                .replace("+00:00", "Z"),
            }
        )
    return payloads, "single" if count == 1 else rng.choice(("array", "array", "ndjson"))


async def run_client(number: int, load: Load) -> None:
    """Send new requests until told to stop; resend each unanswered one until answered."""
    rng = random.Random(9000 + number)
    pending: deque[tuple[list[Payload], Form]] = deque()
    failures_in_a_row = 0
    async with httpx.AsyncClient(timeout=10.0) as http:
        for n in range(1_000_000):
            if not pending:
                if load.stopping:
                    return
                pending.append(new_request(number, n, rng))
            payloads, form = pending[0]
            up = load.up
            await up.wait()
            load.in_flight += 1
            try:
                sent = await send_pulses(http, load.server.url, load.ledger, payloads, form)
            finally:
                load.in_flight -= 1
            if sent.response is not None and sent.response.status_code not in (202, 503):
                raise AssertionError(
                    f"client {number}: {sent.response.status_code} {sent.response.text[:500]}"
                )
            if not any(a.needs_retry for a in sent.attempts):
                pending.popleft()
                failures_in_a_row = 0
                continue
            # No answer (or 503): the same request goes again once the server is up.
            failures_in_a_row += 1
            if load.up is up and up.is_set():
                load.failures_while_up += 1  # a stale pooled connection after a restart
                if failures_in_a_row > 50:
                    raise AssertionError(
                        f"client {number}: {failures_in_a_row} failures in a row while the"
                        f" server is up; last: {sent.error or sent.response}\n"
                        f"{load.server.tail()}"
                    )
                if sent.response is not None:  # 503: let the server breathe
                    await trio.sleep(0.05)


def accepted_count(ledger: Ledger) -> int:
    return sum(1 for a in ledger.attempts if a.answer == "accepted")


async def test_kill_9_under_load_loses_nothing_and_counts_once(
    start_server: StartServer, tmp_path: Path
) -> None:
    """8 clients, 5 SIGKILLs at random moments of the load, restarts on the same data dir.

    After each restart, before any retry, every acknowledged pulse is there. In
    the end every pulse is counted exactly once: totals equal what the answers
    predict, and GET /pulses lists each acknowledged id once and nothing else.
    """
    server = await start_server(tmp_path / "crashy", INGESTOR_DURABILITY="fsync")
    ledger = Ledger()
    load = Load(server, ledger)
    killer = random.Random()
    exit_codes: list[int] = []

    with trio.fail_after(55):
        async with trio.open_nursery() as nursery:
            for number in range(CLIENTS):
                nursery.start_soon(run_client, number, load)
            for cycle in range(CYCLES):
                floor = accepted_count(ledger) + 150

                async def flowing(floor: int = floor) -> bool:
                    return accepted_count(ledger) >= floor

                await wait_until(flowing, within=20, what=f"cycle {cycle}: load flowing")
                await trio.sleep(killer.uniform(0.02, 0.3))  # a random moment of the load
                load.up = trio.Event()
                load.in_flight_at_kill.append(load.in_flight)
                exit_codes.append(await server.kill())
                await server.start()
                await check_bounds(server, ledger)
                load.up.set()
            load.stopping = True

    assert exit_codes == [-9] * CYCLES
    assert sum(load.in_flight_at_kill) > 0, "no kill hit a request in flight"

    # Every request was answered in the end, and no answer contradicts another.
    assert ledger.unresolved() == []
    assert ledger.problems() == []
    assert set(ledger.answers()) <= {"accepted", "duplicate", "no answer", "rejected"}
    assert {a.status_code for a in ledger.attempts if a.answer == "rejected"} <= {503}

    unanswered = 0
    stored_before_kill = 0
    for identity, attempts in ledger.by_identity().items():
        answers = [a.answer for a in attempts]
        # Exactly one attempt settled the pulse: the last one, after only unanswered
        # ones (or 503s, which store nothing).
        assert answers[-1] in ("accepted", "duplicate"), (identity, answers)
        assert all(a.needs_retry for a in attempts[:-1]), (identity, answers)
        if answers[-1] == "duplicate":
            # A duplicate is only ever the retry of a pulse sent before and cut off
            # by a kill (a 503 stores nothing, so it cannot be what stored it).
            assert "no answer" in answers[:-1], (identity, answers)
            stored_before_kill += 1
        unanswered += any(a.answer == "no answer" for a in attempts)
    in_flight_lost = [
        a
        for a in ledger.attempts
        if a.answer == "no answer" and not (a.error or "").startswith("ConnectError")
    ]
    assert in_flight_lost, "no request was cut off by a kill: the test proved nothing"
    assert unanswered > 0

    # The server holds exactly what the answers say: totals, and each pulse once.
    async with httpx.AsyncClient(timeout=30.0) as http:
        rows = await collect_pages(http, f"{server.url}/aggregates", "aggregates", limit=500)
        assert totals_of(rows) == ledger.expected_totals()
        await check_pulses_stored_once(http, server, ledger)

    print(
        f"\n{len(ledger.by_identity())} pulses, kills at {load.in_flight_at_kill} requests"
        f" in flight, {len(in_flight_lost)} pulses cut off in flight, {unanswered} resent,"
        f" {stored_before_kill} of them stored before the kill (answered duplicate),"
        f" {load.failures_while_up} stale-connection retries"
    )
