"""File expiry: OpenAI's `expires_after` and the sweeper that deletes expired files.

A file past its `expires_at` already answers 404 (the file service checks it on
every read); the sweeper then removes its bytes, File object and index entries.
It walks the global expiry queue (`file-expiry/<expires_at>.<file_id>.<project>`,
see core.file_index) from the oldest entry and stops at the first one still in
the future, so a sweep costs O(expired files), not O(files).

Single node: a thread in the gateway; cluster: a thread in the operator.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from vbatch.core.errors import InvalidRequest
from vbatch.core.file_index import EXPIRY_PREFIX, parse_expiry_key
from vbatch.core.files import FileService

log = logging.getLogger("vbatch.expiry")

MAX_EXPIRES_AFTER_SECONDS = 30 * 24 * 3600  # OpenAI's maximum (30 days)
_SWEEP_PAGE = 500


def parse_expires_after(value: Any, *, param: str, min_seconds: int) -> int | None:
    """`{"anchor": "created_at", "seconds": N}` -> N (None when absent). Raises a 400
    naming the parameter for anything else."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{param}' must be an object with 'anchor' and 'seconds'.", code="invalid_expires_after", param=param)
    unknown = set(value) - {"anchor", "seconds"}
    if unknown:
        raise InvalidRequest(f"Unknown field(s) in '{param}': {', '.join(sorted(unknown))}.", code="invalid_expires_after", param=param)
    if value.get("anchor") != "created_at":
        raise InvalidRequest(
            f"Invalid '{param}.anchor' {value.get('anchor')!r}: the only supported anchor is 'created_at'.",
            code="invalid_expires_after", param=f"{param}.anchor",
        )
    seconds = value.get("seconds")
    if isinstance(seconds, str) and seconds.strip().isdigit():
        seconds = int(seconds.strip())  # multipart fields arrive as text
    if isinstance(seconds, bool) or not isinstance(seconds, int):
        raise InvalidRequest(f"'{param}.seconds' must be an integer.", code="invalid_expires_after", param=f"{param}.seconds")
    if not min_seconds <= seconds <= MAX_EXPIRES_AFTER_SECONDS:
        raise InvalidRequest(
            f"Invalid '{param}.seconds' {seconds}: must be between {min_seconds} and {MAX_EXPIRES_AFTER_SECONDS}.",
            code="invalid_expires_after", param=f"{param}.seconds",
        )
    return seconds


def sweep(files: FileService, *, now: float | None = None) -> int:
    """Delete every file whose expires_at has passed; returns how many went."""
    now = time.time() if now is None else now
    store = files.store
    removed = 0
    start: str | None = None
    while True:
        keys = store.list_page(EXPIRY_PREFIX, start_after=start, limit=_SWEEP_PAGE)
        for key in keys:
            try:
                expires_at, file_id, project = parse_expiry_key(key)
            except ValueError:
                log.warning("unreadable expiry entry %s removed", key)
                store.delete(key)
                continue
            if expires_at > now:
                return removed
            try:
                purged = files.purge(project, file_id, now=now)
            except ValueError:  # not a key vbatch wrote (a project id it would refuse)
                log.warning("expiry entry %s names no valid file; removed", key)
                purged = False
            if purged:
                removed += 1
                log.info("file %s of project %s expired: deleted", file_id, project)
            store.delete(key)  # last: a crash before this sweeps the file again
        if len(keys) < _SWEEP_PAGE:
            return removed
        start = keys[-1]


class Sweeper:
    """Runs `sweep` every `interval` seconds on a daemon thread until stopped."""

    def __init__(self, files: FileService, *, interval: float) -> None:
        self.files = files
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vbatch-expiry-sweeper", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sweep(self.files)
            except Exception:  # storage down: try again next round
                log.exception("expiry sweep failed; retrying in %.0f s", self.interval)
            self._stop.wait(self.interval)
