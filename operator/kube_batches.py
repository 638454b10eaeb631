"""The driver's side of Batch resources: the record store over the CRs, and the hook
that turns saves into what `kubectl describe batch` shows (Events, conditions).

The store is the gateway's CR store (operator/cr_store.py) seen by the driver: the same
record mapping (times filled in for a Batch applied with kubectl) and the same status
save with the driver's markers (status.jobName clean-up marker, stepFailure and its
StepFailed condition). On top it skips Batches being deleted (kopf's delete handler owns
those) and patches a model learnt from the input into the spec.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from vbatch.core.batch_store import StaleRecord
from vbatch.core.config import Settings
from vbatch.core.ids import batch_object_name
from vbatch.core.schemas import BatchRecord, BatchStatus
from vbatch.operator.cr_store import owned, record_of, save_status
from vbatch.operator.kube import Kube

log = logging.getLogger("vbatch.operator")

# Event reasons per phase a batch enters.
PHASE_REASONS = {
    BatchStatus.IN_PROGRESS: "Validated",
    BatchStatus.FINALIZING: "Finalizing",
    BatchStatus.COMPLETED: "Completed",
    BatchStatus.FAILED: "Failed",
    BatchStatus.EXPIRED: "Expired",
    BatchStatus.CANCELLING: "Cancelling",
    BatchStatus.CANCELLED: "Cancelled",
}


class KubeBatches:
    """A BatchStore's get/save/unfinished over the Batch resources of one namespace."""

    def __init__(self, kube: Kube, settings: Settings) -> None:
        self.kube = kube
        self.resources = kube.batches
        self.settings = settings
        self._without_model: set[str] = set()  # Batches read whose spec has no model yet

    def get(self, project: str, batch_id: str) -> BatchRecord | None:
        obj = self.resources.get(batch_object_name(batch_id))
        if obj is None or obj["metadata"].get("deletionTimestamp") or not owned(obj, project):
            return None
        return self.record_of(obj)

    def record_of(self, obj: dict[str, Any]) -> BatchRecord:
        name = obj["metadata"]["name"]
        if (obj.get("spec") or {}).get("model"):
            self._without_model.discard(name)
        else:
            self._without_model.add(name)
        return record_of(obj, self.settings.limits.completion_windows)

    def save(self, record: BatchRecord) -> None:
        name = batch_object_name(record.id)
        revision = record.revision
        if record.model and name in self._without_model:
            revision = self._learn_model(name, record)
        save_status(self.resources, record, revision)

    def _learn_model(self, name: str, record: BatchRecord) -> str | None:
        """Status has no model field: a Batch applied without one learns it from its input."""
        obj = self.resources.get(name)
        if obj is None or obj["metadata"].get("resourceVersion") != record.revision:
            raise StaleRecord(name)
        if (obj.get("spec") or {}).get("model"):
            return record.revision
        patched = self.kube.patch_batch_spec(name, {"model": record.model})
        self._without_model.discard(name)
        if patched.get("status") != obj.get("status"):
            raise StaleRecord(name)  # status moved meanwhile: decide again
        return patched["metadata"]["resourceVersion"]

    def unfinished(self) -> Iterator[BatchRecord]:
        raise NotImplementedError("the operator's kopf timer decides which Batches to look at")


class KubeAnnouncer:
    """A BatchEvents listener: an Event per phase a batch enters and per failed step.
    Best effort, like every Event: a failure to post is logged, never raised."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    def __call__(self, before: BatchRecord | None, after: BatchRecord) -> None:
        failure = after.step_failure
        if failure is not None and (before is None or before.step_failure != failure):
            spent = after.status.is_terminal
            message = (f"{failure.action} failed (attempt {failure.attempts}, {failure.kind} {failure.code}): "
                       f"{failure.message}" + ("" if spent else f"; retrying in {max(0.0, failure.retry_at - failure.last_at):.1f} s"))
            self._post(after, "StepFailed", message, "Warning")
        if before is not None and before.status == after.status:
            return
        counts = after.request_counts
        message = f"{after.status.value}: {counts.completed} completed, {counts.failed} failed of {counts.total}"
        kind = "Normal"
        if after.status == BatchStatus.FAILED and after.errors and after.errors.data:
            first = after.errors.data[0]
            message = f"failed: {first.message}" + (f" (line {first.line})" if first.line else "")
            kind = "Warning"
        self._post(after, PHASE_REASONS.get(after.status, after.status.value), message, kind)

    def _post(self, record: BatchRecord, reason: str, message: str, kind: str) -> None:
        # The Event names the Batch by uid (what `kubectl describe` matches): read it back.
        obj = self.kube.get_batch(batch_object_name(record.id))
        if obj is not None:
            self.kube.post_event(obj, reason, message, kind)
