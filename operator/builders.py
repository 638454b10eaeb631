"""Pure builders of the Kubernetes objects vbatch creates: Batch CRs, shard Jobs, Events.

No API calls here: each function maps domain values to a plain dict, so every manifest
can be tested (and schema-validated) without a cluster. The Batch resource itself is
defined once, in vbatch.core.batch_resource; the functions here delegate to it.
"""

from __future__ import annotations

import datetime
from typing import Any

from vbatch.core import batch_resource
from vbatch.core.batch_resource import (  # noqa: F401  (the operator's names for the resource's constants)
    ANNOTATION_BATCH_ID,
    ANNOTATION_CREATED_AT,
    API_VERSION,
    GROUP,
    KIND,
    LABEL_BATCH,
    LABEL_MANAGED_BY,
    LABEL_PROJECT,
    PLURAL,
    VERSION,
    label_value,
    project_label,
)
from vbatch.core.schemas import BatchRecord
from vbatch.operator.config import WorkerPodConfig

LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
WORKER_CONTAINER = "worker"


def missing_labels(name: str, spec: dict[str, Any] | None, labels: dict[str, str] | None) -> dict[str, str]:
    """The labels a Batch lacks (or has wrong) that the CR store selects by: a Batch
    applied with kubectl carries none, so a labelled list would not find it."""
    project = (spec or {}).get("project")
    wanted = {LABEL_BATCH: name}
    if isinstance(project, str) and project:
        wanted[LABEL_PROJECT] = project_label(project)
    have = labels or {}
    return {k: v for k, v in wanted.items() if have.get(k) != v}


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
# One definition: the typed model in vbatch.core.batch_resource is the mapping both ways.


def build_batch_resource(record: BatchRecord, namespace: str, *, shards: int | None = None,
                         parallelism: int | None = None) -> dict[str, Any]:
    return batch_resource.resource_from_record(record, namespace, shards=shards, parallelism=parallelism)


def build_batch_status(record: BatchRecord) -> dict[str, Any]:
    """The resource's status for a record: what the operator writes through /status."""
    return batch_resource.status_from_record(record)


def batch_record_from_resource(obj: dict[str, Any]) -> BatchRecord:
    return batch_resource.record_from_resource(obj)


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
    max_attempts: int,
) -> dict[str, Any]:
    """One Indexed Job for the whole batch: pod i runs shard i (JOB_COMPLETION_INDEX),
    at most `max_attempts` times (Settings.shard_max_attempts, the same budget as the
    single-node runtime's)."""
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
        "backoffLimitPerIndex": max(0, max_attempts - 1),
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
