"""The Batch resource is defined once (vbatch.core.batch_resource): the committed CRDs are
what the model generates, and the model and the CRD's schema agree on every field."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import ValidationError
from vbatch.core import batch_crd
from vbatch.core.batch_resource import (
    BatchResource,
    BatchSpec,
    BatchStatusFields,
    record_from_resource,
    resource_from_record,
)
from vbatch.core.ids import new_batch_id
from vbatch.core.projects import PROJECT_ID_PATTERN
from vbatch.core.schemas import BatchRecord, BatchStatus

REPO = Path(__file__).resolve().parents[2]
COMMITTED = [REPO / "crds" / "batches.vbatch.dev.yaml", REPO / "charts" / "vbatch" / "crds" / "batches.vbatch.dev.yaml"]


@pytest.mark.parametrize("path", COMMITTED, ids=["crds", "chart"])
def test_committed_crd_is_the_generated_one(path: Path):
    # On failure: run `make crds` and commit the result.
    assert path.read_text(encoding="utf-8") == batch_crd.render()
    assert yaml.safe_load(path.read_text(encoding="utf-8")) == batch_crd.crd_manifest()


def _schema() -> dict:
    return batch_crd.crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_every_model_field_is_in_the_schema_and_nothing_else():
    props = _schema()["properties"]
    for model, key in ((BatchSpec, "spec"), (BatchStatusFields, "status")):
        aliases = {f.alias or name for name, f in model.model_fields.items()}
        assert set(props[key]["properties"]) == aliases, key
    assert set(props) == {f.alias or n for n, f in BatchResource.model_fields.items()}
    assert props["spec"]["properties"]["project"]["pattern"] == PROJECT_ID_PATTERN


def test_the_kubectl_surface_is_kept():
    crd = batch_crd.crd_manifest()
    version = crd["spec"]["versions"][0]
    assert crd["spec"]["names"]["shortNames"] == ["vb"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["STATUS"] == ".status.phase" and columns["TOTAL"] == ".status.requestCounts.total"
    conditions = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == ["type"]


def _record(**overrides) -> BatchRecord:
    fields = dict(id=new_batch_id(), endpoint="/v1/chat/completions", input_file_id="file-abc",
                  completion_window="24h", status=BatchStatus.IN_PROGRESS, created_at=1_700_000_000, project="acme",
                  metadata={"k": "v"}, shard_count=2, in_progress_at=1_700_000_001)
    return BatchRecord(**(fields | overrides))


def test_what_the_model_writes_the_schema_accepts():
    obj = resource_from_record(_record(), "ns")
    jsonschema.validate(obj, _schema())
    assert record_from_resource(obj) == _record(id=record_from_resource(obj).id)


@pytest.mark.parametrize("spec_change", [
    {"project": "a/b"}, {"project": ""}, {"project": "x" * 65}, {"inputFileId": "nope"},
    {"endpoint": "/v1/embeddings"}, {"completionWindow": "1h"}, {"shards": 0},
    {"metadata": {f"k{i}": "v" for i in range(17)}}, {"metadata": {"k": "v" * 513}},
])
def test_model_and_schema_refuse_the_same_specs(spec_change):
    obj = resource_from_record(_record(), "ns")
    obj["spec"].update(spec_change)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(obj, _schema())
    with pytest.raises(ValidationError):
        record_from_resource(obj)


def test_camel_case_aliases_are_the_wire_names_of_the_resource():
    spec = BatchSpec.model_validate({"inputFileId": "file-x", "endpoint": "/v1/chat/completions",
                                     "completionWindow": "24h", "project": "p", "cancelRequested": True})
    assert spec.input_file_id == "file-x" and spec.cancel_requested is True
    assert "inputFileId" in spec.model_dump(by_alias=True)
