"""Cluster mode's batch listing: a per-project index and the archive, in object storage.

Why an index: the API lists batches newest first, and a Kubernetes list returns objects
in key order (namespace/name) only. Batch object names are `batch-<ULID>`, so key order
is creation order, oldest first: reading a newest-first page from the API server means
reading every Batch of the project. Renaming objects (an inverted ULID) would make
`kubectl get batch <name>` disagree with the API's batch id, and labels cannot be
ordered by the server. So each batch gets one empty index object whose key is its id
with the ULID inverted digit by digit: lexicographic key order is newest first, and a
page is one `list_page(start_after=<cursor>, limit=<page>)` of that flat folder — O(page).

    projects/<p>/batch-index/<inverted ULID>     empty; written before the resource
    projects/<p>/batch-archive/<batch_id>.json   a terminal batch moved out of etcd

The index covers live and archived batches alike, so archiving never reorders a list.
An entry with neither a resource nor an archive (a create that crashed, a Batch deleted
with kubectl) is skipped, and pruned once it is older than `DANGLING_GRACE_SECONDS`.
"""

from __future__ import annotations

from vbatch.core.ids import is_batch_id
from vbatch.core.schemas import BatchRecord
from vbatch.core.storage.base import ObjectNotFound, ObjectStore

_ULID_DIGITS = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32, in ASCII order
_INVERT = str.maketrans(_ULID_DIGITS, _ULID_DIGITS[::-1])
# An entry this old without a resource or archive is not a create in flight.
DANGLING_GRACE_SECONDS = 3600


def index_prefix(project: str) -> str:
    return f"projects/{project}/batch-index/"


def archive_key(project: str, batch_id: str) -> str:
    return f"projects/{project}/batch-archive/{batch_id}.json"


def index_key(project: str, batch_id: str) -> str:
    """Keys sort newest batch first: each ULID digit d becomes 31 - d."""
    if not is_batch_id(batch_id):
        raise ValueError(f"not a batch id: {batch_id!r}")
    return index_prefix(project) + batch_id.removeprefix("batch_").translate(_INVERT)


def batch_id_from_index_key(key: str) -> str:
    return "batch_" + key.rsplit("/", 1)[-1].translate(_INVERT)


def created_ms(batch_id: str) -> int:
    """The ULID's timestamp (ms since the epoch): when the id was made."""
    value = 0
    for ch in batch_id.removeprefix("batch_")[:10]:
        value = value * 32 + _ULID_DIGITS.index(ch)
    return value


class BatchIndex:
    """The index and the archive of one object store."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def add(self, project: str, batch_id: str) -> None:
        """Idempotent: the same empty object under the same key."""
        self.store.put_bytes(index_key(project, batch_id), b"")

    def remove(self, project: str, batch_id: str) -> None:
        self.store.delete(index_key(project, batch_id))

    def ids_after(self, project: str, after: str | None, limit: int) -> list[str]:
        """Up to `limit` batch ids, newest first, older than `after` (when given)."""
        start = index_key(project, after) if after is not None and is_batch_id(after) else None
        keys = self.store.list_page(index_prefix(project), start_after=start, limit=limit)
        return [batch_id_from_index_key(k) for k in keys]

    # --- the archive -------------------------------------------------------------

    def archive(self, record: BatchRecord) -> None:
        """Write the record (whole, as the API last showed it) and make sure it is indexed."""
        data = record.model_dump_json(exclude={"revision"}).encode()
        self.store.put_bytes(archive_key(record.project, record.id), data)
        self.add(record.project, record.id)

    def archived(self, project: str, batch_id: str) -> BatchRecord | None:
        if not is_batch_id(batch_id):
            return None
        try:
            data = self.store.get_bytes(archive_key(project, batch_id))
        except ObjectNotFound:
            return None
        record = BatchRecord.model_validate_json(data)
        return record if record.project == project else None
