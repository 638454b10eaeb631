"""`make run`: the seed quickstart, for real, on the single-node default.

Prepares the bundled SmolLM2-135M-Instruct model (once), starts `vbatch serve`
with vLLM, creates an API key, runs the quickstart's three questions through the
official `openai` SDK with live progress, prints each answer, stops the server.
"""

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
from openai import OpenAI
from rich.console import Console

MODEL = "smollm2-135m-instruct"
QUESTIONS = {"q-1": "What is the capital of France?", "q-2": "What is the capital of Germany?", "q-3": "What is the capital of Italy?"}
DATA_DIR = Path(os.environ.get("VBATCH_DATA_DIR", "vbatch-data")).resolve()
console = Console()


def vbatch(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "vbatch.cli", *args], check=True, capture_output=True, text=True).stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"vbatch serve exited with {server.returncode}; see {DATA_DIR / 'serve.log'}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the gateway did not become ready")


def main() -> int:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    with console.status("Preparing the bundled SmolLM2-135M-Instruct model (once, ~1 min)..."):
        vbatch("models", "prepare", "--data-dir", str(DATA_DIR))
    api_key = vbatch("keys", "create", "--project", "demo", "--data-dir", str(DATA_DIR)).strip().splitlines()[-1]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (DATA_DIR / "serve.log").open("ab")
    server = subprocess.Popen(
        [sys.executable, "-m", "vbatch.cli", "serve", "--data-dir", str(DATA_DIR), "--port", str(port), "--engine", "vllm"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        with console.status(f"Starting the gateway on {url}..."):
            wait_ready(url, server)
        client = OpenAI(base_url=f"{url}/v1", api_key=api_key, default_headers={"x-project-id": "demo"})
        lines = [
            {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": MODEL, "messages": [{"role": "user", "content": q}], "max_tokens": 48, "temperature": 0}}
            for cid, q in QUESTIONS.items()
        ]
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        uploaded = client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
        console.print(f"batch [bold]{batch.id}[/] created: {batch.status}")
        started = time.time()
        with console.status("") as status:
            while batch.status not in ("completed", "failed", "expired", "cancelled"):
                c = batch.request_counts
                status.update(f"{batch.status}: {c.completed}/{c.total} completed, {c.failed} failed ({time.time() - started:.0f}s; the engine loads first)")
                time.sleep(1)
                batch = client.batches.retrieve(batch.id)
        c = batch.request_counts
        console.print(f"batch {batch.status}: {c.completed}/{c.total} completed, {c.failed} failed, "
                      f"{batch.usage.total_tokens if batch.usage else 0} tokens, {time.time() - started:.0f}s")
        answers = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                for line in client.files.content(file_id).text.splitlines():
                    item = json.loads(line)
                    if item["response"] and item["response"]["status_code"] == 200:
                        answers[item["custom_id"]] = item["response"]["body"]["choices"][0]["message"]["content"]
                    else:
                        answers[item["custom_id"]] = f"[error] {item['error'] or item['response']['body']}"
        for cid in QUESTIONS:
            console.print(f"[bold]{cid}[/] {QUESTIONS[cid]}\n    {answers.get(cid, '[missing]').strip()}")
        return 0 if batch.status == "completed" and len(answers) == len(QUESTIONS) else 1
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


if __name__ == "__main__":
    raise SystemExit(main())
