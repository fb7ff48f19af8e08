"""clsvit's import graph, read from the source with ast: no circle, the model package imports
nothing above it, and no module hides an import of clsvit inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import clsvit

PACKAGE = Path(clsvit.__file__).resolve().parent
LAZY_REASON = "start-up time"  # the one reason a function imports a library itself, said on its line


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.AST) -> list[str]:
    """The clsvit modules an import statement names (`from clsvit.dense import transforms`: the module
    clsvit.dense.transforms; `from clsvit.config import load_config`: clsvit.config)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "clsvit"]
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "clsvit":
        return [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                for alias in node.names]
    return []


def imports(name: str) -> tuple[set[str], list[tuple[int, str]]]:
    """(the clsvit modules `name` imports, (line, text) of every import inside a function)."""
    source = MODULES[name].read_text()
    tree = ast.parse(source)
    targets, nested = set(), []
    for node in ast.walk(tree):
        targets.update(imported(node))
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    nested.append((node.lineno, source.splitlines()[node.lineno - 1].strip()))
    return targets - {name}, nested


GRAPH = {name: imports(name)[0] for name in MODULES}


def test_the_graph_is_read():
    assert GRAPH["clsvit.data.crops"] >= {"clsvit.data.images", "clsvit.data.augment"}
    assert "clsvit.dense.transforms" in GRAPH["clsvit.dense.engine"]


def test_no_module_imports_itself_through_others():
    def cycle_from(start):
        stack = [(start, [start])]
        while stack:
            name, path = stack.pop()
            for target in GRAPH.get(name, ()):
                if target == start:
                    return path + [start]
                if target not in path:
                    stack.append((target, path + [target]))
        return None

    cycles = [cycle for cycle in map(cycle_from, GRAPH) if cycle]
    assert not cycles, " ; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_model_package_imports_nothing_above_it():
    """Recipes, data and runs build on the model, never the other way round."""
    for name, targets in GRAPH.items():
        if name.startswith("clsvit.model"):
            above = {t for t in targets if not t.startswith("clsvit.model") and t != "clsvit.errors"}
            assert not above, f"{name} imports {sorted(above)}"


def test_a_function_imports_only_a_library_and_says_why():
    for name in MODULES:
        for line, text in imports(name)[1]:
            assert not text.split()[1].startswith("clsvit"), f"{name} line {line}: {text} (import it at the top)"
            assert LAZY_REASON in text, f"{name} line {line}: {text} (import it at the top, or say '{LAZY_REASON}')"
