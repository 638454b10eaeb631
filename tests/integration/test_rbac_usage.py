"""RBAC truth: the Kubernetes API calls vbatch really makes, per component, recorded
in the emulator's audit log while the gateway's store and the operator (with kopf
peering, as the chart runs it) take batches through every path — run, cancel, delete.
The emulator enforces the chart's RBAC with each component's ServiceAccount token, so a
missing permission fails this run; an unneeded one fails the exactness checks below.

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


def recorded(env: ClusterEnv) -> dict[str, Usage]:
    """Who called what, from the emulator's audit log: each component authenticated with
    its own ServiceAccount token, and the operator's process is told apart by user
    agent (vbatch-operator/... is vbatch's code, kopf/... is kopf's)."""
    by_client: dict[str, Usage] = {}
    for event in env.cluster.emulator.audit:
        attrs = event.attributes
        if attrs is None or not attrs.resource_request:
            continue  # discovery documents: every authenticated user may read them
        client = event.user_agent.split("/")[0]
        resource = attrs.resource + (f"/{attrs.subresource}" if attrs.subresource else "")
        by_client.setdefault(client, set()).add((attrs.api_group, resource, attrs.verb))
    return by_client


def identities(env: ClusterEnv) -> dict[str, set[str]]:
    """{client: the users it authenticated as}."""
    users: dict[str, set[str]] = {}
    for event in env.cluster.emulator.audit:
        if event.attributes is not None and event.attributes.resource_request:
            users.setdefault(event.user_agent.split("/")[0], set()).add(event.user.name)
    return users


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
    store = kube_store.KubeBatchStore.from_settings(settings)  # the gateway's own identity
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
# through a KopfPeering, scanning disabled): watching Batches and patching them
# (finalizer, progress annotations) and the peering object's keep-alives. Events: kopf
# posts its warnings/errors (posting level) as core v1 Events. Nothing cluster-wide:
# no Namespace or CRD listing (kopf would retry a 403 on those for ~55 s at start-up).
KOPF_NEEDS: Usage = {
    ("vbatch.dev", "batches", "list"), ("vbatch.dev", "batches", "watch"), ("vbatch.dev", "batches", "patch"),
    ("kopf.dev", "kopfpeerings", "list"), ("kopf.dev", "kopfpeerings", "watch"), ("kopf.dev", "kopfpeerings", "patch"),
    ("", "events", "create"),
}


def test_recorded_api_calls_are_the_declared_ones(cluster_env: ClusterEnv):
    calls = exercise(cluster_env)
    gateway, operator, kopf = calls.get("vbatch-gateway", set()), calls.get("vbatch-operator", set()), \
        calls.get("kopf", set())
    assert gateway and operator and kopf, calls.keys()
    # Under the chart's RBAC, with each component's own ServiceAccount, nothing was refused.
    denied = [(e.user_agent, e.attributes) for e in cluster_env.cluster.emulator.audit if not e.allowed]
    assert denied == [], denied
    users = identities(cluster_env)
    assert users["vbatch-gateway"] == {"system:serviceaccount:default:vbatch-gateway"}
    assert users["vbatch-operator"] == users["kopf"] == {"system:serviceaccount:default:vbatch-operator"}
    print("gateway uses:", sorted(gateway), "\noperator uses:", sorted(operator), "\nkopf uses:", sorted(kopf))
    # Every call the code makes is in its declared table (a new call cannot slip in)...
    assert gateway <= declared(kube_store.RBAC_USAGE), gateway - declared(kube_store.RBAC_USAGE)
    assert operator <= declared(operator_kube.RBAC_USAGE), operator - declared(operator_kube.RBAC_USAGE)
    assert kopf <= KOPF_NEEDS, kopf - KOPF_NEEDS
    # ...and the run went through the interesting paths (peering was really on).
    assert ("kopf.dev", "kopfpeerings", "patch") in kopf
    assert {("batch", "jobs", "create"), ("batch", "jobs", "delete"), ("", "pods", "list")} <= operator
    assert ("vbatch.dev", "batches/status", "patch") in gateway


def test_chart_grants_exactly_what_the_code_uses():
    # Exactly: a missing verb breaks a real cluster, an extra one is privilege nobody uses.
    assert expected("gateway") == declared(kube_store.RBAC_USAGE)
    assert expected("operator") == declared(operator_kube.RBAC_USAGE) | KOPF_NEEDS
