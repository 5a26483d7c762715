"""CPU cost per pulse of the two halves of POST /pulses, in process, without HTTP.

    .venv/bin/python bench/stages.py                     # this checkout
    .venv/bin/python bench/stages.py --src . --src ../wt # two checkouts, alternated
    .venv/bin/python bench/stages.py --ids --durability os
    .venv/bin/python bench/stages.py --ndjson           # the same pulses as NDJSON
    .venv/bin/python bench/stages.py --group 6          # rounds of 6 requests, as under load

wrk's figures can move by half from one minute to the next on a shared VM
(CPU steal, fsyncs taking 1.5 to 16 ms): too much to see a 20% change. The
CPU time of one process doing one thing in a loop is steadier, and its
minimum over repeats steadier still. Two stages, on bodies like the bench's
1,000-pulse arrays (bench/lua/pulses.lua: 100 tenants, 10 SKUs, 2 units),
or 1,000-line NDJSON bodies of the same pulses with --ndjson:

    decode   the event loop's part: decode_pulses (bytes to validated
             pulses), then the pulses split by partition into the shards'
             messages (`Ingest`, which encodes them for the log)
    write    SQLiteStore.write_pulses for each partition a request touches,
             in one writing_together round and its COMMIT (the store thread's),
             once every request is decoded: its pulses have left the cache
    both     each request decoded, split and written before the next, as a
             server does: the cache between the stages is that of a server
             taking one request at a time (more of it than under load)

With --group N, a round writes N requests together, each partition's
pulses and log rows joined as a shard joins what is waiting (`Shard._ingest`):
under load (16 connections, 1,000-pulse arrays) the server's rounds hold
about 6 requests (`ingestor_store_transaction_pulses` in /metrics).

Each checkout given with --src runs in its own process, in turn, --repeats
times; printed are the minimum and median CPU µs per pulse of each.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SKUS = [
    f"sku-{n}"
    for n in ("compute", "storage", "egress", "api", "search", "ml", "db", "cdn", "mail", "queue")
]
AMOUNTS = ["1", "2.5", "0.000000001", "100", "17.25", "3"]
BODIES = 100


def bodies(ids: bool, seed: int, ndjson: bool = False) -> list[bytes]:
    rng = random.Random(seed)
    made = []
    for b in range(BODIES):
        pulses = []
        for n in range(1000):
            pulse = {
                "tenant_id": f"t{rng.randint(1, 100)}",
                "product_sku": rng.choice(SKUS),
                "use_unit": rng.choice(["api_call", "gb_hour"]),
                "used_amount": rng.choice(AMOUNTS),
            }
            if ids:
                pulse["id"] = f"stage-{seed}-{b}-{n}"
            pulses.append(pulse)
        if ndjson:
            made.append("".join(json.dumps(pulse) + "\n" for pulse in pulses).encode())
        else:
            made.append(json.dumps(pulses).encode())
    return made


def child(args: argparse.Namespace) -> None:
    """One measurement of both stages, in this process; prints JSON."""
    import gc

    import ingestor
    from ingestor.clock import wall_clock_us
    from ingestor.intake import Rules, decode_pulses
    from ingestor.partition import partition_of
    from ingestor.shard import Ingest, Reply
    from ingestor.store.sqlite import SQLiteStore

    gc.set_threshold(50_000, 10, 10)  # as the service runs (service.py)
    rules = Rules(late_window_s=35 * 86_400, future_skew_s=300, max_batch=10_000)
    now = wall_clock_us()
    raw = bodies(args.ids, args.seed, args.ndjson)
    content_type = "application/x-ndjson" if args.ndjson else "application/json"
    partition: Callable[[str], int] = functools.lru_cache(maxsize=1 << 16)(
        functools.partial(partition_of, partitions=16)  # as the runtime has it
    )

    # Checkouts from before the intake told the store whether there are ids: none.
    says_ids = "ids" in inspect.signature(SQLiteStore.write_pulses).parameters

    Routed = dict[int, tuple[list[Any], bytes | None, bool]]

    def route(body: bytes) -> Routed:
        intake = decode_pulses(body, content_type, rules, now)
        ids = getattr(intake, "ids", True)
        by_partition = defaultdict(list)
        if hasattr(intake, "tenants"):  # routed a tenant at a time, as the API does
            for tenant, group in intake.tenants.items():
                # Checkouts from before `Intake.indexes`: (indexes, pulses) a tenant.
                pulses = group if isinstance(group, list) else group[1]
                by_partition[partition(tenant)].extend(pulses)
        else:  # checkouts from before: a pulse at a time
            for _, pulse in intake.pulses:
                by_partition[partition(pulse.tenant_id)].append(pulse)
        if "dict" in str(Ingest.__annotations__["pulses"]):  # a message per shard
            message = Ingest(dict(by_partition), Reply())
            return {
                part: (pulses, message.encoded[part], ids) for part, pulses in by_partition.items()
            }
        # checkouts from before: a message per partition, encoded or not
        older: Any = Ingest
        messages = {part: older(pulses, Reply()) for part, pulses in by_partition.items()}
        return {part: (m.pulses, getattr(m, "encoded", None), ids) for part, m in messages.items()}

    def grouped(requests: list[Routed]) -> Routed:
        """`requests` as one round, each partition's writes joined, as a shard does."""
        if len(requests) == 1:
            return requests[0]
        from ingestor.model import join_encoded

        joined: dict[int, list[tuple[list[Any], bytes | None, bool]]] = defaultdict(list)
        for request in requests:
            for partition, routed in request.items():
                joined[partition].append(routed)
        return {
            partition: (
                [p for pulses, _, _ in writes for p in pulses],
                join_encoded([encoded for _, encoded, _ in writes if encoded is not None])
                if all(encoded is not None for _, encoded, _ in writes)
                else None,
                any(ids for _, _, ids in writes),
            )
            for partition, writes in joined.items()
        }

    def write(store: SQLiteStore, by_partition: Routed) -> None:
        with store.writing_together():
            for partition, (pulses, encoded, ids) in by_partition.items():
                extra: tuple[Any, ...] = () if encoded is None else (encoded,)
                if says_ids:
                    extra += (ids,)
                store.write_pulses(partition, pulses, now, *extra)

    def new_store(tmp: str, name: str) -> SQLiteStore:
        # A data dir each: the store's directory's parent keeps its id (`data/store.id`).
        return SQLiteStore.open(
            Path(tmp) / name / "store", partitions=16, durability=args.durability, busy_timeout=5
        )

    started = time.process_time()
    requests = [route(body) for body in raw]
    decode = time.process_time() - started
    with tempfile.TemporaryDirectory() as tmp:
        store = new_store(tmp, "store")
        started = time.process_time()
        for start in range(0, len(requests), args.group):
            write(store, grouped(requests[start : start + args.group]))
        written = time.process_time() - started
        store.close()
        del requests
        # Each request written as soon as it is decoded, as a server does: the
        # stages apart find every pulse out of the CPU's cache when writing.
        store = new_store(tmp, "both")
        started = time.process_time()
        for start in range(0, len(raw), args.group):
            write(store, grouped([route(body) for body in raw[start : start + args.group]]))
        both = time.process_time() - started
        store.close()
    pulses = BODIES * 1000
    print(
        json.dumps(
            {
                "source": str(Path(ingestor.__file__).parent.parent),
                "decode": decode / pulses * 1e6,
                "write": written / pulses * 1e6,
                "both": both / pulses * 1e6,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", action="append", help="a checkout (default: this one)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ids", action="store_true", help="every pulse has a new id")
    parser.add_argument("--ndjson", action="store_true", help="NDJSON bodies, not arrays")
    parser.add_argument("--durability", choices=["fsync", "os"], default="fsync")
    parser.add_argument("--group", type=int, default=1, help="requests a round (default 1)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    sources = [str(Path(s).resolve()) for s in (args.src or [str(ROOT)])]
    found: dict[str, dict[str, list[float]]] = {s: defaultdict(list) for s in sources}
    for repeat in range(args.repeats):
        for source in sources:
            argv = [
                sys.executable,
                __file__,
                "--child",
                "--durability",
                args.durability,
                "--seed",
                str(args.seed + repeat),
                "--group",
                str(args.group),
                *(["--ids"] if args.ids else []),
                *(["--ndjson"] if args.ndjson else []),
            ]
            env = {**os.environ, "PYTHONPATH": source}  # its `ingestor` before any installed
            out = subprocess.run(argv, check=True, capture_output=True, text=True, env=env).stdout
            costs = json.loads(out)
            if costs.pop("source") != source:
                raise SystemExit(f"stages: {source} did not run its own ingestor")
            for stage, cost in costs.items():
                found[source][stage].append(cost)
    ids = "new ids" if args.ids else "no ids"
    print(
        f"CPU µs per pulse, 1,000-pulse {'NDJSON' if args.ndjson else 'arrays'}, {ids},"
        f" {args.durability}, {args.group} request{'s' if args.group > 1 else ''} a round,"
        f" {args.repeats} repeats: min / median"
    )
    for source, stages in found.items():
        cells = "  ".join(
            f"{stage} {min(costs):.2f} / {statistics.median(costs):.2f}"
            for stage, costs in stages.items()
        )
        print(f"  {source}: {cells}")


if __name__ == "__main__":
    main()
