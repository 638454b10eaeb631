"""Cluster mode end to end on one machine: the official openai SDK -> the gateway
(uvicorn on loopback, KubeBatchStore) -> Batch CR in the Kubernetes emulator -> the
kopf operator -> one Indexed Job -> real `vbatch worker` processes (echo engine) ->
merged result files, downloaded through the SDK again.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from api_server import chat_line, jsonl, serve
from kube.harness import ClusterEnv, wait_for
from openai import OpenAI
from vbatch.operator.cr_store import KubeBatchStore
from vbatch.api.services import NoopRunner, Services
from vbatch.core.ids import batch_object_name
from vbatch.core.keys import KeyStore
from vbatch.operator.builders import job_name

pytestmark = pytest.mark.cluster

PROJECT = "proj-e2e"


@contextmanager
def gateway(env: ClusterEnv) -> Iterator[OpenAI]:
    """The gateway as the chart runs it (VBATCH_BATCH_STORE=kubernetes), and an SDK client."""
    settings = env.settings
    keys = KeyStore(env.tmp / "keys")
    services = Services(settings=settings, files=env.files, batches=KubeBatchStore.from_settings(settings),
                        keys=keys, runner=NoopRunner(), served_models=None)
    with serve(services) as url:
        yield OpenAI(base_url=f"{url}/v1", api_key=keys.create(PROJECT), max_retries=0,
                     default_headers={"x-project-id": PROJECT})


def submit(client: OpenAI, n: int, words: int = 3) -> str:
    lines = [chat_line(f"req-{i}", " ".join([f"w{i}"] * words)) for i in range(n)]
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"suite": "e2e"})
    assert batch.status == "in_progress" and batch.request_counts.total == n
    return batch.id


def wait_batch(client: OpenAI, batch_id: str, statuses: set[str], timeout: float = 90):
    return wait_for(lambda: client.batches.retrieve(batch_id), lambda b: b.status in statuses, timeout)


def download(client: OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line.strip()]


def test_sdk_to_worker_processes_and_back(cluster_env: ClusterEnv):
    env = cluster_env
    env.configure(VBATCH_SHARD_TARGET_REQUESTS=10,
                  worker_env={"VBATCH_ECHO_DELAY_PER_TOKEN": "0.2", "VBATCH_PART_MAX_RESULTS": "2"})
    started = time.monotonic()
    with env.operator(), env.job_runner(capacity=2), gateway(env) as client:
        batch_id = submit(client, 30)
        seen_counts: list[int] = []
        batch = wait_for(lambda: client.batches.retrieve(batch_id),
                         lambda b: seen_counts.append(b.request_counts.completed) or b.status == "completed", 90)
        env.wait_settled(batch_id)
        assert [b.id for b in client.batches.list()] == [batch_id]
        lines = download(client, batch.output_file_id)
    assert batch.request_counts.total == 30 and batch.request_counts.completed == 30
    assert batch.request_counts.failed == 0 and batch.error_file_id is None
    assert any(0 < c < 30 for c in seen_counts), seen_counts  # progress moved while in_progress
    assert batch.completed_at and batch.finalizing_at and batch.in_progress_at
    assert batch.usage is not None and batch.usage.total_tokens > 0
    assert sorted(line["custom_id"] for line in lines) == sorted(f"req-{i}" for i in range(30))
    for line in lines:
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200 and body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"]
    # The CR carries the same truth kubectl shows.
    status = env.batch(batch_id)["status"]
    assert status["phase"] == "completed" and status["requestCounts"]["completed"] == 30
    assert status["outputFileId"] == batch.output_file_id
    assert env.jobs_ever(job_name(batch_object_name(batch_id))) == 1
    if shutil.which("kubectl"):
        out = subprocess.run(["kubectl", "--kubeconfig", str(env.cluster.kubeconfig), "get", "batches"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        row = next(line.split() for line in out.splitlines() if line.startswith(batch_object_name(batch_id)))
        assert row[1:6] == ["completed", "test-model", "30", "30", "0"], out
    print(f"e2e: 30 requests, 3 shards, {time.monotonic() - started:.1f}s")


def test_operator_restart_mid_batch(cluster_env: ClusterEnv):
    env = cluster_env
    env.configure(VBATCH_SHARD_TARGET_REQUESTS=4,
                  worker_env={"VBATCH_ECHO_DELAY_PER_TOKEN": "0.3", "VBATCH_PART_MAX_RESULTS": "1"})
    with env.job_runner(capacity=1), gateway(env) as client:
        with env.operator():
            batch_id = submit(client, 12)
            wait_for(lambda: client.batches.retrieve(batch_id), lambda b: b.request_counts.completed > 0, 60)
        # No operator now; the Job keeps running. Then a new one takes over.
        mid = client.batches.retrieve(batch_id)
        assert mid.status == "in_progress" and mid.request_counts.completed < 12
        time.sleep(1.0)
        with env.operator():
            batch = wait_batch(client, batch_id, {"completed", "failed"})
            env.wait_settled(batch_id)
        output = download(client, batch.output_file_id)
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (12, 12, 0)
    assert sorted(line["custom_id"] for line in output) == sorted(f"req-{i}" for i in range(12))
    assert env.jobs_ever(job_name(batch_object_name(batch_id))) == 1  # adopted, never re-created


def test_cancel_through_the_sdk_keeps_partial_results(cluster_env: ClusterEnv):
    env = cluster_env
    env.configure(VBATCH_SHARD_TARGET_REQUESTS=5,
                  worker_env={"VBATCH_ECHO_DELAY_PER_TOKEN": "0.3", "VBATCH_PART_MAX_RESULTS": "1"})
    with env.operator(), env.job_runner(capacity=1) as runner, gateway(env) as client:
        batch_id = submit(client, 20)
        wait_for(lambda: client.batches.retrieve(batch_id), lambda b: b.request_counts.completed > 0, 60)
        cancelling = client.batches.cancel(batch_id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at
        batch = wait_batch(client, batch_id, {"cancelled"})
        env.wait_settled(batch_id)
        runner.wait_idle()
        assert env.cluster.list("batch/v1", "Job") == [] and env.cluster.list("v1", "Pod") == []
        ok, errors = download(client, batch.output_file_id), download(client, batch.error_file_id)
        with pytest.raises(Exception) as exc:  # terminal: 409
            client.batches.cancel(batch_id)
    assert getattr(exc.value, "status_code", None) == 409
    counts = batch.request_counts
    assert counts.total == 20 and counts.completed + counts.failed == 20 and 0 < counts.completed < 20
    assert len(ok) == counts.completed and {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert sorted(line["custom_id"] for line in ok + errors) == sorted(f"req-{i}" for i in range(20))


def test_expiry_with_a_short_window(cluster_env: ClusterEnv):
    env = cluster_env
    env.configure(window_seconds=4, VBATCH_SHARD_TARGET_REQUESTS=4,
                  worker_env={"VBATCH_ECHO_DELAY_PER_TOKEN": "0.5", "VBATCH_PART_MAX_RESULTS": "1"})
    with env.operator(), env.job_runner(capacity=1), gateway(env) as client:
        batch_id = submit(client, 16)
        batch = wait_batch(client, batch_id, {"expired", "completed"})
        env.wait_settled(batch_id)
        assert env.cluster.list("batch/v1", "Job") == []
        ok, errors = download(client, batch.output_file_id), download(client, batch.error_file_id)
    assert batch.status == "expired" and batch.expired_at >= batch.expires_at
    counts = batch.request_counts
    assert counts.total == 16 and counts.completed + counts.failed == 16 and counts.completed < 16
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert sorted(line["custom_id"] for line in ok + errors) == sorted(f"req-{i}" for i in range(16))


def test_kube_store_semantics(cluster_env: ClusterEnv):
    """The BatchStore contract over custom resources: tenancy, paging, CAS, cancel."""
    from vbatch.core import state
    from vbatch.core.batch_store import StaleRecord
    from vbatch.core.errors import Conflict
    from vbatch.core.schemas import BatchStatus

    env = cluster_env
    store = KubeBatchStore.from_settings(env.settings)
    now = int(time.time())
    ids = []
    for _ in range(5):
        record = state.new_batch(project="p1", input_file_id="file-" + "a" * 24, endpoint="/v1/chat/completions",
                                 completion_window="24h", metadata={"k": "v"}, total=3, model="m",
                                 window_seconds=60, now=now)
        store.create(record)
        assert record.revision  # the CR's resourceVersion after the status write
        ids.append(record.id)
    got = store.get("p1", ids[0])
    assert got.status == BatchStatus.IN_PROGRESS and got.request_counts.total == 3 and got.metadata == {"k": "v"}
    assert store.get("p2", ids[0]) is None and store.get("p1", "batch_nope") is None  # 404, not 403
    page, more = store.list_page("p1", after=None, limit=2)
    assert [r.id for r in page] == sorted(ids, reverse=True)[:2] and more
    rest, more = store.list_page("p1", after=page[-1].id, limit=10)
    assert [r.id for r in rest] == sorted(ids, reverse=True)[2:] and not more
    assert store.list_page("p2", after=None, limit=10) == ([], False)

    stale = store.get("p1", ids[1])
    cancelled = store.request_cancel("p1", ids[1])
    assert cancelled.status == BatchStatus.CANCELLING and cancelled.cancel_requested
    assert store.request_cancel("p1", ids[1]).status == BatchStatus.CANCELLING  # idempotent
    assert env.batch(ids[1])["spec"]["cancelRequested"] is True
    stale.request_counts.completed = 1
    with pytest.raises(StaleRecord):  # a driver holding an old read cannot overwrite the cancel
        store.save(stale)
    fresh = store.get("p1", ids[2])
    fresh.request_counts.completed = 2
    store.save(fresh)
    assert store.get("p1", ids[2]).request_counts.completed == 2
    done = state.transition(state.transition(fresh, BatchStatus.FINALIZING, now), BatchStatus.COMPLETED, now)
    store.save(done)
    with pytest.raises(Conflict):
        store.request_cancel("p1", ids[2])
    assert store.request_cancel("p2", ids[3]) is None
    assert {r.id for r in store.unfinished()} == set(ids) - {ids[2]}


def test_archived_batches_read_and_list_through_the_sdk_unchanged(cluster_env: ClusterEnv):
    """A finished batch past its retention leaves etcd; the SDK sees no difference."""
    env = cluster_env
    env.configure(VBATCH_BATCH_RETENTION_SECONDS=2, VBATCH_ARCHIVE_INTERVAL=0.3)
    with env.operator(), env.job_runner(capacity=2), gateway(env) as client:
        first = submit(client, 4)
        done = wait_batch(client, first, {"completed"})
        second = submit(client, 4)
        # The first has left etcd (the second may follow it there once it is finished
        # past its retention too: a run under load can miss the moment only it is left).
        wait_for(lambda: env.cluster.list("vbatch.dev/v1alpha1", "Batch"),
                 lambda items: batch_object_name(first) not in {o["metadata"]["name"] for o in items}, 90)
        archived = client.batches.retrieve(first)
        listed = [b.id for b in client.batches.list(limit=1)]  # auto-paging: one batch per page
        lines = download(client, archived.output_file_id)
    assert archived.model_dump() == done.model_dump()
    assert listed == [second, first]
    assert sorted(line["custom_id"] for line in lines) == [f"req-{i}" for i in range(4)]
