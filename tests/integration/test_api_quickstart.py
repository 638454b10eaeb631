"""The seed quickstart's curl flow, step by step, with the bytes curl sends."""

from __future__ import annotations

import httpx
from api_server import QUICKSTART_JSONL, ApiServer, Tenant

FILE_KEYS = {"id", "object", "bytes", "created_at", "expires_at", "filename", "purpose", "status", "status_details"}
BATCH_KEYS = {
    "id", "object", "endpoint", "model", "errors", "input_file_id", "completion_window", "status",
    "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at", "finalizing_at",
    "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at", "request_counts",
    "usage", "metadata",
}  # fmt: skip


def curl_form(fields: list[tuple[str, str | tuple[str, bytes]]]) -> tuple[bytes, str]:
    """The body and content type of `curl -F a=b -F file=@name` (fields in command-line order)."""
    boundary = "------------------------d74496d66958873e"
    out = bytearray()
    for name, value in fields:
        out += f"--{boundary}\r\n".encode()
        if isinstance(value, tuple):
            filename, data = value
            out += f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'.encode()
            out += b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
        else:
            out += f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def test_quickstart_curl_flow(api_server: ApiServer, tenant: Tenant) -> None:
    auth = {"x-api-key": tenant.key, "x-project-id": tenant.project}

    # 2. Upload the file: curl -F purpose=batch -F file=@input.jsonl
    body, ctype = curl_form([("purpose", "batch"), ("file", ("input.jsonl", QUICKSTART_JSONL))])
    r = httpx.post(f"{api_server.url}/v1/files", content=body, headers=auth | {"content-type": ctype})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-request-id"].startswith("req_")
    f = r.json()
    assert set(f) == FILE_KEYS
    assert f["id"].startswith("file-")
    assert (f["object"], f["bytes"], f["filename"], f["purpose"], f["status"]) == (
        "file", len(QUICKSTART_JSONL), "input.jsonl", "batch", "processed",
    )  # fmt: skip
    assert f["expires_at"] > f["created_at"]

    # 3. Create the batch: curl -H "content-type: application/json" -d '{...}'
    r = httpx.post(
        f"{api_server.url}/v1/batches",
        headers=auth | {"content-type": "application/json"},
        content=b'{\n    "input_file_id":     "%s",\n    "endpoint":          "/v1/chat/completions",\n'
        b'    "completion_window": "24h"\n  }' % f["id"].encode(),
    )
    assert r.status_code == 200, r.text
    batch = r.json()
    assert set(batch) == BATCH_KEYS
    assert batch["id"].startswith("batch_")
    assert batch["object"] == "batch"
    assert batch["endpoint"] == "/v1/chat/completions"
    assert batch["status"] == "in_progress"
    assert batch["input_file_id"] == f["id"]
    assert batch["output_file_id"] is None and batch["error_file_id"] is None
    assert batch["request_counts"] == {"total": 3, "completed": 0, "failed": 0}
    assert batch["expires_at"] == batch["created_at"] + 24 * 3600

    # 4. Poll: GET /v1/batches/$BATCH_ID, `jq -c '{status, request_counts}'`
    r = httpx.get(f"{api_server.url}/v1/batches/{batch['id']}", headers=auth)
    assert r.status_code == 200
    assert r.json()["status"] == "in_progress"
    assert r.json()["request_counts"]["total"] == 3

    # 5. Download: GET /v1/files/{id}/content (the input here; results need an executor)
    r = httpx.get(f"{api_server.url}/v1/files/{f['id']}/content", headers=auth)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/jsonl"
    assert r.content == QUICKSTART_JSONL


def test_file_part_before_purpose_is_accepted(api_server: ApiServer, tenant: Tenant) -> None:
    # Other clients send the file first; purpose is only known at the end.
    body, ctype = curl_form([("file", ("input.jsonl", QUICKSTART_JSONL)), ("purpose", "batch")])
    r = httpx.post(f"{api_server.url}/v1/files", content=body, headers=tenant.headers | {"content-type": ctype})
    assert r.status_code == 200, r.text
    assert r.json()["purpose"] == "batch"


def test_file_without_filename_gets_its_id_as_name(api_server: ApiServer, tenant: Tenant) -> None:
    r = httpx.post(
        f"{api_server.url}/v1/files",
        headers=tenant.headers,
        files=[("purpose", (None, "batch")), ("file", ("", QUICKSTART_JSONL))],
    )
    assert r.status_code == 200, r.text
    assert r.json()["filename"] == f"{r.json()['id']}.jsonl"


def test_filename_is_data_not_a_path(api_server: ApiServer, tenant: Tenant) -> None:
    body, ctype = curl_form([("purpose", "batch"), ("file", ("../../etc/passwd.jsonl", QUICKSTART_JSONL))])
    r = httpx.post(f"{api_server.url}/v1/files", content=body, headers=tenant.headers | {"content-type": ctype})
    assert r.status_code == 200, r.text
    assert r.json()["filename"] == "passwd.jsonl"
