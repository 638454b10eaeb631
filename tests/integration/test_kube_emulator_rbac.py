"""The emulator as kube-apiserver, over the wire: HTTPS, bearer tokens of
ServiceAccounts, RBAC from the Roles and bindings in the cluster, 403 Status bodies the
official client, kubectl and kopf understand; patch content types (strategic merge
for built-ins, 415 for custom resources) and deletion propagation (Jobs orphan by
default, foreground deletion waits for blocking dependents)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import kopf
import kopf.testing
import kubernetes
import pytest
from kube.fixtures import KubeCluster
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.cluster

G, V, P, NS = "vbatch.dev", "v1alpha1", "batches", "default"
RBAC = "rbac.authorization.k8s.io/v1"
KUBECTL = shutil.which("kubectl")


def limited_account(cluster: KubeCluster, rules: list[dict], name: str = "limited") -> str:
    """A ServiceAccount bound to a Role with these rules; returns a kubeconfig path for it."""
    apply = cluster.emulator.apply
    cluster.call(apply, {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": NS}})
    cluster.call(apply, {"apiVersion": RBAC, "kind": "Role", "metadata": {"name": name, "namespace": NS},
                         "rules": rules})
    cluster.call(apply, {"apiVersion": RBAC, "kind": "RoleBinding", "metadata": {"name": name, "namespace": NS},
                         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": NS}]})
    path = cluster.kubeconfig.parent / f"{name}.kubeconfig"
    return str(cluster.write_kubeconfig(path, {name: cluster.service_account_token(name)}))


@pytest.fixture()
def limited(kube_cluster: KubeCluster):
    path = limited_account(kube_cluster, [{"apiGroups": [G], "resources": [P], "verbs": ["get"]}])
    client = kubernetes.config.new_client_from_config(path)
    yield kubernetes.client.CustomObjectsApi(client), path
    client.close()


def test_a_call_outside_the_rules_gets_403_with_the_api_servers_status(limited):
    crs, _ = limited
    with pytest.raises(ApiException) as missing:
        crs.get_namespaced_custom_object(G, V, NS, P, "nope")
    assert missing.value.status == 404  # allowed: it is simply not there
    with pytest.raises(ApiException) as refused:
        crs.list_namespaced_custom_object(G, V, NS, P)
    assert refused.value.status == 403 and refused.value.reason == "Forbidden"
    body = json.loads(refused.value.body)
    assert body == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Forbidden", "code": 403,
        "message": 'batches.vbatch.dev is forbidden: User "system:serviceaccount:default:limited" cannot list '
                   'resource "batches" in API group "vbatch.dev" in the namespace "default"',
        "details": {"group": "vbatch.dev", "kind": "batches"},
    }
    with pytest.raises(ApiException) as refused:
        crs.patch_namespaced_custom_object_status(G, V, NS, P, "b1", {"status": {"phase": "x"}})
    assert refused.value.status == 403 and "batches/status" in json.loads(refused.value.body)["message"]
    with pytest.raises(ApiException) as refused:
        crs.get_namespaced_custom_object(G, V, "kube-system", P, "nope")
    assert refused.value.status == 403


def test_an_unknown_or_revoked_token_is_401(kube_cluster: KubeCluster, limited):
    _, path = limited
    forged = kube_cluster.write_kubeconfig(kube_cluster.kubeconfig.parent / "forged", {"x": "not-a-token"})
    crs = kubernetes.client.CustomObjectsApi(kubernetes.config.new_client_from_config(str(forged)))
    with pytest.raises(ApiException) as refused:
        crs.get_namespaced_custom_object(G, V, NS, P, "nope")
    assert refused.value.status == 401 and json.loads(refused.value.body)["reason"] == "Unauthorized"
    # Deleting the ServiceAccount revokes its tokens.
    kube_cluster.delete("v1", "ServiceAccount", "limited")
    crs = kubernetes.client.CustomObjectsApi(kubernetes.config.new_client_from_config(path))
    with pytest.raises(ApiException) as refused:
        crs.get_namespaced_custom_object(G, V, NS, P, "nope")
    assert refused.value.status == 401


def test_granting_a_permission_takes_effect_at_once(kube_cluster: KubeCluster, limited):
    crs, _ = limited
    with pytest.raises(ApiException):
        crs.list_namespaced_custom_object(G, V, NS, P)
    kube_cluster.patch(RBAC, "Role", "limited",
                       {"rules": [{"apiGroups": [G], "resources": [P], "verbs": ["get", "list"]}]})
    assert crs.list_namespaced_custom_object(G, V, NS, P)["items"] == []


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_kubectl_sees_the_denial(kube_cluster: KubeCluster, limited):
    _, path = limited
    done = subprocess.run([KUBECTL, "--kubeconfig", path, "--cache-dir", str(kube_cluster.kubeconfig.parent / "c"),
                           "get", "batches"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert 'Error from server (Forbidden): batches.vbatch.dev is forbidden: User ' \
        '"system:serviceaccount:default:limited" cannot list resource "batches"' in done.stderr
    admin = subprocess.run([KUBECTL, "--kubeconfig", str(kube_cluster.kubeconfig), "--cache-dir",
                            str(kube_cluster.kubeconfig.parent / "c"), "get", "batches"],
                           capture_output=True, text=True, timeout=60)
    assert admin.returncode == 0, admin.stderr


def test_kopf_retries_a_refused_watch_and_recovers_once_granted(kube_cluster: KubeCluster, monkeypatch):
    """kopf meets a 403 as it would on a real cluster (it retries with back-off) and the
    grant arriving later lets it proceed: denial is a real API response, not a crash."""
    path = limited_account(kube_cluster, [{"apiGroups": [G], "resources": [P], "verbs": ["get"]}], name="probe")
    monkeypatch.setenv("KUBECONFIG", path)
    probe = str(kube_cluster.kubeconfig.parents[0] / "probe.py")
    with open(probe, "w") as f:
        f.write("import kopf\n"
                "@kopf.on.login()\n"
                "def login(**kw): return kopf.login_with_kubeconfig(**kw)\n"
                "@kopf.on.startup()\n"
                "def configure(settings, **_):\n"
                "    settings.scanning.disabled = True\n"
                "    settings.networking.error_backoffs = [0.2] * 30\n"
                "@kopf.on.create('vbatch.dev', 'v1alpha1', 'batches')\n"
                "def seen(patch, **_): patch.status['phase'] = 'in_progress'\n")
    kube_cluster.create({"apiVersion": f"{G}/{V}", "kind": "Batch", "metadata": {"name": "b1"},
                         "spec": {"inputFileId": "file-x", "endpoint": "/v1/chat/completions",
                                  "completionWindow": "24h", "project": "p"}})
    args = ["run", "--namespace", NS, "--standalone", probe]
    # Its own registry: loading the probe registers handlers, which must not leak into
    # other tests' operators through kopf's default registry.
    previous, registry = kopf.get_default_registry(), kopf.OperatorRegistry()
    kopf.set_default_registry(registry)
    try:
        _run_probe(kube_cluster, args, registry)
    finally:
        kopf.set_default_registry(previous)


def _run_probe(kube_cluster: KubeCluster, args: list[str], registry) -> None:
    with kopf.testing.KopfRunner(args, registry=registry, timeout=60) as runner:
        deadline = time.monotonic() + 20
        while not any(e.attributes and e.attributes.resource == P and e.attributes.verb == "list" and not e.allowed
                      for e in list(kube_cluster.emulator.audit)):
            assert time.monotonic() < deadline, "kopf never tried to list batches"
            time.sleep(0.1)
        kube_cluster.patch(RBAC, "Role", "probe", {"rules": [
            {"apiGroups": [G], "resources": [P], "verbs": ["get", "list", "watch", "patch"]},
            {"apiGroups": [G], "resources": [f"{P}/status"], "verbs": ["patch"]},
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}]})
        deadline = time.monotonic() + 30
        while (kube_cluster.get(f"{G}/{V}", "Batch", "b1").get("status") or {}).get("phase") != "in_progress":
            assert time.monotonic() < deadline, runner.output[-3000:]
            time.sleep(0.1)
    assert runner.exception is None


# --- patch content types (apiserver patch.go) ----------------------------------------


def test_strategic_merge_patch_is_refused_on_custom_resources_and_merges_builtins(kube_cluster: KubeCluster):
    admin = kubernetes.config.new_client_from_config(str(kube_cluster.kubeconfig))
    kube_cluster.create({"apiVersion": f"{G}/{V}", "kind": "Batch", "metadata": {"name": "b1"},
                         "spec": {"inputFileId": "file-x", "endpoint": "/v1/chat/completions",
                                  "completionWindow": "24h", "project": "p"}})
    # What `kubectl patch batch b1 -p ...` sends without --type=merge.
    with pytest.raises(ApiException) as refused:
        admin.call_api(f"/apis/{G}/{V}/namespaces/{NS}/{P}/b1", "PATCH", body={"spec": {"model": "m"}},
                       header_params={"Content-Type": "application/strategic-merge-patch+json"},
                       auth_settings=["BearerToken"], _preload_content=False)
    assert refused.value.status == 415
    assert json.loads(refused.value.body)["reason"] == "UnsupportedMediaType"
    # The typed client patches built-ins with a strategic merge: finalizers are a set.
    core = kubernetes.client.CoreV1Api(admin)
    core.create_namespaced_config_map(NS, {"metadata": {"name": "c", "finalizers": ["a/x"]}})
    pod = {"metadata": {"name": "p", "finalizers": ["a/x"]},
           "spec": {"containers": [{"name": "w", "image": "i", "env": [{"name": "A", "value": "1"}]}]}}
    core.create_namespaced_pod(NS, pod)
    patched = core.patch_namespaced_pod("p", NS, {"metadata": {"finalizers": ["b/y"]}, "spec": {"containers": [
        {"name": "w", "env": [{"name": "B", "value": "2"}]}]}})
    assert patched.metadata.finalizers == ["a/x", "b/y"]
    assert [e.name for e in patched.spec.containers[0].env] == ["A", "B"]
    admin.close()


# --- deletion propagation (garbage collector) ------------------------------------------


def _job_with_pod(core, batch_api, name: str, pod_finalizers: list[str]) -> None:
    job = batch_api.create_namespaced_job(NS, {"metadata": {"name": name}, "spec": {"template": {"spec": {
        "restartPolicy": "Never", "containers": [{"name": "w", "image": "i"}]}}}})
    core.create_namespaced_pod(NS, {"metadata": {"name": f"{name}-pod", "finalizers": pod_finalizers,
                                                 "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                                                      "name": name, "uid": job.metadata.uid,
                                                                      "controller": True,
                                                                      "blockOwnerDeletion": True}]},
                                    "spec": {"containers": [{"name": "w", "image": "i"}]}})


def test_jobs_orphan_their_pods_unless_told_otherwise(kube_cluster: KubeCluster):
    admin = kubernetes.config.new_client_from_config(str(kube_cluster.kubeconfig))
    core, batch_api = kubernetes.client.CoreV1Api(admin), kubernetes.client.BatchV1Api(admin)
    _job_with_pod(core, batch_api, "j1", [])
    batch_api.delete_namespaced_job("j1", NS)  # batch/v1 default: orphan
    assert core.read_namespaced_pod("j1-pod", NS).metadata.owner_references is None
    _job_with_pod(core, batch_api, "j2", [])
    batch_api.delete_namespaced_job("j2", NS, propagation_policy="Background")
    with pytest.raises(ApiException) as gone:
        core.read_namespaced_pod("j2-pod", NS)
    assert gone.value.status == 404
    admin.close()


def test_foreground_deletion_keeps_the_owner_until_blocking_dependents_are_gone(kube_cluster: KubeCluster):
    admin = kubernetes.config.new_client_from_config(str(kube_cluster.kubeconfig))
    core, batch_api = kubernetes.client.CoreV1Api(admin), kubernetes.client.BatchV1Api(admin)
    _job_with_pod(core, batch_api, "j", ["test/kubelet"])
    batch_api.delete_namespaced_job("j", NS, propagation_policy="Foreground")
    job = batch_api.read_namespaced_job("j", NS)
    assert job.metadata.deletion_timestamp and "foregroundDeletion" in job.metadata.finalizers
    pod = core.read_namespaced_pod("j-pod", NS)
    assert pod.metadata.deletion_timestamp  # terminating, held by its own finalizer
    core.patch_namespaced_pod("j-pod", NS, {"metadata": {"$deleteFromPrimitiveList/finalizers": ["test/kubelet"]}})
    for read in (lambda: batch_api.read_namespaced_job("j", NS), lambda: core.read_namespaced_pod("j-pod", NS)):
        with pytest.raises(ApiException) as gone:
            read()
        assert gone.value.status == 404
    _job_with_pod(core, batch_api, "j3", [])
    with pytest.raises(ApiException) as bad:
        batch_api.delete_namespaced_job("j3", NS, propagation_policy="Sideways")
    assert bad.value.status == 422
    admin.close()
