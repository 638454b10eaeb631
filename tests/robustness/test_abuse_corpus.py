"""Malformed and hostile inputs through the real API (upload + create).

Each case is either refused with a clear 4xx envelope naming the problem (and the
line, for JSONL problems), or accepted where the wire contract accepts it. Accepted
oddities that only show at run time (ids differing in case/whitespace, odd bodies)
also run through the real single-node executor with the echo engine, and their
results must keep every custom_id apart.
"""

from __future__ import annotations

import re

import json
import os
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from api_server import ApiServer, Tenant, chat_line, jsonl, make_services, serve
from vbatch.operator.local_executor import LocalExecutor

ENDPOINT = "/v1/chat/completions"
TERMINAL = {"completed", "failed", "expired", "cancelled"}


def upload(client: httpx.Client, content: bytes, filename: str = "in.jsonl") -> httpx.Response:
    return client.post("/v1/files", files={"file": (filename, content)}, data={"purpose": "batch"})


def raw_upload(client: httpx.Client, content: bytes, raw_filename: bytes) -> httpx.Response:
    """A multipart body built by hand, so the filename bytes reach the server as they are
    (httpx would percent-escape control characters and double backslashes)."""
    boundary = b"vbatch-abuse-boundary"
    body = (
        b"--" + boundary + b"\r\n"
        b'Content-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b"--" + boundary + b"\r\n"
        b'Content-Disposition: form-data; name="file"; filename="' + raw_filename + b'"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n"
        b"--" + boundary + b"--\r\n"
    )
    return client.post(
        "/v1/files", content=body, headers={"content-type": "multipart/form-data; boundary=" + boundary.decode()}
    )


def create(client: httpx.Client, file_id: str, **extra) -> httpx.Response:
    return client.post(
        "/v1/batches", json={"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": "24h"} | extra
    )


def upload_and_create(client: httpx.Client, content: bytes) -> httpx.Response:
    r = upload(client, content)
    assert r.status_code == 200, r.text
    return create(client, r.json()["id"])


def assert_envelope(r: httpx.Response, status: int, code: str | None = None, line: int | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "internal_error")
    if code is not None:
        assert error["code"] == code, error
    if line is not None:
        assert error["line"] == line, error
        assert f"line {line}" in error["message"], error
    return error


def good(custom_id: str, **body_extra) -> bytes:
    line = chat_line(custom_id)
    line["body"] |= body_extra
    return json.dumps(line).encode()


@pytest.fixture
def client(api_server: ApiServer, tenant: Tenant):
    with api_server.client(tenant) as c:
        yield c


# --- JSONL problems: 400 naming the line ---------------------------------------------------------

DEPTH_BOMB = b'{"custom_id": "deep", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "x": ' + (
    b"[" * 100_000
) + b"]" * 100_000 + b"}}"

REJECTED = {
    "truncated_json": (good("a") + b"\n" + good("b")[:-7] + b"\n", "invalid_json", 2),
    "truncated_last_line_no_newline": (good("a") + b"\n" + good("b")[:40], "invalid_json", 2),
    "invalid_utf8": (good("a") + b"\n" + good("b").replace(b"Hello", b"Hel\xff\xfelo") + b"\n", "invalid_encoding", 2),
    "latin1_file": (good("a").replace(b"Hello", b"caf\xe9") + b"\n", "invalid_encoding", 1),
    "depth_bomb": (good("a") + b"\n" + DEPTH_BOMB + b"\n", "invalid_json", 2),
    "not_an_object": (b"[1, 2, 3]\n", "invalid_line", 1),
    "json_string_line": (b'"just a string"\n', "invalid_line", 1),
    "int_custom_id": (good("a") + b"\n" + json.dumps(chat_line("x") | {"custom_id": 7}).encode(), "invalid_custom_id", 2),
    "list_custom_id": (json.dumps(chat_line("x") | {"custom_id": ["a"]}).encode(), "invalid_custom_id", 1),
    "object_custom_id": (json.dumps(chat_line("x") | {"custom_id": {"a": 1}}).encode(), "invalid_custom_id", 1),
    "bool_custom_id": (json.dumps(chat_line("x") | {"custom_id": True}).encode(), "invalid_custom_id", 1),
    "empty_custom_id": (json.dumps(chat_line("x") | {"custom_id": ""}).encode(), "invalid_custom_id", 1),
    "null_custom_id": (json.dumps(chat_line("x") | {"custom_id": None}).encode(), "missing_required_parameter", 1),
    "exact_duplicate": (good("same") + b"\n" + good("other") + b"\n" + good("same") + b"\n", "duplicate_custom_id", 3),
    "streaming": (good("a", stream=True) + b"\n", "unsupported_stream", 1),
    "body_is_string": (json.dumps(chat_line("x") | {"body": "hi"}).encode(), "invalid_body", 1),
    "wrong_url": (json.dumps(chat_line("x") | {"url": "/v1/embeddings"}).encode(), "mismatched_url", 1),
    "get_method": (json.dumps(chat_line("x") | {"method": "GET"}).encode(), "invalid_method", 1),
    "model_is_number": (good("a", model=3) + b"\n", "missing_model", 1),
    "two_models": (good("a") + b"\n" + good("b", model="other") + b"\n", "mixed_models", 2),
    "only_blank_lines": (b"\n\r\n   \n", "empty_file", None),
    "bom_only": (b"\xef\xbb\xbf", "empty_file", None),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_malformed_jsonl_is_refused_naming_the_line(client: httpx.Client, case: str) -> None:
    content, code, line = REJECTED[case]
    r = upload_and_create(client, content)
    assert_envelope(r, 400, code, line)
    assert client.get("/v1/batches").json()["data"] == []  # nothing was created


def test_huge_line_is_refused_naming_the_line(client: httpx.Client) -> None:
    huge = good("big", padding="x" * (1024 * 1024 + 10))
    content = good("a") + b"\n" + huge + b"\n" + good("c") + b"\n"
    error = assert_envelope(upload_and_create(client, content), 400, "line_too_large", 2)
    assert "1048576" in error["message"]


def test_huge_line_without_any_newline_is_refused(client: httpx.Client) -> None:
    content = b'{"custom_id": "' + b"y" * (3 * 1024 * 1024) + b'"}'
    assert_envelope(upload_and_create(client, content), 400, "line_too_large", 1)


def test_50001_lines_are_refused_at_the_limit(client: httpx.Client) -> None:
    template = good("r-XXXXX")
    content = b"\n".join(template.replace(b"XXXXX", str(i).encode()) for i in range(50_001)) + b"\n"
    assert_envelope(upload_and_create(client, content), 400, "too_many_requests", 50_001)


def test_50000_lines_are_accepted(client: httpx.Client) -> None:
    template = good("r-XXXXX")
    content = b"\n".join(template.replace(b"XXXXX", str(i).encode()) for i in range(50_000))
    r = upload_and_create(client, content)
    assert r.status_code == 200, r.text
    assert r.json()["request_counts"]["total"] == 50_000


# --- accepted where the contract accepts ---------------------------------------------------------

ACCEPTED = {
    "bom": (b"\xef\xbb\xbf" + good("a") + b"\n" + good("b") + b"\n", 2),
    "crlf": (good("a") + b"\r\n" + good("b") + b"\r\n" + good("c"), 3),
    "bom_and_crlf_no_final_newline": (b"\xef\xbb\xbf" + good("a") + b"\r\n" + good("b"), 2),
    "blank_lines_between": (b"\n" + good("a") + b"\n\n\r\n  \n" + good("b") + b"\n\n", 2),
    "deep_but_legal_nesting": (good("a", x=json.loads("[" * 500 + "]" * 500)) + b"\n", 1),
    "unicode_ids": (good("ünï-😀") + b"\n" + good("ünï-😀 ") + b"\n", 2),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_contract_accepted_oddities_create_a_batch(client: httpx.Client, case: str) -> None:
    content, total = ACCEPTED[case]
    r = upload_and_create(client, content)
    assert r.status_code == 200, r.text
    batch = r.json()
    assert batch["request_counts"]["total"] == total
    assert client.get(f"/v1/batches/{batch['id']}").json()["id"] == batch["id"]


# --- create request fields -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata, accepted",
    [
        ({f"k{i}": "v" for i in range(17)}, False),
        ({"k" * 65: "v"}, False),
        ({"k": "v" * 513}, False),
        ({f"k{i}": "v" for i in range(16)}, True),
        ({"k" * 64: "v" * 512}, True),
        ({"k": 5}, False),  # values are strings
    ],
)
def test_metadata_limits(client: httpx.Client, metadata: dict, accepted: bool) -> None:
    file_id = upload(client, good("a")).json()["id"]
    r = create(client, file_id, metadata=metadata)
    if accepted:
        assert r.status_code == 200, r.text
        assert r.json()["metadata"] == metadata
    else:
        error = assert_envelope(r, 400)
        assert error["param"] is not None and error["param"].startswith("metadata"), error
        assert client.get("/v1/batches").json()["data"] == []


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"null",
        b"[]",
        b'{"input_file_id": ',
        b'{"input_file_id": 5, "endpoint": "/v1/chat/completions", "completion_window": "24h"}',
        b'{"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h", "x": 1}',
        b'{"input_file_id": "' + b"f" * 100_000 + b'", "endpoint": "/v1/chat/completions", "completion_window": "24h"}',
        b"\xff\xfe{}",
    ],
)
def test_garbage_create_bodies_are_clean_4xx(client: httpx.Client, body: bytes) -> None:
    r = client.post("/v1/batches", content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert set(r.json()["error"]) >= {"message", "type", "param", "code"}


# --- filenames are data, never paths ---------------------------------------------------------------


@pytest.mark.parametrize(
    "raw_filename, expected",
    [
        (b"../../etc/passwd", "passwd"),
        (b"/etc/shadow", "shadow"),
        (b"C:\\x\\y.jsonl", "y.jsonl"),
        (b"..\\..\\evil.jsonl", "evil.jsonl"),
        (b"a\x00b.jsonl", None),
        (b"..", None),
        (b"../", None),
        (b"", None),
        (b"x" * 1000 + b".jsonl", None),
        (b"tab\tand\x1bescape.jsonl", None),
    ],
)
def test_path_like_filenames_are_sanitised(
    api_server: ApiServer, client: httpx.Client, tenant: Tenant, raw_filename: bytes, expected: str | None
) -> None:
    storage = api_server.services.settings.storage_dir
    r = raw_upload(client, good("a") + b"\n", raw_filename)
    assert r.status_code == 200, r.text
    meta = r.json()
    name = meta["filename"]
    assert "/" not in name and "\\" not in name and "\x00" not in name and name not in ("", ".", "..")
    assert all(ch.isprintable() for ch in name) and len(name) <= 255
    if expected is not None:
        assert name == expected
    # Stored under the file id only: the project's tree holds exactly the bytes and the
    # metadata, and the list index's entries (named by creation time and id).
    project_dir = storage / "projects" / tenant.project
    stored = sorted(str(p.relative_to(project_dir)) for p in project_dir.rglob("*") if p.is_file())
    assert [p for p in stored if not p.startswith("file-index/")] == [f"files/{meta['id']}", f"files/{meta['id']}.json"]
    assert all(re.fullmatch(r"file-index/batch/(asc|desc)/\d{12}\.[0-9A-Za-z-]{29}", p) for p in stored if p.startswith("file-index/"))
    assert client.get(f"/v1/files/{meta['id']}/content").content == good("a") + b"\n"
    assert client.get(f"/v1/files/{meta['id']}").json()["filename"] == name


def test_nothing_lands_outside_storage_after_hostile_uploads(tmp_path: Path) -> None:
    data = tmp_path / "data"
    services = make_services(data)
    with serve(services) as url:
        key = services.keys.create("p")
        with httpx.Client(base_url=url, headers={"x-api-key": key, "x-project-id": "p"}, timeout=30) as c:
            for name in (b"../../escape1", b"../../../../tmp/escape2", b"..\\..\\escape3", b"/abs/escape4"):
                assert raw_upload(c, good("a"), name).status_code == 200
    outside = [p for p in tmp_path.rglob("*") if "escape" in p.name]
    assert outside == []
    assert not (data / "storage" / "projects" / "p" / "files" / "escape1").exists()
    assert not os.path.exists("/tmp/escape2")


# --- accepted ids and bodies that only matter at run time: real executor ---------------------------


@pytest.fixture
def live(tmp_path: Path):
    services = make_services(tmp_path)
    services.settings = services.settings.model_copy(update={"shard_target_requests": 4, "part_max_seconds": 0.2})
    executor = LocalExecutor(
        settings=services.settings, store=services.files.store, files=services.files, batches=services.batches,
        served_models=None, engine="echo", poll_seconds=0.1,
    )
    services.runner = executor
    executor.start()
    try:
        with serve(services) as url:
            key = services.keys.create("live")
            with httpx.Client(base_url=url, headers={"x-api-key": key, "x-project-id": "live"}, timeout=60) as c:
                yield c
    finally:
        executor.stop()


def wait_terminal(client: httpx.Client, batch_id: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in TERMINAL:
            return batch
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} not finished in {timeout}s: {batch}")


def result_lines(client: httpx.Client, batch: dict) -> list[dict]:
    out = []
    for key in ("output_file_id", "error_file_id"):
        if batch[key]:
            r = client.get(f"/v1/files/{batch[key]}/content")
            assert r.status_code == 200
            out += [json.loads(x) for x in r.content.splitlines()]
    return out


def test_ids_differing_only_in_case_or_whitespace_stay_apart(live: httpx.Client) -> None:
    ids = ["a", "A", " a", "a ", "a\t", "\u00e9", "e\u0301", "a\u200b", "A "]
    content = jsonl([chat_line(cid, f"reply to [{cid}]") for cid in ids])
    r = upload_and_create(live, content)
    assert r.status_code == 200, r.text
    batch = wait_terminal(live, r.json()["id"])
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": len(ids), "completed": len(ids), "failed": 0}
    lines = result_lines(live, batch)
    assert Counter(x["custom_id"] for x in lines) == Counter(ids)
    for x in lines:  # each result is the answer to its own request
        assert x["response"]["body"]["choices"][0]["message"]["content"] == f"reply to [{x['custom_id']}]"


def test_valid_lines_with_odd_bodies_get_per_line_results(live: httpx.Client) -> None:
    """Lines the validator accepts (it checks the envelope, not the chat schema) must each
    end in exactly one result file; the batch never wedges in in_progress."""
    odd_bodies = {
        "messages-int": {"model": "m", "messages": 5},
        "messages-true": {"model": "m", "messages": True},
        "messages-str": {"model": "m", "messages": "hello"},
        "messages-obj": {"model": "m", "messages": {"role": "user"}},
        "text-part-int": {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        "text-part-null": {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
        "content-int": {"model": "m", "messages": [{"role": "user", "content": 12}]},
        "max-tokens-str": {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "lots"},
        "max-tokens-list": {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": [1]},
        "n-obj": {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": {"a": 1}},
        "huge-int": {"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 2**80},
        "ok": {"model": "m", "messages": [{"role": "user", "content": "fine"}]},
    }
    lines = [{"custom_id": cid, "method": "POST", "url": ENDPOINT, "body": body} for cid, body in odd_bodies.items()]
    r = upload_and_create(live, jsonl(lines))
    assert r.status_code == 200, r.text
    batch = wait_terminal(live, r.json()["id"])
    assert batch["status"] == "completed", batch
    counts = batch["request_counts"]
    assert counts["total"] == len(odd_bodies) == counts["completed"] + counts["failed"]
    results = result_lines(live, batch)
    assert Counter(x["custom_id"] for x in results) == Counter(list(odd_bodies))
    by_id = {x["custom_id"]: x for x in results}
    assert by_id["ok"]["response"]["status_code"] == 200
    assert by_id["messages-int"]["response"] is None or by_id["messages-int"]["response"]["status_code"] == 400
