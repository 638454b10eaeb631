"""Prometheus metrics of the gateway, served at /metrics.

Collectors live in prometheus-client's default registry so that whatever else
runs in the process (the local executor, the runtime collectors) shows up on the
same page without the gateway knowing about it.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Histogram,
    generate_latest,
)

REQUESTS = Counter(
    "vbatch_http_requests_total",
    "HTTP requests answered, by route template and status.",
    ["method", "route", "status"],
)
LATENCY = Histogram(
    "vbatch_http_request_duration_seconds",
    "Time to answer an HTTP request (until the handler returned or the body was sent).",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
UPLOAD_BYTES = Counter("vbatch_upload_bytes_total", "File bytes received through POST /v1/files.")
FILES_UPLOADED = Counter("vbatch_files_uploaded_total", "Files stored through POST /v1/files.")
BATCHES_CREATED = Counter("vbatch_batches_created_total", "Batches accepted by POST /v1/batches.")
BATCHES_REJECTED = Counter(
    "vbatch_batches_rejected_total", "POST /v1/batches answered with a 4xx, by error code.", ["code"]
)

# Unmatched paths share one label: raw paths would let any client mint series.
UNMATCHED_ROUTE = "<unmatched>"


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    REQUESTS.labels(method, route, str(status)).inc()
    LATENCY.labels(method, route).observe(seconds)


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
