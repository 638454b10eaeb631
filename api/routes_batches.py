"""/v1/batches: create (validating the whole input first), list, retrieve, cancel.

Handlers are plain `def`: validation streams the input file from storage and the
store commits durably, both blocking, so FastAPI runs them in its thread pool.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated

from fastapi import APIRouter, Query
from vbatch.api import metrics
from vbatch.api.auth import ProjectDep, ServicesDep
from vbatch.api.errors import ERROR_RESPONSES
from vbatch.api.services import Services
from vbatch.core import lifecycle, state
from vbatch.core.errors import InvalidRequest, NotFound, VBatchError, clip
from vbatch.core.expiry import parse_expires_after
from vbatch.core.schemas import (
    SUPPORTED_ENDPOINTS,
    Batch,
    BatchRecord,
    CreateBatchRequest,
    FilePurpose,
    ListPage,
    metadata_problem,
)
from vbatch.core.validation import raise_for_report, validate_jsonl

log = logging.getLogger("vbatch.api")

DEFAULT_PAGE = 20
MAX_PAGE = 100

router = APIRouter(prefix="/v1/batches", tags=["batches"], responses=ERROR_RESPONSES | {409: ERROR_RESPONSES[400]})


def check_request(body: CreateBatchRequest, services: Services) -> int:
    """The request's own fields (before any file is read). Returns the window in seconds."""
    parse_expires_after(body.output_expires_after, param="output_expires_after",
                        min_seconds=services.settings.file_expiry_min_seconds)
    if body.endpoint not in SUPPORTED_ENDPOINTS:
        raise InvalidRequest(
            f"Invalid endpoint {clip(body.endpoint)!r}: supported endpoints are {', '.join(SUPPORTED_ENDPOINTS)}.",
            code="invalid_endpoint",
            param="endpoint",
        )
    windows = services.settings.limits.completion_windows
    if body.completion_window not in windows:
        raise InvalidRequest(
            f"Invalid completion_window {clip(body.completion_window)!r}: supported values are {', '.join(windows)}.",
            code="invalid_completion_window",
            param="completion_window",
        )
    problem = metadata_problem(body.metadata)
    if problem:
        raise InvalidRequest(f"Invalid metadata: {problem}.", code="invalid_metadata", param="metadata")
    return windows[body.completion_window]


def _create(body: CreateBatchRequest, project: str, services: Services) -> Batch:
    window_seconds = check_request(body, services)
    meta, chunks = services.files.open(project, body.input_file_id)  # 404 file_not_found
    if meta.purpose != FilePurpose.BATCH:
        raise InvalidRequest(
            f"File {meta.id} has purpose {meta.purpose.value!r}; a batch input file must have purpose 'batch'.",
            code="invalid_input_file_purpose",
            param="input_file_id",
        )
    report = validate_jsonl(
        chunks,
        endpoint=body.endpoint,
        served_models=services.served_models,
        limits=services.settings.limits,
    )
    raise_for_report(report)  # 400 naming the line
    record = state.new_batch(
        project=project,
        input_file_id=meta.id,
        endpoint=body.endpoint,
        completion_window=body.completion_window,
        metadata=body.metadata,
        total=report.total,
        model=report.model,
        window_seconds=window_seconds,
        now=int(time.time()),
    )
    record.output_expires_after_seconds = parse_expires_after(
        body.output_expires_after, param="output_expires_after", min_seconds=services.settings.file_expiry_min_seconds)
    # The batch's own copy of its requests, before the batch exists: deleting the input
    # file afterwards neither stops it nor loses a line from its result files.
    lifecycle.keep_input(services.files, record)  # 404 if the file was deleted meanwhile
    try:
        services.batches.create(record)  # durable once this returns: only then answer
    except BaseException:
        _forget_copy(services, record)
        raise
    metrics.BATCHES_CREATED.inc()
    services.runner.submitted(record)
    return record.to_wire()


def _forget_copy(services: Services, record: BatchRecord) -> None:
    try:
        lifecycle.remove_working_data(services.files.store, record)
    except Exception as exc:  # best effort: the create's own error is what the client needs
        log.warning("batch %s was not created; its input copy could not be removed: %s", record.id, exc)


@router.post("", response_model=Batch, summary="Create a batch (validates the whole input file first)")
def create_batch(body: CreateBatchRequest, project: ProjectDep, services: ServicesDep) -> Batch:
    try:
        return _create(body, project, services)
    except VBatchError as exc:
        metrics.BATCHES_REJECTED.labels(exc.code or "none").inc()
        raise


@router.get("", response_model=ListPage[Batch], summary="List batches, newest first")
def list_batches(
    project: ProjectDep,
    services: ServicesDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
) -> ListPage[Batch]:
    records, has_more = services.batches.list_page(project, after=after, limit=limit)
    return ListPage[Batch].of([r.to_wire() for r in records], has_more=has_more)


def _not_found(batch_id: str) -> NotFound:
    return NotFound(f"No such batch: {clip(batch_id)}", code="batch_not_found", param="batch_id")


def _get(services: Services, project: str, batch_id: str) -> BatchRecord:
    record = services.batches.get(project, batch_id)
    if record is None:
        raise _not_found(batch_id)
    return record


@router.get("/{batch_id}", response_model=Batch, summary="Retrieve a batch")
def retrieve_batch(batch_id: str, project: ProjectDep, services: ServicesDep) -> Batch:
    return _get(services, project, batch_id).to_wire()


@router.post("/{batch_id}/cancel", response_model=Batch, summary="Cancel a batch")
def cancel_batch(batch_id: str, project: ProjectDep, services: ServicesDep) -> Batch:
    # The store applies state.request_cancel atomically: 409 for finished batches.
    record = services.batches.request_cancel(project, batch_id)
    if record is None:
        raise _not_found(batch_id)
    services.runner.cancel_requested(record)
    return record.to_wire()
