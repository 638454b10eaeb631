"""The mutants of one module: small AST changes a test suite ought to notice.

Operators (each mutant changes one node):
  binop     + <-> -, * <-> /, // -> *, % -> /, | <-> &, << <-> >>   (also in +=, -=, ...)
  compare   < <-> <=, > <-> >=, == <-> !=, in <-> not in, is <-> is not
  boolop    and <-> or
  not       `not x` -> `x`
  negate    the condition of if / while / a conditional expression / a comprehension filter
  number    n -> n + 1;  True <-> False
  string    'text' -> 'XXtextXX' (not docstrings, annotations or f-string text)
Log calls (log.info(...), logger..., logging...) are not mutated at all: what is
logged is for people reading logs, not behaviour the suite pins.
  minmax    max(...) <-> min(...)
  return    `return x` -> `return None`
  raise     `raise X` -> `pass`
  call      a call statement (`f(x)` alone on a line) -> `pass`
  loop      break <-> continue

Every mutant has a stable id — module, enclosing function, operator, and the code
before and after — so a reviewed list of equivalent mutants survives unrelated edits.
"""

from __future__ import annotations

import ast
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

BINOPS: dict[type, type] = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
    ast.Mod: ast.Div, ast.BitOr: ast.BitAnd, ast.BitAnd: ast.BitOr, ast.LShift: ast.RShift, ast.RShift: ast.LShift,
}
COMPARES: dict[type, type] = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}


@dataclass
class Mutant:
    module: str  # "core/state.py"
    id: str  # stable: module::function::operator::before -> after
    line: int
    lines: frozenset[int]  # source lines whose tests may notice it
    operator: str
    apply: Callable[[ast.Module], None] = field(repr=False)  # mutates a fresh copy of the module's tree

    def tree(self, original: ast.Module) -> ast.Module:
        tree = copy.deepcopy(original)
        self.apply(tree)
        return ast.fix_missing_locations(tree)


def _short(node: ast.AST | str, limit: int = 70) -> str:
    text = node if isinstance(node, str) else ast.unparse(node)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _locate(tree: ast.Module, path: tuple) -> ast.AST:
    node: object = tree
    for step in path:
        node = getattr(node, step) if isinstance(step, str) else node[step]  # type: ignore[index]
    return node  # type: ignore[return-value]


def _set(tree: ast.Module, path: tuple, value: object) -> None:
    parent = _locate(tree, path[:-1])
    if isinstance(path[-1], str):
        setattr(parent, path[-1], value)
    else:
        parent[path[-1]] = value  # type: ignore[index]


def _is_docstring(parent: ast.AST, name: str, index: int | None) -> bool:
    return (
        isinstance(parent, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and name == "body" and index == 0
    )


def _is_log_call(node: ast.AST) -> bool:
    """log.info(...), logger.warning(...), logging.error(...)"""
    return (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name) and node.func.value.id in ("log", "logger", "logging")
    )


def module_mutants(module: str, tree: ast.Module) -> Iterator[Mutant]:
    """Every mutant of `tree`, in source order."""
    seen: dict[str, int] = {}

    def make(path: tuple, node: ast.AST, scope: str, stmt: ast.stmt | None, operator: str,
             replacement: ast.AST | None, apply: Callable[[ast.Module], None]) -> Mutant:
        before = _short(node)
        after = "pass" if replacement is None else _short(replacement)
        key = f"{module}::{scope}::{operator}::{before} -> {after}"
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            key += f" #{seen[key]}"
        end = getattr(node, "end_lineno", node.lineno) or node.lineno
        lines = set(range(node.lineno, end + 1))
        if stmt is not None:
            lines.add(stmt.lineno)
        return Mutant(module, key, node.lineno, frozenset(lines), operator, apply)

    def replace(path: tuple, node: ast.AST, new: ast.AST, scope: str, stmt, operator: str) -> Mutant:
        def apply(tree: ast.Module) -> None:
            _set(tree, path, ast.copy_location(copy.deepcopy(new), _locate(tree, path)))

        return make(path, node, scope, stmt, operator, new, apply)

    def visit(node: ast.AST, path: tuple, scope: str, stmt: ast.stmt | None, in_fstring: bool) -> Iterator[Mutant]:
        if isinstance(node, ast.ImportFrom) or isinstance(node, ast.Import):
            return
        if _is_log_call(node) or (isinstance(node, ast.Expr) and _is_log_call(node.value)):
            return  # logging is for people reading logs, not behaviour a test pins: not mutated
        if isinstance(node, ast.stmt):
            stmt = node
        yield from node_mutants(node, path, scope, stmt, in_fstring)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = node.name if scope == "<module>" else f"{scope}.{node.name}"
        for name, value in ast.iter_fields(node):
            if name in ("annotation", "returns", "type_comment"):
                continue  # annotations are not evaluated (from __future__ import annotations)
            if isinstance(value, list):
                for i, child in enumerate(value):
                    if isinstance(child, ast.AST) and not (
                        _is_docstring(node, name, i) and isinstance(child, ast.Expr)
                        and isinstance(child.value, ast.Constant) and isinstance(child.value.value, str)
                    ):
                        yield from visit(child, (*path, name, i), scope, stmt, in_fstring or isinstance(node, ast.JoinedStr))
            elif isinstance(value, ast.AST):
                yield from visit(value, (*path, name), scope, stmt, in_fstring or isinstance(node, ast.JoinedStr))

    def node_mutants(node: ast.AST, path: tuple, scope: str, stmt, in_fstring: bool) -> Iterator[Mutant]:
        if isinstance(node, ast.BinOp) and type(node.op) in BINOPS:
            yield replace(path, node, ast.BinOp(node.left, BINOPS[type(node.op)](), node.right), scope, stmt, "binop")
        elif isinstance(node, ast.AugAssign) and type(node.op) in BINOPS:
            yield replace(path, node, ast.AugAssign(node.target, BINOPS[type(node.op)](), node.value), scope, stmt, "binop")
        elif isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in COMPARES:
                    ops = list(node.ops)
                    ops[i] = COMPARES[type(op)]()
                    yield replace(path, node, ast.Compare(node.left, ops, node.comparators), scope, stmt, "compare")
        elif isinstance(node, ast.BoolOp):
            other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            yield replace(path, node, ast.BoolOp(other, node.values), scope, stmt, "boolop")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            yield replace(path, node, node.operand, scope, stmt, "not")
        elif isinstance(node, ast.Constant) and not in_fstring:
            value = node.value
            if isinstance(value, bool):
                yield replace(path, node, ast.Constant(not value), scope, stmt, "number")
            elif isinstance(value, int):
                yield replace(path, node, ast.Constant(value + 1), scope, stmt, "number")
            elif isinstance(value, str):
                yield replace(path, node, ast.Constant(f"XX{value}XX"), scope, stmt, "string")
            elif isinstance(value, bytes):
                yield replace(path, node, ast.Constant(b"XX" + value + b"XX"), scope, stmt, "string")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("max", "min"):
            other = "min" if node.func.id == "max" else "max"
            yield replace(path, node, ast.Call(ast.Name(other, ast.Load()), node.args, node.keywords), scope, stmt, "minmax")
        elif isinstance(node, ast.Return) and node.value is not None and not (
            isinstance(node.value, ast.Constant) and node.value.value is None
        ):
            yield replace(path, node, ast.Return(ast.Constant(None)), scope, stmt, "return")
        elif isinstance(node, ast.Raise):
            yield replace(path, node, ast.Pass(), scope, stmt, "raise")
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            yield replace(path, node, ast.Pass(), scope, stmt, "call")
        elif isinstance(node, ast.Break):
            yield replace(path, node, ast.Continue(), scope, stmt, "loop")
        elif isinstance(node, ast.Continue):
            yield replace(path, node, ast.Break(), scope, stmt, "loop")
        # the negated condition of a branch, a loop, a conditional expression, a filter
        if isinstance(node, (ast.If, ast.While, ast.IfExp)):
            negated = ast.UnaryOp(ast.Not(), node.test)
            yield replace((*path, "test"), node.test, negated, scope, stmt, "negate")
        elif isinstance(node, ast.comprehension):
            for i, cond in enumerate(node.ifs):
                yield replace((*path, "ifs", i), cond, ast.UnaryOp(ast.Not(), cond), scope, stmt, "negate")

    yield from visit(tree, (), "<module>", None, False)
