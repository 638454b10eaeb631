"""Pure tests of the operator's builders: Batch CR <-> BatchRecord, the shard Job, events."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vbatch.core import state
from vbatch.core.ids import new_batch_id
from vbatch.core.projects import PROJECT_ID_PATTERN
from vbatch.core.schemas import (
    BatchErrorItem,
    BatchErrors,
    BatchRecord,
    BatchStatus,
    BatchUsage,
    InputTokensDetails,
    OutputTokensDetails,
    RequestCounts,
)
from vbatch.operator import builders
from vbatch.operator.builders import (
    batch_record_from_resource,
    build_batch_resource,
    build_batch_status,
    build_event,
    build_shard_job,
    label_value,
)
from vbatch.operator.config import WorkerPodConfig


def record(**overrides) -> BatchRecord:
    fields = dict(id=new_batch_id(), endpoint="/v1/chat/completions", model="smollm2", input_file_id="file-abc",
                  completion_window="24h", status=BatchStatus.VALIDATING, created_at=1_700_000_000, project="acme")
    return BatchRecord(**(fields | overrides))


def job(**overrides):
    kwargs = dict(batch_name="batch-01hzx", batch_uid="uid-1", namespace="ns", project="acme",
                  batch_id="batch_01HZX", model="smollm2", shard_count=4, parallelism=2, worker=WorkerPodConfig(),
                  max_attempts=3)
    return build_shard_job(**(kwargs | overrides))


# --- Batch CR ---------------------------------------------------------------------


def test_batch_resource_names_labels_and_spec():
    rec = record(metadata={"k": "v"}, cancel_requested=True)
    obj = build_batch_resource(rec, "vbatch", shards=3, parallelism=2)
    assert obj["apiVersion"] == "vbatch.dev/v1alpha1" and obj["kind"] == "Batch"
    assert obj["metadata"]["name"] == "batch-" + rec.id.removeprefix("batch_").lower()
    assert obj["metadata"]["namespace"] == "vbatch"
    assert obj["metadata"]["labels"]["vbatch.dev/project"] == "acme"
    assert obj["spec"] == {"inputFileId": "file-abc", "endpoint": "/v1/chat/completions", "completionWindow": "24h",
                           "project": "acme", "cancelRequested": True, "model": "smollm2", "metadata": {"k": "v"},
                           "shards": 3, "parallelism": 2}
    assert obj["status"]["phase"] == "validating"
    assert obj["status"]["requestCounts"] == {"total": 0, "completed": 0, "failed": 0}


def test_a_64_char_project_gets_a_hashed_label_but_spec_keeps_the_id():
    project = "p" * 64  # a valid project id, one char longer than a label value may be
    obj = build_batch_resource(record(project=project), "ns")
    label = obj["metadata"]["labels"]["vbatch.dev/project"]
    assert obj["spec"]["project"] == project
    assert label.startswith("p" * 40) and len(label) <= 63 and label != project
    assert builders.project_label(project) == label


@pytest.mark.parametrize("project", ["Team A", "a/b", "../x", "", "-lead", "x" * 65])
def test_a_record_with_an_invalid_project_id_builds_no_resource(project):
    with pytest.raises(ValueError, match="project"):
        build_batch_resource(record(project=project), "ns")


@pytest.mark.parametrize("raw", ["ok", "a.b_c-d", "", "-x-", "x" * 63, "x" * 64, "ü", "a b", "..."])
def test_label_values_are_always_valid(raw):
    import re

    value = label_value(raw)
    assert len(value) <= 63
    assert re.fullmatch(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?", value)


def test_different_projects_never_share_a_label_value():
    assert label_value("a/b") != label_value("a b") != label_value("a-b")


def test_a_resource_without_status_reads_as_validating():
    obj = build_batch_resource(record(), "ns")
    del obj["status"]  # what the API server keeps right after create
    rec = batch_record_from_resource(obj)
    assert rec.status == BatchStatus.VALIDATING and rec.created_at == 1_700_000_000


def test_full_record_round_trips():
    rec = record(
        status=BatchStatus.COMPLETED, output_file_id="file-out", error_file_id="file-err", in_progress_at=1,
        finalizing_at=2, completed_at=3, expires_at=4, request_counts=RequestCounts(total=3, completed=2, failed=1),
        usage=BatchUsage(input_tokens=5, output_tokens=6, total_tokens=11,
                         input_tokens_details=InputTokensDetails(cached_tokens=1),
                         output_tokens_details=OutputTokensDetails(reasoning_tokens=2)),
        errors=BatchErrors(data=[BatchErrorItem(code="x", message="m", line=3), BatchErrorItem(message="n")]),
        shard_count=2, metadata={}, revision="42",
    )
    assert batch_record_from_resource(build_batch_resource(rec, "ns")) == rec


_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=20)
_ts = st.none() | st.integers(min_value=0, max_value=2**40)


@settings(max_examples=60, deadline=None)
@given(
    status=st.sampled_from(list(BatchStatus)),
    model=st.none() | _text,
    project=st.from_regex(PROJECT_ID_PATTERN, fullmatch=True),
    metadata=st.none() | st.dictionaries(_text, _text, max_size=4),
    counts=st.tuples(*[st.integers(0, 10**6)] * 3),
    usage=st.none() | st.tuples(*[st.integers(0, 10**9)] * 5),
    errors=st.none() | st.lists(st.builds(BatchErrorItem, code=st.none() | _text, message=_text,
                                          param=st.none() | _text, line=st.none() | st.integers(1, 50_000)),
                                max_size=3),
    stamps=st.tuples(*[_ts] * 8),
    cancel=st.booleans(),
    shard_count=st.none() | st.integers(1, 256),
    revision=st.none() | st.integers(1, 10**9).map(str),
    files=st.tuples(st.none() | _text, st.none() | _text),
)
def test_round_trip_property(status, model, project, metadata, counts, usage, errors, stamps, cancel,
                             shard_count, revision, files):
    names = ["in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
             "cancelling_at", "cancelled_at"]
    rec = record(
        status=status, model=model, project=project, metadata=metadata, cancel_requested=cancel,
        request_counts=RequestCounts(total=counts[0], completed=counts[1], failed=counts[2]),
        usage=None if usage is None else BatchUsage(
            input_tokens=usage[0], output_tokens=usage[1], total_tokens=usage[2],
            input_tokens_details=InputTokensDetails(cached_tokens=usage[3]),
            output_tokens_details=OutputTokensDetails(reasoning_tokens=usage[4])),
        errors=None if errors is None else BatchErrors(data=errors),
        shard_count=shard_count, revision=revision, output_file_id=files[0], error_file_id=files[1],
        **dict(zip(names, stamps)),
    )
    assert batch_record_from_resource(build_batch_resource(rec, "ns")) == rec


# --- the shard Job ----------------------------------------------------------------


def test_job_is_one_indexed_job_owned_by_the_batch():
    obj = job()
    spec = obj["spec"]
    assert obj["metadata"]["name"] == "batch-01hzx-shards"
    assert spec["completionMode"] == "Indexed"
    assert (spec["completions"], spec["parallelism"]) == (4, 2)
    assert spec["backoffLimitPerIndex"] == 2 and spec["maxFailedIndexes"] == 4
    assert "ttlSecondsAfterFinished" not in spec and "suspend" not in spec
    # evictions/preemptions do not spend a shard's retry budget
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
    assert obj["metadata"]["ownerReferences"] == [{
        "apiVersion": "vbatch.dev/v1alpha1", "kind": "Batch", "name": "batch-01hzx", "uid": "uid-1",
        "controller": True, "blockOwnerDeletion": True}]
    assert obj["metadata"]["labels"]["vbatch.dev/batch"] == "batch-01hzx"
    assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "vbatch"
    assert spec["template"]["metadata"]["labels"]["vbatch.dev/batch"] == "batch-01hzx"


def test_parallelism_never_exceeds_the_shard_count():
    assert job(shard_count=2, parallelism=8)["spec"]["parallelism"] == 2
    with pytest.raises(ValueError):
        job(shard_count=0)


def test_pod_runs_the_worker_hardened_without_api_access():
    pod = job()["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["name"] == "worker"
    assert container["command"] == ["vbatch", "worker", "--project", "acme", "--batch-id", "batch_01HZX",
                                    "--model", "smollm2"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_worker_config_reaches_the_pod():
    worker = WorkerPodConfig(
        image="reg/vbatch:1", gpus=2, gpu_resource_name="amd.com/gpu", node_selector={"gpu": "mi300"},
        tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}], runtime_class_name="nvidia",
        service_account_name="worker", env={"B": "2", "A": "1"}, env_from_secrets=["s3-creds"],
        volumes=[{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}],
        volume_mounts=[{"name": "models", "mountPath": "/models"}],
        resources={"requests": {"memory": "8Gi"}, "limits": {"memory": "16Gi"}},
        image_pull_secrets=["regcred"], shm_size=None,
        pod_failure_policy={"rules": [{"action": "FailIndex", "onExitCodes": {"operator": "In", "values": [3]}}]},
    )
    obj = job(worker=worker, max_attempts=6)
    pod = obj["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "reg/vbatch:1"
    # read-only root: a scratch /tmp (and HOME there) is added since none was configured
    assert container["env"] == [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}, {"name": "HOME", "value": "/tmp"}]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert container["resources"] == {"requests": {"memory": "8Gi"}, "limits": {"memory": "16Gi", "amd.com/gpu": 2}}
    assert container["volumeMounts"] == [{"name": "models", "mountPath": "/models"}, {"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"] == [{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}, {"name": "tmp", "emptyDir": {}}]
    assert pod["nodeSelector"] == {"gpu": "mi300"} and pod["runtimeClassName"] == "nvidia"
    assert pod["tolerations"][0]["key"] == "gpu" and pod["serviceAccountName"] == "worker"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert obj["spec"]["backoffLimitPerIndex"] == 5  # 6 attempts: the first + 5 retries
    assert obj["spec"]["podFailurePolicy"]["rules"][0]["action"] == "FailIndex"


def test_cpu_workers_ask_for_no_gpu():
    container = job(worker=WorkerPodConfig(gpus=0, shm_size=None))["spec"]["template"]["spec"]["containers"][0]
    assert "resources" not in container


def test_kueue_queue_suspends_the_job():
    obj = job(worker=WorkerPodConfig(kueue_queue_name="gpu-queue"))
    assert obj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert obj["spec"]["suspend"] is True


def test_worker_config_from_env_and_file(monkeypatch, tmp_path):
    monkeypatch.setenv("VBATCH_WORKER_IMAGE", "env/image:2")
    monkeypatch.setenv("VBATCH_WORKER_TOLERATIONS", '[{"key": "gpu", "operator": "Exists"}]')
    monkeypatch.setenv("VBATCH_WORKER_GPUS", "4")
    cfg = WorkerPodConfig()
    assert (cfg.image, cfg.gpus, cfg.tolerations) == ("env/image:2", 4, [{"key": "gpu", "operator": "Exists"}])
    path = tmp_path / "worker.yaml"
    path.write_text("image: file/image:3\nnode_selector: {pool: gpu}\n")
    from_file = WorkerPodConfig.from_file(path)
    assert from_file.image == "file/image:3" and from_file.node_selector == {"pool": "gpu"}
    assert from_file.gpus == 4  # the file leaves it out; the environment still applies


# --- events -----------------------------------------------------------------------


def test_event_points_at_its_object():
    obj = build_batch_resource(record(), "ns")
    obj["metadata"]["uid"] = "u-1"
    when = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    event = build_event(involved=obj, reason="ShardFailed", message="x" * 2000, type="Warning", now=when)
    assert event["involvedObject"] == {"apiVersion": builders.API_VERSION, "kind": "Batch",
                                       "name": obj["metadata"]["name"], "namespace": "ns", "uid": "u-1"}
    assert event["metadata"]["generateName"] == obj["metadata"]["name"] + "."
    assert event["type"] == "Warning" and len(event["message"]) == 1024
    assert event["firstTimestamp"] == "2025-01-02T03:04:05Z"


def test_status_carries_a_succeeded_condition_for_kubectl_wait():
    running = state.new_batch(project="p", input_file_id="file-" + "a" * 24, endpoint="/v1/chat/completions",
                              completion_window="24h", metadata=None, total=2, model="m", window_seconds=60, now=100)
    [cond] = build_batch_status(running)["conditions"]
    assert (cond["type"], cond["status"], cond["reason"]) == ("Succeeded", "Unknown", "InProgress")
    assert cond["lastTransitionTime"] == "1970-01-01T00:01:40Z"
    done = state.transition(state.transition(running, BatchStatus.FINALIZING, 150), BatchStatus.COMPLETED, 160)
    [cond] = build_batch_status(done)["conditions"]
    assert (cond["status"], cond["reason"], cond["lastTransitionTime"]) == ("True", "Completed", "1970-01-01T00:02:40Z")
    cancelled = state.transition(state.request_cancel(running, 120), BatchStatus.CANCELLED, 130)
    assert build_batch_status(cancelled)["conditions"][0]["status"] == "False"
