"""Stores of earlier schema versions opened by this version.

Each file is made by writing with this version and turning it back into
one of the earlier version. Version 2: every log row re-encoded as version
2 wrote it (a JSON array of `Pulse` arrays, no head byte), each span a
`pulse_days` row per log row it lists instead, an index of `pulse_ids` by
log row, and version 2's numbers. Version 3: the digest of each client
id's payload with it (`as_version_3`).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec
import pytest

import ingestor.store.sqlite as sqlite_store
from ingestor.errors import StoreMismatch
from ingestor.model import Pulse, encode_pulses, payload_digest
from ingestor.money import format_nanos
from ingestor.store import AggregateQuery, PulseQuery
from ingestor.store.sqlite import SQLiteStore
from tests.test_sqlite_dedup import DAY, listed


def pulse(tenant: str, amount: int, pulse_id: str = "") -> Pulse:
    fingerprint = b"fp%d" % amount if pulse_id else b""
    return Pulse(tenant, "sku", "unit", amount, pulse_id, bool(pulse_id), 5, DAY, fingerprint)


def open_store(directory: Path, worker: tuple[int, int] = (0, 1)) -> SQLiteStore:
    return SQLiteStore.open(
        directory, partitions=2, durability="fsync", busy_timeout=5, worker=worker
    )


def totals(store: SQLiteStore) -> dict[str, tuple[str, int]]:
    return {
        a.tenant_id: (a.used_amount, a.pulse_count)
        for a in store.aggregates(AggregateQuery(limit=100))
    }


def spans_as_days(conn: sqlite3.Connection) -> None:
    """In the open transaction: the spans as the `pulse_days` rows, a (tenant, day,
    log row) each, that schema 2 kept, with both its indexes by log row."""
    spans = conn.execute("SELECT tenant_id, day, seqs FROM pulse_spans").fetchall()
    assert spans
    conn.execute(
        "CREATE TABLE pulse_days (tenant_id TEXT NOT NULL, day TEXT NOT NULL,"
        " seq INTEGER NOT NULL, PRIMARY KEY (tenant_id, day, seq)) STRICT, WITHOUT ROWID"
    )
    conn.execute("CREATE INDEX pulse_days_by_seq ON pulse_days (seq)")
    conn.execute("CREATE INDEX pulse_ids_by_seq ON pulse_ids (seq)")
    conn.executemany(
        "INSERT INTO pulse_days (tenant_id, day, seq) VALUES (?, ?, ?)",
        [
            (tenant, day, seq)
            for tenant, day, seqs in spans
            for seq in sqlite_store._unpack_seqs(seqs)
        ],
    )
    conn.execute("DROP TABLE pulse_spans")


def as_version_2(path: Path) -> int:
    """Turn the store file at `path` into one version 2 wrote; the log rows it has."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        rows = conn.execute("SELECT seq, body FROM pulse_log").fetchall()
        for seq, body in rows:
            assert body[:1] in (b"\x00", b"\x01")
            old = msgspec.json.encode(sqlite_store._decode_pulses(body))
            conn.execute("UPDATE pulse_log SET body = ? WHERE seq = ?", (old, seq))
        spans_as_days(conn)
        conn.execute("ALTER TABLE pulse_log DROP COLUMN ids")
        conn.execute("PRAGMA user_version = 2")
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
        conn.execute("COMMIT")
    finally:
        conn.close()
    return len(rows)


def schema(path: Path) -> tuple[int, str, list[bytes]]:
    conn = sqlite3.connect(path)
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        (meta,) = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        heads = [body[:1] for (body,) in conn.execute("SELECT body FROM pulse_log ORDER BY seq")]
    finally:
        conn.close()
    return version, meta, heads


@pytest.mark.parametrize("workers", [1, 2])
def test_a_version_2_store_is_read_whole_and_upgraded(tmp_path: Path, workers: int) -> None:
    directory = tmp_path / "store"
    store = open_store(directory)
    tenants = ["alpha", "beta", "gamma", "delta"]  # over both partitions
    for i, tenant in enumerate(tenants):
        partition = sqlite_store.partition_of(tenant, 2)
        store.write_pulses(partition, [pulse(tenant, 10 + i, f"id-{i}"), pulse(tenant, 100)], 7)
    written = totals(store)  # folds what is logged so far into buckets
    for tenant in tenants:  # and a tail that is not folded
        partition = sqlite_store.partition_of(tenant, 2)
        store.write_pulses(partition, [pulse(tenant, 1000)], 7)
    store.close()
    assert {t: count for t, (_, count) in written.items()} == dict.fromkeys(tenants, 2)
    path = directory / "store.sqlite"
    assert as_version_2(path) == 2 * len(tenants)
    assert schema(path)[:2] == (2, "2")

    opened = [open_store(directory, (index, workers)) for index in range(workers)]
    try:
        assert schema(path)[:2] == (4, "4")
        for store in opened:
            assert totals(store) == {
                tenant: (format_nanos(10 + i + 100 + 1000), 3) for i, tenant in enumerate(tenants)
            }
        first, last = opened[0], opened[-1]
        assert totals(last) == totals(first)  # the tail, folded after the upgrade
        # The ids of the JSON rows: the same payload again is a duplicate,
        # another one a conflict, from either worker.
        alpha = sqlite_store.partition_of("alpha", 2)
        assert first.write_pulses(alpha, [pulse("alpha", 10, "id-0")], 9) == ["duplicate"]
        assert last.write_pulses(alpha, [pulse("alpha", 11, "id-0")], 9) == ["conflict"]
        assert last.write_pulses(alpha, [pulse("alpha", 7, "id-new")], 9) == ["accepted"]
        listed = first.pulses(PulseQuery(tenant_id="alpha", day=DAY))
        assert [(p.id, p.used_amount) for _, p in listed] == [
            ("id-0", format_nanos(10)),
            (listed[1][1].id, format_nanos(100)),
            (listed[2][1].id, format_nanos(1000)),
            ("id-new", format_nanos(7)),
        ]
        assert len({p.id for _, p in listed}) == 4  # the assigned ids too
        after = PulseQuery(tenant_id="alpha", day=DAY, after=listed[1][0])
        assert first.pulses(after) == listed[2:]
    finally:
        for store in opened:
            store.close()
    version, _, heads = schema(path)
    assert version == 4
    assert heads == [b"["] * (2 * len(tenants)) + [b"\x01"]  # old rows stay as they were
    conn = sqlite3.connect(path)
    try:
        # Schema 2's index of the first rows became a span of each tenant; the
        # tail, folded since, has a span of each tenant too.
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_schema")}
        assert not tables & {"pulse_days", "pulse_days_by_seq", "pulse_ids_by_seq"}
        spans = conn.execute(
            "SELECT tenant_id, seq, seqs FROM pulse_spans ORDER BY tenant_id, seq"
        ).fetchall()
        assert [(t, len(sqlite_store._unpack_seqs(s))) for t, _, s in spans] == [
            (tenant, 1) for tenant in sorted(tenants) for _ in range(2)
        ]
    finally:
        conn.close()


def test_schema_2_index_rows_become_spans_in_log_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "_SPAN_MAX", 2)
    directory = tmp_path / "store"
    store = open_store(directory)
    partition = sqlite_store.partition_of("t", 2)
    for n in range(5):
        store.write_pulses(partition, [pulse("t", n + 1, f"p{n}")], 7)
        totals(store)  # a fold, and a span, each
    store.close()
    as_version_2(directory / "store.sqlite")
    store = open_store(directory)
    try:
        conn = sqlite3.connect(directory / "store.sqlite")
        listing = conn.execute("SELECT seqs FROM pulse_spans ORDER BY seq").fetchall()
        conn.close()
        assert [len(sqlite_store._unpack_seqs(s)) for (s,) in listing] == [2, 2, 1]
        for limit in (1, 2, 3):
            assert listed(store, "t", limit) == [f"p{n}" for n in range(5)]
    finally:
        store.close()


def test_a_store_of_a_later_version_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    open_store(directory).close()
    conn = sqlite3.connect(directory / "store.sqlite")
    conn.execute("PRAGMA user_version = 5")
    conn.close()
    with pytest.raises(StoreMismatch, match="schema version 5, this version reads 4"):
        open_store(directory)


def digests_as_before(conn: sqlite3.Connection) -> None:
    """In the open transaction: each pulse with a client id carries the digest of
    its payload, in its log row and in `pulse_ids`, as intake gave it before
    schema 4."""
    for seq, body in conn.execute("SELECT seq, body FROM pulse_log").fetchall():
        pulses = [
            msgspec.structs.replace(p, fingerprint=payload_digest(p)) if p.client_id else p
            for p in sqlite_store._decode_pulses(body)
        ]
        row = sqlite_store._log_row(encode_pulses(pulses), body[:1] == sqlite_store._IDS)
        conn.execute("UPDATE pulse_log SET body = ? WHERE seq = ?", (row, seq))
        conn.executemany(
            "UPDATE pulse_ids SET fingerprint = ? WHERE id_key = ?",
            [
                (p.fingerprint, sqlite_store._id_key(p.tenant_id, p.pulse_id))
                for p in pulses
                if p.client_id
            ],
        )


def as_version_3(path: Path) -> None:
    """Turn the store file at `path` into one version 3 wrote: each pulse with a
    client id carries the digest of its payload, in its log row and in
    `pulse_ids`, as intake gave it then."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        digests_as_before(conn)
        conn.execute("ALTER TABLE pulse_log DROP COLUMN ids")
        conn.execute("PRAGMA user_version = 3")
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
        conn.execute("COMMIT")
    finally:
        conn.close()


def indexed_digests(path: Path) -> dict[str, bytes]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT id_key, fingerprint FROM pulse_ids"))
    finally:
        conn.close()


def test_a_version_3_store_compares_replays_of_its_ids_with_their_digests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "store"
    store = open_store(directory)
    partition = sqlite_store.partition_of("t", 2)
    # As intake makes them now: no digest of their own.
    replayed = [
        msgspec.structs.replace(pulse("t", amount, pulse_id), fingerprint=b"")
        for amount, pulse_id in ((10, "merged"), (20, "recent"))
    ]
    store.write_pulses(partition, replayed[:1], 7)
    with monkeypatch.context() as patch:
        patch.setattr(sqlite_store, "_MERGE_AT", 1)
        # Merges the ids in memory into `pulse_ids`, then adds its own to memory.
        store.write_pulses(partition, replayed[1:], 7)
    store.close()
    path = directory / "store.sqlite"
    as_version_3(path)
    assert set(indexed_digests(path).values()) == {payload_digest(replayed[0])}

    store = open_store(directory)
    try:
        assert schema(path)[:2] == (4, "4")
        other = [msgspec.structs.replace(p, nanos=p.nanos + 1) for p in replayed]
        outcomes = store.write_pulses(partition, replayed + other, 9)
        assert outcomes == ["duplicate", "duplicate", "conflict", "conflict"]
        new = msgspec.structs.replace(replayed[0], pulse_id="new")
        assert store.write_pulses(partition, [new], 9) == ["accepted"]
        with monkeypatch.context() as patch:
            patch.setattr(sqlite_store, "_MERGE_AT", 1)
            # Any write merges every id in memory into `pulse_ids` first.
            store.write_pulses(sqlite_store.partition_of("u", 2), [pulse("u", 5)], 9)
        digests = indexed_digests(path)
        assert digests["t\x1fnew"] == b""  # compared with its log row's pulse
        assert digests["t\x1frecent"] == payload_digest(replayed[1])
        # Found in `pulse_ids`, each compared with its digest or its log row.
        assert store.write_pulses(partition, [new, *replayed], 9) == ["duplicate"] * 3
        assert store.write_pulses(partition, other[:1], 9) == ["conflict"]
        assert totals(store) == {"t": (format_nanos(10 + 20 + 10), 3), "u": (format_nanos(5), 1)}
    finally:
        store.close()


def test_digests_of_a_version_3_store_go_into_the_index_with_a_sliced_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "store"
    store = open_store(directory)
    partition = sqlite_store.partition_of("t", 2)
    old = [msgspec.structs.replace(pulse("t", n, f"old{n}"), fingerprint=b"") for n in range(1, 6)]
    store.write_pulses(partition, old, 7)
    store.close()
    as_version_3(directory / "store.sqlite")
    monkeypatch.setattr(sqlite_store, "_MERGE_AT", 8)
    monkeypatch.setattr(sqlite_store, "_MERGE_CHUNK", 3)
    store = open_store(directory)
    try:
        for n in range(6):  # 5 old ids and 3 new ones start a merge of 3 slices
            new = msgspec.structs.replace(old[0], pulse_id=f"new{n}")
            assert store.write_pulses(partition, [new], 9) == ["accepted"]
        assert store._merging is None
        digests = indexed_digests(directory / "store.sqlite")
        assert {key: digests[key] for key in digests if "old" in key} == {
            f"t\x1f{p.pulse_id}": payload_digest(p) for p in old
        }
        assert store.write_pulses(partition, old[:2], 9) == ["duplicate"] * 2
        other = msgspec.structs.replace(old[2], nanos=7)
        assert store.write_pulses(partition, [other], 9) == ["conflict"]
    finally:
        store.close()
