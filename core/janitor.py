"""Removes what writes killed mid-way leave behind, at start-up and then periodically.

Local directory stores leave temporary files (`.vbatch-tmp-`); S3 leaves incomplete
multipart uploads whose parts take space. Both stores implement
`remove_orphans(max_age_seconds)`; stores without it are skipped.
"""

from __future__ import annotations

import logging
import threading

from vbatch.core.storage.base import ObjectStore

log = logging.getLogger(__name__)


def remove_orphans(store: ObjectStore, max_age_seconds: float) -> int:
    """One pass; failures are logged (storage may be away), never raised."""
    clean = getattr(store, "remove_orphans", None)
    if clean is None:
        return 0
    try:
        removed = clean(max_age_seconds)
    except Exception as exc:  # a housekeeping pass must never take the server down
        log.warning("removing orphaned temporaries failed: %s", exc)
        return 0
    if removed:
        log.info("removed %d orphaned temporaries (older than %.0f s)", removed, max_age_seconds)
    return removed


class Janitor:
    """A daemon thread running `remove_orphans` every interval (the first pass at start)."""

    def __init__(self, store: ObjectStore, *, max_age_seconds: float, interval_seconds: float) -> None:
        self.store = store
        self.max_age_seconds = max_age_seconds
        self.interval_seconds = interval_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        remove_orphans(self.store, self.max_age_seconds)  # at start-up, before serving
        if self.interval_seconds > 0:
            self._thread = threading.Thread(target=self._run, name="vbatch-janitor", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            remove_orphans(self.store, self.max_age_seconds)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
