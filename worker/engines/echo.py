"""EchoEngine: a deterministic TEST engine. It never runs inference.

It answers a `/v1/chat/completions` body with a well-formed `chat.completion` whose
assistant message repeats the last user message. Tests and benchmarks of the
orchestration (sharding, resume, crash recovery, throughput of the worker itself)
use it so they run in milliseconds without a model; anything where the engine's
answers matter uses the real vLLM engine instead.

Token counts are whitespace-separated words: cheap, deterministic, and enough for
asserting that usage is summed correctly.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from vbatch.worker.engines.base import EngineReply, invalid_request


class BadBody(ValueError):
    """The body is not a chat-completions request this engine can answer (-> 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def message_text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict):
                raise BadBody("content parts must be objects", "messages")
            if part.get("type") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise BadBody("a text content part needs a string 'text'", "messages")
                texts.append(text)
        return " ".join(texts)
    raise BadBody("message content must be a string, a list of parts or null", "messages")


def _token_limit(body: dict[str, Any]) -> int | None:
    # OpenAI's newer name wins when both are given, as the API does.
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BadBody(f"{name} must be a positive integer", name)
        return value
    return None


class EchoEngine:
    """Deterministic TEST engine (never inference): replies with the last user message.

    `delay_per_token` adds `asyncio.sleep(delay_per_token * completion_tokens)` per
    request, so a benchmark or a crash test can simulate a slow engine while the
    worker still overlaps many requests, as it would with vLLM.
    """

    name = "echo"

    def __init__(self, *, max_in_flight: int = 64, delay_per_token: float = 0.0) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self._max_in_flight = max_in_flight
        self.delay_per_token = delay_per_token

    @property
    def max_in_flight(self) -> int:
        return self._max_in_flight

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def chat_completion(self, body: dict[str, Any], request_id: str) -> EngineReply:
        try:
            completion, tokens = self._answer(body)
        except BadBody as exc:
            return invalid_request(str(exc), exc.param)
        # Always yield once, so concurrent requests interleave like a real engine's.
        await asyncio.sleep(self.delay_per_token * tokens if self.delay_per_token > 0 else 0)
        return EngineReply(200, completion)

    def _answer(self, body: Any) -> tuple[dict[str, Any], int]:
        if not isinstance(body, dict):
            raise BadBody("the request body must be a JSON object", None)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadBody("'model' is required", "model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadBody("'messages' must be a non-empty list", "messages")
        prompt_tokens = 0
        last_user = ""
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise BadBody("each message must be an object with a 'role'", "messages")
            text = message_text(message.get("content"))
            prompt_tokens += len(text.split())
            if message["role"] == "user":
                last_user = text
        limit = _token_limit(body)

        words = last_user.split()
        finish_reason = "stop"
        reply = last_user
        if limit is not None and len(words) > limit:
            words = words[:limit]
            reply = " ".join(words)
            finish_reason = "length"
        completion_tokens = len(words)
        completion = {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply},
                    "finish_reason": finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        return completion, completion_tokens
