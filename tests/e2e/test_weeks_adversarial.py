"""Six weeks of a server's life, lived in half a minute (DESIGN §3, README).

Every other suite runs a server for seconds, so what only time brings was
never tried: the dedup window running out, purges forgetting ids and
pulses, late pulses for days committed weeks before, the periodic committer
meeting day after day (a 23-hour one among them), restarts in between, and
whether memory and the store stay bounded as the weeks go by.

The clock. The server runs under libfaketime (`LD_PRELOAD`), its wall clock
read from a file the test rewrites to jump it forward, never back, at every
reading of the clock, while trio's monotonic clock, its timers and timeouts,
stay true (faked, it jumps with each step, and lock timeouts never end): see
`cluster_support.moved_clock`, which also says how a reading of the true date
in one thread while another read the file is avoided. Each jump is checked on
the server's HTTP `Date` header. A sped-up clock (`FAKETIME="@... x100000"`)
is not used: the billing day of a pulse without a timestamp, and whether a
day's grace has passed when the committer ticks on its true-time timer,
would depend on how long each request took. `time.sleep` fails with EINVAL
under it: one worker, whose writer lock is never contended, never sleeps.
A committer tick is awaited, not slept for: each tick ends with a purge
that first writes its horizon (now - dedup window - future skew) to the
store's `meta` table; once that has moved past a jump twice, a whole tick
(commit, then purge) ran on the new time.

The weeks. Billing in America/New_York (DST from 2026-03-08, a 23-hour day),
one tenant in Asia/Kolkata, `commit_interval` 0.02 s, `commit_grace` 1 h,
late and dedup windows at their default 35 days, 4 partitions, the file
sink, `durability = "os"` (the crash is the process's). From 2026-03-01, on
each of 42 days at noon New York time, three tenants send pulses with and
without ids, with and without timestamps; late pulses for 1, 3, 20 and 34
days back; one 10 min inside the late window and one 10 min outside it;
replays of pulses 1, 7, 30, 34 and 35 days old (duplicates) and 36 and 40
days old (forgotten, as documented: one without a timestamp counts again,
one with its old timestamp is past the late window); reuses of ids with
another amount (conflicts); 2,000 new ids in bulk. The clock then goes to
2 min before the day's end plus grace on some days (no batch for the day
yet), and to 2 min after it (nothing left open). On day 10 the server is
killed (SIGKILL), on day 20 stopped (SIGTERM), each time after the day's
pulses and down until 3 h past its commit time, then started on the same
data. PostgreSQL runs the same every sixth day (replays 6, 30 and 36 days
old), killed once, on a PostgreSQL of the test's own under the same fake
clock, since the service keeps the database's clock and the shared one's
would undo every jump.

At the end, exactly (Decimal): GET /aggregates equals what the answers say
was stored; every bucket is committed, its batch records revisions 1..n
whose deltas add up to its total; every batch was delivered once, its file
in the sink equal to the outbox's batch, and created no earlier than its
day's end plus grace; pulses and ids received before the last purge's
horizon are gone from the store (on SQLite, also no id or span left
pointing at a purged log row), those after it kept; GET /pulses shows each
pulse of the window once; the server's RSS levels off once each day's new
ids are matched by a day's purged ones.

Last, a clock that steps: README says an instance on PostgreSQL keeps the
database's clock "whatever a broken NTP does to one machine". One whose
machine clock steps 40 days ahead a few seconds after it started.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import glob
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest
import trio

from tests.e2e.cluster_support import (
    fresh_database,
    libfaketimes,
    moved_clock,
    require_postgres,
    unavailable,
    write_clock,
)
from tests.e2e.conftest import ABORTED_UPLOADS
from tests.support.server import (
    ServerProcess,
    Total,
    collect_pages,
    exact_sum,
    free_port,
    outbox_problems,
    wait_until,
)

pytestmark = [pytest.mark.e2e, *ABORTED_UPLOADS]


UTC = dt.UTC
NEW_YORK = ZoneInfo("America/New_York")
KOLKATA = ZoneInfo("Asia/Kolkata")
ZONES: Mapping[str, ZoneInfo] = {"acme": NEW_YORK, "globex": NEW_YORK, "initech": KOLKATA}
TENANTS = tuple(ZONES)
SKUS = (("api", "call"), ("storage", "gb"))
START = dt.date(2026, 3, 1)
DAYS = 42
GRACE = dt.timedelta(hours=1)
WINDOW = dt.timedelta(days=35)  # late_window = dedup_window, the defaults
FUTURE_SKEW = dt.timedelta(minutes=5)
# A purge forgets ids received before now - (dedup window + future skew).
PURGE_LAG = WINDOW + FUTURE_SKEW
LATE_LAGS = (1, 3, 20, 34)  # days back of late pulses, within the late window
RSS_FROM_DAY = 36  # the first day whose traffic meets a purge of a day's ids
RSS_GROWTH_MAX_KIB = 4 * 1024

BucketKey = tuple[str, str, str, str]  # tenant, sku, unit, date


# -- the environment -----------------------------------------------------------------


@cache
def _libfaketime() -> str | None:
    """A libfaketime whose timestamp file moves a child's wall clock while it runs."""
    found = libfaketimes()
    probe = (
        "import sys, time\n"
        "print(time.time(), flush=True)\n"
        "sys.stdin.readline()\n"
        "print(time.time(), flush=True)\n"
    )
    for path in found:
        directory = Path(os.environ.get("TMPDIR", "/tmp"))
        timestamp_file = directory / f"weeks-faketime-probe-{os.getpid()}"
        write_clock(timestamp_file, 3600)
        try:
            child = subprocess.Popen(
                [sys.executable, "-c", probe],
                env={**os.environ, **moved_clock(path, timestamp_file)},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert child.stdin is not None
                assert child.stdout is not None
                first = float(child.stdout.readline()) - time.time()
                write_clock(timestamp_file, 86400)
                child.stdin.write("\n")
                child.stdin.flush()
                second = float(child.stdout.readline()) - time.time()
            finally:
                child.kill()
                child.communicate(timeout=10)
        except (OSError, ValueError, subprocess.SubprocessError):
            continue
        finally:
            timestamp_file.unlink(missing_ok=True)
        if abs(first - 3600) < 5 and abs(second - 86400) < 5:
            return path
    return None


class ServerClock:
    """The wall clock of the server: the test's own plus an offset that only grows."""

    def __init__(self, path: Path, start: dt.datetime) -> None:
        self.path = path
        self.offset = 0
        self.set(start, forward_only=False)

    def now(self) -> dt.datetime:
        return dt.datetime.now(UTC) + dt.timedelta(seconds=self.offset)

    def set(self, moment: dt.datetime, *, forward_only: bool = True) -> None:
        offset = round((moment - dt.datetime.now(UTC)).total_seconds())
        if forward_only:
            assert offset > self.offset, f"the clock may only go forward, not to {moment}"
        self.offset = offset
        write_clock(self.path, offset)

    def env(self) -> dict[str, str]:
        library = _libfaketime()
        if library is None:
            unavailable(
                "libfaketime is not installed or does not work (apt-get install -y faketime)"
            )
        return moved_clock(library, self.path)


# -- what was sent and what it must have made ----------------------------------------


@dataclass
class Sent:
    """One pulse as sent, what the test expects for it, and what the server said."""

    payload: dict[str, str]
    expect: str  # accepted | duplicate | conflict | rejected
    day: str  # the billing day it is counted on if stored now
    at: dt.datetime  # the server's clock when it was sent
    why: str  # what the pulse tries, for messages
    error_has: str = ""  # for a rejection: what its reason must say
    status: str | None = None
    error: str | None = None


@dataclass
class History:
    """Every pulse sent, and from the answers alone, what the server must hold."""

    sent: list[Sent] = field(default_factory=list)
    stored: dict[tuple[str, str], Sent] = field(default_factory=dict)  # (tenant, id)
    amounts: dict[BucketKey, list[Decimal]] = field(default_factory=lambda: defaultdict(list))
    held: list[Sent] = field(default_factory=list)  # every stored pulse, in order
    problems: list[str] = field(default_factory=list)

    def expected(self) -> dict[BucketKey, Total]:
        return {key: Total(exact_sum(v), len(v)) for key, v in self.amounts.items()}

    def record(self, pulse: Sent) -> None:
        self.sent.append(pulse)
        if pulse.status != pulse.expect:
            self.problems.append(
                f"{pulse.at:%Y-%m-%d %H:%M} {pulse.why}: expected {pulse.expect},"
                f" answered {pulse.status} ({pulse.error}); pulse {pulse.payload}"
            )
        elif pulse.expect == "rejected" and pulse.error_has not in (pulse.error or ""):
            self.problems.append(
                f"{pulse.why}: rejected, but the reason {pulse.error!r} does not say"
                f" {pulse.error_has!r}"
            )
        if pulse.status == "accepted":
            p = pulse.payload
            self.amounts[(p["tenant_id"], p["product_sku"], p["use_unit"], pulse.day)].append(
                Decimal(p["used_amount"])
            )
            self.held.append(pulse)
            if "id" in p:
                self.stored[(p["tenant_id"], p["id"])] = pulse


def day_of(tenant: str, moment: dt.datetime) -> str:
    return moment.astimezone(ZONES[tenant]).date().isoformat()


def closes_at(day: dt.date) -> dt.datetime:
    """When `day` has ended in every zone the server bills in (README: the committer)."""
    following = day + dt.timedelta(days=1)
    return max(
        dt.datetime.combine(following, dt.time(), tzinfo=zone) for zone in set(ZONES.values())
    ).astimezone(UTC)


def noon(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(12), tzinfo=NEW_YORK).astimezone(UTC)


def stamp(moment: dt.datetime) -> str:
    return moment.replace(microsecond=0).isoformat()


def amount(*seeds: int) -> str:
    """A decimal with nine fractional digits, different for each seed."""
    a = 1
    for s in seeds:
        a = (a * 1_000_003 + s * 7919 + 17) % 10**13
    return f"{a // 10**9 % 1000}.{a % 10**9:09d}"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def us(moment: dt.datetime) -> int:
    delta = moment - dt.datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def moment_of(micros: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=UTC) + dt.timedelta(microseconds=micros)


# -- the stores, read behind the server's back -------------------------------------------


@dataclass
class Contents:
    """What a store holds of the log of pulses and their ids."""

    old_rows: int  # pulses (SQLite: log rows) received before the horizon asked about
    oldest: int | None  # when the oldest of them was received
    ids: set[tuple[str, str]]  # (tenant, id) of the client ids indexed
    complete: bool  # whether `ids` holds every id (SQLite keeps the newest in memory)
    sizes: dict[str, int]
    problems: list[str]


class SQLiteFile:
    """The server's SQLite file, read-only (WAL: it may read while the server writes)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "store" / "store.sqlite"

    def query(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def horizon(self) -> int | None:
        rows = self.query("SELECT value FROM meta WHERE key = 'purge_horizon'")
        return int(rows[0][0]) if rows else None

    def contents(self, before_us: int) -> Contents:
        ((old, oldest),) = self.query(
            "SELECT count(*), min(received_at) FROM pulse_log WHERE received_at < ?", (before_us,)
        )
        keys = [key for (key,) in self.query("SELECT id_key FROM pulse_ids")]
        ids = {(tenant, pulse_id) for tenant, _, pulse_id in (k.partition("\x1f") for k in keys)}
        ((dangling,),) = self.query(
            "SELECT count(*) FROM pulse_ids WHERE seq NOT IN (SELECT seq FROM pulse_log)"
        )
        ((spans,),) = self.query(
            "SELECT count(*) FROM pulse_spans WHERE last_seq < (SELECT min(seq) FROM pulse_log)"
        )
        problems = []
        if dangling:
            problems.append(f"{dangling} ids in pulse_ids whose log row is gone")
        if spans:
            problems.append(f"{spans} pulse_spans listing only purged log rows")
        sizes = {
            "log rows": self.query("SELECT count(*) FROM pulse_log")[0][0],
            "indexed ids": len(ids),
            "spans": self.query("SELECT count(*) FROM pulse_spans")[0][0],
            "file KiB": sum(f.stat().st_size for f in self.path.parent.glob("store.sqlite*"))
            // 1024,
        }
        return Contents(old, oldest, ids, False, sizes, problems)

    def close(self) -> None:
        pass


class PostgresDatabase:
    """The server's PostgreSQL database, read through a connection of the test's."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)

    def horizon(self) -> int | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'purge_horizon'").fetchone()
        return int(row[0]) if row else None

    def contents(self, before_us: int) -> Contents:
        row = self.conn.execute(
            "SELECT count(*), min(received_at) FROM pulses WHERE received_at < %s", (before_us,)
        ).fetchone()
        assert row is not None
        ids = {
            (str(t), str(p))
            for t, p in self.conn.execute("SELECT tenant_id, pulse_id FROM pulses WHERE client_id")
        }
        total = self.conn.execute("SELECT count(*) FROM pulses").fetchone()
        assert total is not None
        sizes = {"pulses": int(total[0]), "ids": len(ids)}
        return Contents(int(row[0]), row[1], ids, True, sizes, [])

    def close(self) -> None:
        self.conn.close()


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@contextlib.contextmanager
def faked_postgres(base: Path, env: Mapping[str, str]) -> Iterator[str]:
    """A PostgreSQL of the test's own, under the server's fake clock: the service keeps
    the database's clock (`clock.SharedClock`), so the shared one at 5432 would undo
    every jump. Stopped and removed afterwards."""
    bindir = _postgres_bin()
    if bindir is None:
        unavailable("PostgreSQL's initdb is not installed (apt-get install -y postgresql)")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(base, "postgres")
    data = base / "pg"
    port = free_port()
    options = (
        f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
        " -c full_page_writes=off -c max_connections=40"
    )
    initdb = [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]
    subprocess.run(
        [*as_postgres, *initdb, "--no-sync", "-E", "UTF8", "--no-instructions"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    faked = [f"{k}={v}" for k, v in env.items()]
    pg_ctl = [str(bindir / "pg_ctl"), "-D", str(data)]
    subprocess.run(
        [
            *as_postgres,
            "env",
            *faked,
            *pg_ctl,
            "-o",
            options,
            "-l",
            str(base / "pg.log"),
            "-w",
            "start",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_postgres, *pg_ctl, "-m", "immediate", "stop"],
            check=False,
            capture_output=True,
            timeout=60,
        )


# -- the weeks -------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Which days have traffic (every `step`-th), and what happens on them."""

    step: int

    @property
    def days(self) -> list[int]:
        return list(range(0, DAYS, self.step))

    @property
    def kill_day(self) -> int:
        return next(d for d in self.days if d >= 10)

    @property
    def stop_day(self) -> int | None:
        """SIGTERM, then start again (daily only: the other plan has time for one restart)."""
        return 20 if self.step == 1 else None

    @property
    def slots(self) -> tuple[int, ...]:
        """How many days back the pulses replayed on a day were sent: duplicates up to
        35 (within the window), forgotten from 36; those of `conflict_lag` come
        back with another amount."""
        if self.step == 1:
            return (1, 2, 7, 30, 34, 35, 36, 40)
        return tuple(lag for lag in (3, 6, 9, 30, 33, 36, 39) if lag % self.step == 0)

    @property
    def conflict_lag(self) -> int:
        return self.slots[1]

    @property
    def early_days(self) -> set[int]:
        """Days also looked at 2 min before their end plus grace: the first, those
        around the 23-hour one (2026-03-08), the restarts, those whose ids start to
        be purged, the last."""
        wanted = {0, 6, 7, 8, 30, 35, 36, self.kill_day, self.days[-1]}
        wanted |= {self.stop_day} if self.stop_day is not None else set()
        return wanted & set(self.days)


class Weeks:
    """One server, its store, its clock, and everything sent to it."""

    BULK = 2_000  # new ids a day in one request, so a leak per id would show
    PLAIN, STAMPED, ANONYMOUS, ANONYMOUS_STAMPED = 10, 4, 5, 2  # a tenant, sku and day

    def __init__(
        self,
        server: ServerProcess,
        store: SQLiteFile | PostgresDatabase,
        clock: ServerClock,
        http: httpx.AsyncClient,
        plan: Plan,
    ) -> None:
        self.plan = plan
        self.server = server
        self.store = store
        self.clock = clock
        self.http = http
        self.history = History()
        # Per day: the pulses with an id sent fresh that day, without and with a timestamp.
        self.originals: dict[int, tuple[list[Sent], list[Sent]]] = {}
        self.rss: dict[int, int] = {}
        self.failures: dict[str, list[str]] = defaultdict(list)
        # Moments at which a purge announced its horizon (now - PURGE_LAG): the next
        # purge, 10 s or more later, forgets up to it.
        self.announced: list[dt.datetime] = []
        self.totals: dict[BucketKey, Total] = {}
        self.sizes: dict[str, int] = {}

    # -- the clock ---------------------------------------------------------------

    async def jump(self, moment: dt.datetime) -> None:
        """Move the server's clock to `moment` and check that it got there."""
        self.clock.set(moment)
        await self.check_clock()

    async def ticks(self) -> None:
        """Wait until a whole committer tick ran on the clock as it is now."""
        jumped = self.clock.now()
        floor = us(jumped - PURGE_LAG) - 1_000_000

        async def reached() -> int | None:
            found = self.store.horizon()
            return found if found is not None and found >= floor else None

        first = await wait_until(reached, within=30, interval=0.02, what="a purge on the new time")
        assert first is not None

        async def next_tick() -> bool:
            found = self.store.horizon()
            return found is not None and found > first

        await wait_until(next_tick, within=30, interval=0.02, what="a second committer tick")
        self.announced.append(jumped)

    @property
    def forgotten_before(self) -> dt.datetime:
        """Ids received before this are surely forgotten: a purge forgets up to the
        latest horizon announced 10 s or more before, so the whole ticks after the
        last jump forgot up to the one announced before it."""
        if len(self.announced) < 2:
            return dt.datetime.min.replace(tzinfo=UTC)
        return self.announced[-2] - PURGE_LAG - dt.timedelta(minutes=1)

    # -- sending -----------------------------------------------------------------

    async def post(self, pulses: Sequence[Sent]) -> None:
        body = [p.payload for p in pulses]
        response = await self.http.post(f"{self.server.url}/pulses", json=body)
        if response.status_code != 202:
            for p in pulses:
                p.status, p.error = f"HTTP {response.status_code}", response.text[:200]
        else:
            report = response.json()
            items = {item["index"]: item for item in report["items"]}
            for index, p in enumerate(pulses):
                item = items.get(index)
                p.status = "accepted" if item is None else item["status"]
                p.error = None if item is None else item.get("error")
        for p in pulses:
            self.history.record(p)

    def fresh(
        self, tenant: str, sku: str, unit: str, pulse_id: str | None, **extra: str
    ) -> dict[str, str]:
        payload = {"tenant_id": tenant, "product_sku": sku, "use_unit": unit, **extra}
        if pulse_id is not None:
            payload["id"] = pulse_id
        return payload

    async def traffic(self, i: int) -> None:
        """Day `i`'s pulses, sent at its noon in New York."""
        now = self.clock.now()
        plain: list[Sent] = []
        stamped: list[Sent] = []
        other: list[Sent] = []
        for n in range(max(self.PLAIN, self.STAMPED, self.ANONYMOUS)):
            for t, tenant in enumerate(TENANTS):
                for s, (sku, unit) in enumerate(SKUS):
                    seeds = (i, n, t, s)
                    if n < self.PLAIN:
                        payload = self.fresh(
                            tenant, sku, unit, f"{sku}-d{i}-p{n}", used_amount=amount(*seeds, 1)
                        )
                        plain.append(Sent(payload, "accepted", day_of(tenant, now), now, "new id"))
                    if n < self.STAMPED:
                        at = now - dt.timedelta(minutes=7 * (n + 1))
                        payload = self.fresh(
                            tenant,
                            sku,
                            unit,
                            f"{sku}-d{i}-s{n}",
                            used_amount=amount(*seeds, 2),
                            timestamp=stamp(at),
                        )
                        why = "new id with a timestamp"
                        stamped.append(Sent(payload, "accepted", day_of(tenant, at), now, why))
                    if n < self.ANONYMOUS:
                        payload = self.fresh(tenant, sku, unit, None, used_amount=amount(*seeds, 3))
                        other.append(Sent(payload, "accepted", day_of(tenant, now), now, "no id"))
                    if n < self.ANONYMOUS_STAMPED:
                        at = now - dt.timedelta(minutes=3 * (n + 1))
                        payload = self.fresh(
                            tenant,
                            sku,
                            unit,
                            None,
                            used_amount=amount(*seeds, 4),
                            timestamp=stamp(at),
                        )
                        why = "no id, a timestamp"
                        other.append(Sent(payload, "accepted", day_of(tenant, at), now, why))
        self.originals[i] = (plain, stamped)
        for lag in LATE_LAGS:
            at = noon(START + dt.timedelta(days=i - lag)) - dt.timedelta(hours=2)
            for t, tenant in enumerate(TENANTS):
                why = f"late by {lag} d"
                sku, unit = SKUS[(i + t) % 2]
                payload = self.fresh(
                    tenant,
                    sku,
                    unit,
                    f"{sku}-late{lag}-d{i}",
                    used_amount=amount(i, lag, t, 5),
                    timestamp=stamp(at),
                )
                other.append(Sent(payload, "accepted", day_of(tenant, at), now, why))
                payload = self.fresh(
                    tenant, sku, unit, None, used_amount=amount(i, lag, t, 6), timestamp=stamp(at)
                )
                other.append(Sent(payload, "accepted", day_of(tenant, at), now, why + ", no id"))
        inside = now - WINDOW + dt.timedelta(minutes=10)
        outside = now - WINDOW - dt.timedelta(minutes=10)
        for at, expect, why in (
            (inside, "accepted", "10 min inside the late window"),
            (outside, "rejected", "10 min outside the late window"),
        ):
            payload = self.fresh(
                "acme",
                "api",
                "call",
                f"edge-{i}-{expect}",
                used_amount=amount(i, 7),
                timestamp=stamp(at),
            )
            other.append(
                Sent(payload, expect, day_of("acme", at), now, why, "older than the late window")
            )
        other.extend(self.replays(i, now))
        await self.post(plain + stamped + other)
        bulk = [
            Sent(
                self.fresh("globex", "api", "call", f"bulk-d{i}-{n}", used_amount=amount(i, n, 8)),
                "accepted",
                day_of("globex", now),
                now,
                "bulk new id",
            )
            for n in range(self.BULK)
        ]
        await self.post(bulk)

    def replays(self, i: int, now: dt.datetime) -> list[Sent]:
        """Pulses with ids sent `lag` days ago, again: each lag its own originals."""
        found: list[Sent] = []
        for slot, lag in enumerate(self.plan.slots):
            if i - lag not in self.originals:
                continue
            plain, stamped = self.originals[i - lag]
            for original in plain[2 * slot : 2 * slot + 2] + stamped[2 * slot : 2 * slot + 2]:
                payload = dict(original.payload)
                age = now - original.at
                when = payload.get("timestamp")
                ts_age = None if when is None else now - dt.datetime.fromisoformat(when)
                why = f"replay of a pulse sent {age / dt.timedelta(days=1):.2f} d before"
                if ts_age is not None:
                    assert abs(ts_age - WINDOW) > dt.timedelta(minutes=1), "too close to call"
                if lag == self.plan.conflict_lag:
                    payload["used_amount"] = str(Decimal(payload["used_amount"]) + 1)
                    expect, day, must_say = "conflict", original.day, ""
                    why = "reuse of an id with another amount, " + why
                elif ts_age is not None and ts_age > WINDOW:
                    expect, day, must_say = "rejected", original.day, "older than the late window"
                    why += ", its timestamp past the late window"
                elif age < PURGE_LAG - dt.timedelta(minutes=1):
                    expect, day, must_say = "duplicate", original.day, ""
                    why += ", within the dedup window"
                elif original.at < self.forgotten_before and ts_age is None:
                    # Documented: an id is remembered for the dedup window, then forgotten.
                    expect, day, must_say = "accepted", day_of(payload["tenant_id"], now), ""
                    why += ", its id forgotten (past the dedup window)"
                else:
                    raise AssertionError(
                        f"no expectation for {why} (at {original.at}, day {i}, surely"
                        f" forgotten before {self.forgotten_before}, {self.announced[-3:]})"
                    )
                found.append(Sent(payload, expect, day, now, why, must_say))
        return found

    # -- the days ------------------------------------------------------------------

    async def all_delivered(self) -> list[dict[str, Any]]:
        async def done() -> list[dict[str, Any]]:
            rows = await collect_pages(
                self.http, f"{self.server.url}/batches", "batches", limit=1000
            )
            return rows if all(r["status"] == "delivered" for r in rows) else []

        return await wait_until(done, within=30, interval=0.05, what="every batch delivered")

    async def check_clock(self, database_stepped: bool = True) -> None:
        """The server's wall clock (its Date header) is the one set: the fake time took.

        On PostgreSQL the service keeps the database's clock, carried between
        readings by its monotonic clock, and reads it again once its wall clock
        steps: where the database's clock was stepped too (`database_stepped`),
        the jump is taken once the service's offset from it is gone again.
        """
        response = await self.http.get(f"{self.server.url}/healthz")
        told = email.utils.parsedate_to_datetime(response.headers["date"])
        drift = (told - self.clock.now()).total_seconds()
        assert abs(drift) < 3, (
            f"the server's clock reads {told}, {drift:+.0f} s from the {self.clock.now()}"
            " it was set to: the fake time did not reach it"
        )

        async def followed() -> bool:
            metrics = (await self.http.get(f"{self.server.url}/metrics")).text
            found = re.search(r"^ingestor_clock_offset_seconds (\S+)$", metrics, re.MULTILINE)
            return found is None or abs(float(found[1])) < 1

        if database_stepped:
            await wait_until(
                followed, within=10, what="the service's clock following the database's"
            )

    async def restart(self, i: int, down_until: dt.datetime) -> None:
        """Kill the server (the kill day) or stop it (the stop day), and start it again
        at `down_until`: it is down when the day falls due. No delivery is in flight
        when it goes: one cut short is attempted again, by design."""
        await self.all_delivered()
        if i == self.plan.kill_day:
            await self.server.kill()
        else:
            code = await self.server.terminate()
            assert code == 0, f"SIGTERM on day {i}: exit code {code}"
        self.clock.set(down_until)
        await self.server.start()
        await self.check_clock()

    async def day(self, i: int) -> None:
        today = START + dt.timedelta(days=i)
        if self.announced and noon(today) - self.announced[-1] > dt.timedelta(days=1):
            # Days without traffic still have committer ticks, which purge.
            await self.jump(noon(today) - dt.timedelta(hours=12))
            await self.ticks()
        await self.jump(noon(today))
        if i >= 35:
            await self.ticks()  # ids older than the window are purged before the replays
        await self.traffic(i)
        self.rss[i] = rss_kib(self.server.pid or 0)
        due = closes_at(today) + GRACE
        if i in self.plan.early_days:
            await self.jump(due - dt.timedelta(minutes=2))
            await self.ticks()
            early = await collect_pages(
                self.http,
                f"{self.server.url}/batches",
                "batches",
                {"date": today.isoformat()},
                limit=1000,
            )
            if early:
                self.failures["a day is committed only after its end plus commit_grace"].append(
                    f"{today} (ends {closes_at(today)}, + grace {due}): {len(early)} batches"
                    f" already at {self.clock.now():%Y-%m-%d %H:%M:%S} UTC, created at"
                    f" {sorted({b['created_at'] for b in early})}"
                )
        after = due + dt.timedelta(minutes=2)
        if i in (self.plan.kill_day, self.plan.stop_day):
            await self.restart(i, down_until=due + dt.timedelta(hours=3))
            after += dt.timedelta(hours=3)
        await self.jump(after)
        await self.ticks()
        still = await collect_pages(
            self.http,
            f"{self.server.url}/aggregates",
            "aggregates",
            {"status": "open"},
            limit=1000,
        )
        if still:
            self.failures["the periodic committer commits each day once due"].append(
                f"at {self.clock.now():%Y-%m-%d %H:%M} UTC, 2 min after {today}'s end plus"
                f" grace and two committer ticks, {len(still)} buckets are still open:"
                f" {sorted({(r['date'], r['tenant_id']) for r in still})[:6]}"
            )

    # -- the end ---------------------------------------------------------------------

    async def check(self) -> None:
        await self.check_answers()
        await self.check_totals()
        batches = await self.check_batches()
        await self.check_deliveries(batches)
        await self.check_store()
        await self.check_audit_trail()
        self.check_memory()

    async def check_answers(self) -> None:
        if self.history.problems:
            counts = Counter(p.split(":")[0].split(" ", 2)[-1] for p in self.history.problems)
            self.failures["every pulse is answered as its id's history says"] = [
                f"{len(self.history.problems)} pulses answered otherwise: {dict(counts)}",
                *self.history.problems[:8],
            ]

    async def check_totals(self) -> None:
        rows = await collect_pages(
            self.http, f"{self.server.url}/aggregates", "aggregates", limit=10_000
        )
        got: dict[BucketKey, Total] = {}
        uncommitted = []
        for r in rows:
            key = (r["tenant_id"], r["product_sku"], r["use_unit"], r["date"])
            got[key] = Total(Decimal(r["used_amount"]), r["pulse_count"])
            if Total(Decimal(r["committed_amount"]), r["committed_count"]) != got[key]:
                uncommitted.append(f"{key}: {r}")
        expected = self.history.expected()
        wrong = [
            f"{key}: expected {expected.get(key)}, GET /aggregates {got.get(key)}"
            for key in sorted(expected.keys() | got.keys())
            if expected.get(key) != got.get(key)
        ]
        if wrong:
            self.failures["every accepted pulse is counted once, exactly"] = [
                f"{len(wrong)} of {len(expected)} buckets differ from the acknowledgements",
                *wrong[:10],
            ]
        if uncommitted:
            self.failures["every bucket of a day past its grace is committed"] = [
                f"{len(uncommitted)} buckets not fully committed at the end",
                *uncommitted[:5],
            ]
        self.totals = got

    async def check_batches(self) -> dict[str, dict[str, Any]]:
        listed = await self.all_delivered()
        root = self.server.deliveries
        files = {p.stem: p for p in root.glob("*/*.json")}
        leftovers = [
            str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix != ".json"
        ]
        batches: dict[str, dict[str, Any]] = {}
        problems = []
        for row in listed:
            path = files.get(row["batch_id"])
            if path is None:
                problems.append(f"{row['batch_id']} ({row['status']}): no file in the sink")
                continue
            if path.parent.name != row["date"]:
                problems.append(
                    f"{row['batch_id']}: file under {path.parent.name}, not {row['date']}"
                )
            body = json.loads(path.read_bytes())
            batches[row["batch_id"]] = body
            state = {
                k: row[k]
                for k in ("status", "attempts", "last_error", "next_attempt_at", "delivered_at")
            }
            if row["attempts"] != 1:
                problems.append(
                    f"{row['batch_id']}: delivered in {row['attempts']} attempts ({state})"
                )
            shown = {k: v for k, v in row.items() if k not in state and k != "records"}
            filed = {k: v for k, v in body.items() if k != "records"}
            if shown != filed:
                problems.append(f"{row['batch_id']}: outbox {shown} but file {filed}")
        extra = sorted(set(files) - {r["batch_id"] for r in listed})
        if extra or leftovers:
            problems.append(f"files in the sink that are no batch: {extra[:5]}, {leftovers[:5]}")
        # A sample of whole batches, records included, as GET /batches/{id} shows them.
        for batch_id in sorted(batches)[:: max(1, len(batches) // 12)]:
            response = await self.http.get(f"{self.server.url}/batches/{batch_id}")
            view = response.json()
            for k in ("status", "attempts", "last_error", "next_attempt_at", "delivered_at"):
                view.pop(k, None)
            if view != batches[batch_id]:
                problems.append(
                    f"{batch_id}: GET /batches/{{id}} {view} but file {batches[batch_id]}"
                )
        if problems:
            self.failures["every batch is delivered once, as the outbox holds it"] = [
                f"{len(listed)} batches, {len(files)} files",
                *problems[:8],
            ]
        late = []
        for batch in batches.values():
            day = dt.date.fromisoformat(batch["date"])
            created = dt.datetime.fromisoformat(batch["created_at"])
            if created < closes_at(day) + GRACE:
                late.append(
                    f"{batch['batch_id']} ({batch['kind']}) of {day} created {created},"
                    f" before its end plus grace {closes_at(day) + GRACE}"
                )
        if late:
            self.failures["a day is committed only after its end plus commit_grace"].extend(
                late[:8]
            )
        return batches

    async def check_deliveries(self, batches: Mapping[str, Mapping[str, Any]]) -> None:
        problems = outbox_problems(batches.values(), self.totals)
        if problems:
            self.failures["every committed unit is in exactly one batch"] = [
                f"{len(problems)} problems over {len(self.totals)} buckets",
                *problems[:8],
            ]

    async def check_store(self) -> None:
        """Pulses and ids received before the last purge's horizon are gone; those after
        it are kept (2 h of margin either side: every pulse was sent near a noon)."""
        ready = self.announced[-2] - PURGE_LAG
        margin = dt.timedelta(hours=2)
        contents = self.store.contents(us(ready - margin))
        self.sizes = contents.sizes
        problems = list(contents.problems)
        if contents.old_rows:
            assert contents.oldest is not None
            problems.append(
                f"{contents.old_rows} pulses (SQLite: log rows) received before"
                f" {ready - margin} remain, the oldest received {moment_of(contents.oldest)}"
            )
        latest = self.history.stored
        gone = [key for key, p in latest.items() if p.at < ready - margin]
        kept = [key for key, p in latest.items() if p.at > ready + margin]
        remembered = [key for key in gone if key in contents.ids]
        if remembered:
            problems.append(
                f"{len(remembered)} of {len(gone)} ids received before the purge horizon"
                f" {ready} are still indexed: {remembered[:5]}"
            )
        lost = [key for key in kept if key not in contents.ids] if contents.complete else []
        if lost:
            problems.append(
                f"{len(lost)} of {len(kept)} ids received within the dedup window are not"
                f" indexed: {lost[:5]}"
            )
        if problems:
            self.failures["the store forgets what is past the dedup window, and only that"] = [
                f"store: {self.sizes}",
                *problems,
            ]

    async def check_audit_trail(self) -> None:
        """GET /pulses lists, for acme, every pulse received within the window, once."""
        ready = self.announced[-2] - PURGE_LAG
        expected: dict[str, Counter[str]] = defaultdict(Counter)
        for p in self.history.held:
            if p.payload["tenant_id"] == "acme" and p.at > ready:
                expected[p.day][p.payload.get("id", "(assigned)")] += 1
        problems = []
        for day in sorted(expected):
            rows = await collect_pages(
                self.http,
                f"{self.server.url}/pulses",
                "pulses",
                {"tenant_id": "acme", "date": day},
                limit=10_000,
            )
            listed: Counter[str] = Counter()
            for r in rows:
                listed["(assigned)" if r["id_assigned"] else r["id"]] += 1
            if listed != expected[day]:
                missing = expected[day] - listed
                extra = listed - expected[day]
                problems.append(f"acme {day}: missing {dict(missing)}, extra {dict(extra)}")
            if len({r["id"] for r in rows}) != len(rows):
                problems.append(f"acme {day}: an id listed twice")
        if problems:
            self.failures["GET /pulses shows each stored pulse of the window once"] = problems[:8]

    def check_memory(self) -> None:
        """From the first day ids are purged on, each day adds as many as it forgets:
        RSS must level off (it grows before, with SQLite's page cache, as the store
        does)."""
        series = {i: kib for i, kib in self.rss.items() if i >= RSS_FROM_DAY}
        first, last = series[min(series)], series[max(series)]
        if last - first > RSS_GROWTH_MAX_KIB:
            self.failures["memory does not grow over the weeks"].append(
                f"RSS {first / 1024:.1f} MiB on day {min(series)}, {last / 1024:.1f} MiB on day"
                f" {max(series)} (+{(last - first) / 1024:.1f} MiB, the same traffic each day,"
                f" as many ids purged as added): {[round(v / 1024, 1) for v in series.values()]}"
            )


# -- the test ----------------------------------------------------------------------------


@pytest.fixture
def clock() -> Iterator[ServerClock]:
    """The server's clock, its file where the postgres user can read it too; removed
    afterwards with everything else put beside it."""
    base = Path(tempfile.mkdtemp(prefix="weeks-"))
    base.chmod(0o755)
    try:
        yield ServerClock(base / "faketime", noon(START) - dt.timedelta(hours=2))
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def database(store: str, clock: ServerClock) -> Iterator[str | None]:
    """The URL of a PostgreSQL on the server's clock, or None for SQLite."""
    if store != "postgresql":
        yield None
        return
    with faked_postgres(clock.path.parent, clock.env()) as url:
        yield url


@pytest.mark.parametrize(
    ("store", "step"), [("sqlite", 1), ("postgresql", 6)], ids=["sqlite-daily", "postgresql"]
)
async def test_six_weeks_bill_each_pulse_once_commit_each_day_after_its_grace_and_forget_old_ids(
    store: str, step: int, clock: ServerClock, database: str | None, tmp_path: Path
) -> None:
    env = {
        **clock.env(),
        "INGESTOR_COMMIT_INTERVAL": "0.02",
        "INGESTOR_DURABILITY": "os",
        "INGESTOR_COMMIT_GRACE": "1h",
        "INGESTOR_PARTITIONS": "4",
        "INGESTOR_BILLING_TIMEZONE": "America/New_York",
    }
    data = tmp_path / "data"
    reader: SQLiteFile | PostgresDatabase
    if database is not None:
        env["INGESTOR_STORE"] = database
        reader = PostgresDatabase(database)
    else:
        reader = SQLiteFile(data)
    config = '[tenant_timezones]\ninitech = "Asia/Kolkata"\n'
    server = ServerProcess(data, env=env, config=config)
    async with httpx.AsyncClient(timeout=30.0) as http:
        plan = Plan(step)
        weeks = Weeks(server, reader, clock, http, plan)
        started = time.monotonic()
        try:
            await server.start()
            with trio.fail_after(150):
                await weeks.jump(noon(START) - dt.timedelta(hours=1))
                for i in plan.days:
                    await weeks.day(i)
                await weeks.check()
        finally:
            await server.aclose()
            reader.close()
    output = server.output
    assert "Traceback" not in output, output[-4000:]
    print(
        f"\n{store}: {DAYS} days ({len(plan.days)} with traffic)"
        f" in {time.monotonic() - started:.1f} s,"
        f" {len(weeks.history.sent)} pulses sent, {len(weeks.history.held)} stored,"
        f" {len(weeks.totals)} buckets; store {weeks.sizes};"
        f" RSS MiB {[round(v / 1024, 1) for v in weeks.rss.values()]}"
    )
    assert not weeks.failures, "\n".join(
        f"{promise}:\n  " + "\n  ".join(details) for promise, details in weeks.failures.items()
    )


# -- a machine's clock that steps weeks ahead ---------------------------------------------


@pytest.fixture
def shared_database() -> Iterator[str]:
    """A fresh database on the shared PostgreSQL (its clock is the true one)."""
    with fresh_database(require_postgres()) as url:
        yield url


async def test_an_instance_whose_machine_clock_steps_weeks_ahead_keeps_the_stores_clock(
    shared_database: str, tmp_path: Path
) -> None:
    """README: on PostgreSQL every instance keeps the database's clock, "so delivery
    leases, retries, purges and the billing day of pulses without a timestamp agree
    whatever a broken NTP does to one machine". A broken NTP, or one that at last
    corrects a machine stopped for weeks, steps its clock: here 40 days ahead, a few
    seconds after the instance started (it measures its offset at start and every
    30 s), then 15 s more pass. Through the step, a pulse stamped now must be
    accepted, a retry of an id stored seconds before must be a duplicate, nothing
    may fall on a day 40 days ahead, today must not be committed, and the purge
    horizon the store keeps for every instance must stay within the dedup window
    of the database's clock."""
    clock = ServerClock(tmp_path / "faketime", dt.datetime.now(UTC))
    env = {**clock.env(), "INGESTOR_STORE": shared_database, "INGESTOR_COMMIT_INTERVAL": "0.1"}
    server = ServerProcess(tmp_path / "data", env=env)
    reader = PostgresDatabase(shared_database)
    pulse = {"tenant_id": "t1", "product_sku": "sku", "use_unit": "call", "used_amount": "7"}
    try:
        async with httpx.AsyncClient(timeout=30.0) as http:
            await server.start()
            with trio.fail_after(25):
                weeks = Weeks(server, reader, clock, http, Plan(1))
                await weeks.check_clock()
                today = dt.datetime.now(UTC).date().isoformat()
                first = await http.post(f"{server.url}/pulses", json={**pulse, "id": "retried"})
                assert first.status_code == 202, first.text

                async def moved(since: int | None) -> int:
                    async def changed() -> int | None:
                        found = reader.horizon()
                        return found if found != since else None

                    found = await wait_until(changed, within=10, what="a committer tick")
                    assert found is not None
                    return found

                before = await moved(None)
                clock.set(dt.datetime.now(UTC) + dt.timedelta(days=40))
                await weeks.check_clock(database_stepped=False)
                stepped = await moved(before)  # a tick on the stepped clock
                clock.set(clock.now() + dt.timedelta(seconds=15))
                await moved(await moved(stepped))  # the announced horizon has been used
                true_now = dt.datetime.now(UTC)
                stamped = await http.post(
                    f"{server.url}/pulses",
                    json={**pulse, "id": "stamped", "timestamp": stamp(true_now)},
                )
                retry = await http.post(f"{server.url}/pulses", json={**pulse, "id": "retried"})
                rows = await collect_pages(
                    http, f"{server.url}/aggregates", "aggregates", {"tenant_id": "t1"}, limit=100
                )
                batches = await collect_pages(
                    http, f"{server.url}/batches", "batches", {"date": today}, limit=100
                )
                horizon = reader.horizon()
    finally:
        await server.aclose()
        reader.close()
    assert "Traceback" not in server.output, server.output[-4000:]
    assert horizon is not None
    problems = []
    if stamped.status_code != 202 or stamped.json().get("accepted") != 1:
        problems.append(f"a pulse stamped {stamp(true_now)} (now) was refused: {stamped.text}")
    if retry.status_code != 202 or retry.json().get("duplicates") != 1:
        problems.append(
            "a retry of id 'retried', stored seconds before, was not a duplicate:"
            f" {retry.text} (counted again)"
        )
    days = {row["date"]: (row["used_amount"], row["pulse_count"]) for row in rows}
    if set(days) != {today}:
        problems.append(f"pulses without a timestamp fell on {days}, not only on {today}")
    if batches:
        problems.append(
            f"{today}, not over on the database's clock, was committed:"
            f" {[(b['batch_id'], b['created_at']) for b in batches]}"
        )
    limit = true_now - PURGE_LAG + dt.timedelta(minutes=1)
    if moment_of(horizon) > limit:
        refused = moment_of(horizon) + FUTURE_SKEW - true_now
        problems.append(
            f"the store's purge horizon is {moment_of(horizon)}, not before {limit} (the"
            " database's clock less the dedup window): every instance on the store refuses"
            f" each pulse stamped before {moment_of(horizon) + FUTURE_SKEW}, so any stamped"
            f" now, for {refused.days} d {refused.seconds // 3600} h to come"
        )
    summary = "one instance's machine clock stepped 40 days ahead:\n  " + "\n  ".join(problems)
    assert problems == [], summary
