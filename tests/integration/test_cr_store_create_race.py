"""Regression (faf082a): KubeBatchStore.create writes the status with a compare-and-swap
right after creating the Batch; when the operator (kopf adding its finalizer) changed the
resource in between, the write got 409 and POST /v1/batches answered 500. Deterministic:
the resource is bumped exactly between the create and the status write."""

from __future__ import annotations

import time

import pytest
from kube.harness import BATCH_API, ClusterEnv
from vbatch.core import state
from vbatch.core.batch_resource import record_from_resource
from vbatch.core.ids import batch_object_name
from vbatch.operator import kube as kube_module
from vbatch.operator.cr_store import KubeBatchStore

pytestmark = pytest.mark.cluster

PROJECT = "team-a"
FINALIZER = "vbatch.dev/test-finalizer"


def new_record():
    return state.new_batch(project=PROJECT, input_file_id="file-abc", endpoint="/v1/chat/completions",
                           completion_window="24h", metadata={"k": "v"}, total=3, model="test-model",
                           window_seconds=3600, now=int(time.time()))


def bump_before_status_writes(env: ClusterEnv, monkeypatch, times: int, status: dict | None = None) -> list[str]:
    """Before each of the first `times` status writes, change the Batch as kopf would
    (a finalizer; optionally the operator's own status), so the write's
    resourceVersion is stale. Returns the names of the writes bumped."""
    original = kube_module.BatchResources.patch_status
    bumped: list[str] = []

    def racing(self, name, resource_version, body):
        if len(bumped) < times:
            bumped.append(name)
            env.cluster.patch(BATCH_API, "Batch", name, {"metadata": {
                "finalizers": [FINALIZER], "annotations": {"test/bumps": str(len(bumped))}}})
            if status is not None:
                env.cluster.patch_status(BATCH_API, "Batch", name, status)
        return original(self, name, resource_version, body)

    monkeypatch.setattr(kube_module.BatchResources, "patch_status", racing)
    return bumped


def test_create_succeeds_when_the_finalizer_lands_before_the_first_status_write(cluster_env: ClusterEnv,
                                                                               monkeypatch):
    env = cluster_env
    store = KubeBatchStore.from_settings(env.settings)
    bumped = bump_before_status_writes(env, monkeypatch, times=1)
    record = new_record()
    store.create(record)  # raised StaleRecord (a 500) before faf082a
    assert bumped == [batch_object_name(record.id)]
    obj = env.batch(record.id)
    assert obj["metadata"]["finalizers"] == [FINALIZER]  # the operator's change is kept
    assert record.revision == obj["metadata"]["resourceVersion"]  # the store's record is current
    assert obj["status"]["phase"] == "in_progress"  # the gateway validated the input
    stored = record_from_resource(obj)
    assert stored.to_wire() == record.to_wire()
    assert store.get(PROJECT, record.id).to_wire() == record.to_wire()
    page, more = store.list_page(PROJECT, after=None, limit=10)
    assert [r.id for r in page] == [record.id] and not more


def test_create_keeps_the_operators_status_when_it_validated_first(cluster_env: ClusterEnv, monkeypatch):
    env = cluster_env
    store = KubeBatchStore.from_settings(env.settings)
    record = new_record()
    moved = {"phase": "in_progress", "requestCounts": {"total": 7, "completed": 0, "failed": 0}}
    bump_before_status_writes(env, monkeypatch, times=1, status=moved)
    store.create(record)
    obj = env.batch(record.id)
    assert obj["status"]["requestCounts"]["total"] == 7  # the operator's status is not overwritten
    assert record.revision == obj["metadata"]["resourceVersion"]


def test_create_conflicting_every_time_still_creates_the_batch_once(cluster_env: ClusterEnv, monkeypatch):
    """The Batch is durable once created: the operator validates it without the gateway's
    status, so the client gets its batch (a retried POST would make a second one)."""
    env = cluster_env
    store = KubeBatchStore.from_settings(env.settings)
    bump_before_status_writes(env, monkeypatch, times=1000)
    record = new_record()
    store.create(record)
    names = [o["metadata"]["name"] for o in env.cluster.list(BATCH_API, "Batch")]
    assert names == [batch_object_name(record.id)]
    got = store.get(PROJECT, record.id)
    assert got is not None and got.status == "validating"  # the operator validates it itself
    assert (got.created_at, got.input_file_id, got.metadata) == (record.created_at, "file-abc", {"k": "v"})


def test_a_gateway_cancel_keeps_the_drivers_markers(cluster_env: ClusterEnv):
    """One status save for both sides: a cancel through the gateway's store keeps the
    clean-up marker and the StepFailed condition the operator's store wrote."""
    from vbatch.core.schemas import StepFailure
    from vbatch.operator.kube import Kube, api_client
    from vbatch.operator.kube_batches import KubeBatches

    env = cluster_env
    store = KubeBatchStore.from_settings(env.settings)
    record = new_record()
    store.create(record)
    driver_side = KubeBatches(Kube(api_client("operator"), env.cluster.namespace), env.settings)
    running = driver_side.get(PROJECT, record.id)
    running.cleanup_pending = True
    running.step_failure = StepFailure(action="wait", kind="transient", code="storage_unavailable", message="down",
                                       attempts=2, first_at=100.0, last_at=101.5, retry_at=103.5)
    driver_side.save(running)
    cancelled = store.request_cancel(PROJECT, record.id)
    assert cancelled.status == "cancelling"
    status = env.batch(record.id)["status"]
    assert status["phase"] == "cancelling"
    assert status["jobName"] == f"{batch_object_name(record.id)}-shards"
    assert {c["type"] for c in status["conditions"]} == {"Succeeded", "StepFailed"}
    assert driver_side.get(PROJECT, record.id).step_failure == running.step_failure
