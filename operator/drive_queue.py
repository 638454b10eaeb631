"""Which batches the single-node driver threads look at next: a coalescing queue.

Each batch is in the queue at most once, and driven by one thread at a time: a batch
asked for again while a thread drives it is queued again once that drive ends (so
an event that arrives mid-step is never lost, and never runs a second step at once).
The queue therefore holds at most one entry per unfinished batch: bounded by the
batch store, however many events arrive.

Two lanes: events (created, cancelled, a shard ended) go before the periodic sweep
of every unfinished batch, so a new batch does not wait behind a thousand batches
whose progress is merely being refreshed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

Key = tuple[str, str]  # (project, batch id)


class DriveQueue:
    def __init__(self) -> None:
        self._urgent: OrderedDict[Key, None] = OrderedDict()
        self._routine: OrderedDict[Key, None] = OrderedDict()
        self._running: set[Key] = set()
        self._again: dict[Key, bool] = {}  # running and asked for again -> urgent?
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._urgent) + len(self._routine)

    def add(self, key: Key, *, urgent: bool = True) -> None:
        with self._cond:
            if key in self._running:
                self._again[key] = self._again.get(key, False) or urgent
                return
            if key in self._urgent:
                return
            if urgent:
                self._routine.pop(key, None)
                self._urgent[key] = None
            elif key not in self._routine:
                self._routine[key] = None
            else:
                return
            self._cond.notify()

    def take(self, timeout: float | None = None) -> Key | None:
        """The next batch to drive (now marked running), or None on timeout/close."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._closed or self._urgent or self._routine, timeout):
                return None
            if self._closed:
                return None
            lane = self._urgent if self._urgent else self._routine
            key, _ = lane.popitem(last=False)
            self._running.add(key)
            return key

    def done(self, key: Key) -> None:
        """The drive of `key` ended: queue it again if it was asked for meanwhile."""
        with self._cond:
            self._running.discard(key)
            if key in self._again:
                urgent = self._again.pop(key)
                lane = self._urgent if urgent else self._routine
                if key not in self._urgent and key not in self._routine:
                    lane[key] = None
                    self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
