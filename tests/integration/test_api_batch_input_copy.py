"""Through the real gateway: a created batch owns a copy of its requests, so deleting
its input file neither stops it nor loses a line from its result files."""

from __future__ import annotations

import time

import orjson
from api_server import chat_line, jsonl, start_api_server
from vbatch.core.errors import StorageError
from vbatch.operator.local_executor import LocalExecutor


def _upload_and_create(c, n: int) -> tuple[str, dict]:
    data = jsonl([chat_line(f"q{i}") for i in range(n)])
    f = c.post("/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"}).json()
    r = c.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                                    "completion_window": "24h"})
    return f["id"], r


def _wait(c, batch_id: str, statuses: set[str], timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        batch = c.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in statuses:
            return batch
        time.sleep(0.1)
    raise AssertionError(f"batch stuck in {batch['status']}")


def _executor(services) -> LocalExecutor:
    settings = services.settings.model_copy(update={"engine": "echo"})
    ex = LocalExecutor(settings=settings, store=services.files.store, files=services.files, batches=services.batches,
                       served_models=None, engine="echo", poll_seconds=0.1, retry_backoff=0.2)
    ex.start()
    return ex


def test_cancelled_before_launch_after_its_input_was_deleted_lists_every_request(tmp_path):
    with start_api_server(tmp_path) as server:  # its runner runs nothing: no launch yet
        tenant = server.new_tenant()
        with server.client(tenant) as c:
            file_id, created = _upload_and_create(c, 6)
            batch_id = created.json()["id"]
            assert c.delete(f"/v1/files/{file_id}").json()["deleted"] is True
            assert c.post(f"/v1/batches/{batch_id}/cancel").json()["status"] == "cancelling"
            ex = _executor(server.services)
            try:
                done = _wait(c, batch_id, {"cancelled", "failed"})
            finally:
                ex.stop()
            assert done["status"] == "cancelled" and done["errors"] is None
            assert done["request_counts"] == {"total": 6, "completed": 0, "failed": 6}
            lines = [orjson.loads(x) for x in c.get(f"/v1/files/{done['error_file_id']}/content").content.splitlines()]
            assert sorted(x["custom_id"] for x in lines) == sorted(f"q{i}" for i in range(6))
            assert {x["error"]["code"] for x in lines} == {"batch_cancelled"}


def test_a_batch_runs_after_its_input_was_deleted(tmp_path):
    with start_api_server(tmp_path) as server:
        tenant = server.new_tenant()
        with server.client(tenant) as c:
            file_id, created = _upload_and_create(c, 4)
            batch_id = created.json()["id"]
            c.delete(f"/v1/files/{file_id}")
            ex = _executor(server.services)
            try:
                done = _wait(c, batch_id, {"completed", "failed"})
            finally:
                ex.stop()
            assert done["status"] == "completed" and done["request_counts"]["completed"] == 4
            lines = c.get(f"/v1/files/{done['output_file_id']}/content").content.splitlines()
            assert sorted(orjson.loads(x)["custom_id"] for x in lines) == sorted(f"q{i}" for i in range(4))


def test_a_create_that_fails_leaves_no_copy_behind(tmp_path):
    with start_api_server(tmp_path) as server:
        tenant = server.new_tenant()

        def unavailable(record):
            raise StorageError("the batch store is away")

        server.services.batches.create = unavailable
        with server.client(tenant) as c:
            _, created = _upload_and_create(c, 3)
            assert created.status_code == 503
            assert c.get("/v1/batches").json()["data"] == []
        assert list(server.services.files.store.list(f"projects/{tenant.project}/batches/")) == []
