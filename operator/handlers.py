"""The kopf handlers: thin adapters from kopf's events to `Reconciler.reconcile`.

Every trigger — a Batch created, the operator (re)starting, spec.cancelRequested
flipping, a periodic tick — does the same thing: re-read the Batch and its Job and
take the next step of the state machine. The triggers only decide *when*.

`kopf run -m vbatch.operator.handlers` (what `vbatch operator` and the tests run).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf
from vbatch.core.config import Settings
from vbatch.core.files import FileService
from vbatch.core.schemas import TERMINAL_STATUSES
from vbatch.core.storage import open_store
from vbatch.operator.archive import BatchArchiver
from vbatch.operator.builders import GROUP, PLURAL, VERSION
from vbatch.operator.config import WorkerPodConfig
from vbatch.operator.kube import Kube, api_client
from vbatch.operator.reconciler import PodsRemain, Reconciler

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


def build_reconciler(settings: Settings | None = None) -> Reconciler:

    settings = settings or Settings()
    store = open_store(settings)
    served, gpus = _catalog(settings)
    return Reconciler(
        settings=settings,
        store=store,
        files=FileService(store, upload_retention_seconds=settings.limits.upload_retention_seconds),
        kube=Kube(api_client("operator"), settings.namespace),
        worker=load_worker_config(),
        served_models=served,
        model_gpus=gpus,
    )


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
    memo.reconciler = build_reconciler()
    memo.archiver = BatchArchiver.from_settings(Settings())


# --- triggers -------------------------------------------------------------------------


def _step(name: str, memo: kopf.Memo) -> None:
    try:
        memo.reconciler.reconcile(name)
    except Exception:
        # Never let kopf schedule its own (minute-long) retry: the next tick retries.
        log.exception("batch %s: reconcile failed; retrying on the next tick", name)


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec.cancelRequested")
def on_change(name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    try:
        memo.archiver.index_batch(dict(body))  # kubectl-applied Batches are listed too
    except Exception:
        log.exception("batch %s: could not index it; retrying on the next change", name)
    _step(name, memo)


def _needs_attention(status: dict[str, Any], **_: Any) -> bool:
    # Running batches, and finished ones whose Job/working data are not cleaned up yet.
    return status.get("phase") not in _TERMINAL or bool(status.get("jobName"))


@kopf.timer(GROUP, VERSION, PLURAL, interval=INTERVAL, when=_needs_attention)
def tick(name: str, memo: kopf.Memo, **_: Any) -> None:
    _step(name, memo)


def _archivable(status: dict[str, Any], **_: Any) -> bool:
    return status.get("phase") in _TERMINAL and not status.get("jobName")


@kopf.timer(GROUP, VERSION, PLURAL, interval=ARCHIVE_INTERVAL, when=_archivable)
def archive(name: str, memo: kopf.Memo, **_: Any) -> None:
    try:
        memo.archiver.archive_if_due(name)
    except Exception:
        log.exception("batch %s: archiving failed; retrying on the next tick", name)


@kopf.on.delete(GROUP, VERSION, PLURAL)
def on_delete(name: str, memo: kopf.Memo, **_: Any) -> None:
    # kopf holds the Batch with its finalizer until this returns; the Job and pods would
    # go by owner reference anyway, but only after the Batch, and shards/parts/progress
    # in object storage have no owner reference at all.
    try:
        memo.reconciler.release(name)
    except PodsRemain:
        raise kopf.TemporaryError("waiting for the batch's worker pods to stop", delay=max(INTERVAL, 0.5)) from None
