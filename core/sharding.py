"""Shard planning: split a validated input into shards balanced by estimated tokens.

One streaming pass: each request goes to the shard with the least estimated work
so far (greedy least-loaded), written to a local temporary file per shard, then
each shard is uploaded whole. Memory holds one line and S running totals.
"""

from __future__ import annotations

import heapq
import math
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
from vbatch.core.layout import shard_key
from vbatch.core.storage.base import ObjectStore, iter_lines

# What a request without max_tokens is assumed to generate, for balancing only.
DEFAULT_COMPLETION_ESTIMATE = 256
CHARS_PER_TOKEN = 4


def _text_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        # Validation checks the envelope, not the chat schema: any JSON may be here.
        return sum(len(part["text"]) for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
    return 0


def estimate_tokens(body: dict[str, Any]) -> int:
    """Rough prompt + completion tokens of one chat request (for balancing, not billing).
    Never raises: a malformed body gets its error line from the engine, not a stuck launch."""
    if not isinstance(body, dict):
        body = {}
    messages = body.get("messages")
    if not isinstance(messages, list):
        messages = []
    chars = sum(_text_chars(m.get("content")) for m in messages if isinstance(m, dict))
    prompt = chars // CHARS_PER_TOKEN + 4 * len(messages)
    completion = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_COMPLETION_ESTIMATE
    choices = body.get("n") or 1
    try:
        return prompt + int(completion) * int(choices)
    except (TypeError, ValueError):
        return prompt + DEFAULT_COMPLETION_ESTIMATE


def shard_count_for(total: int, *, target_requests: int, max_shards: int, requested: int | None = None) -> int:
    """How many shards: what was asked for, else one per target_requests, within 1..max_shards."""
    wanted = requested if requested else math.ceil(total / max(1, target_requests))
    return max(1, min(wanted, max_shards, max(total, 1)))


def normalized_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Request lines of an input file: BOM, CR and blank lines removed (as validated)."""
    first = True
    for line in iter_lines(chunks):
        if first:
            first = False
            if line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
        line = line.rstrip(b"\r")
        if line.strip():
            yield line


def write_shards(store: ObjectStore, project: str, batch_id: str, lines: Iterable[bytes], shard_count: int) -> list[int]:
    """Distribute request lines over shard objects; returns estimated tokens per shard."""
    loads = [(0, n) for n in range(shard_count)]
    estimated = [0] * shard_count
    spools = [tempfile.TemporaryFile() for _ in range(shard_count)]
    try:
        for line in lines:
            load, n = heapq.heappop(loads)
            cost = estimate_tokens(orjson.loads(line).get("body") or {})
            spools[n].write(line + b"\n")
            estimated[n] += cost
            heapq.heappush(loads, (load + cost, n))
        for n, spool in enumerate(spools):
            spool.seek(0)
            store.put_stream(shard_key(project, batch_id, n), iter(lambda s=spool: s.read(1 << 20), b""))
    finally:
        for spool in spools:
            spool.close()
    return estimated
