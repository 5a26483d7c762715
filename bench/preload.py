"""Fill a data dir with many pulses, fast, for the start-up scenario.

Ten million pulses through HTTP would take longer than the whole bench, so
this writes through the store interface itself (`open_store` and
`Store.write_pulses`, the calls the shards make), in big transactions with
`durability = "os"`. What it leaves is an ordinary store: pulses spread over
the last 30 days, 1,000 tenants, half of them with client ids (so the dedup
index is full size), buckets to match.

    python bench/preload.py DATA_DIR PULSES
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ingestor.config import load_settings
from ingestor.model import Pulse
from ingestor.partition import partition_of
from ingestor.store import open_store

DAY_US = 86_400 * 1_000_000
CHUNK = 200_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("pulses", type=int)
    opts = parser.parse_args()
    settings = load_settings(environ={}, data_dir=opts.data_dir, durability="os")
    store = open_store(settings)
    now_us = time.time_ns() // 1000
    started = time.perf_counter()
    written = 0
    try:
        while written < opts.pulses:
            count = min(CHUNK, opts.pulses - written)
            by_partition: dict[int, list[Pulse]] = defaultdict(list)
            for n in range(written, written + count):
                tenant = f"t{n % 1000}"
                days_ago = n * 30 // opts.pulses
                ts = now_us - (30 - days_ago) * DAY_US + 1
                day = time.strftime("%Y-%m-%d", time.gmtime(ts // 1_000_000))
                with_id = n % 2 == 0
                pulse = Pulse(
                    tenant,
                    f"sku-{n % 10}",
                    "api_call" if n % 3 else "gb_hour",
                    1_500_000_000,
                    f"pre-{n}",
                    with_id,
                    ts,
                    day,
                    hashlib.blake2b(str(n).encode(), digest_size=16).digest() if with_id else b"",
                )
                by_partition[partition_of(tenant, store.partitions)].append(pulse)
            for partition, pulses in by_partition.items():
                store.write_pulses(partition, pulses, now_us)
            written += count
            rate = written / (time.perf_counter() - started)
            print(f"preload: {written:,} pulses, {rate:,.0f}/s", file=sys.stderr, flush=True)
    finally:
        store.close()


if __name__ == "__main__":
    main()
