"""What the cluster shows of a batch's shards, as the state machine's Observation.

Pure: the Job (a dict as the API returns it, or None) and the record in; no API
calls. An Indexed Job reports finished shards as interval strings
(`status.completedIndexes: "0-2,5"`); with backoffLimitPerIndex, the indexes that
used up their retries are in `status.failedIndexes`.
"""

from __future__ import annotations

from typing import Any

from vbatch.core.schemas import BatchRecord
from vbatch.core.state import Observation


def parse_indexes(text: str | None) -> frozenset[int]:
    """`"1,3-5"` -> {1, 3, 4, 5}; empty or absent -> {}."""
    found: set[int] = set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        low, sep, high = part.partition("-")
        if sep:
            found.update(range(int(low), int(high) + 1))
        else:
            found.add(int(low))
    return frozenset(found)


def completed_indexes(job: dict[str, Any] | None) -> frozenset[int]:
    return parse_indexes(((job or {}).get("status") or {}).get("completedIndexes"))


def failed_indexes(job: dict[str, Any] | None) -> frozenset[int]:
    """Shards past their retry budget. A shard that later succeeded is not failed."""
    status = (job or {}).get("status") or {}
    return parse_indexes(status.get("failedIndexes")) - completed_indexes(job)


def observe(record: BatchRecord, job: dict[str, Any] | None, now: int) -> Observation:
    """`shards_total` None means "no Job to watch": either nothing launched yet, or
    launched shards whose Job is missing — both mean "(re)create the one Job", which
    the LAUNCH step does without rewriting shards that already exist."""
    if record.shard_count is None or job is None:
        return Observation(now=now)
    total = record.shard_count
    done = {i for i in completed_indexes(job) if i < total}
    failed = {i for i in failed_indexes(job) if i < total}
    return Observation(now=now, shards_total=total, shards_succeeded=len(done), shards_failed=len(failed))
