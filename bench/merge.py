"""Benchmark: result merging against raw concatenation of the same part files.

    .venv/bin/python bench/merge.py [--size-mb 200] [--lines 50000] [--shards 4]

Writes, on a local object store, a batch of `shards` shards whose result parts
(64 results per part, as the worker writes them) total ~size_mb, then times in the
same run, alternating: (a) reading every part file and writing it to one temporary
file (raw concatenation, what a merge could at best cost), and (b)
`core.merge.merge_shards` over the same store (reads the shard inputs for the
custom_ids, parses every result, keeps the first per custom_id, writes output and
error files). Ratio = (a) time / (b) time (1.0 = merging costs no more than copying).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MB
from vbatch.core import layout
from vbatch.core.merge import merge_shards
from vbatch.core.storage.local import LocalObjectStore

PROJECT, BATCH = "bench", "batch_01BENCHMERGE0000000000000"
PART_RESULTS = 64
WORDS = "the quick brown fox jumps over the lazy dog while batch inference hums along "


def result_line(i: int, content: str) -> bytes:
    return orjson.dumps({
        "id": f"batch_req_{i:026d}", "custom_id": f"request-{i:06d}",
        "response": {"status_code": 200, "request_id": f"req_{i:026d}", "body": {
            "id": f"chatcmpl-{i:024d}", "object": "chat.completion", "created": 1_700_000_000,
            "model": "smollm2-135m-instruct",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "length", "logprobs": None}],
            "usage": {"prompt_tokens": 31, "completion_tokens": 64, "total_tokens": 95},
        }},
        "error": None,
    }) + b"\n"


def write_batch(store: LocalObjectStore, size_mb: float, lines: int, shards: int) -> int:
    """Shard inputs + result parts; returns the total bytes of the parts."""
    overhead = len(result_line(0, ""))
    pad = max(0, int(size_mb * MB / lines) - overhead)
    content = (WORDS * (pad // len(WORDS) + 1))[:pad]
    total = 0
    for shard in range(shards):
        ids = range(shard, lines, shards)
        store.put_bytes(layout.shard_key(PROJECT, BATCH, shard), b"".join(
            orjson.dumps({"custom_id": f"request-{i:06d}", "method": "POST", "url": "/v1/chat/completions",
                          "body": {"model": "m", "messages": []}}) + b"\n" for i in ids))
        ids = list(ids)
        for part, start in enumerate(range(0, len(ids), PART_RESULTS)):
            data = b"".join(result_line(i, content) for i in ids[start:start + PART_RESULTS])
            store.put_bytes(layout.part_key(PROJECT, BATCH, shard, part), data)
            total += len(data)
    return total


def _concat(store: LocalObjectStore, shards: int) -> None:
    with tempfile.TemporaryFile() as out:
        for shard in range(shards):
            for key in store.list(layout.results_prefix(PROJECT, BATCH, shard)):
                with open(store._path(key), "rb") as part:
                    shutil.copyfileobj(part, out, MB)


def _merge(store: LocalObjectStore, shards: int) -> None:
    merged = merge_shards(store, PROJECT, BATCH, shards)
    try:
        assert merged.counts.failed == 0
    finally:
        merged.close()


def run(tmpdir: str | Path, size_mb: float = 200, lines: int = 50_000, shards: int = 4, rounds: int = 3) -> dict:
    store = LocalObjectStore(Path(tmpdir) / "merge-store")
    size = write_batch(store, size_mb, lines, shards)
    try:
        _concat(store, shards)  # warm the page cache for both
        best = {"concat": float("inf"), "merge": float("inf")}
        for _ in range(rounds):
            for name, fn in (("concat", _concat), ("merge", _merge)):
                t0 = time.perf_counter()
                fn(store, shards)
                best[name] = min(best[name], time.perf_counter() - t0)
    finally:
        shutil.rmtree(store.root, ignore_errors=True)
    mb = size / MB
    return {
        "parts_mb": round(mb, 1), "lines": lines, "shards": shards,
        "concat_mb_s": round(mb / best["concat"], 1), "merge_mb_s": round(mb / best["merge"], 1),
        "merge_lines_s": round(lines / best["merge"]),
        "merge_vs_concat": round(best["concat"] / best["merge"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=200)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        r = run(tmp, args.size_mb, args.lines, args.shards, args.rounds)
    print(f"parts:  {r['parts_mb']} MB, {r['lines']} results in {r['shards']} shards")
    print(f"concat: {r['concat_mb_s']} MB/s   merge: {r['merge_mb_s']} MB/s ({r['merge_lines_s']} results/s)")
    print(f"ratio:  merge = {r['merge_vs_concat']}x of raw concatenation")


if __name__ == "__main__":
    main()
