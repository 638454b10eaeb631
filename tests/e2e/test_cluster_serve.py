"""`vbatch serve` itself in cluster mode (what the chart's gateway Deployment runs):
Batch custom resources as the store, the model catalog as the list of served
models, and no inference engine in the gateway process."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from kube.harness import BATCH_API, ClusterEnv
from openai import OpenAI
from vbatch.core.ids import batch_object_name

pytestmark = pytest.mark.cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cluster_gateway_serves_the_catalog_and_writes_batch_resources(cluster_env: ClusterEnv, tmp_path):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("models:\n  - id: llama-8b\n    path: s3://models/llama-8b\n    gpus_per_replica: 1\n")
    cluster_env.configure(VBATCH_MODEL_CATALOG=str(catalog), VBATCH_ENGINE="auto")
    keys = tmp_path / "keys"
    key = subprocess.run([sys.executable, "-m", "vbatch.cli", "keys", "create", "--project", "ml"],
                         env={**os.environ, "VBATCH_API_KEYS_FILE": str(keys)}, capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    port = _free_port()
    env = {**os.environ, "VBATCH_API_KEYS_FILE": str(keys)}
    server = subprocess.Popen([sys.executable, "-m", "vbatch.cli", "serve", "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline
            time.sleep(0.2)
        client = OpenAI(base_url=f"{url}/v1", api_key=key, default_headers={"x-project-id": "ml"}, max_retries=0)

        def upload(model: str):
            line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": model, "messages": [{"role": "user", "content": "hi"}]}}
            return client.files.create(file=("in.jsonl", io.BytesIO(json.dumps(line).encode())), purpose="batch")

        with pytest.raises(openai.BadRequestError) as err:
            client.batches.create(input_file_id=upload("gpt-4o").id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
        assert err.value.body["code"] == "model_not_found" and "llama-8b" in err.value.body["message"]

        batch = client.batches.create(input_file_id=upload("llama-8b").id, endpoint="/v1/chat/completions",
                                      completion_window="24h", metadata={"team": "search"})
        resource = cluster_env.cluster.get(BATCH_API, "Batch", batch_object_name(batch.id))
        assert resource["spec"]["project"] == "ml" and resource["spec"]["inputFileId"] == batch.input_file_id
        assert resource["status"]["phase"] == "in_progress"
        assert resource["status"]["requestCounts"]["total"] == 1
        assert client.batches.retrieve(batch.id).metadata == {"team": "search"}
        assert client.batches.cancel(batch.id).status == "cancelling"
        assert cluster_env.cluster.get(BATCH_API, "Batch", batch_object_name(batch.id))["spec"]["cancelRequested"] is True
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
