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
    """Validate a whole input file. `served_models=None` accepts any model id."""
    report = ValidationReport()
    problems = report.problems
    kinds: set[str] = set()
    served = None if served_models is None else frozenset(served_models)
    max_requests = limits.max_requests_per_batch
    first_line_for: dict[str, int] = {}  # custom_id -> line it first appeared on
    model: str | None = None
    total = 0

    def problem(code: str, lineno: int | None, text: str, param: str | None = None) -> None:
        if code in kinds or len(problems) >= MAX_REPORTED_PROBLEMS:
            return
        kinds.add(code)
        message = f"line {lineno}: {text}" if lineno is not None else text
        problems.append(BatchErrorItem(code=code, message=message, param=param, line=lineno))

    lineno = 0
    for lineno, line in enumerate(_split_lines(chunks, limits.max_line_bytes), 1):
        if len(problems) >= MAX_REPORTED_PROBLEMS:
            break  # nothing more would be reported; don't read the rest
        if line is None:
            total += 1
            problem("line_too_large", lineno, f"line is larger than the limit of {limits.max_line_bytes} bytes.")
            continue
        if lineno == 1 and line.startswith(_BOM):
            line = line[len(_BOM):]
        try:
            # Fast path first: blank and broken lines are rare, so they are only
            # told apart after orjson refuses them.
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            if not line.strip():
                continue  # blank line: skipped, but it keeps its line number
            total += 1
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                problem("invalid_encoding", lineno, "file is not valid UTF-8.")
            else:
                problem("invalid_json", lineno, "line is not valid JSON.")
            continue
        total += 1
        if total > max_requests:
            problem("too_many_requests", lineno, f"file has more than {max_requests} requests.")
            break  # the file is refused anyway; parsing the rest is wasted work
        if type(obj) is not dict:
            problem("invalid_line", lineno, "each line must be a JSON object.")
            continue

        custom_id = obj.get("custom_id")
        method = obj.get("method")
        url = obj.get("url")
        body = obj.get("body")
        if custom_id is None or method is None or url is None or body is None:
            for name in _REQUIRED:
                if obj.get(name) is None:
                    problem("missing_required_parameter", lineno, f"missing required parameter '{name}'.", name)
                    break

        if custom_id is not None:
            if type(custom_id) is not str or not custom_id:
                problem("invalid_custom_id", lineno, "custom_id must be a non-empty string.", "custom_id")
            else:
                earlier = first_line_for.setdefault(custom_id, lineno)
                if earlier != lineno:
                    problem(
                        "duplicate_custom_id",
                        lineno,
                        f"custom_id {_show(custom_id)} is a duplicate of line {earlier}; custom_ids must be unique.",
                        "custom_id",
                    )
        if method is not None and method != "POST":
            problem("invalid_method", lineno, f"method must be 'POST', got {_show(method)}.", "method")
        if url is not None and url != endpoint:
            problem("mismatched_url", lineno, f"url {_show(url)} does not match the batch endpoint {endpoint!r}.", "url")
        if body is None:
            continue
        if type(body) is not dict:
            problem("invalid_body", lineno, "body must be a JSON object.", "body")
            continue
        if body.get("stream") not in (None, False):
            problem("unsupported_stream", lineno, "streaming is not supported in batches (body.stream).", "body.stream")
        line_model = body.get("model")
        if type(line_model) is not str or not line_model:
            problem("missing_model", lineno, "body.model is required and must be a non-empty string.", "body.model")
            continue
        if line_model == model:
            continue  # the common case: same model as every line before
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

    if total == 0 and not problems:
        problem("empty_file", None, "The input file is empty: it has no requests.")
    report.total = total
    report.model = model
    return report


def _show(value: object) -> str:
    """A user value quoted for a message, cut short (a custom_id may be ~1 MB)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _split_lines(chunks: Iterable[bytes], max_line_bytes: int) -> Iterator[bytes | None]:
    """Yield each line without its b'\\n', or None for a line over max_line_bytes.

    Never buffers more than max_line_bytes of a line (plus one chunk): once a line
    is known to be too large, the rest of it is skipped up to the next newline.
    """
    pending = b""
    skipping = False  # inside a too-large line already reported as None
    for chunk in chunks:
        if not chunk:
            continue
        if skipping:
            cut = chunk.find(b"\n")
            if cut < 0:
                continue
            skipping = False
            chunk = chunk[cut + 1 :]
        data = pending + chunk if pending else chunk
        lines = data.split(b"\n")
        pending = lines.pop()
        for line in lines:
            yield None if len(line) > max_line_bytes else line
        if len(pending) > max_line_bytes:
            yield None
            pending = b""
            skipping = True
    if pending:
        yield None if len(pending) > max_line_bytes else pending


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
