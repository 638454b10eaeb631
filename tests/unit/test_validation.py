"""The JSONL validator: every rule of the wire contract, with the line users are told."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vbatch.core.config import Limits
from vbatch.core.errors import InvalidRequest
from vbatch.core.schemas import CHAT_COMPLETIONS
from vbatch.core.validation import (
    MAX_REPORTED_PROBLEMS,
    raise_for_report,
    validate_jsonl,
)

MODEL = "smollm2-135m"
LIMITS = Limits()


def req(custom_id: str = "r1", **overrides) -> dict:
    line = {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT_COMPLETIONS,
        "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
    }
    line.update(overrides)
    return line


def jsonl(*items: dict | bytes | str) -> bytes:
    out = []
    for item in items:
        if isinstance(item, dict):
            out.append(orjson.dumps(item))
        elif isinstance(item, str):
            out.append(item.encode())
        else:
            out.append(item)
    return b"\n".join(out) + b"\n"


def validate(data: bytes | Iterator[bytes], *, served=(MODEL,), limits=LIMITS, chunk=7):
    if isinstance(data, bytes):
        # Small odd-sized chunks so every test also crosses chunk boundaries.
        raw = data
        data = (raw[i : i + chunk] for i in range(0, len(raw), chunk))
    return validate_jsonl(data, endpoint=CHAT_COMPLETIONS, served_models=served, limits=limits)


def only_problem(report):
    assert len(report.problems) == 1, report.problems
    return report.problems[0]


# --- valid files -------------------------------------------------------------------


def test_valid_file_reports_total_and_model():
    report = validate(jsonl(req("a"), req("b"), req("c")))
    assert report.ok
    assert (report.total, report.model) == (3, MODEL)


def test_any_model_accepted_when_the_catalog_is_open():
    report = validate(jsonl(req("a", body={"model": "anything/at-all"})), served=None)
    assert report.ok and report.model == "anything/at-all"


def test_crlf_line_endings_and_last_line_without_newline():
    data = orjson.dumps(req("a")) + b"\r\n" + orjson.dumps(req("b")) + b"\r\n\r\n" + orjson.dumps(req("c"))
    report = validate(data)
    assert report.ok and report.total == 3


def test_utf8_bom_at_file_start_is_tolerated():
    report = validate(b"\xef\xbb\xbf" + jsonl(req("a"), req("b")))
    assert report.ok and report.total == 2


def test_bom_inside_the_file_is_not_json():
    problem = only_problem(validate(jsonl(req("a"), b"\xef\xbb\xbf" + orjson.dumps(req("b")))))
    assert (problem.code, problem.line) == ("invalid_json", 2)


def test_blank_lines_are_skipped_but_keep_their_line_number():
    report = validate(jsonl(req("a"), "", "   \t", req("a")))
    assert report.total == 2
    problem = only_problem(report)
    assert (problem.code, problem.line) == ("duplicate_custom_id", 4)
    assert problem.message.startswith("line 4: ")
    assert "line 1" in problem.message  # names the earlier line


def test_unicode_custom_ids_and_content_are_fine():
    report = validate(jsonl(req("é-1", body={"model": MODEL, "messages": [{"role": "user", "content": "日本語 🎉"}]})))
    assert report.ok


# --- one rule at a time --------------------------------------------------------------

BODY = {"model": MODEL, "messages": []}

CASES = [
    # (lines, code, line, param)
    ([req("a"), "not json"], "invalid_json", 2, None),
    ([req("a"), req("b"), '{"custom_id": "c", '], "invalid_json", 3, None),
    (["[1, 2]"], "invalid_line", 1, None),
    ([req("a"), '"just a string"'], "invalid_line", 2, None),
    ([{"method": "POST", "url": CHAT_COMPLETIONS, "body": BODY}], "missing_required_parameter", 1, "custom_id"),
    ([req("a"), {"custom_id": "b", "url": CHAT_COMPLETIONS, "body": BODY}], "missing_required_parameter", 2, "method"),
    ([{"custom_id": "a", "method": "POST", "body": BODY}], "missing_required_parameter", 1, "url"),
    ([{"custom_id": "a", "method": "POST", "url": CHAT_COMPLETIONS}], "missing_required_parameter", 1, "body"),
    ([req("a"), req(custom_id="")], "invalid_custom_id", 2, "custom_id"),
    ([req(custom_id=17)], "invalid_custom_id", 1, "custom_id"),
    ([req("a"), req("b"), req("a")], "duplicate_custom_id", 3, "custom_id"),
    ([req("a", method="GET")], "invalid_method", 1, "method"),
    ([req("a"), req("b", method="post")], "invalid_method", 2, "method"),
    ([req("a", url="/v1/embeddings")], "mismatched_url", 1, "url"),
    ([req("a"), req("b", body=["x"])], "invalid_body", 2, "body"),
    ([req("a", body={"model": MODEL, "stream": True})], "unsupported_stream", 1, "body.stream"),
    ([req("a"), req("b", body={"messages": []})], "missing_model", 2, "body.model"),
    ([req("a", body={"model": ""})], "missing_model", 1, "body.model"),
    ([req("a", body={"model": "gpt-4o"})], "model_not_found", 1, "body.model"),
]


@pytest.mark.parametrize(("lines", "code", "line", "param"), CASES)
def test_each_rule_points_at_its_line(lines, code, line, param):
    report = validate(jsonl(*lines))
    problem = only_problem(report)
    assert (problem.code, problem.line, problem.param) == (code, line, param)
    assert problem.message.startswith(f"line {line}: ")


def test_stream_false_is_fine():
    assert validate(jsonl(req("a", body={"model": MODEL, "stream": False}))).ok


def test_model_not_found_lists_the_served_models():
    problem = only_problem(validate(jsonl(req("a", body={"model": "gpt-4o"})), served=("m-b", "m-a")))
    assert "gpt-4o" in problem.message and "m-a, m-b" in problem.message


def test_two_models_in_one_file_are_refused():
    other = "other-model"
    report = validate(jsonl(req("a"), req("b"), req("c", body={"model": other})), served=(MODEL, other))
    problem = only_problem(report)
    assert (problem.code, problem.line, problem.param) == ("mixed_models", 3, "body.model")
    assert report.model == MODEL


def test_not_utf8():
    data = jsonl(req("a")) + b'{"custom_id": "b\xff\xfe", "method": "POST"}\n'
    problem = only_problem(validate(data))
    assert (problem.code, problem.line) == ("invalid_encoding", 2)


def test_depth_bomb_is_invalid_json_not_a_crash():
    bomb = b"[" * 100_000 + b"]" * 100_000
    problem = only_problem(validate(jsonl(req("a"), bomb), chunk=65536))
    assert (problem.code, problem.line) == ("invalid_json", 2)


@pytest.mark.parametrize("data", [b"", b"\n\n  \r\n\t\n", b"\xef\xbb\xbf\n"])
def test_empty_file(data):
    problem = only_problem(validate(data))
    assert (problem.code, problem.line) == ("empty_file", None)


def test_line_over_the_limit():
    limits = Limits(max_line_bytes=1000)
    long_ok = req("a", body={"model": MODEL, "pad": ""})
    long_ok["body"]["pad"] = "x" * (1000 - len(orjson.dumps(long_ok)))
    assert len(orjson.dumps(long_ok)) == 1000
    too_long = req("b", body={"model": MODEL, "pad": "y" * 1000})
    report = validate(jsonl(long_ok, too_long, req("c")), limits=limits, chunk=333)
    problem = only_problem(report)
    assert (problem.code, problem.line) == ("line_too_large", 2)
    assert report.total == 3


def test_too_many_requests_names_the_first_line_over():
    limits = Limits(max_requests_per_batch=3)
    problem = only_problem(validate(jsonl(req("a"), "", req("b"), req("c"), req("d"), req("e")), limits=limits))
    assert (problem.code, problem.line) == ("too_many_requests", 5)


def test_first_problem_of_each_kind_and_at_most_a_few():
    lines = [
        req("a", method="GET"),  # 1 invalid_method
        req("b", method="PUT"),  # 2 (same kind: not repeated)
        "{oops",  # 3 invalid_json
        req("a"),  # 4 duplicate
        req("c", url="/v1/x"),  # 5 mismatched_url
        req("d", body={"model": MODEL, "stream": True}),  # 6 unsupported_stream
        "[]",  # 7 invalid_line: the 6th kind, over the limit
    ]
    report = validate(jsonl(*lines))
    got = [(p.code, p.line) for p in report.problems]
    assert got == [
        ("invalid_method", 1),
        ("invalid_json", 3),
        ("duplicate_custom_id", 4),
        ("mismatched_url", 5),
        ("unsupported_stream", 6),
    ]
    assert len(got) == MAX_REPORTED_PROBLEMS


def test_one_line_with_several_problems_reports_each_kind():
    report = validate(jsonl(req("a", method="GET", url="/v1/completions")))
    assert [p.code for p in report.problems] == ["invalid_method", "mismatched_url"]


def test_raise_for_report_is_a_400_with_line_and_code():
    report = validate(jsonl(req("a"), req("a"), req("b", method="GET")))
    with pytest.raises(InvalidRequest) as info:
        raise_for_report(report)
    error = info.value.envelope()["error"]
    assert (error["code"], error["line"], error["param"]) == ("duplicate_custom_id", 2, "custom_id")
    assert error["message"].startswith("line 2: ") and "line 3: " in error["message"]
    raise_for_report(validate(jsonl(req("a"))))  # a valid file raises nothing


# --- size and memory -------------------------------------------------------------------


def generated(n_lines: int, pad: int = 0, chunk_lines: int = 64) -> Iterator[bytes]:
    """A JSONL file streamed in chunks, never whole in memory."""
    filler = "p" * pad
    batch = []
    for i in range(n_lines):
        batch.append(
            b'{"custom_id":"req-%d","method":"POST","url":"/v1/chat/completions",'
            b'"body":{"model":"%s","messages":[{"role":"user","content":"%s"}]}}\n'
            % (i, MODEL.encode(), filler.encode())
        )
        if len(batch) == chunk_lines:
            yield b"".join(batch)
            batch = []
    if batch:
        yield b"".join(batch)


def test_50000_lines_validate_with_bounded_memory():
    pad = 600
    file_size = sum(len(c) for c in generated(50_000, pad))
    tracemalloc.start()
    try:
        report = validate(generated(50_000, pad))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.ok and report.total == 50_000
    assert file_size > 30_000_000
    # Only the custom_id index grows with the file (~100 bytes per request).
    assert peak < file_size / 4, (peak, file_size)


def test_50001_lines_are_refused():
    report = validate(generated(50_001))
    problem = only_problem(report)
    assert (problem.code, problem.line) == ("too_many_requests", 50_001)


def test_huge_line_without_newline_is_refused_without_buffering_it():
    block = b"a" * (1024 * 1024)  # the same 1 MiB object, yielded 300 times

    def stream():
        yield orjson.dumps(req("a")) + b"\n"
        for _ in range(300):
            yield block

    tracemalloc.start()
    try:
        report = validate(stream())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    problem = only_problem(report)
    assert (problem.code, problem.line) == ("line_too_large", 2)
    assert peak < 8 * 1024 * 1024, peak  # a few line limits' worth, not 300 MB


def test_a_huge_line_does_not_hide_the_lines_after_it():
    data = jsonl(req("a")) + b"z" * 5000 + b"\n" + jsonl(req("b"), req("a"))
    got = [(p.code, p.line) for p in validate(data, limits=Limits(max_line_bytes=200), chunk=50).problems]
    assert got == [("line_too_large", 2), ("duplicate_custom_id", 4)]


# --- chunking never changes the verdict ---------------------------------------------

_LINES = st.lists(
    st.sampled_from(
        [
            jsonl(req("a"))[:-1],
            jsonl(req("b"))[:-1],
            jsonl(req("c", method="GET"))[:-1],
            jsonl(req("d", body={"model": "other"}))[:-1],
            b'{"custom_id": "e", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "'
            + MODEL.encode()
            + b'", "pad": "'
            + b"q" * 300
            + b'"}}',
            b"",
            b"   ",
            b"\r",
            b"not json",
            b"\xff\xfe",
            b"[" * 2000,
        ]
    ),
    max_size=25,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=_LINES,
    crlf=st.booleans(),
    bom=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=30),
)
def test_chunk_boundaries_never_change_the_report(lines, crlf, bom, cuts):
    limits = Limits(max_line_bytes=256, max_requests_per_batch=20)
    data = (b"\xef\xbb\xbf" if bom else b"") + (b"\r\n" if crlf else b"\n").join(lines)
    whole = validate_jsonl([data], endpoint=CHAT_COMPLETIONS, served_models=(MODEL,), limits=limits)
    points = sorted({c for c in cuts if c < len(data)} | {0, len(data)})
    pieces = [data[a:b] for a, b in zip(points, points[1:])]
    split = validate_jsonl(pieces, endpoint=CHAT_COMPLETIONS, served_models=(MODEL,), limits=limits)
    assert split == whole
