"""The single-node shard runtime: a batch's shards run on this machine's worker
processes (through `local_workers`), with a retry budget per shard.

What it knows lives in memory (a book per batch); after a restart the book is rebuilt
from the shards' progress records, and a worker started on an unfinished shard resumes
from its parts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vbatch.core import lifecycle
from vbatch.core.runtime import ShardsSeen
from vbatch.core.schemas import BatchRecord
from vbatch.core.storage.base import ObjectStore
from vbatch.operator.local_workers import LocalWorkers, ShardTask, TaskResult

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


class LocalRuntime:
    def __init__(
        self,
        *,
        store: ObjectStore,
        max_attempts: int,
        retry_backoff: float,
        workers: Callable[..., LocalWorkers],
        wake: Callable[[str, str], None] = lambda project, batch_id: None,
    ) -> None:
        self.store = store
        self.max_attempts = max_attempts
        self.retry_backoff = retry_backoff
        self.wake = wake
        self._books: dict[str, ShardBook] = {}
        self._lock = threading.Lock()
        self.workers = workers(on_result=self._on_result, wanted=self._wanted)

    # --- ShardRuntime ----------------------------------------------------------------

    def run(self, record: BatchRecord) -> None:
        book = self._book(record)
        with self._lock:
            if book.stopping:
                return
            now = time.monotonic()
            waiting = {shard for shard, at in book.not_before.items() if at > now}
            todo = set(range(book.total)) - book.succeeded - book.failed - book.running - waiting
            book.running |= todo
        for shard in sorted(todo):
            self.workers.submit(ShardTask(record.project, record.id, shard, record.model or ""))

    def observe(self, record: BatchRecord) -> ShardsSeen:
        book = self._book(record)
        holders = self.workers.holders(record.id)  # outside our lock: the pool has its own
        with self._lock:
            return ShardsSeen(succeeded=frozenset(book.succeeded), failed=frozenset(book.failed),
                              attempts=dict(book.attempts), holders=holders)

    def stop(self, record: BatchRecord) -> bool:
        with self._lock:
            book = self._books.get(record.id)
            if book is not None:
                book.stopping = True
        self.workers.abort(record.id)
        return not self.workers.busy_with(record.id)

    def release(self, record: BatchRecord) -> bool:
        if not self.stop(record):
            return False
        with self._lock:
            self._books.pop(record.id, None)
        return True

    # --- bookkeeping -----------------------------------------------------------------

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

    def _wanted(self, task: ShardTask) -> bool:
        with self._lock:
            book = self._books.get(task.batch_id)
            if book is None or book.stopping:
                if book is not None:
                    book.running.discard(task.shard)
                return False
            return True

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
                attempts = book.attempts[task.shard] = book.attempts.get(task.shard, 0) + 1
                # Back off before the retry: a storage outage must not use up every
                # attempt within seconds.
                book.not_before[task.shard] = time.monotonic() + self.retry_backoff * 2 ** (attempts - 1)
                if attempts >= self.max_attempts:
                    log.error("batch %s shard %d failed %d times; giving up", task.batch_id, task.shard, attempts)
                    book.failed.add(task.shard)
        self.wake(task.project, task.batch_id)  # drive this batch now: a shard ended
