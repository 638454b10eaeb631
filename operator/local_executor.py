"""Single-node driver: the core state machine over a local batch store, with
shards run by worker subprocesses on this machine (see worker_pool).

A restart loses nothing: which shards are done is read back from their progress
records, and a worker started on an unfinished shard resumes from its parts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field

from vbatch.core import lifecycle
from vbatch.core.batch_store import BatchStore, StaleRecord
from vbatch.core.config import Settings, settings_env
from vbatch.core.files import FileService
from vbatch.core.schemas import BatchRecord
from vbatch.core.state import Action, Observation, next_action
from vbatch.core.storage.base import ObjectStore
from vbatch.operator.worker_pool import ShardTask, TaskResult, WorkerPool

log = logging.getLogger("vbatch.executor")


@dataclass
class ShardBook:
    """What this process knows of one batch's shards."""

    total: int
    succeeded: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    running: set[int] = field(default_factory=set)  # queued or on a worker
    attempts: dict[int, int] = field(default_factory=dict)
    not_before: dict[int, float] = field(default_factory=dict)  # retry backoff per shard
    stopping: bool = False


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
        max_attempts: int = 3,
        retry_backoff: float = 2.0,
    ) -> None:
        self.settings = settings
        self.store = store
        self.files = files
        self.batches = batches
        self.served_models = served_models
        self.poll_seconds = poll_seconds
        self.max_attempts = max_attempts
        self.retry_backoff = retry_backoff
        self._books: dict[str, ShardBook] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._pool = WorkerPool(
            slots, engine=engine, env=settings_env(settings), on_result=self._on_result,
            max_shards_per_worker=settings.worker_max_shards,
            switch_after_seconds=settings.model_switch_after_seconds,
        )
        self._slots = self._pool.slots
        self._thread = threading.Thread(target=self._loop, name="vbatch-executor", daemon=True)

    # --- BatchRunner hooks (called by the gateway) ---------------------------

    def submitted(self, record: BatchRecord) -> None:
        self._wake.set()

    def cancel_requested(self, record: BatchRecord) -> None:
        self._wake.set()

    # --- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self._pool.start()
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self._pool.close()  # SIGTERM: every worker flushes its shards; a restart resumes them

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                records = self.batches.unfinished()
            except Exception:
                log.exception("executor round failed; retrying")
                records = []
            for record in records:
                # One batch failing a step (storage down, a bug) must not starve the others.
                try:
                    self._step(record)
                except Exception:
                    log.exception("batch %s: step failed; retrying next round", record.id)
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    # --- one batch, one round --------------------------------------------------

    def _observe(self, record: BatchRecord) -> Observation:
        now = int(time.time())
        if record.shard_count is None:
            return Observation(now=now)
        book = self._book(record)
        with self._lock:
            return Observation(now=now, shards_total=book.total, shards_succeeded=len(book.succeeded), shards_failed=len(book.failed))

    def _book(self, record: BatchRecord) -> ShardBook:
        """The shard book; after a restart it is rebuilt from progress records."""
        with self._lock:
            book = self._books.get(record.id)
            if book is not None:
                return book
        book = ShardBook(total=record.shard_count or 0)
        for shard, progress in enumerate(lifecycle.read_progress(self.store, record)):
            if progress is not None and progress.finished:
                book.succeeded.add(shard)
        with self._lock:
            return self._books.setdefault(record.id, book)

    def _step(self, record: BatchRecord) -> None:
        action = next_action(record, self._observe(record))
        now = int(time.time())
        try:
            if action == Action.VALIDATE:
                self.batches.save(
                    lifecycle.validate(self.files, record, served_models=self.served_models, limits=self.settings.limits, now=now)
                )
            elif action == Action.LAUNCH:
                launched = lifecycle.launch(self.store, self.files, record, self.settings)
                self.batches.save(launched)
                if not launched.status.is_terminal:
                    self._schedule(launched)
            elif action == Action.WAIT:
                self._schedule(record)
                self._refresh_counts(record)
            elif action == Action.FINALIZE:
                self._finish(record, "shard_failed")
            elif action == Action.CANCEL:
                self._stop_then_finish(record, "batch_cancelled")
            elif action == Action.EXPIRE:
                self._stop_then_finish(record, "batch_expired")
        except StaleRecord:
            self._wake.set()  # changed meanwhile (e.g. cancelled): decide again with the new record

    def _schedule(self, record: BatchRecord) -> None:
        book = self._book(record)
        with self._lock:
            if book.stopping:
                return
            now = time.monotonic()
            waiting = {shard for shard, at in book.not_before.items() if at > now}
            todo = set(range(book.total)) - book.succeeded - book.failed - book.running - waiting
            book.running |= todo
        for shard in sorted(todo):
            self._pool.submit(ShardTask(record.project, record.id, shard, record.model or ""))

    def _refresh_counts(self, record: BatchRecord) -> None:
        updated = lifecycle.with_progress(record, lifecycle.read_progress(self.store, record))
        if updated.request_counts != record.request_counts or updated.usage != record.usage:
            self.batches.save(updated)

    def _stop_then_finish(self, record: BatchRecord, missing_code: str) -> None:
        book = self._book(record) if record.shard_count is not None else None
        if book is not None:
            with self._lock:
                book.stopping = True
            # Aborts the batch's requests inside the engines; workers and models stay.
            if self._pool.abort(record.id) or self._pool.busy_with(record.id):
                return  # its shards are flushing; finish on a later round
        self._finish(record, missing_code)

    def _finish(self, record: BatchRecord, missing_code: str) -> None:
        with self._lock:
            book = self._books.get(record.id)
            failed = frozenset(book.failed) if book else frozenset()
        done = lifecycle.finish(self.store, self.files, record, missing_code=missing_code, failed_shards=failed, now=int(time.time()))
        self.batches.save(done)
        lifecycle.remove_working_data(self.store, done)
        with self._lock:
            self._books.pop(record.id, None)
        log.info("batch %s %s: %s", record.id, done.status.value, done.request_counts.model_dump())

    # --- worker slot callbacks -------------------------------------------------

    def _on_result(self, result: TaskResult) -> None:
        task = result.task
        with self._lock:
            book = self._books.get(task.batch_id)
            if book is None:
                return
            book.running.discard(task.shard)
            if result.finished:
                book.succeeded.add(task.shard)
            elif not book.stopping:  # died, or stopped without finishing: one attempt spent
                book.attempts[task.shard] = book.attempts.get(task.shard, 0) + 1
                # Back off before the retry: a storage outage must not use up every
                # attempt within seconds.
                book.not_before[task.shard] = time.monotonic() + self.retry_backoff * 2 ** (book.attempts[task.shard] - 1)
                if book.attempts[task.shard] >= self.max_attempts:
                    log.error("batch %s shard %d failed %d times; giving up", task.batch_id, task.shard, self.max_attempts)
                    book.failed.add(task.shard)
        self._wake.set()
