"""The Helm chart as Helm renders it (helm-python-sdk: Helm's own Go library).

Shared by tests/integration/test_chart.py (the manifests themselves) and the emulated
cluster, which installs the chart's ServiceAccounts and RBAC so that the operator and
the gateway run with exactly the permissions a real install gives them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[3] / "charts" / "vbatch"
RELEASE = "vbatch"
# What a component needs from a real install to talk to the API server.
IDENTITY_KINDS = {"ServiceAccount", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}


def render(chart, values=None, *, name=RELEASE, namespace="default"):
    """Render like `helm install`: returns (objects, NOTES text)."""
    rendered = chart.render(values or {}, name=name, namespace=namespace, is_install=True)
    notes = ""
    objects = []
    for path, text in rendered.items():
        assert "<no value>" not in text, f"{path} renders a missing value"
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects, notes


@functools.lru_cache(maxsize=8)
def _identity_objects(namespace: str, release: str, values_json: str) -> str:
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        objects, _ = render(chart, json.loads(values_json), name=release, namespace=namespace)
    return json.dumps([o for o in objects if o["kind"] in IDENTITY_KINDS])


def identity_objects(namespace: str, *, release: str = RELEASE, values: dict[str, Any] | None = None) -> list[dict]:
    """The chart's ServiceAccounts, Roles, ClusterRoles and bindings for an install in `namespace`."""
    return json.loads(_identity_objects(namespace, release, json.dumps(values or {}, sort_keys=True)))


def service_account(component: str, *, release: str = RELEASE) -> str:
    """The chart's ServiceAccount name of a component (vbatch.serviceAccountName)."""
    return f"{release}-{component}"
