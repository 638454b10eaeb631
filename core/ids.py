"""Identifiers: `file-…`, `batch_<ULID>`, `batch_req_…`, `req_…`.

A batch has one id and two spellings: the API id `batch_01HZX…` and the
Kubernetes object name `batch-01hzx…` (names must be lowercase DNS labels;
ULIDs are case-insensitive, so the mapping is lossless).
"""

from __future__ import annotations

import re
import secrets

from ulid import ULID

_BATCH_ID = re.compile(r"^batch_[0-9A-HJKMNP-TV-Z]{26}$")
_BATCH_NAME = re.compile(r"^batch-[0-9a-hjkmnp-tv-z]{26}$")
_FILE_ID = re.compile(r"^file-[0-9a-zA-Z]{24}$")


def new_batch_id() -> str:
    return f"batch_{ULID()}"


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def new_batch_request_id() -> str:
    return f"batch_req_{secrets.token_hex(12)}"


def new_request_id() -> str:
    return f"req_{secrets.token_hex(12)}"


def is_batch_id(value: str) -> bool:
    return bool(_BATCH_ID.match(value))


def is_file_id(value: str) -> bool:
    return bool(_FILE_ID.match(value))


def batch_object_name(batch_id: str) -> str:
    """`batch_01HZX…` -> `batch-01hzx…` (the custom resource's metadata.name)."""
    if not is_batch_id(batch_id):
        raise ValueError(f"not a batch id: {batch_id!r}")
    return "batch-" + batch_id[len("batch_") :].lower()


def batch_id_from_object_name(name: str) -> str:
    """`batch-01hzx…` -> `batch_01HZX…`."""
    if not _BATCH_NAME.match(name):
        raise ValueError(f"not a batch object name: {name!r}")
    return "batch_" + name[len("batch-") :].upper()
