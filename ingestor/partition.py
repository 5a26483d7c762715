"""Which partition a tenant belongs to.

The answer must be the same in every process and on every machine for the
life of a store, so it is a CRC-32 of the tenant id, never Python's salted
`hash()`. The number of partitions is fixed when a store is created.
"""

from __future__ import annotations

import zlib

__all__ = ["partition_of", "stable_hash"]


def stable_hash(tenant_id: str) -> int:
    """A 32-bit hash of `tenant_id` that is identical across processes."""
    return zlib.crc32(tenant_id.encode("utf-8"))


def partition_of(tenant_id: str, partitions: int) -> int:
    """The partition that owns `tenant_id`'s buckets, pulse ids and batches."""
    return stable_hash(tenant_id) % partitions
