"""The driver's side of Batch resources: the record store over the CRs, and the hook
that turns saves into what `kubectl describe batch` shows (Events, conditions).

The store reads a Batch (skipping ones being deleted: kopf's delete handler owns
those), fills in what a Batch applied with kubectl lacks (times, a learnt model), and
writes status with a compare-and-swap. On top of the record mapping of `builders` it
writes the driver's clean-up marker as status.jobName (present while the Job and working
data may exist; the kopf timer keeps looking at finished batches that have it) and adds
a `StepFailed` condition while `status.stepFailure` is set (both mapped by the model).
"""

from __future__ import annotations

import calendar
import logging
import time
from collections.abc import Iterator
from typing import Any

from vbatch.core.batch_store import StaleRecord
from vbatch.core.config import Settings
from vbatch.core.ids import batch_object_name
from vbatch.core.schemas import BatchRecord, BatchStatus, StepFailure
from vbatch.operator import builders
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


def step_failed_condition(failure: StepFailure) -> dict[str, Any]:
    """True while a step keeps failing (and on a batch that a failure ended)."""
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(failure.first_at))
    return {"type": "StepFailed", "status": "True", "reason": "".join(p.capitalize() for p in failure.code.split("_")),
            "message": f"{failure.action} failed {failure.attempts} time(s) ({failure.kind}): {failure.message}"[:32768],
            "lastTransitionTime": since}


class KubeBatches:
    """A BatchStore's get/save/unfinished over the Batch resources of one namespace."""

    def __init__(self, kube: Kube, settings: Settings) -> None:
        self.kube = kube
        self.settings = settings
        self._without_model: set[str] = set()  # Batches read whose spec has no model yet

    def get(self, project: str, batch_id: str) -> BatchRecord | None:
        obj = self.kube.get_batch(batch_object_name(batch_id))
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return None
        record = self.record_of(obj)
        return record if record.project == project else None

    def record_of(self, obj: dict[str, Any]) -> BatchRecord:
        record = builders.batch_record_from_resource(obj)
        name = obj["metadata"]["name"]
        if (obj.get("spec") or {}).get("model"):
            self._without_model.discard(name)
        else:
            self._without_model.add(name)
        if record.status == BatchStatus.VALIDATING and not record.created_at:
            # Applied directly (kubectl): no gateway stamped the times, so the CR's own
            # creation time starts the completion window.
            created = obj["metadata"].get("creationTimestamp")
            record.created_at = calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ")) if created else int(time.time())
        if record.status == BatchStatus.VALIDATING and record.expires_at is None:
            window = self.settings.limits.completion_windows.get(record.completion_window)
            if window is not None:
                record.expires_at = record.created_at + window
        return record

    def save(self, record: BatchRecord) -> None:
        name = batch_object_name(record.id)
        revision = record.revision
        if record.model and name in self._without_model:
            revision = self._learn_model(name, record)
        status = builders.build_batch_status(record)
        status["jobName"] = builders.job_name(name) if record.cleanup_pending else None  # null deletes
        status.setdefault("stepFailure", None)  # null deletes a failure that passed
        if record.step_failure is not None:
            status["conditions"] = [*status.get("conditions", []), step_failed_condition(record.step_failure)]
        written = self.kube.patch_batch_status(name, revision, status)
        record.revision = written["metadata"]["resourceVersion"]

    def _learn_model(self, name: str, record: BatchRecord) -> str | None:
        """Status has no model field: a Batch applied without one learns it from its input."""
        obj = self.kube.get_batch(name)
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
