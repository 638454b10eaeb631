"""The real engine end to end: `vbatch serve --engine vllm` on loopback, the
official openai SDK, SmolLM2-135M-Instruct on vLLM's CPU build.

Run alone with `pytest -m vllm tests/e2e/test_vllm_e2e.py`; it runs in CI."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

pytestmark = pytest.mark.vllm
MODEL = "smollm2-135m-instruct"
QUESTIONS = {
    "q-1": "What is the capital of France?",
    "q-2": "What is the capital of Germany?",
    "q-3": "What is the capital of Italy?",
    "q-4": "Name a primary color.",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, demo_model_dir: Path):
    data = tmp_path_factory.mktemp("vllm-node")
    catalog = data / "catalog.yaml"
    catalog.write_text(f"models:\n  - id: {MODEL}\n    path: {demo_model_dir}\n")
    env = {**os.environ, "VBATCH_MODEL_CATALOG": str(catalog), "HF_HUB_OFFLINE": "1",
           "VBATCH_PART_MAX_SECONDS": "0.5"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    key = subprocess.run([sys.executable, "-m", "vbatch.cli", "keys", "create", "--project", "team", "--data-dir", str(data)],
                         capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
    port = _free_port()
    log = (data / "serve.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "vbatch.cli", "serve", "--data-dir", str(data), "--port", str(port), "--engine", "vllm"],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        assert server.poll() is None, (data / "serve.log").read_text()[-3000:]
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "gateway not ready"
        time.sleep(0.3)
    yield OpenAI(base_url=f"{url}/v1", api_key=key, default_headers={"x-project-id": "team"}), data
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


def _jsonl(lines) -> io.BytesIO:
    return io.BytesIO("".join(json.dumps(line) + "\n" for line in lines).encode())


def test_a_real_batch_completes_with_real_answers_and_exact_accounting(gateway):
    client, data = gateway
    lines = [
        {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": MODEL, "messages": [{"role": "user", "content": q}], "max_tokens": 24, "temperature": 0}}
        for cid, q in QUESTIONS.items()
    ]
    # vLLM rejects this one (max_tokens beyond the 2048-token context): an error line, not a crashed shard.
    lines.append({"custom_id": "too-long", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000}})
    uploaded = client.files.create(file=("input.jsonl", _jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "in_progress" and batch.request_counts.total == 5
    deadline = time.time() + 600
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.time() < deadline, f"stuck: {batch.status} {batch.request_counts}; {(data / 'serve.log').read_text()[-2000:]}"
        time.sleep(1)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (5, 4, 1)

    output = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    errors = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in output) == sorted(QUESTIONS)
    answers = {o["custom_id"]: o["response"]["body"]["choices"][0]["message"]["content"] for o in output}
    assert "Paris" in answers["q-1"] and "Berlin" in answers["q-2"] and "Rome" in answers["q-3"]
    assert answers["q-4"].strip()
    for o in output:
        body = o["response"]["body"]
        assert o["id"].startswith("batch_req_") and o["error"] is None and o["response"]["status_code"] == 200
        assert body["object"] == "chat.completion" and body["model"] == MODEL
        assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] > 0
    assert batch.usage.input_tokens == sum(o["response"]["body"]["usage"]["prompt_tokens"] for o in output)
    assert batch.usage.output_tokens == sum(o["response"]["body"]["usage"]["completion_tokens"] for o in output)
    assert batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens

    [rejected] = errors
    assert rejected["custom_id"] == "too-long"
    assert rejected["response"]["status_code"] == 400
    assert "error" in rejected["response"]["body"]
    assert client.files.retrieve(batch.error_file_id).purpose == "batch_output"


def test_models_outside_the_catalog_are_refused_at_create(gateway):
    client, _ = gateway
    line = {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}}
    uploaded = client.files.create(file=("bad.jsonl", _jsonl([line])), purpose="batch")
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert err.value.body["code"] == "model_not_found" and err.value.body["line"] == 1
    assert MODEL in err.value.body["message"]
