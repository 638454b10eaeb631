"""Shared fixtures, and the layers: a test's folder is its marker.

tests/unit         pure core logic, no servers or processes (`make test-unit`, seconds)
tests/integration  one component over real I/O: storage, HTTP, the emulated cluster
tests/e2e          whole flows through `vbatch serve`/the operator, the real engine
tests/robustness   faults, abuse, load
tests/support      the helpers they share (S3 server, gateway process, Kubernetes emulator)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
LAYERS = ("unit", "integration", "e2e", "robustness")
sys.path.insert(0, str(TESTS / "support"))  # helpers import as top-level modules

from s3server import NanioServer, S3Info, make_s3_store  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).resolve().relative_to(TESTS).parts
        if parts and parts[0] in LAYERS:
            item.add_marker(parts[0])

# --- object storage (core I/O) ------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """One nanio S3 server for the session. Tests may stop()/restart() it; the
    data dir and port survive, and `s3_store` starts it again if it is down."""
    server = NanioServer(tmp_path_factory.mktemp("nanio") / "data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_info(s3_server: NanioServer) -> S3Info:
    s3_server.start()  # no-op when running; revives it after a fault test
    return s3_server.info


@pytest.fixture
def s3_store(s3_info: S3Info):
    """An S3ObjectStore on a fresh bucket of the session's nanio server."""
    return make_s3_store(s3_info)


@pytest.fixture
def local_store(tmp_path: Path):
    from vbatch.core.storage.local import LocalObjectStore

    return LocalObjectStore(tmp_path / "store")


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def object_store(request: pytest.FixtureRequest):
    """Each test using this runs against both stores."""
    return request.getfixturevalue(f"{request.param}_store")


# --- the real model ---------------------------------------------------------------


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """SmolLM2-135M-Instruct converted for vLLM once, cached across runs
    (VBATCH_TEST_MODEL_DIR, default ~/.cache/vbatch-test-models)."""
    import os

    from vbatch.worker.models import prepare_demo_model

    cache = Path(os.environ.get("VBATCH_TEST_MODEL_DIR", Path.home() / ".cache" / "vbatch-test-models"))
    return prepare_demo_model(cache)


# --- Kubernetes API emulator (tests/support/kube) ---------------------------------------
from api_server import api_server, tenant  # noqa: E402,F401  (fixture registration)
from kube.fixtures import KubeCluster, kube_cluster  # noqa: E402,F401  (fixture registration)
from kube.harness import cluster_env  # noqa: E402,F401  (fixture registration)
