"""A real gateway on 127.0.0.1 for API tests: uvicorn in a thread of this process.

Reuse it from any test module:

    from api_server import ApiServer, Tenant, api_server, tenant  # noqa: F401 (fixtures)

    def test_something(api_server: ApiServer, tenant: Tenant):
        r = httpx.get(f"{api_server.url}/v1/batches", headers=tenant.headers)

- `api_server` (session): one server over temporary local storage, SQLite store and
  key file; the runner is a `RecordingRunner` (it only records calls, so batches
  stay `in_progress` and can be cancelled). Served models: any (`None`).
- `tenant` (function): a fresh project with its own key on that server, so every
  test starts with no files and no batches and tests cannot see each other.
- `start_api_server(tmp_path, limits=..., runner=..., served_models=...)`: a
  context manager for a server with other settings (small limits, the real
  executor, ...). It binds port 0, so servers never collide.

Running in-process (not a subprocess) lets tests reach the stores directly
(e.g. to force a batch terminal) and measure the server's memory with tracemalloc.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn
from vbatch.api.app import create_app
from vbatch.api.http_protocol import server_config
from vbatch.api.services import BatchRunner, Services
from vbatch.core.config import Limits, Settings
from vbatch.core.files import FileService
from vbatch.core.keys import KeyStore
from vbatch.core.schemas import BatchRecord
from vbatch.core.sqlite_store import SqliteBatchStore
from vbatch.core.storage.local import LocalObjectStore


@dataclass
class RecordingRunner:
    """A BatchRunner double: remembers what the gateway told it, runs nothing."""

    submitted_ids: list[str] = field(default_factory=list)
    cancelled_ids: list[str] = field(default_factory=list)

    def submitted(self, record: BatchRecord) -> None:
        self.submitted_ids.append(record.id)

    def cancel_requested(self, record: BatchRecord) -> None:
        self.cancelled_ids.append(record.id)


@dataclass
class Tenant:
    project: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"x-api-key": self.key, "x-project-id": self.project}


@dataclass
class ApiServer:
    url: str
    services: Services
    runner: BatchRunner

    def new_tenant(self) -> Tenant:
        project = f"proj-{uuid.uuid4().hex[:12]}"
        return Tenant(project=project, key=self.services.keys.create(project))

    def client(self, tenant: Tenant | None = None, **kwargs) -> httpx.Client:
        headers = tenant.headers if tenant else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)


def make_services(
    data_dir: Path,
    *,
    limits: Limits | None = None,
    runner: BatchRunner | None = None,
    served_models: Collection[str] | None = None,
    **overrides: object,
) -> Services:
    """`overrides`: any other Settings fields (e.g. body_idle_timeout_seconds=1)."""
    settings = Settings(data_dir=data_dir, limits=limits or Limits(), **overrides)
    store = LocalObjectStore(settings.storage_dir)
    return Services(
        settings=settings,
        files=FileService(store, upload_retention_seconds=settings.limits.upload_retention_seconds),
        batches=SqliteBatchStore(data_dir / "batches.sqlite"),
        keys=KeyStore(data_dir / "keys"),
        runner=runner if runner is not None else RecordingRunner(),
        served_models=served_models,
    )


@contextmanager
def serve(services: Services) -> Iterator[str]:
    """Run create_app(services) under uvicorn in a daemon thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = server_config(create_app(services), services.settings, log_level="warning", access_log=False,
                           lifespan="off")
    server = uvicorn.Server(config)  # signal handlers are main-thread only: skipped here
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            if server.started:
                break
            if not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            threading.Event().wait(0.025)
        else:
            raise RuntimeError("uvicorn did not start within 5 s")
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextmanager
def start_api_server(
    data_dir: Path,
    *,
    limits: Limits | None = None,
    runner: BatchRunner | None = None,
    served_models: Collection[str] | None = None,
    **overrides: object,
) -> Iterator[ApiServer]:
    services = make_services(data_dir, limits=limits, runner=runner, served_models=served_models, **overrides)
    with serve(services) as url:
        yield ApiServer(url=url, services=services, runner=services.runner)


@pytest.fixture(scope="session")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with start_api_server(tmp_path_factory.mktemp("api")) as server:
        yield server


@pytest.fixture
def tenant(api_server: ApiServer) -> Tenant:
    return api_server.new_tenant()


# --- input files ------------------------------------------------------------------


def chat_line(custom_id: str, content: str = "Hello?", model: str = "test-model", **extra) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": content}]},
    } | extra


def jsonl(lines: list[dict]) -> bytes:
    import json

    return "".join(json.dumps(line) + "\n" for line in lines).encode()


QUICKSTART_JSONL = jsonl(
    [
        chat_line("q-1", "What is the capital of France?"),
        chat_line("q-2", "What is the capital of Germany?"),
        chat_line("q-3", "What is the capital of Italy?"),
    ]
)
