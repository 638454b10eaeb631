"""The real engine: vLLM (CPU build) serving SmolLM2-135M-Instruct in this process.

Where the engine runs: in the pytest process. `VllmEngine` builds vLLM's AsyncLLM
here (the frontend: tokenizer, chat template, OpenAI serving objects) and vLLM itself
starts the EngineCore + model worker as child processes. Nothing CUDA is ever
initialised in this process, so vLLM's default start method works; all calls go
through one event loop owned by the module fixture, because AsyncLLM binds its
output-handler task to the loop it was started on. No pytest-asyncio needed.

The model is converted once into VBATCH_TEST_MODEL_DIR (default
~/.cache/vbatch-test-models) and reused by later runs. Tiny max_tokens keep the
module to about a minute on 2 cores (most of it engine start).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

# vllm.envs reads these when vLLM is first imported (inside engine.start()).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

from vbatch.worker import models as models_mod  # noqa: E402
from vbatch.core.catalog import ModelSpec, load_catalog  # noqa: E402
from vbatch.worker.engines.vllm import VllmEngine  # noqa: E402

MODEL = "smollm2-135m-instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def chat(messages=FRANCE, **params):
    return {"model": MODEL, "messages": messages, **params}


# --- fast tests: catalog and model preparation (no vLLM) -------------------------


def test_default_catalog_is_the_demo_model(tmp_path: Path) -> None:
    cat = load_catalog(None, tmp_path)
    assert cat.ids() == [MODEL]
    assert cat.get(MODEL).path == str(tmp_path / "models" / MODEL)
    with pytest.raises(KeyError, match="not in the catalog.*smollm2-135m-instruct"):
        cat.get("gpt-4o")


def test_catalog_reads_yaml_and_json(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "models:\n"
        "  - id: a\n    path: rel/a\n    max_num_seqs: 8\n"
        "    engine_args: {max_model_len: 1024}\n"
        "  - id: b\n    path: s3://bucket/b\n    gpus_per_replica: 2\n"
    )
    cat = load_catalog(tmp_path / "c.yaml", tmp_path / "data")
    assert cat.ids() == ["a", "b"]
    # Relative paths are anchored at the catalog file, not the current directory.
    assert cat.get("a").path == str((tmp_path / "rel/a").resolve())
    assert cat.get("a").engine_args == {"max_model_len": 1024}
    assert cat.get("b").is_remote and cat.get("b").gpus_per_replica == 2

    (tmp_path / "c.json").write_text('{"models": [{"id": "x", "path": "/m/x"}]}')
    assert load_catalog(tmp_path / "c.json", tmp_path).get("x").max_replicas == 1


@pytest.mark.parametrize(
    "body",
    [
        "models:\n  - {id: a, path: /a}\n  - {id: a, path: /b}\n",  # duplicate id
        "models:\n  - {id: a, path: /a, max_num_seq: 3}\n",  # typo'd key
        "models:\n  - {id: a, path: /a, engine_args: {model: /other}}\n",  # shadowing
    ],
)
def test_catalog_rejects_ambiguous_files(tmp_path: Path, body: str) -> None:
    (tmp_path / "c.yaml").write_text(body)
    with pytest.raises(ValueError):
        load_catalog(tmp_path / "c.yaml", tmp_path)


def test_prepare_is_atomic_and_idempotent(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def crashing_convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(models_mod, "_convert", crashing_convert)
    with pytest.raises(RuntimeError):
        models_mod.prepare_demo_model(tmp_path)
    # A crash leaves neither a target directory nor temp debris behind.
    assert list(tmp_path.iterdir()) == []

    def good_convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models_mod, "_convert", good_convert)
    first = models_mod.prepare_demo_model(tmp_path)
    assert first == tmp_path / MODEL and models_mod.is_prepared(first)
    assert models_mod.prepare_demo_model(tmp_path) == first
    assert len(calls) == 2  # the third call found the marker and converted nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL]


# --- the real engine ------------------------------------------------------------


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engine(demo_model_dir: Path, loop: asyncio.AbstractEventLoop):
    eng = VllmEngine(ModelSpec(id=MODEL, path=str(demo_model_dir)))
    loop.run_until_complete(eng.start())
    yield eng
    loop.run_until_complete(eng.close())


@pytest.fixture
def run(engine: VllmEngine, loop: asyncio.AbstractEventLoop):
    """Submit one body (or gather many) on the engine's loop; return the replies."""

    def _run(*bodies: dict):
        async def go():
            return await asyncio.gather(
                *(engine.chat_completion(b, f"batch_req_{i}") for i, b in enumerate(bodies))
            )

        replies = loop.run_until_complete(go())
        return replies[0] if len(replies) == 1 else replies

    return _run


@pytest.mark.vllm
def test_greedy_answer_and_response_shape(engine: VllmEngine, run) -> None:
    reply = run(chat(temperature=0, max_tokens=24))
    assert reply.status_code == 200, reply.body
    body = reply.body
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    # vLLM names the completion after the request id we pass in.
    assert body["id"] == "chatcmpl-batch_req_0"
    msg = body["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"]
    assert "Paris" in msg["content"]
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.vllm
def test_engine_reports_its_scheduler_and_template(engine: VllmEngine) -> None:
    # After start(), max_in_flight derives from vLLM's actual max_num_seqs.
    assert engine.max_num_seqs and engine.max_in_flight == 2 * engine.max_num_seqs
    assert engine.chat_template and "<|im_start|>" in engine.chat_template
    assert engine.start_seconds is not None and engine.start_seconds > 0


@pytest.mark.vllm
def test_max_tokens_truncates_with_length(run) -> None:
    reply = run(chat(temperature=0, max_tokens=3))
    assert reply.status_code == 200, reply.body
    assert reply.body["choices"][0]["finish_reason"] == "length"
    assert reply.body["usage"]["completion_tokens"] == 3


@pytest.mark.vllm
def test_n_returns_that_many_choices(run) -> None:
    reply = run(chat(n=2, temperature=0.8, max_tokens=4))
    assert reply.status_code == 200, reply.body
    choices = reply.body["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert all(c["message"]["content"] for c in choices)


@pytest.mark.vllm
def test_stop_sequence_ends_the_answer(run) -> None:
    reply = run(chat(temperature=0, max_tokens=24, stop=[" Paris"]))
    assert reply.status_code == 200, reply.body
    choice = reply.body["choices"][0]
    assert "Paris" not in choice["message"]["content"]
    assert choice["message"]["content"].startswith("The capital of France is")
    assert choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == " Paris"


@pytest.mark.vllm
def test_seed_makes_sampling_reproducible(run) -> None:
    story = [{"role": "user", "content": "Write one sentence about a cat."}]
    params = dict(temperature=1.0, max_tokens=12)
    a, b = run(chat(story, seed=1234, **params), chat(story, seed=1234, **params))
    assert a.body["choices"][0]["message"]["content"] == b.body["choices"][0]["message"]["content"]
    # ...and the seed actually drives sampling: other seeds do not all agree with it.
    others = run(*(chat(story, seed=s, **params) for s in (1, 2, 3)))
    texts = {r.body["choices"][0]["message"]["content"] for r in [a, *others]}
    assert len(texts) > 1


@pytest.mark.vllm
@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        # vLLM's own checks: we keep its status code and error body verbatim.
        ({**chat(), "model": "not-served"}, 404, "model"),
        (chat(max_tokens=100_000), 400, "max_tokens"),
        (chat(temperature=-1), 400, "temperature"),
        # Bodies that do not validate as a ChatCompletionRequest at all.
        (chat(messages="hello"), 400, "messages"),
        (chat(stream=True), 400, "stream"),
    ],
)
def test_rejected_request_is_an_error_reply_not_a_crash(run, body, status, param) -> None:
    reply = run(body)
    assert reply.status_code == status, reply.body
    err = reply.body["error"]
    assert err["message"] and err["type"] and err["param"] == param
    # The engine keeps serving after a rejection.
    after = run(chat(temperature=0, max_tokens=3))
    assert after.status_code == 200


@pytest.mark.vllm
def test_validation_error_envelope(run) -> None:
    reply = run(chat(max_tokens="lots"))
    assert reply.status_code == 400
    assert reply.body == {
        "error": {
            "message": reply.body["error"]["message"],
            "type": "invalid_request_error",
            "param": "max_tokens",
            "code": None,
        }
    }
    assert "max_tokens" in reply.body["error"]["message"]


@pytest.mark.vllm
def test_many_concurrent_requests_all_succeed(run) -> None:
    bodies = [
        chat([{"role": "user", "content": f"Say the number {i}."}], max_tokens=4, temperature=0)
        for i in range(32)
    ]
    replies = run(*bodies)
    assert [r.status_code for r in replies] == [200] * 32
    assert len({r.body["id"] for r in replies}) == 32
    assert all(0 < r.body["usage"]["completion_tokens"] <= 4 for r in replies)


@pytest.mark.vllm
def test_unknown_engine_arg_is_refused(demo_model_dir: Path) -> None:
    # A catalog typo must fail at start, not be silently dropped by from_cli_args.
    eng = VllmEngine(ModelSpec(id=MODEL, path=str(demo_model_dir), engine_args={"max_modl_len": 5}))
    with pytest.raises(ValueError, match="max_modl_len"):
        eng._build_args()


@pytest.mark.vllm
def test_batch_work_gets_the_offline_scheduler_sizes(demo_model_dir: Path) -> None:
    """vLLM's serving defaults batch fewer sequences than its offline `LLM` class;
    batches are offline work, so the worker asks for the offline sizes."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    tokens, seqs = AsyncEngineArgs.get_batch_defaults(1)
    args = VllmEngine(ModelSpec(id=MODEL, path=str(demo_model_dir)))._build_args()
    assert (args.max_num_seqs, args.max_num_batched_tokens) == (
        seqs[UsageContext.LLM_CLASS], tokens[UsageContext.LLM_CLASS])
    # larger than what the serving entry points (and run_batch) get by default
    assert args.max_num_seqs > seqs[UsageContext.OPENAI_API_SERVER]
    assert args.max_num_batched_tokens > tokens[UsageContext.OPENAI_API_SERVER]
    # the catalog's own choice wins
    pinned = ModelSpec(id=MODEL, path=str(demo_model_dir), max_num_seqs=8, engine_args={"max_num_batched_tokens": 1024})
    args = VllmEngine(pinned)._build_args()
    assert (args.max_num_seqs, args.max_num_batched_tokens) == (8, 1024)


@pytest.mark.vllm
def test_aborting_a_shard_aborts_its_requests_inside_the_engine(engine: VllmEngine, loop, tmp_path: Path) -> None:
    """Cancel/expiry abort requests, not the process: the engine's in-flight requests of
    the aborted shard are gone at once, none of them becomes a result line (vLLM answers a
    cancelled request with "Client disconnected"), and the engine serves the next one."""
    import json

    from vbatch.core import layout
    from vbatch.core.storage.local import LocalObjectStore
    from vbatch.worker.shard import run_shard

    store = LocalObjectStore(tmp_path / "store")
    lines = [{"custom_id": f"long-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": chat(max_tokens=1024, ignore_eos=True, temperature=0)} for i in range(8)]
    store.put_bytes(layout.shard_key("p", "batch_abort", 0), b"".join(json.dumps(x).encode() + b"\n" for x in lines))
    client = engine._chat.engine_client

    async def scenario():
        abort = asyncio.Event()
        shard = asyncio.create_task(run_shard(store, engine, project="p", batch_id="batch_abort", shard=0,
                                              abort=abort, part_max_seconds=0.1))
        deadline = loop.time() + 120
        while client.output_processor.get_num_unfinished_requests() < len(lines):
            assert loop.time() < deadline, "the requests never reached the engine"
            await asyncio.sleep(0.05)
        abort.set()
        progress = await asyncio.wait_for(shard, 30)
        await asyncio.sleep(0.1)
        return progress, client.output_processor.get_num_unfinished_requests()

    progress, unfinished = loop.run_until_complete(scenario())
    assert not progress.finished and progress.completed == progress.failed == 0
    assert unfinished == 0
    assert list(store.list(layout.results_prefix("p", "batch_abort", 0))) == []
    reply = loop.run_until_complete(engine.chat_completion(chat(max_tokens=4), "after_abort"))
    assert reply.status_code == 200
