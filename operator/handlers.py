"""The kopf handlers: thin adapters from kopf's events to the one driver
(`vbatch.core.driver`), over Batch resources and the Kubernetes shard runtime.

Every trigger — a Batch created, the operator (re)starting, spec.cancelRequested
flipping, a periodic tick — does the same thing: `driver.drive(...)` re-reads the
Batch and its Job and takes the next steps of the state machine. The triggers only
decide *when*.

`kopf run -m vbatch.operator.handlers` (what `vbatch operator` and the tests run).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf
import prometheus_client
from vbatch.core.config import Settings
from vbatch.core.driver import Driver
from vbatch.core.events import BatchEvents
from vbatch.core.files import FileService
from vbatch.core.ids import batch_id_from_object_name
from vbatch.core.operations import Operations, build_operations
from vbatch.core.schemas import TERMINAL_STATUSES
from vbatch.core.storage import open_store
from vbatch.operator.archive import BatchArchiver
from vbatch.operator.builders import GROUP, PLURAL, VERSION, missing_labels
from vbatch.operator.config import WorkerPodConfig
from vbatch.operator.kube import Kube, api_client
from vbatch.operator.kube_batches import KubeAnnouncer, KubeBatches
from vbatch.operator.kube_runtime import KubeRuntime

log = logging.getLogger("vbatch.operator")

# Seconds between reconciles of a running batch: how fresh `kubectl get batches`
# counts are, and how soon a finished Job is noticed. Read once, at import, because
# kopf takes it from the decorator.
INTERVAL = float(os.environ.get("VBATCH_OPERATOR_INTERVAL", "3"))
# Seconds between archive checks of a finished batch (its retention is a setting).
ARCHIVE_INTERVAL = float(os.environ.get("VBATCH_ARCHIVE_INTERVAL", "60"))
FINALIZER = "vbatch.dev/working-data"
_TERMINAL = frozenset(s.value for s in TERMINAL_STATUSES)


def load_worker_config() -> WorkerPodConfig:
    path = os.environ.get("VBATCH_WORKER_CONFIG")
    return WorkerPodConfig.from_file(path) if path else WorkerPodConfig()


def build_driver(settings: Settings | None = None, events: BatchEvents | None = None) -> Driver:
    settings = settings or Settings()
    store = open_store(settings)
    served, gpus = _catalog(settings)
    kube = Kube(api_client("operator"), settings.namespace)
    events = events or BatchEvents()
    events.subscribe(KubeAnnouncer(kube))  # `kubectl describe batch`: an Event per phase and failed step
    return Driver(
        settings=settings,
        store=store,
        files=FileService(store, upload_retention_seconds=settings.limits.upload_retention_seconds,
                          output_retention_seconds=settings.output_retention_seconds),
        batches=KubeBatches(kube, settings),
        runtime=_runtime(settings, kube, store, gpus),
        served_models=served,
        events=events,
    )


def build_operator_operations(settings: Settings) -> Operations:
    """Metrics of the work (exported on settings.operator_metrics_port), the expiry
    sweeper and the webhook deliverer (outbox in object storage)."""
    store = open_store(settings)
    files = FileService(store, upload_retention_seconds=settings.limits.upload_retention_seconds,
                        output_retention_seconds=settings.output_retention_seconds)
    return build_operations(settings, files, Kube(api_client("operator"), settings.namespace), cluster=True)


def _runtime(settings: Settings, kube: Kube, store: Any, gpus: dict[str, int]) -> Any:
    worker = load_worker_config()
    if settings.cluster_runtime == "jobs":
        return KubeRuntime(kube=kube, store=store, settings=settings, worker=worker, model_gpus=gpus)
    from vbatch.operator.pool_runtime import PoolRuntime

    return PoolRuntime(kube=kube, store=store, settings=settings, worker=worker,
                       max_replicas=_max_replicas(settings), model_gpus=gpus)


def _max_replicas(settings: Settings):
    """Pool size per model: the catalog's max_replicas (1 for a model it does not list)."""
    from vbatch.core.catalog import load_catalog

    try:
        catalog = load_catalog(settings.model_catalog, settings.data_dir)
    except (OSError, ValueError, KeyError):
        if settings.engine != "echo":
            raise
        catalog = None  # the echo test engine runs without a catalog
    sizes = {m.id: m.max_replicas for m in catalog.models} if catalog is not None else {}
    return lambda model: sizes.get(model, 1)


def _catalog(settings: Settings) -> tuple[list[str] | None, dict[str, int]]:
    """Served model ids (validation) and GPUs per model (worker pods). The echo test
    engine serves any id, and asks for the GPUs the worker config says."""
    if settings.engine == "echo":
        return None, {}
    from vbatch.core.catalog import load_catalog

    catalog = load_catalog(settings.model_catalog, settings.data_dir)
    return catalog.ids(), {m.id: m.gpus_per_replica for m in catalog.models}


# --- operator setup ----------------------------------------------------------------


@kopf.on.login()
def login(**kwargs: Any) -> Any:
    # In a pod: the service account. Elsewhere: $KUBECONFIG read now — the `kubernetes`
    # client froze its default path at import time.
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    # kopf's own per-handler events ("Handler ... succeeded") would drown ours in
    # `kubectl describe batch`; only its warnings and errors are posted.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = int(os.environ.get("VBATCH_OPERATOR_WATCH_TIMEOUT", "300"))
    # The operator serves exactly its --namespace and the CRDs installed before it (the
    # chart's crds/). kopf's scanning would list/watch Namespaces and CRDs cluster-wide;
    # least privilege grants neither, and kopf retries a 403 for ~55 s before it falls
    # back to the same namespace list. Disabled, it uses discovery only (no RBAC needed).
    settings.scanning.disabled = True
    # A deleted Batch keeps kopf's finalizer until its timers (tick, archive) exited;
    # one still running when the deletion arrives (the archive timer deletes its own
    # Batch) would otherwise be re-checked only after 60 s.
    settings.background.cancellation_polling = 0.5
    app_settings = Settings()
    memo.operations = build_operator_operations(app_settings)
    memo.driver = build_driver(app_settings, memo.operations.events)
    memo.archiver = BatchArchiver.from_settings(app_settings)
    if app_settings.operator_metrics_port:  # 0: no metrics server
        try:
            prometheus_client.start_http_server(app_settings.operator_metrics_port)
        except OSError as exc:  # a taken port must not stop the operator from working
            log.error("metrics server on port %d failed: %s", app_settings.operator_metrics_port, exc)
    memo.operations.start()


@kopf.on.cleanup()
def shut_down(memo: kopf.Memo, **_: Any) -> None:
    operations = getattr(memo, "operations", None)
    if operations is not None:
        operations.stop()


# --- triggers -------------------------------------------------------------------------


def _label(body: kopf.Body, patch: kopf.Patch) -> None:
    # The API lists a project's batches by label; kubectl-applied ones arrive without.
    missing = missing_labels(body.metadata.name, dict(body.spec), dict(body.metadata.labels))
    if missing:
        patch.metadata.setdefault("labels", {}).update(missing)


def _step(name: str, spec: Any, memo: kopf.Memo) -> None:
    try:
        memo.driver.drive(spec.get("project", ""), batch_id_from_object_name(name))
    except Exception:
        # The driver records failing steps on the batch; this guards reading it (API
        # down). Never let kopf schedule its own (minute-long) retry: the next tick retries.
        log.exception("batch %s: round failed; retrying on the next tick", name)


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec.cancelRequested")
def on_change(name: str, spec: Any, body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, **_: Any) -> None:
    _label(body, patch)
    try:
        memo.archiver.index_batch(dict(body))  # kubectl-applied Batches are listed too
    except Exception:
        log.exception("batch %s: could not index it; retrying on the next change", name)
    _step(name, spec, memo)


def _needs_attention(status: dict[str, Any], **_: Any) -> bool:
    # Running batches, and finished ones whose Job/working data are not cleaned up yet.
    return status.get("phase") not in _TERMINAL or bool(status.get("jobName"))


@kopf.timer(GROUP, VERSION, PLURAL, interval=INTERVAL, when=_needs_attention)
def tick(name: str, spec: Any, memo: kopf.Memo, **_: Any) -> None:
    _step(name, spec, memo)


def _archivable(status: dict[str, Any], **_: Any) -> bool:
    return status.get("phase") in _TERMINAL and not status.get("jobName")


@kopf.timer(GROUP, VERSION, PLURAL, interval=ARCHIVE_INTERVAL, when=_archivable)
def archive(name: str, memo: kopf.Memo, **_: Any) -> None:
    try:
        memo.archiver.archive_if_due(name)
    except Exception:
        log.exception("batch %s: archiving failed; retrying on the next tick", name)


@kopf.on.delete(GROUP, VERSION, PLURAL)
def on_delete(body: Any, memo: kopf.Memo, **_: Any) -> None:
    # kopf holds the Batch with its finalizer until this returns; the Job and pods would
    # go by owner reference anyway, but only after the Batch, and shards/parts/progress
    # in object storage have no owner reference at all.
    record = memo.driver.batches.record_of(dict(body))
    if not memo.driver.discard(record):
        raise kopf.TemporaryError("waiting for the batch's worker pods to stop", delay=max(INTERVAL, 0.5))
