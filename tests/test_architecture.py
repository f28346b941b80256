"""The import graph of the project's own code: layers import downward only, no cycle, few deferred imports.

Floors, top to bottom (docs/architecture.md): entry points and tools (train.py, test.py, search.py,
visualize.py, tools/, benchmarks/) -> processor/ -> model/ -> datasets/ and solver/ (side by side, neither imports
the other) -> utils/. A module may import its own package and any lower floor.
"""
import ast
import os
from collections import defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOORS = {"utils": 0, "datasets": 1, "solver": 1, "model": 2, "processor": 3}
TOP = 4
PACKAGES = set(FLOORS) | {"tools", "benchmarks"}
MAX_DEFERRED_PROJECT_IMPORTS = 9


def project_files() -> dict[str, str]:
    """Dotted module name -> file path, for every non-test Python file of the project."""
    modules = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "logs", "__pycache__", "data")]
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
            if parts[0] not in PACKAGES and len(parts) > 1:
                continue  # a folder that is not part of the project (e.g. a virtual environment)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def floor_of(module: str) -> int:
    return FLOORS.get(module.split(".")[0], TOP)


def resolve(target: str, names: list[str], modules: dict[str, str]) -> list[str]:
    """The project modules an import statement loads: ``from pkg import sub`` loads ``pkg.sub`` when that is a
    module, else ``pkg`` itself."""
    if target.split(".")[0] not in modules and target not in modules:
        return []
    found = [f"{target}.{name}" for name in names if f"{target}.{name}" in modules]
    if len(found) < len(names) and target in modules:
        found.append(target)
    return found


def imports_of(path: str, modules: dict[str, str]):
    """(module-level imports, function-level imports as (line, module, commented)) of one file."""
    source = open(path, encoding="utf-8").read()
    lines = source.splitlines()
    tree = ast.parse(source)
    deferred_nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            deferred_nodes.update(id(sub) for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom)))
    top, deferred = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [t for alias in node.names for t in resolve(alias.name, [], modules) or
                       ([alias.name] if alias.name in modules else [])]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = resolve(node.module, [alias.name for alias in node.names], modules)
        else:
            continue
        if id(node) in deferred_nodes:
            line = node.lineno - 1
            while line > 0 and lines[line - 1].strip().startswith(("import ", "from ", "try:")) and "#" not in lines[line]:
                line -= 1  # a comment above a group of imports explains them all
            commented = "#" in lines[line] or (line > 0 and lines[line - 1].strip().startswith("#"))
            deferred.append((node.lineno, node.module if isinstance(node, ast.ImportFrom) else node.names[0].name,
                             commented, bool(targets)))
        else:
            top.update(targets)
    return top, deferred


@pytest.fixture(scope="module")
def graph():
    modules = project_files()
    edges, deferred = {}, {}
    for module, path in modules.items():
        edges[module], deferred[module] = imports_of(path, modules)
    return modules, edges, deferred


def test_the_walk_sees_the_project(graph):
    modules, edges, _ = graph
    for expected in ("train", "test", "utils.options", "model.irra", "model.registry", "processor.session",
                     "datasets.build", "solver.build", "tools.plot_curves"):
        assert expected in modules
    assert "model.registry" in edges["model.irra"] and "utils.options" in edges["model.registry"]


def test_no_import_runs_up_or_sideways(graph):
    _, edges, _ = graph
    wrong = []
    for module, targets in edges.items():
        for target in targets:
            same_package = module.split(".")[0] == target.split(".")[0]
            if not same_package and floor_of(target) >= floor_of(module):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that do not run downward: " + ", ".join(sorted(wrong))


def test_utils_imports_nothing_above_it(graph):
    _, edges, _ = graph
    assert not [(m, t) for m, targets in edges.items() if m.startswith("utils") for t in targets
                if not t.startswith("utils")]


def test_no_import_cycle(graph):
    _, edges, _ = graph
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the current path, 2 done
    cycles = []

    def visit(module, path):
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if target == module:
                continue
            if state[target] == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif state[target] == 0:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if state[module] == 0:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_deferred_imports_are_few_and_explained(graph):
    _, _, deferred = graph
    project = [(m, line, name) for m, items in deferred.items() for line, name, _, is_project in items if is_project]
    assert len(project) <= MAX_DEFERRED_PROJECT_IMPORTS, project
    unexplained = [f"{m}:{line} ({name})" for m, items in deferred.items() for line, name, commented, _ in items
                   if not commented]
    assert not unexplained, "function-local imports without a comment saying why: " + ", ".join(unexplained)


def test_the_checker_catches_a_cycle_and_an_upward_import(tmp_path):
    """The rules above can fail: a fake tree with both faults is reported."""
    modules = {"utils.a": "", "model.b": "", "utils.c": ""}
    edges = {"utils.a": {"model.b"}, "model.b": {"utils.c"}, "utils.c": {"utils.a"}}
    upward = [f"{m} -> {t}" for m, ts in edges.items() for t in ts
              if m.split(".")[0] != t.split(".")[0] and floor_of(t) >= floor_of(m)]
    assert upward == ["utils.a -> model.b"]
    seen, stack = set(), ["utils.a"]
    path = []
    while stack:  # follow the single chain of this fake graph back to its start
        node = stack.pop()
        if node in seen:
            path.append(node)
            break
        seen.add(node)
        path.append(node)
        stack.extend(edges[node])
    assert path == ["utils.a", "model.b", "utils.c", "utils.a"] and set(modules) == seen
