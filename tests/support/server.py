"""Real ingestor servers, and what their clients were told.

    ServerProcess   `python -m ingestor serve` as a child process on a free
                    port: `start` (returns once GET /readyz is 200), `kill`
                    (SIGKILL), `terminate` (SIGTERM, returns the exit code),
                    `restart` on the same data dir and port, and the child's
                    output for failure messages.
    Ledger          every pulse a client sent and the answer it got, so a test
                    can compute from the acknowledgements alone what the
                    server must hold, and can tell a lost pulse from one
                    counted twice.
    send_pulses     POST pulses as one object, a JSON array or NDJSON, and
                    record the answer in a Ledger; `post_until_stored` sends
                    again what must be sent again until none is left.
    collect_pages   follow `next_cursor` through every page of a listing.
    outbox_problems what is wrong with the outbox's batches against the totals
                    of their buckets (revisions 1..n adding up to each).
    random_pulse    a pulse with an id, a random amount and a random moment of
                    a given day (`day_before`), for one of the given tenants.
    wait_until      poll a condition until it holds or a deadline passes.

Everything is trio-native (the suites run under pytest-trio) and speaks HTTP
with httpx.AsyncClient. The only waits are polls bounded by a deadline.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import itertools
import os
import random
import signal
import socket
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Context, Decimal, Inexact, Rounded
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal, TypeVar

import h11
import httpx
import msgspec
import trio

__all__ = [
    "Answer",
    "Attempt",
    "BucketKey",
    "Form",
    "Ledger",
    "Payload",
    "Sent",
    "ServerError",
    "ServerProcess",
    "Total",
    "check_bounds",
    "check_pulses_stored_once",
    "collect_pages",
    "day_before",
    "encode_body",
    "exact_sum",
    "exchange",
    "free_port",
    "outbox_problems",
    "post_until_stored",
    "random_pulse",
    "send_pulses",
    "totals_of",
    "wait_until",
]

T = TypeVar("T")
Answer = Literal["accepted", "duplicate", "conflict", "rejected", "no answer"]
Form = Literal["single", "array", "ndjson"]
BucketKey = tuple[str, str, str, str]  # (tenant_id, product_sku, use_unit, date)
Payload = Mapping[str, Any] | bytes  # bytes: a line sent as is (e.g. broken JSON)


class ServerError(AssertionError):
    """The server did not start, did not stop in time, or died; the message holds its output."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's pick for port 0)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class _PortTaken(Exception):
    pass


class ServerProcess:
    """One `python -m ingestor serve` child process on a data dir.

    `env` adds INGESTOR_* settings (the runner's own INGESTOR_* variables are
    not passed on, so a developer's shell cannot change a test). `config` is
    the text of a TOML settings file. The child's stdout and stderr go to a
    file beside the data dir, across restarts; `output` reads all of it and
    `output_of_run` only the current (or last) run's.

    Use it as `async with ServerProcess(...) as server:`; leaving the block
    kills a server that is still running.
    """

    # True: the server runs in a session (and process group) of its own, so
    # one signal to the group reaches it and every worker it starts.
    own_session = False

    def __init__(
        self,
        data_dir: Path,
        *,
        env: Mapping[str, str] | None = None,
        config: str | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        python: str = sys.executable,
        ready_timeout: float = 30.0,
        stop_timeout: float = 30.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self._port_given = port is not None
        self._env = dict(env or {})
        self._python = python
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.run_dir = self.data_dir.parent / f"{self.data_dir.name}.server"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.run_dir / "output.log"
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = self.run_dir / "config.toml"
            self.config_path.write_text(config)
        self._process: trio.Process | None = None
        self._run_offset = 0
        self.starts = 0
        self.exit_codes: list[int] = []

    # -- what a test reads ---------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def deliveries(self) -> Path:
        """Where the file sink writes: <data_dir>/deliveries/<date>/<batch_id>.json."""
        return self.data_dir / "deliveries"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def output(self) -> str:
        """Everything the server wrote to stdout and stderr, across restarts."""
        try:
            return self.log_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def stderr(self) -> str:
        """The captured stderr (stdout is captured with it); same as `output`."""
        return self.output

    def output_of_run(self) -> str:
        """What the current (or last) run wrote."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._run_offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 40) -> str:
        """The last lines of the current run's output, for failure messages."""
        text = self.output_of_run().rstrip("\n")
        return "\n".join(text.splitlines()[-lines:]) or "(no output)"

    def command(self) -> list[str]:
        cmd = [
            self._python,
            "-m",
            "ingestor",
            "serve",
            "--bind",
            f"{self.host}:{self.port}",
            "--data-dir",
            str(self.data_dir),
        ]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return cmd

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTOR_")}
        env.update(self._env)
        return env

    # -- life cycle ----------------------------------------------------------

    async def start(self) -> None:
        """Start the server and return once GET /readyz answers 200.

        Raises ServerError (with the server's output) if it exits first or is
        not ready within `ready_timeout`. A port taken between `free_port` and
        the bind is retried on another port, unless the port was given or
        this is a restart (clients hold the URL).
        """
        if self.running:
            raise RuntimeError(f"the server on {self.url} is already running")
        for attempt in itertools.count(1):
            await self._spawn()
            try:
                await self._wait_ready()
            except _PortTaken:
                if self._port_given or self.starts > 1 or attempt >= 3:
                    raise ServerError(
                        f"port {self.port} is taken; output:\n{self.tail()}"
                    ) from None
                self.port = free_port(self.host)
                self.starts -= 1
            else:
                return

    async def restart(self) -> None:
        """Stop the server if it runs (SIGTERM), then start it on the same data dir and port."""
        if self.running:
            await self.terminate()
        await self.start()

    async def kill(self) -> int:
        """SIGKILL the server and wait for it to be gone; return its exit code (-9)."""
        process = self._current()
        process.send_signal(signal.SIGKILL)
        with trio.move_on_after(self.stop_timeout):
            return self._exited(await process.wait())
        raise ServerError(f"pid {process.pid} still there {self.stop_timeout} s after SIGKILL")

    async def terminate(self, within: float | None = None) -> int:
        """SIGTERM the server and return its exit code once it has exited.

        If it has not exited `within` seconds (default `stop_timeout`) it is
        killed and ServerError is raised with its output: a drain that hangs
        is a defect, not something to wait out.
        """
        process = self._current()
        limit = self.stop_timeout if within is None else within
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(limit):
            return self._exited(await process.wait())
        await self.kill()
        raise ServerError(
            f"the server did not exit within {limit} s of SIGTERM and was killed;"
            f" output:\n{self.tail()}"
        )

    async def aclose(self) -> None:
        """Kill the server if it still runs. Safe to call more than once."""
        with trio.CancelScope(shield=True):
            if self.running:
                await self.kill()

    async def __aenter__(self) -> ServerProcess:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _current(self) -> trio.Process:
        if self._process is None:
            raise RuntimeError("the server was never started")
        return self._process

    def _exited(self, code: int) -> int:
        self.exit_codes.append(code)
        return code

    def _begin_run(self) -> BinaryIO:
        """Open the output file for a new run, marked with a header line."""
        self.starts += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed by _spawn
        log.write(f"--- run {self.starts}: {' '.join(self.command())}\n".encode())
        log.flush()
        self._run_offset = log.tell()
        return log

    async def _spawn(self) -> None:
        with self._begin_run() as log:
            self._process = await trio.lowlevel.open_process(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.environment(),
                cwd=self.run_dir,
                start_new_session=self.own_session,
            )

    async def _wait_ready(self) -> None:
        process = self._current()
        deadline = trio.current_time() + self.ready_timeout
        last = "no answer yet"
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                code = process.poll()
                if code is not None:
                    self._exited(code)
                    if "address already in use" in self.output_of_run().lower():
                        raise _PortTaken
                    raise ServerError(
                        f"the server exited with code {code} before it was ready;"
                        f" output:\n{self.tail()}"
                    )
                try:
                    response = await client.get(f"{self.url}/readyz")
                except httpx.TransportError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                else:
                    if response.status_code == 200:
                        return
                    last = f"{response.status_code} {response.text[:200]}"
                if trio.current_time() >= deadline:
                    await self.kill()
                    raise ServerError(
                        f"the server was not ready within {self.ready_timeout} s"
                        f" (last GET /readyz: {last}); output:\n{self.tail()}"
                    )
                await trio.sleep(0.02)


# -- the client side -----------------------------------------------------------


@dataclass(frozen=True)
class Total:
    """A bucket's expected (or reported) totals."""

    amount: Decimal
    count: int


@dataclass(eq=False)
class Attempt:
    """One pulse sent in one request, and what the server said about it.

    `sent_seq` and `answered_seq` come from one counter per ledger, so "sent
    before that answer arrived" is a comparison of two numbers.
    """

    payload: Payload
    form: Form
    sent_seq: int
    sent_at: dt.datetime
    answer: Answer | None = None
    status_code: int | None = None
    error: str | None = None
    answered_seq: int | None = None
    answered_at: dt.datetime | None = None

    @property
    def identity(self) -> tuple[str, str] | None:
        """(tenant_id, id) for a pulse with a client id, else None."""
        fields = _fields(self.payload)
        tenant, pulse_id = fields.get("tenant_id"), fields.get("id")
        if isinstance(tenant, str) and isinstance(pulse_id, str):
            return tenant, pulse_id
        return None

    @property
    def needs_retry(self) -> bool:
        """No answer, or an answer that says "not stored, try again" (503)."""
        return (
            self.answer == "no answer"
            or self.status_code == 503
            or (self.answer == "rejected" and (self.error or "").startswith("not stored"))
        )


# Decimal's default context keeps 28 digits and rounds silently; sums of 18+9 digit
# amounts need more. This one is wide enough and traps any rounding instead.
_EXACT = Context(prec=400, traps=[Inexact, Rounded])


def day_before(days: int) -> str:
    """The date `days` before today (UTC), ISO."""
    return (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=days)).isoformat()


def random_pulse(
    rng: random.Random, pulse_id: str, day: str, tenants: Sequence[str]
) -> dict[str, Any]:
    """A pulse with id `pulse_id` of one of `tenants`, at a random moment of `day`,
    with a random amount of up to 9 decimals."""
    midnight = dt.datetime.combine(dt.date.fromisoformat(day), dt.time(), dt.UTC)
    moment = midnight + dt.timedelta(microseconds=rng.randrange(86_400 * 10**6))
    return {
        "tenant_id": rng.choice(tenants),
        "product_sku": rng.choice(["sku1", "sku2"]),
        "use_unit": "api_call",
        "used_amount": f"{Decimal(rng.randint(1, 10**9)).scaleb(-rng.randint(0, 9)):f}",
        "timestamp": moment.isoformat(),
        "id": pulse_id,
    }


def outbox_problems(
    batches: Iterable[Mapping[str, Any]], expected: Mapping[BucketKey, Total]
) -> list[str]:
    """What is wrong with `batches` (as GET /batches/{id} shows them) against the
    buckets' totals `expected`: each bucket's records must be revisions 1..n,
    their deltas adding up to its total, the last one's total that total."""
    records: dict[BucketKey, list[Mapping[str, Any]]] = defaultdict(list)
    for batch in batches:
        for r in batch["records"]:
            records[(r["tenant_id"], r["product_sku"], r["use_unit"], batch["date"])].append(r)
    problems = []
    for key in sorted(records.keys() | expected.keys()):
        found = sorted(records.get(key, []), key=lambda r: int(r["revision"]))
        total = expected.get(key, Total(Decimal(0), 0))
        revisions = [int(r["revision"]) for r in found]
        delta = exact_sum(Decimal(r["used_amount"]) for r in found)
        count = sum(int(r["pulse_count"]) for r in found)
        if revisions != list(range(1, len(found) + 1)):
            problems.append(f"{key}: revisions {revisions}")
        if (delta, count) != (total.amount, total.count):
            problems.append(
                f"{key}: its batches carry {delta} in {count} pulses, the bucket holds"
                f" {total.amount} in {total.count}"
            )
        last = found[-1] if found else None
        if last and (Decimal(last["total_amount"]), int(last["total_count"])) != (
            total.amount,
            total.count,
        ):
            problems.append(f"{key}: the last revision's total is {last}")
    return problems


def exact_sum(values: Iterable[Decimal]) -> Decimal:
    """The exact sum of `values` (raises decimal.Inexact rather than round)."""
    total = Decimal(0)
    for value in values:
        total = _EXACT.add(total, value)
    return total


def _fields(payload: Payload) -> Mapping[str, Any]:
    return {} if isinstance(payload, bytes) else payload


def _amount(value: object) -> Decimal:
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, Decimal | int | str) and not isinstance(value, bool):
        return Decimal(value)
    raise TypeError(f"not an amount: {value!r}")


def _timestamp(value: object) -> dt.datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"not a timestamp: {value!r}")
    return dt.datetime.fromisoformat(value)


def _fingerprint(payload: Payload) -> tuple[object, ...]:
    """What the server compares to tell a replay from a conflicting reuse of an id."""
    fields = _fields(payload)
    return (
        fields.get("product_sku"),
        fields.get("use_unit"),
        _amount(fields.get("used_amount")),
        _timestamp(fields.get("timestamp")),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Ledger:
    """Every pulse clients sent, and the answer each got.

    Register a request with `sent` before it goes out and its answer with
    `answered` (or use `send_pulses`, which does both). From that alone:

    - `expected_totals()` is what GET /aggregates must show: each id-bearing
      pulse counted once if the server said `accepted`, or said `duplicate`
      to a retry (then an unanswered earlier attempt stored it); each pulse
      without an id counted if it was accepted.
    - `unresolved()` lists pulses whose fate is unknown (no answer and no
      later answer for the same id): totals cannot be exact until none is.
    - `problems()` lists answers that contradict each other: an id accepted
      twice, a `duplicate` for a pulse never sent before, a `conflict`
      although the stored payload is the same, a report whose counts do not
      match its items.

    Pulses without a timestamp are put in the billing day of the moment
    their answer arrived (the server stamps them between send and answer).
    """

    def __init__(self, zone: dt.tzinfo = dt.UTC) -> None:
        self.zone = zone
        self.attempts: list[Attempt] = []
        self._seq = itertools.count(1)
        self._problems: list[str] = []

    # -- recording -------------------------------------------------------------

    def sent(self, payloads: Sequence[Payload], form: Form) -> list[Attempt]:
        now = _now()
        attempts = [Attempt(p, form, next(self._seq), now) for p in payloads]
        self.attempts.extend(attempts)
        return attempts

    def answered(
        self,
        attempts: Sequence[Attempt],
        response: httpx.Response | None,
        error: str | None = None,
    ) -> None:
        """Record the answer to the request that carried `attempts` (None: no answer)."""
        seq, now = next(self._seq), _now()
        for attempt in attempts:
            attempt.answered_seq, attempt.answered_at = seq, now
        if response is None:
            for attempt in attempts:
                attempt.answer, attempt.error = "no answer", error
            return
        code = response.status_code
        for attempt in attempts:
            attempt.status_code = code
        if code == 202:
            self._read_report(attempts, response)
            return
        message = _error_message(response)
        single = len(attempts) == 1 and attempts[0].form == "single"
        answer: Answer
        if single and code == 409:
            answer = "conflict"
        elif 400 <= code < 500 or code == 503:
            answer = "rejected"  # nothing of the request was stored
        else:
            answer = "no answer"  # 500 and the like: stored or not, nobody knows
        for attempt in attempts:
            attempt.answer, attempt.error = answer, message

    def _read_report(self, attempts: Sequence[Attempt], response: httpx.Response) -> None:
        where = f"202 to request with pulses #{attempts[0].sent_seq}..#{attempts[-1].sent_seq}"
        try:
            report = response.json()
            items = {item["index"]: item for item in report["items"]}
        except (ValueError, KeyError, TypeError) as exc:
            self._problems.append(f"{where}: unreadable report {response.text[:300]!r}: {exc}")
            for attempt in attempts:
                attempt.answer = "no answer"
            return
        if len(items) != len(report["items"]) or not set(items) <= set(range(len(attempts))):
            self._problems.append(f"{where}: item indexes wrong: {report['items']}")
        for index, attempt in enumerate(attempts):
            item = items.get(index)
            if item is None:
                attempt.answer = "accepted"
                continue
            attempt.answer = item.get("status")
            attempt.error = item.get("error")
            if attempt.answer not in ("duplicate", "conflict", "rejected"):
                self._problems.append(f"{where}: item {index} has status {attempt.answer!r}")
        tally = Counter(a.answer for a in attempts)
        expected = {
            "accepted": tally["accepted"],
            "duplicates": tally["duplicate"],
            "rejected": tally["rejected"],
            "conflicts": tally["conflict"],
        }
        got = {key: report.get(key) for key in expected}
        if got != expected:
            self._problems.append(f"{where}: counts {got} do not match its items {expected}")

    # -- reading ---------------------------------------------------------------

    def by_identity(self) -> dict[tuple[str, str], list[Attempt]]:
        """The attempts of every client id, in the order they were sent."""
        found: dict[tuple[str, str], list[Attempt]] = defaultdict(list)
        for attempt in self.attempts:
            identity = attempt.identity
            if identity is not None:
                found[identity].append(attempt)
        return dict(found)

    def stored(self) -> list[Attempt]:
        """One attempt per pulse the server must hold (its payload is what was stored)."""
        held = [a for a in self.attempts if a.identity is None and a.answer == "accepted"]
        for attempts in self.by_identity().values():
            accepted = [a for a in attempts if a.answer == "accepted"]
            duplicates = [a for a in attempts if a.answer == "duplicate"]
            if accepted:
                held.append(accepted[0])
            elif duplicates:
                held.append(duplicates[0])
        return held

    def unresolved(self) -> list[Attempt]:
        """Attempts whose pulse may or may not be stored: retry them before comparing totals."""
        open_ = [
            a
            for a in self.attempts
            if a.identity is None and (a.answer is None or a.answer == "no answer")
        ]
        for attempts in self.by_identity().values():
            if any(a.answer in ("accepted", "duplicate") for a in attempts):
                continue
            open_.extend(a for a in attempts if a.answer is None or a.answer == "no answer")
        return open_

    def day_of(self, attempt: Attempt) -> str:
        moment = _timestamp(_fields(attempt.payload).get("timestamp"))
        if moment is None:
            moment = attempt.answered_at or attempt.sent_at
        return moment.astimezone(self.zone).date().isoformat()

    def bucket_of(self, attempt: Attempt) -> BucketKey:
        fields = _fields(attempt.payload)
        return (
            fields["tenant_id"],
            fields["product_sku"],
            fields["use_unit"],
            self.day_of(attempt),
        )

    def expected_totals(self) -> dict[BucketKey, Total]:
        """What GET /aggregates must report, from the answers alone (Decimal sums)."""
        amounts: dict[BucketKey, list[Decimal]] = defaultdict(list)
        for attempt in self.stored():
            amounts[self.bucket_of(attempt)].append(
                _amount(_fields(attempt.payload)["used_amount"])
            )
        return {key: Total(exact_sum(values), len(values)) for key, values in amounts.items()}

    def answers(self) -> Counter[Answer | None]:
        return Counter(a.answer for a in self.attempts)

    def problems(self) -> list[str]:
        """Answers that contradict each other or the contract; [] if all is consistent."""
        found = list(self._problems)
        for (tenant, pulse_id), attempts in self.by_identity().items():
            name = f"pulse {pulse_id!r} of tenant {tenant!r}"
            accepted = [a for a in attempts if a.answer == "accepted"]
            if len(accepted) > 1:
                found.append(
                    f"{name} was accepted {len(accepted)} times"
                    f" (attempts #{', #'.join(str(a.sent_seq) for a in accepted)}):"
                    " counted more than once"
                )
            for attempt in attempts:
                assert attempt.answered_seq is not None or attempt.answer is None
                if attempt.answer is None or attempt.answered_seq is None:
                    continue
                before = [
                    b for b in attempts if b is not attempt and b.sent_seq < attempt.answered_seq
                ]
                same = [
                    b for b in before if _fingerprint(b.payload) == _fingerprint(attempt.payload)
                ]
                stored_before = [
                    b
                    for b in attempts
                    if b.answer in ("accepted", "duplicate")
                    and b.answered_seq is not None
                    and b.answered_seq < attempt.sent_seq
                ]
                if attempt.answer == "duplicate" and not same:
                    found.append(
                        f"{name}: attempt #{attempt.sent_seq} was answered duplicate, but no"
                        " attempt with the same payload had been sent before"
                    )
                elif attempt.answer == "accepted" and stored_before:
                    found.append(
                        f"{name}: attempt #{attempt.sent_seq} was accepted although attempt"
                        f" #{stored_before[0].sent_seq} had already been stored"
                    )
                elif attempt.answer == "conflict":
                    if not [b for b in before if b not in same]:
                        found.append(
                            f"{name}: attempt #{attempt.sent_seq} was answered conflict, but no"
                            " attempt with another payload had been sent before"
                        )
                    if any(b in same for b in stored_before):
                        found.append(
                            f"{name}: attempt #{attempt.sent_seq} was answered conflict although"
                            " the same payload had been stored"
                        )
        return found


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code}: {response.text[:300]}"


# -- sending -------------------------------------------------------------------

_encode = msgspec.json.Encoder(decimal_format="number").encode


def encode_body(payloads: Sequence[Payload], form: Form) -> tuple[bytes, str]:
    """(body, Content-Type) of a POST /pulses carrying `payloads` in `form`.

    Decimal amounts become JSON numbers written exactly; strings stay strings.
    A bytes payload is put into the body as it is.
    """
    pieces = [p if isinstance(p, bytes) else _encode(p) for p in payloads]
    if form == "single":
        if len(pieces) != 1:
            raise ValueError(f"a single-object body carries one pulse, not {len(pieces)}")
        return pieces[0], "application/json"
    if form == "array":
        return b"[" + b",".join(pieces) + b"]", "application/json"
    return b"".join(piece + b"\n" for piece in pieces), "application/x-ndjson"


@dataclass
class Sent:
    """A POST /pulses as it went: the answer (None if there was none) and its attempts."""

    response: httpx.Response | None
    attempts: list[Attempt]
    error: str | None = None


async def send_pulses(
    client: httpx.AsyncClient,
    url: str,
    ledger: Ledger,
    payloads: Sequence[Payload],
    form: Form = "array",
) -> Sent:
    """POST `payloads` to `url`/pulses in `form`; record the attempts and the answer."""
    body, content_type = encode_body(payloads, form)
    attempts = ledger.sent(payloads, form)
    try:
        response = await client.post(
            f"{url}/pulses", content=body, headers={"Content-Type": content_type}
        )
    except httpx.TransportError as exc:
        error = f"{type(exc).__name__}: {exc}"
        ledger.answered(attempts, None, error)
        return Sent(None, attempts, error)
    ledger.answered(attempts, response)
    return Sent(response, attempts)


async def post_until_stored(
    http: httpx.AsyncClient,
    url: str,
    ledger: Ledger,
    payloads: Sequence[Payload],
    *,
    rounds: int = 200,
) -> None:
    """POST `payloads` (all with ids) as one array, sending again what must be
    sent again (503, no answer), at most `rounds` times, 50 ms apart."""
    left = list(payloads)
    for _ in range(rounds):
        sent = await send_pulses(http, url, ledger, left, "array")
        left = [a.payload for a in sent.attempts if a.needs_retry]
        if not left:
            return
        await trio.sleep(0.05)
    raise AssertionError(f"{len(left)} pulses never stored; last: {sent.error or sent.response}")


# -- reading listings ----------------------------------------------------------


async def collect_pages(
    client: httpx.AsyncClient,
    url: str,
    key: str,
    params: Mapping[str, str] | None = None,
    *,
    limit: int,
    max_pages: int = 10_000,
) -> list[dict[str, Any]]:
    """Every row of a paged listing (`key` is "aggregates", "pulses" or "batches").

    Fails if a page is not 200, holds more than `limit` rows, a page before
    the last is not full, or the cursor never ends.
    """
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    for page in range(1, max_pages + 1):
        query = {**(params or {}), "limit": str(limit)}
        if cursor is not None:
            query["cursor"] = cursor
        response = await client.get(url, params=query)
        assert response.status_code == 200, (
            f"GET {url} {query} (page {page}): {response.status_code} {response.text[:500]}"
        )
        body = response.json()
        found = body[key]
        cursor = body["next_cursor"]
        assert len(found) <= limit, f"GET {url} page {page}: {len(found)} rows > limit {limit}"
        if cursor is not None:
            assert len(found) == limit, (
                f"GET {url} page {page}: {len(found)} rows, not full (limit {limit}),"
                " yet a next_cursor"
            )
        rows.extend(found)
        if cursor is None:
            return rows
    raise AssertionError(f"GET {url}: still a next_cursor after {max_pages} pages")


async def check_pulses_stored_once(
    http: httpx.AsyncClient, server: ServerProcess, ledger: Ledger
) -> None:
    """GET /pulses lists each acknowledged id exactly once, and no other id."""
    expected: dict[tuple[str, str], set[str]] = defaultdict(set)
    for attempt in ledger.stored():
        assert attempt.identity is not None
        expected[attempt.identity[0], ledger.day_of(attempt)].add(attempt.identity[1])
    for (tenant, day), ids in sorted(expected.items()):
        listed = await collect_pages(
            http,
            f"{server.url}/pulses",
            "pulses",
            {"tenant_id": tenant, "date": day},
            limit=10_000,
        )
        counts = Counter(row["id"] for row in listed)
        assert [i for i, n in counts.items() if n > 1] == [], f"{tenant} {day}: stored twice"
        assert set(counts) == ids, f"{tenant} {day}: stored ids differ from acknowledged"


async def check_bounds(server: ServerProcess, ledger: Ledger) -> None:
    """Right after a restart, before any resend: every bucket holds at least what was
    acknowledged, and at most that plus the pulses whose answer was lost."""
    lower = ledger.expected_totals()
    maybe: dict[BucketKey, list[Decimal]] = defaultdict(list)
    seen: set[object] = set()
    for attempt in ledger.unresolved():
        key = attempt.identity or id(attempt.payload)  # a resend reuses its payload
        if key in seen:
            continue
        seen.add(key)
        assert not isinstance(attempt.payload, bytes)
        maybe[ledger.bucket_of(attempt)].append(_amount(attempt.payload["used_amount"]))
    async with httpx.AsyncClient(timeout=30.0) as http:
        rows = await collect_pages(http, f"{server.url}/aggregates", "aggregates", limit=1000)
    held = totals_of(rows)
    zero = Total(Decimal(0), 0)
    for key in lower.keys() | maybe.keys() | held.keys():
        low = lower.get(key, zero)
        extra = maybe.get(key, [])
        high = Total(exact_sum([low.amount, *extra]), low.count + len(extra))
        got = held.get(key, zero)
        where = ("acknowledged pulse lost, or one counted twice?", key, low, got, high)
        assert low.count <= got.count <= high.count, where
        assert low.amount <= got.amount <= high.amount, where


def totals_of(aggregates: Sequence[Mapping[str, Any]]) -> dict[BucketKey, Total]:
    """GET /aggregates rows as {bucket: Total}; fails on a bucket listed twice."""
    totals: dict[BucketKey, Total] = {}
    for row in aggregates:
        key = (row["tenant_id"], row["product_sku"], row["use_unit"], row["date"])
        assert key not in totals, f"bucket {key} listed twice by GET /aggregates"
        totals[key] = Total(Decimal(row["used_amount"]), row["pulse_count"])
    return totals


async def wait_until(
    condition: Callable[[], Awaitable[T]],
    *,
    within: float,
    what: str,
    interval: float = 0.05,
) -> T:
    """Poll `condition` until it returns something truthy; fail after `within` seconds."""
    deadline = trio.current_time() + within
    while True:
        value = await condition()
        if value:
            return value
        if trio.current_time() >= deadline:
            raise AssertionError(f"{what}: still not so after {within} s (last: {value!r})")
        await trio.sleep(interval)


async def read_request(
    stream: trio.abc.ReceiveStream, connection: h11.Connection
) -> tuple[dict[str, str], bytes] | None:
    """One HTTP/1.1 request read from `stream` by a server's `connection`: its
    headers (names in lower case) and its body; None once the client has gone.
    How the tests' stand-ins for a billing system read the http sink's POSTs."""
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            if not data:
                return None
            connection.receive_data(bytes(data))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body.extend(event.data)
        elif isinstance(event, h11.EndOfMessage) and request is not None:
            return {k.decode().lower(): v.decode() for k, v in request.headers}, bytes(body)
        else:  # the connection closed
            return None


def signed(secret: str, headers: Mapping[str, str], body: bytes) -> bool:
    """Whether `body` bears the http sink's signature with `secret`."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers.get("x-ingestor-signature", ""), f"sha256={digest}")


async def exchange(server: ServerProcess, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read one HTTP/1.1 answer (status, headers, body)."""
    stream = await trio.open_tcp_stream(server.host, server.port)
    async with stream:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                assert chunk, f"connection closed after {data!r}"
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
            while len(body) < int(headers.get("content-length", 0)):
                body += await stream.receive_some(65536)
    return int(status_line.split()[1]), headers, body
