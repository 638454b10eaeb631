"""The batch archive and O(page) listing in the emulated cluster: finished Batches older
than the retention leave etcd for object storage, and the gateway's store still gets
and lists them, newest first, with the same fields; the API server keeps only live ones."""

from __future__ import annotations

import time

import pytest
from api_server import chat_line, jsonl
from kube.harness import BATCH_API, ClusterEnv, wait_for
from vbatch.core import state
from vbatch.core.batch_resource import record_from_resource
from vbatch.core.errors import Conflict
from vbatch.core.ids import batch_object_name, new_batch_id
from vbatch.core.schemas import FilePurpose
from vbatch.operator.cr_store import KubeBatchStore

pytestmark = pytest.mark.cluster

PROJECT = "team-a"


def new_record(file_id: str):
    return state.new_batch(project=PROJECT, input_file_id=file_id, endpoint="/v1/chat/completions",
                           completion_window="24h", metadata={"k": "v"}, total=3, model="test-model",
                           window_seconds=3600, now=int(time.time()))


def live_names(env: ClusterEnv) -> set[str]:
    return {o["metadata"]["name"] for o in env.cluster.list(BATCH_API, "Batch")}


def last_stored(env: ClusterEnv, batch_id: str):
    """The Batch as etcd last held it before it was deleted."""
    versions = [v for v in env.cluster.history(BATCH_API, "Batch", batch_object_name(batch_id)) if v is not None]
    return record_from_resource(versions[-1])


def all_pages(store: KubeBatchStore, limit: int) -> list[list[str]]:
    pages, after = [], None
    while True:
        page, more = store.list_page(PROJECT, after=after, limit=limit)
        pages.append([r.id for r in page])
        if not more:
            return pages
        after = page[-1].id


def test_finished_batches_move_to_the_archive_and_still_read_and_list(cluster_env: ClusterEnv):
    env = cluster_env
    env.configure(VBATCH_BATCH_RETENTION_SECONDS=1, VBATCH_ARCHIVE_INTERVAL=0.3)
    store = KubeBatchStore.from_settings(env.settings)
    file_id = env.files.create(PROJECT, iter([jsonl([chat_line(f"r{i}") for i in range(3)])]), filename="in.jsonl",
                               purpose=FilePurpose.BATCH).id
    first, second = new_record(file_id), new_record(file_id)
    store.create(first)
    store.create(second)
    with env.operator(), env.job_runner():
        # A Batch applied with kubectl (no gateway, no labels) is indexed by the operator.
        applied = new_batch_id()
        env.cluster.create({"apiVersion": BATCH_API, "kind": "Batch", "metadata": {"name": batch_object_name(applied)},
                            "spec": {"inputFileId": file_id, "endpoint": "/v1/chat/completions",
                                     "completionWindow": "24h", "project": PROJECT}})
        archived = {first.id, second.id, applied}
        wait_for(lambda: live_names(env), lambda names: not names & {batch_object_name(i) for i in archived}, 90)
    # A batch created while no operator runs stays live (validating).
    live = new_record(file_id)
    store.create(live)
    assert live_names(env) == {batch_object_name(live.id)}  # what `kubectl get batches` lists

    for batch_id in archived:
        got = store.get(PROJECT, batch_id)
        assert got is not None and got.status == "completed" and got.request_counts.completed == 3
        assert got.to_wire() == last_stored(env, batch_id).to_wire()  # the same fields as before
        assert env.working_objects(PROJECT, batch_id) == []
        assert store.get("other-project", batch_id) is None
        with pytest.raises(Conflict):
            store.request_cancel(PROJECT, batch_id)  # it has ended: same answer as a live finished one

    newest_first = sorted([*archived, live.id], reverse=True)
    assert all_pages(store, 10) == [newest_first]
    assert all_pages(store, 1) == [[i] for i in newest_first]
    assert sum(all_pages(store, 3), []) == newest_first
    assert store.list_page("other-project", after=None, limit=10) == ([], False)
    assert {r.id for r in store.unfinished()} == {live.id}


def test_nothing_is_archived_before_its_retention(cluster_env: ClusterEnv):
    env = cluster_env
    env.configure(VBATCH_BATCH_RETENTION_SECONDS=3600, VBATCH_ARCHIVE_INTERVAL=0.2)
    store = KubeBatchStore.from_settings(env.settings)
    file_id = env.files.create(PROJECT, iter([jsonl([chat_line("r0")])]), filename="in.jsonl",
                               purpose=FilePurpose.BATCH).id
    record = new_record(file_id)
    store.create(record)
    with env.operator(), env.job_runner():
        applied = new_batch_id()  # applied with kubectl: listed once the operator indexed it
        env.cluster.create({"apiVersion": BATCH_API, "kind": "Batch", "metadata": {"name": batch_object_name(applied)},
                            "spec": {"inputFileId": file_id, "endpoint": "/v1/chat/completions",
                                     "completionWindow": "24h", "project": PROJECT}})
        listed = wait_for(lambda: [r.id for r in store.list_page(PROJECT, after=None, limit=10)[0]],
                          lambda ids: applied in ids, 30)
        env.wait_settled(record.id)
        env.wait_settled(applied)
        time.sleep(1.0)  # several archive ticks
    assert listed == sorted([record.id, applied], reverse=True)
    assert live_names(env) == {batch_object_name(record.id), batch_object_name(applied)}
    assert [r.status for r in store.list_page(PROJECT, after=None, limit=10)[0]] == ["completed", "completed"]


def test_a_deleted_batch_leaves_the_listing(cluster_env: ClusterEnv):
    env = cluster_env
    store = KubeBatchStore.from_settings(env.settings)
    records = [new_record("file-" + "a" * 24) for _ in range(3)]
    for record in records:
        store.create(record)
    env.cluster.delete(BATCH_API, "Batch", batch_object_name(records[1].id))
    assert store.get(PROJECT, records[1].id) is None
    page, more = store.list_page(PROJECT, after=None, limit=2)
    assert [r.id for r in page] == sorted([records[0].id, records[2].id], reverse=True) and not more
