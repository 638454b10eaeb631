"""Single-node wiring: the one driver (`vbatch.core.driver`) over the SQLite batch
store, with shards run by this machine's worker processes (`local_runtime`).

This module only decides *when* the driver looks at a batch: every poll round, and at
once when the gateway creates or cancels one (the BatchRunner hooks).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Collection

from vbatch.core.batch_store import BatchStore
from vbatch.core.config import Settings, settings_env
from vbatch.core.driver import Driver
from vbatch.core.events import BatchEvents
from vbatch.core.files import FileService
from vbatch.core.schemas import BatchRecord
from vbatch.core.storage.base import ObjectStore
from vbatch.operator.local_runtime import LocalRuntime
from vbatch.operator.local_workers import LocalWorkers

log = logging.getLogger("vbatch.executor")


class LocalExecutor:
    def __init__(
        self,
        *,
        settings: Settings,
        store: ObjectStore,
        files: FileService,
        batches: BatchStore,
        served_models: Collection[str] | None,
        engine: str,
        slots: int = 1,
        poll_seconds: float = 0.5,
        retry_backoff: float = 2.0,
        events: BatchEvents | None = None,
    ) -> None:
        self.batches = batches
        self.poll_seconds = poll_seconds
        self._wake = threading.Event()
        self._stopped = threading.Event()
        workers = functools.partial(LocalWorkers, engine=engine, env=settings_env(settings), slots=slots,
                                    max_shards_per_worker=settings.worker_max_shards,
                                    switch_after_seconds=settings.model_switch_after_seconds)
        self.runtime = LocalRuntime(store=store, max_attempts=settings.shard_max_attempts,
                                    retry_backoff=retry_backoff, workers=workers, wake=self._wake.set)
        self.driver = Driver(settings=settings, store=store, files=files, batches=batches, runtime=self.runtime,
                             served_models=served_models, events=events)
        self._thread = threading.Thread(target=self._loop, name="vbatch-executor", daemon=True)

    @property
    def _slots(self):  # the worker slots, for tests that kill a worker mid-shard
        return self.runtime.workers.slots

    # --- BatchRunner hooks (called by the gateway) -------------------------------------

    def submitted(self, record: BatchRecord) -> None:
        self._wake.set()

    def cancel_requested(self, record: BatchRecord) -> None:
        self._wake.set()

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self.runtime.workers.start()
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self.runtime.workers.stop()

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                records = list(self.batches.unfinished())
            except Exception:
                log.exception("executor round failed; retrying")
                records = []
            for record in records:
                if self._stopped.is_set():
                    break
                # The driver records a failing step on the batch itself; this only guards
                # the loop (e.g. the store unreachable for the re-read).
                try:
                    self.driver.drive(record.project, record.id)
                except Exception:
                    log.exception("batch %s: round failed; retrying next round", record.id)
            self._wake.wait(self.poll_seconds)
            self._wake.clear()
