"""The operator's archiver decides alone when a Batch leaves etcd: only finished, cleaned
up, past its retention; the archive is written before the resource goes."""

from __future__ import annotations

import pytest
from vbatch.core.batch_index import BatchIndex
from vbatch.core.batch_resource import resource_from_record
from vbatch.core.batch_store import StaleRecord
from vbatch.core.ids import new_batch_id
from vbatch.core.schemas import BatchRecord, BatchStatus
from vbatch.core.storage.local import LocalObjectStore
from vbatch.operator.archive import BatchArchiver, ended_at

ENDED = 1_700_000_000


class FakeKube:
    def __init__(self, obj: dict | None, *, conflict: bool = False) -> None:
        self.obj, self.conflict, self.deleted = obj, conflict, []
        self.archive_seen_at_delete: bool | None = None
        self.index: BatchIndex | None = None

    def get_batch(self, name: str) -> dict | None:
        return self.obj

    def delete_batch(self, name: str, resource_version: str) -> bool:
        record_id = self.obj["metadata"]["annotations"]["vbatch.dev/batch-id"]
        self.archive_seen_at_delete = self.index.archived("p", record_id) is not None
        if self.conflict:
            raise StaleRecord(name)
        self.deleted.append((name, resource_version))
        return True


def record(status=BatchStatus.COMPLETED, **kw) -> BatchRecord:
    fields = dict(id=new_batch_id(), project="p", endpoint="/v1/chat/completions", input_file_id="file-x",
                  completion_window="24h", status=status, created_at=ENDED - 100, revision="5")
    if status.is_terminal:
        fields[f"{status.value}_at"] = ENDED
    return BatchRecord(**(fields | kw))


def archiver(tmp_path, obj, retention=60, **kw):
    kube = FakeKube(obj, **kw)
    index = BatchIndex(LocalObjectStore(tmp_path))
    kube.index = index
    return BatchArchiver(kube, index, retention), kube, index


@pytest.mark.parametrize("status", [BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED,
                                    BatchStatus.CANCELLED])
def test_a_finished_batch_past_retention_is_archived_then_deleted(tmp_path, status):
    rec = record(status)
    archive, kube, index = archiver(tmp_path, resource_from_record(rec, "ns"))
    assert ended_at(rec) == ENDED
    assert archive.archive_if_due("b", now=ENDED + 61)
    assert kube.archive_seen_at_delete is True and kube.deleted == [("b", "5")]
    assert index.archived("p", rec.id) == rec.model_copy(update={"revision": None})
    assert index.ids_after("p", None, 5) == [rec.id]


@pytest.mark.parametrize(("rec", "now", "retention", "extra_status"), [
    (record(), ENDED + 59, 60, {}),                                    # not old enough yet
    (record(BatchStatus.IN_PROGRESS), ENDED + 10**6, 60, {}),          # still running
    (record(BatchStatus.CANCELLING), ENDED + 10**6, 60, {}),
    (record(), ENDED + 10**6, 60, {"jobName": "b-shards"}),            # clean-up pending
    (record(), ENDED + 10**6, 0, {}),                                  # retention 0: keep all
])
def test_batches_that_are_not_due_stay(tmp_path, rec, now, retention, extra_status):
    obj = resource_from_record(rec, "ns")
    obj["status"].update(extra_status)
    archive, kube, index = archiver(tmp_path, obj, retention)
    assert not archive.archive_if_due("b", now=now)
    assert kube.deleted == [] and index.archived("p", rec.id) is None


def test_a_batch_that_changed_meanwhile_is_not_deleted(tmp_path):
    rec = record()
    archive, kube, _ = archiver(tmp_path, resource_from_record(rec, "ns"), conflict=True)
    assert not archive.archive_if_due("b", now=ENDED + 61)
    assert kube.deleted == []  # the next tick archives it again from a fresh read


def test_a_gone_batch_is_nothing_to_do(tmp_path):
    archive, kube, _ = archiver(tmp_path, None)
    assert not archive.archive_if_due("b", now=ENDED + 10**6)


def test_applied_batches_are_indexed(tmp_path):
    rec = record(BatchStatus.VALIDATING)
    archive, _, index = archiver(tmp_path, None)
    body = resource_from_record(rec, "ns")
    archive.index_batch(body)
    archive.index_batch(body)  # idempotent
    assert index.ids_after("p", None, 5) == [rec.id]
    archive.index_batch({"metadata": {"name": "not-a-batch"}, "spec": {"project": "p"}})
    archive.index_batch({"metadata": {"name": body["metadata"]["name"]}, "spec": {"project": "../x"}})
    assert index.ids_after("p", None, 5) == [rec.id]
