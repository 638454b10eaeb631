"""The cluster driver: the core state machine over Batch resources, with a batch's
shards run as ONE Indexed Job. The twin of local_executor.LocalExecutor.

No kopf here: handlers.py calls `reconcile(name)` on every event and timer tick.
Each step reads everything fresh — the Batch (record + resourceVersion), its Job —
decides with `next_action`, carries the action out with `lifecycle`, and writes the
status with a compare-and-swap. Nothing lives only in this process, so an operator
restarted at any point (or its peer taking over) resumes from what the cluster and
the object store show.
"""

from __future__ import annotations

import calendar
import logging
import threading
import time
from collections.abc import Collection
from typing import Any

from vbatch.core import lifecycle, state
from vbatch.core.batch_store import StaleRecord
from vbatch.core.config import Settings
from vbatch.core.events import BatchEvents
from vbatch.core.files import FileService
from vbatch.core.schemas import BatchRecord, BatchStatus
from vbatch.core.state import Action, next_action
from vbatch.core.storage.base import ObjectStore
from vbatch.operator import builders
from vbatch.operator.config import WorkerPodConfig
from vbatch.operator.kube import Kube
from vbatch.operator.observe import failed_indexes, observe

log = logging.getLogger("vbatch.operator")

# Steps in one reconcile call, e.g. validate -> launch, or a retry after a 409.
MAX_STEPS = 6

# Event reasons per phase a batch enters (what `kubectl describe batch` lists).
PHASE_REASONS = {
    BatchStatus.IN_PROGRESS: "Validated",
    BatchStatus.FINALIZING: "Finalizing",
    BatchStatus.COMPLETED: "Completed",
    BatchStatus.FAILED: "Failed",
    BatchStatus.EXPIRED: "Expired",
    BatchStatus.CANCELLING: "Cancelling",
    BatchStatus.CANCELLED: "Cancelled",
}


class PodsRemain(Exception):
    """A batch's worker pods are still shutting down; try again shortly."""


class Reconciler:
    def __init__(
        self,
        *,
        settings: Settings,
        store: ObjectStore,
        files: FileService,
        kube: Kube,
        worker: WorkerPodConfig,
        served_models: Collection[str] | None,
        model_gpus: dict[str, int] | None = None,
        events: BatchEvents | None = None,
    ) -> None:
        self.events = events or BatchEvents()
        self.settings = settings
        self.store = store
        self.files = files
        self.kube = kube
        self.worker = worker
        self.served_models = served_models
        self.model_gpus = model_gpus or {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, name: str) -> threading.Lock:
        # kopf runs a timer and event handlers of one object concurrently: one step at a time.
        with self._locks_guard:
            return self._locks.setdefault(name, threading.Lock())

    # --- entry points ------------------------------------------------------------

    def reconcile(self, name: str) -> None:
        with self._lock(name):
            for _ in range(MAX_STEPS):
                try:
                    if not self._step(name):
                        return
                except StaleRecord:
                    continue  # changed meanwhile (a cancel, kopf's own patch): decide again

    def release(self, name: str) -> None:
        """The Batch is being deleted: stop its Job, then remove its working data
        (shards, parts, progress). Result files are File objects and stay."""
        with self._lock(name):
            obj = self.kube.get_batch(name)
            if obj is None:
                return
            self.kube.delete_job(builders.job_name(name))
            if self.kube.count_pods(name):
                raise PodsRemain(name)  # a terminating worker could still write a part
            lifecycle.remove_working_data(self.store, builders.batch_record_from_resource(obj))
        with self._locks_guard:
            self._locks.pop(name, None)

    # --- one step ------------------------------------------------------------------

    def _step(self, name: str) -> bool:
        """Carry out the next action; True when another step is due at once."""
        obj = self.kube.get_batch(name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return False
        record = self._record(obj)
        job_name = builders.job_name(name)
        job = self.kube.get_job(job_name)
        now = int(time.time())
        action = next_action(record, observe(record, job, now))
        if action == Action.NONE:
            return self._clean_up(obj, record, job)
        if action == Action.VALIDATE:
            validated = lifecycle.validate(
                self.files, record, served_models=self.served_models, limits=self.settings.limits, now=now
            )
            if validated.model and not (obj.get("spec") or {}).get("model"):
                # Status has no model field: a Batch applied without one learns it from its input.
                patched = self.kube.patch_batch_spec(name, {"model": validated.model})
                if patched.get("status") != obj.get("status"):
                    raise StaleRecord(name)  # status moved meanwhile: decide again
                validated.revision = patched["metadata"]["resourceVersion"]
            self._save(obj, validated)
            return validated.status == BatchStatus.IN_PROGRESS
        if action == Action.LAUNCH:
            self._launch(obj, record, job_name)
            return False
        if action == Action.WAIT:
            updated = lifecycle.with_progress(record, lifecycle.read_progress(self.store, record))
            if updated.request_counts != record.request_counts or updated.usage != record.usage:
                self._save(obj, updated)
            return False
        if action == Action.FINALIZE:
            self._finalize(obj, record, job)
            return False
        if action == Action.CANCEL:
            if record.status != BatchStatus.CANCELLING:
                # A cancel applied with kubectl sets only spec.cancelRequested.
                record = self._save(obj, state.request_cancel(record, now))
            return self._stop_then_finish(obj, record, job_name, "batch_cancelled")
        if action == Action.EXPIRE:
            return self._stop_then_finish(obj, record, job_name, "batch_expired")
        return False

    def _record(self, obj: dict[str, Any]) -> BatchRecord:
        record = builders.batch_record_from_resource(obj)
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

    def _save(self, obj: dict[str, Any], record: BatchRecord, extra: dict[str, Any] | None = None) -> BatchRecord:
        name = obj["metadata"]["name"]
        before = (obj.get("status") or {}).get("phase")
        status = builders.build_batch_status(record) | (extra or {})
        written = self.kube.patch_batch_status(name, record.revision, status)
        saved = record.model_copy(update={"revision": written["metadata"]["resourceVersion"]})
        self.events.saved(builders.batch_record_from_resource(obj), saved)  # metrics, webhooks
        if saved.status.value != before:
            self._announce(written, saved)
        obj.update(written)
        return saved

    def _announce(self, obj: dict[str, Any], record: BatchRecord) -> None:
        counts = record.request_counts
        message = f"{record.status.value}: {counts.completed} completed, {counts.failed} failed of {counts.total}"
        kind = "Normal"
        if record.status == BatchStatus.FAILED and record.errors and record.errors.data:
            first = record.errors.data[0]
            message = f"failed: {first.message}" + (f" (line {first.line})" if first.line else "")
            kind = "Warning"
        log.info("batch %s %s", record.id, message)
        self.kube.post_event(obj, PHASE_REASONS.get(record.status, record.status.value), message, kind)

    # --- actions -------------------------------------------------------------------

    def _launch(self, obj: dict[str, Any], record: BatchRecord, job_name: str) -> None:
        spec = obj.get("spec") or {}
        if record.shard_count is None:
            # Shards first, then the record says how many: a crash in between only
            # rewrites the same shard objects on the next attempt.
            launched = lifecycle.launch(self.store, self.files, record, self.settings, requested=spec.get("shards"))
            if launched.status.is_terminal:  # the input file is gone: nothing to run
                self._save(obj, launched)  # announces the failure as a Warning event
                return
            record = self._save(obj, launched, {"jobName": job_name})
        shards = record.shard_count or 1
        body = builders.build_shard_job(
            batch_name=obj["metadata"]["name"],
            batch_uid=obj["metadata"]["uid"],
            namespace=self.kube.namespace,
            project=record.project,
            batch_id=record.id,
            model=record.model or "",
            shard_count=shards,
            parallelism=spec.get("parallelism") or shards,
            worker=self._worker_for(record.model),
        )
        _, created = self.kube.create_job(body)  # an existing Job is adopted, never doubled
        if created:
            self.kube.post_event(obj, "Launched", f"job {job_name}: {shards} shard(s)")

    def _worker_for(self, model: str | None) -> WorkerPodConfig:
        gpus = self.model_gpus.get(model or "")
        return self.worker if gpus is None else self.worker.model_copy(update={"gpus": gpus})

    def _finalize(self, obj: dict[str, Any], record: BatchRecord, job: dict[str, Any] | None) -> None:
        if record.status == BatchStatus.IN_PROGRESS:
            # Visible while the merge runs; a restart resumes from here (FINALIZE again).
            record = self._save(obj, state.transition(record, BatchStatus.FINALIZING, int(time.time())))
        failed = self._failed_shards(record, job)
        done = lifecycle.finish(self.store, self.files, record, missing_code="shard_failed",
                                failed_shards=failed, now=int(time.time()))
        self._save(obj, done)
        self._clean_up(obj, done, job, finished_now=True)

    def _failed_shards(self, record: BatchRecord, job: dict[str, Any] | None) -> frozenset[int]:
        if job is not None:
            return failed_indexes(job)
        # The Job is gone (deleted by hand): a shard without finished progress failed.
        progress = lifecycle.read_progress(self.store, record)
        return frozenset(i for i, p in enumerate(progress) if p is None or not p.finished)

    def _stop_then_finish(self, obj: dict[str, Any], record: BatchRecord, job_name: str, missing_code: str) -> bool:
        # Deleting the Job deletes its pods; each worker gets SIGTERM and flushes what it
        # finished. Only once no pod remains is every part that will ever exist written.
        if self.kube.delete_job(job_name) or self.kube.count_pods(obj["metadata"]["name"]):
            return False  # the next tick looks again
        done = lifecycle.finish(self.store, self.files, record, missing_code=missing_code, now=int(time.time()))
        self._save(obj, done)
        self._clean_up(obj, done, None, finished_now=True)
        return False

    def _clean_up(self, obj: dict[str, Any], record: BatchRecord, job: dict[str, Any] | None,
                  *, finished_now: bool = False) -> bool:
        """A finished batch keeps its result files only: the Job and the working objects go.
        status.jobName is cleared last, so a crash before it makes the timer come back."""
        if not finished_now and not (obj.get("status") or {}).get("jobName") and job is None:
            return False
        name = obj["metadata"]["name"]
        if job is not None:
            self.kube.delete_job(builders.job_name(name))
        if self.kube.count_pods(name):
            return False
        lifecycle.remove_working_data(self.store, record)
        self.kube.patch_batch_status(name, None, {"jobName": None})
        return False
