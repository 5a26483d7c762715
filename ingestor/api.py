"""The HTTP API (DESIGN.md §4) on quart-trio.

    request ─▶ edge.py (counts requests in flight, marks those over max_in_flight)
            ─▶ before: request id, 503 if over the limit, API key and role (auth.py)
            ─▶ handler: decode once, hand work to the shards or the store
            ─▶ after: X-Request-Id header, request metrics (metrics.py)

POST /pulses, the route whose cost per request matters, is answered by
hotpath.py on plain ASGI, with the same steps and the same errors.

The routes are those of the table in routes.py (rule, role, types), from
which /openapi.json is generated too; the read handlers live in reads.py.
Every error, ours or the framework's, is answered as {"error": {"code",
"message", "details"?}} by one table (`_ERRORS`), never as HTML or a stack
trace.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable

import msgspec
import trio
from quart import Quart, Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from . import __version__
from .auth import OPEN, Keyring, Principal, Unauthorized
from .edge import OVER_LIMIT, Edge, admit
from .errors import (
    Draining,
    IngestorError,
    Overloaded,
    RequestError,
    StoreBusy,
    StoreError,
    StoreFull,
    StoreOutcomeUnknown,
    out_of_resources,
)
from .hotpath import PulseRoute
from .intake import Intake, decode_pulses
from .logs import request_id
from .metrics import Metrics
from .model import (
    AggregatePage,
    BatchPage,
    BatchView,
    CommitRequest,
    CommitResult,
    ErrorBody,
    ErrorDetail,
    IngestItem,
    IngestReport,
    Pulse,
    PulsePage,
)
from .openapi import document
from .reads import list_aggregates, list_batches, list_pulses, read_batch
from .routes import NEEDS, OPERATIONS, CommitParams, Health, Readiness
from .runtime import Runtime
from .shard import Ingest, Replies, Reply, Shard, Written

__all__ = ["create_app", "ingest"]

log = logging.getLogger("ingestor.api")
_encode = msgspec.json.Encoder().encode
_JSON = "application/json"
_REQUEST_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._~:/+=@-]")
_REQUEST_ID_MAX = 128
# A new request id: 32 hex digits, as unique as a random one (the prefix is
# random per process) without a system call for each.
_REQUEST_ID_PREFIX = secrets.token_hex(12)
_request_numbers = itertools.count()


# -- errors ---------------------------------------------------------------

# (status, code, Retry-After seconds or None) for each error of ours.
_ERRORS: list[tuple[type[IngestorError], int, str, int | None]] = [
    (Overloaded, 503, "overloaded", 1),
    (Draining, 503, "draining", 5),
    (StoreFull, 503, "store_full", 10),
    (StoreBusy, 503, "store_busy", 1),
    (StoreOutcomeUnknown, 500, "outcome_unknown", None),
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


def error_parts(exc: Exception) -> tuple[int, bytes, list[tuple[str, str]]]:
    """(status, JSON body, extra headers) answering one of our errors; re-raise others."""

    def body(code: str, message: str, details: object = None) -> bytes:
        return _encode(ErrorBody(ErrorDetail(code, message, details)))

    if isinstance(exc, RequestError):
        extra = [("WWW-Authenticate", exc.challenge)] if isinstance(exc, Unauthorized) else []
        return exc.status, body(exc.code, exc.message, exc.details), extra
    if isinstance(exc, Overloaded):
        return 503, body("overloaded", str(exc)), [("Retry-After", str(exc.retry_after))]
    for kind, status, code, retry_after in _ERRORS:
        if isinstance(exc, kind):
            extra = [("Retry-After", str(retry_after))] if retry_after is not None else []
            return status, body(code, str(exc)), extra
    raise exc


def _for_error(exc: Exception) -> Response:
    status, body, extra = error_parts(exc)
    response = Response(body, status=status, content_type=_JSON)
    for name, value in extra:
        response.headers[name] = value
    return response


# -- the ingest path --------------------------------------------------------


def _indexes(intake: Intake, tenants: list[str]) -> list[int]:
    """Where the pulses of a partition, its `tenants`' in turn, are in the request."""
    return [index for tenant in tenants for index in intake.indexes(tenant)]


async def ingest(
    runtime: Runtime, body: bytes, content_type: str | None, principal: Principal = OPEN
) -> tuple[int, bytes]:
    """POST /pulses without the framework: (status, JSON body). Raises our errors."""
    if runtime.draining:
        raise Draining("the service is shutting down")
    await runtime.committer.fresh_horizon()
    intake = decode_pulses(
        body,
        content_type,
        runtime.rules,
        runtime.clock(),
        max_line_bytes=runtime.settings.max_line_bytes,
    )
    items = list(intake.items)
    forbidden: set[int] = set()
    # Each partition's tenants, and their pulses.
    by_partition: dict[int, tuple[list[str], list[Pulse]]] = {}
    partition_of = runtime.partition_of
    scoped = principal.tenants is not None
    for tenant, pulses in intake.tenants.items():
        if scoped and not principal.sees(tenant):
            indexes = intake.indexes(tenant)
            forbidden.update(indexes)
            reason = f"forbidden_tenant: this key may not write for tenant {tenant!r}"
            items.extend(
                IngestItem(index, "rejected", pulse.pulse_id if pulse.client_id else None, reason)
                for index, pulse in zip(indexes, pulses, strict=True)
            )
            continue
        partition = partition_of(tenant)
        part = by_partition.get(partition)
        if part is None:
            by_partition[partition] = ([tenant], pulses)  # the intake's list: it is ours
        else:
            part[0].append(tenant)
            part[1].extend(pulses)
    by_shard: dict[Shard, dict[int, list[Pulse]]] = {}
    for partition, (_, pulses) in by_partition.items():
        shard = runtime.shard_of[partition]
        by_shard.setdefault(shard, {})[partition] = pulses
    if not all(shard.has_room(len(writes)) for shard, writes in by_shard.items()):
        raise Overloaded("ingest queues are full; retry later")
    # No await between the check above and these sends: all or none is queued.
    replies: Replies[Written] = Replies()
    waiting: list[Reply[Written]] = []
    for shard, writes in by_shard.items():
        reply = replies.reply()
        shard.submit_nowait(Ingest(writes, reply, ids=intake.ids))
        waiting.append(reply)
    await replies.wait()
    written = {
        partition: outcomes for reply in waiting for partition, outcomes in reply.result().items()
    }

    accepted = duplicates = conflicts = 0
    failure: StoreError | None = None
    for partition, (tenants, pulses) in by_partition.items():
        outcomes = written[partition]
        if isinstance(outcomes, StoreError):
            # An unknown outcome stands whatever else failed: answered "not
            # stored, retry" (503), a request whose pulses in one partition
            # may be stored was sent again, and those without ids counted twice.
            if not isinstance(failure, StoreOutcomeUnknown):
                failure = outcomes
            # Either none of them is kept, or, if the store lost its connection
            # as it committed, they may be: a retry without ids may count twice.
            said = (
                "may be stored, retry only with ids"
                if isinstance(outcomes, StoreOutcomeUnknown)
                else "not stored, retry"
            )
            items.extend(
                IngestItem(
                    i,
                    "rejected",
                    p.pulse_id if p.client_id else None,
                    f"{said}: {outcomes}",
                )
                for i, p in zip(_indexes(intake, tenants), pulses, strict=True)
            )
            continue
        stored = outcomes.count("accepted")
        accepted += stored
        if stored == len(outcomes):
            continue
        located = zip(_indexes(intake, tenants), pulses, outcomes, strict=True)
        for index, pulse, outcome in located:
            if outcome != "accepted":
                duplicates += outcome == "duplicate"
                conflicts += outcome == "conflict"
                items.append(IngestItem(index, outcome, pulse.pulse_id))
    if failure is not None and accepted + duplicates + conflicts == 0:
        raise failure  # nothing is known stored: the whole request is its failure
    rejected = len(items) - duplicates - conflicts
    runtime.count_pulses(accepted, duplicates, conflicts, rejected)
    items.sort(key=lambda item: item.index)
    report = IngestReport(accepted, duplicates, rejected, items, conflicts)
    if intake.single and items:
        item = items[0]
        details = {"items": [msgspec.to_builtins(item)]}
        if item.index in forbidden:
            error = ErrorDetail("forbidden_tenant", item.error or "", details)
            return 403, _encode(ErrorBody(error))
        if item.status == "rejected":
            error = ErrorDetail("invalid_pulse", item.error or "", details)
            return 422, _encode(ErrorBody(error))
        if item.status == "conflict":
            message = f"id {item.id!r} was already used for a different pulse of this tenant"
            return 409, _encode(ErrorBody(ErrorDetail("conflict", message, details)))
    return 202, _encode(report)


# -- the app ----------------------------------------------------------------


def _request_id(given: str | None) -> str:
    """The client's X-Request-Id made safe for headers and logs, or a new one."""
    if given:
        cleaned = _REQUEST_ID_UNSAFE.sub("", given)[:_REQUEST_ID_MAX]
        if cleaned:
            return cleaned
    return f"{_REQUEST_ID_PREFIX}{next(_request_numbers):08x}"


def create_app(runtime: Runtime) -> Quart:
    settings = runtime.settings
    app = QuartTrio("ingestor", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["BODY_TIMEOUT"] = settings.body_timeout
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    # A path is routed as it is written. Merged, "//pulses" reached the
    # placeholder of the route the edge answers ("/pulses" alone is its key),
    # and "/batches//x" got werkzeug's HTML redirect.
    app.url_map.merge_slashes = False
    keyring = Keyring(settings.api_keys)
    edge = Edge(app.asgi_app, limit=settings.max_in_flight)
    app.asgi_app = edge  # type: ignore[method-assign]
    runtime.edge = edge
    metrics = runtime.metrics = Metrics(
        runtime, lambda: edge.in_flight, lambda: pulses.bytes_in_flight
    )
    pulses = edge.routes[("POST", "/pulses")] = PulseRoute(
        runtime,
        keyring,
        metrics,
        ingest=ingest,
        error_parts=error_parts,
        new_request_id=_request_id,
        limit=lambda: edge.limit,
    )
    openapi_body = _encode(
        document(
            OPERATIONS,
            title="billing-ingestor",
            version=__version__,
            description="Usage metering: pulses in, exact daily totals out, each billed once.",
        )
    )

    def ok(value: object, status: int = 200) -> Response:
        return Response(_encode(value), status=status, content_type=_JSON)

    def principal() -> Principal:
        found: Principal = g.principal
        return found

    @app.before_request
    async def begin() -> None:
        g.started = time.perf_counter()
        g.request_id = _request_id(request.headers.get("X-Request-Id"))
        g.request_id_token = request_id.set(g.request_id)
        admit(
            over_limit=bool(request.scope.get(OVER_LIMIT)),
            limit=edge.limit,
            header_bytes=sum(len(k) + len(v) for k, v in request.scope["headers"]),
            max_header_bytes=settings.max_header_bytes,
        )
        rule = request.url_rule
        if rule is None or request.endpoint is None:
            return  # routing failed: answered 404 or 405 below
        need = NEEDS.get(request.endpoint, "admin")  # a route not in the table: admins only
        if need == "public":
            g.principal = OPEN
            return
        headers = request.headers
        who = keyring.authenticate(
            headers.getlist("Authorization"), headers.getlist("Host"), headers.getlist("Origin")
        )
        keyring.require(who, need, f"{request.method} {rule.rule}")
        g.principal = who

    @app.after_request
    async def finish(response: Response) -> Response:
        response.headers["X-Request-Id"] = g.get("request_id") or _request_id(None)
        rule = request.url_rule
        started = g.get("started", time.perf_counter())
        metrics.observe(
            request.method,
            rule.rule if rule is not None else "unmatched",
            response.status_code,
            time.perf_counter() - started,
        )
        return response

    @app.teardown_request
    async def end(exc: BaseException | None) -> None:
        token = g.pop("request_id_token", None)
        if token is not None:
            request_id.reset(token)

    @app.errorhandler(IngestorError)
    async def ingestor_error(exc: IngestorError) -> Response:
        return _for_error(exc)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = _HTTP_CODES.get(status, "http_error")
        response = error_response(status, code, exc.description or exc.name)
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        overloaded = out_of_resources(exc)
        if overloaded is not None:  # no defect: answered 503, said in one line
            fields = {"path": request.path, "error": repr(exc)}
            log.warning("out of resources", extra={"fields": fields})
            return _for_error(overloaded)
        log.exception("unexpected error", extra={"fields": {"path": request.path}})
        return error_response(500, "internal", "internal error; see the server log")

    async def post_pulses() -> Response:
        raise AssertionError("POST /pulses is answered by hotpath.PulseRoute")

    async def get_pulses() -> Response:
        page: PulsePage = await list_pulses(runtime, principal(), request.args)
        return ok(page)

    async def get_aggregates() -> Response:
        page: AggregatePage = await list_aggregates(runtime, principal(), request.args)
        return ok(page)

    async def get_batches() -> Response:
        page: BatchPage = await list_batches(runtime, principal(), request.args)
        return ok(page)

    async def get_batch(batch_id: str) -> Response:
        return ok(await read_batch(runtime, principal(), batch_id))

    async def post_commit() -> Response:
        try:
            day = msgspec.convert(dict(request.args), CommitParams, strict=False).date
        except msgspec.ValidationError as exc:
            raise RequestError(422, "invalid_commit", f"query: {exc}") from None
        if day is None:
            body = await request.get_data(cache=False)
            assert isinstance(body, bytes)
            try:
                day = msgspec.json.decode(body, type=CommitRequest).date
            except (msgspec.MsgspecError, RecursionError) as exc:
                raise RequestError(
                    422, "invalid_commit", f'expected {{"date": "YYYY-MM-DD"}}: {exc}'
                ) from None
        today = max(
            runtime.committer.now().astimezone(zone).date() for zone in runtime.rules.zones()
        )
        if day > today:
            raise RequestError(422, "future_date", f"{day} has not begun yet; nothing to commit")
        if runtime.draining:
            raise Draining("the service is shutting down")
        batches = await runtime.committer.commit_day(day)
        return ok(CommitResult(day.isoformat(), batches))

    async def post_redeliver(batch_id: str) -> Response:
        def redeliver() -> tuple[BatchView | None, bool]:
            store = runtime.store
            batch = store.batch(batch_id)
            if batch is None or batch.status != "failed":
                return batch, False
            done = store.redeliver(batch_id, runtime.clock())
            return store.batch(batch_id), done

        batch, done = await trio.to_thread.run_sync(redeliver)
        if batch is None:
            raise RequestError(404, "not_found", f"no batch {batch_id!r}")
        if not done:
            raise RequestError(
                409,
                "not_failed",
                f"batch {batch_id!r} is {batch.status}; only a failed batch is redelivered",
            )
        runtime.deliverer.wake()
        log.info("redeliver", extra={"fields": {"batch_id": batch_id, "key": principal().label}})
        return ok(batch)

    async def healthz() -> Response:
        return ok(Health("ok"))

    async def readyz() -> Response:
        if runtime.draining:
            return error_response(503, "draining", "shutting down", retry_after=5)
        if not runtime.ready:
            return error_response(503, "starting", "starting up", retry_after=1)
        trouble = await trio.to_thread.run_sync(runtime.store.trouble)
        if trouble is not None:
            return error_response(503, "store_unavailable", trouble, retry_after=5)
        return ok(Readiness("ready", runtime.store.store_id))

    async def metrics_text() -> Response:
        body, content_type = await metrics.exposition(request.headers.get("Accept"))
        return Response(body, content_type=content_type)

    async def openapi() -> Response:
        return Response(openapi_body, content_type=_JSON)

    views: dict[str, Callable[..., Awaitable[Response]]] = {
        "post_pulses": post_pulses,
        "get_pulses": get_pulses,
        "get_aggregates": get_aggregates,
        "post_commit": post_commit,
        "get_batches": get_batches,
        "get_batch": get_batch,
        "post_redeliver": post_redeliver,
        "healthz": healthz,
        "readyz": readyz,
        "metrics": metrics_text,
        "openapi": openapi,
    }
    for op in OPERATIONS:
        app.add_url_rule(op.rule, op.name, views[op.name], methods=[op.method])
    return app
