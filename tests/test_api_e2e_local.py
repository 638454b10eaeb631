"""The whole quickstart through the SDK with the real single-node executor (echo engine):
upload, create, poll until completed, download the results."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from api_server import QUICKSTART_JSONL, make_services, serve
from openai import OpenAI

local_executor = pytest.importorskip("vbatch.operator.local_executor")


@pytest.fixture
def sdk(tmp_path: Path):
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
            key = services.keys.create(project)
            yield OpenAI(base_url=f"{url}/v1", api_key=key, default_headers={"x-project-id": project}, max_retries=0)
    finally:
        executor.stop()


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
