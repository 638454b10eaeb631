"""The chart's operations parts: the operator's metrics Service and ServiceMonitor, the
Grafana dashboard ConfigMap (off by default; every query uses only metric names vbatch
exports), webhook endpoints from a Secret, and the expiry settings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import helm_python as helm
import pytest
import yaml
from prometheus_client import REGISTRY
from vbatch.core import metrics

CHART = Path(__file__).resolve().parents[2] / "charts" / "vbatch"
DASHBOARD = CHART / "dashboards" / "vbatch.json"
RELEASE, NAMESPACE = "vbatch", "vbatch-system"
# PromQL words that look like metric names but are functions, keywords or label names.
PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "le", "label_values", "without", "avg", "max"}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values=None):
    rendered = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [doc for path, text in rendered.items() if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]


def named(objects, kind, suffix):
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, (kind, suffix, len(found))
    return found[0]


def _queries(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    return exprs


def _metric_names(expr: str) -> set[str]:
    expr = re.sub(r"label_values\(\s*([^,)]+?)\s*,[^)]*\)", r"\1", expr)  # label_values(metric, label)
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_labels = re.sub(r"\{[^}]*\}", "", without_strings)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_labels)
    without_groupings = re.sub(r"\b(by|without)\s*\([^)]*\)", "", without_ranges)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_groupings)) - PROMQL_WORDS
    return {w for w in words if not w.startswith("$")}


def _exported() -> set[str]:
    """Every sample name the process exports, histograms' _bucket/_count/_sum included."""
    names = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        names |= {s.name for s in family.samples}
    return names


def test_every_dashboard_query_uses_only_exported_metric_names():
    dashboard = json.loads(DASHBOARD.read_text())
    # Touch each labelled metric once so its samples (bucket/count/sum) are listed.
    metrics.REQUESTS.labels("m", "p", "completed")
    metrics.TOKENS.labels("m", "p", "input")
    metrics.DURATION.labels("m", "completed")
    metrics.QUEUE.labels("m")
    metrics.SHARD_ATTEMPTS.labels("m", "succeeded")
    metrics.ENGINE_LOADS.labels("m")
    metrics.GPU_SECONDS.labels("m", "p")
    exported = _exported() | {"vbatch_batches"}  # the gauge comes from a store collector
    used: set[str] = set()
    for expr in _queries(dashboard):
        names = _metric_names(expr)
        assert names, expr
        assert names <= exported, f"{expr} uses {names - exported}"
        used |= names
    base = {re.sub(r"_(bucket|count|sum)$", "", n) for n in used}
    assert base == set(metrics.EXPORTED_NAMES)  # and every metric of the work has a panel
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("status", "throughput", "tokens", "queue", "run time", "attempts", "engine loads"):
        assert topic in titles


def test_the_metric_name_check_can_fail():
    assert _metric_names('sum by (model) (rate(vbatch_nope_total{model=~"$model"}[5m]))') == {"vbatch_nope_total"}
    assert _metric_names("label_values(vbatch_batches, model)") == {"vbatch_batches"}


def test_dashboard_configmap_is_off_by_default_and_labelled_for_the_sidecar(chart):
    assert not any(o["metadata"]["name"].endswith("-dashboard") for o in render(chart))
    on = render(chart, {"grafanaDashboard": {"enabled": True, "namespace": "monitoring"}})
    config_map = named(on, "ConfigMap", "-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert json.loads(config_map["data"]["vbatch.json"]) == json.loads(DASHBOARD.read_text())


def test_operator_metrics_are_served_and_scraped(chart):
    objects = render(chart, {"serviceMonitor": {"enabled": True}, "operator": {"metricsPort": 9100}})
    operator = named(objects, "Deployment", "-operator")
    container = operator["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in container["ports"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["VBATCH_OPERATOR_METRICS_PORT"] == "9100"
    service = named(objects, "Service", "-operator-metrics")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert service["spec"]["selector"].items() <= operator["spec"]["template"]["metadata"]["labels"].items()
    monitor = named(objects, "ServiceMonitor", "-operator")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


def test_webhook_endpoints_come_from_a_secret_and_expiry_settings_reach_the_pods(chart):
    objects = render(chart, {"webhooks": {"existingSecret": "hooks", "allowPrivate": False},
                             "files": {"expiryMinSeconds": 60, "sweepIntervalSeconds": 30}})
    pod = named(objects, "Deployment", "-operator")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["VBATCH_WEBHOOK_ENDPOINTS_FILE"] == "/etc/vbatch/webhooks/webhooks.json"
    assert env["VBATCH_WEBHOOK_ALLOW_PRIVATE"] == "false" and env["VBATCH_EXPIRY_SWEEP_SECONDS"] == "30"
    assert {"name": "webhooks", "secret": {"secretName": "hooks", "items": [{"key": "webhooks.json", "path": "webhooks.json"}]}} in pod["volumes"]
    gateway = named(objects, "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "VBATCH_FILE_EXPIRY_MIN_SECONDS", "value": "60"} in gateway["env"]
    assert not any(v["name"] == "webhooks" for v in render(chart)[0].get("spec", {}).get("template", {}).get("spec", {}).get("volumes", []))


def test_pool_sizes_reach_the_operator_as_settings_it_reads(chart):
    from vbatch.core.config import Settings

    def operator_env(values):
        container = named(render(chart, values), "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e["value"] for e in container["env"] if e["name"].startswith(("VBATCH_POOL_", "VBATCH_WORKER_MAX"))}

    assert operator_env({})["VBATCH_WORKER_MAX_SHARDS"] == "256"
    env = operator_env({"worker": {"pool": {"maxShardsPerPod": 64, "targetShardsPerPod": 8}}})
    settings = Settings(**{k[len("VBATCH_"):].lower(): v for k, v in env.items()})
    assert settings.worker_max_shards == 64 and settings.pool_target_shards == 8
    with pytest.raises(Exception, match="maxShardsPerPod"):
        chart.render({"worker": {"pool": {"maxShardsPerPod": 0}}}, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize("bad", [{"files": {"expiryMinSeconds": 0}}, {"files": {"expiryMinSeconds": 2592001}},
                                 {"grafanaDashboard": {"enabled": "yes"}}, {"webhooks": {"allowPrivat": True}},
                                 {"operator": {"metricsPort": 70000}}])
def test_schema_rejects_bad_ops_values(chart, bad):
    with pytest.raises(helm.HelmValuesError):
        chart.render(bad, name=RELEASE, namespace=NAMESPACE)
