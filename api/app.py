"""The gateway application: `create_app(services)` -> FastAPI.

`vbatch serve` builds the Services (stores, key store, runner) and runs this
under uvicorn; tests build it over temporary directories.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from vbatch.api import metrics, routes_batches, routes_files, routes_models
from vbatch.api.errors import envelope, install_error_handlers
from vbatch.api.http_protocol import KEEP_ALIVE_SECONDS
from vbatch.api.limits import RequestLimitsMiddleware, UploadCapacity
from vbatch.api.middleware import RequestContextMiddleware
from vbatch.api.services import Services

health = APIRouter(tags=["health"])


@health.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@health.get("/readyz", summary="Readiness: dependencies are reachable")
def readyz(request: Request) -> JSONResponse:
    services: Services = request.app.state.services
    try:
        ready = services.ready()
    except Exception:  # a failing probe means "not ready", never a 500
        ready = False
    if ready:
        return JSONResponse({"status": "ready"})
    return JSONResponse(
        envelope("Not ready.", type="internal_error", code="service_unavailable"), status_code=503
    )


__all__ = ["KEEP_ALIVE_SECONDS", "create_app"]


def create_app(services: Services) -> FastAPI:
    app = FastAPI(
        title="vbatch",
        version="0.1.0",
        description="OpenAI-compatible Files and Batches API, self-hosted.",
    )
    app.state.services = services
    app.state.upload_capacity = UploadCapacity(services.settings)
    install_error_handlers(app)
    # The last added runs first: request id and access log, then the limits (auth
    # before any body, body caps and timeouts, HEAD).
    app.add_middleware(RequestLimitsMiddleware, services=services)
    app.add_middleware(RequestContextMiddleware)
    app.include_router(routes_files.router)
    app.include_router(routes_batches.router)
    app.include_router(routes_models.router)
    app.include_router(health)
    app.include_router(metrics.router)
    return app
