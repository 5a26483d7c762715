"""A store that goes back in time: restored from a backup, as the README's
"Backups" suggests taking them.

The restored store knows nothing of the batches it made after the backup, so
it makes its next ones again under the same ids (day, partition, sequence),
with other content where other pulses came since. A receiver that drops a
repeat of an id it has would drop them: usage billed nowhere, while the
outbox says delivered. The file sink holds the first content under the id
and must not take a different batch for a repeat of it.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import ABORTED_UPLOADS
from tests.support.server import Ledger, ServerProcess, send_pulses, wait_until

pytestmark = [pytest.mark.e2e, *ABORTED_UPLOADS]

# Commits only when asked: the test decides when each batch is made.
MANUAL = {"INGESTOR_COMMIT_INTERVAL": "3600", "INGESTOR_COMMIT_GRACE": "30d"}


def yesterday() -> str:
    return (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).isoformat()


def late_pulses(rng: random.Random, wave: str, day: str, count: int = 6) -> list[dict[str, Any]]:
    """Pulses of one tenant (so one partition) stamped during `day`."""
    midnight = dt.datetime.combine(dt.date.fromisoformat(day), dt.time(), dt.UTC)
    return [
        {
            "tenant_id": "acme",
            "product_sku": rng.choice(["sku-basic", "sku-pro"]),
            "use_unit": "api_call",
            "used_amount": str(rng.randint(1, 10**6)),
            "id": f"{wave}-{n}",
            "timestamp": (midnight + dt.timedelta(seconds=rng.uniform(0, 86_399)))
            .isoformat()
            .replace("+00:00", "Z"),
        }
        for n in range(count)
    ]


async def post_and_commit(
    http: httpx.AsyncClient, server: ServerProcess, pulses: list[dict[str, Any]], day: str
) -> dict[str, Any]:
    """Store `pulses`, commit `day`: the one batch made, once its delivery is over."""
    sent = await send_pulses(http, server.url, Ledger(), pulses)
    assert sent.response is not None, sent.error
    assert sent.response.status_code == 202, sent.response.text
    response = await http.post(f"{server.url}/aggregates/commit", params={"date": day})
    assert response.status_code == 200, response.text
    [made] = response.json()["batches"]

    async def settled() -> dict[str, Any] | None:
        batch = (await http.get(f"{server.url}/batches/{made['batch_id']}")).json()
        return batch if batch["status"] != "pending" else None

    found = await wait_until(settled, within=20, interval=0.1, what="the batch delivered")
    assert found is not None
    return found


async def test_a_batch_made_again_after_a_restore_is_not_taken_for_the_one_delivered(
    tmp_path: Path,
) -> None:
    rng = random.Random(5)
    day = yesterday()
    data = tmp_path / "data"
    backup = tmp_path / "backup"
    async with httpx.AsyncClient(timeout=30) as http, ServerProcess(data, env=MANUAL) as server:
        first = await post_and_commit(http, server, late_pulses(rng, "first", day), day)
        assert first["status"] == "delivered"
        assert await server.terminate(within=15) == 0
        shutil.copytree(data / "store", backup)  # the backup: the process stopped, as advised

        await server.start()
        second = await post_and_commit(http, server, late_pulses(rng, "second", day), day)
        assert second["status"] == "delivered"
        delivered = server.deliveries / day / f"{second['batch_id']}.json"
        before = delivered.read_bytes()
        assert json.loads(before)["used_amount"] == second["used_amount"]
        assert await server.terminate(within=15) == 0

        shutil.rmtree(data / "store")
        shutil.copytree(backup, data / "store")  # the restore
        await server.start()
        again = await post_and_commit(http, server, late_pulses(rng, "again", day), day)

        # The restored store made its second batch again: same id, other usage.
        assert again["batch_id"] == second["batch_id"]
        assert again["used_amount"] != second["used_amount"]
        # Not a repeat of the one delivered: it stays failed, for an operator,
        # and the receiver's copy is left as it was.
        assert again["status"] == "failed", again
        assert "restored" in again["last_error"], again["last_error"]
        assert delivered.read_bytes() == before
        metrics = (await http.get(f"{server.url}/metrics")).text
        assert 'ingestor_outbox_batches{status="failed"} 1.0' in metrics
