"""Errors that reach users, already shaped like OpenAI's error envelope.

Every failure a client can cause is one of these; the gateway turns them into
`{"error": {"message", "type", "param", "code"}}` with the right status.
"""

from __future__ import annotations

from typing import Any


class VBatchError(Exception):
    status_code: int = 400
    type: str = "invalid_request_error"
    default_code: str | None = None

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
