"""The engine interface the worker drives.

An engine answers one `/v1/chat/completions` request body at a time (many
concurrently). It never raises for a bad request: it returns the HTTP status and
body that `vllm serve` would have answered, so a request the engine rejects
becomes an error line and the rest of the shard goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class EngineReply:
    status_code: int
    # A `chat.completion` object on 200, `{"error": {...}}` otherwise.
    body: dict[str, Any]


class Engine(Protocol):
    name: str

    @property
    def max_in_flight(self) -> int:
        """How many requests the worker should keep submitted (about 2 x max_num_seqs)."""
        ...

    async def start(self) -> None:
        """Load the model (may take long); called once before the first request."""
        ...

    async def chat_completion(self, body: dict[str, Any], request_id: str) -> EngineReply: ...

    async def close(self) -> None: ...


def invalid_request(message: str, param: str | None = None) -> EngineReply:
    """The 400 an OpenAI server answers for a body it cannot accept."""
    return EngineReply(
        400, {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    )
