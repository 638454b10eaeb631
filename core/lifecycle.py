"""The steps a driver carries out for a batch, shared by both ways of running.

`vbatch.core.state.next_action` says which step is due; these functions do the
I/O of each step against the object store and the file service, and return the
updated record for the driver to save. Running a step twice is harmless: shard
objects are rewritten whole, and result files have ids derived from the batch
id, so a finalize interrupted by a crash overwrites its own earlier attempt.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Collection, Iterator

import orjson
from vbatch.core import state
from vbatch.core.config import Limits, Settings
from vbatch.core.errors import NotFound
from vbatch.core.files import FileService
from vbatch.core.layout import ShardProgress, batch_prefix, progress_key
from vbatch.core.merge import merge_shards
from vbatch.core.schemas import (
    BatchErrorItem,
    BatchErrors,
    BatchRecord,
    BatchStatus,
    BatchUsage,
    FilePurpose,
    RequestCounts,
    metadata_problem,
)
from vbatch.core.sharding import normalized_lines, shard_count_for, write_shards
from vbatch.core.storage.base import ObjectNotFound, ObjectStore
from vbatch.core.validation import validate_jsonl


def result_file_id(batch_id: str, kind: str) -> str:
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


def validate(
    files: FileService, record: BatchRecord, *, served_models: Collection[str] | None, limits: Limits, now: int
) -> BatchRecord:
    """validating -> in_progress, or -> failed with errors.data saying where."""
    problem = metadata_problem(record.metadata)
    if problem:  # the gateway refuses these; a Batch applied with kubectl arrives here
        failed = state.transition(record, BatchStatus.FAILED, now)
        failed.errors = BatchErrors(data=[BatchErrorItem(code="invalid_metadata", message=f"Invalid metadata: {problem}.", param="metadata")])
        return failed
    try:
        _, chunks = files.open(record.project, record.input_file_id)
    except NotFound as exc:  # unknown file: the batch fails; a storage outage (503) is retried by the driver
        failed = state.transition(record, BatchStatus.FAILED, now)
        failed.errors = BatchErrors(data=[BatchErrorItem(code="file_not_found", message=str(exc), param="input_file_id")])
        return failed
    report = validate_jsonl(chunks, endpoint=record.endpoint, served_models=served_models, limits=limits)
    if not report.ok:
        failed = state.transition(record, BatchStatus.FAILED, now)
        failed.errors = BatchErrors(data=report.problems)
        return failed
    return state.validated(record, total=report.total, model=report.model, now=now)


def input_lines(files: FileService, record: BatchRecord) -> Iterator[bytes]:
    _, chunks = files.open(record.project, record.input_file_id)
    return normalized_lines(chunks)


def launch(store: ObjectStore, files: FileService, record: BatchRecord, settings: Settings, *, max_shards: int | None = None, requested: int | None = None) -> BatchRecord:
    """Plan and write the shard objects; the driver then starts one worker per shard.

    An input file deleted between create and launch fails the batch (in_progress ->
    finalizing -> failed, errors saying why): retrying could never succeed."""
    try:
        files.get(record.project, record.input_file_id)
    except NotFound:
        now = int(time.time())
        failed = state.transition(state.transition(record, BatchStatus.FINALIZING, now), BatchStatus.FAILED, now)
        failed.errors = BatchErrors(data=[BatchErrorItem(
            code="input_file_not_found", param="input_file_id",
            message=f"The input file {record.input_file_id} was deleted before the batch started.")])
        return failed
    count = shard_count_for(
        record.request_counts.total,
        target_requests=settings.shard_target_requests,
        max_shards=max_shards or settings.max_shards,
        requested=requested,
    )
    write_shards(store, record.project, record.id, input_lines(files, record), count)
    launched = record.model_copy(deep=True)
    launched.shard_count = count
    return launched


def read_progress(store: ObjectStore, record: BatchRecord) -> list[ShardProgress | None]:
    progress: list[ShardProgress | None] = []
    for shard in range(record.shard_count or 0):
        try:
            raw = store.get_bytes(progress_key(record.project, record.id, shard))
            progress.append(ShardProgress.model_validate(orjson.loads(raw)))
        except ObjectNotFound:
            progress.append(None)
    return progress


def with_progress(record: BatchRecord, progress: list[ShardProgress | None]) -> BatchRecord:
    """The record with request_counts/usage summed from the shards' progress records."""
    completed = sum(p.completed for p in progress if p)
    failed = sum(p.failed for p in progress if p)
    usage = BatchUsage()
    for p in progress:
        if p:
            usage.add(p.usage.input_tokens, p.usage.output_tokens)
            usage.input_tokens_details.cached_tokens += p.usage.input_tokens_details.cached_tokens
    updated = with_worker_figures(record, progress)
    updated.request_counts = RequestCounts(total=record.request_counts.total, completed=completed, failed=failed)
    updated.usage = usage
    return updated


def with_worker_figures(record: BatchRecord, progress: list[ShardProgress | None]) -> BatchRecord:
    """The record with the first result time and worker seconds of its shards (metrics)."""
    firsts = [p.first_result_at for p in progress if p and p.first_result_at is not None]
    updated = record.model_copy(deep=True)
    if firsts:
        updated.first_result_at = min(firsts + ([record.first_result_at] if record.first_result_at else []))
    updated.gpu_seconds = max(record.gpu_seconds, sum(p.gpu_seconds for p in progress if p))
    return updated


def finish(
    store: ObjectStore,
    files: FileService,
    record: BatchRecord,
    *,
    missing_code: str,
    failed_shards: frozenset[int] = frozenset(),
    now: int,
) -> BatchRecord:
    """Merge every shard's results into the output and error files and move the
    batch to its terminal status: completed/failed (finalizing), cancelled
    (cancelling) or expired (in_progress past its window)."""
    if record.status == BatchStatus.IN_PROGRESS and missing_code != "batch_expired":
        record = state.transition(record, BatchStatus.FINALIZING, now)
    if record.shard_count is None and record.status != BatchStatus.VALIDATING and record.request_counts.total:
        # Cancelled or expired before launch: one shard so every line still gets its error line.
        write_shards(store, record.project, record.id, input_lines(files, record), 1)
        record = record.model_copy(update={"shard_count": 1})
    record = with_worker_figures(record, read_progress(store, record))
    merged = merge_shards(
        store, record.project, record.id, record.shard_count or 0, missing_code=missing_code, failed_shards=failed_shards
    )
    try:
        done = record.model_copy(deep=True)
        done.request_counts = merged.counts if merged.counts.total else record.request_counts
        done.usage = merged.usage
        if merged.counts.completed:
            done.output_file_id = _store_result(files, record, merged.output, kind="output").id
        if merged.counts.failed:
            done.error_file_id = _store_result(files, record, merged.errors, kind="error").id
    finally:
        merged.close()
    if failed_shards:
        done.errors = BatchErrors(
            data=[
                BatchErrorItem(code="shard_failed", message=f"shard {n} failed past its retry budget")
                for n in sorted(failed_shards)
            ]
        )
    if done.status == BatchStatus.FINALIZING:
        to = state.outcome_status(done.shard_count or 0, len(failed_shards))
    elif done.status == BatchStatus.CANCELLING:
        to = BatchStatus.CANCELLED
    else:
        to = BatchStatus.EXPIRED
    return state.transition(done, to, now)


def _store_result(files: FileService, record: BatchRecord, spool, *, kind: str):
    return files.create(
        record.project,
        iter(lambda: spool.read(1 << 20), b""),
        filename=f"{record.id}_{kind}.jsonl",
        purpose=FilePurpose.BATCH_OUTPUT,
        is_error=True if kind == "error" else None,
        file_id=result_file_id(record.id, kind),
        expires_after_seconds=record.output_expires_after_seconds or files.output_retention_seconds,
    )


def remove_working_data(store: ObjectStore, record: BatchRecord) -> None:
    """Shards, parts and progress of a finished batch (its result files stay)."""
    store.delete_prefix(batch_prefix(record.project, record.id))
