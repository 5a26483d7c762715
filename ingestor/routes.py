"""The route table: every operation of the HTTP API, in one place.

Each `Operation` names its rule, the role a key needs for it (auth.py), the
types it decodes (query Structs, request bodies) and the types it answers
with, error shapes included. api.py builds the app from this table and
openapi.py builds /openapi.json from it, so the two cannot disagree.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

import msgspec

from .model import (
    AggregatePage,
    BatchPage,
    BatchView,
    CommitRequest,
    CommitResult,
    ErrorBody,
    IngestReport,
    PulseIn,
    PulsePage,
)
from .openapi import Answer, Operation
from .reads import AggregateParams, BatchParams, PulseParams

__all__ = ["NEEDS", "OPERATIONS", "CommitParams", "Health", "Readiness"]

JSON = "application/json"
NDJSON = "application/x-ndjson"


class Health(msgspec.Struct):
    status: Literal["ok"]


class Readiness(msgspec.Struct):
    status: Literal["ready"]
    store_id: str


class CommitParams(msgspec.Struct, forbid_unknown_fields=True):
    """Query parameters of POST /aggregates/commit (the date may come in the body instead)."""

    date: dt.date | None = None


def _errors(need: str, *statuses: int) -> tuple[Answer, ...]:
    """The error answers of a route: its own, plus those every guarded route has."""
    meaning = {
        400: "The request is malformed (bad JSON, a bad query parameter).",
        401: "No API key, or one that is not configured.",
        403: "The key lacks the role, or names a tenant outside its scope.",
        404: "No such batch (or none this key may see).",
        408: "The body did not arrive within body_timeout.",
        409: "The batch is not in a state that allows this; or an id conflict.",
        413: "The body or the number of pulses is over the limit.",
        415: "The Content-Type is not JSON or NDJSON.",
        431: "The request headers are over max_header_bytes.",
        422: "The request is well-formed but not acceptable.",
        500: (
            "A defect: the server log has the details. Or outcome_unknown: the store"
            " lost its connection as it committed and could not say whether it had."
        ),
        503: "Overloaded, starting, draining, or the store is unavailable: retry later.",
    }
    statuses = (*statuses, 431)
    if need != "public":
        statuses = (*statuses, 401, 403, 503)
    headers = {401: ("WWW-Authenticate",), 503: ("Retry-After",)}
    return tuple(
        Answer(status, meaning[status], ErrorBody, headers=headers.get(status, ()))
        for status in sorted({*statuses, 500})
    )


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        method="POST",
        rule="/pulses",
        name="post_pulses",
        need="ingest",
        summary="Send usage pulses",
        description="One pulse object, a JSON array of them, or NDJSON (one per line)."
        " Every pulse gets a status; pulses of tenants outside the key's scope are"
        " rejected with `forbidden_tenant`. A single-object body that is rejected is 422"
        " (403 for another tenant's), a conflicting one 409.",
        body=((JSON, PulseIn | list[PulseIn]), (NDJSON, str)),
        answers=(
            Answer(202, "Every pulse was answered; the accepted ones are stored.", IngestReport),
            *_errors("ingest", 400, 408, 409, 413, 415, 422),
        ),
    ),
    Operation(
        method="GET",
        rule="/pulses",
        name="get_pulses",
        need="read",
        summary="The pulses behind a bucket (audit trail)",
        query=PulseParams,
        answers=(Answer(200, "A page of pulses.", PulsePage), *_errors("read", 400)),
    ),
    Operation(
        method="GET",
        rule="/aggregates",
        name="get_aggregates",
        need="read",
        summary="Running totals per bucket",
        query=AggregateParams,
        answers=(Answer(200, "A page of buckets.", AggregatePage), *_errors("read", 400)),
    ),
    Operation(
        method="POST",
        rule="/aggregates/commit",
        name="post_commit",
        need="admin",
        summary="Commit a billing day into outbox batches",
        description='The date comes as `?date=` or as the body {"date": "YYYY-MM-DD"}.',
        query=CommitParams,
        body=((JSON, CommitRequest),),
        body_required=False,
        answers=(
            Answer(200, "The batches made (none if all was committed).", CommitResult),
            *_errors("admin", 408, 413, 422),
        ),
    ),
    Operation(
        method="GET",
        rule="/batches",
        name="get_batches",
        need="read",
        summary="The outbox: batches and their delivery state",
        query=BatchParams,
        answers=(Answer(200, "A page of batches.", BatchPage), *_errors("read", 400)),
    ),
    Operation(
        method="GET",
        rule="/batches/<batch_id>",
        name="get_batch",
        need="read",
        summary="One batch with its records",
        answers=(Answer(200, "The batch.", BatchView), *_errors("read", 404)),
    ),
    Operation(
        method="POST",
        rule="/batches/<batch_id>/redeliver",
        name="post_redeliver",
        need="admin",
        summary="Deliver a failed batch again",
        description="Puts a `failed` batch back to `pending` and wakes the deliverer.",
        answers=(Answer(200, "The batch, pending again.", BatchView), *_errors("admin", 404, 409)),
    ),
    Operation(
        method="GET",
        rule="/healthz",
        name="healthz",
        need="public",
        summary="The process is alive",
        answers=(Answer(200, "Alive.", Health), *_errors("public")),
    ),
    Operation(
        method="GET",
        rule="/readyz",
        name="readyz",
        need="public",
        summary="The service takes requests",
        answers=(Answer(200, "Ready.", Readiness), *_errors("public", 503)),
    ),
    Operation(
        method="GET",
        rule="/metrics",
        name="metrics",
        need="public",
        summary="Prometheus metrics",
        answers=(
            Answer(
                200,
                "Prometheus text format, or OpenMetrics when the Accept header asks for it.",
                str,
                ("text/plain", "application/openmetrics-text"),
            ),
            *_errors("public"),
        ),
    ),
    Operation(
        method="GET",
        rule="/openapi.json",
        name="openapi",
        need="public",
        summary="This document",
        answers=(Answer(200, "OpenAPI 3.1.", dict[str, Any]), *_errors("public")),
    ),
)
NEEDS = {op.name: op.need for op in OPERATIONS}
