"""Streaming validation of a batch input file (every rule of the wire contract).

Reads the file as a stream of byte chunks, one line at a time: a 200 MB /
50,000-line file never sits whole in memory (only the set of custom_ids does).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field

import orjson
from vbatch.core.config import Limits
from vbatch.core.errors import InvalidRequest
from vbatch.core.schemas import BatchErrorItem

# At most this many problems are reported (the first of each kind).
MAX_REPORTED_PROBLEMS = 5

_BOM = b"\xef\xbb\xbf"
# body.stream values that mean "not streaming" (false, absent, null).
_NO_STREAM = (None, False)
_REQUIRED = ("custom_id", "method", "url", "body")


@dataclass
class ValidationReport:
    total: int = 0
    model: str | None = None
    problems: list[BatchErrorItem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_jsonl(
    chunks: Iterable[bytes],
    *,
    endpoint: str,
    served_models: Collection[str] | None,
    limits: Limits,
) -> ValidationReport:
    """Validate a whole input file. `served_models=None` accepts any model id.

    Stops reading once MAX_REPORTED_PROBLEMS are found or the request limit is
    passed; `total` then counts only what was read (the file is refused anyway).
    """
    report = ValidationReport()
    problems = report.problems
    kinds: set[str] = set()
    served = None if served_models is None else frozenset(served_models)
    max_requests = limits.max_requests_per_batch
    first_line_for: dict[str, int] = {}  # custom_id -> line it first appeared on
    model: str | None = None
    total = 0

    def problem(code: str, lineno: int | None, text: str, param: str | None = None) -> None:
        if code in kinds:
            return
        kinds.add(code)
        message = f"line {lineno}: {text}" if lineno is not None else text
        problems.append(BatchErrorItem(code=code, message=message, param=param, line=lineno))
        if len(problems) >= MAX_REPORTED_PROBLEMS:
            raise _Stop  # nothing more would be reported: don't read the rest

    def too_many(lineno: int) -> None:
        problem("too_many_requests", lineno, f"file has more than {max_requests} requests.")
        raise _Stop  # the file is refused anyway; parsing the rest is wasted work

    loads = orjson.loads
    try:
        for lineno, line in enumerate(_split_lines(chunks, limits.max_line_bytes), 1):
            if line is None:
                total += 1
                if total > max_requests:
                    too_many(lineno)
                problem("line_too_large", lineno, f"line is larger than the limit of {limits.max_line_bytes} bytes.")
                continue
            try:
                obj = loads(line)
            except orjson.JSONDecodeError:  # also what orjson raises past 1024 levels of nesting
                # Blank and broken lines are rare, so they are told apart only
                # once orjson has refused them.
                if not bytes(line).strip():
                    continue  # blank line: skipped, but it keeps its line number
                total += 1
                if total > max_requests:
                    too_many(lineno)
                # orjson refuses invalid UTF-8 too; decoding only on failure tells
                # the two apart without a second pass over every good line.
                try:
                    str(line, "utf-8")
                except UnicodeDecodeError:
                    problem("invalid_encoding", lineno, "file is not valid UTF-8.")
                else:
                    problem("invalid_json", lineno, "line is not valid JSON.")
                continue
            total += 1
            if total > max_requests:
                too_many(lineno)
            if type(obj) is not dict:
                problem("invalid_line", lineno, "each line must be a JSON object.")
                continue

            custom_id = obj.get("custom_id")
            body = obj.get("body")
            # One combined test for a well-formed envelope keeps the common case fast;
            # only a line that fails it pays for finding out why.
            if (
                type(custom_id) is str
                and custom_id
                and obj.get("method") == "POST"
                and obj.get("url") == endpoint
                and type(body) is dict
                and body.get("stream") in _NO_STREAM
            ):
                earlier = first_line_for.setdefault(custom_id, lineno)
            else:
                for code, text, param in _envelope_problems(obj, endpoint):
                    problem(code, lineno, text, param)
                valid_id = type(custom_id) is str and custom_id
                earlier = first_line_for.setdefault(custom_id, lineno) if valid_id else lineno
                if type(body) is not dict:
                    continue
            if earlier != lineno:
                problem(
                    "duplicate_custom_id",
                    lineno,
                    f"custom_id {_show(custom_id)} is a duplicate of line {earlier}; custom_ids must be unique.",
                    "custom_id",
                )
            line_model = body.get("model")
            if model is not None and line_model == model:
                continue  # the common case: same model as every line before
            if type(line_model) is not str or not line_model:
                problem("missing_model", lineno, "body.model is required and must be a non-empty string.", "body.model")
                continue
            if served is not None and line_model not in served:
                problem(
                    "model_not_found",
                    lineno,
                    f"model {_show(line_model)} is not served here; served models: {', '.join(sorted(served)) or '(none)'}.",
                    "body.model",
                )
            if model is None:
                model = line_model
            else:
                problem(
                    "mixed_models",
                    lineno,
                    f"model {_show(line_model)} differs from {_show(model)}; a batch must use a single model.",
                    "body.model",
                )
    except _Stop:
        pass

    if total == 0 and not problems:
        problem("empty_file", None, "The input file is empty: it has no requests.")
    report.total = total
    report.model = model
    return report


class _Stop(Exception):
    """Ends validation early; the report is already complete."""


def _envelope_problems(obj: dict, endpoint: str) -> list[tuple[str, str, str | None]]:
    """Every problem of a line's envelope (all but custom_id uniqueness and model)."""
    found = []
    for name in _REQUIRED:
        if obj.get(name) is None:
            found.append(("missing_required_parameter", f"missing required parameter '{name}'.", name))
            break
    custom_id, method, url, body = (obj.get(name) for name in _REQUIRED)
    if custom_id is not None and (type(custom_id) is not str or not custom_id):
        found.append(("invalid_custom_id", "custom_id must be a non-empty string.", "custom_id"))
    if method is not None and method != "POST":
        found.append(("invalid_method", f"method must be 'POST', got {_show(method)}.", "method"))
    if url is not None and url != endpoint:
        found.append(("mismatched_url", f"url {_show(url)} does not match the batch endpoint {endpoint!r}.", "url"))
    if body is not None and type(body) is not dict:
        found.append(("invalid_body", "body must be a JSON object.", "body"))
    elif body is not None and body.get("stream") not in _NO_STREAM:
        found.append(("unsupported_stream", "streaming is not supported in batches (body.stream).", "body.stream"))
    return found


def _show(value: object) -> str:
    """A user value quoted for a message, cut short (a custom_id may be ~1 MB)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _split_lines(chunks: Iterable[bytes], max_line_bytes: int) -> Iterator[bytes | memoryview | None]:
    """Yield each line without its b'\\n', or None for a line over max_line_bytes.

    Lines inside a chunk are zero-copy memoryview slices (copying every line
    costs more than parsing it). Never buffers more than max_line_bytes of a
    line: once a line is known to be too large, the rest of it is skipped.
    """
    pending = b""  # the start of a line carried over from earlier chunks
    skipping = False  # inside a too-large line already reported as None
    for chunk in _strip_bom(chunks):
        if not chunk:
            continue
        if type(chunk) is not bytes:
            chunk = bytes(chunk)
        start = 0
        if skipping or pending:
            cut = chunk.find(b"\n")
            if cut < 0:
                if not skipping:
                    if len(pending) + len(chunk) > max_line_bytes:
                        yield None
                        pending, skipping = b"", True
                    else:
                        pending += chunk
                continue
            if not skipping:
                yield pending + chunk[:cut] if len(pending) + cut <= max_line_bytes else None
            pending, skipping = b"", False
            start = cut + 1
        view = memoryview(chunk)
        find = chunk.find
        while (cut := find(b"\n", start)) >= 0:
            yield view[start:cut] if cut - start <= max_line_bytes else None
            start = cut + 1
        if len(chunk) - start > max_line_bytes:
            yield None
            skipping = True
        elif start < len(chunk):
            pending = chunk[start:]
    if pending:
        yield pending


def _strip_bom(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The chunks, minus a UTF-8 byte-order mark at the very start of the file."""
    chunks = iter(chunks)
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= len(_BOM):
            break
    yield head[len(_BOM) :] if head.startswith(_BOM) else head
    yield from chunks


def raise_for_report(report: ValidationReport) -> None:
    """Raise the 400 the gateway answers for an invalid file (first problem leads)."""
    if report.ok:
        return
    first = report.problems[0]
    message = first.message
    others = report.problems[1:]
    if others:
        message += " (also: " + "; ".join(p.message for p in others) + ")"
    raise InvalidRequest(message, code=first.code, param=first.param, line=first.line)
