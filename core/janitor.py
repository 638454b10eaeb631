"""Removes what writes killed mid-way leave behind, at start-up and then periodically.

Local directory stores leave temporary files (`.vbatch-tmp-`); S3 leaves incomplete
multipart uploads whose parts take space. Both stores implement
`remove_orphans(max_age_seconds)`; stores without it are skipped.

A gateway killed between keeping a batch's copy of its input and creating the batch
leaves that copy with no batch: a batch folder whose input copy is older than the
same age and whose batch does not exist is removed too.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable

from vbatch.core.file_index import READY_PREFIX
from vbatch.core.layout import batch_prefix
from vbatch.core.storage.base import ObjectNotFound, ObjectStore

_INPUT_COPY = re.compile(r"projects/([^/]+)/batches/([^/]+)/input\.jsonl")

# (project, batch id) -> does the batch exist (in the batch store, or archived)
BatchExists = Callable[[str, str], bool]

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


def remove_orphan_batch_data(store: ObjectStore, batch_exists: BatchExists, max_age_seconds: float) -> int:
    """One pass over the batch folders of every project with files (an input copy needs
    an input file); returns how many folders were removed. Failures are logged."""
    cutoff = time.time() - max_age_seconds
    removed = 0
    try:
        projects = [key[len(READY_PREFIX):] for key in store.list(READY_PREFIX)]
        for project in projects:
            for key in store.list(f"projects/{project}/batches/"):
                match = _INPUT_COPY.fullmatch(key)
                if match is None:
                    continue
                batch_id = match.group(2)
                try:
                    # Young copies belong to creates that may still be under way.
                    if store.modified(key) > cutoff or batch_exists(project, batch_id):
                        continue
                except ObjectNotFound:
                    continue  # its batch ended meanwhile and removed it
                store.delete_prefix(batch_prefix(project, batch_id))
                log.info("removed the working data of batch %s (project %s): the batch was never created",
                         batch_id, project)
                removed += 1
    except Exception as exc:  # a housekeeping pass must never take the server down
        log.warning("removing orphaned batch data failed: %s", exc)
    return removed


class Janitor:
    """A daemon thread running the passes above every interval (the first at start)."""

    def __init__(self, store: ObjectStore, *, max_age_seconds: float, interval_seconds: float,
                 batch_exists: BatchExists | None = None) -> None:
        self.store = store
        self.max_age_seconds = max_age_seconds
        self.interval_seconds = interval_seconds
        self.batch_exists = batch_exists
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._pass()  # at start-up, before serving
        if self.interval_seconds > 0:
            self._thread = threading.Thread(target=self._run, name="vbatch-janitor", daemon=True)
            self._thread.start()

    def _pass(self) -> None:
        remove_orphans(self.store, self.max_age_seconds)
        if self.batch_exists is not None:
            remove_orphan_batch_data(self.store, self.batch_exists, self.max_age_seconds)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            self._pass()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
