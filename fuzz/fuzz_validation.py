"""Coverage-guided fuzz target: the streaming JSONL validator (vbatch.core.validation).

    python fuzz/fuzz_validation.py [libFuzzer flags] [corpus dirs]   # atheris
    tests/robustness/test_fuzz.py                                   # a bounded run in CI

The first byte of an input picks how the rest is cut into chunks (storage hands the
validator chunks of any size), and which models are served. Properties:
- it never raises: every problem is a report entry (and `raise_for_report` an
  InvalidRequest naming a line), never an exception escaping;
- the report does not depend on where the chunks are cut;
- at most MAX_REPORTED_PROBLEMS problems, lines within the file.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from vbatch.core.config import Limits
    from vbatch.core.errors import InvalidRequest
    from vbatch.core.validation import MAX_REPORTED_PROBLEMS, raise_for_report, validate_jsonl

LIMITS = Limits(max_line_bytes=512, max_requests_per_batch=20)
ENDPOINT = "/v1/chat/completions"


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


def summary(report) -> tuple:
    return report.total, report.model, [(p.code, p.line, p.param, p.message) for p in report.problems]


def test_one_input(data: bytes) -> None:
    if not data:
        return
    size = data[0] % 17 + 1
    served = None if data[0] & 0x80 else ("test-model", "m")
    body = data[1:]
    whole = validate_jsonl([body], endpoint=ENDPOINT, served_models=served, limits=LIMITS)
    pieces = validate_jsonl(chunked(body, size), endpoint=ENDPOINT, served_models=served, limits=LIMITS)
    assert summary(whole) == summary(pieces), (summary(whole), summary(pieces))
    assert len(whole.problems) <= MAX_REPORTED_PROBLEMS
    lines = body.count(b"\n") + 1
    for problem in whole.problems:
        assert problem.line is None or 1 <= problem.line <= lines, problem
    assert whole.total <= lines
    try:
        raise_for_report(whole)
    except InvalidRequest as exc:
        assert not whole.ok and exc.message
    else:
        assert whole.ok


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
