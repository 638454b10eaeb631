"""Errors that reach users, already shaped like OpenAI's error envelope.

Every failure a client can cause is one of these; the gateway turns them into
`{"error": {"message", "type", "param", "code"}}` with the right status.
"""

from __future__ import annotations

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
