"""Wire models: the exact JSON shapes of the Files and Batches API (OpenAI's).

These pydantic models are the wire truth for the gateway, the CLI, the worker and
the operator. Internal bookkeeping lives in `BatchRecord`, which extends the wire
object with what only the service needs (project, cancel flag, shard plan).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_serializer

CHAT_COMPLETIONS = "/v1/chat/completions"
SUPPORTED_ENDPOINTS = (CHAT_COMPLETIONS,)


class FilePurpose(StrEnum):
    BATCH = "batch"
    BATCH_OUTPUT = "batch_output"


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None = None
    filename: str
    purpose: FilePurpose
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    # vbatch extension, present only on error result files.
    is_error: bool | None = None

    @model_serializer(mode="wrap")
    def _drop_absent_extension(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("is_error") is None:
            data.pop("is_error", None)
        return data


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.input_tokens += prompt_tokens
        self.output_tokens += completion_tokens
        self.total_tokens += prompt_tokens + completion_tokens


class BatchErrorItem(BaseModel):
    code: str | None = None
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchErrorItem] = Field(default_factory=list)


class Batch(BaseModel):
    """The Batch object exactly as the API returns it."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = None
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    usage: BatchUsage | None = None
    metadata: dict[str, str] | None = None


class StepFailure(BaseModel):
    """The last failed step of a batch's driver, kept on the record so that the retry
    budget survives restarts and the failure is visible (a condition, events, logs)."""

    action: str  # the step: validate, launch, wait, finalize, cancel, expire, clean_up
    kind: str  # transient | permanent (vbatch.core.errors.classify)
    code: str
    message: str
    attempts: int = 1
    first_at: float = 0.0
    last_at: float = 0.0
    retry_at: float = 0.0  # not before: the backoff


class BatchRecord(Batch):
    """A Batch plus what only the service needs. Never sent over the wire as is."""

    project: str
    cancel_requested: bool = False
    shard_count: int | None = None
    # Shards asked for (a Batch resource's spec.shards); None: planned from the size.
    requested_shards: int | None = None
    # Working data (shards, parts, progress) may exist and must be removed once the batch
    # is terminal: set by LAUNCH (and every terminal save), cleared after the removal, so
    # a crash in between brings the clean-up back (status.jobName on the Batch resource).
    cleanup_pending: bool = False
    step_failure: StepFailure | None = None
    # Optimistic concurrency: the store's version of this record (a counter in
    # SQLite, metadata.resourceVersion for custom resources). Saving a record
    # whose revision is stale fails, so a driver never overwrites a cancel.
    revision: str | None = None
    # Seconds the result files live (output_expires_after); None: the default.
    output_expires_after_seconds: int | None = None
    # Worker figures, summed from the shards' progress records (metrics).
    first_result_at: float | None = None
    gpu_seconds: float = 0.0

    def to_wire(self) -> Batch:
        return Batch.model_validate(self.model_dump(include=set(Batch.model_fields)))


MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


def metadata_problem(metadata: dict[str, str] | None) -> str | None:
    """What is wrong with a batch's metadata (OpenAI's limits), or None."""
    metadata = metadata or {}
    if len(metadata) > MAX_METADATA_PAIRS:
        return f"at most {MAX_METADATA_PAIRS} key-value pairs are allowed"
    if any(len(k) > MAX_METADATA_KEY for k in metadata):
        return f"keys are at most {MAX_METADATA_KEY} characters"
    if any(len(v) > MAX_METADATA_VALUE for v in metadata.values()):
        return f"values are at most {MAX_METADATA_VALUE} characters"
    return None


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    # OpenAI accepts this on create; vbatch has nothing to do with it but must not reject it.
    output_expires_after: dict[str, Any] | None = None


T = TypeVar("T")


class ListPage(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False

    @classmethod
    def of(cls, data: list[T], *, has_more: bool) -> "ListPage[T]":
        """A page whose first_id/last_id are those of its items (the cursor for `after`)."""
        return cls(
            data=data,
            first_id=data[0].id if data else None,  # type: ignore[attr-defined]
            last_id=data[-1].id if data else None,  # type: ignore[attr-defined]
            has_more=has_more,
        )


# --- JSONL lines -----------------------------------------------------------------


class ResponseEnvelope(BaseModel):
    status_code: int
    request_id: str
    body: dict[str, Any]


class LineError(BaseModel):
    code: str
    message: str
    param: str | None = None


class ResultLine(BaseModel):
    """One line of an output or error file."""

    id: str
    custom_id: str
    response: ResponseEnvelope | None = None
    error: LineError | None = None

    @property
    def succeeded(self) -> bool:
        return self.error is None and self.response is not None and self.response.status_code == 200
