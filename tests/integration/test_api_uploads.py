"""Uploads and downloads stream: a file far larger than the memory budget passes through.

The server runs in this process (see api_server.py), so tracemalloc sees every
allocation it makes — and the client's, which only ever holds one chunk.
"""

from __future__ import annotations

import hashlib
import socket
import time
import tracemalloc
from collections.abc import Iterator

import httpx
import pytest
from api_server import ApiServer, Tenant

MB = 1024 * 1024
UPLOAD_BYTES = 50 * MB
MEMORY_BUDGET = 12 * MB  # peak extra allocation allowed while 50 MB pass through
BOUNDARY = "vbatch-test-boundary-7c1e"
BLOCK = (b'{"custom_id": "x", "method": "POST"}' + b" " * 990 + b"\n") * 64  # 64 KiB, allocated once


def multipart_body(size: int, *, purpose_first: bool) -> Iterator[bytes]:
    """A multipart upload generated on the fly (httpx sends it chunked, no length)."""
    purpose = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'.encode()
    if purpose_first:
        yield purpose
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    sent = 0
    while sent < size:
        block = BLOCK if size - sent >= len(BLOCK) else BLOCK[: size - sent]
        sent += len(block)
        yield block
    yield b"\r\n"
    if not purpose_first:
        yield purpose
    yield f"--{BOUNDARY}--\r\n".encode()


def expected_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for _ in range(size // len(BLOCK)):
        digest.update(BLOCK)
    digest.update(BLOCK[: size % len(BLOCK)])
    return digest.hexdigest()


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def peak_during(action) -> tuple[object, int]:
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    result = action()
    _, peak = tracemalloc.get_traced_memory()
    return result, peak - before


@pytest.mark.parametrize("purpose_first", [True, False], ids=["purpose-first", "file-first"])
def test_large_upload_and_download_use_bounded_memory(
    api_server: ApiServer, tenant: Tenant, traced: None, purpose_first: bool
) -> None:
    headers = tenant.headers | {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}

    def send() -> httpx.Response:
        body = multipart_body(UPLOAD_BYTES, purpose_first=purpose_first)
        return httpx.post(f"{api_server.url}/v1/files", content=body, headers=headers, timeout=120)

    r, upload_peak = peak_during(send)
    assert r.status_code == 200, r.text
    f = r.json()
    assert f["bytes"] == UPLOAD_BYTES
    assert f["filename"] == "big.jsonl"
    assert upload_peak < MEMORY_BUDGET, f"upload peak {upload_peak / MB:.1f} MB"

    def download() -> tuple[int, str]:
        digest, total = hashlib.sha256(), 0
        with httpx.stream("GET", f"{api_server.url}/v1/files/{f['id']}/content", headers=tenant.headers) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-length"] == str(UPLOAD_BYTES)
            for chunk in resp.iter_raw():
                digest.update(chunk)
                total += len(chunk)
        return total, digest.hexdigest()

    (total, sha), download_peak = peak_during(download)
    assert (total, sha) == (UPLOAD_BYTES, expected_sha256(UPLOAD_BYTES))
    assert download_peak < MEMORY_BUDGET, f"download peak {download_peak / MB:.1f} MB"


def test_client_disconnect_mid_upload_leaves_nothing(api_server: ApiServer, tenant: Tenant) -> None:
    host, port = api_server.url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nx-api-key: {tenant.key}\r\n"
        f"x-project-id: {tenant.project}\r\ncontent-type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"content-length: {10 * MB}\r\n\r\n"
    ).encode()
    body = b"".join(multipart_body(10 * MB, purpose_first=True))
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + body[: 3 * MB])  # then hang up in the middle of the file part
        time.sleep(0.2)
    store = api_server.services.files.store
    deadline = time.monotonic() + 5
    while list(store.list(f"projects/{tenant.project}/")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(store.list(f"projects/{tenant.project}/")) == []
    with api_server.client(tenant) as c:
        assert c.get("/v1/files").json()["data"] == []
