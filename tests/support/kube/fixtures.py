"""Run the emulator on 127.0.0.1:<free port> in a thread, with a kubeconfig pointing at it.

A thread (not the test's event loop) because the official `kubernetes` client and
`kubectl` block, and kopf's `KopfRunner` brings its own loop: the emulator must keep
serving while any of them waits. Helpers hop onto the emulator's loop, so the store
is only ever touched from one thread.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import copy
import functools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import kmock
import pytest
import yaml

from .emulator import KubeEmulator
from .store import ResourceSpec
from .tls import TLSRawTestServer, make_serving_cert

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[3]
CRDS_DIR = REPO / "crds"


class KubeCluster:
    """A running emulator: `url`, `kubeconfig`, and direct (no-HTTP) object helpers."""

    def __init__(self, kubeconfig: Path, namespace: str = "default") -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.url = ""
        self.emulator: KubeEmulator | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)
        # HTTPS like a real API server: client-go sends tokens over TLS only.
        self.tls = make_serving_cert()
        self.ca_file = kubeconfig.parent / "apiserver-ca.crt"
        self.ca_file.write_bytes(self.tls.ca_pem)

    # --- lifecycle ---------------------------------------------------------------

    def start(self) -> KubeCluster:
        self._thread.start()
        if not self._ready.wait(timeout=30) or self._failure is not None:
            raise RuntimeError("the Kubernetes emulator did not start") from self._failure
        self._write_kubeconfig()
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced by start(); a thread cannot raise into pytest
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        tls = functools.partial(TLSRawTestServer, ssl_context=self.tls.server_context(self.kubeconfig.parent))
        async with KubeEmulator() as emulator, kmock.Server(emulator, host="127.0.0.1", server_cls=tls) as server:
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def _write_kubeconfig(self) -> None:
        assert self.emulator is not None
        self.write_kubeconfig(self.kubeconfig, {"emulator": self.emulator.admin_token})

    def write_kubeconfig(self, path: Path, tokens: dict[str, str], *, current: str | None = None) -> Path:
        """A kubeconfig with one context (and user) per token; the first is current."""
        names = list(tokens)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {
                "server": self.url, "certificate-authority-data": base64.b64encode(self.tls.ca_pem).decode()}}],
            "users": [{"name": name, "user": {"token": token}} for name, token in tokens.items()],
            "contexts": [{"name": name, "context": {"cluster": "emulator", "user": name, "namespace": self.namespace}}
                         for name in names],
            "current-context": current or names[0],
        }
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return path

    # --- identities (authentication and RBAC) ------------------------------------

    @property
    def admin_headers(self) -> dict[str, str]:
        """For raw HTTP calls as the cluster admin (what the kubeconfig carries)."""
        assert self.emulator is not None
        return {"Authorization": f"Bearer {self.emulator.admin_token}"}

    def service_account_token(self, name: str, namespace: str | None = None) -> str:
        """A token for an existing ServiceAccount, as the TokenRequest API issues it."""
        assert self.emulator is not None
        return self.call(self.emulator.authenticator.issue_for_service_account, namespace or self.namespace, name)

    def install_chart_identities(self, *, values: dict[str, Any] | None = None) -> dict[str, str]:
        """Apply the chart's ServiceAccounts and RBAC (rendered by Helm for this namespace);
        returns {component: ServiceAccount name}."""
        from .chart import identity_objects

        assert self.emulator is not None
        accounts: dict[str, str] = {}
        for obj in identity_objects(self.namespace, values=values):
            if obj["kind"] == "ServiceAccount":
                accounts[obj["metadata"]["labels"]["app.kubernetes.io/component"]] = obj["metadata"]["name"]
            try:
                self.call(self.emulator.apply, obj)
            except kmock.KubernetesError as exc:
                if exc.status != 409:  # installed already (a second ClusterEnv on this cluster)
                    raise
        return accounts

    # --- helpers (run on the emulator's loop) -----------------------------------

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn` on the emulator's loop and return its result (exceptions propagate)."""
        assert self._loop is not None
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return future.result(timeout=30)

    @property
    def store(self):
        assert self.emulator is not None
        return self.emulator.store

    def spec(self, api_version: str, kind: str) -> ResourceSpec:
        for spec in list(self.store.specs.values()):
            if spec.api_version == api_version and spec.kind == kind:
                return spec
        raise KeyError(f"unknown kind {api_version} {kind}")

    def resource(self, api_version: str, kind: str) -> kmock.resource:
        return self.spec(api_version, kind).resource

    def load_crds(self, path: str | Path = CRDS_DIR / "batches.vbatch.dev.yaml") -> list[dict[str, Any]]:
        assert self.emulator is not None
        return self.call(self.emulator.load_crds, str(path))

    def create(self, obj: dict[str, Any], *, status: dict[str, Any] | None = None) -> dict[str, Any]:
        """Create as a client would (status dropped if a subresource), then set `status` if given."""
        spec = self.spec(obj["apiVersion"], obj["kind"])
        ns = (obj.get("metadata") or {}).get("namespace", self.namespace) if spec.namespaced else None
        created = self.call(self.store.create, spec.resource, ns, copy.deepcopy(obj))
        if status is not None:
            created = self.patch_status(obj["apiVersion"], obj["kind"], created["metadata"]["name"], status,
                                        namespace=ns)
        return created

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        return self.call(self.store.get, self.resource(api_version, kind), namespace or self.namespace, name)

    def list(self, api_version: str, kind: str, namespace: str | None = None,
             labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
        wanted = labels or {}

        def match(obj: dict[str, Any]) -> bool:
            have = obj["metadata"].get("labels") or {}
            return all(have.get(k) == v for k, v in wanted.items())

        return self.call(self.store.list, self.resource(api_version, kind), namespace, match)

    def patch(self, api_version: str, kind: str, name: str, patch: dict[str, Any], *,
              namespace: str | None = None, subresource: str | None = None) -> dict[str, Any]:
        from .semantics import merge_patch

        return self.call(self.store.update, self.resource(api_version, kind), namespace or self.namespace, name,
                         lambda old: merge_patch(old, patch), subresource=subresource)

    def patch_status(self, api_version: str, kind: str, name: str, status: dict[str, Any], *,
                     namespace: str | None = None) -> dict[str, Any]:
        """What a controller does: e.g. a test playing the Job controller writes Job status."""
        return self.patch(api_version, kind, name, {"status": status}, namespace=namespace, subresource="status")

    def delete(self, api_version: str, kind: str, name: str, *, namespace: str | None = None,
               propagation: str | None = None) -> dict[str, Any]:
        return self.call(self.store.delete, self.resource(api_version, kind), namespace or self.namespace, name,
                         propagation=propagation)

    def history(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> list[dict | None]:
        """Every stored version of an object (None marks a deletion), oldest first."""
        key = (self.resource(api_version, kind), namespace or self.namespace, name)
        return self.call(lambda: [None if v is None else copy.deepcopy(v.raw)
                                  for v in self.store.objects[key].history])


@pytest.fixture()
def kube_cluster(tmp_path: Path) -> Iterator[KubeCluster]:
    """An emulated cluster with the vbatch CRDs installed and a kubeconfig file for it."""
    cluster = KubeCluster(tmp_path / "kubeconfig").start()
    try:
        cluster.load_crds()
        yield cluster
    finally:
        cluster.stop()
