"""The object-store contract, run against both stores (local directory and S3 on nanio),
and the file service on top of each."""

from __future__ import annotations

import os
import time
import tracemalloc

import pytest
from s3server import make_s3_store
from vbatch.core.errors import NotFound, PayloadTooLarge, StorageError
from vbatch.core.files import FileService, file_key
from vbatch.core.schemas import FilePurpose
from vbatch.core.storage.base import ObjectNotFound, ObjectStore
from vbatch.core.storage.local import TMP_MARKER, LocalObjectStore

MiB = 1024 * 1024


class Boom(Exception):
    pass


def chunks_of(total: int, size: int = 64 * 1024, fill: bytes = b"x"):
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield (fill * n)[:n]
        sent += n


# --- the protocol --------------------------------------------------------------------


def test_both_stores_implement_the_protocol(local_store, tmp_path):
    assert isinstance(local_store, ObjectStore)
    from vbatch.core.storage.s3 import S3ObjectStore

    assert isinstance(S3ObjectStore("127.0.0.1:1", "vbatch", "k", "s"), ObjectStore)


def test_round_trip(object_store):
    data = bytes(range(256)) * 1000
    assert object_store.put_stream("p/files/one", iter([data[:1000], b"", data[1000:]])) == len(data)
    assert object_store.get_bytes("p/files/one") == data
    assert b"".join(object_store.get_stream("p/files/one", chunk_size=4096)) == data
    assert object_store.size("p/files/one") == len(data)
    assert object_store.exists("p/files/one")
    assert not object_store.exists("p/files/two")


def test_copy_is_whole_and_independent_of_its_source(object_store):
    data = b"".join(chunks_of(3 * 1024 * 1024))
    object_store.put_stream("p/src.bin", iter([data]))
    object_store.copy("p/src.bin", "q/copy.bin")
    assert object_store.get_bytes("q/copy.bin") == data
    object_store.delete("p/src.bin")  # the copy outlives its source, and survives its rewrite
    object_store.put_bytes("p/src.bin", b"new")
    assert object_store.get_bytes("q/copy.bin") == data
    with pytest.raises(ObjectNotFound):
        object_store.copy("p/missing.bin", "q/other.bin")
    assert not object_store.exists("q/other.bin")
    assert sorted(object_store.list("q/")) == ["q/copy.bin"]


def test_modified_is_when_the_object_was_written_or_copied(object_store, tmp_path):
    before = time.time() - 5
    object_store.put_bytes("m/a", b"a")
    assert before <= object_store.modified("m/a") <= time.time() + 5
    if isinstance(object_store, LocalObjectStore):  # a hard link keeps its source's mtime
        source = object_store.root / "m" / "a"
        os.utime(source, (time.time() - 7200, time.time() - 7200))
    object_store.copy("m/a", "m/b")
    assert object_store.modified("m/b") >= before
    with pytest.raises(ObjectNotFound):
        object_store.modified("m/missing")


def test_put_bytes_overwrites(object_store):
    object_store.put_bytes("k/meta.json", b'{"v": 1}')
    object_store.put_bytes("k/meta.json", b'{"v": 2}')
    assert object_store.get_bytes("k/meta.json") == b'{"v": 2}'
    object_store.put_bytes("k/empty", b"")
    assert object_store.get_bytes("k/empty") == b"" and object_store.size("k/empty") == 0


def test_streaming_put_bigger_than_a_part(object_store):
    # The S3 fixture uses 5 MiB parts, so 13 MiB is a 3-part multipart upload.
    total = 13 * MiB + 17
    assert object_store.put_stream("big/object", chunks_of(total, fill=b"abc")) == total
    assert object_store.size("big/object") == total
    received = 0
    for chunk in object_store.get_stream("big/object"):
        assert set(chunk) <= set(b"abc")
        received += len(chunk)
    assert received == total


def test_failing_iterable_leaves_nothing_and_propagates_unchanged(object_store):
    error = Boom("client went away")

    def upload():
        yield from chunks_of(7 * MiB)  # past the first S3 part: a multipart upload was begun
        raise error

    with pytest.raises(Boom) as info:
        object_store.put_stream("dir/partial", upload())
    assert info.value is error
    assert not object_store.exists("dir/partial")
    assert list(object_store.list("")) == []


def test_failed_overwrite_keeps_the_old_object(object_store):
    object_store.put_bytes("dir/obj", b"version 1")

    def upload():
        yield b"version 2, half"
        raise Boom()

    with pytest.raises(Boom):
        object_store.put_stream("dir/obj", upload())
    assert object_store.get_bytes("dir/obj") == b"version 1"
    assert list(object_store.list("dir/")) == ["dir/obj"]


def test_list_is_recursive_sorted_and_prefix_filtered(object_store):
    keys = ["a/b/2", "a-c", "a/a", "a/b/10", "ab", "b/x", "a/b/1"]
    for key in keys:
        object_store.put_bytes(key, key.encode())
    assert list(object_store.list("")) == sorted(keys)
    assert list(object_store.list("a")) == sorted(k for k in keys if k.startswith("a"))
    assert list(object_store.list("a/")) == ["a/a", "a/b/1", "a/b/10", "a/b/2"]
    assert list(object_store.list("a/b/1")) == ["a/b/1", "a/b/10"]
    assert list(object_store.list("zzz/")) == []


def test_delete_is_idempotent_and_delete_prefix(object_store):
    object_store.put_bytes("d/1", b"1")
    object_store.put_bytes("d/2", b"2")
    object_store.put_bytes("e/1", b"3")
    object_store.delete("d/1")
    object_store.delete("d/1")
    object_store.delete("never/was")
    assert not object_store.exists("d/1")
    object_store.delete_prefix("d/")
    assert list(object_store.list("")) == ["e/1"]


def test_delete_prefix_of_a_folder_removes_it_whole_and_only_it(object_store):
    for key in ("w/p/b1/shards/0", "w/p/b1/results/0/part-1", "w/p/b1/input", "w/p/b10/input", "w/p/other"):
        object_store.put_bytes(key, b"x")
    object_store.delete_prefix("w/p/b1/")
    # "b10" shares the name's start but is another folder
    assert list(object_store.list("w/")) == ["w/p/b10/input", "w/p/other"]
    object_store.delete_prefix("w/p/b1/")  # again: nothing there, no error
    object_store.delete_prefix("never/was/")


def test_empty_objects_are_objects_and_replace_content(object_store):
    object_store.put_bytes("idx/a", b"")
    assert object_store.exists("idx/a") and object_store.get_bytes("idx/a") == b""
    object_store.put_bytes("idx/a", b"")  # again: still there, still empty
    object_store.put_bytes("idx/b", b"content")
    object_store.put_bytes("idx/b", b"")  # an object with content becomes empty
    assert object_store.get_bytes("idx/b") == b""
    assert list(object_store.list("idx/")) == ["idx/a", "idx/b"]


def test_missing_objects_raise_object_not_found(object_store):
    with pytest.raises(ObjectNotFound):
        object_store.get_stream("no/such/key")  # eagerly: no next() needed
    with pytest.raises(ObjectNotFound):
        object_store.get_bytes("no/such/key")
    with pytest.raises(ObjectNotFound):
        object_store.size("no/such/key")


@pytest.mark.parametrize("key", ["../escape", "a/../../b", "/abs/key", "a\\b", "a\x00b", "a//b", "", "dir/"])
def test_bad_keys_are_refused(object_store, key):
    with pytest.raises(ValueError):
        object_store.put_bytes(key, b"x")


# --- local-store specifics ---------------------------------------------------------------


def test_local_writes_leave_no_temporaries(local_store):
    def upload():
        yield b"some"
        raise Boom()

    with pytest.raises(Boom):
        local_store.put_stream("x/y/z", upload())
    local_store.put_bytes("x/y/ok", b"fine")
    files = [os.path.join(d, f) for d, _, fs in os.walk(local_store.root) for f in fs]
    assert files == [str(local_store.root / "x" / "y" / "ok")]


def test_local_delete_prefix_prunes_empty_folders_but_spares_a_write_in_flight(local_store):
    local_store.put_bytes("w/p/b1/shards/0", b"x")
    local_store.put_bytes("w/p/b2/shards/0", b"x")
    local_store.delete_prefix("w/p/b1/")
    assert not (local_store.root / "w" / "p" / "b1").exists()
    assert (local_store.root / "w" / "p" / "b2" / "shards" / "0").is_file()
    local_store.delete_prefix("w/p/b2/")
    assert not (local_store.root / "w").exists()  # empty parents pruned up to the root
    assert local_store.root.is_dir()
    # A temporary of a write still going on keeps its folder (the writer renames it in)
    local_store.put_bytes("w/p/b3/parts/1", b"x")
    tmp = local_store.root / "w" / "p" / "b3" / "parts" / f"2{TMP_MARKER}abc"
    tmp.write_bytes(b"half")
    local_store.delete_prefix("w/p/b3/")
    assert list(local_store.list("w/")) == [] and tmp.is_file()


def test_local_streaming_put_uses_constant_memory(local_store):
    tracemalloc.start()
    try:
        local_store.put_stream("big", chunks_of(64 * MiB))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert local_store.size("big") == 64 * MiB
    assert peak < 2 * MiB, peak


def test_local_storage_error_when_root_is_not_a_directory(tmp_path):
    root = tmp_path / "not-a-dir"
    root.write_bytes(b"")
    store = LocalObjectStore(root)
    with pytest.raises(StorageError) as info:
        store.put_bytes("a/b", b"x")
    assert info.value.status_code == 503 and "'a/b'" in info.value.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_local_storage_error_on_read_only_directory(tmp_path):
    store = LocalObjectStore(tmp_path / "ro")
    store.put_bytes("files/one", b"1")
    os.chmod(tmp_path / "ro" / "files", 0o500)
    try:
        with pytest.raises(StorageError):
            store.put_bytes("files/two", b"2")
    finally:
        os.chmod(tmp_path / "ro" / "files", 0o700)
    assert list(store.list("")) == ["files/one"]


# --- S3 specifics -----------------------------------------------------------------------


@pytest.mark.s3
def test_s3_aborted_upload_leaves_no_multipart_state(s3_store, s3_info):
    def upload():
        yield from chunks_of(12 * MiB)  # two parts uploaded, the third never comes
        raise Boom()

    with pytest.raises(Boom):
        s3_store.put_stream("k", upload())
    pending = s3_info.data_dir / ".nanio" / "multipart"
    assert not pending.exists() or list(pending.iterdir()) == []


@pytest.mark.s3
def test_s3_streaming_put_memory_is_bounded_by_the_part_size(s3_store):
    tracemalloc.start()
    try:
        s3_store.put_stream("big", chunks_of(100 * MiB))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert s3_store.size("big") == 100 * MiB
    # two parts uploading and one being read (plus signing copies): a few parts,
    # whatever the object's size
    assert peak < 6 * s3_store.part_size, peak


@pytest.mark.s3
def test_s3_unreachable_server_is_a_storage_error_after_bounded_retries(s3_server, s3_info):
    store = make_s3_store(s3_info, retry_seconds=2.0)
    store.put_bytes("survives", b"restart")
    s3_server.stop()
    try:
        started = time.monotonic()
        with pytest.raises(StorageError) as info:
            store.get_bytes("survives")
        assert time.monotonic() - started < 10
        assert info.value.status_code == 503
    finally:
        s3_server.start()
    assert store.get_bytes("survives") == b"restart"


@pytest.mark.s3
def test_s3_retries_ride_out_a_short_outage(s3_server, s3_info):
    import threading

    store = make_s3_store(s3_info, retry_seconds=20.0)
    store.put_bytes("k", b"v")
    s3_server.stop()
    timer = threading.Timer(1.0, s3_server.start)
    timer.start()
    try:
        assert store.get_bytes("k") == b"v"  # retried until the server was back
    finally:
        timer.join()


# --- the file service over both stores ---------------------------------------------------


def test_file_service_create_get_open(object_store):
    files = FileService(object_store)
    meta = files.create("proj", iter([b'{"a":1}\n', b'{"b":2}\n']), filename="input.jsonl", purpose=FilePurpose.BATCH)
    assert meta.id.startswith("file-") and meta.bytes == 16 and meta.filename == "input.jsonl"
    assert meta.expires_at == meta.created_at + 30 * 24 * 3600
    assert files.get("proj", meta.id) == meta
    got, stream = files.open("proj", meta.id)
    assert got == meta and b"".join(stream) == b'{"a":1}\n{"b":2}\n'
    with pytest.raises(NotFound):
        files.get("other-project", meta.id)  # tenancy: another project's id is unknown


@pytest.mark.parametrize(
    ("given", "stored"),
    [("../../etc/passwd", "passwd"), ("C:\\Users\\me\\in.jsonl", "in.jsonl"), ("..", None), (None, None), ("a\x00b\n.jsonl", "ab.jsonl")],
)
def test_file_service_filenames_are_data_not_paths(object_store, given, stored):
    meta = FileService(object_store).create("proj", [b"{}\n"], filename=given, purpose=FilePurpose.BATCH)
    assert meta.filename == (stored or f"{meta.id}.jsonl")
    # Only vbatch's own names reach storage (the bytes, the File object; index entries by id).
    assert sorted(object_store.list("projects/proj/files/")) == [file_key("proj", meta.id), file_key("proj", meta.id) + ".json"]
    assert not any(stored and stored in key for key in object_store.list(""))


def test_file_service_list_pagination_and_delete(object_store):
    files = FileService(object_store)
    ids = {files.create("proj", [b"{}\n"], filename=f"f{i}", purpose=FilePurpose.BATCH).id for i in range(5)}
    out = files.create("proj", [b"{}\n"], filename="out", purpose=FilePurpose.BATCH_OUTPUT, is_error=True)

    everything, more = files.list("proj")
    assert not more and {f.id for f in everything} == ids | {out.id}
    seen, after = [], None
    while True:
        page, more = files.list("proj", purpose="batch", limit=2, after=after)
        seen += [f.id for f in page]
        if not more:
            break
        after = page[-1].id
    assert len(seen) == 5 and set(seen) == ids
    assert [f.id for f in files.list("proj", purpose="batch_output")[0]] == [out.id]
    asc = [f.id for f in files.list("proj", order="asc")[0]]
    assert asc == [f.id for f in reversed(everything)]

    victim = seen[0]
    files.delete("proj", victim)
    with pytest.raises(NotFound):
        files.get("proj", victim)
    with pytest.raises(NotFound):
        files.open("proj", victim)
    with pytest.raises(NotFound):
        files.delete("proj", victim)
    assert victim not in {f.id for f in files.list("proj")[0]}
    assert not object_store.exists(file_key("proj", victim))  # the bytes are gone at once


def test_file_service_size_limit_leaves_nothing(object_store):
    files = FileService(object_store)
    with pytest.raises(PayloadTooLarge) as info:
        files.create("proj", chunks_of(6 * MiB), filename="big.jsonl", purpose=FilePurpose.BATCH, max_bytes=5 * MiB)
    assert info.value.status_code == 413
    assert list(object_store.list("")) == []
    assert files.list("proj") == ([], False)


def test_an_invalid_bucket_name_is_refused_at_start_up():
    from vbatch.core.storage.s3 import S3ObjectStore

    with pytest.raises(ValueError, match="bucket 'b'"):
        S3ObjectStore(endpoint="127.0.0.1:9", bucket="b", access_key="k", secret_key="s")


# --- paged listing and the batch index ------------------------------------------------


def test_list_pages_with_start_after_and_limit(object_store):
    keys = [f"p/idx/{c}" for c in "0189ABYZ"] + ["p/other/x", "p/idx2", "p/idx/sub/deeper"]
    for key in keys:
        object_store.put_bytes(key, b"")
    # one flat folder: "p/idx/sub/deeper" is in a folder of its own
    assert object_store.list_page("p/idx/", limit=3) == ["p/idx/0", "p/idx/1", "p/idx/8"]
    assert object_store.list_page("p/idx/", start_after="p/idx/8", limit=3) == ["p/idx/9", "p/idx/A", "p/idx/B"]
    assert object_store.list_page("p/idx/", start_after="p/idx/B") == ["p/idx/Y", "p/idx/Z"]
    assert object_store.list_page("p/idx/", start_after="p/idx/Z", limit=5) == []
    assert object_store.list_page("p/idx/", start_after="p/idx/0x") == [f"p/idx/{c}" for c in "189ABYZ"]
    assert list(object_store.list("p/idx/")) == [f"p/idx/{c}" for c in "0189ABYZ"] + ["p/idx/sub/deeper"]


def test_the_batch_index_lists_newest_first_in_pages(object_store):
    from ulid import ULID
    from vbatch.core.batch_index import BatchIndex, created_ms, index_key
    from vbatch.core.schemas import BatchRecord

    ids = [f"batch_{ULID.from_timestamp(1_700_000_000 + i)}" for i in range(25)]
    index = BatchIndex(object_store)
    for batch_id in reversed(ids):
        index.add("p", batch_id)
    index.add("q", ids[0])
    newest_first = ids[::-1]
    assert index.ids_after("p", None, 10) == newest_first[:10]
    assert index.ids_after("p", newest_first[9], 10) == newest_first[10:20]
    assert index.ids_after("p", newest_first[19], 10) == newest_first[20:]
    assert index.ids_after("q", None, 10) == [ids[0]]
    assert created_ms(ids[3]) == ULID.from_str(ids[3].removeprefix("batch_")).milliseconds
    assert index_key("p", ids[1]) < index_key("p", ids[0])

    record = BatchRecord(id=ids[0], project="p", endpoint="/v1/chat/completions", input_file_id="file-x",
                         completion_window="24h", status="completed", created_at=1, completed_at=2, revision="7")
    index.archive(record)
    assert index.archived("p", ids[0]) == record.model_copy(update={"revision": None})
    assert index.archived("q", ids[0]) is None and index.archived("p", ids[1]) is None
