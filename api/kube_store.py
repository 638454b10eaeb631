"""Cluster-mode batch store: Batch custom resources in one namespace.

The CR is the durable record (etcd): spec holds what the client asked for, status
(written only through the /status subresource) holds what happened. The record's
`revision` is the CR's resourceVersion, so a status write based on a stale read
gets 409 from the API server and surfaces as StaleRecord — the same optimistic
concurrency the SQLite store gives the local executor.

Thread safety: the official client's ApiClient sends through a urllib3 pool, which
is safe to share; nothing else here holds mutable state, so the gateway's thread
pool can call every method concurrently.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import kubernetes
from vbatch.core import state
from vbatch.core.batch_store import StaleRecord
from vbatch.core.config import Settings
from vbatch.core.ids import batch_object_name, is_batch_id
from vbatch.core.schemas import BatchRecord
from vbatch.operator.builders import (
    GROUP,
    LABEL_PROJECT,
    PLURAL,
    VERSION,
    batch_record_from_resource,
    build_batch_resource,
    build_batch_status,
    project_label,
)
from vbatch.operator.kube import BatchResources, api_client

# The API calls this module makes, as RBAC sees them: tests/integration/test_rbac_usage.py checks
# this table against the requests the emulator recorded, and against the chart.
RBAC_USAGE: dict[tuple[str, str], frozenset[str]] = {
    (GROUP, PLURAL): frozenset({"create", "get", "list", "patch"}),
    (GROUP, f"{PLURAL}/status"): frozenset({"patch"}),
}

CANCEL_ATTEMPTS = 10


class KubeBatchStore:
    def __init__(self, api: kubernetes.client.ApiClient, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        self.crs = kubernetes.client.CustomObjectsApi(api)
        self._resources = BatchResources(self.crs, namespace)

    @classmethod
    def from_settings(cls, settings: Settings) -> KubeBatchStore:
        return cls(api_client("gateway"), settings.namespace)

    @staticmethod
    def _owned(obj: dict[str, Any], project: str) -> bool:
        # spec.project is the exact name and the only proof of ownership; the label only
        # narrows lists server-side (and a kubectl-applied Batch has it once the operator
        # saw it), so reads by id do not depend on it.
        return (obj.get("spec") or {}).get("project") == project

    # --- BatchStore ----------------------------------------------------------------

    def create(self, record: BatchRecord) -> None:
        body = build_batch_resource(record, self.namespace)
        body["metadata"].pop("resourceVersion", None)
        created = self.crs.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)
        # The API server drops status on create; the CR already exists in etcd, so a
        # crash before this write leaves a batch the operator validates itself.
        name = created["metadata"]["name"]
        written = self._resources.patch_status(name, created["metadata"]["resourceVersion"], build_batch_status(record))
        record.revision = written["metadata"]["resourceVersion"]

    def get(self, project: str, batch_id: str) -> BatchRecord | None:
        if not is_batch_id(batch_id):
            return None
        obj = self._resources.get(batch_object_name(batch_id))
        if obj is None or not self._owned(obj, project):
            return None  # another project's batch answers exactly like a missing one
        return batch_record_from_resource(obj)

    def _list(self, label_selector: str | None = None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": 500}
            if label_selector:
                kwargs["label_selector"] = label_selector
            if token:
                kwargs["_continue"] = token
            page = self.crs.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, **kwargs)
            items.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items

    def list_page(self, project: str, *, after: str | None, limit: int) -> tuple[list[BatchRecord], bool]:
        objs = self._list(f"{LABEL_PROJECT}={project_label(project)}")
        records = [batch_record_from_resource(o) for o in objs if self._owned(o, project)]
        # ULID ids sort by creation time, so descending id order is newest first.
        records.sort(key=lambda r: r.id, reverse=True)
        if after is not None:
            records = [r for r in records if r.id < after]
        return records[:limit], len(records) > limit

    def save(self, record: BatchRecord) -> None:
        written = self._resources.patch_status(batch_object_name(record.id), record.revision, build_batch_status(record))
        record.revision = written["metadata"]["resourceVersion"]

    def request_cancel(self, project: str, batch_id: str) -> BatchRecord | None:
        if not is_batch_id(batch_id):
            return None
        name = batch_object_name(batch_id)
        for _ in range(CANCEL_ATTEMPTS):
            obj = self._resources.get(name)
            if obj is None or not self._owned(obj, project):
                return None
            current = batch_record_from_resource(obj)
            moved = state.request_cancel(current, int(time.time()))  # Conflict for a finished batch
            if moved is current:
                return current  # already cancelling: idempotent
            # Spec first: the intent the operator watches. It is idempotent and needs no
            # compare-and-swap, so a cancel is never lost even if the status write races.
            patched = self.crs.patch_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, {"spec": {"cancelRequested": True}}
            )
            if (patched.get("status") or {}) != (obj.get("status") or {}):
                continue  # the operator moved the status meanwhile: decide again on fresh data
            moved.revision = patched["metadata"]["resourceVersion"]
            try:
                self.save(moved)
                return moved
            except StaleRecord:
                continue
        raise StaleRecord(f"{batch_id}: cancel kept conflicting with concurrent updates")

    def unfinished(self) -> Iterator[BatchRecord]:
        records = [batch_record_from_resource(o) for o in self._list()]
        return iter(sorted((r for r in records if not r.status.is_terminal), key=lambda r: r.id))



__all__ = ["KubeBatchStore"]
