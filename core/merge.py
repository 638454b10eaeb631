"""Result merging: every input line ends in exactly one of the output/error files.

For each shard: the shard's input fixes which custom_ids belong to it; the first
result per custom_id found in its parts wins (a retried pod may have answered a
request twice); every custom_id with no result gets an error line carrying the
reason (`batch_cancelled`, `batch_expired`, `shard_failed`). Counts and usage
come from the very lines written, so completed + failed == total.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import orjson

from vbatch.core.ids import new_batch_request_id
from vbatch.core.layout import results_prefix, shard_key
from vbatch.core.schemas import BatchUsage, RequestCounts
from vbatch.core.sharding import normalized_lines
from vbatch.core.storage.base import ObjectNotFound, ObjectStore, iter_lines

MISSING_MESSAGES = {
    "batch_cancelled": "The batch was cancelled before this request ran.",
    "batch_expired": "The batch's completion window ended before this request ran.",
    "shard_failed": "The worker running this request failed past its retry budget.",
}


@dataclass
class MergedResults:
    """Two spooled result files (on local disk) plus what they contain."""

    output: IO[bytes]
    errors: IO[bytes]
    counts: RequestCounts = field(default_factory=RequestCounts)
    usage: BatchUsage = field(default_factory=BatchUsage)

    def close(self) -> None:
        self.output.close()
        self.errors.close()


def _is_success(result: dict[str, Any]) -> bool:
    response = result.get("response")
    return result.get("error") is None and isinstance(response, dict) and response.get("status_code") == 200


def _add_usage(usage: BatchUsage, result: dict[str, Any]) -> None:
    body_usage = (result["response"].get("body") or {}).get("usage") or {}
    usage.add(int(body_usage.get("prompt_tokens") or 0), int(body_usage.get("completion_tokens") or 0))
    cached = (body_usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    usage.input_tokens_details.cached_tokens += int(cached)


def _shard_custom_ids(store: ObjectStore, project: str, batch_id: str, shard: int) -> list[str]:
    try:
        chunks = store.get_stream(shard_key(project, batch_id, shard))
    except ObjectNotFound:
        return []
    return [orjson.loads(line)["custom_id"] for line in normalized_lines(chunks)]


def _part_results(store: ObjectStore, project: str, batch_id: str, shard: int) -> Iterator[dict[str, Any]]:
    for key in store.list(results_prefix(project, batch_id, shard)):
        for line in iter_lines(store.get_stream(key)):
            if line.strip():
                yield orjson.loads(line)


def merge_shards(
    store: ObjectStore,
    project: str,
    batch_id: str,
    shard_count: int,
    *,
    missing_code: str = "shard_failed",
    failed_shards: frozenset[int] = frozenset(),
) -> MergedResults:
    merged = MergedResults(output=tempfile.TemporaryFile(), errors=tempfile.TemporaryFile())
    try:
        for shard in range(shard_count):
            pending = dict.fromkeys(_shard_custom_ids(store, project, batch_id, shard))
            for result in _part_results(store, project, batch_id, shard):
                custom_id = result.get("custom_id")
                if custom_id in pending:  # the first result wins; later ones are duplicates
                    del pending[custom_id]
                    _write(merged, result)
            code = "shard_failed" if shard in failed_shards else missing_code
            for custom_id in pending:
                _write(merged, missing_result(custom_id, code))
        merged.output.seek(0)
        merged.errors.seek(0)
        return merged
    except BaseException:
        merged.close()
        raise


def missing_result(custom_id: str, code: str) -> dict[str, Any]:
    return {
        "id": new_batch_request_id(),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": MISSING_MESSAGES.get(code, code)},
    }


def _write(merged: MergedResults, result: dict[str, Any]) -> None:
    line = orjson.dumps(result) + b"\n"
    merged.counts.total += 1
    if _is_success(result):
        merged.output.write(line)
        merged.counts.completed += 1
        _add_usage(merged.usage, result)
    else:
        merged.errors.write(line)
        merged.counts.failed += 1
