"""An object store in a local directory (single-node mode, tests).

Each key is a file under root. Writes go to a temporary file in the target's
directory, are fsynced and then renamed over the key, so readers see either
nothing or the whole object. Temporary names carry TMP_MARKER and are never
listed; a crash may leave one behind, which `list` ignores.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from vbatch.core.errors import StorageError
from vbatch.core.storage.base import CHUNK_SIZE, ObjectNotFound

log = logging.getLogger(__name__)

# Part of every temporary file name; keys containing it are refused so a real
# object can never be mistaken for a leftover temporary.
TMP_MARKER = ".vbatch-tmp-"


def check_key(key: str) -> str:
    """Refuse keys that could escape root or collide with temporaries."""
    if not isinstance(key, str) or not key:
        raise ValueError("object key must be a non-empty string")
    if "\x00" in key or "\\" in key:
        raise ValueError(f"invalid object key {key!r}: NUL and backslash are not allowed")
    if key.startswith("/") or key.endswith("/"):
        raise ValueError(f"invalid object key {key!r}: must be relative and name an object")
    parts = key.split("/")
    if any(part in {"", ".", ".."} for part in parts):
        raise ValueError(f"invalid object key {key!r}: empty, '.' or '..' segments")
    if TMP_MARKER in key:
        raise ValueError(f"invalid object key {key!r}: reserved name")
    return key


_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the storage is read-only",
}


def _storage_error(action: str, key: str, exc: OSError) -> StorageError:
    # Every OS failure (full, read-only, gone, I/O error) is the same to a client: the
    # storage cannot do this now (503 + Retry-After); the reason is in the message.
    reason = _REASONS.get(exc.errno or 0) or exc.strerror or str(exc)
    return StorageError(f"Storage failed to {action} {key[:200]!r}: {reason}.")


class LocalObjectStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    # --- writing -------------------------------------------------------------

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        path = self._path(key)
        tmp, fd = self._open_temp(key, path)
        size = 0
        try:
            out = os.fdopen(fd, "wb")
            try:
                # Only our own I/O is wrapped: an exception raised by the caller's
                # iterable must reach the caller unchanged.
                for chunk in chunks:
                    try:
                        out.write(chunk)
                    except OSError as exc:
                        raise _storage_error("write", key, exc) from exc
                    size += len(chunk)
                try:
                    out.flush()
                    os.fsync(out.fileno())
                except OSError as exc:
                    raise _storage_error("write", key, exc) from exc
            finally:
                # After a failed write, close() retries flushing the buffer and fails
                # again (ENOSPC): that must not replace the error being raised.
                # After a successful flush + fsync there is nothing left to lose.
                with contextlib.suppress(OSError):
                    out.close()
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise _storage_error("write", key, exc) from exc
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._fsync_dir(path.parent)
        return size

    @staticmethod
    def _create_new(key: str, path: Path) -> int:
        """Open a file that must not exist yet (O_EXCL), making its directory first.
        FileExistsError is the caller's; every other OS failure is a StorageError."""
        for attempt in range(3):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise
            except FileNotFoundError as exc:
                # A concurrent delete pruned the (then empty) directory between
                # mkdir and open: make it again.
                if attempt == 2:
                    raise _storage_error("write", key, exc) from exc
            except OSError as exc:
                raise _storage_error("write", key, exc) from exc
        raise AssertionError("unreachable")

    @classmethod
    def _open_temp(cls, key: str, path: Path) -> tuple[Path, int]:
        tmp = path.parent / f"{path.name}{TMP_MARKER}{secrets.token_hex(6)}"
        try:
            return tmp, cls._create_new(key, tmp)
        except FileExistsError as exc:  # a random name taken: as good as a disk failure
            raise _storage_error("write", key, exc) from exc

    def put_bytes(self, key: str, data: bytes) -> None:
        if not data and self._put_empty(key):
            return
        self.put_stream(key, (data,))

    def _put_empty(self, key: str) -> bool:
        """An empty object (index and expiry entries are many): no bytes can be half
        written, so it is created in place, with no temporary and no file fsync; only
        its directory entry is made durable. False when an object already exists there
        (it may have content: the caller's atomic replace handles that)."""
        path = self._path(key)
        try:
            os.close(self._create_new(key, path))
        except FileExistsError:
            return False
        self._fsync_dir(path.parent)
        return True

    def copy(self, src: str, dst: str) -> None:
        # A hard link: objects are never changed in place (every write is a new file
        # renamed over the old), so two names can share one inode; no bytes are copied.
        source, path = self._path(src), self._path(dst)
        if not source.is_file():
            raise ObjectNotFound(src)
        tmp, fd = self._open_temp(dst, path)
        os.close(fd)
        try:
            os.unlink(tmp)
            os.link(source, tmp)
            os.replace(tmp, path)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise ObjectNotFound(src) from None
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise _storage_error("copy", dst, exc) from exc
            self.put_stream(dst, self.get_stream(src))  # a filesystem without hard links
            return
        self._fsync_dir(path.parent)

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        # Makes the rename itself durable; best effort (not every FS allows it).
        with contextlib.suppress(OSError):
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # --- reading -------------------------------------------------------------

    def _open(self, key: str):
        path = self._path(key)
        try:
            return open(path, "rb")  # noqa: SIM115 - closed by the caller
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise _storage_error("read", key, exc) from exc

    def get_stream(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        handle = self._open(key)  # eager: ObjectNotFound before the first chunk
        return self._read_chunks(handle, key, chunk_size)

    @staticmethod
    def _read_chunks(handle, key: str, chunk_size: int) -> Iterator[bytes]:
        with handle:
            while True:
                try:
                    chunk = handle.read(chunk_size)
                except OSError as exc:
                    raise _storage_error("read", key, exc) from exc
                if not chunk:
                    return
                yield chunk

    def get_bytes(self, key: str) -> bytes:
        with self._open(key) as handle:
            try:
                return handle.read()
            except OSError as exc:
                raise _storage_error("read", key, exc) from exc

    def size(self, key: str) -> int:
        path = self._path(key)
        try:
            if path.is_file():
                return path.stat().st_size
        except OSError as exc:
            raise _storage_error("stat", key, exc) from exc
        raise ObjectNotFound(key)

    def modified(self, key: str) -> float:
        # ctime: a copy is a hard link, whose mtime is its source's; linking (and the
        # rename that ends every write) sets the inode's ctime to now.
        path = self._path(key)
        try:
            if path.is_file():
                stat = path.stat()
                return max(stat.st_mtime, stat.st_ctime)
        except OSError as exc:
            raise _storage_error("stat", key, exc) from exc
        raise ObjectNotFound(key)

    def exists(self, key: str) -> bool:
        try:
            return self._path(key).is_file()
        except OSError as exc:
            raise _storage_error("stat", key, exc) from exc

    # --- deleting and listing --------------------------------------------------

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return
        except IsADirectoryError:
            return  # a "directory" is not an object; nothing to delete
        except OSError as exc:
            raise _storage_error("delete", key, exc) from exc
        self._prune_empty_dirs(path.parent)

    def _prune_empty_dirs(self, directory: Path) -> None:
        # Keeps the tree from filling with empty batch/shard folders. Every path here
        # is root joined with a checked key, so a lexical compare finds the root.
        while directory != self.root and directory.is_relative_to(self.root):
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    def list(self, prefix: str) -> Iterator[str]:
        if "\x00" in prefix or "\\" in prefix or prefix.startswith("/"):
            raise ValueError(f"invalid key prefix {prefix!r}")
        # Walk only the deepest directory the prefix names; filter the rest.
        base = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
        if any(part in {".", ".."} for part in base.split("/")):
            raise ValueError(f"invalid key prefix {prefix!r}")
        start = self.root.joinpath(*base.strip("/").split("/")) if base else self.root
        keys: list[str] = []
        def fail(exc: OSError) -> None:
            if not isinstance(exc, FileNotFoundError):  # a missing prefix is just empty
                raise exc

        try:
            for dirpath, _dirnames, filenames in os.walk(start, onerror=fail):
                rel = os.path.relpath(dirpath, self.root)
                rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
                for name in filenames:
                    key = rel + name
                    if TMP_MARKER not in name and key.startswith(prefix):
                        keys.append(key)
        except OSError as exc:
            raise _storage_error("list", prefix, exc) from exc
        keys.sort()
        return iter(keys)

    def list_page(self, prefix: str, *, start_after: str | None = None, limit: int = 1000) -> list[str]:
        if not prefix.endswith("/"):
            raise ValueError(f"list_page needs a folder prefix ending in '/', not {prefix!r}")
        directory = self.root.joinpath(*check_key(prefix.rstrip("/")).split("/"))
        try:
            names = sorted(
                entry.name for entry in os.scandir(directory) if entry.is_file() and TMP_MARKER not in entry.name
            )
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise _storage_error("list", prefix, exc) from exc
        keys = [prefix + name for name in names]
        if start_after is not None:
            keys = keys[bisect.bisect_right(keys, start_after):]
        return keys[:limit]

    def delete_prefix(self, prefix: str) -> None:
        if not prefix.endswith("/"):
            for key in list(self.list(prefix)):
                self.delete(key)
            return
        # A folder (a batch's working data): one bottom-up walk, each directory removed
        # once it is empty. A write still in flight keeps its temporary and its folder.
        directory = self.root.joinpath(*check_key(prefix.rstrip("/")).split("/"))

        def fail(exc: OSError) -> None:
            if not isinstance(exc, FileNotFoundError):
                raise exc

        try:
            for dirpath, _dirnames, filenames in os.walk(directory, topdown=False, onerror=fail):
                for name in filenames:
                    if TMP_MARKER not in name:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(dirpath, name))
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
        except OSError as exc:
            raise _storage_error("delete", prefix, exc) from exc
        self._prune_empty_dirs(directory.parent)

    # --- housekeeping ----------------------------------------------------------

    def remove_orphans(self, max_age_seconds: float) -> int:
        """Delete temporaries of writes that died mid-way (a killed process leaves them).

        Only those untouched for max_age_seconds: a live write keeps its temporary's
        mtime fresh with every chunk. Returns how many were removed.
        """
        cutoff = time.time() - max_age_seconds
        removed = 0
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                if TMP_MARKER not in name:
                    continue
                path = Path(dirpath) / name
                try:
                    if path.stat().st_mtime > cutoff:
                        continue
                    path.unlink()
                except FileNotFoundError:
                    continue  # its write finished (renamed) or another cleaner was first
                except OSError as exc:
                    log.warning("could not remove orphaned temporary %s: %s", path, exc)
                    continue
                removed += 1
                self._prune_empty_dirs(path.parent)
        return removed
