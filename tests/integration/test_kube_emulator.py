"""The Kubernetes API emulator behaves like an API server for the official client and kopf."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import httpx
import kopf.testing
import kubernetes
import pytest
from kube.fixtures import KubeCluster
from kubernetes.client.rest import ApiException
from vbatch.operator.builders import build_shard_job
from vbatch.operator.config import WorkerPodConfig

pytestmark = pytest.mark.cluster

G, V, P, NS = "vbatch.dev", "v1alpha1", "batches", "default"
BATCH_API = f"{G}/{V}"
PROBE_OPERATOR = Path(__file__).resolve().parents[1] / "support" / "kube" / "probe_operator.py"


def batch(name: str, labels: dict | None = None, **spec) -> dict:
    return {
        "apiVersion": BATCH_API,
        "kind": "Batch",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"inputFileId": "file-abc", "endpoint": "/v1/chat/completions", "completionWindow": "24h",
                 "project": "proj", "model": "m", **spec},
    }


@pytest.fixture()
def api(kube_cluster: KubeCluster) -> kubernetes.client.ApiClient:
    client = kubernetes.config.new_client_from_config(str(kube_cluster.kubeconfig))
    yield client
    client.close()


@pytest.fixture()
def crs(api) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api)


def create(crs, body):
    return crs.create_namespaced_custom_object(G, V, NS, P, body)


def test_create_answers_201_and_a_duplicate_409(crs):
    body, status, _ = crs.create_namespaced_custom_object_with_http_info(G, V, NS, P, batch("b1"))
    assert status == 201
    meta = body["metadata"]
    assert meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1 and meta["resourceVersion"]
    assert body["spec"]["cancelRequested"] is False  # the CRD's default was applied
    with pytest.raises(ApiException) as exc:
        create(crs, batch("b1"))
    assert exc.value.status == 409 and '"AlreadyExists"' in exc.value.body


def test_resource_versions_increase_and_stale_writes_conflict(crs, api):
    first = create(crs, batch("b1"))
    other = kubernetes.client.CoreV1Api(api).create_namespaced_config_map(
        NS, {"metadata": {"name": "cm"}, "data": {"a": "1"}})
    assert int(other.metadata.resource_version) > int(first["metadata"]["resourceVersion"])

    fresh = dict(first, spec=dict(first["spec"], model="m2"))
    replaced = crs.replace_namespaced_custom_object(G, V, NS, P, "b1", fresh)
    assert int(replaced["metadata"]["resourceVersion"]) > int(other.metadata.resource_version)
    assert replaced["metadata"]["generation"] == 2

    stale = dict(first, spec=dict(first["spec"], model="m3"))  # still carries the old resourceVersion
    with pytest.raises(ApiException) as exc:
        crs.replace_namespaced_custom_object(G, V, NS, P, "b1", stale)
    assert exc.value.status == 409 and '"Conflict"' in exc.value.body
    assert crs.get_namespaced_custom_object(G, V, NS, P, "b1")["spec"]["model"] == "m2"


def test_status_subresource_is_isolated(crs):
    created = create(crs, dict(batch("b1"), status={"phase": "completed"}))
    assert "status" not in created  # status on create is ignored

    after_main = crs.patch_namespaced_custom_object(G, V, NS, P, "b1",
                                                    {"spec": {"model": "m2"}, "status": {"phase": "failed"}})
    assert after_main["spec"]["model"] == "m2" and "status" not in after_main

    after_status = crs.patch_namespaced_custom_object_status(
        G, V, NS, P, "b1", {"spec": {"model": "IGNORED"}, "status": {"phase": "in_progress"}})
    assert after_status["status"] == {"phase": "in_progress"}
    assert after_status["spec"]["model"] == "m2"
    assert after_status["metadata"]["generation"] == after_main["metadata"]["generation"] == 2

    replaced = crs.replace_namespaced_custom_object_status(G, V, NS, P, "b1",
                                                           dict(after_status, status={"phase": "finalizing"}))
    assert replaced["status"] == {"phase": "finalizing"}


def test_crd_schema_rejects_malformed_specs_and_prunes_unknown_fields(crs):
    with pytest.raises(ApiException) as exc:
        create(crs, batch("bad", endpoint="/v1/embeddings"))
    assert exc.value.status == 422 and "endpoint" in exc.value.body
    with pytest.raises(ApiException):
        create(crs, batch("bad", inputFileId="nope"))
    created = create(crs, batch("b1", surprise="dropped"))
    assert "surprise" not in created["spec"]
    patched = crs.patch_namespaced_custom_object_status(
        G, V, NS, P, "b1", {"status": {"phase": "validating", "bogus": 1, "kopf": {"anything": {"x": 1}}}})
    assert patched["status"] == {"phase": "validating", "kopf": {"anything": {"x": 1}}}


@pytest.mark.parametrize(("selector", "expected"), [
    ("tier=gold", {"a"}),
    ("tier==gold", {"a"}),
    ("tier!=gold", {"b", "c"}),
    ("tier in (gold,silver)", {"a", "b"}),
    ("tier notin (gold,silver)", {"c"}),
    ("tier", {"a", "b"}),
    ("!tier", {"c"}),
    ("tier,zone=eu", {"b"}),
])
def test_label_selectors_filter_lists(crs, selector, expected):
    create(crs, batch("a", {"tier": "gold"}))
    create(crs, batch("b", {"tier": "silver", "zone": "eu"}))
    create(crs, batch("c", {"zone": "eu"}))
    listing = crs.list_namespaced_custom_object(G, V, NS, P, label_selector=selector)
    assert {item["metadata"]["name"] for item in listing["items"]} == expected
    assert listing["kind"] == "BatchList" and listing["apiVersion"] == BATCH_API
    assert listing["metadata"]["resourceVersion"]


def test_field_selector_and_generate_name(api):
    core = kubernetes.client.CoreV1Api(api)
    made = core.create_namespaced_config_map(NS, {"metadata": {"generateName": "cm-"}})
    assert made.metadata.name.startswith("cm-") and len(made.metadata.name) == 8
    core.create_namespaced_config_map(NS, {"metadata": {"name": "other"}})
    found = core.list_namespaced_config_map(NS, field_selector=f"metadata.name={made.metadata.name}")
    assert [cm.metadata.name for cm in found.items] == [made.metadata.name]


def test_deleting_a_batch_cascades_to_its_job_and_pods(crs, api, kube_cluster):
    owner = create(crs, batch("batch-1"))
    job = build_shard_job(batch_name="batch-1", batch_uid=owner["metadata"]["uid"], namespace=NS, project="proj",
                          batch_id="batch_X", model="m", shard_count=2, parallelism=2,
                          worker=WorkerPodConfig(image="img"), max_attempts=3)
    jobs = kubernetes.client.BatchV1Api(api)
    created_job = jobs.create_namespaced_job(NS, job)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "batch-1-shards-0", "ownerReferences": [
        {"apiVersion": "batch/v1", "kind": "Job", "name": created_job.metadata.name,
         "uid": created_job.metadata.uid, "controller": True}]},
        "spec": {"containers": [{"name": "worker", "image": "img"}]}}
    kube_cluster.create(pod)
    # A test playing the Job controller can write Job status through the status subresource.
    kube_cluster.patch_status("batch/v1", "Job", created_job.metadata.name, {"active": 1, "ready": 1})
    assert jobs.read_namespaced_job_status(created_job.metadata.name, NS).status.active == 1

    crs.delete_namespaced_custom_object(G, V, NS, P, "batch-1")
    assert jobs.list_namespaced_job(NS).items == []
    assert kubernetes.client.CoreV1Api(api).list_namespaced_pod(NS).items == []


def test_orphan_propagation_keeps_dependents(crs, api, kube_cluster):
    owner = create(crs, batch("batch-1"))
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "dep", "ownerReferences": [
        {"apiVersion": BATCH_API, "kind": "Batch", "name": "batch-1", "uid": owner["metadata"]["uid"]}]}}
    kube_cluster.create(cm)
    crs.delete_namespaced_custom_object(G, V, NS, P, "batch-1", propagation_policy="Orphan")
    assert "ownerReferences" not in kube_cluster.get("v1", "ConfigMap", "dep")["metadata"]


def test_finalizers_hold_deletion_until_removed(crs):
    create(crs, dict(batch("b1"), metadata={"name": "b1", "finalizers": ["vbatch.dev/results"]}))
    crs.delete_namespaced_custom_object(G, V, NS, P, "b1")
    held = crs.get_namespaced_custom_object(G, V, NS, P, "b1")
    assert held["metadata"]["deletionTimestamp"]
    # Finalizers may only shrink once deletion started: adding one is refused (422).
    with pytest.raises(ApiException) as refused:
        crs.patch_namespaced_custom_object(G, V, NS, P, "b1",
                                           {"metadata": {"finalizers": ["vbatch.dev/results", "x"]}})
    assert refused.value.status == 422 and "no new finalizers can be added" in refused.value.body
    assert crs.get_namespaced_custom_object(G, V, NS, P, "b1")["metadata"]["finalizers"] == ["vbatch.dev/results"]
    crs.patch_namespaced_custom_object(G, V, NS, P, "b1", {"metadata": {"finalizers": None}})
    with pytest.raises(ApiException) as exc:
        crs.get_namespaced_custom_object(G, V, NS, P, "b1")
    assert exc.value.status == 404


def test_json_patch_with_a_failing_test_op_is_422(crs, kube_cluster):
    # kopf guards its finalizer patches this way; the official client only sends merge patches.
    created = create(crs, batch("b1"))
    url = f"{kube_cluster.url}/apis/{G}/{V}/namespaces/{NS}/{P}/b1"
    headers = {"Content-Type": "application/json-patch+json", **kube_cluster.admin_headers}
    ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": "0"},
           {"op": "replace", "path": "/spec/model", "value": "x"}]
    assert httpx.patch(url, json=ops, headers=headers, verify=ssl.create_default_context(cafile=kube_cluster.ca_file)).status_code == 422
    ops[0]["value"] = created["metadata"]["resourceVersion"]
    response = httpx.patch(url, json=ops, headers=headers, verify=ssl.create_default_context(cafile=kube_cluster.ca_file))
    assert response.status_code == 200 and response.json()["spec"]["model"] == "x"


def test_watch_resumes_from_a_resource_version_and_expires(crs, kube_cluster):
    created = create(crs, batch("b1"))
    since = created["metadata"]["resourceVersion"]
    crs.patch_namespaced_custom_object(G, V, NS, P, "b1", {"spec": {"model": "m2"}})
    create(crs, batch("b2", {"x": "y"}))
    crs.delete_namespaced_custom_object(G, V, NS, P, "b1")
    seen = [(e["type"], e["object"]["metadata"]["name"]) for e in kubernetes.watch.Watch().stream(
        crs.list_namespaced_custom_object, G, V, NS, P, resource_version=since, timeout_seconds=1)]
    assert seen == [("MODIFIED", "b1"), ("ADDED", "b2"), ("DELETED", "b1")]

    kube_cluster.call(kube_cluster.store.compact)
    stream = crs.list_namespaced_custom_object(G, V, NS, P, watch=True, resource_version=since,
                                               timeout_seconds=1, _preload_content=False)
    assert b'"code": 410' in stream.read()


def test_discovery_lists_the_crd_with_its_status_subresource(api):
    groups = kubernetes.client.ApisApi(api).get_api_versions()
    assert "vbatch.dev" in {g.name for g in groups.groups}
    resources = kubernetes.client.CustomObjectsApi(api).get_api_resources(G, V)
    by_name = {r.name: r for r in resources.resources}
    assert by_name["batches"].kind == "Batch" and by_name["batches"].short_names == ["vb"]
    assert by_name["batches"].namespaced and "batches/status" in by_name


def test_kopf_runs_unmodified_against_the_emulator(kube_cluster, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(kube_cluster.kubeconfig))
    args = ["run", "--all-namespaces", "--standalone", "--verbose", str(PROBE_OPERATOR)]
    with kopf.testing.KopfRunner(args, timeout=60) as runner:
        kube_cluster.create(batch("batch-1"))
        obj = wait_for(lambda: kube_cluster.get(BATCH_API, "Batch", "batch-1"),
                       lambda o: (o.get("status") or {}).get("phase") == "in_progress")
        assert obj["status"]["jobName"] == "batch-1-shards"
        assert obj["metadata"]["labels"]["probe.vbatch.dev/handled"] == "yes"
        assert "kopf.zalando.org/last-handled-configuration" in obj["metadata"]["annotations"]
        assert "kopf.zalando.org/KopfFinalizerMarker" in obj["metadata"]["finalizers"]

        kube_cluster.patch(BATCH_API, "Batch", "batch-1", {"spec": {"cancelRequested": True}})
        wait_for(lambda: kube_cluster.get(BATCH_API, "Batch", "batch-1"),
                 lambda o: o["status"]["phase"] == "cancelling")

        kube_cluster.delete(BATCH_API, "Batch", "batch-1")
        wait_for(lambda: kube_cluster.list(BATCH_API, "Batch"), lambda items: items == [])

    assert runner.exception is None and runner.exit_code == 0
    versions = [v for v in kube_cluster.history(BATCH_API, "Batch", "batch-1") if v is not None]
    # The failed first attempt made kopf persist its progress in both stores.
    assert any("kopf.zalando.org/admit" in (v["metadata"].get("annotations") or {}) for v in versions)
    assert any("admit" in ((v.get("status") or {}).get("kopf") or {}).get("progress", {}) for v in versions)
    assert any(v["metadata"].get("deletionTimestamp") for v in versions)
    assert "Admitted" in {e["reason"] for e in kube_cluster.list("v1", "Event")}


def wait_for(read, done, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout}s; last value: {value!r}")
        time.sleep(0.1)


# --- pagination: limit / continue ------------------------------------------------------


def _pages(crs, **kwargs) -> list[dict]:
    pages, token = [], None
    while True:
        page = crs.list_namespaced_custom_object(G, V, NS, P, _continue=token, **kwargs) if token \
            else crs.list_namespaced_custom_object(G, V, NS, P, **kwargs)
        pages.append(page)
        token = page["metadata"].get("continue")
        if not token:
            return pages


def test_limit_and_continue_page_through_in_name_order(crs):
    for i in range(7):
        create(crs, batch(f"b{i}", {"tier": "gold" if i % 2 else "silver"}))
    pages = _pages(crs, limit=3)
    assert [[o["metadata"]["name"] for o in p["items"]] for p in pages] == [["b0", "b1", "b2"], ["b3", "b4", "b5"],
                                                                           ["b6"]]
    assert pages[0]["metadata"]["remainingItemCount"] == 4 and "remainingItemCount" not in pages[-1]["metadata"]
    assert len({p["metadata"]["resourceVersion"] for p in pages}) == 1
    gold = _pages(crs, limit=2, label_selector="tier=gold")
    assert [o["metadata"]["name"] for p in gold for o in p["items"]] == ["b1", "b3", "b5"]
    assert "remainingItemCount" not in gold[0]["metadata"]  # unknown with a selector, as the API server says


def test_continued_pages_show_the_list_as_of_the_first_page(crs):
    for i in range(4):
        create(crs, batch(f"b{i}"))
    first = crs.list_namespaced_custom_object(G, V, NS, P, limit=2)
    crs.delete_namespaced_custom_object(G, V, NS, P, "b3")  # changes after the first page...
    create(crs, batch("b9"))
    rest = crs.list_namespaced_custom_object(G, V, NS, P, limit=10, _continue=first["metadata"]["continue"])
    assert [o["metadata"]["name"] for o in rest["items"]] == ["b2", "b3"]  # ...are not seen by the same list
    assert rest["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    assert "continue" not in rest["metadata"]
    fresh = crs.list_namespaced_custom_object(G, V, NS, P)
    assert [o["metadata"]["name"] for o in fresh["items"]] == ["b0", "b1", "b2", "b9"]


def test_a_continue_token_after_compaction_is_410_and_a_bad_one_400(crs, kube_cluster):
    for i in range(3):
        create(crs, batch(f"b{i}"))
    token = crs.list_namespaced_custom_object(G, V, NS, P, limit=1)["metadata"]["continue"]
    with pytest.raises(ApiException) as bad:
        crs.list_namespaced_custom_object(G, V, NS, P, limit=1, _continue="not-a-token")
    assert bad.value.status == 400
    create(crs, batch("b7"))
    kube_cluster.call(kube_cluster.store.compact)
    with pytest.raises(ApiException) as gone:
        crs.list_namespaced_custom_object(G, V, NS, P, limit=1, _continue=token)
    assert gone.value.status == 410
