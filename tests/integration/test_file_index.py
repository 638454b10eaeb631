"""The per-project file index on both stores: `GET /v1/files` pages come from it in
the contract's order, and it stays consistent with the File objects through
crashes (an entry without a file is skipped and repaired; a file is always listed).
"""

from __future__ import annotations

import random
import time

import orjson
import pytest
from vbatch.core import file_index
from vbatch.core.files import STALE_ENTRY_SECONDS, FileService, file_key
from vbatch.core.schemas import FileObject, FilePurpose


def _file(files: FileService, project: str, created_at: int, purpose=FilePurpose.BATCH) -> FileObject:
    meta = files.create(project, [b"{}\n"], filename="x.jsonl", purpose=purpose)
    # Spread creation times (and make ties) without waiting: rewrite both the File
    # object and its entries as if created then.
    files.index.remove(project, meta)
    meta.created_at = created_at
    files.index.add(project, meta)
    files._write_meta(project, meta)
    return meta


def _pages(files: FileService, project: str, *, limit: int, order: str, purpose=None) -> list[list[str]]:
    pages, after = [], None
    while True:
        page, more = files.list(project, purpose=purpose, after=after, limit=limit, order=order)
        pages.append([f.id for f in page])
        if not more:
            return pages
        after = page[-1].id


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_pages_follow_creation_order_with_ties_by_id(object_store, order):
    files = FileService(object_store)
    rng = random.Random(7)
    made = [_file(files, "p", 1_700_000_000 + rng.randrange(5), rng.choice(list(FilePurpose))) for _ in range(23)]
    expected = [f.id for f in sorted(made, key=lambda f: (f.created_at, f.id), reverse=order == "desc")]
    pages = _pages(files, "p", limit=5, order=order)
    assert [len(p) for p in pages] == [5, 5, 5, 5, 3]
    assert sum(pages, []) == expected
    only_output = sum(_pages(files, "p", limit=4, order=order, purpose="batch_output"), [])
    assert only_output == [i for i in expected if next(f for f in made if f.id == i).purpose == "batch_output"]
    assert files.list("p", purpose="nonsense")[0] == []
    assert files.list("p", after="file-" + "0" * 24)[0] == []  # unknown cursor: nothing after it


def test_deleted_and_expired_files_are_not_listed(object_store):
    files = FileService(object_store)
    keep, gone = _file(files, "p", 100), _file(files, "p", 200)
    files.delete("p", gone.id)
    short = files.create("p", [b"{}\n"], filename="s", purpose=FilePurpose.BATCH, expires_after_seconds=1)
    object_store.put_bytes(file_key("p", short.id) + ".json",
                           orjson.dumps(short.model_dump(mode="json") | {"expires_at": int(time.time()) - 1}))
    assert [f.id for f in files.list("p")[0]] == [keep.id]
    # The deleted file's entries are gone (delete removes them after marking the File object).
    assert not any(gone.id in k for k in object_store.list(file_index.index_prefix("p", "batch", "asc")))


def test_an_entry_left_by_a_crashed_upload_is_skipped_then_repaired(object_store):
    files = FileService(object_store)
    live = _file(files, "p", 1_000)
    # A crash between writing the index entries and the File object: entries, no file.
    ghost = FileObject(id="file-" + "b" * 24, bytes=1, created_at=int(time.time()), filename="g", purpose=FilePurpose.BATCH)
    files.index.add("p", ghost)
    assert [f.id for f in files.list("p")[0]] == [live.id]
    desc = file_index.index_prefix("p", "batch", "desc")
    assert len(object_store.list_page(desc)) == 2  # young: maybe an upload in flight, kept
    old = ghost.model_copy(update={"id": "file-" + "c" * 24, "created_at": int(time.time()) - STALE_ENTRY_SECONDS - 5})
    files.index.add("p", old)
    assert [f.id for f in files.list("p")[0]] == [live.id]
    names = object_store.list_page(desc)
    assert not any(file_index.entry_file_id(k[len(desc):], "desc") == old.id for k in names)


def test_files_from_before_the_index_are_indexed_on_first_listing(object_store):
    files = FileService(object_store)
    made = [_file(files, "p", 10 + i) for i in range(3)]
    for key in [*object_store.list(file_index.index_root("p")), file_index.READY_PREFIX + "p"]:
        object_store.delete(key)  # as a store written by an older vbatch
    fresh = FileService(object_store)
    assert [f.id for f in fresh.list("p", order="asc")[0]] == [f.id for f in made]
    assert object_store.exists(file_index.READY_PREFIX + "p")


def test_list_page_pages_a_flat_folder(object_store):
    for name in ["b", "a", "d", "c"]:
        object_store.put_bytes(f"x/{name}", b"")
    object_store.put_bytes("x/sub/z", b"")  # deeper: not part of the folder
    assert object_store.list_page("x/") == ["x/a", "x/b", "x/c", "x/d"]
    assert object_store.list_page("x/", start_after="x/b", limit=1) == ["x/c"]
    assert object_store.list_page("nothing/") == []
