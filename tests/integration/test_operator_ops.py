"""Cluster mode: the operator exports the metrics of the work on its own /metrics, with
worker figures (GPU-seconds, first result) read from the progress records the worker
pods leave in object storage, and sends the webhooks (outbox in object storage)."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import openai
import pytest
from api_server import chat_line, jsonl
from kube.harness import BATCH_API, ClusterEnv
from prometheus_client.parser import text_string_to_metric_families
from s3server import free_port
from vbatch.core.ids import batch_object_name, new_batch_id
from vbatch.core.schemas import FilePurpose
from vbatch.core.webhooks import EndpointStore
from webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.cluster


def _apply(env: ClusterEnv, project: str, n: int, **spec) -> str:
    file_id = env.files.create(project, iter([jsonl([chat_line(f"r{i}", "w " * (i + 1)) for i in range(n)])]),
                               filename="in.jsonl", purpose=FilePurpose.BATCH).id
    batch_id = new_batch_id()
    env.cluster.create({"apiVersion": BATCH_API, "kind": "Batch", "metadata": {"name": batch_object_name(batch_id)},
                        "spec": {"inputFileId": file_id, "endpoint": "/v1/chat/completions", "completionWindow": "24h",
                                 "project": project, **spec}})
    return batch_id


def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_operator_metrics_and_webhooks_of_applied_batches(cluster_env: ClusterEnv, tmp_path):
    env = cluster_env
    project = f"ops-{uuid.uuid4().hex[:8]}"
    port = free_port()
    receiver = WebhookReceiver(free_port()).start()
    endpoints_file = tmp_path / "webhooks.json"
    endpoint = EndpointStore(endpoints_file).add(project, receiver.url, allow_private=True)
    env.configure(VBATCH_SHARD_TARGET_REQUESTS=3, VBATCH_OPERATOR_METRICS_PORT=port,
                  VBATCH_WEBHOOK_ENDPOINTS_FILE=endpoints_file, VBATCH_WEBHOOK_ALLOW_PRIVATE="true",
                  VBATCH_WEBHOOK_POLL_SECONDS="0.2")
    try:
        with env.operator(), env.job_runner():
            ids = [_apply(env, project, 5), _apply(env, project, 2, outputExpiresAfterSeconds=7200)]
            statuses = [env.wait_settled(b)["status"] for b in ids]
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            deadline = time.monotonic() + 30
            while len(receiver.received) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        receiver.stop()
    assert [s["phase"] for s in statuses] == ["completed", "completed"]
    default, chosen = (env.files.get(project, s["outputFileId"]) for s in statuses)
    assert default.expires_at == default.created_at + 30 * 86400  # the operator's result files expire too
    assert chosen.expires_at == chosen.created_at + 7200  # output_expires_after, carried by the Batch spec
    completed = sum(s["requestCounts"]["completed"] for s in statuses)
    assert completed == 7
    assert _metric(text, "vbatch_batch_requests_total", project=project, outcome="completed") == completed
    assert _metric(text, "vbatch_batch_requests_total", project=project, outcome="failed") == 0
    for kind, field in (("input", "inputTokens"), ("output", "outputTokens")):
        expected = sum(s["usage"][field] for s in statuses)
        assert expected > 0 and _metric(text, "vbatch_batch_tokens_total", project=project, kind=kind) == expected
    assert _metric(text, "vbatch_batches", status="completed") == 2  # listed from the Batch resources
    assert _metric(text, "vbatch_gpu_seconds_total", project=project) > 0  # from the pods' progress records
    assert _metric(text, "vbatch_batch_queue_seconds_count") >= 2
    assert _metric(text, "vbatch_batch_duration_seconds_count", status="completed") >= 2

    client = openai.OpenAI(api_key="unused")
    got = {client.webhooks.unwrap(body, headers, secret=endpoint.secret).data.id for headers, body in receiver.received}
    assert got == set(ids)
    assert all(json.loads(body)["type"] == "batch.completed" for _, body in receiver.received)
