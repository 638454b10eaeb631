"""Pure builders for warm pool pods: one batch/v1 Job per pool member.

A member is a Job of one pod (so Kueue admits it like any GPU Job: the queue-name
label, created suspended) running `vbatch worker --pool P --member M`; the member's
name is its Job's name, which the operator knows before the pod exists.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any

from vbatch.operator import builders
from vbatch.operator.config import WorkerPodConfig

LABEL_POOL = "vbatch.dev/pool"
COMPONENT = "worker-pool"
# A finished member Job goes by itself even when no operator looks again.
FINISHED_TTL_SECONDS = 600
_SLUG_BAD = re.compile(r"[^a-z0-9-]+")


def pool_name(model: str) -> str:
    """A model id -> a DNS-label-safe pool name (short hash keeps distinct ids apart)."""
    slug = _SLUG_BAD.sub("-", model.lower()).strip("-")[:24].strip("-") or "model"
    return f"{slug}-{hashlib.sha256(model.encode()).hexdigest()[:6]}"


def new_member_name(pool: str) -> str:
    # vbatch-pool-<pool>-<6 hex>: <= 50 chars, so the pod name (+ index and suffix) fits 63.
    return f"vbatch-pool-{pool}-{secrets.token_hex(3)}"


def build_pool_job(*, pool: str, member: str, model: str, namespace: str, worker: WorkerPodConfig,
                   idle_seconds: float, poll_seconds: float) -> dict[str, Any]:
    labels = {
        LABEL_POOL: pool,
        builders.LABEL_MANAGED_BY: "vbatch",
        "app.kubernetes.io/name": "vbatch",
        "app.kubernetes.io/component": COMPONENT,
    }
    job_labels = dict(labels)
    if worker.kueue_queue_name:
        job_labels[builders.LABEL_KUEUE_QUEUE] = worker.kueue_queue_name
    pod = builders._pod_spec("", "", model, worker)
    pod["containers"][0]["command"] = [
        "vbatch", "worker", "--pool", pool, "--member", member, "--model", model,
        "--idle-seconds", f"{idle_seconds:g}", "--poll-seconds", f"{poll_seconds:g}",
    ]
    spec: dict[str, Any] = {
        # Indexed with one completion: the same Job shape as batch Jobs, one pod.
        "completionMode": "Indexed",
        "completions": 1,
        "parallelism": 1,
        # A member that dies is not restarted in place: the operator re-assigns its
        # shards (to a live member or a new one), so a retry here would only double up.
        "backoffLimitPerIndex": 0,
        "maxFailedIndexes": 1,
        "ttlSecondsAfterFinished": FINISHED_TTL_SECONDS,
        "template": {"metadata": {"labels": labels}, "spec": pod},
    }
    if worker.kueue_queue_name:
        spec["suspend"] = True  # Kueue admits it by unsuspending
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": member,
            "namespace": namespace,
            "labels": job_labels,
            "annotations": {"vbatch.dev/model": model},
        },
        "spec": spec,
    }


def job_ended(job: dict[str, Any] | None) -> tuple[bool, bool]:
    """(ended, failed) from a Job's conditions; a missing Job has ended (not failed:
    its TTL or a person removed it after it finished, or it was deleted)."""
    if job is None:
        return True, False
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in ("Complete", "Failed"):
            return True, condition["type"] == "Failed"
    return False, False
