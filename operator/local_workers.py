"""The one seam between the local shard runtime and the worker processes (worker_pool).

Everything the runtime needs from the pool is here, and nothing more: submit a shard
task, abort a batch's shards, ask whether a batch still runs, hear about results.
The pool runs many shards per warm worker process and aborts a batch's requests
inside the engine without stopping the process (see worker_pool's docstring).
"""

from __future__ import annotations

from collections.abc import Callable

from vbatch.operator.worker_pool import (
    DEFAULT_MAX_SHARDS_PER_WORKER,
    DEFAULT_SWITCH_AFTER_SECONDS,
    ShardTask,
    TaskResult,
    WorkerPool,
)

__all__ = ["LocalWorkers", "ShardTask", "TaskResult"]


class LocalWorkers:
    def __init__(
        self,
        *,
        engine: str,
        env: dict[str, str],
        slots: int,
        on_result: Callable[[TaskResult], None],
        wanted: Callable[[ShardTask], bool] | None = None,
        max_shards_per_worker: int = DEFAULT_MAX_SHARDS_PER_WORKER,
        switch_after_seconds: float = DEFAULT_SWITCH_AFTER_SECONDS,
    ) -> None:
        # `wanted` is not needed: abort() drops a batch's queued shards itself (each
        # still gets its one TaskResult, aborted=True).
        self.pool = WorkerPool(slots, engine=engine, env=env, on_result=on_result,
                               max_shards_per_worker=max_shards_per_worker,
                               switch_after_seconds=switch_after_seconds)

    @property
    def slots(self):
        return self.pool.slots

    @property
    def engine_loads(self) -> dict[str, int]:
        return self.pool.engine_loads

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> None:
        """Stop every worker: running shards flush what they finished and are resumed later."""
        self.pool.close()

    def submit(self, task: ShardTask) -> None:
        self.pool.submit(task)

    def abort(self, batch_id: str) -> None:
        """Abort this batch's shards: queued ones are dropped, running ones have their
        in-flight requests aborted inside the engine and flush; the workers stay."""
        self.pool.abort(batch_id)

    def busy_with(self, batch_id: str) -> bool:
        return self.pool.busy_with(batch_id)

    def holders(self, batch_id: str) -> dict[int, str]:
        return self.pool.holders(batch_id)
