"""Merging and the lifecycle steps: every input line ends in exactly one result
file, whatever crashes, retries, duplicates, cancels or failed shards happened."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vbatch.core import lifecycle, state
from vbatch.core.config import Settings
from vbatch.core.files import FileService
from vbatch.core.layout import part_key
from vbatch.core.merge import merge_shards
from vbatch.core.schemas import BatchStatus, FilePurpose
from vbatch.core.sharding import estimate_tokens, shard_count_for, write_shards
from vbatch.core.storage.local import LocalObjectStore

P, B = "proj", "batch_01JABCDEFGHJKMNPQRSTVWXYZ0"


def request_line(custom_id: str, text: str = "hi") -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": text}]}
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


def result(custom_id: str, status: int = 200, prompt: int = 3, completion: int = 2) -> dict:
    body = {"usage": {"prompt_tokens": prompt, "completion_tokens": completion}} if status == 200 else {"error": {"message": "bad"}}
    return {"id": f"batch_req_{custom_id}", "custom_id": custom_id, "response": {"status_code": status, "request_id": "req_1", "body": body}, "error": None}


def write_part(store, shard, k, results):
    store.put_bytes(part_key(P, B, shard, k), b"".join(orjson.dumps(r) + b"\n" for r in results))


def read_lines(fh):
    return [orjson.loads(line) for line in fh.read().splitlines() if line]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 40),
    shards=st.integers(1, 4),
    outcomes=st.lists(st.sampled_from(["none", "ok", "err", "dup"]), min_size=40, max_size=40),
    failed=st.sets(st.integers(0, 3), max_size=2),
    code=st.sampled_from(["batch_cancelled", "batch_expired", "shard_failed"]),
)
def test_every_line_in_exactly_one_file(tmp_path_factory, n, shards, outcomes, failed, code):
    store = LocalObjectStore(tmp_path_factory.mktemp("s"))
    ids = [f"c{i}" for i in range(n)]
    shards = min(shards, n)
    write_shards(store, P, B, (request_line(c) for c in ids), shards)
    by_shard = {}
    for s in range(shards):
        for line in store.get_bytes(f"projects/{P}/batches/{B}/shards/{s}.jsonl").splitlines():
            by_shard.setdefault(s, []).append(orjson.loads(line)["custom_id"])
    expected_ok = set()
    for s, members in by_shard.items():
        results = []
        for c in members:
            outcome = outcomes[int(c[1:])]
            if outcome in ("ok", "dup"):
                results.append(result(c))
                expected_ok.add(c)
            elif outcome == "err":
                results.append(result(c, status=400))
        # split into parts; "dup" results are written again in a later part (a retried pod)
        write_part(store, s, 0, results[: len(results) // 2])
        write_part(store, s, 1, results[len(results) // 2 :])
        write_part(store, s, 2, [r for r in results if outcomes[int(r["custom_id"][1:])] == "dup"] + [result("stranger")])

    merged = merge_shards(store, P, B, shards, missing_code=code, failed_shards=frozenset(f for f in failed if f < shards))
    out, err = read_lines(merged.output), read_lines(merged.errors)
    merged.close()
    seen = [line["custom_id"] for line in out + err]
    assert sorted(seen) == sorted(ids)  # exactly once each, and no stranger
    assert {line["custom_id"] for line in out} == expected_ok
    assert merged.counts.total == n and merged.counts.completed + merged.counts.failed == n
    assert merged.usage.input_tokens == 3 * len(expected_ok)
    for line in err:
        if line["response"] is None:
            owner = next(s for s, m in by_shard.items() if line["custom_id"] in m)
            assert line["error"]["code"] == ("shard_failed" if owner in failed else code)


def test_sharding_balances_by_estimated_tokens(tmp_path):
    store = LocalObjectStore(tmp_path)
    # a few huge requests and many small ones: line-count balance would be lopsided
    lines = [request_line(f"big{i}", "x" * 40_000) for i in range(4)] + [request_line(f"s{i}") for i in range(400)]
    estimated = write_shards(store, P, B, iter(lines), 4)
    assert max(estimated) < 1.3 * min(estimated)
    assert estimate_tokens({"messages": [{"content": "abcd" * 10}], "max_tokens": 5, "n": 2}) == 10 + 4 + 10
    assert shard_count_for(10, target_requests=2000, max_shards=8) == 1
    assert shard_count_for(50_000, target_requests=2000, max_shards=8) == 8
    assert shard_count_for(3, target_requests=1, max_shards=8, requested=5) == 3


@pytest.fixture
def env(tmp_path):
    store = LocalObjectStore(tmp_path / "store")
    files = FileService(store)
    return store, files, Settings(data_dir=tmp_path, shard_target_requests=3)


def test_lifecycle_cancel_before_launch_writes_an_error_line_per_request(env):
    store, files, settings = env
    f = files.create(P, iter([request_line("a") + b"\r\n" + request_line("b") + b"\n\n"]), filename="in.jsonl", purpose=FilePurpose.BATCH)
    record = state.new_batch(project=P, input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                             metadata=None, total=2, model="m", window_seconds=60, now=1)
    record = state.request_cancel(record, 2)
    done = lifecycle.finish(store, files, record, missing_code="batch_cancelled", now=3)
    assert done.status == BatchStatus.CANCELLED and done.cancelled_at == 3
    assert done.output_file_id is None and done.request_counts.failed == 2
    meta, chunks = files.open(P, done.error_file_id)
    assert meta.purpose == FilePurpose.BATCH_OUTPUT and meta.is_error is True
    codes = {line["custom_id"]: line["error"]["code"] for line in map(orjson.loads, b"".join(chunks).splitlines())}
    assert codes == {"a": "batch_cancelled", "b": "batch_cancelled"}


def test_lifecycle_launch_progress_finish(env):
    store, files, settings = env
    ids = [f"r{i}" for i in range(7)]
    f = files.create(P, iter([b"\n".join(request_line(c) for c in ids)]), filename=None, purpose=FilePurpose.BATCH)
    record = state.new_batch(project=P, input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                             metadata=None, total=7, model="m", window_seconds=60, now=1)
    record = lifecycle.launch(store, files, record, settings)
    assert record.shard_count == 3  # 7 requests, 3 per shard
    for s in range(3):
        members = [orjson.loads(x)["custom_id"] for x in store.get_bytes(f"projects/{P}/batches/{record.id}/shards/{s}.jsonl").splitlines()]
        store.put_bytes(part_key(P, record.id, s, 0), b"".join(orjson.dumps(result(c)) + b"\n" for c in members))
    done = lifecycle.finish(store, files, record, missing_code="shard_failed", now=9)
    assert done.status == BatchStatus.COMPLETED and done.finalizing_at == 9
    assert done.request_counts.model_dump() == {"total": 7, "completed": 7, "failed": 0}
    assert done.usage.total_tokens == 7 * 5 and done.error_file_id is None
    # a finalize re-run after a crash overwrites the same result file instead of adding one
    again = lifecycle.finish(store, files, record, missing_code="shard_failed", now=10)
    assert again.output_file_id == done.output_file_id
    assert len(files.list(P, purpose="batch_output")[0]) == 1
    lifecycle.remove_working_data(store, done)
    assert list(store.list(f"projects/{P}/batches/")) == []
    assert files.get(P, done.output_file_id).bytes > 0


def test_validate_refuses_metadata_the_gateway_would_refuse(env):
    """A Batch applied with kubectl skips the gateway: the drivers' VALIDATE step
    applies the same metadata limits (the CRD cannot bound key length)."""
    store, files, settings = env
    f = files.create(P, iter([request_line("a")]), filename=None, purpose=FilePurpose.BATCH)
    record = state.new_unvalidated_batch(project=P, input_file_id=f.id, endpoint="/v1/chat/completions",
                                         completion_window="24h", metadata={"k" * 65: "v"}, window_seconds=60, now=1)
    failed = lifecycle.validate(files, record, served_models=None, limits=settings.limits, now=2)
    assert failed.status == BatchStatus.FAILED
    assert failed.errors.data[0].code == "invalid_metadata" and "64 characters" in failed.errors.data[0].message
    ok = lifecycle.validate(files, record.model_copy(update={"metadata": {"k" * 64: "v"}}), served_models=None,
                            limits=settings.limits, now=2)
    assert ok.status == BatchStatus.IN_PROGRESS and ok.request_counts.total == 1


def test_a_storage_outage_during_validation_is_not_a_verdict(env):
    """Only a missing input file fails a batch; an unreachable store raises, so the
    driver retries the step later instead of failing the batch for good."""
    from vbatch.core.errors import StorageError

    store, files, settings = env
    f = files.create(P, iter([request_line("a")]), filename=None, purpose=FilePurpose.BATCH)
    record = state.new_unvalidated_batch(project=P, input_file_id=f.id, endpoint="/v1/chat/completions",
                                         completion_window="24h", metadata=None, window_seconds=60, now=1)

    class Down(FileService):
        def open(self, project, file_id):
            raise StorageError("object storage unreachable")

    with pytest.raises(StorageError):
        lifecycle.validate(Down(store), record, served_models=None, limits=settings.limits, now=2)
    missing = record.model_copy(update={"input_file_id": "file-" + "0" * 24})
    assert lifecycle.validate(files, missing, served_models=None, limits=settings.limits, now=2).status == BatchStatus.FAILED
