"""The batch archive, operator side: keep etcd to live batches.

A terminal Batch (its Job and working data cleaned up) older than the retention
(`VBATCH_BATCH_RETENTION_SECONDS`, chart `operator.batchRetentionSeconds`) is written
whole to `projects/<p>/batch-archive/<id>.json`, then its resource is deleted — in that
order, so the API (operator/cr_store.py) finds the batch at every moment. The index
entry (vbatch.core.batch_index) stays, so listings keep their order; `kubectl get
batches` shows only the live ones.

Also indexes Batches applied with kubectl (the gateway indexes its own on create), so
they are listed too. No kopf here: handlers.py decides when.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from vbatch.core.batch_index import BatchIndex
from vbatch.core.batch_resource import record_from_resource
from vbatch.core.batch_store import StaleRecord
from vbatch.core.config import Settings
from vbatch.core.ids import batch_id_from_object_name
from vbatch.core.projects import is_project_id
from vbatch.core.schemas import BatchRecord
from vbatch.core.storage import open_store
from vbatch.operator.kube import Kube, api_client

log = logging.getLogger("vbatch.operator")


def ended_at(record: BatchRecord) -> int | None:
    """When a batch reached its terminal status (None while it runs)."""
    if not record.status.is_terminal:
        return None
    return getattr(record, f"{record.status.value}_at", None)


class BatchArchiver:
    def __init__(self, kube: Kube, index: BatchIndex, retention_seconds: int) -> None:
        self.kube = kube
        self.index = index
        self.retention_seconds = retention_seconds

    @classmethod
    def from_settings(cls, settings: Settings) -> BatchArchiver:
        return cls(Kube(api_client("operator"), settings.namespace), BatchIndex(open_store(settings)),
                   settings.batch_retention_seconds)

    def index_batch(self, body: dict[str, Any]) -> None:
        """Idempotent; a malformed Batch (the CRD refuses those) is left to the reconciler."""
        project = (body.get("spec") or {}).get("project")
        try:
            batch_id = batch_id_from_object_name(body["metadata"]["name"])
        except ValueError:
            return
        if is_project_id(project):
            self.index.add(project, batch_id)

    def archive_if_due(self, name: str, now: float | None = None) -> bool:
        """True when the Batch moved to the archive."""
        if self.retention_seconds <= 0:
            return False
        obj = self.kube.get_batch(name)
        if obj is None or obj["metadata"].get("deletionTimestamp") or (obj.get("status") or {}).get("jobName"):
            return False
        record = record_from_resource(obj)
        ended = ended_at(record)
        now = time.time() if now is None else now
        if ended is None or now - ended < self.retention_seconds:
            return False
        self.index.archive(record)
        try:
            # Only the version just archived: a Batch that changed meanwhile is looked at again.
            self.kube.delete_batch(name, obj["metadata"]["resourceVersion"])
        except StaleRecord:
            return False
        log.info("batch %s archived (%s %ds ago)", record.id, record.status.value, int(now - ended))
        return True
