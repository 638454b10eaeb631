"""The model catalog: which models this deployment serves, and how to run them.

The gateway reads it to validate `body.model` at batch-create time; the operator
reads it to size GPU Jobs; the worker reads it to build the engine. It lives in core
because all three read it; preparing and syncing model files stays in the worker. One file
(YAML or JSON, `VBATCH_MODEL_CATALOG`), the same everywhere:

    models:
      - id: smollm2-135m-instruct
        path: /data/models/smollm2-135m-instruct     # or s3://bucket/prefix
        gpus_per_replica: 1
        max_replicas: 1
        max_num_seqs: 64
        engine_args: {max_model_len: 2048}

Without a file, the catalog is the bundled demo model under `data_dir/models`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The bundled demo model (`vbatch models prepare` converts it; see vbatch.worker.models).
DEMO_MODEL_ID = "smollm2-135m-instruct"


def demo_model_dir(models_dir: Path) -> Path:
    return Path(models_dir) / DEMO_MODEL_ID


class ModelSpec(BaseModel):
    # A typo in a catalog key (e.g. `max_num_seq`) must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid")

    # The name clients put in `body.model`; also vLLM's served_model_name.
    id: str = Field(min_length=1)
    # A local model directory, or an `s3://bucket/prefix` the worker syncs first.
    path: str = Field(min_length=1)
    gpus_per_replica: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    # Extra keyword arguments for vLLM's AsyncEngineArgs (passed through verbatim).
    engine_args: dict[str, Any] = Field(default_factory=dict)
    # vLLM's scheduler batch size; None keeps vLLM's default for the platform.
    max_num_seqs: int | None = Field(default=None, ge=1)

    @property
    def is_remote(self) -> bool:
        return self.path.startswith("s3://")

    @field_validator("engine_args")
    @classmethod
    def _reserved_engine_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        # These come from the spec's own fields; allowing both would make the
        # effective value depend on merge order.
        clash = {"model", "served_model_name", "max_num_seqs"} & set(value)
        if clash:
            raise ValueError(
                f"engine_args must not set {sorted(clash)}: use the spec's id/path/max_num_seqs"
            )
        return value


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec]

    @model_validator(mode="after")
    def _unique_ids(self) -> Catalog:
        seen: set[str] = set()
        for m in self.models:
            if m.id in seen:
                raise ValueError(f"model id {m.id!r} appears more than once in the catalog")
            seen.add(m.id)
        return self

    def ids(self) -> list[str]:
        return [m.id for m in self.models]

    def get(self, model_id: str) -> ModelSpec:
        for m in self.models:
            if m.id == model_id:
                return m
        served = ", ".join(self.ids()) or "(none)"
        raise KeyError(f"model {model_id!r} is not in the catalog; served models: {served}")

    def __contains__(self, model_id: object) -> bool:
        return any(m.id == model_id for m in self.models)


def default_catalog(data_dir: Path) -> Catalog:
    """The demo model, prepared by `vbatch models prepare` under `data_dir/models`."""
    path = demo_model_dir(Path(data_dir) / "models")
    return Catalog(models=[ModelSpec(id=DEMO_MODEL_ID, path=str(path))])


def load_catalog(path: Path | None, data_dir: Path) -> Catalog:
    """Read the catalog file (YAML, or JSON by `.json` suffix); default when `path` is None.

    Relative local model paths are resolved against the catalog file's directory,
    so a catalog and its models can be moved together.
    """
    if path is None:
        return default_catalog(data_dir)
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        raw = json.loads(text)
    else:
        # YAML is a superset of JSON, so this also reads JSON with another suffix.
        raw = yaml.safe_load(text)
    if raw is None:
        raw = {"models": []}
    # Accept a bare list of models as shorthand for {"models": [...]}.
    if isinstance(raw, list):
        raw = {"models": raw}
    catalog = Catalog.model_validate(raw)
    for m in catalog.models:
        if not m.is_remote and not Path(m.path).is_absolute():
            m.path = str((path.parent / m.path).resolve())
    return catalog
