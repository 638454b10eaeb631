"""What the API server does to bodies: patches, CRD structural schemas, printer tables.

Pure functions over plain dicts, shared by the emulator's store and its HTTP layer.
"""

from __future__ import annotations

import copy
import datetime
from collections.abc import Mapping
from typing import Any

import jsonpatch
import jsonschema

from .strategic import strategic_merge


class PatchError(ValueError):
    """The patch cannot apply (422 Unprocessable Entity, as the API server answers)."""


# --- patches -------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge, null deletes, everything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def apply_patch(content_type: str, target: dict[str, Any], patch: Any,
                schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Apply a patch of this content type; `schema` is the built-in kind's OpenAPI
    definition, which carries the patch strategies a strategic merge follows."""
    ctype = content_type.split(";")[0].strip().lower()
    if ctype == "application/json-patch+json":
        if not isinstance(patch, list):
            raise PatchError("a JSON patch must be a list of operations")
        try:
            return jsonpatch.apply_patch(target, patch, in_place=False)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            raise PatchError(f"the JSON patch does not apply: {exc}") from exc
    if not isinstance(patch, Mapping):
        raise PatchError("a merge patch must be a JSON object")
    if ctype == "application/strategic-merge-patch+json":
        return strategic_merge(target, patch, schema)
    if ctype in ("application/merge-patch+json", "application/json"):
        return merge_patch(target, patch)
    raise NotImplementedError(f"unsupported patch type: {ctype}")


# --- CRD structural schemas --------------------------------------------------------


def apply_defaults(schema: Mapping[str, Any], value: Any) -> Any:
    """Fill `default`s of absent properties, recursively (as the API server does on write)."""
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            for key in set(value) - set(props):
                value[key] = apply_defaults(extra, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def prune(schema: Mapping[str, Any], value: Any, *, root: bool = True) -> Any:
    """Drop fields the structural schema does not declare (silently, like the API server)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return value
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        out = {}
        for key, item in value.items():
            if root and key in ("apiVersion", "kind", "metadata"):
                out[key] = item  # never pruned: the API server owns these
            elif key in props:
                out[key] = prune(props[key], item, root=False)
            elif isinstance(extra, Mapping):
                out[key] = prune(extra, item, root=False)
            elif extra is True:
                out[key] = item
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [prune(schema["items"], item, root=False) for item in value]
    return value


def _to_jsonschema(schema: Any) -> Any:
    # OpenAPI v3 as used by CRDs is JSON Schema plus `nullable` and x-kubernetes-* keys.
    if isinstance(schema, list):
        return [_to_jsonschema(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: _to_jsonschema(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if schema.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    out.pop("nullable", None)
    return out


def schema_errors(schema: Mapping[str, Any], obj: Mapping[str, Any]) -> list[str]:
    """Validation messages for `obj` against a CRD version's openAPIV3Schema (empty: valid)."""
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    validator = jsonschema.Draft7Validator(_to_jsonschema(schema))
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
    ]


# --- printer columns (server-side `kubectl get` tables) ---------------------------


def jsonpath(obj: Any, path: str) -> Any:
    """The simple `.a.b.c` JSONPaths that printer columns use."""
    value = obj
    for part in path.strip().lstrip(".").split("."):
        if not part:
            continue
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def human_age(timestamp: str | None, now: datetime.datetime | None = None) -> str | None:
    """`2024-...Z` -> `5s`/`3m`/`2h`/`4d`, like the API server renders date columns."""
    if not timestamp:
        return None
    then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    seconds = int(((now or datetime.datetime.now(datetime.timezone.utc)) - then).total_seconds())
    seconds = max(seconds, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


DEFAULT_COLUMNS = [
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def build_table(objects: list[dict[str, Any]], columns: list[dict[str, Any]] | None, resource_version: str) -> dict:
    """A meta.k8s.io/v1 Table: what kubectl asks for (`Accept: ...;as=Table`) and prints."""
    columns = columns if columns is not None else DEFAULT_COLUMNS
    definitions = [{"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}]
    definitions += [
        {
            "name": c["name"],
            "type": c.get("type", "string"),
            "format": c.get("format", ""),
            "description": c.get("description", ""),
            "priority": c.get("priority", 0),
        }
        for c in columns
    ]
    rows = []
    for obj in objects:
        cells: list[Any] = [obj["metadata"]["name"]]
        for c in columns:
            value = jsonpath(obj, c["jsonPath"])
            cells.append(human_age(value) if c.get("type") == "date" else value)
        meta = {k: v for k, v in obj["metadata"].items() if k != "managedFields"}
        rows.append(
            {
                "cells": cells,
                "object": {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": meta},
            }
        )
    return {
        "apiVersion": "meta.k8s.io/v1",
        "kind": "Table",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": definitions,
        "rows": rows,
    }
