"""What a shard run needs around its loop: store calls that ride out storage hiccups,
and the request order that keeps vLLM's prefix cache warm."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from vbatch.core.errors import StorageError
from vbatch.core.storage.base import ObjectNotFound

log = logging.getLogger("vbatch.worker.shard")

T = TypeVar("T")

# Storage hiccups (a MinIO restart, a full disk being cleaned) should not cost a
# shard's in-memory results: retry with backoff before giving up (~6 s in total).
STORAGE_ATTEMPTS = 5
STORAGE_BACKOFF = 0.2


async def _storage(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking store call in a thread, retrying transient failures."""
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            return await asyncio.to_thread(fn, *args)
        except ObjectNotFound:
            raise
        except (StorageError, OSError) as exc:
            if attempt == STORAGE_ATTEMPTS - 1:
                raise StorageError(f"object storage failed after {STORAGE_ATTEMPTS} attempts: {exc}") from exc
            log.warning("storage call failed (%s), retrying", exc)
            await asyncio.sleep(STORAGE_BACKOFF * 2**attempt)
    raise AssertionError("unreachable")


def prefix_key(body: Any) -> bytes:
    """Sort key grouping requests that share leading messages (vLLM's prefix cache
    reuses their KV blocks when they run close together). Lexicographic order of the
    JSON also puts prompts with a common beginning next to each other."""
    if not isinstance(body, dict):
        return b""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return b""
    try:
        return orjson.dumps([body.get("model"), messages[:-1]])
    except TypeError:
        return b""
