"""Object keys of a batch's working data, and the per-shard progress record.

    projects/<p>/batches/<b>/input.jsonl                     the batch's copy of its input file
    projects/<p>/batches/<b>/shards/<n>.jsonl                input lines of shard n
    projects/<p>/batches/<b>/results/<n>/part-<k>.jsonl      result lines (output and error)
    projects/<p>/batches/<b>/progress/<n>.json               ShardProgress of shard n

Parts are written whole (never appended), so a part that exists is complete.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, Field
from vbatch.core.projects import check_project_id
from vbatch.core.schemas import BatchUsage

_PART = re.compile(r"/part-(\d+)\.jsonl$")


def batch_prefix(project: str, batch_id: str) -> str:
    # The storage-key boundary: ids with path syntax never reach another prefix.
    if not batch_id or "/" in batch_id:
        raise ValueError(f"invalid batch id {batch_id[:80]!r}")
    return f"projects/{check_project_id(project)}/batches/{batch_id}/"


def input_key(project: str, batch_id: str) -> str:
    return f"{batch_prefix(project, batch_id)}input.jsonl"


def shard_key(project: str, batch_id: str, shard: int) -> str:
    return f"{batch_prefix(project, batch_id)}shards/{shard}.jsonl"


def results_prefix(project: str, batch_id: str, shard: int) -> str:
    return f"{batch_prefix(project, batch_id)}results/{shard}/"


def part_key(project: str, batch_id: str, shard: int, part: int) -> str:
    return f"{results_prefix(project, batch_id, shard)}part-{part:06d}.jsonl"


def part_number(key: str) -> int | None:
    match = _PART.search(key)
    return int(match.group(1)) if match else None


def progress_key(project: str, batch_id: str, shard: int) -> str:
    return f"{batch_prefix(project, batch_id)}progress/{shard}.json"


class ShardProgress(BaseModel):
    """What a worker has finished of one shard; rewritten after every part."""

    shard: int
    total: int = 0
    completed: int = 0
    failed: int = 0
    usage: BatchUsage = Field(default_factory=BatchUsage)
    parts: int = 0
    finished: bool = False
    updated_at: float = 0.0
    # When the first result part of any attempt was written (unix seconds), and the
    # worker seconds spent on this shard over all attempts: read by the driver for
    # metrics (this record outlives the worker pod).
    first_result_at: float | None = None
    gpu_seconds: float = 0.0
