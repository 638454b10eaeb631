"""Pure builders of the Kubernetes objects vbatch creates: Batch CRs, shard Jobs, Events.

No API calls here: each function maps domain values to a plain dict, so every manifest
can be tested (and schema-validated) without a cluster. The Batch CR is the durable
form of a `BatchRecord`; `batch_record_from_resource` is its exact inverse.
"""

from __future__ import annotations

import datetime
import hashlib
import re
from typing import Any

from vbatch.core.ids import batch_id_from_object_name, batch_object_name
from vbatch.core.schemas import (
    BatchErrorItem,
    BatchErrors,
    BatchRecord,
    BatchStatus,
    BatchUsage,
    InputTokensDetails,
    OutputTokensDetails,
    RequestCounts,
)
from vbatch.operator.config import WorkerPodConfig

GROUP = "vbatch.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "Batch"
PLURAL = "batches"

LABEL_PROJECT = "vbatch.dev/project"
LABEL_BATCH = "vbatch.dev/batch"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
# Annotations make the CR self-describing from the moment it is created: the API server
# drops `status` on create (status subresource), so these are what survives a crash
# between creating the CR and writing its first status.
ANNOTATION_BATCH_ID = "vbatch.dev/batch-id"
ANNOTATION_CREATED_AT = "vbatch.dev/created-at"
WORKER_CONTAINER = "worker"

# (record field, status key): the lifecycle timestamps, all Unix seconds.
_TIMESTAMPS = (
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

    Project names are free-form; when a name needs changing, a short hash of the
    original keeps two different projects from sharing one label value.
    """
    clean = _LABEL_VALUE_BAD.sub("-", raw).strip("-_.")
    if clean == raw and len(raw) <= 63:
        return raw
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    return f"{clean[:54].rstrip('-_.')}-{digest}".lstrip("-")


def project_label(project: str) -> str:
    """The `vbatch.dev/project` label value of a project: what the gateway stamps on the
    Batches it creates, what the operator stamps on kubectl-applied ones, and what the
    CR store selects by. Project ids may be 64 chars and end in `.`/`_`/`-`, which a
    label value may not; those get a hash-suffixed value (see `label_value`)."""
    return label_value(project)


def project_label_fix(spec: dict[str, Any] | None, labels: dict[str, str] | None) -> str | None:
    """The label value a Batch must get, or None when its label is already right:
    a Batch applied with kubectl carries no label, so the API could not list it."""
    project = (spec or {}).get("project")
    if not isinstance(project, str) or not project:
        return None
    wanted = project_label(project)
    return None if (labels or {}).get(LABEL_PROJECT) == wanted else wanted


def job_name(batch_name: str) -> str:
    """The shard Job of a Batch; pods are `<job>-<index>-<suffix>`, well under 63 chars."""
    return f"{batch_name}-shards"


def owner_reference(*, name: str, uid: str, api_version: str = API_VERSION, kind: str = KIND) -> dict:
    # controller: the Job is the Batch's alone; blockOwnerDeletion: foreground deletion of a
    # Batch waits for its Job (and the Job's pods) to go first.
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


# --- Batch custom resource ---------------------------------------------------------


def build_batch_resource(
    record: BatchRecord,
    namespace: str,
    *,
    shards: int | None = None,
    parallelism: int | None = None,
) -> dict[str, Any]:
    name = batch_object_name(record.id)
    spec: dict[str, Any] = {
        "inputFileId": record.input_file_id,
        "endpoint": record.endpoint,
        "completionWindow": record.completion_window,
        "project": record.project,
        "cancelRequested": record.cancel_requested,
    }
    if record.model is not None:
        spec["model"] = record.model
    if record.metadata is not None:
        spec["metadata"] = dict(record.metadata)
    if shards is not None:
        spec["shards"] = shards
    if parallelism is not None:
        spec["parallelism"] = parallelism
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {LABEL_PROJECT: project_label(record.project), LABEL_MANAGED_BY: "vbatch"},
        "annotations": {ANNOTATION_BATCH_ID: record.id, ANNOTATION_CREATED_AT: str(record.created_at)},
    }
    if record.revision is not None:
        # A PUT carrying it fails with 409 if the CR changed since the record was read.
        metadata["resourceVersion"] = record.revision
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec,
            "status": build_batch_status(record)}


def build_batch_status(record: BatchRecord) -> dict[str, Any]:
    """The CR status for a record: what the operator writes through /status."""
    counts = record.request_counts
    status: dict[str, Any] = {
        "phase": record.status.value,
        "requestCounts": {"total": counts.total, "completed": counts.completed, "failed": counts.failed},
    }
    if record.usage is not None:
        u = record.usage
        status["usage"] = {
            "inputTokens": u.input_tokens,
            "outputTokens": u.output_tokens,
            "totalTokens": u.total_tokens,
            "cachedTokens": u.input_tokens_details.cached_tokens,
            "reasoningTokens": u.output_tokens_details.reasoning_tokens,
        }
    if record.output_file_id is not None:
        status["outputFileId"] = record.output_file_id
    if record.error_file_id is not None:
        status["errorFileId"] = record.error_file_id
    if record.errors is not None:
        # The CRD rejects nulls, so absent optional fields are left out, not written as null.
        status["errors"] = [item.model_dump(exclude_none=True) for item in record.errors.data]
    for field, key in _TIMESTAMPS:
        value = getattr(record, field)
        if value is not None:
            status[key] = value
    if record.shard_count is not None:
        status["shardCount"] = record.shard_count
    status["conditions"] = [_succeeded_condition(record)]
    return status


_LAST_RFC3339_SECOND = 253402300799  # 9999-12-31T23:59:59Z


def _succeeded_condition(record: BatchRecord) -> dict[str, Any]:
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
    stamps = (getattr(record, field) for field, _ in _TIMESTAMPS if field != "expires_at")
    since = max((t for t in stamps if t is not None), default=record.created_at)
    since = min(max(since, 0), _LAST_RFC3339_SECOND)
    counts = record.request_counts
    return {
        "type": "Succeeded",
        "status": value,
        "reason": "".join(part.capitalize() for part in record.status.value.split("_")),
        "message": f"{counts.completed} completed, {counts.failed} failed of {counts.total}",
        "lastTransitionTime": datetime.datetime.fromtimestamp(since, tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def batch_record_from_resource(obj: dict[str, Any]) -> BatchRecord:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    annotations = meta.get("annotations") or {}
    counts = status.get("requestCounts") or {}
    usage = status.get("usage")
    errors = status.get("errors")
    created_at = status.get("createdAt", annotations.get(ANNOTATION_CREATED_AT))
    fields: dict[str, Any] = {
        "id": batch_id_from_object_name(meta["name"]),
        "endpoint": spec["endpoint"],
        "model": spec.get("model"),
        "input_file_id": spec["inputFileId"],
        "completion_window": spec["completionWindow"],
        "metadata": spec.get("metadata"),
        "project": spec["project"],
        "cancel_requested": bool(spec.get("cancelRequested", False)),
        # A CR whose first status write has not landed yet is a batch being validated.
        "status": status.get("phase", "validating"),
        "request_counts": RequestCounts(**{k: counts.get(k, 0) for k in ("total", "completed", "failed")}),
        "output_file_id": status.get("outputFileId"),
        "error_file_id": status.get("errorFileId"),
        "shard_count": status.get("shardCount"),
        # The store's optimistic-concurrency token: saving with a stale one gets 409.
        "revision": meta.get("resourceVersion"),
        "usage": None
        if usage is None
        else BatchUsage(
            input_tokens=usage.get("inputTokens", 0),
            output_tokens=usage.get("outputTokens", 0),
            total_tokens=usage.get("totalTokens", 0),
            input_tokens_details=InputTokensDetails(cached_tokens=usage.get("cachedTokens", 0)),
            output_tokens_details=OutputTokensDetails(reasoning_tokens=usage.get("reasoningTokens", 0)),
        ),
        "errors": None if errors is None else BatchErrors(data=[BatchErrorItem(**e) for e in errors]),
    }
    for field, key in _TIMESTAMPS:
        fields[field] = status.get(key)
    fields["created_at"] = int(created_at) if created_at is not None else 0
    return BatchRecord(**fields)


# --- the shard Job -----------------------------------------------------------------


def build_shard_job(
    *,
    batch_name: str,
    batch_uid: str,
    namespace: str,
    project: str,
    batch_id: str,
    model: str,
    shard_count: int,
    parallelism: int,
    worker: WorkerPodConfig,
) -> dict[str, Any]:
    """One Indexed Job for the whole batch: pod i runs shard i (JOB_COMPLETION_INDEX)."""
    if shard_count < 1:
        raise ValueError(f"shard_count must be >= 1, got {shard_count}")
    labels = {
        LABEL_BATCH: batch_name,
        LABEL_PROJECT: project_label(project),
        LABEL_MANAGED_BY: "vbatch",
        "app.kubernetes.io/name": "vbatch",
        "app.kubernetes.io/component": "worker",
    }
    job_labels = dict(labels)
    if worker.kueue_queue_name:
        job_labels[LABEL_KUEUE_QUEUE] = worker.kueue_queue_name
    spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": shard_count,
        "parallelism": max(1, min(parallelism, shard_count)),
        "backoffLimitPerIndex": worker.backoff_limit_per_index,
        # A shard that exhausts its retries must not stop the others: the batch still
        # finalizes, with `shard_failed` error lines for that shard's requests.
        "maxFailedIndexes": shard_count,
        "template": {"metadata": {"labels": labels}, "spec": _pod_spec(project, batch_id, model, worker)},
    }
    if worker.pod_failure_policy is not None:
        spec["podFailurePolicy"] = worker.pod_failure_policy
    if worker.kueue_queue_name:
        # Kueue admits a Job by unsuspending it; created running, it would bypass the queue.
        spec["suspend"] = True
    # No ttlSecondsAfterFinished: the operator deletes the Job after merging the results,
    # and a TTL could remove it (and its failure record) before the operator has looked.
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(batch_name),
            "namespace": namespace,
            "labels": job_labels,
            "annotations": {ANNOTATION_BATCH_ID: batch_id},
            "ownerReferences": [owner_reference(name=batch_name, uid=batch_uid)],
        },
        "spec": spec,
    }


def _pod_spec(project: str, batch_id: str, model: str, worker: WorkerPodConfig) -> dict[str, Any]:
    resources: dict[str, dict[str, Any]] = {k: dict(v) for k, v in worker.resources.items()}
    if worker.gpus > 0:
        resources.setdefault("limits", {})[worker.gpu_resource_name] = worker.gpus
    volumes = list(worker.volumes)
    mounts = list(worker.volume_mounts)
    if worker.shm_size:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": worker.shm_size}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    env = dict(worker.env)
    if worker.read_only_root_filesystem and not any(m.get("mountPath") == "/tmp" for m in mounts):
        # vLLM, torch and Hugging Face write caches under $HOME: give them a scratch /tmp.
        volumes.append({"name": "tmp", "emptyDir": {}})
        mounts.append({"name": "tmp", "mountPath": "/tmp"})
        env.setdefault("HOME", "/tmp")
    container: dict[str, Any] = {
        "name": WORKER_CONTAINER,
        "image": worker.image,
        # The shard index is not an argument: Kubernetes sets JOB_COMPLETION_INDEX per pod.
        "command": ["vbatch", "worker", "--project", project, "--batch-id", batch_id, "--model", model],
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": worker.read_only_root_filesystem,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if worker.image_pull_policy:
        container["imagePullPolicy"] = worker.image_pull_policy
    if worker.env_from_secrets:
        container["envFrom"] = [{"secretRef": {"name": name}} for name in worker.env_from_secrets]
    if resources:
        container["resources"] = resources
    if mounts:
        container["volumeMounts"] = mounts
    pod_security: dict[str, Any] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    if worker.run_as_user is not None:
        pod_security["runAsUser"] = worker.run_as_user
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # Workers talk to object storage only; a mounted API token would be pure risk.
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": worker.termination_grace_period_seconds,
        "securityContext": pod_security,
        "containers": [container],
    }
    if volumes:
        spec["volumes"] = volumes
    if worker.node_selector:
        spec["nodeSelector"] = dict(worker.node_selector)
    if worker.tolerations:
        spec["tolerations"] = list(worker.tolerations)
    if worker.runtime_class_name:
        spec["runtimeClassName"] = worker.runtime_class_name
    if worker.service_account_name:
        spec["serviceAccountName"] = worker.service_account_name
    if worker.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": name} for name in worker.image_pull_secrets]
    return spec


# --- Events ------------------------------------------------------------------------


def build_event(
    *,
    involved: dict[str, Any],
    reason: str,
    message: str,
    type: str = "Normal",
    now: datetime.datetime,
    component: str = "vbatch-operator",
) -> dict[str, Any]:
    """A core/v1 Event about `involved` (any object with apiVersion/kind/metadata).

    `kubectl describe batch` lists these. The name is generated server-side so that
    repeated events never collide.
    """
    meta = involved["metadata"]
    stamp = now.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": involved["apiVersion"],
            "kind": involved["kind"],
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid", ""),
        },
        "reason": reason,
        "message": message[:1024],
        "type": type,
        "source": {"component": component},
        "reportingComponent": component,
        "reportingInstance": component,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
