"""The kopf operator against the Kubernetes emulator, with Batches applied directly
(as `kubectl apply` would: no gateway), shard Jobs run by the job runner as real
`vbatch worker` processes on the echo engine, and a local object store shared by all.
"""

from __future__ import annotations

import json
import time

import pytest
from api_server import chat_line, jsonl
from kube.harness import BATCH_API, ClusterEnv, wait_for
from kube.job_runner import fail_always, fail_once
from vbatch.core.ids import batch_object_name, new_batch_id
from vbatch.core.layout import input_key
from vbatch.core.lifecycle import result_file_id
from vbatch.core.schemas import FilePurpose
from vbatch.operator.observe import failed_indexes, observe, parse_indexes

pytestmark = pytest.mark.cluster

PROJECT = "team-a"


def upload(env: ClusterEnv, lines: list[dict] | bytes) -> str:
    data = lines if isinstance(lines, bytes) else jsonl(lines)
    return env.files.create(PROJECT, iter([data]), filename="in.jsonl", purpose=FilePurpose.BATCH).id


def apply_batch(env: ClusterEnv, file_id: str, **spec) -> str:
    """A Batch as a user writes it in YAML: spec only, no status, no vbatch annotations."""
    batch_id = new_batch_id()
    env.cluster.create({
        "apiVersion": BATCH_API, "kind": "Batch",
        "metadata": {"name": batch_object_name(batch_id)},
        "spec": {"inputFileId": file_id, "endpoint": "/v1/chat/completions", "completionWindow": "24h",
                 "project": PROJECT, **spec},
    })
    return batch_id


def requests(n: int, prefix: str = "r") -> list[dict]:
    return [chat_line(f"{prefix}-{i}", f"question number {i}") for i in range(n)]


def result_lines(env: ClusterEnv, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    _, chunks = env.files.open(PROJECT, file_id)
    return [json.loads(line) for line in b"".join(chunks).splitlines() if line.strip()]


# --- pure: Job status -> Observation --------------------------------------------------


def test_index_strings_and_observation():
    assert parse_indexes("0-2,5,7-8") == {0, 1, 2, 5, 7, 8}
    assert parse_indexes("") == parse_indexes(None) == frozenset()
    from vbatch.core.schemas import BatchRecord

    record = BatchRecord(id=new_batch_id(), project="p", endpoint="/v1/chat/completions", input_file_id="file-x",
                         completion_window="24h", status="in_progress", created_at=0, shard_count=4)
    job = {"status": {"completedIndexes": "0,2", "failedIndexes": "1,2"}}
    seen = observe(record, job, now=1)
    assert (seen.shards_total, seen.shards_succeeded, seen.shards_failed) == (4, 2, 1)
    assert failed_indexes(job) == {1}  # an index that finally succeeded is not failed
    assert observe(record, None, now=1).shards_total is None  # no Job: launch it


# --- Batches applied directly -----------------------------------------------------------


def test_applied_batch_runs_to_completion(cluster_env: ClusterEnv):
    env = cluster_env
    env.configure(VBATCH_SHARD_TARGET_REQUESTS=4)
    file_id = upload(env, requests(10))
    with env.operator(), env.job_runner() as runner:
        batch_id = apply_batch(env, file_id)
        obj = env.wait_settled(batch_id)
    status = obj["status"]
    assert status["phase"] == "completed", status
    assert status["requestCounts"] == {"total": 10, "completed": 10, "failed": 0}
    assert status["shardCount"] == 3 and len({i for _, i in runner.launched}) == 3
    assert obj["spec"]["model"] == "test-model"  # learnt from the input: kubectl shows it
    assert status["expiresAt"] - status["createdAt"] == 24 * 3600
    lines = result_lines(env, status["outputFileId"])
    assert sorted(line["custom_id"] for line in lines) == sorted(f"r-{i}" for i in range(10))
    assert all(line["response"]["status_code"] == 200 for line in lines)
    assert "errorFileId" not in status
    reasons = [e["reason"] for e in env.cluster.list("v1", "Event")
               if e["involvedObject"]["name"] == obj["metadata"]["name"]]
    assert {"Validated", "Launched", "Finalizing", "Completed"} <= set(reasons)
    # Cleaned up: the Job is gone, the working objects too, the result file stays.
    assert env.cluster.list("batch/v1", "Job") == []
    assert env.working_objects(PROJECT, batch_id) == []


def test_applied_batch_with_a_bad_line_fails_naming_it(cluster_env: ClusterEnv):
    env = cluster_env
    bad = jsonl(requests(2)) + b'{"custom_id": "x", "method": "GET"}\n'
    file_id = upload(env, bad)
    with env.operator():
        batch_id = apply_batch(env, file_id)
        obj = env.wait_phase(batch_id, {"failed", "in_progress", "completed"})
        time.sleep(0.5)
    assert obj["status"]["phase"] == "failed"
    errors = obj["status"]["errors"]
    assert errors and all(e["line"] == 3 for e in errors) and "line 3" in errors[0]["message"]
    assert env.cluster.list("batch/v1", "Job") == []  # nothing was launched
    warning = [e for e in env.cluster.list("v1", "Event") if e["reason"] == "Failed"]
    assert warning and warning[0]["type"] == "Warning" and "line 3" in warning[0]["message"]


def test_applied_batch_with_unknown_file_fails(cluster_env: ClusterEnv):
    env = cluster_env
    with env.operator():
        batch_id = apply_batch(env, "file-" + "0" * 24)
        obj = env.wait_settled(batch_id)
    assert obj["status"]["errors"][0]["code"] == "file_not_found"


def test_input_deleted_before_launch_still_runs(cluster_env: ClusterEnv):
    """As at OpenAI: a created batch owns its requests (the gateway keeps a copy)."""
    env = cluster_env
    file_id = upload(env, requests(3))
    record = _gateway_batch(env, file_id, 3)
    env.files.delete(PROJECT, file_id)
    with env.operator(), env.job_runner():
        obj = env.wait_settled(record.id)
    status = obj["status"]
    assert status["phase"] == "completed", status
    assert sorted(line["custom_id"] for line in result_lines(env, status["outputFileId"])) == ["r-0", "r-1", "r-2"]
    assert env.cluster.list("batch/v1", "Job") == [] and env.working_objects(PROJECT, record.id) == []


def test_a_shard_failing_once_is_retried(cluster_env: ClusterEnv):
    env = cluster_env
    env.configure(VBATCH_SHARD_TARGET_REQUESTS=4, VBATCH_SHARD_MAX_ATTEMPTS=3)
    file_id = upload(env, requests(8))
    with env.operator(), env.job_runner(fail=fail_once(1)) as runner:
        batch_id = apply_batch(env, file_id)
        obj = env.wait_settled(batch_id)
    assert runner.launched.count((f"{batch_object_name(batch_id)}-shards", 1)) == 2
    assert obj["status"]["phase"] == "completed"
    assert obj["status"]["requestCounts"] == {"total": 8, "completed": 8, "failed": 0}
    lines = result_lines(env, obj["status"]["outputFileId"])
    assert sorted(line["custom_id"] for line in lines) == sorted(f"r-{i}" for i in range(8))


def test_a_shard_failing_past_its_budget_gets_error_lines(cluster_env: ClusterEnv):
    env = cluster_env
    env.configure(VBATCH_SHARD_TARGET_REQUESTS=4, VBATCH_SHARD_MAX_ATTEMPTS=2)
    file_id = upload(env, requests(8))
    with env.operator(), env.job_runner(fail=fail_always(0)) as runner:
        batch_id = apply_batch(env, file_id)
        obj = env.wait_settled(batch_id)
    assert runner.launched.count((f"{batch_object_name(batch_id)}-shards", 0)) == 2  # 1 + 1 retry
    status = obj["status"]
    assert status["phase"] == "completed"
    assert status["requestCounts"] == {"total": 8, "completed": 4, "failed": 4}
    assert status["errors"][0]["code"] == "shard_failed"
    ok = result_lines(env, status["outputFileId"])
    failed = result_lines(env, status["errorFileId"])
    assert len(ok) == 4 and len(failed) == 4
    assert {line["error"]["code"] for line in failed} == {"shard_failed"}
    assert sorted(line["custom_id"] for line in ok + failed) == sorted(f"r-{i}" for i in range(8))


def test_every_shard_failing_fails_the_batch(cluster_env: ClusterEnv):
    env = cluster_env
    env.configure(VBATCH_SHARD_TARGET_REQUESTS=4, VBATCH_SHARD_MAX_ATTEMPTS=1)
    file_id = upload(env, requests(8))
    with env.operator(), env.job_runner(fail=fail_always(0, 1)):
        batch_id = apply_batch(env, file_id)
        obj = env.wait_settled(batch_id)
    status = obj["status"]
    assert status["phase"] == "failed"
    assert status["requestCounts"] == {"total": 8, "completed": 0, "failed": 8}
    assert len(result_lines(env, status["errorFileId"])) == 8


def test_cancel_with_kubectl_patch(cluster_env: ClusterEnv):
    env = cluster_env
    env.configure(VBATCH_SHARD_TARGET_REQUESTS=5, worker_env={"VBATCH_ECHO_DELAY_PER_TOKEN": "0.05",
                                                              "VBATCH_PART_MAX_RESULTS": "1"})
    file_id = upload(env, requests(40))
    with env.operator(), env.job_runner(capacity=2) as runner:
        batch_id = apply_batch(env, file_id)
        name = batch_object_name(batch_id)
        wait_for(lambda: env.batch(batch_id).get("status") or {}, lambda s: s.get("requestCounts", {}).get("completed", 0) > 0)
        env.cluster.patch(BATCH_API, "Batch", name, {"spec": {"cancelRequested": True}})
        obj = env.wait_settled(batch_id)
        runner.wait_idle()
    status = obj["status"]
    counts = status["requestCounts"]
    assert counts["total"] == 40 and counts["completed"] + counts["failed"] == 40
    assert 0 < counts["completed"] < 40
    ok = result_lines(env, status.get("outputFileId"))
    cancelled = result_lines(env, status.get("errorFileId"))
    assert {line["error"]["code"] for line in cancelled} == {"batch_cancelled"}
    assert sorted(line["custom_id"] for line in ok + cancelled) == sorted(f"r-{i}" for i in range(40))
    assert env.cluster.list("batch/v1", "Job") == [] and env.cluster.list("v1", "Pod") == []
    assert status["cancellingAt"] <= status["cancelledAt"]


def test_deleting_a_batch_removes_job_and_working_data_but_keeps_results(cluster_env: ClusterEnv):
    env = cluster_env
    env.configure(VBATCH_SHARD_TARGET_REQUESTS=5, worker_env={"VBATCH_ECHO_DELAY_PER_TOKEN": "0.05",
                                                              "VBATCH_PART_MAX_RESULTS": "1"})
    finished_file = upload(env, requests(3, "done"))
    running_file = upload(env, requests(40))
    with env.operator(), env.job_runner(capacity=2) as runner:
        done_id = apply_batch(env, finished_file)
        done = env.wait_settled(done_id)
        running_id = apply_batch(env, running_file)
        wait_for(lambda: env.batch(running_id).get("status") or {},
                 lambda s: s.get("requestCounts", {}).get("completed", 0) > 0)
        assert env.working_objects(PROJECT, running_id)
        assert env.cluster.list("batch/v1", "Job")
        for batch_id in (done_id, running_id):
            env.cluster.delete(BATCH_API, "Batch", batch_object_name(batch_id))
        wait_for(lambda: env.cluster.list(BATCH_API, "Batch"), lambda items: items == [], 30)
        runner.wait_idle()
    assert env.cluster.list("batch/v1", "Job") == [] and env.cluster.list("v1", "Pod") == []
    assert env.working_objects(PROJECT, running_id) == [] and env.working_objects(PROJECT, done_id) == []
    output = done["status"]["outputFileId"]
    assert output == result_file_id(done_id, "output")
    assert len(result_lines(env, output)) == 3  # result files are the user's: they stay


def test_vbatch_operator_command(cluster_env: ClusterEnv):
    """`vbatch operator` as the chart runs it: kopf with a liveness endpoint."""
    import os
    import socket
    import subprocess
    import sys

    import httpx

    env = cluster_env
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    file_id = upload(env, b"not json\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vbatch.cli", "operator", "--standalone", "--namespace", env.cluster.namespace,
         "--liveness", f"http://127.0.0.1:{port}/healthz"],
        env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, bool, 30)
        batch_id = apply_batch(env, file_id)
        obj = env.wait_settled(batch_id, timeout=30)
        assert obj["status"]["phase"] == "failed" and obj["status"]["errors"][0]["line"] == 1
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def _gateway_batch(env: ClusterEnv, file_id: str, n: int):
    from vbatch.operator.cr_store import KubeBatchStore
    from vbatch.core import lifecycle, state

    record = state.new_batch(project=PROJECT, input_file_id=file_id, endpoint="/v1/chat/completions",
                             completion_window="24h", metadata=None, total=n, model="test-model",
                             window_seconds=3600, now=int(time.time()))
    lifecycle.keep_input(env.files, record)  # as the gateway does: the batch's copy, then the Batch
    KubeBatchStore.from_settings(env.settings).create(record)
    return record


def test_cancelled_before_launch_with_its_input_deleted_ends_cancelled(cluster_env: ClusterEnv):
    env = cluster_env
    file_id = upload(env, requests(4))
    record = _gateway_batch(env, file_id, 4)
    env.files.delete(PROJECT, file_id)
    env.cluster.patch(BATCH_API, "Batch", batch_object_name(record.id), {"spec": {"cancelRequested": True}})
    with env.operator():
        obj = env.wait_settled(record.id)
    status = obj["status"]
    assert status["phase"] == "cancelled"
    assert status["requestCounts"] == {"total": 4, "completed": 0, "failed": 4}
    lines = result_lines(env, status["errorFileId"])  # every request named, from the batch's copy
    assert sorted(line["custom_id"] for line in lines) == [f"r-{i}" for i in range(4)]
    assert {line["error"]["code"] for line in lines} == {"batch_cancelled"}
    assert "errors" not in status and "outputFileId" not in status
    assert env.cluster.list("batch/v1", "Job") == [] and env.working_objects(PROJECT, record.id) == []


def test_a_step_that_keeps_failing_ends_the_batch_and_says_why(cluster_env: ClusterEnv):
    from vbatch.core.storage.local import LocalObjectStore

    env = cluster_env
    env.configure(VBATCH_STEP_RETRY_BASE_SECONDS=0.1, VBATCH_STEP_PERMANENT_ATTEMPTS=3)
    file_id = upload(env, requests(3))
    record = _gateway_batch(env, file_id, 3)
    # The batch's copy of its input turns unreadable after validation: planning shards cannot parse it.
    LocalObjectStore(env.settings.storage_dir).put_bytes(input_key(PROJECT, record.id), b"{not json\n")
    with env.operator():
        obj = env.wait_settled(record.id)
    status = obj["status"]
    assert status["phase"] == "failed"
    assert status["errors"][0]["code"] == "unreadable_data" and "launch" in status["errors"][0]["message"]
    assert status["stepFailure"]["attempts"] == 3 and status["stepFailure"]["kind"] == "permanent"
    condition = {c["type"]: c for c in status["conditions"]}["StepFailed"]
    assert condition["status"] == "True" and "3 time(s)" in condition["message"]
    events = [e for e in env.cluster.list("v1", "Event") if e["involvedObject"]["name"] == obj["metadata"]["name"]]
    failed_steps = [e for e in events if e["reason"] == "StepFailed"]
    assert len(failed_steps) == 3 and all(e["type"] == "Warning" for e in failed_steps)
    first = next(e["message"] for e in failed_steps if "attempt 1," in e["message"])
    assert "unreadable_data" in first and "retrying in" in first
    assert any(e["reason"] == "Failed" and e["type"] == "Warning" for e in events)
    assert env.cluster.list("batch/v1", "Job") == []
