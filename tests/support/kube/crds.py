"""Resource definitions: the built-in kinds vbatch touches, and CRDs from YAML files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .store import ResourceSpec

CRD_RESOURCE = ("apiextensions.k8s.io", "v1", "customresourcedefinitions")


def builtin_specs() -> list[ResourceSpec]:
    return [
        ResourceSpec("", "v1", "namespaces", "Namespace", namespaced=False, singular="namespace",
                     shortnames=("ns",), status_subresource=True),
        ResourceSpec("", "v1", "pods", "Pod", singular="pod", shortnames=("po",), categories=("all",),
                     status_subresource=True),
        ResourceSpec("", "v1", "events", "Event", singular="event", shortnames=("ev",)),
        ResourceSpec("", "v1", "secrets", "Secret", singular="secret"),
        ResourceSpec("", "v1", "configmaps", "ConfigMap", singular="configmap", shortnames=("cm",)),
        ResourceSpec("", "v1", "serviceaccounts", "ServiceAccount", singular="serviceaccount", shortnames=("sa",)),
        # A Job deleted without a propagationPolicy orphans its pods: a legacy API default.
        ResourceSpec("batch", "v1", "jobs", "Job", singular="job", categories=("all",),
                     status_subresource=True, default_propagation="Orphan"),
        ResourceSpec("events.k8s.io", "v1", "events", "Event", singular="event", shortnames=("ev",)),
        ResourceSpec("coordination.k8s.io", "v1", "leases", "Lease", singular="lease"),
        ResourceSpec("rbac.authorization.k8s.io", "v1", "roles", "Role", singular="role"),
        ResourceSpec("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", singular="rolebinding"),
        ResourceSpec("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", namespaced=False,
                     singular="clusterrole"),
        ResourceSpec("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding",
                     namespaced=False, singular="clusterrolebinding"),
        ResourceSpec(*CRD_RESOURCE, "CustomResourceDefinition", namespaced=False,
                     singular="customresourcedefinition", shortnames=("crd", "crds"), status_subresource=True),
    ]


def spec_from_crd(crd: dict[str, Any]) -> list[ResourceSpec]:
    """One ResourceSpec per served version of an apiextensions.k8s.io/v1 CRD."""
    spec = crd["spec"]
    names = spec["names"]
    return [
        ResourceSpec(
            group=spec["group"],
            version=version["name"],
            plural=names["plural"],
            kind=names["kind"],
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            singular=names.get("singular", names["kind"].lower()),
            shortnames=tuple(names.get("shortNames") or ()),
            categories=tuple(names.get("categories") or ()),
            status_subresource="status" in (version.get("subresources") or {}),
            schema=(version.get("schema") or {}).get("openAPIV3Schema"),
            printer_columns=version.get("additionalPrinterColumns"),
            custom=True,
        )
        for version in spec["versions"]
        if version.get("served", True)
    ]


def load_yaml_documents(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]
