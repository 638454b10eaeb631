"""Fixtures of the image tests: the container engine, the images (built once per set of
build inputs, reused across runs), and the chart's release running as containers against
the Kubernetes emulator and the S3 test server."""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from image_build import ensure_images, image_ref
from kube.fixtures import KubeCluster
from kube.job_runner import JobRunner
from kube.kubelet import Engine, Kubelet, wait_http
from s3server import S3Info

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "vbatch"
RELEASE = "vbatch"
GATEWAY_PORT = 8000  # fixed by the chart's container args; the containers share the host network


@pytest.fixture(scope="session")
def engine() -> Engine:
    found = Engine.detect()
    if found is None:
        pytest.skip("no container engine: neither a Docker engine (docker info) nor podman is available "
                    "(.ci/run installs podman, runc and mmdebstrap from Debian's packages)")
    reason = found.can_run_containers()
    if reason:
        pytest.skip(reason)
    return found


@pytest.fixture(scope="session")
def images(engine: Engine) -> dict[str, str]:
    """The gateway image, built if missing; the CPU worker image's ref (built by `worker_cpu_image`)."""
    return {**ensure_images(engine, ("gateway",)), "worker-cpu": image_ref("worker-cpu")}


@pytest.fixture(scope="session")
def worker_cpu_image(engine: Engine, images: dict[str, str]) -> str:
    return ensure_images(engine, ("worker-cpu",))["worker-cpu"]


def _split(ref: str) -> dict[str, str]:
    repository, _, tag = ref.rpartition(":")
    return {"repository": repository, "tag": tag, "pullPolicy": "Never"}


def render(values: dict[str, Any], namespace: str) -> tuple[list[dict[str, Any]], str]:
    """`helm install`'s rendering (the real Helm library), as tests/integration/test_chart.py does."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=RELEASE, namespace=namespace, is_install=True)
    objects, notes = [], ""
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            notes = text
        else:
            objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects, notes


@dataclass
class Release:
    """The chart rendered for this test bed and its pods run as containers."""

    objects: list[dict[str, Any]]
    api_key: str
    kubelet: Kubelet
    logs: Path
    cluster: KubeCluster
    bucket: str
    procs: dict[str, Any] = field(default_factory=dict)

    def deployment(self, component: str) -> dict[str, Any]:
        return next(o for o in self.objects if o["kind"] == "Deployment"
                    and o["metadata"]["name"].endswith(f"-{component}"))

    def pod_spec(self, component: str) -> dict[str, Any]:
        """A copy: tests may change it."""
        return copy.deepcopy(self.deployment(component)["spec"]["template"]["spec"])

    def start(self, component: str) -> str:
        """Runs the Deployment's pod as a container; returns the pod (and container) name."""
        name = f"{RELEASE}-{component}-{os.urandom(3).hex()}"
        log = self.logs / f"{name}.log"
        self.procs[name] = (self.kubelet.start(name, self.pod_spec(component), log=log), log)
        return name

    def stop(self, name: str) -> None:
        proc, _ = self.procs.pop(name)
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except Exception:
            proc.kill()
        self.kubelet.remove(name)

    def log(self, name: str) -> str:
        return self.procs[name][1].read_text(errors="replace") if name in self.procs else ""

    def wait_gateway(self, name: str) -> str:
        proc, log = self.procs[name]
        probe = self.deployment("gateway")["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
        url = f"http://127.0.0.1:{GATEWAY_PORT}"
        wait_http(url + probe["httpGet"]["path"], timeout=90, proc=proc, log=log)
        return url

    def job_runner(self, capacity: int = 2) -> JobRunner:
        return JobRunner(self.cluster, self.logs / "pods", capacity=capacity, kubelet=self.kubelet, poll=0.3)


def chart_values(images: dict[str, str], s3: S3Info, bucket: str, **extra: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "storage": {"endpoint": s3.endpoint, "bucket": bucket, "secure": False,
                    "accessKey": s3.access_key, "secretKey": s3.secret_key},
        "gateway": {"image": _split(images["gateway"])},
        "operator": {"image": _split(images["gateway"])},
        "worker": {"image": _split(images["worker-cpu"]), "shmSizeLimit": "256Mi"},
    }
    for key, value in extra.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return values


@pytest.fixture()
def release_factory(engine: Engine, images: dict[str, str], kube_cluster: KubeCluster, s3_info: S3Info,
                    tmp_path: Path) -> Iterator:
    """Renders the chart with the given values, applies its Secrets, ConfigMaps and
    KopfPeering to the emulator (as `helm install` would), and hands back a Release whose
    Deployments run as containers. The bucket is created first: vbatch creates none."""
    from minio import Minio

    made: list[Release] = []

    def make(*, bucket: str | None = None, **extra: Any) -> Release:
        bucket = bucket or f"img-{os.urandom(4).hex()}"
        Minio(s3_info.endpoint, access_key=s3_info.access_key, secret_key=s3_info.secret_key,
              secure=False).make_bucket(bucket)
        objects, notes = render(chart_values(images, s3_info, bucket, **extra), kube_cluster.namespace)
        kube_cluster.load_crds(CHART / "crds" / "kopfpeerings.kopf.dev.yaml")
        kube_cluster.install_chart_identities(values=chart_values(images, s3_info, bucket, **extra))
        for obj in objects:
            if obj["kind"] in {"Secret", "ConfigMap", "KopfPeering"}:
                kube_cluster.create(obj)
        keys = re.findall(r"VBATCH_API_KEY=(vb-[A-Za-z0-9]+)", notes)
        assert keys, notes

        def get_object(kind: str, name: str, namespace: str) -> dict[str, Any] | None:
            try:
                return kube_cluster.get("v1", kind, name, namespace)
            except Exception:
                return None

        def write_kubeconfig(path: Path, account: str) -> Path:
            return kube_cluster.write_kubeconfig(path, {account: kube_cluster.service_account_token(account)})

        kubelet = Kubelet(engine, tmp_path / "kubelet", get_object, write_kubeconfig=write_kubeconfig,
                          namespace=kube_cluster.namespace)
        release = Release(objects, keys[0], kubelet, tmp_path / "logs", kube_cluster, bucket)
        release.logs.mkdir(parents=True, exist_ok=True)
        made.append(release)
        return release

    yield make
    for release in made:
        for name in list(release.procs):
            release.stop(name)
