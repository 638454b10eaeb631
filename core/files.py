"""The file service: File objects over an object store, per project.

Layout (see docs/design): `projects/<project>/files/<file_id>` holds the bytes,
`projects/<project>/files/<file_id>.json` the File object, and a per-project
index (core.file_index) makes a page of the list cost O(page). Deleting removes
the bytes at once and keeps the metadata (marked deleted) for audit; the id then
answers 404 like any unknown id. A file past its `expires_at` answers 404 at
once; the sweeper (core.expiry) later removes its bytes and metadata.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from pathlib import PurePosixPath, PureWindowsPath

import orjson
from vbatch.core import file_index
from vbatch.core.errors import NotFound, PayloadTooLarge, StorageError, clip
from vbatch.core.file_index import ALL_PURPOSES, FileIndex
from vbatch.core.ids import is_file_id, new_file_id
from vbatch.core.projects import check_project_id
from vbatch.core.schemas import FileObject, FilePurpose
from vbatch.core.storage.base import ObjectNotFound, ObjectStore

MAX_FILENAME_CHARS = 255
DAYS_30 = 30 * 24 * 3600
# An index entry whose File object is missing this long after its creation is a
# leftover of a crashed upload (not one still being written): it is removed.
STALE_ENTRY_SECONDS = 600


def files_prefix(project: str) -> str:
    # The storage-key boundary: a project id with path syntax never names another prefix.
    return f"projects/{check_project_id(project)}/files/"


def file_key(project: str, file_id: str) -> str:
    if "/" in file_id or not file_id:
        raise ValueError(f"invalid file id {clip(file_id)!r}")
    return files_prefix(project) + file_id


def _no_such_file(file_id: str) -> NotFound:
    return NotFound(f"No such file: {clip(file_id)}", code="file_not_found", param="file_id")


def sanitize_filename(filename: str | None, file_id: str) -> str:
    """A filename is data, never a path: keep only its last component, printable."""
    name = (filename or "").replace("\x00", "")
    name = PureWindowsPath(PurePosixPath(name).name).name  # strips a/b/c and a\\b\\c
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    if name in {"", ".", ".."}:
        return f"{file_id}.jsonl"
    return name[:MAX_FILENAME_CHARS]


def limit_size(chunks: Iterable[bytes], max_bytes: int) -> Iterator[bytes]:
    """Pass chunks through, raising PayloadTooLarge as soon as max_bytes is exceeded."""
    seen = 0
    for chunk in chunks:
        seen += len(chunk)
        if seen > max_bytes:
            raise PayloadTooLarge(
                f"File is larger than the limit of {max_bytes} bytes.", param="file"
            )
        yield chunk


class FileService:
    def __init__(
        self, store: ObjectStore, *, upload_retention_seconds: int = DAYS_30, output_retention_seconds: int = DAYS_30
    ) -> None:
        self.store = store
        self.upload_retention_seconds = upload_retention_seconds
        self.output_retention_seconds = output_retention_seconds
        self.index = FileIndex(store)

    # --- writing -------------------------------------------------------------

    def create(
        self,
        project: str,
        chunks: Iterable[bytes],
        *,
        filename: str | None,
        purpose: FilePurpose,
        max_bytes: int | None = None,
        is_error: bool | None = None,
        file_id: str | None = None,
        expires_after_seconds: int | None = None,
    ) -> FileObject:
        """Stream chunks into a new file. Raises PayloadTooLarge (leaving nothing
        behind) past max_bytes. The metadata is written after the bytes and the
        index entries, so a File object never points at missing or partial content
        and every File object is listed. `expires_after_seconds` counts from
        created_at; by default uploads and results keep their retention."""
        file_id = file_id or new_file_id()
        # A project with no files yet needs no catch-up scan later: every file it will have is indexed.
        new_project = not self.index.is_ready(project) and not self.store.list_page(files_prefix(project), limit=1)
        if max_bytes is not None:
            chunks = limit_size(chunks, max_bytes)
        size = self.store.put_stream(file_key(project, file_id), chunks)
        now = int(time.time())
        if expires_after_seconds is None:
            expires_after_seconds = (
                self.upload_retention_seconds if purpose == FilePurpose.BATCH else self.output_retention_seconds
            )
        expires_at = now + expires_after_seconds if expires_after_seconds else None
        meta = FileObject(
            id=file_id,
            bytes=size,
            created_at=now,
            expires_at=expires_at,
            filename=sanitize_filename(filename, file_id),
            purpose=purpose,
            is_error=is_error,
        )
        try:
            self.index.add(project, meta)
            self._write_meta(project, meta)
        except BaseException:
            # No File object points at these bytes: do not leave them taking space.
            with contextlib.suppress(Exception):
                self.store.delete(file_key(project, file_id))
            with contextlib.suppress(Exception):
                self.index.remove(project, meta)
            raise
        if new_project:
            self.index.mark_ready(project)
        return meta

    def _write_meta(self, project: str, meta: FileObject) -> None:
        self.store.put_bytes(file_key(project, meta.id) + ".json", orjson.dumps(meta.model_dump(mode="json")))

    def set_expiry(self, project: str, file_id: str, expires_after_seconds: int) -> FileObject:
        """Give a stored file another lifetime (counted from its created_at): the
        upload's expires_after fields may arrive after its bytes."""
        meta = self.get(project, file_id)
        meta.expires_at = meta.created_at + expires_after_seconds
        self.index.add(project, meta)  # the old expiry entry is dropped by the sweeper
        self._write_meta(project, meta)
        return meta

    # --- reading -------------------------------------------------------------

    def _load(self, key: str) -> dict | None:
        try:
            return orjson.loads(self.store.get_bytes(key))
        except ObjectNotFound:
            return None

    @staticmethod
    def _live(raw: dict | None, now: float) -> FileObject | None:
        """The File object, unless deleted or past its expires_at."""
        if raw is None or raw.get("deleted"):
            return None
        meta = FileObject.model_validate(raw)
        if meta.expires_at is not None and now >= meta.expires_at:
            return None
        return meta

    def get(self, project: str, file_id: str) -> FileObject:
        if not is_file_id(file_id):
            raise _no_such_file(file_id)
        meta = self._live(self._load(file_key(project, file_id) + ".json"), time.time())
        if meta is None:
            raise _no_such_file(file_id)
        return meta

    def open(self, project: str, file_id: str) -> tuple[FileObject, Iterator[bytes]]:
        """The File object and a lazy stream of its bytes."""
        meta = self.get(project, file_id)
        try:
            return meta, self.store.get_stream(file_key(project, file_id))
        except ObjectNotFound:
            raise _no_such_file(file_id) from None

    def copy_content(self, project: str, file_id: str, key: str) -> FileObject:
        """A copy of the file's bytes at `key`, made by the store (no bytes through here)."""
        meta = self.get(project, file_id)
        try:
            self.store.copy(file_key(project, file_id), key)
        except ObjectNotFound:
            raise _no_such_file(file_id) from None
        return meta

    def list(
        self,
        project: str,
        *,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 10_000,
        order: str = "desc",
    ) -> tuple[list[FileObject], bool]:
        """A page of live files, ordered by creation time (then id). Returns (files, has_more).
        Costs about one listing request plus one read per file of the page."""
        if purpose is not None and purpose not in ALL_PURPOSES:
            return [], False
        if not self.index.is_ready(project):
            self._build_index(project)
        cursor = None
        if after is not None:
            raw = self._load(file_key(project, after) + ".json") if is_file_id(after) else None
            if raw is None:
                return [], False  # an unknown cursor: nothing comes after it
            cursor = FileObject.model_validate(raw)
        now = time.time()
        files: list[FileObject] = []
        purposes = [purpose] if purpose is not None else ALL_PURPOSES
        for name, entry_purpose in self.index.scan(project, purposes=purposes, order=order, after=cursor, limit=limit):
            file_id = file_index.entry_file_id(name, order)
            raw = self._load(file_key(project, file_id) + ".json")
            meta = self._live(raw, now)
            if meta is None:
                self._repair(project, entry_purpose, order, name, raw, now)
                continue
            files.append(meta)
            if len(files) > limit:
                break
        return files[:limit], len(files) > limit

    def _repair(self, project: str, purpose: str, order: str, name: str, raw: dict | None, now: float) -> None:
        """Drop an index entry whose file is deleted, or that a crashed upload left.
        Expired files keep theirs until the sweeper removes the file."""
        if raw is not None and not raw.get("deleted"):
            return
        if raw is None and now - file_index.entry_created_at(name, order) < STALE_ENTRY_SECONDS:
            return  # maybe an upload writing its File object right now
        with contextlib.suppress(Exception):
            self.index.remove_entry(project, purpose, order, name)

    def _build_index(self, project: str) -> None:
        """Index a project's files that predate the index (once; a full scan)."""
        now = time.time()
        for key in self.store.list(files_prefix(project)):
            if key.endswith(".json"):
                meta = self._live(self._load(key), now)
                if meta is not None:
                    self.index.add(project, meta)
        self.index.mark_ready(project)

    # --- deleting ------------------------------------------------------------

    def discard(self, project: str, file_id: str) -> None:
        """Remove a file that was never accepted (a refused upload): bytes and File
        object, no deleted-record left behind. Absent parts are fine."""
        raw = self._load(file_key(project, file_id) + ".json")
        self.store.delete(file_key(project, file_id))
        self.store.delete(file_key(project, file_id) + ".json")
        if raw is not None:
            meta = FileObject.model_validate(raw)
            self.index.remove(project, meta)
            if meta.expires_at is not None:  # never accepted: nothing for the sweeper to do
                self.store.delete(file_index.expiry_key(project, meta.id, meta.expires_at))

    def delete(self, project: str, file_id: str) -> None:
        meta = self.get(project, file_id)
        # Bytes first: on a full disk, deleting is how space comes back.
        self.store.delete(file_key(project, file_id))
        record = meta.model_dump(mode="json") | {"deleted": True, "deleted_at": int(time.time())}
        try:
            self.store.put_bytes(file_key(project, file_id) + ".json", orjson.dumps(record))
        except StorageError:
            # Could not keep the audit record (disk still full?): drop the File object
            # too, so it never points at bytes that are gone; then report the failure.
            with contextlib.suppress(Exception):
                self.store.delete(file_key(project, file_id) + ".json")
            raise
        self.index.remove(project, meta)

    def purge(self, project: str, file_id: str, *, now: float) -> bool:
        """The sweeper: remove an expired file's bytes, File object and index entries.
        False (and nothing removed) when the file lives on (its expiry moved)."""
        raw = self._load(file_key(project, file_id) + ".json")
        if raw is not None:
            meta = FileObject.model_validate(raw)
            if not raw.get("deleted") and (meta.expires_at is None or now < meta.expires_at):
                return False
        self.store.delete(file_key(project, file_id))
        self.store.delete(file_key(project, file_id) + ".json")
        if raw is not None:
            self.index.remove(project, meta)
        return True
