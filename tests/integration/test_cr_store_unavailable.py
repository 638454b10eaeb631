"""The gateway in cluster mode while the Kubernetes API server is away or overloaded:
every batch call (create, get, list, cancel) answers 503 with Retry-After in OpenAI's
error envelope — like the SQLite store's disk failures —, never a 500, and a cancel whose
compare-and-swap keeps losing to concurrent writers does the same."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import kubernetes
import pytest
from api_server import chat_line, jsonl, make_services, serve
from kube.harness import ClusterEnv
from vbatch.core.batch_store import StaleRecord
from vbatch.core.ids import new_batch_id
from vbatch.operator import kube as kube_module
from vbatch.operator.cr_store import KubeBatchStore

pytestmark = pytest.mark.cluster

BATCH_ID = new_batch_id()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again on leaving: connections are refused


@contextmanager
def failing_api_server(status: int | None) -> Iterator[str]:
    """An HTTP server answering every request with `status` (a Kubernetes Status body),
    or, for None, never answering within the client's read timeout."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            self.rfile.read(length)
            if status is None:
                time.sleep(2)
                return
            body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                               "message": "overloaded", "code": status}).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PATCH = _answer

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def api_client_for(url: str) -> kubernetes.client.ApiClient:
    config = kubernetes.client.Configuration()
    config.host = url
    config.retries = 0  # each failure once: the test is about the answer, not urllib3's retries
    return kubernetes.client.ApiClient(config)


@contextmanager
def gateway(tmp_path, api_url: str) -> Iterator[tuple[str, dict[str, str], str]]:
    """A gateway whose batch store talks to `api_url`; yields (url, headers, input file id)."""
    services = make_services(tmp_path / "gw")
    services.batches = KubeBatchStore(api_client_for(api_url), "default", services.files.store,
                                      request_timeout=(1.0, 0.5))
    project = "team-a"
    headers = {"x-api-key": services.keys.create(project), "x-project-id": project}
    with serve(services) as url:
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            upload = client.post("/v1/files", data={"purpose": "batch"},
                                 files={"file": ("in.jsonl", jsonl([chat_line("a")]))})
            assert upload.status_code == 200, upload.text
            yield url, headers, upload.json()["id"]


def assert_unavailable(response, call: str = "") -> None:
    assert response.status_code == 503, (call, response.text)
    assert int(response.headers["retry-after"]) > 0
    error = response.json()["error"]
    assert error["type"] == "internal_error"
    assert error["code"] in {"batch_store_unavailable", "batch_store_contended"}
    assert error["message"]


def every_batch_call(url: str, headers: dict[str, str], file_id: str):
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        yield "create", client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                         "completion_window": "24h"})
        yield "get", client.get(f"/v1/batches/{BATCH_ID}")
        yield "list", client.get("/v1/batches")
        yield "cancel", client.post(f"/v1/batches/{BATCH_ID}/cancel")


def test_api_server_refusing_connections_gives_503_on_every_batch_call(tmp_path):
    with gateway(tmp_path, f"http://127.0.0.1:{closed_port()}") as (url, headers, file_id):
        calls = dict(every_batch_call(url, headers, file_id))
        assert set(calls) == {"create", "get", "list", "cancel"}
        for call, response in calls.items():
            assert_unavailable(response, call)


@pytest.mark.parametrize("status", [500, 503, 504, 429, None], ids=["500", "503", "504", "429", "read-timeout"])
def test_api_server_failing_or_hanging_gives_503_on_every_batch_call(tmp_path, status):
    with failing_api_server(status) as api_url, gateway(tmp_path, api_url) as (url, headers, file_id):
        calls = dict(every_batch_call(url, headers, file_id))
        assert set(calls) == {"create", "get", "list", "cancel"}
        for call, response in calls.items():
            assert_unavailable(response, call)


def test_cancel_losing_every_compare_and_swap_gives_503_not_500(cluster_env: ClusterEnv, tmp_path, monkeypatch):
    env = cluster_env
    services = make_services(tmp_path / "gw")
    store = KubeBatchStore.from_settings(env.settings, services.files.store)
    services.batches = store
    project = "team-a"
    headers = {"x-api-key": services.keys.create(project), "x-project-id": project}
    with serve(services) as url, httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        file_id = client.post("/v1/files", data={"purpose": "batch"},
                              files={"file": ("in.jsonl", jsonl([chat_line("a")]))}).json()["id"]
        created = client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                   "completion_window": "24h"})
        assert created.status_code == 200, created.text
        batch_id = created.json()["id"]

        def always_stale(self, name, resource_version, status):
            raise StaleRecord(name)

        monkeypatch.setattr(kube_module.BatchResources, "patch_status", always_stale)
        response = client.post(f"/v1/batches/{batch_id}/cancel")
        assert_unavailable(response)
        assert response.json()["error"]["code"] == "batch_store_contended"
        monkeypatch.undo()
        # Nothing lost: the intent is in the spec, and a retry answers normally.
        retried = client.post(f"/v1/batches/{batch_id}/cancel")
        assert retried.status_code == 200, retried.text
        assert retried.json()["status"] == "cancelling"
        assert env.batch(batch_id)["spec"]["cancelRequested"] is True
