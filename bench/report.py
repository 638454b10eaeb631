"""Run the benchmarks and write docs/benchmarks.md, docs/benchmarks.png and bench/results.json.

    .venv/bin/python bench/report.py                      # everything (~15 min on 2 CPU cores)
    .venv/bin/python bench/report.py --quick              # small sizes, a few minutes
    .venv/bin/python bench/report.py --only merge,scaling # a subset (the others stay null)

Every figure is a ratio against a baseline measured in the same run (see each
script's docstring). A figure that cannot be measured is null in results.json and
its reason is written in the report. Text below the KEEP marker in
docs/benchmarks.md is hand-written analysis and is kept across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common

REPO = HERE.parent
DOC, PNG, RESULTS = REPO / "docs" / "benchmarks.md", REPO / "docs" / "benchmarks.png", HERE / "results.json"
KEEP = "<!-- Hand-written analysis below this line is kept by bench/report.py. -->"
KEYS = ["validation_vs_orjson", "upload_vs_direct_put", "upload_peak_rss_mb", "merge_vs_concat",
        "shard_scaling_efficiency_s8", "e2e_vs_llm_chat", "e2e_vs_run_batch", "file_list_page_20k_vs_20",
        "many_small_vs_one_big", "after_cancel_vs_before"]
# key -> (goal as text, goal number for the plot or None, higher is better)
GOALS = {
    "validation_vs_orjson": (">= 0.7", 0.7),
    "upload_vs_direct_put": ("none set", None),
    "upload_peak_rss_mb": ("none set (constant in file size)", None),
    "merge_vs_concat": ("none set", None),
    "shard_scaling_efficiency_s8": ("none set (1.0 = perfect)", None),
    "e2e_vs_llm_chat": (">= 0.95 (excl. model load)", 0.95),
    "e2e_vs_run_batch": (">= 1.0 (wall-clock)", 1.0),
    "file_list_page_20k_vs_20": ("about 1 (O(page), lower is better)", None),
    "many_small_vs_one_big": (">= 0.9 (tokens/s)", 0.9),
    "after_cancel_vs_before": ("<= 2 (lower is better)", 2.0),
}
BENCHES = ["validate", "upload", "merge", "scaling", "engine", "prefix", "listing", "warm"]


def run_all(only: list[str], quick: bool, size_mb: float | None) -> tuple[dict, dict, dict]:
    """(details per bench, errors per bench, seconds per bench)."""
    size = size_mb or (20 if quick else 200)
    jobs = {
        "validate": lambda t: __import__("validate").run(t, size_mb=size, rounds=3 if quick else 5),
        "upload": lambda t: __import__("upload").run(t, size_mb=size, rounds=2 if quick else 3),
        "merge": lambda t: __import__("merge").run(t, size_mb=size, lines=5_000 if quick else 50_000,
                                                   rounds=2 if quick else 3),
        "scaling": lambda t: __import__("scaling").run(t, n=512 if quick else 2048, delay=0.01 if quick else 0.03),
        "engine": lambda t: __import__("engine").run(t, n=32 if quick else 256, max_tokens=16 if quick else 32,
                                                     rounds=1 if quick else 2),
        "prefix": lambda t: __import__("engine").run_prefix(
            t, workloads={"one_system_prompt": (64, 1, 200), "16_system_prompts": (64, 16, 300)} if quick else None),
        "listing": lambda t: __import__("listing").run(t, files_n=2_000 if quick else 20_000, rounds=10 if quick else 30),
        "warm": lambda t: __import__("warm").run(t, small=12 if quick else 48, size=4,
                                                 max_tokens=16 if quick else 32, rounds=1 if quick else 3),
    }
    details, errors, seconds = {}, {}, {}
    for name in BENCHES:
        if name not in only:
            errors[name] = "not run (excluded with --only)"
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            with tempfile.TemporaryDirectory(prefix=f"vbatch-bench-{name}-") as tmp:
                details[name] = jobs[name](tmp)
        except Exception as exc:  # one broken figure must not lose the others
            traceback.print_exc()
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        seconds[name] = round(time.monotonic() - started, 1)
        print(f"[{time.strftime('%H:%M:%S')}] {name} done in {seconds[name]}s: "
              f"{json.dumps(details.get(name)) if name in details else errors[name]}", file=sys.stderr, flush=True)
    return details, errors, seconds


def figures(details: dict) -> dict:
    d = lambda bench, key: (details.get(bench) or {}).get(key)
    return {
        "validation_vs_orjson": d("validate", "validation_vs_orjson"),
        "upload_vs_direct_put": d("upload", "upload_vs_direct_put"),
        "upload_peak_rss_mb": d("upload", "upload_peak_rss_mb"),
        "merge_vs_concat": d("merge", "merge_vs_concat"),
        "shard_scaling_efficiency_s8": d("scaling", "shard_scaling_efficiency_s8"),
        "e2e_vs_llm_chat": d("engine", "e2e_vs_llm_chat"),
        "e2e_vs_run_batch": d("engine", "e2e_vs_run_batch"),
        "file_list_page_20k_vs_20": d("listing", "file_list_page_big_vs_small"),
        "many_small_vs_one_big": d("warm", "many_small_vs_one_big"),
        "after_cancel_vs_before": d("warm", "after_cancel_vs_before"),
    }


def rows(details: dict, errors: dict) -> list[tuple[str, str, list[tuple]]]:
    """(title, bench, [(figure, candidate, baseline, ratio, goal, notes)])."""
    v, u, m, s, e = (details.get(k) or {} for k in BENCHES[:5])
    def goal(key): return GOALS[key][0]
    out = []
    if v:
        out.append(("Input validation", "validate", [
            ("validation_vs_orjson", f"validate_jsonl {v['validation_mb_s']} MB/s", f"orjson per line {v['orjson_mb_s']} MB/s",
             v["validation_vs_orjson"], goal("validation_vs_orjson"),
             f"{v['file_mb']} MB, {v['lines']} lines; CPU time, best of rounds; vs orjson over pre-split lines: "
             f"{v['validation_vs_in_memory_orjson']}x; validation peak {v['validation_peak_mb']} MB")]))
    if u:
        out.append(("Upload through the gateway (S3 storage on nanio)", "upload", [
            ("upload_vs_direct_put", f"POST /v1/files {u['gateway_mb_s']} MB/s", f"minio put_object {u['direct_put_mb_s']} MB/s",
             u["upload_vs_direct_put"], goal("upload_vs_direct_put"), f"{u['file_mb']} MB file, best of {u['rounds']} rounds"),
            ("upload_peak_rss_mb", f"{u['upload_peak_rss_mb']} MB peak RSS", f"{u['gateway_idle_rss_mb']} MB idle RSS",
             f"+{u['upload_rss_growth_mb']} MB", goal("upload_peak_rss_mb"), f"gateway process, {u['rss_method']}")]))
    if m:
        out.append(("Result merge (local store)", "merge", [
            ("merge_vs_concat", f"merge_shards {m['merge_mb_s']} MB/s ({m['merge_lines_s']} results/s)",
             f"raw concatenation {m['concat_mb_s']} MB/s", m["merge_vs_concat"], goal("merge_vs_concat"),
             f"{m['parts_mb']} MB of parts, {m['lines']} results, {m['shards']} shards")]))
    if s:
        out.append(("Shard scaling (echo engine, LocalExecutor with S worker subprocesses)", "scaling", [
            ("shard_scaling_efficiency_s8", f"S=8: {s['seconds'].get(8, s['seconds'].get('8'))} s",
             f"S=1: {min(s['s1_seconds'])} s", s["shard_scaling_efficiency_s8"], goal("shard_scaling_efficiency_s8"),
             f"{s['requests']} requests x {s['tokens_per_request']} tokens x {s['delay_per_token']} s/token, "
             f"64 in flight per worker (engine-only time at S=1: {s['engine_only_s1']} s); "
             "efficiency by S: " + ", ".join(f"{k}: {v}" for k, v in s["efficiency"].items()))]))
    if e:
        tok = f"{e['requests']} requests x {e['max_tokens']} tokens"
        out.append(("Real engine end to end (vLLM CPU, SmolLM2-135M)", "engine", [
            ("e2e_vs_llm_chat", f"vbatch warm batch {e['vbatch_warm_tok_s']} tok/s ({e['vbatch_warm_s']} s)",
             f"LLM.chat {e['llm_chat_tok_s']} tok/s ({e['llm_chat_s']} s)", e["e2e_vs_llm_chat"], goal("e2e_vs_llm_chat"),
             f"{tok}; create->completed on a server whose worker already holds the engine"
             + (f"; cold batch minus engine start ({e['vbatch_engine_start_s']} s): {e.get('e2e_cold_minus_load_vs_llm_chat')}x"
                if e.get("vbatch_engine_start_s") else "")),
            ("e2e_vs_run_batch", f"vbatch cold batch {e['vbatch_cold_tok_s']} tok/s ({e['vbatch_cold_s']} s)",
             f"run-batch {e['run_batch_tok_s']} tok/s ({e['run_batch_s']} s)", e["e2e_vs_run_batch"], goal("e2e_vs_run_batch"),
             f"{tok}; both include model load; LLM load alone {e['llm_load_s']} s"),
        ]))
    p = details.get("prefix") or {}
    if p:
        out.append(("Prefix-aware ordering (VllmEngine + run_shard, no gateway)", "prefix", [
            (f"prefix ordering: {name}", f"ordered (default window) {w['ordered_s']} s", f"file order (window_lines=1) {w['file_order_s']} s",
             w["speedup"], "none set",
             f"{w['requests']} requests, {w['system_prompts']} system prompt(s) assigned round-robin, "
             f"{w['prompt_tokens']} prompt tokens in all, 4 output tokens each") for name, w in p.items()]))
    li = details.get("listing") or {}
    if li:
        out.append(("File listing with a per-project index (S3 storage on nanio)", "listing", [
            ("file_list_page_20k_vs_20", f"page of {li['page']} with {li['files']} files {li['page_ms_big']} ms",
             f"with {li['page']} files {li['page_ms_small']} ms", li["file_list_page_big_vs_small"],
             GOALS["file_list_page_20k_vs_20"][0],
             f"median of {li['rounds']} interleaved rounds; a page after a cursor in the middle of the 20,000: "
             f"{li['middle_page_ms_big']} ms ({li['file_list_middle_page_big_vs_small']}x); "
             f"storage requests per page {li['requests_per_page_big']} vs {li['requests_per_page_small']}; "
             f"reading every File object, as before the index: ~{li['full_scan_seconds_big']} s")]))
    w = details.get("warm") or {}
    if w:
        out.append(("Warm engines shared by every batch (vLLM CPU, one vbatch serve)", "warm", [
            ("many_small_vs_one_big", f"{w['small_batches']} batches x {w['small_batch_size']}: {w['many_small_tok_s']} tok/s "
             f"({w['many_small_s']} s)", f"one batch of {w['requests']}: {w['one_big_tok_s']} tok/s ({w['one_big_s']} s)",
             w["many_small_vs_one_big"], goal("many_small_vs_one_big"),
             f"{w['max_tokens']} tokens, temperature 0, ignore_eos; created at once on a warm server; best of "
             f"{w.get('rounds', '?')} rounds; watched with one list request per 0.1 s (one GET per 0.1 s for the big one); "
             f"with every small batch polled 10x/s: {w.get('many_small_polled_each_s')} s "
             f"({w.get('many_small_polled_each_vs_one_big')})"),
            ("after_cancel_vs_before", f"1-request batch after a cancel {w['one_request_after_cancel_s']} s",
             f"before {w['one_request_before_cancel_s']} s", w["after_cancel_vs_before"], goal("after_cancel_vs_before"),
             f"engine loads in the whole run: {w['engine_loads']}")]))
    for title, bench in [("Input validation", "validate"), ("Upload", "upload"), ("Result merge", "merge"),
                         ("Shard scaling", "scaling"), ("Real engine end to end", "engine"),
                         ("Prefix-aware ordering", "prefix"), ("File listing", "listing"), ("Warm engines", "warm")]:
        if bench in errors:
            out.append((title, bench, [("(not measured)", "", "", None, "", errors[bench])]))
    return out


def write_markdown(details: dict, errors: dict, seconds: dict, machine: dict, results: dict) -> None:
    kept = ""
    if DOC.exists() and KEEP in DOC.read_text():
        kept = DOC.read_text().split(KEEP, 1)[1]
    lines = ["# vbatch benchmarks", "",
             f"Generated by `bench/report.py` on {time.strftime('%Y-%m-%d %H:%M %Z')}. Every ratio is candidate vs a "
             "baseline measured in the same run (interleaved where possible); results.json holds the headline numbers.", "",
             "## Machine", "",
             f"- CPU: {machine.get('cpu')} ({machine.get('cores')} cores), RAM {machine.get('ram_gb')} GB, no GPU",
             f"- Python {machine.get('python')}, vLLM {machine.get('vllm')} (CPU build), torch {machine.get('torch')}, "
             f"orjson {machine.get('orjson')}, minio {machine.get('minio')}, fastapi {machine.get('fastapi')}, uvicorn {machine.get('uvicorn')}",
             f"- {machine.get('platform')}; load average at start {tuple(round(x, 2) for x in machine.get('load_avg_at_start', ()))}",
             "- Absolute MB/s and tokens/s move with whatever else runs on the machine (compare the load average); "
             "the ratios come from interleaved or back-to-back runs in the same process tree and are the figures to read.", "",
             "## Headline figures (bench/results.json)", "", "| figure | value | goal |", "|---|---|---|"]
    for key in KEYS:
        value = results[key]
        lines.append(f"| `{key}` | {value if value is not None else '**null** (see below)'} | {GOALS[key][0]} |")
    lines += ["", "![ratios and scaling](benchmarks.png)", ""]
    for title, bench, table in rows(details, errors):
        lines += [f"## {title}", "", f"Run time {seconds.get(bench, '-')} s.", "",
                  "| figure | candidate | baseline | ratio | goal | notes |", "|---|---|---|---|---|---|"]
        for fig, cand, base, ratio, goal, notes in table:
            lines.append(f"| {fig} | {cand} | {base} | {ratio if ratio is not None else 'null'} | {goal} | {notes} |")
        lines.append("")
    if "scaling" in details:
        s = details["scaling"]
        bound = s.get("wave_bound") or {}
        lines += ["Scaling curve (bound = the best efficiency possible when every request takes the same time and "
                  "each worker runs 64 at once, i.e. in waves):", "",
                  "| S | seconds (warm) | seconds (cold, starts workers) | requests/s | efficiency | bound |",
                  "|---|---|---|---|---|---|"]
        for k in s["seconds"]:
            lines.append(f"| {k} | {s['seconds'][k]} | {s['cold_seconds'][k]} | {s['throughput_rps'][k]} | "
                         f"{s['efficiency'][k]} | {bound.get(k, '-')} |")
        lines.append("")
    if "engine" in details:
        lines += ["Engine details:", "", "```json", json.dumps(details["engine"], indent=2), "```", ""]
    lines += [KEEP]
    DOC.write_text("\n".join(lines) + (kept if kept else "\n"))


def plot(results: dict, details: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.5, 1]})
    names = [k for k in KEYS if k != "upload_peak_rss_mb"]
    prefix = details.get("prefix") or {}
    labels = names + [f"prefix order speedup: {k}" for k in prefix]
    values = [results[k] for k in names] + [w["speedup"] for w in prefix.values()]
    goals = [GOALS[k][1] for k in names] + [None] * len(prefix)
    ys = range(len(labels))
    colors = ["#999999" if v is None else "#1565c0" if g is None else "#2e7d32" if v >= g else "#c62828"
              for v, g in zip(values, goals)]
    left.barh(list(ys), [v or 0 for v in values], color=colors)
    for y, v, g in zip(ys, values, goals):
        left.text((v or 0) + 0.02, y, "null" if v is None else f"{v:.2f}", va="center", fontsize=9)
        if g is not None:
            left.plot([g, g], [y - 0.4, y + 0.4], color="black", lw=2)
    left.set_yticks(list(ys), labels, fontsize=9)
    left.invert_yaxis()
    left.set_xlabel("ratio vs same-run baseline (black tick = goal: green met, red missed; blue = no goal set)")
    rss = results.get("upload_peak_rss_mb")
    left.set_title(f"vbatch ratios (upload peak RSS: {rss if rss is not None else 'n/a'} MB)")
    left.set_xlim(0, max([v or 0 for v in values] + [1.1]) * 1.15)

    s = details.get("scaling")
    if s:
        ks = [int(k) for k in s["efficiency"]]
        right.plot(ks, [s["efficiency"][k] for k in s["efficiency"]], "o-", label="efficiency t(1)/(S*t(S))")
        right.plot(ks, [1.0] * len(ks), "--", color="grey", label="ideal")
        if "wave_bound" in s:
            right.plot(ks, [s["wave_bound"][k] for k in s["wave_bound"]], ":", color="black",
                       label="bound: equal requests run in waves of 64")
        right.set_ylim(0, 1.1)
        right.set_xlabel("shards S (worker subprocesses)")
        right.set_ylabel("scaling efficiency")
        right.set_title("Shard scaling, echo engine (time-based)")
        right.legend(loc="lower left")
        right.grid(alpha=0.3)
    else:
        right.text(0.5, 0.5, "scaling not measured", ha="center")
        right.axis("off")
    fig.tight_layout()
    fig.savefig(PNG, dpi=110)
    plt.close(fig)


def _int_keys(bench: dict) -> dict:
    """JSON turned the int keys of the per-S scaling tables into strings; undo that."""
    for key in ("seconds", "cold_seconds", "throughput_rps", "efficiency", "wave_bound"):
        if isinstance(bench.get(key), dict):
            bench[key] = {int(k): v for k, v in bench[key].items()}
    return bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHES), help="comma list of: " + ",".join(BENCHES))
    parser.add_argument("--quick", action="store_true", help="small sizes (minutes, noisier)")
    parser.add_argument("--size-mb", type=float, default=None, help="file size for validate/upload/merge (default 200)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch docs/ or results.json")
    parser.add_argument("--keep", action="store_true",
                        help="with --only: keep the other benchmarks' previous results (bench/results-details.json)")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rewrite docs/benchmarks.{md,png} from bench/results-details.json")
    args = parser.parse_args()
    if args.render:
        saved = json.loads((HERE / "results-details.json").read_text())
        details = {k: _int_keys(v) for k, v in saved["details"].items()}
        results = figures(details)
        write_markdown(details, saved["errors"], saved["seconds"], saved["machine"], results)
        plot(results, details)
        return
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = set(only) - set(BENCHES)
    if unknown:
        parser.error(f"unknown benchmarks {sorted(unknown)}")
    machine = common.machine()
    details, errors, seconds = run_all(only, args.quick, args.size_mb)
    if args.keep and (HERE / "results-details.json").exists():
        saved = json.loads((HERE / "results-details.json").read_text())
        for bench in BENCHES:
            if bench not in only and bench in saved["details"]:
                details[bench] = _int_keys(saved["details"][bench])
                errors.pop(bench, None)
                seconds[bench] = saved["seconds"].get(bench)
    results = figures(details)
    print(json.dumps(results, indent=2))
    if args.no_write:
        return
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "results-details.json").write_text(json.dumps(
        {"machine": machine, "details": details, "errors": errors, "seconds": seconds}, indent=2, default=str) + "\n")
    write_markdown(details, errors, seconds, machine, results)
    plot(results, details)
    print(f"wrote {RESULTS}, {DOC}, {PNG}", file=sys.stderr)


if __name__ == "__main__":
    os.chdir(REPO)
    main()
