"""Cluster-mode batch store: Batch custom resources in one namespace, plus the batch
index and archive in object storage (vbatch.core.batch_index).

The resource is the durable record of a live batch (etcd): spec holds what the client
asked for, status (written only through the /status subresource) holds what happened.
The record's `revision` is the resource's resourceVersion, so a status write based on a
stale read gets 409 from the API server and surfaces as StaleRecord — the same
optimistic concurrency the SQLite store gives the local executor. Terminal batches past
their retention move to the archive (operator/archive.py); reads fall back to it.

Listing is O(page): the index gives the page's ids newest first, then ONE list call
with the project label selector fetches those that are live.

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
from vbatch.core.batch_index import DANGLING_GRACE_SECONDS, BatchIndex, created_ms
from vbatch.core.batch_resource import (
    GROUP,
    LABEL_BATCH,
    LABEL_PROJECT,
    PLURAL,
    VERSION,
    project_label,
    record_from_resource,
    resource_from_record,
    status_from_record,
)
from vbatch.core.batch_store import StaleRecord
from vbatch.core.config import Settings
from vbatch.core.ids import batch_object_name, is_batch_id
from vbatch.core.schemas import BatchRecord
from vbatch.core.storage import open_store
from vbatch.core.storage.base import ObjectStore
from vbatch.operator.kube import BatchResources, api_client

# The API calls this module makes, as RBAC sees them: tests/integration/test_rbac_usage.py checks
# this table against the requests the emulator recorded, and against the chart.
RBAC_USAGE: dict[tuple[str, str], frozenset[str]] = {
    (GROUP, PLURAL): frozenset({"create", "get", "list", "patch"}),
    (GROUP, f"{PLURAL}/status"): frozenset({"patch"}),
}

CANCEL_ATTEMPTS = 10


class KubeBatchStore:
    def __init__(self, api: kubernetes.client.ApiClient, namespace: str, store: ObjectStore) -> None:
        self.api = api
        self.namespace = namespace
        self.crs = kubernetes.client.CustomObjectsApi(api)
        self._resources = BatchResources(self.crs, namespace)
        self.index = BatchIndex(store)

    @classmethod
    def from_settings(cls, settings: Settings, store: ObjectStore | None = None) -> KubeBatchStore:
        return cls(api_client("gateway"), settings.namespace, store if store is not None else open_store(settings))

    @staticmethod
    def _owned(obj: dict[str, Any], project: str) -> bool:
        # spec.project is the exact id; the label only narrows lists server-side (a Batch
        # applied with kubectl may not carry it yet).
        return (obj.get("spec") or {}).get("project") == project

    # --- BatchStore ----------------------------------------------------------------

    def create(self, record: BatchRecord) -> None:
        body = resource_from_record(record, self.namespace)
        # Indexed first: a listed resource is always in the index (a crash here leaves a
        # dangling entry, which listing skips and later prunes).
        self.index.add(record.project, record.id)
        body["metadata"].pop("resourceVersion", None)
        created = self.crs.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)
        # The API server drops status on create; the CR already exists in etcd, so a
        # crash before this write leaves a batch the operator validates itself.
        name = created["metadata"]["name"]
        revision = created["metadata"]["resourceVersion"]
        for _ in range(CANCEL_ATTEMPTS):
            try:
                written = self._resources.patch_status(name, revision, status_from_record(record))
                record.revision = written["metadata"]["resourceVersion"]
                return
            except StaleRecord:
                # The operator saw the new Batch first (kopf adds its finalizer at once).
                current = self._resources.get(name)
                if current is None:
                    raise
                revision = current["metadata"]["resourceVersion"]
                if (current.get("status") or {}).get("phase"):
                    record.revision = revision  # the operator validates it itself: same outcome
                    return
        raise StaleRecord(f"{record.id}: its first status write kept conflicting")

    def get(self, project: str, batch_id: str) -> BatchRecord | None:
        if not is_batch_id(batch_id):
            return None
        obj = self._resources.get(batch_object_name(batch_id))
        if obj is None:
            return self.index.archived(project, batch_id)
        if not self._owned(obj, project):
            return None  # another project's batch answers exactly like a missing one
        return record_from_resource(obj)

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
        records: list[BatchRecord] = []
        cursor = after
        while len(records) <= limit:
            wanted = limit + 1 - len(records)
            ids = self.index.ids_after(project, cursor, wanted)
            found = self._fetch(project, ids)
            records.extend(found[i] for i in ids if i in found)
            if len(ids) < wanted:
                break
            cursor = ids[-1]
        return records[:limit], len(records) > limit

    def _fetch(self, project: str, ids: list[str]) -> dict[str, BatchRecord]:
        """The records of these ids: live ones in one labelled list call, the rest from
        the archive (or, for a Batch applied without labels, by name)."""
        if not ids:
            return {}
        names = ",".join(batch_object_name(i) for i in ids)
        selector = f"{LABEL_PROJECT}={project_label(project)},{LABEL_BATCH} in ({names})"
        found = {r.id: r for r in (record_from_resource(o) for o in self._list(selector) if self._owned(o, project))}
        now_ms = time.time() * 1000
        for batch_id in ids:
            if batch_id in found:
                continue
            record = self.index.archived(project, batch_id) or self._get_unlabelled(project, batch_id)
            if record is not None:
                found[batch_id] = record
            elif now_ms - created_ms(batch_id) > DANGLING_GRACE_SECONDS * 1000:
                self.index.remove(project, batch_id)  # deleted, or a create that crashed long ago
        return found

    def _get_unlabelled(self, project: str, batch_id: str) -> BatchRecord | None:
        obj = self._resources.get(batch_object_name(batch_id))
        return record_from_resource(obj) if obj is not None and self._owned(obj, project) else None

    def save(self, record: BatchRecord) -> None:
        written = self._resources.patch_status(batch_object_name(record.id), record.revision, status_from_record(record))
        record.revision = written["metadata"]["resourceVersion"]

    def request_cancel(self, project: str, batch_id: str) -> BatchRecord | None:
        if not is_batch_id(batch_id):
            return None
        name = batch_object_name(batch_id)
        for _ in range(CANCEL_ATTEMPTS):
            obj = self._resources.get(name)
            if obj is None:
                archived = self.index.archived(project, batch_id)
                if archived is not None:
                    state.request_cancel(archived, int(time.time()))  # Conflict: it has ended
                return archived
            if not self._owned(obj, project):
                return None
            current = record_from_resource(obj)
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
        records = [record_from_resource(o) for o in self._list()]
        return iter(sorted((r for r in records if not r.status.is_terminal), key=lambda r: r.id))


__all__ = ["KubeBatchStore"]
