"""Benchmark: warm engines shared by every batch (one `vbatch serve`, real engine).

    .venv/bin/python bench/warm.py [--small 48] [--size 4] [--max-tokens 32] [--engine vllm|echo]

- many_small_vs_one_big: the same requests as one batch of small*size and as `small`
  batches of `size` created at once; tokens/s of the small batches ÷ tokens/s of the
  big one (goal >= 0.9: how work is split must not matter).
- after_cancel_vs_before: create->completed of a 1-request batch right after another
  batch was cancelled mid-way ÷ the same before the cancel (goal <= 2: a cancel must
  not reload the model); the best of `--cancel-rounds` (cancel, then the next batch)
  against the best of three before any cancel.

Temperature 0, ignore_eos, fixed max_tokens, on one server whose worker is warmed up
first; rounds alternate the order of big and small, best of each. The client
watches its batches with one request per 0.1 s in both modes (a list for the small
ones); `many_small_polled_each_vs_one_big` is the same run with every small batch
polled 10x/s (about 480 requests/s on the gateway, which shares the cores). `--engine echo` (with a per-token
delay) smoke-tests the orchestration in seconds; the figures come from vllm.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gateway, run_batch_e2e, upload
from engine import MODEL_ID, model_dir, plain_requests, write_jsonl

TERMINAL = {"completed", "failed", "expired", "cancelled"}


def _create(client: httpx.Client, file_id: str) -> dict:
    r = client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                         "completion_window": "24h"})
    r.raise_for_status()
    return r.json()


def _wait_all(client: httpx.Client, ids: list[str], timeout: float = 1800, *, each: bool = False) -> list[dict]:
    """Poll until every batch is terminal: one list request per 0.1 s, as a dashboard
    watches its batches (and as one GET per 0.1 s watches the big batch), so both
    modes put the same request load on the gateway. `each=True` GETs every
    unfinished batch per round instead (48 batches: ~480 requests/s)."""
    deadline = time.monotonic() + timeout
    done: dict[str, dict] = {}
    wanted = set(ids)
    while len(done) < len(ids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(ids) - len(done)} batches unfinished after {timeout}s")
        if each:
            seen = [client.get(f"/v1/batches/{i}").json() for i in ids if i not in done]
        else:  # newest first: this round's batches are the newest len(ids)
            seen = client.get("/v1/batches", params={"limit": min(len(ids), 100)}).json()["data"]
            missing = wanted - done.keys() - {b["id"] for b in seen}
            seen += [client.get(f"/v1/batches/{i}").json() for i in missing]
        for batch in seen:
            if batch["id"] in wanted and batch["status"] in TERMINAL:
                done[batch["id"]] = batch
        if len(done) < len(ids):
            time.sleep(0.1)
    return [done[i] for i in ids]


def _tokens(batches: list[dict]) -> int:
    for b in batches:
        if b["status"] != "completed" or b["request_counts"]["failed"]:
            raise RuntimeError(f"batch {b['id']} {b['status']}: {b['request_counts']} {b.get('errors')}")
    return sum(b["usage"]["output_tokens"] for b in batches)


def _many_small(client: httpx.Client, small_ids: list[str], *, poll_each: bool = False) -> tuple[int, float]:
    started = time.monotonic()
    created = [_create(client, file_id)["id"] for file_id in small_ids]
    batches = _wait_all(client, created, each=poll_each)
    return _tokens(batches), time.monotonic() - started


def _one_big(client: httpx.Client, big_id: str) -> tuple[int, float]:
    batch, seconds = run_batch_e2e(client, big_id)
    return _tokens([batch]), seconds


def _cancel_one(client: httpx.Client, file_id: str) -> None:
    batch = _create(client, file_id)
    deadline = time.monotonic() + 600
    while client.get(f"/v1/batches/{batch['id']}").json()["status"] != "in_progress":
        if time.monotonic() > deadline:
            raise TimeoutError("the batch to cancel never started")
        time.sleep(0.05)
    time.sleep(2.0)  # its requests are in the engine now: the cancel must abort them
    client.post(f"/v1/batches/{batch['id']}/cancel").raise_for_status()
    (cancelled,) = _wait_all(client, [batch["id"]])
    if cancelled["status"] != "cancelled":
        raise RuntimeError(f"cancel ended as {cancelled['status']}")


def run(tmpdir: str | Path, *, small: int = 48, size: int = 4, max_tokens: int = 32, rounds: int = 3,
        engine: str = "vllm", cancel_rounds: int = 2) -> dict:
    tmp = Path(tmpdir)
    data = tmp / "data"
    data.mkdir(parents=True, exist_ok=True)
    env: dict[str, str] = {}
    if engine == "vllm":
        catalog = data / "catalog.json"
        catalog.write_text(json.dumps({"models": [{"id": MODEL_ID, "path": str(model_dir())}]}))
        env["VBATCH_MODEL_CATALOG"] = str(catalog)
    else:  # the orchestration smoke test: a slow echo engine
        env.update(VBATCH_ECHO_DELAY_PER_TOKEN="0.005", VBATCH_ECHO_MAX_IN_FLIGHT="64")
    requests = plain_requests(small * size, max_tokens)
    big_path = write_jsonl(tmp / "big.jsonl", requests)
    small_paths = [write_jsonl(tmp / f"small-{i}.jsonl", requests[i * size:(i + 1) * size]) for i in range(small)]
    one_path = write_jsonl(tmp / "one.jsonl", requests[:1])
    # Long enough to be cancelled mid-way: many requests, long answers.
    long_requests = plain_requests(256, 256)
    if engine == "echo":  # echo answers with the prompt: make the prompt long instead
        for line in long_requests:
            line["body"]["messages"][0]["content"] = " ".join(["word"] * 256)
    long_path = write_jsonl(tmp / "long.jsonl", long_requests)

    with gateway(data, engine=engine, env=env) as gw, gw.client() as client:
        big_id = upload(client, big_path)["id"]
        small_ids = [upload(client, p)["id"] for p in small_paths]
        one_id, long_id = upload(client, one_path)["id"], upload(client, long_path)["id"]
        _one_big(client, one_id)  # untimed warm-up: the worker loads the engine once

        best = {"big": float("inf"), "small": float("inf")}
        tokens = {}
        for r in range(rounds):
            for mode in ("big", "small") if r % 2 == 0 else ("small", "big"):
                tok, seconds = _one_big(client, big_id) if mode == "big" else _many_small(client, small_ids)
                tokens[mode] = tok
                best[mode] = min(best[mode], seconds)
                print(f"  warm round {r}: {mode} {seconds:.2f}s ({tok} tokens)", file=sys.stderr, flush=True)
        # What a client polling every batch 10x/s costs here (the gateway shares the
        # engine's two cores); reported, not the figure with the goal.
        _, polled_each = _many_small(client, small_ids, poll_each=True)
        print(f"  warm: small, each batch polled: {polled_each:.2f}s", file=sys.stderr, flush=True)

        # Best of each, like the rounds above: one sample against the best of three
        # would read the machine's noise as a cost of the cancel.
        # Each "after" is the first batch after a fresh cancel; "before" precedes every cancel.
        before = min(run_batch_e2e(client, one_id)[1] for _ in range(3))
        afters = []
        for _ in range(max(1, cancel_rounds)):
            _cancel_one(client, long_id)
            afters.append(run_batch_e2e(client, one_id)[1])
        after = min(afters)
        log = gw.log_text()

    big_tok_s, small_tok_s = tokens["big"] / best["big"], tokens["small"] / best["small"]
    return {
        "engine": engine, "requests": small * size, "small_batches": small, "small_batch_size": size,
        "max_tokens": max_tokens,
        "one_big_s": round(best["big"], 2), "one_big_tok_s": round(big_tok_s, 1),
        "many_small_s": round(best["small"], 2), "many_small_tok_s": round(small_tok_s, 1),
        "many_small_vs_one_big": round(small_tok_s / big_tok_s, 3),
        "many_small_polled_each_s": round(polled_each, 2),
        "many_small_polled_each_vs_one_big": round(best["big"] / polled_each, 3),
        "rounds": rounds,
        "one_request_before_cancel_s": round(before, 2), "one_request_after_cancel_s": round(after, 2),
        "one_request_after_each_cancel_s": [round(a, 2) for a in afters],
        "after_cancel_vs_before": round(after / before, 3),
        # Each worker process logs this once, after loading its engine.
        "engine_loads": log.count("loaded (model"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", type=int, default=48)
    p.add_argument("--size", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--engine", choices=["vllm", "echo"], default="vllm")
    p.add_argument("--cancel-rounds", type=int, default=2, help="cancel, then time one 1-request batch; best of")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="vbatch-bench-warm-") as tmp:
        print(json.dumps(run(tmp, small=args.small, size=args.size, max_tokens=args.max_tokens,
                             rounds=args.rounds, engine=args.engine, cancel_rounds=args.cancel_rounds), indent=2))


if __name__ == "__main__":
    main()
