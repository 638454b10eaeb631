"""Every route on a full (and a read-only) data disk, or with S3 away (issue 12, case 3).

The whole data dir — the SQLite batch store and the object store — sits on a small
tmpfs made by the test (needs root, as in CI; skipped otherwise). Writes answer 503
in the envelope with Retry-After, never 500; reads keep working; nothing stored is
corrupted; once space is back everything works again. Two more tests make SQLite
itself report "database or disk is full" (max_page_count) and "attempt to write a
readonly database" (query_only), which need no root. The last runs every route with
the S3 store unreachable. (The object store on a read-only disk: test_faults_storage.)
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import httpx
import pytest
from api_server import chat_line, jsonl, start_api_server
from test_faults_storage import leftovers, tmpfs

CREATE = {"endpoint": "/v1/chat/completions", "completion_window": "24h"}


def assert_storage_503(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["type"] == "internal_error" and error["code"] == "storage_unavailable", error
    assert int(r.headers["retry-after"]) > 0
    assert "Traceback" not in r.text and "sqlite3" not in r.text  # no internals


def fill(disk: Path) -> Path:
    """Write a filler file until the disk is full; returns it (delete it to free the space)."""
    filler = disk / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    with contextlib.suppress(OSError):  # the last partial blocks too
        with open(disk / "filler-2", "wb") as out:
            for _ in range(1024):
                out.write(b"\0" * 512)
                out.flush()
    return filler


@pytest.mark.timeout(120)
def test_every_route_on_a_full_data_disk(tmp_path: Path) -> None:
    content = jsonl([chat_line("a"), chat_line("b")])
    with tmpfs(tmp_path / "data", "4m") as disk, start_api_server(disk) as server:
        t = server.new_tenant()
        with server.client(t) as c:
            f = c.post("/v1/files", files={"file": ("a.jsonl", content)}, data={"purpose": "batch"}).json()
            spare = c.post("/v1/files", files={"file": ("b.jsonl", content)}, data={"purpose": "batch"}).json()
            b = c.post("/v1/batches", json={"input_file_id": f["id"], **CREATE}).json()
            fill(disk)

            # Writes: 503 + Retry-After, never 500.
            assert_storage_503(c.post("/v1/files", files={"file": ("c.jsonl", content)}, data={"purpose": "batch"}))
            assert_storage_503(c.post("/v1/batches", json={"input_file_id": f["id"], **CREATE}))
            assert_storage_503(c.post(f"/v1/batches/{b['id']}/cancel"))
            # Reads work.
            assert c.get("/v1/files").status_code == 200
            assert c.get(f"/v1/files/{f['id']}").status_code == 200
            assert c.get(f"/v1/files/{f['id']}/content").content == content
            assert c.get("/v1/batches").json()["data"][0]["id"] == b["id"]
            assert c.get(f"/v1/batches/{b['id']}").json()["status"] == "in_progress"  # the failed cancel left it
            assert c.get("/healthz").status_code == 200
            # Deleting frees space, so it works (or answers 503 and leaves the file whole).
            r = c.delete(f"/v1/files/{spare['id']}")
            if r.status_code == 200:
                assert c.get(f"/v1/files/{spare['id']}").status_code == 404
            else:
                assert_storage_503(r)
                got = c.get(f"/v1/files/{spare['id']}")
                assert got.status_code == 404 or c.get(f"/v1/files/{spare['id']}/content").content == content
            assert server.runner.submitted_ids == [b["id"]] and server.runner.cancelled_ids == []

            # Space back: everything works again, nothing was corrupted.
            for name in ("filler", "filler-2"):
                with contextlib.suppress(FileNotFoundError):
                    (disk / name).unlink()
            again = c.post("/v1/batches", json={"input_file_id": f["id"], **CREATE})
            assert again.status_code == 200, again.text
            assert c.post(f"/v1/batches/{b['id']}/cancel").status_code == 200
            assert c.post("/v1/files", files={"file": ("d.jsonl", content)}, data={"purpose": "batch"}
                          ).status_code == 200
            assert {x["id"] for x in c.get("/v1/batches").json()["data"]} == {b["id"], again.json()["id"]}
        assert leftovers(disk) == []


def test_a_read_only_batch_store_is_503(tmp_path: Path) -> None:
    # A tmpfs cannot be remounted read-only under an open SQLite database (EBUSY);
    # query_only makes SQLite refuse writes with its read-only error instead.
    with start_api_server(tmp_path) as server:
        t = server.new_tenant()
        with server.client(t) as c:
            f = c.post("/v1/files", files={"file": ("a.jsonl", jsonl([chat_line("a")]))},
                       data={"purpose": "batch"}).json()
            b = c.post("/v1/batches", json={"input_file_id": f["id"], **CREATE}).json()
            db = server.services.batches._db
            db.execute("PRAGMA query_only = ON")
            try:
                assert_storage_503(c.post("/v1/batches", json={"input_file_id": f["id"], **CREATE}))
                assert_storage_503(c.post(f"/v1/batches/{b['id']}/cancel"))
                assert c.get(f"/v1/batches/{b['id']}").json()["status"] == "in_progress"
                assert len(c.get("/v1/batches").json()["data"]) == 1
            finally:
                db.execute("PRAGMA query_only = OFF")
            assert c.post(f"/v1/batches/{b['id']}/cancel").status_code == 200


def test_sqlite_reporting_a_full_database_is_503(tmp_path: Path) -> None:
    # No root needed: SQLite's own limit raises the very error a full disk does.
    with start_api_server(tmp_path) as server:
        t = server.new_tenant()
        with server.client(t) as c:
            f = c.post("/v1/files", files={"file": ("a.jsonl", jsonl([chat_line("a")]))},
                       data={"purpose": "batch"}).json()
            b = c.post("/v1/batches", json={"input_file_id": f["id"], **CREATE}).json()
            db = server.services.batches._db  # the store's own connection: the limit is per connection
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            db.execute(f"PRAGMA max_page_count = {pages}")
            big = {"input_file_id": f["id"], **CREATE, "metadata": {f"k{i}": "v" * 500 for i in range(16)}}
            for _ in range(50):  # fill the last free page, then the next create has none
                r = c.post("/v1/batches", json=big)
                if r.status_code != 200:
                    break
            assert_storage_503(r)
            assert "full" in r.json()["error"]["message"]
            assert c.get(f"/v1/batches/{b['id']}").status_code == 200
            db.execute("PRAGMA max_page_count = 1073741823")
            assert c.post("/v1/batches", json={"input_file_id": f["id"], **CREATE}).status_code == 200
    assert os.path.exists(tmp_path / "batches.sqlite")


@pytest.mark.s3
@pytest.mark.timeout(120)
def test_every_route_with_s3_unreachable(tmp_path: Path, s3_server) -> None:
    from test_faults_storage import s3_node

    s3_server.start()
    content = jsonl([chat_line("a")])
    with s3_node(tmp_path, s3_server, retry_seconds=0.5) as (c, _):
        f = c.post("/v1/files", files={"file": ("a.jsonl", content)}, data={"purpose": "batch"}).json()
        b = c.post("/v1/batches", json={"input_file_id": f["id"], **CREATE}).json()
        s3_server.kill()
        try:
            assert_storage_503(c.post("/v1/files", files={"file": ("b.jsonl", content)}, data={"purpose": "batch"}))
            assert_storage_503(c.get("/v1/files"))
            assert_storage_503(c.get(f"/v1/files/{f['id']}"))
            assert_storage_503(c.get(f"/v1/files/{f['id']}/content"))
            assert_storage_503(c.delete(f"/v1/files/{f['id']}"))
            assert_storage_503(c.post("/v1/batches", json={"input_file_id": f["id"], **CREATE}))
            # The batch store is not the object store: batches still answer.
            assert c.get(f"/v1/batches/{b['id']}").status_code == 200
            assert c.post(f"/v1/batches/{b['id']}/cancel").status_code == 200
        finally:
            s3_server.start()
        assert c.get(f"/v1/files/{f['id']}/content").content == content
