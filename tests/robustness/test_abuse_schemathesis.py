"""Property-based fuzzing of the live API from its own /openapi.json (schemathesis).

Valid (positive) and invalid (negative) requests are generated per operation from
the served schema and sent with a real tenant's headers, so they reach the
handlers: the server never answers 5xx, and every non-2xx is the error envelope.
Bounded: a fixed number of examples per operation and mode, derandomized, no shrinking.
"""

from __future__ import annotations

import pytest
import schemathesis
from api_server import ApiServer
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

EXAMPLES = 20

# Every operation of the public API; test_schema_lists_exactly_these_operations keeps
# this in step with the served schema (a new route must be added here to be fuzzed).
OPERATIONS = [
    ("/v1/files", "POST"),
    ("/v1/files", "GET"),
    ("/v1/files/{file_id}", "GET"),
    ("/v1/files/{file_id}", "DELETE"),
    ("/v1/files/{file_id}/content", "GET"),
    ("/v1/batches", "POST"),
    ("/v1/batches", "GET"),
    ("/v1/batches/{batch_id}", "GET"),
    ("/v1/batches/{batch_id}/cancel", "POST"),
    ("/v1/models", "GET"),
    ("/v1/models/{model_id}", "GET"),
]
OPEN_ROUTES = {("/healthz", "GET"), ("/readyz", "GET"), ("/metrics", "GET")}


@pytest.fixture(scope="module")
def live_schema(api_server: ApiServer):
    return schemathesis.openapi.from_url(f"{api_server.url}/openapi.json")


def check_response(response, case) -> None:
    status = response.status_code
    where = f"{case.method} {case.formatted_path} -> {status}"
    assert status < 500, f"{where}: {response.text[:500]}"
    assert response.headers.get("x-request-id", [""])[0].startswith("req_"), where
    if status >= 400:
        body = response.json()
        assert isinstance(body, dict) and set(body) == {"error"}, f"{where}: {response.text[:300]}"
        error = body["error"]
        assert {"message", "type", "param", "code"} <= set(error), f"{where}: {error}"
        assert isinstance(error["message"], str) and error["message"], where
        assert error["type"] in {"invalid_request_error", "authentication_error", "rate_limit_exceeded"}, where


def test_schema_lists_exactly_these_operations(live_schema) -> None:
    served = set()
    for result in live_schema.get_all_operations():
        op = result.ok()
        served.add((op.path, op.method.upper()))
    assert served - OPEN_ROUTES == set(OPERATIONS)


def fuzz(live_schema, path: str, method: str, mode: GenerationMode, headers: dict[str, str] | None) -> None:
    operation = live_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: report what was found
        suppress_health_check=list(HealthCheck),
    )
    def run(case) -> None:
        # Our credentials override whatever the generator put in these headers.
        check_response(case.call(headers=headers, timeout=30), case)

    run()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
@pytest.mark.parametrize("path, method", OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_fuzz_with_a_real_tenant(api_server: ApiServer, live_schema, path: str, method: str, mode) -> None:
    tenant = api_server.new_tenant()
    fuzz(live_schema, path, method, mode, tenant.headers)


@pytest.mark.parametrize("path, method", OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_fuzz_with_generated_credentials(live_schema, path: str, method: str) -> None:
    # Whatever the generator sends as credentials (or nothing): a clean 401/403/4xx.
    fuzz(live_schema, path, method, GenerationMode.NEGATIVE, None)
