"""Cluster mode under the chart's own RBAC, as a new user meets it.

The emulator authenticates the operator and the gateway with their ServiceAccounts'
tokens and authorizes every call through the Roles the chart renders (kube/harness.py),
so these tests see what a real cluster shows: an operator that sits idle while kopf
retries a refused call, or a Batch the API cannot list.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
import yaml
from api_server import chat_line, jsonl, serve
from kube.harness import BATCH_API, ClusterEnv, wait_for
from vbatch.operator.cr_store import KubeBatchStore
from vbatch.api.services import NoopRunner, Services
from vbatch.core.ids import batch_object_name, new_batch_id
from vbatch.core.keys import KeyStore
from vbatch.core.schemas import FilePurpose
from vbatch.operator.builders import LABEL_BATCH, LABEL_PROJECT, project_label

pytestmark = pytest.mark.cluster

KUBECTL = shutil.which("kubectl")
PEERING_CRD = Path(__file__).resolve().parents[2] / "charts" / "vbatch" / "crds" / "kopfpeerings.kopf.dev.yaml"
# Generous for a loaded CI machine, yet far below the ~55 s kopf spends retrying a
# refused start-up call (1+1+2+3+5+8+13+21 s of back-off) before it falls back.
ACTS_WITHIN = 30.0
# A valid project id (64 chars, ending in `-`) that is not a valid label value.
NEEDS_SANITISING = "Team.B_" + "x" * 56 + "-"
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def upload(env: ClusterEnv, project: str, n: int = 3) -> str:
    lines = [chat_line(f"r-{i}", f"question {i}") for i in range(n)]
    return env.files.create(project, iter([jsonl(lines)]), filename="in.jsonl", purpose=FilePurpose.BATCH).id


def manifest(project: str, file_id: str) -> tuple[str, str]:
    """(batch id, YAML) of a Batch as a user writes it: spec only, no labels, no status."""
    batch_id = new_batch_id()
    doc = {"apiVersion": BATCH_API, "kind": "Batch", "metadata": {"name": batch_object_name(batch_id)},
           "spec": {"inputFileId": file_id, "endpoint": "/v1/chat/completions", "completionWindow": "24h",
                    "project": project}}
    return batch_id, yaml.safe_dump(doc)


def kubectl_create(env: ClusterEnv, text: str) -> None:
    # --validate=false: the emulator serves no OpenAPI documents for client-side validation
    # (the API server still validates against the CRD schema).
    if KUBECTL is None:  # the same request kubectl sends: a POST of the manifest, as the admin
        doc = yaml.safe_load(text)
        env.cluster.call(env.cluster.emulator.apply, doc | {"metadata": doc["metadata"] | {"namespace": "default"}})
        return
    done = subprocess.run([KUBECTL, "--kubeconfig", str(env.cluster.kubeconfig), "--cache-dir",
                           str(env.tmp / "kubectl-cache"), "create", "--validate=false", "-f", "-"],
                          input=text.encode(), capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()


def apply_batch(env: ClusterEnv, project: str, file_id: str) -> str:
    batch_id, text = manifest(project, file_id)
    kubectl_create(env, text)
    return batch_id


@contextmanager
def gateway(env: ClusterEnv, projects: list[str]) -> Iterator[dict[str, openai.OpenAI]]:
    """The gateway with its own ServiceAccount (the `vbatch-gateway` context), and an SDK
    client per project."""
    settings = env.settings
    keys = KeyStore(env.tmp / "keys")
    services = Services(settings=settings, files=env.files, batches=KubeBatchStore.from_settings(settings),
                        keys=keys, runner=NoopRunner(), served_models=None)
    with serve(services) as url:
        yield {p: openai.OpenAI(base_url=f"{url}/v1", api_key=keys.create(p), max_retries=0,
                                default_headers={"x-project-id": p}) for p in projects}


def moved(env: ClusterEnv, batch_id: str) -> dict:
    """Until the operator acted on a kubectl-applied Batch (it had no status at all)."""
    return wait_for(lambda: env.batch(batch_id), lambda o: (o.get("status") or {}).get("phase") is not None,
                    ACTS_WITHIN)


def test_operator_acts_within_seconds_of_start_and_of_a_restart(cluster_env: ClusterEnv):
    env = cluster_env
    env.configure(worker_env={"VBATCH_ECHO_DELAY_PER_TOKEN": "0.05"})
    # As the chart runs it: peering through the release's KopfPeering.
    env.cluster.load_crds(PEERING_CRD)
    env.cluster.create({"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "vbatch"}})
    file_id = upload(env, "team-a")
    first = apply_batch(env, "team-a", file_id)  # waiting before any operator runs
    with env.operator(peering="vbatch") as runner, env.job_runner():
        moved(env, first)
        env.wait_settled(first)
    assert "Not enough permissions" not in runner.output, runner.output[-2000:]
    second = apply_batch(env, "team-a", file_id)  # arrives while no operator runs
    with env.operator(peering="vbatch") as runner, env.job_runner():
        moved(env, second)
        assert env.wait_settled(second)["status"]["phase"] == "completed"
    assert "Not enough permissions" not in runner.output, runner.output[-2000:]
    refused = [(e.user_agent, e.attributes) for e in env.cluster.emulator.audit if not e.allowed]
    assert refused == []


@pytest.mark.parametrize("project", ["team-a", NEEDS_SANITISING], ids=["plain", "needs-sanitising"])
def test_kubectl_applied_batch_is_listed_and_readable_for_its_project_only(cluster_env: ClusterEnv, project):
    env = cluster_env
    other = "team-other"
    file_id = upload(env, project)
    with env.operator(), env.job_runner(), gateway(env, [project, other]) as clients:
        batch_id = apply_batch(env, project, file_id)
        mine, theirs = clients[project], clients[other]
        done = wait_for(lambda: mine.batches.retrieve(batch_id), lambda b: b.status == "completed", 60)
        assert done.request_counts.total == 3 and done.request_counts.completed == 3
        listed = wait_for(lambda: [b.id for b in mine.batches.list(limit=100)], lambda ids: batch_id in ids, 30)
        assert listed == [batch_id]
        with pytest.raises(openai.NotFoundError):
            theirs.batches.retrieve(batch_id)
        assert [b.id for b in theirs.batches.list(limit=100)] == []
        with pytest.raises(openai.NotFoundError):
            theirs.batches.cancel(batch_id)
        # The output downloads with the project's key (it always did) and no other.
        assert len(mine.files.content(done.output_file_id).text.splitlines()) == 3
        with pytest.raises(openai.NotFoundError):
            theirs.files.content(done.output_file_id)
    labels = env.batch(batch_id)["metadata"]["labels"]
    assert labels[LABEL_PROJECT] == project_label(project) and labels[LABEL_BATCH] == batch_object_name(batch_id)
    assert LABEL_VALUE.match(labels[LABEL_PROJECT]) and len(labels[LABEL_PROJECT]) <= 63


def test_a_kubectl_applied_batch_with_a_wrong_project_label_is_relabelled(cluster_env: ClusterEnv):
    # A label copied from another project's Batch must not hide this one from its owner,
    # nor show it to the other project (ownership is spec.project; the label only narrows).
    env = cluster_env
    file_id = upload(env, "team-a")
    batch_id, text = manifest("team-a", file_id)
    doc = yaml.safe_load(text)
    doc["metadata"]["labels"] = {LABEL_PROJECT: project_label("team-b")}
    kubectl_create(env, yaml.safe_dump(doc))
    with env.operator(), env.job_runner(), gateway(env, ["team-a", "team-b"]) as clients:
        wait_for(lambda: [b.id for b in clients["team-a"].batches.list()], lambda ids: ids == [batch_id], 30)
        assert [b.id for b in clients["team-b"].batches.list()] == []
        with pytest.raises(openai.NotFoundError):
            clients["team-b"].batches.retrieve(batch_id)
        wait_for(lambda: clients["team-a"].batches.retrieve(batch_id), lambda b: b.status == "completed", 60)
    assert env.batch(batch_id)["metadata"]["labels"][LABEL_PROJECT] == project_label("team-a")


def test_the_gateway_cannot_touch_jobs_and_the_operator_cannot_create_batches(cluster_env: ClusterEnv):
    """Each component holds its own identity: the chart's least privilege, enforced."""
    import kubernetes
    from vbatch.operator.kube import api_client

    gateway_api, operator_api = api_client("gateway"), api_client("operator")
    with pytest.raises(kubernetes.client.ApiException) as refused:
        kubernetes.client.BatchV1Api(gateway_api).list_namespaced_job("default")
    assert refused.value.status == 403
    assert json.loads(refused.value.body)["message"] == (
        'jobs.batch is forbidden: User "system:serviceaccount:default:vbatch-gateway" cannot list resource "jobs" '
        'in API group "batch" in the namespace "default"')
    body = yaml.safe_load(manifest("team-a", "file-x")[1])
    with pytest.raises(kubernetes.client.ApiException) as refused:
        kubernetes.client.CustomObjectsApi(operator_api).create_namespaced_custom_object(
            "vbatch.dev", "v1alpha1", "default", "batches", body)
    assert refused.value.status == 403
    # Nor anything outside the release namespace.
    with pytest.raises(kubernetes.client.ApiException) as refused:
        kubernetes.client.CustomObjectsApi(gateway_api).list_namespaced_custom_object(
            "vbatch.dev", "v1alpha1", "kube-system", "batches")
    assert refused.value.status == 403
