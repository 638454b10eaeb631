"""The one seam between the local shard runtime and the worker processes (worker_pool).

Everything the runtime needs from the pool is here, and nothing more: submit a shard
task, abort a batch's shards, ask whether a batch still runs, hear about results. A
pool that runs many shards per process, or aborts a batch's requests without killing
the process, changes this file only.
"""

from __future__ import annotations

import queue
from collections.abc import Callable

from vbatch.operator.worker_pool import ShardTask, TaskResult, WorkerSlot

__all__ = ["LocalWorkers", "ShardTask", "TaskResult"]


class LocalWorkers:
    def __init__(
        self,
        *,
        engine: str,
        env: dict[str, str],
        slots: int,
        on_result: Callable[[TaskResult], None],
        wanted: Callable[[ShardTask], bool],
    ) -> None:
        # Holds at most one task per unfinished shard: the runtime submits a shard only
        # when it is neither running, queued, done nor failed.
        self._tasks: queue.Queue[ShardTask | None] = queue.Queue()
        self.slots = [WorkerSlot(i, self._tasks, on_result, wanted, engine=engine, env=env) for i in range(slots)]

    def start(self) -> None:
        for slot in self.slots:
            slot.start()

    def stop(self) -> None:
        """Stop every worker: running shards flush what they finished and are resumed later."""
        for _ in self.slots:
            self._tasks.put(None)
        for slot in self.slots:
            current = slot.current
            if current is not None:
                slot.interrupt(current.batch_id)
        for slot in self.slots:
            slot.join(timeout=30)

    def submit(self, task: ShardTask) -> None:
        self._tasks.put(task)

    def abort(self, batch_id: str) -> None:
        """Stop this batch's running shards (they flush, then report unfinished); queued
        ones are skipped by `wanted`. Other batches keep running."""
        for slot in self.slots:
            slot.interrupt(batch_id)

    def busy_with(self, batch_id: str) -> bool:
        return any(slot.busy_with(batch_id) for slot in self.slots)
