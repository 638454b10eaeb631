"""Every non-2xx answer in OpenAI's error envelope.

`{"error": {"message", "type", "param", "code"}}` (+ `line` for JSONL problems).
Clients (the openai SDK in particular) read `error.message`/`error.code`, so
FastAPI's own shapes (`{"detail": ...}`, 422 lists) must never leak out.
Unexpected exceptions become 500s in `middleware.py`, where the request id is known.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from vbatch.core.config import Settings
from vbatch.core.errors import VBatchError, clip

# Location prefixes FastAPI puts in front of a field name; users only know the field.
_LOCATIONS = {"body", "query", "path", "header", "cookie"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    line: int | None = None


class ErrorEnvelope(BaseModel):
    """Documented in /openapi.json for every error status."""

    error: ErrorDetail


def envelope(
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def internal_error_body() -> dict[str, Any]:
    # Generic on purpose: internals (paths, SQL, tracebacks) never reach clients;
    # the request id in the header ties the answer to the server log.
    return envelope(
        "The server had an error while processing your request. "
        "Contact the operator with the x-request-id of this response.",
        type="internal_error",
        code="internal_error",
    )


def retry_headers(exc: VBatchError, settings: Settings) -> dict[str, str]:
    """Retry-After for errors a later retry can fix (busy, storage away or full)."""
    return {"retry-after": str(settings.retry_after_seconds)} if exc.retryable else {}


async def _vbatch_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, VBatchError)
    headers = retry_headers(exc, request.app.state.services.settings)
    if exc.status_code == 408:
        headers["connection"] = "close"  # the rest of the body will never be read
    return error_response(exc.status_code, exc.envelope(), headers=headers or None)


def validation_error_body(exc: RequestValidationError) -> dict[str, Any]:
    """OpenAI's wording for the first problem FastAPI/pydantic found."""
    errors = exc.errors()
    first = errors[0] if errors else {"type": "value_error", "loc": (), "msg": "Invalid request."}
    kind = first.get("type", "")
    path = [str(p) for p in first.get("loc", ()) if p not in _LOCATIONS]
    param = clip(".".join(path)) or None
    if kind == "json_invalid":
        return envelope(
            "We could not parse the JSON body of your request. The body must be valid JSON.",
            code="invalid_json",
        )
    if kind == "missing":
        return envelope(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if kind == "extra_forbidden":
        return envelope(f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if param is None:
        # The body as a whole is wrong: not an object, or not sent as JSON at all
        # (curl -d without -H content-type sends a form content type).
        return envelope(
            "The request body must be a JSON object, sent with Content-Type: application/json.",
            code="invalid_request_body",
        )
    message = f"Invalid value for '{param}': {first.get('msg', 'invalid value')}."
    return envelope(message, param=param, code="invalid_value")


async def _request_validation_error(_: Request, exc: Exception) -> JSONResponse:
    # OpenAI answers malformed requests with 400, not FastAPI's 422.
    assert isinstance(exc, RequestValidationError)
    return error_response(400, validation_error_body(exc))


def _allowed_methods(request: Request) -> list[str]:
    # Starlette's Allow names only the first route matching the path; /v1/files
    # is two routes (GET and POST), and clients deserve both.
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    if "GET" in methods:
        methods.add("HEAD")  # answered by the GET route (vbatch.api.limits)
    return sorted(methods)


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    headers = exc.headers
    if status == 404:
        # What OpenAI answers for a route that does not exist.
        method = "HEAD" if request.scope.get("vbatch.head_request") else request.method
        message = f"Invalid URL ({clip(method)} {clip(request.url.path)})"
        code = "unknown_url"
    elif status == 405:
        method = "HEAD" if request.scope.get("vbatch.head_request") else request.method
        message = f"Method {clip(method)} is not allowed on {clip(request.url.path)}."
        code = "method_not_allowed"
        others = {k: v for k, v in (headers or {}).items() if k.lower() != "allow"}
        headers = others | {"allow": ", ".join(_allowed_methods(request))}
    else:
        message = str(exc.detail)
        code = None
    type_ = "internal_error" if status >= 500 else "invalid_request_error"
    if status in (401, 403):
        type_ = "authentication_error"
    return error_response(status, envelope(message, type=type_, code=code), headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(VBatchError, _vbatch_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)


# For `responses=` on routers: documents the envelope under every error status.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorEnvelope, "description": description}
    for status, description in {
        400: "Invalid request",
        401: "Missing x-api-key/Authorization or x-project-id",
        403: "API key unknown, revoked or not granted for this project",
        404: "Unknown id (or another project's)",
        408: "The request body stalled or arrived too slowly",
        413: "Request body over its size limit",
        429: "Too many uploads in progress for this project (Retry-After)",
        500: "Internal error",
        503: "Storage unavailable or the server at capacity (Retry-After)",
    }.items()
}
