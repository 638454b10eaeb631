"""The real engine: vLLM in-process, through vLLM's own OpenAI serving layer.

We build the engine and the serving objects exactly the way `vllm run-batch` does in
vLLM 0.32 (`vllm/entrypoints/launchers/run_batch.py`): parse the batch runner's
argument namespace so every frontend option has vLLM's own default, open the engine
client with `build_async_engine_client` (an `AsyncLLM` whose EngineCore runs in a
child process), fill a starlette `State` with `init_app_state` — the same function
`vllm serve` uses — and call `state.openai_serving_chat.create_chat_completion`
with a validated `ChatCompletionRequest`. Hence the response bodies, defaults
(generation_config, chat template) and error bodies are those of `vllm serve`.

vLLM is imported only inside `start()`: importing it is slow and touches the
platform, and the gateway imports this module just to name the engine.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from vbatch.core.catalog import ModelSpec
from vbatch.worker.engines.base import EngineReply, invalid_request

log = logging.getLogger(__name__)

# Context length for models that do not say otherwise, on CPU only: the model's own
# maximum (8k for SmolLM2) would size buffers and the KV-cache check for far longer
# prompts than a CPU box will ever serve. GPUs keep vLLM's default (the model's).
CPU_DEFAULT_MAX_MODEL_LEN = 2048
# Before start() we do not know vLLM's scheduler default; this is only a placeholder.
FALLBACK_MAX_NUM_SEQS = 64
# Bounds the echo of a bad body in our validation error message (vLLM does the same).
_MAX_REPORTED_ERRORS = 5
_MAX_INPUT_CHARS = 200


def _set_cpu_env_defaults() -> None:
    # Must happen before vLLM is imported: vllm.envs reads them at import/first use.
    # Only defaults: a deployment that sets them explicitly wins.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def _offline_batch_sizes(args: Any, engine_args: Any) -> dict[str, int]:
    """vLLM's scheduler sizes for offline `LLM` use, which batch work is.

    The serving entry points get vLLM's generic defaults (e.g. 128 sequences / 2048
    batched tokens), smaller than what `LLM.chat` uses (256/4096 on CPU, up to
    1024/16384 on large GPUs): measured ~10-20% fewer tokens/s on the same work
    (docs/benchmarks.md). A catalog entry's own values still win.
    """
    from vllm.usage.usage_lib import UsageContext

    world = (getattr(args, "tensor_parallel_size", None) or 1) * (getattr(args, "pipeline_parallel_size", None) or 1)
    tokens, seqs = engine_args.get_batch_defaults(world)
    sizes = {"max_num_seqs": seqs.get(UsageContext.LLM_CLASS), "max_num_batched_tokens": tokens.get(UsageContext.LLM_CLASS)}
    return {key: value for key, value in sizes.items() if value is not None and getattr(args, key, None) is None}


class VllmEngine:
    name = "vllm"

    def __init__(
        self,
        spec: ModelSpec,
        *,
        extra_engine_args: dict[str, Any] | None = None,
        log_stats: bool = False,
    ) -> None:
        if spec.is_remote:
            # Syncing s3:// models to local disk is the worker's job, before the engine.
            raise ValueError(f"model {spec.id!r}: VllmEngine needs a local path, got {spec.path}")
        self.spec = spec
        self._extra = dict(extra_engine_args or {})
        self._log_stats = log_stats
        self._stack: AsyncExitStack | None = None
        self._chat: Any = None  # vllm OpenAIServingChat
        self._max_num_seqs = spec.max_num_seqs
        self.chat_template: str | None = None
        self.start_seconds: float | None = None

    @property
    def max_num_seqs(self) -> int | None:
        """vLLM's scheduler batch size: the spec's, or vLLM's default once started."""
        return self._max_num_seqs

    @property
    def max_in_flight(self) -> int:
        # Twice the scheduler's batch: enough queued that a finished sequence is
        # replaced at once, without parking thousands of requests in vLLM's queue.
        return 2 * (self._max_num_seqs or FALLBACK_MAX_NUM_SEQS)

    def _build_args(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.run_batch import make_arg_parser
        from vllm.platforms import current_platform
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        # The batch runner's own parser gives every frontend and engine option its
        # vLLM default; -i/-o are required there but never read by us.
        parser = make_arg_parser(FlexibleArgumentParser(prog="vbatch-worker"))
        args = parser.parse_args(["--model", self.spec.path, "-i", "-", "-o", "-"])

        overrides: dict[str, Any] = {"served_model_name": [self.spec.id]}
        overrides.update(_offline_batch_sizes(args, AsyncEngineArgs))
        if not self._log_stats:
            overrides["disable_log_stats"] = True
        if current_platform.is_cpu():
            # torch.compile + graph capture costs minutes on a CPU and buys little.
            overrides["enforce_eager"] = True
            overrides["max_model_len"] = _cpu_max_model_len(self.spec.path)
        if self.spec.max_num_seqs is not None:
            overrides["max_num_seqs"] = self.spec.max_num_seqs
        overrides.update(self.spec.engine_args)
        overrides.update(self._extra)

        # from_cli_args silently skips unknown names; a catalog typo must not.
        known = {f.name for f in dataclasses.fields(AsyncEngineArgs)} | set(vars(args))
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"model {self.spec.id!r}: unknown vLLM engine args {unknown}")
        for key, value in overrides.items():
            setattr(args, key, value)
        return args

    async def start(self) -> None:
        if self._chat is not None:
            return
        _set_cpu_env_defaults()
        started = time.monotonic()

        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.api_server.entry import (
            build_async_engine_client,
        )
        from vllm.usage.usage_lib import UsageContext

        args = self._build_args()
        stack = AsyncExitStack()
        try:
            engine_client = await stack.enter_async_context(
                build_async_engine_client(args, usage_context=UsageContext.OPENAI_BATCH_RUNNER)
            )
            supported_tasks = await engine_client.get_supported_tasks()
            if "generate" not in supported_tasks:
                raise RuntimeError(
                    f"model {self.spec.id!r} cannot generate text (tasks: {supported_tasks})"
                )
            state = State()
            await init_app_state(engine_client, state, args, supported_tasks)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        self._chat = state.openai_serving_chat
        self._max_num_seqs = engine_client.vllm_config.scheduler_config.max_num_seqs
        tokenizer = getattr(engine_client.renderer, "tokenizer", None)
        self.chat_template = getattr(tokenizer, "chat_template", None)
        self.start_seconds = time.monotonic() - started
        log.info(
            "vLLM engine for %s ready in %.1fs (max_num_seqs=%d)",
            self.spec.id,
            self.start_seconds,
            self._max_num_seqs,
        )
        # A lazy import inside vLLM keeps this frame reachable after start() returns;
        # drop our references so close() really frees the AsyncLLM (otherwise its
        # __del__ runs again at interpreter exit and prints a TypeError).
        del engine_client, state, args

    async def chat_completion(self, body: dict[str, Any], request_id: str) -> EngineReply:
        if self._chat is None:
            raise RuntimeError("VllmEngine.start() has not been called")
        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionRequest,
            ChatCompletionResponse,
        )
        from vllm.entrypoints.serve import create_error_response
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        if not isinstance(body, dict):
            return invalid_request("request body must be a JSON object", None)
        if body.get("stream"):
            # A stream has no single response body to record; the gateway also
            # rejects this at batch-create time.
            return invalid_request("stream=true is not supported in batch requests", "stream")
        if "request_id" not in body:
            # vLLM names the completion chatcmpl-<request_id>: tie it to our record
            # (vLLM adds its own suffix internally, so duplicates cannot collide).
            body = {**body, "request_id": request_id}
        try:
            request = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            return _from_validation_error(exc)
        except ValueError as exc:  # validators may raise VLLMValidationError directly
            return _error_reply(create_error_response(exc))

        try:
            response = await self._chat.create_chat_completion(request, raw_request=None)
        except Exception as exc:  # noqa: BLE001 - a request must never sink the shard
            # The serving layer returns most errors; what escapes is mapped the same
            # way run_batch maps it (status from the exception class).
            log.debug("request %s raised %s: %s", request_id, type(exc).__name__, exc)
            response = create_error_response(exc)

        if isinstance(response, ChatCompletionResponse):
            return EngineReply(200, response.model_dump(mode="json"))
        if isinstance(response, ErrorResponse):
            return _error_reply(response)
        # An async generator: only produced for stream=True, which we refused above.
        return invalid_request("streaming responses are not supported in batch requests", "stream")

    async def close(self) -> None:
        stack, self._stack, self._chat = self._stack, None, None
        if stack is not None:
            # Shuts the AsyncLLM down, which stops the EngineCore child process.
            await stack.aclose()
            # The AsyncLLM sits in reference cycles; collect it now, while modules are
            # alive, or its __del__ runs at interpreter exit and prints a TypeError.
            gc.collect()


def _cpu_max_model_len(model_dir: str) -> int:
    # vLLM refuses a max_model_len above the model's own limit, so never raise it.
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        limit = int(cfg.get("max_position_embeddings") or CPU_DEFAULT_MAX_MODEL_LEN)
    except (OSError, ValueError, TypeError):
        limit = CPU_DEFAULT_MAX_MODEL_LEN
    return min(CPU_DEFAULT_MAX_MODEL_LEN, limit)


def _error_reply(err: Any) -> EngineReply:
    # Keep vLLM's status code and its error body verbatim (type like "BadRequestError",
    # integer code), as `vllm serve` would have answered.
    body = err.model_dump(mode="json")
    status = int(body.get("error", {}).get("code") or 500)
    return EngineReply(status, body)


def _from_validation_error(exc: ValidationError) -> EngineReply:
    from vllm.entrypoints.serve.exception_handling.handlers.validation import (
        clean_loc_for_param,
    )
    from vllm.exceptions import VLLMValidationError

    errors = exc.errors(include_url=False)
    param: str | None = None
    # Like vLLM's HTTP handler: a VLLMValidationError names the parameter itself;
    # otherwise the first error's location, cleaned of pydantic's internal markers.
    for err in errors:
        ctx_err = err.get("ctx", {}).get("error")
        if isinstance(ctx_err, VLLMValidationError) and ctx_err.parameter:
            param = ctx_err.parameter
            break
    if param is None and errors and errors[0].get("loc"):
        param = clean_loc_for_param(tuple(errors[0]["loc"])) or None

    lines = []
    for err in errors[:_MAX_REPORTED_ERRORS]:
        loc = clean_loc_for_param(tuple(err.get("loc", ()))) or "body"
        lines.append(f"{loc}: {err.get('msg', 'invalid value')}")
    if len(errors) > _MAX_REPORTED_ERRORS:
        lines.append(f"...and {len(errors) - _MAX_REPORTED_ERRORS} more")
    message = "invalid request body: " + "; ".join(lines)
    if len(message) > 1000:
        message = message[:1000] + "...[truncated]"
    return invalid_request(message, param)
