"""The Helm chart (charts/vbatch) and the container images (images/), checked offline.

Helm itself renders and lints the chart (helm-python-sdk wraps Helm v4's Go library, so
this is the same engine `helm install` uses); every rendered object is validated against
Kubernetes' published schemas. No cluster and no Docker engine are needed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from kube.chart import render as render_chart

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "vbatch"
VALUES_DIR = Path(__file__).resolve().parent / "chart_values"
CRD_SOURCE = ROOT / "crds" / "batches.vbatch.dev.yaml"
CRD_IN_CHART = CHART / "crds" / "batches.vbatch.dev.yaml"

RELEASE = "vbatch"
NAMESPACE = "vbatch-system"
# The chart's minimum (backoffLimitPerIndex is on by default from 1.29), a current
# release, and the newest schemas the validator ships.
K8S_VERSIONS = sorted({"1.29.0", "1.32.0", kubernetes_validate.latest_version()})

# Kinds from CRDs, which kubernetes-validate has no schema for; checked separately.
CUSTOM_KINDS = {("kopf.dev/v1", "KopfPeering"), ("monitoring.coreos.com/v1", "ServiceMonitor")}

VALUE_SETS = {"default": {}} | {
    p.stem: yaml.safe_load(p.read_text()) for p in sorted(VALUES_DIR.glob("*.yaml"))
}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values=None, *, name=RELEASE, namespace=NAMESPACE):
    """Render like `helm install`: returns (objects, NOTES text)."""
    return render_chart(chart, values, name=name, namespace=namespace)


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def one(objects, kind, name_suffix=""):
    found = [o for o in by_kind(objects, kind) if o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {len(found)}"
    return found[0]


def config_files(objects):
    cm = one(objects, "ConfigMap", "-config")
    return (
        yaml.safe_load(cm["data"]["catalog.yaml"]),
        yaml.safe_load(cm["data"]["worker-config.yaml"]),
    )


def worker_job(objects, monkeypatch, tmp_path, *, gpus=1):
    """The Job the operator builds for a batch, with its real builder, from the chart's
    worker config file and the operator Deployment's environment."""
    from vbatch.operator.builders import build_shard_job
    from vbatch.operator.config import WorkerPodConfig

    operator = one(objects, "Deployment", "-operator")
    env = _env(operator["spec"]["template"]["spec"]["containers"][0])
    for key in list(os.environ):
        if key.startswith("VBATCH_WORKER_"):
            monkeypatch.delenv(key)
    for name, entry in env.items():
        if name.startswith("VBATCH_WORKER_") and "value" in entry:
            monkeypatch.setenv(name, entry["value"])
    config_path = Path(env["VBATCH_WORKER_CONFIG"]["value"])
    local = tmp_path / config_path.name
    local.write_text(one(objects, "ConfigMap", "-config")["data"][config_path.name])
    worker = WorkerPodConfig.from_file(local).model_copy(update={"gpus": gpus})
    return build_shard_job(
        batch_name="batch-01jtest", batch_uid="0000-1111", namespace=NAMESPACE, project="default",
        batch_id="batch_01JTEST", model="m", shard_count=2, parallelism=2, worker=worker,
        max_attempts=int(env["VBATCH_SHARD_MAX_ATTEMPTS"]["value"]),
    )


def pod_specs(objects, monkeypatch, tmp_path):
    """Every pod this release can run: the Deployments' pods and a worker pod."""
    pods = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in by_kind(objects, "Deployment")}
    pods["worker"] = worker_job(objects, monkeypatch, tmp_path)["spec"]["template"]["spec"]
    return pods


# --- lint and render -----------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_helm_lint_strict_is_clean(value_set):
    report = helm.lint(CHART, VALUE_SETS[value_set], strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    # severity 2 = warning, 3 = error; info (e.g. "icon is recommended") is not a finding.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_rendered_object_is_valid_kubernetes(chart, value_set, monkeypatch, tmp_path):
    objects, _ = render(chart, VALUE_SETS[value_set])
    assert objects
    # The worker Job the operator builds from the chart's worker config is held to the
    # same standard: everything the chart passes through must be valid Kubernetes.
    for obj in objects + [worker_job(objects, monkeypatch, tmp_path)]:
        key = (obj["apiVersion"], obj["kind"])
        if key in CUSTOM_KINDS:
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_custom_resources_are_well_formed(chart, value_set):
    objects, _ = render(chart, VALUE_SETS[value_set])
    custom = [o for o in objects if (o["apiVersion"], o["kind"]) not in _builtin_kinds(objects)]
    assert {(o["apiVersion"], o["kind"]) for o in custom} <= CUSTOM_KINDS
    peering_crd = yaml.safe_load((CHART / "crds" / "kopfpeerings.kopf.dev.yaml").read_text())
    peering_schema = peering_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for obj in custom:
        assert obj["metadata"]["name"] and obj["metadata"]["namespace"] == NAMESPACE
        if obj["kind"] == "KopfPeering":
            jsonschema.validate(obj, peering_schema)
        if obj["kind"] == "ServiceMonitor":
            (endpoint,) = obj["spec"]["endpoints"]
            assert endpoint["port"] in ("http", "metrics") and endpoint["path"] == "/metrics"


def _builtin_kinds(objects):
    return {(o["apiVersion"], o["kind"]) for o in objects} - CUSTOM_KINDS


def test_optional_objects_are_off_by_default(chart):
    objects, _ = render(chart)
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"Ingress", "ServiceMonitor", "PodDisruptionBudget"}
    # What a default install does create.
    assert {"Deployment", "Service", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Secret",
            "KopfPeering"} <= kinds
    # Namespaced through and through: nothing cluster-wide (kopf's scanning is disabled).
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}


def test_ingress_and_service_monitor_target_the_gateway(chart):
    objects, notes = render(chart, VALUE_SETS["ingress-monitoring"])
    service = one(objects, "Service", "-gateway")
    ingress = one(objects, "Ingress")
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "vbatch.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] == "http"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    monitor = one(objects, "ServiceMonitor", "-gateway")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert "https://vbatch.example.com" in notes
    pdb = one(objects, "PodDisruptionBudget")
    gateway = one(objects, "Deployment", "-gateway")
    assert pdb["spec"]["selector"] == gateway["spec"]["selector"]


def test_names_stay_within_kubernetes_limits_for_the_longest_release_name(chart):
    long_name = "a" * 53  # Helm's maximum release name length
    objects, _ = render(chart, VALUE_SETS["ingress-monitoring"], name=long_name)
    for obj in objects:
        assert len(obj["metadata"]["name"]) <= 63, obj["metadata"]["name"]
        for value in obj["metadata"].get("labels", {}).values():
            assert len(value) <= 63
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), "two objects of one kind share a name"


# --- values schema -------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"gateway": {"replicas": "2"}}, id="string-replica-count"),
        pytest.param({"operator": {"replicas": 1.5}}, id="fractional-replicas"),
        pytest.param({"replicaCount": 2}, id="unknown-top-level-key"),
        pytest.param({"gateway": {"replica": 2}}, id="unknown-nested-key"),
        pytest.param({"storage": {"endpont": "x:9000"}}, id="typo-in-storage"),
        pytest.param({"worker": {"gpuResourceName": 1}}, id="gpu-resource-not-a-string"),
        pytest.param({"worker": {"gpuResourceName": {"name": "nvidia.com/gpu"}}}, id="gpu-resource-object"),
        pytest.param({"worker": {"gpuResourceName": "gpu"}}, id="gpu-resource-without-domain"),
        pytest.param({"storage": {"endpoint": "https://s3.example.com"}}, id="endpoint-with-scheme"),
        pytest.param({"storage": {"secure": "yes"}}, id="secure-not-boolean"),
        pytest.param({"models": [{"id": "m", "path": "s3://b/m", "gpusPerReplica": -1, "maxReplicas": 1}]},
                     id="negative-gpus"),
        pytest.param({"models": [{"id": "m", "path": "relative/dir", "gpusPerReplica": 1, "maxReplicas": 1}]},
                     id="model-path-neither-s3-nor-absolute"),
        pytest.param({"models": [{"id": "m", "path": "/m", "gpusPerReplica": 1}]}, id="model-missing-field"),
        pytest.param({"models": [{"id": "m", "path": "/m", "gpusPerReplica": 1, "maxReplicas": 1, "gpus": 2}]},
                     id="model-unknown-field"),
        pytest.param({"models": [{"id": "m", "path": "/m", "gpusPerReplica": 1, "maxReplicas": 1,
                                  "vllmArgs": {"max_num_seqs": 8}}]}, id="engine-arg-owned-by-a-field"),
        pytest.param({"ingress": {"enabled": "true"}}, id="ingress-enabled-string"),
    ],
)
def test_schema_rejects_bad_values(chart, bad):
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(bad)
    # And an install with them stops before anything renders.
    with pytest.raises(helm.HelmValuesError):
        chart.render(bad, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_schema_accepts_every_shipped_value_set(chart, value_set):
    chart.validate_schema(VALUE_SETS[value_set])


def test_duplicate_model_ids_are_refused(chart):
    model = {"id": "m", "path": "s3://b/m", "gpusPerReplica": 1, "maxReplicas": 1}
    with pytest.raises(helm.HelmRenderError, match="more than once"):
        chart.render({"models": [model, dict(model, path="s3://b/other")]}, name=RELEASE)


# --- CRDs ----------------------------------------------------------------------------


def test_chart_carries_the_batch_crd_byte_for_byte():
    if not CRD_SOURCE.exists():
        pytest.skip(f"{CRD_SOURCE.relative_to(ROOT)} not written yet (the CRD is the source of truth)")
    assert CRD_IN_CHART.read_bytes() == CRD_SOURCE.read_bytes(), (
        "charts/vbatch/crds/ must hold an identical copy: cp crds/batches.vbatch.dev.yaml charts/vbatch/crds/"
    )


def test_helm_installs_the_batch_and_peering_crds(chart):
    names = {yaml.safe_load(c["data"])["metadata"]["name"] for c in chart.crds}
    assert {"batches.vbatch.dev", "kopfpeerings.kopf.dev"} <= names
    for crd in chart.crds:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(yaml.safe_load(crd["data"]), version, strict=True)


# --- pod security --------------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_pod_is_non_root_with_a_read_only_root_filesystem(chart, value_set, monkeypatch, tmp_path):
    objects, _ = render(chart, VALUE_SETS[value_set])
    pods = pod_specs(objects, monkeypatch, tmp_path)
    assert len(pods) == 3  # gateway, operator, worker
    for name, spec in pods.items():
        _assert_hardened(name, spec, read_only_root=name != "worker")


def test_worker_pods_have_a_read_only_root_filesystem(chart, monkeypatch, tmp_path):
    objects, _ = render(chart)
    spec = worker_job(objects, monkeypatch, tmp_path)["spec"]["template"]["spec"]
    _assert_hardened("worker", spec, read_only_root=True)


def _assert_hardened(name, spec, *, read_only_root):
    pod_ctx = spec["securityContext"]
    assert pod_ctx["runAsNonRoot"] is True, name
    assert pod_ctx["runAsUser"] == 10001, name  # the images' non-root user
    assert pod_ctx["seccompProfile"]["type"] == "RuntimeDefault", name
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in spec["containers"]:
        ctx = container["securityContext"]
        if read_only_root:
            assert ctx["readOnlyRootFilesystem"] is True, name
        assert ctx["allowPrivilegeEscalation"] is False, name
        assert ctx["capabilities"]["drop"] == ["ALL"], name
        assert not ctx.get("privileged"), name
        tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{name}: no writable /tmp"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_only_gateway_and_operator_get_kubernetes_api_tokens(chart, value_set, monkeypatch, tmp_path):
    objects, _ = render(chart, VALUE_SETS[value_set])
    accounts = {sa["metadata"]["name"]: sa for sa in by_kind(objects, "ServiceAccount")}
    pods = pod_specs(objects, monkeypatch, tmp_path)
    worker = pods.pop("worker")
    assert worker["automountServiceAccountToken"] is False
    assert accounts[worker["serviceAccountName"]]["automountServiceAccountToken"] is False
    assert {p["serviceAccountName"] for p in pods.values()} == {
        f"{RELEASE}-gateway", f"{RELEASE}-operator"
    }


def test_gateway_probes_health_and_readiness(chart):
    objects, _ = render(chart)
    (container,) = one(objects, "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["command"] + container["args"] == [
        "vbatch", "serve", "--host", "0.0.0.0", "--port", "8000"]
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in container["ports"]
    assert container["resources"]["requests"] and container["resources"]["limits"]


# --- RBAC ----------------------------------------------------------------------------


def _rules_by_account(objects):
    """{serviceaccount: {"namespaced"|"cluster": {(group, resource): sorted verbs}}}."""
    roles = {(r["kind"], r["metadata"]["name"]): r for r in objects if r["kind"] in ("Role", "ClusterRole")}
    granted: dict[str, dict[str, dict]] = {}
    bound = set()
    for binding in objects:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        ref = (binding["roleRef"]["kind"], binding["roleRef"]["name"])
        assert ref in roles, f"{binding['metadata']['name']} binds a role the chart does not ship"
        bound.add(ref)
        scope = "cluster" if binding["kind"] == "ClusterRoleBinding" else "namespaced"
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount" and subject["namespace"] == NAMESPACE
            table = granted.setdefault(subject["name"], {}).setdefault(scope, {})
            for rule in roles[ref]["rules"]:
                assert "resourceNames" not in rule and "nonResourceURLs" not in rule
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        assert "*" not in (group, resource) and "*" not in rule["verbs"]
                        key = (group, resource)
                        table[key] = sorted(set(table.get(key, [])) | set(rule["verbs"]))
    assert bound == set(roles), "a role is rendered but bound to nobody"
    return granted


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rbac_is_exactly_the_least_privilege_expectations(chart, value_set):
    expected_doc = yaml.safe_load((CHART / "rbac-expectations.yaml").read_text())
    objects, _ = render(chart, VALUE_SETS[value_set])
    granted = _rules_by_account(objects)
    for component, scopes in expected_doc.items():
        account = f"{RELEASE}-{component}"
        for scope in ("namespaced", "cluster"):
            expected = {(r["apiGroup"], r["resource"]): sorted(r["verbs"]) for r in scopes[scope]}
            actual = granted.get(account, {}).get(scope, {})
            assert actual == expected, f"{account} {scope}"
    assert set(granted) <= {f"{RELEASE}-{c}" for c in expected_doc}
    # The namespaced grants really are namespaced: Roles in the release namespace only.
    for role in by_kind(objects, "Role") + by_kind(objects, "RoleBinding"):
        assert role["metadata"]["namespace"] == NAMESPACE


# --- configuration the components read ------------------------------------------------

# Env the chart sets that no settings class reads yet: the operator's entry point
# (vbatch.operator.main, not written yet) must load WorkerPodConfig from this file.
PENDING_ENV = {"VBATCH_WORKER_CONFIG"}
STORAGE_SECRET = {"VBATCH_S3_ACCESS_KEY": "AK", "VBATCH_S3_SECRET_KEY": "SK"}


def _env(container):
    return {e["name"]: e for e in container.get("env", [])}


def _resolved_env(container):
    """The environment the container would see, with the storage Secret holding STORAGE_SECRET."""
    out = {}
    for source in container.get("envFrom", []):
        out.update(STORAGE_SECRET)
        assert set(source) == {"secretRef"}
    for name, entry in _env(container).items():
        if "value" in entry:
            out[name] = entry["value"]
        elif "secretKeyRef" in entry["valueFrom"]:
            out[name] = STORAGE_SECRET[entry["valueFrom"]["secretKeyRef"]["key"]]
        else:
            field = entry["valueFrom"]["fieldRef"]["fieldPath"]
            out[name] = {"metadata.namespace": NAMESPACE, "metadata.name": "pod-0"}[field]
    return out


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_component_gets_settings_core_understands(chart, value_set, monkeypatch, tmp_path):
    from vbatch.core.config import Settings
    from vbatch.operator.config import WorkerPodConfig

    values = VALUE_SETS[value_set]
    objects, _ = render(chart, values)
    storage = chart.merge_values(values)["storage"]
    containers = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]
                  for d in by_kind(objects, "Deployment")}
    job = worker_job(objects, monkeypatch, tmp_path)
    containers["worker"] = job["spec"]["template"]["spec"]["containers"][0]
    worker_fields = {"VBATCH_WORKER_" + f.upper() for f in WorkerPodConfig.model_fields}
    for name, container in containers.items():
        env = _resolved_env(container)
        ours = {k for k in env if k.startswith("VBATCH_")}
        core = {"VBATCH_" + f.upper() for f in Settings.model_fields}
        assert ours - core - worker_fields - PENDING_ENV == set(), name
        for key in list(os.environ):
            if key.startswith("VBATCH_"):
                monkeypatch.delenv(key)
        for key in ours & core:
            monkeypatch.setenv(key, env[key])
        settings = Settings()
        assert settings.storage == "s3", name
        assert settings.s3_endpoint == storage["endpoint"] and settings.s3_bucket == storage["bucket"]
        assert settings.s3_secure is storage["secure"]
        assert settings.s3_region == (storage["region"] or None)
        assert (settings.s3_access_key, settings.s3_secret_key) == ("AK", "SK"), name
        assert str(settings.model_catalog) == "/etc/vbatch/config/catalog.yaml"
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/etc/vbatch/config" in mounts, name
        if name != "worker":
            assert settings.batch_store == "kubernetes" and settings.namespace == NAMESPACE
        if name.endswith("-gateway"):
            assert settings.api_keys_file.parent.as_posix() in mounts


def test_storage_credentials_come_from_the_existing_secret(chart, monkeypatch, tmp_path):
    objects, _ = render(chart, VALUE_SETS["external-s3"])
    secrets = [s["metadata"]["name"] for s in by_kind(objects, "Secret")]
    assert secrets == [], "existing secrets given: the chart must not create its own"
    for deployment in by_kind(objects, "Deployment"):
        env = _env(deployment["spec"]["template"]["spec"]["containers"][0])
        ref = env["VBATCH_S3_SECRET_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "vbatch-s3-credentials", "key": "VBATCH_S3_SECRET_KEY"}
        assert env["SSL_CERT_FILE"]["value"] == "/etc/vbatch/ca/ca.crt"
    worker = worker_job(objects, monkeypatch, tmp_path)["spec"]["template"]["spec"]
    (container,) = worker["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": "vbatch-s3-credentials"}}]
    assert _env(container)["SSL_CERT_FILE"]["value"] == "/etc/vbatch/ca/ca.crt"
    assert any(v.get("configMap", {}).get("name") == "corp-ca" for v in worker["volumes"])
    gateway = one(objects, "Deployment", "-gateway")["spec"]["template"]["spec"]
    keys_volume = next(v for v in gateway["volumes"] if v["name"] == "api-keys")
    assert keys_volume["secret"]["secretName"] == "vbatch-api-keys-managed"
    env = _env(gateway["containers"][0])
    assert env["VBATCH_API_KEYS_FILE"]["value"] == "/etc/vbatch/keys/keys.txt"


def test_catalog_lists_models_with_their_gpu_counts(chart, monkeypatch, tmp_path):
    objects, _ = render(chart, VALUE_SETS["two-models"])
    catalog, _ = config_files(objects)
    assert catalog == {"models": [
        {"id": "small-1gpu", "path": "s3://models/small", "gpus_per_replica": 1, "max_replicas": 4,
         "engine_args": {"max_model_len": 8192, "gpu_memory_utilization": 0.9}},
        {"id": "large-4gpu", "path": "s3://models/large", "gpus_per_replica": 4, "max_replicas": 2,
         "max_num_seqs": 64,
         "engine_args": {"tensor_parallel_size": 4, "max_model_len": 131072,
                         "enable_prefix_caching": True, "dtype": "bfloat16"}},
    ]}
    # A 4-GPU model's worker asks the device plugin the chart names (AMD here) for 4.
    pod = worker_job(objects, monkeypatch, tmp_path, gpus=4)["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["amd.com/gpu"] == 4
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_catalog_loads_with_the_catalog_loader_components_use(chart, value_set, tmp_path):
    from vbatch.core.catalog import load_catalog

    values = VALUE_SETS[value_set]
    catalog_text = one(render(chart, values)[0], "ConfigMap", "-config")["data"]["catalog.yaml"]
    (tmp_path / "catalog.yaml").write_text(catalog_text)
    catalog = load_catalog(tmp_path / "catalog.yaml", tmp_path)
    assert catalog.ids() == [m["id"] for m in values.get("models", [])]
    for model in values.get("models", []):
        spec = catalog.get(model["id"])
        assert (spec.path, spec.gpus_per_replica, spec.max_replicas) == (
            model["path"], model["gpusPerReplica"], model["maxReplicas"])
        assert spec.max_num_seqs == model.get("maxNumSeqs")


def test_engine_arguments_pass_through_unchanged(chart):
    # Helm holds numbers as floats; large integers must not come out as 1e+07 or 1.0e7.
    args = {"max_num_batched_tokens": 10_000_000, "seed": 123456789012, "swap_space": 0.5,
            "enforce_eager": False, "quantization": "fp8", "limit_mm_per_prompt": {"image": 2}}
    model = {"id": "m", "path": "/m", "gpusPerReplica": 1, "maxReplicas": 1, "vllmArgs": args}
    catalog, _ = config_files(render(chart, {"models": [model]})[0])
    assert catalog["models"][0]["engine_args"] == args
    assert "max_num_seqs" not in catalog["models"][0]  # unset: vLLM's own default


def test_worker_jobs_carry_kueue_and_gpu_scheduling(chart, monkeypatch, tmp_path):
    objects, _ = render(chart, VALUE_SETS["kueue"])
    job = worker_job(objects, monkeypatch, tmp_path)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["suspend"] is True  # Kueue admits it
    assert job["spec"]["backoffLimitPerIndex"] == 4
    pod = job["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["serviceAccountName"] == f"{RELEASE}-worker"
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/vbatch/vbatch-worker:0.1.0"
    assert container["resources"]["requests"] == {"cpu": "8", "memory": "64Gi"}
    assert container["resources"]["limits"] == {"memory": "64Gi", "nvidia.com/gpu": 1}
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "model-cache" for v in pod["volumes"])
    env = _resolved_env(container)
    assert env["VBATCH_S3_ENDPOINT"] == "minio.storage.svc:9000"
    assert env["VLLM_LOGGING_LEVEL"] == "INFO"
    # Caches point at writable volumes, not the image's root filesystem.
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for var in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "VLLM_CACHE_ROOT"):
        assert any(env[var] == m or env[var].startswith(m + "/") for m in mounts), var
    # Without Kueue the Job is created running.
    objects, _ = render(chart)
    assert "suspend" not in worker_job(objects, monkeypatch, tmp_path)["spec"]


def test_operator_is_namespaced_and_peers_through_the_shipped_peering_object(chart):
    objects, _ = render(chart)
    deployment = one(objects, "Deployment", "-operator")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    peering = one(objects, "KopfPeering")
    assert container["command"] == ["vbatch"] and container["args"][0] == "operator"
    assert f"--namespace={NAMESPACE}" in container["args"]
    assert f"--peering={peering['metadata']['name']}" in container["args"]
    assert peering["metadata"]["namespace"] == NAMESPACE
    assert _env(container)["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # One replica: Recreate, so an upgrade never has two same-priority peers pausing each other.
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    objects, _ = render(chart, VALUE_SETS["kueue"])  # operator.replicas: 2
    deployment = one(objects, "Deployment", "-operator")
    assert deployment["spec"]["replicas"] == 2 and "strategy" not in deployment["spec"]


# --- API keys ------------------------------------------------------------------------


def test_generated_api_key_is_stored_only_as_its_hash_and_shown_once_in_notes(chart):
    objects, notes = render(chart)
    secret = one(objects, "Secret", "-api-keys")
    line = base64.b64decode(secret["data"]["api-keys"]).decode()
    match = re.fullmatch(r"sha256:([0-9a-f]{64}) default\n", line)
    assert match, line
    keys = re.findall(r"VBATCH_API_KEY=(vb-[A-Za-z0-9]+)", notes)
    assert len(keys) == 1
    (key,) = keys
    assert len(key) >= 40
    assert hashlib.sha256(key.encode()).hexdigest() == match.group(1)
    # The same line core's key store writes, so the gateway accepts the key.
    from vbatch.core.keys import hash_key
    assert line.split()[0] == hash_key(key)
    # The key text appears nowhere but NOTES.
    rendered_manifests = json.dumps(objects)
    assert key not in rendered_manifests
    assert "VBATCH_PROJECT=default" in notes
    # And the gateway mounts exactly that Secret at the file it is told to read.
    gateway = one(objects, "Deployment", "-gateway")["spec"]["template"]["spec"]
    volume = next(v for v in gateway["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]


def test_each_install_generates_a_different_key(chart):
    first = render(chart)[1]
    second = render(chart)[1]
    assert re.findall(r"vb-\w+", first) != re.findall(r"vb-\w+", second)


class _FakeApiServer(BaseHTTPRequestHandler):
    """Just enough of the Kubernetes API for Helm's `lookup` of one Secret: the v1
    discovery document and GET of the objects in `objects` (path -> body)."""

    objects: dict[str, dict] = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/api/v1":
            body, code = {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
                {"name": "secrets", "singularName": "secret", "namespaced": True, "kind": "Secret",
                 "verbs": ["get", "list"]}]}, 200
        elif path in self.objects:
            body, code = self.objects[path], 200
        else:
            body, code = {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                          "reason": "NotFound", "code": 404}, 404
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def api_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeApiServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    _FakeApiServer.objects = {}


def test_upgrade_keeps_the_key_generated_at_install(chart, api_server):
    installed, install_notes = render(chart)
    installed_secret = one(installed, "Secret", "-api-keys")
    (key,) = re.findall(r"VBATCH_API_KEY=(vb-[A-Za-z0-9]+)", install_notes)
    name = installed_secret["metadata"]["name"]
    _FakeApiServer.objects = {f"/api/v1/namespaces/{NAMESPACE}/secrets/{name}": installed_secret}

    host, port = api_server.server_address
    with helm.Config(kube_apiserver=f"http://{host}:{port}", kube_token="test", namespace=NAMESPACE) as cfg:
        rendered = cfg.render(chart, {}, name=RELEASE, namespace=NAMESPACE, is_upgrade=True)
    upgraded = [d for p, t in rendered.items() if not p.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]
    notes = next(t for p, t in rendered.items() if p.endswith("NOTES.txt"))
    assert one(upgraded, "Secret", "-api-keys")["data"] == installed_secret["data"]
    assert "VBATCH_API_KEY=" not in notes and "unchanged" in notes
    assert key not in json.dumps(upgraded)


def test_existing_api_key_secret_means_no_generated_key(chart):
    objects, notes = render(chart, VALUE_SETS["external-s3"])
    assert not [s for s in by_kind(objects, "Secret") if s["metadata"]["name"].endswith("-api-keys")]
    assert "VBATCH_API_KEY=" not in notes
    assert "vbatch-api-keys-managed" in notes


def test_notes_give_the_quickstart(chart):
    _, notes = render(chart, VALUE_SETS["two-models"])
    assert f"kubectl -n {NAMESPACE} port-forward svc/{RELEASE}-gateway 8000:8000" in notes
    assert "curl" in notes and "/v1/files" in notes and "/v1/batches" in notes
    assert 'default_headers={"x-project-id"' in notes and "OpenAI(base_url=" in notes
    assert f"kubectl -n {NAMESPACE} get batches" in notes
    assert "WARNING" not in notes  # models and credentials are configured here
    _, default_notes = render(chart)
    assert "no models are configured" in default_notes


# --- images --------------------------------------------------------------------------


def _dockerfile(path):
    """Instructions of a Dockerfile as (INSTRUCTION, argument) with continuations joined."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\") if current else stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            lines.append(current)
            current = ""
    assert not current, f"{path}: dangling line continuation"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _exec_form(argument):
    argument = argument.strip()
    assert argument.startswith("["), f"use the exec form (signals reach the process): {argument}"
    return json.loads(argument)


IMAGES = {
    "gateway": (ROOT / "images" / "gateway.Dockerfile", ["vbatch"]),
    "worker": (ROOT / "images" / "worker.Dockerfile", ["vbatch", "worker"]),
    "worker-cpu": (ROOT / "images" / "worker-cpu.Dockerfile", ["vbatch", "worker"]),
}


def _arg_defaults(instructions):
    """`ARG NAME=default` values, which FROM lines may name as ${NAME}."""
    defaults = {}
    for instruction, argument in instructions:
        if instruction == "ARG":
            for word in argument.split():
                name, eq, value = word.partition("=")
                if eq:
                    defaults[name] = value
    return defaults


@pytest.mark.parametrize("image", IMAGES)
def test_dockerfile_is_pinned_non_root_and_runs_vbatch(image):
    path, entrypoint = IMAGES[image]
    instructions = _dockerfile(path)
    defaults = _arg_defaults(instructions)
    stages = set()
    for instruction, argument in instructions:
        if instruction == "FROM":
            words = argument.split()
            ref = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], words[0])
            if len(words) >= 3 and words[1].lower() == "as":
                stages.add(words[2])
            if ref in stages or ref == "scratch":  # a multi-stage reference or an empty stage
                continue
            name, _, tag = ref.rpartition(":") if ":" in ref.split("/")[-1] else (ref, "", "")
            assert tag or "@sha256:" in ref, f"{path.name}: {ref} is not pinned"
            assert tag != "latest", f"{path.name}: {ref} uses latest"
            assert re.search(r"\d", tag), f"{path.name}: {ref} tag names no version"
    users = [argument.split(":")[0].strip() for instruction, argument in instructions if instruction == "USER"]
    assert users, f"{path.name} has no USER line"
    # The last USER wins; numeric, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
    assert users[-1].isdigit() and int(users[-1]) != 0
    assert int(users[-1]) == 10001  # what the chart's podSecurityContext runs as
    entry = [_exec_form(arg) for ins, arg in instructions if ins == "ENTRYPOINT"]
    assert entry and entry[-1] == entrypoint
    assert not any("latest" in shlex.split(arg) for ins, arg in instructions if ins == "FROM")


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", ".git", "vbatch-data"):
        assert any(line.strip("/*") == entry for line in ignored), entry


@pytest.mark.parametrize("image", IMAGES)
def test_dockerfile_copies_every_folder_of_the_package(image):
    import tomllib

    folders = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    instructions = _dockerfile(IMAGES[image][0])
    copied = {_exec_form(arg)[0] if arg.startswith("[") else arg.split()[0]
              for ins, arg in instructions if ins == "COPY" and not arg.startswith("--from")}
    # A bind mount of the whole build context (no source=) brings every folder, minus .dockerignore.
    if any(ins == "RUN" and re.search(r"--mount=type=bind,target=\S+", arg) for ins, arg in instructions):
        copied |= folders
    assert folders <= copied, f"{image} image misses {sorted(folders - copied)}"


def test_images_take_ca_bundles_as_build_secrets_never_as_files():
    """A CA bundle (SSL_CERT_FILE/PIP_CERT at build time) reaches pip as a build secret,
    mounted for one RUN step; no COPY/ADD of certificates, no cert baked into ENV."""
    for image in ("gateway", "worker-cpu"):
        instructions = _dockerfile(IMAGES[image][0])
        pip_steps = [arg for ins, arg in instructions if ins == "RUN" and "pip install" in arg]
        assert pip_steps and all("--mount=type=secret,id=ca-bundle" in arg for arg in pip_steps), image
        for ins, arg in instructions:
            if ins in {"COPY", "ADD", "ENV"}:
                assert not re.search(r"cert|\.crt|\.pem|ca-bundle", arg, re.I), (image, ins, arg)
