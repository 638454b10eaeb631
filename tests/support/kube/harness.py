"""The cluster-mode stack on one machine: emulator + kopf operator + job runner.

- `ClusterEnv` points everything at one temp dir: VBATCH_* for the operator (read at
  its startup), the worker pods (their env from VBATCH_WORKER_ENV, as the chart does)
  and the test's own FileService (the gateway's view of storage).
- `operator()` runs the real handlers module under kopf's `KopfRunner`, with its own
  kopf registry: other tests (the emulator's probe operator) register handlers in
  kopf's default registry, and two operators must not share handlers.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import kopf
import kopf.testing
import pytest
from vbatch.core.config import Settings
from vbatch.core.files import FileService
from vbatch.core.ids import batch_object_name
from vbatch.core.storage.local import LocalObjectStore

from .fixtures import KubeCluster
from .job_runner import FailHook, JobRunner

BATCH_API = "vbatch.dev/v1alpha1"
T = TypeVar("T")


@dataclass
class ClusterEnv:
    cluster: KubeCluster
    tmp: Path
    monkeypatch: pytest.MonkeyPatch

    def identities(self) -> Path:
        """The chart's ServiceAccounts and RBAC, installed in the cluster, and a kubeconfig
        with a context per component holding its ServiceAccount's token: the gateway
        (`vbatch-gateway`) and the operator (`vbatch-operator`, current, so kopf logs in
        with it too) get exactly the permissions a real install gives them."""
        path = self.tmp / "components.kubeconfig"
        if not path.exists():
            accounts = self.cluster.install_chart_identities()
            tokens = {f"vbatch-{c}": self.cluster.service_account_token(accounts[c]) for c in ("operator", "gateway")}
            self.cluster.write_kubeconfig(path, tokens, current="vbatch-operator")
        return path

    def configure(self, *, interval: float = 0.3, window_seconds: int | None = None, **env: Any) -> None:
        data = self.tmp / "data"
        storage_env = {"VBATCH_DATA_DIR": str(data), "VBATCH_STORAGE": "local", "VBATCH_ENGINE": "echo"}
        values: dict[str, Any] = {
            "KUBECONFIG": str(self.identities()),
            **storage_env,
            "VBATCH_BATCH_STORE": "kubernetes",
            "VBATCH_NAMESPACE": self.cluster.namespace,
            "VBATCH_OPERATOR_INTERVAL": str(interval),
            "VBATCH_OPERATOR_WATCH_TIMEOUT": "10",
            "VBATCH_WORKER_IMAGE": "vbatch:test",
            "VBATCH_WORKER_GPUS": "0",
            "VBATCH_WORKER_ENV": json.dumps(storage_env | {k: str(v) for k, v in env.pop("worker_env", {}).items()}),
            "VBATCH_PART_MAX_SECONDS": "0.2",
            # In-process operators must not race for one metrics port (a test sets its own).
            "VBATCH_OPERATOR_METRICS_PORT": "0",
            # The suites written for one Indexed Job per batch pin that runtime; pool
            # tests pass VBATCH_CLUSTER_RUNTIME="pools" (the product default).
            "VBATCH_CLUSTER_RUNTIME": "jobs",
        }
        if window_seconds is not None:
            values["VBATCH_LIMITS"] = json.dumps({"completion_windows": {"24h": window_seconds}})
        values.update({k: str(v) for k, v in env.items()})
        for key, value in values.items():
            self.monkeypatch.setenv(key, value)

    @property
    def settings(self) -> Settings:
        return Settings()

    @property
    def files(self) -> FileService:
        settings = self.settings
        return FileService(LocalObjectStore(settings.storage_dir),
                           upload_retention_seconds=settings.limits.upload_retention_seconds)

    def working_objects(self, project: str, batch_id: str) -> list[str]:
        store = LocalObjectStore(self.settings.storage_dir)
        return list(store.list(f"projects/{project}/batches/{batch_id}/"))

    @contextlib.contextmanager
    def operator(self, *, peering: str | None = None, priority: int = 0) -> Iterator[kopf.testing.KopfRunner]:
        previous = kopf.get_default_registry()
        registry = kopf.OperatorRegistry()
        kopf.set_default_registry(registry)
        try:
            # (Re-)executing the module registers its handlers in this registry, with the
            # tick interval this test configured.
            name = "vbatch.operator.handlers"
            importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
            mode = ["--peering", peering, "--priority", str(priority)] if peering else ["--standalone"]
            args = ["run", *mode, "--namespace", self.cluster.namespace, "--verbose"]
            with kopf.testing.KopfRunner(args, registry=registry, timeout=60) as runner:
                yield runner
        finally:
            # kopf's `run` makes the registry it was given the process-wide default.
            kopf.set_default_registry(previous)
        assert runner.exception is None, runner.output[-4000:]

    def job_runner(self, *, fail: FailHook | None = None, capacity: int = 8, backoff_base: float = 0.2) -> JobRunner:
        # The Job controller waits 10 s before an index's first retry (doubling after);
        # the same schedule, scaled down, keeps retry tests quick.
        return JobRunner(self.cluster, self.tmp / "pods", fail=fail, capacity=capacity, backoff_base=backoff_base)

    # --- reading the cluster --------------------------------------------------------

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self.cluster.get(BATCH_API, "Batch", batch_object_name(batch_id))

    def phase(self, batch_id: str) -> str | None:
        return (self.batch(batch_id).get("status") or {}).get("phase")

    def wait_phase(self, batch_id: str, phases: set[str], timeout: float = 60) -> dict[str, Any]:
        return wait_for(lambda: self.batch(batch_id), lambda o: (o.get("status") or {}).get("phase") in phases,
                        timeout)

    def wait_settled(self, batch_id: str, timeout: float = 60) -> dict[str, Any]:
        """Until the batch is terminal and cleaned up (Job and working data gone)."""
        terminal = {"completed", "failed", "cancelled", "expired"}
        return wait_for(lambda: self.batch(batch_id), lambda o: (o.get("status") or {}).get("phase") in terminal
                        and "jobName" not in o["status"], timeout)

    def jobs_ever(self, name: str) -> int:
        """How many distinct Jobs ever existed under this name (by uid)."""
        try:
            versions = self.cluster.history("batch/v1", "Job", name)
        except KeyError:
            return 0
        return len({v["metadata"]["uid"] for v in versions if v is not None})


def wait_for(read: Callable[[], T], done: Callable[[T], bool], timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout}s; last value: {value!r}")
        time.sleep(0.1)


@pytest.fixture()
def cluster_env(kube_cluster: KubeCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ClusterEnv:
    env = ClusterEnv(kube_cluster, tmp_path, monkeypatch)
    env.configure()
    return env
