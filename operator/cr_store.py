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

import calendar
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import kubernetes
import urllib3
from kubernetes.client.rest import ApiException
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
from vbatch.core.errors import StorageError
from vbatch.core.ids import batch_object_name, is_batch_id
from vbatch.core.schemas import BatchRecord, BatchStatus, StepFailure
from vbatch.core.storage import open_store
from vbatch.core.storage.base import ObjectStore
from vbatch.operator.builders import job_name
from vbatch.operator.kube import BatchResources, api_client

# The API calls this module makes, as RBAC sees them: tests/integration/test_rbac_usage.py checks
# this table against the requests the emulator recorded, and against the chart.
RBAC_USAGE: dict[tuple[str, str], frozenset[str]] = {
    (GROUP, PLURAL): frozenset({"create", "get", "list", "patch"}),
    (GROUP, f"{PLURAL}/status"): frozenset({"patch"}),
}

CANCEL_ATTEMPTS = 10
# (connect, read) seconds per API call: a hung API server answers the client with a 503
# instead of holding a gateway thread forever.
REQUEST_TIMEOUT = (5.0, 30.0)
log = logging.getLogger("vbatch.api")
F = TypeVar("F", bound=Callable[..., Any])


def api_unavailable(exc: BaseException) -> bool:
    """The API server is away or overloaded: refused or dropped connections and timeouts
    (urllib3 raises them past the client), 5xx and throttling (429). A later try may work."""
    if isinstance(exc, ApiException):
        # status 0: the client's own wrapping of a failed TLS handshake (the server went away mid-way)
        return exc.status is not None and (exc.status >= 500 or exc.status in (0, 408, 429))
    return isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


@contextlib.contextmanager
def unavailable_as_storage_error(action: str) -> Iterator[None]:
    """What a client of the gateway sees: a 503 with Retry-After (like the SQLite store's
    disk failures), never a 500, for an API server it cannot reach and for a record
    whose compare-and-swap kept losing to concurrent writers."""
    try:
        yield
    except StaleRecord as exc:
        raise StorageError(f"The batch store could not {action}: it kept changing concurrently; retry.",
                           code="batch_store_contended") from exc
    except Exception as exc:
        if not api_unavailable(exc):
            raise
        detail = f"API server answered {exc.status}" if isinstance(exc, ApiException) else type(exc).__name__
        raise StorageError(f"The batch store could not {action}: the Kubernetes API server is unavailable "
                           f"({detail}).", code="batch_store_unavailable") from exc


# --- the record of a Batch, both ways (the gateway's and the operator's) -----------------


def owned(obj: dict[str, Any], project: str) -> bool:
    # spec.project is the exact id; the label only narrows lists server-side (a Batch
    # applied with kubectl may not carry it yet).
    return (obj.get("spec") or {}).get("project") == project


def record_of(obj: dict[str, Any], completion_windows: dict[str, int] | None = None) -> BatchRecord:
    """The record of a Batch, with what one applied by kubectl lacks filled in: no gateway
    stamped its times, so the CR's own creation time starts the completion window."""
    record = record_from_resource(obj)
    if record.status == BatchStatus.VALIDATING and not record.created_at:
        created = obj["metadata"].get("creationTimestamp")
        record.created_at = calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ")) if created else int(time.time())
    if record.status == BatchStatus.VALIDATING and record.expires_at is None and completion_windows:
        window = completion_windows.get(record.completion_window)
        if window is not None:
            record.expires_at = record.created_at + window
    return record


def step_failed_condition(failure: StepFailure) -> dict[str, Any]:
    """True while a step keeps failing (and on a batch that a failure ended)."""
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(failure.first_at))
    return {"type": "StepFailed", "status": "True", "reason": "".join(p.capitalize() for p in failure.code.split("_")),
            "message": f"{failure.action} failed {failure.attempts} time(s) ({failure.kind}): {failure.message}"[:32768],
            "lastTransitionTime": since}


def status_of(record: BatchRecord) -> dict[str, Any]:
    """The status a save writes (a merge patch): the record's fields plus the driver's
    markers — status.jobName while the Job and working data may exist, stepFailure and a
    StepFailed condition while a step keeps failing; null deletes a marker that passed.
    Whoever saves (operator or gateway cancel) writes all of them, so neither drops the other's."""
    status = status_from_record(record)
    status["jobName"] = job_name(batch_object_name(record.id)) if record.cleanup_pending else None
    status.setdefault("stepFailure", None)
    if record.step_failure is not None:
        status["conditions"] = [*status.get("conditions", []), step_failed_condition(record.step_failure)]
    return status


def save_status(resources: BatchResources, record: BatchRecord, revision: str | None = None) -> None:
    """Compare-and-swap the record's status (on `revision`, else the record's own):
    StaleRecord when the Batch changed since it was read."""
    written = resources.patch_status(batch_object_name(record.id), revision or record.revision, status_of(record))
    record.revision = written["metadata"]["resourceVersion"]


def gateway_call(action: str) -> Callable[[F], F]:
    def wrap(method: F) -> F:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            with unavailable_as_storage_error(action):
                return method(*args, **kwargs)
        return call  # type: ignore[return-value]
    return wrap


class KubeBatchStore:
    def __init__(self, api: kubernetes.client.ApiClient, namespace: str, store: ObjectStore, *,
                 completion_windows: dict[str, int] | None = None,
                 request_timeout: tuple[float, float] = REQUEST_TIMEOUT) -> None:
        self.api = api
        self.completion_windows = completion_windows
        self.namespace = namespace
        self.crs = kubernetes.client.CustomObjectsApi(api)
        self._resources = BatchResources(self.crs, namespace, request_timeout=request_timeout)
        self._timeout = self._resources.timeout
        self.index = BatchIndex(store)

    @classmethod
    def from_settings(cls, settings: Settings, store: ObjectStore | None = None) -> KubeBatchStore:
        return cls(api_client("gateway"), settings.namespace, store if store is not None else open_store(settings),
                   completion_windows=settings.limits.completion_windows)

    def _record(self, obj: dict[str, Any]) -> BatchRecord:
        return record_of(obj, self.completion_windows)

    # --- BatchStore ----------------------------------------------------------------

    @gateway_call("create the batch")
    def create(self, record: BatchRecord) -> None:
        body = resource_from_record(record, self.namespace)
        # Indexed first: a listed resource is always in the index (a crash here leaves a
        # dangling entry, which listing skips and later prunes).
        self.index.add(record.project, record.id)
        body["metadata"].pop("resourceVersion", None)
        created = self.crs.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body,
                                                           **self._timeout)
        # The API server drops status on create. The batch is durable now: the operator
        # validates a Batch without status itself (same times, from the annotation and the
        # window), so a status write the API server refuses must not fail the request —
        # a client retrying it would create a second batch.
        try:
            self._write_first_status(created, record)
        except Exception as exc:
            if not (isinstance(exc, StaleRecord) or api_unavailable(exc)):
                raise
            log.warning("%s: created, but its first status write failed (%s); the operator validates it",
                        record.id, type(exc).__name__)
            record.revision = created["metadata"]["resourceVersion"]

    def _write_first_status(self, created: dict[str, Any], record: BatchRecord) -> None:
        name = created["metadata"]["name"]
        revision = created["metadata"]["resourceVersion"]
        for _ in range(CANCEL_ATTEMPTS):
            try:
                save_status(self._resources, record, revision)
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

    @gateway_call("read the batch")
    def get(self, project: str, batch_id: str) -> BatchRecord | None:
        if not is_batch_id(batch_id):
            return None
        obj = self._resources.get(batch_object_name(batch_id))
        if obj is None:
            return self.index.archived(project, batch_id)
        if not owned(obj, project):
            return None  # another project's batch answers exactly like a missing one
        return self._record(obj)

    def _list(self, label_selector: str | None = None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": 500}
            if label_selector:
                kwargs["label_selector"] = label_selector
            if token:
                kwargs["_continue"] = token
            page = self.crs.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, **kwargs,
                                                         **self._timeout)
            items.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items

    @gateway_call("list batches")
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
        found = {r.id: r for r in (self._record(o) for o in self._list(selector) if owned(o, project))}
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
        return self._record(obj) if obj is not None and owned(obj, project) else None

    def save(self, record: BatchRecord) -> None:
        save_status(self._resources, record)

    @gateway_call("cancel the batch")
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
            if not owned(obj, project):
                return None
            current = self._record(obj)
            moved = state.request_cancel(current, int(time.time()))  # Conflict for a finished batch
            if moved is current:
                return current  # already cancelling: idempotent
            # Spec first: the intent the operator watches. It is idempotent and needs no
            # compare-and-swap, so a cancel is never lost even if the status write races.
            patched = self.crs.patch_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, {"spec": {"cancelRequested": True}}, **self._timeout
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
        records = [self._record(o) for o in self._list()]
        return iter(sorted((r for r in records if not r.status.is_terminal), key=lambda r: r.id))


__all__ = ["KubeBatchStore", "owned", "record_of", "save_status", "status_of", "step_failed_condition"]
