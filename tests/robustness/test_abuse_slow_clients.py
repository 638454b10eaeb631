"""Slow and stalled clients (issue 12, case 1): they time out, and never take others' capacity.

Raw sockets play the hostile client: authenticated uploads that send the headers and
one byte of the file part and then sit idle, or trickle a byte at a time; request heads
that never end. Whatever they do, other tenants' uploads are answered at once, and
the stalled ones end in a 408 (or a 429/503 with Retry-After when over a limit).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from api_server import ApiServer, Tenant, chat_line, jsonl, start_api_server

BOUNDARY = "stallboundary"
ONE_LINE = jsonl([chat_line("ok-1")])


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def upload_head(tenant: Tenant, length: int = 100_000) -> bytes:
    """The headers and the start of a file part: the server is now waiting for bytes."""
    head = (
        "POST /v1/files HTTP/1.1\r\nhost: test\r\n"
        f"x-api-key: {tenant.key}\r\nx-project-id: {tenant.project}\r\n"
        f"content-type: multipart/form-data; boundary={BOUNDARY}\r\ncontent-length: {length}\r\n\r\n"
        f"--{BOUNDARY}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"slow.jsonl\"\r\n\r\n"
    )
    return head.encode() + b"{"


def read_response(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and whatever body arrives until the server closes (or timeout)."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in data and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines and lines[0].startswith("HTTP/1.1 "), data[:200]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    want = int(headers.get("content-length", "0"))
    while len(body) < want:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


@contextmanager
def stalled_uploads(url: str, tenants: list[Tenant], *, trickle: float | None = None) -> Iterator[list[socket.socket]]:
    """One stalled upload per tenant given; with `trickle`, each sends a byte every that many seconds."""
    socks = [connect(url) for _ in tenants]
    stop = threading.Event()
    for sock, tenant in zip(socks, tenants):
        sock.sendall(upload_head(tenant))

    def trickler() -> None:
        while not stop.wait(trickle):
            for sock in socks:
                try:
                    sock.send(b"a")
                except OSError:
                    pass

    thread = threading.Thread(target=trickler, daemon=True) if trickle else None
    if thread:
        thread.start()
    try:
        time.sleep(0.5)  # the server has read their heads and first bytes
        yield socks
    finally:
        stop.set()
        for sock in socks:
            sock.close()


def normal_upload(server: ApiServer, tenant: Tenant) -> httpx.Response:
    with httpx.Client(base_url=server.url, headers=tenant.headers, timeout=15) as c:
        return c.post("/v1/files", files={"file": ("ok.jsonl", ONE_LINE)}, data={"purpose": "batch"})


@pytest.mark.timeout(120)
@pytest.mark.parametrize("trickle", [None, 0.5], ids=["idle", "trickling"])
def test_six_stalled_uploads_do_not_stop_other_uploads(tmp_path: Path, trickle: float | None) -> None:
    # Defaults (30 s idle timeout): the next uploads must not wait for the stalled ones at all.
    with start_api_server(tmp_path) as server:
        others = [server.new_tenant() for _ in range(6)]
        with stalled_uploads(server.url, others, trickle=trickle):
            for _ in range(3):
                r = normal_upload(server, server.new_tenant())
                assert r.status_code == 200, r.text
            # The stalled tenants themselves can still upload (one of their slots is in use).
            assert normal_upload(server, others[0]).status_code == 200


@pytest.mark.timeout(60)
def test_an_idle_upload_body_times_out_with_408_and_leaves_nothing(tmp_path: Path) -> None:
    with start_api_server(tmp_path, body_idle_timeout_seconds=1.0) as server:
        t = server.new_tenant()
        with stalled_uploads(server.url, [t]) as (sock,):
            started = time.monotonic()
            status, headers, body = read_response(sock, timeout=20)
            assert status == 408, body
            assert time.monotonic() - started < 15
            assert headers.get("connection") == "close"
            assert b'"request_timeout"' in body and b'"error"' in body
            assert sock.recv(10) == b""  # and the connection is closed
        with server.client(t) as c:
            assert c.get("/v1/files").json()["data"] == []
        leftovers = [p for p in server.services.settings.storage_dir.rglob("*") if p.is_file()]
        assert leftovers == []


@pytest.mark.timeout(60)
def test_a_trickling_upload_is_cut_off_by_the_minimum_rate(tmp_path: Path) -> None:
    with start_api_server(tmp_path, body_idle_timeout_seconds=1.0, body_min_bytes_per_second=1000) as server:
        t = server.new_tenant()
        # A byte every 0.2 s never trips the idle timeout, only the rate.
        with stalled_uploads(server.url, [t], trickle=0.2) as (sock,):
            status, _, body = read_response(sock, timeout=20)
            assert status == 408, body
        assert normal_upload(server, t).status_code == 200


@pytest.mark.timeout(60)
def test_uploads_over_the_per_project_limit_get_429_with_retry_after(tmp_path: Path) -> None:
    with start_api_server(tmp_path, max_concurrent_uploads_per_project=2, retry_after_seconds=7) as server:
        busy = server.new_tenant()
        with stalled_uploads(server.url, [busy, busy]):
            r = normal_upload(server, busy)
            assert r.status_code == 429, r.text
            assert r.headers["retry-after"] == "7"
            error = r.json()["error"]
            assert error["type"] == "rate_limit_exceeded" and error["code"] == "too_many_concurrent_uploads"
            assert normal_upload(server, server.new_tenant()).status_code == 200  # others are not limited
        # Slots come back when the stalled uploads go away.
        deadline = time.monotonic() + 10
        while (r := normal_upload(server, busy)).status_code == 429 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert r.status_code == 200, r.text


@pytest.mark.timeout(60)
def test_uploads_over_the_gateway_limit_get_503_with_retry_after(tmp_path: Path) -> None:
    with start_api_server(tmp_path, max_concurrent_uploads=3) as server:
        with stalled_uploads(server.url, [server.new_tenant() for _ in range(3)]):
            r = normal_upload(server, server.new_tenant())
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) > 0
            assert r.json()["error"]["code"] == "server_busy"
            # Other routes are not affected.
            t = server.new_tenant()
            with server.client(t) as c:
                assert c.get("/v1/files").status_code == 200


@pytest.mark.timeout(60)
def test_a_request_head_that_never_ends_gets_408(tmp_path: Path) -> None:
    with start_api_server(tmp_path, header_timeout_seconds=1.0) as server:
        sock = connect(server.url)
        try:
            sock.sendall(b"GET /v1/files HTTP/1.1\r\nhost: test\r\nx-api-")
            status, headers, body = read_response(sock, timeout=20)
            assert status == 408 and headers.get("connection") == "close", body
            assert b'"request_timeout"' in body
        finally:
            sock.close()
        # A connection that never sends anything is closed too.
        sock = connect(server.url)
        try:
            sock.settimeout(20)
            started = time.monotonic()
            data = sock.recv(65536)
            while data and b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            assert time.monotonic() - started < 15
        finally:
            sock.close()
        # Keep-alive between requests is not a stalled head: a reused connection works.
        t = server.new_tenant()
        with server.client(t) as c:
            assert c.get("/v1/files").status_code == 200
            time.sleep(1.5)
            assert c.get("/v1/files").status_code == 200


@pytest.mark.timeout(60)
def test_an_oversized_request_head_is_refused_with_431(tmp_path: Path) -> None:
    with start_api_server(tmp_path, max_header_bytes=16 * 1024) as server:
        sock = connect(server.url)
        try:
            sock.sendall(b"GET /v1/files/" + b"f" * 40_000 + b" HTTP/1.1\r\nhost: test\r\n\r\n")
            status, headers, body = read_response(sock, timeout=20)
            assert status == 431 and headers.get("connection") == "close", body
            assert len(body) < 500
        finally:
            sock.close()


@pytest.mark.timeout(60)
def test_a_refused_body_still_arriving_is_dropped_then_the_connection_closes(tmp_path: Path) -> None:
    with start_api_server(tmp_path, header_timeout_seconds=1.0) as server:
        head = (b"POST /v1/batches HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
                b"content-length: 10000000\r\n\r\n")
        sock = connect(server.url)
        try:
            sock.sendall(head + b" " * 65536)
            status, _, _ = read_response(sock, timeout=10)
            assert status == 401  # answered at once, while the body still comes
            sock.settimeout(10)
            started, extra = time.monotonic(), b""
            try:
                while time.monotonic() - started < 8:
                    sock.send(b" " * 100)
                    time.sleep(0.1)
            except OSError:
                pass  # closed by the server: what we want
            with contextlib.suppress(OSError):
                extra = sock.recv(65536)
            assert time.monotonic() - started < 8, "the server kept reading a refused body"
            assert b"HTTP/1.1" not in extra  # no stray second answer
        finally:
            sock.close()


@pytest.mark.timeout(60)
def test_a_connection_is_reusable_after_a_refused_body_was_dropped(tmp_path: Path) -> None:
    with start_api_server(tmp_path, header_timeout_seconds=1.0) as server:
        t = server.new_tenant()
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post("/v1/batches", content=b" " * 300_000, headers={"content-type": "application/json"})
            assert r.status_code == 401
            time.sleep(1.5)  # longer than the head timeout: idle keep-alive is not a stalled head
            assert c.get("/v1/files", headers=t.headers).status_code == 200
