"""Request admission for one engine shared by many shards of many batches.

The engine gets at most `budget` requests at once (its in-flight budget, about
2 x max_num_seqs), summed over every shard the worker runs. When a request slot
frees, the waiting shard runs are served in fair order (vbatch.core.fair): round-
robin across projects, then across a project's batches, FIFO within a batch. So a
small batch of one project admitted while another project's huge batch runs gets
every other free slot and ends long before the big one.
"""

from __future__ import annotations

import asyncio

from collections.abc import Iterator
from contextlib import contextmanager

from vbatch.core.fair import FairQueue


class Admission:
    def __init__(self, budget: int) -> None:
        if budget < 1:
            raise ValueError("the in-flight budget must be >= 1")
        self.budget = budget
        self.in_flight = 0
        self._waiting: FairQueue[asyncio.Future[None]] = FairQueue()

    async def acquire(self, project: str, batch_id: str) -> None:
        """Wait for a request slot; cancellable (a cancelled wait holds no slot)."""
        if self.in_flight < self.budget and not self._waiting:
            self.in_flight += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.push(project, batch_id, future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # granted and cancelled at once: hand the slot on
            else:
                self._waiting.remove(lambda f: f is future)
            raise

    def release(self) -> None:
        while self._waiting:
            future = self._waiting.pop()
            if not future.done():
                future.set_result(None)  # the slot passes on; in_flight is unchanged
                return
        self.in_flight -= 1


class WindowShare:
    """Input bytes the shards of one worker may hold in reorder windows, shared.

    A worker holds hundreds of shards at once (many small batches); each reads a
    window of its input ahead of admission. Each gets `total / shards held`, within
    [floor, ceiling], read again at every window: alone, a shard reads big windows
    (better prefix grouping); among many, the sum stays near `total`.
    """

    def __init__(self, total: int, *, floor: int, ceiling: int) -> None:
        if not 0 < floor <= ceiling:
            raise ValueError("need 0 < floor <= ceiling")
        self.total, self.floor, self.ceiling = total, floor, ceiling
        self.holders = 0

    @contextmanager
    def held(self) -> Iterator[None]:
        self.holders += 1
        try:
            yield
        finally:
            self.holders -= 1

    def bytes_each(self) -> int:
        return max(self.floor, min(self.ceiling, self.total // max(1, self.holders)))
