"""RBAC truth: the Kubernetes API calls vbatch really makes, per component, recorded
by the emulator while the gateway's store and the operator (with kopf peering, as the
chart runs it) take batches through every path — run, cancel, delete.

Compared with (1) the tables the code declares (`RBAC_USAGE` in operator/cr_store.py and
operator/kube.py), so a new call cannot slip in unnoticed, and (2) the chart's
least-privilege expectations (charts/vbatch/rbac-expectations.yaml).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from api_server import chat_line, jsonl
from kube.harness import BATCH_API, ClusterEnv, wait_for
from vbatch.operator import cr_store as kube_store
from vbatch.core import state
from vbatch.core.ids import batch_object_name
from vbatch.core.schemas import FilePurpose
from vbatch.operator import kube as operator_kube

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
EXPECTATIONS = REPO / "charts" / "vbatch" / "rbac-expectations.yaml"
PEERING_CRD = REPO / "charts" / "vbatch" / "crds" / "kopfpeerings.kopf.dev.yaml"
Usage = set[tuple[str, str, str]]  # (apiGroup, resource, verb)


def verb_of(request) -> str:
    method = request.method.upper()
    if method == "GET":
        if request.params.get("watch", "").lower() in ("true", "1"):
            return "watch"
        return "get" if request.name else "list"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(
        method, "delete" if request.name else "deletecollection")


def recorded(env: ClusterEnv) -> dict[str, Usage]:
    """Who called what, by user agent: vbatch-gateway/..., vbatch-operator/..., kopf/..."""
    by_client: dict[str, Usage] = {}
    for request in env.cluster.emulator._requests:
        if request.resource is None or request.resource.plural is None:
            continue  # discovery documents need no RBAC
        agent = request.headers.get("User-Agent", "")
        client = agent.split("/")[0]
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        by_client.setdefault(client, set()).add((request.resource.group or "", resource, verb_of(request)))
    return by_client


def declared(table) -> Usage:
    return {(group, resource, verb) for (group, resource), verbs in table.items() for verb in verbs}


def expected(component: str) -> Usage:
    data = yaml.safe_load(EXPECTATIONS.read_text())[component]
    return {(rule["apiGroup"], rule["resource"], verb)
            for scope in ("namespaced", "cluster") for rule in data[scope] for verb in rule["verbs"]}


def exercise(env: ClusterEnv) -> dict[str, Usage]:
    env.configure(VBATCH_SHARD_TARGET_REQUESTS=3,
                  worker_env={"VBATCH_ECHO_DELAY_PER_TOKEN": "0.3", "VBATCH_PART_MAX_RESULTS": "1"})
    env.cluster.load_crds(PEERING_CRD)
    env.cluster.create({"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "vbatch"}})
    settings = env.settings
    store = kube_store.KubeBatchStore.from_settings(settings)
    file_id = env.files.create("p", iter([jsonl([chat_line(f"r{i}") for i in range(6)])]), filename=None,
                               purpose=FilePurpose.BATCH).id

    def new_batch():
        record = state.new_batch(project="p", input_file_id=file_id, endpoint="/v1/chat/completions",
                                 completion_window="24h", metadata=None, total=6, model="test-model",
                                 window_seconds=3600, now=int(__import__("time").time()))
        store.create(record)
        return record.id

    with env.operator(peering="vbatch"), env.job_runner(capacity=1) as runner:
        done, cancelled = new_batch(), new_batch()
        wait_for(lambda: store.get("p", cancelled), lambda r: r.request_counts.completed > 0 or
                 r.status.is_terminal, 60)
        store.request_cancel("p", cancelled)
        store.list_page("p", after=None, limit=10)
        list(store.unfinished())
        for batch_id in (done, cancelled):
            env.wait_settled(batch_id)
        env.cluster.delete(BATCH_API, "Batch", batch_object_name(done))
        wait_for(lambda: env.cluster.list(BATCH_API, "Batch"), lambda items: len(items) == 1, 30)
        runner.wait_idle()
    assert store.get("p", done) is None and store.get("p", cancelled).status == "cancelled"
    return recorded(env)


# What kopf itself calls for this operator (namespaced to one namespace, peering
# through a KopfPeering): watching Batches and patching them (finalizer, progress
# annotations), the peering object's keep-alives, and cluster-wide CRD discovery.
# Events: kopf posts its warnings/errors (posting level) as core v1 Events.
KOPF_NEEDS: Usage = {
    ("vbatch.dev", "batches", "list"), ("vbatch.dev", "batches", "watch"), ("vbatch.dev", "batches", "patch"),
    ("kopf.dev", "kopfpeerings", "list"), ("kopf.dev", "kopfpeerings", "watch"), ("kopf.dev", "kopfpeerings", "patch"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    ("", "events", "create"),
}
# kopf tries these, and on 403 logs a warning and uses the --namespace it was given:
# least privilege means not granting cluster-wide namespace access for that.
KOPF_OPTIONAL: Usage = {("", "namespaces", "list"), ("", "namespaces", "watch")}


def test_recorded_api_calls_are_the_declared_ones(cluster_env: ClusterEnv):
    calls = exercise(cluster_env)
    gateway, operator, kopf = calls.get("vbatch-gateway", set()), calls.get("vbatch-operator", set()), \
        calls.get("kopf", set())
    assert gateway and operator and kopf, calls.keys()
    print("gateway uses:", sorted(gateway), "\noperator uses:", sorted(operator), "\nkopf uses:", sorted(kopf))
    # Every call the code makes is in its declared table (a new call cannot slip in)...
    assert gateway <= declared(kube_store.RBAC_USAGE), gateway - declared(kube_store.RBAC_USAGE)
    assert operator <= declared(operator_kube.RBAC_USAGE), operator - declared(operator_kube.RBAC_USAGE)
    assert kopf <= KOPF_NEEDS | KOPF_OPTIONAL, kopf - KOPF_NEEDS - KOPF_OPTIONAL
    # ...and the run went through the interesting paths (peering was really on).
    assert ("kopf.dev", "kopfpeerings", "patch") in kopf
    assert {("batch", "jobs", "create"), ("batch", "jobs", "delete"), ("", "pods", "list")} <= operator
    assert ("vbatch.dev", "batches/status", "patch") in gateway


def test_chart_grants_exactly_what_the_code_uses():
    # Exactly: a missing verb breaks a real cluster, an extra one is privilege nobody uses.
    assert expected("gateway") == declared(kube_store.RBAC_USAGE)
    assert expected("operator") == declared(operator_kube.RBAC_USAGE) | KOPF_NEEDS
