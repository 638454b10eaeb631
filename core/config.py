"""Settings, read from `VBATCH_*` environment variables (pydantic-settings).

One Settings object configures every room: the gateway, the local executor, the
operator and the worker pods (the chart sets the same variables).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MB = 1024 * 1024


class Limits(BaseModel):
    max_requests_per_batch: int = 50_000
    max_file_bytes: int = 200 * MB
    max_line_bytes: int = 1 * MB
    # completion window -> seconds
    completion_windows: dict[str, int] = Field(default_factory=lambda: {"24h": 24 * 3600})
    upload_retention_seconds: int = 30 * 24 * 3600


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VBATCH_", env_nested_delimiter="__")

    # Where single-node mode keeps everything (local storage, SQLite, keys, models).
    data_dir: Path = Path("vbatch-data")

    # Object storage: a local directory or an S3/MinIO bucket.
    storage: Literal["local", "s3"] = "local"
    s3_endpoint: str = "localhost:9000"
    s3_bucket: str = "vbatch"
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_secure: bool = False
    s3_region: str | None = None
    # How long one object-store call retries a failing server before it fails.
    s3_retry_seconds: float = 30.0

    # Batch state: SQLite under data_dir (single-node) or Batch custom resources.
    batch_store: Literal["sqlite", "kubernetes"] = "sqlite"
    namespace: str = "default"
    # Cluster mode: a terminal Batch resource this many seconds past its end moves out of
    # etcd into the archive in object storage (the API still returns it); 0 keeps them all.
    batch_retention_seconds: int = Field(default=7 * 24 * 3600, ge=0)

    # Engine: "auto" picks vLLM when importable, else refuses; "echo" is the test engine.
    engine: str = "auto"
    # Echo test engine only: simulated seconds per generated token (tests, benchmarks).
    echo_delay_per_token: float = 0.0
    # Echo test engine only: its in-flight budget (vLLM's is 2 x max_num_seqs).
    echo_max_in_flight: int = 64
    # Model catalog file (YAML or JSON); see vbatch.core.catalog.
    model_catalog: Path | None = None

    # API keys: single-node keeps hashes in data_dir; clusters mount a file of hashes.
    api_keys_file: Path | None = None

    # Sharding: at most this many requests per shard, at most max_shards per batch.
    shard_target_requests: int = 2_000
    max_shards: int = 8

    # Worker flushes a result part every N results or T seconds, whichever first.
    part_max_results: int = 64
    part_max_seconds: float = 2.0
    # After SIGTERM (cancel, expiry, pod eviction), how long in-flight requests may finish.
    stop_grace_seconds: float = 10.0
    # Warm workers (single node and pool pods): shards one worker process runs at once,
    # and how long another model's work may wait before a slot drains its model to switch.
    # Enough small shards to fill the engine's in-flight budget (2 x max_num_seqs, 512 on
    # the CPU): at 32, 48 batches of 4 ran as two waves of the engine (bench/warm.py).
    # Their input windows share a fixed byte budget (vbatch.worker.serve).
    worker_max_shards: int = Field(default=256, ge=1)
    model_switch_after_seconds: float = 60.0
    # Single node: threads that carry out batch steps (validate, launch, merge) at once,
    # each batch on one thread at a time; a slow merge no longer holds up the others.
    driver_threads: int = Field(default=4, ge=1, le=64)
    # Cluster mode: "pools" = warm per-model pools of worker pods shared by every batch;
    # "jobs" = one Indexed Job per batch (a pod per shard, the model loaded per batch).
    cluster_runtime: Literal["pools", "jobs"] = "pools"
    # Cluster pools: a pool pod leaves after this long without work (scale to zero);
    # how often it reads its assignments and writes its heartbeat; a heartbeat older
    # than the lease means the pod is gone and its shards are re-assigned.
    pool_idle_seconds: float = 300.0
    pool_poll_seconds: float = 2.0
    pool_lease_seconds: float = 60.0
    # A pool grows (up to the model's max_replicas) once every member holds this many shards.
    pool_target_shards: int = 4

    # Tries per shard before it counts as failed (its lines get `shard_failed`): the
    # local runtime's attempts, the Kubernetes Job's backoffLimitPerIndex + 1.
    shard_max_attempts: int = Field(default=3, ge=1)
    # A failing driver step (storage down, a bug) is retried with exponential backoff
    # and jitter from step_retry_base_seconds up to step_retry_max_seconds; transient
    # failures end the batch after step_max_attempts tries or step_max_seconds since the
    # first failure, whichever comes first; permanent ones (unreadable data, a bug) after
    # step_permanent_attempts tries (a read cut short can look like bad data once).
    step_max_attempts: int = Field(default=20, ge=1)
    step_permanent_attempts: int = Field(default=3, ge=1)
    step_max_seconds: float = Field(default=1800.0, ge=0)
    step_retry_base_seconds: float = Field(default=1.0, ge=0)
    step_retry_max_seconds: float = Field(default=300.0, ge=0)

    # Files: the shortest expires_after a client may ask for (OpenAI's is 3600 s; at
    # most 30 days), and how often expired files are swept (gateway or operator).
    file_expiry_min_seconds: int = Field(default=3600, ge=1, le=30 * 24 * 3600)
    expiry_sweep_seconds: float = Field(default=300.0, gt=0)
    # Result (output and error) files live this long unless the batch's output_expires_after says.
    output_retention_seconds: int = Field(default=30 * 24 * 3600, ge=1, le=30 * 24 * 3600)

    # Webhooks: endpoints per project (single node: <data_dir>/webhooks.json; the chart
    # mounts a Secret), private/loopback targets refused unless allowed, and for how
    # long an undelivered event is retried (backoff) before it is dropped.
    webhook_endpoints_file: Path | None = None
    webhook_allow_private: bool = False
    webhook_retry_seconds: float = Field(default=72 * 3600, gt=0)
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    webhook_poll_seconds: float = Field(default=1.0, gt=0)
    # First retry after this many seconds, doubling per attempt up to an hour.
    webhook_backoff_seconds: float = Field(default=5.0, gt=0)

    # The operator serves its metrics (of the work) on this port at /metrics.
    operator_metrics_port: int = 8081

    limits: Limits = Field(default_factory=Limits)

    # Gateway abuse limits (a slow, hostile or unlucky client must not take capacity
    # from others). JSON bodies (create, cancel) are capped; uploads have their own cap.
    max_json_body_bytes: int = 64 * 1024
    # A request head (request line + headers) must arrive within this, and be at most
    # max_header_bytes; otherwise 408/431 and the connection is closed.
    header_timeout_seconds: float = 30.0
    max_header_bytes: int = 64 * 1024
    # A request body that sends nothing for this long is cut off (408).
    body_idle_timeout_seconds: float = 30.0
    # ... and one that trickles: after the first body_idle_timeout_seconds, the body must
    # average at least this many bytes per second (0 disables).
    body_min_bytes_per_second: int = 1024
    # Uploads streaming at once, in the whole gateway and per project; beyond them the
    # gateway answers 503 / 429 with Retry-After instead of queueing. Uploads get
    # their own pool of this many storage threads.
    max_concurrent_uploads: int = 64
    max_concurrent_uploads_per_project: int = 16
    retry_after_seconds: int = 5
    # Orphaned temporary files (writes killed mid-way) older than this are removed at
    # start-up and then every tmp_cleanup_interval_seconds.
    tmp_max_age_seconds: float = 3600.0
    tmp_cleanup_interval_seconds: float = 600.0

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "storage"


def settings_env(settings: Settings) -> dict[str, str]:
    """The VBATCH_* variables that rebuild these settings in a child process."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump(exclude={"limits"}).items():
        if value is None:
            continue
        env[f"VBATCH_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    env["VBATCH_LIMITS"] = settings.limits.model_dump_json()
    return env
