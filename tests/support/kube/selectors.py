"""Label and field selectors, as the API server parses them from query strings.

Label selectors: `a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x,y)`, `a`, `!a`,
comma-joined (all must hold). Field selectors: `path=v`, `path==v`, `path!=v`
over dotted paths such as `metadata.name` or `status.phase`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

Predicate = Callable[[Mapping[str, Any]], bool]

_SET_EXPR = re.compile(r"^\s*(!?)\s*([A-Za-z0-9./_-]+)\s*(?:(notin|in)\s*\(([^)]*)\))?\s*$")
_EQ_EXPR = re.compile(r"^\s*([A-Za-z0-9./_-]+)\s*(==|!=|=)\s*([A-Za-z0-9._-]*)\s*$")


class SelectorError(ValueError):
    pass


def _split(selector: str) -> list[str]:
    # Commas separate requirements, except inside the parentheses of in/notin.
    parts, depth, current = [], 0, []
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p for p in parts if p.strip()]


def _label_requirement(text: str) -> Callable[[Mapping[str, str]], bool]:
    if match := _EQ_EXPR.match(text):
        key, op, value = match.groups()
        if op == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    if match := _SET_EXPR.match(text):
        negate, key, op, values = match.groups()
        if op is None:
            return (lambda labels: key not in labels) if negate else (lambda labels: key in labels)
        if negate:
            raise SelectorError(f"invalid label selector: {text!r}")
        choices = {v.strip() for v in values.split(",") if v.strip()}
        if op == "in":
            return lambda labels: labels.get(key) in choices
        return lambda labels: labels.get(key) not in choices
    raise SelectorError(f"invalid label selector: {text!r}")


def label_selector(selector: str | None) -> Predicate:
    requirements = [_label_requirement(part) for part in _split(selector or "")]

    def check(obj: Mapping[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(req(labels) for req in requirements)

    return check


def _dig(obj: Mapping[str, Any], path: str) -> Any:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def field_selector(selector: str | None) -> Predicate:
    requirements: list[tuple[str, bool, str]] = []
    for part in _split(selector or ""):
        match = _EQ_EXPR.match(part)
        if not match:
            raise SelectorError(f"invalid field selector: {part!r}")
        path, op, value = match.groups()
        requirements.append((path, op == "!=", value))

    def check(obj: Mapping[str, Any]) -> bool:
        for path, negate, value in requirements:
            actual = _dig(obj, path)
            actual_str = "" if actual is None else str(actual).lower() if isinstance(actual, bool) else str(actual)
            if (actual_str == value) == negate:
                return False
        return True

    return check
