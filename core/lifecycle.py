"""The steps a driver carries out for a batch, shared by both ways of running.

`vbatch.core.state.next_action` says which step is due; these functions do the
I/O of each step against the object store and the file service, and return the
updated record for the driver to save. Running a step twice is harmless: shard
objects are rewritten whole, and result files have ids derived from the batch
id, so a finalize interrupted by a crash overwrites its own earlier attempt.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Collection, Iterator

import orjson
from vbatch.core import state
from vbatch.core.config import Limits, Settings
from vbatch.core.errors import NotFound
from vbatch.core.files import FileService
from vbatch.core.layout import ShardProgress, batch_prefix, input_key, progress_key
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

log = logging.getLogger("vbatch.driver")


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
    try:
        keep_input(files, record)
    except NotFound as exc:  # deleted while it was being validated
        failed = state.transition(record, BatchStatus.FAILED, now)
        failed.errors = BatchErrors(data=[BatchErrorItem(code="file_not_found", message=str(exc), param="input_file_id")])
        return failed
    return state.validated(record, total=report.total, model=report.model, now=now)


def keep_input(files: FileService, record: BatchRecord) -> None:
    """Copy a validated batch's input file under the batch's working prefix (a hard link
    or a server-side copy: no bytes move, no space is taken twice on a local disk;
    rewriting it is harmless). From then on the batch owns its requests:
    deleting the input file does not stop it from running, nor from listing every request
    in its error file if it is cancelled or expires first. The copy goes with the rest of
    the working data when the batch has ended. NotFound if the input file is gone."""
    files.copy_content(record.project, record.input_file_id, input_key(record.project, record.id))


def input_lines(store: ObjectStore, files: FileService, record: BatchRecord) -> Iterator[bytes]:
    """The batch's request lines: from its kept copy, else (a batch created before copies
    were kept, or one whose creation crashed before the copy) from the input file.
    NotFound if neither exists."""
    try:
        chunks = store.get_stream(input_key(record.project, record.id))
    except ObjectNotFound:
        _, chunks = files.open(record.project, record.input_file_id)
    return normalized_lines(chunks)


def launch(store: ObjectStore, files: FileService, record: BatchRecord, settings: Settings, *, max_shards: int | None = None, requested: int | None = None) -> BatchRecord:
    """Plan and write the shard objects from the batch's copy of its input; the driver
    then starts one worker per shard. A batch runs even if its input file was deleted
    after it was created (as OpenAI's do). Only a batch with neither the copy nor the
    file (one created before copies were kept) fails (in_progress -> finalizing ->
    failed, errors saying why): retrying could never succeed."""
    try:
        lines = input_lines(store, files, record)
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
    write_shards(store, record.project, record.id, lines, count)
    launched = record.model_copy(deep=True)
    launched.shard_count = count
    return launched


def read_progress(store: ObjectStore, record: BatchRecord) -> list[ShardProgress | None]:
    """Each shard's progress record, None where there is none yet, or it cannot be read:
    progress is advisory (the parts are the truth, and the worker rewrites it whole after
    every part), so an unreadable one never stops a batch."""
    progress: list[ShardProgress | None] = []
    for shard in range(record.shard_count or 0):
        try:
            raw = store.get_bytes(progress_key(record.project, record.id, shard))
            progress.append(ShardProgress.model_validate(orjson.loads(raw)))
        except ObjectNotFound:
            progress.append(None)
        except ValueError as exc:
            log.warning("batch %s: progress of shard %d unreadable (%s); counted as not finished", record.id, shard, exc)
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
    missing_message: str | None = None,
    failed_shards: frozenset[int] = frozenset(),
    to: BatchStatus | None = None,
    errors: list[BatchErrorItem] | None = None,
    now: int,
) -> BatchRecord:
    """Merge every shard's results into the output and error files and move the
    batch to its terminal status `to` (by default: completed/failed from finalizing,
    cancelled from cancelling, expired from in_progress). Requests without a result
    get error lines with `missing_code`; `errors` are put first in the batch's errors."""
    if to is None:
        to = _default_end(record, missing_code, failed_shards)
    if record.status == BatchStatus.IN_PROGRESS and to in (BatchStatus.COMPLETED, BatchStatus.FAILED):
        record = state.transition(record, BatchStatus.FINALIZING, now)
    items = list(errors or [])
    if record.shard_count is None and record.status != BatchStatus.VALIDATING and record.request_counts.total:
        # Ended before launch: one shard from the batch's copy of its input, so every
        # line gets its error line, even when the input file was deleted meanwhile.
        try:
            write_shards(store, record.project, record.id, input_lines(store, files, record), 1)
            record = record.model_copy(update={"shard_count": 1})
        except NotFound:
            # Neither the copy nor the input (a batch from before copies were kept): no line
            # can be named. The counts say how many requests did not run; errors say why.
            return _end_without_lines(record, to, items, now)
    record = with_worker_figures(record, read_progress(store, record))
    merged = merge_shards(
        store, record.project, record.id, record.shard_count or 0, missing_code=missing_code,
        missing_message=missing_message, failed_shards=failed_shards,
    )
    try:
        done = record.model_copy(deep=True)
        done.request_counts = merged.counts if merged.counts.total else record.request_counts
        done.usage = merged.usage
        if merged.counts.completed:
            done.output_file_id = _store_result(files, record, merged.output, kind="output").id
        if merged.counts.failed:
            done.error_file_id = _store_result(files, record, merged.errors, kind="error").id
        unreadable = len(merged.unreadable_parts)
    finally:
        merged.close()
    items += [BatchErrorItem(code="shard_failed", message=f"shard {n} failed past its retry budget")
              for n in sorted(failed_shards)]
    if unreadable:
        items.append(BatchErrorItem(code="result_unreadable", message=(
            f"{unreadable} result part(s) could not be read and were skipped; "
            "their requests are error lines with code result_unreadable")))
    if items:
        done.errors = BatchErrors(data=items)
    if to == BatchStatus.COMPLETED and done.status == BatchStatus.FINALIZING:
        to = state.outcome_status(done.shard_count or 0, len(failed_shards))
    return state.transition(done, to, now)


def _default_end(record: BatchRecord, missing_code: str, failed_shards: frozenset[int]) -> BatchStatus:
    if record.status == BatchStatus.CANCELLING:
        return BatchStatus.CANCELLED
    if record.status == BatchStatus.IN_PROGRESS and missing_code == "batch_expired":
        return BatchStatus.EXPIRED
    return BatchStatus.COMPLETED  # finalize: completed, or failed if every shard failed


def _end_without_lines(record: BatchRecord, to: BatchStatus, items: list[BatchErrorItem], now: int) -> BatchRecord:
    total = record.request_counts.total
    done = record.model_copy(deep=True)
    done.request_counts = RequestCounts(total=total, completed=0, failed=total)
    items.append(BatchErrorItem(code="input_file_not_found", param="input_file_id", message=(
        f"The input file {record.input_file_id} was deleted before the batch started: its {total} "
        "request(s) did not run, and without the file they cannot be listed in an error file.")))
    done.errors = BatchErrors(data=items)
    return _end(done, BatchStatus.FAILED if to == BatchStatus.COMPLETED else to, now)


def _end(record: BatchRecord, to: BatchStatus, now: int) -> BatchRecord:
    if record.status == BatchStatus.IN_PROGRESS and to in (BatchStatus.COMPLETED, BatchStatus.FAILED):
        record = state.transition(record, BatchStatus.FINALIZING, now)
    return state.transition(record, to, now)


def end_unmerged(record: BatchRecord, to: BatchStatus, errors: list[BatchErrorItem], now: int) -> BatchRecord:
    """The last resort when even merging fails past the budget: end the batch with its
    errors and the counts it had; result files cannot be written."""
    done = record.model_copy(deep=True)
    done.errors = BatchErrors(data=list(errors))
    return _end(done, to, now)


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
