"""Metrics of the work: what batches, requests, tokens and GPU time the service handled.

Exported by whoever drives batches (the single-node gateway's /metrics, the
operator's /metrics in a cluster), from prometheus-client's default registry.

- `BatchMetrics.on_saved` is a `BatchEvents` listener: when a save moves a batch to
  a terminal status it adds the batch's final `request_counts` and `usage` (the very
  numbers the API shows), its GPU-seconds, and observes its run and queue times.
  Counting once, at the terminal save, keeps the counters equal to the batches'
  own figures whatever restarts happened before.
- `BatchStatusCollector` computes `vbatch_batches{status,model}` from the batch store
  at scrape time, so the gauge is right after a restart.
- `engine_loaded(model)` and `shard_attempt(model, outcome)` are for the code that
  starts engines and runs shards (worker pools).

Worker figures (first result time, GPU-seconds) travel in the shards' progress
records in object storage (`core.layout.ShardProgress`), which outlive the pods.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from vbatch.core.schemas import BatchRecord, BatchStatus

log = logging.getLogger("vbatch.metrics")

# Minutes to a day: batches run from seconds (tests) to their 24 h window.
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 43200, 86400)

REQUESTS = Counter(
    "vbatch_batch_requests_total",
    "Requests of finished batches, by outcome (completed|failed): the batches' request_counts.",
    ["model", "project", "outcome"],
)
TOKENS = Counter(
    "vbatch_batch_tokens_total",
    "Tokens of finished batches, by kind (input|output|cached): the batches' usage.",
    ["model", "project", "kind"],
)
DURATION = Histogram(
    "vbatch_batch_duration_seconds",
    "Time from a batch's creation to its terminal status.",
    ["model", "status"],
    buckets=DURATION_BUCKETS,
)
QUEUE = Histogram(
    "vbatch_batch_queue_seconds",
    "Time from a batch's creation to its first result written (observed when it ends).",
    ["model"],
    buckets=DURATION_BUCKETS,
)
SHARD_ATTEMPTS = Counter(
    "vbatch_shard_attempts_total",
    "Shard runs on a worker, by outcome (succeeded|failed|stopped).",
    ["model", "outcome"],
)
ENGINE_LOADS = Counter("vbatch_engine_loads_total", "Engines (models) loaded by workers.", ["model"])
GPU_SECONDS = Counter(
    "vbatch_gpu_seconds_total",
    "Seconds of worker (engine) time spent on finished batches, for chargeback.",
    ["model", "project"],
)

# Every metric name this module exports (the dashboard test checks queries against it).
EXPORTED_NAMES = frozenset(
    {
        "vbatch_batches",
        "vbatch_batch_requests_total",
        "vbatch_batch_tokens_total",
        "vbatch_batch_duration_seconds",
        "vbatch_batch_queue_seconds",
        "vbatch_shard_attempts_total",
        "vbatch_engine_loads_total",
        "vbatch_gpu_seconds_total",
    }
)

TERMINAL_AT = {
    BatchStatus.COMPLETED: "completed_at",
    BatchStatus.FAILED: "failed_at",
    BatchStatus.EXPIRED: "expired_at",
    BatchStatus.CANCELLED: "cancelled_at",
}


def _model(record: BatchRecord) -> str:
    return record.model or "unknown"


def engine_loaded(model: str) -> None:
    """A worker loaded an engine for `model` (a process start, a pod's first shard)."""
    ENGINE_LOADS.labels(model or "unknown").inc()


def shard_attempt(model: str, outcome: str) -> None:
    """A shard run ended: outcome `succeeded`, `failed` (crashed, spent a retry) or
    `stopped` (cancel/expiry/shutdown interrupted it)."""
    SHARD_ATTEMPTS.labels(model or "unknown", outcome).inc()


def just_ended(before: BatchRecord | None, after: BatchRecord) -> bool:
    """This save is the one that moved the batch to a terminal status."""
    return after.status.is_terminal and (before is None or not before.status.is_terminal)


class BatchMetrics:
    """The BatchEvents listener that turns finished batches into counters."""

    def on_saved(self, before: BatchRecord | None, after: BatchRecord) -> None:
        if not just_ended(before, after):
            return
        model, project = _model(after), after.project
        counts = after.request_counts
        REQUESTS.labels(model, project, "completed").inc(counts.completed)
        REQUESTS.labels(model, project, "failed").inc(counts.failed)
        usage = after.usage
        if usage is not None:
            TOKENS.labels(model, project, "input").inc(usage.input_tokens)
            TOKENS.labels(model, project, "output").inc(usage.output_tokens)
            TOKENS.labels(model, project, "cached").inc(usage.input_tokens_details.cached_tokens)
        ended_at = getattr(after, TERMINAL_AT[after.status]) or after.created_at
        DURATION.labels(model, after.status.value).observe(max(0, ended_at - after.created_at))
        if after.first_result_at is not None:
            QUEUE.labels(model).observe(max(0.0, after.first_result_at - after.created_at))
        if after.gpu_seconds:
            GPU_SECONDS.labels(model, project).inc(after.gpu_seconds)


class StatusCounts(Protocol):
    def status_counts(self) -> dict[tuple[str, str | None], int]:
        """{(status, model): number of batches}, over every project."""
        ...


class BatchStatusCollector(Collector):
    """`vbatch_batches{status,model}`, read from the store when scraped."""

    def __init__(self, counts: Callable[[], dict[tuple[str, str | None], int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("vbatch_batches", "Batches by status and model.", labels=["status", "model"])
        try:
            counts = self._counts()
        except Exception:  # a scrape must not fail because the store hiccupped
            log.exception("counting batches for /metrics failed")
            counts = {}
        # Every status appears (0 when none), so a dashboard shows flat lines, not gaps.
        models = {model or "unknown" for _, model in counts} or {"unknown"}
        totals: dict[tuple[str, str], int] = {(s.value, m): 0 for s in BatchStatus for m in models}
        for (status, model), n in counts.items():
            totals[(status, model or "unknown")] = totals.get((status, model or "unknown"), 0) + n
        for (status, model), n in sorted(totals.items()):
            family.add_metric([status, model], n)
        yield family


_registered: dict[int, BatchStatusCollector] = {}


def install(events, store: StatusCounts | None, registry: CollectorRegistry = REGISTRY) -> None:
    """Subscribe the counters to `events` and export the status gauge of `store`.
    Installing again (tests build several services per process) replaces the gauge."""
    events.subscribe(BatchMetrics().on_saved)
    if store is None or not hasattr(store, "status_counts"):
        return
    old = _registered.pop(id(registry), None)
    if old is not None:
        registry.unregister(old)
    collector = BatchStatusCollector(store.status_counts)
    registry.register(collector)
    _registered[id(registry)] = collector
