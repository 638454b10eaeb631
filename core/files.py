"""The file service: File objects over an object store, per project.

Layout (see docs/design): `projects/<project>/files/<file_id>` holds the bytes,
`projects/<project>/files/<file_id>.json` the File object. Deleting removes the
bytes at once and keeps the metadata (marked deleted) for audit; the id then
answers 404 like any unknown id.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from pathlib import PurePosixPath, PureWindowsPath

import orjson
from vbatch.core.errors import NotFound, PayloadTooLarge, StorageError, clip
from vbatch.core.ids import is_file_id, new_file_id
from vbatch.core.projects import check_project_id
from vbatch.core.schemas import FileObject, FilePurpose
from vbatch.core.storage.base import ObjectNotFound, ObjectStore

MAX_FILENAME_CHARS = 255


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
    def __init__(self, store: ObjectStore, *, upload_retention_seconds: int = 30 * 24 * 3600) -> None:
        self.store = store
        self.upload_retention_seconds = upload_retention_seconds

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
    ) -> FileObject:
        """Stream chunks into a new file. Raises PayloadTooLarge (leaving nothing
        behind) past max_bytes. The metadata is written after the bytes, so a File
        object never points at missing or partial content."""
        file_id = file_id or new_file_id()
        if max_bytes is not None:
            chunks = limit_size(chunks, max_bytes)
        size = self.store.put_stream(file_key(project, file_id), chunks)
        now = int(time.time())
        expires_at = now + self.upload_retention_seconds if purpose == FilePurpose.BATCH else None
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
            self.store.put_bytes(file_key(project, file_id) + ".json", orjson.dumps(meta.model_dump(mode="json")))
        except BaseException:
            # No File object points at these bytes: do not leave them taking space.
            with contextlib.suppress(Exception):
                self.store.delete(file_key(project, file_id))
            raise
        return meta

    # --- reading -------------------------------------------------------------

    def _load(self, key: str) -> dict | None:
        try:
            return orjson.loads(self.store.get_bytes(key))
        except ObjectNotFound:
            return None

    def get(self, project: str, file_id: str) -> FileObject:
        if not is_file_id(file_id):
            raise _no_such_file(file_id)
        raw = self._load(file_key(project, file_id) + ".json")
        if raw is None or raw.get("deleted"):
            raise _no_such_file(file_id)
        return FileObject.model_validate(raw)

    def open(self, project: str, file_id: str) -> tuple[FileObject, Iterator[bytes]]:
        """The File object and a lazy stream of its bytes."""
        meta = self.get(project, file_id)
        try:
            return meta, self.store.get_stream(file_key(project, file_id))
        except ObjectNotFound:
            raise _no_such_file(file_id) from None

    def list(
        self,
        project: str,
        *,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 10_000,
        order: str = "desc",
    ) -> tuple[list[FileObject], bool]:
        """A page of live files, ordered by creation time (then id). Returns (files, has_more)."""
        files: list[FileObject] = []
        for key in self.store.list(files_prefix(project)):
            if not key.endswith(".json"):
                continue
            raw = self._load(key)
            if raw is None or raw.get("deleted"):
                continue
            meta = FileObject.model_validate(raw)
            if purpose is None or meta.purpose == purpose:
                files.append(meta)
        files.sort(key=lambda f: (f.created_at, f.id), reverse=(order == "desc"))
        if after is not None:
            ids = [f.id for f in files]
            files = files[ids.index(after) + 1 :] if after in ids else []
        return files[:limit], len(files) > limit

    # --- deleting ------------------------------------------------------------

    def discard(self, project: str, file_id: str) -> None:
        """Remove a file that was never accepted (a refused upload): bytes and File
        object, no deleted-record left behind. Absent parts are fine."""
        self.store.delete(file_key(project, file_id))
        self.store.delete(file_key(project, file_id) + ".json")

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
