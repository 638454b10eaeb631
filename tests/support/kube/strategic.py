"""Strategic merge patch as k8s.io/apimachinery/pkg/util/strategicpatch applies it.

The patch strategy of every list is the built-in type's own, read from Kubernetes'
OpenAPI definitions (`x-kubernetes-patch-strategy`, `x-kubernetes-patch-merge-key`,
shipped with kubernetes-validate): lists with strategy `merge` merge by their key
(containers by name, conditions by type, ownerReferences by uid), lists of scalars
with `merge` (finalizers) are unions, every other list is replaced. Directives:
`$patch: replace|delete` (maps and list items), `$deleteFromPrimitiveList/<field>`,
`$retainKeys`, `$setElementOrder/<field>` (honoured as ordering).
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping
from typing import Any

SCHEMA_VERSION = "v1.32.0-local"  # the emulator's Kubernetes version
_DELETE = object()


@functools.lru_cache(maxsize=1)
def _definitions() -> dict[str, Any]:
    import importlib.resources

    root = importlib.resources.files("kubernetes_validate").joinpath("kubernetes-json-schema")
    return json.loads(root.joinpath(SCHEMA_VERSION, "_definitions.json").read_text())["$defs"]


@functools.lru_cache(maxsize=64)
def kind_schema(group: str, version: str, kind: str) -> dict[str, Any] | None:
    """The OpenAPI definition of a built-in kind, None for kinds Kubernetes does not ship."""
    for definition in _definitions().values():
        for gvk in definition.get("x-kubernetes-group-version-kind") or []:
            if (gvk.get("group", ""), gvk.get("version"), gvk.get("kind")) == (group, version, kind):
                return definition
    return None


def _resolve(schema: Mapping[str, Any] | None) -> Mapping[str, Any]:
    while schema and "$ref" in schema:
        schema = _definitions()[schema["$ref"].rsplit("/", 1)[-1]]
    return schema or {}


def _field(schema: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    schema = _resolve(schema)
    props = schema.get("properties") or {}
    if key in props:
        return props[key]
    extra = schema.get("additionalProperties")
    return extra if isinstance(extra, Mapping) else {}


def strategic_merge(original: Any, patch: Any, schema: Mapping[str, Any] | None) -> Any:
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "delete":
        return _DELETE
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    result = copy.deepcopy(dict(original)) if isinstance(original, Mapping) else {}
    orders: dict[str, list[Any]] = {}
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            if isinstance(result.get(name), list):
                result[name] = [v for v in result[name] if v not in value]
            continue
        if key.startswith("$setElementOrder/"):
            orders[key.split("/", 1)[1]] = value
            continue
        if value is None:
            result.pop(key, None)
            continue
        field = _resolve(_field(schema or {}, key)) if schema is not None else {}
        if isinstance(value, list):
            result[key] = _merge_list(result.get(key), value, field)
        elif isinstance(value, Mapping):
            merged = strategic_merge(result.get(key), value, field)
            if merged is _DELETE:
                result.pop(key, None)
            else:
                result[key] = merged
        else:
            result[key] = copy.deepcopy(value)
    for name, order in orders.items():
        field = _resolve(_field(schema or {}, name))
        result[name] = _order(result.get(name), order, field.get("x-kubernetes-patch-merge-key"))
    if "$retainKeys" in patch:
        keep = set(patch["$retainKeys"])
        result = {k: v for k, v in result.items() if k in keep}
    return result


def _merge_list(original: Any, patch: list[Any], field: Mapping[str, Any]) -> list[Any]:
    strategy = field.get("x-kubernetes-patch-strategy") or ""
    if "merge" not in strategy.split(",") or not isinstance(original, list):
        return [copy.deepcopy(v) for v in patch if not (isinstance(v, Mapping) and v.get("$patch") == "delete")]
    key = field.get("x-kubernetes-patch-merge-key")
    if key is None:  # a set of scalars (finalizers): a union, in order
        return list(original) + [v for v in patch if v not in original]
    items_schema = _resolve(field.get("items"))
    merged = [copy.deepcopy(item) for item in original]
    for item in patch:
        if not isinstance(item, Mapping):
            continue
        at = next((i for i, old in enumerate(merged) if isinstance(old, Mapping) and old.get(key) == item.get(key)),
                  None)
        if item.get("$patch") == "delete":
            if at is not None:
                del merged[at]
            continue
        if at is None:
            merged.append({k: copy.deepcopy(v) for k, v in item.items() if k != "$patch"})
        else:
            merged[at] = strategic_merge(merged[at], item, items_schema)
    return merged


def _order(items: Any, order: list[Any], key: str | None) -> Any:
    if not isinstance(items, list):
        return items
    rank = {(o.get(key) if key and isinstance(o, Mapping) else json.dumps(o, sort_keys=True)): i
            for i, o in enumerate(order)}

    def position(item: Any) -> int:
        ident = item.get(key) if key and isinstance(item, Mapping) else json.dumps(item, sort_keys=True)
        return rank.get(ident, len(rank))

    return sorted(items, key=position)
