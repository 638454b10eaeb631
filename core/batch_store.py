"""Where batch records live: the protocol both modes implement.

Single-node mode: `vbatch.core.sqlite_store.SqliteBatchStore` (durable, WAL).
Cluster mode: `vbatch.operator.cr_store.KubeBatchStore` (Batch custom resources).
Records are returned as copies; callers change them and `save` them back.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from vbatch.core.schemas import BatchRecord


class StaleRecord(Exception):
    """The record changed in the store since it was read (e.g. a cancel arrived)."""


class BatchStore(Protocol):
    def create(self, record: BatchRecord) -> None:
        """Durably store a new batch; returns only once it is committed."""
        ...

    def get(self, project: str, batch_id: str) -> BatchRecord | None:
        """The batch, or None when absent or owned by another project."""
        ...

    def list_page(self, project: str, *, after: str | None, limit: int) -> tuple[list[BatchRecord], bool]:
        """Newest first; `after` is the id of the last batch of the previous page.
        Returns (records, has_more)."""
        ...

    def save(self, record: BatchRecord) -> None:
        """Write back a record changed by the state machine. Raises StaleRecord when
        the stored revision differs from record.revision (re-read and decide again)."""
        ...

    def request_cancel(self, project: str, batch_id: str) -> BatchRecord | None:
        """Mark cancel requested (atomically); None when absent."""
        ...

    def unfinished(self) -> Iterator[BatchRecord]:
        """Every batch of every project the driver must still look at: not yet terminal,
        or terminal with its clean-up pending (`cleanup_pending`)."""
        ...
