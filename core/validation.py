"""Streaming validation of a batch input file (every rule of the wire contract).

Reads the file as a stream of byte chunks, one line at a time: a 200 MB /
50,000-line file never sits whole in memory (only the set of custom_ids does).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from vbatch.core.config import Limits
from vbatch.core.errors import InvalidRequest
from vbatch.core.schemas import BatchErrorItem

# At most this many problems are reported (the first of each kind).
MAX_REPORTED_PROBLEMS = 5


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
    raise NotImplementedError  # implemented by the core-io work


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
