"""Coverage-guided fuzz target: the streaming multipart upload parser (vbatch.api.uploads).

    python fuzz/fuzz_multipart.py [libFuzzer flags] [corpus dirs]    # atheris
    tests/robustness/test_fuzz.py                                    # a bounded run in CI

An input is a request body for the boundary `fuzzb`; its first byte picks how it is
cut into network chunks. It runs through the gateway's own upload code (`_Upload`,
over a file service on an in-memory object store). Properties:
- the outcome is a stored File object or a client error (VBatchError, 4xx) — no
  other exception escapes;
- after an error nothing is stored; after success exactly that file is, whole;
- where the chunks are cut changes nothing.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from vbatch.api.services import Services
    from vbatch.api.uploads import _Upload
    from vbatch.core.config import Limits, Settings
    from vbatch.core import file_index
    from vbatch.core.errors import VBatchError
    from vbatch.core.files import FileService
    from vbatch.core.storage.base import ObjectNotFound

BOUNDARY = b"fuzzb"
MAX_FILE_BYTES = 2048
EXECUTOR = ThreadPoolExecutor(max_workers=2)
SETTINGS = Settings(data_dir=Path(tempfile.gettempdir()) / "vbatch-fuzz", limits=Limits(max_file_bytes=MAX_FILE_BYTES))


class MemoryStore:
    """A minimal ObjectStore in a dict (the parser, not storage, is under test)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        data = b"".join(chunks)  # an exception from chunks leaves nothing, as the protocol says
        self.objects[key] = data
        return len(data)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.objects[key] = bytes(data)

    def get_stream(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        return iter([self.get_bytes(key)])

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.objects[key]
        except KeyError:
            raise ObjectNotFound(key) from None

    def size(self, key: str) -> int:
        return len(self.get_bytes(key))

    def exists(self, key: str) -> bool:
        return key in self.objects

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    def list(self, prefix: str) -> Iterator[str]:
        return iter(sorted(k for k in self.objects if k.startswith(prefix)))

    def list_page(self, prefix: str, *, start_after: str | None = None, limit: int = 1000) -> list[str]:
        keys = (k for k in self.list(prefix) if "/" not in k[len(prefix):])
        return [k for k in keys if start_after is None or k > start_after][:limit]

    def delete_prefix(self, prefix: str) -> None:
        for key in list(self.list(prefix)):
            self.delete(key)


class FakeRequest:
    """What _Upload reads of a Starlette request: headers and the body stream."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY.decode()}"}
        self._chunks = chunks

    async def stream(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk


def upload(chunks: list[bytes]) -> tuple[str, object, dict[str, bytes]]:
    store = MemoryStore()
    services = Services(settings=SETTINGS, files=FileService(store), batches=None, keys=None)  # type: ignore[arg-type]

    async def run():
        return await _Upload(FakeRequest(chunks), "fuzz", services, EXECUTOR).run()  # type: ignore[arg-type]

    try:
        meta = asyncio.run(run())
    except VBatchError as exc:
        assert 400 <= exc.status_code < 500, exc
        # (a project's "index built" marker is the only thing a refused upload may leave)
        left = sorted(k for k in store.objects if not k.startswith(file_index.READY_PREFIX))
        assert left == [], f"{type(exc).__name__} left {left}"
        return type(exc).__name__ + ":" + (exc.code or ""), None, store.objects
    content = store.objects[f"projects/fuzz/files/{meta.id}"]
    assert meta.bytes == len(content) <= MAX_FILE_BYTES
    # The bytes and the File object, plus its index and expiry entries (and the project's
    # "index built" marker): nothing else, and nothing of another file.
    data = [k for k in store.objects if k.startswith("projects/fuzz/files/")]
    assert sorted(data) == [f"projects/fuzz/files/{meta.id}", f"projects/fuzz/files/{meta.id}.json"], data
    others = [k for k in store.objects if k not in data and not k.startswith(file_index.READY_PREFIX)]
    # asc + desc index entries and its expiry entry (two when expires_after came after the
    # file: the sweeper drops the stale one when it comes due)
    index = [k for k in others if k.startswith("projects/fuzz/file-index/")]
    expiry = [k for k in others if k.startswith(file_index.EXPIRY_PREFIX)]
    assert len(index) == 2 and 1 <= len(expiry) <= 2 and len(index) + len(expiry) == len(others), others
    # (a filename with nothing printable left defaults to "<id>.jsonl": ids differ per run)
    return "ok", (content, meta.filename.replace(meta.id, "<id>")), store.objects


def test_one_input(data: bytes) -> None:
    if not data:
        return
    size = data[0] % 61 + 1
    body = data[1:]
    whole = upload([body])
    pieces = upload([body[i : i + size] for i in range(0, len(body), size)])
    assert whole[:2] == pieces[:2], (whole[:2], pieces[:2])


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
