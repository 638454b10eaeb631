"""Bad input answers a 4xx in OpenAI's envelope — never a 5xx — and creates nothing."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from api_server import QUICKSTART_JSONL, ApiServer, Tenant, chat_line, jsonl, start_api_server

from vbatch.core.config import Limits
from vbatch.core.schemas import BatchStatus, FilePurpose

CHAT = "/v1/chat/completions"
SERVED = {"test-model", "other-model"}
SMALL = Limits(max_file_bytes=64 * 1024, max_line_bytes=1024, max_requests_per_batch=5)


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory: pytest.TempPathFactory):
    """Small limits and a fixed model catalog, so every rule can be hit cheaply."""
    with start_api_server(tmp_path_factory.mktemp("strict"), limits=SMALL, served_models=SERVED) as server:
        yield server


@pytest.fixture
def strict(strict_server: ApiServer) -> httpx.Client:
    with strict_server.client(strict_server.new_tenant()) as client:
        yield client


def assert_envelope(r: httpx.Response, status: int, code: str | None, *, type: str = "invalid_request_error") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["x-request-id"].startswith("req_")
    body = r.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == type
    assert error["code"] == code
    return error


def upload(client: httpx.Client, data: bytes, purpose: str = "batch") -> httpx.Response:
    return client.post("/v1/files", files=[("purpose", (None, purpose)), ("file", ("in.jsonl", data))])


def create(client: httpx.Client, file_id: str, **overrides) -> httpx.Response:
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"} | overrides
    return client.post("/v1/batches", json=body)


def assert_no_batches(client: httpx.Client) -> None:
    listed = client.get("/v1/batches").json()
    assert listed == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


# --- input file validation at POST /v1/batches ----------------------------------------

BIG = "x" * 2000
CASES = {
    "invalid_json": (jsonl([chat_line("a")]) + b"{oops\n", 2),
    "invalid_line": (jsonl([chat_line("a")]) + b"[1, 2]\n", 2),
    "missing_required_parameter": (jsonl([chat_line("a"), {"custom_id": "b", "method": "POST", "url": CHAT}]), 2),
    "duplicate_custom_id": (jsonl([chat_line("a"), chat_line("b"), chat_line("a")]), 3),
    "invalid_method": (jsonl([chat_line("a", method="GET")]), 1),
    "mismatched_url": (jsonl([chat_line("a"), chat_line("b", url="/v1/embeddings")]), 2),
    "unsupported_stream": (jsonl([chat_line("a", body={"model": "test-model", "messages": [], "stream": True})]), 1),
    "missing_model": (jsonl([chat_line("a", body={"messages": []})]), 1),
    "model_not_found": (jsonl([chat_line("a", model="gpt-9")]), 1),
    "mixed_models": (jsonl([chat_line("a"), chat_line("b", model="other-model")]), 2),
    "line_too_large": (jsonl([chat_line("a"), chat_line("b", content=BIG)]), 2),
    "too_many_requests": (jsonl([chat_line(f"r{i}") for i in range(6)]), 6),
    "invalid_encoding": (jsonl([chat_line("a")]) + b'{"custom_id": "\xff\xfe"}\n', 2),
    "empty_file": (b"\n\n", None),
}  # fmt: skip


@pytest.mark.parametrize("code", sorted(CASES))
def test_invalid_input_file_is_rejected_with_its_line(strict: httpx.Client, code: str) -> None:
    data, line = CASES[code]
    f = upload(strict, data)
    assert f.status_code == 200, f.text
    error = assert_envelope(create(strict, f.json()["id"]), 400, code)
    assert error.get("line") == line
    if line is not None:
        assert f"line {line}" in error["message"]
    assert_no_batches(strict)


def test_valid_file_on_strict_server_is_accepted(strict: httpx.Client) -> None:
    f = upload(strict, jsonl([chat_line(f"r{i}") for i in range(5)]))
    r = create(strict, f.json()["id"])
    assert r.status_code == 200, r.text
    assert r.json()["request_counts"]["total"] == 5


# --- the create request itself -----------------------------------------------------


@pytest.fixture
def good_file(strict: httpx.Client) -> str:
    return upload(strict, QUICKSTART_JSONL).json()["id"]


@pytest.mark.parametrize(
    ("overrides", "code", "param"),
    [
        ({"endpoint": "/v1/embeddings"}, "invalid_endpoint", "endpoint"),
        ({"completion_window": "1h"}, "invalid_completion_window", "completion_window"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "invalid_metadata", "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "invalid_metadata", "metadata"),
        ({"metadata": {"k": "v" * 513}}, "invalid_metadata", "metadata"),
        ({"metadata": ["not", "a", "map"]}, "invalid_value", "metadata"),
        ({"endpoint": 42}, "invalid_value", "endpoint"),
        ({"surprise": True}, "unknown_parameter", "surprise"),
    ],
)
def test_bad_create_request(strict: httpx.Client, good_file: str, overrides: dict, code: str, param: str) -> None:
    error = assert_envelope(create(strict, good_file, **overrides), 400, code)
    assert error["param"] == param
    assert_no_batches(strict)


def test_metadata_at_the_limits_is_fine(strict: httpx.Client, good_file: str) -> None:
    metadata = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    r = create(strict, good_file, metadata=metadata)
    assert r.status_code == 200, r.text
    assert r.json()["metadata"] == metadata


def test_missing_field_and_malformed_json(strict: httpx.Client) -> None:
    error = assert_envelope(strict.post("/v1/batches", json={"endpoint": "/v1/chat/completions"}), 400,
                            "missing_required_parameter")  # fmt: skip
    assert error["param"] == "input_file_id"
    assert_envelope(
        strict.post("/v1/batches", content=b'{"input_file_id": ', headers={"content-type": "application/json"}),
        400,
        "invalid_json",
    )
    assert_envelope(strict.post("/v1/batches", content=b"[]", headers={"content-type": "application/json"}), 400,
                    "invalid_request_body")  # fmt: skip
    # curl -d without -H content-type sends a form content type: still a 400, not a 422/500.
    form = {"content-type": "application/x-www-form-urlencoded"}
    assert_envelope(strict.post("/v1/batches", content=b'{"a": 1}', headers=form), 400, "invalid_request_body")
    assert_no_batches(strict)


def test_unknown_and_wrong_purpose_input_files(strict: httpx.Client, strict_server: ApiServer) -> None:
    error = assert_envelope(create(strict, "file-000000000000000000000000"), 404, "file_not_found")
    assert error["param"] == "input_file_id" or error["param"] == "file_id"
    assert_envelope(create(strict, "not-an-id"), 404, "file_not_found")

    project = strict.headers["x-project-id"]
    output = strict_server.services.files.create(project, [QUICKSTART_JSONL], filename="out.jsonl",
                                                 purpose=FilePurpose.BATCH_OUTPUT)  # fmt: skip
    error = assert_envelope(create(strict, output.id), 400, "invalid_input_file_purpose")
    assert error["param"] == "input_file_id"
    assert_no_batches(strict)


# --- uploads -------------------------------------------------------------------------


def assert_no_files(client: httpx.Client) -> None:
    assert client.get("/v1/files").json()["data"] == []


def test_oversize_upload_is_413_and_stores_nothing(strict: httpx.Client, strict_server: ApiServer) -> None:
    data = jsonl([chat_line(f"r{i}", content="y" * 900) for i in range(80)])  # ~80 KB > 64 KB
    assert len(data) > SMALL.max_file_bytes
    assert_envelope(upload(strict, data), 413, "file_too_large")
    assert_no_files(strict)
    project = strict.headers["x-project-id"]
    store = strict_server.services.files.store
    assert list(store.list(f"projects/{project}/")) == []  # no bytes, no temporaries

    # Exactly at the limit is fine.
    exact = (b"#" * (SMALL.max_file_bytes - 1)) + b"\n"
    assert upload(strict, exact).status_code == 200


def test_oversize_upload_with_purpose_last_is_413(strict: httpx.Client) -> None:
    data = b"z" * (SMALL.max_file_bytes + 1)
    r = strict.post("/v1/files", files=[("file", ("in.jsonl", data)), ("purpose", (None, "batch"))])
    assert_envelope(r, 413, "file_too_large")
    assert_no_files(strict)


@pytest.mark.parametrize("file_first", [False, True])
@pytest.mark.parametrize("purpose", ["fine-tune", "batch_output", ""])
def test_wrong_purpose_stores_nothing(strict: httpx.Client, purpose: str, file_first: bool) -> None:
    parts = [("purpose", (None, purpose)), ("file", ("in.jsonl", QUICKSTART_JSONL))]
    r = strict.post("/v1/files", files=parts[::-1] if file_first else parts)
    error = assert_envelope(r, 400, "invalid_purpose")
    assert error["param"] == "purpose"
    assert_no_files(strict)


def test_missing_parts_and_bad_content_types(strict: httpx.Client) -> None:
    r = strict.post("/v1/files", files=[("purpose", (None, "batch"))])
    assert assert_envelope(r, 400, "missing_required_parameter")["param"] == "file"
    r = strict.post("/v1/files", files=[("file", ("in.jsonl", QUICKSTART_JSONL))])
    assert assert_envelope(r, 400, "missing_required_parameter")["param"] == "purpose"
    assert_envelope(strict.post("/v1/files", json={"purpose": "batch"}), 400, "invalid_content_type")
    r = strict.post("/v1/files", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 400
    two = [("purpose", (None, "batch")), ("file", ("a.jsonl", b"{}\n")), ("file", ("b.jsonl", b"{}\n"))]
    assert_envelope(strict.post("/v1/files", files=two), 400, "multiple_files")
    assert_no_files(strict)


# --- unknown ids, other projects, auth -------------------------------------------------


def test_unknown_ids_are_404(api_server: ApiServer, tenant: Tenant) -> None:
    c = api_server.client(tenant)
    for r in (
        c.get("/v1/files/file-000000000000000000000000"),
        c.get("/v1/files/file-000000000000000000000000/content"),
        c.delete("/v1/files/file-000000000000000000000000"),
        c.get("/v1/files/whatever"),
    ):
        assert_envelope(r, 404, "file_not_found")
    for r in (c.get("/v1/batches/batch_01HZZZZZZZZZZZZZZZZZZZZZZZ"), c.post("/v1/batches/nope/cancel")):
        assert_envelope(r, 404, "batch_not_found")


def test_another_projects_ids_are_404(api_server: ApiServer, tenant: Tenant) -> None:
    mine = api_server.client(tenant)
    f = upload(mine, QUICKSTART_JSONL).json()["id"]
    b = create(mine, f).json()["id"]

    theirs = api_server.client(api_server.new_tenant())
    assert_envelope(theirs.get(f"/v1/files/{f}"), 404, "file_not_found")
    assert_envelope(theirs.get(f"/v1/files/{f}/content"), 404, "file_not_found")
    assert_envelope(theirs.delete(f"/v1/files/{f}"), 404, "file_not_found")
    assert_envelope(create(theirs, f), 404, "file_not_found")
    assert_envelope(theirs.get(f"/v1/batches/{b}"), 404, "batch_not_found")
    assert_envelope(theirs.post(f"/v1/batches/{b}/cancel"), 404, "batch_not_found")
    assert theirs.get("/v1/files").json()["data"] == []
    assert theirs.get("/v1/batches").json()["data"] == []
    # ... and none of that touched the owner's objects.
    assert mine.get(f"/v1/batches/{b}").json()["status"] == "in_progress"
    assert mine.get(f"/v1/files/{f}").status_code == 200


def test_authentication(api_server: ApiServer, tenant: Tenant) -> None:
    url = f"{api_server.url}/v1/batches"
    other = api_server.new_tenant()
    missing = [
        ({}, "missing_api_key"),
        ({"x-api-key": tenant.key}, "missing_project_id"),
        ({"x-project-id": tenant.project}, "missing_api_key"),
        ({"authorization": f"Basic {tenant.key}", "x-project-id": tenant.project}, "missing_api_key"),
    ]
    for headers, code in missing:
        assert_envelope(httpx.get(url, headers=headers), 401, code, type="authentication_error")
    for headers in (
        {"x-api-key": "vb-wrong", "x-project-id": tenant.project},
        {"x-api-key": other.key, "x-project-id": tenant.project},  # a real key, for another project
        {"x-api-key": tenant.key, "x-project-id": other.project},
    ):
        assert_envelope(httpx.get(url, headers=headers), 403, "invalid_api_key", type="authentication_error")
    bearer = {"authorization": f"Bearer {tenant.key}", "x-project-id": tenant.project}
    assert httpx.get(url, headers=bearer).status_code == 200

    # A revoked key stops working at once.
    assert api_server.services.keys.revoke(tenant.key)
    assert_envelope(httpx.get(url, headers=tenant.headers), 403, "invalid_api_key", type="authentication_error")
    # Errors before auth still use the envelope and carry a request id.
    assert_envelope(httpx.post(f"{api_server.url}/v1/files"), 401, "missing_api_key", type="authentication_error")


def test_cancel_of_a_finished_batch_is_409(api_server: ApiServer, tenant: Tenant) -> None:
    c = api_server.client(tenant)
    b = create(c, upload(c, QUICKSTART_JSONL).json()["id"]).json()["id"]
    record = api_server.services.batches.get(tenant.project, b)
    record.status = BatchStatus.COMPLETED
    api_server.services.batches.save(record)
    assert_envelope(c.post(f"/v1/batches/{b}/cancel"), 409, "batch_not_cancellable")
    assert c.get(f"/v1/batches/{b}").json()["status"] == "completed"
    # Cancelling twice while cancelling is fine (idempotent).
    b2 = create(c, upload(c, QUICKSTART_JSONL).json()["id"]).json()["id"]
    assert c.post(f"/v1/batches/{b2}/cancel").json()["status"] == "cancelling"
    assert c.post(f"/v1/batches/{b2}/cancel").json()["status"] == "cancelling"


# --- HTTP-level errors -----------------------------------------------------------------


def test_list_parameters_out_of_range(api_server: ApiServer, tenant: Tenant) -> None:
    c = api_server.client(tenant)
    for path in ("/v1/batches?limit=0", "/v1/batches?limit=101", "/v1/batches?limit=x",
                 "/v1/files?limit=0", "/v1/files?limit=10001", "/v1/files?order=sideways"):  # fmt: skip
        error = assert_envelope(c.get(path), 400, "invalid_value")
        assert error["param"] in ("limit", "order")
    assert c.get("/v1/batches?limit=100").status_code == 200
    assert c.get("/v1/files?limit=10000&order=asc").status_code == 200


def test_unknown_routes_and_methods(api_server: ApiServer, tenant: Tenant) -> None:
    c = api_server.client(tenant)
    error = assert_envelope(c.get("/v1/nothing-here"), 404, "unknown_url")
    assert error["message"] == "Invalid URL (GET /v1/nothing-here)"
    r = c.put("/v1/batches")
    assert_envelope(r, 405, "method_not_allowed")
    assert r.headers.get_list("allow") == ["GET, HEAD, POST"]  # HEAD is answered by the GET route
    assert_envelope(httpx.get(f"{api_server.url}/nope"), 404, "unknown_url")


def test_unexpected_exception_is_a_generic_500(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class ExplodingRunner:
        def submitted(self, record):
            raise RuntimeError("secret internal detail /var/lib/x")

        def cancel_requested(self, record):
            pass

    with start_api_server(tmp_path, runner=ExplodingRunner()) as server:
        c = server.client(server.new_tenant())
        f = upload(c, QUICKSTART_JSONL).json()["id"]
        with caplog.at_level("ERROR", logger="vbatch.api"):
            r = create(c, f)
        assert_envelope(r, 500, "internal_error", type="internal_error")
        assert "secret" not in json.dumps(r.json())
        rid = r.headers["x-request-id"]
        assert any(rid in rec.getMessage() and rec.exc_info for rec in caplog.records)
