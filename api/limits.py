"""What one client may take of the gateway: bodies, time, uploads at once.

`RequestLimitsMiddleware` (plain ASGI, inside the request-context layer so every
answer has a request id and an access-log line):

- authenticates before any body byte is read: FastAPI reads a JSON body before it
  resolves dependencies, so an unauthenticated 64 MiB body would be read and
  parsed only to be refused. Routes that depend on `authenticate` get their
  headers checked here first (401/403 in the envelope; the body is never read).
- caps every body but the streamed upload at `max_json_body_bytes`: a larger
  Content-Length is a 413 at once; a chunked body is counted as it arrives and cut
  off at the cap (413). The small body is then handed to FastAPI as it was.
- times out bodies: no byte for `body_idle_timeout_seconds`, or (after that long)
  less than `body_min_bytes_per_second` on average: 408. Either error closes the
  connection, since the rest of the body is never read.
- answers HEAD on GET routes like GET, without the body (RFC 9110).

`UploadCapacity` bounds uploads in flight, gateway-wide (503) and per project
(429), both with Retry-After, and owns the uploads' own storage threads: an
admitted upload never waits for a thread, and a slow one never holds a thread
another route needs.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from vbatch.api.auth import authenticate, key_from_headers, project_for
from vbatch.api.errors import error_response, retry_headers
from vbatch.api.services import Services
from vbatch.core.config import Settings
from vbatch.core.errors import BodyTooLarge, RequestTimeout, ServiceBusy, TooManyRequests, VBatchError

# Routes whose handlers stream the body themselves (the multipart upload): not capped
# at the JSON size, only timed. (method, path template)
STREAMED_BODY_ROUTES = {("POST", "/v1/files")}
# Set in the scope of a HEAD request served by its GET route.
HEAD_REQUEST = "vbatch.head_request"


def is_head_request(scope: Scope) -> bool:
    return bool(scope.get(HEAD_REQUEST))


class UploadCapacity:
    """Upload slots (event-loop side, no lock needed) and the uploads' thread pool."""

    def __init__(self, settings: Settings) -> None:
        self.limit = max(1, settings.max_concurrent_uploads)
        self.per_project = max(1, settings.max_concurrent_uploads_per_project)
        self.in_flight = 0
        self.by_project: Counter[str] = Counter()
        self.executor = ThreadPoolExecutor(max_workers=self.limit, thread_name_prefix="vbatch-upload")

    @contextmanager
    def slot(self, project: str) -> Iterator[None]:
        if self.by_project[project] >= self.per_project:
            raise TooManyRequests(
                f"This project already has {self.per_project} uploads in progress; retry when one has finished."
            )
        if self.in_flight >= self.limit:
            raise ServiceBusy("The server is handling as many uploads as it can; retry shortly.")
        self.in_flight += 1
        self.by_project[project] += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self.by_project[project] -= 1
            if not self.by_project[project]:
                del self.by_project[project]

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class BodyGuard:
    """`receive` with a deadline: idle and too-slow bodies raise RequestTimeout."""

    def __init__(self, receive: Receive, *, idle_seconds: float, min_rate: float) -> None:
        self._receive = receive
        self.idle = idle_seconds
        self.min_rate = min_rate
        self.started: float | None = None
        self.received = 0
        self.complete = False
        self.timed_out = False

    def _timeout(self, now: float) -> float:
        assert self.started is not None
        timeout = self.idle
        if self.min_rate > 0:
            # After a grace of `idle`, the body must keep up `min_rate` on average.
            timeout = min(timeout, self.started + self.idle + self.received / self.min_rate - now)
        return timeout

    async def __call__(self) -> Message:
        if self.complete or self.idle <= 0:
            return await self._receive()  # e.g. waiting for http.disconnect: no deadline
        now = time.monotonic()
        if self.started is None:
            self.started = now
        timeout = self._timeout(now)
        try:
            if timeout <= 0:
                raise TimeoutError
            message = await asyncio.wait_for(self._receive(), timeout)
        except TimeoutError:
            self.timed_out = True
            raise RequestTimeout(
                "The request body arrived too slowly (or stopped); send it without pauses.",
            ) from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.complete = True
        return message


def _has_body(headers: Headers) -> bool:
    length = headers.get("content-length")
    if length is not None:
        return length.strip() != "0"
    return "transfer-encoding" in headers


def _needs_auth(route: Any, cache: dict[int, bool]) -> bool:
    key = id(route)
    if key not in cache:
        stack = [getattr(route, "dependant", None)]
        found = False
        while stack:
            dependant = stack.pop()
            if dependant is None:
                continue
            if dependant.call is authenticate:
                found = True
                break
            stack.extend(dependant.dependencies)
        cache[key] = found
    return cache[key]


def _matched_route(scope: Scope) -> Any:
    app = scope.get("app")
    router = getattr(app, "router", None)
    for route in getattr(router, "routes", ()):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return route
    return None


class RequestLimitsMiddleware:
    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services
        self.settings = services.settings
        self._auth_routes: dict[int, bool] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        outer = scope
        if scope["method"] == "HEAD":
            # Served by the GET route; uvicorn, which still sees HEAD, sends no body.
            scope = dict(scope, method="GET")
            scope[HEAD_REQUEST] = True
        try:
            await self._handle(scope, receive, send)
        finally:
            if scope is not outer:  # the access log reads the route from its own scope
                for name in ("route", "endpoint", "path_params"):
                    if name in scope:
                        outer[name] = scope[name]

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = self.settings
        headers = Headers(scope=scope)
        has_body = _has_body(headers)
        route = _matched_route(scope)

        if route is not None and _needs_auth(route, self._auth_routes):
            try:
                project = project_for(
                    self.services,
                    key_from_headers(headers.get("x-api-key"), headers.get("authorization")),
                    headers.get("x-project-id"),
                )
            except VBatchError as exc:
                await self._reject(exc, scope, receive, send)
                return
            scope.setdefault("state", {})["project"] = project

        guard = BodyGuard(receive, idle_seconds=settings.body_idle_timeout_seconds,
                          min_rate=settings.body_min_bytes_per_second)
        if not has_body:
            await self.app(scope, receive, send)
            return
        streamed = route is not None and (scope["method"], getattr(route, "path", "")) in STREAMED_BODY_ROUTES
        if route is not None and not streamed:
            try:
                replay = await self._read_capped(headers, guard)
            except VBatchError as exc:
                await self._reject(exc, scope, receive, send)
                return
            if replay is None:
                return  # the client went away mid-body: nobody to answer
            receive = replay
        else:
            receive = guard

        async def send_closing(message: Message) -> None:
            # A body that stalled is never read to its end: the connection cannot be
            # reused. (A refused body that keeps coming is read and dropped by the
            # server, bounded by the head timeout, so fast clients still get the answer.)
            if message["type"] == "http.response.start" and guard.timed_out:
                MutableHeaders(scope=message)["connection"] = "close"
            await send(message)

        await self.app(scope, receive, send_closing)

    async def _read_capped(self, headers: Headers, guard: BodyGuard) -> Receive | None:
        """The whole (small) body, read ahead and handed on as one message; None when
        the client disconnected. BodyTooLarge past the cap, RequestTimeout if it stalls."""
        cap = self.settings.max_json_body_bytes
        too_large = BodyTooLarge(f"The request body is larger than the limit of {cap} bytes.")
        length = headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > cap:
            raise too_large
        body = bytearray()
        while not guard.complete:
            message = await guard()
            if message["type"] != "http.request":
                return None
            body += message.get("body", b"")
            if len(body) > cap:
                raise too_large
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await guard()

        return replay

    async def _reject(self, exc: VBatchError, scope: Scope, receive: Receive, send: Send) -> None:
        headers = retry_headers(exc, self.settings)
        if isinstance(exc, RequestTimeout):
            headers["connection"] = "close"
        response = error_response(exc.status_code, exc.envelope(), headers=headers)
        await response(scope, receive, send)
