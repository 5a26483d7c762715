"""The WHERE clauses both stores build from a query, in their driver's placeholder.

SQLite's driver marks parameters `?`, psycopg `%s`; the clauses are otherwise
the same, and so is the order they select in.
"""

from __future__ import annotations

import json
from typing import Any

from . import AggregateQuery, BatchQuery

__all__ = ["aggregate_filter", "batch_filter", "where"]


def where(clauses: list[str]) -> str:
    return f"WHERE {' AND '.join(clauses)}" if clauses else ""


def aggregate_filter(query: AggregateQuery, mark: str) -> tuple[list[str], list[Any]]:
    """Clauses and arguments selecting the buckets of `query` (limit not included)."""
    clauses: list[str] = []
    args: list[Any] = []
    for column, value in (
        ("tenant_id", query.tenant_id),
        ("product_sku", query.product_sku),
        ("use_unit", query.use_unit),
    ):
        if value is not None:
            clauses.append(f"{column} = {mark}")
            args.append(value)
    if query.tenants is not None:
        # One parameter, whatever the count: each driver caps the number of
        # parameters (SQLite at 32,766), and a key may list more tenants.
        if mark == "?":
            clauses.append("tenant_id IN (SELECT value FROM json_each(?))")
            args.append(json.dumps(query.tenants))
        else:
            clauses.append(f"tenant_id = ANY({mark})")
            args.append(list(query.tenants))
    if query.date_from is not None:
        clauses.append(f"day >= {mark}")
        args.append(query.date_from)
    if query.date_to is not None:
        clauses.append(f"day <= {mark}")
        args.append(query.date_to)
    if query.status == "open":
        clauses.append("pulse_count > committed_count")
    elif query.status == "committed":
        clauses.append("pulse_count = committed_count")
    if query.after is not None:
        clauses.append(f"(day, tenant_id, product_sku, use_unit) > ({', '.join([mark] * 4)})")
        args.extend(query.after)
    return clauses, args


def batch_filter(query: BatchQuery, mark: str) -> tuple[list[str], list[Any]]:
    """Clauses and arguments selecting the batches of `query` (limit not included)."""
    clauses: list[str] = []
    args: list[Any] = []
    if query.day is not None:
        clauses.append(f"day = {mark}")
        args.append(query.day)
    if query.status is not None:
        clauses.append(f"status = {mark}")
        args.append(query.status)
    if query.after is not None:
        clauses.append(f"(day, batch_id) > ({mark}, {mark})")
        args.extend(query.after)
    return clauses, args
