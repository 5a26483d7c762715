"""The HTTP API (DESIGN.md §4) on quart-trio.

Handlers decode once at the edge into typed values, hand work to the shards
or the store, and encode the answer with msgspec. Every error, ours or the
framework's, is answered as {"error": {"code", "message", "details"?}} by one
table (`_ERRORS`), never as HTML or a stack trace.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
from collections import defaultdict
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import trio
from quart import Quart, Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .errors import (
    Draining,
    IngestorError,
    Overloaded,
    RequestError,
    StoreBusy,
    StoreError,
    StoreFull,
)
from .intake import decode_pulses
from .model import (
    AggregatePage,
    BatchPage,
    CommitRequest,
    CommitResult,
    ErrorBody,
    ErrorDetail,
    IngestItem,
    IngestReport,
    Name,
    Outcome,
    Pulse,
    PulsePage,
    Unit,
)
from .runtime import Runtime
from .shard import Ingest, Reply
from .store import AggregateQuery, BatchQuery, PulseQuery

__all__ = ["create_app", "ingest"]

log = logging.getLogger("ingestor.api")
_encode = msgspec.json.Encoder().encode
_JSON = "application/json"
S = TypeVar("S")

Limit = Annotated[int, msgspec.Meta(ge=1, le=10_000)]
BatchLimit = Annotated[int, msgspec.Meta(ge=1, le=1_000)]


class AggregateParams(
    msgspec.Struct, forbid_unknown_fields=True, rename={"date_from": "from", "date_to": "to"}
):
    tenant_id: Name | None = None
    product_sku: Name | None = None
    use_unit: Unit | None = None
    date_from: dt.date | None = None
    date_to: dt.date | None = None
    status: Literal["open", "committed", "all"] = "all"
    limit: Limit = 1000
    cursor: str | None = None


class PulseParams(msgspec.Struct, forbid_unknown_fields=True):
    tenant_id: Name
    date: dt.date
    product_sku: Name | None = None
    use_unit: Unit | None = None
    limit: Limit = 1000
    cursor: str | None = None


class BatchParams(msgspec.Struct, forbid_unknown_fields=True):
    date: dt.date | None = None
    status: Literal["pending", "delivered", "failed"] | None = None
    limit: BatchLimit = 100
    cursor: str | None = None


# -- errors ---------------------------------------------------------------

# (status, code, Retry-After seconds or None) for each error of ours.
_ERRORS: list[tuple[type[IngestorError], int, str, int | None]] = [
    (Overloaded, 503, "overloaded", 1),
    (Draining, 503, "draining", 5),
    (StoreFull, 503, "store_full", 10),
    (StoreBusy, 503, "store_busy", 1),
    (StoreError, 503, "store_unavailable", 5),
]
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "body_too_large",
    415: "unsupported_media_type",
    431: "headers_too_large",
}


def error_response(
    status: int, code: str, message: str, details: object = None, retry_after: int | None = None
) -> Response:
    body = _encode(ErrorBody(ErrorDetail(code, message, details)))
    response = Response(body, status=status, content_type=_JSON)
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def _for_error(exc: Exception) -> Response:
    if isinstance(exc, RequestError):
        return error_response(exc.status, exc.code, exc.message, exc.details)
    if isinstance(exc, Overloaded):
        return error_response(503, "overloaded", str(exc), retry_after=exc.retry_after)
    for kind, status, code, retry_after in _ERRORS:
        if isinstance(exc, kind):
            return error_response(status, code, str(exc), retry_after=retry_after)
    raise exc


def _params(kind: type[S], args: Any) -> S:
    try:
        return msgspec.convert(dict(args), kind, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        head, _, where = text.rpartition(" - at `$.")
        field = where.rstrip("`")
        message = f"{field}: {head}" if head else text
        raise RequestError(400, "invalid_parameter", message) from None


def _cursor_out(key: object) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(key)).decode().rstrip("=")


def _cursor_in(text: str | None, kind: type[S]) -> S | None:
    if text is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return msgspec.json.decode(raw, type=kind)
    except (ValueError, msgspec.MsgspecError):
        raise RequestError(
            400, "invalid_parameter", "cursor: not a cursor this API gave out"
        ) from None


# -- the ingest path --------------------------------------------------------


async def ingest(runtime: Runtime, body: bytes, content_type: str | None) -> tuple[int, bytes]:
    """POST /pulses without the framework: (status, JSON body). Raises our errors."""
    if runtime.draining:
        raise Draining("the service is shutting down")
    intake = decode_pulses(body, content_type, runtime.rules, runtime.clock())
    by_partition: dict[int, list[tuple[int, Pulse]]] = defaultdict(list)
    partition_of = runtime.partition_of
    for index, pulse in intake.pulses:
        by_partition[partition_of(pulse.tenant_id)].append((index, pulse))
    shards = runtime.shards
    if not all(shards[p].has_room() for p in by_partition):
        raise Overloaded("ingest queues are full; retry later")
    # No await between the check above and these sends: all or none is queued.
    waiting: list[tuple[list[tuple[int, Pulse]], Reply[list[Outcome]]]] = []
    for partition, part in by_partition.items():
        reply: Reply[list[Outcome]] = Reply()
        shards[partition].submit_nowait(Ingest([p for _, p in part], reply))
        waiting.append((part, reply))

    items = list(intake.items)
    accepted = duplicates = conflicts = 0
    failure: StoreError | None = None
    for part, reply in waiting:
        try:
            outcomes = await reply.receive()
        except StoreError as exc:
            failure = exc
            items.extend(
                IngestItem(i, "rejected", p.pulse_id if p.client_id else None,
                           f"not stored, retry: {exc}")
                for i, p in part
            )
            continue
        for (index, pulse), outcome in zip(part, outcomes, strict=True):
            if outcome == "accepted":
                accepted += 1
            else:
                duplicates += outcome == "duplicate"
                conflicts += outcome == "conflict"
                items.append(IngestItem(index, outcome, pulse.pulse_id))
    if failure is not None and accepted + duplicates + conflicts == 0:
        raise failure  # nothing was stored: the whole request is a 503
    rejected = len(items) - duplicates - conflicts
    runtime.count_pulses(accepted, duplicates, conflicts, rejected)
    items.sort(key=lambda item: item.index)
    report = IngestReport(accepted, duplicates, rejected, items, conflicts)
    if intake.single and items:
        item = items[0]
        if item.status == "rejected":
            details = {"items": [msgspec.to_builtins(item)]}
            error = ErrorDetail("invalid_pulse", item.error or "", details)
            return 422, _encode(ErrorBody(error))
        if item.status == "conflict":
            message = f"id {item.id!r} was already used for a different pulse of this tenant"
            details = {"items": [msgspec.to_builtins(item)]}
            return 409, _encode(ErrorBody(ErrorDetail("conflict", message, details)))
    return 202, _encode(report)


# -- the app ----------------------------------------------------------------


def create_app(runtime: Runtime) -> Quart:
    app = QuartTrio("ingestor")
    app.config["MAX_CONTENT_LENGTH"] = runtime.settings.max_body_bytes
    app.config["BODY_TIMEOUT"] = 30
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False

    def ok(value: object, status: int = 200) -> Response:
        return Response(_encode(value), status=status, content_type=_JSON)

    @app.errorhandler(IngestorError)
    async def ingestor_error(exc: IngestorError) -> Response:
        return _for_error(exc)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = _HTTP_CODES.get(status, "http_error")
        return error_response(status, code, exc.description or exc.name)

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        log.exception("unexpected error", extra={"fields": {"path": request.path}})
        return error_response(500, "internal", "internal error; see the server log")

    @app.post("/pulses")
    async def post_pulses() -> Response:
        body = await request.get_data(cache=False)
        assert isinstance(body, bytes)
        status, payload = await ingest(runtime, body, request.headers.get("Content-Type"))
        return Response(payload, status=status, content_type=_JSON)

    @app.get("/pulses")
    async def get_pulses() -> Response:
        params = _params(PulseParams, request.args)
        after = _cursor_in(params.cursor, int)
        query = PulseQuery(
            tenant_id=params.tenant_id, day=params.date.isoformat(),
            product_sku=params.product_sku, use_unit=params.use_unit,
            after=after, limit=params.limit + 1,
        )
        rows = await trio.to_thread.run_sync(runtime.store.pulses, query)
        more = len(rows) > params.limit
        rows = rows[: params.limit]
        cursor = _cursor_out(rows[-1][0]) if more else None
        return ok(PulsePage([pulse for _, pulse in rows], cursor))

    @app.get("/aggregates")
    async def get_aggregates() -> Response:
        params = _params(AggregateParams, request.args)
        after = _cursor_in(params.cursor, tuple[str, str, str, str])
        query = AggregateQuery(
            tenant_id=params.tenant_id, product_sku=params.product_sku,
            use_unit=params.use_unit,
            date_from=params.date_from.isoformat() if params.date_from else None,
            date_to=params.date_to.isoformat() if params.date_to else None,
            status=params.status, after=after, limit=params.limit + 1,
        )
        rows = await trio.to_thread.run_sync(runtime.store.aggregates, query)
        more = len(rows) > params.limit
        rows = rows[: params.limit]
        last = rows[-1] if rows else None
        cursor = (
            _cursor_out([last.date, last.tenant_id, last.product_sku, last.use_unit])
            if more and last
            else None
        )
        return ok(AggregatePage(rows, cursor))

    @app.post("/aggregates/commit")
    async def post_commit() -> Response:
        raw_date = request.args.get("date")
        if raw_date is None:
            body = await request.get_data(cache=False)
            assert isinstance(body, bytes)
            try:
                day = msgspec.json.decode(body, type=CommitRequest).date
            except msgspec.MsgspecError as exc:
                raise RequestError(
                    422, "invalid_commit", f'expected {{"date": "YYYY-MM-DD"}}: {exc}'
                ) from None
        else:
            try:
                day = dt.date.fromisoformat(raw_date)
            except ValueError:
                raise RequestError(422, "invalid_commit", "date: expected YYYY-MM-DD") from None
        today = max(
            runtime.committer.now().astimezone(zone).date() for zone in runtime.rules.zones()
        )
        if day > today:
            raise RequestError(422, "future_date", f"{day} has not begun yet; nothing to commit")
        if runtime.draining:
            raise Draining("the service is shutting down")
        batches = await runtime.committer.commit_day(day)
        return ok(CommitResult(day.isoformat(), batches))

    @app.get("/batches")
    async def get_batches() -> Response:
        params = _params(BatchParams, request.args)
        after = _cursor_in(params.cursor, tuple[str, str])
        query = BatchQuery(
            day=params.date.isoformat() if params.date else None,
            status=params.status, after=after, limit=params.limit + 1,
        )
        rows = await trio.to_thread.run_sync(runtime.store.batches, query)
        more = len(rows) > params.limit
        rows = rows[: params.limit]
        cursor = _cursor_out([rows[-1].date, rows[-1].batch_id]) if more else None
        return ok(BatchPage(rows, cursor))

    @app.get("/batches/<batch_id>")
    async def get_batch(batch_id: str) -> Response:
        batch = await trio.to_thread.run_sync(runtime.store.batch, batch_id)
        if batch is None:
            return error_response(404, "not_found", f"no batch {batch_id!r}")
        return ok(batch)

    @app.get("/healthz")
    async def healthz() -> Response:
        return ok({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        if runtime.draining:
            return error_response(503, "draining", "shutting down", retry_after=5)
        if not runtime.ready:
            return error_response(503, "starting", "starting up", retry_after=1)
        return ok({"status": "ready", "store_id": runtime.store.store_id})

    return app

