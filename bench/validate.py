"""Benchmark: JSONL validation throughput against a bare orjson parse of the same file.

    .venv/bin/python bench/validate.py [--size-mb 200] [--dir /tmp]

Writes a ~size_mb file of 50,000 requests (each line padded to ~4 KB at the
default size), then times, in the same run, (a) `for line in file: orjson.loads(line)`
and (b) `validate_jsonl` over 1 MiB chunks of the same file. Goal: (b) >= 0.7x (a).
Also shown: (b) against orjson over lines already split in memory (a ceiling
no streaming reader reaches: it skips reading and splitting).
Peak memory of validation is measured separately with tracemalloc (which slows
allocation, so it is not timed).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import orjson

from vbatch.core.config import MB, Limits
from vbatch.core.schemas import CHAT_COMPLETIONS
from vbatch.core.validation import validate_jsonl

MODEL = "smollm2-135m"
LINES = 50_000
WORDS = b"the quick brown fox jumps over the lazy dog while batch inference hums along "


def write_input(path: Path, size_mb: float, lines: int = LINES) -> int:
    line_target = int(size_mb * MB / lines)
    head = (
        b'{"custom_id":"request-%06d","method":"POST","url":"' + CHAT_COMPLETIONS.encode() + b'",'
        b'"body":{"model":"' + MODEL.encode() + b'","max_tokens":64,"messages":['
        b'{"role":"system","content":"You are terse."},{"role":"user","content":"'
    )
    tail = b'"}]}}\n'
    pad_len = max(0, line_target - len(head % 0) - len(tail))
    pad = (WORDS * (pad_len // len(WORDS) + 1))[:pad_len]
    with open(path, "wb") as out:
        for i in range(lines):
            out.write(head % i + pad + tail)
    return path.stat().st_size


def read_chunks(path: Path, chunk_size: int = MB) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            yield chunk


def _orjson_loop(path: Path) -> None:
    loads = orjson.loads
    with open(path, "rb") as f:
        for line in f:
            loads(line)


def _validate(path: Path):
    return validate_jsonl(read_chunks(path), endpoint=CHAT_COMPLETIONS, served_models=(MODEL,), limits=Limits())


def _in_memory_loop(lines: list[bytes]) -> None:
    loads = orjson.loads
    for line in lines:
        loads(line)


def _best_times(path: Path, rounds: int) -> tuple[float, float, float]:
    """Best CPU time of each contender. CPU time, alternating the contenders, so
    that other processes on a shared machine hit all of them alike."""
    lines = path.read_bytes().splitlines()
    best = [float("inf")] * 3
    for _ in range(rounds):
        for i, (fn, arg) in enumerate([(_orjson_loop, path), (_validate, path), (_in_memory_loop, lines)]):
            start = time.process_time()
            fn(arg)
            best[i] = min(best[i], time.process_time() - start)
    return best[0], best[1], best[2]


def run(tmpdir: str | Path, size_mb: float = 200, rounds: int = 5) -> dict:
    path = Path(tmpdir) / "bench-input.jsonl"
    size = write_input(path, size_mb)
    try:
        report = _validate(path)
        assert report.ok and report.total == LINES, report.problems
        _orjson_loop(path)  # warm the page cache for both contenders
        orjson_s, validate_s, in_memory_s = _best_times(path, rounds)
        tracemalloc.start()
        try:
            _validate(path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        path.unlink(missing_ok=True)
    mb = size / MB
    return {
        "file_mb": round(mb, 1),
        "lines": LINES,
        "orjson_mb_s": round(mb / orjson_s, 1),
        "validation_mb_s": round(mb / validate_s, 1),
        "validation_vs_orjson": round(orjson_s / validate_s, 3),
        # Stricter: orjson over lines already split in memory (no I/O, no splitting).
        "in_memory_orjson_mb_s": round(mb / in_memory_s, 1),
        "validation_vs_in_memory_orjson": round(in_memory_s / validate_s, 3),
        "validation_peak_mb": round(peak / MB, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=200)
    parser.add_argument("--dir", default=None, help="where to write the temporary input")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        result = run(tmp, args.size_mb, args.rounds)
    print(f"input:      {result['file_mb']} MB, {result['lines']} lines")
    print(f"orjson:     {result['orjson_mb_s']} MB/s (bare loads per line)")
    print(f"validation: {result['validation_mb_s']} MB/s")
    verdict = "ok" if result["validation_vs_orjson"] >= 0.7 else "BELOW GOAL"
    print(f"ratio:      {result['validation_vs_orjson']}x of orjson (goal >= 0.7x: {verdict})")
    print(
        f"strict:     {result['in_memory_orjson_mb_s']} MB/s orjson over lines pre-split in memory;"
        f" validation = {result['validation_vs_in_memory_orjson']}x of that"
    )
    print(f"peak mem:   {result['validation_peak_mb']} MB (tracemalloc, validation only)")


if __name__ == "__main__":
    main()
