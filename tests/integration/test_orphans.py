"""Temporaries of writes killed mid-way are cleaned up (issue 12, case 6).

A write killed with SIGKILL leaves its temporary file (local store) or an incomplete
multipart upload (S3). `remove_orphans` deletes those untouched for longer than the
max age, `vbatch serve` runs it before serving and then periodically (the Janitor).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from vbatch.core import lifecycle, state
from vbatch.core.files import FileService
from vbatch.core.janitor import Janitor, remove_orphan_batch_data
from vbatch.core.layout import batch_prefix, input_key
from vbatch.core.schemas import FilePurpose
from vbatch.core.sqlite_store import SqliteBatchStore
from vbatch.core.storage.local import TMP_MARKER, LocalObjectStore

HOUR = 3600


def temporaries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and TMP_MARKER in p.name)


def killed_write(root: Path, key: str) -> Path:
    """A child process streams into `key` and is SIGKILLed mid-way: its temporary stays."""
    code = textwrap.dedent(f"""
        import sys, time
        from vbatch.core.storage.local import LocalObjectStore
        def chunks():
            yield b"x" * 1000
            print("writing", flush=True)
            time.sleep(60)
        LocalObjectStore({str(root)!r}).put_stream({key!r}, chunks())
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "writing"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    (left,) = temporaries(root)
    return left


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_remove_orphans_deletes_only_old_temporaries(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    store.put_bytes("projects/p/files/kept", b"whole")
    old = killed_write(tmp_path, "projects/p/files/file-a")
    fresh = killed_write(tmp_path / "other", "projects/p/files/file-b")
    age(old, 2 * HOUR)
    assert store.remove_orphans(HOUR) == 1
    assert not old.exists() and old.parent.exists()  # the directory holding `kept` stays
    assert store.get_bytes("projects/p/files/kept") == b"whole"
    assert LocalObjectStore(tmp_path / "other").remove_orphans(HOUR) == 0  # a recent write may still be live
    assert fresh.exists()
    assert list(store.list("")) == ["projects/p/files/kept"]


def test_an_orphan_alone_in_its_directory_takes_the_directory_with_it(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    left = killed_write(tmp_path, "projects/p/batches/b/results/0/part-000001.jsonl")
    age(left, 2 * HOUR)
    assert store.remove_orphans(HOUR) == 1
    assert not (tmp_path / "projects").exists()


def test_the_janitor_cleans_at_start_and_then_periodically(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    first = killed_write(tmp_path, "projects/p/files/file-a")
    age(first, 2 * HOUR)
    janitor = Janitor(store, max_age_seconds=HOUR, interval_seconds=0.2)
    janitor.start()
    try:
        assert not first.exists()  # before start() returns
        later = killed_write(tmp_path, "projects/p/files/file-b")
        age(later, 2 * HOUR)
        deadline = time.monotonic() + 20
        while later.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not later.exists()
    finally:
        janitor.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(120)
def test_vbatch_serve_removes_orphans_at_start_up(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    old = killed_write(storage, "projects/p/files/file-a")
    age(old, 2 * HOUR)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "vbatch.cli", "serve", "--engine", "echo", "--data-dir", str(tmp_path),
         "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                time.sleep(0.2)
        else:
            raise AssertionError("vbatch serve did not start")
        assert not old.exists()
    finally:
        server.terminate()
        server.wait(timeout=30)


def _batch_for(project: str, file_id: str):
    return state.new_batch(project=project, input_file_id=file_id, endpoint="/v1/chat/completions",
                           completion_window="24h", metadata=None, total=1, model="m",
                           window_seconds=86400, now=int(time.time()))


def test_an_input_copy_whose_batch_was_never_created_is_removed_once_old(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "storage")
    files = FileService(store)
    batches = SqliteBatchStore(tmp_path / "batches.sqlite")
    upload = files.create("p", iter([b'{"custom_id": "a"}\n']), filename="in.jsonl", purpose=FilePurpose.BATCH)
    # A create that went through, and one whose gateway died between the copy and the record.
    kept = _batch_for("p", upload.id)
    lifecycle.keep_input(files, kept)
    batches.create(kept)
    orphan = _batch_for("p", upload.id)
    lifecycle.keep_input(files, orphan)
    store.put_bytes(batch_prefix("p", orphan.id) + "shards/0.jsonl", b"x")

    def exists(project: str, batch_id: str) -> bool:
        return batches.get(project, batch_id) is not None

    # Young: a create may still be under way.
    assert remove_orphan_batch_data(store, exists, max_age_seconds=HOUR) == 0
    assert store.exists(input_key("p", orphan.id))
    janitor = Janitor(store, max_age_seconds=0, interval_seconds=0, batch_exists=exists)
    janitor.start()
    assert list(store.list(batch_prefix("p", orphan.id))) == []
    assert not (store.root / "projects" / "p" / "batches" / orphan.id).exists()
    assert store.exists(input_key("p", kept.id))  # the batch that exists keeps its copy
    assert files.get("p", upload.id).id == upload.id  # and the input file stays


def test_a_failing_batch_lookup_removes_nothing(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "storage")
    files = FileService(store)
    upload = files.create("p", iter([b'{"custom_id": "a"}\n']), filename="in.jsonl", purpose=FilePurpose.BATCH)
    orphan = _batch_for("p", upload.id)
    lifecycle.keep_input(files, orphan)

    def unreachable(project: str, batch_id: str) -> bool:
        raise OSError("the batch store is away")

    assert remove_orphan_batch_data(store, unreachable, max_age_seconds=0) == 0
    assert store.exists(input_key("p", orphan.id))


@pytest.mark.s3
def test_s3_incomplete_multipart_uploads_are_aborted(s3_store) -> None:
    client, bucket = s3_store.client, s3_store.bucket
    s3_store.put_bytes("projects/p/files/kept", b"whole")
    # What a writer killed between parts leaves: an upload begun, one part sent, never completed.
    upload_id = client._create_multipart_upload(bucket, "projects/p/files/file-a", {})
    client._upload_part(bucket, "projects/p/files/file-a", b"x" * (5 * 1024 * 1024), None, upload_id, 1)
    try:
        pending = client._list_multipart_uploads(bucket).uploads
    except Exception as exc:  # noqa: BLE001 - the test server may not implement the listing
        pytest.skip(f"the S3 test server cannot list multipart uploads: {exc}")
    assert [u.upload_id for u in pending] == [upload_id]
    assert s3_store.remove_orphans(HOUR) == 0  # begun just now: may still be live
    assert s3_store.remove_orphans(0) == 1
    assert client._list_multipart_uploads(bucket).uploads == []
    assert list(s3_store.list("")) == ["projects/p/files/kept"]
