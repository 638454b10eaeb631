"""Behaviour of the core that mutation testing found unchecked (issue 14).

Each test states what a user of the service would notice if it broke: a batch
that ends in the wrong status, a shard plan that ignores what was asked, a line
refused at exactly the limit, usage miscounted, an error message that dumps a
megabyte of user input.
"""

from __future__ import annotations

import tempfile

import orjson
import pytest
from vbatch.core import lifecycle, merge, state
from vbatch.core.config import Limits, Settings
from vbatch.core.errors import StorageError
from vbatch.core.files import FileService
from vbatch.core.layout import part_key, shard_key
from vbatch.core.merge import merge_shards, missing_result
from vbatch.core.schemas import CHAT_COMPLETIONS, BatchStatus, FilePurpose
from vbatch.core.sharding import estimate_tokens, normalized_lines, shard_count_for, write_shards
from vbatch.core.storage.local import LocalObjectStore
from vbatch.core.validation import validate_jsonl

P = "proj"
BOM = b"\xef\xbb\xbf"
MODEL = "m"


def request(custom_id: str, text: str = "hi", **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT_COMPLETIONS,
            "body": {"model": MODEL, "messages": [{"role": "user", "content": text}], **body}}


def line(custom_id: str, text: str = "hi", **body) -> bytes:
    return orjson.dumps(request(custom_id, text, **body))


def ok_result(custom_id: str, usage: dict | None = None, body: dict | None = None) -> dict:
    if body is None:
        body = {"usage": usage} if usage is not None else {}
    return {"id": f"batch_req_{custom_id}", "custom_id": custom_id, "error": None,
            "response": {"status_code": 200, "request_id": "req_1", "body": body}}


@pytest.fixture
def env(tmp_path):
    store = LocalObjectStore(tmp_path / "store")
    return store, FileService(store), Settings(data_dir=tmp_path)


def new_batch(files: FileService, data: bytes, total: int):
    f = files.create(P, iter([data]), filename=None, purpose=FilePurpose.BATCH)
    return state.new_batch(project=P, input_file_id=f.id, endpoint=CHAT_COMPLETIONS, completion_window="24h",
                           metadata=None, total=total, model=MODEL, window_seconds=60, now=1)


def shard_ids(store, batch_id: str, shard: int) -> list[str]:
    return [orjson.loads(x)["custom_id"] for x in store.get_bytes(shard_key(P, batch_id, shard)).splitlines()]


def result_lines(files: FileService, file_id: str) -> list[dict]:
    _, chunks = files.open(P, file_id)
    return [orjson.loads(x) for x in b"".join(chunks).splitlines()]


# --- 1. a one-shard batch whose only shard failed ends failed -----------------------


def test_single_shard_batch_whose_shard_failed_ends_failed(env):
    store, files, settings = env
    record = lifecycle.launch(store, files, new_batch(files, line("a") + b"\n" + line("b"), total=2), settings)
    assert record.shard_count == 1  # small batches have one shard
    done = lifecycle.finish(store, files, record, missing_code="shard_failed", failed_shards=frozenset({0}), now=5)
    assert done.status == BatchStatus.FAILED and done.failed_at == 5
    assert done.request_counts.model_dump() == {"total": 2, "completed": 0, "failed": 2}
    assert [e.code for e in done.errors.data] == ["shard_failed"]
    assert {r["custom_id"]: r["error"]["code"] for r in result_lines(files, done.error_file_id)} == {
        "a": "shard_failed", "b": "shard_failed"}


def test_outcome_is_failed_only_when_every_shard_failed():
    assert state.outcome_status(1, 1) == BatchStatus.FAILED
    assert state.outcome_status(1, 0) == BatchStatus.COMPLETED
    assert state.outcome_status(2, 1) == BatchStatus.COMPLETED
    # nothing was run, so nothing failed (a batch finalized with no shards at all)
    assert state.outcome_status(0, 0) == BatchStatus.COMPLETED


# --- 2. the requested shard count is honoured -------------------------------------


def test_requested_shard_count_wins_over_the_target_size():
    # 100 requests fit one 2,000-request shard, but 4 were asked for
    assert shard_count_for(100, target_requests=2000, max_shards=8) == 1
    assert shard_count_for(100, target_requests=2000, max_shards=8, requested=4) == 4
    assert shard_count_for(100, target_requests=10, max_shards=20, requested=3) == 3
    # within bounds: never more than max_shards, never more shards than requests
    assert shard_count_for(100, target_requests=2000, max_shards=8, requested=50) == 8
    assert shard_count_for(2, target_requests=2000, max_shards=8, requested=5) == 2
    assert shard_count_for(1, target_requests=2000, max_shards=8, requested=5) == 1
    # without a request: one shard per target_requests, rounded up
    assert shard_count_for(4001, target_requests=2000, max_shards=8) == 3
    assert shard_count_for(4000, target_requests=2000, max_shards=8) == 2
    assert shard_count_for(0, target_requests=2000, max_shards=8) == 1
    assert shard_count_for(5, target_requests=0, max_shards=8) == 5  # a zero target is one request per shard


def test_launch_writes_the_requested_number_of_shards(env):
    store, files, settings = env
    ids = [f"r{i}" for i in range(6)]
    record = new_batch(files, b"\n".join(line(c) for c in ids), total=6)
    launched = lifecycle.launch(store, files, record, settings, requested=3)
    assert launched.shard_count == 3
    members = [shard_ids(store, record.id, s) for s in range(3)]
    assert sorted(c for m in members for c in m) == ids and all(len(m) == 2 for m in members)
    assert not store.exists(shard_key(P, record.id, 3))
    capped = lifecycle.launch(store, files, record, settings, requested=5, max_shards=2)
    assert capped.shard_count == 2


# --- 3. the BOM is stripped before sharding ----------------------------------------


@pytest.mark.parametrize("cut", [1, 2, 3, 4, 10, None])
def test_bom_is_stripped_from_the_first_request_line(cut):
    data = BOM + line("a") + b"\r\n\r\n" + line("b") + b"\n"
    chunks = [data] if cut is None else [data[:cut], data[cut:]]
    lines = list(normalized_lines(chunks))
    assert [orjson.loads(x)["custom_id"] for x in lines] == ["a", "b"]
    assert lines[0] == line("a")  # no BOM, no CR left on the line


def test_bom_alone_on_the_first_line_is_a_blank_line():
    assert list(normalized_lines([BOM + b"\n" + line("a")])) == [line("a")]
    # only the file's first bytes are a BOM; a later line is passed on as is
    assert list(normalized_lines([line("a") + b"\n" + BOM + b"x"])) == [line("a"), BOM + b"x"]


def test_a_batch_whose_file_starts_with_a_bom_launches_and_merges(env):
    store, files, settings = env
    data = BOM + line("a") + b"\n" + line("b") + b"\n"
    report = validate_jsonl([data], endpoint=CHAT_COMPLETIONS, served_models=None, limits=Limits())
    assert report.ok and report.total == 2  # validation accepts the BOM ...
    record = lifecycle.launch(store, files, new_batch(files, data, total=2), settings)
    assert shard_ids(store, record.id, 0) == ["a", "b"]  # ... so sharding must strip it
    done = lifecycle.finish(store, files, record, missing_code="batch_cancelled", now=3)
    assert sorted(r["custom_id"] for r in result_lines(files, done.error_file_id)) == ["a", "b"]


# --- 4. sharding balances by request size -----------------------------------------


def test_sharding_balances_interleaved_sizes_that_round_robin_would_not(tmp_path):
    store = LocalObjectStore(tmp_path)
    # big, small, big, small, ...: dealing lines out in turn would put every big
    # request on shard 0; balancing by estimated tokens splits them
    lines = [line(f"{kind}{i}", "x" * (40_000 if kind == "big" else 4), max_tokens=10)
             for i in range(20) for kind in ("big", "small")]
    estimated = write_shards(store, P, "b1", iter(lines), 2)
    members = [shard_ids(store, "b1", s) for s in range(2)]
    bigs = [sum(c.startswith("big") for c in m) for m in members]
    assert bigs == [10, 10]
    # what is returned is the estimate of what was written to each shard
    by_id = {orjson.loads(x)["custom_id"]: estimate_tokens(orjson.loads(x)["body"]) for x in lines}
    assert estimated == [sum(by_id[c] for c in m) for m in members]
    assert max(estimated) < 1.1 * min(estimated)


def test_sharding_spreads_equal_requests_evenly_and_writes_every_line(tmp_path):
    store = LocalObjectStore(tmp_path)
    lines = [line(f"r{i}") for i in range(9)]
    estimated = write_shards(store, P, "b2", iter(lines), 3)
    members = [shard_ids(store, "b2", s) for s in range(3)]
    assert [len(m) for m in members] == [3, 3, 3]
    assert sorted(c for m in members for c in m) == sorted(f"r{i}" for i in range(9))
    assert estimated == [3 * estimate_tokens(request("r")["body"])] * 3
    # a shard with no requests is still written (every planned shard has an object)
    assert write_shards(store, P, "b3", iter(lines[:1]), 2)[1] == 0
    assert store.get_bytes(shard_key(P, "b3", 1)) == b""


def test_estimate_tokens_reads_prompt_length_completion_budget_and_choices():
    def est(**body):
        return estimate_tokens(body)

    text = "abcd" * 10  # 40 characters: 10 tokens, plus 4 per message
    assert est(messages=[{"content": text}], max_tokens=5) == 10 + 4 + 5
    assert est(messages=[{"content": text}], max_tokens=5, n=3) == 14 + 15
    assert est(messages=[{"content": text}], max_completion_tokens=7, max_tokens=5) == 14 + 7
    assert est(messages=[{"content": text}]) == 14 + 256  # no budget: the default guess
    assert est(messages=[{"content": text}], max_tokens="lots") == 14 + 256  # never raises
    assert est(messages=[{"content": text}], n=None, max_tokens=1) == 14 + 1
    # content as parts: only the text parts count
    parts = [{"type": "text", "text": "abcd" * 3}, {"type": "image_url", "image_url": {}}, "junk", {"text": 5}]
    assert est(messages=[{"content": parts}], max_tokens=1) == 3 + 4 + 1
    assert est(messages=[{"content": None}, "not a message"], max_tokens=1) == 8 + 1
    assert est(messages=[{"content": None}] * 4, max_tokens=1) == 16 + 1  # no text: no characters
    assert est(messages="not a list", max_tokens=1) == 1
    assert estimate_tokens(["not", "a", "dict"]) == 256
    assert est(messages=[{"content": "abc"}], max_tokens=1) == 0 + 4 + 1  # 3 characters round down


# --- 5. usage in the merge: cached tokens, and results without usage ---------------


def write_part(store, batch_id, shard, k, results):
    store.put_bytes(part_key(P, batch_id, shard, k), b"".join(orjson.dumps(r) + b"\n" for r in results))


def test_merge_sums_cached_tokens_and_defaults_missing_usage_to_zero(tmp_path):
    store = LocalObjectStore(tmp_path)
    ids = ["a", "b", "c", "d", "e"]
    write_shards(store, P, "b1", (line(c) for c in ids), 1)
    write_part(store, "b1", 0, 0, [
        ok_result("a", {"prompt_tokens": 10, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 6}}),
        ok_result("b", {"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 2}}),
        ok_result("c", {"prompt_tokens": 1, "completion_tokens": None, "prompt_tokens_details": None}),
        ok_result("d", body={}),  # no usage at all
        ok_result("e", body=None),  # no body at all
    ])
    merged = merge_shards(store, P, "b1", 1)
    try:
        assert merged.counts.model_dump() == {"total": 5, "completed": 5, "failed": 0}
        usage = merged.usage
        assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (16, 5, 21)
        assert usage.input_tokens_details.cached_tokens == 8
    finally:
        merged.close()


def test_finish_reports_the_merged_usage_on_the_batch(env):
    store, files, settings = env
    record = lifecycle.launch(store, files, new_batch(files, line("a") + b"\n" + line("b"), total=2), settings)
    write_part(store, record.id, 0, 0, [
        ok_result("a", {"prompt_tokens": 7, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 4}}),
        ok_result("b", body={}),
    ])
    done = lifecycle.finish(store, files, record, missing_code="shard_failed", now=4)
    assert done.status == BatchStatus.COMPLETED
    assert (done.usage.input_tokens, done.usage.output_tokens, done.usage.total_tokens) == (7, 3, 10)
    assert done.usage.input_tokens_details.cached_tokens == 4


# --- 6. the error line of a request that never ran -----------------------------------


@pytest.mark.parametrize(("code", "words"), [
    ("batch_cancelled", "cancelled"), ("batch_expired", "completion window"), ("shard_failed", "failed")])
def test_error_line_for_a_request_that_never_ran(tmp_path, code, words):
    store = LocalObjectStore(tmp_path)
    write_shards(store, P, "b1", (line(c) for c in ("a", "b")), 1)
    merged = merge_shards(store, P, "b1", 1, missing_code=code)
    try:
        assert merged.output.read() == b""
        errors = [orjson.loads(x) for x in merged.errors.read().splitlines()]
    finally:
        merged.close()
    assert [e["custom_id"] for e in errors] == ["a", "b"]
    for e in errors:
        assert e["response"] is None
        assert e["error"]["code"] == code
        assert words in e["error"]["message"] and e["error"]["message"] != code
        assert e["id"].startswith("batch_req_") and len(e["id"]) > len("batch_req_")
    assert errors[0]["id"] != errors[1]["id"]  # every result line has its own id


def test_an_unknown_reason_is_its_own_message():
    result = missing_result("x", "engine_gone")
    assert result["error"] == {"code": "engine_gone", "message": "engine_gone"}
    assert result["custom_id"] == "x" and result["response"] is None


# --- 7. the line-size boundary ---------------------------------------------------------


def padded(custom_id: str, size: int) -> bytes:
    """A valid request line of exactly `size` bytes."""
    bare = line(custom_id, "")
    out = line(custom_id, "x" * (size - len(bare)))
    assert len(out) == size
    return out


LIMIT = 300


@pytest.mark.parametrize("chunk", [1, 7, 64, LIMIT - 1, LIMIT, LIMIT + 1, LIMIT + 2, 5000])
@pytest.mark.parametrize("last_newline", [True, False])
def test_a_line_of_exactly_max_line_bytes_is_accepted(chunk, last_newline):
    data = padded("a", LIMIT) + b"\n" + padded("b", LIMIT) + b"\n" + padded("c", LIMIT) + (b"\n" if last_newline else b"")
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    report = validate_jsonl(pieces, endpoint=CHAT_COMPLETIONS, served_models=None, limits=Limits(max_line_bytes=LIMIT))
    assert report.ok, report.problems
    assert report.total == 3


@pytest.mark.parametrize("chunk", [1, 7, 64, LIMIT - 1, LIMIT, LIMIT + 1, LIMIT + 2, 5000])
@pytest.mark.parametrize("where", [1, 2, 3])
@pytest.mark.parametrize("last_newline", [True, False])
def test_a_line_one_byte_over_max_line_bytes_is_refused(chunk, where, last_newline):
    lines = [padded(c, LIMIT + 1 if n == where else LIMIT) for n, c in enumerate("abc", 1)]
    data = b"\n".join(lines) + (b"\n" if last_newline else b"")
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    report = validate_jsonl(pieces, endpoint=CHAT_COMPLETIONS, served_models=None, limits=Limits(max_line_bytes=LIMIT))
    assert [(p.code, p.line) for p in report.problems] == [("line_too_large", where)]
    assert str(LIMIT) in report.problems[0].message
    assert report.total == 3


def test_a_bom_does_not_count_towards_the_first_line():
    data = BOM + padded("a", LIMIT) + b"\n"
    report = validate_jsonl([data[:2], data[2:]], endpoint=CHAT_COMPLETIONS, served_models=None,
                            limits=Limits(max_line_bytes=LIMIT))
    assert report.ok and report.total == 1


# --- 8. what counts as a success; a merge that fails ---------------------------------


def test_a_result_with_status_200_and_an_error_is_a_failure(tmp_path):
    store = LocalObjectStore(tmp_path)
    write_shards(store, P, "b1", (line(c) for c in ("a", "b", "c", "d")), 1)
    contradictory = ok_result("a", {"prompt_tokens": 9, "completion_tokens": 9})
    contradictory["error"] = {"code": "engine_error", "message": "boom"}
    no_body = {"id": "batch_req_b", "custom_id": "b", "response": "200", "error": None}  # not an object
    server_error = ok_result("c")
    server_error["response"]["status_code"] = 500
    write_part(store, "b1", 0, 0, [contradictory, no_body, server_error, ok_result("d", {"prompt_tokens": 1})])
    merged = merge_shards(store, P, "b1", 1)
    try:
        out = [orjson.loads(x)["custom_id"] for x in merged.output.read().splitlines()]
        err = [orjson.loads(x)["custom_id"] for x in merged.errors.read().splitlines()]
    finally:
        merged.close()
    assert (out, err) == (["d"], ["a", "b", "c"])
    assert merged.counts.model_dump() == {"total": 4, "completed": 1, "failed": 3}
    assert merged.usage.input_tokens == 1  # a failed result's usage is not counted


def test_result_lines_are_written_as_read_one_per_line(tmp_path):
    store = LocalObjectStore(tmp_path)
    write_shards(store, P, "b1", (line(c) for c in ("a", "b")), 1)
    raw_a = b'{"custom_id": "a",   "id": "batch_req_a", "error": null, "response": {"status_code": 200, "body": {}}}'
    raw_b = orjson.dumps(ok_result("b"))
    store.put_bytes(part_key(P, "b1", 0, 0), raw_a + b"\r\n\n" + raw_b)  # CRLF, a blank line, no final newline
    merged = merge_shards(store, P, "b1", 1)
    try:
        assert merged.output.read() == raw_a + b"\n" + raw_b + b"\n"
    finally:
        merged.close()


class FailingStore(LocalObjectStore):
    """A store that goes away while results are read."""

    def get_stream(self, key, chunk_size=1 << 20):
        if "/results/" in key:
            raise StorageError("object storage unreachable")
        return super().get_stream(key, chunk_size)

    def get_bytes(self, key):
        if "/results/" in key:
            raise StorageError("object storage unreachable")
        return super().get_bytes(key)


def test_a_merge_that_fails_raises_and_leaves_no_open_spool(tmp_path, monkeypatch):
    store = FailingStore(tmp_path)
    write_shards(store, P, "b1", (line(c) for c in ("a", "b")), 1)
    write_part(store, "b1", 0, 0, [ok_result("a")])
    spools, real = [], tempfile.TemporaryFile

    def tracked(*args, **kwargs):
        spools.append(real(*args, **kwargs))
        return spools[-1]

    monkeypatch.setattr(merge.tempfile, "TemporaryFile", tracked)
    with pytest.raises(StorageError):  # the driver retries the finalize; no half-merged result
        merge_shards(store, P, "b1", 1)
    assert len(spools) == 2 and all(s.closed for s in spools)


def test_a_finalize_whose_merge_fails_does_not_end_the_batch(tmp_path):
    store = FailingStore(tmp_path / "s")
    files = FileService(store)
    record = lifecycle.launch(store, files, new_batch(files, line("a"), total=1), Settings(data_dir=tmp_path))
    write_part(store, record.id, 0, 0, [ok_result("a")])
    with pytest.raises(StorageError):
        lifecycle.finish(store, files, record, missing_code="shard_failed", now=3)
    assert files.list(P, purpose="batch_output")[0] == []


# --- 9. early stops, and what `total` counts --------------------------------------------


class Recorded:
    """Chunks of a file, counting how many were read."""

    def __init__(self, lines: list[bytes]):
        self.lines, self.read = lines, 0

    def __iter__(self):
        for x in self.lines:
            self.read += 1
            yield x + b"\n"


def check(chunks, **limits):
    return validate_jsonl(chunks, endpoint=CHAT_COMPLETIONS, served_models=None, limits=Limits(**limits))


def test_reading_stops_at_the_first_request_over_the_limit():
    chunks = Recorded([line("a"), line("b"), line("c")] + [b"not json"] * 50)
    report = check(chunks, max_requests_per_batch=2)
    assert [(p.code, p.line) for p in report.problems] == [("too_many_requests", 3)]
    assert "more than 2 requests" in report.problems[0].message
    assert chunks.read == 3  # nothing after the line over the limit is read
    assert report.total == 3  # what was read


@pytest.mark.parametrize("broken", [b"not json", b"\xff\xfe", b"[1]", "too large"])
def test_broken_lines_count_towards_the_request_limit(broken):
    bad = b"q" * 400 if broken == "too large" else broken
    # the broken line is the limit's last request: still within the limit
    at_limit = check(iter([line("a") + b"\n", bad + b"\n"]), max_requests_per_batch=2, max_line_bytes=300)
    assert "too_many_requests" not in [p.code for p in at_limit.problems]
    assert at_limit.total == 2
    over = check(iter([line("a") + b"\n", bad + b"\n", bad + b"\n"]), max_requests_per_batch=2, max_line_bytes=300)
    assert ("too_many_requests", 3) in [(p.code, p.line) for p in over.problems]
    assert over.total == 3


def test_blank_lines_do_not_count_towards_the_request_limit():
    report = check(iter([line("a") + b"\n", b"\n", b"   \n", line("b") + b"\n"]), max_requests_per_batch=2)
    assert report.ok and report.total == 2


def test_reading_stops_once_enough_problems_are_found():
    lines = [orjson.dumps(request("a") | {"method": "GET"}), b"{oops", b"[]",
             orjson.dumps(request("b") | {"url": "/v1/x"}), line("c", stream=True)]
    chunks = Recorded(lines + [line(f"ok{i}") for i in range(100)])
    report = check(chunks)
    assert len(report.problems) == 5
    assert chunks.read == 5 and report.total == 5


def test_a_file_of_only_broken_lines_is_not_called_empty():
    report = check(iter([b"not json\n"]))
    assert [p.code for p in report.problems] == ["invalid_json"] and report.total == 1


# --- 10. user values in messages are cut to 80 characters ------------------------------


def test_long_user_values_are_cut_in_error_messages():
    long_id = "i" * 1000
    report = check(iter([line(long_id) + b"\n", line(long_id) + b"\n"]))
    message = report.problems[0].message
    assert report.problems[0].code == "duplicate_custom_id"
    shown = "'" + "i" * 76 + "..."  # repr cut to 77 characters plus an ellipsis: 80 in all
    assert shown in message and "i" * 77 not in message
    assert len(message) < 200


def test_a_user_value_of_exactly_80_characters_is_shown_whole():
    exact = "e" * 78  # its repr, quotes included, is 80 characters
    report = check(iter([line(exact) + b"\n", line(exact) + b"\n"]))
    assert f"'{exact}'" in report.problems[0].message
    over = "o" * 79
    report = check(iter([line(over) + b"\n", line(over) + b"\n"]))
    assert "'" + "o" * 76 + "..." in report.problems[0].message and over not in report.problems[0].message


@pytest.mark.parametrize(("field", "value", "code"), [
    ("method", "G" * 500, "invalid_method"), ("url", "/" + "u" * 500, "mismatched_url")])
def test_long_method_and_url_are_cut_too(field, value, code):
    report = check(iter([orjson.dumps(request("a") | {field: value}) + b"\n"]))
    problem = report.problems[0]
    assert problem.code == code and "..." in problem.message and value not in problem.message


def test_long_model_names_are_cut_in_model_messages():
    served = ("m",)
    report = validate_jsonl([line("a", model="z" * 300)], endpoint=CHAT_COMPLETIONS, served_models=served, limits=Limits())
    assert report.problems[0].code == "model_not_found" and "z" * 100 not in report.problems[0].message


# --- found by `make mutation` after the gaps above were closed ------------------------


def test_sharding_leaves_no_open_spool(tmp_path, monkeypatch):
    from vbatch.core import sharding

    spools, real = [], tempfile.TemporaryFile

    def tracked(*args, **kwargs):
        spools.append(real(*args, **kwargs))
        return spools[-1]

    monkeypatch.setattr(sharding.tempfile, "TemporaryFile", tracked)
    write_shards(LocalObjectStore(tmp_path), P, "b1", iter([line("a"), line("b")]), 3)
    assert len(spools) == 3 and all(s.closed for s in spools)


def test_missing_request_messages_are_sentences_that_say_why():
    for code, start in [("batch_cancelled", "The batch was cancelled"), ("batch_expired", "The batch's completion window"),
                        ("shard_failed", "The worker running this request failed")]:
        message = missing_result("x", code)["error"]["message"]
        assert message.startswith(start) and message.endswith(" before this request ran." if code != "shard_failed"
                                                                else " past its retry budget.")


def test_merge_defaults_to_shard_failed_and_tolerates_a_missing_shard_object(tmp_path):
    store = LocalObjectStore(tmp_path)
    write_shards(store, P, "b1", (line(c) for c in ("a", "b")), 1)
    # shard 1 was never written (its working data is gone): it contributes no lines
    merged = merge_shards(store, P, "b1", 2)
    try:
        errors = [orjson.loads(x) for x in merged.errors.read().splitlines()]
    finally:
        merged.close()
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("a", "shard_failed"), ("b", "shard_failed")]
    assert merged.counts.total == 2


def test_problem_messages_say_what_is_wrong():
    """The text users read in errors.data and the 400, per rule (after `line N: `)."""
    cases = [
        (b'{"custom_id": "b\xff"}', "invalid_encoding", "file is not valid UTF-8."),
        (b"not json", "invalid_json", "line is not valid JSON."),
        (b"[1]", "invalid_line", "each line must be a JSON object."),
        (orjson.dumps(request("a") | {"custom_id": ""}), "invalid_custom_id", "custom_id must be a non-empty string."),
        (orjson.dumps(request("a") | {"body": [1]}), "invalid_body", "body must be a JSON object."),
        (line("a", stream=True), "unsupported_stream", "streaming is not supported in batches (body.stream)."),
        (orjson.dumps(request("a") | {"body": {"messages": []}}), "missing_model",
         "body.model is required and must be a non-empty string."),
        (orjson.dumps(request("a") | {"method": "GET"}), "invalid_method", "method must be 'POST', got 'GET'."),
        (orjson.dumps(request("a") | {"url": "/v1/x"}), "mismatched_url",
         f"url '/v1/x' does not match the batch endpoint '{CHAT_COMPLETIONS}'."),
    ]
    for data, code, text in cases:
        problem = check(iter([line("ok") + b"\n", data + b"\n"])).problems[0]
        assert (problem.code, problem.message) == (code, f"line 2: {text}"), data
    empty = check(iter([b"\n"])).problems[0]
    assert (empty.code, empty.message, empty.line) == ("empty_file", "The input file is empty: it has no requests.", None)


@pytest.mark.parametrize("custom_id", [17, "", None, ["x"]])
def test_invalid_custom_ids_are_not_also_called_duplicates(custom_id):
    bad = orjson.dumps(request("a") | {"custom_id": custom_id})
    report = check(iter([bad + b"\n", bad + b"\n", line("ok") + b"\n"]))
    assert "duplicate_custom_id" not in [p.code for p in report.problems]
    assert report.total == 3


@pytest.mark.parametrize("bad", [orjson.dumps(request("a") | {"body": ["x"]}),
                                 orjson.dumps(request("a") | {"body": {"messages": []}})])
def test_a_line_with_a_bad_body_does_not_end_validation(bad):
    """Lines after a bad body or a missing model are still read and checked."""
    report = check(iter([bad + b"\n", line("b") + b"\n", orjson.dumps(request("c") | {"method": "GET"}) + b"\n"]))
    assert report.total == 3
    assert ("invalid_method", 3) in [(p.code, p.line) for p in report.problems]


def test_chunks_may_be_any_bytes_like_object():
    data = line("a") + b"\n" + line("b") + b"\n" + b"not json\n"
    for kind in (bytearray, memoryview):
        pieces = [kind(data[i : i + 10]) for i in range(0, len(data), 10)]
        report = check(iter(pieces))
        assert report.total == 3 and [(p.code, p.line) for p in report.problems] == [("invalid_json", 3)]


def test_a_chunk_that_starts_with_a_blank_line_keeps_line_numbers():
    chunks = [line("a") + b"\n", b"\n", b"\nnot json\n"]  # lines 2 and 3 blank, line 4 broken
    assert [(p.code, p.line) for p in check(iter(chunks)).problems] == [("invalid_json", 4)]


def test_the_400_leads_with_the_first_problem_and_lists_the_others():
    from vbatch.core.errors import InvalidRequest
    from vbatch.core.validation import raise_for_report

    report = check(iter([b"not json\n", b"[1]\n", orjson.dumps(request("c") | {"method": "GET"}) + b"\n"]))
    with pytest.raises(InvalidRequest) as info:
        raise_for_report(report)
    assert info.value.envelope()["error"]["message"] == (
        "line 1: line is not valid JSON. (also: line 2: each line must be a JSON object.; "
        "line 3: method must be 'POST', got 'GET'.)")


# --- unreadable result parts (merge reads each part whole) -------------------------------


def merged_codes(store, shard_count=1, **kwargs) -> dict[str, tuple[str | None, str | None]]:
    merged = merge_shards(store, P, "b1", shard_count, **kwargs)
    try:
        lines = [orjson.loads(x) for x in (merged.output.read() + merged.errors.read()).splitlines()]
    finally:
        merged.close()
    return {r["custom_id"]: ((r["error"] or {}).get("code"), (r["error"] or {}).get("message")) for r in lines}


@pytest.mark.parametrize("bad", [b"{not json", b'{"no": "custom_id"}', b"[1, 2]", b'{"custom_id": 7}'])
def test_an_unreadable_part_is_skipped_and_its_requests_say_so(tmp_path, bad):
    store = LocalObjectStore(tmp_path)
    write_shards(store, P, "b1", (line(c) for c in ("a", "b", "c")), 1)
    store.put_bytes(part_key(P, "b1", 0, 0), orjson.dumps(ok_result("a")) + b"\n" + bad + b"\n")
    write_part(store, "b1", 0, 1, [ok_result("b")])  # a good part after the bad one still counts
    codes = merged_codes(store)
    assert codes["b"] == (None, None)
    assert codes["a"][0] == codes["c"][0] == "result_unreadable"  # the whole bad part is dropped
    assert codes["c"][1].startswith("This request's result part could not be read back")


class GhostPartStore(LocalObjectStore):
    """Lists a part that is gone by the time it is read."""

    def list(self, prefix):
        keys = list(super().list(prefix))
        return iter([prefix + "part-000000.jsonl"] + keys) if "/results/" in prefix else iter(keys)


def test_a_part_gone_between_listing_and_reading_is_skipped(tmp_path):
    store = GhostPartStore(tmp_path)
    write_shards(store, P, "b1", (line(c) for c in ("a", "b")), 1)
    write_part(store, "b1", 0, 1, [ok_result("a")])
    codes = merged_codes(store)
    assert codes == {"a": (None, None), "b": ("result_unreadable", codes["b"][1])}


class ShortReadStore(LocalObjectStore):
    """Storage trouble: a read returns only part of an object."""

    def get_bytes(self, key):
        data = super().get_bytes(key)
        return data[:-10] if "/results/" in key else data


def test_a_part_read_cut_short_is_retried_not_called_unreadable(tmp_path):
    store = ShortReadStore(tmp_path)
    write_shards(store, P, "b1", (line(c) for c in ("a", "b")), 1)
    write_part(store, "b1", 0, 0, [ok_result("a"), ok_result("b")])
    with pytest.raises(StorageError):
        merge_shards(store, P, "b1", 1)


def test_the_ending_message_goes_to_requests_left_for_that_reason_only(tmp_path):
    store = LocalObjectStore(tmp_path)
    write_shards(store, P, "b1", (line(c) for c in ("a", "b", "c", "d")), 2)
    codes = merged_codes(store, 2, missing_code="storage_unavailable", missing_message="The batch ended: disk full",
                         failed_shards=frozenset({1}))
    by_shard = {c: s for s in range(2) for c in (orjson.loads(x)["custom_id"]
                                                 for x in store.get_bytes(shard_key(P, "b1", s)).splitlines())}
    for custom_id, (code, message) in codes.items():
        if by_shard[custom_id] == 0:
            assert (code, message) == ("storage_unavailable", "The batch ended: disk full")
        else:  # a shard that failed keeps its own reason
            assert code == "shard_failed" and message.startswith("The worker running this request failed")
