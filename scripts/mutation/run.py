"""Mutation testing of the core against the fast unit tier (`make mutation`).

    .venv/bin/python scripts/mutation/run.py                    # every module in MODULES
    .venv/bin/python scripts/mutation/run.py core/state.py      # some modules (report not written)
    .venv/bin/python scripts/mutation/run.py core/state.py --write   # ... and update their entries
    .venv/bin/python scripts/mutation/run.py --survivors        # re-try only the last run's survivors
    .venv/bin/python scripts/mutation/run.py --survivors --write   # ... and update the report with them

Why a harness of our own and not mutmut 3: mutmut names a mutant after its file
path (`core.state.x_f__mutmut_1`) and its trampolines compare that name with the
function's runtime `__module__` (`vbatch.core.state`), so with pyproject's
package-dir mapping (vbatch.core -> core/) every mutant runs the original code.
This harness maps the two itself, and adds the mutants mutmut skips (negated
conditions, removed `raise`, `return None`, removed calls).

How: one pass of tests/unit under coverage, with a context per test, maps each
source line to the tests that run it. Then, per mutant, a process forked from
this warm one drops the project's modules, imports the mutated module in place
of the real one (an import hook, same name and file), and runs only the tests
of the mutated lines, fastest first, stopping at the first failure; a mutant
that hangs past its timeout counts as killed. Two at a time by default.

Writes bench/mutation.json ({"core/state.py": 0.95, ...}: killed / (tried -
equivalent)) and bench/mutation-details.json (counts and every survivor), and
prints the survivors. Equivalent mutants — changes no behaviour can show — are
listed with a reason each in scripts/mutation/equivalents.toml. A report, not a gate.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
from mutants import Mutant, module_mutants  # noqa: E402

# The core modules under test; add one here (e.g. core/driver.py) to include it.
MODULES = ["core/state.py", "core/merge.py", "core/validation.py", "core/sharding.py", "core/driver.py"]
TESTS = "tests/unit"
EQUIVALENTS = HERE / "equivalents.toml"
SCORES, DETAILS = REPO / "bench" / "mutation.json", REPO / "bench" / "mutation-details.json"
PYTEST_ARGS = ["-q", "-x", "-p", "no:cacheprovider", "--no-header", "-o", "addopts=", "-W", "ignore"]


def import_name(module: str) -> str:
    """core/state.py -> vbatch.core.state (pyproject's package-dir: vbatch.core -> core/)."""
    parts = Path(module).with_suffix("").parts
    return "vbatch." + ".".join(parts)


# --- which tests run which lines -----------------------------------------------------


class _Contexts:
    """pytest plugin: a coverage context per test; records each test's duration."""

    def __init__(self, cov):
        self.cov, self.durations = cov, {}

    def pytest_runtest_setup(self, item):
        self.cov.switch_context(item.nodeid)

    def pytest_runtest_logreport(self, report):
        self.durations[report.nodeid] = self.durations.get(report.nodeid, 0.0) + report.duration


def line_tests(modules: list[str]) -> tuple[dict[str, dict[int, set[str]]], dict[str, float]]:
    """Run tests/unit once under coverage: each module's line -> tests map, and the
    tests' durations. Leaves the project and its tests imported in this process:
    the warm state every mutant's process is forked from."""
    import coverage
    import pytest

    files = [str(REPO / m) for m in modules]
    cov = coverage.Coverage(data_file=None, include=files, config_file=False)
    plugin = _Contexts(cov)
    cov.start()
    try:
        code = pytest.main([TESTS, *PYTEST_ARGS], plugins=[plugin])
    finally:
        cov.stop()
    if code != 0:
        raise SystemExit(f"the unit tests fail without any mutant (pytest exit {code}): fix them first")
    data = cov.get_data()
    lines = {}
    for module, path in zip(modules, files):
        found = data.contexts_by_lineno(path) if path in data.measured_files() else {}
        lines[module] = {n: set(ctx) for n, ctx in found.items()}
    return lines, plugin.durations


def tests_for(mutant: Mutant, lines: dict[int, set[str]]) -> set[str]:
    """The tests that run the mutated lines; all of the module's tests for code run
    at import time (constants, defaults, class bodies)."""
    found = set().union(*(lines.get(n, set()) for n in mutant.lines))
    if "" in found:  # the empty context: executed while importing
        return set().union(*lines.values()) - {""}
    return found


# --- running one mutant ------------------------------------------------------------------


class _Select:
    """pytest plugin: keep only the chosen tests, fastest first."""

    def __init__(self, chosen: set[str], durations: dict[str, float]):
        self.chosen, self.durations = chosen, durations

    def pytest_collection_modifyitems(self, config, items):
        keep = [i for i in items if i.nodeid in self.chosen]
        config.hook.pytest_deselected(items=[i for i in items if i.nodeid not in self.chosen])
        items[:] = sorted(keep, key=lambda i: self.durations.get(i.nodeid, 0.0))


def _is_project(name: str, module) -> bool:
    file = getattr(module, "__file__", None) or ""
    return name.startswith("vbatch") or file.startswith(str(REPO))


def install_mutant(name: str, code) -> None:
    """Run the mutated code in the real module's namespace, then point every name
    that other project and test modules imported from it (`from vbatch.core.state
    import next_action`) at the mutated objects: the same as importing the mutant
    afresh, without re-importing the project (its import-time registries forbid it)."""
    module = sys.modules[name]
    before = dict(module.__dict__)
    exec(code, module.__dict__)
    after = module.__dict__
    changed = {id(v): (n, after[n]) for n, v in before.items() if not n.startswith("__") and after.get(n) is not v}
    for other_name, other in list(sys.modules.items()):
        if other is module or not _is_project(other_name, other):
            continue
        names = vars(other)
        for n, v in list(names.items()):
            hit = changed.get(id(v))
            if hit and before[hit[0]] is v and (n == hit[0] or getattr(v, "__module__", None) == name):
                names[n] = hit[1]


def run_mutant(mutant: Mutant, tree: ast.Module, tests: set[str], durations: dict[str, float], basetemp: str) -> int:
    """In a forked child: put the mutant in place, run its tests; pytest's exit code."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    import pytest

    install_mutant(import_name(mutant.module), compile(mutant.tree(tree), str(REPO / mutant.module), "exec"))
    files = sorted({t.split("::", 1)[0] for t in tests})
    return int(pytest.main([*files, *PYTEST_ARGS, "--basetemp", basetemp], plugins=[_Select(tests, durations)]))


def run_all(jobs: list[tuple[Mutant, set[str]]], trees, durations, workers: int) -> dict[str, str]:
    """Fork up to `workers` children at a time; verdicts by mutant id."""
    verdicts: dict[str, str] = {}
    running: dict[int, tuple[Mutant, float, str]] = {}
    pending = list(jobs)
    scratch = tempfile.mkdtemp(prefix="vbatch-mutation-")
    done = started = 0
    try:
        while pending or running:
            while pending and len(running) < workers:
                mutant, tests = pending.pop(0)
                started += 1
                basetemp = os.path.join(scratch, str(started))
                limit = 20 + 10 * sum(durations.get(t, 0.0) for t in tests)
                pid = os.fork()
                if pid == 0:
                    os.setpgid(0, 0)
                    try:
                        status = run_mutant(mutant, trees[mutant.module], tests, durations, basetemp)
                    except BaseException:
                        status = 3
                    os._exit(status)
                running[pid] = (mutant, time.monotonic() + limit, basetemp)
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                for child, (mutant, deadline, _) in list(running.items()):
                    if time.monotonic() > deadline:
                        with _suppress():
                            os.killpg(child, signal.SIGKILL)
                        verdicts[mutant.id] = "timeout"
                time.sleep(0.02)
                continue
            mutant, _, basetemp = running.pop(pid)
            shutil.rmtree(basetemp, ignore_errors=True)
            code = os.waitstatus_to_exitcode(status)
            if mutant.id not in verdicts:  # not already a timeout
                verdicts[mutant.id] = "survived" if code == 0 else "killed"
            done += 1
            if done % 25 == 0 or not (pending or running):
                print(f"  {done}/{len(jobs)} mutants run", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return verdicts


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], ProcessLookupError)


# --- the report --------------------------------------------------------------------------


def load_equivalents() -> dict[str, str]:
    entries = tomllib.loads(EQUIVALENTS.read_text()).get("equivalent", []) if EQUIVALENTS.exists() else []
    return {e["id"]: e["reason"] for e in entries}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help="modules to mutate (default: all of MODULES)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--survivors", action="store_true",
                        help="re-try only the survivors of the last full run (with --write: update its report)")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    parser.add_argument("--write", action="store_true",
                        help="with modules named: update their entries in the report files, keep the others'")
    args = parser.parse_args()
    modules = args.modules or MODULES
    full_run = args.write or not (args.modules or args.survivors)
    os.chdir(REPO)
    started = time.monotonic()
    equivalents = load_equivalents()
    trees = {m: ast.parse((REPO / m).read_text(), m) for m in modules}
    mutants = every = [mu for m in modules for mu in module_mutants(m, trees[m])]
    if args.survivors:
        # Re-try the last run's survivors (and the listed equivalents, to catch stale entries);
        # with --write every other mutant keeps its verdict from that run: killed.
        last = json.loads(DETAILS.read_text())["modules"]
        for m in modules:
            if m not in last or last[m]["mutants"] != sum(mu.module == m for mu in every):
                raise SystemExit(f"{m} changed since the last full run (or was not in it): run it in full")
        again = {i for m in modules for i in [s["id"] for s in last[m]["survivors"]] + last[m].get("equivalent_ids", [])}
        again |= set(equivalents)
        mutants = [mu for mu in mutants if mu.id in again]

    print(f"mapping tests/unit to the lines of {len(modules)} modules ...", flush=True)
    lines, durations = line_tests(modules)
    jobs, uncovered = [], []
    for mu in mutants:
        tests = tests_for(mu, lines[mu.module])
        (jobs.append((mu, tests)) if tests else uncovered.append(mu))
    if args.list:
        for mu, tests in jobs:
            print(f"{mu.id}  [line {mu.line}, {len(tests)} tests]")
        for mu in uncovered:
            print(f"{mu.id}  [line {mu.line}, NO TEST]")
        return 0
    # The harness itself is checked first: each module unmutated must pass its tests here.
    controls = [(Mutant(m, f"{m}::<unmutated>", 0, frozenset(), "none", lambda tree: None),
                 set().union(*lines[m].values()) - {""}) for m in modules]
    broken = [mu.module for mu, verdict in zip((c for c, _ in controls), run_all(controls, trees, durations, args.workers).values())
              if verdict != "survived"]
    if broken:
        raise SystemExit(f"the unmutated {', '.join(broken)} fail their tests under the harness: no verdict is trustworthy")
    print(f"{len(mutants)} mutants ({len(uncovered)} on lines no unit test runs), {args.workers} at a time", flush=True)
    verdicts = run_all(jobs, trees, durations, args.workers)
    verdicts.update({mu.id: "no test" for mu in uncovered})
    if args.survivors and args.write:
        verdicts.update({mu.id: "killed" for mu in every if mu.id not in verdicts})  # in the last full run
        mutants = every

    report, scores = {}, {}
    for m in modules:
        own = [mu for mu in mutants if mu.module == m]
        killed = sum(verdicts[mu.id] in ("killed", "timeout") for mu in own)
        equivalent = [mu for mu in own if verdicts[mu.id] not in ("killed", "timeout") and mu.id in equivalents]
        survivors = [mu for mu in own if verdicts[mu.id] not in ("killed", "timeout") and mu.id not in equivalents]
        stale = [mu.id for mu in own if mu.id in equivalents and verdicts[mu.id] in ("killed", "timeout")]
        scored = len(own) - len(equivalent)
        scores[m] = round(killed / scored, 3) if scored else 1.0
        report[m] = {
            "score": scores[m], "mutants": len(own), "killed": killed,
            "timeouts": sum(verdicts[mu.id] == "timeout" for mu in own),
            "equivalent": len(equivalent), "equivalent_ids": [mu.id for mu in equivalent], "survived": len(survivors),
            "survivors": [{"id": mu.id, "line": mu.line, "verdict": verdicts[mu.id]} for mu in survivors],
            "listed_equivalent_but_killed": stale,
        }
    known = {mu.id for mu in every}
    unknown = sorted(i for i in equivalents if i.split("::", 1)[0] in modules and i not in known)
    minutes = round((time.monotonic() - started) / 60, 1)

    for m, info in report.items():
        print(f"\n{m}: {info['score']:.1%} ({info['killed']} killed of {info['mutants']}, "
              f"{info['equivalent']} equivalent, {info['survived']} survived)")
        for s in info["survivors"]:
            print(f"  SURVIVED line {s['line']}: {s['id']}" + (" [no test runs it]" if s["verdict"] == "no test" else ""))
        for i in info["listed_equivalent_but_killed"]:
            print(f"  listed as equivalent but killed (remove it from equivalents.toml): {i}")
    for i in unknown:
        print(f"  listed as equivalent but no such mutant (stale entry?): {i}")
    print(f"\n{minutes} min")
    if full_run:
        details = {"tests": TESTS, "minutes": {}, "modules": {}, "stale_equivalents": []}
        if (args.modules or args.survivors) and DETAILS.exists():  # a partial run updates its modules only
            details = json.loads(DETAILS.read_text())
            if not isinstance(details.get("minutes"), dict):
                details["minutes"] = {}
        details["minutes"][" ".join(modules)] = minutes
        details["modules"].update(report)
        others = [i for i in details.get("stale_equivalents", []) if i.split("::", 1)[0] not in modules]
        details["stale_equivalents"] = sorted(others + unknown)
        details["modules"] = {m: details["modules"][m] for m in MODULES if m in details["modules"]}
        SCORES.write_text(json.dumps({m: info["score"] for m, info in details["modules"].items()}, indent=2) + "\n")
        DETAILS.write_text(json.dumps(details, indent=2) + "\n")
        print(f"wrote {SCORES.relative_to(REPO)} and {DETAILS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
