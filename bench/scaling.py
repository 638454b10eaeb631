"""Benchmark: shard-scaling efficiency of single-node vbatch, S = 1..8 shards.

    .venv/bin/python bench/scaling.py [--n 2048] [--delay 0.03] [--max-shards 8]

A real `vbatch serve --engine echo --slots S` subprocess per S: the LocalExecutor
runs S long-lived worker subprocesses, and the batch is split into exactly S shards
(VBATCH_SHARD_TARGET_REQUESTS = ceil(N/S)). The echo TEST engine sleeps
`delay_per_token` per generated token (VBATCH_ECHO_DELAY_PER_TOKEN) with 64
requests in flight per worker: a time-based engine, so what is measured is the
orchestration (validation, sharding, workers, parts, progress, merge) and its
parallelism, not CPU speed. On each gateway a first batch starts the workers; the
second, identical batch (create -> completed) is the one timed.

efficiency(S) = throughput(S) / (S x throughput(1)) = t(1) / (S x t(S)); strong
scaling: the same N requests whatever S. S=1 is measured first and again last (the
better time is the baseline), so a disturbance of the shared machine shows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gateway, run_batch_e2e, upload

WORDS = 16
IN_FLIGHT = 64  # the worker's default --echo-max-in-flight


def write_input(path: Path, n: int) -> Path:
    text = " ".join(["word"] * WORDS)
    path.write_bytes(b"".join(json.dumps({
        "custom_id": f"s-{i:06d}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "echo-model", "messages": [{"role": "user", "content": text}], "max_tokens": WORDS},
    }).encode() + b"\n" for i in range(n)))
    return path


def measure(tmp: Path, input_path: Path, n: int, shards: int, delay: float, tag: str) -> dict:
    env = {"VBATCH_ECHO_DELAY_PER_TOKEN": str(delay), "VBATCH_SHARD_TARGET_REQUESTS": str(math.ceil(n / shards)),
           "VBATCH_MAX_SHARDS": str(shards)}
    with gateway(tmp / f"data-{tag}", engine="echo", env=env, slots=shards) as gw, gw.client() as client:
        file_id = upload(client, input_path)["id"]
        cold, cold_s = run_batch_e2e(client, file_id, poll=0.05)
        warm, warm_s = run_batch_e2e(client, file_id, poll=0.05)
    for b in (cold, warm):
        if b["status"] != "completed" or b["request_counts"]["completed"] != n:
            raise RuntimeError(f"S={shards}: batch {b['status']} {b['request_counts']}")
    return {"shards": shards, "seconds": warm_s, "cold_seconds": cold_s}


def run(tmpdir: str | Path, n: int = 2048, delay: float = 0.03, max_shards: int = 8) -> dict:
    tmp = Path(tmpdir)
    input_path = write_input(tmp / "scaling-input.jsonl", n)
    ideal_1 = math.ceil(n / IN_FLIGHT) * WORDS * delay  # engine time alone, one worker
    first = measure(tmp, input_path, n, 1, delay, "1a")
    times = {1: first["seconds"]}
    cold = {1: first["cold_seconds"]}
    for s in range(2, max_shards + 1):
        m = measure(tmp, input_path, n, s, delay, str(s))
        times[s], cold[s] = m["seconds"], m["cold_seconds"]
        print(f"  S={s}: {m['seconds']:.2f}s (cold {m['cold_seconds']:.2f}s)", file=sys.stderr, flush=True)
    last = measure(tmp, input_path, n, 1, delay, "1b")
    t1 = min(first["seconds"], last["seconds"])
    curve = {s: round(t1 / (s * t), 3) for s, t in times.items()}
    curve[1] = 1.0
    # The echo engine's requests all take the same time, so a worker runs them in
    # waves of IN_FLIGHT: even free orchestration cannot beat this bound.
    waves = lambda s: math.ceil(math.ceil(n / s) / IN_FLIGHT)
    bound = {s: round(waves(1) / (s * waves(s)), 3) for s in times}
    return {
        "requests": n, "delay_per_token": delay, "tokens_per_request": WORDS,
        "engine_only_s1": round(ideal_1, 2),
        "s1_seconds": [round(first["seconds"], 2), round(last["seconds"], 2)],
        "seconds": {s: round(t, 2) for s, t in times.items()},
        "cold_seconds": {s: round(t, 2) for s, t in cold.items()},
        "throughput_rps": {s: round(n / (t1 if s == 1 else t), 1) for s, t in times.items()},
        "efficiency": curve,
        "wave_bound": bound,
        "shard_scaling_efficiency_s8": curve.get(8),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--delay", type=float, default=0.03, help="echo seconds per token")
    parser.add_argument("--max-shards", type=int, default=8)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        r = run(tmp, args.n, args.delay, args.max_shards)
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
