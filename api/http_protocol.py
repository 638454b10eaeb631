"""The HTTP server under the gateway: uvicorn (httptools) with a time and size limit on
request heads, and `server_config`, the one place both `vbatch serve` and the tests
build uvicorn's Config.

uvicorn has neither: a connection that sends half a request line and then nothing
stays open forever, and httptools lets the request line grow without bound (a
100 MB URL is buffered whole). Here a request head must arrive within
`header_timeout_seconds` (408, then the connection closes) and stay under
`max_header_bytes` (431, then the connection closes). Bodies are limited in the
ASGI layer (`vbatch.api.limits`), where the route is known.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from vbatch.api.errors import envelope
from vbatch.core.config import Settings

# Idle keep-alive connections stay open longer than clients and proxies keep them
# pooled (httpx 5 s, common load balancers 60 s): a server that closes first races
# clients reusing the connection, which then see "disconnected without a response".
KEEP_ALIVE_SECONDS = 75

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def _raw_error(status: int, message: str, code: str) -> bytes:
    body = orjson.dumps(envelope(message, code=code))
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        % (status, _REASONS[status], len(body))
    )
    return head + body


class _HeadTooLarge(Exception):
    pass


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size cap on each request head."""

    header_timeout: float = 30.0
    max_header_bytes: int = 64 * 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_head = True  # between the first byte of a request and its last header
        self._head_bytes = 0
        self._head_too_large = False
        self._message_complete = True  # False while a request is still arriving
        self._discarding = False  # the request was answered, its body is still arriving
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()  # a new connection owes us a request head

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if not self._discarding:
            self.transport.write(
                _raw_error(408, "The request headers did not arrive in time.", "request_timeout")
            )
        # else: the body of a request already answered (e.g. a refused upload) is still
        # being read and dropped; the answer is out, so just stop.
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._arm_head_timer()  # idle keep-alive is the keep-alive timer's; this starts at a byte
        super().data_received(data)

    def _count_head(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.max_header_bytes:
            self._head_too_large = True
            raise _HeadTooLarge  # httptools stops parsing; send_400_response answers 431

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._message_complete = False
        self._discarding = False
        super().on_message_begin()

    def on_message_complete(self) -> None:
        self._message_complete = True
        self._discarding = False
        if self._in_head:
            # The dropped body of an answered request has ended: the connection is idle
            # now (the keep-alive timer's), until the next request's first byte.
            self._disarm_head_timer()
        super().on_message_complete()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        # The next request's head, once its first byte arrives (unless a pipelined
        # request, its head already parsed, runs next).
        self._in_head = not self.pipeline
        # Answered before its body ended: what still comes is read and dropped, for at
        # most header_timeout (the timer armed by the next data) — then the connection closes.
        self._discarding = not self._message_complete
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        if not self._head_too_large:
            super().send_400_response(msg)
            return
        self._disarm_head_timer()
        self.transport.write(
            _raw_error(431, f"The request line and headers exceed {self.max_header_bytes} bytes.",
                       "request_header_too_large")
        )
        self.transport.close()


def protocol_for(settings: Settings) -> type[GuardedHttpToolsProtocol]:
    return type(
        "GatewayHttpProtocol",
        (GuardedHttpToolsProtocol,),
        {"header_timeout": settings.header_timeout_seconds, "max_header_bytes": settings.max_header_bytes},
    )


def server_config(app: Any, settings: Settings, **options: Any) -> uvicorn.Config:
    """uvicorn's Config for the gateway: the guarded protocol, our keep-alive."""
    assert httptools is not None
    options.setdefault("timeout_keep_alive", KEEP_ALIVE_SECONDS)
    return uvicorn.Config(app, http=protocol_for(settings), **options)
