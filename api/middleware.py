"""Request id, access log, request metrics and the last-resort 500 — one ASGI layer.

A plain ASGI middleware rather than `BaseHTTPMiddleware`: it does not buffer
streamed downloads, and it sits inside Starlette's ServerErrorMiddleware, so an
unexpected exception is turned into the error envelope here, where the request
id is known, instead of Starlette's plain-text 500.
"""

from __future__ import annotations

import logging
import time

from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from vbatch.api import metrics
from vbatch.api.errors import error_response, internal_error_body
from vbatch.core.ids import new_request_id

access_log = logging.getLogger("vbatch.api.access")
error_log = logging.getLogger("vbatch.api")


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or metrics.UNMATCHED_ROUTE


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id = new_request_id()
        # scope["state"] is what `request.state` reads: handlers can log the id,
        # and the auth dependency leaves the project there for the log line below.
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            # The client went away mid-request (e.g. an aborted upload): nobody to answer.
            if not response_started:
                status = 499
        except Exception:
            error_log.exception("unhandled error request_id=%s %s %s", request_id, scope["method"], scope["path"])
            if response_started:
                # Headers are out: the only honest signal left is an aborted
                # connection, so a download is never silently truncated.
                raise
            await error_response(500, internal_error_body())(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route = route_template(scope)
            metrics.observe_request(scope["method"], route, status, seconds)
            access_log.info(
                "method=%s path=%s route=%s status=%d duration_ms=%.1f request_id=%s project=%s",
                scope["method"],
                scope["path"],
                route,
                status,
                seconds * 1000,
                request_id,
                state.get("project", "-"),
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 1),
                    "request_id": request_id,
                    "project": state.get("project"),
                },
            )
