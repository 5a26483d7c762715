"""Decode and validate a POST /pulses body, once, at the edge.

Pure functions: bytes in, validated `Pulse` values and per-pulse reports out.
The fast path decodes the whole body in one typed msgspec call; only when that
fails validation is each pulse decoded alone, so every bad pulse gets its own
reason and the good ones are still stored.

Where a body cannot hide a control character, the types without patterns
decode it: `PulseInText` first, then, for whatever that does not take,
`PulseInPlain`, which decides as `PulseIn`, the documented schema, does.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from collections.abc import Callable, Container, Iterable, Sequence
from typing import Final, TypeVar

import msgspec

from .clock import epoch_us, moment
from .errors import RequestError
from .model import IngestItem, Pulse, PulseIn, PulseInPlain, PulseInText, assigned_id
from .money import KNOWN_NANOS, to_nanos

__all__ = ["Intake", "Rules", "decode_pulses"]

JSON = "application/json"
NDJSON = "application/x-ndjson"
_NDJSON_ALIASES = frozenset({NDJSON, "application/jsonl", "application/x-jsonlines"})
_SLOT_US: Final = 15 * 60 * 1_000_000  # today's UTC offsets, and their changes, fall on these
_NAMES_MAX: Final = 1 << 16  # tenant, SKU and unit names `_build` shares (see `Rules.names`)
# The ids releases before `model.assigned_id` gave pulses sent without one:
# srv-<12 hex, a process's><request, hex>-<index>, or srv-<12 hex> a pulse.
# Any store's id is 12 hex, and its own form has a dash after them.
_ASSIGNED_BEFORE: Final = re.compile(r"srv-(?:[0-9a-f]{13,}-[0-9]+|[0-9a-f]{12})\Z")

T = TypeVar("T")
U = TypeVar("U")
Decode = Callable[[bytes], T]

_one = msgspec.json.Decoder(PulseIn).decode
_many = msgspec.json.Decoder(list[PulseIn]).decode
_one_plain = msgspec.json.Decoder(PulseInPlain).decode
_many_plain = msgspec.json.Decoder(list[PulseInPlain]).decode
_one_text = msgspec.json.Decoder(PulseInText).decode
_many_text = msgspec.json.Decoder(list[PulseInText]).decode
Decoded = PulseIn | PulseInPlain | PulseInText
# The UTF-8 encodings of the C1 controls (U+0080..U+009F).
_C1_CONTROL = re.compile(rb"\xc2[\x80-\x9f]")
_raw_list = msgspec.json.Decoder(list[msgspec.Raw])
# Untyped decoding (Raw, object) recurses once per level of nesting; msgspec
# stops at the interpreter's recursion limit with a RecursionError. Invalid
# UTF-8 inside a string raises UnicodeDecodeError before msgspec 0.23, and
# a DecodeError since.
_TOO_DEEP = "nested too deeply (arrays or objects inside each other)"
# A body that is not a list of valid pulses is split into its elements (or
# lines) before they are counted against `max_batch`: one Raw, or one bytes
# line, is ~50 bytes, and 16 MiB of "1," would make 8 million of them, 450 MB
# and 1.6 s of the event loop. An array has at most its commas plus one
# elements, NDJSON at most its newlines plus one lines: past this many a
# pulse the body is refused uncounted, and what a request can make stays
# within `max_batch` times it. A valid pulse holds five or six separators.
_SEPARATORS_A_PULSE: Final = 32


class _IdOnly(msgspec.Struct):
    id: object = None


_id_only = msgspec.json.Decoder(_IdOnly)


class _TimestampOnly(msgspec.Struct):
    timestamp: object = None


_timestamp_only = msgspec.json.Decoder(_TimestampOnly)
# A fraction of a second that decoding rounds up to the next whole second:
# msgspec keeps six digits and rounds by the seventh, half up.
_ROUNDS_UP = re.compile(r"\.999999[5-9]")


class Rules:
    """What a pulse must satisfy, and how its billing day is found.

    Built once from the settings. `day_of` caches the billing day per zone and
    15-minute slot, which makes the day a dict lookup: today's offsets are
    whole quarter hours and change on a slot's boundary, so a slot has one
    date. Not every slot of the past: Newfoundland fell back at 00:01 local
    until 2011, and Liberia kept -00:44:30 until 1972. A slot whose first
    and last microsecond differ in offset or date is not cached: the day of
    each pulse in it is worked out alone. Only a late window reaching back
    to such a slot meets one.
    """

    def __init__(
        self,
        *,
        late_window_s: float,
        future_skew_s: float,
        max_batch: int,
        billing_timezone: str = "UTC",
        tenant_timezones: dict[str, str] | None = None,
        store_id: str | None = None,
    ) -> None:
        self.late_window_us = int(late_window_s * 1_000_000)
        self.future_skew_us = int(future_skew_s * 1_000_000)
        # The store's `purge_horizon`, kept up to date by the committer. Its
        # purges may be made with a shorter dedup window than this instance's
        # (another instance's, or this store's before a restart): a pulse
        # stamped before it, plus future_skew, may have been received before
        # it, its id gone, and a replay of it would count twice.
        self.horizon_us: int | None = None
        self.max_batch = max_batch
        # The ids the store names pulses sent without one by (`assigned_id`): a
        # client id among them named two pulses in GET /pulses, and a resend,
        # with the id the trail showed, of a pulse sent without one counted it
        # twice. None: no store, no such ids.
        self.assigned_prefix = None if store_id is None else assigned_id(store_id) + "-"
        self.default_zone = zoneinfo.ZoneInfo(billing_timezone)
        self.tenant_zones = {
            tenant: zoneinfo.ZoneInfo(zone) for tenant, zone in (tenant_timezones or {}).items()
        }
        # Per zone: the billing day of each 15-minute slot seen so far.
        self._days: dict[dt.tzinfo, dict[int, str]] = {}
        self._default_days = self._days_in(self.default_zone)
        self._tenant_days = {
            tenant: self._days_in(zone) for tenant, zone in self.tenant_zones.items()
        }
        # One str object per tenant, SKU and unit name seen (up to `_NAMES_MAX`):
        # msgspec makes a new one for each pulse. Shared, they stay in the
        # CPU's cache with their hash computed, where the store adds the
        # pulses to their buckets after the commit, long after the request
        # decoded them.
        self.names: dict[str, str] = {}

    def assigned(self, pulse_id: str) -> bool:
        """Whether `pulse_id` is of a form the store gives pulses sent without one
        (see `assigned_prefix`), or that releases before gave them, which the
        pulses they stored keep (`_ASSIGNED_BEFORE`)."""
        prefix = self.assigned_prefix
        return (prefix is not None and pulse_id.startswith(prefix)) or bool(
            _ASSIGNED_BEFORE.match(pulse_id)
        )

    def raise_horizon(self, before_us: int | None) -> None:
        """Purges may forget ids received before `before_us` (None: no purge was announced)."""
        if before_us is not None:
            known = self.horizon_us
            self.horizon_us = before_us if known is None else max(known, before_us)

    def _days_in(self, zone: dt.tzinfo) -> dict[int, str]:
        return self._days.setdefault(zone, {})

    def zone_of(self, tenant_id: str) -> dt.tzinfo:
        return self.tenant_zones.get(tenant_id, self.default_zone)

    def zones(self) -> set[dt.tzinfo]:
        return {self.default_zone, *self.tenant_zones.values()}

    def day_of(self, tenant_id: str, ts_us: int) -> str:
        days = self._tenant_days.get(tenant_id, self._default_days)
        slot = ts_us // _SLOT_US
        day = days.get(slot)
        if day is None:
            zone = self.zone_of(tenant_id)
            first = moment(slot * _SLOT_US).astimezone(zone)
            last = moment(slot * _SLOT_US + _SLOT_US - 1).astimezone(zone)
            if first.utcoffset() != last.utcoffset() or first.date() != last.date():
                return moment(ts_us).astimezone(zone).date().isoformat()
            if len(days) > 100_000:
                days.clear()
            day = days[slot] = first.date().isoformat()
        return day


class Intake(msgspec.Struct):
    """A decoded request: the valid pulses by tenant, and the reports.

    `tenants` maps each tenant to its valid pulses, in request order: the
    API routes a tenant's pulses to their partition, and checks a key's
    tenants, once per tenant, not per pulse. Where each pulse is in the
    request only a report needs, which most requests make none of:
    `indexes` finds it then, from the decoded pulses (`decoded`, at
    `positions` in the request, or at their own if None). Kept in a list a
    tenant beside the pulses, the indexes cost intake 0.05 µs a pulse of
    0.88 (`bench/stages.py`, 1,000-pulse arrays).
    """

    tenants: dict[str, list[Pulse]]
    items: list[IngestItem]
    total: int
    single: bool
    ids: bool  # whether a valid pulse has a client id: only then is there dedup
    decoded: Sequence[Decoded] = ()
    positions: Sequence[int] | None = None
    where: dict[str, list[int]] | None = None  # made by the first `indexes`

    def indexes(self, tenant: str) -> list[int]:
        """Where each of `tenant`'s valid pulses is in the request, in order."""
        if self.where is None:
            reported = {item.index for item in self.items}
            found: dict[str, list[int]] = {}
            located = zip(
                range(len(self.decoded)) if self.positions is None else self.positions,
                self.decoded,
                strict=True,
            )
            for index, p in located:
                if index not in reported:
                    found.setdefault(p.tenant_id, []).append(index)
            self.where = found
        return self.where.get(tenant, [])

    @property
    def pulses(self) -> list[tuple[int, Pulse]]:
        """Every valid pulse with its index, in request order."""
        pairs = [
            pair
            for tenant, pulses in self.tenants.items()
            for pair in zip(self.indexes(tenant), pulses, strict=True)
        ]
        return sorted(pairs, key=lambda pair: pair[0])


def _validation_message(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    head, sep, where = text.rpartition(" - at `$")
    if not sep:
        return text
    field = where.rstrip("`").lstrip(".")
    return f"{field}: {head}" if field else head


def _item_id(raw: bytes) -> str | None:
    try:
        found = _id_only.decode(raw).id
    except (msgspec.MsgspecError, RecursionError, UnicodeDecodeError):
        return None
    return found if isinstance(found, str) else None


def _rounded_up(body: bytes, raws: Callable[[], Sequence[bytes]]) -> Callable[[], set[int]]:
    """Where (by index in the request, `raws` giving each pulse's bytes) the text
    of a timestamp is one that decoding rounded up to the next second: asked
    by `_build` for a pulse whose timestamp is a whole second.

    RFC 3339 takes any number of digits past the second, and Go's clients
    write nine; a pulse keeps six. Rounded, "23:59:59.9999999" is midnight,
    the next billing day; `_build` cuts it to the microsecond before, so a
    timestamp stays in the second, so the day, its client wrote. Only a body
    holding ".999999", or a backslash escape that could hide it, has one.
    """

    def found() -> set[int]:
        if b".999999" not in body and b"\\" not in body:
            return set()
        return {index for index, raw in enumerate(raws()) if _rounds_up(raw)}

    return found


def _rounds_up(raw: bytes) -> bool:
    try:
        text = _timestamp_only.decode(raw).timestamp
    except (msgspec.MsgspecError, RecursionError, UnicodeDecodeError):
        return False  # not a pulse: reported as such
    return isinstance(text, str) and _ROUNDS_UP.search(text) is not None


def _build(
    decoded: Sequence[Decoded],
    rules: Rules,
    now_us: int,
    *,
    single: bool,
    total: int,
    positions: Sequence[int] | None = None,
    rejected: Iterable[IngestItem] = (),
    rounded: Callable[[], Container[int]] = frozenset,
) -> Intake:
    """Turn decoded pulses, at `positions` in the request (at their own if None),
    into `Pulse` values; the reports of those that are not valid join `rejected`,
    those of the request's `total` pulses that did not decode. `rounded` says
    which timestamps decoding rounded up to a whole second (`_rounded_up`).

    One loop, with nothing per pulse that a request can do once: this is
    the request path's one Python loop over every pulse.
    """
    tenants: dict[str, list[Pulse]] = {}
    items = list(rejected)
    late = now_us - rules.late_window_us
    horizon = rules.horizon_us
    oldest = late if horizon is None else max(late, horizon + rules.future_skew_us)
    newest = now_us + rules.future_skew_us
    today: dict[str, str] = {}  # a tenant's billing day now: that of pulses without a timestamp
    if len(rules.names) > _NAMES_MAX:
        rules.names.clear()
    name = rules.names.setdefault
    known_nanos = KNOWN_NANOS.get
    raw = msgspec.Raw
    ids = False
    up: Container[int] | None = None  # `rounded()`, once a whole second asks
    located = enumerate(decoded) if positions is None else zip(positions, decoded, strict=True)
    for index, p in located:
        tenant = name(p.tenant_id, p.tenant_id)
        try:
            amount = p.used_amount
            nanos = None if isinstance(amount, raw) else known_nanos(amount)
            if nanos is None:
                nanos = to_nanos(amount)
            if p.timestamp is None:
                ts = now_us
                given = False
                day = today.get(tenant)
                if day is None:
                    day = today[tenant] = rules.day_of(tenant, now_us)
            else:
                ts = epoch_us(p.timestamp)
                given = True
                if not ts % 1_000_000:
                    if up is None:
                        up = rounded()
                    if up and index in up:
                        ts -= 1
                if ts < oldest:
                    if ts < late:
                        raise ValueError("timestamp is older than the late window")
                    raise ValueError(
                        "timestamp is older than the pulses this store still knows"
                        " (a purge with a shorter dedup_window forgot their ids)"
                    )
                if ts > newest:
                    raise ValueError("timestamp is in the future")
                day = rules.day_of(tenant, ts)
        except ValueError as exc:
            items.append(IngestItem(index, "rejected", p.id, str(exc)))
            continue
        sku = name(p.product_sku, p.product_sku)
        unit = name(p.use_unit, p.use_unit)
        if p.id is None:  # its store names it (`assigned_id`)
            pulse = Pulse(tenant, sku, unit, nanos, "", False, ts, day, b"")
        elif p.id.startswith("srv-") and rules.assigned(p.id):
            reason = (
                "id: of the form this store gives pulses sent without an id"
                f" ({rules.assigned_prefix or 'srv-<store id>-'}...); a pulse that has"
                " one of them is stored already"
            )
            items.append(IngestItem(index, "rejected", p.id, reason))
            continue
        else:
            # No digest of the payload: a replay is compared with the pulse
            # itself, only when its id is found (`model.same_payload`).
            ids = True
            pulse = Pulse(tenant, sku, unit, nanos, p.id, True, ts, day, b"", given)
        group = tenants.get(tenant)
        if group is None:
            tenants[tenant] = [pulse]
        else:
            group.append(pulse)
    items.sort(key=lambda item: item.index)  # both kinds of report, in request order
    return Intake(tenants, items, total, single, ids, decoded, positions)


def _may_hide_controls(body: bytes) -> bool:
    """Whether a string in `body` could hold a control character (see PulseInPlain)."""
    if b"\\" in body or b"\x7f" in body:
        return True
    # Each `in` is a memchr; the regex runs only if a C1 lead byte appears.
    return b"\xc2" in body and _C1_CONTROL.search(body) is not None


def _text_first(text: Decode[T], plain: Decode[U]) -> Decode[T | U]:
    """`text`, or where it raises, `plain`, whose answer or error stands."""

    def decode(raw: bytes) -> T | U:
        try:
            return text(raw)
        except (msgspec.MsgspecError, UnicodeDecodeError):
            return plain(raw)

    return decode


_one_fast = _text_first(_one_text, _one_plain)
_many_fast = _text_first(_many_text, _many_plain)


def _one_by_one(
    raws: Sequence[bytes], decode: Decode[Decoded], max_line: int | None = None
) -> tuple[list[int], list[Decoded], list[IngestItem]]:
    """Each of `raws` decoded alone: the indexes of those that decode, their
    pulses, and the reports of those that do not."""
    positions: list[int] = []
    decoded: list[Decoded] = []
    rejected: list[IngestItem] = []
    for index, raw in enumerate(raws):
        if max_line is not None and len(raw) > max_line:
            reason = f"line longer than {max_line} bytes (max_line_bytes)"
            rejected.append(IngestItem(index, "rejected", None, reason))
            continue
        try:
            decoded.append(decode(raw))
            positions.append(index)
            continue
        except msgspec.ValidationError as exc:
            reason = _validation_message(exc)
        except (msgspec.DecodeError, UnicodeDecodeError):
            reason = "not valid JSON"
        except RecursionError:
            reason = _TOO_DEEP
        rejected.append(IngestItem(index, "rejected", _item_id(raw), reason))
    return positions, decoded, rejected


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


_CHARSET = re.compile(r";\s*charset\s*=\s*\"?([^\";\s]*)", re.IGNORECASE)
_UTF8 = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})


def _require_utf8(content_type: str | None) -> None:
    """JSON is UTF-8 (RFC 8259): a body declared in another charset would be
    misread (Latin-1 "tÃ©" as UTF-8 "té", a tenant its client never named)."""
    found = _CHARSET.search(content_type or "")
    if found is not None and found[1].lower() not in _UTF8:
        raise RequestError(
            415, "unsupported_media_type", f"the body must be UTF-8, not charset={found[1]}"
        )


def decode_pulses(
    body: bytes,
    content_type: str | None,
    rules: Rules,
    now_us: int,
    *,
    max_line_bytes: int | None = None,
) -> Intake:
    """Decode a POST /pulses body. Raises RequestError for a whole-body problem.

    `max_line_bytes` bounds each NDJSON line; a longer line is rejected alone.
    """
    kind = media_type(content_type)
    if ";" in (content_type or ""):
        _require_utf8(content_type)
    if kind in _NDJSON_ALIASES:
        return _decode_ndjson(body, rules, now_us, max_line_bytes)
    if kind != JSON and not kind.endswith("+json"):
        raise RequestError(
            415,
            "unsupported_media_type",
            f"Content-Type must be {JSON} or {NDJSON}, got {kind or 'none'}",
        )
    strict = _may_hide_controls(body)
    one: Decode[Decoded] = _one if strict else _one_fast
    start = body.lstrip()[:1]
    if start == b"{":
        try:
            return _build(
                [one(body)],
                rules,
                now_us,
                single=True,
                total=1,
                rounded=_rounded_up(body, lambda: [body]),
            )
        except msgspec.ValidationError as exc:
            # Typed decoding stops at the first bad field; the body may also
            # be broken JSON further on, which is a 400, not a bad pulse.
            _require_json(body)
            report = IngestItem(0, "rejected", _item_id(body), _validation_message(exc))
            return _build((), rules, now_us, single=True, total=1, rejected=[report])
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise RequestError(400, "invalid_json", f"body is not valid JSON: {exc}") from None
        except RecursionError:  # an amount is read as a Raw, whatever it holds
            raise RequestError(400, "invalid_json", f"body is {_TOO_DEEP}") from None
    if start != b"[":
        raise RequestError(
            400, "invalid_json", "body must be a JSON object, a JSON array, or NDJSON"
        )
    many: Sequence[Decoded]
    try:
        many = (_many if strict else _many_fast)(body)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        # Each element is decoded alone below, to say which one is bad. A
        # DecodeError may be one element's (invalid UTF-8 in a string is one
        # since msgspec 0.23): the list of raw elements tells whether the
        # body as a whole is JSON.
        pass
    else:
        _limit(len(many), rules)
        return _build(
            many,
            rules,
            now_us,
            single=False,
            total=len(many),
            rounded=_rounded_up(body, lambda: _raw_list.decode(body)),
        )
    _bound(body, b",", "commas", rules)
    try:
        raws = _raw_list.decode(body)
    except msgspec.MsgspecError as exc:
        raise RequestError(400, "invalid_json", f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError(400, "invalid_json", f"body is {_TOO_DEEP}") from None
    _limit(len(raws), rules)
    positions, decoded, rejected = _one_by_one(raws, one)
    return _build(
        decoded,
        rules,
        now_us,
        single=False,
        total=len(raws),
        positions=positions,
        rejected=rejected,
        rounded=_rounded_up(body, lambda: raws),
    )


def _decode_ndjson(body: bytes, rules: Rules, now_us: int, max_line: int | None) -> Intake:
    # Each line is decoded alone: joining lines into one array would let a
    # line holding two values make up for two broken half-lines. Lines end
    # at "\n" alone: a "\r" is JSON's whitespace inside a line, and split
    # there (bytes.splitlines), one pulse became two broken ones and every
    # later index moved. The non-blank lines are kept: bytes.strip strips
    # JSON's whitespace, and also \x0b and \x0c, which a line holding only
    # them is reported for.
    _bound(body, b"\n", "lines", rules)
    lines = body.split(b"\n")
    if b"\x0b" in body or b"\x0c" in body:
        lines = [line for line in lines if line.strip(b" \t\r")]
    else:
        lines = list(filter(bytes.strip, lines))
    _limit(len(lines), rules)
    strict = _may_hide_controls(body)
    rounded = _rounded_up(body, lambda: lines)
    if max_line is None or max(map(len, lines), default=0) <= max_line:
        # Where every line decodes, in one loop in C, each type in turn as
        # `_text_first` tries them: a Python loop over the lines
        # (`_one_by_one`) cost 0.2 µs a pulse more than an array's body.
        decoders: tuple[Decode[Decoded], ...] = (_one,) if strict else (_one_text, _one_plain)
        for decode in decoders:
            try:
                many = list(map(decode, lines))
            except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
                continue
            return _build(many, rules, now_us, single=False, total=len(many), rounded=rounded)
    # Which lines, and why: each is decoded alone.
    one = _one if strict else _one_fast
    positions, decoded, rejected = _one_by_one(lines, one, max_line)
    return _build(
        decoded,
        rules,
        now_us,
        single=False,
        total=len(lines),
        positions=positions,
        rejected=rejected,
        rounded=rounded,
    )


def _require_json(body: bytes) -> None:
    # As a Raw: checked whole, nothing built (a body's every value, built,
    # could take 25 times its size). A Raw's strings are not checked for UTF-8.
    try:
        msgspec.json.decode(body, type=msgspec.Raw)
        if not body.isascii():
            body.decode()
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, "invalid_json", f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError(400, "invalid_json", f"body is {_TOO_DEEP}") from None


def _bound(body: bytes, separator: bytes, what: str, rules: Rules) -> None:
    """Refuse a body with too many separators to be split (see _SEPARATORS_A_PULSE).

    Counting costs 0.5 ns a byte: a body too short to hold that many is not counted.
    """
    limit = _SEPARATORS_A_PULSE * rules.max_batch
    if len(body) > limit and (count := body.count(separator)) > limit:
        raise RequestError(
            413,
            "too_many_pulses",
            f"a request may carry at most {rules.max_batch} pulses; this body has"
            f" {count} {what}, too many to read pulse by pulse",
        )


def _limit(count: int, rules: Rules) -> None:
    if count > rules.max_batch:
        raise RequestError(
            413,
            "too_many_pulses",
            f"a request may carry at most {rules.max_batch} pulses, this one has {count}",
        )
