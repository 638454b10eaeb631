"""How the operator shapes worker pods: image, GPUs, scheduling, credentials.

Read from `VBATCH_WORKER_*` environment variables (the chart sets them; structured
values such as tolerations are JSON), or from a JSON/YAML file whose keys are the
field names. Everything Kubernetes-shaped (tolerations, volumes, ...) is passed
through verbatim: the chart's values already speak the Kubernetes schema, and
re-modelling it here would only drift from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"


class WorkerPodConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VBATCH_WORKER_", extra="forbid")

    image: str = "ghcr.io/vbatch/vbatch:latest"
    image_pull_policy: str | None = None
    image_pull_secrets: list[str] = Field(default_factory=list)
    # GPUs per shard pod; 0 runs vLLM's CPU build (CI, laptops) and asks for no device.
    gpus: int = Field(default=1, ge=0)
    gpu_resource_name: str = DEFAULT_GPU_RESOURCE
    # Extra requests/limits, e.g. {"requests": {"memory": "16Gi"}, "limits": {"memory": "24Gi"}}.
    resources: dict[str, dict[str, str | int]] = Field(default_factory=dict)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    runtime_class_name: str | None = None
    service_account_name: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    # Secrets (by name) whose keys become env vars: storage credentials live there.
    env_from_secrets: list[str] = Field(default_factory=list)
    volumes: list[dict[str, Any]] = Field(default_factory=list)
    volume_mounts: list[dict[str, Any]] = Field(default_factory=list)
    # vLLM's workers share tensors through /dev/shm; the container default (64Mi) is too small.
    shm_size: str | None = "1Gi"
    # Workers write only to /tmp (an emptyDir the builder adds when none is configured)
    # and to object storage; everything else stays read-only.
    read_only_root_filesystem: bool = True
    # Pods must not run as root; images whose USER is root still start with this uid.
    run_as_user: int | None = 1000
    # The worker flushes its current result part on SIGTERM; give it time to.
    termination_grace_period_seconds: int = Field(default=60, ge=0)
    kueue_queue_name: str | None = None
    # Evictions and preemptions (DisruptionTarget) do not spend a shard's retries:
    # the worker exits 75 after flushing, and the retried pod resumes.
    pod_failure_policy: dict[str, Any] | None = Field(
        default_factory=lambda: {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]}
    )

    @classmethod
    def from_file(cls, path: str | Path) -> WorkerPodConfig:
        """Load from JSON or YAML; environment variables still fill what the file leaves out."""
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        return cls(**(data or {}))
