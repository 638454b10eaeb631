"""Storage faults in single-node mode.

- S3 (the nanio test server) stopped mid-batch for a few seconds: the batch completes
  once it is back, every custom_id exactly once.
- S3 away past the retry budget: the running shard's attempts fail, its lines become
  `shard_failed` error lines; while storage is still down the merge cannot run, so the
  batch stays in_progress (never a half-written result) and finalizes once S3 returns.
- A full or read-only local disk (a tiny tmpfs) and a file where a directory should
  be: uploads answer 503 `storage_unavailable` in the envelope, never 500, and leave
  nothing half-written behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest
from api_server import chat_line, jsonl, serve, start_api_server
from s3server import NanioServer, make_s3_store
from vbatch.api.services import Services
from vbatch.core.config import Settings
from vbatch.core.files import FileService
from vbatch.core.keys import KeyStore
from vbatch.core.sqlite_store import SqliteBatchStore
from vbatch.core.storage import open_store
from vbatch.operator.local_executor import LocalExecutor

pytestmark = pytest.mark.s3
TERMINAL = {"completed", "failed", "expired", "cancelled"}
PROJECT = "store-faults"


@contextlib.contextmanager
def s3_node(tmp_path: Path, server: NanioServer, *, retry_seconds: float, **overrides):
    """Gateway + local executor over an S3 bucket of the nanio server, echo engine."""
    info = server.info
    options = dict(
        data_dir=tmp_path, storage="s3", s3_endpoint=info.endpoint, s3_bucket=f"f-{uuid.uuid4().hex[:16]}",
        s3_access_key=info.access_key, s3_secret_key=info.secret_key, s3_region=info.region,
        s3_retry_seconds=retry_seconds, engine="echo", part_max_results=4, part_max_seconds=0.2,
    )
    settings = Settings(**(options | overrides))
    store = open_store(settings)
    files = FileService(store)
    batches = SqliteBatchStore(tmp_path / "batches.sqlite3")
    executor = LocalExecutor(settings=settings, store=store, files=files, batches=batches, served_models=None,
                             engine="echo", poll_seconds=0.1, retry_backoff=0.2)
    services = Services(settings=settings, files=files, batches=batches, keys=KeyStore(tmp_path / "keys"),
                        runner=executor)
    executor.start()
    try:
        with serve(services) as url:
            key = services.keys.create(PROJECT)
            with httpx.Client(base_url=url, headers={"x-api-key": key, "x-project-id": PROJECT}, timeout=120) as c:
                yield c, executor
    finally:
        executor.stop()


def submit(c: httpx.Client, n: int) -> tuple[bytes, dict]:
    content = jsonl([chat_line(f"s{i}", " ".join(["tok"] * (i % 5 + 1))) for i in range(n)])
    f = c.post("/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"})
    assert f.status_code == 200, f.text
    b = c.post("/v1/batches", json={"input_file_id": f.json()["id"], "endpoint": "/v1/chat/completions",
                                    "completion_window": "24h"})
    assert b.status_code == 200, b.text
    return content, b.json()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def batch_of(c: httpx.Client, batch_id: str) -> dict:
    r = c.get(f"/v1/batches/{batch_id}")
    assert r.status_code == 200, r.text  # the batch store is not the object store: always answers
    return r.json()


def result_lines(c: httpx.Client, batch: dict) -> list[dict]:
    lines = []
    for key in ("output_file_id", "error_file_id"):
        if batch[key]:
            r = c.get(f"/v1/files/{batch[key]}/content")
            assert r.status_code == 200
            assert int(r.headers["content-length"]) == len(r.content) and r.content.endswith(b"\n")
            lines += [json.loads(line) for line in r.content.splitlines()]  # every line parses
    return lines


@pytest.mark.timeout(150)
def test_s3_down_for_a_few_seconds_mid_batch_then_the_batch_completes(tmp_path, s3_server: NanioServer) -> None:
    s3_server.start()
    n = 40
    with s3_node(tmp_path, s3_server, retry_seconds=20, echo_delay_per_token=0.05, shard_target_requests=10) as (c, _):
        _, batch = submit(c, n)
        wait_for(lambda: batch_of(c, batch["id"])["request_counts"]["completed"] > 0, 60, "first results")
        s3_server.kill()  # as a crash would: connections refused from now on
        try:
            time.sleep(3)
            assert batch_of(c, batch["id"])["status"] in ("in_progress", "finalizing")
        finally:
            s3_server.start()
        final = wait_for(lambda: (b := batch_of(c, batch["id"]))["status"] in TERMINAL and b, 90, "the end")
        assert final["status"] == "completed", final
        assert final["request_counts"] == {"total": n, "completed": n, "failed": 0}
        lines = result_lines(c, final)
        assert Counter(x["custom_id"] for x in lines) == Counter(f"s{i}" for i in range(n))
        assert final["usage"]["output_tokens"] == sum(i % 5 + 1 for i in range(n))


@pytest.mark.timeout(60)
def test_the_s3_stand_in_recovers_a_key_its_crash_left_half_written(s3_server: NanioServer) -> None:
    # The restart test above relies on it: nanio writes an object's metadata through
    # one fixed temporary name, so a kill mid-write made that key unwritable for good.
    s3_server.start()
    store = make_s3_store(s3_server.info, bucket="crash-left", retry_seconds=1.0)
    store.put_bytes("p/ok", b"1")
    (meta,) = s3_server.data_dir.glob("crash-left/.nanio-meta/p/ok.json")
    (meta.parent / "part.json.tmp").write_bytes(b"{half")  # what the kill left
    s3_server.kill()
    s3_server.start()
    store.put_bytes("p/part", b"2")
    assert store.get_bytes("p/part") == b"2" and store.get_bytes("p/ok") == b"1"


@pytest.mark.timeout(200)
def test_s3_away_past_the_retry_budget_fails_the_shard_cleanly(tmp_path, s3_server: NanioServer) -> None:
    s3_server.start()
    n = 20
    # Two shards of 10; replies of 1..5 tokens x 0.3 s: a shard runs ~1.5 s, so the
    # outage catches the second one (or both) mid-work.
    with s3_node(tmp_path, s3_server, retry_seconds=0.5, echo_delay_per_token=0.3, shard_target_requests=10) as (
        c, executor
    ):
        _, batch = submit(c, n)
        wait_for(lambda: batch_of(c, batch["id"])["status"] == "in_progress"
                 and executor._slots[0].current is not None, 60, "a running shard")
        s3_server.kill()
        try:
            # The gateway answers clean 503s for storage, its batch store still works.
            r = c.get("/v1/files")
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "storage_unavailable"
            assert r.json()["error"]["type"] == "internal_error"

            def some_shard_failed() -> bool:
                book = executor.runtime._books.get(batch["id"])
                return bool(book and book.failed)

            wait_for(some_shard_failed, 120, "a shard to fail past its retry budget", interval=0.2)
            time.sleep(1.5)  # finalize rounds run (and fail) against the dead store meanwhile
            mid = batch_of(c, batch["id"])
            assert mid["status"] == "in_progress", mid  # not corrupted, not terminal: waiting
            assert mid["output_file_id"] is None and mid["error_file_id"] is None
        finally:
            s3_server.start()
        final = wait_for(lambda: (b := batch_of(c, batch["id"]))["status"] in TERMINAL and b, 90, "the end")
        lines = result_lines(c, final)
    assert final["status"] in ("completed", "failed"), final
    codes = {e["code"] for e in (final["errors"] or {}).get("data", [])}
    assert codes == {"shard_failed"}, final
    counts = final["request_counts"]
    assert counts["total"] == n == counts["completed"] + counts["failed"] and counts["failed"] > 0
    assert Counter(x["custom_id"] for x in lines) == Counter(f"s{i}" for i in range(n))
    failed = [x for x in lines if x["error"]]
    assert len(failed) == counts["failed"] and {x["error"]["code"] for x in failed} == {"shard_failed"}
    assert len([x for x in lines if not x["error"]]) == counts["completed"]


# --- local disk: full, read-only, a file where a directory should be --------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                       capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and ".vbatch-tmp-" in p.name]


def assert_503(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "storage_unavailable" and error["type"] == "internal_error", error
    assert "Traceback" not in r.text


def test_full_disk_uploads_are_503_and_leave_nothing(tmp_path: Path) -> None:
    with start_api_server(tmp_path) as server, tmpfs(server.services.settings.storage_dir, "256k") as disk:
        t = server.new_tenant()
        with server.client(t) as c:
            small = jsonl([chat_line("a")])
            first = c.post("/v1/files", files={"file": ("a.jsonl", small)}, data={"purpose": "batch"})
            assert first.status_code == 200
            big = jsonl([chat_line(f"r{i}", "x" * 1000) for i in range(400)])  # ~450 KB > the disk
            assert_503(c.post("/v1/files", files={"file": ("big.jsonl", big)}, data={"purpose": "batch"}))
            assert leftovers(disk) == []
            listed = c.get("/v1/files").json()["data"]
            assert [f["id"] for f in listed] == [first.json()["id"]]  # the failed upload never appears
            # Fill the disk with small files until it refuses: every refusal is a clean 503,
            # every accepted file is whole.
            accepted = {first.json()["id"]: small}
            for i in range(200):
                content = jsonl([chat_line(f"f{i}", "y" * 4000)])
                r = c.post("/v1/files", files={"file": (f"f{i}.jsonl", content)}, data={"purpose": "batch"})
                if r.status_code != 200:
                    assert_503(r)
                    break
                accepted[r.json()["id"]] = content
            else:
                raise AssertionError("a 256 KB disk never filled up")
            assert leftovers(disk) == []
            # No orphaned bytes either: exactly the accepted files, each with its metadata.
            stored = {p.name for p in (disk / "projects" / t.project / "files").iterdir()}
            assert stored == set(accepted) | {f"{i}.json" for i in accepted}
            for file_id, content in accepted.items():
                assert c.get(f"/v1/files/{file_id}/content").content == content
            # A batch created from a good file still works on the full disk (create only reads).
            assert c.post("/v1/batches", json={"input_file_id": first.json()["id"], "endpoint":
                          "/v1/chat/completions", "completion_window": "24h"}).status_code == 200
            # Space freed: uploads work again.
            for file_id in list(accepted)[1:]:
                assert c.delete(f"/v1/files/{file_id}").status_code == 200
            assert c.post("/v1/files", files={"file": ("again.jsonl", small)}, data={"purpose": "batch"}
                          ).status_code == 200


def test_read_only_disk_answers_503_not_500(tmp_path: Path) -> None:
    with start_api_server(tmp_path) as server, tmpfs(server.services.settings.storage_dir, "1m") as disk:
        t = server.new_tenant()
        with server.client(t) as c:
            content = jsonl([chat_line("a")])
            f = c.post("/v1/files", files={"file": ("a.jsonl", content)}, data={"purpose": "batch"}).json()
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, capture_output=True, timeout=10)
            try:
                assert_503(c.post("/v1/files", files={"file": ("b.jsonl", content)}, data={"purpose": "batch"}))
                assert_503(c.delete(f"/v1/files/{f['id']}"))
                # Reads still work, and the file is intact.
                assert c.get(f"/v1/files/{f['id']}/content").content == content
                assert [x["id"] for x in c.get("/v1/files").json()["data"]] == [f["id"]]
            finally:
                subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True, capture_output=True, timeout=10)
            assert leftovers(disk) == []


def test_a_file_where_the_storage_directory_should_be_is_503(tmp_path: Path) -> None:
    # Works without root: a regular file blocks the project's directory tree.
    with start_api_server(tmp_path) as server:
        t = server.new_tenant()
        blocker = server.services.settings.storage_dir / "projects" / t.project
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_bytes(b"not a directory")
        with server.client(t) as c:
            assert_503(c.post("/v1/files", files={"file": ("a.jsonl", jsonl([chat_line("a")]))},
                              data={"purpose": "batch"}))
            r = c.get("/v1/files")
            assert r.status_code in (200, 503), r.text
            if r.status_code == 503:
                assert_503(r)
            assert c.get("/v1/files/file-000000000000000000000000").status_code == 404
        assert blocker.read_bytes() == b"not a directory"
        assert not os.path.isdir(blocker)
