"""The dependency rule, checked on every module's imports (parsed, not executed):

- core imports no other room and no web, Kubernetes-operator or engine code;
- api, operator and worker depend on core only, never on each other;
- cli wires them together (it may import anything).

Lazy imports inside functions count the same as top-level ones.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOMS = ("core", "api", "operator", "worker", "cli")
# Third-party packages a room must never import (top-level package names).
FORBIDDEN_LIBRARIES = {
    "core": {"fastapi", "starlette", "uvicorn", "kopf", "vllm", "kubernetes", "torch"},
    "api": {"kopf", "vllm", "torch"},
    "operator": {"fastapi", "starlette", "uvicorn", "vllm", "torch"},
    # vLLM's OpenAI serving layer takes a starlette `State`: the one web type the worker touches.
    "worker": {"fastapi", "uvicorn", "kopf"},
    "cli": set(),
}
ALLOWED_ROOMS = {
    "core": {"core"},
    "api": {"core", "api"},
    "operator": {"core", "operator"},
    "worker": {"core", "worker"},
    "cli": set(ROOMS),
}


def modules() -> list[tuple[str, Path]]:
    return [(room, path) for room in ROOMS for path in sorted((REPO / room).rglob("*.py"))]


def _shown(path: Path) -> Path:
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def imported_names(path: Path, room: str) -> list[tuple[int, str]]:
    """(line, dotted module) for every import; relative imports resolved to vbatch.<room>..."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = path.relative_to(REPO) if path.is_relative_to(REPO) else Path(room) / path.name
    package = ["vbatch", *rel.parts[:-1]]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # `from vbatch import worker` names a room through the imported attribute.
            if module == "vbatch":
                found.extend((node.lineno, f"vbatch.{alias.name}") for alias in node.names)
    return found


def violations(room: str, path: Path) -> list[str]:
    problems = []
    for line, module in imported_names(path, room):
        parts = module.split(".")
        where = f"{_shown(path)}:{line} imports {module}"
        if parts[0] == "vbatch" and len(parts) > 1 and parts[1] in ROOMS:
            if parts[1] not in ALLOWED_ROOMS[room]:
                problems.append(f"{where} ({room} may import only {sorted(ALLOWED_ROOMS[room])})")
        elif parts[0] in FORBIDDEN_LIBRARIES[room]:
            problems.append(f"{where} ({room} must not import {parts[0]})")
    return problems


def test_every_room_is_scanned():
    found = {room for room, _ in modules()}
    assert found == set(ROOMS)
    assert len(modules()) > 40  # the scan really walks the source tree


@pytest.mark.parametrize("room", ROOMS)
def test_rooms_import_only_what_the_rule_allows(room):
    problems = [p for r, path in modules() if r == room for p in violations(r, path)]
    assert not problems, "\n".join(problems)


def test_the_checker_catches_forbidden_imports(tmp_path):
    # The rule is only worth something if a violation is seen: plant some and look.
    core_probe = tmp_path / "core_probe.py"
    core_probe.write_text("import kopf\nfrom vbatch.api import app\n\ndef f():\n    from vbatch.worker import shard\n"
                          "    from fastapi import FastAPI\nfrom vbatch.core import state\nfrom . import ids\n",
                          encoding="utf-8")
    found = violations("core", core_probe)
    assert len(found) == 4, found
    api_probe = tmp_path / "api_probe.py"
    api_probe.write_text("from vbatch.operator import kube\nimport vbatch.worker.shard\nfrom vbatch import operator\n"
                         "from ..operator import cr_store\nfrom vbatch.api import errors\n", encoding="utf-8")
    assert len(violations("api", api_probe)) == 4
