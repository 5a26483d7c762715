"""What the request handlers see of a running service."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache, partial
from typing import TYPE_CHECKING

import msgspec

from .committer import Committer
from .config import Settings
from .deliverer import Deliverer
from .edge import Edge
from .intake import Rules
from .partition import partition_of
from .shard import Shard
from .store import Store

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = ["PulseCounts", "Runtime", "WorkerGroup"]


class WorkerGroup(msgspec.Struct, frozen=True):
    """This process's place among a supervisor's workers (`--workers`).

    Each worker answers its siblings' questions on a Unix socket of its own
    in `directory`: for now, its metrics (see `metrics`).
    """

    index: int
    count: int
    directory: str

    def socket(self, index: int) -> str:
        return f"{self.directory}/worker-{index}.sock"


class PulseCounts(msgspec.Struct):
    accepted: int = 0
    duplicate: int = 0
    conflict: int = 0
    rejected: int = 0


class Runtime:
    """The started parts of one service: settings, store, shards, committer, deliverer."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        shards: list[Shard],
        committer: Committer,
        deliverer: Deliverer,
        rules: Rules,
        clock: Callable[[], int],
    ) -> None:
        self.settings = settings
        self.store = store
        self.shards = shards
        owners = {partition: shard for shard in shards for partition in shard.partitions}
        self.shard_of = [owners[partition] for partition in range(store.partitions)]
        self.committer = committer
        self.deliverer = deliverer
        self.rules = rules
        self.clock = clock
        # Tenants repeat: their partition is computed once (up to 65,536 of them).
        self.partition_of = lru_cache(maxsize=1 << 16)(
            partial(partition_of, partitions=store.partitions)
        )
        self.edge: Edge | None = None  # set by the app: requests in flight
        self.group: WorkerGroup | None = None  # set by `serve` in a worker of a group
        self.metrics: Metrics | None = None  # set by the app
        self.ready = False
        self.draining = False
        self.pulses = PulseCounts()

    def count_pulses(self, accepted: int, duplicate: int, conflict: int, rejected: int) -> None:
        counts = self.pulses
        counts.accepted += accepted
        counts.duplicate += duplicate
        counts.conflict += conflict
        counts.rejected += rejected
