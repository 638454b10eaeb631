"""The Batch CustomResourceDefinition, generated from the model in `batch_resource`.

`python -m vbatch.core.batch_crd --write` (`make crds`) writes crds/batches.vbatch.dev.yaml
and the chart's copy; tests/unit/test_batch_resource.py fails when either differs from
what this module generates, so the CRD can never drift from the model again.

pydantic's JSON Schema is close to a Kubernetes structural schema; the differences are
folded here: no $ref (inlined), no titles, no `null` alternatives (optional fields are
simply absent), no generated defaults (only explicit ones), single-value Literals as enums.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema
from vbatch.core.batch_resource import (
    CRD_NAME,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    BatchResource,
)

PRINTER_COLUMNS = [
    {"name": "STATUS", "type": "string", "jsonPath": ".status.phase", "description": "The API status of the batch"},
    {"name": "MODEL", "type": "string", "jsonPath": ".spec.model"},
    {"name": "TOTAL", "type": "integer", "jsonPath": ".status.requestCounts.total"},
    {"name": "COMPLETED", "type": "integer", "jsonPath": ".status.requestCounts.completed"},
    {"name": "FAILED", "type": "integer", "jsonPath": ".status.requestCounts.failed"},
    {"name": "AGE", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "OUTPUT", "type": "string", "jsonPath": ".status.outputFileId", "priority": 1},
]

HEADER = """\
# GENERATED from core/batch_resource.py by `make crds` (python -m vbatch.core.batch_crd --write): do not edit.
# The Batch custom resource (the chart ships this same file). Field names are camelCase
# like every Kubernetes API; the gateway maps them to the OpenAI wire names. The schema is
# structural, so the API server prunes anything it does not declare.
"""

REPO = Path(__file__).resolve().parents[1]
CRD_FILES = (REPO / "crds" / f"{CRD_NAME}.yaml", REPO / "charts" / "vbatch" / "crds" / f"{CRD_NAME}.yaml")


class _StructuralSchema(GenerateJsonSchema):
    def default_schema(self, schema: core_schema.WithDefaultSchema) -> dict[str, Any]:
        # pydantic's defaults are Python's; the API server's defaults are explicit
        # (json_schema_extra), so a status written without counts stays without them.
        return self.generate_inner(schema["schema"])

    def nullable_schema(self, schema: core_schema.NullableSchema) -> dict[str, Any]:
        return self.generate_inner(schema["schema"])

    def literal_schema(self, schema: core_schema.LiteralSchema) -> dict[str, Any]:
        values = list(schema["expected"])
        return {"type": "string", "enum": values}

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def _fold(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_fold(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        rest = {k: v for k, v in node.items() if k != "$ref"}
        return _fold(target | rest, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs"):
            continue
        if key == "additionalProperties" and value is True:
            continue  # a free-form object is `type: object` (or preserve-unknown-fields)
        if key == "properties":
            out[key] = {name: _fold(sub, defs) for name, sub in value.items()}
        else:
            out[key] = _fold(value, defs)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    # Read like the hand-written CRDs: type and description first.
    first = {k: out.pop(k) for k in ("type", "description") if k in out}
    return first | out


def openapi_schema() -> dict[str, Any]:
    """The resource's openAPIV3Schema, from the model."""
    raw = BatchResource.model_json_schema(by_alias=True, schema_generator=_StructuralSchema)
    schema = _fold(raw, raw.get("$defs", {}))
    schema.pop("description", None)
    return schema


def crd_manifest() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME,
                     "labels": {"app.kubernetes.io/name": "vbatch", "app.kubernetes.io/part-of": "vbatch"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": SINGULAR,
                      "shortNames": list(SHORT_NAMES), "categories": ["vbatch"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                # The operator writes status through /status only, so a user editing spec can
                # never clobber counts, and status writes never bump metadata.generation.
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": openapi_schema()},
            }],
        },
    }


def render() -> str:
    return HEADER + yaml.safe_dump(crd_manifest(), sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the Batch CRD from its model.")
    parser.add_argument("--write", action="store_true", help="write crds/ and the chart's copy (else print)")
    args = parser.parse_args(argv)
    text = render()
    if not args.write:
        sys.stdout.write(text)
        return 0
    for path in CRD_FILES:
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
