"""Pure builders of warm pool pods: valid Kubernetes, Kueue-admissible, credential-free."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest
from vbatch.operator import pool_builders
from vbatch.operator.config import WorkerPodConfig

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def job(worker: WorkerPodConfig, model: str = "meta-llama/Llama-3.1-8B-Instruct") -> dict:
    pool = pool_builders.pool_name(model)
    return pool_builders.build_pool_job(pool=pool, member=pool_builders.new_member_name(pool), model=model,
                                        namespace="vbatch", worker=worker, idle_seconds=300, poll_seconds=2)


@pytest.mark.parametrize("model", ["smollm2", "meta-llama/Llama-3.1-8B-Instruct", "A" * 200, "模型"])
def test_pool_and_member_names_are_dns_labels_and_pod_names_fit(model):
    pool = pool_builders.pool_name(model)
    member = pool_builders.new_member_name(pool)
    assert DNS_LABEL.match(pool) and DNS_LABEL.match(member)
    assert len(f"{member}-0-abcde") <= 63  # the pod name the Job controller makes
    assert pool_builders.pool_name(model) == pool  # stable: the operator finds its pool again
    assert pool_builders.pool_name(model + "x") != pool


@pytest.mark.parametrize("worker", [WorkerPodConfig(), WorkerPodConfig(gpus=0, shm_size=None),
                                    WorkerPodConfig(kueue_queue_name="gpus", gpus=4)])
def test_pool_jobs_are_valid_kubernetes(worker):
    kubernetes_validate.validate(job(worker), "1.32.0", strict=True)


def test_a_pool_job_is_one_gpu_pod_running_the_pool_worker_without_api_credentials():
    built = job(WorkerPodConfig(gpus=2))
    spec = built["spec"]
    assert (spec["completions"], spec["parallelism"], spec["backoffLimitPerIndex"]) == (1, 1, 0)
    pod = spec["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    command = container["command"]
    assert command[:3] == ["vbatch", "worker", "--pool"]
    assert command[command.index("--member") + 1] == built["metadata"]["name"]
    assert command[command.index("--idle-seconds") + 1] == "300"
    assert "suspend" not in spec and "kueue.x-k8s.io/queue-name" not in built["metadata"]["labels"]


def test_with_kueue_a_pool_job_is_created_suspended_with_its_queue_label():
    built = job(WorkerPodConfig(kueue_queue_name="gpu-queue"))
    assert built["spec"]["suspend"] is True
    assert built["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"


def test_job_ended_reads_conditions():
    assert pool_builders.job_ended(None) == (True, False)
    assert pool_builders.job_ended({"status": {"active": 1}}) == (False, False)
    assert pool_builders.job_ended({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}) == (True, False)
    assert pool_builders.job_ended({"status": {"conditions": [{"type": "Failed", "status": "True"}]}}) == (True, True)
    assert pool_builders.job_ended({"status": {"conditions": [{"type": "Failed", "status": "False"}]}}) == (False, False)
