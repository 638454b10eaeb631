"""The object-store protocol every room writes and reads through.

Keys are '/'-separated, relative, and built only by vbatch (never from user
filenames). Writes are all-or-nothing: an object is either absent or complete,
never half-written — local stores write a temporary file and rename it, S3
completes a multipart upload (or PUTs a whole object) only at the end.
Methods are synchronous; async callers run them in a thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

from vbatch.core.errors import StorageError

CHUNK_SIZE = 1024 * 1024


class ObjectNotFound(KeyError):
    """No object under that key."""


@runtime_checkable
class ObjectStore(Protocol):
    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        """Store the concatenated chunks under key; return the byte count.

        Consumes the iterable lazily (constant memory). If the iterable raises,
        nothing is left under key (and no temporary remains) and the exception
        propagates unchanged. Transport failures raise `StorageError`.
        """
        ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def get_stream(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Yield the object's bytes in chunks. Raises ObjectNotFound (eagerly, before
        the first chunk is requested) when the key is absent."""
        ...

    def get_bytes(self, key: str) -> bytes: ...

    def size(self, key: str) -> int:
        """Byte size; ObjectNotFound when absent."""
        ...

    def exists(self, key: str) -> bool: ...

    def modified(self, key: str) -> float:
        """When the object was last written or copied (epoch seconds); ObjectNotFound
        when absent."""
        ...

    def copy(self, src: str, dst: str) -> None:
        """A whole copy of src at dst, made by the store itself where it can (a hard
        link, S3 CopyObject): no bytes through this process. ObjectNotFound when src
        is absent."""
        ...

    def delete(self, key: str) -> None:
        """Remove key; absent keys are fine (idempotent)."""
        ...

    def list(self, prefix: str) -> Iterator[str]:
        """Every key under prefix (recursive), in lexicographic order. Paging is
        `list_page`'s, over one flat folder."""
        ...

    def list_page(self, prefix: str, *, start_after: str | None = None, limit: int = 1000) -> list[str]:
        """At most `limit` keys directly under prefix (a flat "folder": no '/' after
        it), in lexicographic order, each > start_after. One request on S3, so
        indexes built of such keys page in O(page)."""
        ...

    def delete_prefix(self, prefix: str) -> None:
        for key in list(self.list(prefix)):
            self.delete(key)


def iter_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Split a byte stream into lines (without the b'\\n'), holding one line at a time."""
    pending = b""
    for chunk in chunks:
        if not chunk:
            continue
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from lines
    if pending:
        yield pending


__all__ = ["CHUNK_SIZE", "ObjectNotFound", "ObjectStore", "StorageError", "iter_lines"]
