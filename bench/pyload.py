"""A fallback load generator for when wrk cannot be installed.

Speaks the same arguments as the Lua scripts in bench/lua/ and prints the same
`BENCH_JSON {...}` summary line. One thread per connection, each with a
keep-alive http.client connection: the GIL caps it far below wrk, so figures
made with it say "pyload" in the report and compare only with each other.

    python bench/pyload.py --port P --connections C --duration S \
        --script pulses.lua -- SHAPE COUNT IDS PREFIX TENANTS
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import random
import threading
import time
from collections import Counter

SKUS = [
    "sku-compute",
    "sku-storage",
    "sku-egress",
    "sku-api",
    "sku-search",
    "sku-ml",
    "sku-db",
    "sku-cdn",
    "sku-mail",
    "sku-queue",
]
UNITS = ["api_call", "gb_hour"]
AMOUNTS = ["1", "2.5", "0.000000001", "100", "17.25", "3"]


def pulse_bodies(args: list[str], thread: int):  # type: ignore[no-untyped-def]
    shape, count, ids, prefix = args[0], int(args[1]), args[2] == "1", args[3]
    tenants = int(args[4])
    counter = itertools.count(1)

    def pulse() -> dict[str, str]:
        p = {
            "tenant_id": f"t{random.randint(1, tenants)}",
            "product_sku": random.choice(SKUS),
            "use_unit": random.choice(UNITS),
            "used_amount": random.choice(AMOUNTS),
        }
        if ids:
            p["id"] = f"{prefix}-{thread}-{next(counter)}"
        return p

    while True:
        if shape == "single":
            yield "POST", "/pulses", json.dumps(pulse()).encode(), "application/json"
        elif shape == "ndjson":
            body = "\n".join(json.dumps(pulse()) for _ in range(count)) + "\n"
            yield "POST", "/pulses", body.encode(), "application/x-ndjson"
        else:
            body = json.dumps([pulse() for _ in range(count)])
            yield "POST", "/pulses", body.encode(), "application/json"


def page_requests(args: list[str], thread: int):  # type: ignore[no-untyped-def]
    with open(args[0]) as f:
        paths = [line.strip() for line in f if line.strip()]
    for path in itertools.islice(itertools.cycle(paths), thread * 7 % len(paths), None):
        yield "GET", path, None, None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--timeout", type=float, default=10)
    parser.add_argument("--script", required=True)
    parser.add_argument("args", nargs="*")
    opts = parser.parse_args()
    make = pulse_bodies if opts.script == "pulses.lua" else page_requests
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    first_error: list[str] = []
    accepted = [0]  # pulses the server said it took, as report.lua sums them
    lock = threading.Lock()
    start = time.perf_counter()
    end = start + opts.duration

    def worker(thread: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", opts.port, timeout=opts.timeout)
        for method, path, body, content_type in make(opts.args, thread):
            if time.perf_counter() >= end:
                break
            headers = {"Content-Type": content_type} if content_type else {}
            sent = time.perf_counter()
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                text = response.read()
            except TimeoutError:
                errors["timeout"] += 1
                conn.close()
                continue
            except OSError:
                errors["read"] += 1
                conn.close()
                continue
            took = time.perf_counter() - sent
            with lock:
                latencies.append(took)
                statuses[str(response.status)] += 1
                if response.status >= 300 and not first_error:
                    first_error.append(f"{response.status} {text[:300].decode(errors='replace')}")
                if make is pulse_bodies and response.status < 300:
                    accepted[0] += int(json.loads(text).get("accepted", 0))
        conn.close()

    threads = [threading.Thread(target=worker, args=(i + 1,)) for i in range(opts.connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(p: float) -> int:
        if not latencies:
            return 0
        return int(latencies[min(len(latencies) - 1, int(len(latencies) * p / 100))] * 1e6)

    print(
        "BENCH_JSON "
        + json.dumps(
            {
                "duration_us": int(elapsed * 1e6),
                "requests": len(latencies),
                "bytes": 0,
                "errors": {
                    "connect": 0,
                    "read": errors["read"],
                    "write": 0,
                    "status": sum(v for k, v in statuses.items() if int(k) >= 400),
                    "timeout": errors["timeout"],
                },
                "latency_us": {
                    "min": pct(0),
                    "mean": sum(latencies) / max(1, len(latencies)) * 1e6,
                    "max": int(latencies[-1] * 1e6) if latencies else 0,
                    "p50": pct(50),
                    "p90": pct(90),
                    "p99": pct(99),
                    "p999": pct(99.9),
                },
                "statuses": dict(statuses),
                "first_error": first_error[0] if first_error else None,
                **({"accepted": accepted[0]} if make is pulse_bodies else {}),
            }
        )
    )


if __name__ == "__main__":
    main()
