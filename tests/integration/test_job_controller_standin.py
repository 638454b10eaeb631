"""The Job stand-in (kube/job_runner.py) counts failures as the Job controller does:
per index, with the per-index back-off, podFailurePolicy, maxFailedIndexes and the
1.31+ order of terminal conditions. The operator's retry tests rely on these."""

from __future__ import annotations

import sys

import pytest
from kube.fixtures import KubeCluster
from kube.harness import wait_for
from kube.job_runner import INDEX_FAILURE_COUNT, JobRunner, fail_always, failure_action, index_backoff

pytestmark = pytest.mark.cluster


def job(name: str, completions: int, **spec) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"completionMode": "Indexed", "completions": completions, "parallelism": completions,
                     "template": {"metadata": {}, "spec": {"restartPolicy": "Never", "containers": [
                         {"name": "worker", "image": "x", "command": [sys.executable, "-c", "pass"]}]}},
                     **spec}}


def finished(cluster: KubeCluster, name: str) -> dict:
    return wait_for(lambda: cluster.get("batch/v1", "Job", name).get("status") or {},
                    lambda s: any(c["type"] in ("Complete", "Failed") for c in s.get("conditions") or []), 60)


def test_failure_action_follows_pod_failure_policy_rules():
    policy = {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [42]}},
        {"action": "FailIndex", "onExitCodes": {"operator": "NotIn", "values": [1, 42]}},
    ]}
    assert failure_action(policy, 1, [{"type": "DisruptionTarget", "status": "True"}]) == "Ignore"
    assert failure_action(policy, 42, []) == "FailJob"
    assert failure_action(policy, 3, []) == "FailIndex"
    assert failure_action(policy, 1, []) == "Count"
    assert failure_action(None, 1, []) == "Count"


def test_index_backoff_doubles_from_the_base_and_is_capped():
    assert [index_backoff(10, n) for n in range(5)] == [0, 10, 20, 40, 80]
    assert index_backoff(10, 20) == 600


def test_an_index_is_retried_after_its_own_back_off_then_fails_alone(kube_cluster: KubeCluster, tmp_path):
    kube_cluster.create(job("j", 3, backoffLimitPerIndex=2, maxFailedIndexes=3))
    with JobRunner(kube_cluster, tmp_path, fail=fail_always(1), backoff_base=0.3) as runner:
        status = finished(kube_cluster, "j")
    assert [i for _, i in runner.launched].count(1) == 3  # the first pod and two retries
    assert status["completedIndexes"] == "0,2" and status["failedIndexes"] == "1"
    assert status["failed"] == 3 and status["succeeded"] == 2
    assert [c["type"] for c in status["conditions"]] == ["FailureTarget", "Failed"]
    assert {c["reason"] for c in status["conditions"]} == {"FailedIndexes"}
    pods = [p for p in kube_cluster.list("v1", "Pod")
            if p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == "1"]
    counts = sorted(int(p["metadata"]["annotations"][INDEX_FAILURE_COUNT]) for p in pods)
    assert counts == [0, 1, 2]
    # Each retry waited its back-off (0.3 s, then 0.6 s) after the previous pod failed.
    starts = [t for (name, i), t in zip(runner.launched, runner.launched_at) if i == 1]
    failures = runner.failed_at[("j", 1)]
    assert starts[1] - failures[0] >= 0.3 and starts[2] - failures[1] >= 0.6


def test_more_failed_indexes_than_allowed_fail_the_job_at_once(kube_cluster: KubeCluster, tmp_path):
    kube_cluster.create(job("j", 4, parallelism=1, backoffLimitPerIndex=0, maxFailedIndexes=0))
    with JobRunner(kube_cluster, tmp_path, fail=fail_always(0), backoff_base=0.1) as runner:
        status = finished(kube_cluster, "j")
    assert runner.launched == [("j", 0)]  # nothing else was started
    assert status["failedIndexes"] == "0" and "completedIndexes" not in status
    assert [(c["type"], c["reason"]) for c in status["conditions"]] == [
        ("FailureTarget", "MaxFailedIndexesExceeded"), ("Failed", "MaxFailedIndexesExceeded")]


def test_success_criteria_come_before_complete(kube_cluster: KubeCluster, tmp_path):
    kube_cluster.create(job("j", 2, backoffLimitPerIndex=1))
    with JobRunner(kube_cluster, tmp_path):
        status = finished(kube_cluster, "j")
    assert [c["type"] for c in status["conditions"]] == ["SuccessCriteriaMet", "Complete"]
    assert status["completedIndexes"] == "0-1" and status["startTime"] and status["completionTime"]
