"""Cross-cutting HTTP behaviour: request ids and logs, metrics, health, OpenAPI."""

from __future__ import annotations

import logging
import re

import httpx
import pytest
from api_server import QUICKSTART_JSONL, ApiServer, Tenant


def test_request_id_on_every_response_and_in_the_log(
    api_server: ApiServer, tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="vbatch.api.access"), api_server.client(tenant) as c:
        responses = [
            c.get("/v1/files"),
            c.get("/v1/files/file-000000000000000000000000"),  # 404
            httpx.get(f"{api_server.url}/v1/batches"),  # 401
            c.get("/healthz"),
        ]
    ids = [r.headers["x-request-id"] for r in responses]
    assert all(re.fullmatch(r"req_[0-9a-f]{24}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    lines = {rec.request_id: rec for rec in caplog.records if hasattr(rec, "request_id")}
    for r, rid in zip(responses, ids, strict=True):
        rec = lines[rid]
        assert (rec.method, rec.path, rec.status) == (r.request.method, r.request.url.path, r.status_code)
        assert rid in rec.getMessage()
    assert lines[ids[0]].project == tenant.project
    assert lines[ids[2]].project is None  # never authenticated


def test_metrics_count_requests_by_route_template(api_server: ApiServer, tenant: Tenant) -> None:
    with api_server.client(tenant) as c:
        f = c.post("/v1/files", files=[("purpose", (None, "batch")), ("file", ("in.jsonl", QUICKSTART_JSONL))])
        c.get(f"/v1/files/{f.json()['id']}")
        c.post("/v1/batches", json={"input_file_id": f.json()["id"], "endpoint": "/v1/chat/completions",
                                    "completion_window": "24h"})  # fmt: skip
        c.get("/v1/some/random/path/123")
    text = httpx.get(f"{api_server.url}/metrics").text  # no auth needed
    assert 'vbatch_http_requests_total{method="GET",route="/v1/files/{file_id}",status="200"}' in text
    assert 'vbatch_http_requests_total{method="POST",route="/v1/batches",status="200"}' in text
    assert 'route="<unmatched>",status="404"' in text
    assert "/v1/some/random" not in text  # raw paths never become labels
    assert re.search(r"^vbatch_upload_bytes_total [1-9]", text, re.M)
    assert re.search(r"^vbatch_batches_created_total [1-9]", text, re.M)
    assert "vbatch_http_request_duration_seconds_bucket" in text


def test_health_readiness_and_docs_need_no_auth(api_server: ApiServer) -> None:
    assert httpx.get(f"{api_server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{api_server.url}/readyz").status_code == 200
    assert httpx.get(f"{api_server.url}/docs").status_code == 200
    assert httpx.get(f"{api_server.url}/openapi.json").status_code == 200


def test_readyz_follows_the_ready_probe(api_server: ApiServer) -> None:
    original = api_server.services.ready
    try:
        api_server.services.ready = lambda: False
        r = httpx.get(f"{api_server.url}/readyz")
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "service_unavailable"
    finally:
        api_server.services.ready = original


def test_openapi_describes_the_real_requests(api_server: ApiServer) -> None:
    spec = httpx.get(f"{api_server.url}/openapi.json").json()
    upload = spec["paths"]["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["properties"]["file"]["format"] == "binary"
    assert set(upload["required"]) == {"file", "purpose"}
    create = spec["paths"]["/v1/batches"]["post"]
    assert "application/json" in create["requestBody"]["content"]
    assert {"400", "401", "403", "404"} <= set(create["responses"])
    schemes = spec["components"]["securitySchemes"]
    assert {s.get("name") for s in schemes.values()} >= {"x-api-key", "x-project-id"}
    for path in ("/v1/files", "/v1/files/{file_id}", "/v1/files/{file_id}/content", "/v1/batches",
                 "/v1/batches/{batch_id}", "/v1/batches/{batch_id}/cancel"):  # fmt: skip
        assert path in spec["paths"]


def test_an_idle_keep_alive_connection_outlives_client_pools(api_server) -> None:
    """httpx keeps idle connections 5 s: a server closing them at 5 s too races clients
    that reuse one (they see "disconnected without a response"). One request, 6 s of
    silence, a second request on the same connection: both answered."""
    import http.client
    import time

    host, port = api_server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/healthz")
        first = conn.getresponse()
        first.read()
        sock = conn.sock
        time.sleep(6)
        conn.request("GET", "/healthz")
        second = conn.getresponse()
        second.read()
        assert (first.status, second.status) == (200, 200)
        assert conn.sock is sock  # the same TCP connection served both
    finally:
        conn.close()
