"""Big bodies and unbounded input (issue 12, case 2), and HTTP methods (case 5).

- Credentials are checked before a body is read: a 64 MiB body without them is
  answered 401 while the client is still sending it (the server never buffers it).
- Every JSON body is capped (`max_json_body_bytes`): 413 in the envelope, from the
  Content-Length alone or, for a chunked body, as soon as the cap is passed.
- Errors never echo unbounded input (ids, paths) back.
- 405 names the route's methods in Allow; HEAD is answered like GET, without a body.
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from api_server import ApiServer, Tenant, chat_line, jsonl, start_api_server

MiB = 1024 * 1024


def raw_request_head(path: str, headers: dict[str, str], length: int) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "host: test", "content-type: application/json", f"content-length: {length}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def answer_while_still_sending(url: str, path: str, headers: dict[str, str], length: int) -> tuple[int, bytes]:
    """Send the head and 64 KiB of a `length`-byte body, then read: the answer must come now."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(raw_request_head(path, headers, length) + b"[" + b" " * (64 * 1024))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)  # socket.timeout here = the server waits for the rest of the body
            assert chunk, "connection closed without an answer"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        want = int([v for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")) if k.lower() ==
                    b"content-length"][0])
        while len(body) < want:
            body += sock.recv(65536)
        return int(head.split()[1]), body


CREATE_PATHS = ["/v1/batches", "/v1/batches/batch_01J0000000000000000000000/cancel"]


@pytest.mark.parametrize("path", CREATE_PATHS)
def test_an_unauthenticated_64_mib_body_is_refused_before_it_is_read(api_server: ApiServer, path: str) -> None:
    status, body = answer_while_still_sending(api_server.url, path, {}, 64 * MiB)
    assert status == 401, body
    assert b'"authentication_error"' in body
    status, body = answer_while_still_sending(
        api_server.url, path, {"x-api-key": "vb-wrong", "x-project-id": "someone"}, 64 * MiB
    )
    assert status == 403, body


def test_an_unauthenticated_upload_is_refused_before_it_is_read(api_server: ApiServer) -> None:
    status, _ = answer_while_still_sending(api_server.url, "/v1/files", {}, 200 * MiB)
    assert status == 401


def test_a_client_that_sends_the_whole_refused_body_still_gets_its_answer(api_server: ApiServer) -> None:
    r = httpx.post(f"{api_server.url}/v1/batches", content=b"[" + b"0," * (4 * MiB) + b"0]",
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("path", CREATE_PATHS)
def test_a_json_body_over_the_cap_is_413_from_its_content_length(api_server: ApiServer, tenant: Tenant,
                                                                 path: str) -> None:
    status, body = answer_while_still_sending(api_server.url, path, tenant.headers, 64 * MiB)
    assert status == 413, body
    assert b'"request_too_large"' in body and b'"invalid_request_error"' in body


def test_a_chunked_json_body_over_the_cap_is_413(tmp_path: Path) -> None:
    with start_api_server(tmp_path, max_json_body_bytes=4096) as server:
        t = server.new_tenant()
        sent = 0

        def body():
            nonlocal sent
            yield b'{"input_file_id": "'
            for _ in range(2000):  # up to 2 MB, never all read
                sent += 1024
                yield b"x" * 1024
            yield b'"}'

        with server.client(t) as c:
            r = c.post("/v1/batches", content=body(), headers={"content-type": "application/json"})
            assert r.status_code == 413, r.text
            assert r.json()["error"]["code"] == "request_too_large"
            # Just under the cap is an ordinary request (here: an unknown file).
            ok = {"input_file_id": "file-" + "0" * 24, "endpoint": "/v1/chat/completions",
                  "completion_window": "24h", "metadata": {"k": "v" * 400}}
            r = c.post("/v1/batches", json=ok)
            assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found", r.text


def test_create_and_cancel_still_work_under_the_cap(api_server: ApiServer, tenant: Tenant) -> None:
    with api_server.client(tenant) as c:
        f = c.post("/v1/files", files={"file": ("a.jsonl", jsonl([chat_line("a")]))}, data={"purpose": "batch"})
        b = c.post("/v1/batches", json={"input_file_id": f.json()["id"], "endpoint": "/v1/chat/completions",
                                        "completion_window": "24h"})
        assert b.status_code == 200, b.text
        r = c.post(f"/v1/batches/{b.json()['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")


@pytest.mark.parametrize("path", ["/v1/files/{}", "/v1/files/{}/content", "/v1/batches/{}",
                                  "/v1/no-such-route/{}"])
def test_errors_never_echo_unbounded_input(api_server: ApiServer, tenant: Tenant, path: str) -> None:
    long_id = "file-" + "A" * 20_000
    with api_server.client(tenant) as c:
        r = c.get(path.format(long_id))
        assert r.status_code == 404, r.text[:300]
        assert len(r.json()["error"]["message"]) <= 200, r.json()["error"]["message"][:300]
        assert len(r.content) < 1000
        r = c.request("DELETE" if "batches" not in path else "POST", path.format(long_id) + "x")
        assert len(r.content) < 1000


def test_unknown_fields_and_values_are_not_echoed_whole(api_server: ApiServer, tenant: Tenant) -> None:
    with api_server.client(tenant) as c:
        r = c.post("/v1/batches", json={"input_file_id": "file-x", "endpoint": "/v1/" + "e" * 5000,
                                        "completion_window": "24h"})
        assert r.status_code in (400, 404) and len(r.content) < 1000, r.text[:300]
        r = c.post("/v1/batches", json={"k" * 5000: 1, "input_file_id": "f", "endpoint": "/v1/chat/completions",
                                        "completion_window": "24h"})
        assert r.status_code == 400 and len(r.content) < 1000, r.text[:300]
        r = c.post("/v1/files", files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "p" * 3000})
        assert r.status_code == 400 and len(r.content) < 1000, r.text[:300]


# --- methods: 405 + Allow, HEAD -------------------------------------------------------------


@pytest.mark.parametrize("method,path,allow", [
    ("PUT", "/v1/files", "GET, HEAD, POST"),
    ("PATCH", "/v1/files/file-000000000000000000000000", "DELETE, GET, HEAD"),
    ("POST", "/v1/files/file-000000000000000000000000/content", "GET, HEAD"),
    ("DELETE", "/v1/batches", "GET, HEAD, POST"),
    ("GET", "/v1/batches/batch_01J0000000000000000000000/cancel", "POST"),
    ("HEAD", "/v1/batches/batch_01J0000000000000000000000/cancel", "POST"),
    ("POST", "/healthz", "GET, HEAD"),
])
def test_405_names_the_allowed_methods(api_server: ApiServer, tenant: Tenant, method: str, path: str,
                                       allow: str) -> None:
    r = httpx.request(method, api_server.url + path, headers=tenant.headers, timeout=30)
    assert r.status_code == 405, r.text
    assert r.headers.get_list("allow") == [allow]
    if method != "HEAD":
        assert r.json()["error"]["code"] == "method_not_allowed"
    else:
        assert r.content == b""


def test_head_is_answered_like_get_without_a_body(api_server: ApiServer, tenant: Tenant) -> None:
    content = jsonl([chat_line("h1"), chat_line("h2")])
    with api_server.client(tenant) as c:
        f = c.post("/v1/files", files={"file": ("h.jsonl", content)}, data={"purpose": "batch"}).json()
        for path in ("/v1/files", f"/v1/files/{f['id']}", "/v1/batches", "/healthz", "/readyz"):
            get, head = c.get(path), c.head(path)
            assert head.status_code == get.status_code == 200, (path, head.status_code)
            assert head.content == b""
            assert head.headers["content-type"] == get.headers["content-type"]
            assert head.headers["content-length"] == get.headers["content-length"]
            assert head.headers["x-request-id"].startswith("req_")
        head = c.head(f"/v1/files/{f['id']}/content")
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) == len(content)
        assert head.headers["content-type"] == "application/jsonl"
        # Errors of GET are errors of HEAD: status and headers, no body.
        missing = c.head("/v1/files/file-000000000000000000000000/content")
        assert missing.status_code == 404 and missing.content == b""
    unauthenticated = httpx.head(f"{api_server.url}/v1/files", timeout=30)
    assert unauthenticated.status_code == 401 and unauthenticated.content == b""
    # The connection stays usable after a HEAD (no stray body bytes on the wire).
    with api_server.client(tenant) as c:
        for _ in range(3):
            assert c.head("/v1/files").status_code == 200
            assert c.get("/v1/files").status_code == 200
