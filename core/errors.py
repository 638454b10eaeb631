"""Errors that reach users, already shaped like OpenAI's error envelope.

Every failure a client can cause is one of these; the gateway turns them into
`{"error": {"message", "type", "param", "code"}}` with the right status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# User input quoted in an error message is cut to this many characters: an error must
# never echo back (and so amplify) an unbounded id, path or field.
MAX_ECHO_CHARS = 80


def clip(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """`value` as text, cut to `limit` characters (with '...' when cut)."""
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit] + "..."


class VBatchError(Exception):
    status_code: int = 400
    type: str = "invalid_request_error"
    default_code: str | None = None
    # Worth retrying later: the gateway adds a Retry-After header.
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        line: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.param = param
        self.line = line

    def envelope(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }
        if self.line is not None:
            error["line"] = self.line
        return {"error": error}


class InvalidRequest(VBatchError):
    status_code = 400


class NotFound(VBatchError):
    status_code = 404


class Conflict(VBatchError):
    status_code = 409


class PayloadTooLarge(VBatchError):
    status_code = 413
    default_code = "file_too_large"


class BodyTooLarge(VBatchError):
    """A JSON request body over its cap (answered before it is buffered)."""

    status_code = 413
    default_code = "request_too_large"


class RequestTimeout(VBatchError):
    """The client stopped sending (or sends too slowly) in the middle of its request."""

    status_code = 408
    default_code = "request_timeout"


class TooManyRequests(VBatchError):
    """This project has as many uploads in flight as it may."""

    status_code = 429
    type = "rate_limit_exceeded"
    default_code = "too_many_concurrent_uploads"
    retryable = True


class ServiceBusy(VBatchError):
    """The gateway as a whole is at capacity (e.g. concurrent uploads)."""

    status_code = 503
    type = "internal_error"
    default_code = "server_busy"
    retryable = True


class Unprocessable(VBatchError):
    status_code = 422


class AuthenticationFailed(VBatchError):
    status_code = 401
    type = "authentication_error"
    default_code = "missing_credentials"


class PermissionDenied(VBatchError):
    status_code = 403
    type = "authentication_error"
    default_code = "invalid_api_key"


class StorageError(VBatchError):
    """The object store failed (unreachable, disk full, ...): a 503, never a 500."""

    status_code = 503
    type = "internal_error"
    default_code = "storage_unavailable"
    retryable = True


# --- failures of a driver's step ------------------------------------------------------

TRANSIENT = "transient"
PERMANENT = "permanent"
# HTTP answers worth another try: timeouts, conflicts, throttling, server trouble.
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})


class Transient(Exception):
    """Raised by an adapter for a failure that another try may cure (e.g. pods still up)."""


@dataclass(frozen=True)
class StepError:
    """What a failed step means for its batch: retry it (transient) or end it (permanent)."""

    kind: str  # TRANSIENT or PERMANENT
    code: str  # names the cause; the batch's errors entry and its unanswered lines carry it
    message: str

    @property
    def transient(self) -> bool:
        return self.kind == TRANSIENT


def classify(exc: BaseException) -> StepError:
    """Transient: storage unreachable, an API server's 409/429/5xx, timeouts and dropped
    connections. Permanent: the input is gone, data cannot be read, and anything
    unexpected (a bug: retrying it would fail the same way, forever)."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, VBatchError):
        if exc.status_code >= 500:
            return StepError(TRANSIENT, exc.code or "service_unavailable", exc.message)
        return StepError(PERMANENT, exc.code or "invalid_request", exc.message)
    if isinstance(exc, Transient):
        return StepError(TRANSIENT, "temporarily_unavailable", text)
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return StepError(TRANSIENT, "timeout" if isinstance(exc, TimeoutError) else "unreachable", text)
    # Duck-typed HTTP errors (the Kubernetes client's ApiException has `.status`).
    status = getattr(exc, "status", None)
    if isinstance(status, int) and 100 <= status <= 599:
        reason = getattr(exc, "reason", None) or text
        if status >= 500 or status in RETRYABLE_STATUS:
            return StepError(TRANSIENT, "api_unavailable", f"API server answered {status}: {reason}")
        return StepError(PERMANENT, "api_error", f"API server answered {status}: {reason}")
    if type(exc).__module__.startswith("urllib3."):  # connection refused, read timeouts of HTTP clients
        return StepError(TRANSIENT, "unreachable", text)
    if isinstance(exc, ValueError):  # JSON that does not parse, records that do not validate, bad bytes
        return StepError(PERMANENT, "unreadable_data", f"data could not be read: {text}")
    return StepError(PERMANENT, "internal_error", f"{type(exc).__name__}: {text}")
