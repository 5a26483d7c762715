"""Scenario 4, disk full: the data dir on a 6 MiB tmpfs that the test fills up.

Six clients ingest; the test then fills the tmpfs with a ballast file until
the kernel says ENOSPC. The store's writes soon need space it cannot get:
requests must be answered 503 with Retry-After and a clear error
(`store_full`, a message that says the disk is full), never a 500 or a hang,
and nothing acknowledged may be lost. The server is then killed -9 and
restarted on the still full disk: it must start, hold every acknowledged
pulse and keep answering 503. The ballast is deleted and, with no further
restart, pulses are acknowledged again; in the end the audit (commit, file
deliveries onto the same tiny disk) holds.

Where no tmpfs can be mounted (not root), the server runs as
`python -m tests.faults.full_store`, whose store and file sink fail exactly
so while a flag file exists; the report says which one ran.
"""

from __future__ import annotations

import errno
import os
from functools import partial
from pathlib import Path

import httpx
import trio

from tests.faults.conftest import Report, StartServer
from tests.faults.harness import Load, PulseFactory, audit, check_bounds
from tests.support.server import Ledger, ServerProcess, wait_until


class FullStoreServer(ServerProcess):
    """The ingestor behind tests.faults.full_store (the fallback without a tmpfs)."""

    def command(self) -> list[str]:
        command = super().command()
        return [command[0], "-m", "tests.faults.full_store", *command[3:]]

    def environment(self) -> dict[str, str]:
        env = super().environment()
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        return env


class Disk:
    """`fill()` makes the data dir's filesystem full; `free()` gives the space back."""

    def __init__(self, mount: Path | None, flag: Path) -> None:
        self.mount = mount
        self.flag = flag
        self.ballast_bytes = 0

    def fill(self) -> None:
        if self.mount is None:
            self.flag.touch()
            return
        fd = os.open(self.mount / "ballast", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 20, 1 << 16, 1 << 12):
                block = bytes(size)
                while True:
                    try:
                        self.ballast_bytes += os.write(fd, block)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)

    def free(self) -> None:
        if self.mount is None:
            self.flag.unlink()
        else:
            (self.mount / "ballast").unlink()


async def more_refusals(load: Load, count: int) -> bool:
    return load.error_codes["store_full"] >= count


async def test_a_full_disk_is_503_store_full_loses_nothing_and_heals_by_itself(
    start_server: StartServer, tmp_path: Path, tiny_disk: Path | None, report: Report
) -> None:
    flag = tmp_path / "disk-full"
    disk = Disk(tiny_disk, flag)
    if tiny_disk is not None:
        server = await start_server(tiny_disk, INGESTOR_PARTITIONS="2")
    else:
        server = await start_server(
            tmp_path / "data",
            kind=FullStoreServer,
            INGESTOR_PARTITIONS="2",
            FAULTS_DISK_FULL_FLAG=str(flag),
        )
    ledger = Ledger()
    load = Load(server, ledger, PulseFactory(prefix="full", max_array=60), clients=6, seed=4)
    full_answers: dict[str, int] = {}
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load.run)
            await load.flowing(500, what="before the disk fills")
            disk.fill()

            await wait_until(
                partial(more_refusals, load, 20), within=30, what="503 store_full answers"
            )
            async with httpx.AsyncClient(timeout=10.0) as http:
                response = await http.post(
                    f"{server.url}/pulses",
                    json={
                        "tenant_id": "acme",
                        "product_sku": "s",
                        "use_unit": "u",
                        "used_amount": "1",
                        "id": "while-full",
                    },
                )
                assert response.status_code == 503, response.text
                assert response.headers["Retry-After"].isdigit()
                error = response.json()["error"]
                assert error["code"] == "store_full", error
                assert "disk" in error["message"], error
                assert "full" in error["message"], error
                ready = await http.get(f"{server.url}/readyz")
                days = sorted({ledger.day_of(a) for a in ledger.attempts})
                commit = await http.post(f"{server.url}/aggregates/commit", json={"date": days[-1]})
                assert commit.status_code in (200, 503), commit.text
            # A crash while the disk is full: the server must start again on it,
            # answer 503 store_full, and lose nothing acknowledged.
            load.down()

            async def settled() -> bool:  # the requests already sent are answered
                return load.in_flight == 0

            await wait_until(settled, within=15, what="requests in flight answered")
            assert await server.kill() == -9
            await server.start()
            await check_bounds(server, ledger)
            load.up.set()
            await wait_until(
                partial(more_refusals, load, load.error_codes["store_full"] + 5),
                within=30,
                what="503 store_full after the restart on the full disk",
            )
            full_answers = dict(load.error_codes)
            disk.free()
            await load.flowing(500, what="after the space came back, with no restart")
            load.stop()

    assert load.problems == [], load.problems[:10]
    assert set(load.statuses) <= {202, 503}, load.statuses
    counts = await audit(server, ledger)
    counts.extra["filesystem"] = (
        f"tmpfs 6 MiB, ballast {disk.ballast_bytes // 1024} KiB"
        if tiny_disk
        else "store wrapper (no tmpfs could be mounted)"
    )
    counts.extra["503 codes while full"] = full_answers
    counts.extra["readyz while full"] = ready.status_code
    counts.extra["commit while full"] = commit.status_code
    report(counts.line("disk full"))
