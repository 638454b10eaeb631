"""Benchmark: vbatch end to end on the real engine (vLLM CPU, SmolLM2-135M) against
vLLM's own offline `LLM.chat` and `vllm run-batch`, on the same N requests.

    .venv/bin/python bench/engine.py [--n 256] [--max-tokens 32] [--rounds 2] [--no-prefix]

All contenders get the same chat requests (fixed max_tokens, ignore_eos, temperature
0) and the same engine settings (enforce_eager, max_model_len 2048, vLLM's default
max_num_seqs). Per round, run one after another so they see the same machine:
  (c) vbatch: a fresh `vbatch serve --engine vllm` (catalog -> the prepared model);
      a cold batch (the worker starts and loads the model: compared with run-batch,
      wall-clock from create to completed) and then a warm batch on the same
      server (the worker keeps its engine: compared with LLM.chat).
  (a) `LLM.chat` in a long-lived child (model loaded once, warmed up).
  (b) `python -m vllm.entrypoints.launchers.run_batch -i -o` as a subprocess, timed
      from spawn to exit (the 0.32 home; `vllm.entrypoints.openai.run_batch` is a
      deprecated wrapper around it).
Best of the rounds is kept for each.

Then the prefix workload: requests sharing a few long system prompts, interleaved in
the file, run through VllmEngine + run_shard with vbatch's prefix-aware window
ordering vs the same shard with window_lines=1 (file order, no reordering).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PYTHON, VLLM_ENV, gateway, run_batch_e2e, upload

MODEL_ID = "smollm2-135m-instruct"
MAX_MODEL_LEN = 2048
RESULT = "BENCHRESULT "
TOPICS = ["a robot", "the sea", "a lighthouse", "a library", "winter", "a city at night", "a cat", "trains"]
FILLER = ("Follow the house style guide. Answers must be precise, polite and short. Cite no sources. "
          "Prefer plain words over jargon and active voice over passive voice. ")


def model_dir() -> Path:
    from vbatch.worker.models import prepare_demo_model

    cache = Path(os.environ.get("VBATCH_TEST_MODEL_DIR", Path.home() / ".cache" / "vbatch-test-models"))
    return prepare_demo_model(cache)


def body(messages: list[dict], max_tokens: int) -> dict:
    return {"model": MODEL_ID, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


def plain_requests(n: int, max_tokens: int) -> list[dict]:
    return [{"custom_id": f"r-{i:05d}", "method": "POST", "url": "/v1/chat/completions",
             "body": body([{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]}, "
                                                       f"number {i}."}], max_tokens)} for i in range(n)]


def prefix_requests(n: int, groups: int, prompt_words: int, max_tokens: int, nonce: str) -> list[dict]:
    """`groups` long system prompts (unique to this nonce, so no run reuses another's
    cached prefix), assigned round-robin: file order interleaves the groups."""
    words = FILLER.split()
    systems = [f"[{nonce}/{g}] You are assistant {g}. " + " ".join(words[j % len(words)] for j in range(prompt_words))
               for g in range(groups)]
    return [{"custom_id": f"p-{i:05d}", "method": "POST", "url": "/v1/chat/completions",
             "body": body([{"role": "system", "content": systems[i % groups]},
                           {"role": "user", "content": f"Question {i}: name one colour."}], max_tokens)}
            for i in range(n)]


def write_jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_bytes(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
    return path


def engine_args(mdir: Path) -> list[str]:
    return ["--model", str(mdir), "--served-model-name", MODEL_ID, "--enforce-eager",
            "--max-model-len", str(MAX_MODEL_LEN), "--disable-log-stats"]


# --- (a) LLM.chat child ------------------------------------------------------------

def child_llm(input_path: str, mdir: str) -> None:
    """Load LLM once; on each stdin line, run LLM.chat over the input and print the timing."""
    from vllm import LLM, SamplingParams

    requests = [json.loads(x) for x in Path(input_path).read_text().splitlines()]
    started = time.monotonic()
    llm = LLM(model=mdir, served_model_name=MODEL_ID, enforce_eager=True, max_model_len=MAX_MODEL_LEN,
              disable_log_stats=True)
    load_s = time.monotonic() - started
    conversations = [r["body"]["messages"] for r in requests]
    params = SamplingParams(max_tokens=requests[0]["body"]["max_tokens"], temperature=0, ignore_eos=True)
    llm.chat(conversations[:4], params, use_tqdm=False)  # warm-up
    print(RESULT + json.dumps({"load_s": load_s}), flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        t0 = time.monotonic()
        outputs = llm.chat(conversations, params, use_tqdm=False)
        seconds = time.monotonic() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        print(RESULT + json.dumps({"seconds": seconds, "output_tokens": tokens}), flush=True)


class LlmChild:
    def __init__(self, input_path: Path, mdir: Path, log_path: Path) -> None:
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([PYTHON, __file__, "--child", "llm", "--input", str(input_path), "--model-dir", str(mdir)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     env={**os.environ, **VLLM_ENV}, text=True)
        self.load_s = self._result()["load_s"]

    def _result(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT):])
        raise RuntimeError(f"LLM.chat child exited ({self.proc.wait()}); see {self.log.name}")

    def run(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self._result()

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# --- (b) run-batch subprocess --------------------------------------------------------

def run_batch_subprocess(input_path: Path, mdir: Path, tmp: Path, log_path: Path) -> dict:
    out = tmp / "run_batch_out.jsonl"
    out.unlink(missing_ok=True)
    command = [PYTHON, "-m", "vllm.entrypoints.launchers.run_batch", "-i", str(input_path), "-o", str(out), *engine_args(mdir)]
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **VLLM_ENV}, check=True, timeout=1800)
    seconds = time.monotonic() - t0
    tokens = sum(json.loads(x)["response"]["body"]["usage"]["completion_tokens"] for x in out.read_text().splitlines() if x.strip())
    return {"seconds": seconds, "output_tokens": tokens}


# --- (c) vbatch end to end ------------------------------------------------------------

def offline_batch_defaults() -> dict:
    """vLLM's scheduler defaults for the offline LLM class on this platform. The batch
    runner's usage context (what run-batch and VllmEngine use) has no entry in vLLM's
    table and falls back to the generic, smaller ones (on CPU: 128 seqs / 2048 tokens
    instead of 256 / 4096)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    tokens, seqs = AsyncEngineArgs.get_batch_defaults(1)
    return {"max_num_seqs": seqs[UsageContext.LLM_CLASS],
            "engine_args": {"max_num_batched_tokens": tokens[UsageContext.LLM_CLASS]}}


def vbatch_round(input_path: Path, mdir: Path, tmp: Path, round_no: int, spec_extra: dict | None = None) -> dict:
    data = tmp / f"vbatch-data-{round_no}"
    data.mkdir(parents=True, exist_ok=True)
    catalog = data / "catalog.json"
    catalog.write_text(json.dumps({"models": [{"id": MODEL_ID, "path": str(mdir), **(spec_extra or {})}]}))
    with gateway(data, engine="vllm", env={"VBATCH_MODEL_CATALOG": str(catalog)}) as gw, gw.client() as client:
        file_id = upload(client, input_path)["id"]
        cold, cold_s = run_batch_e2e(client, file_id)
        warm, warm_s = run_batch_e2e(client, file_id)
        log = gw.log_text()
    for b in (cold, warm):
        if b["status"] != "completed" or b["request_counts"]["failed"]:
            raise RuntimeError(f"vbatch batch {b['status']}: {b['request_counts']} {b.get('errors')}\n{log[-3000:]}")
    import re

    ready = re.findall(r"vLLM engine for \S+ ready in ([\d.]+)s", log)
    seqs = re.findall(r"ready in [\d.]+s \(max_num_seqs=(\d+)\)", log)
    return {"cold_seconds": cold_s, "warm_seconds": warm_s, "output_tokens": warm["usage"]["output_tokens"],
            "cold_output_tokens": cold["usage"]["output_tokens"],
            "engine_start_s": float(ready[0]) if ready else None, "max_num_seqs": int(seqs[0]) if seqs else None}


# --- prefix ordering -------------------------------------------------------------------

# name -> (requests, distinct system prompts, words per system prompt). SmolLM2-135M's
# KV cache here is 1 GiB ~ 46k tokens (30 layers x 3 KV heads x 64 x 2 x bf16 = 23 KB/token).
PREFIX_WORKLOADS = {
    # The brief's case: one long system prompt shared by every request.
    "one_system_prompt": (256, 1, 400),
    # 64 distinct ~850-token prompts (~54k tokens, more than the KV cache) interleaved
    # in the file: in file order the cache cycles through them (LRU evicts each prompt
    # before its group comes back); ordered, each is computed about once.
    "64_system_prompts": (256, 64, 700),
}


async def _prefix_runs(mdir: Path, workloads: dict, max_tokens: int, rounds: int, tmp: Path) -> dict:
    from vbatch.core import layout
    from vbatch.core.storage.local import LocalObjectStore
    from vbatch.core.catalog import ModelSpec
    from vbatch.worker.engines.vllm import VllmEngine
    from vbatch.worker.shard import run_shard

    store = LocalObjectStore(tmp / "prefix-store")
    engine = VllmEngine(ModelSpec(id=MODEL_ID, path=str(mdir)))
    await engine.start()
    out = {}
    try:
        # Untimed warm-up: on CPU the first long prefills after start pay one-off kernel
        # setup, which would otherwise land on whichever mode runs first.
        store.put_bytes(layout.shard_key("bench", "batch_prefix_warmup", 0), b"".join(
            json.dumps(x).encode() + b"\n" for x in prefix_requests(32, 4, 700, max_tokens, nonce="warmup")))
        await run_shard(store, engine, project="bench", batch_id="batch_prefix_warmup", shard=0)
        store.delete_prefix(layout.batch_prefix("bench", "batch_prefix_warmup"))
        for name, (n, groups, words) in workloads.items():
            best = {"ordered": float("inf"), "file_order": float("inf")}
            prompt_tokens = 0
            for r in range(rounds):
                for mode in ("ordered", "file_order") if r % 2 == 0 else ("file_order", "ordered"):
                    # A fresh nonce per run: no run finds another run's prompts cached.
                    lines = prefix_requests(n, groups, words, max_tokens, nonce=f"{name}-{r}-{mode}")
                    batch_id = f"batch_prefix_{r}_{mode}"
                    store.put_bytes(layout.shard_key("bench", batch_id, 0), b"".join(json.dumps(x).encode() + b"\n" for x in lines))
                    t0 = time.monotonic()
                    progress = await run_shard(store, engine, project="bench", batch_id=batch_id, shard=0,
                                               window_lines=None if mode == "ordered" else 1)
                    seconds = time.monotonic() - t0
                    assert progress.finished and progress.failed == 0, progress
                    best[mode] = min(best[mode], seconds)
                    prompt_tokens = progress.usage.input_tokens
                    store.delete_prefix(layout.batch_prefix("bench", batch_id))
                print(f"  prefix {name} round {r}: ordered {best['ordered']:.1f}s, file order {best['file_order']:.1f}s",
                      file=sys.stderr, flush=True)
            out[name] = {"requests": n, "system_prompts": groups, "prompt_tokens": prompt_tokens,
                         "ordered_s": round(best["ordered"], 2), "file_order_s": round(best["file_order"], 2),
                         "speedup": round(best["file_order"] / best["ordered"], 3)}
    finally:
        await engine.close()
    return out


def child_prefix(args: argparse.Namespace) -> None:
    if args.workloads:
        workloads = {k: tuple(v) for k, v in json.loads(args.workloads).items()}
        result = asyncio.run(_prefix_runs(Path(args.model_dir), workloads, args.max_tokens, args.rounds, Path(args.tmp)))
    else:  # one workload given by --n/--groups/--prompt-words (the flat result of earlier versions)
        one = asyncio.run(_prefix_runs(Path(args.model_dir), {"w": (args.n, args.groups, args.prompt_words)},
                                       args.max_tokens, args.rounds, Path(args.tmp)))["w"]
        result = {"prefix_ordered_s": one["ordered_s"], "prefix_file_order_s": one["file_order_s"],
                  "prefix_ordering_speedup": one["speedup"], "prefix_requests": one["requests"],
                  "prefix_groups": one["system_prompts"], "prefix_total_tokens": one["prompt_tokens"]}
    print(RESULT + json.dumps(result), flush=True)


def prefix_subprocess(mdir: Path, tmp: Path, *, n: int, groups: int, prompt_words: int, max_tokens: int, rounds: int) -> dict:
    command = [PYTHON, __file__, "--child", "prefix", "--model-dir", str(mdir), "--tmp", str(tmp), "--n", str(n),
               "--groups", str(groups), "--prompt-words", str(prompt_words), "--max-tokens", str(max_tokens),
               "--rounds", str(rounds)]
    return _run_child(command, tmp)


def _run_child(command: list[str], tmp: Path) -> dict:
    with open(tmp / "prefix.log", "ab") as log:
        out = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, env={**os.environ, **VLLM_ENV},
                             text=True, timeout=1800, check=True).stdout
    for line in out.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    raise RuntimeError("prefix child printed no result")


def run_prefix(tmpdir: str | Path, workloads: dict | None = None, max_tokens: int = 4, rounds: int = 1) -> dict:
    """vbatch's prefix-aware window ordering vs file order (window_lines=1), per workload."""
    tmp = Path(tmpdir)
    command = [PYTHON, __file__, "--child", "prefix", "--model-dir", str(model_dir()), "--tmp", str(tmp),
               "--workloads", json.dumps(workloads or PREFIX_WORKLOADS), "--max-tokens", str(max_tokens),
               "--rounds", str(rounds)]
    return _run_child(command, tmp)


# --- the whole benchmark ------------------------------------------------------------------

def run(tmpdir: str | Path, n: int = 256, max_tokens: int = 32, rounds: int = 2, prefix: bool = False,
        prefix_n: int = 256, prefix_groups: int = 8, prefix_words: int = 400, offline_defaults: bool = False) -> dict:
    """offline_defaults: give vbatch's catalog entry the LLM class's scheduler sizes
    (what the fix proposed in docs/benchmarks.md would do by default)."""
    tmp = Path(tmpdir)
    mdir = model_dir()
    input_path = write_jsonl(tmp / "engine-input.jsonl", plain_requests(n, max_tokens))
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    a_best, b_best, c_cold_best, c_warm_best = [], [], [], []
    llm = LlmChild(input_path, mdir, logs / "llm_chat.log")
    try:
        for r in range(rounds):
            c = vbatch_round(input_path, mdir, tmp, r, offline_batch_defaults() if offline_defaults else None)
            a = llm.run()
            b = run_batch_subprocess(input_path, mdir, tmp, logs / "run_batch.log")
            print(f"  round {r}: vbatch cold {c['cold_seconds']:.1f}s warm {c['warm_seconds']:.1f}s "
                  f"(engine start {c['engine_start_s']}s) | LLM.chat {a['seconds']:.1f}s | run-batch {b['seconds']:.1f}s",
                  file=sys.stderr, flush=True)
            a_best.append(a)
            b_best.append(b)
            c_cold_best.append(c)
            c_warm_best.append(c)
    finally:
        llm.close()
    a = min(a_best, key=lambda x: x["seconds"])
    b = min(b_best, key=lambda x: x["seconds"])
    cold = min(c_cold_best, key=lambda x: x["cold_seconds"])
    warm = min(c_warm_best, key=lambda x: x["warm_seconds"])
    tokens = n * max_tokens
    for name, got in (("LLM.chat", a["output_tokens"]), ("run-batch", b["output_tokens"]), ("vbatch", warm["output_tokens"])):
        if got != tokens:
            raise RuntimeError(f"{name} produced {got} output tokens, expected {tokens}")
    result = {
        "requests": n, "max_tokens": max_tokens, "output_tokens": tokens, "rounds": rounds,
        "llm_chat_s": round(a["seconds"], 2), "llm_chat_tok_s": round(tokens / a["seconds"], 1),
        "llm_load_s": round(llm.load_s, 1),
        "run_batch_s": round(b["seconds"], 2), "run_batch_tok_s": round(tokens / b["seconds"], 1),
        "vbatch_cold_s": round(cold["cold_seconds"], 2), "vbatch_cold_tok_s": round(tokens / cold["cold_seconds"], 1),
        "vbatch_warm_s": round(warm["warm_seconds"], 2), "vbatch_warm_tok_s": round(tokens / warm["warm_seconds"], 1),
        "vbatch_engine_start_s": cold["engine_start_s"], "vbatch_max_num_seqs": cold["max_num_seqs"],
        "vbatch_catalog_offline_defaults": offline_defaults,
        # Excluding model load: the warm batch (the worker already holds the engine).
        "e2e_vs_llm_chat": round(a["seconds"] / warm["warm_seconds"], 3),
        # Both cold: run-batch loads the model inside its wall-clock, so does the first vbatch batch.
        "e2e_vs_run_batch": round(b["seconds"] / cold["cold_seconds"], 3),
    }
    if cold["engine_start_s"]:
        # Second estimate of "excluding model load": cold batch minus the engine's own start time.
        result["e2e_cold_minus_load_vs_llm_chat"] = round(a["seconds"] / (cold["cold_seconds"] - cold["engine_start_s"]), 3)
    if prefix:  # one extra workload, flat keys (bench/report.py runs run_prefix separately)
        result.update(prefix_subprocess(mdir, tmp, n=prefix_n, groups=prefix_groups, prompt_words=prefix_words,
                                        max_tokens=4, rounds=rounds))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-prefix", action="store_true")
    parser.add_argument("--prefix-n", type=int, default=256)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--prompt-words", type=int, default=400)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--child", choices=["llm", "prefix"], help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    parser.add_argument("--workloads", help=argparse.SUPPRESS)
    parser.add_argument("--prefix-only", action="store_true", help="only the prefix-ordering workloads")
    parser.add_argument("--offline-defaults", action="store_true",
                        help="vbatch's catalog sets the LLM class's max_num_seqs/max_num_batched_tokens")
    args = parser.parse_args()
    if args.child == "llm":
        return child_llm(args.input, args.model_dir)
    if args.child == "prefix":
        return child_prefix(args)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if args.prefix_only:
            print(json.dumps(run_prefix(tmp, rounds=args.rounds), indent=2))
            return
        result = run(tmp, args.n, args.max_tokens, args.rounds, False, offline_defaults=args.offline_defaults)
        print(json.dumps(result, indent=2))
        if not args.no_prefix:
            print(json.dumps(run_prefix(tmp, rounds=1), indent=2))


if __name__ == "__main__":
    main()
