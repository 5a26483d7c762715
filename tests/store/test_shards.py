"""The shards a service makes of each store: one per write lane, owning its partitions."""

from __future__ import annotations

from pathlib import Path

import msgspec

from ingestor.api import ingest
from ingestor.config import Settings
from ingestor.partition import partition_of
from ingestor.service import open_service
from ingestor.sinks.memory import MemorySink
from ingestor.store import AggregateQuery, Store


async def test_each_partition_is_written_by_the_one_shard_that_owns_it(
    store: Store, tmp_path: Path
) -> None:
    """SQLite: one shard owns every partition. PostgreSQL: one shard a partition."""
    settings = Settings(data_dir=str(tmp_path / "data"))
    async with open_service(settings, store=store, sink=MemorySink()) as runtime:
        expected = 1 if store.write_lanes == 1 else store.partitions
        assert len(runtime.shards) == expected
        owned = sorted(p for shard in runtime.shards for p in shard.partitions)
        assert owned == list(range(store.partitions))
        assert all(p in runtime.shard_of[p].partitions for p in range(store.partitions))
        tenants = [f"t{n}" for n in range(40)]
        assert {partition_of(t, store.partitions) for t in tenants} == set(range(4))
        body = msgspec.json.encode(
            [
                {"tenant_id": t, "product_sku": "s", "use_unit": "u", "used_amount": "1", "id": i}
                for t in tenants
                for i in ("a", "b", "a")  # the second "a" of each tenant is a duplicate
            ]
        )
        status, answer = await ingest(runtime, body, "application/json")
        report = msgspec.json.decode(answer)
        assert (status, report["accepted"], report["duplicates"]) == (202, 80, 40)
        assert [item["index"] for item in report["items"]] == list(range(2, 120, 3))
        rows = store.aggregates(AggregateQuery(limit=100))
        assert sorted((a.tenant_id, a.pulse_count) for a in rows) == sorted((t, 2) for t in tenants)
