"""Per-project index of File objects, so `GET /v1/files` costs O(page).

An index entry is an empty object whose key sorts the way the list is ordered:

    projects/<p>/file-index/<purpose>/asc/<created_at:012d>.<file_id>
    projects/<p>/file-index/<purpose>/desc/<inverted created_at>.<inverted file_id>
    file-expiry/<expires_at:012d>.<file_id>.<project>        (the sweeper's queue)
    file-index-ready/<project>                               (the project is indexed)

Each folder is flat, so one S3 ListObjectsV2 with `start-after` and `max-keys`
returns the next page; descending order has its own entries because S3 lists only
ascending. Entries are written before the File object and removed after it, so a
file that exists is always listed; an entry without a live file is skipped by the
reader and removed (after a grace period covering an upload in flight).

Projects whose files predate the index are indexed once, on their first listing
(a full scan), and then marked ready.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Iterator

from vbatch.core.schemas import FileObject, FilePurpose
from vbatch.core.storage.base import ObjectStore

TS_DIGITS = 12
MAX_TS = 10**TS_DIGITS - 1
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# An involution that reverses the order of id characters (ids are [0-9A-Za-z-]).
_INVERT = str.maketrans(_ALPHABET, _ALPHABET[::-1])
EXPIRY_PREFIX = "file-expiry/"
# `file-index-ready/<project>`: every file of the project is indexed (kept outside the
# project's prefix, which holds only its files and batches).
READY_PREFIX = "file-index-ready/"
# How many index keys one listing request asks for beyond the page.
_LIST_SLACK = 8


def index_root(project: str) -> str:
    return f"projects/{project}/file-index/"


def index_prefix(project: str, purpose: str, order: str) -> str:
    return f"{index_root(project)}{purpose}/{order}/"


def entry_name(created_at: int, file_id: str, order: str) -> str:
    if order == "asc":
        return f"{created_at:0{TS_DIGITS}d}.{file_id}"
    return f"{MAX_TS - created_at:0{TS_DIGITS}d}.{file_id.translate(_INVERT)}"


def entry_file_id(name: str, order: str) -> str:
    _, _, tail = name.partition(".")
    return tail if order == "asc" else tail.translate(_INVERT)


def entry_created_at(name: str, order: str) -> int:
    stamp = int(name.partition(".")[0])
    return stamp if order == "asc" else MAX_TS - stamp


def expiry_key(project: str, file_id: str, expires_at: int) -> str:
    return f"{EXPIRY_PREFIX}{expires_at:0{TS_DIGITS}d}.{file_id}.{project}"


def parse_expiry_key(key: str) -> tuple[int, str, str]:
    """(expires_at, file_id, project) of an expiry entry."""
    stamp, file_id, project = key[len(EXPIRY_PREFIX) :].split(".", 2)
    return int(stamp), file_id, project


class FileIndex:
    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._ready: set[str] = set()  # projects known to be indexed (saves a HEAD per list)
        self._lock = threading.Lock()

    # --- writing -------------------------------------------------------------

    def add(self, project: str, meta: FileObject) -> None:
        """Before the File object is written."""
        for order in ("asc", "desc"):
            key = index_prefix(project, meta.purpose.value, order) + entry_name(meta.created_at, meta.id, order)
            self.store.put_bytes(key, b"")
        if meta.expires_at is not None:
            self.store.put_bytes(expiry_key(project, meta.id, meta.expires_at), b"")

    def remove(self, project: str, meta: FileObject) -> None:
        """After the File object is gone (or marked deleted). Expiry entries are the
        sweeper's to remove."""
        for order in ("asc", "desc"):
            self.store.delete(index_prefix(project, meta.purpose.value, order) + entry_name(meta.created_at, meta.id, order))

    def remove_entry(self, project: str, purpose: str, order: str, name: str) -> None:
        self.store.delete(index_prefix(project, purpose, order) + name)

    # --- reading -------------------------------------------------------------

    def is_ready(self, project: str) -> bool:
        with self._lock:
            if project in self._ready:
                return True
        if self.store.exists(READY_PREFIX + project):
            self.mark_ready(project)
            return True
        return False

    def mark_ready(self, project: str) -> None:
        self.store.put_bytes(READY_PREFIX + project, b"")
        with self._lock:
            self._ready.add(project)

    def _entries(self, project: str, purpose: str, order: str, start_after: str | None, batch: int) -> Iterator[tuple[str, str]]:
        """(entry name, purpose) in order, fetched `batch` keys per request."""
        prefix = index_prefix(project, purpose, order)
        start = prefix + start_after if start_after is not None else None
        while True:
            keys = self.store.list_page(prefix, start_after=start, limit=batch)
            for key in keys:
                yield key[len(prefix) :], purpose
            if len(keys) < batch:
                return
            start = keys[-1]
            batch = min(batch * 4, 1000)  # many stale entries: larger pages

    def scan(
        self, project: str, *, purposes: list[str], order: str, after: FileObject | None, limit: int
    ) -> Iterator[tuple[str, str]]:
        """(entry name, purpose) after the cursor file, merged over purposes, in order."""
        start = entry_name(after.created_at, after.id, order) if after is not None else None
        streams = [self._entries(project, p, order, start, limit + _LIST_SLACK) for p in purposes]
        return heapq.merge(*streams) if len(streams) > 1 else streams[0]


ALL_PURPOSES = [p.value for p in FilePurpose]
