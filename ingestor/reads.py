"""The read side of the API: GET /aggregates, /pulses, /batches, /batches/{id}.

Each listing decodes its query string once into a Struct (the same Structs
describe the parameters in /openapi.json), reads the store in one worker
thread, and pages with an opaque cursor.

Tenant scope. A key scoped to tenants sees only those tenants:
- /aggregates without `tenant_id` reads each of its tenants and merges them
  in the listing's order (date, tenant, sku, unit), so paging is unchanged;
  naming another tenant is 403 `forbidden_tenant`. A page costs one store
  query per tenant of the key: meant for keys of a few tenants.
- /pulses names its tenant; another tenant is 403 `forbidden_tenant`.
- /batches: a batch holds one partition's day, records of many tenants. A
  scoped key sees the batches that carry usage of its tenants, each showing
  only those records, with `record_count` and `used_amount` summed over
  them; other batches do not exist for it (404). Finding them means opening
  each batch, so one page looks at no more than `SCAN_BUDGET` batches: a
  page may then be short, even empty, with a `next_cursor` to go on.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Mapping
from typing import Annotated, Literal, TypeVar

import msgspec
import trio

from .auth import Forbidden, Principal
from .errors import RequestError
from .model import AggregatePage, BatchPage, BatchRecord, BatchView, Name, PulsePage, Unit
from .money import format_nanos, parse_nanos
from .runtime import Runtime
from .store import AggregateQuery, BatchQuery, PulseQuery, Store

__all__ = [
    "SCAN_BUDGET",
    "AggregateParams",
    "BatchParams",
    "PulseParams",
    "list_aggregates",
    "list_batches",
    "list_pulses",
    "read_batch",
]

S = TypeVar("S")
_BATCH_ID_MAX = 256  # ours are about 40 characters
SCAN_BUDGET = 2_000  # batches one scoped /batches page may open
_SCAN_PAGE = 200

Limit = Annotated[int, msgspec.Meta(ge=1, le=10_000)]
BatchLimit = Annotated[int, msgspec.Meta(ge=1, le=1_000)]
# The longest a cursor this API gives out may be: an /aggregates key of names
# at their longest, each character four bytes of UTF-8 (or two, escaped),
# 1,303 bytes of JSON, is 1,738 characters of base64. At 1,024, a page
# ending on such a bucket gave out a cursor it then refused.
Cursor = Annotated[str, msgspec.Meta(max_length=2048)]
# What a cursor holds, checked as strictly as the parameters: a forged one
# is a 400, not a store's error (a 503 on PostgreSQL, retried for ever by a
# reconciler) nor an empty last page.
_AGGREGATE_KEY = msgspec.json.Decoder(tuple[dt.date, Name, Name, Unit])
_PULSE_KEY = msgspec.json.Decoder(Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)])
_BATCH_KEY = msgspec.json.Decoder(tuple[dt.date, Name])


class AggregateParams(
    msgspec.Struct, forbid_unknown_fields=True, rename={"date_from": "from", "date_to": "to"}
):
    """Query parameters of GET /aggregates."""

    tenant_id: Name | None = None
    product_sku: Name | None = None
    use_unit: Unit | None = None
    date_from: dt.date | None = None
    date_to: dt.date | None = None
    status: Literal["open", "committed", "all"] = "all"
    limit: Limit = 1000
    cursor: Cursor | None = None


class PulseParams(msgspec.Struct, forbid_unknown_fields=True):
    """Query parameters of GET /pulses."""

    tenant_id: Name
    date: dt.date
    product_sku: Name | None = None
    use_unit: Unit | None = None
    limit: Limit = 1000
    cursor: Cursor | None = None


class BatchParams(msgspec.Struct, forbid_unknown_fields=True):
    """Query parameters of GET /batches."""

    date: dt.date | None = None
    status: Literal["pending", "delivered", "failed"] | None = None
    limit: BatchLimit = 100
    cursor: Cursor | None = None


def _params(kind: type[S], args: Mapping[str, str]) -> S:
    # Quart's query string keeps every value of a repeated key, of which a
    # dict keeps the first: ?tenant_id=a&tenant_id=b would read a alone.
    values = getattr(args, "getlist", None)
    if values is not None:
        for key in args:
            if len(values(key)) > 1:
                raise RequestError(400, "invalid_parameter", f"{key}: given more than once")
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


def _cursor_in(text: str | None, key: msgspec.json.Decoder[S]) -> S | None:
    if text is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return key.decode(raw)
    except (ValueError, msgspec.MsgspecError):
        raise RequestError(
            400, "invalid_parameter", "cursor: not a cursor this API gave out"
        ) from None


def _own_tenant(principal: Principal, tenant: str) -> None:
    if not principal.sees(tenant):
        raise Forbidden(f"this key may not read tenant {tenant!r}", "forbidden_tenant")


# -- /aggregates ----------------------------------------------------------------


async def list_aggregates(
    runtime: Runtime, principal: Principal, args: Mapping[str, str]
) -> AggregatePage:
    params = _params(AggregateParams, args)
    key = _cursor_in(params.cursor, _AGGREGATE_KEY)
    after = None if key is None else (key[0].isoformat(), *key[1:])
    if params.tenant_id is not None:
        _own_tenant(principal, params.tenant_id)
    query = AggregateQuery(
        tenant_id=params.tenant_id,
        product_sku=params.product_sku,
        use_unit=params.use_unit,
        date_from=params.date_from.isoformat() if params.date_from else None,
        date_to=params.date_to.isoformat() if params.date_to else None,
        status=params.status,
        after=after,
        limit=params.limit + 1,
    )
    tenants = principal.tenants
    if params.tenant_id is None and tenants is not None:
        # One query for all of a key's tenants: a query a tenant, each of up
        # to a page, held a page a tenant (40 tenants, 6.3 MiB for a page of
        # 400 rows, against 0.3 for an admin key).
        if not tenants:
            return AggregatePage([], None)
        query = msgspec.structs.replace(query, tenants=tuple(sorted(tenants)))
    rows = await trio.to_thread.run_sync(runtime.store.aggregates, query)
    more = len(rows) > params.limit
    rows = rows[: params.limit]
    last = rows[-1] if rows else None
    cursor = (
        _cursor_out([last.date, last.tenant_id, last.product_sku, last.use_unit])
        if more and last
        else None
    )
    return AggregatePage(rows, cursor)


# -- /pulses --------------------------------------------------------------------


async def list_pulses(runtime: Runtime, principal: Principal, args: Mapping[str, str]) -> PulsePage:
    params = _params(PulseParams, args)
    _own_tenant(principal, params.tenant_id)
    after = _cursor_in(params.cursor, _PULSE_KEY)
    query = PulseQuery(
        tenant_id=params.tenant_id,
        day=params.date.isoformat(),
        product_sku=params.product_sku,
        use_unit=params.use_unit,
        after=after,
        limit=params.limit + 1,
    )
    rows = await trio.to_thread.run_sync(runtime.store.pulses, query)
    more = len(rows) > params.limit
    rows = rows[: params.limit]
    cursor = _cursor_out(rows[-1][0]) if more else None
    return PulsePage([pulse for _, pulse in rows], cursor)


# -- /batches -------------------------------------------------------------------


async def list_batches(
    runtime: Runtime, principal: Principal, args: Mapping[str, str]
) -> BatchPage:
    params = _params(BatchParams, args)
    key = _cursor_in(params.cursor, _BATCH_KEY)
    after = None if key is None else (key[0].isoformat(), key[1])
    query = BatchQuery(
        day=params.date.isoformat() if params.date else None,
        status=params.status,
        after=after,
        limit=params.limit + 1,
    )
    tenants = principal.tenants
    if tenants is not None:
        rows, last = await trio.to_thread.run_sync(
            _scoped_batches, runtime.store, query, tenants, params.limit
        )
        return BatchPage(rows, _cursor_out(list(last)) if last else None)
    rows = await trio.to_thread.run_sync(runtime.store.batches, query)
    more = len(rows) > params.limit
    rows = rows[: params.limit]
    cursor = _cursor_out([rows[-1].date, rows[-1].batch_id]) if more else None
    return BatchPage(rows, cursor)


async def read_batch(runtime: Runtime, principal: Principal, batch_id: str) -> BatchView:
    if not (batch_id.isprintable() and len(batch_id) <= _BATCH_ID_MAX):
        raise RequestError(404, "not_found", f"no batch {batch_id!r}")  # a store may refuse it
    batch = await trio.to_thread.run_sync(runtime.store.batch, batch_id)
    if batch is not None and principal.tenants is not None:
        batch = _restricted(batch, principal.tenants, keep_records=True)
    if batch is None:
        raise RequestError(404, "not_found", f"no batch {batch_id!r}")
    return batch


_HIDDEN_ERROR = "the last delivery failed (the sink's answer is shown to admin keys)"


def _restricted(
    batch: BatchView, tenants: frozenset[str], *, keep_records: bool
) -> BatchView | None:
    """`batch` as a key scoped to `tenants` sees it, or None if none of it is theirs."""
    mine: list[BatchRecord] = [r for r in batch.records or () if r.tenant_id in tenants]
    if not mine:
        return None
    total = sum(parse_nanos(r.used_amount) for r in mine)
    return msgspec.structs.replace(
        batch,
        record_count=len(mine),
        used_amount=format_nanos(total),
        records=mine if keep_records else None,
        # The sink's words are about the whole batch, every tenant's records:
        # a billing system naming the record it refused names another tenant.
        last_error=None if batch.last_error is None else _HIDDEN_ERROR,
    )


def _scoped_batches(
    store: Store, query: BatchQuery, tenants: frozenset[str], limit: int
) -> tuple[list[BatchView], tuple[str, str] | None]:
    """A page of the batches carrying usage of `tenants`, and the key to go on from.

    Blocks (runs in a worker thread). Opens at most SCAN_BUDGET batches.
    """
    found: list[BatchView] = []
    after = query.after
    scanned = 0
    while scanned < SCAN_BUDGET:
        page = store.batches(msgspec.structs.replace(query, after=after, limit=_SCAN_PAGE))
        for view in page:
            scanned += 1
            after = (view.date, view.batch_id)
            full = store.batch(view.batch_id)
            seen = _restricted(full, tenants, keep_records=False) if full else None
            if seen is not None:
                found.append(seen)
                if len(found) > limit:
                    last = found[limit - 1]
                    return found[:limit], (last.date, last.batch_id)
        if len(page) < _SCAN_PAGE:
            return found, None
    return found, after
