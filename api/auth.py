"""Who is calling: `x-api-key` (or `Authorization: Bearer`) plus `x-project-id`.

Missing credentials are a 401, credentials that do not open this project a 403
(the key store decides, comparing hashes in constant time). The project found
here scopes every store and file lookup, so another project's ids simply are
not found (404) — existence never leaks.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from vbatch.api.services import Services
from vbatch.core.errors import AuthenticationFailed

# auto_error=False: FastAPI's own 401/403 bodies are not the envelope; we raise ours.
# Declaring them as security schemes also documents them in /openapi.json.
_api_key_header = APIKeyHeader(name="x-api-key", scheme_name="ApiKey", auto_error=False, description="API key")
_bearer = HTTPBearer(
    scheme_name="BearerKey", auto_error=False, description="API key as a bearer token (what the openai SDK sends)"
)
_project_header = APIKeyHeader(name="x-project-id", scheme_name="ProjectId", auto_error=False, description="Project id")


# Dependencies that never block are `async def`: FastAPI runs a plain `def` dependency
# on its thread pool, and those hops were most of the cost of a poll (GET a batch).
async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def project_for(services: Services, api_key: str | None, project: str | None) -> str:
    """The project these credentials open: 401 when one is missing, 403 when they do not fit."""
    if not api_key:
        raise AuthenticationFailed(
            "Missing API key: send it in the x-api-key header (or Authorization: Bearer).",
            code="missing_api_key",
        )
    if not project:
        raise AuthenticationFailed("Missing x-project-id header.", code="missing_project_id")
    services.keys.authenticate(api_key, project)  # PermissionDenied (403) when it does not fit
    return project


def key_from_headers(x_api_key: str | None, authorization: str | None) -> str | None:
    if x_api_key:
        return x_api_key
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


async def authenticate(
    request: Request,
    services: ServicesDep,
    api_key: Annotated[str | None, Depends(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    project: Annotated[str | None, Depends(_project_header)],
) -> str:
    """The caller's project, once its key is proven to open it.

    `vbatch.api.limits` already checked the same headers before any body was read
    (this dependency runs after FastAPI reads a JSON body); checking again is cheap:
    a hash and a stat of the key file, fine on the event loop, as in that middleware.
    """
    key = api_key or (bearer.credentials if bearer and bearer.scheme.lower() == "bearer" else None)
    project = project_for(services, key, project)
    request.state.project = project  # for the access log line
    return project


ProjectDep = Annotated[str, Depends(authenticate)]
