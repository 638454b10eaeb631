"""What the gateway needs from the rest of vbatch, handed to `create_app`.

The gateway never builds these itself: `vbatch serve` (single-node) and the
cluster entrypoint wire different adapters (SQLite vs. custom resources, local
executor vs. the operator) behind the same fields.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

from vbatch.core.batch_store import BatchStore
from vbatch.core.config import Settings
from vbatch.core.files import FileService
from vbatch.core.keys import KeyStore
from vbatch.core.schemas import BatchRecord


class BatchRunner(Protocol):
    """Told about batches the gateway created or asked to cancel.

    The single-node executor starts/stops work from these calls; in cluster mode
    it is a no-op because the operator watches the Batch resources instead.
    Calls happen after the store committed the change, on a worker thread.
    """

    def submitted(self, record: BatchRecord) -> None: ...

    def cancel_requested(self, record: BatchRecord) -> None: ...


class NoopRunner:
    """The runner for cluster mode (the operator reacts to the store) and for tests."""

    def submitted(self, record: BatchRecord) -> None:
        pass

    def cancel_requested(self, record: BatchRecord) -> None:
        pass


def _always_ready() -> bool:
    return True


@dataclass
class Services:
    settings: Settings
    files: FileService
    batches: BatchStore
    keys: KeyStore
    runner: BatchRunner = field(default_factory=NoopRunner)
    # Model ids the deployment serves; None accepts any id (the echo test engine).
    served_models: Collection[str] | None = None
    # What GET /v1/models lists (the catalog's ids; for the echo test engine too).
    model_ids: list[str] = field(default_factory=list)
    models_created: int = 0
    models_owned_by: str = "vbatch"
    # /readyz answers 503 while this is False (e.g. storage or store not reachable yet).
    ready: Callable[[], bool] = _always_ready
