"""The kopf operator with warm per-model pools (the cluster default): Batches applied
directly, pool pods run by the job runner as real `vbatch worker --pool` processes."""

from __future__ import annotations

import json

import pytest
from api_server import chat_line, jsonl
from kube.harness import BATCH_API, ClusterEnv, wait_for
from vbatch.core.ids import batch_object_name, new_batch_id
from vbatch.core.schemas import FilePurpose

pytestmark = pytest.mark.cluster

PROJECT = "team-a"


def upload(env: ClusterEnv, n: int, words: int = 3) -> str:
    lines = [chat_line(f"r-{i}", " ".join(["word"] * words)) for i in range(n)]
    return env.files.create(PROJECT, iter([jsonl(lines)]), filename="in.jsonl", purpose=FilePurpose.BATCH).id


def apply_batch(env: ClusterEnv, file_id: str) -> str:
    batch_id = new_batch_id()
    env.cluster.create({
        "apiVersion": BATCH_API, "kind": "Batch", "metadata": {"name": batch_object_name(batch_id)},
        "spec": {"inputFileId": file_id, "endpoint": "/v1/chat/completions", "completionWindow": "24h",
                 "project": PROJECT},
    })
    return batch_id


def output_ids(env: ClusterEnv, obj: dict) -> list[str]:
    ids = []
    for key in ("outputFileId", "errorFileId"):
        if obj["status"].get(key):
            _, chunks = env.files.open(PROJECT, obj["status"][key])
            ids += [json.loads(line)["custom_id"] for line in b"".join(chunks).splitlines() if line.strip()]
    return ids


@pytest.mark.timeout(240)
def test_batches_share_one_warm_pool_pod_and_a_cancel_spares_the_others(cluster_env: ClusterEnv):
    env = cluster_env
    env.configure(VBATCH_CLUSTER_RUNTIME="pools", VBATCH_POOL_POLL_SECONDS="0.2", VBATCH_POOL_IDLE_SECONDS="3",
                  worker_env={"VBATCH_ECHO_DELAY_PER_TOKEN": "0.02", "VBATCH_ECHO_MAX_IN_FLIGHT": "4",
                              "VBATCH_PART_MAX_RESULTS": "4"})
    small = [upload(env, 6) for _ in range(5)]
    doomed_file = upload(env, 300, words=8)
    with env.operator(), env.job_runner() as runner:
        doomed = apply_batch(env, doomed_file)
        env.wait_phase(doomed, {"in_progress"})
        batches = [apply_batch(env, f) for f in small]
        done = [env.wait_settled(b, timeout=120) for b in batches]
        env.cluster.patch(BATCH_API, "Batch", batch_object_name(doomed), {"spec": {"cancelRequested": True}})
        cancelled = env.wait_settled(doomed, timeout=60)
        pods_while_working = list(runner.procs)
        # Idle pool pods leave by themselves: the pool scales to zero.
        runner.wait_idle(timeout=60)

    for obj in done:
        assert obj["status"]["phase"] == "completed"
        assert sorted(output_ids(env, obj)) == sorted(f"r-{i}" for i in range(6))
    assert cancelled["status"]["phase"] == "cancelled"
    counts = cancelled["status"]["requestCounts"]
    assert counts["total"] == 300 and 0 < counts["completed"] < 300
    assert sorted(output_ids(env, cancelled)) == sorted(f"r-{i}" for i in range(300))
    # Catalog max_replicas is 1 for a model it does not list: one pod, one engine load,
    # for six batches — and the cancel did not restart it.
    assert len(pods_while_working) == 1
    logs = "".join(p.read_text(errors="replace") for p in runner.logs.glob("*.log"))
    assert logs.count("engine echo loaded") == 1
    # `kubectl describe batch` names the pool pod that ran each shard.
    job = pods_while_working[0].rsplit("-", 2)[0]
    for obj in done:
        events = [e for e in env.cluster.list("v1", "Event")
                  if e["involvedObject"]["name"] == obj["metadata"]["name"]]
        assert any(e["reason"] == "Assigned" and job in e["message"] for e in events)
    wait_for(lambda: runner.procs[pods_while_working[0]].poll(), lambda code: code == 0, timeout=10)
