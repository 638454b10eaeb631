"""Every Kubernetes API call the operator's own code makes (kopf makes its own).

Thin wrappers over the official client that speak plain dicts, translate 404 to
None and 409 on a compare-and-swap to StaleRecord. The handlers decide; this only
talks to the API server.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import logging
import os
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException
from vbatch.core.batch_store import StaleRecord
from vbatch.operator.builders import GROUP, LABEL_BATCH, PLURAL, VERSION, build_event

log = logging.getLogger("vbatch.operator")

# The API calls of this module, as RBAC sees them: tests/integration/test_rbac_usage.py checks this
# table against what the emulator recorded, and both against the chart's expectations.
RBAC_USAGE: dict[tuple[str, str], frozenset[str]] = {
    (GROUP, PLURAL): frozenset({"get", "list", "patch", "delete"}),
    (GROUP, f"{PLURAL}/status"): frozenset({"patch"}),
    ("batch", "jobs"): frozenset({"create", "get", "delete"}),
    ("", "pods"): frozenset({"list"}),
    ("", "events"): frozenset({"create"}),
}


def _version() -> str:
    try:
        return importlib.metadata.version("vbatch")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def api_client(component: str) -> kubernetes.client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig.

    $KUBECONFIG is read now, not at import: the client's default path was frozen when
    `kubernetes.config` was imported, which may predate the caller setting it. A
    kubeconfig context named `vbatch-<component>` is used when there is one, so one
    file can give the gateway and the operator their own credentials (each its own
    ServiceAccount's, as in the chart); else the current context. The user agent
    names the component, so audit logs tell the gateway's calls from the operator's.
    """
    try:
        config = kubernetes.client.Configuration()
        kubernetes.config.load_incluster_config(client_configuration=config)
        client = kubernetes.client.ApiClient(config)
    except kubernetes.config.ConfigException:
        path = os.environ.get("KUBECONFIG")
        client = kubernetes.config.new_client_from_config(config_file=path, context=_component_context(path, component))
    client.user_agent = f"vbatch-{component}/{_version()}"
    return client


def _component_context(path: str | None, component: str) -> str | None:
    try:
        contexts, _ = kubernetes.config.list_kube_config_contexts(config_file=path)
    except kubernetes.config.ConfigException:
        return None
    wanted = f"vbatch-{component}"
    return wanted if any(c.get("name") == wanted for c in contexts or []) else None


class BatchResources:
    """Batch custom resources of one namespace: the reads and the compare-and-swap
    status writes that the gateway's store and the operator both make."""

    def __init__(self, crs: kubernetes.client.CustomObjectsApi, namespace: str) -> None:
        self.crs = crs
        self.namespace = namespace

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return self.crs.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_status(self, name: str, resource_version: str | None, status: dict[str, Any]) -> dict[str, Any]:
        """A merge patch carrying metadata.resourceVersion is a compare-and-swap:
        StaleRecord when the Batch changed since it was read (a cancel arrived, kopf
        wrote its progress). Status fields the caller does not set are left alone."""
        body: dict[str, Any] = {"status": status}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            return self.crs.patch_namespaced_custom_object_status(GROUP, VERSION, self.namespace, PLURAL, name, body)
        except ApiException as exc:
            if exc.status == 409:
                raise StaleRecord(name) from exc
            raise


class Kube:
    def __init__(self, api: kubernetes.client.ApiClient, namespace: str) -> None:
        self.namespace = namespace
        self.crs = kubernetes.client.CustomObjectsApi(api)
        self.batch = kubernetes.client.BatchV1Api(api)
        self.core = kubernetes.client.CoreV1Api(api)
        self.batches = BatchResources(self.crs, namespace)
        self._api = api

    def _plain(self, obj: Any) -> dict[str, Any]:
        # Typed client models -> the camelCase dicts the builders and observe() read.
        return self._api.sanitize_for_serialization(obj)

    # --- Batch -------------------------------------------------------------------

    def get_batch(self, name: str) -> dict[str, Any] | None:
        return self.batches.get(name)

    def patch_batch_status(self, name: str, resource_version: str | None, status: dict[str, Any]) -> dict[str, Any]:
        return self.batches.patch_status(name, resource_version, status)

    def status_counts(self) -> dict[tuple[str, str | None], int]:
        """{(status, model): batches} of the namespace, listed a page at a time (metrics)."""
        counts: dict[tuple[str, str | None], int] = {}
        token: str | None = None
        while True:
            page = self.crs.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, limit=500, **({"_continue": token} if token else {}))
            for obj in page.get("items", []):
                key = ((obj.get("status") or {}).get("phase") or "validating", (obj.get("spec") or {}).get("model"))
                counts[key] = counts.get(key, 0) + 1
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return counts

    def delete_batch(self, name: str, resource_version: str) -> bool:
        """Delete a Batch only as it was read (precondition): StaleRecord when it changed
        meanwhile, False when it was already gone."""
        body = kubernetes.client.V1DeleteOptions(preconditions=kubernetes.client.V1Preconditions(
            resource_version=resource_version))
        try:
            self.crs.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, body=body)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            if exc.status == 409:
                raise StaleRecord(name) from exc
            raise

    def patch_batch_spec(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self.crs.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec})

    # --- the shard Job -----------------------------------------------------------

    def get_job(self, name: str) -> dict[str, Any] | None:
        try:
            return self._plain(self.batch.read_namespaced_job(name, self.namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create_job(self, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """(job, created). A Job of that name already there (an earlier attempt of this
        operator, or its predecessor before a restart) is adopted, never duplicated."""
        try:
            return self._plain(self.batch.create_namespaced_job(self.namespace, body)), True
        except ApiException as exc:
            if exc.status != 409:
                raise
        existing = self.get_job(body["metadata"]["name"])
        if existing is None:
            raise StaleRecord(body["metadata"]["name"])  # deleted in between: decide again
        return existing, False

    def delete_job(self, name: str) -> bool:
        """Background propagation: the pods go too (with Orphan, the legacy default for
        Jobs, they would keep running). False when the Job was already gone."""
        try:
            self.batch.delete_namespaced_job(name, self.namespace, propagation_policy="Background")
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def count_pods(self, batch_name: str) -> int:
        """Pods of this batch's Job still present, terminating ones included: only
        when none remain have the workers flushed their last results."""
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"{LABEL_BATCH}={batch_name}")
        return len(pods.items)

    # --- Events ------------------------------------------------------------------

    def post_event(self, batch: dict[str, Any], reason: str, message: str, type: str = "Normal") -> None:
        """An Event `kubectl describe batch` shows. Best effort: never fails a step."""
        event = build_event(involved=batch, reason=reason, message=message, type=type,
                            now=datetime.datetime.now(datetime.UTC))
        try:
            self.core.create_namespaced_event(self.namespace, event)
        except ApiException as exc:
            log.warning("could not post event %s on %s: %s", reason, batch["metadata"]["name"], exc.reason)
