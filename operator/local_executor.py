"""Single-node wiring: the one driver (`vbatch.core.driver`) over the SQLite batch
store, with shards run by this machine's worker processes (`local_runtime`).

This module only decides *when* the driver looks at a batch, and on which thread:
- at once on an event: the gateway created or cancelled it, or one of its shards
  ended (the runtime says which batch);
- every `poll_seconds`, a sweep of every unfinished batch (live counts, expiry,
  retries after a backoff, and anything a missed event would leave waiting).

A small pool of driver threads (`driver_threads`) takes batches from a coalescing
queue (`drive_queue`): each batch is driven by one thread at a time (the driver's
per-batch lock says the same), but one batch's merge or fsyncs no longer hold up
every other batch's steps. The queue holds each batch at most once.
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
from vbatch.operator.drive_queue import DriveQueue
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
        driver_threads: int | None = None,
    ) -> None:
        self.batches = batches
        self.poll_seconds = poll_seconds
        self.queue = DriveQueue()
        self._stopped = threading.Event()
        workers = functools.partial(LocalWorkers, engine=engine, env=settings_env(settings), slots=slots,
                                    max_shards_per_worker=settings.worker_max_shards,
                                    switch_after_seconds=settings.model_switch_after_seconds)
        self.runtime = LocalRuntime(store=store, max_attempts=settings.shard_max_attempts,
                                    retry_backoff=retry_backoff, workers=workers, wake=self._shard_ended)
        self.driver = Driver(settings=settings, store=store, files=files, batches=batches, runtime=self.runtime,
                             served_models=served_models, events=events)
        count = max(1, driver_threads or settings.driver_threads)
        self._threads = [threading.Thread(target=self._sweep_loop, name="vbatch-executor", daemon=True)]
        self._threads += [threading.Thread(target=self._drive_loop, name=f"vbatch-driver-{i}", daemon=True)
                          for i in range(count)]

    @property
    def _slots(self):  # the worker slots, for tests that kill a worker mid-shard
        return self.runtime.workers.slots

    # --- BatchRunner hooks (called by the gateway) -------------------------------------

    def submitted(self, record: BatchRecord) -> None:
        self.queue.add((record.project, record.id))

    def cancel_requested(self, record: BatchRecord) -> None:
        self.queue.add((record.project, record.id))

    def _shard_ended(self, project: str, batch_id: str) -> None:
        self.queue.add((project, batch_id))

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self.runtime.workers.start()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self.queue.close()
        for thread in self._threads:
            thread.join(timeout=10)
        self.runtime.workers.stop()

    def _sweep_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                for record in self.batches.unfinished():
                    self.queue.add((record.project, record.id), urgent=False)
            except Exception:
                log.exception("executor sweep failed; retrying")
            self._stopped.wait(self.poll_seconds)

    def _drive_loop(self) -> None:
        while not self._stopped.is_set():
            key = self.queue.take(timeout=self.poll_seconds)
            if key is None:
                continue
            # The driver records a failing step on the batch itself; this only guards
            # the thread (e.g. the store unreachable for the re-read).
            try:
                self.driver.drive(*key)
            except Exception:
                log.exception("batch %s: round failed; retrying next round", key[1])
            finally:
                self.queue.done(key)
