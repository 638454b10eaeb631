"""Batch events: one place where the driver says what happened to a batch, and where
whoever cares (metrics, webhooks, logs) listens. Listeners must be quick and must not
raise into the driver: a failing listener is logged and skipped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from vbatch.core.schemas import BatchRecord

log = logging.getLogger("vbatch.events")

# (before, after): before is None when the batch is new to this process.
Listener = Callable[[BatchRecord | None, BatchRecord], None]


class BatchEvents:
    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()

    def subscribe(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def saved(self, before: BatchRecord | None, after: BatchRecord) -> None:
        """The driver saved `after` (a status change, new counts, or both)."""
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(before, after)
            except Exception:
                log.exception("batch %s: event listener %r failed", after.id, listener)
