"""The Batch custom resource, defined once: a typed model of its spec and status.

These pydantic models are the only description of the resource. The CRD's schema is
generated from them (`make crds` -> crds/ and the chart's copy; a unit test fails when
the committed files differ), and they are the mapping both ways between a
`BatchRecord` and the camelCase resource dict (`resource_from_record`,
`record_from_resource`) that the gateway's store and the operator read and write.

Field names are camelCase like every Kubernetes API (aliases); the wire names stay in
`vbatch.core.schemas`. The schema is structural, so the API server prunes any field not
declared here: a status field the operator writes must be a field of `BatchStatusFields`.
No Kubernetes client here: plain dicts in, plain dicts out.
"""

from __future__ import annotations

import datetime
import hashlib
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from vbatch.core.ids import batch_id_from_object_name, batch_object_name
from vbatch.core.projects import PROJECT_ID_PATTERN
from vbatch.core.schemas import (
    SUPPORTED_ENDPOINTS,
    BatchErrorItem,
    BatchErrors,
    BatchRecord,
    BatchStatus,
    BatchUsage,
    InputTokensDetails,
    OutputTokensDetails,
    RequestCounts,
    StepFailure,
)

GROUP = "vbatch.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "Batch"
PLURAL = "batches"
SINGULAR = "batch"
SHORT_NAMES = ["vb"]
CRD_NAME = f"{PLURAL}.{GROUP}"

LABEL_PROJECT = "vbatch.dev/project"
LABEL_BATCH = "vbatch.dev/batch"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
# Annotations make the resource self-describing from the moment it is created: the API
# server drops `status` on create (status subresource), so these survive a crash between
# creating the resource and writing its first status.
ANNOTATION_BATCH_ID = "vbatch.dev/batch-id"
ANNOTATION_CREATED_AT = "vbatch.dev/created-at"

# (record field, status alias): the lifecycle timestamps, all Unix seconds.
TIMESTAMPS = (
    ("created_at", "createdAt"),
    ("in_progress_at", "inProgressAt"),
    ("expires_at", "expiresAt"),
    ("finalizing_at", "finalizingAt"),
    ("completed_at", "completedAt"),
    ("failed_at", "failedAt"),
    ("expired_at", "expiredAt"),
    ("cancelling_at", "cancellingAt"),
    ("cancelled_at", "cancelledAt"),
)

_LABEL_VALUE_BAD = re.compile(r"[^A-Za-z0-9._-]+")


def label_value(raw: str) -> str:
    """Any string -> a valid label value (<=63 chars, alnum at both ends).

    When a value needs changing, a short hash of the original keeps two different
    inputs from sharing one label value.
    """
    clean = _LABEL_VALUE_BAD.sub("-", raw).strip("-_.")
    if clean == raw and len(raw) <= 63:
        return raw
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    return f"{clean[:54].rstrip('-_.')}-{digest}".lstrip("-")


def project_label(project: str) -> str:
    """The value of the `vbatch.dev/project` label for a project: the one place it is made.

    Project ids are label-safe except in length (64 chars, labels 63), so nearly
    always the id itself.
    """
    return label_value(project)


# --- the model ----------------------------------------------------------------------


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


MetadataValue = Annotated[str, Field(max_length=512)]
Count = Annotated[int, Field(ge=0)]
UnixSeconds = int


class BatchSpec(_Camel):
    """What the client asked for."""

    input_file_id: str = Field(pattern="^file-", max_length=128)
    endpoint: Literal[SUPPORTED_ENDPOINTS]  # type: ignore[valid-type]  (a new endpoint: `make crds`)
    completion_window: Literal["24h"]
    model: str | None = Field(default=None, max_length=253)
    project: str = Field(pattern=PROJECT_ID_PATTERN,
                         description="The project id; the label vbatch.dev/project carries it too.")
    metadata: dict[str, MetadataValue] | None = Field(default=None, max_length=16)
    cancel_requested: bool = Field(default=False, json_schema_extra={"default": False})
    shards: int | None = Field(default=None, ge=1, le=256)
    parallelism: int | None = Field(default=None, ge=1, le=256)
    output_expires_after_seconds: int | None = Field(
        default=None, ge=1, le=2592000,
        description="Lifetime of the result files (the API's output_expires_after.seconds); default: the setting.")


class RequestCountsStatus(_Camel):
    total: Count = 0
    completed: Count = 0
    failed: Count = 0


class UsageStatus(_Camel):
    input_tokens: Count = 0
    output_tokens: Count = 0
    total_tokens: Count = 0
    cached_tokens: Count = 0
    reasoning_tokens: Count = 0


class Condition(_Camel):
    type: str = Field(max_length=316)
    status: Literal["True", "False", "Unknown"]
    observed_generation: int | None = Field(default=None, ge=0, json_schema_extra={"format": "int64"})
    last_transition_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    reason: str | None = Field(default=None, max_length=1024)
    message: str | None = Field(default=None, max_length=32768)


class StepFailureStatus(_Camel):
    """The last failed step of the driver for this batch (retried with backoff until the
    budget is spent; then the batch ends naming it in errors)."""

    action: str
    kind: Literal["transient", "permanent"] = "transient"
    code: str
    message: str
    attempts: int = Field(ge=1)
    first_at: float | None = None
    last_at: float | None = None
    retry_at: float | None = None


class BatchStatusFields(_Camel):
    """What happened, written by the gateway and operator through /status only."""

    phase: BatchStatus | None = None
    request_counts: RequestCountsStatus | None = None
    usage: UsageStatus | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[BatchErrorItem] | None = None
    # Unix seconds, like the API (not RFC 3339: the gateway returns them as is).
    created_at: UnixSeconds | None = None
    in_progress_at: UnixSeconds | None = None
    expires_at: UnixSeconds | None = None
    finalizing_at: UnixSeconds | None = None
    completed_at: UnixSeconds | None = None
    failed_at: UnixSeconds | None = None
    expired_at: UnixSeconds | None = None
    cancelling_at: UnixSeconds | None = None
    cancelled_at: UnixSeconds | None = None
    # Set while the batch has a Job or working data to clean up; cleared last.
    job_name: str | None = None
    step_failure: StepFailureStatus | None = None
    shard_count: int | None = Field(default=None, ge=1)
    observed_generation: int | None = Field(default=None, json_schema_extra={"format": "int64"})
    conditions: list[Condition] | None = Field(
        default=None, json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    # kopf keeps its handler progress here; its shape is kopf's business.
    kopf: dict[str, Any] | None = Field(default=None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})


class BatchResource(_Camel):
    """A vbatch batch: OpenAI Batch API semantics, run by the vbatch operator."""

    api_version: str = API_VERSION
    kind: str = KIND
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: BatchSpec
    status: BatchStatusFields | None = None


# --- record <-> resource ------------------------------------------------------------


def _dump(model: BaseModel) -> dict[str, Any]:
    # The CRD rejects nulls, so absent optional fields are left out, not written as null.
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def status_model_from_record(record: BatchRecord) -> BatchStatusFields:
    counts = record.request_counts
    usage = record.usage
    return BatchStatusFields(
        phase=record.status,
        request_counts=RequestCountsStatus(total=counts.total, completed=counts.completed, failed=counts.failed),
        usage=None if usage is None else UsageStatus(
            input_tokens=usage.input_tokens, output_tokens=usage.output_tokens, total_tokens=usage.total_tokens,
            cached_tokens=usage.input_tokens_details.cached_tokens,
            reasoning_tokens=usage.output_tokens_details.reasoning_tokens),
        output_file_id=record.output_file_id,
        error_file_id=record.error_file_id,
        errors=None if record.errors is None else list(record.errors.data),
        shard_count=record.shard_count,
        step_failure=None if record.step_failure is None else StepFailureStatus.model_validate(
            record.step_failure.model_dump()),
        conditions=[succeeded_condition(record)],
        **{field: getattr(record, field) for field, _ in TIMESTAMPS},
    )


def status_from_record(record: BatchRecord) -> dict[str, Any]:
    """The resource's status for a record: what gets written through /status."""
    return _dump(status_model_from_record(record))


def spec_from_record(record: BatchRecord, *, shards: int | None = None,
                     parallelism: int | None = None) -> dict[str, Any]:
    return _dump(BatchSpec(
        input_file_id=record.input_file_id, endpoint=record.endpoint, completion_window=record.completion_window,
        model=record.model, project=record.project, metadata=record.metadata,
        cancel_requested=record.cancel_requested, shards=shards, parallelism=parallelism,
        output_expires_after_seconds=record.output_expires_after_seconds))


def resource_from_record(record: BatchRecord, namespace: str, *, shards: int | None = None,
                         parallelism: int | None = None) -> dict[str, Any]:
    name = batch_object_name(record.id)
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {LABEL_PROJECT: project_label(record.project), LABEL_BATCH: name, LABEL_MANAGED_BY: "vbatch"},
        "annotations": {ANNOTATION_BATCH_ID: record.id, ANNOTATION_CREATED_AT: str(record.created_at)},
    }
    if record.revision is not None:
        # A write carrying it fails with 409 if the resource changed since the record was read.
        metadata["resourceVersion"] = record.revision
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata,
            "spec": spec_from_record(record, shards=shards, parallelism=parallelism),
            "status": status_from_record(record)}


def record_from_resource(obj: dict[str, Any]) -> BatchRecord:
    """The exact inverse of `resource_from_record` (ValidationError on a malformed one)."""
    resource = BatchResource.model_validate(obj)
    meta, spec = resource.metadata, resource.spec
    status = resource.status or BatchStatusFields()
    counts = status.request_counts or RequestCountsStatus()
    usage = status.usage
    created_at = status.created_at
    if created_at is None:
        created_at = (meta.get("annotations") or {}).get(ANNOTATION_CREATED_AT)
    fields: dict[str, Any] = {field: getattr(status, field) for field, _ in TIMESTAMPS}
    fields.update(
        id=batch_id_from_object_name(meta["name"]),
        endpoint=spec.endpoint,
        model=spec.model,
        input_file_id=spec.input_file_id,
        completion_window=spec.completion_window,
        metadata=spec.metadata,
        project=spec.project,
        cancel_requested=spec.cancel_requested,
        # A resource whose first status write has not landed yet is a batch being validated.
        status=status.phase or BatchStatus.VALIDATING,
        request_counts=RequestCounts(total=counts.total, completed=counts.completed, failed=counts.failed),
        output_file_id=status.output_file_id,
        error_file_id=status.error_file_id,
        shard_count=status.shard_count,
        requested_shards=spec.shards,
        output_expires_after_seconds=spec.output_expires_after_seconds,
        cleanup_pending=bool(status.job_name),
        step_failure=None if status.step_failure is None else StepFailure.model_validate(
            status.step_failure.model_dump(exclude_none=True)),
        # The store's optimistic-concurrency token: saving with a stale one gets 409.
        revision=meta.get("resourceVersion"),
        usage=None if usage is None else BatchUsage(
            input_tokens=usage.input_tokens, output_tokens=usage.output_tokens, total_tokens=usage.total_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=usage.cached_tokens),
            output_tokens_details=OutputTokensDetails(reasoning_tokens=usage.reasoning_tokens)),
        errors=None if status.errors is None else BatchErrors(data=list(status.errors)),
        created_at=int(created_at) if created_at is not None else 0,
    )
    return BatchRecord(**fields)


_LAST_RFC3339_SECOND = 253402300799  # 9999-12-31T23:59:59Z


def succeeded_condition(record: BatchRecord) -> Condition:
    """One standard condition for tools that wait on conditions
    (`kubectl wait --for=condition=Succeeded batch/...`): True once completed,
    False once failed/expired/cancelled, Unknown while the batch runs."""
    if record.status == BatchStatus.COMPLETED:
        value = "True"
    elif record.status.is_terminal:
        value = "False"
    else:
        value = "Unknown"
    # The latest lifecycle stamp (expires_at is a deadline, not a transition).
    stamps = (getattr(record, field) for field, _ in TIMESTAMPS if field != "expires_at")
    since = max((t for t in stamps if t is not None), default=record.created_at)
    since = min(max(since, 0), _LAST_RFC3339_SECOND)
    counts = record.request_counts
    return Condition(
        type="Succeeded",
        status=value,
        reason="".join(part.capitalize() for part in record.status.value.split("_")),
        message=f"{counts.completed} completed, {counts.failed} failed of {counts.total}",
        last_transition_time=datetime.datetime.fromtimestamp(since, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
