"""The auth matrix: every endpoint x every bad credential, and zero leaks.

Missing credentials: 401. A key that is unknown, revoked or not granted for the
project named: 403. A valid tenant asking for another project's ids: 404, exactly
as for an id that never existed. No body ever carries the victim's ids or filenames.
"""

from __future__ import annotations

import httpx
import pytest
from api_server import ApiServer, chat_line, jsonl

SECRET_NAME = "victim-secret-name.jsonl"


@pytest.fixture(scope="module")
def world(api_server: ApiServer):
    """A victim project with a file and a batch; an attacker project; a revoked key."""
    victim = api_server.new_tenant()
    attacker = api_server.new_tenant()
    revoked = api_server.new_tenant()
    api_server.services.keys.revoke(revoked.key)
    with api_server.client(victim) as c:
        f = c.post(
            "/v1/files", files={"file": (SECRET_NAME, jsonl([chat_line("victim-cid")]))}, data={"purpose": "batch"}
        ).json()
        b = c.post(
            "/v1/batches",
            json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        ).json()
    with api_server.client(attacker) as c:  # the attacker owns data too: its lists must not be empty by accident
        own = c.post("/v1/files", files={"file": ("mine.jsonl", jsonl([chat_line("x")]))}, data={"purpose": "batch"})
        assert own.status_code == 200
    return {"victim": victim, "attacker": attacker, "revoked": revoked, "file": f["id"], "batch": b["id"]}


def endpoints(file_id: str, batch_id: str) -> list[tuple[str, str, dict]]:
    upload = {"files": {"file": ("x.jsonl", jsonl([chat_line("a")]))}, "data": {"purpose": "batch"}}
    create = {"json": {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}}
    return [
        ("POST", "/v1/files", upload),
        ("GET", "/v1/files", {}),
        ("GET", f"/v1/files/{file_id}", {}),
        ("GET", f"/v1/files/{file_id}/content", {}),
        ("DELETE", f"/v1/files/{file_id}", {}),
        ("POST", "/v1/batches", create),
        ("GET", "/v1/batches", {}),
        ("GET", f"/v1/batches/{batch_id}", {}),
        ("POST", f"/v1/batches/{batch_id}/cancel", {}),
    ]


def credentials(world: dict) -> dict[str, tuple[dict[str, str], int]]:
    victim, attacker, revoked = world["victim"], world["attacker"], world["revoked"]
    return {
        "no_headers": ({}, 401),
        "key_only": ({"x-api-key": victim.key}, 401),
        "project_only": ({"x-project-id": victim.project}, 401),
        "empty_key": ({"x-api-key": "", "x-project-id": victim.project}, 401),
        "bearer_without_token": ({"authorization": "Bearer", "x-project-id": victim.project}, 401),
        "basic_auth_scheme": ({"authorization": f"Basic {victim.key}", "x-project-id": victim.project}, 401),
        "wrong_key": ({"x-api-key": "vb-" + "A" * 43, "x-project-id": victim.project}, 403),
        "wrong_bearer": ({"authorization": "Bearer vb-nope", "x-project-id": victim.project}, 403),
        "revoked_key": ({"x-api-key": revoked.key, "x-project-id": revoked.project}, 403),
        "revoked_bearer": ({"authorization": f"Bearer {revoked.key}", "x-project-id": revoked.project}, 403),
        "other_projects_key": ({"x-api-key": attacker.key, "x-project-id": victim.project}, 403),
        "other_projects_bearer": ({"authorization": f"Bearer {attacker.key}", "x-project-id": victim.project}, 403),
        "wrong_project_header": ({"x-api-key": victim.key, "x-project-id": attacker.project}, 403),
        "unknown_project_header": ({"x-api-key": victim.key, "x-project-id": "no-such-project"}, 403),
        "project_with_traversal": ({"x-api-key": victim.key, "x-project-id": f"../{victim.project}"}, 403),
        "project_case_changed": ({"x-api-key": victim.key, "x-project-id": victim.project.upper()}, 403),
        "key_with_suffix": ({"x-api-key": victim.key + "x", "x-project-id": victim.project}, 403),
        "key_prefix_only": ({"x-api-key": victim.key[:-1], "x-project-id": victim.project}, 403),
    }


def assert_no_leak(r: httpx.Response, world: dict) -> None:
    body = r.text
    # An id the request itself names may be echoed back ("No such file: file-..."),
    # as OpenAI does; anything else of the victim's must never appear.
    sent = str(r.request.url) + r.request.read().decode("latin-1")
    for secret in (world["file"], world["batch"], SECRET_NAME, "victim-cid", world["victim"].key):
        if secret in sent:
            continue
        assert secret not in body, f"{secret!r} leaked in {r.request.method} {r.request.url}: {body[:300]}"


CREDENTIAL_CASES = [
    "no_headers", "key_only", "project_only", "empty_key", "bearer_without_token", "basic_auth_scheme",
    "wrong_key", "wrong_bearer", "revoked_key", "revoked_bearer", "other_projects_key", "other_projects_bearer",
    "wrong_project_header", "unknown_project_header", "project_with_traversal", "project_case_changed",
    "key_with_suffix", "key_prefix_only",
]


@pytest.mark.parametrize("case", CREDENTIAL_CASES)
def test_bad_credentials_on_every_endpoint(api_server: ApiServer, world: dict, case: str) -> None:
    headers, status = credentials(world)[case]
    with httpx.Client(base_url=api_server.url, timeout=30) as c:
        for method, path, kwargs in endpoints(world["file"], world["batch"]):
            r = c.request(method, path, headers=headers, **kwargs)
            assert r.status_code == status, (case, method, path, r.status_code, r.text)
            error = r.json()["error"]
            assert error["type"] == "authentication_error", (method, path, error)
            assert error["message"] and set(error) >= {"message", "type", "param", "code"}
            assert r.headers["x-request-id"].startswith("req_")
            assert_no_leak(r, world)
    # Nothing any of them did touched the victim's data.
    with api_server.client(world["victim"]) as c:
        assert c.get(f"/v1/files/{world['file']}").status_code == 200
        assert c.get(f"/v1/batches/{world['batch']}").json()["status"] == "in_progress"


@pytest.mark.parametrize("bearer", [False, True])
def test_another_projects_ids_are_404_and_lists_do_not_show_them(
    api_server: ApiServer, world: dict, bearer: bool
) -> None:
    attacker = world["attacker"]
    headers = (
        {"authorization": f"Bearer {attacker.key}", "x-project-id": attacker.project} if bearer else attacker.headers
    )
    with httpx.Client(base_url=api_server.url, headers=headers, timeout=30) as c:
        for method, path, kwargs in endpoints(world["file"], world["batch"]):
            r = c.request(method, path, **kwargs)
            if "{" not in path and world["file"] not in path and world["batch"] not in path and method == "GET":
                assert r.status_code == 200, (method, path, r.text)  # own (non-empty) lists
            elif path == "/v1/files":
                assert r.status_code == 200  # an upload of its own
            elif path == "/v1/batches":
                assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found"
            else:
                assert r.status_code == 404, (method, path, r.status_code, r.text)
                assert r.json()["error"]["type"] == "invalid_request_error"
            assert_no_leak(r, world)
        # Same answer as for an id that never existed (existence does not leak).
        r_victim = c.get(f"/v1/files/{world['file']}").json()["error"]
        r_never = c.get("/v1/files/file-000000000000000000000000").json()["error"]
        assert r_victim["code"] == r_never["code"] and r_victim["type"] == r_never["type"]
        b_victim = c.get(f"/v1/batches/{world['batch']}").json()["error"]
        b_never = c.get("/v1/batches/batch_00000000000000000000000000").json()["error"]
        assert b_victim["code"] == b_never["code"]
        for purpose in (None, "batch", "batch_output"):
            params = {"purpose": purpose} if purpose else {}
            assert_no_leak(c.get("/v1/files", params=params), world)
        assert_no_leak(c.get("/v1/batches", params={"after": world["batch"]}), world)
        assert_no_leak(c.get("/v1/files", params={"after": world["file"], "order": "asc"}), world)
    # The victim still has everything.
    with api_server.client(world["victim"]) as c:
        assert c.get(f"/v1/files/{world['file']}/content").status_code == 200
        assert c.get(f"/v1/batches/{world['batch']}").json()["status"] == "in_progress"


def test_revocation_applies_to_a_key_in_use(api_server: ApiServer) -> None:
    t = api_server.new_tenant()
    with api_server.client(t) as c:
        assert c.get("/v1/files").status_code == 200
        assert api_server.services.keys.revoke(t.key)
        r = c.get("/v1/files")
        assert r.status_code == 403 and r.json()["error"]["type"] == "authentication_error"
