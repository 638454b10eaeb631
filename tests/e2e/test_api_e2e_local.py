"""The whole quickstart through the SDK with the real single-node executor (echo engine):
upload, create, poll until completed, download the results."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from api_server import QUICKSTART_JSONL, make_services, serve
from openai import OpenAI

local_executor = pytest.importorskip("vbatch.operator.local_executor")


@pytest.fixture
def node(tmp_path: Path):
    """A single-node gateway with the real executor: yields (url, key, project)."""
    services = make_services(tmp_path)
    executor = local_executor.LocalExecutor(
        settings=services.settings,
        store=services.files.store,
        files=services.files,
        batches=services.batches,
        served_models=None,
        engine="echo",
        poll_seconds=0.1,
    )
    services.runner = executor
    executor.start()
    try:
        with serve(services) as url:
            project = "e2e"
            yield url, services.keys.create(project), project
    finally:
        executor.stop()


@pytest.fixture
def sdk(node) -> OpenAI:
    url, key, project = node
    return OpenAI(base_url=f"{url}/v1", api_key=key, default_headers={"x-project-id": project}, max_retries=0)


def test_quickstart_runs_to_completion(sdk: OpenAI) -> None:
    f = sdk.files.create(file=("input.jsonl", io.BytesIO(QUICKSTART_JSONL)), purpose="batch")
    batch = sdk.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "in_progress"

    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "expired", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.2)
        batch = sdk.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == 3
    assert batch.request_counts.completed + batch.request_counts.failed == 3
    assert batch.output_file_id is not None

    out = sdk.files.retrieve(batch.output_file_id)
    assert out.purpose == "batch_output"
    lines = [json.loads(x) for x in sdk.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == ["q-1", "q-2", "q-3"]
    for line in lines:
        assert line["id"].startswith("batch_req_")
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["object"] == "chat.completion"
    outputs = {x.id for x in sdk.files.list(purpose="batch_output")}
    assert batch.output_file_id in outputs


def test_cli_submit_waits_and_writes_the_joined_results(node, tmp_path: Path) -> None:
    url, key, project = node
    source = tmp_path / "input.jsonl"
    source.write_bytes(QUICKSTART_JSONL)
    target = tmp_path / "results.jsonl"
    auth = ["--base-url", url, "--api-key", key, "--project", project]
    done = subprocess.run([sys.executable, "-m", "vbatch.cli", "submit", str(source), "--wait", "-o", str(target), *auth],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    batch_id = done.stdout.strip().splitlines()[0]
    assert batch_id.startswith("batch_")
    assert "3/3" in done.stderr  # the progress bar's final counts
    results = [json.loads(x) for x in target.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in results) == ["q-1", "q-2", "q-3"]

    shown = subprocess.run([sys.executable, "-m", "vbatch.cli", "status", batch_id, *auth], capture_output=True, text=True, check=True)
    batch = json.loads(shown.stdout)
    assert batch["id"] == batch_id and batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 3, "completed": 3, "failed": 0}


def test_cli_reports_api_errors_by_code(node, tmp_path: Path) -> None:
    url, key, project = node
    source = tmp_path / "bad.jsonl"
    source.write_text('{"custom_id": "a"}\n')
    done = subprocess.run([sys.executable, "-m", "vbatch.cli", "submit", str(source), "--base-url", url, "--api-key", key, "--project", project],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "400 missing_required_parameter" in done.stderr and "line 1" in done.stderr
