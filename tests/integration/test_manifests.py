"""Every manifest vbatch builds is valid for Kubernetes, and the CRD schema means what it says."""

from __future__ import annotations

import copy
import datetime
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kube.semantics import schema_errors
from vbatch.core.ids import new_batch_id
from vbatch.core.schemas import (
    BatchErrorItem,
    BatchErrors,
    BatchRecord,
    BatchStatus,
    BatchUsage,
    RequestCounts,
)
from vbatch.operator.builders import build_batch_resource, build_event, build_shard_job
from vbatch.operator.config import WorkerPodConfig

K8S_VERSION = "1.32.0"  # what kubectl here speaks; backoffLimitPerIndex is on by default since 1.29
CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "batches.vbatch.dev.yaml"
CRD = yaml.safe_load(CRD_PATH.read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def record(**overrides) -> BatchRecord:
    fields = dict(id=new_batch_id(), endpoint="/v1/chat/completions", model="smollm2", input_file_id="file-abc",
                  completion_window="24h", status=BatchStatus.VALIDATING, created_at=1_700_000_000, project="acme")
    return BatchRecord(**(fields | overrides))


WORKERS = {
    "defaults": WorkerPodConfig(),
    "cpu": WorkerPodConfig(gpus=0, shm_size=None, run_as_user=None),
    "everything": WorkerPodConfig(
        image="reg/vbatch:1", image_pull_policy="IfNotPresent", image_pull_secrets=["regcred"], gpus=8,
        gpu_resource_name="amd.com/gpu", resources={"requests": {"cpu": "4", "memory": "32Gi"}},
        node_selector={"accelerator": "mi300x"},
        tolerations=[{"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        runtime_class_name="rocm", service_account_name="vbatch-worker", env={"HF_HOME": "/models"},
        env_from_secrets=["vbatch-s3"], volumes=[{"name": "models", "persistentVolumeClaim": {"claimName": "m"}}],
        volume_mounts=[{"name": "models", "mountPath": "/models", "readOnly": True}],
        pod_failure_policy={"rules": [{"action": "FailIndex", "onExitCodes": {"operator": "In", "values": [3]}}]},
    ),
    "kueue": WorkerPodConfig(kueue_queue_name="gpu-queue"),
}


@pytest.mark.parametrize("variant", list(WORKERS))
def test_shard_jobs_are_valid_kubernetes(variant):
    validate(build_shard_job(batch_name="batch-01hzx", batch_uid="0b1c", namespace="ns", project="Team A/ß",
                             batch_id="batch_01HZX", model="smollm2", shard_count=8, parallelism=4,
                             worker=WORKERS[variant], max_attempts=1 if variant == "kueue" else 3))


def test_crd_and_event_are_valid_kubernetes():
    validate(CRD)
    obj = build_batch_resource(record(), "ns")
    obj["metadata"]["uid"] = "u"
    validate(build_event(involved=obj, reason="Created", message="m", now=datetime.datetime.now(datetime.UTC)))


def test_invalid_jobs_are_caught_by_the_validator():
    job = build_shard_job(batch_name="b", batch_uid="u", namespace="ns", project="p", batch_id="batch_X",
                          model="m", shard_count=1, parallelism=1, worker=WorkerPodConfig(), max_attempts=3)
    job["spec"]["completionMode"] = 7
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(job)


SAMPLES = {
    "fresh": record(),
    "completed": record(status=BatchStatus.COMPLETED, request_counts=RequestCounts(total=3, completed=3),
                        output_file_id="file-out", in_progress_at=1, finalizing_at=2, completed_at=3,
                        usage=BatchUsage(input_tokens=1, output_tokens=2, total_tokens=3), shard_count=2,
                        metadata={"k": "v"}),
    "failed": record(status=BatchStatus.FAILED, failed_at=5,
                     errors=BatchErrors(data=[BatchErrorItem(code="duplicate_custom_id", message="m", line=4)])),
}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_built_batches_match_the_crd_schema(name):
    obj = build_batch_resource(SAMPLES[name], "ns", shards=2, parallelism=2)
    assert schema_errors(SCHEMA, obj) == []


def _spec_with(**changes):
    obj = build_batch_resource(record(), "ns")
    for key, value in changes.items():
        if value is None:
            obj["spec"].pop(key)
        else:
            obj["spec"][key] = value
    return obj


@pytest.mark.parametrize("changes", [
    {"inputFileId": "batch_123"},
    {"endpoint": "/v1/embeddings"},
    {"completionWindow": "48h"},
    {"project": None},
    {"inputFileId": None},
    {"metadata": {f"k{i}": "v" for i in range(17)}},
    {"metadata": {"k": 1}},
    {"cancelRequested": "yes"},
    {"shards": 0},
    {"parallelism": 257},
])
def test_malformed_specs_are_rejected(changes):
    assert schema_errors(SCHEMA, _spec_with(**changes))


@pytest.mark.parametrize("status", [
    {"phase": "running"},
    {"requestCounts": {"total": -1}},
    {"createdAt": "2024-01-01T00:00:00Z"},
    {"errors": [{"code": "x"}]},
    {"conditions": [{"type": "Ready"}]},
])
def test_malformed_statuses_are_rejected(status):
    obj = build_batch_resource(record(), "ns")
    obj["status"] = status
    assert schema_errors(SCHEMA, obj)


def test_kopf_may_store_anything_under_status_kopf():
    obj = build_batch_resource(record(), "ns")
    obj["status"]["kopf"] = {"progress": {"handler": {"retries": 1}}, "dummy": "x"}
    assert schema_errors(SCHEMA, obj) == []


def test_crd_declares_the_kubectl_surface():
    names = CRD["spec"]["names"]
    assert (names["kind"], names["plural"], names["singular"], names["shortNames"]) == \
        ("Batch", "batches", "batch", ["vb"])
    version = CRD["spec"]["versions"][0]
    assert version["served"] and version["storage"] and "status" in version["subresources"]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns)[:6] == ["STATUS", "MODEL", "TOTAL", "COMPLETED", "FAILED", "AGE"]
    assert columns["AGE"]["type"] == "date" and columns["OUTPUT"]["priority"] == 1


KUBECTL = shutil.which("kubectl")


@pytest.mark.cluster
@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
@pytest.mark.parametrize("what", ["batches", "vb", "batch.vbatch.dev"])
def test_kubectl_get_shows_the_printer_columns(kube_cluster, tmp_path, what):
    rec = record(status=BatchStatus.IN_PROGRESS, request_counts=RequestCounts(total=10, completed=4, failed=1),
                 output_file_id="file-out123")
    obj = build_batch_resource(rec, "default")
    kube_cluster.create(copy.deepcopy(obj), status=obj["status"])
    name = obj["metadata"]["name"]

    def kubectl(*args: str) -> list[list[str]]:
        done = subprocess.run([KUBECTL, "--kubeconfig", str(kube_cluster.kubeconfig), "--cache-dir",
                               str(tmp_path / "cache"), *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "Warning" not in done.stderr, done.stderr
        return [line.split() for line in done.stdout.splitlines()]

    header, row = kubectl("get", what)
    assert header == ["NAME", "STATUS", "MODEL", "TOTAL", "COMPLETED", "FAILED", "AGE"]
    assert row[:6] == [name, "in_progress", "smollm2", "10", "4", "1"]
    assert row[6].endswith("s")

    header, row = kubectl("get", what, "-o", "wide")
    assert header[-1] == "OUTPUT" and row[-1] == "file-out123"
